//! Desired overlay state -> the contents of one host's overlay maps.
//!
//! A host needs state only for the VPCs it runs instances of: their VNIs, their `local`
//! routes, every endpoint and gateway of those VPCs (to answer ARP and forward), the VTEPs of
//! the other hosts running instances of them, and its own ports. Everything else is absent,
//! so a VXLAN packet for another VPC or from an unrelated host finds no entry and is dropped.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use dataplane_common::{
    filter::ipv4_mapped,
    overlay::{Endpoint, Neighbor, NeighborKind, RouteKind, RoutePrefix, VNI_MAX},
};

use super::model::{OverlayState, SubnetSpec, VpcSpec, gateway, is_reserved};

/// Contents of one host's overlay maps. `BTreeMap`s so diffs and tests are deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostMaps {
    /// `VNIS`: VNIs of the VPCs present on this host.
    pub vnis: BTreeSet<u32>,
    /// `VTEPS`: underlay addresses of the other hosts running instances of those VPCs.
    pub vteps: BTreeSet<Ipv4Addr>,
    /// `ROUTES`: (prefix length, prefix) -> route.
    pub routes: BTreeMap<(u32, RoutePrefix), RouteKind>,
    /// `NEIGHBORS`: (VNI, address) -> where it lives.
    pub neighbors: BTreeMap<(u32, [u8; 16]), NeighborEntry>,
    /// `ENDPOINTS`: host-side ifindex -> port.
    pub endpoints: BTreeMap<u32, EndpointEntry>,
}

/// A neighbor as compiled (converted to the map value by [`NeighborEntry::value`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighborEntry {
    /// An instance on this host.
    Local {
        /// Host-side veth ifindex.
        ifindex: u32,
        /// Instance MAC.
        mac: [u8; 6],
    },
    /// An instance on another host.
    Remote {
        /// That host's VTEP.
        vtep: Ipv4Addr,
        /// Instance MAC.
        mac: [u8; 6],
    },
    /// A subnet gateway, answered with the router MAC.
    Gateway {
        /// Router MAC.
        mac: [u8; 6],
    },
    /// A load balancer's VIP, answered with the router MAC and balanced.
    LoadBalancer {
        /// Router MAC.
        mac: [u8; 6],
    },
}

impl NeighborEntry {
    /// The `NEIGHBORS` value.
    pub fn value(&self) -> Neighbor {
        let (kind, ifindex, vtep, mac) = match *self {
            NeighborEntry::Local { ifindex, mac } => (NeighborKind::Local, ifindex, [0; 4], mac),
            NeighborEntry::Remote { vtep, mac } => (NeighborKind::Remote, 0, vtep.octets(), mac),
            NeighborEntry::Gateway { mac } => (NeighborKind::Gateway, 0, [0; 4], mac),
            NeighborEntry::LoadBalancer { mac } => (NeighborKind::LoadBalancer, 0, [0; 4], mac),
        };
        Neighbor::new(kind, ifindex, vtep, mac)
    }
}

impl NeighborEntry {
    /// The entry a `NEIGHBORS` value holds, `None` for an unknown kind (a newer datapath's).
    pub fn from_value(v: &Neighbor) -> Option<Self> {
        Some(match v.kind {
            k if k == NeighborKind::Local as u32 => NeighborEntry::Local {
                ifindex: v.ifindex,
                mac: v.mac,
            },
            k if k == NeighborKind::Remote as u32 => NeighborEntry::Remote {
                vtep: Ipv4Addr::from(v.vtep),
                mac: v.mac,
            },
            k if k == NeighborKind::Gateway as u32 => NeighborEntry::Gateway { mac: v.mac },
            k if k == NeighborKind::LoadBalancer as u32 => {
                NeighborEntry::LoadBalancer { mac: v.mac }
            }
            _ => return None,
        })
    }
}

/// A local port as compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// VNI of its VPC.
    pub vni: u32,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
    /// The router MAC it sees.
    pub router_mac: [u8; 6],
    /// Its subnet's gateway address.
    pub gateway: Ipv4Addr,
    /// Its subnet's prefix length.
    pub subnet_bits: u8,
    /// Security-group policy id (0 until the policy layer assigns one: denies everything).
    pub policy: u32,
    /// Network ACL id (0: no ACL).
    pub acl: u32,
    /// `EP_*` flags (flow logging from the document, `EP_LB_CLIENT` by the load-balancer
    /// layer).
    pub flags: u32,
}

impl EndpointEntry {
    /// The `ENDPOINTS` value.
    pub fn value(&self) -> Endpoint {
        Endpoint {
            vni: self.vni,
            addr: ipv4_mapped(self.ip.octets()),
            mac: self.mac,
            router_mac: self.router_mac,
            gateway: ipv4_mapped(self.gateway.octets()),
            policy: self.policy,
            acl: self.acl,
            subnet_bits: u32::from(self.subnet_bits),
            flags: self.flags,
        }
    }
}

impl EndpointEntry {
    /// The entry an `ENDPOINTS` value holds.
    pub fn from_value(v: &Endpoint) -> Self {
        EndpointEntry {
            vni: v.vni,
            ip: Ipv4Addr::from(dataplane_common::overlay::v4(&v.addr)),
            mac: v.mac,
            router_mac: v.router_mac,
            gateway: Ipv4Addr::from(dataplane_common::overlay::v4(&v.gateway)),
            subnet_bits: v.subnet_bits.min(32) as u8,
            policy: v.policy,
            acl: v.acl,
            flags: v.flags,
        }
    }
}

/// Why a desired state cannot be compiled. Each names the offending object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// Two objects of one kind share an id.
    #[error("duplicate {kind} id {id}")]
    DuplicateId {
        /// Object kind.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// A VNI is 0 or does not fit in 24 bits.
    #[error("{vpc}: VNI {vni} is outside 1..={VNI_MAX}")]
    VniOutOfRange {
        /// VPC id.
        vpc: String,
        /// The VNI.
        vni: u32,
    },
    /// Two VPCs share a VNI.
    #[error("{a} and {b} both use VNI {vni}")]
    DuplicateVni {
        /// One VPC.
        a: String,
        /// The other.
        b: String,
        /// The VNI.
        vni: u32,
    },
    /// A reference names an object that does not exist.
    #[error("{from} refers to unknown {kind} {id}")]
    UnknownRef {
        /// The referring object.
        from: String,
        /// Kind of the missing object.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A subnet is not inside its VPC's CIDR.
    #[error("subnet {subnet} ({cidr}) is not inside its VPC's CIDR {vpc_cidr}")]
    SubnetOutsideVpc {
        /// Subnet id.
        subnet: String,
        /// Subnet CIDR.
        cidr: String,
        /// VPC CIDR.
        vpc_cidr: String,
    },
    /// Two subnets of a VPC overlap.
    #[error("subnets {a} and {b} overlap")]
    SubnetsOverlap {
        /// One subnet.
        a: String,
        /// The other.
        b: String,
    },
    /// An endpoint address is outside its subnet or is a reserved address.
    #[error("endpoint {endpoint}: {ip} is not a usable address of subnet {subnet}")]
    BadEndpointAddress {
        /// Endpoint id.
        endpoint: String,
        /// Its address.
        ip: Ipv4Addr,
        /// Its subnet.
        subnet: String,
    },
    /// Two endpoints of one VPC share an address.
    #[error("endpoints {a} and {b} both use {ip} in the same VPC")]
    DuplicateAddress {
        /// One endpoint.
        a: String,
        /// The other.
        b: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// An endpoint on this host has no ifindex.
    #[error("endpoint {0} runs on this host but has no ifindex")]
    MissingIfindex(String),
    /// Two local endpoints share an ifindex.
    #[error("endpoints {a} and {b} share ifindex {ifindex}")]
    DuplicateIfindex {
        /// One endpoint.
        a: String,
        /// The other.
        b: String,
        /// The ifindex.
        ifindex: u32,
    },
}

/// `map[id]`, or the error that `from` refers to an unknown `kind`.
fn resolve<V: Copy>(
    map: &HashMap<&str, V>,
    id: &str,
    from: &str,
    kind: &'static str,
) -> Result<V, CompileError> {
    map.get(id)
        .copied()
        .ok_or_else(|| CompileError::UnknownRef {
            from: from.to_owned(),
            kind,
            id: id.to_owned(),
        })
}

fn unique_ids<'a>(
    kind: &'static str,
    ids: impl Iterator<Item = &'a str>,
) -> Result<(), CompileError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(CompileError::DuplicateId {
                kind,
                id: id.to_owned(),
            });
        }
    }
    Ok(())
}

/// Validates `state` and compiles the maps of host `local_host`, whose VPC router answers
/// with `router_mac`.
pub fn compile(
    state: &OverlayState,
    local_host: &str,
    router_mac: [u8; 6],
) -> Result<HostMaps, CompileError> {
    unique_ids("vpc", state.vpcs.iter().map(|v| v.id.as_str()))?;
    unique_ids("subnet", state.subnets.iter().map(|s| s.id.as_str()))?;
    unique_ids("host", state.hosts.iter().map(|h| h.id.as_str()))?;
    unique_ids("endpoint", state.endpoints.iter().map(|e| e.id.as_str()))?;

    let mut vpcs: HashMap<&str, &VpcSpec> = HashMap::new();
    let mut by_vni: HashMap<u32, &str> = HashMap::new();
    for vpc in &state.vpcs {
        if vpc.vni == 0 || vpc.vni > VNI_MAX {
            return Err(CompileError::VniOutOfRange {
                vpc: vpc.id.clone(),
                vni: vpc.vni,
            });
        }
        if let Some(other) = by_vni.insert(vpc.vni, &vpc.id) {
            return Err(CompileError::DuplicateVni {
                a: other.to_owned(),
                b: vpc.id.clone(),
                vni: vpc.vni,
            });
        }
        vpcs.insert(&vpc.id, vpc);
    }

    let mut subnets: HashMap<&str, (&SubnetSpec, &VpcSpec)> = HashMap::new();
    for subnet in &state.subnets {
        let vpc = resolve(&vpcs, &subnet.vpc, &subnet.id, "vpc")?;
        if !vpc.cidr.contains(subnet.cidr.network()) || subnet.cidr.prefix() < vpc.cidr.prefix() {
            return Err(CompileError::SubnetOutsideVpc {
                subnet: subnet.id.clone(),
                cidr: subnet.cidr.to_string(),
                vpc_cidr: vpc.cidr.to_string(),
            });
        }
        if let Some((other, _)) = subnets.values().find(|(other, v)| {
            v.id == vpc.id
                && (other.cidr.contains(subnet.cidr.network())
                    || subnet.cidr.contains(other.cidr.network()))
        }) {
            return Err(CompileError::SubnetsOverlap {
                a: other.id.clone(),
                b: subnet.id.clone(),
            });
        }
        subnets.insert(&subnet.id, (subnet, vpc));
    }

    let hosts: HashMap<&str, Ipv4Addr> = state
        .hosts
        .iter()
        .map(|h| (h.id.as_str(), h.vtep))
        .collect();

    // Validate every endpoint and find the VPCs this host takes part in.
    let mut addresses: HashMap<(u32, Ipv4Addr), &str> = HashMap::new();
    let mut local_vnis = BTreeSet::new();
    let mut maps = HostMaps::default();
    for ep in &state.endpoints {
        let (subnet, vpc) = resolve(&subnets, &ep.subnet, &ep.id, "subnet")?;
        resolve(&hosts, &ep.host, &ep.id, "host")?;
        if !subnet.cidr.contains(ep.ip) || is_reserved(subnet.cidr, ep.ip) {
            return Err(CompileError::BadEndpointAddress {
                endpoint: ep.id.clone(),
                ip: ep.ip,
                subnet: subnet.id.clone(),
            });
        }
        if let Some(other) = addresses.insert((vpc.vni, ep.ip), &ep.id) {
            return Err(CompileError::DuplicateAddress {
                a: other.to_owned(),
                b: ep.id.clone(),
                ip: ep.ip,
            });
        }
        if ep.host == local_host {
            let ifindex = ep
                .ifindex
                .ok_or_else(|| CompileError::MissingIfindex(ep.id.clone()))?;
            let entry = EndpointEntry {
                vni: vpc.vni,
                ip: ep.ip,
                mac: ep.mac,
                router_mac,
                gateway: gateway(subnet.cidr),
                subnet_bits: subnet.cidr.prefix(),
                policy: 0,
                acl: 0,
                flags: state.flow_log_flags.get(&ep.id).copied().unwrap_or(0),
            };
            if maps.endpoints.insert(ifindex, entry).is_some() {
                let other = state
                    .endpoints
                    .iter()
                    .find(|o| o.host == local_host && o.ifindex == Some(ifindex))
                    .map_or_else(String::new, |o| o.id.clone());
                return Err(CompileError::DuplicateIfindex {
                    a: other,
                    b: ep.id.clone(),
                    ifindex,
                });
            }
            local_vnis.insert(vpc.vni);
        }
    }

    // State of the VPCs present here.
    for vpc in state.vpcs.iter().filter(|v| local_vnis.contains(&v.vni)) {
        maps.vnis.insert(vpc.vni);
        let prefix = RoutePrefix {
            vni_be: vpc.vni.to_be_bytes(),
            addr: ipv4_mapped(vpc.cidr.network().octets()),
        };
        maps.routes.insert(
            (RoutePrefix::ipv4_prefix_len(vpc.cidr.prefix()), prefix),
            RouteKind::Local,
        );
    }
    for (subnet, vpc) in subnets.values() {
        if local_vnis.contains(&vpc.vni) {
            let gw = ipv4_mapped(gateway(subnet.cidr).octets());
            maps.neighbors
                .insert((vpc.vni, gw), NeighborEntry::Gateway { mac: router_mac });
        }
    }
    for ep in &state.endpoints {
        let (_, vpc) = subnets[ep.subnet.as_str()];
        if !local_vnis.contains(&vpc.vni) {
            continue;
        }
        let entry = if ep.host == local_host {
            NeighborEntry::Local {
                ifindex: ep.ifindex.expect("validated above"),
                mac: ep.mac,
            }
        } else {
            let vtep = hosts[ep.host.as_str()];
            maps.vteps.insert(vtep);
            NeighborEntry::Remote { vtep, mac: ep.mac }
        };
        maps.neighbors
            .insert((vpc.vni, ipv4_mapped(ep.ip.octets())), entry);
    }
    Ok(maps)
}
