//! The compute and storage part of the desired-state document (`StateFile::instances`,
//! `volumes`, `snapshots`): what the control plane asks of each host's compute and storage
//! agents. The overlay part (`endpoints`) wires running instances into their VPC; this part
//! says how to run them and which volumes and snapshots to keep.
//!
//! Data deletions are explicit (`delete: true`): an agent removes a volume's or snapshot's
//! file only when the document says so, never because an object is merely missing from it,
//! so a wrong or truncated document cannot destroy data. Instances are different: the
//! control plane lists every instance until its host has reported it terminated, so an
//! instance of this host that the document does not list is one whose termination the
//! agent missed (it was down), and the agent removes it like `Intent::Terminate`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// What should become of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Intent {
    /// Running: namespaces, veth, processes, metadata, exposed volumes.
    Run,
    /// Stopped: no processes, no network; its root filesystem changes and volumes are kept.
    Stop,
    /// Gone: every namespace, link, cgroup and file removed.
    Terminate,
}

/// One instance placed on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDoc {
    /// Instance id.
    pub id: String,
    /// The host that runs it.
    pub host: String,
    /// Owning account.
    pub account: String,
    /// What to do.
    pub intent: Intent,
    /// Subnet.
    pub subnet: String,
    /// VPC.
    pub vpc: String,
    /// Private IPv4.
    pub ip: Ipv4Addr,
    /// MAC.
    pub mac: String,
    /// EC2 instance type (its limits: `compute::types`).
    pub instance_type: String,
    /// Hostname, e.g. `ip-10-0-1-4`.
    pub hostname: String,
    /// Security group ids.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// Security group names (instance metadata shows names).
    #[serde(default)]
    pub security_group_names: Vec<String>,
    /// Command run with `/bin/sh -c` at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// User data, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Last start requested, ms since the epoch.
    #[serde(default)]
    pub launch_ms: u64,
}

/// A volume's attachment as the host should make it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentDoc {
    /// The instance (on the same host).
    pub instance: String,
    /// `/dev/<device>` inside the instance.
    pub device: String,
    /// Where to mount its filesystem inside the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Undo it: unmount, remove the device node, release the loop device.
    #[serde(default)]
    pub detach: bool,
}

/// One volume on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDoc {
    /// Volume id.
    pub id: String,
    /// The host whose storage agent holds it.
    pub host: String,
    /// Size, GiB.
    pub size_gib: u32,
    /// The snapshot to fill it from when it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Delete its file.
    #[serde(default)]
    pub delete: bool,
    /// Its attachment (to make, or with `detach`, to undo).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<AttachmentDoc>,
}

/// One snapshot, made and deleted by the host of its volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDoc {
    /// Snapshot id.
    pub id: String,
    /// The volume it copies.
    pub volume: String,
    /// The host that makes it.
    pub host: String,
    /// Delete it from the snapshot store.
    #[serde(default)]
    pub delete: bool,
}

/// EC2's private DNS hostname for an address: `ip-10-0-1-4`.
pub fn hostname(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("ip-{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec2_hostnames() {
        assert_eq!(hostname(Ipv4Addr::new(10, 0, 1, 4)), "ip-10-0-1-4");
    }

    #[test]
    fn intents_are_lowercase_words() {
        assert_eq!(
            serde_json::to_string(&Intent::Terminate).unwrap(),
            "\"terminate\""
        );
        let d: VolumeDoc =
            serde_json::from_str(r#"{"id":"vol-1","host":"h","size_gib":1}"#).unwrap();
        assert!(!d.delete && d.attachment.is_none() && d.snapshot.is_none());
    }
}
