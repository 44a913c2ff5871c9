//! `vpc-bench api`: the control plane's API latency and the network programming latency,
//! with the real `vpc-controlplane` (embedded store, redb) and real agents.
//!
//! 1. API latency with [`Options::objects`] objects stored: the control plane alone in a
//!    namespace, preloaded with security groups (spread over VPCs, by 8 concurrent clients),
//!    then p50/p99/max of [`Options::samples`] sequential `CreateSecurityGroup` calls and of
//!    as many `DescribeSecurityGroups` calls (page size 100, walking the pages), and the
//!    throughput of creates from [`Options::clients`] concurrent clients.
//! 2. Network programming latency on a 3-host [`Cluster`]: (a) one instance at a time, from
//!    the `RunInstances` response to every host having applied its revision (and to its
//!    namespace existing); (b) [`Options::instances`] instances (`RunInstances` with count
//!    100), from the first request to every host having applied the last revision and to
//!    every namespace existing, with the server's own `GetProgrammingLatency` summary and a
//!    timeline of the hosts' progress.
//!
//! Results are printed and written as JSON to `target/bench/api.json` (or
//! `$VPC_BENCH_OUT_DIR/api.json`).

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use vpc_proto::v1::{
    self as pb, host_service_client::HostServiceClient,
    instance_service_client::InstanceServiceClient, security_service_client::SecurityServiceClient,
    vpc_service_client::VpcServiceClient,
};

use crate::cluster::{ACCOUNT_A, Authed, Cluster, ControlPlane, TOKEN_A, TempDir, channel};
use crate::netns::NetNs;

/// What to measure, and how much.
#[derive(Clone, Debug)]
pub struct Options {
    /// Objects (security groups) stored before part 1's measurements.
    pub objects: usize,
    /// Sequential calls measured per operation in part 1.
    pub samples: usize,
    /// Concurrent clients (preload and throughput).
    pub clients: usize,
    /// Creates per client in the throughput measurement.
    pub creates_per_client: usize,
    /// Single-instance rounds in part 2 (a).
    pub single_rounds: usize,
    /// Instances created in part 2 (b) (a multiple of 100).
    pub instances: usize,
    /// Hosts in part 2.
    pub hosts: usize,
    /// Run part 1.
    pub api_latency: bool,
    /// Run part 2.
    pub programming: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            objects: 10_000,
            samples: 1000,
            clients: 8,
            creates_per_client: 250,
            single_rounds: 20,
            instances: 1000,
            hosts: 3,
            api_latency: true,
            programming: true,
        }
    }
}

/// Target p99 of part 1's calls.
const P99_TARGET_MS: f64 = 10.0;
/// Security groups per VPC in the preload.
const GROUPS_PER_VPC: usize = 1000;

/// Quotas raised well above what the benchmark creates.
fn write_quotas(dir: &std::path::Path) -> Result<PathBuf> {
    let path = dir.join("quotas.json");
    let q = json!({
        "vpcs_per_account": 100_000,
        "instances_per_account": 100_000,
        "security_groups_per_vpc": 100_000,
        "subnets_per_vpc": 100_000,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&q)?)?;
    Ok(path)
}

/// Token of bench account `i` (part 1's per-client accounts).
fn bench_token(i: usize) -> String {
    format!("bench-account-{i:02}-token-0123456789abcdef")
}

/// Credentials with tenant A (the preloaded account) and `n` more accounts.
fn write_bench_credentials(path: &std::path::Path, n: usize) -> Result<()> {
    let mut accounts = vec![json!({"id": ACCOUNT_A, "tokens": [TOKEN_A]})];
    for i in 0..n {
        accounts.push(json!({"id": format!("9000000000{i:02}"), "tokens": [bench_token(i)]}));
    }
    let creds = json!({"accounts": accounts, "agent_tokens": []});
    std::fs::write(path, serde_json::to_vec_pretty(&creds)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Latency summary of samples, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Stats {
    pub(crate) fn of(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        if n == 0 {
            return Stats {
                n,
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        // Nearest rank.
        let rank = |p: f64| ms[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Stats {
            n,
            p50: rank(0.50),
            p99: rank(0.99),
            max: ms[n - 1],
            mean: ms.iter().sum::<f64>() / n as f64,
        }
    }

    pub(crate) fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": self.p50, "p99_ms": self.p99, "max_ms": self.max,
               "mean_ms": self.mean})
    }

    pub(crate) fn row(&self, name: &str) {
        println!(
            "{name:<52} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            self.n, self.p50, self.p99, self.max, self.mean
        );
    }
}

pub(crate) fn header() {
    println!(
        "{:<52} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "operation", "n", "p50 ms", "p99 ms", "max ms", "mean ms"
    );
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs both parts and writes the JSON report.
pub fn run(opts: &Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let skipped = || json!({"skipped": true});
    let api = if opts.api_latency {
        rt.block_on(api_latency(opts))
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
    } else {
        skipped()
    };
    if let Some(e) = api.get("error") {
        println!("\nAPI latency: FAILED: {e}");
    }
    let programming = if opts.programming {
        rt.block_on(programming_latency(opts))
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
    } else {
        skipped()
    };
    if let Some(e) = programming.get("error") {
        println!("\nnetwork programming: FAILED: {e}");
    }
    let report = json!({
        "benchmark": "api",
        "options": {
            "objects": opts.objects, "samples": opts.samples, "clients": opts.clients,
            "creates_per_client": opts.creates_per_client, "single_rounds": opts.single_rounds,
            "instances": opts.instances, "hosts": opts.hosts,
        },
        "api_latency": api,
        "network_programming": programming,
        "total_seconds": secs(started.elapsed()),
    });
    let path = out_dir()?.join("api.json");
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "\nresults written to {} (total {:.0} s)",
        path.display(),
        secs(started.elapsed())
    );
    if report["api_latency"].get("error").is_some()
        || report["network_programming"].get("error").is_some()
    {
        bail!("part of the benchmark failed (see above)");
    }
    Ok(())
}

/// `$VPC_BENCH_OUT_DIR`, else `target/bench` (the executable is `target/<profile>/vpc-bench`).
pub(crate) fn out_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("VPC_BENCH_OUT_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(std::path::Path::parent)
        .context("executable not under target/<profile>")?;
    Ok(target.join("bench"))
}

// ---------------------------------------------------------------------------------------
// Part 1: API latency.

async fn api_latency(opts: &Options) -> Result<Value> {
    let ns = NetNs::new("apib")?;
    ns.link_up("lo")?;
    let dir = TempDir::new("apib")?;
    let creds = dir.path().join("credentials.json");
    write_bench_credentials(&creds, opts.clients.max(1))?;
    let quotas = write_quotas(dir.path())?;
    let args = vec![
        "--store".to_owned(),
        format!("redb:{}", dir.path().join("store.redb").display()),
        "--credentials".into(),
        creds.display().to_string(),
        "--quotas".into(),
        quotas.display().to_string(),
    ];
    let cp = ControlPlane::start(&ns, "127.0.0.1:7420", &args)?;
    let url = cp.url.clone();
    let ns_path = ns.path();
    let mut clients = Vec::new();
    for _ in 0..opts.clients.max(1) {
        clients.push(channel(&ns_path, &url, TOKEN_A).await?);
    }

    // Preload: VPCs, then security groups spread over them, from every client at once.
    let vpcs_needed = opts.objects.div_ceil(GROUPS_PER_VPC).max(1);
    let mut vpc = VpcServiceClient::new(clients[0].clone());
    let mut vpc_ids = Vec::new();
    let t = Instant::now();
    for i in 0..vpcs_needed {
        let v = vpc
            .create_vpc(pb::CreateVpcRequest {
                cidr_block: format!("10.{}.0.0/16", i % 256),
                ..Default::default()
            })
            .await?
            .into_inner()
            .vpc
            .context("vpc")?;
        vpc_ids.push(v.vpc_id);
    }
    println!(
        "\n== API latency: control plane alone (redb), {} objects stored ==",
        opts.objects
    );
    let (preload, preload_aborted) = create_groups(&clients, &vpc_ids, "pre", opts.objects).await?;
    let preload_time = t.elapsed();
    // Objects per the store: the groups, the VPCs and each VPC's default group, ACL and route
    // table.
    println!(
        "preloaded {} security groups in {} VPCs with {} clients in {:.1} s ({:.0} creates/s, \
         p50 {:.2} ms, p99 {:.2} ms, {preload_aborted} attempts ABORTED and retried)",
        opts.objects,
        vpcs_needed,
        clients.len(),
        secs(preload_time),
        opts.objects as f64 / secs(preload_time),
        preload.p50,
        preload.p99,
    );

    // Sequential creates.
    let mut sg = SecurityServiceClient::new(clients[0].clone());
    let mut create = Vec::with_capacity(opts.samples);
    for i in 0..opts.samples {
        let req = pb::CreateSecurityGroupRequest {
            vpc_id: vpc_ids[i % vpc_ids.len()].clone(),
            group_name: format!("seq-{i}"),
            description: "bench".into(),
            ..Default::default()
        };
        let t = Instant::now();
        sg.create_security_group(req).await?;
        create.push(t.elapsed());
    }
    let create = Stats::of(&create);

    // Sequential lists, walking the pages of every group of the account.
    let mut list = Vec::with_capacity(opts.samples);
    let mut token = String::new();
    let mut pages = 0;
    let mut wrapped = 0;
    for _ in 0..opts.samples {
        let req = pb::DescribeSecurityGroupsRequest {
            page: Some(pb::Page {
                max_results: 100,
                next_token: token.clone(),
            }),
            ..Default::default()
        };
        let t = Instant::now();
        let r = sg.describe_security_groups(req).await?.into_inner();
        list.push(t.elapsed());
        ensure!(
            !r.security_groups.is_empty(),
            "DescribeSecurityGroups returned an empty page"
        );
        pages += 1;
        token = r.next_token;
        if token.is_empty() {
            wrapped += 1;
        }
    }
    let list = Stats::of(&list);

    // First page only, filtered by VPC (the cheapest list).
    let mut list_vpc = Vec::with_capacity(opts.samples);
    for i in 0..opts.samples {
        let req = pb::DescribeSecurityGroupsRequest {
            vpc_id: vpc_ids[i % vpc_ids.len()].clone(),
            page: Some(pb::Page {
                max_results: 100,
                next_token: String::new(),
            }),
            ..Default::default()
        };
        let t = Instant::now();
        sg.describe_security_groups(req).await?;
        list_vpc.push(t.elapsed());
    }
    let list_vpc = Stats::of(&list_vpc);

    // Concurrent creates, all in one account (writes of an account are serialized).
    let total = opts.creates_per_client * clients.len();
    let t = Instant::now();
    let (conc, conc_aborted) = create_groups(&clients, &vpc_ids, "conc", total).await?;
    let conc_time = t.elapsed();
    let throughput = total as f64 / secs(conc_time);

    // Concurrent creates, each client in its own account (one VPC each).
    let mut own = Vec::new();
    let mut own_vpcs = Vec::new();
    for i in 0..clients.len() {
        let ch = channel(&ns_path, &url, &bench_token(i)).await?;
        let v = VpcServiceClient::new(ch.clone())
            .create_vpc(pb::CreateVpcRequest {
                cidr_block: "10.0.0.0/16".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .vpc
            .context("vpc")?;
        own.push(ch);
        own_vpcs.push(vec![v.vpc_id]);
    }
    let t = Instant::now();
    let (sep, sep_aborted) = create_groups_in(&own, &own_vpcs, "sep", total).await?;
    let sep_time = t.elapsed();
    let sep_throughput = total as f64 / secs(sep_time);

    header();
    create.row("CreateSecurityGroup, sequential");
    list.row("DescribeSecurityGroups page 100 (walk all pages)");
    list_vpc.row("DescribeSecurityGroups page 100, one VPC, 1st page");
    conc.row(&format!(
        "CreateSecurityGroup, {} clients, 1 account",
        clients.len()
    ));
    sep.row(&format!(
        "CreateSecurityGroup, {} clients, 1 account each",
        clients.len()
    ));
    println!(
        "throughput, {} concurrent clients in one account: {throughput:.0} creates/s ({total} \
         creates in {:.2} s; {conc_aborted} attempts ABORTED by the server and retried)",
        clients.len(),
        secs(conc_time)
    );
    println!(
        "throughput, {} concurrent clients in {} accounts: {sep_throughput:.0} creates/s \
         ({total} creates in {:.2} s; {sep_aborted} attempts ABORTED)",
        clients.len(),
        clients.len(),
        secs(sep_time)
    );
    println!("(list walk: {pages} pages, wrapped around {wrapped} times)");
    let met = create.p99 < P99_TARGET_MS && list.p99 < P99_TARGET_MS;
    println!(
        "target p99 < {P99_TARGET_MS} ms for sequential create and list: {}",
        if met { "MET" } else { "NOT MET" }
    );
    drop(cp);
    Ok(json!({
        "objects_preloaded": opts.objects,
        "vpcs": vpcs_needed,
        "preload_seconds": secs(preload_time),
        "preload_creates_per_s": opts.objects as f64 / secs(preload_time),
        "preload_create": preload.json(),
        "preload_aborted_attempts": preload_aborted,
        "create_sequential": create.json(),
        "list_page100_walk": list.json(),
        "list_page100_one_vpc_first_page": list_vpc.json(),
        "create_concurrent": conc.json(),
        "concurrent_clients": clients.len(),
        "concurrent_creates_per_s": throughput,
        "concurrent_aborted_attempts": conc_aborted,
        "create_concurrent_separate_accounts": sep.json(),
        "concurrent_separate_accounts_creates_per_s": sep_throughput,
        "concurrent_separate_accounts_aborted_attempts": sep_aborted,
        "p99_target_ms": P99_TARGET_MS,
        "p99_target_met": met,
    }))
}

/// Creates `n` security groups spread over `vpcs` from all `clients` at once; the latency of
/// every call (retries included) and how many attempts were ABORTED (the server gives up
/// after a number of conflicting concurrent writes of the same account; the client retries
/// after a short random pause, as the AWS SDKs do).
async fn create_groups(
    clients: &[Authed],
    vpcs: &[String],
    tag: &str,
    n: usize,
) -> Result<(Stats, usize)> {
    let per_client: Vec<Vec<String>> = clients.iter().map(|_| vpcs.to_vec()).collect();
    create_groups_in(clients, &per_client, tag, n).await
}

/// As [`create_groups`], with each client creating in its own list of VPCs.
async fn create_groups_in(
    clients: &[Authed],
    vpcs: &[Vec<String>],
    tag: &str,
    n: usize,
) -> Result<(Stats, usize)> {
    let mut tasks = Vec::new();
    let k = clients.len();
    for (c, ch) in clients.iter().enumerate() {
        let mut sg = SecurityServiceClient::new(ch.clone());
        let vpcs = vpcs[c].clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut aborted = 0;
            for i in (c..n).step_by(k) {
                let req = pb::CreateSecurityGroupRequest {
                    // Consecutive indices in the same VPC, GROUPS_PER_VPC per VPC.
                    vpc_id: vpcs[(i / GROUPS_PER_VPC) % vpcs.len()].clone(),
                    group_name: format!("{tag}-{i}"),
                    description: "bench".into(),
                    ..Default::default()
                };
                let t = Instant::now();
                let mut tries = 0;
                loop {
                    match sg.create_security_group(req.clone()).await {
                        Ok(_) => break,
                        Err(e) if e.code() == tonic::Code::Aborted && tries < 1000 => {
                            tries += 1;
                            aborted += 1;
                            tokio::time::sleep(jitter(i, tries)).await;
                        }
                        Err(e) => {
                            return Err(anyhow::Error::from(e))
                                .with_context(|| format!("creating group {tag}-{i}"));
                        }
                    }
                }
                lat.push(t.elapsed());
            }
            anyhow::Ok((lat, aborted))
        }));
    }
    let mut all = Vec::new();
    let mut aborted = 0;
    for t in tasks {
        let (lat, a) = t.await??;
        all.extend(lat);
        aborted += a;
    }
    Ok((Stats::of(&all), aborted))
}

/// A pseudo-random pause of 0.5 to 4.5 ms before retry `tries` of request `i`.
fn jitter(i: usize, tries: usize) -> Duration {
    let x = (i as u64 ^ (tries as u64).rotate_left(17))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_right(29);
    Duration::from_micros(500 + x % 4000)
}

// ---------------------------------------------------------------------------------------
// Part 2: network programming latency.

fn revision<T>(r: &tonic::Response<T>) -> Result<i64> {
    r.metadata()
        .get("x-vpc-revision")
        .context("no x-vpc-revision")?
        .to_str()?
        .parse()
        .context("x-vpc-revision")
}

/// Hosts' applied revisions, in host order.
async fn applied_revisions(h: &mut HostServiceClient<Authed>) -> Result<Vec<(String, i64, bool)>> {
    let mut r = h
        .describe_hosts(pb::DescribeHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    r.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    Ok(r.into_iter()
        .map(|x| (x.host_id, x.applied_revision, x.connected))
        .collect())
}

/// Waits (polling every `every`) until `n` connected hosts applied `rev`.
async fn wait_applied(
    h: &mut HostServiceClient<Authed>,
    n: usize,
    rev: i64,
    every: Duration,
    timeout: Duration,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let hosts = applied_revisions(h).await?;
        if hosts.iter().filter(|x| x.2 && x.1 >= rev).count() >= n {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            bail!("hosts did not apply revision {rev} within {timeout:?}: {hosts:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// How many of `ids` have a namespace (any host).
fn namespaces_of(c: &Cluster, ids: &HashSet<String>) -> Result<usize> {
    let prefix = c.netns_prefix();
    let mut n = 0;
    for e in std::fs::read_dir("/run/netns")? {
        let name = e?.file_name();
        let Some(rest) = name.to_str().and_then(|s| s.strip_prefix(prefix)) else {
            continue;
        };
        // "h<i>-<instance id>"
        if let Some((_, id)) = rest.split_once('-')
            && ids.contains(id)
        {
            n += 1;
        }
    }
    Ok(n)
}

async fn programming_latency(opts: &Options) -> Result<Value> {
    let dir = TempDir::new("apibc")?;
    let quotas = write_quotas(dir.path())?;
    let store = dir.path().join("store.redb");
    let t = Instant::now();
    let c = Cluster::start_with(
        opts.hosts,
        dir,
        vec![
            "--store".into(),
            format!("redb:{}", store.display()),
            "--quotas".into(),
            quotas.display().to_string(),
        ],
    )?;
    println!(
        "\n== network programming latency: {} hosts (real agents), cluster up in {:.1} s ==",
        opts.hosts,
        secs(t.elapsed())
    );
    let result = programming_on(&c, opts).await;
    let t = Instant::now();
    drop(c);
    let teardown = t.elapsed();
    println!(
        "cluster teardown (agents, control plane, {} instance namespaces): {:.1} s",
        opts.instances + opts.single_rounds,
        secs(teardown)
    );
    let mut v = result?;
    v["teardown_seconds"] = json!(secs(teardown));
    Ok(v)
}

async fn programming_on(c: &Cluster, opts: &Options) -> Result<Value> {
    let ch = c.tenant_a().await?;
    let mut hosts = HostServiceClient::new(c.agent_channel().await?);
    // Every agent registered.
    let t = Instant::now();
    loop {
        let h = applied_revisions(&mut hosts).await?;
        if h.iter().filter(|x| x.2).count() >= opts.hosts {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("only {h:?} connected after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut vpcs = VpcServiceClient::new(ch.clone());
    let vpc = vpcs
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.0.0.0/16".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .vpc
        .context("vpc")?;
    let subnet = vpcs
        .create_subnet(pb::CreateSubnetRequest {
            vpc_id: vpc.vpc_id.clone(),
            cidr_block: "10.0.0.0/20".into(),
            ..Default::default()
        })
        .await?;
    let rev = revision(&subnet)?;
    let subnet = subnet.into_inner().subnet.context("subnet")?;
    wait_applied(
        &mut hosts,
        opts.hosts,
        rev,
        Duration::from_millis(5),
        Duration::from_secs(30),
    )
    .await?;
    let mut inst = InstanceServiceClient::new(ch.clone());

    // (a) One instance at a time, placed round-robin.
    let mut to_applied = Vec::new();
    let mut to_netns = Vec::new();
    let mut api = Vec::new();
    for i in 0..opts.single_rounds {
        let t0 = Instant::now();
        let r = inst
            .run_instances(pb::RunInstancesRequest {
                subnet_id: subnet.subnet_id.clone(),
                host_id: Cluster::host_id(i % opts.hosts),
                ..Default::default()
            })
            .await?;
        let acked = Instant::now();
        api.push(acked - t0);
        let rev = revision(&r)?;
        let id = r
            .into_inner()
            .instances
            .pop()
            .context("no instance")?
            .instance_id;
        let mut netns_at = None;
        let mut applied_at = None;
        while netns_at.is_none() || applied_at.is_none() {
            if netns_at.is_none() && c.instance_exists(&id) {
                netns_at = Some(acked.elapsed());
            }
            if applied_at.is_none() {
                let h = applied_revisions(&mut hosts).await?;
                if h.iter().filter(|x| x.2 && x.1 >= rev).count() >= opts.hosts {
                    applied_at = Some(acked.elapsed());
                }
            }
            if acked.elapsed() > Duration::from_secs(30) {
                bail!("instance {id} (revision {rev}) not applied everywhere within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        to_applied.push(applied_at.unwrap_or_default());
        to_netns.push(netns_at.unwrap_or_default());
        // Let the hosts settle (coalesced pushes) before the next round.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = Stats::of(&api);
    let single_applied = Stats::of(&to_applied);
    let single_netns = Stats::of(&to_netns);
    let both: Vec<Duration> = to_applied
        .iter()
        .zip(&to_netns)
        .map(|(a, b)| *a.max(b))
        .collect();
    let single_both = Stats::of(&both);
    println!("(a) one instance at a time, {} rounds:", opts.single_rounds);
    header();
    api.row("RunInstances call (client-side)");
    single_applied.row("ack -> all hosts applied its revision");
    single_netns.row("ack -> its namespace exists");
    single_both.row("ack -> both");

    // (b) Many instances.
    let mut h = HostServiceClient::new(c.agent_channel().await?);
    let before = h
        .get_programming_latency(pb::GetProgrammingLatencyRequest {})
        .await?
        .into_inner();
    let calls = opts.instances.div_ceil(100);
    let mut ids = HashSet::new();
    let mut call_lat = Vec::new();
    let mut last_rev = 0;
    let t0 = Instant::now();
    for i in 0..calls {
        let count = (opts.instances - i * 100).min(100) as u32;
        let t = Instant::now();
        let r = inst
            .run_instances(pb::RunInstancesRequest {
                subnet_id: subnet.subnet_id.clone(),
                count,
                ..Default::default()
            })
            .await
            .with_context(|| format!("RunInstances call {i} (count {count})"))?;
        call_lat.push(t.elapsed());
        last_rev = last_rev.max(revision(&r)?);
        ids.extend(r.into_inner().instances.into_iter().map(|x| x.instance_id));
    }
    let api_done = t0.elapsed();
    ensure!(
        ids.len() == opts.instances,
        "{} instances created",
        ids.len()
    );
    let calls_stats = Stats::of(&call_lat);
    println!(
        "(b) {} instances: {calls} RunInstances calls (count 100) took {:.2} s \
         (per call p50 {:.1} ms, max {:.1} ms); revision {last_rev}",
        opts.instances,
        secs(api_done),
        calls_stats.p50,
        calls_stats.max
    );
    // Poll the hosts and the namespaces; keep a timeline.
    let mut timeline = Vec::new();
    let mut all_applied = None;
    let mut all_netns = None;
    let mut first_netns = None;
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let timeout = Duration::from_secs(240);
    println!("  timeline (s since the first request: namespaces, hosts' applied revisions):");
    while all_applied.is_none() || all_netns.is_none() {
        let now = t0.elapsed();
        let hs = applied_revisions(&mut hosts).await?;
        let n = namespaces_of(c, &ids)?;
        if n > 0 && first_netns.is_none() {
            first_netns = Some(now);
        }
        if n >= ids.len() && all_netns.is_none() {
            all_netns = Some(now);
        }
        if all_applied.is_none()
            && hs.iter().filter(|x| x.2 && x.1 >= last_rev).count() >= opts.hosts
        {
            all_applied = Some(now);
        }
        let revs: Vec<i64> = hs.iter().map(|x| x.1).collect();
        if last_print.elapsed() >= Duration::from_secs(2)
            || (all_applied.is_some() && all_netns.is_some())
        {
            println!(
                "  {:>7.2} s  {n:>5} namespaces  applied {revs:?}",
                secs(now)
            );
            last_print = Instant::now();
        }
        timeline.push(json!({"t": secs(now), "namespaces": n, "applied": revs}));
        if now > timeout {
            bail!(
                "not converged {timeout:?} after the first request: {n}/{} namespaces, \
                 applied {revs:?}, want {last_rev}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_applied = all_applied.unwrap_or_default();
    let all_netns = all_netns.unwrap_or_default();
    let first_netns = first_netns.unwrap_or_default();
    let lat = h
        .get_programming_latency(pb::GetProgrammingLatencyRequest {})
        .await?
        .into_inner();
    let per_host: Vec<(String, i64, bool)> = applied_revisions(&mut hosts).await?;
    let instances_per_host: Vec<(String, u32)> = hosts
        .describe_hosts(pb::DescribeHostsRequest {})
        .await?
        .into_inner()
        .hosts
        .into_iter()
        .map(|x| (x.host_id, x.instance_count))
        .collect();
    println!(
        "  first request -> all {} hosts applied revision {last_rev}: {:.2} s",
        opts.hosts,
        secs(all_applied)
    );
    println!(
        "  first request -> first namespace: {:.2} s, all {} namespaces: {:.2} s \
         ({:.0} namespaces/s over the cluster once started)",
        secs(first_netns),
        ids.len(),
        secs(all_netns),
        ids.len() as f64 / secs(all_netns.saturating_sub(first_netns)).max(1e-3)
    );
    println!("  instances per host: {instances_per_host:?}");
    println!(
        "  server GetProgrammingLatency (all writes so far): samples {}, p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms, last {:.1} ms (before (b): samples {}, p50 {:.1} ms, \
         p99 {:.1} ms)",
        lat.samples,
        lat.p50_ms,
        lat.p99_ms,
        lat.max_ms,
        lat.last_ms,
        before.samples,
        before.p50_ms,
        before.p99_ms
    );
    let lat_json = |l: &pb::GetProgrammingLatencyResponse| {
        json!({"samples": l.samples, "p50_ms": l.p50_ms, "p99_ms": l.p99_ms,
               "max_ms": l.max_ms, "last_ms": l.last_ms})
    };
    Ok(json!({
        "hosts": opts.hosts,
        "single": {
            "rounds": opts.single_rounds,
            "run_instances_call": api.json(),
            "ack_to_all_hosts_applied": single_applied.json(),
            "ack_to_namespace": single_netns.json(),
            "ack_to_both": single_both.json(),
        },
        "bulk": {
            "instances": opts.instances,
            "run_instances_calls": calls,
            "run_instances_call": calls_stats.json(),
            "api_seconds": secs(api_done),
            "last_revision": last_rev,
            "first_request_to_all_hosts_applied_s": secs(all_applied),
            "first_request_to_first_namespace_s": secs(first_netns),
            "first_request_to_all_namespaces_s": secs(all_netns),
            "instances_per_host": instances_per_host,
            "applied_per_host": per_host.iter().map(|x| json!([x.0, x.1])).collect::<Vec<_>>(),
            "timeline": timeline,
        },
        "server_programming_latency_before_bulk": lat_json(&before),
        "server_programming_latency": lat_json(&lat),
    }))
}
