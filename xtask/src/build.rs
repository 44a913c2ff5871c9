//! `cargo xtask build [--release]`: the whole workspace for the host. The eBPF object is built
//! by controlplane's build.rs (inner cargo for bpfel-unknown-none).

use anyhow::Result;

use crate::{setup, util};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
}

pub fn main(args: &Args) -> Result<()> {
    setup::ensure_build(true)?;
    let mut cmd = util::cargo(["build", "--workspace", "--exclude", "dataplane-ebpf"]);
    if args.release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;

    let object = util::target_dir()?.join("ebpf/bpfel-unknown-none/release/dataplane");
    if object.is_file() {
        println!("eBPF object: {}", object.display());
    } else {
        println!("note: no eBPF object at {}", object.display());
    }
    Ok(())
}
