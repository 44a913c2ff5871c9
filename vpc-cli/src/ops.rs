//! `vpc status` and `vpc drops`: the appliance at a glance, through the control plane.
//!
//! `status`: is the control plane reachable (and how fast), its store revision, and per host:
//! connected, the revision applied and how far behind it is, instances, packets and drops
//! (totals since the host's maps were made) and the drop rate of the last report interval.
//! `drops`: per host, hook and reason, the drops of the last interval (per second) and the
//! totals: what is being dropped now, and why. The hosts' agents report their datapath
//! counters to the control plane every few seconds.

use std::time::Instant;

use serde_json::json;
use vpc_proto::v1::{self as pb, host_service_client::HostServiceClient};

use crate::api::{Api, CliError, Table, ToJson};
use crate::output::write_stdout;

/// `vpc drops` options.
#[derive(clap::Args, Debug)]
pub struct DropsArgs {
    /// Only this host.
    #[arg(long)]
    host: Option<String>,
    /// Also reasons with no drop in the last interval (totals only).
    #[arg(long)]
    all: bool,
}

fn sum(counters: &[pb::DatapathCounter], drop: bool) -> u64 {
    counters
        .iter()
        .filter(|c| c.drop == drop)
        .map(|c| c.packets)
        .sum()
}

fn rate(h: &pb::Host) -> f64 {
    if h.recent_seconds > 0.0 {
        sum(&h.recent_drops, true) as f64 / h.recent_seconds
    } else {
        0.0
    }
}

/// `vpc status`.
pub async fn status(api: &Api) -> Result<(), CliError> {
    let mut c = HostServiceClient::new(api.channel.clone());
    let t = Instant::now();
    let r = c
        .describe_hosts(pb::DescribeHostsRequest {})
        .await?
        .into_inner();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    api.emit(
        || {
            json!({
                "controlPlane": {"endpoint": api.endpoint, "reachable": true,
                                 "latencyMs": ms, "revision": r.revision},
                "hosts": r.hosts.iter().map(|h| json!({
                    "hostId": h.host_id,
                    "connected": h.connected,
                    "appliedRevision": h.applied_revision,
                    "lag": r.revision - h.applied_revision,
                    "instances": h.instance_count,
                    "packets": sum(&h.counters, false),
                    "drops": sum(&h.counters, true),
                    "dropsPerSecond": rate(h),
                    "lastError": h.last_error,
                })).collect::<Vec<_>>(),
            })
        },
        |wide| {
            write_stdout(
                format!(
                    "control plane {}: reachable ({ms:.1} ms), store revision {}\n",
                    api.endpoint, r.revision
                )
                .as_bytes(),
            );
            if r.hosts.is_empty() {
                write_stdout(b"no host is registered\n");
                return;
            }
            let mut t = Table::new(&[
                "HOST ID",
                "CONNECTED",
                "APPLIED",
                "LAG",
                "INSTANCES",
                "PACKETS",
                "DROPS",
                "DROPS/S",
                "LAST ERROR",
            ])
            .wide(&["UNDERLAY IP"]);
            for h in &r.hosts {
                t.row(vec![
                    h.host_id.clone(),
                    h.connected.to_string(),
                    h.applied_revision.to_string(),
                    (r.revision - h.applied_revision).to_string(),
                    h.instance_count.to_string(),
                    sum(&h.counters, false).to_string(),
                    sum(&h.counters, true).to_string(),
                    format!("{:.1}", rate(h)),
                    h.last_error.clone(),
                    h.underlay_ip.clone(),
                ]);
            }
            t.print_as(wide);
        },
    );
    Ok(())
}

/// `vpc drops`.
pub async fn drops(api: &Api, a: DropsArgs) -> Result<(), CliError> {
    let mut c = HostServiceClient::new(api.channel.clone());
    let r = c
        .describe_hosts(pb::DescribeHostsRequest {})
        .await?
        .into_inner();
    let hosts: Vec<&pb::Host> = r
        .hosts
        .iter()
        .filter(|h| a.host.as_ref().is_none_or(|x| *x == h.host_id))
        .collect();
    if let Some(want) = &a.host
        && hosts.is_empty()
    {
        return Err(CliError::Usage(format!("no host {want:?} is registered")));
    }
    // (host, hook, reason, per second, total)
    let mut rows = Vec::new();
    for h in &hosts {
        for total in h.counters.iter().filter(|c| c.drop) {
            let recent = h
                .recent_drops
                .iter()
                .find(|x| x.hook == total.hook && x.name == total.name)
                .map_or(0, |x| x.packets);
            if recent == 0 && !a.all {
                continue;
            }
            let per_s = if h.recent_seconds > 0.0 {
                recent as f64 / h.recent_seconds
            } else {
                0.0
            };
            rows.push((
                h.host_id.clone(),
                total.hook.clone(),
                total.name.clone(),
                per_s,
                total.packets,
            ));
        }
    }
    rows.sort_by(|x, y| y.3.total_cmp(&x.3).then(y.4.cmp(&x.4)));
    api.emit(
        || {
            json!({
                "drops": rows.iter().map(|(h, hook, reason, per_s, total)| json!({
                    "hostId": h, "hook": hook, "reason": reason,
                    "perSecond": per_s, "total": total,
                })).collect::<Vec<_>>(),
                "hosts": hosts.iter().map(|h| h.to_json()).collect::<Vec<_>>(),
            })
        },
        |wide| {
            if rows.is_empty() {
                let hint = if a.all {
                    ""
                } else {
                    " (--all shows the totals)"
                };
                write_stdout(
                    format!(
                        "no drops in the last interval{hint}
"
                    )
                    .as_bytes(),
                );
                return;
            }
            let mut t = Table::new(&["HOST ID", "HOOK", "REASON", "PER SECOND", "TOTAL"]);
            for (h, hook, reason, per_s, total) in &rows {
                t.row(vec![
                    h.clone(),
                    hook.clone(),
                    reason.clone(),
                    format!("{per_s:.1}"),
                    total.to_string(),
                ]);
            }
            t.print_as(wide);
        },
    );
    Ok(())
}

/// `vpc flows`.
pub async fn flows(api: &Api) -> Result<(), CliError> {
    let mut c = HostServiceClient::new(api.channel.clone());
    let r = c
        .describe_hosts(pb::DescribeHostsRequest {})
        .await?
        .into_inner();
    api.emit(
        || {
            json!({
                "hosts": r.hosts.iter().map(|h| json!({
                    "hostId": h.host_id,
                    "conntrack": h.conntrack.as_ref().map(ToJson::to_json),
                })).collect::<Vec<_>>(),
            })
        },
        |wide| {
            let mut t = Table::new(&["HOST ID", "VPC", "VNI", "FLOWS", "TABLE", "PRESSURE"]);
            for h in &r.hosts {
                let Some(ct) = &h.conntrack else {
                    t.row(vec![
                        h.host_id.clone(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "(not reported yet)".into(),
                        "-".into(),
                    ]);
                    continue;
                };
                let table = format!("{}/{}", ct.entries, ct.capacity);
                let pressure = if ct.capacity > 0 {
                    format!("{:.2}%", ct.entries as f64 * 100.0 / ct.capacity as f64)
                } else {
                    "-".into()
                };
                if ct.per_vni.is_empty() {
                    t.row(vec![
                        h.host_id.clone(),
                        "-".into(),
                        "-".into(),
                        "0".into(),
                        table,
                        pressure,
                    ]);
                    continue;
                }
                for f in &ct.per_vni {
                    t.row(vec![
                        h.host_id.clone(),
                        if f.vpc_id.is_empty() {
                            "-".into()
                        } else {
                            f.vpc_id.clone()
                        },
                        f.vni.to_string(),
                        f.flows.to_string(),
                        table.clone(),
                        pressure.clone(),
                    ]);
                }
            }
            t.print_as(wide);
        },
    );
    Ok(())
}
