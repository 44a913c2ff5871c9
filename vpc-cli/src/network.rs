//! `vpc vpcs`, `vpc subnets`, `vpc route-tables`: the `VpcService`.

use clap::Subcommand;
use vpc_proto::v1::{self as pb, vpc_service_client::VpcServiceClient};

use crate::api::{
    Api, CliError, IdsArgs, Table, VpcFilterArgs, name_tag, need, paged, parse_tag, revision,
    show_done, show_list, show_one, tags_text,
};

#[derive(Subcommand, Debug)]
pub enum VpcsCommand {
    /// Create a VPC (with its default security group, default network ACL and main route
    /// table).
    Create {
        /// IPv4 CIDR, /16 to /28.
        #[arg(long, visible_alias = "cidr-block")]
        cidr: String,
        /// Tag KEY=VALUE (repeatable; `Name` is shown in lists).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token: repeating the create with it returns the same VPC.
        #[arg(long)]
        client_token: Option<String>,
        /// Share of each host's conntrack table the VPC may fill, percent (1-100; default:
        /// the agents' `--conntrack-vpc-share`).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        conntrack_share: Option<u32>,
    },
    /// Change a VPC's attributes.
    Modify {
        id: String,
        /// Share of each host's conntrack table the VPC may fill, percent (1-100; 0: the
        /// agents' default).
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
        conntrack_share: Option<u32>,
    },
    /// List VPCs (all, or the ids given).
    #[command(visible_alias = "ls")]
    List(IdsArgs),
    /// Show VPCs in detail (all, or the ids given).
    Describe(IdsArgs),
    /// Delete a VPC (refused while it has subnets, groups, ACLs or target groups).
    #[command(visible_alias = "rm")]
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
pub enum SubnetsCommand {
    /// Create a subnet inside its VPC's CIDR.
    Create {
        /// The VPC.
        #[arg(long = "vpc", visible_alias = "vpc-id")]
        vpc: String,
        /// IPv4 CIDR inside the VPC's, /16 to /28, not overlapping another subnet.
        #[arg(long, visible_alias = "cidr-block")]
        cidr: String,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List subnets (all, the ids given, or those of --vpc).
    #[command(visible_alias = "ls")]
    List(VpcFilterArgs),
    /// Show subnets in detail.
    Describe(VpcFilterArgs),
    /// Delete a subnet (refused while instances or load balancers use it).
    #[command(visible_alias = "rm")]
    Delete { id: String },
}

#[derive(Subcommand, Debug)]
pub enum RouteTablesCommand {
    /// List route tables (all, the ids given, or those of --vpc).
    #[command(visible_alias = "ls")]
    List(VpcFilterArgs),
    /// Show route tables in detail (routes, subnets).
    Describe(VpcFilterArgs),
}

fn client(api: &Api) -> VpcServiceClient<crate::api::Authed> {
    VpcServiceClient::new(api.channel.clone())
}

fn vpc_table(items: &[pb::Vpc]) -> Table {
    let mut t = Table::new(&["VPC ID", "CIDR", "VNI", "STATE", "NAME"]).wide(&[
        "DEFAULT SG",
        "DEFAULT ACL",
        "MAIN ROUTE TABLE",
        "CT SHARE",
        "OWNER",
        "TAGS",
    ]);
    for v in items {
        t.row(vec![
            v.vpc_id.clone(),
            v.cidr_block.clone(),
            v.vni.to_string(),
            v.state.clone(),
            name_tag(&v.tags),
            v.default_security_group_id.clone(),
            v.default_network_acl_id.clone(),
            v.main_route_table_id.clone(),
            match v.conntrack_share_percent {
                0 => "default".into(),
                p => format!("{p}%"),
            },
            v.owner_id.clone(),
            tags_text(&v.tags),
        ]);
    }
    t
}

fn subnet_table(items: &[pb::Subnet]) -> Table {
    let mut t = Table::new(&[
        "SUBNET ID",
        "VPC ID",
        "CIDR",
        "AVAILABLE IPS",
        "NETWORK ACL",
        "STATE",
        "NAME",
    ])
    .wide(&["OWNER", "TAGS"]);
    for s in items {
        t.row(vec![
            s.subnet_id.clone(),
            s.vpc_id.clone(),
            s.cidr_block.clone(),
            s.available_ip_address_count.to_string(),
            s.network_acl_id.clone(),
            s.state.clone(),
            name_tag(&s.tags),
            s.owner_id.clone(),
            tags_text(&s.tags),
        ]);
    }
    t
}

fn route_table_table(items: &[pb::RouteTable]) -> Table {
    let mut t =
        Table::new(&["ROUTE TABLE ID", "VPC ID", "MAIN", "ROUTES", "SUBNETS"]).wide(&["OWNER"]);
    for r in items {
        let routes = r
            .routes
            .iter()
            .map(|x| format!("{}->{}", x.destination_cidr_block, x.gateway_id))
            .collect::<Vec<_>>()
            .join(",");
        t.row(vec![
            r.route_table_id.clone(),
            r.vpc_id.clone(),
            r.main.to_string(),
            routes,
            r.subnet_ids.join(","),
            r.owner_id.clone(),
        ]);
    }
    t
}

pub async fn vpcs(api: &Api, cmd: VpcsCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        VpcsCommand::Create {
            cidr,
            tags,
            client_token,
            conntrack_share,
        } => {
            let r = c
                .create_vpc(pb::CreateVpcRequest {
                    cidr_block: cidr,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                    conntrack_share_percent: conntrack_share.unwrap_or(0),
                })
                .await?;
            let v = need(r.into_inner().vpc, "vpc")?;
            show_one(api, "vpc", &v, vpc_table);
        }
        VpcsCommand::Modify {
            id,
            conntrack_share,
        } => {
            let r = c
                .modify_vpc_attribute(pb::ModifyVpcAttributeRequest {
                    vpc_id: id,
                    conntrack_share_percent: conntrack_share,
                })
                .await?;
            let v = need(r.into_inner().vpc, "vpc")?;
            show_one(api, "vpc", &v, vpc_table);
        }
        VpcsCommand::List(a) => list_vpcs(api, a, false).await?,
        VpcsCommand::Describe(a) => list_vpcs(api, a, true).await?,
        VpcsCommand::Delete { id } => {
            let r = c
                .delete_vpc(pb::DeleteVpcRequest { vpc_id: id.clone() })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
    }
    Ok(())
}

async fn list_vpcs(api: &Api, a: IdsArgs, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let vpc_ids = a.ids.clone();
        async move {
            let r = c
                .describe_vpcs(pb::DescribeVpcsRequest {
                    vpc_ids,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.vpcs, r.next_token))
        }
    })
    .await?;
    show_list(api, "vpcs", &items, describe, vpc_table);
    Ok(())
}

pub async fn subnets(api: &Api, cmd: SubnetsCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        SubnetsCommand::Create {
            vpc,
            cidr,
            tags,
            client_token,
        } => {
            let r = c
                .create_subnet(pb::CreateSubnetRequest {
                    vpc_id: vpc,
                    cidr_block: cidr,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let s = need(r.into_inner().subnet, "subnet")?;
            show_one(api, "subnet", &s, subnet_table);
        }
        SubnetsCommand::List(a) => list_subnets(api, a, false).await?,
        SubnetsCommand::Describe(a) => list_subnets(api, a, true).await?,
        SubnetsCommand::Delete { id } => {
            let r = c
                .delete_subnet(pb::DeleteSubnetRequest {
                    subnet_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
    }
    Ok(())
}

async fn list_subnets(api: &Api, a: VpcFilterArgs, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (subnet_ids, vpc_id) = (a.ids.clone(), a.vpc.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_subnets(pb::DescribeSubnetsRequest {
                    subnet_ids,
                    vpc_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.subnets, r.next_token))
        }
    })
    .await?;
    show_list(api, "subnets", &items, describe, subnet_table);
    Ok(())
}

pub async fn route_tables(api: &Api, cmd: RouteTablesCommand) -> Result<(), CliError> {
    let (a, describe) = match cmd {
        RouteTablesCommand::List(a) => (a, false),
        RouteTablesCommand::Describe(a) => (a, true),
    };
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (route_table_ids, vpc_id) = (a.ids.clone(), a.vpc.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_route_tables(pb::DescribeRouteTablesRequest {
                    route_table_ids,
                    vpc_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.route_tables, r.next_token))
        }
    })
    .await?;
    show_list(api, "routeTables", &items, describe, route_table_table);
    Ok(())
}
