//! `cargo xtask bench lb` support: connection-rate tools and the kernel baseline.
//!
//! The load-balancer benchmark measures new TCP connections per second, through a VIP and
//! direct to one target, for the appliance and, in the same run, for what a user would
//! otherwise use: the kernel's own service load balancing as kube-proxy's nftables mode sets
//! it up (nftables DNAT picking an endpoint with `numgen random`, conntrack un-NATing the
//! replies). This module holds both sides' measuring tools and that baseline:
//!
//! - [`serve`]: a TCP server that accepts, writes one byte identifying itself (its tag), and
//!   closes, so clients can count which target they reached;
//! - [`connect_rate`]: `concurrency` client threads opening connections for a while, with
//!   the rate, latency percentiles, failures and the reached targets;
//! - [`NftLb`]: the baseline topology; [`run_baseline`] measures it and prints a table.
//!
//! # Topology
//!
//! ```text
//!                             host (router, ip_forward=1, nftables table `ip lbbench`)
//!   client                 +------------------------------------------+        servers[i]
//!   eth0 198.18.0.2/24 ----| cl0 198.18.0.1/24                          |
//!        198.18.0.3/24     |                  t0 198.18.1.1/24 ---------|---- eth0 198.18.1.2/24
//!   default via .0.1       |                  t1 198.18.2.1/24 ---------|---- eth0 198.18.2.2/24
//!   198.19.0.0/24 via .0.1 |                  ...                       |     default via .1
//!     src 198.18.0.3       +------------------------------------------+
//!   (VIP 198.19.0.1:PORT is on no interface)
//! ```
//!
//! Every namespace is joined to `host` by its own veth pair and `host` routes between them
//! (no bridge, so no `br_netfilter`). All addresses are in 198.18.0.0/15, the benchmarking
//! range, never a tenant range: `client` 198.18.0.2 (and 198.18.0.3 towards the VIP, see
//! below), target `i` 198.18.`i+1`.2, the VIP 198.19.0.1 from the "service CIDR"
//! 198.19.0.0/24. The client's SYN to the VIP enters `host`, whose `prerouting` nat hook
//! DNATs it to a target chosen at random; conntrack keeps the mapping, so the rest of the
//! connection skips the nat chains and the target's replies are rewritten back to come from
//! the VIP.
//!
//! # The ruleset: kube-proxy's nftables mode, for one ClusterIP service
//!
//! kube-proxy (`--proxy-mode=nftables`, `pkg/proxy/nftables`) keeps one table, `ip
//! kube-proxy`. For a ClusterIP service a packet takes this path, reproduced here with the
//! same chain and map names in a table `ip lbbench` ([`NftLb::ruleset`] prints it):
//!
//! - `nat-prerouting` (type nat, hook prerouting, priority dstnat) `jump services`
//!   (`nat-output` does the same for locally generated traffic; not on this path);
//! - `services`: `ip daddr . meta l4proto . th dport vmap @service-ips`, the verdict map from
//!   (VIP, protocol, port) to the service chain;
//! - the service chain, named like kube-proxy's `service-HASH-NAMESPACE/NAME/tcp/PORTNAME`:
//!   `numgen random mod N vmap { 0 : goto endpoint-..., 1 : goto endpoint-..., ... }`;
//! - one endpoint chain per target, named like `endpoint-HASH-.../p8080__IP/PORT`:
//!   `ip saddr IP jump mark-for-masquerade` (hairpin traffic only) then
//!   `meta l4proto tcp dnat to IP:PORT`;
//! - `nat-postrouting` `jump masquerading`, which masquerades only marked (hairpin)
//!   packets, and `filter-forward`: `ct state new jump service-endpoints-check` (the
//!   `no-endpoint-services` map, empty: every service has endpoints) and `ct state new jump
//!   cluster-ips-check` (rejects or drops traffic to unused service addresses and ports).
//!
//! Left out: NodePorts, external and load-balancer IPs, `firewall-check` (source ranges),
//! session affinity, and kube-proxy's `ip daddr VIP ip saddr != CLUSTER-CIDR jump
//! mark-for-masquerade` in the service chain, which would SNAT this off-cluster client: like
//! the appliance, the baseline keeps the client's address. kube-proxy picks endpoints at
//! random (`numgen random`, not `jhash`), so the spread is binomial, and a change of the
//! endpoint set moves only new connections (established ones stay pinned by conntrack).
//!
//! # Why this is the baseline
//!
//! It is the stock-kernel way to put one address in front of several servers, as
//! kube-proxy's newest mode (the successor of its iptables mode) sets it up, and it does per
//! new connection what the appliance's load balancer does: pick a target, rewrite the destination, remember the
//! choice, rewrite the replies. Both sides are measured with the same [`connect_rate`] and
//! [`serve`], direct to one target and through the VIP, so the ratio VIP/direct is what the
//! load balancing costs on each side.
//!
//! # Client and server settings
//!
//! [`connect_rate`] sets in the client's namespace `net.ipv4.ip_local_port_range` to
//! `1024 65535` (the default `32768 60999` would wrap every few seconds at these rates) and
//! `net.ipv4.tcp_tw_reuse` to `1`, in case the client ever closes first (on an error); it
//! normally holds no TIME_WAIT, since [`serve`] closes first. The servers' namespaces keep
//! their defaults: their TIME_WAIT sockets (beyond `tcp_max_tw_buckets` the kernel simply
//! stops keeping them) accept a reused client port thanks to TCP timestamps. The router's
//! conntrack table keeps closed connections in TIME_WAIT for 120 s; when it is full, the
//! kernel evicts such entries first (`early_drop`), so a long run does not fail on it.
//!
//! Two paths that end at the same server must not share client addresses: the client
//! reaches the VIP from its second address, 198.18.0.3 (the route to the service CIDR says
//! `src 198.18.0.3`), and target 0 directly from 198.18.0.2. Otherwise a connection direct
//! to target 0 from port P meets target 0's TIME_WAIT socket of an earlier VIP connection
//! from the same port P (a reused ephemeral port), whose TCP timestamps (and sequence
//! numbers) came from another per-destination offset (the client's offsets are keyed by the
//! address it connects to: the VIP, not the target). Often the server then rejects the SYN
//! as old (PAWS) and answers with an ACK, the client resets and would retry after its 1 s
//! SYN timeout: a failure here. The same holds for the appliance's measurement.

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::netns::{NetNs, veth_pair};

/// Port of the baseline's VIP and targets.
pub const BASELINE_PORT: u16 = 8080;
/// The baseline's VIP (in the service CIDR [`SERVICE_CIDR`]).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The baseline's "service CIDR": addresses that only exist as nftables matches.
pub const SERVICE_CIDR: &str = "198.19.0.0/24";
/// Most targets [`NftLb`] builds (target `i` uses 198.18.`i+1`.0/24).
pub const MAX_TARGETS: usize = 250;

/// How long a client waits for the connection to be established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits for the tag and the server's FIN.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// A client thread gives up after this many failures in a row (a broken path refuses at
/// once; without a bound the thread would spin through failures for the whole duration).
const MAX_CONSECUTIVE_FAILURES: u32 = 50;
/// How often an idle accept loop checks whether its server was dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// Accept threads per server, so that one target alone can use two CPUs (the clients open
/// all connections to it when measuring "direct").
const SERVER_THREADS: usize = 2;
/// Warm-up before the measured rounds (ARP, caches, CPU frequency).
const WARMUP: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------
// Server.

/// A TCP server in a namespace: accepts, writes its one-byte tag, then closes (the server
/// closes first, so TIME_WAIT is held on the server side, not on the client's ephemeral
/// ports). Runs on two accept threads until dropped; dropping stops and joins them (each
/// notices within 50 ms: the listener is non-blocking and waited on with a timeout).
#[derive(Debug)]
pub struct ConnServer {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts a [`ConnServer`] listening on `addr` inside `ns` that answers every connection
/// with `tag`.
pub fn serve(ns: &NetNs, addr: SocketAddrV4, tag: u8) -> Result<ConnServer> {
    let listener = ns
        .run(|| TcpListener::bind(addr))
        .with_context(|| format!("binding {addr} in network namespace {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut server = ConnServer {
        addr,
        stop: Arc::clone(&stop),
        accepted: Arc::clone(&accepted),
        threads: Vec::with_capacity(SERVER_THREADS),
    };
    for i in 0..SERVER_THREADS {
        let (listener, stop, accepted) = (
            Arc::clone(&listener),
            Arc::clone(&stop),
            Arc::clone(&accepted),
        );
        // The socket stays in `ns`: the accept threads need not enter it. On error, dropping
        // `server` stops the threads already started.
        let handle = thread::Builder::new()
            .name(format!("lb-serve-{tag}-{i}"))
            .spawn(move || accept_loop(&listener, tag, &stop, &accepted))
            .context("spawning an accept thread")?;
        server.threads.push(handle);
    }
    Ok(server)
}

impl ConnServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Connections accepted (and answered) so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("lb bench: an accept thread of {} panicked", self.addr);
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, tag: u8, stop: &AtomicBool, accepted: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                // A fresh socket takes one byte without blocking. A client that gave up
                // already (reset) is the client's failure to count, not the server's.
                let _ = conn.write_all(&[tag]);
                accepted.fetch_add(1, Ordering::Relaxed);
                // Dropping closes: our FIN follows the tag.
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(listener, ACCEPT_POLL),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            // Out of file descriptors or memory: back off instead of spinning.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits until `listener` has a connection to accept or `timeout` has passed.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut pfd = nix::libc::pollfd {
        fd: listener.as_raw_fd(),
        events: nix::libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll(2) reads and writes exactly one `pollfd` (nfds = 1), which lives on this
    // stack frame for the duration of the call; the descriptor is owned by `listener`, which
    // the caller keeps open. The result only decides whether to try accept again, so errors
    // (EINTR) need no handling.
    unsafe {
        nix::libc::poll(&mut pfd, 1, ms);
    }
}

// ---------------------------------------------------------------------------------------
// Client.

/// Result of a connection-rate run ([`connect_rate`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnRate {
    /// Connections that completed: connected, read the tag, saw the server's FIN.
    pub connections: u64,
    /// Connections that failed (refused, timed out, reset, or closed without a tag).
    pub failures: u64,
    /// `connections` per second of the run's wall-clock time.
    pub per_second: f64,
    /// Median connect-to-EOF time of the completed connections, microseconds.
    pub p50_us: f64,
    /// 99th percentile of the same.
    pub p99_us: f64,
    /// Completed connections by the tag the server wrote (which target answered).
    pub by_tag: BTreeMap<u8, u64>,
}

impl ConnRate {
    /// The smallest and largest share of the completed connections among `targets` tags
    /// `0..targets` (a tag never seen has share 0), as fractions; `None` without connections.
    pub fn spread(&self, targets: usize) -> Option<(f64, f64)> {
        if self.connections == 0 || targets == 0 {
            return None;
        }
        let shares = (0..targets).map(|t| {
            let n = u8::try_from(t)
                .ok()
                .and_then(|t| self.by_tag.get(&t))
                .copied()
                .unwrap_or(0);
            n as f64 / self.connections as f64
        });
        Some(shares.fold((f64::INFINITY, 0.0f64), |(lo, hi), s| {
            (lo.min(s), hi.max(s))
        }))
    }
}

/// What one client thread saw.
#[derive(Debug, Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    by_tag: BTreeMap<u8, u64>,
    failures: u64,
    first_error: Option<String>,
}

/// Sets the client-side sysctls of the module doc in `ns`: a wide ephemeral port range
/// (`net.ipv4.ip_local_port_range = 1024 65535`) and `net.ipv4.tcp_tw_reuse = 1`.
/// [`connect_rate`] calls it.
pub fn tune_client(ns: &NetNs) -> Result<()> {
    tune_client_ports(ns, (1024, 65535))
}

/// As [`tune_client`], with the ephemeral ports `ports` (disjoint ranges keep two measured
/// paths from reusing each other's 4-tuples).
pub fn tune_client_ports(ns: &NetNs, ports: (u16, u16)) -> Result<()> {
    ns.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", ports.0, ports.1),
    )?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
}

/// Opens connections to `addr` from inside `ns` for `duration` with `concurrency` client
/// threads, after [`tune_client`]`(ns)`. Each thread, until the duration is over: connects
/// (timeout 1 s), reads until EOF (timeout 1 s), records the tag (first byte) and the
/// connect-to-EOF latency, closes. Failures are counted, not fatal; a thread stops early after
/// 50 failures in a row, and the first failure's reason is printed on stderr. The run ends
/// at most about 2 s after `duration`.
///
/// Measuring two paths to the same server (a VIP and the target directly) from one client
/// address makes them share (address, port) pairs at the server, and reused ports then fail
/// against the other path's TIME_WAIT sockets: use a separate client source address per
/// path (module doc, "Client and server settings").
pub fn connect_rate(
    ns: &NetNs,
    addr: SocketAddrV4,
    duration: Duration,
    concurrency: usize,
) -> Result<ConnRate> {
    connect_rate_ports(ns, addr, duration, concurrency, (1024, 65535))
}

/// As [`connect_rate`], with the client's ephemeral ports limited to `ports`.
pub fn connect_rate_ports(
    ns: &NetNs,
    addr: SocketAddrV4,
    duration: Duration,
    concurrency: usize,
    ports: (u16, u16),
) -> Result<ConnRate> {
    tune_client_ports(ns, ports)?;
    let concurrency = concurrency.max(1);
    let barrier = Barrier::new(concurrency + 1);
    let (results, elapsed) = thread::scope(|s| {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| s.spawn(|| ns.run(|| client_worker(addr, duration, &barrier))))
            .collect();
        barrier.wait();
        let start = Instant::now();
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        (results, start.elapsed())
    });
    let mut latencies = Vec::new();
    let mut rate = ConnRate::default();
    let mut first_error = None;
    for r in results {
        let r = r.map_err(|_| anyhow!("a client thread panicked"))?;
        latencies.extend(r.latencies_us);
        rate.failures += r.failures;
        for (tag, n) in r.by_tag {
            *rate.by_tag.entry(tag).or_default() += n;
        }
        first_error = first_error.or(r.first_error);
    }
    latencies.sort_unstable();
    rate.connections = latencies.len() as u64;
    rate.per_second = rate.connections as f64 / elapsed.as_secs_f64().max(1e-9);
    rate.p50_us = percentile(&latencies, 0.50);
    rate.p99_us = percentile(&latencies, 0.99);
    if let Some(e) = first_error {
        eprintln!(
            "lb bench: {} of {} connections to {addr} failed; first: {e}",
            rate.failures,
            rate.failures + rate.connections
        );
    }
    Ok(rate)
}

/// Nearest-rank percentile `q` (0..=1) of sorted values; 0 when empty.
fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn client_worker(addr: SocketAddrV4, duration: Duration, barrier: &Barrier) -> WorkerResult {
    let mut r = WorkerResult::default();
    let mut in_a_row = 0;
    barrier.wait();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && in_a_row < MAX_CONSECUTIVE_FAILURES {
        let start = Instant::now();
        match one_connection(addr) {
            Ok(tag) => {
                let us = start.elapsed().as_micros();
                r.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                *r.by_tag.entry(tag).or_default() += 1;
                in_a_row = 0;
            }
            Err(e) => {
                r.failures += 1;
                in_a_row += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    r
}

/// One connection: connect, read the tag and EOF, close. Returns the tag.
fn one_connection(addr: SocketAddrV4) -> io::Result<u8> {
    let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(addr), CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut tag = None;
    let mut buf = [0u8; 16];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {
                tag.get_or_insert(buf[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    tag.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed without a tag"))
}

// ---------------------------------------------------------------------------------------
// Kernel baseline.

/// The error of [`run_baseline`] and [`NftLb::new`] when `nft` cannot run (downcast the
/// `anyhow::Error` to tell it from a real failure and print it as a skip).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NftMissing;

impl fmt::Display for NftMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nft is not installed (`cargo xtask setup` installs nftables)")
    }
}

impl std::error::Error for NftMissing {}

/// Whether `nft` can run.
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The kernel baseline's topology (module doc): a router namespace `host` with a
/// kube-proxy-nftables-style DNAT table, a `client` namespace and one namespace per target,
/// each joined to `host` by its own veth. Everything is removed when dropped.
#[derive(Debug)]
pub struct NftLb {
    host: NetNs,
    client: NetNs,
    servers: Vec<NetNs>,
    port: u16,
    ruleset: String,
    load_seconds: f64,
}

/// The address of target `i`: 198.18.`i+1`.2.
fn target_ip(i: usize) -> Ipv4Addr {
    // `i < MAX_TARGETS < 255`, checked by `NftLb::new`.
    Ipv4Addr::new(198, 18, (i + 1) as u8, 2)
}

/// The ruleset of the module doc for `targets` (address, port), the VIP [`VIP`]`:port`.
pub fn kube_proxy_ruleset(port: u16, targets: &[SocketAddrV4]) -> String {
    // kube-proxy names chains `service-HASH-NS/NAME/PROTO/PORTNAME` and
    // `endpoint-HASH-NS/NAME/PROTO/PORTNAME__IP/PORT`, HASH a base32 hash of the rest; fixed
    // stand-ins here.
    let svc = format!("bench/vip/tcp/p{port}");
    let service_chain = format!("service-LBBENCH0-{svc}");
    let endpoint_chain =
        |i: usize, t: &SocketAddrV4| format!("endpoint-LBBENCH{i}-{svc}__{}/{}", t.ip(), t.port());
    let mut s = String::new();
    s.push_str("table ip lbbench {\n");
    s.push_str("  comment \"kube-proxy nftables mode, one ClusterIP service\"\n");
    s.push_str(&format!(
        "  set cluster-ips {{\n    type ipv4_addr\n    elements = {{ {VIP} }}\n  }}\n"
    ));
    s.push_str(&format!(
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {VIP} . tcp . {port} : goto {service_chain} }}\n  }}\n"
    ));
    s.push_str(
        "  map no-endpoint-services {\n    type ipv4_addr . inet_proto . inet_service : verdict\n  }\n",
    );
    let base = [
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority dstnat; policy accept;"),
            vec!["jump services".to_owned()],
        ),
        (
            "nat-output",
            Some("type nat hook output priority -100; policy accept;"),
            vec!["jump services".to_owned()],
        ),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority srcnat; policy accept;"),
            vec!["jump masquerading".to_owned()],
        ),
        (
            "filter-forward",
            Some("type filter hook forward priority filter; policy accept;"),
            vec![
                "ct state new jump service-endpoints-check".to_owned(),
                "ct state new jump cluster-ips-check".to_owned(),
            ],
        ),
        (
            "services",
            None,
            vec!["ip daddr . meta l4proto . th dport vmap @service-ips".to_owned()],
        ),
        (
            "service-endpoints-check",
            None,
            vec!["ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned()],
        ),
        (
            "cluster-ips-check",
            None,
            vec![
                "ip daddr @cluster-ips reject".to_owned(),
                format!("ip daddr {SERVICE_CIDR} drop"),
            ],
        ),
        (
            "mark-for-masquerade",
            None,
            vec!["mark set mark or 0x4000".to_owned()],
        ),
        (
            "masquerading",
            None,
            vec![
                "mark and 0x4000 == 0 return".to_owned(),
                "mark set mark xor 0x4000".to_owned(),
                "masquerade fully-random".to_owned(),
            ],
        ),
    ];
    let arms: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{i} : goto {}", endpoint_chain(i, t)))
        .collect();
    let mut chains = Vec::from(base);
    chains.push((
        service_chain.as_str(),
        None,
        vec![format!(
            "numgen random mod {} vmap {{ {} }}",
            targets.len(),
            arms.join(", ")
        )],
    ));
    let endpoint_names: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| endpoint_chain(i, t))
        .collect();
    for (name, t) in endpoint_names.iter().zip(targets) {
        chains.push((
            name.as_str(),
            None,
            vec![
                format!("ip saddr {} jump mark-for-masquerade", t.ip()),
                format!("meta l4proto tcp dnat to {t}"),
            ],
        ));
    }
    for (name, hook, rules) in chains {
        s.push_str(&format!("  chain {name} {{\n"));
        if let Some(hook) = hook {
            s.push_str(&format!("    {hook}\n"));
        }
        for r in rules {
            s.push_str(&format!("    {r}\n"));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// Runs `nft -f -` in `ns` with `ruleset` on stdin.
fn nft_load(ns: &NetNs, ruleset: &str) -> Result<()> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    let written = child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(ruleset.as_bytes());
    // Waiting also reaps nft if the write failed (it exited early: its stderr says why).
    let out = child.wait_with_output().context("waiting for nft")?;
    ensure!(
        out.status.success(),
        "`nft -f -` in network namespace {} failed ({}): {}\nruleset:\n{ruleset}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    written.context("writing the ruleset to nft")
}

impl NftLb {
    /// Builds the topology with `targets` target namespaces (1..=[`MAX_TARGETS`]) and loads
    /// the DNAT table for the VIP [`VIP`]`:port` to every target's `port`. Nothing listens
    /// yet: start a [`serve`] on each [`NftLb::target`]. Fails with [`NftMissing`] without
    /// `nft`.
    pub fn new(targets: usize, port: u16) -> Result<NftLb> {
        ensure!(
            (1..=MAX_TARGETS).contains(&targets),
            "NftLb: {targets} targets (1 to {MAX_TARGETS})"
        );
        if !nft_available() {
            return Err(anyhow!(NftMissing));
        }
        let host = NetNs::new("lbhost")?;
        let client = NetNs::new("lbcli")?;
        host.sysctl("net.ipv4.ip_forward", "1")?;
        veth_pair(&client, "eth0", &host, "cl0")?;
        host.add_addr("cl0", "198.18.0.1/24")?;
        client.add_addr("eth0", "198.18.0.2/24")?;
        client.add_addr("eth0", "198.18.0.3/24")?;
        client.add_route("default", "198.18.0.1")?;
        // The VIP from the second address (module doc, "Client and server settings").
        client.ip(&[
            "route",
            "add",
            SERVICE_CIDR,
            "via",
            "198.18.0.1",
            "src",
            "198.18.0.3",
        ])?;
        let mut servers = Vec::with_capacity(targets);
        for i in 0..targets {
            let ns = NetNs::new(&format!("lbsrv{i}"))?;
            let link = format!("t{i}");
            veth_pair(&ns, "eth0", &host, &link)?;
            let gw = Ipv4Addr::new(198, 18, (i + 1) as u8, 1);
            host.add_addr(&link, &format!("{gw}/24"))?;
            ns.add_addr("eth0", &format!("{}/24", target_ip(i)))?;
            ns.add_route("default", &gw.to_string())?;
            servers.push(ns);
        }
        let addrs: Vec<SocketAddrV4> = (0..targets)
            .map(|i| SocketAddrV4::new(target_ip(i), port))
            .collect();
        let ruleset = kube_proxy_ruleset(port, &addrs);
        let start = Instant::now();
        nft_load(&host, &ruleset)?;
        let load_seconds = start.elapsed().as_secs_f64();
        Ok(NftLb {
            host,
            client,
            servers,
            port,
            ruleset,
            load_seconds,
        })
    }

    /// The router namespace (holds the nftables table and the conntrack entries).
    pub fn host(&self) -> &NetNs {
        &self.host
    }

    /// The client namespace.
    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// The namespace of target `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.targets()`.
    pub fn server(&self, i: usize) -> &NetNs {
        &self.servers[i]
    }

    /// The number of targets.
    pub fn targets(&self) -> usize {
        self.servers.len()
    }

    /// The VIP and port clients connect to.
    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, self.port)
    }

    /// Target `i`'s address and port (its server must listen there).
    pub fn target(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(target_ip(i), self.port)
    }

    /// The nftables ruleset loaded into `host` (for the README).
    pub fn ruleset(&self) -> &str {
        &self.ruleset
    }

    /// How long `nft -f` took to load the ruleset, seconds.
    pub fn load_seconds(&self) -> f64 {
        self.load_seconds
    }

    /// Conntrack entries currently in `host` (`net.netfilter.nf_conntrack_count`).
    pub fn conntrack_count(&self) -> Result<u64> {
        let s = self.host.read_sysctl("net.netfilter.nf_conntrack_count")?;
        s.parse()
            .with_context(|| format!("parsing nf_conntrack_count {s:?}"))
    }
}

/// Medians of [`run_baseline`]'s rounds, per path: `per_second`, `p50_us` and `p99_us` are
/// medians over the rounds; `connections`, `failures` and `by_tag` are totals of all rounds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BaselineResult {
    /// Direct to target 0.
    pub direct: ConnRate,
    /// Through the VIP.
    pub vip: ConnRate,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians and totals of several rounds (see [`BaselineResult`]).
pub fn combine(rounds: &[ConnRate]) -> ConnRate {
    let mut out = ConnRate {
        per_second: median(rounds.iter().map(|r| r.per_second).collect()),
        p50_us: median(rounds.iter().map(|r| r.p50_us).collect()),
        p99_us: median(rounds.iter().map(|r| r.p99_us).collect()),
        ..ConnRate::default()
    };
    for r in rounds {
        out.connections += r.connections;
        out.failures += r.failures;
        for (&tag, &n) in &r.by_tag {
            *out.by_tag.entry(tag).or_default() += n;
        }
    }
    out
}

/// Runs the baseline: an [`NftLb`] with `targets` targets, a [`serve`] on each (tag = its
/// index), a short warm-up of both paths (which must each complete connections), then
/// `rounds` interleaved rounds of [`connect_rate`] direct to target 0 and through the VIP
/// (same `duration` and `concurrency`; the order alternates between rounds). Prints a table
/// (conns/s with the rounds' min and max, p50/p99 latency, failures, spread across targets,
/// VIP/direct ratio) and returns the medians. Fails with [`NftMissing`] without `nft`.
pub fn run_baseline(
    targets: usize,
    duration: Duration,
    concurrency: usize,
    rounds: usize,
) -> Result<BaselineResult> {
    let rounds = rounds.max(1);
    let concurrency = concurrency.max(1);
    println!(
        "\n== baseline: kernel L4 load balancing as kube-proxy's nftables mode does it (nftables \
         DNAT, numgen random, conntrack) in a router namespace, {targets} targets; new TCP \
         connections (connect, read 1 byte, server closes), {concurrency} client threads, \
         {:.1} s per measurement, median of {rounds} interleaved rounds ==",
        duration.as_secs_f64()
    );
    let lb = NftLb::new(targets, BASELINE_PORT)?;
    let _servers = (0..targets)
        .map(|i| serve(lb.server(i), lb.target(i), i as u8))
        .collect::<Result<Vec<_>>>()?;
    let paths = [("direct", lb.target(0)), ("VIP", lb.vip())];
    for (name, addr) in paths {
        let warm = connect_rate(lb.client(), addr, WARMUP, concurrency)?;
        if warm.connections == 0 {
            bail!(
                "baseline: no connection {name} to {addr} completed during the warm-up \
                 ({} failures)",
                warm.failures
            );
        }
    }
    let mut direct = Vec::with_capacity(rounds);
    let mut vip = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for p in order {
            let r = connect_rate(lb.client(), paths[p].1, duration, concurrency)?;
            if p == 0 { &mut direct } else { &mut vip }.push(r);
        }
    }
    let result = BaselineResult {
        direct: combine(&direct),
        vip: combine(&vip),
    };
    print_table(
        &[
            ("direct to one target", direct.as_slice(), &result.direct, 1),
            (
                "through the VIP (nftables DNAT, numgen)",
                vip.as_slice(),
                &result.vip,
                targets,
            ),
        ],
        result.direct.per_second,
    );
    let conntrack = lb
        .conntrack_count()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string());
    println!(
        "conns/s: completed connections per second of wall-clock time, all client threads \
         together; latency: connect to the server's FIN; failures: totals of all rounds; \
         spread: smallest and largest share of one target in the VIP's connections (numgen \
         random: expect about 1/{targets} each); ratio: median conns/s vs direct. Both \
         paths cross the router, whose conntrack tracks every connection once the table is \
         loaded (as on a kube-proxy node); the VIP adds the nat chains (first packet), the \
         DNAT and the reply rewrite. The client uses one source address per path. Ruleset: \
         {} lines, loaded in {:.1} ms; {conntrack} conntrack entries in the router now.",
        lb.ruleset().lines().count(),
        lb.load_seconds() * 1e3
    );
    Ok(result)
}

/// Prints the rows (label, rounds, combined, targets) of [`run_baseline`]'s table.
fn print_table(rows: &[(&str, &[ConnRate], &ConnRate, usize)], direct_per_second: f64) {
    println!(
        "{:<42} {:>9} {:>17} {:>8} {:>8} {:>9} {:>13} {:>7}",
        "path", "conns/s", "(min, max)", "p50 us", "p99 us", "failures", "spread", "ratio"
    );
    for (label, rounds, c, targets) in rows {
        let (lo, hi) = rounds
            .iter()
            .map(|r| r.per_second)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            });
        let spread = match c.spread(*targets) {
            Some((lo, hi)) if *targets > 1 => format!("{:.1}/{:.1}%", lo * 100.0, hi * 100.0),
            _ => "-".to_owned(),
        };
        let ratio = if direct_per_second > 0.0 {
            format!("{:.2}", c.per_second / direct_per_second)
        } else {
            "-".to_owned()
        };
        println!(
            "{label:<42} {:>9.0} {:>17} {:>8.0} {:>8.0} {:>9} {:>13} {:>7}",
            c.per_second,
            format!("({lo:.0}, {hi:.0})"),
            c.p50_us,
            c.p99_us,
            c.failures,
            spread,
            ratio
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_spread() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        let r = ConnRate {
            connections: 10,
            by_tag: BTreeMap::from([(0, 6), (1, 4)]),
            ..ConnRate::default()
        };
        assert_eq!(r.spread(2), Some((0.4, 0.6)));
        assert_eq!(r.spread(3), Some((0.0, 0.6)));
        assert_eq!(ConnRate::default().spread(3), None);
    }

    #[test]
    fn ruleset_has_kube_proxy_shape() {
        let t: Vec<SocketAddrV4> = (0..3)
            .map(|i| SocketAddrV4::new(target_ip(i), 8080))
            .collect();
        let r = kube_proxy_ruleset(8080, &t);
        for needle in [
            "chain nat-prerouting",
            "type nat hook prerouting priority dstnat",
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "198.19.0.1 . tcp . 8080 : goto service-LBBENCH0-bench/vip/tcp/p8080",
            "numgen random mod 3 vmap { 0 : goto endpoint-",
            "meta l4proto tcp dnat to 198.18.3.2:8080",
        ] {
            assert!(r.contains(needle), "{needle:?} not in\n{r}");
        }
    }

    /// The baseline end to end (root, nft; about 10 s): every target reached through the
    /// VIP, no failure direct.
    #[test]
    #[ignore = "benchmark run (root, nftables, ~10 s): cargo test -p vpc-tests --lib lb_baseline -- --ignored --nocapture"]
    fn baseline_reaches_every_target() {
        if !nft_available() {
            eprintln!("skipped: {NftMissing}");
            return;
        }
        let targets: Vec<SocketAddrV4> = (0..3)
            .map(|i| SocketAddrV4::new(target_ip(i), BASELINE_PORT))
            .collect();
        println!("{}", kube_proxy_ruleset(BASELINE_PORT, &targets));
        let r = run_baseline(3, Duration::from_secs(1), 4, 3).unwrap();
        assert!(r.direct.per_second > 0.0 && r.vip.per_second > 0.0, "{r:?}");
        assert_eq!(r.direct.failures, 0, "{r:?}");
        assert_eq!(r.direct.by_tag.keys().copied().collect::<Vec<_>>(), [0]);
        assert!(r.vip.connections >= 300, "{r:?}");
        for tag in 0..3 {
            assert!(r.vip.by_tag.get(&tag).copied().unwrap_or(0) > 0, "{r:?}");
        }
    }
}
