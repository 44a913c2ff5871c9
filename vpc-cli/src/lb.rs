//! `vpc load-balancers` and `vpc target-groups`: the `LoadBalancerService`.
//!
//! (`vpc lb targets|flows` are the host-local datapath views; these are the API objects.)

use clap::Subcommand;
use vpc_proto::v1::{self as pb, load_balancer_service_client::LoadBalancerServiceClient};

use crate::api::{
    Api, Authed, CliError, IdsArgs, Table, need, paged, parse_tag, parse_target, revision,
    show_done, show_list, show_one, tags_text,
};

#[derive(Subcommand, Debug)]
pub enum LoadBalancersCommand {
    /// Create a network load balancer with a VIP in a subnet.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// The subnet its VIP comes from.
        #[arg(long, visible_alias = "subnet-id")]
        subnet: String,
        /// A free address of the subnet (default: allocated).
        #[arg(long)]
        vip: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List load balancers (all, or the ids given).
    #[command(visible_alias = "ls")]
    List(IdsArgs),
    /// Show load balancers in detail, with their listeners.
    Describe(IdsArgs),
    /// Delete a load balancer and its listeners (its VIP is released).
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// Forward a port of the VIP to a target group.
    AddListener {
        /// The load balancer.
        load_balancer: String,
        /// TCP or UDP.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// Port on the VIP.
        #[arg(long)]
        port: u16,
        /// The target group.
        #[arg(long, visible_alias = "target-group-id")]
        target_group: String,
    },
    /// Delete a listener.
    DeleteListener {
        /// The listener id (`vpc load-balancers describe LB` shows them).
        listener: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TargetGroupsCommand {
    /// Create a target group.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
        /// The VPC of its targets.
        #[arg(long, visible_alias = "vpc-id")]
        vpc: String,
        /// TCP or UDP.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// The targets' port (a target may override it).
        #[arg(long)]
        port: u16,
        #[command(flatten)]
        health: HealthArgs,
        /// Seconds deregistered targets drain (default 300).
        #[arg(long)]
        deregistration_delay: Option<u32>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List target groups (all, or the ids given).
    #[command(visible_alias = "ls")]
    List(IdsArgs),
    /// Show target groups in detail (health check, targets).
    Describe(IdsArgs),
    /// Delete a target group (refused while a listener forwards to it).
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// Register instances as targets: INSTANCE or INSTANCE:PORT.
    Register {
        target_group: String,
        #[arg(required = true, value_parser = parse_target)]
        targets: Vec<pb::Target>,
    },
    /// Deregister targets (they drain for the group's deregistration delay).
    Deregister {
        target_group: String,
        #[arg(required = true, value_parser = parse_target)]
        targets: Vec<pb::Target>,
    },
    /// Each target's health, per host checking it (the hosts running the group's load
    /// balancers), as aws elbv2 describe-target-health.
    Health {
        target_group: String,
        /// Wait until every target is healthy on every host checking it.
        #[arg(long)]
        wait: bool,
        /// Seconds --wait waits at most.
        #[arg(long, default_value_t = 120, requires = "wait")]
        wait_timeout: u64,
    },
}

fn health_table(items: &[pb::TargetHealthDescription]) -> Table {
    let mut t = Table::new(&["TARGET", "PORT", "HOST", "STATE", "REASON"]);
    for h in items {
        t.row(vec![
            h.target_id.clone(),
            h.port.to_string(),
            if h.host_id.is_empty() {
                "-".into()
            } else {
                h.host_id.clone()
            },
            h.state.clone(),
            h.reason.clone(),
        ]);
    }
    t
}

/// Health check flags (0 / absent: the API's default).
#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// TCP or HTTP.
    #[arg(long, default_value = "")]
    health_check_protocol: String,
    /// Port checked (default: the target's).
    #[arg(long, default_value_t = 0)]
    health_check_port: u32,
    /// HTTP path (default /).
    #[arg(long, default_value = "")]
    health_check_path: String,
    /// Seconds between checks, 5-300 (default 30).
    #[arg(long, default_value_t = 0)]
    health_check_interval: u32,
    /// Seconds a check may take, 2-120 (default 10).
    #[arg(long, default_value_t = 0)]
    health_check_timeout: u32,
    /// Successes before healthy, 2-10 (default 5).
    #[arg(long, default_value_t = 0)]
    healthy_threshold: u32,
    /// Failures before unhealthy, 2-10 (default 2).
    #[arg(long, default_value_t = 0)]
    unhealthy_threshold: u32,
}

impl HealthArgs {
    fn to_pb(&self) -> Option<pb::HealthCheck> {
        let h = pb::HealthCheck {
            protocol: self.health_check_protocol.clone(),
            port: self.health_check_port,
            path: self.health_check_path.clone(),
            interval_seconds: self.health_check_interval,
            timeout_seconds: self.health_check_timeout,
            healthy_threshold: self.healthy_threshold,
            unhealthy_threshold: self.unhealthy_threshold,
        };
        (h != pb::HealthCheck::default()).then_some(h)
    }
}

fn client(api: &Api) -> LoadBalancerServiceClient<Authed> {
    LoadBalancerServiceClient::new(api.channel.clone())
}

fn lb_table(items: &[pb::LoadBalancer]) -> Table {
    let mut t = Table::new(&[
        "LOAD BALANCER ID",
        "NAME",
        "SUBNET ID",
        "VIP",
        "STATE",
        "LISTENERS",
    ])
    .wide(&["VPC ID", "OWNER", "TAGS"]);
    for l in items {
        let listeners = l
            .listeners
            .iter()
            .map(|x| format!("{}:{}->{}", x.protocol, x.port, x.target_group_id))
            .collect::<Vec<_>>()
            .join(",");
        t.row(vec![
            l.load_balancer_id.clone(),
            l.name.clone(),
            l.subnet_id.clone(),
            l.vip.clone(),
            l.state.clone(),
            listeners,
            l.vpc_id.clone(),
            l.owner_id.clone(),
            tags_text(&l.tags),
        ]);
    }
    t
}

fn listener_table(items: &[pb::Listener]) -> Table {
    let mut t = Table::new(&["LISTENER ID", "PROTOCOL", "PORT", "TARGET GROUP"]);
    for l in items {
        t.row(vec![
            l.listener_id.clone(),
            l.protocol.clone(),
            l.port.to_string(),
            l.target_group_id.clone(),
        ]);
    }
    t
}

fn tg_table(items: &[pb::TargetGroup]) -> Table {
    let mut t = Table::new(&[
        "TARGET GROUP ID",
        "NAME",
        "VPC ID",
        "PROTOCOL",
        "PORT",
        "LOAD BALANCERS",
        "TARGETS",
    ])
    .wide(&["HEALTH CHECK", "DEREGISTRATION DELAY", "OWNER", "TAGS"]);
    for g in items {
        let targets = g
            .targets
            .iter()
            .map(|x| {
                if x.port == 0 {
                    x.id.clone()
                } else {
                    format!("{}:{}", x.id, x.port)
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        t.row(vec![
            g.target_group_id.clone(),
            g.name.clone(),
            g.vpc_id.clone(),
            g.protocol.clone(),
            g.port.to_string(),
            g.load_balancer_ids.join(","),
            targets,
            g.health_check
                .as_ref()
                .map(|h| {
                    format!(
                        "{}:{}{} every {}s",
                        h.protocol, h.port, h.path, h.interval_seconds
                    )
                })
                .unwrap_or_default(),
            format!("{}s", g.deregistration_delay_seconds),
            g.owner_id.clone(),
            tags_text(&g.tags),
        ]);
    }
    t
}

pub async fn load_balancers(api: &Api, cmd: LoadBalancersCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        LoadBalancersCommand::Create {
            name,
            subnet,
            vip,
            tags,
            client_token,
        } => {
            let r = c
                .create_load_balancer(pb::CreateLoadBalancerRequest {
                    name,
                    subnet_id: subnet,
                    vip: vip.unwrap_or_default(),
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let l = need(r.into_inner().load_balancer, "load balancer")?;
            show_one(api, "loadBalancer", &l, lb_table);
        }
        LoadBalancersCommand::List(a) => list_lbs(api, a, false).await?,
        LoadBalancersCommand::Describe(a) => list_lbs(api, a, true).await?,
        LoadBalancersCommand::Delete { id } => {
            let r = c
                .delete_load_balancer(pb::DeleteLoadBalancerRequest {
                    load_balancer_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
        LoadBalancersCommand::AddListener {
            load_balancer,
            protocol,
            port,
            target_group,
        } => {
            let r = c
                .create_listener(pb::CreateListenerRequest {
                    load_balancer_id: load_balancer,
                    protocol: protocol.to_ascii_uppercase(),
                    port: u32::from(port),
                    target_group_id: target_group,
                })
                .await?;
            let l = need(r.into_inner().listener, "listener")?;
            show_one(api, "listener", &l, listener_table);
        }
        LoadBalancersCommand::DeleteListener { listener } => {
            let r = c
                .delete_listener(pb::DeleteListenerRequest {
                    listener_id: listener.clone(),
                })
                .await?;
            show_done(api, &listener, "deleted", revision(&r));
        }
    }
    Ok(())
}

async fn list_lbs(api: &Api, a: IdsArgs, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let load_balancer_ids = a.ids.clone();
        async move {
            let r = c
                .describe_load_balancers(pb::DescribeLoadBalancersRequest {
                    load_balancer_ids,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.load_balancers, r.next_token))
        }
    })
    .await?;
    show_list(api, "loadBalancers", &items, describe, lb_table);
    Ok(())
}

pub async fn target_groups(api: &Api, cmd: TargetGroupsCommand) -> Result<(), CliError> {
    let mut c = client(api);
    match cmd {
        TargetGroupsCommand::Create {
            name,
            vpc,
            protocol,
            port,
            health,
            deregistration_delay,
            tags,
            client_token,
        } => {
            let r = c
                .create_target_group(pb::CreateTargetGroupRequest {
                    name,
                    vpc_id: vpc,
                    protocol: protocol.to_ascii_uppercase(),
                    port: u32::from(port),
                    health_check: health.to_pb(),
                    deregistration_delay_seconds: deregistration_delay,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let g = need(r.into_inner().target_group, "target group")?;
            show_one(api, "targetGroup", &g, tg_table);
        }
        TargetGroupsCommand::List(a) => list_tgs(api, a, false).await?,
        TargetGroupsCommand::Describe(a) => list_tgs(api, a, true).await?,
        TargetGroupsCommand::Delete { id } => {
            let r = c
                .delete_target_group(pb::DeleteTargetGroupRequest {
                    target_group_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
        TargetGroupsCommand::Register {
            target_group,
            targets,
        } => {
            let what = targets_text(&target_group, &targets);
            let r = c
                .register_targets(pb::RegisterTargetsRequest {
                    target_group_id: target_group,
                    targets,
                })
                .await?;
            show_done(api, &what, "registered", revision(&r));
        }
        TargetGroupsCommand::Health {
            target_group,
            wait,
            wait_timeout,
        } => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_timeout);
            let progress = wait && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let items = loop {
                let items = c
                    .describe_target_health(pb::DescribeTargetHealthRequest {
                        target_group_id: target_group.clone(),
                    })
                    .await?
                    .into_inner()
                    .targets;
                let healthy = items.iter().filter(|h| h.state == "healthy").count();
                if !wait || (!items.is_empty() && healthy == items.len()) {
                    break items;
                }
                if std::time::Instant::now() >= deadline {
                    if progress {
                        eprint!("\r\x1b[2K");
                    }
                    let pending: Vec<String> = items
                        .iter()
                        .filter(|h| h.state != "healthy")
                        .map(|h| format!("{} on {} ({})", h.target_id, h.host_id, h.state))
                        .collect();
                    return Err(CliError::Local(anyhow::anyhow!(
                        "timed out after {wait_timeout}s waiting for the targets of {target_group} to be healthy: {}",
                        pending.join(", ")
                    )));
                }
                if progress {
                    eprint!(
                        "\r\x1b[2Kwaiting for targets to be healthy: {healthy}/{}",
                        items.len()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            };
            if progress {
                eprint!("\r\x1b[2K");
            }
            show_list(api, "targets", &items, false, health_table);
        }
        TargetGroupsCommand::Deregister {
            target_group,
            targets,
        } => {
            let what = targets_text(&target_group, &targets);
            let r = c
                .deregister_targets(pb::DeregisterTargetsRequest {
                    target_group_id: target_group,
                    targets,
                })
                .await?;
            show_done(api, &what, "deregistered", revision(&r));
        }
    }
    Ok(())
}

fn targets_text(group: &str, targets: &[pb::Target]) -> String {
    let t = targets
        .iter()
        .map(|x| {
            if x.port == 0 {
                x.id.clone()
            } else {
                format!("{}:{}", x.id, x.port)
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    format!("{group} {t}")
}

async fn list_tgs(api: &Api, a: IdsArgs, describe: bool) -> Result<(), CliError> {
    let c = client(api);
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let target_group_ids = a.ids.clone();
        async move {
            let r = c
                .describe_target_groups(pb::DescribeTargetGroupsRequest {
                    target_group_ids,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.target_groups, r.next_token))
        }
    })
    .await?;
    show_list(api, "targetGroups", &items, describe, tg_table);
    Ok(())
}
