//! `cargo xtask test [--tier unit|datapath|e2e|all] [-- ARGS...]`: runs the test tiers in order,
//! stopping at the first failure.
//!
//! - tier 1, `unit`: host unit tests, no root (`cargo test` at the root runs the same crates);
//! - tier 2, `datapath`: BPF_PROG_TEST_RUN tests of the eBPF programs (root);
//! - tier 3, `e2e`: agent + CLI in network namespaces (root).

use std::{ffi::OsString, path::PathBuf, process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::{previous, setup, util};

/// The end-to-end test targets of vpc-tests (`tests/tests/<name>.rs`), run by `--tier e2e`.
pub const E2E_TESTS: &[&str] = &[
    "e2e_skeleton",
    "e2e_overlay",
    "e2e_security",
    "e2e_lb",
    "compute_net",
    "store_conformance",
    "e2e_api",
    "e2e_cli",
    "e2e_tls",
    "e2e_etcd",
    "compute_runtime",
    "storage_volumes",
    "imds",
    "e2e_compute",
    "e2e_manifest",
    "e2e_walkthrough",
    "e2e_cli_ops",
    "e2e_upgrade",
    "e2e_flowlogs",
    "e2e_metrics",
    "e2e_trace",
];
/// The datapath test targets of vpc-tests, run by `--tier datapath`.
const DATAPATH_TESTS: &[&str] = &[
    "datapath",
    "datapath_overlay",
    "datapath_security",
    "datapath_lb",
    "datapath_flowlog",
    "datapath_trace",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// Tier 1: host unit tests (no root).
    Unit,
    /// Tier 2: eBPF datapath tests (root).
    Datapath,
    /// Tier 3: end-to-end tests (root).
    E2e,
    /// All tiers in order.
    All,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Which tier to run.
    #[arg(long, value_enum, default_value_t = Tier::All)]
    tier: Tier,
    /// Arguments for the test binaries (e.g. a name filter), passed after `--` to the
    /// vpc-tests invocation (to the unit tests with `--tier unit`).
    #[arg(last = true)]
    test_args: Vec<OsString>,
}

pub fn main(args: &Args) -> Result<()> {
    let start = Instant::now();
    let mut counts = util::TestCounts::default();
    if args.tier == Tier::Unit {
        setup::ensure_build(true)?;
    } else {
        if !util::is_root() {
            bail!(
                "tiers 2 and 3 (datapath, e2e) need root (BPF programs, network namespaces); \
                 run:\n{}\ntier 1 runs without root: `cargo test` (or `cargo xtask test --tier unit`)",
                util::sudo_hint("test")
            );
        }
        setup::ensure(true)?;
    }

    if matches!(args.tier, Tier::Unit | Tier::All) {
        let step = Instant::now();
        util::banner("tier 1: host unit tests");
        let mut cmd = util::cargo([
            "test",
            "--workspace",
            "--exclude",
            "dataplane-ebpf",
            "--exclude",
            "vpc-tests",
        ]);
        if args.tier == Tier::Unit {
            with_test_args(&mut cmd, &args.test_args);
        }
        run_counted(&mut cmd, &mut counts)?;
        eprintln!("xtask: tier 1 passed in {}", util::elapsed(step));
    }

    if args.tier != Tier::Unit {
        let step = Instant::now();
        util::banner("binaries for the end-to-end tests");
        util::run(&mut util::cargo([
            "build",
            "-p",
            "controlplane",
            "-p",
            "vpc-cli",
            "--bins",
        ]))?;
        let debug = util::target_dir()?.join("debug");
        let agent = existing(debug.join("vpc-agent"))?;
        let cli = existing(debug.join("vpc"))?;
        let controlplane = existing(debug.join("vpc-controlplane"))?;
        let init = existing(debug.join("vpc-instance-init"))?;
        // The upgrade test starts hosts on the previous release's agent.
        let prev = if matches!(args.tier, Tier::E2e | Tier::All) {
            util::banner("previous release for the upgrade test");
            Some(previous::build()?)
        } else {
            None
        };

        let (title, targets): (&str, Vec<&str>) = match args.tier {
            Tier::Datapath => ("tier 2: datapath tests", DATAPATH_TESTS.to_vec()),
            Tier::E2e => ("tier 3: end-to-end tests", E2E_TESTS.to_vec()),
            _ => ("tiers 2+3: datapath and end-to-end tests", Vec::new()),
        };
        util::banner(title);
        let mut cmd = util::cargo(["test", "-p", "vpc-tests"]);
        for target in targets {
            cmd.args(["--test", target]);
        }
        cmd.env("VPC_AGENT_BIN", agent)
            .env("VPC_CLI_BIN", cli)
            .env("VPC_CONTROLPLANE_BIN", controlplane)
            .env("VPC_INSTANCE_INIT_BIN", init);
        if let Some(prev) = prev {
            cmd.env("VPC_AGENT_PREV_BIN", prev.agent)
                .env("VPC_INSTANCE_INIT_PREV_BIN", prev.instance_init);
        }
        with_test_args(&mut cmd, &args.test_args);
        run_counted(&mut cmd, &mut counts)?;
        eprintln!("xtask: {title} passed in {}", util::elapsed(step));
    }

    eprintln!("\nxtask: all tests passed in {}", util::elapsed(start));
    summarize(&counts)?;
    Ok(())
}

/// Runs a test command, adding its results to `counts`; on failure, still prints the totals.
fn run_counted(cmd: &mut Command, counts: &mut util::TestCounts) -> Result<()> {
    let result = util::run_tests(cmd, counts);
    if result.is_err() {
        summarize(counts)?;
    }
    result
}

/// Prints the totals as a plain `N passed, N failed` line and keeps a copy in
/// `target/xtask/test-summary` (`.ci/run` repeats it as its last line).
fn summarize(counts: &util::TestCounts) -> Result<()> {
    let line = format!("tests: {} passed, {} failed", counts.passed, counts.failed);
    println!("{line}");
    let dir = util::target_dir()?.join("xtask");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("test-summary"), format!("{line}\n"))?;
    Ok(())
}

fn with_test_args(cmd: &mut Command, test_args: &[OsString]) {
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    if !path.is_file() {
        bail!("the build produced no {}", path.display());
    }
    Ok(path)
}
