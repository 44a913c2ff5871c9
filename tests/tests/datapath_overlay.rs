//! The overlay programs on crafted frames (BPF_PROG_TEST_RUN): the port program's ARP
//! answers, anti-spoofing, local delivery, VXLAN encapsulation and ICMP "fragmentation
//! needed", and the underlay's validation and decapsulation, on the fixture of
//! `vpc_tests::overlay_fixture` (maps programmed the way the agent does it).

use std::net::Ipv4Addr;

use dataplane_common::{
    Action, DropReason, Hook,
    testpkt::{arp_request_from, icmp4_echo, udp, v4, vxlan, with_macs},
};
use pnet_packet::{
    Packet,
    ethernet::{EtherTypes, EthernetPacket},
    icmp::{IcmpPacket, IcmpTypes},
    ipv4::Ipv4Packet,
    udp::UdpPacket,
};
use vpc_tests::{
    overlay_fixture::{
        ME_MAC, NEXT_HOP_MAC, PEER_MAC, REMOTE_MAC, ROUTER, VTEP_ME, VTEP_PEER, fixture,
    },
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
};

fn from_me(frame: Vec<u8>) -> Vec<u8> {
    with_macs(&frame, ROUTER, ME_MAC)
}

fn echo(dst: [u8; 4]) -> Vec<u8> {
    from_me(icmp4_echo(
        Ipv4Addr::new(10, 0, 1, 10),
        Ipv4Addr::from(dst),
        7,
        1,
    ))
}

#[test]
fn port_answers_arp_delivers_locally_and_drops_spoofing() {
    let f = fixture("ovport");
    f.ns.run(|| {
        let run = |frame: &[u8]| f.dp.run_on(Hook::Port, frame, 1, Some(f.me)).unwrap();

        // ARP for the gateway: answered in place, sent back to the instance.
        let req = arp_request_from(
            ME_MAC,
            Ipv4Addr::new(10, 0, 1, 10),
            Ipv4Addr::new(10, 0, 1, 1),
        );
        let r = run(&req);
        assert_eq!(r.retval, TC_ACT_REDIRECT);
        assert_eq!(&r.output[0..6], &ME_MAC);
        assert_eq!(&r.output[6..12], &ROUTER);
        assert_eq!(&r.output[20..22], &[0, 2], "ARP reply");
        assert_eq!(&r.output[22..28], &ROUTER, "sender MAC: the router");
        assert_eq!(&r.output[28..32], &[10, 0, 1, 1], "sender IP: the gateway");

        // Cross-subnet to a local instance: MACs rewritten, packet untouched.
        let frame = echo([10, 0, 2, 20]);
        let r = run(&frame);
        assert_eq!(r.retval, TC_ACT_REDIRECT);
        assert_eq!(&r.output[0..6], &PEER_MAC);
        assert_eq!(&r.output[6..12], &ROUTER);
        assert_eq!(&r.output[12..], &frame[12..]);

        // Spoofed source IP and MAC, an address of the other VPC, IPv6: dropped, counted.
        let spoofed = from_me(icmp4_echo(
            Ipv4Addr::new(10, 0, 1, 99),
            Ipv4Addr::new(10, 0, 2, 20),
            1,
            1,
        ));
        let other_mac = with_macs(&echo([10, 0, 2, 20]), ROUTER, [2, 0, 0, 9, 9, 9]);
        let ipv6 = from_me(udp(
            dataplane_common::testpkt::v6("fd00::1", "fd00::2"),
            1,
            2,
            b"",
        ));
        let before = f.dp.stats().unwrap();
        for frame in [&spoofed, &other_mac, &ipv6, &echo([10, 0, 1, 99])] {
            assert_eq!(run(frame).retval, TC_ACT_SHOT);
        }
        let after = f.dp.stats().unwrap();
        for reason in [
            DropReason::SpoofedIp,
            DropReason::SpoofedMac,
            DropReason::UnsupportedProtocol,
            DropReason::NoNeighbor,
        ] {
            let n =
                after.drop(Hook::Port, reason).packets - before.drop(Hook::Port, reason).packets;
            assert_eq!(n, 1, "{reason:?}");
        }
        assert_eq!(after.action(Hook::Port, Action::Reply).packets, 1);
        assert_eq!(after.action(Hook::Port, Action::Redirect).packets, 1);

        // A port the agent never programmed.
        let r = f.dp.run_on(Hook::Port, &frame, 1, Some(f.peer + 100)).ok();
        assert!(r.is_none() || r.unwrap().retval == TC_ACT_SHOT);
    });
}

#[test]
fn port_encapsulates_standard_vxlan_and_answers_frag_needed() {
    let f = fixture("ovencap");
    f.ns.run(|| {
        let frame = echo([10, 0, 1, 30]);
        let r = f.dp.run_on(Hook::Port, &frame, 1, Some(f.me)).unwrap();
        assert_eq!(
            r.retval,
            TC_ACT_REDIRECT,
            "{:?}",
            f.dp.stats().unwrap().drops
        );
        assert_eq!(r.output.len(), frame.len() + 50);
        let eth = EthernetPacket::new(&r.output).unwrap();
        assert_eq!(eth.get_destination().octets(), NEXT_HOP_MAC);
        assert_eq!(eth.get_source().octets(), f.ul_mac);
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv4);
        let ip = Ipv4Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_source().octets(), VTEP_ME);
        assert_eq!(ip.get_destination().octets(), VTEP_PEER);
        assert_eq!(ip.get_checksum(), pnet_packet::ipv4::checksum(&ip));
        assert_eq!(usize::from(ip.get_total_length()), r.output.len() - 14);
        let outer_udp = UdpPacket::new(ip.payload()).unwrap();
        assert_eq!(outer_udp.get_destination(), 4789);
        let vx = outer_udp.payload();
        assert_eq!(vx[0], 0x08);
        assert_eq!(u32::from_be_bytes([0, vx[4], vx[5], vx[6]]), 100);
        let inner = EthernetPacket::new(&vx[8..]).unwrap();
        assert_eq!(inner.get_destination().octets(), REMOTE_MAC);
        assert_eq!(inner.get_source().octets(), ROUTER);
        assert_eq!(inner.payload(), &frame[14..]);

        // DF and too big for 1500 once encapsulated: ICMP back to the sender.
        let big = from_me(udp(v4([10, 0, 1, 10], [10, 0, 1, 30]), 1, 2, &[7u8; 1460]));
        let r = f.dp.run_on(Hook::Port, &big, 1, Some(f.me)).unwrap();
        assert_eq!(r.retval, TC_ACT_REDIRECT);
        let eth = EthernetPacket::new(&r.output).unwrap();
        assert_eq!(eth.get_destination().octets(), ME_MAC);
        let ip = Ipv4Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_source().octets(), [10, 0, 1, 1]);
        assert_eq!(ip.get_destination().octets(), [10, 0, 1, 10]);
        let icmp = IcmpPacket::new(ip.payload()).unwrap();
        assert_eq!(icmp.get_icmp_type(), IcmpTypes::DestinationUnreachable);
        assert_eq!(icmp.get_icmp_code().0, 4);
        assert_eq!(&icmp.payload()[2..4], &1450u16.to_be_bytes());
        let stats = f.dp.stats().unwrap();
        assert_eq!(stats.drop(Hook::Port, DropReason::MtuExceeded).packets, 1);
        assert_eq!(stats.action(Hook::Port, Action::Encap).packets, 1);
    });
}

#[test]
fn underlay_decapsulates_known_vxlan_and_drops_spoofed() {
    let f = fixture("ovdecap");
    f.ns.run(|| {
        let inner = with_macs(
            &icmp4_echo(
                Ipv4Addr::new(10, 0, 1, 30),
                Ipv4Addr::new(10, 0, 1, 10),
                7,
                1,
            ),
            ME_MAC,
            ROUTER,
        );
        let good = vxlan(VTEP_PEER, VTEP_ME, 50000, 100, &inner);
        assert_eq!(f.dp.run(Hook::Xdp, &good).unwrap().retval, XDP_PASS);
        let r = f.dp.run(Hook::TcIngress, &good).unwrap();
        assert_eq!(r.retval, TC_ACT_REDIRECT);
        assert_eq!(r.output, inner, "exactly the inner frame is delivered");

        let cases = [
            (
                vxlan([192, 168, 77, 9], VTEP_ME, 1, 100, &inner),
                DropReason::UnknownVtep,
            ),
            (
                vxlan(VTEP_PEER, VTEP_ME, 1, 999, &inner),
                DropReason::UnknownVni,
            ),
            // VPC B's 10.0.1.30 lives here, not behind the peer.
            (
                vxlan(VTEP_PEER, VTEP_ME, 1, 200, &inner),
                DropReason::InnerSourceMismatch,
            ),
        ];
        for (pkt, reason) in cases {
            let before = f.dp.stats().unwrap();
            assert_eq!(
                f.dp.run(Hook::Xdp, &pkt).unwrap().retval,
                XDP_DROP,
                "{reason:?}"
            );
            assert_eq!(f.dp.run(Hook::TcIngress, &pkt).unwrap().retval, TC_ACT_SHOT);
            let after = f.dp.stats().unwrap();
            for hook in [Hook::Xdp, Hook::TcIngress] {
                let n = after.drop(hook, reason).packets - before.drop(hook, reason).packets;
                assert_eq!(n, 1, "{reason:?} at {hook:?}");
            }
        }
        // Not for this VTEP: the host stack's business.
        let other = vxlan(VTEP_PEER, [192, 168, 77, 3], 1, 100, &inner);
        assert_eq!(f.dp.run(Hook::TcIngress, &other).unwrap().retval, 0);
    });
}
