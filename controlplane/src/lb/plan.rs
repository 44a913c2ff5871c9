//! Validation and resolution of the load balancers of a desired-state document: VIPs
//! allocated, targets resolved to addresses and hosts, table sizes chosen, and the
//! health-check nodes (one address per host and load-balancer subnet, as an AWS NLB has one
//! node per zone) placed. Pure and deterministic: every host computes the same plan from
//! the same document.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use ipnetwork::Ipv4Network;

use super::{
    maglev::{DEFAULT_TABLE_SIZE, MIN_SLOTS_PER_BACKEND, is_prime, next_prime},
    model::{HealthCheck, HealthCheckProtocol, LbProtocol},
};
use crate::overlay::{
    model::{gateway, is_reserved},
    statefile::{EndpointDoc, StateFile},
};

/// The table size of a listener over `targets` targets when the load balancer sets none:
/// the default, or the smallest prime giving every target `MIN_SLOTS_PER_BACKEND` slots.
pub fn default_table_size(targets: usize) -> u32 {
    let needed = u32::try_from(targets)
        .unwrap_or(u32::MAX)
        .saturating_mul(MIN_SLOTS_PER_BACKEND);
    DEFAULT_TABLE_SIZE.max(next_prime(needed))
}

/// Why the load balancers of a document are invalid. Each names the object and field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LbError {
    /// Two objects of one kind share an id.
    #[error("duplicate {kind} id {id:?}")]
    DuplicateId {
        /// `load balancer` or `target group`.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// A reference names nothing.
    #[error("{object}: {field} {value:?} does not exist")]
    Unknown {
        /// The referring object.
        object: String,
        /// Its field.
        field: &'static str,
        /// The reference.
        value: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{object}: {field} = {value}: {reason}")]
    Invalid {
        /// The object.
        object: String,
        /// Its field.
        field: &'static str,
        /// The value as written.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// A quota is exceeded.
    #[error("{object}: {what} {count} exceeds the limit of {limit}")]
    Quota {
        /// The object.
        object: String,
        /// What is counted.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A subnet has no address left for a VIP or health-check node.
    #[error("subnet {subnet}: no free address left for {purpose}")]
    SubnetFull {
        /// The subnet.
        subnet: String,
        /// What needed the address.
        purpose: String,
    },
}

/// A listener, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedListener {
    /// Load balancer id.
    pub lb: String,
    /// Its subnet.
    pub subnet: String,
    /// VNI of its VPC.
    pub vni: u32,
    /// The VIP.
    pub vip: Ipv4Addr,
    /// Protocol.
    pub protocol: LbProtocol,
    /// Port.
    pub port: u16,
    /// Target group id.
    pub target_group: String,
    /// Maglev table size.
    pub table_size: u32,
}

impl PlannedListener {
    /// `lb-web:tcp/80`.
    pub fn name(&self) -> String {
        format!("{}:{}/{}", self.lb, self.protocol.name(), self.port)
    }
}

/// A target, resolved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedTarget {
    /// Endpoint id.
    pub endpoint: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Traffic port.
    pub port: u16,
    /// Weight.
    pub weight: u32,
}

/// A target group, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedGroup {
    /// Id.
    pub id: String,
    /// VNI of its VPC.
    pub vni: u32,
    /// Protocol.
    pub protocol: LbProtocol,
    /// Health checks (validated).
    pub health: HealthCheck,
    /// Deregistration delay.
    pub deregistration_delay: Duration,
    /// Registered targets, sorted.
    pub targets: Vec<PlannedTarget>,
    /// Whether a listener forwards to it (targets of unused groups are `unused`).
    pub used: bool,
}

/// A health-check node: the address a host's health checks come from, in one
/// load-balancer subnet. The agent of `host` gives it a port (a veth into a namespace of
/// its own); every host knows it as an endpoint, so targets' replies find their way back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeNode {
    /// Endpoint id (`lbnode-<host>-<subnet>`).
    pub endpoint: String,
    /// Subnet.
    pub subnet: String,
    /// VNI of the subnet's VPC.
    pub vni: u32,
    /// Host.
    pub host: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// Subnet prefix length.
    pub prefix: u8,
    /// Subnet gateway.
    pub gateway: Ipv4Addr,
    /// MAC.
    pub mac: [u8; 6],
    /// Host-side veth name on its host.
    pub ifname: String,
}

impl ProbeNode {
    /// The node as an endpoint of the document (VPC default security group).
    pub fn endpoint_doc(&self) -> EndpointDoc {
        let m = self.mac;
        EndpointDoc {
            id: self.endpoint.clone(),
            subnet: self.subnet.clone(),
            host: self.host.clone(),
            ip: self.ip,
            mac: format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
            ifname: Some(self.ifname.clone()),
            security_groups: Vec::new(),
        }
    }
}

/// The load balancers of a document, resolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LbPlan {
    /// Every listener.
    pub listeners: Vec<PlannedListener>,
    /// Target groups by id.
    pub groups: BTreeMap<String, PlannedGroup>,
    /// Load balancer id -> (VNI, VIP).
    pub vips: BTreeMap<String, (u32, Ipv4Addr)>,
    /// Health-check nodes (every host, every load-balancer subnet).
    pub probe_nodes: Vec<ProbeNode>,
}

impl LbPlan {
    /// VNIs of the VPCs with load balancers.
    pub fn vnis(&self) -> BTreeSet<u32> {
        self.vips.values().map(|(vni, _)| *vni).collect()
    }
}

/// 32-bit FNV-1a: stable names for interfaces and MACs.
fn fnv(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

fn invalid(object: &str, field: &'static str, value: impl ToString, reason: &str) -> LbError {
    LbError::Invalid {
        object: object.to_owned(),
        field,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

fn unknown(object: &str, field: &'static str, value: &str) -> LbError {
    LbError::Unknown {
        object: object.to_owned(),
        field,
        value: value.to_owned(),
    }
}

/// Checks a target group's health-check settings.
fn check_health(tg: &str, h: &HealthCheck, min_interval_ms: u32) -> Result<(), LbError> {
    let min = f64::from(min_interval_ms) / 1000.0;
    let object = format!("target group {tg}");
    if !(h.interval >= min && h.interval <= 300.0) {
        return Err(invalid(
            &object,
            "health_check.interval",
            h.interval,
            &format!("expected {min}..=300 seconds"),
        ));
    }
    if let Some(t) = h.timeout
        && !(t > 0.0 && t <= 120.0 && t <= h.interval)
    {
        return Err(invalid(
            &object,
            "health_check.timeout",
            t,
            "expected more than 0, at most 120 seconds and at most the interval",
        ));
    }
    for (field, v) in [
        ("health_check.healthy_threshold", h.healthy_threshold),
        ("health_check.unhealthy_threshold", h.unhealthy_threshold),
    ] {
        if !(2..=10).contains(&v) {
            return Err(invalid(&object, field, v, "expected 2..=10"));
        }
    }
    if h.port == Some(0) {
        return Err(invalid(
            &object,
            "health_check.port",
            0,
            "expected 1..=65535",
        ));
    }
    if h.protocol == HealthCheckProtocol::Http && !h.path.starts_with('/') {
        return Err(invalid(
            &object,
            "health_check.path",
            &h.path,
            "expected a path starting with /",
        ));
    }
    Ok(())
}

/// Allocates addresses from the top of a subnet, skipping reserved and used ones.
struct Allocator<'a> {
    used: &'a mut BTreeSet<(u32, Ipv4Addr)>,
}

impl Allocator<'_> {
    fn take(
        &mut self,
        vni: u32,
        subnet_id: &str,
        cidr: Ipv4Network,
        purpose: String,
    ) -> Result<Ipv4Addr, LbError> {
        let base = u32::from(cidr.network());
        let top = u32::from(cidr.broadcast());
        for a in (base..top).rev() {
            let ip = Ipv4Addr::from(a);
            if is_reserved(cidr, ip) || self.used.contains(&(vni, ip)) {
                continue;
            }
            self.used.insert((vni, ip));
            return Ok(ip);
        }
        Err(LbError::SubnetFull {
            subnet: subnet_id.to_owned(),
            purpose,
        })
    }
}

/// Validates and resolves the load balancers and target groups of `doc`.
pub fn plan(doc: &StateFile) -> Result<LbPlan, LbError> {
    let limits = &doc.lb_limits;
    let vpcs: HashMap<&str, u32> = doc.vpcs.iter().map(|v| (v.id.as_str(), v.vni)).collect();
    let subnets: HashMap<&str, (&str, Ipv4Network)> = doc
        .subnets
        .iter()
        .map(|s| (s.id.as_str(), (s.vpc.as_str(), s.cidr)))
        .collect();
    let endpoints: HashMap<&str, &EndpointDoc> =
        doc.endpoints.iter().map(|e| (e.id.as_str(), e)).collect();
    let vpc_of_subnet = |s: &str| subnets.get(s).map(|(v, _)| *v);
    let mut used: BTreeSet<(u32, Ipv4Addr)> = BTreeSet::new();
    for e in &doc.endpoints {
        if let Some(vni) = vpc_of_subnet(&e.subnet).and_then(|v| vpcs.get(v)) {
            used.insert((*vni, e.ip));
        }
    }

    // Target groups.
    let mut groups = BTreeMap::new();
    for tg in &doc.target_groups {
        let object = format!("target group {}", tg.id);
        let vni = *vpcs
            .get(tg.vpc.as_str())
            .ok_or_else(|| unknown(&object, "vpc", &tg.vpc))?;
        if tg.port == 0 {
            return Err(invalid(&object, "port", 0, "expected 1..=65535"));
        }
        check_health(
            &tg.id,
            &tg.health_check,
            limits.min_health_check_interval_ms,
        )?;
        if tg.deregistration_delay > 3600 {
            return Err(invalid(
                &object,
                "deregistration_delay",
                tg.deregistration_delay,
                "expected 0..=3600 seconds",
            ));
        }
        if tg.targets.len() > limits.targets_per_group {
            return Err(LbError::Quota {
                object,
                what: "targets",
                count: tg.targets.len(),
                limit: limits.targets_per_group,
            });
        }
        let mut targets = Vec::with_capacity(tg.targets.len());
        let mut seen = BTreeSet::new();
        for t in &tg.targets {
            let e = endpoints
                .get(t.id.as_str())
                .ok_or_else(|| unknown(&object, "targets[].id", &t.id))?;
            if vpc_of_subnet(&e.subnet) != Some(tg.vpc.as_str()) {
                return Err(invalid(
                    &object,
                    "targets[].id",
                    &t.id,
                    &format!("the instance is not in {}", tg.vpc),
                ));
            }
            let port = t.port.unwrap_or(tg.port);
            if port == 0 {
                return Err(invalid(&object, "targets[].port", 0, "expected 1..=65535"));
            }
            let weight = t.weight.unwrap_or(1);
            if !(1..=100).contains(&weight) {
                return Err(invalid(
                    &object,
                    "targets[].weight",
                    weight,
                    "expected 1..=100",
                ));
            }
            if !seen.insert((e.ip, port)) {
                return Err(invalid(
                    &object,
                    "targets",
                    format!("{}:{port}", t.id),
                    "registered twice",
                ));
            }
            targets.push(PlannedTarget {
                endpoint: t.id.clone(),
                ip: e.ip,
                port,
                weight,
            });
        }
        targets.sort();
        let g = PlannedGroup {
            id: tg.id.clone(),
            vni,
            protocol: tg.protocol,
            health: tg.health_check.clone(),
            deregistration_delay: Duration::from_secs(u64::from(tg.deregistration_delay)),
            targets,
            used: false,
        };
        if groups.insert(tg.id.clone(), g).is_some() {
            return Err(LbError::DuplicateId {
                kind: "target group",
                id: tg.id.clone(),
            });
        }
    }

    // Load balancers: explicit VIPs first, so allocation never takes one.
    let mut lbs: Vec<_> = doc.load_balancers.iter().collect();
    lbs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut ids = BTreeSet::new();
    let mut vip_of: BTreeMap<String, (u32, Ipv4Addr)> = BTreeMap::new();
    for lb in &lbs {
        let object = format!("load balancer {}", lb.id);
        if !ids.insert(lb.id.as_str()) {
            return Err(LbError::DuplicateId {
                kind: "load balancer",
                id: lb.id.clone(),
            });
        }
        let (vpc, cidr) = *subnets
            .get(lb.subnet.as_str())
            .ok_or_else(|| unknown(&object, "subnet", &lb.subnet))?;
        let vni = vpcs[vpc];
        if let Some(vip) = lb.vip {
            if !cidr.contains(vip) || is_reserved(cidr, vip) {
                return Err(invalid(
                    &object,
                    "vip",
                    vip,
                    &format!("expected a usable address of {} ({cidr})", lb.subnet),
                ));
            }
            if !used.insert((vni, vip)) {
                return Err(invalid(&object, "vip", vip, "the address is in use"));
            }
            vip_of.insert(lb.id.clone(), (vni, vip));
        }
    }
    let mut alloc = Allocator { used: &mut used };
    for lb in &lbs {
        if lb.vip.is_none() {
            let (vpc, cidr) = subnets[lb.subnet.as_str()];
            let vni = vpcs[vpc];
            let vip = alloc.take(vni, &lb.subnet, cidr, format!("the VIP of {}", lb.id))?;
            vip_of.insert(lb.id.clone(), (vni, vip));
        }
    }

    let mut listeners = Vec::new();
    for lb in &lbs {
        let object = format!("load balancer {}", lb.id);
        let (vni, vip) = vip_of[&lb.id];
        let lb_vpc = subnets[lb.subnet.as_str()].0;
        if lb.listeners.len() > limits.listeners_per_lb {
            return Err(LbError::Quota {
                object,
                what: "listeners",
                count: lb.listeners.len(),
                limit: limits.listeners_per_lb,
            });
        }
        let mut seen = BTreeSet::new();
        for l in &lb.listeners {
            if l.port == 0 {
                return Err(invalid(
                    &object,
                    "listeners[].port",
                    0,
                    "expected 1..=65535",
                ));
            }
            if !seen.insert((l.protocol, l.port)) {
                return Err(invalid(
                    &object,
                    "listeners",
                    format!("{}/{}", l.protocol.name(), l.port),
                    "two listeners on one protocol and port",
                ));
            }
            let g = groups
                .get_mut(&l.target_group)
                .ok_or_else(|| unknown(&object, "listeners[].target_group", &l.target_group))?;
            if g.vni != vni {
                return Err(invalid(
                    &object,
                    "listeners[].target_group",
                    &l.target_group,
                    &format!("the target group is not in {lb_vpc}"),
                ));
            }
            if g.protocol != l.protocol {
                return Err(invalid(
                    &object,
                    "listeners[].protocol",
                    l.protocol.name(),
                    &format!("target group {} is {}", g.id, g.protocol.name()),
                ));
            }
            g.used = true;
            let needed = (g.targets.len() as u32).saturating_mul(MIN_SLOTS_PER_BACKEND);
            let table_size = match lb.table_size {
                Some(n) => {
                    if !is_prime(n) {
                        return Err(invalid(
                            &object,
                            "table_size",
                            n,
                            &format!("expected a prime (e.g. {})", next_prime(n)),
                        ));
                    }
                    if n < needed {
                        return Err(invalid(
                            &object,
                            "table_size",
                            n,
                            &format!(
                                "expected at least {MIN_SLOTS_PER_BACKEND} slots per target \
                                 ({} targets in {}: {})",
                                g.targets.len(),
                                g.id,
                                next_prime(needed)
                            ),
                        ));
                    }
                    n
                }
                None => default_table_size(g.targets.len()),
            };
            listeners.push(PlannedListener {
                lb: lb.id.clone(),
                subnet: lb.subnet.clone(),
                vni,
                vip,
                protocol: l.protocol,
                port: l.port,
                target_group: l.target_group.clone(),
                table_size,
            });
        }
    }

    // Health-check nodes: every host, in every subnet holding a load balancer.
    let lb_subnets: BTreeSet<&str> = lbs.iter().map(|lb| lb.subnet.as_str()).collect();
    let mut hosts: Vec<&str> = doc.hosts.iter().map(|h| h.id.as_str()).collect();
    hosts.sort_unstable();
    let mut probe_nodes = Vec::new();
    for subnet in lb_subnets {
        let (vpc, cidr) = subnets[subnet];
        let vni = vpcs[vpc];
        for host in &hosts {
            let ip = alloc.take(
                vni,
                subnet,
                cidr,
                format!("the health-check node of host {host}"),
            )?;
            let h = fnv(&[host, subnet]).to_be_bytes();
            probe_nodes.push(ProbeNode {
                endpoint: format!("lbnode-{host}-{subnet}"),
                subnet: subnet.to_owned(),
                vni,
                host: (*host).to_owned(),
                ip,
                prefix: cidr.prefix(),
                gateway: gateway(cidr),
                mac: [0x02, 0x6c, h[0], h[1], h[2], h[3]],
                ifname: format!("lbn{:08x}", fnv(&[subnet])),
            });
        }
    }

    Ok(LbPlan {
        listeners,
        groups,
        vips: vip_of,
        probe_nodes,
    })
}
