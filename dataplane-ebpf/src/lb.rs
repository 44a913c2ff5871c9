//! Load balancing of packets to a VIP (DNAT to the chosen target) and reverse NAT of the
//! targets' replies.
//!
//! The choice is the pure `dataplane_common::lb::select` (Maglev slot or the flow's recorded
//! target); this module feeds it the packet and the clock and rewrites the headers, keeping
//! the IPv4 and TCP/UDP checksums right through the kernel's incremental checksum helpers
//! (which also handle checksum-offloaded packets).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    DropReason,
    lb::{LbReverse, Selection, record, reverse as reverse_of, select},
    overlay::{Endpoint, v4},
    parse::{IPPROTO_UDP, IpPacket},
};

use crate::{
    packet::TcPacket,
    policy::{EMPTY_IP, parse_ip},
    tables::KernelTables,
    trace,
};

/// Offset of the source address in the IPv4 header.
const IP_SRC: usize = 12;
/// Offset of the destination address.
const IP_DST: usize = 16;
/// Offset of the header checksum.
const IP_CSUM: usize = 10;

/// Picks the target of a packet from `ep` to a VIP and rewrites its destination to it (the
/// client's source stays). A BPF subprogram.
#[inline(never)]
pub fn balance(pkt: &TcPacket, ep: &Endpoint) -> Result<(), DropReason> {
    let mut ip = EMPTY_IP;
    parse_ip(pkt, &mut ip)?;
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut sel = Selection::default();
    select(&ip, ep.vni, now, &KernelTables, &mut sel)?;
    // A trace records no flow (a new one would otherwise pin the client to a target).
    if sel.record && !pkt.traced() {
        record(&KernelTables, &ip, ep.vni, &sel, now);
    }
    trace::balance(pkt, &sel);
    let b = &sel.backend;
    rewrite(
        pkt,
        &ip,
        IP_DST,
        2,
        v4(&ip.dst),
        v4(&b.addr),
        ip.dst_port,
        b.port,
    )
}

/// Parses the packet into `ip` and looks up its reverse NAT (a reply of a balanced flow of
/// `ep`'s VPC).
#[inline(always)]
fn reply(
    pkt: &TcPacket,
    ep: &Endpoint,
    ip: &mut IpPacket,
) -> Result<Option<LbReverse>, DropReason> {
    parse_ip(pkt, ip)?;
    Ok(reverse_of(ip, ep.vni, &KernelTables))
}

/// Whether a packet about to be delivered to `ep` is a target's reply to a balanced flow.
/// A BPF subprogram.
#[inline(never)]
pub fn is_reply(pkt: &TcPacket, ep: &Endpoint) -> Result<bool, DropReason> {
    let mut ip = EMPTY_IP;
    Ok(reply(pkt, ep, &mut ip)?.is_some())
}

/// Rewrites a target's reply to a balanced flow of `ep` so it comes from the VIP and
/// listener port; other packets are left alone. A BPF subprogram.
#[inline(never)]
pub fn reverse(pkt: &TcPacket, ep: &Endpoint) -> Result<(), DropReason> {
    let mut ip = EMPTY_IP;
    let Some(rev) = reply(pkt, ep, &mut ip)? else {
        return Ok(());
    };
    rewrite(
        pkt,
        &ip,
        IP_SRC,
        0,
        v4(&ip.src),
        v4(&rev.vip),
        ip.src_port,
        rev.port,
    )
}

/// Replaces the address at IPv4 offset `addr_field` (`old` -> `new`) and the port at L4
/// offset `port_field` (`old_port` -> `new_port`), with their checksums.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    pkt: &TcPacket,
    ip: &IpPacket,
    addr_field: usize,
    port_field: usize,
    old: [u8; 4],
    new: [u8; 4],
    old_port: u16,
    new_port: u16,
) -> Result<(), DropReason> {
    let l3 = usize::from(ip.l3_offset);
    let l4 = usize::from(ip.l4_offset);
    let udp = ip.proto == IPPROTO_UDP;
    let l4_csum = l4 + if udp { 6 } else { 16 };
    if old != new {
        pkt.replace_addr(l3 + addr_field, l3 + IP_CSUM, l4_csum, udp, old, new)?;
    }
    if old_port != new_port {
        pkt.replace_port(l4 + port_field, l4_csum, udp, old_port, new_port)?;
    }
    Ok(())
}
