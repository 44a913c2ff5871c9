//! ARP for IPv4 over Ethernet: the request the datapath answers and the reply it builds.
//!
//! The VPC router answers every ARP request for an address that exists in the VPC (an
//! instance or a subnet gateway) with its own MAC, as AWS does: nothing is ever flooded and
//! instances never learn each other's MACs.

use crate::parse::ETH_P_ARP;

/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;
/// ARP hardware type: Ethernet.
pub const ARP_HTYPE_ETHERNET: u16 = 1;

/// An ARP packet for IPv4 over Ethernet (RFC 826), as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpIpv4 {
    /// Hardware type (1: Ethernet), big endian.
    pub htype: [u8; 2],
    /// Protocol type (0x0800: IPv4), big endian.
    pub ptype: [u8; 2],
    /// Hardware address length (6).
    pub hlen: u8,
    /// Protocol address length (4).
    pub plen: u8,
    /// Operation (1: request, 2: reply), big endian.
    pub oper: [u8; 2],
    /// Sender MAC.
    pub sha: [u8; 6],
    /// Sender IPv4.
    pub spa: [u8; 4],
    /// Target MAC.
    pub tha: [u8; 6],
    /// Target IPv4.
    pub tpa: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<ArpIpv4>() == 28);

impl ArpIpv4 {
    /// Whether this is IPv4-over-Ethernet ARP at all.
    pub fn is_ipv4_over_ethernet(&self) -> bool {
        u16::from_be_bytes(self.htype) == ARP_HTYPE_ETHERNET
            && u16::from_be_bytes(self.ptype) == crate::parse::ETH_P_IP
            && self.hlen == 6
            && self.plen == 4
    }

    /// The operation.
    pub fn oper(&self) -> u16 {
        u16::from_be_bytes(self.oper)
    }
}

/// A whole ARP frame (Ethernet header + ARP), 42 bytes: what the datapath writes back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpFrame {
    /// Ethernet destination.
    pub eth_dst: [u8; 6],
    /// Ethernet source.
    pub eth_src: [u8; 6],
    /// EtherType (0x0806), big endian.
    pub ether_type: [u8; 2],
    /// The ARP packet.
    pub arp: ArpIpv4,
}

const _: () = assert!(core::mem::size_of::<ArpFrame>() == 42);

/// The reply to `request` saying `request.tpa` is at `mac`, sent back to the requester.
pub fn reply(request: &ArpIpv4, mac: [u8; 6]) -> ArpFrame {
    ArpFrame {
        eth_dst: request.sha,
        eth_src: mac,
        ether_type: ETH_P_ARP.to_be_bytes(),
        arp: ArpIpv4 {
            htype: request.htype,
            ptype: request.ptype,
            hlen: 6,
            plen: 4,
            oper: ARP_REPLY.to_be_bytes(),
            sha: mac,
            spa: request.tpa,
            tha: request.sha,
            tpa: request.spa,
        },
    }
}
