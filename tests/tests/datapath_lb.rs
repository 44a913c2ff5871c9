//! The load balancer in the loaded programs, on crafted frames (BPF_PROG_TEST_RUN), with
//! listeners, backends and Maglev tables installed the way the agent does it.
//!
//! Fixture (`vpc_tests::overlay_fixture`): client `me` 10.0.1.10 (port p0), target `peer`
//! 10.0.2.20 (p1, this host), target `remote` 10.0.1.30 (host h1, behind the peer VTEP); VIP
//! 10.0.1.100 with listeners tcp/80 -> tg-web (targets port 8080) and udp/53 -> tg-dns
//! (peer:5353).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use controlplane::{
    datapath::LbMaps,
    lb::{
        LbPlan,
        compile::TargetStatus,
        health::TargetState,
        model::{HealthCheck, LbProtocol},
        plan::{PlannedGroup, PlannedListener, PlannedTarget},
    },
};
use dataplane_common::{
    DropReason, Hook,
    conntrack::tcp_flags::{ACK, SYN},
    testpkt::{tcp, udp, v4, vxlan, with_macs},
};
use pnet_packet::{
    Packet,
    ethernet::EthernetPacket,
    ipv4::{Ipv4Packet, checksum as ip_checksum},
    tcp::{TcpPacket, ipv4_checksum as tcp_checksum},
    udp::{UdpPacket, ipv4_checksum as udp_checksum},
};
use vpc_tests::{
    overlay_fixture::{Fixture, ME_MAC, PEER_MAC, PolicySpec, ROUTER, VTEP_ME, VTEP_PEER, fixture},
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT},
};

const ME: [u8; 4] = [10, 0, 1, 10];
const PEER: [u8; 4] = [10, 0, 2, 20];
const REMOTE: [u8; 4] = [10, 0, 1, 30];
const VIP: [u8; 4] = [10, 0, 1, 100];
const VNI: u32 = 100;

fn target(endpoint: &str, ip: [u8; 4], port: u16) -> PlannedTarget {
    PlannedTarget {
        endpoint: endpoint.into(),
        ip: Ipv4Addr::from(ip),
        port,
        weight: 1,
    }
}

fn group(id: &str, protocol: LbProtocol, targets: Vec<PlannedTarget>) -> PlannedGroup {
    PlannedGroup {
        id: id.into(),
        vni: VNI,
        protocol,
        health: HealthCheck::default(),
        deregistration_delay: Duration::from_secs(300),
        targets,
        used: true,
    }
}

fn listener(protocol: LbProtocol, port: u16, tg: &str) -> PlannedListener {
    PlannedListener {
        lb: "lb-1".into(),
        subnet: "a1".into(),
        vni: VNI,
        vip: Ipv4Addr::from(VIP),
        protocol,
        port,
        target_group: tg.into(),
        table_size: 65_537,
    }
}

/// The plan: tcp/80 -> web (peer:8080, remote:8080), udp/53 -> dns (peer:5353), tcp/81 ->
/// empty (no targets).
fn plan() -> LbPlan {
    let groups = [
        group(
            "tg-web",
            LbProtocol::Tcp,
            vec![target("peer", PEER, 8080), target("remote", REMOTE, 8080)],
        ),
        group("tg-dns", LbProtocol::Udp, vec![target("peer", PEER, 5353)]),
        group("tg-empty", LbProtocol::Tcp, vec![]),
    ];
    LbPlan {
        listeners: vec![
            listener(LbProtocol::Tcp, 80, "tg-web"),
            listener(LbProtocol::Udp, 53, "tg-dns"),
            listener(LbProtocol::Tcp, 81, "tg-empty"),
        ],
        groups: groups.into_iter().map(|g| (g.id.clone(), g)).collect(),
        vips: BTreeMap::from([("lb-1".into(), (VNI, Ipv4Addr::from(VIP)))]),
        probe_nodes: Vec::new(),
    }
}

fn status(group: &str, endpoint: &str, ip: [u8; 4], port: u16, state: TargetState) -> TargetStatus {
    TargetStatus {
        group: group.into(),
        endpoint: endpoint.into(),
        ip: Ipv4Addr::from(ip),
        port,
        state,
        reason: None,
    }
}

/// Web targets in states `peer`, `remote`; dns healthy.
fn states(peer: TargetState, remote: TargetState) -> Vec<TargetStatus> {
    vec![
        status("tg-web", "peer", PEER, 8080, peer),
        status("tg-web", "remote", REMOTE, 8080, remote),
        status("tg-dns", "peer", PEER, 5353, TargetState::Healthy),
    ]
}

fn with_lb(tag: &str) -> Fixture {
    let mut f = fixture(tag);
    f.lb_plan = plan();
    f.lb_targets = states(TargetState::Healthy, TargetState::Healthy);
    let r = f.apply_policy(&PolicySpec::default());
    assert_eq!(r.lb.tables, 2, "{r:?}");
    // Level-triggered: nothing to do the second time.
    assert_eq!(f.apply_policy(&PolicySpec::default()).changes(), 0);
    f
}

fn send(f: &Fixture, from: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let r = f.dp.run_on(Hook::Port, frame, 1, Some(from)).unwrap();
    (r.retval, r.output)
}

fn syn_to_vip(sport: u16, flags: u8) -> Vec<u8> {
    with_macs(
        &tcp(v4(ME, VIP), sport, 80, flags, b"hello"),
        ROUTER,
        ME_MAC,
    )
}

/// The IPv4 packet of an output frame (the inner one of VXLAN), checksums verified.
fn ip_of(frame: &[u8]) -> Vec<u8> {
    let eth = EthernetPacket::new(frame).expect("ethernet");
    let mut ip = eth.payload().to_vec();
    let outer = Ipv4Packet::new(&ip).unwrap();
    if outer.get_next_level_protocol().0 == 17
        && outer.get_destination() == Ipv4Addr::from(VTEP_PEER)
    {
        // VXLAN: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
        ip = ip[50..].to_vec();
    }
    let p = Ipv4Packet::new(&ip).unwrap();
    let total = usize::from(p.get_total_length());
    ip.truncate(total);
    let p = Ipv4Packet::new(&ip).unwrap();
    assert_eq!(p.get_checksum(), ip_checksum(&p), "IPv4 header checksum");
    match p.get_next_level_protocol().0 {
        6 => {
            let t = TcpPacket::new(p.payload()).unwrap();
            assert_eq!(
                t.get_checksum(),
                tcp_checksum(&t, &p.get_source(), &p.get_destination()),
                "TCP checksum"
            );
        }
        17 => {
            let u = UdpPacket::new(p.payload()).unwrap();
            if u.get_checksum() != 0 {
                assert_eq!(
                    u.get_checksum(),
                    udp_checksum(&u, &p.get_source(), &p.get_destination()),
                    "UDP checksum"
                );
            }
        }
        _ => {}
    }
    ip
}

/// (source, source port, destination, destination port) of an IPv4 packet.
fn tuple(ip: &[u8]) -> ([u8; 4], u16, [u8; 4], u16) {
    let p = Ipv4Packet::new(ip).unwrap();
    let l4 = p.payload();
    (
        p.get_source().octets(),
        u16::from_be_bytes([l4[0], l4[1]]),
        p.get_destination().octets(),
        u16::from_be_bytes([l4[2], l4[3]]),
    )
}

fn drops(f: &Fixture, reason: DropReason) -> u64 {
    f.dp.stats().unwrap().drop(Hook::Port, reason).packets
}

#[test]
fn new_flows_are_dnated_to_targets_with_correct_checksums_and_stay_on_them() {
    let f = with_lb("lbdnat");
    f.ns.run(|| {
        let mut seen = BTreeMap::new();
        for sport in 40_000..40_064 {
            let (rc, out) = send(&f, f.me, &syn_to_vip(sport, SYN));
            assert_eq!(rc, TC_ACT_REDIRECT, "sport {sport}");
            let (src, sp, dst, dp) = tuple(&ip_of(&out));
            // Client address and port preserved, destination the target.
            assert_eq!((src, sp, dp), (ME, sport, 8080));
            assert!(dst == PEER || dst == REMOTE, "{dst:?}");
            seen.insert(sport, dst);
            // Every later packet of the flow goes to the same target.
            for _ in 0..2 {
                let (rc, out) = send(&f, f.me, &syn_to_vip(sport, ACK));
                assert_eq!(rc, TC_ACT_REDIRECT);
                assert_eq!(tuple(&ip_of(&out)).2, dst, "sport {sport} changed target");
            }
        }
        let to_peer = seen.values().filter(|d| **d == PEER).count();
        assert!(
            (16..=48).contains(&to_peer),
            "64 flows over two targets: {to_peer} to peer"
        );
        let lb = LbMaps::open(f.dp.layout()).unwrap();
        assert_eq!(lb.flows().unwrap().len(), 64);
        assert_eq!(lb.reverse_entries().unwrap().len(), 64);
    });
}

#[test]
fn replies_are_reverse_nated_locally_and_after_decapsulation() {
    let f = with_lb("lbrev");
    f.ns.run(|| {
        // Find one flow per target.
        let mut by_target = BTreeMap::new();
        for sport in 41_000..41_100 {
            let (_, out) = send(&f, f.me, &syn_to_vip(sport, SYN));
            by_target.entry(tuple(&ip_of(&out)).2).or_insert(sport);
            if by_target.len() == 2 {
                break;
            }
        }
        let (local, remote) = (by_target[&PEER], by_target[&REMOTE]);

        // Local target: the reply leaves peer's port and reaches me from the VIP.
        let reply = with_macs(
            &tcp(v4(PEER, ME), 8080, local, SYN | ACK, b"world"),
            ROUTER,
            PEER_MAC,
        );
        let (rc, out) = send(&f, f.peer, &reply);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(tuple(&ip_of(&out)), (VIP, 80, ME, local));

        // Remote target: the reply arrives over VXLAN.
        let inner = with_macs(
            &tcp(v4(REMOTE, ME), 8080, remote, SYN | ACK, b"world"),
            ME_MAC,
            ROUTER,
        );
        let r =
            f.dp.run(Hook::TcIngress, &vxlan(VTEP_PEER, VTEP_ME, 7, VNI, &inner))
                .unwrap();
        assert_eq!(r.retval, TC_ACT_REDIRECT);
        assert_eq!(tuple(&ip_of(&r.output)), (VIP, 80, ME, remote));

        // Traffic that is not a reply of a balanced flow is left alone.
        let plain = with_macs(&tcp(v4(PEER, ME), 8080, 999, SYN, &[]), ROUTER, PEER_MAC);
        let (_, out) = send(&f, f.peer, &plain);
        assert_eq!(tuple(&ip_of(&out)).0, PEER);
    });
}

#[test]
fn udp_is_balanced_with_and_without_checksum() {
    let f = with_lb("lbudp");
    f.ns.run(|| {
        let q = with_macs(&udp(v4(ME, VIP), 5000, 53, b"query"), ROUTER, ME_MAC);
        let (rc, out) = send(&f, f.me, &q);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let ip = ip_of(&out);
        assert_eq!(tuple(&ip), (ME, 5000, PEER, 5353));
        // A zero UDP checksum means "none" and must stay zero.
        let mut nocsum = with_macs(&udp(v4(ME, VIP), 5001, 53, b"query"), ROUTER, ME_MAC);
        nocsum[14 + 20 + 6] = 0;
        nocsum[14 + 20 + 7] = 0;
        let (rc, out) = send(&f, f.me, &nocsum);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let ip = ip_of(&out);
        assert_eq!(tuple(&ip), (ME, 5001, PEER, 5353));
        assert_eq!(&ip[26..28], &[0, 0]);
        // The reply comes from the VIP.
        let a = with_macs(&udp(v4(PEER, ME), 5353, 5000, b"answer"), ROUTER, PEER_MAC);
        let (rc, out) = send(&f, f.peer, &a);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(tuple(&ip_of(&out)), (VIP, 53, ME, 5000));
    });
}

#[test]
fn packets_without_listener_or_target_are_dropped_and_counted() {
    let f = with_lb("lbnone");
    f.ns.run(|| {
        let f81 = with_macs(&tcp(v4(ME, VIP), 40_000, 81, SYN, &[]), ROUTER, ME_MAC);
        assert_eq!(send(&f, f.me, &f81).0, TC_ACT_SHOT);
        assert_eq!(drops(&f, DropReason::LbNoTarget), 1);
        let f82 = with_macs(&tcp(v4(ME, VIP), 40_000, 82, SYN, &[]), ROUTER, ME_MAC);
        assert_eq!(send(&f, f.me, &f82).0, TC_ACT_SHOT);
        let u80 = with_macs(&udp(v4(ME, VIP), 40_000, 80, b"x"), ROUTER, ME_MAC);
        assert_eq!(send(&f, f.me, &u80).0, TC_ACT_SHOT);
        assert_eq!(drops(&f, DropReason::LbNoListener), 2);
    });
}

#[test]
fn health_and_draining_decide_new_flows_while_existing_ones_stay() {
    let mut f = with_lb("lbhealth");
    // Bind flows to both targets first.
    let flows: Vec<(u16, [u8; 4])> = f.ns.run(|| {
        (42_000..42_040)
            .map(|sport| {
                let (_, out) = send(&f, f.me, &syn_to_vip(sport, SYN));
                (sport, tuple(&ip_of(&out)).2)
            })
            .collect()
    });
    assert!(flows.iter().any(|(_, d)| *d == PEER) && flows.iter().any(|(_, d)| *d == REMOTE));

    // Peer unhealthy: new flows go to remote only; peer's flows continue.
    f.lb_targets = states(TargetState::Unhealthy, TargetState::Healthy);
    assert_eq!(f.apply_policy(&PolicySpec::default()).lb.tables, 1);
    f.ns.run(|| {
        for sport in 43_000..43_040 {
            let (_, out) = send(&f, f.me, &syn_to_vip(sport, SYN));
            assert_eq!(tuple(&ip_of(&out)).2, REMOTE);
        }
        for (sport, dst) in &flows {
            let (_, out) = send(&f, f.me, &syn_to_vip(*sport, ACK));
            assert_eq!(tuple(&ip_of(&out)).2, *dst, "existing flow {sport} moved");
        }
    });

    // None healthy: fail open, both take new flows again.
    f.lb_targets = states(TargetState::Unhealthy, TargetState::Unhealthy);
    f.apply_policy(&PolicySpec::default());
    let fresh: Vec<[u8; 4]> = f.ns.run(|| {
        (44_000..44_040)
            .map(|sport| tuple(&ip_of(&send(&f, f.me, &syn_to_vip(sport, SYN)).1)).2)
            .collect()
    });
    assert!(
        fresh.contains(&PEER) && fresh.contains(&REMOTE),
        "fail open"
    );

    // Peer draining: its flows continue, no new ones.
    f.lb_targets = states(TargetState::Draining, TargetState::Healthy);
    f.apply_policy(&PolicySpec::default());
    f.ns.run(|| {
        for sport in 45_000..45_040 {
            let (_, out) = send(&f, f.me, &syn_to_vip(sport, SYN));
            assert_eq!(tuple(&ip_of(&out)).2, REMOTE);
        }
        for (sport, dst) in &flows {
            let (_, out) = send(&f, f.me, &syn_to_vip(*sport, ACK));
            assert_eq!(tuple(&ip_of(&out)).2, *dst, "draining flow {sport} moved");
        }
    });

    // Drain over (target gone): its flows are balanced anew, onto remote.
    f.lb_targets = vec![
        status("tg-web", "remote", REMOTE, 8080, TargetState::Healthy),
        status("tg-dns", "peer", PEER, 5353, TargetState::Healthy),
    ];
    let r = f.apply_policy(&PolicySpec::default());
    assert!(r.lb.backends >= 1, "{r:?}");
    f.ns.run(|| {
        for (sport, _) in &flows {
            let (_, out) = send(&f, f.me, &syn_to_vip(*sport, ACK));
            assert_eq!(tuple(&ip_of(&out)).2, REMOTE);
        }
    });

    // Listeners removed: tables and entries go; the next pass frees the old ranges.
    f.lb_plan = LbPlan::default();
    f.lb_targets.clear();
    f.apply_policy(&PolicySpec::default());
    let lb = LbMaps::open(f.dp.layout()).unwrap();
    assert!(lb.services().unwrap().is_empty());
    assert!(lb.backends().unwrap().is_empty());
    f.ns.run(|| {
        // The VIP is no longer answered.
        assert_eq!(send(&f, f.me, &syn_to_vip(46_000, SYN)).0, TC_ACT_SHOT);
    });
}

#[test]
fn a_trace_to_the_vip_shows_the_target_and_records_no_flow() {
    use controlplane::datapath::{PolicyMaps, trace::TraceProgram};
    use dataplane_common::{
        Action,
        filter::ipv4_mapped,
        trace::{TraceEvent, TraceStage},
    };
    let f = with_lb("lbtrace");
    let lb = LbMaps::open(f.dp.layout()).unwrap();
    let ct = PolicyMaps::open(f.dp.layout()).unwrap();
    let lb_stage = |events: &[TraceEvent]| -> TraceEvent {
        *events
            .iter()
            .find(|e| e.stage == TraceStage::LoadBalancer as u32)
            .expect("a load-balancer stage")
    };
    f.ns.run(|| {
        // A new flow: a target is chosen (not a recorded one), nothing is recorded.
        let t =
            f.dp.trace(TraceProgram::Port, f.me, &syn_to_vip(43_000, SYN))
                .unwrap();
        assert_eq!(t.retval, TC_ACT_REDIRECT, "{:?}", t.events);
        let s = lb_stage(&t.events);
        assert_eq!((s.c, s.d), (8080, 0), "{s:?}");
        assert!(
            s.addr == ipv4_mapped(PEER) || s.addr == ipv4_mapped(REMOTE),
            "{s:?}"
        );
        assert!(
            t.verdict() == Some((Action::Redirect as u32, 0))
                || t.verdict() == Some((Action::Encap as u32, 0))
        );
        assert_eq!(lb.flows().unwrap().len(), 0);
        assert_eq!(lb.reverse_entries().unwrap().len(), 0);
        assert_eq!(ct.conntrack().unwrap().len(), 0);
        // A real flow is recorded; its trace follows the recorded target.
        let (rc, out) = send(&f, f.me, &syn_to_vip(43_001, SYN));
        assert_eq!(rc, TC_ACT_REDIRECT);
        let target = tuple(&ip_of(&out)).2;
        // (Two conntrack entries: the client's flow to the VIP and the one to the target.)
        let tracked = ct.conntrack().unwrap();
        let t =
            f.dp.trace(TraceProgram::Port, f.me, &syn_to_vip(43_001, ACK))
                .unwrap();
        let s = lb_stage(&t.events);
        assert_eq!((s.addr, s.d), (ipv4_mapped(target), 1), "{s:?}");
        assert_eq!(lb.flows().unwrap().len(), 1);
        assert_eq!(
            ct.conntrack().unwrap(),
            tracked,
            "the trace refreshed nothing"
        );
    });
}
