//! `vpc flow-logs create|list|describe|delete` (the `FlowLogService`) and `vpc flows
//! --follow`: the records of the caller's flow logs as the hosts publish them, as JSON
//! lines (one record per line, AWS field names) or, on a terminal, a table row per record,
//! until interrupted.

use std::io::Write as _;

use clap::Subcommand;
use controlplane::flowlogs::FlowRecord;
use serde_json::json;
use vpc_proto::v1::{self as pb, flow_log_service_client::FlowLogServiceClient};

use crate::api::{
    Api, CliError, Output, PageArgs, Table, ToJson, paged, parse_tag, revision, show_done,
    show_list, tags_text,
};

#[derive(Subcommand, Debug)]
pub enum FlowLogsCommand {
    /// Log the flows of VPCs or subnets (one flow log per resource).
    Create {
        /// VPCs to log (repeatable).
        #[arg(
            long = "vpc",
            conflicts_with = "subnets",
            required_unless_present = "subnets"
        )]
        vpcs: Vec<String>,
        /// Subnets to log (repeatable).
        #[arg(long = "subnet")]
        subnets: Vec<String>,
        /// ACCEPT, REJECT or ALL.
        #[arg(long, default_value = "ALL")]
        traffic_type: String,
        /// Seconds over which flows are aggregated into one record (1-600; AWS: 60 or 600).
        #[arg(long, default_value_t = 600)]
        max_aggregation_interval: u32,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List flow logs (all, the ids given, or those of --resource).
    #[command(visible_alias = "ls")]
    List(FlowLogIds),
    /// Show flow logs in detail.
    Describe(FlowLogIds),
    /// Delete flow logs (their records stop; files on the hosts stay).
    #[command(visible_alias = "rm")]
    Delete {
        /// Flow log ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Ids, a resource and paging.
#[derive(clap::Args, Debug, Clone)]
pub struct FlowLogIds {
    /// Only these (an unknown id is NOT_FOUND).
    pub ids: Vec<String>,
    /// Only the flow logs of this VPC or subnet.
    #[arg(long, conflicts_with = "ids")]
    pub resource: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// `vpc flows` options (without --follow: the conntrack summary).
#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// Stream flow-log records (yours) as the hosts publish them, until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Only records of this VPC.
    #[arg(long, requires = "follow")]
    pub vpc: Option<String>,
    /// Only records of this subnet.
    #[arg(long, requires = "follow")]
    pub subnet: Option<String>,
    /// Only records of this instance.
    #[arg(long, requires = "follow")]
    pub instance: Option<String>,
    /// Only ACCEPT or REJECT records.
    #[arg(long, requires = "follow", value_parser = ["ACCEPT", "REJECT"])]
    pub action: Option<String>,
    /// Only records of this flow log.
    #[arg(long, requires = "follow")]
    pub flow_log: Option<String>,
    /// Stop after this many records.
    #[arg(long, requires = "follow")]
    pub limit: Option<u64>,
}

fn client(api: &Api) -> FlowLogServiceClient<crate::api::Authed> {
    FlowLogServiceClient::new(api.channel.clone())
}

fn flow_log_table(items: &[pb::FlowLog]) -> Table {
    let mut t = Table::new(&[
        "FLOW LOG ID",
        "RESOURCE",
        "TYPE",
        "TRAFFIC",
        "INTERVAL",
        "VPC ID",
        "STATUS",
    ])
    .wide(&["DESTINATION", "OWNER", "TAGS"]);
    for f in items {
        t.row(vec![
            f.flow_log_id.clone(),
            f.resource_id.clone(),
            f.resource_type.clone(),
            f.traffic_type.clone(),
            format!("{}s", f.max_aggregation_interval),
            f.vpc_id.clone(),
            f.flow_log_status.clone(),
            f.log_destination.clone(),
            f.owner_id.clone(),
            tags_text(&f.tags),
        ]);
    }
    t
}

impl ToJson for pb::FlowLog {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "flowLogId": self.flow_log_id,
            "resourceType": self.resource_type,
            "resourceId": self.resource_id,
            "trafficType": self.traffic_type,
            "maxAggregationInterval": self.max_aggregation_interval,
            "flowLogStatus": self.flow_log_status,
            "ownerId": self.owner_id,
            "tags": self.tags.to_json(),
            "vpcId": self.vpc_id,
            "logDestination": self.log_destination,
            "creationTimeMs": self.creation_time_ms,
        })
    }
}

pub async fn flow_logs(api: &Api, cmd: FlowLogsCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        FlowLogsCommand::Create {
            vpcs,
            subnets,
            traffic_type,
            max_aggregation_interval,
            tags,
            client_token,
        } => {
            let (resource_type, resource_ids) = if subnets.is_empty() {
                ("VPC", vpcs)
            } else {
                ("Subnet", subnets)
            };
            let r = c
                .create_flow_logs(pb::CreateFlowLogsRequest {
                    resource_type: resource_type.into(),
                    resource_ids,
                    traffic_type: traffic_type.to_uppercase(),
                    max_aggregation_interval,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let items = r.into_inner().flow_logs;
            show_list(api, "flowLogs", &items, false, flow_log_table);
        }
        FlowLogsCommand::List(a) => list(api, a, false).await?,
        FlowLogsCommand::Describe(a) => list(api, a, true).await?,
        FlowLogsCommand::Delete { ids } => {
            let what = ids.join(" ");
            let r = c
                .delete_flow_logs(pb::DeleteFlowLogsRequest { flow_log_ids: ids })
                .await?;
            show_done(api, &what, "deleted", revision(&r));
        }
    }
    Ok(())
}

async fn list(api: &Api, a: FlowLogIds, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (flow_log_ids, resource_id) = (a.ids.clone(), a.resource.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_flow_logs(pb::DescribeFlowLogsRequest {
                    flow_log_ids,
                    resource_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.flow_logs, r.next_token))
        }
    })
    .await?;
    show_list(api, "flowLogs", &items, describe, flow_log_table);
    Ok(())
}

/// The table row of a record (terminal output).
fn row(r: &FlowRecord) -> String {
    let port = |p: u16| {
        if r.protocol == 1 {
            "-".into()
        } else {
            p.to_string()
        }
    };
    format!(
        "{:<10} {:<21} {:<7} {:<6} {:>15}:{:<5} -> {:>15}:{:<5} {:>3} {:>6} {:>8} {:<8} {} {}\n",
        r.end,
        r.instance_id,
        r.flow_direction,
        r.action,
        r.srcaddr,
        port(r.srcport),
        r.dstaddr,
        port(r.dstport),
        r.protocol,
        r.packets,
        r.bytes,
        r.log_status,
        r.rule,
        r.reason
    )
}

/// `vpc flows --follow`.
pub async fn follow(api: &Api, a: FlowsArgs) -> Result<(), CliError> {
    let mut c = client(api);
    let mut stream = c
        .follow_flow_logs(pb::FollowFlowLogsRequest {
            vpc_id: a.vpc.unwrap_or_default(),
            subnet_id: a.subnet.unwrap_or_default(),
            instance_id: a.instance.unwrap_or_default(),
            action: a.action.unwrap_or_default(),
            flow_log_id: a.flow_log.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let table = matches!(api.output, Output::Table | Output::Wide) && api.query.is_none();
    if table {
        crate::output::write_stdout(
            format!(
                "{:<10} {:<21} {:<7} {:<6} {:>21} -> {:>21} {:>3} {:>6} {:>8} {:<8} RULE REASON\n",
                "END",
                "INSTANCE",
                "DIR",
                "ACTION",
                "SOURCE",
                "DESTINATION",
                "PRO",
                "PKTS",
                "BYTES",
                "STATUS"
            )
            .as_bytes(),
        );
    }
    let mut seen = 0u64;
    while let Some(rec) = stream.message().await? {
        let rec = FlowRecord::from(&rec);
        let line = if table {
            row(&rec)
        } else {
            let mut s = serde_json::to_string(&rec)
                .map_err(|e| CliError::Local(anyhow::anyhow!("encoding a record: {e}")))?;
            s.push('\n');
            s
        };
        let mut out = std::io::stdout().lock();
        if out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (a pipe closed): done.
            return Ok(());
        }
        seen += 1;
        if a.limit.is_some_and(|n| seen >= n) {
            return Ok(());
        }
    }
    Err(CliError::Local(anyhow::anyhow!(
        "the control plane ended the record stream"
    )))
}
