//! The consumer: a dedicated thread (off the agent's reconcile loop) that drains the ring
//! buffer continuously, aggregates, and hands out each window's records.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc::Receiver,
    },
    time::Duration,
};

use super::{
    aggregate::{Aggregator, FlowContext},
    clock::{MonoToWall, monotonic_ns},
    record::FlowRecord,
    source::EventSource,
    stats::FlowLogStats,
};

/// Events taken from the source between checks of the clock and the context.
const BATCH: usize = 8192;
/// Pause when the source is empty (the ring holds ~40 000 events: at this pause the
/// consumer keeps up with millions of events per second).
const IDLE: Duration = Duration::from_millis(1);

/// Runs until `stop` is set: drains `source`, follows the contexts sent on `contexts`,
/// and passes each batch of finished records to `emit` (the final windows are flushed on
/// stop).
pub fn run(
    mut source: impl EventSource,
    contexts: &Receiver<Arc<FlowContext>>,
    stats: &Arc<FlowLogStats>,
    stop: &AtomicBool,
    mut emit: impl FnMut(Vec<FlowRecord>),
) {
    let mut clock = MonoToWall::sample();
    let mut agg = Aggregator::new(
        Arc::new(FlowContext::default()),
        Arc::clone(stats),
        monotonic_ns(),
    );
    loop {
        let mut latest = None;
        while let Ok(c) = contexts.try_recv() {
            latest = Some(c);
        }
        if let Some(ctx) = latest {
            stats.kernel_lost.store(source.lost(), Relaxed);
            let out = agg.set_context(ctx, monotonic_ns(), &clock);
            if !out.is_empty() {
                emit(out);
            }
        }
        let n = source.drain(BATCH, &mut |ev| agg.add(ev));
        stats.events.fetch_add(n as u64, Relaxed);
        let now = monotonic_ns();
        let stopping = stop.load(Relaxed);
        if stopping || agg.next_due().is_some_and(|due| now >= due) {
            stats.kernel_lost.store(source.lost(), Relaxed);
            clock = MonoToWall::sample();
            let out = agg.flush(now, &clock, stopping);
            if !out.is_empty() {
                emit(out);
            }
        }
        if stopping {
            return;
        }
        if n == 0 {
            std::thread::sleep(IDLE);
        }
    }
}
