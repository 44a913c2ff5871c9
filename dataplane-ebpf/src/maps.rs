//! Every map of the datapath. Sizes are named constants in `dataplane_common::maps`.
//!
//! All maps are pinned by name (`pinned(...)`) so the loader reuses them across agent
//! restarts: counters keep counting, filter entries and the overlay keep forwarding while the
//! agent is away.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use dataplane_common::{
    Counter, FilterKey, FilterValue,
    conntrack::{CtBudget, CtConfig, CtEntry, CtKey},
    flowlog::FLOW_EVENTS_BYTES,
    lb::{LbBackend, LbFlow, LbReverse, LbService, LbServiceKey, LbTuple},
    maps::{
        CONNTRACK_MAX_ENTRIES, CT_BUDGET_MAX_ENTRIES, ENDPOINT_DROPS_MAX_ENTRIES,
        ENDPOINT_STATS_MAX_ENTRIES, ENDPOINTS_MAX_ENTRIES, FILTER_MAX_ENTRIES,
        LB_BACKENDS_MAX_ENTRIES, LB_FLOWS_MAX_ENTRIES, LB_MAGLEV_SLOTS, LB_SERVICES_MAX_ENTRIES,
        NEIGHBORS_MAX_ENTRIES, POLICY_MAX_ENTRIES, ROUTES_MAX_ENTRIES, VNIS_MAX_ENTRIES,
        VTEPS_MAX_ENTRIES,
    },
    overlay::{Endpoint, Neighbor, NeighborKey, OverlayConfig, Route, RoutePrefix},
    policy::{AclVerdict, PolicyAddrKey, PolicyPortKey},
    stats::{ACTION_STATS_ENTRIES, DROP_STATS_ENTRIES, EndpointDropKey, EndpointStatsKey},
    trace::TRACE_EVENTS_BYTES,
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
/// router MAC, gateway, security-group policy and ACL ids). Writer: the agent's reconciler.
/// Readers: `vpc_port` (the sender, and the receiver of local deliveries) and TC ingress (the
/// receiver of decapsulated packets). Size: `ENDPOINTS_MAX_ENTRIES` (ports per host).
/// Not preallocated: an update then publishes a new element and frees the old one after an
/// RCU grace period, so a program holding a reference never sees it rewritten (policy
/// switches update endpoints while traffic flows).
#[map]
pub static ENDPOINTS: HashMap<u32, Endpoint> =
    HashMap::pinned(ENDPOINTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Connection tracking. Key: [`CtKey`] (VNI, canonical 5-tuple); value: [`CtEntry`] (last
/// seen, state, opener; packets and bytes of both directions, added atomically). Writers:
/// `vpc_port` and TC ingress (create on admitted new flows within the VPC's `CT_BUDGET`,
/// refresh and count in place); the agent deletes expired entries. Readers: the same programs (one
/// lookup per IP packet), the agent (GC, pressure, per-VPC counts) and the CLI. Size: the
/// loader's `conntrack_max` (default `CONNTRACK_MAX_ENTRIES`); LRU, so a full table evicts
/// the stalest flow instead of failing.
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

/// Conntrack idle timeouts, index 0: [`CtConfig`]. Writer: the agent. Readers: the programs
/// that track flows. Size: 1.
#[map]
pub static CT_CONFIG: Array<CtConfig> = Array::pinned(1, 0);

/// Security groups, address stage. Key: [`PolicyAddrKey`] (policy id and direction, remote
/// prefix); value: class id. Writer: the agent's policy reconciler (new ids beside old ones,
/// then the endpoint switches). Reader: the port and TC ingress programs for new flows.
/// Size: `POLICY_MAX_ENTRIES` (allocated on demand).
#[map]
pub static SG_ADDR: LpmTrie<PolicyAddrKey, u32> = LpmTrie::pinned(POLICY_MAX_ENTRIES, 0);

/// Security groups, port stage. Key: [`PolicyPortKey`] (class, protocol, port block); value:
/// the allowing rule's reference (policy-local, nonzero; 0 would deny), reported in flow
/// logs and traces. Writer and readers as `SG_ADDR`. Size: `POLICY_MAX_ENTRIES`.
#[map]
pub static SG_PORT: LpmTrie<PolicyPortKey, u32> = LpmTrie::pinned(POLICY_MAX_ENTRIES, 0);

/// Network ACLs, address stage. As `SG_ADDR`, keyed by ACL id; read for every packet that
/// crosses a subnet boundary (ACLs are stateless).
#[map]
pub static ACL_ADDR: LpmTrie<PolicyAddrKey, u32> = LpmTrie::pinned(POLICY_MAX_ENTRIES, 0);

/// Network ACLs, port stage. Key: [`PolicyPortKey`]; value: [`AclVerdict`] (first matching
/// rule's action and number; user space stores disjoint blocks). As `ACL_ADDR` otherwise.
#[map]
pub static ACL_PORT: LpmTrie<PolicyPortKey, AclVerdict> = LpmTrie::pinned(POLICY_MAX_ENTRIES, 0);

/// Drops per endpoint and reason. Key: [`EndpointDropKey`] (port ifindex, reason); value:
/// [`Counter`] per CPU. Writers: the port and TC ingress programs. Readers: the agent and
/// `vpc datapath drops`. Size: `ENDPOINT_DROPS_MAX_ENTRIES`; LRU so it never fills up.
#[map]
pub static ENDPOINT_DROPS: LruPerCpuHashMap<EndpointDropKey, Counter> =
    LruPerCpuHashMap::pinned(ENDPOINT_DROPS_MAX_ENTRIES, 0);

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

/// Load-balancer listeners. Key: [`LbServiceKey`] (VNI, VIP, port, protocol); value:
/// [`LbService`] (service id, its range of `LB_MAGLEV`). Writer: the agent's load-balancer
/// sync (a new table range is written first, then this entry switches to it). Reader:
/// `vpc_port`, for packets to a VIP. Size: `LB_SERVICES_MAX_ENTRIES`; not preallocated, so
/// an update publishes a new element (readers never see a half-written one).
#[map]
pub static LB_SERVICES: HashMap<LbServiceKey, LbService> =
    HashMap::pinned(LB_SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Load-balancer targets. Key: backend id; value: [`LbBackend`] (address, port, state,
/// service). Writer: the agent (draining targets stay until their deregistration delay
/// ends). Reader: `vpc_port` (every balanced packet checks its flow's backend). Size:
/// `LB_BACKENDS_MAX_ENTRIES`; not preallocated (as `LB_SERVICES`).
#[map]
pub static LB_BACKENDS: HashMap<u32, LbBackend> =
    HashMap::pinned(LB_BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Maglev tables of all services, back to back. Index: slot; value: backend id. Writer: the
/// agent (batched writes into a free range, then the service switches to it). Reader:
/// `vpc_port` for new flows (one slot per flow). Size: the loader's `lb_table_slots`
/// (default `LB_MAGLEV_SLOTS`, 16 MiB).
#[map]
pub static LB_MAGLEV: Array<u32> = Array::pinned(LB_MAGLEV_SLOTS, 0);

/// Balanced flows. Key: [`LbTuple`] client -> VIP; value: [`LbFlow`] (backend, service, last
/// seen). Writer: `vpc_port` (new flows, a refresh at most once a second); the agent deletes
/// idle ones. Reader: `vpc_port` (every packet to a VIP). Size: the loader's `lb_flows_max`
/// (default `LB_FLOWS_MAX_ENTRIES`); LRU, so a full table forgets the stalest flow.
#[map]
pub static LB_FLOWS: LruHashMap<LbTuple, LbFlow> = LruHashMap::pinned(LB_FLOWS_MAX_ENTRIES, 0);

/// Reverse NAT of balanced flows. Key: [`LbTuple`] target -> client; value: [`LbReverse`]
/// (VIP and listener port). Writer: `vpc_port` with `LB_FLOWS`. Readers: `vpc_port` (local
/// deliveries) and TC ingress (decapsulated deliveries) for clients in VPCs with load
/// balancers. Size: as `LB_FLOWS`.
#[map]
pub static LB_REVERSE: LruHashMap<LbTuple, LbReverse> = LruHashMap::pinned(LB_FLOWS_MAX_ENTRIES, 0);

/// Traffic per endpoint, direction and action. Key: [`EndpointStatsKey`] (port ifindex,
/// `DIR_INGRESS`/`DIR_EGRESS`, `Action` number); value: [`Counter`] per CPU. Writers:
/// `vpc_port` (the sender's egress, the local receiver's ingress) and TC ingress
/// (decapsulated deliveries), not in trace runs. Readers: the agent's metrics endpoint
/// (`EndpointStatsMaps`, summing the CPUs). Size: `ENDPOINT_STATS_MAX_ENTRIES` (ports x 2
/// directions x a few actions); LRU, so ports gone long ago are forgotten first.
#[map]
pub static ENDPOINT_STATS: LruPerCpuHashMap<EndpointStatsKey, Counter> =
    LruPerCpuHashMap::pinned(ENDPOINT_STATS_MAX_ENTRIES, 0);

/// Flow-log events. Records: `dataplane_common::flowlog::FlowEvent`, one per packet that
/// reaches a policy check while either endpoint has `EP_LOG_ACCEPT`/`EP_LOG_REJECT` for
/// the verdict. Writers: `vpc_port` and TC ingress (reserve, fill, submit; a failed reserve
/// counts in `FLOWLOG_LOST`). Reader: the agent's flow-log consumer (one, which owns the
/// consumer position), in submission order per producer. Size: `FLOW_EVENTS_BYTES` (4 MiB,
/// ~40 000 records: a few ms of line-rate logging between two drains).
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(FLOW_EVENTS_BYTES, 0);

/// Flow-log events lost to a full `FLOW_EVENTS`, index 0: a `u64` per CPU. Writers: as
/// `FLOW_EVENTS` (plain increments: per CPU). Reader: the agent, which sums the CPUs and
/// reports loss. Size: 1.
#[map]
pub static FLOWLOG_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Packet-trace events. Records: `dataplane_common::trace::TraceEvent`, one per stage of a
/// run whose `skb->mark` is `TRACE_MARK` (only BPF_PROG_TEST_RUN sets it). Writers: the
/// programs in trace runs. Reader: the agent that started the run
/// (`controlplane::datapath::trace`), which drains it right after (runs are serialized).
/// Size: `TRACE_EVENTS_BYTES` (64 KiB: a trace is a dozen 48-byte records).
#[map]
pub static TRACE_EVENTS: RingBuf = RingBuf::pinned(TRACE_EVENTS_BYTES, 0);

/// Conntrack budget per VPC. Key: VNI; value: [`CtBudget`] (limit, count). Writers: the agent
/// (limits from configuration; its conntrack GC writes the true count back) and the
/// programs (atomic +1 on each new entry). Readers: `vpc_port` and TC ingress before
/// creating a conntrack entry (over the limit: drop `CtBudgetExceeded`). Size:
/// `CT_BUDGET_MAX_ENTRIES` (VPCs on one host); not preallocated.
#[map]
pub static CT_BUDGET: HashMap<u32, CtBudget> =
    HashMap::pinned(CT_BUDGET_MAX_ENTRIES, BPF_F_NO_PREALLOC);
