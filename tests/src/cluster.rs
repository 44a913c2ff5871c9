//! A small cloud in namespaces driven only through the API: a fabric bridge, `n` hosts
//! (underlay only), the real `vpc-controlplane` process (embedded store in a temporary
//! directory, or etcd) and one real `vpc-agent` per host in control-plane mode, which
//! creates the instances' namespaces itself.
//!
//! Dropping the cluster stops the agents and the control plane, deletes the instances'
//! namespaces (they carry a unique prefix), the pins and the host namespaces.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::netns::{BpffsDir, NetNs, NsChild, unique_name, veth_pair};
use crate::procs::{Agent, workspace_bin};

/// Tenant account ids and tokens the cluster's credentials hold.
pub const ACCOUNT_A: &str = "111122223333";
/// Second tenant (isolation tests).
pub const ACCOUNT_B: &str = "444455556666";
/// Tenant A's token.
pub const TOKEN_A: &str = "tenant-a-token-0123456789abcdef";
/// Tenant B's token.
pub const TOKEN_B: &str = "tenant-b-token-0123456789abcdef";
/// The agents' token.
pub const AGENT_TOKEN: &str = "agent-token-0123456789abcdef0";
const BRIDGE: &str = "br0";
const UNDERLAY_IF: &str = "ul0";

/// A running `vpc-controlplane` (SIGTERM then SIGKILL on drop).
#[derive(Debug)]
pub struct ControlPlane {
    child: NsChild,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl ControlPlane {
    /// Starts the control plane in `ns` on `listen` with `args` (store, credentials, ...)
    /// and waits (at most 30 s) for `listening on`.
    pub fn start(ns: &NetNs, listen: &str, args: &[String]) -> Result<ControlPlane> {
        let mut cmd = Command::new(workspace_bin("VPC_CONTROLPLANE_BIN", "vpc-controlplane")?);
        cmd.args(["--listen", listen]).args(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = ns.spawn(cmd)?;
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .context("control-plane stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let addr = line
                    .strip_prefix("listening on ")
                    .with_context(|| format!("unexpected first line {line:?}"))?;
                Ok(ControlPlane {
                    child,
                    url: format!("http://{addr}"),
                })
            }
            Err(_) => {
                let status = child.try_wait()?;
                bail!("control plane not listening after 30 s (exit: {status:?})")
            }
        }
    }

    /// Kills it with SIGKILL (a crash) and reaps it.
    pub fn crash(mut self) -> Result<()> {
        self.child.child_mut().kill()?;
        self.child.child_mut().wait()?;
        Ok(())
    }
}

pub use vpc_proto::Bearer;

/// A gRPC channel carrying a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A TCP connection to `addr` made from the network namespace at `netns`: the socket is
/// created by a thread inside the namespace, and stays there.
pub async fn connect_in(
    netns: std::path::PathBuf,
    addr: std::net::SocketAddr,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>> {
    let stream = std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| std::io::Error::other("connector thread panicked"))??;
    Ok(hyper_util::rt::TokioIo::new(
        tokio::net::TcpStream::from_std(stream)?,
    ))
}

/// A channel to `url` with `token` on every call, whose connections are made from the
/// network namespace at `netns` (test traffic stays inside the test's namespaces).
pub async fn channel(netns: &Path, url: &str, token: &str) -> Result<Authed> {
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("{url} is not http://IP:PORT"))?;
    let netns = netns.to_owned();
    let connector =
        tower::service_fn(move |_: tonic::transport::Uri| connect_in(netns.clone(), addr));
    let ch = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(InterceptedService::new(ch, Bearer::new(token)?))
}

/// Writes the credentials file the cluster's control plane uses.
pub fn write_credentials(path: &Path) -> Result<()> {
    let creds = serde_json::json!({
        "accounts": [
            {"id": ACCOUNT_A, "tokens": [TOKEN_A]},
            {"id": ACCOUNT_B, "tokens": [TOKEN_B]},
        ],
        "agent_tokens": [AGENT_TOKEN],
    });
    std::fs::write(path, serde_json::to_vec_pretty(&creds)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `/tmp/<unique>`.
    pub fn new(tag: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cluster.
#[derive(Debug)]
pub struct Cluster {
    agents: Vec<Option<Agent>>,
    cp: Option<ControlPlane>,
    pins: Vec<BpffsDir>,
    netns_prefix: String,
    hosts: Vec<NetNs>,
    fabric: NetNs,
    dir: TempDir,
    store_args: Vec<String>,
    listen: String,
    /// Agent binary per host (`None`: this build's, `VPC_AGENT_BIN`).
    agent_bins: Vec<Option<PathBuf>>,
}

impl Cluster {
    /// Builds `n` hosts, starts the control plane (embedded store) on the fabric namespace's
    /// 10.200.0.254 and an agent per host.
    pub fn start(n: usize) -> Result<Cluster> {
        let dir = TempDir::new("cp")?;
        let store = dir.path().join("store.redb");
        Self::start_with(
            n,
            dir,
            vec!["--store".into(), format!("redb:{}", store.display())],
        )
    }

    /// As [`Cluster::start`] with other store arguments.
    pub fn start_with(n: usize, dir: TempDir, store_args: Vec<String>) -> Result<Cluster> {
        Self::start_with_agents(dir, store_args, vec![None; n])
    }

    /// As [`Cluster::start`], host `i` running the agent binary `agent_bins[i]` (`None`:
    /// this build's). The upgrade test starts hosts on the previous release's agent.
    pub fn start_agents(agent_bins: Vec<Option<PathBuf>>) -> Result<Cluster> {
        let dir = TempDir::new("cp")?;
        let store = dir.path().join("store.redb");
        let store_args = vec!["--store".into(), format!("redb:{}", store.display())];
        Self::start_with_agents(dir, store_args, agent_bins)
    }

    fn start_with_agents(
        dir: TempDir,
        store_args: Vec<String>,
        agent_bins: Vec<Option<PathBuf>>,
    ) -> Result<Cluster> {
        let n = agent_bins.len();
        let fabric = NetNs::new("fab")?;
        fabric.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        fabric.link_up(BRIDGE)?;
        fabric.add_addr(BRIDGE, "10.200.0.254/24")?;
        fabric.link_up("lo")?;
        let mut hosts = Vec::new();
        for i in 0..n {
            let h = NetNs::new(&format!("h{i}"))?;
            for key in [
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
            ] {
                h.sysctl(key, "0")?;
            }
            let port = format!("p{i}");
            veth_pair(&h, UNDERLAY_IF, &fabric, &port)?;
            fabric.ip(&["link", "set", "dev", &port, "master", BRIDGE])?;
            fabric.link_up(&port)?;
            h.add_addr(UNDERLAY_IF, &format!("10.200.0.{}/24", i + 1))?;
            h.link_up(UNDERLAY_IF)?;
            h.link_up("lo")?;
            hosts.push(h);
        }
        write_credentials(&dir.path().join("credentials.json"))?;
        let mut c = Cluster {
            agents: (0..n).map(|_| None).collect(),
            cp: None,
            pins: Vec::new(),
            netns_prefix: unique_name("i"),
            hosts,
            fabric,
            dir,
            store_args,
            listen: "10.200.0.254:7420".into(),
            agent_bins,
        };
        c.start_control_plane()?;
        for i in 0..n {
            c.pins.push(BpffsDir::new(&format!("h{i}"))?);
            c.start_agent(i)?;
        }
        c.wait_hosts_connected()?;
        Ok(c)
    }

    /// Waits (at most 30 s) until every host's agent registered and watches its state, so
    /// placement sees all of them.
    pub fn wait_hosts_connected(&self) -> Result<()> {
        let n = self.hosts.len();
        let (fabric, url) = (self.fabric.path(), self.url());
        std::thread::spawn(move || -> Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let ch = channel(&fabric, &url, AGENT_TOKEN).await?;
                    let h = vpc_proto::v1::host_service_client::HostServiceClient::new(ch);
                    eventually(Duration::from_secs(30), "every agent to connect", || {
                        let mut h = h.clone();
                        async move {
                            let r = h
                                .describe_hosts(vpc_proto::v1::DescribeHostsRequest {})
                                .await?
                                .into_inner();
                            Ok((r.hosts.iter().filter(|x| x.connected).count() >= n).then_some(()))
                        }
                    })
                    .await
                })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("waiting for the agents panicked"))?
    }

    /// Starts the control plane (again, on the same store).
    pub fn start_control_plane(&mut self) -> Result<()> {
        let mut args = self.store_args.clone();
        args.push("--credentials".into());
        args.push(
            self.dir
                .path()
                .join("credentials.json")
                .display()
                .to_string(),
        );
        self.cp = Some(ControlPlane::start(&self.fabric, &self.listen, &args)?);
        Ok(())
    }

    /// Takes the control plane out (to crash or drop it).
    pub fn take_control_plane(&mut self) -> Option<ControlPlane> {
        self.cp.take()
    }

    /// The control plane's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// Host id of host `i`.
    pub fn host_id(i: usize) -> String {
        format!("host-{i}")
    }

    /// Starts the agent of host `i`.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let args = [
            "--host".to_owned(),
            Self::host_id(i),
            "--control-plane".into(),
            self.url(),
            "--agent-token".into(),
            AGENT_TOKEN.into(),
            "--netns-prefix".into(),
            self.host_prefix(i),
            "--xdp-mode".into(),
            "off".into(),
            "--data-dir".into(),
            self.data_dir(i).display().to_string(),
            "--snapshot-dir".into(),
            self.dir.path().join("snapshots").display().to_string(),
            "--cgroup-name".into(),
            self.cgroup_name(i),
            "--stop-grace".into(),
            "2".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ns, pins) = (&self.hosts[i], self.pins[i].path());
        let agent = match &self.agent_bins[i] {
            Some(bin) => Agent::start_bin(bin, ns, pins, &[UNDERLAY_IF], &args),
            None => Agent::start_with(ns, pins, &[UNDERLAY_IF], &args),
        }
        .with_context(|| format!("starting the agent of host {i}"))?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    /// Sets the agent binary of host `i` for its next [`Cluster::start_agent`] (`None`: this
    /// build's).
    pub fn set_agent_bin(&mut self, i: usize, bin: Option<PathBuf>) {
        self.agent_bins[i] = bin;
    }

    /// Host `i`'s compute and storage data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("h{i}"))
    }

    /// Host `i`'s instance cgroup name (unique per cluster: tests run in parallel).
    pub fn cgroup_name(&self, i: usize) -> String {
        format!("{}h{i}", self.netns_prefix)
    }

    /// Host `i`'s compute runtime, as its agent sees it (to look into instances, and to
    /// clean up).
    pub fn runtime(&self, i: usize) -> Result<controlplane::compute::runtime::Runtime> {
        Ok(controlplane::compute::runtime::Runtime::new(
            self.data_dir(i).join("instances"),
            &self.cgroup_name(i),
            workspace_bin("VPC_INSTANCE_INIT_BIN", "vpc-instance-init")?,
        )?)
    }

    /// Runs `sh -c script` inside a running instance of host `i` (all its namespaces:
    /// mount, PID, UTS, network), as `docker exec` would.
    pub fn exec(&self, i: usize, instance_id: &str, script: &str) -> Result<std::process::Output> {
        let pid = self
            .runtime(i)?
            .ns_pid(instance_id)
            .with_context(|| format!("instance {instance_id} is not running on host {i}"))?;
        Ok(Command::new("nsenter")
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--pid",
                "--",
                "/bin/sh",
                "-c",
                script,
            ])
            .output()?)
    }

    /// Every stdout line of host `i`'s running agent.
    pub fn agent_lines(&self, i: usize) -> Vec<String> {
        self.agents[i]
            .as_ref()
            .map(Agent::lines)
            .unwrap_or_default()
    }

    /// Takes the agent of host `i` out (to crash or stop it).
    pub fn take_agent(&mut self, i: usize) -> Option<Agent> {
        self.agents[i].take()
    }

    /// The namespace of host `i`.
    pub fn host(&self, i: usize) -> &NetNs {
        &self.hosts[i]
    }

    /// The pin directory of host `i`.
    pub fn pin_dir(&self, i: usize) -> &Path {
        self.pins[i].path()
    }

    /// The instance-namespace prefix of host `i`'s agent. Each host has its own: on a real
    /// host an agent owns every namespace with its prefix, and here all hosts share
    /// /run/netns.
    fn host_prefix(&self, i: usize) -> String {
        format!("{}h{i}-", self.netns_prefix)
    }

    /// The name of an instance's namespace (on whichever host has it).
    pub fn instance_netns(&self, instance_id: &str) -> String {
        (0..self.hosts.len())
            .map(|i| format!("{}{instance_id}", self.host_prefix(i)))
            .find(|n| Path::new("/run/netns").join(n).exists())
            .unwrap_or_else(|| format!("{}{instance_id}", self.host_prefix(0)))
    }

    /// Runs `program args` inside an instance's namespace and returns its output.
    pub fn in_instance(
        &self,
        instance_id: &str,
        program: &str,
        args: &[&str],
    ) -> Result<std::process::Output> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.instance_netns(instance_id), program])
            .args(args)
            .output()?;
        Ok(out)
    }

    /// Whether an instance's namespace exists.
    pub fn instance_exists(&self, instance_id: &str) -> bool {
        Path::new("/run/netns")
            .join(self.instance_netns(instance_id))
            .exists()
    }

    /// Runs the `vpc` CLI as tenant A against this cluster's control plane (from the fabric
    /// namespace, no config file, stdin closed).
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = self.fabric.command(workspace_bin("VPC_CLI_BIN", "vpc")?);
        cmd.args(args)
            .env("VPC_ENDPOINT", self.url())
            .env("VPC_TOKEN", TOKEN_A)
            .env("XDG_CONFIG_HOME", self.dir.path().join("no-config"))
            .env_remove("VPC_CONFIG")
            .env_remove("VPC_PROFILE")
            .stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running vpc {args:?}"))
    }

    /// A successful `vpc ARGS` (as [`Cluster::cli`]): its stdout; a failure is an error
    /// with the command's output.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        anyhow::ensure!(
            out.status.success(),
            "vpc {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A successful `vpc ARGS -o json --query QUERY` as a plain string (a JSON string's
    /// content, anything else as JSON text).
    pub fn cli_query(&self, args: &[&str], query: &str) -> Result<String> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json", "--query", query]);
        let text = self.cli_ok(&all)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("vpc {all:?}: {text}"))?;
        Ok(match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
    }

    /// The fabric namespace (where the control plane listens).
    pub fn fabric(&self) -> &NetNs {
        &self.fabric
    }

    /// A command run in the fabric namespace (where the control plane listens).
    pub fn fabric_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.fabric.command(program)
    }

    /// Tenant A's channel.
    pub async fn tenant_a(&self) -> Result<Authed> {
        channel(&self.fabric.path(), &self.url(), TOKEN_A).await
    }

    /// Tenant B's channel.
    pub async fn tenant_b(&self) -> Result<Authed> {
        channel(&self.fabric.path(), &self.url(), TOKEN_B).await
    }

    /// An agent's channel (host service).
    pub async fn agent_channel(&self) -> Result<Authed> {
        channel(&self.fabric.path(), &self.url(), AGENT_TOKEN).await
    }

    /// The prefix of every instance namespace of this cluster (`<prefix>h<i>-<instance id>`).
    pub fn netns_prefix(&self) -> &str {
        &self.netns_prefix
    }

    /// The temporary directory (store, credentials).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in self.agents.iter_mut() {
            if let Some(a) = a.take() {
                let _ = a.stop();
            }
        }
        self.cp.take();
        // Instances' processes, cgroups and files, and volumes' loop devices (the agents
        // leave them running, as a real host would).
        for i in 0..self.hosts.len() {
            let (rt, dir) = (self.runtime(i), self.data_dir(i));
            let snapshots = self.dir.path().join("snapshots");
            let _ = std::thread::spawn(move || {
                let Ok(tokio) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                tokio.block_on(async {
                    if let Ok(rt) = rt {
                        for id in rt.list().unwrap_or_default() {
                            let _ = rt.destroy(&id, Duration::ZERO).await;
                        }
                    }
                    if let Ok(st) =
                        controlplane::storage::Storage::new(dir.join("volumes"), snapshots.clone())
                    {
                        for v in st.volumes().unwrap_or_default() {
                            let _ = st.detach(&v).await;
                        }
                    }
                });
            })
            .join();
        }
        // The agents' instance cgroups.
        for i in 0..self.hosts.len() {
            if let Ok(ctls) = std::fs::read_dir("/sys/fs/cgroup") {
                for ctl in ctls.flatten() {
                    let _ = std::fs::remove_dir(ctl.path().join(self.cgroup_name(i)));
                }
            }
        }
        // Instances' namespaces.
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&self.netns_prefix) {
                    let _ = Command::new("ip").args(["netns", "del", name]).status();
                }
            }
        }
    }
}

/// Creates a VPC of `vpc_cidr` with one subnet of `subnet_cidr`: (VPC id, subnet id).
pub async fn create_network(
    ch: Authed,
    vpc_cidr: &str,
    subnet_cidr: &str,
) -> Result<(String, String)> {
    use vpc_proto::v1::{self as pb, vpc_service_client::VpcServiceClient};
    let mut vpcs = VpcServiceClient::new(ch);
    let vpc = vpcs
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: vpc_cidr.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .vpc
        .context("no VPC in the answer")?;
    let subnet = vpcs
        .create_subnet(pb::CreateSubnetRequest {
            vpc_id: vpc.vpc_id.clone(),
            cidr_block: subnet_cidr.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .subnet
        .context("no subnet in the answer")?;
    Ok((vpc.vpc_id, subnet.subnet_id))
}

/// Registers host `id` (no agent behind it) with the control plane at `url`, reached from
/// the namespace at `netns`: placement needs a registered host (volumes, instances), and
/// tests of the API alone need no agent.
pub async fn register_host(netns: &Path, url: &str, id: &str) -> Result<()> {
    let ch = channel(netns, url, AGENT_TOKEN).await?;
    vpc_proto::v1::host_service_client::HostServiceClient::new(ch)
        .register_host(vpc_proto::v1::RegisterHostRequest {
            host_id: id.into(),
            underlay_ip: "192.0.2.1".into(),
        })
        .await?;
    Ok(())
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
