//! `vpc security-groups` and `vpc network-acls`: the `SecurityService`.

use clap::{Subcommand, ValueEnum};
use vpc_proto::v1::{self as pb, security_service_client::SecurityServiceClient};

use crate::api::{
    Api, Authed, CliError, Table, VpcFilterArgs, api_ports, need, paged, parse_port_range,
    parse_protocol, parse_tag, port_range_text, protocol_text, revision, show_done, show_list,
    show_one, tags_text,
};

#[derive(Subcommand, Debug)]
pub enum SecurityGroupsCommand {
    /// Create a security group (no inbound rules, one allow-all outbound rule).
    Create {
        /// The VPC.
        #[arg(long, visible_alias = "vpc-id")]
        vpc: String,
        /// Unique within the VPC (`default` is reserved).
        #[arg(long, visible_alias = "group-name")]
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List security groups (all, the ids given, or those of --vpc).
    #[command(visible_alias = "ls")]
    List(VpcFilterArgs),
    /// Show security groups in detail, with their rules.
    Describe(VpcFilterArgs),
    /// Delete a security group (not a default group; not while in use).
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// Allow inbound traffic: one rule per --cidr and per --source-group.
    AuthorizeIngress(RuleArgs),
    /// Allow outbound traffic: one rule per --cidr and per --source-group (destination).
    AuthorizeEgress(RuleArgs),
    /// Remove inbound rules by id (`vpc security-groups describe GROUP` shows them).
    RevokeIngress {
        group: String,
        #[arg(required = true)]
        rule_ids: Vec<String>,
    },
    /// Remove outbound rules by id.
    RevokeEgress {
        group: String,
        #[arg(required = true)]
        rule_ids: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct RuleArgs {
    /// The security group.
    group: String,
    /// tcp, udp, icmp, -1/all or a protocol number.
    #[arg(long, value_parser = parse_protocol)]
    protocol: String,
    /// Port or range (22, 1000-2000, -1 for all; default all). icmp: TYPE or TYPE-CODE.
    #[arg(long, value_parser = parse_port_range, allow_hyphen_values = true)]
    port: Option<(i32, i32)>,
    /// Peer IPv4 CIDR (repeatable).
    #[arg(long, required_unless_present = "source_group")]
    cidr: Vec<String>,
    /// Peer security group (repeatable): traffic from (ingress) or to (egress) its members.
    #[arg(long, visible_alias = "destination-group")]
    source_group: Vec<String>,
    /// Rule description.
    #[arg(long, default_value = "")]
    description: String,
}

#[derive(Subcommand, Debug)]
pub enum NetworkAclsCommand {
    /// Create a custom network ACL (denies everything until entries are added).
    Create {
        /// The VPC.
        #[arg(long, visible_alias = "vpc-id")]
        vpc: String,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List network ACLs (all, the ids given, or those of --vpc).
    #[command(visible_alias = "ls")]
    List(VpcFilterArgs),
    /// Show network ACLs in detail, with their entries.
    Describe(VpcFilterArgs),
    /// Delete a network ACL (not a default ACL; not while subnets are associated).
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// Add an entry (rules are evaluated by number, lowest first, per direction).
    AddEntry {
        /// The network ACL.
        acl: String,
        /// Rule number 1-32766 (unique per direction).
        #[arg(long = "rule", visible_alias = "rule-number")]
        rule: u32,
        /// tcp, udp, icmp, -1/all or a protocol number.
        #[arg(long, value_parser = parse_protocol)]
        protocol: String,
        /// Port or range (tcp/udp; default all). icmp: TYPE or TYPE-CODE.
        #[arg(long, value_parser = parse_port_range, allow_hyphen_values = true)]
        port: Option<(i32, i32)>,
        /// IPv4 CIDR the entry matches (source for inbound, destination for outbound).
        #[arg(long, visible_alias = "cidr-block")]
        cidr: String,
        /// allow or deny.
        #[arg(long, value_enum, visible_alias = "rule-action")]
        action: AclAction,
        /// An outbound entry (default inbound).
        #[arg(long)]
        egress: bool,
    },
    /// Delete an entry.
    DeleteEntry {
        /// The network ACL.
        acl: String,
        /// Rule number.
        #[arg(long = "rule", visible_alias = "rule-number")]
        rule: u32,
        /// The outbound entry (default inbound).
        #[arg(long)]
        egress: bool,
    },
    /// Associate a subnet with an ACL of its VPC (the default ACL to undo).
    Associate {
        /// The subnet.
        #[arg(long, visible_alias = "subnet-id")]
        subnet: String,
        /// The network ACL.
        #[arg(long, visible_alias = "network-acl-id")]
        acl: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AclAction {
    Allow,
    Deny,
}

fn client(api: &Api) -> SecurityServiceClient<Authed> {
    SecurityServiceClient::new(api.channel.clone())
}

fn sg_table(items: &[pb::SecurityGroup]) -> Table {
    let mut t = Table::new(&[
        "GROUP ID",
        "VPC ID",
        "NAME",
        "INGRESS",
        "EGRESS",
        "DESCRIPTION",
    ])
    .wide(&["OWNER", "TAGS"]);
    for g in items {
        t.row(vec![
            g.group_id.clone(),
            g.vpc_id.clone(),
            g.group_name.clone(),
            g.ingress_rules.len().to_string(),
            g.egress_rules.len().to_string(),
            g.description.clone(),
            g.owner_id.clone(),
            tags_text(&g.tags),
        ]);
    }
    t
}

fn rule_peer(r: &pb::SecurityGroupRule) -> String {
    if r.referenced_group_id.is_empty() {
        r.cidr_ipv4.clone()
    } else {
        r.referenced_group_id.clone()
    }
}

fn rule_table(items: &[pb::SecurityGroupRule]) -> Table {
    let mut t = Table::new(&[
        "RULE ID",
        "DIRECTION",
        "PROTOCOL",
        "PORTS",
        "PEER",
        "DESCRIPTION",
    ]);
    for r in items {
        t.row(vec![
            r.security_group_rule_id.clone(),
            if r.is_egress { "egress" } else { "ingress" }.into(),
            protocol_text(&r.ip_protocol),
            port_range_text(&r.ip_protocol, r.from_port, r.to_port),
            rule_peer(r),
            r.description.clone(),
        ]);
    }
    t
}

fn acl_table(items: &[pb::NetworkAcl]) -> Table {
    let mut t = Table::new(&["NETWORK ACL ID", "VPC ID", "DEFAULT", "ENTRIES", "SUBNETS"])
        .wide(&["OWNER", "TAGS"]);
    for a in items {
        t.row(vec![
            a.network_acl_id.clone(),
            a.vpc_id.clone(),
            a.is_default.to_string(),
            a.entries.len().to_string(),
            a.subnet_ids.join(","),
            a.owner_id.clone(),
            tags_text(&a.tags),
        ]);
    }
    t
}

pub async fn security_groups(api: &Api, cmd: SecurityGroupsCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        SecurityGroupsCommand::Create {
            vpc,
            name,
            description,
            tags,
            client_token,
        } => {
            let r = c
                .create_security_group(pb::CreateSecurityGroupRequest {
                    vpc_id: vpc,
                    group_name: name,
                    description,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let g = need(r.into_inner().security_group, "security group")?;
            show_one(api, "securityGroup", &g, sg_table);
        }
        SecurityGroupsCommand::List(a) => list_groups(api, a, false).await?,
        SecurityGroupsCommand::Describe(a) => list_groups(api, a, true).await?,
        SecurityGroupsCommand::Delete { id } => {
            let r = c
                .delete_security_group(pb::DeleteSecurityGroupRequest {
                    group_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
        SecurityGroupsCommand::AuthorizeIngress(a) => authorize(api, a, false).await?,
        SecurityGroupsCommand::AuthorizeEgress(a) => authorize(api, a, true).await?,
        SecurityGroupsCommand::RevokeIngress { group, rule_ids } => {
            revoke(api, group, rule_ids, false).await?;
        }
        SecurityGroupsCommand::RevokeEgress { group, rule_ids } => {
            revoke(api, group, rule_ids, true).await?;
        }
    }
    Ok(())
}

async fn list_groups(api: &Api, a: VpcFilterArgs, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (group_ids, vpc_id) = (a.ids.clone(), a.vpc.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_security_groups(pb::DescribeSecurityGroupsRequest {
                    group_ids,
                    vpc_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.security_groups, r.next_token))
        }
    })
    .await?;
    show_list(api, "securityGroups", &items, describe, sg_table);
    Ok(())
}

async fn revoke(
    api: &Api,
    group: String,
    rule_ids: Vec<String>,
    egress: bool,
) -> Result<(), CliError> {
    let what = format!("{group} {} {}", direction(egress), rule_ids.join(" "));
    let req = pb::RevokeSecurityGroupRequest {
        group_id: group,
        security_group_rule_ids: rule_ids,
    };
    let mut c = client(api);
    let r = if egress {
        c.revoke_security_group_egress(req).await?
    } else {
        c.revoke_security_group_ingress(req).await?
    };
    show_done(api, &what, "revoked", revision(&r));
    Ok(())
}

async fn authorize(api: &Api, a: RuleArgs, egress: bool) -> Result<(), CliError> {
    let (from_port, to_port) = api_ports(&a.protocol, a.port).map_err(CliError::Usage)?;
    let rule = |cidr: String, group: String| pb::SecurityGroupRule {
        ip_protocol: a.protocol.clone(),
        from_port,
        to_port,
        cidr_ipv4: cidr,
        referenced_group_id: group,
        description: a.description.clone(),
        is_egress: egress,
        ..Default::default()
    };
    let rules = a
        .cidr
        .iter()
        .map(|c| rule(c.clone(), String::new()))
        .chain(
            a.source_group
                .iter()
                .map(|g| rule(String::new(), g.clone())),
        )
        .collect();
    let req = pb::AuthorizeSecurityGroupRequest {
        group_id: a.group.clone(),
        rules,
    };
    let mut c = client(api);
    let r = if egress {
        c.authorize_security_group_egress(req).await?
    } else {
        c.authorize_security_group_ingress(req).await?
    };
    let rev = revision(&r);
    let rules = r.into_inner().rules;
    show_list(api, "rules", &rules, false, rule_table);
    if let (Some(rev), None, crate::api::Output::Table | crate::api::Output::Wide) =
        (rev, &api.query, api.output)
    {
        eprintln!("authorized at revision {rev}");
    }
    Ok(())
}

pub async fn network_acls(api: &Api, cmd: NetworkAclsCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        NetworkAclsCommand::Create {
            vpc,
            tags,
            client_token,
        } => {
            let r = c
                .create_network_acl(pb::CreateNetworkAclRequest {
                    vpc_id: vpc,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let a = need(r.into_inner().network_acl, "network ACL")?;
            show_one(api, "networkAcl", &a, acl_table);
        }
        NetworkAclsCommand::List(a) => list_acls(api, a, false).await?,
        NetworkAclsCommand::Describe(a) => list_acls(api, a, true).await?,
        NetworkAclsCommand::Delete { id } => {
            let r = c
                .delete_network_acl(pb::DeleteNetworkAclRequest {
                    network_acl_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
        NetworkAclsCommand::AddEntry {
            acl,
            rule,
            protocol,
            port,
            cidr,
            action,
            egress,
        } => {
            let (from_port, to_port) = api_ports(&protocol, port).map_err(CliError::Usage)?;
            let rule_action = match action {
                AclAction::Allow => "allow",
                AclAction::Deny => "deny",
            };
            let r = c
                .create_network_acl_entry(pb::CreateNetworkAclEntryRequest {
                    network_acl_id: acl.clone(),
                    entry: Some(pb::NetworkAclEntry {
                        rule_number: rule,
                        protocol,
                        rule_action: rule_action.into(),
                        egress,
                        cidr_block: cidr,
                        from_port,
                        to_port,
                    }),
                })
                .await?;
            let what = format!("{acl} {} rule {rule}", direction(egress));
            show_done(api, &what, "added", revision(&r));
        }
        NetworkAclsCommand::DeleteEntry { acl, rule, egress } => {
            let r = c
                .delete_network_acl_entry(pb::DeleteNetworkAclEntryRequest {
                    network_acl_id: acl.clone(),
                    rule_number: rule,
                    egress,
                })
                .await?;
            let what = format!("{acl} {} rule {rule}", direction(egress));
            show_done(api, &what, "deleted", revision(&r));
        }
        NetworkAclsCommand::Associate { subnet, acl } => {
            let r = c
                .replace_network_acl_association(pb::ReplaceNetworkAclAssociationRequest {
                    subnet_id: subnet.clone(),
                    network_acl_id: acl.clone(),
                })
                .await?;
            show_done(
                api,
                &subnet,
                &format!("associated with {acl}"),
                revision(&r),
            );
        }
    }
    Ok(())
}

fn direction(egress: bool) -> &'static str {
    if egress { "egress" } else { "ingress" }
}

async fn list_acls(api: &Api, a: VpcFilterArgs, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (network_acl_ids, vpc_id) = (a.ids.clone(), a.vpc.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_network_acls(pb::DescribeNetworkAclsRequest {
                    network_acl_ids,
                    vpc_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.network_acls, r.next_token))
        }
    })
    .await?;
    show_list(api, "networkAcls", &items, describe, acl_table);
    Ok(())
}
