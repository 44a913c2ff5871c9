//! The agent's link to the control plane: registers the host, watches its desired state
//! (reconnecting with backoff: meanwhile the datapath keeps forwarding with what it has)
//! and reports the revisions applied.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tracing::{info, warn};
use vpc_proto::v1::{self as pb, host_service_client::HostServiceClient};

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct CpConfig {
    /// `http://host:port` or `https://...`.
    pub url: String,
    /// Agent bearer token.
    pub token: String,
    /// This host.
    pub host_id: String,
    /// Its underlay address.
    pub underlay_ip: String,
    /// CA of the control plane's certificate (https).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (mutual TLS).
    pub tls_identity: Option<(PathBuf, PathBuf)>,
}

use vpc_proto::Bearer;

type Client = HostServiceClient<InterceptedService<Channel, Bearer>>;

/// A client with the agent's token on every call.
pub async fn connect(cfg: &CpConfig) -> Result<Client> {
    let (channel, bearer) = connect_channel(cfg).await?;
    Ok(HostServiceClient::with_interceptor(channel, bearer))
}

/// A channel to the control plane and the agent's token (for any service's client).
pub async fn connect_channel(cfg: &CpConfig) -> Result<(Channel, Bearer)> {
    let mut ep = Endpoint::from_shared(cfg.url.clone())
        .with_context(|| format!("control-plane URL {}", cfg.url))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_keepalive(Some(Duration::from_secs(10)))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    if cfg.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cfg.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ));
        }
        if let Some((cert, key)) = &cfg.tls_identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
            ));
        }
        ep = ep.tls_config(tls)?;
    }
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {}", cfg.url))?;
    let bearer = Bearer::new(&cfg.token).context("the agent token is not valid header text")?;
    Ok((channel, bearer))
}

/// A desired state received.
#[derive(Debug)]
pub struct Received {
    /// Store revision.
    pub revision: i64,
    /// The document.
    pub document: Vec<u8>,
}

/// Runs forever: (re)connects, registers, watches; sends every state to `tx`. `applied`
/// gives the last applied revision (sent when reconnecting).
pub async fn watch_loop(
    cfg: CpConfig,
    tx: mpsc::Sender<Received>,
    applied: tokio::sync::watch::Receiver<i64>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match watch_once(&cfg, &tx, &applied).await {
            Ok(()) => warn!("control-plane stream ended; reconnecting"),
            Err(e) => warn!(
                error = format!("{e:#}"),
                "control plane unreachable; the datapath keeps its current state"
            ),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn watch_once(
    cfg: &CpConfig,
    tx: &mpsc::Sender<Received>,
    applied: &tokio::sync::watch::Receiver<i64>,
) -> Result<()> {
    let mut client = connect(cfg).await?;
    client
        .register_host(pb::RegisterHostRequest {
            host_id: cfg.host_id.clone(),
            underlay_ip: cfg.underlay_ip.clone(),
        })
        .await
        .context("registering the host")?;
    let applied_revision = *applied.borrow();
    let mut stream = client
        .watch_desired_state(pb::WatchDesiredStateRequest {
            host_id: cfg.host_id.clone(),
            applied_revision,
        })
        .await
        .context("watching the desired state")?
        .into_inner();
    info!(url = %cfg.url, host = %cfg.host_id, "watching the desired state");
    while let Some(msg) = stream.next().await {
        let msg = msg.context("desired-state stream")?;
        crate::metrics::get().received(msg.revision);
        if tx
            .send(Received {
                revision: msg.revision,
                document: msg.document,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// A report: the revision applied (or why not) and what the compute and storage agents
/// observe.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The revision.
    pub revision: i64,
    /// Empty when applied.
    pub error: String,
    /// Instances, volumes, snapshots.
    pub observed: crate::workloads::Observed,
    /// The datapath's counters.
    pub counters: Vec<pb::DatapathCounter>,
    /// Load-balancer targets as this host's checks see them.
    pub target_health: Vec<pb::TargetHealthReport>,
    /// The conntrack table at the last GC.
    pub conntrack: Option<pb::ConntrackSummary>,
}

/// Sends a report (best effort: a lost report is repeated by the next one). Returns whether
/// it was delivered.
pub async fn report(client: &mut Client, host: &str, r: Report) -> bool {
    match client
        .report_applied(pb::ReportAppliedRequest {
            host_id: host.to_owned(),
            revision: r.revision,
            error: r.error,
            instances: r.observed.instances,
            volumes: r.observed.volumes,
            snapshots: r.observed.snapshots,
            counters: r.counters,
            target_health: r.target_health,
            conntrack: r.conntrack,
        })
        .await
    {
        Ok(_) => true,
        Err(e) => {
            warn!(error = %e, "reporting the applied revision");
            false
        }
    }
}

/// Reports over a lazily (re)connected client.
pub async fn report_loop(cfg: CpConfig, mut rx: mpsc::UnboundedReceiver<Report>) {
    let mut client: Option<Client> = None;
    // Console output not delivered yet (it is only sent when it grew, so a lost report
    // would lose it).
    let mut undelivered: HashMap<String, Vec<u8>> = HashMap::new();
    while let Some(mut r) = rx.recv().await {
        // Only the newest report matters (each carries everything observed), except for
        // console output: keep the newest of each instance.
        while let Ok(next) = rx.try_recv() {
            undelivered.extend(consoles(&mut r));
            r = next;
        }
        for i in &mut r.observed.instances {
            if i.console.is_empty()
                && let Some(c) = undelivered.remove(&i.instance_id)
            {
                i.console = c;
            }
        }
        if client.is_none() {
            client = connect(&cfg).await.ok();
        }
        let revision = r.revision;
        let pending: Vec<(String, Vec<u8>)> = r
            .observed
            .instances
            .iter()
            .filter(|i| !i.console.is_empty())
            .map(|i| (i.instance_id.clone(), i.console.clone()))
            .collect();
        let delivered = match client.as_mut() {
            Some(c) => report(c, &cfg.host_id, r).await,
            None => false,
        };
        if !delivered {
            warn!("control plane unreachable; report of revision {revision} dropped");
            undelivered.extend(pending);
            client = None;
        }
    }
}

/// Takes the non-empty console outputs out of a report.
fn consoles(r: &mut Report) -> HashMap<String, Vec<u8>> {
    r.observed
        .instances
        .iter_mut()
        .filter(|i| !i.console.is_empty())
        .map(|i| (i.instance_id.clone(), std::mem::take(&mut i.console)))
        .collect()
}
