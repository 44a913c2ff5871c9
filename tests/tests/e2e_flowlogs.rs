//! Flow logs end to end: the real control plane and two agents, a client and a server in
//! two subnets of one VPC on two hosts, the `vpc` CLI.
//!
//! Checks: a VPC flow log (1 s window) records allowed TCP as ACCEPT with the security-group
//! rule on both interfaces, and blocked TCP as REJECT with the rule and reason (the
//! server's security group: `sg_ingress`; the server subnet's ACL rule 90:
//! `acl_ingress`); the records are in the server host's JSON-lines file and in `vpc flows
//! --follow`; another account cannot follow the VPC and sees none of the records; a subnet
//! flow log logs only that subnet's interfaces; deleting a flow log stops its records.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use vpc_tests::{
    cluster::{Cluster, TOKEN_A, TOKEN_B},
    procs::workspace_bin,
};

/// A successful `vpc ARGS`: its stdout.
fn ok(c: &Cluster, args: &[&str]) -> Result<String> {
    c.cli_ok(args)
}

/// `vpc ARGS -o json --query Q` as a string.
fn q(c: &Cluster, args: &[&str], query: &str) -> Result<String> {
    c.cli_query(args, query)
}

/// A `vpc flows --follow` process collecting its JSON lines (killed on drop).
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Follower {
    fn start(c: &Cluster, token: &str, args: &[&str]) -> Result<Follower> {
        let mut cmd = c.fabric_command(workspace_bin("VPC_CLI_BIN", "vpc")?);
        cmd.args(["flows", "--follow", "-o", "json"])
            .args(args)
            .env("VPC_ENDPOINT", c.url())
            .env("VPC_TOKEN", token)
            .env("XDG_CONFIG_HOME", c.dir().join("no-config"))
            .env_remove("VPC_CONFIG")
            .env_remove("VPC_PROFILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting vpc flows --follow")?;
        let out = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Ok(Follower { child, lines })
    }

    fn records(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it returns Some (at most `limit`).
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The metrics of host `i`'s agent (`GET /metrics` from inside the host's namespace, at the
/// address it printed).
fn agent_metrics(c: &Cluster, i: usize) -> Result<String> {
    let addr = c
        .agent_lines(i)
        .iter()
        .find_map(|l| l.strip_prefix("metrics on ").map(str::to_owned))
        .context("the agent printed no `metrics on` line")?;
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", c.host(i).path().display()))
        .args(["curl", "-sf", "--max-time", "10"])
        .arg(format!("http://{addr}/metrics"))
        .output()?;
    ensure!(out.status.success(), "curl: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

/// The value of the unlabelled series `name` in a Prometheus exposition.
fn counter(text: &str, name: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no series {name}"))?
        .trim()
        .parse()
        .with_context(|| format!("value of {name}"))
}

/// The JSON-lines records of a flow log on host `i` (none: no file yet).
fn file_records(c: &Cluster, i: usize, fl: &str) -> Result<Vec<Value>> {
    let path: PathBuf = c.data_dir(i).join("flowlogs").join(format!("{fl}.jsonl"));
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display())))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn s<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str().unwrap_or_default()
}

/// A record of flow log `fl` for this instance, direction, destination port and action.
fn find<'a>(
    recs: &'a [Value],
    fl: &str,
    instance: &str,
    dir: &str,
    port: u16,
    action: &str,
) -> Option<&'a Value> {
    recs.iter().find(|r| {
        s(r, "flow-log-id") == fl
            && s(r, "instance-id") == instance
            && s(r, "flow-direction") == dir
            && r["dstport"] == u64::from(port)
            && s(r, "action") == action
    })
}

const SERVER: &str = "exec /usr/bin/python3 -c \"
import socket, threading
def serve(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', p))
    s.listen(64)
    while True:
        c, _ = s.accept()
        c.sendall(b'hi')
        c.close()
for p in (8080, 7070, 9090):
    threading.Thread(target=serve, args=(p,)).start()
\"";

/// Opens a TCP connection from the client instance; whether it got the server's greeting.
fn connect(c: &Cluster, client: &str, ip: &str, port: u16) -> Result<bool> {
    let out = c.exec(
        0,
        client,
        &format!("timeout 2 bash -c 'exec 3<>/dev/tcp/{ip}/{port}; head -c 2 <&3' 2>/dev/null"),
    )?;
    Ok(out.status.success() && out.stdout == b"hi")
}

#[test]
fn flow_logs_record_accepts_and_rejects_with_rule_and_reason() -> Result<()> {
    let c = Cluster::start(2)?;
    let vpc = q(
        &c,
        &["vpcs", "create", "--cidr", "10.0.0.0/16"],
        "vpc.vpcId",
    )?;
    let sub_a = q(
        &c,
        &["subnets", "create", "--vpc", &vpc, "--cidr", "10.0.1.0/24"],
        "subnet.subnetId",
    )?;
    let sub_b = q(
        &c,
        &["subnets", "create", "--vpc", &vpc, "--cidr", "10.0.2.0/24"],
        "subnet.subnetId",
    )?;
    // The server's subnet denies TCP 9090 in (rule 90) and allows the rest both ways.
    let acl = q(
        &c,
        &["network-acls", "create", "--vpc", &vpc],
        "networkAcl.networkAclId",
    )?;
    for (rule, port, action, egress) in [
        ("90", Some("9090"), "deny", false),
        ("100", None, "allow", false),
        ("100", None, "allow", true),
    ] {
        let mut args = vec![
            "network-acls",
            "add-entry",
            &acl,
            "--rule",
            rule,
            "--cidr",
            "0.0.0.0/0",
            "--action",
            action,
        ];
        match port {
            Some(p) => args.extend_from_slice(&["--protocol", "tcp", "--port", p]),
            None => args.extend_from_slice(&["--protocol", "all"]),
        }
        if egress {
            args.push("--egress");
        }
        ok(&c, &args)?;
    }
    ok(
        &c,
        &[
            "network-acls",
            "associate",
            "--subnet",
            &sub_b,
            "--acl",
            &acl,
        ],
    )?;
    // The server's group allows 8080 and 9090 from the VPC, not 7070.
    let sg = q(
        &c,
        &[
            "security-groups",
            "create",
            "--vpc",
            &vpc,
            "--name",
            "srv",
            "--description",
            "server",
        ],
        "securityGroup.groupId",
    )?;
    for port in ["8080", "9090"] {
        ok(
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
    let server = q(
        &c,
        &[
            "instances",
            "run",
            "--subnet",
            &sub_b,
            "--host",
            &Cluster::host_id(1),
            "--security-group",
            &sg,
            "--command",
            SERVER,
            "--wait",
        ],
        "instances[0].instanceId",
    )?;
    let server_ip = q(
        &c,
        &["instances", "list", &server],
        "instances[0].privateIpAddress",
    )?;
    let client = q(
        &c,
        &[
            "instances",
            "run",
            "--subnet",
            &sub_a,
            "--host",
            &Cluster::host_id(0),
            "--command",
            "exec sleep 100000",
            "--wait",
        ],
        "instances[0].instanceId",
    )?;
    wait_for(Duration::from_secs(30), "the server to answer", || {
        Ok(connect(&c, &client, &server_ip, 8080)?.then_some(()))
    })?;

    // Another account cannot follow this VPC; unfiltered, it sees none of these records.
    let out = {
        let mut cmd = c.fabric_command(workspace_bin("VPC_CLI_BIN", "vpc")?);
        cmd.args(["flows", "--follow", "--vpc", &vpc])
            .env("VPC_ENDPOINT", c.url())
            .env("VPC_TOKEN", TOKEN_B)
            .env("XDG_CONFIG_HOME", c.dir().join("no-config"))
            .stdin(Stdio::null())
            .output()?
    };
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("NOT_FOUND"),
        "tenant B following A's VPC: {err}"
    );
    let other = Follower::start(&c, TOKEN_B, &[])?;
    let follower = Follower::start(&c, TOKEN_A, &["--vpc", &vpc])?;

    // A VPC flow log, all traffic, 1 s windows.
    let fl = q(
        &c,
        &[
            "flow-logs",
            "create",
            "--vpc",
            &vpc,
            "--traffic-type",
            "ALL",
            "--max-aggregation-interval",
            "1",
        ],
        "flowLogs[0].flowLogId",
    )?;
    assert_eq!(
        q(&c, &["flow-logs", "list", &fl], "flowLogs[0].trafficType")?,
        "ALL"
    );

    // Traffic until the records show up (the hosts apply the flow log within a pass).
    let (accept_in, accept_out, sg_reject, acl_reject) =
        wait_for(Duration::from_secs(60), "ACCEPT and REJECT records", || {
            ensure!(connect(&c, &client, &server_ip, 8080)?, "8080 must connect");
            ensure!(
                !connect(&c, &client, &server_ip, 7070)?,
                "7070 must be blocked"
            );
            ensure!(
                !connect(&c, &client, &server_ip, 9090)?,
                "9090 must be blocked"
            );
            let on_server = file_records(&c, 1, &fl)?;
            let on_client = file_records(&c, 0, &fl)?;
            Ok(
                match (
                    find(&on_server, &fl, &server, "ingress", 8080, "ACCEPT"),
                    find(&on_client, &fl, &client, "egress", 8080, "ACCEPT"),
                    find(&on_server, &fl, &server, "ingress", 7070, "REJECT"),
                    find(&on_server, &fl, &server, "ingress", 9090, "REJECT"),
                ) {
                    (Some(a), Some(b), Some(r1), Some(r2)) => {
                        Some((a.clone(), b.clone(), r1.clone(), r2.clone()))
                    }
                    _ => None,
                },
            )
        })?;
    // AWS fields and ours.
    for r in [&accept_in, &accept_out, &sg_reject, &acl_reject] {
        assert_eq!(r["version"], 2, "{r}");
        assert_eq!(s(r, "account-id"), vpc_tests::cluster::ACCOUNT_A, "{r}");
        assert_eq!(s(r, "vpc-id"), vpc, "{r}");
        assert_eq!(r["protocol"], 6, "{r}");
        assert!(r["packets"].as_u64().unwrap() >= 1, "{r}");
        assert!(
            r["start"].as_i64().unwrap() <= r["end"].as_i64().unwrap(),
            "{r}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        assert!(
            (now - r["end"].as_i64().unwrap()).abs() < 120,
            "wall-clock times: {r}"
        );
    }
    assert_eq!(
        s(&accept_in, "interface-id"),
        server.replacen("i-", "eni-", 1)
    );
    assert_eq!(s(&accept_in, "subnet-id"), sub_b);
    assert_eq!(s(&accept_in, "srcaddr"), s(&accept_out, "srcaddr"));
    assert_eq!(s(&accept_in, "dstaddr"), server_ip);
    assert_eq!(s(&accept_in, "log-status"), "OK");
    // The connections' first packets name the rules that admitted them (the server's
    // group rule and its subnet's ACL rule; the client's default group), the rest of
    // each connection was admitted by connection tracking.
    let on_server = file_records(&c, 1, &fl)?;
    let on_client = file_records(&c, 0, &fl)?;
    // The server host's agent counts what its consumer did on its metrics endpoint.
    let m = agent_metrics(&c, 1)?;
    let records = counter(&m, "vpc_flowlog_records_total")?;
    ensure!(
        records >= on_server.len() as f64 && counter(&m, "vpc_flowlog_events_total")? >= records,
        "flow-log metrics {records} records for {} in the file:\n{m}",
        on_server.len()
    );
    ensure!(counter(&m, "vpc_flowlog_events_lost_total")? == 0.0, "{m}");
    let rules = |recs: &[Value], inst: &str, dir: &str| -> Vec<(String, u64, u64)> {
        recs.iter()
            .filter(|r| {
                s(r, "instance-id") == inst
                    && s(r, "flow-direction") == dir
                    && r["dstport"] == 8080
                    && s(r, "action") == "ACCEPT"
            })
            .map(|r| {
                (
                    s(r, "rule").to_owned(),
                    r["tcp-flags"].as_u64().unwrap_or(0),
                    r["packets"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let server_rules = rules(&on_server, &server, "ingress");
    let default_sg = q(
        &c,
        &["vpcs", "list", &vpc],
        "vpcs[0].defaultSecurityGroupId",
    )?;
    let default_acl = q(&c, &["vpcs", "list", &vpc], "vpcs[0].defaultNetworkAclId")?;
    // One record per connection and window (AWS): the SYN's rules name it, and the
    // connection's tracked packets are counted in it (AWS flags: SYN 2, ACK not reported).
    ensure!(
        server_rules.iter().any(|(r, flags, packets)| *r
            == format!("{sg} ingress tcp 8080 from 10.0.0.0/16; {acl} rule 100 allow")
            && flags & 0x02 != 0
            && *packets >= 2),
        "the connection's record at the server: {server_rules:?}"
    );
    ensure!(
        server_rules.iter().all(|(r, flags, _)| flags & !0x17 == 0
            && (r.starts_with(&format!("{sg} ingress tcp 8080"))
                || *r == format!("tracked; {acl} rule 100 allow"))),
        "AWS TCP flags and rules only: {server_rules:?}"
    );
    let client_rules = rules(&on_client, &client, "egress");
    ensure!(
        client_rules.iter().any(|(r, _, _)| *r
            == format!("{default_sg} egress all to 0.0.0.0/0; {default_acl} rule 100 allow")),
        "the SYN's rule at the client: {client_rules:?}"
    );
    assert_eq!(s(&accept_out, "subnet-id"), sub_a);
    assert_eq!(s(&sg_reject, "reason"), "sg_ingress", "{sg_reject}");
    assert_eq!(
        s(&sg_reject, "rule"),
        format!("{sg} ingress: no rule allows")
    );
    assert_eq!(s(&acl_reject, "reason"), "acl_ingress", "{acl_reject}");
    assert_eq!(
        s(&acl_reject, "rule"),
        format!("{acl} rule 90 deny"),
        "{acl_reject}"
    );
    // Rejected at the server: the client's own rules admitted those packets.
    ensure!(
        find(&on_client, &fl, &client, "egress", 7070, "ACCEPT").is_some(),
        "client egress 7070"
    );

    // The follower got them too (filtered to the VPC); the other account none.
    wait_for(Duration::from_secs(20), "records at the follower", || {
        let recs = follower.records();
        Ok(
            (find(&recs, &fl, &server, "ingress", 8080, "ACCEPT").is_some()
                && find(&recs, &fl, &server, "ingress", 9090, "REJECT").is_some()
                && find(&recs, &fl, &client, "egress", 8080, "ACCEPT").is_some())
            .then_some(()),
        )
    })?;
    ensure!(follower.records().iter().all(|r| s(r, "vpc-id") == vpc));
    ensure!(
        other.records().is_empty(),
        "tenant B saw {:?}",
        other.records()
    );

    // A subnet flow log (the client's subnet, rejects and accepts) instead of the VPC's.
    ok(&c, &["flow-logs", "delete", &fl])?;
    let fl_a = q(
        &c,
        &[
            "flow-logs",
            "create",
            "--subnet",
            &sub_a,
            "--max-aggregation-interval",
            "1",
        ],
        "flowLogs[0].flowLogId",
    )?;
    wait_for(Duration::from_secs(60), "subnet records", || {
        connect(&c, &client, &server_ip, 8080)?;
        Ok(find(
            &file_records(&c, 0, &fl_a)?,
            &fl_a,
            &client,
            "egress",
            8080,
            "ACCEPT",
        )
        .map(|_| ()))
    })?;
    // Only the client's subnet: the server's host writes nothing for it, the follower sees
    // only subnet A.
    connect(&c, &client, &server_ip, 8080)?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        file_records(&c, 1, &fl_a)?.is_empty(),
        "server host logged the client's subnet"
    );
    let recs: Vec<Value> = follower
        .records()
        .into_iter()
        .filter(|r| s(r, "flow-log-id") == fl_a)
        .collect();
    ensure!(
        !recs.is_empty() && recs.iter().all(|r| s(r, "subnet-id") == sub_a),
        "{recs:?}"
    );
    // The deleted VPC flow log wrote nothing more once the hosts applied the delete.
    let vpc_lines = (
        file_records(&c, 0, &fl)?.len(),
        file_records(&c, 1, &fl)?.len(),
    );

    // Deleting the subnet flow log stops its records.
    ok(&c, &["flow-logs", "delete", &fl_a])?;
    std::thread::sleep(Duration::from_secs(4));
    let before = file_records(&c, 0, &fl_a)?.len();
    for _ in 0..3 {
        connect(&c, &client, &server_ip, 8080)?;
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        file_records(&c, 0, &fl_a)?.len(),
        before,
        "records after the delete"
    );
    assert_eq!(
        (
            file_records(&c, 0, &fl)?.len(),
            file_records(&c, 1, &fl)?.len()
        ),
        vpc_lines,
        "records of the deleted VPC flow log"
    );
    assert_eq!(q(&c, &["flow-logs", "list"], "length(flowLogs)")?, "0");
    ensure!(
        other.records().is_empty(),
        "tenant B saw {:?}",
        other.records()
    );
    let _ = TOKEN_A;
    Ok(())
}
