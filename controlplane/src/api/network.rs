//! `VpcService`: VPCs, subnets, route tables.

use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, vpc_service_server::VpcService};

use super::error::{ApiError, ApiResult};
use super::records::{
    AclRec, Meta, SgRec, SgRuleRec, SubnetRec, VpcRec, child_key, child_prefix, ip_prefix, kind,
    now_ms, rec_prefix, sg_name_key, vni_key,
};
use super::{Api, by_ids, claim_token, ids, list_page, respond, validate};
use crate::policy::model::{AclAction, AclRule, Protocol, SgRule};

/// The service.
#[derive(Clone, Debug)]
pub struct Network {
    api: Api,
}

impl Network {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Network { api }
    }
}

/// Tags as the API shows them.
pub fn pb_tags(tags: &[(String, String)]) -> Vec<pb::Tag> {
    tags.iter()
        .map(|(k, v)| pb::Tag {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

fn pb_vpc(v: &VpcRec) -> pb::Vpc {
    pb::Vpc {
        vpc_id: v.meta.id.clone(),
        cidr_block: v.cidr.to_string(),
        vni: v.vni,
        state: "available".into(),
        owner_id: v.meta.account.clone(),
        tags: pb_tags(&v.meta.tags),
        default_security_group_id: v.default_sg.clone(),
        default_network_acl_id: v.default_acl.clone(),
        main_route_table_id: v.main_rtb.clone(),
    }
}

fn pb_subnet(s: &SubnetRec, held: usize) -> pb::Subnet {
    pb::Subnet {
        subnet_id: s.meta.id.clone(),
        vpc_id: s.vpc.clone(),
        cidr_block: s.cidr.to_string(),
        available_ip_address_count: validate::usable_count(s.cidr).saturating_sub(held as u32),
        network_acl_id: s.network_acl.clone(),
        state: "available".into(),
        owner_id: s.meta.account.clone(),
        tags: pb_tags(&s.meta.tags),
    }
}

/// The rules of a VPC's default security group (AWS: inbound from members of the group,
/// outbound to anywhere).
fn default_sg(meta: Meta, vpc: &str) -> SgRec {
    let id = meta.id.clone();
    SgRec {
        meta,
        vpc: vpc.to_owned(),
        name: "default".into(),
        description: "default VPC security group".into(),
        default: true,
        ingress: vec![SgRuleRec {
            id: ids::new_id(kind::SG_RULE),
            rule: SgRule {
                protocol: Protocol::All,
                from_port: None,
                to_port: None,
                cidr: None,
                group: Some(id),
            },
            description: String::new(),
        }],
        egress: vec![allow_all_egress()],
    }
}

/// The outbound rule every new group starts with.
pub fn allow_all_egress() -> SgRuleRec {
    SgRuleRec {
        id: ids::new_id(kind::SG_RULE),
        rule: SgRule {
            protocol: Protocol::All,
            from_port: None,
            to_port: None,
            cidr: Some(
                ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0"),
            ),
            group: None,
        },
        description: String::new(),
    }
}

/// A VPC's default ACL: rule 100 allows everything both ways (then the implicit deny).
fn default_acl(meta: Meta, vpc: &str) -> AclRec {
    let all = AclRule {
        rule: 100,
        protocol: Protocol::All,
        from_port: None,
        to_port: None,
        cidr: ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0"),
        action: AclAction::Allow,
    };
    AclRec {
        meta,
        vpc: vpc.to_owned(),
        default: true,
        inbound: vec![all.clone()],
        outbound: vec![all],
    }
}

impl Network {
    async fn create_vpc(
        &self,
        account: String,
        req: pb::CreateVpcRequest,
    ) -> ApiResult<Response<pb::CreateVpcResponse>> {
        let cidr = validate::cidr("cidr_block", &req.cidr_block)?;
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.vpcs_per_account;
        let (vpc, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token) = (&req, tags.clone(), token.clone());
                async move {
                    let id = ids::new_id(kind::VPC);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::VPC,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let v: VpcRec = tx.must(kind::VPC, "VPC", &existing[0]).await?;
                        return Ok((tx, v));
                    }
                    let count = tx
                        .keys(&rec_prefix(tx.account(), kind::VPC), quota + 1)
                        .await?
                        .len();
                    if count >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "the account has {count} VPCs; the quota is {quota} (VpcLimitExceeded)"
                        )));
                    }
                    // A free VNI: random, guarded by an absent-compare (unique across accounts).
                    let mut vni = ids::random_vni();
                    for _ in 0..8 {
                        if tx.store().get(&vni_key(vni)).await?.is_none() {
                            break;
                        }
                        vni = ids::random_vni();
                    }
                    let acct = tx.account().to_owned();
                    let meta = |id: String, tags: Vec<(String, String)>| Meta {
                        id,
                        account: acct.clone(),
                        tags,
                        created_ms: now_ms(),
                    };
                    let sg = default_sg(meta(ids::new_id(kind::SG), Vec::new()), &id);
                    let acl = default_acl(meta(ids::new_id(kind::ACL), Vec::new()), &id);
                    let v = VpcRec {
                        meta: meta(id.clone(), tags),
                        cidr,
                        vni,
                        default_sg: sg.meta.id.clone(),
                        default_acl: acl.meta.id.clone(),
                        main_rtb: ids::new_id(kind::RTB),
                    };
                    tx.require_absent(vni_key(vni));
                    tx.put_raw(vni_key(vni), id.as_bytes().to_vec());
                    tx.put(kind::VPC, &id, &v)?;
                    tx.put(kind::SG, &sg.meta.id, &sg)?;
                    tx.put_raw(child_key(&acct, &id, kind::SG, &sg.meta.id), Vec::new());
                    tx.put_raw(
                        sg_name_key(&acct, &id, "default"),
                        sg.meta.id.as_bytes().to_vec(),
                    );
                    tx.put(kind::ACL, &acl.meta.id, &acl)?;
                    tx.put_raw(child_key(&acct, &id, kind::ACL, &acl.meta.id), Vec::new());
                    Ok((tx, v))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateVpcResponse {
                vpc: Some(pb_vpc(&vpc)),
            },
            rev,
        ))
    }

    async fn delete_vpc(
        &self,
        account: String,
        req: pb::DeleteVpcRequest,
    ) -> ApiResult<Response<pb::DeleteVpcResponse>> {
        let id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let v: VpcRec = tx.must(kind::VPC, "VPC", &id).await?;
                    let acct = tx.account().to_owned();
                    for (k, what) in [
                        (kind::SUBNET, "subnets"),
                        (kind::TG, "target groups"),
                        (kind::LB, "load balancers"),
                    ] {
                        if let Some(kv) = tx.keys(&child_prefix(&acct, &id, k), 1).await?.first() {
                            let child = kv.key.rsplit('/').next().unwrap_or_default();
                            return Err(ApiError::Precondition(format!(
                                "VPC {id} still has {what} (e.g. {child}); delete them first (DependencyViolation)"
                            )));
                        }
                    }
                    for kv in tx.keys(&child_prefix(&acct, &id, kind::SG), 0).await? {
                        let sg = kv.key.rsplit('/').next().unwrap_or_default();
                        if sg != v.default_sg {
                            return Err(ApiError::Precondition(format!(
                                "VPC {id} still has security group {sg}; delete it first (DependencyViolation)"
                            )));
                        }
                    }
                    for kv in tx.keys(&child_prefix(&acct, &id, kind::ACL), 0).await? {
                        let acl = kv.key.rsplit('/').next().unwrap_or_default();
                        if acl != v.default_acl {
                            return Err(ApiError::Precondition(format!(
                                "VPC {id} still has network ACL {acl}; delete it first (DependencyViolation)"
                            )));
                        }
                    }
                    tx.delete(kind::VPC, &id);
                    tx.delete(kind::SG, &v.default_sg);
                    tx.delete(kind::ACL, &v.default_acl);
                    tx.delete_raw(child_key(&acct, &id, kind::SG, &v.default_sg));
                    tx.delete_raw(child_key(&acct, &id, kind::ACL, &v.default_acl));
                    tx.delete_raw(sg_name_key(&acct, &id, "default"));
                    tx.delete_raw(vni_key(v.vni));
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteVpcResponse {}, rev))
    }

    async fn create_subnet(
        &self,
        account: String,
        req: pb::CreateSubnetRequest,
    ) -> ApiResult<Response<pb::CreateSubnetResponse>> {
        let vpc_id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
        let cidr = validate::cidr("cidr_block", &req.cidr_block)?;
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.subnets_per_vpc;
        let (s, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token, vpc_id) =
                    (&req, tags.clone(), token.clone(), vpc_id.clone());
                async move {
                    let id = ids::new_id(kind::SUBNET);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::SUBNET,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let s: SubnetRec = tx.must(kind::SUBNET, "subnet", &existing[0]).await?;
                        return Ok((tx, s));
                    }
                    let vpc: VpcRec = tx.must(kind::VPC, "VPC", &vpc_id).await?;
                    if !(vpc.cidr.contains(cidr.network()) && vpc.cidr.prefix() <= cidr.prefix()) {
                        return Err(ApiError::invalid(
                            "cidr_block",
                            format!("{cidr} is not inside VPC {vpc_id}'s CIDR {}", vpc.cidr),
                        ));
                    }
                    let acct = tx.account().to_owned();
                    let siblings = tx
                        .keys(&child_prefix(&acct, &vpc_id, kind::SUBNET), 0)
                        .await?;
                    if siblings.len() >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "VPC {vpc_id} has {} subnets; the quota is {quota}",
                            siblings.len()
                        )));
                    }
                    for kv in &siblings {
                        let sid = kv.key.rsplit('/').next().unwrap_or_default();
                        let other: SubnetRec = tx.must(kind::SUBNET, "subnet", sid).await?;
                        if validate::overlaps(other.cidr, cidr) {
                            return Err(ApiError::invalid(
                                "cidr_block",
                                format!(
                                    "{cidr} overlaps subnet {sid} ({}) (InvalidSubnet.Conflict)",
                                    other.cidr
                                ),
                            ));
                        }
                    }
                    let s = SubnetRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct.clone(),
                            tags,
                            created_ms: now_ms(),
                        },
                        vpc: vpc_id.clone(),
                        cidr,
                        network_acl: vpc.default_acl.clone(),
                    };
                    tx.put(kind::SUBNET, &id, &s)?;
                    tx.put_raw(child_key(&acct, &vpc_id, kind::SUBNET, &id), Vec::new());
                    Ok((tx, s))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateSubnetResponse {
                subnet: Some(pb_subnet(&s, 0)),
            },
            rev,
        ))
    }

    async fn delete_subnet(
        &self,
        account: String,
        req: pb::DeleteSubnetRequest,
    ) -> ApiResult<Response<pb::DeleteSubnetResponse>> {
        let id = validate::id("subnet_id", kind::SUBNET, &req.subnet_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let s: SubnetRec = tx.must(kind::SUBNET, "subnet", &id).await?;
                    let acct = tx.account().to_owned();
                    for (k, what) in [(kind::INSTANCE, "instances"), (kind::LB, "load balancers")] {
                        if let Some(kv) = tx.keys(&child_prefix(&acct, &id, k), 1).await?.first() {
                            let child = kv.key.rsplit('/').next().unwrap_or_default();
                            return Err(ApiError::Precondition(format!(
                                "subnet {id} still has {what} (e.g. {child}) (DependencyViolation)"
                            )));
                        }
                    }
                    // Leftover holds (none expected once instances and LBs are gone).
                    for kv in tx.keys(&ip_prefix(&id), 0).await? {
                        tx.delete_raw(kv.key);
                    }
                    tx.delete(kind::SUBNET, &id);
                    tx.delete_raw(child_key(&acct, &s.vpc, kind::SUBNET, &id));
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteSubnetResponse {}, rev))
    }

    async fn subnet_view(&self, tx: &super::tx::Tx, s: &SubnetRec) -> ApiResult<pb::Subnet> {
        let held = tx.keys(&ip_prefix(&s.meta.id), 0).await?.len();
        Ok(pb_subnet(s, held))
    }
}

#[tonic::async_trait]
impl VpcService for Network {
    async fn create_vpc(
        &self,
        r: Request<pb::CreateVpcRequest>,
    ) -> Result<Response<pb::CreateVpcResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Network::create_vpc(self, account, r.into_inner()).await?)
    }

    async fn describe_vpcs(
        &self,
        r: Request<pb::DescribeVpcsRequest>,
    ) -> Result<Response<pb::DescribeVpcsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (vpcs, next_token) = if req.vpc_ids.is_empty() {
            list_page::<VpcRec>(&tx, kind::VPC, None, req.page.as_ref()).await?
        } else {
            (
                by_ids(&tx, kind::VPC, "VPC", "vpc_ids", &req.vpc_ids).await?,
                String::new(),
            )
        };
        Ok(Response::new(pb::DescribeVpcsResponse {
            vpcs: vpcs.iter().map(pb_vpc).collect(),
            next_token,
        }))
    }

    async fn delete_vpc(
        &self,
        r: Request<pb::DeleteVpcRequest>,
    ) -> Result<Response<pb::DeleteVpcResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Network::delete_vpc(self, account, r.into_inner()).await?)
    }

    async fn create_subnet(
        &self,
        r: Request<pb::CreateSubnetRequest>,
    ) -> Result<Response<pb::CreateSubnetResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Network::create_subnet(self, account, r.into_inner()).await?)
    }

    async fn describe_subnets(
        &self,
        r: Request<pb::DescribeSubnetsRequest>,
    ) -> Result<Response<pb::DescribeSubnetsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (subnets, next_token) = if !req.subnet_ids.is_empty() {
            (
                by_ids::<SubnetRec>(&tx, kind::SUBNET, "subnet", "subnet_ids", &req.subnet_ids)
                    .await?,
                String::new(),
            )
        } else if !req.vpc_id.is_empty() {
            let vpc = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
            tx.must::<VpcRec>(kind::VPC, "VPC", &vpc).await?;
            list_page(&tx, kind::SUBNET, Some(&vpc), req.page.as_ref()).await?
        } else {
            list_page(&tx, kind::SUBNET, None, req.page.as_ref()).await?
        };
        let mut out = Vec::with_capacity(subnets.len());
        for s in &subnets {
            out.push(self.subnet_view(&tx, s).await?);
        }
        Ok(Response::new(pb::DescribeSubnetsResponse {
            subnets: out,
            next_token,
        }))
    }

    async fn delete_subnet(
        &self,
        r: Request<pb::DeleteSubnetRequest>,
    ) -> Result<Response<pb::DeleteSubnetResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Network::delete_subnet(self, account, r.into_inner()).await?)
    }

    async fn describe_route_tables(
        &self,
        r: Request<pb::DescribeRouteTablesRequest>,
    ) -> Result<Response<pb::DescribeRouteTablesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        // One main route table per VPC, derived from the VPC (local route only).
        let (vpcs, next_token): (Vec<VpcRec>, String) = if !req.vpc_id.is_empty() {
            let vpc = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
            (vec![tx.must(kind::VPC, "VPC", &vpc).await?], String::new())
        } else if !req.route_table_ids.is_empty() {
            let all: Vec<VpcRec> = tx.all(kind::VPC).await?;
            let mut out = Vec::new();
            for (i, id) in req.route_table_ids.iter().enumerate() {
                let id = validate::id(&format!("route_table_ids[{i}]"), kind::RTB, id)?;
                out.push(
                    all.iter()
                        .find(|v| v.main_rtb == id)
                        .cloned()
                        .ok_or_else(|| ApiError::not_found("route table", id))?,
                );
            }
            (out, String::new())
        } else {
            list_page(&tx, kind::VPC, None, req.page.as_ref()).await?
        };
        let mut tables = Vec::new();
        for v in &vpcs {
            let subnet_ids = tx
                .keys(&child_prefix(&account, &v.meta.id, kind::SUBNET), 0)
                .await?
                .iter()
                .map(|kv| kv.key.rsplit('/').next().unwrap_or_default().to_owned())
                .collect();
            tables.push(pb::RouteTable {
                route_table_id: v.main_rtb.clone(),
                vpc_id: v.meta.id.clone(),
                main: true,
                routes: vec![pb::Route {
                    destination_cidr_block: v.cidr.to_string(),
                    gateway_id: "local".into(),
                    state: "active".into(),
                }],
                subnet_ids,
                owner_id: v.meta.account.clone(),
            });
        }
        Ok(Response::new(pb::DescribeRouteTablesResponse {
            route_tables: tables,
            next_token,
        }))
    }
}
