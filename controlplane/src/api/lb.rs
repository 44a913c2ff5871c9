//! `LoadBalancerService`: load balancers, listeners, target groups, targets.
//!
//! AWS NLB semantics (see the shared semantics): a load balancer has a VIP in one subnet
//! (the highest free address unless one is given) and listeners (protocol, port) that
//! forward to a target group of the same VPC and protocol; a target group holds instance
//! targets (port, weight) and its health-check settings. The rules match what the
//! datapath planner ([`crate::lb::plan()`]) accepts, so every committed state plans.
//!
//! Where the API is not AWS's:
//! - `ModifyTargetGroup` replaces the whole health check when one is given (its zero
//!   fields mean the defaults, as at creation); an absent one leaves it unchanged.
//! - Registering a registered target (same instance and port) again is a no-op, except that
//!   a weight given explicitly replaces the old one.
//! - Deregistering with port 0 removes every registration of the instance.

use std::collections::{BTreeMap, BTreeSet};

use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, load_balancer_service_server::LoadBalancerService};

use super::error::{ApiError, ApiResult};
use super::network::pb_tags;
use super::records::{
    InstanceRec, LbRec, ListenerRec, Meta, SubnetRec, TgRec, VpcRec, child_key, kind, now_ms,
    rec_prefix,
};
use super::tx::Tx;
use super::{Api, by_ids, claim_token, ids, ipam, list_page, respond, validate};
use crate::lb::model::{
    HealthCheck, HealthCheckProtocol, LbProtocol, TargetRef, default_deregistration_delay,
};

/// Longest load-balancer and target-group name (AWS: 32).
pub const NAME_MAX: usize = 32;
/// Longest HTTP health-check path (AWS: 1024).
pub const PATH_MAX: usize = 1024;
/// Largest deregistration delay, seconds (AWS: 3600).
pub const MAX_DEREGISTRATION_DELAY: u32 = 3600;
/// Largest target weight.
pub const MAX_WEIGHT: u32 = 100;

/// The service.
#[derive(Clone, Debug)]
pub struct LoadBalancers {
    api: Api,
}

impl LoadBalancers {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        LoadBalancers { api }
    }
}

// ---------------------------------------------------------------------------------------
// Field validation.

/// A listener or target-group protocol: TCP or UDP (any case).
fn protocol(field: &str, text: &str) -> ApiResult<LbProtocol> {
    match text.trim().to_ascii_uppercase().as_str() {
        "TCP" => Ok(LbProtocol::Tcp),
        "UDP" => Ok(LbProtocol::Udp),
        "" => Err(ApiError::invalid(field, "required: TCP or UDP")),
        _ => Err(ApiError::invalid(
            field,
            format!("{text:?} is not supported: TCP or UDP"),
        )),
    }
}

/// A listener, target-group or target port: 1-65535.
fn port(field: &str, v: u32) -> ApiResult<u16> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ApiError::invalid(
            field,
            format!("{v} is not a port (1-65535)"),
        )),
    }
}

/// A deregistration delay: absent stays absent; 0-3600 seconds.
fn deregistration_delay(v: Option<u32>) -> ApiResult<Option<u32>> {
    match v {
        Some(d) if d > MAX_DEREGISTRATION_DELAY => Err(ApiError::invalid(
            "deregistration_delay_seconds",
            format!("{d}: expected 0 to {MAX_DEREGISTRATION_DELAY} seconds"),
        )),
        other => Ok(other),
    }
}

/// Seconds as a person reads them (`5`, `0.5`).
fn secs(ms: u32) -> String {
    if ms.is_multiple_of(1000) {
        (ms / 1000).to_string()
    } else {
        format!("{}", f64::from(ms) / 1000.0)
    }
}

/// Health-check settings from the API (absent or zero fields: the defaults). Ranges as AWS
/// NLB: interval 5-300 s (the floor is `min_interval_ms`, as the planner's), timeout 2-120 s
/// and less than the interval, thresholds 2-10, HTTP path starting with `/`.
fn health_check(h: Option<&pb::HealthCheck>, min_interval_ms: u32) -> ApiResult<HealthCheck> {
    let mut out = HealthCheck::default();
    let Some(h) = h else {
        check_interval(
            "health_check.interval_seconds",
            out.interval,
            min_interval_ms,
        )?;
        return Ok(out);
    };
    out.protocol = match h.protocol.trim().to_ascii_uppercase().as_str() {
        "" | "TCP" => HealthCheckProtocol::Tcp,
        "HTTP" => HealthCheckProtocol::Http,
        _ => {
            return Err(ApiError::invalid(
                "health_check.protocol",
                format!("{:?} is not supported: TCP or HTTP", h.protocol),
            ));
        }
    };
    out.port = match h.port {
        0 => None,
        p => Some(port("health_check.port", p)?),
    };
    match out.protocol {
        HealthCheckProtocol::Http => {
            if !h.path.is_empty() {
                if !h.path.starts_with('/') {
                    return Err(ApiError::invalid(
                        "health_check.path",
                        format!("{:?}: expected a path starting with /", h.path),
                    ));
                }
                if h.path.len() > PATH_MAX || !h.path.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ApiError::invalid(
                        "health_check.path",
                        format!("at most {PATH_MAX} printable ASCII characters without spaces"),
                    ));
                }
                out.path = h.path.clone();
            }
        }
        HealthCheckProtocol::Tcp => {
            if !h.path.is_empty() {
                return Err(ApiError::invalid(
                    "health_check.path",
                    "a path applies to HTTP health checks only",
                ));
            }
        }
    }
    if h.interval_seconds != 0 {
        out.interval = f64::from(h.interval_seconds);
    }
    check_interval(
        "health_check.interval_seconds",
        out.interval,
        min_interval_ms,
    )?;
    if h.timeout_seconds != 0 {
        if !(2..=120).contains(&h.timeout_seconds) {
            return Err(ApiError::invalid(
                "health_check.timeout_seconds",
                format!("{}: expected 2 to 120 seconds", h.timeout_seconds),
            ));
        }
        let t = f64::from(h.timeout_seconds);
        if t >= out.interval {
            return Err(ApiError::invalid(
                "health_check.timeout_seconds",
                format!(
                    "{t} s: the timeout must be less than the interval ({} s)",
                    out.interval
                ),
            ));
        }
        out.timeout = Some(t);
    }
    for (field, v, slot) in [
        (
            "health_check.healthy_threshold",
            h.healthy_threshold,
            &mut out.healthy_threshold,
        ),
        (
            "health_check.unhealthy_threshold",
            h.unhealthy_threshold,
            &mut out.unhealthy_threshold,
        ),
    ] {
        if v != 0 {
            if !(2..=10).contains(&v) {
                return Err(ApiError::invalid(field, format!("{v}: expected 2 to 10")));
            }
            *slot = v;
        }
    }
    Ok(out)
}

fn check_interval(field: &str, interval: f64, min_interval_ms: u32) -> ApiResult<()> {
    let min = f64::from(min_interval_ms) / 1000.0;
    if !(interval >= min && interval <= 300.0) {
        return Err(ApiError::invalid(
            field,
            format!(
                "{interval}: expected {} to 300 seconds",
                secs(min_interval_ms)
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Views.

fn protocol_name(p: LbProtocol) -> String {
    match p {
        LbProtocol::Tcp => "TCP".into(),
        LbProtocol::Udp => "UDP".into(),
    }
}

fn pb_listener(l: &ListenerRec) -> pb::Listener {
    pb::Listener {
        listener_id: l.id.clone(),
        protocol: protocol_name(l.protocol),
        port: u32::from(l.port),
        target_group_id: l.target_group.clone(),
    }
}

fn pb_lb(l: &LbRec) -> pb::LoadBalancer {
    pb::LoadBalancer {
        load_balancer_id: l.meta.id.clone(),
        name: l.name.clone(),
        subnet_id: l.subnet.clone(),
        vpc_id: l.vpc.clone(),
        vip: l.vip.to_string(),
        listeners: l.listeners.iter().map(pb_listener).collect(),
        state: "active".into(),
        owner_id: l.meta.account.clone(),
        tags: pb_tags(&l.meta.tags),
    }
}

fn pb_health(h: &HealthCheck) -> pb::HealthCheck {
    let http = h.protocol == HealthCheckProtocol::Http;
    pb::HealthCheck {
        protocol: if http { "HTTP" } else { "TCP" }.into(),
        port: h.port.map_or(0, u32::from),
        path: if http { h.path.clone() } else { String::new() },
        interval_seconds: h.interval.round() as u32,
        timeout_seconds: h.timeout_secs().round() as u32,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    }
}

fn pb_tg(t: &TgRec, lbs: Vec<String>) -> pb::TargetGroup {
    pb::TargetGroup {
        target_group_id: t.meta.id.clone(),
        name: t.name.clone(),
        vpc_id: t.vpc.clone(),
        protocol: protocol_name(t.protocol),
        port: u32::from(t.port),
        health_check: Some(pb_health(&t.health_check)),
        deregistration_delay_seconds: t.deregistration_delay,
        targets: t
            .targets
            .iter()
            .map(|r| pb::Target {
                id: r.id.clone(),
                port: u32::from(r.port.unwrap_or(t.port)),
                weight: r.weight.unwrap_or(1),
            })
            .collect(),
        load_balancer_ids: lbs,
        owner_id: t.meta.account.clone(),
        tags: pb_tags(&t.meta.tags),
    }
}

/// Target group -> the load balancers whose listeners forward to it (sorted, unique).
async fn users(tx: &Tx) -> ApiResult<BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for lb in tx.all::<LbRec>(kind::LB).await? {
        for l in &lb.listeners {
            out.entry(l.target_group.clone())
                .or_default()
                .insert(lb.meta.id.clone());
        }
    }
    Ok(out)
}

async fn tg_view(tx: &Tx, t: &TgRec) -> ApiResult<pb::TargetGroup> {
    let lbs = users(tx)
        .await?
        .remove(&t.meta.id)
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(pb_tg(t, lbs))
}

/// An account's objects of a kind counted against a quota: RESOURCE_EXHAUSTED when full.
async fn check_quota(tx: &Tx, k: &str, what: &str, quota: usize, code: &str) -> ApiResult<()> {
    let count = tx
        .keys(&rec_prefix(tx.account(), k), quota + 1)
        .await?
        .len();
    if count >= quota {
        return Err(ApiError::Exhausted(format!(
            "the account has {count} {what}; the quota is {quota} ({code})"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Handlers.

impl LoadBalancers {
    async fn create_load_balancer(
        &self,
        account: String,
        req: pb::CreateLoadBalancerRequest,
    ) -> ApiResult<Response<pb::CreateLoadBalancerResponse>> {
        let name = validate::name("name", &req.name, NAME_MAX)?;
        let subnet_id = validate::id("subnet_id", kind::SUBNET, &req.subnet_id)?;
        let vip = match req.vip.trim() {
            "" => None,
            v => Some(validate::ipv4("vip", v)?),
        };
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.load_balancers_per_account;
        let (lb, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, name, subnet_id, tags, token) = (
                    &req,
                    name.clone(),
                    subnet_id.clone(),
                    tags.clone(),
                    token.clone(),
                );
                async move {
                    let id = ids::new_id(kind::LB);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::LB,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let l: LbRec = tx.must(kind::LB, "load balancer", &existing[0]).await?;
                        return Ok((tx, l));
                    }
                    let subnet: SubnetRec = tx.must(kind::SUBNET, "subnet", &subnet_id).await?;
                    if let Some(other) = tx
                        .all::<LbRec>(kind::LB)
                        .await?
                        .into_iter()
                        .find(|l| l.name == name)
                    {
                        return Err(ApiError::AlreadyExists(format!(
                            "load balancer {} is already named {name:?} \
                             (DuplicateLoadBalancerName)",
                            other.meta.id
                        )));
                    }
                    check_quota(
                        &tx,
                        kind::LB,
                        "load balancers",
                        quota,
                        "TooManyLoadBalancers",
                    )
                    .await?;
                    let mut taken = BTreeSet::new();
                    let vip = ipam::allocate(
                        &mut tx,
                        &subnet_id,
                        subnet.cidr,
                        &id,
                        vip.map(|ip| ("vip", ip)),
                        ipam::From::Top,
                        &mut taken,
                    )
                    .await?;
                    let acct = tx.account().to_owned();
                    let l = LbRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct.clone(),
                            tags,
                            created_ms: now_ms(),
                        },
                        name,
                        subnet: subnet_id.clone(),
                        vpc: subnet.vpc.clone(),
                        vip,
                        listeners: Vec::new(),
                    };
                    tx.put(kind::LB, &id, &l)?;
                    tx.put_raw(child_key(&acct, &subnet.vpc, kind::LB, &id), Vec::new());
                    tx.put_raw(child_key(&acct, &subnet_id, kind::LB, &id), Vec::new());
                    Ok((tx, l))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateLoadBalancerResponse {
                load_balancer: Some(pb_lb(&lb)),
            },
            rev,
        ))
    }

    async fn delete_load_balancer(
        &self,
        account: String,
        req: pb::DeleteLoadBalancerRequest,
    ) -> ApiResult<Response<pb::DeleteLoadBalancerResponse>> {
        let id = validate::id("load_balancer_id", kind::LB, &req.load_balancer_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let l: LbRec = tx.must(kind::LB, "load balancer", &id).await?;
                    let acct = tx.account().to_owned();
                    ipam::release(&mut tx, &l.subnet, l.vip);
                    tx.delete(kind::LB, &id);
                    tx.delete_raw(child_key(&acct, &l.vpc, kind::LB, &id));
                    tx.delete_raw(child_key(&acct, &l.subnet, kind::LB, &id));
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteLoadBalancerResponse {}, rev))
    }

    async fn create_listener(
        &self,
        account: String,
        req: pb::CreateListenerRequest,
    ) -> ApiResult<Response<pb::CreateListenerResponse>> {
        let lb_id = validate::id("load_balancer_id", kind::LB, &req.load_balancer_id)?;
        let proto = protocol("protocol", &req.protocol)?;
        let port = port("port", req.port)?;
        let tg_id = validate::id("target_group_id", kind::TG, &req.target_group_id)?;
        let quota = self.api.quotas.lb.listeners_per_lb;
        let (listener, rev) = self
            .api
            .write(&account, |mut tx| {
                let (lb_id, tg_id) = (lb_id.clone(), tg_id.clone());
                async move {
                    let mut lb: LbRec = tx.must(kind::LB, "load balancer", &lb_id).await?;
                    let tg: TgRec = tx.must(kind::TG, "target group", &tg_id).await?;
                    if let Some(l) = lb
                        .listeners
                        .iter()
                        .find(|l| l.protocol == proto && l.port == port)
                    {
                        // AWS: creating the same listener again succeeds.
                        if l.target_group == tg_id {
                            let l = l.clone();
                            return Ok((tx, l));
                        }
                        return Err(ApiError::AlreadyExists(format!(
                            "load balancer {lb_id} already has listener {} on {}/{port} \
                             (DuplicateListener)",
                            l.id,
                            protocol_name(proto)
                        )));
                    }
                    if tg.vpc != lb.vpc {
                        return Err(ApiError::invalid(
                            "target_group_id",
                            format!(
                                "target group {tg_id} is in {}, load balancer {lb_id} in {}",
                                tg.vpc, lb.vpc
                            ),
                        ));
                    }
                    if tg.protocol != proto {
                        return Err(ApiError::invalid(
                            "protocol",
                            format!(
                                "{}: target group {tg_id} is {}; a listener forwards its own \
                                 protocol",
                                protocol_name(proto),
                                protocol_name(tg.protocol)
                            ),
                        ));
                    }
                    if lb.listeners.len() >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "load balancer {lb_id} has {} listeners; the quota is {quota} \
                             (TooManyListeners)",
                            lb.listeners.len()
                        )));
                    }
                    let l = ListenerRec {
                        id: ids::new_id(kind::LISTENER),
                        protocol: proto,
                        port,
                        target_group: tg_id,
                    };
                    lb.listeners.push(l.clone());
                    tx.put(kind::LB, &lb_id, &lb)?;
                    Ok((tx, l))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateListenerResponse {
                listener: Some(pb_listener(&listener)),
            },
            rev,
        ))
    }

    async fn delete_listener(
        &self,
        account: String,
        req: pb::DeleteListenerRequest,
    ) -> ApiResult<Response<pb::DeleteListenerResponse>> {
        let id = validate::id("listener_id", kind::LISTENER, &req.listener_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let mut lb = tx
                        .all::<LbRec>(kind::LB)
                        .await?
                        .into_iter()
                        .find(|lb| lb.listeners.iter().any(|l| l.id == id))
                        .ok_or_else(|| ApiError::not_found("listener", id.clone()))?;
                    lb.listeners.retain(|l| l.id != id);
                    tx.put(kind::LB, &lb.meta.id, &lb)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteListenerResponse {}, rev))
    }

    async fn create_target_group(
        &self,
        account: String,
        req: pb::CreateTargetGroupRequest,
    ) -> ApiResult<Response<pb::CreateTargetGroupResponse>> {
        let name = validate::name("name", &req.name, NAME_MAX)?;
        let vpc_id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
        let proto = protocol("protocol", &req.protocol)?;
        let port = port("port", req.port)?;
        let health = health_check(
            req.health_check.as_ref(),
            self.api.quotas.lb.min_health_check_interval_ms,
        )?;
        let delay = deregistration_delay(req.deregistration_delay_seconds)?
            .unwrap_or_else(default_deregistration_delay);
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.target_groups_per_account;
        let (tg, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, name, vpc_id, health, tags, token) = (
                    &req,
                    name.clone(),
                    vpc_id.clone(),
                    health.clone(),
                    tags.clone(),
                    token.clone(),
                );
                async move {
                    let id = ids::new_id(kind::TG);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::TG,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let t: TgRec = tx.must(kind::TG, "target group", &existing[0]).await?;
                        return Ok((tx, t));
                    }
                    tx.must::<VpcRec>(kind::VPC, "VPC", &vpc_id).await?;
                    if let Some(other) = tx
                        .all::<TgRec>(kind::TG)
                        .await?
                        .into_iter()
                        .find(|t| t.name == name)
                    {
                        return Err(ApiError::AlreadyExists(format!(
                            "target group {} is already named {name:?} \
                             (DuplicateTargetGroupName)",
                            other.meta.id
                        )));
                    }
                    check_quota(&tx, kind::TG, "target groups", quota, "TooManyTargetGroups")
                        .await?;
                    let acct = tx.account().to_owned();
                    let t = TgRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct.clone(),
                            tags,
                            created_ms: now_ms(),
                        },
                        name,
                        vpc: vpc_id.clone(),
                        protocol: proto,
                        port,
                        health_check: health,
                        deregistration_delay: delay,
                        targets: Vec::new(),
                    };
                    tx.put(kind::TG, &id, &t)?;
                    tx.put_raw(child_key(&acct, &vpc_id, kind::TG, &id), Vec::new());
                    Ok((tx, t))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateTargetGroupResponse {
                target_group: Some(pb_tg(&tg, Vec::new())),
            },
            rev,
        ))
    }

    async fn modify_target_group(
        &self,
        account: String,
        req: pb::ModifyTargetGroupRequest,
    ) -> ApiResult<Response<pb::ModifyTargetGroupResponse>> {
        let id = validate::id("target_group_id", kind::TG, &req.target_group_id)?;
        let health = match &req.health_check {
            Some(h) => Some(health_check(
                Some(h),
                self.api.quotas.lb.min_health_check_interval_ms,
            )?),
            None => None,
        };
        let delay = deregistration_delay(req.deregistration_delay_seconds)?;
        let (view, rev) = self
            .api
            .write(&account, |mut tx| {
                let (id, health) = (id.clone(), health.clone());
                async move {
                    let mut t: TgRec = tx.must(kind::TG, "target group", &id).await?;
                    if let Some(h) = health {
                        t.health_check = h;
                    }
                    if let Some(d) = delay {
                        t.deregistration_delay = d;
                    }
                    tx.put(kind::TG, &id, &t)?;
                    let view = tg_view(&tx, &t).await?;
                    Ok((tx, view))
                }
            })
            .await?;
        Ok(respond(
            pb::ModifyTargetGroupResponse {
                target_group: Some(view),
            },
            rev,
        ))
    }

    async fn delete_target_group(
        &self,
        account: String,
        req: pb::DeleteTargetGroupRequest,
    ) -> ApiResult<Response<pb::DeleteTargetGroupResponse>> {
        let id = validate::id("target_group_id", kind::TG, &req.target_group_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let t: TgRec = tx.must(kind::TG, "target group", &id).await?;
                    for lb in tx.all::<LbRec>(kind::LB).await? {
                        if let Some(l) = lb.listeners.iter().find(|l| l.target_group == id) {
                            return Err(ApiError::Precondition(format!(
                                "target group {id} is in use by listener {} of load balancer \
                                 {}; delete the listener first (ResourceInUse)",
                                l.id, lb.meta.id
                            )));
                        }
                    }
                    let acct = tx.account().to_owned();
                    tx.delete(kind::TG, &id);
                    tx.delete_raw(child_key(&acct, &t.vpc, kind::TG, &id));
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteTargetGroupResponse {}, rev))
    }

    async fn register_targets(
        &self,
        account: String,
        req: pb::RegisterTargetsRequest,
    ) -> ApiResult<Response<pb::RegisterTargetsResponse>> {
        let id = validate::id("target_group_id", kind::TG, &req.target_group_id)?;
        if req.targets.is_empty() {
            return Err(ApiError::invalid(
                "targets",
                "required: at least one target",
            ));
        }
        // (instance, port: 0 = the group's, weight: None = keep or 1).
        let mut wanted = Vec::with_capacity(req.targets.len());
        for (i, t) in req.targets.iter().enumerate() {
            let inst = validate::id(&format!("targets[{i}].id"), kind::INSTANCE, &t.id)?;
            let p = match t.port {
                0 => None,
                p => Some(port(&format!("targets[{i}].port"), p)?),
            };
            let w = match t.weight {
                0 => None,
                w @ 1..=MAX_WEIGHT => Some(w),
                w => {
                    return Err(ApiError::invalid(
                        format!("targets[{i}].weight"),
                        format!("{w}: expected 1 to {MAX_WEIGHT}"),
                    ));
                }
            };
            wanted.push((inst, p, w));
        }
        let quota = self.api.quotas.lb.targets_per_group;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let (id, wanted) = (id.clone(), wanted.clone());
                async move {
                    let mut t: TgRec = tx.must(kind::TG, "target group", &id).await?;
                    let mut changed = false;
                    for (i, (inst, p, w)) in wanted.into_iter().enumerate() {
                        let field = format!("targets[{i}].id");
                        let rec: InstanceRec =
                            tx.get(kind::INSTANCE, &inst).await?.ok_or_else(|| {
                                ApiError::invalid(
                                    &field,
                                    format!("instance {inst} does not exist (InvalidTarget)"),
                                )
                            })?;
                        if rec.vpc != t.vpc {
                            return Err(ApiError::invalid(
                                &field,
                                format!(
                                    "instance {inst} is in {}, target group {id} in {} \
                                     (InvalidTarget)",
                                    rec.vpc, t.vpc
                                ),
                            ));
                        }
                        if !matches!(rec.state.as_str(), "pending" | "running") {
                            return Err(ApiError::invalid(
                                &field,
                                format!(
                                    "instance {inst} is {}; only pending and running instances \
                                     can be registered (InvalidTarget)",
                                    rec.state
                                ),
                            ));
                        }
                        let p = p.unwrap_or(t.port);
                        let group_port = t.port;
                        let existing = t
                            .targets
                            .iter_mut()
                            .find(|r| r.id == inst && r.port.unwrap_or(group_port) == p);
                        match existing {
                            Some(r) => {
                                if let Some(w) = w
                                    && r.weight.unwrap_or(1) != w
                                {
                                    r.weight = Some(w);
                                    changed = true;
                                }
                            }
                            None => {
                                t.targets.push(TargetRef {
                                    id: inst,
                                    port: Some(p),
                                    weight: Some(w.unwrap_or(1)),
                                });
                                changed = true;
                            }
                        }
                    }
                    if t.targets.len() > quota {
                        return Err(ApiError::Exhausted(format!(
                            "target group {id} would have {} targets; the quota is {quota} \
                             (TooManyTargets)",
                            t.targets.len()
                        )));
                    }
                    if changed {
                        tx.put(kind::TG, &id, &t)?;
                    }
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::RegisterTargetsResponse {}, rev))
    }

    async fn deregister_targets(
        &self,
        account: String,
        req: pb::DeregisterTargetsRequest,
    ) -> ApiResult<Response<pb::DeregisterTargetsResponse>> {
        let id = validate::id("target_group_id", kind::TG, &req.target_group_id)?;
        if req.targets.is_empty() {
            return Err(ApiError::invalid(
                "targets",
                "required: at least one target",
            ));
        }
        let mut wanted = Vec::with_capacity(req.targets.len());
        for (i, t) in req.targets.iter().enumerate() {
            let inst = validate::id(&format!("targets[{i}].id"), kind::INSTANCE, &t.id)?;
            let p = match t.port {
                0 => None,
                p => Some(port(&format!("targets[{i}].port"), p)?),
            };
            wanted.push((inst, p));
        }
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let (id, wanted) = (id.clone(), wanted.clone());
                async move {
                    let mut t: TgRec = tx.must(kind::TG, "target group", &id).await?;
                    let group_port = t.port;
                    for (i, (inst, p)) in wanted.into_iter().enumerate() {
                        let matches = |r: &TargetRef| {
                            r.id == inst && p.is_none_or(|p| r.port.unwrap_or(group_port) == p)
                        };
                        if !t.targets.iter().any(matches) {
                            let at = p.map_or(String::new(), |p| format!(" on port {p}"));
                            return Err(ApiError::invalid(
                                format!("targets[{i}].id"),
                                format!(
                                    "{inst}{at} is not registered with target group {id} \
                                     (InvalidTarget)"
                                ),
                            ));
                        }
                        t.targets.retain(|r| !matches(r));
                    }
                    tx.put(kind::TG, &id, &t)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeregisterTargetsResponse {}, rev))
    }
}

#[tonic::async_trait]
impl LoadBalancerService for LoadBalancers {
    async fn create_load_balancer(
        &self,
        r: Request<pb::CreateLoadBalancerRequest>,
    ) -> Result<Response<pb::CreateLoadBalancerResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::create_load_balancer(self, account, r.into_inner()).await?)
    }

    async fn describe_load_balancers(
        &self,
        r: Request<pb::DescribeLoadBalancersRequest>,
    ) -> Result<Response<pb::DescribeLoadBalancersResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (lbs, next_token) = if req.load_balancer_ids.is_empty() {
            list_page::<LbRec>(&tx, kind::LB, None, req.page.as_ref()).await?
        } else {
            (
                by_ids(
                    &tx,
                    kind::LB,
                    "load balancer",
                    "load_balancer_ids",
                    &req.load_balancer_ids,
                )
                .await?,
                String::new(),
            )
        };
        Ok(Response::new(pb::DescribeLoadBalancersResponse {
            load_balancers: lbs.iter().map(pb_lb).collect(),
            next_token,
        }))
    }

    async fn delete_load_balancer(
        &self,
        r: Request<pb::DeleteLoadBalancerRequest>,
    ) -> Result<Response<pb::DeleteLoadBalancerResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::delete_load_balancer(self, account, r.into_inner()).await?)
    }

    async fn create_listener(
        &self,
        r: Request<pb::CreateListenerRequest>,
    ) -> Result<Response<pb::CreateListenerResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::create_listener(self, account, r.into_inner()).await?)
    }

    async fn delete_listener(
        &self,
        r: Request<pb::DeleteListenerRequest>,
    ) -> Result<Response<pb::DeleteListenerResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::delete_listener(self, account, r.into_inner()).await?)
    }

    async fn create_target_group(
        &self,
        r: Request<pb::CreateTargetGroupRequest>,
    ) -> Result<Response<pb::CreateTargetGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::create_target_group(self, account, r.into_inner()).await?)
    }

    async fn describe_target_groups(
        &self,
        r: Request<pb::DescribeTargetGroupsRequest>,
    ) -> Result<Response<pb::DescribeTargetGroupsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (tgs, next_token) = if req.target_group_ids.is_empty() {
            list_page::<TgRec>(&tx, kind::TG, None, req.page.as_ref()).await?
        } else {
            (
                by_ids(
                    &tx,
                    kind::TG,
                    "target group",
                    "target_group_ids",
                    &req.target_group_ids,
                )
                .await?,
                String::new(),
            )
        };
        let mut users = users(&tx).await?;
        let target_groups = tgs
            .iter()
            .map(|t| {
                let lbs = users
                    .remove(&t.meta.id)
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                pb_tg(t, lbs)
            })
            .collect();
        Ok(Response::new(pb::DescribeTargetGroupsResponse {
            target_groups,
            next_token,
        }))
    }

    async fn modify_target_group(
        &self,
        r: Request<pb::ModifyTargetGroupRequest>,
    ) -> Result<Response<pb::ModifyTargetGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::modify_target_group(self, account, r.into_inner()).await?)
    }

    async fn delete_target_group(
        &self,
        r: Request<pb::DeleteTargetGroupRequest>,
    ) -> Result<Response<pb::DeleteTargetGroupResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::delete_target_group(self, account, r.into_inner()).await?)
    }

    async fn register_targets(
        &self,
        r: Request<pb::RegisterTargetsRequest>,
    ) -> Result<Response<pb::RegisterTargetsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::register_targets(self, account, r.into_inner()).await?)
    }

    async fn describe_target_health(
        &self,
        r: Request<pb::DescribeTargetHealthRequest>,
    ) -> Result<Response<pb::DescribeTargetHealthResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let id = validate::id("target_group_id", kind::TG, &r.get_ref().target_group_id)?;
        let tx = self.api.read(&account).await?;
        let tg: TgRec = tx.must(kind::TG, "target group", &id).await?;
        let hosts = self.api.programming.hosts();
        let mut targets = Vec::new();
        for t in &tg.targets {
            let port = u32::from(t.port.unwrap_or(tg.port));
            let mut seen = false;
            for (host, live) in &hosts {
                for h in live
                    .target_health
                    .iter()
                    .filter(|h| h.target_group_id == id && h.target_id == t.id && h.port == port)
                {
                    seen = true;
                    targets.push(pb::TargetHealthDescription {
                        target_id: t.id.clone(),
                        port,
                        state: h.state.clone(),
                        reason: h.reason.clone(),
                        host_id: host.clone(),
                    });
                }
            }
            if !seen {
                targets.push(pb::TargetHealthDescription {
                    target_id: t.id.clone(),
                    port,
                    state: "unused".into(),
                    reason: "no host checks it yet: the group is behind no listener, or its \
                             load balancer's hosts have not reported"
                        .into(),
                    host_id: String::new(),
                });
            }
        }
        Ok(Response::new(pb::DescribeTargetHealthResponse { targets }))
    }

    async fn deregister_targets(
        &self,
        r: Request<pb::DeregisterTargetsRequest>,
    ) -> Result<Response<pb::DeregisterTargetsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(LoadBalancers::deregister_targets(self, account, r.into_inner()).await?)
    }
}

#[cfg(test)]
mod tests {
    use crate::api::test_support::*;
    use std::{net::Ipv4Addr, time::Duration};

    use tonic::{Code, Request, Response, Status};
    use tonic_types::StatusExt as _;
    use vpc_proto::v1::{self as pb, vpc_service_server::VpcService as _};

    use super::*;

    use crate::api::Quotas;
    use crate::api::network::Network;
    use crate::api::records::{HostRec, host_key};
    use crate::overlay::statefile::StateFile;

    const A1: &str = ACCT;
    const T1: &str = TOKEN;
    const A2: &str = OTHER;
    const T2: &str = OTHER_TOKEN;

    struct Env {
        api: Api,
        net: Network,
        /// Through the trait (the handlers' inherent methods share its names).
        lbs: Box<dyn LoadBalancerService>,
    }

    async fn env_with(quotas: Quotas) -> Env {
        let api = test_api(quotas).await;
        Env {
            net: Network::new(api.clone()),
            lbs: Box::new(LoadBalancers::new(api.clone())),
            api,
        }
    }

    async fn env() -> Env {
        env_with(Quotas::default()).await
    }

    /// The code and the field a status names (empty: none).
    fn fault(s: &Status) -> (Code, String) {
        let field = s
            .get_details_bad_request()
            .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
            .unwrap_or_default();
        (s.code(), field)
    }

    /// A failure expected of a table case: `None` is success.
    type Want<'a> = Option<(Code, &'a str)>;

    /// Checks a result against `None` (success) or `Some((code, field))`.
    fn check<T: std::fmt::Debug>(what: &str, got: &Result<T, Status>, want: Want) {
        match (got, want) {
            (Ok(_), None) => {}
            (Ok(v), Some(w)) => panic!("{what}: expected {w:?}, got success {v:?}"),
            (Err(s), None) => panic!("{what}: expected success, got {s:?}"),
            (Err(s), Some((code, field))) => assert_eq!(
                fault(s),
                (code, field.to_owned()),
                "{what}: {}",
                s.message()
            ),
        }
    }

    async fn vpc(e: &Env, token: &str, cidr: &str) -> String {
        let r = e
            .net
            .create_vpc(req(
                token,
                pb::CreateVpcRequest {
                    cidr_block: cidr.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        r.into_inner().vpc.unwrap().vpc_id
    }

    async fn subnet(e: &Env, token: &str, vpc: &str, cidr: &str) -> String {
        let r = e
            .net
            .create_subnet(req(
                token,
                pb::CreateSubnetRequest {
                    vpc_id: vpc.into(),
                    cidr_block: cidr.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        r.into_inner().subnet.unwrap().subnet_id
    }

    /// An instance written as the compute service does: record, subnet index, IPAM hold.
    async fn instance_in(e: &Env, account: &str, subnet: &str, state: &str) -> (String, Ipv4Addr) {
        let id = ids::new_id(kind::INSTANCE);
        let ((ip, _), _) = e
            .api
            .write(account, |mut tx| {
                let (id, subnet, state) = (id.clone(), subnet.to_owned(), state.to_owned());
                async move {
                    let s: SubnetRec = tx.must(kind::SUBNET, "subnet", &subnet).await?;
                    let v: VpcRec = tx.must(kind::VPC, "VPC", &s.vpc).await?;
                    let mut taken = BTreeSet::new();
                    let ip = ipam::allocate(
                        &mut tx,
                        &subnet,
                        s.cidr,
                        &id,
                        None,
                        ipam::From::Bottom,
                        &mut taken,
                    )
                    .await?;
                    let acct = tx.account().to_owned();
                    let rec = InstanceRec {
                        meta: Meta {
                            id: id.clone(),
                            account: acct.clone(),
                            tags: vec![],
                            created_ms: now_ms(),
                        },
                        subnet: subnet.clone(),
                        vpc: s.vpc.clone(),
                        host: "host-a".into(),
                        ip,
                        mac: ids::instance_mac(&id),
                        security_groups: vec![v.default_sg.clone()],
                        state,
                        instance_type: "t3.micro".into(),
                        state_reason: String::new(),
                        user_data: None,
                        command: None,
                        launch_ms: 0,
                        terminated_ms: None,
                    };
                    tx.put(kind::INSTANCE, &id, &rec)?;
                    tx.put_raw(child_key(&acct, &subnet, kind::INSTANCE, &id), Vec::new());
                    Ok((tx, (ip, ())))
                }
            })
            .await
            .unwrap();
        (id, ip)
    }

    async fn instance(e: &Env, account: &str, subnet: &str) -> String {
        instance_in(e, account, subnet, "running").await.0
    }

    /// Removes an instance written by [`instance_in`].
    async fn remove_instance(e: &Env, account: &str, id: &str) {
        e.api
            .write(account, |mut tx| {
                let id = id.to_owned();
                async move {
                    let rec: InstanceRec = tx.must(kind::INSTANCE, "instance", &id).await?;
                    let acct = tx.account().to_owned();
                    ipam::release(&mut tx, &rec.subnet, rec.ip);
                    tx.delete(kind::INSTANCE, &id);
                    tx.delete_raw(child_key(&acct, &rec.subnet, kind::INSTANCE, &id));
                    Ok((tx, ()))
                }
            })
            .await
            .unwrap();
    }

    fn lb_req(name: &str, subnet: &str, vip: &str) -> pb::CreateLoadBalancerRequest {
        pb::CreateLoadBalancerRequest {
            name: name.into(),
            subnet_id: subnet.into(),
            vip: vip.into(),
            ..Default::default()
        }
    }

    async fn create_lb(
        e: &Env,
        token: &str,
        r: pb::CreateLoadBalancerRequest,
    ) -> Result<pb::LoadBalancer, Status> {
        e.lbs
            .create_load_balancer(req(token, r))
            .await
            .map(|r| r.into_inner().load_balancer.unwrap())
    }

    fn tg_req(name: &str, vpc: &str, protocol: &str, port: u32) -> pb::CreateTargetGroupRequest {
        pb::CreateTargetGroupRequest {
            name: name.into(),
            vpc_id: vpc.into(),
            protocol: protocol.into(),
            port,
            ..Default::default()
        }
    }

    async fn create_tg(
        e: &Env,
        token: &str,
        r: pb::CreateTargetGroupRequest,
    ) -> Result<pb::TargetGroup, Status> {
        e.lbs
            .create_target_group(req(token, r))
            .await
            .map(|r| r.into_inner().target_group.unwrap())
    }

    async fn listener(
        e: &Env,
        token: &str,
        lb: &str,
        protocol: &str,
        port: u32,
        tg: &str,
    ) -> Result<pb::Listener, Status> {
        e.lbs
            .create_listener(req(
                token,
                pb::CreateListenerRequest {
                    load_balancer_id: lb.into(),
                    protocol: protocol.into(),
                    port,
                    target_group_id: tg.into(),
                },
            ))
            .await
            .map(|r| r.into_inner().listener.unwrap())
    }

    fn target(id: &str, port: u32, weight: u32) -> pb::Target {
        pb::Target {
            id: id.into(),
            port,
            weight,
        }
    }

    async fn register(
        e: &Env,
        token: &str,
        tg: &str,
        targets: Vec<pb::Target>,
    ) -> Result<Response<pb::RegisterTargetsResponse>, Status> {
        e.lbs
            .register_targets(req(
                token,
                pb::RegisterTargetsRequest {
                    target_group_id: tg.into(),
                    targets,
                },
            ))
            .await
    }

    async fn describe_tg(e: &Env, token: &str, tg: &str) -> Result<pb::TargetGroup, Status> {
        e.lbs
            .describe_target_groups(req(
                token,
                pb::DescribeTargetGroupsRequest {
                    target_group_ids: vec![tg.into()],
                    page: None,
                },
            ))
            .await
            .map(|r| r.into_inner().target_groups.remove(0))
    }

    async fn describe_lb(e: &Env, token: &str, lb: &str) -> Result<pb::LoadBalancer, Status> {
        e.lbs
            .describe_load_balancers(req(
                token,
                pb::DescribeLoadBalancersRequest {
                    load_balancer_ids: vec![lb.into()],
                    page: None,
                },
            ))
            .await
            .map(|r| r.into_inner().load_balancers.remove(0))
    }

    async fn delete_lb(e: &Env, token: &str, lb: &str) -> Result<i64, Status> {
        e.lbs
            .delete_load_balancer(req(
                token,
                pb::DeleteLoadBalancerRequest {
                    load_balancer_id: lb.into(),
                },
            ))
            .await
            .map(|r| revision(&r))
    }

    async fn delete_tg(e: &Env, token: &str, tg: &str) -> Result<i64, Status> {
        e.lbs
            .delete_target_group(req(
                token,
                pb::DeleteTargetGroupRequest {
                    target_group_id: tg.into(),
                },
            ))
            .await
            .map(|r| revision(&r))
    }

    const UNKNOWN_SUBNET: &str = "subnet-0123456789abcdef0";
    const UNKNOWN_VPC: &str = "vpc-0123456789abcdef0";
    const UNKNOWN_LB: &str = "lb-0123456789abcdef0";
    const UNKNOWN_TG: &str = "tg-0123456789abcdef0";
    const UNKNOWN_I: &str = "i-0123456789abcdef0";

    #[tokio::test]
    async fn create_load_balancer_validation() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        create_lb(&e, T1, lb_req("taken", &s, "")).await.unwrap();
        let bad_tag = pb::CreateLoadBalancerRequest {
            tags: vec![pb::Tag {
                key: "aws:x".into(),
                value: String::new(),
            }],
            ..lb_req("tagged", &s, "")
        };
        let long_token = pb::CreateLoadBalancerRequest {
            client_token: "x".repeat(65),
            ..lb_req("tok", &s, "")
        };
        let inv = Code::InvalidArgument;
        let cases: Vec<(&str, pb::CreateLoadBalancerRequest, Want)> = vec![
            ("good", lb_req("web", &s, ""), None),
            ("32-char name", lb_req(&"n".repeat(32), &s, ""), None),
            ("empty name", lb_req("", &s, ""), Some((inv, "name"))),
            (
                "33-char name",
                lb_req(&"n".repeat(33), &s, ""),
                Some((inv, "name")),
            ),
            ("bad character", lb_req("a%b", &s, ""), Some((inv, "name"))),
            (
                "duplicate name",
                lb_req("taken", &s, ""),
                Some((Code::AlreadyExists, "")),
            ),
            ("no subnet", lb_req("x1", "", ""), Some((inv, "subnet_id"))),
            (
                "bad subnet id",
                lb_req("x2", "subnet-12", ""),
                Some((inv, "subnet_id")),
            ),
            (
                "vpc id as subnet",
                lb_req("x3", &v, ""),
                Some((inv, "subnet_id")),
            ),
            (
                "unknown subnet",
                lb_req("x4", UNKNOWN_SUBNET, ""),
                Some((Code::NotFound, "")),
            ),
            (
                "vip not an address",
                lb_req("x5", &s, "10.0.1"),
                Some((inv, "vip")),
            ),
            (
                "vip outside",
                lb_req("x6", &s, "10.0.2.10"),
                Some((inv, "vip")),
            ),
            (
                "vip network",
                lb_req("x7", &s, "10.0.1.0"),
                Some((inv, "vip")),
            ),
            (
                "vip router",
                lb_req("x8", &s, "10.0.1.1"),
                Some((inv, "vip")),
            ),
            (
                "vip reserved +3",
                lb_req("x9", &s, "10.0.1.3"),
                Some((inv, "vip")),
            ),
            (
                "vip broadcast",
                lb_req("x10", &s, "10.0.1.255"),
                Some((inv, "vip")),
            ),
            ("given vip", lb_req("given", &s, "10.0.1.10"), None),
            (
                "given vip taken",
                lb_req("x11", &s, "10.0.1.10"),
                Some((inv, "vip")),
            ),
            ("reserved tag", bad_tag, Some((inv, "tags[0].key"))),
            ("long client token", long_token, Some((inv, "client_token"))),
        ];
        for (what, r, want) in cases {
            check(what, &create_lb(&e, T1, r).await, want);
        }
        // Unauthenticated.
        let s2 = e
            .lbs
            .create_load_balancer(Request::new(lb_req("anon", &s, "")))
            .await
            .unwrap_err();
        assert_eq!(s2.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn vips_come_from_the_top_and_are_released() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let a = create_lb(&e, T1, lb_req("a", &s, "")).await.unwrap();
        assert_eq!(a.vip, "10.0.1.254");
        assert_eq!(
            (a.subnet_id.as_str(), a.vpc_id.as_str()),
            (s.as_str(), v.as_str())
        );
        assert_eq!(a.state, "active");
        assert_eq!(a.owner_id, A1);
        let b = create_lb(&e, T1, lb_req("b", &s, "")).await.unwrap();
        assert_eq!(b.vip, "10.0.1.253");
        // An instance's address is not a free VIP.
        let (_, ip) = instance_in(&e, A1, &s, "running").await;
        assert_eq!(ip, Ipv4Addr::new(10, 0, 1, 4));
        let err = create_lb(&e, T1, lb_req("c", &s, "10.0.1.4"))
            .await
            .unwrap_err();
        assert_eq!(fault(&err), (Code::InvalidArgument, "vip".into()));
        let err = create_lb(&e, T1, lb_req("c", &s, "10.0.1.254"))
            .await
            .unwrap_err();
        assert_eq!(fault(&err), (Code::InvalidArgument, "vip".into()));
        // The subnet's available count reflects the holds (2 VIPs, 1 instance).
        let sub = e
            .net
            .describe_subnets(req(
                T1,
                pb::DescribeSubnetsRequest {
                    subnet_ids: vec![s.clone()],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .subnets
            .remove(0);
        assert_eq!(sub.available_ip_address_count, 251 - 3);
        // Deleting frees the VIP: the same address can be asked for again.
        delete_lb(&e, T1, &a.load_balancer_id).await.unwrap();
        let c = create_lb(&e, T1, lb_req("c", &s, "10.0.1.254"))
            .await
            .unwrap();
        assert_eq!(c.vip, "10.0.1.254");
        let err = describe_lb(&e, T1, &a.load_balancer_id).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // And the next automatic VIP is the highest free one.
        let d = create_lb(&e, T1, lb_req("d", &s, "")).await.unwrap();
        assert_eq!(d.vip, "10.0.1.252");
    }

    #[tokio::test]
    async fn a_full_subnet_has_no_vip() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/28").await;
        for i in 0..11 {
            let lb = create_lb(&e, T1, lb_req(&format!("lb{i}"), &s, ""))
                .await
                .unwrap();
            assert_eq!(lb.vip, format!("10.0.1.{}", 14 - i));
        }
        let err = create_lb(&e, T1, lb_req("lb11", &s, "")).await.unwrap_err();
        assert_eq!(fault(&err), (Code::ResourceExhausted, String::new()));
    }

    #[tokio::test]
    async fn create_target_group_validation() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        create_tg(&e, T1, tg_req("taken", &v, "TCP", 80))
            .await
            .unwrap();
        let hc = |h: pb::HealthCheck, name: &str| pb::CreateTargetGroupRequest {
            health_check: Some(h),
            ..tg_req(name, &v, "TCP", 80)
        };
        let delay = |d: u32, name: &str| pb::CreateTargetGroupRequest {
            deregistration_delay_seconds: Some(d),
            ..tg_req(name, &v, "TCP", 80)
        };
        let http = |path: &str| pb::HealthCheck {
            protocol: "http".into(),
            path: path.into(),
            ..Default::default()
        };
        let inv = Code::InvalidArgument;
        let h = pb::HealthCheck::default;
        let cases: Vec<(&str, pb::CreateTargetGroupRequest, Want)> = vec![
            ("good", tg_req("web", &v, "TCP", 80), None),
            ("lowercase udp", tg_req("dns", &v, "udp", 53), None),
            ("mixed case", tg_req("mixed", &v, "Tcp", 65535), None),
            ("32-char name", tg_req(&"t".repeat(32), &v, "TCP", 80), None),
            ("empty name", tg_req("", &v, "TCP", 80), Some((inv, "name"))),
            (
                "33-char name",
                tg_req(&"t".repeat(33), &v, "TCP", 80),
                Some((inv, "name")),
            ),
            (
                "bad character",
                tg_req("a\tb", &v, "TCP", 80),
                Some((inv, "name")),
            ),
            (
                "duplicate name",
                tg_req("taken", &v, "UDP", 53),
                Some((Code::AlreadyExists, "")),
            ),
            ("no vpc", tg_req("x1", "", "TCP", 80), Some((inv, "vpc_id"))),
            (
                "bad vpc id",
                tg_req("x2", "vpc-xyz", "TCP", 80),
                Some((inv, "vpc_id")),
            ),
            (
                "unknown vpc",
                tg_req("x3", UNKNOWN_VPC, "TCP", 80),
                Some((Code::NotFound, "")),
            ),
            (
                "no protocol",
                tg_req("x4", &v, "", 80),
                Some((inv, "protocol")),
            ),
            (
                "HTTP traffic",
                tg_req("x5", &v, "HTTP", 80),
                Some((inv, "protocol")),
            ),
            ("port 0", tg_req("x6", &v, "TCP", 0), Some((inv, "port"))),
            (
                "port 65536",
                tg_req("x7", &v, "TCP", 65536),
                Some((inv, "port")),
            ),
            ("default health check", hc(h(), "hc0"), None),
            (
                "interval 5",
                hc(
                    pb::HealthCheck {
                        interval_seconds: 5,
                        ..h()
                    },
                    "hc1",
                ),
                None,
            ),
            (
                "interval 300",
                hc(
                    pb::HealthCheck {
                        interval_seconds: 300,
                        ..h()
                    },
                    "hc2",
                ),
                None,
            ),
            (
                "interval 4",
                hc(
                    pb::HealthCheck {
                        interval_seconds: 4,
                        ..h()
                    },
                    "x8",
                ),
                Some((inv, "health_check.interval_seconds")),
            ),
            (
                "interval 301",
                hc(
                    pb::HealthCheck {
                        interval_seconds: 301,
                        ..h()
                    },
                    "x9",
                ),
                Some((inv, "health_check.interval_seconds")),
            ),
            (
                "timeout 2",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 2,
                        ..h()
                    },
                    "hc3",
                ),
                None,
            ),
            (
                "timeout 1",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 1,
                        ..h()
                    },
                    "x10",
                ),
                Some((inv, "health_check.timeout_seconds")),
            ),
            (
                "timeout 121",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 121,
                        interval_seconds: 300,
                        ..h()
                    },
                    "x11",
                ),
                Some((inv, "health_check.timeout_seconds")),
            ),
            (
                "timeout 120",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 120,
                        interval_seconds: 300,
                        ..h()
                    },
                    "hc4",
                ),
                None,
            ),
            (
                "timeout = interval",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 10,
                        interval_seconds: 10,
                        ..h()
                    },
                    "x12",
                ),
                Some((inv, "health_check.timeout_seconds")),
            ),
            (
                "timeout < interval",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 9,
                        interval_seconds: 10,
                        ..h()
                    },
                    "hc5",
                ),
                None,
            ),
            (
                "timeout > default interval",
                hc(
                    pb::HealthCheck {
                        timeout_seconds: 31,
                        ..h()
                    },
                    "x13",
                ),
                Some((inv, "health_check.timeout_seconds")),
            ),
            (
                "thresholds 2 and 10",
                hc(
                    pb::HealthCheck {
                        healthy_threshold: 2,
                        unhealthy_threshold: 10,
                        ..h()
                    },
                    "hc6",
                ),
                None,
            ),
            (
                "healthy 1",
                hc(
                    pb::HealthCheck {
                        healthy_threshold: 1,
                        ..h()
                    },
                    "x14",
                ),
                Some((inv, "health_check.healthy_threshold")),
            ),
            (
                "healthy 11",
                hc(
                    pb::HealthCheck {
                        healthy_threshold: 11,
                        ..h()
                    },
                    "x15",
                ),
                Some((inv, "health_check.healthy_threshold")),
            ),
            (
                "unhealthy 1",
                hc(
                    pb::HealthCheck {
                        unhealthy_threshold: 1,
                        ..h()
                    },
                    "x16",
                ),
                Some((inv, "health_check.unhealthy_threshold")),
            ),
            (
                "unhealthy 11",
                hc(
                    pb::HealthCheck {
                        unhealthy_threshold: 11,
                        ..h()
                    },
                    "x17",
                ),
                Some((inv, "health_check.unhealthy_threshold")),
            ),
            ("http default path", hc(http(""), "hc7"), None),
            ("http path", hc(http("/healthz?x=1"), "hc8"), None),
            (
                "http relative path",
                hc(http("healthz"), "x18"),
                Some((inv, "health_check.path")),
            ),
            (
                "http path with a space",
                hc(http("/a b"), "x19"),
                Some((inv, "health_check.path")),
            ),
            (
                "http path too long",
                hc(http(&format!("/{}", "a".repeat(PATH_MAX))), "x20"),
                Some((inv, "health_check.path")),
            ),
            (
                "tcp with a path",
                hc(
                    pb::HealthCheck {
                        path: "/x".into(),
                        ..h()
                    },
                    "x21",
                ),
                Some((inv, "health_check.path")),
            ),
            (
                "https",
                hc(
                    pb::HealthCheck {
                        protocol: "HTTPS".into(),
                        ..h()
                    },
                    "x22",
                ),
                Some((inv, "health_check.protocol")),
            ),
            (
                "health-check port",
                hc(pb::HealthCheck { port: 8081, ..h() }, "hc9"),
                None,
            ),
            (
                "health-check port 65536",
                hc(pb::HealthCheck { port: 65536, ..h() }, "x23"),
                Some((inv, "health_check.port")),
            ),
            ("delay 0", delay(0, "d0"), None),
            ("delay 3600", delay(3600, "d1"), None),
            (
                "delay 3601",
                delay(3601, "x24"),
                Some((inv, "deregistration_delay_seconds")),
            ),
        ];
        for (what, r, want) in cases {
            check(what, &create_tg(&e, T1, r).await, want);
        }
    }

    #[tokio::test]
    async fn target_group_defaults_and_views() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let t = create_tg(&e, T1, tg_req("web", &v, "tcp", 8080))
            .await
            .unwrap();
        assert_eq!(t.protocol, "TCP");
        assert_eq!(t.port, 8080);
        assert_eq!(t.deregistration_delay_seconds, 300);
        assert_eq!(t.owner_id, A1);
        assert_eq!(
            t.health_check.unwrap(),
            pb::HealthCheck {
                protocol: "TCP".into(),
                port: 0,
                path: String::new(),
                interval_seconds: 30,
                timeout_seconds: 10,
                healthy_threshold: 5,
                unhealthy_threshold: 2,
            }
        );
        let http = create_tg(
            &e,
            T1,
            pb::CreateTargetGroupRequest {
                health_check: Some(pb::HealthCheck {
                    protocol: "HTTP".into(),
                    interval_seconds: 10,
                    ..Default::default()
                }),
                deregistration_delay_seconds: Some(0),
                ..tg_req("api", &v, "TCP", 80)
            },
        )
        .await
        .unwrap();
        let h = http.health_check.unwrap();
        assert_eq!((h.protocol.as_str(), h.path.as_str()), ("HTTP", "/"));
        assert_eq!((h.interval_seconds, h.timeout_seconds), (10, 6));
        assert_eq!(http.deregistration_delay_seconds, 0);
        // Paging.
        create_tg(&e, T1, tg_req("third", &v, "UDP", 53))
            .await
            .unwrap();
        let page = |token: String| {
            e.lbs.describe_target_groups(req(
                T1,
                pb::DescribeTargetGroupsRequest {
                    target_group_ids: vec![],
                    page: Some(pb::Page {
                        max_results: 2,
                        next_token: token,
                    }),
                },
            ))
        };
        let p1 = page(String::new()).await.unwrap().into_inner();
        assert_eq!(p1.target_groups.len(), 2);
        assert!(!p1.next_token.is_empty());
        let p2 = page(p1.next_token).await.unwrap().into_inner();
        assert_eq!(p2.target_groups.len(), 1);
        assert!(p2.next_token.is_empty());
    }

    #[tokio::test]
    async fn health_check_floor_follows_the_quota() {
        let mut q = Quotas::default();
        q.lb.min_health_check_interval_ms = 1000;
        let e = env_with(q).await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let fast = |name: &str, interval: u32| pb::CreateTargetGroupRequest {
            health_check: Some(pb::HealthCheck {
                interval_seconds: interval,
                ..Default::default()
            }),
            ..tg_req(name, &v, "TCP", 80)
        };
        let t = create_tg(&e, T1, fast("fast", 1)).await.unwrap();
        let h = t.health_check.unwrap();
        // The default timeout is capped at the interval (as the planner does).
        assert_eq!((h.interval_seconds, h.timeout_seconds), (1, 1));
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let err = create_tg(
            &e,
            T1,
            pb::CreateTargetGroupRequest {
                health_check: Some(pb::HealthCheck {
                    interval_seconds: 1,
                    ..Default::default()
                }),
                ..tg_req("fast", &v, "TCP", 80)
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            fault(&err),
            (
                Code::InvalidArgument,
                "health_check.interval_seconds".into()
            )
        );
        assert!(err.message().contains("5 to 300"), "{}", err.message());
    }

    #[tokio::test]
    async fn modify_target_group() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let t = create_tg(&e, T1, tg_req("web", &v, "TCP", 80))
            .await
            .unwrap();
        let id = t.target_group_id;
        let modify = |hc: Option<pb::HealthCheck>, delay: Option<u32>| {
            e.lbs.modify_target_group(req(
                T1,
                pb::ModifyTargetGroupRequest {
                    target_group_id: id.clone(),
                    health_check: hc,
                    deregistration_delay_seconds: delay,
                },
            ))
        };
        let r = modify(
            Some(pb::HealthCheck {
                protocol: "HTTP".into(),
                path: "/ready".into(),
                interval_seconds: 10,
                healthy_threshold: 3,
                ..Default::default()
            }),
            None,
        )
        .await
        .unwrap();
        assert!(revision(&r) > 0);
        let got = r.into_inner().target_group.unwrap();
        let h = got.health_check.unwrap();
        assert_eq!(
            (
                h.protocol.as_str(),
                h.path.as_str(),
                h.interval_seconds,
                h.healthy_threshold
            ),
            ("HTTP", "/ready", 10, 3)
        );
        assert_eq!(got.deregistration_delay_seconds, 300);
        // Only the delay: the health check stays.
        let got = modify(None, Some(30))
            .await
            .unwrap()
            .into_inner()
            .target_group
            .unwrap();
        assert_eq!(got.deregistration_delay_seconds, 30);
        assert_eq!(got.health_check.unwrap().path, "/ready");
        for (what, hc, delay, field) in [
            (
                "interval",
                Some(pb::HealthCheck {
                    interval_seconds: 400,
                    ..Default::default()
                }),
                None,
                "health_check.interval_seconds",
            ),
            (
                "threshold",
                Some(pb::HealthCheck {
                    unhealthy_threshold: 20,
                    ..Default::default()
                }),
                None,
                "health_check.unhealthy_threshold",
            ),
            ("delay", None, Some(4000), "deregistration_delay_seconds"),
        ] {
            let err = modify(hc, delay).await.unwrap_err();
            assert_eq!(fault(&err), (Code::InvalidArgument, field.into()), "{what}");
        }
        let err = e
            .lbs
            .modify_target_group(req(
                T1,
                pb::ModifyTargetGroupRequest {
                    target_group_id: UNKNOWN_TG.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // Unchanged by the failed calls.
        let got = describe_tg(&e, T1, &id).await.unwrap();
        assert_eq!(got.deregistration_delay_seconds, 30);
        assert_eq!(got.health_check.unwrap().interval_seconds, 10);
    }

    #[tokio::test]
    async fn create_listener_validation() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let v2 = vpc(&e, T1, "10.1.0.0/16").await;
        let lb = create_lb(&e, T1, lb_req("web", &s, ""))
            .await
            .unwrap()
            .load_balancer_id;
        let tcp = create_tg(&e, T1, tg_req("tcp", &v, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let tcp2 = create_tg(&e, T1, tg_req("tcp2", &v, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let udp = create_tg(&e, T1, tg_req("udp", &v, "UDP", 53))
            .await
            .unwrap()
            .target_group_id;
        let far = create_tg(&e, T1, tg_req("far", &v2, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let first = listener(&e, T1, &lb, "TCP", 80, &tcp).await.unwrap();
        assert!(ids::is_id(kind::LISTENER, &first.listener_id), "{first:?}");
        assert_eq!((first.protocol.as_str(), first.port), ("TCP", 80));
        let inv = Code::InvalidArgument;
        let cases: Vec<(&str, &str, &str, u32, &str, Want)> = vec![
            ("udp", &lb, "udp", 53, &udp, None),
            ("tcp on the udp port", &lb, "tcp", 53, &tcp, None),
            ("port 65535", &lb, "TCP", 65535, &tcp, None),
            (
                "no lb",
                "",
                "TCP",
                81,
                &tcp,
                Some((inv, "load_balancer_id")),
            ),
            (
                "bad lb id",
                "lb-1",
                "TCP",
                81,
                &tcp,
                Some((inv, "load_balancer_id")),
            ),
            (
                "unknown lb",
                UNKNOWN_LB,
                "TCP",
                81,
                &tcp,
                Some((Code::NotFound, "")),
            ),
            ("no protocol", &lb, "", 81, &tcp, Some((inv, "protocol"))),
            ("tls", &lb, "TLS", 81, &tcp, Some((inv, "protocol"))),
            ("port 0", &lb, "TCP", 0, &tcp, Some((inv, "port"))),
            ("port 65536", &lb, "TCP", 65536, &tcp, Some((inv, "port"))),
            ("no tg", &lb, "TCP", 81, "", Some((inv, "target_group_id"))),
            (
                "bad tg id",
                &lb,
                "TCP",
                81,
                "tg-zz",
                Some((inv, "target_group_id")),
            ),
            (
                "unknown tg",
                &lb,
                "TCP",
                81,
                UNKNOWN_TG,
                Some((Code::NotFound, "")),
            ),
            (
                "tg of another vpc",
                &lb,
                "TCP",
                81,
                &far,
                Some((inv, "target_group_id")),
            ),
            (
                "protocol mismatch",
                &lb,
                "UDP",
                81,
                &tcp,
                Some((inv, "protocol")),
            ),
            (
                "duplicate",
                &lb,
                "TCP",
                80,
                &tcp2,
                Some((Code::AlreadyExists, "")),
            ),
        ];
        for (what, l, p, port, t, want) in cases {
            check(what, &listener(&e, T1, l, p, port, t).await, want);
        }
        // The same listener again is the same listener (AWS: idempotent).
        let again = listener(&e, T1, &lb, "tcp", 80, &tcp).await.unwrap();
        assert_eq!(again, first);
        let got = describe_lb(&e, T1, &lb).await.unwrap();
        let mut seen: Vec<_> = got
            .listeners
            .iter()
            .map(|l| (l.protocol.clone(), l.port, l.target_group_id.clone()))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("TCP".to_owned(), 53, tcp.clone()),
                ("TCP".to_owned(), 80, tcp.clone()),
                ("TCP".to_owned(), 65535, tcp.clone()),
                ("UDP".to_owned(), 53, udp.clone()),
            ]
        );
        // Deleting a listener.
        let del = |id: &str| {
            e.lbs.delete_listener(req(
                T1,
                pb::DeleteListenerRequest {
                    listener_id: id.into(),
                },
            ))
        };
        del(&first.listener_id).await.unwrap();
        assert_eq!(describe_lb(&e, T1, &lb).await.unwrap().listeners.len(), 3);
        assert_eq!(
            del(&first.listener_id).await.unwrap_err().code(),
            Code::NotFound
        );
        let err = del("lsnr-1").await.unwrap_err();
        assert_eq!(fault(&err), (inv, "listener_id".into()));
        // The port is free again.
        listener(&e, T1, &lb, "TCP", 80, &tcp2).await.unwrap();
    }

    #[tokio::test]
    async fn register_and_deregister_targets() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let v2 = vpc(&e, T1, "10.1.0.0/16").await;
        let s2 = subnet(&e, T1, &v2, "10.1.1.0/24").await;
        let a = instance(&e, A1, &s).await;
        let b = instance(&e, A1, &s).await;
        let far = instance(&e, A1, &s2).await;
        let stopped = instance_in(&e, A1, &s, "stopped").await.0;
        let v3 = vpc(&e, T2, "10.0.0.0/16").await;
        let s3 = subnet(&e, T2, &v3, "10.0.1.0/24").await;
        let foreign = instance(&e, A2, &s3).await;
        let tg = create_tg(&e, T1, tg_req("web", &v, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let inv = Code::InvalidArgument;
        let cases: Vec<(&str, &str, Vec<pb::Target>, Want)> = vec![
            (
                "no tg",
                "",
                vec![target(&a, 0, 0)],
                Some((inv, "target_group_id")),
            ),
            (
                "unknown tg",
                UNKNOWN_TG,
                vec![target(&a, 0, 0)],
                Some((Code::NotFound, "")),
            ),
            ("no targets", &tg, vec![], Some((inv, "targets"))),
            (
                "bad id",
                &tg,
                vec![target("i-1", 0, 0)],
                Some((inv, "targets[0].id")),
            ),
            (
                "unknown",
                &tg,
                vec![target(UNKNOWN_I, 0, 0)],
                Some((inv, "targets[0].id")),
            ),
            (
                "other vpc",
                &tg,
                vec![target(&a, 0, 0), target(&far, 0, 0)],
                Some((inv, "targets[1].id")),
            ),
            (
                "other account",
                &tg,
                vec![target(&foreign, 0, 0)],
                Some((inv, "targets[0].id")),
            ),
            (
                "stopped",
                &tg,
                vec![target(&stopped, 0, 0)],
                Some((inv, "targets[0].id")),
            ),
            (
                "port 65536",
                &tg,
                vec![target(&a, 65536, 0)],
                Some((inv, "targets[0].port")),
            ),
            (
                "weight 101",
                &tg,
                vec![target(&a, 0, 101)],
                Some((inv, "targets[0].weight")),
            ),
            (
                "good",
                &tg,
                vec![target(&a, 0, 0), target(&b, 8080, 100)],
                None,
            ),
            ("again", &tg, vec![target(&a, 80, 0)], None),
            ("another port", &tg, vec![target(&a, 9090, 2)], None),
        ];
        for (what, t, targets, want) in cases {
            check(what, &register(&e, T1, t, targets).await, want);
        }
        let mut got: Vec<_> = describe_tg(&e, T1, &tg)
            .await
            .unwrap()
            .targets
            .into_iter()
            .map(|t| (t.id, t.port, t.weight))
            .collect();
        got.sort();
        let mut want = vec![
            (a.clone(), 80, 1),
            (a.clone(), 9090, 2),
            (b.clone(), 8080, 100),
        ];
        want.sort();
        assert_eq!(got, want);
        // A repeat changes nothing but an explicit weight.
        register(&e, T1, &tg, vec![target(&b, 8080, 0), target(&a, 0, 7)])
            .await
            .unwrap();
        let t = describe_tg(&e, T1, &tg).await.unwrap();
        assert_eq!(t.targets.len(), 3);
        assert!(
            t.targets
                .iter()
                .any(|x| x.id == a && x.port == 80 && x.weight == 7)
        );
        assert!(t.targets.iter().any(|x| x.id == b && x.weight == 100));

        let dereg = |targets: Vec<pb::Target>| {
            e.lbs.deregister_targets(req(
                T1,
                pb::DeregisterTargetsRequest {
                    target_group_id: tg.clone(),
                    targets,
                },
            ))
        };
        for (what, targets, field) in [
            ("unknown", vec![target(UNKNOWN_I, 0, 0)], "targets[0].id"),
            (
                "wrong port",
                vec![target(&b, 0, 0), target(&b, 80, 0)],
                "targets[1].id",
            ),
            ("bad id", vec![target("x", 0, 0)], "targets[0].id"),
            ("bad port", vec![target(&b, 70000, 0)], "targets[0].port"),
            ("none", vec![], "targets"),
        ] {
            let err = dereg(targets).await.unwrap_err();
            assert_eq!(fault(&err), (inv, field.into()), "{what}");
        }
        // Failed calls changed nothing.
        assert_eq!(describe_tg(&e, T1, &tg).await.unwrap().targets.len(), 3);
        dereg(vec![target(&a, 9090, 0)]).await.unwrap();
        let t = describe_tg(&e, T1, &tg).await.unwrap();
        assert_eq!(t.targets.len(), 2);
        // Port 0: every registration of the instance.
        register(&e, T1, &tg, vec![target(&a, 9090, 0)])
            .await
            .unwrap();
        dereg(vec![target(&a, 0, 0)]).await.unwrap();
        let t = describe_tg(&e, T1, &tg).await.unwrap();
        assert_eq!(
            t.targets.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            vec![b.as_str()]
        );
    }

    #[tokio::test]
    async fn quotas() {
        let mut q = Quotas {
            load_balancers_per_account: 2,
            target_groups_per_account: 2,
            ..Quotas::default()
        };
        q.lb.listeners_per_lb = 1;
        q.lb.targets_per_group = 2;
        let e = env_with(q).await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let lb = create_lb(&e, T1, lb_req("a", &s, ""))
            .await
            .unwrap()
            .load_balancer_id;
        create_lb(&e, T1, lb_req("b", &s, "")).await.unwrap();
        let err = create_lb(&e, T1, lb_req("c", &s, "")).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        // Another account has its own quota.
        let v2 = vpc(&e, T2, "10.0.0.0/16").await;
        let s2 = subnet(&e, T2, &v2, "10.0.1.0/24").await;
        create_lb(&e, T2, lb_req("c", &s2, "")).await.unwrap();

        let tg = create_tg(&e, T1, tg_req("a", &v, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        create_tg(&e, T1, tg_req("b", &v, "TCP", 80)).await.unwrap();
        let err = create_tg(&e, T1, tg_req("c", &v, "TCP", 80))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());

        listener(&e, T1, &lb, "TCP", 80, &tg).await.unwrap();
        let err = listener(&e, T1, &lb, "TCP", 81, &tg).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());

        let i1 = instance(&e, A1, &s).await;
        let i2 = instance(&e, A1, &s).await;
        register(&e, T1, &tg, vec![target(&i1, 0, 0), target(&i2, 0, 0)])
            .await
            .unwrap();
        let err = register(&e, T1, &tg, vec![target(&i1, 81, 0)])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        // A repeat of a registered target does not count.
        register(&e, T1, &tg, vec![target(&i1, 80, 0)])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn tenants_are_isolated() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let i = instance(&e, A1, &s).await;
        let lb = create_lb(&e, T1, lb_req("web", &s, ""))
            .await
            .unwrap()
            .load_balancer_id;
        let tg = create_tg(&e, T1, tg_req("web", &v, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let l = listener(&e, T1, &lb, "TCP", 80, &tg)
            .await
            .unwrap()
            .listener_id;
        register(&e, T1, &tg, vec![target(&i, 0, 0)]).await.unwrap();

        let nf = |what: &str, r: Result<(), Status>| {
            let err = r.expect_err(what);
            assert_eq!(err.code(), Code::NotFound, "{what}: {}", err.message());
        };
        nf("describe lb", describe_lb(&e, T2, &lb).await.map(drop));
        nf("describe tg", describe_tg(&e, T2, &tg).await.map(drop));
        nf("delete lb", delete_lb(&e, T2, &lb).await.map(drop));
        nf("delete tg", delete_tg(&e, T2, &tg).await.map(drop));
        nf(
            "lb in their subnet",
            create_lb(&e, T2, lb_req("web", &s, "")).await.map(drop),
        );
        nf(
            "tg in their vpc",
            create_tg(&e, T2, tg_req("web", &v, "TCP", 80))
                .await
                .map(drop),
        );
        nf(
            "listener on their lb",
            listener(&e, T2, &lb, "TCP", 81, &tg).await.map(drop),
        );
        nf(
            "register on their tg",
            register(&e, T2, &tg, vec![target(&i, 0, 0)])
                .await
                .map(drop),
        );
        nf(
            "delete their listener",
            e.lbs
                .delete_listener(req(
                    T2,
                    pb::DeleteListenerRequest {
                        listener_id: l.clone(),
                    },
                ))
                .await
                .map(drop),
        );
        nf(
            "modify their tg",
            e.lbs
                .modify_target_group(req(
                    T2,
                    pb::ModifyTargetGroupRequest {
                        target_group_id: tg.clone(),
                        deregistration_delay_seconds: Some(1),
                        ..Default::default()
                    },
                ))
                .await
                .map(drop),
        );
        nf(
            "deregister on their tg",
            e.lbs
                .deregister_targets(req(
                    T2,
                    pb::DeregisterTargetsRequest {
                        target_group_id: tg.clone(),
                        targets: vec![target(&i, 0, 0)],
                    },
                ))
                .await
                .map(drop),
        );
        // Their own tg cannot take the other account's listener target or instance.
        let v2 = vpc(&e, T2, "10.0.0.0/16").await;
        let s2 = subnet(&e, T2, &v2, "10.0.1.0/24").await;
        let lb2 = create_lb(&e, T2, lb_req("web", &s2, "")).await.unwrap();
        // Same CIDR, separate IPAM: the same VIP.
        assert_eq!(lb2.vip, "10.0.1.254");
        nf(
            "their tg on my lb",
            listener(&e, T2, &lb2.load_balancer_id, "TCP", 80, &tg)
                .await
                .map(drop),
        );
        let tg2 = create_tg(&e, T2, tg_req("web", &v2, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let err = register(&e, T2, &tg2, vec![target(&i, 0, 0)])
            .await
            .unwrap_err();
        assert_eq!(fault(&err), (Code::InvalidArgument, "targets[0].id".into()));
        // Lists show only the caller's.
        let list = e
            .lbs
            .describe_load_balancers(req(T2, pb::DescribeLoadBalancersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.load_balancers.len(), 1);
        assert_eq!(list.load_balancers[0].owner_id, A2);
        let list = e
            .lbs
            .describe_target_groups(req(T2, pb::DescribeTargetGroupsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            list.target_groups
                .iter()
                .map(|t| t.target_group_id.clone())
                .collect::<Vec<_>>(),
            vec![tg2]
        );
        // Untouched.
        let mine = describe_tg(&e, T1, &tg).await.unwrap();
        assert_eq!(mine.targets.len(), 1);
        assert_eq!(mine.load_balancer_ids, vec![lb.clone()]);
        assert_eq!(describe_lb(&e, T1, &lb).await.unwrap().listeners.len(), 1);
    }

    #[tokio::test]
    async fn client_tokens_make_creates_idempotent() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let r = pb::CreateLoadBalancerRequest {
            client_token: "lb-token-1".into(),
            ..lb_req("web", &s, "")
        };
        let a = create_lb(&e, T1, r.clone()).await.unwrap();
        let b = create_lb(&e, T1, r.clone()).await.unwrap();
        assert_eq!(a, b);
        let other = pb::CreateLoadBalancerRequest {
            name: "other".into(),
            ..r.clone()
        };
        let err = create_lb(&e, T1, other).await.unwrap_err();
        assert_eq!(fault(&err), (Code::AlreadyExists, String::new()));
        // One load balancer, one VIP held.
        let list = e
            .lbs
            .describe_load_balancers(req(T1, pb::DescribeLoadBalancersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.load_balancers.len(), 1);
        let next = create_lb(&e, T1, lb_req("next", &s, "")).await.unwrap();
        assert_eq!(next.vip, "10.0.1.253");
        // The same token in another account is another request.
        let v2 = vpc(&e, T2, "10.0.0.0/16").await;
        let s2 = subnet(&e, T2, &v2, "10.0.1.0/24").await;
        let c = create_lb(
            &e,
            T2,
            pb::CreateLoadBalancerRequest {
                client_token: "lb-token-1".into(),
                ..lb_req("web", &s2, "")
            },
        )
        .await
        .unwrap();
        assert_ne!(c.load_balancer_id, a.load_balancer_id);

        let t = pb::CreateTargetGroupRequest {
            client_token: "tg-token-1".into(),
            ..tg_req("web", &v, "TCP", 80)
        };
        let x = create_tg(&e, T1, t.clone()).await.unwrap();
        let y = create_tg(&e, T1, t.clone()).await.unwrap();
        assert_eq!(x.target_group_id, y.target_group_id);
        let err = create_tg(&e, T1, pb::CreateTargetGroupRequest { port: 81, ..t })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
    }

    #[tokio::test]
    async fn deletion_is_refused_while_in_use() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let lb = create_lb(&e, T1, lb_req("web", &s, ""))
            .await
            .unwrap()
            .load_balancer_id;
        let tg = create_tg(&e, T1, tg_req("web", &v, "TCP", 80))
            .await
            .unwrap()
            .target_group_id;
        let l = listener(&e, T1, &lb, "TCP", 80, &tg)
            .await
            .unwrap()
            .listener_id;
        assert_eq!(
            describe_tg(&e, T1, &tg).await.unwrap().load_balancer_ids,
            vec![lb.clone()]
        );

        let err = delete_tg(&e, T1, &tg).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("ResourceInUse"), "{}", err.message());
        let delete_subnet = || {
            e.net.delete_subnet(req(
                T1,
                pb::DeleteSubnetRequest {
                    subnet_id: s.clone(),
                },
            ))
        };
        let delete_vpc = || {
            e.net
                .delete_vpc(req(T1, pb::DeleteVpcRequest { vpc_id: v.clone() }))
        };
        let err = delete_subnet().await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains(&lb), "{}", err.message());

        e.lbs
            .delete_listener(req(T1, pb::DeleteListenerRequest { listener_id: l }))
            .await
            .unwrap();
        assert!(
            describe_tg(&e, T1, &tg)
                .await
                .unwrap()
                .load_balancer_ids
                .is_empty()
        );
        delete_lb(&e, T1, &lb).await.unwrap();
        delete_subnet().await.unwrap();
        // The VPC still has the target group.
        let err = delete_vpc().await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains(&tg), "{}", err.message());
        delete_tg(&e, T1, &tg).await.unwrap();
        assert_eq!(
            delete_tg(&e, T1, &tg).await.unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(
            delete_lb(&e, T1, &lb).await.unwrap_err().code(),
            Code::NotFound
        );
        delete_vpc().await.unwrap();
    }

    #[tokio::test]
    async fn deleting_the_load_balancer_frees_its_subnet() {
        let e = env().await;
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let i = instance(&e, A1, &s).await;
        let lb = create_lb(&e, T1, lb_req("web", &s, ""))
            .await
            .unwrap()
            .load_balancer_id;
        // Deleting the LB leaves only the instance in the subnet.
        delete_lb(&e, T1, &lb).await.unwrap();
        let err = e
            .net
            .delete_subnet(req(
                T1,
                pb::DeleteSubnetRequest {
                    subnet_id: s.clone(),
                },
            ))
            .await
            .unwrap_err();
        assert!(err.message().contains(&i), "{}", err.message());
        remove_instance(&e, A1, &i).await;
        e.net
            .delete_subnet(req(
                T1,
                pb::DeleteSubnetRequest {
                    subnet_id: s.clone(),
                },
            ))
            .await
            .unwrap();
        e.net
            .delete_vpc(req(T1, pb::DeleteVpcRequest { vpc_id: v.clone() }))
            .await
            .unwrap();
    }

    /// The desired-state document at or after `rev` (bounded wait).
    async fn desired_after(e: &Env, rev: i64) -> StateFile {
        let mut rx = e.api.desired.clone();
        let doc = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|d| d.revision >= rev))
            .await
            .expect("the desired state did not reach the write's revision within 2 s")
            .expect("desired-state builder gone")
            .document
            .clone();
        serde_json::from_slice(&doc).expect("the desired-state document parses")
    }

    #[tokio::test]
    async fn the_desired_state_plans() {
        let e = env().await;
        // A host (probe nodes are placed per host and load-balancer subnet).
        let host = HostRec {
            id: "host-a".into(),
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            registered_ms: now_ms(),
        };
        e.api
            .store
            .txn(
                vec![],
                vec![vpc_store::Op::Put(
                    host_key(&host.id),
                    serde_json::to_vec(&host).unwrap(),
                )],
            )
            .await
            .unwrap();
        let v = vpc(&e, T1, "10.0.0.0/16").await;
        let s = subnet(&e, T1, &v, "10.0.1.0/24").await;
        let a = instance(&e, A1, &s).await;
        let b = instance(&e, A1, &s).await;
        let lb = create_lb(&e, T1, lb_req("web", &s, "")).await.unwrap();
        let given = create_lb(&e, T1, lb_req("given", &s, "10.0.1.100"))
            .await
            .unwrap();
        let tg = create_tg(
            &e,
            T1,
            pb::CreateTargetGroupRequest {
                health_check: Some(pb::HealthCheck {
                    protocol: "HTTP".into(),
                    path: "/healthz".into(),
                    interval_seconds: 10,
                    timeout_seconds: 5,
                    ..Default::default()
                }),
                deregistration_delay_seconds: Some(60),
                ..tg_req("web", &v, "TCP", 8080)
            },
        )
        .await
        .unwrap()
        .target_group_id;
        let udp = create_tg(&e, T1, tg_req("dns", &v, "UDP", 53))
            .await
            .unwrap()
            .target_group_id;
        listener(&e, T1, &lb.load_balancer_id, "TCP", 80, &tg)
            .await
            .unwrap();
        listener(&e, T1, &given.load_balancer_id, "UDP", 53, &udp)
            .await
            .unwrap();
        register(&e, T1, &udp, vec![target(&a, 0, 0)])
            .await
            .unwrap();
        let rev = revision(
            &register(&e, T1, &tg, vec![target(&a, 0, 0), target(&b, 9090, 3)])
                .await
                .unwrap(),
        );

        let doc = desired_after(&e, rev).await;
        assert_eq!(doc.load_balancers.len(), 2);
        assert_eq!(doc.target_groups.len(), 2);
        let plan = crate::lb::plan(&doc).expect("the planner accepts the API's state");
        assert_eq!(plan.listeners.len(), 2);
        let l = plan
            .listeners
            .iter()
            .find(|l| l.lb == lb.load_balancer_id)
            .unwrap();
        assert_eq!(l.vip.to_string(), lb.vip);
        assert_eq!((l.protocol, l.port), (LbProtocol::Tcp, 80));
        let g = &plan.groups[&tg];
        assert!(g.used);
        assert_eq!(g.deregistration_delay, Duration::from_secs(60));
        assert_eq!(g.health.protocol, HealthCheckProtocol::Http);
        assert_eq!(g.health.timeout_secs(), 5.0);
        let mut targets: Vec<_> = g
            .targets
            .iter()
            .map(|t| (t.endpoint.clone(), t.ip.to_string(), t.port, t.weight))
            .collect();
        targets.sort();
        let mut want = vec![
            (a.clone(), "10.0.1.4".to_owned(), 8080, 1),
            (b.clone(), "10.0.1.5".to_owned(), 9090, 3),
        ];
        want.sort();
        assert_eq!(targets, want);
        // VIPs as allocated by the API; the probe node avoids them.
        assert_eq!(
            plan.vips[&given.load_balancer_id].1,
            Ipv4Addr::new(10, 0, 1, 100)
        );
        assert_eq!(plan.probe_nodes.len(), 1);
        let node = plan.probe_nodes[0].ip;
        assert!(node != Ipv4Addr::new(10, 0, 1, 254) && node != Ipv4Addr::new(10, 0, 1, 100));

        // Deregistering and deleting show up too.
        let rev = revision(
            &e.lbs
                .deregister_targets(req(
                    T1,
                    pb::DeregisterTargetsRequest {
                        target_group_id: tg.clone(),
                        targets: vec![target(&a, 0, 0)],
                    },
                ))
                .await
                .unwrap(),
        );
        let doc = desired_after(&e, rev).await;
        let plan = crate::lb::plan(&doc).unwrap();
        assert_eq!(plan.groups[&tg].targets.len(), 1);
        let rev = delete_lb(&e, T1, &given.load_balancer_id).await.unwrap();
        let doc = desired_after(&e, rev).await;
        let plan = crate::lb::plan(&doc).unwrap();
        assert_eq!(plan.listeners.len(), 1);
        assert!(!plan.groups[&udp].used);
    }
}
