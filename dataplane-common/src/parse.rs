//! Header parsing: Ethernet (up to two VLAN tags), IPv4, IPv6 (with extension headers), and
//! the TCP/UDP/ICMP header fields policy needs.
//!
//! The parser validates as it goes; a frame that ends inside a header or whose headers
//! contradict each other yields a [`DropReason`] and is never half-parsed. Non-IP frames
//! (ARP, LLDP, ...) are reported as such and left to the kernel.

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{DropReason, filter::ipv4_mapped, packet::PacketView};

/// Length of an untagged Ethernet header.
pub const ETH_HLEN: usize = EthHdr::LEN;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Length of an 802.1Q/802.1ad tag.
pub const VLAN_HDR_LEN: usize = 4;
/// VLAN tags walked before giving up (802.1ad + 802.1Q covers QinQ).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before the packet is dropped: enough for hop-by-hop,
/// destination options, routing and fragment together. The bound keeps the eBPF loop small.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;
/// Bytes of an ICMP/ICMPv6 header the parser needs (type, code, checksum, id/sequence).
pub const ICMP_HDR_LEN: usize = 8;

/// IPv6 extension-header numbers the parser walks.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// Address family of an IP packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4 = 4,
    /// IPv6.
    V6 = 6,
}

/// What the parser learned about an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpPacket {
    /// IPv4 or IPv6.
    pub family: Family,
    /// Source address (IPv4 as IPv4-mapped IPv6).
    pub src: [u8; 16],
    /// Destination address (IPv4 as IPv4-mapped IPv6).
    pub dst: [u8; 16],
    /// L4 protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the IP header from the start of the frame.
    pub l3_offset: u16,
    /// Offset of the L4 header (valid when `has_l4`).
    pub l4_offset: u16,
    /// Whether an L4 header was parsed. False for non-first fragments and for protocols the
    /// parser does not look into.
    pub has_l4: bool,
    /// TCP/UDP source port; for ICMP echo, the identifier; else 0.
    pub src_port: u16,
    /// TCP/UDP destination port; for ICMP, `type << 8 | code`; else 0.
    pub dst_port: u16,
}

/// Result of parsing a frame that is not malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP (ARP, LLDP, ...): the datapath leaves it to the kernel.
    NonIp {
        /// The innermost EtherType.
        ether_type: u16,
    },
    /// An IPv4 or IPv6 packet.
    Ip(IpPacket),
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses the headers of an Ethernet frame.
#[inline(always)]
pub fn parse<P: PacketView>(pkt: &P) -> Result<Parsed, DropReason> {
    let eth: EthHdr = pkt.read(0).ok_or(DropReason::Truncated)?;
    // `EthHdr::ether_type` is the raw field in network byte order.
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let tag: [u8; VLAN_HDR_LEN] = pkt.read(offset).ok_or(DropReason::Truncated)?;
        ether_type = be16([tag[2], tag[3]]);
        offset += VLAN_HDR_LEN;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(pkt, offset).map(Parsed::Ip),
        ETH_P_IPV6 => parse_ipv6(pkt, offset).map(Parsed::Ip),
        _ => Ok(Parsed::NonIp { ether_type }),
    }
}

/// Parses the IPv4 packet at offset `l3` (after an Ethernet header known to announce
/// IPv4, with no VLAN tags: what instance ports carry).
#[inline(always)]
pub fn parse_ipv4<P: PacketView>(pkt: &P, l3: usize) -> Result<IpPacket, DropReason> {
    let ip: Ipv4Hdr = pkt.read(l3).ok_or(DropReason::Truncated)?;
    if ip.vihl >> 4 != 4 {
        return Err(DropReason::MalformedIpv4);
    }
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    let total_len = usize::from(be16(ip.tot_len));
    if header_len < Ipv4Hdr::LEN || total_len < header_len {
        return Err(DropReason::MalformedIpv4);
    }
    if l3 + total_len > pkt.len() {
        return Err(DropReason::Truncated);
    }
    let fragment_offset = be16(ip.frags) & 0x1fff;
    let mut out = IpPacket {
        family: Family::V4,
        src: ipv4_mapped(ip.src_addr),
        dst: ipv4_mapped(ip.dst_addr),
        proto: ip.proto,
        l3_offset: l3 as u16,
        l4_offset: (l3 + header_len) as u16,
        has_l4: false,
        src_port: 0,
        dst_port: 0,
    };
    if fragment_offset == 0 {
        parse_l4(pkt, &mut out, l3 + total_len)?;
    }
    Ok(out)
}

#[inline(always)]
fn parse_ipv6<P: PacketView>(pkt: &P, l3: usize) -> Result<IpPacket, DropReason> {
    let ip: Ipv6Hdr = pkt.read(l3).ok_or(DropReason::Truncated)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(DropReason::MalformedIpv6);
    }
    let end = l3 + Ipv6Hdr::LEN + usize::from(be16(ip.payload_len));
    if end > pkt.len() {
        return Err(DropReason::Truncated);
    }
    let mut next = ip.next_hdr;
    let mut offset = l3 + Ipv6Hdr::LEN;
    let mut first_fragment = true;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let h: [u8; 2] = pkt.read(offset).ok_or(DropReason::Ipv6ExtensionChain)?;
                next = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            IPV6_FRAGMENT => {
                let h: [u8; 4] = pkt.read(offset).ok_or(DropReason::Ipv6ExtensionChain)?;
                next = h[0];
                if be16([h[2], h[3]]) >> 3 != 0 {
                    first_fragment = false;
                }
                8
            }
            IPV6_AH => {
                let h: [u8; 2] = pkt.read(offset).ok_or(DropReason::Ipv6ExtensionChain)?;
                next = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            _ => {
                done = true;
                break;
            }
        };
        offset += len;
        if offset > end {
            return Err(DropReason::Ipv6ExtensionChain);
        }
    }
    if !done {
        return Err(DropReason::Ipv6ExtensionChain);
    }
    let mut out = IpPacket {
        family: Family::V6,
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: next,
        l3_offset: l3 as u16,
        l4_offset: offset as u16,
        has_l4: false,
        src_port: 0,
        dst_port: 0,
    };
    if first_fragment {
        parse_l4(pkt, &mut out, end)?;
    }
    Ok(out)
}

/// Reads ports (or ICMP type/code/id) from the L4 header at `out.l4_offset`, which must end
/// at or before `ip_end` (the end of the IP payload).
#[inline(always)]
fn parse_l4<P: PacketView>(pkt: &P, out: &mut IpPacket, ip_end: usize) -> Result<(), DropReason> {
    let l4 = usize::from(out.l4_offset);
    match out.proto {
        IPPROTO_TCP => {
            if l4 + TcpHdr::LEN > ip_end {
                return Err(DropReason::MalformedL4);
            }
            let tcp: TcpHdr = pkt.read(l4).ok_or(DropReason::Truncated)?;
            let data_offset = usize::from(tcp.doff()) * 4;
            if data_offset < TcpHdr::LEN || l4 + data_offset > ip_end {
                return Err(DropReason::MalformedL4);
            }
            out.src_port = be16(tcp.source);
            out.dst_port = be16(tcp.dest);
        }
        IPPROTO_UDP => {
            if l4 + UdpHdr::LEN > ip_end {
                return Err(DropReason::MalformedL4);
            }
            let udp: UdpHdr = pkt.read(l4).ok_or(DropReason::Truncated)?;
            if usize::from(be16(udp.len)) < UdpHdr::LEN {
                return Err(DropReason::MalformedL4);
            }
            out.src_port = be16(udp.src);
            out.dst_port = be16(udp.dst);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if l4 + ICMP_HDR_LEN > ip_end {
                return Err(DropReason::MalformedL4);
            }
            let icmp: [u8; ICMP_HDR_LEN] = pkt.read(l4).ok_or(DropReason::Truncated)?;
            out.dst_port = be16([icmp[0], icmp[1]]);
            out.src_port = be16([icmp[4], icmp[5]]);
        }
        _ => return Ok(()),
    }
    out.has_l4 = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{vec, vec::Vec};

    use super::*;
    use crate::{packet::SlicePacket, testpkt::*};

    fn parse_bytes(frame: &[u8]) -> Result<Parsed, DropReason> {
        parse(&SlicePacket(frame))
    }

    fn ip(frame: &[u8]) -> IpPacket {
        match parse_bytes(frame) {
            Ok(Parsed::Ip(ip)) => ip,
            other => panic!("expected an IP packet, got {other:?}"),
        }
    }

    const A: [u8; 4] = [198, 18, 0, 1];
    const B: [u8; 4] = [198, 18, 0, 2];

    #[test]
    fn well_formed_frames_parse() {
        // (name, frame, family, protocol, source port, destination port)
        type Case = (&'static str, Vec<u8>, Family, u8, u16, u16);
        let cases: Vec<Case> = vec![
            (
                "udp4",
                udp(v4(A, B), 1000, 53, b"hi"),
                Family::V4,
                17,
                1000,
                53,
            ),
            (
                "tcp4",
                tcp_syn(v4(A, B), 40000, 80),
                Family::V4,
                6,
                40000,
                80,
            ),
            (
                "icmp4",
                icmp4_echo(A.into(), B.into(), 7, 1),
                Family::V4,
                1,
                7,
                0x0800,
            ),
            (
                "udp6",
                udp(v6("fd00::1", "fd00::2"), 5, 6, b""),
                Family::V6,
                17,
                5,
                6,
            ),
            (
                "tcp6",
                tcp_syn(v6("fd00::1", "fd00::2"), 7, 443),
                Family::V6,
                6,
                7,
                443,
            ),
            (
                "icmp6",
                icmp6_echo("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), 9, 1),
                Family::V6,
                58,
                9,
                0x8000,
            ),
            (
                "vlan udp4",
                vlan_tagged(&udp(v4(A, B), 1, 2, b"x"), 10),
                Family::V4,
                17,
                1,
                2,
            ),
            (
                "ipv6 hop-by-hop + tcp",
                with_ipv6_ext(&tcp_syn(v6("fd00::1", "fd00::2"), 7, 22), 0),
                Family::V6,
                6,
                7,
                22,
            ),
        ];
        for (name, frame, family, proto, sport, dport) in cases {
            let p = ip(&frame);
            assert_eq!(p.family, family, "{name}");
            assert_eq!(p.proto, proto, "{name}");
            assert!(p.has_l4, "{name}");
            assert_eq!((p.src_port, p.dst_port), (sport, dport), "{name}");
        }
        let p = ip(&udp(v4(A, B), 1, 2, b""));
        assert_eq!(p.src, ipv4_mapped(A));
        assert_eq!(p.dst, ipv4_mapped(B));
        assert_eq!((p.l3_offset, p.l4_offset), (14, 34));
    }

    #[test]
    fn non_ip_is_reported_not_dropped() {
        let arp = arp_request(A.into(), B.into());
        assert_eq!(
            parse_bytes(&arp),
            Ok(Parsed::NonIp {
                ether_type: ETH_P_ARP
            })
        );
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_dropped_never_misparsed() {
        let frames = [
            udp(v4(A, B), 1, 2, b"payload"),
            tcp_syn(v4(A, B), 1, 2),
            icmp4_echo(A.into(), B.into(), 1, 1),
            tcp_syn(v6("fd00::1", "fd00::2"), 1, 2),
            with_ipv6_ext(&udp(v6("fd00::1", "fd00::2"), 1, 2, b""), 60),
            vlan_tagged(&udp(v4(A, B), 1, 2, b""), 3),
        ];
        for frame in &frames {
            for len in 0..frame.len() {
                let got = parse_bytes(&frame[..len]);
                assert!(
                    matches!(got, Err(DropReason::Truncated)),
                    "len {len} of {}: {got:?}",
                    frame.len()
                );
            }
            assert!(matches!(parse_bytes(frame), Ok(Parsed::Ip(_))));
        }
    }

    #[test]
    fn ethernet_padding_after_the_ip_packet_is_fine() {
        let mut frame = udp(v4(A, B), 1, 2, b"");
        frame.resize(60, 0);
        assert_eq!(ip(&frame).dst_port, 2);
    }

    #[test]
    fn malformed_headers_are_dropped_with_their_reason() {
        let base4 = udp(v4(A, B), 1, 2, b"abcd");
        let base6 = tcp_syn(v6("fd00::1", "fd00::2"), 1, 2);
        let set = |f: &[u8], i: usize, v: u8| {
            let mut f = f.to_vec();
            f[i] = v;
            f
        };
        let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
            (
                "ipv4 version 6",
                set(&base4, 14, 0x65),
                DropReason::MalformedIpv4,
            ),
            (
                "ipv4 ihl 4",
                set(&base4, 14, 0x44),
                DropReason::MalformedIpv4,
            ),
            (
                "ipv4 ihl 15 > total",
                set(&base4, 14, 0x4f),
                DropReason::MalformedIpv4,
            ),
            (
                "ipv4 total < ihl",
                set(&base4, 17, 10),
                DropReason::MalformedIpv4,
            ),
            (
                "ipv4 total > frame",
                set(&base4, 17, 200),
                DropReason::Truncated,
            ),
            (
                "udp length 7",
                set(&base4, 14 + 20 + 5, 7),
                DropReason::MalformedL4,
            ),
            (
                "ipv6 version 4",
                set(&base6, 14, 0x40),
                DropReason::MalformedIpv6,
            ),
            (
                "tcp doff 4",
                set(&base6, 14 + 40 + 12, 0x40),
                DropReason::MalformedL4,
            ),
            (
                "tcp doff 15",
                set(&base6, 14 + 40 + 12, 0xf0),
                DropReason::MalformedL4,
            ),
            (
                "ipv6 payload > frame",
                set(&base6, 14 + 5, 250),
                DropReason::Truncated,
            ),
        ];
        for (name, frame, reason) in cases {
            assert_eq!(parse_bytes(&frame), Err(reason), "{name}");
        }
    }

    #[test]
    fn ipv4_total_length_shorter_than_l4_header_is_malformed() {
        // Total length covers the IP header and 4 bytes: the UDP header cannot fit.
        let mut frame = udp(v4(A, B), 1, 2, b"");
        frame[16..18].copy_from_slice(&24u16.to_be_bytes());
        assert_eq!(parse_bytes(&frame), Err(DropReason::MalformedL4));
    }

    #[test]
    fn non_first_fragments_have_no_l4() {
        let mut frame = udp(v4(A, B), 1, 2, b"abcdefgh");
        frame[20..22].copy_from_slice(&0x0001u16.to_be_bytes()); // offset 8 bytes
        let p = ip(&frame);
        assert!(!p.has_l4);
        assert_eq!((p.proto, p.dst_port), (17, 0));
    }

    #[test]
    fn ipv6_extension_chains_are_bounded() {
        let mut frame = udp(v6("fd00::1", "fd00::2"), 1, 2, b"");
        for _ in 0..MAX_IPV6_EXT_HEADERS {
            frame = with_ipv6_ext(&frame, 60);
        }
        assert_eq!(parse_bytes(&frame), Err(DropReason::Ipv6ExtensionChain));
        // One fewer still parses down to UDP.
        let mut frame = udp(v6("fd00::1", "fd00::2"), 1, 2, b"");
        for _ in 0..MAX_IPV6_EXT_HEADERS - 1 {
            frame = with_ipv6_ext(&frame, 0);
        }
        assert_eq!(ip(&frame).dst_port, 2);
    }

    #[test]
    fn ipv6_extension_header_longer_than_payload_is_dropped() {
        let mut frame = with_ipv6_ext(&udp(v6("fd00::1", "fd00::2"), 1, 2, b""), 60);
        frame[14 + 40 + 1] = 200; // ext header length far past the payload
        assert_eq!(parse_bytes(&frame), Err(DropReason::Ipv6ExtensionChain));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random sweep: any outcome is fine except a panic, and IP
        // results must point inside the frame.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 128) as usize;
            let mut frame = vec![0u8; len];
            for (i, b) in frame.iter_mut().enumerate() {
                *b = (state >> ((i % 8) * 8)) as u8 ^ i as u8;
            }
            if len > 13 && state & 1 == 0 {
                frame[12] = 0x08;
                frame[13] = 0x00;
                if len > 14 {
                    frame[14] = 0x45;
                }
            }
            if let Ok(Parsed::Ip(p)) = parse_bytes(&frame) {
                assert!(usize::from(p.l4_offset) <= frame.len());
            }
        }
    }
}
