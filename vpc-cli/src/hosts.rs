//! `vpc hosts`: the hosts' agents and network programming latency (`HostService`).

use clap::Subcommand;
use serde_json::json;
use vpc_proto::v1::{self as pb, host_service_client::HostServiceClient};

use crate::{
    api::{Api, CliError, Table, ToJson},
    output::write_stdout,
};

#[derive(Subcommand, Debug)]
pub enum HostsCommand {
    /// Registered hosts: connected, the revision each has applied, instances.
    #[command(visible_alias = "ls")]
    List,
    /// Network programming latency: API write acknowledged -> applied on every host.
    Latency,
}

fn host_table(items: &[pb::Host]) -> Table {
    let mut t = Table::new(&[
        "HOST ID",
        "UNDERLAY IP",
        "CONNECTED",
        "APPLIED REVISION",
        "INSTANCES",
        "LAST ERROR",
    ]);
    for h in items {
        t.row(vec![
            h.host_id.clone(),
            h.underlay_ip.clone(),
            h.connected.to_string(),
            h.applied_revision.to_string(),
            h.instance_count.to_string(),
            h.last_error.clone(),
        ]);
    }
    t
}

pub async fn hosts(api: &Api, cmd: HostsCommand) -> Result<(), CliError> {
    let mut c = HostServiceClient::new(api.channel.clone());
    match cmd {
        HostsCommand::List => {
            let r = c
                .describe_hosts(pb::DescribeHostsRequest {})
                .await?
                .into_inner();
            api.emit(
                || json!({ "hosts": r.hosts.to_json(), "revision": r.revision }),
                |wide| {
                    host_table(&r.hosts).print_as(wide);
                    write_stdout(format!("\nstore revision {}\n", r.revision).as_bytes());
                },
            );
        }
        HostsCommand::Latency => {
            let r = c
                .get_programming_latency(pb::GetProgrammingLatencyRequest {})
                .await?
                .into_inner();
            api.emit(
                || r.to_json(),
                |wide| {
                    let mut t =
                        Table::new(&["SAMPLES", "P50 (ms)", "P99 (ms)", "MAX (ms)", "LAST (ms)"]);
                    t.row(vec![
                        r.samples.to_string(),
                        format!("{:.1}", r.p50_ms),
                        format!("{:.1}", r.p99_ms),
                        format!("{:.1}", r.max_ms),
                        format!("{:.1}", r.last_ms),
                    ]);
                    t.print_as(wide);
                },
            );
        }
    }
    Ok(())
}

/// `vpc tags`: tags of any object (`TagService`).
#[derive(Subcommand, Debug)]
pub enum TagsCommand {
    /// Adds or overwrites tags: `vpc tags create vpc-... i-... --tag Name=web`.
    Create {
        /// Object ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = crate::api::parse_tag, required = true)]
        tags: Vec<pb::Tag>,
    },
    /// Removes tags by key (`KEY=` any value, `KEY=VALUE` only that value).
    Delete {
        /// Object ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// KEY= or KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = crate::api::parse_tag, required = true)]
        tags: Vec<pb::Tag>,
    },
}

pub async fn tags(api: &Api, cmd: TagsCommand) -> Result<(), CliError> {
    use vpc_proto::v1::tag_service_client::TagServiceClient;
    let mut c = TagServiceClient::new(api.channel.clone());
    let (r, what) = match cmd {
        TagsCommand::Create { ids, tags } => (
            crate::api::revision(
                &c.create_tags(pb::CreateTagsRequest {
                    resource_ids: ids,
                    tags,
                })
                .await?,
            ),
            "tagged",
        ),
        TagsCommand::Delete { ids, tags } => (
            crate::api::revision(
                &c.delete_tags(pb::DeleteTagsRequest {
                    resource_ids: ids,
                    tags,
                })
                .await?,
            ),
            "untagged",
        ),
    };
    api.emit(
        || json!({ "revision": r }),
        |_| write_stdout(format!("{what} (revision {})\n", r.unwrap_or_default()).as_bytes()),
    );
    Ok(())
}
