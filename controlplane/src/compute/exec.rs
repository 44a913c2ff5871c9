//! The side effects: running `ip`, reading and writing sysctls, looking at /run/netns.
//!
//! Everything here that has no namespace argument acts on the network namespace of the calling
//! thread (a child process starts in its spawning thread's namespace; `/proc/sys/net` shows the
//! opening thread's). The agent runs wholly in one namespace, so that is the agent's; a caller
//! that enters a namespace on one thread must poll the futures on that thread (a
//! current-thread tokio runtime).

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
};

use nix::{
    errno::Errno,
    sched::{CloneFlags, setns},
    sys::statfs::{NSFS_MAGIC, statfs},
};
use tokio::sync::oneshot;

use super::{
    ComputeError,
    plan::Step,
    state::{LinkState, NetnsState, parse_links},
};

/// Where `ip netns add` bind-mounts named network namespaces.
pub(super) const NETNS_DIR: &str = "/run/netns";

/// `/run/netns/NAME`.
pub(super) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether the named namespace exists: its file is a mounted nsfs, a leftover plain file, or
/// absent.
pub(super) fn netns_state(name: &str) -> Result<NetnsState, ComputeError> {
    let path = netns_path(name);
    match statfs(&path) {
        Ok(fs) if fs.filesystem_type() == NSFS_MAGIC => Ok(NetnsState::Present),
        Ok(_) => Ok(NetnsState::Stale),
        Err(Errno::ENOENT) => Ok(NetnsState::Missing),
        Err(e) => Err(ComputeError::Io {
            what: format!("statfs {}", path.display()),
            source: e.into(),
        }),
    }
}

/// The names under /run/netns (none if it does not exist). Names that are not UTF-8 are
/// skipped. Synchronous: a tmpfs directory is read in microseconds.
pub(super) fn netns_names() -> Result<Vec<String>, ComputeError> {
    let io_error = |source| ComputeError::Io {
        what: format!("listing {NETNS_DIR}"),
        source,
    };
    let dir = match fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(e)),
    };
    let mut names = Vec::new();
    for entry in dir {
        if let Ok(name) = entry.map_err(io_error)?.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Whether `ip`'s stderr says the named device does not exist (`Device "X" does not exist.`
/// when looking it up, `Cannot find device "X"` when changing it).
fn is_missing_device(stderr: &str) -> bool {
    stderr.contains("does not exist") || stderr.contains("Cannot find device")
}

/// Runs `ip [-n NETNS] ARGS...` and returns its stdout; `Ok(None)` if `missing_ok` and `ip`
/// failed because the device does not exist.
pub(super) async fn ip(
    netns: Option<&str>,
    args: &[String],
    missing_ok: bool,
) -> Result<Option<String>, ComputeError> {
    let mut cmd = tokio::process::Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let command = || {
        let mut line = String::from("ip");
        if let Some(ns) = netns {
            line.push_str(" -n ");
            line.push_str(ns);
        }
        for a in args {
            line.push(' ');
            line.push_str(a);
        }
        line
    };
    let out = cmd.output().await.map_err(|e| ComputeError::Io {
        what: format!("running `{}`", command()),
        source: e,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else if missing_ok && is_missing_device(&stderr) {
        Ok(None)
    } else {
        Err(ComputeError::Command {
            command: command(),
            status: out.status.to_string(),
            stderr: stderr.trim().to_owned(),
        })
    }
}

/// `ip -j -d link show dev IFNAME` in the caller's namespace; `None` if there is no such
/// interface.
pub(super) async fn observe_link(ifname: &str) -> Result<Option<LinkState>, ComputeError> {
    let args = ["-j", "-d", "link", "show", "dev", ifname].map(str::to_owned);
    let Some(json) = ip(None, &args, true).await? else {
        return Ok(None);
    };
    let links = parse_links(&json).map_err(|reason| ComputeError::Parse {
        command: format!("ip {}", args.join(" ")),
        reason,
    })?;
    Ok(links.into_iter().find(|l| l.ifname == ifname))
}

/// Reads (`value` `None`) or writes `/proc/sys/<key>` in the named namespace, or in the
/// caller's (`netns` `None`). A read of a missing key returns `None`.
///
/// In another namespace, a short-lived thread enters it (setns) and does the access: the
/// namespace is a per-thread attribute, so no thread of the caller's runtime is moved.
pub(super) async fn sysctl(
    netns: Option<&str>,
    key: &str,
    value: Option<&'static str>,
) -> Result<Option<String>, ComputeError> {
    let file = Path::new("/proc/sys").join(key);
    let error = |source| ComputeError::Sysctl {
        key: key.replace('/', "."),
        netns: netns.unwrap_or("the agent's namespace").to_owned(),
        source,
    };
    let Some(ns) = netns else {
        return access(&file, value).map_err(error);
    };
    let ns_file = netns_path(ns);
    let (tx, rx) = oneshot::channel();
    thread::Builder::new()
        .name("compute-sysctl".into())
        .spawn(move || {
            let result = fs::File::open(&ns_file)
                .and_then(|f| setns(&f, CloneFlags::CLONE_NEWNET).map_err(io::Error::from))
                .and_then(|()| access(&file, value));
            // The receiver is gone only if the caller stopped waiting.
            let _ = tx.send(result);
        })
        .map_err(error)?;
    match rx.await {
        Ok(result) => result.map_err(error),
        Err(_) => Err(error(io::Error::other("the sysctl thread panicked"))),
    }
}

/// Reads (trimmed; `None` if the file does not exist) or writes a sysctl file.
fn access(file: &Path, value: Option<&str>) -> io::Result<Option<String>> {
    match value {
        Some(v) => fs::write(file, v).map(|()| None),
        None => match fs::read_to_string(file) {
            Ok(s) => Ok(Some(s.trim().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
    }
}

/// Carries out one step.
pub(super) async fn run(step: &Step) -> Result<(), ComputeError> {
    match step {
        Step::Ip {
            netns,
            args,
            missing_ok,
        } => ip(netns.as_deref(), args, *missing_ok).await.map(drop),
        Step::Sysctl { netns, key, value } => {
            sysctl(netns.as_deref(), key, Some(value)).await.map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_messages() {
        assert!(is_missing_device("Device \"vi0\" does not exist."));
        assert!(is_missing_device("Cannot find device \"vi0\""));
        assert!(!is_missing_device("RTNETLINK answers: File exists"));
    }
}
