//! Observed state: what `ip -j` reports about an instance's network, parsed into plain values
//! (pure, unit-tested).

use std::net::Ipv4Addr;

use serde::Deserialize;

/// Whether the instance's named namespace exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum NetnsState {
    /// No file under /run/netns.
    #[default]
    Missing,
    /// A file under /run/netns that is not a mounted namespace (left by an interrupted
    /// `ip netns add`, or by a lost mount): `ip netns add` refuses to replace it.
    Stale,
    /// A mounted network namespace.
    Present,
}

/// One interface, as `ip -j -d link show` / `ip -j -d addr show` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LinkState {
    pub ifindex: u32,
    pub ifname: String,
    /// `linkinfo.info_kind`, e.g. `veth` (needs `-d`).
    pub kind: Option<String>,
    /// The ifindex of the veth peer when it is in another namespace (`link_index`; `ip`
    /// prints it only together with `link_netnsid`).
    pub peer_ifindex: Option<u32>,
    pub mtu: u32,
    /// `None` if absent or not an Ethernet address.
    pub mac: Option<[u8; 6]>,
    /// Administratively up (`UP` in the flags; the carrier does not matter).
    pub up: bool,
    /// `ifalias`.
    pub alias: Option<String>,
    /// IPv4 addresses with their prefix lengths (only with `addr show`).
    pub ipv4: Vec<(Ipv4Addr, u8)>,
}

impl LinkState {
    /// Whether this is a veth whose peer is in another namespace and has `peer_ifindex`.
    pub fn is_veth_to(&self, peer_ifindex: u32) -> bool {
        self.kind.as_deref() == Some("veth") && self.peer_ifindex == Some(peer_ifindex)
    }
}

/// One IPv4 route of the main table whose destination is `default`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteState {
    /// The route type when not `unicast` (e.g. `unreachable`).
    pub kind: Option<String>,
    /// The next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// The output interface, if any.
    pub dev: Option<String>,
    /// The metric (priority); 0 when `ip` prints none.
    pub metric: u32,
}

/// The instance's namespace as seen from inside.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct InstanceNsState {
    /// Whether `lo` is up (it is down in a new namespace).
    pub lo_up: bool,
    /// The instance's interface, `eth0`.
    pub eth0: Option<LinkState>,
    /// `net.ipv6.conf.eth0.disable_ipv6` is 1 (or IPv6 is not available at all).
    pub eth0_ipv6_disabled: bool,
    /// IPv4 default routes of the main table.
    pub default_routes: Vec<RouteState>,
}

/// Everything [`super::plan::diff`] compares against the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Observed {
    pub netns: NetnsState,
    /// The host-side veth, in the caller's namespace.
    pub host: Option<LinkState>,
    /// `net.ipv6.conf.<host_ifname>.disable_ipv6` is 1 (meaningless without `host`).
    pub host_ipv6_disabled: bool,
    /// Only meaningful when `netns` is [`NetnsState::Present`].
    pub ns: InstanceNsState,
}

#[derive(Deserialize)]
struct JsonLink {
    ifindex: Option<u32>,
    ifname: Option<String>,
    link_index: Option<u32>,
    #[serde(default)]
    flags: Vec<String>,
    mtu: Option<u32>,
    address: Option<String>,
    ifalias: Option<String>,
    linkinfo: Option<JsonLinkInfo>,
    #[serde(default)]
    addr_info: Vec<JsonAddr>,
}

#[derive(Deserialize)]
struct JsonLinkInfo {
    info_kind: Option<String>,
}

#[derive(Deserialize)]
struct JsonAddr {
    family: Option<String>,
    local: Option<String>,
    prefixlen: Option<u8>,
}

#[derive(Deserialize)]
struct JsonRoute {
    #[serde(rename = "type")]
    kind: Option<String>,
    dst: Option<String>,
    gateway: Option<String>,
    dev: Option<String>,
    metric: Option<u32>,
}

/// Parses a JSON array, accepting empty output (some `ip` versions print nothing instead of
/// `[]`).
fn parse_array<T: for<'de> Deserialize<'de>>(json: &str) -> Result<Vec<T>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

/// Parses `aa:bb:cc:dd:ee:ff`; `None` for anything else.
pub(super) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses the output of `ip -j -d link show` or `ip -j -d addr show`. Entries without an
/// ifindex or name (`ip -j addr` prints `{}` for links its filter left out) are skipped.
pub(super) fn parse_links(json: &str) -> Result<Vec<LinkState>, String> {
    let mut links = Vec::new();
    for l in parse_array::<JsonLink>(json)? {
        let (Some(ifindex), Some(ifname)) = (l.ifindex, l.ifname) else {
            continue;
        };
        let mut ipv4 = Vec::new();
        for a in l.addr_info {
            if a.family.as_deref() != Some("inet") {
                continue;
            }
            let (Some(local), Some(prefix_len)) = (a.local, a.prefixlen) else {
                return Err(format!("{ifname}: IPv4 address without local/prefixlen"));
            };
            let ip = local
                .parse()
                .map_err(|_| format!("{ifname}: bad IPv4 address {local:?}"))?;
            ipv4.push((ip, prefix_len));
        }
        links.push(LinkState {
            ifindex,
            kind: l.linkinfo.and_then(|i| i.info_kind),
            peer_ifindex: l.link_index,
            mtu: l.mtu.ok_or_else(|| format!("{ifname}: no mtu"))?,
            mac: l.address.as_deref().and_then(parse_mac),
            up: l.flags.iter().any(|f| f == "UP"),
            alias: l.ifalias.filter(|a| !a.is_empty()),
            ipv4,
            ifname,
        });
    }
    Ok(links)
}

/// Parses the output of `ip -j -4 route show table main` and keeps the default routes.
pub(super) fn parse_default_routes(json: &str) -> Result<Vec<RouteState>, String> {
    let mut routes = Vec::new();
    for r in parse_array::<JsonRoute>(json)? {
        if r.dst.as_deref() != Some("default") {
            continue;
        }
        let gateway = match r.gateway {
            None => None,
            Some(g) => Some(g.parse().map_err(|_| format!("bad gateway {g:?}"))?),
        };
        routes.push(RouteState {
            kind: r.kind.filter(|k| k != "unicast"),
            gateway,
            dev: r.dev,
            metric: r.metric.unwrap_or(0),
        });
    }
    Ok(routes)
}

/// Interprets a `disable_ipv6` sysctl read: `None` means the file does not exist (no IPv6 in
/// this kernel), which counts as disabled.
pub(super) fn ipv6_disabled(value: Option<&str>) -> bool {
    value.is_none_or(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip -j -d link show dev vi...` of a host side (iproute2 6.1), trimmed.
    const HOST_LINK: &str = r#"[{"ifindex":7,"link_index":2,"ifname":"vi0123456789abc",
        "flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"qdisc":"noqueue",
        "operstate":"UP","linkmode":"DEFAULT","group":"default","txqlen":1000,
        "link_type":"ether","address":"5a:88:17:4f:76:ca","broadcast":"ff:ff:ff:ff:ff:ff",
        "link_netnsid":0,"ifalias":"vpc-instance:i-1","promiscuity":0,"min_mtu":68,
        "max_mtu":65535,"linkinfo":{"info_kind":"veth"},"inet6_addr_gen_mode":"eui64"}]"#;

    /// `ip -j -d addr show` inside an instance namespace, trimmed.
    const NS_ADDRS: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],
        "mtu":65536,"link_type":"loopback","address":"00:00:00:00:00:00","addr_info":[
        {"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo"}]},
        {"ifindex":2,"link_index":7,"ifname":"eth0","flags":["BROADCAST","MULTICAST"],
        "mtu":9001,"link_type":"ether","address":"02:00:0a:00:00:05","link_netnsid":0,
        "linkinfo":{"info_kind":"veth"},"addr_info":[
        {"family":"inet","local":"10.0.0.5","prefixlen":24,"scope":"global","label":"eth0"},
        {"family":"inet6","local":"fe80::ff:fe00:5","prefixlen":64,"scope":"link"}]},
        {}]"#;

    #[test]
    fn parses_host_link() {
        let links = parse_links(HOST_LINK).unwrap();
        assert_eq!(
            links,
            [LinkState {
                ifindex: 7,
                ifname: "vi0123456789abc".into(),
                kind: Some("veth".into()),
                peer_ifindex: Some(2),
                mtu: 1500,
                mac: Some([0x5a, 0x88, 0x17, 0x4f, 0x76, 0xca]),
                up: true,
                alias: Some("vpc-instance:i-1".into()),
                ipv4: vec![],
            }]
        );
        assert!(links[0].is_veth_to(2));
        assert!(!links[0].is_veth_to(3));
    }

    #[test]
    fn parses_addresses_and_skips_empty_entries() {
        let links = parse_links(NS_ADDRS).unwrap();
        assert_eq!(links.len(), 2);
        let (lo, eth0) = (&links[0], &links[1]);
        assert!(lo.up && lo.kind.is_none() && lo.peer_ifindex.is_none());
        assert_eq!(lo.mac, Some([0; 6]));
        assert!(!eth0.up);
        assert_eq!(eth0.mtu, 9001);
        assert_eq!(eth0.mac, Some([2, 0, 10, 0, 0, 5]));
        assert_eq!(eth0.ipv4, [(Ipv4Addr::new(10, 0, 0, 5), 24)]);
        assert_eq!(eth0.alias, None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_links("not json").is_err());
        assert!(
            parse_links(r#"[{"ifindex":1,"ifname":"x"}]"#).is_err(),
            "no mtu"
        );
        assert!(
            parse_links(
                r#"[{"ifindex":1,"ifname":"x","mtu":1,
                "addr_info":[{"family":"inet","local":"300.0.0.1","prefixlen":8}]}]"#
            )
            .is_err()
        );
        assert_eq!(parse_links("").unwrap(), []);
        assert_eq!(parse_links("[]\n").unwrap(), []);
    }

    #[test]
    fn parses_default_routes_only() {
        let json = r#"[{"dst":"default","gateway":"10.0.0.1","dev":"eth0","flags":[]},
            {"dst":"default","gateway":"10.0.0.2","dev":"eth0","metric":10,"flags":[]},
            {"type":"unreachable","dst":"default","metric":20,"flags":[]},
            {"dst":"10.0.0.0/24","dev":"eth0","protocol":"kernel","scope":"link",
             "prefsrc":"10.0.0.5","flags":[]}]"#;
        let gw = |last| Some(Ipv4Addr::new(10, 0, 0, last));
        assert_eq!(
            parse_default_routes(json).unwrap(),
            [
                RouteState {
                    kind: None,
                    gateway: gw(1),
                    dev: Some("eth0".into()),
                    metric: 0
                },
                RouteState {
                    kind: None,
                    gateway: gw(2),
                    dev: Some("eth0".into()),
                    metric: 10
                },
                RouteState {
                    kind: Some("unreachable".into()),
                    gateway: None,
                    dev: None,
                    metric: 20
                },
            ]
        );
        assert_eq!(parse_default_routes("[]").unwrap(), []);
        assert!(parse_default_routes(r#"[{"dst":"default","gateway":"x"}]"#).is_err());
    }

    #[test]
    fn macs_and_sysctls() {
        assert_eq!(parse_mac("02:00:0A:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        for bad in [
            "",
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "2:0:a:ff:0:1",
            "zz:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert!(ipv6_disabled(Some("1\n")));
        assert!(!ipv6_disabled(Some("0\n")));
        assert!(ipv6_disabled(None));
    }
}
