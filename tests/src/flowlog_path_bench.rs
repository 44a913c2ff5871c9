//! `cargo xtask bench flowlog-path`: the cost of flow logging on the per-packet path and the rate
//! at which a consumer drains the flow-log ring buffer.
//!
//! 1. ns/packet of the port program (BPF_PROG_TEST_RUN, kernel-timed, single runs: a
//!    repeated run would reuse the skb the first run rewrote) for an established flow and
//!    for new flows (each a new 5-tuple), with flow logging off and on for both endpoints.
//!    The ring is drained between rounds (a round writes fewer events than it holds), not
//!    during them: a consumer spinning on the same CPUs would inflate the kernel's timings.
//!    Several rounds, medians.
//! 2. Drain rate: one producer (one test run repeating a logged, denied packet) against one
//!    consumer thread: events produced, drained and lost (`FLOWLOG_LOST`), and events/s.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use controlplane::{
    datapath::{FlowCounters, FlowEvents},
    policy::SecurityGroup,
};
use dataplane_common::{
    Hook,
    conntrack::tcp_flags::{ACK, SYN},
    flowlog::EP_LOG_ANY,
    testpkt::{tcp, v4, with_macs},
};
use serde_json::json;

use crate::{
    overlay_fixture::{Fixture, ME_MAC, PEER_MAC, PolicySpec, ROUTER, fixture},
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT},
};

const ME: [u8; 4] = [10, 0, 1, 10];
const PEER: [u8; 4] = [10, 0, 2, 20];

/// Options of the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Packets of the established flow per round (single runs).
    pub repeat: u32,
    /// New flows per round.
    pub samples: u32,
    /// Rounds (medians over them).
    pub rounds: u32,
    /// Packets of the drain-rate run.
    pub drain_packets: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            repeat: 2_000,
            samples: 2_000,
            rounds: 5,
            drain_packets: 1_000_000,
        }
    }
}

fn policy() -> PolicySpec {
    let group = |v: serde_json::Value| -> SecurityGroup { serde_json::from_value(v).unwrap() };
    PolicySpec {
        security_groups: vec![
            group(json!({"id": "sg-web", "vpc": "vpc-a", "inbound": [
                {"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/16"}]})),
            group(json!({"id": "sg-client", "vpc": "vpc-a"})),
        ],
        memberships: vec![
            ("peer".into(), vec!["sg-web".into()]),
            ("me".into(), vec!["sg-client".into()]),
        ],
        ..PolicySpec::default()
    }
}

fn seg(sport: u16, flags: u8) -> Vec<u8> {
    with_macs(&tcp(v4(ME, PEER), sport, 80, flags, &[]), ROUTER, ME_MAC)
}

fn set_logging(f: &mut Fixture, on: bool) -> Result<()> {
    for port in [f.me, f.peer] {
        f.set_flow_log_flags(port, if on { EP_LOG_ANY } else { 0 });
    }
    Ok(())
}

/// A consumer thread draining `FLOW_EVENTS` until stopped; counts what it drained.
struct Consumer {
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Consumer {
    fn start(f: &Fixture) -> Result<Consumer> {
        let mut events = FlowEvents::open_flow_events(f.dp.layout())?;
        let stop = Arc::new(AtomicBool::new(false));
        let drained = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), drained.clone());
        let handle = thread::spawn(move || {
            let mut buf = Vec::with_capacity(4096);
            loop {
                buf.clear();
                let n = events.drain_into(&mut buf, 4096);
                d.fetch_add(n as u64, Ordering::Relaxed);
                if n == 0 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    thread::yield_now();
                }
            }
        });
        Ok(Consumer {
            stop,
            drained,
            handle: Some(handle),
        })
    }

    fn drained(&self) -> u64 {
        self.drained.load(Ordering::Relaxed)
    }

    /// Stops once the ring is empty; returns the total drained.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.drained()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// (established ns/packet, new-flow ns/packet) of one round.
fn round(f: &Fixture, opts: &Options, base: u16) -> Result<(f64, f64)> {
    f.ns.run(|| -> Result<(f64, f64)> {
        // Establish one flow (SYN, SYN-ACK, ACK), then time its ACKs.
        let sport = base;
        let r = f.dp.run_on(Hook::Port, &seg(sport, SYN), 1, Some(f.me))?;
        ensure!(r.retval == TC_ACT_REDIRECT, "SYN: {}", r.retval);
        let synack = with_macs(
            &tcp(v4(PEER, ME), 80, sport, SYN | ACK, &[]),
            ROUTER,
            PEER_MAC,
        );
        let r = f.dp.run_on(Hook::Port, &synack, 1, Some(f.peer))?;
        ensure!(r.retval == TC_ACT_REDIRECT, "SYN-ACK: {}", r.retval);
        // Single runs: a repeated run reuses the skb, which the first run rewrote (MACs).
        let ack = seg(sport, ACK);
        let mut est = Vec::with_capacity(opts.repeat as usize);
        for _ in 0..opts.repeat {
            let r = f.dp.run_on(Hook::Port, &ack, 1, Some(f.me))?;
            ensure!(r.retval == TC_ACT_REDIRECT, "ACK: {}", r.retval);
            est.push(r.per_run.as_nanos() as f64);
        }
        let established = median(&mut est);
        let mut new = Vec::with_capacity(opts.samples as usize);
        for i in 0..opts.samples {
            let frame = seg(base + 1 + i as u16, SYN);
            let r = f.dp.run_on(Hook::Port, &frame, 1, Some(f.me))?;
            ensure!(r.retval == TC_ACT_REDIRECT, "new flow: {}", r.retval);
            new.push(r.per_run.as_nanos() as f64);
        }
        Ok((established, median(&mut new)))
    })
}

/// Runs both parts and prints the tables.
pub fn run(opts: &Options) -> Result<()> {
    ensure!(
        u32::from(u16::MAX) > 2 * opts.rounds * (opts.samples + 1) + 1024,
        "too many samples for the port space"
    );
    let mut f = fixture("flbench");
    f.apply_policy(&policy());
    let counters = FlowCounters::open(f.dp.layout())?;
    let mut rows = Vec::new();
    let mut base = 1024u16;
    for on in [false, true] {
        set_logging(&mut f, on)?;
        // No consumer runs while timing (a spinning consumer on the same CPUs inflates the
        // kernel's timings): the ring holds ~43 000 events, more than a round writes; it
        // is drained between rounds.
        let mut events = FlowEvents::open_flow_events(f.dp.layout())?;
        let lost_before = counters.flowlog_lost()?;
        let (mut est, mut new) = (Vec::new(), Vec::new());
        let mut drained = 0u64;
        let mut buf = Vec::new();
        for _ in 0..opts.rounds {
            let (e, n) = round(&f, opts, base)?;
            base += opts.samples as u16 + 1;
            est.push(e);
            new.push(n);
            loop {
                buf.clear();
                let got = events.drain_into(&mut buf, 65_536);
                if got == 0 {
                    break;
                }
                drained += got as u64;
            }
        }
        let lost = counters.flowlog_lost()? - lost_before;
        if on {
            ensure!(
                drained == u64::from(opts.rounds * (opts.repeat + opts.samples + 2)),
                "logging on: {drained} events"
            );
        } else {
            ensure!(drained == 0, "logging off but {drained} events");
        }
        rows.push((on, median(&mut est), median(&mut new), drained, lost));
    }
    println!(
        "\nflow logging on the per-packet path (vpc_port, single BPF_PROG_TEST_RUN runs, medians of {} rounds)",
        opts.rounds
    );
    println!(
        "{:<10} {:>18} {:>18} {:>12} {:>8}",
        "logging", "established ns/pkt", "new flow ns/pkt", "events", "lost"
    );
    for (on, e, n, drained, lost) in &rows {
        println!(
            "{:<10} {:>18.1} {:>18.1} {:>12} {:>8}",
            if *on { "on" } else { "off" },
            e,
            n,
            drained,
            lost
        );
    }
    let (off, on) = (&rows[0], &rows[1]);
    println!(
        "cost of logging: established {:+.1} ns/pkt, new flow {:+.1} ns/pkt",
        on.1 - off.1,
        on.2 - off.2
    );

    // Part 2: drain rate.
    set_logging(&mut f, true)?;
    let consumer = Consumer::start(&f)?;
    let lost_before = counters.flowlog_lost()?;
    let drained_before = consumer.drained();
    // A denied packet (no inbound rule for port 22): logged as a reject on every run and
    // left unmodified, so one repeated test run produces one event per packet.
    let frame = with_macs(&tcp(v4(ME, PEER), base, 22, SYN, &[]), ROUTER, ME_MAC);
    let start = Instant::now();
    let r = f.ns.run(|| {
        f.dp.run_on(Hook::Port, &frame, opts.drain_packets, Some(f.me))
    })?;
    let produced_in = start.elapsed();
    ensure!(r.retval == TC_ACT_SHOT, "drain run: {}", r.retval);
    // Let the consumer empty the ring (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = consumer.drained();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        let now = consumer.drained();
        if now == last {
            break;
        }
        last = now;
    }
    let total = start.elapsed();
    let drained = consumer.finish() - drained_before;
    let lost = counters.flowlog_lost()? - lost_before;
    ensure!(
        drained + lost == u64::from(opts.drain_packets),
        "{drained} drained + {lost} lost != {} produced",
        opts.drain_packets
    );
    println!("\nflow-log ring drain (one producer test run, one consumer thread)");
    println!(
        "{:>10} {:>10} {:>10} {:>14} {:>14} {:>8}",
        "produced", "drained", "lost", "produce/s", "drained/s", "lost %"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>14.0} {:>14.0} {:>8.2}",
        opts.drain_packets,
        drained,
        lost,
        f64::from(opts.drain_packets) / produced_in.as_secs_f64(),
        drained as f64 / produced_in.as_secs_f64().max(total.as_secs_f64() - 0.05),
        100.0 * lost as f64 / f64::from(opts.drain_packets),
    );
    Ok(())
}
