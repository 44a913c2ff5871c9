//! `VolumeService`: volumes and snapshots, as EBS has them.
//!
//! ```text
//!  CreateVolume ─> creating ──(host: available)──> available ─AttachVolume─> in-use
//!                     └─(host: error)──> error      (attachment: attaching ─(host)─> attached)
//!  DetachVolume: in-use (detaching) ──(host: available)──> available
//!  DeleteVolume: available/error ─> deleting ──(host: deleted)──> gone
//!  CreateSnapshot ─> pending ──(host: completed)──> completed;  DeleteSnapshot ─> deleting ─> gone
//! ```
//!
//! A volume lives on one host (its storage agent's files; the host plays EBS's availability
//! zone) and attaches only to instances on that host. Snapshots go to the snapshot store,
//! which hosts may share, so a volume can be made from a snapshot on any host that sees it.

use tonic::{Request, Response, Status};
use vpc_proto::v1::{self as pb, volume_service_server::VolumeService};

use super::error::{ApiError, ApiResult};
use super::network::pb_tags;
use super::records::{
    AttachmentRec, InstanceRec, Meta, SnapshotRec, VolumeRec, kind, now_ms, rec_prefix, state,
};
use super::{Api, by_ids, claim_token, ids, list_page, respond, validate};

/// Largest volume, GiB: the storage agent's (ext4 files stop one block short of 16 TiB).
pub const MAX_SIZE_GIB: u32 = crate::storage::MAX_SIZE_GIB;
/// Snapshots per account.
pub const MAX_SNAPSHOTS: usize = 10_000;

/// The volume service.
#[derive(Clone, Debug)]
pub struct Volumes {
    api: Api,
}

/// The API view of a volume.
pub fn pb_volume(v: &VolumeRec) -> pb::Volume {
    let a = v.attachment.as_ref();
    pb::Volume {
        volume_id: v.meta.id.clone(),
        size_gib: v.size_gib,
        state: v.state.clone(),
        attached_instance_id: a.map(|a| a.instance.clone()).unwrap_or_default(),
        owner_id: v.meta.account.clone(),
        tags: pb_tags(&v.meta.tags),
        host_id: v.host.clone(),
        snapshot_id: v.snapshot.clone().unwrap_or_default(),
        device: a.map(|a| format!("/dev/{}", a.device)).unwrap_or_default(),
        mount_path: a.and_then(|a| a.mount_path.clone()).unwrap_or_default(),
        attachment_state: a.map(|a| a.state.clone()).unwrap_or_default(),
        state_reason: v.reason.clone(),
        create_time_ms: i64::try_from(v.meta.created_ms).unwrap_or(i64::MAX),
    }
}

/// The API view of a snapshot.
pub fn pb_snapshot(s: &SnapshotRec) -> pb::Snapshot {
    pb::Snapshot {
        snapshot_id: s.meta.id.clone(),
        volume_id: s.volume.clone(),
        volume_size_gib: s.size_gib,
        state: s.state.clone(),
        state_reason: s.reason.clone(),
        description: s.description.clone(),
        owner_id: s.meta.account.clone(),
        tags: pb_tags(&s.meta.tags),
        start_time_ms: i64::try_from(s.meta.created_ms).unwrap_or(i64::MAX),
    }
}

/// A device name: `xvdf` or `/dev/xvdf`; a letter, then 1-15 lowercase letters or digits.
pub fn device(text: &str) -> ApiResult<String> {
    let name = text.strip_prefix("/dev/").unwrap_or(text);
    let ok = (2..=16).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        return Err(ApiError::invalid(
            "device",
            format!("{text:?}: expected a name like xvdf or /dev/xvdf"),
        ));
    }
    if matches!(
        name,
        "null" | "zero" | "full" | "random" | "urandom" | "tty" | "ptmx" | "pts" | "shm"
    ) {
        return Err(ApiError::invalid(
            "device",
            format!("/dev/{name} is reserved"),
        ));
    }
    Ok(name.to_owned())
}

/// A mount path inside the instance: absolute, normalized, at most 255 bytes of visible
/// ASCII without spaces, not `/` and not under /proc, /sys or /dev.
pub fn mount_path(text: &str) -> ApiResult<Option<String>> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| Err(ApiError::invalid("mount_path", format!("{text:?}: {why}")));
    if !text.starts_with('/') {
        return bad("must be an absolute path");
    }
    if text.len() > 255 || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("at most 255 visible ASCII characters, no spaces");
    }
    let parts: Vec<&str> = text.split('/').skip(1).collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return bad("must be normalized (no empty, . or .. components, no trailing /)");
    }
    if matches!(parts[0], "proc" | "sys" | "dev") {
        return bad("cannot be under /proc, /sys or /dev");
    }
    Ok(Some(text.to_owned()))
}

impl Volumes {
    /// Over the shared API state.
    pub fn new(api: Api) -> Self {
        Volumes { api }
    }

    /// The host asked for (registered), else the registered host with fewest volumes.
    fn place(&self, wanted: &str) -> ApiResult<String> {
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
                    d.volumes_per_host.get(&h.id).copied().unwrap_or(0),
                    h.id.clone(),
                )
            })
            .map(|h| h.id.clone())
            .ok_or_else(|| ApiError::Precondition("no host is registered to hold volumes".into()))
    }

    async fn create(
        &self,
        account: String,
        req: pb::CreateVolumeRequest,
    ) -> ApiResult<(VolumeRec, i64)> {
        let snapshot = if req.snapshot_id.is_empty() {
            None
        } else {
            Some(validate::id(
                "snapshot_id",
                kind::SNAPSHOT,
                &req.snapshot_id,
            )?)
        };
        if req.size_gib > MAX_SIZE_GIB || (req.size_gib == 0 && snapshot.is_none()) {
            return Err(ApiError::invalid(
                "size_gib",
                format!("{}: expected 1 to {MAX_SIZE_GIB} GiB", req.size_gib),
            ));
        }
        let host = self.place(&req.host_id)?;
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let quota = self.api.quotas.volumes_per_account;
        self.api
            .write(&account, |mut tx| {
                let (req, tags, token, snapshot, host) =
                    (&req, tags.clone(), token.clone(), snapshot.clone(), host.clone());
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
                    let mut size_gib = req.size_gib;
                    if let Some(sid) = &snapshot {
                        let s: SnapshotRec = tx.must(kind::SNAPSHOT, "snapshot", sid).await?;
                        if s.state != state::COMPLETED {
                            return Err(ApiError::Precondition(format!(
                                "snapshot {sid} is {} (IncorrectState)",
                                s.state
                            )));
                        }
                        if size_gib == 0 {
                            size_gib = s.size_gib;
                        } else if size_gib < s.size_gib {
                            return Err(ApiError::invalid(
                                "size_gib",
                                format!(
                                    "{size_gib} GiB is smaller than snapshot {sid} ({} GiB)",
                                    s.size_gib
                                ),
                            ));
                        }
                    }
                    let acct = tx.account().to_owned();
                    let have = tx.keys(&rec_prefix(&acct, kind::VOLUME), quota + 1).await?.len();
                    if have >= quota {
                        return Err(ApiError::Exhausted(format!(
                            "the account has {have} volumes; the quota is {quota} (VolumeLimitExceeded)"
                        )));
                    }
                    let v = VolumeRec {
                        meta: Meta { id: id.clone(), account: acct, tags, created_ms: now_ms() },
                        size_gib,
                        state: state::CREATING.into(),
                        host,
                        snapshot,
                        attachment: None,
                        reason: String::new(),
                    };
                    tx.put(kind::VOLUME, &id, &v)?;
                    Ok((tx, v))
                }
            })
            .await
    }

    async fn attach(
        &self,
        account: String,
        req: pb::AttachVolumeRequest,
    ) -> ApiResult<(VolumeRec, i64)> {
        let vid = validate::id("volume_id", kind::VOLUME, &req.volume_id)?;
        let iid = validate::id("instance_id", kind::INSTANCE, &req.instance_id)?;
        let dev = device(&req.device)?;
        let path = mount_path(&req.mount_path)?;
        self.api
            .write(&account, |mut tx| {
                let (vid, iid, dev, path) = (vid.clone(), iid.clone(), dev.clone(), path.clone());
                async move {
                    let mut v: VolumeRec = tx.must(kind::VOLUME, "volume", &vid).await?;
                    if let Some(a) = &v.attachment {
                        if a.instance == iid && a.device == dev && a.mount_path == path && a.state != state::DETACHING {
                            return Ok((tx, v));
                        }
                        return Err(ApiError::Precondition(format!(
                            "volume {vid} is {} to {} (VolumeInUse)",
                            a.state, a.instance
                        )));
                    }
                    if v.state != state::AVAILABLE {
                        return Err(ApiError::Precondition(format!(
                            "volume {vid} is {}; it must be available (IncorrectState)",
                            v.state
                        )));
                    }
                    let i: InstanceRec = tx.must(kind::INSTANCE, "instance", &iid).await?;
                    if matches!(i.state.as_str(), state::SHUTTING_DOWN | state::TERMINATED) {
                        return Err(ApiError::Precondition(format!(
                            "instance {iid} is {} (IncorrectInstanceState)",
                            i.state
                        )));
                    }
                    if i.host != v.host {
                        return Err(ApiError::invalid(
                            "instance_id",
                            format!(
                                "instance {iid} runs on host {}, volume {vid} is on host {} (InvalidVolume.ZoneMismatch)",
                                i.host, v.host
                            ),
                        ));
                    }
                    for other in tx.all::<VolumeRec>(kind::VOLUME).await? {
                        let Some(a) = &other.attachment else { continue };
                        if a.instance != iid {
                            continue;
                        }
                        if a.device == dev {
                            return Err(ApiError::invalid(
                                "device",
                                format!("/dev/{dev} of {iid} is taken by {} (InvalidParameterValue)", other.meta.id),
                            ));
                        }
                        if path.is_some() && a.mount_path == path {
                            return Err(ApiError::invalid(
                                "mount_path",
                                format!("{} of {iid} is taken by {}", path.as_deref().unwrap_or_default(), other.meta.id),
                            ));
                        }
                    }
                    v.state = state::IN_USE.into();
                    v.reason.clear();
                    v.attachment = Some(AttachmentRec {
                        instance: iid,
                        device: dev,
                        mount_path: path,
                        state: state::ATTACHING.into(),
                    });
                    tx.put(kind::VOLUME, &vid, &v)?;
                    Ok((tx, v))
                }
            })
            .await
    }

    async fn detach(&self, account: String, id: String) -> ApiResult<(VolumeRec, i64)> {
        self.api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let mut v: VolumeRec = tx.must(kind::VOLUME, "volume", &id).await?;
                    let Some(a) = v.attachment.as_mut() else {
                        return Err(ApiError::Precondition(format!(
                            "volume {id} is {}, not attached (IncorrectState)",
                            v.state
                        )));
                    };
                    if a.state != state::DETACHING {
                        a.state = state::DETACHING.into();
                        tx.put(kind::VOLUME, &id, &v)?;
                    }
                    Ok((tx, v))
                }
            })
            .await
    }
}

#[tonic::async_trait]
impl VolumeService for Volumes {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let (v, rev) = self.create(account, r.into_inner()).await?;
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

    async fn attach_volume(
        &self,
        r: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let (v, rev) = self.attach(account, r.into_inner()).await?;
        Ok(respond(
            pb::AttachVolumeResponse {
                volume: Some(pb_volume(&v)),
            },
            rev,
        ))
    }

    async fn detach_volume(
        &self,
        r: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let id = validate::id("volume_id", kind::VOLUME, &r.get_ref().volume_id)?;
        let (v, rev) = self.detach(account, id).await?;
        Ok(respond(
            pb::DetachVolumeResponse {
                volume: Some(pb_volume(&v)),
            },
            rev,
        ))
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
                    let mut v: VolumeRec = tx.must(kind::VOLUME, "volume", &id).await?;
                    if let Some(a) = &v.attachment {
                        return Err(ApiError::Precondition(format!(
                            "volume {id} is {} to {} (VolumeInUse)",
                            a.state, a.instance
                        )));
                    }
                    if v.state == state::DELETING {
                        return Ok((tx, ()));
                    }
                    for s in tx.all::<SnapshotRec>(kind::SNAPSHOT).await? {
                        if s.volume == id && s.state == state::SNAP_PENDING {
                            return Err(ApiError::Precondition(format!(
                                "snapshot {} of volume {id} is pending; delete the volume once it completes",
                                s.meta.id
                            )));
                        }
                    }
                    v.state = state::DELETING.into();
                    tx.put(kind::VOLUME, &id, &v)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteVolumeResponse {}, rev))
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let vid = validate::id("volume_id", kind::VOLUME, &req.volume_id)?;
        if req.description.len() > 255 {
            return Err(ApiError::invalid("description", "at most 255 bytes").into());
        }
        let tags = validate::tags(&req.tags)?;
        let token = validate::client_token(&req.client_token)?;
        let (s, rev) = self
            .api
            .write(&account, |mut tx| {
                let (req, vid, tags, token) = (&req, vid.clone(), tags.clone(), token.clone());
                async move {
                    let id = ids::new_id(kind::SNAPSHOT);
                    if let Some(existing) = claim_token(
                        &mut tx,
                        kind::SNAPSHOT,
                        token.as_deref(),
                        req,
                        std::slice::from_ref(&id),
                    )
                    .await?
                    {
                        let s: SnapshotRec = tx.must(kind::SNAPSHOT, "snapshot", &existing[0]).await?;
                        return Ok((tx, s));
                    }
                    let v: VolumeRec = tx.must(kind::VOLUME, "volume", &vid).await?;
                    if !matches!(v.state.as_str(), state::AVAILABLE | state::IN_USE) {
                        return Err(ApiError::Precondition(format!(
                            "volume {vid} is {} (IncorrectState)",
                            v.state
                        )));
                    }
                    let acct = tx.account().to_owned();
                    let have = tx
                        .keys(&rec_prefix(&acct, kind::SNAPSHOT), MAX_SNAPSHOTS + 1)
                        .await?
                        .len();
                    if have >= MAX_SNAPSHOTS {
                        return Err(ApiError::Exhausted(format!(
                            "the account has {have} snapshots; the quota is {MAX_SNAPSHOTS} (SnapshotLimitExceeded)"
                        )));
                    }
                    let s = SnapshotRec {
                        meta: Meta { id: id.clone(), account: acct, tags, created_ms: now_ms() },
                        volume: vid,
                        size_gib: v.size_gib,
                        host: v.host,
                        state: state::SNAP_PENDING.into(),
                        reason: String::new(),
                        description: req.description.clone(),
                    };
                    tx.put(kind::SNAPSHOT, &id, &s)?;
                    Ok((tx, s))
                }
            })
            .await?;
        Ok(respond(
            pb::CreateSnapshotResponse {
                snapshot: Some(pb_snapshot(&s)),
            },
            rev,
        ))
    }

    async fn describe_snapshots(
        &self,
        r: Request<pb::DescribeSnapshotsRequest>,
    ) -> Result<Response<pb::DescribeSnapshotsResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let req = r.into_inner();
        let tx = self.api.read(&account).await?;
        let (list, next_token) = if req.snapshot_ids.is_empty() {
            list_page::<SnapshotRec>(&tx, kind::SNAPSHOT, None, req.page.as_ref()).await?
        } else {
            (
                by_ids(
                    &tx,
                    kind::SNAPSHOT,
                    "snapshot",
                    "snapshot_ids",
                    &req.snapshot_ids,
                )
                .await?,
                String::new(),
            )
        };
        Ok(Response::new(pb::DescribeSnapshotsResponse {
            snapshots: list.iter().map(pb_snapshot).collect(),
            next_token,
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let account = self.api.auth.account(r.metadata())?;
        let id = validate::id("snapshot_id", kind::SNAPSHOT, &r.get_ref().snapshot_id)?;
        let ((), rev) = self
            .api
            .write(&account, |mut tx| {
                let id = id.clone();
                async move {
                    let mut s: SnapshotRec = tx.must(kind::SNAPSHOT, "snapshot", &id).await?;
                    if s.state == state::DELETING {
                        return Ok((tx, ()));
                    }
                    for v in tx.all::<VolumeRec>(kind::VOLUME).await? {
                        if v.snapshot.as_deref() == Some(&id) && v.state == state::CREATING {
                            return Err(ApiError::Precondition(format!(
                                "volume {} is being created from snapshot {id} (InvalidSnapshot.InUse)",
                                v.meta.id
                            )));
                        }
                    }
                    s.state = state::DELETING.into();
                    tx.put(kind::SNAPSHOT, &id, &s)?;
                    Ok((tx, ()))
                }
            })
            .await?;
        Ok(respond(pb::DeleteSnapshotResponse {}, rev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert_eq!(device("xvdf").unwrap(), "xvdf");
        assert_eq!(device("/dev/sdf").unwrap(), "sdf");
        for bad in [
            "",
            "x",
            "/dev/",
            "Xvdf",
            "1abc",
            "xvd-f",
            "null",
            "/dev/../sda",
            "abcdefghijklmnopq",
        ] {
            assert!(device(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_paths() {
        assert_eq!(mount_path("").unwrap(), None);
        assert_eq!(mount_path("/data").unwrap().as_deref(), Some("/data"));
        assert_eq!(
            mount_path("/mnt/vol-1").unwrap().as_deref(),
            Some("/mnt/vol-1")
        );
        for bad in [
            "data", "/", "/data/", "/a//b", "/a/../b", "/proc/x", "/dev", "/sys/fs", "/a b",
            "/a\nb",
        ] {
            assert!(mount_path(bad).is_err(), "{bad:?}");
        }
    }
}
