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

/// Name of the per-target health gauge (agent and control plane).
pub const LB_TARGET_HEALTHY: &str = "vpc_lb_target_healthy";
/// Help of [`LB_TARGET_HEALTHY`].
pub const LB_TARGET_HEALTHY_HELP: &str =
    "1 when the host's health checks see the target healthy, per target group, target and port";
/// Name of the per-target state gauge (1 for the current state).
pub const LB_TARGET_STATE: &str = "vpc_lb_target_state";
/// Help of [`LB_TARGET_STATE`].
pub const LB_TARGET_STATE_HELP: &str =
    "The target's health state as the host's checks see it (1 for the current state)";

/// Declares the two target-health families (so they appear even without targets).
pub fn declare_target_health(e: &mut Exposition) {
    e.declare(LB_TARGET_HEALTHY, LB_TARGET_HEALTHY_HELP, Kind::Gauge);
    e.declare(LB_TARGET_STATE, LB_TARGET_STATE_HELP, Kind::Gauge);
}

/// The health series of one target as a host reports it: `healthy` 1/0 and `state`, with
/// `extra` labels first (the control plane adds `host`).
pub fn target_health(
    e: &mut Exposition,
    extra: &[(&str, &str)],
    t: &vpc_proto::v1::TargetHealthReport,
) {
    let port = t.port.to_string();
    let mut l = extra.to_vec();
    l.extend([
        ("target_group", t.target_group_id.as_str()),
        ("target", t.target_id.as_str()),
        ("port", port.as_str()),
    ]);
    let healthy = if t.state == "healthy" { 1.0 } else { 0.0 };
    e.gauge(LB_TARGET_HEALTHY, LB_TARGET_HEALTHY_HELP, &l, healthy);
    l.push(("state", t.state.as_str()));
    e.gauge(LB_TARGET_STATE, LB_TARGET_STATE_HELP, &l, 1.0);
}
