//! `InstanceService` and `VolumeService`.
//!
//! An instance is placed on a registered host, gets a private IPv4 from its subnet (IPAM)
//! and a MAC; the host's agent creates its network namespace and wires it into the VPC. It
//! is `pending` until its host reports a revision at or after the instance's creation, then
//! `running`.

use std::collections::BTreeSet;

use tonic::{Request, Response, Status};
use vpc_proto::v1::{
    self as pb, instance_service_server::InstanceService, volume_service_server::VolumeService,
};

use super::error::{ApiError, ApiResult};
use super::network::pb_tags;
use super::records::{
    InstanceRec, Meta, SgRec, SubnetRec, TgRec, VolumeRec, child_key, kind, now_ms, rec_key,
    rec_prefix,
};
use super::{Api, by_ids, claim_token, ids, ipam, list_page, respond, validate};

/// Instances per RunInstances call.
pub const MAX_COUNT: u32 = 100;

/// The instance service.
#[derive(Clone, Debug)]
pub struct Instances {
    api: Api,
}

impl Instances {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Instances { api }
    }

    /// The namespace prefix agents use (`vpc-agent --netns-prefix`); shown in describe.
    fn view(&self, i: &InstanceRec, create_revision: i64) -> pb::Instance {
        let applied = self
            .api
            .programming
            .hosts()
            .get(&i.host)
            .map_or(0, |h| h.applied);
        let state = if i.state == "pending" && applied >= create_revision && create_revision > 0 {
            "running".to_owned()
        } else {
            i.state.clone()
        };
        pb::Instance {
            instance_id: i.meta.id.clone(),
            subnet_id: i.subnet.clone(),
            vpc_id: i.vpc.clone(),
            private_ip_address: i.ip.to_string(),
            mac_address: i.mac.clone(),
            security_group_ids: i.security_groups.clone(),
            state,
            host_id: i.host.clone(),
            instance_type: i.instance_type.clone(),
            owner_id: i.meta.account.clone(),
            tags: pb_tags(&i.meta.tags),
            netns: format!("{}{}", crate::compute::DEFAULT_NETNS_PREFIX, i.meta.id),
        }
    }

    async fn views(&self, account: &str, list: &[InstanceRec]) -> ApiResult<Vec<pb::Instance>> {
        let mut out = Vec::with_capacity(list.len());
        for i in list {
            let rev = self
                .api
                .store
                .get(&rec_key(account, kind::INSTANCE, &i.meta.id))
                .await?
                .map_or(0, |kv| kv.create_revision);
            out.push(self.view(i, rev));
        }
        Ok(out)
    }

    /// Chooses a host: the one asked for (must be registered) or the registered host with
    /// the fewest instances (ties: lowest id).
    fn place(
        &self,
        wanted: &str,
        planned: &std::collections::BTreeMap<String, usize>,
    ) -> ApiResult<String> {
        let d = self.api.desired.borrow().clone();
        if !wanted.is_empty() {
            return d
                .hosts
                .iter()
                .find(|h| h.id == wanted)
                .map(|h| h.id.clone())
                .ok_or_else(|| {
                    ApiError::invalid("host_id", format!("host {wanted:?} is not registered"))
                });
        }
        d.hosts
            .iter()
            .min_by_key(|h| {
                (
                    d.instances_per_host.get(&h.id).copied().unwrap_or(0)
                        + planned.get(&h.id).copied().unwrap_or(0),
                    h.id.clone(),
                )
            })
            .map(|h| h.id.clone())
            .ok_or_else(|| {
                ApiError::Precondition("no host is registered to run instances on".into())
            })
    }

    async fn run(
        &self,
        account: String,
        req: pb::RunInstancesRequest,
    ) -> ApiResult<Response<pb::RunInstancesResponse>> {
        let subnet_id = validate::id("subnet_id", kind::SUBNET, &req.subnet_id)?;
        let count = match req.count {
            0 => 1,
            n @ 1..=MAX_COUNT => n,
            n => {
                return Err(ApiError::invalid(
                    "count",
                    format!("{n}: expected 1 to {MAX_COUNT}"),
                ));
            }
        };
        let wanted_ip = if req.private_ip_address.is_empty() {
            None
        } else {
            if count != 1 {
                return Err(ApiError::invalid("private_ip_address", "only with count 1"));
            }
            Some(validate::ipv4(
                "private_ip_address",
                &req.private_ip_address,
            )?)
        };
        let mut groups = Vec::new();
        for (i, g) in req.security_group_ids.iter().enumerate() {
            let g = validate::id(&format!("security_group_ids[{i}]"), kind::SG, g)?;
            if groups.contains(&g) {
                return Err(ApiError::invalid(
                    format!("security_group_ids[{i}]"),
                    format!("{g} is listed twice"),
                ));
            }
            groups.push(g);
        }
        let max_groups = self.api.quotas.policy.groups_per_endpoint;
        if groups.len() > max_groups {
            return Err(ApiError::invalid(
                "security_group_ids",
                format!("{} groups; at most {max_groups} per instance", groups.len()),
            ));
        }
        let instance_type = if req.instance_type.is_empty() {
            "t3.micro".to_owned()
        } else {
            validate::name("instance_type", &req.instance_type, 32)?
        };
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.instances_per_account;
        let ((list, _), rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token, groups, subnet_id, instance_type) =
                    (&req, tags.clone(), token.clone(), groups.clone(), subnet_id.clone(), instance_type.clone());
                async move {
                    let new_ids: Vec<String> = (0..count).map(|_| ids::new_id(kind::INSTANCE)).collect();
                    if let Some(existing) = claim_token(&mut tx, kind::INSTANCE, token.as_deref(), req, &new_ids).await? {
                        let mut out = Vec::new();
                        for id in &existing {
                            // Terminated since: AWS still returns the original answer; we
                            // return what is left.
                            if let Some(i) = tx.get::<InstanceRec>(kind::INSTANCE, id).await? {
                                out.push(i);
                            }
                        }
                        return Ok((tx, (out, true)));
                    }
                    let subnet: SubnetRec = tx.must(kind::SUBNET, "subnet", &subnet_id).await?;
                    let groups = if groups.is_empty() {
                        let vpc: super::records::VpcRec = tx.must(kind::VPC, "VPC", &subnet.vpc).await?;
                        vec![vpc.default_sg]
                    } else {
                        for (i, g) in groups.iter().enumerate() {
                            let sg: SgRec = tx.must(kind::SG, "security group", g).await?;
                            if sg.vpc != subnet.vpc {
                                return Err(ApiError::invalid(
                                    format!("security_group_ids[{i}]"),
                                    format!("{g} belongs to {}, the subnet to {}", sg.vpc, subnet.vpc),
                                ));
                            }
                        }
                        groups
                    };
                    let acct = tx.account().to_owned();
                    let have = tx.keys(&rec_prefix(&acct, kind::INSTANCE), 0).await?.len();
                    if have + count as usize > quota {
                        return Err(ApiError::Exhausted(format!(
                            "the account has {have} instances; {count} more exceed the quota of {quota} (InstanceLimitExceeded)"
                        )));
                    }
                    let mut taken = BTreeSet::new();
                    let mut planned = std::collections::BTreeMap::new();
                    let mut out = Vec::new();
                    for id in new_ids {
                        let host = self.place(&req.host_id, &planned)?;
                        *planned.entry(host.clone()).or_insert(0) += 1;
                        let ip = ipam::allocate(
                            &mut tx,
                            &subnet_id,
                            subnet.cidr,
                            &id,
                            wanted_ip.map(|ip| ("private_ip_address", ip)),
                            ipam::From::Bottom,
                            &mut taken,
                        )
                        .await?;
                        let i = InstanceRec {
                            meta: Meta { id: id.clone(), account: acct.clone(), tags: tags.clone(), created_ms: now_ms() },
                            subnet: subnet_id.clone(),
                            vpc: subnet.vpc.clone(),
                            host,
                            ip,
                            mac: ids::instance_mac(&id),
                            security_groups: groups.clone(),
                            state: "pending".into(),
                            instance_type: instance_type.clone(),
                        };
                        tx.put(kind::INSTANCE, &id, &i)?;
                        tx.put_raw(child_key(&acct, &subnet_id, kind::INSTANCE, &id), Vec::new());
                        out.push(i);
                    }
                    Ok((tx, (out, false)))
                }
            })
            .await?;
        let instances = self.views(&account, &list).await?;
        Ok(respond(pb::RunInstancesResponse { instances }, rev))
    }

    async fn terminate(
        &self,
        account: String,
        req: pb::TerminateInstancesRequest,
    ) -> ApiResult<Response<pb::TerminateInstancesResponse>> {
        if req.instance_ids.is_empty() {
            return Err(ApiError::invalid(
                "instance_ids",
                "at least one instance id",
            ));
        }
        let mut wanted = Vec::new();
        for (i, id) in req.instance_ids.iter().enumerate() {
            wanted.push(validate::id(
                &format!("instance_ids[{i}]"),
                kind::INSTANCE,
                id,
            )?);
        }
        let (list, rev) = self
            .api
            .write(&account, |mut tx| {
                let wanted = wanted.clone();
                async move {
                    let acct = tx.account().to_owned();
                    let mut gone = Vec::new();
                    for id in &wanted {
                        let mut i: InstanceRec = tx.must(kind::INSTANCE, "instance", id).await?;
                        tx.delete(kind::INSTANCE, id);
                        tx.delete_raw(child_key(&acct, &i.subnet, kind::INSTANCE, id));
                        ipam::release(&mut tx, &i.subnet, i.ip);
                        i.state = "terminated".into();
                        gone.push(i);
                    }
                    // Deregister from target groups (their flows drain on the hosts).
                    for mut tg in tx.all::<TgRec>(kind::TG).await? {
                        let before = tg.targets.len();
                        tg.targets.retain(|t| !wanted.contains(&t.id));
                        if tg.targets.len() != before {
                            tx.put(kind::TG, &tg.meta.id.clone(), &tg)?;
                        }
                    }
                    Ok((tx, gone))
                }
            })
            .await?;
        let instances = list.iter().map(|i| self.view(i, 0)).collect();
        Ok(respond(pb::TerminateInstancesResponse { instances }, rev))
    }
}

#[tonic::async_trait]
impl InstanceService for Instances {
    async fn run_instances(
        &self,
        r: Request<pb::RunInstancesRequest>,
    ) -> Result<Response<pb::RunInstancesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.run(account, r.into_inner()).await?)
    }

    async fn describe_instances(
        &self,
        r: Request<pb::DescribeInstancesRequest>,
    ) -> Result<Response<pb::DescribeInstancesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (list, next_token) = if !req.instance_ids.is_empty() {
            (
                by_ids::<InstanceRec>(
                    &tx,
                    kind::INSTANCE,
                    "instance",
                    "instance_ids",
                    &req.instance_ids,
                )
                .await?,
                String::new(),
            )
        } else if !req.subnet_id.is_empty() {
            let s = validate::id("subnet_id", kind::SUBNET, &req.subnet_id)?;
            tx.must::<SubnetRec>(kind::SUBNET, "subnet", &s).await?;
            list_page(&tx, kind::INSTANCE, Some(&s), req.page.as_ref()).await?
        } else {
            list_page(&tx, kind::INSTANCE, None, req.page.as_ref()).await?
        };
        let instances = self.views(&account, &list).await?;
        Ok(Response::new(pb::DescribeInstancesResponse {
            instances,
            next_token,
        }))
    }

    async fn terminate_instances(
        &self,
        r: Request<pb::TerminateInstancesRequest>,
    ) -> Result<Response<pb::TerminateInstancesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.terminate(account, r.into_inner()).await?)
    }
}

/// The volume service (records only: the storage agent that backs volumes is the next
/// step).
#[derive(Clone, Debug)]
pub struct Volumes {
    api: Api,
}

impl Volumes {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Volumes { api }
    }
}

fn pb_volume(v: &VolumeRec) -> pb::Volume {
    pb::Volume {
        volume_id: v.meta.id.clone(),
        size_gib: v.size_gib,
        state: v.state.clone(),
        attached_instance_id: v.attached.clone().unwrap_or_default(),
        owner_id: v.meta.account.clone(),
        tags: pb_tags(&v.meta.tags),
    }
}

#[tonic::async_trait]
impl VolumeService for Volumes {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        if !(1..=16384).contains(&req.size_gib) {
            return Err(ApiError::invalid(
                "size_gib",
                format!("{}: expected 1 to 16384 GiB", req.size_gib),
            )
            .into());
        }
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.volumes_per_account;
        let (v, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token) = (&req, tags.clone(), token.clone());
                async move {
                    let id = ids::new_id(kind::VOLUME);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::VOLUME,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let v: VolumeRec = tx.must(kind::VOLUME, "volume", &existing[0]).await?;
                        return Ok((tx, v));
                    }
                    let acct = tx.account().to_owned();
                    let have = tx
                        .keys(&rec_prefix(&acct, kind::VOLUME), quota + 1)
                        .await?
                        .len();
                    if have >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "the account has {have} volumes; the quota is {quota}"
                        )));
                    }
                    let v = VolumeRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct,
                            tags,
                            created_ms: now_ms(),
                        },
                        size_gib: req.size_gib,
                        state: "available".into(),
                        attached: None,
                    };
                    tx.put(kind::VOLUME, &id, &v)?;
                    Ok((tx, v))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateVolumeResponse {
                volume: Some(pb_volume(&v)),
            },
            rev,
        ))
    }

    async fn describe_volumes(
        &self,
        r: Request<pb::DescribeVolumesRequest>,
    ) -> Result<Response<pb::DescribeVolumesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (list, next_token) = if req.volume_ids.is_empty() {
            list_page::<VolumeRec>(&tx, kind::VOLUME, None, req.page.as_ref()).await?
        } else {
            (
                by_ids(&tx, kind::VOLUME, "volume", "volume_ids", &req.volume_ids).await?,
                String::new(),
            )
        };
        Ok(Response::new(pb::DescribeVolumesResponse {
            volumes: list.iter().map(pb_volume).collect(),
            next_token,
        }))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let id = validate::id("volume_id", kind::VOLUME, &r.get_ref().volume_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let v: VolumeRec = tx.must(kind::VOLUME, "volume", &id).await?;
                    if let Some(i) = &v.attached {
                        return Err(ApiError::Precondition(format!(
                            "volume {id} is attached to {i} (VolumeInUse)"
                        )));
                    }
                    tx.delete(kind::VOLUME, &id);
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteVolumeResponse {}, rev))
    }
}
