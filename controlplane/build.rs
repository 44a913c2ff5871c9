//! Builds the eBPF object (`dataplane-ebpf`, target `bpfel-unknown-none`) and tells rustc
//! where it is, so `src/datapath/object.rs` can embed it.
//!
//! Toolchain: `$VPC_EBPF_TOOLCHAIN` if set, else nightly if rustup has one, else the stable
//! toolchain with `RUSTC_BOOTSTRAP=1` (needed for `-Z build-std=core`). Either needs the
//! `rust-src` component and `bpf-linker` on PATH: `cargo xtask setup` installs both.
//!
//! The inner cargo uses its own target directory (`target/ebpf`), so it neither waits on the
//! outer build's lock nor rebuilds when the outer profile changes. Cargo re-runs this script
//! only when the eBPF or shared sources change; the inner build is incremental as well.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("controlplane sits in the workspace");
    for watched in [
        "dataplane-ebpf/src",
        "dataplane-ebpf/Cargo.toml",
        "dataplane-common/src",
        "dataplane-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=VPC_EBPF_TOOLCHAIN");

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");
    let toolchain = env::var("VPC_EBPF_TOOLCHAIN").unwrap_or_else(|_| pick_toolchain());

    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args(["run", &toolchain, "cargo", "build", "--release"])
        .args(["--package", "dataplane-ebpf", "--bin", "dataplane"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // Debug info becomes BTF (bpf-linker `--btf`): the verifier's log then names source
        // lines, and tools such as bpftool can print map values.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    if !toolchain.starts_with("nightly") {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    // Variables cargo sets for this build script describe the host build; the inner build
    // must not inherit them (they would point rustc at the host toolchain and flags).
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_ENCODED_RUSTFLAGS"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("PATH", path_with_cargo_bin());

    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup` to build the eBPF object ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building the eBPF object failed ({status}) with toolchain `{toolchain}`.\n\
             Missing tools? `cargo xtask setup` installs rust-src and bpf-linker."
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/dataplane");
    assert!(
        object.is_file(),
        "eBPF object missing at {}",
        object.display()
    );
    println!("cargo:rustc-env=DATAPLANE_EBPF_OBJECT={}", object.display());
}

/// Nightly when rustup has one, else stable (with `RUSTC_BOOTSTRAP`).
fn pick_toolchain() -> String {
    let out = Command::new("rustup").args(["toolchain", "list"]).output();
    let has_nightly = out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("nightly"))
    });
    if has_nightly { "nightly" } else { "stable" }.to_string()
}

/// PATH with `$CARGO_HOME/bin` appended, where `cargo install bpf-linker` puts the linker.
fn path_with_cargo_bin() -> std::ffi::OsString {
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|p| p.join("bin"));
    let mut paths: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(bin) = cargo_bin {
        paths.push(bin);
    }
    env::join_paths(paths).expect("PATH entries contain no separator")
}
