//! `vpc trace` (why does this packet arrive, or why is it dropped?) and `vpc conntrack top`
//! (who fills a VPC's conntrack budget?), through the control plane.
//!
//! `trace` asks the control plane to run the live datapath programs of the hosts on the path
//! on one synthetic packet, without changing connection state, and prints each stage's
//! decision, one line per stage: host, stage, result, what decided. Exit status: 0 when the
//! packet is delivered, 3 when it is dropped (the drop reason is printed), 4 for any other
//! outcome (e.g. passed to a host's own stack); API errors as for every API command.

use std::io::Write as _;

use serde_json::json;
use vpc_proto::v1::{
    self as pb, host_service_client::HostServiceClient, trace_service_client::TraceServiceClient,
};

use crate::api::{Api, CliError, Table, ToJson};

/// Exit status of a trace whose packet was dropped.
pub const EXIT_DROPPED: i32 = 3;
/// Exit status of a trace that neither delivered nor dropped the packet.
pub const EXIT_OTHER: i32 = 4;

/// `vpc trace` options.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: 0 delivered, 3 dropped, 4 other outcomes (passed to \
a host's stack, answered by the datapath); 1 and 2 as for every API command."
)]
pub struct TraceArgs {
    /// The source instance (i-...).
    #[arg(long)]
    from: String,
    /// The destination: an instance (i-...), a load balancer (lb-...) or an IPv4 address
    /// (e.g. a VIP).
    #[arg(long)]
    to: String,
    /// tcp (a SYN), udp or icmp (an echo request).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "icmp"])]
    proto: String,
    /// Destination port (tcp, udp).
    #[arg(long)]
    port: Option<u16>,
    /// Source port (default: an ephemeral port).
    #[arg(long)]
    source_port: Option<u16>,
}

/// The exit status of a trace's verdict.
pub fn exit_status(verdict: &str) -> i32 {
    match verdict {
        "delivered" => 0,
        "dropped" => EXIT_DROPPED,
        _ => EXIT_OTHER,
    }
}

/// The table of a trace: one row per stage.
pub fn stage_table(r: &pb::TracePacketResponse) -> Table {
    let mut t = Table::new(&["HOST", "STAGE", "RESULT", "DETAIL"]);
    for s in &r.stages {
        t.row(vec![
            s.host_id.clone(),
            s.stage.clone(),
            s.result.clone(),
            s.detail.clone(),
        ]);
    }
    t
}

/// The last line of a trace's text output.
pub fn summary_line(r: &pb::TracePacketResponse) -> String {
    match r.verdict.as_str() {
        "delivered" if !r.delivered_to.is_empty() => {
            format!("{}: delivered to {}", r.packet, r.delivered_to)
        }
        "dropped" => format!(
            "{}: dropped on {} ({})",
            r.packet, r.drop_host_id, r.drop_reason
        ),
        v => format!("{}: {v}", r.packet),
    }
}

pub async fn trace(api: &Api, a: TraceArgs) -> Result<(), CliError> {
    if a.proto != "icmp" && a.port.is_none() {
        return Err(CliError::Usage(format!(
            "--port is required for {}",
            a.proto
        )));
    }
    let mut c = TraceServiceClient::new(api.channel.clone());
    let r = c
        .trace_packet(pb::TracePacketRequest {
            from_instance_id: a.from,
            to: a.to,
            protocol: a.proto,
            port: u32::from(a.port.unwrap_or(0)),
            source_port: u32::from(a.source_port.unwrap_or(0)),
        })
        .await?
        .into_inner();
    api.emit(
        || r.to_json(),
        |wide| {
            stage_table(&r).print_as(wide);
            println!("{}", summary_line(&r));
        },
    );
    let code = exit_status(&r.verdict);
    if code != 0 {
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }
    Ok(())
}

/// `vpc conntrack top` options.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Only this VPC.
    #[arg(long)]
    vpc: Option<String>,
    /// Only this host.
    #[arg(long)]
    host: Option<String>,
}

/// `vpc conntrack ...`
#[derive(clap::Subcommand, Debug)]
pub enum ConntrackCommand {
    /// Per host and VPC (yours): tracked flows against the VPC's budget, new flows refused
    /// for it, and the sources and flows filling it.
    Top(TopArgs),
}

/// Rows of `conntrack top` (pure): (host, VPC flows) filtered.
fn rows<'a>(
    hosts: &'a [pb::Host],
    a: &'a TopArgs,
) -> impl Iterator<Item = (&'a str, &'a pb::VniFlows)> + 'a {
    hosts
        .iter()
        .filter(move |h| a.host.as_ref().is_none_or(|x| *x == h.host_id))
        .flat_map(|h| {
            h.conntrack
                .iter()
                .flat_map(|ct| ct.per_vni.iter())
                .map(move |f| (h.host_id.as_str(), f))
        })
        // Yours only: the control plane names your VPCs and filters the rest.
        .filter(|(_, f)| !f.vpc_id.is_empty())
        .filter(move |(_, f)| a.vpc.as_ref().is_none_or(|v| *v == f.vpc_id))
}

/// The text of `conntrack top` (pure).
pub fn top_text(hosts: &[pb::Host], a: &TopArgs) -> String {
    let mut out = String::new();
    let mut t = Table::new(&["HOST", "VPC", "FLOWS", "BUDGET", "USED", "REFUSED"]);
    let mut details = Vec::new();
    for (host, f) in rows(hosts, a) {
        let (budget, used) = if f.budget_limit == 0 {
            ("none".to_owned(), "-".to_owned())
        } else {
            (
                f.budget_limit.to_string(),
                format!(
                    "{:.0}%",
                    f.budget_count as f64 * 100.0 / f.budget_limit as f64
                ),
            )
        };
        t.row(vec![
            host.into(),
            f.vpc_id.clone(),
            f.flows.to_string(),
            budget,
            used,
            f.budget_drops.to_string(),
        ]);
        let mut d = format!("{} on {host}:\n", f.vpc_id);
        d.push_str("  top sources:");
        if f.top_sources.is_empty() {
            d.push_str(" -");
        }
        for s in &f.top_sources {
            d.push_str(&format!(" {} ({} flows)", s.address, s.flows));
        }
        d.push('\n');
        for fl in &f.top_flows {
            d.push_str(&format!(
                "  {} {}:{} -> {}:{}  {} packets {} bytes\n",
                fl.protocol, fl.src, fl.src_port, fl.dst, fl.dst_port, fl.packets, fl.bytes
            ));
        }
        details.push(d);
    }
    out.push_str(&t.render_as(false));
    for d in details {
        out.push('\n');
        out.push_str(&d);
    }
    out
}

pub async fn conntrack(api: &Api, cmd: ConntrackCommand) -> Result<(), CliError> {
    let ConntrackCommand::Top(a) = cmd;
    let mut c = HostServiceClient::new(api.channel.clone());
    let r = c
        .describe_hosts(pb::DescribeHostsRequest {})
        .await?
        .into_inner();
    api.emit(
        || {
            json!({
                "vpcs": rows(&r.hosts, &a).map(|(host, f)| {
                    let mut v = f.to_json();
                    v["hostId"] = json!(host);
                    v
                }).collect::<Vec<_>>(),
            })
        },
        |_| print!("{}", top_text(&r.hosts, &a)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(host: &str, stage: &str, result: &str, detail: &str) -> pb::TraceStageResult {
        pb::TraceStageResult {
            host_id: host.into(),
            stage: stage.into(),
            result: result.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn traces_print_one_line_per_stage_and_exit_by_verdict() {
        let r = pb::TracePacketResponse {
            stages: vec![
                stage(
                    "h1",
                    "acl_egress",
                    "allow",
                    "acl-1: rule 100 allow all to 0.0.0.0/0",
                ),
                stage("h2", "sg_ingress", "deny", "no rule of sg-web allows it"),
            ],
            verdict: "dropped".into(),
            drop_reason: "sg_ingress".into(),
            drop_host_id: "h2".into(),
            packet: "tcp 10.0.1.4:40000 -> 10.0.2.5:22".into(),
            ..Default::default()
        };
        let text = stage_table(&r).render_as(false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[2].contains("sg_ingress") && lines[2].contains("deny"));
        assert_eq!(
            summary_line(&r),
            "tcp 10.0.1.4:40000 -> 10.0.2.5:22: dropped on h2 (sg_ingress)"
        );
        assert_eq!(exit_status("dropped"), 3);
        assert_eq!(exit_status("delivered"), 0);
        assert_eq!(exit_status("passed"), 4);
        assert_eq!(r.to_json()["dropReason"], "sg_ingress");
    }

    #[test]
    fn top_shows_usage_against_the_budget_and_the_fillers_of_your_vpcs() {
        let hosts = vec![pb::Host {
            host_id: "h1".into(),
            conntrack: Some(pb::ConntrackSummary {
                entries: 130,
                capacity: 1000,
                per_vni: vec![
                    pb::VniFlows {
                        vni: 7,
                        flows: 100,
                        vpc_id: "vpc-a".into(),
                        budget_limit: 100,
                        budget_count: 100,
                        budget_drops: 42,
                        top_sources: vec![pb::CtTopSource {
                            address: "10.0.1.9".into(),
                            flows: 99,
                        }],
                        top_flows: vec![pb::CtTopFlow {
                            protocol: "udp".into(),
                            src: "10.0.1.9".into(),
                            src_port: 1000,
                            dst: "10.0.1.5".into(),
                            dst_port: 53,
                            packets: 1,
                            bytes: 60,
                        }],
                    },
                    pb::VniFlows {
                        vni: 8,
                        flows: 30,
                        vpc_id: "vpc-b".into(),
                        ..Default::default()
                    },
                    // Another tenant's VPC (not named by the control plane).
                    pb::VniFlows {
                        vni: 9,
                        flows: 1,
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        }];
        let all = TopArgs {
            vpc: None,
            host: None,
        };
        let text = top_text(&hosts, &all);
        assert!(text.contains("vpc-a") && text.contains("100%") && text.contains("42"));
        assert!(text.contains("10.0.1.9 (99 flows)"), "{text}");
        assert!(text.contains("udp 10.0.1.9:1000 -> 10.0.1.5:53"), "{text}");
        assert!(text.contains("vpc-b") && text.contains("none"));
        assert!(!text.contains(" 9 "), "{text}");
        let only_b = TopArgs {
            vpc: Some("vpc-b".into()),
            host: None,
        };
        assert_eq!(rows(&hosts, &only_b).count(), 1);
    }
}
