//! The two bpf(2) commands aya 0.14 does not expose, used to detach pinned links
//! synchronously. Everything else goes through aya.
//!
//! Why: unpinning a link only drops a reference; the kernel frees it later (deferred work
//! after an RCU grace period), so the program can keep running for a moment after the pin is
//! gone. `BPF_LINK_DETACH` (Linux 5.9) detaches the link from its hook before returning.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use nix::libc;

/// `enum bpf_cmd` values from the kernel UAPI (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The `BPF_OBJ_GET` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// The `BPF_LINK_DETACH` member of `union bpf_attr`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, initialized prefix of `union bpf_attr` for BPF_OBJ_GET and
    // lives across the call; `pathname` points at a NUL-terminated string that outlives it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGetAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// Detaches the link `fd` from its hook now. A link that is already detached (its device
/// is gone) reports success.
pub fn link_detach(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is a valid, initialized prefix of `union bpf_attr` for BPF_LINK_DETACH
    // and lives across the call; the fd is open (borrowed from `fd`).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const attr,
            size_of::<LinkDetachAttr>(),
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        // ENOLINK: already detached (e.g. the interface was deleted).
        if err.raw_os_error() != Some(libc::ENOLINK) {
            return Err(err);
        }
    }
    Ok(())
}
