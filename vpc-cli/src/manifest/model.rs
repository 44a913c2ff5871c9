//! The manifest format: parsing (YAML streams, YAML/JSON lists, single objects) and the
//! checks that need no API call (kinds, names, fields, duplicates, values).

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{api_ports, parse_port_range, parse_protocol};

/// The kinds a manifest may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Vpc,
    Subnet,
    SecurityGroup,
    NetworkAcl,
    Instance,
    Volume,
    TargetGroup,
    LoadBalancer,
}

impl Kind {
    /// Every kind, in creation order of their ranks.
    pub const ALL: [Kind; 8] = [
        Kind::Vpc,
        Kind::Subnet,
        Kind::SecurityGroup,
        Kind::NetworkAcl,
        Kind::Instance,
        Kind::Volume,
        Kind::TargetGroup,
        Kind::LoadBalancer,
    ];

    /// The kind as a manifest spells it (any case accepted).
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.title().eq_ignore_ascii_case(s))
    }

    /// `Vpc`, `SecurityGroup`, ... (as in manifests and messages).
    pub fn title(self) -> &'static str {
        match self {
            Kind::Vpc => "Vpc",
            Kind::Subnet => "Subnet",
            Kind::SecurityGroup => "SecurityGroup",
            Kind::NetworkAcl => "NetworkAcl",
            Kind::Instance => "Instance",
            Kind::Volume => "Volume",
            Kind::TargetGroup => "TargetGroup",
            Kind::LoadBalancer => "LoadBalancer",
        }
    }

    /// `vpc`, `securitygroup`, ... (the output lines, kubectl style).
    pub fn lower(self) -> String {
        self.title().to_ascii_lowercase()
    }

    /// Creation rank: a resource only references resources of a lower rank, except the soft
    /// references (rule peers, targets) that are converged once everything exists.
    pub fn rank(self) -> u8 {
        match self {
            Kind::Vpc => 0,
            Kind::Subnet | Kind::SecurityGroup | Kind::NetworkAcl => 1,
            Kind::Instance | Kind::Volume | Kind::TargetGroup => 2,
            Kind::LoadBalancer => 3,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// Where a resource is: its file and its 1-based position in it (documents and list items
/// counted in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub file: String,
    pub index: usize,
}

/// A problem with a manifest, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `file: document N (Kind/name): field: msg`.
pub fn problem(loc: &Loc, what: Option<(Kind, &str)>, field: &str, msg: &str) -> Problem {
    let mut s = format!("{}: document {}", loc.file, loc.index);
    if let Some((k, n)) = what {
        s.push_str(&format!(" ({k}/{n})"));
    }
    s.push_str(": ");
    if !field.is_empty() {
        s.push_str(field);
        s.push_str(": ");
    }
    s.push_str(msg);
    Problem(s)
}

// ---------------------------------------------------------------------------------------
// Specs (camelCase; unknown fields are errors).

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VpcSpec {
    pub cidr_block: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubnetSpec {
    pub vpc: String,
    pub cidr_block: String,
}

/// A port, a range (`1000-2000`) or `all`/-1.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PortSpec {
    Number(i64),
    Text(String),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// tcp, udp, icmp, all/-1 or a number.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// The peer group by name (its members as source for ingress, destination for egress).
    #[serde(
        default,
        alias = "destinationGroup",
        alias = "group",
        skip_serializing_if = "Option::is_none"
    )]
    pub source_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecurityGroupSpec {
    pub vpc: String,
    /// Default: the name (the API requires one; it cannot change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub ingress: Vec<RuleSpec>,
    /// Absent: AWS's default, one allow-all rule to 0.0.0.0/0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<RuleSpec>>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InstanceSpec {
    pub subnet: String,
    /// Empty: the VPC's default group.
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// Placement on a host (id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A snapshot id to restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetSpec {
    /// The instance by name.
    pub instance: String,
    /// Default: the group's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetGroupSpec {
    pub vpc: String,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregistration_delay_seconds: Option<u32>,
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerSpec {
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: u16,
    /// The target group by name.
    pub target_group: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    pub subnet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
}

/// One network ACL entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AclEntrySpec {
    /// The rule number, 1-32766 (unique per direction; the lowest match wins).
    #[serde(alias = "ruleNumber")]
    pub rule: i64,
    /// tcp, udp, icmp, all/-1 or a number.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSpec>,
    #[serde(alias = "cidrBlock")]
    pub cidr: String,
    /// allow or deny.
    #[serde(alias = "ruleAction")]
    pub action: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkAclSpec {
    pub vpc: String,
    /// The subnets (by name) associated with this ACL.
    #[serde(default)]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub inbound: Vec<AclEntrySpec>,
    #[serde(default)]
    pub outbound: Vec<AclEntrySpec>,
}

/// The highest rule number of an ACL entry (32767 is the implicit final deny).
pub const MAX_ACL_RULE: i64 = 32766;

/// A resource's spec, by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Vpc(VpcSpec),
    Subnet(SubnetSpec),
    SecurityGroup(SecurityGroupSpec),
    NetworkAcl(NetworkAclSpec),
    Instance(InstanceSpec),
    Volume(VolumeSpec),
    TargetGroup(TargetGroupSpec),
    LoadBalancer(LoadBalancerSpec),
}

impl Spec {
    /// The spec as canonical JSON (field order of the structs): the client-token hash input.
    pub fn canonical(&self) -> String {
        let v = match self {
            Spec::Vpc(s) => serde_json::to_string(s),
            Spec::Subnet(s) => serde_json::to_string(s),
            Spec::SecurityGroup(s) => serde_json::to_string(s),
            Spec::NetworkAcl(s) => serde_json::to_string(s),
            Spec::Instance(s) => serde_json::to_string(s),
            Spec::Volume(s) => serde_json::to_string(s),
            Spec::TargetGroup(s) => serde_json::to_string(s),
            Spec::LoadBalancer(s) => serde_json::to_string(s),
        };
        v.unwrap_or_default()
    }
}

/// One resource of a manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub kind: Kind,
    pub name: String,
    pub spec: Spec,
    /// Extra tags (besides `Name` and `vpc:managed-by`).
    pub tags: BTreeMap<String, String>,
    pub loc: Loc,
}

/// A reference from a resource to another, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ref {
    /// `spec.vpc`, `spec.ingress[1].sourceGroup`, ...
    pub field: String,
    pub kind: Kind,
    pub name: String,
    /// Needed to create the resource (else converged once everything exists).
    pub hard: bool,
}

impl Resource {
    /// `Kind/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    /// A problem located at this resource.
    pub fn problem(&self, field: &str, msg: &str) -> Problem {
        problem(&self.loc, Some((self.kind, &self.name)), field, msg)
    }

    /// The names this resource refers to.
    pub fn refs(&self) -> Vec<Ref> {
        let r = |field: String, kind, name: &str, hard| Ref {
            field,
            kind,
            name: name.to_owned(),
            hard,
        };
        let mut out = Vec::new();
        match &self.spec {
            Spec::Vpc(_) | Spec::Volume(_) => {}
            Spec::Subnet(s) => out.push(r("spec.vpc".into(), Kind::Vpc, &s.vpc, true)),
            Spec::SecurityGroup(s) => {
                out.push(r("spec.vpc".into(), Kind::Vpc, &s.vpc, true));
                for (dir, rules) in [("ingress", Some(&s.ingress)), ("egress", s.egress.as_ref())] {
                    for (i, rule) in rules.into_iter().flatten().enumerate() {
                        if let Some(g) = &rule.source_group {
                            out.push(r(
                                format!("spec.{dir}[{i}].sourceGroup"),
                                Kind::SecurityGroup,
                                g,
                                false,
                            ));
                        }
                    }
                }
            }
            Spec::NetworkAcl(s) => {
                out.push(r("spec.vpc".into(), Kind::Vpc, &s.vpc, true));
                // Associations are converged once everything exists.
                for (i, n) in s.subnets.iter().enumerate() {
                    out.push(r(format!("spec.subnets[{i}]"), Kind::Subnet, n, false));
                }
            }
            Spec::Instance(s) => {
                out.push(r("spec.subnet".into(), Kind::Subnet, &s.subnet, true));
                for (i, g) in s.security_groups.iter().enumerate() {
                    out.push(r(
                        format!("spec.securityGroups[{i}]"),
                        Kind::SecurityGroup,
                        g,
                        true,
                    ));
                }
            }
            Spec::TargetGroup(s) => {
                out.push(r("spec.vpc".into(), Kind::Vpc, &s.vpc, true));
                for (i, t) in s.targets.iter().enumerate() {
                    out.push(r(
                        format!("spec.targets[{i}].instance"),
                        Kind::Instance,
                        &t.instance,
                        false,
                    ));
                }
            }
            Spec::LoadBalancer(s) => {
                out.push(r("spec.subnet".into(), Kind::Subnet, &s.subnet, true));
                for (i, l) in s.listeners.iter().enumerate() {
                    out.push(r(
                        format!("spec.listeners[{i}].targetGroup"),
                        Kind::TargetGroup,
                        &l.target_group,
                        true,
                    ));
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Parsing.

/// The JSON values of a file's resources: a YAML stream (`---`), a list, a single object;
/// JSON by extension or when the text is JSON. Empty documents are skipped.
pub fn documents(file: &str, text: &str) -> Result<Vec<Value>, Problem> {
    let trimmed = text.trim_start();
    let json_ext = file.to_ascii_lowercase().ends_with(".json");
    let mut docs = Vec::new();
    let json = if json_ext || trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => Some(v),
            Err(e) if json_ext => return Err(Problem(format!("{file}: not valid JSON: {e}"))),
            Err(_) => None,
        }
    } else {
        None
    };
    match json {
        Some(v) => docs.push(v),
        None => {
            for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let v = Value::deserialize(d).map_err(|e| {
                    Problem(format!("{file}: document {}: not valid YAML: {e}", i + 1))
                })?;
                docs.push(v);
            }
        }
    }
    let mut out = Vec::new();
    for d in docs {
        match d {
            Value::Null => {}
            Value::Array(items) => out.extend(items),
            other => out.push(other),
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    kind: Option<String>,
    name: Option<Value>,
    #[serde(default)]
    spec: Option<Value>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

fn spec_of<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// One resource from its JSON value.
pub fn resource(loc: Loc, v: Value) -> Result<Resource, Problem> {
    let raw: RawResource = serde_json::from_value(v).map_err(|e| {
        problem(
            &loc,
            None,
            "",
            &format!("{e} (fields: kind, name, spec, tags)"),
        )
    })?;
    let kind_text = raw
        .kind
        .ok_or_else(|| problem(&loc, None, "kind", "required"))?;
    let kind = Kind::parse(&kind_text).ok_or_else(|| {
        let all = Kind::ALL.map(Kind::title).join(", ");
        problem(
            &loc,
            None,
            "kind",
            &format!("unknown kind {kind_text:?} (one of {all})"),
        )
    })?;
    let name = match raw.name {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(problem(&loc, None, "name", "must be a non-empty string")),
        None => return Err(problem(&loc, None, "name", &format!("required ({kind})"))),
    };
    let here = |field: &str, msg: &str| problem(&loc, Some((kind, &name)), field, msg);
    let spec_v = raw.spec.unwrap_or(Value::Object(Default::default()));
    let spec = match kind {
        Kind::Vpc => spec_of(spec_v).map(Spec::Vpc),
        Kind::Subnet => spec_of(spec_v).map(Spec::Subnet),
        Kind::SecurityGroup => spec_of(spec_v).map(Spec::SecurityGroup),
        Kind::NetworkAcl => spec_of(spec_v).map(Spec::NetworkAcl),
        Kind::Instance => spec_of(spec_v).map(Spec::Instance),
        Kind::Volume => spec_of(spec_v).map(Spec::Volume),
        Kind::TargetGroup => spec_of(spec_v).map(Spec::TargetGroup),
        Kind::LoadBalancer => spec_of(spec_v).map(Spec::LoadBalancer),
    }
    .map_err(|e| here("spec", &e))?;
    for k in raw.tags.keys() {
        if k == "Name" || k == super::MANAGED_BY {
            return Err(here(
                &format!("tags.{k}"),
                "set by apply (Name is the resource's name)",
            ));
        }
    }
    let r = Resource {
        kind,
        name,
        spec,
        tags: raw.tags,
        loc,
    };
    check_values(&r)?;
    Ok(r)
}

/// Parses a whole file.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<Resource>, Vec<Problem>> {
    let docs = documents(file, text).map_err(|p| vec![p])?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, v) in docs.into_iter().enumerate() {
        let loc = Loc {
            file: file.to_owned(),
            index: i + 1,
        };
        match resource(loc, v) {
            Ok(r) => out.push(r),
            Err(p) => problems.push(p),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// `a.b.c.d/n` (the API checks host bits).
pub fn is_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.trim().split_once('/') else {
        return false;
    };
    ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

/// A rule's API protocol and ports.
pub fn rule_ports(rule: &RuleSpec) -> Result<(String, i32, i32), (String, String)> {
    proto_ports(&rule.protocol, rule.port.as_ref())
}

/// The API protocol and ports of a protocol and port spec (errors: field, message).
pub fn proto_ports(
    protocol: &str,
    port: Option<&PortSpec>,
) -> Result<(String, i32, i32), (String, String)> {
    let protocol = parse_protocol(protocol).map_err(|e| ("protocol".to_owned(), e))?;
    let port = match port {
        None => None,
        Some(PortSpec::Number(n)) => {
            Some(parse_port_range(&n.to_string()).map_err(|e| ("port".to_owned(), e))?)
        }
        Some(PortSpec::Text(t)) => Some(parse_port_range(t).map_err(|e| ("port".to_owned(), e))?),
    };
    let (from, mut to) = api_ports(&protocol, port).map_err(|e| ("port".to_owned(), e))?;
    if protocol == "icmp" && from != -1 {
        // The API matches the ICMP type only and shows the code as -1.
        to = -1;
    }
    Ok((protocol, from, to))
}

/// Values checked without the API.
fn check_values(r: &Resource) -> Result<(), Problem> {
    let cidr = |field: &str, v: &str| {
        if is_cidr(v) {
            Ok(())
        } else {
            Err(r.problem(field, &format!("{v:?} is not an IPv4 CIDR (a.b.c.d/n)")))
        }
    };
    let lb_protocol = |field: &str, v: &str| match v.to_ascii_uppercase().as_str() {
        "TCP" | "UDP" => Ok(()),
        _ => Err(r.problem(field, &format!("{v:?}: expected TCP or UDP"))),
    };
    match &r.spec {
        Spec::Vpc(s) => cidr("spec.cidrBlock", &s.cidr_block)?,
        Spec::Subnet(s) => cidr("spec.cidrBlock", &s.cidr_block)?,
        Spec::SecurityGroup(s) => {
            for (dir, rules) in [("ingress", Some(&s.ingress)), ("egress", s.egress.as_ref())] {
                let mut seen = Vec::new();
                for (i, rule) in rules.into_iter().flatten().enumerate() {
                    let at = format!("spec.{dir}[{i}]");
                    let ports =
                        rule_ports(rule).map_err(|(f, e)| r.problem(&format!("{at}.{f}"), &e))?;
                    match (&rule.cidr, &rule.source_group) {
                        (Some(c), None) => cidr(&format!("{at}.cidr"), c)?,
                        (None, Some(_)) => {}
                        _ => {
                            return Err(r.problem(&at, "exactly one of cidr and sourceGroup"));
                        }
                    }
                    let key = (ports, rule.cidr.clone(), rule.source_group.clone());
                    if let Some(j) = seen.iter().position(|k| *k == key) {
                        return Err(r.problem(&at, &format!("the same rule as {dir}[{j}]")));
                    }
                    seen.push(key);
                }
            }
        }
        Spec::NetworkAcl(s) => {
            let mut seen = Vec::new();
            for (i, n) in s.subnets.iter().enumerate() {
                if seen.contains(&n) {
                    return Err(r.problem(
                        &format!("spec.subnets[{i}]"),
                        &format!("subnet {n:?} is listed twice"),
                    ));
                }
                seen.push(n);
            }
            for (dir, entries) in [("inbound", &s.inbound), ("outbound", &s.outbound)] {
                let mut numbers: Vec<i64> = Vec::new();
                for (i, e) in entries.iter().enumerate() {
                    let at = format!("spec.{dir}[{i}]");
                    if !(1..=MAX_ACL_RULE).contains(&e.rule) {
                        return Err(r.problem(
                            &format!("{at}.rule"),
                            &format!("{}: expected a rule number 1-{MAX_ACL_RULE}", e.rule),
                        ));
                    }
                    if let Some(j) = numbers.iter().position(|n| *n == e.rule) {
                        return Err(r.problem(
                            &format!("{at}.rule"),
                            &format!("rule {} is also {dir}[{j}]", e.rule),
                        ));
                    }
                    numbers.push(e.rule);
                    proto_ports(&e.protocol, e.port.as_ref())
                        .map_err(|(f, m)| r.problem(&format!("{at}.{f}"), &m))?;
                    cidr(&format!("{at}.cidr"), &e.cidr)?;
                    if acl_action(&e.action).is_none() {
                        return Err(r.problem(
                            &format!("{at}.action"),
                            &format!("{:?}: expected allow or deny", e.action),
                        ));
                    }
                }
            }
        }
        Spec::Instance(s) => {
            if let Some(ip) = &s.private_ip
                && ip.parse::<std::net::Ipv4Addr>().is_err()
            {
                return Err(r.problem("spec.privateIp", &format!("{ip:?} is not an IPv4 address")));
            }
        }
        Spec::Volume(s) => {
            if s.size_gib.is_none() && s.snapshot.is_none() {
                return Err(r.problem("spec.sizeGib", "required (or spec.snapshot)"));
            }
        }
        Spec::TargetGroup(s) => {
            lb_protocol("spec.protocol", &s.protocol)?;
            if s.port == 0 {
                return Err(r.problem("spec.port", "0 is not a port (1-65535)"));
            }
            let mut seen = Vec::new();
            for (i, t) in s.targets.iter().enumerate() {
                let key = (&t.instance, t.port.unwrap_or(s.port));
                if seen.contains(&key) {
                    return Err(r.problem(&format!("spec.targets[{i}]"), "a duplicate target"));
                }
                seen.push(key);
            }
        }
        Spec::LoadBalancer(s) => {
            let mut seen = Vec::new();
            for (i, l) in s.listeners.iter().enumerate() {
                lb_protocol(&format!("spec.listeners[{i}].protocol"), &l.protocol)?;
                let key = (l.protocol.to_ascii_uppercase(), l.port);
                if seen.contains(&key) {
                    return Err(r.problem(
                        &format!("spec.listeners[{i}]"),
                        &format!("a second {} listener on port {}", key.0, key.1),
                    ));
                }
                seen.push(key);
            }
        }
    }
    Ok(())
}

/// `allow` or `deny` (any case), as the API spells it.
pub fn acl_action(s: &str) -> Option<&'static str> {
    match s.trim().to_ascii_lowercase().as_str() {
        "allow" => Some("allow"),
        "deny" => Some("deny"),
        _ => None,
    }
}

/// Duplicate kind/name pairs across the files, and subnets two network ACLs claim.
pub fn check_duplicates(all: &[Resource]) -> Vec<Problem> {
    let mut out = check_names(all);
    let mut claimed: BTreeMap<&str, &Resource> = BTreeMap::new();
    for r in all {
        let Spec::NetworkAcl(s) = &r.spec else {
            continue;
        };
        for (i, n) in s.subnets.iter().enumerate() {
            match claimed.get(n.as_str()) {
                Some(first) if first.name != r.name => out.push(r.problem(
                    &format!("spec.subnets[{i}]"),
                    &format!(
                        "subnet {n:?} is also associated with {} ({}: document {}); a subnet \
                         has one network ACL",
                        first.id(),
                        first.loc.file,
                        first.loc.index
                    ),
                )),
                Some(_) => {}
                None => {
                    claimed.insert(n.as_str(), r);
                }
            }
        }
    }
    out
}

/// Duplicate kind/name pairs across the files.
fn check_names(all: &[Resource]) -> Vec<Problem> {
    let mut seen: BTreeMap<(Kind, &str), &Loc> = BTreeMap::new();
    let mut out = Vec::new();
    for r in all {
        if let Some(first) = seen.get(&(r.kind, r.name.as_str())) {
            out.push(r.problem(
                "name",
                &format!(
                    "duplicate: {} is also {}: document {}",
                    r.id(),
                    first.file,
                    first.index
                ),
            ));
        } else {
            seen.insert((r.kind, r.name.as_str()), &r.loc);
        }
    }
    out
}

/// Resources in creation order: by rank, then as the files list them.
pub fn creation_order(all: &[Resource]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    idx.sort_by_key(|&i| all[i].kind.rank());
    idx
}
