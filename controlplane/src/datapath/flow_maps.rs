//! Handles on the pinned observability maps: the flow-log ring buffer (`FLOW_EVENTS`), its
//! loss counter (`FLOWLOG_LOST`) and the per-endpoint traffic counters (`ENDPOINT_STATS`).
//!
//! Ownership and ordering: a BPF ring buffer has one consumer position, shared by every
//! process that maps it. Exactly one [`FlowEvents`] should consume at a time (the agent's
//! flow-log task); a second consumer would steal records, not duplicate them. Records come
//! out in the order their producers reserved them (across CPUs, not necessarily in
//! timestamp order: aggregate by flow, not by arrival). A record is released (its space
//! returned to the producers) as soon as [`FlowEvents::next`] returns it, since it is
//! copied out. When the consumer falls behind, producers fail to reserve and count each
//! lost record in `FLOWLOG_LOST`, read with [`FlowCounters::flowlog_lost`].

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd},
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use dataplane_common::{
    Counter, flowlog::FlowEvent, maps, stats::EndpointStatsKey, trace::TraceEvent,
};

use super::{
    DatapathError, PinLayout,
    map_io::{map_err, open},
};

/// Copies a record of type `T` out of a ring-buffer item (`None` if it is too short).
fn record<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= std::mem::size_of::<T>()).then(|| {
        // SAFETY: the slice holds at least `size_of::<T>()` bytes; `T` is a `#[repr(C)]`
        // plain-integer record for which every bit pattern is valid; the read is unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

/// A consumer of a pinned ring buffer of fixed-size `T` records.
pub struct RingConsumer<T> {
    ring: RingBuf<MapData>,
    name: &'static str,
    _record: std::marker::PhantomData<T>,
}

impl<T: Copy> RingConsumer<T> {
    fn open(layout: &PinLayout, name: &'static str) -> Result<Self, DatapathError> {
        Ok(RingConsumer {
            ring: RingBuf::try_from(Map::RingBuf(open(layout, name)?)).map_err(map_err(name))?,
            name,
            _record: std::marker::PhantomData,
        })
    }

    /// The next record, if one is ready (never blocks). Records of another size (none are
    /// written today) are skipped.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<T> {
        loop {
            let item = self.ring.next()?;
            if let Some(r) = record::<T>(&item) {
                return Some(r);
            }
        }
    }

    /// Appends every ready record to `out`, at most `max`; returns how many.
    pub fn drain_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(r) = self.next() else { break };
            out.push(r);
            n += 1;
        }
        n
    }

    /// The ring buffer's fd, readable (epoll/`tokio::io::unix::AsyncFd`) when records are
    /// ready: wait on it instead of polling.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// The map's name (for errors and logs).
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<T> std::fmt::Debug for RingConsumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingConsumer")
            .field("map", &self.name)
            .finish_non_exhaustive()
    }
}

/// The consumer of `FLOW_EVENTS` (see the module docs on ownership).
pub type FlowEvents = RingConsumer<FlowEvent>;
/// The consumer of `TRACE_EVENTS` (the trace runner drains it after each run).
pub type TraceEvents = RingConsumer<TraceEvent>;

impl RingConsumer<FlowEvent> {
    /// Opens the pinned `FLOW_EVENTS` ring buffer.
    pub fn open_flow_events(layout: &PinLayout) -> Result<FlowEvents, DatapathError> {
        Self::open(layout, maps::FLOW_EVENTS)
    }
}

impl RingConsumer<TraceEvent> {
    /// Opens the pinned `TRACE_EVENTS` ring buffer.
    pub fn open_trace_events(layout: &PinLayout) -> Result<TraceEvents, DatapathError> {
        Self::open(layout, maps::TRACE_EVENTS)
    }
}

/// Readers of the flow-log loss counter and the per-endpoint counters.
pub struct FlowCounters {
    lost: PerCpuArray<MapData, u64>,
    endpoint_stats: PerCpuHashMap<MapData, EndpointStatsKey, Counter>,
}

impl std::fmt::Debug for FlowCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowCounters").finish_non_exhaustive()
    }
}

impl FlowCounters {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(FlowCounters {
            lost: PerCpuArray::try_from(Map::PerCpuArray(open(layout, maps::FLOWLOG_LOST)?))
                .map_err(map_err(maps::FLOWLOG_LOST))?,
            endpoint_stats: PerCpuHashMap::try_from(Map::PerCpuLruHashMap(open(
                layout,
                maps::ENDPOINT_STATS,
            )?))
            .map_err(map_err(maps::ENDPOINT_STATS))?,
        })
    }

    /// Flow-log events lost to a full ring buffer since the map was created (summed over
    /// CPUs; monotonic).
    pub fn flowlog_lost(&self) -> Result<u64, DatapathError> {
        let per_cpu = self.lost.get(&0, 0).map_err(map_err(maps::FLOWLOG_LOST))?;
        Ok(per_cpu.iter().sum())
    }

    /// Packets and bytes per (endpoint port, direction, action), summed over CPUs.
    /// Counters are monotonic while the endpoint's port exists (LRU: long-gone ports are
    /// forgotten).
    pub fn endpoint_stats(&self) -> Result<BTreeMap<EndpointStatsKey, Counter>, DatapathError> {
        let mut out = BTreeMap::new();
        for r in self.endpoint_stats.iter() {
            let (key, per_cpu) = r.map_err(map_err(maps::ENDPOINT_STATS))?;
            out.insert(key, sum(per_cpu.iter()));
        }
        Ok(out)
    }
}

/// The sum of per-CPU counters.
pub fn sum<'a>(per_cpu: impl Iterator<Item = &'a Counter>) -> Counter {
    let mut total = Counter::default();
    for c in per_cpu {
        total.add(c);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_copied_out_of_unaligned_bytes_and_short_ones_refused() {
        let ev = TraceEvent {
            stage: 3,
            a: 1,
            b: 2,
            c: 3,
            d: 4,
            _pad: 0,
            addr: [7; 16],
        };
        let mut buf = vec![0u8; 1 + std::mem::size_of::<TraceEvent>()];
        // SAFETY: the destination has room for the record after the first byte.
        unsafe {
            std::ptr::write_unaligned(buf[1..].as_mut_ptr().cast::<TraceEvent>(), ev);
        }
        assert_eq!(record::<TraceEvent>(&buf[1..]), Some(ev));
        assert_eq!(record::<TraceEvent>(&buf[1..10]), None);
        let c = [
            Counter {
                packets: 1,
                bytes: 10,
            },
            Counter {
                packets: 2,
                bytes: 20,
            },
        ];
        assert_eq!(
            sum(c.iter()),
            Counter {
                packets: 3,
                bytes: 30
            }
        );
    }
}
