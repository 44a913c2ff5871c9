//! The metrics HTTP endpoint: `GET /metrics` answers the text exposition
//! (`text/plain; version=0.0.4`), rendered at scrape time.
//!
//! A bind failure is not fatal to the caller's process (the agent must keep its datapath,
//! the control plane its API): [`spawn`] logs it and serves nothing.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders one scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// A `--metrics-addr` value: an address, or none (the endpoint disabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_addr(text).map(MetricsAddr)
    }
}

/// Parses a `--metrics-addr` value: `none`, `off` or empty disable the endpoint.
pub fn parse_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    match text.trim() {
        "" | "none" | "off" => Ok(None),
        t => t
            .parse()
            .map(Some)
            .map_err(|e| format!("{t:?} is not ADDRESS:PORT or none: {e}")),
    }
}

async fn metrics(State(render): State<Render>) -> impl IntoResponse {
    let body = render().await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

async fn index() -> &'static str {
    "vpc metrics: GET /metrics\n"
}

/// The router: `/metrics`, and `/` pointing at it.
pub fn router(render: Render) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(render)
}

/// Binds `addr` and serves `render` on it in a task; returns the bound address (port 0:
/// the one chosen), or `None` when binding failed (logged).
pub async fn spawn(addr: SocketAddr, render: Render) -> Option<SocketAddr> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve metrics (--metrics-addr); continuing without them");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    let app = router(render);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    Some(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_none_disables() {
        assert_eq!(parse_addr("none"), Ok(None));
        assert_eq!(parse_addr(""), Ok(None));
        assert_eq!(
            parse_addr("127.0.0.1:9464"),
            Ok(Some("127.0.0.1:9464".parse().unwrap()))
        );
        assert!(parse_addr("localhost").is_err());
        assert_eq!("none".parse::<MetricsAddr>(), Ok(MetricsAddr(None)));
    }

    #[tokio::test]
    async fn serves_the_rendered_text_with_its_content_type() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let render: Render = Arc::new(|| Box::pin(async { "vpc_up 1\n".to_owned() }));
        let addr = spawn("127.0.0.1:0".parse().unwrap(), render).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{text}"
        );
        assert!(text.ends_with("vpc_up 1\n"), "{text}");
        // The same address cannot be bound twice: the second endpoint is skipped, not fatal.
        let render: Render = Arc::new(|| Box::pin(async { String::new() }));
        assert_eq!(spawn(addr, render).await, None);
    }
}
