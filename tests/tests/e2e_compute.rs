//! Instances and volumes through the API, end to end: the real control plane and agents on
//! two hosts in namespaces; the agents' compute runtime starts real instances (namespaces,
//! cgroups, processes), their metadata service answers them, their storage agent backs
//! volumes with loop devices.
//!
//! Checks: instances on two hosts reach each other as their security groups allow; each
//! reads its own metadata; user data runs once; stop/start keeps the address and restarts
//! the command; terminate frees the address and leaves nothing on the host; a failed launch
//! says why and leaves nothing; a volume written by one instance is readable after
//! re-attaching to another, and from a snapshot; an agent restart adopts running instances.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use vpc_proto::v1::{
    self as pb, instance_service_client::InstanceServiceClient,
    security_service_client::SecurityServiceClient, volume_service_client::VolumeServiceClient,
    vpc_service_client::VpcServiceClient,
};
use vpc_tests::cluster::{Authed, Cluster, create_network, eventually};

const WAIT: Duration = Duration::from_secs(30);

struct Tenant {
    channel: Authed,
    vpcs: VpcServiceClient<Authed>,
    sgs: SecurityServiceClient<Authed>,
    inst: InstanceServiceClient<Authed>,
    vols: VolumeServiceClient<Authed>,
}

impl Tenant {
    async fn new(c: &Cluster) -> Result<Tenant> {
        let ch = c.tenant_a().await?;
        Ok(Tenant {
            channel: ch.clone(),
            vpcs: VpcServiceClient::new(ch.clone()),
            sgs: SecurityServiceClient::new(ch.clone()),
            inst: InstanceServiceClient::new(ch.clone()),
            vols: VolumeServiceClient::new(ch),
        })
    }

    /// A VPC 10.0.0.0/16 with subnet 10.0.1.0/24: (vpc id, subnet id).
    async fn network(&mut self) -> Result<(String, String)> {
        let ch = self.channel.clone();
        create_network(ch, "10.0.0.0/16", "10.0.1.0/24").await
    }

    async fn run(&mut self, r: pb::RunInstancesRequest) -> Result<pb::Instance> {
        self.inst
            .run_instances(r)
            .await?
            .into_inner()
            .instances
            .pop()
            .context("no instance")
    }

    async fn instance(&mut self, id: &str) -> Result<pb::Instance> {
        self.inst
            .describe_instances(pb::DescribeInstancesRequest {
                instance_ids: vec![id.into()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .instances
            .pop()
            .context("no instance")
    }

    /// Waits for the instance to reach `state` (failing at once on an unexpected
    /// terminated); returns it.
    async fn wait(&mut self, id: &str, state: &str) -> Result<pb::Instance> {
        let what = format!("instance {id} to be {state}");
        eventually(WAIT, &what, || {
            let mut inst = self.inst.clone();
            let (id, state) = (id.to_owned(), state.to_owned());
            async move {
                let i = inst
                    .describe_instances(pb::DescribeInstancesRequest {
                        instance_ids: vec![id.clone()],
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .instances
                    .pop()
                    .context("no instance")?;
                ensure!(
                    i.state == state || i.state != "terminated",
                    "instance {id} terminated: {}",
                    i.state_reason
                );
                Ok((i.state == state).then_some(i))
            }
        })
        .await
    }

    async fn volume(&mut self, id: &str) -> Result<Option<pb::Volume>> {
        match self
            .vols
            .describe_volumes(pb::DescribeVolumesRequest {
                volume_ids: vec![id.into()],
                ..Default::default()
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().volumes.pop()),
            Err(e) if e.code() == tonic::Code::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until the volume's state (and attachment state) are as given.
    async fn wait_volume(&mut self, id: &str, state: &str, attachment: &str) -> Result<()> {
        let what = format!("volume {id} to be {state}/{attachment}");
        let start = Instant::now();
        loop {
            let v = self.volume(id).await?.context("volume gone")?;
            ensure!(v.state != "error", "volume {id} failed: {}", v.state_reason);
            if v.state == state && v.attachment_state == attachment {
                return Ok(());
            }
            ensure!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}: {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn attach(&mut self, vol: &str, inst: &str, dev: &str, path: &str) -> Result<()> {
        self.vols
            .attach_volume(pb::AttachVolumeRequest {
                volume_id: vol.into(),
                instance_id: inst.into(),
                device: dev.into(),
                mount_path: path.into(),
            })
            .await?;
        self.wait_volume(vol, "in-use", "attached").await
    }

    async fn detach(&mut self, vol: &str) -> Result<()> {
        self.vols
            .detach_volume(pb::DetachVolumeRequest {
                volume_id: vol.into(),
            })
            .await?;
        self.wait_volume(vol, "available", "").await
    }

    async fn available(&mut self, subnet: &str) -> Result<u32> {
        Ok(self
            .vpcs
            .describe_subnets(pb::DescribeSubnetsRequest {
                subnet_ids: vec![subnet.into()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .subnets
            .pop()
            .context("subnet")?
            .available_ip_address_count)
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `sh -c script` inside the instance must succeed; returns its stdout, trimmed.
fn exec_ok(c: &Cluster, host: usize, id: &str, script: &str) -> Result<String> {
    let out = c.exec(host, id, script)?;
    ensure!(
        out.status.success(),
        "`{script}` in {id} failed: {}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether anything of the instance is left on host `i`: its namespace, its cgroups, its
/// state directory.
fn leftovers(c: &Cluster, host: usize, id: &str) -> Vec<String> {
    let mut left = Vec::new();
    if c.instance_exists(id) {
        left.push(format!("netns {}", c.instance_netns(id)));
    }
    for ctl in ["memory", "cpu", "pids", "unified", ""] {
        let p = Path::new("/sys/fs/cgroup")
            .join(ctl)
            .join(c.cgroup_name(host))
            .join(id);
        if p.exists() {
            left.push(p.display().to_string());
        }
    }
    let state = c.data_dir(host).join("instances").join(id);
    if state.exists() {
        left.push(state.display().to_string());
    }
    left
}

/// Two hosts: a server and a client in different security groups; metadata; user data;
/// stop/start; terminate; a failed launch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_run_talk_read_metadata_stop_start_terminate() -> Result<()> {
    let c = Cluster::start(2)?;
    let mut t = Tenant::new(&c).await?;
    let (vpc, subnet) = t.network().await?;
    let sg = |name: &str| pb::CreateSecurityGroupRequest {
        vpc_id: vpc.clone(),
        group_name: name.into(),
        description: name.into(),
        ..Default::default()
    };
    let web = t
        .sgs
        .create_security_group(sg("web"))
        .await?
        .into_inner()
        .security_group
        .context("sg")?
        .group_id;
    let client_sg = t
        .sgs
        .create_security_group(sg("client"))
        .await?
        .into_inner()
        .security_group
        .context("sg")?
        .group_id;
    t.sgs
        .authorize_security_group_ingress(pb::AuthorizeSecurityGroupRequest {
            group_id: web.clone(),
            rules: vec![pb::SecurityGroupRule {
                ip_protocol: "tcp".into(),
                from_port: 8080,
                to_port: 8080,
                cidr_ipv4: "10.0.0.0/16".into(),
                ..Default::default()
            }],
        })
        .await?;

    // A server on host 0 (its command is the service), a client on host 1 with a user data
    // script.
    let launched = Instant::now();
    let server = t
        .run(pb::RunInstancesRequest {
            subnet_id: subnet.clone(),
            host_id: Cluster::host_id(0),
            security_group_ids: vec![web.clone()],
            command: "exec iperf3 -s -p 8080".into(),
            instance_type: "t3.nano".into(),
            ..Default::default()
        })
        .await?;
    let client = t
        .run(pb::RunInstancesRequest {
            subnet_id: subnet.clone(),
            host_id: Cluster::host_id(1),
            security_group_ids: vec![client_sg.clone()],
            user_data: b"#!/bin/sh\necho user-data ran >> /root/boot.log\n".to_vec(),
            ..Default::default()
        })
        .await?;
    let (s, cl) = (server.instance_id.clone(), client.instance_id.clone());
    t.wait(&s, "running").await?;
    t.wait(&cl, "running").await?;
    eprintln!(
        "two instances launched to running in {:?}",
        launched.elapsed()
    );
    let sip = server.private_ip_address.clone();

    // ExecInstance through the API: the command runs inside the instance, on its host.
    let ex = |command: &str, stdin: &[u8], timeout: u32| pb::ExecInstanceRequest {
        instance_id: cl.clone(),
        command: command.into(),
        timeout_seconds: timeout,
        stdin: stdin.to_vec(),
    };
    let r = t
        .inst
        .exec_instance(ex("hostname; cat; exit 3", b"from stdin", 10))
        .await?
        .into_inner();
    assert_eq!(
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).as_ref(),
            r.timed_out
        ),
        (
            3,
            format!("{}\nfrom stdin", client.private_dns_name).as_str(),
            false
        )
    );
    let r = t
        .inst
        .exec_instance(ex("echo oops >&2; sleep 30", b"", 1))
        .await?
        .into_inner();
    ensure!(r.timed_out && r.stderr == b"oops\n", "timeout: {r:?}");
    let other = pb::ExecInstanceRequest {
        instance_id: "i-0123456789abcdef0".into(),
        ..ex("true", b"", 5)
    };
    assert_eq!(
        t.inst.exec_instance(other).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    // The same with the CLI: `vpc instances exec` prints the output and exits with the
    // command's status.
    let out = c.cli(&["instances", "exec", &cl, "--", "hostname;", "exit", "7"])?;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        client.private_dns_name
    );

    // Its own namespaces: hostname, PID namespace, cgroup limits.
    assert_eq!(exec_ok(&c, 1, &cl, "hostname")?, client.private_dns_name);
    let pids = exec_ok(&c, 0, &s, "ls /proc | grep -c '^[0-9]'")?;
    ensure!(
        pids.parse::<u32>()? < 10,
        "a PID namespace of its own: {pids} processes"
    );
    let limit = std::fs::read_to_string(
        Path::new("/sys/fs/cgroup/memory")
            .join(c.cgroup_name(0))
            .join(&s)
            .join("memory.limit_in_bytes"),
    )
    .or_else(|_| {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(c.cgroup_name(0))
                .join(&s)
                .join("memory.max"),
        )
    })?;
    assert_eq!(limit.trim(), (512u64 << 20).to_string(), "t3.nano: 512 MiB");

    // Security groups: the client reaches the server's port 8080 (web allows it), not its
    // ICMP; the server cannot ping the client (no inbound rule).
    let iperf = format!("iperf3 -c {sip} -p 8080 -t 1 -J");
    let out = exec_ok(&c, 1, &cl, &iperf)?;
    ensure!(
        out.contains("\"sum_received\""),
        "iperf3 over the VPC: {out}"
    );
    let ping = |host: usize, id: &str, ip: &str| {
        c.exec(host, id, &format!("ping -n -q -c 1 -W 1 {ip}"))
            .map(|o| o.status.success())
    };
    ensure!(
        !ping(1, &cl, &sip)?,
        "ICMP to the server is not allowed by its group"
    );
    ensure!(
        !ping(0, &s, &client.private_ip_address)?,
        "nothing is allowed in by the client's group"
    );

    // The hosts report their datapath counters: the denied packets show as security-group
    // drops (what `vpc status` and `vpc drops` print).
    let hosts = vpc_proto::v1::host_service_client::HostServiceClient::new(c.tenant_a().await?);
    eventually(WAIT, "security-group drops in the hosts' counters", || {
        let mut hosts = hosts.clone();
        async move {
            let r = hosts
                .describe_hosts(pb::DescribeHostsRequest {})
                .await?
                .into_inner();
            let sg: u64 = r
                .hosts
                .iter()
                .flat_map(|h| &h.counters)
                .filter(|c| c.drop && c.name.starts_with("sg_"))
                .map(|c| c.packets)
                .sum();
            Ok((sg >= 2).then_some(()))
        }
    })
    .await?;
    let out = c.cli(&["drops", "--all", "-o", "json"])?;
    ensure!(out.status.success(), "vpc drops: {}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["drops"].as_array().is_some_and(|d| d
            .iter()
            .any(|x| x["reason"].as_str().is_some_and(|r| r.starts_with("sg_")))),
        "vpc drops: {v}"
    );
    // A connection held open shows as a tracked flow of this VPC in `vpc flows` (the
    // hosts report their conntrack tables at each GC, every 10 s).
    exec_ok(
        &c,
        1,
        &cl,
        &format!("setsid iperf3 -c {sip} -p 8080 -t 40 -b 1M >/dev/null 2>&1 &"),
    )?;
    eventually(
        Duration::from_secs(40),
        "the VPC's flows in `vpc flows`",
        || {
            let out = c.cli(&["flows", "-o", "json"]);
            let vpc = vpc.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&out?.stdout)?;
                let flows: u64 = v["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|h| {
                        h["conntrack"]["perVni"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .filter(|f| f["vpcId"] == vpc.as_str())
                    .map(|f| f["flows"].as_u64().unwrap_or(0))
                    .sum();
                Ok((flows >= 1).then_some(()))
            }
        },
    )
    .await?;
    let out = c.cli(&["status", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["hosts"]
            .as_array()
            .is_some_and(|h| h.len() == 2 && h.iter().all(|x| x["connected"] == true)),
        "vpc status: {v}"
    );

    // Metadata: each its own.
    let md = |host: usize, id: &str, path: &str| {
        exec_ok(
            &c,
            host,
            id,
            &format!("curl -sf --max-time 5 http://169.254.169.254/latest/{path}"),
        )
    };
    assert_eq!(md(0, &s, "meta-data/instance-id")?, s);
    assert_eq!(md(1, &cl, "meta-data/instance-id")?, cl);
    assert_eq!(
        md(1, &cl, "meta-data/local-ipv4")?,
        client.private_ip_address
    );
    assert_eq!(md(1, &cl, "meta-data/mac")?, client.mac_address);
    assert_eq!(md(1, &cl, "meta-data/security-groups")?, "client");
    assert_eq!(md(0, &s, "meta-data/instance-type")?, "t3.nano");
    assert_eq!(
        md(0, &s, "meta-data/placement/availability-zone")?,
        Cluster::host_id(0)
    );
    ensure!(md(1, &cl, "user-data")?.contains("user-data ran"));
    // IMDSv2.
    let v2 = exec_ok(
        &c,
        1,
        &cl,
        "T=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token) && \
         curl -sf -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/meta-data/local-hostname",
    )?;
    assert_eq!(v2, client.private_dns_name);

    // User data ran once, in the instance's own root filesystem; the host's secrets are not
    // visible in it (its /root holds only what it wrote, /etc/shadow is gone).
    assert_eq!(exec_ok(&c, 1, &cl, "cat /root/boot.log")?, "user-data ran");
    assert_eq!(exec_ok(&c, 1, &cl, "ls -A /root")?, "boot.log");
    assert_eq!(
        exec_ok(
            &c,
            1,
            &cl,
            "test -e /etc/shadow && echo visible || echo hidden"
        )?,
        "hidden"
    );
    ensure!(
        !Path::new("/root/boot.log").exists()
            || std::fs::read_to_string("/root/boot.log")?.trim() != "user-data ran",
        "the instance's root filesystem is its own"
    );

    // Stop and start the server: same address, the command runs again.
    let free = t.available(&subnet).await?;
    t.inst
        .stop_instances(pb::StopInstancesRequest {
            instance_ids: vec![s.clone()],
        })
        .await?;
    let stopped = t.wait(&s, "stopped").await?;
    assert_eq!(stopped.private_ip_address, sip);
    ensure!(
        leftovers(&c, 0, &s).iter().all(|l| !l.starts_with("netns")),
        "a stopped instance has no network"
    );
    ensure!(c.runtime(0)?.ns_pid(&s).is_none(), "no processes");
    assert_eq!(t.available(&subnet).await?, free, "the address stays held");
    t.inst
        .start_instances(pb::StartInstancesRequest {
            instance_ids: vec![s.clone()],
        })
        .await?;
    let started = t.wait(&s, "running").await?;
    assert_eq!(started.private_ip_address, sip);
    let out = eventually(WAIT, "the server's command to listen again", || {
        let r = c.exec(1, &cl, &iperf);
        async move { Ok(r?.status.success().then_some(())) }
    })
    .await;
    out?;
    // The client's user data does not run again when it restarts.
    t.inst
        .stop_instances(pb::StopInstancesRequest {
            instance_ids: vec![cl.clone()],
        })
        .await?;
    t.wait(&cl, "stopped").await?;
    t.inst
        .start_instances(pb::StartInstancesRequest {
            instance_ids: vec![cl.clone()],
        })
        .await?;
    t.wait(&cl, "running").await?;
    assert_eq!(exec_ok(&c, 1, &cl, "cat /root/boot.log")?, "user-data ran");
    let console = t
        .inst
        .get_console_output(pb::GetConsoleOutputRequest {
            instance_id: s.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        String::from_utf8_lossy(&console.output).contains("Server listening"),
        "console output: {:?}",
        String::from_utf8_lossy(&console.output)
    );

    // Terminate the client: the address is free, nothing is left on its host.
    let free = t.available(&subnet).await?;
    t.inst
        .terminate_instances(pb::TerminateInstancesRequest {
            instance_ids: vec![cl.clone()],
        })
        .await?;
    assert_eq!(t.available(&subnet).await?, free + 1);
    t.wait(&cl, "terminated").await?;
    let left = leftovers(&c, 1, &cl);
    ensure!(left.is_empty(), "terminate left {left:?}");

    // A failed launch: terminated with the reason; nothing left behind.
    let bad = t
        .run(pb::RunInstancesRequest {
            subnet_id: subnet.clone(),
            host_id: Cluster::host_id(1),
            command: "/nonexistent/program".into(),
            ..Default::default()
        })
        .await?;
    let got = eventually(WAIT, "the failed launch to be reported", || {
        let mut t2 = t.inst.clone();
        let id = bad.instance_id.clone();
        async move {
            let i = t2
                .describe_instances(pb::DescribeInstancesRequest {
                    instance_ids: vec![id],
                    ..Default::default()
                })
                .await?
                .into_inner()
                .instances
                .pop()
                .context("instance")?;
            Ok((i.state == "terminated").then_some(i))
        }
    })
    .await?;
    ensure!(
        got.state_reason.contains("Server.LaunchFailed") && got.state_reason.contains("not found"),
        "reason: {}",
        got.state_reason
    );
    let left = leftovers(&c, 1, &bad.instance_id);
    ensure!(left.is_empty(), "a failed launch left {left:?}");
    Ok(())
}

/// Volumes: written by one instance, read by another after re-attaching, and from a
/// snapshot; data survives an agent restart, which adopts the running instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_move_between_instances_and_survive_agent_restarts() -> Result<()> {
    let mut c = Cluster::start(1)?;
    let mut t = Tenant::new(&c).await?;
    let (_, subnet) = t.network().await?;
    let req = pb::RunInstancesRequest {
        subnet_id: subnet.clone(),
        ..Default::default()
    };
    let a = t.run(req.clone()).await?.instance_id;
    let b = t.run(req).await?.instance_id;
    t.wait(&a, "running").await?;
    t.wait(&b, "running").await?;
    let vol = t
        .vols
        .create_volume(pb::CreateVolumeRequest {
            size_gib: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("volume")?
        .volume_id;
    t.wait_volume(&vol, "available", "").await?;

    // A writes through a mounted filesystem.
    t.attach(&vol, &a, "xvdf", "/data").await?;
    exec_ok(
        &c,
        0,
        &a,
        "test -b /dev/xvdf && echo hello > /data/f && sync",
    )?;
    ensure!(
        !Path::new("/data/f").exists(),
        "mounted inside the instance only"
    );
    t.detach(&vol).await?;
    ensure!(
        exec_ok(&c, 0, &a, "test -e /data/f && echo present || echo gone")? == "gone",
        "unmounted from A"
    );

    // B reads it, at another path.
    t.attach(&vol, &b, "xvdg", "/mnt/v").await?;
    assert_eq!(exec_ok(&c, 0, &b, "cat /mnt/v/f")?, "hello");

    // The agent restarts: instances keep running (same processes), the volume stays.
    let pid_before = c.runtime(0)?.ns_pid(&b).context("b runs")?;
    let agent = c.take_agent(0).context("agent")?;
    agent.crash()?;
    exec_ok(&c, 0, &b, "echo again >> /mnt/v/f && sync")?;
    c.start_agent(0)?;
    let inst = t.instance(&b).await?;
    assert_eq!(inst.state, "running");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.runtime(0)?.ns_pid(&b),
        Some(pid_before),
        "adopted, not restarted"
    );
    assert_eq!(exec_ok(&c, 0, &b, "cat /mnt/v/f")?, "hello\nagain");

    // A snapshot, and a volume made from it, read by A.
    let snap = t
        .vols
        .create_snapshot(pb::CreateSnapshotRequest {
            volume_id: vol.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .context("snapshot")?
        .snapshot_id;
    eventually(WAIT, "the snapshot to complete", || {
        let mut v = t.vols.clone();
        let id = snap.clone();
        async move {
            let s = v
                .describe_snapshots(pb::DescribeSnapshotsRequest {
                    snapshot_ids: vec![id],
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshots
                .pop()
                .context("snapshot")?;
            ensure!(s.state != "error", "snapshot failed: {}", s.state_reason);
            Ok((s.state == "completed").then_some(()))
        }
    })
    .await?;
    let copy = t
        .vols
        .create_volume(pb::CreateVolumeRequest {
            snapshot_id: snap.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("volume")?
        .volume_id;
    t.wait_volume(&copy, "available", "").await?;
    t.attach(&copy, &a, "xvdh", "/restore").await?;
    assert_eq!(exec_ok(&c, 0, &a, "cat /restore/f")?, "hello\nagain");

    // Terminating B detaches its volume (kept); deleting volumes removes their files.
    t.inst
        .terminate_instances(pb::TerminateInstancesRequest {
            instance_ids: vec![b.clone()],
        })
        .await?;
    t.wait(&b, "terminated").await?;
    t.wait_volume(&vol, "available", "").await?;
    t.detach(&copy).await?;
    for v in [&vol, &copy] {
        t.vols
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: v.clone(),
            })
            .await?;
    }
    eventually(WAIT, "the volumes to be deleted", || {
        let mut v = t.vols.clone();
        let ids = [vol.clone(), copy.clone()];
        async move {
            let list = v
                .describe_volumes(pb::DescribeVolumesRequest::default())
                .await?
                .into_inner()
                .volumes;
            Ok(list
                .iter()
                .all(|x| !ids.contains(&x.volume_id))
                .then_some(()))
        }
    })
    .await?;
    let files: Vec<_> = std::fs::read_dir(c.data_dir(0).join("volumes"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(files.is_empty(), "volume files left: {files:?}");
    Ok(())
}
