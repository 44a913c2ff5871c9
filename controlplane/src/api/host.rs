//! `HostService`: agents register, watch their desired state and report what they applied.

use std::{net::Ipv4Addr, pin::Pin, sync::Arc};

use tokio_stream::{Stream, StreamExt as _, wrappers::WatchStream};
use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, host_service_server::HostService};
use vpc_store::{Op, TxnOutcome};

use super::error::ApiError;
use super::records::{HostRec, host_key, now_ms};
use super::{Api, respond, validate};

/// The service.
#[derive(Clone, Debug)]
pub struct Hosts {
    api: Api,
}

impl Hosts {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Hosts { api }
    }
}

/// A host id: 1-63 characters of `a-z0-9-`.
fn host_id(text: &str) -> Result<String, ApiError> {
    if text.is_empty()
        || text.len() > 63
        || !text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ApiError::invalid(
            "host_id",
            "1 to 63 characters of a-z, 0-9 and -",
        ));
    }
    Ok(text.to_owned())
}

/// Decrements the host's stream count when the stream is dropped.
struct StreamGuard {
    api: Api,
    host: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.api.programming.stream(&self.host, false);
    }
}

type DesiredStream = Pin<Box<dyn Stream<Item = Result<pb::DesiredState, Status>> + Send>>;
type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecCommand, Status>> + Send>>;

#[tonic::async_trait]
impl HostService for Hosts {
    async fn register_host(
        &self,
        r: Request<pb::RegisterHostRequest>,
    ) -> Result<Response<pb::RegisterHostResponse>, Status> {
        self.api.auth.agent(r.metadata())?;
        let req = r.into_inner();
        let id = host_id(&req.host_id)?;
        let vtep: Ipv4Addr = validate::ipv4("underlay_ip", &req.underlay_ip)?;
        if vtep.is_unspecified() || vtep.is_broadcast() || vtep.is_multicast() {
            return Err(
                ApiError::invalid("underlay_ip", format!("{vtep} cannot be a VTEP")).into(),
            );
        }
        let key = host_key(&id);
        let store = &self.api.store;
        let existing = store.get(&key).await.map_err(ApiError::from)?;
        let registered_ms = match &existing {
            Some(kv) => {
                let old: HostRec = serde_json::from_slice(&kv.value).map_err(ApiError::from)?;
                if old.vtep == vtep {
                    let rev = store.revision().await.map_err(ApiError::from)?;
                    return Ok(respond(pb::RegisterHostResponse {}, rev));
                }
                old.registered_ms
            }
            None => now_ms(),
        };
        // Another host with this VTEP?
        let cur = self.api.desired.borrow().clone();
        if let Some(other) = cur.hosts.iter().find(|h| h.vtep == vtep && h.id != id) {
            return Err(ApiError::AlreadyExists(format!(
                "host {} already has underlay address {vtep}",
                other.id
            ))
            .into());
        }
        let rec = HostRec {
            id: id.clone(),
            vtep,
            registered_ms,
        };
        let value = serde_json::to_vec(&rec).map_err(ApiError::from)?;
        let compare = match &existing {
            Some(kv) => vpc_store::Compare::ModRevision(key.clone(), kv.mod_revision),
            None => vpc_store::Compare::Absent(key.clone()),
        };
        match store
            .txn(vec![compare], vec![Op::Put(key, value)])
            .await
            .map_err(ApiError::from)?
        {
            TxnOutcome::Committed(rev) => {
                self.api.programming.acked(rev);
                Ok(respond(pb::RegisterHostResponse {}, rev))
            }
            TxnOutcome::Conflict(_) => Err(ApiError::Aborted.into()),
        }
    }

    type WatchDesiredStateStream = DesiredStream;
    type ExecChannelStream = ExecStream;

    async fn exec_channel(
        &self,
        r: Request<tonic::Streaming<pb::ExecResult>>,
    ) -> Result<Response<ExecStream>, Status> {
        self.api.auth.agent(r.metadata())?;
        let mut inbound = r.into_inner();
        // The first message names the host.
        let first = inbound.message().await?.ok_or_else(|| {
            ApiError::invalid("host_id", "the exec channel closed before naming its host")
        })?;
        let host = host_id(&first.host_id)?;
        let hub = Arc::clone(&self.api.exec);
        let (generation, rx) = hub.attach(&host);
        tokio::spawn(async move {
            while let Ok(Some(result)) = inbound.message().await {
                hub.complete(result);
            }
            hub.detach(&host, generation);
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn watch_desired_state(
        &self,
        r: Request<pb::WatchDesiredStateRequest>,
    ) -> Result<Response<DesiredStream>, Status> {
        self.api.auth.agent(r.metadata())?;
        let req = r.into_inner();
        let id = host_id(&req.host_id)?;
        let Some(kv) = self
            .api
            .store
            .get(&host_key(&id))
            .await
            .map_err(ApiError::from)?
        else {
            return Err(ApiError::Precondition(format!(
                "host {id} is not registered (RegisterHost first)"
            ))
            .into());
        };
        // Start from a state that includes the registration.
        let mut desired = self.api.desired.clone();
        let wait = desired.wait_for(|d| d.revision >= kv.mod_revision);
        if tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .is_err()
        {
            return Err(
                ApiError::Unavailable("the desired state is catching up; retry".into()).into(),
            );
        }
        self.api.programming.stream(&id, true);
        let guard = Arc::new(StreamGuard {
            api: self.api.clone(),
            host: id,
        });
        let stream = WatchStream::new(self.api.desired.clone()).map(move |d| {
            let _keep = &guard;
            Ok(pb::DesiredState {
                revision: d.revision,
                document: d.document.as_ref().clone(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_applied(
        &self,
        r: Request<pb::ReportAppliedRequest>,
    ) -> Result<Response<pb::ReportAppliedResponse>, Status> {
        self.api.auth.agent(r.metadata())?;
        let req = r.into_inner();
        let id = host_id(&req.host_id)?;
        self.api.programming.report(&id, req.revision, &req.error);
        self.api.programming.counters(&id, req.counters.clone());
        self.api
            .programming
            .target_health(&id, req.target_health.clone());
        self.api.programming.conntrack(&id, req.conntrack.clone());
        super::lifecycle::observe(&self.api, &id, &req).await?;
        Ok(Response::new(pb::ReportAppliedResponse {}))
    }

    async fn describe_hosts(
        &self,
        r: Request<pb::DescribeHostsRequest>,
    ) -> Result<Response<pb::DescribeHostsResponse>, Status> {
        // Tenants may see the hosts (placement is theirs to choose), but not the underlay.
        let tenant = matches!(
            self.api.auth.principal(r.metadata())?,
            super::auth::Principal::Account(_)
        );
        let live = self.api.programming.hosts();
        // Tenants see flow counts of their own VPCs only.
        let own_vpcs: Option<std::collections::BTreeMap<u32, String>> =
            match self.api.auth.principal(r.metadata())? {
                super::auth::Principal::Account(account) => {
                    let tx = self.api.read(&account).await?;
                    let vpcs: Vec<super::records::VpcRec> =
                        tx.all(super::records::kind::VPC).await?;
                    Some(vpcs.into_iter().map(|v| (v.vni, v.meta.id)).collect())
                }
                _ => None,
            };
        let d = self.api.desired.borrow().clone();
        let hosts = d
            .hosts
            .iter()
            .map(|h| {
                let l = live.get(&h.id).cloned().unwrap_or_default();
                pb::Host {
                    host_id: h.id.clone(),
                    underlay_ip: if tenant {
                        String::new()
                    } else {
                        h.vtep.to_string()
                    },
                    connected: l.streams > 0,
                    applied_revision: l.applied,
                    last_error: l.error,
                    instance_count: d.instances_per_host.get(&h.id).copied().unwrap_or(0) as u32,
                    counters: l.counters,
                    recent_drops: l.recent_drops,
                    recent_seconds: l.recent_seconds,
                    conntrack: l.conntrack.map(|mut ct| {
                        if let Some(own) = &own_vpcs {
                            ct.per_vni.retain(|f| own.contains_key(&f.vni));
                            for f in &mut ct.per_vni {
                                f.vpc_id = own.get(&f.vni).cloned().unwrap_or_default();
                            }
                        }
                        ct
                    }),
                }
            })
            .collect();
        Ok(Response::new(pb::DescribeHostsResponse {
            hosts,
            revision: d.revision,
        }))
    }

    async fn get_programming_latency(
        &self,
        r: Request<pb::GetProgrammingLatencyRequest>,
    ) -> Result<Response<pb::GetProgrammingLatencyResponse>, Status> {
        self.api.auth.principal(r.metadata())?;
        let s = self.api.programming.summary();
        Ok(Response::new(pb::GetProgrammingLatencyResponse {
            samples: s.samples,
            p50_ms: s.p50_ms,
            p99_ms: s.p99_ms,
            max_ms: s.max_ms,
            last_ms: s.last_ms,
        }))
    }
}
