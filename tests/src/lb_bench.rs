//! `cargo xtask bench lb`: what the load balancer costs, for `vpc-bench`.
//!
//! 1. [`per_packet`]: ns/packet through the port program for a packet to the VIP (client
//!    `me` on this host, targets on the peer host, so every packet is DNATed and
//!    encapsulated) for a new flow (a SYN from a fresh source port each run: listener
//!    lookup, flow miss, Maglev slot, backend, flow and reverse-NAT inserts, conntrack) and
//!    an established one (the same flow's ACK: flow hit), with 2, 100 and 10 000 targets;
//!    next to the same packets sent straight to one target (no load balancer), and the time
//!    the agent's reconciler takes to build and write the tables. Medians of single
//!    BPF_PROG_TEST_RUN runs (the program rewrites the frame, so the kernel's repeat loop
//!    cannot be used; see `security_bench`).
//! 2. [`conn_rate`]: new TCP connections per second through the VIP vs straight to a target,
//!    with the real agents on two hosts (three targets, one on the client's host), and in
//!    the same run the kernel baseline (`lb_baseline`: nftables DNAT with numgen, as
//!    kube-proxy's nftables mode).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use controlplane::{
    lb::{
        LbPlan,
        compile::TargetStatus,
        health::TargetState,
        model::{HealthCheck, LbProtocol},
        plan::{PlannedGroup, PlannedListener, PlannedTarget, default_table_size},
    },
    overlay::{EndpointSpec, SubnetSpec, statefile::StateFile},
};
use dataplane_common::{
    Hook,
    conntrack::tcp_flags::{ACK, SYN},
    testpkt::{tcp, v4, with_macs},
};
use serde_json::json;

use crate::{
    lb_baseline::{ConnRate, connect_rate_ports, run_baseline, serve},
    overlay_fixture::{Fixture, ME_MAC, PolicySpec, ROUTER, fixture},
    testrun::TC_ACT_REDIRECT,
    topology::{Mode, Topology, two_vpcs_same_cidr},
};

const ME: [u8; 4] = [10, 0, 1, 10];
const VIP: [u8; 4] = [10, 0, 1, 100];
const VNI: u32 = 100;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Adds `n` remote targets (host h1, subnet 10.0.128.0/17) to the fixture and programs a
/// load balancer over them; returns the programming time.
fn program(f: &mut Fixture, n: usize) -> Result<Duration> {
    f.state.subnets.push(SubnetSpec {
        id: "a3".into(),
        vpc: "vpc-a".into(),
        cidr: "10.0.128.0/17".parse()?,
    });
    let mut targets = Vec::new();
    let mut states = Vec::new();
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 128, 10)) + i as u32);
        let o = ip.octets();
        f.state.endpoints.push(EndpointSpec {
            id: format!("t{i}"),
            subnet: "a3".into(),
            host: "h1".into(),
            ip,
            mac: [2, 9, o[0], o[1], o[2], o[3]],
            ifindex: None,
        });
        targets.push(PlannedTarget {
            endpoint: format!("t{i}"),
            ip,
            port: 8080,
            weight: 1,
        });
        states.push(TargetStatus {
            group: "tg".into(),
            endpoint: format!("t{i}"),
            ip,
            port: 8080,
            state: TargetState::Healthy,
            reason: None,
        });
    }
    let table_size = default_table_size(n);
    f.lb_plan = LbPlan {
        listeners: vec![PlannedListener {
            lb: "lb".into(),
            subnet: "a1".into(),
            vni: VNI,
            vip: Ipv4Addr::from(VIP),
            protocol: LbProtocol::Tcp,
            port: 80,
            target_group: "tg".into(),
            table_size,
        }],
        groups: [(
            "tg".to_owned(),
            PlannedGroup {
                id: "tg".into(),
                vni: VNI,
                protocol: LbProtocol::Tcp,
                health: HealthCheck::default(),
                deregistration_delay: Duration::from_secs(300),
                targets,
                used: true,
            },
        )]
        .into(),
        vips: [("lb".to_owned(), (VNI, Ipv4Addr::from(VIP)))].into(),
        probe_nodes: Vec::new(),
    };
    f.lb_targets = states;
    let start = Instant::now();
    let r = f.apply_policy(&PolicySpec::default());
    let took = start.elapsed();
    ensure!(r.lb.tables == 1, "{r:?}");
    Ok(took)
}

/// Median ns of single runs of the port program on `frame(i)` from `me`.
fn runs(f: &Fixture, samples: u32, frame: impl Fn(u32) -> Vec<u8> + Send + Sync) -> Result<f64> {
    f.ns.run(|| -> Result<f64> {
        let mut ns = Vec::with_capacity(samples as usize);
        for i in 0..samples {
            let r = f.dp.run_on(Hook::Port, &frame(i), 1, Some(f.me))?;
            ensure!(r.retval == TC_ACT_REDIRECT, "run {i}: return {}", r.retval);
            ns.push(r.per_run.as_nanos() as f64);
        }
        Ok(median(ns))
    })
}

fn seg(dst: [u8; 4], dport: u16, sport: u16, flags: u8) -> Vec<u8> {
    with_macs(&tcp(v4(ME, dst), sport, dport, flags, &[]), ROUTER, ME_MAC)
}

/// Part 1.
pub fn per_packet(samples: u32) -> Result<()> {
    println!(
        "\n== load balancer per packet: port program, client -> VIP:80 (targets on the peer \
         host: DNAT + VXLAN), median of {samples} single BPF_PROG_TEST_RUN runs; `direct`: \
         the same packets to one target without the load balancer =="
    );
    println!(
        "{:>8} {:>8} {:>12} {:>14} {:>12} {:>14} {:>14} {:>14}",
        "targets",
        "table",
        "program ms",
        "VIP new ns",
        "VIP est ns",
        "direct new ns",
        "direct est ns",
        "VIP/direct est"
    );
    let mut rows = Vec::new();
    for n in [2usize, 100, 10_000] {
        let mut f = fixture(&format!("lbb{n}"));
        let took = program(&mut f, n)?;
        let table = default_table_size(n);
        let target = [10, 0, 128, 10];
        let new = runs(&f, samples, |i| {
            seg(VIP, 80, 10_000 + (i % 50_000) as u16, SYN)
        })?;
        runs(&f, 1, |_| seg(VIP, 80, 2, SYN))?;
        let est = runs(&f, samples, |_| seg(VIP, 80, 2, ACK))?;
        // Direct: a fresh flow each run needs fresh conntrack room; ports from 10 000 again
        // are new flows to another destination.
        let dnew = runs(&f, samples, |i| {
            seg(target, 8080, 10_000 + (i % 50_000) as u16, SYN)
        })?;
        runs(&f, 1, |_| seg(target, 8080, 3, SYN))?;
        let dest = runs(&f, samples, |_| seg(target, 8080, 3, ACK))?;
        println!(
            "{:>8} {:>8} {:>12.1} {:>14.0} {:>12.0} {:>14.0} {:>14.0} {:>14.2}",
            n,
            table,
            took.as_secs_f64() * 1e3,
            new,
            est,
            dnew,
            dest,
            est / dest
        );
        rows.push((n, new, est));
    }
    let (lo_new, hi_new) = (rows[0].1, rows[2].1);
    let (lo_est, hi_est) = (rows[0].2, rows[2].2);
    println!(
        "flatness 2 -> 10 000 targets: new flow {:.2}x, established {:.2}x (target: within 1.5x)",
        hi_new / lo_new,
        hi_est / lo_est
    );
    Ok(())
}

/// Part 2.
pub fn conn_rate(seconds: u32, rounds: usize, concurrency: usize) -> Result<()> {
    let duration = Duration::from_secs(u64::from(seconds.max(1)));
    println!(
        "\n== connections per second: new TCP connections (connect, read 1 byte, server \
         closes) from a-h0-s1, {concurrency} client threads, {}s x {rounds} interleaved \
         rounds (medians); the appliance with real agents on two hosts, 3 targets (one on the \
         client's host) ==",
        duration.as_secs()
    );
    let t = Topology::build(
        two_vpcs_same_cidr(2),
        Mode::Ebpf {
            xdp_mode: "off".into(),
        },
    )?;
    let targets = [
        ("a-h0-s2", Ipv4Addr::new(10, 0, 2, 10)),
        ("a-h1-s1", Ipv4Addr::new(10, 0, 1, 20)),
        ("a-h1-s2", Ipv4Addr::new(10, 0, 2, 20)),
    ];
    let _servers = targets
        .iter()
        .enumerate()
        .map(|(i, (name, ip))| serve(t.instance(name), SocketAddrV4::new(*ip, 8080), i as u8))
        .collect::<Result<Vec<_>>>()?;
    let doc: StateFile = t.desired_state(t.spec())?;
    let mut v = serde_json::to_value(&doc)?;
    v["load_balancers"] = json!([{"id": "lb-web", "subnet": "subnet-a1",
        "listeners": [{"protocol": "tcp", "port": 80, "target_group": "tg-web"}]}]);
    v["target_groups"] = json!([{"id": "tg-web", "vpc": "vpc-a", "protocol": "tcp",
        "port": 8080, "health_check": {"interval": 0.5, "healthy_threshold": 2},
        "targets": targets.iter().map(|(id, _)| json!({"id": id})).collect::<Vec<_>>()}]);
    v["lb_limits"] = json!({"min_health_check_interval_ms": 200});
    let doc: StateFile = serde_json::from_value(v)?;
    t.rewrite_state_raw(&serde_json::to_string_pretty(&doc)?)?;
    let vip = controlplane::lb::plan(&doc)?.vips["lb-web"].1;
    // Healthy targets (2 checks at 0.5 s) and the tables in place.
    std::thread::sleep(Duration::from_secs(3));
    let client = t.instance("a-h0-s1");
    let via = SocketAddrV4::new(vip, 80);
    let direct = SocketAddrV4::new(targets[1].1, 8080);
    // Disjoint ephemeral ports: the VIP path reaches the same servers with the client's own
    // address (source preserved), so shared 4-tuples would meet TIME_WAIT (PAWS).
    let (mut vip_runs, mut direct_runs): (Vec<ConnRate>, Vec<ConnRate>) = (vec![], vec![]);
    connect_rate_ports(
        client,
        via,
        Duration::from_millis(500),
        concurrency,
        (10_000, 35_000),
    )
    .context("warm-up through the VIP")?;
    for _ in 0..rounds.max(1) {
        vip_runs.push(connect_rate_ports(
            client,
            via,
            duration,
            concurrency,
            (10_000, 35_000),
        )?);
        direct_runs.push(connect_rate_ports(
            client,
            direct,
            duration,
            concurrency,
            (35_001, 60_000),
        )?);
    }
    let med = |r: &[ConnRate], f: fn(&ConnRate) -> f64| median(r.iter().map(f).collect());
    let ours_vip = med(&vip_runs, |r| r.per_second);
    let ours_direct = med(&direct_runs, |r| r.per_second);
    let fails: u64 = vip_runs
        .iter()
        .chain(&direct_runs)
        .map(|r| r.failures)
        .sum();
    let spread: Vec<u64> = (0..3u8)
        .map(|tag| {
            vip_runs
                .iter()
                .map(|r| r.by_tag.get(&tag).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "", "conns/s", "p50 us", "p99 us"
    );
    for (name, runs) in [
        ("appliance: direct to a target (other host)", &direct_runs),
        ("appliance: through the VIP (Maglev)", &vip_runs),
    ] {
        println!(
            "{name:<44} {:>10.0} {:>10.0} {:>10.0}",
            med(runs, |r| r.per_second),
            med(runs, |r| r.p50_us),
            med(runs, |r| r.p99_us)
        );
    }
    println!(
        "appliance VIP/direct {:.2}; connections per target {spread:?}; failures {fails}",
        ours_vip / ours_direct
    );
    drop(t);

    match run_baseline(3, duration, concurrency, rounds) {
        Ok(base) => {
            println!(
                "\nsummary: VIP/direct appliance {:.2}, kernel nftables {:.2}; appliance VIP vs \
                 nftables VIP {:.2}x (different topologies: the appliance's path crosses \
                 VXLAN between namespaces-as-hosts, the baseline one routed namespace)",
                ours_vip / ours_direct,
                base.vip.per_second / base.direct.per_second,
                ours_vip / base.vip.per_second
            );
        }
        Err(e) => println!("baseline skipped: {e:#}"),
    }
    Ok(())
}
