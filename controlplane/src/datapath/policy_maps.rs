//! The pinned policy maps (security groups, network ACLs) and connection tracking: reading
//! what the kernel holds, installing and removing compiled rule sets, conntrack GC and
//! statistics, per-endpoint drop counters.
//!
//! Rule sets are installed under an id (`dataplane_common::policy`): entries of a new id are
//! written beside the old ones (ports first, then addresses, so a class is complete before
//! any address leads to it), endpoints then switch ids, and the old id's entries are removed
//! afterwards. No packet sees a half-written rule set.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuHashMap, lpm_trie::Key};
use dataplane_common::{
    Counter,
    conntrack::{CT_OPENED_BY_LO, CtBudget, CtConfig, CtEntry, CtKey},
    maps,
    policy::{AclVerdict, PolicyAddrKey, PolicyPortKey},
    stats::EndpointDropKey,
};

use super::{
    DatapathError, PinLayout,
    map_io::{batch_err, map_err, open, removed},
    sys,
};

/// An address-stage entry: (LPM prefix length, key, class id).
pub type AddrEntry = (u32, PolicyAddrKey, u32);
/// A security-group port-stage entry: (LPM prefix length, key, rule reference).
pub type SgPortEntry = (u32, PolicyPortKey, u32);
/// An ACL port-stage entry: (LPM prefix length, key, verdict).
pub type AclPortEntry = (u32, PolicyPortKey, AclVerdict);

/// The kernel entries of one security-group policy id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgEntries {
    /// `SG_ADDR` entries.
    pub addr: Vec<AddrEntry>,
    /// `SG_PORT` entries.
    pub ports: Vec<SgPortEntry>,
}

/// The kernel entries of one ACL id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclEntries {
    /// `ACL_ADDR` entries.
    pub addr: Vec<AddrEntry>,
    /// `ACL_PORT` entries.
    pub ports: Vec<AclPortEntry>,
}

/// Conntrack occupancy, from one scan of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtSummary {
    /// Entries present (live and expired).
    pub entries: usize,
    /// Entries past their idle timeout (GC deletes them).
    pub expired: usize,
    /// Capacity of the table.
    pub capacity: u32,
    /// Live entries per VNI.
    pub per_vni: BTreeMap<u32, usize>,
    /// Per VNI, the sources (the side that opened the flow, IPv4-mapped) holding the most
    /// live entries, most first (at most [`TOP_N`]; ties by address).
    pub top_sources: BTreeMap<u32, Vec<([u8; 16], usize)>>,
    /// Per VNI, the live flows with the most bytes (both directions), most first (at most
    /// [`TOP_N`]).
    pub top_flows: BTreeMap<u32, Vec<TopFlow>>,
}

/// How many top sources and flows [`CtSummary`] keeps per VNI.
pub const TOP_N: usize = 10;

/// One of the largest flows of a VPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopFlow {
    /// The flow.
    pub key: CtKey,
    /// The address of the side that opened it (IPv4-mapped).
    pub opener: [u8; 16],
    /// Packets, both directions.
    pub packets: u64,
    /// Bytes, both directions.
    pub bytes: u64,
}

impl CtSummary {
    /// Entries / capacity (0.0 ..= 1.0): how close the table is to evicting live flows.
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / f64::from(self.capacity)
        }
    }
}

/// Handles on the pinned policy and conntrack maps of one datapath.
pub struct PolicyMaps {
    sg_addr: LpmTrie<MapData, PolicyAddrKey, u32>,
    sg_port: LpmTrie<MapData, PolicyPortKey, u32>,
    acl_addr: LpmTrie<MapData, PolicyAddrKey, u32>,
    acl_port: LpmTrie<MapData, PolicyPortKey, AclVerdict>,
    ct_config: Array<MapData, CtConfig>,
    conntrack: MapData,
    endpoint_drops: PerCpuHashMap<MapData, EndpointDropKey, Counter>,
    /// Behind a lock so the GC (`&self`) can write counts back: aya's `insert` takes
    /// `&mut self`, while the kernel map itself needs no exclusion.
    ct_budget: Mutex<HashMap<MapData, u32, CtBudget>>,
}

impl std::fmt::Debug for PolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMaps").finish_non_exhaustive()
    }
}

fn trie<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &'static str,
) -> Result<LpmTrie<MapData, K, V>, DatapathError> {
    LpmTrie::try_from(Map::LpmTrie(open(layout, name)?)).map_err(map_err(name))
}

/// Every (prefix length, key, value) of an LPM trie.
fn read_trie<K: aya::Pod, V: aya::Pod>(
    t: &LpmTrie<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(u32, K, V)>, DatapathError> {
    t.iter()
        .map(|r| {
            r.map(|(k, v)| (k.prefix_len(), k.data(), v))
                .map_err(map_err(name))
        })
        .collect()
}

/// The policy or ACL id a port-stage class belongs to.
fn class_owner(key: &PolicyPortKey) -> u32 {
    u32::from_be_bytes(key.class_be) >> 16
}

impl PolicyMaps {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(PolicyMaps {
            sg_addr: trie(layout, maps::SG_ADDR)?,
            sg_port: trie(layout, maps::SG_PORT)?,
            acl_addr: trie(layout, maps::ACL_ADDR)?,
            acl_port: trie(layout, maps::ACL_PORT)?,
            ct_config: Array::try_from(Map::Array(open(layout, maps::CT_CONFIG)?))
                .map_err(map_err(maps::CT_CONFIG))?,
            conntrack: open(layout, maps::CONNTRACK)?,
            endpoint_drops: PerCpuHashMap::try_from(Map::PerCpuLruHashMap(open(
                layout,
                maps::ENDPOINT_DROPS,
            )?))
            .map_err(map_err(maps::ENDPOINT_DROPS))?,
            ct_budget: Mutex::new(
                HashMap::try_from(Map::HashMap(open(layout, maps::CT_BUDGET)?))
                    .map_err(map_err(maps::CT_BUDGET))?,
            ),
        })
    }

    /// Every installed security-group policy, by id.
    pub fn read_sg(&self) -> Result<BTreeMap<u32, SgEntries>, DatapathError> {
        let mut out: BTreeMap<u32, SgEntries> = BTreeMap::new();
        for (len, key, class) in read_trie(&self.sg_addr, maps::SG_ADDR)? {
            out.entry(key.scope().0)
                .or_default()
                .addr
                .push((len, key, class));
        }
        for (len, key, rule) in read_trie(&self.sg_port, maps::SG_PORT)? {
            out.entry(class_owner(&key))
                .or_default()
                .ports
                .push((len, key, rule));
        }
        Ok(out)
    }

    /// Every installed ACL, by id.
    pub fn read_acl(&self) -> Result<BTreeMap<u32, AclEntries>, DatapathError> {
        let mut out: BTreeMap<u32, AclEntries> = BTreeMap::new();
        for (len, key, class) in read_trie(&self.acl_addr, maps::ACL_ADDR)? {
            out.entry(key.scope().0)
                .or_default()
                .addr
                .push((len, key, class));
        }
        for (len, key, verdict) in read_trie(&self.acl_port, maps::ACL_PORT)? {
            out.entry(class_owner(&key))
                .or_default()
                .ports
                .push((len, key, verdict));
        }
        Ok(out)
    }

    /// Writes a security-group policy's entries (ports first: a class is complete before an
    /// address leads to it).
    pub fn install_sg(&mut self, e: &SgEntries) -> Result<(), DatapathError> {
        for (len, key, rule) in &e.ports {
            self.sg_port
                .insert(&Key::new(*len, *key), rule, 0)
                .map_err(map_err(maps::SG_PORT))?;
        }
        for (len, key, class) in &e.addr {
            self.sg_addr
                .insert(&Key::new(*len, *key), class, 0)
                .map_err(map_err(maps::SG_ADDR))?;
        }
        Ok(())
    }

    /// Removes a security-group policy's entries (addresses first).
    pub fn remove_sg(&mut self, e: &SgEntries) -> Result<(), DatapathError> {
        for (len, key, _) in &e.addr {
            removed(self.sg_addr.remove(&Key::new(*len, *key)), maps::SG_ADDR)?;
        }
        for (len, key, _) in &e.ports {
            removed(self.sg_port.remove(&Key::new(*len, *key)), maps::SG_PORT)?;
        }
        Ok(())
    }

    /// Writes an ACL's entries (ports first).
    pub fn install_acl(&mut self, e: &AclEntries) -> Result<(), DatapathError> {
        for (len, key, verdict) in &e.ports {
            self.acl_port
                .insert(&Key::new(*len, *key), verdict, 0)
                .map_err(map_err(maps::ACL_PORT))?;
        }
        for (len, key, class) in &e.addr {
            self.acl_addr
                .insert(&Key::new(*len, *key), class, 0)
                .map_err(map_err(maps::ACL_ADDR))?;
        }
        Ok(())
    }

    /// Removes an ACL's entries (addresses first).
    pub fn remove_acl(&mut self, e: &AclEntries) -> Result<(), DatapathError> {
        for (len, key, _) in &e.addr {
            removed(self.acl_addr.remove(&Key::new(*len, *key)), maps::ACL_ADDR)?;
        }
        for (len, key, _) in &e.ports {
            removed(self.acl_port.remove(&Key::new(*len, *key)), maps::ACL_PORT)?;
        }
        Ok(())
    }

    /// The conntrack timeouts in force (all zero: defaults).
    pub fn ct_config(&self) -> Result<CtConfig, DatapathError> {
        self.ct_config.get(&0, 0).map_err(map_err(maps::CT_CONFIG))
    }

    /// Sets the conntrack timeouts.
    pub fn set_ct_config(&mut self, cfg: &CtConfig) -> Result<(), DatapathError> {
        self.ct_config
            .set(0, cfg, 0)
            .map_err(map_err(maps::CT_CONFIG))
    }

    /// Every conntrack entry (batched reads).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtEntry)>, DatapathError> {
        use std::os::fd::AsFd as _;
        sys::lookup_batch(self.conntrack.fd().as_fd()).map_err(batch_err(maps::CONNTRACK))
    }

    /// Capacity of the conntrack table.
    pub fn conntrack_capacity(&self) -> Result<u32, DatapathError> {
        Ok(self
            .conntrack
            .info()
            .map_err(map_err(maps::CONNTRACK))?
            .max_entries())
    }

    /// Inserts conntrack entries (benchmarks and tests prefill the table this way).
    pub fn ct_insert(&self, entries: &[(CtKey, CtEntry)]) -> Result<(), DatapathError> {
        use std::os::fd::AsFd as _;
        sys::update_batch(self.conntrack.fd().as_fd(), entries).map_err(batch_err(maps::CONNTRACK))
    }

    /// Scans conntrack at `now_ns` (CLOCK_MONOTONIC); with `gc`, deletes expired entries
    /// and writes each budgeted VPC's live entry count back into `CT_BUDGET` (the datapath
    /// only ever adds to it; evictions and expiries are seen here).
    pub fn ct_sweep(&self, now_ns: u64, gc: bool) -> Result<CtSummary, DatapathError> {
        use std::os::fd::AsFd as _;
        let cfg = self.ct_config()?.or_default();
        let entries = self.conntrack()?;
        let (summary, expired) = summarize(&entries, &cfg, now_ns, self.conntrack_capacity()?);
        if gc && !expired.is_empty() {
            sys::delete_batch(self.conntrack.fd().as_fd(), &expired)
                .map_err(batch_err(maps::CONNTRACK))?;
        }
        if gc {
            let mut budgets = self.budgets();
            let current: Vec<(u32, CtBudget)> = budgets
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(maps::CT_BUDGET))?;
            for (vni, mut budget) in current {
                let live = summary.per_vni.get(&vni).copied().unwrap_or(0);
                budget.count = u32::try_from(live).unwrap_or(u32::MAX);
                budgets
                    .insert(vni, budget, 0)
                    .map_err(map_err(maps::CT_BUDGET))?;
            }
        }
        Ok(summary)
    }

    fn budgets(&self) -> MutexGuard<'_, HashMap<MapData, u32, CtBudget>> {
        // A panic while holding it leaves the handle usable (it holds no invariant).
        self.ct_budget.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The conntrack budgets in force, by VNI.
    pub fn ct_budgets(&self) -> Result<BTreeMap<u32, CtBudget>, DatapathError> {
        self.budgets()
            .iter()
            .map(|r| r.map_err(map_err(maps::CT_BUDGET)))
            .collect()
    }

    /// Sets VPC `vni`'s conntrack budget to `limit` entries (0: unlimited), keeping the
    /// current count (a new budget starts from `count`, e.g. the last GC's live count; the
    /// next GC corrects it).
    pub fn set_ct_budget(&self, vni: u32, limit: u32, count: u32) -> Result<(), DatapathError> {
        let mut budgets = self.budgets();
        let count = match budgets.get(&vni, 0) {
            Ok(b) => b.count,
            Err(_) => count,
        };
        budgets
            .insert(vni, CtBudget { limit, count }, 0)
            .map_err(map_err(maps::CT_BUDGET))
    }

    /// Removes VPC `vni`'s budget (its flows are then limited only by the table).
    pub fn remove_ct_budget(&self, vni: u32) -> Result<(), DatapathError> {
        removed(self.budgets().remove(&vni), maps::CT_BUDGET)
    }

    /// Drops per (endpoint ifindex, drop-reason number), summed over CPUs.
    pub fn endpoint_drops(&self) -> Result<BTreeMap<(u32, u32), Counter>, DatapathError> {
        let mut out = BTreeMap::new();
        for r in self.endpoint_drops.iter() {
            let (key, per_cpu) = r.map_err(map_err(maps::ENDPOINT_DROPS))?;
            let mut total = Counter::default();
            for c in per_cpu.iter() {
                total.add(c);
            }
            out.insert((key.ifindex, key.reason), total);
        }
        Ok(out)
    }
}

/// Occupancy of `entries` at `now_ns`, and the keys of the expired ones. Pure.
pub fn summarize(
    entries: &[(CtKey, CtEntry)],
    cfg: &CtConfig,
    now_ns: u64,
    capacity: u32,
) -> (CtSummary, Vec<CtKey>) {
    let mut summary = CtSummary {
        entries: entries.len(),
        capacity,
        ..CtSummary::default()
    };
    let mut expired = Vec::new();
    let mut sources: BTreeMap<(u32, [u8; 16]), usize> = BTreeMap::new();
    let mut flows: BTreeMap<u32, Vec<TopFlow>> = BTreeMap::new();
    for (key, entry) in entries {
        if cfg.expired(key, entry, now_ns) {
            expired.push(*key);
            continue;
        }
        *summary.per_vni.entry(key.vni).or_default() += 1;
        let opener = if entry.flags & CT_OPENED_BY_LO != 0 {
            key.lo_addr
        } else {
            key.hi_addr
        };
        *sources.entry((key.vni, opener)).or_default() += 1;
        let top = flows.entry(key.vni).or_default();
        top.push(TopFlow {
            key: *key,
            opener,
            packets: entry.packets,
            bytes: entry.bytes,
        });
        // Bounded: trim to TOP_N whenever the list doubles (amortized O(n log N)).
        if top.len() >= 2 * TOP_N {
            sort_flows(top);
            top.truncate(TOP_N);
        }
    }
    for (vni, mut top) in flows {
        sort_flows(&mut top);
        top.truncate(TOP_N);
        summary.top_flows.insert(vni, top);
    }
    let mut by_vni: BTreeMap<u32, Vec<([u8; 16], usize)>> = BTreeMap::new();
    for ((vni, addr), n) in sources {
        by_vni.entry(vni).or_default().push((addr, n));
    }
    for (vni, mut top) in by_vni {
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(TOP_N);
        summary.top_sources.insert(vni, top);
    }
    summary.expired = expired.len();
    (summary, expired)
}

/// Most bytes first; ties by packets, then key (deterministic).
fn sort_flows(flows: &mut [TopFlow]) {
    flows.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.packets.cmp(&a.packets))
            .then(a.key.cmp(&b.key))
    });
}

/// CLOCK_MONOTONIC now, in nanoseconds (the datapath's conntrack clock).
pub fn now_ns() -> u64 {
    sys::monotonic_ns()
}

#[cfg(test)]
mod tests {
    use dataplane_common::conntrack::CtState;

    use super::*;

    #[test]
    fn summary_counts_live_entries_per_vpc_and_lists_expired_ones() {
        let key = |vni, port| CtKey {
            vni,
            lo_port: port,
            proto: 17,
            ..CtKey::default()
        };
        let entry = |at| CtEntry {
            last_seen_ns: at,
            state: CtState::Open as u32,
            flags: 0,
            ..CtEntry::default()
        };
        let s = 1_000_000_000;
        let entries = [
            (key(1, 1), entry(100 * s)),
            (key(1, 2), entry(60 * s)),
            (key(2, 1), entry(95 * s)),
        ];
        let (summary, expired) = summarize(&entries, &CtConfig::DEFAULT, 100 * s, 10);
        assert_eq!(summary.entries, 3);
        assert_eq!(summary.expired, 1);
        assert_eq!(expired, vec![key(1, 2)]);
        assert_eq!(summary.per_vni, BTreeMap::from([(1, 1), (2, 1)]));
        assert!((summary.pressure() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn summary_ranks_sources_by_entries_and_flows_by_bytes_per_vpc_bounded() {
        const NOW: u64 = 100 * 1_000_000_000;
        let addr = |n: u8| dataplane_common::filter::ipv4_mapped([10, 0, 0, n]);
        // Flow i of VNI 1: opened by 10.0.0.(i % 3 + 1) (the lo side, the other side is
        // 10.0.0.200), i * 100 bytes; one expired flow with the most bytes of all.
        let mut entries: Vec<(CtKey, CtEntry)> = (0..30u16)
            .map(|i| {
                (
                    CtKey {
                        vni: 1,
                        lo_addr: addr((i % 3) as u8 + 1),
                        hi_addr: addr(200),
                        lo_port: 1000 + i,
                        hi_port: 80,
                        proto: 6,
                        ..CtKey::default()
                    },
                    CtEntry {
                        last_seen_ns: NOW,
                        state: CtState::Established as u32,
                        flags: CT_OPENED_BY_LO,
                        packets: u64::from(i),
                        bytes: u64::from(i) * 100,
                    },
                )
            })
            .collect();
        // Opened by the hi side (10.0.0.200) in VNI 2.
        entries.push((
            CtKey {
                vni: 2,
                lo_addr: addr(1),
                hi_addr: addr(200),
                proto: 17,
                ..CtKey::default()
            },
            CtEntry {
                last_seen_ns: NOW,
                state: CtState::Open as u32,
                bytes: 5,
                packets: 1,
                ..CtEntry::default()
            },
        ));
        entries.push((
            CtKey {
                vni: 1,
                lo_addr: addr(9),
                proto: 17,
                ..CtKey::default()
            },
            CtEntry {
                last_seen_ns: 0,
                state: CtState::Open as u32,
                flags: CT_OPENED_BY_LO,
                bytes: u64::MAX,
                ..CtEntry::default()
            },
        ));
        let (s, expired) = summarize(&entries, &CtConfig::DEFAULT, NOW, 1000);
        assert_eq!(expired.len(), 1);
        assert_eq!(s.per_vni, BTreeMap::from([(1, 30), (2, 1)]));
        let top = &s.top_flows[&1];
        assert_eq!(top.len(), TOP_N);
        let bytes: Vec<u64> = top.iter().map(|f| f.bytes).collect();
        assert_eq!(bytes, (20..30).rev().map(|i| i * 100).collect::<Vec<u64>>());
        assert_eq!(top[0].opener, addr((29 % 3) as u8 + 1));
        assert_eq!(
            s.top_sources[&1],
            vec![(addr(1), 10), (addr(2), 10), (addr(3), 10)]
        );
        assert_eq!(s.top_sources[&2], vec![(addr(200), 1)]);
        assert_eq!(s.top_flows[&2][0].bytes, 5);
    }
}
