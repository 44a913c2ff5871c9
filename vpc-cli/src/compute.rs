//! `vpc instances` and `vpc volumes`: the `InstanceService` and `VolumeService`.

use clap::Subcommand;
use vpc_proto::v1::{
    self as pb, instance_service_client::InstanceServiceClient,
    volume_service_client::VolumeServiceClient,
};

use crate::api::{
    Api, CliError, IdsArgs, PageArgs, Table, name_tag, need, paged, parse_tag, revision, show_done,
    show_list, show_one,
};

#[derive(Subcommand, Debug)]
pub enum InstancesCommand {
    /// Launch instances in a subnet (placed on a host, given an address and a MAC).
    Run {
        /// The subnet.
        #[arg(long, visible_alias = "subnet-id")]
        subnet: String,
        /// How many (1-100).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Security group (repeatable, up to 5; none: the VPC's default group).
        #[arg(long = "security-group", visible_alias = "security-group-id")]
        security_groups: Vec<String>,
        /// A free address of the subnet (only with --count 1).
        #[arg(long, visible_alias = "private-ip-address")]
        private_ip: Option<String>,
        /// Place on this host (default: the host with fewest instances).
        #[arg(long, visible_alias = "host-id")]
        host: Option<String>,
        /// Instance type.
        #[arg(long)]
        instance_type: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List instances (all, the ids given, or those of --subnet).
    #[command(visible_alias = "ls")]
    List(InstanceListArgs),
    /// Show instances in detail.
    Describe(InstanceListArgs),
    /// Terminate instances (their addresses are released, target groups drop them).
    #[command(visible_alias = "rm")]
    Terminate {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct InstanceListArgs {
    /// Only these (an unknown id is NOT_FOUND).
    ids: Vec<String>,
    /// Only instances of this subnet.
    #[arg(long, visible_alias = "subnet-id")]
    subnet: Option<String>,
    #[command(flatten)]
    page: PageArgs,
}

#[derive(Subcommand, Debug)]
pub enum VolumesCommand {
    /// Create a volume.
    Create {
        /// Size in GiB (1-16384).
        #[arg(long)]
        size: u32,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List volumes (all, or the ids given).
    #[command(visible_alias = "ls")]
    List(IdsArgs),
    /// Show volumes in detail.
    Describe(IdsArgs),
    /// Delete a volume (refused while attached).
    #[command(visible_alias = "rm")]
    Delete { id: String },
}

fn instance_table(items: &[pb::Instance]) -> Table {
    let mut t = Table::new(&[
        "INSTANCE ID",
        "SUBNET ID",
        "PRIVATE IP",
        "HOST",
        "STATE",
        "NAME",
    ]);
    for i in items {
        t.row(vec![
            i.instance_id.clone(),
            i.subnet_id.clone(),
            i.private_ip_address.clone(),
            i.host_id.clone(),
            i.state.clone(),
            name_tag(&i.tags),
        ]);
    }
    t
}

fn volume_table(items: &[pb::Volume]) -> Table {
    let mut t = Table::new(&["VOLUME ID", "SIZE (GiB)", "ATTACHED TO", "STATE", "NAME"]);
    for v in items {
        t.row(vec![
            v.volume_id.clone(),
            v.size_gib.to_string(),
            v.attached_instance_id.clone(),
            v.state.clone(),
            name_tag(&v.tags),
        ]);
    }
    t
}

pub async fn instances(api: &Api, cmd: InstancesCommand) -> Result<(), CliError> {
    let mut c = InstanceServiceClient::new(api.channel.clone());
    match cmd {
        InstancesCommand::Run {
            subnet,
            count,
            security_groups,
            private_ip,
            host,
            instance_type,
            tags,
            client_token,
        } => {
            let r = c
                .run_instances(pb::RunInstancesRequest {
                    subnet_id: subnet,
                    security_group_ids: security_groups,
                    private_ip_address: private_ip.unwrap_or_default(),
                    host_id: host.unwrap_or_default(),
                    instance_type: instance_type.unwrap_or_default(),
                    count,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let items = r.into_inner().instances;
            show_list(api, "instances", &items, false, instance_table);
        }
        InstancesCommand::List(a) => list_instances(api, a, false).await?,
        InstancesCommand::Describe(a) => list_instances(api, a, true).await?,
        InstancesCommand::Terminate { ids } => {
            let r = c
                .terminate_instances(pb::TerminateInstancesRequest { instance_ids: ids })
                .await?;
            let items = r.into_inner().instances;
            show_list(api, "instances", &items, false, instance_table);
        }
    }
    Ok(())
}

async fn list_instances(api: &Api, a: InstanceListArgs, describe: bool) -> Result<(), CliError> {
    let c = InstanceServiceClient::new(api.channel.clone());
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (instance_ids, subnet_id) = (a.ids.clone(), a.subnet.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_instances(pb::DescribeInstancesRequest {
                    instance_ids,
                    subnet_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.instances, r.next_token))
        }
    })
    .await?;
    show_list(api, "instances", &items, describe, instance_table);
    Ok(())
}

pub async fn volumes(api: &Api, cmd: VolumesCommand) -> Result<(), CliError> {
    let mut c = VolumeServiceClient::new(api.channel.clone());
    match cmd {
        VolumesCommand::Create {
            size,
            tags,
            client_token,
        } => {
            let r = c
                .create_volume(pb::CreateVolumeRequest {
                    size_gib: size,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let v = need(r.into_inner().volume, "volume")?;
            show_one(api, "volume", &v, volume_table);
        }
        VolumesCommand::List(a) => list_volumes(api, a, false).await?,
        VolumesCommand::Describe(a) => list_volumes(api, a, true).await?,
        VolumesCommand::Delete { id } => {
            let r = c
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
    }
    Ok(())
}

async fn list_volumes(api: &Api, a: IdsArgs, describe: bool) -> Result<(), CliError> {
    let c = VolumeServiceClient::new(api.channel.clone());
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let volume_ids = a.ids.clone();
        async move {
            let r = c
                .describe_volumes(pb::DescribeVolumesRequest {
                    volume_ids,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.volumes, r.next_token))
        }
    })
    .await?;
    show_list(api, "volumes", &items, describe, volume_table);
    Ok(())
}
