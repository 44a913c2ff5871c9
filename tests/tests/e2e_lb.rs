//! End to end: a network load balancer with the real agents on two hosts, real TCP through
//! the VIP, real health checks from the agents' health-check nodes.
//!
//! Topology (`two_vpcs_same_cidr(2)`, VPC A): client `a-h0-s1` 10.0.1.10 (host 0); targets
//! `a-h0-s2` 10.0.2.10 (host 0, same host as the client), `a-h1-s1` 10.0.1.20 and `a-h1-s2`
//! 10.0.2.20 (host 1). `lb-web` in subnet-a1 (VIP allocated), listener tcp/80 -> `tg-web`
//! (port 8080, TCP health checks every 0.5 s, thresholds 2/2, deregistration delay 4 s).
//! Each target's server writes its tag byte on accept, then echoes.
//!
//! Proves: connections spread over all targets and the client sees the VIP; a killed target
//! is detected within interval x threshold (plus slack) and gets no new connections while
//! connections to the others keep working; a deregistered target drains (its open
//! connection keeps working, no new one reaches it) and is removed after the delay; the CLI
//! shows the states.

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use controlplane::{
    datapath::PinLayout,
    lb::{compile::TargetStatus, health::TargetState},
    overlay::statefile::StateFile,
};
use serde_json::json;
use vpc_tests::{
    netns::NetNs,
    procs::cli,
    topology::{Mode, Topology, two_vpcs_same_cidr},
};

const CLIENT: &str = "a-h0-s1";
const TARGETS: [(&str, [u8; 4]); 3] = [
    ("a-h0-s2", [10, 0, 2, 10]),
    ("a-h1-s1", [10, 0, 1, 20]),
    ("a-h1-s2", [10, 0, 2, 20]),
];
const PORT: u16 = 8080;

/// A target's server: accepts, writes `tag`, echoes. Dropping or `kill` stops it and closes
/// its connections, as a crashed process would.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs, tag: u8) -> Server {
        let listener = ns.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let s = Arc::clone(&s);
                        conns.push(thread::spawn(move || {
                            conn.set_nonblocking(false).unwrap();
                            conn.set_read_timeout(Some(Duration::from_millis(100)))
                                .unwrap();
                            if conn.write_all(&[tag]).is_err() {
                                return;
                            }
                            let mut buf = [0u8; 1024];
                            while !s.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if conn.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            ErrorKind::WouldBlock | ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => break,
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The state with the load balancer; `targets`: the registered ones.
fn write_state(t: &Topology, targets: &[&str]) {
    let doc: StateFile = t.desired_state(t.spec()).unwrap();
    let mut v = serde_json::to_value(&doc).unwrap();
    v["load_balancers"] = json!([{"id": "lb-web", "subnet": "subnet-a1",
        "listeners": [{"protocol": "tcp", "port": 80, "target_group": "tg-web"}]}]);
    v["target_groups"] = json!([{"id": "tg-web", "vpc": "vpc-a", "protocol": "tcp",
        "port": PORT, "deregistration_delay": 4,
        "health_check": {"interval": 0.5, "timeout": 0.4, "healthy_threshold": 2,
                         "unhealthy_threshold": 2},
        "targets": targets.iter().map(|id| json!({"id": id})).collect::<Vec<_>>()}]);
    v["lb_limits"] = json!({"min_health_check_interval_ms": 200});
    let checked: StateFile = serde_json::from_value(v).expect("valid state document");
    t.rewrite_state_raw(&serde_json::to_string_pretty(&checked).unwrap())
        .unwrap();
}

/// The VIP the plan allocates (every agent computes the same).
fn vip(t: &Topology) -> Ipv4Addr {
    let path = t.state_path().unwrap();
    let doc = StateFile::load(path).unwrap();
    controlplane::lb::plan(&doc).unwrap().vips["lb-web"].1
}

/// Host 0's view of the targets.
fn states(t: &Topology) -> BTreeMap<Ipv4Addr, TargetState> {
    let path = controlplane::lb::status_path(&PinLayout::new(t.pin_dir(0).unwrap()));
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    let list: Vec<TargetStatus> = serde_json::from_str(&text).unwrap_or_default();
    list.into_iter().map(|s| (s.ip, s.state)).collect()
}

/// Polls until host 0 sees `ip` in `want`; returns how long it took. Fails after `limit`.
fn wait_state(t: &Topology, ip: [u8; 4], want: TargetState, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if states(t).get(&Ipv4Addr::from(ip)) == Some(&want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{ip:?} not {want} after {limit:?}: {:?}",
            states(t)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A connection to the VIP: (the target's tag, the stream).
fn connect(ns: &NetNs, vip: Ipv4Addr) -> Option<(u8, TcpStream)> {
    ns.run(|| {
        let mut conn =
            TcpStream::connect_timeout(&SocketAddr::from((vip, 80)), Duration::from_secs(1))
                .ok()?;
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // The client sees the VIP as its peer (reverse NAT).
        assert_eq!(conn.peer_addr().unwrap(), SocketAddr::from((vip, 80)));
        let mut tag = [0u8; 1];
        conn.read_exact(&mut tag).ok()?;
        Some((tag[0], conn))
    })
}

fn echoes(conn: &mut TcpStream) -> bool {
    let msg = b"still there?";
    if conn.write_all(msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).is_ok() && &buf == msg
}

/// Opens `n` connections; returns connections per target tag (failures panic).
fn spread(ns: &NetNs, vip: Ipv4Addr, n: usize) -> BTreeMap<u8, usize> {
    let mut by_tag = BTreeMap::new();
    for i in 0..n {
        let (tag, _) = connect(ns, vip).unwrap_or_else(|| panic!("connection {i} failed"));
        *by_tag.entry(tag).or_insert(0) += 1;
    }
    by_tag
}

#[test]
fn load_balancer_spreads_detects_failures_and_drains() {
    let t = Topology::build(
        two_vpcs_same_cidr(2),
        Mode::Ebpf {
            xdp_mode: "auto".into(),
        },
    )
    .expect("building the topology");
    let mut servers: Vec<Server> = TARGETS
        .iter()
        .enumerate()
        .map(|(i, (name, _))| Server::start(t.instance(name), i as u8))
        .collect();
    let all: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    write_state(&t, &all);
    let vip = vip(&t);
    for (_, ip) in TARGETS {
        wait_state(&t, ip, TargetState::Healthy, Duration::from_secs(20));
    }
    let client = t.instance(CLIENT);

    // Spread: every target gets a share of 90 new connections.
    let by_tag = spread(client, vip, 90);
    assert_eq!(by_tag.len(), 3, "{by_tag:?}");
    assert!(by_tag.values().all(|n| *n >= 10), "{by_tag:?}");

    // Long-lived connections, at least one per target.
    let mut open: Vec<(u8, TcpStream)> = Vec::new();
    for _ in 0..200 {
        if open
            .iter()
            .map(|(tag, _)| *tag)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 3
        {
            break;
        }
        let c = connect(client, vip).unwrap();
        if open.iter().filter(|(tag, _)| *tag == c.0).count() < 2 {
            open.push(c);
        }
    }
    assert!(open.iter().any(|(tag, _)| *tag == 0) && open.iter().any(|(tag, _)| *tag == 2));

    // Kill target 1 (host 1): detected within interval x threshold (+ timeout and polling
    // slack), no new connection reaches it, the others' connections are unaffected.
    servers[1].kill();
    let killed = Instant::now();
    let detected = wait_state(
        &t,
        TARGETS[1].1,
        TargetState::Unhealthy,
        Duration::from_secs(10),
    );
    let detected = detected.max(killed.elapsed());
    println!("killed target detected after {detected:?} (interval 0.5 s x threshold 2)");
    assert!(detected < Duration::from_millis(2500), "{detected:?}");
    // The table follows at the next pass (a few hundred ms at most).
    thread::sleep(Duration::from_millis(500));
    let after = spread(client, vip, 40);
    assert!(!after.contains_key(&1), "{after:?}");
    assert_eq!(after.len(), 2, "{after:?}");
    for (tag, conn) in open.iter_mut().filter(|(tag, _)| *tag != 1) {
        assert!(echoes(conn), "connection to target {tag} broke");
    }

    // Deregister target 2: it drains. Its open connection keeps working, no new one
    // reaches it; after the 4 s delay it is gone.
    write_state(&t, &all[..2]);
    wait_state(
        &t,
        TARGETS[2].1,
        TargetState::Draining,
        Duration::from_secs(5),
    );
    thread::sleep(Duration::from_millis(300));
    let during = spread(client, vip, 30);
    assert_eq!(
        during.keys().copied().collect::<Vec<_>>(),
        vec![0],
        "{during:?}"
    );
    let (_, draining_conn) = open.iter_mut().find(|(tag, _)| *tag == 2).unwrap();
    assert!(
        echoes(draining_conn),
        "the draining target's connection broke"
    );

    // The CLI shows the states.
    let out = cli(&[
        "lb",
        "targets",
        "--pin-dir",
        t.pin_dir(0).unwrap().to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        out.contains("draining") && out.contains("unhealthy"),
        "{out}"
    );
    let flows = cli(&[
        "lb",
        "flows",
        "--pin-dir",
        t.pin_dir(0).unwrap().to_str().unwrap(),
    ])
    .unwrap();
    assert!(flows.contains(&format!("{vip}:80")), "{flows}");

    let start = Instant::now();
    while states(&t).contains_key(&Ipv4Addr::from(TARGETS[2].1)) {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "drain never ended"
        );
        thread::sleep(Duration::from_millis(100));
    }
    println!("drain ended after {:?} (delay 4 s)", start.elapsed());
    drop(open);
}
