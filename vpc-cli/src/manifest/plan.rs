//! Desired (the manifest) against current (the account, as described): name resolution,
//! reference checks, the plan of each resource and the create requests. Pure: the API
//! calls live in `exec`.

use std::collections::{BTreeMap, BTreeSet};

use vpc_proto::v1 as pb;

use super::MANAGED_BY;
use super::model::{
    AclEntrySpec, HealthSpec, Kind, NetworkAclSpec, Problem, Resource, RuleSpec, SecurityGroupSpec,
    Spec, TargetGroupSpec, acl_action, proto_ports, rule_ports,
};
use crate::api::{name_tag, port_range_text, protocol_text};

/// The account's objects (from the Describe calls).
#[derive(Clone, Debug, Default)]
pub struct Current {
    pub vpcs: Vec<pb::Vpc>,
    pub subnets: Vec<pb::Subnet>,
    pub groups: Vec<pb::SecurityGroup>,
    pub acls: Vec<pb::NetworkAcl>,
    pub instances: Vec<pb::Instance>,
    pub volumes: Vec<pb::Volume>,
    pub target_groups: Vec<pb::TargetGroup>,
    pub load_balancers: Vec<pb::LoadBalancer>,
}

/// Whether an instance counts as existing (a terminated or terminating one does not: a new
/// one is launched in its place).
pub fn live(i: &pb::Instance) -> bool {
    i.state != "terminated" && i.state != "shutting-down"
}

impl Current {
    /// (Name tag, id, tags) of every object of `kind`.
    pub fn named(&self, kind: Kind) -> Vec<(String, String, &[pb::Tag])> {
        fn each<'a, T>(
            v: &'a [T],
            f: impl Fn(&'a T) -> (&'a str, &'a [pb::Tag]),
        ) -> Vec<(String, String, &'a [pb::Tag])> {
            v.iter()
                .map(|x| {
                    let (id, tags) = f(x);
                    (name_tag(tags), id.to_owned(), tags)
                })
                .collect()
        }
        match kind {
            Kind::Vpc => each(&self.vpcs, |x| (&x.vpc_id, &x.tags)),
            Kind::Subnet => each(&self.subnets, |x| (&x.subnet_id, &x.tags)),
            Kind::SecurityGroup => each(&self.groups, |x| (&x.group_id, &x.tags)),
            Kind::NetworkAcl => each(&self.acls, |x| (&x.network_acl_id, &x.tags)),
            Kind::Instance => {
                let live: Vec<&pb::Instance> = self.instances.iter().filter(|i| live(i)).collect();
                live.into_iter()
                    .map(|x| (name_tag(&x.tags), x.instance_id.clone(), x.tags.as_slice()))
                    .collect()
            }
            Kind::Volume => each(&self.volumes, |x| (&x.volume_id, &x.tags)),
            Kind::TargetGroup => each(&self.target_groups, |x| (&x.target_group_id, &x.tags)),
            Kind::LoadBalancer => each(&self.load_balancers, |x| (&x.load_balancer_id, &x.tags)),
        }
    }

    /// The ids of the objects of `kind` named `name`.
    pub fn ids(&self, kind: Kind, name: &str) -> Vec<String> {
        self.named(kind)
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, id, _)| id)
            .collect()
    }

    /// The one id of `kind`/`name` (None: missing; Err: several).
    pub fn id(&self, kind: Kind, name: &str) -> Result<Option<String>, String> {
        let ids = self.ids(kind, name);
        match ids.len() {
            0 => Ok(None),
            1 => Ok(ids.into_iter().next()),
            _ => Err(format!(
                "{} {kind}s are named {name:?} in the account ({}); rename all but one",
                ids.len(),
                ids.join(", ")
            )),
        }
    }

    fn tags_of(&self, kind: Kind, id: &str) -> Vec<pb::Tag> {
        self.named(kind)
            .into_iter()
            .find(|(_, i, _)| i == id)
            .map(|(_, _, t)| t.to_vec())
            .unwrap_or_default()
    }

    pub fn vpc(&self, id: &str) -> Option<&pb::Vpc> {
        self.vpcs.iter().find(|x| x.vpc_id == id)
    }
    pub fn subnet(&self, id: &str) -> Option<&pb::Subnet> {
        self.subnets.iter().find(|x| x.subnet_id == id)
    }
    pub fn group(&self, id: &str) -> Option<&pb::SecurityGroup> {
        self.groups.iter().find(|x| x.group_id == id)
    }
    pub fn acl(&self, id: &str) -> Option<&pb::NetworkAcl> {
        self.acls.iter().find(|x| x.network_acl_id == id)
    }
    /// The default network ACL of VPC `vpc_id`.
    pub fn default_acl(&self, vpc_id: &str) -> Option<&pb::NetworkAcl> {
        self.acls
            .iter()
            .find(|x| x.vpc_id == vpc_id && x.is_default)
    }
    pub fn instance(&self, id: &str) -> Option<&pb::Instance> {
        self.instances.iter().find(|x| x.instance_id == id)
    }
    pub fn volume(&self, id: &str) -> Option<&pb::Volume> {
        self.volumes.iter().find(|x| x.volume_id == id)
    }
    pub fn target_group(&self, id: &str) -> Option<&pb::TargetGroup> {
        self.target_groups.iter().find(|x| x.target_group_id == id)
    }
    pub fn load_balancer(&self, id: &str) -> Option<&pb::LoadBalancer> {
        self.load_balancers
            .iter()
            .find(|x| x.load_balancer_id == id)
    }
}

/// Checks every reference (in the files or in the account) and that no name is ambiguous in
/// the account.
pub fn check_refs(all: &[Resource], cur: &Current) -> Vec<Problem> {
    let in_file: BTreeSet<(Kind, &str)> = all.iter().map(|r| (r.kind, r.name.as_str())).collect();
    let mut out = Vec::new();
    for r in all {
        if let Err(e) = cur.id(r.kind, &r.name) {
            out.push(r.problem("name", &e));
        }
        for x in r.refs() {
            match cur.id(x.kind, &x.name) {
                Err(e) => out.push(r.problem(&x.field, &e)),
                Ok(None) if !in_file.contains(&(x.kind, x.name.as_str())) => {
                    out.push(r.problem(&x.field, &format!("no {} named {:?}", x.kind, x.name)));
                }
                Ok(_) => {}
            }
        }
        if let Spec::NetworkAcl(s) = &r.spec {
            out.extend(acl_subnet_vpcs(r, s, all, cur));
        }
    }
    out
}

/// The subnets of a network ACL must be in its VPC.
fn acl_subnet_vpcs(
    r: &Resource,
    s: &NetworkAclSpec,
    all: &[Resource],
    cur: &Current,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let vpc_id = cur.id(Kind::Vpc, &s.vpc).ok().flatten();
    for (i, n) in s.subnets.iter().enumerate() {
        let in_file = all.iter().find_map(|x| match &x.spec {
            Spec::Subnet(sub) if x.name == *n => Some(sub.vpc.clone()),
            _ => None,
        });
        let wrong = match in_file {
            Some(v) => (v != s.vpc).then_some(format!("VPC {v:?}")),
            None => match (cur.id(Kind::Subnet, n).ok().flatten(), &vpc_id) {
                (Some(sid), Some(vid)) => cur
                    .subnet(&sid)
                    .filter(|x| x.vpc_id != *vid)
                    .map(|x| format!("VPC {}", x.vpc_id)),
                _ => None,
            },
        };
        if let Some(w) = wrong {
            out.push(r.problem(
                &format!("spec.subnets[{i}]"),
                &format!(
                    "subnet {n:?} is in {w}, not in {:?}; a subnet takes an ACL of its own VPC",
                    s.vpc
                ),
            ));
        }
    }
    out
}

/// The id a reference resolves to: the account's object, or a placeholder for one the plan
/// creates (so that comparisons of existing objects with new ones differ).
pub fn resolve(cur: &Current, kind: Kind, name: &str) -> String {
    cur.id(kind, name)
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("<new {}/{name}>", kind.lower()))
}

/// The tags apply sets.
pub fn desired_tags(r: &Resource) -> Vec<pb::Tag> {
    let mut t = vec![
        pb::Tag {
            key: "Name".into(),
            value: r.name.clone(),
        },
        pb::Tag {
            key: MANAGED_BY.into(),
            value: "apply".into(),
        },
    ];
    t.extend(r.tags.iter().map(|(k, v)| pb::Tag {
        key: k.clone(),
        value: v.clone(),
    }));
    t
}

// ---------------------------------------------------------------------------------------
// Plans.

/// An in-place change of an existing object.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Tags to add or overwrite.
    Tags(Vec<pb::Tag>),
    Revoke {
        egress: bool,
        rule_ids: Vec<String>,
    },
    Authorize {
        egress: bool,
        rules: Vec<pb::SecurityGroupRule>,
    },
    ModifyTargetGroup {
        health_check: Option<pb::HealthCheck>,
        deregistration_delay_seconds: Option<u32>,
    },
    Deregister(Vec<pb::Target>),
    Register(Vec<pb::Target>),
    DeleteListener(String),
    /// Network ACL entries to delete, by rule number.
    DeleteAclEntries {
        egress: bool,
        rule_numbers: Vec<u32>,
    },
    CreateAclEntries(Vec<pb::NetworkAclEntry>),
    /// Subnets to associate with the network ACL `network_acl_id` (this one, or the VPC's
    /// default for subnets no longer listed).
    Associate {
        subnet_ids: Vec<String>,
        network_acl_id: String,
    },
    CreateListener {
        protocol: String,
        port: u32,
        target_group_id: String,
    },
}

/// A change and how `diff` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub text: String,
    pub op: Op,
}

/// What apply does with one resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Create,
    Update(Vec<Change>),
    Unchanged,
    /// Fields that differ and cannot change in place: nothing is done.
    Immutable(Vec<String>),
}

/// The plan of one resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Index in the manifest.
    pub index: usize,
    /// The existing object.
    pub id: Option<String>,
    pub action: Action,
}

/// A security group rule as compared: protocol, ports, peer, description.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleKey {
    pub protocol: String,
    pub from: i32,
    pub to: i32,
    pub cidr: String,
    pub group: String,
    pub description: String,
}

impl RuleKey {
    fn of(r: &pb::SecurityGroupRule) -> RuleKey {
        RuleKey {
            protocol: r.ip_protocol.clone(),
            from: r.from_port,
            to: r.to_port,
            cidr: r.cidr_ipv4.clone(),
            group: r.referenced_group_id.clone(),
            description: r.description.clone(),
        }
    }

    fn to_pb(&self, egress: bool) -> pb::SecurityGroupRule {
        pb::SecurityGroupRule {
            ip_protocol: self.protocol.clone(),
            from_port: self.from,
            to_port: self.to,
            cidr_ipv4: self.cidr.clone(),
            referenced_group_id: self.group.clone(),
            description: self.description.clone(),
            is_egress: egress,
            ..Default::default()
        }
    }

    /// `tcp 80 0.0.0.0/0`, `tcp 5432 sg-... ("web")`.
    pub fn text(&self, names: &BTreeMap<String, String>) -> String {
        let peer = if self.group.is_empty() {
            self.cidr.clone()
        } else {
            match names.get(&self.group) {
                Some(n) => format!("group {n}"),
                None => format!("group {}", self.group),
            }
        };
        let mut s = format!(
            "{} {} {peer}",
            protocol_text(&self.protocol),
            port_range_text(&self.protocol, self.from, self.to)
        );
        if !self.description.is_empty() {
            s.push_str(&format!(" ({:?})", self.description));
        }
        s
    }
}

/// The rules a spec asks for (peers resolved).
pub fn desired_rules(rules: &[RuleSpec], cur: &Current) -> Vec<RuleKey> {
    rules
        .iter()
        .filter_map(|r| {
            let (protocol, from, to) = rule_ports(r).ok()?;
            Some(RuleKey {
                protocol,
                from,
                to,
                cidr: r.cidr.as_deref().unwrap_or_default().trim().to_owned(),
                group: r
                    .source_group
                    .as_deref()
                    .map(|g| resolve(cur, Kind::SecurityGroup, g))
                    .unwrap_or_default(),
                description: r.description.clone().unwrap_or_default(),
            })
        })
        .collect()
}

/// AWS's default egress: everything to 0.0.0.0/0.
pub fn default_egress() -> Vec<RuleKey> {
    vec![RuleKey {
        protocol: "-1".into(),
        from: -1,
        to: -1,
        cidr: "0.0.0.0/0".into(),
        group: String::new(),
        description: String::new(),
    }]
}

/// Rules to revoke (current ones not desired) and to authorize (desired ones missing).
pub fn rule_changes(
    desired: &[RuleKey],
    current: &[pb::SecurityGroupRule],
) -> (Vec<pb::SecurityGroupRule>, Vec<RuleKey>) {
    let revoke = current
        .iter()
        .filter(|c| !desired.contains(&RuleKey::of(c)))
        .cloned()
        .collect();
    let add = desired
        .iter()
        .filter(|d| !current.iter().any(|c| RuleKey::of(c) == **d))
        .cloned()
        .collect();
    (revoke, add)
}

fn group_names(cur: &Current) -> BTreeMap<String, String> {
    cur.groups
        .iter()
        .map(|g| {
            let n = name_tag(&g.tags);
            (
                g.group_id.clone(),
                if n.is_empty() {
                    g.group_name.clone()
                } else {
                    n
                },
            )
        })
        .collect()
}

fn immutable(out: &mut Vec<String>, field: &str, current: &str, desired: &str) {
    if current != desired {
        out.push(format!(
            "{field}: field is immutable (current {current:?}, desired {desired:?}); delete \
             and re-create the resource to change it"
        ));
    }
}

fn sg_changes(s: &SecurityGroupSpec, g: &pb::SecurityGroup, cur: &Current) -> Vec<Change> {
    let names = group_names(cur);
    let mut out = Vec::new();
    let egress_desired = match &s.egress {
        Some(rules) => desired_rules(rules, cur),
        None => default_egress(),
    };
    for (egress, desired, current) in [
        (false, desired_rules(&s.ingress, cur), &g.ingress_rules),
        (true, egress_desired, &g.egress_rules),
    ] {
        let dir = if egress { "egress" } else { "ingress" };
        let (revoke, add) = rule_changes(&desired, current);
        if !revoke.is_empty() {
            let text = revoke
                .iter()
                .map(|r| format!("- {}", RuleKey::of(r).text(&names)))
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Change {
                text: format!("spec.{dir}: {text}"),
                op: Op::Revoke {
                    egress,
                    rule_ids: revoke
                        .iter()
                        .map(|r| r.security_group_rule_id.clone())
                        .collect(),
                },
            });
        }
        if !add.is_empty() {
            let text = add
                .iter()
                .map(|r| format!("+ {}", r.text(&names)))
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Change {
                text: format!("spec.{dir}: {text}"),
                op: Op::Authorize {
                    egress,
                    rules: add.iter().map(|r| r.to_pb(egress)).collect(),
                },
            });
        }
    }
    out
}

/// The health check to send: the current one with the spec's fields over it (None: the spec's
/// fields all match).
pub fn health_change(spec: &HealthSpec, current: &pb::HealthCheck) -> Option<pb::HealthCheck> {
    let mut want = current.clone();
    if let Some(p) = &spec.protocol {
        want.protocol = p.to_ascii_uppercase();
    }
    if let Some(p) = spec.port {
        want.port = p;
    }
    if let Some(p) = &spec.path {
        want.path = p.clone();
    }
    if let Some(v) = spec.interval_seconds {
        want.interval_seconds = v;
    }
    if let Some(v) = spec.timeout_seconds {
        want.timeout_seconds = v;
    }
    if let Some(v) = spec.healthy_threshold {
        want.healthy_threshold = v;
    }
    if let Some(v) = spec.unhealthy_threshold {
        want.unhealthy_threshold = v;
    }
    (want != *current).then_some(want)
}

fn tg_changes(s: &TargetGroupSpec, t: &pb::TargetGroup, cur: &Current) -> Vec<Change> {
    let mut out = Vec::new();
    let health = s
        .health_check
        .as_ref()
        .and_then(|h| health_change(h, &t.health_check.clone().unwrap_or_default()));
    let delay = s
        .deregistration_delay_seconds
        .filter(|d| *d != t.deregistration_delay_seconds);
    if health.is_some() || delay.is_some() {
        let mut text = Vec::new();
        if let Some(h) = &health {
            text.push(format!(
                "spec.healthCheck: {} port {} path {:?} interval {}s timeout {}s thresholds {}/{}",
                h.protocol,
                h.port,
                h.path,
                h.interval_seconds,
                h.timeout_seconds,
                h.healthy_threshold,
                h.unhealthy_threshold
            ));
        }
        if let Some(d) = delay {
            text.push(format!(
                "spec.deregistrationDelaySeconds: {} -> {d}",
                t.deregistration_delay_seconds
            ));
        }
        out.push(Change {
            text: text.join("; "),
            op: Op::ModifyTargetGroup {
                health_check: health,
                deregistration_delay_seconds: delay,
            },
        });
    }
    let desired: Vec<pb::Target> = s
        .targets
        .iter()
        .map(|x| pb::Target {
            id: resolve(cur, Kind::Instance, &x.instance),
            port: u32::from(x.port.unwrap_or(s.port)),
            weight: x.weight.unwrap_or(0),
        })
        .collect();
    let names: BTreeMap<String, String> = cur
        .instances
        .iter()
        .map(|i| (i.instance_id.clone(), name_tag(&i.tags)))
        .collect();
    let show = |x: &pb::Target| {
        let n = names.get(&x.id).cloned().unwrap_or_else(|| x.id.clone());
        format!("{n}:{}", x.port)
    };
    let extra: Vec<pb::Target> = t
        .targets
        .iter()
        .filter(|c| !desired.iter().any(|d| d.id == c.id && d.port == c.port))
        .map(|c| pb::Target {
            id: c.id.clone(),
            port: c.port,
            weight: 0,
        })
        .collect();
    if !extra.is_empty() {
        out.push(Change {
            text: format!(
                "spec.targets: - {}",
                extra.iter().map(show).collect::<Vec<_>>().join(", - ")
            ),
            op: Op::Deregister(extra),
        });
    }
    let missing: Vec<pb::Target> = desired
        .iter()
        .filter(|d| {
            !t.targets.iter().any(|c| {
                c.id == d.id && c.port == d.port && (d.weight == 0 || d.weight == c.weight)
            })
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        out.push(Change {
            text: format!(
                "spec.targets: + {}",
                missing.iter().map(show).collect::<Vec<_>>().join(", + ")
            ),
            op: Op::Register(missing),
        });
    }
    out
}

fn lb_changes(
    s: &super::model::LoadBalancerSpec,
    l: &pb::LoadBalancer,
    cur: &Current,
) -> Vec<Change> {
    let mut out = Vec::new();
    let desired: Vec<(String, u32, String, &str)> = s
        .listeners
        .iter()
        .map(|x| {
            (
                x.protocol.to_ascii_uppercase(),
                u32::from(x.port),
                resolve(cur, Kind::TargetGroup, &x.target_group),
                x.target_group.as_str(),
            )
        })
        .collect();
    for c in &l.listeners {
        if !desired
            .iter()
            .any(|d| d.0 == c.protocol && d.1 == c.port && d.2 == c.target_group_id)
        {
            out.push(Change {
                text: format!(
                    "spec.listeners: - {} {} -> {}",
                    c.protocol, c.port, c.target_group_id
                ),
                op: Op::DeleteListener(c.listener_id.clone()),
            });
        }
    }
    for d in &desired {
        if !l
            .listeners
            .iter()
            .any(|c| d.0 == c.protocol && d.1 == c.port && d.2 == c.target_group_id)
        {
            out.push(Change {
                text: format!("spec.listeners: + {} {} -> {}", d.0, d.1, d.3),
                op: Op::CreateListener {
                    protocol: d.0.clone(),
                    port: d.1,
                    target_group_id: d.2.clone(),
                },
            });
        }
    }
    out
}

/// `100 allow tcp 5432 10.0.1.0/24`.
pub fn acl_entry_text(e: &pb::NetworkAclEntry) -> String {
    // ICMP: the type (any code shows as -1).
    let ports = if e.protocol == "icmp" && e.from_port != -1 && e.to_port == -1 {
        e.from_port.to_string()
    } else {
        port_range_text(&e.protocol, e.from_port, e.to_port)
    };
    format!(
        "{} {} {} {} {}",
        e.rule_number,
        e.rule_action,
        protocol_text(&e.protocol),
        ports,
        e.cidr_block
    )
}

/// The entries a spec asks for, as the API shows them.
pub fn desired_entries(entries: &[AclEntrySpec], egress: bool) -> Vec<pb::NetworkAclEntry> {
    entries
        .iter()
        .filter_map(|e| {
            let (protocol, from_port, to_port) = proto_ports(&e.protocol, e.port.as_ref()).ok()?;
            Some(pb::NetworkAclEntry {
                rule_number: u32::try_from(e.rule).ok()?,
                protocol,
                rule_action: acl_action(&e.action)?.to_owned(),
                egress,
                cidr_block: e.cidr.trim().to_owned(),
                from_port,
                to_port,
            })
        })
        .collect()
}

fn acl_changes(s: &NetworkAclSpec, a: &pb::NetworkAcl, cur: &Current) -> Vec<Change> {
    let mut out = Vec::new();
    for (egress, entries) in [(false, &s.inbound), (true, &s.outbound)] {
        let dir = if egress { "outbound" } else { "inbound" };
        let desired = desired_entries(entries, egress);
        let current: Vec<&pb::NetworkAclEntry> =
            a.entries.iter().filter(|e| e.egress == egress).collect();
        // Entries whose number is gone or whose content differs go; missing ones come.
        let stale: Vec<&pb::NetworkAclEntry> = current
            .iter()
            .copied()
            .filter(|c| !desired.contains(c))
            .collect();
        let missing: Vec<pb::NetworkAclEntry> = desired
            .iter()
            .filter(|d| !current.contains(d))
            .cloned()
            .collect();
        if !stale.is_empty() {
            let text = stale
                .iter()
                .map(|e| format!("- {}", acl_entry_text(e)))
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Change {
                text: format!("spec.{dir}: {text}"),
                op: Op::DeleteAclEntries {
                    egress,
                    rule_numbers: stale.iter().map(|e| e.rule_number).collect(),
                },
            });
        }
        if !missing.is_empty() {
            let text = missing
                .iter()
                .map(|e| format!("+ {}", acl_entry_text(e)))
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Change {
                text: format!("spec.{dir}: {text}"),
                op: Op::CreateAclEntries(missing),
            });
        }
    }
    let names: BTreeMap<String, String> = cur
        .subnets
        .iter()
        .map(|x| (x.subnet_id.clone(), name_tag(&x.tags)))
        .collect();
    let show = |id: &String| match names.get(id) {
        Some(n) if !n.is_empty() => n.clone(),
        _ => id.clone(),
    };
    let want: Vec<String> = s
        .subnets
        .iter()
        .map(|n| resolve(cur, Kind::Subnet, n))
        .collect();
    let extra: Vec<String> = a
        .subnet_ids
        .iter()
        .filter(|x| !want.contains(x))
        .cloned()
        .collect();
    if !extra.is_empty()
        && let Some(d) = cur.default_acl(&a.vpc_id)
    {
        out.push(Change {
            text: format!(
                "spec.subnets: - {} (to the default ACL {})",
                extra.iter().map(show).collect::<Vec<_>>().join(", - "),
                d.network_acl_id
            ),
            op: Op::Associate {
                subnet_ids: extra,
                network_acl_id: d.network_acl_id.clone(),
            },
        });
    }
    let missing: Vec<(String, &String)> = want
        .iter()
        .zip(&s.subnets)
        .filter(|(id, _)| !a.subnet_ids.contains(id))
        .map(|(id, n)| (id.clone(), n))
        .collect();
    if !missing.is_empty() {
        out.push(Change {
            text: format!(
                "spec.subnets: + {}",
                missing
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", + ")
            ),
            op: Op::Associate {
                subnet_ids: missing.into_iter().map(|(id, _)| id).collect(),
                network_acl_id: a.network_acl_id.clone(),
            },
        });
    }
    out
}

/// The plan of every resource of the manifest (in manifest order).
pub fn plan(all: &[Resource], cur: &Current) -> Vec<Step> {
    all.iter()
        .enumerate()
        .map(|(index, r)| {
            let id = cur.id(r.kind, &r.name).ok().flatten();
            let action = match &id {
                None => Action::Create,
                Some(id) => plan_existing(r, id, cur),
            };
            Step { index, id, action }
        })
        .collect()
}

fn plan_existing(r: &Resource, id: &str, cur: &Current) -> Action {
    let mut imm = Vec::new();
    let mut changes = Vec::new();
    let res = |k, n: &str| resolve(cur, k, n);
    match &r.spec {
        Spec::Vpc(s) => {
            let v = cur.vpc(id).cloned().unwrap_or_default();
            immutable(&mut imm, "spec.cidrBlock", &v.cidr_block, &s.cidr_block);
        }
        Spec::Subnet(s) => {
            let v = cur.subnet(id).cloned().unwrap_or_default();
            immutable(&mut imm, "spec.vpc", &v.vpc_id, &res(Kind::Vpc, &s.vpc));
            immutable(&mut imm, "spec.cidrBlock", &v.cidr_block, &s.cidr_block);
        }
        Spec::SecurityGroup(s) => {
            let g = cur.group(id).cloned().unwrap_or_default();
            immutable(&mut imm, "spec.vpc", &g.vpc_id, &res(Kind::Vpc, &s.vpc));
            let desc = s.description.as_deref().unwrap_or(&r.name);
            immutable(&mut imm, "spec.description", &g.description, desc);
            if imm.is_empty() {
                changes = sg_changes(s, &g, cur);
            }
        }
        Spec::NetworkAcl(s) => {
            let a = cur.acl(id).cloned().unwrap_or_default();
            immutable(&mut imm, "spec.vpc", &a.vpc_id, &res(Kind::Vpc, &s.vpc));
            if imm.is_empty() {
                changes = acl_changes(s, &a, cur);
            }
        }
        Spec::Instance(s) => {
            let i = cur.instance(id).cloned().unwrap_or_default();
            immutable(
                &mut imm,
                "spec.subnet",
                &i.subnet_id,
                &res(Kind::Subnet, &s.subnet),
            );
            if !s.security_groups.is_empty() {
                let want: BTreeSet<String> = s
                    .security_groups
                    .iter()
                    .map(|g| res(Kind::SecurityGroup, g))
                    .collect();
                let have: BTreeSet<String> = i.security_group_ids.iter().cloned().collect();
                let j = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
                immutable(&mut imm, "spec.securityGroups", &j(&have), &j(&want));
            }
            if let Some(t) = &s.instance_type {
                immutable(&mut imm, "spec.instanceType", &i.instance_type, t);
            }
            if let Some(ip) = &s.private_ip {
                immutable(&mut imm, "spec.privateIp", &i.private_ip_address, ip);
            }
            if let Some(c) = &s.command {
                immutable(&mut imm, "spec.command", &i.command, c);
            }
            if let Some(h) = &s.host {
                immutable(&mut imm, "spec.host", &i.host_id, h);
            }
        }
        Spec::Volume(s) => {
            let v = cur.volume(id).cloned().unwrap_or_default();
            if let Some(size) = s.size_gib {
                immutable(
                    &mut imm,
                    "spec.sizeGib",
                    &v.size_gib.to_string(),
                    &size.to_string(),
                );
            }
            if let Some(h) = &s.host {
                immutable(&mut imm, "spec.host", &v.host_id, h);
            }
            if let Some(snap) = &s.snapshot {
                immutable(&mut imm, "spec.snapshot", &v.snapshot_id, snap);
            }
        }
        Spec::TargetGroup(s) => {
            let t = cur.target_group(id).cloned().unwrap_or_default();
            immutable(&mut imm, "spec.vpc", &t.vpc_id, &res(Kind::Vpc, &s.vpc));
            immutable(
                &mut imm,
                "spec.protocol",
                &t.protocol,
                &s.protocol.to_ascii_uppercase(),
            );
            immutable(
                &mut imm,
                "spec.port",
                &t.port.to_string(),
                &s.port.to_string(),
            );
            if imm.is_empty() {
                changes = tg_changes(s, &t, cur);
            }
        }
        Spec::LoadBalancer(s) => {
            let l = cur.load_balancer(id).cloned().unwrap_or_default();
            immutable(
                &mut imm,
                "spec.subnet",
                &l.subnet_id,
                &res(Kind::Subnet, &s.subnet),
            );
            if let Some(vip) = &s.vip {
                immutable(&mut imm, "spec.vip", &l.vip, vip);
            }
            if imm.is_empty() {
                changes = lb_changes(s, &l, cur);
            }
        }
    }
    if !imm.is_empty() {
        return Action::Immutable(imm);
    }
    let have = cur.tags_of(r.kind, id);
    let set: Vec<pb::Tag> = desired_tags(r)
        .into_iter()
        .filter(|t| !have.iter().any(|h| h.key == t.key && h.value == t.value))
        .collect();
    if !set.is_empty() {
        let text = set
            .iter()
            .map(|t| format!("{}={}", t.key, t.value))
            .collect::<Vec<_>>()
            .join(", ");
        changes.insert(
            0,
            Change {
                text: format!("tags: + {text}"),
                op: Op::Tags(set),
            },
        );
    }
    if changes.is_empty() {
        Action::Unchanged
    } else {
        Action::Update(changes)
    }
}

// ---------------------------------------------------------------------------------------
// Creates.

/// A create request (the parents resolved; rules, targets and listeners come after, as
/// changes).
#[derive(Clone, Debug, PartialEq)]
pub enum Create {
    Vpc(pb::CreateVpcRequest),
    Subnet(pb::CreateSubnetRequest),
    SecurityGroup(pb::CreateSecurityGroupRequest),
    NetworkAcl(pb::CreateNetworkAclRequest),
    Instance(pb::RunInstancesRequest),
    Volume(pb::CreateVolumeRequest),
    TargetGroup(pb::CreateTargetGroupRequest),
    LoadBalancer(pb::CreateLoadBalancerRequest),
}

/// FNV-1a, 64 bits.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The client token of a create: kind, name, spec and resolved parents hashed, so a retry
/// of the same apply is the same request; `generation` > 0 when an earlier object made with
/// the token is gone.
pub fn client_token(r: &Resource, parents: &[String], generation: u32) -> String {
    let text = format!(
        "{}\n{}\n{}\n{}",
        r.kind,
        r.name,
        r.spec.canonical(),
        parents.join(",")
    );
    let base = format!("apply-{}-{:016x}", r.kind.lower(), fnv64(text.as_bytes()));
    if generation == 0 {
        base
    } else {
        format!("{base}-{generation}")
    }
}

/// The create request of `r` (parents must exist in `cur`).
pub fn create_request(r: &Resource, cur: &Current, generation: u32) -> Result<Create, String> {
    let need = |k: Kind, n: &str| {
        cur.id(k, n)?
            .ok_or_else(|| format!("no {k} named {n:?} (it was not created)"))
    };
    let tags = desired_tags(r);
    Ok(match &r.spec {
        Spec::Vpc(s) => Create::Vpc(pb::CreateVpcRequest {
            cidr_block: s.cidr_block.clone(),
            tags,
            client_token: client_token(r, &[], generation),
            ..Default::default()
        }),
        Spec::Subnet(s) => {
            let vpc = need(Kind::Vpc, &s.vpc)?;
            Create::Subnet(pb::CreateSubnetRequest {
                client_token: client_token(r, std::slice::from_ref(&vpc), generation),
                vpc_id: vpc,
                cidr_block: s.cidr_block.clone(),
                tags,
            })
        }
        Spec::SecurityGroup(s) => {
            let vpc = need(Kind::Vpc, &s.vpc)?;
            Create::SecurityGroup(pb::CreateSecurityGroupRequest {
                client_token: client_token(r, std::slice::from_ref(&vpc), generation),
                vpc_id: vpc,
                group_name: r.name.clone(),
                description: s.description.clone().unwrap_or_else(|| r.name.clone()),
                tags,
            })
        }
        Spec::NetworkAcl(s) => {
            let vpc = need(Kind::Vpc, &s.vpc)?;
            Create::NetworkAcl(pb::CreateNetworkAclRequest {
                client_token: client_token(r, std::slice::from_ref(&vpc), generation),
                vpc_id: vpc,
                tags,
            })
        }
        Spec::Instance(s) => {
            let subnet = need(Kind::Subnet, &s.subnet)?;
            let mut groups = Vec::new();
            for g in &s.security_groups {
                groups.push(need(Kind::SecurityGroup, g)?);
            }
            let mut parents = vec![subnet.clone()];
            parents.extend(groups.iter().cloned());
            Create::Instance(pb::RunInstancesRequest {
                subnet_id: subnet,
                security_group_ids: groups,
                private_ip_address: s.private_ip.clone().unwrap_or_default(),
                host_id: s.host.clone().unwrap_or_default(),
                instance_type: s.instance_type.clone().unwrap_or_default(),
                count: 1,
                tags,
                client_token: client_token(r, &parents, generation),
                user_data: s.user_data.clone().unwrap_or_default().into_bytes(),
                command: s.command.clone().unwrap_or_default(),
            })
        }
        Spec::Volume(s) => Create::Volume(pb::CreateVolumeRequest {
            size_gib: s.size_gib.unwrap_or(0),
            tags,
            client_token: client_token(r, &[], generation),
            host_id: s.host.clone().unwrap_or_default(),
            snapshot_id: s.snapshot.clone().unwrap_or_default(),
        }),
        Spec::TargetGroup(s) => {
            let vpc = need(Kind::Vpc, &s.vpc)?;
            let health_check = s.health_check.as_ref().map(|h| pb::HealthCheck {
                protocol: h.protocol.clone().unwrap_or_default(),
                port: h.port.unwrap_or(0),
                path: h.path.clone().unwrap_or_default(),
                interval_seconds: h.interval_seconds.unwrap_or(0),
                timeout_seconds: h.timeout_seconds.unwrap_or(0),
                healthy_threshold: h.healthy_threshold.unwrap_or(0),
                unhealthy_threshold: h.unhealthy_threshold.unwrap_or(0),
            });
            Create::TargetGroup(pb::CreateTargetGroupRequest {
                client_token: client_token(r, std::slice::from_ref(&vpc), generation),
                name: r.name.clone(),
                vpc_id: vpc,
                protocol: s.protocol.to_ascii_uppercase(),
                port: u32::from(s.port),
                health_check,
                deregistration_delay_seconds: s.deregistration_delay_seconds,
                tags,
            })
        }
        Spec::LoadBalancer(s) => {
            let subnet = need(Kind::Subnet, &s.subnet)?;
            Create::LoadBalancer(pb::CreateLoadBalancerRequest {
                client_token: client_token(r, std::slice::from_ref(&subnet), generation),
                name: r.name.clone(),
                subnet_id: subnet,
                vip: s.vip.clone().unwrap_or_default(),
                tags,
            })
        }
    })
}
