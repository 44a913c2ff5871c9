//! `vpc-instance-init`: the shim the runtime starts, and the instance's PID 1 it forks.
//!
//! ```text
//!  agent ──spawn──> shim (host PID ns, host mount ns, instance netns, instance cgroups)
//!                     │ setsid; joins the cgroups; setns(netns); unshare(PID)
//!                     └─fork──> PID 1 (new PID ns): unshare(mount, UTS, IPC); private mounts;
//!                                 overlay root (lower: /, upper: the instance dir); pivot_root;
//!                                 /proc /sys /dev /tmp /run; hostname; then
//!                                 `/bin/sh -c <command>` and the user-data script; reaps
//! ```
//!
//! Everything namespace-related happens here rather than in a `pre_exec` hook of the agent:
//! the agent is multi-threaded (tokio), and code between `fork` and `exec` there must be
//! async-signal-safe; here the process is single-threaded and can simply fail with a message.
//! The shim places itself in the instance's cgroups before it forks, so PID 1 and everything
//! it starts are limited from their first instruction (no window between spawn and placement).
//!
//! The shim stays outside the instance's PID namespace, as the parent of its PID 1: it records
//! the PIDs (`run.json`), reports readiness to the agent, then waits for PID 1 and writes how
//! it ended (`exit`), which a restarted agent reads back. The shim is in its own session and
//! holds nothing of the agent's, so instances survive the agent.
//!
//! PID 1 reports `ok` once the root is set up and the command spawned, and the command did
//! not exit with 126 or 127 within the launch check (`/bin/sh: not found` / `not executable`:
//! the command could not be run, which the agent reports as a failed start with the shell's
//! message, read back from the console). Then it runs the user data script, once per instance
//! (a marker in the instance dir, set when the script is started), reaps every process
//! forever and, on SIGTERM, passes SIGTERM to everything in the instance and exits once it is
//! all gone (bounded: then SIGKILL). The command exiting does not end the instance.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::{fs::PermissionsExt, fs::symlink},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, openat},
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
    sys::{
        signal::{SigHandler, SigSet, Signal, kill, signal},
        stat::Mode,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, chdir, dup2_stdout, fork, getpid, pipe2, pivot_root, setsid},
};

use super::{
    launch::{LAUNCH_FAILURE_CODES, LaunchConfig, Reply},
    layout,
    procfs::{self, RunRecord},
};

/// How long PID 1 waits, after passing SIGTERM on, before it SIGKILLs what is left. The agent
/// normally SIGKILLs earlier (its own grace period).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Poll interval of PID 1's bounded waits.
const POLL: Duration = Duration::from_millis(10);

/// Where the user data script is written inside the instance (cloud-init's place).
const USER_DATA_SCRIPT: &str = "/var/lib/cloud/instance/scripts/user-data";

/// The environment of the command and the user data script.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Device nodes bind-mounted from the host into the instance's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The binary's entry point; returns the exit code.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    let config = match args
        .get(1)
        .and_then(|a| a.to_str())
        .map(serde_json::from_str)
    {
        Some(Ok(c)) if args.len() == 2 => c,
        Some(Err(e)) => {
            eprintln!("vpc-instance-init: invalid launch config: {e}");
            return 2;
        }
        _ => {
            eprintln!(
                "usage: vpc-instance-init <launch config as JSON>\n\
                 (started by the compute agent's runtime, not by hand)"
            );
            return 2;
        }
    };
    shim(&config)
}

/// A line on the console (the init's stderr), tagged.
macro_rules! log {
    ($config:expr, $($arg:tt)*) => {
        eprintln!("vpc-instance-init[{}]: {}", $config.instance_id, format_args!($($arg)*))
    };
}

/// The shim: sets up, forks PID 1, reports, waits. Returns the exit code.
fn shim(config: &LaunchConfig) -> i32 {
    let (init, ready) = match shim_setup(config) {
        Ok(v) => v,
        Err(reason) => {
            log!(config, "start failed: {reason}");
            report(&Reply::Failed(reason));
            return 1;
        }
    };
    // The answer of PID 1: one line, then the end of the pipe.
    let mut answer = String::new();
    let read = File::from(ready).read_to_string(&mut answer);
    let reply = match (read, Reply::parse(&answer)) {
        (Ok(_), Some(Reply::Ready(_))) => record_run(config, init),
        (Ok(_), Some(Reply::Failed(reason))) => Err(reason),
        (read, _) => {
            let status = wait_blocking(init);
            Err(match read {
                Ok(_) => format!("the instance's init ended before it was ready ({status})"),
                Err(e) => format!("reading the instance's init's answer: {e} ({status})"),
            })
        }
    };
    match reply {
        Ok(()) => report(&Reply::Ready(init.as_raw())),
        Err(reason) => {
            log!(config, "start failed: {reason}");
            report(&Reply::Failed(reason));
            let _ = kill(init, Signal::SIGKILL);
            wait_blocking(init);
            return 1;
        }
    }
    // From now on only the agent (or the kernel) ends the instance; the shim just records how.
    for sig in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: SigIgn installs no handler code; nothing else here touches dispositions.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let exit = wait_blocking(init);
    log!(config, "instance init {exit}");
    if let Err(e) = procfs::write_atomic(&config.instance_dir.join(layout::EXIT), exit.as_bytes()) {
        log!(config, "recording the exit: {e}");
    }
    0
}

/// Joins the cgroups and the network namespace, creates the PID namespace and forks its
/// PID 1. Returns PID 1's (host) pid and the read end of its readiness pipe.
fn shim_setup(config: &LaunchConfig) -> Result<(Pid, OwnedFd), String> {
    // A session of its own: no signal for the agent's terminal or process group reaches it.
    // (EPERM only if it already leads a group, which is fine too.)
    let _ = setsid();
    let me = getpid().to_string();
    for procs in &config.cgroup_procs {
        fs::write(procs, &me).map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    }
    let netns = File::open(&config.netns_path).map_err(|e| {
        format!(
            "opening network namespace {}: {e}",
            config.netns_path.display()
        )
    })?;
    setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|e| {
        format!(
            "entering network namespace {}: {e}",
            config.netns_path.display()
        )
    })?;
    drop(netns);
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("creating a PID namespace: {e}"))?;
    let (ready_r, ready_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("creating the readiness pipe: {e}"))?;
    // SAFETY: the shim is single-threaded (it starts no threads), so the child may do anything
    // the parent could.
    match unsafe { fork() }.map_err(|e| format!("forking the instance's init: {e}"))? {
        ForkResult::Child => {
            drop(ready_r);
            std::process::exit(pid1(config, ready_w));
        }
        ForkResult::Parent { child } => Ok((child, ready_r)),
    }
}

/// Records the shim and PID 1 for the runtime (`run.json`).
fn record_run(config: &LaunchConfig, init: Pid) -> Result<(), String> {
    let gone = || format!("instance init {init} is gone");
    let record = RunRecord {
        shim: procfs::proc_id(getpid().as_raw())
            .ok_or_else(|| "own /proc entry missing".to_owned())?,
        init: procfs::proc_id(init.as_raw()).ok_or_else(gone)?,
    };
    let json = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
    procfs::write_atomic(&config.instance_dir.join(layout::RUN), &json)
        .map_err(|e| format!("writing {}: {e}", layout::RUN))
}

/// Writes the answer to the agent (stdout), then points stdout at /dev/null: the agent's end
/// of the pipe goes away with the agent.
fn report(reply: &Reply) {
    let mut out = io::stdout();
    let _ = writeln!(out, "{}", reply.to_line());
    let _ = out.flush();
    if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
        let _ = dup2_stdout(null);
    }
}

/// `waitpid` until `pid` ends (not a busy loop: it blocks); describes how it ended.
fn wait_blocking(pid: Pid) -> String {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return procfs::describe_exit(Some(code), None),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return procfs::describe_exit(None, Some(sig as i32));
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return format!("status unknown ({e})"),
        }
    }
}

/// PID 1 of the instance. Returns its exit code.
fn pid1(config: &LaunchConfig, ready: OwnedFd) -> i32 {
    // fd 1 is the agent's pipe (the shim's stdout): nothing in the instance may hold it.
    let _ = dup2_stdout(io::stderr());
    // Signals are taken with sigwait. PID 1 of a PID namespace never gets a signal it has no
    // handler for, unless it is blocked (then it is queued), so block them first of all.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        signals.add(s);
    }
    if let Err(e) = signals.thread_block() {
        return fail(config, ready, format!("blocking signals: {e}"));
    }
    let booted = match boot(config) {
        Ok(b) => b,
        Err(reason) => return fail(config, ready, reason),
    };
    let mut ready = File::from(ready);
    let _ = writeln!(ready, "{}", Reply::Ready(0).to_line());
    drop(ready);
    booted.run_user_data(config);
    let mut command = booted.command;
    loop {
        reap(config, &mut command);
        match signals.wait() {
            Ok(Signal::SIGTERM | Signal::SIGINT) => return shutdown(config, &mut command),
            Ok(_) => {}
            // sigwait fails only for an invalid set; do not spin on it.
            Err(e) => {
                log!(config, "sigwait: {e}");
                thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Reports a failed boot to the shim; the exit code.
fn fail(config: &LaunchConfig, ready: OwnedFd, reason: String) -> i32 {
    log!(config, "{reason}");
    let mut ready = File::from(ready);
    let _ = writeln!(ready, "{}", Reply::Failed(reason).to_line());
    1
}

/// What [`boot`] leaves for later.
struct Booted {
    /// The command's pid while it runs.
    command: Option<Pid>,
    /// The user data script, if it is to run now.
    script: Option<Vec<u8>>,
    /// The instance dir (opened before the root changed).
    instance_dir: OwnedFd,
    env: Vec<(&'static str, String)>,
}

impl Booted {
    /// Writes the user data script into the instance, marks it run and starts it (not waited
    /// for; PID 1 reaps it). Failures are logged on the console, as cloud-init would.
    fn run_user_data(&self, config: &LaunchConfig) {
        let Some(script) = &self.script else { return };
        let path = Path::new(USER_DATA_SCRIPT);
        let written = path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::write(path, script))
            .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o700)));
        if let Err(e) = written {
            log!(
                config,
                "writing the user data script to {USER_DATA_SCRIPT}: {e}"
            );
            return;
        }
        // Marked before it runs: "once" holds even if it crashes the instance.
        if let Err(e) = openat(
            self.instance_dir.as_fd(),
            layout::USER_DATA_DONE,
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            log!(config, "marking the user data as run: {e}; not running it");
            return;
        }
        match console_stdio().and_then(|(out, err)| spawn(Command::new(path), &self.env, out, err))
        {
            Ok(pid) => log!(config, "user data script started (pid {pid})"),
            Err(e) => log!(config, "running the user data script: {e}"),
        }
    }
}

/// Sets up the instance's namespaces and root, and spawns the command.
fn boot(config: &LaunchConfig) -> Result<Booted, String> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC)
        .map_err(|e| format!("creating mount, UTS and IPC namespaces: {e}"))?;
    // Nothing mounted here may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    // The UTS sysctls are per namespace: this is the new one's host name.
    fs::write("/proc/sys/kernel/hostname", &config.hostname)
        .map_err(|e| format!("setting the host name: {e}"))?;

    // What lives in the instance dir is opened before the root changes (the dir is hidden
    // inside the instance).
    let dir = &config.instance_dir;
    let instance_dir: OwnedFd = File::open(dir)
        .map_err(|e| format!("opening {}: {e}", dir.display()))?
        .into();
    let script = match fs::read(dir.join(layout::USER_DATA)) {
        Ok(data) if data.starts_with(b"#!") && !dir.join(layout::USER_DATA_DONE).exists() => {
            Some(data)
        }
        _ => None,
    };
    let mut console = File::open(dir.join(layout::CONSOLE))
        .map_err(|e| format!("opening the console for reading: {e}"))?;

    // No private root, no instance: the host's own root would be writable and unmasked
    // (credentials, other tenants' files), so a failed overlay fails the launch.
    overlay_root(config).map_err(|e| format!("no private root file system: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    let env = vec![
        ("PATH", PATH.to_owned()),
        ("HOME", "/root".to_owned()),
        ("USER", "root".to_owned()),
        ("LOGNAME", "root".to_owned()),
        ("HOSTNAME", config.hostname.clone()),
    ];
    let command = match &config.command {
        None => None,
        Some(cmd) => launch(config, cmd, &env, &mut console)?,
    };
    Ok(Booted {
        command,
        script,
        instance_dir,
        env,
    })
}

/// Spawns `/bin/sh -c <cmd>` and checks it could run (see the module docs); its pid, `None`
/// if it has already ended (and been reaped).
fn launch(
    config: &LaunchConfig,
    cmd: &str,
    env: &[(&'static str, String)],
    console: &mut File,
) -> Result<Option<Pid>, String> {
    log!(config, "starting the command");
    // What the shell says from here on is its own (until the launch check is over).
    let offset = console.metadata().map(|m| m.len()).unwrap_or(0);
    let (out, err) = console_stdio().map_err(|e| format!("console: {e}"))?;
    let mut sh = Command::new("/bin/sh");
    sh.arg("-c").arg(cmd);
    let pid = spawn(sh, env, out, err).map_err(|e| format!("starting /bin/sh: {e}"))?;
    let deadline = Instant::now() + Duration::from_millis(config.launch_check_ms);
    while Instant::now() < deadline {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) if LAUNCH_FAILURE_CODES.contains(&code) => {
                let mut said = String::new();
                let _ = console.seek(SeekFrom::Start(offset));
                let _ = console.take(4096).read_to_string(&mut said);
                return Err(format!(
                    "command could not be run (exit {code}): {}",
                    said.trim()
                ));
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => thread::sleep(POLL),
            Ok(status) => {
                log!(config, "command {}", describe(status));
                return Ok(None);
            }
            Err(e) => return Err(format!("waiting for the command: {e}")),
        }
    }
    log!(config, "command started (pid {pid})");
    Ok(Some(pid))
}

/// Starts `cmd` with a clean environment, stdin /dev/null, stdout/stderr given, cwd /; its
/// pid. The child is reaped by PID 1's loop, not through the `Child`.
fn spawn(
    mut cmd: Command,
    env: &[(&'static str, String)],
    out: OwnedFd,
    err: OwnedFd,
) -> io::Result<Pid> {
    let child = cmd
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()?;
    Ok(Pid::from_raw(child.id().cast_signed()))
}

/// Two copies of PID 1's stderr, the console.
fn console_stdio() -> io::Result<(OwnedFd, OwnedFd)> {
    let e = io::stderr();
    Ok((
        e.as_fd().try_clone_to_owned()?,
        e.as_fd().try_clone_to_owned()?,
    ))
}

/// Reaps every exited child; returns whether there are none left. Logs the command's end.
fn reap(config: &LaunchConfig, command: &mut Option<Pid>) -> bool {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(status) => {
                if status.pid().is_some() && status.pid() == *command {
                    log!(config, "command {}", describe(status));
                    *command = None;
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return true,
            Err(e) => {
                log!(config, "waitpid: {e}");
                return false;
            }
        }
    }
}

/// SIGTERM to everything in the instance; exits when it is all gone, SIGKILLs what is left
/// after [`SHUTDOWN_GRACE`].
fn shutdown(config: &LaunchConfig, command: &mut Option<Pid>) -> i32 {
    log!(config, "SIGTERM: stopping the instance");
    // -1 from PID 1: every process of the namespace but PID 1.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        if reap(config, command) {
            return 0;
        }
        thread::sleep(POLL);
    }
    log!(config, "processes left after {SHUTDOWN_GRACE:?}: SIGKILL");
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    0
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => procfs::describe_exit(Some(code), None),
        WaitStatus::Signaled(_, sig, _) => procfs::describe_exit(None, Some(sig as i32)),
        other => format!("{other:?}"),
    }
}

/// `mount` with a message naming the target.
fn mnt(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(Some(source), target, fstype, flags, data)
        .map_err(|e| format!("mounting {source} on {}: {e}", target.display()))
}

/// A directory (mount point) to exist.
fn mkdirs(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

/// The instance's root: an overlay of the host's root (read-only below) and the instance's
/// upper dir, with fresh /proc, /sys, /dev, /tmp and /run, the agent's state dir hidden; then
/// `pivot_root` into it and the host's root detached.
fn overlay_root(config: &LaunchConfig) -> Result<(), String> {
    let dir = &config.instance_dir;
    let (upper, work, root) = (
        dir.join(layout::UPPER),
        dir.join(layout::WORK),
        dir.join(layout::MERGED),
    );
    for d in [&upper, &work, &root] {
        mkdirs(d)?;
    }
    mask_host_secrets(&upper)?;
    let opts = format!(
        "lowerdir=/,upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mnt(
        "overlay",
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(&opts),
    )?;
    if let Err(e) = populate(config, &root) {
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        return Err(e);
    }
    // pivot_root(".", "."): the old root ends up stacked on the new one, and is detached.
    chdir(&root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    if let Err(e) = pivot_root(".", ".") {
        let _ = chdir("/");
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        return Err(format!("pivot_root to {}: {e}", root.display()));
    }
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the host's root: {e}"))
}

/// Host directories an instance must not read (the appliance's data and credentials, users'
/// homes, SSH host keys): the instance sees them empty, and what it writes there is its own.
const MASKED_DIRS: &[&str] = &["var/lib/vpc", "root", "home", "etc/ssh", "var/lib/etcd"];
/// Host files an instance must not read: the instance sees them deleted.
const MASKED_FILES: &[&str] = &["etc/shadow", "etc/gshadow", "etc/shadow-", "etc/gshadow-"];

/// Prepares the upper layer so the host's secrets are not visible through the lower one
/// (`/`): opaque directories (`trusted.overlay.opaque`) hide a lower directory's contents,
/// whiteouts (character device 0:0) hide a lower file. Only what the upper layer does not hold
/// yet is made, so the instance's own files there survive restarts.
fn mask_host_secrets(upper: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    for rel in MASKED_DIRS {
        let dir = upper.join(rel);
        if fs::symlink_metadata(&dir).is_ok() {
            continue;
        }
        mkdirs(&dir)?;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| format!("{}: NUL in path", dir.display()))?;
        // SAFETY: setxattr reads the NUL-terminated path, name and the 1-byte value we own.
        let rc = unsafe {
            nix::libc::setxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        if rc != 0 {
            return Err(format!(
                "marking {} opaque: {}",
                dir.display(),
                io::Error::last_os_error()
            ));
        }
    }
    for rel in MASKED_FILES {
        let file = upper.join(rel);
        if fs::symlink_metadata(&file).is_ok()
            || fs::symlink_metadata(Path::new("/").join(rel)).is_err()
        {
            continue;
        }
        if let Some(parent) = file.parent() {
            mkdirs(parent)?;
        }
        nix::sys::stat::mknod(
            &file,
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(|e| format!("whiteout {}: {e}", file.display()))?;
    }
    Ok(())
}

/// Mounts the instance's API file systems under `root`.
fn populate(config: &LaunchConfig, root: &Path) -> Result<(), String> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let at = |p: &str| root.join(p);
    hide(config, root)?;
    mkdirs(&at("proc"))?;
    // This process is in the instance's PID namespace: the proc shows only its processes.
    mnt(
        "proc",
        &at("proc"),
        Some("proc"),
        nosuid_nodev | MsFlags::MS_NOEXEC,
        None,
    )?;
    mkdirs(&at("sys"))?;
    // Mounted from inside the instance's network namespace: its net devices. Read-only: the
    // rest of /sys is the host's.
    mnt(
        "sysfs",
        &at("sys"),
        Some("sysfs"),
        nosuid_nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None,
    )?;
    mkdirs(&at("dev"))?;
    mnt(
        "tmpfs",
        &at("dev"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    for dev in DEVICES {
        let target = at("dev").join(dev);
        File::create(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
        mnt(
            &format!("/dev/{dev}"),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    mkdirs(&at("dev/pts"))?;
    mnt(
        "devpts",
        &at("dev/pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mkdirs(&at("dev/shm"))?;
    mnt(
        "shm",
        &at("dev/shm"),
        Some("tmpfs"),
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, at("dev").join(link)).map_err(|e| format!("/dev/{link}: {e}"))?;
    }
    for (d, mode) in [("tmp", "mode=1777"), ("run", "mode=755")] {
        mkdirs(&at(d))?;
        mnt("tmpfs", &at(d), Some("tmpfs"), nosuid_nodev, Some(mode))?;
    }
    Ok(())
}

/// Covers the agent's state dir (other instances' files and user data) under `root` with an
/// empty read-only tmpfs.
fn hide(config: &LaunchConfig, root: &Path) -> Result<(), String> {
    let rel = config
        .hide_dir
        .strip_prefix("/")
        .unwrap_or(&config.hide_dir);
    let target: PathBuf = root.join(rel);
    if target.is_dir() {
        mnt(
            "tmpfs",
            &target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=755,size=4k"),
        )?;
    }
    Ok(())
}
