//! `cargo xtask bench compute`: how fast instances launch and how many one host holds.
//!
//! 1. **Launch latency**: `--launches` instances (default 100) launched one after another on
//!    one host through the API; each sample is RunInstances sent -> DescribeInstances shows
//!    `running` (polled every 5 ms): the control plane's write, the desired state pushed to
//!    the agent, its namespaces, veth, datapath port, cgroups, processes, metadata service,
//!    and its report back. Then terminate -> `terminated` the same way.
//! 2. **Density**: instances launched in batches (`--batch`, default 50) on one host until
//!    something breaks or a bound is reached (`--density-max` instances, default 3000;
//!    `--density-minutes`, default 15). What broke is the first of: a launch that failed
//!    (its reason), a batch not running within 120 s, the host's available memory under 5%.
//!    Per batch: instances running, the batch's launch time, host memory available, and
//!    the memory per instance. The account quota and the subnet are raised (100 000, a
//!    /16) so that neither is what stops it.
//!
//! Results are printed and written as JSON to `target/bench/compute.json`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vpc_proto::v1::{self as pb, instance_service_client::InstanceServiceClient};

use crate::api_bench::{Stats, header, out_dir};
use crate::cluster::{Authed, Cluster};

/// Options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Sequential launches measured.
    pub launches: usize,
    /// Instances per density batch.
    pub batch: u32,
    /// Density bound, instances.
    pub density_max: usize,
    /// Density bound, minutes.
    pub density_minutes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            launches: 100,
            batch: 50,
            density_max: 3000,
            density_minutes: 15,
        }
    }
}

/// Runs both parts and writes the report.
pub fn run(opts: &Options) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let latency = rt
        .block_on(launch_latency(opts))
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let density = rt
        .block_on(density(opts))
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let report = json!({
        "benchmark": "compute",
        "options": {"launches": opts.launches, "batch": opts.batch,
                    "density_max": opts.density_max, "density_minutes": opts.density_minutes},
        "launch_latency": latency,
        "density": density,
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    let path = out_dir()?.join("compute.json");
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("\nresults written to {}", path.display());
    for part in ["launch_latency", "density"] {
        if let Some(e) = report[part].get("error") {
            bail!("{part} failed: {e}");
        }
    }
    Ok(())
}

/// A VPC 10.0.0.0/16 with a subnet of `cidr`.
async fn network(ch: Authed, cidr: &str) -> Result<String> {
    Ok(crate::cluster::create_network(ch, "10.0.0.0/16", cidr)
        .await?
        .1)
}

/// Polls until every instance of `ids` is `state` (or one is terminated unexpectedly, or
/// `timeout`). Returns the failure reason of a failed instance, if any.
async fn wait_all(
    inst: &mut InstanceServiceClient<Authed>,
    ids: &[String],
    state: &str,
    poll: Duration,
    timeout: Duration,
) -> Result<std::result::Result<(), String>> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for chunk in ids.chunks(1000) {
            let got = inst
                .describe_instances(pb::DescribeInstancesRequest {
                    instance_ids: chunk.to_vec(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .instances;
            for i in &got {
                if i.state == "terminated" && state != "terminated" {
                    return Ok(Err(format!("{}: {}", i.instance_id, i.state_reason)));
                }
                all &= i.state == state;
            }
        }
        if all {
            return Ok(Ok(()));
        }
        if start.elapsed() > timeout {
            return Ok(Err(format!(
                "not all {state} within {} s",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

async fn launch_latency(opts: &Options) -> Result<Value> {
    let c = Cluster::start(1)?;
    let subnet = network(c.tenant_a().await?, "10.0.16.0/20").await?;
    let mut inst = InstanceServiceClient::new(c.tenant_a().await?);
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut ids = Vec::new();
    println!(
        "\nlaunch latency: {} instances, one at a time, one host",
        opts.launches
    );
    for _ in 0..opts.launches {
        let t = Instant::now();
        let i = inst
            .run_instances(pb::RunInstancesRequest {
                subnet_id: subnet.clone(),
                instance_type: "t3.nano".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .instances
            .pop()
            .context("instance")?;
        let ids1 = [i.instance_id.clone()];
        if let Err(e) = wait_all(
            &mut inst,
            &ids1,
            "running",
            Duration::from_millis(5),
            Duration::from_secs(30),
        )
        .await?
        {
            bail!("launch failed: {e}");
        }
        up.push(t.elapsed());
        ids.push(i.instance_id);
    }
    for id in &ids {
        let t = Instant::now();
        inst.terminate_instances(pb::TerminateInstancesRequest {
            instance_ids: vec![id.clone()],
        })
        .await?;
        if let Err(e) = wait_all(
            &mut inst,
            std::slice::from_ref(id),
            "terminated",
            Duration::from_millis(5),
            Duration::from_secs(30),
        )
        .await?
        {
            bail!("terminate failed: {e}");
        }
        down.push(t.elapsed());
    }
    let (su, sd) = (Stats::of(&up), Stats::of(&down));
    header();
    su.row("RunInstances -> running");
    sd.row("TerminateInstances -> terminated");
    Ok(json!({"launch_to_running": su.json(), "terminate_to_terminated": sd.json()}))
}

/// MemAvailable / MemTotal from /proc/meminfo.
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("MemAvailable:"), field("MemTotal:"))
}

async fn density(opts: &Options) -> Result<Value> {
    // The account's instance quota (1000, EC2's default here) and the subnet's size must not
    // be what stops it: a /16 subnet and a quota of 100 000.
    let dir = crate::cluster::TempDir::new("cpd")?;
    let quotas = dir.path().join("quotas.json");
    std::fs::write(&quotas, r#"{"instances_per_account": 100000}"#)?;
    let store = dir.path().join("store.redb");
    let c = Cluster::start_with(
        1,
        dir,
        vec![
            "--store".into(),
            format!("redb:{}", store.display()),
            "--quotas".into(),
            quotas.display().to_string(),
        ],
    )?;
    let subnet = network(c.tenant_a().await?, "10.0.0.0/16").await?;
    let mut inst = InstanceServiceClient::new(c.tenant_a().await?);
    let started = Instant::now();
    let mut ids: Vec<String> = Vec::new();
    let mut batches = Vec::new();
    let (_, total_kib) = memory();
    println!(
        "\ndensity: batches of {} on one host (bounds: {} instances, {} min)",
        opts.batch, opts.density_max, opts.density_minutes
    );
    println!(
        "{:>9} {:>10} {:>14} {:>14}",
        "instances", "batch s", "mem avail MiB", "per inst KiB"
    );
    let (avail0, _) = memory();
    let broke = loop {
        if ids.len() >= opts.density_max {
            break format!(
                "nothing: reached the bound of {} instances",
                opts.density_max
            );
        }
        if started.elapsed() > Duration::from_secs(opts.density_minutes * 60) {
            break format!(
                "nothing: reached the bound of {} minutes",
                opts.density_minutes
            );
        }
        let t = Instant::now();
        let got = match inst
            .run_instances(pb::RunInstancesRequest {
                subnet_id: subnet.clone(),
                instance_type: "t3.nano".into(),
                count: opts.batch,
                ..Default::default()
            })
            .await
        {
            Ok(r) => r.into_inner().instances,
            Err(e) => break format!("RunInstances refused: {} {}", e.code(), e.message()),
        };
        let new: Vec<String> = got.into_iter().map(|i| i.instance_id).collect();
        let r = wait_all(
            &mut inst,
            &new,
            "running",
            Duration::from_millis(50),
            Duration::from_secs(120),
        )
        .await?;
        ids.extend(new);
        let secs = t.elapsed().as_secs_f64();
        let (avail, _) = memory();
        let per = avail0.saturating_sub(avail) / ids.len().max(1) as u64;
        println!(
            "{:>9} {:>10.2} {:>14} {:>14}",
            ids.len(),
            secs,
            avail / 1024,
            per
        );
        batches.push(json!({"instances": ids.len(), "batch_seconds": secs,
                            "mem_available_kib": avail, "kib_per_instance": per}));
        if let Err(e) = r {
            break format!("a launch failed at {} instances: {e}", ids.len());
        }
        if avail * 20 < total_kib {
            break format!("host memory: under 5% available at {} instances", ids.len());
        }
    };
    println!(
        "density: {} instances running; what broke: {broke}",
        ids.len()
    );
    Ok(json!({"instances": ids.len(), "broke": broke, "batches": batches}))
}
