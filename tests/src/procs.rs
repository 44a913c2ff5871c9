//! The project's real binaries (agent, CLI) as child processes inside test namespaces.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::{NetNs, NsChild};

/// Path of a workspace binary: `$env_var` (set by `cargo xtask test` and `bench`), else the
/// same profile directory as the running executable (`target/<profile>/` for binaries,
/// `target/<profile>/deps/` for tests).
pub fn workspace_bin(env_var: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no parent directory")?;
    let candidates = [Some(dir.join(name)), dir.parent().map(|d| d.join(name))];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} not found next to {}; build it (`cargo build -p controlplane -p vpc-cli`) \
                 or set {env_var}",
                exe.display()
            )
        })
}

/// A running `vpc-agent`, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Agent {
    child: NsChild,
    /// Lines the agent printed on stdout up to and including `ready`.
    pub startup: Vec<String>,
    /// Every line it printed so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `vpc-agent` in `ns` attached to `ifaces`, pinning under `pin_dir`, and waits
    /// (at most 30 s) until it reports ready.
    pub fn start(ns: &NetNs, pin_dir: &Path, ifaces: &[&str]) -> Result<Agent> {
        Self::start_with(ns, pin_dir, ifaces, &[])
    }

    /// As [`Agent::start`], with extra agent arguments (e.g. `--xdp-mode off`).
    pub fn start_with(
        ns: &NetNs,
        pin_dir: &Path,
        ifaces: &[&str],
        extra: &[&str],
    ) -> Result<Agent> {
        let bin = workspace_bin("VPC_AGENT_BIN", "vpc-agent")?;
        Self::start_bin(&bin, ns, pin_dir, ifaces, extra)
    }

    /// As [`Agent::start_with`], running the agent binary `bin` (e.g. the previous
    /// release's, in the upgrade test).
    pub fn start_bin(
        bin: &Path,
        ns: &NetNs,
        pin_dir: &Path,
        ifaces: &[&str],
        extra: &[&str],
    ) -> Result<Agent> {
        let mut cmd = Command::new(bin);
        cmd.arg("--pin-dir")
            .arg(pin_dir)
            .args(["--stats-interval", "0"])
            .args(extra);
        for i in ifaces {
            cmd.args(["--iface", i]);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            // Keep test output readable; set RUST_LOG to see the agent's info logs.
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = ns.spawn(cmd)?;
        let stdout = child.child_mut().stdout.take().context("agent stdout")?;
        let (tx, rx) = mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            // Keeps draining after startup (when nobody receives any more): a closed pipe
            // would make the agent's next line fail.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = all.lock() {
                    v.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let mut startup = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let ready = line.starts_with("ready");
                    startup.push(line);
                    if ready {
                        return Ok(Agent {
                            child,
                            startup,
                            lines,
                        });
                    }
                }
                Err(_) => {
                    let status = child.try_wait()?;
                    bail!("agent not ready after 30 s (exit: {status:?}); stdout: {startup:?}");
                }
            }
        }
    }

    /// Every line the agent printed on stdout so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Link ids the agent reported, in the order printed (`... link N program M`).
    pub fn link_ids(&self) -> Vec<u32> {
        self.startup
            .iter()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "link")?;
                words.next()?.parse().ok()
            })
            .collect()
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn crash(mut self) -> Result<()> {
        self.child.child_mut().kill()?;
        self.child.child_mut().wait()?;
        Ok(())
    }

    /// Stops the agent with SIGTERM and returns whether it exited successfully.
    pub fn stop(mut self) -> Result<bool> {
        Ok(self.child.stop()?.success())
    }
}

/// Runs the `vpc` CLI with `args` and returns its stdout; fails with its stderr.
pub fn cli(args: &[&str]) -> Result<String> {
    let bin = workspace_bin("VPC_CLI_BIN", "vpc")?;
    let out = Command::new(&bin).args(args).output()?;
    if !out.status.success() {
        bail!(
            "vpc {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
