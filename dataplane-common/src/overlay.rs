//! Map keys and values of the VPC overlay (VXLAN, one VNI per VPC).
//!
//! Addresses in keys are 16 bytes (IPv4 as IPv4-mapped IPv6), so IPv6 tenant traffic can use
//! the same maps later. The underlay (VTEP) is IPv4 today.
//!
//! Maps (defined in `dataplane-ebpf/src/maps.rs` as the datapath grows into them):
//! - `ENDPOINTS`: host-side veth ifindex -> [`Endpoint`] (who may send from this port).
//! - `NEIGHBORS`: [`NeighborKey`] (VNI, address) -> [`Neighbor`] (local port, remote VTEP or
//!   the subnet gateway): ARP answers and forwarding.
//! - `ROUTES`: LPM trie of [`RoutePrefix`] -> [`Route`]: longest-prefix routing within a VPC.
//! - `VTEPS`: underlay IPv4 of a known host -> `u32` (1): VXLAN is accepted only from these.
//! - `VNIS`: VNI -> `u32` (1): VXLAN is accepted only for VPCs present on this host.
//! - `OVERLAY_CONFIG`: one [`OverlayConfig`]: this host's VTEP, underlay interface and MTU.

/// UDP destination port of VXLAN (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN adds in front of the inner Ethernet frame: outer IPv4 (20) + UDP (8) + VXLAN (8)
/// + outer Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Largest valid VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// One instance port on this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// VNI of the instance's VPC.
    pub vni: u32,
    /// The instance's address (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// The instance's MAC.
    pub mac: [u8; 6],
    /// MAC the datapath answers ARP with for the subnet gateway and other instances (the VPC
    /// router's MAC, as in AWS where every off-link hop resolves to the router).
    pub router_mac: [u8; 6],
    /// The subnet's gateway address (IPv4-mapped): source of ICMP errors the router sends.
    pub gateway: [u8; 16],
    /// Security-group policy id (`crate::policy`): the union of the endpoint's groups.
    pub policy: u32,
    /// Network ACL id of the endpoint's subnet; 0: no ACL (allow everything).
    pub acl: u32,
    /// Prefix length of the endpoint's subnet (with `gateway`, the subnet itself): the ACL
    /// applies only to traffic crossing the subnet boundary.
    pub subnet_bits: u32,
    /// `EP_*` flags.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 64);

/// [`Endpoint::flags`]: the endpoint's VPC has load balancers, so packets delivered to it
/// may be replies of a balanced flow to reverse-NAT (`LB_REVERSE` is looked up only then).
pub const EP_LB_CLIENT: u32 = 1;

/// Value of `OVERLAY_CONFIG` (index 0). All zero means the overlay is not configured: the
/// underlay hooks then never decapsulate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OverlayConfig {
    /// This host's VTEP (underlay IPv4): outer source, and the only outer destination that
    /// is decapsulated.
    pub vtep: [u8; 4],
    /// Underlay interface the encapsulated packets leave by (the FIB lookup is bound to it).
    pub underlay_ifindex: u32,
    /// Underlay MTU: encapsulated packets larger than this are not sent.
    pub underlay_mtu: u32,
}

const _: () = assert!(core::mem::size_of::<OverlayConfig>() == 12);

/// Key of `NEIGHBORS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighborKey {
    /// VNI of the VPC.
    pub vni: u32,
    /// Address within the VPC (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<NeighborKey>() == 20);

/// Where a neighbor lives.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NeighborKind {
    /// An instance on this host: redirect to `ifindex`.
    Local = 1,
    /// An instance on another host: encapsulate towards `vtep`.
    Remote = 2,
    /// A subnet's gateway address (answered by the datapath, never forwarded to).
    Gateway = 3,
    /// A load balancer's VIP: answered with the router MAC; packets to it are balanced
    /// (`crate::lb`).
    LoadBalancer = 4,
}

/// Value of `NEIGHBORS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Neighbor {
    /// A [`NeighborKind`] as its number.
    pub kind: u32,
    /// Local: host-side veth ifindex of the instance; else 0.
    pub ifindex: u32,
    /// Remote: underlay IPv4 of the instance's host; else zero.
    pub vtep: [u8; 4],
    /// The neighbor's MAC (instances) or the router MAC (gateways).
    pub mac: [u8; 6],
    /// Reserved, zero (explicit padding).
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Neighbor>() == 20);

impl Neighbor {
    /// A neighbor of `kind`; `ifindex` and `vtep` are zero unless the kind uses them.
    pub const fn new(kind: NeighborKind, ifindex: u32, vtep: [u8; 4], mac: [u8; 6]) -> Self {
        Neighbor {
            kind: kind as u32,
            ifindex,
            vtep,
            mac,
            _pad: [0; 2],
        }
    }
}

/// LPM data of `ROUTES`: the VNI is matched in full (the prefix length always covers its 32
/// bits), then the address by the route's prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoutePrefix {
    /// VNI in network byte order (LPM tries match bytes from the first).
    pub vni_be: [u8; 4],
    /// Destination prefix (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<RoutePrefix>() == 20);

impl RoutePrefix {
    /// The LPM prefix length for an IPv4 route of `/prefix` in a VPC.
    pub const fn ipv4_prefix_len(prefix: u8) -> u32 {
        32 + 96 + prefix as u32
    }
}

/// What a route does.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// The VPC's `local` route: deliver to the neighbor with that address, if any.
    Local = 1,
    /// Drop (an explicit blackhole).
    Blackhole = 2,
}

/// Value of `ROUTES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// A [`RouteKind`] as its number.
    pub kind: u32,
}

const _: () = assert!(core::mem::size_of::<Route>() == 4);

/// The overlay maps as the forwarding logic reads them: the kernel implements it over the
/// BPF maps, host tests over in-memory tables.
pub trait OverlayTables {
    /// Longest-prefix match of `key` (full-length lookup) in `ROUTES`.
    fn route(&self, key: &RoutePrefix) -> Option<Route>;
    /// Exact lookup in `NEIGHBORS`.
    fn neighbor(&self, key: &NeighborKey) -> Option<Neighbor>;
    /// Whether `addr` is in `VTEPS`.
    fn is_vtep(&self, addr: [u8; 4]) -> bool;
    /// Whether `vni` is in `VNIS`.
    fn is_vni(&self, vni: u32) -> bool;
}

/// The IPv4 address inside an IPv4-mapped address.
#[inline(always)]
pub fn v4(addr: &[u8; 16]) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}
