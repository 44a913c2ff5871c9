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
            let field = format!("instance_ids[{i}]");
            let id = validate::id(&field, kind::INSTANCE, id)?;
            // Twice in one call would stage two deletes of one key (etcd refuses such a
            // transaction) and release the address twice.
            if wanted.contains(&id) {
                return Err(ApiError::invalid(field, format!("{id} is listed twice")));
            }
            wanted.push(id);
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

#[cfg(test)]
mod tests {
    //! InstanceService and VolumeService validation tables: placement, IPAM (lowest free
    //! address, reserved addresses, exhaustion, reuse), security groups, tenancy, volumes,
    //! revisions, and the desired state the agents get.

    use crate::api::test_support::*;

    use std::{net::Ipv4Addr, sync::Arc, time::Duration};

    use tonic::{Code, Response};

    use vpc_proto::v1::{
        self as pb, host_service_server::HostService as _,
        instance_service_server::InstanceService as _,
        security_service_server::SecurityService as _, volume_service_server::VolumeService as _,
        vpc_service_server::VpcService as _,
    };

    use super::{Instances, Volumes};
    use crate::api::{
        Api, Quotas, desired::Desired, host::Hosts, network::Network, security::Security,
    };
    use crate::overlay::{compile::compile, statefile::StateFile};

    const HOST: &str = "host-0";
    const ROUTER_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 1];

    struct Env {
        api: Api,
        net: Network,
        sec: Security,
        inst: Instances,
        vols: Volumes,
    }

    async fn env_with(quotas: Quotas) -> Env {
        let api = test_api(quotas).await;
        Env {
            net: Network::new(api.clone()),
            sec: Security::new(api.clone()),
            inst: Instances::new(api.clone()),
            vols: Volumes::new(api.clone()),
            api,
        }
    }

    /// An environment with host `host-0` registered (and visible to placement).
    async fn env() -> Env {
        let e = env_with(Quotas::default()).await;
        e.register_host(HOST, "192.168.77.1").await;
        e
    }

    impl Env {
        async fn register_host(&self, id: &str, vtep: &str) {
            let r = Hosts::new(self.api.clone())
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
            self.desired_at(rev).await;
            assert!(
                self.api.desired.borrow().hosts.iter().any(|h| h.id == id),
                "host {id} in the desired state"
            );
        }

        /// The desired state at or after `rev` (bounded wait).
        async fn desired_at(&self, rev: i64) -> Arc<Desired> {
            let mut d = self.api.desired.clone();
            let wait = d.wait_for(|d| d.revision >= rev);
            match tokio::time::timeout(Duration::from_secs(10), wait).await {
                Ok(Ok(got)) => Arc::clone(&got),
                Ok(Err(e)) => panic!("the desired-state builder stopped: {e}"),
                Err(_) => panic!("the desired state did not reach revision {rev} in 10 s"),
            }
        }

        async fn vpc(&self, token: &str, cidr: &str) -> pb::Vpc {
            let r = pb::CreateVpcRequest {
                cidr_block: cidr.into(),
                ..Default::default()
            };
            self.net
                .create_vpc(req(token, r))
                .await
                .unwrap()
                .into_inner()
                .vpc
                .unwrap()
        }

        async fn subnet(&self, token: &str, vpc: &str, cidr: &str) -> pb::Subnet {
            let r = pb::CreateSubnetRequest {
                vpc_id: vpc.into(),
                cidr_block: cidr.into(),
                ..Default::default()
            };
            self.net
                .create_subnet(req(token, r))
                .await
                .unwrap()
                .into_inner()
                .subnet
                .unwrap()
        }

        async fn sg(&self, token: &str, vpc: &str, name: &str) -> String {
            let r = pb::CreateSecurityGroupRequest {
                vpc_id: vpc.into(),
                group_name: name.into(),
                description: name.into(),
                ..Default::default()
            };
            self.sec
                .create_security_group(req(token, r))
                .await
                .unwrap()
                .into_inner()
                .security_group
                .unwrap()
                .group_id
        }

        async fn run_req(
            &self,
            token: &str,
            r: pb::RunInstancesRequest,
        ) -> Result<Response<pb::RunInstancesResponse>, tonic::Status> {
            self.inst.run_instances(req(token, r)).await
        }

        async fn run(
            &self,
            token: &str,
            subnet: &str,
            ip: &str,
        ) -> Result<pb::Instance, tonic::Status> {
            let r = pb::RunInstancesRequest {
                subnet_id: subnet.into(),
                private_ip_address: ip.into(),
                ..Default::default()
            };
            let mut got = self.run_req(token, r).await?.into_inner().instances;
            assert_eq!(got.len(), 1);
            Ok(got.remove(0))
        }

        async fn terminate(&self, token: &str, ids: &[&str]) -> Result<i64, tonic::Status> {
            let r = pb::TerminateInstancesRequest {
                instance_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            };
            Ok(revision(
                &self.inst.terminate_instances(req(token, r)).await?,
            ))
        }

        async fn available(&self, subnet: &str) -> u32 {
            self.net
                .describe_subnets(req(
                    TOKEN,
                    pb::DescribeSubnetsRequest {
                        subnet_ids: vec![subnet.into()],
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .subnets[0]
                .available_ip_address_count
        }
    }

    #[tokio::test]
    async fn addresses_lowest_free_reserved_and_reuse() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        assert_eq!(e.available(&s.subnet_id).await, 251);
        let a = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        assert_eq!(a.private_ip_address, "10.0.1.4");
        assert_eq!(a.host_id, HOST);
        assert_eq!(a.vpc_id, vpc.vpc_id);
        assert_eq!(a.subnet_id, s.subnet_id);
        assert_eq!(
            a.security_group_ids,
            vec![vpc.default_security_group_id.clone()]
        );
        assert_eq!(a.instance_type, "t3.micro");
        assert_eq!(a.owner_id, ACCT);
        assert!(a.instance_id.starts_with("i-") && a.instance_id.len() == 19);
        assert!(a.state == "pending" || a.state == "running", "{}", a.state);
        let b = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        assert_eq!(b.private_ip_address, "10.0.1.5");
        assert_ne!(a.mac_address, b.mac_address);
        assert_eq!(e.available(&s.subnet_id).await, 249);
        for (case, ip) in [
            ("network address", "10.0.1.0"),
            ("router", "10.0.1.1"),
            ("DNS", "10.0.1.2"),
            ("reserved", "10.0.1.3"),
            ("broadcast", "10.0.1.255"),
            ("outside the subnet", "10.0.2.10"),
            ("outside the VPC", "192.168.0.10"),
            ("in use", "10.0.1.4"),
            ("garbage", "10.0.1"),
            ("CIDR", "10.0.1.10/32"),
        ] {
            check(
                case,
                e.run(TOKEN, &s.subnet_id, ip).await,
                Code::InvalidArgument,
                "private_ip_address",
            );
        }
        check(
            "an address with count 2",
            e.run_req(
                TOKEN,
                pb::RunInstancesRequest {
                    subnet_id: s.subnet_id.clone(),
                    private_ip_address: "10.0.1.50".into(),
                    count: 2,
                    ..Default::default()
                },
            )
            .await,
            Code::InvalidArgument,
            "private_ip_address",
        );
        let c = e.run(TOKEN, &s.subnet_id, "10.0.1.254").await.unwrap();
        assert_eq!(c.private_ip_address, "10.0.1.254");
        // The lowest free is still .6.
        let d = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        assert_eq!(d.private_ip_address, "10.0.1.6");
        assert_eq!(e.available(&s.subnet_id).await, 251 - 4);
        // Terminating releases the address: the next run gets it again.
        e.terminate(TOKEN, &[&a.instance_id]).await.unwrap();
        assert_eq!(e.available(&s.subnet_id).await, 251 - 3);
        let again = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        assert_eq!(again.private_ip_address, "10.0.1.4");
        // And a given address once its holder is gone.
        e.terminate(TOKEN, &[&c.instance_id]).await.unwrap();
        e.run(TOKEN, &s.subnet_id, "10.0.1.254").await.unwrap();
        check(
            "terminate twice",
            e.terminate(TOKEN, &[&a.instance_id]).await,
            Code::NotFound,
            &a.instance_id,
        );
        check(
            "terminate nothing",
            e.terminate(TOKEN, &[]).await,
            Code::InvalidArgument,
            "instance_ids",
        );
        check(
            "terminate bad id",
            e.terminate(TOKEN, &[&b.instance_id, "i-1"]).await,
            Code::InvalidArgument,
            "instance_ids[1]",
        );
        check(
            "terminate the same instance twice in one call",
            e.terminate(TOKEN, &[&b.instance_id, &b.instance_id]).await,
            Code::InvalidArgument,
            "instance_ids[1]",
        );
        // A failed terminate changed nothing.
        assert_eq!(e.available(&s.subnet_id).await, 251 - 4);
    }

    #[tokio::test]
    async fn small_subnet_holds_eleven() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.16/28").await;
        assert_eq!(e.available(&s.subnet_id).await, 11);
        let mut ips = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..11 {
            let i = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
            ips.push(i.private_ip_address.parse::<Ipv4Addr>().unwrap());
            ids.push(i.instance_id);
        }
        let want: Vec<Ipv4Addr> = (20..=30).map(|x| Ipv4Addr::new(10, 0, 1, x)).collect();
        assert_eq!(ips, want);
        assert_eq!(e.available(&s.subnet_id).await, 0);
        check(
            "twelfth",
            e.run(TOKEN, &s.subnet_id, "").await,
            Code::ResourceExhausted,
            &s.subnet_id,
        );
        e.terminate(TOKEN, &[&ids[3]]).await.unwrap();
        let i = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        assert_eq!(i.private_ip_address, "10.0.1.23");
        // Several in one call: all or nothing.
        let s2 = e.subnet(TOKEN, &vpc.vpc_id, "10.0.2.0/28").await;
        check(
            "twelve in one call",
            e.run_req(
                TOKEN,
                pb::RunInstancesRequest {
                    subnet_id: s2.subnet_id.clone(),
                    count: 12,
                    ..Default::default()
                },
            )
            .await,
            Code::ResourceExhausted,
            &s2.subnet_id,
        );
        assert_eq!(e.available(&s2.subnet_id).await, 11);
        let got = e
            .run_req(
                TOKEN,
                pb::RunInstancesRequest {
                    subnet_id: s2.subnet_id.clone(),
                    count: 11,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .into_inner()
            .instances;
        assert_eq!(got.len(), 11);
        assert_eq!(got[10].private_ip_address, "10.0.2.14");
        assert_eq!(e.available(&s2.subnet_id).await, 0);
        for (case, count) in [("count 101", 101), ("count huge", u32::MAX)] {
            check(
                case,
                e.run_req(
                    TOKEN,
                    pb::RunInstancesRequest {
                        subnet_id: s2.subnet_id.clone(),
                        count,
                        ..Default::default()
                    },
                )
                .await,
                Code::InvalidArgument,
                "count",
            );
        }
    }

    #[tokio::test]
    async fn groups_hosts_and_tenancy() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let other_vpc = e.vpc(TOKEN, "10.1.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let foreign_sg = e.sg(TOKEN, &other_vpc.vpc_id, "web").await;
        let mut groups = Vec::new();
        for i in 0..6 {
            groups.push(e.sg(TOKEN, &vpc.vpc_id, &format!("g{i}")).await);
        }
        let run = |groups: Vec<String>, host: &str| pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            security_group_ids: groups,
            host_id: host.into(),
            ..Default::default()
        };
        let five = e
            .run_req(TOKEN, run(groups[..5].to_vec(), HOST))
            .await
            .unwrap();
        assert_eq!(
            five.into_inner().instances[0].security_group_ids,
            groups[..5]
        );
        for (case, r, code, field) in [
            (
                "group of another VPC",
                run(vec![groups[0].clone(), foreign_sg.clone()], ""),
                Code::InvalidArgument,
                "security_group_ids[1]",
            ),
            (
                "six groups",
                run(groups.clone(), ""),
                Code::InvalidArgument,
                "security_group_ids",
            ),
            (
                "a group twice",
                run(vec![groups[0].clone(), groups[0].clone()], ""),
                Code::InvalidArgument,
                "security_group_ids[1]",
            ),
            (
                "bad group id",
                run(vec!["sg-1".into()], ""),
                Code::InvalidArgument,
                "security_group_ids[0]",
            ),
            (
                "unknown group",
                run(vec!["sg-0123456789abcdef0".into()], ""),
                Code::NotFound,
                "sg-0123456789abcdef0",
            ),
            (
                "unknown host",
                run(vec![], "host-9"),
                Code::InvalidArgument,
                "host_id",
            ),
            (
                "bad subnet id",
                pb::RunInstancesRequest {
                    subnet_id: "subnet-1".into(),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "subnet_id",
            ),
            (
                "no subnet",
                pb::RunInstancesRequest::default(),
                Code::InvalidArgument,
                "subnet_id",
            ),
            (
                "unknown subnet",
                pb::RunInstancesRequest {
                    subnet_id: "subnet-0123456789abcdef0".into(),
                    ..Default::default()
                },
                Code::NotFound,
                "subnet-0123456789abcdef0",
            ),
            (
                "bad instance type",
                pb::RunInstancesRequest {
                    subnet_id: s.subnet_id.clone(),
                    instance_type: "t3 <micro>".into(),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "instance_type",
            ),
        ] {
            check(case, e.run_req(TOKEN, r).await, code, field);
        }
        // The other account sees nothing of ours.
        check(
            "run in another account's subnet",
            e.run(OTHER_TOKEN, &s.subnet_id, "").await,
            Code::NotFound,
            &s.subnet_id,
        );
        let mine = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        check(
            "describe another account's instance",
            e.inst
                .describe_instances(req(
                    OTHER_TOKEN,
                    pb::DescribeInstancesRequest {
                        instance_ids: vec![mine.instance_id.clone()],
                        ..Default::default()
                    },
                ))
                .await,
            Code::NotFound,
            &mine.instance_id,
        );
        assert!(
            e.inst
                .describe_instances(req(OTHER_TOKEN, pb::DescribeInstancesRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .instances
                .is_empty()
        );
        check(
            "terminate another account's instance",
            e.terminate(OTHER_TOKEN, &[&mine.instance_id]).await,
            Code::NotFound,
            &mine.instance_id,
        );
        // Placement: the least loaded registered host, or the one asked for.
        e.register_host("host-1", "192.168.77.2").await;
        let placed = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        assert_eq!(placed.host_id, "host-1");
        let asked = e.run_req(TOKEN, run(vec![], HOST)).await.unwrap();
        assert_eq!(asked.into_inner().instances[0].host_id, HOST);
        let listed = e
            .inst
            .describe_instances(req(
                TOKEN,
                pb::DescribeInstancesRequest {
                    subnet_id: s.subnet_id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .instances;
        assert_eq!(listed.len(), 4);
    }

    #[tokio::test]
    async fn no_host_registered() {
        let e = env_with(Quotas::default()).await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        check(
            "no host",
            e.run(TOKEN, &s.subnet_id, "").await,
            Code::FailedPrecondition,
            "host",
        );
        // Nothing was held.
        assert_eq!(e.available(&s.subnet_id).await, 251);
    }

    #[tokio::test]
    async fn instance_quota_and_client_token() {
        let e = env_with(Quotas {
            instances_per_account: 2,
            ..Quotas::default()
        })
        .await;
        e.register_host(HOST, "192.168.77.1").await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let with_token = |token: &str, instance_type: &str| pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            client_token: token.into(),
            instance_type: instance_type.into(),
            ..Default::default()
        };
        let a = e
            .run_req(TOKEN, with_token("t1", ""))
            .await
            .unwrap()
            .into_inner();
        let again = e
            .run_req(TOKEN, with_token("t1", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            a.instances[0].instance_id, again.instances[0].instance_id,
            "same token: same instance"
        );
        check(
            "token with other parameters",
            e.run_req(TOKEN, with_token("t1", "m5.large")).await,
            Code::AlreadyExists,
            "t1",
        );
        e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        check(
            "third instance",
            e.run(TOKEN, &s.subnet_id, "").await,
            Code::ResourceExhausted,
            "quota",
        );
    }

    #[tokio::test]
    async fn desired_state_has_the_endpoint() {
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let r = e
            .run_req(
                TOKEN,
                pb::RunInstancesRequest {
                    subnet_id: s.subnet_id.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let rev = revision(&r);
        let i = r.into_inner().instances.remove(0);
        let d = e.desired_at(rev).await;
        assert_eq!(d.instances_per_host.get(HOST), Some(&1));
        let doc: StateFile = serde_json::from_slice(&d.document).expect("a state file");
        let ep = doc
            .endpoints
            .iter()
            .find(|x| x.id == i.instance_id)
            .expect("the instance's endpoint");
        assert_eq!(ep.host, HOST);
        assert_eq!(ep.subnet, s.subnet_id);
        assert_eq!(ep.ip.to_string(), i.private_ip_address);
        assert_eq!(ep.mac, i.mac_address);
        assert_eq!(
            ep.ifname.as_deref(),
            Some(crate::compute::host_ifname(&i.instance_id).as_str())
        );
        assert_eq!(
            ep.security_groups,
            vec![vpc.default_security_group_id.clone()]
        );
        assert!(
            doc.vpcs
                .iter()
                .any(|v| v.id == vpc.vpc_id && v.vni == vpc.vni)
        );
        assert!(doc.subnets.iter().any(|x| x.id == s.subnet_id));
        assert!(doc.hosts.iter().any(|h| h.id == HOST));
        // The agent's compile path accepts it: the host view (the veth exists as ifindex 7)
        // compiles to maps with the endpoint.
        let ifname = crate::compute::host_ifname(&i.instance_id);
        let view = doc
            .host_view(HOST, |name| (name == ifname).then_some(7))
            .unwrap();
        assert!(view.missing.is_empty());
        assert_eq!(view.ports.get(&ifname), Some(&7));
        let maps = compile(&view.state, HOST, ROUTER_MAC).unwrap();
        assert!(maps.vnis.contains(&vpc.vni));
        assert!(maps.endpoints.contains_key(&7), "{:?}", maps.endpoints);
        // Seen from another host, the endpoint is remote.
        let remote = doc.host_view("host-1", |_| None).unwrap();
        compile(&remote.state, "host-1", ROUTER_MAC).unwrap();
        // Terminated: gone from the next rendering.
        let rev = e.terminate(TOKEN, &[&i.instance_id]).await.unwrap();
        let d = e.desired_at(rev).await;
        let doc: StateFile = serde_json::from_slice(&d.document).unwrap();
        assert!(doc.endpoints.iter().all(|x| x.id != i.instance_id));
    }

    #[tokio::test]
    async fn volumes() {
        let e = env_with(Quotas::default()).await;
        let create = |size: u32, token: &str| pb::CreateVolumeRequest {
            size_gib: size,
            client_token: token.into(),
            ..Default::default()
        };
        for (case, size) in [("0 GiB", 0), ("16385 GiB", 16385), ("huge", u32::MAX)] {
            check(
                case,
                e.vols.create_volume(req(TOKEN, create(size, ""))).await,
                Code::InvalidArgument,
                "size_gib",
            );
        }
        let mut revs = Vec::new();
        let mut ids = Vec::new();
        for size in [1, 16384] {
            let r = e
                .vols
                .create_volume(req(TOKEN, create(size, "")))
                .await
                .unwrap();
            revs.push(revision(&r));
            let v = r.into_inner().volume.unwrap();
            assert_eq!(v.size_gib, size);
            assert_eq!(v.state, "available");
            assert_eq!(v.owner_id, ACCT);
            assert!(v.volume_id.starts_with("vol-") && v.volume_id.len() == 21);
            assert_eq!(v.attached_instance_id, "");
            ids.push(v.volume_id);
        }
        assert!(revs[0] < revs[1]);
        // Client tokens.
        let t1 = e
            .vols
            .create_volume(req(TOKEN, create(8, "v1")))
            .await
            .unwrap();
        let t1 = t1.into_inner().volume.unwrap();
        let t2 = e
            .vols
            .create_volume(req(TOKEN, create(8, "v1")))
            .await
            .unwrap();
        assert_eq!(t2.into_inner().volume.unwrap(), t1);
        check(
            "token, other size",
            e.vols.create_volume(req(TOKEN, create(9, "v1"))).await,
            Code::AlreadyExists,
            "v1",
        );
        let describe = |token: &str, ids: Vec<String>| {
            e.vols.describe_volumes(req(
                token,
                pb::DescribeVolumesRequest {
                    volume_ids: ids,
                    ..Default::default()
                },
            ))
        };
        assert_eq!(
            describe(TOKEN, vec![])
                .await
                .unwrap()
                .into_inner()
                .volumes
                .len(),
            3
        );
        // Isolation.
        assert!(
            describe(OTHER_TOKEN, vec![])
                .await
                .unwrap()
                .into_inner()
                .volumes
                .is_empty()
        );
        check(
            "describe another account's",
            describe(OTHER_TOKEN, vec![ids[0].clone()]).await,
            Code::NotFound,
            &ids[0],
        );
        let delete = |token: &str, id: &str| {
            e.vols.delete_volume(req(
                token,
                pb::DeleteVolumeRequest {
                    volume_id: id.into(),
                },
            ))
        };
        check(
            "delete another account's",
            delete(OTHER_TOKEN, &ids[0]).await,
            Code::NotFound,
            &ids[0],
        );
        check(
            "delete bad id",
            delete(TOKEN, "vol-1").await,
            Code::InvalidArgument,
            "volume_id",
        );
        check(
            "describe bad id",
            describe(TOKEN, vec!["i-0123456789abcdef0".into()]).await,
            Code::InvalidArgument,
            "volume_ids[0]",
        );
        let r = delete(TOKEN, &ids[0]).await.unwrap();
        assert!(revision(&r) > revs[1]);
        check(
            "delete twice",
            delete(TOKEN, &ids[0]).await,
            Code::NotFound,
            &ids[0],
        );
        check(
            "describe deleted",
            describe(TOKEN, vec![ids[0].clone()]).await,
            Code::NotFound,
            &ids[0],
        );
        assert_eq!(
            describe(TOKEN, vec![])
                .await
                .unwrap()
                .into_inner()
                .volumes
                .len(),
            2
        );
        // Quota.
        let e2 = env_with(Quotas {
            volumes_per_account: 1,
            ..Quotas::default()
        })
        .await;
        e2.vols
            .create_volume(req(TOKEN, create(1, "")))
            .await
            .unwrap();
        check(
            "volume quota",
            e2.vols.create_volume(req(TOKEN, create(1, ""))).await,
            Code::ResourceExhausted,
            "quota",
        );
    }
}
