//! Security groups, network ACLs and connection tracking for a packet about to be delivered.
//!
//! The verdict is the pure `dataplane_common::policy::evaluate`; this module feeds it the
//! packet, the endpoints and the clock.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    DropReason,
    overlay::Endpoint,
    parse::{ETH_HLEN, Family, IpPacket, parse_ipv4},
    policy::evaluate,
};

use crate::{maps::ENDPOINTS, packet::TcPacket, tables::KernelTables};

/// A parsed packet before parsing (every field written, for the verifier).
pub const EMPTY_IP: IpPacket = IpPacket {
    family: Family::V4,
    src: [0; 16],
    dst: [0; 16],
    proto: 0,
    l3_offset: 0,
    l4_offset: 0,
    has_l4: false,
    src_port: 0,
    dst_port: 0,
};

/// Applies the outbound policy of `out` (the sender, when it lives here) and the inbound
/// policy of `inb` (the receiver, when it lives here) to the IPv4 frame in `pkt`, and tracks
/// the flow. A BPF subprogram (the parsed headers live in its frame, not the caller's) whose
/// parsing and verdict are sibling subprograms, so their frames are never live at once: the
/// kernel's 512-byte stack limit covers the whole call chain.
#[inline(never)]
pub fn check(
    pkt: &TcPacket,
    out: Option<&Endpoint>,
    inb: Option<&Endpoint>,
) -> Result<(), DropReason> {
    let mut ip = EMPTY_IP;
    parse_ip(pkt, &mut ip)?;
    verdict(pkt, &ip, out, inb)
}

/// The verdict on a parsed packet (a BPF subprogram).
#[inline(never)]
fn verdict(
    pkt: &TcPacket,
    ip: &IpPacket,
    out: Option<&Endpoint>,
    inb: Option<&Endpoint>,
) -> Result<(), DropReason> {
    let vni = match (out, inb) {
        (Some(e), _) | (None, Some(e)) => e.vni,
        (None, None) => return Ok(()),
    };
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    evaluate(pkt, ip, vni, out, inb, now, &KernelTables)
}

/// The frame's IPv4 headers: instance frames are untagged IPv4 once the port program (or
/// the VXLAN receive checks) let them this far. A BPF subprogram; it fills `out` rather than
/// returning a `Result` of a struct, whose debug info (BTF) the kernel rejects.
#[inline(never)]
pub fn parse_ip(pkt: &TcPacket, out: &mut IpPacket) -> Result<(), DropReason> {
    *out = parse_ipv4(pkt, ETH_HLEN)?;
    Ok(())
}

/// The endpoint of the local port `ifindex`.
#[inline(always)]
pub fn endpoint(ifindex: u32) -> Option<&'static Endpoint> {
    // SAFETY: the reference points into the map's element, valid for the program run (RCU);
    // `ENDPOINTS` is not preallocated, so an update publishes a new element instead of
    // rewriting this one.
    unsafe { ENDPOINTS.get(ifindex) }
}
