//! The control plane and host agent of the VPC appliance.
//!
//! Today this crate holds the host agent's datapath layer: [`datapath`] loads the embedded
//! eBPF object, pins its maps and links under bpffs, attaches the programs to interfaces and
//! reads and writes the pinned maps. The `vpc-agent` binary wraps it. [`overlay`] compiles the
//! desired VPC overlay state into this host's map contents (pure, unit-tested). [`policy`]
//! compiles security groups and network ACLs into the policy maps' contents (pure,
//! unit-tested). [`lb`] plans network load balancers (VIPs, targets, Maglev tables, health).

pub mod api;
pub mod compute;
pub mod datapath;
pub mod flowlogs;
pub mod fnv;
pub mod host;
pub mod lb;
pub mod metrics;
pub mod overlay;
pub mod policy;
pub mod storage;
