//! Histograms with fixed buckets (Prometheus semantics: a bucket counts observations less
//! than or equal to its bound), safe to observe from any thread, and the bucket sets used.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

/// API call latency (seconds): sub-millisecond reads up to slow writes behind fsync.
pub const API_LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Network programming latency and reconcile passes (seconds): a few milliseconds for a
/// map write, seconds when instances start.
pub const PROGRAMMING_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram's state: per-bucket (not cumulative) counts, the last one for `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds, increasing.
    pub bounds: Vec<f64>,
    /// Observations per bucket: `counts[i]` in `(bounds[i-1], bounds[i]]`; one more entry
    /// than `bounds` for the observations above the last bound.
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramSnapshot {
    /// An empty histogram over `bounds` (sorted, duplicates and non-finite bounds removed).
    pub fn new(bounds: &[f64]) -> Self {
        let mut b: Vec<f64> = bounds.iter().copied().filter(|x| x.is_finite()).collect();
        b.sort_by(f64::total_cmp);
        b.dedup();
        let n = b.len();
        HistogramSnapshot {
            bounds: b,
            counts: vec![0; n + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// A histogram shared between threads.
#[derive(Debug)]
pub struct Histogram {
    inner: Mutex<HistogramSnapshot>,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            inner: Mutex::new(HistogramSnapshot::new(bounds)),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(v);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> HistogramSnapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A histogram over [`PROGRAMMING_BUCKETS`] (its `Default`), for state that derives
/// `Default`: network programming latency, reconcile passes.
#[derive(Debug)]
pub struct ProgrammingHistogram(pub Histogram);

impl Default for ProgrammingHistogram {
    fn default() -> Self {
        ProgrammingHistogram(Histogram::new(PROGRAMMING_BUCKETS))
    }
}

impl std::ops::Deref for ProgrammingHistogram {
    type Target = Histogram;

    fn deref(&self) -> &Histogram {
        &self.0
    }
}

/// Histograms by label values (e.g. method and code), with a bound on the number of series:
/// label values past the bound are folded into one `overflow` series, so a client sending
/// arbitrary method names cannot grow memory or the scrape without limit.
#[derive(Debug)]
pub struct HistogramVec {
    bounds: Vec<f64>,
    max_series: usize,
    series: Mutex<BTreeMap<Vec<String>, HistogramSnapshot>>,
}

/// The label value that stands for every series past [`HistogramVec`]'s bound.
pub const OVERFLOW: &str = "overflow";

impl HistogramVec {
    /// An empty set over `bounds`, at most `max_series` series (plus the overflow one).
    pub fn new(bounds: &[f64], max_series: usize) -> Self {
        HistogramVec {
            bounds: bounds.to_vec(),
            max_series,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records `v` in the series of `labels`.
    pub fn observe(&self, labels: &[&str], v: f64) {
        let mut g = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        let key = if g.contains_key(&key) || g.len() < self.max_series {
            key
        } else {
            vec![OVERFLOW.to_owned(); labels.len()]
        };
        g.entry(key)
            .or_insert_with(|| HistogramSnapshot::new(&self.bounds))
            .observe(v);
    }

    /// Every series: (label values, state), sorted by label values.
    pub fn snapshot(&self) -> Vec<(Vec<String>, HistogramSnapshot)> {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_is_not_below() {
        let mut h = HistogramSnapshot::new(&[1.0, 0.5, 1.0, f64::INFINITY]);
        assert_eq!(h.bounds, vec![0.5, 1.0]);
        for v in [0.1, 0.5, 0.7, 1.0, 2.0, 100.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 2, 2]);
        assert_eq!(h.count, 6);
        assert!((h.sum - 104.3).abs() < 1e-9);
    }

    #[test]
    fn series_past_the_bound_fold_into_overflow() {
        let v = HistogramVec::new(&[1.0], 2);
        v.observe(&["a", "OK"], 0.5);
        v.observe(&["b", "OK"], 0.5);
        v.observe(&["c", "OK"], 0.5);
        v.observe(&["a", "OK"], 2.0);
        let s = v.snapshot();
        let keys: Vec<Vec<String>> = s.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(
            keys,
            vec![
                vec!["a".to_owned(), "OK".into()],
                vec!["b".to_owned(), "OK".into()],
                vec![OVERFLOW.to_owned(), OVERFLOW.into()],
            ]
        );
        assert_eq!(s[0].1.count, 2);
        assert_eq!(s[0].1.counts, vec![1, 1]);
    }
}
