//! Tier 3: the compute agent's instance networking (`controlplane::compute`) against the kernel.
//! The agent's calls run in a "host" namespace (a thread that entered it, polling on a
//! current-thread runtime); the instance namespaces they create are named with a prefix unique
//! to the test. Needs root.

use std::{fs, net::Ipv4Addr, path::Path, process::Command};

use controlplane::compute::{
    Action, ComputeError, ComputeNet, Ensured, INSTANCE_IFNAME, InstanceNet, host_ifname,
};
use serde_json::Value;
use vpc_tests::netns::{NetNs, unique_name};

const ID: &str = "i-0a1b2c3d4e5f60718";
const MAC: [u8; 6] = [0x02, 0x00, 0x0a, 0x00, 0x00, 0x05];
const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// A host namespace for the agent and a namespace prefix of its own; every namespace with the
/// prefix is deleted on drop, also when the test fails. (A killed run's namespaces are swept
/// by the harness: the prefix comes from `unique_name`.)
struct Agent {
    host: NetNs,
    net: ComputeNet,
    prefix: String,
}

impl Agent {
    fn new(tag: &str) -> Agent {
        let host = NetNs::new(&format!("{tag}h")).unwrap();
        let prefix = format!("{}-", unique_name(tag));
        let net = ComputeNet::new(&prefix);
        Agent { host, net, prefix }
    }

    /// Runs `fut` as the agent would: polled on a thread inside the host namespace.
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.host.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a tokio runtime")
                .block_on(fut)
        })
    }

    fn ensure(&self, spec: &InstanceNet) -> Result<Ensured, ComputeError> {
        self.run(self.net.ensure(spec))
    }

    fn remove(&self, id: &str) -> Result<bool, ComputeError> {
        self.run(self.net.remove(id))
    }

    fn existing(&self) -> Vec<String> {
        self.run(self.net.existing()).unwrap()
    }

    fn spec(&self, id: &str) -> InstanceNet {
        InstanceNet {
            instance_id: id.into(),
            netns: self.net.netns_name(id),
            host_ifname: host_ifname(id),
            mac: MAC,
            ip: IP,
            prefix_len: 24,
            gateway: GATEWAY,
            mtu: 1500,
        }
    }

    /// `ip -j -d ARGS` in the host namespace.
    fn host_json(&self, args: &[&str]) -> Value {
        ip_json(self.host.name(), args)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Ok(entries) = fs::read_dir("/run/netns") else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.prefix) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

/// `ip -n NETNS -j -d ARGS`, parsed; panics if it fails.
fn ip_json(netns: &str, args: &[&str]) -> Value {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "-d"])
        .args(args)
        .output()
        .expect("running ip");
    assert!(out.status.success(), "ip -n {netns} {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("ip -j prints JSON")
}

/// `ip -n NETNS ARGS`, expected to succeed.
fn ip_ok(netns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .expect("running ip");
    assert!(out.status.success(), "ip -n {netns} {args:?}: {out:?}");
}

/// The one interface of `ip -j link show dev X` output.
fn only(links: &Value) -> &Value {
    let links = links.as_array().expect("an array");
    assert_eq!(links.len(), 1, "{links:?}");
    &links[0]
}

fn is_up(link: &Value) -> bool {
    link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP"))
}

/// The IPv4 addresses (`a.b.c.d/len`) of `eth0` in `netns`.
fn eth0_addrs(netns: &str) -> Vec<String> {
    let link = ip_json(netns, &["addr", "show", "dev", INSTANCE_IFNAME]);
    only(&link)["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The default routes of `netns` as `(gateway, dev)`.
fn default_routes(netns: &str) -> Vec<(String, String)> {
    ip_json(netns, &["-4", "route", "show", "default"])
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("gateway"), s("dev"))
        })
        .collect()
}

/// `net.ipv6.conf.IFNAME.disable_ipv6` in `netns`.
fn ipv6_disabled(netns: &str, ifname: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat"])
        .arg(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"))
        .output()
        .expect("running ip netns exec");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

/// Asserts that the instance's network is exactly as `spec` says, with the host side at
/// `host_ifindex`.
fn assert_converged(agent: &Agent, spec: &InstanceNet, host_ifindex: u32) {
    let ns = spec.netns.as_str();
    assert!(Path::new("/run/netns").join(ns).exists(), "{ns} missing");

    let host = agent.host_json(&["link", "show", "dev", &spec.host_ifname]);
    let host = only(&host);
    assert_eq!(host["ifindex"], host_ifindex);
    assert_eq!(host["mtu"], spec.mtu);
    assert!(is_up(host), "{host}");
    assert_eq!(host["linkinfo"]["info_kind"], "veth");
    assert_eq!(
        host["ifalias"],
        format!("vpc-instance:{}", spec.instance_id)
    );
    assert!(ipv6_disabled(agent.host.name(), &spec.host_ifname));

    let eth0 = ip_json(ns, &["link", "show", "dev", INSTANCE_IFNAME]);
    let eth0 = only(&eth0);
    let mac = spec.mac.map(|b| format!("{b:02x}")).join(":");
    assert_eq!(eth0["address"], mac);
    assert_eq!(eth0["mtu"], spec.mtu);
    assert!(is_up(eth0), "{eth0}");
    // Each end is the other's peer.
    assert_eq!(eth0["link_index"], host_ifindex);
    assert_eq!(host["link_index"], eth0["ifindex"]);
    assert!(ipv6_disabled(ns, INSTANCE_IFNAME));
    assert_eq!(eth0_addrs(ns), [format!("{}/{}", spec.ip, spec.prefix_len)]);
    assert_eq!(
        default_routes(ns),
        [(spec.gateway.to_string(), INSTANCE_IFNAME.to_owned())]
    );
    let lo = ip_json(ns, &["link", "show", "dev", "lo"]);
    assert!(is_up(only(&lo)));
}

/// Whether `ifname` exists in the test process's own namespace.
fn exists_here(ifname: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", ifname])
        .output()
        .expect("running ip")
        .status
        .success()
}

#[test]
fn ensure_creates_then_changes_nothing() {
    let agent = Agent::new("cnl");
    let spec = agent.spec(ID);
    assert_eq!(agent.existing(), Vec::<String>::new());

    let first = agent.ensure(&spec).unwrap();
    assert_eq!(first.applied[..2], [Action::AddNetns, Action::AddVethPair]);
    assert_converged(&agent, &spec, first.host_ifindex);
    // The host side is in the agent's namespace, not the test's.
    assert!(!exists_here(&spec.host_ifname));

    let second = agent.ensure(&spec).unwrap();
    assert_eq!(second.applied, []);
    assert!(!second.changed());
    assert_eq!(second.host_ifindex, first.host_ifindex);

    // The instance reaches the host side: give it the gateway's address for a moment.
    ip_ok(
        agent.host.name(),
        &["addr", "add", "10.0.0.1/24", "dev", &spec.host_ifname],
    );
    let ping = Command::new("ip")
        .args(["netns", "exec", &spec.netns])
        .args(["ping", "-n", "-q", "-c", "1", "-W", "2", "10.0.0.1"])
        .output()
        .expect("running ping");
    assert!(ping.status.success(), "{ping:?}");
    ip_ok(
        agent.host.name(),
        &["addr", "del", "10.0.0.1/24", "dev", &spec.host_ifname],
    );

    assert_eq!(agent.existing(), [ID]);
}

#[test]
fn ensure_corrects_changed_specs() {
    let agent = Agent::new("cnc");
    let mut spec = agent.spec(ID);
    let ifindex = agent.ensure(&spec).unwrap().host_ifindex;

    spec.mtu = 1400;
    let done = agent.ensure(&spec).unwrap();
    assert_eq!(
        done.applied,
        [Action::SetHostMtu(1400), Action::SetEth0Mtu(1400)]
    );
    assert_eq!(done.host_ifindex, ifindex);
    assert_converged(&agent, &spec, ifindex);

    spec.ip = Ipv4Addr::new(10, 0, 0, 20);
    spec.mac = [0x02, 0, 0, 0, 0, 0x20];
    let done = agent.ensure(&spec).unwrap();
    assert!(
        done.applied.contains(&Action::AddAddr(spec.ip, 24)),
        "{done:?}"
    );
    assert!(
        done.applied.contains(&Action::SetEth0Mac(spec.mac)),
        "{done:?}"
    );
    assert_converged(&agent, &spec, ifindex);

    // Another subnet and gateway.
    spec.ip = Ipv4Addr::new(172, 16, 5, 9);
    spec.prefix_len = 20;
    spec.gateway = Ipv4Addr::new(172, 16, 0, 1);
    agent.ensure(&spec).unwrap();
    assert_converged(&agent, &spec, ifindex);
    assert!(!agent.ensure(&spec).unwrap().changed());
}

#[test]
fn ensure_repairs_damage() {
    let agent = Agent::new("cnr");
    let spec = agent.spec(ID);
    let ns = spec.netns.as_str();
    let ifindex = agent.ensure(&spec).unwrap().host_ifindex;

    // Link down (the kernel flushes its routes), lo down, a stray route, an extra address,
    // IPv6 back on, the alias gone.
    ip_ok(ns, &["link", "set", "dev", "lo", "down"]);
    ip_ok(ns, &["addr", "add", "10.0.0.77/24", "dev", "eth0"]);
    ip_ok(ns, &["link", "set", "dev", "eth0", "down"]);
    ip_ok(
        ns,
        &["route", "add", "unreachable", "default", "metric", "50"],
    );
    ip_ok(
        agent.host.name(),
        &["link", "set", "dev", &spec.host_ifname, "alias", ""],
    );
    agent
        .host
        .sysctl(
            &format!("net.ipv6.conf.{}.disable_ipv6", spec.host_ifname),
            "0",
        )
        .unwrap();
    let done = agent.ensure(&spec).unwrap();
    assert_eq!(done.host_ifindex, ifindex);
    assert!(done.applied.contains(&Action::DisableHostIpv6), "{done:?}");
    assert!(done.applied.contains(&Action::SetHostAlias), "{done:?}");
    assert_converged(&agent, &spec, ifindex);

    // The pair deleted: recreated.
    ip_ok(
        agent.host.name(),
        &["link", "del", "dev", &spec.host_ifname],
    );
    let done = agent.ensure(&spec).unwrap();
    assert_eq!(done.applied[0], Action::AddVethPair);
    assert_converged(&agent, &spec, done.host_ifindex);

    // The namespace deleted behind the agent's back: its veth goes with it (eventually); a
    // new namespace and pair replace both.
    ip_ok(agent.host.name(), &["netns", "del", ns]);
    let done = agent.ensure(&spec).unwrap();
    assert_eq!(done.applied[0], Action::AddNetns);
    assert_converged(&agent, &spec, done.host_ifindex);

    // A stale namespace file (not a mount) is replaced.
    let stale = agent.spec("i-stale");
    fs::write(Path::new("/run/netns").join(&stale.netns), b"").unwrap();
    let done = agent.ensure(&stale).unwrap();
    assert_eq!(
        done.applied[..3],
        [
            Action::DeleteStaleNetns,
            Action::AddNetns,
            Action::AddVethPair
        ]
    );
    assert_converged(&agent, &stale, done.host_ifindex);
}

#[test]
fn remove_deletes_namespace_and_veth() {
    let agent = Agent::new("cnd");
    let spec = agent.spec(ID);
    let other = agent.spec("i-other");
    agent.ensure(&spec).unwrap();
    agent.ensure(&other).unwrap();
    // A file with the prefix that is not an instance id, and a namespace without the prefix.
    fs::write(
        Path::new("/run/netns").join(format!("{}not.an.id", agent.prefix)),
        b"",
    )
    .unwrap();
    assert_eq!(agent.existing(), ["i-0a1b2c3d4e5f60718", "i-other"]);

    assert!(agent.remove(ID).unwrap());
    assert!(!Path::new("/run/netns").join(&spec.netns).exists());
    let out = agent
        .host
        .exec_unchecked("ip", ["link", "show", "dev", spec.host_ifname.as_str()])
        .unwrap();
    assert!(!out.status.success(), "{} still there", spec.host_ifname);
    assert_eq!(agent.existing(), ["i-other"]);
    // The other instance is untouched.
    assert!(!agent.ensure(&other).unwrap().changed());

    // Idempotent.
    assert!(!agent.remove(ID).unwrap());
    assert!(agent.remove("i-other").unwrap());
    assert_eq!(agent.existing(), Vec::<String>::new());
    assert!(agent.remove("../x").is_err());
}

#[test]
fn host_name_of_another_instance_is_left_alone() {
    let agent = Agent::new("cnx");
    let spec = agent.spec(ID);
    // As if another instance id hashed to the same name.
    let host = agent.host.name();
    ip_ok(
        host,
        &[
            "link",
            "add",
            &spec.host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            "vx0",
        ],
    );
    ip_ok(
        host,
        &[
            "link",
            "set",
            "dev",
            &spec.host_ifname,
            "alias",
            "vpc-instance:i-x",
        ],
    );
    let err = agent.ensure(&spec).unwrap_err();
    assert!(matches!(err, ComputeError::HostIfnameTaken { .. }), "{err}");
    assert!(!Path::new("/run/netns").join(&spec.netns).exists());
    assert!(!agent.remove(ID).unwrap());
    let link = agent.host_json(&["link", "show", "dev", &spec.host_ifname]);
    assert_eq!(only(&link)["link"], "vx0");

    // Unlabelled, the name counts as this instance's (e.g. a crash before labelling): replaced.
    ip_ok(
        host,
        &["link", "set", "dev", &spec.host_ifname, "alias", ""],
    );
    let done = agent.ensure(&spec).unwrap();
    assert_eq!(
        done.applied[..3],
        [
            Action::AddNetns,
            Action::DeleteHostLink,
            Action::AddVethPair
        ]
    );
    assert_converged(&agent, &spec, done.host_ifindex);
}

#[test]
fn invalid_specs_run_nothing() {
    let agent = Agent::new("cni");
    let mut spec = agent.spec(ID);
    spec.gateway = Ipv4Addr::new(10, 9, 9, 1);
    let err = agent.ensure(&spec).unwrap_err();
    assert!(matches!(err, ComputeError::InvalidSpec(_)), "{err}");
    assert!(!Path::new("/run/netns").join(&spec.netns).exists());
    assert!(agent.run(ComputeNet::new("bad/prefix").existing()).is_err());
}
