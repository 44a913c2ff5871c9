//! Two control-plane replicas sharing one etcd, all in one fresh namespace: a private etcd
//! (`/usr/bin/etcd`, the Debian package etcd-server) on free ports of the namespace's
//! 127.0.0.1 and two `vpc-controlplane --store etcd:URL` on different ports.
//!
//! Checks: a VPC created on replica 1 is visible on replica 2; concurrent CreateSubnet calls
//! on both replicas for overlapping CIDRs of one VPC: exactly one succeeds (the per-account
//! guard serializes the replicas) and the other names `cidr_block`; replica 1 killed with
//! SIGKILL during a stream of creates: every acknowledged object is readable on replica 2.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use tonic::Code;
use vpc_proto::v1::{
    self as pb, volume_service_client::VolumeServiceClient, vpc_service_client::VpcServiceClient,
};
use vpc_tests::cluster::{ControlPlane, TOKEN_A, TempDir, channel, write_credentials};
use vpc_tests::netns::{NetNs, NsChild};

/// Where Debian's etcd-server installs etcd (`ETCD_BIN` overrides).
const ETCD_BIN: &str = "/usr/bin/etcd";

/// A private etcd inside a namespace, killed on drop (its data goes with the temp dir).
struct Etcd {
    _child: NsChild,
    url: String,
}

impl Etcd {
    /// Starts etcd in `ns` on free 127.0.0.1 ports with its data under `dir` and waits (at
    /// most 20 s) until it reports healthy.
    fn start(ns: &NetNs, dir: &Path) -> Result<Etcd> {
        let bin =
            std::env::var_os("ETCD_BIN").map_or_else(|| PathBuf::from(ETCD_BIN), PathBuf::from);
        ensure!(
            bin.is_file(),
            "etcd not found at {}: install the Debian package etcd-server or set ETCD_BIN",
            bin.display()
        );
        let (client, peer) = ns.run(|| -> std::io::Result<(u16, u16)> {
            // Both probes open at once, so they differ.
            let a = TcpListener::bind("127.0.0.1:0")?;
            let b = TcpListener::bind("127.0.0.1:0")?;
            Ok((a.local_addr()?.port(), b.local_addr()?.port()))
        })?;
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "e2e"])
            .arg("--data-dir")
            .arg(dir.join("etcd-data"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e2e={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = ns.spawn(cmd)?;
        let addr: SocketAddr = format!("127.0.0.1:{client}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
                bail!("etcd exited with {status} while starting:\n{log}");
            }
            if ns.run(|| healthy(addr)) {
                return Ok(Etcd { _child: child, url });
            }
            if Instant::now() > deadline {
                bail!("etcd at {url} not healthy within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether etcd at `addr` answers `GET /health` with `"health":"true"`.
fn healthy(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    };
    probe().is_ok_and(|r| r.contains("\"health\":\"true\""))
}

/// etcd and two replicas in one namespace.
struct Pair {
    r1: Option<ControlPlane>,
    r2: ControlPlane,
    _etcd: Etcd,
    ns: NetNs,
    _dir: TempDir,
}

impl Pair {
    fn start(tag: &str) -> Result<Pair> {
        let ns = NetNs::new(tag)?;
        ns.link_up("lo")?;
        let dir = TempDir::new(tag)?;
        let etcd = Etcd::start(&ns, dir.path())?;
        let creds = dir.path().join("credentials.json");
        write_credentials(&creds)?;
        let args = vec![
            "--store".to_owned(),
            format!("etcd:{}", etcd.url),
            "--credentials".into(),
            creds.display().to_string(),
        ];
        let r1 = ControlPlane::start(&ns, "127.0.0.1:7421", &args).context("replica 1")?;
        let r2 = ControlPlane::start(&ns, "127.0.0.1:7422", &args).context("replica 2")?;
        Ok(Pair {
            r1: Some(r1),
            r2,
            _etcd: etcd,
            ns,
            _dir: dir,
        })
    }

    fn url1(&self) -> Result<String> {
        Ok(self.r1.as_ref().context("replica 1 is gone")?.url.clone())
    }

    async fn vpc_client(&self, url: &str) -> Result<VpcServiceClient<vpc_tests::cluster::Authed>> {
        Ok(VpcServiceClient::new(
            channel(&self.ns.path(), url, TOKEN_A).await?,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_etcd() -> Result<()> {
    let pair = Pair::start("etcd2")?;
    let mut v1 = pair.vpc_client(&pair.url1()?).await?;
    let mut v2 = pair.vpc_client(&pair.r2.url).await?;

    // Written on 1, read on 2.
    let vpc = v1
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.0.0.0/16".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .vpc
        .context("vpc")?;
    let seen = v2
        .describe_vpcs(pb::DescribeVpcsRequest {
            vpc_ids: vec![vpc.vpc_id.clone()],
            ..Default::default()
        })
        .await
        .context("replica 2 describes the VPC replica 1 created")?
        .into_inner()
        .vpcs;
    ensure!(seen == vec![vpc.clone()], "replica 2 sees {seen:?}");
    // The per-account VPC quota counts both replicas' writes.
    for i in 1..5 {
        let c = if i % 2 == 0 { &mut v1 } else { &mut v2 };
        c.create_vpc(pb::CreateVpcRequest {
            cidr_block: format!("10.{i}.0.0/16"),
            ..Default::default()
        })
        .await?;
    }
    let sixth = v2
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.9.0.0/16".into(),
            ..Default::default()
        })
        .await;
    ensure!(
        sixth.as_ref().err().map(tonic::Status::code) == Some(Code::ResourceExhausted),
        "a sixth VPC across replicas: {sixth:?}"
    );

    // Overlapping subnets created at once on both replicas: exactly one wins each round.
    const ROUNDS: u8 = 20;
    let mut losers = Vec::new();
    for k in 0..ROUNDS {
        let a = pb::CreateSubnetRequest {
            vpc_id: vpc.vpc_id.clone(),
            cidr_block: format!("10.0.{k}.0/24"),
            ..Default::default()
        };
        let b = pb::CreateSubnetRequest {
            vpc_id: vpc.vpc_id.clone(),
            cidr_block: format!("10.0.{k}.128/25"),
            ..Default::default()
        };
        let (mut c1, mut c2) = (v1.clone(), v2.clone());
        let (r1, r2) = tokio::join!(c1.create_subnet(a), c2.create_subnet(b));
        let ok = usize::from(r1.is_ok()) + usize::from(r2.is_ok());
        ensure!(
            ok == 1,
            "round {k}: {ok} of 2 overlapping subnets created: {r1:?} {r2:?}"
        );
        let loser = r1.err().or(r2.err()).context("a loser")?;
        ensure!(
            loser.code() == Code::InvalidArgument && loser.message().contains("cidr_block"),
            "round {k}: the loser should be INVALID_ARGUMENT on cidr_block: {loser:?}"
        );
        losers.push(loser.message().to_owned());
    }
    eprintln!(
        "{ROUNDS} rounds, one winner each; a loser was told: {}",
        losers.first().map_or("", String::as_str)
    );
    let subnets = v2
        .describe_subnets(pb::DescribeSubnetsRequest {
            vpc_id: vpc.vpc_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .subnets;
    ensure!(
        subnets.len() == usize::from(ROUNDS),
        "{} subnets after {ROUNDS} rounds",
        subnets.len()
    );
    for (i, a) in subnets.iter().enumerate() {
        let na = ipnet(&a.cidr_block)?;
        for b in &subnets[i + 1..] {
            ensure!(
                !overlap(na, ipnet(&b.cidr_block)?),
                "{} and {} overlap",
                a.cidr_block,
                b.cidr_block
            );
        }
    }
    Ok(())
}

/// `(network, prefix)` of `a.b.c.d/n`.
fn ipnet(text: &str) -> Result<(u32, u8)> {
    let (ip, len) = text.split_once('/').context("no prefix")?;
    let ip: std::net::Ipv4Addr = ip.parse()?;
    Ok((u32::from(ip), len.parse()?))
}

fn overlap(a: (u32, u8), b: (u32, u8)) -> bool {
    let mask = |len: u8| u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let m = mask(a.1.min(b.1));
    a.0 & m == b.0 & m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_keeps_acknowledged_writes() -> Result<()> {
    let mut pair = Pair::start("etcdkill")?;
    let url1 = pair.url1()?;
    let ns_path = pair.ns.path();
    // Volumes need a host to be placed on (no agent: they stay `creating`).
    vpc_tests::cluster::register_host(&ns_path, &url1, "host-0").await?;
    // A stream of creates from 4 writers on replica 1; record what was acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let acked = Arc::clone(&acked);
        let (url, ns_path) = (url1.clone(), ns_path.clone());
        writers.push(tokio::spawn(async move {
            let mut vols = VolumeServiceClient::new(channel(&ns_path, &url, TOKEN_A).await?);
            for _ in 0..100_000 {
                match vols
                    .create_volume(pb::CreateVolumeRequest {
                        size_gib: 1,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => {
                        let id = r.into_inner().volume.context("volume")?.volume_id;
                        acked
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .push(id);
                    }
                    Err(_) => return anyhow::Ok(()), // the replica is gone
                }
            }
            anyhow::Ok(())
        }));
    }
    let start = Instant::now();
    while acked.lock().map(|v| v.len()).unwrap_or(0) < 200
        && start.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pair.r1.take().context("replica 1")?.crash()?;
    for w in writers {
        w.await??;
    }
    let acked = acked.lock().map(|v| v.clone()).unwrap_or_default();
    ensure!(
        acked.len() >= 200,
        "only {} creates acknowledged before the crash",
        acked.len()
    );
    // Replica 2 serves every acknowledged volume.
    let mut vols = VolumeServiceClient::new(channel(&ns_path, &pair.r2.url, TOKEN_A).await?);
    let mut missing = Vec::new();
    for chunk in acked.chunks(500) {
        match vols
            .describe_volumes(pb::DescribeVolumesRequest {
                volume_ids: chunk.to_vec(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => ensure!(r.into_inner().volumes.len() == chunk.len()),
            Err(s) if s.code() == Code::NotFound => {
                // Find which ones.
                for id in chunk {
                    let r = vols
                        .describe_volumes(pb::DescribeVolumesRequest {
                            volume_ids: vec![id.clone()],
                            ..Default::default()
                        })
                        .await;
                    if r.is_err() {
                        missing.push(id.clone());
                    }
                }
            }
            Err(s) => return Err(s.into()),
        }
    }
    ensure!(
        missing.is_empty(),
        "{} of {} acknowledged volumes missing on replica 2: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    // And it keeps serving writes.
    vols.create_volume(pb::CreateVolumeRequest {
        size_gib: 1,
        ..Default::default()
    })
    .await?;
    eprintln!("{} acknowledged volumes all on replica 2", acked.len());
    Ok(())
}
