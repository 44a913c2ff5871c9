//! Health checks of network load balancer targets, run from inside the VPC.
//!
//! The semantics are AWS NLB's: a TCP check is healthy when the connection is established; an
//! HTTP check sends `GET path` and is healthy when the response's status is 200-399. The host
//! agent runs the checks over the VPC datapath the way a real client would: each probe source
//! is a network namespace whose one interface (a veth, the other end attached to the datapath)
//! has an address from the tenant's subnet and a default route to the subnet's gateway, so
//! probe packets go through the same datapath (routing, security groups, ACLs) as tenant
//! traffic.
//!
//! # Why a namespace owned by a thread
//!
//! Tenant address ranges overlap across VPCs, so each probe source needs its own addresses,
//! routes and neighbours: a namespace per source, and nothing toward tenant ranges in the
//! agent's own namespace.
//!
//! A [`ProbeNs`] is a namespace that a dedicated OS thread creates with `unshare(CLONE_NEWNET)`
//! and that nothing else refers to (no bind mount, no name under /run/netns):
//!
//! - It lives as long as the thread. When the thread exits, or the process dies (a crash
//!   included), the namespace loses its last reference and the kernel destroys it, a few
//!   milliseconds later, with its interfaces; destroying the namespace's end of a veth
//!   destroys the pair. A crashed agent leaks no namespace, interface or route, and a
//!   restarted one starts from a clean slate. (A namespace named under /run/netns is a bind
//!   mount, which outlives a crash and must be cleaned up.)
//! - The network namespace is a per-thread attribute: `unshare` moves the calling thread only,
//!   never the rest of the (multi-threaded) agent. A socket belongs to the namespace its
//!   creating thread was in when it was created, and a child process starts in its spawning
//!   thread's namespace. So the thread runs a current-thread tokio runtime on which every probe
//!   runs (its socket is created there), and `ip` commands are spawned from it.
//!
//! The caller talks to the thread through a channel of jobs (configure, probe, shutdown), each
//! with a oneshot reply. Each probe runs as a task on the thread's runtime, so one thread
//! checks hundreds of targets at once; `ip` commands run one at a time, in order, on a worker
//! task, without holding up probes.
//!
//! The agent creates the veth in its own namespace and moves one end in by the thread's id
//! ([`ProbeNs::tid`]: the kernel resolves a tid like a pid in `ip link ... netns <tid>`), then
//! calls [`ProbeNs::configure`].
//!
//! # Closing connections
//!
//! A check closes its connection the way a polite client does: it sends a FIN
//! (`shutdown(SHUT_WR)`), reads and discards whatever the target still sends (Linux answers a
//! close with unread received data with a RST) and closes once the target has closed too. The
//! outcome is reported before that, so closing does not count against the check's timeout. A
//! connection that has not finished closing two seconds later, or that is cut short by a
//! timeout or by shutdown, is reset instead: an orphaned socket still holds a reference to its
//! namespace, which would otherwise outlive the thread, interfaces included, until the kernel
//! gave up on the connection.

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::{Output, Stdio},
    sync::mpsc as std_mpsc,
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, unshare};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

/// How long a check's connection may take to close gracefully once the outcome is known.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How much of an HTTP response is searched for the status line.
const MAX_STATUS_LINE: usize = 4096;
/// Longest HTTP health check path (AWS's limit).
const MAX_PATH: usize = 1024;
/// How long the namespace's thread waits for its runtime's leftover work when stopping.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Longest interface name Linux accepts (`IFNAMSIZ - 1`).
const MAX_IFNAME: usize = 15;

/// A network namespace owned by a dedicated OS thread, which created it with
/// `unshare(CLONE_NEWNET)`. There is no bind mount and no name in /run/netns: the namespace
/// disappears, with its interfaces, when the thread exits or the process dies, so a crashed
/// agent leaks nothing.
///
/// The thread runs a current-thread tokio runtime; probes run there, so their sockets are
/// created inside the namespace. Dropping the value stops the thread, like
/// [`ProbeNs::shutdown`].
///
/// All methods take `&self` and the type is `Send + Sync`: many tasks may probe through one
/// namespace at once.
pub struct ProbeNs {
    label: String,
    tid: i32,
    jobs: mpsc::UnboundedSender<Job>,
    thread: Option<thread::JoinHandle<()>>,
}

impl fmt::Debug for ProbeNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeNs")
            .field("label", &self.label)
            .field("tid", &self.tid)
            .finish_non_exhaustive()
    }
}

/// What a health check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// Healthy when a TCP connection to the target is established.
    Tcp,
    /// Sends `GET path HTTP/1.1`; healthy when the response's status is 200-399.
    Http {
        /// The request target: starts with `/`, printable ASCII without spaces, at most
        /// 1024 bytes. Any other path makes every check unhealthy.
        path: String,
    },
}

/// One health check's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What the check does.
    pub kind: ProbeKind,
    /// Bound on the whole check: connecting and, for HTTP, sending the request and reading
    /// the status line. (AWS allows 2-120 s for NLB targets; any value is accepted here.)
    pub timeout: Duration,
}

/// The result of one health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The target passed the check.
    Healthy,
    /// The target failed the check, with a short reason: `"connection refused"`,
    /// `"timed out after 2s"`, `"HTTP 503"`, ...
    Unhealthy(String),
}

/// Why a [`ProbeNs`] could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The namespace's thread could not be spawned.
    #[error("spawning the probe namespace thread: {0}")]
    Thread(#[source] io::Error),
    /// `unshare(CLONE_NEWNET)` failed; `EPERM` means the agent lacks `CAP_SYS_ADMIN`.
    #[error("unshare(CLONE_NEWNET): {0} (creating a network namespace needs CAP_SYS_ADMIN)")]
    Unshare(#[source] nix::Error),
    /// The namespace's tokio runtime could not be built.
    #[error("building the probe namespace's tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// A command run in the namespace failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Why: the exit status and the command's stderr, or why it could not be run.
        reason: String,
    },
    /// An argument was rejected before anything was run.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The namespace's thread has exited (after a panic: it only exits when told to).
    #[error("the probe namespace's thread has exited")]
    Gone,
}

/// The outcome reported when the namespace's thread is gone.
const GONE: &str = "probe namespace is shut down";

/// Commands for the `ip` worker and where to send their stdouts.
type IpJob = (
    Vec<Vec<String>>,
    oneshot::Sender<Result<Vec<String>, ProbeError>>,
);

/// Work for the namespace's thread.
enum Job {
    /// Run one check and send the outcome.
    Probe {
        target: SocketAddrV4,
        spec: ProbeSpec,
        reply: oneshot::Sender<ProbeOutcome>,
    },
    /// Run `ip` with each argument list in turn, stopping at the first failure.
    Ip(IpJob),
    /// Stop the thread (in-flight probes are dropped: their callers see [`GONE`]).
    Shutdown,
}

impl ProbeNs {
    /// Spawns the thread, which unshares into a new network namespace and brings `lo` up.
    /// `label` names the thread (Linux keeps the first 15 bytes).
    ///
    /// Returns once the namespace exists and the thread is ready for jobs (a few
    /// milliseconds: a thread, an `unshare` and one `ip` run); an `unshare` failure (e.g.
    /// `EPERM` without `CAP_SYS_ADMIN`) is returned as [`ProbeError::Unshare`].
    pub fn spawn(label: &str) -> Result<ProbeNs, ProbeError> {
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        // The builder panics on a name with NUL bytes.
        let name: String = label.chars().filter(|&c| c != '\0').collect();
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || namespace_thread(&ready_tx, jobs_rx))
            .map_err(ProbeError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(tid)) => Ok(ProbeNs {
                label: label.to_owned(),
                tid,
                jobs,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread panicked before reporting.
            Err(_) => {
                let _ = thread.join();
                Err(ProbeError::Gone)
            }
        }
    }

    /// The thread's id. `ip link set DEV netns <tid>` and `ip link add ... peer name X netns
    /// <tid>` move an interface into this namespace (the kernel resolves a tid like a pid).
    /// The namespace is also reachable as `/proc/<pid>/task/<tid>/ns/net` while it exists;
    /// keeping that open keeps the namespace alive.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Configures interface `ifname`, which must already be in this namespace: MAC address,
    /// MTU, the one IPv4 address `addr/prefix` (other IPv4 addresses are removed), up, and a
    /// default route via `gateway` (which must be inside `addr/prefix`).
    ///
    /// Runs `ip` commands from the namespace's thread, in order; it may be called again to
    /// change the configuration (the address is briefly absent while it is replaced). The
    /// error of a failing command names the command line and carries its stderr.
    pub async fn configure(
        &self,
        ifname: &str,
        mac: [u8; 6],
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
        mtu: u32,
    ) -> Result<(), ProbeError> {
        validate_ifname(ifname)?;
        if prefix > 32 {
            return Err(ProbeError::InvalidArgument(format!(
                "prefix length /{prefix} is longer than 32"
            )));
        }
        let mac = format_mac(mac);
        let mtu = mtu.to_string();
        let cidr = format!("{addr}/{prefix}");
        let gateway = gateway.to_string();
        let commands: [&[&str]; 5] = [
            &["link", "set", "dev", ifname, "address", &mac, "mtu", &mtu],
            &["-4", "addr", "flush", "dev", ifname],
            &["addr", "add", &cidr, "dev", ifname],
            &["link", "set", "dev", ifname, "up"],
            &[
                "route", "replace", "default", "via", &gateway, "dev", ifname,
            ],
        ];
        self.run_ip(commands.iter().map(|args| to_strings(args)).collect())
            .await
            .map(drop)
    }

    /// Runs one health check of `target` from inside the namespace. The outcome comes within
    /// `check.timeout` (plus scheduling); never panics. If the namespace's thread is gone the
    /// outcome is `Unhealthy("probe namespace is shut down")`. Dropping the future abandons
    /// the check (its connection is reset).
    pub async fn probe(&self, target: SocketAddrV4, check: &ProbeSpec) -> ProbeOutcome {
        let (reply, outcome) = oneshot::channel();
        let job = Job::Probe {
            target,
            spec: check.clone(),
            reply,
        };
        if self.jobs.send(job).is_err() {
            return ProbeOutcome::Unhealthy(GONE.to_owned());
        }
        outcome
            .await
            .unwrap_or_else(|_| ProbeOutcome::Unhealthy(GONE.to_owned()))
    }

    /// Stops the thread; the namespace and its interfaces go away. Dropping the value does
    /// the same.
    ///
    /// Blocks until the thread has exited: in-flight probes and commands are abandoned
    /// (their connections reset), which takes well under a millisecond normally and at most
    /// about a second. The kernel then destroys the namespace asynchronously: its interfaces
    /// (and the other ends of its veths) disappear shortly after, not necessarily before this
    /// returns.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.jobs.send(Job::Shutdown);
        if let Some(thread) = self.thread.take()
            // Joining itself would fail; nothing runs on the thread that could drop us, but
            // be safe.
            && thread.thread().id() != thread::current().id()
            && thread.join().is_err()
        {
            tracing::warn!(label = %self.label, "probe namespace thread panicked");
        }
    }

    /// Runs `ip` with each argument list in turn from the namespace's thread; returns their
    /// stdouts, or the first failure.
    async fn run_ip(&self, commands: Vec<Vec<String>>) -> Result<Vec<String>, ProbeError> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Job::Ip((commands, reply)))
            .map_err(|_| ProbeError::Gone)?;
        result.await.map_err(|_| ProbeError::Gone)?
    }
}

impl Drop for ProbeNs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The namespace's thread: creates the namespace, reports, then serves jobs until told to
/// stop or until the [`ProbeNs`] is dropped.
fn namespace_thread(
    ready: &std_mpsc::SyncSender<Result<i32, ProbeError>>,
    jobs: mpsc::UnboundedReceiver<Job>,
) {
    let runtime = match enter_new_namespace() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let tid = nix::unistd::gettid().as_raw();
    if ready.send(Ok(tid)).is_err() {
        return;
    }
    runtime.block_on(serve(jobs));
    // Drops the remaining tasks (probes, `ip` children: killed on drop).
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
}

/// Moves the calling thread into a new network namespace, brings `lo` up and builds the
/// runtime the namespace's work runs on.
fn enter_new_namespace() -> Result<tokio::runtime::Runtime, ProbeError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(ProbeError::Unshare)?;
    let args = to_strings(&["link", "set", "dev", "lo", "up"]);
    let output = std::process::Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output();
    command_result(&args, output)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ProbeError::Runtime)
}

/// Dispatches jobs: each probe becomes a task, `ip` commands go to one worker task (in
/// order, one at a time), so neither holds up the other.
async fn serve(mut jobs: mpsc::UnboundedReceiver<Job>) {
    let (ip_jobs, ip_rx) = mpsc::unbounded_channel();
    tokio::spawn(ip_worker(ip_rx));
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Probe {
                target,
                spec,
                reply,
            } => {
                tokio::spawn(probe_task(target, spec, reply));
            }
            // The worker only stops when `ip_jobs` is dropped; if it panicked, the reply
            // sender is dropped and the caller sees `Gone`.
            Job::Ip(job) => {
                let _ = ip_jobs.send(job);
            }
            Job::Shutdown => break,
        }
    }
}

/// Runs `ip` commands, one job at a time.
async fn ip_worker(mut jobs: mpsc::UnboundedReceiver<IpJob>) {
    while let Some((commands, reply)) = jobs.recv().await {
        let mut stdouts = Vec::with_capacity(commands.len());
        let mut result = Ok(());
        for args in &commands {
            // Spawned from this thread (tasks of a current-thread runtime are polled on it),
            // so the child starts in this namespace.
            let output = tokio::process::Command::new("ip")
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await;
            match command_result(args, output) {
                Ok(stdout) => stdouts.push(stdout),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let _ = reply.send(result.map(|()| stdouts));
    }
}

/// `ip ARGS`'s stdout, or an error naming the command line with the exit status and stderr.
fn command_result(args: &[String], output: io::Result<Output>) -> Result<String, ProbeError> {
    let command = || format!("ip {}", args.join(" "));
    match output {
        Err(e) => Err(ProbeError::Command {
            command: command(),
            reason: format!("cannot run ip: {e}"),
        }),
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            Err(ProbeError::Command {
                command: command(),
                reason: if stderr.is_empty() {
                    out.status.to_string()
                } else {
                    format!("{}: {stderr}", out.status)
                },
            })
        }
    }
}

fn to_strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|&a| a.to_owned()).collect()
}

/// Rejects names Linux would refuse (or `ip` would parse as something else).
fn validate_ifname(ifname: &str) -> Result<(), ProbeError> {
    let ok = !ifname.is_empty()
        && ifname.len() <= MAX_IFNAME
        && ifname != "."
        && ifname != ".."
        && ifname
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(ProbeError::InvalidArgument(format!(
            "interface name {ifname:?}: 1-{MAX_IFNAME} printable ASCII characters, no '/' or ':'"
        )))
    }
}

/// `02:00:00:00:00:01`.
fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// One probe, on the namespace's runtime: the check, the reply, then the connection's close.
async fn probe_task(
    target: SocketAddrV4,
    spec: ProbeSpec,
    mut reply: oneshot::Sender<ProbeOutcome>,
) {
    let mut conn = None;
    let outcome = tokio::select! {
        outcome = run_check(target, &spec, &mut conn) => outcome,
        // The caller gave up: stop now (`conn`, if any, is reset when dropped).
        () = reply.closed() => return,
    };
    let _ = reply.send(outcome);
    if let Some(conn) = conn {
        conn.close().await;
    }
}

/// The check under its timeout. The connection, once established, is left in `conn` (also
/// when the check times out) for the caller to close.
async fn run_check(
    target: SocketAddrV4,
    spec: &ProbeSpec,
    conn: &mut Option<Conn>,
) -> ProbeOutcome {
    match tokio::time::timeout(spec.timeout, check(target, &spec.kind, conn)).await {
        Ok(Ok(())) => ProbeOutcome::Healthy,
        Ok(Err(reason)) => ProbeOutcome::Unhealthy(reason),
        Err(_) => ProbeOutcome::Unhealthy(format!("timed out after {:?}", spec.timeout)),
    }
}

/// The check without its timeout: `Err` holds the reason it failed.
async fn check(
    target: SocketAddrV4,
    kind: &ProbeKind,
    conn: &mut Option<Conn>,
) -> Result<(), String> {
    if let ProbeKind::Http { path } = kind {
        validate_path(path)?;
    }
    let stream = TcpStream::connect(SocketAddr::V4(target))
        .await
        .map_err(|e| io_reason(&e))?;
    let conn = conn.insert(Conn {
        stream,
        closed_cleanly: false,
    });
    match kind {
        ProbeKind::Tcp => Ok(()),
        ProbeKind::Http { path } => http_check(&mut conn.stream, target, path).await,
    }
}

/// Sends the request and judges the status line.
async fn http_check(
    stream: &mut TcpStream,
    target: SocketAddrV4,
    path: &str,
) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: vpc-health-check\r\nConnection: close\r\n\r\n",
        target.ip(),
        target.port()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {}", io_reason(&e)))?;
    let line = read_status_line(stream).await?;
    let code = parse_status_code(&line)?;
    if (200..=399).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// The response's first line, without its line ending, from its first [`MAX_STATUS_LINE`]
/// bytes.
async fn read_status_line(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut buf = vec![0; MAX_STATUS_LINE];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(buf);
        }
        if len == buf.len() {
            return Err(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes of the response"
            ));
        }
        match stream.read(&mut buf[len..]).await {
            Ok(0) if len == 0 => return Err("connection closed without a response".to_owned()),
            Ok(0) => return Err("connection closed in the status line".to_owned()),
            Ok(n) => len += n,
            Err(e) => return Err(format!("reading the response: {}", io_reason(&e))),
        }
    }
}

/// The status code of an `HTTP/x.y NNN reason` line.
fn parse_status_code(line: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(line);
    let malformed = || {
        let shown: String = text.chars().take(64).collect();
        format!("malformed HTTP status line {shown:?}")
    };
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(malformed());
    }
    code.parse().map_err(|_| malformed())
}

/// A path that can go into the request line as is (no spaces, no line breaks).
fn validate_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') && path.len() <= MAX_PATH && path.bytes().all(|b| b.is_ascii_graphic())
    {
        Ok(())
    } else {
        Err(format!(
            "invalid HTTP health check path {path:?}: it must start with '/' and hold at most \
             {MAX_PATH} printable ASCII characters, no spaces"
        ))
    }
}

/// A short reason for a socket error.
fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let reason = match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::HostUnreachable => "host unreachable",
        K::NetworkUnreachable => "network unreachable",
        K::TimedOut => "connection timed out",
        K::AddrNotAvailable => "no usable local address",
        _ => return e.to_string(),
    };
    reason.to_owned()
}

/// A check's connection. Reset (RST) when dropped unless [`Conn::close`] finished cleanly.
struct Conn {
    stream: TcpStream,
    closed_cleanly: bool,
}

impl Conn {
    /// Sends a FIN, then reads and discards until the target closes (at most
    /// [`CLOSE_LINGER`]): the socket is then closed without a RST.
    async fn close(mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let mut buf = vec![0; 4096];
        let drained = tokio::time::timeout(CLOSE_LINGER, async {
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(_) => break false,
                }
            }
        })
        .await;
        self.closed_cleanly = matches!(drained, Ok(true));
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.closed_cleanly {
            // With a zero linger, close sends a RST and frees the socket at once: an
            // orphaned socket would keep the namespace alive.
            let _ = self.stream.set_zero_linger();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        io::{Read, Write},
        net::TcpListener,
        os::unix::fs::MetadataExt,
        path::Path,
        process::Command,
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU32, Ordering},
        },
        time::Instant,
    };

    use super::*;

    const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    /// On the link's subnet, but nobody answers ARP for it: packets to it are dropped.
    const BLACKHOLE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
    const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 0, 1];
    const PROBE_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 0, 2];
    const MTU: u32 = 1400;

    const TCP_PORT: u16 = 7000;
    const CLOSED_PORT: u16 = 7001;
    const HTTP_OK_PORT: u16 = 8000;
    const HTTP_REDIRECT_PORT: u16 = 8001;
    const HTTP_UNAVAILABLE_PORT: u16 = 8002;
    const HTTP_SILENT_PORT: u16 = 8003;
    const HTTP_GARBAGE_PORT: u16 = 8004;

    /// Slack on top of a check's timeout.
    const SLACK: Duration = Duration::from_millis(500);
    /// The timeout of checks that should not time out: TCP retransmits a lost SYN after 1 s,
    /// so a 1 s timeout would turn one packet lost on a busy machine into a failed test.
    const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
    /// The timeout of checks that should time out.
    const SHORT_TIMEOUT: Duration = Duration::from_secs(1);

    fn tcp() -> ProbeSpec {
        ProbeSpec {
            kind: ProbeKind::Tcp,
            timeout: CHECK_TIMEOUT,
        }
    }

    fn http(path: &str) -> ProbeSpec {
        ProbeSpec {
            kind: ProbeKind::Http {
                path: path.to_owned(),
            },
            timeout: CHECK_TIMEOUT,
        }
    }

    /// `spec` with [`SHORT_TIMEOUT`].
    fn short(spec: ProbeSpec) -> ProbeSpec {
        ProbeSpec {
            timeout: SHORT_TIMEOUT,
            ..spec
        }
    }

    fn at(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(SERVER_IP, port)
    }

    fn unhealthy(reason: &str) -> ProbeOutcome {
        ProbeOutcome::Unhealthy(reason.to_owned())
    }

    /// An interface name unique to this test run: the pid and a sequence number.
    fn unique_ifname() -> String {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hcs{}n{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        assert!(name.len() <= MAX_IFNAME, "{name} is too long");
        name
    }

    /// `/proc/<pid>/task/<tid>`: the namespace's thread.
    fn task_dir(ns: &ProbeNs) -> String {
        format!("/proc/{}/task/{}", std::process::id(), ns.tid())
    }

    /// Panics unless `ns`'s thread is in another network namespace than the test.
    fn assert_separate(ns: &ProbeNs) {
        let ours = fs::metadata("/proc/self/ns/net").expect("our netns").ino();
        let theirs = fs::metadata(format!("{}/ns/net", task_dir(ns)))
            .expect("the thread's netns")
            .ino();
        assert_ne!(ours, theirs, "the thread must be in another namespace");
    }

    /// Runs `f` on a scoped thread that entered `ns`'s namespace with setns(2).
    fn in_namespace<T: Send>(ns: &ProbeNs, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{}/ns/net", task_dir(ns));
        let fd = fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("helper thread panicked")
        })
    }

    /// Runs `ip ARGS` in `ns`; returns stdout.
    async fn ip_in(ns: &ProbeNs, args: &[&str]) -> Result<String, ProbeError> {
        let mut out = ns.run_ip(vec![to_strings(args)]).await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Runs `ip ARGS` in the test's own namespace; returns whether it succeeded and stdout +
    /// stderr.
    fn ip_here(args: &[&str]) -> (bool, String) {
        let out = Command::new("ip").args(args).output().expect("running ip");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Polls `cond` every 20 ms for up to `limit`.
    async fn eventually(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if cond().await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What a test server does with a connection.
    #[derive(Clone)]
    enum Behaviour {
        /// Accepts, then waits for the client to close.
        Tcp,
        /// Reads the request, sends this response, then waits for the client to close.
        Http(Vec<u8>),
        /// Reads the request, never answers, waits for the client to close.
        Silent,
    }

    /// What a test server saw.
    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        /// The request, as received.
        Request(String),
        /// How the client closed: `"eof"` (FIN), `"reset"` (RST) or an error.
        Closed(String),
    }

    /// A tiny blocking server on its own thread (and one per connection), stopped and joined
    /// on drop. Its accept loop ends by itself after a minute; each read times out after 3 s
    /// and each connection is given up after about 5 s.
    struct Server {
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
        events: Mutex<std_mpsc::Receiver<Event>>,
    }

    impl Server {
        fn start(listener: TcpListener, behaviour: Behaviour) -> Server {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, events) = std_mpsc::channel();
            let stopping = Arc::clone(&stop);
            let thread = thread::spawn(move || {
                listener
                    .set_nonblocking(true)
                    .expect("nonblocking listener");
                let deadline = Instant::now() + Duration::from_secs(60);
                // A thread per connection, all joined before the server's thread ends.
                thread::scope(|s| {
                    while !stopping.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                let (behaviour, tx) = (&behaviour, tx.clone());
                                s.spawn(move || handle(stream, behaviour, &tx));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(5)),
                        }
                    }
                });
            });
            Server {
                stop,
                thread: Some(thread),
                events: Mutex::new(events),
            }
        }

        fn next_event(&self) -> Event {
            self.events
                .lock()
                .expect("events lock")
                .recv_timeout(Duration::from_secs(5))
                .expect("no event from the test server within 5 s")
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn handle(
        mut stream: std::net::TcpStream,
        behaviour: &Behaviour,
        events: &std_mpsc::Sender<Event>,
    ) {
        stream.set_nonblocking(false).expect("blocking stream");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("read timeout");
        match behaviour {
            Behaviour::Tcp => {}
            Behaviour::Http(response) => {
                let _ = events.send(Event::Request(read_request(&mut stream)));
                let _ = stream.write_all(response);
            }
            Behaviour::Silent => {
                let _ = events.send(Event::Request(read_request(&mut stream)));
            }
        }
        let _ = events.send(Event::Closed(wait_for_close(&mut stream)));
    }

    /// Reads up to the end of the request head.
    fn read_request(stream: &mut std::net::TcpStream) -> String {
        let mut request = Vec::new();
        let mut buf = [0; 1024];
        while !request.ends_with(b"\r\n\r\n") && request.len() < 16384 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&request).into_owned()
    }

    /// Reads until the client closes; says how. A RST that follows the FIN does not show in
    /// `read` (which reports the FIN's end of file first), so the socket's pending error is
    /// checked a little later: the client must keep its end open until this end closes.
    fn wait_for_close(stream: &mut std::net::TcpStream) -> String {
        let mut buf = [0; 4096];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) => {
                    thread::sleep(Duration::from_millis(50));
                    return match stream.take_error() {
                        Ok(None) => "eof".to_owned(),
                        Ok(Some(e)) => format!("reset after the FIN: {e}"),
                        Err(e) => format!("error: {e}"),
                    };
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return "reset".to_owned(),
                Err(e) => return format!("error: {e}"),
            }
        }
        "client still sending".to_owned()
    }

    /// Two namespaces joined by a veth, with test servers on one side:
    ///
    /// `probe` (hc0, 10.77.0.2/24) <-> `server` (`server_if`, 10.77.0.1/24).
    ///
    /// Nothing is configured in the test's own namespace. Everything disappears when the
    /// value is dropped (also on a panic): the servers stop, the threads exit, the namespaces
    /// and the veth go away.
    struct Lab {
        probe: ProbeNs,
        server: ProbeNs,
        server_if: String,
        tcp: Server,
        ok: Server,
        redirect: Server,
        unavailable: Server,
        silent: Server,
        garbage: Server,
    }

    impl Lab {
        async fn new() -> Lab {
            let probe = ProbeNs::spawn("hc-test-probe").expect("probe namespace");
            let server = ProbeNs::spawn("hc-test-server").expect("server namespace");
            // Everything below happens in these two namespaces: make sure they are not ours.
            assert_separate(&probe);
            assert_separate(&server);
            let server_if = unique_ifname();
            // Both ends are created directly in their namespaces: nothing appears here.
            let (ok, out) = ip_here(&[
                "link",
                "add",
                &server_if,
                "netns",
                &server.tid().to_string(),
                "type",
                "veth",
                "peer",
                "name",
                "hc0",
                "netns",
                &probe.tid().to_string(),
            ]);
            assert!(ok, "creating the veth: {out}");
            let (here, _) = ip_here(&["link", "show", "dev", &server_if]);
            if here {
                ip_here(&["link", "del", "dev", &server_if]);
                panic!("{server_if} must not be in the test's namespace");
            }

            server
                .configure(&server_if, SERVER_MAC, SERVER_IP, 24, PROBE_IP, MTU)
                .await
                .expect("configuring the server side");
            probe
                .configure("hc0", PROBE_MAC, PROBE_IP, 24, SERVER_IP, MTU)
                .await
                .expect("configuring the probe side");

            let listeners = in_namespace(&server, || {
                [
                    TCP_PORT,
                    HTTP_OK_PORT,
                    HTTP_REDIRECT_PORT,
                    HTTP_UNAVAILABLE_PORT,
                    HTTP_SILENT_PORT,
                    HTTP_GARBAGE_PORT,
                ]
                .map(|port| {
                    TcpListener::bind(SocketAddrV4::new(SERVER_IP, port))
                        .unwrap_or_else(|e| panic!("binding port {port}: {e}"))
                })
            });
            let [tcp, ok, redirect, unavailable, silent, garbage] = listeners;
            let mut big =
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 65536\r\n\r\n".to_vec();
            big.resize(big.len() + 65536, b'x');
            Lab {
                probe,
                server,
                server_if,
                tcp: Server::start(tcp, Behaviour::Tcp),
                ok: Server::start(
                    ok,
                    Behaviour::Http(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                            .to_vec(),
                    ),
                ),
                redirect: Server::start(
                    redirect,
                    Behaviour::Http(
                        b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n".to_vec(),
                    ),
                ),
                // A body far larger than what the probe reads: closing without draining it
                // would reset the connection.
                unavailable: Server::start(unavailable, Behaviour::Http(big)),
                silent: Server::start(silent, Behaviour::Silent),
                garbage: Server::start(
                    garbage,
                    Behaviour::Http(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
                ),
            }
        }
    }

    /// Whether interface `ifname` exists in `ns`.
    async fn veth_exists(ns: &ProbeNs, ifname: &str) -> bool {
        match ip_in(ns, &["link", "show", "dev", ifname]).await {
            Ok(_) => true,
            Err(ProbeError::Command { reason, .. }) if reason.contains("does not exist") => false,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[tokio::test]
    async fn spawn_creates_a_separate_namespace_with_lo_up() {
        let ns = ProbeNs::spawn("hc-test-spawn").expect("spawn");
        let pid = std::process::id();
        assert!(ns.tid() > 0);
        assert_ne!(
            u32::try_from(ns.tid()).ok(),
            Some(pid),
            "the tid of a new thread, not the pid"
        );

        assert_separate(&ns);
        let comm = fs::read_to_string(format!("{}/comm", task_dir(&ns))).expect("comm");
        assert_eq!(comm.trim(), "hc-test-spawn");

        let links = ip_in(&ns, &["-o", "link", "show"])
            .await
            .expect("ip link show");
        assert_eq!(links.lines().count(), 1, "only lo: {links}");
        assert!(
            links.contains("lo:") && links.contains(",UP"),
            "lo is up: {links}"
        );
        ns.shutdown();
    }

    #[tokio::test]
    async fn spawn_truncates_long_labels_and_strips_nul() {
        let ns = ProbeNs::spawn("hc-a-very-long\0-label-indeed").expect("spawn");
        let comm = fs::read_to_string(format!("{}/comm", task_dir(&ns))).expect("comm");
        assert_eq!(comm.trim(), "hc-a-very-long-");
    }

    #[tokio::test]
    async fn configure_sets_mac_mtu_address_and_default_route() {
        let lab = Lab::new().await;
        // Twice: configure is repeatable.
        for _ in 0..2 {
            let link = ip_in(&lab.probe, &["-o", "link", "show", "dev", "hc0"])
                .await
                .expect("link");
            assert!(link.contains("mtu 1400"), "{link}");
            assert!(link.contains("link/ether 02:00:00:77:00:02"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            let addrs = ip_in(&lab.probe, &["-o", "-4", "addr", "show", "dev", "hc0"])
                .await
                .expect("addr");
            assert_eq!(addrs.lines().count(), 1, "{addrs}");
            assert!(addrs.contains("inet 10.77.0.2/24"), "{addrs}");
            let routes = ip_in(&lab.probe, &["route", "show", "default"])
                .await
                .expect("route");
            assert_eq!(routes.trim(), "default via 10.77.0.1 dev hc0", "{routes}");
            lab.probe
                .configure("hc0", PROBE_MAC, PROBE_IP, 24, SERVER_IP, MTU)
                .await
                .expect("configure again");
        }
        // A new address replaces the old one.
        lab.probe
            .configure(
                "hc0",
                PROBE_MAC,
                Ipv4Addr::new(10, 77, 0, 3),
                24,
                SERVER_IP,
                MTU,
            )
            .await
            .expect("configure a new address");
        let addrs = ip_in(&lab.probe, &["-o", "-4", "addr", "show", "dev", "hc0"])
            .await
            .expect("addr");
        assert_eq!(addrs.lines().count(), 1, "{addrs}");
        assert!(addrs.contains("inet 10.77.0.3/24"), "{addrs}");
        assert_eq!(
            lab.probe.probe(at(TCP_PORT), &tcp()).await,
            ProbeOutcome::Healthy
        );

        // Nothing leaked into the test's namespace.
        let (_, here) = ip_here(&["-o", "addr", "show"]);
        assert!(!here.contains("10.77.0."), "{here}");
    }

    #[tokio::test]
    async fn configure_errors_name_the_command_and_its_stderr() {
        let ns = ProbeNs::spawn("hc-test-errors").expect("spawn");
        let err = ns
            .configure("nope0", PROBE_MAC, PROBE_IP, 24, SERVER_IP, MTU)
            .await
            .expect_err("no such interface");
        let ProbeError::Command { command, reason } = &err else {
            panic!("expected a command error, got {err:?}");
        };
        assert_eq!(
            command,
            "ip link set dev nope0 address 02:00:00:77:00:02 mtu 1400"
        );
        assert!(
            reason.contains("exit status") && reason.contains("Cannot find device"),
            "{reason}"
        );
        assert!(
            err.to_string().starts_with("`ip link set dev nope0"),
            "{err}"
        );

        for (ifname, prefix) in [
            ("hc0", 33),
            ("", 24),
            ("abcdefghijklmnop", 24),
            ("a/b", 24),
            ("a b", 24),
        ] {
            let result = ns
                .configure(ifname, PROBE_MAC, PROBE_IP, prefix, SERVER_IP, MTU)
                .await;
            assert!(
                matches!(result, Err(ProbeError::InvalidArgument(_))),
                "{ifname:?} /{prefix}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn tcp_checks() {
        let lab = Lab::new().await;
        assert_eq!(
            lab.probe.probe(at(TCP_PORT), &tcp()).await,
            ProbeOutcome::Healthy
        );
        // The connection is closed with a FIN, not a RST.
        assert_eq!(lab.tcp.next_event(), Event::Closed("eof".to_owned()));

        assert_eq!(
            lab.probe.probe(at(CLOSED_PORT), &tcp()).await,
            unhealthy("connection refused")
        );

        let start = Instant::now();
        let spec = ProbeSpec {
            kind: ProbeKind::Tcp,
            timeout: Duration::from_millis(1500),
        };
        let outcome = lab
            .probe
            .probe(SocketAddrV4::new(BLACKHOLE_IP, 80), &spec)
            .await;
        let elapsed = start.elapsed();
        assert_eq!(outcome, unhealthy("timed out after 1.5s"));
        assert!(
            elapsed >= spec.timeout && elapsed <= spec.timeout + SLACK,
            "took {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn http_checks() {
        let lab = Lab::new().await;
        assert_eq!(
            lab.probe.probe(at(HTTP_OK_PORT), &http("/healthz")).await,
            ProbeOutcome::Healthy
        );
        assert_eq!(
            lab.ok.next_event(),
            Event::Request(
                "GET /healthz HTTP/1.1\r\nHost: 10.77.0.1:8000\r\nUser-Agent: vpc-health-check\r\n\
                 Connection: close\r\n\r\n"
                    .to_owned()
            )
        );
        assert_eq!(lab.ok.next_event(), Event::Closed("eof".to_owned()));

        assert_eq!(
            lab.probe.probe(at(HTTP_REDIRECT_PORT), &http("/")).await,
            ProbeOutcome::Healthy
        );
        assert!(matches!(lab.redirect.next_event(), Event::Request(_)));
        assert_eq!(lab.redirect.next_event(), Event::Closed("eof".to_owned()));

        assert_eq!(
            lab.probe.probe(at(HTTP_UNAVAILABLE_PORT), &http("/")).await,
            unhealthy("HTTP 503")
        );
        assert!(matches!(lab.unavailable.next_event(), Event::Request(_)));
        // The unread body was drained: FIN, not RST.
        assert_eq!(
            lab.unavailable.next_event(),
            Event::Closed("eof".to_owned())
        );

        let start = Instant::now();
        assert_eq!(
            lab.probe
                .probe(at(HTTP_SILENT_PORT), &short(http("/")))
                .await,
            unhealthy("timed out after 1s")
        );
        assert!(
            start.elapsed() <= SHORT_TIMEOUT + SLACK,
            "took {:?}",
            start.elapsed()
        );
        assert!(matches!(lab.silent.next_event(), Event::Request(_)));
        assert_eq!(lab.silent.next_event(), Event::Closed("eof".to_owned()));

        assert_eq!(
            lab.probe.probe(at(HTTP_GARBAGE_PORT), &http("/")).await,
            unhealthy("malformed HTTP status line \"SSH-2.0-OpenSSH_9.6\"")
        );
        assert!(matches!(lab.garbage.next_event(), Event::Request(_)));
        assert_eq!(lab.garbage.next_event(), Event::Closed("eof".to_owned()));
        assert_eq!(
            lab.probe.probe(at(CLOSED_PORT), &http("/")).await,
            unhealthy("connection refused")
        );

        let ProbeOutcome::Unhealthy(reason) =
            lab.probe.probe(at(HTTP_OK_PORT), &http("/a b")).await
        else {
            panic!("a path with a space must be rejected");
        };
        assert!(
            reason.starts_with("invalid HTTP health check path"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn probes_run_concurrently() {
        let lab = Arc::new(Lab::new().await);
        let mut set = tokio::task::JoinSet::new();
        let start = Instant::now();
        for i in 0..200u16 {
            let lab = Arc::clone(&lab);
            set.spawn(async move {
                if i % 2 == 0 {
                    let outcome = lab
                        .probe
                        .probe(SocketAddrV4::new(BLACKHOLE_IP, 1000 + i), &short(tcp()))
                        .await;
                    (outcome, unhealthy("timed out after 1s"))
                } else {
                    (
                        lab.probe.probe(at(TCP_PORT), &tcp()).await,
                        ProbeOutcome::Healthy,
                    )
                }
            });
        }
        while let Some(result) = set.join_next().await {
            let (outcome, expected) = result.expect("probe task");
            assert_eq!(outcome, expected);
        }
        // One after the other, the 100 timeouts alone would take 100 s. (Not 1 s + slack: on
        // a busy machine a healthy check may wait for a SYN retransmission.)
        assert!(
            start.elapsed() <= Duration::from_secs(3),
            "took {:?}",
            start.elapsed()
        );
        for _ in 0..100 {
            assert_eq!(lab.tcp.next_event(), Event::Closed("eof".to_owned()));
        }
    }

    /// Stops a lab's probe namespace with `stop`; checks the thread, the namespace and the
    /// veth pair (whose other end is in the server namespace) disappear.
    async fn check_stop_removes_everything(stop: impl FnOnce(ProbeNs) + Send + 'static) {
        let lab = Lab::new().await;
        assert_eq!(
            lab.probe.probe(at(TCP_PORT), &tcp()).await,
            ProbeOutcome::Healthy
        );
        assert_eq!(lab.tcp.next_event(), Event::Closed("eof".to_owned()));
        let task = task_dir(&lab.probe);
        assert!(Path::new(&task).exists());
        let Lab {
            probe,
            server,
            server_if,
            ..
        } = lab;
        assert!(veth_exists(&server, &server_if).await);

        // On another thread, so that a stop that hangs fails the test instead of hanging it.
        let stopper = thread::spawn(move || stop(probe));
        assert!(
            eventually(Duration::from_secs(5), async || stopper.is_finished()).await,
            "stopping the namespace's thread did not return within 5 s"
        );
        stopper.join().expect("stopping panicked");
        assert!(
            eventually(Duration::from_secs(2), async || !Path::new(&task).exists()).await,
            "the thread {task} is still there"
        );
        // The kernel destroys the namespace asynchronously; with it goes hc0 and so the pair.
        assert!(
            eventually(Duration::from_secs(10), async || !veth_exists(
                &server, &server_if
            )
            .await)
            .await,
            "{server_if} still exists: the probe namespace was not destroyed"
        );
    }

    #[tokio::test]
    async fn shutdown_destroys_the_namespace_and_its_interfaces() {
        check_stop_removes_everything(ProbeNs::shutdown).await;
    }

    #[tokio::test]
    async fn drop_destroys_the_namespace_and_its_interfaces() {
        check_stop_removes_everything(drop).await;
    }

    /// Run by `spawn_without_cap_sys_admin_reports_unshare_error` in a child process without
    /// CAP_SYS_ADMIN; does nothing otherwise.
    #[test]
    fn unshare_eperm_child() {
        if std::env::var_os("PROBE_TEST_EXPECT_EPERM").is_none() {
            return;
        }
        let err = ProbeNs::spawn("hc-test-eperm").expect_err("unshare must fail");
        assert!(
            matches!(err, ProbeError::Unshare(nix::Error::EPERM)),
            "{err:?}"
        );
        assert!(err.to_string().contains("CAP_SYS_ADMIN"), "{err}");
    }

    #[test]
    fn spawn_without_cap_sys_admin_reports_unshare_error() {
        let exe = std::env::current_exe().expect("test binary");
        let out = Command::new("setpriv")
            .args(["--bounding-set", "-sys_admin"])
            .arg(exe)
            .args([
                "--exact",
                "lb::probe::tests::unshare_eperm_child",
                "--test-threads=1",
            ])
            .env("PROBE_TEST_EXPECT_EPERM", "1")
            .output()
            .expect("running setpriv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn probe_ns_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ProbeNs>();
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_code(b"HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(parse_status_code(b"HTTP/1.0 399 Whatever it is"), Ok(399));
        assert_eq!(parse_status_code(b"HTTP/1.1 503"), Ok(503));
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 +20 OK",
            b"ICY 200 OK",
            b"\xff\xfe",
        ] {
            let err = parse_status_code(bad).expect_err("malformed");
            assert!(err.starts_with("malformed HTTP status line"), "{err}");
        }
        let long = vec![b'x'; 200];
        let err = parse_status_code(&long).expect_err("malformed");
        assert!(err.len() < 110, "the line is cut: {err}");
    }

    #[test]
    fn paths_and_names() {
        assert!(validate_path("/").is_ok());
        assert!(validate_path("/health?x=1&y=%20").is_ok());
        for bad in ["", "health", "/a b", "/a\r\nX-Injected: 1", "/é"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
        assert!(validate_ifname("hc0").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok());
        for bad in ["", ".", "..", "abcdefghijklmnop", "a:b", "a/b", "a b"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            format_mac([0x02, 0, 0xab, 0xcd, 0xef, 0x01]),
            "02:00:ab:cd:ef:01"
        );
    }

    #[test]
    fn io_reasons() {
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(nix::libc::ECONNREFUSED)),
            "connection refused"
        );
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(nix::libc::EHOSTUNREACH)),
            "host unreachable"
        );
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(nix::libc::ENETUNREACH)),
            "network unreachable"
        );
        assert_eq!(
            io_reason(&io::Error::from_raw_os_error(nix::libc::ECONNRESET)),
            "connection reset"
        );
    }
}
