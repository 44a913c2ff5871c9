//! Where events come from: the pinned `FLOW_EVENTS` ring buffer and the `FLOWLOG_LOST`
//! counter (events the kernel could not queue), or anything else that implements
//! [`EventSource`] (benches, tests).

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use dataplane_common::{flowlog::FlowEvent, maps};

use crate::datapath::PinLayout;

/// Why the ring buffer could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("flow-log map {map}: {source}")]
pub struct SourceError {
    /// The map.
    pub map: &'static str,
    /// Cause.
    #[source]
    pub source: aya::maps::MapError,
}

/// A stream of flow events.
pub trait EventSource {
    /// Hands up to `max` queued events to `f`; returns how many (0: none queued now).
    fn drain(&mut self, max: usize, f: &mut dyn FnMut(&FlowEvent)) -> usize;
    /// Events lost before they could be queued, since the source was created (a running
    /// total: the kernel's counter survives agent restarts, so this is relative to the
    /// first reading).
    fn lost(&mut self) -> u64;
}

/// The datapath's ring buffer.
pub struct RingSource {
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
    lost_base: Option<u64>,
}

impl std::fmt::Debug for RingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingSource").finish_non_exhaustive()
    }
}

fn open(layout: &PinLayout, map: &'static str) -> Result<MapData, SourceError> {
    MapData::from_pin(layout.map(map)).map_err(|source| SourceError { map, source })
}

impl RingSource {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, SourceError> {
        let err = |map| move |source| SourceError { map, source };
        Ok(RingSource {
            ring: RingBuf::try_from(Map::RingBuf(open(layout, maps::FLOW_EVENTS)?))
                .map_err(err(maps::FLOW_EVENTS))?,
            lost: PerCpuArray::try_from(Map::PerCpuArray(open(layout, maps::FLOWLOG_LOST)?))
                .map_err(err(maps::FLOWLOG_LOST))?,
            lost_base: None,
        })
    }

    fn lost_total(&self) -> u64 {
        self.lost
            .get(&0, 0)
            .map(|v| v.iter().sum())
            .unwrap_or_default()
    }
}

/// Decodes one ring-buffer record (the kernel writes whole [`FlowEvent`]s).
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < core::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length was checked; FlowEvent is repr(C), plain integers and arrays (every
    // bit pattern is valid), and read_unaligned makes no alignment assumption.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

impl EventSource for RingSource {
    fn drain(&mut self, max: usize, f: &mut dyn FnMut(&FlowEvent)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(item) = self.ring.next() else { break };
            if let Some(ev) = decode(&item) {
                f(&ev);
            }
            n += 1;
        }
        n
    }

    fn lost(&mut self) -> u64 {
        let now = self.lost_total();
        let base = *self.lost_base.get_or_insert(now);
        now.saturating_sub(base)
    }
}

/// Events from memory (tests and the aggregation bench).
#[derive(Debug, Default)]
pub struct VecSource {
    /// Queued events.
    pub events: std::collections::VecDeque<FlowEvent>,
    /// Reported losses.
    pub lost: u64,
}

impl EventSource for VecSource {
    fn drain(&mut self, max: usize, f: &mut dyn FnMut(&FlowEvent)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(ev) = self.events.pop_front() else {
                break;
            };
            f(&ev);
            n += 1;
        }
        n
    }

    fn lost(&mut self) -> u64 {
        self.lost
    }
}
