//! Names and sizes of the datapath maps, shared by the eBPF object and its loader.
//!
//! Maps are pinned by name under `<pin root>/<MAPS_ABI>/maps/`. Architecture invariant: when
//! the type, key, value or size of any pinned map changes, bump [`MAPS_ABI`], so a new agent
//! never reuses an old pin with another layout (it starts a fresh set beside the old one).

/// Version of the pinned-map layout; names the pin subdirectory.
pub const MAPS_ABI: &str = "v1";

/// Name of the per-CPU (hook, action) counter array.
pub const ACTION_STATS: &str = "ACTION_STATS";
/// Name of the per-CPU (hook, drop reason) counter array.
pub const DROP_STATS: &str = "DROP_STATS";
/// Name of the filter hash map.
pub const FILTER: &str = "FILTER";

/// Capacity of `FILTER`: generous for hand-installed flow rules, small enough (~100 KiB of
/// kernel memory) to preallocate.
pub const FILTER_MAX_ENTRIES: u32 = 4096;

/// Program names in the object, as the loader finds them.
pub mod programs {
    /// XDP receive program.
    pub const XDP: &str = "vpc_xdp";
    /// TC ingress classifier.
    pub const TC_INGRESS: &str = "vpc_tc_ingress";
    /// TC egress classifier.
    pub const TC_EGRESS: &str = "vpc_tc_egress";
}
