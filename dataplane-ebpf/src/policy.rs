//! Security groups, network ACLs and connection tracking for a packet about to be delivered.
//!
//! The verdict is the pure `dataplane_common::policy::evaluate`; this module feeds it the
//! packet, the endpoints and the clock.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    DropReason,
    flowlog::{Decision, EP_LOG_ACCEPT, EP_LOG_REJECT},
    overlay::Endpoint,
    packet::PacketView,
    parse::{ETH_HLEN, Family, IpPacket, parse_ipv4},
    policy::evaluate,
};

use crate::{flowlog, maps::ENDPOINTS, packet::TcPacket, tables::PolicyKernel, trace};

/// The endpoints a policy check applies to, with their ports (flow logs name them).
pub struct Sides {
    /// The sender, when it lives here (its outbound rules apply).
    pub out: Option<&'static Endpoint>,
    /// The receiver, when it lives here (its inbound rules apply).
    pub inb: Option<&'static Endpoint>,
    /// VNI of the VPC (of whichever endpoint is present).
    pub vni: u32,
    /// Host-side port of `out`, 0 without it.
    pub out_ifindex: u32,
    /// Host-side port of `inb`, 0 without it.
    pub in_ifindex: u32,
}

impl Sides {
    /// The sides `out` (port `out_ifindex`) and `inb` (port `in_ifindex`); missing ones'
    /// ports are ignored.
    #[inline(always)]
    pub fn new(
        out: Option<&'static Endpoint>,
        out_ifindex: u32,
        inb: Option<&'static Endpoint>,
        in_ifindex: u32,
    ) -> Sides {
        let vni = match (out, inb) {
            (Some(e), _) | (None, Some(e)) => e.vni,
            (None, None) => 0,
        };
        Sides {
            out,
            inb,
            vni,
            out_ifindex: if out.is_some() { out_ifindex } else { 0 },
            in_ifindex: if inb.is_some() { in_ifindex } else { 0 },
        }
    }
}

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
///
/// When either endpoint logs flows with this verdict (`EP_LOG_ACCEPT`, `EP_LOG_REJECT`), the
/// decision goes to the flow log; otherwise that costs one flag test.
#[inline(never)]
pub fn check(pkt: &TcPacket, sides: &Sides) -> Result<(), DropReason> {
    let mut ip = EMPTY_IP;
    parse_ip(pkt, &mut ip)?;
    let mut d = Decision::EMPTY;
    let r = verdict(pkt, &ip, sides, &mut d);
    // Reporting happens here, not in `verdict`, whose frame (conntrack key and entries) is
    // the largest: the event subprograms then never stack on top of it.
    if pkt.traced() {
        trace::policy(sides, &d, reason_number(r));
        return r;
    }
    let flags = sides.out.map_or(0, |e| e.flags) | sides.inb.map_or(0, |e| e.flags);
    let want = if r.is_ok() {
        EP_LOG_ACCEPT
    } else {
        EP_LOG_REJECT
    };
    if flags & want != 0 {
        flowlog::emit(&ip, sides, &d, reason_number(r), pkt.len() as u32);
    }
    r
}

/// The drop reason's number, 0 when admitted.
#[inline(always)]
fn reason_number(r: Result<(), DropReason>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(reason) => reason as u32,
    }
}

/// The verdict on a parsed packet, what decided it in `d` (a BPF subprogram).
#[inline(never)]
fn verdict(
    pkt: &TcPacket,
    ip: &IpPacket,
    sides: &Sides,
    d: &mut Decision,
) -> Result<(), DropReason> {
    // No endpoint here: nothing to apply. (Tested on the ports, which are nonzero exactly
    // when their endpoint is present: the compiler turns a test of both pointers into an OR
    // of pointers, which the verifier rejects.)
    if sides.out_ifindex | sides.in_ifindex == 0 {
        return Ok(());
    }
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    evaluate(
        pkt,
        ip,
        sides.vni,
        sides.out,
        sides.inb,
        now,
        &PolicyKernel {
            trace: pkt.traced(),
        },
        d,
    )
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
