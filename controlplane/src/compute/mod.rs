//! The compute agent's networking: each instance placed on this host gets a network namespace
//! and a veth into the datapath.
//!
//! ```text
//!  agent's namespace                       /run/netns/<prefix><instance id>
//!  host_ifname(id) ("vi" + 13 hex) <-veth-> eth0: MAC, ip/prefix_len, MTU, up
//!    MTU, up, IPv6 off,                      default via gateway, IPv6 off; lo up
//!    alias "vpc-instance:<id>"
//! ```
//!
//! The datapath attaches to the host side and answers ARP for the gateway itself, so nothing
//! else is configured on the host side (no address, no route).
//!
//! The host agent calls [`ComputeNet::ensure`] for every instance it should run and
//! [`ComputeNet::remove`] for every id of [`ComputeNet::existing`] it should not, on each pass of
//! its reconcile loop. Both are level-triggered: they look first (`ip -j`, parsed in `state`),
//! compute the difference (`plan`: a list of [`Action`]s; pure, unit-tested) and run only what
//! it asks for, so a pass over a converged host runs no mutating command. `ensure` looks again
//! after changing anything, until nothing is left to do (at most three rounds of changes).
//!
//! # Namespaces
//!
//! The host side is created in the network namespace of the thread that polls the future
//! (commands start in their spawning thread's namespace): the agent's, which may be a non-root
//! namespace. Named namespaces live under /run/netns, in the mount namespace the agent shares
//! with `ip`. A test that enters a namespace on one thread must poll there (a current-thread
//! tokio runtime).
//!
//! # Ownership and crashes
//!
//! The agent keeps no state of its own: names are derived from instance ids, and the host side
//! carries the id in its alias. An instance's namespace and veth outlive an agent crash or
//! restart (instances keep their network), and the next pass adopts or repairs them. An
//! interrupted `ensure` leaves a prefix of its actions done; the next one finishes the job.
//! The namespace prefix passed to [`ComputeNet::new`] must belong to this agent alone: every
//! namespace with it is taken to be one of this agent's instances.
//!
//! Calls for one instance must not overlap (the reconcile loop runs one at a time); calls for
//! different instances may.

pub mod doc;
mod exec;
pub mod imds;
mod plan;
pub mod runtime;
mod state;
pub mod types;

use std::{io, net::Ipv4Addr};

pub use plan::{Action, host_ifname};
pub use state::RouteState;

use plan::{Step, disable_ipv6_key, owned_by, validate, validate_instance_id, validate_prefix};
use state::{
    InstanceNsState, NetnsState, Observed, ipv6_disabled, parse_default_routes, parse_links,
};

/// The instance's interface name inside its namespace.
pub const INSTANCE_IFNAME: &str = "eth0";

/// How many rounds of changes [`ComputeNet::ensure`] makes before giving up: one is enough
/// unless something else changes the instance's network meanwhile.
const MAX_ROUNDS: usize = 3;

/// The agent's default instance-namespace prefix (`vpc-i-0123456789abcdef0`).
pub const DEFAULT_NETNS_PREFIX: &str = "vpc-";

/// What an instance's network needs, derived from desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceNet {
    /// The instance id, e.g. `i-0a1b2c3d4e5f60718`: 1-64 characters of `[A-Za-z0-9_-]`,
    /// starting with a letter or digit.
    pub instance_id: String,
    /// The namespace name under /run/netns: [`ComputeNet::netns_name`] of the id.
    pub netns: String,
    /// The host-side veth, in the agent's namespace: [`host_ifname`] of the id.
    pub host_ifname: String,
    /// The instance-side (`eth0`) MAC address; unicast.
    pub mac: [u8; 6],
    /// The instance's IPv4 address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length, /1 to /30.
    pub prefix_len: u8,
    /// The subnet's gateway (its `.1`), in the subnet: the instance's default route.
    pub gateway: Ipv4Addr,
    /// The MTU of both veth ends, 68 to 65535.
    pub mtu: u32,
}

/// Why an instance's network could not be set up, removed or listed.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The spec (or prefix, or instance id) is invalid; nothing was run.
    #[error("invalid instance network: {0}")]
    InvalidSpec(String),
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
    /// A command's output could not be understood.
    #[error("cannot parse the output of `{command}`: {reason}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A sysctl could not be read or written.
    #[error("sysctl {key} in {netns}: {source}")]
    Sysctl {
        /// The key, dotted (`net.ipv6.conf.eth0.disable_ipv6`).
        key: String,
        /// The namespace's name, or "the agent's namespace".
        netns: String,
        /// The error.
        #[source]
        source: io::Error,
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
    /// The host-side name of this instance is taken by an interface labelled for another
    /// (a hash collision of two instance ids, see [`host_ifname`]); it was left alone.
    #[error(
        "instance {instance_id}: host interface {ifname} belongs to someone else (alias {alias:?})"
    )]
    HostIfnameTaken {
        /// The interface name.
        ifname: String,
        /// Its alias.
        alias: String,
        /// The instance that wanted the name.
        instance_id: String,
    },
    /// Something kept changing the instance's network back while it was being set up.
    #[error(
        "instance {instance_id}: not converged after {MAX_ROUNDS} rounds, still to do: {remaining:?}"
    )]
    NotConverged {
        /// The instance.
        instance_id: String,
        /// What the last look still asked for.
        remaining: Vec<Action>,
    },
}

/// What [`ComputeNet::ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ensured {
    /// The host-side veth's ifindex (in the agent's namespace), for attaching the datapath.
    pub host_ifindex: u32,
    /// The changes made, in order; empty if everything was already as desired.
    pub applied: Vec<Action>,
}

impl Ensured {
    /// Whether anything was changed.
    pub fn changed(&self) -> bool {
        !self.applied.is_empty()
    }
}

/// The networks of the instances of one agent: namespaces named with its prefix, veths in the
/// namespace of the calling thread.
#[derive(Clone, Debug)]
pub struct ComputeNet {
    prefix: String,
}

impl ComputeNet {
    /// Instances' namespaces are named `netns_prefix` + instance id. The prefix (1-64
    /// characters of `[A-Za-z0-9_-]`, starting with a letter or digit; checked by every call)
    /// must belong to this agent alone, and no other agent's prefix may start with it.
    pub fn new(netns_prefix: &str) -> Self {
        Self {
            prefix: netns_prefix.to_owned(),
        }
    }

    /// The namespace name of an instance: the prefix + the id.
    pub fn netns_name(&self, instance_id: &str) -> String {
        format!("{}{instance_id}", self.prefix)
    }

    /// Creates or repairs an instance's network: the namespace, the veth pair (host side here,
    /// named `spec.host_ifname`; `eth0` in the namespace with the MAC), the MTU of both ends,
    /// `eth0`'s address and default route, both ends and `lo` up, IPv6 off on both ends.
    /// Whatever differs is corrected (a wrong address replaced, a wrong MTU set, a pair whose
    /// ends are not each other's peers recreated, ...); when nothing differs, nothing but
    /// read-only commands runs.
    ///
    /// Fails without running anything if the spec is invalid, and without touching it if the
    /// host-side name belongs to another instance ([`ComputeError::HostIfnameTaken`]).
    pub async fn ensure(&self, spec: &InstanceNet) -> Result<Ensured, ComputeError> {
        validate(&self.prefix, spec)?;
        let mut applied = Vec::new();
        let mut rounds = 0;
        loop {
            let observed = observe(spec).await?;
            let actions = plan::diff(spec, &observed)?;
            if actions.is_empty()
                && let Some(host) = observed.host
            {
                return Ok(Ensured {
                    host_ifindex: host.ifindex,
                    applied,
                });
            }
            if rounds == MAX_ROUNDS {
                return Err(ComputeError::NotConverged {
                    instance_id: spec.instance_id.clone(),
                    remaining: actions,
                });
            }
            for action in actions {
                let step = action.step(spec);
                tracing::info!(instance = %spec.instance_id, %step, "compute: applying");
                exec::run(&step).await?;
                applied.push(action);
            }
            rounds += 1;
        }
    }

    /// Removes an instance's network: the host-side veth (which takes `eth0` with it at once)
    /// and the namespace. Returns whether anything was there to remove; removing a removed
    /// instance runs no mutating command.
    ///
    /// A host-side interface labelled for another instance (a name collision) is left alone.
    /// Processes still inside the namespace keep it alive, without a network, until they exit.
    pub async fn remove(&self, instance_id: &str) -> Result<bool, ComputeError> {
        validate_prefix(&self.prefix)?;
        validate_instance_id(instance_id)?;
        let mut removed = false;
        let ifname = host_ifname(instance_id);
        if let Some(link) = exec::observe_link(&ifname).await? {
            if owned_by(link.alias.as_deref(), instance_id) {
                let step = Step::Ip {
                    netns: None,
                    args: ["link", "del", "dev", &ifname].map(str::to_owned).to_vec(),
                    missing_ok: true,
                };
                tracing::info!(instance = %instance_id, %step, "compute: removing");
                exec::run(&step).await?;
                removed = true;
            } else {
                tracing::warn!(
                    instance = %instance_id,
                    ifname,
                    alias = link.alias.as_deref().unwrap_or_default(),
                    "compute: host interface name belongs to another instance; left alone"
                );
            }
        }
        let netns = self.netns_name(instance_id);
        if exec::netns_state(&netns)? != NetnsState::Missing {
            let args = ["netns", "del", &netns].map(str::to_owned);
            tracing::info!(instance = %instance_id, netns, "compute: removing namespace");
            if let Err(e) = exec::ip(None, &args, false).await {
                // Fine if someone else removed it meanwhile.
                if exec::netns_state(&netns)? != NetnsState::Missing {
                    return Err(e);
                }
            }
            removed = true;
        }
        Ok(removed)
    }

    /// The ids of the instances whose namespace (named with this prefix) exists, sorted: the
    /// agent removes those it no longer wants. Names with the prefix whose rest is not a valid
    /// instance id are skipped.
    pub async fn existing(&self) -> Result<Vec<String>, ComputeError> {
        validate_prefix(&self.prefix)?;
        let mut ids: Vec<String> = exec::netns_names()?
            .into_iter()
            .filter_map(|name| name.strip_prefix(&self.prefix).map(str::to_owned))
            .filter(|id| validate_instance_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// Looks at everything [`plan::diff`] compares: read-only commands only.
async fn observe(spec: &InstanceNet) -> Result<Observed, ComputeError> {
    let netns = exec::netns_state(&spec.netns)?;
    let host = exec::observe_link(&spec.host_ifname).await?;
    let host_ipv6_disabled = match host {
        Some(_) => {
            let key = disable_ipv6_key(&spec.host_ifname);
            ipv6_disabled(exec::sysctl(None, &key, None).await?.as_deref())
        }
        None => false,
    };
    let ns = match netns {
        NetnsState::Present => observe_ns(&spec.netns).await?,
        NetnsState::Missing | NetnsState::Stale => InstanceNsState::default(),
    };
    Ok(Observed {
        netns,
        host,
        host_ipv6_disabled,
        ns,
    })
}

/// Looks inside an instance's namespace.
async fn observe_ns(netns: &str) -> Result<InstanceNsState, ComputeError> {
    let parse_error = |args: &[String], reason| ComputeError::Parse {
        command: format!("ip -n {netns} {}", args.join(" ")),
        reason,
    };
    let args = ["-j", "-d", "addr", "show"].map(str::to_owned);
    let json = exec::ip(Some(netns), &args, false)
        .await?
        .unwrap_or_default();
    let links = parse_links(&json).map_err(|r| parse_error(&args, r))?;
    let lo_up = links.iter().any(|l| l.ifname == "lo" && l.up);
    let eth0 = links.into_iter().find(|l| l.ifname == INSTANCE_IFNAME);
    let eth0_ipv6_disabled = match eth0 {
        Some(_) => {
            let key = disable_ipv6_key(INSTANCE_IFNAME);
            ipv6_disabled(exec::sysctl(Some(netns), &key, None).await?.as_deref())
        }
        None => false,
    };
    let args = ["-j", "-4", "route", "show", "table", "main"].map(str::to_owned);
    let json = exec::ip(Some(netns), &args, false)
        .await?
        .unwrap_or_default();
    let default_routes = parse_default_routes(&json).map_err(|r| parse_error(&args, r))?;
    Ok(InstanceNsState {
        lo_up,
        eth0,
        eth0_ipv6_disabled,
        default_routes,
    })
}
