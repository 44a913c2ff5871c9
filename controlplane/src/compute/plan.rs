//! Desired versus observed: validation, names, the diff into [`Action`]s and the commands that
//! carry them out (pure, unit-tested).

use crate::fnv::fnv1a64;
use std::{fmt, net::Ipv4Addr};

use super::{
    ComputeError, INSTANCE_IFNAME, InstanceNet,
    state::{LinkState, NetnsState, Observed, RouteState},
};

/// Longest interface name Linux accepts (`IFNAMSIZ - 1`).
const MAX_IFNAME: usize = 15;
/// Longest instance id accepted (AWS's are 19 characters).
const MAX_INSTANCE_ID: usize = 64;
/// Longest netns name prefix accepted.
const MAX_PREFIX: usize = 64;
/// Smallest MTU with IPv4 (RFC 791).
const MIN_MTU: u32 = 68;
/// Largest MTU of a veth.
const MAX_MTU: u32 = 65535;
/// Prefix of the host-side interface names; the rest is [`HOST_IFNAME_HEX`] hex digits.
const HOST_IFNAME_PREFIX: &str = "vi";
/// Hex digits of the name hash in a host-side name (52 bits).
const HOST_IFNAME_HEX: usize = MAX_IFNAME - HOST_IFNAME_PREFIX.len();
/// Prefix of the alias that marks a host-side interface as an instance's (`ip link ... alias`).
const OWNER_ALIAS_PREFIX: &str = "vpc-instance:";

/// The host-side interface name of an instance: `vi` + 13 hex digits, the top 52 bits of the
/// FNV-1a hash of the instance id (15 characters, Linux's limit).
///
/// Deterministic, so the agent finds the interface again after a restart without any state of
/// its own. Two instance ids can hash to the same name; with n instances on a host the
/// probability is about n² / 2^53 (1e-8 for 10,000 instances). A collision is detected rather
/// than resolved: the interface carries its instance id in its alias (`vpc-instance:<id>`), so
/// [`super::ComputeNet::ensure`] of the second instance fails with
/// [`ComputeError::HostIfnameTaken`] without touching the first one, and
/// [`super::ComputeNet::remove`] never deletes an interface of another instance.
pub fn host_ifname(instance_id: &str) -> String {
    let hash = fnv1a64(instance_id.as_bytes()) >> (64 - 4 * HOST_IFNAME_HEX);
    format!(
        "{HOST_IFNAME_PREFIX}{hash:0width$x}",
        width = HOST_IFNAME_HEX
    )
}

/// The alias (`ifalias`) that marks the host-side interface as `instance_id`'s.
pub(super) fn owner_alias(instance_id: &str) -> String {
    format!("{OWNER_ALIAS_PREFIX}{instance_id}")
}

/// Whether a host-side interface with this alias may be treated as `instance_id`'s: it carries
/// its alias, or none (an interface with a name derived from this id but not yet labelled, e.g.
/// after a crash between creating and labelling it).
pub(super) fn owned_by(alias: Option<&str>, instance_id: &str) -> bool {
    alias.is_none_or(|a| a == owner_alias(instance_id))
}

/// `[A-Za-z0-9_-]`, starting with an alphanumeric: safe as part of a file name, a netns name
/// and a command-line argument (never taken for an option).
fn is_simple_name(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks an instance id: 1-64 characters of `[A-Za-z0-9_-]`, starting with an alphanumeric.
pub(super) fn validate_instance_id(instance_id: &str) -> Result<(), ComputeError> {
    if instance_id.len() <= MAX_INSTANCE_ID && is_simple_name(instance_id) {
        Ok(())
    } else {
        Err(ComputeError::InvalidSpec(format!(
            "instance id {instance_id:?}: expected 1-{MAX_INSTANCE_ID} characters of \
             [A-Za-z0-9_-] starting with a letter or digit"
        )))
    }
}

/// Checks a netns name prefix: 1-64 characters of `[A-Za-z0-9_-]`, starting with an
/// alphanumeric.
pub(super) fn validate_prefix(prefix: &str) -> Result<(), ComputeError> {
    if prefix.len() <= MAX_PREFIX && is_simple_name(prefix) {
        Ok(())
    } else {
        Err(ComputeError::InvalidSpec(format!(
            "netns prefix {prefix:?}: expected 1-{MAX_PREFIX} characters of [A-Za-z0-9_-] \
             starting with a letter or digit"
        )))
    }
}

/// Checks `spec` against itself and the names `prefix` implies; nothing is run for an invalid
/// spec.
pub(super) fn validate(prefix: &str, spec: &InstanceNet) -> Result<(), ComputeError> {
    let InstanceNet {
        instance_id,
        netns,
        host_ifname: host,
        mac,
        ip,
        prefix_len,
        gateway,
        mtu,
    } = spec;
    validate_prefix(prefix)?;
    validate_instance_id(instance_id)?;
    let invalid = |what: String| Err(ComputeError::InvalidSpec(format!("{instance_id}: {what}")));
    if *netns != format!("{prefix}{instance_id}") {
        return invalid(format!(
            "netns {netns:?} is not {prefix:?} + the instance id"
        ));
    }
    if *host != host_ifname(instance_id) {
        return invalid(format!(
            "host interface {host:?} is not host_ifname(id) = {:?}",
            host_ifname(instance_id)
        ));
    }
    if mac[0] & 1 != 0 || *mac == [0; 6] {
        return invalid(format!("MAC {} is not a unicast address", fmt_mac(mac)));
    }
    if !(1..=30).contains(prefix_len) {
        return invalid(format!("prefix length /{prefix_len} not in /1../30"));
    }
    let mask = u32::MAX << (32 - u32::from(*prefix_len));
    let host_part = |a: Ipv4Addr| u32::from(a) & !mask;
    if u32::from(*ip) & mask != u32::from(*gateway) & mask {
        return invalid(format!("gateway {gateway} not in {ip}/{prefix_len}"));
    }
    if ip == gateway {
        return invalid(format!("address {ip} is the gateway"));
    }
    for a in [*ip, *gateway] {
        if host_part(a) == 0 || host_part(a) == !mask {
            return invalid(format!(
                "{a} is the network or broadcast address of /{prefix_len}"
            ));
        }
    }
    if !(MIN_MTU..=MAX_MTU).contains(mtu) {
        return invalid(format!("MTU {mtu} not in {MIN_MTU}..={MAX_MTU}"));
    }
    Ok(())
}

/// One change to an instance's network, in the order they are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `ip netns del`: a file under /run/netns that is not a namespace.
    DeleteStaleNetns,
    /// `ip netns add`.
    AddNetns,
    /// Deletes the host-side interface (not paired with the instance's `eth0`).
    DeleteHostLink,
    /// Deletes `eth0` in the namespace (not paired with the host side).
    DeleteEth0,
    /// Creates the veth pair: host side here, `eth0` in the namespace, MAC and MTU set.
    AddVethPair,
    /// Labels the host side with the instance id (alias `vpc-instance:<id>`).
    SetHostAlias,
    /// Disables IPv6 on the host side (no link-local address, DAD or router solicitations).
    DisableHostIpv6,
    /// Disables IPv6 on `eth0`.
    DisableEth0Ipv6,
    /// Sets the host side's MTU.
    SetHostMtu(u32),
    /// Sets `eth0`'s MTU.
    SetEth0Mtu(u32),
    /// Sets `eth0`'s MAC address.
    SetEth0Mac([u8; 6]),
    /// Brings `lo` up in the namespace.
    SetLoUp,
    /// Deletes a default route other than the desired one.
    DeleteRoute(RouteState),
    /// Deletes every IPv4 address of `eth0` (`ip -4 addr flush`: deleting them one at a time
    /// fails once deleting a primary address has taken its secondaries along).
    FlushAddrs,
    /// Adds the IPv4 address to `eth0`.
    AddAddr(Ipv4Addr, u8),
    /// Brings the host side up.
    SetHostUp,
    /// Brings `eth0` up.
    SetEth0Up,
    /// `ip route replace default via GATEWAY dev eth0`.
    ReplaceDefaultRoute(Ipv4Addr),
}

/// How an [`Action`] is carried out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// `ip [-n NETNS] ARGS...`.
    Ip {
        /// `None`: the caller's namespace.
        netns: Option<String>,
        args: Vec<String>,
        /// "Cannot find device" counts as success (a delete racing with the kernel's own
        /// teardown of the pair).
        missing_ok: bool,
    },
    /// Writes `value` to `/proc/sys/<key>` in the namespace (`None`: the caller's).
    Sysctl {
        netns: Option<String>,
        key: String,
        value: &'static str,
    },
}

/// Formats a MAC address as `ip` does.
pub(super) fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The `/proc/sys` key (path below it) of `ifname`'s `disable_ipv6`.
pub(super) fn disable_ipv6_key(ifname: &str) -> String {
    format!("net/ipv6/conf/{ifname}/disable_ipv6")
}

fn strings<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.into_iter().map(str::to_owned).collect()
}

impl Action {
    /// The command that carries this action out for `spec`.
    pub(super) fn step(&self, spec: &InstanceNet) -> Step {
        let host = spec.host_ifname.as_str();
        let eth0 = INSTANCE_IFNAME;
        let here = |args: Vec<String>| Step::Ip {
            netns: None,
            args,
            missing_ok: false,
        };
        let inside = |args: Vec<String>| Step::Ip {
            netns: Some(spec.netns.clone()),
            args,
            missing_ok: false,
        };
        match self {
            Self::DeleteStaleNetns => here(strings(["netns", "del", &spec.netns])),
            Self::AddNetns => here(strings(["netns", "add", &spec.netns])),
            Self::DeleteHostLink => Step::Ip {
                netns: None,
                args: strings(["link", "del", "dev", host]),
                missing_ok: true,
            },
            Self::DeleteEth0 => Step::Ip {
                netns: Some(spec.netns.clone()),
                args: strings(["link", "del", "dev", eth0]),
                missing_ok: true,
            },
            Self::AddVethPair => {
                let mtu = spec.mtu.to_string();
                here(strings([
                    "link",
                    "add",
                    host,
                    "mtu",
                    &mtu,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    eth0,
                    "address",
                    &fmt_mac(&spec.mac),
                    "mtu",
                    &mtu,
                    "netns",
                    &spec.netns,
                ]))
            }
            Self::SetHostAlias => here(strings([
                "link",
                "set",
                "dev",
                host,
                "alias",
                &owner_alias(&spec.instance_id),
            ])),
            Self::DisableHostIpv6 => Step::Sysctl {
                netns: None,
                key: disable_ipv6_key(host),
                value: "1",
            },
            Self::DisableEth0Ipv6 => Step::Sysctl {
                netns: Some(spec.netns.clone()),
                key: disable_ipv6_key(eth0),
                value: "1",
            },
            Self::SetHostMtu(mtu) => here(strings([
                "link",
                "set",
                "dev",
                host,
                "mtu",
                &mtu.to_string(),
            ])),
            Self::SetEth0Mtu(mtu) => inside(strings([
                "link",
                "set",
                "dev",
                eth0,
                "mtu",
                &mtu.to_string(),
            ])),
            Self::SetEth0Mac(mac) => inside(strings([
                "link",
                "set",
                "dev",
                eth0,
                "address",
                &fmt_mac(mac),
            ])),
            Self::SetLoUp => inside(strings(["link", "set", "dev", "lo", "up"])),
            Self::DeleteRoute(route) => {
                let mut args = strings(["-4", "route", "del"]);
                args.extend(route.kind.clone());
                args.push("default".into());
                if let Some(gw) = route.gateway {
                    args.extend(["via".into(), gw.to_string()]);
                }
                if let Some(dev) = &route.dev {
                    args.extend(["dev".into(), dev.clone()]);
                }
                if route.metric != 0 {
                    args.extend(["metric".into(), route.metric.to_string()]);
                }
                inside(args)
            }
            Self::FlushAddrs => inside(strings(["-4", "addr", "flush", "dev", eth0])),
            Self::AddAddr(ip, len) => inside(strings([
                "addr",
                "add",
                &format!("{ip}/{len}"),
                "dev",
                eth0,
            ])),
            Self::SetHostUp => here(strings(["link", "set", "dev", host, "up"])),
            Self::SetEth0Up => inside(strings(["link", "set", "dev", eth0, "up"])),
            Self::ReplaceDefaultRoute(gw) => inside(strings([
                "-4",
                "route",
                "replace",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                eth0,
            ])),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip { netns, args, .. } => {
                f.write_str("ip")?;
                if let Some(ns) = netns {
                    write!(f, " -n {ns}")?;
                }
                for a in args {
                    write!(f, " {a}")?;
                }
                Ok(())
            }
            Self::Sysctl { netns, key, value } => {
                write!(f, "sysctl {}={value}", key.replace('/', "."))?;
                if let Some(ns) = netns {
                    write!(f, " in netns {ns}")?;
                }
                Ok(())
            }
        }
    }
}

/// A veth end as it is right after [`Action::AddVethPair`].
fn new_veth(ifname: &str, mac: Option<[u8; 6]>, mtu: u32) -> LinkState {
    LinkState {
        ifindex: 0,
        ifname: ifname.to_owned(),
        kind: Some("veth".into()),
        peer_ifindex: None,
        mtu,
        mac,
        up: false,
        alias: None,
        ipv4: Vec::new(),
    }
}

/// The actions that take `obs` to `spec`, in order; empty when they agree (then nothing is
/// run). Fails, asking for nothing, if the host-side name belongs to another instance.
///
/// Structure first: the namespace (re)created if missing or stale, the veth pair (re)created
/// unless the host side and `eth0` are each other's peers. Then attributes, compared against
/// what is left after the structural actions (a new pair has the MAC and MTU already, nothing
/// else): IPv6 off before anything comes up, alias, MTUs, MAC, `lo`; stray default routes are
/// deleted before the address changes (which may flush them); a wrong address set is replaced
/// as a whole; links up; the default route
/// (re)placed whenever it is missing or the addresses changed.
pub(super) fn diff(spec: &InstanceNet, obs: &Observed) -> Result<Vec<Action>, ComputeError> {
    if let Some(host) = &obs.host
        && !owned_by(host.alias.as_deref(), &spec.instance_id)
    {
        return Err(ComputeError::HostIfnameTaken {
            ifname: spec.host_ifname.clone(),
            alias: host.alias.clone().unwrap_or_default(),
            instance_id: spec.instance_id.clone(),
        });
    }
    let mut actions = Vec::new();
    let fresh = Default::default();
    let ns = match obs.netns {
        NetnsState::Present => &obs.ns,
        NetnsState::Missing => {
            actions.push(Action::AddNetns);
            &fresh
        }
        NetnsState::Stale => {
            actions.extend([Action::DeleteStaleNetns, Action::AddNetns]);
            &fresh
        }
    };

    let paired = match (&obs.host, &ns.eth0) {
        (Some(h), Some(e)) => h.is_veth_to(e.ifindex) && e.is_veth_to(h.ifindex),
        _ => false,
    };
    let (new_host, new_eth0);
    let (host, eth0, host_v6_off, eth0_v6_off, routes) = match (&obs.host, &ns.eth0) {
        (Some(h), Some(e)) if paired => (
            h,
            e,
            obs.host_ipv6_disabled,
            ns.eth0_ipv6_disabled,
            ns.default_routes.clone(),
        ),
        _ => {
            if obs.host.is_some() {
                actions.push(Action::DeleteHostLink);
            }
            if ns.eth0.is_some() {
                actions.push(Action::DeleteEth0);
            }
            actions.push(Action::AddVethPair);
            new_host = new_veth(&spec.host_ifname, None, spec.mtu);
            new_eth0 = new_veth(INSTANCE_IFNAME, Some(spec.mac), spec.mtu);
            // Routes through the old eth0 went with it.
            let routes = ns
                .default_routes
                .iter()
                .filter(|r| r.dev.as_deref() != Some(INSTANCE_IFNAME))
                .cloned()
                .collect();
            (&new_host, &new_eth0, false, false, routes)
        }
    };

    if !host_v6_off {
        actions.push(Action::DisableHostIpv6);
    }
    if !eth0_v6_off {
        actions.push(Action::DisableEth0Ipv6);
    }
    if host.alias.as_deref() != Some(owner_alias(&spec.instance_id).as_str()) {
        actions.push(Action::SetHostAlias);
    }
    if host.mtu != spec.mtu {
        actions.push(Action::SetHostMtu(spec.mtu));
    }
    if eth0.mtu != spec.mtu {
        actions.push(Action::SetEth0Mtu(spec.mtu));
    }
    if eth0.mac != Some(spec.mac) {
        actions.push(Action::SetEth0Mac(spec.mac));
    }
    if !ns.lo_up {
        actions.push(Action::SetLoUp);
    }
    let wanted_route = RouteState {
        kind: None,
        gateway: Some(spec.gateway),
        dev: Some(INSTANCE_IFNAME.to_owned()),
        metric: 0,
    };
    actions.extend(
        routes
            .iter()
            .filter(|r| **r != wanted_route)
            .cloned()
            .map(Action::DeleteRoute),
    );
    let addrs_ok = eth0.ipv4 == [(spec.ip, spec.prefix_len)];
    if !addrs_ok {
        if !eth0.ipv4.is_empty() {
            actions.push(Action::FlushAddrs);
        }
        actions.push(Action::AddAddr(spec.ip, spec.prefix_len));
    }
    if !host.up {
        actions.push(Action::SetHostUp);
    }
    if !eth0.up {
        actions.push(Action::SetEth0Up);
    }
    if !addrs_ok || !routes.contains(&wanted_route) {
        actions.push(Action::ReplaceDefaultRoute(spec.gateway));
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::state::InstanceNsState;

    const ID: &str = "i-0a1b2c3d4e5f60718";
    const PREFIX: &str = "vpc-";

    fn spec() -> InstanceNet {
        InstanceNet {
            instance_id: ID.into(),
            netns: format!("{PREFIX}{ID}"),
            host_ifname: host_ifname(ID),
            mac: [0x02, 0, 10, 0, 0, 5],
            ip: Ipv4Addr::new(10, 0, 0, 5),
            prefix_len: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            mtu: 1500,
        }
    }

    /// What a converged instance looks like: host ifindex 7, eth0 ifindex 2.
    fn converged(spec: &InstanceNet) -> Observed {
        Observed {
            netns: NetnsState::Present,
            host: Some(LinkState {
                ifindex: 7,
                ifname: spec.host_ifname.clone(),
                kind: Some("veth".into()),
                peer_ifindex: Some(2),
                mtu: spec.mtu,
                mac: Some([0x5a, 0x88, 0x17, 0x4f, 0x76, 0xca]),
                up: true,
                alias: Some(owner_alias(&spec.instance_id)),
                ipv4: vec![],
            }),
            host_ipv6_disabled: true,
            ns: InstanceNsState {
                lo_up: true,
                eth0: Some(LinkState {
                    ifindex: 2,
                    ifname: INSTANCE_IFNAME.into(),
                    kind: Some("veth".into()),
                    peer_ifindex: Some(7),
                    mtu: spec.mtu,
                    mac: Some(spec.mac),
                    up: true,
                    alias: None,
                    ipv4: vec![(spec.ip, spec.prefix_len)],
                }),
                eth0_ipv6_disabled: true,
                default_routes: vec![RouteState {
                    kind: None,
                    gateway: Some(spec.gateway),
                    dev: Some(INSTANCE_IFNAME.into()),
                    metric: 0,
                }],
            },
        }
    }

    fn eth0(obs: &mut Observed) -> &mut LinkState {
        obs.ns.eth0.as_mut().unwrap()
    }

    /// Everything after the structural actions for a brand-new pair.
    fn setup_after_pair(spec: &InstanceNet) -> Vec<Action> {
        vec![
            Action::DisableHostIpv6,
            Action::DisableEth0Ipv6,
            Action::SetHostAlias,
            Action::SetLoUp,
            Action::AddAddr(spec.ip, spec.prefix_len),
            Action::SetHostUp,
            Action::SetEth0Up,
            Action::ReplaceDefaultRoute(spec.gateway),
        ]
    }

    #[test]
    fn host_ifname_is_short_stable_and_spread() {
        let name = host_ifname(ID);
        assert_eq!(name.len(), MAX_IFNAME);
        assert!(name.starts_with("vi"));
        assert!(
            name[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // Fixed forever: agents find their interfaces again by this name after an upgrade.
        assert_eq!(name, format!("vi{:013x}", fnv1a64(ID.as_bytes()) >> 12));
        assert_eq!(host_ifname(""), "vicbf29ce484222");
        assert_eq!(host_ifname("i-1").len(), MAX_IFNAME);
        let names: std::collections::HashSet<_> = (0..10_000)
            .map(|i| host_ifname(&format!("i-{i:017x}")))
            .collect();
        assert_eq!(names.len(), 10_000);
    }

    #[test]
    fn ownership_by_alias() {
        assert!(owned_by(None, ID));
        assert!(owned_by(Some(&owner_alias(ID)), ID));
        assert!(!owned_by(Some(&owner_alias("i-other")), ID));
        assert!(!owned_by(Some("something else"), ID));
    }

    #[test]
    fn validation() {
        let s = spec();
        validate(PREFIX, &s).unwrap();
        type Change = fn(&mut InstanceNet);
        let bad: Vec<(&str, Change)> = vec![
            ("instance id", |s| s.instance_id = "i/1".into()),
            ("instance id", |s| s.instance_id = "-i".into()),
            ("instance id", |s| s.instance_id = String::new()),
            ("netns", |s| s.netns = format!("other-{ID}")),
            ("host interface", |s| s.host_ifname = "eth9".into()),
            ("unicast", |s| s.mac = [1, 0, 0, 0, 0, 1]),
            ("unicast", |s| s.mac = [0; 6]),
            ("prefix length", |s| s.prefix_len = 31),
            ("prefix length", |s| s.prefix_len = 0),
            ("gateway", |s| s.gateway = Ipv4Addr::new(10, 0, 1, 1)),
            ("is the gateway", |s| s.ip = s.gateway),
            ("broadcast", |s| s.ip = Ipv4Addr::new(10, 0, 0, 255)),
            ("network", |s| s.gateway = Ipv4Addr::new(10, 0, 0, 0)),
            ("MTU", |s| s.mtu = 67),
            ("MTU", |s| s.mtu = 65536),
        ];
        for (needle, change) in bad {
            let mut s = spec();
            change(&mut s);
            let msg = validate(PREFIX, &s).unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        assert!(validate("", &spec()).is_err());
        assert!(validate("a/b", &spec()).is_err());
        assert!(validate_instance_id(&"i".repeat(65)).is_err());
        validate_instance_id(&"i".repeat(64)).unwrap();
    }

    #[test]
    fn converged_state_needs_nothing() {
        let s = spec();
        assert_eq!(diff(&s, &converged(&s)).unwrap(), []);
    }

    #[test]
    fn nothing_there_builds_everything() {
        let s = spec();
        let mut expected = vec![Action::AddNetns, Action::AddVethPair];
        expected.extend(setup_after_pair(&s));
        assert_eq!(diff(&s, &Observed::default()).unwrap(), expected);

        // A stale namespace file is replaced; a leftover host side (its peer is gone with the
        // old namespace) is deleted first.
        let mut obs = converged(&s);
        obs.netns = NetnsState::Stale;
        let mut expected = vec![
            Action::DeleteStaleNetns,
            Action::AddNetns,
            Action::DeleteHostLink,
            Action::AddVethPair,
        ];
        expected.extend(setup_after_pair(&s));
        assert_eq!(diff(&s, &obs).unwrap(), expected);
    }

    #[test]
    fn unpaired_ends_are_replaced() {
        let s = spec();
        // eth0 paired with something else, host side paired elsewhere.
        for (host_peer, eth0_peer) in [(3, 7), (2, 9), (3, 9)] {
            let mut obs = converged(&s);
            obs.host.as_mut().unwrap().peer_ifindex = Some(host_peer);
            eth0(&mut obs).peer_ifindex = Some(eth0_peer);
            // A default route through another device survives the pair's replacement.
            let other = RouteState {
                kind: Some("unreachable".into()),
                gateway: None,
                dev: None,
                metric: 20,
            };
            obs.ns.default_routes.push(other.clone());
            let actions = diff(&s, &obs).unwrap();
            let mut expected = vec![
                Action::DeleteHostLink,
                Action::DeleteEth0,
                Action::AddVethPair,
                Action::DisableHostIpv6,
                Action::DisableEth0Ipv6,
                Action::SetHostAlias,
                Action::DeleteRoute(other),
                Action::AddAddr(s.ip, s.prefix_len),
                Action::SetHostUp,
                Action::SetEth0Up,
                Action::ReplaceDefaultRoute(s.gateway),
            ];
            assert_eq!(actions, expected, "peers {host_peer} {eth0_peer}");
            // Only one end exists.
            obs.host = None;
            expected.remove(0);
            assert_eq!(diff(&s, &obs).unwrap(), expected);
        }
        // eth0 is not a veth.
        let mut obs = converged(&s);
        eth0(&mut obs).kind = Some("dummy".into());
        assert_eq!(
            diff(&s, &obs).unwrap()[..3],
            [
                Action::DeleteHostLink,
                Action::DeleteEth0,
                Action::AddVethPair
            ]
        );
    }

    #[test]
    fn attributes_are_corrected_in_place() {
        let s = spec();
        let mut obs = converged(&s);
        obs.host.as_mut().unwrap().mtu = 1400;
        eth0(&mut obs).mtu = 9001;
        eth0(&mut obs).mac = Some([2, 0, 0, 0, 0, 9]);
        obs.host.as_mut().unwrap().alias = None;
        obs.host_ipv6_disabled = false;
        obs.ns.eth0_ipv6_disabled = false;
        obs.ns.lo_up = false;
        obs.host.as_mut().unwrap().up = false;
        assert_eq!(
            diff(&s, &obs).unwrap(),
            [
                Action::DisableHostIpv6,
                Action::DisableEth0Ipv6,
                Action::SetHostAlias,
                Action::SetHostMtu(1500),
                Action::SetEth0Mtu(1500),
                Action::SetEth0Mac(s.mac),
                Action::SetLoUp,
                Action::SetHostUp,
            ]
        );

        // eth0 down: its routes are gone (the kernel flushes them), so the route comes back.
        let mut obs = converged(&s);
        eth0(&mut obs).up = false;
        obs.ns.default_routes.clear();
        assert_eq!(
            diff(&s, &obs).unwrap(),
            [Action::SetEth0Up, Action::ReplaceDefaultRoute(s.gateway)]
        );
    }

    #[test]
    fn address_and_route_changes() {
        let s = spec();
        // A new address: the old one goes, and so may the route with it.
        let mut obs = converged(&s);
        eth0(&mut obs).ipv4 = vec![(Ipv4Addr::new(10, 0, 0, 9), 24)];
        assert_eq!(
            diff(&s, &obs).unwrap(),
            [
                Action::FlushAddrs,
                Action::AddAddr(s.ip, 24),
                Action::ReplaceDefaultRoute(s.gateway),
            ]
        );
        // An extra address: all are replaced.
        let mut obs = converged(&s);
        eth0(&mut obs).ipv4.push((Ipv4Addr::new(10, 0, 0, 9), 24));
        assert_eq!(
            diff(&s, &obs).unwrap(),
            [
                Action::FlushAddrs,
                Action::AddAddr(s.ip, 24),
                Action::ReplaceDefaultRoute(s.gateway),
            ]
        );
        // Stray default routes are deleted; a wrong gateway is replaced.
        let mut obs = converged(&s);
        let wrong = RouteState {
            kind: None,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 254)),
            dev: Some(INSTANCE_IFNAME.into()),
            metric: 0,
        };
        let metric = RouteState {
            metric: 100,
            ..obs.ns.default_routes[0].clone()
        };
        obs.ns.default_routes = vec![wrong.clone(), metric.clone()];
        assert_eq!(
            diff(&s, &obs).unwrap(),
            [
                Action::DeleteRoute(wrong),
                Action::DeleteRoute(metric),
                Action::ReplaceDefaultRoute(s.gateway),
            ]
        );
    }

    #[test]
    fn another_instances_interface_is_left_alone() {
        let s = spec();
        let mut obs = converged(&s);
        obs.host.as_mut().unwrap().alias = Some(owner_alias("i-other"));
        let err = diff(&s, &obs).unwrap_err();
        assert!(matches!(err, ComputeError::HostIfnameTaken { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("i-other") && msg.contains(&s.host_ifname),
            "{msg}"
        );
    }

    #[test]
    fn steps_render_as_commands() {
        let s = spec();
        let ns = s.netns.as_str();
        let h = s.host_ifname.as_str();
        let cases = [
            (Action::AddNetns, format!("ip netns add {ns}")),
            (Action::DeleteStaleNetns, format!("ip netns del {ns}")),
            (
                Action::AddVethPair,
                format!(
                    "ip link add {h} mtu 1500 type veth peer name eth0 address 02:00:0a:00:00:05 \
                     mtu 1500 netns {ns}"
                ),
            ),
            (
                Action::SetHostAlias,
                format!("ip link set dev {h} alias vpc-instance:{ID}"),
            ),
            (
                Action::SetEth0Mtu(9001),
                format!("ip -n {ns} link set dev eth0 mtu 9001"),
            ),
            (
                Action::FlushAddrs,
                format!("ip -n {ns} -4 addr flush dev eth0"),
            ),
            (
                Action::DeleteRoute(RouteState {
                    kind: Some("unreachable".into()),
                    gateway: None,
                    dev: None,
                    metric: 20,
                }),
                format!("ip -n {ns} -4 route del unreachable default metric 20"),
            ),
            (
                Action::DeleteRoute(RouteState {
                    kind: None,
                    gateway: Some(Ipv4Addr::new(10, 0, 0, 254)),
                    dev: Some("eth0".into()),
                    metric: 0,
                }),
                format!("ip -n {ns} -4 route del default via 10.0.0.254 dev eth0"),
            ),
            (
                Action::ReplaceDefaultRoute(s.gateway),
                format!("ip -n {ns} -4 route replace default via 10.0.0.1 dev eth0"),
            ),
            (
                Action::DisableEth0Ipv6,
                format!("sysctl net.ipv6.conf.eth0.disable_ipv6=1 in netns {ns}"),
            ),
            (
                Action::DisableHostIpv6,
                format!("sysctl net.ipv6.conf.{h}.disable_ipv6=1"),
            ),
        ];
        for (action, expected) in cases {
            assert_eq!(action.step(&s).to_string(), expected, "{action:?}");
        }
        assert!(matches!(
            Action::DeleteHostLink.step(&s),
            Step::Ip {
                netns: None,
                missing_ok: true,
                ..
            }
        ));
    }
}
