//! Instance cgroups: CPU quota, memory limit and task limit, on cgroup v1 or v2.
//!
//! Every instance gets `<controller root>/<agent cgroup>/<instance id>`: on v1 one directory
//! per controller hierarchy (`cpu`, `memory`, `pids`), on v2 one directory in the unified
//! hierarchy (with the controllers enabled in the `cgroup.subtree_control` of its ancestors).
//! The per-agent directory only groups the agent's instances; it never holds processes, which
//! v2 requires of a cgroup that hands controllers down.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{Limits, RuntimeError};

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The CFS period: quotas are CPU time per 100 ms.
pub const CFS_PERIOD_US: u64 = 100_000;

/// The v1 hierarchies an instance is placed in.
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Poll interval of the bounded waits here.
const POLL: Duration = Duration::from_millis(20);

/// Which cgroup version the host runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// Separate hierarchies under `<root>/<controller>`.
    V1,
    /// One unified hierarchy at the root.
    V2,
}

/// The cgroups of one agent's instances.
#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
    version: Version,
    agent: String,
}

impl Cgroups {
    /// Detects the version (a `cgroup.controllers` file at the root means a pure v2 host) and
    /// creates the per-agent directories (enabling the controllers on v2).
    pub fn new(root: &Path, agent: &str) -> Result<Cgroups, RuntimeError> {
        let version = if root.join("cgroup.controllers").is_file() {
            Version::V2
        } else {
            Version::V1
        };
        let cg = Cgroups {
            root: root.to_owned(),
            version,
            agent: agent.to_owned(),
        };
        match cg.version {
            Version::V1 => {
                for c in V1_CONTROLLERS {
                    let hierarchy = root.join(c);
                    if !hierarchy.join("cgroup.procs").is_file() {
                        return Err(RuntimeError::CgroupUnavailable(format!(
                            "cgroup v1 controller {c:?} is not mounted at {}",
                            hierarchy.display()
                        )));
                    }
                    mkdir(&hierarchy.join(agent))?;
                }
            }
            Version::V2 => {
                enable_controllers(root)?;
                mkdir(&root.join(agent))?;
                enable_controllers(&root.join(agent))?;
            }
        }
        Ok(cg)
    }

    /// The detected version.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// The instance's directories: one per v1 controller, or the single v2 one.
    pub fn dirs(&self, instance_id: &str) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| self.root.join(c).join(&self.agent).join(instance_id))
                .collect(),
            Version::V2 => vec![self.root.join(&self.agent).join(instance_id)],
        }
    }

    /// The instance's directory holding `file` (e.g. `memory.limit_in_bytes`): the one of the
    /// file's controller on v1.
    pub fn file(&self, instance_id: &str, file: &str) -> PathBuf {
        match self.version {
            Version::V1 => {
                let controller = file.split('.').next().unwrap_or_default();
                self.root
                    .join(controller)
                    .join(&self.agent)
                    .join(instance_id)
                    .join(file)
            }
            Version::V2 => self.root.join(&self.agent).join(instance_id).join(file),
        }
    }

    /// The `cgroup.procs` files a process must write its pid to, to be placed in the instance.
    pub fn procs_files(&self, instance_id: &str) -> Vec<PathBuf> {
        self.dirs(instance_id)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Creates the instance's directories and writes its limits. Fails (leaving whatever was
    /// created, for [`Cgroups::remove`]) if any write fails: an instance never runs unlimited.
    pub fn create(&self, instance_id: &str, limits: &Limits) -> Result<(), RuntimeError> {
        for dir in self.dirs(instance_id) {
            mkdir(&dir)?;
        }
        for (file, value, required) in limit_files(&self.version, limits) {
            let path = self.file(instance_id, file);
            if !required && !path.exists() {
                continue;
            }
            fs::write(&path, &value).map_err(|source| RuntimeError::Cgroup {
                what: format!("writing {value:?} to"),
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether any of the instance's directories exists.
    pub fn exists(&self, instance_id: &str) -> bool {
        self.dirs(instance_id).iter().any(|d| d.exists())
    }

    /// The pids in the instance's cgroups (union over the v1 hierarchies), sorted.
    pub fn pids(&self, instance_id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files(instance_id)
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|s| parse_pids(&s))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything in the instance's cgroups until they are empty (`cgroup.kill` on
    /// v2 when the kernel has it; on v1 each listed pid, again and again, since a process may
    /// fork between the read and the kill). Bounded by `timeout`: returns the pids still
    /// there then (empty on success).
    pub async fn kill_all(&self, instance_id: &str, timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        let kill_file = self.file(instance_id, "cgroup.kill");
        loop {
            let pids = self.pids(instance_id);
            if pids.is_empty() || Instant::now() >= deadline {
                return pids;
            }
            if self.version == Version::V2 && kill_file.exists() {
                if let Err(e) = fs::write(&kill_file, "1") {
                    tracing::warn!(path = %kill_file.display(), error = %e, "runtime: cgroup.kill");
                }
            } else {
                for pid in pids {
                    // ESRCH: it exited meanwhile, which is the goal.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Removes the instance's directories (after [`Cgroups::kill_all`]): `rmdir` fails with
    /// EBUSY while exiting tasks are still attached, so it is retried until `timeout`.
    /// Returns whether any directory existed.
    pub async fn remove(&self, instance_id: &str, timeout: Duration) -> Result<bool, RuntimeError> {
        let deadline = Instant::now() + timeout;
        let mut existed = false;
        for dir in self.dirs(instance_id) {
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => {
                        existed = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if Instant::now() < deadline
                            && e.raw_os_error() == Some(Errno::EBUSY as i32) =>
                    {
                        existed = true;
                        tokio::time::sleep(POLL).await;
                    }
                    Err(source) => {
                        return Err(RuntimeError::Cgroup {
                            what: "removing".into(),
                            path: dir,
                            source,
                        });
                    }
                }
            }
        }
        Ok(existed)
    }
}

/// The files that set `limits`, with their contents and whether the file must exist (the
/// swap limits are written only where the kernel has swap accounting).
///
/// v1: `cpu.cfs_period_us` 100000 then `cpu.cfs_quota_us` = `cpu_millis` × 100 (a quota of
/// `cpu_millis`/1000 CPUs per period); `memory.limit_in_bytes`, then
/// `memory.memsw.limit_in_bytes` the same (memory + swap, so the limit cannot be dodged by
/// swapping; it must be set after the memory limit, which it may not undercut); `pids.max`.
/// v2: `cpu.max` = `"<quota> 100000"`, `memory.max`, `memory.swap.max` 0, `pids.max`.
pub fn limit_files(version: &Version, limits: &Limits) -> Vec<(&'static str, String, bool)> {
    let quota = u64::from(limits.cpu_millis) * (CFS_PERIOD_US / 1000);
    let mem = limits.memory_bytes.to_string();
    let pids = limits.pids.to_string();
    match version {
        Version::V1 => vec![
            ("cpu.cfs_period_us", CFS_PERIOD_US.to_string(), true),
            ("cpu.cfs_quota_us", quota.to_string(), true),
            ("memory.limit_in_bytes", mem.clone(), true),
            ("memory.memsw.limit_in_bytes", mem, false),
            ("pids.max", pids, true),
        ],
        Version::V2 => vec![
            ("cpu.max", format!("{quota} {CFS_PERIOD_US}"), true),
            ("memory.max", mem, true),
            ("memory.swap.max", "0".to_owned(), false),
            ("pids.max", pids, true),
        ],
    }
}

/// The pids listed in a `cgroup.procs` file (one per line).
pub fn parse_pids(contents: &str) -> Vec<i32> {
    contents
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `mkdir`, fine if it exists.
fn mkdir(dir: &Path) -> Result<(), RuntimeError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(RuntimeError::Cgroup {
            what: "creating".into(),
            path: dir.to_owned(),
            source,
        }),
    }
}

/// v2: lets the children of `dir` use the cpu, memory and pids controllers.
fn enable_controllers(dir: &Path) -> Result<(), RuntimeError> {
    let path = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&path).unwrap_or_default();
    let missing: Vec<String> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|c| !current.split_whitespace().any(|have| have == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    fs::write(&path, &value).map_err(|source| RuntimeError::Cgroup {
        what: format!("writing {value:?} to"),
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        cpu_millis: 1500,
        memory_bytes: 512 << 20,
        pids: 4096,
    };

    #[test]
    fn v1_files() {
        let files = limit_files(&Version::V1, &LIMITS);
        let get = |name| files.iter().find(|f| f.0 == name).unwrap().1.clone();
        assert_eq!(get("cpu.cfs_period_us"), "100000");
        assert_eq!(get("cpu.cfs_quota_us"), "150000");
        assert_eq!(get("memory.limit_in_bytes"), "536870912");
        assert_eq!(get("pids.max"), "4096");
        // The period precedes the quota, the memory limit its memsw counterpart.
        let pos = |name| files.iter().position(|f| f.0 == name).unwrap();
        assert!(pos("cpu.cfs_period_us") < pos("cpu.cfs_quota_us"));
        assert!(pos("memory.limit_in_bytes") < pos("memory.memsw.limit_in_bytes"));
        assert!(!files[pos("memory.memsw.limit_in_bytes")].2);
    }

    #[test]
    fn v2_files() {
        let files = limit_files(&Version::V2, &LIMITS);
        assert_eq!(
            files,
            vec![
                ("cpu.max", "150000 100000".to_owned(), true),
                ("memory.max", "536870912".to_owned(), true),
                ("memory.swap.max", "0".to_owned(), false),
                ("pids.max", "4096".to_owned(), true),
            ]
        );
    }

    #[test]
    fn paths() {
        let v1 = Cgroups {
            root: "/cg".into(),
            version: Version::V1,
            agent: "vpc-host-1".into(),
        };
        assert_eq!(
            v1.file("i-1", "memory.limit_in_bytes"),
            Path::new("/cg/memory/vpc-host-1/i-1/memory.limit_in_bytes")
        );
        assert_eq!(
            v1.procs_files("i-1"),
            ["cpu", "memory", "pids"]
                .map(|c| PathBuf::from(format!("/cg/{c}/vpc-host-1/i-1/cgroup.procs")))
                .to_vec()
        );
        let v2 = Cgroups {
            version: Version::V2,
            ..v1
        };
        assert_eq!(
            v2.file("i-1", "memory.max"),
            Path::new("/cg/vpc-host-1/i-1/memory.max")
        );
        assert_eq!(v2.dirs("i-1"), vec![PathBuf::from("/cg/vpc-host-1/i-1")]);
    }

    #[test]
    fn parses_procs() {
        assert_eq!(parse_pids("12\n7\n\n"), vec![12, 7]);
        assert!(parse_pids("").is_empty());
    }
}
