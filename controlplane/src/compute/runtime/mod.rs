//! The instance runtime: starts, stops and finds the processes of the instances on this host.
//!
//! An instance is a set of namespaces around a tree of processes, not a VM. Its network
//! namespace (`/run/netns/<prefix><id>`, from [`super::ComputeNet`]) exists before it starts;
//! the runtime adds a PID, mount, UTS and IPC namespace, cgroups with the limits of its
//! instance type, and a root file system of its own: an overlay whose lower layer is the
//! host's root and whose upper layer lives in the instance's state dir, so the instance's
//! writes are private and persist across stop and start, like an EBS root volume.
//!
//! ```text
//!  <state dir>/<instance id>/      kept across stop/start, removed by destroy
//!    root/upper root/work          the overlay's upper and work dirs (the instance's writes)
//!    root/merged                   its mount point (mounted only inside the instance)
//!    console.log                   the command's stdout and stderr, and init's messages
//!    user-data, user-data.done     the user data; the marker that its script has run
//!    run.json                      the shim's and PID 1's pids and start times (while running)
//!    exit                          how PID 1 ended last time ("exited 0", "killed by SIGKILL")
//!  <cgroup root>/{cpu,memory,pids}/<cgroup name>/<instance id>   (v1; v2: one directory)
//! ```
//!
//! [`Runtime::start`] starts `vpc-instance-init` (see [`init`] for what it does, and why there
//! and not in the agent) and waits for its one-line answer: the instance is up, or why not.
//! Instances do not depend on the agent: they survive its crash or restart, and a new
//! [`Runtime`] on the same state dir finds them through `run.json`, whose pids are checked
//! against their start times so that a reused pid is never mistaken for an instance.
//!
//! Calls for one instance must not overlap (the agent's reconcile loop makes one at a time);
//! calls for different instances may.

mod cgroup;
pub mod init;
mod launch;
mod procfs;

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::io::{AsyncBufReadExt, BufReader};

use cgroup::Cgroups;
use launch::{LaunchConfig, Reply};
use procfs::RunRecord;

use super::types::{InstanceType, PIDS_MAX};

/// How long [`Runtime::start`] waits for the instance's init to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a command exiting with 126 or 127 counts as a failed launch.
pub const LAUNCH_CHECK: Duration = Duration::from_millis(200);

/// How long killing an instance's cgroup, and removing its directories, may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the shim gets to record how PID 1 ended, once PID 1 is gone.
const SHIM_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(20);

/// Largest user data accepted (EC2's limit).
pub const MAX_USER_DATA: usize = 16 * 1024;

/// Smallest limits accepted: CFS needs at least 1 ms of quota per period, and an instance's
/// init, shell and a command need some memory and a few tasks.
const MIN_CPU_MILLIS: u32 = 10;
const MIN_MEMORY: u64 = 16 << 20;
const MIN_PIDS: u32 = 8;

/// File names in an instance's state dir (shared with [`init`]).
mod layout {
    pub const RUN: &str = "run.json";
    pub const EXIT: &str = "exit";
    pub const CONSOLE: &str = "console.log";
    pub const USER_DATA: &str = "user-data";
    pub const USER_DATA_DONE: &str = "user-data.done";
    pub const UPPER: &str = "root/upper";
    pub const WORK: &str = "root/work";
    pub const MERGED: &str = "root/merged";
}

/// An instance's resource limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period, in thousandths of a CPU: 1000 is one CPU.
    pub cpu_millis: u32,
    /// Memory (and, where accounted, memory + swap) limit.
    pub memory_bytes: u64,
    /// Tasks (processes and threads) at once.
    pub pids: u32,
}

impl Limits {
    /// The limits of an instance type: its vCPUs as CPU quota, its memory, [`PIDS_MAX`] tasks.
    pub fn for_type(t: &InstanceType) -> Limits {
        Limits {
            cpu_millis: t.vcpus.saturating_mul(1000),
            memory_bytes: t.memory_mib.saturating_mul(1 << 20),
            pids: PIDS_MAX,
        }
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The instance id, e.g. `i-0a1b2c3d4e5f60718`: 1-64 characters of `[A-Za-z0-9_-]`,
    /// starting with a letter or digit.
    pub instance_id: String,
    /// Its network namespace, which must exist (e.g. `/run/netns/vpc-i-...`).
    pub netns_path: PathBuf,
    /// Its host name (EC2 style: `ip-10-0-1-4`): labels of letters, digits and `-`, at most
    /// 64 characters.
    pub hostname: String,
    /// Its limits.
    pub limits: Limits,
    /// Run as `/bin/sh -c <command>` in the instance, output to the console.
    pub command: Option<String>,
    /// User data: when it starts with `#!`, a script run once, on the instance's first start
    /// (after the command has started, as cloud-init runs it late in boot); otherwise only
    /// stored. At most [`MAX_USER_DATA`] bytes.
    pub user_data: Option<Vec<u8>>,
}

/// What [`Runtime::status`] finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceStatus {
    /// PID 1 of the instance runs.
    Running {
        /// Its host pid.
        pid: i32,
    },
    /// The instance has state here but does not run.
    Stopped {
        /// How its PID 1 ended last time ("exited 0", "killed by SIGKILL"), if known.
        exit: Option<String>,
    },
    /// No state for this instance.
    Absent,
}

/// Why a runtime call failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The instance spec (or id) is invalid; nothing was done.
    #[error("invalid instance spec: {0}")]
    InvalidSpec(String),
    /// An argument of [`Runtime::new`] is invalid.
    #[error("invalid runtime configuration: {0}")]
    InvalidConfig(String),
    /// The instance's network namespace does not exist.
    #[error("instance {instance_id}: network namespace {} does not exist", path.display())]
    NetnsMissing {
        /// The instance.
        instance_id: String,
        /// The namespace's path.
        path: PathBuf,
    },
    /// The cgroup controllers needed are not there.
    #[error("cgroups unavailable: {0}")]
    CgroupUnavailable(String),
    /// A cgroup file or directory could not be written, created or removed.
    #[error("cgroup: {what} {}: {source}", path.display())]
    Cgroup {
        /// What was being done ("creating", "writing \"100000\" to").
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The init binary could not be started.
    #[error("instance {instance_id}: cannot run {}: {source}", init_bin.display())]
    Spawn {
        /// The instance.
        instance_id: String,
        /// The init binary.
        init_bin: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The instance's init reported that it could not start the instance (e.g. `/bin/sh: 1:
    /// foo: not found` when the command does not exist). Nothing of it runs.
    #[error("instance {instance_id}: start failed: {reason}")]
    Launch {
        /// The instance.
        instance_id: String,
        /// Why, as the init (or the shell) said it.
        reason: String,
    },
    /// Something did not happen in time.
    #[error("instance {instance_id}: {what} did not finish within {after:?}")]
    Timeout {
        /// The instance.
        instance_id: String,
        /// What it was.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
    /// Processes of the instance survived SIGKILL for [`KILL_TIMEOUT`] (e.g. stuck in the
    /// kernel in uninterruptible sleep).
    #[error("instance {instance_id}: processes {pids:?} still running after SIGKILL")]
    StillRunning {
        /// The instance.
        instance_id: String,
        /// Their pids.
        pids: Vec<i32>,
    },
}

/// The runtime of one agent. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state_dir: PathBuf,
    cgroups: Cgroups,
    init_bin: PathBuf,
}

impl Runtime {
    /// A runtime keeping instance state under `state_dir` (created, mode 0700; it must belong
    /// to this agent alone), cgroups under `<controller root>/<cgroup_name>` (created; the
    /// name must belong to this agent alone) and starting instances with `init_bin` (the
    /// `vpc-instance-init` binary).
    ///
    /// `state_dir` must be absolute and free of `,`, `:` and `\` (it goes into overlayfs
    /// mount options); `cgroup_name` is 1-64 characters of `[A-Za-z0-9_-]`.
    pub fn new(
        state_dir: PathBuf,
        cgroup_name: &str,
        init_bin: PathBuf,
    ) -> Result<Runtime, RuntimeError> {
        Runtime::with_cgroup_root(
            state_dir,
            cgroup_name,
            init_bin,
            Path::new(cgroup::CGROUP_ROOT),
        )
    }

    fn with_cgroup_root(
        state_dir: PathBuf,
        cgroup_name: &str,
        init_bin: PathBuf,
        cgroup_root: &Path,
    ) -> Result<Runtime, RuntimeError> {
        validate_config(&state_dir, cgroup_name)?;
        if !init_bin.is_file() {
            return Err(RuntimeError::InvalidConfig(format!(
                "init binary {} is not a file",
                init_bin.display()
            )));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|source| RuntimeError::Io {
                what: format!("creating state dir {}", state_dir.display()),
                source,
            })?;
        let cgroups = Cgroups::new(cgroup_root, cgroup_name)?;
        tracing::debug!(
            state_dir = %state_dir.display(),
            cgroup_name,
            version = ?cgroups.version(),
            "runtime: ready"
        );
        Ok(Runtime {
            inner: Arc::new(Inner {
                state_dir,
                cgroups,
                init_bin,
            }),
        })
    }

    /// Starts the instance; `Ok(false)` if it already runs. Returns once its init reports it
    /// up (root file system, namespaces and cgroups set up, the command started and not
    /// failed to launch), or fails within [`START_TIMEOUT`]. A failed start leaves nothing
    /// running and no cgroup; its state dir stays only if an earlier start had created it.
    pub async fn start(&self, spec: &InstanceSpec) -> Result<bool, RuntimeError> {
        validate_spec(spec)?;
        let id = &spec.instance_id;
        if let InstanceStatus::Running { .. } = self.status(id) {
            return Ok(false);
        }
        if !spec.netns_path.exists() {
            return Err(RuntimeError::NetnsMissing {
                instance_id: id.clone(),
                path: spec.netns_path.clone(),
            });
        }
        // Leftovers of an earlier run: an instance whose PID 1 died (its shim may still be
        // finishing), or an agent that crashed during a start.
        self.kill_and_remove_cgroups(id).await?;
        let dir = self.instance_dir(id);
        let fresh = !dir.exists();
        let mut child = None;
        let result = self.launch(spec, &dir, &mut child).await;
        if let Err(e) = &result {
            tracing::warn!(instance = %id, error = %e, "runtime: start failed; cleaning up");
            if let Some(child) = &mut child {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(KILL_TIMEOUT, child.wait()).await;
            }
            if let Err(e) = self.kill_and_remove_cgroups(id).await {
                tracing::warn!(instance = %id, error = %e, "runtime: cleaning up a failed start");
            }
            let _ = fs::remove_file(dir.join(layout::RUN));
            if fresh {
                let _ = fs::remove_dir_all(&dir);
            }
        }
        result.map(|()| true)
    }

    /// The steps of [`Runtime::start`] that need undoing on failure; the spawned init goes
    /// into `child`.
    async fn launch(
        &self,
        spec: &InstanceSpec,
        dir: &Path,
        child: &mut Option<tokio::process::Child>,
    ) -> Result<(), RuntimeError> {
        let id = &spec.instance_id;
        let io_err = |what: String| move |source| RuntimeError::Io { what, source };
        for sub in [layout::UPPER, layout::WORK, layout::MERGED] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))
                .map_err(io_err(format!("creating {}", dir.join(sub).display())))?;
        }
        for stale in [layout::RUN, layout::EXIT] {
            remove_if_exists(&dir.join(stale))?;
        }
        let user_data = dir.join(layout::USER_DATA);
        match &spec.user_data {
            Some(data) => write_private(&user_data, data)?,
            None => remove_if_exists(&user_data)?,
        }
        self.inner.cgroups.create(id, &spec.limits)?;
        let console_path = dir.join(layout::CONSOLE);
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&console_path)
            .map_err(io_err(format!("opening {}", console_path.display())))?;
        let config = LaunchConfig {
            instance_id: id.clone(),
            netns_path: spec.netns_path.clone(),
            hostname: spec.hostname.clone(),
            cgroup_procs: self.inner.cgroups.procs_files(id),
            instance_dir: dir.to_owned(),
            hide_dir: self.inner.state_dir.clone(),
            command: spec.command.clone(),
            launch_check_ms: u64::try_from(LAUNCH_CHECK.as_millis()).unwrap_or(u64::MAX),
        };
        let config = serde_json::to_string(&config).map_err(|e| RuntimeError::Io {
            what: "encoding the launch config".into(),
            source: e.into(),
        })?;
        let spawned = tokio::process::Command::new(&self.inner.init_bin)
            .arg(config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(console)
            // The instance outlives this handle, and the agent.
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| RuntimeError::Spawn {
                instance_id: id.clone(),
                init_bin: self.inner.init_bin.clone(),
                source,
            })?;
        let child = child.insert(spawned);
        let stdout = child.stdout.take().ok_or_else(|| RuntimeError::Io {
            what: "the init's stdout".into(),
            source: io::ErrorKind::BrokenPipe.into(),
        })?;
        let mut line = String::new();
        let read = tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut line))
            .await
            .map_err(|_| RuntimeError::Timeout {
                instance_id: id.clone(),
                what: "start",
                after: START_TIMEOUT,
            })?;
        let reply = match read {
            Ok(_) => Reply::parse(&line),
            Err(_) => None,
        };
        match reply {
            Some(Reply::Ready(pid)) => {
                tracing::info!(instance = %id, pid, "runtime: instance started");
                // Dropping the handle leaves the init running; tokio reaps it when it exits.
                Ok(())
            }
            Some(Reply::Failed(reason)) => Err(RuntimeError::Launch {
                instance_id: id.clone(),
                reason,
            }),
            None => {
                let status = tokio::time::timeout(KILL_TIMEOUT, child.wait()).await;
                let status = match status {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "still running".to_owned(),
                };
                Err(RuntimeError::Launch {
                    instance_id: id.clone(),
                    reason: format!(
                        "vpc-instance-init did not report ({status}, said {:?}); see {}",
                        line.trim(),
                        console_path.display()
                    ),
                })
            }
        }
    }

    /// Stops the instance: SIGTERM to its PID 1 (which passes it on to every process of the
    /// instance and exits when they are gone), SIGKILL after `grace`, then SIGKILL to
    /// whatever is left in its cgroups, which are removed. Its state dir (root file system
    /// changes, console, user-data marker) is kept. `Ok(true)` if it was running.
    pub async fn stop(&self, instance_id: &str, grace: Duration) -> Result<bool, RuntimeError> {
        validate_id(instance_id)?;
        let dir = self.instance_dir(instance_id);
        let running = self.running(instance_id);
        if let Some(run) = running {
            let init = Pid::from_raw(run.init.pid);
            tracing::info!(instance = %instance_id, pid = run.init.pid, "runtime: stopping");
            let _ = kill(init, Signal::SIGTERM);
            if !wait_until(grace, || !procfs::is_alive(run.init)).await {
                tracing::info!(instance = %instance_id, ?grace, "runtime: SIGKILL");
                if procfs::is_alive(run.init) {
                    let _ = kill(init, Signal::SIGKILL);
                }
            }
            // Let the shim record how PID 1 ended before its cgroup is emptied.
            wait_until(SHIM_EXIT_WAIT, || !procfs::is_alive(run.shim)).await;
        }
        self.kill_and_remove_cgroups(instance_id).await?;
        remove_if_exists(&dir.join(layout::RUN))?;
        if running.is_some() && !dir.join(layout::EXIT).exists() {
            // The shim was killed before it could say.
            let _ = procfs::write_atomic(&dir.join(layout::EXIT), b"killed by SIGKILL");
        }
        Ok(running.is_some())
    }

    /// The instance's state.
    pub fn status(&self, instance_id: &str) -> InstanceStatus {
        if validate_id(instance_id).is_err() {
            return InstanceStatus::Absent;
        }
        let dir = self.instance_dir(instance_id);
        if !dir.is_dir() {
            return InstanceStatus::Absent;
        }
        if let Some(run) = self.running(instance_id) {
            return InstanceStatus::Running { pid: run.init.pid };
        }
        let exit = fs::read_to_string(dir.join(layout::EXIT))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        InstanceStatus::Stopped { exit }
    }

    /// The ids of the instances with state here (running or not), sorted.
    pub fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let entries = fs::read_dir(&self.inner.state_dir).map_err(|source| RuntimeError::Io {
            what: format!("listing {}", self.inner.state_dir.display()),
            source,
        })?;
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| validate_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Stops the instance (see [`Runtime::stop`]) and removes all it has here: cgroups and
    /// state dir (its root file system changes included). `Ok(true)` if anything existed.
    pub async fn destroy(&self, instance_id: &str, grace: Duration) -> Result<bool, RuntimeError> {
        validate_id(instance_id)?;
        let dir = self.instance_dir(instance_id);
        let existed = dir.exists() || self.inner.cgroups.exists(instance_id);
        let was_running = self.stop(instance_id, grace).await?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RuntimeError::Io {
                    what: format!("removing {}", dir.display()),
                    source,
                });
            }
        }
        if existed || was_running {
            tracing::info!(instance = %instance_id, "runtime: destroyed");
        }
        Ok(existed || was_running)
    }

    /// The host pid of the instance's PID 1, which is in the instance's mount and PID
    /// namespaces (`/proc/<pid>/ns/mnt`, `/proc/<pid>/root`); `None` unless it runs.
    pub fn ns_pid(&self, instance_id: &str) -> Option<i32> {
        validate_id(instance_id).ok()?;
        self.running(instance_id).map(|r| r.init.pid)
    }

    /// The instance's console file: the command's stdout and stderr and the init's messages,
    /// appended across starts (kept by stop, removed by destroy).
    pub fn console_path(&self, instance_id: &str) -> PathBuf {
        self.instance_dir(instance_id).join(layout::CONSOLE)
    }

    fn instance_dir(&self, instance_id: &str) -> PathBuf {
        self.inner.state_dir.join(instance_id)
    }

    /// The run record, if its PID 1 is alive.
    fn running(&self, instance_id: &str) -> Option<RunRecord> {
        let json = fs::read(self.instance_dir(instance_id).join(layout::RUN)).ok()?;
        let run: RunRecord = serde_json::from_slice(&json).ok()?;
        procfs::is_alive(run.init).then_some(run)
    }

    /// SIGKILLs everything in the instance's cgroups and removes them (bounded).
    async fn kill_and_remove_cgroups(&self, instance_id: &str) -> Result<(), RuntimeError> {
        let cgroups = &self.inner.cgroups;
        if !cgroups.exists(instance_id) {
            return Ok(());
        }
        let left = cgroups.kill_all(instance_id, KILL_TIMEOUT).await;
        if !left.is_empty() {
            return Err(RuntimeError::StillRunning {
                instance_id: instance_id.to_owned(),
                pids: left,
            });
        }
        cgroups.remove(instance_id, KILL_TIMEOUT).await?;
        Ok(())
    }
}

/// Polls `done` until it holds or `timeout` passes; whether it held.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn remove_if_exists(path: &Path) -> Result<(), RuntimeError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RuntimeError::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

/// Writes a file readable by root only.
fn write_private(path: &Path, data: &[u8]) -> Result<(), RuntimeError> {
    use std::io::Write;
    fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|source| RuntimeError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
}

fn validate_id(instance_id: &str) -> Result<(), RuntimeError> {
    if super::plan::validate_instance_id(instance_id).is_ok() {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!(
            "instance id {instance_id:?}: expected 1-64 characters of [A-Za-z0-9_-] starting \
             with a letter or digit"
        )))
    }
}

fn validate_config(state_dir: &Path, cgroup_name: &str) -> Result<(), RuntimeError> {
    let invalid = |m: String| Err(RuntimeError::InvalidConfig(m));
    let dir = state_dir.to_string_lossy();
    if !state_dir.is_absolute() || dir.contains([',', ':', '\\']) || dir.contains('\u{fffd}') {
        return invalid(format!(
            "state dir {dir:?}: expected an absolute UTF-8 path without ',', ':' or '\\'"
        ));
    }
    if cgroup_name.len() > 64
        || !cgroup_name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        || !cgroup_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return invalid(format!(
            "cgroup name {cgroup_name:?}: expected 1-64 characters of [A-Za-z0-9_-] starting \
             with a letter or digit"
        ));
    }
    Ok(())
}

/// A host name: 1-64 characters, dot-separated labels of letters, digits and `-`, none empty
/// or starting or ending with `-`.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_spec(spec: &InstanceSpec) -> Result<(), RuntimeError> {
    validate_id(&spec.instance_id)?;
    let invalid = |m: String| {
        Err(RuntimeError::InvalidSpec(format!(
            "{}: {m}",
            spec.instance_id
        )))
    };
    if !valid_hostname(&spec.hostname) {
        return invalid(format!(
            "host name {:?}: expected 1-64 characters, labels of [A-Za-z0-9-]",
            spec.hostname
        ));
    }
    let Limits {
        cpu_millis,
        memory_bytes,
        pids,
    } = spec.limits;
    if cpu_millis < MIN_CPU_MILLIS || memory_bytes < MIN_MEMORY || pids < MIN_PIDS {
        return invalid(format!(
            "limits {:?} below the minimum ({MIN_CPU_MILLIS} CPU millis, {MIN_MEMORY} bytes, \
             {MIN_PIDS} tasks)",
            spec.limits
        ));
    }
    if spec.command.as_ref().is_some_and(|c| c.contains('\0')) {
        return invalid("the command contains a NUL byte".into());
    }
    if let Some(data) = &spec.user_data
        && data.len() > MAX_USER_DATA
    {
        return invalid(format!(
            "user data is {} bytes, more than {MAX_USER_DATA}",
            data.len()
        ));
    }
    if !spec.netns_path.is_absolute() {
        return invalid(format!(
            "network namespace path {} is not absolute",
            spec.netns_path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::types;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            instance_id: "i-0a1b2c3d4e5f60718".into(),
            netns_path: "/run/netns/vpc-i-0a1b2c3d4e5f60718".into(),
            hostname: "ip-10-0-1-4".into(),
            limits: Limits::for_type(types::lookup("t3.micro").unwrap()),
            command: Some("sleep 1".into()),
            user_data: None,
        }
    }

    #[test]
    fn limits_for_type() {
        assert_eq!(
            Limits::for_type(types::lookup("t3.micro").unwrap()),
            Limits {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                pids: PIDS_MAX
            }
        );
        let c5 = Limits::for_type(types::lookup("c5.2xlarge").unwrap());
        assert_eq!((c5.cpu_millis, c5.memory_bytes), (8000, 16 << 30));
    }

    #[test]
    fn valid_specs() {
        assert!(validate_spec(&spec()).is_ok());
        let bad = |f: fn(&mut InstanceSpec)| {
            let mut s = spec();
            f(&mut s);
            assert!(
                matches!(validate_spec(&s), Err(RuntimeError::InvalidSpec(_))),
                "{s:?}"
            );
        };
        bad(|s| s.instance_id = "../etc".into());
        bad(|s| s.instance_id = String::new());
        bad(|s| s.instance_id = "-i".into());
        bad(|s| s.hostname = "ip_10".into());
        bad(|s| s.hostname = "-ip".into());
        bad(|s| s.hostname = "a..b".into());
        bad(|s| s.hostname = "a".repeat(65));
        bad(|s| s.limits.cpu_millis = 5);
        bad(|s| s.limits.memory_bytes = 1 << 20);
        bad(|s| s.limits.pids = 1);
        bad(|s| s.command = Some("a\0b".into()));
        bad(|s| s.user_data = Some(vec![b'x'; MAX_USER_DATA + 1]));
        bad(|s| s.netns_path = "netns".into());
        assert!(valid_hostname("ip-10-0-1-4.ec2.internal"));
    }

    #[test]
    fn valid_configs() {
        assert!(
            validate_config(Path::new("/var/lib/vpc/agent/h1/instances"), "vpc-host-1").is_ok()
        );
        assert!(validate_config(Path::new("relative"), "vpc-host-1").is_err());
        assert!(validate_config(Path::new("/a,b"), "vpc-host-1").is_err());
        assert!(validate_config(Path::new("/a:b"), "vpc-host-1").is_err());
        assert!(validate_config(Path::new("/a"), "../x").is_err());
        assert!(validate_config(Path::new("/a"), "").is_err());
    }

    #[test]
    fn unknown_instances_are_absent() {
        let dir = std::env::temp_dir().join(format!("vpc-runtime-unit-{}", std::process::id()));
        let cg = std::env::temp_dir().join(format!("vpc-runtime-unit-cg-{}", std::process::id()));
        for c in ["cpu", "memory", "pids"] {
            fs::create_dir_all(cg.join(c)).unwrap();
            fs::write(cg.join(c).join("cgroup.procs"), "").unwrap();
        }
        let bin = std::env::current_exe().unwrap();
        let rt = Runtime::with_cgroup_root(dir.clone(), "agent", bin, &cg).unwrap();
        assert_eq!(rt.status("i-1"), InstanceStatus::Absent);
        assert_eq!(rt.status("../x"), InstanceStatus::Absent);
        assert_eq!(rt.ns_pid("i-1"), None);
        assert!(rt.list().unwrap().is_empty());
        // A directory with state but no live process: stopped; a stale run record (pid 1 of
        // the host with a wrong start time) is not mistaken for the instance.
        fs::create_dir_all(dir.join("i-1")).unwrap();
        fs::write(
            dir.join("i-1").join(layout::RUN),
            r#"{"shim":{"pid":1,"start_time":12345678901},"init":{"pid":1,"start_time":12345678901}}"#,
        )
        .unwrap();
        fs::write(dir.join("i-1").join(layout::EXIT), "exited 0\n").unwrap();
        fs::create_dir_all(dir.join("not valid!")).unwrap();
        assert_eq!(
            rt.status("i-1"),
            InstanceStatus::Stopped {
                exit: Some("exited 0".into())
            }
        );
        assert_eq!(rt.list().unwrap(), vec!["i-1".to_owned()]);
        assert_eq!(rt.console_path("i-1"), dir.join("i-1").join("console.log"));
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&cg).unwrap();
    }
}
