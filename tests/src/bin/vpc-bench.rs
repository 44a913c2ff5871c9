//! `vpc-bench`: datapath benchmarks (`cargo xtask bench NAME`). Needs root.
//!
//! `datapath`:
//! 1. per-packet cost of each program on typical frames, from BPF_PROG_TEST_RUN with a large
//!    repeat count (the kernel's own average per run; no PMU needed);
//! 2. TCP throughput (iperf3, 1 stream) between two namespaces over a veth pair, first with
//!    nothing attached (the baseline a user has without this project), then with the real
//!    agent attaching the datapath to the receiving side in each hook configuration, in the
//!    same run. The ratios are what each configuration costs in throughput.
//!
//! `overlay` (flags `--seconds`, `--rounds`, `--xdp-mode`, `--repeat`):
//! 1. per-packet cost of the overlay programs ([`overlay_per_packet`], to be filled in);
//! 2. TCP throughput (iperf3, 1 stream) between instances on two hosts of a
//!    [`vpc_tests::topology`] topology, same subnet and across subnets, in the same run for:
//!    the eBPF overlay (the real agents, `--xdp-mode`, default `off`, and `generic`), the
//!    stock-kernel overlay a user would build instead (bridge + VXLAN + policy routing +
//!    nftables conntrack, [`Mode::KernelVxlan`]), and one plain veth between two namespaces
//!    (the upper bound). Each configuration is reported with its median and its ratios to the
//!    kernel overlay and to the plain veth. A configuration that cannot be built or has no
//!    connectivity is reported as failed; the others still run.
//!
//! `security` (flags `--samples`, `--round-trips`, `--rounds`; parts alone: `security-rules`,
//! `security-apply`, `security-conntrack`, `security-nft`), in
//! [`vpc_tests::security_bench`]:
//! 1. ns/packet of a new and of an established flow through the port program with 1, 100,
//!    10 000 and 100 000 security-group rules on the host, with ratios to the first row;
//! 2. time to compile and apply 10 000 rules (fresh, one rule changed) and to compile alone;
//! 3. established-flow ns/packet with 1 000 and 1 000 000 conntrack entries;
//! 4. the baseline in the same run: the kernel's nftables + conntrack cost per established
//!    packet, end to end (UDP ping-pong between two namespaces without and with a table),
//!    compared with the program-level figure of part 1.
//!
//! `flowlog` (parts alone: `flowlog-cost`, `flowlog-rate`; flags `--repeat`, `--samples`,
//! `--seconds`), in [`vpc_tests::flowlog_bench`]: ns/packet with flow logging off and on,
//! and the flow events per second the agent's consumer sustains before it counts loss.
//!
//! `flowlog-path` (flags `--repeat`, `--samples`, `--rounds`, `--drain-packets`), in
//! [`vpc_tests::flowlog_path_bench`]: ns/packet of the port program with flow logging off and
//! on for an established flow and for new flows (single kernel-timed runs, medians of
//! rounds), and the raw ring-buffer drain rate with loss counted.
//!
//! `api` (parts alone: `api-latency`, `api-programming`; flags `--objects`, `--samples`, `--clients`, `--creates-per-client`,
//! `--single-rounds`, `--instances`, `--hosts`), in [`vpc_tests::api_bench`]: the control
//! plane's API latency with 10 000 objects stored (embedded store) and the network
//! programming latency of 1 and 1 000 instances on 3 hosts; JSON in `target/bench/api.json`.

use std::{
    io::Read,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use dataplane_common::{
    FilterAction, FilterKey, FilterValue, Hook,
    filter::ipv4_mapped,
    testpkt::{arp_request, icmp4_echo, tcp_syn, udp, v4, v6},
};
use vpc_tests::{
    api_bench, flowlog_bench, lb_bench,
    netns::{BpffsDir, NetNs, ping, veth_pair},
    procs::Agent,
    security_bench,
    testrun::LoadedDatapath,
    topology::{DEFAULT_UNDERLAY_MTU, Mode, PlainVeth, Topology, two_vpcs_same_cidr},
};

const A: [u8; 4] = [198, 18, 0, 1];
const B: [u8; 4] = [198, 18, 0, 2];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("datapath", String::as_str);
    let repeat: u32 = flag(&args, "--repeat").unwrap_or(1_000_000);
    let seconds: u32 = flag(&args, "--seconds").unwrap_or(5);
    let rounds: usize = flag(&args, "--rounds").unwrap_or(5).max(1);
    let xdp_mode: String = flag(&args, "--xdp-mode").unwrap_or_else(|| "off".to_owned());
    let defaults = security_bench::Options::default();
    let security = security_bench::Options {
        samples: flag(&args, "--samples").unwrap_or(defaults.samples),
        round_trips: flag(&args, "--round-trips").unwrap_or(defaults.round_trips),
        rounds,
    };
    match name {
        "datapath" => {
            per_packet(repeat)?;
            throughput(seconds, rounds)?;
            Ok(())
        }
        "per-packet" => per_packet(repeat),
        "throughput" => throughput(seconds, rounds),
        "overlay" => {
            overlay_per_packet(repeat)?;
            overlay_throughput(seconds, rounds, &xdp_mode)
        }
        "overlay-per-packet" => overlay_per_packet(repeat),
        "security" => security_bench::run(&security),
        "security-rules" => security_bench::per_packet_by_rules(&security).map(drop),
        "security-apply" => security_bench::apply_time(),
        "security-conntrack" => security_bench::conntrack_scale(&security),
        "security-nft" => security_bench::nft_baseline(&security, &Vec::new()),
        "flowlog" | "flowlog-cost" | "flowlog-rate" => {
            let d = flowlog_bench::Options::default();
            let o = flowlog_bench::Options {
                repeat: flag(&args, "--repeat").unwrap_or(d.repeat),
                samples: flag(&args, "--samples").unwrap_or(d.samples),
                seconds: flag::<f64>(&args, "--seconds").unwrap_or(d.seconds),
                ..d
            };
            match name {
                "flowlog-cost" => flowlog_bench::per_packet_cost(&o).map(drop),
                "flowlog-rate" => flowlog_bench::consumer_rate(&o).map(drop),
                _ => flowlog_bench::run(&o),
            }
        }
        "lb" => {
            lb_bench::per_packet(security.samples.min(5_000))?;
            lb_bench::conn_rate(seconds.min(3), rounds.min(3), 4)
        }
        "lb-per-packet" => lb_bench::per_packet(security.samples),
        "lb-conn" => lb_bench::conn_rate(seconds, rounds, 4),
        "api" | "api-latency" | "api-programming" => {
            let d = api_bench::Options::default();
            api_bench::run(&api_bench::Options {
                api_latency: name != "api-programming",
                programming: name != "api-latency",
                objects: flag(&args, "--objects").unwrap_or(d.objects),
                samples: flag(&args, "--samples").unwrap_or(d.samples),
                clients: flag(&args, "--clients").unwrap_or(d.clients),
                creates_per_client: flag(&args, "--creates-per-client")
                    .unwrap_or(d.creates_per_client),
                single_rounds: flag(&args, "--single-rounds").unwrap_or(d.single_rounds),
                instances: flag(&args, "--instances").unwrap_or(d.instances),
                hosts: flag(&args, "--hosts").unwrap_or(d.hosts),
            })
        }
        "flowlog-path" => {
            let d = vpc_tests::flowlog_path_bench::Options::default();
            vpc_tests::flowlog_path_bench::run(&vpc_tests::flowlog_path_bench::Options {
                repeat: flag(&args, "--repeat").unwrap_or(d.repeat),
                samples: flag(&args, "--samples").unwrap_or(d.samples),
                rounds: flag(&args, "--rounds").unwrap_or(d.rounds),
                drain_packets: flag(&args, "--drain-packets").unwrap_or(d.drain_packets),
            })
        }
        "compute" => {
            let d = vpc_tests::compute_bench::Options::default();
            vpc_tests::compute_bench::run(&vpc_tests::compute_bench::Options {
                launches: flag(&args, "--launches").unwrap_or(d.launches),
                batch: flag(&args, "--batch").unwrap_or(d.batch),
                density_max: flag(&args, "--density-max").unwrap_or(d.density_max),
                density_minutes: flag(&args, "--density-minutes").unwrap_or(d.density_minutes),
            })
        }
        other => bail!(
            "unknown benchmark `{other}` (datapath, per-packet, throughput, overlay, \
             overlay-per-packet, security, security-rules, security-apply, security-conntrack, \
             security-nft, lb, lb-per-packet, lb-conn, api, api-latency, \
             api-programming, compute, flowlog, flowlog-cost, flowlog-rate, flowlog-path)"
        ),
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn per_packet(repeat: u32) -> Result<()> {
    let mut dp = LoadedDatapath::load("bench")?;
    dp.maps().set_filter(
        FilterKey::new(ipv4_mapped(B), 17, 9999),
        FilterValue::new(FilterAction::Drop),
    )?;
    let frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "udp4 64B (pass, 2 lookups)",
            padded(udp(v4(A, B), 1000, 53, b""), 64),
        ),
        (
            "udp4 64B (filter drop)",
            padded(udp(v4(A, B), 1000, 9999, b""), 64),
        ),
        ("tcp4 SYN", padded(tcp_syn(v4(A, B), 40000, 80), 64)),
        (
            "udp4 1500B",
            padded(udp(v4(A, B), 1000, 53, &[0; 1472]), 1514),
        ),
        ("icmp4 echo", icmp4_echo(A.into(), B.into(), 1, 1)),
        ("tcp6 SYN", tcp_syn(v6("fd00::1", "fd00::2"), 1, 443)),
        (
            "arp (non-IP pass)",
            padded(arp_request(A.into(), B.into()), 60),
        ),
        // TC test runs need the whole IP header in the input, so cut inside the UDP header.
        (
            "truncated udp4 (drop)",
            udp(v4(A, B), 1, 2, b"")[..38].to_vec(),
        ),
    ];
    println!("\n== per-packet cost: BPF_PROG_TEST_RUN, repeat {repeat}, ns/packet ==");
    println!(
        "{:<30} {:>10} {:>12} {:>12}",
        "frame", "xdp", "tc_ingress", "tc_egress"
    );
    for (name, frame) in &frames {
        let mut cols = Vec::new();
        for hook in Hook::UNDERLAY {
            // Best of three: BPF_PROG_TEST_RUN averages over `repeat`, and the minimum of a
            // few averages filters out interference from the other core's work.
            let mut best = Duration::MAX;
            for _ in 0..3 {
                best = best.min(dp.run_repeat(hook, frame, repeat)?.per_run);
            }
            cols.push(best.as_nanos());
        }
        println!(
            "{:<30} {:>10} {:>12} {:>12}",
            name, cols[0], cols[1], cols[2]
        );
    }
    Ok(())
}

fn padded(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    if frame.len() < len {
        frame.resize(len, 0);
    }
    frame
}

/// iperf3 client in `client` to a server in `server` listening on `server_ip`; returns the
/// bits per second the server received.
///
/// Bounded: the client gives up connecting after 3 s, and is killed if it has not finished
/// `seconds + 15` s after it started (a datapath that stalls mid-test would otherwise leave it
/// waiting for its control connection for minutes).
fn iperf(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, seconds: u32) -> Result<f64> {
    let ip = server_ip.to_string();
    let mut server_cmd = Command::new("iperf3");
    server_cmd
        .args(["-s", "-1", "-B", &ip])
        .stdout(Stdio::null());
    let _server = server.spawn(server_cmd)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut client_cmd = Command::new("iperf3");
    client_cmd
        .args([
            "-c",
            &ip,
            "-t",
            &seconds.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
            // Leave TCP slow start and the first second out of the average.
            "-O",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = client.spawn(client_cmd)?;
    let mut stdout = child.child_mut().stdout.take().context("iperf3 stdout")?;
    // Read concurrently: the JSON report can outgrow the pipe buffer on long runs.
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let limit = Duration::from_secs(u64::from(seconds) + 15);
    let Some(status) = child.wait_timeout(limit)? else {
        child.stop()?;
        bail!(
            "iperf3 client to {ip} did not finish within {} s",
            limit.as_secs()
        );
    };
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("iperf3 reader thread panicked"))?
        .context("reading iperf3's output")?;
    if !status.success() {
        // With -J, errors are in the JSON's "error" field.
        let err = out
            .split("\"error\":")
            .nth(1)
            .map_or("no error message", |e| {
                e.trim().trim_end_matches(['}', '\n'])
            });
        bail!("iperf3 client to {ip} failed ({status}): {err}");
    }
    // The receiver's summary: "sum_received": { ... "bits_per_second": N ... }
    let recv = out
        .split("\"sum_received\"")
        .nth(1)
        .context("iperf3 JSON has no sum_received")?;
    let bps = recv
        .split("\"bits_per_second\":")
        .nth(1)
        .and_then(|s| s.split([',', '\n', '}']).next())
        .context("iperf3 JSON has no bits_per_second")?
        .trim()
        .parse::<f64>()?;
    Ok(bps)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn throughput(seconds: u32, rounds: usize) -> Result<()> {
    let a = NetNs::new("bencha")?;
    let b = NetNs::new("benchb")?;
    veth_pair(&a, "a0", &b, "b0")?;
    a.add_addr("a0", "198.18.0.1/24")?;
    b.add_addr("b0", "198.18.0.2/24")?;
    println!(
        "\n== TCP throughput a -> b over veth, iperf3 1 stream, {seconds} s, median of {rounds} \
         interleaved rounds =="
    );
    // `None`: nothing attached, the baseline.
    let configs: [(&str, Option<&[&str]>); 4] = [
        ("baseline (no programs)", None),
        (
            "TC ingress + TC egress (--xdp-mode off)",
            Some(&["--xdp-mode", "off"]),
        ),
        (
            "XDP native + TC in + TC out",
            Some(&["--xdp-mode", "native"]),
        ),
        (
            "XDP generic + TC in + TC out",
            Some(&["--xdp-mode", "generic"]),
        ),
    ];
    let mut samples = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, (_, extra)) in configs.iter().enumerate() {
            let pins = BpffsDir::new("benchpins")?;
            let agent = match extra {
                Some(extra) => Some(Agent::start_with(&b, pins.path(), &["b0"], extra)?),
                None => None,
            };
            samples[i].push(iperf(&a, &b, B.into(), seconds)?);
            if let Some(agent) = agent {
                agent.stop()?;
            }
        }
    }
    let base = median(&mut samples[0].clone());
    for ((name, _), s) in configs.iter().zip(&mut samples) {
        let m = median(s);
        println!(
            "{name:<44} {:>7.2} Gbit/s (min {:.2}, max {:.2})  ratio {:.2}",
            m / 1e9,
            s[0] / 1e9,
            s[s.len() - 1] / 1e9,
            m / base
        );
    }
    Ok(())
}

/// Per-packet cost of the overlay programs (encapsulation, decapsulation, routing between
/// subnets) from BPF_PROG_TEST_RUN with `repeat` runs, in the style of [`per_packet`].
///
/// PLACEHOLDER, to be filled in with the overlay datapath: `testrun::LoadedDatapath` has no
/// overlay map helpers yet, so this prints nothing for now.
fn overlay_per_packet(repeat: u32) -> Result<()> {
    use dataplane_common::testpkt::{arp_request_from, vxlan, with_macs};
    use vpc_tests::overlay_fixture::{ME_MAC, ROUTER, VTEP_ME, VTEP_PEER, fixture};
    let f = fixture("benchovl");
    let a = Ipv4Addr::new(10, 0, 1, 10);
    let from_me = |frame: Vec<u8>| with_macs(&frame, ROUTER, ME_MAC);
    let inner = with_macs(
        &icmp4_echo(Ipv4Addr::new(10, 0, 1, 30), a, 7, 1),
        ME_MAC,
        ROUTER,
    );
    let cases: Vec<(&str, Hook, Option<u32>, Vec<u8>)> = vec![
        (
            "port: ARP request -> reply",
            Hook::Port,
            Some(f.me),
            arp_request_from(ME_MAC, a, Ipv4Addr::new(10, 0, 1, 1)),
        ),
        (
            "port: local, cross subnet",
            Hook::Port,
            Some(f.me),
            from_me(icmp4_echo(a, Ipv4Addr::new(10, 0, 2, 20), 7, 1)),
        ),
        (
            "port: remote, VXLAN encap",
            Hook::Port,
            Some(f.me),
            from_me(icmp4_echo(a, Ipv4Addr::new(10, 0, 1, 30), 7, 1)),
        ),
        (
            "port: spoofed source (drop)",
            Hook::Port,
            Some(f.me),
            from_me(icmp4_echo(Ipv4Addr::new(10, 0, 1, 11), a, 7, 1)),
        ),
        (
            "underlay xdp: VXLAN validate",
            Hook::Xdp,
            None,
            vxlan(VTEP_PEER, VTEP_ME, 50000, 100, &inner),
        ),
        (
            "underlay tc: VXLAN decap",
            Hook::TcIngress,
            None,
            vxlan(VTEP_PEER, VTEP_ME, 50000, 100, &inner),
        ),
        (
            "underlay xdp: unknown VTEP",
            Hook::Xdp,
            None,
            vxlan([192, 168, 77, 9], VTEP_ME, 50000, 100, &inner),
        ),
    ];
    // These programs rewrite the packet, and BPF_PROG_TEST_RUN's `repeat` re-runs them on the
    // already rewritten skb (the second run would see a reply or a VXLAN frame). So each
    // sample is one run on a fresh copy of the frame, timed by the kernel around the program
    // alone; the median of many samples is reported. A single run's time includes the clock
    // reads (tens of ns): compare rows with each other, not with the table above.
    let samples = (repeat / 50).clamp(1000, 20000);
    println!(
        "\n== overlay per-packet cost: BPF_PROG_TEST_RUN, median of {samples} single runs, ns/packet =="
    );
    f.ns.run(|| -> Result<()> {
        for (name, hook, ifindex, frame) in &cases {
            let mut times = Vec::with_capacity(samples as usize);
            let mut retval = 0;
            for _ in 0..samples {
                let r = f.dp.run_on(*hook, frame, 1, *ifindex)?;
                times.push(r.per_run);
                retval = r.retval;
            }
            times.sort();
            let median = times[times.len() / 2];
            println!("{name:<32} {:>8} ns  (return {retval})", median.as_nanos());
        }
        Ok(())
    })
}

/// Instances measured in the overlay topologies: host 0 to host 1, same subnet.
const SAME_SUBNET: (&str, &str) = ("a-h0-s1", "a-h1-s1");
/// Instances measured in the overlay topologies: host 0 to host 1, across subnets (routed).
const CROSS_SUBNET: (&str, &str) = ("a-h0-s1", "a-h1-s2");

/// One line of the overlay table.
struct OverlayRow<'a> {
    name: String,
    /// Client namespace, server namespace, server address; or why the row cannot run.
    path: Result<(&'a NetNs, &'a NetNs, Ipv4Addr), String>,
    /// Index of the kernel-overlay row to compare with.
    kernel_row: Option<usize>,
    samples: Vec<f64>,
}

impl<'a> OverlayRow<'a> {
    fn new(
        name: String,
        topo: &'a Result<Topology, String>,
        (from, to): (&str, &str),
        kernel_row: Option<usize>,
    ) -> Self {
        let path = match topo {
            Ok(t) => Ok((t.instance(from), t.instance(to), t.instance_ip(to))),
            Err(e) => Err(e.clone()),
        };
        Self {
            name,
            path,
            kernel_row,
            samples: Vec::new(),
        }
    }
}

fn overlay_throughput(seconds: u32, rounds: usize, xdp_mode: &str) -> Result<()> {
    let spec = two_vpcs_same_cidr(2);
    let build = |mode: Mode| {
        Topology::build(spec.clone(), mode.clone()).map_err(|e| format!("building {mode}: {e:#}"))
    };
    let mut xdp_modes = vec![xdp_mode.to_owned()];
    if xdp_mode != "generic" {
        xdp_modes.push("generic".to_owned());
    }
    let veth = PlainVeth::new(DEFAULT_UNDERLAY_MTU)?;
    let kernel = build(Mode::KernelVxlan);
    let ebpf: Vec<(String, Result<Topology, String>)> = xdp_modes
        .into_iter()
        .map(|m| {
            let topo = build(Mode::Ebpf {
                xdp_mode: m.clone(),
            });
            (m, topo)
        })
        .collect();

    let mut rows = vec![
        OverlayRow {
            name: "plain veth (upper bound)".into(),
            path: Ok((veth.a(), veth.b(), PlainVeth::B_IP)),
            kernel_row: None,
            samples: Vec::new(),
        },
        OverlayRow::new(
            "kernel VXLAN+bridge+nft, same subnet".into(),
            &kernel,
            SAME_SUBNET,
            Some(1),
        ),
        OverlayRow::new(
            "kernel VXLAN+bridge+nft, cross subnet".into(),
            &kernel,
            CROSS_SUBNET,
            Some(2),
        ),
    ];
    for (mode, topo) in &ebpf {
        rows.push(OverlayRow::new(
            format!("eBPF xdp {mode}, same subnet"),
            topo,
            SAME_SUBNET,
            Some(1),
        ));
        rows.push(OverlayRow::new(
            format!("eBPF xdp {mode}, cross subnet"),
            topo,
            CROSS_SUBNET,
            Some(2),
        ));
    }
    // A quick reachability check first, so that a broken configuration fails in seconds
    // instead of in iperf3's timeouts, every round.
    for row in &mut rows {
        if let Ok((client, _, ip)) = row.path {
            match ping(client, &ip.to_string(), 3) {
                Ok(0) => row.path = Err(format!("no connectivity to {ip} (ping)")),
                Ok(_) => {}
                Err(e) => row.path = Err(format!("ping {ip}: {e:#}")),
            }
        }
    }

    println!(
        "\n== overlay TCP throughput host 0 -> host 1 (instances' MTU {}), iperf3 1 stream, \
         {seconds} s, median of {rounds} interleaved rounds ==",
        spec.instance_mtu()
    );
    for _ in 0..rounds {
        for row in &mut rows {
            let Ok((client, server, ip)) = row.path else {
                continue;
            };
            match iperf(client, server, ip, seconds) {
                Ok(bps) => row.samples.push(bps),
                Err(e) => row.path = Err(format!("{e:#}")),
            }
        }
    }

    let medians: Vec<Option<f64>> = rows
        .iter()
        .map(|r| (r.path.is_ok() && !r.samples.is_empty()).then(|| median(&mut r.samples.clone())))
        .collect();
    let ratio =
        |m: f64, base: Option<f64>| base.map_or("-".to_owned(), |b| format!("{:.2}", m / b));
    println!(
        "{:<40} {:>8} {:>17} {:>10} {:>8}",
        "configuration", "Gbit/s", "(min, max)", "vs kernel", "vs veth"
    );
    for (row, m) in rows.iter().zip(&medians) {
        match (&row.path, m) {
            (Ok(_), Some(m)) => {
                let mut s = row.samples.clone();
                s.sort_by(f64::total_cmp);
                let kernel = row.kernel_row.and_then(|k| medians[k]);
                println!(
                    "{:<40} {:>8.2} {:>17} {:>10} {:>8}",
                    row.name,
                    m / 1e9,
                    format!("({:.2}, {:.2})", s[0] / 1e9, s[s.len() - 1] / 1e9),
                    ratio(*m, kernel),
                    ratio(*m, medians[0]),
                );
            }
            (Err(e), _) => println!("{:<40} FAILED: {e}", row.name),
            (Ok(_), None) => println!("{:<40} no samples", row.name),
        }
    }
    Ok(())
}
