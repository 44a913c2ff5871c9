//! Multi-host overlay topologies in network namespaces, for end-to-end tests and benchmarks.
//!
//! A [`Topology`] stands for a small cloud on one machine:
//!
//! ```text
//!                         fabric ns: bridge br0 (the physical network)
//!                u0 |                  u1 |                  u2 |
//!   host ns h0: ul0 192.168.77.1   h1: ul0 .2            h2: ul0 .3      (underlay, MTU 1500)
//!        p0 |   p1 |   ...                                               (host-side veths)
//!   instance ns: eth0 10.0.1.10/24, MTU 1450, default via 10.0.1.1       (one ns per instance)
//! ```
//!
//! The namespaces, veths and addresses are the same in every [`Mode`]; only what connects the
//! instances' host-side veths across hosts differs:
//!
//! - [`Mode::Ebpf`]: nothing but the real `vpc-agent` in each host namespace, attached to `ul0`
//!   and told the cluster-wide desired state through a JSON file (`--state`, format in
//!   [`DesiredState`]). This is the system under test.
//! - [`Mode::KernelVxlan`]: what a user would build from stock kernel parts without this project
//!   (per VPC and host a Linux bridge, a VXLAN device with static flooding entries, the subnet
//!   gateways, a routing table and nftables conntrack rules). It is the baseline for the
//!   benchmarks and a check that the topology itself is sound. See [`Mode::KernelVxlan`] for what
//!   it takes to make that work with overlapping CIDRs.
//!
//! [`PlainVeth`] is the other benchmark baseline: two instances joined directly by one veth, the
//! best any overlay can do.
//!
//! Everything is cleaned up on drop, also when a test panics: agents are stopped, the state file
//! is removed and the namespaces (with every interface in them) are deleted. Names come from
//! [`crate::netns::unique_name`], so tests using topologies run in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail, ensure};

use controlplane::overlay::statefile::{
    EndpointDoc, HostDoc, StateFile as StateDoc, SubnetDoc, VpcDoc,
};

use crate::netns::{BpffsDir, NetNs, ensure_bpffs, unique_name};
use crate::procs::Agent;

/// Bytes VXLAN adds in front of an inner Ethernet frame over IPv4: outer IPv4 (20) + UDP (8) +
/// VXLAN (8) + inner Ethernet (14). Instances get the underlay MTU minus this, so that their
/// encapsulated frames fit the underlay without fragmentation.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The IANA VXLAN UDP port.
pub const VXLAN_PORT: u16 = 4789;

/// Default underlay MTU.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// The underlay interface in each host namespace (the agent's `--iface`).
pub const UNDERLAY_IF: &str = "ul0";

/// The interface inside each instance namespace.
pub const INSTANCE_IF: &str = "eth0";

/// The bridge in the fabric namespace.
const FABRIC_BRIDGE: &str = "br0";

/// Prefix length of the underlay network 192.168.77.0/24.
const UNDERLAY_PREFIX_LEN: u8 = 24;

/// Preference of the per-VPC `ip rule`s of [`Mode::KernelVxlan`]: after the local table (0),
/// before main (32766).
const VPC_RULE_PREF: u32 = 1000;

/// Routing tables of [`Mode::KernelVxlan`] are `VPC_TABLE_BASE + vni`, which never hits the
/// reserved tables 0 and 253..=255 (a VNI is below 2^24, so the sum fits in u32).
const VPC_TABLE_BASE: u32 = 1000;

/// Host id of host `i` in the desired state (`h0`, `h1`, ...), the agent's `--host`.
pub fn host_id(i: usize) -> String {
    format!("h{i}")
}

/// Underlay (VTEP) address of host `i`: `192.168.77.<i + 1>`.
///
/// # Panics
///
/// If `i > 253` (the topology validates the host count before using this).
pub fn underlay_ip(i: usize) -> Ipv4Addr {
    let last = u8::try_from(i + 1).expect("host index out of the underlay /24");
    Ipv4Addr::new(192, 168, 77, last)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An IPv4 prefix such as `10.0.1.0/24`; host bits must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// `network/prefix`; fails if `prefix > 32` or `network` has host bits set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self> {
        ensure!(prefix <= 32, "prefix length {prefix} is longer than 32");
        let cidr = Self { network, prefix };
        ensure!(
            u32::from(network) & !cidr.mask() == 0,
            "{network}/{prefix} has host bits set"
        );
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The last address (broadcast).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether `other` is entirely inside this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.network)
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The subnet gateway (VPC router) address, network + 1 as in AWS.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("{s:?} is not address/prefix"))?;
        let ip = ip
            .parse()
            .with_context(|| format!("bad address in {s:?}"))?;
        let prefix = prefix
            .parse()
            .with_context(|| format!("bad prefix length in {s:?}"))?;
        Self::new(ip, prefix)
    }
}

/// Parses a literal CIDR of the standard specs.
fn cidr(s: &str) -> Cidr {
    s.parse().expect("literal CIDR")
}

/// A VPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VpcDef {
    /// `vpc-...` id.
    pub id: String,
    /// Its VXLAN network identifier.
    pub vni: u32,
    /// Its CIDR.
    pub cidr: Cidr,
}

/// A subnet of a VPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetDef {
    /// `subnet-...` id.
    pub id: String,
    /// Id of the VPC it belongs to.
    pub vpc: String,
    /// Its CIDR (inside the VPC's).
    pub cidr: Cidr,
}

/// An instance: one namespace with one interface, [`INSTANCE_IF`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceDef {
    /// Name, unique in the topology; also the endpoint id in the desired state.
    pub name: String,
    /// Id of its subnet.
    pub subnet: String,
    /// Index of the host it runs on (`0..hosts`).
    pub host: usize,
    /// Its private address.
    pub ip: Ipv4Addr,
}

/// What a [`Topology`] is built from: hosts, VPCs, subnets and instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologySpec {
    /// Number of hosts (ids `h0`, `h1`, ...).
    pub hosts: usize,
    /// MTU of the underlay links; instances get this minus [`VXLAN_OVERHEAD`].
    pub underlay_mtu: u32,
    /// VPCs.
    pub vpcs: Vec<VpcDef>,
    /// Subnets.
    pub subnets: Vec<SubnetDef>,
    /// Instances.
    pub instances: Vec<InstanceDef>,
}

/// The standard spec: VPCs `vpc-a` (VNI 100) and `vpc-b` (VNI 200), both 10.0.0.0/16, each
/// with subnets 10.0.1.0/24 (`subnet-a1`, `subnet-b1`) and 10.0.2.0/24 (`subnet-a2`,
/// `subnet-b2`). On every host `i` and for each VPC there is one instance in each subnet,
/// named `<vpc letter>-h<i>-s<subnet>` (e.g. `a-h0-s1`), with address 10.0.<subnet>.<10 (i + 1)>
/// (host 0: .10, host 1: .20, host 2: .30). The same addresses thus exist in both VPCs, which is
/// what isolation has to cope with.
///
/// # Panics
///
/// If `hosts` is 0 or above 25 (the addresses would leave the /24).
pub fn two_vpcs_same_cidr(hosts: usize) -> TopologySpec {
    assert!(
        (1..=25).contains(&hosts),
        "two_vpcs_same_cidr: 1 to 25 hosts, not {hosts}"
    );
    let mut spec = TopologySpec {
        hosts,
        underlay_mtu: DEFAULT_UNDERLAY_MTU,
        vpcs: Vec::new(),
        subnets: Vec::new(),
        instances: Vec::new(),
    };
    for (letter, vni) in [("a", 100), ("b", 200)] {
        let vpc = format!("vpc-{letter}");
        spec.vpcs.push(VpcDef {
            id: vpc.clone(),
            vni,
            cidr: cidr("10.0.0.0/16"),
        });
        for s in 1..=2u8 {
            spec.subnets.push(SubnetDef {
                id: format!("subnet-{letter}{s}"),
                vpc: vpc.clone(),
                cidr: Cidr {
                    network: Ipv4Addr::new(10, 0, s, 0),
                    prefix: 24,
                },
            });
        }
    }
    for host in 0..hosts {
        // `hosts <= 25`: fits in a u8 and in the /24.
        let last = u8::try_from(10 * (host + 1)).expect("asserted above");
        for letter in ["a", "b"] {
            for s in 1..=2u8 {
                spec.instances.push(InstanceDef {
                    name: format!("{letter}-h{host}-s{s}"),
                    subnet: format!("subnet-{letter}{s}"),
                    host,
                    ip: Ipv4Addr::new(10, 0, s, last),
                });
            }
        }
    }
    spec
}

impl TopologySpec {
    /// The VPC with this id.
    pub fn vpc(&self, id: &str) -> Option<&VpcDef> {
        self.vpcs.iter().find(|v| v.id == id)
    }

    /// The subnet with this id.
    pub fn subnet(&self, id: &str) -> Option<&SubnetDef> {
        self.subnets.iter().find(|s| s.id == id)
    }

    /// The instance with this name.
    pub fn instance(&self, name: &str) -> Option<&InstanceDef> {
        self.instances.iter().find(|i| i.name == name)
    }

    /// The VPC an instance is in (through its subnet).
    pub fn vpc_of(&self, instance: &str) -> Option<&VpcDef> {
        let subnet = self.subnet(&self.instance(instance)?.subnet)?;
        self.vpc(&subnet.vpc)
    }

    /// Names of the instances of a VPC, in spec order.
    pub fn instances_in_vpc(&self, vpc: &str) -> Vec<&str> {
        self.instances
            .iter()
            .filter(|i| self.subnet(&i.subnet).is_some_and(|s| s.vpc == vpc))
            .map(|i| i.name.as_str())
            .collect()
    }

    /// Checks that the spec is buildable: 1 to 253 hosts, an underlay MTU leaving at least
    /// 576 bytes to instances, unique ids and names, VNIs of 1 to 2^24 - 1, subnets inside their
    /// VPC and disjoint, instances on existing hosts with usable, unique addresses of their
    /// subnet. The same address in two VPCs is fine (that is the point of VPCs).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=253).contains(&self.hosts),
            "1 to 253 hosts, not {}",
            self.hosts
        );
        ensure!(
            self.underlay_mtu >= 576 + VXLAN_OVERHEAD,
            "underlay MTU {} leaves instances less than 576 bytes",
            self.underlay_mtu
        );
        let mut vnis = BTreeSet::new();
        let mut vpc_ids = BTreeSet::new();
        for v in &self.vpcs {
            ensure!(vpc_ids.insert(&v.id), "duplicate VPC id {}", v.id);
            ensure!(
                (1..1 << 24).contains(&v.vni),
                "VPC {}: VNI {} out of range",
                v.id,
                v.vni
            );
            ensure!(vnis.insert(v.vni), "VPC {}: duplicate VNI {}", v.id, v.vni);
        }
        ensure!(
            self.vpcs.len() < 256,
            "at most 255 VPCs (the MAC scheme has one byte for them)"
        );
        let mut subnet_ids = BTreeSet::new();
        for (i, s) in self.subnets.iter().enumerate() {
            ensure!(subnet_ids.insert(&s.id), "duplicate subnet id {}", s.id);
            let vpc = self
                .vpc(&s.vpc)
                .ok_or_else(|| anyhow!("subnet {}: unknown VPC {}", s.id, s.vpc))?;
            ensure!(
                vpc.cidr.covers(&s.cidr),
                "subnet {} ({}) is not inside VPC {} ({})",
                s.id,
                s.cidr,
                vpc.id,
                vpc.cidr
            );
            ensure!(s.cidr.prefix <= 29, "subnet {}: /29 at most", s.id);
            for other in &self.subnets[..i] {
                ensure!(
                    other.vpc != s.vpc || !other.cidr.overlaps(&s.cidr),
                    "subnets {} and {} overlap",
                    other.id,
                    s.id
                );
            }
        }
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for inst in &self.instances {
            ensure!(
                names.insert(&inst.name),
                "duplicate instance name {}",
                inst.name
            );
            let subnet = self
                .subnet(&inst.subnet)
                .ok_or_else(|| anyhow!("instance {}: unknown subnet {}", inst.name, inst.subnet))?;
            ensure!(
                inst.host < self.hosts,
                "instance {}: host {} of {}",
                inst.name,
                inst.host,
                self.hosts
            );
            ensure!(
                subnet.cidr.contains(inst.ip)
                    && inst.ip != subnet.cidr.network()
                    && inst.ip != subnet.cidr.gateway()
                    && inst.ip != subnet.cidr.broadcast(),
                "instance {}: {} is not a usable address of {} ({})",
                inst.name,
                inst.ip,
                subnet.id,
                subnet.cidr
            );
            ensure!(
                addrs.insert((&subnet.vpc, inst.ip)),
                "instance {}: {} is already used in {}",
                inst.name,
                inst.ip,
                subnet.vpc
            );
        }
        Ok(())
    }

    /// MTU of the instances' interfaces (underlay MTU - [`VXLAN_OVERHEAD`]).
    pub fn instance_mtu(&self) -> u32 {
        self.underlay_mtu - VXLAN_OVERHEAD
    }
}

/// How an instance is plugged into its host: the names and addresses the agent needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Host index.
    pub host: usize,
    /// Name of the host-side veth in the host namespace (`p<k>`).
    pub ifname: String,
    /// MAC address of the instance's [`INSTANCE_IF`]: locally administered, unicast,
    /// `02:00:00:<VPC number>:<host index>:<number of the instance among that VPC's on that
    /// host>` (numbers from 1, in spec order).
    pub mac: [u8; 6],
}

/// Assigns each instance its host-side veth name and MAC (see [`Port`]), in spec order. The
/// spec must be valid.
fn assign_ports(spec: &TopologySpec) -> Result<BTreeMap<String, Port>> {
    let mut per_host = vec![0usize; spec.hosts];
    let mut per_vpc_host: BTreeMap<(usize, usize), u8> = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for inst in &spec.instances {
        let vpc = spec
            .vpc_of(&inst.name)
            .ok_or_else(|| anyhow!("instance {} has no VPC", inst.name))?;
        let vpc_idx = spec
            .vpcs
            .iter()
            .position(|v| v.id == vpc.id)
            .context("VPC index")?;
        let vpc_no = u8::try_from(vpc_idx + 1).context("too many VPCs for the MAC scheme")?;
        let host_no = u8::try_from(inst.host).context("host index does not fit the MAC")?;
        let n = per_vpc_host.entry((vpc_idx, inst.host)).or_insert(0);
        *n = n.checked_add(1).with_context(|| {
            format!(
                "more than 255 instances of {} on host {}",
                vpc.id, inst.host
            )
        })?;
        let k = per_host[inst.host];
        per_host[inst.host] += 1;
        ports.insert(
            inst.name.clone(),
            Port {
                host: inst.host,
                ifname: format!("p{k}"),
                mac: [0x02, 0, 0, vpc_no, host_no, *n],
            },
        );
    }
    Ok(ports)
}

/// MAC of the gateway bridge `br-<vni>` of [`Mode::KernelVxlan`] for VPC number `vpc_no` on
/// `host`: distinct from every instance MAC (third byte 1) and per host, so that an instance
/// always knows its own host's gateway under one stable address.
fn gateway_mac(vpc_no: u8, host: u8) -> [u8; 6] {
    [0x02, 0, 1, vpc_no, host, 1]
}

/// The desired-state document the agent reads (`--state FILE`): the agent's own type, so the
/// tests always write exactly the format the agent parses.
pub type DesiredState = StateDoc;

/// The desired state for `spec`, with the given instance ports.
fn desired_state_with(spec: &TopologySpec, ports: &BTreeMap<String, Port>) -> Result<DesiredState> {
    spec.validate()?;
    let mut endpoints = Vec::new();
    for inst in &spec.instances {
        let port = ports
            .get(&inst.name)
            .ok_or_else(|| anyhow!("instance {} is not part of the topology", inst.name))?;
        ensure!(
            port.host == inst.host,
            "instance {} was built on host {}, not {}",
            inst.name,
            port.host,
            inst.host
        );
        endpoints.push(EndpointDoc {
            id: inst.name.clone(),
            subnet: inst.subnet.clone(),
            host: host_id(inst.host),
            ip: inst.ip,
            mac: format_mac(port.mac),
            ifname: Some(port.ifname.clone()),
            security_groups: Vec::new(),
        });
    }
    Ok(StateDoc {
        vpcs: spec
            .vpcs
            .iter()
            .map(|v| {
                Ok(VpcDoc {
                    id: v.id.clone(),
                    vni: v.vni,
                    cidr: v.cidr.to_string().parse()?,
                })
            })
            .collect::<Result<_>>()?,
        subnets: spec
            .subnets
            .iter()
            .map(|s| {
                Ok(SubnetDoc {
                    id: s.id.clone(),
                    vpc: s.vpc.clone(),
                    cidr: s.cidr.to_string().parse()?,
                    network_acl: None,
                })
            })
            .collect::<Result<_>>()?,
        hosts: (0..spec.hosts)
            .map(|i| HostDoc {
                id: host_id(i),
                vtep: underlay_ip(i),
            })
            .collect(),
        endpoints,
        ..StateDoc::default()
    })
}

/// The desired state of a freshly built topology of `spec` (ports assigned as [`Topology`]
/// assigns them). Pure: useful to check the format without building anything.
pub fn desired_state(spec: &TopologySpec) -> Result<DesiredState> {
    spec.validate()?;
    desired_state_with(spec, &assign_ports(spec)?)
}

/// How the instances are connected across hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The real agent in each host namespace, attached to [`UNDERLAY_IF`], started with
    /// `--host h<i> --state <file> --xdp-mode <xdp_mode>`, the file holding the
    /// [`DesiredState`] of the whole topology. The host namespaces hold nothing else: `ul0`
    /// with its address and the instances' veths (up, no address, no bridge, no forwarding),
    /// so every packet between instances is the datapath's doing.
    Ebpf {
        /// The agent's `--xdp-mode` (e.g. `off`, `native`, `generic`, `auto`).
        xdp_mode: String,
    },
    /// The stock-kernel baseline. Per host and per VPC that has instances on it:
    ///
    /// - a bridge `br-<vni>` enslaving the VPC's instance veths and a VXLAN device `vx<vni>`
    ///   (`local <underlay ip> dstport 4789 nolearning dev ul0`) with a flooding entry
    ///   (`00:00:00:00:00:00 dst <vtep>`) for every other host running the VPC and a static
    ///   entry for each remote instance MAC (so known unicast is not replicated to every host);
    /// - the gateway addresses of the VPC's subnets on the bridge (a distributed router: every
    ///   host routes its own instances' traffic, with a per-host gateway MAC);
    /// - a routing table `1000 + vni` with the VPC's subnets and an `unreachable default`, and
    ///   `ip rule iif br-<vni> lookup 1000+vni`: packets routed for one VPC only see that VPC's
    ///   routes (and never the underlay), although both VPCs use the same CIDR. This is what a
    ///   VRF per VPC would give; this kernel (`CONFIG_NET_VRF` unset) has no VRF devices, and
    ///   VRFs are built on the same l3mdev FIB rules, so the cost is comparable. The addresses
    ///   are added with `noprefixroute` so that the main table holds no tenant routes at all;
    /// - permanent neighbour entries on the bridge for all the VPC's instances, and an nftables
    ///   bridge rule that keeps ARP for gateway addresses off the VXLAN ports. Without them,
    ///   an instance's ARP request for its gateway would also be answered by the other hosts'
    ///   gateways, and a host resolving a remote instance would overwrite that instance's
    ///   gateway entry (ARP requests update the sender's entry), so instances would route via
    ///   random hosts: triangular paths that stateful conntrack sees only one direction of;
    /// - nftables as a user would write stateful security groups (`table inet vpc`): forward
    ///   and input chains with policy drop accepting `ct state established,related` and
    ///   `ct state new`, and a raw prerouting chain putting each VPC's packets (input interface
    ///   `br-<vni>`) into its own conntrack zone, since the same 5-tuple exists in both VPCs.
    ///
    /// Bridged frames traverse the inet hooks only with `br_netfilter`. This kernel has it built
    /// in (`CONFIG_BRIDGE_NETFILTER=y`, `net.bridge.bridge-nf-call-iptables=1` in every
    /// namespace), so here bridged traffic is conntracked and filtered too; it is not loaded on
    /// purpose. That matters for cross-host, cross-subnet flows: the client's host routes the
    /// client's packets and the server's host the server's, so each host's conntrack sees the
    /// other direction only as bridged frames. Without `br_netfilter` the client's host would
    /// see an ACK after a SYN and no SYN/ACK, the server's host a SYN/ACK without a SYN: both
    /// `ct state invalid`, dropped by the forward policy.
    KernelVxlan,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Ebpf { xdp_mode } => write!(f, "eBPF (xdp {xdp_mode})"),
            Mode::KernelVxlan => f.write_str("kernel VXLAN"),
        }
    }
}

/// The desired-state file of [`Mode::Ebpf`], removed on drop.
#[derive(Debug)]
struct StateFile {
    path: PathBuf,
}

impl StateFile {
    fn create() -> Self {
        Self {
            path: std::env::temp_dir().join(format!("{}.json", unique_name("state"))),
        }
    }

    /// Replaces the file atomically (write a sibling, then rename over), so that an agent
    /// watching it never reads a half-written state. Watchers of the file's inode (rather than
    /// its directory or path) see the rename as the old inode going away.
    fn write(&self, contents: &str) -> Result<()> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("topology: removing {}: {e}", self.path.display());
            }
            _ => {}
        }
    }
}

/// One instance: its namespace and how it is plugged in.
#[derive(Debug)]
struct Instance {
    ns: NetNs,
    port: Port,
    ip: Ipv4Addr,
}

/// Per-host state of [`Mode::Ebpf`].
#[derive(Debug)]
struct HostAgent {
    /// The running agent; `None` after [`Topology::take_agent`].
    agent: Option<Agent>,
    pins: BpffsDir,
}

/// A built multi-host topology (see the module docs). Dropping it stops the agents, removes
/// the state file and deletes all namespaces.
#[derive(Debug)]
pub struct Topology {
    // Drop order is declaration order: agents stop while their namespaces and pins still
    // exist, then the pin directories go, then the namespaces.
    agents: Vec<HostAgent>,
    state: Option<StateFile>,
    instances: BTreeMap<String, Instance>,
    hosts: Vec<NetNs>,
    fabric: NetNs,
    spec: TopologySpec,
    mode: Mode,
}

impl Topology {
    /// Builds the namespaces and links of `spec` and connects them as `mode` says; in
    /// [`Mode::Ebpf`] that includes writing the state file and starting one agent per host
    /// (each waits until ready, at most 30 s). On error everything created so far is removed.
    pub fn build(spec: TopologySpec, mode: Mode) -> Result<Self> {
        spec.validate()?;
        let ports = assign_ports(&spec)?;
        let ul_mtu = spec.underlay_mtu;
        let inst_mtu = spec.instance_mtu();

        let fabric = NetNs::new("fabric")?;
        run(
            &fabric,
            &format!("ip link add {FABRIC_BRIDGE} mtu {ul_mtu} type bridge"),
        )?;
        fabric.link_up(FABRIC_BRIDGE)?;

        let mut hosts = Vec::with_capacity(spec.hosts);
        for i in 0..spec.hosts {
            let host = NetNs::new(&format!("host{i}"))?;
            // Before any interface exists, so that they all inherit it.
            for key in [
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
            ] {
                host.sysctl(key, "0")?;
            }
            let fabric_if = format!("u{i}");
            veth(&host, UNDERLAY_IF, &fabric, &fabric_if, ul_mtu, None)?;
            run(
                &fabric,
                &format!("ip link set dev {fabric_if} master {FABRIC_BRIDGE}"),
            )?;
            let ul_ip = underlay_ip(i);
            host.add_addr(UNDERLAY_IF, &format!("{ul_ip}/{UNDERLAY_PREFIX_LEN}"))?;
            hosts.push(host);
        }

        let mut instances = BTreeMap::new();
        for inst in &spec.instances {
            let port = ports[&inst.name].clone();
            let subnet = spec.subnet(&inst.subnet).context("validated subnet")?;
            let ns = NetNs::new(&inst.name)?;
            veth(
                &hosts[inst.host],
                &port.ifname,
                &ns,
                INSTANCE_IF,
                inst_mtu,
                Some(port.mac),
            )?;
            let (ip, len, gw) = (inst.ip, subnet.cidr.prefix(), subnet.cidr.gateway());
            ns.add_addr(INSTANCE_IF, &format!("{ip}/{len}"))?;
            run(
                &ns,
                &format!("ip route add default via {gw} dev {INSTANCE_IF}"),
            )?;
            instances.insert(
                inst.name.clone(),
                Instance {
                    ns,
                    port,
                    ip: inst.ip,
                },
            );
        }

        let mut topo = Self {
            agents: Vec::new(),
            state: None,
            instances,
            hosts,
            fabric,
            spec,
            mode: mode.clone(),
        };
        match mode {
            Mode::KernelVxlan => {
                for i in 0..topo.hosts.len() {
                    topo.setup_kernel_vxlan(i)
                        .with_context(|| format!("kernel VXLAN set-up of host {i}"))?;
                }
            }
            Mode::Ebpf { .. } => {
                ensure_bpffs()?;
                let state = StateFile::create();
                let json = serde_json::to_string_pretty(&desired_state_with(&topo.spec, &ports)?)?;
                state.write(&json)?;
                topo.state = Some(state);
                for i in 0..topo.hosts.len() {
                    let pins = BpffsDir::new(&format!("h{i}pins"))?;
                    topo.agents.push(HostAgent { agent: None, pins });
                    topo.start_agent(i)?;
                }
            }
        }
        Ok(topo)
    }

    /// The spec the topology was built from.
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// The mode it was built in.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The fabric namespace (holding the underlay bridge).
    pub fn fabric(&self) -> &NetNs {
        &self.fabric
    }

    /// The namespace of host `i`.
    ///
    /// # Panics
    ///
    /// If there is no host `i`.
    pub fn host(&self, i: usize) -> &NetNs {
        &self.hosts[i]
    }

    /// All host namespaces, by index.
    pub fn hosts(&self) -> &[NetNs] {
        &self.hosts
    }

    fn inst(&self, name: &str) -> &Instance {
        self.instances
            .get(name)
            .unwrap_or_else(|| panic!("topology has no instance {name:?}"))
    }

    /// The namespace of an instance.
    ///
    /// # Panics
    ///
    /// If there is no instance of that name.
    pub fn instance(&self, name: &str) -> &NetNs {
        &self.inst(name).ns
    }

    /// The address of an instance.
    ///
    /// # Panics
    ///
    /// If there is no instance of that name.
    pub fn instance_ip(&self, name: &str) -> Ipv4Addr {
        self.inst(name).ip
    }

    /// How an instance is plugged in (host, host-side veth, MAC).
    ///
    /// # Panics
    ///
    /// If there is no instance of that name.
    pub fn port(&self, name: &str) -> &Port {
        &self.inst(name).port
    }

    /// Names of all instances (sorted).
    pub fn instance_names(&self) -> impl Iterator<Item = &str> {
        self.instances.keys().map(String::as_str)
    }

    /// The state file of [`Mode::Ebpf`].
    pub fn state_path(&self) -> Option<&Path> {
        self.state.as_ref().map(|s| s.path.as_path())
    }

    /// The desired state for `spec` with this topology's ports. `spec` may differ from the one
    /// built (instances removed, moved to other subnets, VPCs renumbered...), but every
    /// instance in it must exist in the topology, on the same host.
    pub fn desired_state(&self, spec: &TopologySpec) -> Result<DesiredState> {
        let ports = self
            .instances
            .iter()
            .map(|(name, i)| (name.clone(), i.port.clone()))
            .collect();
        desired_state_with(spec, &ports)
    }

    /// Rewrites the state file ([`Mode::Ebpf`] only) for `spec` (see
    /// [`Topology::desired_state`]), atomically. Only what the agents are told changes: the
    /// namespaces, addresses and links stay as built.
    pub fn rewrite_state(&self, spec: &TopologySpec) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.desired_state(spec)?)?;
        self.rewrite_state_raw(&json)
    }

    /// Replaces the state file's contents with `contents` verbatim (e.g. to test how the agents
    /// handle an invalid state), atomically.
    pub fn rewrite_state_raw(&self, contents: &str) -> Result<()> {
        self.state
            .as_ref()
            .context("no state file: the topology is not in eBPF mode")?
            .write(contents)
    }

    /// The agent arguments for host `i` (besides `--pin-dir`, `--stats-interval` and
    /// `--iface`, which [`Agent::start_with`] adds).
    pub fn agent_args(&self, i: usize) -> Result<Vec<String>> {
        let Mode::Ebpf { xdp_mode } = &self.mode else {
            bail!("no agents: the topology is not in eBPF mode");
        };
        let state = self.state_path().context("no state file")?;
        Ok(vec![
            "--host".into(),
            host_id(i),
            "--state".into(),
            state
                .to_str()
                .context("state file path is not UTF-8")?
                .to_owned(),
            "--xdp-mode".into(),
            xdp_mode.clone(),
        ])
    }

    fn host_agent(&self, i: usize) -> Result<&HostAgent> {
        self.agents
            .get(i)
            .with_context(|| format!("no agent slot for host {i} (not eBPF mode, or no host)"))
    }

    /// The running agent of host `i`, if any ([`Mode::Ebpf`]).
    pub fn agent(&self, i: usize) -> Option<&Agent> {
        self.agents.get(i)?.agent.as_ref()
    }

    /// Takes the agent of host `i` out of the topology, e.g. to [`Agent::crash`] or
    /// [`Agent::stop`] it; [`Topology::start_agent`] starts a new one.
    pub fn take_agent(&mut self, i: usize) -> Option<Agent> {
        self.agents.get_mut(i)?.agent.take()
    }

    /// The bpffs pin directory of host `i`'s agent ([`Mode::Ebpf`]); it stays when the agent is
    /// taken or crashes, so a restarted agent finds its pins.
    pub fn pin_dir(&self, i: usize) -> Option<&Path> {
        Some(self.agents.get(i)?.pins.path())
    }

    /// Starts the agent of host `i` with the topology's arguments (and the same pin directory)
    /// and waits until it is ready. Fails if one is already running there.
    pub fn start_agent(&mut self, i: usize) -> Result<&Agent> {
        ensure!(
            self.host_agent(i)?.agent.is_none(),
            "host {i} already runs an agent"
        );
        let args = self.agent_args(i)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_with(
            &self.hosts[i],
            self.host_agent(i)?.pins.path(),
            &[UNDERLAY_IF],
            &args,
        )
        .with_context(|| format!("starting the agent of host {i} ({})", host_id(i)))?;
        Ok(self.agents[i].agent.insert(agent))
    }

    /// Configures host `i` for [`Mode::KernelVxlan`].
    fn setup_kernel_vxlan(&self, i: usize) -> Result<()> {
        let spec = &self.spec;
        let host = &self.hosts[i];
        host.sysctl("net.ipv4.ip_forward", "1")?;
        // The bridge is both the ingress and the egress interface of routed packets: without
        // this, the host would tell instances to bypass it with ICMP redirects.
        for key in [
            "net.ipv4.conf.all.send_redirects",
            "net.ipv4.conf.default.send_redirects",
        ] {
            host.sysctl(key, "0")?;
        }
        let host_no = u8::try_from(i).context("host index")?;
        let local_ip = underlay_ip(i);
        let mut zone_rules = String::new();
        let mut gateways = BTreeSet::new();
        for (vpc_idx, vpc) in spec.vpcs.iter().enumerate() {
            let members: Vec<&Instance> = spec
                .instances_in_vpc(&vpc.id)
                .into_iter()
                .map(|m| self.inst(m))
                .collect();
            if !members.iter().any(|m| m.port.host == i) {
                continue;
            }
            let vpc_no = u8::try_from(vpc_idx + 1).context("VPC number")?;
            let vni = vpc.vni;
            let br = format!("br-{vni}");
            let vx = format!("vx{vni}");
            let table = VPC_TABLE_BASE + vni;
            let gw_mac = format_mac(gateway_mac(vpc_no, host_no));
            run(
                host,
                &format!("ip link add {br} address {gw_mac} type bridge"),
            )?;
            run(
                host,
                &format!(
                    "ip link add {vx} type vxlan id {vni} local {local_ip} dstport {VXLAN_PORT} \
                     nolearning dev {UNDERLAY_IF}"
                ),
            )?;
            run(host, &format!("ip link set dev {vx} master {br} up"))?;
            let remote_hosts: BTreeSet<usize> = members
                .iter()
                .map(|m| m.port.host)
                .filter(|&h| h != i)
                .collect();
            for h in remote_hosts {
                let dst = underlay_ip(h);
                run(
                    host,
                    &format!("bridge fdb append 00:00:00:00:00:00 dev {vx} dst {dst}"),
                )?;
            }
            for m in &members {
                let mac = format_mac(m.port.mac);
                if m.port.host == i {
                    let port = &m.port.ifname;
                    run(host, &format!("ip link set dev {port} master {br}"))?;
                    // Static, so that frames to an instance that has not sent anything yet are
                    // not flooded to the other hosts.
                    run(
                        host,
                        &format!("bridge fdb replace {mac} dev {port} master static"),
                    )?;
                } else {
                    let dst = underlay_ip(m.port.host);
                    run(host, &format!("bridge fdb add {mac} dev {vx} dst {dst}"))?;
                }
                run(
                    host,
                    &format!(
                        "ip neigh replace {} lladdr {mac} dev {br} nud permanent",
                        m.ip
                    ),
                )?;
            }
            run(host, &format!("ip link set dev {br} up"))?;
            for subnet in spec.subnets.iter().filter(|s| s.vpc == vpc.id) {
                let (gw, net, len) = (subnet.cidr.gateway(), subnet.cidr, subnet.cidr.prefix());
                gateways.insert(gw);
                run(
                    host,
                    &format!("ip addr add {gw}/{len} dev {br} noprefixroute"),
                )?;
                run(
                    host,
                    &format!("ip route add {net} dev {br} src {gw} table {table}"),
                )?;
            }
            run(
                host,
                &format!("ip route add unreachable default table {table}"),
            )?;
            run(
                host,
                &format!("ip rule add iif {br} lookup {table} pref {VPC_RULE_PREF}"),
            )?;
            // Bridged and routed packets alike enter the inet hooks with the bridge as input
            // interface (br_netfilter reports the bridge, not the port). Zones are 16 bits; VPC
            // numbers are below 256.
            zone_rules.push_str(&format!("        iifname \"{br}\" ct zone set {vpc_no}\n"));
        }
        let mut ruleset = format!(
            "table inet vpc {{
    chain zone {{
        type filter hook prerouting priority raw; policy accept;
{zone_rules}    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state new accept
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state new accept
    }}
}}
"
        );
        if !gateways.is_empty() {
            let gws = gateways
                .iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            ruleset.push_str(&format!(
                "table bridge vpc {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname \"vx*\" arp daddr ip {{ {gws} }} drop
    }}
}}
"
            ));
        }
        nft(host, &ruleset)
    }
}

/// Runs a command line in `ns`, split at whitespace (none of the arguments used here contain
/// any); fails with its output if it fails.
fn run(ns: &NetNs, cmdline: &str) -> Result<()> {
    let mut words = cmdline.split_whitespace();
    let program = words.next().context("empty command line")?;
    ns.exec(program, words).map(drop)
}

/// Loads an nftables ruleset into `ns` (`nft -f -`).
fn nft(ns: &NetNs, ruleset: &str) -> Result<()> {
    let mut cmd = ns.command("nft");
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running nft in {}", ns.name()))?;
    // A few hundred bytes: fits in the pipe, nft reads it all before writing anything.
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())
        .context("writing the ruleset to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft -f - in {} failed ({}): {}\nruleset:\n{ruleset}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// Creates a veth pair `a_if` (in `a`) <-> `b_if` (in `b`) with MTU `mtu` on both ends and, if
/// given, MAC `b_mac` on `b_if`; sets both up and turns GRO on on both (best effort: a veth
/// only accepts XDP_REDIRECTed frames when its peer runs NAPI, which GRO enables without an XDP
/// program of its own).
fn veth(
    a: &NetNs,
    a_if: &str,
    b: &NetNs,
    b_if: &str,
    mtu: u32,
    b_mac: Option<[u8; 6]>,
) -> Result<()> {
    let address = b_mac
        .map(|m| format!("address {}", format_mac(m)))
        .unwrap_or_default();
    // Run inside `a`, so that `a_if` is created there and only `b_if` needs a namespace.
    run(
        a,
        &format!(
            "ip link add {a_if} mtu {mtu} type veth peer name {b_if} netns {} mtu {mtu} {address}",
            b.name()
        ),
    )?;
    a.link_up(a_if)?;
    b.link_up(b_if)?;
    for (ns, ifname) in [(a, a_if), (b, b_if)] {
        // Best effort: without GRO only XDP redirects into the veth fail; everything else works.
        let _ = ns.exec_unchecked("ethtool", ["-K", ifname, "gro", "on"]);
    }
    Ok(())
}

/// Two instance-like namespaces joined directly by one veth pair: the upper bound of any
/// overlay between two instances (no host, no encapsulation). Both ends are [`INSTANCE_IF`],
/// with the instances' MTU (underlay MTU - [`VXLAN_OVERHEAD`]) and GRO on, addresses
/// [`PlainVeth::A_IP`] and [`PlainVeth::B_IP`] in 10.0.1.0/24.
#[derive(Debug)]
pub struct PlainVeth {
    a: NetNs,
    b: NetNs,
}

impl PlainVeth {
    /// Address of `a`.
    pub const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    /// Address of `b`.
    pub const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);

    /// Builds the pair for an underlay of MTU `underlay_mtu`.
    pub fn new(underlay_mtu: u32) -> Result<Self> {
        ensure!(
            underlay_mtu >= 576 + VXLAN_OVERHEAD,
            "underlay MTU {underlay_mtu} too small"
        );
        let a = NetNs::new("plaina")?;
        let b = NetNs::new("plainb")?;
        veth(
            &a,
            INSTANCE_IF,
            &b,
            INSTANCE_IF,
            underlay_mtu - VXLAN_OVERHEAD,
            None,
        )?;
        a.add_addr(INSTANCE_IF, &format!("{}/24", Self::A_IP))?;
        b.add_addr(INSTANCE_IF, &format!("{}/24", Self::B_IP))?;
        Ok(Self { a, b })
    }

    /// The namespace with [`PlainVeth::A_IP`].
    pub fn a(&self) -> &NetNs {
        &self.a
    }

    /// The namespace with [`PlainVeth::B_IP`].
    pub fn b(&self) -> &NetNs {
        &self.b
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;
    use crate::netns::ping;

    #[test]
    fn cidr_parsing_and_arithmetic() {
        let c: Cidr = "10.0.1.0/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.1.0/24");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 0, 1, 255));
        assert!(c.contains(Ipv4Addr::new(10, 0, 1, 77)));
        assert!(!c.contains(Ipv4Addr::new(10, 0, 2, 1)));
        assert!(cidr("10.0.0.0/16").covers(&c));
        assert!(!c.covers(&cidr("10.0.0.0/16")));
        assert!(c.overlaps(&cidr("10.0.0.0/16")));
        assert!(!c.overlaps(&cidr("10.0.2.0/24")));
        assert!("10.0.1.1/24".parse::<Cidr>().is_err());
        assert!("10.0.1.0/33".parse::<Cidr>().is_err());
        assert_eq!(cidr("0.0.0.0/0").broadcast(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn standard_spec_and_state_format() {
        let spec = two_vpcs_same_cidr(3);
        spec.validate().unwrap();
        assert_eq!(spec.instances.len(), 12);
        assert_eq!(
            spec.instance("b-h2-s2").unwrap().ip,
            Ipv4Addr::new(10, 0, 2, 30)
        );
        assert_eq!(spec.vpc_of("b-h2-s2").unwrap().vni, 200);

        let state = serde_json::to_value(desired_state(&two_vpcs_same_cidr(2)).unwrap()).unwrap();
        assert_eq!(
            state["vpcs"][0],
            serde_json::json!({"id": "vpc-a", "vni": 100, "cidr": "10.0.0.0/16"})
        );
        assert_eq!(
            state["subnets"][0],
            serde_json::json!({"id": "subnet-a1", "vpc": "vpc-a", "cidr": "10.0.1.0/24"})
        );
        assert_eq!(
            state["hosts"],
            serde_json::json!([{"id": "h0", "vtep": "192.168.77.1"},
                               {"id": "h1", "vtep": "192.168.77.2"}])
        );
        assert_eq!(
            state["endpoints"][0],
            serde_json::json!({"id": "a-h0-s1", "subnet": "subnet-a1", "host": "h0",
                               "ip": "10.0.1.10", "mac": "02:00:00:01:00:01", "ifname": "p0"})
        );
        let eps = state["endpoints"].as_array().unwrap();
        let b_h1_s2 = eps.iter().find(|e| e["id"] == "b-h1-s2").unwrap();
        assert_eq!(b_h1_s2["mac"], "02:00:00:02:01:02");
        assert_eq!(b_h1_s2["ifname"], "p3");
        let macs: BTreeSet<_> = eps.iter().map(|e| e["mac"].as_str().unwrap()).collect();
        assert_eq!(macs.len(), eps.len());

        let mut bad = two_vpcs_same_cidr(2);
        bad.instances[0].ip = Ipv4Addr::new(10, 0, 1, 1);
        assert!(bad.validate().is_err());
        let mut bad = two_vpcs_same_cidr(2);
        bad.instances[1].ip = bad.instances[0].ip;
        bad.instances[1].subnet = bad.instances[0].subnet.clone();
        assert!(bad.validate().is_err());
    }

    /// Connects from `from` to `to`'s address on a listener that exists only in `to`, and
    /// exchanges `bulk` bytes each way: the connection can only succeed if packets for that
    /// address reach that very namespace (the same address in the other VPC has no listener).
    fn tcp_check(topo: &Topology, from: &str, to: &str, bulk: usize) -> Result<()> {
        let ip = topo.instance_ip(to);
        let listener = topo
            .instance(to)
            .run(|| TcpListener::bind((ip, 0)))
            .context("bind")?;
        let addr: SocketAddr = listener.local_addr()?;
        let mut client = topo
            .instance(from)
            .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .with_context(|| format!("connect {from} -> {to} ({addr})"))?;
        let (mut server, _) = listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
        }
        let payload: Vec<u8> = (0..bulk).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut c = client.try_clone()?;
            let p = payload.clone();
            std::thread::spawn(move || c.write_all(&p))
        };
        let mut got = vec![0; bulk];
        server.read_exact(&mut got)?;
        writer.join().expect("writer thread")?;
        ensure!(got == payload, "{from} -> {to}: payload corrupted");
        server.write_all(to.as_bytes())?;
        let mut name = vec![0; to.len()];
        client.read_exact(&mut name)?;
        ensure!(name == to.as_bytes());
        Ok(())
    }

    #[test]
    fn kernel_vxlan_connects_each_vpc_and_isolates_them() {
        let mut spec = two_vpcs_same_cidr(3);
        // An address that exists only in vpc-b.
        spec.instances.push(InstanceDef {
            name: "b-only".into(),
            subnet: "subnet-b1".into(),
            host: 1,
            ip: Ipv4Addr::new(10, 0, 1, 99),
        });
        let topo = Topology::build(spec.clone(), Mode::KernelVxlan).unwrap();
        for vpc in &spec.vpcs {
            let members = spec.instances_in_vpc(&vpc.id);
            for from in &members {
                for to in &members {
                    if from == to {
                        continue;
                    }
                    let dst = topo.instance_ip(to).to_string();
                    assert_eq!(
                        ping(topo.instance(from), &dst, 1).unwrap(),
                        1,
                        "ping {from} -> {to} ({dst})"
                    );
                    tcp_check(&topo, from, to, 4096).unwrap();
                }
            }
        }
        // Bulk both ways across hosts and subnets: full-size (MTU) segments pass the tunnel.
        tcp_check(&topo, "a-h0-s1", "a-h2-s2", 1 << 20).unwrap();
        tcp_check(&topo, "b-h2-s2", "b-h0-s1", 1 << 20).unwrap();
        let mtu_ping = topo.instance("a-h0-s1").exec_unchecked(
            "ping",
            [
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                "1422",
                "10.0.2.20",
            ],
        );
        assert!(mtu_ping.unwrap().status.success(), "1450-byte ping failed");

        // Isolation: vpc-a reaches neither vpc-b's address nor the underlay.
        assert_eq!(ping(topo.instance("a-h0-s1"), "10.0.1.99", 2).unwrap(), 0);
        assert_eq!(ping(topo.instance("b-h0-s1"), "10.0.1.99", 1).unwrap(), 1);
        assert_eq!(ping(topo.instance("a-h1-s1"), "10.0.1.99", 2).unwrap(), 0);
        assert_eq!(
            ping(topo.instance("a-h0-s1"), "192.168.77.2", 2).unwrap(),
            0
        );
        // Each instance resolved its own host's gateway.
        for name in topo.instance_names() {
            let port = topo.port(name);
            let neigh = topo
                .instance(name)
                .ip(&["neigh", "show", "dev", INSTANCE_IF])
                .unwrap();
            let vpc_no = port.mac[3];
            let own_gw = format_mac(gateway_mac(vpc_no, u8::try_from(port.host).unwrap()));
            let subnet = &topo.spec().instance(name).unwrap().subnet;
            let gw = format!("{} ", topo.spec().subnet(subnet).unwrap().cidr.gateway());
            let line = neigh.lines().find(|l| l.starts_with(&gw));
            let line = line.unwrap_or_else(|| panic!("{name} has no gateway entry: {neigh}"));
            assert!(
                line.contains(&own_gw),
                "{name}: {line} (own gateway {own_gw})"
            );
        }
    }

    #[test]
    fn plain_veth_connects() {
        let p = PlainVeth::new(DEFAULT_UNDERLAY_MTU).unwrap();
        assert_eq!(ping(p.a(), &PlainVeth::B_IP.to_string(), 1).unwrap(), 1);
        assert!(
            p.b()
                .ip(&["link", "show", INSTANCE_IF])
                .unwrap()
                .contains("mtu 1450")
        );
    }

    #[test]
    fn state_file_rewrites_keep_ports_and_are_removed() {
        let full = two_vpcs_same_cidr(2);
        let ports = assign_ports(&full).unwrap();
        let file = StateFile::create();
        let path = file.path.clone();
        let write = |spec: &TopologySpec| {
            let state = desired_state_with(spec, &ports)?;
            file.write(&serde_json::to_string_pretty(&state)?)
        };
        let read = || -> DesiredState {
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap()
        };
        write(&full).unwrap();
        assert_eq!(read(), desired_state(&full).unwrap());

        // Ports keep their names and MACs when other instances go.
        let mut spec = full.clone();
        spec.instances.retain(|i| i.name != "a-h0-s1");
        write(&spec).unwrap();
        let state = read();
        assert_eq!(state.endpoints.len(), 7);
        let ep = state.endpoints.iter().find(|e| e.id == "a-h0-s2").unwrap();
        assert_eq!(
            (ep.ifname.as_deref(), ep.mac.as_str()),
            (Some("p1"), "02:00:00:01:00:02")
        );

        // Instances the topology does not have, or moved to another host, are refused.
        let mut spec = full.clone();
        spec.instances[0].name = "new".into();
        assert!(write(&spec).is_err());
        let mut spec = full;
        spec.instances[0].host = 1;
        assert!(write(&spec).is_err());
        assert_eq!(
            read().endpoints.len(),
            7,
            "a refused rewrite left the file alone"
        );

        drop(file);
        assert!(!path.exists());
    }
}
