//! API latency by gRPC method and status code: a tower layer around the tonic server.
//!
//! The time measured is from the request's arrival to the response's headers: the whole call
//! for unary methods, the setup for streaming ones (a stream's later messages are not API
//! latency). The code is the `grpc-status` of the response headers (tonic answers errors as
//! trailers-only responses, so every error returned by a handler is seen here); a response
//! without one is a call that started successfully: `OK`. A transport error is `UNKNOWN`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::http::{Request, Response};

use super::{
    exposition::Exposition,
    histogram::{API_LATENCY_BUCKETS, HistogramVec},
};

/// Distinct (service, method, code) series kept; more fold into `overflow` (unknown method
/// names come from clients).
const MAX_SERIES: usize = 2048;

/// The API's latency histograms.
#[derive(Debug)]
pub struct ApiMetrics {
    latency: HistogramVec,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            latency: HistogramVec::new(API_LATENCY_BUCKETS, MAX_SERIES),
        }
    }
}

/// The canonical name of a gRPC status code number (`INVALID_ARGUMENT`, ...).
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// (service, method) of a gRPC path `/package.Service/Method`; anything else is
/// (`other`, `other`).
pub fn split_path(path: &str) -> (&str, &str) {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    };
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, method)) if valid(service) && valid(method) => (service, method),
        _ => ("other", "other"),
    }
}

impl ApiMetrics {
    /// Records one call.
    pub fn observe(&self, path: &str, code: &str, seconds: f64) {
        // Callers choose paths, authenticated or not: only served methods get their own
        // series (an unknown service or method is answered UNIMPLEMENTED), so nobody can
        // crowd the real methods out of the series cap.
        let (service, method) = match split_path(path) {
            _ if code == "UNIMPLEMENTED" => ("other", "other"),
            (s, m) if s.starts_with("vpc.v1.") || s.starts_with("grpc.") => (s, m),
            _ => ("other", "other"),
        };
        self.latency.observe(&[service, method, code], seconds);
    }

    /// Adds the API's families to `e`.
    pub fn collect(&self, e: &mut Exposition) {
        const LAT: &str = "vpc_api_request_duration_seconds";
        const LAT_HELP: &str = "gRPC API latency (request to response headers: the whole call for unary methods, the setup for streams), by service, method and status code";
        const REQ: &str = "vpc_api_requests_total";
        const REQ_HELP: &str = "gRPC API calls, by service, method and status code";
        e.declare(LAT, LAT_HELP, super::Kind::Histogram);
        e.declare(REQ, REQ_HELP, super::Kind::Counter);
        for (labels, h) in self.latency.snapshot() {
            let [service, method, code] = [&labels[0], &labels[1], &labels[2]];
            let l = [
                ("service", service.as_str()),
                ("method", method.as_str()),
                ("code", code.as_str()),
            ];
            e.histogram(LAT, LAT_HELP, &l, &h);
            e.counter(REQ, REQ_HELP, &l, h.count as f64);
        }
    }
}

/// The tower layer measuring every call.
#[derive(Clone, Debug)]
pub struct ApiMetricsLayer {
    metrics: Arc<ApiMetrics>,
}

impl ApiMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<ApiMetrics>) -> Self {
        ApiMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service the layer wraps around the server's routes.
#[derive(Clone, Debug)]
pub struct ApiMetricsService<S> {
    inner: S,
    metrics: Arc<ApiMetrics>,
}

impl<S, B, RB> tower::Service<Request<B>> for ApiMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let start = Instant::now();
        let call = self.inner.call(req);
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", code_name),
                Err(_) => "UNKNOWN",
            };
            metrics.observe(&path, code, start.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/vpc.v1.VpcService/CreateVpc"),
            ("vpc.v1.VpcService", "CreateVpc")
        );
        assert_eq!(split_path("/nope"), ("other", "other"));
        assert_eq!(split_path("/a\"b/c"), ("other", "other"));
        assert_eq!(split_path("/a/"), ("other", "other"));
    }

    #[test]
    fn only_served_methods_get_their_own_series() {
        let m = ApiMetrics::default();
        m.observe("/vpc.v1.VpcService/CreateVpc", "OK", 0.001);
        m.observe("/vpc.v1.VpcService/NoSuchMethod", "UNIMPLEMENTED", 0.001);
        m.observe("/evil.Service/X1", "UNIMPLEMENTED", 0.001);
        m.observe("/evil.Service/X2", "UNAUTHENTICATED", 0.001);
        let mut e = Exposition::new();
        m.collect(&mut e);
        let text = e.render();
        assert!(text.contains(r#"method="CreateVpc""#), "{text}");
        assert!(
            !text.contains("NoSuchMethod") && !text.contains("evil"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vpc_api_requests_total{service="other",method="other",code="UNAUTHENTICATED"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(3), "INVALID_ARGUMENT");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
        for c in 0..=16 {
            assert_eq!(
                code_name(c),
                format!("{:?}", tonic::Code::from_i32(c)).chars().fold(
                    String::new(),
                    |mut s, ch| {
                        if ch.is_uppercase() && !s.is_empty() {
                            s.push('_');
                        }
                        s.push(ch.to_ascii_uppercase());
                        s
                    }
                )
            );
        }
    }

    #[tokio::test]
    async fn the_layer_records_method_code_and_latency() {
        use tower::{Layer as _, Service as _};
        let metrics = Arc::new(ApiMetrics::default());
        let inner = tower::service_fn(|req: Request<()>| async move {
            let mut resp = Response::new(());
            if req.uri().path().ends_with("Bad") {
                resp.headers_mut()
                    .insert("grpc-status", axum::http::HeaderValue::from_static("3"));
            }
            Ok::<_, std::convert::Infallible>(resp)
        });
        let mut svc = ApiMetricsLayer::new(Arc::clone(&metrics)).layer(inner);
        for path in ["/vpc.v1.X/Good", "/vpc.v1.X/Bad", "/vpc.v1.X/Bad"] {
            let req = Request::builder().uri(path).body(()).unwrap();
            svc.call(req).await.unwrap();
        }
        let mut e = Exposition::new();
        metrics.collect(&mut e);
        let text = e.render();
        assert!(
            text.contains(
                "vpc_api_requests_total{service=\"vpc.v1.X\",method=\"Bad\",code=\"INVALID_ARGUMENT\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("vpc_api_request_duration_seconds_count{service=\"vpc.v1.X\",method=\"Good\",code=\"OK\"} 1\n"),
            "{text}"
        );
    }
}
