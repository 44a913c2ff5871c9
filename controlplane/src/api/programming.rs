//! Network programming latency (an API write acknowledged -> the new state applied on every
//! connected host) and host liveness as this control-plane replica sees it.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
    time::Instant,
};

/// Acknowledged writes waiting for hosts, at most (older ones are dropped unmeasured).
const MAX_PENDING: usize = 100_000;
/// Latencies kept for percentiles.
const MAX_SAMPLES: usize = 10_000;

/// A host as seen by this replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostLive {
    /// Open desired-state streams.
    pub streams: usize,
    /// Highest revision it reported applied.
    pub applied: i64,
    /// Its last error (empty: the last state applied).
    pub error: String,
    /// Its datapath counters, last report.
    pub counters: Vec<vpc_proto::v1::DatapathCounter>,
    /// Drops between its last two reports with counters, and that interval in seconds.
    pub recent_drops: Vec<vpc_proto::v1::DatapathCounter>,
    /// The interval of `recent_drops`.
    pub recent_seconds: f64,
    /// When `counters` arrived.
    pub counters_at: Option<Instant>,
    /// Its load balancers' targets as its checks see them, last report.
    pub target_health: Vec<vpc_proto::v1::TargetHealthReport>,
    /// Its connection-tracking table, last report.
    pub conntrack: Option<vpc_proto::v1::ConntrackSummary>,
}

#[derive(Debug, Default)]
struct Inner {
    pending: VecDeque<(i64, Instant)>,
    hosts: BTreeMap<String, HostLive>,
    samples: VecDeque<f64>,
    count: u64,
    last_ms: f64,
}

/// The drop counters that grew from `before` to `after`, by how much (a counter that went
/// down was reset: its new value counts).
pub fn drop_deltas(
    before: &[vpc_proto::v1::DatapathCounter],
    after: &[vpc_proto::v1::DatapathCounter],
) -> Vec<vpc_proto::v1::DatapathCounter> {
    after
        .iter()
        .filter(|c| c.drop)
        .filter_map(|c| {
            let old = before
                .iter()
                .find(|b| b.drop && b.hook == c.hook && b.name == c.name)
                .map_or(0, |b| b.packets);
            let delta = if c.packets >= old {
                c.packets - old
            } else {
                c.packets
            };
            (delta > 0).then(|| vpc_proto::v1::DatapathCounter {
                packets: delta,
                bytes: 0,
                ..c.clone()
            })
        })
        .collect()
}

/// Latency summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    /// Writes measured.
    pub samples: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// Last, ms.
    pub last_ms: f64,
}

/// The tracker.
#[derive(Debug, Default)]
pub struct Programming {
    inner: Mutex<Inner>,
    /// Every latency sample, in seconds (the metrics endpoint's histogram).
    histogram: crate::metrics::ProgrammingHistogram,
}

impl Programming {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write was acknowledged at `revision`.
    pub fn acked(&self, revision: i64) {
        let mut g = self.lock();
        if !g.hosts.values().any(|h| h.streams > 0) {
            return;
        }
        if g.pending.len() == MAX_PENDING {
            g.pending.pop_front();
        }
        g.pending.push_back((revision, Instant::now()));
    }

    /// A host opened (`true`) or closed a desired-state stream.
    pub fn stream(&self, host: &str, open: bool) {
        let mut g = self.lock();
        let h = g.hosts.entry(host.to_owned()).or_default();
        if open {
            h.streams += 1;
        } else {
            h.streams = h.streams.saturating_sub(1);
        }
        complete(&mut g, &self.histogram);
    }

    /// A host applied `revision` (or failed to, with `error`).
    pub fn report(&self, host: &str, revision: i64, error: &str) {
        let mut g = self.lock();
        let h = g.hosts.entry(host.to_owned()).or_default();
        h.error = error.to_owned();
        if error.is_empty() && revision > h.applied {
            h.applied = revision;
        }
        complete(&mut g, &self.histogram);
    }

    /// A host's datapath counters arrived: keeps them and the drops since the previous ones.
    pub fn counters(&self, host: &str, counters: Vec<vpc_proto::v1::DatapathCounter>) {
        if counters.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut g = self.lock();
        let h = g.hosts.entry(host.to_owned()).or_default();
        if let Some(at) = h.counters_at {
            h.recent_drops = drop_deltas(&h.counters, &counters);
            h.recent_seconds = now.duration_since(at).as_secs_f64();
        }
        h.counters = counters;
        h.counters_at = Some(now);
    }

    /// A host's conntrack summary arrived.
    pub fn conntrack(&self, host: &str, summary: Option<vpc_proto::v1::ConntrackSummary>) {
        if summary.is_some() {
            self.lock()
                .hosts
                .entry(host.to_owned())
                .or_default()
                .conntrack = summary;
        }
    }

    /// A host's target health arrived.
    pub fn target_health(&self, host: &str, health: Vec<vpc_proto::v1::TargetHealthReport>) {
        self.lock()
            .hosts
            .entry(host.to_owned())
            .or_default()
            .target_health = health;
    }

    /// Hosts seen by this replica.
    pub fn hosts(&self) -> BTreeMap<String, HostLive> {
        self.lock().hosts.clone()
    }

    /// Every latency sample so far, in seconds, as a histogram.
    pub fn histogram(&self) -> crate::metrics::HistogramSnapshot {
        self.histogram.snapshot()
    }

    /// Percentiles of the kept samples.
    pub fn summary(&self) -> LatencySummary {
        let g = self.lock();
        let mut v: Vec<f64> = g.samples.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize]
            }
        };
        LatencySummary {
            samples: g.count,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: v.last().copied().unwrap_or(0.0),
            last_ms: g.last_ms,
        }
    }
}

/// Turns writes every connected host has applied into samples.
fn complete(g: &mut Inner, histogram: &crate::metrics::Histogram) {
    let Some(min) = g
        .hosts
        .values()
        .filter(|h| h.streams > 0)
        .map(|h| h.applied)
        .min()
    else {
        g.pending.clear();
        return;
    };
    let now = Instant::now();
    while let Some(&(rev, at)) = g.pending.front() {
        if rev > min {
            break;
        }
        g.pending.pop_front();
        let ms = now.duration_since(at).as_secs_f64() * 1e3;
        if g.samples.len() == MAX_SAMPLES {
            g.samples.pop_front();
        }
        g.samples.push_back(ms);
        g.count += 1;
        g.last_ms = ms;
        histogram.observe(ms / 1e3);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn recent_drops_are_the_growth_of_drop_counters() {
        let c = |name: &str, drop: bool, packets: u64| vpc_proto::v1::DatapathCounter {
            hook: "port".into(),
            name: name.into(),
            drop,
            packets,
            bytes: 0,
        };
        let before = [
            c("pass", false, 10),
            c("sg_ingress", true, 5),
            c("acl_egress", true, 7),
        ];
        let after = [
            c("pass", false, 20),
            c("sg_ingress", true, 8),
            c("acl_egress", true, 7),
            c("no_route", true, 2),
        ];
        let d = super::drop_deltas(&before, &after);
        let got: Vec<(&str, u64)> = d.iter().map(|x| (x.name.as_str(), x.packets)).collect();
        assert_eq!(got, vec![("sg_ingress", 3), ("no_route", 2)]);
        // A reset counter counts from zero.
        let d = super::drop_deltas(&[c("sg_ingress", true, 50)], &[c("sg_ingress", true, 4)]);
        assert_eq!(d[0].packets, 4);
    }

    use super::*;

    #[test]
    fn a_write_completes_when_every_connected_host_applied_it() {
        let p = Programming::default();
        p.acked(1); // no host connected: not measured
        p.stream("a", true);
        p.stream("b", true);
        p.acked(5);
        p.report("a", 5, "");
        assert_eq!(p.summary().samples, 0);
        p.report("b", 4, "");
        assert_eq!(p.summary().samples, 0);
        p.report("b", 6, "");
        assert_eq!(p.summary().samples, 1);
        assert_eq!(p.histogram().count, 1);
        // A failed apply does not count.
        p.acked(7);
        p.report("a", 7, "boom");
        p.report("b", 7, "");
        assert_eq!(p.summary().samples, 1);
        assert_eq!(p.hosts()["a"].error, "boom");
        // A host that disconnects no longer holds writes back.
        p.stream("a", false);
        assert_eq!(p.summary().samples, 2);
    }
}
