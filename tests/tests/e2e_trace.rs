//! `vpc trace` and per-VPC conntrack budgets on a real appliance (the control plane and
//! agents in namespaces, real instances).
//!
//! Trace: an allowed cross-host TCP flow shows every stage (endpoint, route to the other
//! host, the sender's outbound rules, encapsulation, then on the destination host the
//! receiver's ACL and security-group rule) and is delivered (exit 0); a flow no security
//! group rule allows is dropped as `sg_ingress` on the destination host (exit 3); a flow an
//! ACL rule denies names the rule number; a trace to a load balancer names the target
//! chosen; and no trace leaves conntrack or load-balancer flow state behind.
//!
//! Budget: two VPCs on one host; VPC A's budget is 1 % of the table; its instance opens
//! more UDP flows than that (a bounded loop over source ports): the excess is refused as
//! `ct_budget_exceeded` and counted, VPC B still opens new flows, and `vpc conntrack top`
//! shows A at its limit with the flooding source on top.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use controlplane::datapath::{PinLayout, PolicyMaps};
use serde_json::Value;
use vpc_tests::cluster::Cluster;

const WAIT: Duration = Duration::from_secs(40);

/// `vpc ARGS`: (exit code, stdout, stderr).
fn run(c: &Cluster, args: &[&str]) -> Result<(i32, String, String)> {
    let out = c.cli(args)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A successful `vpc ARGS -o json`, parsed.
fn json(c: &Cluster, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend_from_slice(&["-o", "json"]);
    let (code, out, err) = run(c, &all)?;
    ensure!(code == 0, "vpc {all:?} exited {code}: {out}{err}");
    serde_json::from_str(&out).with_context(|| format!("vpc {all:?}: {out}"))
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

/// `vpc trace ... -o json`: (exit code, response).
fn trace(c: &Cluster, from: &str, to: &str, proto: &str, port: u16) -> Result<(i32, Value)> {
    let port = port.to_string();
    let mut args = vec!["trace", "--from", from, "--to", to, "--proto", proto];
    if proto != "icmp" {
        args.extend_from_slice(&["--port", &port, "--source-port", "41234"]);
    }
    args.extend_from_slice(&["-o", "json"]);
    let (code, out, err) = run(c, &args)?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("vpc {args:?} exited {code}: {out}{err}"))?;
    Ok((code, v))
}

/// The stage named `name` of a trace, on `host`.
fn stage<'a>(t: &'a Value, host: &str, name: &str) -> Option<&'a Value> {
    t["stages"]
        .as_array()?
        .iter()
        .find(|st| st["hostId"] == host && st["stage"] == name)
}

/// Conntrack entries of host `i` (key, entry) as the kernel holds them.
fn conntrack(c: &Cluster, i: usize) -> Result<Vec<(dataplane_common::conntrack::CtKey, u32)>> {
    let maps = PolicyMaps::open(&PinLayout::new(c.pin_dir(i)))?;
    let mut v: Vec<_> = maps
        .conntrack()?
        .into_iter()
        .map(|(k, e)| (k, e.state))
        .collect();
    v.sort();
    Ok(v)
}

/// Whether any conntrack entry of host `i` has port 41234 (the traces' source port).
fn traced_port_tracked(c: &Cluster, i: usize) -> Result<bool> {
    Ok(conntrack(c, i)?
        .iter()
        .any(|(k, _)| k.lo_port == 41234 || k.hi_port == 41234))
}

fn id(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        cur = match p.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[*p],
        };
    }
    s(cur)
}

#[test]
fn trace_explains_delivery_and_drops_without_changing_state() -> Result<()> {
    let c = Cluster::start(2)?;
    let vpc = id(
        &json(&c, &["vpcs", "create", "--cidr", "10.0.0.0/16"])?,
        &["vpc", "vpcId"],
    );
    let sub = |cidr: &str| -> Result<String> {
        Ok(id(
            &json(&c, &["subnets", "create", "--vpc", &vpc, "--cidr", cidr])?,
            &["subnet", "subnetId"],
        ))
    };
    let (sa, sb) = (sub("10.0.1.0/24")?, sub("10.0.2.0/24")?);
    let sg = id(
        &json(
            &c,
            &[
                "security-groups",
                "create",
                "--vpc",
                &vpc,
                "--name",
                "web",
                "--description",
                "web",
            ],
        )?,
        &["securityGroup", "groupId"],
    );
    for port in ["443", "2222"] {
        json(
            &c,
            &[
                "security-groups",
                "authorize-ingress",
                &sg,
                "--protocol",
                "tcp",
                "--port",
                port,
                "--cidr",
                "10.0.0.0/16",
            ],
        )?;
    }
    // Subnet B's ACL: rule 90 denies tcp 2222 inbound, rule 100 allows the rest.
    let acl = id(
        &json(&c, &["network-acls", "create", "--vpc", &vpc])?,
        &["networkAcl", "networkAclId"],
    );
    for (rule, egress, proto, port, action) in [
        ("90", false, "tcp", Some("2222"), "deny"),
        ("100", false, "all", None, "allow"),
        ("100", true, "all", None, "allow"),
    ] {
        let mut args = vec![
            "network-acls",
            "add-entry",
            &acl,
            "--rule",
            rule,
            "--protocol",
            proto,
            "--cidr",
            "0.0.0.0/0",
            "--action",
            action,
        ];
        if let Some(p) = port {
            args.extend_from_slice(&["--port", p]);
        }
        if egress {
            args.push("--egress");
        }
        json(&c, &args)?;
    }
    json(
        &c,
        &["network-acls", "associate", "--subnet", &sb, "--acl", &acl],
    )?;
    let launch = |subnet: &str, host: &str| -> Result<(String, String)> {
        let v = json(
            &c,
            &[
                "instances",
                "run",
                "--subnet",
                subnet,
                "--host",
                host,
                "--security-group",
                &sg,
                "--command",
                "exec sleep 1000",
                "--wait",
            ],
        )?;
        Ok((
            id(&v, &["instances", "0", "instanceId"]),
            id(&v, &["instances", "0", "privateIpAddress"]),
        ))
    };
    let (src, _src_ip) = launch(&sa, "host-0")?;
    let (dst, dst_ip) = launch(&sb, "host-1")?;

    let before = (conntrack(&c, 0)?, conntrack(&c, 1)?);

    // Allowed, across hosts: every stage, delivered.
    let started = std::time::Instant::now();
    let (code, t) = trace(&c, &src, &dst, "tcp", 443)?;
    eprintln!("cross-host trace, CLI round trip: {:?}", started.elapsed());
    ensure!(code == 0, "exit {code}: {t:#}");
    assert_eq!(t["verdict"], "delivered", "{t:#}");
    assert_eq!(t["deliveredTo"], dst.as_str(), "{t:#}");
    for (host, name) in [
        ("host-0", "endpoint"),
        ("host-0", "route"),
        ("host-0", "sg_egress"),
        ("host-0", "encap"),
        ("host-1", "acl_ingress"),
        ("host-1", "sg_ingress"),
        ("host-1", "verdict"),
    ] {
        ensure!(
            stage(&t, host, name).is_some(),
            "no {name} on {host}: {t:#}"
        );
    }
    let route = stage(&t, "host-0", "route").unwrap();
    assert_eq!(route["result"], "remote", "{t:#}");
    ensure!(s(&route["detail"]).contains("host-1"), "{t:#}");
    let sg_in = stage(&t, "host-1", "sg_ingress").unwrap();
    assert_eq!(sg_in["result"], "allow", "{t:#}");
    ensure!(
        s(&sg_in["detail"]).contains(&sg) && s(&sg_in["detail"]).contains("443"),
        "the rule that allowed it: {t:#}"
    );
    let acl_in = stage(&t, "host-1", "acl_ingress").unwrap();
    ensure!(s(&acl_in["detail"]).contains("rule 100"), "{t:#}");

    // No security-group rule allows 8080: dropped on the destination host.
    let (code, t) = trace(&c, &src, &dst_ip, "tcp", 8080)?;
    assert_eq!(code, 3, "{t:#}");
    assert_eq!(
        (s(&t["verdict"]), s(&t["dropReason"]), s(&t["dropHostId"])),
        ("dropped".into(), "sg_ingress".into(), "host-1".into()),
        "{t:#}"
    );
    assert_eq!(stage(&t, "host-1", "sg_ingress").unwrap()["result"], "deny");

    // ICMP echo: no inbound rule of the group allows it.
    let (code, t) = trace(&c, &src, &dst, "icmp", 0)?;
    assert_eq!(
        (code, s(&t["dropReason"])),
        (3, "sg_ingress".into()),
        "{t:#}"
    );
    ensure!(s(&t["packet"]).starts_with("icmp"), "{t:#}");

    // ACL rule 90 denies 2222 (the security group would allow it).
    let (code, t) = trace(&c, &src, &dst, "tcp", 2222)?;
    assert_eq!(code, 3, "{t:#}");
    assert_eq!(t["dropReason"], "acl_ingress", "{t:#}");
    let acl_in = stage(&t, "host-1", "acl_ingress").unwrap();
    assert_eq!(acl_in["result"], "deny", "{t:#}");
    ensure!(s(&acl_in["detail"]).contains("rule 90"), "{t:#}");

    // The table output: one line per stage, exit status as with -o json.
    let (code, text, _) = run(
        &c,
        &[
            "trace", "--from", &src, "--to", &dst, "--proto", "tcp", "--port", "2222", "-o",
            "table",
        ],
    )?;
    assert_eq!(code, 3, "{text}");
    ensure!(
        text.contains("acl_ingress") && text.contains("dropped"),
        "{text}"
    );

    // Nothing tracked by the traces: both hosts' tables are as before.
    assert_eq!(
        (conntrack(&c, 0)?, conntrack(&c, 1)?),
        before,
        "a trace changed conntrack"
    );

    // A load balancer in front of the destination: the trace names the target.
    let tg = id(
        &json(
            &c,
            &[
                "target-groups",
                "create",
                "--name",
                "web",
                "--vpc",
                &vpc,
                "--port",
                "443",
            ],
        )?,
        &["targetGroup", "targetGroupId"],
    );
    json(&c, &["target-groups", "register", &tg, &dst])?;
    let lb = json(
        &c,
        &[
            "load-balancers",
            "create",
            "--name",
            "front",
            "--subnet",
            &sb,
        ],
    )?;
    let (lb_id, vip) = (
        id(&lb, &["loadBalancer", "loadBalancerId"]),
        id(&lb, &["loadBalancer", "vip"]),
    );
    json(
        &c,
        &[
            "load-balancers",
            "add-listener",
            &lb_id,
            "--port",
            "443",
            "--target-group",
            &tg,
        ],
    )?;
    // The listener reaches the hosts' datapaths asynchronously.
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + WAIT;
    let t = loop {
        let (_, t) = trace(&c, &src, &vip, "tcp", 443)?;
        if stage(&t, "host-0", "load_balancer").is_some() {
            break t;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no load_balancer stage: {last:#}"
        );
        last = t;
        std::thread::sleep(Duration::from_millis(500));
    };
    let lbs = stage(&t, "host-0", "load_balancer").unwrap();
    ensure!(
        s(&lbs["detail"]).contains(&dst) && s(&lbs["detail"]).contains(":443"),
        "the target chosen: {t:#}"
    );
    assert_eq!(t["verdict"], "delivered", "{t:#}");
    ensure!(
        !traced_port_tracked(&c, 0)? && !traced_port_tracked(&c, 1)?,
        "a VIP trace left a conntrack entry"
    );
    let lb_maps = controlplane::datapath::LbMaps::open(&PinLayout::new(c.pin_dir(0)))?;
    ensure!(
        !lb_maps
            .flows()?
            .iter()
            .any(|(k, _)| k.sport == 41234 || k.dport == 41234),
        "a VIP trace recorded a balanced flow"
    );

    // Tenant scope: another account cannot trace from (or learn of) this instance.
    let (code, _, err) = run(
        &c,
        &[
            "trace",
            "--from",
            &src,
            "--to",
            &dst,
            "--proto",
            "tcp",
            "--port",
            "443",
            "--token",
            vpc_tests::cluster::TOKEN_B,
        ],
    )?;
    assert_eq!(code, 2, "{err}");
    ensure!(err.contains("NOT_FOUND"), "{err}");
    Ok(())
}

#[test]
fn one_vpc_cannot_fill_the_conntrack_table() -> Result<()> {
    let c = Cluster::start(1)?;
    // A: 1 % of the table; B: the agent's default share.
    let mut nets = Vec::new();
    for share in [Some("1"), None] {
        let mut args = vec!["vpcs", "create", "--cidr", "10.0.0.0/16"];
        if let Some(p) = share {
            args.extend_from_slice(&["--conntrack-share", p]);
        }
        let vpc = id(&json(&c, &args)?, &["vpc", "vpcId"]);
        let subnet = id(
            &json(
                &c,
                &["subnets", "create", "--vpc", &vpc, "--cidr", "10.0.1.0/24"],
            )?,
            &["subnet", "subnetId"],
        );
        let mut ids = Vec::new();
        for _ in 0..2 {
            let v = json(
                &c,
                &[
                    "instances",
                    "run",
                    "--subnet",
                    &subnet,
                    "--command",
                    "exec sleep 1000",
                    "--wait",
                ],
            )?;
            ids.push((
                id(&v, &["instances", "0", "instanceId"]),
                id(&v, &["instances", "0", "privateIpAddress"]),
            ));
        }
        nets.push((vpc, ids));
    }
    let (vpc_a, a) = &nets[0];
    let (vpc_b, b) = &nets[1];
    let described = json(&c, &["vpcs", "describe", vpc_a])?;
    assert_eq!(
        described["vpcs"][0]["conntrackSharePercent"], 1,
        "{described:#}"
    );
    let capacity = PolicyMaps::open(&PinLayout::new(c.pin_dir(0)))?.conntrack_capacity()?;
    let limit = u64::from(capacity) / 100;

    // The budget is in the datapath once the agent applied the VPC.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let budgets = PolicyMaps::open(&PinLayout::new(c.pin_dir(0)))?.ct_budgets()?;
        if budgets.values().any(|b| u64::from(b.limit) == limit) {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no budget of {limit}: {budgets:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // A's first instance opens limit + 500 UDP flows (one datagram from each source port).
    let flows = limit + 500;
    let flood = format!(
        "python3 -c 'import socket\nfor p in range(20000, 20000 + {flows}):\n s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n s.bind((\"0.0.0.0\", p))\n s.sendto(b\"x\", (\"{}\", 9))\n s.close()'",
        a[1].1
    );
    let out = c.exec(0, &a[0].0, &flood)?;
    ensure!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // B still opens new flows: a ping and a new UDP flow pass.
    let out = c.exec(0, &b[0].0, &format!("ping -n -q -c 1 -W 2 {}", b[1].1))?;
    ensure!(
        out.status.success(),
        "VPC B cannot open a flow: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // `vpc conntrack top`: A at its limit, refusals counted, the flooding source on top.
    let deadline = std::time::Instant::now() + WAIT;
    let row = loop {
        let top = json(&c, &["conntrack", "top", "--vpc", vpc_a])?;
        let row = top["vpcs"][0].clone();
        let at_limit = row["budgetLimit"].as_u64() == Some(limit)
            && row["budgetCount"].as_u64() == Some(limit)
            && row["budgetDrops"].as_u64().unwrap_or(0) > 0;
        if at_limit {
            break row;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "A not reported at its limit: {top:#}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(row["topSources"][0]["address"], a[0].1.as_str(), "{row:#}");
    ensure!(
        row["topSources"][0]["flows"].as_u64().unwrap_or(0) >= limit - 5,
        "{row:#}"
    );
    assert_eq!(row["flows"].as_u64(), Some(limit), "{row:#}");
    // The refused flows are counted as ct_budget_exceeded drops (at least the excess).
    ensure!(row["budgetDrops"].as_u64().unwrap() >= 500, "{row:#}");
    let drops = run(&c, &["drops", "--all", "-o", "json"])?.1;
    ensure!(drops.contains("ct_budget_exceeded"), "{drops}");

    // B: its own budget, far from full, nothing refused.
    let top = json(&c, &["conntrack", "top", "--vpc", vpc_b])?;
    let b_row = &top["vpcs"][0];
    ensure!(
        b_row["budgetDrops"].as_u64() == Some(0)
            && b_row["budgetCount"].as_u64().unwrap_or(u64::MAX) < 10,
        "{top:#}"
    );
    // The table view names both.
    let (_, text, _) = run(&c, &["conntrack", "top", "-o", "table"])?;
    ensure!(
        text.contains(vpc_a.as_str()) && text.contains(vpc_b.as_str()) && text.contains("100%"),
        "{text}"
    );
    Ok(())
}
