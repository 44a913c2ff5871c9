//! Creating an instance's metadata device: a TUN interface inside its network namespace,
//! routed to from the instance for 169.254.169.254.
//!
//! The namespace is a per-thread attribute, so a short-lived thread enters it (setns) and does
//! the work there: it opens `/dev/net/tun` (a TUN device is created in the namespace of the
//! thread that attaches it) and runs `ip` (a child process starts in its spawning thread's
//! namespace). The returned file descriptor stays bound to the device from any thread.

use std::{
    fs, io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use nix::{
    fcntl::{OFlag, open},
    libc,
    sched::{CloneFlags, setns},
    sys::stat::Mode,
};
use tokio::sync::oneshot;

use super::{IMDS_ADDR, IMDS_IFNAME, ImdsError};

/// An attached TUN device.
#[derive(Debug)]
pub(super) struct Tun {
    /// The queue's file descriptor, non-blocking. Closing it destroys the device (it is not
    /// persistent), and the route with it.
    pub fd: OwnedFd,
    /// Whether an interface of that name was found (and deleted) first.
    pub replaced_stale: bool,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a `short`) at the start of
/// the union; 40 bytes in all on 64-bit Linux (24 on 32-bit; the kernel copies
/// `sizeof(struct ifreq)`, so the larger size is always enough).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates `imds0` in the namespace at `netns`, up, IPv6 off, with the route
/// `169.254.169.254/32 dev imds0 src <instance_ip>`. An existing `imds0` is deleted first: the
/// caller calls this only for an instance it does not serve, so any device of that name was left
/// by someone else (an agent that is still exiting, or a previous `Imds` of this process).
pub(super) async fn create(netns: &Path, instance_ip: Ipv4Addr) -> Result<Tun, ImdsError> {
    let netns: PathBuf = netns.to_owned();
    let (tx, rx) = oneshot::channel();
    let ns = netns.clone();
    thread::Builder::new()
        .name("imds-setup".into())
        .spawn(move || {
            // The receiver is gone only if the caller stopped waiting; the fd is then closed
            // and the device goes away with it.
            let _ = tx.send(create_here(&ns, instance_ip));
        })
        .map_err(|e| ImdsError::Io {
            what: "spawning the setup thread".into(),
            source: e,
        })?;
    rx.await.unwrap_or_else(|_| {
        Err(ImdsError::Io {
            what: format!("setting up {IMDS_IFNAME} in {}", netns.display()),
            source: io::Error::other("the setup thread panicked"),
        })
    })
}

/// The body of the setup thread.
fn create_here(netns: &Path, instance_ip: Ipv4Addr) -> Result<Tun, ImdsError> {
    let io_err = |what: String| move |source: io::Error| ImdsError::Io { what, source };
    let file = fs::File::open(netns).map_err(io_err(format!("opening {}", netns.display())))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)
        .map_err(io_err(format!("entering {}", netns.display())))?;

    let replaced_stale = nix::net::if_::if_nametoindex(IMDS_IFNAME).is_ok();
    if replaced_stale {
        tracing::info!(netns = %netns.display(), "imds: deleting a stale {IMDS_IFNAME}");
        ip(&["link", "del", "dev", IMDS_IFNAME], true)?;
    }

    let fd = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
    .map_err(io_err("opening /dev/net/tun".into()))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..IMDS_IFNAME.len()].copy_from_slice(IMDS_IFNAME.as_bytes());
    // SAFETY: TUNSETIFF reads (and writes back the name into) a `struct ifreq`; `req` is a
    // live, exclusively borrowed value at least as large as the kernel's `struct ifreq` with
    // the layout it expects (name, then the flags at the start of the union), and `fd` is an
    // open descriptor of /dev/net/tun for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
    if rc < 0 {
        return Err(ImdsError::Io {
            what: format!("TUNSETIFF {IMDS_IFNAME} in {}", netns.display()),
            source: io::Error::last_os_error(),
        });
    }
    // IPv6 off: no router solicitations or MLD reports for the server to drop. Absent if
    // IPv6 is not available at all.
    let key = format!("/proc/sys/net/ipv6/conf/{IMDS_IFNAME}/disable_ipv6");
    match fs::write(&key, "1") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err(format!("writing {key}"))(e));
        }
        _ => {}
    }
    ip(&["link", "set", "dev", IMDS_IFNAME, "up"], false)?;
    let dst = format!("{IMDS_ADDR}/32");
    let src = instance_ip.to_string();
    ip(
        &["route", "replace", &dst, "dev", IMDS_IFNAME, "src", &src],
        false,
    )?;
    Ok(Tun { fd, replaced_stale })
}

/// Runs `ip ARGS...` in this thread's namespace. With `missing_ok`, a missing device is fine.
fn ip(args: &[&str], missing_ok: bool) -> Result<(), ImdsError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ImdsError::Io {
            what: format!("running `{command}`"),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let missing = stderr.contains("does not exist") || stderr.contains("Cannot find device");
    if out.status.success() || (missing_ok && missing) {
        Ok(())
    } else {
        Err(ImdsError::Command {
            command,
            status: out.status.to_string(),
            stderr: stderr.trim().to_owned(),
        })
    }
}
