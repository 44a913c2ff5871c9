//! Network-namespace test harness.
//!
//! The end-to-end tests of the appliance need several isolated "hosts" wired together with veth
//! pairs, processes and sockets living inside them, and a bpffs directory to pin maps and
//! programs into. This module provides RAII guards for all of it so that every test cleans up
//! after itself, also when it panics (the guards' `Drop` runs during unwinding):
//!
//! - [`NetNs`]: a named network namespace (`ip netns add`), with helpers to run closures
//!   ([`NetNs::run`]) and processes ([`NetNs::command`], [`NetNs::exec`], [`NetNs::spawn`]) inside
//!   it and to configure links, addresses and routes ([`NetNs::ip`] and friends).
//! - [`NsChild`]: a child process that is terminated and reaped when dropped.
//! - [`BpffsDir`]: a private directory under `/sys/fs/bpf`, removed (pins included) when dropped.
//! - [`veth_pair`], [`ping`]: wiring and reachability checks.
//!
//! Every name this harness creates (namespaces, bpffs directories, and interfaces created by
//! callers with [`unique_name`]) starts with [`PREFIX`] and encodes the creating process's pid,
//! so that [`sweep_stale`] can remove what a SIGKILLed previous run leaked (Drop does not run on
//! SIGKILL). The sweep runs automatically once per process.
//!
//! Everything here needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use controlplane::datapath::bpffs;
use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Prefix of every name created by this harness, so that [`sweep_stale`] can find leftovers.
pub const PREFIX: &str = "vt";

/// Maximum length of an interface name (`IFNAMSIZ` is 16 including the trailing NUL).
pub const IFNAME_MAX: usize = 15;

/// Where `ip netns add` bind-mounts named network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Where bpffs is conventionally mounted (and where the appliance expects it).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// How long [`NsChild`] waits after SIGTERM before sending SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// How long we wait for SIGKILLed processes to go away before giving up (bounded cleanup).
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(10);

/// Separator between the pid, the counter and the tag in [`unique_name`]. It must not be a
/// base-36 digit, otherwise the pid could not be parsed back out of the name.
const SEP: char = '-';

static COUNTER: AtomicU64 = AtomicU64::new(0);
static SWEEP_ONCE: Once = Once::new();
static BPFFS_MOUNT_LOCK: Mutex<()> = Mutex::new(());

fn to_base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        // `n % 36 < 36`: the index is in bounds and the cast cannot truncate.
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// Returns a short name unique across parallel tests in this process (atomic counter) and across
/// processes (pid), usable both as a netns name and as an interface name (at most
/// [`IFNAME_MAX`] = 15 characters).
///
/// The format is `vt{pid base36}-{counter base36}-{tag}`, truncated to 15 characters. Only the
/// tag is ever truncated (for a pid below 2^22, the kernel's limit, the part before the tag is at
/// most 14 characters until the counter reaches 36^6), so names stay unique; the second
/// separator keeps e.g. counter `1` + tag `a` distinct from counter `1a`. Characters of `tag`
/// other than ASCII alphanumerics and `_` are replaced by `_` (interface names must not contain
/// `/`, `:` or whitespace). The pid can be parsed back by [`sweep_stale`].
///
/// # Panics
///
/// If the counter overflows the name length (after more than 36^6 names in one process).
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = format!(
        "{PREFIX}{}{SEP}{}",
        to_base36(u64::from(std::process::id())),
        to_base36(n)
    );
    assert!(
        name.len() < IFNAME_MAX,
        "unique_name: counter exhausted ({name} leaves no room)"
    );
    if !tag.is_empty() {
        name.push(SEP);
        name.extend(tag.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        }));
        // All characters are ASCII: byte truncation is on a char boundary.
        name.truncate(IFNAME_MAX);
    }
    name
}

/// Parses the creating pid out of a name made by [`unique_name`]; `None` if `name` does not
/// have that format (so that the sweeper never touches foreign names).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once(SEP)?;
    let ctr = rest.split(SEP).next()?;
    let is_b36 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    if !is_b36(pid) || !is_b36(ctr) {
        return None;
    }
    u32::from_str_radix(pid, 36).ok()
}

/// Whether a process with this pid exists (zombies count as alive; so does a pid reused by an
/// unrelated process, which only makes the sweeper more conservative).
fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    !matches!(kill(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

/// Whether `name` was created by this harness in a process that no longer exists.
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !pid_alive(pid))
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Removes leftovers of previous runs that were killed before their guards could run: named
/// network namespaces (after killing the processes still inside), `/sys/fs/bpf` directories and
/// interfaces of the current network namespace whose names start with [`PREFIX`] and encode the
/// pid of a process that no longer exists. Names of live processes (e.g. tests running
/// concurrently in another process) are never touched. Errors are logged to stderr, not returned:
/// the sweep is best effort.
///
/// [`NetNs::new`] and [`BpffsDir::new`] call this once per process; calling it again is harmless.
pub fn sweep_stale() {
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                eprintln!("netns harness: removing stale network namespace {name}");
                if let Err(e) = destroy_netns(&name) {
                    eprintln!("netns harness: {e:#}");
                }
            }
        }
    }
    if let Ok(entries) = fs::read_dir(BPFFS_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                eprintln!("netns harness: removing stale bpffs directory {BPFFS_ROOT}/{name}");
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    eprintln!("netns harness: removing {}: {e}", entry.path().display());
                }
            }
        }
    }
    // Interfaces a caller may have created in the test process's own namespace with a name from
    // `unique_name` (those inside harness namespaces disappear with the namespace).
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "3: name@peer: <FLAGS> ..."
        let Some(name) = line.split(':').nth(1) else {
            continue;
        };
        let name = name.trim();
        let name = name.split_once('@').map_or(name, |(n, _)| n);
        if is_stale(name) {
            eprintln!("netns harness: removing stale interface {name}");
            let mut cmd = Command::new("ip");
            cmd.args(["link", "del", "dev", name]);
            if let Err(e) = output_checked(&mut cmd) {
                eprintln!("netns harness: {e:#}");
            }
        }
    }
}

fn sweep_stale_once() {
    SWEEP_ONCE.call_once(sweep_stale);
}

/// Space-separated program and arguments, for error messages.
fn cmdline(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (stdin closed, output captured); errors only if it cannot be run.
fn output_unchecked(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run `{}`", cmdline(cmd)))
}

/// Runs `cmd` to completion; errors with the command line, exit status, stdout and stderr if it
/// does not exit successfully.
fn output_checked(cmd: &mut Command) -> Result<Output> {
    let out = output_unchecked(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({})\nstdout: {}\nstderr: {}",
            cmdline(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(out)
}

/// Pids of the processes (other than this one) whose network namespace is the one bind-mounted
/// at `ns_path`: the same as `ip netns pids`, without spawning a process (so that [`Drop`] can
/// poll it cheaply). Zombies have no namespace any more and are not listed.
fn pids_in_ns(ns_path: &Path) -> io::Result<Vec<Pid>> {
    let target = fs::metadata(ns_path)?;
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if let Ok(m) = fs::metadata(entry.path().join("ns/net"))
            && m.dev() == target.dev()
            && m.ino() == target.ino()
        {
            pids.push(Pid::from_raw(raw));
        }
    }
    Ok(pids)
}

/// SIGKILLs every process in the namespace, repeatedly (it may fork meanwhile) until none is
/// left or [`KILL_GRACE`] has passed.
fn kill_ns_processes(name: &str) -> Result<()> {
    let path = netns_path(name);
    let deadline = Instant::now() + KILL_GRACE;
    loop {
        let pids = pids_in_ns(&path)
            .with_context(|| format!("listing processes in network namespace {name}"))?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} still in network namespace {name} after SIGKILL");
        }
        for pid in pids {
            // ESRCH: it exited in the meantime.
            let _ = kill(pid, Signal::SIGKILL);
        }
        thread::sleep(POLL);
    }
}

/// Kills the processes inside the named namespace and deletes it (`ip netns del`, falling back to
/// what it does: a lazy unmount and an unlink).
fn destroy_netns(name: &str) -> Result<()> {
    let killed = kill_ns_processes(name);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "del", name]);
    if let Err(e) = output_checked(&mut cmd) {
        let path = netns_path(name);
        // The mount may already be gone; only the final unlink matters.
        let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
        if let Err(e2) = fs::remove_file(&path)
            && e2.kind() != io::ErrorKind::NotFound
        {
            return Err(e.context(format!("removing {}: {e2}", path.display())));
        }
    }
    killed
}

/// Translates a sysctl key (`net.ipv4.ip_forward`, or already a path relative to /proc/sys such as
/// `net/ipv4/conf/eth0.10/forwarding`) into its /proc/sys path.
fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.to_owned()
    } else {
        key.replace('.', "/")
    };
    Path::new("/proc/sys").join(rel)
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
///
/// Dropping it SIGKILLs every process still inside, then runs `ip netns del`. Drop never panics;
/// failures are logged to stderr. Since Drop also runs during unwinding, a panicking test cleans
/// up too. Namespaces leaked by a killed process are removed by [`sweep_stale`].
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// The namespace file, opened once: `setns` targets. Shared with threads and `pre_exec`
    /// hooks so that it outlives them.
    fd: Arc<OwnedFd>,
}

impl NetNs {
    /// Creates a namespace named [`unique_name`]`(tag)`, with `lo` up and IPv6 disabled on all
    /// its interfaces (present and future), so that IPv6 neighbour discovery and MLD chatter do
    /// not disturb packet counters.
    pub fn new(tag: &str) -> Result<Self> {
        Self::create(tag, false)
    }

    /// Like [`NetNs::new`] but leaves IPv6 enabled.
    pub fn with_ipv6(tag: &str) -> Result<Self> {
        Self::create(tag, true)
    }

    fn create(tag: &str, ipv6: bool) -> Result<Self> {
        sweep_stale_once();
        let name = unique_name(tag);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", &name]);
        output_checked(&mut cmd)?;
        let path = netns_path(&name);
        let fd = match fs::File::open(&path) {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                if let Err(e2) = destroy_netns(&name) {
                    eprintln!("netns harness: {e2:#}");
                }
                return Err(anyhow!(e).context(format!("opening {}", path.display())));
            }
        };
        // From here on, Drop cleans up if the setup fails.
        let ns = Self {
            name,
            fd: Arc::new(fd),
        };
        if !ipv6 {
            for key in [
                "net.ipv6.conf.all.disable_ipv6",
                "net.ipv6.conf.default.disable_ipv6",
            ] {
                match ns.sysctl(key, "1") {
                    Ok(()) => {}
                    // IPv6 is not available in this kernel at all: nothing to disable.
                    Err(e)
                        if e.downcast_ref::<io::Error>()
                            .is_some_and(|e| e.kind() == io::ErrorKind::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        ns.link_up("lo")?;
        Ok(ns)
    }

    /// The namespace's name (as listed by `ip netns list`; usable with `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs `f` on a new thread that has entered this namespace (`setns(CLONE_NEWNET)`) and
    /// returns its result; a panic in `f` is propagated. Sockets created by `f` stay in this
    /// namespace even when returned to (and used from) other threads.
    ///
    /// A dedicated thread is used because the namespace is a per-thread attribute: switching the
    /// caller's thread would affect everything else running on it. The thread is scoped, so `f`
    /// may borrow from the caller.
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned or cannot enter the namespace, or if `f` panics.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd: &OwnedFd = &self.fd;
        let name = &self.name;
        let result = thread::scope(|s| {
            thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(s, move || {
                    if let Err(e) = nix::sched::setns(fd, CloneFlags::CLONE_NEWNET) {
                        panic!("setns into network namespace {name}: {e}");
                    }
                    f()
                })
                .expect("spawning a thread for NetNs::run")
                .join()
        });
        match result {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// Makes `cmd`'s child enter this namespace between fork and exec.
    fn enter_on_exec(&self, cmd: &mut Command) {
        let fd = Arc::clone(&self.fd);
        // SAFETY: the hook runs in the forked child, where only async-signal-safe operations are
        // allowed. It only calls the setns(2) syscall on a file descriptor that was opened in the
        // parent and is kept open by the `Arc` the closure owns (the closure lives in `cmd`,
        // which outlives the fork), and on failure converts the errno into an `io::Error`, which
        // does not allocate. No locks are taken and no memory is allocated.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&*fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
    }

    /// A [`Command`] whose process runs in this namespace.
    ///
    /// The child joins the namespace with setns(2) in a `pre_exec` hook, instead of going through
    /// `ip netns exec`: the latter also unshares the mount namespace and remounts /sys, which
    /// hides the bpffs mounted at /sys/fs/bpf that the spawned processes (the control plane) need.
    /// The child keeps the caller's mount namespace, so /sys/class/net shows the caller's
    /// interfaces, not this namespace's: use `ip` (e.g. [`NetNs::ifindex`]) to inspect links.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter_on_exec(&mut cmd);
        cmd
    }

    fn command_with<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        cmd
    }

    /// Runs `program args...` in this namespace to completion and returns its output. Fails, with
    /// the command line, the exit status, stdout and stderr in the error, if it cannot be run or
    /// does not exit successfully.
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        output_checked(&mut self.command_with(program, args))
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Like [`NetNs::exec`] but returns the output whatever the exit status; fails only if the
    /// program cannot be run.
    pub fn exec_unchecked<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        output_unchecked(&mut self.command_with(program, args))
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Like [`NetNs::exec`] but returns stdout (lossily decoded as UTF-8).
    pub fn exec_ok<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.exec(program, args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Spawns `cmd` in this namespace (a setns hook is added, so a plain [`Command`] is fine; it
    /// runs after any hook already there, so this namespace wins). The returned guard terminates
    /// and reaps the process when dropped.
    pub fn spawn(&self, mut cmd: Command) -> Result<NsChild> {
        self.enter_on_exec(&mut cmd);
        let desc = cmdline(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning `{desc}` in network namespace {}", self.name))?;
        Ok(NsChild { child, desc })
    }

    /// Runs `ip ARGS...` in this namespace; returns stdout, or an error with stderr.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        self.exec_ok("ip", args)
    }

    /// `ip link set dev IFNAME up`.
    pub fn link_up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "up"]).map(drop)
    }

    /// `ip link set dev IFNAME down`.
    pub fn link_down(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "down"]).map(drop)
    }

    /// `ip addr add CIDR dev IFNAME`, e.g. `ns.add_addr("eth0", "198.18.0.1/24")`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", ifname]).map(drop)
    }

    /// `ip link set dev IFNAME mtu MTU`.
    pub fn set_mtu(&self, ifname: &str, mtu: u32) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// `ip route add DST via VIA` (`DST` may be `default`). Use [`NetNs::ip`] for anything else.
    pub fn add_route(&self, dst: &str, via: &str) -> Result<()> {
        self.ip(&["route", "add", dst, "via", via]).map(drop)
    }

    /// `ip -o link show dev IFNAME`: one line, e.g.
    /// `2: eth0@if3: <...> mtu 1500 ... \    link/ether 1e:19:d0:de:c0:36 brd ...`.
    fn link_line(&self, ifname: &str) -> Result<String> {
        self.ip(&["-o", "link", "show", "dev", ifname])
    }

    /// The interface index of `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let line = self.link_line(ifname)?;
        line.split_once(':')
            .and_then(|(idx, _)| idx.trim().parse().ok())
            .ok_or_else(|| anyhow!("cannot parse ifindex of {ifname} from {line:?}"))
    }

    /// The MAC address of `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> Result<[u8; 6]> {
        let line = self.link_line(ifname)?;
        let mut tokens = line.split_whitespace();
        tokens
            .find(|t| t.starts_with("link/"))
            .and(tokens.next())
            .and_then(parse_mac)
            .ok_or_else(|| anyhow!("cannot parse MAC address of {ifname} from {line:?}"))
    }

    /// Writes a sysctl of this namespace, e.g. `ns.sysctl("net.ipv4.ip_forward", "1")`. The
    /// `net.*` tree of /proc/sys belongs to the network namespace of the writing thread, hence
    /// [`NetNs::run`]. The error wraps the [`io::Error`] (downcastable).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| fs::write(&path, value))
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "writing {value:?} to {} in network namespace {}",
                    path.display(),
                    self.name
                )
            })
    }

    /// Reads a sysctl of this namespace (trimmed), e.g. `ns.read_sysctl("net.ipv4.ip_forward")`.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        self.run(|| fs::read_to_string(&path))
            .map(|s| s.trim().to_owned())
            .with_context(|| {
                format!(
                    "reading {} in network namespace {}",
                    path.display(),
                    self.name
                )
            })
    }

    /// The processes (other than this one) currently in this namespace, like `ip netns pids`.
    pub fn pids(&self) -> Result<Vec<Pid>> {
        pids_in_ns(&self.path()).with_context(|| format!("listing processes in {}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = destroy_netns(&self.name) {
            eprintln!(
                "netns harness: cleaning up network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Creates a veth pair with one end, `a_if`, directly in `a` and the other, `b_if`, directly in
/// `b` (`ip link add A netns NSA type veth peer name B netns NSB`), and sets both up.
///
/// Creating the ends in their namespaces (instead of creating them here and moving them) means
/// the names only need to be unique inside each namespace (`eth0` in both is fine) and nothing
/// ever appears in the caller's namespace.
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    output_checked(&mut cmd)?;
    a.link_up(a_if)?;
    b.link_up(b_if)
}

/// Pings `dst` from `ns` with exactly `count` echo requests, 0.2 s apart, each waiting at most
/// 1 s for its reply (`ping -n -q -c COUNT -i 0.2 -W 1 DST`), and returns the number of replies
/// received.
///
/// The run is bounded: if ping has not finished after `count + 3` seconds it is interrupted
/// (SIGINT, so that it still prints its summary) and then killed. This deadline is enforced here
/// rather than with ping's own `-w`, because with `-w` ping keeps sending probes past `count`
/// until `count` replies arrive, which would make the number of packets sent (and therefore the
/// datapath's counters) unpredictable when some are lost.
///
/// Losing every packet is a result, not an error (`Ok(0)`): tests use this to assert that
/// traffic is blocked. That includes ping failing with "Network is unreachable" / "No route to
/// host" before sending anything. It fails only if ping cannot be run or reports another error
/// (e.g. an invalid destination).
pub fn ping(ns: &NetNs, dst: &str, count: u32) -> Result<u32> {
    if count == 0 {
        bail!("ping: count must be at least 1");
    }
    let count_s = count.to_string();
    let args = ["-n", "-q", "-c", &count_s, "-i", "0.2", "-W", "1", dst];
    let mut cmd = Command::new("ping");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ns.spawn(cmd)?;
    let deadline = Duration::from_secs(u64::from(count) + 3);
    let mut status = child.wait_timeout(deadline)?;
    if status.is_none() {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        status = child.wait_timeout(Duration::from_secs(1))?;
    }
    let status = match status {
        Some(s) => s,
        None => child.stop()?,
    };
    // ping -q writes a few lines: they fit in the pipe buffers, so reading after exit is fine.
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut p) = child.child_mut().stdout.take() {
        io::Read::read_to_string(&mut p, &mut stdout).context("reading ping's stdout")?;
    }
    if let Some(mut p) = child.child_mut().stderr.take() {
        io::Read::read_to_string(&mut p, &mut stderr).context("reading ping's stderr")?;
    }
    // "3 packets transmitted, 3 received, 0% packet loss, time 405ms"
    let received = stdout
        .lines()
        .filter(|l| l.contains("transmitted"))
        .flat_map(|l| l.split(','))
        .find(|part| part.contains("received"))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    match received {
        Some(n) => Ok(n),
        None if stderr.contains("unreachable") || stderr.contains("No route to host") => Ok(0),
        None => bail!(
            "`ping {}` in network namespace {}: cannot parse the summary ({status})\nstdout: {}\nstderr: {}",
            args.join(" "),
            ns.name(),
            stdout.trim_end(),
            stderr.trim_end()
        ),
    }
}

/// Mounts bpffs at /sys/fs/bpf unless one is already there (the agent's own check and mount,
/// serialized so parallel tests do not stack two mounts). The mount is left in place.
pub fn ensure_bpffs() -> Result<()> {
    let _guard = BPFFS_MOUNT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = Path::new(BPFFS_ROOT);
    if !bpffs::is_bpffs(root) {
        bpffs::mount_bpffs(root)?;
    }
    Ok(())
}

/// A private directory `/sys/fs/bpf/<unique name>` to pin maps and programs into, removed
/// recursively on drop (unlinking a pin releases the object once nothing else references it).
/// Mounts bpffs first if needed; stale directories of killed runs are removed by
/// [`sweep_stale`].
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    /// Creates `/sys/fs/bpf/`[`unique_name`]`(tag)`.
    pub fn new(tag: &str) -> Result<Self> {
        ensure_bpffs()?;
        sweep_stale_once();
        let path = Path::new(BPFFS_ROOT).join(unique_name(tag));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.path) {
            // Already gone, e.g. removed by `vpc-agent teardown` under test.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("netns harness: removing {}: {e}", self.path.display()),
            Ok(()) => {}
        }
    }
}

/// A child process spawned by [`NetNs::spawn`]. Dropping it sends SIGTERM, waits up to 2 s, then
/// sends SIGKILL and reaps it (waiting at most 2 s more; never panics). Its own children are not
/// signalled, but dropping the [`NetNs`] kills everything left in the namespace.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    desc: String,
}

impl NsChild {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The underlying [`Child`], e.g. to take its piped stdout. Waiting on it directly is fine:
    /// [`Child`] caches the exit status, so the guard never signals a reaped (reusable) pid.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the process to exit for at most `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Terminates the process (SIGTERM, then SIGKILL after 2 s) and reaps it. Returns its exit
    /// status (also if it had already exited).
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        // Reaping first guarantees the pid we signal is still ours (an unreaped child's pid cannot
        // be reused).
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // ESRCH cannot happen for an unreaped child; any error is caught by the SIGKILL path.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if let Some(status) = self.wait_timeout(TERM_GRACE)? {
            return Ok(status);
        }
        self.child.kill()?;
        self.wait_timeout(KILL_GRACE)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("`{}` did not exit after SIGKILL", self.desc),
            )
        })
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("netns harness: stopping `{}`: {e}", self.desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// Names listed by `ip netns list` (lines look like `NAME (id: 3)` or `NAME`).
    fn listed_netns() -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        assert!(out.status.success(), "ip netns list: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    fn assert_netns_gone(name: &str) {
        assert!(
            !listed_netns().iter().any(|n| n == name),
            "{name} still listed by ip netns list"
        );
        assert!(!netns_path(name).exists(), "{} still exists", name);
    }

    /// Two namespaces joined by a veth: `a` has `va` = 198.18.0.1/24, `b` has `vb` =
    /// 198.18.0.2/24.
    fn linked_pair(tag: &str) -> (NetNs, NetNs) {
        let a = NetNs::new(&format!("{tag}a")).unwrap();
        let b = NetNs::new(&format!("{tag}b")).unwrap();
        veth_pair(&a, "va", &b, "vb").unwrap();
        a.add_addr("va", "198.18.0.1/24").unwrap();
        b.add_addr("vb", "198.18.0.2/24").unwrap();
        (a, b)
    }

    #[test]
    fn unique_name_is_short_unique_and_parseable() {
        let me = std::process::id();
        let mut seen = HashSet::new();
        for i in 0..1000 {
            let tag = match i % 3 {
                0 => "",
                1 => "a-very-long-tag-that-gets/truncated: yes",
                _ => "x",
            };
            let name = unique_name(tag);
            assert!(name.len() <= IFNAME_MAX, "{name} too long");
            assert!(name.starts_with(PREFIX), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{name}"
            );
            assert_eq!(owner_pid(&name), Some(me), "{name}");
            assert!(seen.insert(name.clone()), "{name} repeated");
        }
        assert_eq!(owner_pid("vtest"), None);
        assert_eq!(owner_pid("vt-1-a"), None);
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(to_base36(4_194_304), "2hwcg");
    }

    #[test]
    fn ping_both_ways_and_introspection() {
        let (a, b) = linked_pair("png");
        assert_eq!(ping(&a, "198.18.0.2", 3).unwrap(), 3);
        assert_eq!(ping(&b, "198.18.0.1", 3).unwrap(), 3);
        // Nobody answers (no ARP reply): every packet is lost, which is not an error.
        let start = Instant::now();
        assert_eq!(ping(&a, "198.18.0.3", 2).unwrap(), 0);
        assert!(start.elapsed() < Duration::from_secs(5));
        // No route at all: also zero replies.
        assert_eq!(ping(&a, "198.19.255.1", 1).unwrap(), 0);
        // Invalid destination: an error.
        assert!(ping(&a, "198.18.0.300", 1).is_err());

        let idx = a.ifindex("va").unwrap();
        let expected = a.run(|| nix::net::if_::if_nametoindex("va")).unwrap();
        assert_eq!(idx, expected);
        assert_eq!(a.ifindex("lo").unwrap(), 1);

        let mac = a.mac("va").unwrap();
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_ne!(mac, [0; 6]);
        assert_eq!(a.mac("lo").unwrap(), [0; 6]);
        // The peer sees a's MAC in its neighbour table after the pings.
        let neigh = b.ip(&["neigh", "show", "198.18.0.1"]).unwrap();
        let mac_s = mac.map(|x| format!("{x:02x}")).join(":");
        assert!(neigh.contains(&mac_s), "{neigh} lacks {mac_s}");

        a.set_mtu("va", 1400).unwrap();
        assert!(
            a.ip(&["-o", "link", "show", "dev", "va"])
                .unwrap()
                .contains("mtu 1400")
        );

        b.add_route("198.19.0.0/24", "198.18.0.1").unwrap();
        assert!(
            b.ip(&["route"])
                .unwrap()
                .contains("198.19.0.0/24 via 198.18.0.1")
        );
        let err = b.ip(&["route", "add", "198.19.0.0/24", "via", "198.18.0.1"]);
        let msg = format!("{:#}", err.unwrap_err());
        assert!(
            msg.contains("File exists") && msg.contains("ip route add"),
            "{msg}"
        );

        // IPv6 is off unless asked for.
        assert_eq!(
            a.exec_ok("cat", ["/proc/sys/net/ipv6/conf/va/disable_ipv6"])
                .unwrap()
                .trim(),
            "1"
        );
        let v6 = NetNs::with_ipv6("v6").unwrap();
        assert_eq!(
            v6.read_sysctl("net.ipv6.conf.lo.disable_ipv6").unwrap(),
            "0"
        );

        // sysctl writes land in the namespace, not in the caller's.
        a.sysctl("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(a.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
        assert_eq!(
            a.exec_ok("cat", ["/proc/sys/net/ipv4/ip_forward"])
                .unwrap()
                .trim(),
            "1"
        );
        assert_eq!(b.read_sysctl("net.ipv4.ip_forward").unwrap(), "0");
    }

    #[test]
    fn tcp_across_namespaces_with_run() {
        let (a, b) = linked_pair("tcp");
        let listener = a
            .run(|| TcpListener::bind((Ipv4Addr::new(198, 18, 0, 1), 0)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let client = b.run(move || -> io::Result<TcpStream> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.write_all(b"hello")?;
            Ok(s)
        });
        let mut client = client.unwrap();
        // The connection is established, so accept() returns at once.
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), IpAddr::from(Ipv4Addr::new(198, 18, 0, 2)));
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Sockets keep their namespace when used from this thread.
        conn.write_all(b"world").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");
    }

    #[test]
    fn run_propagates_panics() {
        let ns = NetNs::new("pnc").unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ns.run(|| panic!("inside the namespace"));
        }));
        let payload = r.unwrap_err();
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"inside the namespace")
        );
    }

    #[test]
    fn netns_removed_on_drop_and_on_panic() {
        let ns = NetNs::new("drp").unwrap();
        let name = ns.name().to_owned();
        assert!(listed_netns().contains(&name));
        drop(ns);
        assert_netns_gone(&name);

        let mut name = String::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ns = NetNs::new("pan").unwrap();
            name = ns.name().to_owned();
            panic!("test panic while {name} exists");
        }));
        assert!(r.is_err());
        assert!(name.starts_with(PREFIX));
        assert_netns_gone(&name);
    }

    #[test]
    fn processes_are_confined_and_killed() {
        let ns = NetNs::new("prc").unwrap();
        let ns_ino = fs::metadata(ns.path()).unwrap().ino();

        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let mut guarded = ns.spawn(sleep).unwrap();
        let stray = ns.command("sleep").arg("30").spawn().unwrap();
        let stray_pid = i32::try_from(stray.id()).unwrap();
        let mut stray = NsChild {
            child: stray,
            desc: "stray".into(),
        };
        for pid in [guarded.id(), stray.id()] {
            let m = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
            assert_eq!(m.ino(), ns_ino, "pid {pid} is not in {}", ns.name());
        }
        let mut pids = ns.pids().unwrap();
        pids.sort();
        assert_eq!(pids.len(), 2, "{pids:?}");
        assert!(pids.contains(&Pid::from_raw(stray_pid)));

        // NsChild: SIGTERM on stop.
        let status = guarded.stop().unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));

        // Dropping the namespace SIGKILLs whatever is left inside.
        let name = ns.name().to_owned();
        drop(ns);
        let status = stray.wait_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(Signal::SIGKILL as i32)
        );
        assert_netns_gone(&name);
    }

    #[test]
    fn exec_reports_failures() {
        let ns = NetNs::new("exe").unwrap();
        let out = ns.exec_ok("sh", ["-c", "echo hi"]).unwrap();
        assert_eq!(out, "hi\n");
        let err = ns
            .exec("sh", ["-c", "echo out; echo err >&2; exit 3"])
            .unwrap_err();
        let msg = format!("{err:#}");
        for needle in ["sh -c", "exit status: 3", "out", "err", ns.name()] {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        let out = ns.exec_unchecked("sh", ["-c", "exit 4"]).unwrap();
        assert_eq!(out.status.code(), Some(4));
        assert!(ns.exec("/nonexistent/program", [""; 0]).is_err());
        // Only lo in a new namespace, and it is up.
        let links = ns.ip(&["-o", "link", "show"]).unwrap();
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains(",UP"), "{links}");
    }

    /// Creates a BPF array map with the raw bpf(2) syscall and pins it at `path`.
    fn pin_test_map(path: &Path) {
        let mut attr = [0u8; 128];
        // BPF_MAP_CREATE: map_type = BPF_MAP_TYPE_ARRAY (2), key_size 4, value_size 8,
        // max_entries 1.
        for (i, v) in [2u32, 4, 8, 1].into_iter().enumerate() {
            attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: bpf(BPF_MAP_CREATE) reads `attr.len()` bytes from a live, initialized buffer of
        // that size; the unused tail is zero as the kernel requires.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        let fd = i32::try_from(fd).unwrap();
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };

        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut attr = [0u8; 128];
        // BPF_OBJ_PIN: pathname (u64 pointer), bpf_fd (u32).
        attr[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
        attr[8..12].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
        // SAFETY: bpf(BPF_OBJ_PIN) reads the buffer and the NUL-terminated path it points to,
        // both alive for the duration of the call; `fd` is an open map fd.
        let r = unsafe { nix::libc::syscall(nix::libc::SYS_bpf, 6, attr.as_ptr(), attr.len()) };
        assert_eq!(r, 0, "BPF_OBJ_PIN: {}", io::Error::last_os_error());
    }

    #[test]
    fn bpffs_dir_is_created_and_removed() {
        let dir = BpffsDir::new("bpf").unwrap();
        let path = dir.path().to_owned();
        assert!(path.is_dir());
        assert!(bpffs::is_bpffs(Path::new(BPFFS_ROOT)));
        assert!(path.starts_with(BPFFS_ROOT));
        fs::create_dir(path.join("sub")).unwrap();
        pin_test_map(&path.join("map"));
        pin_test_map(&path.join("sub/map"));
        assert!(path.join("sub/map").exists());

        // Processes spawned in a namespace still see the bpffs (which `ip netns exec` would hide).
        let ns = NetNs::new("bfs").unwrap();
        let ls = ns.exec_ok("ls", [&path]).unwrap();
        assert!(ls.lines().any(|l| l == "map"), "{ls}");

        drop(dir);
        assert!(!path.exists(), "{} not removed", path.display());
    }

    #[test]
    fn sweeper_removes_stale_resources_only() {
        // pid_max is at most 2^22 (pids are below it), so this pid can never be alive.
        let dead = format!("{PREFIX}{}{SEP}0{SEP}swp", to_base36(4_194_304));
        assert!(is_stale(&dead));
        let live = NetNs::new("swl").unwrap();
        assert!(!is_stale(live.name()));

        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", &dead]);
        output_checked(&mut cmd).unwrap();
        ensure_bpffs().unwrap();
        let dead_dir = Path::new(BPFFS_ROOT).join(&dead);
        fs::create_dir(&dead_dir).unwrap();
        pin_test_map(&dead_dir.join("map"));

        sweep_stale();

        assert_netns_gone(&dead);
        assert!(!dead_dir.exists());
        assert!(listed_netns().iter().any(|n| n == live.name()));
    }
}
