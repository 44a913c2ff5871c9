//! Metrics in the Prometheus text format, one HTTP endpoint per agent and per control plane.
//!
//! - [`exposition`]: the encoder (families, labels, escaping, ordering); pure.
//! - [`histogram`]: fixed-bucket histograms and the bucket sets.
//! - [`http`]: the `GET /metrics` endpoint (axum), `--metrics-addr` parsing.
//! - [`grpc`]: the tower layer measuring API latency by method and code.
//! - [`control_plane`]: the control plane's collector (store, hosts, programming latency).
//!
//! The agent's collector (per-CPU datapath maps read at scrape time) lives with the agent:
//! `bin/vpc-agent/metrics.rs`. Metric names are listed in the README ("Metrics").

pub mod control_plane;
pub mod exposition;
pub mod grpc;
pub mod histogram;
pub mod http;

pub use exposition::{Exposition, Kind};
pub use grpc::{ApiMetrics, ApiMetricsLayer};
pub use histogram::{
    API_LATENCY_BUCKETS, Histogram, HistogramSnapshot, HistogramVec, PROGRAMMING_BUCKETS,
    ProgrammingHistogram,
};

/// Default address of an agent's endpoint (loopback: metrics name tenants' VPCs and
/// instances; expose them deliberately).
pub const DEFAULT_AGENT_ADDR: &str = "127.0.0.1:9464";
/// Default address of a control plane's endpoint.
pub const DEFAULT_CONTROL_PLANE_ADDR: &str = "127.0.0.1:9465";
