//! Acting inside an instance's mount namespace.
//!
//! Looking is done from here: `/proc/<pid>/mountinfo`, and the device node through
//! `openat2(/proc/<pid>/root, "dev/<name>", RESOLVE_IN_ROOT)`, which resolves every symlink
//! inside the instance's root (an instance's `/dev -> /etc` cannot make us look at the host).
//!
//! Changing (mkdir, mknod, unlink, mount, umount) needs the namespace itself: mount(2) only
//! mounts in the caller's namespace, and `setns(CLONE_NEWNS)` is refused to a multithreaded
//! process. So a forked child enters it (`setns` on `/proc/<pid>/ns/mnt`, then `chroot` to the
//! instance's root, opened beforehand, so paths mean what they mean to the instance even if it
//! chrooted), makes the raw system calls and exits; it never execs. Nothing is needed from the
//! instance's filesystem (no `mount` or `sh` binary: an instance root may be minimal), and one
//! fork replaces a handful of `nsenter` commands. The child only makes async-signal-safe
//! calls on memory prepared before the fork (a forked child of a multithreaded process must
//! not allocate). It reports the failing step and errno through a pipe. The parent waits at
//! most [`NS_TIMEOUT`], then kills it.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt, fs::OpenOptionsExt},
    },
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag, openat2},
    libc,
    sys::{
        signal::{Signal, kill},
        stat::{SFlag, fstat},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork, pipe2},
};

use super::{
    StorageError,
    parse::{MountEntry, parse_mountinfo},
};

/// How long the child may take.
pub(super) const NS_TIMEOUT: Duration = Duration::from_secs(20);

/// One change inside the namespace. Paths are the instance's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum NsOp {
    /// `mkdir(path, 0755)`; an existing entry is fine.
    Mkdir(PathBuf),
    /// `mknod(path, S_IFBLK | 0660, dev)`.
    Mknod {
        path: PathBuf,
        major: u32,
        minor: u32,
    },
    /// `unlink(path)`; a missing one is fine.
    Unlink(PathBuf),
    /// `mount(source, target, "ext4", 0, NULL)`.
    MountExt4 { source: PathBuf, target: PathBuf },
    /// `umount2(target, MNT_DETACH)`: lazy, so a busy mount (a process's cwd or open file in
    /// it) still disappears from the namespace at once; the filesystem is released when its
    /// last user goes.
    UmountLazy(PathBuf),
}

impl std::fmt::Display for NsOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NsOp::Mkdir(p) => write!(f, "mkdir {}", p.display()),
            NsOp::Mknod { path, major, minor } => {
                write!(f, "mknod {} b {major} {minor}", path.display())
            }
            NsOp::Unlink(p) => write!(f, "unlink {}", p.display()),
            NsOp::MountExt4 { source, target } => {
                write!(f, "mount -t ext4 {} {}", source.display(), target.display())
            }
            NsOp::UmountLazy(p) => write!(f, "umount -l {}", p.display()),
        }
    }
}

/// An [`NsOp`] prepared for the child: C strings made before the fork.
enum Prepared {
    Mkdir(CString),
    Mknod(CString, libc::dev_t),
    Unlink(CString),
    Mount(CString, CString),
    Umount(CString),
}

fn cstring(p: &Path) -> Result<CString, StorageError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| StorageError::Invalid(format!("{} contains a NUL byte", p.display())))
}

fn prepare(op: &NsOp) -> Result<Prepared, StorageError> {
    Ok(match op {
        NsOp::Mkdir(p) => Prepared::Mkdir(cstring(p)?),
        NsOp::Mknod { path, major, minor } => {
            Prepared::Mknod(cstring(path)?, libc::makedev(*major, *minor))
        }
        NsOp::Unlink(p) => Prepared::Unlink(cstring(p)?),
        NsOp::MountExt4 { source, target } => Prepared::Mount(cstring(source)?, cstring(target)?),
        NsOp::UmountLazy(p) => Prepared::Umount(cstring(p)?),
    })
}

/// Opens `/proc/<pid>/<what>` for the namespace's sake; a missing process is
/// [`StorageError::InstanceGone`].
fn open_proc(pid: i32, what: &str, flags: i32) -> Result<File, StorageError> {
    let path = format!("/proc/{pid}/{what}");
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| proc_err(pid, &path, e))
}

fn proc_err(pid: i32, path: &str, e: io::Error) -> StorageError {
    if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) {
        StorageError::InstanceGone { pid }
    } else {
        StorageError::Io {
            what: format!("reading {path}"),
            source: e,
        }
    }
}

/// The mounts of `pid`'s namespace, mount points relative to its root.
pub(super) fn mountinfo(pid: i32) -> Result<Vec<MountEntry>, StorageError> {
    let path = format!("/proc/{pid}/mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|e| proc_err(pid, &path, e))?;
    Ok(parse_mountinfo(&text))
}

/// What is at a path inside the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NodeState {
    Missing,
    /// A block device node with these numbers.
    Block {
        major: u32,
        minor: u32,
    },
    /// Something else (a file, a directory, a symlink, a character device...).
    Other,
}

/// Opens `path` (absolute, the instance's) inside the instance's root with `flags`, resolving
/// symlinks within that root and refusing magic links.
fn open_in_root(pid: i32, path: &Path, flags: OFlag) -> Result<Option<OwnedFd>, StorageError> {
    let root = open_proc(pid, "root", libc::O_PATH | libc::O_DIRECTORY)?;
    let rel = path.strip_prefix("/").unwrap_or(path);
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(&root, rel, how) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(StorageError::Io {
            what: format!("opening {} in instance {pid}", path.display()),
            source: e.into(),
        }),
    }
}

/// Looks at `path` inside the instance without following a final symlink.
pub(super) fn node_state(pid: i32, path: &Path) -> Result<NodeState, StorageError> {
    let Some(fd) = open_in_root(pid, path, OFlag::O_PATH | OFlag::O_NOFOLLOW)? else {
        return Ok(NodeState::Missing);
    };
    let st = fstat(&fd).map_err(|e| StorageError::Io {
        what: format!("stat {} in instance {pid}", path.display()),
        source: e.into(),
    })?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFBLK {
        Ok(NodeState::Block {
            major: libc::major(st.st_rdev),
            minor: libc::minor(st.st_rdev),
        })
    } else {
        Ok(NodeState::Other)
    }
}

/// Opens the directory `path` inside the instance (to freeze the filesystem mounted there),
/// checking that it is on device `dev`; `None` if it is not (any more).
pub(super) fn open_mounted_dir(
    pid: i32,
    path: &Path,
    dev: (u32, u32),
) -> Result<Option<File>, StorageError> {
    let Some(fd) = open_in_root(pid, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)? else {
        return Ok(None);
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| StorageError::Io {
        what: format!("stat {} in instance {pid}", path.display()),
        source: e,
    })?;
    let st_dev = meta.dev();
    Ok(((libc::major(st_dev), libc::minor(st_dev)) == dev).then_some(file))
}

/// Runs `ops` in order inside `pid`'s mount namespace and root (see the module docs); stops at
/// the first that fails. Blocking (at most about [`NS_TIMEOUT`]).
pub(super) fn run(pid: i32, ops: &[NsOp]) -> Result<(), StorageError> {
    if ops.is_empty() {
        return Ok(());
    }
    let prepared = ops.iter().map(prepare).collect::<Result<Vec<_>, _>>()?;
    let ns = open_proc(pid, "ns/mnt", 0)?;
    let root = open_proc(pid, "root", libc::O_PATH | libc::O_DIRECTORY)?;
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).map_err(|e| StorageError::Io {
        what: "pipe2".into(),
        source: e.into(),
    })?;
    let (ns_fd, root_fd, w_fd) = (ns.as_raw_fd(), root.as_raw_fd(), write_end.as_raw_fd());

    // SAFETY: the child only calls async-signal-safe functions (raw system calls and _exit)
    // on memory prepared before the fork, never returns, never unwinds, and never allocates
    // (see `child`), which is what a child of a multithreaded process may do.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => child(ns_fd, root_fd, w_fd, &prepared),
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            return Err(StorageError::Io {
                what: "fork".into(),
                source: e.into(),
            });
        }
    };
    drop(write_end);
    drop((ns, root));
    let status = wait_bounded(child)?;
    let mut report = [0u8; 8];
    let mut read = File::from(read_end);
    let n = read.read(&mut report).unwrap_or(0);
    match status {
        WaitStatus::Exited(_, 0) => Ok(()),
        _ if n == 8 => {
            let step = u32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
            let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
            let what = match step as usize {
                SETNS => format!("entering the mount namespace of {pid}"),
                CHROOT => format!("entering the root of {pid}"),
                i => ops
                    .get(i - FIRST_OP)
                    .map_or("?".into(), ToString::to_string),
            };
            Err(StorageError::InNamespace {
                pid,
                what,
                source: io::Error::from_raw_os_error(errno),
            })
        }
        other => Err(StorageError::InNamespace {
            pid,
            what: format!("helper process ended with {other:?}"),
            source: io::Error::other("no report"),
        }),
    }
}

const SETNS: usize = 0;
const CHROOT: usize = 1;
const FIRST_OP: usize = 2;

/// The forked child. Only async-signal-safe calls; no allocation.
fn child(ns_fd: i32, root_fd: i32, w_fd: i32, ops: &[Prepared]) -> ! {
    let fail = |step: usize| -> ! {
        let errno = Errno::last_raw();
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&(step as u32).to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write(2) and _exit(2) are async-signal-safe; `report` is a valid buffer.
        unsafe {
            libc::write(w_fd, report.as_ptr().cast(), report.len());
            libc::_exit(1)
        }
    };
    // SAFETY: raw system calls on fds and NUL-terminated strings that stay valid in the child.
    unsafe {
        if libc::setns(ns_fd, libc::CLONE_NEWNS) != 0 {
            fail(SETNS);
        }
        if libc::fchdir(root_fd) != 0
            || libc::chroot(c".".as_ptr()) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(CHROOT);
        }
        for (i, op) in ops.iter().enumerate() {
            let ok = match op {
                Prepared::Mkdir(p) => {
                    libc::mkdir(p.as_ptr(), 0o755) == 0 || Errno::last_raw() == libc::EEXIST
                }
                Prepared::Mknod(p, dev) => {
                    libc::mknod(p.as_ptr(), libc::S_IFBLK | 0o660, *dev) == 0
                }
                Prepared::Unlink(p) => {
                    libc::unlink(p.as_ptr()) == 0 || Errno::last_raw() == libc::ENOENT
                }
                Prepared::Mount(source, target) => {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        c"ext4".as_ptr(),
                        0,
                        std::ptr::null(),
                    ) == 0
                }
                Prepared::Umount(p) => libc::umount2(p.as_ptr(), libc::MNT_DETACH) == 0,
            };
            if !ok {
                fail(FIRST_OP + i);
            }
        }
        libc::_exit(0)
    }
}

/// Reaps `child`, waiting at most [`NS_TIMEOUT`], then SIGKILL and 2 s more.
fn wait_bounded(child: Pid) -> Result<WaitStatus, StorageError> {
    let poll = |until: Instant| -> Result<Option<WaitStatus>, StorageError> {
        loop {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(s) => return Ok(Some(s)),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(StorageError::Io {
                        what: format!("waiting for helper {child}"),
                        source: e.into(),
                    });
                }
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(2));
        }
    };
    if let Some(s) = poll(Instant::now() + NS_TIMEOUT)? {
        return Ok(s);
    }
    let _ = kill(child, Signal::SIGKILL);
    if let Some(s) = poll(Instant::now() + Duration::from_secs(2))? {
        return Ok(s);
    }
    // Stuck in the kernel (uninterruptible): left as a zombie-to-be.
    Err(StorageError::Timeout {
        what: format!("helper {child} in a mount namespace"),
    })
}
