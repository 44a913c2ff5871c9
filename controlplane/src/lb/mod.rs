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
