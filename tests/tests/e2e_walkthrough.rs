//! The README's walkthrough, run as written: the shell block between `<!-- walkthrough:begin
//! -->` and `<!-- walkthrough:end -->` runs under `bash -euo pipefail` against a real
//! control plane and agent (one host), with the real `vpc` first on PATH. Every command must
//! succeed (the walkthrough itself checks what should fail with `!`), so the README cannot
//! drift from what the appliance does.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use vpc_tests::cluster::{Cluster, TOKEN_A};
use vpc_tests::procs::workspace_bin;

/// The walkthrough's shell code.
fn walkthrough(readme: &str) -> Result<String> {
    let start = readme
        .find("<!-- walkthrough:begin -->")
        .context("no walkthrough:begin marker in README.md")?;
    let end = readme
        .find("<!-- walkthrough:end -->")
        .context("no walkthrough:end marker in README.md")?;
    let block = &readme[start..end];
    let code = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(code, _)| code)
        .context("no ```sh block between the walkthrough markers")?;
    Ok(code.to_owned())
}

#[test]
fn the_readme_walkthrough_runs_as_written() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let script = walkthrough(&std::fs::read_to_string(root.join("README.md"))?)?;
    ensure!(
        script.contains("vpc apply -f examples/two-tier.yaml"),
        "{script}"
    );
    let c = Cluster::start(1)?;
    let vpc = workspace_bin("VPC_CLI_BIN", "vpc")?;
    let bin_dir = vpc.parent().context("vpc's directory")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = c.fabric_command("timeout");
    cmd.args(["600", "bash", "-euo", "pipefail", "-c", &script])
        .current_dir(root)
        .env("PATH", path)
        .env("VPC_ENDPOINT", c.url())
        .env("VPC_TOKEN", TOKEN_A)
        .env("XDG_CONFIG_HOME", c.dir().join("no-config"))
        .env_remove("VPC_CONFIG")
        .env_remove("VPC_PROFILE")
        .env_remove("VPC_OUTPUT");
    let started = std::time::Instant::now();
    let out = cmd.output().context("running the walkthrough")?;
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "the walkthrough failed ({}) after {:?}:\n{text}",
        out.status,
        started.elapsed()
    );
    // What the walkthrough promises in its comments.
    ensure!(text.contains("vpc/two-tier created"), "{text}");
    ensure!(
        text.lines().filter(|l| l.ends_with(" unchanged")).count() >= 12,
        "re-applying changes nothing: {text}"
    );
    ensure!(text.contains("in sync"), "{text}");
    ensure!(
        text.contains("ip-10-0-1-"),
        "the load balancer answered with a web server's hostname: {text}"
    );
    ensure!(text.contains("vpc/two-tier deleted"), "{text}");
    // Give the agent a moment to finish removing the instances before the cluster goes.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}
