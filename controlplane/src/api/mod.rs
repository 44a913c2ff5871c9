//! The control plane's gRPC API (`vpc.v1`): validation with AWS semantics, IPAM, the
//! durable store, multi-tenancy, and the desired state streamed to host agents.
//!
//! Module map: `auth` (tokens -> account or agent), `error` (ApiError -> gRPC status with
//! field details), `ids` (AWS-style ids), `records` (stored JSON records and the key
//! layout), `tx` (account transactions with optimistic concurrency), `validate` (pure field
//! checks), `ipam` (address allocation), one module per service (`network`, `security`,
//! `lb`, `compute`, `host`, `flowlogs`), `desired` (store -> per-host desired-state document, the
//! watch's source), `programming` (network programming latency), `server` (wiring: TLS,
//! health, reflection).

pub mod auth;
pub mod compute;
pub mod desired;
pub mod error;
pub mod exec;
pub mod flowlogs;
pub mod host;
pub mod ids;
pub mod ipam;
pub mod lb;
pub mod lifecycle;
pub mod network;
pub mod programming;
pub mod records;
pub mod security;
pub mod server;
pub mod tags;
#[cfg(test)]
mod test_support;
pub mod trace;
pub mod tx;
pub mod validate;
pub mod volumes;

use std::{future::Future, sync::Arc};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tonic::{Response, metadata::MetadataValue};
use vpc_store::Store;

use crate::{lb::model::LbLimits, policy::model::PolicyLimits};
use error::{ApiError, ApiResult};
use tx::{MAX_ATTEMPTS, Tx};

/// Per-account and per-VPC quotas (AWS defaults; adjustable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// VPCs per account (AWS: 5).
    pub vpcs_per_account: usize,
    /// Subnets per VPC (AWS: 200).
    pub subnets_per_vpc: usize,
    /// Security groups per VPC (AWS: 2500).
    pub security_groups_per_vpc: usize,
    /// Network ACLs per VPC (AWS: 200).
    pub network_acls_per_vpc: usize,
    /// Instances per account.
    pub instances_per_account: usize,
    /// Load balancers per account (AWS: 50).
    pub load_balancers_per_account: usize,
    /// Target groups per account (AWS: 3000).
    pub target_groups_per_account: usize,
    /// Volumes per account.
    pub volumes_per_account: usize,
    /// Rule quotas (60 + 60 per group, 5 groups per instance, 20 + 20 per ACL).
    pub policy: PolicyLimits,
    /// Load-balancer quotas.
    pub lb: LbLimits,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            vpcs_per_account: 5,
            subnets_per_vpc: 200,
            security_groups_per_vpc: 2500,
            network_acls_per_vpc: 200,
            instances_per_account: 1000,
            load_balancers_per_account: 50,
            target_groups_per_account: 3000,
            volumes_per_account: 5000,
            policy: PolicyLimits::default(),
            lb: LbLimits::default(),
        }
    }
}

/// What every service shares.
#[derive(Clone, Debug)]
pub struct Api {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Tokens.
    pub auth: Arc<auth::Auth>,
    /// Quotas.
    pub quotas: Arc<Quotas>,
    /// Network programming latency and host liveness.
    pub programming: Arc<programming::Programming>,
    /// The latest desired state (for placement and the host watch).
    pub desired: tokio::sync::watch::Receiver<Arc<desired::Desired>>,
    /// Instances' console output, as their hosts report it.
    pub consoles: Arc<lifecycle::Consoles>,
    /// The agents' exec channels.
    pub exec: Arc<exec::ExecHub>,
    /// Flow-log records from the hosts, to followers.
    pub flows: Arc<flowlogs::FlowHub>,
}

impl Api {
    /// Runs a write request: `f` reads, validates and stages changes on a fresh [`Tx`];
    /// the changes commit atomically. A conflicting concurrent write of the same account
    /// re-runs `f` from its reads (up to [`MAX_ATTEMPTS`]). Returns `f`'s output and the
    /// committed revision.
    pub async fn write<T, F, Fut>(&self, account: &str, mut f: F) -> ApiResult<(T, i64)>
    where
        F: FnMut(Tx) -> Fut,
        Fut: Future<Output = ApiResult<(Tx, T)>>,
    {
        for attempt in 0..MAX_ATTEMPTS {
            let tx = Tx::begin(&self.store, account).await?;
            let (tx, out) = f(tx).await?;
            if let Some(rev) = tx.commit().await? {
                self.programming.acked(rev);
                return Ok((out, rev));
            }
            // Lost to a concurrent write of the same account: back off a random, growing
            // while so the writers do not collide again in lockstep.
            let cap_us = 500u64 << attempt.min(5);
            let pause = u64::from(ids::random_vni()) % cap_us;
            tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
        }
        Err(ApiError::Aborted)
    }

    /// A read-only view of an account (no commit).
    pub async fn read(&self, account: &str) -> ApiResult<Tx> {
        Tx::begin(&self.store, account).await
    }
}

/// A response carrying the committed revision in `x-vpc-revision`.
pub fn respond<T>(msg: T, revision: i64) -> Response<T> {
    let mut r = Response::new(msg);
    if let Ok(v) = MetadataValue::try_from(revision.to_string()) {
        r.metadata_mut().insert("x-vpc-revision", v);
    }
    r
}

/// One page of an account's objects of a kind, or of a parent's children of a kind (via
/// the child index). `next_token` is the last id of the previous page.
pub async fn list_page<T: DeserializeOwned>(
    tx: &Tx,
    kind: &str,
    parent: Option<&str>,
    page: Option<&vpc_proto::v1::Page>,
) -> ApiResult<(Vec<T>, String)> {
    let size = validate::page_size(page.map_or(0, |p| p.max_results))?;
    let token = page.map_or("", |p| p.next_token.as_str());
    if !token.is_empty() && !ids::is_id(kind, token) {
        return Err(ApiError::invalid(
            "page.next_token",
            "not a token this call returned",
        ));
    }
    let account = tx.account();
    let prefix = match parent {
        Some(p) => records::child_prefix(account, p, kind),
        None => records::rec_prefix(account, kind),
    };
    let start = (!token.is_empty()).then(|| format!("{prefix}{token}"));
    let got = tx.store().range(&prefix, start.as_deref(), size).await?;
    let mut out = Vec::with_capacity(got.kvs.len());
    let mut last = String::new();
    for kv in &got.kvs {
        let id = kv.key.rsplit('/').next().unwrap_or_default().to_owned();
        let value = match parent {
            Some(_) => match tx.get::<T>(kind, &id).await? {
                Some(v) => v,
                // Index written with the object in one transaction; a miss is a race with a
                // delete between the two reads.
                None => continue,
            },
            None => serde_json::from_slice(&kv.value)?,
        };
        out.push(value);
        last = id;
    }
    let next = if got.more { last } else { String::new() };
    Ok((out, next))
}

/// The objects a describe call names by id (NOT_FOUND for any unknown one), in order.
pub async fn by_ids<T: DeserializeOwned>(
    tx: &Tx,
    kind: &str,
    what: &'static str,
    field: &str,
    ids: &[String],
) -> ApiResult<Vec<T>> {
    if ids.len() > 1000 {
        return Err(ApiError::invalid(field, "at most 1000 ids"));
    }
    let mut out = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let id = validate::id(&format!("{field}[{i}]"), kind, id)?;
        out.push(tx.must(kind, what, &id).await?);
    }
    Ok(out)
}

/// Client-token handling for creates: `Some(ids)` when this token already created objects
/// with the same request (return them), an error when it was used with another request.
/// Otherwise stages the token record (with a compare so a racing duplicate conflicts).
pub async fn claim_token(
    tx: &mut Tx,
    kind: &str,
    token: Option<&str>,
    request: &impl prost::Message,
    ids: &[String],
) -> ApiResult<Option<Vec<String>>> {
    let Some(token) = token else { return Ok(None) };
    let key = records::token_key(tx.account(), kind, token);
    let hash = format!("{:016x}", crate::fnv::fnv1a64(&request.encode_to_vec()));
    if let Some(kv) = tx.store().get(&key).await? {
        let rec: records::TokenRec = serde_json::from_slice(&kv.value)?;
        if rec.request_hash != hash {
            return Err(ApiError::AlreadyExists(format!(
                "client_token {token:?} was used with different parameters"
            )));
        }
        return Ok(Some(rec.ids));
    }
    tx.require_absent(key.clone());
    let rec = records::TokenRec {
        request_hash: hash,
        ids: ids.to_vec(),
    };
    tx.put_raw(key, serde_json::to_vec(&rec)?);
    Ok(None)
}
