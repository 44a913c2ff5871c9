//! What to do with a packet arriving on the underlay: decapsulate VXLAN for a local
//! instance, drop spoofed or unknown VXLAN, leave everything else to the host stack.

use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    DropReason,
    filter::ipv4_mapped,
    overlay::{NeighborKey, NeighborKind, OverlayConfig, OverlayTables, VXLAN_PORT, v4},
    packet::PacketView,
    parse::{ETH_P_IP, Family, IPPROTO_UDP, IpPacket},
    vxlan::{INNER_ETH_OFFSET, INNER_IP_OFFSET, VXLAN_OFFSET, vni},
};

/// The decision for one underlay packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderlayAction {
    /// Not VXLAN for this host's VTEP: the host stack's business.
    NotOverlay,
    /// Strip the outer headers (the first [`crate::overlay::VXLAN_OVERHEAD`] bytes after the
    /// outer Ethernet header), write `eth` (destination, source) as the Ethernet addresses
    /// and redirect to the local port `ifindex`.
    Deliver {
        /// Host-side veth of the destination instance.
        ifindex: u32,
        /// Ethernet destination (the instance) and source (the inner frame's).
        eth: [u8; 12],
    },
}

/// Decides the fate of an underlay packet whose outer headers parsed as `outer`.
#[inline(always)]
pub fn decide<P: PacketView, T: OverlayTables>(
    pkt: &P,
    outer: &IpPacket,
    cfg: &OverlayConfig,
    tables: &T,
) -> Result<UnderlayAction, DropReason> {
    if cfg.vtep == [0; 4]
        || outer.family != Family::V4
        || outer.proto != IPPROTO_UDP
        || !outer.has_l4
        || outer.dst_port != VXLAN_PORT
        || v4(&outer.dst) != cfg.vtep
    {
        return Ok(UnderlayAction::NotOverlay);
    }
    // Decapsulation removes a fixed-size block: outer IP options or VLAN tags are not
    // produced by any VTEP of this datapath.
    if outer.l3_offset != 14 || outer.l4_offset != 34 {
        return Err(DropReason::MalformedVxlan);
    }
    let vtep = v4(&outer.src);
    if !tables.is_vtep(vtep) {
        return Err(DropReason::UnknownVtep);
    }
    let header: [u8; 8] = pkt.read(VXLAN_OFFSET).ok_or(DropReason::MalformedVxlan)?;
    let vni = vni(&header).ok_or(DropReason::MalformedVxlan)?;
    if !tables.is_vni(vni) {
        return Err(DropReason::UnknownVni);
    }
    let inner_eth: EthHdr = pkt
        .read(INNER_ETH_OFFSET)
        .ok_or(DropReason::MalformedVxlan)?;
    if u16::from_be(inner_eth.ether_type) != ETH_P_IP {
        return Err(DropReason::MalformedVxlan);
    }
    let inner: Ipv4Hdr = pkt
        .read(INNER_IP_OFFSET)
        .ok_or(DropReason::MalformedVxlan)?;
    if inner.vihl >> 4 != 4 {
        return Err(DropReason::MalformedVxlan);
    }
    // The sender must be an instance of this VPC that lives behind the sending VTEP.
    let src = tables.neighbor(&NeighborKey {
        vni,
        addr: ipv4_mapped(inner.src_addr),
    });
    match src {
        Some(n) if n.kind == NeighborKind::Remote as u32 && n.vtep == vtep => {}
        _ => return Err(DropReason::InnerSourceMismatch),
    }
    let dst = tables
        .neighbor(&NeighborKey {
            vni,
            addr: ipv4_mapped(inner.dst_addr),
        })
        .ok_or(DropReason::NoNeighbor)?;
    if dst.kind != NeighborKind::Local as u32 {
        return Err(DropReason::NoNeighbor);
    }
    let mut eth = [0u8; 12];
    eth[0..6].copy_from_slice(&dst.mac);
    eth[6..12].copy_from_slice(&inner_eth.src_addr);
    Ok(UnderlayAction::Deliver {
        ifindex: dst.ifindex,
        eth,
    })
}
