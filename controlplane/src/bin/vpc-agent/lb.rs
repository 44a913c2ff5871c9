//! The agent's load-balancer side: health-check nodes, health checks, draining.
//!
//! - **Nodes**: for every load-balancer subnet the plan gives this host an address (an AWS
//!   NLB node per zone). The agent wires it like an instance: a network namespace of its own
//!   (`lb::probe::ProbeNs`, owned by a thread, gone with the agent) and a veth whose
//!   host side is a port of the datapath. Health checks therefore reach targets through the
//!   VPC datapath exactly as a client would (security groups, ACLs, overlay included).
//! - **Checks**: one task per (target group, target) sends a TCP or HTTP check every
//!   interval from the node of the group's load-balancer subnet; results drive the target's
//!   [`Tracker`] (thresholds). A state change triggers a reconcile pass, which rebuilds the
//!   affected Maglev tables.
//! - **Draining**: a target that leaves its group is kept as draining (backend entry, no
//!   table slots) for the group's deregistration delay, then removed. A restarted agent
//!   adopts draining backends from the kernel and gives them a fresh delay.
//!
//! The states are written to `controlplane::lb::status_path` for `vpc lb targets`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use controlplane::{
    datapath::LbMaps,
    lb::{
        LbPlan,
        compile::{Draining, TargetKey, TargetStatus, target_states},
        health::{TargetState, Tracker},
        model::HealthCheckProtocol,
        plan::ProbeNode,
        probe::{ProbeKind, ProbeNs, ProbeOutcome, ProbeSpec},
    },
};
use dataplane_common::{lb::LB_BACKEND_DRAINING, overlay::v4};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

/// A check's result for one target.
pub type CheckResult = (TargetKey, u64, Result<(), String>);

/// A local health-check node.
struct Node {
    node: ProbeNode,
    ns: Arc<ProbeNs>,
}

/// A running check task and what it checks (restarted when that changes).
struct Check {
    config: String,
    generation: u64,
    task: JoinHandle<()>,
}

/// Health checks and draining of the targets this host balances to.
pub struct LbAgent {
    host: String,
    mtu: u32,
    nodes: BTreeMap<String, Node>,
    checks: BTreeMap<TargetKey, Check>,
    trackers: BTreeMap<TargetKey, Tracker>,
    draining: BTreeMap<TargetKey, (Draining, Instant)>,
    /// Registered targets of used groups at the last update: key -> (endpoint, delay).
    registered: BTreeMap<TargetKey, (String, Duration)>,
    adopted: bool,
    generation: u64,
    results_tx: mpsc::UnboundedSender<CheckResult>,
    status_path: PathBuf,
    last_status: Vec<TargetStatus>,
}

impl LbAgent {
    /// The load-balancer side of host `host`; instance MTU `mtu`; results arrive on the
    /// returned receiver.
    pub fn new(
        host: &str,
        mtu: u32,
        status_path: PathBuf,
    ) -> (Self, mpsc::UnboundedReceiver<CheckResult>) {
        let (results_tx, rx) = mpsc::unbounded_channel();
        (
            LbAgent {
                host: host.to_owned(),
                mtu,
                nodes: BTreeMap::new(),
                checks: BTreeMap::new(),
                trackers: BTreeMap::new(),
                draining: BTreeMap::new(),
                registered: BTreeMap::new(),
                adopted: false,
                generation: 0,
                results_tx,
                status_path,
                last_status: Vec::new(),
            },
            rx,
        )
    }

    /// Creates and removes this host's health-check nodes to match `plan`. Call before the
    /// reconcile pass that attaches their ports.
    pub async fn ensure_nodes(&mut self, plan: &LbPlan) -> Result<()> {
        let wanted: BTreeMap<&str, &ProbeNode> = plan
            .probe_nodes
            .iter()
            .filter(|n| n.host == self.host)
            .map(|n| (n.endpoint.as_str(), n))
            .collect();
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(id, n)| wanted.get(id.as_str()) != Some(&&n.node))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(n) = self.nodes.remove(&id) {
                // The veth pair goes with either end, the namespace with its thread.
                let _ = ip(&["link", "del", &n.node.ifname]);
                drop(n);
                info!(node = %id, "removed a health-check node");
            }
        }
        for (id, n) in wanted {
            if self.nodes.contains_key(id) {
                continue;
            }
            let ns = ProbeNs::spawn(&format!("lbnode-{}", n.subnet))
                .with_context(|| format!("health-check node {id}: creating its namespace"))?;
            // A veth left over by an earlier agent whose namespace is gone cannot exist (the
            // pair dies with either end), but one created by hand could: replace it.
            let _ = ip(&["link", "del", &n.ifname]);
            let tid = ns.tid().to_string();
            ip(&[
                "link", "add", &n.ifname, "type", "veth", "peer", "name", "eth0", "netns", &tid,
            ])
            .with_context(|| format!("health-check node {id}: creating veth {}", n.ifname))?;
            ip(&["link", "set", &n.ifname, "up"])?;
            ns.configure("eth0", n.mac, n.ip, n.prefix, n.gateway, self.mtu)
                .await
                .with_context(|| format!("health-check node {id}: configuring"))?;
            crate::say(format_args!(
                "health-check node {id}: {} on {} (subnet {})",
                n.ip, n.ifname, n.subnet
            ));
            self.nodes.insert(
                id.to_owned(),
                Node {
                    node: n.clone(),
                    ns: Arc::new(ns),
                },
            );
        }
        Ok(())
    }

    /// Starts, restarts and stops checks to match `plan`; moves deregistered targets to
    /// draining. `maps`: the first call adopts draining backends from the kernel.
    pub fn update(&mut self, plan: &LbPlan, maps: &LbMaps) -> Result<()> {
        let now = Instant::now();
        if !self.adopted {
            self.adopt_draining(plan, maps, now)?;
            self.adopted = true;
        }
        let mut registered = BTreeMap::new();
        let mut wanted_checks = BTreeMap::new();
        for g in plan.groups.values().filter(|g| g.used) {
            // The node of the first listener's subnet on this host checks the group.
            let Some(subnet) = plan
                .listeners
                .iter()
                .find(|l| l.target_group == g.id)
                .map(|l| l.subnet.as_str())
            else {
                continue;
            };
            let node = self
                .nodes
                .values()
                .find(|n| n.node.subnet == subnet)
                .map(|n| n.node.endpoint.clone());
            for t in &g.targets {
                let key = TargetKey {
                    group: g.id.clone(),
                    ip: t.ip,
                    port: t.port,
                };
                registered.insert(key.clone(), (t.endpoint.clone(), g.deregistration_delay));
                if let Some(node) = &node {
                    let h = &g.health;
                    let port = h.port.unwrap_or(t.port);
                    let spec = ProbeSpec {
                        kind: match h.protocol {
                            HealthCheckProtocol::Tcp => ProbeKind::Tcp,
                            HealthCheckProtocol::Http => ProbeKind::Http {
                                path: h.path.clone(),
                            },
                        },
                        timeout: Duration::from_secs_f64(h.timeout_secs()),
                    };
                    let config = format!(
                        "{node} {}:{port} {:?} every {}s thresholds {}/{}",
                        t.ip, spec, h.interval, h.healthy_threshold, h.unhealthy_threshold
                    );
                    wanted_checks.insert(
                        key,
                        (
                            config,
                            node.clone(),
                            SocketAddrV4::new(t.ip, port),
                            spec,
                            Duration::from_secs_f64(h.interval),
                        ),
                    );
                }
            }
        }
        // Deregistered since the last update: drain (a zero delay removes at once).
        for (key, (endpoint, delay)) in &self.registered {
            if !registered.contains_key(key) && !delay.is_zero() {
                info!(group = %key.group, target = %format!("{}:{}", key.ip, key.port), delay = ?delay, "target deregistered: draining");
                self.draining.insert(
                    key.clone(),
                    (
                        Draining {
                            endpoint: endpoint.clone(),
                        },
                        now + *delay,
                    ),
                );
            }
        }
        // Registered again while draining: a new registration (initial).
        self.draining.retain(|k, _| !registered.contains_key(k));
        self.registered = registered;

        self.checks.retain(|k, c| {
            let keep = wanted_checks.get(k).is_some_and(|w| w.0 == c.config);
            if !keep {
                c.task.abort();
            }
            keep
        });
        self.trackers.retain(|k, _| wanted_checks.contains_key(k));
        for (key, (config, node, target, spec, interval)) in wanted_checks {
            if self.checks.contains_key(&key) {
                continue;
            }
            let Some(ns) = self.nodes.get(&node).map(|n| Arc::clone(&n.ns)) else {
                continue;
            };
            self.generation += 1;
            let generation = self.generation;
            // A changed check starts over (initial), as a re-registered target does.
            self.trackers.insert(key.clone(), Tracker::default());
            let tx = self.results_tx.clone();
            let k = key.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let result = match ns.probe(target, &spec).await {
                        ProbeOutcome::Healthy => Ok(()),
                        ProbeOutcome::Unhealthy(reason) => Err(reason),
                    };
                    if tx.send((k.clone(), generation, result)).is_err() {
                        return;
                    }
                }
            });
            self.checks.insert(
                key,
                Check {
                    config,
                    generation,
                    task,
                },
            );
        }
        Ok(())
    }

    /// Backends the kernel holds as draining that the plan no longer registers: drained for
    /// their group's delay from now (the moment they were deregistered died with the
    /// previous agent; a fresh delay never cuts a drain short).
    fn adopt_draining(&mut self, plan: &LbPlan, maps: &LbMaps, now: Instant) -> Result<()> {
        let services = maps.services()?;
        let by_id: BTreeMap<u32, _> = services.iter().map(|(k, v)| (v.id, *k)).collect();
        let registered: BTreeSet<(String, std::net::Ipv4Addr, u16)> = plan
            .groups
            .values()
            .flat_map(|g| g.targets.iter().map(|t| (g.id.clone(), t.ip, t.port)))
            .collect();
        for (_, b) in maps.backends()? {
            if b.state != LB_BACKEND_DRAINING {
                continue;
            }
            let Some(key) = by_id.get(&b.service) else {
                continue;
            };
            let Some(l) = plan.listeners.iter().find(|l| {
                l.vni == key.vni
                    && l.vip.octets() == v4(&key.vip)
                    && l.port == key.port
                    && l.protocol.number() == key.proto
            }) else {
                continue;
            };
            let g = &plan.groups[&l.target_group];
            let ip = std::net::Ipv4Addr::from(v4(&b.addr));
            if registered.contains(&(g.id.clone(), ip, b.port)) || g.deregistration_delay.is_zero()
            {
                continue;
            }
            info!(group = %g.id, target = %format!("{ip}:{}", b.port), "adopted a draining target");
            self.draining.insert(
                TargetKey {
                    group: g.id.clone(),
                    ip,
                    port: b.port,
                },
                (
                    Draining {
                        endpoint: String::new(),
                    },
                    now + g.deregistration_delay,
                ),
            );
        }
        Ok(())
    }

    /// Applies a check result; returns whether a target changed state.
    pub fn record(&mut self, plan: &LbPlan, result: CheckResult) -> bool {
        let (key, generation, outcome) = result;
        if self.checks.get(&key).map(|c| c.generation) != Some(generation) {
            return false;
        }
        let Some(g) = plan.groups.get(&key.group) else {
            return false;
        };
        let Some(t) = self.trackers.get_mut(&key) else {
            return false;
        };
        let failure = outcome.clone().err();
        let changed = t.record(
            outcome,
            g.health.healthy_threshold,
            g.health.unhealthy_threshold,
        );
        if changed {
            crate::say(format_args!(
                "target {}:{} of {}: {}{}",
                key.ip,
                key.port,
                key.group,
                t.state,
                failure.map(|f| format!(" ({f})")).unwrap_or_default()
            ));
        }
        changed
    }

    /// Drops draining targets whose delay ended; returns whether any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.draining.len();
        self.draining.retain(|key, (_, deadline)| {
            let keep = *deadline > now;
            if !keep {
                crate::say(format_args!(
                    "target {}:{} of {}: deregistration delay over, removed",
                    key.ip, key.port, key.group
                ));
            }
            keep
        });
        self.draining.len() != before
    }

    /// Every target's state.
    pub fn statuses(&self, plan: &LbPlan) -> Vec<TargetStatus> {
        let health: BTreeMap<TargetKey, (TargetState, Option<String>)> = self
            .trackers
            .iter()
            .map(|(k, t)| {
                let reason = (t.state == TargetState::Unhealthy)
                    .then(|| t.last_failure.clone())
                    .flatten();
                (k.clone(), (t.state, reason))
            })
            .collect();
        let draining: BTreeMap<TargetKey, Draining> = self
            .draining
            .iter()
            .map(|(k, (d, _))| (k.clone(), d.clone()))
            .collect();
        target_states(plan, &health, &draining)
    }

    /// Writes the states for `vpc lb targets` when they changed.
    pub fn publish(&mut self, statuses: &[TargetStatus]) {
        if statuses == self.last_status.as_slice() {
            return;
        }
        let tmp = self.status_path.with_extension("tmp");
        if let Some(dir) = self.status_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let result = serde_json::to_vec_pretty(statuses)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(std::fs::write(&tmp, text)?))
            .and_then(|()| Ok(std::fs::rename(&tmp, &self.status_path)?));
        match result {
            Ok(()) => self.last_status = statuses.to_vec(),
            Err(e) => {
                warn!(error = %e, path = %self.status_path.display(), "writing target states")
            }
        }
    }
}

/// Runs `ip ARGS` in the agent's namespace.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
