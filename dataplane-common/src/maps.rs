//! Names and sizes of the datapath maps, shared by the eBPF object and its loader.
//!
//! Maps are pinned by name under `<pin root>/<MAPS_ABI>/maps/`. Architecture invariant: when
//! the type, key, value or size of any pinned map changes, bump [`MAPS_ABI`], so a new agent
//! never reuses an old pin with another layout (it starts a fresh set beside the old one).

/// Version of the pinned-map layout; names the pin subdirectory.
pub const MAPS_ABI: &str = "v6";

/// The previous layout an agent migrates from (`controlplane::datapath::migrate`): v6 added
/// packet and byte counters to `CONNTRACK` values and the maps below marked "v6"; every
/// other map kept its layout and is carried over as is.
pub const PREVIOUS_MAPS_ABI: &str = "v5";

/// Name of the per-CPU (hook, action) counter array.
pub const ACTION_STATS: &str = "ACTION_STATS";
/// Name of the per-CPU (hook, drop reason) counter array.
pub const DROP_STATS: &str = "DROP_STATS";
/// Name of the filter hash map.
pub const FILTER: &str = "FILTER";

/// Capacity of `FILTER`: generous for hand-installed flow rules, small enough (~100 KiB of
/// kernel memory) to preallocate.
pub const FILTER_MAX_ENTRIES: u32 = 4096;

/// Name of the instance-port array (host-side veth ifindex -> endpoint).
pub const ENDPOINTS: &str = "ENDPOINTS";
/// Name of the (VNI, address) -> neighbor hash map.
pub const NEIGHBORS: &str = "NEIGHBORS";
/// Name of the per-VPC LPM route trie.
pub const ROUTES: &str = "ROUTES";
/// Name of the known-VTEP set.
pub const VTEPS: &str = "VTEPS";
/// Name of the known-VNI set.
pub const VNIS: &str = "VNIS";
/// Name of the one-entry overlay configuration array.
pub const OVERLAY_CONFIG: &str = "OVERLAY_CONFIG";

/// Capacity of `ENDPOINTS`: instance ports (and health-check nodes) on one host. Instances
/// here are namespaces, not VMs: `cargo xtask bench compute` ran 1000 on a 2-vCPU host at
/// ~1.1 MiB each and then hit the former 1024. Allocated on demand (no preallocation), so
/// the size costs nothing until used. The control plane places at most
/// [`HOST_INSTANCE_CAPACITY`] instances on a host.
pub const ENDPOINTS_MAX_ENTRIES: u32 = 4096;
/// Instances the control plane places on one host: `ENDPOINTS` less room for the load
/// balancers' health-check nodes.
pub const HOST_INSTANCE_CAPACITY: u32 = ENDPOINTS_MAX_ENTRIES - 256;
/// Capacity of `NEIGHBORS`: every instance and subnet gateway of the VPCs present on this
/// host (~2.6 MiB preallocated).
pub const NEIGHBORS_MAX_ENTRIES: u32 = 65536;
/// Capacity of `ROUTES`: a few routes per VPC (allocated on demand: LPM tries are never
/// preallocated).
pub const ROUTES_MAX_ENTRIES: u32 = 4096;
/// Capacity of `VTEPS`: hosts of the cluster.
pub const VTEPS_MAX_ENTRIES: u32 = 4096;
/// Capacity of `VNIS`: VPCs present on one host.
pub const VNIS_MAX_ENTRIES: u32 = 4096;

/// Name of the conntrack LRU hash.
pub const CONNTRACK: &str = "CONNTRACK";
/// Name of the one-entry conntrack configuration array.
pub const CT_CONFIG: &str = "CT_CONFIG";
/// Name of the security-group address-stage trie.
pub const SG_ADDR: &str = "SG_ADDR";
/// Name of the security-group port-stage trie.
pub const SG_PORT: &str = "SG_PORT";
/// Name of the network-ACL address-stage trie.
pub const ACL_ADDR: &str = "ACL_ADDR";
/// Name of the network-ACL port-stage trie.
pub const ACL_PORT: &str = "ACL_PORT";
/// Name of the per-endpoint drop counters.
pub const ENDPOINT_DROPS: &str = "ENDPOINT_DROPS";

/// Default capacity of `CONNTRACK` (the loader can raise it, `vpc-agent --conntrack-max`):
/// ~30 MiB of kernel memory preallocated (LRU maps always are).
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
/// Capacity of each policy trie. LPM tries allocate entries on demand, so the bound costs
/// nothing until used: room for 100 000 rules per host with their port blocks.
pub const POLICY_MAX_ENTRIES: u32 = 1 << 21;
/// Capacity of `ENDPOINT_DROPS` (LRU: a full table forgets the stalest counter): ports per
/// host times the port drop reasons.
pub const ENDPOINT_DROPS_MAX_ENTRIES: u32 = 16_384;

/// Name of the per-endpoint (direction, action) counters (v6).
pub const ENDPOINT_STATS: &str = "ENDPOINT_STATS";
/// Capacity of `ENDPOINT_STATS` (LRU per-CPU hash): ports x 2 directions x a few actions.
pub const ENDPOINT_STATS_MAX_ENTRIES: u32 = 32_768;
/// Name of the flow-log ring buffer (v6).
pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
/// Name of the per-CPU count of flow-log events lost to a full ring buffer (v6, index 0).
pub const FLOWLOG_LOST: &str = "FLOWLOG_LOST";
/// Name of the packet-trace ring buffer (v6).
pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
/// Name of the per-VPC conntrack budget hash (v6).
pub const CT_BUDGET: &str = "CT_BUDGET";
/// Capacity of `CT_BUDGET`: VPCs on one host (as `VNIS`).
pub const CT_BUDGET_MAX_ENTRIES: u32 = VNIS_MAX_ENTRIES;

/// Name of the listener hash (`crate::lb`).
pub const LB_SERVICES: &str = "LB_SERVICES";
/// Name of the backend hash.
pub const LB_BACKENDS: &str = "LB_BACKENDS";
/// Name of the Maglev slot array.
pub const LB_MAGLEV: &str = "LB_MAGLEV";
/// Name of the balanced-flow LRU hash.
pub const LB_FLOWS: &str = "LB_FLOWS";
/// Name of the reverse-NAT LRU hash.
pub const LB_REVERSE: &str = "LB_REVERSE";

/// Capacity of `LB_SERVICES`: listeners of the VPCs on one host (allocated on demand).
pub const LB_SERVICES_MAX_ENTRIES: u32 = 16_384;
/// Capacity of `LB_BACKENDS`: targets of those listeners, including draining ones
/// (allocated on demand).
pub const LB_BACKENDS_MAX_ENTRIES: u32 = 262_144;
/// Default capacity of `LB_MAGLEV` in slots (the loader can change it, `vpc-agent
/// --lb-table-slots`): 16 MiB, room for 64 tables of the default 65 537 slots, or a
/// 1 000 003-slot table (10 000 targets) written beside the one it replaces.
pub const LB_MAGLEV_SLOTS: u32 = 1 << 22;
/// Default capacity of `LB_FLOWS` and of `LB_REVERSE` (LRU; the loader sizes them like
/// `CONNTRACK`).
pub const LB_FLOWS_MAX_ENTRIES: u32 = 262_144;

/// Program names in the object, as the loader finds them.
pub mod programs {
    /// XDP receive program.
    pub const XDP: &str = "vpc_xdp";
    /// TC ingress classifier.
    pub const TC_INGRESS: &str = "vpc_tc_ingress";
    /// TC egress classifier.
    pub const TC_EGRESS: &str = "vpc_tc_egress";
    /// TC ingress classifier of instance ports.
    pub const PORT: &str = "vpc_port";
}
