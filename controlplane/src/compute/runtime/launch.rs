//! What the runtime tells `vpc-instance-init`, and what it answers.
//!
//! The runtime starts the init binary with one argument, a [`LaunchConfig`] in JSON, stdin on
//! /dev/null, stderr appended to the instance's console file and stdout a pipe: the init
//! writes exactly one line there, [`READY`] (followed by its PID 1's host pid) once the
//! instance is up, or [`FAILED`] followed by the reason, and then lets go of the pipe (so that
//! nothing in the instance keeps the agent's pipe open).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The readiness line's prefix: `ok <pid>`.
pub const READY: &str = "ok";

/// The failure line's prefix: `error: <reason>`.
pub const FAILED: &str = "error:";

/// Exit statuses of `/bin/sh -c` meaning that the command could not be run: 126 (found but
/// not executable) and 127 (not found).
pub const LAUNCH_FAILURE_CODES: [i32; 2] = [126, 127];

/// Everything the init needs; all paths are host paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// The instance id (for log lines).
    pub instance_id: String,
    /// The network namespace to join.
    pub netns_path: PathBuf,
    /// The instance's host name.
    pub hostname: String,
    /// The `cgroup.procs` files the init writes its pid to before doing anything else.
    pub cgroup_procs: Vec<PathBuf>,
    /// The instance's persistent directory (`<state dir>/<id>`).
    pub instance_dir: PathBuf,
    /// The directory to hide inside the instance (the agent's state dir: it holds the other
    /// instances' files and user data).
    pub hide_dir: PathBuf,
    /// The command, run as `/bin/sh -c <command>`.
    pub command: Option<String>,
    /// How long a command exiting with 126/127 counts as a failed launch, in milliseconds.
    pub launch_check_ms: u64,
}

/// The init's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The instance is up; its PID 1 has this host pid.
    Ready(i32),
    /// It is not, for this reason.
    Failed(String),
}

impl Reply {
    /// The line written to the pipe (without the newline).
    pub fn to_line(&self) -> String {
        match self {
            Reply::Ready(pid) => format!("{READY} {pid}"),
            // One line: the reason's newlines become "; ".
            Reply::Failed(reason) => format!(
                "{FAILED} {}",
                reason
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }

    /// Parses a line; `None` if it is neither form.
    pub fn parse(line: &str) -> Option<Reply> {
        let line = line.trim_end();
        if let Some(reason) = line.strip_prefix(FAILED) {
            return Some(Reply::Failed(reason.trim().to_owned()));
        }
        let pid = line.strip_prefix(READY)?.trim().parse().ok()?;
        Some(Reply::Ready(pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Ready(4242),
            Reply::Failed("sh: 1: nope: not found".into()),
        ] {
            assert_eq!(Reply::parse(&r.to_line()), Some(r));
        }
        assert_eq!(
            Reply::Failed("a\n\n b \n".into()).to_line(),
            "error: a; b".to_owned()
        );
        assert_eq!(Reply::parse("ok"), None);
        assert_eq!(Reply::parse("hello"), None);
    }
}
