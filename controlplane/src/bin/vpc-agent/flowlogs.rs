//! The agent's flow logs: a dedicated thread drains the `FLOW_EVENTS` ring buffer and
//! aggregates (`controlplane::flowlogs::consumer`), each window's records are appended to
//! `<data-dir>/flowlogs/<fl-id>.jsonl` and queued for the control plane, where a task keeps
//! a `PublishFlowRecords` stream open (reconnecting with backoff). The reconciler sends the
//! flow-log context after each pass. Nothing here is on the per-packet path or the
//! reconcile loop; a full queue to the control plane drops records for the stream only
//! (counted; the file has them).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc as std_mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use controlplane::{
    datapath::PinLayout,
    flowlogs::{
        FlowContext, FlowLogStats, FlowRecord, RingSource, consumer,
        sink::{DEFAULT_MAX_BYTES, JsonlSink},
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};
use vpc_proto::v1::{self as pb, flow_log_service_client::FlowLogServiceClient};

use crate::cpclient::{CpConfig, connect_channel};

/// Batches of records queued for the control plane.
const QUEUE: usize = 1024;

/// The running flow-log pipeline.
pub struct FlowLogAgent {
    contexts: std_mpsc::Sender<Arc<FlowContext>>,
    /// Counters (the metrics endpoint reads them).
    pub stats: Arc<FlowLogStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FlowLogAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowLogAgent").finish_non_exhaustive()
    }
}

impl FlowLogAgent {
    /// Starts the consumer over the maps pinned under `layout`, writing under `dir`, and
    /// (with `cp`) the stream to the control plane.
    pub fn start(layout: &PinLayout, dir: PathBuf, cp: Option<CpConfig>) -> Result<Self> {
        let source = RingSource::open(layout).context("opening the flow-log ring buffer")?;
        let stats = Arc::new(FlowLogStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ctx_tx, ctx_rx) = std_mpsc::channel();
        let sink = JsonlSink::new(dir, DEFAULT_MAX_BYTES);
        let to_cp = cp.map(|cfg| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(publish_loop(cfg, rx));
            tx
        });
        let thread = {
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("flowlogs".into())
                .spawn(move || {
                    consumer::run(source, &ctx_rx, &stats, &stop, |records| {
                        emit(&sink, to_cp.as_ref(), &stats, records)
                    })
                })
                .context("starting the flow-log thread")?
        };
        Ok(FlowLogAgent {
            contexts: ctx_tx,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// The flow logs and logged endpoints after a pass.
    pub fn update(&self, ctx: FlowContext) {
        let _ = self.contexts.send(Arc::new(ctx));
    }
}

impl Drop for FlowLogAgent {
    /// Stops the thread after it flushed the running windows.
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn emit(
    sink: &JsonlSink,
    to_cp: Option<&mpsc::Sender<Vec<FlowRecord>>>,
    stats: &FlowLogStats,
    records: Vec<FlowRecord>,
) {
    if let Err(e) = sink.write(&records) {
        warn!(error = %e, records = records.len(), "writing flow-log records");
    }
    let lost = records.iter().map(|r| r.skipped_events).max().unwrap_or(0);
    if lost > 0 {
        warn!(
            lost,
            "flow-log events were lost in this window (records marked SKIPDATA)"
        );
    }
    if let Some(tx) = to_cp {
        let n = records.len() as u64;
        if tx.try_send(records).is_err() {
            stats.stream_dropped.fetch_add(n, Relaxed);
        }
    }
}

/// Runs until the agent stops: (re)connects the record stream and forwards batches.
async fn publish_loop(cfg: CpConfig, mut rx: mpsc::Receiver<Vec<FlowRecord>>) {
    let mut backoff = Duration::from_millis(200);
    // A batch the last stream could not take: sent first on the next one, not dropped.
    let mut pending = None;
    loop {
        match publish(&cfg, &mut rx, &mut pending).await {
            Ok(true) => return,
            Ok(false) => backoff = Duration::from_millis(200),
            Err(e) => warn!(
                error = format!("{e:#}"),
                "flow-record stream to the control plane"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One stream: `Ok(true)` when the agent is stopping (no more records).
/// `pending` is a batch a broken stream could not take; it goes first, and a batch this
/// stream cannot take is left there for the next. (The stream is the live tail: every record
/// is in the host's JSON-lines file first.)
async fn publish(
    cfg: &CpConfig,
    rx: &mut mpsc::Receiver<Vec<FlowRecord>>,
    pending: &mut Option<Vec<FlowRecord>>,
) -> Result<bool> {
    let (channel, bearer) = connect_channel(cfg).await?;
    let mut client = FlowLogServiceClient::with_interceptor(channel, bearer);
    // One batch in flight: what a breaking stream can lose is at most that (the file has it).
    let (tx, out) = mpsc::channel(1);
    tx.send(pb::FlowRecordBatch {
        host_id: cfg.host_id.clone(),
        records: Vec::new(),
    })
    .await?;
    let call = client.publish_flow_records(ReceiverStream::new(out));
    tokio::pin!(call);
    info!("flow-record stream open");
    loop {
        if let Some(records) = pending.take() {
            let batch = pb::FlowRecordBatch {
                host_id: String::new(),
                records: records.iter().map(pb::FlowLogRecord::from).collect(),
            };
            if tx.send(batch).await.is_err() {
                *pending = Some(records);
                return Ok(false);
            }
        }
        tokio::select! {
            done = &mut call => {
                done?;
                return Ok(false);
            }
            got = rx.recv() => {
                let Some(records) = got else { return Ok(true) };
                *pending = Some(records);
            }
        }
    }
}
