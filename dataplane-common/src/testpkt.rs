//! Well-formed test frames (correct lengths and checksums), built with `pnet_packet`.
//!
//! Used by the host unit tests here, by the BPF_PROG_TEST_RUN tests and benchmarks in
//! `vpc-tests`, and by the end-to-end tests that inject frames. Tests that need a malformed
//! frame start from one of these and break it on purpose.

use std::{net::Ipv4Addr, net::Ipv6Addr, vec, vec::Vec};

use pnet_packet::{
    MutablePacket,
    ethernet::{EtherType, EtherTypes, MutableEthernetPacket},
    icmp::{IcmpTypes, MutableIcmpPacket, echo_request::MutableEchoRequestPacket},
    icmpv6::{Icmpv6Types, MutableIcmpv6Packet},
    ip::{IpNextHeaderProtocol, IpNextHeaderProtocols},
    ipv4::{self, MutableIpv4Packet},
    ipv6::MutableIpv6Packet,
    tcp::{self, MutableTcpPacket, TcpFlags},
    udp::{self, MutableUdpPacket},
};

/// Source MAC of built frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of built frames.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;

fn ethernet(ether_type: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; ETH_LEN + payload.len()];
    let mut eth = MutableEthernetPacket::new(&mut buf).expect("buffer fits an Ethernet header");
    eth.set_destination(DST_MAC.into());
    eth.set_source(SRC_MAC.into());
    eth.set_ethertype(ether_type);
    eth.payload_mut().copy_from_slice(payload);
    buf
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNextHeaderProtocol, l4: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; IPV4_LEN + l4.len()];
    let mut ip = MutableIpv4Packet::new(&mut buf).expect("buffer fits an IPv4 header");
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length((IPV4_LEN + l4.len()) as u16);
    ip.set_ttl(64);
    ip.set_flags(ipv4::Ipv4Flags::DontFragment);
    ip.set_next_level_protocol(proto);
    ip.set_source(src);
    ip.set_destination(dst);
    ip.payload_mut().copy_from_slice(l4);
    let checksum = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(checksum);
    ethernet(EtherTypes::Ipv4, &buf)
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: IpNextHeaderProtocol, l4: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; IPV6_LEN + l4.len()];
    let mut ip = MutableIpv6Packet::new(&mut buf).expect("buffer fits an IPv6 header");
    ip.set_version(6);
    ip.set_payload_length(l4.len() as u16);
    ip.set_next_header(proto);
    ip.set_hop_limit(64);
    ip.set_source(src);
    ip.set_destination(dst);
    ip.payload_mut().copy_from_slice(l4);
    ethernet(EtherTypes::Ipv6, &buf)
}

/// Addresses of an IP frame: both IPv4 or both IPv6.
#[derive(Clone, Copy, Debug)]
pub enum Addrs {
    /// IPv4 source and destination.
    V4(Ipv4Addr, Ipv4Addr),
    /// IPv6 source and destination.
    V6(Ipv6Addr, Ipv6Addr),
}

fn udp_segment(addrs: Addrs, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + payload.len()];
    let mut udp = MutableUdpPacket::new(&mut buf).expect("buffer fits a UDP header");
    udp.set_source(sport);
    udp.set_destination(dport);
    udp.set_length((8 + payload.len()) as u16);
    udp.payload_mut().copy_from_slice(payload);
    let checksum = match addrs {
        Addrs::V4(s, d) => udp::ipv4_checksum(&udp.to_immutable(), &s, &d),
        Addrs::V6(s, d) => udp::ipv6_checksum(&udp.to_immutable(), &s, &d),
    };
    udp.set_checksum(checksum);
    buf
}

fn tcp_segment(addrs: Addrs, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + payload.len()];
    let mut tcp = MutableTcpPacket::new(&mut buf).expect("buffer fits a TCP header");
    tcp.set_source(sport);
    tcp.set_destination(dport);
    tcp.set_sequence(1);
    tcp.set_data_offset(5);
    tcp.set_flags(flags);
    tcp.set_window(65535);
    tcp.payload_mut().copy_from_slice(payload);
    let checksum = match addrs {
        Addrs::V4(s, d) => tcp::ipv4_checksum(&tcp.to_immutable(), &s, &d),
        Addrs::V6(s, d) => tcp::ipv6_checksum(&tcp.to_immutable(), &s, &d),
    };
    tcp.set_checksum(checksum);
    buf
}

fn wrap(addrs: Addrs, proto: IpNextHeaderProtocol, l4: &[u8]) -> Vec<u8> {
    match addrs {
        Addrs::V4(s, d) => ipv4(s, d, proto, l4),
        Addrs::V6(s, d) => ipv6(s, d, proto, l4),
    }
}

/// An Ethernet/IP/UDP frame.
pub fn udp(addrs: Addrs, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let l4 = udp_segment(addrs, sport, dport, payload);
    wrap(addrs, IpNextHeaderProtocols::Udp, &l4)
}

/// An Ethernet/IP/TCP frame with `flags` (`conntrack::tcp_flags`) and `payload`.
pub fn tcp(addrs: Addrs, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let l4 = tcp_segment(addrs, sport, dport, flags, payload);
    wrap(addrs, IpNextHeaderProtocols::Tcp, &l4)
}

/// An Ethernet/IP/TCP frame with a SYN.
pub fn tcp_syn(addrs: Addrs, sport: u16, dport: u16) -> Vec<u8> {
    let l4 = tcp_segment(addrs, sport, dport, TcpFlags::SYN, &[]);
    wrap(addrs, IpNextHeaderProtocols::Tcp, &l4)
}

/// An Ethernet/IPv4/ICMP echo request.
pub fn icmp4_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + 16];
    {
        let mut echo = MutableEchoRequestPacket::new(&mut buf).expect("buffer fits an echo");
        echo.set_icmp_type(IcmpTypes::EchoRequest);
        echo.set_identifier(id);
        echo.set_sequence_number(seq);
    }
    let mut icmp = MutableIcmpPacket::new(&mut buf).expect("buffer fits an ICMP header");
    let checksum = pnet_packet::icmp::checksum(&icmp.to_immutable());
    icmp.set_checksum(checksum);
    ipv4(src, dst, IpNextHeaderProtocols::Icmp, &buf)
}

/// An Ethernet/IPv6/ICMPv6 echo request.
pub fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut buf = vec![0u8; 8 + 16];
    buf[4..6].copy_from_slice(&id.to_be_bytes());
    buf[6..8].copy_from_slice(&seq.to_be_bytes());
    let mut icmp = MutableIcmpv6Packet::new(&mut buf).expect("buffer fits an ICMPv6 header");
    icmp.set_icmpv6_type(Icmpv6Types::EchoRequest);
    let checksum = pnet_packet::icmpv6::checksum(&icmp.to_immutable(), &src, &dst);
    icmp.set_checksum(checksum);
    ipv6(src, dst, IpNextHeaderProtocols::Icmpv6, &buf)
}

/// An ARP request (who-has `target` tell `sender`) from [`SRC_MAC`] to [`DST_MAC`].
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0u8; 28];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    arp[8..14].copy_from_slice(&SRC_MAC);
    arp[14..18].copy_from_slice(&sender.octets());
    arp[24..28].copy_from_slice(&target.octets());
    ethernet(EtherTypes::Arp, &arp)
}

/// A broadcast ARP request from `mac` (Ethernet source and ARP sender hardware address),
/// as an instance sends it.
pub fn arp_request_from(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = with_macs(&arp_request(sender, target), [0xff; 6], mac);
    frame[ETH_LEN + 8..ETH_LEN + 14].copy_from_slice(&mac);
    frame
}

/// Inserts an 802.1Q tag with `vid` after the MAC addresses of `frame`.
pub fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&0x8100u16.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// Inserts an IPv6 extension header (hop-by-hop/routing/dest-opts style, 8 bytes) of type
/// `kind` right after the IPv6 header of `frame`, fixing next-header and payload length.
pub fn with_ipv6_ext(frame: &[u8], kind: u8) -> Vec<u8> {
    let l3 = ETH_LEN;
    let mut out = Vec::with_capacity(frame.len() + 8);
    out.extend_from_slice(&frame[..l3 + IPV6_LEN]);
    let inner_next = out[l3 + 6];
    out[l3 + 6] = kind;
    let payload_len = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + 8;
    out[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&[inner_next, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&frame[l3 + IPV6_LEN..]);
    out
}

/// Shorthand for IPv4 addresses.
pub fn v4(src: [u8; 4], dst: [u8; 4]) -> Addrs {
    Addrs::V4(Ipv4Addr::from(src), Ipv4Addr::from(dst))
}

/// Shorthand for IPv6 addresses from strings.
pub fn v6(src: &str, dst: &str) -> Addrs {
    Addrs::V6(
        src.parse().expect("valid IPv6 source"),
        dst.parse().expect("valid IPv6 destination"),
    )
}

/// `frame` with its Ethernet destination and source replaced.
pub fn with_macs(frame: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

/// `inner` (a whole Ethernet frame) in VXLAN with `vni`, from VTEP `src` to VTEP `dst`, UDP
/// source port `sport`: built independently of the datapath's encapsulation code.
pub fn vxlan(src: [u8; 4], dst: [u8; 4], sport: u16, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    udp(v4(src, dst), sport, 4789, &payload)
}
