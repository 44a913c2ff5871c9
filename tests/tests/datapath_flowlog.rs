//! Step 8 in the loaded programs (BPF_PROG_TEST_RUN on crafted frames): flow-log events with
//! the deciding rules, their loss counter, per-endpoint counters, conntrack counters and the
//! per-VPC conntrack budget.
//!
//! Fixture (`vpc_tests::overlay_fixture`): `me` 10.0.1.10 (port p0, subnet a1) and `peer`
//! 10.0.2.20 (p1, subnet a2) on this host, `remote` 10.0.1.30 (subnet a1) behind the peer
//! VTEP; all in VPC A (VNI 100). `b` 10.0.1.30 (p2) is in VPC B (VNI 200).

use std::net::Ipv4Addr;

use controlplane::{
    datapath::{FlowCounters, FlowEvents, PolicyMaps, policy_maps::now_ns},
    overlay::EndpointSpec,
};
use dataplane_common::{
    Action, Counter, DropReason, Hook,
    conntrack::tcp_flags::{ACK, SYN},
    filter::ipv4_mapped,
    flowlog::{
        DECISION_NONE, EP_LOG_ACCEPT, EP_LOG_ANY, EP_LOG_REJECT, FLOW_ACCEPT, FLOW_REJECT,
        FlowEvent,
    },
    stats::{DIR_EGRESS, DIR_INGRESS, EndpointStatsKey},
    testpkt::{udp, v4, with_macs},
};
use vpc_tests::{
    overlay_fixture::{
        Fixture, ME_IP, ME_MAC, PEER_IP, PolicySpec, REMOTE_IP, ROUTER, fixture, tcp_frame,
        web_client_policy,
    },
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT},
};

const ME: [u8; 4] = ME_IP;
const PEER: [u8; 4] = PEER_IP;
const REMOTE: [u8; 4] = REMOTE_IP;

fn spec() -> PolicySpec {
    web_client_policy()
}

fn seg(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    tcp_frame(src, dst, sport, dport, flags)
}

/// Sends `frame` from port `from`; returns the TC verdict.
fn send(f: &Fixture, from: u32, frame: &[u8]) -> u32 {
    f.dp.run_on(Hook::Port, frame, 1, Some(from))
        .unwrap()
        .retval
}

fn set_flags(f: &mut Fixture, ifindex: u32, flags: u32) {
    f.set_flow_log_flags(ifindex, flags);
}

fn drain(events: &mut FlowEvents) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    events.drain_into(&mut out, usize::MAX);
    out
}

fn stats(f: &Fixture) -> std::collections::BTreeMap<EndpointStatsKey, Counter> {
    FlowCounters::open(f.dp.layout())
        .unwrap()
        .endpoint_stats()
        .unwrap()
}

fn stat(
    s: &std::collections::BTreeMap<EndpointStatsKey, Counter>,
    ifindex: u32,
    direction: u32,
    action: Action,
) -> u64 {
    s.get(&EndpointStatsKey {
        ifindex,
        direction,
        action: action as u32,
    })
    .map_or(0, |c| c.packets)
}

#[test]
fn flow_events_carry_the_deciding_rules_and_only_logged_verdicts() {
    let mut f = fixture("flowdec");
    f.apply_policy(&spec());
    let mut events = FlowEvents::open_flow_events(f.dp.layout()).unwrap();
    // Logging off: no events at all.
    f.ns.run(|| {
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40000, 80, SYN)),
            TC_ACT_REDIRECT
        );
        assert_eq!(send(&f, f.me, &seg(ME, PEER, 40001, 22, SYN)), TC_ACT_SHOT);
    });
    assert_eq!(drain(&mut events), vec![]);

    // The receiver logs rejects only.
    let port = f.peer;
    set_flags(&mut f, port, EP_LOG_REJECT);
    f.ns.run(|| {
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40002, 80, SYN)),
            TC_ACT_REDIRECT
        );
        assert_eq!(send(&f, f.me, &seg(ME, PEER, 40003, 22, SYN)), TC_ACT_SHOT);
    });
    let got = drain(&mut events);
    assert_eq!(got.len(), 1, "{got:?}");
    let e = got[0];
    assert_eq!(
        (e.vni, e.out_ifindex, e.in_ifindex),
        (100, f.me, f.peer),
        "{e:?}"
    );
    assert_eq!(
        (e.action, e.reason),
        (FLOW_REJECT, DropReason::SgIngress as u32)
    );
    assert_eq!((e.src, e.dst), (ipv4_mapped(ME), ipv4_mapped(PEER)));
    assert_eq!((e.src_port, e.dst_port, e.proto), (40003, 22, 6));
    // me's outbound rule (allow all) decided, a2's inbound ACL rule 100 allowed, no inbound
    // SG rule matched (0).
    assert_ne!(e.decision.sg_out, 0);
    assert_ne!(e.decision.sg_out, DECISION_NONE);
    assert_eq!(e.decision.acl_out, DECISION_NONE, "a1 has no ACL");
    assert_eq!(e.decision.acl_in, 100);
    assert_eq!(e.decision.sg_in, 0);
    assert_eq!((e.decision.tcp_flags, e.decision.tracked), (SYN, 0));
    assert_eq!(e.bytes as usize, seg(ME, PEER, 40003, 22, SYN).len());

    // Both ends log everything: accepted flows, the tracked reply, an ACL deny.
    let port = f.peer;
    set_flags(&mut f, port, EP_LOG_ANY);
    let port = f.me;
    set_flags(&mut f, port, EP_LOG_ACCEPT);
    f.ns.run(|| {
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40004, 80, SYN)),
            TC_ACT_REDIRECT
        );
        assert_eq!(
            send(&f, f.peer, &seg(PEER, ME, 80, 40004, SYN | ACK)),
            TC_ACT_REDIRECT
        );
        assert_eq!(send(&f, f.me, &seg(ME, PEER, 40005, 81, SYN)), TC_ACT_SHOT);
    });
    let got = drain(&mut events);
    assert_eq!(got.len(), 3, "{got:?}");
    let (open, reply, denied) = (got[0], got[1], got[2]);
    assert_eq!(open.action, FLOW_ACCEPT);
    assert_eq!(open.reason, 0);
    assert_ne!(open.decision.sg_in, 0);
    assert_ne!(open.decision.sg_in, DECISION_NONE);
    assert_eq!(open.decision.acl_in, 100);
    assert_eq!(
        (reply.out_ifindex, reply.in_ifindex, reply.decision.tracked),
        (f.peer, f.me, 1)
    );
    assert_eq!(
        (reply.decision.sg_out, reply.decision.sg_in),
        (DECISION_NONE, DECISION_NONE),
        "a tracked reply skips the security groups"
    );
    assert_eq!(
        reply.decision.acl_out, 100,
        "a2's outbound ACL still applies"
    );
    assert_eq!(reply.decision.tcp_flags, SYN | ACK);
    assert_eq!(
        (denied.action, denied.reason, denied.decision.acl_in),
        (FLOW_REJECT, DropReason::AclIngress as u32, 90)
    );
    assert_eq!(denied.decision.sg_in, DECISION_NONE, "the ACL denied first");
    // The references name the rules, through the compiled policies' rule indexes.
    let endpoints = f.dp.overlay().read().unwrap().endpoints;
    let rules = |port: u32| f.host.sg_rules(endpoints[&port].policy).unwrap();
    assert_eq!(
        rules(f.peer).describe(open.decision.sg_in, Ipv4Addr::from(ME)),
        "sg-web ingress tcp 80 from 10.0.0.0/16"
    );
    assert_eq!(
        rules(f.me).describe(open.decision.sg_out, Ipv4Addr::from(PEER)),
        "sg-client egress all to 0.0.0.0/0"
    );
    assert_eq!(
        rules(f.peer).describe(e.decision.sg_in, Ipv4Addr::from(ME)),
        "no rule"
    );
    let ts: Vec<u64> = got.iter().map(|e| e.ts_ns).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    assert_eq!(
        FlowCounters::open(f.dp.layout())
            .unwrap()
            .flowlog_lost()
            .unwrap(),
        0
    );
}

#[test]
fn a_full_flow_ring_counts_every_lost_event() {
    let mut f = fixture("flowlost");
    f.apply_policy(&spec());
    let port = f.peer;
    set_flags(&mut f, port, EP_LOG_ANY);
    let counters = FlowCounters::open(f.dp.layout()).unwrap();
    // A denied packet (no state, each run logs one event), run far more often than the ring
    // holds (4 MiB / (88 + 8) bytes = 43 690 records), with nobody consuming.
    let runs = 60_000u32;
    let frame = seg(ME, PEER, 40000, 22, SYN);
    f.ns.run(|| {
        let r = f.dp.run_on(Hook::Port, &frame, runs, Some(f.me)).unwrap();
        assert_eq!(r.retval, TC_ACT_SHOT);
    });
    let lost = counters.flowlog_lost().unwrap();
    let mut events = FlowEvents::open_flow_events(f.dp.layout()).unwrap();
    let kept = drain(&mut events).len() as u64;
    assert!(lost > 0, "the ring overflowed");
    assert!(kept > 40_000, "the ring was filled: {kept}");
    assert_eq!(
        kept + lost,
        u64::from(runs),
        "every event is kept or counted"
    );
    // Consuming makes room again.
    f.ns.run(|| {
        assert_eq!(send(&f, f.me, &frame), TC_ACT_SHOT);
    });
    assert_eq!(drain(&mut events).len(), 1);
    assert_eq!(counters.flowlog_lost().unwrap(), lost);
}

#[test]
fn endpoint_stats_count_each_direction_and_action() {
    let mut f = fixture("epstats");
    f.apply_policy(&spec());
    let frames = [
        seg(ME, PEER, 40000, 80, SYN),
        seg(PEER, ME, 80, 40000, SYN | ACK),
        seg(ME, PEER, 40001, 22, SYN),
    ];
    let udp_remote = with_macs(&udp(v4(ME, REMOTE), 30000, 53, b"q"), ROUTER, ME_MAC);
    f.ns.run(|| {
        assert_eq!(send(&f, f.me, &frames[0]), TC_ACT_REDIRECT);
        assert_eq!(send(&f, f.peer, &frames[1]), TC_ACT_REDIRECT);
        assert_eq!(send(&f, f.me, &frames[2]), TC_ACT_SHOT);
        assert_eq!(send(&f, f.me, &udp_remote), TC_ACT_REDIRECT);
    });
    let s = stats(&f);
    assert_eq!(stat(&s, f.me, DIR_EGRESS, Action::Redirect), 1, "{s:?}");
    assert_eq!(stat(&s, f.me, DIR_EGRESS, Action::Encap), 1);
    assert_eq!(stat(&s, f.me, DIR_INGRESS, Action::Redirect), 1);
    assert_eq!(stat(&s, f.peer, DIR_EGRESS, Action::Redirect), 1);
    assert_eq!(stat(&s, f.peer, DIR_INGRESS, Action::Redirect), 1);
    // The SG drop is the receiver's (inbound rules).
    assert_eq!(stat(&s, f.peer, DIR_INGRESS, Action::Drop), 1);
    assert_eq!(stat(&s, f.me, DIR_EGRESS, Action::Drop), 0);
    let bytes = s[&EndpointStatsKey {
        ifindex: f.peer,
        direction: DIR_INGRESS,
        action: Action::Redirect as u32,
    }]
        .bytes;
    assert_eq!(bytes as usize, frames[0].len());
}

#[test]
fn conntrack_entries_count_packets_and_bytes() {
    let mut f = fixture("ctcount");
    f.apply_policy(&spec());
    let frames = [
        seg(ME, PEER, 40000, 80, SYN),
        seg(PEER, ME, 80, 40000, SYN | ACK),
        seg(ME, PEER, 40000, 80, ACK),
        seg(ME, PEER, 40000, 80, ACK),
    ];
    f.ns.run(|| {
        for (i, fr) in frames.iter().enumerate() {
            let from = if i == 1 { f.peer } else { f.me };
            assert_eq!(send(&f, from, fr), TC_ACT_REDIRECT, "packet {i}");
        }
    });
    let maps = PolicyMaps::open(f.dp.layout()).unwrap();
    let ct = maps.conntrack().unwrap();
    assert_eq!(ct.len(), 1);
    let e = ct[0].1;
    assert_eq!(e.packets, 4);
    assert_eq!(e.bytes, frames.iter().map(|f| f.len() as u64).sum::<u64>());
    let s = maps.ct_sweep(now_ns(), false).unwrap();
    assert_eq!(s.top_flows[&100][0].packets, 4);
    assert_eq!(s.top_sources[&100], vec![(ipv4_mapped(ME), 1)]);
}

#[test]
fn a_vpc_over_its_conntrack_budget_is_refused_new_flows_others_are_not() {
    let mut f = fixture("ctbudget");
    // b (VPC B, port p2) gets a peer on the other host, so it has somewhere to send.
    f.state.endpoints.push(EndpointSpec {
        id: "b2".into(),
        subnet: "b1".into(),
        host: "h1".into(),
        ip: Ipv4Addr::new(10, 0, 1, 40),
        mac: [2, 0, 0, 2, 0, 2],
        ifindex: None,
    });
    f.apply_policy(&spec());
    let b = f.ns.ifindex("p2").unwrap();
    let maps = PolicyMaps::open(f.dp.layout()).unwrap();
    maps.set_ct_budget(100, 2, 0).unwrap();
    let to_remote = |port: u16| with_macs(&udp(v4(ME, REMOTE), port, 53, b"q"), ROUTER, ME_MAC);
    let from_b = |port: u16| {
        with_macs(
            &udp(v4([10, 0, 1, 30], [10, 0, 1, 40]), port, 53, b"q"),
            ROUTER,
            [2, 0, 0, 2, 0, 1],
        )
    };
    f.ns.run(|| {
        assert_eq!(send(&f, f.me, &to_remote(1000)), TC_ACT_REDIRECT);
        assert_eq!(send(&f, f.me, &to_remote(1001)), TC_ACT_REDIRECT);
        // The third flow of VPC A is refused; its tracked flows continue.
        assert_eq!(send(&f, f.me, &to_remote(1002)), TC_ACT_SHOT);
        assert_eq!(send(&f, f.me, &to_remote(1000)), TC_ACT_REDIRECT);
        // VPC B has no budget and still tracks new flows.
        for port in 0..5 {
            assert_eq!(send(&f, b, &from_b(2000 + port)), TC_ACT_REDIRECT);
        }
    });
    let drops = maps.endpoint_drops().unwrap();
    assert_eq!(
        drops
            .get(&(f.me, DropReason::CtBudgetExceeded as u32))
            .map(|c| c.packets),
        Some(1)
    );
    assert_eq!(maps.ct_budgets().unwrap()[&100].count, 2);
    let s = maps.ct_sweep(now_ns(), true).unwrap();
    assert_eq!(s.per_vni.get(&100), Some(&2));
    assert_eq!(s.per_vni.get(&200), Some(&5));
    // GC writes the live count back; raising the limit admits the flow.
    assert_eq!(maps.ct_budgets().unwrap()[&100].count, 2);
    maps.set_ct_budget(100, 3, 0).unwrap();
    f.ns.run(|| {
        assert_eq!(send(&f, f.me, &to_remote(1002)), TC_ACT_REDIRECT);
        assert_eq!(send(&f, f.me, &to_remote(1003)), TC_ACT_SHOT);
    });
    // Removing the budget lifts the limit.
    maps.remove_ct_budget(100).unwrap();
    f.ns.run(|| {
        assert_eq!(send(&f, f.me, &to_remote(1003)), TC_ACT_REDIRECT);
    });
}
