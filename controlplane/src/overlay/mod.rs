//! The VPC overlay, from desired state to this host's map contents.
//!
//! - [`model`]: the desired state the control plane streams (VPCs, subnets, hosts,
//!   endpoints), cluster-wide.
//! - [`compile`]: a pure function from that state to what one host's maps must hold.
//! - [`diff`]: the ordered map operations that move the maps from one content to another.
//! - [`flowlog`]: flow logs in the document and the endpoint flags they set.
//! - [`statefile`]: the JSON document the agent reads desired state from (until the
//!   control plane streams it).
//!
//! Everything here is pure and unit-tested; applying operations to pinned maps is
//! `datapath::overlay_maps`, driven by the agent.

pub mod compile;
pub mod diff;
pub mod flowlog;
pub mod model;
pub mod statefile;

pub use compile::{CompileError, HostMaps, NeighborEntry, compile};
pub use diff::{MapOp, diff};
pub use model::{EndpointSpec, HostSpec, OverlayState, SubnetSpec, VpcSpec};

#[cfg(test)]
mod tests;
