//! Processes by pid and start time: what survives an agent restart.
//!
//! A pid alone does not identify a process across time: once the instance's process has exited
//! the kernel may give its pid to anything. The runtime therefore records a pid together with
//! the process's start time (field 22 of `/proc/<pid>/stat`, in clock ticks since boot), which
//! never changes during a process's life and differs for any later process with the same pid.

use std::{fs, io, path::Path};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// A process identified beyond its pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// The pid, in the agent's PID namespace.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

/// What the shim records once the instance is up (`run.json` in the instance's state dir).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The shim: `vpc-instance-init` as the agent started it, outside the instance's PID
    /// namespace; it waits for the instance's PID 1 and records how it ended.
    pub shim: ProcId,
    /// The instance's PID 1 (its host pid): the tracked process.
    pub init: ProcId,
}

/// The fields of `/proc/<pid>/stat` the runtime needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

/// Parses the contents of `/proc/<pid>/stat`. The second field (the command name, in
/// parentheses) may itself contain spaces and parentheses, so the fields are counted from the
/// last `)`.
pub fn parse_stat(contents: &str) -> Option<Stat> {
    let rest = &contents[contents.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // `rest` starts at field 3.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// `/proc/<pid>/stat` of a process, `None` if there is no such process (or it cannot be read).
pub fn stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The identity of a live process.
pub fn proc_id(pid: i32) -> Option<ProcId> {
    stat(pid).map(|s| ProcId {
        pid,
        start_time: s.start_time,
    })
}

/// Whether the process recorded as `id` still runs: same pid, same start time, and not a
/// zombie (an exited process waiting for its parent to reap it is not running).
pub fn is_alive(id: ProcId) -> bool {
    stat(id.pid).is_some_and(|s| s.start_time == id.start_time && !matches!(s.state, 'Z' | 'X'))
}

/// Describes how a process ended, for [`super::InstanceStatus::Stopped`]: `exited 3` or
/// `killed by SIGKILL` (`killed by signal 64` for a number that is not a known signal).
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exited {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "ended (status unknown)".to_owned(),
    }
}

/// Writes `contents` to `path` atomically (a temporary file renamed over it), so that a reader
/// (a restarted agent) never sees half a record.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("1 (init) Z 0"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reads_own_stat() {
        let me = i32::try_from(std::process::id()).unwrap();
        let id = proc_id(me).unwrap();
        assert!(is_alive(id));
        assert!(!is_alive(ProcId {
            start_time: id.start_time + 1,
            ..id
        }));
        assert!(stat(0).is_none() && stat(-1).is_none());
    }

    #[test]
    fn describes_exits() {
        assert_eq!(describe_exit(Some(0), None), "exited 0");
        assert_eq!(describe_exit(None, Some(9)), "killed by SIGKILL");
        assert_eq!(describe_exit(None, Some(15)), "killed by SIGTERM");
        assert_eq!(describe_exit(None, Some(200)), "killed by signal 200");
    }

    #[test]
    fn run_record_round_trips() {
        let r = RunRecord {
            shim: ProcId {
                pid: 10,
                start_time: 5,
            },
            init: ProcId {
                pid: 11,
                start_time: 6,
            },
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<RunRecord>(&json).unwrap(), r);
    }
}
