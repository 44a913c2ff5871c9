//! Flow-log configuration in the desired-state document and the endpoint flags it sets.
//!
//! A flow log names a VPC or a subnet and a traffic type; every endpoint inside it gets
//! `EP_LOG_ACCEPT` and/or `EP_LOG_REJECT` in its `ENDPOINTS` entry, which is all the
//! datapath looks at (one flag test per packet when logging is off). Aggregation windows and
//! the records' ids are the agent's business (`crate::flowlogs`).

use std::collections::BTreeMap;

use dataplane_common::flowlog::{EP_LOG_ACCEPT, EP_LOG_REJECT};
use serde::{Deserialize, Serialize};

/// Which traffic a flow log records (AWS `TrafficType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TrafficType {
    /// Accepted traffic only.
    Accept,
    /// Rejected traffic only.
    Reject,
    /// Both.
    All,
}

impl TrafficType {
    /// The endpoint flags this traffic type needs.
    pub fn flags(self) -> u32 {
        match self {
            TrafficType::Accept => EP_LOG_ACCEPT,
            TrafficType::Reject => EP_LOG_REJECT,
            TrafficType::All => EP_LOG_ACCEPT | EP_LOG_REJECT,
        }
    }

    /// Whether a record with this action belongs to the flow log.
    pub fn wants(self, accepted: bool) -> bool {
        match self {
            TrafficType::Accept => accepted,
            TrafficType::Reject => !accepted,
            TrafficType::All => true,
        }
    }

    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficType::Accept => "ACCEPT",
            TrafficType::Reject => "REJECT",
            TrafficType::All => "ALL",
        }
    }

    /// Parses the API's spelling (upper case).
    pub fn parse(text: &str) -> Option<TrafficType> {
        match text {
            "ACCEPT" => Some(TrafficType::Accept),
            "REJECT" => Some(TrafficType::Reject),
            "ALL" => Some(TrafficType::All),
            _ => None,
        }
    }
}

/// A flow log as hosts need it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogDoc {
    /// `fl-` id.
    pub id: String,
    /// Owning account (the records' `account-id`).
    pub account: String,
    /// The VPC or subnet it covers.
    pub resource: String,
    /// The VPC (the resource itself for a VPC flow log).
    pub vpc: String,
    /// Which traffic.
    pub traffic_type: TrafficType,
    /// Aggregation window, seconds (1..=600).
    pub window_secs: u32,
}

impl FlowLogDoc {
    /// Whether an endpoint of `subnet` in `vpc` is covered.
    pub fn covers(&self, vpc: &str, subnet: &str) -> bool {
        self.resource == vpc || self.resource == subnet
    }
}

/// The flow-log flags of every covered endpoint: endpoint id -> `EP_LOG_*` bits.
/// `endpoints` are (endpoint id, subnet id); `vpc_of` gives a subnet's VPC. Endpoints
/// that are not instances (load-balancer health-check nodes) are never logged.
pub fn endpoint_flags<'a>(
    flow_logs: &[FlowLogDoc],
    endpoints: impl IntoIterator<Item = (&'a str, &'a str)>,
    vpc_of: impl Fn(&str) -> Option<&'a str>,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if flow_logs.is_empty() {
        return out;
    }
    for (id, subnet) in endpoints {
        if !id.starts_with("i-") {
            continue;
        }
        let Some(vpc) = vpc_of(subnet) else { continue };
        let flags = flow_logs
            .iter()
            .filter(|f| f.covers(vpc, subnet))
            .fold(0, |acc, f| acc | f.traffic_type.flags());
        if flags != 0 {
            out.insert(id.to_owned(), flags);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fl(resource: &str, t: TrafficType) -> FlowLogDoc {
        FlowLogDoc {
            id: format!("fl-{resource}"),
            account: "a".into(),
            resource: resource.into(),
            vpc: "vpc-1".into(),
            traffic_type: t,
            window_secs: 1,
        }
    }

    #[test]
    fn vpc_and_subnet_logs_set_the_union_of_flags() {
        let eps = [
            ("i-a", "subnet-1"),
            ("i-b", "subnet-2"),
            ("i-c", "subnet-9"),
            ("lbhc-x", "subnet-1"),
        ];
        let vpc_of = |s: &str| match s {
            "subnet-1" | "subnet-2" => Some("vpc-1"),
            "subnet-9" => Some("vpc-9"),
            _ => None,
        };
        // Subnet 1 only: i-b (subnet 2) and i-c (another VPC) are not covered.
        let only = endpoint_flags(&[fl("subnet-1", TrafficType::Reject)], eps, vpc_of);
        assert_eq!(only, BTreeMap::from([("i-a".into(), EP_LOG_REJECT)]));
        // The VPC (accept) plus subnet 1 (reject).
        let both = endpoint_flags(
            &[
                fl("vpc-1", TrafficType::Accept),
                fl("subnet-1", TrafficType::Reject),
            ],
            eps,
            vpc_of,
        );
        assert_eq!(
            both,
            BTreeMap::from([
                ("i-a".into(), EP_LOG_ACCEPT | EP_LOG_REJECT),
                ("i-b".into(), EP_LOG_ACCEPT),
            ])
        );
        assert!(endpoint_flags(&[], eps, vpc_of).is_empty());
    }

    #[test]
    fn traffic_types() {
        assert_eq!(TrafficType::All.flags(), EP_LOG_ACCEPT | EP_LOG_REJECT);
        assert!(TrafficType::Accept.wants(true) && !TrafficType::Accept.wants(false));
        assert!(!TrafficType::Reject.wants(true) && TrafficType::Reject.wants(false));
        for t in [TrafficType::Accept, TrafficType::Reject, TrafficType::All] {
            assert_eq!(TrafficType::parse(t.as_str()), Some(t));
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
        assert_eq!(TrafficType::parse("all"), None);
    }
}
