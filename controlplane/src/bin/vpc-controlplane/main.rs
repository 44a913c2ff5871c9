//! `vpc-controlplane`: the gRPC API server (`vpc.v1`) in front of the durable store.
//!
//! Prints `listening on ADDR` on stdout once it serves (what scripts and tests wait for).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::Parser;
use controlplane::api::{Quotas, auth::Auth, server};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use vpc_store::Store;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "VPC control plane: the vpc.v1 gRPC API and its store"
)]
struct Cli {
    /// Address to serve on (port 0: any free port; the chosen address is printed).
    #[arg(long, env = "VPC_LISTEN", default_value = "127.0.0.1:7420")]
    listen: SocketAddr,
    /// Store: `redb:PATH` (embedded, the default) or `etcd:URL[,URL...]` (shared by several
    /// control-plane replicas), or `mem` (volatile, for experiments only).
    #[arg(
        long,
        env = "VPC_STORE",
        default_value = "redb:/var/lib/vpc/store.redb"
    )]
    store: String,
    /// Key prefix in etcd (several appliances can share one etcd).
    #[arg(long, default_value = "/vpc")]
    etcd_prefix: String,
    /// Credentials (JSON: accounts with their tokens, agent tokens).
    #[arg(long, env = "VPC_CREDENTIALS")]
    credentials: PathBuf,
    /// Quotas (JSON, AWS defaults for absent fields).
    #[arg(long)]
    quotas: Option<PathBuf>,
    /// Server certificate (PEM): serve TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) client certificates must chain to: mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Prometheus metrics endpoint (`GET /metrics`, plain HTTP): ADDRESS:PORT, port 0 for
    /// any free port (the chosen address is printed: `metrics on ADDR`), or `none` to
    /// disable. An address already in use is logged and skipped, not fatal.
    #[arg(
        long,
        env = "VPC_METRICS_ADDR",
        default_value = controlplane::metrics::DEFAULT_CONTROL_PLANE_ADDR,
    )]
    metrics_addr: controlplane::metrics::http::MetricsAddr,
}

async fn open_store(spec: &str, etcd_prefix: &str) -> Result<Arc<dyn Store>> {
    if spec == "mem" {
        return Ok(Arc::new(vpc_store::mem::MemStore::new()));
    }
    if let Some(path) = spec.strip_prefix("redb:") {
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let s = vpc_store::RedbStore::open(&path)
            .with_context(|| format!("opening the store {}", path.display()))?;
        return Ok(Arc::new(s));
    }
    if let Some(urls) = spec.strip_prefix("etcd:") {
        let endpoints: Vec<String> = urls.split(',').map(str::to_owned).collect();
        let s = vpc_store::EtcdStore::connect(vpc_store::EtcdOptions::new(endpoints, etcd_prefix))
            .await
            .with_context(|| format!("connecting to etcd at {urls}"))?;
        return Ok(Arc::new(s));
    }
    bail!("--store {spec:?}: expected redb:PATH, etcd:URL[,URL...] or mem")
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let auth = Auth::load(&cli.credentials)?;
    let quotas: Quotas = match &cli.quotas {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => Quotas::default(),
    };
    let store = open_store(&cli.store, &cli.etcd_prefix).await?;
    let api = server::api(store, auth, quotas).await?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let addr = listener.local_addr()?;
    let tls = cli.tls_cert.as_ref().map(|cert| server::TlsFiles {
        cert: cert.clone(),
        key: cli.tls_key.clone().unwrap_or_default(),
        client_ca: cli.tls_client_ca.clone(),
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
    }
    let calls = Arc::new(controlplane::metrics::ApiMetrics::default());
    if let Some(maddr) = cli.metrics_addr.0 {
        let collector = Arc::new(
            controlplane::metrics::control_plane::ControlPlaneMetrics::new(
                api.clone(),
                Arc::clone(&calls),
            ),
        );
        let render: controlplane::metrics::http::Render = Arc::new(move || {
            let c = Arc::clone(&collector);
            Box::pin(async move { c.render().await })
        });
        if let Some(bound) = controlplane::metrics::http::spawn(maddr, render).await {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "metrics on {bound}").and_then(|()| out.flush());
            info!(%bound, "serving metrics");
        }
    }
    info!(%addr, store = %cli.store, tls = tls.is_some(), "serving vpc.v1");
    server::serve(api, listener, tls, calls, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_defaults_to_loopback_and_none_disables() {
        let cli = Cli::try_parse_from(["vpc-controlplane", "--credentials", "c.json"]).unwrap();
        assert_eq!(
            cli.metrics_addr.0,
            Some(
                controlplane::metrics::DEFAULT_CONTROL_PLANE_ADDR
                    .parse()
                    .unwrap()
            )
        );
        let cli = Cli::try_parse_from([
            "vpc-controlplane",
            "--credentials",
            "c.json",
            "--metrics-addr",
            "none",
        ])
        .unwrap();
        assert_eq!(cli.metrics_addr.0, None);
    }
}
