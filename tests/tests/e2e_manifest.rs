//! `vpc apply/diff/delete -f` against the real control plane (embedded store) in a fresh
//! network namespace, the CLI inside it with VPC_ENDPOINT/VPC_TOKEN. One host is registered
//! (no agent: instances stay pending); while `delete` waits for instances to terminate, a
//! fake agent reports them terminated.
//!
//! Checks: apply of a two-tier manifest creates everything (seen with `list -o json`);
//! re-apply is all `unchanged` and writes nothing (store revision); an edited rule makes
//! only its group `configured`, an edited network ACL entry only the ACL (entries and the
//! subnet association checked); diff's exit codes; immutable fields; invalid files' messages;
//! delete removes everything, then reports `not found`; apply after delete creates again.

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use vpc_proto::v1 as pb;
use vpc_tests::cluster::{
    AGENT_TOKEN, ControlPlane, TOKEN_A, TempDir, channel, register_host, write_credentials,
};
use vpc_tests::netns::NetNs;
use vpc_tests::procs::workspace_bin;

struct Vpc<'a> {
    ns: &'a NetNs,
    bin: PathBuf,
    url: String,
}

impl Vpc<'_> {
    fn run(&self, args: &[&str]) -> Result<Output> {
        self.ns
            .command(&self.bin)
            .args(args)
            .env("VPC_ENDPOINT", &self.url)
            .env("VPC_TOKEN", TOKEN_A)
            .output()
            .with_context(|| format!("running vpc {args:?}"))
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "vpc {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("vpc {args:?}: not JSON: {text}"))
    }

    /// Exit code, stdout, stderr.
    fn code(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = self.run(args)?;
        Ok((
            out.status.code().context("killed by a signal")?,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn revision(&self) -> Result<i64> {
        let v = self.json(&["hosts", "list"])?;
        v["revision"].as_i64().with_context(|| format!("{v}"))
    }
}

const TWO_TIER: &str = r##"# A two-tier application.
kind: Vpc
name: two-tier
spec:
  cidrBlock: 10.0.0.0/16
---
kind: Subnet
name: public
spec: { vpc: two-tier, cidrBlock: 10.0.1.0/24 }
---
kind: Subnet
name: private
spec: { vpc: two-tier, cidrBlock: 10.0.2.0/24 }
---
kind: SecurityGroup
name: web
spec:
  vpc: two-tier
  description: web tier
  ingress:
    - { protocol: tcp, port: 80, cidr: 0.0.0.0/0 }
    - { protocol: icmp, cidr: 10.0.0.0/16 }
---
kind: SecurityGroup
name: db
spec:
  vpc: two-tier
  description: database
  ingress: [ { protocol: tcp, port: 5432, sourceGroup: web, description: from web } ]
  egress: [ { protocol: tcp, port: 443, cidr: 10.0.0.0/8 } ]
---
kind: NetworkAcl
name: private-acl
spec:
  vpc: two-tier
  subnets: [private]
  inbound:
    - { rule: 100, protocol: tcp, port: 5432, cidr: 10.0.1.0/24, action: allow }
    - { rule: 200, protocol: all, cidr: 0.0.0.0/0, action: deny }
  outbound:
    - { rule: 100, protocol: tcp, port: "1024-65535", cidr: 10.0.1.0/24, action: allow }
---
kind: Instance
name: web-1
spec: { subnet: public, securityGroups: [web], instanceType: t3.micro, command: "sleep 1000" }
---
kind: Instance
name: web-2
spec: { subnet: public, securityGroups: [web], userData: "#!/bin/sh\necho hi\n" }
---
kind: Instance
name: db-1
spec: { subnet: private, securityGroups: [db], privateIp: 10.0.2.10 }
---
kind: TargetGroup
name: web
spec:
  vpc: two-tier
  port: 80
  healthCheck: { protocol: HTTP, path: /health }
  targets: [ { instance: web-1 }, { instance: web-2 } ]
---
kind: LoadBalancer
name: front
tags: { tier: front }
spec:
  subnet: public
  listeners: [ { protocol: tcp, port: 80, targetGroup: web } ]
"##;

const KINDS: [&str; 11] = [
    "vpc/two-tier",
    "subnet/public",
    "subnet/private",
    "securitygroup/web",
    "securitygroup/db",
    "networkacl/private-acl",
    "instance/web-1",
    "instance/web-2",
    "instance/db-1",
    "targetgroup/web",
    "loadbalancer/front",
];

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

/// `<kind>/<name> <action>` for every resource of the manifest, in order.
fn expect_lines(out: &str, action: impl Fn(&str) -> &'static str) -> Result<()> {
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == KINDS.len(), "{out}");
    for k in KINDS {
        let want = format!("{k} {}", action(k));
        ensure!(lines.contains(&want.as_str()), "no `{want}` in\n{out}");
    }
    Ok(())
}

fn named<'a>(list: &'a Value, key: &str, name: &str) -> Result<&'a Value> {
    list[key]
        .as_array()
        .with_context(|| format!("{key} in {list}"))?
        .iter()
        .find(|x| {
            x["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["key"] == "Name" && t["value"] == name))
                && x["state"] != "terminated"
        })
        .with_context(|| format!("no {key} named {name} in {list}"))
}

/// Reports the account's shutting-down instances terminated, as host-0's agent would, until
/// stopped.
fn fake_agent(ns: &NetNs, url: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<()>> {
    let (path, url) = (ns.path(), url.to_owned());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                let tenant = channel(&path, &url, TOKEN_A).await?;
                let agent = channel(&path, &url, AGENT_TOKEN).await?;
                let mut inst = pb::instance_service_client::InstanceServiceClient::new(tenant);
                let mut hosts = pb::host_service_client::HostServiceClient::new(agent);
                while !stop.load(Ordering::SeqCst) {
                    let all = inst
                        .describe_instances(pb::DescribeInstancesRequest::default())
                        .await?
                        .into_inner()
                        .instances;
                    let ending: Vec<pb::InstanceStatus> = all
                        .iter()
                        .filter(|i| i.state == "shutting-down")
                        .map(|i| pb::InstanceStatus {
                            instance_id: i.instance_id.clone(),
                            state: "terminated".into(),
                            ..Default::default()
                        })
                        .collect();
                    if !ending.is_empty() {
                        let revision = hosts
                            .describe_hosts(pb::DescribeHostsRequest {})
                            .await?
                            .into_inner()
                            .revision;
                        hosts
                            .report_applied(pb::ReportAppliedRequest {
                                host_id: "host-0".into(),
                                revision,
                                instances: ending,
                                ..Default::default()
                            })
                            .await?;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(())
            })
    })
}

fn delete_all(vpc: &Vpc<'_>, ns: &NetNs, file: &str) -> Result<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let agent = fake_agent(ns, &vpc.url, Arc::clone(&stop));
    let out = vpc.ok(&["delete", "-f", file, "--timeout", "60"]);
    stop.store(true, Ordering::SeqCst);
    agent
        .join()
        .map_err(|_| anyhow::anyhow!("fake agent panicked"))??;
    out
}

#[test]
fn manifests_apply_diff_delete() -> Result<()> {
    let ns = NetNs::new("manifest")?;
    ns.link_up("lo")?;
    let dir = TempDir::new("manifest")?;
    let creds = dir.path().join("credentials.json");
    write_credentials(&creds)?;
    let args = vec![
        "--store".to_owned(),
        format!("redb:{}", dir.path().join("store.redb").display()),
        "--credentials".into(),
        creds.display().to_string(),
    ];
    let cp = ControlPlane::start(&ns, "127.0.0.1:7420", &args)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(register_host(&ns.path(), &cp.url, "host-0"))?;
    let vpc = Vpc {
        ns: &ns,
        bin: workspace_bin("VPC_CLI_BIN", "vpc")?,
        url: cp.url.clone(),
    };
    let file = write(dir.path(), "two-tier.yaml", TWO_TIER)?;

    // diff of a new manifest: everything would be created (exit 1).
    let (code, out, err) = vpc.code(&["diff", "-f", &file])?;
    ensure!(code == 1, "diff exit {code}: {out}{err}");
    ensure!(out.contains("+ vpc/two-tier (create)"), "{out}");

    // Apply: everything created.
    let out = vpc.ok(&["apply", "-f", &file])?;
    expect_lines(&out, |_| "created")?;

    // The objects exist, wired by id.
    let v = vpc.json(&["vpcs", "list"])?;
    let vpc_id = named(&v, "vpcs", "two-tier")?["vpcId"]
        .as_str()
        .context("id")?
        .to_owned();
    ensure!(
        named(&v, "vpcs", "two-tier")?["cidrBlock"] == "10.0.0.0/16",
        "{v}"
    );
    let v = vpc.json(&["subnets", "list", "--vpc", &vpc_id])?;
    let public = named(&v, "subnets", "public")?["subnetId"]
        .as_str()
        .context("id")?
        .to_owned();
    ensure!(
        named(&v, "subnets", "private")?["cidrBlock"] == "10.0.2.0/24",
        "{v}"
    );
    let v = vpc.json(&["security-groups", "list", "--vpc", &vpc_id])?;
    let web = named(&v, "securityGroups", "web")?;
    let web_id = web["groupId"].as_str().context("id")?.to_owned();
    ensure!(
        web["ingressRules"].as_array().map(Vec::len) == Some(2),
        "{web}"
    );
    ensure!(web["egressRules"][0]["ipProtocol"] == "-1", "{web}");
    let db = named(&v, "securityGroups", "db")?;
    ensure!(
        db["ingressRules"].as_array().map(Vec::len) == Some(1),
        "{db}"
    );
    ensure!(
        db["ingressRules"][0]["referencedGroupId"] == web_id.as_str(),
        "{db}"
    );
    ensure!(db["ingressRules"][0]["fromPort"] == 5432, "{db}");
    ensure!(db["ingressRules"][0]["description"] == "from web", "{db}");
    ensure!(
        db["egressRules"].as_array().map(Vec::len) == Some(1),
        "{db}"
    );
    ensure!(db["egressRules"][0]["fromPort"] == 443, "{db}");
    ensure!(
        db["tags"]
            .as_array()
            .context("tags")?
            .iter()
            .any(|t| t["key"] == "vpc:managed-by" && t["value"] == "apply"),
        "{db}"
    );
    let v = vpc.json(&["subnets", "list", "--vpc", &vpc_id])?;
    let private = named(&v, "subnets", "private")?["subnetId"]
        .as_str()
        .context("id")?
        .to_owned();
    let v = vpc.json(&["network-acls", "list", "--vpc", &vpc_id])?;
    let acl = named(&v, "networkAcls", "private-acl")?;
    let acl_id = acl["networkAclId"].as_str().context("id")?.to_owned();
    ensure!(acl["entries"].as_array().map(Vec::len) == Some(3), "{acl}");
    ensure!(acl["subnetIds"] == serde_json::json!([private]), "{acl}");
    let v = vpc.json(&["instances", "list"])?;
    ensure!(v["instances"].as_array().map(Vec::len) == Some(3), "{v}");
    let web1 = named(&v, "instances", "web-1")?;
    ensure!(web1["subnetId"] == public.as_str(), "{web1}");
    ensure!(web1["securityGroupIds"][0] == web_id.as_str(), "{web1}");
    ensure!(web1["command"] == "sleep 1000", "{web1}");
    ensure!(
        named(&v, "instances", "db-1")?["privateIpAddress"] == "10.0.2.10",
        "{v}"
    );
    let v = vpc.json(&["target-groups", "list"])?;
    let tg = named(&v, "targetGroups", "web")?;
    let tg_id = tg["targetGroupId"].as_str().context("id")?.to_owned();
    ensure!(tg["targets"].as_array().map(Vec::len) == Some(2), "{tg}");
    ensure!(tg["healthCheck"]["path"] == "/health", "{tg}");
    let v = vpc.json(&["load-balancers", "list"])?;
    let lb = named(&v, "loadBalancers", "front")?;
    ensure!(lb["subnetId"] == public.as_str(), "{lb}");
    ensure!(
        lb["listeners"][0]["targetGroupId"] == tg_id.as_str(),
        "{lb}"
    );
    ensure!(lb["listeners"][0]["port"] == 80, "{lb}");

    // Re-apply: all unchanged, nothing written.
    let rev = vpc.revision()?;
    let out = vpc.ok(&["apply", "-f", &file])?;
    expect_lines(&out, |_| "unchanged")?;
    let v = vpc.json(&["apply", "-f", &file])?;
    let rows = v.as_array().context("a list")?;
    ensure!(rows.len() == KINDS.len(), "{v}");
    ensure!(rows.iter().all(|r| r["action"] == "unchanged"), "{v}");
    ensure!(
        rows[0]["kind"] == "Vpc" && rows[0]["id"] == vpc_id.as_str(),
        "{v}"
    );
    ensure!(
        vpc.revision()? == rev,
        "re-apply wrote: revision {rev} -> {}",
        vpc.revision()?
    );
    let (code, out, err) = vpc.code(&["diff", "-f", &file])?;
    ensure!(code == 0, "diff exit {code}: {out}{err}");
    ensure!(out.lines().all(|l| l.starts_with("= ")), "{out}");
    // From stdin too.
    let out = vpc
        .ns
        .command(&vpc.bin)
        .args(["diff", "-f", "-"])
        .env("VPC_ENDPOINT", &vpc.url)
        .env("VPC_TOKEN", TOKEN_A)
        .stdin(std::fs::File::open(&file)?)
        .output()?;
    ensure!(out.status.code() == Some(0), "{out:?}");

    // Edit one rule: diff says so (exit 1), apply configures only that group.
    let edited = write(
        dir.path(),
        "edited.yaml",
        &TWO_TIER.replace("port: 80, cidr: 0.0.0.0/0", "port: 8080, cidr: 0.0.0.0/0"),
    )?;
    let (code, out, err) = vpc.code(&["diff", "-f", &edited])?;
    ensure!(code == 1, "diff exit {code}: {out}{err}");
    ensure!(out.contains("~ securitygroup/web (update)"), "{out}");
    ensure!(
        out.contains("- tcp 80 0.0.0.0/0") && out.contains("+ tcp 8080 0.0.0.0/0"),
        "{out}"
    );
    let out = vpc.ok(&["apply", "-f", &edited])?;
    expect_lines(&out, |k| {
        if k == "securitygroup/web" {
            "configured"
        } else {
            "unchanged"
        }
    })?;
    let v = vpc.json(&["security-groups", "describe", &web_id])?;
    let ports: Vec<i64> = v["securityGroups"][0]["ingressRules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|r| r["fromPort"].as_i64())
        .collect();
    ensure!(ports.contains(&8080) && !ports.contains(&80), "{v}");
    // The db group's rule from web survived.
    let v = vpc.json(&["security-groups", "list", "--vpc", &vpc_id])?;
    ensure!(
        named(&v, "securityGroups", "db")?["ingressRules"]
            .as_array()
            .map(Vec::len)
            == Some(1)
    );
    let out = vpc.ok(&["apply", "-f", &edited])?;
    expect_lines(&out, |_| "unchanged")?;

    // Edit one ACL entry: only the ACL is configured (the entry deleted and re-created).
    let acl_edit = write(
        dir.path(),
        "acl.yaml",
        &TWO_TIER
            .replace("port: 80, cidr: 0.0.0.0/0", "port: 8080, cidr: 0.0.0.0/0")
            .replace(
                "{ rule: 100, protocol: tcp, port: 5432,",
                "{ rule: 100, protocol: tcp, port: 5433,",
            ),
    )?;
    let (code, out, err) = vpc.code(&["diff", "-f", &acl_edit])?;
    ensure!(code == 1, "diff exit {code}: {out}{err}");
    ensure!(out.contains("~ networkacl/private-acl (update)"), "{out}");
    ensure!(
        out.contains("- 100 allow tcp 5432 10.0.1.0/24")
            && out.contains("+ 100 allow tcp 5433 10.0.1.0/24"),
        "{out}"
    );
    let out = vpc.ok(&["apply", "-f", &acl_edit])?;
    expect_lines(&out, |k| {
        if k == "networkacl/private-acl" {
            "configured"
        } else {
            "unchanged"
        }
    })?;
    let v = vpc.json(&["network-acls", "describe", &acl_id])?;
    let entries = v["networkAcls"][0]["entries"]
        .as_array()
        .context("entries")?;
    ensure!(entries.len() == 3, "{v}");
    ensure!(
        entries
            .iter()
            .any(|e| e["ruleNumber"] == 100 && e["fromPort"] == 5433 && e["egress"] != true),
        "{v}"
    );
    ensure!(
        v["networkAcls"][0]["subnetIds"] == serde_json::json!([private]),
        "{v}"
    );
    let out = vpc.ok(&["apply", "-f", &acl_edit])?;
    expect_lines(&out, |_| "unchanged")?;
    // Back as in the edited file.
    let out = vpc.ok(&["apply", "-f", &edited])?;
    expect_lines(&out, |k| {
        if k == "networkacl/private-acl" {
            "configured"
        } else {
            "unchanged"
        }
    })?;

    // Immutable fields: an error naming the resource and field, nothing changed (exit 2).
    let moved = write(
        dir.path(),
        "moved.yaml",
        &TWO_TIER.replace("cidrBlock: 10.0.2.0/24", "cidrBlock: 10.0.9.0/24"),
    )?;
    let rev = vpc.revision()?;
    let (code, out, err) = vpc.code(&["apply", "-f", &moved])?;
    ensure!(code == 2, "apply exit {code}: {out}{err}");
    ensure!(
        err.contains("moved.yaml: document 3 (Subnet/private): spec.cidrBlock: field is immutable"),
        "{err}"
    );
    ensure!(!out.contains("subnet/private"), "{out}");
    let (code, out, err) = vpc.code(&["diff", "-f", &moved])?;
    ensure!(code == 2, "diff exit {code}: {out}{err}");
    // (The edited rule was put back: the web group is configured.)
    ensure!(vpc.revision()? > rev, "the other resources were converged");

    // Invalid files: one clear error each, exit 2, no change.
    let rev = vpc.revision()?;
    for (name, text, want) in [
        (
            "kind.yaml",
            "kind: Router\nname: r\n".to_owned(),
            "kind.yaml: document 1: kind: unknown kind \"Router\"",
        ),
        (
            "noname.yaml",
            "kind: Vpc\nspec: {cidrBlock: 10.9.0.0/16}\n".into(),
            "noname.yaml: document 1: name: required (Vpc)",
        ),
        (
            "field.yaml",
            "kind: Vpc\nname: x\nspec: {cidr: 10.9.0.0/16}\n".into(),
            "field.yaml: document 1 (Vpc/x): spec: unknown field `cidr`",
        ),
        (
            "dup.yaml",
            format!("{TWO_TIER}---\nkind: Subnet\nname: public\nspec: {{vpc: two-tier, cidrBlock: 10.0.3.0/24}}\n"),
            "dup.yaml: document 12 (Subnet/public): name: duplicate: Subnet/public is also",
        ),
        (
            "ref.yaml",
            "kind: Vpc\nname: a\nspec: {cidrBlock: 10.9.0.0/16}\n---\nkind: Subnet\nname: s\nspec: {vpc: x, cidrBlock: 10.9.1.0/24}\n".into(),
            "ref.yaml: document 2 (Subnet/s): spec.vpc: no Vpc named \"x\"",
        ),
    ] {
        let f = write(dir.path(), name, &text)?;
        for cmd in ["apply", "diff", "delete"] {
            let (code, out, err) = vpc.code(&[cmd, "-f", &f])?;
            if cmd == "delete" && name == "ref.yaml" {
                // delete does not resolve references: both are not found.
                ensure!(code == 0 && out.contains("vpc/a not found"), "{out}{err}");
                continue;
            }
            ensure!(code == 2, "{cmd} {name}: exit {code}: {out}{err}");
            ensure!(err.contains(want), "{cmd} {name}: {err}");
            ensure!(err.lines().count() == 1, "{cmd} {name}: {err}");
        }
    }
    ensure!(vpc.revision()? == rev, "invalid files wrote");

    // Delete: everything, in reverse order; instances wait for their (fake) agent.
    let out = delete_all(&vpc, &ns, &file)?;
    expect_lines(&out, |_| "deleted")?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines[0] == "loadbalancer/front deleted", "{out}");
    ensure!(lines.last() == Some(&"vpc/two-tier deleted"), "{out}");
    ensure!(
        vpc.json(&["vpcs", "list"])?["vpcs"]
            .as_array()
            .map(Vec::len)
            == Some(0)
    );
    ensure!(
        vpc.json(&["target-groups", "list"])?["targetGroups"]
            .as_array()
            .map(Vec::len)
            == Some(0)
    );
    let v = vpc.json(&["instances", "list"])?;
    ensure!(
        v["instances"]
            .as_array()
            .context("instances")?
            .iter()
            .all(|i| i["state"] == "terminated"),
        "{v}"
    );
    let out = vpc.ok(&["delete", "-f", &file])?;
    expect_lines(&out, |_| "not found")?;

    // Apply after delete creates again (the client tokens of the deleted objects are not
    // reused), and delete cleans up.
    let out = vpc.ok(&["apply", "-f", &file])?;
    expect_lines(&out, |_| "created")?;
    let out = vpc.ok(&["apply", "-f", &file])?;
    expect_lines(&out, |_| "unchanged")?;
    let out = delete_all(&vpc, &ns, &file)?;
    expect_lines(&out, |_| "deleted")?;
    Ok(())
}
