//! What security-group rule references stand for: from the `SG_PORT` value a flow event or
//! trace reports (and the packet's remote address) back to the group and rule.
//!
//! References are policy-local: the rules of one security-group policy (one set of groups)
//! numbered from 1 in (group, direction, position) order, except that a rule with the
//! direction and ports of an earlier rule shares that rule's reference (see
//! `compile::compile`). The datapath reports, of the rules admitting a packet, the smallest
//! reference; [`SgRuleIndex::decided`] then finds the first rule with those ports whose
//! remote (CIDR or group member) covers the packet's remote address.

use std::{collections::BTreeMap, net::Ipv4Addr};

use dataplane_common::policy::EGRESS;
use ipnetwork::Ipv4Network;

use super::ports::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, port_max};

/// The remote of a security-group rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleRemote {
    /// A CIDR.
    Cidr(Ipv4Network),
    /// The members of a group (by id).
    Group(String),
}

/// One rule of a security-group policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SgRuleInfo {
    /// The group's id.
    pub group: String,
    /// `policy::INGRESS` (inbound rules) or `policy::EGRESS` (outbound).
    pub direction: u32,
    /// Position in the group's list of that direction (0-based).
    pub position: usize,
    /// The reference the datapath reports for it (shared with earlier rules of the same
    /// direction and ports).
    pub reference: u32,
    /// IP protocol; `None`: all.
    pub proto: Option<u8>,
    /// First and last port (ICMP: type); `(0, 0)` for protocols without ports.
    pub ports: (u16, u16),
    /// Where the traffic may come from (inbound) or go to (outbound).
    pub remote: RuleRemote,
}

impl SgRuleInfo {
    /// A readable form, e.g. `sg-web ingress tcp 443 from 10.0.0.0/16` or
    /// `sg-db egress all to sg-web`.
    pub fn description(&self) -> String {
        let (dir, prep) = if self.direction == EGRESS {
            ("egress", "to")
        } else {
            ("ingress", "from")
        };
        let what = match self.proto {
            None => "all".to_owned(),
            Some(p) => {
                let name = match p {
                    PROTO_TCP => "tcp".to_owned(),
                    PROTO_UDP => "udp".to_owned(),
                    PROTO_ICMP => "icmp".to_owned(),
                    n => format!("proto {n}"),
                };
                let (lo, hi) = self.ports;
                if port_max(p) == 0 || (lo == 0 && hi == port_max(p)) {
                    name
                } else if lo == hi {
                    format!("{name} {lo}")
                } else {
                    format!("{name} {lo}-{hi}")
                }
            }
        };
        let remote = match &self.remote {
            RuleRemote::Cidr(net) => net.to_string(),
            RuleRemote::Group(g) => g.clone(),
        };
        format!("{} {dir} {what} {prep} {remote}", self.group)
    }
}

/// The rules of one security-group policy, by reference.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgRuleIndex {
    /// All rules in reference order (rule `n` has own number `n + 1`).
    rules: Vec<SgRuleInfo>,
    /// Members of the groups the rules reference.
    members: BTreeMap<String, Vec<Ipv4Addr>>,
}

impl SgRuleIndex {
    /// The index of `rules` (in own-number order) with the members of the groups they
    /// reference.
    pub fn new(rules: Vec<SgRuleInfo>, mut members: BTreeMap<String, Vec<Ipv4Addr>>) -> Self {
        for m in members.values_mut() {
            m.sort_unstable();
            m.dedup();
        }
        SgRuleIndex { rules, members }
    }

    /// All rules, in reference order.
    pub fn rules(&self) -> &[SgRuleInfo] {
        &self.rules
    }

    /// The rule that admitted a packet for which the datapath reported `reference`, with
    /// `remote` the packet's other side (the destination for outbound rules, the source
    /// for inbound ones). `None` for 0 (no rule), `DECISION_NONE` and unknown references.
    pub fn decided(&self, reference: u32, remote: Ipv4Addr) -> Option<&SgRuleInfo> {
        let first = self
            .rules
            .get(usize::try_from(reference).ok()?.checked_sub(1)?)?;
        let same = |r: &&SgRuleInfo| {
            r.reference == first.reference
                && r.direction == first.direction
                && r.proto == first.proto
                && r.ports == first.ports
        };
        self.rules
            .iter()
            .skip(reference as usize - 1)
            .filter(same)
            .find(|r| self.covers(&r.remote, remote))
    }

    /// [`SgRuleIndex::decided`]'s description, or a placeholder naming the reference.
    pub fn describe(&self, reference: u32, remote: Ipv4Addr) -> String {
        match self.decided(reference, remote) {
            Some(r) => r.description(),
            None if reference == 0 => "no rule".to_owned(),
            None => format!("rule #{reference}"),
        }
    }

    fn covers(&self, rule: &RuleRemote, addr: Ipv4Addr) -> bool {
        match rule {
            RuleRemote::Cidr(net) => net.contains(addr),
            RuleRemote::Group(g) => self
                .members
                .get(g)
                .is_some_and(|m| m.binary_search(&addr).is_ok()),
        }
    }
}
