//! The agent's reconciler: desired state (the state file) -> pinned maps (overlay, security
//! groups, ACLs, conntrack timeouts) and port attachments, level-triggered and idempotent.
//!
//! Every pass compiles the desired state, reads the overlay maps back from the kernel, diffs
//! and applies only the difference (`controlplane::host`), then makes the set of attached
//! ports match the local endpoints. Installed rule sets are read back on the first pass and
//! when the caller asks (every 60 s). A pass that fails (bad document, invalid state) changes nothing: the
//! datapath keeps forwarding with the last good state.

use std::{collections::BTreeMap, path::PathBuf, time::SystemTime};

use controlplane::compute::InstanceNet;

use anyhow::{Context, Result, bail};
use controlplane::{
    datapath::{AttachOutcome, Datapath},
    host::{HostDesired, HostReconciler, LbInput},
    lb::{LbPlan, plan::ProbeNode},
    overlay::statefile::{HostView, StateFile},
};
use tokio::sync::mpsc;

use crate::lb::{CheckResult, LbAgent};
use dataplane_common::overlay::OverlayConfig;
use tracing::{info, warn};

/// Instance networks set up concurrently.
const COMPUTE_PARALLEL: usize = 8;

/// Where the desired state comes from.
#[derive(Debug)]
pub enum Source {
    /// A JSON file, polled.
    File(PathBuf),
    /// Pushed by the control plane: the latest document and its revision (none yet: the
    /// datapath keeps what it has).
    Pushed(Option<Box<(i64, StateFile)>>),
}

/// Reconciles one host's overlay.
pub struct Reconciler {
    source: Source,
    /// Instance namespaces (control-plane mode): the compute agent's networking, and the
    /// specs already in place.
    compute: Option<(
        controlplane::compute::ComputeNet,
        BTreeMap<String, InstanceNet>,
    )>,
    host: String,
    router_mac: [u8; 6],
    underlay: String,
    maps: HostReconciler,
    /// Ports with the port program attached: interface name -> ifindex.
    ports: BTreeMap<String, u32>,
    /// (modification time, length) of the document at the last successful pass.
    seen: Option<(SystemTime, u64)>,
    first: bool,
    /// Map writes of the last pass (0: the kernel already held the desired state).
    pub last_map_changes: usize,
    /// Health checks and draining.
    lb: LbAgent,
    lb_results: Option<mpsc::UnboundedReceiver<CheckResult>>,
    /// The load balancers of the last good pass.
    plan: LbPlan,
    /// The compute and storage agents (control-plane mode).
    workloads: Option<crate::workloads::Workloads>,
    /// What they observed in the last pass.
    pub observed: crate::workloads::Observed,
    /// Load-balancer targets as this host's checks saw them in the last pass.
    pub target_health: Vec<vpc_proto::v1::TargetHealthReport>,
    /// Flow logs: the consumer and the context of the last good pass.
    flow_logs: Option<crate::flowlogs::FlowLogAgent>,
    flow_ctx: Option<controlplane::flowlogs::FlowContext>,
}

impl Reconciler {
    /// A reconciler for `host`, reading `state_path`, encapsulating out of `underlay`.
    pub fn new(
        datapath: &Datapath,
        source: Source,
        compute: Option<(
            controlplane::compute::ComputeNet,
            crate::workloads::Workloads,
        )>,
        host: &str,
        router_mac: [u8; 6],
        underlay: &str,
    ) -> Result<Self> {
        let (compute, workloads) = compute.unzip();
        let mtu = read_mtu(underlay)?.saturating_sub(dataplane_common::overlay::VXLAN_OVERHEAD);
        let (lb, lb_results) =
            LbAgent::new(host, mtu, controlplane::lb::status_path(datapath.layout()));
        Ok(Reconciler {
            lb,
            lb_results: Some(lb_results),
            plan: LbPlan::default(),
            source,
            compute: compute.map(|c| (c, BTreeMap::new())),
            workloads,
            observed: crate::workloads::Observed::default(),
            target_health: Vec::new(),
            flow_logs: None,
            flow_ctx: None,
            last_map_changes: 0,
            host: host.to_owned(),
            router_mac,
            underlay: underlay.to_owned(),
            maps: HostReconciler::open(datapath.layout()).context("opening the datapath maps")?,
            ports: BTreeMap::new(),
            seen: None,
            first: true,
        })
    }

    /// The flow-log counters (none: flow logs are off on this host).
    pub fn flow_log_stats(&self) -> Option<std::sync::Arc<controlplane::flowlogs::FlowLogStats>> {
        self.flow_logs
            .as_ref()
            .map(|f| std::sync::Arc::clone(&f.stats))
    }

    /// Starts feeding the flow-log consumer (with the last pass's context at once).
    pub fn set_flow_logs(&mut self, agent: crate::flowlogs::FlowLogAgent) {
        if let Some(ctx) = &self.flow_ctx {
            agent.update(ctx.clone());
        }
        self.flow_logs = Some(agent);
    }

    /// (modification time, length) of the document, if readable.
    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let Source::File(path) = &self.source else {
            return None;
        };
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// The health-check results (taken once, by the agent's main loop).
    pub fn take_lb_results(&mut self) -> Option<mpsc::UnboundedReceiver<CheckResult>> {
        self.lb_results.take()
    }

    /// Applies a health-check result; returns whether a target changed state (the caller
    /// then runs a pass, which rebuilds the tables).
    pub fn lb_record(&mut self, result: CheckResult) -> bool {
        self.lb.record(&self.plan, result)
    }

    /// Ends the drains whose delay is over; returns whether any did.
    pub fn lb_expire(&mut self) -> bool {
        self.lb.expire(std::time::Instant::now())
    }

    /// The load-balancer maps.
    pub fn lb_maps(&self) -> &controlplane::datapath::LbMaps {
        self.maps.lb_maps()
    }

    /// Whether the document changed since the last successful pass.
    pub fn changed(&self) -> bool {
        if !matches!(self.source, Source::File(_)) {
            return false;
        }
        let stamp = self.stamp();
        stamp != self.seen || stamp.is_none()
    }

    /// One pass (`full`: also read the installed rule sets back from the kernel). Returns
    /// the number of map writes and port changes made.
    /// Sets the pushed desired state (control-plane mode).
    pub fn set_pushed(&mut self, revision: i64, doc: StateFile) {
        self.source = Source::Pushed(Some(Box::new((revision, doc))));
    }

    /// Whether there is a desired state to apply.
    pub fn has_state(&self) -> bool {
        !matches!(self.source, Source::Pushed(None))
    }

    /// The rules behind security-group policy `id`'s rule references (packet traces).
    pub fn sg_rules(&self, id: u32) -> Option<&controlplane::policy::SgRuleIndex> {
        self.maps.sg_rules(id)
    }

    /// The desired-state document being applied.
    pub fn document(&self) -> Result<std::borrow::Cow<'_, StateFile>> {
        match &self.source {
            Source::File(path) => Ok(std::borrow::Cow::Owned(StateFile::load(path)?)),
            // Borrowed: readers between passes (conntrack budgets, traces) need no copy.
            Source::Pushed(Some(pushed)) => Ok(std::borrow::Cow::Borrowed(&pushed.1)),
            Source::Pushed(None) => bail!("no desired state received yet"),
        }
    }

    /// Gives local instances their namespace and veth, removes those no longer desired.
    /// Only what changed is touched, except on the first pass and on `full` passes (every
    /// 60 s), which verify (and repair) every instance's network.
    async fn compute_pass(&mut self, doc: &StateFile, full: bool) -> Result<usize> {
        let verify_all = self.first || full;
        let Some((net, done)) = self.compute.as_mut() else {
            return Ok(0);
        };
        let mtu =
            read_mtu(&self.underlay)?.saturating_sub(dataplane_common::overlay::VXLAN_OVERHEAD);
        let subnets: BTreeMap<&str, ipnetwork::Ipv4Network> = doc
            .subnets
            .iter()
            .map(|s| (s.id.as_str(), s.cidr))
            .collect();
        let failed = self.workloads.as_ref().map(|w| w.failed());
        let mut wanted = BTreeMap::new();
        for e in doc
            .endpoints
            .iter()
            .filter(|e| e.host == self.host)
            .filter(|e| !failed.is_some_and(|f| f.contains_key(&e.id)))
        {
            let (Some(cidr), Some(mac)) = (
                subnets.get(e.subnet.as_str()),
                controlplane::overlay::statefile::parse_mac(&e.mac),
            ) else {
                continue;
            };
            wanted.insert(
                e.id.clone(),
                InstanceNet {
                    instance_id: e.id.clone(),
                    netns: net.netns_name(&e.id),
                    host_ifname: e
                        .ifname
                        .clone()
                        .unwrap_or_else(|| controlplane::compute::host_ifname(&e.id)),
                    mac,
                    ip: e.ip,
                    prefix_len: cidr.prefix(),
                    gateway: controlplane::overlay::model::gateway(*cidr),
                    mtu,
                },
            );
        }
        let mut changes = 0;
        // Several at a time: each is a handful of `ip` invocations, mostly waiting.
        let todo: Vec<InstanceNet> = wanted
            .iter()
            .filter(|(id, spec)| verify_all || done.get(*id) != Some(*spec))
            .map(|(_, spec)| spec.clone())
            .collect();
        for chunk in todo.chunks(COMPUTE_PARALLEL) {
            let mut set = tokio::task::JoinSet::new();
            for spec in chunk {
                let (net, spec) = (net.clone(), spec.clone());
                set.spawn(async move {
                    let r = net.ensure(&spec).await;
                    (spec, r)
                });
            }
            while let Some(joined) = set.join_next().await {
                let (spec, r) = joined.context("instance network task")?;
                match r {
                    Ok(e) => {
                        if e.changed() {
                            changes += 1;
                        }
                        done.insert(spec.instance_id.clone(), spec);
                    }
                    Err(e) => {
                        warn!(instance = %spec.instance_id, error = %e, "creating the instance's network")
                    }
                }
            }
        }
        let existing = if verify_all {
            net.existing().await?
        } else {
            done.keys().cloned().collect()
        };
        for id in existing {
            if !wanted.contains_key(&id) {
                if net.remove(&id).await? {
                    info!(instance = %id, "removed the network of an instance no longer desired");
                    changes += 1;
                }
                done.remove(&id);
            }
        }
        Ok(changes)
    }

    pub async fn reconcile(&mut self, datapath: &mut Datapath, full: bool) -> Result<usize> {
        let started = std::time::Instant::now();
        let result = self.reconcile_pass(datapath, full).await;
        crate::metrics::get().pass(started.elapsed(), result.is_ok());
        result
    }

    async fn reconcile_pass(&mut self, datapath: &mut Datapath, full: bool) -> Result<usize> {
        let stamp = self.stamp();
        let mut doc = self.document()?.into_owned();
        let plan = controlplane::lb::plan(&doc)?;
        let mut compute_changes = match self.workloads.as_mut() {
            Some(w) => w.wind_down(&doc).await,
            None => 0,
        };
        compute_changes += self.compute_pass(&doc, full).await?;
        // Health-check nodes are endpoints like instances: their ports must exist before
        // the view resolves them.
        self.lb.ensure_nodes(&plan).await?;
        doc.endpoints
            .extend(plan.probe_nodes.iter().map(ProbeNode::endpoint_doc));
        let view = doc.host_view(&self.host, |name| nix::net::if_::if_nametoindex(name).ok())?;
        let refs = doc.policy_refs(&view, &self.host);
        let conntrack = doc.conntrack.config()?;
        let HostView {
            state,
            ports: wanted,
            missing,
        } = view;
        for id in &missing {
            warn!(endpoint = %id, "local endpoint has no interface yet; skipped this pass");
        }
        crate::metrics::get().set_topology(&doc, &wanted);
        let Some(me) = state.hosts.iter().find(|h| h.id == self.host) else {
            bail!("host {} is not in the desired state", self.host);
        };
        let config = OverlayConfig {
            vtep: me.vtep.octets(),
            underlay_ifindex: nix::net::if_::if_nametoindex(self.underlay.as_str())
                .with_context(|| format!("underlay interface {}", self.underlay))?,
            underlay_mtu: read_mtu(&self.underlay)?,
        };
        self.lb.update(&plan, self.maps.lb_maps())?;
        let targets = self.lb.statuses(&plan);
        let desired = HostDesired {
            overlay: &state,
            policy: refs.input(&doc.security_groups, &doc.network_acls, &doc.limits),
            conntrack,
            lb: LbInput {
                plan: &plan,
                targets: &targets,
            },
        };
        enable_forwarding(&self.underlay)?;

        let mut changes = compute_changes;
        let report =
            self.maps
                .reconcile(&desired, &self.host, self.router_mac, full || self.first)?;
        changes += report.changes();
        self.last_map_changes = report.changes();
        let flow_ctx = controlplane::flowlogs::FlowContext::build(&doc, &state, &self.host);
        if let Some(f) = &self.flow_logs {
            f.update(flow_ctx.clone());
        }
        self.flow_ctx = Some(flow_ctx);
        if self.maps.overlay_mut().config()? != config {
            self.maps.overlay_mut().set_config(&config)?;
            changes += 1;
        }

        // Ports: attach the program to every local endpoint's veth, detach from the rest.
        if self.first {
            // Ports a previous agent attached and that are no longer wanted.
            for name in pinned_ports(datapath) {
                if !wanted.contains_key(&name) {
                    datapath.detach_port(&name)?;
                    info!(port = %name, "detached a port no longer in the desired state");
                    changes += 1;
                }
            }
        }
        for (name, index) in &wanted {
            if self.ports.get(name) == Some(index) {
                continue;
            }
            let a = datapath
                .attach_port(name)
                .with_context(|| format!("attaching to port {name}"))?;
            let how = match a.outcome {
                AttachOutcome::Attached => "attached",
                AttachOutcome::Replaced => "took over pinned link",
            };
            crate::say(format_args!(
                "{how}: {} on {}, link {} program {}",
                a.program, a.iface, a.link_id, a.program_id
            ));
            self.ports.insert(name.clone(), *index);
            changes += 1;
        }
        let gone: Vec<String> = self
            .ports
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            datapath.detach_port(&name)?;
            self.ports.remove(&name);
            changes += 1;
        }

        if changes > 0 || self.first {
            crate::say(format_args!(
                "overlay: reconciled {changes} changes ({} local ports, {} neighbors, {} security-group policies, {} ACLs, {} listeners, {} backends, {} tables written)",
                report.ports,
                report.neighbors,
                report.installed.0,
                report.installed.1,
                report.lb_installed.0,
                report.lb_installed.1,
                report.lb.tables,
            ));
        }
        if let Some(w) = self.workloads.as_mut() {
            let (n, observed) = w.wind_up(&doc).await;
            changes += n;
            // A failed launch leaves nothing behind: its network goes before it is reported
            // (later passes do not make it again: `compute_pass` skips failed instances).
            if let Some((net, done)) = self.compute.as_mut() {
                for id in w.take_newly_failed() {
                    done.remove(&id);
                    if let Err(e) = net.remove(&id).await {
                        warn!(instance = %id, error = %e, "removing the network of a failed launch");
                    }
                }
            }
            self.observed = observed;
        }
        self.lb.publish(&targets);
        self.target_health = targets
            .iter()
            .map(|t| vpc_proto::v1::TargetHealthReport {
                target_group_id: t.group.clone(),
                target_id: t.endpoint.clone(),
                port: u32::from(t.port),
                state: t.state.name().into(),
                reason: t.reason.clone().unwrap_or_default(),
            })
            .collect();
        crate::metrics::get().set_targets(&self.target_health);
        self.plan = plan;
        self.first = false;
        self.seen = stamp;
        Ok(changes)
    }
}

/// Interfaces with a pinned port-program link under the layout.
fn pinned_ports(datapath: &Datapath) -> Vec<String> {
    let dir = datapath.layout().abi_dir().join("links");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.path()
                .join(dataplane_common::maps::programs::PORT)
                .exists()
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Turns on IPv4 forwarding on the underlay interface: the FIB helper the encapsulation
/// uses to find the underlay next hop refuses interfaces without it
/// (`BPF_FIB_LKUP_RET_FWD_DISABLED`). Nothing else changes: the host's own routing decides
/// nothing for tenant traffic, which never enters the host stack.
fn enable_forwarding(iface: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(&path, "1").with_context(|| format!("writing 1 to {path}"))
}

/// The MTU of `iface` in this process's network namespace. (Not from /sys/class/net: an
/// agent that entered a namespace with setns(2) still sees the /sys of its mount namespace.)
fn read_mtu(iface: &str) -> Result<u32> {
    use nix::libc;
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} is too long");
    }
    // SAFETY: `ifreq` is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the fd is closed by `OwnedFd`.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCGIFMTU");
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into the `ifreq` we pass,
    // which lives across the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFMTU,
            &mut req,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the MTU of {iface}"));
    }
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).with_context(|| format!("MTU of {iface} is {mtu}"))
}
