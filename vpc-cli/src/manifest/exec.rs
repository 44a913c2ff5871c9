//! The API calls of apply and delete: describing the account, creating, converging,
//! deleting.

use std::time::{Duration, Instant};

use tonic::{Code, Status};
use vpc_proto::v1::{
    self as pb, instance_service_client::InstanceServiceClient,
    load_balancer_service_client::LoadBalancerServiceClient,
    security_service_client::SecurityServiceClient, tag_service_client::TagServiceClient,
    volume_service_client::VolumeServiceClient, vpc_service_client::VpcServiceClient,
};

use super::model::{Kind, Resource};
use super::plan::{Create, Current, Op, create_request};
use crate::api::{Api, Authed, CliError};

/// The clients.
pub struct Clients {
    vpc: VpcServiceClient<Authed>,
    sec: SecurityServiceClient<Authed>,
    inst: InstanceServiceClient<Authed>,
    vol: VolumeServiceClient<Authed>,
    lb: LoadBalancerServiceClient<Authed>,
    tags: TagServiceClient<Authed>,
}

impl Clients {
    pub fn new(api: &Api) -> Clients {
        let ch = api.channel.clone();
        Clients {
            vpc: VpcServiceClient::new(ch.clone()),
            sec: SecurityServiceClient::new(ch.clone()),
            inst: InstanceServiceClient::new(ch.clone()),
            vol: VolumeServiceClient::new(ch.clone()),
            lb: LoadBalancerServiceClient::new(ch.clone()),
            tags: TagServiceClient::new(ch),
        }
    }
}

fn page(token: &str) -> Option<pb::Page> {
    Some(pb::Page {
        max_results: 1000,
        next_token: token.to_owned(),
    })
}

/// Every page of a describe call.
macro_rules! all_pages {
    ($client:expr, $method:ident, $req:ident, $field:ident) => {{
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = $client
                .$method(pb::$req {
                    page: page(&token),
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(r.$field);
            if r.next_token.is_empty() {
                break;
            }
            token = r.next_token;
        }
        out
    }};
}

/// The account's objects of the kinds a manifest has.
pub async fn current(c: &mut Clients) -> Result<Current, Status> {
    Ok(Current {
        vpcs: all_pages!(c.vpc, describe_vpcs, DescribeVpcsRequest, vpcs),
        subnets: all_pages!(c.vpc, describe_subnets, DescribeSubnetsRequest, subnets),
        groups: all_pages!(
            c.sec,
            describe_security_groups,
            DescribeSecurityGroupsRequest,
            security_groups
        ),
        acls: all_pages!(
            c.sec,
            describe_network_acls,
            DescribeNetworkAclsRequest,
            network_acls
        ),
        instances: all_pages!(
            c.inst,
            describe_instances,
            DescribeInstancesRequest,
            instances
        ),
        volumes: all_pages!(c.vol, describe_volumes, DescribeVolumesRequest, volumes),
        target_groups: all_pages!(
            c.lb,
            describe_target_groups,
            DescribeTargetGroupsRequest,
            target_groups
        ),
        load_balancers: all_pages!(
            c.lb,
            describe_load_balancers,
            DescribeLoadBalancersRequest,
            load_balancers
        ),
    })
}

/// Tokens of earlier generations tried before giving up.
const GENERATIONS: u32 = 32;

/// Creates `r` and records the new object in `cur`; returns its id. A client token whose
/// earlier object is gone (NOT_FOUND, or a terminated instance) is retried with the next
/// generation.
pub async fn create(c: &mut Clients, r: &Resource, cur: &mut Current) -> Result<String, CliError> {
    let mut last = None;
    for generation in 0..GENERATIONS {
        let req = create_request(r, cur, generation)
            .map_err(|e| CliError::Usage(format!("{}: {e}", r.id())))?;
        let res = match req {
            Create::Vpc(q) => c.vpc.create_vpc(q).await.map(|x| {
                let v = x.into_inner().vpc.unwrap_or_default();
                let id = v.vpc_id.clone();
                cur.vpcs.push(v);
                Some(id)
            }),
            Create::Subnet(q) => c.vpc.create_subnet(q).await.map(|x| {
                let v = x.into_inner().subnet.unwrap_or_default();
                let id = v.subnet_id.clone();
                cur.subnets.push(v);
                Some(id)
            }),
            Create::SecurityGroup(q) => c.sec.create_security_group(q).await.map(|x| {
                let v = x.into_inner().security_group.unwrap_or_default();
                let id = v.group_id.clone();
                cur.groups.push(v);
                Some(id)
            }),
            Create::NetworkAcl(q) => c.sec.create_network_acl(q).await.map(|x| {
                let v = x.into_inner().network_acl.unwrap_or_default();
                let id = v.network_acl_id.clone();
                cur.acls.push(v);
                Some(id)
            }),
            Create::Instance(q) => c.inst.run_instances(q).await.map(|x| {
                let v = x
                    .into_inner()
                    .instances
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                if !super::plan::live(&v) {
                    // The token's instance was terminated: launch a new one.
                    return None;
                }
                let id = v.instance_id.clone();
                cur.instances.retain(|i| i.instance_id != id);
                cur.instances.push(v);
                Some(id)
            }),
            Create::Volume(q) => c.vol.create_volume(q).await.map(|x| {
                let v = x.into_inner().volume.unwrap_or_default();
                let id = v.volume_id.clone();
                cur.volumes.push(v);
                Some(id)
            }),
            Create::TargetGroup(q) => c.lb.create_target_group(q).await.map(|x| {
                let v = x.into_inner().target_group.unwrap_or_default();
                let id = v.target_group_id.clone();
                cur.target_groups.push(v);
                Some(id)
            }),
            Create::LoadBalancer(q) => c.lb.create_load_balancer(q).await.map(|x| {
                let v = x.into_inner().load_balancer.unwrap_or_default();
                let id = v.load_balancer_id.clone();
                cur.load_balancers.push(v);
                Some(id)
            }),
        };
        match res {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => {}
            Err(s) if s.code() == Code::NotFound => last = Some(s),
            Err(s) => return Err(in_resource(r, s)),
        }
    }
    Err(match last {
        Some(s) => in_resource(r, s),
        None => CliError::Usage(format!("{}: creating: client tokens exhausted", r.id())),
    })
}

/// The status with the resource named in its message.
pub fn in_resource(r: &Resource, s: Status) -> CliError {
    let msg = format!("{} ({}): {}", r.id(), r.loc.file, s.message());
    CliError::Status(Status::with_details(
        s.code(),
        msg,
        s.details().to_vec().into(),
    ))
}

/// Runs one change of the object `id` (of `r`).
pub async fn change(c: &mut Clients, r: &Resource, id: &str, op: &Op) -> Result<(), CliError> {
    let res = match op.clone() {
        Op::Tags(tags) => c
            .tags
            .create_tags(pb::CreateTagsRequest {
                resource_ids: vec![id.to_owned()],
                tags,
            })
            .await
            .map(drop),
        Op::Revoke { egress, rule_ids } => {
            let q = pb::RevokeSecurityGroupRequest {
                group_id: id.to_owned(),
                security_group_rule_ids: rule_ids,
            };
            if egress {
                c.sec.revoke_security_group_egress(q).await.map(drop)
            } else {
                c.sec.revoke_security_group_ingress(q).await.map(drop)
            }
        }
        Op::Authorize { egress, rules } => {
            let q = pb::AuthorizeSecurityGroupRequest {
                group_id: id.to_owned(),
                rules,
            };
            if egress {
                c.sec.authorize_security_group_egress(q).await.map(drop)
            } else {
                c.sec.authorize_security_group_ingress(q).await.map(drop)
            }
        }
        Op::DeleteAclEntries {
            egress,
            rule_numbers,
        } => {
            let mut res = Ok(());
            for rule_number in rule_numbers {
                res = c
                    .sec
                    .delete_network_acl_entry(pb::DeleteNetworkAclEntryRequest {
                        network_acl_id: id.to_owned(),
                        rule_number,
                        egress,
                    })
                    .await
                    .map(drop);
                if res.is_err() {
                    break;
                }
            }
            res
        }
        Op::CreateAclEntries(entries) => {
            let mut res = Ok(());
            for entry in entries {
                res = c
                    .sec
                    .create_network_acl_entry(pb::CreateNetworkAclEntryRequest {
                        network_acl_id: id.to_owned(),
                        entry: Some(entry),
                    })
                    .await
                    .map(drop);
                if res.is_err() {
                    break;
                }
            }
            res
        }
        Op::Associate {
            subnet_ids,
            network_acl_id,
        } => {
            let mut res = Ok(());
            for subnet_id in subnet_ids {
                res = c
                    .sec
                    .replace_network_acl_association(pb::ReplaceNetworkAclAssociationRequest {
                        subnet_id,
                        network_acl_id: network_acl_id.clone(),
                    })
                    .await
                    .map(drop);
                if res.is_err() {
                    break;
                }
            }
            res
        }
        Op::ModifyTargetGroup {
            health_check,
            deregistration_delay_seconds,
        } => {
            c.lb.modify_target_group(pb::ModifyTargetGroupRequest {
                target_group_id: id.to_owned(),
                health_check,
                deregistration_delay_seconds,
            })
            .await
            .map(drop)
        }
        Op::Deregister(targets) => {
            c.lb.deregister_targets(pb::DeregisterTargetsRequest {
                target_group_id: id.to_owned(),
                targets,
            })
            .await
            .map(drop)
        }
        Op::Register(targets) => {
            c.lb.register_targets(pb::RegisterTargetsRequest {
                target_group_id: id.to_owned(),
                targets,
            })
            .await
            .map(drop)
        }
        Op::DeleteListener(listener_id) => {
            c.lb.delete_listener(pb::DeleteListenerRequest { listener_id })
                .await
                .map(drop)
        }
        Op::CreateListener {
            protocol,
            port,
            target_group_id,
        } => {
            c.lb.create_listener(pb::CreateListenerRequest {
                load_balancer_id: id.to_owned(),
                protocol,
                port,
                target_group_id,
            })
            .await
            .map(drop)
        }
    };
    res.map_err(|s| in_resource(r, s))
}

/// Deletes one object (instances: terminates; see [`wait_terminated`]).
pub async fn delete(c: &mut Clients, kind: Kind, id: &str) -> Result<(), Status> {
    let id = id.to_owned();
    match kind {
        Kind::Vpc => c
            .vpc
            .delete_vpc(pb::DeleteVpcRequest { vpc_id: id })
            .await
            .map(drop),
        Kind::Subnet => c
            .vpc
            .delete_subnet(pb::DeleteSubnetRequest { subnet_id: id })
            .await
            .map(drop),
        Kind::SecurityGroup => c
            .sec
            .delete_security_group(pb::DeleteSecurityGroupRequest { group_id: id })
            .await
            .map(drop),
        Kind::NetworkAcl => {
            release_acl(c, &id).await?;
            c.sec
                .delete_network_acl(pb::DeleteNetworkAclRequest { network_acl_id: id })
                .await
                .map(drop)
        }
        Kind::Instance => c
            .inst
            .terminate_instances(pb::TerminateInstancesRequest {
                instance_ids: vec![id],
            })
            .await
            .map(drop),
        Kind::Volume => c
            .vol
            .delete_volume(pb::DeleteVolumeRequest { volume_id: id })
            .await
            .map(drop),
        Kind::TargetGroup => {
            c.lb.delete_target_group(pb::DeleteTargetGroupRequest {
                target_group_id: id,
            })
            .await
            .map(drop)
        }
        Kind::LoadBalancer => {
            c.lb.delete_load_balancer(pb::DeleteLoadBalancerRequest {
                load_balancer_id: id,
            })
            .await
            .map(drop)
        }
    }
}

/// Associates the subnets of network ACL `id` with their VPC's default ACL (an ACL with
/// subnets cannot be deleted). Subnets gone meanwhile are skipped.
pub async fn release_acl(c: &mut Clients, id: &str) -> Result<(), Status> {
    let acl = c
        .sec
        .describe_network_acls(pb::DescribeNetworkAclsRequest {
            network_acl_ids: vec![id.to_owned()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .network_acls
        .into_iter()
        .next();
    let Some(acl) = acl else { return Ok(()) };
    if acl.subnet_ids.is_empty() {
        return Ok(());
    }
    let default = c
        .sec
        .describe_network_acls(pb::DescribeNetworkAclsRequest {
            vpc_id: acl.vpc_id.clone(),
            page: page(""),
            ..Default::default()
        })
        .await?
        .into_inner()
        .network_acls
        .into_iter()
        .find(|a| a.is_default)
        .ok_or_else(|| {
            Status::failed_precondition(format!("VPC {} has no default network ACL", acl.vpc_id))
        })?;
    for subnet_id in acl.subnet_ids {
        match c
            .sec
            .replace_network_acl_association(pb::ReplaceNetworkAclAssociationRequest {
                subnet_id,
                network_acl_id: default.network_acl_id.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s),
        }
    }
    Ok(())
}

/// Revokes the rules of group `id` that reference one of `peers` (so the peers can go).
pub async fn revoke_refs(
    c: &mut Clients,
    g: &pb::SecurityGroup,
    peers: &[String],
) -> Result<(), Status> {
    for (egress, rules) in [(false, &g.ingress_rules), (true, &g.egress_rules)] {
        let ids: Vec<String> = rules
            .iter()
            .filter(|r| peers.contains(&r.referenced_group_id))
            .map(|r| r.security_group_rule_id.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let q = pb::RevokeSecurityGroupRequest {
            group_id: g.group_id.clone(),
            security_group_rule_ids: ids,
        };
        if egress {
            c.sec.revoke_security_group_egress(q).await?;
        } else {
            c.sec.revoke_security_group_ingress(q).await?;
        }
    }
    Ok(())
}

/// Polls until the instances are terminated (or gone), at most `timeout`.
pub async fn wait_terminated(
    c: &mut Clients,
    ids: &[String],
    timeout: Duration,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut left: Vec<String> = ids.to_vec();
    while !left.is_empty() {
        let mut still = Vec::new();
        for id in &left {
            match c
                .inst
                .describe_instances(pb::DescribeInstancesRequest {
                    instance_ids: vec![id.clone()],
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    if r.into_inner()
                        .instances
                        .iter()
                        .any(|i| i.state != "terminated")
                    {
                        still.push(id.clone());
                    }
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(s.into()),
            }
        }
        left = still;
        if left.is_empty() {
            break;
        }
        if start.elapsed() > timeout {
            return Err(CliError::Local(anyhow::anyhow!(
                "timed out after {}s waiting for instances {} to terminate (is their host's \
                 agent running?)",
                timeout.as_secs(),
                left.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
