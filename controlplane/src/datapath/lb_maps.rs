//! The pinned load-balancer maps and their reconciler.
//!
//! [`LbSync::sync`] makes the maps hold an [`LbDesired`], level-triggered and idempotent:
//!
//! - Backends are written first (new targets, state changes such as draining), so a table
//!   never names a backend the kernel does not have.
//! - A listener whose table changes gets the new table written into a free range of
//!   `LB_MAGLEV` (batched BPF_MAP_UPDATE_BATCH calls, not one syscall per slot), then its
//!   `LB_SERVICES` entry switches to that range with one update. The old range is freed at
//!   the next pass, after every packet that read the old entry has finished.
//! - Listeners and backends no longer desired are deleted last.
//!
//! Service and backend ids are adopted from the kernel on the first pass (an agent restart
//! keeps them, so balanced flows keep their targets); tables are rewritten then, since their
//! contents are not read back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsFd,
};

use aya::maps::{HashMap, Map, MapData};
use dataplane_common::{
    conntrack::{CtConfig, CtState},
    filter::ipv4_mapped,
    lb::{
        LB_BACKEND_ACTIVE, LB_BACKEND_DRAINING, LbBackend, LbFlow, LbReverse, LbService,
        LbServiceKey, LbTuple,
    },
    maps,
    overlay::v4,
};

use super::{
    DatapathError, PinLayout,
    map_io::{batch_err, map_err, open, removed},
    sys,
};
use crate::lb::{
    compile::LbDesired,
    maglev::{self, MaglevBackend, MaglevError},
};

/// Why a load-balancer pass failed.
#[derive(Debug, thiserror::Error)]
pub enum LbSyncError {
    /// A map operation failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// A table could not be built.
    #[error("listener {listener}: {source}")]
    Maglev {
        /// The listener.
        listener: String,
        /// Cause.
        source: MaglevError,
    },
    /// `LB_MAGLEV` has no free range for a table.
    #[error(
        "listener {listener}: no room for a {size}-slot Maglev table in LB_MAGLEV ({capacity} \
         slots, {used} in use); raise vpc-agent --lb-table-slots"
    )]
    TableSpace {
        /// The listener.
        listener: String,
        /// Slots needed.
        size: u32,
        /// Capacity.
        capacity: u32,
        /// Slots in use.
        used: u64,
    },
}

/// Handles on the pinned load-balancer maps.
pub struct LbMaps {
    services: HashMap<MapData, LbServiceKey, LbService>,
    backends: HashMap<MapData, u32, LbBackend>,
    maglev: MapData,
    maglev_slots: u32,
    flows: MapData,
    reverse: MapData,
}

impl std::fmt::Debug for LbMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbMaps")
            .field("maglev_slots", &self.maglev_slots)
            .finish_non_exhaustive()
    }
}

impl LbMaps {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let maglev = open(layout, maps::LB_MAGLEV)?;
        let maglev_slots = maglev
            .info()
            .map_err(map_err(maps::LB_MAGLEV))?
            .max_entries();
        Ok(LbMaps {
            services: HashMap::try_from(Map::HashMap(open(layout, maps::LB_SERVICES)?))
                .map_err(map_err(maps::LB_SERVICES))?,
            backends: HashMap::try_from(Map::HashMap(open(layout, maps::LB_BACKENDS)?))
                .map_err(map_err(maps::LB_BACKENDS))?,
            maglev,
            maglev_slots,
            flows: open(layout, maps::LB_FLOWS)?,
            reverse: open(layout, maps::LB_REVERSE)?,
        })
    }

    /// Every listener.
    pub fn services(&self) -> Result<BTreeMap<LbServiceKey, LbService>, DatapathError> {
        self.services
            .iter()
            .map(|r| r.map_err(map_err(maps::LB_SERVICES)))
            .collect()
    }

    /// Every backend.
    pub fn backends(&self) -> Result<BTreeMap<u32, LbBackend>, DatapathError> {
        self.backends
            .iter()
            .map(|r| r.map_err(map_err(maps::LB_BACKENDS)))
            .collect()
    }

    /// Every balanced flow.
    pub fn flows(&self) -> Result<Vec<(LbTuple, LbFlow)>, DatapathError> {
        sys::lookup_batch(self.flows.fd().as_fd()).map_err(batch_err(maps::LB_FLOWS))
    }

    /// Every reverse-NAT entry.
    pub fn reverse_entries(&self) -> Result<Vec<(LbTuple, LbReverse)>, DatapathError> {
        sys::lookup_batch(self.reverse.fd().as_fd()).map_err(batch_err(maps::LB_REVERSE))
    }

    /// Deletes flows idle past their timeout (`cfg`'s established TCP, UDP or other) and
    /// reverse-NAT entries whose flow is gone. Returns (flows left, flows deleted).
    pub fn sweep(&self, now_ns: u64, cfg: &CtConfig) -> Result<(usize, usize), DatapathError> {
        let flows = self.flows()?;
        let (expired, live): (Vec<_>, Vec<_>) = flows.into_iter().partition(|(k, f)| {
            now_ns.saturating_sub(f.last_seen_ns)
                > cfg.timeout_ns(k.proto, CtState::Established as u32)
        });
        let dead: Vec<LbTuple> = expired.iter().map(|(k, _)| *k).collect();
        sys::delete_batch(self.flows.fd().as_fd(), &dead).map_err(batch_err(maps::LB_FLOWS))?;
        let forward: BTreeSet<LbTuple> = live.iter().map(|(k, _)| *k).collect();
        let orphans: Vec<LbTuple> = self
            .reverse_entries()?
            .into_iter()
            .filter(|(k, r)| {
                !forward.contains(&LbTuple {
                    vni: k.vni,
                    src: k.dst,
                    dst: r.vip,
                    sport: k.dport,
                    dport: r.port,
                    proto: k.proto,
                    _pad: [0; 3],
                })
            })
            .map(|(k, _)| k)
            .collect();
        sys::delete_batch(self.reverse.fd().as_fd(), &orphans)
            .map_err(batch_err(maps::LB_REVERSE))?;
        Ok((live.len(), dead.len()))
    }

    fn write_table(&self, offset: u32, ids: &[u32]) -> Result<(), DatapathError> {
        let entries: Vec<(u32, u32)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (offset + i as u32, *id))
            .collect();
        sys::update_batch(self.maglev.fd().as_fd(), &entries).map_err(batch_err(maps::LB_MAGLEV))
    }
}

/// A table's members: (address, port, weight), sorted.
type Members = Vec<(Ipv4Addr, u16, u32)>;

#[derive(Clone, Debug)]
struct Installed {
    value: LbService,
    /// `None`: adopted from the kernel, contents unknown (rewritten).
    members: Option<Members>,
}

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbReport {
    /// Listener entries written or deleted.
    pub services: usize,
    /// Backend entries written or deleted.
    pub backends: usize,
    /// Maglev tables written.
    pub tables: usize,
    /// Slots written.
    pub slots: usize,
}

impl LbReport {
    /// Total changes.
    pub fn changes(&self) -> usize {
        self.services + self.backends + self.tables
    }
}

/// The reconciler's record of what it installed.
#[derive(Debug, Default)]
pub struct LbSync {
    services: BTreeMap<LbServiceKey, Installed>,
    /// (service id, address, port) -> (backend id, value).
    backends: BTreeMap<(u32, Ipv4Addr, u16), (u32, LbBackend)>,
    /// Ranges replaced in the last pass, freed in the next.
    retired: Vec<(u32, u32)>,
    next_service: u32,
    next_backend: u32,
    synced: bool,
}

impl LbSync {
    /// A reconciler that adopts the kernel's state on its first pass.
    pub fn new() -> Self {
        LbSync {
            next_service: 1,
            next_backend: 1,
            ..Default::default()
        }
    }

    fn adopt(&mut self, maps: &LbMaps) -> Result<(), DatapathError> {
        self.services.clear();
        self.backends.clear();
        for (k, v) in maps.services()? {
            self.next_service = self.next_service.max(v.id + 1);
            self.services.insert(
                k,
                Installed {
                    value: v,
                    members: None,
                },
            );
        }
        for (id, b) in maps.backends()? {
            self.next_backend = self.next_backend.max(id + 1);
            self.backends
                .insert((b.service, Ipv4Addr::from(v4(&b.addr)), b.port), (id, b));
        }
        self.synced = true;
        Ok(())
    }

    /// First free range of `size` slots, given the ranges in use.
    fn allocate(&self, size: u32, capacity: u32, listener: &str) -> Result<u32, LbSyncError> {
        let mut used: Vec<(u32, u32)> = self
            .services
            .values()
            .filter(|i| i.value.table_size > 0)
            .map(|i| (i.value.table_offset, i.value.table_size))
            .chain(self.retired.iter().copied())
            .collect();
        used.sort_unstable();
        let mut start = 0u64;
        for (off, len) in &used {
            if u64::from(*off) >= start + u64::from(size) {
                break;
            }
            start = start.max(u64::from(*off) + u64::from(*len));
        }
        if start + u64::from(size) <= u64::from(capacity) {
            Ok(start as u32)
        } else {
            Err(LbSyncError::TableSpace {
                listener: listener.to_owned(),
                size,
                capacity,
                used: used.iter().map(|(_, l)| u64::from(*l)).sum(),
            })
        }
    }

    /// Makes the maps hold `desired`; `full`: adopt the kernel's entries first (always on the
    /// first pass).
    pub fn sync(
        &mut self,
        maps: &mut LbMaps,
        desired: &LbDesired,
        full: bool,
    ) -> Result<LbReport, LbSyncError> {
        if full || !self.synced {
            self.adopt(maps)?;
        }
        let mut report = LbReport::default();
        // Ranges retired by the previous pass are free now; this pass's go in their place.
        self.retired.clear();
        let mut wanted_backends: BTreeSet<(u32, Ipv4Addr, u16)> = BTreeSet::new();

        for (key, ds) in &desired.services {
            let sid = match self.services.get(key) {
                Some(i) => i.value.id,
                None => {
                    let id = self.next_service;
                    self.next_service += 1;
                    id
                }
            };
            // Backends first.
            let mut ids = BTreeMap::new();
            for (&(ip, port), b) in &ds.backends {
                let k = (sid, ip, port);
                wanted_backends.insert(k);
                let value = LbBackend {
                    addr: ipv4_mapped(ip.octets()),
                    port,
                    state: if b.draining {
                        LB_BACKEND_DRAINING
                    } else {
                        LB_BACKEND_ACTIVE
                    },
                    service: sid,
                };
                let id = match self.backends.get(&k) {
                    Some((id, _)) => *id,
                    None => {
                        let id = self.next_backend;
                        self.next_backend += 1;
                        id
                    }
                };
                if self.backends.get(&k) != Some(&(id, value)) {
                    maps.backends
                        .insert(id, value, 0)
                        .map_err(map_err(maps::LB_BACKENDS))?;
                    self.backends.insert(k, (id, value));
                    report.backends += 1;
                }
                ids.insert((ip, port), id);
            }
            // Then the table.
            let members: Members = ds
                .backends
                .iter()
                .filter(|(_, b)| b.in_table)
                .map(|(&(ip, port), b)| (ip, port, b.weight))
                .collect();
            let current = self.services.get(key).cloned();
            let unchanged = current.as_ref().is_some_and(|i| {
                i.members.as_ref() == Some(&members)
                    && (members.is_empty() || i.value.table_size == ds.table_size)
            });
            if unchanged {
                continue;
            }
            let value = if members.is_empty() {
                LbService {
                    id: sid,
                    table_offset: 0,
                    table_size: 0,
                    flags: 0,
                }
            } else {
                let names: Vec<String> = members
                    .iter()
                    .map(|(ip, port, _)| format!("{ip}:{port}"))
                    .collect();
                let backends: Vec<MaglevBackend<'_>> = names
                    .iter()
                    .zip(&members)
                    .map(|(name, (_, _, weight))| MaglevBackend {
                        name,
                        weight: *weight,
                    })
                    .collect();
                let table = maglev::table(&backends, ds.table_size).map_err(|source| {
                    LbSyncError::Maglev {
                        listener: ds.name.clone(),
                        source,
                    }
                })?;
                let slots: Vec<u32> = table
                    .iter()
                    .map(|&i| {
                        let (ip, port, _) = members[i as usize];
                        ids[&(ip, port)]
                    })
                    .collect();
                let offset = self.allocate(ds.table_size, maps.maglev_slots, &ds.name)?;
                // Reserve the range before writing (a later listener of this pass must not
                // take it).
                self.retired.push((offset, ds.table_size));
                maps.write_table(offset, &slots)?;
                self.retired.pop();
                report.tables += 1;
                report.slots += slots.len();
                LbService {
                    id: sid,
                    table_offset: offset,
                    table_size: ds.table_size,
                    flags: 0,
                }
            };
            maps.services
                .insert(key, value, 0)
                .map_err(map_err(maps::LB_SERVICES))?;
            report.services += 1;
            if let Some(old) = current
                && old.value.table_size > 0
            {
                self.retired
                    .push((old.value.table_offset, old.value.table_size));
            }
            self.services.insert(
                *key,
                Installed {
                    value,
                    members: Some(members),
                },
            );
        }

        // Listeners no longer desired.
        let gone: Vec<LbServiceKey> = self
            .services
            .keys()
            .filter(|k| !desired.services.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            removed(maps.services.remove(&key), maps::LB_SERVICES)?;
            if let Some(old) = self.services.remove(&key)
                && old.value.table_size > 0
            {
                self.retired
                    .push((old.value.table_offset, old.value.table_size));
            }
            report.services += 1;
        }
        // Backends no longer desired (their flows are balanced anew or dropped).
        let stale: Vec<(u32, Ipv4Addr, u16)> = self
            .backends
            .keys()
            .filter(|k| !wanted_backends.contains(k))
            .copied()
            .collect();
        for k in stale {
            if let Some((id, _)) = self.backends.remove(&k) {
                removed(maps.backends.remove(&id), maps::LB_BACKENDS)?;
                report.backends += 1;
            }
        }
        Ok(report)
    }

    /// Listeners and backends installed.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.backends.len())
    }
}
