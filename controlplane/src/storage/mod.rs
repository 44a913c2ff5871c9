//! The storage agent: EBS-like volumes as sparse files, attached through loop devices and
//! exposed inside instances as a block device node and, optionally, a mounted ext4 filesystem.
//!
//! ```text
//!  volumes_dir/vol-<hex>.img      sparse file, size_gib GiB        (this host's volumes)
//!  snapshots_dir/snap-<hex>.img   sparse point-in-time copy        (the snapshot store)
//!  /dev/loopN                     bound to the volume's file       (attach)
//!  instance's mount namespace:    /dev/<device>  b 7:N             (expose)
//!                                 <mount_path>   ext4 on it        (expose with a path)
//! ```
//!
//! The host agent calls the `ensure_*`, [`Storage::attach`] and [`Storage::expose`] for what
//! should exist and the removal functions for what should not, on every reconcile pass. All
//! are idempotent and level-triggered: each looks first and changes only what differs.
//!
//! # No state of its own
//!
//! Everything is derived from what the kernel and the filesystem show: a volume exists if its
//! file does; its loop device is the one whose `/sys/block/loopN/loop/backing_file` is that
//! file (a new [`Storage`], e.g. after an agent restart, adopts it); an exposure is the
//! instance's `/dev/<device>` node (looked at through `/proc/<pid>/root`) and its mount at the
//! path (`/proc/<pid>/mountinfo`). Loop devices, nodes and mounts outlive the agent. Files are
//! made under a temporary name (`.<id>.img.tmp`) and renamed into place once complete and
//! durable, so a crash never leaves a partial volume or snapshot under its real name; the
//! next attempt overwrites the leftover, and deleting removes it.
//!
//! # Entering instances
//!
//! Changes inside an instance are made by a forked child that enters its mount namespace and
//! root and makes the system calls itself, without exec (see `nsexec`): a multithreaded
//! process cannot `setns` its mount namespace, and the instance's root need not contain
//! `mount`. Block devices are probed (`blkid`) and formatted (`mkfs.ext4`) from the host, on
//! the loop device.
//!
//! # Snapshots and consistency
//!
//! [`Storage::ensure_snapshot`] copies the volume's file (a reflink clone where the host's
//! filesystem can, else the data extents only). If the volume's filesystem is mounted in any
//! mount namespace (found by scanning `/proc/*/mountinfo` for the loop device), it is flushed
//! (`syncfs`) and frozen (`FIFREEZE`) for the copy and thawed right after (also on errors):
//! the snapshot is a filesystem-consistent point in time, and writers in the instance block
//! meanwhile. The freeze is bounded: a copy still running after [`FREEZE_LIMIT`] is abandoned
//! (thawed, [`StorageError::Timeout`]), which limits frozen snapshots of very large, dense
//! volumes on hosts without reflinks. If the agent is killed while a filesystem is frozen, it
//! stays frozen until someone runs `fsfreeze -u` on it. If the volume is attached but not
//! mounted, the loop device's buffers are flushed first; a process writing the raw device
//! meanwhile gets a crash-consistent copy at best. A detached volume is copied as is.
//!
//! # Concurrency
//!
//! Calls for one volume (and one instance device) must not overlap; calls for different ones
//! may. Loop device allocation is safe against other allocators (`losetup` included).
//! Snapshot ids are unique: two hosts must not make the same snapshot at once.

mod files;
mod loopdev;
mod names;
mod nsexec;
mod parse;

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use names::{GIB, ancestors_outermost_first, file_path, id_of_file_name, node_path, temp_path};
pub use names::{
    MAX_SIZE_GIB, validate_device, validate_mount_path, validate_size, validate_snapshot_id,
    validate_volume_id,
};
use nsexec::{NodeState, NsOp};
use parse::{Probe, mounts_at, parse_blkid};

/// The default snapshot store.
pub const DEFAULT_SNAPSHOTS_DIR: &str = "/var/lib/vpc/snapshots";

/// The longest a mounted filesystem stays frozen while its volume is copied.
pub const FREEZE_LIMIT: Duration = Duration::from_secs(60);

/// How long `blkid` may take.
const BLKID_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `mkfs.ext4` may take (16 TiB takes about 6 s with lazy init).
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);

/// A bound loop device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// Its block major (7).
    pub major: u32,
    /// Its block minor.
    pub minor: u32,
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An argument is invalid (id, size, device name, path); nothing was done.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The volume has no file on this host.
    #[error("volume {volume_id} does not exist")]
    VolumeNotFound {
        /// The volume.
        volume_id: String,
    },
    /// The snapshot is not in the store.
    #[error("snapshot {snapshot_id} does not exist")]
    SnapshotNotFound {
        /// The snapshot.
        snapshot_id: String,
    },
    /// A volume cannot be smaller than the snapshot it is made from.
    #[error("snapshot {snapshot_id} has {snapshot_bytes} bytes, more than {size_gib} GiB")]
    SnapshotTooLarge {
        /// The snapshot.
        snapshot_id: String,
        /// Its size.
        snapshot_bytes: u64,
        /// The volume size asked for.
        size_gib: u32,
    },
    /// The volume has no loop device (attach it first).
    #[error("volume {volume_id} is not attached")]
    NotAttached {
        /// The volume.
        volume_id: String,
    },
    /// The volume's loop device is in use (a filesystem on it is mounted, maybe lazily
    /// unmounted and still busy); unexpose it first, or retry once its users are gone.
    #[error("volume {volume_id}: {} is in use", device.display())]
    Busy {
        /// The volume.
        volume_id: String,
        /// Its loop device.
        device: PathBuf,
    },
    /// The instance's process is gone.
    #[error("instance process {pid} does not exist")]
    InstanceGone {
        /// The pid given.
        pid: i32,
    },
    /// The device node's path inside the instance holds something that is not a block device
    /// (or a block device of another driver); it was left alone.
    #[error("instance {pid}: {} exists and is not a loop block device", path.display())]
    NodeConflict {
        /// The instance's pid.
        pid: i32,
        /// The node's path inside the instance.
        path: PathBuf,
    },
    /// Something else is mounted at the mount path inside the instance; it was left alone.
    #[error("instance {pid}: {} has {fstype} from {}:{} mounted", path.display(), dev.0, dev.1)]
    MountPathBusy {
        /// The instance's pid.
        pid: i32,
        /// The mount path inside the instance.
        path: PathBuf,
        /// The device mounted there.
        dev: (u32, u32),
        /// Its filesystem type.
        fstype: String,
    },
    /// The volume holds something other than ext4 (another filesystem, a partition table):
    /// it is neither mounted nor reformatted.
    #[error("volume {volume_id} holds {found}, not ext4: not mounting, not reformatting")]
    UnexpectedContent {
        /// The volume.
        volume_id: String,
        /// What `blkid` found.
        found: String,
    },
    /// A system call inside the instance's mount namespace failed.
    #[error("instance {pid}: {what}: {source}")]
    InNamespace {
        /// The instance's pid.
        pid: i32,
        /// The operation.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// Something took longer than its bound.
    #[error("timed out: {what}")]
    Timeout {
        /// What.
        what: String,
    },
    /// Another system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError::Io { what, source }
}

/// Runs blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Io {
            what: "storage worker".into(),
            source: io::Error::other(e.to_string()),
        })?
}

/// Whether `path` exists (a dangling symlink counts; errors other than "not found" are
/// errors).
fn exists(path: &Path) -> Result<bool, StorageError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("stat {}", path.display()))(e)),
    }
}

/// Removes `path`; `Ok(false)` if it was not there.
fn remove(path: &Path) -> Result<bool, StorageError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

/// The ids of `prefix` (`vol-`, `snap-`) with a file in `dir`, sorted.
fn list(dir: &Path, prefix: &str) -> Result<Vec<String>, StorageError> {
    let what = || format!("listing {}", dir.display());
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(what()))? {
        let entry = entry.map_err(io_err(what()))?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| id_of_file_name(n, prefix))
        {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// Runs a command (bounded by `timeout`, killed if it overruns) and returns its exit code and
/// stdout; a failure to start, a signal or an overrun is an error.
async fn command(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<(i32, String, String), StorageError> {
    let line = || format!("{program} {}", args.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| StorageError::Timeout { what: line() })?
        .map_err(io_err(format!("running `{}`", line())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match out.status.code() {
        Some(code) => Ok((
            code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )),
        None => Err(StorageError::Command {
            command: line(),
            status: out.status.to_string(),
            stderr,
        }),
    }
}

/// Every (pid, mount point) where `dev` is mounted, one per mount namespace (scanning
/// `/proc/*/mountinfo`; processes that vanish meanwhile are skipped).
fn mounts_of(dev: (u32, u32)) -> Result<Vec<(i32, PathBuf)>, StorageError> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").map_err(io_err("listing /proc"))? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(ns) = fs::read_link(entry.path().join("ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(mounts) = nsexec::mountinfo(pid) else {
            continue;
        };
        found.extend(
            mounts
                .into_iter()
                .filter(|m| m.dev == dev)
                .map(|m| (pid, PathBuf::from(m.mount_point))),
        );
    }
    Ok(found)
}

/// Freezes the filesystem on `dev` if it is mounted anywhere; `None` if it is not (or is
/// frozen by someone else already).
fn freeze_if_mounted(dev: &LoopDevice) -> Result<Option<files::Frozen>, StorageError> {
    let numbers = (dev.major, dev.minor);
    for (pid, mount_point) in mounts_of(numbers)? {
        // The process or the mount may be gone by now: try the next.
        let Ok(Some(dir)) = nsexec::open_mounted_dir(pid, &mount_point, numbers) else {
            continue;
        };
        let what = format!(
            "{} (at {} in {pid})",
            dev.path.display(),
            mount_point.display()
        );
        return files::Frozen::freeze(dir, what);
    }
    Ok(None)
}

/// EBS-like volumes on this host and the snapshot store. Holds only its two directories.
#[derive(Clone, Debug)]
pub struct Storage {
    volumes_dir: PathBuf,
    snapshots_dir: PathBuf,
}

impl Storage {
    /// `volumes_dir` holds this host's volume files (e.g. `/var/lib/vpc/agent/<host>/volumes`),
    /// `snapshots_dir` the snapshot store (may be shared by all hosts; by default
    /// [`DEFAULT_SNAPSHOTS_DIR`]). Both are created if missing (mode 0700) and canonicalized:
    /// the loop devices' backing file paths are compared with the canonical paths.
    pub fn new(volumes_dir: PathBuf, snapshots_dir: PathBuf) -> Result<Storage, StorageError> {
        let prepare = |dir: PathBuf| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .and_then(|()| dir.canonicalize())
                .map_err(io_err(format!("preparing {}", dir.display())))
        };
        Ok(Storage {
            volumes_dir: prepare(volumes_dir)?,
            snapshots_dir: prepare(snapshots_dir)?,
        })
    }

    /// The volume's backing file (canonical), whether or not it exists.
    pub fn volume_path(&self, volume_id: &str) -> Result<PathBuf, StorageError> {
        validate_volume_id(volume_id)?;
        Ok(file_path(&self.volumes_dir, volume_id))
    }

    /// The snapshot's file in the store, whether or not it exists.
    pub fn snapshot_path(&self, snapshot_id: &str) -> Result<PathBuf, StorageError> {
        validate_snapshot_id(snapshot_id)?;
        Ok(file_path(&self.snapshots_dir, snapshot_id))
    }

    /// Creates the volume's file if missing: sparse, `size_gib` GiB, or a sparse copy of the
    /// snapshot when `from_snapshot` is given (extended to `size_gib` if that is larger; a
    /// snapshot larger than `size_gib` is [`StorageError::SnapshotTooLarge`]). Made under a
    /// temporary name and renamed. `Ok(true)` if created; an existing volume is left as it is
    /// (not resized).
    pub async fn ensure_volume(
        &self,
        volume_id: &str,
        size_gib: u32,
        from_snapshot: Option<&str>,
    ) -> Result<bool, StorageError> {
        let dest = self.volume_path(volume_id)?;
        validate_size(size_gib)?;
        let snapshot = from_snapshot.map(|s| self.snapshot_path(s)).transpose()?;
        if exists(&dest)? {
            return Ok(false);
        }
        let tmp = temp_path(&self.volumes_dir, volume_id);
        let len = u64::from(size_gib) * GIB;
        let snapshot_id = from_snapshot.unwrap_or_default().to_owned();
        blocking(move || {
            match snapshot {
                None => files::create_sparse(&tmp, &dest, len)?,
                Some(snap) => {
                    let snapshot_bytes = match fs::metadata(&snap) {
                        Ok(m) => m.len(),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            return Err(StorageError::SnapshotNotFound { snapshot_id });
                        }
                        Err(e) => return Err(io_err(format!("stat {}", snap.display()))(e)),
                    };
                    if snapshot_bytes > len {
                        return Err(StorageError::SnapshotTooLarge {
                            snapshot_id,
                            snapshot_bytes,
                            size_gib,
                        });
                    }
                    let file = files::copy_sparse(&snap, &tmp, len, None)?;
                    files::publish(file, &tmp, &dest)?;
                }
            }
            tracing::info!(file = %dest.display(), len, "storage: volume created");
            Ok(true)
        })
        .await
    }

    /// Releases the volume's loop devices (see [`Storage::detach`]; fails with
    /// [`StorageError::Busy`] while it is mounted) and deletes its file. `Ok(true)` if a
    /// device or the file existed.
    pub async fn delete_volume(&self, volume_id: &str) -> Result<bool, StorageError> {
        let file = self.volume_path(volume_id)?;
        let detached = self.detach(volume_id).await?;
        let removed = remove(&file)?;
        remove(&temp_path(&self.volumes_dir, volume_id))?;
        if removed {
            tracing::info!(file = %file.display(), "storage: volume deleted");
        }
        Ok(detached || removed)
    }

    /// Copies the volume into the snapshot store as `snapshot_id`, made under a temporary
    /// name and renamed; a mounted filesystem on it is frozen for the copy (see the module
    /// docs for the consistency given). `Ok(false)` if the snapshot already exists (whatever
    /// volume it came from).
    pub async fn ensure_snapshot(
        &self,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<bool, StorageError> {
        let src = self.volume_path(volume_id)?;
        let dest = self.snapshot_path(snapshot_id)?;
        if exists(&dest)? {
            return Ok(false);
        }
        if !exists(&src)? {
            return Err(StorageError::VolumeNotFound {
                volume_id: volume_id.to_owned(),
            });
        }
        let tmp = temp_path(&self.snapshots_dir, snapshot_id);
        blocking(move || {
            let started = Instant::now();
            let mut frozen = None;
            if let Some(dev) = loopdev::find_live(&src)? {
                frozen = freeze_if_mounted(&dev)?;
                if frozen.is_none() {
                    // Not mounted (or frozen by someone else): flush the device's buffers.
                    fs::File::open(&dev.path)
                        .and_then(|f| f.sync_all())
                        .map_err(io_err(format!("flushing {}", dev.path.display())))?;
                }
            }
            let deadline = frozen.as_ref().map(|_| started + FREEZE_LIMIT);
            let file = files::copy_sparse(&src, &tmp, 0, deadline);
            let was_frozen = frozen.is_some();
            drop(frozen); // thaw before the (possibly long) fsync of the copy
            let file = file?;
            files::publish(file, &tmp, &dest)?;
            tracing::info!(
                snapshot = %dest.display(),
                frozen = was_frozen,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "storage: snapshot created"
            );
            Ok(true)
        })
        .await
    }

    /// Deletes the snapshot from the store (and a leftover temporary file). `Ok(true)` if it
    /// existed. Volumes made from it are independent copies.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, StorageError> {
        let file = self.snapshot_path(snapshot_id)?;
        let removed = remove(&file)?;
        remove(&temp_path(&self.snapshots_dir, snapshot_id))?;
        Ok(removed)
    }

    /// The ids of the volumes with a file here, sorted.
    pub fn volumes(&self) -> Result<Vec<String>, StorageError> {
        list(&self.volumes_dir, "vol-")
    }

    /// The ids of the snapshots in the store, sorted.
    pub fn snapshots(&self) -> Result<Vec<String>, StorageError> {
        list(&self.snapshots_dir, "snap-")
    }

    /// The volume's loop device: the bound one whose backing file is the volume's file (also
    /// one bound by an earlier agent), else a newly bound one (read-write, buffered I/O, no
    /// autoclear; `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`, see `loopdev`). A device still
    /// bound to a deleted earlier file of the same name is not reused.
    pub async fn attach(&self, volume_id: &str) -> Result<LoopDevice, StorageError> {
        let file = self.volume_path(volume_id)?;
        let volume_id = volume_id.to_owned();
        blocking(move || {
            if let Some(dev) = loopdev::find_live(&file)? {
                return Ok(dev);
            }
            if !exists(&file)? {
                return Err(StorageError::VolumeNotFound { volume_id });
            }
            let dev = loopdev::attach_file(&file)?;
            tracing::info!(volume = %volume_id, device = %dev.path.display(), "storage: attached");
            Ok(dev)
        })
        .await
    }

    /// The volume's loop device, if it is attached (read-only look).
    pub async fn attached(&self, volume_id: &str) -> Result<Option<LoopDevice>, StorageError> {
        let file = self.volume_path(volume_id)?;
        blocking(move || loopdev::find_live(&file)).await
    }

    /// Releases the volume's loop devices (also any still bound to a deleted earlier file of
    /// the same name). `Ok(true)` if one was released. Fails with [`StorageError::Busy`],
    /// releasing nothing more, if a filesystem on one is mounted anywhere (unexpose first; a
    /// lazily unmounted filesystem holds the device until its last user goes). A device only
    /// held open (not mounted) is released when its last opener closes it.
    pub async fn detach(&self, volume_id: &str) -> Result<bool, StorageError> {
        let file = self.volume_path(volume_id)?;
        let volume_id = volume_id.to_owned();
        blocking(move || {
            let mut released = false;
            for (dev, _) in loopdev::bound_to(&file)? {
                loopdev::release(&dev, &volume_id)?;
                tracing::info!(volume = %volume_id, device = %dev.path.display(), "storage: detached");
                released = true;
            }
            Ok(released)
        })
        .await
    }

    /// Makes the attached volume appear inside the mount namespace (and root) of host pid
    /// `ns_pid`, a process of the instance: a block device node `/dev/<device>` with the loop
    /// device's numbers (a stale loop node of that name, e.g. from before a re-attach, is
    /// replaced; anything else there is [`StorageError::NodeConflict`]) and, with a
    /// `mount_path`, the ext4 filesystem on it mounted there (directories created as needed).
    ///
    /// The volume is formatted (`mkfs.ext4`, lazy init; if no block of its file is allocated
    /// the storage is known to be zero and initialization is skipped altogether) only when
    /// `blkid` finds no signature at all on it; any other content than ext4 is
    /// [`StorageError::UnexpectedContent`]: data is never reformatted. Something else mounted
    /// at the path is [`StorageError::MountPathBusy`]. `Ok(true)` if anything changed.
    ///
    /// The mount is made in the instance's namespace only; whether it propagates elsewhere is
    /// up to the propagation type of the instance's mounts (private for instances).
    pub async fn expose(
        &self,
        volume_id: &str,
        ns_pid: i32,
        device: &str,
        mount_path: Option<&Path>,
    ) -> Result<bool, StorageError> {
        let file = self.volume_path(volume_id)?;
        validate_device(device)?;
        validate_pid(ns_pid)?;
        if let Some(p) = mount_path {
            validate_mount_path(p)?;
        }
        let mount_path = mount_path.map(Path::to_path_buf);
        let node = node_path(device);
        let volume_id = volume_id.to_owned();

        let (dev, node_state, top) = {
            let (file, node, mount_path) = (file.clone(), node.clone(), mount_path.clone());
            blocking(move || {
                let dev = loopdev::find_live(&file)?;
                let state = nsexec::node_state(ns_pid, &node)?;
                let top = match &mount_path {
                    Some(p) => mounts_at(&nsexec::mountinfo(ns_pid)?, p)
                        .last()
                        .map(|m| (m.dev, m.fstype.clone())),
                    None => None,
                };
                Ok((dev, state, top))
            })
            .await?
        };
        let Some(dev) = dev else {
            return Err(StorageError::NotAttached { volume_id });
        };

        let mut ops = Vec::new();
        match node_state {
            NodeState::Block { major, minor } if (major, minor) == (dev.major, dev.minor) => {}
            NodeState::Block { major, .. } if major == loopdev::LOOP_MAJOR => {
                ops.push(NsOp::Unlink(node.clone()));
                ops.push(mknod(&node, &dev));
            }
            NodeState::Block { .. } | NodeState::Other => {
                return Err(StorageError::NodeConflict {
                    pid: ns_pid,
                    path: node,
                });
            }
            NodeState::Missing => {
                ops.push(NsOp::Mkdir("/dev".into()));
                ops.push(mknod(&node, &dev));
            }
        }
        let mut formatted = false;
        if let Some(path) = &mount_path {
            match top {
                Some((d, _)) if d == (dev.major, dev.minor) => {}
                Some((d, fstype)) => {
                    return Err(StorageError::MountPathBusy {
                        pid: ns_pid,
                        path: path.clone(),
                        dev: d,
                        fstype,
                    });
                }
                None => {
                    formatted = self.format_if_blank(&volume_id, &file, &dev).await?;
                    ops.extend(ancestors_outermost_first(path).into_iter().map(NsOp::Mkdir));
                    ops.push(NsOp::MountExt4 {
                        source: node.clone(),
                        target: path.clone(),
                    });
                }
            }
        }
        if ops.is_empty() {
            return Ok(formatted);
        }
        tracing::info!(volume = %volume_id, pid = ns_pid, ?ops, "storage: exposing");
        blocking(move || nsexec::run(ns_pid, &ops)).await?;
        Ok(true)
    }

    /// Formats the volume with ext4 if `blkid` finds nothing on it; `Ok(true)` if it did.
    async fn format_if_blank(
        &self,
        volume_id: &str,
        file: &Path,
        dev: &LoopDevice,
    ) -> Result<bool, StorageError> {
        let devpath = dev.path.to_string_lossy().into_owned();
        let (code, out, stderr) =
            command("blkid", &["-p", "-o", "export", &devpath], BLKID_TIMEOUT).await?;
        let probe = match code {
            0 => parse_blkid(&out),
            2 => Probe::Empty,
            _ => {
                return Err(StorageError::Command {
                    command: format!("blkid -p -o export {devpath}"),
                    status: format!("exit status {code}"),
                    stderr,
                });
            }
        };
        match probe {
            Probe::Filesystem(t) if t == "ext4" => return Ok(false),
            Probe::Filesystem(t) => {
                return Err(StorageError::UnexpectedContent {
                    volume_id: volume_id.to_owned(),
                    found: format!("a {t} filesystem"),
                });
            }
            Probe::Other(found) => {
                return Err(StorageError::UnexpectedContent {
                    volume_id: volume_id.to_owned(),
                    found,
                });
            }
            Probe::Empty => {}
        }
        let zeroed = {
            let file = file.to_owned();
            blocking(move || files::is_unallocated(&file)).await?
        };
        let mut ext = String::from("lazy_itable_init=1,lazy_journal_init=1,nodiscard");
        if zeroed {
            ext.push_str(",assume_storage_prezeroed=1");
        }
        let started = Instant::now();
        let args = ["-q", "-F", "-E", &ext, &devpath];
        let (code, _, stderr) = command("mkfs.ext4", &args, MKFS_TIMEOUT).await?;
        if code != 0 {
            return Err(StorageError::Command {
                command: format!("mkfs.ext4 {}", args.join(" ")),
                status: format!("exit status {code}"),
                stderr,
            });
        }
        tracing::info!(
            volume = %volume_id,
            device = %devpath,
            zeroed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "storage: formatted ext4"
        );
        Ok(true)
    }

    /// Reverses [`Storage::expose`] in the instance of host pid `ns_pid`: with a
    /// `mount_path`, unmounts the loop-device filesystems stacked on top there (the device
    /// node's, or any loop device's if the node is gone) with a lazy unmount (`MNT_DETACH`:
    /// it leaves the namespace at once even if busy; the filesystem, and so the loop device,
    /// is released when its last user goes, until then [`Storage::detach`] says
    /// [`StorageError::Busy`]); then removes `/dev/<device>` if it is a loop block device.
    /// Anything else is left alone. `Ok(true)` if anything changed; `Ok(false)` if the
    /// process is gone (its namespace, and the exposure, with it).
    pub async fn unexpose(
        &self,
        ns_pid: i32,
        device: &str,
        mount_path: Option<&Path>,
    ) -> Result<bool, StorageError> {
        validate_device(device)?;
        validate_pid(ns_pid)?;
        if let Some(p) = mount_path {
            validate_mount_path(p)?;
        }
        let mount_path = mount_path.map(Path::to_path_buf);
        let node = node_path(device);
        let result = blocking(move || {
            let state = nsexec::node_state(ns_pid, &node)?;
            let ours = |d: (u32, u32)| match state {
                NodeState::Block { major, minor } => d == (major, minor),
                _ => d.0 == loopdev::LOOP_MAJOR,
            };
            let mut ops = Vec::new();
            if let Some(path) = &mount_path {
                let mounts = nsexec::mountinfo(ns_pid)?;
                ops.extend(
                    mounts_at(&mounts, path)
                        .iter()
                        .rev()
                        .take_while(|m| ours(m.dev))
                        .map(|_| NsOp::UmountLazy(path.clone())),
                );
            }
            if matches!(state, NodeState::Block { major, .. } if major == loopdev::LOOP_MAJOR) {
                ops.push(NsOp::Unlink(node));
            }
            if ops.is_empty() {
                return Ok(false);
            }
            tracing::info!(pid = ns_pid, ?ops, "storage: unexposing");
            nsexec::run(ns_pid, &ops)?;
            Ok(true)
        })
        .await;
        match result {
            Err(StorageError::InstanceGone { .. }) => Ok(false),
            other => other,
        }
    }
}

fn mknod(node: &Path, dev: &LoopDevice) -> NsOp {
    NsOp::Mknod {
        path: node.to_owned(),
        major: dev.major,
        minor: dev.minor,
    }
}

fn validate_pid(pid: i32) -> Result<(), StorageError> {
    if pid > 0 {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!("pid {pid}")))
    }
}
