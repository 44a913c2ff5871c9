//! Running external commands: every command is echoed (`xtask: running: ...`) before it runs.

use std::{
    env,
    ffi::{OsStr, OsString},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of the xtask crate).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    Some(home.join("bin"))
}

/// The PATH given to every child: ours, plus the cargo bin dir (appended) if it is missing, so
/// that a freshly installed bpf-linker is found by the eBPF build.
pub fn child_path() -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or(current)
}

/// A command run from the repository root with [`child_path`] as PATH.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(repo_root()).env("PATH", child_path());
    cmd
}

/// `cargo ...` (the rustup proxy on PATH, so toolchain selection works as on the command line).
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = command("cargo");
    cmd.args(args);
    cmd
}

/// Human-readable form of `cmd`: changed environment variables first, then program and args.
pub fn describe(cmd: &Command) -> String {
    let default_path = child_path();
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        let Some(value) = value else { continue };
        if key == "PATH" {
            if value == default_path {
                continue;
            }
            // Show `PATH=/extra:$PATH` rather than the whole expanded value.
            let value = value.to_string_lossy();
            let default = default_path.to_string_lossy();
            let shown = match value.strip_suffix(default.as_ref()) {
                Some(prefix) => format!("{prefix}$PATH"),
                None => value.into_owned(),
            };
            words.push(format!("PATH={}", quote(&shown)));
            continue;
        }
        words.push(format!(
            "{}={}",
            key.to_string_lossy(),
            quote(&value.to_string_lossy())
        ));
    }
    words.push(quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+^~@%$".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Echoes and runs `cmd`, failing if it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    eprintln!("xtask: running: {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Totals of `cargo test` result lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
}

/// Runs a `cargo test` command like [`run`], echoing its output as it comes, and adds up its
/// `test result: ... N passed; M failed; ...` lines into `counts` (also when it fails).
pub fn run_tests(cmd: &mut Command, counts: &mut TestCounts) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = describe(cmd);
    eprintln!("xtask: running: {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            counts.passed += count_before(rest, " passed");
            counts.failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// The number right before `word` in `text` ("ok. 15 passed; 0 failed" -> 15 for " passed").
fn count_before(text: &str, word: &str) -> u64 {
    text.split(';')
        .find_map(|part| {
            let part = part.trim_end();
            let n = part.strip_suffix(word.trim_start())?.trim_end();
            n.rsplit([' ', '.']).next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Replaces the xtask process with `cmd` (its exit code becomes ours). Returns only on failure.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    let shown = describe(cmd);
    eprintln!("xtask: exec: {shown}");
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("cannot exec `{shown}`"))
}

/// Runs a probe silently; its stdout if it started and succeeded, `None` otherwise.
pub fn probe<I, S>(program: &str, args: I) -> Option<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = command(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether the effective user is root (`id -u` prints 0).
pub fn is_root() -> bool {
    probe("id", ["-u"]).is_some_and(|uid| uid.trim() == "0")
}

/// How to rerun an xtask subcommand as root, keeping the user's rustup/cargo on PATH.
pub fn sudo_hint(subcommand: &str) -> String {
    format!(
        "  sudo -E env \"PATH=$PATH\" cargo xtask {subcommand}\n  \
         (your rustup/cargo must be on root's PATH: sudo resets PATH to its secure_path, \
         `env \"PATH=$PATH\"` passes yours through)"
    )
}

/// Fails with a clear message unless running as root.
pub fn require_root(subcommand: &str, why: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {subcommand}` must run as root ({why}); run:\n{}",
            sudo_hint(subcommand)
        );
    }
    Ok(())
}

/// Cargo's target directory, from `cargo metadata` (no JSON parser: one string search).
pub fn target_dir() -> Result<PathBuf> {
    let mut cmd = cargo(["metadata", "--format-version", "1", "--no-deps"]);
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    if !output.status.success() {
        bail!("`{}` failed ({})", describe(&cmd), output.status);
    }
    let json = String::from_utf8_lossy(&output.stdout);
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .context("`cargo metadata` printed no target_directory")
}

/// The value of the first `"key":"value"` in `json`, with the common escapes undone.
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut value = String::new();
    let mut chars = json[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Prints a banner line for a step.
pub fn banner(title: &str) {
    eprintln!("\nxtask: ==== {title} ====");
}

/// `1m 02s` / `4.2s`.
pub fn elapsed(since: Instant) -> String {
    let elapsed: Duration = since.elapsed();
    let secs = elapsed.as_secs();
    if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", elapsed.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_target_directory() {
        let json = r#"{"packages":[],"target_directory":"/a/b \"c\"\\d","version":1}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some(r#"/a/b "c"\d"#)
        );
        assert_eq!(json_string_field(json, "missing"), None);
    }

    #[test]
    fn describes_env_and_path_prefix() {
        let mut path = OsString::from("/usr/lib/llvm-22/bin:");
        path.push(child_path());
        let mut cmd = cargo(["install", "bpf-linker"]);
        cmd.env("PATH", path)
            .env("DEBIAN_FRONTEND", "noninteractive");
        let shown = describe(&cmd);
        assert!(shown.contains("PATH=/usr/lib/llvm-22/bin:$PATH"), "{shown}");
        assert!(shown.contains("DEBIAN_FRONTEND=noninteractive"), "{shown}");
        assert!(shown.ends_with("cargo install bpf-linker"), "{shown}");
        assert_eq!(describe(&cargo(["build"])), "cargo build");
    }

    #[test]
    fn counts_cargo_test_result_lines() {
        let line = "ok. 15 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished";
        assert_eq!(count_before(line, " passed"), 15);
        assert_eq!(count_before(line, " failed"), 2);
        assert_eq!(
            count_before("FAILED. 0 passed; 1 failed; 0 ignored", " failed"),
            1
        );
        assert_eq!(count_before("garbage", " passed"), 0);
    }

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(quote("--version"), "--version");
        assert_eq!(quote("^0.13"), "^0.13");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
