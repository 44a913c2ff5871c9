//! Per-VPC conntrack budgets: one tenant cannot fill this host's conntrack table (an LRU:
//! a full table evicts the oldest flows of every VPC) and break the others' connections.
//!
//! Each VPC with instances here may hold `share` percent of the table (`CT_BUDGET[vni].limit`,
//! enforced by the datapath on insert: `ct_budget_exceeded`); the share is the VPC's
//! `conntrack_share_percent` or the agent's `--conntrack-vpc-share`; 100 means no budget
//! (no entry). After each conntrack GC the agent writes the recounted live entries of each
//! budgeted VPC (`count`: the datapath only ever adds, so evictions and expiries are
//! corrected here), and reports per VPC the usage, the top sources holding entries and the
//! flows that carried the most bytes (`vpc flows top`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use controlplane::{datapath::PinLayout, overlay::statefile::StateFile};
use dataplane_common::{
    conntrack::{CT_OPENED_BY_LO, CtBudget, CtEntry, CtKey},
    maps::CT_BUDGET,
};
use vpc_proto::v1 as pb;

/// Top sources and top flows reported per VPC.
pub const TOP_N: usize = 5;

/// VNI -> entry limit for the VPCs with instances on `host` (VPCs at 100 % are absent: no
/// budget). `default_share` applies to VPCs without their own share.
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
                .clamp(1, 100);
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

/// Who holds a VPC's conntrack entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Top {
    /// (address, flows) by flows, most first.
    pub sources: Vec<(Ipv4Addr, u64)>,
    /// The flows that carried the most bytes.
    pub flows: Vec<pb::CtTopFlow>,
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

/// Per VNI, the sources that opened the most live flows and the flows with the most bytes
/// (the opener is the source: `CT_OPENED_BY_LO` says which side of the canonical key).
pub fn top(entries: &[(CtKey, CtEntry)], n: usize) -> BTreeMap<u32, Top> {
    let mut sources: BTreeMap<u32, BTreeMap<Ipv4Addr, u64>> = BTreeMap::new();
    let mut flows: BTreeMap<u32, Vec<(&CtKey, &CtEntry)>> = BTreeMap::new();
    for (k, e) in entries {
        let opener = if e.flags & CT_OPENED_BY_LO != 0 {
            k.lo_addr
        } else {
            k.hi_addr
        };
        *sources
            .entry(k.vni)
            .or_default()
            .entry(v4(&opener))
            .or_default() += 1;
        flows.entry(k.vni).or_default().push((k, e));
    }
    let mut out = BTreeMap::new();
    for (vni, per_source) in sources {
        let mut s: Vec<(Ipv4Addr, u64)> = per_source.into_iter().collect();
        s.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        s.truncate(n);
        let mut f = flows.remove(&vni).unwrap_or_default();
        f.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
        f.truncate(n);
        let flows = f
            .into_iter()
            .map(|(k, e)| {
                let lo_opened = e.flags & CT_OPENED_BY_LO != 0;
                let (src, sp, dst, dp) = if lo_opened {
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
                    packets: e.packets,
                    bytes: e.bytes,
                }
            })
            .collect();
        out.insert(vni, Top { sources: s, flows });
    }
    out
}

/// The report's conntrack summary: per VNI its live flows, budget, top sources and flows.
pub fn summary(
    entries: u64,
    capacity: u64,
    per_vni: &BTreeMap<u32, usize>,
    budgets: &BTreeMap<u32, CtBudget>,
    top: &BTreeMap<u32, Top>,
    budget_drops: &BTreeMap<u32, u64>,
) -> pb::ConntrackSummary {
    let vnis: BTreeSet<u32> = per_vni.keys().chain(budgets.keys()).copied().collect();
    pb::ConntrackSummary {
        entries,
        capacity,
        per_vni: vnis
            .into_iter()
            .map(|vni| {
                let b = budgets.get(&vni).copied().unwrap_or_default();
                let t = top.get(&vni).cloned().unwrap_or_default();
                pb::VniFlows {
                    vni,
                    flows: per_vni.get(&vni).copied().unwrap_or(0) as u64,
                    vpc_id: String::new(),
                    budget_limit: u64::from(b.limit),
                    budget_count: u64::from(b.count),
                    top_sources: t
                        .sources
                        .iter()
                        .map(|(a, n)| pb::CtTopSource {
                            address: a.to_string(),
                            flows: *n,
                        })
                        .collect(),
                    top_flows: t.flows,
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

/// The pinned `CT_BUDGET` map and the agent's defaults.
pub struct Budgets {
    map: HashMap<MapData, u32, CtBudget>,
    /// `--conntrack-vpc-share`.
    pub default_share: u8,
    /// The conntrack table's capacity.
    pub conntrack_max: u32,
}

impl Budgets {
    /// Opens the pinned map.
    pub fn open(layout: &PinLayout, default_share: u8, conntrack_max: u32) -> Result<Budgets> {
        let data = MapData::from_pin(layout.map(CT_BUDGET))
            .with_context(|| format!("opening the pinned {CT_BUDGET} map"))?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data))
            .with_context(|| format!("{CT_BUDGET} is not a hash of u32 -> CtBudget"))?;
        Ok(Budgets {
            map,
            default_share,
            conntrack_max,
        })
    }

    /// What the map holds.
    pub fn read(&self) -> BTreeMap<u32, CtBudget> {
        self.map.iter().filter_map(|r| r.ok()).collect()
    }

    /// Makes the map hold the budgets of `doc`'s VPCs on `host`; returns the writes made.
    pub fn apply(&mut self, doc: &StateFile, host: &str) -> Result<usize> {
        let wanted = limits(doc, host, self.default_share, self.conntrack_max);
        let (puts, deletes) = plan(&self.read(), &wanted);
        let n = puts.len() + deletes.len();
        for (vni, b) in puts {
            self.map
                .insert(vni, b, 0)
                .with_context(|| format!("writing {CT_BUDGET}[{vni}]"))?;
        }
        for vni in deletes {
            // Gone already is done.
            let _ = self.map.remove(&vni);
        }
        Ok(n)
    }

    /// Writes the GC's recount of live entries into each budget (the datapath only adds).
    pub fn recount(&mut self, per_vni: &BTreeMap<u32, usize>) {
        for (vni, b) in self.read() {
            let count = per_vni.get(&vni).copied().unwrap_or(0) as u32;
            if b.count != count {
                let _ = self.map.insert(vni, CtBudget { count, ..b }, 0);
            }
        }
    }
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
        // vpc-a: its own 10 %; vpc-b: the default 50 %; vpc-c: 100 % = no budget; vpc-d: not
        // on this host.
        assert_eq!(
            limits(&doc(), "h1", 50, 1000),
            BTreeMap::from([(7, 100), (8, 500)])
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

    fn entry(
        vni: u32,
        a: [u8; 4],
        ap: u16,
        b: [u8; 4],
        bp: u16,
        lo_opened: bool,
        bytes: u64,
    ) -> (CtKey, CtEntry) {
        let m = |x: [u8; 4]| {
            let mut v = [0u8; 16];
            v[10] = 0xff;
            v[11] = 0xff;
            v[12..].copy_from_slice(&x);
            v
        };
        let key = CtKey {
            vni,
            lo_addr: m(a),
            hi_addr: m(b),
            lo_port: ap,
            hi_port: bp,
            proto: 17,
            _pad: [0; 3],
        };
        let e = CtEntry {
            flags: if lo_opened { CT_OPENED_BY_LO } else { 0 },
            bytes,
            packets: 1,
            ..CtEntry::default()
        };
        (key, e)
    }

    #[test]
    fn top_ranks_openers_by_flows_and_flows_by_bytes_per_vpc() {
        let flooder = [10, 0, 1, 9];
        let mut entries: Vec<(CtKey, CtEntry)> = (0..20)
            .map(|p| entry(7, [10, 0, 1, 5], 53, flooder, 1000 + p, false, 100))
            .collect();
        entries.push(entry(
            7,
            [10, 0, 1, 4],
            40000,
            [10, 0, 1, 5],
            443,
            true,
            9999,
        ));
        entries.push(entry(8, [10, 0, 1, 4], 40000, [10, 0, 1, 5], 443, true, 1));
        let t = top(&entries, 2);
        assert_eq!(
            t[&7].sources,
            vec![
                (Ipv4Addr::from(flooder), 20),
                (Ipv4Addr::new(10, 0, 1, 4), 1)
            ]
        );
        assert_eq!(t[&7].flows.len(), 2);
        let f = &t[&7].flows[0];
        assert_eq!(
            (
                f.src.as_str(),
                f.src_port,
                f.dst.as_str(),
                f.dst_port,
                f.bytes,
                f.protocol.as_str()
            ),
            ("10.0.1.4", 40000, "10.0.1.5", 443, 9999, "udp")
        );
        // The flooder opened from the hi side: it is the source.
        assert_eq!(t[&7].flows[1].src, "10.0.1.9");
        assert_eq!(t[&8].sources, vec![(Ipv4Addr::new(10, 0, 1, 4), 1)]);
    }

    #[test]
    fn summary_joins_counts_budgets_and_tops() {
        let s = summary(
            30,
            1000,
            &BTreeMap::from([(7, 21), (8, 1)]),
            &BTreeMap::from([
                (
                    7,
                    CtBudget {
                        limit: 20,
                        count: 21,
                    },
                ),
                (9, CtBudget { limit: 5, count: 0 }),
            ]),
            &BTreeMap::new(),
            &BTreeMap::from([(7, 4)]),
        );
        let rows: Vec<(u32, u64, u64, u64, u64)> = s
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
    }
}
