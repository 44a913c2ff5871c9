//! The settings of the API commands (endpoint, token, TLS files, output) and where each
//! comes from: a flag beats the environment, which beats the config file's profile, which
//! beats the file's top level, which beats the default.
//!
//! The config file is `--config`, else `$VPC_CONFIG`, else
//! `$XDG_CONFIG_HOME/vpc/config.toml` (`~/.config/vpc/config.toml`). It is a small subset of
//! TOML: `key = value` lines (the value quoted `"..."` or `'...'`, or bare), `#` comments,
//! and `[profiles.NAME]` sections, selected with `--profile NAME` or `VPC_PROFILE`:
//!
//! ```toml
//! # top level: used by every profile unless it sets the key itself
//! endpoint = "https://vpc.example.com:7420"
//! tls_ca = "ca.pem"            # relative paths are relative to this file's directory
//! output = "table"
//!
//! [profiles.dev]
//! endpoint = "http://127.0.0.1:7420"
//! token_file = "~/.config/vpc/dev-token"
//! ```
//!
//! Keys: `endpoint`, `token` or `token_file` (its first line), `tls_ca`, `tls_cert`,
//! `tls_key`, `output` (table, wide, json, yaml). An unknown key or section, a missing
//! explicit file or an unknown profile is an error (exit 2). `vpc config view` prints the
//! effective settings, the token redacted, with the source of each.

use std::{
    collections::BTreeMap,
    fmt,
    io::IsTerminal as _,
    path::{Path, PathBuf},
};

use clap::{Subcommand, ValueEnum};
use serde_json::{Map, Value, json};

use crate::{
    api::{ApiArgs, Output, Table},
    output,
};

/// The endpoint when nothing sets one.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7420";

/// The keys a config file (top level or profile) may set.
pub const KEYS: &[&str] = &[
    "endpoint",
    "token",
    "token_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "output",
];

/// Settings as one source gives them (a flag, the environment, a config section).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layer {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub output: Option<Output>,
}

/// A parsed config file: its top level and its profiles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub top: Layer,
    pub profiles: BTreeMap<String, Layer>,
}

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A command-line flag (`--endpoint`).
    Flag(&'static str),
    /// An environment variable (`VPC_ENDPOINT`).
    Env(&'static str),
    /// The config file: its path and `[profiles.NAME]`, or none for the top level.
    File(PathBuf, Option<String>),
    /// Built in (for output: chosen by whether stdout is a terminal).
    Default,
    /// Not set anywhere.
    Unset,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(n) => write!(f, "flag {n}"),
            Source::Env(n) => write!(f, "env {n}"),
            Source::File(p, Some(profile)) => {
                write!(f, "config {} [profiles.{profile}]", p.display())
            }
            Source::File(p, None) => write!(f, "config {}", p.display()),
            Source::Default => f.write_str("default"),
            Source::Unset => f.write_str("unset"),
        }
    }
}

/// A value and its source.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// The account token: given, or read from a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Token {
    Value(String),
    File(PathBuf),
}

/// The effective settings of an API command.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The config file read, if any.
    pub config: Option<PathBuf>,
    /// The profile used, if any.
    pub profile: Option<Setting<String>>,
    pub endpoint: Setting<String>,
    pub token: Option<Setting<Token>>,
    pub tls_ca: Option<Setting<PathBuf>>,
    pub tls_cert: Option<Setting<PathBuf>>,
    pub tls_key: Option<Setting<PathBuf>>,
    pub output: Setting<Output>,
    /// `--query` (flag only).
    pub query: Option<String>,
}

impl Settings {
    /// The token's value (read from its file if need be).
    pub fn token_value(&self) -> Result<Option<String>, String> {
        match self.token.as_ref().map(|s| &s.value) {
            None => Ok(None),
            Some(Token::Value(t)) => Ok(Some(t.clone())),
            Some(Token::File(p)) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("token_file {}: {e}", p.display()))?;
                let t = text.lines().next().unwrap_or_default().trim();
                if t.is_empty() {
                    return Err(format!("token_file {}: empty", p.display()));
                }
                Ok(Some(t.to_owned()))
            }
        }
    }
}

/// Parses an output name (`table`, `wide`, `json`, `yaml`).
pub fn parse_output(s: &str) -> Result<Output, String> {
    Output::from_str(s, true).map_err(|_| {
        let names: Vec<_> = Output::value_variants()
            .iter()
            .filter_map(|o| o.to_possible_value().map(|v| v.get_name().to_owned()))
            .collect();
        format!("`{s}` is not an output ({})", names.join(", "))
    })
}

/// `~/x` with `home`, a relative path against `dir`.
fn file_path(value: &str, dir: &Path, home: Option<&Path>) -> PathBuf {
    let p = match (value.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => h.join(rest),
        _ => PathBuf::from(value),
    };
    if p.is_absolute() { p } else { dir.join(p) }
}

/// The value of `key = value`: `"basic"` (escapes `\\ \" \n \t`), `'literal'` or bare; a
/// `#` after it starts a comment.
fn parse_value(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let (value, rest) = if let Some(body) = raw.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c) => return Err(format!("unknown escape `\\{c}`")),
                    None => return Err("unterminated string".into()),
                },
                c => out.push(c),
            }
        }
        let end = end.ok_or("unterminated string")?;
        (out, &body[end..])
    } else if let Some(body) = raw.strip_prefix('\'') {
        let end = body.find('\'').ok_or("unterminated string")?;
        (body[..end].to_owned(), &body[end + 1..])
    } else {
        let v = raw.split('#').next().unwrap_or_default().trim();
        (v.to_owned(), "")
    };
    let rest = rest.trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(format!("unexpected `{rest}` after the value"));
    }
    Ok(value)
}

/// `[profiles.NAME]` (or `[profiles."NAME"]`): NAME.
fn parse_section(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?.strip_suffix(']')?.trim();
    let name = inner.strip_prefix("profiles.")?.trim();
    let name = name
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(name);
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    ok.then(|| name.to_owned())
}

/// Parses a config file's text; `path` names it in errors and anchors relative paths,
/// `home` expands `~/`.
pub fn parse_config(text: &str, path: &Path, home: Option<&Path>) -> Result<ConfigFile, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = ConfigFile {
        path: path.to_owned(),
        ..Default::default()
    };
    let mut section: Option<String> = None;
    let mut seen: Vec<(Option<String>, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("config {}:{}", path.display(), n + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            let line = line.split(" #").next().unwrap_or(line).trim();
            let name = parse_section(line).ok_or_else(|| {
                format!(
                    "{}: unknown section `{line}` (profiles are `[profiles.NAME]`)",
                    at()
                )
            })?;
            if file.profiles.contains_key(&name) {
                return Err(format!("{}: profile `{name}` defined twice", at()));
            }
            file.profiles.insert(name.clone(), Layer::default());
            section = Some(name);
            continue;
        }
        let (key, raw) = line
            .split_once('=')
            .ok_or_else(|| format!("{}: expected `key = value`, found `{line}`", at()))?;
        let key = key.trim().trim_matches('"');
        if !KEYS.contains(&key) {
            return Err(format!(
                "{}: unknown key `{key}` (known: {})",
                at(),
                KEYS.join(", ")
            ));
        }
        if seen.contains(&(section.clone(), key.to_owned())) {
            return Err(format!("{}: `{key}` set twice", at()));
        }
        seen.push((section.clone(), key.to_owned()));
        let value = parse_value(raw).map_err(|e| format!("{}: {key}: {e}", at()))?;
        let layer = match &section {
            Some(p) => file.profiles.get_mut(p).expect("inserted at its header"),
            None => &mut file.top,
        };
        let path_of = |v: &str| Some(file_path(v, dir, home));
        match key {
            "endpoint" => layer.endpoint = Some(value),
            "token" => layer.token = Some(value),
            "token_file" => layer.token_file = path_of(&value),
            "tls_ca" => layer.tls_ca = path_of(&value),
            "tls_cert" => layer.tls_cert = path_of(&value),
            "tls_key" => layer.tls_key = path_of(&value),
            "output" => {
                layer.output =
                    Some(parse_output(&value).map_err(|e| format!("{}: output: {e}", at()))?);
            }
            _ => unreachable!("checked against KEYS"),
        }
    }
    for (name, layer) in
        std::iter::once((None, &file.top)).chain(file.profiles.iter().map(|(n, l)| (Some(n), l)))
    {
        if layer.token.is_some() && layer.token_file.is_some() {
            let place = name.map_or_else(|| "top level".to_owned(), |n| format!("[profiles.{n}]"));
            return Err(format!(
                "config {}: {place} sets both token and token_file",
                path.display()
            ));
        }
    }
    Ok(file)
}

/// The settings the environment gives (`get` reads a variable; empty counts as unset).
pub fn env_layer(get: &dyn Fn(&str) -> Option<String>) -> Result<Layer, String> {
    let var = |k: &str| get(k).filter(|v| !v.is_empty());
    Ok(Layer {
        endpoint: var("VPC_ENDPOINT"),
        token: var("VPC_TOKEN"),
        token_file: var("VPC_TOKEN_FILE").map(PathBuf::from),
        tls_ca: var("VPC_TLS_CA").map(PathBuf::from),
        tls_cert: var("VPC_TLS_CERT").map(PathBuf::from),
        tls_key: var("VPC_TLS_KEY").map(PathBuf::from),
        output: var("VPC_OUTPUT")
            .map(|o| parse_output(&o).map_err(|e| format!("VPC_OUTPUT: {e}")))
            .transpose()?,
    })
}

/// The settings the flags give.
pub fn flag_layer(a: &ApiArgs) -> Layer {
    Layer {
        endpoint: a.endpoint.clone(),
        token: a.token.clone(),
        token_file: a.token_file.clone(),
        tls_ca: a.tls_ca.clone(),
        tls_cert: a.tls_cert.clone(),
        tls_key: a.tls_key.clone(),
        output: a.output,
    }
}

/// The config file to read: `--config`, `$VPC_CONFIG` (both must exist), else the default
/// path (read if it exists). The bool says whether it was named explicitly.
pub fn config_path(
    flag: Option<&Path>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Option<(PathBuf, bool)> {
    let var = |k: &str| get(k).filter(|v| !v.is_empty());
    if let Some(p) = flag {
        return Some((p.to_owned(), true));
    }
    if let Some(p) = var("VPC_CONFIG") {
        return Some((PathBuf::from(p), true));
    }
    let base = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some((base.join("vpc").join("config.toml"), false))
}

/// Resolves every setting: flag > environment > config profile > config top level >
/// default. `profile` is the selected profile and its source (it must exist in `file`).
pub fn resolve(
    flags: &Layer,
    env: &Layer,
    file: Option<&ConfigFile>,
    profile: Option<Setting<String>>,
    query: Option<String>,
    stdout_is_terminal: bool,
) -> Result<Settings, String> {
    // Highest first; a flag's and a variable's name is filled in by `named`.
    let mut layers: Vec<(&Layer, Source)> = vec![(flags, Source::Flag("")), (env, Source::Env(""))];
    if let Some(p) = &profile {
        let f = file.ok_or_else(|| {
            format!(
                "profile `{}` ({}) but no config file (set VPC_CONFIG or create \
                 $XDG_CONFIG_HOME/vpc/config.toml)",
                p.value, p.source
            )
        })?;
        let layer = f.profiles.get(&p.value).ok_or_else(|| {
            let known: Vec<_> = f.profiles.keys().map(String::as_str).collect();
            format!(
                "profile `{}` ({}) is not in config {} (profiles: {})",
                p.value,
                p.source,
                f.path.display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })?;
        layers.push((layer, Source::File(f.path.clone(), Some(p.value.clone()))));
    }
    if let Some(f) = file {
        layers.push((&f.top, Source::File(f.path.clone(), None)));
    }
    fn named(source: &Source, flag: &'static str, var: &'static str) -> Source {
        match source {
            Source::Flag(_) => Source::Flag(flag),
            Source::Env(_) => Source::Env(var),
            other => other.clone(),
        }
    }
    fn pick<T: Clone>(
        layers: &[(&Layer, Source)],
        get: impl Fn(&Layer) -> Option<&T>,
        flag: &'static str,
        var: &'static str,
    ) -> Option<Setting<T>> {
        layers.iter().find_map(|(l, source)| {
            get(l).map(|v| Setting {
                value: v.clone(),
                source: named(source, flag, var),
            })
        })
    }
    let endpoint = pick(
        &layers,
        |l| l.endpoint.as_ref(),
        "--endpoint",
        "VPC_ENDPOINT",
    )
    .unwrap_or_else(|| Setting {
        value: DEFAULT_ENDPOINT.to_owned(),
        source: Source::Default,
    });
    // The first layer with a token or a token file gives it.
    let token = layers
        .iter()
        .find_map(|(l, source)| match (&l.token, &l.token_file) {
            (Some(t), _) => Some(Setting {
                value: Token::Value(t.clone()),
                source: named(source, "--token", "VPC_TOKEN"),
            }),
            (None, Some(p)) => Some(Setting {
                value: Token::File(p.clone()),
                source: named(source, "--token-file", "VPC_TOKEN_FILE"),
            }),
            (None, None) => None,
        });
    let flag_token = flags.token.is_some() || flags.token_file.is_some();
    if !flag_token && env.token.is_some() && env.token_file.is_some() {
        return Err("VPC_TOKEN and VPC_TOKEN_FILE are both set; unset one".into());
    }
    let tls_ca = pick(&layers, |l| l.tls_ca.as_ref(), "--tls-ca", "VPC_TLS_CA");
    let tls_cert = pick(
        &layers,
        |l| l.tls_cert.as_ref(),
        "--tls-cert",
        "VPC_TLS_CERT",
    );
    let tls_key = pick(&layers, |l| l.tls_key.as_ref(), "--tls-key", "VPC_TLS_KEY");
    match (&tls_cert, &tls_key) {
        (Some(c), None) => {
            return Err(format!(
                "tls_cert ({}) needs tls_key (--tls-key, VPC_TLS_KEY or the config file)",
                c.source
            ));
        }
        (None, Some(k)) => {
            return Err(format!(
                "tls_key ({}) needs tls_cert (--tls-cert, VPC_TLS_CERT or the config file)",
                k.source
            ));
        }
        _ => {}
    }
    let output =
        pick(&layers, |l| l.output.as_ref(), "--output", "VPC_OUTPUT").unwrap_or_else(|| Setting {
            value: output::default_output(stdout_is_terminal),
            source: Source::Default,
        });
    Ok(Settings {
        config: file.map(|f| f.path.clone()),
        profile,
        endpoint,
        token,
        tls_ca,
        tls_cert,
        tls_key,
        output,
        query,
    })
}

/// The selected profile: `--profile`, else `VPC_PROFILE`.
pub fn profile(
    flag: Option<&str>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Option<Setting<String>> {
    match flag {
        Some(p) => Some(Setting {
            value: p.to_owned(),
            source: Source::Flag("--profile"),
        }),
        None => get("VPC_PROFILE")
            .filter(|p| !p.is_empty())
            .map(|p| Setting {
                value: p,
                source: Source::Env("VPC_PROFILE"),
            }),
    }
}

/// Reads the config file and resolves the settings of `args` (the process's environment,
/// whether stdout is a terminal). Errors are one line (exit 2).
pub fn load(args: &ApiArgs) -> Result<Settings, String> {
    let get = |k: &str| std::env::var(k).ok();
    let file = match config_path(args.config.as_deref(), &get) {
        None => None,
        Some((path, explicit)) => match std::fs::read_to_string(&path) {
            Ok(text) => {
                let home = get("HOME").map(PathBuf::from);
                Some(parse_config(&text, &path, home.as_deref())?)
            }
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("config {}: {e}", path.display())),
        },
    };
    resolve(
        &flag_layer(args),
        &env_layer(&get)?,
        file.as_ref(),
        profile(args.profile.as_deref(), &get),
        args.query.clone(),
        std::io::stdout().is_terminal(),
    )
}

/// `vpc config ...`.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective settings (token redacted) and where each comes from (flag,
    /// environment, config file and profile, default).
    View,
}

/// The settings as `vpc config view` shows them: `{key: {value, source}}`.
pub fn view_json(s: &Settings) -> Value {
    fn entry<T>(s: Option<&Setting<T>>, show: impl Fn(&T) -> Value) -> Value {
        match s {
            Some(s) => json!({"value": show(&s.value), "source": s.source.to_string()}),
            None => json!({"value": Value::Null, "source": Source::Unset.to_string()}),
        }
    }
    let path = |p: &PathBuf| Value::String(p.display().to_string());
    let mut m = Map::new();
    m.insert(
        "config".into(),
        match &s.config {
            Some(p) => json!({"value": path(p), "source": "read"}),
            None => json!({"value": Value::Null, "source": "none found"}),
        },
    );
    m.insert("profile".into(), entry(s.profile.as_ref(), |p| json!(p)));
    m.insert("endpoint".into(), entry(Some(&s.endpoint), |e| json!(e)));
    m.insert(
        "token".into(),
        entry(s.token.as_ref(), |t| match t {
            Token::Value(_) => json!("<redacted>"),
            Token::File(p) => json!(format!("<redacted> (from file {})", p.display())),
        }),
    );
    m.insert("tlsCa".into(), entry(s.tls_ca.as_ref(), path));
    m.insert("tlsCert".into(), entry(s.tls_cert.as_ref(), path));
    m.insert("tlsKey".into(), entry(s.tls_key.as_ref(), path));
    m.insert(
        "output".into(),
        entry(Some(&s.output), |o| {
            json!(o.to_possible_value().map(|v| v.get_name().to_owned()))
        }),
    );
    Value::Object(m)
}

/// The table of `vpc config view`.
pub fn view_table(v: &Value) -> Table {
    let mut t = Table::new(&["SETTING", "VALUE", "SOURCE"]);
    if let Value::Object(m) = v {
        for (k, e) in m {
            let value = match &e["value"] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            t.row(vec![
                k.clone(),
                value,
                e["source"].as_str().unwrap_or_default().to_owned(),
            ]);
        }
    }
    t
}

/// Runs `vpc config ...` and exits.
pub fn main(args: &ApiArgs, cmd: ConfigCommand) -> ! {
    let settings = match load(args).and_then(|s| {
        if let Some(q) = &s.query {
            output::check_query(q)?;
        }
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    };
    match cmd {
        ConfigCommand::View => {
            let v = view_json(&settings);
            output::emit(
                settings.output.value,
                settings.query.as_deref(),
                || v.clone(),
                |wide| view_table(&v).print_as(wide),
            );
        }
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    const SAMPLE: &str = r#"
# top level
endpoint = "https://vpc.example.com:7420"   # a comment
tls_ca = ca.pem
output = 'table'

[profiles.dev]
endpoint = "http://127.0.0.1:7420"
token_file = "~/tokens/dev"
output = "yaml"

[profiles."prod-eu"]
token = "t\"ok"
tls_cert = "/etc/vpc/cert.pem"
tls_key = "/etc/vpc/key.pem"
"#;

    fn sample() -> ConfigFile {
        parse_config(
            SAMPLE,
            Path::new("/cfg/vpc/config.toml"),
            Some(Path::new("/home/u")),
        )
        .unwrap()
    }

    #[test]
    fn parses_the_file() {
        let f = sample();
        assert_eq!(
            f.top.endpoint.as_deref(),
            Some("https://vpc.example.com:7420")
        );
        assert_eq!(f.top.tls_ca, Some(PathBuf::from("/cfg/vpc/ca.pem")));
        assert_eq!(f.top.output, Some(Output::Table));
        let dev = &f.profiles["dev"];
        assert_eq!(dev.endpoint.as_deref(), Some("http://127.0.0.1:7420"));
        assert_eq!(dev.token_file, Some(PathBuf::from("/home/u/tokens/dev")));
        assert_eq!(dev.output, Some(Output::Yaml));
        let prod = &f.profiles["prod-eu"];
        assert_eq!(prod.token.as_deref(), Some("t\"ok"));
        assert_eq!(prod.tls_key, Some(PathBuf::from("/etc/vpc/key.pem")));
        assert_eq!(f.profiles.len(), 2);
    }

    #[test]
    fn config_errors_are_one_line() {
        let p = Path::new("/c.toml");
        let err = |text: &str| parse_config(text, p, None).unwrap_err();
        let e = err("endpiont = x\n");
        assert!(
            e.starts_with("config /c.toml:1: unknown key `endpiont` (known: endpoint"),
            "{e}"
        );
        let e = err("\n[profile dev]\n");
        assert!(
            e.starts_with("config /c.toml:2: unknown section `[profile dev]`"),
            "{e}"
        );
        assert!(
            err("output = xml")
                .contains("output: `xml` is not an output (table, wide, json, yaml)")
        );
        assert!(err("endpoint = \"x").contains("unterminated string"));
        assert!(err("endpoint = \"x\" y").contains("unexpected `y`"));
        assert!(err("endpoint").contains("expected `key = value`"));
        assert!(err("endpoint = a\nendpoint = b").contains(":2: `endpoint` set twice"));
        assert!(err("[profiles.a]\n[profiles.a]").contains("defined twice"));
        assert!(
            err("token = a\ntoken_file = b").contains("top level sets both token and token_file")
        );
        for e in [err("x = 1"), err("[x]"), err("output = xml")] {
            assert!(!e.contains('\n'), "{e}");
        }
        // Empty files and comments only are fine.
        assert_eq!(parse_config("", p, None).unwrap().top, Layer::default());
        assert!(parse_config("# nothing\n\n", p, None).is_ok());
    }

    #[test]
    fn precedence_flag_env_profile_file_default() {
        let f = sample();
        let flags = Layer {
            endpoint: Some("http://flag:1".into()),
            ..Default::default()
        };
        let env = Layer {
            endpoint: Some("http://env:1".into()),
            token: Some("env-token".into()),
            ..Default::default()
        };
        let dev = Some(Setting {
            value: "dev".to_owned(),
            source: Source::Flag("--profile"),
        });
        let s = resolve(&flags, &env, Some(&f), dev.clone(), None, true).unwrap();
        assert_eq!(s.endpoint.value, "http://flag:1");
        assert_eq!(s.endpoint.source, Source::Flag("--endpoint"));
        // The env token beats the profile's token file.
        assert_eq!(
            s.token.as_ref().unwrap().value,
            Token::Value("env-token".into())
        );
        assert_eq!(s.token.as_ref().unwrap().source, Source::Env("VPC_TOKEN"));
        // The profile beats the top level; the top level fills what the profile lacks.
        assert_eq!(s.output.value, Output::Yaml);
        let cfg = PathBuf::from("/cfg/vpc/config.toml");
        assert_eq!(
            s.output.source,
            Source::File(cfg.clone(), Some("dev".into()))
        );
        assert_eq!(
            s.tls_ca.as_ref().unwrap().source,
            Source::File(cfg.clone(), None)
        );

        let s = resolve(&Layer::default(), &env, Some(&f), dev.clone(), None, true).unwrap();
        assert_eq!(s.endpoint.value, "http://env:1");
        assert_eq!(s.endpoint.source, Source::Env("VPC_ENDPOINT"));

        let s = resolve(
            &Layer::default(),
            &Layer::default(),
            Some(&f),
            dev,
            None,
            true,
        )
        .unwrap();
        assert_eq!(s.endpoint.value, "http://127.0.0.1:7420");
        assert_eq!(
            s.endpoint.source,
            Source::File(cfg.clone(), Some("dev".into()))
        );
        assert_eq!(
            s.token.unwrap().value,
            Token::File("/home/u/tokens/dev".into())
        );

        // No profile: the top level.
        let s = resolve(
            &Layer::default(),
            &Layer::default(),
            Some(&f),
            None,
            None,
            false,
        )
        .unwrap();
        assert_eq!(s.endpoint.value, "https://vpc.example.com:7420");
        assert_eq!(s.output.value, Output::Table);
        assert!(s.token.is_none());

        // Nothing at all: the defaults, output by terminal.
        let none = Layer::default();
        let s = resolve(&none, &none, None, None, None, false).unwrap();
        assert_eq!(s.endpoint.value, DEFAULT_ENDPOINT);
        assert_eq!(s.endpoint.source, Source::Default);
        assert_eq!(
            (s.output.value, s.output.source),
            (Output::Json, Source::Default)
        );
        let s = resolve(&none, &none, None, None, None, true).unwrap();
        assert_eq!(s.output.value, Output::Table);
        // An explicit output beats the terminal.
        let flags = Layer {
            output: Some(Output::Wide),
            ..Default::default()
        };
        assert_eq!(
            resolve(&flags, &none, None, None, None, false)
                .unwrap()
                .output
                .value,
            Output::Wide
        );
    }

    #[test]
    fn profile_and_tls_errors() {
        let f = sample();
        let p = |n: &str| {
            Some(Setting {
                value: n.to_owned(),
                source: Source::Env("VPC_PROFILE"),
            })
        };
        let none = Layer::default();
        let e = resolve(&none, &none, Some(&f), p("staging"), None, true).unwrap_err();
        assert_eq!(
            e,
            "profile `staging` (env VPC_PROFILE) is not in config /cfg/vpc/config.toml \
             (profiles: dev, prod-eu)"
        );
        let e = resolve(&none, &none, None, p("dev"), None, true).unwrap_err();
        assert!(e.contains("no config file"), "{e}");
        let flags = Layer {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        let e = resolve(&flags, &none, None, None, None, true).unwrap_err();
        assert!(
            e.starts_with("tls_cert (flag --tls-cert) needs tls_key"),
            "{e}"
        );
        // The pair may come from different places.
        let s = resolve(&flags, &none, Some(&f), p("prod-eu"), None, true).unwrap();
        assert_eq!(s.tls_cert.unwrap().value, PathBuf::from("c.pem"));
        assert_eq!(s.tls_key.unwrap().value, PathBuf::from("/etc/vpc/key.pem"));
        let env = Layer {
            token: Some("a".into()),
            token_file: Some("b".into()),
            ..Default::default()
        };
        assert!(resolve(&none, &env, None, None, None, true).is_err());
    }

    #[test]
    fn environment_and_paths() {
        let get = env(&[
            ("VPC_ENDPOINT", "http://e:1"),
            ("VPC_TOKEN", ""),
            ("VPC_OUTPUT", "wide"),
            ("VPC_PROFILE", "dev"),
            ("XDG_CONFIG_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ]);
        let l = env_layer(&get).unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("http://e:1"));
        assert_eq!(l.token, None);
        assert_eq!(l.output, Some(Output::Wide));
        assert!(
            env_layer(&env(&[("VPC_OUTPUT", "xml")]))
                .unwrap_err()
                .starts_with("VPC_OUTPUT: ")
        );
        assert_eq!(
            config_path(None, &get),
            Some((PathBuf::from("/xdg/vpc/config.toml"), false))
        );
        assert_eq!(
            config_path(None, &env(&[("HOME", "/home/u")])),
            Some((PathBuf::from("/home/u/.config/vpc/config.toml"), false))
        );
        let get2 = env(&[("VPC_CONFIG", "/etc/vpc.toml"), ("XDG_CONFIG_HOME", "/xdg")]);
        assert_eq!(
            config_path(None, &get2),
            Some((PathBuf::from("/etc/vpc.toml"), true))
        );
        assert_eq!(
            config_path(Some(Path::new("/f.toml")), &get2),
            Some((PathBuf::from("/f.toml"), true))
        );
        assert_eq!(config_path(None, &env(&[])), None);
        assert_eq!(profile(None, &get).unwrap().value, "dev");
        assert_eq!(
            profile(Some("x"), &get).unwrap().source,
            Source::Flag("--profile")
        );
    }

    #[test]
    fn view_redacts_the_token() {
        let none = Layer::default();
        let flags = Layer {
            token: Some("secret-token".into()),
            ..Default::default()
        };
        let s = resolve(&flags, &none, None, None, None, false).unwrap();
        let v = view_json(&s);
        assert!(!v.to_string().contains("secret-token"), "{v}");
        assert_eq!(v["token"]["value"], "<redacted>");
        assert_eq!(v["token"]["source"], "flag --token");
        assert_eq!(v["endpoint"]["source"], "default");
        assert_eq!(v["output"]["value"], "json");
        assert_eq!(v["tlsCa"]["source"], "unset");
        let text = view_table(&v).render_as(false);
        assert!(text.starts_with("SETTING"), "{text}");
        assert!(!text.contains("secret-token"), "{text}");
    }

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("vpc-cli-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tok");
        std::fs::write(&p, "abc123\n").unwrap();
        let none = Layer::default();
        let flags = Layer {
            token_file: Some(p.clone()),
            ..Default::default()
        };
        let s = resolve(&flags, &none, None, None, None, false).unwrap();
        assert_eq!(s.token_value().unwrap().as_deref(), Some("abc123"));
        std::fs::write(&p, "\n").unwrap();
        assert!(s.token_value().unwrap_err().ends_with("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(s.token_value().is_err());
    }
}
