//! `FlowLogService`: flow logs (what is logged) and their records (what hosts observed).
//!
//! Flow logs are stored objects like any other (`/r/<account>/fl/<id>`, indexed under
//! their VPC or subnet) and reach hosts in the desired-state document. Records flow the
//! other way: each agent keeps a `PublishFlowRecords` client stream open and the
//! [`FlowHub`] fans every batch out to the followers of this replica
//! (`FollowFlowLogs`), each seeing only its own account's records, filtered.

use std::{pin::Pin, sync::Arc};

use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};
use vpc_proto::v1::{self as pb, flow_log_service_server::FlowLogService};

use super::error::{ApiError, ApiResult};
use super::records::{FlowLogRec, InstanceRec, Meta, SubnetRec, VpcRec, kind, now_ms};
use super::records::{child_key, child_prefix};
use super::{Api, by_ids, claim_token, ids, list_page, respond, validate};
use crate::overlay::flowlog::TrafficType;

/// Batches buffered per follower before a slow follower misses some (counted and told).
const FANOUT: usize = 1024;
/// Default and largest aggregation interval (AWS: 60 or 600 s).
pub const MAX_INTERVAL: u32 = 600;
/// Flow logs per resource (AWS: 2 per resource and destination type; one per traffic type
/// here).
const PER_RESOURCE: usize = 3;

/// Fans records out to followers.
#[derive(Debug)]
pub struct FlowHub {
    tx: broadcast::Sender<Arc<Vec<pb::FlowLogRecord>>>,
}

impl Default for FlowHub {
    fn default() -> Self {
        FlowHub {
            tx: broadcast::channel(FANOUT).0,
        }
    }
}

impl FlowHub {
    /// A batch from a host.
    pub fn publish(&self, records: Vec<pb::FlowLogRecord>) {
        if !records.is_empty() {
            // No followers is fine: records are also on the hosts.
            let _ = self.tx.send(Arc::new(records));
        }
    }

    /// A new follower.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<pb::FlowLogRecord>>> {
        self.tx.subscribe()
    }
}

/// What a follower wants (all set fields must match); the account always does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// The caller's account.
    pub account: String,
    /// VPC.
    pub vpc: Option<String>,
    /// Subnet.
    pub subnet: Option<String>,
    /// Instance.
    pub instance: Option<String>,
    /// ACCEPT or REJECT.
    pub action: Option<String>,
    /// Flow log.
    pub flow_log: Option<String>,
}

impl Filter {
    /// Whether a record passes.
    pub fn matches(&self, r: &pb::FlowLogRecord) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        r.account_id == self.account
            && eq(&self.vpc, &r.vpc_id)
            && eq(&self.subnet, &r.subnet_id)
            && eq(&self.instance, &r.instance_id)
            && eq(&self.action, &r.action)
            && eq(&self.flow_log, &r.flow_log_id)
    }
}

/// The service.
#[derive(Clone, Debug)]
pub struct FlowLogs {
    api: Api,
}

impl FlowLogs {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        FlowLogs { api }
    }
}

fn resource_type(text: &str) -> ApiResult<&'static str> {
    match text {
        "VPC" => Ok(kind::VPC),
        "Subnet" => Ok(kind::SUBNET),
        "" => Err(ApiError::invalid(
            "resource_type",
            "required: VPC or Subnet",
        )),
        other => Err(ApiError::invalid(
            "resource_type",
            format!("{other:?}: expected VPC or Subnet"),
        )),
    }
}

/// The checked fields of a create request.
#[derive(Debug)]
struct CreateArgs {
    kind: &'static str,
    resources: Vec<String>,
    traffic: TrafficType,
    interval: u32,
}

fn create_args(req: &pb::CreateFlowLogsRequest) -> ApiResult<CreateArgs> {
    let kind = resource_type(&req.resource_type)?;
    if req.resource_ids.is_empty() {
        return Err(ApiError::invalid("resource_ids", "at least one id"));
    }
    if req.resource_ids.len() > 25 {
        return Err(ApiError::invalid("resource_ids", "at most 25 ids"));
    }
    let mut resources: Vec<String> = Vec::with_capacity(req.resource_ids.len());
    for (i, id) in req.resource_ids.iter().enumerate() {
        let field = format!("resource_ids[{i}]");
        let id = validate::id(&field, kind, id)?;
        if resources.contains(&id) {
            return Err(ApiError::invalid(field, format!("{id} is listed twice")));
        }
        resources.push(id);
    }
    let traffic = match req.traffic_type.as_str() {
        "" => {
            return Err(ApiError::invalid(
                "traffic_type",
                "required: ACCEPT, REJECT or ALL",
            ));
        }
        t => TrafficType::parse(t).ok_or_else(|| {
            ApiError::invalid(
                "traffic_type",
                format!("{t:?}: expected ACCEPT, REJECT or ALL"),
            )
        })?,
    };
    let interval = match req.max_aggregation_interval {
        0 => MAX_INTERVAL,
        n @ 1..=MAX_INTERVAL => n,
        n => {
            return Err(ApiError::invalid(
                "max_aggregation_interval",
                format!("{n}: expected 1 to {MAX_INTERVAL} seconds"),
            ));
        }
    };
    Ok(CreateArgs {
        kind,
        resources,
        traffic,
        interval,
    })
}

/// The API's view of a flow log.
pub fn pb_flow_log(f: &FlowLogRec) -> pb::FlowLog {
    pb::FlowLog {
        flow_log_id: f.meta.id.clone(),
        resource_type: if f.resource.starts_with("subnet-") {
            "Subnet"
        } else {
            "VPC"
        }
        .into(),
        resource_id: f.resource.clone(),
        traffic_type: f.traffic_type.as_str().into(),
        max_aggregation_interval: f.interval_secs,
        flow_log_status: "ACTIVE".into(),
        owner_id: f.meta.account.clone(),
        tags: f
            .meta
            .tags
            .iter()
            .map(|(k, v)| pb::Tag {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        vpc_id: f.vpc.clone(),
        log_destination: format!("<agent data dir>/flowlogs/{}.jsonl", f.meta.id),
        creation_time_ms: f.meta.created_ms as i64,
    }
}

impl FlowLogs {
    async fn create(
        &self,
        account: String,
        req: pb::CreateFlowLogsRequest,
    ) -> ApiResult<Response<pb::CreateFlowLogsResponse>> {
        let args = create_args(&req)?;
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let (recs, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, args, tags, token) = (&req, &args, tags.clone(), token.clone());
                async move {
                    let new_ids: Vec<String> = args
                        .resources
                        .iter()
                        .map(|_| ids::new_id(kind::FLOW_LOG))
                        .collect();
                    if let Some(existing) =
                        claim_token(&mut tx, kind::FLOW_LOG, token.as_deref(), req, &new_ids)
                            .await?
                    {
                        let mut out = Vec::new();
                        for id in &existing {
                            out.push(tx.must(kind::FLOW_LOG, "flow log", id).await?);
                        }
                        return Ok((tx, out));
                    }
                    let acct = tx.account().to_owned();
                    let mut out = Vec::with_capacity(new_ids.len());
                    for (i, (resource, id)) in args.resources.iter().zip(&new_ids).enumerate() {
                        let vpc = if args.kind == kind::VPC {
                            tx.must::<VpcRec>(kind::VPC, "VPC", resource).await?;
                            resource.clone()
                        } else {
                            tx.must::<SubnetRec>(kind::SUBNET, "subnet", resource)
                                .await?
                                .vpc
                        };
                        let siblings = tx
                            .keys(&child_prefix(&acct, resource, kind::FLOW_LOG), 0)
                            .await?;
                        if siblings.len() >= PER_RESOURCE {
                            return Err(ApiError::Exhausted(format!(
                                "{resource} has {} flow logs; the quota is {PER_RESOURCE}",
                                siblings.len()
                            )));
                        }
                        for kv in &siblings {
                            let other_id = kv.key.rsplit('/').next().unwrap_or_default();
                            let other: FlowLogRec =
                                tx.must(kind::FLOW_LOG, "flow log", other_id).await?;
                            if other.traffic_type == args.traffic {
                                return Err(ApiError::AlreadyExists(format!(
                                    "resource_ids[{i}]: {resource} already has flow log {other_id} for {} traffic (FlowLogAlreadyExists)",
                                    args.traffic.as_str()
                                )));
                            }
                        }
                        let rec = FlowLogRec {
                            meta: Meta {
                                id: id.clone(),
                                account: acct.clone(),
                                tags: tags.clone(),
                                created_ms: now_ms(),
                            },
                            resource: resource.clone(),
                            vpc,
                            traffic_type: args.traffic,
                            interval_secs: args.interval,
                        };
                        tx.put(kind::FLOW_LOG, id, &rec)?;
                        tx.put_raw(child_key(&acct, resource, kind::FLOW_LOG, id), Vec::new());
                        out.push(rec);
                    }
                    Ok((tx, out))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateFlowLogsResponse {
                flow_logs: recs.iter().map(pb_flow_log).collect(),
            },
            rev,
        ))
    }

    async fn delete(
        &self,
        account: String,
        req: pb::DeleteFlowLogsRequest,
    ) -> ApiResult<Response<pb::DeleteFlowLogsResponse>> {
        if req.flow_log_ids.is_empty() {
            return Err(ApiError::invalid("flow_log_ids", "at least one id"));
        }
        if req.flow_log_ids.len() > 1000 {
            return Err(ApiError::invalid("flow_log_ids", "at most 1000 ids"));
        }
        let mut wanted: Vec<String> = Vec::with_capacity(req.flow_log_ids.len());
        for (i, id) in req.flow_log_ids.iter().enumerate() {
            let field = format!("flow_log_ids[{i}]");
            let id = validate::id(&field, kind::FLOW_LOG, id)?;
            if wanted.contains(&id) {
                return Err(ApiError::invalid(field, format!("{id} is listed twice")));
            }
            wanted.push(id);
        }
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let wanted = wanted.clone();
                async move {
                    let acct = tx.account().to_owned();
                    for id in &wanted {
                        let f: FlowLogRec = tx.must(kind::FLOW_LOG, "flow log", id).await?;
                        tx.delete(kind::FLOW_LOG, id);
                        tx.delete_raw(child_key(&acct, &f.resource, kind::FLOW_LOG, id));
                    }
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteFlowLogsResponse {}, rev))
    }

    async fn describe(
        &self,
        account: String,
        req: pb::DescribeFlowLogsRequest,
    ) -> ApiResult<Response<pb::DescribeFlowLogsResponse>> {
        let tx = self.api.read(&account).await?;
        let (recs, next_token) = if !req.flow_log_ids.is_empty() {
            (
                by_ids::<FlowLogRec>(
                    &tx,
                    kind::FLOW_LOG,
                    "flow log",
                    "flow_log_ids",
                    &req.flow_log_ids,
                )
                .await?,
                String::new(),
            )
        } else if !req.resource_id.is_empty() {
            let r = &req.resource_id;
            if ids::is_id(kind::VPC, r) {
                tx.must::<VpcRec>(kind::VPC, "VPC", r).await?;
            } else if ids::is_id(kind::SUBNET, r) {
                tx.must::<SubnetRec>(kind::SUBNET, "subnet", r).await?;
            } else {
                return Err(ApiError::invalid(
                    "resource_id",
                    format!("{r:?} is not a VPC or subnet id"),
                ));
            }
            list_page(&tx, kind::FLOW_LOG, Some(r), req.page.as_ref()).await?
        } else {
            list_page(&tx, kind::FLOW_LOG, None, req.page.as_ref()).await?
        };
        Ok(Response::new(pb::DescribeFlowLogsResponse {
            flow_logs: recs.iter().map(pb_flow_log).collect(),
            next_token,
        }))
    }

    /// The follower's filter: named objects must be the caller's (NOT_FOUND otherwise, as
    /// for any other account's object).
    async fn filter(&self, account: String, req: &pb::FollowFlowLogsRequest) -> ApiResult<Filter> {
        let tx = self.api.read(&account).await?;
        let mut f = Filter {
            account,
            ..Filter::default()
        };
        if !req.vpc_id.is_empty() {
            let id = validate::id("vpc_id", kind::VPC, &req.vpc_id)?;
            tx.must::<VpcRec>(kind::VPC, "VPC", &id).await?;
            f.vpc = Some(id);
        }
        if !req.subnet_id.is_empty() {
            let id = validate::id("subnet_id", kind::SUBNET, &req.subnet_id)?;
            tx.must::<SubnetRec>(kind::SUBNET, "subnet", &id).await?;
            f.subnet = Some(id);
        }
        if !req.instance_id.is_empty() {
            let id = validate::id("instance_id", kind::INSTANCE, &req.instance_id)?;
            tx.must::<InstanceRec>(kind::INSTANCE, "instance", &id)
                .await?;
            f.instance = Some(id);
        }
        if !req.flow_log_id.is_empty() {
            let id = validate::id("flow_log_id", kind::FLOW_LOG, &req.flow_log_id)?;
            tx.must::<FlowLogRec>(kind::FLOW_LOG, "flow log", &id)
                .await?;
            f.flow_log = Some(id);
        }
        match req.action.as_str() {
            "" => {}
            a @ ("ACCEPT" | "REJECT") => f.action = Some(a.to_owned()),
            other => {
                return Err(ApiError::invalid(
                    "action",
                    format!("{other:?}: expected ACCEPT or REJECT"),
                ));
            }
        }
        Ok(f)
    }
}

/// Stages the deletion of the flow logs of a VPC or subnet being deleted (as AWS does: a
/// flow log does not outlive its resource).
pub async fn delete_of_resource(tx: &mut super::tx::Tx, resource: &str) -> ApiResult<()> {
    let acct = tx.account().to_owned();
    for kv in tx
        .keys(&child_prefix(&acct, resource, kind::FLOW_LOG), 0)
        .await?
    {
        let id = kv.key.rsplit('/').next().unwrap_or_default().to_owned();
        tx.delete(kind::FLOW_LOG, &id);
        tx.delete_raw(kv.key);
    }
    Ok(())
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::FlowLogRecord, Status>> + Send>>;

#[tonic::async_trait]
impl FlowLogService for FlowLogs {
    async fn create_flow_logs(
        &self,
        r: Request<pb::CreateFlowLogsRequest>,
    ) -> Result<Response<pb::CreateFlowLogsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.create(account, r.into_inner()).await?)
    }

    async fn describe_flow_logs(
        &self,
        r: Request<pb::DescribeFlowLogsRequest>,
    ) -> Result<Response<pb::DescribeFlowLogsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.describe(account, r.into_inner()).await?)
    }

    async fn delete_flow_logs(
        &self,
        r: Request<pb::DeleteFlowLogsRequest>,
    ) -> Result<Response<pb::DeleteFlowLogsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        Ok(self.delete(account, r.into_inner()).await?)
    }

    type FollowFlowLogsStream = RecordStream;

    async fn follow_flow_logs(
        &self,
        r: Request<pb::FollowFlowLogsRequest>,
    ) -> Result<Response<Self::FollowFlowLogsStream>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let filter = self.filter(account, r.get_ref()).await?;
        let mut rx = self.api.flows.subscribe();
        let stream = async_stream(move |tx| async move {
            loop {
                match rx.recv().await {
                    Ok(batch) => {
                        for rec in batch.iter().filter(|r| filter.matches(r)) {
                            if tx.send(Ok(rec.clone())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Never silent: the follower learns it missed batches.
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "this follower fell behind and missed {n} batches of records"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn publish_flow_records(
        &self,
        r: Request<Streaming<pb::FlowRecordBatch>>,
    ) -> Result<Response<pb::PublishFlowRecordsResponse>, Status> {
        self.api.auth.agent(r.metadata())?;
        let mut stream = r.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            self.api.flows.publish(batch.records);
        }
        Ok(Response::new(pb::PublishFlowRecordsResponse {}))
    }
}

/// A stream fed by a task (ends when the task returns or the receiver goes).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<pb::FlowLogRecord, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::FlowLogRecord, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use vpc_proto::v1::vpc_service_server::VpcService as _;

    use super::*;
    use crate::api::test_support::{ACCT, AGENT, OTHER_TOKEN, TOKEN, check, req, test_api};
    use crate::api::{Quotas, network::Network};
    use crate::overlay::statefile::StateFile;

    async fn vpc_and_subnet(api: &Api) -> (String, String) {
        let net = Network::new(api.clone());
        let vpc = net
            .create_vpc(req(
                TOKEN,
                pb::CreateVpcRequest {
                    cidr_block: "10.0.0.0/16".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .vpc
            .unwrap()
            .vpc_id;
        let subnet = net
            .create_subnet(req(
                TOKEN,
                pb::CreateSubnetRequest {
                    vpc_id: vpc.clone(),
                    cidr_block: "10.0.1.0/24".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .subnet
            .unwrap()
            .subnet_id;
        (vpc, subnet)
    }

    fn create(kind: &str, ids: &[&str], traffic: &str, interval: u32) -> pb::CreateFlowLogsRequest {
        pb::CreateFlowLogsRequest {
            resource_type: kind.into(),
            resource_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            traffic_type: traffic.into(),
            max_aggregation_interval: interval,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn validation_names_the_field() {
        let api = test_api(Quotas::default()).await;
        let (vpc, subnet) = vpc_and_subnet(&api).await;
        let svc = FlowLogs::new(api);
        let cases = [
            (
                "no type",
                create("", &[&vpc], "ALL", 1),
                Code::InvalidArgument,
                "resource_type",
            ),
            (
                "bad type",
                create("Vpc", &[&vpc], "ALL", 1),
                Code::InvalidArgument,
                "resource_type",
            ),
            (
                "no ids",
                create("VPC", &[], "ALL", 1),
                Code::InvalidArgument,
                "resource_ids",
            ),
            (
                "subnet id as VPC",
                create("VPC", &[&subnet], "ALL", 1),
                Code::InvalidArgument,
                "resource_ids[0]",
            ),
            (
                "twice",
                create("VPC", &[&vpc, &vpc], "ALL", 1),
                Code::InvalidArgument,
                "resource_ids[1]",
            ),
            (
                "no traffic",
                create("VPC", &[&vpc], "", 1),
                Code::InvalidArgument,
                "traffic_type",
            ),
            (
                "bad traffic",
                create("VPC", &[&vpc], "all", 1),
                Code::InvalidArgument,
                "traffic_type",
            ),
            (
                "interval",
                create("VPC", &[&vpc], "ALL", 601),
                Code::InvalidArgument,
                "max_aggregation_interval",
            ),
            (
                "unknown vpc",
                create("VPC", &["vpc-0123456789abcdef0"], "ALL", 1),
                Code::NotFound,
                "vpc-0123456789abcdef0",
            ),
        ];
        for (case, r, code, field) in cases {
            check(case, svc.create_flow_logs(req(TOKEN, r)).await, code, field);
        }
        // Another account's VPC is NOT_FOUND.
        check(
            "other account",
            svc.create_flow_logs(req(OTHER_TOKEN, create("VPC", &[&vpc], "ALL", 1)))
                .await,
            Code::NotFound,
            &vpc,
        );
        check(
            "agent token",
            svc.create_flow_logs(req(AGENT, create("VPC", &[&vpc], "ALL", 1)))
                .await,
            Code::Unauthenticated,
            "",
        );
    }

    #[tokio::test]
    async fn create_describe_delete_and_the_desired_document() {
        let api = test_api(Quotas::default()).await;
        let (vpc, subnet) = vpc_and_subnet(&api).await;
        let svc = FlowLogs::new(api.clone());
        let made = svc
            .create_flow_logs(req(TOKEN, create("VPC", &[&vpc], "ALL", 0)))
            .await
            .unwrap()
            .into_inner()
            .flow_logs;
        assert_eq!(made.len(), 1);
        let f = &made[0];
        assert!(ids::is_id("fl", &f.flow_log_id), "{f:?}");
        assert_eq!(
            (
                f.resource_type.as_str(),
                f.traffic_type.as_str(),
                f.max_aggregation_interval
            ),
            ("VPC", "ALL", 600)
        );
        assert_eq!(
            (f.vpc_id.as_str(), f.owner_id.as_str()),
            (vpc.as_str(), ACCT)
        );
        // Same resource and traffic type again: ALREADY_EXISTS; another type is fine.
        check(
            "duplicate",
            svc.create_flow_logs(req(TOKEN, create("VPC", &[&vpc], "ALL", 5)))
                .await,
            Code::AlreadyExists,
            "FlowLogAlreadyExists",
        );
        let sub = svc
            .create_flow_logs(req(TOKEN, create("Subnet", &[&subnet], "REJECT", 2)))
            .await
            .unwrap()
            .into_inner()
            .flow_logs
            .remove(0);
        assert_eq!(
            (sub.vpc_id.as_str(), sub.resource_type.as_str()),
            (vpc.as_str(), "Subnet")
        );
        // Describe: all, by id, by resource; the other account sees none of them.
        let describe = |token: &'static str, r: pb::DescribeFlowLogsRequest| {
            let svc = svc.clone();
            async move { svc.describe_flow_logs(req(token, r)).await }
        };
        let all = describe(TOKEN, Default::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.flow_logs.len(), 2);
        let by_resource = describe(
            TOKEN,
            pb::DescribeFlowLogsRequest {
                resource_id: subnet.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(by_resource.flow_logs, vec![sub.clone()]);
        assert!(
            describe(OTHER_TOKEN, Default::default())
                .await
                .unwrap()
                .into_inner()
                .flow_logs
                .is_empty()
        );
        check(
            "other account by id",
            describe(
                OTHER_TOKEN,
                pb::DescribeFlowLogsRequest {
                    flow_log_ids: vec![sub.flow_log_id.clone()],
                    ..Default::default()
                },
            )
            .await,
            Code::NotFound,
            &sub.flow_log_id,
        );
        // The hosts' document carries both.
        let mut desired = api.desired.clone();
        let doc = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let d = desired.borrow_and_update().clone();
                let doc: StateFile = serde_json::from_slice(&d.document).unwrap();
                if doc.flow_logs.len() == 2 {
                    return doc;
                }
                desired.changed().await.unwrap();
            }
        })
        .await
        .expect("flow logs in the document");
        let subnet_doc = doc
            .flow_logs
            .iter()
            .find(|d| d.id == sub.flow_log_id)
            .unwrap();
        assert_eq!(
            (
                subnet_doc.resource.as_str(),
                subnet_doc.vpc.as_str(),
                subnet_doc.window_secs,
                subnet_doc.traffic_type
            ),
            (subnet.as_str(), vpc.as_str(), 2, TrafficType::Reject)
        );
        assert_eq!(subnet_doc.account, ACCT);
        // Delete: unknown ids are NOT_FOUND and nothing goes; then both go.
        check(
            "delete unknown",
            svc.delete_flow_logs(req(
                TOKEN,
                pb::DeleteFlowLogsRequest {
                    flow_log_ids: vec![f.flow_log_id.clone(), "fl-0123456789abcdef0".into()],
                },
            ))
            .await,
            Code::NotFound,
            "fl-0123456789abcdef0",
        );
        check(
            "delete bad id",
            svc.delete_flow_logs(req(
                TOKEN,
                pb::DeleteFlowLogsRequest {
                    flow_log_ids: vec!["x".into()],
                },
            ))
            .await,
            Code::InvalidArgument,
            "flow_log_ids[0]",
        );
        svc.delete_flow_logs(req(
            TOKEN,
            pb::DeleteFlowLogsRequest {
                flow_log_ids: vec![f.flow_log_id.clone(), sub.flow_log_id.clone()],
            },
        ))
        .await
        .unwrap();
        assert!(
            describe(TOKEN, Default::default())
                .await
                .unwrap()
                .into_inner()
                .flow_logs
                .is_empty()
        );
    }

    #[tokio::test]
    async fn deleting_the_resource_deletes_its_flow_logs() {
        let api = test_api(Quotas::default()).await;
        let (vpc, subnet) = vpc_and_subnet(&api).await;
        let svc = FlowLogs::new(api.clone());
        svc.create_flow_logs(req(TOKEN, create("Subnet", &[&subnet], "ALL", 1)))
            .await
            .unwrap();
        svc.create_flow_logs(req(TOKEN, create("VPC", &[&vpc], "ALL", 1)))
            .await
            .unwrap();
        let net = Network::new(api.clone());
        net.delete_subnet(req(
            TOKEN,
            pb::DeleteSubnetRequest {
                subnet_id: subnet.clone(),
            },
        ))
        .await
        .unwrap();
        let left = svc
            .describe_flow_logs(req(TOKEN, Default::default()))
            .await
            .unwrap()
            .into_inner()
            .flow_logs;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].resource_id, vpc);
        net.delete_vpc(req(TOKEN, pb::DeleteVpcRequest { vpc_id: vpc }))
            .await
            .unwrap();
        assert!(
            svc.describe_flow_logs(req(TOKEN, Default::default()))
                .await
                .unwrap()
                .into_inner()
                .flow_logs
                .is_empty()
        );
    }

    #[tokio::test]
    async fn followers_see_only_their_accounts_matching_records() {
        let api = test_api(Quotas::default()).await;
        let (vpc, _) = vpc_and_subnet(&api).await;
        let svc = FlowLogs::new(api.clone());
        // Another account cannot name this VPC.
        check(
            "other account's vpc",
            svc.follow_flow_logs(req(
                OTHER_TOKEN,
                pb::FollowFlowLogsRequest {
                    vpc_id: vpc.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            Code::NotFound,
            &vpc,
        );
        check(
            "bad action",
            svc.follow_flow_logs(req(
                TOKEN,
                pb::FollowFlowLogsRequest {
                    action: "DROP".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ()),
            Code::InvalidArgument,
            "action",
        );
        let mut mine = svc
            .follow_flow_logs(req(
                TOKEN,
                pb::FollowFlowLogsRequest {
                    action: "REJECT".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let mut other = svc
            .follow_flow_logs(req(OTHER_TOKEN, Default::default()))
            .await
            .unwrap()
            .into_inner();
        let rec = |account: &str, action: &str, port: u32| pb::FlowLogRecord {
            account_id: account.into(),
            action: action.into(),
            dstport: port,
            vpc_id: vpc.clone(),
            ..Default::default()
        };
        api.flows.publish(vec![
            rec(ACCT, "ACCEPT", 1),
            rec("444455556666", "REJECT", 2),
            rec(ACCT, "REJECT", 3),
        ]);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), mine.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((got.dstport, got.action.as_str()), (3, "REJECT"));
        let theirs = tokio::time::timeout(std::time::Duration::from_secs(5), other.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(theirs.dstport, 2);
        // Nothing else arrives for either.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), mine.next())
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), other.next())
                .await
                .is_err()
        );
    }
}
