//! AWS examples, validation, serde, entry round trips, and a property test of the compiled
//! tables (through an LPM simulation and the datapath's own verdict functions) against a
//! naive evaluator of the rules.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use dataplane_common::{
    conntrack::{CtConfig, CtEntry, CtKey},
    filter::ipv4_mapped,
    policy::{
        ACL_ALLOW, ACL_DENY, AclVerdict, EGRESS, INGRESS, PolicyAddrKey, PolicyPortKey,
        PolicyTables, acl_allows, sg_allows, sg_rule,
    },
};
use ipnetwork::Ipv4Network;

use super::{
    classes::FxMap,
    compile::{Kind, RuleProblem},
    model::{AclAction, AclRule, NetworkAcl, PolicyLimits, Protocol, SecurityGroup, SgRule},
    tables::{IMPLICIT_DENY_RULE, PortMatch},
    *,
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const GRE: u8 = 47;

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ports(p: Protocol, range: Option<(u16, u16)>) -> (Protocol, Option<u16>, Option<u16>) {
    (p, range.map(|r| r.0), range.map(|r| r.1))
}

/// A security-group rule for a CIDR.
fn sg_cidr(p: Protocol, range: Option<(u16, u16)>, cidr: &str) -> SgRule {
    let (protocol, from_port, to_port) = ports(p, range);
    SgRule {
        protocol,
        from_port,
        to_port,
        cidr: Some(net(cidr)),
        group: None,
    }
}

/// A security-group rule for a group's members.
fn sg_group(p: Protocol, range: Option<(u16, u16)>, group: &str) -> SgRule {
    let (protocol, from_port, to_port) = ports(p, range);
    SgRule {
        protocol,
        from_port,
        to_port,
        cidr: None,
        group: Some(group.into()),
    }
}

fn group(id: &str, vpc: &str, inbound: Vec<SgRule>, outbound: Vec<SgRule>) -> SecurityGroup {
    SecurityGroup {
        id: id.into(),
        vpc: vpc.into(),
        default: false,
        inbound,
        outbound,
    }
}

fn acl_rule(
    rule: u16,
    p: Protocol,
    range: Option<(u16, u16)>,
    cidr: &str,
    action: AclAction,
) -> AclRule {
    let (protocol, from_port, to_port) = ports(p, range);
    AclRule {
        rule,
        protocol,
        from_port,
        to_port,
        cidr: net(cidr),
        action,
    }
}

fn acl(id: &str, vpc: &str, inbound: Vec<AclRule>, outbound: Vec<AclRule>) -> NetworkAcl {
    NetworkAcl {
        id: id.into(),
        vpc: vpc.into(),
        default: false,
        inbound,
        outbound,
    }
}

fn endpoint(id: &str, subnet: &str, addr: &str, groups: &[&str], local: bool) -> EndpointRef {
    EndpointRef {
        id: id.into(),
        vpc: "vpc-1".into(),
        subnet: subnet.into(),
        ip: ip(addr),
        security_groups: groups.iter().map(|g| g.to_string()).collect(),
        local,
    }
}

/// Owned input.
#[derive(Clone, Debug)]
struct World {
    vpcs: Vec<String>,
    subnets: Vec<SubnetRef>,
    endpoints: Vec<EndpointRef>,
    groups: Vec<SecurityGroup>,
    acls: Vec<NetworkAcl>,
    limits: PolicyLimits,
}

impl World {
    /// vpc-1 with subnet-1 (10.0.1.0/24), nothing else.
    fn new() -> World {
        World {
            vpcs: vec!["vpc-1".into()],
            subnets: vec![SubnetRef {
                id: "subnet-1".into(),
                vpc: "vpc-1".into(),
                cidr: net("10.0.1.0/24"),
                network_acl: None,
            }],
            endpoints: Vec::new(),
            groups: Vec::new(),
            acls: Vec::new(),
            limits: PolicyLimits::default(),
        }
    }

    fn input(&self) -> PolicyInput<'_> {
        PolicyInput {
            vpcs: &self.vpcs,
            subnets: &self.subnets,
            endpoints: &self.endpoints,
            security_groups: &self.groups,
            network_acls: &self.acls,
            limits: &self.limits,
        }
    }

    fn compile(&self) -> Result<CompiledPolicy, PolicyError> {
        compile(&self.input())
    }
}

// ---------------------------------------------------------------------------------------
// The datapath, simulated: LPM tries over the entries, the real verdict functions.

/// The entries of one prefix length: (head, masked tail) -> value.
type Level<V> = FxMap<(u32, u128), V>;

/// An LPM trie: longest stored prefix of the key's bits. Keys are a head of 32 bits that
/// every prefix covers (the scope or class) and up to 128 more bits, most significant first.
#[derive(Debug)]
struct Lpm<V> {
    /// (prefix length, entries), longest first.
    by_len: Vec<(u32, Level<V>)>,
}

fn mask_tail(tail: u128, len: u32) -> u128 {
    tail & u128::MAX.checked_shl(128 - (len - 32)).unwrap_or(0)
}

impl<V> Lpm<V> {
    fn new() -> Self {
        Lpm { by_len: Vec::new() }
    }

    fn insert(&mut self, len: u32, (head, tail): (u32, u128), v: V) {
        assert!((32..=160).contains(&len));
        assert_eq!(
            mask_tail(tail, len),
            tail,
            "entry with bits beyond its prefix"
        );
        let i = match self.by_len.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.by_len[i].0 == len => i,
            Some(i) => {
                self.by_len.insert(i, (len, FxMap::default()));
                i
            }
            None => {
                self.by_len.push((len, FxMap::default()));
                self.by_len.len() - 1
            }
        };
        let prev = self.by_len[i].1.insert((head, tail), v);
        assert!(prev.is_none(), "duplicate entry /{len} {head:x} {tail:x}");
    }

    fn lookup(&self, (head, tail): (u32, u128)) -> Option<&V> {
        self.by_len
            .iter()
            .find_map(|(len, m)| m.get(&(head, mask_tail(tail, *len))))
    }

    fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }
}

fn addr_bits(k: &PolicyAddrKey) -> (u32, u128) {
    (u32::from_be_bytes(k.scope_be), u128::from_be_bytes(k.addr))
}

fn port_bits(k: &PolicyPortKey) -> (u32, u128) {
    let tail = [k.proto, k.port_be[0], k.port_be[1], k._pad];
    (
        u32::from_be_bytes(k.class_be),
        u128::from(u32::from_be_bytes(tail)) << 96,
    )
}

/// The policy maps of one host.
#[derive(Debug)]
struct Sim {
    sg_addr: Lpm<u32>,
    sg_port: Lpm<u32>,
    acl_addr: Lpm<u32>,
    acl_port: Lpm<AclVerdict>,
}

/// No conntrack in these tests.
#[derive(Debug)]
struct NoCt;

impl dataplane_common::policy::CtSlot for NoCt {
    fn get(&self) -> CtEntry {
        CtEntry::default()
    }
    fn set(&self, _: &CtEntry) {}
    fn count(&self, _: u32) {}
}

impl PolicyTables for Sim {
    type Slot = NoCt;
    fn sg_class(&self, key: &PolicyAddrKey) -> Option<u32> {
        self.sg_addr.lookup(addr_bits(key)).copied()
    }
    fn sg_port(&self, key: &PolicyPortKey) -> Option<u32> {
        self.sg_port.lookup(port_bits(key)).copied()
    }
    fn acl_class(&self, key: &PolicyAddrKey) -> Option<u32> {
        self.acl_addr.lookup(addr_bits(key)).copied()
    }
    fn acl_port(&self, key: &PolicyPortKey) -> Option<AclVerdict> {
        self.acl_port.lookup(port_bits(key)).copied()
    }
    fn ct_get(&self, _: &CtKey) -> Option<NoCt> {
        None
    }
    fn ct_create(&self, _: &CtKey, _: &CtEntry) {}
    fn ct_config(&self) -> CtConfig {
        CtConfig::DEFAULT
    }
    fn ct_budget(&self, _: u32) -> Option<dataplane_common::conntrack::CtBudget> {
        None
    }
    fn ct_budget_charge(&self, _: u32) {}
}

/// A compiled policy installed on a host: ids assigned in key order from 1, every entry in
/// one set of tries (so ids must not interfere). Checks the entry round trip on the way.
#[derive(Debug)]
struct Host {
    sim: Sim,
    sg_ids: BTreeMap<SgSetKey, u32>,
    acl_ids: BTreeMap<String, u32>,
    compiled: CompiledPolicy,
}

impl Host {
    fn install(compiled: CompiledPolicy) -> Host {
        let mut sim = Sim {
            sg_addr: Lpm::new(),
            sg_port: Lpm::new(),
            acl_addr: Lpm::new(),
            acl_port: Lpm::new(),
        };
        let mut sg_ids = BTreeMap::new();
        for (i, (key, t)) in compiled.sg_sets.iter().enumerate() {
            let id = i as u32 + 1;
            let (addr, ports) = t.entries(id);
            assert_eq!(SgTables::from_entries(id, &addr, &ports).as_ref(), Some(t));
            for (len, k, class) in addr {
                sim.sg_addr.insert(len, addr_bits(&k), class);
            }
            for (len, k, r) in ports {
                sim.sg_port.insert(len, port_bits(&k), r);
            }
            sg_ids.insert(key.clone(), id);
        }
        let mut acl_ids = BTreeMap::new();
        for (i, (key, t)) in compiled.acls.iter().enumerate() {
            let id = i as u32 + 1;
            let (addr, ports) = t.entries(id);
            assert_eq!(AclTables::from_entries(id, &addr, &ports).as_ref(), Some(t));
            for (len, k, class) in addr {
                sim.acl_addr.insert(len, addr_bits(&k), class);
            }
            for (len, k, v) in ports {
                sim.acl_port.insert(len, port_bits(&k), v);
            }
            acl_ids.insert(key.clone(), id);
        }
        Host {
            sim,
            sg_ids,
            acl_ids,
            compiled,
        }
    }

    /// Whether the security groups of local endpoint `ep` admit the traffic.
    fn sg(&self, ep: &str, dir: u32, remote: Ipv4Addr, proto: u8, port: u16) -> bool {
        let set = &self.compiled.endpoints[ep].sg_set;
        let id = self.sg_ids[set];
        sg_allows(
            &self.sim,
            id,
            dir,
            &ipv4_mapped(remote.octets()),
            proto,
            port,
        )
    }

    /// The rule the datapath reports as having admitted the traffic (0: none), resolved
    /// through the policy's rule index.
    fn sg_decided(
        &self,
        ep: &str,
        dir: u32,
        remote: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> (u32, Option<&SgRuleInfo>) {
        let set = &self.compiled.endpoints[ep].sg_set;
        let r = sg_rule(
            &self.sim,
            self.sg_ids[set],
            dir,
            &ipv4_mapped(remote.octets()),
            proto,
            port,
        );
        (r, self.compiled.sg_rules[set].decided(r, remote))
    }

    /// The ACL verdict for local endpoint `ep`: `None` without an ACL, else (allow, rule);
    /// no match is the implicit deny.
    fn acl(
        &self,
        ep: &str,
        dir: u32,
        remote: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Option<(bool, u16)> {
        let name = self.compiled.endpoints[ep].acl.as_ref()?;
        let id = self.acl_ids[name];
        let addr = ipv4_mapped(remote.octets());
        let allowed = acl_allows(&self.sim, id, dir, &addr, proto, port);
        let verdict = self
            .sim
            .acl_class(&PolicyAddrKey::new(id, dir, addr))
            .and_then(|class| self.sim.acl_port(&PolicyPortKey::new(class, proto, port)));
        let v = match verdict {
            None => (false, IMPLICIT_DENY_RULE),
            Some(v) => {
                assert!(v.action == ACL_ALLOW || v.action == ACL_DENY);
                (v.action == ACL_ALLOW, v.rule as u16)
            }
        };
        assert_eq!(allowed, v.0);
        Some(v)
    }
}

// ---------------------------------------------------------------------------------------
// AWS examples.

/// The AWS docs' web server group: HTTP and HTTPS from anywhere, SSH from the office
/// network; the default outbound rule.
fn web_sg() -> SecurityGroup {
    group(
        "sg-web",
        "vpc-1",
        vec![
            sg_cidr(Protocol::TCP, Some((80, 80)), "0.0.0.0/0"),
            sg_cidr(Protocol::TCP, Some((443, 443)), "0.0.0.0/0"),
            sg_cidr(Protocol::TCP, Some((22, 22)), "203.0.113.0/24"),
        ],
        model::allow_all_outbound(),
    )
}

#[test]
fn web_server_group_tables() {
    let mut w = World::new();
    w.groups.push(web_sg());
    w.endpoints.push(endpoint(
        "i-web",
        "subnet-1",
        "10.0.1.10",
        &["sg-web"],
        true,
    ));
    let c = w.compile().unwrap();
    let key = vec!["sg-web".to_string()];
    assert_eq!(
        c.endpoints["i-web"],
        EndpointPolicy {
            sg_set: key.clone(),
            acl: None
        }
    );
    assert!(c.acls.is_empty());
    // Rule references, in canonical order (ports, then remote): inbound 22 (1), 80 (2),
    // 443 (3), outbound all (4). Classes in content order: everything by 4 < {tcp 22 by 1,
    // 80 by 2, 443 by 3} < {tcp 80, 443}.
    let tcp = |port| PortMatch {
        proto: Some(TCP),
        port,
        bits: 0,
    };
    let expected = SgTables {
        addr: BTreeMap::from([
            ((INGRESS, net("0.0.0.0/0")), 2),
            ((INGRESS, net("203.0.113.0/24")), 1),
            ((EGRESS, net("0.0.0.0/0")), 0),
        ]),
        ports: BTreeMap::from([
            ((0, PortMatch::ALL), 4),
            ((1, tcp(22)), 1),
            ((1, tcp(80)), 2),
            ((1, tcp(443)), 3),
            ((2, tcp(80)), 2),
            ((2, tcp(443)), 3),
        ]),
    };
    assert_eq!(c.sg_sets[&key], expected);
    let rules = &c.sg_rules[&key];
    assert_eq!(
        rules
            .rules()
            .iter()
            .map(SgRuleInfo::description)
            .collect::<Vec<_>>(),
        [
            "sg-web ingress tcp 22 from 203.0.113.0/24",
            "sg-web ingress tcp 80 from 0.0.0.0/0",
            "sg-web ingress tcp 443 from 0.0.0.0/0",
            "sg-web egress all to 0.0.0.0/0",
        ]
    );
    // Positions are the input's.
    assert_eq!(rules.rules()[0].position, 2);
    assert_eq!(
        rules.describe(3, ip("198.51.100.1")),
        "sg-web ingress tcp 443 from 0.0.0.0/0"
    );
    assert_eq!(rules.describe(0, ip("198.51.100.1")), "no rule");

    let h = Host::install(c);
    let office = ip("203.0.113.7");
    let internet = ip("198.51.100.1");
    assert!(h.sg("i-web", INGRESS, internet, TCP, 80));
    assert!(h.sg("i-web", INGRESS, internet, TCP, 443));
    assert!(!h.sg("i-web", INGRESS, internet, TCP, 22));
    assert!(h.sg("i-web", INGRESS, office, TCP, 22));
    assert!(h.sg("i-web", INGRESS, office, TCP, 80));
    assert!(!h.sg("i-web", INGRESS, office, UDP, 80));
    assert!(!h.sg("i-web", INGRESS, office, TCP, 8080));
    assert!(!h.sg("i-web", INGRESS, office, ICMP, 8));
    assert!(h.sg("i-web", EGRESS, internet, UDP, 53));
    assert!(h.sg("i-web", EGRESS, office, GRE, 0));
}

#[test]
fn group_referencing_another_group() {
    let mut w = World::new();
    w.groups.push(web_sg());
    w.groups.push(group(
        "sg-db",
        "vpc-1",
        vec![sg_group(Protocol::TCP, Some((5432, 5432)), "sg-web")],
        vec![],
    ));
    w.endpoints.extend([
        endpoint("i-web1", "subnet-1", "10.0.1.10", &["sg-web"], false),
        endpoint("i-web2", "subnet-1", "10.0.1.11", &["sg-web"], false),
        endpoint("i-other", "subnet-1", "10.0.1.12", &[], false),
        endpoint("i-db", "subnet-1", "10.0.1.20", &["sg-db"], true),
    ]);
    let c = w.compile().unwrap();
    // Only what the local endpoint needs.
    assert_eq!(c.sg_sets.len(), 1);
    let t = &c.sg_sets[&vec!["sg-db".to_string()]];
    assert_eq!(
        t.addr,
        BTreeMap::from([
            ((INGRESS, net("10.0.1.10/32")), 0),
            ((INGRESS, net("10.0.1.11/32")), 0),
        ])
    );
    assert_eq!(
        t.ports,
        BTreeMap::from([(
            (
                0,
                PortMatch {
                    proto: Some(TCP),
                    port: 5432,
                    bits: 0
                }
            ),
            1
        )])
    );
    let index = &c.sg_rules[&vec!["sg-db".to_string()]];
    assert_eq!(
        index
            .decided(1, ip("10.0.1.11"))
            .map(SgRuleInfo::description)
            .as_deref(),
        Some("sg-db ingress tcp 5432 from sg-web")
    );
    assert_eq!(index.decided(1, ip("10.0.1.12")), None, "not a member");
    assert_eq!(index.decided(0, ip("10.0.1.11")), None);
    assert_eq!(index.decided(2, ip("10.0.1.11")), None);
    let h = Host::install(c);
    assert!(h.sg("i-db", INGRESS, ip("10.0.1.10"), TCP, 5432));
    assert!(h.sg("i-db", INGRESS, ip("10.0.1.11"), TCP, 5432));
    assert!(!h.sg("i-db", INGRESS, ip("10.0.1.12"), TCP, 5432));
    assert!(!h.sg("i-db", INGRESS, ip("10.0.1.10"), TCP, 5433));
    // Explicitly empty outbound: nothing leaves.
    assert!(!h.sg("i-db", EGRESS, ip("10.0.1.10"), TCP, 80));
}

#[test]
fn two_groups_are_a_union() {
    let mut w = World::new();
    w.groups.push(web_sg());
    w.groups.push(group(
        "sg-admin",
        "vpc-1",
        vec![
            sg_cidr(Protocol::TCP, Some((22, 22)), "0.0.0.0/0"),
            sg_cidr(Protocol::ICMP, None, "10.0.0.0/8"),
        ],
        vec![],
    ));
    w.endpoints.push(endpoint(
        "i-1",
        "subnet-1",
        "10.0.1.10",
        &["sg-web", "sg-admin", "sg-web"],
        true,
    ));
    let c = w.compile().unwrap();
    let key = vec!["sg-admin".to_string(), "sg-web".to_string()];
    assert_eq!(c.endpoints["i-1"].sg_set, key);
    assert_eq!(c.sg_sets.keys().collect::<Vec<_>>(), [&key]);
    let h = Host::install(c);
    let any = ip("198.51.100.1");
    assert!(h.sg("i-1", INGRESS, any, TCP, 22));
    assert!(h.sg("i-1", INGRESS, any, TCP, 80));
    assert!(!h.sg("i-1", INGRESS, any, ICMP, 8));
    assert!(h.sg("i-1", INGRESS, ip("10.9.9.9"), ICMP, 8));
    assert!(h.sg("i-1", INGRESS, ip("10.9.9.9"), ICMP, 0));
    assert!(!h.sg("i-1", INGRESS, ip("10.9.9.9"), UDP, 8));
    // Outbound: sg-web's allow-all, sg-admin's nothing.
    assert!(h.sg("i-1", EGRESS, any, UDP, 123));
}

#[test]
fn implicit_default_group() {
    let mut w = World::new();
    w.groups.push(web_sg());
    w.endpoints.extend([
        endpoint("i-a", "subnet-1", "10.0.1.10", &[], true),
        endpoint("i-b", "subnet-1", "10.0.1.11", &[], false),
        endpoint("i-web", "subnet-1", "10.0.1.12", &["sg-web"], true),
    ]);
    let c = w.compile().unwrap();
    let key = vec!["vpc-1/default".to_string()];
    assert_eq!(c.endpoints["i-a"].sg_set, key);
    assert_eq!(c.sg_sets.len(), 2);
    assert_eq!(
        c.sg_sets[&key],
        SgTables {
            addr: BTreeMap::from([
                ((INGRESS, net("10.0.1.10/32")), 0),
                ((INGRESS, net("10.0.1.11/32")), 0),
                ((EGRESS, net("0.0.0.0/0")), 1),
            ]),
            // Inbound all from members (rule 1), outbound all (rule 2).
            ports: BTreeMap::from([((0, PortMatch::ALL), 1), ((1, PortMatch::ALL), 2)]),
        }
    );
    let h = Host::install(c);
    assert!(h.sg("i-a", INGRESS, ip("10.0.1.11"), UDP, 9));
    assert!(h.sg("i-a", INGRESS, ip("10.0.1.10"), TCP, 1));
    assert!(!h.sg("i-a", INGRESS, ip("10.0.1.12"), TCP, 80));
    assert!(h.sg("i-a", EGRESS, ip("192.0.2.1"), TCP, 80));
}

#[test]
fn explicit_default_group_and_references_to_it() {
    let mut w = World::new();
    let mut def = group(
        "sg-def",
        "vpc-1",
        vec![sg_cidr(Protocol::UDP, Some((53, 53)), "10.0.0.0/16")],
        vec![],
    );
    def.default = true;
    w.groups.push(def);
    w.groups.push(group(
        "sg-app",
        "vpc-1",
        vec![sg_group(Protocol::TCP, Some((8000, 8999)), "sg-def")],
        vec![],
    ));
    w.endpoints.extend([
        endpoint("i-a", "subnet-1", "10.0.1.10", &[], true),
        endpoint("i-b", "subnet-1", "10.0.1.11", &["sg-app"], true),
    ]);
    let c = w.compile().unwrap();
    assert_eq!(c.endpoints["i-a"].sg_set, vec!["sg-def".to_string()]);
    let h = Host::install(c);
    assert!(h.sg("i-a", INGRESS, ip("10.0.200.1"), UDP, 53));
    assert!(!h.sg("i-a", INGRESS, ip("10.0.200.1"), TCP, 53));
    assert!(!h.sg("i-a", EGRESS, ip("10.0.200.1"), TCP, 53));
    // i-a is a member of sg-def through the default.
    assert!(h.sg("i-b", INGRESS, ip("10.0.1.10"), TCP, 8080));
    assert!(!h.sg("i-b", INGRESS, ip("10.0.1.10"), TCP, 9000));
    assert!(!h.sg("i-b", INGRESS, ip("10.0.1.11"), TCP, 8080));
    // The implicit id is free when an explicit default exists.
    let mut w2 = w.clone();
    w2.groups[1].inbound[0].group = Some("vpc-1/default".into());
    assert!(matches!(
        w2.compile(),
        Err(PolicyError::UnknownRef { ref field, .. }) if field == "inbound[0].group"
    ));
}

#[test]
fn covered_prefixes_with_nothing_new_are_not_stored() {
    let mut w = World::new();
    w.groups.push(group(
        "sg-a",
        "vpc-1",
        vec![
            sg_cidr(Protocol::All, None, "0.0.0.0/0"),
            sg_group(Protocol::TCP, Some((22, 22)), "sg-a"),
            sg_cidr(Protocol::TCP, Some((0, 65535)), "10.0.0.0/8"),
            sg_cidr(Protocol::TCP, Some((1, 2)), "10.1.0.0/16"),
        ],
        vec![
            sg_cidr(Protocol::TCP, None, "10.0.0.0/8"),
            sg_cidr(Protocol::TCP, Some((100, 200)), "10.1.0.0/16"),
            sg_cidr(Protocol::UDP, Some((100, 200)), "10.1.0.0/16"),
            sg_cidr(Protocol::UDP, Some((201, 300)), "10.1.2.0/24"),
        ],
    ));
    w.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &["sg-a"], true));
    let c = w.compile().unwrap();
    let t = &c.sg_sets[&vec!["sg-a".to_string()]];
    let prefixes: Vec<_> = t.addr.keys().copied().collect();
    assert_eq!(
        prefixes,
        [
            (INGRESS, net("0.0.0.0/0")),
            (EGRESS, net("10.0.0.0/8")),
            (EGRESS, net("10.1.0.0/16")),
            (EGRESS, net("10.1.2.0/24")),
        ]
    );
    // The /24 holds the merged range 100-300 of UDP and everything of TCP.
    let n = t.addr[&(EGRESS, net("10.1.2.0/24"))];
    let class: Vec<PortMatch> = t
        .ports
        .keys()
        .filter(|(m, _)| *m == n)
        .map(|&(_, p)| p)
        .collect();
    // Two rules, two references: 100-200 and 201-300 are separate blocks.
    let udp: Vec<(u16, u8)> = ports::aligned_blocks(100, 200)
        .chain(ports::aligned_blocks(201, 300))
        .collect();
    let mut expected = vec![PortMatch::all_ports(TCP)];
    expected.extend(udp.iter().map(|&(port, bits)| PortMatch {
        proto: Some(UDP),
        port,
        bits,
    }));
    expected.sort();
    assert_eq!(class, expected);
}

#[test]
fn icmp_types_and_protocol_numbers() {
    let mut w = World::new();
    w.groups.push(group(
        "sg-a",
        "vpc-1",
        vec![
            sg_cidr(Protocol::ICMP, Some((8, 8)), "0.0.0.0/0"),
            sg_cidr(Protocol::ICMP, Some((0, 3)), "0.0.0.0/0"),
            sg_cidr(Protocol::ICMP, Some((0, 255)), "10.0.0.0/8"),
            sg_cidr(Protocol::Number(GRE), None, "192.0.2.0/24"),
        ],
        vec![],
    ));
    w.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &["sg-a"], true));
    let c = w.compile().unwrap();
    let t = &c.sg_sets[&vec!["sg-a".to_string()]];
    // Every type is all ports; GRE is its protocol number alone.
    assert!(
        t.ports
            .keys()
            .any(|&(_, m)| m == PortMatch::all_ports(ICMP))
    );
    assert!(t.ports.keys().any(|&(_, m)| m == PortMatch::all_ports(GRE)));
    let h = Host::install(c);
    let any = ip("198.51.100.1");
    assert!(h.sg("i-a", INGRESS, any, ICMP, 8));
    assert!(h.sg("i-a", INGRESS, any, ICMP, 3));
    assert!(!h.sg("i-a", INGRESS, any, ICMP, 4));
    assert!(!h.sg("i-a", INGRESS, any, ICMP, 11));
    assert!(h.sg("i-a", INGRESS, ip("10.2.3.4"), ICMP, 11));
    assert!(h.sg("i-a", INGRESS, ip("192.0.2.9"), GRE, 0));
    assert!(!h.sg("i-a", INGRESS, ip("192.0.2.9"), 50, 0));
}

/// The AWS documentation's custom ACL for a web subnet, with a deny in front: a lower
/// numbered deny beats a higher numbered allow, and rules after a match never apply.
fn web_acl() -> NetworkAcl {
    use AclAction::{Allow, Deny};
    let mut a = acl(
        "acl-web",
        "vpc-1",
        vec![
            acl_rule(100, Protocol::TCP, Some((80, 80)), "0.0.0.0/0", Allow),
            acl_rule(110, Protocol::TCP, Some((443, 443)), "0.0.0.0/0", Allow),
            acl_rule(120, Protocol::TCP, Some((22, 22)), "192.0.2.0/24", Allow),
            acl_rule(
                130,
                Protocol::TCP,
                Some((3389, 3389)),
                "192.0.2.0/24",
                Allow,
            ),
            acl_rule(140, Protocol::TCP, Some((32768, 65535)), "0.0.0.0/0", Allow),
            acl_rule(90, Protocol::All, None, "198.51.100.0/24", Deny),
            acl_rule(150, Protocol::TCP, Some((22, 22)), "0.0.0.0/0", Allow),
        ],
        vec![
            acl_rule(100, Protocol::TCP, Some((80, 80)), "0.0.0.0/0", Allow),
            acl_rule(110, Protocol::TCP, Some((443, 443)), "0.0.0.0/0", Allow),
            acl_rule(120, Protocol::TCP, Some((32768, 65535)), "0.0.0.0/0", Allow),
            acl_rule(130, Protocol::UDP, Some((0, 1023)), "10.0.0.0/8", Deny),
            acl_rule(200, Protocol::All, None, "10.0.0.0/8", Allow),
        ],
    );
    a.default = false;
    a
}

#[test]
fn network_acl_first_match_wins() {
    let mut w = World::new();
    w.acls.push(web_acl());
    w.subnets[0].network_acl = Some("acl-web".into());
    w.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &[], true));
    let c = w.compile().unwrap();
    assert_eq!(c.endpoints["i-a"].acl.as_deref(), Some("acl-web"));
    let h = Host::install(c);
    let v = |dir, a: &str, proto, port| h.acl("i-a", dir, ip(a), proto, port).unwrap();
    let star = (false, IMPLICIT_DENY_RULE);
    // Inbound.
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 80), (true, 100));
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 443), (true, 110));
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 81), star);
    assert_eq!(v(INGRESS, "192.0.2.5", TCP, 22), (true, 120));
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 22), (true, 150));
    assert_eq!(v(INGRESS, "192.0.2.5", TCP, 3389), (true, 130));
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 3389), star);
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 40000), (true, 140));
    assert_eq!(v(INGRESS, "203.0.113.1", TCP, 32767), star);
    assert_eq!(v(INGRESS, "203.0.113.1", UDP, 53), star);
    // Rule 90 denies everything from 198.51.100.0/24, before the allows.
    assert_eq!(v(INGRESS, "198.51.100.7", TCP, 80), (false, 90));
    assert_eq!(v(INGRESS, "198.51.100.7", TCP, 40000), (false, 90));
    assert_eq!(v(INGRESS, "198.51.100.7", ICMP, 8), (false, 90));
    // Outbound: 130 denies low UDP ports to 10/8 before 200 allows the rest.
    assert_eq!(v(EGRESS, "10.2.0.1", UDP, 53), (false, 130));
    assert_eq!(v(EGRESS, "10.2.0.1", UDP, 1024), (true, 200));
    assert_eq!(v(EGRESS, "10.2.0.1", TCP, 22), (true, 200));
    assert_eq!(v(EGRESS, "10.2.0.1", TCP, 80), (true, 100));
    assert_eq!(v(EGRESS, "10.2.0.1", GRE, 0), (true, 200));
    assert_eq!(v(EGRESS, "192.0.2.1", TCP, 80), (true, 100));
    assert_eq!(v(EGRESS, "192.0.2.1", TCP, 50000), (true, 120));
    assert_eq!(v(EGRESS, "192.0.2.1", UDP, 53), star);
}

#[test]
fn network_acl_tables_are_compact() {
    use AclAction::{Allow, Deny};
    let mut w = World::new();
    w.acls.push(acl(
        "acl-1",
        "vpc-1",
        vec![
            acl_rule(100, Protocol::TCP, Some((1024, 65535)), "0.0.0.0/0", Allow),
            acl_rule(200, Protocol::All, None, "0.0.0.0/0", Deny),
        ],
        vec![acl_rule(
            100,
            Protocol::TCP,
            Some((80, 80)),
            "0.0.0.0/0",
            Allow,
        )],
    ));
    w.subnets[0].network_acl = Some("acl-1".into());
    w.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &[], true));
    let c = w.compile().unwrap();
    let t = &c.acls["acl-1"];
    let allow = |rule| AclVerdict {
        action: ACL_ALLOW,
        rule,
    };
    let deny = |rule| AclVerdict {
        action: ACL_DENY,
        rule,
    };
    // Inbound: all protocols deny 200; TCP allow 100 for all ports, except 0-1023 (one
    // block) deny 200. Outbound: port 80 allow, nothing else (no match denies).
    let n_in = t.addr[&(INGRESS, net("0.0.0.0/0"))];
    let n_out = t.addr[&(EGRESS, net("0.0.0.0/0"))];
    assert_eq!(
        t.ports,
        BTreeMap::from([
            ((n_in, PortMatch::ALL), deny(200)),
            ((n_in, PortMatch::all_ports(TCP)), allow(100)),
            (
                (
                    n_in,
                    PortMatch {
                        proto: Some(TCP),
                        port: 0,
                        bits: 10
                    }
                ),
                deny(200)
            ),
            (
                (
                    n_out,
                    PortMatch {
                        proto: Some(TCP),
                        port: 80,
                        bits: 0
                    }
                ),
                allow(100)
            ),
        ])
    );
}

#[test]
fn empty_custom_acl_denies_everything() {
    let mut w = World::new();
    w.acls.push(acl("acl-empty", "vpc-1", vec![], vec![]));
    w.subnets[0].network_acl = Some("acl-empty".into());
    w.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &[], true));
    let c = w.compile().unwrap();
    assert_eq!(c.acls["acl-empty"], AclTables::default());
    let h = Host::install(c);
    for dir in [INGRESS, EGRESS] {
        for (proto, port) in [(TCP, 80), (UDP, 53), (ICMP, 0), (GRE, 0)] {
            assert_eq!(
                h.acl("i-a", dir, ip("10.0.2.1"), proto, port),
                Some((false, IMPLICIT_DENY_RULE))
            );
        }
    }
}

#[test]
fn subnets_without_an_acl_use_the_default_or_none() {
    use AclAction::Allow;
    let mut w = World::new();
    w.subnets.push(SubnetRef {
        id: "subnet-2".into(),
        vpc: "vpc-1".into(),
        cidr: net("10.0.2.0/24"),
        network_acl: Some("acl-custom".into()),
    });
    w.acls.push(acl("acl-custom", "vpc-1", vec![], vec![]));
    w.endpoints.extend([
        endpoint("i-1", "subnet-1", "10.0.1.10", &[], true),
        endpoint("i-2", "subnet-2", "10.0.2.10", &[], true),
    ]);
    // No default ACL: subnet-1 has none (allow all, ACL id 0).
    let c = w.compile().unwrap();
    assert_eq!(c.endpoints["i-1"].acl, None);
    assert_eq!(c.endpoints["i-2"].acl.as_deref(), Some("acl-custom"));
    assert_eq!(c.acls.keys().collect::<Vec<_>>(), ["acl-custom"]);
    // A default ACL applies to subnets that name none.
    let mut def = acl(
        "acl-default",
        "vpc-1",
        vec![acl_rule(100, Protocol::All, None, "0.0.0.0/0", Allow)],
        vec![acl_rule(100, Protocol::All, None, "0.0.0.0/0", Allow)],
    );
    def.default = true;
    w.acls.push(def);
    let c = w.compile().unwrap();
    assert_eq!(c.endpoints["i-1"].acl.as_deref(), Some("acl-default"));
    assert_eq!(c.endpoints["i-2"].acl.as_deref(), Some("acl-custom"));
    // Remote endpoints' ACLs are not compiled.
    w.endpoints[1].local = false;
    let c = w.compile().unwrap();
    assert_eq!(c.acls.keys().collect::<Vec<_>>(), ["acl-default"]);
    assert_eq!(c.endpoints.keys().collect::<Vec<_>>(), ["i-1"]);
}

// ---------------------------------------------------------------------------------------
// Validation.

fn quota_world() -> World {
    let mut w = World::new();
    let rules = |n: u16| {
        (0..n)
            .map(|i| sg_cidr(Protocol::TCP, Some((i, i)), "0.0.0.0/0"))
            .collect::<Vec<_>>()
    };
    w.groups
        .push(group("sg-big", "vpc-1", rules(60), rules(60)));
    for i in 0..6 {
        w.groups
            .push(group(&format!("sg-{i}"), "vpc-1", vec![], vec![]));
    }
    w.endpoints.push(endpoint(
        "i-a",
        "subnet-1",
        "10.0.1.10",
        &["sg-0", "sg-1", "sg-2", "sg-3", "sg-big"],
        true,
    ));
    let acl_rules = |n: u16| {
        (1..=n)
            .map(|i| acl_rule(i, Protocol::UDP, Some((i, i)), "0.0.0.0/0", AclAction::Deny))
            .collect::<Vec<_>>()
    };
    w.acls
        .push(acl("acl-1", "vpc-1", acl_rules(20), acl_rules(20)));
    w
}

#[test]
fn quotas() {
    let w = quota_world();
    w.compile().unwrap();

    let mut more = w.clone();
    more.groups[0]
        .inbound
        .push(sg_cidr(Protocol::UDP, None, "0.0.0.0/0"));
    assert_eq!(
        more.compile(),
        Err(PolicyError::QuotaExceeded {
            kind: Kind::SecurityGroup,
            id: "sg-big".into(),
            field: "inbound",
            count: 61,
            limit: 60
        })
    );
    more.limits.sg_inbound_rules = 61;
    more.compile().unwrap();

    let mut more = w.clone();
    more.groups[0].outbound.pop();
    more.groups[0].outbound.extend([
        sg_cidr(Protocol::UDP, None, "0.0.0.0/0"),
        sg_cidr(Protocol::ICMP, None, "0.0.0.0/0"),
    ]);
    assert!(matches!(
        more.compile(),
        Err(PolicyError::QuotaExceeded {
            field: "outbound",
            count: 61,
            ..
        })
    ));

    let mut more = w.clone();
    more.endpoints[0].security_groups.push("sg-4".into());
    assert_eq!(
        more.compile(),
        Err(PolicyError::QuotaExceeded {
            kind: Kind::Endpoint,
            id: "i-a".into(),
            field: "security_groups",
            count: 6,
            limit: 5
        })
    );
    // Duplicates count once.
    more.endpoints[0].security_groups[5] = "sg-0".into();
    more.compile().unwrap();
    more.limits.groups_per_endpoint = 6;
    more.endpoints[0].security_groups[5] = "sg-4".into();
    more.compile().unwrap();

    let mut more = w.clone();
    more.acls[0].inbound.push(acl_rule(
        100,
        Protocol::All,
        None,
        "0.0.0.0/0",
        AclAction::Allow,
    ));
    assert_eq!(
        more.compile(),
        Err(PolicyError::QuotaExceeded {
            kind: Kind::NetworkAcl,
            id: "acl-1".into(),
            field: "inbound",
            count: 21,
            limit: 20
        })
    );
    more.limits.acl_inbound_rules = 21;
    more.compile().unwrap();
    more.acls[0].outbound.push(acl_rule(
        100,
        Protocol::All,
        None,
        "0.0.0.0/0",
        AclAction::Allow,
    ));
    assert!(matches!(
        more.compile(),
        Err(PolicyError::QuotaExceeded {
            field: "outbound",
            ..
        })
    ));
}

fn invalid(w: &World) -> (String, String, RuleProblem) {
    match w.compile() {
        Err(PolicyError::InvalidRule {
            id, field, problem, ..
        }) => (id, field, problem),
        other => panic!("expected an invalid rule, got {other:?}"),
    }
}

#[test]
fn invalid_rules_name_object_and_field() {
    let mut base = World::new();
    base.groups.push(web_sg());
    base.acls.push(web_acl());

    let mut w = base.clone();
    w.groups[0].inbound[1].from_port = Some(444);
    assert_eq!(
        invalid(&w),
        (
            "sg-web".into(),
            "inbound[1].from_port".into(),
            RuleProblem::ReversedPorts { from: 444, to: 443 }
        )
    );
    let mut w = base.clone();
    w.groups[0].outbound[0].to_port = Some(1);
    assert_eq!(
        invalid(&w),
        (
            "sg-web".into(),
            "outbound[0].to_port".into(),
            RuleProblem::PortsNotAllowed(Protocol::All)
        )
    );
    let mut w = base.clone();
    w.groups[0].inbound[2] = sg_cidr(Protocol::Number(GRE), Some((1, 1)), "0.0.0.0/0");
    assert_eq!(
        invalid(&w).2,
        RuleProblem::PortsNotAllowed(Protocol::Number(GRE))
    );
    let mut w = base.clone();
    w.groups[0].inbound[2].to_port = None;
    assert_eq!(
        invalid(&w),
        (
            "sg-web".into(),
            "inbound[2].to_port".into(),
            RuleProblem::HalfRange
        )
    );
    let mut w = base.clone();
    w.groups[0].inbound[0] = sg_cidr(Protocol::ICMP, Some((0, 256)), "0.0.0.0/0");
    assert_eq!(
        invalid(&w),
        (
            "sg-web".into(),
            "inbound[0].to_port".into(),
            RuleProblem::PortOutOfRange {
                port: 256,
                protocol: Protocol::ICMP,
                max: 255
            }
        )
    );
    let mut w = base.clone();
    w.groups[0].inbound[0].group = Some("sg-web".into());
    assert_eq!(
        invalid(&w),
        (
            "sg-web".into(),
            "inbound[0].cidr".into(),
            RuleProblem::CidrXorGroup
        )
    );
    let mut w = base.clone();
    w.groups[0].inbound[0].cidr = None;
    assert_eq!(invalid(&w).2, RuleProblem::CidrXorGroup);

    let mut w = base.clone();
    w.acls[0].outbound[3].rule = 110;
    assert_eq!(
        invalid(&w),
        (
            "acl-web".into(),
            "outbound[3].rule".into(),
            RuleProblem::DuplicateRuleNumber(110)
        )
    );
    let mut w = base.clone();
    w.acls[0].inbound[0].rule = 0;
    assert_eq!(invalid(&w).2, RuleProblem::RuleNumberOutOfRange(0));
    w.acls[0].inbound[0].rule = 32767;
    assert_eq!(invalid(&w).2, RuleProblem::RuleNumberOutOfRange(32767));
    w.acls[0].inbound[0].rule = 32766;
    w.compile().unwrap();
    // Same number in the other direction is fine.
    let mut w = base.clone();
    w.acls[0].inbound[0].rule = 200;
    w.compile().unwrap();
    let mut w = base.clone();
    w.acls[0].inbound[0].from_port = Some(100);
    assert_eq!(
        invalid(&w),
        (
            "acl-web".into(),
            "inbound[0].from_port".into(),
            RuleProblem::ReversedPorts { from: 100, to: 80 }
        )
    );
    let mut w = base.clone();
    w.acls[0].inbound[5].from_port = Some(1);
    assert_eq!(invalid(&w).1, "inbound[5].from_port");
}

#[test]
fn references_and_ids() {
    let mut base = World::new();
    base.vpcs.push("vpc-2".into());
    base.subnets.push(SubnetRef {
        id: "subnet-2".into(),
        vpc: "vpc-2".into(),
        cidr: net("10.0.1.0/24"),
        network_acl: None,
    });
    base.groups.push(web_sg());
    base.groups.push(group("sg-other", "vpc-2", vec![], vec![]));
    base.acls.push(acl("acl-2", "vpc-2", vec![], vec![]));
    base.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &["sg-web"], true));
    base.compile().unwrap();

    let mut w = base.clone();
    w.groups[0].inbound[0] = sg_group(Protocol::All, None, "sg-nope");
    assert_eq!(
        w.compile(),
        Err(PolicyError::UnknownRef {
            kind: Kind::SecurityGroup,
            id: "sg-web".into(),
            field: "inbound[0].group".into(),
            target: Kind::SecurityGroup,
            target_id: "sg-nope".into()
        })
    );
    let mut w = base.clone();
    w.groups[0].outbound[0] = sg_group(Protocol::All, None, "sg-other");
    assert_eq!(
        w.compile(),
        Err(PolicyError::OtherVpc {
            kind: Kind::SecurityGroup,
            id: "sg-web".into(),
            field: "outbound[0].group".into(),
            target: Kind::SecurityGroup,
            target_id: "sg-other".into(),
            target_vpc: "vpc-2".into()
        })
    );
    // The implicit default group of the other VPC is another VPC's too.
    w.groups[0].outbound[0] = sg_group(Protocol::All, None, "vpc-2/default");
    assert!(matches!(w.compile(), Err(PolicyError::OtherVpc { .. })));
    w.groups[0].outbound[0] = sg_group(Protocol::All, None, "vpc-1/default");
    w.compile().unwrap();

    let mut w = base.clone();
    w.endpoints[0].security_groups = vec!["sg-other".into()];
    assert!(matches!(
        w.compile(),
        Err(PolicyError::OtherVpc { kind: Kind::Endpoint, ref field, .. }) if field == "security_groups[0]"
    ));
    let mut w = base.clone();
    w.endpoints[0].security_groups = vec!["sg-web".into(), "sg-x".into()];
    assert!(matches!(
        w.compile(),
        Err(PolicyError::UnknownRef { kind: Kind::Endpoint, ref field, .. }) if field == "security_groups[1]"
    ));
    let mut w = base.clone();
    w.endpoints[0].subnet = "subnet-2".into();
    assert!(matches!(
        w.compile(),
        Err(PolicyError::OtherVpc { kind: Kind::Endpoint, ref field, .. }) if field == "subnet"
    ));
    let mut w = base.clone();
    w.endpoints[0].subnet = "subnet-9".into();
    assert!(matches!(
        w.compile(),
        Err(PolicyError::UnknownRef {
            target: Kind::Subnet,
            ..
        })
    ));
    let mut w = base.clone();
    w.endpoints[0].vpc = "vpc-9".into();
    assert!(matches!(
        w.compile(),
        Err(PolicyError::UnknownRef {
            target: Kind::Vpc,
            ..
        })
    ));
    let mut w = base.clone();
    w.subnets[0].network_acl = Some("acl-2".into());
    assert!(matches!(
        w.compile(),
        Err(PolicyError::OtherVpc { kind: Kind::Subnet, ref field, .. }) if field == "network_acl"
    ));
    w.subnets[0].network_acl = Some("acl-9".into());
    assert!(matches!(
        w.compile(),
        Err(PolicyError::UnknownRef {
            kind: Kind::Subnet,
            ..
        })
    ));
    let mut w = base.clone();
    w.groups[1].vpc = "vpc-9".into();
    assert!(matches!(
        w.compile(),
        Err(PolicyError::UnknownRef { kind: Kind::SecurityGroup, ref field, .. }) if field == "vpc"
    ));
    let mut w = base.clone();
    w.acls[0].vpc = "vpc-9".into();
    assert!(matches!(
        w.compile(),
        Err(PolicyError::UnknownRef {
            kind: Kind::NetworkAcl,
            ..
        })
    ));

    // Duplicates.
    for (kind, edit) in [
        (
            Kind::Vpc,
            (|w: &mut World| w.vpcs.push("vpc-1".into())) as fn(&mut World),
        ),
        (Kind::Subnet, |w| {
            let s = w.subnets[0].clone();
            w.subnets.push(s)
        }),
        (Kind::Endpoint, |w| {
            let e = w.endpoints[0].clone();
            w.endpoints.push(e)
        }),
        (Kind::SecurityGroup, |w| w.groups.push(web_sg())),
        (Kind::NetworkAcl, |w| {
            let a = w.acls[0].clone();
            w.acls.push(a)
        }),
        // A group may not take a VPC's implicit default id.
        (Kind::SecurityGroup, |w| {
            w.groups
                .push(group("vpc-1/default", "vpc-1", vec![], vec![]))
        }),
    ] {
        let mut w = base.clone();
        edit(&mut w);
        assert!(
            matches!(w.compile(), Err(PolicyError::DuplicateId { kind: k, .. }) if k == kind),
            "{kind}"
        );
    }
    // ... unless it is the VPC's default.
    let mut w = base.clone();
    let mut def = group("vpc-1/default", "vpc-1", vec![], vec![]);
    def.default = true;
    w.groups.push(def);
    w.compile().unwrap();

    // Two defaults.
    let mut w = base.clone();
    w.groups[0].default = true;
    let mut g = group("sg-2", "vpc-1", vec![], vec![]);
    g.default = true;
    w.groups.push(g);
    assert_eq!(
        w.compile(),
        Err(PolicyError::TwoDefaults {
            kind: Kind::SecurityGroup,
            vpc: "vpc-1".into(),
            first: "sg-web".into(),
            second: "sg-2".into()
        })
    );
    let mut w = base.clone();
    for id in ["acl-a", "acl-b"] {
        let mut a = acl(id, "vpc-2", vec![], vec![]);
        a.default = true;
        w.acls.push(a);
    }
    assert!(matches!(
        w.compile(),
        Err(PolicyError::TwoDefaults {
            kind: Kind::NetworkAcl,
            ..
        })
    ));
}

#[test]
fn errors_read_well() {
    // Small enough to pass around in `Result`s (clippy's `result_large_err`).
    assert!(std::mem::size_of::<PolicyError>() <= 128);
    let mut w = World::new();
    w.groups.push(web_sg());
    w.groups[0].inbound[1].from_port = Some(444);
    assert_eq!(
        w.compile().unwrap_err().to_string(),
        "security group sg-web: inbound[1].from_port: from_port 444 is greater than to_port 443"
    );
}

// ---------------------------------------------------------------------------------------
// Serde.

#[test]
fn serde_model() {
    let g: SecurityGroup = serde_json::from_str(
        r#"{"id": "sg-1", "vpc": "vpc-1",
            "inbound": [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "203.0.113.0/24"},
                        {"protocol": "-1", "group": "sg-1"},
                        {"protocol": 17, "cidr": "10.0.0.0/8"},
                        {"protocol": "ICMP", "from_port": 8, "to_port": 8, "cidr": "0.0.0.0/0"},
                        {"protocol": "47", "cidr": "192.0.2.1"},
                        {"protocol": -1, "cidr": "0.0.0.0/0"}]}"#,
    )
    .unwrap();
    assert!(!g.default);
    assert_eq!(g.outbound, model::allow_all_outbound());
    assert_eq!(
        g.inbound.iter().map(|r| r.protocol).collect::<Vec<_>>(),
        [
            Protocol::TCP,
            Protocol::All,
            Protocol::UDP,
            Protocol::ICMP,
            Protocol::Number(47),
            Protocol::All
        ]
    );
    assert_eq!(g.inbound[4].cidr, Some(net("192.0.2.1/32")));
    let text = serde_json::to_string(&g).unwrap();
    assert!(text.contains(r#""protocol":"all""#), "{text}");
    assert_eq!(serde_json::from_str::<SecurityGroup>(&text).unwrap(), g);

    let g: SecurityGroup =
        serde_json::from_str(r#"{"id": "sg-1", "vpc": "vpc-1", "outbound": [], "default": true}"#)
            .unwrap();
    assert!(g.outbound.is_empty() && g.inbound.is_empty() && g.default);

    // Unknown fields are refused where people write documents (`StateFile::parse_strict`),
    // and skipped in streamed ones (a newer control plane).
    let doc = r#"{"security_groups": [{"id": "sg-1", "vpc": "vpc-1", "name": "x"}]}"#;
    let err = crate::overlay::statefile::StateFile::parse_strict(doc).unwrap_err();
    assert!(err.to_string().contains("security_groups.0.name"), "{err}");
    for bad in [
        r#"{"id": "sg-1", "vpc": "vpc-1", "inbound": [{"protocol": "sctp", "cidr": "0.0.0.0/0"}]}"#,
        r#"{"id": "sg-1", "vpc": "vpc-1", "inbound": [{"protocol": 256, "cidr": "0.0.0.0/0"}]}"#,
        r#"{"id": "sg-1", "vpc": "vpc-1", "inbound": [{"protocol": -2, "cidr": "0.0.0.0/0"}]}"#,
        r#"{"id": "sg-1", "vpc": "vpc-1", "inbound": [{"protocol": "tcp", "cidr": "0.0.0.0/33"}]}"#,
        r#"{"id": "sg-1", "vpc": "vpc-1", "inbound": [{"protocol": "tcp", "from_port": -1, "to_port": 1, "cidr": "0.0.0.0/0"}]}"#,
    ] {
        assert!(serde_json::from_str::<SecurityGroup>(bad).is_err(), "{bad}");
    }

    let a: NetworkAcl = serde_json::from_str(
        r#"{"id": "acl-1", "vpc": "vpc-1",
            "inbound": [{"rule": 100, "protocol": "tcp", "from_port": 80, "to_port": 80,
                         "cidr": "0.0.0.0/0", "action": "allow"},
                        {"rule": 200, "protocol": "all", "cidr": "0.0.0.0/0", "action": "deny"}]}"#,
    )
    .unwrap();
    assert!(a.outbound.is_empty() && !a.default);
    assert_eq!(a.inbound[1].action, AclAction::Deny);
    let text = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<NetworkAcl>(&text).unwrap(), a);
    assert!(
        serde_json::from_str::<NetworkAcl>(
            r#"{"id": "a", "vpc": "v", "inbound": [{"rule": 1, "protocol": "tcp", "cidr": "0.0.0.0/0", "action": "reject"}]}"#
        )
        .is_err()
    );

    let l: PolicyLimits = serde_json::from_str("{}").unwrap();
    assert_eq!(l, PolicyLimits::default());
    let l: PolicyLimits = serde_json::from_str(r#"{"groups_per_endpoint": 16}"#).unwrap();
    assert_eq!(l.groups_per_endpoint, 16);
    assert_eq!(l.sg_inbound_rules, 60);
    let doc = r#"{"limits": {"groups": 1}}"#;
    assert!(crate::overlay::statefile::StateFile::parse_strict(doc).is_err());

    for (text, p) in [
        ("tcp", Protocol::TCP),
        ("UDP", Protocol::UDP),
        ("6", Protocol::TCP),
        ("1", Protocol::ICMP),
        ("all", Protocol::All),
        ("-1", Protocol::All),
        ("0", Protocol::Number(0)),
        ("255", Protocol::Number(255)),
    ] {
        assert_eq!(text.parse::<Protocol>().unwrap(), p, "{text}");
        assert_eq!(p.to_string().parse::<Protocol>().unwrap(), p);
    }
    assert!("256".parse::<Protocol>().is_err());
    assert!("".parse::<Protocol>().is_err());
}

// ---------------------------------------------------------------------------------------
// Entries.

#[test]
fn entries_round_trip_and_reject_foreign_entries() {
    let mut w = World::new();
    w.groups.push(web_sg());
    w.acls.push(web_acl());
    w.subnets[0].network_acl = Some("acl-web".into());
    w.endpoints
        .push(endpoint("i-a", "subnet-1", "10.0.1.10", &["sg-web"], true));
    let c = w.compile().unwrap();
    let sg = &c.sg_sets[&vec!["sg-web".to_string()]];
    let acl = &c.acls["acl-web"];
    for id in [1, 2, 0x1234, 0xffff] {
        let (a, p) = sg.entries(id);
        assert_eq!(SgTables::from_entries(id, &a, &p).as_ref(), Some(sg));
        assert_eq!(SgTables::from_entries(id + 1, &a, &p), None);
        let (a2, p2) = acl.entries(id);
        assert_eq!(AclTables::from_entries(id, &a2, &p2).as_ref(), Some(acl));
        assert_eq!(AclTables::from_entries(id - 1, &a2, &p2), None);
        // Classes belong to the id.
        assert!(a.iter().all(|e| e.2 >> 16 == id && e.1.scope().0 == id));
        assert!(
            p2.iter()
                .all(|e| u32::from_be_bytes(e.1.class_be) >> 16 == id)
        );
    }
    let (a, p) = sg.entries(7);
    // Host bits set, odd lengths, padding, unaligned blocks, bad verdicts: not ours.
    let mut bad = a.clone();
    bad[0].1.addr[15] |= 1;
    assert_eq!(SgTables::from_entries(7, &bad, &p), None);
    let mut bad = a.clone();
    bad[0].0 = 100;
    assert_eq!(SgTables::from_entries(7, &bad, &p), None);
    let mut bad = a.clone();
    bad[0].1.addr[9] = 1;
    assert_eq!(SgTables::from_entries(7, &bad, &p), None);
    // A TCP port entry (the first entry is the all-protocols one).
    let t = p.iter().position(|e| e.1.proto == TCP).unwrap();
    let mut bad = p.clone();
    bad[t].1._pad = 1;
    assert_eq!(SgTables::from_entries(7, &a, &bad), None);
    let mut bad = p.clone();
    bad[t].0 = 36;
    assert_eq!(SgTables::from_entries(7, &a, &bad), None);
    let mut bad = p.clone();
    bad[t].0 = 50;
    assert_eq!(SgTables::from_entries(7, &a, &bad), None);
    let mut bad = p.clone();
    bad.push(bad[0]);
    assert_eq!(SgTables::from_entries(7, &a, &bad), None);
    let (a2, p2) = acl.entries(7);
    let mut bad = p2.clone();
    bad[0].2.action = 3;
    assert_eq!(AclTables::from_entries(7, &a2, &bad), None);
    let mut bad = p2.clone();
    bad[0].2.rule = 0;
    assert_eq!(AclTables::from_entries(7, &a2, &bad), None);
    assert_eq!(
        SgTables::from_entries(7, &[], &[]),
        Some(SgTables::default())
    );
}

// ---------------------------------------------------------------------------------------
// Property test: random rule sets against a naive evaluator.

/// xorshift64*.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

const EDGE_PORTS: [u16; 20] = [
    0, 1, 2, 3, 7, 8, 15, 16, 22, 80, 443, 1023, 1024, 8080, 32767, 32768, 49151, 65533, 65534,
    65535,
];

fn random_port(rng: &mut Rng, proto: u8) -> u16 {
    match proto {
        ICMP => rng.pick(&[0, 1, 3, 4, 7, 8, 11, 127, 128, 254, 255]),
        TCP | UDP => {
            if rng.chance(70) {
                let p = rng.pick(&EDGE_PORTS);
                match rng.below(3) {
                    0 => p.saturating_sub(1),
                    1 => p.saturating_add(1),
                    _ => p,
                }
            } else {
                rng.next() as u16
            }
        }
        _ => 0,
    }
}

fn random_protocol(rng: &mut Rng) -> Protocol {
    match rng.below(10) {
        0..=3 => Protocol::TCP,
        4..=5 => Protocol::UDP,
        6 => Protocol::ICMP,
        7 => Protocol::Number(GRE),
        _ => Protocol::All,
    }
}

fn random_range(rng: &mut Rng, p: Protocol) -> Option<(u16, u16)> {
    if !p.has_ports() || rng.chance(20) {
        return None;
    }
    let max = if p == Protocol::ICMP { 255 } else { u16::MAX };
    let a = random_port(rng, p.number().unwrap_or(0)).min(max);
    let b = if rng.chance(30) {
        a
    } else {
        random_port(rng, p.number().unwrap_or(0)).min(max)
    };
    Some((a.min(b), a.max(b)))
}

/// Addresses cluster in 10.0.0.0/25 so prefixes overlap often.
fn random_addr(rng: &mut Rng) -> Ipv4Addr {
    match rng.below(10) {
        0 => Ipv4Addr::from(rng.next() as u32),
        1 => Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0xff_ffff)),
        _ => Ipv4Addr::new(10, 0, 0, rng.below(128) as u8),
    }
}

fn random_cidr(rng: &mut Rng) -> Ipv4Network {
    let len = rng.pick(&[0, 1, 8, 16, 24, 25, 26, 27, 28, 29, 30, 31, 32, 32, 32]);
    // Host bits are left in on purpose: the compiler canonicalizes.
    Ipv4Network::new(random_addr(rng), len).unwrap()
}

const VPCS: [&str; 2] = ["vpc-1", "vpc-2"];

fn random_world(rng: &mut Rng) -> World {
    let mut w = World {
        vpcs: VPCS.iter().map(|v| v.to_string()).collect(),
        subnets: Vec::new(),
        endpoints: Vec::new(),
        groups: Vec::new(),
        acls: Vec::new(),
        limits: PolicyLimits::default(),
    };
    let mut group_ids: Vec<(String, &str)> = Vec::new();
    for (v, vpc) in VPCS.iter().enumerate() {
        let n = 1 + rng.below(3);
        let with_default = rng.chance(50);
        for g in 0..n {
            group_ids.push((format!("sg-{v}{g}"), vpc));
        }
        if !with_default {
            group_ids.push((format!("{vpc}/default"), vpc));
        }
        for i in 0..2 {
            w.subnets.push(SubnetRef {
                id: format!("subnet-{v}{i}"),
                vpc: vpc.to_string(),
                cidr: Ipv4Network::new(Ipv4Addr::new(10, 0, 0, 64 * i), 26).unwrap(),
                network_acl: None,
            });
        }
    }
    for (v, vpc) in VPCS.iter().enumerate() {
        let own: Vec<&String> = group_ids
            .iter()
            .filter(|g| g.1 == *vpc)
            .map(|g| &g.0)
            .collect();
        for (g, id) in own.iter().enumerate() {
            if id.ends_with("/default") {
                continue;
            }
            let mut rules = [Vec::new(), Vec::new()];
            for list in &mut rules {
                for _ in 0..rng.below(7) {
                    let p = random_protocol(rng);
                    let range = random_range(rng, p);
                    list.push(if rng.chance(25) {
                        sg_group(p, range, own[rng.below(own.len())])
                    } else {
                        sg_cidr(p, range, "0.0.0.0/0")
                    });
                    if let Some(r) = list.last_mut()
                        && r.cidr.is_some()
                    {
                        r.cidr = Some(random_cidr(rng));
                    }
                }
            }
            let [inbound, outbound] = rules;
            let mut sg = group(id, vpc, inbound, outbound);
            if rng.chance(20) {
                sg.outbound = model::allow_all_outbound();
            }
            // The first group is the default when the VPC has no implicit one.
            sg.default = g == 0 && !own.iter().any(|id| id.ends_with("/default"));
            w.groups.push(sg);
        }
        for a in 0..2 {
            let mut lists = [Vec::new(), Vec::new()];
            for list in &mut lists {
                let mut numbers: Vec<u16> = (1..=40).map(|n| n * 5).collect();
                for _ in 0..rng.below(9) {
                    let i = rng.below(numbers.len());
                    let number = numbers.swap_remove(i);
                    let p = random_protocol(rng);
                    let range = random_range(rng, p);
                    let action = if rng.chance(50) {
                        AclAction::Allow
                    } else {
                        AclAction::Deny
                    };
                    let mut r = acl_rule(number, p, range, "0.0.0.0/0", action);
                    r.cidr = random_cidr(rng);
                    list.push(r);
                }
            }
            let [inbound, outbound] = lists;
            let mut a_ = acl(&format!("acl-{v}{a}"), vpc, inbound, outbound);
            a_.default = a == 0 && rng.chance(50);
            w.acls.push(a_);
        }
    }
    for s in &mut w.subnets {
        if rng.chance(50) {
            let v = if s.vpc == "vpc-1" { 0 } else { 1 };
            s.network_acl = Some(format!("acl-{v}{}", rng.below(2)));
        }
    }
    for e in 0..8 {
        let s = rng.below(w.subnets.len());
        let subnet = w.subnets[s].clone();
        let own: Vec<&String> = group_ids
            .iter()
            .filter(|g| g.1 == subnet.vpc)
            .map(|g| &g.0)
            .collect();
        let groups = (0..rng.below(4))
            .map(|_| own[rng.below(own.len())].clone())
            .collect();
        w.endpoints.push(EndpointRef {
            id: format!("i-{e}"),
            vpc: subnet.vpc.clone(),
            subnet: subnet.id.clone(),
            ip: Ipv4Addr::from(u32::from(subnet.cidr.network()) + 4 + e),
            security_groups: groups,
            local: rng.chance(60),
        });
    }
    w
}

/// The groups of `e`, by the rules of AWS (written independently of the compiler).
fn reference_groups(w: &World, e: &EndpointRef) -> Vec<SecurityGroup> {
    let named: Vec<&str> = if e.security_groups.is_empty() {
        let explicit = w.groups.iter().find(|g| g.vpc == e.vpc && g.default);
        vec![explicit.map_or("", |g| g.id.as_str())]
    } else {
        e.security_groups.iter().map(String::as_str).collect()
    };
    named
        .into_iter()
        .map(|id| {
            w.groups
                .iter()
                .find(|g| g.id == id)
                .cloned()
                .unwrap_or_else(|| implicit_default(w, &e.vpc, id))
        })
        .collect()
}

fn implicit_default(w: &World, vpc: &str, id: &str) -> SecurityGroup {
    let id = if id.is_empty() {
        format!("{vpc}/default")
    } else {
        id.to_string()
    };
    assert!(w.groups.iter().all(|g| g.id != id));
    SecurityGroup {
        inbound: vec![sg_group(Protocol::All, None, &id)],
        id,
        vpc: vpc.into(),
        default: true,
        outbound: model::allow_all_outbound(),
    }
}

fn rule_matches(
    protocol: Protocol,
    from: Option<u16>,
    to: Option<u16>,
    proto: u8,
    port: u16,
) -> bool {
    match protocol {
        Protocol::All => true,
        Protocol::Number(p) => {
            p == proto
                && match (from, to) {
                    (Some(a), Some(b)) => a <= port && port <= b,
                    _ => true,
                }
        }
    }
}

/// The effective groups of every endpoint and the members of every group.
#[derive(Debug)]
struct Reference {
    groups: HashMap<String, Vec<SecurityGroup>>,
    members: HashMap<String, Vec<Ipv4Addr>>,
}

impl Reference {
    fn new(w: &World) -> Reference {
        let mut groups = HashMap::new();
        let mut members: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        for e in &w.endpoints {
            let gs = reference_groups(w, e);
            for g in &gs {
                members.entry(g.id.clone()).or_default().push(e.ip);
            }
            groups.insert(e.id.clone(), gs);
        }
        Reference { groups, members }
    }

    /// Whether `rule` (as the index describes it) is a rule of one of `e`'s groups that
    /// admits this traffic.
    fn admits(
        &self,
        e: &EndpointRef,
        rule: &SgRuleInfo,
        remote: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> bool {
        let Some(g) = self.groups[&e.id].iter().find(|g| g.id == rule.group) else {
            return false;
        };
        let rules = if rule.direction == INGRESS {
            &g.inbound
        } else {
            &g.outbound
        };
        let Some(r) = rules.get(rule.position) else {
            return false;
        };
        let addr_ok = match (&r.cidr, &r.group) {
            (Some(c), _) => c.contains(remote),
            (None, Some(other)) => self.members.get(other).is_some_and(|m| m.contains(&remote)),
            (None, None) => false,
        };
        addr_ok && rule_matches(r.protocol, r.from_port, r.to_port, proto, port)
    }

    fn sg(&self, e: &EndpointRef, dir: u32, remote: Ipv4Addr, proto: u8, port: u16) -> bool {
        self.groups[&e.id].iter().any(|g| {
            let rules = if dir == INGRESS {
                &g.inbound
            } else {
                &g.outbound
            };
            rules.iter().any(|r| {
                let addr_ok = match (&r.cidr, &r.group) {
                    (Some(c), _) => c.contains(remote),
                    (None, Some(other)) => {
                        self.members.get(other).is_some_and(|m| m.contains(&remote))
                    }
                    (None, None) => false,
                };
                addr_ok && rule_matches(r.protocol, r.from_port, r.to_port, proto, port)
            })
        })
    }
}

fn reference_acl(
    w: &World,
    e: &EndpointRef,
    dir: u32,
    remote: Ipv4Addr,
    proto: u8,
    port: u16,
) -> Option<(bool, u16)> {
    let subnet = w.subnets.iter().find(|s| s.id == e.subnet)?;
    let acl = match &subnet.network_acl {
        Some(id) => w.acls.iter().find(|a| &a.id == id),
        None => w.acls.iter().find(|a| a.vpc == subnet.vpc && a.default),
    }?;
    let mut rules: Vec<&AclRule> = if dir == INGRESS {
        acl.inbound.iter().collect()
    } else {
        acl.outbound.iter().collect()
    };
    rules.sort_by_key(|r| r.rule);
    Some(
        rules
            .iter()
            .find(|r| {
                r.cidr.contains(remote)
                    && rule_matches(r.protocol, r.from_port, r.to_port, proto, port)
            })
            .map_or((false, IMPLICIT_DENY_RULE), |r| {
                (r.action == AclAction::Allow, r.rule)
            }),
    )
}

/// The same world, every list in another order.
fn shuffled(w: &World, rng: &mut Rng) -> World {
    fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i + 1));
        }
    }
    let mut s = w.clone();
    shuffle(&mut s.vpcs, rng);
    shuffle(&mut s.subnets, rng);
    shuffle(&mut s.endpoints, rng);
    shuffle(&mut s.groups, rng);
    shuffle(&mut s.acls, rng);
    for g in &mut s.groups {
        shuffle(&mut g.inbound, rng);
        shuffle(&mut g.outbound, rng);
    }
    for a in &mut s.acls {
        shuffle(&mut a.inbound, rng);
        shuffle(&mut a.outbound, rng);
    }
    for e in &mut s.endpoints {
        shuffle(&mut e.security_groups, rng);
    }
    s
}

#[test]
fn compiled_lookups_equal_the_rules() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut probes = 0;
    for case in 0..200 {
        let w = random_world(&mut rng);
        let c = w.compile().unwrap_or_else(|e| panic!("case {case}: {e}"));
        // Tables are independent of the input order; rule positions are the input's.
        let s = shuffled(&w, &mut rng).compile().unwrap();
        assert_eq!(
            (&s.sg_sets, &s.acls, &s.endpoints),
            (&c.sg_sets, &c.acls, &c.endpoints),
            "case {case}: input order matters"
        );
        let described = |c: &CompiledPolicy| -> Vec<Vec<(String, u32)>> {
            c.sg_rules
                .values()
                .map(|i| {
                    let mut d: Vec<_> = i
                        .rules()
                        .iter()
                        .map(|r| (r.description(), r.reference))
                        .collect();
                    d.sort();
                    d
                })
                .collect()
        };
        assert_eq!(described(&s), described(&c), "case {case}");
        let h = Host::install(c);
        let reference = Reference::new(&w);
        for e in w.endpoints.iter().filter(|e| e.local) {
            for dir in [INGRESS, EGRESS] {
                for _ in 0..60 {
                    let remote = if rng.chance(30) {
                        w.endpoints[rng.below(w.endpoints.len())].ip
                    } else {
                        random_addr(&mut rng)
                    };
                    let proto = rng.pick(&[TCP, TCP, UDP, ICMP, GRE, 0, 50]);
                    let port = random_port(&mut rng, proto);
                    let what = || {
                        format!(
                            "case {case} {} dir {dir} {remote} proto {proto} port {port}\n{w:#?}",
                            e.id
                        )
                    };
                    let allowed = reference.sg(e, dir, remote, proto, port);
                    assert_eq!(h.sg(&e.id, dir, remote, proto, port), allowed, "{}", what());
                    // The reported rule is one of the endpoint's rules of that direction
                    // that admits the traffic.
                    let (r, decided) = h.sg_decided(&e.id, dir, remote, proto, port);
                    assert_eq!(r != 0, allowed, "{}", what());
                    if allowed {
                        let d = decided.unwrap_or_else(|| panic!("ref {r}: {}", what()));
                        assert_eq!(d.direction, dir, "{}", what());
                        assert!(
                            reference.admits(e, d, remote, proto, port),
                            "{d:?}: {}",
                            what()
                        );
                    }
                    assert_eq!(
                        h.acl(&e.id, dir, remote, proto, port),
                        reference_acl(&w, e, dir, remote, proto, port),
                        "{}",
                        what()
                    );
                    probes += 1;
                }
            }
        }
        assert!(h.sim.sg_port.len() + h.sim.acl_port.len() < 100_000);
    }
    assert!(probes > 10_000, "{probes}");
}

// ---------------------------------------------------------------------------------------
// Scale (timing; run with `cargo test --release -p controlplane --lib policy -- --ignored
// --nocapture`).

#[test]
#[ignore = "timing, run in release"]
fn scale_100k_rules() {
    let mut rng = Rng(42);
    let mut w = World::new();
    w.subnets[0].cidr = net("10.0.0.0/16");
    w.limits.sg_inbound_rules = 1000;
    w.limits.sg_outbound_rules = 1000;
    let groups = 2000;
    // Mostly TCP and UDP port ranges, CIDRs all over the address space, all-protocol rules
    // only for single addresses (so few prefixes hide the others).
    let random_rule = |rng: &mut Rng, remote_group: Option<String>| {
        let p = match rng.below(20) {
            0..=11 => Protocol::TCP,
            12..=17 => Protocol::UDP,
            18 => Protocol::ICMP,
            _ => Protocol::All,
        };
        let range = random_range(rng, p);
        match remote_group {
            Some(g) => sg_group(p, range, &g),
            None => {
                let len = if p == Protocol::All {
                    32
                } else {
                    rng.pick(&[12, 16, 20, 24, 28, 32, 32])
                };
                let addr = Ipv4Addr::from(rng.next() as u32);
                sg_cidr(p, range, &Ipv4Network::new(addr, len).unwrap().to_string())
            }
        }
    };
    for g in 0..groups {
        let mut rules = [Vec::new(), Vec::new()];
        for list in &mut rules {
            for _ in 0..25 {
                let remote = rng.chance(20).then(|| format!("sg-{}", rng.below(groups)));
                list.push(random_rule(&mut rng, remote));
            }
        }
        let [inbound, outbound] = rules;
        w.groups
            .push(group(&format!("sg-{g}"), "vpc-1", inbound, outbound));
    }
    // One endpoint reached by 1 000 rules through its groups.
    let mut big = Vec::new();
    for g in 0..5 {
        let rules = (0..200).map(|_| random_rule(&mut rng, None)).collect();
        let outbound = (0..200).map(|_| random_rule(&mut rng, None)).collect();
        w.groups
            .push(group(&format!("sg-big{g}"), "vpc-1", rules, outbound));
        big.push(format!("sg-big{g}"));
    }
    // Every endpoint is in sg-all, which every 100th group references: those policies hold
    // a /32 per endpoint.
    w.groups.push(group("sg-all", "vpc-1", vec![], vec![]));
    for g in (0..groups).step_by(100) {
        w.groups[g].inbound[0] = sg_group(Protocol::TCP, Some((22, 22)), "sg-all");
    }
    for e in 0..5000u32 {
        let mut gs: Vec<String> = (0..1 + rng.below(4))
            .map(|_| format!("sg-{}", rng.below(groups)))
            .collect();
        gs.push("sg-all".into());
        w.endpoints.push(EndpointRef {
            id: format!("i-{e}"),
            vpc: "vpc-1".into(),
            subnet: "subnet-1".into(),
            ip: Ipv4Addr::from(0x0a00_0000 + 4 + e),
            security_groups: gs,
            local: e < 200,
        });
    }
    w.endpoints.push(EndpointRef {
        id: "i-big".into(),
        vpc: "vpc-1".into(),
        subnet: "subnet-1".into(),
        ip: ip("10.0.200.1"),
        security_groups: big,
        local: true,
    });
    let rules: usize = w
        .groups
        .iter()
        .map(|g| g.inbound.len() + g.outbound.len())
        .sum();
    let start = std::time::Instant::now();
    let c = w.compile().unwrap();
    let compiled = start.elapsed();
    let mut addr = 0;
    let mut ports = 0;
    for (i, t) in c.sg_sets.values().enumerate() {
        let (a, p) = t.entries(i as u32 + 1);
        addr += a.len();
        ports += p.len();
    }
    let total = start.elapsed();
    eprintln!(
        "{rules} rules, {} groups, {} endpoints ({} local, {} sets): compile {compiled:?}, \
         with entries {total:?}: {addr} address and {ports} port entries",
        w.groups.len(),
        w.endpoints.len(),
        c.endpoints.len(),
        c.sg_sets.len()
    );
    let referencing: Vec<_> = c
        .sg_sets
        .iter()
        .filter(|(k, _)| {
            k.iter().any(|g| {
                g.strip_prefix("sg-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n % 100 == 0)
            })
        })
        .map(|(k, t)| (k.clone(), t.addr.len()))
        .collect();
    eprintln!("sets referencing sg-all: {referencing:?}");
    let big = &c.sg_sets[&c.endpoints["i-big"].sg_set];
    eprintln!(
        "i-big: {} address entries, {} port entries",
        big.addr.len(),
        big.ports.len()
    );
}
