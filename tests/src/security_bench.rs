//! `cargo xtask bench security`: what security groups and conntrack cost, for `vpc-bench`.
//!
//! Four parts, each printing one table:
//!
//! 1. [`per_packet_by_rules`]: ns/packet through the port program (`me` to `peer` on the same
//!    host: `me`'s outbound rules, `peer`'s inbound rules, conntrack) for a new flow (a TCP
//!    SYN with a fresh source port each run: a conntrack miss, two security-group lookups and
//!    an insert) and an established one (the tracked flow's ACK: one conntrack hit), with 1,
//!    100, 10 000 and 100 000 security-group rules installed on the host. `me` and `peer`
//!    hold at most 1 000 of them through their groups; the rest belong to the groups of the
//!    third local endpoint, `b` (VPC B). The rules are a deterministic pseudo-random mix of
//!    TCP/UDP single ports and ranges, ICMP, a few all-protocol rules, /32, /24 and /16 CIDRs
//!    over 10.0.0.0/8 and group references. Their kernel entries are counted in the tries.
//!    A third column, a SYN no rule admits (dropped after `me`'s outbound lookups), shows
//!    what one direction's two trie lookups add as the endpoint's rules grow.
//! 2. [`apply_time`]: compile and apply 10 000 rules through the agent's reconciler (fresh
//!    install, one rule changed in a small and in a large group set, the pass that removes
//!    the replaced rule set), and the compiler alone.
//! 3. [`conntrack_scale`]: established-flow cost with 1 000 and 1 000 000 conntrack entries,
//!    for the same flow every run and for a different stored flow every run.
//! 4. [`nft_baseline`]: the kernel's own stateful filtering (nftables + conntrack) on
//!    established packets, measured end to end: a UDP ping-pong between two namespaces
//!    without and with an nftables table, the difference per packet.
//!
//! Per-packet figures of parts 1 and 3 are medians of single BPF_PROG_TEST_RUN runs on a
//! fresh frame: the port program rewrites the frame it forwards (MACs), so the kernel's
//! `repeat` loop would run every repetition after the first on the rewritten frame, which
//! anti-spoofing drops. A single run's time includes the kernel's clock reads (tens of ns),
//! the same in every row.

use std::{
    collections::HashSet,
    io,
    net::{Ipv4Addr, UdpSocket},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use controlplane::{
    datapath::policy_maps::now_ns,
    host::Report,
    policy::{PolicyLimits, Protocol, SecurityGroup, SgRule, compile::compile},
};
use dataplane_common::{
    Hook,
    conntrack::{CT_OPENED_BY_LO, CT_REPLIED, CtEntry, CtKey, CtState, tcp_flags},
    filter::ipv4_mapped,
    testpkt::{tcp, v4, with_macs},
};

use crate::{
    netns::{NetNs, veth_pair},
    overlay_fixture::{Fixture, ME_MAC, PEER_MAC, PolicySpec, ROUTER, fixture, fixture_with},
    testrun::{TC_ACT_REDIRECT, TC_ACT_SHOT},
};

/// Address of `me`.
const ME_IP: [u8; 4] = [10, 0, 1, 10];
/// Address of `peer`.
const PEER_IP: [u8; 4] = [10, 0, 2, 20];
/// VNI of VPC A (`me`, `peer`).
const VNI_A: u32 = 100;
/// Destination port of the measured flows (admitted by one rule in each direction).
const SERVICE_PORT: u16 = 5432;
/// Source port of the tracked (established) flow.
const EST_SPORT: u16 = 1000;
/// First source port of the new-flow runs.
const NEW_SPORT_BASE: u16 = 20_000;

/// Rules per group of `me` and `peer` (inbound + outbound).
const SMALL_GROUP: usize = 200;
/// Rules per group of `b`.
const BIG_GROUP: usize = 1000;
/// Most rules `me` and `peer` hold each.
const ENDPOINT_RULES_MAX: usize = 1000;

/// Knobs of the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Single runs per per-packet figure.
    pub samples: u32,
    /// Round trips per ping-pong measurement (part 4).
    pub round_trips: u32,
    /// Interleaved rounds of the ping-pong (part 4).
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            samples: 20_000,
            round_trips: 50_000,
            rounds: 5,
        }
    }
}

/// Established-flow costs from part 1, for part 4's comparison: (label, median ns).
pub type Established = Vec<(String, f64)>;

/// All four parts.
pub fn run(opts: &Options) -> Result<()> {
    let est = per_packet_by_rules(opts)?;
    apply_time()?;
    conntrack_scale(opts)?;
    nft_baseline(opts, &est)
}

// ---------------------------------------------------------------------------------------
// Rule generation.

/// xorshift64*: deterministic, so every run installs the same rules.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Protocols and ports of the rule mix: what real groups allow (services, ephemeral and
/// NodePort ranges, DNS, NTP, SNMP, syslog, VXLAN, ICMP).
const PORTS: &[(Protocol, Option<(u16, u16)>)] = &[
    (Protocol::TCP, Some((22, 22))),
    (Protocol::TCP, Some((80, 80))),
    (Protocol::TCP, Some((443, 443))),
    (Protocol::TCP, Some((3306, 3306))),
    (Protocol::TCP, Some((5432, 5432))),
    (Protocol::TCP, Some((6379, 6379))),
    (Protocol::TCP, Some((8080, 8080))),
    (Protocol::TCP, Some((8443, 8443))),
    (Protocol::TCP, Some((2379, 2380))),
    (Protocol::TCP, Some((8000, 8999))),
    (Protocol::TCP, Some((9200, 9300))),
    (Protocol::TCP, Some((10250, 10259))),
    (Protocol::TCP, Some((30000, 32767))),
    (Protocol::TCP, Some((1024, 65535))),
    (Protocol::UDP, Some((53, 53))),
    (Protocol::UDP, Some((123, 123))),
    (Protocol::UDP, Some((161, 162))),
    (Protocol::UDP, Some((514, 514))),
    (Protocol::UDP, Some((4789, 4789))),
    (Protocol::UDP, Some((5000, 5100))),
    (Protocol::UDP, Some((60000, 61000))),
    (Protocol::ICMP, None),
    (Protocol::ICMP, Some((8, 8))),
];

fn cidr_rule(protocol: Protocol, ports: Option<(u16, u16)>, net: u32, len: u8) -> SgRule {
    let text = format!("{}/{len}", Ipv4Addr::from(net));
    SgRule {
        protocol,
        from_port: ports.map(|p| p.0),
        to_port: ports.map(|p| p.1),
        cidr: Some(text.parse().expect("a valid CIDR")),
        group: None,
    }
}

/// One random rule: 1 in 100 for all protocols, else from [`PORTS`]; remote 8% a group of
/// `refs`, 2% a /16, 30% a /24, else a /32, anywhere in 10.0.0.0/8.
fn random_rule(rng: &mut Rng, refs: &[String]) -> SgRule {
    let (protocol, ports) = if rng.below(100) == 0 {
        (Protocol::All, None)
    } else {
        PORTS[rng.below(PORTS.len() as u64) as usize]
    };
    let roll = rng.below(100);
    // All protocols only for single addresses (never a group: the denied probe of part 1
    // relies on no rule admitting TCP port 1 to `peer`).
    if roll < 8 && !refs.is_empty() && protocol != Protocol::All {
        return SgRule {
            protocol,
            from_port: ports.map(|p| p.0),
            to_port: ports.map(|p| p.1),
            cidr: None,
            group: Some(refs[rng.below(refs.len() as u64) as usize].clone()),
        };
    }
    let len: u8 = match roll {
        _ if protocol == Protocol::All => 32,
        0..10 => 16,
        10..40 => 24,
        _ => 32,
    };
    let mask = u32::MAX << (32 - u32::from(len));
    let net = (0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff)) & mask;
    cidr_rule(protocol, ports, net, len)
}

/// Names of `n` groups of `per_group` rules for `rules` rules.
fn group_names(prefix: &str, rules: usize, per_group: usize) -> Vec<String> {
    (0..rules.div_ceil(per_group))
        .map(|i| format!("{prefix}-{i}"))
        .collect()
}

/// The groups holding `rules` rules, `per_group` each (the last one the rest), half inbound
/// and half outbound (`more_inbound`: the odd rule inbound). `first` is rule 0 of the first
/// group: (inbound?, rule).
#[allow(clippy::too_many_arguments)]
fn make_groups(
    rng: &mut Rng,
    names: &[String],
    vpc: &str,
    rules: usize,
    per_group: usize,
    more_inbound: bool,
    refs: &[String],
    first: Option<(bool, SgRule)>,
) -> Vec<SecurityGroup> {
    let mut left = rules;
    let mut first = first;
    names
        .iter()
        .map(|name| {
            let n = left.min(per_group);
            left -= n;
            let (n_in, n_out) = if more_inbound {
                (n - n / 2, n / 2)
            } else {
                (n / 2, n - n / 2)
            };
            let mut inbound = Vec::with_capacity(n_in);
            let mut outbound = Vec::with_capacity(n_out);
            if let Some((dir_in, rule)) = first.take() {
                if dir_in { &mut inbound } else { &mut outbound }.push(rule);
            }
            while inbound.len() < n_in {
                inbound.push(random_rule(rng, refs));
            }
            while outbound.len() < n_out {
                outbound.push(random_rule(rng, refs));
            }
            SecurityGroup {
                id: name.clone(),
                vpc: vpc.into(),
                default: false,
                inbound,
                outbound,
            }
        })
        .collect()
}

/// Rules of one policy, by holder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounts {
    /// Rules of `me`'s groups.
    pub me: usize,
    /// Rules of `peer`'s groups.
    pub peer: usize,
    /// Rules of `b`'s groups.
    pub b: usize,
}

impl RuleCounts {
    /// Every rule on the host.
    pub fn total(&self) -> usize {
        self.me + self.peer + self.b
    }

    /// The split of `total` rules: `me` and `peer` half each up to 1 000, `b` the rest (at
    /// least one rule each for `me` and `peer`: one rule in each direction admits the flow).
    pub fn split(total: usize) -> Self {
        let each = (total / 2).clamp(1, ENDPOINT_RULES_MAX);
        RuleCounts {
            me: each,
            peer: each,
            b: total.saturating_sub(2 * each),
        }
    }
}

/// The policy with `counts` rules. `me`'s first group's first outbound rule admits TCP
/// [`SERVICE_PORT`] to `peer`'s subnet, `peer`'s first group's first inbound rule admits it
/// from `me`'s first group; everything else is random (`seed`).
pub fn policy(counts: RuleCounts, seed: u64) -> PolicySpec {
    let mut rng = Rng(seed | 1);
    let me = group_names("sg-me", counts.me, SMALL_GROUP);
    let peer = group_names("sg-peer", counts.peer, SMALL_GROUP);
    let b = group_names("sg-b", counts.b, BIG_GROUP);
    let refs_a: Vec<String> = me.iter().chain(&peer).cloned().collect();
    let to_peer = cidr_rule(
        Protocol::TCP,
        Some((SERVICE_PORT, SERVICE_PORT)),
        u32::from_be_bytes([10, 0, 2, 0]),
        24,
    );
    let from_me = SgRule {
        protocol: Protocol::TCP,
        from_port: Some(SERVICE_PORT),
        to_port: Some(SERVICE_PORT),
        cidr: None,
        group: Some(me[0].clone()),
    };
    let mut groups = make_groups(
        &mut rng,
        &me,
        "vpc-a",
        counts.me,
        SMALL_GROUP,
        false,
        &refs_a,
        Some((false, to_peer)),
    );
    groups.extend(make_groups(
        &mut rng,
        &peer,
        "vpc-a",
        counts.peer,
        SMALL_GROUP,
        true,
        &refs_a,
        Some((true, from_me)),
    ));
    groups.extend(make_groups(
        &mut rng, &b, "vpc-b", counts.b, BIG_GROUP, false, &b, None,
    ));
    let mut memberships = vec![("me".to_owned(), me), ("peer".to_owned(), peer)];
    if !b.is_empty() {
        memberships.push(("b".to_owned(), b));
    }
    PolicySpec {
        security_groups: groups,
        memberships,
        limits: PolicyLimits {
            sg_inbound_rules: BIG_GROUP,
            sg_outbound_rules: BIG_GROUP,
            groups_per_endpoint: 200,
            ..PolicyLimits::default()
        },
        ..PolicySpec::default()
    }
}

/// Explicit rules of a policy.
fn rule_count(p: &PolicySpec) -> usize {
    p.security_groups
        .iter()
        .map(|g| g.inbound.len() + g.outbound.len())
        .sum()
}

/// (policies, `SG_ADDR` entries, `SG_PORT` entries) of all installed policies, and (`SG_ADDR`,
/// `SG_PORT`) entries of `me`'s.
type Installed = ((usize, usize, usize), (usize, usize));

/// Kernel entries of the installed security-group policies: (policies, `SG_ADDR` entries,
/// `SG_PORT` entries), and the (address, port) entries of `me`'s policy.
fn installed(f: &mut Fixture) -> Result<Installed> {
    let ifindex = f.me;
    let sg = f.host.policy_maps().read_sg()?;
    let policy = f
        .host
        .overlay_mut()
        .read()?
        .endpoints
        .get(&ifindex)
        .map(|e| e.policy)
        .context("port not programmed")?;
    let total = (
        sg.len(),
        sg.values().map(|e| e.addr.len()).sum(),
        sg.values().map(|e| e.ports.len()).sum(),
    );
    let own = sg
        .get(&policy)
        .map_or((0, 0), |e| (e.addr.len(), e.ports.len()));
    Ok((total, own))
}

/// Applies `policy` and runs the pass that removes what it replaced; returns the first
/// pass's report and its duration.
fn apply_settled(f: &mut Fixture, policy: &PolicySpec) -> (Report, Duration) {
    let start = Instant::now();
    let report = f.apply_policy(policy);
    let took = start.elapsed();
    f.apply_policy(policy);
    (report, took)
}

// ---------------------------------------------------------------------------------------
// Frames and runs.

fn from_me(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    with_macs(
        &tcp(v4(ME_IP, PEER_IP), sport, dport, flags, b""),
        ROUTER,
        ME_MAC,
    )
}

fn from_peer(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    with_macs(
        &tcp(v4(PEER_IP, ME_IP), sport, dport, flags, b""),
        ROUTER,
        PEER_MAC,
    )
}

/// Single runs: the median and mean in ns. Every run must forward (`TC_ACT_REDIRECT`).
#[derive(Clone, Copy, Debug)]
struct Stats {
    median: f64,
    mean: f64,
}

fn stats(mut ns: Vec<u64>) -> Stats {
    ns.sort_unstable();
    let mean = ns.iter().sum::<u64>() as f64 / ns.len().max(1) as f64;
    Stats {
        median: ns.get(ns.len() / 2).copied().unwrap_or_default() as f64,
        mean,
    }
}

/// Runs the port program once on each frame `frame(i)`, `i < samples`, entering at
/// `ifindex`; fails unless every run forwards.
fn single_runs(
    f: &Fixture,
    ifindex: u32,
    samples: u32,
    frame: impl Fn(u32) -> Vec<u8> + Send + Sync,
) -> Result<Stats> {
    single_runs_expecting(f, ifindex, samples, TC_ACT_REDIRECT, frame)
}

/// As [`single_runs`], every run returning `expect`.
fn single_runs_expecting(
    f: &Fixture,
    ifindex: u32,
    samples: u32,
    expect: u32,
    frame: impl Fn(u32) -> Vec<u8> + Send + Sync,
) -> Result<Stats> {
    f.ns.run(|| -> Result<Stats> {
        let mut ns = Vec::with_capacity(samples as usize);
        for i in 0..samples {
            let r = f.dp.run_on(Hook::Port, &frame(i), 1, Some(ifindex))?;
            ensure!(
                r.retval == expect,
                "run {i}: return {} instead of {expect}",
                r.retval
            );
            ns.push(r.per_run.as_nanos() as u64);
        }
        Ok(stats(ns))
    })
}

/// Opens the tracked flow `me`:[`EST_SPORT`] -> `peer`:[`SERVICE_PORT`] (SYN, SYN-ACK).
fn open_flow(f: &Fixture) -> Result<()> {
    single_runs(f, f.me, 1, |_| {
        from_me(EST_SPORT, SERVICE_PORT, tcp_flags::SYN)
    })
    .context("SYN of the tracked flow")?;
    single_runs(f, f.peer, 1, |_| {
        from_peer(SERVICE_PORT, EST_SPORT, tcp_flags::SYN | tcp_flags::ACK)
    })
    .context("SYN-ACK of the tracked flow")?;
    Ok(())
}

/// Empties conntrack (every entry is expired at the end of time).
fn clear_conntrack(f: &Fixture) -> Result<()> {
    f.host.policy_maps().ct_sweep(u64::MAX, true)?;
    Ok(())
}

/// The kernel's repeat average over `repeat` runs of the established ACK, if valid: the
/// port program rewrites the frame, so repetitions after the first see `ROUTER` as source
/// MAC and are dropped as spoofed; `None` then.
fn repeat_average(f: &Fixture, repeat: u32) -> Result<Option<f64>> {
    let frame = from_me(EST_SPORT, SERVICE_PORT, tcp_flags::ACK);
    let r =
        f.ns.run(|| f.dp.run_on(Hook::Port, &frame, repeat, Some(f.me)))?;
    Ok((r.retval == TC_ACT_REDIRECT).then_some(r.per_run.as_nanos() as f64))
}

// ---------------------------------------------------------------------------------------
// Part 1.

/// Interleaved rounds of part 1 (each installs every row's policy again).
const RULE_ROUNDS: usize = 3;

/// One row of part 1, accumulated over rounds.
#[derive(Debug, Default)]
struct RuleRow {
    counts: RuleCounts,
    /// (all SG_ADDR, all SG_PORT, `me`'s SG_ADDR, `me`'s SG_PORT) entries.
    entries: (usize, usize, usize, usize),
    apply: Vec<Duration>,
    new: Vec<f64>,
    est: Vec<f64>,
    est_mean: Vec<f64>,
    denied: Vec<f64>,
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Part 1: new and established flows with 1 .. 100 000 rules on the host. Returns the
/// established medians for part 4.
pub fn per_packet_by_rules(opts: &Options) -> Result<Established> {
    let samples = opts
        .samples
        .clamp(100, u32::from(u16::MAX - NEW_SPORT_BASE));
    let mut f = fixture("secpp");
    let specs: Vec<(RuleCounts, PolicySpec)> = [1usize, 100, 10_000, 100_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let counts = RuleCounts::split(n);
            (counts, policy(counts, 0x5eed + i as u64))
        })
        .collect();
    let mut rows: Vec<RuleRow> = specs
        .iter()
        .map(|(counts, _)| RuleRow {
            counts: *counts,
            ..RuleRow::default()
        })
        .collect();
    let mut repeat_note = None;
    for _ in 0..RULE_ROUNDS {
        for ((counts, spec), row) in specs.iter().zip(&mut rows) {
            let rules = rule_count(spec);
            ensure!(rules == counts.total(), "{rules} rules generated");
            let (report, took) = apply_settled(&mut f, spec);
            ensure!(
                report.rule_sets_written > 0,
                "nothing installed: {report:?}"
            );
            row.apply.push(took);
            let ((_, addr, ports), (own_addr, own_ports)) = installed(&mut f)?;
            ensure!(
                own_addr >= 1 && addr >= rules / 4,
                "only {addr} address entries ({own_addr} of `me`) for {rules} rules"
            );
            row.entries = (addr, ports, own_addr, own_ports);

            clear_conntrack(&f)?;
            let new = single_runs(&f, f.me, samples, |i| {
                from_me(NEW_SPORT_BASE + i as u16, SERVICE_PORT, tcp_flags::SYN)
            })?;
            open_flow(&f)?;
            let est = single_runs(&f, f.me, samples, |_| {
                from_me(EST_SPORT, SERVICE_PORT, tcp_flags::ACK)
            })?;
            // No rule admits TCP port 1: dropped after `me`'s outbound lookups, nothing
            // stored.
            let denied = single_runs_expecting(&f, f.me, samples, TC_ACT_SHOT, |i| {
                from_me(NEW_SPORT_BASE + i as u16, 1, tcp_flags::SYN)
            })
            .context("SYN to port 1 (no rule admits it)")?;
            if repeat_note.is_none() {
                repeat_note = Some(repeat_average(&f, 10_000)?);
            }
            row.new.push(new.median);
            row.est.push(est.median);
            row.est_mean.push(est.mean);
            row.denied.push(denied.median);
        }
    }

    println!(
        "\n== security groups, per packet: port program `me` -> `peer` (outbound SG of me, \
         inbound SG of peer, conntrack), BPF_PROG_TEST_RUN, median of {samples} single runs, \
         median of {RULE_ROUNDS} interleaved rounds, ns/packet =="
    );
    println!(
        "{:>9} {:>5} {:>5} {:>6} {:>15} {:>17} {:>8} {:>7} {:>6} {:>7} {:>7} {:>6} {:>7} {:>6}",
        "rules",
        "me",
        "peer",
        "b",
        "SG_ADDR",
        "SG_PORT",
        "apply ms",
        "new",
        "ratio",
        "estab",
        "(mean)",
        "ratio",
        "denied",
        "ratio"
    );
    let mut out = Vec::new();
    let base = (
        median_f64(&rows[0].new),
        median_f64(&rows[0].est),
        median_f64(&rows[0].denied),
    );
    for row in &rows {
        let c = row.counts;
        let (new, est, denied) = (
            median_f64(&row.new),
            median_f64(&row.est),
            median_f64(&row.denied),
        );
        let rules = c.total();
        println!(
            "{:>9} {:>5} {:>5} {:>6} {:>15} {:>17} {:>8.1} {:>7.0} {:>6.2} {:>7.0} {:>7.0} {:>6.2} \
             {:>7.0} {:>6.2}",
            if rules == 2 {
                "1+1".to_owned()
            } else {
                rules.to_string()
            },
            c.me,
            c.peer,
            c.b,
            format!("{} ({})", row.entries.0, row.entries.2),
            format!("{} ({})", row.entries.1, row.entries.3),
            median_duration(row.apply.clone()).as_secs_f64() * 1e3,
            new,
            new / base.0,
            est,
            median_f64(&row.est_mean),
            est / base.1,
            denied,
            denied / base.2,
        );
        let label = if rules == 2 {
            "1+1".to_owned()
        } else {
            rules.to_string()
        };
        out.push((format!("{label} rules"), est));
    }
    println!(
        "rules: explicit rules of the groups of the local endpoints (`me`, `peer` at most \
         {ENDPOINT_RULES_MAX} each, `b` the rest; 1+1: one rule per direction, `me` outbound \
         and `peer` inbound; below 10 000 `b` has its VPC's implicit default group). SG_ADDR, \
         SG_PORT: entries in the kernel tries, all policies (`me`'s own). apply: the agent \
         pass installing the row's policy beside the previous row's."
    );
    println!(
        "new: SYN with a fresh source port (conntrack miss, me's outbound and peer's inbound \
         lookups, conntrack insert); estab: ACK of the tracked flow (one conntrack hit, no rule \
         lookup); denied: SYN to TCP port 1, which no rule admits (conntrack miss, me's \
         outbound lookups, drop counted). Ratios vs the first row; targets: established \
         within 1.2x, new within 2x at 100 000 rules."
    );
    match repeat_note.flatten() {
        Some(avg) => println!("established, kernel repeat average (10 000 repeats): {avg:.0} ns"),
        None => println!(
            "no kernel repeat average: BPF_PROG_TEST_RUN repeats on the forwarded (rewritten) \
             frame, whose source MAC is then the router's, and anti-spoofing drops it; the \
             mean of the single runs is shown instead."
        ),
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Part 2.

fn median_duration(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// `spec` with one rule of group `group` changed (its first random rule gets another port).
fn change_one_rule(spec: &PolicySpec, group: &str) -> PolicySpec {
    let mut s = spec.clone();
    if let Some(g) = s.security_groups.iter_mut().find(|g| g.id == group) {
        let r = g.outbound.last_mut().or(g.inbound.last_mut());
        if let Some(r) = r {
            *r = cidr_rule(
                Protocol::TCP,
                Some((7777, 7777)),
                u32::from_be_bytes([10, 99, 0, 0]),
                16,
            );
        }
    }
    s
}

/// Part 2: compile and apply 10 000 rules.
pub fn apply_time() -> Result<()> {
    const ROUNDS: usize = 3;
    let mut f = fixture("secap");
    let counts = RuleCounts::split(10_000);
    let spec = policy(counts, 0x5eed + 2);
    let rules = rule_count(&spec);
    let refs = spec.refs(&f.state);
    let mut compile_times = Vec::new();
    let mut sets = (0, 0, 0);
    for _ in 0..5 {
        let start = Instant::now();
        let c = compile(&refs.input(&spec.security_groups, &spec.network_acls, &spec.limits))?;
        compile_times.push(start.elapsed());
        sets = (
            c.sg_sets.len(),
            c.sg_sets.values().map(|t| t.addr.len()).sum(),
            c.sg_sets.values().map(|t| t.ports.len()).sum(),
        );
    }
    let small = change_one_rule(&spec, "sg-me-0");
    // From `small`: only `b`'s set changes.
    let large = change_one_rule(&small, "sg-b-0");
    let default = PolicySpec::default();
    let names = [
        "compile only (pure, no maps)",
        "fresh install (one agent pass)",
        "pass with nothing changed",
        "one rule changed, `me` (1 000-rule set)",
        "  next pass: old set removed",
        "one rule changed, `b` (8 000-rule set)",
        "  next pass: old set removed",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    times[0] = compile_times;
    let mut written = [0usize; 3];
    for _ in 0..ROUNDS {
        apply_settled(&mut f, &default);
        let timed = |f: &mut Fixture, p: &PolicySpec| {
            let start = Instant::now();
            let r = f.apply_policy(p);
            (r, start.elapsed())
        };
        let (r, t) = timed(&mut f, &spec);
        written[0] = r.rule_sets_written;
        times[1].push(t);
        let (r, t) = timed(&mut f, &spec);
        ensure!(r.rule_sets_written == 0, "{r:?}");
        times[2].push(t);
        let (r, t) = timed(&mut f, &small);
        written[1] = r.rule_sets_written;
        times[3].push(t);
        let (r, t) = timed(&mut f, &small);
        ensure!(r.rule_sets_removed > 0, "{r:?}");
        times[4].push(t);
        let (r, t) = timed(&mut f, &large);
        written[2] = r.rule_sets_written;
        times[5].push(t);
        let (r, t) = timed(&mut f, &large);
        ensure!(r.rule_sets_removed > 0, "{r:?}");
        times[6].push(t);
    }
    let ((_, addr, ports), _) = installed(&mut f)?;
    println!(
        "\n== security groups, compile and apply {rules} rules (`me` {}, `peer` {}, `b` {}): \
         {} group sets, {} address and {} port entries; median of {ROUNDS} rounds (compile: \
         of 5), target < 1 s ==",
        counts.me, counts.peer, counts.b, sets.0, sets.1, sets.2
    );
    println!("{:<42} {:>10} {:>10}", "operation", "ms", "vs 1 s");
    for (name, t) in names.iter().zip(times) {
        let m = median_duration(t);
        println!(
            "{name:<42} {:>10.1} {:>10.3}",
            m.as_secs_f64() * 1e3,
            m.as_secs_f64()
        );
    }
    println!(
        "rule sets written: fresh {}, small change {}, large change {}; kernel now holds \
         {addr} SG_ADDR and {ports} SG_PORT entries. A pass compiles everything, writes \
         changed sets under new ids beside the old ones, switches endpoints, and removes \
         replaced sets on the following pass.",
        written[0], written[1], written[2]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Part 3.

/// Established `me` -> `peer` flows to prefill: (source port, destination port), distinct.
fn me_peer_flow(j: u32) -> (u16, u16) {
    // Source ports 1024..=65535; destination ports from 2000 up (never the tracked flow's).
    ((1024 + j % 64_512) as u16, (2000 + j / 64_512) as u16)
}

fn established_entry(now: u64, opened_by_lo: bool) -> CtEntry {
    CtEntry {
        last_seen_ns: now,
        state: CtState::Established as u32,
        flags: CT_REPLIED | if opened_by_lo { CT_OPENED_BY_LO } else { 0 },
        ..CtEntry::default()
    }
}

/// `total` distinct conntrack entries in VNI 100: every other one a `me` -> `peer` flow (the
/// index of its [`me_peer_flow`] returned), the others random TCP/UDP flows between
/// addresses of 10.0.0.0/16.
fn prefill_entries(rng: &mut Rng, from: u32, to: u32, now: u64) -> Vec<(CtKey, CtEntry)> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity((to - from) as usize);
    for i in from..to {
        let key = if i % 2 == 0 {
            let (sport, dport) = me_peer_flow(i / 2);
            CtKey {
                vni: VNI_A,
                lo_addr: ipv4_mapped(ME_IP),
                hi_addr: ipv4_mapped(PEER_IP),
                lo_port: sport,
                hi_port: dport,
                proto: 6,
                _pad: [0; 3],
            }
        } else {
            loop {
                let r = rng.next();
                let a = (
                    ipv4_mapped([10, 0, r as u8, (r >> 8) as u8]),
                    (r >> 16) as u16,
                );
                let b = (
                    ipv4_mapped([10, 0, (r >> 32) as u8, (r >> 40) as u8]),
                    (r >> 48) as u16,
                );
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                let key = CtKey {
                    vni: VNI_A,
                    lo_addr: lo.0,
                    hi_addr: hi.0,
                    lo_port: lo.1,
                    hi_port: hi.1,
                    proto: if r & 1 == 0 { 6 } else { 17 },
                    _pad: [0; 3],
                };
                // Never one of the `me` -> `peer` flows.
                if key.lo_addr != ipv4_mapped(ME_IP) && seen.insert(key) {
                    break key;
                }
            }
        };
        out.push((key, established_entry(now, true)));
    }
    out
}

/// Part 3: established flows with 1 000 and 1 000 000 conntrack entries.
pub fn conntrack_scale(opts: &Options) -> Result<()> {
    const CAPACITY: u32 = 2_097_152;
    let samples = opts.samples.max(100);
    let f = fixture_with("secct", Some(CAPACITY));
    let maps = f.host.policy_maps();
    ensure!(maps.conntrack_capacity()? == CAPACITY, "conntrack capacity");
    open_flow(&f)?;
    let mut rng = Rng(0xc0ff_ee11);
    println!(
        "\n== conntrack: established `me` -> `peer` packet (default security groups), port \
         program, BPF_PROG_TEST_RUN, median of {samples} single runs, ns/packet; table of \
         {CAPACITY} entries (LRU hash) =="
    );
    println!(
        "{:>10} {:>11} {:>8} {:>8} {:>14} {:>8} {:>8}",
        "entries", "prefill ms", "same", "ratio", "random stored", "(mean)", "ratio"
    );
    let mut filled = 0u32;
    let mut base = None;
    for target in [1_000u32, 1_000_000] {
        let entries = prefill_entries(&mut rng, filled, target, now_ns());
        let start = Instant::now();
        maps.ct_insert(&entries)?;
        let prefill = start.elapsed();
        filled = target;
        let present = maps.ct_sweep(now_ns(), false)?.entries;
        ensure!(
            present >= target as usize,
            "only {present} conntrack entries after inserting {target}"
        );
        let same = single_runs(&f, f.me, samples, |_| {
            from_me(EST_SPORT, SERVICE_PORT, tcp_flags::ACK)
        })?;
        // A different stored `me` -> `peer` flow each run (indices drawn up front).
        let flows: Vec<(u16, u16)> = (0..samples)
            .map(|_| me_peer_flow(rng.below(u64::from(target / 2)) as u32))
            .collect();
        let random = single_runs(&f, f.me, samples, |i| {
            let (sport, dport) = flows[i as usize];
            from_me(sport, dport, tcp_flags::ACK)
        })?;
        let (b_same, b_random) = *base.get_or_insert((same.median, random.median));
        println!(
            "{:>10} {:>11.0} {:>8.0} {:>8.2} {:>14.0} {:>8.0} {:>8.2}",
            present,
            prefill.as_secs_f64() * 1e3,
            same.median,
            same.median / b_same,
            random.median,
            random.mean,
            random.median / b_random,
        );
    }
    println!(
        "same: one tracked flow every run (its entry stays in cache); random stored: each run \
         the ACK of another prefilled `me` -> `peer` flow (half the entries), so the lookup \
         touches a bucket and entry not used by the previous run. Ratios vs the first row."
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Part 4.

/// Whether `nft` can run.
fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// An nftables ruleset: table `inet secbench`, chains `input`, `forward`, `output` each
/// `ct state established,related accept` then `rules` rules that never match the benchmark's
/// traffic (TCP from 203.0.113.0/24 and 198.51.100.0/24; the traffic is UDP from
/// 198.18.0.0/24).
fn nft_ruleset(rules: usize) -> String {
    let mut s = String::from("flush ruleset\ntable inet secbench {\n");
    for (chain, hook) in [
        ("input", "input"),
        ("forward", "forward"),
        ("output", "output"),
    ] {
        s.push_str(&format!(
            "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;\n    \
             ct state established,related accept\n"
        ));
        for i in 0..rules {
            let net = if i % 2 == 0 {
                "203.0.113"
            } else {
                "198.51.100"
            };
            s.push_str(&format!(
                "    ip saddr {net}.{} tcp dport {} drop\n",
                (i / 2) % 256,
                1 + i / 512
            ));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// A ruleset file, removed when dropped.
#[derive(Debug)]
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("vpc-{}-{name}", std::process::id()));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The CPU the ping-pong runs on: the last one this process may use.
fn pin_cpu() -> Option<usize> {
    if std::env::var_os("VPC_BENCH_NOPIN").is_some() {
        return None;
    }
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    (0..nix::sched::CpuSet::count())
        .rev()
        .find(|&c| set.is_set(c).unwrap_or(false))
}

/// Pins the calling thread to `cpu` (best effort).
fn pin_to(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// `round_trips` one-byte request/response exchanges; the elapsed time.
fn ping_pong(client: &UdpSocket, round_trips: u32) -> Result<Duration> {
    let mut buf = [0u8; 16];
    let start = Instant::now();
    for _ in 0..round_trips {
        client.send(&[1])?;
        let n = client.recv(&mut buf).context("waiting for the response")?;
        ensure!(n == 1, "response of {n} bytes");
    }
    Ok(start.elapsed())
}

/// Part 4: nftables + conntrack on established packets, end to end.
pub fn nft_baseline(opts: &Options, ours: &Established) -> Result<()> {
    let n = opts.round_trips.max(1000);
    let rounds = opts.rounds.max(1);
    println!(
        "\n== baseline: kernel nftables + conntrack, established packets, end to end: UDP \
         ping-pong (1 byte each way, blocking) between two namespaces over a veth, {n} round \
         trips, median of {rounds} interleaved rounds =="
    );
    if !nft_available() {
        println!("baseline skipped: nft not installed (`cargo xtask setup` installs nftables)");
        return Ok(());
    }
    let a = NetNs::new("secnfa")?;
    let b = NetNs::new("secnfb")?;
    veth_pair(&a, "sa0", &b, "sb0")?;
    a.add_addr("sa0", "198.18.0.1/24")?;
    b.add_addr("sb0", "198.18.0.2/24")?;
    let server = b.run(|| UdpSocket::bind("198.18.0.2:7777"))?;
    let client = a.run(|| -> io::Result<UdpSocket> {
        let s = UdpSocket::bind("198.18.0.1:0")?;
        s.connect("198.18.0.2:7777")?;
        Ok(s)
    })?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    server.set_read_timeout(Some(Duration::from_secs(60)))?;
    // Client and server on one CPU: each round trip is then two context switches on that
    // CPU instead of cross-CPU wakeups, which vary much more on a small VM.
    let cpu = pin_cpu();

    let files = [
        None,
        Some(TempFile::new("nft1", &nft_ruleset(1))?),
        Some(TempFile::new("nft10k", &nft_ruleset(10_000))?),
    ];
    let names = [
        "(a) no nftables",
        "(b) ct established accept + 1 rule/chain",
        "(b) ct established accept + 10 000 rules/chain",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
    let mut load_ms = vec![0.0; files.len()];
    std::thread::scope(|scope| -> Result<()> {
        let echo = scope.spawn(|| -> io::Result<()> {
            pin_to(cpu);
            let mut buf = [0u8; 16];
            loop {
                let (len, from) = server.recv_from(&mut buf)?;
                if buf[..len] == [0xff] {
                    return Ok(());
                }
                server.send_to(&buf[..len], from)?;
            }
        });
        let measure = scope
            .spawn(|| -> Result<()> {
                pin_to(cpu);
                // Warm up ARP, caches and the CPU frequency.
                ping_pong(&client, n / 5)?;
                for _ in 0..rounds {
                    for (i, file) in files.iter().enumerate() {
                        let start = Instant::now();
                        match file {
                            None => b.exec("nft", ["flush", "ruleset"]).map(drop)?,
                            Some(file) => b
                                .exec("nft", [std::ffi::OsStr::new("-f"), file.0.as_os_str()])
                                .map(drop)?,
                        }
                        load_ms[i] = start.elapsed().as_secs_f64() * 1e3;
                        // The first packets make the flow established (and run the rules
                        // once).
                        ping_pong(&client, 100)?;
                        let t = ping_pong(&client, n)?;
                        samples[i].push(t.as_secs_f64() * 1e9 / f64::from(n));
                    }
                }
                b.exec("nft", ["flush", "ruleset"]).map(drop)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the ping-pong client panicked"))?;
        let _ = client.send(&[0xff]);
        echo.join()
            .map_err(|_| anyhow::anyhow!("the ping-pong server panicked"))?
            .context("ping-pong server")?;
        measure
    })?;
    let rules_loaded = |rules: usize| rules * 3 + 3;
    let medians: Vec<f64> = samples
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect();
    println!(
        "{:<48} {:>9} {:>19} {:>12} {:>9}",
        "configuration (nftables in the server's namespace)",
        "RTT us",
        "(min, max)",
        "ns/packet",
        "load ms"
    );
    for (i, name) in names.iter().enumerate() {
        let mut s = samples[i].clone();
        s.sort_by(f64::total_cmp);
        let per_packet = if i == 0 {
            "-".to_owned()
        } else {
            format!("{:.0}", (medians[i] - medians[0]) / 2.0)
        };
        println!(
            "{name:<48} {:>9.2} {:>19} {:>12} {:>9.0}",
            medians[i] / 1e3,
            format!("({:.2}, {:.2})", s[0] / 1e3, s[s.len() - 1] / 1e3),
            per_packet,
            load_ms[i],
        );
    }
    let nft_cost = [
        (medians[1] - medians[0]) / 2.0,
        (medians[2] - medians[0]) / 2.0,
    ];
    println!(
        "ns/packet = (RTT(b) - RTT(a)) / 2: each round trip is two packets, each through one \
         nftables hook with conntrack in the server's namespace (request: input; response: \
         output). Tables hold {} and {} rules; established packets stop at the first rule, \
         so the 10 000 non-matching rules are skipped.",
        rules_loaded(1),
        rules_loaded(10_000)
    );
    if ours.is_empty() {
        return Ok(());
    }
    println!(
        "\n{:<48} {:>10} {:>14} {:>16}",
        "ours: established packet, whole port program", "ns", "vs nft 1 rule", "vs nft 10k rules"
    );
    for (label, ns) in ours {
        let ratio = |nft: f64| {
            if nft > 0.0 {
                format!("{:.2}", ns / nft)
            } else {
                "-".to_owned()
            }
        };
        println!(
            "{:<48} {:>10.0} {:>14} {:>16}",
            format!("with {label}"),
            ns,
            ratio(nft_cost[0]),
            ratio(nft_cost[1])
        );
    }
    println!(
        "Not like for like: the nftables figure is an end-to-end differential measurement \
         (real packets through the stack; only the extra cost of conntrack + the chain), ours \
         is program-level (BPF_PROG_TEST_RUN of the whole port program: parsing, \
         anti-spoofing, routing, conntrack and rewriting, without the stack)."
    );
    if nft_cost.iter().any(|c| *c <= 0.0) {
        println!(
            "warning: an nftables differential is not positive: the ping-pong was too noisy \
             this run (more --rounds or --round-trips)"
        );
    }
    Ok(())
}
