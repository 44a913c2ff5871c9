//! Flow logs on a host: the datapath's `FLOW_EVENTS` ring buffer -> per-window aggregates ->
//! AWS version-2 records (plus the rule that decided and the drop reason) -> JSON lines on
//! the host and a stream to the control plane.
//!
//! - [`source`]: the ring buffer and the kernel's loss counter (or any [`EventSource`]).
//! - [`consumer`]: the dedicated thread draining it (never the reconcile loop).
//! - [`aggregate`]: the pure aggregation and record building ([`FlowContext`] is what it
//!   needs of the desired state).
//! - [`rules`]: naming the security-group rule that admitted a flow.
//! - [`record`]: the record and its formats. [`clock`]: CLOCK_MONOTONIC -> Unix time.
//! - [`sink`]: the JSON-lines files. [`stats`]: counters (loss is never silent).

pub mod aggregate;
pub mod clock;
pub mod consumer;
pub mod record;
pub mod rules;
pub mod sink;
pub mod source;
pub mod stats;
#[cfg(test)]
mod tests;

pub use aggregate::{Aggregator, FlowContext, LocalEndpoint};
pub use record::FlowRecord;
pub use rules::RuleBook;
pub use source::{EventSource, RingSource, VecSource};
pub use stats::{FlowLogCounts, FlowLogStats};
