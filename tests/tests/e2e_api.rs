//! The appliance driven entirely through the API: the real control plane (embedded store)
//! and real agents on two hosts in namespaces; instances are created by the agents.
//!
//! Checks: instances on two hosts reach each other over the datapath; tenants are isolated;
//! network programming latency is measured; an agent killed with SIGKILL during a TCP
//! transfer leaves the transfer running and reprograms nothing when it returns; an agent
//! that was down while a VPC was deleted removes the VPC's state when it returns; a control
//! plane killed with SIGKILL during a stream of creates keeps every acknowledged object.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use controlplane::datapath::{OverlayMaps, PinLayout};
use vpc_proto::v1::{
    self as pb, host_service_client::HostServiceClient,
    instance_service_client::InstanceServiceClient, volume_service_client::VolumeServiceClient,
    vpc_service_client::VpcServiceClient,
};
use vpc_tests::cluster::{
    Cluster, ControlPlane, TOKEN_A, TempDir, channel, eventually, write_credentials,
};
use vpc_tests::netns::NetNs;

fn revision<T>(r: &tonic::Response<T>) -> Result<i64> {
    r.metadata()
        .get("x-vpc-revision")
        .context("no x-vpc-revision")?
        .to_str()?
        .parse()
        .context("x-vpc-revision")
}

/// Waits until `n` connected hosts applied `rev`.
async fn applied(c: &Cluster, n: usize, rev: i64) -> Result<()> {
    let h = HostServiceClient::new(c.agent_channel().await?);
    eventually(Duration::from_secs(30), "hosts to apply the write", || {
        let mut h = h.clone();
        async move {
            let r = h
                .describe_hosts(pb::DescribeHostsRequest {})
                .await?
                .into_inner();
            let ok = r
                .hosts
                .iter()
                .filter(|x| x.connected && x.applied_revision >= rev)
                .count();
            Ok((ok >= n).then_some(()))
        }
    })
    .await
}

async fn run_on(c: &Cluster, subnet: &str, host: usize) -> Result<(pb::Instance, i64)> {
    run_as(c.tenant_a().await?, subnet, host).await
}

async fn run_as(
    ch: vpc_tests::cluster::Authed,
    subnet: &str,
    host: usize,
) -> Result<(pb::Instance, i64)> {
    let mut inst = InstanceServiceClient::new(ch);
    let r = inst
        .run_instances(pb::RunInstancesRequest {
            subnet_id: subnet.into(),
            host_id: Cluster::host_id(host),
            ..Default::default()
        })
        .await?;
    let rev = revision(&r)?;
    let i = r.into_inner().instances.pop().context("no instance")?;
    Ok((i, rev))
}

fn map_writes(line: &str) -> Option<usize> {
    // "applied revision R: N changes, M map writes"
    let rest = line.strip_prefix("applied revision ")?;
    let m = rest.split(", ").nth(1)?;
    m.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_drives_two_hosts() -> Result<()> {
    let mut c = Cluster::start(2)?;
    let mut vpcs = VpcServiceClient::new(c.tenant_a().await?);
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
            cidr_block: "10.0.1.0/24".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .subnet
        .context("subnet")?;
    let (a, _) = run_on(&c, &subnet.subnet_id, 0).await?;
    let (b, rev) = run_on(&c, &subnet.subnet_id, 1).await?;
    assert_eq!(
        a.private_ip_address, "10.0.1.4",
        "lowest free address first"
    );
    assert_eq!(b.private_ip_address, "10.0.1.5");
    applied(&c, 2, rev).await?;
    ensure!(c.instance_exists(&a.instance_id) && c.instance_exists(&b.instance_id));
    let out = c.in_instance(
        &a.instance_id,
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            &b.private_ip_address,
        ],
    )?;
    ensure!(
        out.status.success(),
        "ping across hosts failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Instances are running once their host applied them.
    let mut inst = InstanceServiceClient::new(c.tenant_a().await?);
    let described = inst
        .describe_instances(pb::DescribeInstancesRequest::default())
        .await?
        .into_inner();
    assert_eq!(described.instances.len(), 2);
    assert!(
        described.instances.iter().all(|i| i.state == "running"),
        "{described:?}"
    );

    // Tenant isolation: B does not see A's VPC, and may use the same CIDR.
    let mut vpcs_b = VpcServiceClient::new(c.tenant_b().await?);
    let err = vpcs_b
        .describe_vpcs(pb::DescribeVpcsRequest {
            vpc_ids: vec![vpc.vpc_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        vpcs_b
            .describe_vpcs(pb::DescribeVpcsRequest::default())
            .await?
            .into_inner()
            .vpcs
            .is_empty()
    );
    let err = vpcs_b
        .delete_vpc(pb::DeleteVpcRequest {
            vpc_id: vpc.vpc_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let vpc_b = vpcs_b
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.0.0.0/16".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .vpc
        .context("vpc")?;
    assert_ne!(vpc_b.vni, vpc.vni);
    let subnet_b = vpcs_b
        .create_subnet(pb::CreateSubnetRequest {
            vpc_id: vpc_b.vpc_id.clone(),
            cidr_block: "10.0.1.0/24".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .subnet
        .context("subnet")?;
    // B's instances get the same addresses as A's, on the other hosts.
    let (b1, _) = run_as(c.tenant_b().await?, &subnet_b.subnet_id, 1).await?;
    let (b2, rev) = run_as(c.tenant_b().await?, &subnet_b.subnet_id, 0).await?;
    assert_eq!(b1.private_ip_address, a.private_ip_address);
    assert_eq!(b2.private_ip_address, b.private_ip_address);
    applied(&c, 2, rev).await?;
    let out = c.in_instance(
        &b1.instance_id,
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            &b2.private_ip_address,
        ],
    )?;
    ensure!(
        out.status.success(),
        "B's instances cannot reach each other across hosts"
    );
    // An address only B's VPC has, on A's instance's own host: A cannot reach it.
    let (b3, rev) = run_as(c.tenant_b().await?, &subnet_b.subnet_id, 0).await?;
    assert_eq!(b3.private_ip_address, "10.0.1.6");
    applied(&c, 2, rev).await?;
    let out = c.in_instance(
        &a.instance_id,
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            &b3.private_ip_address,
        ],
    )?;
    ensure!(
        !out.status.success(),
        "A's instance reached an address of B's VPC"
    );
    let out = c.in_instance(
        &b1.instance_id,
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            &b3.private_ip_address,
        ],
    )?;
    ensure!(
        out.status.success(),
        "B's instances cannot reach B's third instance"
    );

    // Network programming latency was measured.
    let mut hosts = HostServiceClient::new(c.agent_channel().await?);
    let lat = hosts
        .get_programming_latency(pb::GetProgrammingLatencyRequest {})
        .await?
        .into_inner();
    ensure!(lat.samples > 0, "no programming latency samples: {lat:?}");
    eprintln!("network programming latency: {lat:?}");

    // Kill -9 host 0's agent during a TCP transfer from a (host 0) to b (host 1).
    let b_ns = c.instance_netns(&b.instance_id);
    let a_ns = c.instance_netns(&a.instance_id);
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &b_ns, "iperf3", "-s", "-1", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = std::process::Command::new("timeout")
        .args([
            "20",
            "ip",
            "netns",
            "exec",
            &a_ns,
            "iperf3",
            "-c",
            &b.private_ip_address,
            "-p",
            "5201",
            "-t",
            "4",
            "-J",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.take_agent(0).context("agent 0")?.crash()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_agent(0)?;
    let out = tokio::task::spawn_blocking(move || client.wait_with_output()).await??;
    let _ = server.kill();
    let _ = server.wait();
    ensure!(
        out.status.success(),
        "the TCP transfer broke while the agent restarted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let intervals = report["intervals"].as_array().context("iperf3 intervals")?;
    for iv in intervals {
        let bps = iv["sum"]["bits_per_second"].as_f64().unwrap_or(0.0);
        ensure!(
            bps > 0.0,
            "an interval without traffic during the restart: {iv}"
        );
    }
    // The restarted agent found the kernel already in the desired state.
    let restarted = eventually(
        Duration::from_secs(20),
        "the restarted agent to apply",
        || {
            let lines = c.agent_lines(0);
            async move { Ok(lines.iter().find_map(|l| map_writes(l))) }
        },
    )
    .await?;
    assert_eq!(
        restarted,
        0,
        "the restarted agent rewrote maps: {:?}",
        c.agent_lines(0)
    );

    // Host 1's agent is down while the VPC goes away; when it returns, the VPC's state goes.
    c.take_agent(1).context("agent 1")?.stop()?;
    inst.terminate_instances(pb::TerminateInstancesRequest {
        instance_ids: vec![a.instance_id.clone(), b.instance_id.clone()],
    })
    .await?;
    vpcs.delete_subnet(pb::DeleteSubnetRequest {
        subnet_id: subnet.subnet_id.clone(),
    })
    .await?;
    let rev = revision(
        &vpcs
            .delete_vpc(pb::DeleteVpcRequest {
                vpc_id: vpc.vpc_id.clone(),
            })
            .await?,
    )?;
    applied(&c, 1, rev).await?;
    ensure!(
        !c.instance_exists(&a.instance_id),
        "host 0 kept a terminated instance"
    );
    // B's instance with A's old address on host 0 is untouched and still reachable in B's VPC.
    ensure!(c.instance_exists(&b2.instance_id));
    ensure!(
        c.instance_exists(&b.instance_id),
        "host 1's agent is down: its instance stays until it returns"
    );
    c.start_agent(1)?;
    applied(&c, 2, rev).await?;
    ensure!(
        !c.instance_exists(&b.instance_id),
        "host 1 kept a terminated instance"
    );
    let maps = OverlayMaps::open(&PinLayout::new(c.pin_dir(1)))?.read()?;
    ensure!(
        !maps.vnis.contains(&vpc.vni),
        "host 1 still has VNI {} after the VPC was deleted: {:?}",
        vpc.vni,
        maps.vnis
    );
    ensure!(maps.neighbors.keys().all(|(vni, _)| *vni != vpc.vni));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_crash_keeps_acknowledged_writes() -> Result<()> {
    let ns = NetNs::new("cpcrash")?;
    ns.link_up("lo")?;
    let dir = TempDir::new("cpcrash")?;
    let creds = dir.path().join("credentials.json");
    write_credentials(&creds)?;
    let args = vec![
        "--store".to_owned(),
        format!("redb:{}", dir.path().join("store.redb").display()),
        "--credentials".into(),
        creds.display().to_string(),
    ];
    let cp = ControlPlane::start(&ns, "127.0.0.1:7420", &args)?;
    let url = cp.url.clone();
    // Volumes need a host to be placed on (no agent: they stay `creating`).
    vpc_tests::cluster::register_host(&ns.path(), &url, "host-0").await?;
    // A stream of creates from 4 concurrent writers; record what was acknowledged.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let acked = std::sync::Arc::clone(&acked);
        let url = url.clone();
        let ns_path = ns.path();
        writers.push(std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
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
                        Err(_) => return Ok(()), // the server is gone
                    }
                }
                Ok(())
            })
        }));
    }
    let start = Instant::now();
    while acked.lock().map(|v| v.len()).unwrap_or(0) < 300
        && start.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    cp.crash()?;
    for w in writers {
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let acked = acked.lock().map(|v| v.clone()).unwrap_or_default();
    ensure!(
        acked.len() >= 300,
        "only {} creates acknowledged before the crash",
        acked.len()
    );
    let cp = ControlPlane::start(&ns, "127.0.0.1:7420", &args)?;
    let url = cp.url.clone();
    let ns_path = ns.path();
    let missing = std::thread::spawn(move || -> Result<Vec<String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut vols = VolumeServiceClient::new(channel(&ns_path, &url, TOKEN_A).await?);
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
                    Err(e) if e.code() == tonic::Code::NotFound => {
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
                    Err(e) => bail!("describe after restart: {e}"),
                }
            }
            Ok(missing)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    ensure!(
        missing.is_empty(),
        "acknowledged volumes lost in the crash: {missing:?}"
    );
    drop(cp);
    Ok(())
}
