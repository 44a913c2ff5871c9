//! `cargo xtask build-previous`: builds the agent of the previous release, for the upgrade
//! test (`tests/tests/e2e_upgrade.rs` runs it, then replaces it by this build's agent).
//!
//! The release is checked out once in a `git worktree` under `target/previous/<commit>/src`
//! and built (debug) with its own target directory beside it, reused on later runs: only
//! the first build costs anything. That target directory starts as hard links to this
//! workspace's `target/debug` and `target/ebpf`, so dependencies that did not change between
//! the two commits are not compiled again (cargo rewrites what differs; hard links are never
//! written through, artifacts are replaced).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util;

/// The previous release: the last commit with maps ABI v5.
pub const PREVIOUS_RELEASE: &str = "e0d0d49";

/// The binaries of the previous release.
pub struct PreviousBins {
    /// Its `vpc-agent`.
    pub agent: PathBuf,
    /// Its `vpc-instance-init`.
    pub instance_init: PathBuf,
}

/// Builds (or reuses) the previous release's agent and instance init.
pub fn build() -> Result<PreviousBins> {
    let repo = util::repo_root();
    let mut check = util::command("git");
    check.args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")]);
    if !check
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        bail!(
            "the git history of {} lacks the previous release {PREVIOUS_RELEASE}, which the \
             upgrade test runs; fetch it (`git fetch --unshallow` or `git fetch origin \
             {PREVIOUS_RELEASE}`)",
            repo.display()
        );
    }
    let base = util::target_dir()?.join("previous").join(PREVIOUS_RELEASE);
    let src = base.join("src");
    let target = base.join("target");
    if !src.join("Cargo.toml").is_file() {
        // A worktree whose directory was deleted is still registered: forget it first.
        util::run(util::command("git").args(["worktree", "prune"]))?;
        std::fs::create_dir_all(&base)?;
        util::run(util::command("git").args(["worktree", "add", "--detach", "--force"]).arg(&src).arg(PREVIOUS_RELEASE))?;
    }
    if !target.exists() {
        seed(&util::target_dir()?, &target)?;
    }
    let mut cmd = util::cargo([
        "build",
        "-p",
        "controlplane",
        "--bin",
        "vpc-agent",
        "--bin",
        "vpc-instance-init",
    ]);
    cmd.current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_INCREMENTAL", "0");
    util::run(&mut cmd).context("building the previous release")?;
    let debug = target.join("debug");
    let bins = PreviousBins {
        agent: debug.join("vpc-agent"),
        instance_init: debug.join("vpc-instance-init"),
    };
    for bin in [&bins.agent, &bins.instance_init] {
        if !bin.is_file() {
            bail!("the previous release's build produced no {}", bin.display());
        }
    }
    Ok(bins)
}

/// Hard-links this workspace's compiled dependencies into a fresh target directory.
fn seed(ours: &Path, target: &Path) -> Result<()> {
    let partial = target.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    for dir in ["debug", "ebpf"] {
        let from = ours.join(dir);
        if from.is_dir() {
            // Best effort: a failed seed only costs build time.
            let _ = util::run(util::command("cp").arg("-al").arg(&from).arg(partial.join(dir)));
        }
    }
    // Binaries of this build must never be taken for the previous release's.
    for bin in ["vpc-agent", "vpc-instance-init", "vpc-controlplane", "vpc"] {
        let _ = std::fs::remove_file(partial.join("debug").join(bin));
    }
    std::fs::rename(&partial, target)
        .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))
}
