//! The agent's side of `vpc trace`: one hop of a packet trace on this host.
//!
//! The control plane sends a [`pb::TraceHop`] over the exec channel. On the source host the
//! agent builds the synthetic frame the instance would send (its MAC and IP, the router MAC
//! as destination, a TCP SYN, a UDP datagram or an ICMP echo request) and runs the live
//! port program of the instance's port on it; on the destination host it runs the underlay's
//! TC ingress program on the encapsulated frame the first hop produced. Both runs are in
//! trace mode (`TRACE_MARK`): the programs change no state and describe each stage with a
//! `TraceEvent`, which [`render`] turns into readable stages using the desired-state document
//! (instance, VPC, host, ACL and security-group names).
//!
//! Everything but the program run itself is pure and unit-tested here.

use std::{collections::BTreeMap, net::Ipv4Addr};

use controlplane::{
    overlay::statefile::{StateFile, parse_mac},
    policy::model::{AclAction, Protocol},
};
use dataplane_common::{
    DropReason,
    port::Forward,
    stats::Action,
    trace::{TraceEvent, TraceStage},
};
use vpc_proto::v1 as pb;

/// IP protocol numbers a trace can use.
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// ICMP echo request type (the "port" security groups and ACLs match for ICMP).
const ICMP_ECHO: u8 = 8;
/// Identifier of the traced ICMP echo.
const ICMP_ID: u16 = 0x7ace;

/// The synthetic packet of a source hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    /// [`PROTO_TCP`], [`PROTO_UDP`] or [`PROTO_ICMP`].
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Protocol name -> number (tcp, udp, icmp).
pub fn proto_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(PROTO_TCP),
        "udp" => Some(PROTO_UDP),
        "icmp" => Some(PROTO_ICMP),
        _ => None,
    }
}

/// The frame of a source hop, checked.
pub fn spec_from_hop(hop: &pb::TraceHop) -> Result<FrameSpec, String> {
    let mac = |field: &str, text: &str| {
        parse_mac(text).ok_or_else(|| format!("{field} {text:?} is not a MAC address"))
    };
    let ip = |field: &str, text: &str| {
        text.parse::<Ipv4Addr>()
            .map_err(|_| format!("{field} {text:?} is not an IPv4 address"))
    };
    let proto = proto_number(&hop.protocol)
        .ok_or_else(|| format!("protocol {:?} is not tcp, udp or icmp", hop.protocol))?;
    let port = |field: &str, p: u32| u16::try_from(p).map_err(|_| format!("{field} {p} > 65535"));
    Ok(FrameSpec {
        src_mac: mac("src_mac", &hop.src_mac)?,
        dst_mac: mac("dst_mac", &hop.dst_mac)?,
        src_ip: ip("src_ip", &hop.src_ip)?,
        dst_ip: ip("dst_ip", &hop.dst_ip)?,
        proto,
        src_port: port("src_port", hop.src_port)?,
        dst_port: port("dst_port", hop.dst_port)?,
    })
}

/// The Internet checksum of `data` (RFC 1071) added to `sum`, folded and complemented.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP pseudo-header's sum.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in [src.octets(), dst.octets()] {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        sum += u32::from(u16::from_be_bytes([pair[2], pair[3]]));
    }
    sum + u32::from(proto) + len as u32
}

/// The Ethernet frame an instance would send for `spec`: a TCP SYN (window 64240, no
/// options), a UDP datagram with an 8-byte payload or an ICMP echo request; IPv4 with DF,
/// TTL 64, valid checksums.
pub fn build_frame(spec: &FrameSpec) -> Vec<u8> {
    let l4: Vec<u8> = match spec.proto {
        PROTO_TCP => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&spec.src_port.to_be_bytes());
            t[2..4].copy_from_slice(&spec.dst_port.to_be_bytes());
            t[4..8].copy_from_slice(&0x7ace_0001u32.to_be_bytes()); // sequence number
            t[12] = 5 << 4; // data offset: 5 words
            t[13] = 0x02; // SYN
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            let c = checksum(pseudo_sum(spec.src_ip, spec.dst_ip, PROTO_TCP, t.len()), &t);
            t[16..18].copy_from_slice(&c.to_be_bytes());
            t
        }
        PROTO_UDP => {
            let mut u = vec![0u8; 8];
            u.extend_from_slice(b"vpctrace");
            u[0..2].copy_from_slice(&spec.src_port.to_be_bytes());
            u[2..4].copy_from_slice(&spec.dst_port.to_be_bytes());
            let len = u.len() as u16;
            u[4..6].copy_from_slice(&len.to_be_bytes());
            let c = checksum(pseudo_sum(spec.src_ip, spec.dst_ip, PROTO_UDP, u.len()), &u);
            // 0 means "no checksum" in UDP: send its all-ones form.
            let c = if c == 0 { 0xffff } else { c };
            u[6..8].copy_from_slice(&c.to_be_bytes());
            u
        }
        _ => {
            let mut i = vec![ICMP_ECHO, 0, 0, 0];
            i.extend_from_slice(&ICMP_ID.to_be_bytes());
            i.extend_from_slice(&1u16.to_be_bytes()); // sequence
            i.extend_from_slice(b"vpctrace");
            let c = checksum(0, &i);
            i[2..4].copy_from_slice(&c.to_be_bytes());
            i
        }
    };
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x7aceu16.to_be_bytes()); // identification
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = spec.proto;
    ip[12..16].copy_from_slice(&spec.src_ip.octets());
    ip[16..20].copy_from_slice(&spec.dst_ip.octets());
    let c = checksum(0, &ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + ip.len() + l4.len());
    frame.extend_from_slice(&spec.dst_mac);
    frame.extend_from_slice(&spec.src_mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// The `port::Forward` with this number.
fn forward_of(n: u32) -> Option<Forward> {
    [
        Forward::Drop,
        Forward::ArpReply,
        Forward::Local,
        Forward::Remote,
        Forward::FragNeeded,
        Forward::Balance,
    ]
    .into_iter()
    .find(|f| *f as u32 == n)
}

/// The IPv4 address of an IPv4-mapped 16-byte address.
fn v4(addr: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15])
}

/// The packet being traced, as the security-group and ACL explanations need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Destination port; ICMP: the type.
    pub port: u16,
}

impl Flow {
    /// The flow of an Ethernet/IPv4 frame (the inner frame after a VXLAN header when
    /// `vxlan`), if it parses.
    pub fn of_frame(frame: &[u8], vxlan: bool) -> Option<Flow> {
        // Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 = 50 bytes before the inner frame.
        let f = if vxlan { frame.get(50..)? } else { frame };
        if f.get(12..14)? != [0x08, 0x00] {
            return None;
        }
        let ihl = usize::from(f.get(14)? & 0x0f) * 4;
        let ip = f.get(14..14 + ihl)?;
        let l4 = f.get(14 + ihl..)?;
        let proto = ip[9];
        let port = match proto {
            PROTO_TCP | PROTO_UDP => u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
            _ => u16::from(*l4.first()?),
        };
        Some(Flow {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            proto,
            port,
        })
    }
}

/// What the desired-state document says about the names a trace shows.
#[derive(Clone, Debug, Default)]
pub struct Names {
    /// This host.
    pub host: String,
    /// VNI -> VPC id.
    pub vpcs: BTreeMap<u32, String>,
    /// (VNI, address) -> endpoint (instance) id.
    pub endpoints: BTreeMap<(u32, Ipv4Addr), String>,
    /// Local port ifindex -> endpoint id.
    pub ports: BTreeMap<u32, String>,
    /// VTEP -> host id.
    pub vteps: BTreeMap<Ipv4Addr, String>,
    /// Endpoint id -> (its subnet's ACL, its security groups).
    pub policy_of: BTreeMap<String, (Option<String>, Vec<String>)>,
    /// VPC id -> its default security group (used by endpoints naming none).
    pub default_sg: BTreeMap<String, String>,
    /// The document's ACLs.
    pub acls: BTreeMap<String, controlplane::policy::model::NetworkAcl>,
    /// Security-group policy id -> the rules behind its references (what the datapath
    /// reports), when the agent has them.
    pub sg_rules: BTreeMap<u32, controlplane::policy::SgRuleIndex>,
    /// The document's rules and group members, to name a rule when no reference resolves.
    pub rules: controlplane::flowlogs::RuleBook,
}

impl Names {
    /// From the document, for `host`; `ifindex` resolves a local port's name.
    pub fn new(doc: &StateFile, host: &str, ifindex: impl Fn(&str) -> Option<u32>) -> Names {
        let vni_of: BTreeMap<&str, u32> = doc.vpcs.iter().map(|v| (v.id.as_str(), v.vni)).collect();
        let subnet_of: BTreeMap<&str, (&str, Option<&String>)> = doc
            .subnets
            .iter()
            .map(|s| (s.id.as_str(), (s.vpc.as_str(), s.network_acl.as_ref())))
            .collect();
        let mut n = Names {
            host: host.to_owned(),
            vpcs: doc.vpcs.iter().map(|v| (v.vni, v.id.clone())).collect(),
            vteps: doc.hosts.iter().map(|h| (h.vtep, h.id.clone())).collect(),
            acls: doc
                .network_acls
                .iter()
                .map(|a| (a.id.clone(), a.clone()))
                .collect(),
            default_sg: doc
                .security_groups
                .iter()
                .filter(|g| g.default)
                .map(|g| (g.vpc.clone(), g.id.clone()))
                .collect(),
            rules: controlplane::flowlogs::RuleBook::build(doc),
            ..Names::default()
        };
        for e in &doc.endpoints {
            let Some((vpc, acl)) = subnet_of.get(e.subnet.as_str()) else {
                continue;
            };
            if let Some(vni) = vni_of.get(vpc) {
                n.endpoints.insert((*vni, e.ip), e.id.clone());
            }
            let groups = if e.security_groups.is_empty() {
                n.default_sg.get(*vpc).cloned().into_iter().collect()
            } else {
                e.security_groups.clone()
            };
            n.policy_of
                .insert(e.id.clone(), (acl.map(|a| (*a).clone()), groups));
            if e.host == host {
                let name = e
                    .ifname
                    .clone()
                    .unwrap_or_else(|| controlplane::compute::host_ifname(&e.id));
                if let Some(i) = ifindex(&name) {
                    n.ports.insert(i, e.id.clone());
                }
            }
        }
        n
    }

    fn vpc(&self, vni: u32) -> String {
        self.vpcs
            .get(&vni)
            .map(|v| format!("{v} (vni {vni})"))
            .unwrap_or_else(|| format!("vni {vni}"))
    }

    fn endpoint(&self, vni: u32, ip: Ipv4Addr) -> String {
        match self.endpoints.get(&(vni, ip)) {
            Some(id) => format!("{id} ({ip})"),
            None => ip.to_string(),
        }
    }

    fn vtep(&self, ip: Ipv4Addr) -> String {
        match self.vteps.get(&ip) {
            Some(h) => format!("host {h} (vtep {ip})"),
            None => format!("vtep {ip}"),
        }
    }
}

fn ports_text(proto: Protocol, from: Option<u16>, to: Option<u16>) -> String {
    match (from, to) {
        (Some(f), Some(t)) if f == t => format!("{proto} {f}"),
        (Some(f), Some(t)) => format!("{proto} {f}-{t}"),
        _ => proto.to_string(),
    }
}

/// The first rule of `endpoint`'s security groups that admits `flow` (inbound: remote is the
/// source; outbound: the destination), as "sg-... ingress tcp 443 from 10.0.0.0/16": the
/// flow logs' naming (`flowlogs::RuleBook`, groups in the policy compiler's order), used
/// when the datapath's rule reference cannot be resolved. The kernel decides with a union of
/// all rules, so any matching rule explains the allow.
pub fn sg_rule_text(names: &Names, endpoint: &str, flow: &Flow, inbound: bool) -> Option<String> {
    let (_, groups) = names.policy_of.get(endpoint)?;
    let mut groups = groups.clone();
    groups.sort_unstable();
    groups.dedup();
    let remote = if inbound { flow.src } else { flow.dst };
    // The rule book matches ICMP like the datapath: the type in the high byte.
    let port = if flow.proto == 1 {
        flow.port << 8
    } else {
        flow.port
    };
    names
        .rules
        .admitting(&groups, !inbound, remote, flow.proto, port)
}

/// The ACL rule numbered `rule` in the list of `endpoint`'s subnet ACL, as "acl-...: rule
/// 100 deny tcp 22 from 0.0.0.0/0" (rule 0: the implicit deny).
pub fn acl_rule_text(names: &Names, endpoint: &str, rule: u32, inbound: bool) -> Option<String> {
    let (Some(acl_id), _) = names.policy_of.get(endpoint)? else {
        return None;
    };
    if rule == 0 {
        return Some(format!("{acl_id}: no rule matched (implicit deny)"));
    }
    let acl = names.acls.get(acl_id)?;
    let rules = if inbound { &acl.inbound } else { &acl.outbound };
    let r = rules.iter().find(|r| u32::from(r.rule) == rule)?;
    let action = match r.action {
        AclAction::Allow => "allow",
        AclAction::Deny => "deny",
    };
    let dir = if inbound { "from" } else { "to" };
    Some(format!(
        "{acl_id}: rule {rule} {action} {} {dir} {}",
        ports_text(r.protocol, r.from_port, r.to_port),
        r.cidr
    ))
}

/// One hop's outcome, rendered.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    pub stages: Vec<pb::TraceStageResult>,
    /// delivered, dropped, encapsulated, passed (to the host stack) or answered.
    pub verdict: String,
    pub drop_reason: String,
    pub next_vtep: String,
    pub delivered_to: String,
}

/// Which endpoints a hop involves (for rule texts): the sender when it is local (source
/// hop), the receiver when known.
#[derive(Clone, Debug, Default)]
pub struct HopContext {
    pub sender: Option<String>,
    pub flow: Option<Flow>,
}

/// Turns a hop's raw stage events into readable stages and its verdict.
pub fn render(events: &[TraceEvent], names: &Names, ctx: &HopContext) -> Rendered {
    let mut out = Rendered::default();
    let mut vni = 0u32;
    let mut tracked = false;
    let mut receiver: Option<String> = None;
    let host = names.host.clone();
    let mut push = |stage: &str, result: &str, detail: String| {
        out.stages.push(pb::TraceStageResult {
            host_id: host.clone(),
            stage: stage.into(),
            result: result.into(),
            detail,
        });
    };
    // The receiver is known from the flow's destination once the VNI is.
    let receiver_of = |vni: u32| -> Option<String> {
        let f = ctx.flow?;
        names.endpoints.get(&(vni, f.dst)).cloned().or_else(|| {
            // VNI not reported yet: the local endpoint with that address.
            names
                .endpoints
                .iter()
                .find(|((_, ip), id)| *ip == f.dst && names.ports.values().any(|p| p == *id))
                .map(|(_, id)| id.clone())
        })
    };
    let mut verdict = None;
    if ctx.sender.is_none() {
        receiver = receiver_of(0);
    }
    for e in events {
        let Some(stage) = TraceStage::from_u32(e.stage) else {
            push(
                "unknown",
                "",
                format!("stage {} ({} {} {} {})", e.stage, e.a, e.b, e.c, e.d),
            );
            continue;
        };
        match stage {
            TraceStage::Endpoint => {
                vni = e.a;
                receiver = receiver_of(vni);
                let who = ctx
                    .sender
                    .clone()
                    .or_else(|| receiver.clone())
                    .unwrap_or_else(|| "endpoint".into());
                push(
                    "endpoint",
                    "found",
                    format!("{who} in {} (policy {}, acl {})", names.vpc(vni), e.b, e.c),
                );
            }
            TraceStage::Route => {
                let addr = v4(&e.addr);
                // `a`: the port program's `port::Forward` decision.
                let (result, detail) = match forward_of(e.a) {
                    Some(Forward::Local) => (
                        "local",
                        format!(
                            "to {} on this host",
                            names
                                .ports
                                .get(&e.b)
                                .cloned()
                                .unwrap_or_else(|| format!("port {}", e.b))
                        ),
                    ),
                    Some(Forward::Remote) => ("remote", format!("via {}", names.vtep(addr))),
                    Some(Forward::Balance) => ("vip", "to a load balancer's VIP".into()),
                    Some(Forward::ArpReply) => ("arp_reply", "answered by the datapath".into()),
                    Some(Forward::FragNeeded) => (
                        "frag_needed",
                        "too big for the underlay with DF: ICMP fragmentation needed".into(),
                    ),
                    Some(Forward::Drop) => (
                        "drop",
                        DropReason::from_u32(e.c)
                            .map(|r| r.name().to_owned())
                            .unwrap_or_else(|| format!("reason {}", e.c)),
                    ),
                    None => ("other", format!("decision {} {addr}", e.a)),
                };
                push("route", result, detail);
            }
            TraceStage::Conntrack => {
                tracked = e.a == 1;
                if tracked {
                    push(
                        "conntrack",
                        "tracked",
                        format!(
                            "existing flow (TCP flags {:#04x}): security groups skipped",
                            e.b
                        ),
                    );
                } else {
                    push("conntrack", "new", "no tracked flow".into());
                }
            }
            TraceStage::SgEgress | TraceStage::SgIngress => {
                let inbound = stage == TraceStage::SgIngress;
                let name = if inbound { "sg_ingress" } else { "sg_egress" };
                let who = if inbound {
                    receiver.clone()
                } else {
                    ctx.sender.clone()
                };
                if e.a == dataplane_common::flowlog::DECISION_NONE || (tracked && e.a == 0) {
                    push(name, "skipped", "tracked: skipped".into());
                } else if e.a == 0 {
                    push(
                        name,
                        "deny",
                        format!(
                            "no rule of {} allows it (policy {})",
                            who.as_deref()
                                .and_then(|w| names.policy_of.get(w))
                                .map(|(_, g)| g.join(","))
                                .unwrap_or_else(|| "its groups".into()),
                            e.b
                        ),
                    );
                } else {
                    let remote = ctx.flow.map(|f| if inbound { f.src } else { f.dst });
                    // The rule the datapath names; else the first rule of the document
                    // that matches.
                    let text = names
                        .sg_rules
                        .get(&e.b)
                        .zip(remote)
                        .and_then(|(idx, r)| idx.decided(e.a, r))
                        .map(|r| r.description())
                        .or_else(|| {
                            who.as_deref()
                                .zip(ctx.flow.as_ref())
                                .and_then(|(w, f)| sg_rule_text(names, w, f, inbound))
                        })
                        .unwrap_or_else(|| format!("policy {} rule ref {}", e.b, e.a));
                    push(name, "allow", text);
                }
            }
            TraceStage::AclEgress | TraceStage::AclIngress => {
                let inbound = stage == TraceStage::AclIngress;
                let name = if inbound { "acl_ingress" } else { "acl_egress" };
                let who = if inbound {
                    receiver.clone()
                } else {
                    ctx.sender.clone()
                };
                let result = if e.b == 1 { "allow" } else { "deny" };
                let text = who
                    .as_deref()
                    .and_then(|w| acl_rule_text(names, w, e.a, inbound))
                    .unwrap_or_else(|| match e.a {
                        0 => format!("acl {}: no rule matched (implicit deny)", e.c),
                        r => format!("acl {}: rule {r} {result}", e.c),
                    });
                push(name, result, text);
            }
            TraceStage::LoadBalancer => {
                let backend = v4(&e.addr);
                receiver = names.endpoints.get(&(vni, backend)).cloned();
                let flow = if e.d == 1 {
                    "existing balanced flow"
                } else {
                    "new flow"
                };
                push(
                    "load_balancer",
                    "target",
                    format!(
                        "{}:{} (service {}, backend {}, {flow})",
                        names.endpoint(vni, backend),
                        e.c,
                        e.a,
                        e.b
                    ),
                );
            }
            TraceStage::Encap => {
                let vtep = v4(&e.addr);
                out.next_vtep = vtep.to_string();
                push(
                    "encap",
                    "vxlan",
                    format!("vni {} to {}", e.a, names.vtep(vtep)),
                );
            }
            TraceStage::Deliver => {
                let to = names
                    .ports
                    .get(&e.a)
                    .cloned()
                    .unwrap_or_else(|| format!("port {}", e.a));
                out.delivered_to = to.clone();
                push("deliver", "delivered", to);
            }
            TraceStage::CtBudget => {
                // `c`: 1 if the budget admits a new flow.
                let full = e.a != 0 && e.c == 0;
                push(
                    "ct_budget",
                    if full { "full" } else { "ok" },
                    format!("{} of {} entries used by {}", e.b, e.a, names.vpc(vni)),
                );
            }
            TraceStage::Verdict => verdict = Some((e.a, e.b)),
        }
    }
    let (verdict, reason) = match verdict {
        None => ("unknown".to_owned(), String::new()),
        Some((action, reason)) => {
            let reason_name = DropReason::from_u32(reason)
                .map(|r| r.name().to_owned())
                .unwrap_or_else(|| {
                    if reason == 0 {
                        String::new()
                    } else {
                        reason.to_string()
                    }
                });
            let v = match Action::from_u32(action) {
                Some(Action::Redirect | Action::Decap) => "delivered",
                Some(Action::Encap) => "encapsulated",
                Some(Action::Drop | Action::Aborted) => "dropped",
                Some(Action::Pass) => "passed",
                Some(Action::Reply) => "answered",
                None => "unknown",
            };
            (
                v.to_owned(),
                if v == "dropped" {
                    reason_name
                } else {
                    String::new()
                },
            )
        }
    };
    let detail = if reason.is_empty() {
        verdict.clone()
    } else {
        format!("dropped: {reason}")
    };
    push("verdict", &verdict, detail);
    out.verdict = verdict;
    out.drop_reason = reason;
    out
}

/// One program run in trace mode: what the datapath layer returns.
#[derive(Clone, Debug, Default)]
pub struct RawRun {
    /// The frame after the program (encapsulated, rewritten).
    pub data_out: Vec<u8>,
    /// The stage events, in order.
    pub events: Vec<TraceEvent>,
}

/// Which program a hop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `vpc_port` on an instance's port.
    Port,
    /// `vpc_tc_ingress` on the underlay.
    UnderlayIngress,
}

/// Runs `program` on `frame` in trace mode with the context's ifindex `ifindex`.
fn run_program(
    datapath: &controlplane::datapath::Datapath,
    events: &mut controlplane::datapath::TraceEvents,
    program: Program,
    ifindex: u32,
    frame: &[u8],
) -> Result<RawRun, String> {
    use controlplane::datapath::trace::{self, TraceProgram};
    let which = match program {
        Program::Port => TraceProgram::Port,
        Program::UnderlayIngress => TraceProgram::UnderlayIngress,
    };
    let prog = trace::program(datapath, which).map_err(|e| e.to_string())?;
    let run = trace::run(prog, events, ifindex, frame).map_err(|e| e.to_string())?;
    Ok(RawRun {
        data_out: run.data_out,
        events: run.events,
    })
}

/// This host, as a hop needs it.
pub struct Local<'a> {
    /// Host id.
    pub host: &'a str,
    /// The underlay interface (destination hops run its TC ingress program).
    pub underlay: &'a str,
    /// The VPC router's MAC (the destination MAC of frames instances send).
    pub router_mac: [u8; 6],
}

/// A trace hop waiting for the main loop (which owns the datapath) and where its result goes.
pub type HopRequest = (
    pb::TraceHop,
    tokio::sync::oneshot::Sender<pb::TraceHopResult>,
);

/// Runs one hop on this host: never fails (failures are the result's `verdict` "error"
/// with the reason in `drop_reason`).
pub fn run_hop(
    datapath: &controlplane::datapath::Datapath,
    events: Option<&mut controlplane::datapath::TraceEvents>,
    doc: Option<&StateFile>,
    local: &Local<'_>,
    sg_rules: impl Fn(u32) -> Option<controlplane::policy::SgRuleIndex>,
    hop: &pb::TraceHop,
) -> pb::TraceHopResult {
    let Local {
        host,
        underlay,
        router_mac,
    } = *local;
    let fail = |why: String| pb::TraceHopResult {
        verdict: "error".into(),
        drop_reason: why,
        ..Default::default()
    };
    let Some(doc) = doc else {
        return fail(format!("host {host} has no desired state yet"));
    };
    let ifindex = |name: &str| nix::net::if_::if_nametoindex(name).ok();
    let mut names = Names::new(doc, host, ifindex);
    let (program, ifindex, frame, ctx) = if hop.underlay_frame.is_empty() {
        let mut hop = hop.clone();
        if hop.dst_mac.is_empty() {
            // What the instance resolves its gateway to.
            hop.dst_mac = router_mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
        }
        let spec = match spec_from_hop(&hop) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let Some(port) = doc
            .endpoints
            .iter()
            .find(|e| e.id == hop.instance_id && e.host == host)
            .map(|e| {
                e.ifname
                    .clone()
                    .unwrap_or_else(|| controlplane::compute::host_ifname(&e.id))
            })
        else {
            return fail(format!(
                "instance {} has no port on host {host}",
                hop.instance_id
            ));
        };
        let Some(i) = ifindex(&port) else {
            return fail(format!(
                "the port {port} of instance {} does not exist (is it running?)",
                hop.instance_id
            ));
        };
        let frame = build_frame(&spec);
        let ctx = HopContext {
            sender: Some(hop.instance_id.clone()),
            flow: Flow::of_frame(&frame, false),
        };
        (Program::Port, i, frame, ctx)
    } else {
        let Some(i) = ifindex(underlay) else {
            return fail(format!("underlay interface {underlay} not found"));
        };
        let ctx = HopContext {
            sender: None,
            flow: Flow::of_frame(&hop.underlay_frame, true),
        };
        (Program::UnderlayIngress, i, hop.underlay_frame.clone(), ctx)
    };
    let Some(events) = events else {
        return fail(format!("host {host}'s datapath has no trace ring buffer"));
    };
    let raw = match run_program(datapath, events, program, ifindex, &frame) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for e in &raw.events {
        if (e.stage == TraceStage::SgEgress as u32 || e.stage == TraceStage::SgIngress as u32)
            && !names.sg_rules.contains_key(&e.b)
            && let Some(idx) = sg_rules(e.b)
        {
            names.sg_rules.insert(e.b, idx);
        }
    }
    let r = render(&raw.events, &names, &ctx);
    pb::TraceHopResult {
        frame_out: if r.verdict == "encapsulated" {
            raw.data_out
        } else {
            Vec::new()
        },
        stages: r.stages,
        verdict: r.verdict,
        drop_reason: r.drop_reason,
        next_vtep: r.next_vtep,
        delivered_to: r.delivered_to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::{packet::SlicePacket, parse};

    fn spec(proto: u8) -> FrameSpec {
        FrameSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0x76, 0x70, 0x63, 0, 1],
            src_ip: Ipv4Addr::new(10, 0, 1, 4),
            dst_ip: Ipv4Addr::new(10, 0, 2, 5),
            proto,
            src_port: 40000,
            dst_port: 443,
        }
    }

    /// A frame's IPv4 header and L4 checksums verify (sum to zero with the pseudo-header).
    fn checksums_verify(frame: &[u8]) {
        let ip = &frame[14..34];
        assert_eq!(checksum(0, ip), 0, "IPv4 header checksum");
        let l4 = &frame[34..];
        let sum = match ip[9] {
            PROTO_ICMP => checksum(0, l4),
            p => checksum(
                pseudo_sum(
                    Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                    Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
                    p,
                    l4.len(),
                ),
                l4,
            ),
        };
        assert_eq!(sum, 0, "L4 checksum of protocol {}", ip[9]);
    }

    #[test]
    fn frames_parse_as_the_datapath_parses_them_with_valid_checksums() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP] {
            let s = spec(proto);
            let frame = build_frame(&s);
            checksums_verify(&frame);
            assert_eq!(&frame[0..6], &s.dst_mac);
            assert_eq!(&frame[6..12], &s.src_mac);
            let parsed = parse::parse(&SlicePacket(&frame)).expect("parses");
            let flow = Flow::of_frame(&frame, false).unwrap();
            assert_eq!(
                (flow.src, flow.dst, flow.proto),
                (s.src_ip, s.dst_ip, proto)
            );
            match proto {
                PROTO_TCP => {
                    assert_eq!(flow.port, 443);
                    assert_eq!(frame[34 + 13], 0x02, "a SYN");
                }
                PROTO_UDP => assert_eq!(flow.port, 443),
                _ => assert_eq!(flow.port, u16::from(ICMP_ECHO)),
            }
            let _ = parsed;
        }
    }

    #[test]
    fn hops_are_checked() {
        let mut hop = pb::TraceHop {
            instance_id: "i-1".into(),
            src_mac: "02:00:00:00:00:01".into(),
            dst_mac: "02:76:70:63:00:01".into(),
            src_ip: "10.0.1.4".into(),
            dst_ip: "10.0.2.5".into(),
            protocol: "tcp".into(),
            src_port: 40000,
            dst_port: 443,
            ..Default::default()
        };
        assert_eq!(spec_from_hop(&hop).unwrap(), spec(PROTO_TCP));
        hop.protocol = "sctp".into();
        assert!(spec_from_hop(&hop).unwrap_err().contains("sctp"));
        hop.protocol = "udp".into();
        hop.dst_port = 70000;
        assert!(spec_from_hop(&hop).is_err());
        hop.dst_port = 53;
        hop.src_ip = "10.0.1".into();
        assert!(spec_from_hop(&hop).is_err());
    }

    fn doc() -> StateFile {
        serde_json::from_value(serde_json::json!({
            "vpcs": [{"id": "vpc-a", "vni": 7, "cidr": "10.0.0.0/16"}],
            "subnets": [
                {"id": "subnet-1", "vpc": "vpc-a", "cidr": "10.0.1.0/24", "network_acl": "acl-1"},
                {"id": "subnet-2", "vpc": "vpc-a", "cidr": "10.0.2.0/24", "network_acl": "acl-1"}
            ],
            "hosts": [{"id": "h1", "vtep": "192.0.2.1"}, {"id": "h2", "vtep": "192.0.2.2"}],
            "endpoints": [
                {"id": "i-src", "subnet": "subnet-1", "host": "h1", "ip": "10.0.1.4",
                 "mac": "02:00:00:00:00:01", "ifname": "portsrc", "security_groups": ["sg-web"]},
                {"id": "i-dst", "subnet": "subnet-2", "host": "h2", "ip": "10.0.2.5",
                 "mac": "02:00:00:00:00:02", "ifname": "portdst", "security_groups": ["sg-web"]}
            ],
            "security_groups": [{"id": "sg-web", "vpc": "vpc-a",
                "inbound": [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "10.9.0.0/16"},
                            {"protocol": "tcp", "from_port": 443, "to_port": 443, "cidr": "10.0.0.0/16"}]}],
            "network_acls": [{"id": "acl-1", "vpc": "vpc-a",
                "inbound": [{"rule": 90, "protocol": "tcp", "from_port": 22, "to_port": 22, "cidr": "0.0.0.0/0", "action": "deny"},
                            {"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"}],
                "outbound": [{"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"}]}]
        }))
        .unwrap()
    }

    fn ev(stage: TraceStage, a: u32, b: u32, c: u32, d: u32, addr: [u8; 4]) -> TraceEvent {
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12..].copy_from_slice(&addr);
        TraceEvent {
            stage: stage as u32,
            a,
            b,
            c,
            d,
            _pad: 0,
            addr: m,
        }
    }

    fn flow(port: u16) -> Flow {
        Flow {
            src: Ipv4Addr::new(10, 0, 1, 4),
            dst: Ipv4Addr::new(10, 0, 2, 5),
            proto: PROTO_TCP,
            port,
        }
    }

    #[test]
    fn a_source_hop_renders_endpoint_route_rules_and_encapsulation() {
        let names = Names::new(&doc(), "h1", |n| (n == "portsrc").then_some(11));
        assert_eq!(names.ports.get(&11).map(String::as_str), Some("i-src"));
        let events = [
            ev(TraceStage::Endpoint, 7, 1, 2, 0, [0; 4]),
            ev(
                TraceStage::Route,
                Forward::Remote as u32,
                0,
                0,
                0,
                [192, 0, 2, 2],
            ),
            ev(TraceStage::Conntrack, 0, 0, 0, 0, [0; 4]),
            ev(TraceStage::SgEgress, 3, 1, 0, 0, [0; 4]),
            ev(TraceStage::AclEgress, 100, 1, 2, 0, [0; 4]),
            ev(TraceStage::Encap, 7, 2, 0, 0, [192, 0, 2, 2]),
            ev(TraceStage::Verdict, Action::Encap as u32, 0, 0, 0, [0; 4]),
        ];
        let ctx = HopContext {
            sender: Some("i-src".into()),
            flow: Some(flow(443)),
        };
        let r = render(&events, &names, &ctx);
        let stages: Vec<(&str, &str)> = r
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.result.as_str()))
            .collect();
        assert_eq!(
            stages,
            [
                ("endpoint", "found"),
                ("route", "remote"),
                ("conntrack", "new"),
                ("sg_egress", "allow"),
                ("acl_egress", "allow"),
                ("encap", "vxlan"),
                ("verdict", "encapsulated"),
            ]
        );
        assert!(r.stages[0].detail.contains("i-src") && r.stages[0].detail.contains("vpc-a"));
        assert!(r.stages[1].detail.contains("host h2"), "{:?}", r.stages[1]);
        // No explicit outbound rules: the group's default rule allows all (AWS).
        assert_eq!(r.stages[3].detail, "sg-web egress all to 0.0.0.0/0");
        assert_eq!(r.stages[4].detail, "acl-1: rule 100 allow all to 0.0.0.0/0");
        assert_eq!(
            (r.verdict.as_str(), r.next_vtep.as_str()),
            ("encapsulated", "192.0.2.2")
        );
        assert!(r.stages.iter().all(|s| s.host_id == "h1"));
    }

    #[test]
    fn a_destination_hop_names_the_inbound_rule_or_the_drop() {
        let names = Names::new(&doc(), "h2", |n| (n == "portdst").then_some(21));
        let ctx = HopContext {
            sender: None,
            flow: Some(flow(443)),
        };
        let delivered = render(
            &[
                ev(TraceStage::Endpoint, 7, 1, 2, 0, [0; 4]),
                ev(TraceStage::AclIngress, 100, 1, 2, 0, [0; 4]),
                ev(TraceStage::SgIngress, 5, 1, 0, 0, [0; 4]),
                ev(TraceStage::Deliver, 21, 0, 0, 0, [0; 4]),
                ev(TraceStage::Verdict, Action::Decap as u32, 0, 0, 0, [0; 4]),
            ],
            &names,
            &ctx,
        );
        assert_eq!(delivered.verdict, "delivered");
        assert_eq!(delivered.delivered_to, "i-dst");
        assert_eq!(
            delivered.stages[2].detail,
            "sg-web ingress tcp 443 from 10.0.0.0/16"
        );
        // Port 22: the ACL's rule 90 denies.
        let ctx22 = HopContext {
            sender: None,
            flow: Some(flow(22)),
        };
        let denied = render(
            &[
                ev(TraceStage::Endpoint, 7, 1, 2, 0, [0; 4]),
                ev(TraceStage::AclIngress, 90, 2, 2, 0, [0; 4]),
                ev(
                    TraceStage::Verdict,
                    Action::Drop as u32,
                    DropReason::AclIngress as u32,
                    0,
                    0,
                    [0; 4],
                ),
            ],
            &names,
            &ctx22,
        );
        assert_eq!(
            (denied.verdict.as_str(), denied.drop_reason.as_str()),
            ("dropped", "acl_ingress")
        );
        assert_eq!(
            denied.stages[1].detail,
            "acl-1: rule 90 deny tcp 22 from 0.0.0.0/0"
        );
        // A security-group deny names the receiver's groups; a tracked flow skips them.
        let sg = render(
            &[
                ev(TraceStage::Endpoint, 7, 1, 2, 0, [0; 4]),
                ev(TraceStage::SgIngress, 0, 1, 0, 0, [0; 4]),
                ev(
                    TraceStage::Verdict,
                    Action::Drop as u32,
                    DropReason::SgIngress as u32,
                    0,
                    0,
                    [0; 4],
                ),
            ],
            &names,
            &ctx22,
        );
        assert_eq!(sg.drop_reason, "sg_ingress");
        assert!(sg.stages[1].detail.contains("sg-web"), "{:?}", sg.stages[1]);
        let tracked = render(
            &[
                ev(TraceStage::Conntrack, 1, 2, 0, 0, [0; 4]),
                ev(
                    TraceStage::SgIngress,
                    dataplane_common::flowlog::DECISION_NONE,
                    1,
                    0,
                    0,
                    [0; 4],
                ),
            ],
            &names,
            &ctx,
        );
        assert_eq!(tracked.stages[1].detail, "tracked: skipped");
        assert_eq!(tracked.verdict, "unknown");
    }

    #[test]
    fn the_datapaths_rule_reference_names_the_rule_when_known() {
        use controlplane::policy::{RuleRemote, SgRuleIndex, SgRuleInfo};
        let mut names = Names::new(&doc(), "h2", |_| None);
        names.sg_rules.insert(
            4,
            SgRuleIndex::new(
                vec![SgRuleInfo {
                    group: "sg-web".into(),
                    direction: dataplane_common::policy::INGRESS,
                    position: 1,
                    reference: 1,
                    proto: Some(PROTO_TCP),
                    ports: (443, 443),
                    remote: RuleRemote::Cidr("10.0.0.0/16".parse().unwrap()),
                }],
                BTreeMap::new(),
            ),
        );
        let ctx = HopContext {
            sender: None,
            flow: Some(flow(443)),
        };
        let r = render(
            &[
                ev(TraceStage::Endpoint, 7, 4, 2, 0, [0; 4]),
                ev(TraceStage::SgIngress, 1, 4, 0, 0, [0; 4]),
            ],
            &names,
            &ctx,
        );
        assert_eq!(
            r.stages[1].detail,
            "sg-web ingress tcp 443 from 10.0.0.0/16"
        );
    }

    #[test]
    fn a_destination_hop_without_an_endpoint_stage_finds_the_receiver_by_address() {
        let names = Names::new(&doc(), "h2", |n| (n == "portdst").then_some(21));
        let ctx = HopContext {
            sender: None,
            flow: Some(flow(443)),
        };
        let r = render(
            &[ev(TraceStage::SgIngress, 5, 1, 0, 0, [0; 4])],
            &names,
            &ctx,
        );
        assert_eq!(
            r.stages[0].detail,
            "sg-web ingress tcp 443 from 10.0.0.0/16"
        );
    }
}
