//! The desired overlay as a JSON document (`vpc-agent --state FILE`).
//!
//! This is how the agent receives desired state until the control plane streams it over
//! gRPC: one cluster-wide document, the same file for every host; each agent picks its own
//! host out of it. Local endpoints name their host-side veth (`ifname`), which the agent
//! resolves to an ifindex in its own network namespace.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use dataplane_common::conntrack::CtConfig;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::model::{EndpointSpec, HostSpec, OverlayState, SubnetSpec, VpcSpec};
use crate::lb::model::{LbLimits, LoadBalancer, TargetGroup};
use crate::policy::{
    compile::{EndpointRef, PolicyInput, SubnetRef},
    model::{NetworkAcl, PolicyLimits, SecurityGroup},
};

/// The document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    /// VPCs.
    #[serde(default)]
    pub vpcs: Vec<VpcDoc>,
    /// Subnets.
    #[serde(default)]
    pub subnets: Vec<SubnetDoc>,
    /// Hosts.
    #[serde(default)]
    pub hosts: Vec<HostDoc>,
    /// Endpoints (instance interfaces).
    #[serde(default)]
    pub endpoints: Vec<EndpointDoc>,
    /// Security groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<SecurityGroup>,
    /// Network ACLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_acls: Vec<NetworkAcl>,
    /// Quotas (AWS's defaults when absent).
    #[serde(default)]
    pub limits: PolicyLimits,
    /// Connection-tracking idle timeouts (AWS's defaults when absent).
    #[serde(default)]
    pub conntrack: ConntrackDoc,
    /// Network load balancers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancers: Vec<LoadBalancer>,
    /// Target groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_groups: Vec<TargetGroup>,
    /// Load-balancer limits (AWS's quotas when absent).
    #[serde(default)]
    pub lb_limits: LbLimits,
    /// Instances to run, stop or remove (compute agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<crate::compute::doc::InstanceDoc>,
    /// Volumes (storage agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::compute::doc::VolumeDoc>,
    /// Snapshots (storage agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<crate::compute::doc::SnapshotDoc>,
    /// Flow logs (VPCs and subnets whose flows are logged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flow_logs: Vec<super::flowlog::FlowLogDoc>,
    /// Conntrack budgets: VNI -> share of each host's conntrack table the VPC may fill
    /// (percent, 1-100). VPCs not listed get the agent's default share.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub conntrack_shares: std::collections::BTreeMap<u32, u8>,
}

/// Connection-tracking idle timeouts, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConntrackDoc {
    /// TCP established (AWS: 432000, configurable 60..=432000).
    pub tcp_established_timeout: u32,
    /// TCP before the handshake completes.
    pub tcp_syn_timeout: u32,
    /// TCP after FIN or RST.
    pub tcp_closing_timeout: u32,
    /// UDP (AWS: 30).
    pub udp_timeout: u32,
    /// ICMP and other protocols (AWS: 600).
    pub other_timeout: u32,
}

impl Default for ConntrackDoc {
    fn default() -> Self {
        let d = CtConfig::DEFAULT;
        ConntrackDoc {
            tcp_established_timeout: d.tcp_established_secs,
            tcp_syn_timeout: d.tcp_syn_secs,
            tcp_closing_timeout: d.tcp_closing_secs,
            udp_timeout: d.udp_secs,
            other_timeout: d.other_secs,
        }
    }
}

impl ConntrackDoc {
    /// The `CT_CONFIG` value, or why the timeouts are out of range.
    pub fn config(&self) -> Result<CtConfig, StateFileError> {
        let check = |field: &'static str, v: u32, lo: u32, hi: u32| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(StateFileError::Timeout {
                    field,
                    value: v,
                    min: lo,
                    max: hi,
                })
            }
        };
        Ok(CtConfig {
            tcp_established_secs: check(
                "tcp_established_timeout",
                self.tcp_established_timeout,
                60,
                432_000,
            )?,
            tcp_syn_secs: check("tcp_syn_timeout", self.tcp_syn_timeout, 1, 3600)?,
            tcp_closing_secs: check("tcp_closing_timeout", self.tcp_closing_timeout, 1, 3600)?,
            udp_secs: check("udp_timeout", self.udp_timeout, 1, 3600)?,
            other_secs: check("other_timeout", self.other_timeout, 1, 3600)?,
            _reserved: 0,
        })
    }
}

/// A VPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpcDoc {
    /// Id.
    pub id: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// IPv4 CIDR.
    pub cidr: Ipv4Network,
}

/// A subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetDoc {
    /// Id.
    pub id: String,
    /// VPC id.
    pub vpc: String,
    /// IPv4 CIDR.
    pub cidr: Ipv4Network,
    /// Network ACL id; absent: the VPC's default ACL (allow all unless one is marked
    /// `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_acl: Option<String>,
}

/// A host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDoc {
    /// Id.
    pub id: String,
    /// Underlay IPv4 (VTEP).
    pub vtep: Ipv4Addr,
}

/// An endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDoc {
    /// Id.
    pub id: String,
    /// Subnet id.
    pub subnet: String,
    /// Host id.
    pub host: String,
    /// Private IPv4.
    pub ip: Ipv4Addr,
    /// MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Host-side veth name on its host.
    #[serde(default)]
    pub ifname: Option<String>,
    /// Security group ids; none: the VPC's default group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// Reading failed.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a valid document.
    #[error("parsing {path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause (with line and column).
        source: serde_json::Error,
    },
    /// A conntrack timeout is out of range.
    #[error("conntrack.{field} = {value} is outside {min}..={max} seconds")]
    Timeout {
        /// Field name.
        field: &'static str,
        /// The value.
        value: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// A MAC address is malformed.
    #[error("endpoint {endpoint}: invalid MAC address {mac:?}")]
    BadMac {
        /// Endpoint id.
        endpoint: String,
        /// The text.
        mac: String,
    },
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The document as seen from one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// The desired state, local endpoints with their ifindex.
    pub state: OverlayState,
    /// Local ports: host-side veth name -> ifindex.
    pub ports: BTreeMap<String, u32>,
    /// Local endpoints whose interface does not exist (yet), left out of `state`.
    pub missing: Vec<String>,
}

/// The document's policy-relevant objects, as the policy compiler takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRefs {
    /// VPC ids.
    pub vpcs: Vec<String>,
    /// Subnets with their ACLs.
    pub subnets: Vec<SubnetRef>,
    /// Endpoints with their groups; `local` for the host's endpoints whose port exists.
    pub endpoints: Vec<EndpointRef>,
}

impl PolicyRefs {
    /// The compiler input over these refs and the given groups, ACLs and quotas.
    pub fn input<'a>(
        &'a self,
        security_groups: &'a [SecurityGroup],
        network_acls: &'a [NetworkAcl],
        limits: &'a PolicyLimits,
    ) -> PolicyInput<'a> {
        PolicyInput {
            vpcs: &self.vpcs,
            subnets: &self.subnets,
            endpoints: &self.endpoints,
            security_groups,
            network_acls,
            limits,
        }
    }
}

impl StateFile {
    /// The policy objects as seen from host `local_host`, whose usable ports `view` lists.
    pub fn policy_refs(&self, view: &HostView, local_host: &str) -> PolicyRefs {
        let vpc_of = |subnet: &str| {
            self.subnets
                .iter()
                .find(|s| s.id == subnet)
                .map_or_else(String::new, |s| s.vpc.clone())
        };
        PolicyRefs {
            vpcs: self.vpcs.iter().map(|v| v.id.clone()).collect(),
            subnets: self
                .subnets
                .iter()
                .map(|s| SubnetRef {
                    id: s.id.clone(),
                    vpc: s.vpc.clone(),
                    cidr: s.cidr,
                    network_acl: s.network_acl.clone(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointRef {
                    id: e.id.clone(),
                    vpc: vpc_of(&e.subnet),
                    subnet: e.subnet.clone(),
                    ip: e.ip,
                    security_groups: e.security_groups.clone(),
                    local: e.host == local_host && !view.missing.contains(&e.id),
                })
                .collect(),
        }
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, StateFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| StateFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_strict(&text).map_err(|source| StateFileError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Parses a document a person wrote (`vpc-agent --state FILE`): a field this build does
    /// not know is an error (most likely a typo), named with its path.
    pub fn parse_strict(text: &str) -> Result<Self, serde_json::Error> {
        let (doc, unknown) = Self::parse(&mut serde_json::Deserializer::from_str(text))?;
        match unknown.first() {
            None => Ok(doc),
            Some(path) => Err(<serde_json::Error as serde::de::Error>::custom(format!(
                "unknown field `{path}`"
            ))),
        }
    }

    /// Parses a document streamed by a control plane, which may be newer than this agent
    /// (upgrades replace agents and control planes one at a time): fields this build does
    /// not know are skipped and returned as paths (`vpcs.0.new_field`) for the caller to
    /// log, instead of failing the whole document. What an old agent cannot apply, it
    /// leaves out; everything it knows keeps converging.
    pub fn parse_streamed(bytes: &[u8]) -> Result<(Self, Vec<String>), serde_json::Error> {
        Self::parse(&mut serde_json::Deserializer::from_slice(bytes))
    }

    fn parse<'de, R: serde_json::de::Read<'de>>(
        de: &mut serde_json::Deserializer<R>,
    ) -> Result<(Self, Vec<String>), serde_json::Error> {
        let mut unknown = Vec::new();
        let doc = serde_ignored::deserialize(&mut *de, |path| unknown.push(path.to_string()))?;
        de.end()?;
        Ok((doc, unknown))
    }

    /// The desired state as seen from host `local_host`: local endpoints get the ifindex
    /// `resolve` finds for their `ifname`. Local endpoints whose interface does not exist
    /// (yet) are listed in `missing` and left out, so one missing veth does not block the
    /// rest of the host.
    pub fn host_view(
        &self,
        local_host: &str,
        resolve: impl Fn(&str) -> Option<u32>,
    ) -> Result<HostView, StateFileError> {
        let mut missing = Vec::new();
        let mut ports = BTreeMap::new();
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for e in &self.endpoints {
            let mac = parse_mac(&e.mac).ok_or_else(|| StateFileError::BadMac {
                endpoint: e.id.clone(),
                mac: e.mac.clone(),
            })?;
            let ifindex = if e.host == local_host {
                let name = e.ifname.as_deref();
                match name.zip(name.and_then(&resolve)) {
                    Some((name, i)) => {
                        ports.insert(name.to_owned(), i);
                        Some(i)
                    }
                    None => {
                        missing.push(e.id.clone());
                        continue;
                    }
                }
            } else {
                None
            };
            endpoints.push(EndpointSpec {
                id: e.id.clone(),
                subnet: e.subnet.clone(),
                host: e.host.clone(),
                ip: e.ip,
                mac,
                ifindex,
            });
        }
        let state = OverlayState {
            vpcs: self
                .vpcs
                .iter()
                .map(|v| VpcSpec {
                    id: v.id.clone(),
                    vni: v.vni,
                    cidr: v.cidr,
                })
                .collect(),
            subnets: self
                .subnets
                .iter()
                .map(|s| SubnetSpec {
                    id: s.id.clone(),
                    vpc: s.vpc.clone(),
                    cidr: s.cidr,
                })
                .collect(),
            hosts: self
                .hosts
                .iter()
                .map(|h| HostSpec {
                    id: h.id.clone(),
                    vtep: h.vtep,
                })
                .collect(),
            flow_log_flags: super::flowlog::endpoint_flags(
                &self.flow_logs,
                endpoints.iter().map(|e| (e.id.as_str(), e.subnet.as_str())),
                |subnet| {
                    self.subnets
                        .iter()
                        .find(|s| s.id == subnet)
                        .map(|s| s.vpc.as_str())
                },
            ),
            endpoints,
        };
        Ok(HostView {
            state,
            ports,
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{
      "vpcs": [{"id": "vpc-a", "vni": 100, "cidr": "10.0.0.0/16"}],
      "subnets": [{"id": "subnet-a1", "vpc": "vpc-a", "cidr": "10.0.1.0/24"}],
      "hosts": [{"id": "h0", "vtep": "192.168.77.1"}, {"id": "h1", "vtep": "192.168.77.2"}],
      "endpoints": [
        {"id": "i-1", "subnet": "subnet-a1", "host": "h0", "ip": "10.0.1.10",
         "mac": "02:00:00:01:00:01", "ifname": "p0"},
        {"id": "i-2", "subnet": "subnet-a1", "host": "h1", "ip": "10.0.1.20",
         "mac": "02:00:00:01:01:01", "ifname": "p0"},
        {"id": "i-3", "subnet": "subnet-a1", "host": "h0", "ip": "10.0.1.30",
         "mac": "02:00:00:01:00:02", "ifname": "gone"}
      ]
    }"#;

    #[test]
    fn resolves_local_ports_and_sets_aside_missing_ones() {
        let doc: StateFile = serde_json::from_str(DOC).unwrap();
        let HostView {
            state,
            ports,
            missing,
        } = doc
            .host_view("h0", |name| (name == "p0").then_some(7))
            .unwrap();
        assert_eq!(missing, vec!["i-3".to_owned()]);
        assert_eq!(ports, BTreeMap::from([("p0".to_owned(), 7)]));
        assert_eq!(state.endpoints.len(), 2);
        assert_eq!(state.endpoints[0].ifindex, Some(7));
        assert_eq!(state.endpoints[0].mac, [2, 0, 0, 1, 0, 1]);
        // Remote endpoints never get an ifindex, whatever their ifname.
        assert_eq!(state.endpoints[1].ifindex, None);
    }

    #[test]
    fn rejects_bad_macs_and_unknown_fields() {
        for bad in [
            "02:00:00:01:00",
            "02:00:00:01:00:01:02",
            "zz:00:00:01:00:01",
            "2:0:0:1:0:1",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let err = StateFile::parse_strict(r#"{"vpcs": [], "extra": 1}"#).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }

    #[test]
    fn streamed_documents_skip_unknown_fields_and_name_them() {
        let doc = br#"{"vpcs": [{"id": "vpc-1", "vni": 7, "cidr": "10.0.0.0/16", "newer": true}],
            "next_feature": {"x": 1}}"#;
        let (parsed, unknown) = StateFile::parse_streamed(doc).unwrap();
        assert_eq!(parsed.vpcs.len(), 1);
        assert_eq!(parsed.vpcs[0].vni, 7);
        assert_eq!(unknown, ["vpcs.0.newer", "next_feature"]);
        // The same document written by hand is refused, naming the first unknown field.
        let text = std::str::from_utf8(doc).unwrap();
        let err = StateFile::parse_strict(text).unwrap_err();
        assert!(err.to_string().contains("vpcs.0.newer"), "{err}");
        // Trailing garbage is still an error in both modes.
        assert!(StateFile::parse_streamed(b"{} x").is_err());
    }
}
