//! `cargo xtask bench flowlog`: what flow logging costs on the per-packet path and how many
//! flow events per second the agent's consumer sustains before it counts loss.
//!
//! Setup: the overlay fixture (one host, `me` and `peer` in VPC A), `peer` in a security
//! group without inbound rules, so a TCP SYN from `me` to `peer` runs the whole policy
//! check (conntrack miss, `me`'s outbound rule, `peer`'s inbound lookup) and is dropped:
//! the port program does not rewrite a frame it drops, so the kernel's BPF_PROG_TEST_RUN
//! `repeat` loop runs the same packet again and again, each one a flow event when logging
//! is on.
//!
//! 1. [`per_packet_cost`]: ns/packet of that path with flow logging off (no `EP_LOG_*`
//!    flag: one flag test) and on (an event reserved, filled and submitted to the ring
//!    buffer), the kernel's average over `repeat` runs, median of samples (the ring is
//!    drained between samples, so "on" never measures the cheaper full-ring path).
//! 2. [`consumer_rate`]: the agent's real consumer (`controlplane::flowlogs::consumer` over
//!    the pinned ring buffer, aggregating into 1 s windows) in its own thread, while a
//!    producer thread generates events at increasing target rates (bursts every 10 ms, a new
//!    source port per burst, so each window has many flows). Per rate: events produced,
//!    consumed, lost (`FLOWLOG_LOST` delta), records written. The result is the highest
//!    rate with zero loss, and the loss beyond it; and the consumer's own capacity: a full
//!    ring drained into the aggregator with no producer running.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use controlplane::{
    datapath::PinLayout,
    datapath::flow_maps::{FlowCounters, FlowEvents},
    flowlogs::{
        Aggregator, EventSource as _, FlowContext, FlowLogStats, LocalEndpoint, RingSource,
        clock::{MonoToWall, monotonic_ns},
        consumer,
    },
    overlay::flowlog::{FlowLogDoc, TrafficType},
    policy::SecurityGroup,
};
use dataplane_common::{
    Hook,
    conntrack::tcp_flags,
    flowlog::EP_LOG_ANY,
    testpkt::{tcp, v4, with_macs},
};

use crate::{
    overlay_fixture::{Fixture, ME_MAC, PolicySpec, ROUTER, fixture},
    testrun::TC_ACT_SHOT,
};

const ME_IP: [u8; 4] = [10, 0, 1, 10];
const PEER_IP: [u8; 4] = [10, 0, 2, 20];

/// Knobs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runs per sample of part 1 (below the ring's ~43 000 records).
    pub repeat: u32,
    /// Samples of part 1.
    pub samples: usize,
    /// Seconds per rate of part 2.
    pub seconds: f64,
    /// Target rates of part 2, events/s.
    pub rates: Vec<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            repeat: 20_000,
            samples: 15,
            seconds: 2.0,
            rates: vec![
                100_000, 250_000, 500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000,
            ],
        }
    }
}

fn syn(sport: u16) -> Vec<u8> {
    with_macs(
        &tcp(v4(ME_IP, PEER_IP), sport, 5432, tcp_flags::SYN, b""),
        ROUTER,
        ME_MAC,
    )
}

/// The fixture with `peer` closed, logging on or off for both endpoints.
fn setup(f: &mut Fixture, logging: bool) {
    f.state.flow_log_flags = if logging {
        [
            ("me".to_owned(), EP_LOG_ANY),
            ("peer".to_owned(), EP_LOG_ANY),
        ]
        .into_iter()
        .collect()
    } else {
        HashMap::<String, u32>::new().into_iter().collect()
    };
    f.apply_policy(&PolicySpec {
        security_groups: vec![SecurityGroup {
            id: "sg-closed".into(),
            vpc: "vpc-a".into(),
            default: false,
            inbound: Vec::new(),
            outbound: Vec::new(),
        }],
        memberships: vec![("peer".into(), vec!["sg-closed".into()])],
        ..PolicySpec::default()
    });
}

/// Average ns per run of `repeat` runs of the dropped SYN.
fn sample(f: &Fixture, repeat: u32, sport: u16) -> Result<f64> {
    let frame = syn(sport);
    let r =
        f.ns.run(|| f.dp.run_on(Hook::Port, &frame, repeat, Some(f.me)))?;
    ensure!(
        r.retval == TC_ACT_SHOT,
        "the SYN must be dropped (retval {})",
        r.retval
    );
    Ok(r.per_run.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Part 1: ns/packet with logging off and on. Returns (off, on).
pub fn per_packet_cost(opts: &Options) -> Result<(f64, f64)> {
    let mut f = fixture("flc");
    let mut ring = FlowEvents::open_flow_events(f.dp.layout())?;
    let mut drain = || while ring.next().is_some() {};
    let mut off = Vec::new();
    let mut on = Vec::new();
    // Interleaved, so drift affects both alike.
    for i in 0..opts.samples {
        setup(&mut f, false);
        off.push(sample(&f, opts.repeat, 1000 + i as u16)?);
        setup(&mut f, true);
        drain();
        on.push(sample(&f, opts.repeat, 1000 + i as u16)?);
    }
    drain();
    let lost = FlowCounters::open(f.dp.layout())?.flowlog_lost()?;
    let (off, on) = (median(off), median(on));
    println!(
        "flow logging on the per-packet path (dropped TCP SYN through the full policy check, port program):"
    );
    println!("  {:<28} {:>10}", "", "ns/packet");
    println!("  {:<28} {:>10.1}", "logging off", off);
    println!("  {:<28} {:>10.1}", "logging on (event per packet)", on);
    println!(
        "  {:<28} {:>10.1}   (median of {} samples of {} runs; {} events lost)",
        "cost of logging",
        on - off,
        opts.samples,
        opts.repeat,
        lost
    );
    Ok((off, on))
}

/// One rate's result.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateRow {
    /// Target events/s.
    pub target: u64,
    /// Events generated per second (what the producer reached).
    pub produced_per_s: f64,
    /// Events generated.
    pub produced: u64,
    /// Events the consumer read.
    pub consumed: u64,
    /// Events the kernel could not queue.
    pub lost: u64,
    /// Records the consumer produced.
    pub records: u64,
}

/// Part 2: the consumer's sustained rate.
pub fn consumer_rate(opts: &Options) -> Result<Vec<RateRow>> {
    let mut f = fixture("flr");
    setup(&mut f, true);
    let layout = f.dp.layout().clone();
    let counters = FlowCounters::open(&layout)?;
    let stats = Arc::new(FlowLogStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (ctx_tx, ctx_rx) = std::sync::mpsc::channel();
    let ep = |id: &str, subnet: &str| LocalEndpoint {
        instance: id.into(),
        subnet: subnet.into(),
        vpc: "vpc-a".into(),
        groups: Vec::new(),
        acl: None,
        flow_logs: vec![0],
    };
    ctx_tx.send(Arc::new(FlowContext {
        host: "h0".into(),
        flow_logs: vec![FlowLogDoc {
            id: "fl-bench".into(),
            account: "111122223333".into(),
            resource: "vpc-a".into(),
            vpc: "vpc-a".into(),
            traffic_type: TrafficType::All,
            window_secs: 1,
        }],
        endpoints: [(f.me, ep("i-me", "a1")), (f.peer, ep("i-peer", "a2"))]
            .into_iter()
            .collect(),
        rules: Arc::default(),
    }))?;
    let ctx = ctx_rx.recv()?;
    let capacity = drain_capacity(&f, &layout, &ctx)?;
    let ctx_for_overload = Arc::clone(&ctx);
    ctx_tx.send(ctx)?;
    let source = RingSource::open(&layout)?;
    let consumer = {
        let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("flowlog-consumer".into())
            .spawn(move || consumer::run(source, &ctx_rx, &stats, &stop, |_records| {}))
            .context("starting the consumer")?
    };
    // Frames with distinct source ports, made before the clock runs.
    let frames: Vec<Vec<u8>> = (0..1000u16).map(|i| syn(10_000 + i)).collect();
    let tick = Duration::from_millis(10);
    let mut rows = Vec::new();
    for &target in &opts.rates {
        let per_tick = ((target as f64) * tick.as_secs_f64()).round().max(1.0) as u32;
        let lost0 = counters.flowlog_lost()?;
        let (ev0, rec0) = (stats.events.load(Relaxed), stats.records.load(Relaxed));
        let start = Instant::now();
        let mut produced = 0u64;
        let mut next = start;
        let mut burst = 0usize;
        f.ns.run(|| -> Result<()> {
            while start.elapsed().as_secs_f64() < opts.seconds {
                let frame = &frames[burst % frames.len()];
                burst += 1;
                let r = f.dp.run_on(Hook::Port, frame, per_tick, Some(f.me))?;
                ensure!(r.retval == TC_ACT_SHOT, "retval {}", r.retval);
                produced += u64::from(per_tick);
                next += tick;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
            }
            Ok(())
        })?;
        let elapsed = start.elapsed().as_secs_f64();
        // Let the consumer catch up with what is queued.
        let settle = Instant::now();
        let mut last = stats.events.load(Relaxed);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = stats.events.load(Relaxed);
            if now == last || settle.elapsed() > Duration::from_secs(5) {
                break;
            }
            last = now;
        }
        // The window with these events closes within a second.
        std::thread::sleep(Duration::from_millis(1100));
        let row = RateRow {
            target,
            produced_per_s: produced as f64 / elapsed,
            produced,
            consumed: stats.events.load(Relaxed) - ev0,
            lost: counters.flowlog_lost()? - lost0,
            records: stats.records.load(Relaxed) - rec0,
        };
        rows.push(row);
        // Past the point of loss by a factor of 4: enough.
        if rows.iter().filter(|r| r.lost > 0).count() >= 2 {
            break;
        }
    }
    stop.store(true, Relaxed);
    let _ = consumer.join();
    let overload = overload(&f, &layout, &ctx_for_overload)?;
    println!();
    println!(
        "flow events per second the agent's consumer sustains (1 s windows, {} s per rate):",
        opts.seconds
    );
    println!(
        "  {:>12} {:>14} {:>12} {:>12} {:>10} {:>8} {:>9}",
        "TARGET/s", "PRODUCED/s", "PRODUCED", "CONSUMED", "LOST", "LOSS %", "RECORDS"
    );
    for r in &rows {
        println!(
            "  {:>12} {:>14.0} {:>12} {:>12} {:>10} {:>8.3} {:>9}",
            r.target,
            r.produced_per_s,
            r.produced,
            r.consumed,
            r.lost,
            100.0 * r.lost as f64 / r.produced.max(1) as f64,
            r.records
        );
    }
    let best = rows
        .iter()
        .take_while(|r| r.lost == 0)
        .map(|r| r.produced_per_s)
        .fold(0.0, f64::max);
    println!(
        "  sustained without loss: {best:.0} events/s (every produced event consumed or counted: consumed + lost = produced)"
    );
    println!(
        "  consumer capacity (draining a full ring into the aggregator, no producer): {capacity:.0} events/s"
    );
    println!(
        "  overload (no consumer, {} events at once): {} queued, {} lost and counted; the window's {} records are SKIPDATA with skipped-events {}",
        overload.produced, overload.consumed, overload.lost, overload.records, overload.lost
    );
    for r in &rows {
        ensure!(
            r.consumed + r.lost == r.produced,
            "events unaccounted for at {} /s: produced {}, consumed {}, lost {}",
            r.target,
            r.produced,
            r.consumed,
            r.lost
        );
    }
    Ok(rows)
}

/// Events/s the consumer's drain and aggregation reach on a full ring with no producer
/// competing (the median of 5 rounds of 40 000 events, 40 flows each).
fn drain_capacity(f: &Fixture, layout: &PinLayout, ctx: &Arc<FlowContext>) -> Result<f64> {
    let stats = Arc::new(FlowLogStats::default());
    let mut agg = Aggregator::new(Arc::clone(ctx), Arc::clone(&stats), monotonic_ns());
    let mut src = RingSource::open(layout)?;
    let mut rates = Vec::new();
    for round in 0..5u16 {
        f.ns.run(|| -> Result<()> {
            for i in 0..40u16 {
                let r =
                    f.dp.run_on(Hook::Port, &syn(30_000 + round * 100 + i), 1000, Some(f.me))?;
                ensure!(r.retval == TC_ACT_SHOT, "retval {}", r.retval);
            }
            Ok(())
        })?;
        let start = Instant::now();
        let mut n = 0;
        loop {
            let k = src.drain(8192, &mut |ev| agg.add(ev));
            if k == 0 {
                break;
            }
            n += k;
        }
        let t = start.elapsed().as_secs_f64();
        ensure!(n == 40_000, "drained {n} of 40000 events");
        rates.push(n as f64 / t);
    }
    Ok(median(rates))
}

/// Loss accounting under overload: 100 000 events at once with nobody draining (the ring
/// holds about 43 000), then the consumer's drain and flush. Checks that what was not
/// queued is counted and that the window's records say SKIPDATA with that count.
fn overload(f: &Fixture, layout: &PinLayout, ctx: &Arc<FlowContext>) -> Result<RateRow> {
    let stats = Arc::new(FlowLogStats::default());
    let mut src = RingSource::open(layout)?;
    while src.drain(8192, &mut |_| {}) > 0 {}
    // The loss counter's baseline is taken at the first reading.
    src.lost();
    let mut agg = Aggregator::new(Arc::clone(ctx), Arc::clone(&stats), monotonic_ns());
    let produced = 100_000u32;
    let r =
        f.ns.run(|| f.dp.run_on(Hook::Port, &syn(40_000), produced, Some(f.me)))?;
    ensure!(r.retval == TC_ACT_SHOT, "retval {}", r.retval);
    let mut consumed = 0;
    loop {
        let k = src.drain(8192, &mut |ev| agg.add(ev));
        if k == 0 {
            break;
        }
        consumed += k as u64;
    }
    let lost = src.lost();
    stats.kernel_lost.store(lost, Relaxed);
    let records = agg.flush(monotonic_ns(), &MonoToWall::sample(), true);
    ensure!(lost > 0, "an overfull ring must lose events");
    ensure!(
        consumed + lost == u64::from(produced),
        "produced {produced}, consumed {consumed}, lost {lost}"
    );
    ensure!(
        !records.is_empty()
            && records
                .iter()
                .all(|r| r.log_status == "SKIPDATA" && r.skipped_events == lost),
        "records must report the loss: {records:?}"
    );
    Ok(RateRow {
        target: 0,
        produced_per_s: 0.0,
        produced: u64::from(produced),
        consumed,
        lost,
        records: records.len() as u64,
    })
}

/// Both parts.
pub fn run(opts: &Options) -> Result<()> {
    per_packet_cost(opts)?;
    consumer_rate(opts)?;
    Ok(())
}
