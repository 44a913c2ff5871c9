//! Every map of the datapath. Sizes are named constants in `dataplane_common`.
//!
//! All maps are pinned by name (`pinned(...)`) so the loader reuses them across agent
//! restarts: counters keep counting and filter entries stay in force while the agent is away.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use dataplane_common::{
    Counter, FilterKey, FilterValue,
    maps::FILTER_MAX_ENTRIES,
    stats::{ACTION_STATS_ENTRIES, DROP_STATS_ENTRIES},
};

/// Packets and bytes by (hook, action). Key: `stats::action_index`; value: [`Counter`] per CPU.
/// Writer: every program (per-CPU, so no atomics). Reader: the agent and `vpc datapath stats`,
/// which sum the CPUs. Size: hooks x action slots (slots spare for future actions).
#[map]
pub static ACTION_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(ACTION_STATS_ENTRIES, 0);

/// Packets and bytes by (hook, drop reason). Key: `stats::drop_index`; value: [`Counter`] per
/// CPU. Writer: every program on a drop. Reader: as `ACTION_STATS`. Size: hooks x 64 reason
/// slots, so adding a reason does not change the map layout.
#[map]
pub static DROP_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(DROP_STATS_ENTRIES, 0);

/// Per-destination pass/drop entries. Key: [`FilterKey`] (destination address or wildcard,
/// protocol, port); value: [`FilterValue`]. Writer: the agent (`Datapath::set_filter`).
/// Reader: every program, at most two lookups per IP packet. Size: `FILTER_MAX_ENTRIES`.
#[map]
pub static FILTER: HashMap<FilterKey, FilterValue> = HashMap::pinned(FILTER_MAX_ENTRIES, 0);
