//! A one-host overlay fixture for BPF_PROG_TEST_RUN tests and benchmarks: the datapath
//! loaded in a private namespace with a fake underlay (`ul0`, a static neighbor for the peer
//! VTEP so the FIB lookup resolves) and instance ports, its maps programmed the way the agent
//! does it (`controlplane::host::HostReconciler`: compile the overlay and the policy, install
//! rule sets, diff against the kernel maps, apply). Without security groups every endpoint is
//! in its VPC's default group (inbound from the group's members, outbound anywhere).
//!
//! Host h0 has ports `p0` (10.0.1.10) and `p1` (10.0.2.20) of VPC A (VNI 100); h1 runs
//! 10.0.1.30 of VPC A; VPC B (VNI 200, same CIDR) has 10.0.1.30 on h0 behind `p2`.

use std::net::Ipv4Addr;

use controlplane::{
    host::{HostDesired, HostReconciler, LbInput, Report},
    lb::{LbPlan, compile::TargetStatus},
    overlay::statefile::PolicyRefs,
    overlay::{EndpointSpec, HostSpec, OverlayState, SubnetSpec, VpcSpec, compile, diff},
    policy::{
        NetworkAcl, PolicyLimits, SecurityGroup,
        compile::{EndpointRef, SubnetRef},
    },
};
use dataplane_common::{conntrack::CtConfig, overlay::OverlayConfig};

use crate::{
    netns::{NetNs, veth_pair},
    testrun::LoadedDatapath,
};

/// The VPC router MAC.
pub const ROUTER: [u8; 6] = [0x02, 0x76, 0x70, 0x63, 0, 1];
/// MAC of the instance on `p0`.
pub const ME_MAC: [u8; 6] = [2, 0, 0, 1, 0, 1];
/// MAC of the instance on `p1`.
pub const PEER_MAC: [u8; 6] = [2, 0, 0, 1, 0, 2];
/// MAC of the remote instance.
pub const REMOTE_MAC: [u8; 6] = [2, 0, 0, 1, 1, 1];
/// MAC of the underlay next hop (the peer VTEP).
pub const NEXT_HOP_MAC: [u8; 6] = [2, 0xee, 0, 0, 0, 2];
/// This host's VTEP.
pub const VTEP_ME: [u8; 4] = [192, 168, 77, 1];
/// The peer host's VTEP.
pub const VTEP_PEER: [u8; 4] = [192, 168, 77, 2];

/// The loaded, programmed datapath and its namespace.
#[derive(Debug)]
pub struct Fixture {
    /// Namespace holding the underlay and ports; run the programs inside it.
    pub ns: NetNs,
    // Holds the veth peers: destroying a namespace destroys its veths and their peers.
    _other: NetNs,
    /// The datapath.
    pub dp: LoadedDatapath,
    /// Ifindex of `p0`.
    pub me: u32,
    /// Ifindex of `p1`.
    pub peer: u32,
    /// MAC of `ul0`.
    pub ul_mac: [u8; 6],
    /// The overlay as programmed.
    pub state: OverlayState,
    /// The maps, programmed like the agent does.
    pub host: HostReconciler,
    /// Load balancers programmed by [`Fixture::apply_policy`] (none by default).
    pub lb_plan: LbPlan,
    /// Their targets' states.
    pub lb_targets: Vec<TargetStatus>,
}

/// `p0`'s instance (`me`, subnet a1).
pub const ME_IP: [u8; 4] = [10, 0, 1, 10];
/// `p1`'s instance (`peer`, subnet a2).
pub const PEER_IP: [u8; 4] = [10, 0, 2, 20];
/// The instance of VPC A on host h1 (`remote`, subnet a1).
pub const REMOTE_IP: [u8; 4] = [10, 0, 1, 30];

/// The policy the flow-log and trace tests share: `sg-web` (peer) admits tcp/80 from the
/// VPC; `sg-client` (me, remote) has no inbound rule and allows all outbound. Subnet a2's
/// ACL: inbound 90 denies tcp/81 from 10.0.1.0/24, 100 allows all; outbound 100 allows all.
///
/// # Panics
///
/// Never: the JSON is fixed and valid.
pub fn web_client_policy() -> PolicySpec {
    let group = |v: serde_json::Value| -> SecurityGroup {
        serde_json::from_value(v).expect("valid security group")
    };
    PolicySpec {
        security_groups: vec![
            group(
                serde_json::json!({"id": "sg-web", "vpc": "vpc-a", "inbound": [
                {"protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/16"}]}),
            ),
            group(serde_json::json!({"id": "sg-client", "vpc": "vpc-a"})),
        ],
        memberships: vec![
            ("peer".into(), vec!["sg-web".into()]),
            ("me".into(), vec!["sg-client".into()]),
            ("remote".into(), vec!["sg-client".into()]),
        ],
        network_acls: vec![
            serde_json::from_value(serde_json::json!({"id": "acl-a2", "vpc": "vpc-a",
                "inbound": [
                    {"rule": 90, "protocol": "tcp", "from_port": 81, "to_port": 81,
                     "cidr": "10.0.1.0/24", "action": "deny"},
                    {"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"}],
                "outbound": [
                    {"rule": 100, "protocol": "all", "cidr": "0.0.0.0/0", "action": "allow"}]}))
            .expect("valid network ACL"),
        ],
        subnet_acls: vec![("a2".into(), "acl-a2".into())],
        ..PolicySpec::default()
    }
}

/// A TCP frame `src` -> `dst` as the sender's port sees it (`me`'s MAC from [`ME_IP`], else
/// `peer`'s).
pub fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    use dataplane_common::testpkt::{tcp, v4, with_macs};
    let mac = if src == ME_IP { ME_MAC } else { PEER_MAC };
    with_macs(&tcp(v4(src, dst), sport, dport, flags, &[]), ROUTER, mac)
}

/// Security groups and ACLs for [`Fixture::apply_policy`].
#[derive(Clone, Debug, Default)]
pub struct PolicySpec {
    /// Groups.
    pub security_groups: Vec<SecurityGroup>,
    /// ACLs.
    pub network_acls: Vec<NetworkAcl>,
    /// (endpoint id, its groups); unlisted endpoints are in the default group.
    pub memberships: Vec<(String, Vec<String>)>,
    /// (subnet id, its ACL).
    pub subnet_acls: Vec<(String, String)>,
    /// Quotas.
    pub limits: PolicyLimits,
    /// Conntrack timeouts.
    pub conntrack: CtConfig,
}

/// The value paired with `id`.
fn lookup<V: Clone>(pairs: &[(String, V)], id: &str) -> Option<V> {
    pairs.iter().find(|(k, _)| k == id).map(|(_, v)| v.clone())
}

impl PolicySpec {
    /// The compiler's view of `state` under this spec: memberships and subnet ACLs applied,
    /// endpoints of host `h0` local (what [`Fixture::apply_policy`] compiles).
    ///
    /// # Panics
    ///
    /// If an endpoint names a subnet `state` does not have.
    pub fn refs(&self, state: &OverlayState) -> PolicyRefs {
        let vpc_of = |subnet: &str| {
            state
                .subnets
                .iter()
                .find(|s| s.id == subnet)
                .map(|s| s.vpc.clone())
                .expect("endpoint subnet exists")
        };
        PolicyRefs {
            vpcs: state.vpcs.iter().map(|v| v.id.clone()).collect(),
            subnets: state
                .subnets
                .iter()
                .map(|s| SubnetRef {
                    id: s.id.clone(),
                    vpc: s.vpc.clone(),
                    cidr: s.cidr,
                    network_acl: lookup(&self.subnet_acls, &s.id),
                })
                .collect(),
            endpoints: state
                .endpoints
                .iter()
                .map(|e| EndpointRef {
                    id: e.id.clone(),
                    vpc: vpc_of(&e.subnet),
                    subnet: e.subnet.clone(),
                    ip: e.ip,
                    security_groups: lookup(&self.memberships, &e.id).unwrap_or_default(),
                    local: e.host == "h0",
                })
                .collect(),
        }
    }
}

impl Fixture {
    /// Sets the endpoint of port `ifindex`'s flow-log flags to `flags` (a subset of
    /// `EP_LOG_ANY`; 0 turns logging off), keeping its other flags: what the agent's overlay
    /// compile does for an endpoint in a logged VPC or subnet.
    ///
    /// # Panics
    ///
    /// If the port has no endpoint or the map write fails.
    pub fn set_flow_log_flags(&mut self, ifindex: u32, flags: u32) {
        use dataplane_common::flowlog::EP_LOG_ANY;
        let overlay = self.dp.overlay();
        let mut e = overlay.read().expect("overlay maps").endpoints[&ifindex];
        e.flags = (e.flags & !EP_LOG_ANY) | flags;
        overlay
            .apply(&[controlplane::overlay::MapOp::PutEndpoint(ifindex, e)])
            .expect("endpoint written");
    }

    /// Programs `policy` (and the overlay again) the way the agent does; returns the report.
    ///
    /// # Panics
    ///
    /// If the policy is invalid or programming fails.
    pub fn apply_policy(&mut self, policy: &PolicySpec) -> Report {
        let refs = policy.refs(&self.state);
        let desired = HostDesired {
            overlay: &self.state,
            policy: refs.input(
                &policy.security_groups,
                &policy.network_acls,
                &policy.limits,
            ),
            conntrack: policy.conntrack,
            lb: LbInput {
                plan: &self.lb_plan,
                targets: &self.lb_targets,
            },
        };
        self.host
            .reconcile(&desired, "h0", ROUTER, false)
            .expect("programming the policy")
    }
}

/// Builds the fixture (namespace names derive from `tag`).
///
/// # Panics
///
/// On any setup failure (tests and benchmarks want to stop there).
pub fn fixture(tag: &str) -> Fixture {
    fixture_with(tag, None)
}

/// As [`fixture`], with a conntrack table of `conntrack_max` entries.
///
/// # Panics
///
/// On any setup failure.
pub fn fixture_with(tag: &str, conntrack_max: Option<u32>) -> Fixture {
    let ns = NetNs::new(tag).unwrap();
    let other = NetNs::new(&format!("{tag}x")).unwrap();
    for p in ["ul0", "p0", "p1", "p2"] {
        veth_pair(&ns, p, &other, p).unwrap();
        ns.link_up(p).unwrap();
        other.link_up(p).unwrap();
    }
    ns.add_addr("ul0", "192.168.77.1/24").unwrap();
    // The agent does this: the FIB helper requires forwarding on the output interface.
    ns.sysctl("net.ipv4.conf.ul0.forwarding", "1").unwrap();
    ns.link_up("ul0").unwrap();
    ns.ip(&[
        "neigh",
        "replace",
        "192.168.77.2",
        "lladdr",
        "02:ee:00:00:00:02",
        "dev",
        "ul0",
    ])
    .unwrap();
    let ifindex = |n| ns.ifindex(n).unwrap();
    let (me, peer, b) = (ifindex("p0"), ifindex("p1"), ifindex("p2"));
    let ul_mac = ns.mac("ul0").unwrap();

    let ep = |id: &str, subnet: &str, host: &str, ip: [u8; 4], mac, ifindex| EndpointSpec {
        id: id.into(),
        subnet: subnet.into(),
        host: host.into(),
        ip: Ipv4Addr::from(ip),
        mac,
        ifindex,
    };
    let state = OverlayState {
        vpcs: vec![
            VpcSpec {
                id: "vpc-a".into(),
                vni: 100,
                cidr: "10.0.0.0/16".parse().unwrap(),
            },
            VpcSpec {
                id: "vpc-b".into(),
                vni: 200,
                cidr: "10.0.0.0/16".parse().unwrap(),
            },
        ],
        subnets: vec![
            SubnetSpec {
                id: "a1".into(),
                vpc: "vpc-a".into(),
                cidr: "10.0.1.0/24".parse().unwrap(),
            },
            SubnetSpec {
                id: "a2".into(),
                vpc: "vpc-a".into(),
                cidr: "10.0.2.0/24".parse().unwrap(),
            },
            SubnetSpec {
                id: "b1".into(),
                vpc: "vpc-b".into(),
                cidr: "10.0.1.0/24".parse().unwrap(),
            },
        ],
        hosts: vec![
            HostSpec {
                id: "h0".into(),
                vtep: Ipv4Addr::from(VTEP_ME),
            },
            HostSpec {
                id: "h1".into(),
                vtep: Ipv4Addr::from(VTEP_PEER),
            },
        ],
        endpoints: vec![
            ep("me", "a1", "h0", [10, 0, 1, 10], ME_MAC, Some(me)),
            ep("peer", "a2", "h0", [10, 0, 2, 20], PEER_MAC, Some(peer)),
            ep("remote", "a1", "h1", [10, 0, 1, 30], REMOTE_MAC, None),
            ep("b", "b1", "h0", [10, 0, 1, 30], [2, 0, 0, 2, 0, 1], Some(b)),
        ],
        flow_log_flags: Default::default(),
    };
    let ul0 = ifindex("ul0");
    let dp = LoadedDatapath::load_with(tag, conntrack_max).unwrap();
    let host = HostReconciler::open(dp.layout()).unwrap();
    let mut f = Fixture {
        ns,
        _other: other,
        dp,
        me,
        peer,
        ul_mac,
        state,
        host,
        lb_plan: LbPlan::default(),
        lb_targets: Vec::new(),
    };
    f.host
        .overlay_mut()
        .set_config(&OverlayConfig {
            vtep: VTEP_ME,
            underlay_ifindex: ul0,
            underlay_mtu: 1500,
        })
        .unwrap();
    let first = f.apply_policy(&PolicySpec::default());
    assert!(
        first.overlay_ops > 0 && first.rule_sets_written > 0,
        "{first:?}"
    );
    // Level-triggered: a second pass finds everything in place and writes nothing.
    let again = f.apply_policy(&PolicySpec::default());
    assert_eq!(again.changes(), 0, "{again:?}");
    let mut overlay_only = compile(&f.state, "h0", ROUTER).unwrap();
    // The overlay compiler leaves policy ids to the policy layer: copy them from the kernel.
    let actual = f.host.overlay_mut().read().unwrap();
    for (i, e) in overlay_only.endpoints.iter_mut() {
        let k = actual.endpoints[i];
        (e.policy, e.acl, e.flags) = (k.policy, k.acl, k.flags);
    }
    assert_eq!(diff(&actual, &overlay_only), vec![]);
    f
}
