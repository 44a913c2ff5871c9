//! `vpc-agent`: the host agent. It loads the datapath and attaches it to interfaces, then
//! applies the desired state: from a state file, or streamed by the control plane
//! (`--control-plane`), in which case it also runs the compute and storage agents
//! (`workloads`), serves `ExecInstance` (`exec`) and reports what it applied and observes
//! (`cpclient`).
//!
//! The datapath outlives the agent: maps and links are pinned, so stopping (or crashing) the
//! agent leaves packets flowing, and the next agent takes over the same links atomically.
//! `--detach-on-exit` (what `cargo xtask run` uses) removes everything on Ctrl-C instead.

mod budget;
mod cpclient;
mod exec;
mod flowlogs;
mod lb;
mod metrics;
mod overlay;
mod trace;
mod workloads;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use controlplane::datapath::{
    AttachOutcome, Datapath, LoadOptions, PinLayout, PinnedMaps, PolicyMaps, XdpAttachMode,
};
use dataplane_common::Action;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "VPC host agent: loads and runs the eBPF datapath on this host"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Detach the datapath and remove every pin under the pin directory.
    Teardown {
        /// bpffs directory holding the pins.
        #[arg(long, env = "VPC_PIN_DIR", default_value = "/sys/fs/bpf/vpc")]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Interface to attach to (XDP receive, TC ingress and egress). Repeatable. Default: the
    /// interface of the IPv4 default route.
    #[arg(long = "iface", short = 'i')]
    ifaces: Vec<String>,
    /// bpffs directory for the pins (mounted automatically under /sys/fs/bpf).
    #[arg(long, env = "VPC_PIN_DIR", default_value = "/sys/fs/bpf/vpc")]
    pin_dir: PathBuf,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Detach and remove all pins when stopping (default: leave the datapath running).
    #[arg(long)]
    detach_on_exit: bool,
    /// Most verbose level of datapath (aya-log) messages; more verbose costs per packet.
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    datapath_log_level: LogLevel,
    /// Seconds between counter summaries in the log (0: never).
    #[arg(long, default_value_t = 30)]
    stats_interval: u64,
    /// Desired overlay state (JSON, see `controlplane::overlay::statefile`), watched for
    /// changes. Without it the agent runs the underlay programs only.
    #[arg(long, requires = "host")]
    state: Option<PathBuf>,
    /// This host's id in the desired state.
    #[arg(long)]
    host: Option<String>,
    /// Control plane (`http://HOST:PORT`, or `https://` with --tls-ca): register this host
    /// (`--host`) and apply the desired state it streams. Meanwhile, and whenever it is
    /// unreachable, the datapath keeps forwarding with what it has.
    #[arg(
        long,
        env = "VPC_CONTROL_PLANE",
        conflicts_with = "state",
        requires = "host"
    )]
    control_plane: Option<String>,
    /// The agent's bearer token for the control plane.
    #[arg(long, env = "VPC_AGENT_TOKEN", default_value = "")]
    agent_token: String,
    /// This host's underlay (VTEP) address to register. Default: the first IPv4 address of
    /// the first --iface.
    #[arg(long)]
    underlay_ip: Option<std::net::Ipv4Addr>,
    /// Prefix of the network namespaces this agent creates for instances (`<prefix><id>`).
    /// The agent owns every namespace with this prefix (it removes those of instances no
    /// longer desired), so it must not be shared with anything else.
    #[arg(long, default_value = controlplane::compute::DEFAULT_NETNS_PREFIX)]
    netns_prefix: String,
    /// Where this host's compute and storage agents keep instance state, root filesystem
    /// changes and volumes. Default: /var/lib/vpc/agent/<host>.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The snapshot store. Hosts that share it (e.g. over NFS) can make volumes from each
    /// other's snapshots.
    #[arg(long, default_value = "/var/lib/vpc/snapshots")]
    snapshot_dir: PathBuf,
    /// The cgroup (under each controller's root) that holds this host's instances.
    /// Default: vpc-<host>.
    #[arg(long)]
    cgroup_name: Option<String>,
    /// The instance init binary. Default: `vpc-instance-init` beside this binary.
    #[arg(long)]
    instance_init: Option<PathBuf>,
    /// Seconds a stopping instance's processes get to exit before they are killed.
    #[arg(long, default_value_t = 10)]
    stop_grace: u64,
    /// CA certificate (PEM) of the control plane (https).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// MAC address of the VPC router (what instances resolve their gateway and peers to).
    #[arg(long, default_value = "02:76:70:63:00:01", value_parser = parse_mac)]
    router_mac: [u8; 6],
    /// Capacity of the conntrack table (flows tracked per host). Takes effect when the table
    /// is created (a pinned table keeps its size).
    #[arg(long, default_value_t = dataplane_common::maps::CONNTRACK_MAX_ENTRIES)]
    conntrack_max: u32,
    /// Seconds between conntrack garbage collections (expired flows deleted, pressure and
    /// per-VPC counts logged).
    #[arg(long, default_value_t = 10)]
    ct_gc_interval: u64,
    /// Share of the conntrack table (percent, 1-100) each VPC may fill on this host unless
    /// the VPC sets its own (`conntrack_share_percent`); 100: no budget.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    conntrack_vpc_share: u8,
    /// Capacity of the load balancers' flow and reverse-NAT tables (balanced flows per
    /// host). Takes effect when the tables are created.
    #[arg(long, default_value_t = dataplane_common::maps::LB_FLOWS_MAX_ENTRIES)]
    lb_flows_max: u32,
    /// Slots of the array holding every listener's Maglev table (4 bytes each; a table
    /// change needs room for the new table beside the old one). Takes effect when the array
    /// is created.
    #[arg(long, default_value_t = dataplane_common::maps::LB_MAGLEV_SLOTS)]
    lb_table_slots: u32,
    /// Prometheus metrics endpoint (`GET /metrics`, plain HTTP, read from the pinned maps at
    /// scrape time): ADDRESS:PORT, port 0 for any free port (the chosen address is printed:
    /// `metrics on ADDR`), or `none` to disable. An address already in use is logged and
    /// skipped: the datapath does not depend on it.
    #[arg(
        long,
        env = "VPC_METRICS_ADDR",
        default_value = controlplane::metrics::DEFAULT_AGENT_ADDR,
    )]
    metrics_addr: controlplane::metrics::http::MetricsAddr,
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    controlplane::overlay::statefile::parse_mac(text)
        .ok_or_else(|| format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
}

/// How often the state file is checked for changes; a full level-triggered pass also runs
/// every `RESYNC_TICKS` checks even when the file did not change.
const STATE_POLL: Duration = Duration::from_millis(200);
const RESYNC_TICKS: u32 = 25;
/// Every this many checks (60 s) a pass also reads the installed rule sets back from the
/// kernel. Less often than the overlay: with 100 000 rules the tries hold ~200 000 entries,
/// two syscalls each, while the reconciler's own record of them is exact unless someone
/// else writes the maps.
const POLICY_RESYNC_TICKS: u32 = 12 * RESYNC_TICKS;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum XdpModeArg {
    /// Native (driver) mode, falling back to generic.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
    /// No XDP; TC ingress handles receive.
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Teardown { pin_dir }) => {
            Datapath::teardown(&PinLayout::new(&pin_dir))?;
            println!("removed datapath pins under {}", pin_dir.display());
            Ok(())
        }
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(cli.run)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    raise_fd_limit();
    let ifaces = if args.ifaces.is_empty() {
        vec![default_route_iface().context("no --iface given and no default route found")?]
    } else {
        args.ifaces.clone()
    };
    let layout = PinLayout::new(&args.pin_dir);
    let mut datapath = Datapath::load(&LoadOptions {
        layout: layout.clone(),
        log_level: args.datapath_log_level as u8,
        conntrack_max: Some(args.conntrack_max),
        lb_flows_max: Some(args.lb_flows_max),
        lb_table_slots: Some(args.lb_table_slots),
    })
    .context("loading the datapath")?;
    if let Some(m) = datapath.migration() {
        say(format_args!(
            "migrated pins from {}: {} maps carried, converted {:?}, {} new, {} links swapped, in {:.1} ms (switch {:.1} ms)",
            m.from,
            m.carried.len(),
            m.converted,
            m.fresh.len(),
            m.links,
            m.duration.as_secs_f64() * 1e3,
            m.switch.as_secs_f64() * 1e3
        ));
    }
    // The logger owns the log ring buffer's fd: it must live as long as the programs run.
    let logger = aya_log::EbpfLogger::init(datapath.ebpf_mut()).context("starting aya-log")?;
    // SAFETY: the logger owns its ring-buffer fd (a `RingBuf<MapData>`), which stays open and
    // unchanged for the logger's whole life; the `AsyncFd` owns the logger, so the fd outlives
    // the registration.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching the aya-log ring buffer")?;

    let xdp_mode = match args.xdp_mode {
        XdpModeArg::Auto => XdpAttachMode::Auto,
        XdpModeArg::Native => XdpAttachMode::Native,
        XdpModeArg::Generic => XdpAttachMode::Generic,
        XdpModeArg::Off => XdpAttachMode::Off,
    };
    for iface in &ifaces {
        let attached = datapath
            .attach(iface, xdp_mode)
            .with_context(|| format!("attaching to {iface}"))?;
        for a in attached {
            let how = match a.outcome {
                AttachOutcome::Attached => "attached",
                AttachOutcome::Replaced => "took over pinned link",
            };
            let mode = match a.xdp_native {
                Some(true) => " (native)",
                Some(false) => " (generic)",
                None => "",
            };
            say(format_args!(
                "{how}: {} on {}{mode}, link {} program {}",
                a.program, a.iface, a.link_id, a.program_id
            ));
        }
    }
    let mut cp_rx = None;
    let mut flow_cp = None;
    let mut cp_report = None;
    let mut cp_applied = None;
    // Packet-trace hops from the exec channel (`vpc trace`), run here: this loop owns the
    // datapath.
    let mut trace_rx: Option<tokio::sync::mpsc::Receiver<trace::HopRequest>> = None;
    let mut overlay = match (&args.state, &args.control_plane, &args.host) {
        (Some(path), _, Some(host)) => {
            let mut r = overlay::Reconciler::new(
                &datapath,
                overlay::Source::File(path.clone()),
                None,
                host,
                args.router_mac,
                &ifaces[0],
            )?;
            r.reconcile(&mut datapath, true)
                .await
                .context("applying the desired overlay state")?;
            Some(r)
        }
        (None, Some(url), Some(host)) => {
            let underlay_ip = match args.underlay_ip {
                Some(ip) => ip,
                None => first_ipv4(&ifaces[0])?,
            };
            let cfg = cpclient::CpConfig {
                url: url.clone(),
                token: args.agent_token.clone(),
                host_id: host.clone(),
                underlay_ip: underlay_ip.to_string(),
                tls_ca: args.tls_ca.clone(),
                tls_identity: args.tls_cert.clone().zip(args.tls_key.clone()),
            };
            let exec_cfg = cfg.clone();
            flow_cp = Some(cfg.clone());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let (applied_tx, applied_rx) = tokio::sync::watch::channel(0i64);
            tokio::spawn(cpclient::watch_loop(cfg.clone(), tx, applied_rx));
            let (rtx, rrx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(cpclient::report_loop(cfg, rrx));
            cp_rx = Some(rx);
            cp_report = Some(rtx);
            cp_applied = Some(applied_tx);
            let init_bin = match &args.instance_init {
                Some(p) => p.clone(),
                None => std::env::current_exe()
                    .context("locating this binary")?
                    .with_file_name("vpc-instance-init"),
            };
            let wcfg = workloads::WorkloadConfig {
                data_dir: args
                    .data_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/var/lib/vpc/agent").join(host)),
                snapshot_dir: args.snapshot_dir.clone(),
                init_bin,
                cgroup_name: args
                    .cgroup_name
                    .clone()
                    .unwrap_or_else(|| format!("vpc-{host}")),
                stop_grace: Duration::from_secs(args.stop_grace),
            };
            let w = workloads::Workloads::new(host, &args.netns_prefix, &wcfg)
                .context("starting the compute and storage agents")?;
            let (ttx, trx) = tokio::sync::mpsc::channel(8);
            trace_rx = Some(trx);
            tokio::spawn(exec::exec_loop(exec_cfg, w.runtime(), ttx));
            Some(overlay::Reconciler::new(
                &datapath,
                overlay::Source::Pushed(None),
                Some((
                    controlplane::compute::ComputeNet::new(&args.netns_prefix),
                    w,
                )),
                host,
                args.router_mac,
                &ifaces[0],
            )?)
        }
        _ => None,
    };
    if let (Some(r), Some(host)) = (overlay.as_mut(), &args.host) {
        let dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/vpc/agent").join(host))
            .join("flowlogs");
        match flowlogs::FlowLogAgent::start(&layout, dir, flow_cp) {
            Ok(a) => {
                r.set_flow_logs(a);
                if let Some(stats) = r.flow_log_stats() {
                    metrics::get().register(metrics::flow_log_collector(stats));
                }
            }
            Err(e) => warn!(error = format!("{e:#}"), "flow logs are off"),
        }
    }
    if let Some(host) = &args.host {
        metrics::get().set_host(host);
    }
    if let Some(addr) = args.metrics_addr.0
        && let Some(bound) = metrics::serve(addr, layout.clone()).await
    {
        say(format_args!("metrics on {bound}"));
    }
    say(format_args!(
        "ready: pins under {}",
        layout.root().display()
    ));

    let maps = PinnedMaps::open(&layout)?;
    let policy_maps = PolicyMaps::open(&layout)?;
    // Per-VPC conntrack budgets: shares of the table as it was created.
    // The packet-trace ring buffer (one consumer: traces run one at a time, here).
    let mut trace_events = controlplane::datapath::TraceEvents::open_trace_events(&layout)
        .map_err(|e| warn!(error = %e, "packet traces unavailable"))
        .ok();
    let ct_capacity = policy_maps
        .conntrack_capacity()
        .unwrap_or(args.conntrack_max);
    let mut gc = tokio::time::interval(Duration::from_secs(args.ct_gc_interval.max(1)));
    let mut poll = tokio::time::interval(STATE_POLL);
    let mut ticks = 0u32;
    let mut lb_results = overlay.as_mut().and_then(|r| r.take_lb_results());
    let mut drain = tokio::time::interval(Duration::from_millis(500));
    let mut sigterm = signal(SignalKind::terminate())?;
    // The conntrack table at the last GC (reported to the control plane: `vpc flows`).
    let mut last_ct: Option<vpc_proto::v1::ConntrackSummary> = None;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut ticker = tokio::time::interval(Duration::from_secs(args.stats_interval.max(1)));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            guard = logger.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = ticker.tick(), if args.stats_interval > 0 => {
                log_stats(&maps);
                if let Some(s) = overlay.as_ref().and_then(|r| r.flow_log_stats()) {
                    let c = s.snapshot();
                    if c.events > 0 || c.kernel_lost > 0 {
                        info!(events = c.events, records = c.records, kernel_lost = c.kernel_lost,
                            agent_dropped = c.agent_dropped, stream_dropped = c.stream_dropped, "flow logs");
                    }
                }
            }
            Some((hop, reply)) = recv_bounded(&mut trace_rx) => {
                let doc = overlay.as_ref().and_then(|r| r.document().ok());
                let host = args.host.as_deref().unwrap_or_default();
                let _ = reply.send(trace::run_hop(&datapath, trace_events.as_mut(), doc.as_deref(), &trace::Local { host, underlay: &ifaces[0], router_mac: args.router_mac }, |id| overlay.as_ref().and_then(|r| r.sg_rules(id).cloned()), &hop));
            }
            _ = gc.tick() => {
                if let Some(s) = conntrack_gc(&policy_maps) {
                    metrics::get().set_conntrack(&s);
                    let doc = overlay.as_ref().and_then(|r| r.document().ok());
                    last_ct = Some(budget_pass(&policy_maps, &s, doc.as_deref(), args.host.as_deref().unwrap_or_default(), args.conntrack_vpc_share, ct_capacity));
                }
                if let Some(r) = overlay.as_ref() {
                    lb_gc(r.lb_maps(), &policy_maps);
                }
            }
            Some(got) = recv_bounded(&mut cp_rx) => {
                let Some(r) = overlay.as_mut() else { continue };
                let revision = got.revision;
                let result = match controlplane::overlay::statefile::StateFile::parse_streamed(&got.document) {
                    Ok((doc, unknown)) => {
                        if !unknown.is_empty() {
                            warn!(revision, ?unknown, "desired state has fields this agent does not know (a newer control plane): skipped");
                        }
                        let live = last_ct.as_ref().map(|c| c.per_vni.iter().map(|f| (f.vni, f.flows as usize)).collect()).unwrap_or_default();
                        if let Err(e) = budget::apply(&policy_maps, &doc, args.host.as_deref().unwrap_or_default(), args.conntrack_vpc_share, ct_capacity, &live) {
                            warn!(error = format!("{e:#}"), "writing conntrack budgets");
                        }
                        r.set_pushed(revision, doc);
                        r.reconcile(&mut datapath, false).await.map(|n| (n, r.last_map_changes))
                    }
                    Err(e) => Err(anyhow::anyhow!("unreadable desired state: {e}")),
                };
                let error = match result {
                    Ok((changes, maps)) => {
                        say(format_args!("applied revision {revision}: {changes} changes, {maps} map writes"));
                        metrics::get().applied(revision);
                        if let Some(a) = &cp_applied {
                            a.send_replace(revision);
                        }
                        String::new()
                    }
                    Err(e) => {
                        warn!(revision, error = format!("{e:#}"), "applying the desired state failed; the previous state keeps forwarding");
                        format!("{e:#}")
                    }
                };
                if let Some(tx) = &cp_report {
                    let _ = tx.send(report(r, revision, error, &maps, &last_ct));
                }
            }
            _ = poll.tick(), if overlay.as_ref().is_some_and(|r| r.has_state()) => {
                let Some(r) = overlay.as_mut() else { continue };
                ticks += 1;
                if r.changed() || ticks.is_multiple_of(RESYNC_TICKS) {
                    let read_policy_back = ticks.is_multiple_of(POLICY_RESYNC_TICKS);
                    // A failed pass changes nothing; the last good state keeps forwarding.
                    if let Err(e) = r.reconcile(&mut datapath, read_policy_back).await {
                        warn!(error = format!("{e:#}"), "overlay reconcile failed");
                    } else if let (Some(tx), Some(a)) = (&cp_report, &cp_applied) {
                        // Instances and volumes may have moved on without a new revision.
                        let revision = *a.borrow();
                        let _ = tx.send(report(r, revision, String::new(), &maps, &last_ct));
                    }
                }
            }
            Some(result) = recv_opt(&mut lb_results) => {
                let Some(r) = overlay.as_mut() else { continue };
                if r.lb_record(result)
                    && let Err(e) = r.reconcile(&mut datapath, false).await
                {
                    warn!(error = format!("{e:#}"), "reconcile after a target health change failed");
                }
            }
            _ = drain.tick(), if overlay.is_some() => {
                let Some(r) = overlay.as_mut() else { continue };
                if r.lb_expire()
                    && let Err(e) = r.reconcile(&mut datapath, false).await
                {
                    warn!(error = format!("{e:#}"), "reconcile after a drain ended failed");
                }
            }
        }
    }
    logger.get_mut().flush();
    log_stats(&maps);
    drop(maps);
    drop(policy_maps);
    drop(datapath);
    if args.detach_on_exit {
        Datapath::teardown(&layout)?;
        info!("detached the datapath and removed its pins");
    } else {
        info!(
            pins = %layout.root().display(),
            "stopping; the datapath stays attached (`vpc-agent teardown` removes it)"
        );
    }
    Ok(())
}

/// A report for the control plane: the revision applied (or why not), what the pass
/// observed, and the datapath's counters, target health and conntrack summary.
fn report(
    r: &overlay::Reconciler,
    revision: i64,
    error: String,
    maps: &PinnedMaps,
    conntrack: &Option<vpc_proto::v1::ConntrackSummary>,
) -> cpclient::Report {
    cpclient::Report {
        revision,
        error,
        observed: r.observed.clone(),
        counters: datapath_counters(maps),
        target_health: r.target_health.clone(),
        conntrack: conntrack.clone(),
    }
}

/// The datapath's non-zero counters, for the control plane (`vpc status`, `vpc drops`).
fn datapath_counters(maps: &PinnedMaps) -> Vec<vpc_proto::v1::DatapathCounter> {
    let Ok(s) = maps.stats() else {
        return Vec::new();
    };
    let actions = s
        .actions
        .iter()
        .map(|(hook, slot, c)| vpc_proto::v1::DatapathCounter {
            hook: hook.name().into(),
            name: Action::from_u32(*slot)
                .map_or("unknown", Action::name)
                .into(),
            drop: false,
            packets: c.packets,
            bytes: c.bytes,
        });
    let drops = s
        .drops
        .iter()
        .map(|(hook, reason, c)| vpc_proto::v1::DatapathCounter {
            hook: hook.name().into(),
            name: dataplane_common::DropReason::from_u32(*reason)
                .map_or("unknown", |r| r.name())
                .into(),
            drop: true,
            packets: c.packets,
            bytes: c.bytes,
        });
    actions.chain(drops).filter(|c| c.packets > 0).collect()
}

fn log_stats(maps: &PinnedMaps) {
    match maps.stats() {
        Ok(s) => {
            for (hook, slot, c) in &s.actions {
                let action = Action::from_u32(*slot).map_or("unknown", Action::name);
                info!(
                    hook = hook.name(),
                    action,
                    packets = c.packets,
                    bytes = c.bytes,
                    "datapath counters"
                );
            }
            for (hook, reason, c) in &s.drops {
                let name =
                    dataplane_common::DropReason::from_u32(*reason).map_or("unknown", |r| r.name());
                info!(
                    hook = hook.name(),
                    reason = name,
                    packets = c.packets,
                    "datapath drops"
                );
            }
        }
        Err(e) => warn!(error = %e, "reading counters"),
    }
}

/// Prints a progress line on stdout (what scripts and tests wait for). A closed stdout is
/// not a reason to stop the datapath's agent: the line is dropped.
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// After a conntrack GC: applies the VPCs' budgets, writes the recounted entries into them
/// and builds the report's summary (per VPC: flows, budget, top sources and flows, budget
/// drops).
fn budget_pass(
    maps: &PolicyMaps,
    s: &controlplane::datapath::policy_maps::CtSummary,
    doc: Option<&controlplane::overlay::statefile::StateFile>,
    host: &str,
    default_share: u8,
    capacity: u32,
) -> vpc_proto::v1::ConntrackSummary {
    if let Some(doc) = doc
        && let Err(e) = budget::apply(maps, doc, host, default_share, capacity, &s.per_vni)
    {
        warn!(error = format!("{e:#}"), "writing conntrack budgets");
    }
    let current = maps.ct_budgets().unwrap_or_default();
    let drops = match (doc, maps.endpoint_drops()) {
        (Some(doc), Ok(d)) => budget::drops_per_vni(
            &d,
            &budget::port_vnis(doc, host, |n| nix::net::if_::if_nametoindex(n).ok()),
        ),
        _ => Default::default(),
    };
    budget::summary(s, &current, &drops)
}

/// Deletes expired conntrack entries and logs the table's pressure and per-VPC counts;
/// returns the table's summary.
fn conntrack_gc(maps: &PolicyMaps) -> Option<controlplane::datapath::policy_maps::CtSummary> {
    let now = controlplane::datapath::policy_maps::now_ns();
    match maps.ct_sweep(now, true) {
        Ok(s) => {
            let per_vpc: Vec<String> = s
                .per_vni
                .iter()
                .map(|(vni, n)| format!("{vni}:{n}"))
                .collect();
            info!(
                entries = s.entries,
                expired = s.expired,
                capacity = s.capacity,
                pressure = format!("{:.4}", s.pressure()),
                per_vni = per_vpc.join(","),
                "conntrack gc"
            );
            if s.pressure() > 0.9 {
                warn!(
                    pressure = format!("{:.3}", s.pressure()),
                    "conntrack table nearly full: the oldest flows are being evicted (raise --conntrack-max)"
                );
            }
            Some(s)
        }
        Err(e) => {
            warn!(error = %e, "conntrack gc");
            None
        }
    }
}

/// Receives from a bounded `rx` if there is one (never resolves otherwise).
async fn recv_bounded<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The first IPv4 address of `iface` (`ip -j -4 addr show`).
fn first_ipv4(iface: &str) -> Result<std::net::Ipv4Addr> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-4", "addr", "show", "dev", iface])
        .output()
        .context("running ip addr")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing `ip -j addr show dev {iface}`"))?;
    v.get(0)
        .and_then(|l| l.get("addr_info"))
        .and_then(|a| a.get(0))
        .and_then(|a| a.get("local"))
        .and_then(|s| s.as_str())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{iface} has no IPv4 address; pass --underlay-ip"))
}

/// Receives from `rx` if there is one (never resolves otherwise).
async fn recv_opt<T>(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Raises the soft limit on open files to the hard limit: every running instance holds a
/// metadata-service TUN descriptor, and the common soft default (1024) would stop the
/// metadata service at about a thousand instances.
fn raise_fd_limit() {
    use nix::libc;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the `rlimit` we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the `rlimit` we pass; raising the soft limit up to the hard
    // one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        info!(from = old, to = lim.rlim_max, "raised the open-files limit");
    }
}

/// Deletes idle balanced flows (and their reverse-NAT entries).
fn lb_gc(lb: &controlplane::datapath::LbMaps, policy: &PolicyMaps) {
    let now = controlplane::datapath::policy_maps::now_ns();
    let cfg = policy.ct_config().unwrap_or_default().or_default();
    match lb.sweep(now, &cfg) {
        Ok((live, deleted)) if deleted > 0 || live > 0 => {
            info!(flows = live, expired = deleted, "load-balancer flow gc");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "load-balancer flow gc"),
    }
}

/// The interface of the IPv4 default route, from /proc/net/route.
fn default_route_iface() -> Result<String> {
    let table = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
            return Ok(fields[0].to_owned());
        }
    }
    bail!("no IPv4 default route in /proc/net/route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_defaults_to_loopback_and_none_disables() {
        let cli = Cli::try_parse_from(["vpc-agent"]).unwrap();
        assert_eq!(
            cli.run.metrics_addr.0,
            Some(controlplane::metrics::DEFAULT_AGENT_ADDR.parse().unwrap())
        );
        let cli = Cli::try_parse_from(["vpc-agent", "--metrics-addr", "127.0.0.1:0"]).unwrap();
        assert_eq!(cli.run.metrics_addr.0, Some("127.0.0.1:0".parse().unwrap()));
        let cli = Cli::try_parse_from(["vpc-agent", "--metrics-addr", "none"]).unwrap();
        assert_eq!(cli.run.metrics_addr.0, None);
    }
}
