//! Host tests of the overlay forwarding logic (`port`, `underlay`) over in-memory tables.

use std::{collections::BTreeMap, net::Ipv4Addr, vec::Vec};

use crate::{
    DropReason,
    arp::{self, ARP_REPLY, ArpFrame, ArpIpv4},
    filter::ipv4_mapped,
    overlay::{
        Endpoint, Neighbor, NeighborKey, NeighborKind, OverlayConfig, OverlayTables, Route,
        RouteKind, RoutePrefix, v4,
    },
    packet::PacketView,
    packet::SlicePacket,
    parse::{Parsed, parse},
    port::{self, Forward, PortAction},
    testpkt::{self, arp_request, icmp4_echo, tcp_syn, udp, vxlan, with_macs},
    underlay::{self, UnderlayAction},
};

const VNI_A: u32 = 100;
const VNI_B: u32 = 200;
const ROUTER: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 1];
const ME: [u8; 6] = testpkt::SRC_MAC;
const LOCAL_PEER_MAC: [u8; 6] = [2, 0, 0, 1, 0, 2];
const REMOTE_MAC: [u8; 6] = [2, 0, 0, 1, 1, 1];
const VTEP_ME: [u8; 4] = [192, 168, 77, 1];
const VTEP_PEER: [u8; 4] = [192, 168, 77, 2];

/// In-memory tables with a linear-scan LPM (prefix lengths as in the kernel trie).
#[derive(Default)]
struct Tables {
    routes: Vec<(u32, RoutePrefix, Route)>,
    neighbors: BTreeMap<(u32, [u8; 16]), Neighbor>,
    vteps: Vec<[u8; 4]>,
    vnis: Vec<u32>,
}

fn prefix_matches(len: u32, prefix: &RoutePrefix, key: &RoutePrefix) -> bool {
    let a: Vec<u8> = prefix
        .vni_be
        .iter()
        .chain(prefix.addr.iter())
        .copied()
        .collect();
    let b: Vec<u8> = key.vni_be.iter().chain(key.addr.iter()).copied().collect();
    (0..len as usize).all(|bit| {
        let mask = 0x80 >> (bit % 8);
        a[bit / 8] & mask == b[bit / 8] & mask
    })
}

impl OverlayTables for Tables {
    fn route(&self, key: &RoutePrefix) -> Option<Route> {
        self.routes
            .iter()
            .filter(|(len, p, _)| prefix_matches(*len, p, key))
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, r)| *r)
    }
    fn neighbor(&self, key: &NeighborKey) -> Option<Neighbor> {
        self.neighbors.get(&(key.vni, key.addr)).copied()
    }
    fn is_vtep(&self, addr: [u8; 4]) -> bool {
        self.vteps.contains(&addr)
    }
    fn is_vni(&self, vni: u32) -> bool {
        self.vnis.contains(&vni)
    }
}

fn ip(a: [u8; 4]) -> [u8; 16] {
    ipv4_mapped(a)
}

/// VPC A (VNI 100, 10.0.0.0/16) and VPC B (VNI 200, same CIDR): in A, this instance
/// 10.0.1.10 (port 7), a local peer 10.0.2.20 (port 8) and a remote 10.0.1.30 behind
/// `VTEP_PEER`; in B only a local 10.0.1.30 (port 9).
fn tables() -> Tables {
    let mut t = Tables::default();
    for vni in [VNI_A, VNI_B] {
        t.routes.push((
            RoutePrefix::ipv4_prefix_len(16),
            RoutePrefix {
                vni_be: vni.to_be_bytes(),
                addr: ip([10, 0, 0, 0]),
            },
            Route {
                kind: RouteKind::Local as u32,
            },
        ));
        t.vnis.push(vni);
    }
    t.routes.push((
        RoutePrefix::ipv4_prefix_len(24),
        RoutePrefix {
            vni_be: VNI_A.to_be_bytes(),
            addr: ip([10, 0, 9, 0]),
        },
        Route {
            kind: RouteKind::Blackhole as u32,
        },
    ));
    t.vteps.push(VTEP_PEER);
    let n = &mut t.neighbors;
    n.insert(
        (VNI_A, ip([10, 0, 1, 10])),
        Neighbor::new(NeighborKind::Local, 7, [0; 4], ME),
    );
    n.insert(
        (VNI_A, ip([10, 0, 2, 20])),
        Neighbor::new(NeighborKind::Local, 8, [0; 4], LOCAL_PEER_MAC),
    );
    n.insert(
        (VNI_A, ip([10, 0, 1, 30])),
        Neighbor::new(NeighborKind::Remote, 0, VTEP_PEER, REMOTE_MAC),
    );
    n.insert(
        (VNI_A, ip([10, 0, 1, 1])),
        Neighbor::new(NeighborKind::Gateway, 0, [0; 4], ROUTER),
    );
    n.insert(
        (VNI_B, ip([10, 0, 1, 30])),
        Neighbor::new(NeighborKind::Local, 9, [0; 4], [2, 0, 0, 2, 0, 1]),
    );
    t
}

fn me() -> Endpoint {
    Endpoint {
        vni: VNI_A,
        addr: ip([10, 0, 1, 10]),
        mac: ME,
        router_mac: ROUTER,
        gateway: ip([10, 0, 1, 1]),
        policy: 1,
        acl: 0,
        subnet_bits: 24,
        flags: 0,
    }
}

fn cfg() -> OverlayConfig {
    OverlayConfig {
        vtep: VTEP_ME,
        underlay_ifindex: 2,
        underlay_mtu: 1500,
    }
}

fn from_me(frame: &[u8]) -> Result<PortAction, DropReason> {
    port::decide(&SlicePacket(frame), &me(), &cfg(), 0, &tables()).result()
}

fn local(ifindex: u32, mac: [u8; 6]) -> PortAction {
    PortAction {
        forward: Forward::Local,
        ifindex,
        mac,
        ..PortAction::drop(DropReason::Truncated)
    }
}

fn echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    with_macs(
        &icmp4_echo(Ipv4Addr::from(src), Ipv4Addr::from(dst), 1, 1),
        ROUTER,
        ME,
    )
}

#[test]
fn arp_for_gateway_and_instances_is_answered_with_the_router_mac() {
    for target in [[10, 0, 1, 1], [10, 0, 1, 30], [10, 0, 2, 20]] {
        let req = arp_request(Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::from(target));
        let action = from_me(&req).expect("answered");
        assert_eq!(action.forward, Forward::ArpReply, "{target:?}");
        // What the datapath writes back: the reply to the request, from the router MAC.
        let request: ArpIpv4 = SlicePacket(&req).read(14).unwrap();
        let ArpFrame {
            eth_dst,
            eth_src,
            arp,
            ..
        } = arp::reply(&request, ROUTER);
        assert_eq!(eth_dst, ME);
        assert_eq!(eth_src, ROUTER);
        assert_eq!(arp.oper(), ARP_REPLY);
        assert_eq!(arp.sha, ROUTER);
        assert_eq!(arp.spa, target);
        assert_eq!(arp.tha, ME);
        assert_eq!(arp.tpa, [10, 0, 1, 10]);
    }
}

#[test]
fn arp_is_never_flooded_and_never_spoofed() {
    let ask = |sender: [u8; 4], target: [u8; 4]| {
        from_me(&arp_request(Ipv4Addr::from(sender), Ipv4Addr::from(target)))
    };
    // Unknown target, own address (probe), and an address only VPC B has.
    assert_eq!(
        ask([10, 0, 1, 10], [10, 0, 1, 99]),
        Err(DropReason::ArpUnanswered)
    );
    assert_eq!(
        ask([0, 0, 0, 0], [10, 0, 1, 10]),
        Err(DropReason::ArpUnanswered)
    );
    assert_eq!(
        ask([10, 0, 1, 10], [10, 0, 9, 9]),
        Err(DropReason::ArpUnanswered)
    );
    // A probe from 0.0.0.0 for another address is answered.
    assert_eq!(
        ask([0, 0, 0, 0], [10, 0, 1, 1]).map(|a| a.forward),
        Ok(Forward::ArpReply)
    );
    assert_eq!(
        ask([10, 0, 1, 11], [10, 0, 1, 1]),
        Err(DropReason::SpoofedIp)
    );
    let mut forged = arp_request(Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 1));
    forged[14 + 8 + 5] ^= 1; // sender hardware address
    assert_eq!(from_me(&forged), Err(DropReason::SpoofedMac));
    let mut reply = arp_request(Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 1));
    reply[14 + 7] = 2;
    assert_eq!(from_me(&reply), Err(DropReason::ArpUnanswered));
}

#[test]
fn spoofed_sources_and_other_protocols_are_dropped() {
    let mut bad_mac = echo([10, 0, 1, 10], [10, 0, 2, 20]);
    bad_mac[11] ^= 1;
    assert_eq!(from_me(&bad_mac), Err(DropReason::SpoofedMac));
    assert_eq!(
        from_me(&echo([10, 0, 1, 11], [10, 0, 2, 20])),
        Err(DropReason::SpoofedIp)
    );
    let v6 = with_macs(
        &udp(testpkt::v6("fd00::1", "fd00::2"), 1, 2, b""),
        ROUTER,
        ME,
    );
    assert_eq!(from_me(&v6), Err(DropReason::UnsupportedProtocol));
    assert_eq!(
        from_me(&echo([10, 0, 1, 10], [10, 0, 2, 20])[..20]),
        Err(DropReason::Truncated)
    );
}

#[test]
fn routes_by_longest_prefix_within_the_vpc() {
    assert_eq!(
        from_me(&echo([10, 0, 1, 10], [10, 0, 2, 20])),
        Ok(local(8, LOCAL_PEER_MAC))
    );
    let remote = from_me(&echo([10, 0, 1, 10], [10, 0, 1, 30])).expect("forwarded");
    assert_eq!(
        (
            remote.forward,
            remote.vtep,
            remote.mac,
            remote.ip_len,
            remote.fixed_gso
        ),
        (Forward::Remote, VTEP_PEER, REMOTE_MAC, 44, false)
    );
    // Outside the VPC, a blackhole inside it, the gateway itself, and an address only VPC B
    // has: none of it is forwarded.
    assert_eq!(
        from_me(&echo([10, 0, 1, 10], [10, 1, 0, 1])),
        Err(DropReason::NoRoute)
    );
    assert_eq!(
        from_me(&echo([10, 0, 1, 10], [10, 0, 9, 9])),
        Err(DropReason::NoRoute)
    );
    assert_eq!(
        from_me(&echo([10, 0, 1, 10], [10, 0, 1, 1])),
        Err(DropReason::NoNeighbor)
    );
    assert_eq!(
        from_me(&echo([10, 0, 1, 10], [10, 0, 1, 99])),
        Err(DropReason::NoNeighbor)
    );
}

#[test]
fn oversized_packets_get_frag_needed_or_are_counted() {
    let big = with_macs(
        &udp(
            testpkt::v4([10, 0, 1, 10], [10, 0, 1, 30]),
            1,
            2,
            &[0u8; 1460],
        ),
        ROUTER,
        ME,
    );
    // 1488-byte IP packet + 50 > 1500, DF set by the builder.
    let action = from_me(&big).expect("answered");
    assert_eq!((action.forward, action.mtu), (Forward::FragNeeded, 1450));
    let mut no_df = big.clone();
    no_df[14 + 6] = 0;
    assert_eq!(from_me(&no_df), Err(DropReason::MtuExceeded));
    // Exactly fitting: 1450-byte IP packet.
    let fits = with_macs(
        &udp(
            testpkt::v4([10, 0, 1, 10], [10, 0, 1, 30]),
            1,
            2,
            &[0u8; 1422],
        ),
        ROUTER,
        ME,
    );
    assert_eq!(from_me(&fits).map(|a| a.forward), Ok(Forward::Remote));
    // GSO: segments of 1398 payload bytes + 20 IP + 20 TCP fit 1450; 1448 do not.
    let syn = with_macs(
        &tcp_syn(testpkt::v4([10, 0, 1, 10], [10, 0, 1, 30]), 1, 2),
        ROUTER,
        ME,
    );
    let gso = |size| port::decide(&SlicePacket(&syn), &me(), &cfg(), size, &tables());
    assert_eq!(
        (gso(1398).forward, gso(1398).fixed_gso),
        (Forward::Remote, true)
    );
    assert_eq!(
        (gso(1448).forward, gso(1448).fixed_gso),
        (Forward::Remote, false)
    );
}

fn inner(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    with_macs(
        &icmp4_echo(Ipv4Addr::from(src), Ipv4Addr::from(dst), 1, 1),
        ME,
        ROUTER,
    )
}

fn from_underlay(frame: &[u8]) -> Result<UnderlayAction, DropReason> {
    let pkt = SlicePacket(frame);
    let Parsed::Ip(outer) = parse(&pkt).unwrap() else {
        return Ok(UnderlayAction::NotOverlay);
    };
    underlay::decide(&pkt, &outer, &cfg(), &tables())
}

#[test]
fn vxlan_from_known_vteps_is_delivered_to_local_ports() {
    let pkt = vxlan(
        VTEP_PEER,
        VTEP_ME,
        50000,
        VNI_A,
        &inner([10, 0, 1, 30], [10, 0, 2, 20]),
    );
    assert_eq!(
        from_underlay(&pkt),
        Ok(UnderlayAction::Deliver {
            ifindex: 8,
            eth: [LOCAL_PEER_MAC, ROUTER].concat().try_into().unwrap(),
        })
    );
}

#[test]
fn spoofed_or_foreign_vxlan_is_dropped_and_the_rest_is_left_alone() {
    let good = inner([10, 0, 1, 30], [10, 0, 2, 20]);
    let cases = [
        // Unknown VTEP.
        (
            vxlan([192, 168, 77, 9], VTEP_ME, 1, VNI_A, &good),
            Err(DropReason::UnknownVtep),
        ),
        // Unknown VNI.
        (
            vxlan(VTEP_PEER, VTEP_ME, 1, 999, &good),
            Err(DropReason::UnknownVni),
        ),
        // VPC B has 10.0.1.30 locally, not behind the peer: the peer cannot send as it.
        (
            vxlan(
                VTEP_PEER,
                VTEP_ME,
                1,
                VNI_B,
                &inner([10, 0, 1, 30], [10, 0, 1, 30]),
            ),
            Err(DropReason::InnerSourceMismatch),
        ),
        // Inner source is not a remote instance of the VPC.
        (
            vxlan(
                VTEP_PEER,
                VTEP_ME,
                1,
                VNI_A,
                &inner([10, 0, 2, 20], [10, 0, 1, 10]),
            ),
            Err(DropReason::InnerSourceMismatch),
        ),
        // Destination not on this host.
        (
            vxlan(
                VTEP_PEER,
                VTEP_ME,
                1,
                VNI_A,
                &inner([10, 0, 1, 30], [10, 0, 1, 77]),
            ),
            Err(DropReason::NoNeighbor),
        ),
        // Inner frame not IPv4, truncated inner.
        (
            vxlan(
                VTEP_PEER,
                VTEP_ME,
                1,
                VNI_A,
                &arp_request(Ipv4Addr::new(10, 0, 1, 30), Ipv4Addr::new(10, 0, 1, 10)),
            ),
            Err(DropReason::MalformedVxlan),
        ),
        (
            vxlan(VTEP_PEER, VTEP_ME, 1, VNI_A, &good[..20]),
            Err(DropReason::MalformedVxlan),
        ),
        // Not for this VTEP, or not VXLAN: the host stack's business.
        (
            vxlan(VTEP_PEER, [192, 168, 77, 3], 1, VNI_A, &good),
            Ok(UnderlayAction::NotOverlay),
        ),
        (
            udp(testpkt::v4(VTEP_PEER, VTEP_ME), 1, 53, b"dns"),
            Ok(UnderlayAction::NotOverlay),
        ),
    ];
    for (i, (pkt, want)) in cases.iter().enumerate() {
        assert_eq!(from_underlay(pkt), *want, "case {i}");
    }
    // The I flag must be set.
    let mut no_flag = vxlan(VTEP_PEER, VTEP_ME, 1, VNI_A, &good);
    no_flag[42] = 0;
    assert_eq!(from_underlay(&no_flag), Err(DropReason::MalformedVxlan));
    // An unconfigured overlay decapsulates nothing.
    let pkt = vxlan(VTEP_PEER, VTEP_ME, 1, VNI_A, &good);
    let SlicePacket(bytes) = SlicePacket(&pkt);
    let Ok(Parsed::Ip(outer)) = parse(&SlicePacket(bytes)) else {
        panic!()
    };
    assert_eq!(
        underlay::decide(
            &SlicePacket(bytes),
            &outer,
            &OverlayConfig::default(),
            &tables()
        ),
        Ok(UnderlayAction::NotOverlay)
    );
    assert_eq!(v4(&outer.dst), VTEP_ME);
}
