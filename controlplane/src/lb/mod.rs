//! Network load balancers with AWS NLB semantics.
//!
//! - [`model`]: load balancers, listeners and target groups as users write them.
//! - [`plan()`]: validation and resolution (VIPs allocated, targets resolved, table sizes,
//!   health-check nodes placed); pure and deterministic.
//! - [`maglev`]: the Maglev consistent-hashing tables (weights), pure and unit-tested.
//! - [`health`]: target health state machine (thresholds).
//! - [`compile`]: plan + health -> one host's load-balancer map contents.
//! - [`probe`]: the health checks themselves, run from a network namespace wired into the
//!   VPC like an instance.

pub mod compile;
pub mod health;
pub mod maglev;
pub mod model;
pub mod plan;
pub mod probe;

pub use plan::{LbError, LbPlan, plan};

/// Where the agent of the datapath pinned under `layout` publishes its target states (JSON,
/// a list of [`compile::TargetStatus`]) for `vpc lb targets`: under `/run/vpc-agent/`, named
/// after the pin directory (bpffs holds no regular files).
pub fn status_path(layout: &crate::datapath::PinLayout) -> std::path::PathBuf {
    let name: String = layout
        .root()
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    std::path::Path::new("/run/vpc-agent")
        .join(name)
        .join("lb-targets.json")
}
