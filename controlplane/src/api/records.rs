//! What the API stores: one JSON record per object, under keys that make the common
//! questions one range read.
//!
//! Key layout (account = the owning account's id):
//! - `/r/<account>/<kind>/<id>`: the object (`kind` is its id prefix: `vpc`, `subnet`, ...).
//! - `/x/<account>/<parent>/<kind>/<id>`: child index (subnets, groups, ACLs, target
//!   groups, load balancers of a VPC; instances and load balancers of a subnet), so "is it
//!   in use?" and "list a VPC's subnets" are prefix reads.
//! - `/n/<account>/<vpc>/sg/<name>`: security-group names, unique per VPC.
//! - `/ip/<subnet>/<ip as 8 hex digits>`: IPAM: the address is held by the named object.
//! - `/vni/<vni>`: the VPC a VNI belongs to (VNIs are unique across accounts).
//! - `/t/<account>/<kind>/<token>`: a create's client token: request hash and object id.
//! - `/lock/<account>`: bumped by every write of the account; writes compare it, so an
//!   account's writes are serializable even with several control-plane replicas on one etcd.
//! - `/h/<host>`: registered hosts (infrastructure, no account).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::lb::model::{HealthCheck, LbProtocol, TargetRef};
use crate::policy::model::{AclRule, SgRule};

/// Object kinds (their id prefixes).
pub mod kind {
    /// VPC.
    pub const VPC: &str = "vpc";
    /// Subnet.
    pub const SUBNET: &str = "subnet";
    /// Security group.
    pub const SG: &str = "sg";
    /// Security-group rule.
    pub const SG_RULE: &str = "sgr";
    /// Network ACL.
    pub const ACL: &str = "acl";
    /// Route table.
    pub const RTB: &str = "rtb";
    /// Load balancer.
    pub const LB: &str = "lb";
    /// Listener.
    pub const LISTENER: &str = "lsnr";
    /// Target group.
    pub const TG: &str = "tg";
    /// Instance.
    pub const INSTANCE: &str = "i";
    /// Volume.
    pub const VOLUME: &str = "vol";
    /// Snapshot.
    pub const SNAPSHOT: &str = "snap";
    /// Flow log.
    pub const FLOW_LOG: &str = "fl";
}

/// Object key.
pub fn rec_key(account: &str, kind: &str, id: &str) -> String {
    format!("/r/{account}/{kind}/{id}")
}

/// Prefix of an account's objects of one kind.
pub fn rec_prefix(account: &str, kind: &str) -> String {
    format!("/r/{account}/{kind}/")
}

/// Child-index key.
pub fn child_key(account: &str, parent: &str, kind: &str, id: &str) -> String {
    format!("/x/{account}/{parent}/{kind}/{id}")
}

/// Prefix of a parent's children (of one kind, or all with `kind` empty).
pub fn child_prefix(account: &str, parent: &str, kind: &str) -> String {
    if kind.is_empty() {
        format!("/x/{account}/{parent}/")
    } else {
        format!("/x/{account}/{parent}/{kind}/")
    }
}

/// Security-group name key.
pub fn sg_name_key(account: &str, vpc: &str, name: &str) -> String {
    format!("/n/{account}/{vpc}/sg/{name}")
}

/// IPAM key.
pub fn ip_key(subnet: &str, ip: Ipv4Addr) -> String {
    format!("/ip/{subnet}/{:08x}", u32::from(ip))
}

/// IPAM prefix of a subnet.
pub fn ip_prefix(subnet: &str) -> String {
    format!("/ip/{subnet}/")
}

/// The address of an IPAM key's last segment.
pub fn ip_of_key(key: &str) -> Option<Ipv4Addr> {
    let hex = key.rsplit('/').next()?;
    u32::from_str_radix(hex, 16).ok().map(Ipv4Addr::from)
}

/// VNI key.
pub fn vni_key(vni: u32) -> String {
    format!("/vni/{vni}")
}

/// Client-token key.
pub fn token_key(account: &str, kind: &str, token: &str) -> String {
    format!("/t/{account}/{kind}/{token}")
}

/// Account write lock.
pub fn lock_key(account: &str) -> String {
    format!("/lock/{account}")
}

/// Host key.
pub fn host_key(host: &str) -> String {
    format!("/h/{host}")
}

/// Prefix of every object (what the desired-state builder watches, with hosts).
pub const RECORDS_PREFIX: &str = "/r/";
/// Prefix of hosts.
pub const HOSTS_PREFIX: &str = "/h/";

/// What every object has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Id.
    pub id: String,
    /// Owning account.
    pub account: String,
    /// Tags (key, value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(String, String)>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

/// A VPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpcRec {
    /// Common fields.
    pub meta: Meta,
    /// CIDR.
    pub cidr: Ipv4Network,
    /// VNI.
    pub vni: u32,
    /// Its default security group.
    pub default_sg: String,
    /// Its default network ACL.
    pub default_acl: String,
    /// Its main route table.
    pub main_rtb: String,
    /// Share of each host's conntrack table it may fill (percent, 1-100); absent: the
    /// agents' default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_share: Option<u8>,
}

/// A subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetRec {
    /// Common fields.
    pub meta: Meta,
    /// VPC.
    pub vpc: String,
    /// CIDR.
    pub cidr: Ipv4Network,
    /// Associated network ACL (the VPC's default one unless replaced).
    pub network_acl: String,
}

/// A security-group rule with its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgRuleRec {
    /// `sgr-` id.
    pub id: String,
    /// The rule.
    pub rule: SgRule,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A security group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgRec {
    /// Common fields.
    pub meta: Meta,
    /// VPC.
    pub vpc: String,
    /// Name (unique per VPC).
    pub name: String,
    /// Description.
    pub description: String,
    /// The VPC's default group.
    pub default: bool,
    /// Inbound rules.
    pub ingress: Vec<SgRuleRec>,
    /// Outbound rules.
    pub egress: Vec<SgRuleRec>,
}

/// A network ACL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRec {
    /// Common fields.
    pub meta: Meta,
    /// VPC.
    pub vpc: String,
    /// The VPC's default ACL.
    pub default: bool,
    /// Inbound entries.
    pub inbound: Vec<AclRule>,
    /// Outbound entries.
    pub outbound: Vec<AclRule>,
}

/// A listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerRec {
    /// `lsnr-` id.
    pub id: String,
    /// Protocol.
    pub protocol: LbProtocol,
    /// Port.
    pub port: u16,
    /// Target group.
    pub target_group: String,
}

/// A load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbRec {
    /// Common fields.
    pub meta: Meta,
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: String,
    /// VPC.
    pub vpc: String,
    /// VIP (held in IPAM).
    pub vip: Ipv4Addr,
    /// Listeners.
    pub listeners: Vec<ListenerRec>,
}

/// A target group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TgRec {
    /// Common fields.
    pub meta: Meta,
    /// Name.
    pub name: String,
    /// VPC.
    pub vpc: String,
    /// Protocol.
    pub protocol: LbProtocol,
    /// Port.
    pub port: u16,
    /// Health check.
    pub health_check: HealthCheck,
    /// Seconds.
    pub deregistration_delay: u32,
    /// Targets.
    pub targets: Vec<TargetRef>,
}

/// An instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRec {
    /// Common fields.
    pub meta: Meta,
    /// Subnet.
    pub subnet: String,
    /// VPC.
    pub vpc: String,
    /// Host it is placed on.
    pub host: String,
    /// Private IPv4 (held in IPAM until terminated).
    pub ip: Ipv4Addr,
    /// MAC `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// The lifecycle state (`state::*`): the API moves it to pending, stopping and
    /// shutting-down; the host's reports to running, stopped and terminated.
    pub state: String,
    /// Instance type.
    pub instance_type: String,
    /// Why it is in its state (failed launches, user stops).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state_reason: String,
    /// User data, base64 (as EC2's API carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Command run with `/bin/sh -c` at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Last start requested, ms since the epoch.
    #[serde(default)]
    pub launch_ms: u64,
    /// When it became terminated (kept an hour, then deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated_ms: Option<u64>,
}

/// Instance and volume lifecycle states, as EC2 and EBS name them.
pub mod state {
    /// Instance: asked to run, not yet reported running by its host.
    pub const PENDING: &str = "pending";
    /// Instance: its host reports it running.
    pub const RUNNING: &str = "running";
    /// Instance: asked to stop.
    pub const STOPPING: &str = "stopping";
    /// Instance: its host reports it stopped.
    pub const STOPPED: &str = "stopped";
    /// Instance: asked to terminate.
    pub const SHUTTING_DOWN: &str = "shutting-down";
    /// Instance: its host removed it (or its launch failed).
    pub const TERMINATED: &str = "terminated";
    /// Volume: its host has not made the file yet.
    pub const CREATING: &str = "creating";
    /// Volume: not attached.
    pub const AVAILABLE: &str = "available";
    /// Volume: attached (or being attached or detached).
    pub const IN_USE: &str = "in-use";
    /// Volume or snapshot: being deleted by its host.
    pub const DELETING: &str = "deleting";
    /// Volume or snapshot: its host could not make it.
    pub const ERROR: &str = "error";
    /// Attachment: asked for.
    pub const ATTACHING: &str = "attaching";
    /// Attachment: its host reports it in place.
    pub const ATTACHED: &str = "attached";
    /// Attachment: asked to go.
    pub const DETACHING: &str = "detaching";
    /// Snapshot: being copied.
    pub const SNAP_PENDING: &str = "pending";
    /// Snapshot: in the snapshot store.
    pub const COMPLETED: &str = "completed";
}

/// A volume's attachment to an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRec {
    /// The instance.
    pub instance: String,
    /// `/dev/<device>` inside the instance.
    pub device: String,
    /// Where its filesystem is mounted inside the instance, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// attaching, attached, detaching.
    pub state: String,
}

/// A volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    /// Common fields.
    pub meta: Meta,
    /// GiB.
    pub size_gib: u32,
    /// creating, available, in-use, deleting, error.
    pub state: String,
    /// The host whose storage agent holds it (EBS's availability zone).
    #[serde(default)]
    pub host: String,
    /// The snapshot it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Its attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentRec>,
    /// Why it is in error, or why its attachment is stuck.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A snapshot of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRec {
    /// Common fields.
    pub meta: Meta,
    /// The volume it copies.
    pub volume: String,
    /// The volume's size, GiB.
    pub size_gib: u32,
    /// The host that makes (and deletes) it: the volume's.
    pub host: String,
    /// pending, completed, error, deleting.
    pub state: String,
    /// Why it is in error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A flow log (indexed under its VPC or subnet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogRec {
    /// Common fields.
    pub meta: Meta,
    /// The VPC or subnet it covers.
    pub resource: String,
    /// The resource's VPC.
    pub vpc: String,
    /// Which traffic.
    pub traffic_type: crate::overlay::flowlog::TrafficType,
    /// Maximum aggregation interval, seconds.
    pub interval_secs: u32,
}

/// A registered host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRec {
    /// Id.
    pub id: String,
    /// Underlay IPv4 (VTEP).
    pub vtep: Ipv4Addr,
    /// First registration, ms since the epoch.
    pub registered_ms: u64,
}

/// A client token's record: the hash of the creating request and the created object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRec {
    /// FNV-1a of the request's encoding (without the token).
    pub request_hash: String,
    /// Created object ids.
    pub ids: Vec<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
