//! The agent's metrics endpoint (`--metrics-addr`, `GET /metrics`).
//!
//! Datapath counters are read from the pinned per-CPU maps at scrape time and summed over
//! CPUs (never cached): packets and bytes by hook and action and by hook and drop reason
//! (`ACTION_STATS`, `DROP_STATS`), per endpoint and per VPC by direction and action
//! (`ENDPOINT_STATS`) and drops by reason (`ENDPOINT_DROPS`), balanced connections per target
//! (`LB_FLOWS` entries per backend), conntrack budgets (`CT_BUDGET`) and flow-log events lost
//! (`FLOWLOG_LOST`). Maps a datapath does not have (an older build) are skipped.
//!
//! What the agent learns as it runs is recorded here by the main loop and the reconciler
//! (one call each, through [`get`]): the endpoints' names (VPC, subnet, instance, interface
//! by ifindex), target health, the last conntrack GC summary, revisions received and
//! applied, reconcile pass durations and network programming latency on this host (a
//! desired-state document received from the control plane -> applied to the maps).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant, SystemTime},
};

use controlplane::{
    datapath::{LbMaps, PinLayout, PinnedMaps, PolicyMaps, policy_maps::CtSummary},
    metrics::{Exposition, Kind, ProgrammingHistogram},
    overlay::statefile::StateFile,
};
use dataplane_common::{
    Action, Counter, DropReason,
    conntrack::CtBudget,
    maps,
    overlay::v4,
    stats::{DIR_EGRESS, DIR_INGRESS, EndpointStatsKey},
};

/// Names of one local endpoint (an instance's or a health-check node's port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointNames {
    /// VPC id.
    pub vpc: String,
    /// Subnet id.
    pub subnet: String,
    /// Instance (or health-check node) id.
    pub instance: String,
    /// Host-side interface name.
    pub interface: String,
}

/// What the agent recorded, copied for one scrape.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// This host's id.
    pub host: String,
    /// Local endpoints by port ifindex.
    pub endpoints: BTreeMap<u32, EndpointNames>,
    /// VPC id by VNI.
    pub vpcs: BTreeMap<u32, String>,
    /// Endpoint id by (VNI, address), every host's: names balanced targets.
    pub addresses: BTreeMap<(u32, Ipv4Addr), String>,
    /// Target health, last pass.
    pub targets: Vec<vpc_proto::v1::TargetHealthReport>,
    /// Conntrack at the last GC, and when.
    pub conntrack: Option<(CtSummary, SystemTime)>,
    /// Revision of the last document received.
    pub received: Option<i64>,
    /// Revision of the last document applied.
    pub applied: Option<i64>,
    /// Reconcile passes that failed.
    pub failed_passes: u64,
}

/// A collector another agent module registers (e.g. the flow-log pipeline's counters):
/// called at every scrape to add its families.
pub type Collector = Arc<dyn Fn(&mut Exposition) + Send + Sync>;

/// The agent's recorder.
#[derive(Default)]
pub struct AgentMetrics {
    recorded: Mutex<Recorded>,
    /// Per-VPC sums kept monotonic across scrapes.
    vpc_totals: Mutex<VpcTotals>,
    collectors: Mutex<Vec<Collector>>,
    /// Documents received and not applied yet: revision -> when.
    pending: Mutex<BTreeMap<i64, Instant>>,
    passes: ProgrammingHistogram,
    programming: ProgrammingHistogram,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::default);

/// The process's recorder.
pub fn get() -> &'static AgentMetrics {
    &METRICS
}

/// Documents waiting to be applied, at most (older ones are dropped unmeasured).
const MAX_PENDING: usize = 1024;

impl AgentMetrics {
    fn with<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        f(&mut self.recorded.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// This host's id.
    pub fn set_host(&self, host: &str) {
        self.with(|r| r.host = host.to_owned());
    }

    /// A desired-state document of `revision` arrived from the control plane.
    pub fn received(&self, revision: i64) {
        self.with(|r| r.received = Some(revision));
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() >= MAX_PENDING {
            p.pop_first();
        }
        p.entry(revision).or_insert_with(Instant::now);
    }

    /// The document of `revision` is applied: its programming latency is measured (from
    /// its arrival), and documents it superseded are forgotten.
    pub fn applied(&self, revision: i64) {
        self.with(|r| r.applied = Some(revision));
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = p.get(&revision) {
            self.programming.observe_duration(at.elapsed());
        }
        p.retain(|rev, _| *rev > revision);
    }

    /// A reconcile pass took `took` (`ok`: it succeeded).
    pub fn pass(&self, took: Duration, ok: bool) {
        self.passes.observe_duration(took);
        if !ok {
            self.with(|r| r.failed_passes += 1);
        }
    }

    /// The endpoints' names from the document of a pass; `ports` maps local interface names
    /// to ifindexes.
    pub fn set_topology(&self, doc: &StateFile, ports: &BTreeMap<String, u32>) {
        let (endpoints, vpcs, addresses) = topology(doc, ports);
        self.with(|r| {
            r.endpoints = endpoints;
            r.vpcs = vpcs;
            r.addresses = addresses;
        });
    }

    /// Target health of a pass.
    pub fn set_targets(&self, targets: &[vpc_proto::v1::TargetHealthReport]) {
        self.with(|r| r.targets = targets.to_vec());
    }

    /// The summary of a conntrack GC.
    pub fn set_conntrack(&self, s: &CtSummary) {
        self.with(|r| r.conntrack = Some((s.clone(), SystemTime::now())));
    }

    /// Adds a collector run at every scrape (after the datapath's families).
    pub fn register(&self, c: Collector) {
        self.collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
    }

    /// Runs the registered collectors into `e`.
    fn run_collectors(&self, e: &mut Exposition) {
        let all = self
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for c in all {
            c(e);
        }
    }

    fn recorded(&self) -> Recorded {
        self.with(|r| r.clone())
    }
}

/// The flow-log consumer's counters (`vpc_flowlog_*`): what it read, aggregated, wrote and
/// could not keep, so loss on the agent's side is as visible as the kernel's
/// (`vpc_flowlog_events_lost_total`).
pub fn flow_log_collector(stats: Arc<controlplane::flowlogs::FlowLogStats>) -> Collector {
    Arc::new(move |e: &mut Exposition| {
        let c = stats.snapshot();
        for (name, help, value) in [
            (
                "vpc_flowlog_events_total",
                "Flow events read from the FLOW_EVENTS ring buffer",
                c.events,
            ),
            (
                "vpc_flowlog_records_total",
                "Flow-log records produced (AWS v2 plus rule and reason)",
                c.records,
            ),
            (
                "vpc_flowlog_agent_dropped_total",
                "Flow events read but not aggregated (aggregation table full; the window is SKIPDATA)",
                c.agent_dropped,
            ),
            (
                "vpc_flowlog_stream_dropped_total",
                "Flow-log records not streamed to the control plane (queue full; still in the host's file)",
                c.stream_dropped,
            ),
        ] {
            e.counter(name, help, &[], value as f64);
        }
    })
}

type Topology = (
    BTreeMap<u32, EndpointNames>,
    BTreeMap<u32, String>,
    BTreeMap<(u32, Ipv4Addr), String>,
);

/// Endpoint names by ifindex, VPC ids by VNI and endpoint ids by (VNI, address). Pure.
pub fn topology(doc: &StateFile, ports: &BTreeMap<String, u32>) -> Topology {
    let vnis: BTreeMap<&str, u32> = doc.vpcs.iter().map(|v| (v.id.as_str(), v.vni)).collect();
    let subnet_vpc: BTreeMap<&str, &str> = doc
        .subnets
        .iter()
        .map(|s| (s.id.as_str(), s.vpc.as_str()))
        .collect();
    let mut endpoints = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    for e in &doc.endpoints {
        let vpc = subnet_vpc.get(e.subnet.as_str()).copied().unwrap_or("");
        if let Some(vni) = vnis.get(vpc) {
            addresses.insert((*vni, e.ip), e.id.clone());
        }
        let Some(ifname) = &e.ifname else { continue };
        if let Some(index) = ports.get(ifname) {
            endpoints.insert(
                *index,
                EndpointNames {
                    vpc: vpc.to_owned(),
                    subnet: e.subnet.clone(),
                    instance: e.id.clone(),
                    interface: ifname.clone(),
                },
            );
        }
    }
    let vpcs = doc.vpcs.iter().map(|v| (v.vni, v.id.clone())).collect();
    (endpoints, vpcs, addresses)
}

/// Serves the endpoint on `addr` (datapath pinned under `layout`); returns the bound address.
pub async fn serve(addr: std::net::SocketAddr, layout: PinLayout) -> Option<std::net::SocketAddr> {
    let layout = Arc::new(layout);
    let render: controlplane::metrics::http::Render = Arc::new(move || {
        let layout = Arc::clone(&layout);
        Box::pin(async move {
            // Map reads are syscalls (LB_FLOWS can hold 10^5 entries): off the main loop.
            tokio::task::spawn_blocking(move || render(&layout))
                .await
                .unwrap_or_else(|e| format!("# scrape failed: {e}\n"))
        })
    });
    controlplane::metrics::http::spawn(addr, render).await
}

/// What one scrape read from the maps (`None`: the map is absent or unreadable).
#[derive(Debug, Default)]
pub struct Reading {
    /// `ACTION_STATS` and `DROP_STATS`.
    pub stats: Option<controlplane::datapath::StatsSnapshot>,
    /// `ENDPOINT_STATS`.
    pub endpoint_stats: Option<Vec<(EndpointStatsKey, Counter)>>,
    /// `ENDPOINT_DROPS`: (ifindex, reason) -> counter.
    pub endpoint_drops: Option<BTreeMap<(u32, u32), Counter>>,
    /// `CT_BUDGET`.
    pub budgets: Option<Vec<(u32, CtBudget)>>,
    /// `FLOWLOG_LOST` summed over CPUs.
    pub flowlog_lost: Option<u64>,
    /// Balanced targets: (VNI, VIP, listener port, protocol, target address, target port,
    /// connections).
    pub lb_targets: Option<Vec<LbTargetFlows>>,
}

/// One backend and the balanced flows bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbTargetFlows {
    /// VNI of the load balancer's VPC.
    pub vni: u32,
    /// VIP.
    pub vip: Ipv4Addr,
    /// Listener port.
    pub listener_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Target address.
    pub target: Ipv4Addr,
    /// Target port.
    pub target_port: u16,
    /// Whether the backend is draining.
    pub draining: bool,
    /// `LB_FLOWS` entries bound to it.
    pub flows: u64,
}

fn not_read(what: &str, e: impl std::fmt::Display) {
    tracing::debug!(map = what, error = %e, "metrics: map not read");
}

/// Reads every map of the datapath under `layout`.
fn read(layout: &PinLayout) -> Reading {
    let mut r = Reading::default();
    match PinnedMaps::open(layout).and_then(|m| m.stats()) {
        Ok(s) => r.stats = Some(s),
        Err(e) => not_read(maps::ACTION_STATS, e),
    }
    match PolicyMaps::open(layout) {
        Ok(p) => {
            match p.endpoint_drops() {
                Ok(d) => r.endpoint_drops = Some(d),
                Err(e) => not_read(maps::ENDPOINT_DROPS, e),
            }
            match p.ct_budgets() {
                Ok(b) => r.budgets = Some(b.into_iter().collect()),
                Err(e) => not_read(maps::CT_BUDGET, e),
            }
        }
        Err(e) => not_read(maps::ENDPOINT_DROPS, e),
    }
    match controlplane::datapath::flow_maps::FlowCounters::open(layout) {
        Ok(f) => {
            match f.endpoint_stats() {
                Ok(m) => r.endpoint_stats = Some(m.into_iter().collect()),
                Err(e) => not_read(maps::ENDPOINT_STATS, e),
            }
            match f.flowlog_lost() {
                Ok(n) => r.flowlog_lost = Some(n),
                Err(e) => not_read(maps::FLOWLOG_LOST, e),
            }
        }
        Err(e) => not_read(maps::ENDPOINT_STATS, e),
    }
    match read_lb(layout) {
        Ok(t) => r.lb_targets = Some(t),
        Err(e) => not_read(maps::LB_FLOWS, e),
    }
    r
}

fn read_lb(
    layout: &PinLayout,
) -> Result<Vec<LbTargetFlows>, controlplane::datapath::DatapathError> {
    let lb = LbMaps::open(layout)?;
    let services: BTreeMap<u32, _> = lb.services()?.into_iter().map(|(k, v)| (v.id, k)).collect();
    let backends = lb.backends()?;
    let mut flows: BTreeMap<u32, u64> = BTreeMap::new();
    for (_, f) in lb.flows()? {
        if backends
            .get(&f.backend)
            .is_some_and(|b| b.service == f.service)
        {
            *flows.entry(f.backend).or_default() += 1;
        }
    }
    Ok(backends
        .iter()
        .filter_map(|(id, b)| {
            let s = services.get(&b.service)?;
            Some(LbTargetFlows {
                vni: s.vni,
                vip: Ipv4Addr::from(v4(&s.vip)),
                listener_port: s.port,
                proto: s.proto,
                target: Ipv4Addr::from(v4(&b.addr)),
                target_port: b.port,
                draining: b.state == dataplane_common::lb::LB_BACKEND_DRAINING,
                flows: flows.get(id).copied().unwrap_or(0),
            })
        })
        .collect())
}

/// One scrape: reads the maps, adds what the agent recorded.
fn render(layout: &PinLayout) -> String {
    let m = get();
    let mut e = Exposition::new();
    let mut totals = m.vpc_totals.lock().unwrap_or_else(|p| p.into_inner());
    families(&mut e, &read(layout), &m.recorded(), &mut totals);
    drop(totals);
    e.histogram(
        "vpc_agent_reconcile_duration_seconds",
        "Duration of the agent's reconcile passes (desired state -> maps, ports, instances)",
        &[],
        &m.passes.snapshot(),
    );
    e.histogram(
        "vpc_agent_programming_latency_seconds",
        "Network programming latency on this host: a desired-state document received from the control plane -> applied",
        &[],
        &m.programming.snapshot(),
    );
    m.run_collectors(&mut e);
    e.render()
}

fn direction_name(d: u32) -> &'static str {
    match d {
        DIR_INGRESS => "ingress",
        DIR_EGRESS => "egress",
        _ => "unknown",
    }
}

fn action_name(a: u32) -> &'static str {
    Action::from_u32(a).map_or("unknown", Action::name)
}

fn reason_name(r: u32) -> &'static str {
    DropReason::from_u32(r).map_or("unknown", |r| r.name())
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        p => p.to_string(),
    }
}

/// Every family from one reading and what the agent recorded. Pure.
pub fn families(e: &mut Exposition, r: &Reading, rec: &Recorded, totals: &mut VpcTotals) {
    e.gauge(
        "vpc_agent_info",
        "The agent (1), labelled with its host id",
        &[("host", rec.host.as_str())],
        1.0,
    );
    datapath_families(e, r);
    endpoint_families(e, r, rec, totals);
    conntrack_families(e, r, rec);
    lb_families(e, r, rec);
    const APPLIED: &str = "vpc_agent_applied_revision";
    const APPLIED_HELP: &str = "Store revision of the last desired state applied to the datapath";
    const RECEIVED: &str = "vpc_agent_desired_revision";
    e.declare(APPLIED, APPLIED_HELP, Kind::Gauge);
    if let Some(rev) = rec.applied {
        e.gauge(APPLIED, APPLIED_HELP, &[], rev as f64);
    }
    if let Some(rev) = rec.received {
        e.gauge(
            RECEIVED,
            "Store revision of the last desired state received from the control plane",
            &[],
            rev as f64,
        );
    }
    e.counter(
        "vpc_agent_reconcile_failures_total",
        "Reconcile passes that failed (the previous state kept forwarding)",
        &[],
        rec.failed_passes as f64,
    );
    const LOST: &str = "vpc_flowlog_events_lost_total";
    const LOST_HELP: &str = "Flow-log events the datapath could not queue (ring buffer full)";
    e.declare(LOST, LOST_HELP, Kind::Counter);
    if let Some(n) = r.flowlog_lost {
        e.counter(LOST, LOST_HELP, &[], n as f64);
    }
}

fn datapath_families(e: &mut Exposition, r: &Reading) {
    const PK: &str = "vpc_datapath_packets_total";
    const PK_HELP: &str = "Packets by hook and action (summed over CPUs at scrape time)";
    const BY: &str = "vpc_datapath_bytes_total";
    const BY_HELP: &str = "Bytes by hook and action";
    const DP: &str = "vpc_datapath_drops_total";
    const DP_HELP: &str = "Dropped packets by hook and drop reason";
    const DB: &str = "vpc_datapath_drop_bytes_total";
    const DB_HELP: &str = "Dropped bytes by hook and drop reason";
    for (n, h) in [(PK, PK_HELP), (BY, BY_HELP), (DP, DP_HELP), (DB, DB_HELP)] {
        e.declare(n, h, Kind::Counter);
    }
    e.gauge(
        "vpc_datapath_maps_readable",
        "1 when the pinned counter maps were read this scrape",
        &[],
        if r.stats.is_some() { 1.0 } else { 0.0 },
    );
    let Some(s) = &r.stats else { return };
    for (hook, slot, c) in &s.actions {
        let l = [("hook", hook.name()), ("action", action_name(*slot))];
        e.counter(PK, PK_HELP, &l, c.packets as f64);
        e.counter(BY, BY_HELP, &l, c.bytes as f64);
    }
    for (hook, reason, c) in &s.drops {
        let l = [("hook", hook.name()), ("reason", reason_name(*reason))];
        e.counter(DP, DP_HELP, &l, c.packets as f64);
        e.counter(DB, DB_HELP, &l, c.bytes as f64);
    }
}

/// Per-VPC packet, byte and drop counters that never go down. A VPC's value is the sum of
/// its endpoints' counters, and endpoints leave (terminated instances, an LRU-evicted
/// `ENDPOINT_STATS` entry): what a series had counted when it went away (or went down, a
/// re-created entry) is kept as the VPC's retired part, so the sum is a true Prometheus
/// counter (no false resets, no `rate()` spikes). Pure bookkeeping over scrapes.
#[derive(Debug, Default)]
pub struct VpcTotals {
    /// Series seen at the last scrape: (ifindex, direction, action) -> (VPC, value).
    stats: BTreeMap<(u32, u32, u32), (String, Counter)>,
    /// Drop series at the last scrape: (ifindex, reason) -> (VPC, value).
    drops: BTreeMap<(u32, u32), (String, Counter)>,
    /// (VPC, direction, action) -> what departed series had counted.
    retired_stats: BTreeMap<(String, u32, u32), Counter>,
    /// (VPC, reason) -> what departed drop series had counted.
    retired_drops: BTreeMap<(String, u32), Counter>,
}

/// Folds `now` into `last`, moving departed or decreased series into `retired` (under
/// `group` of the series), and returns the per-group totals (current plus retired).
fn fold<K: Ord + Copy, G: Ord + Clone>(
    last: &mut BTreeMap<K, (String, Counter)>,
    retired: &mut BTreeMap<G, Counter>,
    now: BTreeMap<K, (String, Counter)>,
    group: impl Fn(&str, &K) -> G,
) -> BTreeMap<G, Counter> {
    for (k, (vpc, old)) in last.iter() {
        let gone = match now.get(k) {
            None => true,
            Some((v, c)) => v != vpc || c.packets < old.packets || c.bytes < old.bytes,
        };
        if gone {
            retired.entry(group(vpc, k)).or_default().add(old);
        }
    }
    let mut out = retired.clone();
    for (k, (vpc, c)) in &now {
        out.entry(group(vpc, k)).or_default().add(c);
    }
    *last = now;
    out
}

impl VpcTotals {
    /// Per-(VPC, direction, action) packets/bytes and per-(VPC, reason) drops for this
    /// scrape's endpoint series.
    #[allow(clippy::type_complexity)]
    fn update(
        &mut self,
        stats: BTreeMap<(u32, u32, u32), (String, Counter)>,
        drops: BTreeMap<(u32, u32), (String, Counter)>,
    ) -> (
        BTreeMap<(String, u32, u32), Counter>,
        BTreeMap<(String, u32), Counter>,
    ) {
        let s = fold(&mut self.stats, &mut self.retired_stats, stats, |vpc, k| {
            (vpc.to_owned(), k.1, k.2)
        });
        let d = fold(&mut self.drops, &mut self.retired_drops, drops, |vpc, k| {
            (vpc.to_owned(), k.1)
        });
        (s, d)
    }
}

fn endpoint_families(e: &mut Exposition, r: &Reading, rec: &Recorded, totals: &mut VpcTotals) {
    const EP: &str = "vpc_endpoint_packets_total";
    const EP_HELP: &str =
        "Packets per local endpoint by direction (ingress: to the instance) and action";
    const EB: &str = "vpc_endpoint_bytes_total";
    const EB_HELP: &str = "Bytes per local endpoint by direction and action";
    const ED: &str = "vpc_endpoint_drops_total";
    const ED_HELP: &str = "Drops charged to a local endpoint, by reason (security-group and ACL drops to the endpoint whose rules decided)";
    const VP: &str = "vpc_vpc_packets_total";
    const VP_HELP: &str = "Packets per VPC (its local endpoints summed) by direction and action";
    const VB: &str = "vpc_vpc_bytes_total";
    const VB_HELP: &str = "Bytes per VPC by direction and action";
    const VD: &str = "vpc_vpc_drops_total";
    const VD_HELP: &str = "Drops per VPC (its local endpoints summed) by reason";
    for (n, h) in [
        (EP, EP_HELP),
        (EB, EB_HELP),
        (ED, ED_HELP),
        (VP, VP_HELP),
        (VB, VB_HELP),
        (VD, VD_HELP),
    ] {
        e.declare(n, h, Kind::Counter);
    }
    // Counters of ports that are not (or no longer) local endpoints are left out: their
    // names are unknown, and an ifindex alone names nothing an operator can act on.
    let mut vpc_stats = BTreeMap::new();
    let mut vpc_drops = BTreeMap::new();
    for (k, c) in r.endpoint_stats.iter().flatten() {
        let Some(n) = rec.endpoints.get(&k.ifindex) else {
            continue;
        };
        let (dir, action) = (direction_name(k.direction), action_name(k.action));
        let l = [
            ("vpc", n.vpc.as_str()),
            ("subnet", n.subnet.as_str()),
            ("instance", n.instance.as_str()),
            ("interface", n.interface.as_str()),
            ("direction", dir),
            ("action", action),
        ];
        e.counter(EP, EP_HELP, &l, c.packets as f64);
        e.counter(EB, EB_HELP, &l, c.bytes as f64);
        vpc_stats.insert((k.ifindex, k.direction, k.action), (n.vpc.clone(), *c));
    }
    for ((ifindex, reason_num), c) in r.endpoint_drops.iter().flatten() {
        let Some(n) = rec.endpoints.get(ifindex) else {
            continue;
        };
        let reason = reason_name(*reason_num);
        let l = [
            ("vpc", n.vpc.as_str()),
            ("subnet", n.subnet.as_str()),
            ("instance", n.instance.as_str()),
            ("interface", n.interface.as_str()),
            ("reason", reason),
        ];
        e.counter(ED, ED_HELP, &l, c.packets as f64);
        vpc_drops.insert((*ifindex, *reason_num), (n.vpc.clone(), *c));
    }
    // Unreadable maps leave the totals as they were (no false departures).
    if r.endpoint_stats.is_none() || r.endpoint_drops.is_none() {
        return;
    }
    let (stats, drops) = totals.update(vpc_stats, vpc_drops);
    for ((vpc, dir, action), c) in &stats {
        let vl = [
            ("vpc", vpc.as_str()),
            ("direction", direction_name(*dir)),
            ("action", action_name(*action)),
        ];
        e.counter(VP, VP_HELP, &vl, c.packets as f64);
        e.counter(VB, VB_HELP, &vl, c.bytes as f64);
    }
    for ((vpc, reason), c) in &drops {
        let l = [("vpc", vpc.as_str()), ("reason", reason_name(*reason))];
        e.counter(VD, VD_HELP, &l, c.packets as f64);
    }
}

fn conntrack_families(e: &mut Exposition, r: &Reading, rec: &Recorded) {
    const VPC: &str = "vpc_conntrack_vpc_entries";
    const VPC_HELP: &str = "Live tracked flows per VPC at the last conntrack GC";
    const LIMIT: &str = "vpc_conntrack_vpc_budget_limit";
    const LIMIT_HELP: &str = "Conntrack entries the VPC may hold on this host (0: unlimited)";
    const COUNT: &str = "vpc_conntrack_vpc_budget_count";
    const COUNT_HELP: &str =
        "Conntrack entries charged to the VPC's budget (datapath count, recounted at each GC)";
    const USE: &str = "vpc_conntrack_vpc_budget_pressure";
    const USE_HELP: &str = "count / limit of the VPC's conntrack budget (absent when unlimited)";
    e.declare(VPC, VPC_HELP, Kind::Gauge);
    let vpc = |vni: u32| rec.vpcs.get(&vni).map_or("", String::as_str);
    if let Some((s, at)) = &rec.conntrack {
        e.gauge(
            "vpc_conntrack_entries",
            "Entries in the conntrack table at the last GC (live and expired)",
            &[],
            s.entries as f64,
        );
        e.gauge(
            "vpc_conntrack_expired_entries",
            "Entries past their idle timeout at the last GC (deleted by it)",
            &[],
            s.expired as f64,
        );
        e.gauge(
            "vpc_conntrack_capacity",
            "Capacity of the conntrack table",
            &[],
            f64::from(s.capacity),
        );
        e.gauge(
            "vpc_conntrack_pressure",
            "Entries / capacity at the last GC (near 1: the LRU table evicts live flows)",
            &[],
            s.pressure(),
        );
        e.gauge(
            "vpc_conntrack_last_gc_timestamp_seconds",
            "When the last conntrack GC ran (Unix time)",
            &[],
            at.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let limits: BTreeMap<u32, u32> = r
            .budgets
            .iter()
            .flatten()
            .filter(|(_, b)| b.limit > 0)
            .map(|(vni, b)| (*vni, b.limit))
            .collect();
        for (vni, n) in &s.per_vni {
            let v = vni.to_string();
            let l = [("vpc", vpc(*vni)), ("vni", v.as_str())];
            e.gauge(VPC, VPC_HELP, &l, *n as f64);
            let room = limits.get(vni).copied().unwrap_or(s.capacity);
            if room > 0 {
                e.gauge(
                    "vpc_conntrack_vpc_pressure",
                    "The VPC's live flows at the last GC / its conntrack budget (the table's capacity when it has none)",
                    &l,
                    *n as f64 / f64::from(room),
                );
            }
        }
    }
    e.declare(LIMIT, LIMIT_HELP, Kind::Gauge);
    e.declare(COUNT, COUNT_HELP, Kind::Gauge);
    for (vni, b) in r.budgets.iter().flatten() {
        let v = vni.to_string();
        let l = [("vpc", vpc(*vni)), ("vni", v.as_str())];
        e.gauge(LIMIT, LIMIT_HELP, &l, f64::from(b.limit));
        e.gauge(COUNT, COUNT_HELP, &l, f64::from(b.count));
        if b.limit > 0 {
            e.gauge(USE, USE_HELP, &l, f64::from(b.count) / f64::from(b.limit));
        }
    }
}

fn lb_families(e: &mut Exposition, r: &Reading, rec: &Recorded) {
    const CONN: &str = "vpc_lb_target_connections";
    const CONN_HELP: &str = "Balanced flows bound to a target on this host (LB_FLOWS entries, counted at scrape time), per listener and target";
    e.declare(CONN, CONN_HELP, Kind::Gauge);
    controlplane::metrics::declare_target_health(e);
    for t in r.lb_targets.iter().flatten() {
        let vpc = rec.vpcs.get(&t.vni).map_or("", String::as_str);
        let target = rec
            .addresses
            .get(&(t.vni, t.target))
            .map_or("", String::as_str);
        let (vip, lport, proto, tip, tport) = (
            t.vip.to_string(),
            t.listener_port.to_string(),
            proto_name(t.proto),
            t.target.to_string(),
            t.target_port.to_string(),
        );
        e.gauge_add(
            CONN,
            CONN_HELP,
            &[
                ("vpc", vpc),
                ("vip", &vip),
                ("listener_port", &lport),
                ("protocol", &proto),
                ("target", target),
                ("target_ip", &tip),
                ("target_port", &tport),
                ("draining", if t.draining { "true" } else { "false" }),
            ],
            t.flows as f64,
        );
    }
    for t in &rec.targets {
        controlplane::metrics::target_health(e, &[], t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::Hook;

    fn doc() -> StateFile {
        serde_json::from_value(serde_json::json!({
            "vpcs": [{"id": "vpc-1", "vni": 7, "cidr": "10.0.0.0/16"}],
            "subnets": [{"id": "subnet-1", "vpc": "vpc-1", "cidr": "10.0.1.0/24"}],
            "hosts": [{"id": "h", "vtep": "10.200.0.1"}],
            "endpoints": [
                {"id": "i-1", "subnet": "subnet-1", "host": "h", "ip": "10.0.1.4",
                 "mac": "02:00:00:00:00:01", "ifname": "veth1"},
                {"id": "i-2", "subnet": "subnet-1", "host": "other", "ip": "10.0.1.5",
                 "mac": "02:00:00:00:00:02"}
            ]
        }))
        .expect("document")
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }

    #[test]
    fn registered_collectors_add_their_families() {
        let m = AgentMetrics::default();
        m.register(Arc::new(|e: &mut Exposition| {
            e.counter("vpc_flowlog_records_total", "records", &[], 7.0)
        }));
        let mut e = Exposition::new();
        m.run_collectors(&mut e);
        has(&e.render(), "vpc_flowlog_records_total 7");
    }

    #[test]
    fn topology_names_local_ports_and_every_address() {
        let ports = BTreeMap::from([("veth1".to_owned(), 42)]);
        let (endpoints, vpcs, addresses) = topology(&doc(), &ports);
        assert_eq!(
            endpoints,
            BTreeMap::from([(
                42,
                EndpointNames {
                    vpc: "vpc-1".into(),
                    subnet: "subnet-1".into(),
                    instance: "i-1".into(),
                    interface: "veth1".into(),
                }
            )])
        );
        assert_eq!(vpcs, BTreeMap::from([(7, "vpc-1".to_owned())]));
        assert_eq!(addresses[&(7, Ipv4Addr::new(10, 0, 1, 5))], "i-2");
    }

    #[test]
    fn families_label_endpoints_sum_vpcs_and_skip_unknown_ports() {
        let ports = BTreeMap::from([("veth1".to_owned(), 42)]);
        let (endpoints, vpcs, addresses) = topology(&doc(), &ports);
        let rec = Recorded {
            host: "h".into(),
            endpoints,
            vpcs,
            addresses,
            applied: Some(9),
            conntrack: Some((
                CtSummary {
                    entries: 4,
                    expired: 1,
                    capacity: 8,
                    per_vni: BTreeMap::from([(7, 3)]),
                    ..CtSummary::default()
                },
                SystemTime::UNIX_EPOCH,
            )),
            ..Recorded::default()
        };
        let c = |p, b| Counter {
            packets: p,
            bytes: b,
        };
        let key = |ifindex, direction, action: Action| EndpointStatsKey {
            ifindex,
            direction,
            action: action as u32,
        };
        let reading = Reading {
            stats: Some(controlplane::datapath::StatsSnapshot {
                actions: vec![(Hook::Port, Action::Redirect as u32, c(5, 500))],
                drops: vec![(Hook::Port, DropReason::SgIngress.as_u32(), c(2, 0))],
            }),
            endpoint_stats: Some(vec![
                (key(42, DIR_EGRESS, Action::Encap), c(3, 300)),
                (key(42, DIR_INGRESS, Action::Decap), c(4, 400)),
                (key(99, DIR_EGRESS, Action::Encap), c(50, 5000)),
            ]),
            endpoint_drops: Some(BTreeMap::from([
                ((42, DropReason::SgIngress.as_u32()), c(2, 0)),
                ((99, DropReason::SgIngress.as_u32()), c(9, 0)),
            ])),
            budgets: Some(vec![(
                7,
                CtBudget {
                    limit: 10,
                    count: 5,
                },
            )]),
            flowlog_lost: Some(3),
            lb_targets: Some(vec![LbTargetFlows {
                vni: 7,
                vip: Ipv4Addr::new(10, 0, 1, 250),
                listener_port: 80,
                proto: 6,
                target: Ipv4Addr::new(10, 0, 1, 5),
                target_port: 8080,
                draining: false,
                flows: 2,
            }]),
        };
        let mut e = Exposition::new();
        families(&mut e, &reading, &rec, &mut VpcTotals::default());
        let text = e.render();
        has(
            &text,
            "vpc_datapath_packets_total{hook=\"port\",action=\"redirect\"} 5",
        );
        has(
            &text,
            "vpc_datapath_drops_total{hook=\"port\",reason=\"sg_ingress\"} 2",
        );
        has(
            &text,
            "vpc_endpoint_packets_total{vpc=\"vpc-1\",subnet=\"subnet-1\",instance=\"i-1\",interface=\"veth1\",direction=\"egress\",action=\"encap\"} 3",
        );
        has(
            &text,
            "vpc_vpc_bytes_total{vpc=\"vpc-1\",direction=\"ingress\",action=\"decap\"} 400",
        );
        has(
            &text,
            "vpc_endpoint_drops_total{vpc=\"vpc-1\",subnet=\"subnet-1\",instance=\"i-1\",interface=\"veth1\",reason=\"sg_ingress\"} 2",
        );
        has(
            &text,
            "vpc_vpc_drops_total{vpc=\"vpc-1\",reason=\"sg_ingress\"} 2",
        );
        has(
            &text,
            "vpc_conntrack_vpc_entries{vpc=\"vpc-1\",vni=\"7\"} 3",
        );
        has(&text, "vpc_conntrack_pressure 0.5");
        // 3 live flows against a budget of 10.
        has(
            &text,
            "vpc_conntrack_vpc_pressure{vpc=\"vpc-1\",vni=\"7\"} 0.3",
        );
        has(
            &text,
            "vpc_conntrack_vpc_budget_pressure{vpc=\"vpc-1\",vni=\"7\"} 0.5",
        );
        has(&text, "vpc_flowlog_events_lost_total 3");
        has(&text, "vpc_agent_applied_revision 9");
        has(
            &text,
            "vpc_lb_target_connections{vpc=\"vpc-1\",vip=\"10.0.1.250\",listener_port=\"80\",protocol=\"tcp\",target=\"i-2\",target_ip=\"10.0.1.5\",target_port=\"8080\",draining=\"false\"} 2",
        );
        // Port 99 is no local endpoint: left out of per-endpoint and per-VPC series.
        let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(series("vpc_endpoint_packets_total{"), 2, "{text}");
        assert_eq!(series("vpc_endpoint_drops_total{"), 1, "{text}");
        assert_eq!(series("vpc_vpc_packets_total{"), 2, "{text}");
    }

    #[test]
    fn per_vpc_counters_never_go_down_when_endpoints_leave_or_restart() {
        let c = |p: u64| Counter {
            packets: p,
            bytes: p * 100,
        };
        let mut t = VpcTotals::default();
        let vpc = |v: &str| v.to_owned();
        let pkts = |t: &mut VpcTotals, now: &[(u32, &str, u64)]| -> u64 {
            let stats = now
                .iter()
                .map(|&(i, v, p)| ((i, DIR_EGRESS, Action::Encap as u32), (vpc(v), c(p))))
                .collect();
            let (s, _) = t.update(stats, BTreeMap::new());
            s.get(&(vpc("vpc-1"), DIR_EGRESS, Action::Encap as u32))
                .map_or(0, |c| c.packets)
        };
        assert_eq!(pkts(&mut t, &[(1, "vpc-1", 10), (2, "vpc-1", 5)]), 15);
        assert_eq!(pkts(&mut t, &[(1, "vpc-1", 12), (2, "vpc-1", 7)]), 19);
        // Endpoint 2 is terminated: its 7 packets stay in the VPC's total.
        assert_eq!(pkts(&mut t, &[(1, "vpc-1", 13)]), 20);
        // Endpoint 1's entry was evicted and re-created (counts from 1 again).
        assert_eq!(pkts(&mut t, &[(1, "vpc-1", 1)]), 21);
        // Another VPC's port does not count here; a port reused by another VPC neither.
        assert_eq!(pkts(&mut t, &[(1, "vpc-1", 2), (3, "vpc-2", 50)]), 22);
        assert_eq!(pkts(&mut t, &[(1, "vpc-2", 60)]), 22);
    }
}
