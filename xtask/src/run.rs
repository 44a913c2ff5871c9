//! `cargo xtask run [--release] [-- AGENT_ARGS...]`: builds and runs the agent (as root).

use std::ffi::OsString;

use anyhow::{Result, bail};

use crate::{setup, util};

/// Agent arguments used when none are given.
const DEFAULT_AGENT_ARGS: &[&str] = &["--detach-on-exit"];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build and run with the release profile.
    #[arg(long)]
    release: bool,
    /// Arguments for vpc-agent (default: --detach-on-exit).
    #[arg(last = true)]
    agent_args: Vec<OsString>,
}

pub fn main(args: &Args) -> Result<()> {
    util::require_root(
        "run",
        "the agent loads eBPF programs and attaches them to interfaces",
    )?;
    setup::ensure(true)?;
    let mut build = util::cargo(["build", "-p", "controlplane", "--bins"]);
    if args.release {
        build.arg("--release");
    }
    util::run(&mut build)?;

    let profile = if args.release { "release" } else { "debug" };
    let agent = util::target_dir()?.join(profile).join("vpc-agent");
    if !agent.is_file() {
        bail!("the build produced no agent at {}", agent.display());
    }
    let mut cmd = util::command(&agent);
    if args.agent_args.is_empty() {
        cmd.args(DEFAULT_AGENT_ARGS);
    } else {
        cmd.args(&args.agent_args);
    }
    // exec, not spawn: Ctrl-C reaches the whole foreground process group, and the agent must
    // get to clean up (it handles SIGINT itself) without xtask dying under it. Its exit code
    // becomes ours.
    Err(util::exec(&mut cmd))
}
