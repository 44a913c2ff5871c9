//! Tier 3: the instance runtime (`controlplane::compute::runtime`) against the kernel: real
//! namespaces, cgroups and overlay roots, started through the `vpc-instance-init` binary
//! (`cargo build -p controlplane --bin vpc-instance-init`; `VPC_INSTANCE_INIT_BIN` overrides
//! its path). Every test has its own network namespace, state dir and cgroup name, removed on
//! drop also when it fails. Needs root.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use controlplane::compute::runtime::{InstanceSpec, InstanceStatus, Limits, Runtime, RuntimeError};
use controlplane::compute::types;
use vpc_tests::netns::{NetNs, unique_name};

const ID: &str = "i-0a1b2c3d4e5f60718";
const HOSTNAME: &str = "ip-10-0-1-4";
const GRACE: Duration = Duration::from_secs(2);
/// Bound of every wait for something the instance does.
const WAIT: Duration = Duration::from_secs(10);

fn init_bin() -> PathBuf {
    std::env::var_os("VPC_INSTANCE_INIT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vpc-instance-init"),
        PathBuf::from,
    )
}

/// One agent's runtime with its own network namespace for the instance, state dir and cgroup
/// name.
struct Fixture {
    ns: NetNs,
    state_dir: PathBuf,
    cgroup_name: String,
    rt: Runtime,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let bin = init_bin();
        assert!(
            bin.is_file(),
            "{} missing: cargo build -p controlplane --bin vpc-instance-init",
            bin.display()
        );
        let ns = NetNs::new(tag).unwrap();
        // An interface only this namespace has, to recognise it from inside the instance.
        ns.ip(&[
            "link", "add", "vtveth7", "type", "veth", "peer", "name", "vtveth8",
        ])
        .unwrap();
        ns.link_up("vtveth7").unwrap();
        let state_dir = std::env::temp_dir().join(unique_name(tag));
        let cgroup_name = unique_name(&format!("{tag}cg"));
        let rt = Runtime::new(state_dir.clone(), &cgroup_name, bin).unwrap();
        Fixture {
            ns,
            state_dir,
            cgroup_name,
            rt,
        }
    }

    /// A second runtime on the same state and cgroups: the agent after a restart.
    fn restarted(&self) -> Runtime {
        Runtime::new(self.state_dir.clone(), &self.cgroup_name, init_bin()).unwrap()
    }

    fn spec(&self, command: &str) -> InstanceSpec {
        InstanceSpec {
            instance_id: ID.into(),
            netns_path: self.ns.path(),
            hostname: HOSTNAME.into(),
            limits: Limits::for_type(types::lookup("t3.nano").unwrap()),
            command: Some(command.into()),
            user_data: None,
        }
    }

    /// The v1 (or v2) cgroup directory of the instance for `controller`.
    fn cgroup_dir(&self, controller: &str) -> PathBuf {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            root.join(&self.cgroup_name).join(ID)
        } else {
            root.join(controller).join(&self.cgroup_name).join(ID)
        }
    }

    fn cgroup_dirs_exist(&self) -> bool {
        ["cpu", "memory", "pids"]
            .iter()
            .any(|c| self.cgroup_dir(c).exists())
    }

    fn console(&self) -> String {
        fs::read_to_string(self.rt.console_path(ID)).unwrap_or_default()
    }

    /// Waits (bounded) until the console contains `needle`; the console.
    fn wait_console(&self, needle: &str) -> String {
        let console = wait_for(|| Some(self.console()).filter(|c| c.contains(needle)));
        console.unwrap_or_else(|| panic!("{needle:?} not on the console:\n{}", self.console()))
    }

    /// A file inside the running instance, through its PID 1's root.
    fn instance_file(&self, path: &str) -> PathBuf {
        let pid = self.rt.ns_pid(ID).expect("instance not running");
        PathBuf::from(format!("/proc/{pid}/root{path}"))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = block_on(self.rt.destroy(ID, Duration::from_millis(100)));
        let _ = fs::remove_dir_all(&self.state_dir);
        let root = Path::new("/sys/fs/cgroup");
        let agent_dirs = if root.join("cgroup.controllers").exists() {
            vec![root.join(&self.cgroup_name)]
        } else {
            ["cpu", "memory", "pids"]
                .iter()
                .map(|c| root.join(c).join(&self.cgroup_name))
                .collect()
        };
        for d in agent_dirs {
            let _ = fs::remove_dir(&d);
        }
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Polls `f` until it returns `Some`, at most [`WAIT`].
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a process runs (a zombie does not).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn ns_inode(path: impl AsRef<Path>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().ino()
}

#[test]
fn start_runs_the_command_in_its_own_namespaces() {
    let fx = Fixture::new("rtns");
    let spec = fx.spec(
        "echo pid=$$; echo host=$(hostname); ip -o link; \
         echo procs=$(ls -d /proc/[0-9]* | wc -l); exec sleep 1000",
    );
    assert!(block_on(fx.rt.start(&spec)).unwrap());
    // Idempotent.
    assert!(!block_on(fx.rt.start(&spec)).unwrap());

    let pid = fx.rt.ns_pid(ID).unwrap();
    assert_eq!(fx.rt.status(ID), InstanceStatus::Running { pid });
    assert_eq!(fx.rt.list().unwrap(), vec![ID.to_owned()]);

    let console = fx.wait_console("procs=");
    // The shell is the first child of the instance's PID 1.
    let shell_pid: u32 = console
        .split("pid=")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid on the console:\n{console}"));
    assert!(shell_pid <= 3, "shell pid {shell_pid}:\n{console}");
    assert!(console.contains(&format!("host={HOSTNAME}")), "{console}");
    assert!(console.contains("vtveth7"), "{console}");
    // The overlay root (no warning on the console; a failed overlay fails the launch).
    assert!(!console.contains("WARNING"), "{console}");
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/") && l.contains(" - overlay ")),
        "{mounts}"
    );
    // Its /proc shows only its own processes (init, sh, ls, wc: a handful).
    let procs: u32 = console
        .split("procs=")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap();
    assert!(procs < 10, "{console}");

    // Namespaces: its own PID, mount and UTS; the given network namespace.
    for ns in ["pid", "mnt", "uts", "ipc"] {
        assert_ne!(
            ns_inode(format!("/proc/{pid}/ns/{ns}")),
            ns_inode(format!("/proc/self/ns/{ns}")),
            "{ns}"
        );
    }
    assert_eq!(
        ns_inode(format!("/proc/{pid}/ns/net")),
        ns_inode(fx.ns.path())
    );

    // Limits: t3.nano is 2 vCPUs and 512 MiB.
    let read = |c: &str, f: &str| {
        fs::read_to_string(fx.cgroup_dir(c).join(f))
            .unwrap()
            .trim()
            .to_owned()
    };
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert_eq!(read("memory", "memory.max"), (512u64 << 20).to_string());
        assert_eq!(read("cpu", "cpu.max"), "200000 100000");
    } else {
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (512u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
    }
    assert_eq!(read("pids", "pids.max"), types::PIDS_MAX.to_string());
    let in_cgroup = cgroup_pids(&fx.cgroup_dir("memory"));
    assert!(in_cgroup.contains(&pid), "{in_cgroup:?}");
    assert!(in_cgroup.len() >= 3, "shim, init, sleep: {in_cgroup:?}");

    // Stop: everything goes, the cgroups too.
    assert!(block_on(fx.rt.stop(ID, GRACE)).unwrap());
    for p in &in_cgroup {
        assert!(!alive(*p), "{p} survived the stop");
    }
    assert!(!fx.cgroup_dirs_exist());
    assert!(fx.ns.pids().unwrap().is_empty());
    let InstanceStatus::Stopped { exit: Some(exit) } = fx.rt.status(ID) else {
        panic!("{:?}", fx.rt.status(ID));
    };
    assert_eq!(exit, "exited 0", "init ends cleanly on SIGTERM");
    assert_eq!(fx.rt.ns_pid(ID), None);
    assert!(!block_on(fx.rt.stop(ID, GRACE)).unwrap());
    assert_eq!(fx.rt.list().unwrap(), vec![ID.to_owned()]);

    eprintln!("console:\n{}", fx.console());
    // Destroy: nothing left.
    assert!(block_on(fx.rt.destroy(ID, GRACE)).unwrap());
    assert_eq!(fx.rt.status(ID), InstanceStatus::Absent);
    assert!(fx.rt.list().unwrap().is_empty());
    assert!(!fx.state_dir.join(ID).exists());
    assert!(!fx.cgroup_dirs_exist());
    assert!(!block_on(fx.rt.destroy(ID, GRACE)).unwrap());
}

#[test]
fn user_data_runs_once_and_the_root_persists_privately() {
    let fx = Fixture::new("rtud");
    let marker = format!("/opt/{}", unique_name("rtfile"));
    let mut spec = fx.spec(&format!(
        "test -e {marker} && echo second-boot; echo persisted > {marker}; echo booted; \
         exec sleep 1000"
    ));
    spec.user_data = Some(b"#!/bin/sh\necho ran >> /root/ud-runs\necho user-data-done\n".to_vec());

    assert!(block_on(fx.rt.start(&spec)).unwrap());
    fx.wait_console("user-data-done");
    let runs = fx.instance_file("/root/ud-runs");
    assert_eq!(fs::read_to_string(&runs).unwrap(), "ran\n");
    let file = fx.instance_file(&marker);
    assert_eq!(
        wait_for(|| fs::read_to_string(&file).ok()).unwrap(),
        "persisted\n"
    );
    // The instance's writes are its own: not on the host's root.
    assert!(!Path::new(&marker).exists());
    assert!(
        !Path::new("/root/ud-runs").exists()
            || fs::read_to_string("/root/ud-runs").unwrap() != "ran\n"
    );

    assert!(block_on(fx.rt.stop(ID, GRACE)).unwrap());
    assert!(block_on(fx.rt.start(&spec)).unwrap());
    fx.wait_console("second-boot");
    // Give a (wrongly) rerun script time to show.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        fs::read_to_string(fx.instance_file("/root/ud-runs")).unwrap(),
        "ran\n"
    );
    assert_eq!(fx.console().matches("user-data-done").count(), 1);
    assert!(!Path::new(&marker).exists());
}

#[test]
fn a_restarted_agent_adopts_running_instances() {
    let fx = Fixture::new("rtad");
    assert!(block_on(fx.rt.start(&fx.spec("exec sleep 1000"))).unwrap());
    let pid = fx.rt.ns_pid(ID).unwrap();
    let in_cgroup = cgroup_pids(&fx.cgroup_dir("pids"));

    let rt2 = fx.restarted();
    assert_eq!(rt2.status(ID), InstanceStatus::Running { pid });
    assert_eq!(rt2.ns_pid(ID), Some(pid));
    assert_eq!(rt2.list().unwrap(), vec![ID.to_owned()]);
    assert!(!block_on(rt2.start(&fx.spec("exec sleep 1000"))).unwrap());
    assert!(block_on(rt2.stop(ID, GRACE)).unwrap());
    for p in &in_cgroup {
        assert!(!alive(*p), "{p} survived the stop");
    }
    assert!(matches!(fx.rt.status(ID), InstanceStatus::Stopped { .. }));
    assert!(!fx.cgroup_dirs_exist());
}

#[test]
fn stop_kills_what_ignores_sigterm() {
    let fx = Fixture::new("rtkl");
    let spec = fx.spec("trap '' TERM; sleep 1000 & sleep 1000 & wait; exec sleep 1000");
    assert!(block_on(fx.rt.start(&spec)).unwrap());
    let in_cgroup =
        wait_for(|| Some(cgroup_pids(&fx.cgroup_dir("memory"))).filter(|p| p.len() >= 5)).unwrap();
    let t = Instant::now();
    assert!(block_on(fx.rt.stop(ID, Duration::from_millis(300))).unwrap());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for p in &in_cgroup {
        assert!(!alive(*p), "{p} survived the stop");
    }
    assert!(!fx.cgroup_dirs_exist());
    assert_eq!(
        fx.rt.status(ID),
        InstanceStatus::Stopped {
            exit: Some("killed by SIGKILL".into())
        }
    );
}

#[test]
fn a_failed_start_leaves_nothing() {
    let fx = Fixture::new("rtfl");
    let err = block_on(
        fx.rt
            .start(&fx.spec("/nonexistent/vpc-no-such-command --flag")),
    )
    .unwrap_err();
    let RuntimeError::Launch { reason, .. } = &err else {
        panic!("{err:?}");
    };
    eprintln!("failed start: {err}");
    assert!(reason.contains("not found"), "{err}");
    assert!(!fx.cgroup_dirs_exist());
    assert!(
        wait_for(|| fx.ns.pids().unwrap().is_empty().then_some(())).is_some(),
        "processes left in the namespace"
    );
    assert_eq!(fx.rt.status(ID), InstanceStatus::Absent);
    assert!(fx.rt.list().unwrap().is_empty());

    // A missing network namespace.
    let mut spec = fx.spec("sleep 1");
    spec.netns_path = PathBuf::from("/run/netns/vt-no-such-namespace");
    assert!(matches!(
        block_on(fx.rt.start(&spec)),
        Err(RuntimeError::NetnsMissing { .. })
    ));
    assert!(!fx.cgroup_dirs_exist());
    assert_eq!(fx.rt.status(ID), InstanceStatus::Absent);

    // A start after a failed start works, and a later failure keeps the earlier state.
    assert!(block_on(fx.rt.start(&fx.spec("exec sleep 1000"))).unwrap());
    assert!(block_on(fx.rt.stop(ID, GRACE)).unwrap());
    let err = block_on(fx.rt.start(&fx.spec("nope-vpc-cmd"))).unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    assert!(matches!(fx.rt.status(ID), InstanceStatus::Stopped { .. }));
    assert!(!fx.cgroup_dirs_exist());
}
