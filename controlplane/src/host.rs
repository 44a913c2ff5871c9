//! One host's maps from the desired state: overlay and policy together, level-triggered.
//!
//! A pass compiles the overlay ([`crate::overlay::compile`]) and the policy
//! ([`crate::policy::compile`]), installs any new rule sets under fresh ids
//! ([`PolicySync`]), fills the endpoints' policy and ACL ids in, diffs the overlay against
//! the kernel and applies the difference (which switches endpoints to new ids), then removes
//! rule sets retired by an earlier pass that no endpoint uses any more. Load balancers are
//! synced before the overlay diff (listeners exist before their VIPs are answered). A pass that fails
//! validation changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::{conntrack::CtConfig, filter::ipv4_mapped, overlay::EP_LB_CLIENT};

use crate::{
    datapath::{
        DatapathError, LbMaps, LbSync, OverlayMaps, PinLayout, PolicyMaps,
        lb_maps::{LbReport, LbSyncError},
        policy_sync::{PolicySync, PolicySyncError},
    },
    lb::{
        LbPlan,
        compile::{TargetStatus, desired as lb_desired},
    },
    overlay::{CompileError, NeighborEntry, OverlayState, compile, diff},
    policy::{
        SgRuleIndex,
        compile::{PolicyError, PolicyInput, compile as compile_policy},
    },
};

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The overlay is invalid.
    #[error("overlay: {0}")]
    Overlay(#[from] CompileError),
    /// The security groups or ACLs are invalid.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// Installing rule sets failed.
    #[error("installing policy: {0}")]
    Sync(#[from] PolicySyncError),
    /// A map operation failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// Installing load balancers failed.
    #[error("load balancers: {0}")]
    Lb(#[from] LbSyncError),
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Overlay map writes.
    pub overlay_ops: usize,
    /// Rule sets (policies, ACLs) written.
    pub rule_sets_written: usize,
    /// Rule sets removed.
    pub rule_sets_removed: usize,
    /// Whether the conntrack timeouts were rewritten.
    pub conntrack_config: bool,
    /// Local ports.
    pub ports: usize,
    /// Neighbors.
    pub neighbors: usize,
    /// Security-group policies and ACLs installed.
    pub installed: (usize, usize),
    /// Load-balancer map changes.
    pub lb: LbReport,
    /// Listeners and backends installed.
    pub lb_installed: (usize, usize),
}

impl Report {
    /// Total writes and removals.
    pub fn changes(&self) -> usize {
        self.overlay_ops
            + self.rule_sets_written
            + self.rule_sets_removed
            + usize::from(self.conntrack_config)
            + self.lb.changes()
    }
}

/// One host's desired state.
#[derive(Clone, Copy, Debug)]
pub struct HostDesired<'a> {
    /// The overlay, local endpoints with their ifindex.
    pub overlay: &'a OverlayState,
    /// Security groups, ACLs and memberships (cluster-wide).
    pub policy: PolicyInput<'a>,
    /// Conntrack timeouts.
    pub conntrack: CtConfig,
    /// Load balancers and their targets' states.
    pub lb: LbInput<'a>,
}

/// The load balancers of the desired state: the plan and every target's state.
#[derive(Clone, Copy, Debug)]
pub struct LbInput<'a> {
    /// The plan (cluster-wide).
    pub plan: &'a LbPlan,
    /// Target states as this host's health checks see them.
    pub targets: &'a [TargetStatus],
}

/// The maps of one host and the ids installed in them.
#[derive(Debug)]
pub struct HostReconciler {
    overlay: OverlayMaps,
    policy: PolicyMaps,
    sync: PolicySync,
    synced: bool,
    lb: LbMaps,
    lb_sync: LbSync,
    /// What the rule references of each installed security-group policy id stand for
    /// (flow logs and traces name rules with it); kept while the id is installed.
    sg_rules: BTreeMap<u32, SgRuleIndex>,
}

impl HostReconciler {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, ReconcileError> {
        Ok(HostReconciler {
            overlay: OverlayMaps::open(layout)?,
            policy: PolicyMaps::open(layout)?,
            sync: PolicySync::new(),
            synced: false,
            lb: LbMaps::open(layout)?,
            lb_sync: LbSync::new(),
            sg_rules: BTreeMap::new(),
        })
    }

    /// The overlay maps (configuration, reads).
    pub fn overlay_mut(&mut self) -> &mut OverlayMaps {
        &mut self.overlay
    }

    /// The policy maps (conntrack, counters).
    pub fn policy_maps(&self) -> &PolicyMaps {
        &self.policy
    }

    /// The rules behind the `SG_PORT` references of security-group policy `id` (an
    /// `Endpoint::policy`), while it is installed.
    pub fn sg_rules(&self, id: u32) -> Option<&SgRuleIndex> {
        self.sg_rules.get(&id)
    }

    /// The load-balancer maps (flows, GC).
    pub fn lb_maps(&self) -> &LbMaps {
        &self.lb
    }

    /// One pass for host `host` (VPC router MAC `router_mac`). `full`: read the installed
    /// rule sets back from the kernel first (always done on the first pass).
    pub fn reconcile(
        &mut self,
        desired: &HostDesired<'_>,
        host: &str,
        router_mac: [u8; 6],
        full: bool,
    ) -> Result<Report, ReconcileError> {
        // Validate everything before writing anything.
        let mut maps = compile(desired.overlay, host, router_mac)?;
        let compiled = compile_policy(&desired.policy)?;

        let mut report = Report::default();
        if self.policy.ct_config()? != desired.conntrack {
            self.policy.set_ct_config(&desired.conntrack)?;
            report.conntrack_config = true;
        }
        if full || !self.synced {
            self.sync.resync(&self.policy)?;
            self.synced = true;
        }
        let (ids, written) = self.sync.install(&mut self.policy, &compiled)?;
        report.rule_sets_written = written;
        for (key, id) in &ids.sg {
            if let Some(index) = compiled.sg_rules.get(key) {
                self.sg_rules.insert(*id, index.clone());
            }
        }
        for ep in &desired.overlay.endpoints {
            let (Some(ifindex), Some(p)) = (ep.ifindex, compiled.endpoints.get(&ep.id)) else {
                continue;
            };
            if ep.host != host {
                continue;
            }
            if let Some(entry) = maps.endpoints.get_mut(&ifindex) {
                entry.policy = ids.sg.get(&p.sg_set).copied().unwrap_or(0);
                entry.acl = p
                    .acl
                    .as_ref()
                    .and_then(|a| ids.acl.get(a).copied())
                    .unwrap_or(0);
            }
        }
        // Load balancers: VIPs are neighbors answered by the router, clients' endpoints look
        // up reverse NAT. Listeners are installed before their VIP appears.
        let lb = lb_desired(desired.lb.plan, &maps.vnis, desired.lb.targets);
        for (vni, vip) in &lb.vips {
            maps.neighbors.insert(
                (*vni, ipv4_mapped(vip.octets())),
                NeighborEntry::LoadBalancer { mac: router_mac },
            );
        }
        for e in maps.endpoints.values_mut() {
            if lb.client_vnis.contains(&e.vni) {
                e.flags |= EP_LB_CLIENT;
            }
        }
        report.lb = self.lb_sync.sync(&mut self.lb, &lb, full)?;
        report.lb_installed = self.lb_sync.counts();

        let actual = self.overlay.read()?;
        let ops = diff(&actual, &maps);
        self.overlay.apply(&ops)?;
        report.overlay_ops = ops.len();

        let in_use_sg: BTreeSet<u32> = maps.endpoints.values().map(|e| e.policy).collect();
        let in_use_acl: BTreeSet<u32> = maps.endpoints.values().map(|e| e.acl).collect();
        report.rule_sets_removed = self
            .sync
            .collect(&mut self.policy, &in_use_sg, &in_use_acl)?;
        let sync = &self.sync;
        self.sg_rules.retain(|id, _| sync.is_sg_installed(*id));
        report.ports = maps.endpoints.len();
        report.neighbors = maps.neighbors.len();
        report.installed = self.sync.counts();
        Ok(report)
    }
}
