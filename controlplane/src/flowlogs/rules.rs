//! Which security-group rule admitted a flow, as text (`sg-0abc ingress tcp 443 from
//! 10.0.0.0/16`), found in user space from the document: the endpoint's groups' rules of
//! that direction, the first that matches the remote address (CIDR or a member of the
//! referenced group), the protocol and the port. Security groups are a union (any matching
//! rule allows); "the" rule is the first match in the compiler's order (groups by id, then
//! position), the rule the datapath's reference (`policy::rules::SgRuleIndex`) names too,
//! but found without the policy ids of the moment (they change when rules change).
//! Resolved once per record at the window's end, never per packet.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use crate::overlay::statefile::StateFile;
use crate::policy::model::{Protocol, SecurityGroup, SgRule};

/// The document's security groups and their members, for naming rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleBook {
    groups: HashMap<String, SecurityGroup>,
    /// Group id -> member addresses.
    members: HashMap<String, HashSet<Ipv4Addr>>,
    /// VPC -> its default group.
    defaults: HashMap<String, String>,
}

fn proto_name(p: Protocol) -> String {
    match p {
        Protocol::All => "all".into(),
        Protocol::Number(6) => "tcp".into(),
        Protocol::Number(17) => "udp".into(),
        Protocol::Number(1) => "icmp".into(),
        Protocol::Number(n) => n.to_string(),
    }
}

/// `sg-x ingress tcp 443 from 10.0.0.0/16`.
pub fn describe(group: &str, egress: bool, r: &SgRule) -> String {
    let (dir, word) = if egress {
        ("egress", "to")
    } else {
        ("ingress", "from")
    };
    let ports = match (r.from_port, r.to_port) {
        (Some(a), Some(b)) if a == b => format!(" {a}"),
        (Some(a), Some(b)) => format!(" {a}-{b}"),
        (Some(a), None) | (None, Some(a)) => format!(" {a}"),
        (None, None) => String::new(),
    };
    let remote = match (&r.cidr, &r.group) {
        (Some(c), _) => c.to_string(),
        (None, Some(g)) => g.clone(),
        (None, None) => "?".into(),
    };
    format!(
        "{group} {dir} {}{ports} {word} {remote}",
        proto_name(r.protocol)
    )
}

impl RuleBook {
    /// From the document.
    pub fn build(doc: &StateFile) -> Self {
        let vpc_of: HashMap<&str, &str> = doc
            .subnets
            .iter()
            .map(|s| (s.id.as_str(), s.vpc.as_str()))
            .collect();
        let defaults: HashMap<String, String> = doc
            .security_groups
            .iter()
            .filter(|g| g.default)
            .map(|g| (g.vpc.clone(), g.id.clone()))
            .collect();
        let mut members: HashMap<String, HashSet<Ipv4Addr>> = HashMap::new();
        for e in &doc.endpoints {
            if e.security_groups.is_empty() {
                let Some(vpc) = vpc_of.get(e.subnet.as_str()) else {
                    continue;
                };
                if let Some(g) = defaults.get(*vpc) {
                    members.entry(g.clone()).or_default().insert(e.ip);
                }
            }
            for g in &e.security_groups {
                members.entry(g.clone()).or_default().insert(e.ip);
            }
        }
        RuleBook {
            groups: doc
                .security_groups
                .iter()
                .map(|g| (g.id.clone(), g.clone()))
                .collect(),
            members,
            defaults,
        }
    }

    /// The groups an endpoint is in: its own, or its VPC's default group; sorted by id, as
    /// the policy compiler orders them (so "the first matching rule" is the one the
    /// datapath's rule reference names).
    pub fn groups_of(&self, groups: &[String], vpc: &str) -> Vec<String> {
        let mut out = if groups.is_empty() {
            self.defaults.get(vpc).cloned().into_iter().collect()
        } else {
            groups.to_vec()
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The first rule of `groups` in that direction admitting the remote address,
    /// protocol and port (ICMP: the type), as text.
    pub fn admitting(
        &self,
        groups: &[String],
        egress: bool,
        remote: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Option<String> {
        for gid in groups {
            let Some(g) = self.groups.get(gid) else {
                continue;
            };
            let rules = if egress { &g.outbound } else { &g.inbound };
            for r in rules {
                if self.matches(r, remote, proto, port) {
                    return Some(describe(gid, egress, r));
                }
            }
        }
        None
    }

    fn matches(&self, r: &SgRule, remote: Ipv4Addr, proto: u8, port: u16) -> bool {
        let proto_ok = match r.protocol {
            Protocol::All => true,
            Protocol::Number(n) => n == proto,
        };
        let port_ok = match (r.protocol, r.from_port, r.to_port) {
            (Protocol::All, _, _) | (_, None, None) => true,
            (Protocol::Number(p), from, to) if r.protocol.has_ports() => {
                let value = if p == 1 { port >> 8 } else { port };
                let (lo, hi) = (from.or(to).unwrap_or(0), to.or(from).unwrap_or(u16::MAX));
                (lo..=hi).contains(&value)
            }
            _ => true,
        };
        let remote_ok = match (&r.cidr, &r.group) {
            (Some(c), _) => c.contains(remote),
            (None, Some(g)) => self.members.get(g).is_some_and(|m| m.contains(&remote)),
            (None, None) => false,
        };
        proto_ok && port_ok && remote_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> StateFile {
        serde_json::from_str(
            r#"{
          "vpcs": [{"id": "vpc-1", "vni": 100, "cidr": "10.0.0.0/16"}],
          "subnets": [{"id": "subnet-1", "vpc": "vpc-1", "cidr": "10.0.1.0/24"}],
          "endpoints": [
            {"id": "i-web", "subnet": "subnet-1", "host": "h", "ip": "10.0.1.10",
             "mac": "02:00:00:00:00:01", "security_groups": ["sg-web"]},
            {"id": "i-other", "subnet": "subnet-1", "host": "h", "ip": "10.0.1.11",
             "mac": "02:00:00:00:00:02"}
          ],
          "security_groups": [
            {"id": "sg-dflt", "vpc": "vpc-1", "default": true,
             "inbound": [{"protocol": "all", "group": "sg-dflt"}]},
            {"id": "sg-web", "vpc": "vpc-1",
             "inbound": [
               {"protocol": 6, "from_port": 443, "to_port": 443, "cidr": "10.0.0.0/16"},
               {"protocol": 6, "from_port": 8000, "to_port": 8099, "group": "sg-dflt"},
               {"protocol": 1, "from_port": 8, "to_port": 8, "cidr": "0.0.0.0/0"}
             ]}
          ]
        }"#,
        )
        .unwrap()
    }

    #[test]
    fn names_the_first_rule_that_admits() {
        let book = RuleBook::build(&doc());
        let web = vec!["sg-web".to_owned()];
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            book.admitting(&web, false, ip("10.0.7.1"), 6, 443)
                .as_deref(),
            Some("sg-web ingress tcp 443 from 10.0.0.0/16")
        );
        // A group reference: the default group's member, not anyone else.
        assert_eq!(
            book.admitting(&web, false, ip("10.0.1.11"), 6, 8080)
                .as_deref(),
            Some("sg-web ingress tcp 8000-8099 from sg-dflt")
        );
        assert_eq!(book.admitting(&web, false, ip("10.0.1.99"), 6, 8080), None);
        // ICMP: the type is the port's high byte (echo request 8, code 0).
        assert_eq!(
            book.admitting(&web, false, ip("192.0.2.1"), 1, 8 << 8)
                .as_deref(),
            Some("sg-web ingress icmp 8 from 0.0.0.0/0")
        );
        assert_eq!(book.admitting(&web, false, ip("192.0.2.1"), 1, 0), None);
        // Outbound: absent means the AWS default (all to 0.0.0.0/0).
        assert_eq!(
            book.admitting(&web, true, ip("8.8.8.8"), 17, 53).as_deref(),
            Some("sg-web egress all to 0.0.0.0/0")
        );
        // An endpoint without groups is in its VPC's default group.
        let dflt = book.groups_of(&[], "vpc-1");
        assert_eq!(dflt, vec!["sg-dflt".to_owned()]);
        assert_eq!(
            book.admitting(&dflt, false, ip("10.0.1.11"), 17, 9)
                .as_deref(),
            Some("sg-dflt ingress all from sg-dflt")
        );
        assert_eq!(book.admitting(&dflt, false, ip("10.0.1.10"), 17, 9), None);
    }
}
