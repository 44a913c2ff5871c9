//! Desired state of the overlay, as the control plane describes it (cluster-wide).

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// A VPC: an isolated tenant network with its own VNI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VpcSpec {
    /// `vpc-...` id.
    pub id: String,
    /// VXLAN network identifier (24 bits), unique per VPC.
    pub vni: u32,
    /// The VPC's IPv4 CIDR (/16 to /28).
    pub cidr: Ipv4Network,
}

/// A subnet of a VPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetSpec {
    /// `subnet-...` id.
    pub id: String,
    /// Owning VPC id.
    pub vpc: String,
    /// The subnet's CIDR, inside the VPC's.
    pub cidr: Ipv4Network,
}

/// A host running the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    /// Host id.
    pub id: String,
    /// Underlay IPv4 address (the VTEP).
    pub vtep: Ipv4Addr,
}

/// An instance's network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Interface or instance id.
    pub id: String,
    /// Subnet id.
    pub subnet: String,
    /// Host id the instance runs on.
    pub host: String,
    /// Private IPv4 address.
    pub ip: Ipv4Addr,
    /// MAC address.
    pub mac: [u8; 6],
    /// Host-side veth ifindex; known (and required) only on the instance's own host, where the
    /// compute agent created the veth.
    pub ifindex: Option<u32>,
}

/// The whole desired overlay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayState {
    /// VPCs.
    pub vpcs: Vec<VpcSpec>,
    /// Subnets.
    pub subnets: Vec<SubnetSpec>,
    /// Hosts.
    pub hosts: Vec<HostSpec>,
    /// Endpoints.
    pub endpoints: Vec<EndpointSpec>,
    /// Flow-log flags (`EP_LOG_*`) of the endpoints inside a logged VPC or subnet, by
    /// endpoint id (absent: not logged).
    pub flow_log_flags: std::collections::BTreeMap<String, u32>,
}

/// The subnet's gateway (VPC router) address: the network address + 1, as in AWS.
pub fn gateway(cidr: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// Whether `ip` is one of the five addresses AWS reserves in a subnet: network, +1 (router),
/// +2 (DNS), +3 (reserved), and the last (broadcast).
pub fn is_reserved(cidr: Ipv4Network, ip: Ipv4Addr) -> bool {
    let offset = u32::from(ip).wrapping_sub(u32::from(cidr.network()));
    offset <= 3 || ip == cidr.broadcast()
}
