//! Loop devices: finding the ones bound to a file (sysfs), binding a new one and releasing one
//! (ioctls on /dev/loop-control and /dev/loopN).
//!
//! Binding uses the ioctls directly rather than `losetup --find --show`: `LOOP_CTL_GET_FREE`
//! then `LOOP_CONFIGURE` (file, flags and name in one call, so no half-configured device is
//! ever visible) is what losetup does too, but here there is no output to parse, errors keep
//! their errno, and the race with another allocator (someone binds the free device between the
//! two calls: `EBUSY`) is retried explicitly. Blocking calls: run them off the async threads.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use nix::libc;

use super::{
    LoopDevice, StorageError,
    parse::{Backing, backing_matches, parse_dev},
};

/// The loop driver's block major.
pub(super) const LOOP_MAJOR: u32 = 7;

// <linux/loop.h>.
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopConfig>() == 304);

/// How often [`attach_file`] retries when another allocator takes the free device first.
const ATTACH_ATTEMPTS: usize = 16;

/// A bound loop device as sysfs shows it.
#[derive(Clone, Debug)]
pub(super) struct Bound {
    pub dev: LoopDevice,
    /// `loop/backing_file`, as read.
    pub backing_file: String,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError::Io { what, source }
}

/// Every bound loop device (`/sys/block/loopN` with a `loop/` directory). Devices that unbind
/// while being read are skipped.
pub(super) fn bound() -> Result<Vec<Bound>, StorageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block").map_err(io_err("listing /sys/block"))? {
        let entry = entry.map_err(io_err("listing /sys/block"))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !name
            .strip_prefix("loop")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let dir = entry.path();
        // No `loop/` (ENOENT): unbound; other errors (ENXIO...): unbound meanwhile.
        let Ok(backing_file) = fs::read_to_string(dir.join("loop/backing_file")) else {
            continue;
        };
        let Some((major, minor)) = fs::read_to_string(dir.join("dev"))
            .ok()
            .and_then(|s| parse_dev(&s))
        else {
            continue;
        };
        out.push(Bound {
            dev: LoopDevice {
                path: Path::new("/dev").join(&name),
                major,
                minor,
            },
            backing_file,
        });
    }
    out.sort_by_key(|b| b.dev.minor);
    Ok(out)
}

/// The bound devices whose backing file is `file` (canonical), with how.
pub(super) fn bound_to(file: &Path) -> Result<Vec<(LoopDevice, Backing)>, StorageError> {
    Ok(bound()?
        .into_iter()
        .filter_map(|b| backing_matches(&b.backing_file, file).map(|m| (b.dev, m)))
        .collect())
}

/// The first device bound to the current `file`, if any.
pub(super) fn find_live(file: &Path) -> Result<Option<LoopDevice>, StorageError> {
    Ok(bound_to(file)?
        .into_iter()
        .find_map(|(d, m)| (m == Backing::Live).then_some(d)))
}

/// Binds a free loop device to `file` (read-write, buffered, no autoclear: the binding must
/// outlive the agent and any mount). Blocking.
pub(super) fn attach_file(file: &Path) -> Result<LoopDevice, StorageError> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)
        .map_err(io_err(format!("opening {}", file.display())))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(io_err("opening /dev/loop-control"))?;
    let mut config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd()).expect("fds are not negative"),
        block_size: 0,
        // SAFETY: LoopInfo64 is plain integers and byte arrays: all zeroes is valid.
        info: unsafe { std::mem::zeroed() },
        reserved: [0; 8],
    };
    let name = file.as_os_str().as_encoded_bytes();
    let n = name.len().min(LO_NAME_SIZE - 1);
    config.info.lo_file_name[..n].copy_from_slice(&name[..n]);

    for _ in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open fd for the call.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(StorageError::Io {
                what: "LOOP_CTL_GET_FREE".into(),
                source: io::Error::last_os_error(),
            });
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is (repr(C),
        // size checked above), valid for the duration of the call; both fds are open.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &raw const config) };
        if r == 0 {
            return loop_device(&path, &dev);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(StorageError::Io {
                what: format!("LOOP_CONFIGURE {} with {}", path.display(), file.display()),
                source: e,
            });
        }
        // Someone else bound it between GET_FREE and CONFIGURE: ask again.
    }
    Err(StorageError::Io {
        what: format!("binding a loop device to {}", file.display()),
        source: io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("every free loop device was taken first, {ATTACH_ATTEMPTS} times"),
        ),
    })
}

/// The device's numbers, from its open node.
fn loop_device(path: &Path, dev: &File) -> Result<LoopDevice, StorageError> {
    let meta = dev
        .metadata()
        .map_err(io_err(format!("stat {}", path.display())))?;
    if !meta.file_type().is_block_device() {
        return Err(StorageError::Io {
            what: format!("{} is not a block device", path.display()),
            source: io::Error::from(io::ErrorKind::InvalidData),
        });
    }
    let rdev = meta.rdev();
    Ok(LoopDevice {
        path: path.to_owned(),
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
    })
}

/// Releases `dev` (bound to a file of `volume_id`). Refuses with [`StorageError::Busy`] if a
/// filesystem on it is still mounted anywhere (an exclusive open fails): unmount first (a lazy
/// unmount releases the device when its last user goes). If it is merely open (a process
/// reading the node), it is released when the last opener closes it. Blocking.
pub(super) fn release(dev: &LoopDevice, volume_id: &str) -> Result<(), StorageError> {
    let node = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
        .open(&dev.path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(StorageError::Busy {
                volume_id: volume_id.to_owned(),
                device: dev.path.clone(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("opening {}", dev.path.display()))(e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument; `node` is open for the call.
    let r = unsafe { libc::ioctl(node.as_raw_fd(), LOOP_CLR_FD) };
    if r != 0 {
        let e = io::Error::last_os_error();
        // ENXIO: already unbound (someone else released it meanwhile).
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(io_err(format!("LOOP_CLR_FD {}", dev.path.display()))(e));
        }
    }
    // The kernel unbinds on this last close (the device is marked autoclear).
    drop(node);
    Ok(())
}
