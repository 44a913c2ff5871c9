//! Hitless upgrade, end to end: the real control plane (this build) and two hosts that start
//! on the previous release's agent (maps ABI v5, `VPC_AGENT_PREV_BIN`, built by `cargo
//! xtask build-previous`), with an instance on each host in one VPC.
//!
//! While a ping (every 5 ms) and three long-lived TCP streams (a sequence of u64 written
//! continuously, checked unbroken on the same connection) run between the instances:
//! host 0's agent is upgraded (old stopped, new started on the same pins and data dir: it
//! migrates v5 -> v6), then host 1's, then host 0's agent restarts again (new -> new).
//!
//! Checks: zero ping loss, no TCP error, reset or reconnect, every byte in order; the TCP
//! flows live in the v6 `CONNTRACK` and are still being tracked (last seen and the v6
//! packet counters advance); the v5 pins are gone; the migration reported what it did, also
//! from a tree an interrupted migration left (host 1); the instances were adopted (same
//! PID 1), not restarted; the old agents applied the new control plane's desired state (the instances ran, and
//! host 1's old agent applies a change while host 0 runs the new one); a restart on the same
//! ABI writes nothing on its first pass.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use controlplane::datapath::{PinLayout, PolicyMaps};
use dataplane_common::maps::{MAPS_ABI, PREVIOUS_MAPS_ABI};
use nix::sched::CloneFlags;
use vpc_proto::v1::{
    self as pb, instance_service_client::InstanceServiceClient,
    security_service_client::SecurityServiceClient,
};
use vpc_tests::cluster::{Cluster, create_network, eventually};

const WAIT: Duration = Duration::from_secs(30);
const PORT: u16 = 7000;
/// Ping: 10 000 echo requests 5 ms apart (50 s), longer than the upgrade sequence (checked).
const PING_COUNT: u32 = 10_000;
const PING_INTERVAL: &str = "0.005";

fn prev_agent() -> Result<PathBuf> {
    let bin = std::env::var_os("VPC_AGENT_PREV_BIN").context(
        "VPC_AGENT_PREV_BIN is not set: the upgrade test needs the previous release's agent; \
         run it through `cargo xtask test --tier e2e`, or `cargo xtask build-previous` and \
         set VPC_AGENT_PREV_BIN to the path it prints",
    )?;
    let bin = PathBuf::from(bin);
    ensure!(
        bin.is_file(),
        "VPC_AGENT_PREV_BIN={} is no file",
        bin.display()
    );
    Ok(bin)
}

/// Runs `f` on a thread inside the network namespace `/run/netns/<netns>` (sockets made
/// there stay there).
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let path = PathBuf::from("/run/netns").join(netns);
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
}

/// One long-lived TCP stream: the client writes 0, 1, 2, ... (u64 LE) until told to stop;
/// the server checks every value on the same connection.
struct Stream {
    client: JoinHandle<Result<u64>>,
    server: JoinHandle<Result<u64>>,
}

/// Writes the sequence until `stop`, then closes; returns how many values it wrote. Any
/// error (reset, a write stalled for 10 s) fails.
fn write_sequence(mut s: TcpStream, stop: Arc<AtomicBool>) -> Result<u64> {
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let mut next = 0u64;
    let mut buf = Vec::with_capacity(512 * 8);
    while !stop.load(Ordering::Relaxed) {
        buf.clear();
        for _ in 0..512 {
            buf.extend_from_slice(&next.to_le_bytes());
            next += 1;
        }
        s.write_all(&buf).context("writing the sequence")?;
        // ~2 MB/s per stream: continuous, without starving the 2 vCPUs.
        std::thread::sleep(Duration::from_millis(2));
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(next)
}

/// Reads and checks the sequence until the writer closes; returns how many values came.
fn check_sequence(mut s: TcpStream) -> Result<u64> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut expect = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = s.read(&mut buf).context("reading the sequence")?;
        if n == 0 {
            ensure!(carry.is_empty(), "stream ended inside a value");
            return Ok(expect);
        }
        carry.extend_from_slice(&buf[..n]);
        let whole = carry.len() / 8 * 8;
        for chunk in carry[..whole].chunks_exact(8) {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            ensure!(v == expect, "sequence broken: got {v}, expected {expect}");
            expect += 1;
        }
        carry.drain(..whole);
    }
}

/// Starts a stream from the instance in `client_ns` to `server_ip:port` in `server_ns`.
fn start_stream(
    client_ns: &str,
    server_ns: &str,
    server_ip: &str,
    port: u16,
    stop: &Arc<AtomicBool>,
) -> Result<Stream> {
    let listener = in_netns(server_ns, move || Ok(TcpListener::bind(("0.0.0.0", port))?))
        .join()
        .map_err(|_| anyhow::anyhow!("bind thread panicked"))??;
    let server = std::thread::spawn(move || -> Result<u64> {
        let (s, _) = listener.accept()?;
        // One connection only: a reconnect would find no listener and fail the client.
        drop(listener);
        check_sequence(s)
    });
    let addr: SocketAddr = format!("{server_ip}:{port}").parse()?;
    let stop = Arc::clone(stop);
    let client = in_netns(client_ns, move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        write_sequence(s, stop)
    });
    Ok(Stream { client, server })
}

/// Starts the ping from `netns` to `dst`.
fn start_ping(netns: &str, dst: &str) -> Result<Child> {
    Ok(Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-q", "-n"])
        .args([
            "-i",
            PING_INTERVAL,
            "-c",
            &PING_COUNT.to_string(),
            "-W",
            "2",
            dst,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// (transmitted, received) from ping's summary line.
fn ping_summary(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>());
    Some((nums.next()?.ok()?, nums.next()?.ok()?))
}

/// The TCP test flows in host `i`'s v6 CONNTRACK: (packets, last seen) per flow.
fn tracked_streams(c: &Cluster, i: usize) -> Result<Vec<(u64, u64)>> {
    let maps = PolicyMaps::open(&PinLayout::new(c.pin_dir(i)))?;
    Ok(maps
        .conntrack()?
        .into_iter()
        .filter(|(k, _)| {
            let ours = |p: u16| p == PORT || p == PORT + 1;
            k.proto == 6 && (ours(k.lo_port) || ours(k.hi_port))
        })
        .map(|(_, e)| (e.packets, e.last_seen_ns))
        .collect())
}

/// Leaves the pin tree under `root` as a new agent killed mid-migration would: `FILTER` and
/// `ENDPOINTS` pinned in the new tree too (the same maps), the underlay's TC ingress link
/// pinned in both trees.
fn interrupt_migration(root: &std::path::Path) -> Result<()> {
    use aya::{
        maps::MapData,
        programs::links::{FdLink, PinnedLink},
    };
    let (old, new) = (root.join(PREVIOUS_MAPS_ABI), root.join(MAPS_ABI));
    std::fs::create_dir_all(new.join("maps"))?;
    for map in ["FILTER", "ENDPOINTS"] {
        MapData::from_pin(old.join("maps").join(map))?.pin(new.join("maps").join(map))?;
    }
    let link = Path::new("links").join("ul0").join("vpc_tc_ingress");
    std::fs::create_dir_all(new.join(&link).parent().context("parent")?)?;
    FdLink::from(PinnedLink::from_pin(old.join(&link))?).pin(new.join(&link))?;
    Ok(())
}

/// The first "applied revision" line of host `i`'s agent (what its first pass wrote),
/// waiting for it at most 10 s.
async fn first_pass(c: &Cluster, i: usize) -> Result<String> {
    eventually(Duration::from_secs(10), "the agent's first pass", || {
        let line = c
            .agent_lines(i)
            .into_iter()
            .find(|l| l.starts_with("applied revision"));
        async move { Ok(line) }
    })
    .await
}

/// Stops host `i`'s agent (SIGTERM: the datapath stays) and starts `bin` (`None`: this
/// build's) on the same pins and data directory. Returns how long the host had no agent.
fn replace_agent(c: &mut Cluster, i: usize, bin: Option<PathBuf>) -> Result<Duration> {
    let old = c.take_agent(i).context("no agent")?;
    let t = Instant::now();
    ensure!(old.stop()?, "the agent of host {i} did not exit cleanly");
    c.set_agent_bin(i, bin);
    c.start_agent(i)?;
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_restarts_lose_no_packet_and_break_no_connection() -> Result<()> {
    let prev = prev_agent()?;
    let mut c = Cluster::start_agents(vec![Some(prev.clone()), Some(prev.clone())])?;
    for i in 0..2 {
        let v5 = c.pin_dir(i).join(PREVIOUS_MAPS_ABI).join("maps/CONNTRACK");
        ensure!(
            v5.exists(),
            "host {i} does not run the previous release (no {v5:?})"
        );
    }
    let ch = c.tenant_a().await?;
    let (vpc, subnet) = create_network(ch.clone(), "10.0.0.0/16", "10.0.1.0/24").await?;
    let mut sgs = SecurityServiceClient::new(ch.clone());
    let sg = sgs
        .create_security_group(pb::CreateSecurityGroupRequest {
            vpc_id: vpc.clone(),
            group_name: "upgrade".into(),
            description: "ping and streams".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .security_group
        .context("sg")?
        .group_id;
    let rule = |proto: &str, from: i32, to: i32| pb::SecurityGroupRule {
        ip_protocol: proto.into(),
        from_port: from,
        to_port: to,
        cidr_ipv4: "10.0.0.0/16".into(),
        ..Default::default()
    };
    sgs.authorize_security_group_ingress(pb::AuthorizeSecurityGroupRequest {
        group_id: sg.clone(),
        rules: vec![
            rule("icmp", -1, -1),
            rule("tcp", PORT.into(), (PORT + 1).into()),
        ],
    })
    .await?;
    let mut inst = InstanceServiceClient::new(ch);
    let mut ids = Vec::new();
    let mut ips = Vec::new();
    for host in 0..2 {
        let i = inst
            .run_instances(pb::RunInstancesRequest {
                subnet_id: subnet.clone(),
                host_id: Cluster::host_id(host),
                security_group_ids: vec![sg.clone()],
                command: "exec sleep infinity".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .instances
            .pop()
            .context("no instance")?;
        ids.push(i.instance_id);
        ips.push(i.private_ip_address);
    }
    for id in &ids {
        let what = format!("{id} running (on an old agent)");
        eventually(WAIT, &what, || {
            let mut inst = inst.clone();
            let id = id.clone();
            async move {
                let i = inst
                    .describe_instances(pb::DescribeInstancesRequest {
                        instance_ids: vec![id],
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .instances
                    .pop()
                    .context("no instance")?;
                ensure!(i.state != "terminated", "terminated: {}", i.state_reason);
                Ok((i.state == "running").then_some(()))
            }
        })
        .await?;
    }
    let pids: Vec<_> = (0..2)
        .map(|h| c.runtime(h)?.ns_pid(&ids[h]).context("instance runs"))
        .collect::<Result<_>>()?;
    let ns: Vec<String> = ids.iter().map(|id| c.instance_netns(id)).collect();

    // The path works before anything starts (ARP, first flows).
    eventually(WAIT, "the instances to reach each other", || {
        let (ns0, ip1) = (ns[0].clone(), ips[1].clone());
        async move {
            let ok = Command::new("ip")
                .args(["netns", "exec", &ns0, "ping", "-c", "1", "-W", "1", &ip1])
                .stdout(Stdio::null())
                .status()?
                .success();
            Ok(ok.then_some(()))
        }
    })
    .await?;

    // Traffic for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut ping = start_ping(&ns[0], &ips[1])?;
    let streams = vec![
        start_stream(&ns[0], &ns[1], &ips[1], PORT, &stop)?,
        start_stream(&ns[0], &ns[1], &ips[1], PORT + 1, &stop)?,
        start_stream(&ns[1], &ns[0], &ips[0], PORT, &stop)?,
    ];
    let result = async {
        tokio::time::sleep(Duration::from_secs(2)).await;

        // 1. Host 0: old agent -> new agent (migration v5 -> v6).
        let gap = replace_agent(&mut c, 0, None)?;
        let migrated = c
            .agent_lines(0)
            .into_iter()
            .find(|l| l.starts_with("migrated pins from v5"))
            .context("the new agent did not report a migration")?;
        eprintln!("host 0 upgraded (no agent for {gap:?}): {migrated}");
        ensure!(
            migrated.contains("\"CONNTRACK\""),
            "CONNTRACK not converted: {migrated}"
        );
        eprintln!("host 0 first pass: {}", first_pass(&c, 0).await?);

        // The old agent of host 1 applies a change streamed by the new control plane while
        // host 0 runs the new agent (the documents stay readable for it).
        let applied = |c: &Cluster| {
            c.agent_lines(1)
                .iter()
                .filter(|l| l.starts_with("applied revision"))
                .count()
        };
        let before = applied(&c);
        sgs.authorize_security_group_ingress(pb::AuthorizeSecurityGroupRequest {
            group_id: sg.clone(),
            rules: vec![rule("udp", 9000, 9000)],
        })
        .await?;
        eventually(
            WAIT,
            "the old agent of host 1 to apply a new revision",
            || {
                let n = applied(&c);
                async move { Ok((n > before).then_some(())) }
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;

        // 2. Host 1: old -> new, while host 0 already runs the new agent. Its old agent
        // stops first and the tree is left as a new agent killed mid-migration would leave
        // it: two maps already carried, the underlay's TC ingress link pinned in both trees.
        let old = c.take_agent(1).context("no agent")?;
        let t = Instant::now();
        ensure!(old.stop()?, "the agent of host 1 did not exit cleanly");
        interrupt_migration(c.pin_dir(1))?;
        c.set_agent_bin(1, None);
        c.start_agent(1)?;
        let gap = t.elapsed();
        ensure!(
            c.agent_lines(1)
                .iter()
                .any(|l| l.starts_with("migrated pins from v5")),
            "host 1 did not complete the interrupted migration"
        );
        eprintln!("host 1 upgraded (no agent for {gap:?})");
        eprintln!("host 1 first pass: {}", first_pass(&c, 1).await?);
        tokio::time::sleep(Duration::from_secs(2)).await;

        // 3. Host 0 again: new -> new (no migration).
        let gap = replace_agent(&mut c, 0, None)?;
        ensure!(
            !c.agent_lines(0).iter().any(|l| l.starts_with("migrated")),
            "a restart on the same ABI migrated"
        );
        eprintln!("host 0 restarted (no agent for {gap:?})");
        let pass = first_pass(&c, 0).await?;
        eprintln!("host 0 first pass: {pass}");
        // Same ABI, same state: the restarted agent's first pass writes nothing.
        ensure!(
            pass.ends_with(" 0 map writes"),
            "restart reprogrammed: {pass}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;

        // The streams are tracked in the v6 tables and still advancing.
        for h in 0..2 {
            let before = tracked_streams(&c, h)?;
            ensure!(
                before.len() >= 3,
                "host {h}: {} of 3 streams in the v6 CONNTRACK",
                before.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = tracked_streams(&c, h)?;
            let newest = |v: &[(u64, u64)]| v.iter().map(|e| e.1).max().unwrap_or(0);
            let packets = |v: &[(u64, u64)]| v.iter().map(|e| e.0).sum::<u64>();
            ensure!(
                newest(&after) > newest(&before) && packets(&after) > packets(&before),
                "host {h}: tracked streams not advancing (v6 counters {} -> {})",
                packets(&before),
                packets(&after)
            );
            eprintln!(
                "host {h}: {} tracked stream entries, packets {} -> {}",
                after.len(),
                packets(&before),
                packets(&after)
            );
            let old = c.pin_dir(h).join(PREVIOUS_MAPS_ABI);
            ensure!(!old.exists(), "host {h}: {old:?} still exists");
            ensure!(c.pin_dir(h).join(MAPS_ABI).join("maps/CONNTRACK").exists());
            ensure!(
                c.runtime(h)?.ns_pid(&ids[h]) == Some(pids[h]),
                "host {h}: instance {} restarted instead of adopted",
                ids[h]
            );
        }
        ensure!(
            ping.try_wait()?.is_none(),
            "the ping ended before the upgrade sequence did (raise PING_COUNT)"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;

    // Stop the traffic (also on failure), then judge it.
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    if let Err(e) = result {
        failures.push(format!("{e:#}"));
        let _ = ping.kill();
    }
    for (n, s) in streams.into_iter().enumerate() {
        let sent = s
            .client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?;
        let got = s
            .server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))?;
        match (sent, got) {
            (Ok(sent), Ok(got)) if sent == got && sent > 0 => {
                eprintln!("stream {n}: {sent} values in order on one connection")
            }
            (sent, got) => failures.push(format!("stream {n}: sent {sent:?}, checked {got:?}")),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(70);
    while ping.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = ping.kill();
            bail!("ping did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match ping_summary(&text) {
        Some((sent, got)) if sent == got && sent == u64::from(PING_COUNT) => {
            eprintln!("ping: {sent} sent, {got} received, 0 lost")
        }
        _ if !failures.is_empty() => {}
        other => failures.push(format!("ping lost packets: {other:?}\n{text}")),
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    Ok(())
}
