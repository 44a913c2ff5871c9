//! Packet traces in the loaded programs (BPF_PROG_TEST_RUN with `skb->mark = TRACE_MARK`
//! against the live maps): each stage reports its decision, and nothing changes state
//! (conntrack, counters, flow logs). Load-balancer traces are in `datapath_lb.rs`.
//!
//! Fixture (`vpc_tests::overlay_fixture`): `me` 10.0.1.10 (p0, subnet a1), `peer` 10.0.2.20
//! (p1, subnet a2) here, `remote` 10.0.1.30 (subnet a1) behind the peer VTEP; VNI 100.

use controlplane::datapath::{FlowCounters, FlowEvents, PolicyMaps, trace::TraceProgram};
use dataplane_common::{
    Action, DropReason, Hook,
    conntrack::tcp_flags::{ACK, SYN},
    filter::ipv4_mapped,
    flowlog::EP_LOG_ANY,
    port::Forward,
    testpkt::{tcp, udp, v4, with_macs},
    trace::{TraceEvent, TraceStage},
};
use vpc_tests::{
    overlay_fixture::{
        Fixture, ME_IP, ME_MAC, PEER_IP, PEER_MAC, PolicySpec, REMOTE_IP, ROUTER, VTEP_ME,
        VTEP_PEER, fixture, tcp_frame, web_client_policy,
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

fn stages(events: &[TraceEvent]) -> Vec<TraceStage> {
    events
        .iter()
        .map(|e| TraceStage::from_u32(e.stage).expect("known stage"))
        .collect()
}

fn one(events: &[TraceEvent], stage: TraceStage) -> TraceEvent {
    let found: Vec<_> = events.iter().filter(|e| e.stage == stage as u32).collect();
    assert_eq!(found.len(), 1, "{stage:?} in {events:?}");
    *found[0]
}

/// Everything a trace must leave alone: conntrack entries, per-endpoint and per-hook
/// counters, flow-log events and losses.
fn state(f: &Fixture) -> String {
    let maps = PolicyMaps::open(f.dp.layout()).unwrap();
    let counters = FlowCounters::open(f.dp.layout()).unwrap();
    format!(
        "{:?} {:?} {:?} {:?} {:?} {:?}",
        maps.conntrack().unwrap(),
        maps.endpoint_drops().unwrap(),
        maps.ct_budgets().unwrap(),
        counters.endpoint_stats().unwrap(),
        counters.flowlog_lost().unwrap(),
        f.dp.stats().unwrap(),
    )
}

fn set_log_flags(f: &mut Fixture, port: u32) {
    f.set_flow_log_flags(port, EP_LOG_ANY);
}

#[test]
fn traces_report_each_stage_and_change_nothing() {
    let mut f = fixture("trstages");
    f.apply_policy(&spec());
    // Logged endpoints and a budget: a trace must still write no flow event and not count.
    let (me, peer) = (f.me, f.peer);
    set_log_flags(&mut f, me);
    set_log_flags(&mut f, peer);
    PolicyMaps::open(f.dp.layout())
        .unwrap()
        .set_ct_budget(100, 10, 0)
        .unwrap();
    let mut flow_events = FlowEvents::open_flow_events(f.dp.layout()).unwrap();
    // One real flow, so a trace of its reply finds it tracked.
    f.ns.run(|| {
        let r =
            f.dp.run_on(Hook::Port, &seg(ME, PEER, 40000, 80, SYN), 1, Some(me));
        assert_eq!(r.unwrap().retval, TC_ACT_REDIRECT);
    });
    let mut logged = Vec::new();
    flow_events.drain_into(&mut logged, 100);
    assert_eq!(logged.len(), 1, "the real packet is logged");
    let before = state(&f);

    f.ns.run(|| {
        // Allowed, local: endpoint, route, conntrack, both security groups, inbound ACL
        // (crossing into a2), budget, delivery, verdict.
        let t =
            f.dp.trace(TraceProgram::Port, me, &seg(ME, PEER, 41000, 80, SYN))
                .unwrap();
        assert_eq!(t.retval, TC_ACT_REDIRECT);
        assert_eq!(
            stages(&t.events),
            [
                TraceStage::Endpoint,
                TraceStage::Route,
                TraceStage::Conntrack,
                TraceStage::SgEgress,
                TraceStage::AclIngress,
                TraceStage::SgIngress,
                TraceStage::CtBudget,
                TraceStage::Deliver,
                TraceStage::Verdict,
            ],
            "{:?}",
            t.events
        );
        let ep = one(&t.events, TraceStage::Endpoint);
        assert_eq!((ep.a, ep.addr), (100, ipv4_mapped(ME)));
        let route = one(&t.events, TraceStage::Route);
        assert_eq!((route.a, route.b), (Forward::Local as u32, peer));
        assert_eq!(one(&t.events, TraceStage::Conntrack).a, 0, "new flow");
        assert_ne!(one(&t.events, TraceStage::SgEgress).a, 0);
        assert_ne!(one(&t.events, TraceStage::SgIngress).a, 0);
        let acl = one(&t.events, TraceStage::AclIngress);
        assert_eq!((acl.a, acl.b), (100, 1), "rule 100 allows");
        let budget = one(&t.events, TraceStage::CtBudget);
        assert_eq!((budget.a, budget.b, budget.c), (10, 1, 1));
        assert_eq!(one(&t.events, TraceStage::Deliver).a, peer);
        assert_eq!(t.verdict(), Some((Action::Redirect as u32, 0)));

        // The tracked reply skips the security groups.
        let t =
            f.dp.trace(
                TraceProgram::Port,
                peer,
                &seg(PEER, ME, 80, 40000, SYN | ACK),
            )
            .unwrap();
        assert_eq!(t.retval, TC_ACT_REDIRECT);
        assert_eq!(one(&t.events, TraceStage::Conntrack).a, 1, "{:?}", t.events);
        assert_eq!(t.stage(TraceStage::SgEgress).count(), 0);
        assert_eq!(t.stage(TraceStage::SgIngress).count(), 0);

        // Security-group deny: no inbound rule for 22, reference 0.
        let t =
            f.dp.trace(TraceProgram::Port, me, &seg(ME, PEER, 41001, 22, SYN))
                .unwrap();
        assert_eq!(t.retval, TC_ACT_SHOT);
        assert_eq!(one(&t.events, TraceStage::SgIngress).a, 0);
        assert_eq!(
            t.verdict(),
            Some((Action::Drop as u32, DropReason::SgIngress as u32))
        );
        assert_eq!(t.stage(TraceStage::Deliver).count(), 0);

        // ACL deny: rule 90, before any security group of the receiver.
        let t =
            f.dp.trace(TraceProgram::Port, me, &seg(ME, PEER, 41002, 81, SYN))
                .unwrap();
        assert_eq!(t.retval, TC_ACT_SHOT);
        let acl = one(&t.events, TraceStage::AclIngress);
        assert_eq!((acl.a, acl.b), (90, 2));
        assert_eq!(t.stage(TraceStage::SgIngress).count(), 0);
        assert_eq!(
            t.verdict(),
            Some((Action::Drop as u32, DropReason::AclIngress as u32))
        );

        // Remote destination: encapsulation toward the peer VTEP; the output frame is the
        // VXLAN packet, which the destination host's underlay ingress traces on.
        let frame = with_macs(&udp(v4(ME, REMOTE), 30000, 53, b"q"), ROUTER, ME_MAC);
        let t = f.dp.trace(TraceProgram::Port, me, &frame).unwrap();
        assert_eq!(t.retval, TC_ACT_REDIRECT);
        let route = one(&t.events, TraceStage::Route);
        assert_eq!(
            (route.a, route.addr),
            (Forward::Remote as u32, ipv4_mapped(VTEP_PEER))
        );
        let encap = one(&t.events, TraceStage::Encap);
        assert_eq!((encap.a, encap.addr), (100, ipv4_mapped(VTEP_PEER)));
        assert_eq!(t.verdict(), Some((Action::Encap as u32, 0)));
        assert_eq!(t.data_out.len(), frame.len() + 50, "VXLAN added");
        assert_eq!(t.data_out[26..30], VTEP_ME, "outer source");
        assert_eq!(t.data_out[30..34], VTEP_PEER, "outer destination");
    });
    assert_eq!(state(&f), before, "traces changed state");
    let mut logged = Vec::new();
    flow_events.drain_into(&mut logged, 100);
    assert_eq!(logged, vec![], "traces write no flow events");
}

#[test]
fn traces_continue_on_the_receiving_host_underlay() {
    let mut f = fixture("trdecap");
    f.apply_policy(&spec());
    let before = state(&f);
    let ul0 = f.ns.ifindex("ul0").unwrap();
    let peer = f.peer;
    let inner = |dport| {
        with_macs(
            &tcp(v4(REMOTE, PEER), 42000, dport, SYN, &[]),
            PEER_MAC,
            ROUTER,
        )
    };
    f.ns.run(|| {
        let frame = dataplane_common::testpkt::vxlan(VTEP_PEER, VTEP_ME, 1, 100, &inner(80));
        let t =
            f.dp.trace(TraceProgram::UnderlayIngress, ul0, &frame)
                .unwrap();
        assert_eq!(t.retval, TC_ACT_REDIRECT, "{:?}", t.events);
        assert_eq!(
            stages(&t.events),
            [
                TraceStage::Endpoint,
                TraceStage::Conntrack,
                TraceStage::AclIngress,
                TraceStage::SgIngress,
                TraceStage::Deliver,
                TraceStage::Verdict,
            ]
        );
        assert_eq!(one(&t.events, TraceStage::Endpoint).addr, ipv4_mapped(PEER));
        assert_eq!(one(&t.events, TraceStage::Deliver).a, peer);
        assert_eq!(t.verdict(), Some((Action::Decap as u32, 0)));
        let frame = dataplane_common::testpkt::vxlan(VTEP_PEER, VTEP_ME, 1, 100, &inner(22));
        let t =
            f.dp.trace(TraceProgram::UnderlayIngress, ul0, &frame)
                .unwrap();
        assert_eq!(t.retval, TC_ACT_SHOT);
        assert_eq!(
            t.verdict(),
            Some((Action::Drop as u32, DropReason::SgIngress as u32))
        );
    });
    assert_eq!(state(&f), before, "traces changed state");
}
