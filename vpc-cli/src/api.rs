//! The API-backed commands of `vpc`: resources of the control plane (VPCs, subnets, security
//! groups, ...) over its gRPC API, aws-CLI nouns with kubectl-like output.
//!
//! Shared here: the connection flags, the bearer token, output (aligned tables, JSON, YAML,
//! `describe` blocks; see [`crate::output`]), error reporting with exit codes, paging and
//! the argument parsers. The settings (flags, environment, config file) are resolved by
//! [`crate::config`]. One module per area holds the commands (`network`, `security`,
//! `compute`, `lb`, `hosts`).

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::{Map, Value, json};
use tonic::{
    Code, Status,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_types::StatusExt;
use vpc_proto::v1 as pb;

use crate::{
    compute,
    config::{self, Settings},
    hosts, lb, manifest, network, ops, output, security, trace,
};

/// Exit codes of the API commands (also in `vpc --help`).
pub const EXIT_HELP: &str = "\
Exit status of the API commands (vpcs, subnets, ...):
  0  success
  1  the control plane could not be reached or failed (connection, TLS, UNAVAILABLE,
     DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, ...)
  2  the request was refused (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
     FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAUTHENTICATED, PERMISSION_DENIED, ...)
     or the command line is invalid
Errors are printed as `error: <CODE>: <message>`, then `  field <field>: <why>` for each
field the control plane names.

Settings: a flag beats the environment (VPC_ENDPOINT, VPC_TOKEN, VPC_TOKEN_FILE,
VPC_TLS_CA, VPC_TLS_CERT, VPC_TLS_KEY, VPC_OUTPUT, VPC_PROFILE), which beats the config file
(--config, $VPC_CONFIG, else $XDG_CONFIG_HOME/vpc/config.toml): its [profiles.NAME] section
(--profile), then its top level. `vpc config view` shows what applies and why. Output: -o,
else tables on a terminal and JSON otherwise.";

/// Connection and output flags of the API commands (global: they go before or after the
/// subcommand, like the aws CLI's `--output`). Unset flags fall back to the environment and
/// the config file ([`config::load`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// Control plane URL (http:// or https://) [env: VPC_ENDPOINT] [default:
    /// http://127.0.0.1:7420].
    #[arg(long, global = true, help_heading = "API options")]
    pub endpoint: Option<String>,
    /// Account token, sent as `authorization: Bearer <token>` [env: VPC_TOKEN].
    #[arg(
        long,
        global = true,
        conflicts_with = "token_file",
        help_heading = "API options"
    )]
    pub token: Option<String>,
    /// File whose first line is the account token [env: VPC_TOKEN_FILE].
    #[arg(long, global = true, help_heading = "API options")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the control plane's certificate is checked against (https)
    /// [env: VPC_TLS_CA].
    #[arg(long, global = true, help_heading = "API options")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (mutual TLS; with --tls-key) [env: VPC_TLS_CERT].
    #[arg(long, global = true, help_heading = "API options")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [env: VPC_TLS_KEY].
    #[arg(long, global = true, help_heading = "API options")]
    pub tls_key: Option<PathBuf>,
    /// Output format [env: VPC_OUTPUT] [default: table on a terminal, else json].
    #[arg(
        short = 'o',
        long,
        value_enum,
        ignore_case = true,
        global = true,
        help_heading = "API options"
    )]
    pub output: Option<Output>,
    /// JMESPath expression applied to the JSON result (as the aws CLI's), e.g.
    /// `instances[].privateIpAddress`.
    #[arg(long, global = true, value_name = "EXPR", help_heading = "API options")]
    pub query: Option<String>,
    /// Config file profile ([profiles.NAME]) [env: VPC_PROFILE].
    #[arg(long, global = true, help_heading = "API options")]
    pub profile: Option<String>,
    /// Config file [env: VPC_CONFIG] [default: $XDG_CONFIG_HOME/vpc/config.toml].
    #[arg(long, global = true, help_heading = "API options")]
    pub config: Option<PathBuf>,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns (kubectl-like); `describe` prints one block per resource.
    Table,
    /// Tables with more columns (MAC, launch time, owner, tags, ...).
    Wide,
    /// The response messages as JSON (proto3 JSON field names, lowerCamelCase).
    Json,
    /// The same value as `json`, as YAML.
    Yaml,
}

/// The API nouns (flattened into `vpc`'s subcommands).
#[derive(Subcommand, Debug)]
pub enum ApiCommand {
    /// VPCs (API).
    #[command(subcommand)]
    Vpcs(network::VpcsCommand),
    /// Subnets (API).
    #[command(subcommand)]
    Subnets(network::SubnetsCommand),
    /// Route tables (API).
    #[command(subcommand, name = "route-tables", visible_alias = "rtb")]
    RouteTables(network::RouteTablesCommand),
    /// Security groups and their rules (API).
    #[command(subcommand, name = "security-groups", visible_alias = "sg")]
    SecurityGroups(security::SecurityGroupsCommand),
    /// Network ACLs, their entries and subnet associations (API).
    #[command(subcommand, name = "network-acls", visible_alias = "nacl")]
    NetworkAcls(security::NetworkAclsCommand),
    /// Instances (API).
    #[command(subcommand)]
    Instances(compute::InstancesCommand),
    /// Volumes (API).
    #[command(subcommand)]
    Volumes(compute::VolumesCommand),
    /// Snapshots of volumes (API).
    #[command(subcommand)]
    Snapshots(compute::SnapshotsCommand),
    /// Load balancers and their listeners (API; `vpc lb` shows this host's datapath view).
    #[command(subcommand, name = "load-balancers", visible_alias = "elb")]
    LoadBalancers(lb::LoadBalancersCommand),
    /// Target groups and their targets (API).
    #[command(subcommand, name = "target-groups", visible_alias = "tg")]
    TargetGroups(lb::TargetGroupsCommand),
    /// Hosts (agents) and network programming latency (API).
    #[command(subcommand)]
    Hosts(hosts::HostsCommand),
    /// Tags of any object (API).
    #[command(subcommand)]
    Tags(hosts::TagsCommand),
    /// The control plane and every host at a glance: connected, applied revisions, packets,
    /// drops and the current drop rate (API).
    Status,
    /// What the hosts' datapaths are dropping now, by host, hook and reason (API).
    Drops(ops::DropsArgs),
    /// Tracked flows per host and per VPC (yours), and each host's table pressure; with
    /// --follow, your flow-log records as they arrive (API).
    Flows(crate::flowlogs::FlowsArgs),
    /// Flow logs of VPCs and subnets (API; records: `vpc flows --follow`).
    #[command(subcommand, name = "flow-logs")]
    FlowLogs(crate::flowlogs::FlowLogsCommand),
    /// Trace one packet through the live datapath: each stage's decision (endpoint, route,
    /// ACL and security-group rules, load-balancer target, encapsulation, delivery) and the
    /// drop reason (API; exit 0 delivered, 3 dropped). Changes no connection state.
    Trace(trace::TraceArgs),
    /// Conntrack budgets: per VPC (yours), usage against its budget and who fills it (API).
    #[command(subcommand, visible_alias = "ct")]
    Conntrack(trace::ConntrackCommand),
    /// Create or converge the resources of manifest files (kubectl apply style).
    Apply(manifest::FileArgs),
    /// Show what `apply` would change (exit 0: nothing, 1: changes, 2: errors).
    Diff(manifest::FileArgs),
    /// Delete the resources of manifest files (`vpc delete -f FILE`), in reverse order.
    Delete(manifest::FileArgs),
}

/// Runs an API command and exits with its status (see [`EXIT_HELP`]).
pub fn main(args: &ApiArgs, cmd: ApiCommand) -> ! {
    // Settings and --query are checked before any request: their errors are usage errors.
    let settings = match config::load(args).and_then(|s| {
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
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1)
        }
    };
    let code = match rt.block_on(run(&settings, cmd)) {
        Ok(()) => 0,
        Err(e) => {
            eprint!("{}", e.render(&settings.endpoint.value));
            e.exit_code()
        }
    };
    std::process::exit(code)
}

async fn run(settings: &Settings, cmd: ApiCommand) -> Result<(), CliError> {
    let api = Api::connect(settings).await?;
    match cmd {
        ApiCommand::Vpcs(c) => network::vpcs(&api, c).await,
        ApiCommand::Subnets(c) => network::subnets(&api, c).await,
        ApiCommand::RouteTables(c) => network::route_tables(&api, c).await,
        ApiCommand::SecurityGroups(c) => security::security_groups(&api, c).await,
        ApiCommand::NetworkAcls(c) => security::network_acls(&api, c).await,
        ApiCommand::Instances(c) => compute::instances(&api, c).await,
        ApiCommand::Volumes(c) => compute::volumes(&api, c).await,
        ApiCommand::Snapshots(c) => compute::snapshots(&api, c).await,
        ApiCommand::LoadBalancers(c) => lb::load_balancers(&api, c).await,
        ApiCommand::TargetGroups(c) => lb::target_groups(&api, c).await,
        ApiCommand::Hosts(c) => hosts::hosts(&api, c).await,
        ApiCommand::Status => ops::status(&api).await,
        ApiCommand::Drops(a) => ops::drops(&api, a).await,
        ApiCommand::Flows(a) if a.follow => crate::flowlogs::follow(&api, a).await,
        ApiCommand::Flows(_) => ops::flows(&api).await,
        ApiCommand::FlowLogs(c) => crate::flowlogs::flow_logs(&api, c).await,
        ApiCommand::Tags(c) => hosts::tags(&api, c).await,
        ApiCommand::Trace(a) => trace::trace(&api, a).await,
        ApiCommand::Conntrack(c) => trace::conntrack(&api, c).await,
        ApiCommand::Apply(f) => manifest::apply(&api, f).await,
        ApiCommand::Diff(f) => manifest::diff(&api, f).await,
        ApiCommand::Delete(f) => manifest::delete(&api, f).await,
    }
}

/// What an API command failed with.
#[derive(Debug)]
pub enum CliError {
    /// The control plane answered with (or the transport produced) a status.
    Status(Status),
    /// Before any call: bad TLS files, a bad endpoint, no connection.
    Local(anyhow::Error),
    /// The arguments cannot make a request (exit 2, as clap's usage errors).
    Usage(String),
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        CliError::Status(s)
    }
}

impl CliError {
    /// 2 when the control plane refused the request, 1 when it could not be reached or
    /// failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Local(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Status(s) => match s.code() {
                Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::ResourceExhausted
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::Aborted
                | Code::Unimplemented => 2,
                _ => 1,
            },
        }
    }

    /// `error: <CODE>: <message>` and a `  field <f>: <why>` line per field violation.
    pub fn render(&self, endpoint: &str) -> String {
        let mut out = String::new();
        match self {
            CliError::Local(e) => {
                let _ = writeln!(out, "error: {e:#}");
            }
            CliError::Usage(m) => {
                let _ = writeln!(out, "error: {m}");
            }
            CliError::Status(s) => {
                let msg = if s.message().is_empty() {
                    "(no message)"
                } else {
                    s.message()
                };
                let _ = writeln!(out, "error: {}: {msg}", code_name(s.code()));
                if let Some(br) = s.get_details_bad_request() {
                    for v in br.field_violations {
                        let _ = writeln!(out, "  field {}: {}", v.field, v.description);
                    }
                }
                match s.code() {
                    Code::Unavailable | Code::DeadlineExceeded => {
                        let _ = writeln!(out, "  (is the control plane at {endpoint} running?)");
                    }
                    Code::Unauthenticated => {
                        let _ = writeln!(
                            out,
                            "  (set VPC_TOKEN, pass --token or set token in the config file)"
                        );
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

/// The canonical gRPC name of `code` (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pub use vpc_proto::Bearer;

/// A channel carrying the token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A connection to the control plane and the output format.
#[derive(Debug)]
pub struct Api {
    /// The channel (cheap to clone; one per client).
    pub channel: Authed,
    /// Output format.
    pub output: Output,
    /// `--query` (checked before the connection).
    pub query: Option<String>,
    /// The control plane's URL.
    pub endpoint: String,
    /// Whether the output format was chosen (flag, environment, config), not defaulted from
    /// the terminal: see [`Api::emit_raw`].
    pub output_chosen: bool,
}

impl Api {
    /// Connects to the endpoint (TLS for https:// or when TLS files are given). An unreadable
    /// token file is a usage error (exit 2), the rest local failures (exit 1).
    pub async fn connect(s: &Settings) -> Result<Api, CliError> {
        let token = match s.token_value().map_err(CliError::Usage)? {
            Some(t) => Some(
                Bearer::new(&t)
                    .map_err(|_| CliError::Usage("the token is not a valid header value".into()))?,
            ),
            None => None,
        };
        let channel = Self::channel(s).await.map_err(CliError::Local)?;
        Ok(Api {
            channel: InterceptedService::new(channel, token.unwrap_or_default()),
            output: s.output.value,
            query: s.query.clone(),
            endpoint: s.endpoint.value.clone(),
            output_chosen: !matches!(
                s.output.source,
                config::Source::Default | config::Source::Unset
            ),
        })
    }

    async fn channel(s: &Settings) -> Result<Channel> {
        let endpoint = &s.endpoint.value;
        let mut ep = Endpoint::from_shared(endpoint.clone())
            .with_context(|| {
                format!(
                    "endpoint ({}): `{endpoint}` is not a URL",
                    s.endpoint.source
                )
            })?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        let https = endpoint.starts_with("https://");
        if https || s.tls_ca.is_some() || s.tls_cert.is_some() {
            if !https {
                bail!("--tls-* options need an https:// endpoint");
            }
            let mut tls = ClientTlsConfig::new();
            match &s.tls_ca {
                Some(p) => {
                    let pem = std::fs::read(&p.value).with_context(|| {
                        format!("tls_ca ({}): reading {}", p.source, p.value.display())
                    })?;
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                None => bail!("an https:// endpoint needs --tls-ca (the CA of its certificate)"),
            }
            if let (Some(c), Some(k)) = (&s.tls_cert, &s.tls_key) {
                let cert = std::fs::read(&c.value).with_context(|| {
                    format!("tls_cert ({}): reading {}", c.source, c.value.display())
                })?;
                let key = std::fs::read(&k.value).with_context(|| {
                    format!("tls_key ({}): reading {}", k.source, k.value.display())
                })?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            ep = ep.tls_config(tls).context("TLS configuration")?;
        }
        ep.connect().await.map_err(|e| {
            anyhow!(e).context(format!(
                "UNAVAILABLE: cannot connect to {endpoint} (is the control plane running?)"
            ))
        })
    }

    /// Prints a result: `value` (what `-o json` prints) as JSON, YAML or through `--query`,
    /// else its text form: `text(wide)` prints it (see [`output::emit`]).
    pub fn emit(&self, value: impl FnOnce() -> Value, text: impl FnOnce(bool)) {
        output::emit(self.output, self.query.as_deref(), value, text);
    }

    /// For commands whose natural output is raw (`instances exec`, `instances console`,
    /// `apply`/`diff`/`delete`'s lines): `raw()` unless a format or `--query` was asked for
    /// (not merely defaulted to because stdout is not a terminal), else as [`Api::emit`].
    pub fn emit_raw(&self, value: impl FnOnce() -> Value, raw: impl FnOnce()) {
        if self.output_chosen || self.query.is_some() {
            self.emit(value, |_| raw());
        } else {
            raw();
        }
    }
}

/// The `x-vpc-revision` of a write's response, if any.
pub fn revision<T>(r: &tonic::Response<T>) -> Option<i64> {
    r.metadata()
        .get("x-vpc-revision")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The line printed for a write without a resource to show (table output).
pub fn done(what: &str, verb: &str, rev: Option<i64>) {
    let line = match rev {
        Some(r) => format!("{what} {verb} (revision {r})\n"),
        None => format!("{what} {verb}\n"),
    };
    output::write_stdout(line.as_bytes());
}

/// Paging flags of the list commands (as the aws CLI's).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PageArgs {
    /// Return at most this many (one page, 1-1000); by default every page is fetched.
    #[arg(long)]
    pub max_results: Option<u32>,
    /// Start after this page token (printed to stderr by a --max-results list that has more).
    #[arg(long, requires = "max_results")]
    pub starting_token: Option<String>,
    /// Size of each page fetched (1-1000, default 100); all are still listed.
    #[arg(long, conflicts_with = "max_results")]
    pub page_size: Option<u32>,
}

/// The ids of a list/describe (none: every resource of the account) and paging.
#[derive(clap::Args, Debug, Clone)]
pub struct IdsArgs {
    /// Only these (an unknown id is NOT_FOUND).
    pub ids: Vec<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// [`IdsArgs`] and a VPC filter.
#[derive(clap::Args, Debug, Clone)]
pub struct VpcFilterArgs {
    /// Only these (an unknown id is NOT_FOUND).
    pub ids: Vec<String>,
    /// Only those of this VPC.
    #[arg(long, visible_alias = "vpc-id")]
    pub vpc: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// Fetches every page (`--page-size` at a time), or the one page `--max-results` asks for:
/// `call` gets the page and returns the items and the next token. With --max-results the
/// next token, if any, is printed to stderr.
pub async fn paged<T, F, Fut>(page: &PageArgs, mut call: F) -> Result<Vec<T>, CliError>
where
    F: FnMut(pb::Page) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), Status>>,
{
    let mut all = Vec::new();
    let mut token = page.starting_token.clone().unwrap_or_default();
    loop {
        let (items, next) = call(pb::Page {
            max_results: page.max_results.or(page.page_size).unwrap_or(0),
            next_token: token,
        })
        .await?;
        all.extend(items);
        if next.is_empty() {
            break;
        }
        if page.max_results.is_some() {
            eprintln!("more results: --starting-token {next}");
            break;
        }
        token = next;
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------
// Output.

/// kubectl-like aligned columns: upper-case headers, three spaces between columns. Columns
/// added with [`Table::wide`] are shown by `-o wide` only.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    /// How many of the headers `-o table` shows (the rest are wide-only).
    narrow: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            narrow: headers.len(),
            rows: Vec::new(),
        }
    }

    /// Adds columns shown by `-o wide` only, after the others: each row carries their cells
    /// last.
    pub fn wide(mut self, headers: &[&'static str]) -> Table {
        self.headers.extend_from_slice(headers);
        self
    }

    /// Adds a row (empty cells are shown as `-`, as `<none>` would be too wide).
    pub fn row(&mut self, cells: Vec<String>) {
        let cells = cells
            .into_iter()
            .map(|c| if c.is_empty() { "-".to_owned() } else { c })
            .collect();
        self.rows.push(cells);
    }

    /// The rendered table (headers even without rows), with the wide-only columns if `wide`.
    pub fn render_as(&self, wide: bool) -> String {
        let n = if wide {
            self.headers.len()
        } else {
            self.narrow
        };
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut s = String::new();
            for (i, c) in cells.enumerate() {
                if i + 1 == n {
                    s.push_str(c);
                } else {
                    let _ = write!(s, "{c:<w$}   ", w = widths[i]);
                }
            }
            out.push_str(s.trim_end());
            out.push('\n');
        };
        line(&mut self.headers.iter().copied().take(n));
        for r in &self.rows {
            line(&mut r.iter().map(String::as_str).take(n));
        }
        out
    }

    /// Prints it, with the wide-only columns if `wide`.
    pub fn print_as(&self, wide: bool) {
        output::write_stdout(self.render_as(wide).as_bytes());
    }
}

/// kubectl-describe-like text of a JSON object: `Key:  value`, nested objects and lists
/// indented.
pub fn describe_text(v: &Value) -> String {
    let mut out = String::new();
    describe_into(&mut out, v, 0);
    out
}

fn title(key: &str) -> String {
    let mut s = String::new();
    for (i, c) in key.chars().enumerate() {
        if i == 0 {
            s.extend(c.to_uppercase());
        } else if c.is_uppercase() {
            s.push(' ');
            s.push(c);
        } else {
            s.push(c);
        }
    }
    s
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("<none>".into()),
        Value::String(s) if s.is_empty() => Some("<none>".into()),
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(a) if a.is_empty() => Some("<none>".into()),
        Value::Array(a) if a.iter().all(|x| x.is_string() || x.is_number()) => Some(
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        _ => None,
    }
}

fn describe_into(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            // Tags read better as `k=v`.
            for (k, val) in m {
                if k == "tags" {
                    let tags = val
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|t| {
                                    format!(
                                        "{}={}",
                                        t["key"].as_str().unwrap_or_default(),
                                        t["value"].as_str().unwrap_or_default()
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    let tags = if tags.is_empty() {
                        "<none>".into()
                    } else {
                        tags
                    };
                    let _ = writeln!(out, "{pad}Tags:  {tags}");
                    continue;
                }
                match scalar(val) {
                    Some(s) => {
                        let _ = writeln!(out, "{pad}{}:  {s}", title(k));
                    }
                    None => {
                        let _ = writeln!(out, "{pad}{}:", title(k));
                        describe_into(out, val, indent + 2);
                    }
                }
            }
        }
        Value::Array(a) => {
            for item in a {
                let mut inner = String::new();
                describe_into(&mut inner, item, indent + 2);
                // `- ` in place of the first line's indentation.
                let inner = inner.replacen(&format!("{pad}  "), &format!("{pad}- "), 1);
                out.push_str(&inner);
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other).unwrap_or_default());
        }
    }
}

/// Prints the resources of a describe: `{key: [...]}` as data, or one describe block each.
pub fn print_describe(api: &Api, key: &str, items: Vec<Value>) {
    let text = |items: &[Value]| {
        let mut out = String::new();
        for (i, v) in items.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&describe_text(v));
        }
        output::write_stdout(out.as_bytes());
    };
    api.emit(|| json!({ key: &items }), |_| text(&items));
}

/// Prints resources: an aligned table (`table` builds it; `-o wide` shows its wide columns),
/// `describe` blocks, or the data `{key: [...]}` (the describe response without its page
/// token).
pub fn show_list<T: ToJson>(
    api: &Api,
    key: &str,
    items: &[T],
    describe: bool,
    table: fn(&[T]) -> Table,
) {
    if describe {
        return print_describe(api, key, items.iter().map(ToJson::to_json).collect());
    }
    api.emit(
        || json!({ key: items.iter().map(ToJson::to_json).collect::<Vec<_>>() }),
        |wide| table(items).print_as(wide),
    );
}

/// Prints a created or changed resource: its table row, or the data `{key: {...}}` (the
/// response message).
pub fn show_one<T: ToJson>(api: &Api, key: &str, item: &T, table: fn(&[T]) -> Table) {
    api.emit(
        || json!({ key: item.to_json() }),
        |wide| table(std::slice::from_ref(item)).print_as(wide),
    );
}

/// A write without a resource in its answer: `<what> <verb> (revision N)`, or `{}` (the empty
/// response message) as data.
pub fn show_done(api: &Api, what: &str, verb: &str, rev: Option<i64>) {
    api.emit(|| json!({}), |_| done(what, verb, rev));
}

/// The resource a response must carry.
pub fn need<T>(v: Option<T>, what: &str) -> Result<T, CliError> {
    v.ok_or_else(|| CliError::Local(anyhow::anyhow!("the response carries no {what}")))
}

/// lower_snake -> lowerCamel (proto3 JSON names).
pub fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// A message (or field) as JSON, proto3 field names.
pub trait ToJson {
    /// The JSON value.
    fn to_json(&self) -> Value;
}

impl ToJson for String {
    fn to_json(&self) -> Value {
        Value::String(self.clone())
    }
}
impl ToJson for bool {
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
}
macro_rules! num_json {
    ($($t:ty),*) => {$(
        impl ToJson for $t {
            fn to_json(&self) -> Value {
                json!(*self)
            }
        }
    )*};
}
num_json!(u32, i32, u64, i64, f64);

impl<T: ToJson> ToJson for Vec<T> {
    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(ToJson::to_json).collect())
    }
}
impl<T: ToJson> ToJson for Option<T> {
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToJson::to_json)
    }
}

/// `impl ToJson` listing every field of a message: the destructuring has no `..`, so a field
/// added to the proto and not here is a compile error.
macro_rules! message_json {
    ($($ty:path { $($f:ident),* $(,)? })*) => {$(
        impl ToJson for $ty {
            fn to_json(&self) -> Value {
                let $ty { $($f),* } = self;
                let mut m = Map::new();
                $( m.insert(camel(stringify!($f)), $f.to_json()); )*
                Value::Object(m)
            }
        }
    )*};
}

message_json! {
    pb::Tag { key, value }
    pb::Vpc {
        vpc_id, cidr_block, vni, state, owner_id, tags, default_security_group_id,
        default_network_acl_id, main_route_table_id, conntrack_share_percent,
    }
    pb::Subnet {
        subnet_id, vpc_id, cidr_block, available_ip_address_count, network_acl_id, state,
        owner_id, tags,
    }
    pb::Route { destination_cidr_block, gateway_id, state }
    pb::RouteTable { route_table_id, vpc_id, main, routes, subnet_ids, owner_id }
    pb::SecurityGroupRule {
        security_group_rule_id, ip_protocol, from_port, to_port, cidr_ipv4,
        referenced_group_id, description, is_egress,
    }
    pb::SecurityGroup {
        group_id, group_name, description, vpc_id, owner_id, ingress_rules, egress_rules, tags,
    }
    pb::NetworkAclEntry {
        rule_number, protocol, rule_action, egress, cidr_block, from_port, to_port,
    }
    pb::NetworkAcl { network_acl_id, vpc_id, is_default, entries, subnet_ids, owner_id, tags }
    pb::Instance {
        instance_id, subnet_id, vpc_id, private_ip_address, mac_address, security_group_ids,
        state, host_id, instance_type, owner_id, tags, netns, state_reason, launch_time_ms,
        private_dns_name, command, vcpus, memory_mib, block_device_mappings,
    }
    pb::BlockDeviceMapping { device_name, volume_id, mount_path, status }
    pb::Volume {
        volume_id, size_gib, state, attached_instance_id, owner_id, tags, host_id, snapshot_id,
        device, mount_path, attachment_state, state_reason, create_time_ms,
    }
    pb::Snapshot {
        snapshot_id, volume_id, volume_size_gib, state, state_reason, description, owner_id,
        tags, start_time_ms,
    }
    pb::Listener { listener_id, protocol, port, target_group_id }
    pb::LoadBalancer {
        load_balancer_id, name, subnet_id, vpc_id, vip, listeners, state, owner_id, tags,
    }
    pb::HealthCheck {
        protocol, port, path, interval_seconds, timeout_seconds, healthy_threshold,
        unhealthy_threshold,
    }
    pb::Target { id, port, weight }
    pb::TargetGroup {
        target_group_id, name, vpc_id, protocol, port, health_check,
        deregistration_delay_seconds, targets, load_balancer_ids, owner_id, tags,
    }
    pb::Host { host_id, underlay_ip, connected, applied_revision, last_error, instance_count, counters, recent_drops, recent_seconds, conntrack }
    pb::ConntrackSummary { entries, capacity, per_vni }
    pb::VniFlows {
        vni, flows, vpc_id, budget_limit, budget_count, top_sources, top_flows, budget_drops,
    }
    pb::CtTopSource { address, flows }
    pb::CtTopFlow { protocol, src, src_port, dst, dst_port, packets, bytes }
    pb::TraceStageResult { host_id, stage, result, detail }
    pb::TracePacketResponse {
        stages, verdict, drop_reason, drop_host_id, delivered_to, packet,
    }
    pb::DatapathCounter { hook, name, drop, packets, bytes }
    pb::TargetHealthDescription { target_id, port, state, reason, host_id }
    pb::GetProgrammingLatencyResponse { samples, p50_ms, p99_ms, max_ms, last_ms }
}

/// The `Name` tag, or empty.
pub fn name_tag(tags: &[pb::Tag]) -> String {
    tags.iter()
        .find(|t| t.key == "Name")
        .map(|t| t.value.clone())
        .unwrap_or_default()
}

/// Every tag as `k=v,k2=v2` (wide tables).
pub fn tags_text(tags: &[pb::Tag]) -> String {
    tags.iter()
        .map(|t| format!("{}={}", t.key, t.value))
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------
// Argument parsers (clap value parsers: a bad value is a usage error, exit 2).

/// `key=value` (aws: `Key=k,Value=v`; the short form as kubectl labels). The value may be
/// empty (`key=`); the key may not.
pub fn parse_tag(s: &str) -> Result<pb::Tag, String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}`: empty tag key"));
    }
    Ok(pb::Tag {
        key: k.to_owned(),
        value: v.to_owned(),
    })
}

/// A port or port range as typed: `22` (22-22), `1000-2000`, `-1` or `all` (every port,
/// -1/-1 as the AWS API writes it). For icmp the two numbers are TYPE-CODE, so the order is
/// checked later, by [`api_ports`].
pub fn parse_port_range(s: &str) -> Result<(i32, i32), String> {
    let s = s.trim();
    if s == "-1" || s.eq_ignore_ascii_case("all") {
        return Ok((-1, -1));
    }
    let port = |p: &str| -> Result<i32, String> {
        p.trim()
            .parse::<u16>()
            .map(i32::from)
            .map_err(|_| format!("`{p}` is not a port 0-65535 (or -1 for all)"))
    };
    match s.split_once('-') {
        Some((a, b)) => Ok((port(a)?, port(b)?)),
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
    }
}

/// The `from_port`/`to_port` the API takes for `protocol` and `--port` (absent: all): tcp/udp
/// a range (all: 0-65535, from <= to); icmp TYPE or TYPE-CODE (all: -1, any code: -1);
/// other protocols -1/-1.
pub fn api_ports(protocol: &str, port: Option<(i32, i32)>) -> Result<(i32, i32), String> {
    match (protocol, port) {
        ("tcp" | "udp", None | Some((-1, -1))) => Ok((0, 65535)),
        ("tcp" | "udp", Some((f, t))) if f > t => {
            Err(format!("--port {f}-{t}: the range is reversed ({f} > {t})"))
        }
        ("tcp" | "udp", Some(r)) => Ok(r),
        ("icmp", None | Some((-1, -1))) => Ok((-1, -1)),
        ("icmp", Some((ty, code))) if ty == code => Ok((ty, -1)),
        ("icmp", Some(r)) => Ok(r),
        (_, None | Some((-1, -1))) => Ok((-1, -1)),
        (p, Some(_)) => Err(format!(
            "--port: protocol {} takes no ports",
            protocol_text(p)
        )),
    }
}

/// A target: `i-...` (the group's port) or `i-...:PORT`.
pub fn parse_target(s: &str) -> Result<pb::Target, String> {
    let (id, port) = match s.rsplit_once(':') {
        Some((id, p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{s}`: `{p}` is not a port 1-65535"))?;
            (id, u32::from(port))
        }
        None => (s, 0),
    };
    if id.is_empty() {
        return Err(format!("`{s}`: empty instance id"));
    }
    Ok(pb::Target {
        id: id.to_owned(),
        port,
        weight: 0,
    })
}

/// An IP protocol as the API writes it: tcp, udp, icmp, -1 (all) or a number.
pub fn parse_protocol(s: &str) -> Result<String, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Ok("tcp".into()),
        "udp" | "17" => Ok("udp".into()),
        "icmp" | "1" => Ok("icmp".into()),
        "-1" | "all" => Ok("-1".into()),
        n if n.parse::<u8>().is_ok() => Ok(n.into()),
        _ => Err(format!(
            "`{s}` is not tcp, udp, icmp, -1 (all) or a number 0-255"
        )),
    }
}

/// Shows a port range: `22`, `1000-2000`, `all`.
pub fn port_range_text(protocol: &str, from: i32, to: i32) -> String {
    if protocol == "-1" || (from == -1 && to == -1) || (from == 0 && to == 65535) {
        "all".into()
    } else if from == to {
        from.to_string()
    } else {
        format!("{from}-{to}")
    }
}

/// Protocol for display (`-1` is `all`).
pub fn protocol_text(p: &str) -> String {
    if p == "-1" { "all".into() } else { p.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("22"), Ok((22, 22)));
        assert_eq!(parse_port_range("1000-2000"), Ok((1000, 2000)));
        assert_eq!(parse_port_range("-1"), Ok((-1, -1)));
        assert_eq!(parse_port_range("all"), Ok((-1, -1)));
        assert_eq!(parse_port_range("0-65535"), Ok((0, 65535)));
        assert_eq!(parse_port_range(" 443 "), Ok((443, 443)));
        assert!(parse_port_range("65536").is_err());
        assert!(parse_port_range("ssh").is_err());
        assert!(parse_port_range("").is_err());
        assert!(parse_port_range("1-").is_err());
        assert!(parse_port_range("-2").is_err());
    }

    #[test]
    fn ports_for_the_api() {
        assert_eq!(api_ports("tcp", Some((22, 22))), Ok((22, 22)));
        assert_eq!(api_ports("tcp", Some((-1, -1))), Ok((0, 65535)));
        assert_eq!(api_ports("udp", None), Ok((0, 65535)));
        assert!(api_ports("tcp", Some((2000, 1000))).is_err());
        assert_eq!(api_ports("icmp", None), Ok((-1, -1)));
        assert_eq!(api_ports("icmp", Some((8, 8))), Ok((8, -1)));
        assert_eq!(api_ports("icmp", Some((3, 4))), Ok((3, 4)));
        assert_eq!(api_ports("-1", None), Ok((-1, -1)));
        assert!(api_ports("-1", Some((80, 80))).is_err());
    }

    #[test]
    fn tags() {
        let t = parse_tag("Name=web").unwrap();
        assert_eq!((t.key.as_str(), t.value.as_str()), ("Name", "web"));
        let t = parse_tag("env=").unwrap();
        assert_eq!((t.key.as_str(), t.value.as_str()), ("env", ""));
        let t = parse_tag("k=a=b").unwrap();
        assert_eq!((t.key.as_str(), t.value.as_str()), ("k", "a=b"));
        assert!(parse_tag("novalue").is_err());
        assert!(parse_tag("=v").is_err());
    }

    #[test]
    fn targets() {
        let t = parse_target("i-0123456789abcdef0:8080").unwrap();
        assert_eq!((t.id.as_str(), t.port), ("i-0123456789abcdef0", 8080));
        let t = parse_target("i-0123456789abcdef0").unwrap();
        assert_eq!((t.id.as_str(), t.port), ("i-0123456789abcdef0", 0));
        assert!(parse_target("i-0123:0").is_err());
        assert!(parse_target("i-0123:http").is_err());
        assert!(parse_target("i-0123:70000").is_err());
        assert!(parse_target(":80").is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_protocol("TCP").unwrap(), "tcp");
        assert_eq!(parse_protocol("all").unwrap(), "-1");
        assert!(parse_protocol("sctp").is_err());
        assert_eq!(port_range_text("tcp", 22, 22), "22");
        assert_eq!(port_range_text("tcp", 1000, 2000), "1000-2000");
        assert_eq!(port_range_text("-1", -1, -1), "all");
    }

    #[test]
    fn invalid_argument_names_the_fields() {
        let s = Status::with_error_details(
            Code::InvalidArgument,
            "cidr_block: `10.0.0.0/33` is not a CIDR",
            ErrorDetails::with_bad_request_violation("cidr_block", "not an IPv4 CIDR"),
        );
        let e = CliError::from(s);
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.render("http://x"),
            "error: INVALID_ARGUMENT: cidr_block: `10.0.0.0/33` is not a CIDR\n  \
             field cidr_block: not an IPv4 CIDR\n"
        );
    }

    #[test]
    fn other_errors_and_exit_codes() {
        let e = CliError::from(Status::not_found("vpc vpc-0 not found"));
        assert_eq!(e.exit_code(), 2);
        assert_eq!(e.render("u"), "error: NOT_FOUND: vpc vpc-0 not found\n");
        let e = CliError::from(Status::failed_precondition("has subnets"));
        assert_eq!(e.exit_code(), 2);
        let e = CliError::from(Status::unavailable("connection refused"));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.render("http://127.0.0.1:7420"),
            "error: UNAVAILABLE: connection refused\n  \
             (is the control plane at http://127.0.0.1:7420 running?)\n"
        );
        let e = CliError::from(Status::unauthenticated("no token"));
        assert_eq!(e.exit_code(), 2);
        assert!(e.render("u").contains("VPC_TOKEN"));
        let e = CliError::Local(anyhow::anyhow!("cannot connect"));
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.render("u"), "error: cannot connect\n");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["ID", "CIDR", "STATE"]);
        t.row(vec![
            "vpc-1".into(),
            "10.0.0.0/16".into(),
            "available".into(),
        ]);
        t.row(vec!["vpc-22222".into(), String::new(), "pending".into()]);
        assert_eq!(
            t.render_as(false),
            "ID          CIDR          STATE\n\
             vpc-1       10.0.0.0/16   available\n\
             vpc-22222   -             pending\n"
        );
    }

    #[test]
    fn wide_columns_only_in_wide() {
        let mut t = Table::new(&["ID", "STATE"]).wide(&["MAC", "REASON"]);
        t.row(vec![
            "i-1".into(),
            "running".into(),
            "02:00:00:00:00:01".into(),
            String::new(),
        ]);
        assert_eq!(t.render_as(false), "ID    STATE\ni-1   running\n");
        assert_eq!(
            t.render_as(true),
            "ID    STATE     MAC                 REASON\n\
             i-1   running   02:00:00:00:00:01   -\n"
        );
        // A table without wide columns is the same either way.
        let mut t = Table::new(&["ID"]);
        t.row(vec!["x".into()]);
        assert_eq!(t.render_as(true), t.render_as(false));
        let tags = [
            pb::Tag {
                key: "Name".into(),
                value: "a".into(),
            },
            pb::Tag {
                key: "env".into(),
                value: String::new(),
            },
        ];
        assert_eq!(tags_text(&tags), "Name=a,env=");
    }

    #[test]
    fn json_of_messages() {
        let v = pb::Vpc {
            vpc_id: "vpc-1".into(),
            cidr_block: "10.0.0.0/16".into(),
            vni: 7,
            tags: vec![pb::Tag {
                key: "Name".into(),
                value: "a".into(),
            }],
            ..Default::default()
        }
        .to_json();
        assert_eq!(v["vpcId"], "vpc-1");
        assert_eq!(v["vni"], 7);
        assert_eq!(v["tags"][0]["key"], "Name");
        assert_eq!(v["defaultSecurityGroupId"], "");
        let tg = pb::TargetGroup::default().to_json();
        assert_eq!(tg["healthCheck"], Value::Null);
        assert_eq!(tg["deregistrationDelaySeconds"], 0);
        let text = describe_text(&v);
        assert!(text.contains("Vpc Id:  vpc-1\n"), "{text}");
        assert!(text.contains("Tags:  Name=a\n"), "{text}");
    }
}
