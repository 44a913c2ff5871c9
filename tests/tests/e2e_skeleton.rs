//! Tier 3: two namespaces joined by a veth; the real `vpc-agent` attaches the datapath (XDP,
//! TC ingress, TC egress) to `b0` in namespace `b`; real traffic flows from namespace `a`.
//! Needs root.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use controlplane::datapath::{PinLayout, PinnedMaps, StatsSnapshot};
use dataplane_common::{
    Action, DropReason, Hook,
    testpkt::{udp, v4},
};
use vpc_tests::{
    netns::{BpffsDir, NetNs, ping, veth_pair},
    procs::{Agent, cli},
};

const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Namespaces `a` and `b` joined by `a0` <-> `b0`, with the agent running on `b0`.
struct Topo {
    a: NetNs,
    b: NetNs,
    pins: BpffsDir,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let a = NetNs::new(&format!("{tag}a")).unwrap();
        let b = NetNs::new(&format!("{tag}b")).unwrap();
        veth_pair(&a, "a0", &b, "b0").unwrap();
        a.add_addr("a0", "198.18.0.1/24").unwrap();
        b.add_addr("b0", "198.18.0.2/24").unwrap();
        let pins = BpffsDir::new(&format!("{tag}p")).unwrap();
        Topo { a, b, pins }
    }

    fn start_agent(&self) -> Agent {
        Agent::start(&self.b, self.pins.path(), &["b0"]).unwrap()
    }

    fn maps(&self) -> PinnedMaps {
        PinnedMaps::open(&PinLayout::new(self.pins.path())).unwrap()
    }

    fn stats(&self) -> StatsSnapshot {
        self.maps().stats().unwrap()
    }

    fn pin_dir(&self) -> &str {
        self.pins.path().to_str().unwrap()
    }
}

/// A UDP socket bound in `ns` on `port`.
fn udp_receiver(ns: &NetNs, port: u16) -> UdpSocket {
    let sock = ns
        .run(move || UdpSocket::bind(SocketAddr::from((B_IP, port))))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    sock
}

/// Sends `count` datagrams from `a` to `b:port`.
fn send_udp(a: &NetNs, port: u16, count: usize) {
    a.run(move || {
        let sock = UdpSocket::bind(SocketAddr::from((A_IP, 0))).unwrap();
        for i in 0..count {
            sock.send_to(format!("datagram {i}").as_bytes(), (B_IP, port))
                .unwrap();
        }
    });
}

/// Counts datagrams until the socket has been quiet for its read timeout (bounded).
fn receive_all(sock: &UdpSocket) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while n < 100_000 && sock.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

fn delta_action(before: &StatsSnapshot, after: &StatsSnapshot, hook: Hook, a: Action) -> u64 {
    after.action(hook, a).since(&before.action(hook, a)).packets
}

fn delta_drop(before: &StatsSnapshot, after: &StatsSnapshot, hook: Hook, r: DropReason) -> u64 {
    after.drop(hook, r).since(&before.drop(hook, r)).packets
}

#[test]
fn e2e_ping_tcp_udp_pass_through_the_attached_programs() {
    let t = Topo::new("pass");
    let agent = t.start_agent();
    assert_eq!(
        agent.link_ids().len(),
        3,
        "xdp, tc ingress, tc egress: {:?}",
        agent.startup
    );
    assert!(agent.startup.iter().any(|l| l.contains("vpc_xdp on b0")));

    let before = t.stats();
    assert_eq!(ping(&t.a, "198.18.0.2", 5).unwrap(), 5);
    let after = t.stats();
    // Echo requests cross XDP and TC ingress on b0; replies cross TC egress.
    for hook in Hook::UNDERLAY {
        let passed = delta_action(&before, &after, hook, Action::Pass);
        assert!(passed >= 5, "{hook:?} saw {passed} packets for 5 pings");
    }

    // UDP: exactly what was sent arrives, and the counters saw at least that much.
    let rx = udp_receiver(&t.b, 7000);
    let before = t.stats();
    send_udp(&t.a, 7000, 50);
    assert_eq!(receive_all(&rx), 50);
    let after = t.stats();
    let xdp = delta_action(&before, &after, Hook::Xdp, Action::Pass);
    assert!(
        (50..=60).contains(&xdp),
        "xdp passed {xdp} for 50 datagrams"
    );
    let xdp_bytes = after
        .action(Hook::Xdp, Action::Pass)
        .since(&before.action(Hook::Xdp, Action::Pass))
        .bytes;
    // Each datagram is 14 + 20 + 8 + 10 or 11 bytes of payload.
    assert!(
        xdp_bytes >= 50 * (14 + 20 + 8 + 10),
        "xdp counted {xdp_bytes} bytes"
    );

    // TCP: a 1 MiB echo round trip.
    let listener = t.b.run(|| TcpListener::bind((B_IP, 7001))).unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut data = Vec::new();
        conn.read_to_end(&mut data).unwrap();
        conn.write_all(&data).unwrap();
    });
    let sent: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let before = t.stats();
    let echoed = t.a.run(move || {
        let mut conn = TcpStream::connect((B_IP, 7001)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        conn.write_all(&sent).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        conn.read_to_end(&mut back).unwrap();
        (sent, back)
    });
    server.join().unwrap();
    assert_eq!(echoed.0, echoed.1, "TCP echo returned different bytes");
    let after = t.stats();
    let in_bytes = after
        .action(Hook::TcIngress, Action::Pass)
        .since(&before.action(Hook::TcIngress, Action::Pass))
        .bytes;
    let out_bytes = after
        .action(Hook::TcEgress, Action::Pass)
        .since(&before.action(Hook::TcEgress, Action::Pass))
        .bytes;
    assert!(
        in_bytes >= 1 << 20,
        "tc ingress counted {in_bytes} bytes of a 1 MiB upload"
    );
    assert!(
        out_bytes >= 1 << 20,
        "tc egress counted {out_bytes} bytes of a 1 MiB echo"
    );
    assert_eq!(delta_action(&before, &after, Hook::Xdp, Action::Drop), 0);
    assert!(agent.stop().unwrap(), "agent exits cleanly on SIGTERM");
}

#[test]
fn e2e_filter_entry_from_the_cli_drops_exactly_the_chosen_flow() {
    let t = Topo::new("filt");
    let _agent = t.start_agent();
    let out = cli(&[
        "datapath",
        "filter",
        "add",
        "--pin-dir",
        t.pin_dir(),
        "--dst",
        "198.18.0.2",
        "--protocol",
        "udp",
        "--port",
        "9999",
        "--action",
        "drop",
    ])
    .unwrap();
    assert!(out.contains("198.18.0.2 udp port 9999: drop"), "{out}");
    let listed = cli(&["datapath", "filter", "list", "--pin-dir", t.pin_dir()]).unwrap();
    assert!(
        listed.contains("198.18.0.2") && listed.contains("drop"),
        "{listed}"
    );

    let blocked = udp_receiver(&t.b, 9999);
    let open = udp_receiver(&t.b, 9998);
    let before = t.stats();
    send_udp(&t.a, 9999, 25);
    send_udp(&t.a, 9998, 10);
    assert_eq!(receive_all(&blocked), 0, "filtered flow must not arrive");
    assert_eq!(receive_all(&open), 10, "other ports are unaffected");
    let after = t.stats();
    assert_eq!(
        delta_drop(&before, &after, Hook::Xdp, DropReason::FilterRule),
        25
    );
    assert_eq!(delta_action(&before, &after, Hook::Xdp, Action::Drop), 25);
    // XDP dropped them before an skb existed: TC ingress never saw them.
    assert_eq!(
        delta_drop(&before, &after, Hook::TcIngress, DropReason::FilterRule),
        0
    );
    assert_eq!(ping(&t.a, "198.18.0.2", 3).unwrap(), 3, "ICMP unaffected");

    let stats = cli(&["datapath", "stats", "--pin-dir", t.pin_dir()]).unwrap();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("xdp") && l.contains("drop:filter_rule")),
        "{stats}"
    );

    cli(&[
        "datapath",
        "filter",
        "remove",
        "--pin-dir",
        t.pin_dir(),
        "--dst",
        "198.18.0.2",
        "--protocol",
        "udp",
        "--port",
        "9999",
    ])
    .unwrap();
    send_udp(&t.a, 9999, 5);
    assert_eq!(
        receive_all(&blocked),
        5,
        "flow passes again once the entry is removed"
    );
}

#[test]
fn e2e_injected_malformed_frames_are_dropped_and_counted_by_reason() {
    let t = Topo::new("mal");
    let _agent = t.start_agent();
    let good = udp(v4(A_IP.octets(), B_IP.octets()), 1, 7000, b"hello");
    let truncated = good[..24].to_vec(); // Ethernet + 10 bytes of the IPv4 header
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    let mut bad_udp_len = good.clone();
    bad_udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&3u16.to_be_bytes());
    let cases = [
        (truncated, DropReason::Truncated, 10),
        (bad_ihl, DropReason::MalformedIpv4, 11),
        (bad_udp_len, DropReason::MalformedL4, 12),
    ];
    let before = t.stats();
    for (frame, _, count) in &cases {
        inject(&t.a, "a0", frame, *count);
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = t.stats();
    for (_, reason, count) in &cases {
        assert_eq!(
            delta_drop(&before, &after, Hook::Xdp, *reason),
            *count as u64,
            "{reason:?}"
        );
    }
    assert_eq!(delta_action(&before, &after, Hook::Xdp, Action::Aborted), 0);
}

/// Sends `frame` `count` times out of `ifname` in `ns` with an AF_PACKET socket (pnet).
fn inject(ns: &NetNs, ifname: &str, frame: &[u8], count: usize) {
    let ifname = ifname.to_owned();
    let frame = frame.to_vec();
    ns.run(move || {
        let iface = pnet_datalink::interfaces()
            .into_iter()
            .find(|i| i.name == ifname)
            .expect("interface exists in the namespace");
        let pnet_datalink::Channel::Ethernet(mut tx, _rx) =
            pnet_datalink::channel(&iface, Default::default()).expect("AF_PACKET channel")
        else {
            panic!("unexpected channel type");
        };
        for _ in 0..count {
            tx.send_to(&frame, None).expect("queued").expect("sent");
        }
    });
}

#[test]
fn e2e_datapath_survives_agent_crash_and_restart_takes_over_the_same_links() {
    let t = Topo::new("rst");
    let first = t.start_agent();
    let links = first.link_ids();
    assert_eq!(links.len(), 3);
    cli(&[
        "datapath",
        "filter",
        "add",
        "--pin-dir",
        t.pin_dir(),
        "--dst",
        "any",
        "--protocol",
        "udp",
        "--port",
        "9999",
    ])
    .unwrap();
    first.crash().unwrap();

    // No agent: packets still traverse the programs and the entry is still enforced.
    let blocked = udp_receiver(&t.b, 9999);
    let before = t.stats();
    assert_eq!(ping(&t.a, "198.18.0.2", 3).unwrap(), 3);
    send_udp(&t.a, 9999, 20);
    assert_eq!(receive_all(&blocked), 0);
    let during = t.stats();
    assert_eq!(
        delta_drop(&before, &during, Hook::Xdp, DropReason::FilterRule),
        20
    );
    assert!(delta_action(&before, &during, Hook::TcEgress, Action::Pass) >= 3);

    // A new agent swaps its programs into the same links and keeps the maps.
    let second = t.start_agent();
    assert_eq!(second.link_ids(), links, "the same bpf_links are reused");
    assert!(
        second
            .startup
            .iter()
            .filter(|l| l.starts_with("took over pinned link"))
            .count()
            == 3,
        "{:?}",
        second.startup
    );
    let after = t.stats();
    assert!(
        after.action(Hook::Xdp, Action::Pass).packets
            >= during.action(Hook::Xdp, Action::Pass).packets
    );
    assert_eq!(
        t.maps().filters().unwrap().len(),
        1,
        "filter entries survive the restart"
    );
    send_udp(&t.a, 9999, 5);
    assert_eq!(receive_all(&blocked), 0);
    assert_eq!(
        delta_drop(&during, &t.stats(), Hook::Xdp, DropReason::FilterRule),
        5
    );

    // A clean stop keeps the datapath; teardown removes it, and traffic flows unfiltered.
    assert!(second.stop().unwrap());
    assert!(
        t.pins
            .path()
            .join(dataplane_common::maps::MAPS_ABI)
            .join("links/b0/vpc_xdp")
            .exists()
    );
    let agent_bin = vpc_tests::procs::workspace_bin("VPC_AGENT_BIN", "vpc-agent").unwrap();
    let out = std::process::Command::new(agent_bin)
        .args(["teardown", "--pin-dir", t.pin_dir()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new(t.pin_dir())
            .join(dataplane_common::maps::MAPS_ABI)
            .exists()
    );
    send_udp(&t.a, 9999, 5);
    assert_eq!(
        receive_all(&blocked),
        5,
        "detached: nothing filters any more"
    );
}
