//! The metrics endpoints, end to end: a real control plane and agent (cluster in
//! namespaces), instances with security groups, real traffic between them; both endpoints
//! scraped over HTTP and parsed strictly (a malformed line fails the test).
//!
//! Checks that values change as they must: API call counts and latency histograms by method
//! and code grow after calls (including an INVALID_ARGUMENT one); network programming
//! latency has samples on both sides; the applied revision reaches the store revision; port
//! packets and per-endpoint and per-VPC packets grow after a ping between two instances; a
//! connection the server's security group refuses raises that endpoint's `sg_ingress` drops;
//! conntrack entries of the VPC are counted while a flow is open (agent and control plane).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use vpc_tests::cluster::Cluster;

/// The control plane's default metrics address (in the fabric namespace).
const CP_METRICS: &str = "127.0.0.1:9465";

// ---- HTTP and exposition parsing ---------------------------------------------------------

/// Runs `f` on a thread that entered the network namespace at `netns`.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let file = std::fs::File::open(netns)
                .with_context(|| format!("opening {}", netns.display()))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
    })
}

/// `GET /metrics` on `addr` from the namespace at `netns`: checks the status and the
/// content type, returns the body.
fn scrape(netns: &Path, addr: SocketAddr) -> Result<String> {
    let raw = in_netns(netns, || -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf)
    })??;
    let text = String::from_utf8(raw).context("the response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the response headers")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scrape of {addr}: {head}");
    ensure!(
        head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("content-type:") && l.contains("text/plain; version=0.0.4")
        }),
        "content type: {head}"
    );
    ensure!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    Ok(body.to_owned())
}

/// A series' labels other than `le`, sorted.
type Labels = Vec<(String, String)>;

/// One sample.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(v: &str) -> Result<f64> {
    Ok(match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().with_context(|| format!("bad value {v:?}"))?,
    })
}

/// The family a sample name belongs to (histogram suffixes stripped when declared so).
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram")
        {
            return base;
        }
    }
    name
}

/// The labels of a sample, `r` starting after its `{`: (labels, the text after `}`).
fn parse_labels(r: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = r;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').context("label without =")?;
        let name = &rest[..eq];
        ensure!(
            valid_name(name) && !name.contains(':'),
            "bad label name {name:?}"
        );
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .context("unquoted label value")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => bail!("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => bail!("bad escape"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        ensure!(
            labels.insert(name.to_owned(), value).is_none(),
            "duplicate label {name}"
        );
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            ensure!(rest.starts_with('}'), "bad label list");
        }
    }
}

/// Parses the text exposition format strictly: `# HELP`/`# TYPE` before a family's samples,
/// each family's lines contiguous, label values quoted with escapes, values numbers.
fn parse(text: &str) -> Result<Scrape> {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    let mut done: Vec<String> = Vec::new();
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            ensure!(valid_name(name), "bad metric name: {}", at());
            if name != current {
                ensure!(!done.contains(&name.to_owned()), "family split: {}", at());
                if !current.is_empty() {
                    done.push(std::mem::take(&mut current));
                }
                current = name.to_owned();
            }
            match kw {
                "HELP" => {
                    ensure!(
                        helps.insert(name.to_owned(), ()).is_none(),
                        "two HELP: {}",
                        at()
                    );
                }
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    ensure!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "bad type: {}",
                        at()
                    );
                    ensure!(
                        types.insert(name.to_owned(), t.to_owned()).is_none(),
                        "two TYPE: {}",
                        at()
                    );
                }
                _ => bail!("unknown comment: {}", at()),
            }
            continue;
        }
        ensure!(!line.starts_with('#'), "bad comment: {}", at());
        // name{labels} value
        let name_end = line.find(['{', ' ']).with_context(at)?;
        let name = &line[..name_end];
        ensure!(valid_name(name), "bad sample name: {}", at());
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            (labels, rest) = parse_labels(r).with_context(at)?;
        }
        let value = rest
            .strip_prefix(' ')
            .with_context(|| format!("no value: {}", at()))?;
        ensure!(
            !value.contains(' '),
            "timestamps are not expected: {}",
            at()
        );
        let value = parse_value(value).with_context(at)?;
        let family = family_of(name, &types);
        ensure!(
            family == current,
            "sample outside its family block: {}",
            at()
        );
        ensure!(
            types.contains_key(family),
            "sample before its TYPE: {}",
            at()
        );
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets ending in +Inf equal to _count.
    for (family, t) in &types {
        if t != "histogram" {
            continue;
        }
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = parse_value(s.labels.get("le").context("bucket without le")?)?;
            let key: Labels = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            ensure!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}{key:?}: buckets not increasing: {buckets:?}"
            );
            let last = buckets.last().context("no buckets")?;
            ensure!(last.0.is_infinite(), "{family}{key:?}: no +Inf bucket");
            let count = samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count")
                        && s.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .eq(key.iter().cloned())
                })
                .with_context(|| format!("{family}{key:?}: no _count"))?;
            ensure!(count.value == last.1, "{family}{key:?}: +Inf != _count");
        }
    }
    Ok(Scrape { samples, types })
}

impl Scrape {
    /// Sum of the samples named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
            .fold(0.0, |a, b| a + b)
    }

    /// The one sample named `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }
}

#[test]
fn the_parser_rejects_malformed_expositions() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\\\"\\\\\\n\"} 3\n\
                # HELP h y\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n";
    let s = parse(good).unwrap();
    assert_eq!(s.get("a_total", &[("l", "v\"\\\n")]), Some(3.0));
    assert_eq!(s.types["h"], "histogram");
    for bad in [
        "a 1\n",                                                    // no TYPE
        "# TYPE a gauge\na{l=v} 1\n",                               // unquoted
        "# TYPE a gauge\na{l=\"v} 1\n",                             // unterminated
        "# TYPE a gauge\na 1 2 3\n",                                // junk
        "# TYPE a gauge\na x\n",                                    // not a number
        "# TYPE a gauge\n# TYPE b gauge\na 1\n",                    // outside its block
        "# TYPE 9a gauge\n",                                        // bad name
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", // +Inf != count
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

// ---- the cluster ---------------------------------------------------------------------------

/// A successful `vpc ARGS -o json --query Q`, as a plain string.
fn q(c: &Cluster, args: &[&str], query: &str) -> Result<String> {
    c.cli_query(args, query)
}

/// Polls `f` every 250 ms until it returns `Some`, at most `timeout`; the last error or
/// state is in the failure.
fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) if Instant::now() > deadline => bail!("timed out waiting for {what}"),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("timed out waiting for {what}")));
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

struct Endpoints {
    agent_ns: PathBuf,
    agent: SocketAddr,
    cp_ns: PathBuf,
    cp: SocketAddr,
}

impl Endpoints {
    fn agent(&self) -> Result<Scrape> {
        parse(&scrape(&self.agent_ns, self.agent)?)
    }

    fn cp(&self) -> Result<Scrape> {
        parse(&scrape(&self.cp_ns, self.cp)?)
    }
}

/// The agent's metrics address, from its `metrics on ADDR` line.
fn agent_metrics_addr(c: &Cluster) -> Result<SocketAddr> {
    c.agent_lines(0)
        .iter()
        .find_map(|l| l.strip_prefix("metrics on "))
        .context("the agent printed no `metrics on` line")?
        .parse()
        .context("agent metrics address")
}

/// Accepts connections on `listener` until one comes from `peer` (health checks connect
/// too); at most 100.
fn accept_from(listener: &TcpListener, peer: Ipv4Addr) -> Result<TcpStream> {
    for _ in 0..100 {
        let (conn, from) = listener.accept()?;
        if from.ip() == std::net::IpAddr::V4(peer) {
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            return Ok(conn);
        }
    }
    bail!("no connection from {peer} among 100 accepted")
}

const CREATE_VPC: [(&str, &str); 2] = [("service", "vpc.v1.VpcService"), ("method", "CreateVpc")];

#[test]
fn metrics_follow_api_calls_programming_and_traffic() -> Result<()> {
    let c = Cluster::start(1)?;
    let ep = Endpoints {
        agent_ns: c.host(0).path(),
        agent: agent_metrics_addr(&c)?,
        cp_ns: c.fabric().path(),
        cp: CP_METRICS.parse()?,
    };

    // Both endpoints answer, with the families they must always list.
    let cp0 = ep.cp()?;
    let a0 = ep.agent()?;
    for family in [
        "vpc_store_revision",
        "vpc_programming_latency_seconds",
        "vpc_api_request_duration_seconds",
        "vpc_api_requests_total",
        "vpc_host_connected",
    ] {
        ensure!(
            cp0.types.contains_key(family),
            "control plane lacks {family}"
        );
    }
    ensure!(cp0.get("vpc_host_connected", &[("host", "host-0")]) == Some(1.0));
    for family in [
        "vpc_datapath_packets_total",
        "vpc_endpoint_packets_total",
        "vpc_endpoint_drops_total",
        "vpc_vpc_packets_total",
        "vpc_conntrack_vpc_entries",
        "vpc_lb_target_connections",
        "vpc_agent_applied_revision",
        "vpc_agent_reconcile_duration_seconds",
        "vpc_agent_programming_latency_seconds",
        "vpc_flowlog_events_lost_total",
    ] {
        ensure!(a0.types.contains_key(family), "agent lacks {family}");
    }
    ensure!(a0.get("vpc_datapath_maps_readable", &[]) == Some(1.0));
    ensure!(a0.get("vpc_agent_info", &[("host", "host-0")]) == Some(1.0));

    // API calls: one accepted, one refused (INVALID_ARGUMENT: a /8 is too large).
    let invalid = [CREATE_VPC[0], CREATE_VPC[1], ("code", "INVALID_ARGUMENT")];
    let okc = [CREATE_VPC[0], CREATE_VPC[1], ("code", "OK")];
    let before_invalid = cp0.sum("vpc_api_requests_total", &invalid);
    let before_ok = cp0.sum("vpc_api_requests_total", &okc);
    let vpc = q(
        &c,
        &["vpcs", "create", "--cidr", "10.0.0.0/16"],
        "vpc.vpcId",
    )?;
    let out = c.cli(&["vpcs", "create", "--cidr", "10.0.0.0/8"])?;
    ensure!(out.status.code() == Some(2), "a /8 VPC was not refused");
    let cp1 = ep.cp()?;
    assert_eq!(
        cp1.sum("vpc_api_requests_total", &invalid),
        before_invalid + 1.0
    );
    assert_eq!(cp1.sum("vpc_api_requests_total", &okc), before_ok + 1.0);
    assert_eq!(
        cp1.sum("vpc_api_request_duration_seconds_count", &invalid),
        before_invalid + 1.0
    );
    ensure!(cp1.sum("vpc_api_request_duration_seconds_sum", &okc) > 0.0);

    // Two instances: the server admits ICMP and TCP 5001 from the VPC, nothing else.
    let subnet = q(
        &c,
        &["subnets", "create", "--vpc", &vpc, "--cidr", "10.0.1.0/24"],
        "subnet.subnetId",
    )?;
    let group = |name: &str| {
        q(
            &c,
            &[
                "security-groups",
                "create",
                "--vpc",
                &vpc,
                "--name",
                name,
                "--description",
                name,
            ],
            "securityGroup.groupId",
        )
    };
    let (sg_server, sg_client) = (group("server")?, group("client")?);
    for (proto, port) in [("icmp", "-1"), ("tcp", "5001")] {
        q(
            &c,
            &[
                "security-groups",
                "authorize-ingress",
                &sg_server,
                "--protocol",
                proto,
                "--port",
                port,
                "--cidr",
                "10.0.0.0/16",
            ],
            "rules[0].securityGroupRuleId",
        )?;
    }
    let run = |sg: &str| {
        q(
            &c,
            &[
                "instances",
                "run",
                "--subnet",
                &subnet,
                "--security-group",
                sg,
                "--command",
                "exec sleep 1000",
                "--wait",
            ],
            "instances[0].instanceId",
        )
    };
    let (server, client) = (run(&sg_server)?, run(&sg_client)?);
    let server_ip: Ipv4Addr = q(
        &c,
        &["instances", "list", &server],
        "instances[0].privateIpAddress",
    )?
    .parse()?;
    let client_ip: Ipv4Addr = q(
        &c,
        &["instances", "list", &client],
        "instances[0].privateIpAddress",
    )?
    .parse()?;
    let netns = |id: &str| PathBuf::from("/run/netns").join(c.instance_netns(id));
    // The server's TCP 5001 (also the load balancer's target port, checked every 5 s).
    let listener = in_netns(&netns(&server), || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5001))
    })??;

    // A load balancer in front of the server: target health and connections per target.
    let tg = q(
        &c,
        &[
            "target-groups",
            "create",
            "--name",
            "echo",
            "--vpc",
            &vpc,
            "--port",
            "5001",
            "--health-check-interval",
            "5",
            "--healthy-threshold",
            "2",
        ],
        "targetGroup.targetGroupId",
    )?;
    let out = c.cli(&["target-groups", "register", &tg, &server])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lb = q(
        &c,
        &[
            "load-balancers",
            "create",
            "--name",
            "front",
            "--subnet",
            &subnet,
        ],
        "loadBalancer.loadBalancerId",
    )?;
    let out = c.cli(&[
        "load-balancers",
        "add-listener",
        &lb,
        "--port",
        "80",
        "--target-group",
        &tg,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vip: Ipv4Addr = q(&c, &["load-balancers", "list", &lb], "loadBalancers[0].vip")?.parse()?;

    // Programming latency has samples on both sides; the applied revision reaches the
    // store's (nothing else writes now).
    let cp2 = eventually(Duration::from_secs(30), "the applied revision", || {
        let s = ep.cp()?;
        let store = s
            .get("vpc_store_revision", &[])
            .context("no store revision")?;
        let host = s.get("vpc_host_applied_revision", &[("host", "host-0")]);
        let agent = ep.agent()?.get("vpc_agent_applied_revision", &[]);
        Ok((host == Some(store) && agent == Some(store)).then_some(s))
    })?;
    ensure!(cp2.get("vpc_programming_latency_seconds_count", &[]) > Some(0.0));
    ensure!(cp2.get("vpc_host_revision_lag", &[("host", "host-0")]) == Some(0.0));

    let a1 = ep.agent()?;
    ensure!(a1.get("vpc_agent_reconcile_duration_seconds_count", &[]) > Some(0.0));
    ensure!(a1.get("vpc_agent_programming_latency_seconds_count", &[]) > Some(0.0));
    let port_packets = |s: &Scrape| s.sum("vpc_datapath_packets_total", &[("hook", "port")]);
    let server_sg_drops = |s: &Scrape| {
        s.sum(
            "vpc_endpoint_drops_total",
            &[("instance", &server), ("reason", "sg_ingress")],
        )
    };
    let vpc_sg_drops = |s: &Scrape| {
        s.sum(
            "vpc_vpc_drops_total",
            &[("vpc", &vpc), ("reason", "sg_ingress")],
        )
    };

    // Traffic: a ping both ways' worth, and a connection the server's group refuses.
    let ping = c.in_instance(
        &client,
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "2", &server_ip.to_string()],
    )?;
    ensure!(
        ping.status.success(),
        "ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let refused = in_netns(&netns(&client), || {
        TcpStream::connect_timeout(&SocketAddr::from((server_ip, 5002)), Duration::from_secs(1))
    })?;
    ensure!(
        refused.is_err(),
        "TCP 5002 was not refused by the security group"
    );

    // A long-lived flow (conntrack entry of the VPC while it is open).
    let mut conn = in_netns(&netns(&client), || {
        TcpStream::connect_timeout(&SocketAddr::from((server_ip, 5001)), Duration::from_secs(2))
    })??;
    let mut accepted = accept_from(&listener, client_ip)?;
    conn.write_all(b"hello")?;
    let mut buf = [0u8; 5];
    accepted.read_exact(&mut buf)?;

    let a2 = ep.agent()?;
    ensure!(
        port_packets(&a2) >= port_packets(&a1) + 6.0,
        "port packets {} -> {}",
        port_packets(&a1),
        port_packets(&a2)
    );
    ensure!(
        server_sg_drops(&a2) > server_sg_drops(&a1),
        "sg_ingress drops of {server}: {} -> {}",
        server_sg_drops(&a1),
        server_sg_drops(&a2)
    );
    ensure!(
        vpc_sg_drops(&a2) > vpc_sg_drops(&a1),
        "per-VPC sg_ingress drops did not grow"
    );
    ensure!(
        a2.sum(
            "vpc_datapath_drops_total",
            &[("hook", "port"), ("reason", "sg_ingress")]
        ) > a1.sum(
            "vpc_datapath_drops_total",
            &[("hook", "port"), ("reason", "sg_ingress")]
        )
    );

    // Conntrack entries of the VPC while the flow is open (the agent's GC runs every 10 s;
    // the control plane has them from the agent's next report).
    let vni_entries = |s: &Scrape| s.sum("vpc_conntrack_vpc_entries", &[("vpc", &vpc)]);
    eventually(
        Duration::from_secs(40),
        "conntrack entries of the VPC",
        || {
            let (a, cp) = (ep.agent()?, ep.cp()?);
            Ok((vni_entries(&a) > 0.0
                && cp.sum(
                    "vpc_conntrack_vpc_entries",
                    &[("host", "host-0"), ("vpc", &vpc)],
                ) > 0.0
                && a.get("vpc_conntrack_capacity", &[]) > Some(0.0)
                && a.sum("vpc_conntrack_vpc_pressure", &[("vpc", &vpc)]) > 0.0)
                .then_some(()))
        },
    )?;
    conn.write_all(b"still")?;
    accepted.read_exact(&mut buf)?;

    // Per-endpoint and per-VPC packets (ENDPOINT_STATS): the ping's requests left the
    // client, its replies reached it.
    let ep_packets = |s: &Scrape, id: &str, dir: &str| {
        s.sum(
            "vpc_endpoint_packets_total",
            &[("instance", id), ("direction", dir)],
        )
    };
    let a3 = ep.agent()?;
    for (id, dir) in [
        (&client, "egress"),
        (&client, "ingress"),
        (&server, "ingress"),
    ] {
        ensure!(
            ep_packets(&a3, id, dir) >= ep_packets(&a1, id, dir) + 3.0,
            "{id} {dir} packets: {} -> {}",
            ep_packets(&a1, id, dir),
            ep_packets(&a3, id, dir)
        );
    }
    let vpc_packets = |s: &Scrape| s.sum("vpc_vpc_packets_total", &[("vpc", &vpc)]);
    ensure!(
        vpc_packets(&a3) >= vpc_packets(&a1) + 6.0,
        "per-VPC packets did not grow"
    );
    ensure!(
        a3.sum("vpc_vpc_bytes_total", &[("vpc", &vpc)])
            > a1.sum("vpc_vpc_bytes_total", &[("vpc", &vpc)])
    );

    // Load balancing: the target turns healthy (agent and control plane), and a connection
    // through the VIP is counted on it while open.
    let target = [
        ("target_group", tg.as_str()),
        ("target", server.as_str()),
        ("port", "5001"),
    ];
    let cp_target = [target[0], target[1], target[2], ("host", "host-0")];
    eventually(Duration::from_secs(60), "the target to be healthy", || {
        let (a, cp) = (ep.agent()?, ep.cp()?);
        Ok((a.get("vpc_lb_target_healthy", &target) == Some(1.0)
            && cp.get("vpc_lb_target_healthy", &cp_target) == Some(1.0))
        .then_some(()))
    })?;
    let connections = |s: &Scrape| {
        s.sum(
            "vpc_lb_target_connections",
            &[
                ("vip", &vip.to_string()),
                ("target", &server),
                ("target_port", "5001"),
            ],
        )
    };
    let before = connections(&ep.agent()?);
    let mut via_lb = in_netns(&netns(&client), || {
        TcpStream::connect_timeout(&SocketAddr::from((vip, 80)), Duration::from_secs(2))
    })??;
    let mut balanced = accept_from(&listener, client_ip)?;
    via_lb.write_all(b"via lb")?;
    let mut six = [0u8; 6];
    balanced.read_exact(&mut six)?;
    ensure!(&six == b"via lb");
    let a4 = ep.agent()?;
    ensure!(
        connections(&a4) >= before + 1.0,
        "connections of {server} behind {vip}: {before} -> {}",
        connections(&a4)
    );
    // What a scrape costs (printed for the notes; bounded so a regression shows).
    let started = Instant::now();
    for _ in 0..10 {
        ep.agent()?;
    }
    let agent_ms = started.elapsed().as_secs_f64() * 100.0;
    let started = Instant::now();
    for _ in 0..10 {
        ep.cp()?;
    }
    let cp_ms = started.elapsed().as_secs_f64() * 100.0;
    eprintln!(
        "scrape (incl. strict parse): agent {agent_ms:.2} ms ({} samples), control plane {cp_ms:.2} ms ({} samples)",
        a4.samples.len(),
        ep.cp()?.samples.len()
    );
    ensure!(
        agent_ms < 1000.0 && cp_ms < 1000.0,
        "a scrape takes over a second"
    );
    ensure!(
        a4.get(
            "vpc_lb_target_state",
            &[target[0], target[1], target[2], ("state", "healthy")]
        ) == Some(1.0)
    );
    Ok(())
}
