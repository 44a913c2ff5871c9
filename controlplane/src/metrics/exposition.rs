//! The Prometheus text exposition format (version 0.0.4), pure: metric families built up by
//! the collectors, then rendered in one deterministic order.
//!
//! Rules this encoder enforces (so a scrape never fails to parse):
//! - every family is written once, `# HELP` then `# TYPE`, then all its samples together
//!   (collectors may add to the same family from several places);
//! - families are sorted by name and series by label set, so two scrapes of the same state
//!   are byte-identical (diffable, testable);
//! - label values escape `\`, `"` and newline, help text escapes `\` and newline;
//! - histogram series list their buckets in increasing `le` (cumulative counts), then
//!   `+Inf`, `_sum` and `_count`.
//!
//! Names that are not valid metric or label names are a programming error: they are
//! rejected by a debug assertion and skipped in release builds.

use std::{collections::BTreeMap, fmt::Write as _};

use super::histogram::HistogramSnapshot;

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (restarts from zero when the source restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in fixed buckets.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A series' labels, in the order given (the encoder keeps it; callers use one order per
/// family).
type LabelSet = Vec<(String, String)>;

#[derive(Clone, Debug)]
enum Series {
    Scalar(f64),
    Histogram(HistogramSnapshot),
}

#[derive(Clone, Debug)]
struct Family {
    help: String,
    kind: Kind,
    series: BTreeMap<LabelSet, Series>,
}

/// The metric families of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    families: BTreeMap<String, Family>,
}

/// Whether `name` is a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a valid label name (`[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Escapes a label value: `\` -> `\\`, `"` -> `\"`, newline -> `\n`.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes help text: `\` -> `\\`, newline -> `\n`.
pub fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus writes it: integers without a fraction, `+Inf`, `-Inf`,
/// `NaN`.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    fn family(&mut self, name: &str, help: &str, kind: Kind) -> Option<&mut Family> {
        let ok = valid_metric_name(name);
        debug_assert!(ok, "invalid metric name {name:?}");
        if !ok {
            return None;
        }
        let f = self
            .families
            .entry(name.to_owned())
            .or_insert_with(|| Family {
                help: help.to_owned(),
                kind,
                series: BTreeMap::new(),
            });
        debug_assert_eq!(f.kind, kind, "metric {name} registered with two types");
        (f.kind == kind).then_some(f)
    }

    fn labels(labels: &[(&str, &str)]) -> Option<LabelSet> {
        let ok = labels
            .iter()
            .all(|(k, _)| valid_label_name(k) && *k != "le");
        debug_assert!(ok, "invalid label names in {labels:?}");
        ok.then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        })
    }

    /// Declares a family with no series yet (so it is listed, with its help and type, even
    /// when nothing was counted).
    pub fn declare(&mut self, name: &str, help: &str, kind: Kind) {
        self.family(name, help, kind);
    }

    /// Adds `value` to a counter series (series with the same labels add up).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, Kind::Counter, labels, value);
    }

    /// Sets a gauge series (the last value set wins).
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let Some(labels) = Self::labels(labels) else {
            return;
        };
        if let Some(f) = self.family(name, help, Kind::Gauge) {
            f.series.insert(labels, Series::Scalar(value));
        }
    }

    /// Adds `value` to a gauge series (gauges that are sums, e.g. entries per VPC).
    pub fn gauge_add(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, Kind::Gauge, labels, value);
    }

    fn add(&mut self, name: &str, help: &str, kind: Kind, labels: &[(&str, &str)], value: f64) {
        let Some(labels) = Self::labels(labels) else {
            return;
        };
        if let Some(f) = self.family(name, help, kind) {
            match f.series.entry(labels).or_insert(Series::Scalar(0.0)) {
                Series::Scalar(v) => *v += value,
                Series::Histogram(_) => {}
            }
        }
    }

    /// Sets a histogram series.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) {
        let Some(labels) = Self::labels(labels) else {
            return;
        };
        if let Some(f) = self.family(name, help, Kind::Histogram) {
            f.series.insert(labels, Series::Histogram(h.clone()));
        }
    }

    /// Families declared or set so far.
    pub fn len(&self) -> usize {
        self.families.len()
    }

    /// Whether nothing was declared.
    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.name());
            for (labels, series) in &f.series {
                match series {
                    Series::Scalar(v) => {
                        sample(&mut out, name, labels, None, *v);
                    }
                    Series::Histogram(h) => {
                        let bucket = format!("{name}_bucket");
                        let mut cumulative = 0u64;
                        for (bound, n) in h.bounds.iter().zip(&h.counts) {
                            cumulative += n;
                            sample(
                                &mut out,
                                &bucket,
                                labels,
                                Some(&format_value(*bound)),
                                cumulative as f64,
                            );
                        }
                        sample(&mut out, &bucket, labels, Some("+Inf"), h.count as f64);
                        sample(&mut out, &format!("{name}_sum"), labels, None, h.sum);
                        sample(
                            &mut out,
                            &format!("{name}_count"),
                            labels,
                            None,
                            h.count as f64,
                        );
                    }
                }
            }
        }
        out
    }
}

fn sample(out: &mut String, name: &str, labels: &LabelSet, le: Option<&str>, value: f64) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let extra = le.map(|le| ("le", le));
        for (k, v) in labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra)
        {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_value(value));
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::histogram::Histogram;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(escape_help("back\\slash\nnew"), "back\\\\slash\\nnew");
        let mut e = Exposition::new();
        e.gauge("vpc_x", "a \"quoted\"\nhelp", &[("name", "q\"\\\n")], 1.0);
        assert_eq!(
            e.render(),
            "# HELP vpc_x a \"quoted\"\\nhelp\n# TYPE vpc_x gauge\nvpc_x{name=\"q\\\"\\\\\\n\"} 1\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_metric_name("vpc_packets_total"));
        assert!(valid_metric_name("a:b_c9"));
        assert!(!valid_metric_name("9a"));
        assert!(!valid_metric_name("a-b"));
        assert!(!valid_metric_name(""));
        assert!(valid_label_name("vpc"));
        assert!(!valid_label_name("__name"));
        assert!(!valid_label_name("a.b"));
    }

    #[test]
    fn values_are_formatted_like_prometheus() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1e20), "100000000000000000000");
    }

    #[test]
    fn families_are_grouped_sorted_and_counters_add_up() {
        let mut e = Exposition::new();
        e.counter("vpc_b_total", "b", &[("x", "2")], 1.0);
        e.gauge("vpc_a", "a", &[], 7.0);
        e.counter("vpc_b_total", "b", &[("x", "1")], 1.0);
        e.counter("vpc_b_total", "b", &[("x", "2")], 4.0);
        e.declare("vpc_c_total", "c", Kind::Counter);
        e.gauge("vpc_a", "a", &[], 8.0);
        assert_eq!(
            e.render(),
            "# HELP vpc_a a\n# TYPE vpc_a gauge\nvpc_a 8\n\
             # HELP vpc_b_total b\n# TYPE vpc_b_total counter\n\
             vpc_b_total{x=\"1\"} 1\nvpc_b_total{x=\"2\"} 5\n\
             # HELP vpc_c_total c\n# TYPE vpc_c_total counter\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.125, 1.0]);
        h.observe(0.0625);
        h.observe(0.125); // le is inclusive
        h.observe(0.5);
        h.observe(3.0);
        let mut e = Exposition::new();
        e.histogram("vpc_h_seconds", "h", &[("m", "x")], &h.snapshot());
        assert_eq!(
            e.render(),
            "# HELP vpc_h_seconds h\n# TYPE vpc_h_seconds histogram\n\
             vpc_h_seconds_bucket{m=\"x\",le=\"0.125\"} 2\n\
             vpc_h_seconds_bucket{m=\"x\",le=\"1\"} 3\n\
             vpc_h_seconds_bucket{m=\"x\",le=\"+Inf\"} 4\n\
             vpc_h_seconds_sum{m=\"x\"} 3.6875\n\
             vpc_h_seconds_count{m=\"x\"} 4\n"
        );
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn invalid_names_are_skipped() {
        let mut e = Exposition::new();
        e.gauge("bad-name", "x", &[], 1.0);
        e.gauge("vpc_ok", "x", &[("bad-label", "v")], 1.0);
        assert!(!e.render().contains("bad"));
    }
}
