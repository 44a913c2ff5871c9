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

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (BPF_MAP_*_BATCH).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries fetched per BPF_MAP_LOOKUP_BATCH call.
const BATCH: usize = 4096;

fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialized `batch` member of `union bpf_attr`; the buffers
    // it points to are owned by the caller, sized for `count` elements, and outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut *attr, size_of::<BatchAttr>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads every (key, value) of a hash map (plain or LRU, not per-CPU) with
/// BPF_MAP_LOOKUP_BATCH: thousands of entries per syscall instead of two syscalls each.
/// `K` and `V` must be the map's plain-old-data key and value types.
pub fn lookup_batch<K: Copy + Default, V: Copy + Default>(
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    use std::os::fd::AsRawFd as _;
    let mut out = Vec::new();
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The batch token is opaque (a bucket index for hash maps); 8 bytes hold it.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match result {
            Ok(()) => {}
            // ENOENT: the walk reached the end (the last entries came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// Deletes `keys` from a hash map with BPF_MAP_DELETE_BATCH. Keys already gone (evicted or
/// deleted by someone else meanwhile) are skipped.
pub fn delete_batch<K: Copy>(fd: std::os::fd::BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        match batch_call(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => rest = &rest[chunk.len()..],
            // The kernel stops at the first missing key; `count` says how many it deleted.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[(attr.count as usize + 1).min(rest.len())..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes (key, value) pairs to a hash map with BPF_MAP_UPDATE_BATCH.
pub fn update_batch<K: Copy, V: Copy>(
    fd: std::os::fd::BorrowedFd<'_>,
    entries: &[(K, V)],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        batch_call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}
