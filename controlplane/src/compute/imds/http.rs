//! Just enough HTTP/1.x for the metadata service: parsing one request from the bytes received
//! so far, and serializing one response. Pure; no I/O.
//!
//! One request per connection: every response carries `Connection: close` and the server
//! closes after sending it (EC2 clients — curl, wget, the AWS SDKs, cloud-init — all cope).
//! Request bodies are read (so a client that sends one is not reset) and ignored;
//! `Transfer-Encoding` is refused, since nothing the service answers takes a body.

/// The most bytes a request (head and body) may have; more is answered 400.
pub const MAX_REQUEST: usize = 8 * 1024;

/// The most header lines a request may have; more is answered 400.
pub const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The request target (origin form: starts with `/`), query string included.
    pub target: String,
    /// The minor version: `HTTP/1.0` or `HTTP/1.1`.
    pub minor_version: u8,
    /// The header fields, names as sent, values trimmed of surrounding whitespace.
    pub headers: Vec<(String, String)>,
}

/// What the bytes received so far amount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    /// Not a whole request yet, and nothing wrong so far: wait for more.
    Incomplete,
    /// A whole request (its body, if any, received and dropped).
    Complete(Request),
    /// Not a valid request, or too large: answer 400 and close.
    Bad(&'static str),
}

/// Parses the start of a connection's byte stream. Bare LF line ends are accepted as well as
/// CRLF (RFC 9112 §2.2).
pub fn parse(buf: &[u8]) -> Parse {
    let Some(head_len) = head_end(buf) else {
        return if buf.len() >= MAX_REQUEST {
            Parse::Bad("request head too large")
        } else {
            Parse::Incomplete
        };
    };
    if head_len > MAX_REQUEST {
        return Parse::Bad("request head too large");
    }
    let Ok(head) = std::str::from_utf8(&buf[..head_len]) else {
        return Parse::Bad("request head is not UTF-8");
    };
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Bad("malformed request line");
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Parse::Bad("malformed method");
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Parse::Bad("malformed request target");
    }
    let minor_version = match version {
        "HTTP/1.0" => 0,
        "HTTP/1.1" => 1,
        _ => return Parse::Bad("unsupported HTTP version"),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            // The blank line(s) ending the head.
            continue;
        }
        if headers.len() == MAX_HEADERS {
            return Parse::Bad("too many header fields");
        }
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Bad("malformed header field");
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Parse::Bad("malformed header field name");
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Parse::Bad("malformed header field value");
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    let request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        minor_version,
        headers,
    };
    if request.header("transfer-encoding").is_some() {
        return Parse::Bad("transfer-encoding is not supported");
    }
    let mut lengths = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    let body_len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some((_, v)), None) => match v.parse::<usize>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Parse::Bad("malformed content-length"),
        },
        (Some(_), Some(_)) => return Parse::Bad("repeated content-length"),
    };
    match head_len.checked_add(body_len) {
        Some(total) if total <= MAX_REQUEST => {
            if buf.len() >= total {
                Parse::Complete(request)
            } else {
                Parse::Incomplete
            }
        }
        _ => Parse::Bad("request too large"),
    }
}

impl Request {
    /// The value of the first header field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The value of the first header field named `name` (case-insensitive) in `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The length of the head including its terminating blank line, if it has been received.
fn head_end(buf: &[u8]) -> Option<usize> {
    // Only the first MAX_REQUEST + 4 bytes can hold an acceptable head's end.
    let window = &buf[..buf.len().min(MAX_REQUEST + 4)];
    let mut i = 0;
    while let Some(pos) = window[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let rest = &window[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// RFC 9110 `tchar`: the characters of methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// Other header fields (besides `Content-Type`, `Content-Length`, `Connection`, `Server`).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// `text/plain`, the type of nearly every answer (as on EC2).
pub const TEXT: &str = "text/plain";

impl HttpResponse {
    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse {
            status,
            content_type: TEXT,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// An error response whose body is the reason phrase.
    pub fn error(status: u16) -> HttpResponse {
        let mut body = reason(status).to_owned();
        body.push('\n');
        HttpResponse::text(status, body)
    }

    /// The bytes on the wire: status line, header fields, blank line, body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nServer: vpc-imds\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// The reason phrase of the status codes the service uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> Request {
        match parse(buf) {
            Parse::Complete(r) => r,
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn parses_a_curl_request() {
        let r = complete(
            b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/latest/meta-data/instance-id");
        assert_eq!(r.minor_version, 1);
        assert_eq!(r.header("host"), Some("169.254.169.254"));
        assert_eq!(r.header("ACCEPT"), Some("*/*"));
        assert_eq!(r.header("x-missing"), None);
    }

    #[test]
    fn http_1_0_and_bare_lf() {
        let r = complete(b"GET / HTTP/1.0\nX-A:  b \n\n");
        assert_eq!(r.minor_version, 0);
        assert_eq!(r.headers, vec![("X-A".to_owned(), "b".to_owned())]);
        complete(b"GET / HTTP/1.0\r\n\r\n");
    }

    #[test]
    fn partial_requests_wait() {
        let full = b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n";
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Parse::Incomplete, "prefix of {n} bytes");
        }
        complete(full);
    }

    #[test]
    fn bodies_are_awaited_then_ignored() {
        let head = b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(parse(head), Parse::Incomplete);
        let mut buf = head.to_vec();
        buf.extend_from_slice(b"abcd");
        assert_eq!(parse(&buf), Parse::Incomplete);
        buf.push(b'e');
        assert_eq!(complete(&buf).method, "PUT");
    }

    #[test]
    fn malformed_requests_are_bad() {
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET http://169.254.169.254/ HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / FOO\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: \x01\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parse::Bad(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_requests_are_bad() {
        // A head that never ends.
        let mut buf = b"GET / HTTP/1.1\r\nX: ".to_vec();
        buf.resize(MAX_REQUEST - 1, b'a');
        assert_eq!(parse(&buf), Parse::Incomplete);
        buf.push(b'a');
        assert!(matches!(parse(&buf), Parse::Bad(_)));
        // A head that ends past the limit.
        buf.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse(&buf), Parse::Bad(_)));
        // A body past the limit.
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_REQUEST}\r\n\r\n");
        assert!(matches!(parse(big.as_bytes()), Parse::Bad(_)));
        let huge = "PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert!(matches!(parse(huge.as_bytes()), Parse::Bad(_)));
        // Too many header fields.
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(parse(many.as_bytes()), Parse::Bad(_)));
    }

    #[test]
    fn serializes_responses() {
        let mut r = HttpResponse::text(200, "i-1");
        r.headers.push(("X-Extra", "1".to_owned()));
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\nServer: vpc-imds\r\nX-Extra: 1\r\n\r\ni-1"
        );
        let e = HttpResponse::error(404);
        assert_eq!(e.body, b"Not Found\n");
        assert!(e.to_bytes().starts_with(b"HTTP/1.1 404 Not Found\r\n"));
    }
}
