//! The pinned maps, opened by path: counters and filter entries, readable and writable by
//! any process (agent, CLI, tests) without loading programs.

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use dataplane_common::{
    Action, Counter, DropReason, FilterKey, FilterValue, Hook,
    drop_reason::DROP_REASON_SLOTS,
    maps,
    stats::{ACTION_SLOTS, action_slot_index, drop_slot_index},
};

use super::{
    DatapathError, PinLayout,
    map_io::{is_missing, map_err, open},
};

/// Handles on the pinned maps of one datapath.
pub struct PinnedMaps {
    action_stats: PerCpuArray<MapData, Counter>,
    drop_stats: PerCpuArray<MapData, Counter>,
    filter: HashMap<MapData, FilterKey, FilterValue>,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps").finish_non_exhaustive()
    }
}

impl PinnedMaps {
    /// Opens the maps pinned under `layout` (a datapath must have been loaded there).
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(PinnedMaps {
            action_stats: PerCpuArray::try_from(Map::PerCpuArray(open(
                layout,
                maps::ACTION_STATS,
            )?))
            .map_err(map_err(maps::ACTION_STATS))?,
            drop_stats: PerCpuArray::try_from(Map::PerCpuArray(open(layout, maps::DROP_STATS)?))
                .map_err(map_err(maps::DROP_STATS))?,
            filter: HashMap::try_from(Map::HashMap(open(layout, maps::FILTER)?))
                .map_err(map_err(maps::FILTER))?,
        })
    }

    /// Sums the per-CPU counters into a snapshot.
    pub fn stats(&self) -> Result<StatsSnapshot, DatapathError> {
        let sum = |map: &PerCpuArray<MapData, Counter>, name, index| {
            let values = map
                .get(&index, 0)
                .map_err(|source| DatapathError::Map { map: name, source })?;
            let mut total = Counter::default();
            for v in values.iter() {
                total.add(v);
            }
            Ok::<_, DatapathError>(total)
        };
        let mut snap = StatsSnapshot::default();
        for hook in Hook::ALL {
            for slot in 0..ACTION_SLOTS {
                let index = action_slot_index(hook, slot);
                let c = sum(&self.action_stats, maps::ACTION_STATS, index)?;
                if c != Counter::default() {
                    snap.actions.push((hook, slot, c));
                }
            }
            for slot in 0..DROP_REASON_SLOTS {
                let index = drop_slot_index(hook, slot);
                let c = sum(&self.drop_stats, maps::DROP_STATS, index)?;
                if c != Counter::default() {
                    snap.drops.push((hook, slot, c));
                }
            }
        }
        Ok(snap)
    }

    /// Installs or replaces a filter entry.
    pub fn set_filter(&mut self, key: FilterKey, value: FilterValue) -> Result<(), DatapathError> {
        self.filter
            .insert(key, value, 0)
            .map_err(|source| DatapathError::Map {
                map: maps::FILTER,
                source,
            })
    }

    /// Removes a filter entry; `Ok(false)` when there was none.
    pub fn remove_filter(&mut self, key: &FilterKey) -> Result<bool, DatapathError> {
        match self.filter.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(map_err(maps::FILTER)(e)),
        }
    }

    /// Every filter entry.
    pub fn filters(&self) -> Result<Vec<(FilterKey, FilterValue)>, DatapathError> {
        self.filter
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DatapathError::Map {
                map: maps::FILTER,
                source,
            })
    }
}

/// Counters summed over CPUs. Only non-zero slots are listed; slots are kept as numbers so a
/// newer datapath's unknown actions or reasons still show up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// (hook, action slot, counter).
    pub actions: Vec<(Hook, u32, Counter)>,
    /// (hook, drop-reason number, counter).
    pub drops: Vec<(Hook, u32, Counter)>,
}

impl StatsSnapshot {
    /// The counter of `action` at `hook` (zero when never hit).
    pub fn action(&self, hook: Hook, action: Action) -> Counter {
        find(&self.actions, hook, action as u32)
    }

    /// The counter of drops for `reason` at `hook` (zero when never hit).
    pub fn drop(&self, hook: Hook, reason: DropReason) -> Counter {
        find(&self.drops, hook, reason.as_u32())
    }
}

fn find(list: &[(Hook, u32, Counter)], hook: Hook, slot: u32) -> Counter {
    list.iter()
        .find(|(h, s, _)| *h == hook && *s == slot)
        .map(|(_, _, c)| *c)
        .unwrap_or_default()
}
