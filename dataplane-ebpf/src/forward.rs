//! Sending packets on: local delivery, VXLAN encapsulation toward another host, and
//! decapsulation. Each returns the TC action code to hand back to the kernel.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_REDIRECT, bpf_fib_lookup,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use dataplane_common::{
    DropReason,
    overlay::{OverlayConfig, VXLAN_OVERHEAD},
    vxlan::{EncapParams, encap_headers, source_port},
};

use crate::packet::TcPacket;

/// `AF_INET`.
const AF_INET: u8 = 2;
/// Shift of the inner-L2-length field in `bpf_skb_adjust_room` flags
/// (`BPF_F_ADJ_ROOM_ENCAP_L2(len)`).
const ADJ_ROOM_ENCAP_L2_SHIFT: u64 = 56;
/// Inner Ethernet header length, for the encapsulation flags.
const INNER_ETH_LEN: u64 = 14;

/// Redirects into the instance behind host-side veth `ifindex`: straight to the ingress of
/// its peer in the instance's namespace (no second pass through the host's backlog).
#[inline(always)]
pub fn to_port(ifindex: u32) -> Result<i32, DropReason> {
    // SAFETY: the helper only records the redirect target; it is valid at TC ingress, the
    // only place this datapath calls it from.
    let rc = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
    if rc == TC_ACT_REDIRECT {
        Ok(rc)
    } else {
        Err(DropReason::RewriteFailed)
    }
}

/// What the encapsulation needs from the forwarding decision.
pub struct Encap {
    /// Destination VTEP.
    pub vtep: [u8; 4],
    /// VNI of the VPC.
    pub vni: u32,
    /// Inner Ethernet destination and source.
    pub dst_mac: [u8; 6],
    /// Inner Ethernet source.
    pub src_mac: [u8; 6],
    /// Inner IP packet length.
    pub ip_len: u32,
    /// Keep the GSO segment size (the segments fit the underlay as they are).
    pub fixed_gso: bool,
}

/// Where an encapsulated packet leaves: the underlay device and, when the neighbor is
/// resolved, the outer MACs.
#[derive(Default)]
struct NextHop {
    ifindex: u32,
    resolved: bool,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

/// Looks up the underlay route to `vtep` (bound to the configured underlay interface).
/// A BPF subprogram: the 64-byte FIB parameter block lives in its own stack frame.
#[inline(never)]
fn next_hop(
    ctx: &TcContext,
    cfg: &OverlayConfig,
    vtep: [u8; 4],
    out: &mut NextHop,
) -> Result<(), DropReason> {
    // SAFETY: `bpf_fib_lookup` is plain old data; all-zero is a valid starting value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = cfg.underlay_ifindex;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.vtep);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(vtep);
    // SAFETY: `fib` is a valid, writable `bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    out.resolved = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        _ => return Err(DropReason::NoUnderlayRoute),
    };
    out.ifindex = fib.ifindex;
    out.src_mac = fib.smac;
    out.dst_mac = fib.dmac;
    Ok(())
}

/// Builds and writes the 64 header bytes. A BPF subprogram for its stack frame.
#[inline(never)]
fn write_headers(pkt: &TcPacket, params: &EncapParams) -> Result<(), DropReason> {
    pkt.write(0, &encap_headers(params))
}

/// Wraps the frame in VXLAN toward `e.vtep` and sends it out of the underlay interface the
/// FIB picks for that address.
#[inline(never)]
pub fn encapsulate(
    ctx: &TcContext,
    pkt: &TcPacket,
    cfg: &OverlayConfig,
    e: &Encap,
) -> Result<i32, DropReason> {
    let mut hop = NextHop::default();
    next_hop(ctx, cfg, e.vtep, &mut hop)?;

    let mut flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | (INNER_ETH_LEN << ADJ_ROOM_ENCAP_L2_SHIFT);
    if e.fixed_gso {
        flags |= BPF_F_ADJ_ROOM_FIXED_GSO as u64;
    }
    let hash = pkt.flow_hash();
    pkt.adjust_after_mac(VXLAN_OVERHEAD as i32, flags)?;
    write_headers(
        pkt,
        &EncapParams {
            outer_dst_mac: hop.dst_mac,
            outer_src_mac: hop.src_mac,
            src_vtep: cfg.vtep,
            dst_vtep: e.vtep,
            src_port: source_port(hash),
            vni: e.vni,
            inner_dst_mac: e.dst_mac,
            inner_src_mac: e.src_mac,
            inner_ip_len: e.ip_len,
        },
    )?;
    let rc = if hop.resolved {
        // SAFETY: records the redirect target; valid in TC programs.
        unsafe { bpf_redirect(hop.ifindex, 0) }
    } else {
        // The next hop has no neighbor entry yet: the kernel resolves it and fills in the
        // outer MACs (the zeros written above are replaced).
        // SAFETY: a null parameter block with length 0 asks the kernel to use the FIB.
        unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) }
    } as i32;
    if rc == TC_ACT_REDIRECT {
        Ok(rc)
    } else {
        Err(DropReason::NoUnderlayRoute)
    }
}

/// Strips the outer headers of a VXLAN frame and writes the inner Ethernet addresses `eth`;
/// the frame is then the one the instance receives.
#[inline(always)]
pub fn decapsulate(pkt: &TcPacket, eth: &[u8; 12]) -> Result<(), DropReason> {
    // The segment size stays: it describes the inner TCP payload, which does not change.
    let flags = (BPF_F_ADJ_ROOM_DECAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO) as u64;
    pkt.adjust_after_mac(-(VXLAN_OVERHEAD as i32), flags)?;
    // The outer EtherType (IPv4) stays, which is the inner one too.
    pkt.write(0, eth)
}
