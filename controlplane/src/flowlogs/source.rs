//! Where events come from: the pinned `FLOW_EVENTS` ring buffer and the `FLOWLOG_LOST`
//! counter (events the kernel could not queue; handles in `datapath::flow_maps`), or
//! anything else that implements [`EventSource`] (benches, tests).

use dataplane_common::flowlog::FlowEvent;

use crate::datapath::{
    DatapathError, PinLayout,
    flow_maps::{FlowCounters, FlowEvents},
};

/// A stream of flow events.
pub trait EventSource {
    /// Hands up to `max` queued events to `f`; returns how many (0: none queued now).
    fn drain(&mut self, max: usize, f: &mut dyn FnMut(&FlowEvent)) -> usize;
    /// Events lost before they could be queued, since the source was created (a running
    /// total: the kernel's counter survives agent restarts, so this is relative to the
    /// first reading).
    fn lost(&mut self) -> u64;
}

/// The datapath's ring buffer and loss counter (one consumer per host: see
/// `datapath::flow_maps`).
#[derive(Debug)]
pub struct RingSource {
    events: FlowEvents,
    counters: FlowCounters,
    lost_base: Option<u64>,
    last: u64,
}

impl RingSource {
    /// Opens the maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(RingSource {
            events: FlowEvents::open_flow_events(layout)?,
            counters: FlowCounters::open(layout)?,
            lost_base: None,
            last: 0,
        })
    }
}

impl EventSource for RingSource {
    fn drain(&mut self, max: usize, f: &mut dyn FnMut(&FlowEvent)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(ev) = self.events.next() else { break };
            f(&ev);
            n += 1;
        }
        n
    }

    fn lost(&mut self) -> u64 {
        // A failed read (the map is pinned and typed: not expected) keeps the last total.
        if let Ok(now) = self.counters.flowlog_lost() {
            let base = *self.lost_base.get_or_insert(now);
            self.last = now.saturating_sub(base);
        }
        self.last
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
