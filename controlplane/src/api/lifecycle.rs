//! Hosts' reports move instances, volumes and snapshots along their lifecycles.
//!
//! The API moves objects into the states that ask something of a host (pending, stopping,
//! shutting-down, creating, attaching, detaching, deleting); the host's compute and storage
//! agents act and report what they observe with every applied revision; this module turns
//! those observations into the states that follow (running, stopped, terminated, available,
//! attached, completed, gone). Each change is a store write (durable, seen by every
//! control-plane replica), made only when the observation moves the object on, so a host
//! repeating the same report writes nothing. Which observation moves which state is the pure
//! [`instance_next`], [`volume_next`] and [`snapshot_next`]; stale observations (a report
//! from before the latest API change) match no transition and are ignored.
//!
//! Terminated instances stay visible for [`TERMINATED_TTL_MS`], as in EC2, then
//! [`collect_garbage`] deletes them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use tracing::{info, warn};
use vpc_proto::v1 as pb;

use super::error::ApiResult;
use super::records::{InstanceRec, SnapshotRec, TgRec, VolumeRec, child_key, kind, now_ms, state};
use super::{Api, ipam};

/// How long terminated instances stay visible.
pub const TERMINATED_TTL_MS: u64 = 60 * 60 * 1000;
/// Console output kept per instance (EC2's GetConsoleOutput gives the last 64 KiB).
pub const CONSOLE_MAX: usize = 64 * 1024;

/// What an instance record becomes after its host reports `observed` (`None`: no change).
/// Launch failures are handled by the caller (they release resources).
pub fn instance_next(current: &str, observed: &str) -> Option<&'static str> {
    match (current, observed) {
        (state::PENDING, "running") => Some(state::RUNNING),
        (state::PENDING, "failed") => Some(state::TERMINATED),
        (state::STOPPING, "stopped" | "terminated") => Some(state::STOPPED),
        (state::SHUTTING_DOWN, "terminated") => Some(state::TERMINATED),
        _ => None,
    }
}

/// A volume after a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeNext {
    /// Write this record.
    Put(Box<VolumeRec>),
    /// Delete the record (the host deleted the file).
    Delete,
}

/// What a volume becomes after its host reports `observed` (`None`: no change).
pub fn volume_next(v: &VolumeRec, observed: &pb::VolumeStatus) -> Option<VolumeNext> {
    let mut next = v.clone();
    match (v.state.as_str(), observed.state.as_str()) {
        (state::DELETING, "deleted") => return Some(VolumeNext::Delete),
        (state::CREATING, "available" | "attached") => {
            next.state = state::AVAILABLE.into();
            next.reason.clear();
        }
        (state::CREATING, "error") => {
            next.state = state::ERROR.into();
            next.reason = observed.reason.clone();
        }
        (state::IN_USE, _) => {
            let a = next.attachment.as_mut()?;
            match (a.state.as_str(), observed.state.as_str()) {
                (state::ATTACHING, "attached") if observed.attached_instance_id == a.instance => {
                    a.state = state::ATTACHED.into();
                    next.reason.clear();
                }
                (state::ATTACHING | state::ATTACHED, "error") => {
                    next.reason = observed.reason.clone();
                }
                (state::DETACHING, "available") => {
                    next.attachment = None;
                    next.state = state::AVAILABLE.into();
                    next.reason.clear();
                }
                _ => return None,
            }
        }
        _ => return None,
    }
    (next != *v).then(|| VolumeNext::Put(Box::new(next)))
}

/// What a snapshot becomes after its host reports `observed`: `Some(None)` deletes it.
pub fn snapshot_next(
    s: &SnapshotRec,
    observed: &pb::SnapshotStatus,
) -> Option<Option<SnapshotRec>> {
    let mut next = s.clone();
    match (s.state.as_str(), observed.state.as_str()) {
        (state::DELETING, "deleted") => return Some(None),
        (state::SNAP_PENDING, "completed") => next.state = state::COMPLETED.into(),
        (state::SNAP_PENDING, "error") => {
            next.state = state::ERROR.into();
            next.reason = observed.reason.clone();
        }
        _ => return None,
    }
    Some(Some(next))
}

/// Console output of instances, as their hosts last reported it (memory only: the host
/// reports it again after a control-plane restart when it changes).
#[derive(Debug, Default)]
pub struct Consoles {
    inner: Mutex<HashMap<String, (Vec<u8>, u64)>>,
}

impl Consoles {
    /// The output and when it was reported (ms since the epoch).
    pub fn get(&self, instance: &str) -> Option<(Vec<u8>, u64)> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance)
            .cloned()
    }

    fn set(&self, instance: &str, mut output: Vec<u8>) {
        if output.len() > CONSOLE_MAX {
            output.drain(..output.len() - CONSOLE_MAX);
        }
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(instance.to_owned(), (output, now_ms()));
    }

    fn remove(&self, instance: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(instance);
    }
}

/// Releases what leaving instances hold: their addresses and subnet index entries, their
/// target group registrations; their volumes start detaching. Volumes and target groups are
/// read once and each changed record is written once (several writes of one key in a
/// transaction would let a stale copy win, and etcd refuses them); volumes in `skip` were
/// already written by the caller's transaction. Returns the account's volumes as they are
/// after the change.
pub(super) async fn retire_instances(
    tx: &mut super::tx::Tx,
    leaving: &[InstanceRec],
    skip: &std::collections::BTreeSet<String>,
) -> ApiResult<Vec<VolumeRec>> {
    let mut volumes: Vec<VolumeRec> = tx.all(kind::VOLUME).await?;
    if leaving.is_empty() {
        return Ok(volumes);
    }
    let acct = tx.account().to_owned();
    for i in leaving {
        tx.delete_raw(child_key(&acct, &i.subnet, kind::INSTANCE, &i.meta.id));
        ipam::release(tx, &i.subnet, i.ip);
    }
    let gone = |id: &str| leaving.iter().any(|i| i.meta.id == id);
    for v in &mut volumes {
        if skip.contains(&v.meta.id) {
            continue;
        }
        if let Some(a) = v.attachment.as_mut()
            && gone(&a.instance)
            && a.state != state::DETACHING
        {
            a.state = state::DETACHING.into();
            tx.put(kind::VOLUME, &v.meta.id, &*v)?;
        }
    }
    for mut tg in tx.all::<TgRec>(kind::TG).await? {
        let before = tg.targets.len();
        tg.targets.retain(|t| !gone(&t.id));
        if tg.targets.len() != before {
            tx.put(kind::TG, &tg.meta.id, &tg)?;
        }
    }
    Ok(volumes)
}

/// Applies one host's report: console output, then the state changes it implies, one
/// transaction per account.
pub async fn observe(api: &Api, host: &str, report: &pb::ReportAppliedRequest) -> ApiResult<()> {
    for s in &report.instances {
        if !s.console.is_empty() {
            api.consoles.set(&s.instance_id, s.console.clone());
        }
    }
    // Candidates, from the cached states (at least as new as what the host applied): only
    // objects of this host whose state the observation may move on.
    let mut desired = api.desired.clone();
    let caught_up = desired.wait_for(|d| d.revision >= report.revision);
    let d = match tokio::time::timeout(std::time::Duration::from_secs(5), caught_up).await {
        Ok(Ok(d)) => std::sync::Arc::clone(&d),
        _ => api.desired.borrow().clone(),
    };
    let mut by_account: BTreeMap<String, Vec<Candidate<'_>>> = BTreeMap::new();
    for s in &report.instances {
        if let Some(o) = d.objects.get(&s.instance_id)
            && o.host == host
            && instance_next(&o.state, &s.state).is_some()
        {
            by_account
                .entry(o.account.clone())
                .or_default()
                .push(Candidate::Instance(s));
        }
    }
    for s in &report.volumes {
        if let Some(o) = d.objects.get(&s.volume_id)
            && o.host == host
            && o.movable
        {
            by_account
                .entry(o.account.clone())
                .or_default()
                .push(Candidate::Volume(s));
        }
    }
    for s in &report.snapshots {
        if let Some(o) = d.objects.get(&s.snapshot_id)
            && o.host == host
            && o.movable
        {
            by_account
                .entry(o.account.clone())
                .or_default()
                .push(Candidate::Snapshot(s));
        }
    }
    drop(d);
    for (account, list) in by_account {
        let host = host.to_owned();
        let (changes, _) = api
            .write(&account, |mut tx| {
                let (list, host) = (&list, &host);
                async move {
                    let mut changes = Vec::new();
                    let mut failed = Vec::new();
                    let mut touched = std::collections::BTreeSet::new();
                    for c in list {
                        match c {
                            Candidate::Instance(s) => {
                                let Some(mut i) = tx
                                    .get::<InstanceRec>(kind::INSTANCE, &s.instance_id)
                                    .await?
                                else {
                                    continue;
                                };
                                if i.host != *host {
                                    continue;
                                }
                                let Some(next) = instance_next(&i.state, &s.state) else {
                                    continue;
                                };
                                if s.state == "failed" {
                                    failed.push(i.clone());
                                    i.state_reason = format!("Server.LaunchFailed: {}", s.reason);
                                } else if next == state::RUNNING {
                                    i.state_reason.clear();
                                }
                                if next == state::TERMINATED {
                                    i.terminated_ms = Some(now_ms());
                                }
                                changes
                                    .push(format!("instance {} {} -> {next}", i.meta.id, i.state));
                                i.state = next.into();
                                tx.put(kind::INSTANCE, &i.meta.id.clone(), &i)?;
                            }
                            Candidate::Volume(s) => {
                                let Some(v) =
                                    tx.get::<VolumeRec>(kind::VOLUME, &s.volume_id).await?
                                else {
                                    continue;
                                };
                                match volume_next(&v, s) {
                                    Some(VolumeNext::Put(n)) => {
                                        touched.insert(v.meta.id.clone());
                                        changes.push(format!(
                                            "volume {} {} -> {}",
                                            v.meta.id, v.state, n.state
                                        ));
                                        tx.put(kind::VOLUME, &v.meta.id, &n)?;
                                    }
                                    Some(VolumeNext::Delete) => {
                                        touched.insert(v.meta.id.clone());
                                        changes.push(format!("volume {} deleted", v.meta.id));
                                        tx.delete(kind::VOLUME, &v.meta.id);
                                    }
                                    None => {}
                                }
                            }
                            Candidate::Snapshot(s) => {
                                let Some(sn) = tx
                                    .get::<SnapshotRec>(kind::SNAPSHOT, &s.snapshot_id)
                                    .await?
                                else {
                                    continue;
                                };
                                match snapshot_next(&sn, s) {
                                    Some(Some(n)) => {
                                        changes.push(format!(
                                            "snapshot {} {} -> {}",
                                            sn.meta.id, sn.state, n.state
                                        ));
                                        tx.put(kind::SNAPSHOT, &sn.meta.id, &n)?;
                                    }
                                    Some(None) => {
                                        changes.push(format!("snapshot {} deleted", sn.meta.id));
                                        tx.delete(kind::SNAPSHOT, &sn.meta.id);
                                    }
                                    None => {}
                                }
                            }
                        }
                    }
                    retire_instances(&mut tx, &failed, &touched).await?;
                    Ok((tx, changes))
                }
            })
            .await?;
        for c in changes {
            info!(host = %host, "{c}");
        }
    }
    Ok(())
}

enum Candidate<'a> {
    Instance(&'a pb::InstanceStatus),
    Volume(&'a pb::VolumeStatus),
    Snapshot(&'a pb::SnapshotStatus),
}

/// Deletes instances terminated more than [`TERMINATED_TTL_MS`] ago.
pub async fn collect_garbage(api: &Api) {
    let now = now_ms();
    let d = api.desired.borrow().clone();
    let mut old: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, o) in d.objects.iter() {
        if o.state == state::TERMINATED
            && o.since_ms
                .is_some_and(|t| now.saturating_sub(t) > TERMINATED_TTL_MS)
        {
            old.entry(o.account.clone()).or_default().push(id.clone());
        }
    }
    drop(d);
    for (account, ids) in old {
        let r = api
            .write(&account, |mut tx| {
                let ids = &ids;
                async move {
                    for id in ids {
                        if let Some(i) = tx.get::<InstanceRec>(kind::INSTANCE, id).await?
                            && i.state == state::TERMINATED
                        {
                            tx.delete(kind::INSTANCE, id);
                        }
                    }
                    Ok((tx, ()))
                }
            })
            .await;
        match r {
            Ok(_) => {
                for id in &ids {
                    api.consoles.remove(id);
                }
                info!(account = %account, count = ids.len(), "deleted instances terminated over an hour ago");
            }
            Err(e) => warn!(account = %account, error = %e, "deleting old terminated instances"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::records::{AttachmentRec, Meta};

    fn vol(state: &str, attachment: Option<&str>) -> VolumeRec {
        VolumeRec {
            meta: Meta {
                id: "vol-1".into(),
                account: "a".into(),
                tags: vec![],
                created_ms: 0,
            },
            size_gib: 1,
            state: state.into(),
            host: "h".into(),
            snapshot: None,
            attachment: attachment.map(|s| AttachmentRec {
                instance: "i-1".into(),
                device: "xvdf".into(),
                mount_path: None,
                state: s.into(),
            }),
            reason: String::new(),
        }
    }

    fn vs(state: &str, attached: &str) -> pb::VolumeStatus {
        pb::VolumeStatus {
            volume_id: "vol-1".into(),
            state: state.into(),
            attached_instance_id: attached.into(),
            reason: if state == "error" {
                "boom".into()
            } else {
                String::new()
            },
        }
    }

    #[test]
    fn instance_transitions() {
        assert_eq!(instance_next("pending", "running"), Some("running"));
        assert_eq!(instance_next("pending", "failed"), Some("terminated"));
        assert_eq!(instance_next("pending", "stopped"), None, "stale report");
        assert_eq!(
            instance_next("running", "running"),
            None,
            "no write when unchanged"
        );
        assert_eq!(instance_next("stopping", "stopped"), Some("stopped"));
        assert_eq!(instance_next("stopping", "running"), None, "stale report");
        assert_eq!(
            instance_next("shutting-down", "terminated"),
            Some("terminated")
        );
        assert_eq!(instance_next("shutting-down", "running"), None);
        assert_eq!(instance_next("terminated", "terminated"), None);
    }

    #[test]
    fn volume_transitions() {
        let VolumeNext::Put(v) = volume_next(&vol("creating", None), &vs("available", "")).unwrap()
        else {
            panic!()
        };
        assert_eq!(v.state, "available");
        let VolumeNext::Put(v) = volume_next(&vol("creating", None), &vs("error", "")).unwrap()
        else {
            panic!()
        };
        assert_eq!((v.state.as_str(), v.reason.as_str()), ("error", "boom"));
        let VolumeNext::Put(v) =
            volume_next(&vol("in-use", Some("attaching")), &vs("attached", "i-1")).unwrap()
        else {
            panic!()
        };
        assert_eq!(v.attachment.unwrap().state, "attached");
        assert_eq!(
            volume_next(&vol("in-use", Some("attaching")), &vs("attached", "i-2")),
            None,
            "another instance"
        );
        assert_eq!(
            volume_next(&vol("in-use", Some("attaching")), &vs("available", "")),
            None,
            "stale"
        );
        let VolumeNext::Put(v) =
            volume_next(&vol("in-use", Some("detaching")), &vs("available", "")).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (v.state.as_str(), v.attachment.is_none()),
            ("available", true)
        );
        assert_eq!(
            volume_next(&vol("in-use", Some("detaching")), &vs("attached", "i-1")),
            None,
            "not yet"
        );
        assert_eq!(
            volume_next(&vol("deleting", None), &vs("deleted", "")),
            Some(VolumeNext::Delete)
        );
        assert_eq!(
            volume_next(&vol("available", None), &vs("deleted", "")),
            None,
            "only when asked"
        );
        assert_eq!(
            volume_next(&vol("available", None), &vs("available", "")),
            None
        );
        let VolumeNext::Put(v) =
            volume_next(&vol("in-use", Some("attaching")), &vs("error", "")).unwrap()
        else {
            panic!()
        };
        assert_eq!(v.reason, "boom");
        assert_eq!(
            volume_next(&v, &vs("error", "")),
            None,
            "same error again: no write"
        );
    }

    #[test]
    fn snapshot_transitions() {
        let s = SnapshotRec {
            meta: Meta {
                id: "snap-1".into(),
                account: "a".into(),
                tags: vec![],
                created_ms: 0,
            },
            volume: "vol-1".into(),
            size_gib: 1,
            host: "h".into(),
            state: "pending".into(),
            reason: String::new(),
            description: String::new(),
        };
        let st = |x: &str| pb::SnapshotStatus {
            snapshot_id: "snap-1".into(),
            state: x.into(),
            reason: "r".into(),
        };
        assert_eq!(
            snapshot_next(&s, &st("completed")).unwrap().unwrap().state,
            "completed"
        );
        assert_eq!(
            snapshot_next(&s, &st("error")).unwrap().unwrap().state,
            "error"
        );
        assert_eq!(snapshot_next(&s, &st("deleted")), None);
        let d = SnapshotRec {
            state: "deleting".into(),
            ..s
        };
        assert_eq!(snapshot_next(&d, &st("deleted")), Some(None));
    }
}
