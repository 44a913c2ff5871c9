use std::net::Ipv4Addr;

use dataplane_common::{
    filter::ipv4_mapped,
    overlay::{NeighborKind, RouteKind, RoutePrefix},
};

use super::{compile::NeighborEntry, *};

const ROUTER: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 1];

fn vpc(id: &str, vni: u32, cidr: &str) -> VpcSpec {
    VpcSpec {
        id: id.into(),
        vni,
        cidr: cidr.parse().unwrap(),
    }
}

fn subnet(id: &str, vpc: &str, cidr: &str) -> SubnetSpec {
    SubnetSpec {
        id: id.into(),
        vpc: vpc.into(),
        cidr: cidr.parse().unwrap(),
    }
}

fn ep(id: &str, subnet: &str, host: &str, ip: &str, ifindex: Option<u32>) -> EndpointSpec {
    let last = ip.parse::<Ipv4Addr>().unwrap().octets()[3];
    EndpointSpec {
        id: id.into(),
        subnet: subnet.into(),
        host: host.into(),
        ip: ip.parse().unwrap(),
        mac: [0x02, 0, 0, 0, id.len() as u8, last],
        ifindex,
    }
}

/// Two VPCs with the same CIDR and subnets, instances with identical addresses on two hosts,
/// and a third VPC with instances only on h2.
fn two_tenants() -> OverlayState {
    OverlayState {
        vpcs: vec![
            vpc("vpc-a", 100, "10.0.0.0/16"),
            vpc("vpc-b", 200, "10.0.0.0/16"),
            vpc("vpc-c", 300, "172.16.0.0/16"),
        ],
        subnets: vec![
            subnet("subnet-a1", "vpc-a", "10.0.1.0/24"),
            subnet("subnet-a2", "vpc-a", "10.0.2.0/24"),
            subnet("subnet-b1", "vpc-b", "10.0.1.0/24"),
            subnet("subnet-c1", "vpc-c", "172.16.1.0/24"),
        ],
        hosts: vec![
            HostSpec {
                id: "h1".into(),
                vtep: "192.0.2.1".parse().unwrap(),
            },
            HostSpec {
                id: "h2".into(),
                vtep: "192.0.2.2".parse().unwrap(),
            },
        ],
        endpoints: vec![
            ep("eni-a1", "subnet-a1", "h1", "10.0.1.10", Some(11)),
            ep("eni-a2", "subnet-a2", "h2", "10.0.2.10", None),
            ep("eni-a3", "subnet-a1", "h2", "10.0.1.11", None),
            ep("eni-b1", "subnet-b1", "h1", "10.0.1.11", Some(12)),
            ep("eni-b2", "subnet-b1", "h2", "10.0.1.10", None),
            ep("eni-c1", "subnet-c1", "h2", "172.16.1.10", None),
        ],
        flow_log_flags: Default::default(),
    }
}

#[test]
fn flow_log_flags_reach_local_endpoint_entries() {
    use dataplane_common::flowlog::{EP_LOG_ACCEPT, EP_LOG_REJECT};
    let mut state = two_tenants();
    state
        .flow_log_flags
        .insert("eni-a1".into(), EP_LOG_ACCEPT | EP_LOG_REJECT);
    // A remote endpoint's flags change nothing on this host.
    state.flow_log_flags.insert("eni-a3".into(), EP_LOG_REJECT);
    let maps = compile(&state, "h1", ROUTER).unwrap();
    assert_eq!(maps.endpoints[&11].flags, EP_LOG_ACCEPT | EP_LOG_REJECT);
    assert_eq!(maps.endpoints[&12].flags, 0);
    assert_eq!(
        maps.endpoints[&11].value().flags,
        EP_LOG_ACCEPT | EP_LOG_REJECT
    );
}

fn key(ip: &str) -> [u8; 16] {
    ipv4_mapped(ip.parse::<Ipv4Addr>().unwrap().octets())
}

#[test]
fn same_cidr_in_two_vpcs_stays_apart_by_vni() {
    let maps = compile(&two_tenants(), "h1", ROUTER).unwrap();
    assert_eq!(maps.vnis.iter().copied().collect::<Vec<_>>(), [100, 200]);
    assert_eq!(
        maps.vteps.iter().copied().collect::<Vec<_>>(),
        ["192.0.2.2".parse::<Ipv4Addr>().unwrap()]
    );
    // 10.0.1.10 is local in VPC a, remote in VPC b.
    assert!(matches!(
        maps.neighbors[&(100, key("10.0.1.10"))],
        NeighborEntry::Local { ifindex: 11, .. }
    ));
    assert!(matches!(
        maps.neighbors[&(200, key("10.0.1.10"))],
        NeighborEntry::Remote { vtep, .. } if vtep == "192.0.2.2".parse::<Ipv4Addr>().unwrap()
    ));
    // 10.0.1.11 the other way round.
    assert!(matches!(
        maps.neighbors[&(100, key("10.0.1.11"))],
        NeighborEntry::Remote { .. }
    ));
    assert!(matches!(
        maps.neighbors[&(200, key("10.0.1.11"))],
        NeighborEntry::Local { ifindex: 12, .. }
    ));
    // Gateways of every subnet of the present VPCs; VPC b has no 10.0.2.0/24.
    for (vni, gw) in [(100, "10.0.1.1"), (100, "10.0.2.1"), (200, "10.0.1.1")] {
        assert_eq!(
            maps.neighbors[&(vni, key(gw))],
            NeighborEntry::Gateway { mac: ROUTER }
        );
    }
    assert!(!maps.neighbors.contains_key(&(200, key("10.0.2.1"))));
    assert!(!maps.neighbors.contains_key(&(200, key("10.0.2.10"))));
    // One local route per VPC, VNI fully matched.
    let want_route = |vni: u32| {
        (
            RoutePrefix::ipv4_prefix_len(16),
            RoutePrefix {
                vni_be: vni.to_be_bytes(),
                addr: key("10.0.0.0"),
            },
        )
    };
    assert_eq!(maps.routes.len(), 2);
    assert_eq!(maps.routes[&want_route(100)], RouteKind::Local);
    assert_eq!(maps.routes[&want_route(200)], RouteKind::Local);
    // Ports.
    assert_eq!(maps.endpoints.len(), 2);
    assert_eq!(maps.endpoints[&11].vni, 100);
    assert_eq!(maps.endpoints[&12].vni, 200);
    assert_eq!(maps.endpoints[&12].router_mac, ROUTER);
    let port = maps.endpoints[&12].value();
    assert_eq!((port.vni, port.addr), (200, key("10.0.1.11")));
    let value = maps.neighbors[&(200, key("10.0.1.10"))].value();
    assert_eq!(value.kind, NeighborKind::Remote as u32);
    assert_eq!(value.vtep, [192, 0, 2, 2]);
}

#[test]
fn vpcs_without_local_instances_are_absent() {
    let maps = compile(&two_tenants(), "h1", ROUTER).unwrap();
    assert!(!maps.vnis.contains(&300));
    assert!(maps.neighbors.keys().all(|(vni, _)| *vni != 300));
    assert!(
        maps.routes
            .keys()
            .all(|(_, p)| p.vni_be != 300u32.to_be_bytes())
    );
    // h2's endpoints have no ifindex in this state (it is h1's view): compiling for h2 must
    // refuse to guess rather than produce ports without interfaces.
    assert_eq!(
        compile(&two_tenants(), "h2", ROUTER),
        Err(CompileError::MissingIfindex("eni-a2".into()))
    );
    // With h2's ifindexes, VPC c is present on h2 and h1 is its peer VTEP.
    let mut state = two_tenants();
    for (i, e) in state.endpoints.iter_mut().enumerate() {
        if e.host == "h2" {
            e.ifindex = Some(20 + i as u32);
        }
    }
    let h2 = compile(&state, "h2", ROUTER).unwrap();
    assert_eq!(h2.vnis.iter().copied().collect::<Vec<_>>(), [100, 200, 300]);
    assert_eq!(
        h2.vteps.iter().copied().collect::<Vec<_>>(),
        ["192.0.2.1".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(h2.endpoints.len(), 4);
}

#[test]
fn a_host_with_no_instances_gets_empty_maps() {
    let mut state = two_tenants();
    state.hosts.push(HostSpec {
        id: "h3".into(),
        vtep: "192.0.2.3".parse().unwrap(),
    });
    assert_eq!(compile(&state, "h3", ROUTER).unwrap(), HostMaps::default());
}

#[test]
fn invalid_states_are_rejected_with_the_offending_object() {
    type Edit = fn(&mut OverlayState);
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("vni 0", |s| s.vpcs[0].vni = 0, "vpc-a: VNI 0"),
        (
            "vni too big",
            |s| s.vpcs[0].vni = 1 << 24,
            "outside 1..=16777215",
        ),
        (
            "duplicate vni",
            |s| s.vpcs[1].vni = 100,
            "vpc-a and vpc-b both use VNI 100",
        ),
        (
            "duplicate id",
            |s| s.vpcs[2].id = "vpc-a".into(),
            "duplicate vpc id vpc-a",
        ),
        (
            "subnet outside vpc",
            |s| s.subnets[0].cidr = "10.1.0.0/24".parse().unwrap(),
            "subnet-a1 (10.1.0.0/24) is not inside",
        ),
        (
            "subnet larger than vpc",
            |s| s.subnets[0].cidr = "10.0.0.0/8".parse().unwrap(),
            "is not inside",
        ),
        (
            "overlapping subnets",
            |s| s.subnets[1].cidr = "10.0.1.128/25".parse().unwrap(),
            "subnets subnet-a1 and subnet-a2 overlap",
        ),
        (
            "unknown vpc",
            |s| s.subnets[0].vpc = "vpc-x".into(),
            "refers to unknown vpc vpc-x",
        ),
        (
            "unknown subnet",
            |s| s.endpoints[0].subnet = "nope".into(),
            "unknown subnet nope",
        ),
        (
            "unknown host",
            |s| s.endpoints[0].host = "h9".into(),
            "unknown host h9",
        ),
        (
            "network address",
            |s| s.endpoints[0].ip = "10.0.1.0".parse().unwrap(),
            "10.0.1.0 is not a usable address",
        ),
        (
            "router address",
            |s| s.endpoints[0].ip = "10.0.1.1".parse().unwrap(),
            "not a usable",
        ),
        (
            "dns address",
            |s| s.endpoints[0].ip = "10.0.1.2".parse().unwrap(),
            "not a usable",
        ),
        (
            "reserved address",
            |s| s.endpoints[0].ip = "10.0.1.3".parse().unwrap(),
            "not a usable",
        ),
        (
            "broadcast address",
            |s| s.endpoints[0].ip = "10.0.1.255".parse().unwrap(),
            "not a usable",
        ),
        (
            "outside subnet",
            |s| s.endpoints[0].ip = "10.0.2.50".parse().unwrap(),
            "not a usable address of subnet subnet-a1",
        ),
        (
            "duplicate address in a vpc",
            |s| s.endpoints[2].ip = "10.0.1.10".parse().unwrap(),
            "eni-a1 and eni-a3 both use 10.0.1.10",
        ),
        (
            "local without ifindex",
            |s| s.endpoints[0].ifindex = None,
            "eni-a1 runs on this host",
        ),
        (
            "shared ifindex",
            |s| s.endpoints[3].ifindex = Some(11),
            "share ifindex 11",
        ),
    ];
    for (name, edit, want) in cases {
        let mut state = two_tenants();
        edit(&mut state);
        let err = compile(&state, "h1", ROUTER).expect_err(name);
        assert!(err.to_string().contains(want), "{name}: got `{err}`");
    }
}

#[test]
fn usable_addresses_of_a_28_are_eleven() {
    let cidr: ipnetwork::Ipv4Network = "10.0.0.16/28".parse().unwrap();
    let usable = cidr
        .iter()
        .filter(|ip| !model::is_reserved(cidr, *ip))
        .count();
    assert_eq!(usable, 11);
    let cidr: ipnetwork::Ipv4Network = "10.0.1.0/24".parse().unwrap();
    assert_eq!(
        cidr.iter()
            .filter(|ip| !model::is_reserved(cidr, *ip))
            .count(),
        251
    );
    assert_eq!(
        model::gateway(cidr),
        "10.0.1.1".parse::<Ipv4Addr>().unwrap()
    );
}

#[test]
fn diff_orders_additions_outside_in_and_removals_inside_out() {
    let maps = compile(&two_tenants(), "h1", ROUTER).unwrap();
    let rank = |op: &MapOp| match op {
        MapOp::AddVni(_) | MapOp::AddVtep(_) => 0,
        MapOp::PutRoute(..) => 1,
        MapOp::PutNeighbor(..) => 2,
        MapOp::PutEndpoint(..) => 3,
        MapOp::DelEndpoint(_) => 4,
        MapOp::DelNeighbor(..) => 5,
        MapOp::DelRoute(..) => 6,
        MapOp::DelVtep(_) | MapOp::DelVni(_) => 7,
    };
    let up = diff(&HostMaps::default(), &maps);
    assert!(up.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])), "{up:#?}");
    let entries = maps.vnis.len()
        + maps.vteps.len()
        + maps.routes.len()
        + maps.neighbors.len()
        + maps.endpoints.len();
    assert_eq!(up.len(), entries);
    let down = diff(&maps, &HostMaps::default());
    assert_eq!(down.len(), entries);
    assert!(down.iter().all(|op| rank(op) >= 4), "{down:#?}");
    assert!(down.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
}

#[test]
fn reapplying_the_same_state_writes_nothing_and_changes_are_minimal() {
    let state = two_tenants();
    let before = compile(&state, "h1", ROUTER).unwrap();
    assert!(diff(&before, &compile(&state, "h1", ROUTER).unwrap()).is_empty());

    // eni-a3 (VPC a, h2) is terminated: its neighbor goes; h2 stays a VTEP (VPC b needs it).
    let mut state2 = state.clone();
    state2.endpoints.retain(|e| e.id != "eni-a3");
    let after = compile(&state2, "h1", ROUTER).unwrap();
    assert_eq!(
        diff(&before, &after),
        vec![MapOp::DelNeighbor(100, key("10.0.1.11"))]
    );

    // Every remote instance leaves: h2 is no longer a VTEP of this host.
    let mut state3 = state.clone();
    state3.endpoints.retain(|e| e.host == "h1");
    let ops = diff(&before, &compile(&state3, "h1", ROUTER).unwrap());
    assert!(ops.contains(&MapOp::DelVtep("192.0.2.2".parse().unwrap())));
    assert!(
        !ops.iter()
            .any(|op| matches!(op, MapOp::DelVni(_) | MapOp::DelEndpoint(_)))
    );
}
