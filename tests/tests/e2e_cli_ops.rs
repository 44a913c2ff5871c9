//! The `vpc` CLI driving a real appliance (control plane and one agent in namespaces):
//! the commands the other CLI tests do not reach, each in the formats users script with.
//!
//! Checks: network ACLs (create, entries, association, describe, delete); security-group
//! rules authorized and revoked; instances run/stop/start/terminate with `--wait`, exec,
//! console; volumes created, attached with `--wait`, detached, waited for and deleted;
//! snapshots created, waited for, listed, deleted; target groups, registration and health;
//! load balancers and listeners; hosts, latency, status, drops; lists in table, wide, json
//! and yaml; errors exit 2 with the field named.

use anyhow::{Result, ensure};
use vpc_tests::cluster::Cluster;

/// A successful `vpc ARGS`: its stdout.
fn ok(c: &Cluster, args: &[&str]) -> Result<String> {
    c.cli_ok(args)
}

/// `vpc ARGS -o json --query Q`, as a plain string (ids, states).
fn q(c: &Cluster, args: &[&str], query: &str) -> Result<String> {
    c.cli_query(args, query)
}

#[test]
fn cli_drives_every_resource() -> Result<()> {
    let c = Cluster::start(1)?;
    let vpc = q(
        &c,
        &["vpcs", "create", "--cidr", "10.0.0.0/16"],
        "vpc.vpcId",
    )?;
    let subnet = q(
        &c,
        &["subnets", "create", "--vpc", &vpc, "--cidr", "10.0.1.0/24"],
        "subnet.subnetId",
    )?;

    // Network ACLs.
    let acl = q(
        &c,
        &["network-acls", "create", "--vpc", &vpc],
        "networkAcl.networkAclId",
    )?;
    for (rule, action) in [("100", "allow"), ("200", "deny")] {
        ok(
            &c,
            &[
                "network-acls",
                "add-entry",
                &acl,
                "--rule",
                rule,
                "--protocol",
                "all",
                "--cidr",
                "0.0.0.0/0",
                "--action",
                action,
            ],
        )?;
    }
    ok(
        &c,
        &[
            "network-acls",
            "associate",
            "--subnet",
            &subnet,
            "--acl",
            &acl,
        ],
    )?;
    let described = ok(&c, &["network-acls", "describe", &acl, "-o", "table"])?;
    ensure!(
        described.contains("200") && described.contains("deny"),
        "{described}"
    );
    let out = c.cli(&[
        "network-acls",
        "add-entry",
        &acl,
        "--rule",
        "40000",
        "--protocol",
        "all",
        "--cidr",
        "0.0.0.0/0",
        "--action",
        "allow",
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("field"),
        "bad rule number: {err}"
    );

    // Security groups: a rule authorized, then revoked.
    let sg = q(
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
        "securityGroup.groupId",
    )?;
    let rule = q(
        &c,
        &[
            "security-groups",
            "authorize-ingress",
            &sg,
            "--protocol",
            "tcp",
            "--port",
            "80",
            "--cidr",
            "10.0.0.0/16",
        ],
        "rules[0].securityGroupRuleId",
    )?;
    ok(&c, &["security-groups", "revoke-ingress", &sg, &rule])?;

    // Instances with --wait; exec; console; stop/start keep the address.
    let inst = q(
        &c,
        &[
            "instances",
            "run",
            "--subnet",
            &subnet,
            "--security-group",
            &sg,
            "--command",
            "echo started; exec sleep 1000",
            "--wait",
        ],
        "instances[0].instanceId",
    )?;
    assert_eq!(
        q(&c, &["instances", "list", &inst], "instances[0].state")?,
        "running"
    );
    let ip = q(
        &c,
        &["instances", "list", &inst],
        "instances[0].privateIpAddress",
    )?;
    assert_eq!(
        ok(&c, &["instances", "exec", &inst, "--", "hostname"])?.trim(),
        format!("ip-{}", ip.replace('.', "-"))
    );
    assert_eq!(
        q(
            &c,
            &["instances", "stop", &inst, "--wait"],
            "instances[0].state"
        )?,
        "stopped"
    );
    assert_eq!(
        q(
            &c,
            &["instances", "start", &inst, "--wait"],
            "instances[0].privateIpAddress"
        )?,
        ip
    );
    let console = ok(&c, &["instances", "console", &inst])?;
    ensure!(console.contains("started"), "console: {console:?}");

    // Volumes and snapshots.
    let vol = q(&c, &["volumes", "create", "--size", "1"], "volume.volumeId")?;
    ok(&c, &["volumes", "wait", &vol, "--state", "available"])?;
    assert_eq!(
        q(
            &c,
            &[
                "volumes",
                "attach",
                &vol,
                "--instance",
                &inst,
                "--device",
                "xvdf",
                "--mount-path",
                "/data",
                "--wait"
            ],
            "volume.attachmentState"
        )?,
        "attached"
    );
    ok(
        &c,
        &[
            "instances",
            "exec",
            &inst,
            "--",
            "echo kept > /data/f && sync",
        ],
    )?;
    let snap = q(
        &c,
        &["snapshots", "create", "--volume", &vol],
        "snapshot.snapshotId",
    )?;
    ok(&c, &["snapshots", "wait", &snap, "--state", "completed"])?;
    ensure!(ok(&c, &["snapshots", "list", "-o", "table"])?.contains(&snap));
    ok(&c, &["volumes", "detach", &vol])?;
    ok(&c, &["volumes", "wait", &vol, "--state", "available"])?;
    ok(&c, &["volumes", "delete", &vol])?;
    ok(&c, &["volumes", "wait", &vol, "--state", "deleted"])?;
    ok(&c, &["snapshots", "delete", &snap])?;
    ok(&c, &["snapshots", "wait", &snap, "--state", "deleted"])?;

    // Target groups, health, load balancers, listeners.
    let tg = q(
        &c,
        &[
            "target-groups",
            "create",
            "--name",
            "web",
            "--vpc",
            &vpc,
            "--port",
            "80",
        ],
        "targetGroup.targetGroupId",
    )?;
    ok(&c, &["target-groups", "register", &tg, &inst])?;
    let health = q(&c, &["target-groups", "health", &tg], "targets[0].state")?;
    assert_eq!(health, "unused", "no listener yet");
    let lb = q(
        &c,
        &[
            "load-balancers",
            "create",
            "--name",
            "front",
            "--subnet",
            &subnet,
        ],
        "loadBalancer.loadBalancerId",
    )?;
    ok(
        &c,
        &[
            "load-balancers",
            "add-listener",
            &lb,
            "--port",
            "80",
            "--target-group",
            &tg,
        ],
    )?;
    ensure!(ok(&c, &["load-balancers", "describe", &lb, "-o", "table"])?.contains("80"));

    // Every list format.
    for fmt in ["table", "wide", "json", "yaml"] {
        let out = ok(&c, &["instances", "list", "-o", fmt])?;
        ensure!(out.contains(&inst), "{fmt}: {out}");
    }
    let yaml: serde_json::Value = serde_yaml::from_str(&ok(&c, &["vpcs", "list", "-o", "yaml"])?)?;
    let json: serde_json::Value = serde_json::from_str(&ok(&c, &["vpcs", "list", "-o", "json"])?)?;
    assert_eq!(yaml, json, "yaml is the json value");

    // Operations views.
    ensure!(ok(&c, &["hosts", "list", "-o", "table"])?.contains("host-0"));
    ok(&c, &["hosts", "latency"])?;
    assert_eq!(q(&c, &["status"], "hosts[0].connected")?, "true");
    ok(&c, &["drops", "--all"])?;

    // Clean up in order.
    ok(&c, &["load-balancers", "delete", &lb])?;
    ok(&c, &["target-groups", "delete", &tg])?;
    assert_eq!(
        q(
            &c,
            &["instances", "terminate", &inst, "--wait"],
            "instances[0].state"
        )?,
        "terminated"
    );
    ok(
        &c,
        &[
            "network-acls",
            "associate",
            "--subnet",
            &subnet,
            "--acl",
            &q(&c, &["vpcs", "list", &vpc], "vpcs[0].defaultNetworkAclId")?,
        ],
    )?;
    ok(&c, &["network-acls", "delete", &acl])?;
    ok(&c, &["security-groups", "delete", &sg])?;
    ok(&c, &["subnets", "delete", &subnet])?;
    ok(&c, &["vpcs", "delete", &vpc])?;
    Ok(())
}
