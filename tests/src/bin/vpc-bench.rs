//! `vpc-bench`: datapath benchmarks (`cargo xtask bench NAME`). Needs root.
//!
//! `datapath`:
//! 1. per-packet cost of each program on typical frames, from BPF_PROG_TEST_RUN with a large
//!    repeat count (the kernel's own average per run; no PMU needed);
//! 2. TCP throughput (iperf3, 1 stream) between two namespaces over a veth pair, first with
//!    nothing attached (the baseline a user has without this project), then with the real
//!    agent attaching the datapath to the receiving side in each hook configuration, in the
//!    same run. The ratios are what each configuration costs in throughput.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use dataplane_common::{
    FilterAction, FilterKey, FilterValue, Hook,
    filter::ipv4_mapped,
    testpkt::{arp_request, icmp4_echo, tcp_syn, udp, v4, v6},
};
use vpc_tests::{
    netns::{BpffsDir, NetNs, veth_pair},
    procs::Agent,
    testrun::LoadedDatapath,
};

const A: [u8; 4] = [198, 18, 0, 1];
const B: [u8; 4] = [198, 18, 0, 2];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("datapath", String::as_str);
    let repeat: u32 = flag(&args, "--repeat").unwrap_or(1_000_000);
    let seconds: u32 = flag(&args, "--seconds").unwrap_or(5);
    let rounds: usize = flag(&args, "--rounds").unwrap_or(5).max(1);
    match name {
        "datapath" => {
            per_packet(repeat)?;
            throughput(seconds, rounds)?;
            Ok(())
        }
        "per-packet" => per_packet(repeat),
        "throughput" => throughput(seconds, rounds),
        other => bail!("unknown benchmark `{other}` (datapath, per-packet, throughput)"),
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
        for hook in Hook::ALL {
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

/// iperf3 client in `a` to a server in `b`; returns received bits per second.
fn iperf(a: &NetNs, b: &NetNs, seconds: u32) -> Result<f64> {
    let mut server = Command::new("iperf3");
    server
        .args(["-s", "-1", "-B", &Ipv4Addr::from(B).to_string()])
        .stdout(std::process::Stdio::null());
    let _server = b.spawn(server)?;
    std::thread::sleep(Duration::from_millis(300));
    let out = a.exec_ok(
        "iperf3",
        [
            "-c",
            &Ipv4Addr::from(B).to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
            // Leave TCP slow start and the first second out of the average.
            "-O",
            "1",
        ],
    )?;
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
            samples[i].push(iperf(&a, &b, seconds)?);
            if let Some(agent) = agent {
                agent.stop()?;
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
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
