//! The `vpc` CLI's API commands against the real control plane (embedded store) in a fresh
//! network namespace: the CLI runs inside the namespace with VPC_ENDPOINT/VPC_TOKEN.
//!
//! Checks: create a VPC, a subnet, a security group and an ingress rule; list them as
//! tables and as JSON; describe; paging; errors (bad CIDR names `cidr_block`, unknown id,
//! deleting a VPC in use, no token, no server) and their exit codes; delete in order.

use std::{path::PathBuf, process::Output};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use vpc_tests::cluster::{ControlPlane, TOKEN_A, TempDir, write_credentials};
use vpc_tests::netns::NetNs;
use vpc_tests::procs::workspace_bin;

/// The `vpc` binary run in a namespace against one control plane.
struct Vpc<'a> {
    ns: &'a NetNs,
    bin: PathBuf,
    url: String,
    token: Option<&'a str>,
}

impl Vpc<'_> {
    fn run(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.ns.command(&self.bin);
        cmd.args(args).env("VPC_ENDPOINT", &self.url);
        match self.token {
            Some(t) => cmd.env("VPC_TOKEN", t),
            None => cmd.env_remove("VPC_TOKEN"),
        };
        cmd.output()
            .with_context(|| format!("running vpc {args:?}"))
    }

    /// Stdout of a successful run.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "vpc {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `vpc -o json ARGS`, parsed.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("vpc {args:?}: not JSON: {text}"))
    }

    /// A failing run: its exit code and stderr.
    fn fails(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.run(args)?;
        ensure!(
            !out.status.success(),
            "vpc {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok((
            out.status.code().context("killed by a signal")?,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Result<&'a str> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .with_context(|| format!("no string at {ptr} in {v}"))
}

/// The table row (after the header) whose first column is `id`.
fn row<'a>(table: &'a str, id: &str) -> Result<&'a str> {
    table
        .lines()
        .skip(1)
        .find(|l| l.split_whitespace().next() == Some(id))
        .with_context(|| format!("no row for {id} in\n{table}"))
}

#[test]
fn cli_drives_the_api() -> Result<()> {
    let ns = NetNs::new("cli")?;
    ns.link_up("lo")?;
    let dir = TempDir::new("cli")?;
    let creds = dir.path().join("credentials.json");
    write_credentials(&creds)?;
    let args = vec![
        "--store".to_owned(),
        format!("redb:{}", dir.path().join("store.redb").display()),
        "--credentials".into(),
        creds.display().to_string(),
    ];
    let cp = ControlPlane::start(&ns, "127.0.0.1:7420", &args)?;
    let vpc = Vpc {
        ns: &ns,
        bin: workspace_bin("VPC_CLI_BIN", "vpc")?,
        url: cp.url.clone(),
        token: Some(TOKEN_A),
    };

    // Create: VPC (JSON), subnet, security group, an ingress rule.
    let created = vpc.json(&[
        "vpcs",
        "create",
        "--cidr",
        "10.0.0.0/16",
        "--tag",
        "Name=cli",
    ])?;
    let vpc_id = str_at(&created, "/vpc/vpcId")?.to_owned();
    ensure!(vpc_id.starts_with("vpc-"), "{created}");
    ensure!(str_at(&created, "/vpc/cidrBlock")? == "10.0.0.0/16");
    ensure!(str_at(&created, "/vpc/tags/0/value")? == "cli");
    let default_sg = str_at(&created, "/vpc/defaultSecurityGroupId")?.to_owned();

    // Table output of a create: the header and the new subnet's row.
    let table = vpc.ok(&[
        "subnets",
        "create",
        "--vpc",
        &vpc_id,
        "--cidr",
        "10.0.1.0/24",
    ])?;
    ensure!(table.starts_with("SUBNET ID"), "{table}");
    let subnet_id = table
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no subnet row in\n{table}"))?
        .to_owned();
    ensure!(subnet_id.starts_with("subnet-"), "{table}");
    ensure!(row(&table, &subnet_id)?.contains("10.0.1.0/24"), "{table}");

    let sg = vpc.json(&[
        "security-groups",
        "create",
        "--vpc",
        &vpc_id,
        "--name",
        "web",
        "--description",
        "web servers",
    ])?;
    let sg_id = str_at(&sg, "/securityGroup/groupId")?.to_owned();
    let rules = vpc.json(&[
        "security-groups",
        "authorize-ingress",
        &sg_id,
        "--protocol",
        "tcp",
        "--port",
        "22-23",
        "--cidr",
        "10.0.0.0/8",
    ])?;
    let rule_id = str_at(&rules, "/rules/0/securityGroupRuleId")?.to_owned();
    ensure!(
        rules.pointer("/rules/0/fromPort") == Some(&Value::from(22)),
        "{rules}"
    );
    ensure!(
        rules.pointer("/rules/0/toPort") == Some(&Value::from(23)),
        "{rules}"
    );
    // A rule from another group, as a table.
    let t = vpc.ok(&[
        "sg",
        "authorize-ingress",
        &sg_id,
        "--protocol",
        "tcp",
        "--port",
        "443",
        "--source-group",
        &default_sg,
    ])?;
    ensure!(t.starts_with("RULE ID"), "{t}");
    ensure!(t.contains(&default_sg) && t.contains("443"), "{t}");

    // List as tables.
    let t = vpc.ok(&["vpcs", "list"])?;
    ensure!(t.starts_with("VPC ID"), "{t}");
    let r = row(&t, &vpc_id)?;
    ensure!(
        r.contains("10.0.0.0/16") && r.contains("cli") && r.contains("available"),
        "{t}"
    );
    let t = vpc.ok(&["subnets", "list", "--vpc", &vpc_id])?;
    ensure!(row(&t, &subnet_id)?.contains(&vpc_id), "{t}");
    let t = vpc.ok(&["security-groups", "list", "--vpc", &vpc_id])?;
    let r = row(&t, &sg_id)?;
    ensure!(r.contains("web") && r.contains("web servers"), "{t}");
    row(&t, &default_sg)?;
    let t = vpc.ok(&["security-groups", "describe", &sg_id])?;
    ensure!(t.contains(&rule_id) && t.contains("10.0.0.0/8"), "{t}");
    let t = vpc.ok(&["route-tables", "list", "--vpc", &vpc_id])?;
    ensure!(t.contains("10.0.0.0/16->local"), "{t}");
    // Tags are updated in place.
    vpc.ok(&[
        "tags",
        "create",
        &vpc_id,
        "--tag",
        "Name=renamed",
        "--tag",
        "env=test",
    ])?;
    let t = vpc.ok(&["vpcs", "list"])?;
    ensure!(row(&t, &vpc_id)?.contains("renamed"), "{t}");
    vpc.ok(&["tags", "delete", &vpc_id, "--tag", "Name=renamed"])?;
    vpc.ok(&["tags", "create", &vpc_id, "--tag", "Name=cli"])?;

    // ... and as JSON.
    let v = vpc.json(&["vpcs", "list"])?;
    let vpcs = v["vpcs"].as_array().context("vpcs")?;
    ensure!(
        vpcs.len() == 1 && vpcs[0]["vpcId"] == vpc_id.as_str(),
        "{v}"
    );
    let v = vpc.json(&["vpcs", "describe", &vpc_id])?;
    ensure!(v["vpcs"][0]["vpcId"] == vpc_id.as_str(), "{v}");
    let v = vpc.json(&["subnets", "list", "--vpc", &vpc_id])?;
    ensure!(
        v["subnets"].as_array().map(Vec::len) == Some(1)
            && v["subnets"][0]["subnetId"] == subnet_id.as_str(),
        "{v}"
    );
    let v = vpc.json(&["security-groups", "list", "--vpc", &vpc_id])?;
    let groups = v["securityGroups"].as_array().context("securityGroups")?;
    ensure!(groups.len() == 2, "{v}");
    let web = groups
        .iter()
        .find(|g| g["groupId"] == sg_id.as_str())
        .context("web group")?;
    ensure!(
        web["ingressRules"].as_array().map(Vec::len) == Some(2),
        "{v}"
    );
    ensure!(web["ingressRules"][0]["ipProtocol"] == "tcp", "{v}");

    // Paging: every page by default (2 at a time here), one page with --max-results. Volumes
    // live on a host: register one (no agent runs here; the volumes stay `creating`).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(vpc_tests::cluster::register_host(
            &ns.path(),
            &cp.url,
            "host-0",
        ))?;
    for _ in 0..5 {
        vpc.ok(&["volumes", "create", "--size", "1"])?;
    }
    let v = vpc.json(&["volumes", "list", "--page-size", "2"])?;
    ensure!(v["volumes"].as_array().map(Vec::len) == Some(5), "{v}");
    let out = vpc.run(&["-o", "json", "volumes", "list", "--max-results", "2"])?;
    ensure!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["volumes"].as_array().map(Vec::len) == Some(2), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let token = stderr
        .trim()
        .strip_prefix("more results: --starting-token ")
        .with_context(|| format!("no next token: {stderr}"))?;
    let v = vpc.json(&[
        "volumes",
        "list",
        "--max-results",
        "2",
        "--starting-token",
        token,
    ])?;
    ensure!(v["volumes"].as_array().map(Vec::len) == Some(2), "{v}");

    // Errors: a bad CIDR names the field (exit 2), an unknown id, a VPC in use.
    let (code, err) = vpc.fails(&["vpcs", "create", "--cidr", "10.0.0.0/33"])?;
    ensure!(code == 2, "exit {code}: {err}");
    ensure!(err.starts_with("error: INVALID_ARGUMENT: "), "{err}");
    ensure!(err.contains("\n  field cidr_block: "), "{err}");
    let (code, err) = vpc.fails(&[
        "subnets",
        "create",
        "--vpc",
        &vpc_id,
        "--cidr",
        "192.168.0.0/24",
    ])?;
    ensure!(
        code == 2 && err.contains("field cidr_block"),
        "exit {code}: {err}"
    );
    let (code, err) = vpc.fails(&["vpcs", "describe", "vpc-0123456789abcdef0"])?;
    ensure!(
        code == 2 && err.starts_with("error: NOT_FOUND: "),
        "exit {code}: {err}"
    );
    let (code, err) = vpc.fails(&["vpcs", "delete", &vpc_id])?;
    ensure!(
        code == 2 && err.starts_with("error: FAILED_PRECONDITION: "),
        "exit {code}: {err}"
    );
    // A usage error (clap) is 2 as well; a port range the wrong way round.
    let (code, err) = vpc.fails(&[
        "sg",
        "authorize-ingress",
        &sg_id,
        "--protocol",
        "tcp",
        "--port",
        "30-20",
        "--cidr",
        "0.0.0.0/0",
    ])?;
    ensure!(code == 2 && err.contains("reversed"), "exit {code}: {err}");
    // No token: UNAUTHENTICATED (2). No server: 1.
    let anonymous = Vpc {
        token: None,
        bin: vpc.bin.clone(),
        url: vpc.url.clone(),
        ..vpc
    };
    let (code, err) = anonymous.fails(&["vpcs", "list"])?;
    ensure!(
        code == 2 && err.starts_with("error: UNAUTHENTICATED: "),
        "exit {code}: {err}"
    );
    let nowhere = Vpc {
        url: "http://127.0.0.1:1".into(),
        bin: vpc.bin.clone(),
        token: vpc.token,
        ..vpc
    };
    let (code, err) = nowhere.fails(&["vpcs", "list"])?;
    ensure!(
        code == 1 && err.starts_with("error: "),
        "exit {code}: {err}"
    );

    // Delete in order.
    let out = vpc.ok(&["security-groups", "revoke-ingress", &sg_id, &rule_id])?;
    ensure!(out.contains("revoked"), "{out}");
    let v = vpc.json(&["security-groups", "describe", &sg_id])?;
    ensure!(
        v["securityGroups"][0]["ingressRules"]
            .as_array()
            .map(Vec::len)
            == Some(1),
        "{v}"
    );
    // The other rule references the default group, which is not deleted: fine.
    let out = vpc.ok(&["security-groups", "delete", &sg_id])?;
    ensure!(out.starts_with(&format!("{sg_id} deleted")), "{out}");
    vpc.ok(&["subnets", "delete", &subnet_id])?;
    let v = vpc.json(&["vpcs", "delete", &vpc_id])?;
    ensure!(v == serde_json::json!({}), "{v}");
    let v = vpc.json(&["vpcs", "list"])?;
    ensure!(v["vpcs"].as_array().map(Vec::len) == Some(0), "{v}");
    drop(cp);
    Ok(())
}
