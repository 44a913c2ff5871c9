//! The desired state hosts converge to: every object in the store, kept in memory from a
//! full read plus the store's watch (so several replicas on one etcd all see each other's
//! writes), rendered as the agents' desired-state document (`StateFile`) whenever it
//! changes. Concurrent changes coalesce: the document is rebuilt once per burst of ready
//! watch batches, and agents always get the latest.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tracing::{info, warn};
use vpc_store::{Event, Store};

use super::Quotas;
use super::records::{
    AclRec, HOSTS_PREFIX, HostRec, InstanceRec, LbRec, RECORDS_PREFIX, SgRec, SnapshotRec,
    SubnetRec, TgRec, VolumeRec, VpcRec, kind, state,
};
use crate::compute::doc::{AttachmentDoc, InstanceDoc, Intent, SnapshotDoc, VolumeDoc};
use crate::lb::model::{Listener, LoadBalancer, TargetGroup};
use crate::overlay::statefile::{EndpointDoc, HostDoc, StateFile, SubnetDoc, VpcDoc};
use crate::policy::model::{NetworkAcl, SecurityGroup};

/// One rendering of the desired state.
#[derive(Debug, Default)]
pub struct Desired {
    /// Store revision it reflects.
    pub revision: i64,
    /// The document (JSON).
    pub document: Arc<Vec<u8>>,
    /// Registered hosts.
    pub hosts: Vec<HostRec>,
    /// Instances per host id (not terminated).
    pub instances_per_host: BTreeMap<String, usize>,
    /// Volumes per host id.
    pub volumes_per_host: BTreeMap<String, usize>,
    /// Instances, volumes and snapshots by id: what host reports are checked against.
    pub objects: Arc<BTreeMap<String, ObjectState>>,
}

/// The lifecycle state of an instance, volume or snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectState {
    /// Owning account.
    pub account: String,
    /// Its host.
    pub host: String,
    /// Its state.
    pub state: String,
    /// A volume or snapshot waiting for its host (creating, deleting, attaching,
    /// detaching, pending).
    pub movable: bool,
    /// When an instance was terminated.
    pub since_ms: Option<u64>,
}

/// A stored object, parsed.
#[derive(Clone, Debug)]
enum Rec {
    Vpc(VpcRec),
    Subnet(SubnetRec),
    Sg(SgRec),
    Acl(AclRec),
    Lb(LbRec),
    Tg(TgRec),
    Instance(InstanceRec),
    Volume(VolumeRec),
    Snapshot(SnapshotRec),
    FlowLog(super::records::FlowLogRec),
    Host(HostRec),
    Other,
}

fn parse(key: &str, value: &[u8]) -> Result<Rec, serde_json::Error> {
    if key.starts_with(HOSTS_PREFIX) {
        return serde_json::from_slice(value).map(Rec::Host);
    }
    // /r/<account>/<kind>/<id>
    let kind = key.split('/').nth(3).unwrap_or_default();
    Ok(match kind {
        kind::VPC => Rec::Vpc(serde_json::from_slice(value)?),
        kind::SUBNET => Rec::Subnet(serde_json::from_slice(value)?),
        kind::SG => Rec::Sg(serde_json::from_slice(value)?),
        kind::ACL => Rec::Acl(serde_json::from_slice(value)?),
        kind::LB => Rec::Lb(serde_json::from_slice(value)?),
        kind::TG => Rec::Tg(serde_json::from_slice(value)?),
        kind::INSTANCE => Rec::Instance(serde_json::from_slice(value)?),
        kind::VOLUME => Rec::Volume(serde_json::from_slice(value)?),
        kind::SNAPSHOT => Rec::Snapshot(serde_json::from_slice(value)?),
        kind::FLOW_LOG => Rec::FlowLog(serde_json::from_slice(value)?),
        _ => Rec::Other,
    })
}

/// Renders the cache.
fn render(cache: &BTreeMap<String, Rec>, quotas: &Quotas, revision: i64) -> Desired {
    let mut doc = StateFile {
        limits: quotas.policy,
        lb_limits: quotas.lb,
        ..StateFile::default()
    };
    let mut hosts = Vec::new();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut volumes_per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut objects = BTreeMap::new();
    let sg_names: BTreeMap<&str, &str> = cache
        .values()
        .filter_map(|r| match r {
            Rec::Sg(g) => Some((g.meta.id.as_str(), g.name.as_str())),
            _ => None,
        })
        .collect();
    for rec in cache.values() {
        match rec {
            Rec::Vpc(v) => {
                if let Some(share) = v.ct_share {
                    doc.conntrack_shares.insert(v.vni, share);
                }
                doc.vpcs.push(VpcDoc {
                    id: v.meta.id.clone(),
                    vni: v.vni,
                    cidr: v.cidr,
                })
            }
            Rec::Subnet(s) => doc.subnets.push(SubnetDoc {
                id: s.meta.id.clone(),
                vpc: s.vpc.clone(),
                cidr: s.cidr,
                network_acl: Some(s.network_acl.clone()),
            }),
            Rec::Sg(g) => doc.security_groups.push(SecurityGroup {
                id: g.meta.id.clone(),
                vpc: g.vpc.clone(),
                default: g.default,
                inbound: g.ingress.iter().map(|r| r.rule.clone()).collect(),
                outbound: g.egress.iter().map(|r| r.rule.clone()).collect(),
            }),
            Rec::Acl(a) => doc.network_acls.push(NetworkAcl {
                id: a.meta.id.clone(),
                vpc: a.vpc.clone(),
                default: a.default,
                inbound: a.inbound.clone(),
                outbound: a.outbound.clone(),
            }),
            Rec::Lb(l) => doc.load_balancers.push(LoadBalancer {
                id: l.meta.id.clone(),
                subnet: l.subnet.clone(),
                vip: Some(l.vip),
                listeners: l
                    .listeners
                    .iter()
                    .map(|x| Listener {
                        protocol: x.protocol,
                        port: x.port,
                        target_group: x.target_group.clone(),
                    })
                    .collect(),
                table_size: None,
            }),
            Rec::Tg(t) => doc.target_groups.push(TargetGroup {
                id: t.meta.id.clone(),
                vpc: t.vpc.clone(),
                protocol: t.protocol,
                port: t.port,
                health_check: t.health_check.clone(),
                deregistration_delay: t.deregistration_delay,
                targets: t.targets.clone(),
            }),
            Rec::Instance(i) => {
                objects.insert(
                    i.meta.id.clone(),
                    ObjectState {
                        account: i.meta.account.clone(),
                        host: i.host.clone(),
                        state: i.state.clone(),
                        movable: false,
                        since_ms: i.terminated_ms,
                    },
                );
                let intent = match i.state.as_str() {
                    state::PENDING | state::RUNNING => Intent::Run,
                    state::STOPPING | state::STOPPED => Intent::Stop,
                    state::SHUTTING_DOWN => Intent::Terminate,
                    // Terminated: its host already removed it.
                    _ => continue,
                };
                if intent != Intent::Terminate {
                    *per_host.entry(i.host.clone()).or_default() += 1;
                }
                if intent == Intent::Run {
                    doc.endpoints.push(EndpointDoc {
                        id: i.meta.id.clone(),
                        subnet: i.subnet.clone(),
                        host: i.host.clone(),
                        ip: i.ip,
                        mac: i.mac.clone(),
                        ifname: Some(crate::compute::host_ifname(&i.meta.id)),
                        security_groups: i.security_groups.clone(),
                    });
                }
                doc.instances.push(InstanceDoc {
                    id: i.meta.id.clone(),
                    host: i.host.clone(),
                    account: i.meta.account.clone(),
                    intent,
                    subnet: i.subnet.clone(),
                    vpc: i.vpc.clone(),
                    ip: i.ip,
                    mac: i.mac.clone(),
                    instance_type: i.instance_type.clone(),
                    hostname: crate::compute::doc::hostname(i.ip),
                    security_groups: i.security_groups.clone(),
                    security_group_names: i
                        .security_groups
                        .iter()
                        .map(|g| sg_names.get(g.as_str()).copied().unwrap_or(g).to_owned())
                        .collect(),
                    command: i.command.clone(),
                    user_data: i.user_data.clone(),
                    launch_ms: i.launch_ms,
                });
            }
            Rec::Volume(v) if v.state == state::ERROR => {}
            Rec::Volume(v) => {
                objects.insert(
                    v.meta.id.clone(),
                    ObjectState {
                        account: v.meta.account.clone(),
                        host: v.host.clone(),
                        state: v.state.clone(),
                        movable: matches!(v.state.as_str(), state::CREATING | state::DELETING)
                            || v.attachment.as_ref().is_some_and(|a| {
                                a.state != state::ATTACHED || !v.reason.is_empty()
                            }),
                        since_ms: None,
                    },
                );
                *volumes_per_host.entry(v.host.clone()).or_default() += 1;
                doc.volumes.push(VolumeDoc {
                    id: v.meta.id.clone(),
                    host: v.host.clone(),
                    size_gib: v.size_gib,
                    snapshot: v.snapshot.clone(),
                    delete: v.state == state::DELETING,
                    attachment: v.attachment.as_ref().map(|a| AttachmentDoc {
                        instance: a.instance.clone(),
                        device: a.device.clone(),
                        mount_path: a.mount_path.clone(),
                        detach: a.state == state::DETACHING,
                    }),
                })
            }
            Rec::Snapshot(sn) if sn.state == state::ERROR => {}
            Rec::Snapshot(sn) => {
                objects.insert(
                    sn.meta.id.clone(),
                    ObjectState {
                        account: sn.meta.account.clone(),
                        host: sn.host.clone(),
                        state: sn.state.clone(),
                        movable: matches!(sn.state.as_str(), state::SNAP_PENDING | state::DELETING),
                        since_ms: None,
                    },
                );
                doc.snapshots.push(SnapshotDoc {
                    id: sn.meta.id.clone(),
                    volume: sn.volume.clone(),
                    host: sn.host.clone(),
                    delete: sn.state == state::DELETING,
                });
            }
            Rec::FlowLog(f) => doc.flow_logs.push(crate::overlay::flowlog::FlowLogDoc {
                id: f.meta.id.clone(),
                account: f.meta.account.clone(),
                resource: f.resource.clone(),
                vpc: f.vpc.clone(),
                traffic_type: f.traffic_type,
                window_secs: f.interval_secs,
            }),
            Rec::Host(h) => {
                doc.hosts.push(HostDoc {
                    id: h.id.clone(),
                    vtep: h.vtep,
                });
                hosts.push(h.clone());
            }
            Rec::Other => {}
        }
    }
    let document = match serde_json::to_vec(&doc) {
        Ok(d) => d,
        Err(e) => {
            // Serializing plain data cannot fail; keep serving rather than panic.
            warn!(error = %e, "rendering the desired state");
            Vec::new()
        }
    };
    Desired {
        revision,
        document: Arc::new(document),
        hosts,
        instances_per_host: per_host,
        volumes_per_host,
        objects: Arc::new(objects),
    }
}

/// Reads everything under the watched prefixes (paged).
async fn load_all(
    store: &dyn Store,
) -> Result<(BTreeMap<String, Rec>, i64), vpc_store::StoreError> {
    let mut cache = BTreeMap::new();
    let mut revision = 0;
    for prefix in [RECORDS_PREFIX, HOSTS_PREFIX] {
        let mut after: Option<String> = None;
        loop {
            let page = store.range(prefix, after.as_deref(), 1000).await?;
            revision = revision.max(page.revision);
            for kv in &page.kvs {
                match parse(&kv.key, &kv.value) {
                    Ok(r) => {
                        cache.insert(kv.key.clone(), r);
                    }
                    Err(e) => warn!(key = %kv.key, error = %e, "unreadable record skipped"),
                }
            }
            match (page.more, page.kvs.last()) {
                (true, Some(last)) => after = Some(last.key.clone()),
                _ => break,
            }
        }
    }
    Ok((cache, revision))
}

/// Starts the builder: returns the receiver of renderings (the first is published before
/// this returns) and runs until the process ends.
pub async fn spawn(
    store: Arc<dyn Store>,
    quotas: Arc<Quotas>,
) -> Result<watch::Receiver<Arc<Desired>>, vpc_store::StoreError> {
    let (cache, revision) = load_all(store.as_ref()).await?;
    let (tx, rx) = watch::channel(Arc::new(render(&cache, &quotas, revision)));
    tokio::spawn(run(store, quotas, cache, revision, tx));
    Ok(rx)
}

fn relevant(key: &str) -> bool {
    key.starts_with(RECORDS_PREFIX) || key.starts_with(HOSTS_PREFIX)
}

async fn run(
    store: Arc<dyn Store>,
    quotas: Arc<Quotas>,
    mut cache: BTreeMap<String, Rec>,
    mut revision: i64,
    tx: watch::Sender<Arc<Desired>>,
) {
    loop {
        let mut stream = match store.watch("/", revision + 1).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "watching the store; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok((c, r)) = load_all(store.as_ref()).await {
                    cache = c;
                    revision = r;
                    tx.send_replace(Arc::new(render(&cache, &quotas, revision)));
                }
                continue;
            }
        };
        while let Some(first) = stream.next().await {
            let mut batches = vec![first];
            // Coalesce whatever else is ready.
            while let Ok(Some(more)) = tokio::time::timeout(Duration::ZERO, stream.next()).await {
                batches.push(more);
            }
            let mut failed = false;
            let mut changed = false;
            for b in batches {
                match b {
                    Ok(batch) => {
                        revision = revision.max(batch.revision);
                        for ev in batch.events {
                            if !relevant(ev.key()) {
                                continue;
                            }
                            changed = true;
                            match ev {
                                Event::Put(kv) => match parse(&kv.key, &kv.value) {
                                    Ok(r) => {
                                        cache.insert(kv.key, r);
                                    }
                                    Err(e) => warn!(key = %kv.key, error = %e, "unreadable record"),
                                },
                                Event::Delete { key, .. } => {
                                    cache.remove(&key);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "store watch ended; reloading");
                        failed = true;
                    }
                }
            }
            if failed {
                break;
            }
            // Revisions advance even without relevant changes: hosts report the revision
            // they applied, so publish it (cheap: the document is shared).
            let next = if changed {
                render(&cache, &quotas, revision)
            } else {
                let cur = tx.borrow();
                Desired {
                    revision,
                    document: Arc::clone(&cur.document),
                    hosts: cur.hosts.clone(),
                    instances_per_host: cur.instances_per_host.clone(),
                    volumes_per_host: cur.volumes_per_host.clone(),
                    objects: Arc::clone(&cur.objects),
                }
            };
            tx.send_replace(Arc::new(next));
        }
        match load_all(store.as_ref()).await {
            Ok((c, r)) => {
                cache = c;
                revision = r;
                info!(revision, "desired state reloaded from the store");
                tx.send_replace(Arc::new(render(&cache, &quotas, revision)));
            }
            Err(e) => {
                warn!(error = %e, "reloading the store");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
