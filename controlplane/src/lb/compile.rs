//! A plan and the targets' health -> what one host's load-balancer maps must hold.
//!
//! Which targets are in a listener's table (AWS NLB): the healthy ones; when none is
//! healthy, every registered one (fail open). Draining targets are never in a table but
//! keep a backend entry, so their flows continue. A host gets the listeners of the VPCs it
//! runs instances of.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{filter::ipv4_mapped, lb::LbServiceKey};
use serde::{Deserialize, Serialize};

use super::{health::TargetState, plan::LbPlan};

/// A target of a group: (group id, address, port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetKey {
    /// Target group.
    pub group: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
}

/// A target kept after deregistration, until its delay ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draining {
    /// The target's endpoint id (for display).
    pub endpoint: String,
}

/// One backend of a listener as the maps must hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    /// Maglev weight.
    pub weight: u32,
    /// In the table (takes new flows).
    pub in_table: bool,
    /// Draining (keeps its flows, takes no new ones).
    pub draining: bool,
}

/// One listener as the maps must hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// `lb-x:tcp/80`, for logs.
    pub name: String,
    /// Maglev table size.
    pub table_size: u32,
    /// Backends by (address, port).
    pub backends: BTreeMap<(Ipv4Addr, u16), DesiredBackend>,
}

/// One host's load-balancer state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbDesired {
    /// Listeners.
    pub services: BTreeMap<LbServiceKey, DesiredService>,
    /// VIPs to answer and balance: (VNI, VIP).
    pub vips: BTreeSet<(u32, Ipv4Addr)>,
    /// VNIs whose endpoints may receive balanced replies.
    pub client_vnis: BTreeSet<u32>,
}

/// A target's state for display (`vpc lb targets`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Target group.
    pub group: String,
    /// Endpoint id.
    pub endpoint: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// State.
    pub state: TargetState,
    /// Why it is unhealthy (the last failed check), or why it is unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The state of every target: `health` holds the checked ones (initial, healthy,
/// unhealthy); targets of groups no listener uses are unused; `draining` lists the
/// deregistered ones still draining.
pub fn target_states(
    plan: &LbPlan,
    health: &BTreeMap<TargetKey, (TargetState, Option<String>)>,
    draining: &BTreeMap<TargetKey, Draining>,
) -> Vec<TargetStatus> {
    let mut out = Vec::new();
    for g in plan.groups.values() {
        for t in &g.targets {
            let key = TargetKey {
                group: g.id.clone(),
                ip: t.ip,
                port: t.port,
            };
            let (state, reason) = if !g.used {
                (
                    TargetState::Unused,
                    Some("no listener uses the target group".to_owned()),
                )
            } else {
                health
                    .get(&key)
                    .cloned()
                    .unwrap_or((TargetState::Initial, None))
            };
            out.push(TargetStatus {
                group: g.id.clone(),
                endpoint: t.endpoint.clone(),
                ip: t.ip,
                port: t.port,
                state,
                reason,
            });
        }
    }
    for (key, d) in draining {
        out.push(TargetStatus {
            group: key.group.clone(),
            endpoint: d.endpoint.clone(),
            ip: key.ip,
            port: key.port,
            state: TargetState::Draining,
            reason: None,
        });
    }
    out.sort_by(|a, b| (&a.group, a.ip, a.port).cmp(&(&b.group, b.ip, b.port)));
    out
}

/// What the load-balancer maps of a host running instances of `vnis_here` must hold.
pub fn desired(plan: &LbPlan, vnis_here: &BTreeSet<u32>, states: &[TargetStatus]) -> LbDesired {
    let mut out = LbDesired::default();
    let mut by_group: BTreeMap<&str, Vec<&TargetStatus>> = BTreeMap::new();
    for s in states {
        by_group.entry(s.group.as_str()).or_default().push(s);
    }
    for l in &plan.listeners {
        if !vnis_here.contains(&l.vni) {
            continue;
        }
        out.vips.insert((l.vni, l.vip));
        out.client_vnis.insert(l.vni);
        let group = &plan.groups[&l.target_group];
        let weights: BTreeMap<(Ipv4Addr, u16), u32> = group
            .targets
            .iter()
            .map(|t| ((t.ip, t.port), t.weight))
            .collect();
        let members = by_group.get(l.target_group.as_str()).map_or(&[][..], |v| v);
        let any_healthy = members.iter().any(|s| s.state == TargetState::Healthy);
        let mut backends = BTreeMap::new();
        for s in members {
            let draining = s.state == TargetState::Draining;
            let in_table = match s.state {
                TargetState::Healthy => true,
                TargetState::Initial | TargetState::Unhealthy => !any_healthy,
                TargetState::Unused | TargetState::Draining => false,
            };
            if s.state == TargetState::Unused {
                continue;
            }
            backends.insert(
                (s.ip, s.port),
                DesiredBackend {
                    weight: weights.get(&(s.ip, s.port)).copied().unwrap_or(1),
                    in_table,
                    draining,
                },
            );
        }
        out.services.insert(
            LbServiceKey {
                vni: l.vni,
                vip: ipv4_mapped(l.vip.octets()),
                port: l.port,
                proto: l.protocol.number(),
                _pad: 0,
            },
            DesiredService {
                name: l.name(),
                table_size: l.table_size,
                backends,
            },
        );
    }
    out
}
