//! VXLAN (RFC 7348) encapsulation headers, built in one piece.
//!
//! The datapath grows the frame by [`VXLAN_OVERHEAD`] bytes after the original Ethernet
//! header and writes [`EncapHeaders`] (64 bytes) over the front: outer Ethernet, outer IPv4,
//! UDP, VXLAN and the rewritten inner Ethernet header. Building it is pure so it is tested
//! here, byte for byte, against what a standard decoder expects.

use crate::{
    checksum,
    overlay::{VXLAN_OVERHEAD, VXLAN_PORT},
    parse::{ETH_P_IP, IPPROTO_UDP},
};

/// VXLAN flags byte with the I flag (a valid VNI follows).
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// Offset of the VXLAN header in an encapsulated frame without IP options.
pub const VXLAN_OFFSET: usize = 14 + 20 + 8;
/// Offset of the inner Ethernet header.
pub const INNER_ETH_OFFSET: usize = VXLAN_OFFSET + 8;
/// Offset of the inner IP header.
pub const INNER_IP_OFFSET: usize = INNER_ETH_OFFSET + 14;
/// TTL of outer headers (Linux's default for tunnels without inheritance).
pub const OUTER_TTL: u8 = 64;
/// First UDP source port used for flow entropy (RFC 7348 recommends 49152-65535).
pub const SOURCE_PORT_BASE: u16 = 49152;

const _: () = assert!(INNER_ETH_OFFSET as u32 == VXLAN_OVERHEAD);

/// Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet header, as written on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeaders {
    /// Outer Ethernet: destination, source, EtherType.
    pub eth: [u8; 14],
    /// Outer IPv4 header (no options).
    pub ip: [u8; 20],
    /// UDP header.
    pub udp: [u8; 8],
    /// VXLAN header.
    pub vxlan: [u8; 8],
    /// Inner Ethernet: destination, source, EtherType.
    pub inner_eth: [u8; 14],
}

const _: () = assert!(core::mem::size_of::<EncapHeaders>() == 64);

/// What varies between encapsulated packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapParams {
    /// Outer destination MAC (the underlay next hop).
    pub outer_dst_mac: [u8; 6],
    /// Outer source MAC (the underlay interface).
    pub outer_src_mac: [u8; 6],
    /// Outer source: this host's VTEP.
    pub src_vtep: [u8; 4],
    /// Outer destination: the peer host's VTEP.
    pub dst_vtep: [u8; 4],
    /// UDP source port (flow entropy, see [`source_port`]).
    pub src_port: u16,
    /// The VPC's VNI.
    pub vni: u32,
    /// Inner Ethernet destination (the remote instance).
    pub inner_dst_mac: [u8; 6],
    /// Inner Ethernet source (the VPC router).
    pub inner_src_mac: [u8; 6],
    /// Length of the inner IPv4 packet (for GSO packets, as much as fits: the segmentation
    /// code rewrites the lengths per segment).
    pub inner_ip_len: u32,
}

/// UDP source port for a flow hash: stable per flow (so the underlay's ECMP keeps a flow on
/// one path) and in the range RFC 7348 recommends.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    SOURCE_PORT_BASE | ((hash ^ (hash >> 16)) as u16 & 0x3fff)
}

/// The 64 header bytes of a VXLAN-encapsulated IPv4 frame.
#[inline(always)]
pub fn encap_headers(p: &EncapParams) -> EncapHeaders {
    // Outer IP length: IP (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) + inner IP
    // packet, which is the overhead plus the inner packet; capped at the field's range (GSO
    // packets are longer; segmentation writes real lengths).
    let total = VXLAN_OVERHEAD + p.inner_ip_len;
    let ip_len = if total > 0xffff { 0xffff } else { total as u16 };
    let udp_len = ip_len - 20;

    let mut eth = [0u8; 14];
    eth[0..6].copy_from_slice(&p.outer_dst_mac);
    eth[6..12].copy_from_slice(&p.outer_src_mac);
    eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let l = ip_len.to_be_bytes();
    let s = p.src_vtep;
    let d = p.dst_vtep;
    // Version 4, IHL 5, DSCP 0; id 0 and DF (the datapath never fragments; oversized inner
    // packets are refused before encapsulation instead).
    let mut ip = [
        0x45,
        0,
        l[0],
        l[1],
        0,
        0,
        0x40,
        0,
        OUTER_TTL,
        IPPROTO_UDP,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    let c = checksum::checksum(&ip);
    ip[10] = c[0];
    ip[11] = c[1];

    let sp = p.src_port.to_be_bytes();
    let dp = VXLAN_PORT.to_be_bytes();
    let ul = udp_len.to_be_bytes();
    // UDP checksum 0: allowed for IPv4 (RFC 7348 section 5); the inner packet keeps its own.
    let udp = [sp[0], sp[1], dp[0], dp[1], ul[0], ul[1], 0, 0];

    let v = p.vni.to_be_bytes();
    let vxlan = [VXLAN_FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0];

    let mut inner_eth = [0u8; 14];
    inner_eth[0..6].copy_from_slice(&p.inner_dst_mac);
    inner_eth[6..12].copy_from_slice(&p.inner_src_mac);
    inner_eth[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    EncapHeaders {
        eth,
        ip,
        udp,
        vxlan,
        inner_eth,
    }
}

/// The VNI in a VXLAN header, if its I flag is set.
#[inline(always)]
pub fn vni(header: &[u8; 8]) -> Option<u32> {
    if header[0] & VXLAN_FLAG_VNI == 0 {
        return None;
    }
    Some(u32::from_be_bytes([0, header[4], header[5], header[6]]))
}

#[cfg(test)]
mod tests {
    use pnet_packet::{
        Packet,
        ethernet::{EtherTypes, EthernetPacket},
        ip::IpNextHeaderProtocols,
        ipv4::{self, Ipv4Packet},
        udp::UdpPacket,
    };

    use super::*;

    #[test]
    fn headers_decode_as_standard_vxlan() {
        let p = EncapParams {
            outer_dst_mac: [2, 0, 0, 0, 0, 2],
            outer_src_mac: [2, 0, 0, 0, 0, 1],
            src_vtep: [192, 168, 77, 1],
            dst_vtep: [192, 168, 77, 2],
            src_port: source_port(0xdead_beef),
            vni: 0x00ab_cdef,
            inner_dst_mac: [2, 0, 0, 1, 1, 1],
            inner_src_mac: [2, 0xfe, 0, 0, 0, 1],
            inner_ip_len: 84,
        };
        let h = encap_headers(&p);
        // SAFETY: `EncapHeaders` is `#[repr(C)]` of byte arrays, 64 bytes, no padding.
        let bytes: [u8; 64] = unsafe { core::mem::transmute(h) };
        let eth = EthernetPacket::new(&bytes).unwrap();
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv4);
        assert_eq!(eth.get_destination().octets(), p.outer_dst_mac);
        let ip = Ipv4Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_next_level_protocol(), IpNextHeaderProtocols::Udp);
        assert_eq!(ip.get_total_length(), 20 + 8 + 8 + 14 + 84);
        assert_eq!(ip.get_checksum(), ipv4::checksum(&ip));
        assert_eq!(ip.get_source().octets(), p.src_vtep);
        assert_eq!(ip.get_destination().octets(), p.dst_vtep);
        assert_eq!(ip.get_flags(), 0x2, "DF");
        let udp = UdpPacket::new(&bytes[34..]).unwrap();
        assert_eq!(udp.get_destination(), VXLAN_PORT);
        assert!(udp.get_source() >= SOURCE_PORT_BASE);
        assert_eq!(udp.get_length(), 8 + 8 + 14 + 84);
        assert_eq!(udp.get_checksum(), 0);
        let vx: [u8; 8] = bytes[42..50].try_into().unwrap();
        assert_eq!(vni(&vx), Some(0x00ab_cdef));
        let inner = EthernetPacket::new(&bytes[50..]).unwrap();
        assert_eq!(inner.get_destination().octets(), p.inner_dst_mac);
        assert_eq!(inner.get_source().octets(), p.inner_src_mac);
        assert_eq!(inner.get_ethertype(), EtherTypes::Ipv4);
    }

    #[test]
    fn gso_lengths_saturate_and_vni_needs_the_i_flag() {
        let p = EncapParams {
            outer_dst_mac: [0; 6],
            outer_src_mac: [0; 6],
            src_vtep: [1, 1, 1, 1],
            dst_vtep: [2, 2, 2, 2],
            src_port: 50000,
            vni: 7,
            inner_dst_mac: [0; 6],
            inner_src_mac: [0; 6],
            inner_ip_len: 200_000,
        };
        let h = encap_headers(&p);
        assert_eq!(u16::from_be_bytes([h.ip[2], h.ip[3]]), 0xffff);
        assert_eq!(vni(&[0, 0, 0, 0, 0, 0, 7, 0]), None);
        assert_eq!(vni(&[8, 0, 0, 0, 0, 0, 7, 0]), Some(7));
        // Entropy stays in the recommended range for any hash.
        for h in [0u32, 1, 0xffff_ffff, 0x8000_0000] {
            assert!(source_port(h) >= SOURCE_PORT_BASE);
        }
    }
}
