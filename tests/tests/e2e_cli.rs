//! The `vpc` CLI's API commands against the real control plane (embedded store) in a fresh
//! network namespace: the CLI runs inside the namespace with VPC_ENDPOINT/VPC_TOKEN.
//!
//! Checks: create a VPC, a subnet, a security group and an ingress rule; list them as
//! tables and as JSON; describe; paging; errors (bad CIDR names `cidr_block`, unknown id,
//! deleting a VPC in use, no token, no server) and their exit codes; delete in order.
//! Output: JSON by default when piped, `-o table|wide|json|yaml` for a list and a describe,
//! `--query`; settings from a config file and profiles, and their precedence (flag >
//! environment > profile > top level); `config view`; `completion` and `man`.
//!
//! stdout is a pipe here, so the CLI prints JSON unless told otherwise: table checks pass
//! `-o table` ([`Vpc::table`]).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

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
    /// The command: `VPC_ENDPOINT`, `VPC_TOKEN`, and no config file or other `VPC_*`
    /// settings from the caller's environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.ns.command(&self.bin);
        cmd.args(args).env("VPC_ENDPOINT", &self.url);
        match self.token {
            Some(t) => cmd.env("VPC_TOKEN", t),
            None => cmd.env_remove("VPC_TOKEN"),
        };
        for var in [
            "VPC_CONFIG",
            "VPC_PROFILE",
            "VPC_OUTPUT",
            "VPC_TOKEN_FILE",
            "VPC_TLS_CA",
            "VPC_TLS_CERT",
            "VPC_TLS_KEY",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("XDG_CONFIG_HOME", "/nonexistent-vpc-e2e");
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        self.output(self.command(args), args)
    }

    fn output(&self, mut cmd: Command, args: &[&str]) -> Result<Output> {
        cmd.output()
            .with_context(|| format!("running vpc {args:?}"))
    }

    /// Stdout of a successful `cmd`.
    fn ok_with(&self, cmd: Command, args: &[&str]) -> Result<String> {
        let out = self.output(cmd, args)?;
        if !out.status.success() {
            bail!(
                "vpc {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `vpc -o table ARGS`: stdout of a successful run.
    fn table(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-o", "table"];
        all.extend_from_slice(args);
        self.ok(&all)
    }

    /// Stdout of a successful run.
    fn ok(&self, args: &[&str]) -> Result<String> {
        self.ok_with(self.command(args), args)
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
        self.fails_with(self.command(args), args)
    }

    /// A failing `cmd`: its exit code and stderr.
    fn fails_with(&self, cmd: Command, args: &[&str]) -> Result<(i32, String)> {
        let out = self.output(cmd, args)?;
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
    let table = vpc.table(&[
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
    let t = vpc.table(&[
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
    let t = vpc.table(&["vpcs", "list"])?;
    ensure!(t.starts_with("VPC ID"), "{t}");
    let r = row(&t, &vpc_id)?;
    ensure!(
        r.contains("10.0.0.0/16") && r.contains("cli") && r.contains("available"),
        "{t}"
    );
    let t = vpc.table(&["subnets", "list", "--vpc", &vpc_id])?;
    ensure!(row(&t, &subnet_id)?.contains(&vpc_id), "{t}");
    let t = vpc.table(&["security-groups", "list", "--vpc", &vpc_id])?;
    let r = row(&t, &sg_id)?;
    ensure!(r.contains("web") && r.contains("web servers"), "{t}");
    row(&t, &default_sg)?;
    let t = vpc.table(&["security-groups", "describe", &sg_id])?;
    ensure!(t.contains(&rule_id) && t.contains("10.0.0.0/8"), "{t}");
    let t = vpc.table(&["route-tables", "list", "--vpc", &vpc_id])?;
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
    let t = vpc.table(&["vpcs", "list"])?;
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

    output_formats(&vpc, &vpc_id, &subnet_id)?;
    queries(&vpc, &vpc_id, &subnet_id)?;
    config_file(&vpc, dir.path(), &vpc_id)?;
    completion_and_man(&vpc, dir.path())?;

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
    let out = vpc.table(&["security-groups", "revoke-ingress", &sg_id, &rule_id])?;
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
    let out = vpc.table(&["security-groups", "delete", &sg_id])?;
    ensure!(out.starts_with(&format!("{sg_id} deleted")), "{out}");
    vpc.ok(&["subnets", "delete", &subnet_id])?;
    let v = vpc.json(&["vpcs", "delete", &vpc_id])?;
    ensure!(v == serde_json::json!({}), "{v}");
    let v = vpc.json(&["vpcs", "list"])?;
    ensure!(v["vpcs"].as_array().map(Vec::len) == Some(0), "{v}");
    drop(cp);
    Ok(())
}

/// A list and a describe in every output format; JSON by default on a pipe.
fn output_formats(vpc: &Vpc, vpc_id: &str, subnet_id: &str) -> Result<()> {
    // stdout is a pipe: JSON without -o.
    let piped: Value = serde_json::from_str(&vpc.ok(&["subnets", "list", "--vpc", vpc_id])?)
        .context("the default output on a pipe is not JSON")?;
    let json = vpc.json(&["subnets", "list", "--vpc", vpc_id])?;
    ensure!(piped == json, "{piped} != {json}");
    let owner = str_at(&json, "/subnets/0/ownerId")?.to_owned();
    ensure!(!owner.is_empty(), "{json}");

    for what in [
        vec!["subnets", "list", "--vpc", vpc_id],
        vec!["subnets", "describe", subnet_id],
        vec!["vpcs", "list"],
        vec!["vpcs", "describe", vpc_id],
    ] {
        let json = vpc.json(&what)?;
        // yaml: the same value.
        let mut args = vec!["-o", "yaml"];
        args.extend_from_slice(&what);
        let text = vpc.ok(&args)?;
        let yaml: Value = serde_yaml::from_str(&text)
            .with_context(|| format!("vpc {args:?}: not YAML: {text}"))?;
        ensure!(yaml == json, "vpc {args:?}: {yaml} != {json}");
        // --output is -o; the value is case-insensitive.
        let mut args = vec!["--output", "JSON"];
        args.extend_from_slice(&what);
        let again: Value = serde_json::from_str(&vpc.ok(&args)?)?;
        ensure!(again == json, "vpc {args:?}: {again} != {json}");
    }

    // table and wide lists: wide adds columns, the same rows.
    let t = vpc.table(&["subnets", "list", "--vpc", vpc_id])?;
    ensure!(t.starts_with("SUBNET ID") && !t.contains("OWNER"), "{t}");
    ensure!(row(&t, subnet_id)?.contains("10.0.1.0/24"), "{t}");
    let w = vpc.ok(&["-o", "wide", "subnets", "list", "--vpc", vpc_id])?;
    let header = w.lines().next().unwrap_or_default();
    ensure!(
        header.starts_with("SUBNET ID") && header.contains("OWNER") && header.contains("TAGS"),
        "{w}"
    );
    let r = row(&w, subnet_id)?;
    ensure!(r.contains("10.0.1.0/24") && r.contains(&owner), "{w}");
    ensure!(w.lines().count() == t.lines().count(), "{t}\n{w}");
    let w = vpc.ok(&["-o", "wide", "vpcs", "list"])?;
    ensure!(
        w.lines().next().unwrap_or_default().contains("DEFAULT SG"),
        "{w}"
    );
    // describe: blocks in both.
    for o in ["table", "wide"] {
        let d = vpc.ok(&["-o", o, "subnets", "describe", subnet_id])?;
        ensure!(
            d.contains(&format!("Subnet Id:  {subnet_id}\n")),
            "-o {o}: {d}"
        );
        ensure!(d.contains("Cidr Block:  10.0.1.0/24\n"), "-o {o}: {d}");
    }
    // A write's data as yaml.
    let text = vpc.ok(&["-o", "yaml", "tags", "create", vpc_id, "--tag", "env=yaml"])?;
    let v: Value = serde_yaml::from_str(&text)?;
    ensure!(v["revision"].is_i64(), "{text}");
    // A bad output name is a usage error.
    let (code, err) = vpc.fails(&["-o", "xml", "vpcs", "list"])?;
    ensure!(code == 2 && err.contains("xml"), "exit {code}: {err}");
    Ok(())
}

/// `--query` in each output; a bad expression is a usage error made before any request.
fn queries(vpc: &Vpc, vpc_id: &str, subnet_id: &str) -> Result<()> {
    let v = vpc.json(&["vpcs", "list", "--query", "vpcs[].vpcId"])?;
    ensure!(v == serde_json::json!([vpc_id]), "{v}");
    let v = vpc.json(&[
        "subnets",
        "describe",
        subnet_id,
        "--query",
        "subnets[0].{id: subnetId, cidr: cidrBlock}",
    ])?;
    ensure!(
        v == serde_json::json!({"id": subnet_id, "cidr": "10.0.1.0/24"}),
        "{v}"
    );
    let t = vpc.table(&["vpcs", "list", "--query", "vpcs[0].vpcId"])?;
    ensure!(t == format!("{vpc_id}\n"), "{t:?}");
    let t = vpc.table(&[
        "subnets",
        "list",
        "--query",
        "subnets[].[subnetId, cidrBlock]",
    ])?;
    ensure!(t == format!("{subnet_id}\t10.0.1.0/24\n"), "{t:?}");
    let y = vpc.ok(&["-o", "yaml", "vpcs", "list", "--query", "vpcs[].vpcId"])?;
    ensure!(y == format!("- {vpc_id}\n"), "{y:?}");
    let v = vpc.json(&["vpcs", "list", "--query", "length(vpcs)"])?;
    ensure!(v == 1, "{v}");
    // Nothing matches: null.
    let v = vpc.json(&["vpcs", "list", "--query", "nothing"])?;
    ensure!(v.is_null(), "{v}");

    // A bad expression: exit 2, one line, and no VPC is created.
    let (code, err) = vpc.fails(&[
        "vpcs",
        "create",
        "--cidr",
        "10.9.0.0/16",
        "--query",
        "vpcs[",
    ])?;
    ensure!(
        code == 2 && err.starts_with("error: --query `vpcs[`: ") && err.lines().count() == 1,
        "exit {code}: {err}"
    );
    let v = vpc.json(&["vpcs", "list", "--query", "length(vpcs)"])?;
    ensure!(v == 1, "{v}");
    Ok(())
}

/// Settings from a config file and its profiles, and their precedence.
fn config_file(vpc: &Vpc, dir: &Path, vpc_id: &str) -> Result<()> {
    let token = vpc.token.context("a token")?;
    std::fs::write(dir.join("dev-token"), format!("{token}\n"))?;
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"# the top level points nowhere
endpoint = "http://127.0.0.1:1"
output = "yaml"

[profiles.good]
endpoint = "{url}"
token_file = "dev-token"   # relative to this file
output = "json"

[profiles.nowhere]
endpoint = "http://127.0.0.1:1"
token = "bad"
"#,
            url = vpc.url
        ),
    )?;
    let path_s = path.display().to_string();
    // Only the config file: no VPC_ENDPOINT, no VPC_TOKEN.
    let cmd = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = vpc.command(args);
        c.env_remove("VPC_ENDPOINT")
            .env_remove("VPC_TOKEN")
            .env("VPC_CONFIG", &path);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let vpcs = ["vpcs", "list", "--query", "vpcs[].vpcId"];
    let want = serde_json::json!([vpc_id]);
    let json_of = |text: String| -> Result<Value> {
        serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
    };

    // The profile by flag and by VPC_PROFILE: its endpoint, token file and output (json).
    let mut args = vec!["--profile", "good"];
    args.extend_from_slice(&vpcs);
    ensure!(json_of(vpc.ok_with(cmd(&args, &[]), &args)?)? == want);
    ensure!(json_of(vpc.ok_with(cmd(&vpcs, &[("VPC_PROFILE", "good")]), &vpcs)?)? == want);
    // The flag beats VPC_PROFILE.
    ensure!(json_of(vpc.ok_with(cmd(&args, &[("VPC_PROFILE", "nope")]), &args)?)? == want);
    // No profile: the top level (nowhere): the control plane cannot be reached (1).
    let (code, err) = vpc.fails_with(cmd(&vpcs, &[]), &vpcs)?;
    ensure!(
        code == 1 && err.contains("127.0.0.1:1"),
        "exit {code}: {err}"
    );
    // The environment beats the profile; a flag beats the environment.
    let env_good = [("VPC_ENDPOINT", vpc.url.as_str()), ("VPC_TOKEN", token)];
    // (nowhere has no output: the top level's yaml, so -o json.)
    let mut args = vec!["--profile", "nowhere", "-o", "json"];
    args.extend_from_slice(&vpcs);
    ensure!(json_of(vpc.ok_with(cmd(&args, &env_good), &args)?)? == want);
    let env_bad = [
        ("VPC_ENDPOINT", "http://127.0.0.1:1"),
        ("VPC_TOKEN", "bad"),
        ("VPC_PROFILE", "good"),
    ];
    let mut args = vec!["--endpoint", vpc.url.as_str(), "--token", token];
    args.extend_from_slice(&vpcs);
    ensure!(json_of(vpc.ok_with(cmd(&args, &env_bad), &args)?)? == want);
    // Output: the top level says yaml, VPC_OUTPUT beats it, -o beats both.
    let list = ["vpcs", "list"];
    let env = [("VPC_ENDPOINT", vpc.url.as_str()), ("VPC_TOKEN", token)];
    let y = vpc.ok_with(cmd(&list, &env), &list)?;
    let yaml: Value = serde_yaml::from_str(&y)?;
    ensure!(
        yaml["vpcs"][0]["vpcId"] == vpc_id && !y.starts_with('{'),
        "{y}"
    );
    let t = vpc.ok_with(
        cmd(&list, &[env[0], env[1], ("VPC_OUTPUT", "table")]),
        &list,
    )?;
    ensure!(t.starts_with("VPC ID"), "{t}");
    let mut args = vec!["-o", "json"];
    args.extend_from_slice(&list);
    let j = vpc.ok_with(
        cmd(&args, &[env[0], env[1], ("VPC_OUTPUT", "table")]),
        &args,
    )?;
    ensure!(json_of(j)?["vpcs"][0]["vpcId"] == vpc_id);

    // config view: the sources, the token redacted.
    let view = ["-o", "json", "config", "view"];
    let v = json_of(vpc.ok_with(cmd(&view, &[("VPC_PROFILE", "good")]), &view)?)?;
    ensure!(v["config"]["value"] == path_s.as_str(), "{v}");
    ensure!(v["profile"]["value"] == "good", "{v}");
    ensure!(v["profile"]["source"] == "env VPC_PROFILE", "{v}");
    ensure!(v["endpoint"]["value"] == vpc.url.as_str(), "{v}");
    ensure!(
        v["endpoint"]["source"] == format!("config {path_s} [profiles.good]").as_str(),
        "{v}"
    );
    ensure!(v["output"]["source"] == "flag --output", "{v}");
    ensure!(!v.to_string().contains(token), "the token shows: {v}");
    let view = ["-o", "table", "--endpoint", "http://x:1", "config", "view"];
    let t = vpc.ok_with(cmd(&view, &[("VPC_TOKEN", token)]), &view)?;
    ensure!(t.starts_with("SETTING"), "{t}");
    ensure!(!t.contains(token), "the token shows:\n{t}");
    let r = t
        .lines()
        .find(|l| l.starts_with("endpoint"))
        .context("endpoint row")?;
    ensure!(
        r.contains("http://x:1") && r.contains("flag --endpoint"),
        "{t}"
    );
    let r = t
        .lines()
        .find(|l| l.starts_with("token"))
        .context("token row")?;
    ensure!(
        r.contains("<redacted>") && r.contains("env VPC_TOKEN"),
        "{t}"
    );
    // The default file is not there: fine; --query works on the view too.
    let view = ["config", "view", "--query", "endpoint.source"];
    let out = vpc.ok(&view)?;
    ensure!(json_of(out)? == "env VPC_ENDPOINT");

    // Config errors: one line, exit 2.
    let bad = dir.join("bad.toml");
    for (text, want) in [
        ("endpiont = \"x\"\n", "unknown key `endpiont`"),
        ("[profile dev]\n", "unknown section"),
        ("output = \"xml\"\n", "`xml` is not an output"),
    ] {
        std::fs::write(&bad, text)?;
        let mut c = vpc.command(&list);
        c.env("VPC_CONFIG", &bad);
        let (code, err) = vpc.fails_with(c, &list)?;
        ensure!(
            code == 2 && err.starts_with("error: config ") && err.contains(want),
            "exit {code}: {err}"
        );
        ensure!(err.lines().count() == 1, "{err}");
    }
    let mut args = vec!["--profile", "staging"];
    args.extend_from_slice(&list);
    let (code, err) = vpc.fails_with(cmd(&args, &[]), &args)?;
    ensure!(
        code == 2
            && err.starts_with("error: profile `staging` (flag --profile) is not in config ")
            && err.contains("(profiles: good, nowhere)")
            && err.lines().count() == 1,
        "exit {code}: {err}"
    );
    let mut c = vpc.command(&list);
    c.env("VPC_CONFIG", dir.join("missing.toml"));
    let (code, err) = vpc.fails_with(c, &list)?;
    ensure!(
        code == 2 && err.starts_with("error: config ") && err.lines().count() == 1,
        "exit {code}: {err}"
    );
    let mut args = vec!["--token-file", "/nonexistent/token"];
    args.extend_from_slice(&list);
    let (code, err) = vpc.fails(&args)?;
    ensure!(
        code == 2 && err.starts_with("error: token_file /nonexistent/token: "),
        "exit {code}: {err}"
    );
    Ok(())
}

/// `vpc completion bash` and `vpc man`.
fn completion_and_man(vpc: &Vpc, dir: &Path) -> Result<()> {
    let bash = vpc.ok(&["completion", "bash"])?;
    ensure!(
        bash.contains("vpcs") && bash.contains("security-groups") && bash.contains("complete"),
        "{bash}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        ensure!(!vpc.ok(&["completion", shell])?.is_empty(), "{shell}");
    }
    let (code, _) = vpc.fails(&["completion", "tcsh"])?;
    ensure!(code == 2);
    let man = vpc.ok(&["man"])?;
    ensure!(man.starts_with('.') && man.contains("\n.TH vpc 1"), "{man}");
    ensure!(man.contains("security\\-groups"), "{man}");
    let out = dir.join("man");
    vpc.ok(&["man", "--out", out.to_str().context("path")?])?;
    for page in [
        "vpc.1",
        "vpc-vpcs.1",
        "vpc-vpcs-create.1",
        "vpc-config-view.1",
    ] {
        let text = std::fs::read_to_string(out.join(page)).with_context(|| page.to_owned())?;
        ensure!(text.contains(".TH "), "{page}: {text}");
    }
    Ok(())
}
