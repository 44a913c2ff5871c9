//! What to do with a frame an instance sends (TC ingress on the host side of its veth).
//!
//! Order of checks: the port must be known; the source MAC and IP must be the instance's
//! (anti-spoofing); ARP requests are answered by the datapath; IPv4 is routed by longest
//! prefix within the instance's VPC, then delivered to a local port or encapsulated toward
//! the destination's host. Nothing else leaves the port.

use network_types::eth::EthHdr;

use crate::{
    DropReason,
    arp::{ARP_REQUEST, ArpIpv4},
    filter::ipv4_mapped,
    icmp::QUOTE_LEN,
    overlay::{
        Endpoint, NeighborKey, NeighborKind, OverlayConfig, OverlayTables, RouteKind, RoutePrefix,
        VXLAN_OVERHEAD, v4,
    },
    packet::PacketView,
    parse::{ETH_P_ARP, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, Parsed, parse},
};

/// What to do with a frame from an instance.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Drop it; [`PortAction::reason`] says why.
    Drop = 0,
    /// It is an ARP request to answer: write [`crate::arp::reply`] over it (with the
    /// endpoint's router MAC) and send it back.
    ArpReply = 1,
    /// Deliver to the local port [`PortAction::ifindex`], Ethernet destination
    /// [`PortAction::mac`], source the router MAC.
    Local = 2,
    /// Encapsulate toward [`PortAction::vtep`], inner destination [`PortAction::mac`].
    Remote = 3,
    /// DF set and too big for the underlay once encapsulated: answer with ICMP
    /// "fragmentation needed" announcing [`PortAction::mtu`] (quoting the packet's first
    /// [`QUOTE_LEN`] bytes of IP).
    FragNeeded = 4,
    /// To a load balancer's VIP: pick a target (`crate::lb`), rewrite the destination and
    /// decide again.
    Balance = 5,
}

/// The decision for one frame from an instance.
///
/// A flat struct rather than an enum with payloads, with every field set on every path: the
/// kernel verifier rejects reading registers that were never written, which is what LLVM
/// emits when it merges enum payloads that are undefined on some paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAction {
    /// What to do.
    pub forward: Forward,
    /// Why it is dropped (meaningful for [`Forward::Drop`] only).
    pub reason: DropReason,
    /// Local: the destination's host-side veth.
    pub ifindex: u32,
    /// Remote: the destination host's VTEP.
    pub vtep: [u8; 4],
    /// Local, Remote: the destination instance's MAC.
    pub mac: [u8; 6],
    /// Remote: length of the IPv4 packet.
    pub ip_len: u32,
    /// Remote, GSO packets: every segment still fits the underlay once encapsulated, so the
    /// segment size can stay fixed. When false the kernel shrinks it by the overhead.
    pub fixed_gso: bool,
    /// FragNeeded: the largest inner IP packet that fits.
    pub mtu: u16,
}

impl PortAction {
    const NONE: PortAction = PortAction {
        forward: Forward::Drop,
        reason: DropReason::Truncated,
        ifindex: 0,
        vtep: [0; 4],
        mac: [0; 6],
        ip_len: 0,
        fixed_gso: false,
        mtu: 0,
    };

    /// Drop for `reason`.
    pub const fn drop(reason: DropReason) -> Self {
        PortAction {
            reason,
            ..Self::NONE
        }
    }

    /// The decision as a `Result`, for callers that prefer `?` and `match`.
    pub fn result(self) -> Result<Self, DropReason> {
        match self.forward {
            Forward::Drop => Err(self.reason),
            _ => Ok(self),
        }
    }
}

/// Decides the fate of a frame sent by the instance behind `ep`. `gso_size` is the skb's GSO
/// segment size (0 for a plain packet).
#[inline(always)]
pub fn decide<P: PacketView, T: OverlayTables>(
    pkt: &P,
    ep: &Endpoint,
    cfg: &OverlayConfig,
    gso_size: u32,
    tables: &T,
) -> PortAction {
    match classify(pkt, ep, cfg, gso_size, tables) {
        Ok(action) => action,
        Err(reason) => PortAction::drop(reason),
    }
}

#[inline(always)]
fn classify<P: PacketView, T: OverlayTables>(
    pkt: &P,
    ep: &Endpoint,
    cfg: &OverlayConfig,
    gso_size: u32,
    tables: &T,
) -> Result<PortAction, DropReason> {
    let eth: EthHdr = pkt.read(0).ok_or(DropReason::Truncated)?;
    if eth.src_addr != ep.mac {
        return Err(DropReason::SpoofedMac);
    }
    match u16::from_be(eth.ether_type) {
        ETH_P_ARP => arp_request(pkt, ep, tables),
        ETH_P_IP => ipv4(pkt, ep, cfg, gso_size, tables),
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

#[inline(always)]
fn arp_request<P: PacketView, T: OverlayTables>(
    pkt: &P,
    ep: &Endpoint,
    tables: &T,
) -> Result<PortAction, DropReason> {
    let req: ArpIpv4 = pkt.read(EthHdr::LEN).ok_or(DropReason::Truncated)?;
    if !req.is_ipv4_over_ethernet() {
        return Err(DropReason::ArpUnanswered);
    }
    if req.sha != ep.mac {
        return Err(DropReason::SpoofedMac);
    }
    let own = v4(&ep.addr);
    // 0.0.0.0 is an address probe (RFC 5227), which any instance may send.
    if req.spa != own && req.spa != [0; 4] {
        return Err(DropReason::SpoofedIp);
    }
    // Replies and gratuitous announcements are not needed: the datapath knows every
    // address. A probe of the sender's own address must stay unanswered (no conflict).
    if req.oper() != ARP_REQUEST || req.tpa == own {
        return Err(DropReason::ArpUnanswered);
    }
    let key = NeighborKey {
        vni: ep.vni,
        addr: ipv4_mapped(req.tpa),
    };
    match tables.neighbor(&key) {
        Some(_) => Ok(PortAction {
            forward: Forward::ArpReply,
            ..PortAction::NONE
        }),
        None => Err(DropReason::ArpUnanswered),
    }
}

#[inline(always)]
fn ipv4<P: PacketView, T: OverlayTables>(
    pkt: &P,
    ep: &Endpoint,
    cfg: &OverlayConfig,
    gso_size: u32,
    tables: &T,
) -> Result<PortAction, DropReason> {
    let Parsed::Ip(ip) = parse(pkt)? else {
        return Err(DropReason::UnsupportedProtocol);
    };
    if ip.src != ep.addr {
        return Err(DropReason::SpoofedIp);
    }
    let route = tables
        .route(&RoutePrefix {
            vni_be: ep.vni.to_be_bytes(),
            addr: ip.dst,
        })
        .ok_or(DropReason::NoRoute)?;
    if route.kind != RouteKind::Local as u32 {
        return Err(DropReason::NoRoute);
    }
    let n = tables
        .neighbor(&NeighborKey {
            vni: ep.vni,
            addr: ip.dst,
        })
        .ok_or(DropReason::NoNeighbor)?;
    if n.kind == NeighborKind::Local as u32 {
        return Ok(PortAction {
            forward: Forward::Local,
            ifindex: n.ifindex,
            mac: n.mac,
            ..PortAction::NONE
        });
    }
    if n.kind == NeighborKind::LoadBalancer as u32 {
        return Ok(PortAction {
            forward: Forward::Balance,
            ..PortAction::NONE
        });
    }
    if n.kind != NeighborKind::Remote as u32 {
        return Err(DropReason::NoNeighbor);
    }

    let l3 = usize::from(ip.l3_offset);
    let ip_len = (pkt.len() - l3) as u32;
    let mtu = cfg.underlay_mtu;
    let mut fixed_gso = false;
    if gso_size == 0 {
        if ip_len + VXLAN_OVERHEAD > mtu {
            let frag: [u8; 2] = pkt.read(l3 + 6).ok_or(DropReason::Truncated)?;
            let dont_fragment = frag[0] & 0x40 != 0;
            // The reply quotes the IP header and 8 bytes of L4, which must be there.
            let quotable = pkt.len() >= l3 + QUOTE_LEN && ip.l4_offset as usize == l3 + 20;
            return if dont_fragment && quotable {
                Ok(PortAction {
                    forward: Forward::FragNeeded,
                    mtu: (mtu - VXLAN_OVERHEAD) as u16,
                    ..PortAction::NONE
                })
            } else {
                Err(DropReason::MtuExceeded)
            };
        }
    } else {
        // Each segment carries the IP and L4 headers plus `gso_size` bytes of payload.
        let l4 = usize::from(ip.l4_offset);
        let l4_header = match ip.proto {
            IPPROTO_TCP => {
                // Two bytes (data offset and flags): the kernel verifier cannot bound a
                // one-byte read at a variable packet offset.
                let off: [u8; 2] = pkt.read(l4 + 12).ok_or(DropReason::Truncated)?;
                u32::from(off[0] >> 4) * 4
            }
            IPPROTO_UDP => 8,
            _ => 0,
        };
        let segment = (l4 - l3) as u32 + l4_header + gso_size;
        fixed_gso = segment + VXLAN_OVERHEAD <= mtu;
    }
    Ok(PortAction {
        forward: Forward::Remote,
        vtep: n.vtep,
        mac: n.mac,
        ip_len,
        fixed_gso,
        ..PortAction::NONE
    })
}
