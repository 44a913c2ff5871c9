//! Security groups and network ACLs as users write them (JSON through serde), with AWS's
//! field meanings.
//!
//! ```json
//! {"id": "sg-web", "vpc": "vpc-1",
//!  "inbound": [{"protocol": "tcp", "from_port": 443, "to_port": 443, "cidr": "0.0.0.0/0"},
//!              {"protocol": "all", "group": "sg-web"}]}
//! {"id": "acl-1", "vpc": "vpc-1",
//!  "inbound": [{"rule": 100, "protocol": "tcp", "from_port": 80, "to_port": 80,
//!               "cidr": "0.0.0.0/0", "action": "allow"}],
//!  "outbound": [{"rule": 100, "protocol": "-1", "cidr": "0.0.0.0/0", "action": "allow"}]}
//! ```
//!
//! Deserializing checks only the syntax; [`super::compile()`] validates references, port
//! ranges, rule numbers and quotas.

use std::{fmt, str::FromStr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::ports::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// The IP protocol a rule matches.
///
/// In JSON: `"tcp"`, `"udp"`, `"icmp"`, `"all"` or `"-1"` (AWS's spelling of all), or a
/// protocol number 0..=255 as a string or a number (`-1` too). Numbers of named protocols
/// are the named protocol (`"6"` is `tcp`). Serialized as the name, else the number as a
/// string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Every protocol (and every port).
    All,
    /// One IP protocol number.
    Number(u8),
}

impl Protocol {
    /// TCP (6).
    pub const TCP: Protocol = Protocol::Number(PROTO_TCP);
    /// UDP (17).
    pub const UDP: Protocol = Protocol::Number(PROTO_UDP);
    /// ICMP (1).
    pub const ICMP: Protocol = Protocol::Number(PROTO_ICMP);

    /// The protocol number, `None` for all.
    pub const fn number(self) -> Option<u8> {
        match self {
            Protocol::All => None,
            Protocol::Number(n) => Some(n),
        }
    }

    /// Whether rules of this protocol take a port range: TCP and UDP (destination port) and
    /// ICMP (the type).
    pub const fn has_ports(self) -> bool {
        matches!(self, Protocol::Number(PROTO_TCP | PROTO_UDP | PROTO_ICMP))
    }
}

/// Why a protocol text is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid protocol {0:?}: expected tcp, udp, icmp, all, -1 or a number 0..=255")]
pub struct ProtocolParseError(pub String);

impl FromStr for Protocol {
    type Err = ProtocolParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "all" | "-1" => Ok(Protocol::All),
            "tcp" => Ok(Protocol::TCP),
            "udp" => Ok(Protocol::UDP),
            "icmp" => Ok(Protocol::ICMP),
            n => n
                .parse::<u8>()
                .map(Protocol::Number)
                .map_err(|_| ProtocolParseError(s.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Protocol::All => f.write_str("all"),
            Protocol::TCP => f.write_str("tcp"),
            Protocol::UDP => f.write_str("udp"),
            Protocol::ICMP => f.write_str("icmp"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Protocol;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("tcp, udp, icmp, all, -1 or a protocol number 0..=255")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Protocol, E> {
                u8::try_from(v)
                    .map(Protocol::Number)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                match v {
                    -1 => Ok(Protocol::All),
                    0.. => self.visit_u64(v.unsigned_abs()),
                    _ => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A security group: stateful, allow-only rules for the endpoints that have it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    /// `sg-...` id, unique.
    pub id: String,
    /// Id of the VPC it belongs to. Rules may reference only groups of the same VPC.
    pub vpc: String,
    /// Whether this is its VPC's default group (the group of endpoints that name none). At
    /// most one per VPC; without one the VPC has an implicit default group, id
    /// `"<vpc-id>/default"`, allowing all inbound traffic from its own members and all
    /// outbound traffic.
    #[serde(default, skip_serializing_if = "is_false")]
    pub default: bool,
    /// Inbound rules (remote = the packet's source). None by default.
    #[serde(default)]
    pub inbound: Vec<SgRule>,
    /// Outbound rules (remote = the packet's destination). Absent: one rule allowing all
    /// traffic to 0.0.0.0/0, as for a new AWS group; an explicit `[]` allows nothing.
    #[serde(default = "allow_all_outbound")]
    pub outbound: Vec<SgRule>,
}

/// A security-group rule: allows `protocol` (and ports) from (inbound) or to (outbound) a
/// CIDR or the members of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgRule {
    /// Protocol.
    pub protocol: Protocol,
    /// First destination port (TCP, UDP) or ICMP type. Absent together with `to_port`:
    /// every port (type). Not allowed for other protocols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<u16>,
    /// Last destination port or ICMP type (inclusive). ICMP codes are not matched (a
    /// simplification of AWS, which matches type and code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<u16>,
    /// Remote IPv4 CIDR. Exactly one of `cidr` and `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Ipv4Network>,
    /// Remote security group (its members' private IPv4 addresses), of the same VPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// What an ACL rule does with traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
}

/// A network ACL: stateless, numbered allow and deny rules for the subnets associated with
/// it. The lowest-numbered matching rule decides; no match denies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAcl {
    /// `acl-...` id, unique.
    pub id: String,
    /// Id of the VPC it belongs to.
    pub vpc: String,
    /// Whether this is its VPC's default ACL (used by subnets that name none). At most one
    /// per VPC; without one such subnets have no ACL (allow everything, like AWS's default
    /// ACL).
    #[serde(default, skip_serializing_if = "is_false")]
    pub default: bool,
    /// Inbound rules (remote = the packet's source). None: deny all inbound traffic.
    #[serde(default)]
    pub inbound: Vec<AclRule>,
    /// Outbound rules (remote = the packet's destination). None: deny all.
    #[serde(default)]
    pub outbound: Vec<AclRule>,
}

/// A network ACL rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRule {
    /// Rule number, 1..=32766, unique within its list; lower numbers are evaluated first.
    pub rule: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// First destination port (TCP, UDP) or ICMP type, as in [`SgRule::from_port`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<u16>,
    /// Last destination port or ICMP type (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<u16>,
    /// Remote IPv4 CIDR.
    pub cidr: Ipv4Network,
    /// Allow or deny.
    pub action: AclAction,
}

/// Quotas, AWS's defaults unless configured (all adjustable, as in AWS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyLimits {
    /// Inbound rules per security group (60).
    pub sg_inbound_rules: usize,
    /// Outbound rules per security group (60).
    pub sg_outbound_rules: usize,
    /// Security groups per endpoint (5).
    pub groups_per_endpoint: usize,
    /// Inbound rules per network ACL (20).
    pub acl_inbound_rules: usize,
    /// Outbound rules per network ACL (20).
    pub acl_outbound_rules: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            sg_inbound_rules: 60,
            sg_outbound_rules: 60,
            groups_per_endpoint: 5,
            acl_inbound_rules: 20,
            acl_outbound_rules: 20,
        }
    }
}

/// The outbound rules of a group that does not list any: all traffic to 0.0.0.0/0.
pub fn allow_all_outbound() -> Vec<SgRule> {
    vec![SgRule {
        protocol: Protocol::All,
        from_port: None,
        to_port: None,
        cidr: Some(ANY),
        group: None,
    }]
}

/// 0.0.0.0/0.
pub const ANY: Ipv4Network = match Ipv4Network::new_checked(std::net::Ipv4Addr::UNSPECIFIED, 0) {
    Some(n) => n,
    None => unreachable!(),
};

fn is_false(b: &bool) -> bool {
    !*b
}
