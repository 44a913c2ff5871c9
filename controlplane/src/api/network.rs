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
        conntrack_share_percent: v.ct_share.map(u32::from).unwrap_or(0),
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
        let ct_share = validate::ct_share("conntrack_share_percent", req.conntrack_share_percent)?;
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
                        ct_share,
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

    async fn modify_vpc_attribute(
        &self,
        account: String,
        req: pb::ModifyVpcAttributeRequest,
    ) -> ApiResult<Response<pb::ModifyVpcAttributeResponse>> {
        let id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
        let ct_share = req
            .conntrack_share_percent
            .map(|p| validate::ct_share("conntrack_share_percent", p))
            .transpose()?;
        let (vpc, rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let mut v: VpcRec = tx.must(kind::VPC, "VPC", &id).await?;
                    if let Some(share) = ct_share {
                        v.ct_share = share;
                    }
                    tx.put(kind::VPC, &id, &v)?;
                    Ok((tx, v))
                }
            })
            .await?;
        Ok(respond(
            pb::ModifyVpcAttributeResponse {
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
                    super::flowlogs::delete_of_resource(&mut tx, &id).await?;
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
                    super::flowlogs::delete_of_resource(&mut tx, &id).await?;
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

    async fn modify_vpc_attribute(
        &self,
        r: Request<pb::ModifyVpcAttributeRequest>,
    ) -> Result<Response<pb::ModifyVpcAttributeResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(Network::modify_vpc_attribute(self, account, r.into_inner()).await?)
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

#[cfg(test)]
mod tests {
    //! VpcService validation tables: CIDRs, quotas, containment and overlap, ids, tenancy,
    //! dependencies, route tables, client tokens, paging and the revision header.

    use crate::api::test_support::*;

    use std::time::Duration;

    use tonic::{Code, Request, Response};

    use vpc_proto::v1::{
        self as pb, host_service_server::HostService as _,
        instance_service_server::InstanceService as _, vpc_service_server::VpcService,
    };

    use super::Network;
    use crate::api::{Api, Quotas, compute::Instances, host::Hosts};

    struct Env {
        api: Api,
        net: Network,
    }

    async fn env_with(quotas: Quotas) -> Env {
        let api = test_api(quotas).await;
        Env {
            net: Network::new(api.clone()),
            api,
        }
    }

    async fn env() -> Env {
        env_with(Quotas::default()).await
    }

    fn more_vpcs(n: usize) -> Quotas {
        Quotas {
            vpcs_per_account: n,
            ..Quotas::default()
        }
    }

    impl Env {
        async fn create_vpc(
            &self,
            token: &str,
            cidr: &str,
        ) -> Result<Response<pb::CreateVpcResponse>, tonic::Status> {
            let r = pb::CreateVpcRequest {
                cidr_block: cidr.into(),
                ..Default::default()
            };
            VpcService::create_vpc(&self.net, req(token, r)).await
        }

        async fn vpc(&self, token: &str, cidr: &str) -> pb::Vpc {
            self.create_vpc(token, cidr)
                .await
                .unwrap()
                .into_inner()
                .vpc
                .unwrap()
        }

        async fn create_subnet(
            &self,
            token: &str,
            vpc: &str,
            cidr: &str,
        ) -> Result<pb::Subnet, tonic::Status> {
            let r = pb::CreateSubnetRequest {
                vpc_id: vpc.into(),
                cidr_block: cidr.into(),
                ..Default::default()
            };
            Ok(VpcService::create_subnet(&self.net, req(token, r))
                .await?
                .into_inner()
                .subnet
                .unwrap())
        }

        async fn describe_vpcs(
            &self,
            token: &str,
            ids: &[&str],
            page: Option<pb::Page>,
        ) -> Result<pb::DescribeVpcsResponse, tonic::Status> {
            let r = pb::DescribeVpcsRequest {
                vpc_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                page,
            };
            Ok(self.net.describe_vpcs(req(token, r)).await?.into_inner())
        }

        async fn delete_vpc(&self, token: &str, id: &str) -> Result<i64, tonic::Status> {
            let r = pb::DeleteVpcRequest { vpc_id: id.into() };
            Ok(revision(
                &VpcService::delete_vpc(&self.net, req(token, r)).await?,
            ))
        }

        async fn delete_subnet(&self, token: &str, id: &str) -> Result<i64, tonic::Status> {
            let r = pb::DeleteSubnetRequest {
                subnet_id: id.into(),
            };
            Ok(revision(
                &VpcService::delete_subnet(&self.net, req(token, r)).await?,
            ))
        }

        async fn route_tables(
            &self,
            token: &str,
            r: pb::DescribeRouteTablesRequest,
        ) -> Result<Vec<pb::RouteTable>, tonic::Status> {
            Ok(self
                .net
                .describe_route_tables(req(token, r))
                .await?
                .into_inner()
                .route_tables)
        }
    }

    #[tokio::test]
    async fn conntrack_share_is_set_at_create_modified_and_tenant_scoped() {
        let e = env().await;
        let create = |share| pb::CreateVpcRequest {
            cidr_block: "10.0.0.0/16".into(),
            conntrack_share_percent: share,
            ..Default::default()
        };
        check(
            "over 100",
            VpcService::create_vpc(&e.net, req(TOKEN, create(101))).await,
            Code::InvalidArgument,
            "conntrack_share_percent",
        );
        let v = VpcService::create_vpc(&e.net, req(TOKEN, create(10)))
            .await
            .unwrap()
            .into_inner()
            .vpc
            .unwrap();
        assert_eq!(v.conntrack_share_percent, 10);
        let modify = |id: &str, share| pb::ModifyVpcAttributeRequest {
            vpc_id: id.into(),
            conntrack_share_percent: share,
        };
        let m = |token, r| VpcService::modify_vpc_attribute(&e.net, req(token, r));
        // Unset: unchanged; 0: back to the agents' default.
        let same = m(TOKEN, modify(&v.vpc_id, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(same.vpc.unwrap().conntrack_share_percent, 10);
        let v2 = m(TOKEN, modify(&v.vpc_id, Some(25)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v2.vpc.unwrap().conntrack_share_percent, 25);
        check(
            "over 100",
            m(TOKEN, modify(&v.vpc_id, Some(200))).await,
            Code::InvalidArgument,
            "conntrack_share_percent",
        );
        check(
            "another account's VPC",
            m(OTHER_TOKEN, modify(&v.vpc_id, Some(50))).await,
            Code::NotFound,
            "",
        );
        let d = e.describe_vpcs(TOKEN, &[&v.vpc_id], None).await.unwrap();
        assert_eq!(d.vpcs[0].conntrack_share_percent, 25);
        let reset = m(TOKEN, modify(&v.vpc_id, Some(0)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reset.vpc.unwrap().conntrack_share_percent, 0);
    }

    #[tokio::test]
    async fn vpc_cidr_table() {
        let e = env_with(more_vpcs(100)).await;
        for good in [
            "10.0.0.0/16",
            "10.1.0.0/28",
            "172.16.0.0/20",
            "192.168.0.0/24",
            " 10.2.0.0/16 ",
        ] {
            let v = e
                .create_vpc(TOKEN, good)
                .await
                .unwrap_or_else(|s| panic!("{good}: {s:?}"))
                .into_inner()
                .vpc
                .unwrap();
            assert_eq!(v.cidr_block, good.trim(), "{good}");
            assert_eq!(v.state, "available");
            assert_eq!(v.owner_id, ACCT);
            assert!(v.vpc_id.starts_with("vpc-") && v.vpc_id.len() == 21);
            assert!(v.vni > 0);
            assert!(v.default_security_group_id.starts_with("sg-"));
            assert!(v.default_network_acl_id.starts_with("acl-"));
            assert!(v.main_route_table_id.starts_with("rtb-"));
        }
        for (case, bad) in [
            ("too big", "10.0.0.0/15"),
            ("much too big", "0.0.0.0/0"),
            ("too small", "10.0.0.0/29"),
            ("a host", "10.0.0.0/32"),
            ("host bits", "10.0.0.1/16"),
            ("host bits, small", "10.0.0.17/28"),
            ("garbage", "garbage"),
            ("missing prefix", "10.0.0.0"),
            ("prefix out of range", "10.0.0.0/33"),
            ("octet out of range", "10.0.0.256/24"),
            ("IPv6", "fd00::/16"),
            ("empty", ""),
            ("blank", "   "),
        ] {
            check(
                case,
                e.create_vpc(TOKEN, bad).await,
                Code::InvalidArgument,
                "cidr_block",
            );
        }
        // Nothing was created by the failures.
        assert_eq!(
            e.describe_vpcs(TOKEN, &[], None).await.unwrap().vpcs.len(),
            5
        );
    }

    #[tokio::test]
    async fn vpc_quota_and_same_cidr_in_two_vpcs() {
        let e = env().await;
        // Two VPCs may use the same CIDR.
        for _ in 0..5 {
            e.vpc(TOKEN, "10.0.0.0/16").await;
        }
        check(
            "sixth VPC",
            e.create_vpc(TOKEN, "10.0.0.0/16").await,
            Code::ResourceExhausted,
            "quota",
        );
        // The quota is per account.
        e.vpc(OTHER_TOKEN, "10.0.0.0/16").await;
        // Deleting one frees a slot.
        let first = e.describe_vpcs(TOKEN, &[], None).await.unwrap().vpcs[0].clone();
        e.delete_vpc(TOKEN, &first.vpc_id).await.unwrap();
        e.vpc(TOKEN, "10.0.0.0/16").await;
        // VNIs are unique across the account's and other accounts' VPCs.
        let mut vnis: Vec<u32> = e
            .describe_vpcs(TOKEN, &[], None)
            .await
            .unwrap()
            .vpcs
            .iter()
            .chain(
                e.describe_vpcs(OTHER_TOKEN, &[], None)
                    .await
                    .unwrap()
                    .vpcs
                    .iter(),
            )
            .map(|v| v.vni)
            .collect();
        vnis.sort_unstable();
        vnis.dedup();
        assert_eq!(vnis.len(), 6);
    }

    #[tokio::test]
    async fn subnet_table() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let other_vpc = e.vpc(OTHER_TOKEN, "10.0.0.0/16").await;
        let s = e
            .create_subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24")
            .await
            .unwrap();
        assert_eq!(s.vpc_id, vpc.vpc_id);
        assert_eq!(s.cidr_block, "10.0.1.0/24");
        assert_eq!(s.available_ip_address_count, 251);
        assert_eq!(s.network_acl_id, vpc.default_network_acl_id);
        assert_eq!(s.owner_id, ACCT);
        // The whole VPC range and the smallest subnet are fine too (in another VPC).
        let vpc2 = e.vpc(TOKEN, "10.1.0.0/16").await;
        let whole = e
            .create_subnet(TOKEN, &vpc2.vpc_id, "10.1.0.0/16")
            .await
            .unwrap();
        assert_eq!(whole.available_ip_address_count, 65531);
        let tiny = e
            .create_subnet(TOKEN, &vpc.vpc_id, "10.0.2.0/28")
            .await
            .unwrap();
        assert_eq!(tiny.available_ip_address_count, 11);
        let unknown_vpc = "vpc-0123456789abcdef0";
        for (case, vpc_id, cidr, code, field) in [
            (
                "outside",
                vpc.vpc_id.as_str(),
                "10.1.0.0/24",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "straddles",
                vpc.vpc_id.as_str(),
                "9.255.255.240/28",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "bigger than the VPC",
                vpc.vpc_id.as_str(),
                "10.0.0.0/16",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "same as a sibling",
                vpc.vpc_id.as_str(),
                "10.0.1.0/24",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "inside a sibling",
                vpc.vpc_id.as_str(),
                "10.0.1.128/25",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "covers a sibling",
                vpc.vpc_id.as_str(),
                "10.0.0.0/22",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "covers the tiny one",
                vpc.vpc_id.as_str(),
                "10.0.2.0/27",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "too small",
                vpc.vpc_id.as_str(),
                "10.0.3.0/29",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "host bits",
                vpc.vpc_id.as_str(),
                "10.0.3.1/24",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "garbage",
                vpc.vpc_id.as_str(),
                "garbage",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "missing prefix",
                vpc.vpc_id.as_str(),
                "10.0.3.0",
                Code::InvalidArgument,
                "cidr_block",
            ),
            (
                "unknown VPC",
                unknown_vpc,
                "10.0.3.0/24",
                Code::NotFound,
                unknown_vpc,
            ),
            (
                "other account's VPC",
                other_vpc.vpc_id.as_str(),
                "10.0.3.0/24",
                Code::NotFound,
                other_vpc.vpc_id.as_str(),
            ),
            (
                "bad id",
                "vpc-123",
                "10.0.3.0/24",
                Code::InvalidArgument,
                "vpc_id",
            ),
            (
                "wrong kind of id",
                s.subnet_id.as_str(),
                "10.0.3.0/24",
                Code::InvalidArgument,
                "vpc_id",
            ),
            (
                "upper-case id",
                "VPC-0123456789ABCDEF0",
                "10.0.3.0/24",
                Code::InvalidArgument,
                "vpc_id",
            ),
            ("no id", "", "10.0.3.0/24", Code::InvalidArgument, "vpc_id"),
        ] {
            check(
                case,
                e.create_subnet(TOKEN, vpc_id, cidr).await,
                code,
                field,
            );
        }
        // Adjacent subnets do not overlap.
        e.create_subnet(TOKEN, &vpc.vpc_id, "10.0.0.0/24")
            .await
            .unwrap();
        e.create_subnet(TOKEN, &vpc.vpc_id, "10.0.2.16/28")
            .await
            .unwrap();
        // Subnets of different VPCs (and accounts) may overlap.
        e.create_subnet(OTHER_TOKEN, &other_vpc.vpc_id, "10.0.1.0/24")
            .await
            .unwrap();
        let list = e
            .net
            .describe_subnets(req(
                TOKEN,
                pb::DescribeSubnetsRequest {
                    vpc_id: vpc.vpc_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .subnets;
        assert_eq!(list.len(), 4);
        // The other account sees only its own subnet.
        let theirs = e
            .net
            .describe_subnets(req(OTHER_TOKEN, pb::DescribeSubnetsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .subnets;
        assert_eq!(theirs.len(), 1);
        check(
            "describe another account's subnet",
            e.net
                .describe_subnets(req(
                    OTHER_TOKEN,
                    pb::DescribeSubnetsRequest {
                        subnet_ids: vec![s.subnet_id.clone()],
                        ..Default::default()
                    },
                ))
                .await,
            Code::NotFound,
            &s.subnet_id,
        );
        check(
            "subnets of another account's VPC",
            e.net
                .describe_subnets(req(
                    OTHER_TOKEN,
                    pb::DescribeSubnetsRequest {
                        vpc_id: vpc.vpc_id.clone(),
                        ..Default::default()
                    },
                ))
                .await,
            Code::NotFound,
            &vpc.vpc_id,
        );
        check(
            "subnet quota",
            {
                let e = env_with(Quotas {
                    subnets_per_vpc: 1,
                    ..Quotas::default()
                })
                .await;
                let v = e.vpc(TOKEN, "10.0.0.0/16").await;
                e.create_subnet(TOKEN, &v.vpc_id, "10.0.0.0/24")
                    .await
                    .unwrap();
                e.create_subnet(TOKEN, &v.vpc_id, "10.0.1.0/24").await
            },
            Code::ResourceExhausted,
            "quota",
        );
    }

    #[tokio::test]
    async fn ids_and_tenancy() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let got = e.describe_vpcs(TOKEN, &[&vpc.vpc_id], None).await.unwrap();
        assert_eq!(got.vpcs, vec![vpc.clone()]);
        for (case, id, code, field) in [
            ("bad id", "vpc-xyz", Code::InvalidArgument, "vpc_ids[0]"),
            (
                "subnet id",
                "subnet-0123456789abcdef0",
                Code::InvalidArgument,
                "vpc_ids[0]",
            ),
            (
                "unknown",
                "vpc-0123456789abcdef0",
                Code::NotFound,
                "vpc-0123456789abcdef0",
            ),
        ] {
            check(case, e.describe_vpcs(TOKEN, &[id], None).await, code, field);
        }
        check(
            "one of two unknown",
            e.describe_vpcs(TOKEN, &[&vpc.vpc_id, "vpc-0123456789abcdef0"], None)
                .await,
            Code::NotFound,
            "vpc-0123456789abcdef0",
        );
        // The other account sees nothing of it.
        check(
            "describe other's",
            e.describe_vpcs(OTHER_TOKEN, &[&vpc.vpc_id], None).await,
            Code::NotFound,
            &vpc.vpc_id,
        );
        assert!(
            e.describe_vpcs(OTHER_TOKEN, &[], None)
                .await
                .unwrap()
                .vpcs
                .is_empty()
        );
        check(
            "delete other's",
            e.delete_vpc(OTHER_TOKEN, &vpc.vpc_id).await,
            Code::NotFound,
            &vpc.vpc_id,
        );
        check(
            "delete bad id",
            e.delete_vpc(TOKEN, "vpc-1").await,
            Code::InvalidArgument,
            "vpc_id",
        );
        check(
            "delete subnet bad id",
            e.delete_subnet(TOKEN, "subnet-").await,
            Code::InvalidArgument,
            "subnet_id",
        );
        check(
            "no token",
            e.net
                .describe_vpcs(Request::new(pb::DescribeVpcsRequest::default()))
                .await,
            Code::Unauthenticated,
            "",
        );
        check(
            "unknown token",
            e.describe_vpcs("no-such-token-0123456789", &[], None).await,
            Code::Unauthenticated,
            "",
        );
        check(
            "agent token",
            e.describe_vpcs(AGENT, &[], None).await,
            Code::Unauthenticated,
            "",
        );
    }

    async fn register_host(api: &Api, id: &str, vtep: &str) {
        let hosts = Hosts::new(api.clone());
        let r = hosts
            .register_host(req(
                AGENT,
                pb::RegisterHostRequest {
                    host_id: id.into(),
                    underlay_ip: vtep.into(),
                },
            ))
            .await
            .unwrap();
        let rev = revision(&r);
        let mut d = api.desired.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            d.wait_for(|d| d.revision >= rev && d.hosts.iter().any(|h| h.id == id)),
        )
        .await
        .expect("the desired state shows the host within 10 s")
        .unwrap();
    }

    #[tokio::test]
    async fn delete_dependencies() {
        let e = env().await;
        register_host(&e.api, "host-0", "192.168.77.1").await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e
            .create_subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24")
            .await
            .unwrap();
        check(
            "VPC with a subnet",
            e.delete_vpc(TOKEN, &vpc.vpc_id).await,
            Code::FailedPrecondition,
            &s.subnet_id,
        );
        let inst = Instances::new(e.api.clone());
        let i = inst
            .run_instances(req(
                TOKEN,
                pb::RunInstancesRequest {
                    subnet_id: s.subnet_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .instances
            .remove(0);
        check(
            "subnet with an instance",
            e.delete_subnet(TOKEN, &s.subnet_id).await,
            Code::FailedPrecondition,
            &i.instance_id,
        );
        inst.terminate_instances(req(
            TOKEN,
            pb::TerminateInstancesRequest {
                instance_ids: vec![i.instance_id.clone()],
            },
        ))
        .await
        .unwrap();
        let r1 = e.delete_subnet(TOKEN, &s.subnet_id).await.unwrap();
        check(
            "subnet twice",
            e.delete_subnet(TOKEN, &s.subnet_id).await,
            Code::NotFound,
            &s.subnet_id,
        );
        let r2 = e.delete_vpc(TOKEN, &vpc.vpc_id).await.unwrap();
        assert!(r2 > r1, "revisions increase: {r1} then {r2}");
        check(
            "VPC twice",
            e.delete_vpc(TOKEN, &vpc.vpc_id).await,
            Code::NotFound,
            &vpc.vpc_id,
        );
        check(
            "describe deleted",
            e.describe_vpcs(TOKEN, &[&vpc.vpc_id], None).await,
            Code::NotFound,
            &vpc.vpc_id,
        );
        // Its default group and ACL went with it, and the account is empty again.
        assert!(
            e.describe_vpcs(TOKEN, &[], None)
                .await
                .unwrap()
                .vpcs
                .is_empty()
        );
        let keys = e
            .api
            .store
            .range(&format!("/r/{ACCT}/"), None, 0)
            .await
            .unwrap();
        let left: Vec<&str> = keys.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert!(
            left.iter()
                .all(|k| !k.contains("/sg/") && !k.contains("/acl/")),
            "left behind: {left:?}"
        );
    }

    #[tokio::test]
    async fn route_tables() {
        let e = env().await;
        let a = e.vpc(TOKEN, "10.0.0.0/16").await;
        let b = e.vpc(TOKEN, "10.1.0.0/20").await;
        let s1 = e
            .create_subnet(TOKEN, &a.vpc_id, "10.0.1.0/24")
            .await
            .unwrap();
        let s2 = e
            .create_subnet(TOKEN, &a.vpc_id, "10.0.2.0/24")
            .await
            .unwrap();
        let all = e
            .route_tables(TOKEN, pb::DescribeRouteTablesRequest::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "one main table per VPC: {all:?}");
        for (vpc, subnets) in [(&a, vec![&s1, &s2]), (&b, vec![])] {
            let t = all.iter().find(|t| t.vpc_id == vpc.vpc_id).unwrap();
            assert_eq!(t.route_table_id, vpc.main_route_table_id);
            assert!(t.main);
            assert_eq!(t.owner_id, ACCT);
            assert_eq!(
                t.routes,
                vec![pb::Route {
                    destination_cidr_block: vpc.cidr_block.clone(),
                    gateway_id: "local".into(),
                    state: "active".into(),
                }]
            );
            let mut want: Vec<String> = subnets.iter().map(|s| s.subnet_id.clone()).collect();
            want.sort();
            let mut got = t.subnet_ids.clone();
            got.sort();
            assert_eq!(got, want);
        }
        let by_vpc = e
            .route_tables(
                TOKEN,
                pb::DescribeRouteTablesRequest {
                    vpc_id: b.vpc_id.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(by_vpc.len(), 1);
        assert_eq!(by_vpc[0].route_table_id, b.main_route_table_id);
        let by_id = e
            .route_tables(
                TOKEN,
                pb::DescribeRouteTablesRequest {
                    route_table_ids: vec![a.main_route_table_id.clone()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(by_id.len(), 1);
        assert_eq!(by_id[0].vpc_id, a.vpc_id);
        for (case, r, code, field) in [
            (
                "unknown table",
                pb::DescribeRouteTablesRequest {
                    route_table_ids: vec!["rtb-0123456789abcdef0".into()],
                    ..Default::default()
                },
                Code::NotFound,
                "rtb-0123456789abcdef0",
            ),
            (
                "bad table id",
                pb::DescribeRouteTablesRequest {
                    route_table_ids: vec![a.main_route_table_id.clone(), "rtb-1".into()],
                    ..Default::default()
                },
                Code::InvalidArgument,
                "route_table_ids[1]",
            ),
            (
                "bad VPC id",
                pb::DescribeRouteTablesRequest {
                    vpc_id: "vpc-1".into(),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "vpc_id",
            ),
        ] {
            check(case, e.route_tables(TOKEN, r).await, code, field);
        }
        // Another account sees none of them.
        assert!(
            e.route_tables(OTHER_TOKEN, pb::DescribeRouteTablesRequest::default())
                .await
                .unwrap()
                .is_empty()
        );
        for r in [
            pb::DescribeRouteTablesRequest {
                vpc_id: a.vpc_id.clone(),
                ..Default::default()
            },
            pb::DescribeRouteTablesRequest {
                route_table_ids: vec![a.main_route_table_id.clone()],
                ..Default::default()
            },
        ] {
            check(
                "other account",
                e.route_tables(OTHER_TOKEN, r).await,
                Code::NotFound,
                "",
            );
        }
    }

    #[tokio::test]
    async fn client_tokens() {
        let e = env().await;
        let create = |cidr: &str, token: &str, tags: Vec<pb::Tag>| pb::CreateVpcRequest {
            cidr_block: cidr.into(),
            tags,
            client_token: token.into(),
            ..Default::default()
        };
        let first =
            VpcService::create_vpc(&e.net, req(TOKEN, create("10.0.0.0/16", "tok-1", vec![])))
                .await
                .unwrap();
        let rev1 = revision(&first);
        let first = first.into_inner().vpc.unwrap();
        let again =
            VpcService::create_vpc(&e.net, req(TOKEN, create("10.0.0.0/16", "tok-1", vec![])))
                .await
                .unwrap();
        assert!(revision(&again) >= rev1);
        assert_eq!(
            again.into_inner().vpc.unwrap(),
            first,
            "same token: same VPC"
        );
        assert_eq!(
            e.describe_vpcs(TOKEN, &[], None).await.unwrap().vpcs.len(),
            1
        );
        for (case, r) in [
            ("other CIDR", create("10.1.0.0/16", "tok-1", vec![])),
            (
                "other tags",
                create(
                    "10.0.0.0/16",
                    "tok-1",
                    vec![pb::Tag {
                        key: "Name".into(),
                        value: "x".into(),
                    }],
                ),
            ),
        ] {
            check(
                case,
                VpcService::create_vpc(&e.net, req(TOKEN, r)).await,
                Code::AlreadyExists,
                "tok-1",
            );
        }
        // Tokens are per account and per kind.
        let theirs = VpcService::create_vpc(
            &e.net,
            req(OTHER_TOKEN, create("10.0.0.0/16", "tok-1", vec![])),
        )
        .await
        .unwrap()
        .into_inner()
        .vpc
        .unwrap();
        assert_ne!(theirs.vpc_id, first.vpc_id);
        let sub = |cidr: &str| pb::CreateSubnetRequest {
            vpc_id: first.vpc_id.clone(),
            cidr_block: cidr.into(),
            client_token: "tok-1".into(),
            ..Default::default()
        };
        let s1 = VpcService::create_subnet(&e.net, req(TOKEN, sub("10.0.1.0/24")))
            .await
            .unwrap();
        let s1 = s1.into_inner().subnet.unwrap();
        let s2 = VpcService::create_subnet(&e.net, req(TOKEN, sub("10.0.1.0/24")))
            .await
            .unwrap();
        assert_eq!(s2.into_inner().subnet.unwrap().subnet_id, s1.subnet_id);
        check(
            "subnet token, other CIDR",
            VpcService::create_subnet(&e.net, req(TOKEN, sub("10.0.2.0/24"))).await,
            Code::AlreadyExists,
            "tok-1",
        );
        for (case, token) in [
            ("slash", "a/b".to_owned()),
            ("too long", "x".repeat(65)),
            ("not ASCII", "tök".to_owned()),
        ] {
            check(
                case,
                VpcService::create_vpc(&e.net, req(TOKEN, create("10.0.0.0/16", &token, vec![])))
                    .await,
                Code::InvalidArgument,
                "client_token",
            );
        }
        // The longest token is fine.
        VpcService::create_vpc(
            &e.net,
            req(TOKEN, create("10.0.0.0/16", &"x".repeat(64), vec![])),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn pagination() {
        let e = env_with(more_vpcs(10)).await;
        let mut created = Vec::new();
        for i in 0..7 {
            created.push(e.vpc(TOKEN, &format!("10.{i}.0.0/16")).await.vpc_id);
        }
        let first = created[0].clone();
        created.sort();
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let r = e
                .describe_vpcs(
                    TOKEN,
                    &[],
                    Some(pb::Page {
                        max_results: 3,
                        next_token: token.clone(),
                    }),
                )
                .await
                .unwrap();
            pages += 1;
            assert!(pages <= 3, "more than 3 pages");
            let sizes = [3, 3, 1];
            assert_eq!(r.vpcs.len(), sizes[pages - 1], "page {pages}");
            seen.extend(r.vpcs.iter().map(|v| v.vpc_id.clone()));
            if r.next_token.is_empty() {
                break;
            }
            // The token chains: it is the last id of this page.
            assert_eq!(&r.next_token, seen.last().unwrap());
            token = r.next_token;
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, created, "every VPC once, in id order");
        // Exactly a page's worth: no empty trailing page.
        let r = e
            .describe_vpcs(
                TOKEN,
                &[],
                Some(pb::Page {
                    max_results: 7,
                    next_token: String::new(),
                }),
            )
            .await
            .unwrap();
        assert_eq!(r.vpcs.len(), 7);
        assert_eq!(r.next_token, "");
        // The default page holds them all; 1000 is allowed.
        assert_eq!(
            e.describe_vpcs(TOKEN, &[], None).await.unwrap().vpcs.len(),
            7
        );
        e.describe_vpcs(
            TOKEN,
            &[],
            Some(pb::Page {
                max_results: 1000,
                next_token: String::new(),
            }),
        )
        .await
        .unwrap();
        for (case, page, field) in [
            (
                "bogus token",
                pb::Page {
                    max_results: 3,
                    next_token: "bogus".into(),
                },
                "page.next_token",
            ),
            (
                "token of another kind",
                pb::Page {
                    max_results: 3,
                    next_token: "subnet-0123456789abcdef0".into(),
                },
                "page.next_token",
            ),
            (
                "1001 results",
                pb::Page {
                    max_results: 1001,
                    next_token: String::new(),
                },
                "page.max_results",
            ),
        ] {
            check(
                case,
                e.describe_vpcs(TOKEN, &[], Some(page)).await,
                Code::InvalidArgument,
                field,
            );
        }
        // Subnets and route tables page the same way.
        let vpc = &first;
        for i in 0..4 {
            e.create_subnet(TOKEN, vpc, &format!("10.0.{i}.0/24"))
                .await
                .unwrap();
        }
        let page = |token: &str| pb::DescribeSubnetsRequest {
            vpc_id: vpc.clone(),
            page: Some(pb::Page {
                max_results: 3,
                next_token: token.into(),
            }),
            ..Default::default()
        };
        let p1 = e
            .net
            .describe_subnets(req(TOKEN, page("")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p1.subnets.len(), 3);
        let p2 = e
            .net
            .describe_subnets(req(TOKEN, page(&p1.next_token)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p2.subnets.len(), 1);
        assert_eq!(p2.next_token, "");
        let rt = e
            .net
            .describe_route_tables(req(
                TOKEN,
                pb::DescribeRouteTablesRequest {
                    page: Some(pb::Page {
                        max_results: 5,
                        next_token: String::new(),
                    }),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rt.route_tables.len(), 5);
        assert!(!rt.next_token.is_empty());
    }

    #[tokio::test]
    async fn writes_carry_increasing_revisions() {
        let e = env().await;
        let r1 = revision(&e.create_vpc(TOKEN, "10.0.0.0/16").await.unwrap());
        let vpc = e
            .describe_vpcs(TOKEN, &[], None)
            .await
            .unwrap()
            .vpcs
            .remove(0);
        let r2 = revision(
            &VpcService::create_subnet(
                &e.net,
                req(
                    TOKEN,
                    pb::CreateSubnetRequest {
                        vpc_id: vpc.vpc_id.clone(),
                        cidr_block: "10.0.1.0/24".into(),
                        ..Default::default()
                    },
                ),
            )
            .await
            .unwrap(),
        );
        let s = e
            .net
            .describe_subnets(req(TOKEN, pb::DescribeSubnetsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .subnets
            .remove(0);
        let r3 = e.delete_subnet(TOKEN, &s.subnet_id).await.unwrap();
        let r4 = e.delete_vpc(TOKEN, &vpc.vpc_id).await.unwrap();
        assert!(
            r1 > 0 && r1 < r2 && r2 < r3 && r3 < r4,
            "{r1} {r2} {r3} {r4}"
        );
        // The desired state catches up with the last write.
        let mut d = e.api.desired.clone();
        tokio::time::timeout(Duration::from_secs(10), d.wait_for(|d| d.revision >= r4))
            .await
            .unwrap()
            .unwrap();
    }
}
