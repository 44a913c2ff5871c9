//! Validation and compilation of security groups and network ACLs into [`SgTables`] and
//! [`AclTables`] for the endpoints of one host.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use dataplane_common::policy::MAX_CLASSES;
use ipnetwork::Ipv4Network;

use super::{
    classes::{AclClass, AddrItem, Classes, Content, SgClass, Verdict, address_stage},
    model::{
        AclAction, NetworkAcl, PolicyLimits, Protocol, SecurityGroup, SgRule, allow_all_outbound,
    },
    ports::port_max,
    rules::{RuleRemote, SgRuleIndex, SgRuleInfo},
    tables::{AclTables, AddrTable, SgTables},
};

/// Largest ACL rule number a user may give (AWS).
pub const MAX_ACL_RULE: u16 = 32766;

/// A subnet, as far as policy is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetRef {
    /// Id.
    pub id: String,
    /// VPC id.
    pub vpc: String,
    /// IPv4 CIDR.
    pub cidr: Ipv4Network,
    /// Associated network ACL; `None`: its VPC's default ACL if it has one, else no ACL.
    pub network_acl: Option<String>,
}

/// An endpoint (instance interface), as far as policy is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRef {
    /// Id.
    pub id: String,
    /// VPC id (must be its subnet's).
    pub vpc: String,
    /// Subnet id.
    pub subnet: String,
    /// Private IPv4 address (what group references match).
    pub ip: Ipv4Addr,
    /// Its security groups, of its VPC; empty: the VPC's default group.
    pub security_groups: Vec<String>,
    /// Whether it runs on this host (only local endpoints get compiled tables).
    pub local: bool,
}

/// Everything the compiler reads, cluster-wide (group references need every endpoint).
#[derive(Clone, Copy, Debug)]
pub struct PolicyInput<'a> {
    /// VPC ids.
    pub vpcs: &'a [String],
    /// Subnets.
    pub subnets: &'a [SubnetRef],
    /// Endpoints, local and remote.
    pub endpoints: &'a [EndpointRef],
    /// Security groups.
    pub security_groups: &'a [SecurityGroup],
    /// Network ACLs.
    pub network_acls: &'a [NetworkAcl],
    /// Quotas.
    pub limits: &'a PolicyLimits,
}

/// The key of a security-group policy: the sorted, deduplicated ids of an endpoint's groups
/// (its VPC's default group if it lists none). Endpoints with equal keys share one policy.
pub type SgSetKey = Vec<String>;

/// What one local endpoint uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Its security-group policy (a key of [`CompiledPolicy::sg_sets`]).
    pub sg_set: SgSetKey,
    /// Its subnet's network ACL (a key of [`CompiledPolicy::acls`]); `None`: no ACL, allow
    /// everything (ACL id 0).
    pub acl: Option<String>,
}

/// What this host's policy maps must hold: the tables local endpoints need, by content
/// keys, and which ones each local endpoint uses. Ids are the agent's to assign.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Security-group policies of local endpoints.
    pub sg_sets: BTreeMap<SgSetKey, SgTables>,
    /// Network ACLs of local endpoints' subnets, by ACL id.
    pub acls: BTreeMap<String, AclTables>,
    /// Local endpoints by id.
    pub endpoints: BTreeMap<String, EndpointPolicy>,
    /// Per security-group policy, what its `SG_PORT` rule references stand for (flow logs
    /// and traces name the rule that admitted a packet).
    pub sg_rules: BTreeMap<SgSetKey, SgRuleIndex>,
}

/// What is wrong with a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    /// `from_port` is greater than `to_port`.
    #[error("from_port {from} is greater than to_port {to}")]
    ReversedPorts {
        /// `from_port`.
        from: u16,
        /// `to_port`.
        to: u16,
    },
    /// A port (ICMP type) beyond the protocol's range.
    #[error("{port} is out of range for {protocol} (at most {max})")]
    PortOutOfRange {
        /// The port.
        port: u16,
        /// The protocol.
        protocol: Protocol,
        /// Its largest port.
        max: u16,
    },
    /// Ports given for a protocol without ports.
    #[error("protocol {0} has no ports: leave from_port and to_port out")]
    PortsNotAllowed(Protocol),
    /// Only one of `from_port` and `to_port`.
    #[error("from_port and to_port go together")]
    HalfRange,
    /// A security-group rule without a remote, or with two.
    #[error("exactly one of cidr and group is required")]
    CidrXorGroup,
    /// An ACL rule number outside 1..=32766.
    #[error("rule number {0} is outside 1..={MAX_ACL_RULE}")]
    RuleNumberOutOfRange(u16),
    /// An ACL rule number used twice in one list.
    #[error("rule number {0} is used twice")]
    DuplicateRuleNumber(u16),
}

/// The kind of an object named in a [`PolicyError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A VPC.
    Vpc,
    /// A subnet.
    Subnet,
    /// An endpoint.
    Endpoint,
    /// A security group.
    SecurityGroup,
    /// The security groups of an endpoint, compiled together.
    SecurityGroupSet,
    /// A network ACL.
    NetworkAcl,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Vpc => "VPC",
            Kind::Subnet => "subnet",
            Kind::Endpoint => "endpoint",
            Kind::SecurityGroup => "security group",
            Kind::SecurityGroupSet => "security group set",
            Kind::NetworkAcl => "network ACL",
        })
    }
}

/// Why policy cannot be compiled. Each names the offending object (kind and id) and, where
/// it applies, the field (`inbound[2].to_port`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Two objects of one kind share an id (an explicit group may not take the id of a VPC's
    /// implicit default group, `<vpc-id>/default`, unless it is that VPC's default group).
    #[error("duplicate {kind} id {id}")]
    DuplicateId {
        /// Object kind.
        kind: Kind,
        /// The id.
        id: String,
    },
    /// A reference to an object that does not exist.
    #[error("{kind} {id}: {field} refers to unknown {target} {target_id}")]
    UnknownRef {
        /// Kind of the referring object.
        kind: Kind,
        /// Its id.
        id: String,
        /// The field.
        field: String,
        /// Kind of the missing object.
        target: Kind,
        /// Its id.
        target_id: String,
    },
    /// A reference to an object of another VPC.
    #[error("{kind} {id}: {field} refers to {target} {target_id} of another VPC, {target_vpc}")]
    OtherVpc {
        /// Kind of the referring object.
        kind: Kind,
        /// Its id.
        id: String,
        /// The field.
        field: String,
        /// Kind of the referenced object.
        target: Kind,
        /// Its id.
        target_id: String,
        /// Its VPC.
        target_vpc: String,
    },
    /// Two defaults of one kind in a VPC.
    #[error("VPC {vpc} has two default {kind}s: {first} and {second}")]
    TwoDefaults {
        /// Object kind.
        kind: Kind,
        /// The VPC.
        vpc: String,
        /// One default.
        first: String,
        /// The other.
        second: String,
    },
    /// An invalid rule.
    #[error("{kind} {id}: {field}: {problem}")]
    InvalidRule {
        /// [`Kind::SecurityGroup`] or [`Kind::NetworkAcl`].
        kind: Kind,
        /// Its id.
        id: String,
        /// The field (`outbound[0].from_port`).
        field: String,
        /// What is wrong.
        problem: RuleProblem,
    },
    /// A quota is exceeded.
    #[error("{kind} {id}: {count} {field}, more than the limit of {limit}")]
    QuotaExceeded {
        /// Object kind.
        kind: Kind,
        /// Its id.
        id: String,
        /// The list (`inbound`, `security_groups`).
        field: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A policy or ACL needs more address classes than a class id can number.
    #[error("{kind} {id}: {count} address classes, more than the {max} the datapath numbers")]
    TooManyClasses {
        /// [`Kind::SecurityGroupSet`] or [`Kind::NetworkAcl`].
        kind: Kind,
        /// The set (ids joined with `+`) or ACL id.
        id: String,
        /// Classes needed.
        count: usize,
        /// The limit.
        max: u32,
    },
}

const VPC: Kind = Kind::Vpc;
const SUBNET: Kind = Kind::Subnet;
const ENDPOINT: Kind = Kind::Endpoint;
const GROUP: Kind = Kind::SecurityGroup;
const ACL: Kind = Kind::NetworkAcl;
const DIRS: [&str; 2] = ["inbound", "outbound"];

/// Protocol and ports of a validated rule: `proto` `None` for all protocols.
#[derive(Clone, Copy, Debug)]
struct PortSpec {
    proto: Option<u8>,
    lo: u16,
    hi: u16,
}

/// Checks the protocol and ports of a rule; the error names the field.
fn port_spec(
    protocol: Protocol,
    from: Option<u16>,
    to: Option<u16>,
) -> Result<PortSpec, (&'static str, RuleProblem)> {
    let given = from.is_some() || to.is_some();
    let p = match protocol.number() {
        Some(p) if protocol.has_ports() => p,
        proto => {
            if given {
                let field = if from.is_some() {
                    "from_port"
                } else {
                    "to_port"
                };
                return Err((field, RuleProblem::PortsNotAllowed(protocol)));
            }
            return Ok(PortSpec {
                proto,
                lo: 0,
                hi: 0,
            });
        }
    };
    let max = port_max(p);
    match (from, to) {
        (None, None) => Ok(PortSpec {
            proto: Some(p),
            lo: 0,
            hi: max,
        }),
        (Some(_), None) => Err(("to_port", RuleProblem::HalfRange)),
        (None, Some(_)) => Err(("from_port", RuleProblem::HalfRange)),
        (Some(lo), Some(hi)) => {
            for (field, port) in [("from_port", lo), ("to_port", hi)] {
                if port > max {
                    return Err((
                        field,
                        RuleProblem::PortOutOfRange {
                            port,
                            protocol,
                            max,
                        },
                    ));
                }
            }
            if lo > hi {
                return Err(("from_port", RuleProblem::ReversedPorts { from: lo, to: hi }));
            }
            Ok(PortSpec {
                proto: Some(p),
                lo,
                hi,
            })
        }
    }
}

fn canonical(net: Ipv4Network) -> (u8, u32) {
    let len = net.prefix();
    (len, u32::from(net.network()))
}

fn unique<'a>(kind: Kind, ids: impl Iterator<Item = &'a str>) -> Result<(), PolicyError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(PolicyError::DuplicateId {
                kind,
                id: id.to_owned(),
            });
        }
    }
    Ok(())
}

fn unknown(
    kind: Kind,
    id: &str,
    field: impl Into<String>,
    target: Kind,
    target_id: &str,
) -> PolicyError {
    PolicyError::UnknownRef {
        kind,
        id: id.to_owned(),
        field: field.into(),
        target,
        target_id: target_id.to_owned(),
    }
}

fn quota(
    kind: Kind,
    id: &str,
    field: &'static str,
    count: usize,
    limit: usize,
) -> Result<(), PolicyError> {
    if count > limit {
        return Err(PolicyError::QuotaExceeded {
            kind,
            id: id.to_owned(),
            field,
            count,
            limit,
        });
    }
    Ok(())
}

/// The remote of a validated security-group rule.
#[derive(Clone, Copy, Debug)]
enum Remote {
    /// (prefix length, network address).
    Cidr(u8, u32),
    /// Members of the group with this index.
    Group(usize),
}

/// A validated security-group rule: remote and ports.
type SgRec = (Remote, PortSpec);

/// A sort key of a remote that does not depend on input order: CIDRs by (length, address),
/// then groups by id.
fn remote_key<'a>(remote: &Remote, groups: &[&'a SecurityGroup]) -> (u8, u8, u32, &'a str) {
    match *remote {
        Remote::Cidr(len, addr) => (0, len, addr, ""),
        Remote::Group(h) => (1, 0, 0, groups[h].id.as_str()),
    }
}

/// The VPC's implicit default group: inbound everything from its members, outbound
/// everything.
fn implicit_default(vpc: &str) -> SecurityGroup {
    let id = format!("{vpc}/default");
    SecurityGroup {
        inbound: vec![SgRule {
            protocol: Protocol::All,
            from_port: None,
            to_port: None,
            cidr: None,
            group: Some(id.clone()),
        }],
        id,
        vpc: vpc.to_owned(),
        default: true,
        outbound: allow_all_outbound(),
    }
}

/// The default object (group or ACL) of each VPC, checking there is at most one.
fn defaults<'a>(
    kind: Kind,
    vpc_index: &HashMap<&str, usize>,
    objects: impl Iterator<Item = (&'a str, &'a str, bool)>,
) -> Result<Vec<Option<usize>>, PolicyError> {
    let mut out: Vec<Option<(usize, &str)>> = vec![None; vpc_index.len()];
    for (i, (id, vpc, is_default)) in objects.enumerate() {
        let v = *vpc_index
            .get(vpc)
            .ok_or_else(|| unknown(kind, id, "vpc", VPC, vpc))?;
        if !is_default {
            continue;
        }
        if let Some((_, first)) = out[v] {
            return Err(PolicyError::TwoDefaults {
                kind,
                vpc: vpc.to_owned(),
                first: first.to_owned(),
                second: id.to_owned(),
            });
        }
        out[v] = Some((i, id));
    }
    Ok(out.into_iter().map(|d| d.map(|(i, _)| i)).collect())
}

/// Validates everything in `input` and compiles the tables of its local endpoints.
pub fn compile(input: &PolicyInput<'_>) -> Result<CompiledPolicy, PolicyError> {
    let limits = input.limits;
    unique(VPC, input.vpcs.iter().map(String::as_str))?;
    unique(SUBNET, input.subnets.iter().map(|s| s.id.as_str()))?;
    unique(ENDPOINT, input.endpoints.iter().map(|e| e.id.as_str()))?;
    unique(GROUP, input.security_groups.iter().map(|g| g.id.as_str()))?;
    unique(ACL, input.network_acls.iter().map(|a| a.id.as_str()))?;
    let vpc_index: HashMap<&str, usize> = input
        .vpcs
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_str(), i))
        .collect();

    // Security groups: explicit ones, then the implicit defaults of VPCs without one.
    let default_groups = defaults(
        GROUP,
        &vpc_index,
        input
            .security_groups
            .iter()
            .map(|g| (g.id.as_str(), g.vpc.as_str(), g.default)),
    )?;
    let implicit: Vec<SecurityGroup> = input
        .vpcs
        .iter()
        .zip(&default_groups)
        .filter(|(_, d)| d.is_none())
        .map(|(v, _)| implicit_default(v))
        .collect();
    let groups: Vec<&SecurityGroup> = input.security_groups.iter().chain(&implicit).collect();
    let mut group_index: HashMap<&str, usize> = HashMap::with_capacity(groups.len());
    for (i, g) in groups.iter().enumerate() {
        if group_index.insert(g.id.as_str(), i).is_some() {
            return Err(PolicyError::DuplicateId {
                kind: GROUP,
                id: g.id.clone(),
            });
        }
    }
    // Each VPC's default group: its explicit one, else its implicit one (in VPC order).
    let mut next_implicit = input.security_groups.len();
    let default_group: Vec<usize> = default_groups
        .iter()
        .map(|d| {
            d.unwrap_or_else(|| {
                next_implicit += 1;
                next_implicit - 1
            })
        })
        .collect();

    let mut sg_classes: Classes<SgClass> = Classes::new();
    let mut sg_rules: Vec<[Vec<SgRec>; 2]> = Vec::with_capacity(groups.len());
    for g in &groups {
        let mut recs: [Vec<SgRec>; 2] = Default::default();
        for (dir, rules) in [&g.inbound, &g.outbound].into_iter().enumerate() {
            let limit = [limits.sg_inbound_rules, limits.sg_outbound_rules][dir];
            quota(GROUP, &g.id, DIRS[dir], rules.len(), limit)?;
            for (i, r) in rules.iter().enumerate() {
                let field = |f: &str| format!("{}[{i}].{f}", DIRS[dir]);
                let invalid = |f: &str, problem| PolicyError::InvalidRule {
                    kind: GROUP,
                    id: g.id.clone(),
                    field: field(f),
                    problem,
                };
                let spec = port_spec(r.protocol, r.from_port, r.to_port)
                    .map_err(|(f, p)| invalid(f, p))?;
                let remote = match (&r.cidr, &r.group) {
                    (Some(net), None) => {
                        let (len, addr) = canonical(*net);
                        Remote::Cidr(len, addr)
                    }
                    (None, Some(other)) => {
                        let &h = group_index
                            .get(other.as_str())
                            .ok_or_else(|| unknown(GROUP, &g.id, field("group"), GROUP, other))?;
                        if groups[h].vpc != g.vpc {
                            return Err(PolicyError::OtherVpc {
                                kind: GROUP,
                                id: g.id.clone(),
                                field: field("group"),
                                target: GROUP,
                                target_id: other.clone(),
                                target_vpc: groups[h].vpc.clone(),
                            });
                        }
                        Remote::Group(h)
                    }
                    _ => return Err(invalid("cidr", RuleProblem::CidrXorGroup)),
                };
                recs[dir].push((remote, spec));
            }
        }
        sg_rules.push(recs);
    }

    // Network ACLs.
    let default_acls = defaults(
        ACL,
        &vpc_index,
        input
            .network_acls
            .iter()
            .map(|a| (a.id.as_str(), a.vpc.as_str(), a.default)),
    )?;
    let acl_index: HashMap<&str, usize> = input
        .network_acls
        .iter()
        .enumerate()
        .map(|(i, a)| (a.id.as_str(), i))
        .collect();
    let mut acl_classes: Classes<AclClass> = Classes::new();
    let mut acl_rules: Vec<[Vec<AddrItem>; 2]> = Vec::with_capacity(input.network_acls.len());
    for a in input.network_acls {
        let mut items: [Vec<AddrItem>; 2] = Default::default();
        for (dir, rules) in [&a.inbound, &a.outbound].into_iter().enumerate() {
            let limit = [limits.acl_inbound_rules, limits.acl_outbound_rules][dir];
            quota(ACL, &a.id, DIRS[dir], rules.len(), limit)?;
            let mut numbers = HashSet::with_capacity(rules.len());
            for (i, r) in rules.iter().enumerate() {
                let invalid = |f: &str, problem| PolicyError::InvalidRule {
                    kind: ACL,
                    id: a.id.clone(),
                    field: format!("{}[{i}].{f}", DIRS[dir]),
                    problem,
                };
                if !(1..=MAX_ACL_RULE).contains(&r.rule) {
                    return Err(invalid("rule", RuleProblem::RuleNumberOutOfRange(r.rule)));
                }
                if !numbers.insert(r.rule) {
                    return Err(invalid("rule", RuleProblem::DuplicateRuleNumber(r.rule)));
                }
                let spec = port_spec(r.protocol, r.from_port, r.to_port)
                    .map_err(|(f, p)| invalid(f, p))?;
                let v = Verdict {
                    rule: r.rule,
                    allow: r.action == AclAction::Allow,
                };
                let cid = acl_classes.intern(AclClass::rule(spec.proto, spec.lo, spec.hi, v));
                let (len, addr) = canonical(r.cidr);
                items[dir].push((len, addr, cid));
            }
        }
        acl_rules.push(items);
    }

    // Subnets: their effective ACL.
    let mut subnet_acl: HashMap<&str, (&str, Option<usize>)> =
        HashMap::with_capacity(input.subnets.len());
    for s in input.subnets {
        let v = *vpc_index
            .get(s.vpc.as_str())
            .ok_or_else(|| unknown(SUBNET, &s.id, "vpc", VPC, &s.vpc))?;
        let acl = match &s.network_acl {
            Some(name) => {
                let &a = acl_index
                    .get(name.as_str())
                    .ok_or_else(|| unknown(SUBNET, &s.id, "network_acl", ACL, name))?;
                let acl_vpc = &input.network_acls[a].vpc;
                if *acl_vpc != s.vpc {
                    return Err(PolicyError::OtherVpc {
                        kind: SUBNET,
                        id: s.id.clone(),
                        field: "network_acl".into(),
                        target: ACL,
                        target_id: name.clone(),
                        target_vpc: acl_vpc.clone(),
                    });
                }
                Some(a)
            }
            None => default_acls[v],
        };
        subnet_acl.insert(s.id.as_str(), (s.vpc.as_str(), acl));
    }

    // Endpoints: group members (all), sets and ACLs (local).
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); groups.len()];
    let mut sets: BTreeMap<SgSetKey, Vec<usize>> = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let mut local_acls: BTreeMap<String, usize> = BTreeMap::new();
    for e in input.endpoints {
        let v = *vpc_index
            .get(e.vpc.as_str())
            .ok_or_else(|| unknown(ENDPOINT, &e.id, "vpc", VPC, &e.vpc))?;
        let &(subnet_vpc, acl) = subnet_acl
            .get(e.subnet.as_str())
            .ok_or_else(|| unknown(ENDPOINT, &e.id, "subnet", SUBNET, &e.subnet))?;
        if subnet_vpc != e.vpc {
            return Err(PolicyError::OtherVpc {
                kind: ENDPOINT,
                id: e.id.clone(),
                field: "subnet".into(),
                target: SUBNET,
                target_id: e.subnet.clone(),
                target_vpc: subnet_vpc.to_owned(),
            });
        }
        let mut own: Vec<usize> = Vec::with_capacity(e.security_groups.len().max(1));
        for (i, name) in e.security_groups.iter().enumerate() {
            let field = || format!("security_groups[{i}]");
            let &g = group_index
                .get(name.as_str())
                .ok_or_else(|| unknown(ENDPOINT, &e.id, field(), GROUP, name))?;
            if groups[g].vpc != e.vpc {
                return Err(PolicyError::OtherVpc {
                    kind: ENDPOINT,
                    id: e.id.clone(),
                    field: field(),
                    target: GROUP,
                    target_id: name.clone(),
                    target_vpc: groups[g].vpc.clone(),
                });
            }
            own.push(g);
        }
        if own.is_empty() {
            own.push(default_group[v]);
        }
        own.sort_unstable_by_key(|&g| &groups[g].id);
        own.dedup();
        quota(
            ENDPOINT,
            &e.id,
            "security_groups",
            own.len(),
            limits.groups_per_endpoint,
        )?;
        let ip = u32::from(e.ip);
        for &g in &own {
            members[g].push(ip);
        }
        if e.local {
            let key: SgSetKey = own.iter().map(|&g| groups[g].id.clone()).collect();
            let acl = acl.map(|a| {
                let id = input.network_acls[a].id.clone();
                local_acls.insert(id.clone(), a);
                id
            });
            endpoints.insert(
                e.id.clone(),
                EndpointPolicy {
                    sg_set: key.clone(),
                    acl,
                },
            );
            sets.insert(key, own);
        }
    }

    // Compile what local endpoints use.
    let mut sg_sets = BTreeMap::new();
    let mut sg_rule_index = BTreeMap::new();
    let mut items: [Vec<AddrItem>; 2] = Default::default();
    for (key, set) in sets {
        // Rule references: the set's rules numbered from 1 in (group, direction, position)
        // order. A rule with the direction and ports of an earlier one shares that one's
        // reference, so classes stay as few as contents of distinct ports (what they were
        // before references); `SgRuleIndex::decided` tells the rules apart by the remote
        // address.
        let mut first: HashMap<(usize, Option<u8>, u16, u16), u32> = HashMap::new();
        let mut rules = Vec::new();
        let mut referenced: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for list in items.iter_mut() {
            list.clear();
        }
        for &g in &set {
            for (dir, list) in items.iter_mut().enumerate() {
                // Security groups are a union: rule order means nothing, so references
                // follow a canonical order (ports, then remote), not the input's.
                let mut order: Vec<(usize, &SgRec)> = sg_rules[g][dir].iter().enumerate().collect();
                order.sort_by_key(|&(position, (remote, spec))| {
                    (
                        spec.proto,
                        spec.lo,
                        spec.hi,
                        remote_key(remote, &groups),
                        position,
                    )
                });
                for (position, &(remote, spec)) in order {
                    let own = rules.len() as u32 + 1;
                    let shared = *first
                        .entry((dir, spec.proto, spec.lo, spec.hi))
                        .or_insert(own);
                    let cid =
                        sg_classes.intern(SgClass::rule(spec.proto, spec.lo, spec.hi, shared));
                    let remote_ref = match remote {
                        Remote::Cidr(len, addr) => {
                            list.push((len, addr, cid));
                            RuleRemote::Cidr(
                                Ipv4Network::new(Ipv4Addr::from(addr), len)
                                    .expect("canonical prefixes are valid"),
                            )
                        }
                        Remote::Group(h) => {
                            list.extend(members[h].iter().map(|&ip| (32, ip, cid)));
                            referenced.entry(groups[h].id.clone()).or_insert_with(|| {
                                members[h].iter().map(|&ip| Ipv4Addr::from(ip)).collect()
                            });
                            RuleRemote::Group(groups[h].id.clone())
                        }
                    };
                    rules.push(SgRuleInfo {
                        group: groups[g].id.clone(),
                        direction: dir as u32,
                        position,
                        reference: shared,
                        proto: spec.proto,
                        ports: (spec.lo, spec.hi),
                        remote: remote_ref,
                    });
                }
            }
        }
        sg_rule_index.insert(key.clone(), SgRuleIndex::new(rules, referenced));
        let (addr, classes) =
            stage(&mut sg_classes, &mut items).map_err(|count| PolicyError::TooManyClasses {
                kind: Kind::SecurityGroupSet,
                id: key.join("+"),
                count,
                max: MAX_CLASSES,
            })?;
        let ports = classes
            .iter()
            .enumerate()
            .flat_map(|(n, &cid)| {
                sg_classes
                    .get(cid)
                    .port_entries()
                    .into_iter()
                    .map(move |(m, r)| ((n as u16, m), r))
            })
            .collect();
        sg_sets.insert(key, SgTables { addr, ports });
    }
    let mut acls = BTreeMap::new();
    for (id, a) in local_acls {
        let mut items = acl_rules[a].clone();
        let (addr, classes) =
            stage(&mut acl_classes, &mut items).map_err(|count| PolicyError::TooManyClasses {
                kind: ACL,
                id: id.clone(),
                count,
                max: MAX_CLASSES,
            })?;
        let ports = classes
            .iter()
            .enumerate()
            .flat_map(|(n, &cid)| {
                acl_classes
                    .get(cid)
                    .port_entries()
                    .into_iter()
                    .map(move |(m, v)| ((n as u16, m), v))
            })
            .collect();
        acls.insert(id, AclTables { addr, ports });
    }
    Ok(CompiledPolicy {
        sg_sets,
        acls,
        endpoints,
        sg_rules: sg_rule_index,
    })
}

/// The address stage of both directions, and the content ids of the classes by number:
/// numbered in the order of their contents, so equal inputs give equal numbers. Sorts
/// `items`. Fails with the number of classes if there are more than [`MAX_CLASSES`].
fn stage<C: Content>(
    classes: &mut Classes<C>,
    items: &mut [Vec<AddrItem>; 2],
) -> Result<(AddrTable, Vec<u32>), usize> {
    let out: Vec<Vec<AddrItem>> = items
        .iter_mut()
        .map(|list| address_stage(classes, list))
        .collect();
    let mut cids: Vec<u32> = out.iter().flatten().map(|i| i.2).collect();
    cids.sort_unstable();
    cids.dedup();
    cids.sort_by(|&a, &b| classes.get(a).cmp(classes.get(b)));
    if cids.len() > MAX_CLASSES as usize {
        return Err(cids.len());
    }
    let number: HashMap<u32, u16> = cids
        .iter()
        .enumerate()
        .map(|(n, &c)| (c, n as u16))
        .collect();
    let mut addr = AddrTable::new();
    for (dir, list) in out.iter().enumerate() {
        for &(len, net, cid) in list {
            // Prefix lengths come from `Ipv4Network`s (at most 32); every emitted class is
            // numbered.
            if let (Some(net), Some(&n)) = (
                Ipv4Network::new_checked(Ipv4Addr::from(net), len),
                number.get(&cid),
            ) {
                addr.insert((dir as u32, net), n);
            }
        }
    }
    Ok((addr, cids))
}
