//! `cargo xtask build-previous`: builds the agent of the previous release, for the upgrade
//! test (`tests/tests/e2e_upgrade.rs` runs it, then replaces it by this build's agent).
//!
//! The release is checked out once in a `git worktree` under `target/previous/<commit>/src`
//! and built (debug) with its own target directory beside it, reused on later runs: only
//! the first build costs anything. That target directory is seeded from this workspace's
//! (see [`seed`]), so dependencies that did not change between the two commits are not
//! compiled again.

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
        util::run(
            util::command("git")
                .args(["worktree", "add", "--detach", "--force"])
                .arg(&src)
                .arg(PREVIOUS_RELEASE),
        )?;
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

/// Packages and binaries of this workspace: their artifacts are never shared with the seed
/// (cargo rebuilds them there from the other commit's sources).
const WORKSPACE_PACKAGES: &[&str] = &[
    "controlplane",
    "vpc-agent",
    "vpc-controlplane",
    "vpc-instance-init",
    "vpc",
    "vpc-bench",
    "dataplane-common",
    "dataplane-ebpf",
    "dataplane",
    "vpc-cli",
    "vpc-proto",
    "vpc-store",
    "vpc-tests",
    "xtask",
];

/// Seeds a fresh target directory with this workspace's compiled dependencies.
///
/// Only compiler outputs (`deps/`) are hard links: rustc and the linkers replace those files
/// rather than write into them. Fingerprints and build-script outputs are written in place
/// by cargo and build scripts, and cargo's hashes of workspace packages do not depend on the
/// checkout's location: shared, a build of the other commit would write through the link
/// into this workspace's target (an agent embedding the old eBPF object). So `.fingerprint/`
/// and `build/` are copied, and everything of the workspace's own packages is left out.
fn seed(ours: &Path, target: &Path) -> Result<()> {
    let partial = target.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    for profile_dir in ["debug", "ebpf/release", "ebpf/bpfel-unknown-none/release"] {
        let (from, to) = (ours.join(profile_dir), partial.join(profile_dir));
        if !from.join("deps").is_dir() {
            continue;
        }
        std::fs::create_dir_all(&to)?;
        // Best effort: a failed seed only costs build time.
        let _ = util::run(
            util::command("cp")
                .arg("-al")
                .arg(from.join("deps"))
                .arg(&to),
        );
        for copied in [".fingerprint", "build"] {
            if from.join(copied).is_dir() {
                let _ = util::run(
                    util::command("cp")
                        .args(["-a", "--reflink=auto"])
                        .arg(from.join(copied))
                        .arg(&to),
                );
            }
        }
        for sub in ["deps", ".fingerprint", "build"] {
            remove_workspace_entries(&to.join(sub))?;
        }
    }
    std::fs::rename(&partial, target)
        .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))
}

/// Removes the entries of `dir` that belong to a workspace package (`<name>-<hash>...` or
/// `lib<name>-<hash>...`, dashes as underscores in library names).
fn remove_workspace_entries(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if is_workspace_artifact(&entry.file_name().to_string_lossy()) {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// Whether a `deps/`, `.fingerprint/` or `build/` entry belongs to a workspace package.
fn is_workspace_artifact(name: &str) -> bool {
    WORKSPACE_PACKAGES.iter().any(|p| {
        let lib = p.replace('-', "_");
        [p.to_string(), lib.clone(), format!("lib{lib}")]
            .iter()
            .any(|prefix| {
                name.strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('.'))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::is_workspace_artifact;

    #[test]
    fn workspace_artifacts_are_recognised_and_dependencies_kept() {
        for ours in [
            "controlplane-96f8be70ebc1bbf9",
            "libcontrolplane-e69e47473b55c8bb.rlib",
            "dataplane_common-a10cbabb63ae8798.d",
            "libdataplane_common-a10cbabb63ae8798.rmeta",
            "dataplane-a1ff7a32ef5b03cd",
            "vpc-proto-cfa30d3b75ca5c47",
            "libvpc_store-d6d07fec0db23811.rlib",
            "vpc_agent-0d1e2f3a4b5c6d7e",
            "vpc-1234abcd",
        ] {
            assert!(is_workspace_artifact(ours), "{ours}");
        }
        for theirs in [
            "ring-7faf54f9a5ff9e86",
            "libtonic-0123.rlib",
            "tokio_rustls-087d02f3da67b6d9.d",
            "controlplanex-1",
            "vpcx-1",
        ] {
            assert!(!is_workspace_artifact(theirs), "{theirs}");
        }
    }
}
