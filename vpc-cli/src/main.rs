//! `vpc`: the command-line tool of the VPC appliance.
//!
//! Today it has the host-local `datapath` commands, which read and write the pinned maps of
//! the agent on this host (like `cilium-dbg bpf ...`): counters, filter entries, per-port
//! drops by reason and connection tracking.
//!
//! The API commands (`vpc vpcs create`, `vpc subnets list`, `vpc security-groups
//! authorize-ingress`, ...) talk to the control plane's gRPC API: see [`api`]; their
//! settings come from flags, the environment and a config file ([`config`]), their output
//! is shaped by [`output`]. `vpc completion SHELL` and `vpc man` are generated from these
//! definitions.

mod api;
mod compute;
mod config;
mod flowlogs;
mod hosts;
mod lb;
mod manifest;
mod network;
mod ops;
mod output;
mod security;
mod trace;

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use controlplane::datapath::{PinLayout, PinnedMaps, PolicyMaps, policy_maps::summarize};
use dataplane_common::{
    Action, DropReason, FilterAction, FilterKey, FilterValue, Hook, filter::ipv4_mapped,
};

#[derive(Parser, Debug)]
#[command(
    name = "vpc",
    version,
    about = "Manage the VPC appliance",
    after_help = api::EXIT_HELP
)]
struct Cli {
    #[command(flatten)]
    api: api::ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Inspect and program the datapath of this host (needs root).
    #[command(subcommand)]
    Datapath(DatapathCommand),
    /// Network load balancers as this host's datapath runs them (needs root).
    #[command(subcommand)]
    Lb(LbCommand),
    /// The control plane's API: vpcs, subnets, security-groups, instances, ...
    #[command(flatten)]
    Api(api::ApiCommand),
    /// The settings of the API commands (flags, environment, config file and profiles).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print a shell completion script (e.g. `source <(vpc completion bash)`).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into --out.
    Man {
        /// Write `vpc.1`, `vpc-vpcs.1`, `vpc-vpcs-create.1`, ... into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum LbCommand {
    /// Listeners (VIP, port, protocol) with their targets and each target's state as this
    /// host's health checks see it (initial, healthy, unhealthy, unused, draining).
    Targets {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Balanced flows: client, VIP, the target each is bound to.
    Flows {
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(clap::Args, Debug)]
struct PinArgs {
    /// bpffs directory of the agent's pins.
    #[arg(
        long,
        env = "VPC_PIN_DIR",
        default_value = "/sys/fs/bpf/vpc",
        global = true
    )]
    pin_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum DatapathCommand {
    /// Show packet counters by hook and action, and drops by reason.
    Stats {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Per-destination pass/drop entries.
    #[command(subcommand)]
    Filter(FilterCommand),
    /// Drops charged to each instance port, by reason (security groups, ACLs, ...).
    Drops {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Connection tracking: occupancy, pressure and live flows per VPC (VNI).
    Conntrack {
        #[command(flatten)]
        pins: PinArgs,
        /// Also list the tracked flows.
        #[arg(long)]
        flows: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FilterCommand {
    /// Add or replace an entry.
    Add {
        #[command(flatten)]
        entry: EntryArgs,
        /// What to do with matching packets.
        #[arg(long, value_enum, default_value_t = ActionArg::Drop)]
        action: ActionArg,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Remove an entry.
    Remove {
        #[command(flatten)]
        entry: EntryArgs,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// List the entries.
    List {
        #[command(flatten)]
        pins: PinArgs,
    },
}

#[derive(clap::Args, Debug)]
struct EntryArgs {
    /// Destination address (IPv4 or IPv6), or `any`.
    #[arg(long)]
    dst: String,
    /// IP protocol: tcp, udp, icmp, icmpv6 or a number.
    #[arg(long)]
    protocol: String,
    /// Destination port (TCP/UDP); 0 matches packets without ports.
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ActionArg {
    Drop,
    Pass,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Datapath(DatapathCommand::Stats { pins }) => stats(&pins),
        Command::Datapath(DatapathCommand::Filter(cmd)) => filter(cmd),
        Command::Datapath(DatapathCommand::Drops { pins }) => endpoint_drops(&pins),
        Command::Datapath(DatapathCommand::Conntrack { pins, flows }) => conntrack(&pins, flows),
        Command::Lb(LbCommand::Targets { pins }) => lb_targets(&pins),
        Command::Lb(LbCommand::Flows { pins }) => lb_flows(&pins),
        Command::Api(cmd) => api::main(&cli.api, cmd),
        Command::Config(cmd) => config::main(&cli.api, cmd),
        Command::Completion { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vpc", &mut out);
            output::write_stdout(&out);
            Ok(())
        }
        Command::Man { out } => man(out.as_deref()),
    }
}

/// `vpc man`: the main page to stdout, or every page into `dir`.
fn man(dir: Option<&std::path::Path>) -> Result<()> {
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            output::write_stdout(&out);
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            let n = std::fs::read_dir(dir)?
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
                .count();
            eprintln!("{n} man pages in {}", dir.display());
        }
    }
    Ok(())
}

fn lb_targets(pins: &PinArgs) -> Result<()> {
    use controlplane::lb::compile::TargetStatus;
    let layout = PinLayout::new(&pins.pin_dir);
    let path = controlplane::lb::status_path(&layout);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no target states at {} (is vpc-agent running with load balancers?)",
            path.display()
        )
    })?;
    let states: Vec<TargetStatus> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    println!(
        "{:<20} {:<20} {:<22} {:<10} REASON",
        "TARGET GROUP", "TARGET", "ADDRESS", "STATE"
    );
    for s in states {
        println!(
            "{:<20} {:<20} {:<22} {:<10} {}",
            s.group,
            s.endpoint,
            format!("{}:{}", s.ip, s.port),
            s.state.name(),
            s.reason.unwrap_or_default()
        );
    }
    Ok(())
}

fn lb_flows(pins: &PinArgs) -> Result<()> {
    use dataplane_common::{lb::backend_state_name, overlay::v4};
    let layout = PinLayout::new(&pins.pin_dir);
    let maps = controlplane::datapath::LbMaps::open(&layout).with_context(|| {
        format!(
            "no datapath pinned under {} (is vpc-agent running, and are you root?)",
            pins.pin_dir.display()
        )
    })?;
    let backends = maps.backends()?;
    let now = controlplane::datapath::policy_maps::now_ns();
    println!(
        "{:<8} {:<5} {:<22} {:<22} {:<22} {:<9} {:>8}",
        "VNI", "PROTO", "CLIENT", "VIP", "TARGET", "STATE", "IDLE(s)"
    );
    for (k, f) in maps.flows()? {
        let (target, state) = backends.get(&f.backend).map_or_else(
            || ("(gone)".to_owned(), "-"),
            |b| {
                (
                    format!("{}:{}", std::net::Ipv4Addr::from(v4(&b.addr)), b.port),
                    backend_state_name(b.state),
                )
            },
        );
        println!(
            "{:<8} {:<5} {:<22} {:<22} {:<22} {:<9} {:>8}",
            k.vni,
            k.proto,
            format!("{}:{}", std::net::Ipv4Addr::from(v4(&k.src)), k.sport),
            format!("{}:{}", std::net::Ipv4Addr::from(v4(&k.dst)), k.dport),
            target,
            state,
            now.saturating_sub(f.last_seen_ns) / 1_000_000_000
        );
    }
    Ok(())
}

fn open_policy(pins: &PinArgs) -> Result<PolicyMaps> {
    PolicyMaps::open(&PinLayout::new(&pins.pin_dir)).with_context(|| {
        format!(
            "no datapath pinned under {} (is vpc-agent running, and are you root?)",
            pins.pin_dir.display()
        )
    })
}

/// The name of the interface with `ifindex` in this namespace, or the number.
fn ifname(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .and_then(|n| n.into_string().ok())
        .unwrap_or_else(|| format!("ifindex {ifindex}"))
}

fn endpoint_drops(pins: &PinArgs) -> Result<()> {
    let drops = open_policy(pins)?.endpoint_drops()?;
    println!(
        "{:<16} {:<24} {:>14} {:>16}",
        "PORT", "REASON", "PACKETS", "BYTES"
    );
    for ((ifindex, reason), c) in drops {
        let name = DropReason::from_u32(reason).map_or("unknown", DropReason::name);
        println!(
            "{:<16} {:<24} {:>14} {:>16}",
            ifname(ifindex),
            name,
            c.packets,
            c.bytes
        );
    }
    Ok(())
}

fn conntrack(pins: &PinArgs, flows: bool) -> Result<()> {
    use dataplane_common::{conntrack::CtState, overlay::v4};
    let maps = open_policy(pins)?;
    let now = controlplane::datapath::policy_maps::now_ns();
    let cfg = maps.ct_config()?.or_default();
    let entries = maps.conntrack()?;
    let (s, _) = summarize(&entries, &cfg, now, maps.conntrack_capacity()?);
    println!(
        "entries {} (expired {}) of {}: pressure {:.4}",
        s.entries,
        s.expired,
        s.capacity,
        s.pressure()
    );
    println!("{:<10} {:>12}", "VNI", "LIVE FLOWS");
    for (vni, n) in &s.per_vni {
        println!("{vni:<10} {n:>12}");
    }
    if flows {
        println!();
        println!(
            "{:<8} {:<5} {:<22} {:<22} {:<12} {:>8}",
            "VNI", "PROTO", "OPENER", "PEER", "STATE", "IDLE s"
        );
        for (k, e) in entries {
            let lo = format!("{}:{}", std::net::Ipv4Addr::from(v4(&k.lo_addr)), k.lo_port);
            let hi = format!("{}:{}", std::net::Ipv4Addr::from(v4(&k.hi_addr)), k.hi_port);
            let (opener, peer) = if e.flags & dataplane_common::conntrack::CT_OPENED_BY_LO != 0 {
                (lo, hi)
            } else {
                (hi, lo)
            };
            let state = match CtState::from_u32(e.state) {
                Some(CtState::SynSent) => "syn_sent",
                Some(CtState::Established) => "established",
                Some(CtState::Closing) => "closing",
                Some(CtState::Open) => "open",
                None => "unknown",
            };
            let idle = now.saturating_sub(e.last_seen_ns) / 1_000_000_000;
            let expired = if cfg.expired(&k, &e, now) {
                " (expired)"
            } else {
                ""
            };
            println!(
                "{:<8} {:<5} {:<22} {:<22} {:<12} {:>8}{expired}",
                k.vni, k.proto, opener, peer, state, idle
            );
        }
    }
    Ok(())
}

fn open(pins: &PinArgs) -> Result<PinnedMaps> {
    PinnedMaps::open(&PinLayout::new(&pins.pin_dir)).with_context(|| {
        format!(
            "no datapath pinned under {} (is vpc-agent running, and are you root?)",
            pins.pin_dir.display()
        )
    })
}

fn stats(pins: &PinArgs) -> Result<()> {
    let snap = open(pins)?.stats()?;
    println!(
        "{:<12} {:<22} {:>14} {:>16}",
        "HOOK", "COUNTER", "PACKETS", "BYTES"
    );
    for hook in Hook::ALL {
        for action in Action::ALL {
            let c = snap.action(hook, action);
            println!(
                "{:<12} {:<22} {:>14} {:>16}",
                hook.name(),
                action.name(),
                c.packets,
                c.bytes
            );
        }
        for (h, reason, c) in snap.drops.iter().filter(|(h, _, _)| *h == hook) {
            let name = DropReason::from_u32(*reason)
                .map_or_else(|| format!("reason_{reason}"), |r| r.name().to_owned());
            println!(
                "{:<12} {:<22} {:>14} {:>16}",
                h.name(),
                format!("drop:{name}"),
                c.packets,
                c.bytes
            );
        }
    }
    Ok(())
}

fn filter(cmd: FilterCommand) -> Result<()> {
    match cmd {
        FilterCommand::Add {
            entry,
            action,
            pins,
        } => {
            let key = key(&entry)?;
            let action = match action {
                ActionArg::Drop => FilterAction::Drop,
                ActionArg::Pass => FilterAction::Pass,
            };
            open(&pins)?.set_filter(key, FilterValue::new(action))?;
            println!("{}", describe(&key, action));
        }
        FilterCommand::Remove { entry, pins } => {
            let key = key(&entry)?;
            if !open(&pins)?.remove_filter(&key)? {
                bail!("no such entry: {}", describe_key(&key));
            }
            println!("removed {}", describe_key(&key));
        }
        FilterCommand::List { pins } => {
            println!(
                "{:<40} {:<9} {:>6} {:<6}",
                "DESTINATION", "PROTOCOL", "PORT", "ACTION"
            );
            for (k, v) in open(&pins)?.filters()? {
                println!(
                    "{:<40} {:<9} {:>6} {:<6}",
                    addr(&k.addr),
                    proto_name(k.proto),
                    k.port,
                    action_name(v.action())
                );
            }
        }
    }
    Ok(())
}

fn key(e: &EntryArgs) -> Result<FilterKey> {
    let addr = if e.dst == "any" {
        [0; 16]
    } else {
        match e
            .dst
            .parse::<IpAddr>()
            .with_context(|| format!("--dst: `{}` is neither an IP address nor `any`", e.dst))?
        {
            IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    let proto = match e.protocol.as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        n => n.parse().with_context(|| {
            format!("--protocol: `{n}` is not tcp, udp, icmp, icmpv6 or a number 0-255")
        })?,
    };
    Ok(FilterKey::new(addr, proto, e.port))
}

fn addr(a: &[u8; 16]) -> String {
    if *a == [0; 16] {
        return "any".into();
    }
    let v6 = std::net::Ipv6Addr::from(*a);
    v6.to_ipv4_mapped()
        .map_or_else(|| v6.to_string(), |v4| v4.to_string())
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

fn action_name(a: FilterAction) -> &'static str {
    match a {
        FilterAction::Drop => "drop",
        FilterAction::Pass => "pass",
    }
}

fn describe_key(k: &FilterKey) -> String {
    format!("{} {} port {}", addr(&k.addr), proto_name(k.proto), k.port)
}

fn describe(k: &FilterKey, a: FilterAction) -> String {
    format!("{}: {}", describe_key(k), action_name(a))
}
