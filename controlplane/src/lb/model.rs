//! Network load balancers, listeners and target groups as users write them (JSON through
//! serde), with AWS NLB's field meanings and defaults.
//!
//! ```json
//! {"load_balancers": [{"id": "lb-web", "subnet": "subnet-a1", "vip": "10.0.1.100",
//!    "listeners": [{"protocol": "tcp", "port": 80, "target_group": "tg-web"}]}],
//!  "target_groups": [{"id": "tg-web", "vpc": "vpc-a", "protocol": "tcp", "port": 8080,
//!    "health_check": {"protocol": "http", "path": "/healthz", "interval": 10},
//!    "deregistration_delay": 60,
//!    "targets": [{"id": "i-1"}, {"id": "i-2", "weight": 2}, {"id": "i-3", "port": 9090}]}]}
//! ```
//!
//! Deserializing checks only the syntax; [`super::plan()`] validates references, ranges and
//! addresses.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// A network load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    /// Id (`lb-...`).
    pub id: String,
    /// Subnet the VIP comes from (its VPC is the load balancer's).
    pub subnet: String,
    /// The VIP; absent: allocated from the subnet (the highest free address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    /// Listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Slots of each listener's Maglev table: a prime, at least 100 per target
    /// (default 65 537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u32>,
}

/// Transport protocol of a listener or target group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl LbProtocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            LbProtocol::Tcp => 6,
            LbProtocol::Udp => 17,
        }
    }

    /// `tcp` or `udp`.
    pub const fn name(self) -> &'static str {
        match self {
            LbProtocol::Tcp => "tcp",
            LbProtocol::Udp => "udp",
        }
    }
}

/// A listener: connections to VIP:port go to the target group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// Protocol.
    pub protocol: LbProtocol,
    /// Port 1..=65535.
    pub port: u16,
    /// Target group id (same VPC, same protocol).
    pub target_group: String,
}

/// A target group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetGroup {
    /// Id (`tg-...`).
    pub id: String,
    /// VPC of the targets.
    pub vpc: String,
    /// Protocol of the traffic to the targets.
    pub protocol: LbProtocol,
    /// Default target port (a target may override it).
    pub port: u16,
    /// Health checks.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Seconds a deregistered target keeps its existing connections (0..=3600, AWS default
    /// 300).
    #[serde(default = "default_deregistration_delay")]
    pub deregistration_delay: u32,
    /// Registered targets.
    #[serde(default)]
    pub targets: Vec<TargetRef>,
}

/// AWS's default deregistration delay (seconds).
pub const fn default_deregistration_delay() -> u32 {
    300
}

/// A registered target: an instance (endpoint id) and optionally its own port and a weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRef {
    /// Endpoint (instance) id.
    pub id: String,
    /// Port; absent: the group's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative share of new connections, 1..=100 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Health-check protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckProtocol {
    /// A TCP connection succeeds.
    #[default]
    Tcp,
    /// An HTTP GET of `path` answers 200-399.
    Http,
}

/// Health-check settings (AWS NLB: interval 5-300 s, default 30; timeout 2-120 s, default 10
/// for TCP and 6 for HTTP; healthy threshold 2-10, default 5; unhealthy threshold 2-10,
/// default 2). Times are seconds and may be fractional; `limits.min_health_check_interval_ms`
/// lowers the interval floor (tests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthCheck {
    /// Protocol.
    pub protocol: HealthCheckProtocol,
    /// Port; absent: the target's traffic port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP path.
    pub path: String,
    /// Seconds between checks of one target.
    pub interval: f64,
    /// Seconds a check may take; absent: 10 (TCP) or 6 (HTTP), at most the interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// Consecutive successes that make a target healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a target unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            protocol: HealthCheckProtocol::Tcp,
            port: None,
            path: "/".to_owned(),
            interval: 30.0,
            timeout: None,
            healthy_threshold: 5,
            unhealthy_threshold: 2,
        }
    }
}

impl HealthCheck {
    /// The timeout in effect, in seconds.
    pub fn timeout_secs(&self) -> f64 {
        self.timeout
            .unwrap_or(match self.protocol {
                HealthCheckProtocol::Tcp => 10.0,
                HealthCheckProtocol::Http => 6.0,
            })
            .min(self.interval)
    }
}

/// Load-balancer limits (AWS quotas where they exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LbLimits {
    /// Listeners per load balancer (AWS: 50).
    pub listeners_per_lb: usize,
    /// Targets per target group (AWS: 1000 per AZ; larger here, bounded by the table).
    pub targets_per_group: usize,
    /// Smallest health-check interval, milliseconds (AWS: 5000; tests lower it).
    pub min_health_check_interval_ms: u32,
}

impl Default for LbLimits {
    fn default() -> Self {
        LbLimits {
            listeners_per_lb: 50,
            targets_per_group: 10_000,
            min_health_check_interval_ms: 5000,
        }
    }
}
