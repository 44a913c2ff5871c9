//! End to end: security groups and network ACLs with the real agents on two hosts, real
//! TCP, UDP and ICMP between instances in network namespaces.
//!
//! Topology (`two_vpcs_same_cidr(2)`, VPC A): `a-h0-s1` 10.0.1.10 (host 0) is the client,
//! `a-h1-s2` 10.0.2.20 (host 1) the server, `a-h0-s2` 10.0.2.10 (host 0) a third instance
//! whose group membership changes. Servers: TCP echo on 5001 and 5003, UDP echo on 5002.
//!
//! Proves: allowed flows work, denied ones fail and are counted per endpoint; replies pass
//! without a rule; removing a rule keeps an open connection and blocks new ones; a rule that
//! references a group admits an instance that joins the group and rejects it once it leaves;
//! a network ACL deny beats a security-group allow.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use controlplane::{
    datapath::{PinLayout, PolicyMaps},
    overlay::statefile::StateFile,
};
use dataplane_common::DropReason;
use serde_json::json;
use vpc_tests::{
    netns::{NetNs, ping},
    procs::cli,
    topology::{Mode, Topology, two_vpcs_same_cidr},
};

const CLIENT: &str = "a-h0-s1";
const SERVER: &str = "a-h1-s2";
const JOINER: &str = "a-h0-s2";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 20);

fn build() -> Topology {
    Topology::build(
        two_vpcs_same_cidr(2),
        Mode::Ebpf {
            xdp_mode: "auto".into(),
        },
    )
    .expect("building the topology")
}

/// The topology's state with `f` applied to its JSON form, written for the agents.
fn set_state(t: &Topology, f: impl FnOnce(&mut serde_json::Value)) {
    let doc: StateFile = t.desired_state(t.spec()).unwrap();
    let mut v = serde_json::to_value(&doc).unwrap();
    f(&mut v);
    // The agents would refuse an invalid document; check it here for a clear failure.
    let checked: StateFile = serde_json::from_value(v.clone()).expect("valid state document");
    t.rewrite_state_raw(&serde_json::to_string_pretty(&checked).unwrap())
        .unwrap();
}

/// Puts endpoint `id` into `groups`.
fn member(v: &mut serde_json::Value, id: &str, groups: &[&str]) {
    let eps = v["endpoints"].as_array_mut().unwrap();
    let ep = eps.iter_mut().find(|e| e["id"] == id).unwrap();
    ep["security_groups"] = json!(groups);
}

/// `sg-web` (the server): TCP 5001 and ICMP from the VPC, UDP 5002 from members of
/// `sg-app`. `sg-app` (the client): no inbound rules, all outbound. `sg-other` (the joiner):
/// the same as `sg-app`, but not referenced.
fn groups(web_tcp: bool) -> serde_json::Value {
    let mut web_in = vec![
        json!({"protocol": "icmp", "cidr": "10.0.0.0/16"}),
        json!({"protocol": "udp", "from_port": 5002, "to_port": 5002, "group": "sg-app"}),
    ];
    if web_tcp {
        web_in.push(
            json!({"protocol": "tcp", "from_port": 5001, "to_port": 5001, "cidr": "10.0.0.0/16"}),
        );
    }
    json!([
        {"id": "sg-web", "vpc": "vpc-a", "inbound": web_in},
        {"id": "sg-app", "vpc": "vpc-a"},
        {"id": "sg-other", "vpc": "vpc-a"},
    ])
}

fn policy(v: &mut serde_json::Value, web_tcp: bool, joiner: &[&str]) {
    v["security_groups"] = groups(web_tcp);
    member(v, SERVER, &["sg-web"]);
    member(v, CLIENT, &["sg-app"]);
    member(v, JOINER, joiner);
}

/// Echo servers in `ns` (TCP on 5001 and 5003, UDP on 5002) until `stop`.
fn serve<'s>(s: &'s thread::Scope<'s, '_>, ns: &NetNs, stop: &'s AtomicBool) {
    let (tcp1, tcp3, udp) = ns.run(|| {
        (
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5001)).unwrap(),
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5003)).unwrap(),
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5002)).unwrap(),
        )
    });
    for listener in [tcp1, tcp3] {
        listener.set_nonblocking(true).unwrap();
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        s.spawn(move || {
                            conn.set_nonblocking(false).unwrap();
                            conn.set_read_timeout(Some(Duration::from_millis(200)))
                                .unwrap();
                            let mut buf = [0u8; 4096];
                            while !stop.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if conn.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e) if is_timeout(&e) => {}
                                    Err(_) => break,
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
    }
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
}

/// Sets the servers' stop flag when dropped, so a failing assertion (which unwinds through
/// the scope) does not leave the scope waiting for the servers forever.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A TCP connection from `ns` to the server's `port` (None if it cannot be opened in 1 s).
fn connect(ns: &NetNs, port: u16) -> Option<TcpStream> {
    ns.run(|| {
        let conn = TcpStream::connect_timeout(
            &SocketAddr::from((SERVER_IP, port)),
            Duration::from_secs(1),
        )
        .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Some(conn)
    })
}

/// Whether `conn` still carries data both ways.
fn echoes(conn: &mut TcpStream) -> bool {
    let msg = b"still there?";
    if conn.write_all(msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).is_ok() && &buf == msg
}

/// A UDP round trip from `ns` (a fresh source port: a new flow) to the server's 5002.
fn udp_round_trip(ns: &NetNs) -> bool {
    ns.run(|| {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        sock.send_to(b"ping", (SERVER_IP, 5002)).unwrap();
        let mut buf = [0u8; 16];
        matches!(sock.recv_from(&mut buf), Ok((4, _)))
    })
}

/// Polls `probe` until it returns `want` (the agents apply a new document within a few
/// hundred milliseconds); fails after 15 s.
fn eventually(what: &str, want: bool, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while probe() != want {
        assert!(Instant::now() < deadline, "{what}: still {}", !want);
        thread::sleep(Duration::from_millis(100));
    }
}

/// Drops of `reason` charged to `endpoint`'s port on `host`.
fn endpoint_drops(t: &Topology, host: usize, endpoint: &str, reason: DropReason) -> u64 {
    let maps = PolicyMaps::open(&PinLayout::new(t.pin_dir(host).unwrap())).unwrap();
    let port = t.port(endpoint);
    let ifindex = t.host(host).ifindex(&port.ifname).unwrap();
    maps.endpoint_drops()
        .unwrap()
        .get(&(ifindex, reason as u32))
        .map_or(0, |c| c.packets)
}

/// Builds the topology, starts the echo servers in the server's namespace and runs `body`;
/// the servers stop when it returns or fails.
fn with_servers(body: impl FnOnce(&Topology)) {
    let t = build();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        serve(s, t.instance(SERVER), &stop);
        let _stop = StopOnDrop(&stop);
        body(&t);
    });
}

#[test]
fn allowed_flows_work_denied_ones_fail_and_replies_need_no_rule() {
    with_servers(|t| {
        // Before any group is set, every instance is in the VPC's default group.
        assert!(connect(t.instance(CLIENT), 5003).is_some(), "default group");
        set_state(t, |v| policy(v, true, &["sg-other"]));
        eventually("tcp 5003 refused once sg-web applies", false, || {
            connect(t.instance(CLIENT), 5003).is_some()
        });

        // Allowed, across hosts: TCP 5001, ICMP, UDP 5002 (group reference). The replies
        // reach the client, whose group has no inbound rule at all.
        let mut conn = connect(t.instance(CLIENT), 5001).expect("tcp 5001 allowed");
        assert!(echoes(&mut conn));
        assert_eq!(ping(t.instance(CLIENT), "10.0.2.20", 2).unwrap(), 2);
        assert!(
            udp_round_trip(t.instance(CLIENT)),
            "udp from a member of sg-app"
        );

        // Denied: TCP 5003 (no rule), anything toward the client (no inbound rules), UDP
        // from a non-member.
        let before = endpoint_drops(t, 1, SERVER, DropReason::SgIngress);
        assert!(connect(t.instance(CLIENT), 5003).is_none());
        assert!(endpoint_drops(t, 1, SERVER, DropReason::SgIngress) > before);
        assert_eq!(ping(t.instance(SERVER), "10.0.1.10", 1).unwrap(), 0);
        assert!(endpoint_drops(t, 0, CLIENT, DropReason::SgIngress) >= 1);
        assert!(!udp_round_trip(t.instance(JOINER)), "udp from a non-member");
    });
}

#[test]
fn rule_removal_keeps_open_connections_and_group_membership_is_followed() {
    with_servers(|t| {
        set_state(t, |v| policy(v, true, &["sg-other"]));
        eventually("tcp 5003 refused", false, || {
            connect(t.instance(CLIENT), 5003).is_some()
        });
        let mut conn = connect(t.instance(CLIENT), 5001).expect("tcp 5001 allowed");
        assert!(echoes(&mut conn));

        // The TCP rule goes: the open connection lives on, a new one is refused.
        set_state(t, |v| policy(v, false, &["sg-other"]));
        eventually(
            "new tcp 5001 refused after the rule is removed",
            false,
            || connect(t.instance(CLIENT), 5001).is_some(),
        );
        for _ in 0..3 {
            assert!(echoes(&mut conn), "the tracked connection continues");
        }

        // The joiner enters sg-app: the rule referencing sg-app admits it ...
        assert!(!udp_round_trip(t.instance(JOINER)));
        set_state(t, |v| policy(v, false, &["sg-other", "sg-app"]));
        eventually("udp admitted after joining sg-app", true, || {
            udp_round_trip(t.instance(JOINER))
        });
        // ... and rejects it once it leaves.
        set_state(t, |v| policy(v, false, &["sg-other"]));
        eventually("udp rejected after leaving sg-app", false, || {
            udp_round_trip(t.instance(JOINER))
        });
    });
}

#[test]
fn network_acl_deny_beats_security_group_allow() {
    with_servers(|t| {
        set_state(t, |v| policy(v, true, &["sg-other"]));
        eventually("tcp 5001 allowed", true, || {
            connect(t.instance(CLIENT), 5001).is_some()
        });
        // The server's subnet gets an ACL: rule 50 denies TCP 5001 from the client, rule 100
        // allows everything, both ways.
        set_state(t, |v| {
            policy(v, true, &["sg-other"]);
            v["network_acls"] = json!([{
                "id": "acl-a2", "vpc": "vpc-a",
                "inbound": [
                    {"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"},
                    {"rule": 50, "protocol": "tcp", "from_port": 5001, "to_port": 5001,
                     "cidr": "10.0.1.10/32", "action": "deny"}
                ],
                "outbound": [
                    {"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"}
                ]
            }]);
            let subnets = v["subnets"].as_array_mut().unwrap();
            let a2 = subnets.iter_mut().find(|s| s["id"] == "subnet-a2").unwrap();
            a2["network_acl"] = json!("acl-a2");
        });
        eventually("tcp 5001 denied by the ACL", false, || {
            connect(t.instance(CLIENT), 5001).is_some()
        });
        assert!(endpoint_drops(t, 1, SERVER, DropReason::AclIngress) >= 1);
        // The CLI shows the per-port drop and the tracked flows of VPC A (VNI 100).
        let pins = t.pin_dir(1).unwrap().to_str().unwrap().to_owned();
        let drops = cli(&["datapath", "drops", "--pin-dir", &pins]).unwrap();
        assert!(drops.contains("acl_ingress"), "{drops}");
        let ct = cli(&["datapath", "conntrack", "--flows", "--pin-dir", &pins]).unwrap();
        assert!(
            ct.contains("pressure") && ct.lines().any(|l| l.starts_with("100 ")),
            "{ct}"
        );
        // Everything else the groups allow still works (rule 100).
        assert_eq!(ping(t.instance(CLIENT), "10.0.2.20", 1).unwrap(), 1);
        assert!(udp_round_trip(t.instance(CLIENT)));
    });
}
