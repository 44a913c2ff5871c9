//! Loading, pinning, attaching and programming the eBPF datapath.
//!
//! - [`bpffs`]: mounting bpffs and the pin directory layout.
//! - [`loader`]: loading the object and attaching programs, reusing pins across restarts.
//! - [`pinned`]: access to the pinned maps (counters, filter) without loading anything, for
//!   the agent, the CLI and tests.
//! - [`overlay_maps`]: reading and programming the pinned overlay maps.
//! - [`policy_maps`]: the pinned security-group, ACL and conntrack maps.
//! - [`policy_sync`]: installing compiled policy under ids (build new, switch, retire old).
//! - [`lb_maps`]: the pinned load-balancer maps and their reconciler (tables written beside
//!   the old ones, then switched).
//! - [`migrate`]: moving the pins of the previous maps ABI to this one (carry, convert,
//!   swap links), while traffic flows.
//! - [`flow_maps`]: the flow-log and trace ring buffers, flow-log loss and per-endpoint
//!   traffic counters.
//! - [`trace`]: packet traces (BPF_PROG_TEST_RUN in trace mode against the live maps).
//! - [`object`]: the embedded eBPF object.

pub mod bpffs;
mod error;
pub mod flow_maps;
pub mod lb_maps;
pub mod loader;
mod map_io;
pub mod migrate;
pub mod object;
pub mod overlay_maps;
pub mod pinned;
pub mod policy_maps;
pub mod policy_sync;
mod sys;
pub mod trace;

pub use bpffs::PinLayout;
pub use error::DatapathError;
pub use flow_maps::{FlowCounters, FlowEvents, TraceEvents};
pub use lb_maps::{LbMaps, LbSync};
pub use loader::{AttachOutcome, Attachment, Datapath, LoadOptions, XdpAttachMode};
pub use overlay_maps::OverlayMaps;
pub use pinned::{PinnedMaps, StatsSnapshot};
pub use policy_maps::PolicyMaps;
