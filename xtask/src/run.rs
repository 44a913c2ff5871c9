//! `cargo xtask run [--release] [-- AGENT_ARGS...]`: builds and runs the appliance on this
//! host (as root): the control plane (embedded store under /var/lib/vpc) and a host agent
//! registered with it, ready for the `vpc` CLI.
//!
//! The control plane runs as a child; the agent replaces xtask (exec), so Ctrl-C reaches
//! both (one foreground process group) and each shuts down cleanly. Credentials are
//! generated on the first run (`/var/lib/vpc/credentials.json`, mode 0600) and the CLI's
//! environment is written to `/var/lib/vpc/env` (`source` it).

use std::{
    ffi::OsString,
    fs,
    io::Read as _,
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{setup, util};

/// Where the appliance keeps its state.
const STATE_DIR: &str = "/var/lib/vpc";
/// The control plane's address.
const LISTEN: &str = "127.0.0.1:7420";
/// The account `cargo xtask run` creates.
const ACCOUNT: &str = "123456789012";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build and run with the release profile.
    #[arg(long)]
    release: bool,
    /// Extra arguments for vpc-agent (e.g. `--iface eth1`).
    #[arg(last = true)]
    agent_args: Vec<OsString>,
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads or creates the credentials; returns (tenant token, agent token).
fn credentials(path: &Path) -> Result<(String, String)> {
    if !path.exists() {
        let (tenant, agent) = (random_hex(16)?, random_hex(16)?);
        let json = format!(
            "{{\n  \"accounts\": [{{\"id\": \"{ACCOUNT}\", \"tokens\": [\"{tenant}\"]}}],\n  \"agent_tokens\": [\"{agent}\"]\n}}\n"
        );
        fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        eprintln!("xtask: created credentials in {}", path.display());
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The file is ours (written above); pick the tokens out without a JSON dependency.
    let quoted: Vec<&str> = text.split('"').collect();
    let after = |key: &str| -> Option<String> {
        let i = quoted.iter().position(|s| *s == key)?;
        quoted.get(i + 2).map(|s| (*s).to_owned())
    };
    match (after("tokens"), after("agent_tokens")) {
        (Some(t), Some(a)) => Ok((t, a)),
        _ => bail!(
            "{} has no account or agent token; delete it to have new ones generated",
            path.display()
        ),
    }
}

/// This host's id: the hostname, lowercased, other characters turned into `-`.
fn host_id() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    let id: String = name
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if id.is_empty() { "host".into() } else { id }
}

pub fn main(args: &Args) -> Result<()> {
    util::require_root(
        "run",
        "the agent loads eBPF programs and attaches them to interfaces",
    )?;
    setup::ensure(true)?;
    let mut build = util::cargo(["build", "-p", "controlplane", "-p", "vpc-cli", "--bins"]);
    if args.release {
        build.arg("--release");
    }
    util::run(&mut build)?;

    let profile = if args.release { "release" } else { "debug" };
    let bin = util::target_dir()?.join(profile);
    let (agent, controlplane) = (bin.join("vpc-agent"), bin.join("vpc-controlplane"));
    for b in [&agent, &controlplane] {
        if !b.is_file() {
            bail!("the build produced no {}", b.display());
        }
    }
    fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let creds = Path::new(STATE_DIR).join("credentials.json");
    let (tenant, agent_token) = credentials(&creds)?;
    let env = format!(
        "export VPC_ENDPOINT=http://{LISTEN}\nexport VPC_TOKEN={tenant}\nexport PATH={}:$PATH\n",
        bin.display()
    );
    fs::write(Path::new(STATE_DIR).join("env"), &env)?;
    fs::set_permissions(
        Path::new(STATE_DIR).join("env"),
        fs::Permissions::from_mode(0o600),
    )?;

    if TcpStream::connect(LISTEN).is_ok() {
        bail!("something already listens on {LISTEN} (another `cargo xtask run`?)");
    }
    let mut cp = util::command(&controlplane);
    cp.args(["--listen", LISTEN, "--store"])
        .arg(format!("redb:{STATE_DIR}/store.redb"))
        .arg("--credentials")
        .arg(&creds);
    let mut child = cp.spawn().context("starting vpc-controlplane")?;
    let start = Instant::now();
    while TcpStream::connect(LISTEN).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("vpc-controlplane exited ({status}) before listening on {LISTEN}");
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("vpc-controlplane did not listen on {LISTEN} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "xtask: control plane on http://{LISTEN} (store {STATE_DIR}/store.redb)\n\
         xtask: in another shell: `source {STATE_DIR}/env` then e.g. `vpc vpcs create --cidr 10.0.0.0/16`"
    );
    let mut cmd = util::command(&agent);
    cmd.args(["--detach-on-exit", "--host", &host_id(), "--control-plane"])
        .arg(format!("http://{LISTEN}"))
        .env("VPC_AGENT_TOKEN", &agent_token)
        .args(&args.agent_args);
    // exec, not spawn: Ctrl-C reaches the whole foreground process group (agent and control
    // plane), each cleans up (both handle SIGINT), and the agent's exit code becomes ours.
    Err(util::exec(&mut cmd))
}
