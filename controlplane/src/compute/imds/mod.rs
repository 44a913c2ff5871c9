//! The instance metadata service (IMDS): `http://169.254.169.254/` as EC2 instances know it,
//! answered by the host agent, per instance.
//!
//! ```text
//!  instance netns /run/netns/<prefix><id>            agent (any thread)
//!  eth0 10.0.1.4/24 ── VPC datapath
//!  imds0 (TUN, up) <── 169.254.169.254/32 dev imds0 src 10.0.1.4
//!     │ fd (IFF_TUN|IFF_NO_PI, non-blocking)
//!     └──────────────────────────────────────────────> tokio AsyncFd + smoltcp Interface
//!                                                      (Medium::Ip, 169.254.169.254/32,
//!                                                       TCP listeners on :80) -> answer()
//! ```
//!
//! # Why a TUN device per instance and a user-space TCP stack
//!
//! Tenants' VPCs may overlap, so two instances on one host can have the same address: a
//! request cannot be attributed to an instance by its source address, and a host socket
//! listening on 169.254.169.254 would see the same (source, destination) from both. Instead
//! every instance gets its own device, created *inside* its namespace, with the route to the
//! metadata address through it: whatever arrives on an instance's device comes from that
//! instance, by construction, and no datapath (eBPF) change, NAT or per-tenant address plan is
//! needed. The agent keeps the device's file descriptor; from then on it is an ordinary fd,
//! usable from any thread, so the agent itself stays in its own namespace.
//!
//! The agent terminates TCP itself with smoltcp on that fd (an IP-medium interface owning
//! 169.254.169.254/32) rather than giving the address to a kernel socket: a kernel socket
//! would have to live in the instance's namespace (one listening socket, hence one thread or
//! namespace switch, per instance) and would answer from the instance's own stack, where
//! root in the instance could interfere with it. With the TUN device the instance's kernel
//! only routes packets to the device; everything behind it is the agent's.
//!
//! The device is not persistent: it exists while the agent holds the fd. If the agent dies the
//! devices (and their routes) disappear with it; the next agent's [`Imds::ensure`] recreates
//! them, deleting any `imds0` it finds first (one left by an agent still exiting, or by an
//! earlier [`Imds`] of the same process), since an instance it does not serve cannot have a
//! device of its own.
//!
//! # The protocol
//!
//! HTTP/1.0 and 1.1, one request per connection (`Connection: close`); see [`http`] for the
//! limits (8 KiB per request) and [`answer`] for the tree and the status codes. IMDSv2 tokens
//! are supported in EC2's *optional* mode: `PUT /latest/api/token` issues one, a request that
//! carries `X-aws-ec2-metadata-token` must carry a live one (401 otherwise), and a request
//! without any token is answered as IMDSv1. Tokens are per instance (each server has its own
//! store) and do not survive an agent restart (the instance's SDK asks for a new one on 401).
//!
//! Bounds per instance: at most 32 TCP sockets (SYNs beyond are reset), each connection
//! aborted 10 s after it started, 1024 live tokens; so an instance cannot pin more than about
//! 1 MiB of the agent's memory or any of its time beyond its own share of the runtime.
//!
//! # What is not watched
//!
//! [`Imds::ensure`] on a served instance only swaps the metadata (and checks that its server is
//! still running: a server stops when its device goes away, e.g. when the namespace is
//! deleted, and the next `ensure` recreates it). If root in the instance deletes only the route,
//! requests stop reaching the agent until the device is recreated; that is the instance's
//! business, as on EC2 where the instance can firewall the address itself.
//!
//! One [`Imds`] per agent: two in one process would take each other's devices.

pub mod http;
pub mod paths;
mod server;
mod tun;

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::{sync::watch, task::JoinHandle};

pub use http::HttpResponse;
pub use paths::{TokenStore, answer};

/// The metadata address.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The name of the metadata device in each instance's namespace.
pub const IMDS_IFNAME: &str = "imds0";

/// What an instance is told about itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceMetadata {
    /// `i-...`.
    pub instance_id: String,
    /// E.g. `t3.micro`.
    pub instance_type: String,
    /// The owning account (`owner-id`, the identity document's `accountId`).
    pub account_id: String,
    /// The instance's private address.
    pub local_ipv4: Ipv4Addr,
    /// The MAC address of `eth0`: `02:..:..`, lowercase.
    pub mac: String,
    /// `ip-10-0-1-4`.
    pub hostname: String,
    /// The names of its security groups.
    pub security_groups: Vec<String>,
    /// The ids of its security groups.
    pub security_group_ids: Vec<String>,
    /// `subnet-...`.
    pub subnet_id: String,
    /// The subnet's CIDR, e.g. `10.0.1.0/24`.
    pub subnet_cidr: String,
    /// `vpc-...`.
    pub vpc_id: String,
    /// The VPC's CIDR.
    pub vpc_cidr: String,
    /// The availability zone.
    pub availability_zone: String,
    /// The host the instance runs on.
    pub host_id: String,
    /// When the instance was launched, RFC 3339 (the identity document's `pendingTime`).
    pub launch_time: String,
    /// The user data, served raw; `None`: 404.
    pub user_data: Option<Vec<u8>>,
}

/// Why an instance could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An `ip` command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// Not called within a tokio runtime (with I/O and time enabled).
    #[error("the metadata service needs a tokio runtime with I/O and time enabled")]
    NoRuntime,
}

/// One served instance.
#[derive(Debug)]
struct Served {
    netns: PathBuf,
    instance_ip: Ipv4Addr,
    meta: watch::Sender<Arc<InstanceMetadata>>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Inner {
    served: Mutex<HashMap<String, Served>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let served = self.served.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, s) in served.drain() {
            s.task.abort();
        }
    }
}

/// The metadata servers of one agent, one per instance, each a tokio task owning its
/// instance's TUN device. Clones share the servers; dropping the last clone stops them all
/// (their devices disappear as their tasks are dropped).
#[derive(Clone, Debug, Default)]
pub struct Imds {
    inner: Arc<Inner>,
}

impl Imds {
    /// No instance served yet.
    pub fn new() -> Imds {
        Imds::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Served>> {
        // A panic while holding the lock leaves a consistent map: only inserts and removes.
        self.inner.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `meta.instance_id` on the device `imds0` in the namespace at `netns_path`
    /// (`/run/netns/<name>`), whose `eth0` holds `instance_ip` (the route's source address).
    ///
    /// Idempotent: if the instance is already served from that namespace and address by a
    /// running server, only the metadata is replaced (the next request sees it) and `Ok(false)`
    /// is returned. Otherwise (first call, server stopped because its device went away,
    /// namespace or address changed) the device and route are (re)created and a server started:
    /// `Ok(true)`. Must be called within a tokio runtime (I/O and time enabled); the setup runs
    /// on a short-lived thread, the server on the runtime.
    ///
    /// Calls for one instance must not overlap; calls for different instances may.
    pub async fn ensure(
        &self,
        netns_path: &Path,
        instance_ip: Ipv4Addr,
        meta: InstanceMetadata,
    ) -> Result<bool, ImdsError> {
        let id = meta.instance_id.clone();
        let meta = Arc::new(meta);
        {
            let mut served = self.lock();
            if let Some(s) = served.get(&id) {
                if !s.task.is_finished() && s.netns == netns_path && s.instance_ip == instance_ip {
                    s.meta.send_if_modified(|current| {
                        let changed = **current != *meta;
                        if changed {
                            *current = Arc::clone(&meta);
                        }
                        changed
                    });
                    return Ok(false);
                }
                if let Some(old) = served.remove(&id) {
                    old.task.abort();
                }
            }
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ImdsError::NoRuntime)?;
        let tun = tun::create(netns_path, instance_ip).await?;
        let (tx, rx) = watch::channel(meta);
        // AsyncFd registration needs the runtime's reactor: inside the task, which runs on it.
        let task_id = id.clone();
        let task = runtime.spawn(async move {
            match server::run(tun.fd, rx).await {
                Ok(()) => tracing::debug!(instance = %task_id, "imds: server stopped"),
                Err(e) => tracing::warn!(instance = %task_id, "imds: server stopped: {e}"),
            }
        });
        tracing::info!(
            instance = %id,
            netns = %netns_path.display(),
            replaced_stale = tun.replaced_stale,
            "imds: serving"
        );
        let previous = self.lock().insert(
            id,
            Served {
                netns: netns_path.to_owned(),
                instance_ip,
                meta: tx,
                task,
            },
        );
        if let Some(p) = previous {
            // An overlapping call for the same instance (not supposed to happen).
            p.task.abort();
        }
        Ok(true)
    }

    /// Stops serving the instance; its device (and route) are gone when this returns. Returns
    /// whether it was served.
    pub async fn remove(&self, instance_id: &str) -> bool {
        let Some(served) = self.lock().remove(instance_id) else {
            return false;
        };
        served.task.abort();
        // Aborted (or already finished): the task, and with it the fd, has been dropped.
        let _ = served.task.await;
        tracing::info!(instance = %instance_id, "imds: stopped serving");
        true
    }

    /// The ids of the instances served, sorted.
    pub fn served(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}
