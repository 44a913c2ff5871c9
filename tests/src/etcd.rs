//! A private single-member etcd for a test: [`EtcdServer::start`] runs `/usr/bin/etcd` (the
//! Debian package `etcd-server`; `ETCD_BIN` overrides the path) on 127.0.0.1 with free
//! ports and a fresh data directory, and waits until it is healthy; drop kills it and removes
//! the directory.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Where Debian's `etcd-server` installs etcd.
const DEFAULT_BIN: &str = "/usr/bin/etcd";
/// Longest wait for a new etcd to report healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Tries with new ports, for when another process takes a port between our probe and
/// etcd's bind.
const START_TRIES: usize = 3;

/// A running etcd, killed (and its data removed) on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client_url: String,
}

impl EtcdServer {
    /// Starts an etcd named after `tag` (unique per test) and waits, at most 20 s, until it
    /// answers `/health`. Fails, saying how to install it, when etcd is missing.
    pub fn start(tag: &str) -> Result<EtcdServer> {
        let bin =
            std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
        if !bin.is_file() {
            bail!(
                "etcd not found at {}: install the Debian package etcd-server (`cargo xtask \
                 setup` does) or set ETCD_BIN",
                bin.display()
            );
        }
        let mut last_error = None;
        for _ in 0..START_TRIES {
            match Self::try_start(&bin, tag) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn try_start(bin: &Path, tag: &str) -> Result<EtcdServer> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vpc-etcd-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = fs::File::create(dir.join("etcd.log")).context("creating etcd.log")?;
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let child = Command::new(bin)
            .arg("--name")
            .arg(tag)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("{tag}={peer_url}"))
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("etcd.log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // From here on, drop cleans up.
        let mut server = EtcdServer {
            child: Some(child),
            dir,
            client_url,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// Kills etcd now (SIGKILL), keeping its data until drop: for tests of an unreachable
    /// store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = self.client_url.trim_start_matches("http://").to_owned();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "etcd exited with {status} while starting:\n{}",
                    self.log_tail()
                );
            }
            if healthy(&addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd at {} not healthy within {START_TIMEOUT:?}:\n{}",
                    self.client_url,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines etcd logged.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on right now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Whether etcd at `addr` answers `GET /health` with `"health":"true"`.
fn healthy(addr: &str) -> bool {
    let probe = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    };
    probe().is_ok_and(|r| r.contains("\"health\":\"true\""))
}
