//! End to end: several hosts in network namespaces joined by a fabric, the real agent on each
//! host, instances of two VPCs with the same CIDR, real traffic.
//!
//! Proves: ping and TCP work same-subnet, cross-subnet, same-host and cross-host; nothing
//! crosses between VPCs although their addresses are identical; spoofed VXLAN (unknown VTEP,
//! wrong VNI) is dropped and counted; the underlay carries standard VXLAN that tshark decodes,
//! with each VPC's VNI; the datapath keeps forwarding while the agent is down and a restarted
//! agent applies state changes.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Stdio,
    thread,
    time::Duration,
};

use controlplane::datapath::{PinLayout, PinnedMaps};
use dataplane_common::{
    DropReason, Hook,
    testpkt::{icmp4_echo, with_macs},
};
use vpc_tests::{
    netns::{NetNs, ping},
    topology::{InstanceDef, Mode, Topology, two_vpcs_same_cidr},
};

/// Bytes each TCP check sends: enough for TSO/GSO super-packets through encap and decap.
const TCP_BYTES: usize = 8 << 20;

fn build(hosts: usize, extra: &[InstanceDef]) -> Topology {
    let mut spec = two_vpcs_same_cidr(hosts);
    spec.instances.extend_from_slice(extra);
    Topology::build(
        spec,
        Mode::Ebpf {
            xdp_mode: "auto".into(),
        },
    )
    .expect("building the topology")
}

/// ICMP echo requests the namespace's stack has received (`net/snmp` is per netns; read
/// through `thread-self`, since `/proc/net` follows the main thread's namespace).
fn in_echos(ns: &NetNs) -> u64 {
    let snmp = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap());
    let mut lines = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InEchos")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Sends `TCP_BYTES` from `client` to `server` (listening on `ip`), which answers with the
/// count it received; returns that count.
fn tcp_transfer(t: &Topology, client: &str, server: &str) -> usize {
    let ip = t.instance_ip(server);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            t.instance(server).run(|| {
                let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5001)).unwrap();
                tx.send(()).unwrap();
                let (mut conn, _) = listener.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0usize;
                while total < TCP_BYTES {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                conn.write_all(&(total as u64).to_be_bytes()).unwrap();
            })
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.instance(client).run(|| {
            let addr = SocketAddr::from((ip, 5001));
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{client} -> {server} ({ip}): connect: {e}"));
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            conn.write_all(&vec![0x5a; TCP_BYTES]).unwrap();
            let mut count = [0u8; 8];
            conn.read_exact(&mut count).unwrap();
            u64::from_be_bytes(count) as usize
        })
    })
}

fn drops(t: &Topology, host: usize, hook: Hook, reason: DropReason) -> u64 {
    let maps = PinnedMaps::open(&PinLayout::new(t.pin_dir(host).unwrap())).unwrap();
    maps.stats().unwrap().drop(hook, reason).packets
}

#[test]
fn vpcs_with_the_same_cidr_talk_within_and_never_across() {
    // An instance only VPC B has: VPC A must not reach its address.
    let only_b = InstanceDef {
        name: "b-h1-only".into(),
        subnet: "subnet-b1".into(),
        host: 1,
        ip: Ipv4Addr::new(10, 0, 1, 99),
    };
    let t = build(3, &[only_b]);
    let names: Vec<String> = t.instance_names().map(str::to_owned).collect();

    // Every pair within a VPC: same/cross subnet, same/cross host.
    for src in &names {
        for dst in &names {
            let same_vpc = src[..1] == dst[..1];
            if src == dst || !same_vpc {
                continue;
            }
            let ip = t.instance_ip(dst).to_string();
            let got = ping(t.instance(src), &ip, 1).unwrap();
            assert_eq!(got, 1, "ping {src} -> {dst} ({ip})");
        }
    }

    // Identical addresses: a-h0-s1 pinging 10.0.1.20 reaches a-h1-s1, never b-h1-s1.
    let (a, b) = (t.instance("a-h1-s1"), t.instance("b-h1-s1"));
    let (a0, b0) = (in_echos(a), in_echos(b));
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.1.20", 3).unwrap(), 3);
    assert_eq!(in_echos(a) - a0, 3, "VPC A's 10.0.1.20 answered");
    assert_eq!(in_echos(b) - b0, 0, "VPC B's 10.0.1.20 saw nothing");

    // An address only VPC B has: no ARP answer, nothing delivered, the drop is counted.
    let only = t.instance("b-h1-only");
    let before = in_echos(only);
    let unanswered = drops(&t, 0, Hook::Port, DropReason::ArpUnanswered);
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.1.99", 2).unwrap(), 0);
    assert_eq!(in_echos(only), before);
    assert!(drops(&t, 0, Hook::Port, DropReason::ArpUnanswered) > unanswered);
    // ... and VPC B reaches it fine.
    assert_eq!(ping(t.instance("b-h0-s1"), "10.0.1.99", 1).unwrap(), 1);

    // TCP (GSO-sized writes): same host cross subnet, cross host same subnet, cross host
    // cross subnet, in both VPCs.
    for (c, s) in [
        ("a-h0-s1", "a-h0-s2"),
        ("a-h0-s1", "a-h1-s1"),
        ("a-h2-s2", "a-h0-s1"),
        ("b-h1-s2", "b-h2-s1"),
    ] {
        assert_eq!(tcp_transfer(&t, c, s), TCP_BYTES, "TCP {c} -> {s}");
    }
}

#[test]
fn underlay_carries_standard_vxlan_and_spoofed_vxlan_is_dropped() {
    let t = build(2, &[]);
    // Warm up ARP so the capture holds only the pings below.
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.1.20", 1).unwrap(), 1);
    assert_eq!(ping(t.instance("b-h0-s1"), "10.0.1.20", 1).unwrap(), 1);

    // tshark on the fabric side of host 0's underlay link decodes VXLAN with both VNIs.
    let mut cap = t.fabric().command("timeout");
    cap.args([
        "15",
        "tshark",
        "-n",
        "-l",
        "-i",
        "u0",
        "-f",
        "udp port 4789",
        "-c",
        "8",
        "-T",
        "fields",
        "-e",
        "vxlan.vni",
        "-e",
        "ip.src",
        "-e",
        "udp.dstport",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let cap = t.fabric().spawn(cap).unwrap();
    thread::sleep(Duration::from_secs(2));
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.1.20", 2).unwrap(), 2);
    assert_eq!(ping(t.instance("b-h0-s1"), "10.0.1.20", 2).unwrap(), 2);
    let mut cap = cap;
    let status = cap.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(status.is_some(), "tshark did not finish");
    let mut out = String::new();
    cap.child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let vnis: Vec<&str> = out.lines().filter_map(|l| l.split('\t').next()).collect();
    assert!(vnis.contains(&"100"), "VNI 100 (vpc-a) on the wire: {out}");
    assert!(vnis.contains(&"200"), "VNI 200 (vpc-b) on the wire: {out}");
    assert!(vnis.iter().all(|v| *v == "100" || *v == "200"), "{out}");
    assert!(out.lines().all(|l| l.ends_with("\t4789")), "{out}");

    // Spoofed VXLAN to host 0's VTEP, with a valid inner echo request for a-h0-s1.
    let target = t.instance("a-h0-s1");
    let inner = with_macs(
        &icmp4_echo(
            Ipv4Addr::new(10, 0, 1, 20),
            Ipv4Addr::new(10, 0, 1, 10),
            9,
            1,
        ),
        [2, 0, 0, 0, 0, 0],
        [2, 0x76, 0x70, 0x63, 0, 1],
    );
    let vxlan = |vni: u32| {
        let mut p = vec![0x08, 0, 0, 0];
        p.extend_from_slice(&(vni << 8).to_be_bytes());
        p.extend_from_slice(&inner);
        p
    };
    let send = |ns: &NetNs, src: Option<Ipv4Addr>, payload: Vec<u8>| {
        ns.run(move || {
            let bind = src.unwrap_or(Ipv4Addr::UNSPECIFIED);
            let sock = UdpSocket::bind((bind, 0)).unwrap();
            for _ in 0..5 {
                sock.send_to(&payload, ("192.168.77.1", 4789)).unwrap();
            }
        })
    };
    let echos = in_echos(target);
    let (vtep0, vni0) = (
        drops(&t, 0, Hook::Xdp, DropReason::UnknownVtep),
        drops(&t, 0, Hook::Xdp, DropReason::UnknownVni),
    );
    // From an address that is no VTEP (the fabric itself).
    t.fabric()
        .ip(&["addr", "add", "192.168.77.200/24", "dev", "br0"])
        .unwrap();
    send(
        t.fabric(),
        Some(Ipv4Addr::new(192, 168, 77, 200)),
        vxlan(100),
    );
    // From a real VTEP (host 1), with a VNI no VPC has.
    send(t.host(1), Some(Ipv4Addr::new(192, 168, 77, 2)), vxlan(999));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(drops(&t, 0, Hook::Xdp, DropReason::UnknownVtep) - vtep0, 5);
    assert_eq!(drops(&t, 0, Hook::Xdp, DropReason::UnknownVni) - vni0, 5);
    assert_eq!(in_echos(target), echos, "nothing spoofed was delivered");
}

#[test]
fn forwarding_survives_the_agent_and_changes_apply_after_restart() {
    let mut t = build(2, &[]);
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.2.20", 1).unwrap(), 1);
    t.take_agent(0).unwrap().crash().unwrap();
    t.take_agent(1).unwrap().crash().unwrap();
    // No agent anywhere: pinned programs and maps keep forwarding.
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.2.20", 2).unwrap(), 2);
    let tcp = tcp_transfer(&t, "a-h1-s2", "a-h0-s1");
    assert_eq!(tcp, TCP_BYTES);

    // Remove a-h1-s2 from the desired state while the agents are down; the restarted
    // agents take over their pinned links and apply the change.
    let mut spec = t.spec().clone();
    spec.instances.retain(|i| i.name != "a-h1-s2");
    t.rewrite_state(&spec).unwrap();
    t.start_agent(0).unwrap();
    t.start_agent(1).unwrap();
    let took_over = t
        .agent(0)
        .unwrap()
        .startup
        .iter()
        .any(|l| l.starts_with("took over pinned link"));
    assert!(took_over, "{:?}", t.agent(0).unwrap().startup);
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.2.20", 2).unwrap(), 0);
    assert_eq!(ping(t.instance("a-h0-s1"), "10.0.1.20", 1).unwrap(), 1);
}
