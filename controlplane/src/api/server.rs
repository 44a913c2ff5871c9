//! Wiring: every service, the standard health service, reflection, optional (mutual) TLS.

use std::{future::Future, path::PathBuf, sync::Arc};

use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use vpc_proto::v1::{
    flow_log_service_server::FlowLogServiceServer, host_service_server::HostServiceServer,
    instance_service_server::InstanceServiceServer,
    load_balancer_service_server::LoadBalancerServiceServer,
    security_service_server::SecurityServiceServer, tag_service_server::TagServiceServer,
    volume_service_server::VolumeServiceServer, vpc_service_server::VpcServiceServer,
};
use vpc_store::Store;

use super::{Api, Quotas, auth::Auth, desired, programming::Programming};

/// TLS material (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA that client certificates must chain to: mutual TLS (clients without a valid
    /// certificate are refused at the handshake).
    pub client_ca: Option<PathBuf>,
}

/// Why the server stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading TLS files.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The store failed at startup.
    #[error("store: {0}")]
    Store(#[from] vpc_store::StoreError),
    /// The transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Builds the shared API state (starts the desired-state builder).
pub async fn api(store: Arc<dyn Store>, auth: Auth, quotas: Quotas) -> Result<Api, ServeError> {
    let quotas = Arc::new(quotas);
    let desired = desired::spawn(Arc::clone(&store), Arc::clone(&quotas)).await?;
    let api = Api {
        store,
        auth: Arc::new(auth),
        quotas,
        programming: Arc::new(Programming::default()),
        desired,
        consoles: Arc::default(),
        exec: Arc::default(),
        flows: Arc::default(),
    };
    // Terminated instances stay visible for an hour, then go.
    let gc = api.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            super::lifecycle::collect_garbage(&gc).await;
        }
    });
    Ok(api)
}

/// Serves every service on `listener` until `shutdown` resolves; every call's latency and
/// code go to `calls` (the metrics endpoint).
pub async fn serve(
    api: Api,
    listener: TcpListener,
    tls: Option<TlsFiles>,
    calls: Arc<crate::metrics::ApiMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<VpcServiceServer<super::network::Network>>()
        .await;
    health
        .set_serving::<HostServiceServer<super::host::Hosts>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vpc_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Read {
            path: "reflection descriptors".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    // Answers go out at once: with Nagle's algorithm a response written in two pieces waits
    // for the client's delayed ACK (~40 ms).
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::warn!(error = %e, "setting TCP_NODELAY");
            }
        })
    });
    let mut builder = Server::builder();
    if let Some(t) = &tls {
        let mut cfg =
            ServerTlsConfig::new().identity(Identity::from_pem(read(&t.cert)?, read(&t.key)?));
        if let Some(ca) = &t.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(cfg)?;
    }
    builder
        .layer(crate::metrics::ApiMetricsLayer::new(calls))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(VpcServiceServer::new(super::network::Network::new(
            api.clone(),
        )))
        .add_service(SecurityServiceServer::new(super::security::Security::new(
            api.clone(),
        )))
        .add_service(LoadBalancerServiceServer::new(
            super::lb::LoadBalancers::new(api.clone()),
        ))
        .add_service(InstanceServiceServer::new(super::compute::Instances::new(
            api.clone(),
        )))
        .add_service(VolumeServiceServer::new(super::volumes::Volumes::new(
            api.clone(),
        )))
        .add_service(TagServiceServer::new(super::tags::Tags::new(api.clone())))
        .add_service(FlowLogServiceServer::new(super::flowlogs::FlowLogs::new(
            api.clone(),
        )))
        .add_service(
            vpc_proto::v1::trace_service_server::TraceServiceServer::new(super::trace::Trace::new(
                api.clone(),
            )),
        )
        .add_service(HostServiceServer::new(super::host::Hosts::new(api)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
