//! `cargo xtask bench [NAME] [-- ARGS...]`: runs a benchmark of vpc-bench (as root).
//!
//! `flowlog` (`flowlog-cost`, `flowlog-rate`) and `flowlog-path`: see `vpc-bench`'s docs
//! (flow logging's per-packet cost; the events/s the agent's consumer sustains before loss).

use std::ffi::OsString;

use anyhow::Result;

use crate::{setup, util};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Benchmark to run.
    #[arg(default_value = "datapath")]
    name: String,
    /// Arguments for the benchmark.
    #[arg(last = true)]
    bench_args: Vec<OsString>,
}

pub fn main(args: &Args) -> Result<()> {
    util::require_root(
        "bench",
        "benchmarks load eBPF programs and create network namespaces",
    )?;
    setup::ensure(true)?;
    // The throughput benchmarks run the real agent, `api` the control plane too: build them
    // with the same profile.
    util::run(&mut util::cargo([
        "build",
        "--release",
        "-p",
        "controlplane",
        "--bin",
        "vpc-agent",
        "--bin",
        "vpc-controlplane",
        "--bin",
        "vpc-instance-init",
    ]))?;
    let target = util::target_dir()?;
    let agent = target.join("release").join("vpc-agent");
    let controlplane = target.join("release").join("vpc-controlplane");
    let mut cmd = util::cargo([
        "run",
        "--release",
        "-p",
        "vpc-tests",
        "--bin",
        "vpc-bench",
        "--",
    ]);
    cmd.arg(&args.name)
        .args(&args.bench_args)
        .env("VPC_AGENT_BIN", agent)
        .env("VPC_CONTROLPLANE_BIN", controlplane)
        .env(
            "VPC_INSTANCE_INIT_BIN",
            target.join("release").join("vpc-instance-init"),
        )
        .env("VPC_BENCH_OUT_DIR", target.join("bench"));
    util::run(&mut cmd)
}
