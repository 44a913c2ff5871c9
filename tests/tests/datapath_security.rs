//! Security groups, network ACLs and conntrack in the loaded programs, on crafted frames
//! (BPF_PROG_TEST_RUN), with the rules compiled and installed the way the agent does it.
//!
//! Fixture (`vpc_tests::overlay_fixture`): `me` 10.0.1.10 (port p0, subnet a1) and `peer`
//! 10.0.2.20 (p1, subnet a2) on this host, `remote` 10.0.1.30 (subnet a1) behind the peer
//! VTEP; all in VPC A (VNI 100).

use controlplane::{datapath::PolicyMaps, policy::SecurityGroup};
use dataplane_common::{
    DropReason, Hook,
    conntrack::tcp_flags::{ACK, FIN, SYN},
    testpkt::{tcp, udp, v4, vxlan, with_macs},
};
use serde_json::json;
use vpc_tests::{
    overlay_fixture::{Fixture, ME_MAC, PEER_MAC, PolicySpec, ROUTER, VTEP_ME, VTEP_PEER, fixture},
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT},
};

const ME: [u8; 4] = [10, 0, 1, 10];
const PEER: [u8; 4] = [10, 0, 2, 20];
const REMOTE: [u8; 4] = [10, 0, 1, 30];

fn group(v: serde_json::Value) -> SecurityGroup {
    serde_json::from_value(v).expect("valid security group")
}

/// `web` (peer): inbound tcp/80 from the VPC; `client` (me): no inbound, all outbound.
fn web_and_client() -> PolicySpec {
    PolicySpec {
        security_groups: vec![
            group(json!({"id": "sg-web", "vpc": "vpc-a", "inbound": [
                {"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/16"}]})),
            group(json!({"id": "sg-client", "vpc": "vpc-a"})),
        ],
        memberships: vec![
            ("peer".into(), vec!["sg-web".into()]),
            ("me".into(), vec!["sg-client".into()]),
            ("remote".into(), vec!["sg-client".into()]),
        ],
        ..PolicySpec::default()
    }
}

/// A TCP frame `src` -> `dst` as the sender's port sees it.
fn seg(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mac = if src == ME { ME_MAC } else { PEER_MAC };
    with_macs(&tcp(v4(src, dst), sport, dport, flags, &[]), ROUTER, mac)
}

/// Sends `frame` from port `from`; returns the TC verdict.
fn send(f: &Fixture, from: u32, frame: &[u8]) -> u32 {
    f.dp.run_on(Hook::Port, frame, 1, Some(from))
        .unwrap()
        .retval
}

fn endpoint_drops(f: &Fixture, ifindex: u32, reason: DropReason) -> u64 {
    let maps = PolicyMaps::open(f.dp.layout()).unwrap();
    maps.endpoint_drops()
        .unwrap()
        .get(&(ifindex, reason as u32))
        .map_or(0, |c| c.packets)
}

#[test]
fn security_groups_admit_new_flows_and_replies_pass_without_rules() {
    let mut f = fixture("sgbasic");
    f.apply_policy(&web_and_client());
    f.ns.run(|| {
        // Allowed: client -> web:80, same host (outbound of me and inbound of peer).
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40000, 80, SYN)),
            TC_ACT_REDIRECT
        );
        // The reply passes although `client` has no inbound rule.
        assert_eq!(
            send(&f, f.peer, &seg(PEER, ME, 80, 40000, SYN | ACK)),
            TC_ACT_REDIRECT
        );
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40000, 80, ACK)),
            TC_ACT_REDIRECT
        );
        // Denied: web has no rule for 22; charged to the receiver.
        assert_eq!(send(&f, f.me, &seg(ME, PEER, 40001, 22, SYN)), TC_ACT_SHOT);
        assert_eq!(endpoint_drops(&f, f.peer, DropReason::SgIngress), 1);
        // Denied: a new flow toward the client (no inbound rules at all).
        assert_eq!(
            send(&f, f.peer, &seg(PEER, ME, 80, 40002, SYN)),
            TC_ACT_SHOT
        );
        assert_eq!(endpoint_drops(&f, f.me, DropReason::SgIngress), 1);
        // Conntrack-invalid flags are dropped whatever the rules.
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40003, 80, SYN | FIN)),
            TC_ACT_SHOT
        );
        assert_eq!(endpoint_drops(&f, f.me, DropReason::CtInvalid), 1);
        let stats = f.dp.stats().unwrap();
        assert_eq!(stats.drop(Hook::Port, DropReason::SgIngress).packets, 2);

        // From another host: decapsulated, then web's inbound rules apply.
        let inner = |dport| {
            with_macs(
                &tcp(v4(REMOTE, PEER), 41000 + dport, dport, SYN, &[]),
                PEER_MAC,
                ROUTER,
            )
        };
        let r = f.dp.run(
            Hook::TcIngress,
            &vxlan(VTEP_PEER, VTEP_ME, 1, 100, &inner(80)),
        );
        assert_eq!(r.unwrap().retval, TC_ACT_REDIRECT);
        let r = f.dp.run(
            Hook::TcIngress,
            &vxlan(VTEP_PEER, VTEP_ME, 1, 100, &inner(22)),
        );
        assert_eq!(r.unwrap().retval, TC_ACT_SHOT);
        let stats = f.dp.stats().unwrap();
        assert_eq!(
            stats.drop(Hook::TcIngress, DropReason::SgIngress).packets,
            1
        );
        assert_eq!(endpoint_drops(&f, f.peer, DropReason::SgIngress), 2);
    });
}

#[test]
fn outbound_rules_and_rule_removal_keep_tracked_flows() {
    let mut f = fixture("sgout");
    let mut spec = web_and_client();
    // client may only send tcp/80 out.
    spec.security_groups[1] = group(json!({"id": "sg-client", "vpc": "vpc-a", "outbound": [
        {"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "0.0.0.0/0"}]}));
    f.apply_policy(&spec);
    f.ns.run(|| {
        let dns = with_macs(&udp(v4(ME, REMOTE), 5353, 53, b"q"), ROUTER, ME_MAC);
        assert_eq!(send(&f, f.me, &dns), TC_ACT_SHOT);
        assert_eq!(endpoint_drops(&f, f.me, DropReason::SgEgress), 1);
        // Toward another host: only the sender's outbound rules apply here.
        assert_eq!(
            send(&f, f.me, &seg(ME, REMOTE, 40010, 80, SYN)),
            TC_ACT_REDIRECT,
            "encapsulated"
        );
        // A connection to web.
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40011, 80, SYN)),
            TC_ACT_REDIRECT
        );
    });
    // web's port-80 rule is removed: the tracked connection continues, a new one is refused.
    spec.security_groups[0] = group(json!({"id": "sg-web", "vpc": "vpc-a"}));
    let report = f.apply_policy(&spec);
    assert!(report.rule_sets_written >= 1, "{report:?}");
    f.ns.run(|| {
        assert_eq!(
            send(&f, f.peer, &seg(PEER, ME, 80, 40011, SYN | ACK)),
            TC_ACT_REDIRECT
        );
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40011, 80, ACK)),
            TC_ACT_REDIRECT
        );
        assert_eq!(send(&f, f.me, &seg(ME, PEER, 40012, 80, SYN)), TC_ACT_SHOT);
    });
    // The old rule set is removed on the next pass, once no endpoint uses it.
    let report = f.apply_policy(&spec);
    assert!(report.rule_sets_removed >= 1, "{report:?}");
    assert_eq!(f.apply_policy(&spec).changes(), 0, "idempotent");
}

#[test]
fn acl_order_first_match_and_deny_beats_security_group_allow() {
    let mut f = fixture("aclorder");
    let mut spec = web_and_client();
    let acl = |rules_in: serde_json::Value, rules_out: serde_json::Value| {
        serde_json::from_value(json!({"id": "acl-a2", "vpc": "vpc-a",
            "inbound": rules_in, "outbound": rules_out}))
        .unwrap()
    };
    let allow_all =
        json!([{"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"}]);
    // Inbound: 90 deny tcp/80 from me, 100 allow everything. Deny (lower number) wins.
    spec.network_acls = vec![acl(
        json!([
            {"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"},
            {"rule": 90, "protocol": "tcp", "from_port": 80, "to_port": 80,
             "cidr": "10.0.1.10/32", "action": "deny"}
        ]),
        allow_all.clone(),
    )];
    spec.subnet_acls = vec![("a2".into(), "acl-a2".into())];
    f.apply_policy(&spec);
    f.ns.run(|| {
        assert_eq!(send(&f, f.me, &seg(ME, PEER, 40020, 80, SYN)), TC_ACT_SHOT);
        assert_eq!(endpoint_drops(&f, f.peer, DropReason::AclIngress), 1);
        assert_eq!(endpoint_drops(&f, f.peer, DropReason::SgIngress), 0);
    });
    // Swap the numbers: the allow comes first now, and the SG admits the flow. The ACL is
    // stateless: the reply needs an outbound rule of the peer's subnet, which allows only
    // ephemeral ports.
    spec.network_acls = vec![acl(
        json!([
            {"rule": 80, "protocol": "tcp", "from_port": 80, "to_port": 80,
             "cidr": "10.0.1.10/32", "action": "allow"},
            {"rule": 90, "protocol": "all", "cidr": "0.0.0.0/0", "action": "deny"}
        ]),
        json!([{"rule": 100, "protocol": "tcp", "from_port": 32768, "to_port": 65535,
                "cidr": "0.0.0.0/0", "action": "allow"}]),
    )];
    f.apply_policy(&spec);
    f.ns.run(|| {
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 2000, 80, SYN)),
            TC_ACT_REDIRECT
        );
        // Reply to a port below 32768: denied by the implicit deny of the outbound ACL although
        // conntrack would let it through.
        assert_eq!(
            send(&f, f.peer, &seg(PEER, ME, 80, 2000, SYN | ACK)),
            TC_ACT_SHOT
        );
        assert_eq!(endpoint_drops(&f, f.peer, DropReason::AclEgress), 1);
        // A connection from an ephemeral port gets its reply.
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 50000, 80, SYN)),
            TC_ACT_REDIRECT
        );
        assert_eq!(
            send(&f, f.peer, &seg(PEER, ME, 80, 50000, SYN | ACK)),
            TC_ACT_REDIRECT
        );
        // From another host: the peer subnet's inbound ACL applies after decapsulation
        // (port 81: rule 90 denies).
        let inner = with_macs(
            &tcp(v4(REMOTE, PEER), 50001, 81, SYN, &[]),
            PEER_MAC,
            ROUTER,
        );
        let r =
            f.dp.run(Hook::TcIngress, &vxlan(VTEP_PEER, VTEP_ME, 1, 100, &inner));
        assert_eq!(r.unwrap().retval, TC_ACT_SHOT, "a2's ACL denies port 81");
        assert_eq!(endpoint_drops(&f, f.peer, DropReason::AclIngress), 2);
    });
}

#[test]
fn conntrack_counts_flows_per_vpc_and_gc_removes_expired_ones() {
    let mut f = fixture("ctgc");
    let mut spec = web_and_client();
    spec.conntrack.udp_secs = 1;
    f.apply_policy(&spec);
    f.ns.run(|| {
        for port in 0..20u16 {
            let frame = with_macs(&udp(v4(ME, REMOTE), 30000 + port, 53, b"q"), ROUTER, ME_MAC);
            assert_eq!(send(&f, f.me, &frame), TC_ACT_REDIRECT);
        }
        assert_eq!(
            send(&f, f.me, &seg(ME, PEER, 40030, 80, SYN)),
            TC_ACT_REDIRECT
        );
    });
    let maps = PolicyMaps::open(f.dp.layout()).unwrap();
    let now = controlplane::datapath::policy_maps::now_ns();
    let s = maps.ct_sweep(now, false).unwrap();
    assert_eq!(s.entries, 21);
    assert_eq!(s.per_vni.get(&100), Some(&21));
    assert!(s.pressure() > 0.0);
    // Two seconds later the UDP flows (1 s timeout) have expired; TCP (SYN, 120 s) has not.
    let s = maps.ct_sweep(now + 2_000_000_000, true).unwrap();
    assert_eq!((s.entries, s.expired), (21, 20));
    let s = maps.ct_sweep(now + 2_000_000_000, false).unwrap();
    assert_eq!((s.entries, s.expired), (1, 0));
}

#[test]
fn a_full_conntrack_table_evicts_instead_of_failing() {
    let f = {
        let mut f = vpc_tests::overlay_fixture::fixture_with("ctfull", Some(64));
        f.apply_policy(&web_and_client());
        f
    };
    f.ns.run(|| {
        for port in 0..1000u16 {
            let frame = with_macs(&udp(v4(ME, REMOTE), 20000 + port, 53, b"q"), ROUTER, ME_MAC);
            assert_eq!(send(&f, f.me, &frame), TC_ACT_REDIRECT, "flow {port}");
        }
    });
    let maps = PolicyMaps::open(f.dp.layout()).unwrap();
    let s = maps
        .ct_sweep(controlplane::datapath::policy_maps::now_ns(), false)
        .unwrap();
    assert_eq!(s.capacity, 64);
    assert!(s.entries <= 64 && s.entries > 0, "{s:?}");
}
