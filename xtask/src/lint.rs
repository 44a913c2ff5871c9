//! `cargo xtask lint`: formatting check and clippy with warnings denied, for the host crates
//! and for the eBPF crate on its own target.

use anyhow::Result;

use crate::{setup, util};

pub fn main() -> Result<()> {
    // Clippy runs controlplane's build.rs, which builds the eBPF object.
    setup::ensure_build(true)?;
    util::run(&mut util::cargo(["fmt", "--all", "--", "--check"]))?;
    util::run(&mut util::cargo([
        "clippy",
        "--workspace",
        "--exclude",
        "dataplane-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate only builds for bpfel-unknown-none, with the toolchain the build uses.
    let toolchain = setup::ebpf_toolchain()?;
    let mut cmd = util::command("rustup");
    cmd.args(["run", &toolchain, "cargo", "clippy", "--release"])
        .args(["-p", "dataplane-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(util::target_dir()?.join("ebpf"))
        .args(["--", "-D", "warnings"]);
    if !toolchain.starts_with("nightly") {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    util::run(&mut cmd)
}
