//! Per-VPC conntrack budgets: one tenant cannot fill this host's conntrack table (an LRU:
//! a full table evicts the oldest flows of every VPC) and break the others' connections.
//!
//! Each VPC with instances here may hold `share` percent of the table (`CT_BUDGET[vni].limit`,
//! enforced by the datapath on insert: `ct_budget_exceeded`); the share is the VPC's
//! `conntrack_share_percent` or the agent's `--conntrack-vpc-share`; 100 means no budget
//! (no entry). The conntrack GC (`PolicyMaps::ct_sweep`) writes the recounted live entries of
//! each budgeted VPC back (`count`: the datapath only ever adds) and ranks per VPC the
//! sources holding entries and the flows that carried the most bytes; the agent reports
//! them (`vpc conntrack top`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result};
use controlplane::{
    datapath::{
        PolicyMaps,
        policy_maps::{CtSummary, TopFlow},
    },
    overlay::statefile::StateFile,
};
use dataplane_common::conntrack::CtBudget;
use vpc_proto::v1 as pb;

/// Top sources and top flows reported per VPC: what the GC keeps
/// (`policy_maps::TOP_N`).
pub use controlplane::datapath::policy_maps::TOP_N;

/// VNI -> entry limit for the VPCs with instances on `host`. `default_share` (the agent's
/// `--conntrack-vpc-share`, set by the operator) applies to VPCs without their own share and
/// is also the ceiling: a VPC's own share (an attribute its tenant sets) can only lower its
/// budget, never raise it or remove it, or one tenant could take the whole table back. At a
/// default of 100 % only VPCs that asked for less have a budget.
pub fn limits(
    doc: &StateFile,
    host: &str,
    default_share: u8,
    conntrack_max: u32,
) -> BTreeMap<u32, u32> {
    let vni_of: BTreeMap<&str, u32> = doc.vpcs.iter().map(|v| (v.id.as_str(), v.vni)).collect();
    let vpc_of: BTreeMap<&str, &str> = doc
        .subnets
        .iter()
        .map(|s| (s.id.as_str(), s.vpc.as_str()))
        .collect();
    let here: BTreeSet<u32> = doc
        .endpoints
        .iter()
        .filter(|e| e.host == host)
        .filter_map(|e| vpc_of.get(e.subnet.as_str()))
        .filter_map(|vpc| vni_of.get(vpc).copied())
        .collect();
    here.into_iter()
        .filter_map(|vni| {
            let share = doc
                .conntrack_shares
                .get(&vni)
                .copied()
                .unwrap_or(default_share)
                .clamp(1, 100)
                .min(default_share);
            (share < 100).then(|| (vni, limit(share, conntrack_max)))
        })
        .collect()
}

/// `share` percent of `conntrack_max`, at least 1 entry.
pub fn limit(share: u8, conntrack_max: u32) -> u32 {
    ((u64::from(conntrack_max) * u64::from(share)) / 100).max(1) as u32
}

/// The map writes that make `current` hold `wanted` limits: (vni, value to write) and VNIs
/// to delete. A changed limit keeps the current count.
pub fn plan(
    current: &BTreeMap<u32, CtBudget>,
    wanted: &BTreeMap<u32, u32>,
) -> (Vec<(u32, CtBudget)>, Vec<u32>) {
    let puts = wanted
        .iter()
        .filter(|(vni, limit)| current.get(vni).map(|b| b.limit) != Some(**limit))
        .map(|(vni, limit)| {
            let count = current.get(vni).map(|b| b.count).unwrap_or(0);
            (
                *vni,
                CtBudget {
                    limit: *limit,
                    count,
                },
            )
        })
        .collect();
    let deletes = current
        .keys()
        .filter(|vni| !wanted.contains_key(vni))
        .copied()
        .collect();
    (puts, deletes)
}

fn v4(a: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(a[12], a[13], a[14], a[15])
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// A top flow as reported: the source is the side that opened it.
fn top_flow(f: &TopFlow) -> pb::CtTopFlow {
    let k = &f.key;
    let (src, sp, dst, dp) = if k.lo_addr == f.opener {
        (k.lo_addr, k.lo_port, k.hi_addr, k.hi_port)
    } else {
        (k.hi_addr, k.hi_port, k.lo_addr, k.lo_port)
    };
    pb::CtTopFlow {
        protocol: proto_name(k.proto),
        src: v4(&src).to_string(),
        src_port: u32::from(sp),
        dst: v4(&dst).to_string(),
        dst_port: u32::from(dp),
        packets: f.packets,
        bytes: f.bytes,
    }
}

/// The report's conntrack summary: per VNI its live flows, budget, top sources and flows
/// (at most [`TOP_N`] each) and the new flows its budget refused.
pub fn summary(
    s: &CtSummary,
    budgets: &BTreeMap<u32, CtBudget>,
    budget_drops: &BTreeMap<u32, u64>,
) -> pb::ConntrackSummary {
    let vnis: BTreeSet<u32> = s.per_vni.keys().chain(budgets.keys()).copied().collect();
    pb::ConntrackSummary {
        entries: s.entries as u64,
        capacity: u64::from(s.capacity),
        per_vni: vnis
            .into_iter()
            .map(|vni| {
                let b = budgets.get(&vni).copied().unwrap_or_default();
                pb::VniFlows {
                    vni,
                    flows: s.per_vni.get(&vni).copied().unwrap_or(0) as u64,
                    vpc_id: String::new(),
                    budget_limit: u64::from(b.limit),
                    budget_count: u64::from(b.count),
                    top_sources: s
                        .top_sources
                        .get(&vni)
                        .into_iter()
                        .flatten()
                        .take(TOP_N)
                        .map(|(a, n)| pb::CtTopSource {
                            address: v4(a).to_string(),
                            flows: *n as u64,
                        })
                        .collect(),
                    top_flows: s
                        .top_flows
                        .get(&vni)
                        .into_iter()
                        .flatten()
                        .take(TOP_N)
                        .map(top_flow)
                        .collect(),
                    budget_drops: budget_drops.get(&vni).copied().unwrap_or(0),
                }
            })
            .collect(),
    }
}

/// Local port ifindex -> VNI of its endpoint (`ifindex` resolves a port's name).
pub fn port_vnis(
    doc: &StateFile,
    host: &str,
    ifindex: impl Fn(&str) -> Option<u32>,
) -> BTreeMap<u32, u32> {
    let vni_of: BTreeMap<&str, u32> = doc.vpcs.iter().map(|v| (v.id.as_str(), v.vni)).collect();
    let vpc_of: BTreeMap<&str, &str> = doc
        .subnets
        .iter()
        .map(|s| (s.id.as_str(), s.vpc.as_str()))
        .collect();
    doc.endpoints
        .iter()
        .filter(|e| e.host == host)
        .filter_map(|e| {
            let vni = vni_of.get(vpc_of.get(e.subnet.as_str())?)?;
            let name = e
                .ifname
                .clone()
                .unwrap_or_else(|| controlplane::compute::host_ifname(&e.id));
            Some((ifindex(&name)?, *vni))
        })
        .collect()
}

/// Packets dropped as `ct_budget_exceeded` per VNI, from the per-port drop counters.
pub fn drops_per_vni(
    drops: &BTreeMap<(u32, u32), dataplane_common::stats::Counter>,
    port_vni: &BTreeMap<u32, u32>,
) -> BTreeMap<u32, u64> {
    let reason = dataplane_common::DropReason::CtBudgetExceeded as u32;
    let mut out = BTreeMap::new();
    for ((port, r), c) in drops {
        if *r == reason
            && let Some(vni) = port_vni.get(port)
        {
            *out.entry(*vni).or_default() += c.packets;
        }
    }
    out
}

/// Makes `CT_BUDGET` hold the budgets of `doc`'s VPCs on `host` (`live`: entries per VNI at
/// the last GC); returns the writes made.
pub fn apply(
    maps: &PolicyMaps,
    doc: &StateFile,
    host: &str,
    default_share: u8,
    capacity: u32,
    live: &BTreeMap<u32, usize>,
) -> Result<usize> {
    let wanted = limits(doc, host, default_share, capacity);
    let (puts, deletes) = plan(&maps.ct_budgets()?, &wanted);
    let n = puts.len() + deletes.len();
    for (vni, b) in puts {
        // A new budget starts from the VPC's live entries at the last GC.
        let count = if b.count == 0 {
            live.get(&vni).copied().unwrap_or(0) as u32
        } else {
            b.count
        };
        maps.set_ct_budget(vni, b.limit, count)
            .with_context(|| format!("setting the conntrack budget of VNI {vni}"))?;
    }
    for vni in deletes {
        maps.remove_ct_budget(vni)
            .with_context(|| format!("removing the conntrack budget of VNI {vni}"))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> StateFile {
        serde_json::from_value(serde_json::json!({
            "vpcs": [{"id": "vpc-a", "vni": 7, "cidr": "10.0.0.0/16"},
                     {"id": "vpc-b", "vni": 8, "cidr": "10.0.0.0/16"},
                     {"id": "vpc-c", "vni": 9, "cidr": "10.0.0.0/16"},
                     {"id": "vpc-d", "vni": 10, "cidr": "10.0.0.0/16"}],
            "subnets": [{"id": "s-a", "vpc": "vpc-a", "cidr": "10.0.1.0/24"},
                        {"id": "s-b", "vpc": "vpc-b", "cidr": "10.0.1.0/24"},
                        {"id": "s-c", "vpc": "vpc-c", "cidr": "10.0.1.0/24"},
                        {"id": "s-d", "vpc": "vpc-d", "cidr": "10.0.1.0/24"}],
            "hosts": [{"id": "h1", "vtep": "192.0.2.1"}, {"id": "h2", "vtep": "192.0.2.2"}],
            "endpoints": [
                {"id": "i-a", "subnet": "s-a", "host": "h1", "ip": "10.0.1.4", "mac": "02:00:00:00:00:01"},
                {"id": "i-b", "subnet": "s-b", "host": "h1", "ip": "10.0.1.4", "mac": "02:00:00:00:00:02"},
                {"id": "i-c", "subnet": "s-c", "host": "h1", "ip": "10.0.1.4", "mac": "02:00:00:00:00:03"},
                {"id": "i-d", "subnet": "s-d", "host": "h2", "ip": "10.0.1.4", "mac": "02:00:00:00:00:04"}
            ],
            "conntrack_shares": {"7": 10, "9": 100}
        }))
        .unwrap()
    }

    #[test]
    fn limits_cover_the_hosts_vpcs_with_their_share_or_the_default() {
        // vpc-a: its own 10 %; vpc-b: the default 50 %; vpc-c asks for 100 % (no budget) but
        // a tenant cannot go above the operator's default; vpc-d: not on this host.
        assert_eq!(
            limits(&doc(), "h1", 50, 1000),
            BTreeMap::from([(7, 100), (8, 500), (9, 500)])
        );
        assert_eq!(limits(&doc(), "h1", 100, 1000), BTreeMap::from([(7, 100)]));
        assert_eq!(limits(&doc(), "h2", 50, 1000), BTreeMap::from([(10, 500)]));
        assert_eq!(limit(1, 10), 1, "at least one entry");
    }

    #[test]
    fn plan_writes_changed_limits_keeping_counts_and_removes_stale_vpcs() {
        let current = BTreeMap::from([
            (
                7,
                CtBudget {
                    limit: 100,
                    count: 42,
                },
            ),
            (
                8,
                CtBudget {
                    limit: 300,
                    count: 5,
                },
            ),
            (11, CtBudget { limit: 9, count: 1 }),
        ]);
        let wanted = BTreeMap::from([(7, 100), (8, 500), (12, 50)]);
        let (puts, deletes) = plan(&current, &wanted);
        assert_eq!(
            puts,
            vec![
                (
                    8,
                    CtBudget {
                        limit: 500,
                        count: 5
                    }
                ),
                (
                    12,
                    CtBudget {
                        limit: 50,
                        count: 0
                    }
                )
            ]
        );
        assert_eq!(deletes, vec![11]);
        assert_eq!(
            plan(
                &current,
                &current.iter().map(|(k, v)| (*k, v.limit)).collect()
            ),
            (vec![], vec![])
        );
    }

    #[test]
    fn summary_joins_counts_budgets_tops_and_drops() {
        let m = dataplane_common::filter::ipv4_mapped;
        let flooder = m([10, 0, 1, 9]);
        let key = dataplane_common::conntrack::CtKey {
            vni: 7,
            lo_addr: m([10, 0, 1, 5]),
            hi_addr: flooder,
            lo_port: 53,
            hi_port: 1000,
            proto: 17,
            ..Default::default()
        };
        let s = CtSummary {
            entries: 30,
            capacity: 1000,
            per_vni: BTreeMap::from([(7, 21), (8, 1)]),
            top_sources: BTreeMap::from([(7, vec![(flooder, 20), (m([10, 0, 1, 4]), 1)])]),
            top_flows: BTreeMap::from([(
                7,
                vec![TopFlow {
                    key,
                    opener: flooder,
                    packets: 3,
                    bytes: 180,
                }],
            )]),
            ..Default::default()
        };
        let budgets = BTreeMap::from([
            (
                7,
                CtBudget {
                    limit: 20,
                    count: 21,
                },
            ),
            (9, CtBudget { limit: 5, count: 0 }),
        ]);
        let r = summary(&s, &budgets, &BTreeMap::from([(7, 4)]));
        let rows: Vec<(u32, u64, u64, u64, u64)> = r
            .per_vni
            .iter()
            .map(|v| {
                (
                    v.vni,
                    v.flows,
                    v.budget_limit,
                    v.budget_count,
                    v.budget_drops,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![(7, 21, 20, 21, 4), (8, 1, 0, 0, 0), (9, 0, 5, 0, 0)]
        );
        let a = &r.per_vni[0];
        assert_eq!(
            (a.top_sources[0].address.as_str(), a.top_sources[0].flows),
            ("10.0.1.9", 20)
        );
        let f = &a.top_flows[0];
        // The opener (the hi side here) is the source.
        assert_eq!(
            (
                f.protocol.as_str(),
                f.src.as_str(),
                f.src_port,
                f.dst.as_str(),
                f.dst_port
            ),
            ("udp", "10.0.1.9", 1000, "10.0.1.5", 53)
        );
    }

    #[test]
    fn budget_drops_are_summed_per_vpc_from_port_counters() {
        let reason = dataplane_common::DropReason::CtBudgetExceeded as u32;
        let c = |packets| dataplane_common::stats::Counter { packets, bytes: 0 };
        let drops = BTreeMap::from([
            ((11, reason), c(5)),
            ((12, reason), c(2)),
            ((11, dataplane_common::DropReason::SgIngress as u32), c(9)),
            ((99, reason), c(1)),
        ]);
        let ports = BTreeMap::from([(11, 7), (12, 7), (13, 8)]);
        assert_eq!(drops_per_vni(&drops, &ports), BTreeMap::from([(7, 7)]));
    }
}
