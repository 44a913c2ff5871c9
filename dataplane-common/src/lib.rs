//! Everything the eBPF datapath and user space must agree on, in one `no_std` crate.
//!
//! - [`drop_reason`]: the one numbered list of reasons a packet is dropped, shared by the
//!   datapath, the metrics and the API.
//! - [`stats`]: the per-CPU counter layout (by hook and action, by hook and drop reason).
//! - [`filter`]: key and value of the filter map that decides pass/drop per flow.
//! - [`maps`]: map names, sizes and the pin-layout ABI version.
//! - [`overlay`]: keys and values of the VPC overlay maps.
//! - [`conntrack`], [`policy`]: connection tracking, security groups and network ACLs (map
//!   layout and the per-packet verdict).
//! - [`lb`]: network load balancers (map layout, flow hash).
//! - [`flowlog`]: flow-log events (ring buffer records, per-endpoint flags, the deciding
//!   rules); [`trace`]: packet-trace mode and its per-stage records.
//! - [`packet`], [`parse`], [`verdict`], [`port`], [`underlay`]: the pure per-packet logic
//!   (filter verdicts, instance-port forwarding, VXLAN receive), with the header builders
//!   [`arp`], [`vxlan`], [`icmp`] and [`checksum`]. It is written against the
//!   [`packet::PacketView`] trait so the kernel (reading packet memory through one
//!   bounds-checked accessor) and host unit tests (reading a byte slice) run the same code.
//!
//! Every map key and value is `#[repr(C)]`, has no implicit padding and has its size asserted
//! at compile time, so kernel and user space can never disagree about a layout silently.
#![no_std]

#[cfg(any(test, feature = "testing"))]
extern crate std;

pub mod arp;
pub mod checksum;
pub mod conntrack;
pub mod drop_reason;
pub mod filter;
pub mod flowlog;
pub mod icmp;
pub mod lb;
pub mod maps;
pub mod overlay;
#[cfg(test)]
mod overlay_tests;
pub mod packet;
pub mod parse;
pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod port;
pub mod stats;
#[cfg(any(test, feature = "testing"))]
pub mod testpkt;
pub mod trace;
pub mod underlay;
pub mod verdict;
pub mod vxlan;

#[cfg(feature = "user")]
mod pod;

pub use drop_reason::DropReason;
pub use filter::{FilterAction, FilterKey, FilterValue};
pub use stats::{Action, Counter, Hook};
