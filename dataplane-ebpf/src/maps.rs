//! Every map of the datapath. Sizes are named constants in `dataplane_common::maps`.
//!
//! All maps are pinned by name (`pinned(...)`) so the loader reuses them across agent
//! restarts: counters keep counting, filter entries and the overlay keep forwarding while the
//! agent is away.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use dataplane_common::{
    Counter, FilterKey, FilterValue,
    maps::{
        ENDPOINTS_MAX_ENTRIES, FILTER_MAX_ENTRIES, NEIGHBORS_MAX_ENTRIES, ROUTES_MAX_ENTRIES,
        VNIS_MAX_ENTRIES, VTEPS_MAX_ENTRIES,
    },
    overlay::{Endpoint, Neighbor, NeighborKey, OverlayConfig, Route, RoutePrefix},
    stats::{ACTION_STATS_ENTRIES, DROP_STATS_ENTRIES},
};

/// Packets and bytes by (hook, action). Key: `stats::action_index`; value: [`Counter`] per CPU.
/// Writer: every program (per-CPU, so no atomics). Reader: the agent and `vpc datapath stats`,
/// which sum the CPUs. Size: hook slots x action slots (spare slots for future ones).
#[map]
pub static ACTION_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(ACTION_STATS_ENTRIES, 0);

/// Packets and bytes by (hook, drop reason). Key: `stats::drop_index`; value: [`Counter`] per
/// CPU. Writer: every program on a drop. Reader: as `ACTION_STATS`. Size: hook slots x 64
/// reason slots, so adding a reason does not change the map layout.
#[map]
pub static DROP_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(DROP_STATS_ENTRIES, 0);

/// Per-destination pass/drop entries. Key: [`FilterKey`] (destination address or wildcard,
/// protocol, port); value: [`FilterValue`]. Writer: the agent (`PinnedMaps::set_filter`).
/// Reader: the underlay programs, at most two lookups per IP packet. Size:
/// `FILTER_MAX_ENTRIES`.
#[map]
pub static FILTER: HashMap<FilterKey, FilterValue> = HashMap::pinned(FILTER_MAX_ENTRIES, 0);

/// Instance ports. Key: host-side veth ifindex; value: [`Endpoint`] (VNI, address, MAC,
/// router MAC, gateway). Writer: the agent's overlay reconciler. Reader: `vpc_port`, once
/// per frame. Size: `ENDPOINTS_MAX_ENTRIES` (ports per host).
#[map]
pub static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

/// Every instance and subnet gateway of the VPCs present on this host. Key: [`NeighborKey`]
/// (VNI, address); value: [`Neighbor`] (local port, remote VTEP or gateway, MAC). Writer: the
/// reconciler. Readers: `vpc_port` (ARP answers, forwarding) and the underlay programs
/// (inner source and destination of VXLAN). Size: `NEIGHBORS_MAX_ENTRIES`.
#[map]
pub static NEIGHBORS: HashMap<NeighborKey, Neighbor> = HashMap::pinned(NEIGHBORS_MAX_ENTRIES, 0);

/// Routes of the VPCs present on this host, longest-prefix matched. Key: (VNI, prefix) as
/// [`RoutePrefix`]; value: [`Route`]. Writer: the reconciler. Reader: `vpc_port`. Size:
/// `ROUTES_MAX_ENTRIES`; an LPM trie allocates entries on demand.
#[map]
pub static ROUTES: LpmTrie<RoutePrefix, Route> = LpmTrie::pinned(ROUTES_MAX_ENTRIES, 0);

/// Underlay addresses VXLAN is accepted from. Key: IPv4 octets; value: 1. Writer: the
/// reconciler. Reader: the underlay programs. Size: `VTEPS_MAX_ENTRIES` (hosts).
#[map]
pub static VTEPS: HashMap<[u8; 4], u32> = HashMap::pinned(VTEPS_MAX_ENTRIES, 0);

/// VNIs VXLAN is accepted for (the VPCs present on this host). Key: VNI; value: 1. Writer:
/// the reconciler. Reader: the underlay programs. Size: `VNIS_MAX_ENTRIES`.
#[map]
pub static VNIS: HashMap<u32, u32> = HashMap::pinned(VNIS_MAX_ENTRIES, 0);

/// This host's overlay settings, index 0: [`OverlayConfig`] (VTEP, underlay ifindex and
/// MTU). Writer: the agent at start. Readers: every program that forwards. Size: 1.
#[map]
pub static OVERLAY_CONFIG: Array<OverlayConfig> = Array::pinned(1, 0);
