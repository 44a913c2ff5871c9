//! Volume and snapshot files: sparse creation, sparse copies, atomic publication, and the
//! freezing of a mounted filesystem while its volume is copied. Blocking: run off the async
//! threads.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
    time::Instant,
};

use nix::{
    errno::Errno,
    libc,
    unistd::{Whence, lseek},
};

use super::StorageError;

/// How much one `copy_file_range` call copies at most (between deadline checks).
const CHUNK: u64 = 64 << 20;

// <linux/fs.h>: _IOWR('X', 119, int), _IOWR('X', 120, int).
const FIFREEZE: libc::Ioctl = 0xC004_5877;
const FITHAW: libc::Ioctl = 0xC004_5878;

fn io_err(what: String) -> impl FnOnce(io::Error) -> StorageError {
    move |source| StorageError::Io { what, source }
}

fn errno_err(what: String) -> impl FnOnce(Errno) -> StorageError {
    move |e| StorageError::Io {
        what,
        source: e.into(),
    }
}

/// Opens `tmp` for writing, truncated (a leftover of a crashed attempt is overwritten).
fn create_temp(tmp: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(tmp)
        .map_err(io_err(format!("creating {}", tmp.display())))
}

/// Makes `tmp` durable and renames it to `dest` (then makes the rename durable), so `dest`
/// is either absent or complete, also after a crash.
pub(super) fn publish(file: File, tmp: &Path, dest: &Path) -> Result<(), StorageError> {
    file.sync_all()
        .map_err(io_err(format!("fsync {}", tmp.display())))?;
    drop(file);
    fs::rename(tmp, dest).map_err(io_err(format!(
        "renaming {} to {}",
        tmp.display(),
        dest.display()
    )))?;
    let dir = dest.parent().unwrap_or(Path::new("/"));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync {}", dir.display())))
}

/// Creates `dest` as a sparse file of `len` bytes (no block allocated), via `tmp`.
pub(super) fn create_sparse(tmp: &Path, dest: &Path, len: u64) -> Result<(), StorageError> {
    let file = create_temp(tmp)?;
    file.set_len(len)
        .map_err(io_err(format!("truncating {} to {len}", tmp.display())))?;
    publish(file, tmp, dest)
}

/// Copies `src` to `tmp`, keeping holes, extended to `len` bytes if that is larger; the
/// caller [`publish`]es it. First tries a reflink clone (`FICLONE`: instant, shares blocks;
/// XFS, btrfs), else copies each data extent (`SEEK_DATA`/`SEEK_HOLE`) with
/// `copy_file_range`. With a `deadline`, gives up ([`StorageError::Timeout`]) once it passes
/// between chunks. On failure `tmp` is removed.
pub(super) fn copy_sparse(
    src: &Path,
    tmp: &Path,
    len: u64,
    deadline: Option<Instant>,
) -> Result<File, StorageError> {
    let input = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let src_len = input
        .metadata()
        .map_err(io_err(format!("stat {}", src.display())))?
        .len();
    let output = create_temp(tmp)?;
    let result = copy_into(&input, src, &output, tmp, src_len, deadline).and_then(|()| {
        output
            .set_len(len.max(src_len))
            .map_err(io_err(format!("truncating {}", tmp.display())))
    });
    match result {
        Ok(()) => Ok(output),
        Err(e) => {
            drop(output);
            let _ = fs::remove_file(tmp);
            Err(e)
        }
    }
}

fn copy_into(
    input: &File,
    src: &Path,
    output: &File,
    tmp: &Path,
    src_len: u64,
    deadline: Option<Instant>,
) -> Result<(), StorageError> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
    let r = unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) };
    if r == 0 {
        return Ok(());
    }
    // Not supported here (EOPNOTSUPP, EXDEV, EINVAL, ...): copy the data extents.
    let what = || format!("copying {} to {}", src.display(), tmp.display());
    let end = i64::try_from(src_len).map_err(|_| StorageError::Io {
        what: what(),
        source: io::Error::from(io::ErrorKind::FileTooLarge),
    })?;
    let mut pos: i64 = 0;
    while pos < end {
        let data = match lseek(input, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(errno_err(what())(e)),
        };
        let hole = lseek(input, data, Whence::SeekHole).map_err(errno_err(what()))?;
        let mut off_in = data;
        while off_in < hole {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(StorageError::Timeout { what: what() });
            }
            let want = u64::try_from(hole - off_in).unwrap_or(0).min(CHUNK) as usize;
            let mut off_out = off_in;
            // SAFETY: both fds are open for the call; the offsets are valid, exclusively
            // borrowed i64s (loff_t) that the kernel advances.
            let n = unsafe {
                libc::copy_file_range(
                    input.as_raw_fd(),
                    &raw mut off_in,
                    output.as_raw_fd(),
                    &raw mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                return Err(io_err(what())(io::Error::last_os_error()));
            }
            if n == 0 {
                // The source shrank under us.
                return Err(StorageError::Io {
                    what: what(),
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Whether no block of the file is allocated (it reads as zeroes throughout).
pub(super) fn is_unallocated(path: &Path) -> Result<bool, StorageError> {
    let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    match lseek(&file, 0, Whence::SeekData) {
        Err(Errno::ENXIO) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(errno_err(format!("SEEK_DATA {}", path.display()))(e)),
    }
}

/// A filesystem frozen with `FIFREEZE`; thawed when dropped (also on errors and panics).
#[derive(Debug)]
pub(super) struct Frozen {
    dir: File,
    what: String,
}

impl Frozen {
    /// Flushes the filesystem `dir` is on (`syncfs`, without blocking writers, so the freeze
    /// itself has little left to write) and freezes it. `Ok(None)` if it is already frozen
    /// (by someone else: it stays theirs to thaw).
    pub(super) fn freeze(dir: File, what: String) -> Result<Option<Frozen>, StorageError> {
        nix::unistd::syncfs(&dir).map_err(errno_err(format!("syncfs {what}")))?;
        // SAFETY: FIFREEZE takes an ignored int argument; `dir` is open for the call.
        let r = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
        if r == 0 {
            return Ok(Some(Frozen { dir, what }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(None);
        }
        Err(io_err(format!("FIFREEZE {what}"))(e))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes an ignored int argument; `self.dir` is open for the call.
        let r = unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) };
        if r != 0 {
            tracing::error!(fs = %self.what, error = %io::Error::last_os_error(), "storage: FITHAW failed");
        }
    }
}
