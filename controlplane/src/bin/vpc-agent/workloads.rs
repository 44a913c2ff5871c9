//! The compute and storage agents: run, stop and remove this host's instances, serve their
//! metadata, and keep its volumes and snapshots, as the desired state's `instances`,
//! `volumes` and `snapshots` say; then report what they observe.
//!
//! Each pass is level-triggered and has two halves around the network pass (namespaces,
//! veths, datapath ports):
//! - [`Workloads::wind_down`] (before it): instances to stop or terminate lose their
//!   processes first, so the network pass never pulls a namespace from under a running
//!   instance;
//! - [`Workloads::wind_up`] (after it): instances to run get their processes (their network
//!   is in place by then), metadata service, volumes; snapshots are taken and deleted.
//!
//! Nothing here is remembered across agent restarts but launch failures (not retried until
//! the control plane terminates the instance) and what console output was reported: the
//! runtime, the storage agent and the metadata service find what exists and adopt it.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use controlplane::{
    compute::{
        doc::{InstanceDoc, Intent},
        imds::{Imds, InstanceMetadata},
        runtime::{InstanceSpec, InstanceStatus, Limits, Runtime},
        types,
    },
    overlay::statefile::StateFile,
    storage::Storage,
};
use tracing::{info, warn};
use vpc_proto::v1 as pb;

/// Instances started at once.
const PARALLEL: usize = 8;
/// Console output reported per instance.
const CONSOLE_TAIL: u64 = 64 * 1024;

/// What the agent observed, for the control plane.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Instances of this host.
    pub instances: Vec<pb::InstanceStatus>,
    /// Volumes of this host.
    pub volumes: Vec<pb::VolumeStatus>,
    /// Snapshots this host makes.
    pub snapshots: Vec<pb::SnapshotStatus>,
}

/// Where the agents keep their files and find their helpers.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Per-host data directory (instances' state and root filesystem changes, volumes).
    pub data_dir: PathBuf,
    /// The snapshot store (may be shared by hosts).
    pub snapshot_dir: PathBuf,
    /// The `vpc-instance-init` binary.
    pub init_bin: PathBuf,
    /// The cgroup holding this host's instances.
    pub cgroup_name: String,
    /// How long an instance's processes get to exit on stop before they are killed.
    pub stop_grace: Duration,
}

/// The compute and storage agents of one host.
#[derive(Debug)]
pub struct Workloads {
    host: String,
    netns_prefix: String,
    runtime: Runtime,
    storage: Storage,
    imds: Imds,
    grace: Duration,
    /// Launch failures: instance -> reason (not retried).
    failed: BTreeMap<String, String>,
    /// Console file length last reported per instance.
    console_seen: HashMap<String, u64>,
    /// Instances whose launch failed in the last `wind_up` (their network must go before
    /// the failure is reported).
    newly_failed: Vec<String>,
    /// Instances the last `wind_down` could not stop or remove, and why: reported as
    /// `error` (which moves no state) instead of stopped or terminated.
    wind_down_errors: BTreeMap<String, String>,
}

fn netns_path(prefix: &str, id: &str) -> PathBuf {
    Path::new("/run/netns").join(format!("{prefix}{id}"))
}

impl Workloads {
    /// Agents for `host`; instance namespaces are `<netns_prefix><id>`.
    pub fn new(host: &str, netns_prefix: &str, cfg: &WorkloadConfig) -> anyhow::Result<Self> {
        let runtime = Runtime::new(
            cfg.data_dir.join("instances"),
            &cfg.cgroup_name,
            cfg.init_bin.clone(),
        )?;
        let storage = Storage::new(cfg.data_dir.join("volumes"), cfg.snapshot_dir.clone())?;
        Ok(Workloads {
            host: host.to_owned(),
            netns_prefix: netns_prefix.to_owned(),
            runtime,
            storage,
            imds: Imds::new(),
            grace: cfg.stop_grace,
            failed: BTreeMap::new(),
            console_seen: HashMap::new(),
            newly_failed: Vec::new(),
            wind_down_errors: BTreeMap::new(),
        })
    }

    /// The compute runtime (for `exec`).
    pub fn runtime(&self) -> Runtime {
        self.runtime.clone()
    }

    /// Instances whose launch failed (their network must not be made again).
    pub fn failed(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    /// The instances whose launch failed in the last `wind_up` (taken once).
    pub fn take_newly_failed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.newly_failed)
    }

    fn mine<'a>(&self, doc: &'a StateFile) -> impl Iterator<Item = &'a InstanceDoc> {
        let host = self.host.clone();
        doc.instances.iter().filter(move |i| i.host == host)
    }

    /// Stops the processes of instances to stop, removes instances to terminate (and those
    /// the document does not know). Returns the number of instances changed.
    pub async fn wind_down(&mut self, doc: &StateFile) -> usize {
        let mut changes = 0;
        self.wind_down_errors.clear();
        let known: BTreeMap<&str, Intent> =
            self.mine(doc).map(|i| (i.id.as_str(), i.intent)).collect();
        let mut ids: Vec<String> = match self.runtime.list() {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listing instances");
                Vec::new()
            }
        };
        for (id, intent) in &known {
            if *intent != Intent::Run && !ids.iter().any(|x| x == id) {
                ids.push((*id).to_owned());
            }
        }
        for id in ids {
            match known.get(id.as_str()) {
                Some(Intent::Run) => {}
                Some(Intent::Stop) => {
                    if self.imds.remove(&id).await {
                        changes += 1;
                    }
                    match self.runtime.stop(&id, self.grace).await {
                        Ok(true) => {
                            info!(instance = %id, "stopped");
                            changes += 1;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(instance = %id, error = %e, "stopping");
                            self.wind_down_errors
                                .insert(id.clone(), format!("stopping: {e}"));
                        }
                    }
                }
                Some(Intent::Terminate) | None => {
                    self.imds.remove(&id).await;
                    match self.runtime.destroy(&id, self.grace).await {
                        Ok(true) => {
                            info!(instance = %id, "terminated: processes, cgroups and files removed");
                            changes += 1;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            warn!(instance = %id, error = %e, "terminating");
                            self.wind_down_errors
                                .insert(id.clone(), format!("terminating: {e}"));
                        }
                    }
                    self.failed.remove(&id);
                    self.console_seen.remove(&id);
                }
            }
        }
        changes
    }

    /// Starts instances to run (their network is in place), serves their metadata, keeps
    /// volumes and snapshots; returns the changes made and what is observed.
    pub async fn wind_up(&mut self, doc: &StateFile) -> (usize, Observed) {
        let mut changes = 0;
        let mut observed = Observed::default();
        let subnets: BTreeMap<&str, String> = doc
            .subnets
            .iter()
            .map(|s| (s.id.as_str(), s.cidr.to_string()))
            .collect();
        let vpcs: BTreeMap<&str, String> = doc
            .vpcs
            .iter()
            .map(|v| (v.id.as_str(), v.cidr.to_string()))
            .collect();

        // Instances: start what should run (several at once).
        let mine: Vec<InstanceDoc> = self.mine(doc).cloned().collect();
        let mut to_start = Vec::new();
        for i in mine.iter().filter(|i| i.intent == Intent::Run) {
            if self.failed.contains_key(&i.id) {
                continue;
            }
            if !matches!(self.runtime.status(&i.id), InstanceStatus::Running { .. }) {
                to_start.push(i.clone());
            }
        }
        for chunk in to_start.chunks(PARALLEL) {
            let mut set = tokio::task::JoinSet::new();
            for i in chunk {
                let spec = self.spec(i);
                let rt = self.runtime.clone();
                let id = i.id.clone();
                set.spawn(async move { (id, rt.start(&spec).await) });
            }
            while let Some(joined) = set.join_next().await {
                let Ok((id, r)) = joined else { continue };
                match r {
                    Ok(_) => {
                        info!(instance = %id, "started");
                        changes += 1;
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        warn!(instance = %id, reason = %reason, "launch failed; cleaning up");
                        // Leave nothing behind: the runtime undid its part; the network goes too.
                        let _ = self.runtime.destroy(&id, Duration::ZERO).await;
                        self.imds.remove(&id).await;
                        self.newly_failed.push(id.clone());
                        self.failed.insert(id, reason);
                        changes += 1;
                    }
                }
            }
        }
        for i in &mine {
            let (state, reason) = match i.intent {
                Intent::Run => match self.failed.get(&i.id) {
                    Some(r) => ("failed", r.clone()),
                    None => match self.runtime.status(&i.id) {
                        InstanceStatus::Running { .. } => {
                            let meta = metadata(i, &self.host, &subnets, &vpcs);
                            match self
                                .imds
                                .ensure(&netns_path(&self.netns_prefix, &i.id), i.ip, meta)
                                .await
                            {
                                Ok(true) => changes += 1,
                                Ok(false) => {}
                                Err(e) => {
                                    warn!(instance = %i.id, error = %e, "instance metadata service")
                                }
                            }
                            ("running", String::new())
                        }
                        // Not yet (e.g. its network failed this pass): no report moves it.
                        _ => ("pending", String::new()),
                    },
                },
                Intent::Stop | Intent::Terminate => match self.wind_down_errors.get(&i.id) {
                    Some(why) => ("error", why.clone()),
                    None if i.intent == Intent::Stop => ("stopped", String::new()),
                    None => ("terminated", String::new()),
                },
            };
            let console = if i.intent == Intent::Terminate {
                Vec::new()
            } else {
                self.console_tail(&i.id)
            };
            observed.instances.push(pb::InstanceStatus {
                instance_id: i.id.clone(),
                state: state.into(),
                reason,
                console,
            });
        }
        // A failure whose instance is gone from the document is forgotten.
        self.failed.retain(|id, _| mine.iter().any(|i| &i.id == id));

        changes += self.volumes(doc, &mut observed).await;
        changes += self.snapshots(doc, &mut observed).await;
        (changes, observed)
    }

    fn spec(&self, i: &InstanceDoc) -> InstanceSpec {
        let limits = Limits::for_type(types::lookup_or_default(&i.instance_type));
        InstanceSpec {
            instance_id: i.id.clone(),
            netns_path: netns_path(&self.netns_prefix, &i.id),
            hostname: i.hostname.clone(),
            limits,
            command: i.command.clone(),
            user_data: i
                .user_data
                .as_ref()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()),
        }
    }

    /// The console's last 64 KiB when it grew since the last report (else empty).
    fn console_tail(&mut self, id: &str) -> Vec<u8> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let path = self.runtime.console_path(id);
        let Ok(mut f) = std::fs::File::open(&path) else {
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if self.console_seen.get(id) == Some(&len) {
            return Vec::new();
        }
        let start = len.saturating_sub(CONSOLE_TAIL);
        let mut out = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut out).is_err() {
            return Vec::new();
        }
        self.console_seen.insert(id.to_owned(), len);
        out
    }

    async fn volumes(&mut self, doc: &StateFile, observed: &mut Observed) -> usize {
        let mut changes = 0;
        for v in doc.volumes.iter().filter(|v| v.host == self.host) {
            let mut status = pb::VolumeStatus {
                volume_id: v.id.clone(),
                ..Default::default()
            };
            if v.delete {
                match self.storage.delete_volume(&v.id).await {
                    Ok(done) => {
                        changes += usize::from(done);
                        status.state = "deleted".into();
                    }
                    Err(e) => {
                        status.state = "error".into();
                        status.reason = e.to_string();
                    }
                }
                observed.volumes.push(status);
                continue;
            }
            match self
                .storage
                .ensure_volume(&v.id, v.size_gib, v.snapshot.as_deref())
                .await
            {
                Ok(created) => changes += usize::from(created),
                Err(e) => {
                    status.state = "error".into();
                    status.reason = e.to_string();
                    observed.volumes.push(status);
                    continue;
                }
            }
            status.state = "available".into();
            match &v.attachment {
                Some(a) if !a.detach => {
                    let r = async {
                        self.storage.attach(&v.id).await?;
                        if let Some(pid) = self.runtime.ns_pid(&a.instance) {
                            let mount = a.mount_path.as_deref().map(Path::new);
                            return self.storage.expose(&v.id, pid, &a.device, mount).await;
                        }
                        Ok(false)
                    }
                    .await;
                    match r {
                        Ok(changed) => {
                            changes += usize::from(changed);
                            status.state = "attached".into();
                            status.attached_instance_id = a.instance.clone();
                        }
                        Err(e) => {
                            status.state = "error".into();
                            status.reason = format!("attaching to {}: {e}", a.instance);
                        }
                    }
                }
                Some(a) => {
                    let r = async {
                        let mut changed = false;
                        if let Some(pid) = self.runtime.ns_pid(&a.instance) {
                            let mount = a.mount_path.as_deref().map(Path::new);
                            changed |= self.storage.unexpose(pid, &a.device, mount).await?;
                        }
                        changed |= self.storage.detach(&v.id).await?;
                        Ok::<_, controlplane::storage::StorageError>(changed)
                    }
                    .await;
                    match r {
                        Ok(changed) => changes += usize::from(changed),
                        Err(e) => {
                            status.state = "error".into();
                            status.reason = format!("detaching from {}: {e}", a.instance);
                        }
                    }
                }
                None => {}
            }
            observed.volumes.push(status);
        }
        changes
    }

    async fn snapshots(&mut self, doc: &StateFile, observed: &mut Observed) -> usize {
        let mut changes = 0;
        for s in doc.snapshots.iter().filter(|s| s.host == self.host) {
            let r = if s.delete {
                self.storage
                    .delete_snapshot(&s.id)
                    .await
                    .map(|d| (d, "deleted"))
            } else {
                self.storage
                    .ensure_snapshot(&s.volume, &s.id)
                    .await
                    .map(|d| (d, "completed"))
            };
            let (state, reason) = match r {
                Ok((done, state)) => {
                    changes += usize::from(done);
                    (state, String::new())
                }
                Err(e) => ("error", e.to_string()),
            };
            observed.snapshots.push(pb::SnapshotStatus {
                snapshot_id: s.id.clone(),
                state: state.into(),
                reason,
            });
        }
        changes
    }
}

/// The metadata an instance reads at 169.254.169.254.
fn metadata(
    i: &InstanceDoc,
    host: &str,
    subnets: &BTreeMap<&str, String>,
    vpcs: &BTreeMap<&str, String>,
) -> InstanceMetadata {
    InstanceMetadata {
        instance_id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        account_id: i.account.clone(),
        local_ipv4: i.ip,
        mac: i.mac.clone(),
        hostname: i.hostname.clone(),
        security_groups: i.security_group_names.clone(),
        security_group_ids: i.security_groups.clone(),
        subnet_id: i.subnet.clone(),
        subnet_cidr: subnets.get(i.subnet.as_str()).cloned().unwrap_or_default(),
        vpc_id: i.vpc.clone(),
        vpc_cidr: vpcs.get(i.vpc.as_str()).cloned().unwrap_or_default(),
        availability_zone: host.to_owned(),
        host_id: host.to_owned(),
        launch_time: rfc3339(i.launch_ms),
        user_data: i
            .user_data
            .as_ref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()),
    }
}

/// `2026-11-21T10:52:50Z` from ms since the epoch (UTC; days to civil date after Howard
/// Hinnant's algorithm).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_258_370_000), "2026-11-21T10:52:50Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
