//! `InstanceService`: the instance lifecycle as EC2 has it.
//!
//! ```text
//!  RunInstances ─> pending ──(host: running)──> running
//!                     │  └─(host: failed)──> terminated (state_reason says why)
//!  StopInstances:  pending/running ─> stopping ──(host: stopped)──> stopped
//!  StartInstances: stopped ─> pending
//!  TerminateInstances: any ─> shutting-down ──(host: terminated)──> terminated
//! ```
//!
//! The API moves an instance into pending, stopping and shutting-down; its host's reports
//! (`lifecycle`) move it on. An instance is placed on a registered host (spread: fewest
//! instances), gets a private IPv4 from its subnet (IPAM, kept while stopped, released at
//! terminate) and a MAC derived from its id.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, instance_service_server::InstanceService};

use super::error::{ApiError, ApiResult};
use super::network::pb_tags;
use super::records::{
    InstanceRec, Meta, SgRec, SubnetRec, VolumeRec, child_key, kind, now_ms, state,
};
use super::{Api, by_ids, claim_token, ids, ipam, list_page, respond, validate};
use crate::compute::types;

/// Instances per RunInstances call.
pub const MAX_COUNT: u32 = 100;
/// User data, bytes (EC2's limit).
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Command, bytes.
pub const MAX_COMMAND: usize = 4096;

/// The instance service.
#[derive(Clone, Debug)]
pub struct Instances {
    api: Api,
}

/// The API view of an instance (`volumes`: the account's volumes, for its block devices).
pub fn pb_instance(i: &InstanceRec, volumes: &[VolumeRec]) -> pb::Instance {
    let t = types::lookup(&i.instance_type);
    pb::Instance {
        instance_id: i.meta.id.clone(),
        subnet_id: i.subnet.clone(),
        vpc_id: i.vpc.clone(),
        private_ip_address: i.ip.to_string(),
        mac_address: i.mac.clone(),
        security_group_ids: i.security_groups.clone(),
        state: i.state.clone(),
        host_id: i.host.clone(),
        instance_type: i.instance_type.clone(),
        owner_id: i.meta.account.clone(),
        tags: pb_tags(&i.meta.tags),
        netns: format!("{}{}", crate::compute::DEFAULT_NETNS_PREFIX, i.meta.id),
        state_reason: i.state_reason.clone(),
        launch_time_ms: i64::try_from(i.launch_ms).unwrap_or(i64::MAX),
        private_dns_name: crate::compute::doc::hostname(i.ip),
        command: i.command.clone().unwrap_or_default(),
        vcpus: t.map_or(0, |t| t.vcpus),
        memory_mib: t.map_or(0, |t| u32::try_from(t.memory_mib).unwrap_or(u32::MAX)),
        block_device_mappings: volumes
            .iter()
            .filter_map(|v| {
                let a = v.attachment.as_ref()?;
                (a.instance == i.meta.id).then(|| pb::BlockDeviceMapping {
                    device_name: format!("/dev/{}", a.device),
                    volume_id: v.meta.id.clone(),
                    mount_path: a.mount_path.clone().unwrap_or_default(),
                    status: a.state.clone(),
                })
            })
            .collect(),
    }
}

/// The ids of a Stop/Start/Terminate request: 1-1000, each once.
fn instance_ids(list: &[String]) -> ApiResult<Vec<String>> {
    if list.is_empty() {
        return Err(ApiError::invalid(
            "instance_ids",
            "at least one instance id",
        ));
    }
    if list.len() > 1000 {
        return Err(ApiError::invalid("instance_ids", "at most 1000 ids"));
    }
    let mut wanted = Vec::new();
    for (i, id) in list.iter().enumerate() {
        let field = format!("instance_ids[{i}]");
        let id = validate::id(&field, kind::INSTANCE, id)?;
        // Twice in one call would stage two writes of one key (etcd refuses such a
        // transaction) and release an address twice.
        if wanted.contains(&id) {
            return Err(ApiError::invalid(field, format!("{id} is listed twice")));
        }
        wanted.push(id);
    }
    Ok(wanted)
}

/// A state change the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Stop,
    Start,
    Terminate,
}

impl Instances {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Instances { api }
    }

    async fn views(
        &self,
        tx: &super::tx::Tx,
        list: &[InstanceRec],
    ) -> ApiResult<Vec<pb::Instance>> {
        let volumes: Vec<VolumeRec> = if list.is_empty() {
            Vec::new()
        } else {
            tx.all(kind::VOLUME).await?
        };
        Ok(list.iter().map(|i| pb_instance(i, &volumes)).collect())
    }

    /// Chooses a host: the one asked for (must be registered) or the registered host with
    /// the fewest instances (ties: lowest id).
    fn place(&self, wanted: &str, planned: &BTreeMap<String, usize>) -> ApiResult<String> {
        let d = self.api.desired.borrow().clone();
        let load = |h: &str| {
            d.instances_per_host.get(h).copied().unwrap_or(0) + planned.get(h).copied().unwrap_or(0)
        };
        let capacity = dataplane_common::maps::HOST_INSTANCE_CAPACITY as usize;
        if !wanted.is_empty() {
            let h = d.hosts.iter().find(|h| h.id == wanted).ok_or_else(|| {
                ApiError::invalid("host_id", format!("host {wanted:?} is not registered"))
            })?;
            if load(&h.id) >= capacity {
                return Err(ApiError::Exhausted(format!(
                    "host {wanted} runs {capacity} instances, its capacity (InsufficientInstanceCapacity)"
                )));
            }
            return Ok(h.id.clone());
        }
        if d.hosts.is_empty() {
            return Err(ApiError::Precondition(
                "no host is registered to run instances on".into(),
            ));
        }
        d.hosts
            .iter()
            .filter(|h| load(&h.id) < capacity)
            .min_by_key(|h| (load(&h.id), h.id.clone()))
            .map(|h| h.id.clone())
            .ok_or_else(|| {
                ApiError::Exhausted(format!(
                    "every host runs {capacity} instances, its capacity (InsufficientInstanceCapacity)"
                ))
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
            types::DEFAULT.to_owned()
        } else if types::lookup(&req.instance_type).is_some() {
            req.instance_type.clone()
        } else {
            return Err(ApiError::invalid(
                "instance_type",
                format!(
                    "{:?} is not an instance type; one of {} (InvalidInstanceType)",
                    req.instance_type,
                    types::names()
                ),
            ));
        };
        if req.user_data.len() > MAX_USER_DATA {
            return Err(ApiError::invalid(
                "user_data",
                format!("{} bytes; at most {MAX_USER_DATA}", req.user_data.len()),
            ));
        }
        let user_data = (!req.user_data.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(&req.user_data));
        let command = if req.command.is_empty() {
            None
        } else if req.command.len() > MAX_COMMAND {
            return Err(ApiError::invalid(
                "command",
                format!("{} bytes; at most {MAX_COMMAND}", req.command.len()),
            ));
        } else if req.command.contains('\0') {
            return Err(ApiError::invalid("command", "must not contain NUL"));
        } else {
            Some(req.command.clone())
        };
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.instances_per_account;
        let ((list, _), rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, tags, token, groups, subnet_id, instance_type, user_data, command) = (
                    &req,
                    tags.clone(),
                    token.clone(),
                    groups.clone(),
                    subnet_id.clone(),
                    instance_type.clone(),
                    user_data.clone(),
                    command.clone(),
                );
                async move {
                    let new_ids: Vec<String> = (0..count).map(|_| ids::new_id(kind::INSTANCE)).collect();
                    if let Some(existing) = claim_token(&mut tx, kind::INSTANCE, token.as_deref(), req, &new_ids).await? {
                        let mut out = Vec::new();
                        for id in &existing {
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
                    let have = tx
                        .all::<InstanceRec>(kind::INSTANCE)
                        .await?
                        .iter()
                        .filter(|i| i.state != state::TERMINATED)
                        .count();
                    if have + count as usize > quota {
                        return Err(ApiError::Exhausted(format!(
                            "the account has {have} instances; {count} more exceed the quota of {quota} (InstanceLimitExceeded)"
                        )));
                    }
                    let mut taken = BTreeSet::new();
                    let mut planned = BTreeMap::new();
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
                        let now = now_ms();
                        let i = InstanceRec {
                            meta: Meta { id: id.clone(), account: acct.clone(), tags: tags.clone(), created_ms: now },
                            subnet: subnet_id.clone(),
                            vpc: subnet.vpc.clone(),
                            host,
                            ip,
                            mac: ids::instance_mac(&id),
                            security_groups: groups.clone(),
                            state: state::PENDING.into(),
                            instance_type: instance_type.clone(),
                            state_reason: String::new(),
                            user_data: user_data.clone(),
                            command: command.clone(),
                            launch_ms: now,
                            terminated_ms: None,
                        };
                        tx.put(kind::INSTANCE, &id, &i)?;
                        tx.put_raw(child_key(&acct, &subnet_id, kind::INSTANCE, &id), Vec::new());
                        out.push(i);
                    }
                    Ok((tx, (out, false)))
                }
            })
            .await?;
        let instances = list.iter().map(|i| pb_instance(i, &[])).collect();
        Ok(respond(pb::RunInstancesResponse { instances }, rev))
    }

    /// Stop, start or terminate `ids`, in one transaction: every instance must allow the
    /// change (else nothing changes). Instances already where the change leads are left
    /// as they are (the calls are idempotent, as EC2's).
    async fn change(
        &self,
        account: String,
        ids: &[String],
        change: Change,
    ) -> ApiResult<(Vec<pb::Instance>, i64)> {
        let wanted = instance_ids(ids)?;
        let ((list, volumes), rev) = self
            .api
            .write(&account, |mut tx| {
                let wanted = wanted.clone();
                async move {
                    let mut out = Vec::new();
                    let mut leaving = Vec::new();
                    for id in &wanted {
                        let mut i: InstanceRec = tx.must(kind::INSTANCE, "instance", id).await?;
                        let refuse = |why: &str| {
                            Err(ApiError::Precondition(format!(
                                "instance {id} is {}: {why} (IncorrectInstanceState)",
                                i.state
                            )))
                        };
                        let before = i.state.clone();
                        match (change, i.state.as_str()) {
                            (Change::Stop, state::PENDING | state::RUNNING) => {
                                i.state = state::STOPPING.into();
                                i.state_reason =
                                    "Client.UserInitiatedShutdown: User initiated shutdown".into();
                            }
                            (Change::Stop, state::STOPPING | state::STOPPED) => {}
                            (Change::Stop, _) => return refuse("it cannot be stopped"),
                            (Change::Start, state::STOPPED) => {
                                i.state = state::PENDING.into();
                                i.state_reason.clear();
                                i.launch_ms = now_ms();
                            }
                            (Change::Start, state::PENDING | state::RUNNING) => {}
                            (Change::Start, state::STOPPING) => {
                                return refuse("start it once it is stopped");
                            }
                            (Change::Start, _) => return refuse("it cannot be started"),
                            (Change::Terminate, state::SHUTTING_DOWN | state::TERMINATED) => {}
                            (Change::Terminate, _) => {
                                i.state = state::SHUTTING_DOWN.into();
                                i.state_reason =
                                    "Client.UserInitiatedShutdown: User initiated shutdown".into();
                                leaving.push(i.clone());
                            }
                        }
                        if i.state != before {
                            tx.put(kind::INSTANCE, id, &i)?;
                        }
                        out.push(i);
                    }
                    let volumes =
                        super::lifecycle::retire_instances(&mut tx, &leaving, &Default::default())
                            .await?;
                    Ok((tx, (out, volumes)))
                }
            })
            .await?;
        Ok((list.iter().map(|i| pb_instance(i, &volumes)).collect(), rev))
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
        let instances = self.views(&tx, &list).await?;
        Ok(Response::new(pb::DescribeInstancesResponse {
            instances,
            next_token,
        }))
    }

    async fn stop_instances(
        &self,
        r: Request<pb::StopInstancesRequest>,
    ) -> Result<Response<pb::StopInstancesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let (instances, rev) = self
            .change(account, &r.get_ref().instance_ids, Change::Stop)
            .await?;
        Ok(respond(pb::StopInstancesResponse { instances }, rev))
    }

    async fn start_instances(
        &self,
        r: Request<pb::StartInstancesRequest>,
    ) -> Result<Response<pb::StartInstancesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let (instances, rev) = self
            .change(account, &r.get_ref().instance_ids, Change::Start)
            .await?;
        Ok(respond(pb::StartInstancesResponse { instances }, rev))
    }

    async fn terminate_instances(
        &self,
        r: Request<pb::TerminateInstancesRequest>,
    ) -> Result<Response<pb::TerminateInstancesResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let (instances, rev) = self
            .change(account, &r.get_ref().instance_ids, Change::Terminate)
            .await?;
        Ok(respond(pb::TerminateInstancesResponse { instances }, rev))
    }

    async fn exec_instance(
        &self,
        r: Request<pb::ExecInstanceRequest>,
    ) -> Result<Response<pb::ExecInstanceResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let id = validate::id("instance_id", kind::INSTANCE, &req.instance_id)?;
        if req.command.is_empty() || req.command.len() > MAX_COMMAND || req.command.contains('\0') {
            return Err(
                ApiError::invalid("command", format!("1 to {MAX_COMMAND} bytes, no NUL")).into(),
            );
        }
        let timeout = match req.timeout_seconds {
            0 => 30,
            t @ 1..=600 => t,
            t => {
                return Err(ApiError::invalid(
                    "timeout_seconds",
                    format!("{t}: expected 1 to 600"),
                )
                .into());
            }
        };
        if req.stdin.len() > 1 << 20 {
            return Err(ApiError::invalid("stdin", "at most 1 MiB").into());
        }
        let tx = self.api.read(&account).await?;
        let i: InstanceRec = tx.must(kind::INSTANCE, "instance", &id).await?;
        if i.state != state::RUNNING {
            return Err(ApiError::Precondition(format!(
                "instance {id} is {}; exec needs it running (IncorrectInstanceState)",
                i.state
            ))
            .into());
        }
        let r = self
            .api
            .exec
            .run(
                &i.host,
                pb::ExecCommand {
                    id: 0,
                    instance_id: id.clone(),
                    command: req.command,
                    timeout_seconds: timeout,
                    stdin: req.stdin,
                    ..Default::default()
                },
            )
            .await?;
        if !r.error.is_empty() {
            return Err(ApiError::Precondition(format!("instance {id}: {}", r.error)).into());
        }
        Ok(Response::new(pb::ExecInstanceResponse {
            exit_code: r.exit_code,
            stdout: r.stdout,
            stderr: r.stderr,
            timed_out: r.timed_out,
        }))
    }

    async fn get_console_output(
        &self,
        r: Request<pb::GetConsoleOutputRequest>,
    ) -> Result<Response<pb::GetConsoleOutputResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let id = validate::id("instance_id", kind::INSTANCE, &r.get_ref().instance_id)?;
        let tx = self.api.read(&account).await?;
        tx.must::<InstanceRec>(kind::INSTANCE, "instance", &id)
            .await?;
        let (output, at) = self.api.consoles.get(&id).unwrap_or_default();
        Ok(Response::new(pb::GetConsoleOutputResponse {
            instance_id: id,
            output,
            timestamp_ms: i64::try_from(at).unwrap_or(i64::MAX),
        }))
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

    use super::Instances;
    use crate::api::volumes::Volumes;
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
        // Terminating again is a no-op (as in EC2): the instance stays shutting-down.
        e.terminate(TOKEN, &[&a.instance_id]).await.unwrap();
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
        let e = env().await;
        let create = |size: u32, token: &str| pb::CreateVolumeRequest {
            size_gib: size,
            client_token: token.into(),
            ..Default::default()
        };
        for (case, size) in [("0 GiB", 0), ("16384 GiB", 16384), ("huge", u32::MAX)] {
            check(
                case,
                e.vols.create_volume(req(TOKEN, create(size, ""))).await,
                Code::InvalidArgument,
                "size_gib",
            );
        }
        let mut revs = Vec::new();
        let mut ids = Vec::new();
        for size in [1, 16383] {
            let r = e
                .vols
                .create_volume(req(TOKEN, create(size, "")))
                .await
                .unwrap();
            revs.push(revision(&r));
            let v = r.into_inner().volume.unwrap();
            assert_eq!(v.size_gib, size);
            assert_eq!(v.state, "creating", "until its host made it");
            assert_eq!(v.host_id, HOST);
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
        // Deleting is the host's: the volume shows `deleting` until it reports it gone;
        // deleting again changes nothing.
        delete(TOKEN, &ids[0]).await.unwrap();
        let got = describe(TOKEN, vec![ids[0].clone()]).await.unwrap();
        assert_eq!(got.into_inner().volumes[0].state, "deleting");
        // Quota.
        let e2 = env_with(Quotas {
            volumes_per_account: 1,
            ..Quotas::default()
        })
        .await;
        e2.register_host(HOST, "192.168.77.1").await;
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

    impl Env {
        async fn report(
            &self,
            instances: &[(&str, &str, &str)],
            volumes: &[(&str, &str, &str)],
            snapshots: &[(&str, &str)],
        ) {
            let rev = self.api.store.revision().await.unwrap();
            Hosts::new(self.api.clone())
                .report_applied(req(
                    AGENT,
                    pb::ReportAppliedRequest {
                        host_id: HOST.into(),
                        revision: rev,
                        error: String::new(),
                        counters: vec![],
                        target_health: vec![],
                        conntrack: None,
                        instances: instances
                            .iter()
                            .map(|(id, state, reason)| pb::InstanceStatus {
                                instance_id: (*id).into(),
                                state: (*state).into(),
                                reason: (*reason).into(),
                                console: if *state == "running" {
                                    b"hello\n".to_vec()
                                } else {
                                    vec![]
                                },
                            })
                            .collect(),
                        volumes: volumes
                            .iter()
                            .map(|(id, state, inst)| pb::VolumeStatus {
                                volume_id: (*id).into(),
                                state: (*state).into(),
                                attached_instance_id: (*inst).into(),
                                reason: String::new(),
                            })
                            .collect(),
                        snapshots: snapshots
                            .iter()
                            .map(|(id, state)| pb::SnapshotStatus {
                                snapshot_id: (*id).into(),
                                state: (*state).into(),
                                reason: String::new(),
                            })
                            .collect(),
                    },
                ))
                .await
                .unwrap();
            // The writes it made reach the desired state (and its object cache).
            let rev = self.api.store.revision().await.unwrap();
            self.desired_at(rev).await;
        }

        async fn instance(&self, id: &str) -> pb::Instance {
            self.inst
                .describe_instances(req(
                    TOKEN,
                    pb::DescribeInstancesRequest {
                        instance_ids: vec![id.into()],
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .instances
                .remove(0)
        }

        async fn volume(&self, id: &str) -> Result<pb::Volume, tonic::Status> {
            Ok(self
                .vols
                .describe_volumes(req(
                    TOKEN,
                    pb::DescribeVolumesRequest {
                        volume_ids: vec![id.into()],
                        ..Default::default()
                    },
                ))
                .await?
                .into_inner()
                .volumes
                .remove(0))
        }

        async fn doc(&self) -> StateFile {
            let rev = self.api.store.revision().await.unwrap();
            let d = self.desired_at(rev).await;
            serde_json::from_slice(&d.document).unwrap()
        }
    }

    /// The instance lifecycle: the API moves instances to pending, stopping and
    /// shutting-down; host reports to running, stopped and terminated; stale reports move
    /// nothing; a failed launch terminates with its reason and frees the address.
    #[tokio::test]
    async fn instance_lifecycle_follows_host_reports() {
        use crate::compute::doc::Intent;
        let e = env().await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/28").await;
        let r = pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            user_data: b"#!/bin/sh\necho hi\n".to_vec(),
            command: "sleep 1000".into(),
            instance_type: "t3.small".into(),
            ..Default::default()
        };
        let a = e
            .run_req(TOKEN, r)
            .await
            .unwrap()
            .into_inner()
            .instances
            .remove(0);
        let id = a.instance_id.as_str();
        assert_eq!(a.state, "pending");
        assert_eq!((a.vcpus, a.memory_mib), (2, 2048));
        assert_eq!(a.private_dns_name, "ip-10-0-1-4");
        assert_eq!(a.command, "sleep 1000");
        let d = e.doc().await;
        let i = d.instances.iter().find(|i| i.id == id).unwrap();
        assert_eq!(i.intent, Intent::Run);
        assert_eq!(i.hostname, "ip-10-0-1-4");
        assert_eq!(i.security_group_names, vec!["default".to_owned()]);
        assert!(i.user_data.is_some());
        assert!(d.endpoints.iter().any(|x| x.id == id));
        // Stale or unrelated observations move nothing.
        e.report(&[(id, "stopped", "")], &[], &[]).await;
        assert_eq!(e.instance(id).await.state, "pending");
        e.report(&[(id, "running", "")], &[], &[]).await;
        assert_eq!(e.instance(id).await.state, "running");
        let (out, _) = e.api.consoles.get(id).unwrap();
        assert_eq!(out, b"hello\n");
        // Stop: stopping until the host says stopped; the address stays.
        let free = e.available(&s.subnet_id).await;
        let stop = e
            .inst
            .stop_instances(req(
                TOKEN,
                pb::StopInstancesRequest {
                    instance_ids: vec![id.into()],
                },
            ))
            .await
            .unwrap();
        assert_eq!(stop.into_inner().instances[0].state, "stopping");
        let d = e.doc().await;
        assert_eq!(
            d.instances.iter().find(|i| i.id == id).unwrap().intent,
            Intent::Stop
        );
        assert!(
            !d.endpoints.iter().any(|x| x.id == id),
            "no network while stopped"
        );
        e.report(&[(id, "running", "")], &[], &[]).await;
        assert_eq!(e.instance(id).await.state, "stopping", "a stale report");
        e.report(&[(id, "stopped", "")], &[], &[]).await;
        let got = e.instance(id).await;
        assert_eq!(got.state, "stopped");
        assert_eq!(got.private_ip_address, "10.0.1.4");
        assert_eq!(e.available(&s.subnet_id).await, free);
        // Start: stopping refuses, stopped -> pending -> running.
        let start = |ids: Vec<String>| {
            e.inst
                .start_instances(req(TOKEN, pb::StartInstancesRequest { instance_ids: ids }))
        };
        assert_eq!(
            start(vec![id.into()]).await.unwrap().into_inner().instances[0].state,
            "pending"
        );
        e.report(&[(id, "running", "")], &[], &[]).await;
        assert_eq!(e.instance(id).await.state, "running");
        check(
            "start twice listed",
            start(vec![id.into(), id.into()]).await,
            Code::InvalidArgument,
            "instance_ids[1]",
        );
        // Terminate: shutting-down, the address is free at once; terminated once reported.
        e.terminate(TOKEN, &[id]).await.unwrap();
        assert_eq!(e.instance(id).await.state, "shutting-down");
        assert_eq!(e.available(&s.subnet_id).await, free + 1);
        let d = e.doc().await;
        assert_eq!(
            d.instances.iter().find(|i| i.id == id).unwrap().intent,
            Intent::Terminate
        );
        e.report(&[(id, "terminated", "")], &[], &[]).await;
        let got = e.instance(id).await;
        assert_eq!(got.state, "terminated", "terminated instances stay visible");
        assert!(!e.doc().await.instances.iter().any(|i| i.id == id));
        check(
            "start terminated",
            start(vec![id.into()]).await,
            Code::FailedPrecondition,
            "IncorrectInstanceState",
        );
        // Terminated instances are deleted an hour later.
        crate::api::lifecycle::collect_garbage(&e.api).await;
        assert_eq!(
            e.instance(id).await.state,
            "terminated",
            "kept within the hour"
        );
        {
            use crate::api::records::{InstanceRec, kind};
            let mut tx = e.api.read(ACCT).await.unwrap();
            let mut rec: InstanceRec = tx.must(kind::INSTANCE, "instance", id).await.unwrap();
            rec.terminated_ms = rec.terminated_ms.map(|t| t - 2 * 3600 * 1000);
            tx.put(kind::INSTANCE, id, &rec).unwrap();
            let rev = tx.commit().await.unwrap().unwrap();
            e.desired_at(rev).await;
        }
        crate::api::lifecycle::collect_garbage(&e.api).await;
        let gone = e
            .inst
            .describe_instances(req(
                TOKEN,
                pb::DescribeInstancesRequest {
                    instance_ids: vec![id.into()],
                    ..Default::default()
                },
            ))
            .await;
        check("terminated over an hour ago", gone, Code::NotFound, id);
        // A failed launch: terminated with the reason, address released.
        let b = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        let before = e.available(&s.subnet_id).await;
        e.report(
            &[(&b.instance_id, "failed", "sh: 1: /bin/nope: not found")],
            &[],
            &[],
        )
        .await;
        let got = e.instance(&b.instance_id).await;
        assert_eq!(got.state, "terminated");
        assert!(
            got.state_reason.contains("Server.LaunchFailed")
                && got.state_reason.contains("/bin/nope"),
            "{}",
            got.state_reason
        );
        assert_eq!(e.available(&s.subnet_id).await, before + 1);
        // Another host's report cannot move this host's instance.
        let c = e.run(TOKEN, &s.subnet_id, "").await.unwrap();
        Hosts::new(e.api.clone())
            .report_applied(req(
                AGENT,
                pb::ReportAppliedRequest {
                    host_id: "host-9".into(),
                    revision: 1,
                    instances: vec![pb::InstanceStatus {
                        instance_id: c.instance_id.clone(),
                        state: "running".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        assert_eq!(e.instance(&c.instance_id).await.state, "pending");
        // Bad requests.
        let bad = pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            instance_type: "t3.huge".into(),
            ..Default::default()
        };
        check(
            "type",
            e.run_req(TOKEN, bad).await,
            Code::InvalidArgument,
            "instance_type",
        );
        let bad = pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            user_data: vec![0; 16 * 1024 + 1],
            ..Default::default()
        };
        check(
            "user data",
            e.run_req(TOKEN, bad).await,
            Code::InvalidArgument,
            "user_data",
        );
        let bad = pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            command: "x".repeat(4097),
            ..Default::default()
        };
        check(
            "command",
            e.run_req(TOKEN, bad).await,
            Code::InvalidArgument,
            "command",
        );
    }

    /// Volumes and snapshots through their lifecycles with host reports; attachment rules.
    #[tokio::test]
    async fn volume_lifecycle_follows_host_reports() {
        let e = env().await;
        e.register_host("host-1", "192.168.77.2").await;
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let run_on = |host: &str| pb::RunInstancesRequest {
            subnet_id: s.subnet_id.clone(),
            host_id: host.into(),
            ..Default::default()
        };
        let i0 = e
            .run_req(TOKEN, run_on(HOST))
            .await
            .unwrap()
            .into_inner()
            .instances
            .remove(0)
            .instance_id;
        let i1 = e
            .run_req(TOKEN, run_on("host-1"))
            .await
            .unwrap()
            .into_inner()
            .instances
            .remove(0)
            .instance_id;
        let create = |snap: &str, size: u32| pb::CreateVolumeRequest {
            size_gib: size,
            host_id: HOST.into(),
            snapshot_id: snap.into(),
            ..Default::default()
        };
        let v = e
            .vols
            .create_volume(req(TOKEN, create("", 2)))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let vid = v.volume_id.as_str();
        let attach = |vol: &str, inst: &str, dev: &str, path: &str| {
            e.vols.attach_volume(req(
                TOKEN,
                pb::AttachVolumeRequest {
                    volume_id: vol.into(),
                    instance_id: inst.into(),
                    device: dev.into(),
                    mount_path: path.into(),
                },
            ))
        };
        check(
            "attach while creating",
            attach(vid, &i0, "xvdf", "/data").await,
            Code::FailedPrecondition,
            "creating",
        );
        e.report(&[], &[(vid, "available", "")], &[]).await;
        assert_eq!(e.volume(vid).await.unwrap().state, "available");
        check(
            "other host",
            attach(vid, &i1, "xvdf", "/data").await,
            Code::InvalidArgument,
            "instance_id",
        );
        check(
            "bad device",
            attach(vid, &i0, "/dev/../sda", "").await,
            Code::InvalidArgument,
            "device",
        );
        check(
            "bad path",
            attach(vid, &i0, "xvdf", "data").await,
            Code::InvalidArgument,
            "mount_path",
        );
        let got = attach(vid, &i0, "/dev/xvdf", "/data")
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(
            (
                got.state.as_str(),
                got.attachment_state.as_str(),
                got.device.as_str()
            ),
            ("in-use", "attaching", "/dev/xvdf")
        );
        attach(vid, &i0, "xvdf", "/data")
            .await
            .expect("the same attachment again is a no-op");
        let d = e.doc().await;
        let a = d
            .volumes
            .iter()
            .find(|x| x.id == vid)
            .unwrap()
            .attachment
            .clone()
            .unwrap();
        assert_eq!(
            (
                a.instance.as_str(),
                a.device.as_str(),
                a.mount_path.as_deref(),
                a.detach
            ),
            (i0.as_str(), "xvdf", Some("/data"), false)
        );
        let v2 = e
            .vols
            .create_volume(req(TOKEN, create("", 1)))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        e.report(&[], &[(&v2.volume_id, "available", "")], &[])
            .await;
        check(
            "device taken",
            attach(&v2.volume_id, &i0, "xvdf", "").await,
            Code::InvalidArgument,
            "device",
        );
        check(
            "path taken",
            attach(&v2.volume_id, &i0, "xvdg", "/data").await,
            Code::InvalidArgument,
            "mount_path",
        );
        e.report(&[], &[(vid, "attached", &i0)], &[]).await;
        assert_eq!(e.volume(vid).await.unwrap().attachment_state, "attached");
        let m = e.instance(&i0).await.block_device_mappings;
        assert_eq!(
            (
                m[0].device_name.as_str(),
                m[0].volume_id.as_str(),
                m[0].status.as_str()
            ),
            ("/dev/xvdf", vid, "attached")
        );
        let del = |id: &str| {
            e.vols.delete_volume(req(
                TOKEN,
                pb::DeleteVolumeRequest {
                    volume_id: id.into(),
                },
            ))
        };
        check(
            "delete attached",
            del(vid).await,
            Code::FailedPrecondition,
            "VolumeInUse",
        );
        // Snapshot while attached; a volume from it.
        let snap = e
            .vols
            .create_snapshot(req(
                TOKEN,
                pb::CreateSnapshotRequest {
                    volume_id: vid.into(),
                    description: "d".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!((snap.state.as_str(), snap.volume_size_gib), ("pending", 2));
        check(
            "from a pending snapshot",
            e.vols
                .create_volume(req(TOKEN, create(&snap.snapshot_id, 0)))
                .await,
            Code::FailedPrecondition,
            "pending",
        );
        e.report(&[], &[], &[(&snap.snapshot_id, "completed")])
            .await;
        check(
            "smaller than the snapshot",
            e.vols
                .create_volume(req(TOKEN, create(&snap.snapshot_id, 1)))
                .await,
            Code::InvalidArgument,
            "size_gib",
        );
        let v3 = e
            .vols
            .create_volume(req(TOKEN, create(&snap.snapshot_id, 0)))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(
            (v3.size_gib, v3.snapshot_id.as_str()),
            (2, snap.snapshot_id.as_str())
        );
        let delsnap = |id: &str| {
            e.vols.delete_snapshot(req(
                TOKEN,
                pb::DeleteSnapshotRequest {
                    snapshot_id: id.into(),
                },
            ))
        };
        check(
            "snapshot in use",
            delsnap(&snap.snapshot_id).await,
            Code::FailedPrecondition,
            &v3.volume_id,
        );
        e.report(&[], &[(&v3.volume_id, "available", "")], &[])
            .await;
        delsnap(&snap.snapshot_id).await.unwrap();
        assert!(
            e.doc()
                .await
                .snapshots
                .iter()
                .any(|x| x.id == snap.snapshot_id && x.delete)
        );
        e.report(&[], &[], &[(&snap.snapshot_id, "deleted")]).await;
        let gone = e
            .vols
            .describe_snapshots(req(
                TOKEN,
                pb::DescribeSnapshotsRequest {
                    snapshot_ids: vec![snap.snapshot_id.clone()],
                    ..Default::default()
                },
            ))
            .await;
        check("snapshot gone", gone, Code::NotFound, &snap.snapshot_id);
        // Detach: detaching until the host reports it released.
        let got = e
            .vols
            .detach_volume(req(
                TOKEN,
                pb::DetachVolumeRequest {
                    volume_id: vid.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(got.attachment_state, "detaching");
        assert!(
            e.doc()
                .await
                .volumes
                .iter()
                .find(|x| x.id == vid)
                .unwrap()
                .attachment
                .as_ref()
                .unwrap()
                .detach
        );
        e.report(&[], &[(vid, "attached", &i0)], &[]).await;
        assert_eq!(e.volume(vid).await.unwrap().attachment_state, "detaching");
        e.report(&[], &[(vid, "available", "")], &[]).await;
        let got = e.volume(vid).await.unwrap();
        assert_eq!(
            (got.state.as_str(), got.attached_instance_id.as_str()),
            ("available", "")
        );
        // Terminating an instance detaches its volumes.
        attach(vid, &i0, "xvdf", "").await.unwrap();
        e.terminate(TOKEN, &[&i0]).await.unwrap();
        assert_eq!(e.volume(vid).await.unwrap().attachment_state, "detaching");
        e.report(&[(&i0, "terminated", "")], &[(vid, "available", "")], &[])
            .await;
        assert_eq!(e.volume(vid).await.unwrap().state, "available");
        // Delete: deleting, then gone once the host deleted the file.
        del(vid).await.unwrap();
        assert!(
            e.doc()
                .await
                .volumes
                .iter()
                .any(|x| x.id == vid && x.delete)
        );
        e.report(&[], &[(vid, "deleted", "")], &[]).await;
        check("deleted", e.volume(vid).await, Code::NotFound, vid);
    }

    /// Terminating several instances of one target group in one call removes them all from
    /// it (each record is written once per transaction: a second, stale write of the group
    /// used to put the first instance back).
    #[tokio::test]
    async fn terminating_several_targets_of_one_group_removes_all() {
        use vpc_proto::v1::load_balancer_service_server::LoadBalancerService as _;
        let e = env().await;
        let lbs = crate::api::lb::LoadBalancers::new(e.api.clone());
        let vpc = e.vpc(TOKEN, "10.0.0.0/16").await;
        let s = e.subnet(TOKEN, &vpc.vpc_id, "10.0.1.0/24").await;
        let a = e.run(TOKEN, &s.subnet_id, "").await.unwrap().instance_id;
        let b = e.run(TOKEN, &s.subnet_id, "").await.unwrap().instance_id;
        let tg = lbs
            .create_target_group(req(
                TOKEN,
                pb::CreateTargetGroupRequest {
                    name: "web".into(),
                    vpc_id: vpc.vpc_id.clone(),
                    protocol: "tcp".into(),
                    port: 80,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .target_group
            .unwrap()
            .target_group_id;
        lbs.register_targets(req(
            TOKEN,
            pb::RegisterTargetsRequest {
                target_group_id: tg.clone(),
                targets: [&a, &b]
                    .iter()
                    .map(|id| pb::Target {
                        id: (*id).clone(),
                        ..Default::default()
                    })
                    .collect(),
            },
        ))
        .await
        .unwrap();
        e.terminate(TOKEN, &[&a, &b]).await.unwrap();
        let got = lbs
            .describe_target_groups(req(
                TOKEN,
                pb::DescribeTargetGroupsRequest {
                    target_group_ids: vec![tg],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .target_groups
            .remove(0);
        assert!(got.targets.is_empty(), "{:?}", got.targets);
    }
}
