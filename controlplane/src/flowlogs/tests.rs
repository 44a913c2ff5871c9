//! Aggregation, record building and loss accounting over synthetic events.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use dataplane_common::{
    DropReason,
    filter::ipv4_mapped,
    flowlog::{DECISION_NONE, Decision, FLOW_ACCEPT, FLOW_REJECT, FlowEvent},
};

use super::{aggregate::*, clock::MonoToWall, record, stats::FlowLogStats};
use crate::overlay::flowlog::{FlowLogDoc, TrafficType};

const SEC: u64 = 1_000_000_000;

/// Monotonic 100 s is Unix 1 700 000 100 s.
fn clock() -> MonoToWall {
    MonoToWall::from_pair(100 * SEC, 1_700_000_100 * i128::from(SEC))
}

fn fl(id: &str, resource: &str, t: TrafficType, window: u32) -> FlowLogDoc {
    FlowLogDoc {
        id: id.into(),
        account: "111122223333".into(),
        resource: resource.into(),
        vpc: "vpc-1".into(),
        traffic_type: t,
        window_secs: window,
    }
}

/// i-a (port 10, subnet-1) and i-b (port 20, subnet-2), both in vpc-1; the VPC log
/// (index 0) covers both, the subnet-1 log (index 1, REJECT only) only i-a.
fn context() -> FlowContext {
    let ep = |id: &str, subnet: &str, groups: &[&str], logs: Vec<usize>| LocalEndpoint {
        instance: id.into(),
        subnet: subnet.into(),
        vpc: "vpc-1".into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        acl: Some(format!("acl-{subnet}")),
        flow_logs: logs,
    };
    FlowContext {
        host: "h1".into(),
        flow_logs: vec![
            fl("fl-vpc", "vpc-1", TrafficType::All, 2),
            fl("fl-sub", "subnet-1", TrafficType::Reject, 5),
        ],
        endpoints: [
            (
                10,
                ep("i-0000000000000000a", "subnet-1", &["sg-web"], vec![0, 1]),
            ),
            (
                20,
                ep("i-0000000000000000b", "subnet-2", &["sg-db"], vec![0]),
            ),
        ]
        .into_iter()
        .collect(),
        rules: Arc::new(super::rules::RuleBook::build(
            &serde_json::from_str(
                r#"{"security_groups": [
                    {"id": "sg-web", "vpc": "vpc-1"},
                    {"id": "sg-db", "vpc": "vpc-1", "outbound": [], "inbound": [
                        {"protocol": 6, "from_port": 5432, "to_port": 5432, "cidr": "10.0.1.0/24"}
                    ]}
                ]}"#,
            )
            .unwrap(),
        )),
    }
}

fn ip(s: &str) -> [u8; 16] {
    ipv4_mapped(s.parse::<std::net::Ipv4Addr>().unwrap().octets())
}

#[allow(clippy::too_many_arguments)]
fn ev(ts: u64, out: u32, inn: u32, dport: u16, action: u8, reason: u32, d: Decision) -> FlowEvent {
    FlowEvent {
        ts_ns: ts,
        vni: 100,
        out_ifindex: out,
        in_ifindex: inn,
        bytes: 100,
        src: ip("10.0.1.10"),
        dst: ip("10.0.2.20"),
        src_port: 40000,
        dst_port: dport,
        proto: 6,
        action,
        _pad: [0; 2],
        reason,
        decision: d,
    }
}

fn dec(sg_out: u32, acl_out: u32, acl_in: u32, sg_in: u32, flags: u8, tracked: bool) -> Decision {
    Decision {
        sg_out,
        acl_out,
        acl_in,
        sg_in,
        tcp_flags: flags,
        tracked: u8::from(tracked),
        _pad: [0; 2],
    }
}

fn agg(stats: &Arc<FlowLogStats>) -> Aggregator {
    Aggregator::new(Arc::new(context()), Arc::clone(stats), 100 * SEC)
}

#[test]
fn aws_tcp_flags_report_fin_syn_rst_and_syn_ack_only() {
    use crate::flowlogs::aggregate::aws_tcp_flags;
    // FIN 1, SYN 2, RST 4, SYN-ACK 18; ACK (16), PSH (8), URG (32) alone: 0.
    for (header, aws) in [
        (0x02, 2),
        (0x12, 18),
        (0x10, 0),
        (0x18, 0),
        (0x11, 1),
        (0x14, 4),
        (0x20, 0),
    ] {
        assert_eq!(aws_tcp_flags(header), aws, "{header:#x}");
    }
    // A SYN and a later ACK OR-ed: 2, not 18 (no SYN-ACK was seen).
    assert_eq!(aws_tcp_flags(0x02) | aws_tcp_flags(0x10), 2);
}

#[test]
fn local_pair_gives_an_egress_and_an_ingress_record_with_their_rules() {
    let stats = Arc::new(FlowLogStats::default());
    let mut a = agg(&stats);
    let n = DECISION_NONE;
    // SYN then two tracked ACKs, 0.5 s apart.
    a.add(&ev(
        100 * SEC,
        10,
        20,
        5432,
        FLOW_ACCEPT,
        0,
        dec(3, 100, 200, 7, 0x02, false),
    ));
    a.add(&ev(
        100 * SEC + SEC / 2,
        10,
        20,
        5432,
        FLOW_ACCEPT,
        0,
        dec(n, 100, 200, n, 0x10, true),
    ));
    a.add(&ev(
        101 * SEC + SEC / 2,
        10,
        20,
        5432,
        FLOW_ACCEPT,
        0,
        dec(n, 100, 200, n, 0x10, true),
    ));
    // Not due before the 2 s window ends.
    assert_eq!(a.next_due(), Some(102 * SEC));
    assert!(a.flush(101 * SEC, &clock(), false).is_empty());
    let out = a.flush(102 * SEC, &clock(), false);
    // One record per interface and 5-tuple (AWS): the rules of the SYN, the packets of the
    // whole connection, AWS's TCP flags (SYN 2; ACK alone is not reported).
    let summary: Vec<(String, String, u64, String, u8)> = out
        .iter()
        .map(|r| {
            (
                r.instance_id.clone(),
                r.flow_direction.clone(),
                r.packets,
                r.rule.clone(),
                r.tcp_flags,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "i-0000000000000000a".into(),
                "egress".into(),
                3,
                "sg-web egress all to 0.0.0.0/0; acl-subnet-1 rule 100 allow".into(),
                0x02
            ),
            (
                "i-0000000000000000b".into(),
                "ingress".into(),
                3,
                "sg-db ingress tcp 5432 from 10.0.1.0/24; acl-subnet-2 rule 200 allow".into(),
                0x02
            ),
        ]
    );
    let r = &out[0];
    assert_eq!((r.start, r.end), (1_700_000_100, 1_700_000_101));
    assert_eq!(r.bytes, 300);
    assert_eq!(r.interface_id, "eni-0000000000000000a");
    assert_eq!(
        (r.action.as_str(), r.log_status.as_str(), r.reason.as_str()),
        ("ACCEPT", record::OK, "")
    );
    assert_eq!(
        (r.srcaddr.as_str(), r.dstaddr.as_str()),
        ("10.0.1.10", "10.0.2.20")
    );
    assert_eq!((r.srcport, r.dstport, r.protocol), (40000, 5432, 6));
    assert_eq!(
        (
            r.account_id.as_str(),
            r.vpc_id.as_str(),
            r.subnet_id.as_str()
        ),
        ("111122223333", "vpc-1", "subnet-1")
    );
    // The subnet log is REJECT only: nothing.
    assert!(out.iter().all(|r| r.flow_log_id == "fl-vpc"));
    assert_eq!(stats.records.load(Relaxed), 2);
    assert_eq!(a.held(), 0);
    // A later window with only tracked packets of the connection says so.
    a.add(&ev(
        102 * SEC + SEC / 2,
        10,
        20,
        5432,
        FLOW_ACCEPT,
        0,
        dec(n, 100, 200, n, 0x11, true),
    ));
    let out = a.flush(104 * SEC, &clock(), false);
    let rules: Vec<(&str, u8)> = out.iter().map(|r| (r.rule.as_str(), r.tcp_flags)).collect();
    assert_eq!(
        rules,
        [
            ("tracked; acl-subnet-1 rule 100 allow", 1),
            ("tracked; acl-subnet-2 rule 200 allow", 1)
        ]
    );
}

#[test]
fn rejects_name_the_rule_and_reason_on_the_side_that_dropped() {
    let stats = Arc::new(FlowLogStats::default());
    let mut a = agg(&stats);
    let n = DECISION_NONE;
    // The receiver's security group drops: the sender's side admitted it.
    a.add(&ev(
        100 * SEC,
        10,
        20,
        22,
        FLOW_REJECT,
        DropReason::SgIngress.as_u32(),
        dec(3, 100, 200, 0, 0x02, false),
    ));
    // The sender's ACL drops (rule 90): the receiver never sees it.
    a.add(&ev(
        100 * SEC,
        10,
        20,
        23,
        FLOW_REJECT,
        DropReason::AclEgress.as_u32(),
        dec(3, 90, n, n, 0x02, false),
    ));
    // The implicit ACL deny (rule 0, "*") on a packet to a remote host.
    a.add(&ev(
        100 * SEC,
        10,
        0,
        24,
        FLOW_REJECT,
        DropReason::AclEgress.as_u32(),
        dec(3, 0, n, n, 0x02, false),
    ));
    let out = a.flush(0, &clock(), true);
    let rows: Vec<(&str, &str, u16, &str, &str, &str)> = out
        .iter()
        .map(|r| {
            (
                r.flow_log_id.as_str(),
                r.flow_direction.as_str(),
                r.dstport,
                r.action.as_str(),
                r.rule.as_str(),
                r.reason.as_str(),
            )
        })
        .collect();
    let mut want = vec![
        (
            "fl-vpc",
            "egress",
            22,
            "ACCEPT",
            "sg-web egress all to 0.0.0.0/0; acl-subnet-1 rule 100 allow",
            "",
        ),
        (
            "fl-vpc",
            "egress",
            23,
            "REJECT",
            "acl-subnet-1 rule 90 deny",
            "acl_egress",
        ),
        (
            "fl-vpc",
            "egress",
            24,
            "REJECT",
            "acl-subnet-1 rule * deny",
            "acl_egress",
        ),
        (
            "fl-vpc",
            "ingress",
            22,
            "REJECT",
            "sg-db ingress: no rule allows",
            "sg_ingress",
        ),
        (
            "fl-sub",
            "egress",
            23,
            "REJECT",
            "acl-subnet-1 rule 90 deny",
            "acl_egress",
        ),
        (
            "fl-sub",
            "egress",
            24,
            "REJECT",
            "acl-subnet-1 rule * deny",
            "acl_egress",
        ),
    ];
    let mut got = rows.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn icmp_ports_are_zero_and_unknown_ports_are_counted() {
    let stats = Arc::new(FlowLogStats::default());
    let mut a = agg(&stats);
    let mut e = ev(100 * SEC, 10, 99, 0x0800, FLOW_ACCEPT, 0, Decision::EMPTY);
    e.proto = 1;
    a.add(&e);
    let out = a.flush(0, &clock(), true);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].srcport, out[0].dstport, out[0].protocol), (0, 0, 1));
    assert_eq!(out[0].rule, "");
    assert_eq!(stats.unmatched.load(Relaxed), 1);
}

#[test]
fn losses_mark_the_window_skipdata_with_the_count() {
    let stats = Arc::new(FlowLogStats::default());
    let mut a = agg(&stats);
    a.add(&ev(100 * SEC, 10, 0, 80, FLOW_ACCEPT, 0, Decision::EMPTY));
    stats.kernel_lost.store(5, Relaxed);
    let out = a.flush(102 * SEC, &clock(), false);
    // fl-vpc: its record is SKIPDATA with the count.
    assert_eq!(out[0].flow_log_id, "fl-vpc");
    assert_eq!(
        (out[0].log_status.as_str(), out[0].skipped_events),
        (record::SKIPDATA, 5)
    );
    // fl-sub's window (5 s) is not over yet; when it is, it reports the loss without
    // traffic as one SKIPDATA record.
    assert_eq!(out.len(), 1);
    let later = a.flush(105 * SEC, &clock(), false);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].flow_log_id, "fl-sub");
    assert_eq!(
        (
            later[0].log_status.as_str(),
            later[0].skipped_events,
            later[0].packets
        ),
        (record::SKIPDATA, 5, 0)
    );
    assert!(later[0].v2_line().ends_with("SKIPDATA"));
    // The next windows of fl-vpc (105 s to 107 s) are clean again.
    a.add(&ev(106 * SEC, 10, 0, 80, FLOW_ACCEPT, 0, Decision::EMPTY));
    let clean = a.flush(107 * SEC, &clock(), false);
    assert_eq!(clean.len(), 1);
    assert_eq!(
        (clean[0].log_status.as_str(), clean[0].skipped_events),
        (record::OK, 0)
    );
}

#[test]
fn a_full_table_drops_and_counts_instead_of_growing() {
    let stats = Arc::new(FlowLogStats::default());
    let mut a = agg(&stats).with_max_entries(2);
    for port in 1..=5 {
        a.add(&ev(100 * SEC, 10, 0, port, FLOW_ACCEPT, 0, Decision::EMPTY));
    }
    assert_eq!(a.held(), 2);
    assert_eq!(stats.agent_dropped.load(Relaxed), 3);
    assert_eq!(stats.lost(), 3);
    let out = a.flush(0, &clock(), true);
    // fl-vpc's two records, and fl-sub's window without traffic reports the loss too.
    assert_eq!(out.len(), 3);
    assert_eq!((out[2].flow_log_id.as_str(), out[2].packets), ("fl-sub", 0));
    assert!(
        out.iter()
            .all(|r| r.skipped_events == 3 && r.log_status == record::SKIPDATA)
    );
}

#[test]
fn a_changed_context_ends_the_windows_and_an_equal_one_does_not() {
    let stats = Arc::new(FlowLogStats::default());
    let mut a = agg(&stats);
    a.add(&ev(100 * SEC, 10, 0, 80, FLOW_ACCEPT, 0, Decision::EMPTY));
    assert!(
        a.set_context(Arc::new(context()), 101 * SEC, &clock())
            .is_empty()
    );
    assert_eq!(a.held(), 1);
    let mut other = context();
    other.flow_logs.truncate(1);
    for ep in other.endpoints.values_mut() {
        ep.flow_logs.retain(|&i| i == 0);
    }
    let out = a.set_context(Arc::new(other), 101 * SEC, &clock());
    assert_eq!(out.len(), 1);
    assert_eq!(a.held(), 0);
    assert_eq!(a.next_due(), Some(103 * SEC));
    // With no flow logs at all nothing is held and nothing is due.
    let none = a.set_context(Arc::new(FlowContext::default()), 101 * SEC, &clock());
    assert!(none.is_empty());
    a.add(&ev(100 * SEC, 10, 20, 80, FLOW_ACCEPT, 0, Decision::EMPTY));
    assert_eq!((a.held(), a.next_due()), (0, None));
}

#[test]
fn the_consumer_thread_drains_aggregates_and_flushes_on_stop() {
    use std::sync::atomic::AtomicBool;
    let stats = Arc::new(FlowLogStats::default());
    let mut src = super::VecSource::default();
    for i in 0..1000u64 {
        src.events.push_back(ev(
            super::clock::monotonic_ns() + i,
            10,
            0,
            80,
            FLOW_ACCEPT,
            0,
            Decision::EMPTY,
        ));
    }
    src.lost = 0;
    let (tx, rx) = std::sync::mpsc::channel();
    tx.send(Arc::new(context())).unwrap();
    let stop = AtomicBool::new(true);
    let mut got = Vec::new();
    super::consumer::run(src, &rx, &stats, &stop, |r| got.extend(r));
    assert_eq!(stats.events.load(Relaxed), 1000);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].packets, 1000);
}

#[test]
fn the_context_comes_from_the_document_and_this_hosts_ports() {
    use crate::overlay::statefile::StateFile;
    let doc: StateFile = serde_json::from_str(
        r#"{
      "vpcs": [{"id": "vpc-1", "vni": 100, "cidr": "10.0.0.0/16"}],
      "subnets": [
        {"id": "subnet-1", "vpc": "vpc-1", "cidr": "10.0.1.0/24", "network_acl": "acl-1"},
        {"id": "subnet-2", "vpc": "vpc-1", "cidr": "10.0.2.0/24", "network_acl": "acl-1"}
      ],
      "hosts": [{"id": "h0", "vtep": "192.168.77.1"}, {"id": "h1", "vtep": "192.168.77.2"}],
      "endpoints": [
        {"id": "i-a", "subnet": "subnet-1", "host": "h0", "ip": "10.0.1.10",
         "mac": "02:00:00:01:00:01", "ifname": "pa"},
        {"id": "i-b", "subnet": "subnet-2", "host": "h0", "ip": "10.0.2.10",
         "mac": "02:00:00:01:00:02", "ifname": "pb", "security_groups": ["sg-b"]},
        {"id": "i-c", "subnet": "subnet-1", "host": "h1", "ip": "10.0.1.11",
         "mac": "02:00:00:01:00:03", "ifname": "pc"}
      ],
      "security_groups": [
        {"id": "sg-d", "vpc": "vpc-1", "default": true},
        {"id": "sg-b", "vpc": "vpc-1"}
      ],
      "flow_logs": [
        {"id": "fl-1", "account": "a", "resource": "subnet-1", "vpc": "vpc-1",
         "traffic_type": "REJECT", "window_secs": 1}
      ]
    }"#,
    )
    .unwrap();
    let view = doc
        .host_view("h0", |n| match n {
            "pa" => Some(7),
            "pb" => Some(8),
            _ => None,
        })
        .unwrap();
    // Only the subnet's local instance is flagged, with REJECT only.
    assert_eq!(
        view.state.flow_log_flags,
        [
            ("i-a".to_owned(), dataplane_common::flowlog::EP_LOG_REJECT),
            ("i-c".to_owned(), dataplane_common::flowlog::EP_LOG_REJECT),
        ]
        .into_iter()
        .collect()
    );
    let ctx = FlowContext::build(&doc, &view.state, "h0");
    assert_eq!(ctx.endpoints.len(), 1, "{ctx:?}");
    let a = &ctx.endpoints[&7];
    assert_eq!(
        (
            a.instance.as_str(),
            a.subnet.as_str(),
            a.vpc.as_str(),
            a.acl.as_deref()
        ),
        ("i-a", "subnet-1", "vpc-1", Some("acl-1"))
    );
    // No groups of its own: the VPC's default group.
    assert_eq!(a.groups, vec!["sg-d".to_owned()]);
    assert_eq!(a.flow_logs, vec![0]);
    assert!(ctx.same_config(&FlowContext::build(&doc, &view.state, "h0")));
}
