//! Aggregation of flow events into records: per (flow log, interface, direction, 5-tuple,
//! action, rule, reason) over each flow log's window, then AWS version-2 records with the
//! rule that decided and the drop reason. Pure (no maps, no threads): the consumer feeds
//! it events and asks for the records that are due.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use dataplane_common::{
    DropReason,
    flowlog::{DECISION_NONE, FLOW_ACCEPT, FlowEvent},
    overlay::v4,
};

use super::{
    clock::MonoToWall,
    record::{self, FlowRecord},
    rules::RuleBook,
    stats::FlowLogStats,
};
use crate::overlay::{OverlayState, flowlog::FlowLogDoc, statefile::StateFile};

/// A local endpoint inside at least one flow log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Instance id.
    pub instance: String,
    /// Subnet.
    pub subnet: String,
    /// VPC.
    pub vpc: String,
    /// Its security groups (the VPC's default group when it names none).
    pub groups: Vec<String>,
    /// Its subnet's network ACL.
    pub acl: Option<String>,
    /// Indexes into [`FlowContext::flow_logs`] of the flow logs covering it.
    pub flow_logs: Vec<usize>,
}

/// What the aggregator needs of the desired state: the flow logs and the logged local
/// endpoints by port ifindex, and the security groups to name rules. Rebuilt by the agent
/// after each pass.
#[derive(Clone, Debug, Default)]
pub struct FlowContext {
    /// This host.
    pub host: String,
    /// The flow logs of the document.
    pub flow_logs: Vec<FlowLogDoc>,
    /// Logged local endpoints by host-side port ifindex.
    pub endpoints: HashMap<u32, LocalEndpoint>,
    /// Security groups and members, to name the rule that admitted a flow.
    pub rules: Arc<RuleBook>,
}

impl FlowContext {
    /// From the document and this host's view of it (local endpoints carry their ifindex).
    pub fn build(doc: &StateFile, state: &OverlayState, host: &str) -> Self {
        let rules = RuleBook::build(doc);
        let mut endpoints = HashMap::new();
        for ep in &state.endpoints {
            let Some(ifindex) = ep.ifindex.filter(|_| ep.host == host) else {
                continue;
            };
            let Some(subnet) = doc.subnets.iter().find(|s| s.id == ep.subnet) else {
                continue;
            };
            let flow_logs: Vec<usize> = doc
                .flow_logs
                .iter()
                .enumerate()
                .filter(|(_, f)| f.covers(&subnet.vpc, &subnet.id))
                .map(|(i, _)| i)
                .collect();
            if flow_logs.is_empty() || !ep.id.starts_with("i-") {
                continue;
            }
            let own = doc
                .endpoints
                .iter()
                .find(|d| d.id == ep.id)
                .map(|d| d.security_groups.clone())
                .unwrap_or_default();
            let groups = rules.groups_of(&own, &subnet.vpc);
            endpoints.insert(
                ifindex,
                LocalEndpoint {
                    instance: ep.id.clone(),
                    subnet: subnet.id.clone(),
                    vpc: subnet.vpc.clone(),
                    groups,
                    acl: subnet.network_acl.clone(),
                    flow_logs,
                },
            );
        }
        FlowContext {
            host: host.to_owned(),
            flow_logs: doc.flow_logs.clone(),
            endpoints,
            rules: Arc::new(rules),
        }
    }

    /// Whether two contexts log the same things the same way (rule names aside): when
    /// they do, a new context does not cut the running windows short.
    pub fn same_config(&self, other: &FlowContext) -> bool {
        self.host == other.host
            && self.flow_logs == other.flow_logs
            && self.endpoints == other.endpoints
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    ifindex: u32,
    egress: bool,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    proto: u8,
    accepted: bool,
    reason: u32,
}

/// One record's counts. AWS keeps one record per (interface, 5-tuple, action) per window, so
/// the rules are not part of the key: a record names the rules of its first packet that the
/// security group evaluated (a connection's SYN), or `tracked` when conntrack admitted
/// every packet of it in this window.
#[derive(Clone, Copy, Debug)]
struct Value {
    packets: u64,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
    /// AWS's flags ([`aws_tcp_flags`]), OR-ed over the packets.
    tcp_flags: u8,
    /// Every packet so far was admitted by conntrack.
    tracked: bool,
    /// The deciding security-group rule reference and ACL rule (see `Decision`).
    sg: u32,
    acl: u32,
}

/// The TCP flags AWS flow logs report for one packet: FIN 1, SYN 2, RST 4, and SYN-ACK as
/// 18; ACK, PSH and URG alone are not reported (0). Records OR them over their packets.
pub fn aws_tcp_flags(flags: u8) -> u8 {
    const SYN_ACK: u8 = 0x12;
    let basic = flags & 0x07;
    if flags & SYN_ACK == SYN_ACK {
        basic | 0x10
    } else {
        basic
    }
}

#[derive(Debug, Default)]
struct Table {
    /// CLOCK_MONOTONIC start of the running window.
    start_ns: u64,
    /// Host losses counted when the window started.
    lost_at_start: u64,
    entries: HashMap<Key, Value>,
}

/// The aggregator.
#[derive(Debug)]
pub struct Aggregator {
    ctx: Arc<FlowContext>,
    tables: Vec<Table>,
    /// Entries held (all tables).
    held: usize,
    max_entries: usize,
    stats: Arc<FlowLogStats>,
}

/// Entries held across all windows before events are dropped (and counted): bounds the
/// agent's memory under a flood of distinct flows.
pub const DEFAULT_MAX_ENTRIES: usize = 1 << 20;

/// How one side (the sender's egress or the receiver's ingress) saw the packet:
/// `(accepted, reason)`, or `None` when the packet never reached that side.
fn side(ev: &FlowEvent, egress: bool) -> Option<(bool, u32)> {
    if ev.action == FLOW_ACCEPT {
        return Some((true, 0));
    }
    match DropReason::from_u32(ev.reason) {
        // The receiver's rules dropped it: the sender's own rules admitted it.
        Some(DropReason::SgIngress | DropReason::AclIngress) if egress => Some((true, 0)),
        // The sender's rules dropped it: the receiver never saw it.
        Some(DropReason::SgEgress | DropReason::AclEgress) if !egress => None,
        _ => Some((false, ev.reason)),
    }
}

fn is_icmp(proto: u8) -> bool {
    proto == 1
}

impl Aggregator {
    /// An aggregator over `ctx`, windows starting at `now_ns` (CLOCK_MONOTONIC).
    pub fn new(ctx: Arc<FlowContext>, stats: Arc<FlowLogStats>, now_ns: u64) -> Self {
        let mut a = Aggregator {
            ctx: Arc::new(FlowContext::default()),
            tables: Vec::new(),
            held: 0,
            max_entries: DEFAULT_MAX_ENTRIES,
            stats,
        };
        a.reset(ctx, now_ns);
        a
    }

    /// Caps the entries held (tests, benches).
    pub fn with_max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// The context in use.
    pub fn context(&self) -> &Arc<FlowContext> {
        &self.ctx
    }

    fn reset(&mut self, ctx: Arc<FlowContext>, now_ns: u64) {
        let lost = self.stats.lost();
        self.tables = (0..ctx.flow_logs.len())
            .map(|_| Table {
                start_ns: now_ns,
                lost_at_start: lost,
                entries: HashMap::new(),
            })
            .collect();
        self.held = 0;
        self.ctx = ctx;
    }

    /// Switches to a new context. When it logs something else, the running windows end
    /// now and their records are returned.
    pub fn set_context(
        &mut self,
        ctx: Arc<FlowContext>,
        now_ns: u64,
        clock: &MonoToWall,
    ) -> Vec<FlowRecord> {
        if self.ctx.same_config(&ctx) {
            self.ctx = ctx;
            return Vec::new();
        }
        let out = self.flush(now_ns, clock, true);
        self.reset(ctx, now_ns);
        out
    }

    /// Counts one event into every flow log that covers its interfaces.
    pub fn add(&mut self, ev: &FlowEvent) {
        for (ifindex, egress) in [(ev.out_ifindex, true), (ev.in_ifindex, false)] {
            if ifindex == 0 {
                continue;
            }
            let Some(ep) = self.ctx.endpoints.get(&ifindex) else {
                self.stats.unmatched.fetch_add(1, Relaxed);
                continue;
            };
            let Some((accepted, reason)) = side(ev, egress) else {
                continue;
            };
            let d = &ev.decision;
            let (sg, acl) = if egress {
                (d.sg_out, d.acl_out)
            } else {
                (d.sg_in, d.acl_in)
            };
            let key = Key {
                ifindex,
                egress,
                src: ev.src,
                dst: ev.dst,
                src_port: ev.src_port,
                dst_port: ev.dst_port,
                proto: ev.proto,
                accepted,
                reason,
            };
            let tracked = d.tracked != 0;
            let flags = aws_tcp_flags(d.tcp_flags);
            for &f in &ep.flow_logs {
                let Some(fl) = self.ctx.flow_logs.get(f) else {
                    continue;
                };
                if !fl.traffic_type.wants(accepted) {
                    continue;
                }
                let Some(table) = self.tables.get_mut(f) else {
                    continue;
                };
                match table.entries.get_mut(&key) {
                    Some(v) => {
                        v.packets += 1;
                        v.bytes += u64::from(ev.bytes);
                        v.first_ns = v.first_ns.min(ev.ts_ns);
                        v.last_ns = v.last_ns.max(ev.ts_ns);
                        v.tcp_flags |= flags;
                        if v.tracked && !tracked {
                            (v.tracked, v.sg, v.acl) = (false, sg, acl);
                        }
                    }
                    None if self.held >= self.max_entries => {
                        self.stats.agent_dropped.fetch_add(1, Relaxed);
                    }
                    None => {
                        self.held += 1;
                        table.entries.insert(
                            key,
                            Value {
                                packets: 1,
                                bytes: u64::from(ev.bytes),
                                first_ns: ev.ts_ns,
                                last_ns: ev.ts_ns,
                                tcp_flags: flags,
                                tracked,
                                sg,
                                acl,
                            },
                        );
                    }
                }
            }
        }
    }

    /// The earliest CLOCK_MONOTONIC time a window ends (none: no flow logs).
    pub fn next_due(&self) -> Option<u64> {
        self.tables
            .iter()
            .zip(&self.ctx.flow_logs)
            .map(|(t, f)| t.start_ns + u64::from(f.window_secs.max(1)) * 1_000_000_000)
            .min()
    }

    /// Ends the windows that are over at `now_ns` (all of them with `all`) and returns
    /// their records. Windows with losses since they started mark every record SKIPDATA
    /// with the count, and produce a SKIPDATA record even without traffic.
    pub fn flush(&mut self, now_ns: u64, clock: &MonoToWall, all: bool) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        let lost = self.stats.lost();
        let ctx = Arc::clone(&self.ctx);
        for (f, fl) in ctx.flow_logs.iter().enumerate() {
            let Some(table) = self.tables.get_mut(f) else {
                continue;
            };
            let window = u64::from(fl.window_secs.max(1)) * 1_000_000_000;
            if !all && now_ns < table.start_ns + window {
                continue;
            }
            let skipped = lost.saturating_sub(table.lost_at_start);
            let entries = std::mem::take(&mut table.entries);
            self.held -= entries.len();
            // Stable output: sorted by interface, direction, then first packet.
            let mut rows: Vec<(Key, Value)> = entries.into_iter().collect();
            rows.sort_by_key(|(k, v)| (k.ifindex, !k.egress, v.first_ns, k.src, k.dst));
            for (k, v) in rows {
                let Some(ep) = ctx.endpoints.get(&k.ifindex) else {
                    continue;
                };
                out.push(build_record(&ctx, fl, ep, &k, &v, clock, skipped));
            }
            if skipped > 0 && !out.iter().any(|r| r.flow_log_id == fl.id) {
                let t = clock.unix_secs(now_ns);
                out.push(FlowRecord {
                    version: 2,
                    account_id: fl.account.clone(),
                    interface_id: "-".into(),
                    srcaddr: String::new(),
                    dstaddr: String::new(),
                    srcport: 0,
                    dstport: 0,
                    protocol: 0,
                    packets: 0,
                    bytes: 0,
                    start: clock.unix_secs(table.start_ns),
                    end: t,
                    action: String::new(),
                    log_status: record::SKIPDATA.into(),
                    vpc_id: fl.vpc.clone(),
                    subnet_id: String::new(),
                    instance_id: String::new(),
                    tcp_flags: 0,
                    flow_direction: String::new(),
                    rule: String::new(),
                    reason: String::new(),
                    flow_log_id: fl.id.clone(),
                    host_id: ctx.host.clone(),
                    skipped_events: skipped,
                });
            }
            table.start_ns = now_ns;
            table.lost_at_start = lost;
        }
        self.stats.records.fetch_add(out.len() as u64, Relaxed);
        out
    }

    /// Entries held now (all windows).
    pub fn held(&self) -> usize {
        self.held
    }
}

fn build_record(
    ctx: &FlowContext,
    fl: &FlowLogDoc,
    ep: &LocalEndpoint,
    k: &Key,
    v: &Value,
    clock: &MonoToWall,
    skipped: u64,
) -> FlowRecord {
    FlowRecord {
        version: 2,
        account_id: fl.account.clone(),
        interface_id: record::interface_id(&ep.instance),
        srcaddr: Ipv4Addr::from(v4(&k.src)).to_string(),
        dstaddr: Ipv4Addr::from(v4(&k.dst)).to_string(),
        // AWS reports no ports for ICMP (the type and code are in the key, so requests and
        // replies stay apart).
        srcport: if is_icmp(k.proto) { 0 } else { k.src_port },
        dstport: if is_icmp(k.proto) { 0 } else { k.dst_port },
        protocol: k.proto,
        packets: v.packets,
        bytes: v.bytes,
        start: clock.unix_secs(v.first_ns),
        end: clock.unix_secs(v.last_ns),
        action: if k.accepted { "ACCEPT" } else { "REJECT" }.into(),
        log_status: if skipped > 0 {
            record::SKIPDATA
        } else {
            record::OK
        }
        .into(),
        vpc_id: ep.vpc.clone(),
        subnet_id: ep.subnet.clone(),
        instance_id: ep.instance.clone(),
        tcp_flags: v.tcp_flags,
        flow_direction: if k.egress { "egress" } else { "ingress" }.into(),
        rule: rule_text(ctx, ep, k, v),
        reason: DropReason::from_u32(k.reason)
            .map(|r| r.name().to_owned())
            .unwrap_or_default(),
        flow_log_id: fl.id.clone(),
        host_id: ctx.host.clone(),
        skipped_events: skipped,
    }
}

/// The rule that decided, as text.
fn rule_text(ctx: &FlowContext, ep: &LocalEndpoint, k: &Key, v: &Value) -> String {
    let dir = if k.egress { "egress" } else { "ingress" };
    let groups = if ep.groups.is_empty() {
        "security groups".to_owned()
    } else {
        ep.groups.join(",")
    };
    let acl = ep.acl.as_deref().unwrap_or("acl");
    let acl_rule = |n: u32| {
        if n == 0 {
            "*".to_owned()
        } else {
            n.to_string()
        }
    };
    if !k.accepted {
        return match DropReason::from_u32(k.reason) {
            Some(DropReason::SgEgress | DropReason::SgIngress) => {
                format!("{groups} {dir}: no rule allows")
            }
            Some(DropReason::AclEgress | DropReason::AclIngress) if v.acl != DECISION_NONE => {
                format!("{acl} rule {} deny", acl_rule(v.acl))
            }
            _ => String::new(),
        };
    }
    let mut parts = Vec::new();
    if v.tracked {
        parts.push("tracked".to_owned());
    } else if v.sg != DECISION_NONE {
        let remote = Ipv4Addr::from(v4(if k.egress { &k.dst } else { &k.src }));
        let named = ctx
            .rules
            .admitting(&ep.groups, k.egress, remote, k.proto, k.dst_port);
        parts.push(named.unwrap_or_else(|| format!("{groups} {dir} rule #{}", v.sg)));
    }
    if v.acl != DECISION_NONE {
        parts.push(format!("{acl} rule {} allow", acl_rule(v.acl)));
    }
    parts.join("; ")
}

/// Groups records by flow log (for the per-flow-log files).
pub fn by_flow_log(records: &[FlowRecord]) -> BTreeMap<&str, Vec<&FlowRecord>> {
    let mut out: BTreeMap<&str, Vec<&FlowRecord>> = BTreeMap::new();
    for r in records {
        out.entry(r.flow_log_id.as_str()).or_default().push(r);
    }
    out
}
