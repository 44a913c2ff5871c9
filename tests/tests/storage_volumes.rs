//! Tier 3: the storage agent (`controlplane::storage`) against the kernel: sparse volume files,
//! loop devices, and exposure inside "fake instances" (a process in a private mount namespace
//! with its own tmpfs on /dev and /mnt). Needs root, loop devices, util-linux and e2fsprogs.
//!
//! Every test has its own directory (removed on drop, after releasing every loop device bound
//! to a file in it) and kills its fake instances on drop, also when it fails.

use std::{
    fs,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use controlplane::storage::{LoopDevice, Storage, StorageError};
use vpc_tests::netns::unique_name;

const VOL_A: &str = "vol-0a1b2c3d4e5f6071";
const VOL_B: &str = "vol-0b1b2c3d4e5f6072";
const VOL_C: &str = "vol-0c1b2c3d4e5f6073";
const SNAP: &str = "snap-0a1b2c3d4e5f6071";

/// A test's directory (`volumes/`, `snapshots/`) and a [`Storage`] on it.
struct Env {
    root: PathBuf,
    storage: Storage,
}

impl Env {
    fn new(tag: &str) -> Env {
        let root = Path::new("/var/tmp").join(unique_name(tag));
        fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let storage = Storage::new(root.join("volumes"), root.join("snapshots")).unwrap();
        Env { root, storage }
    }

    /// A new `Storage` on the same directories: what the agent has after a restart.
    fn restarted(&self) -> Storage {
        Storage::new(self.root.join("volumes"), self.root.join("snapshots")).unwrap()
    }

    fn volume_file(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.img"))
    }
}

/// The loop devices bound to files under `dir`, as (/dev/loopN, backing file).
fn loops_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file"))
            && backing.starts_with(dir.to_str().unwrap())
        {
            out.push((Path::new("/dev").join(&name), backing.trim().to_owned()));
        }
    }
    out
}

impl Drop for Env {
    fn drop(&mut self) {
        // Instances are dropped before (declared after): mounts are gone. Retry briefly in case
        // a lazily unmounted filesystem is still being released.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = loops_under(&self.root);
            for (dev, _) in &left {
                let _ = Command::new("losetup").arg("-d").arg(dev).output();
            }
            if loops_under(&self.root).is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!("storage test: loop devices left: {left:?}");
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("storage test: removing {}: {e}", self.root.display());
        }
    }
}

/// A fake instance: `sleep` in its own mount namespace (private propagation) with fresh tmpfs
/// on /dev (with a null device) and /mnt, so nothing made in it shows on the host. Killed on
/// drop.
struct Instance {
    child: Child,
}

impl Instance {
    fn new() -> Instance {
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3 && mount -t tmpfs tmpfs /mnt \
                 && exec sleep 300")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning unshare");
        let inst = Instance { child };
        // Ready once `sleep` runs (after both mounts).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = fs::read_to_string(format!("/proc/{}/comm", inst.pid())).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            assert!(Instant::now() < deadline, "fake instance did not start");
            thread::sleep(Duration::from_millis(10));
        }
        inst
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// `sh -c script` inside the instance's mount namespace, at most 20 s.
    fn sh(&self, script: &str) -> Output {
        Command::new("timeout")
            .args([
                "20",
                "nsenter",
                "--target",
                &self.pid().to_string(),
                "--mount",
                "--",
            ])
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` in instance: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn mountinfo(&self) -> String {
        fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).unwrap()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether mountinfo text has `dev` mounted at `path` as ext4.
fn mounted(mountinfo: &str, dev: &LoopDevice, path: &str) -> bool {
    let d = format!("{}:{}", dev.major, dev.minor);
    mountinfo.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f[2] == d && f[4] == path && l.contains(" - ext4 ")
    })
}

/// Whether `dev` is mounted anywhere in mountinfo text.
fn mounted_anywhere(mountinfo: &str, dev: &LoopDevice) -> bool {
    let d = format!("{}:{}", dev.major, dev.minor);
    mountinfo
        .lines()
        .any(|l| l.split(' ').nth(2) == Some(d.as_str()))
}

fn blkid(dev: &LoopDevice, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(&dev.path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Detaches, retrying a moment while a lazily unmounted filesystem lets go of the device.
async fn detach_soon(storage: &Storage, id: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match storage.detach(id).await {
            Err(StorageError::Busy { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_sparse_idempotent_and_adopted() {
    let env = Env::new("stvol");
    let s = &env.storage;
    assert!(s.ensure_volume(VOL_A, 4, None).await.unwrap());
    assert!(!s.ensure_volume(VOL_A, 4, None).await.unwrap());
    let file = env.volume_file(VOL_A);
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), 4 << 30);
    assert_eq!(meta.blocks(), 0, "a new volume allocates nothing");
    assert_eq!(s.volumes().unwrap(), vec![VOL_A.to_owned()]);
    assert!(
        fs::read_dir(env.root.join("volumes"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")),
        "no temporary file is left"
    );

    // Attach is idempotent, and a restarted agent adopts the device.
    let dev = s.attach(VOL_A).await.unwrap();
    assert!(dev.path.to_string_lossy().starts_with("/dev/loop"));
    assert_eq!(dev.major, 7);
    assert!(
        fs::metadata(&dev.path)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    assert_eq!(s.attach(VOL_A).await.unwrap(), dev);
    let restarted = env.restarted();
    assert_eq!(restarted.attach(VOL_A).await.unwrap(), dev);
    assert_eq!(restarted.attached(VOL_A).await.unwrap(), Some(dev.clone()));
    assert_eq!(loops_under(&env.root).len(), 1);
    let backing = fs::read_to_string(format!(
        "/sys/block/{}/loop/backing_file",
        dev.path.file_name().unwrap().to_string_lossy()
    ))
    .unwrap();
    assert_eq!(backing.trim(), file.to_str().unwrap());

    assert!(restarted.detach(VOL_A).await.unwrap());
    assert!(!s.detach(VOL_A).await.unwrap());
    assert!(loops_under(&env.root).is_empty());
    assert_eq!(s.attached(VOL_A).await.unwrap(), None);

    // Delete releases the device and removes the file.
    s.attach(VOL_A).await.unwrap();
    assert!(s.delete_volume(VOL_A).await.unwrap());
    assert!(!file.exists());
    assert!(loops_under(&env.root).is_empty());
    assert!(!s.delete_volume(VOL_A).await.unwrap());
    assert!(s.volumes().unwrap().is_empty());

    // Errors.
    assert!(matches!(
        s.attach(VOL_A).await,
        Err(StorageError::VolumeNotFound { .. })
    ));
    for bad in ["vol-XYZ", "vol-../../etc/passwd", "snap-0a1b2c3d", ""] {
        assert!(matches!(
            s.ensure_volume(bad, 1, None).await,
            Err(StorageError::Invalid(_))
        ));
        assert!(matches!(s.attach(bad).await, Err(StorageError::Invalid(_))));
    }
    assert!(matches!(
        s.ensure_volume(VOL_A, 0, None).await,
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        s.ensure_volume(VOL_A, 1, Some(SNAP)).await,
        Err(StorageError::SnapshotNotFound { .. })
    ));
    assert!(!env.volume_file(VOL_A).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn expose_mounts_inside_the_instance_only_and_data_follows_the_volume() {
    let env = Env::new("stexp");
    let s = &env.storage;
    s.ensure_volume(VOL_A, 1, None).await.unwrap();
    let dev = s.attach(VOL_A).await.unwrap();
    let first = Instance::new();
    let data = Path::new("/mnt/data");

    assert!(matches!(
        s.expose(VOL_B, first.pid(), "xvdf", None).await,
        Err(StorageError::Invalid(_) | StorageError::NotAttached { .. })
    ));
    assert!(matches!(
        s.expose(VOL_A, first.pid(), "xvd/f", Some(data)).await,
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        s.expose(VOL_A, first.pid(), "xvdf", Some(Path::new("/mnt/../etc")))
            .await,
        Err(StorageError::Invalid(_))
    ));

    assert!(
        s.expose(VOL_A, first.pid(), "xvdf", Some(data))
            .await
            .unwrap()
    );
    assert!(
        !s.expose(VOL_A, first.pid(), "xvdf", Some(data))
            .await
            .unwrap()
    );
    assert!(
        !env.restarted()
            .expose(VOL_A, first.pid(), "xvdf", Some(data))
            .await
            .unwrap()
    );

    // The node is a block device with the loop device's numbers, inside the instance only.
    let stat = first.sh_ok("stat -c '%F %t:%T' /dev/xvdf");
    assert_eq!(
        stat.trim(),
        format!("block special file {:x}:{:x}", dev.major, dev.minor)
    );
    assert!(
        !Path::new("/dev/xvdf").exists(),
        "the node shows on the host"
    );
    assert!(mounted(&first.mountinfo(), &dev, "/mnt/data"));
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounted_anywhere(&host, &dev),
        "the mount shows on the host"
    );
    assert_eq!(blkid(&dev, "TYPE"), "ext4");
    let uuid = blkid(&dev, "UUID");

    first.sh_ok("echo hello-from-first > /mnt/data/greeting && sync -f /mnt/data/greeting");

    // A busy mount (a process's cwd in it for 3 s) is still unexposed, lazily; the device is
    // busy until that process goes.
    first.sh_ok("cd /mnt/data && sleep 3 >/dev/null 2>&1 &");
    assert!(s.unexpose(first.pid(), "xvdf", Some(data)).await.unwrap());
    assert!(!s.unexpose(first.pid(), "xvdf", Some(data)).await.unwrap());
    assert!(!mounted_anywhere(&first.mountinfo(), &dev));
    assert!(!first.sh("test -e /dev/xvdf").status.success());
    assert!(matches!(
        s.detach(VOL_A).await,
        Err(StorageError::Busy { .. })
    ));
    assert!(detach_soon(s, VOL_A).await);
    assert!(loops_under(&env.root).is_empty());

    // Re-attach (maybe another loop device) and expose into another instance, elsewhere.
    let second = Instance::new();
    let dev2 = env.restarted().attach(VOL_A).await.unwrap();
    let path2 = Path::new("/mnt/vol/b");
    assert!(
        s.expose(VOL_A, second.pid(), "sdf", Some(path2))
            .await
            .unwrap()
    );
    assert_eq!(blkid(&dev2, "UUID"), uuid, "the filesystem was not remade");
    assert_eq!(
        second.sh_ok("cat /mnt/vol/b/greeting").trim(),
        "hello-from-first"
    );
    assert!(!mounted_anywhere(&first.mountinfo(), &dev2));

    // An instance gone: unexpose has nothing left to do.
    drop(first);
    assert!(!s.unexpose(i32::MAX - 1, "xvdf", Some(data)).await.unwrap());

    // A node without a mount path; then the mount is kept busy and detach refuses.
    assert!(s.expose(VOL_A, second.pid(), "xvdg", None).await.unwrap());
    assert!(!s.expose(VOL_A, second.pid(), "xvdg", None).await.unwrap());
    assert!(matches!(
        s.detach(VOL_A).await,
        Err(StorageError::Busy { .. })
    ));
    assert!(matches!(
        s.delete_volume(VOL_A).await,
        Err(StorageError::Busy { .. })
    ));
    assert!(env.volume_file(VOL_A).exists());
    assert!(s.unexpose(second.pid(), "xvdg", None).await.unwrap());
    assert!(s.unexpose(second.pid(), "sdf", Some(path2)).await.unwrap());
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match s.delete_volume(VOL_A).await {
            Err(StorageError::Busy { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => {
                assert!(other.unwrap());
                break;
            }
        }
    }
    assert!(loops_under(&env.root).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn expose_never_reformats_and_leaves_foreign_things_alone() {
    let env = Env::new("stfmt");
    let s = &env.storage;
    s.ensure_volume(VOL_A, 1, None).await.unwrap();
    let dev = s.attach(VOL_A).await.unwrap();
    // Something that is not ext4: a swap signature.
    let out = Command::new("mkswap").arg(&dev.path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inst = Instance::new();
    let data = Path::new("/mnt/data");
    let err = s
        .expose(VOL_A, inst.pid(), "xvdf", Some(data))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::UnexpectedContent { .. }),
        "{err}"
    );
    assert_eq!(blkid(&dev, "TYPE"), "swap");
    assert!(!mounted_anywhere(&inst.mountinfo(), &dev));

    // An ext4 made elsewhere is mounted as it is.
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "mine"])
        .arg(&dev.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uuid = blkid(&dev, "UUID");
    assert!(
        s.expose(VOL_A, inst.pid(), "xvdf", Some(data))
            .await
            .unwrap()
    );
    assert_eq!(blkid(&dev, "UUID"), uuid);
    assert_eq!(blkid(&dev, "LABEL"), "mine");

    // A foreign node or mount is not replaced.
    inst.sh_ok("mkdir -p /mnt/other && mount -t tmpfs tmpfs /mnt/other && echo x > /dev/sdz");
    assert!(matches!(
        s.expose(VOL_A, inst.pid(), "sdz", None).await,
        Err(StorageError::NodeConflict { .. })
    ));
    assert!(matches!(
        s.expose(VOL_A, inst.pid(), "xvdf", Some(Path::new("/mnt/other")))
            .await,
        Err(StorageError::MountPathBusy { .. })
    ));
    assert!(
        !s.unexpose(inst.pid(), "sdz", Some(Path::new("/mnt/other")))
            .await
            .unwrap()
    );
    assert_eq!(inst.sh_ok("cat /dev/sdz").trim(), "x");

    // A stale node of the same name (another loop device) is replaced.
    inst.sh_ok("rm /dev/xvdf && mknod /dev/xvdf b 7 999999");
    assert!(
        s.expose(VOL_A, inst.pid(), "xvdf", Some(data))
            .await
            .unwrap()
    );
    let stat = inst.sh_ok("stat -c '%t:%T' /dev/xvdf");
    assert_eq!(stat.trim(), format!("{:x}:{:x}", dev.major, dev.minor));
    assert!(s.unexpose(inst.pid(), "xvdf", Some(data)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_of_mounted_volumes_restore_the_data() {
    let env = Env::new("stsnap");
    let s = &env.storage;
    s.ensure_volume(VOL_A, 2, None).await.unwrap();
    s.attach(VOL_A).await.unwrap();
    let inst = Instance::new();
    let data = Path::new("/mnt/data");
    s.expose(VOL_A, inst.pid(), "xvdf", Some(data))
        .await
        .unwrap();
    // Written but not synced: the snapshot's freeze flushes it.
    inst.sh_ok("head -c 3000000 /proc/self/exe > /mnt/data/blob && echo snap-me > /mnt/data/note");
    let sum = inst.sh_ok("md5sum < /mnt/data/blob");

    assert!(s.ensure_snapshot(VOL_A, SNAP).await.unwrap());
    assert!(!s.ensure_snapshot(VOL_A, SNAP).await.unwrap());
    assert_eq!(s.snapshots().unwrap(), vec![SNAP.to_owned()]);
    // Thawed: the instance can still write.
    inst.sh_ok("echo after > /mnt/data/after && sync -f /mnt/data/after");
    let snap_file = env.root.join("snapshots").join(format!("{SNAP}.img"));
    let snap_meta = fs::metadata(&snap_file).unwrap();
    assert_eq!(snap_meta.len(), 2 << 30);
    assert!(
        allocated_bytes(&snap_file) < 256 << 20,
        "the snapshot is sparse ({} bytes allocated)",
        allocated_bytes(&snap_file)
    );

    // A bigger volume from the snapshot has the data (and not what came later).
    assert!(s.ensure_volume(VOL_B, 3, Some(SNAP)).await.unwrap());
    assert!(!s.ensure_volume(VOL_B, 3, Some(SNAP)).await.unwrap());
    assert_eq!(fs::metadata(env.volume_file(VOL_B)).unwrap().len(), 3 << 30);
    s.attach(VOL_B).await.unwrap();
    let other = Instance::new();
    assert!(
        s.expose(VOL_B, other.pid(), "xvdg", Some(data))
            .await
            .unwrap()
    );
    assert_eq!(other.sh_ok("cat /mnt/data/note").trim(), "snap-me");
    assert_eq!(other.sh_ok("md5sum < /mnt/data/blob"), sum);
    assert!(!other.sh("test -e /mnt/data/after").status.success());

    assert!(matches!(
        s.ensure_volume(VOL_C, 1, Some(SNAP)).await,
        Err(StorageError::SnapshotTooLarge { .. })
    ));
    assert!(matches!(
        s.ensure_snapshot(VOL_C, "snap-0c0c0c0c").await,
        Err(StorageError::VolumeNotFound { .. })
    ));
    assert!(s.delete_snapshot(SNAP).await.unwrap());
    assert!(!s.delete_snapshot(SNAP).await.unwrap());
    assert!(s.snapshots().unwrap().is_empty());
    // The volume made from it is independent.
    assert_eq!(other.sh_ok("cat /mnt/data/note").trim(), "snap-me");
}

/// Prints how long exposing a fresh sparse volume takes (blkid + mkfs.ext4 + mount) and how
/// much of its file mkfs allocates.
#[tokio::test(flavor = "multi_thread")]
async fn mkfs_timing() {
    let env = Env::new("stmkfs");
    let s = &env.storage;
    let inst = Instance::new();
    for (id, gib, device) in [
        (VOL_A, 1, "xvdf"),
        (VOL_B, 100, "xvdg"),
        (VOL_C, 16383, "xvdh"),
    ] {
        s.ensure_volume(id, gib, None).await.unwrap();
        s.attach(id).await.unwrap();
        let path = PathBuf::from(format!("/mnt/{device}"));
        let started = Instant::now();
        assert!(s.expose(id, inst.pid(), device, Some(&path)).await.unwrap());
        let elapsed = started.elapsed();
        eprintln!(
            "expose (blkid + mkfs.ext4 + mount) of a fresh {gib} GiB volume: {elapsed:?}, \
             {} KiB allocated",
            allocated_bytes(&env.volume_file(id)) / 1024
        );
        assert!(elapsed < Duration::from_secs(120));
        assert!(s.unexpose(inst.pid(), device, Some(&path)).await.unwrap());
    }
}
