//! `cargo xtask setup [--check]`: checks (and installs what is missing of) everything the build
//! and the tests need. Every check prints one line: `ok:`, `missing:` or `installing:`.

use std::{env, ffi::OsString, fs};

use anyhow::{Result, bail};

use crate::util;

/// Debian packages needed to build (bpf-linker links against LLVM 22).
const APT_BUILD: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Debian packages the tests, benchmarks and manual debugging use.
const APT_RUNTIME: &[&str] = &[
    "iproute2",
    "iperf3",
    "iputils-ping",
    "nftables",
    "ethtool",
    "tshark",
    "bridge-utils",
    "etcd-server",
    // Compute and storage agents: nsenter/losetup/mount (util-linux, mount), mkfs.ext4 and
    // blkid (e2fsprogs); the instance tests fetch metadata with curl.
    "util-linux",
    "mount",
    "e2fsprogs",
    "curl",
    // The README walkthrough's web servers (`python3 -m http.server` in the instances).
    "python3",
];
/// The bpf-linker release series the eBPF build is verified with.
const BPF_LINKER_SERIES: &str = "0.13";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only report what is missing (exit non-zero if anything is); install nothing.
    #[arg(long)]
    check: bool,
}

pub fn main(args: &Args) -> Result<()> {
    if args.check {
        let missing = survey(Scope::All, false)?;
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(Missing::describe).collect();
            bail!(
                "missing: {}\nrun `cargo xtask setup` to install them",
                list.join("; ")
            );
        }
        println!("ok: everything is in place");
        return Ok(());
    }
    provide(Scope::All, false)?;
    println!("ok: setup complete");
    Ok(())
}

/// Everything needed to build, test and run: installs only what is missing. Fast when all is
/// present (no `apt-get update`, no network). With `quiet`, prints only what is missing.
pub fn ensure(quiet: bool) -> Result<()> {
    provide(Scope::All, quiet)
}

/// Like [`ensure`], limited to what building needs (no test tools, no bpffs, so no root once
/// the toolchain is installed).
pub fn ensure_build(quiet: bool) -> Result<()> {
    provide(Scope::Build, quiet)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Build tools only.
    Build,
    /// Build tools, test tools and bpffs.
    All,
}

#[derive(Debug)]
enum Missing {
    Apt(Vec<&'static str>),
    RustComponent {
        component: &'static str,
        toolchain: String,
    },
    BpfLinker {
        found: Option<String>,
    },
    Bpffs,
}

impl Missing {
    fn describe(&self) -> String {
        match self {
            Self::Apt(packages) => format!("debian packages {}", packages.join(" ")),
            Self::RustComponent {
                component,
                toolchain,
            } => format!("{component} for toolchain {toolchain}"),
            Self::BpfLinker { found: None } => format!("bpf-linker {BPF_LINKER_SERIES}"),
            Self::BpfLinker { found: Some(found) } => {
                format!("bpf-linker {BPF_LINKER_SERIES} (found {found})")
            }
            Self::Bpffs => format!("bpffs mounted at {BPFFS}"),
        }
    }

    fn needs_root(&self) -> bool {
        matches!(self, Self::Apt(_) | Self::Bpffs)
    }

    fn install(&self) -> Result<()> {
        match self {
            Self::Apt(packages) => {
                println!("installing: debian packages {}", packages.join(" "));
                util::run(util::command("apt-get").arg("update"))?;
                let mut cmd = util::command("apt-get");
                // tshark asks a debconf question otherwise.
                cmd.env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y", "--no-install-recommends"])
                    .args(packages);
                util::run(&mut cmd)
            }
            Self::RustComponent {
                component,
                toolchain,
            } => {
                println!("installing: {component} for toolchain {toolchain}");
                util::run(util::command("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    toolchain,
                ]))
            }
            Self::BpfLinker { .. } => {
                println!(
                    "installing: bpf-linker {BPF_LINKER_SERIES} with `cargo install` \
                     (compiles it against LLVM 22: this takes several minutes)"
                );
                let mut path = OsString::from("/usr/lib/llvm-22/bin:");
                path.push(util::child_path());
                let mut cmd = util::cargo([
                    "install",
                    "bpf-linker",
                    "--version",
                    &format!("^{BPF_LINKER_SERIES}"),
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]);
                cmd.env("PATH", path);
                util::run(&mut cmd)
            }
            Self::Bpffs => {
                println!("installing: mounting bpffs at {BPFFS}");
                util::run(util::command("mount").args(["-t", "bpf", "bpf", BPFFS]))
            }
        }
    }
}

/// Checks `scope`, then installs what is missing (failing first if that needs root and we are
/// not root), then checks again.
fn provide(scope: Scope, quiet: bool) -> Result<()> {
    let missing = survey(scope, quiet)?;
    if missing.is_empty() {
        return Ok(());
    }
    let need_root: Vec<String> = missing
        .iter()
        .filter(|m| m.needs_root())
        .map(Missing::describe)
        .collect();
    if !need_root.is_empty() && !util::is_root() {
        bail!(
            "root is needed to install: {}\nrun as root:\n{}",
            need_root.join("; "),
            util::sudo_hint("setup")
        );
    }
    for item in &missing {
        item.install()?;
    }
    let still_missing = survey(scope, true)?;
    if !still_missing.is_empty() {
        let list: Vec<String> = still_missing.iter().map(Missing::describe).collect();
        bail!("still missing after installing: {}", list.join("; "));
    }
    Ok(())
}

/// Runs every check of `scope`, printing one line each (only `missing:` lines when `quiet`).
fn survey(scope: Scope, quiet: bool) -> Result<Vec<Missing>> {
    let report = |ok: bool, what: &str| {
        if ok && !quiet {
            println!("ok: {what}");
        } else if !ok {
            println!("missing: {what}");
        }
    };
    let mut missing = Vec::new();

    let mut wanted: Vec<&'static str> = APT_BUILD.to_vec();
    if scope == Scope::All {
        wanted.extend_from_slice(APT_RUNTIME);
    }
    let absent: Vec<&'static str> = wanted
        .iter()
        .copied()
        .filter(|package| !apt_installed(package))
        .collect();
    if absent.is_empty() {
        report(true, &format!("debian packages {}", wanted.join(" ")));
    } else {
        report(false, &format!("debian packages {}", absent.join(" ")));
        missing.push(Missing::Apt(absent));
    }

    // rust-src for the eBPF toolchain (`-Z build-std=core`); rustfmt and clippy for `lint`
    // (the machine's rustup may ship without them; the eBPF crate is linted with its own
    // toolchain).
    let ebpf = ebpf_toolchain()?;
    let default = default_toolchain()?;
    for (component, toolchain, why) in [
        ("rust-src", &ebpf, "eBPF build"),
        ("rustfmt", &default, "lint"),
        ("clippy", &default, "lint"),
        ("clippy", &ebpf, "lint of the eBPF crate"),
    ] {
        let installed = util::probe(
            "rustup",
            ["component", "list", "--installed", "--toolchain", toolchain],
        )
        .is_some_and(|list| list.lines().any(|line| line.trim().starts_with(component)));
        report(
            installed,
            &format!("{component} for toolchain {toolchain} ({why})"),
        );
        if !installed {
            missing.push(Missing::RustComponent {
                component,
                toolchain: toolchain.clone(),
            });
        }
    }

    let linker = bpf_linker_version();
    let linker_ok = linker
        .as_deref()
        .is_some_and(|version| version.starts_with(&format!("{BPF_LINKER_SERIES}.")));
    match (&linker, linker_ok) {
        (Some(version), true) => report(true, &format!("bpf-linker {version}")),
        (Some(version), false) => report(
            false,
            &format!("bpf-linker {BPF_LINKER_SERIES} (found {version})"),
        ),
        (None, _) => report(false, &format!("bpf-linker {BPF_LINKER_SERIES}")),
    }
    if !linker_ok {
        missing.push(Missing::BpfLinker { found: linker });
    }

    if scope == Scope::All {
        let mounted = bpffs_mounted();
        report(mounted, &format!("bpffs mounted at {BPFFS}"));
        if !mounted {
            missing.push(Missing::Bpffs);
        }
    }
    Ok(missing)
}

fn apt_installed(package: &str) -> bool {
    util::probe("dpkg-query", ["-W", "-f=${Status}", package])
        .is_some_and(|status| status.contains("install ok installed"))
}

/// The toolchain the eBPF object is built with: `$VPC_EBPF_TOOLCHAIN`, else `nightly` if rustup
/// has a nightly, else `stable` (the same rule as controlplane's build.rs).
pub fn ebpf_toolchain() -> Result<String> {
    if let Ok(toolchain) = env::var("VPC_EBPF_TOOLCHAIN")
        && !toolchain.is_empty()
    {
        return Ok(toolchain);
    }
    let Some(list) = util::probe("rustup", ["toolchain", "list"]) else {
        bail!("`rustup toolchain list` failed: rustup must be on PATH (https://rustup.rs)");
    };
    let has_nightly = list.lines().any(|line| line.starts_with("nightly"));
    Ok(if has_nightly { "nightly" } else { "stable" }.to_string())
}

/// The toolchain plain `cargo` uses here (`rustup show active-toolchain`, first word).
fn default_toolchain() -> Result<String> {
    util::probe("rustup", ["show", "active-toolchain"])
        .and_then(|out| out.split_whitespace().next().map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("`rustup show active-toolchain` failed"))
}

/// The version printed by `bpf-linker --version`, found the way the eBPF build finds it: on
/// PATH, or in `~/.cargo/bin` (which [`util::child_path`] appends).
fn bpf_linker_version() -> Option<String> {
    let text = util::probe("bpf-linker", ["--version"])?;
    // `bpf-linker 0.13.0`
    text.split_whitespace().nth(1).map(str::to_string)
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
        })
    })
}
