//! Counters of the flow-log pipeline on one host, shared with the metrics endpoint and the
//! logs (atomics: the consumer thread writes, anyone reads).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The counters.
#[derive(Debug, Default)]
pub struct FlowLogStats {
    /// Events read from the ring buffer.
    pub events: AtomicU64,
    /// Events the kernel could not queue (ring buffer full): the `FLOWLOG_LOST` sum.
    pub kernel_lost: AtomicU64,
    /// Events read but not aggregated: the aggregation table was full.
    pub agent_dropped: AtomicU64,
    /// Records produced.
    pub records: AtomicU64,
    /// Records not sent to the control plane because its queue was full (the host's file
    /// still has them).
    pub stream_dropped: AtomicU64,
    /// Events whose port is not a logged local endpoint (logging just turned off).
    pub unmatched: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowLogCounts {
    /// See [`FlowLogStats::events`].
    pub events: u64,
    /// See [`FlowLogStats::kernel_lost`].
    pub kernel_lost: u64,
    /// See [`FlowLogStats::agent_dropped`].
    pub agent_dropped: u64,
    /// See [`FlowLogStats::records`].
    pub records: u64,
    /// See [`FlowLogStats::stream_dropped`].
    pub stream_dropped: u64,
    /// See [`FlowLogStats::unmatched`].
    pub unmatched: u64,
}

impl FlowLogStats {
    /// The current values.
    pub fn snapshot(&self) -> FlowLogCounts {
        FlowLogCounts {
            events: self.events.load(Relaxed),
            kernel_lost: self.kernel_lost.load(Relaxed),
            agent_dropped: self.agent_dropped.load(Relaxed),
            records: self.records.load(Relaxed),
            stream_dropped: self.stream_dropped.load(Relaxed),
            unmatched: self.unmatched.load(Relaxed),
        }
    }

    /// Events lost on this host so far (kernel and agent): what SKIPDATA reports.
    pub fn lost(&self) -> u64 {
        self.kernel_lost.load(Relaxed) + self.agent_dropped.load(Relaxed)
    }
}
