//! Developer tasks for the VPC appliance, run as `cargo xtask <command>` (a cargo alias in
//! `.cargo/config.toml`). Every external command is echoed (`xtask: running: ...`) before it
//! runs.
//!
//! - `setup [--check]`: checks the machine and installs what is missing: the Debian packages
//!   (LLVM 22 for bpf-linker, test tools), rust-src for the eBPF toolchain, bpf-linker 0.13
//!   and the bpffs mount. Installing Debian packages and mounting need root. `--check` only
//!   reports, exiting non-zero if anything is missing. The other commands run the same checks
//!   first and install only what is missing (fast when everything is there).
//! - `build [--release]`: builds the workspace for the host; controlplane's build.rs builds
//!   the eBPF object.
//! - `test [--tier unit|datapath|e2e|all] [-- ARGS]`: runs the test tiers in order, stopping at
//!   the first failure: host unit tests, then (as root) the datapath and end-to-end tests of
//!   vpc-tests. `ARGS` (e.g. a test name filter) go to the test binaries.
//! - `run [--release] [-- AGENT_ARGS]`: builds and runs vpc-agent as root (it replaces the
//!   xtask process; default arguments: `--detach-on-exit`).
//! - `bench [NAME] [-- ARGS]`: runs benchmark NAME (default `datapath`) of vpc-bench as root.
//! - `lint`: `cargo fmt --check` and clippy with warnings denied, as CI does.

mod bench;
mod build;
mod lint;
mod previous;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the VPC appliance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check for and install the toolchain, tools and bpffs mount (Debian; root to install).
    Setup(setup::Args),
    /// Build the workspace, including the eBPF object.
    Build(build::Args),
    /// Run the test tiers: unit, then (root) datapath and end-to-end.
    Test(test::Args),
    /// Build and run the agent (root).
    Run(run::Args),
    /// Run a benchmark (root).
    Bench(bench::Args),
    /// Check formatting and run clippy with warnings denied.
    Lint,
    /// Build the previous release's agent (cached worktree under target/previous), as the
    /// upgrade test does.
    BuildPrevious,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Setup(args) => setup::main(args),
        Command::Build(args) => build::main(args),
        Command::Test(args) => test::main(args),
        Command::Run(args) => run::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Lint => lint::main(),
        Command::BuildPrevious => previous::build().map(|bins| {
            println!("{}\n{}", bins.agent.display(), bins.instance_init.display());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Not `{err:?}`: that adds a backtrace when RUST_BACKTRACE is set.
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
