//! The metadata tree and IMDSv2 session tokens: what one request is answered. Pure but for
//! the randomness of new tokens.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use base64::Engine as _;

use super::{
    InstanceMetadata,
    http::{HttpResponse, header},
};

/// The header carrying an IMDSv2 session token.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

/// The header of a token request giving the token's lifetime in seconds.
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";

/// The longest token lifetime (six hours, as on EC2).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(21_600);

/// The most live tokens an instance may hold; issuing one more evicts the one expiring first.
/// Bounds the memory an instance that asks for tokens in a loop can pin.
pub const MAX_TOKENS: usize = 1024;

/// The `region` of the identity document: there are no regions here.
pub const REGION: &str = "local";

/// The IMDSv2 session tokens issued to one instance, with their expiry.
#[derive(Debug, Default)]
pub struct TokenStore {
    tokens: HashMap<String, Instant>,
}

impl TokenStore {
    /// An empty store.
    pub fn new() -> TokenStore {
        TokenStore::default()
    }

    /// Issues a token valid for `ttl` from `now`: 32 random bytes, base64url. `None` if the
    /// system's random source failed.
    pub fn issue(&mut self, ttl: Duration, now: Instant) -> Option<String> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).ok()?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.retain(|_, expiry| *expiry > now);
        }
        if self.tokens.len() >= MAX_TOKENS
            && let Some(first) = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(t, _)| t.clone())
        {
            self.tokens.remove(&first);
        }
        self.tokens.insert(token.clone(), now + ttl);
        Some(token)
    }

    /// Whether `token` was issued here and has not expired at `now`. An expired token is
    /// forgotten.
    pub fn check(&mut self, token: &str, now: Instant) -> bool {
        match self.tokens.get(token) {
            Some(expiry) if *expiry > now => true,
            Some(_) => {
                self.tokens.remove(token);
                false
            }
            None => false,
        }
    }

    /// How many tokens are held (expired ones included until looked at or evicted).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// A node of the tree.
enum Node {
    /// A directory: its entries, subdirectories ending with `/`.
    Listing(Vec<String>),
    /// A leaf's value, `text/plain`.
    Text(String),
    /// A leaf with another content type.
    Bytes(&'static str, Vec<u8>),
}

/// The answer to one request.
///
/// - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..=21600` issues an
///   IMDSv2 token (400 if the TTL is missing or out of range; 403 if the request carries
///   `X-Forwarded-For`, i.e. came through a proxy, as on EC2).
/// - `GET` of a path of the tree: 200 with the value or listing; 404 if there is no such path.
///   A request with `X-aws-ec2-metadata-token` must carry a live token from this instance's
///   store (401 otherwise); a request without one is answered too (IMDSv1: the service runs in
///   EC2's "optional" token mode).
/// - Any other method, or `PUT` elsewhere / `GET` of the token path: 405.
///
/// The query string, if any, is ignored. Directories answer with or without a trailing `/`.
pub fn answer(
    meta: &InstanceMetadata,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    tokens: &mut TokenStore,
    now: Instant,
) -> HttpResponse {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/latest/api/token" {
        if method != "PUT" {
            return HttpResponse::error(405);
        }
        if header(headers, "x-forwarded-for").is_some() {
            return HttpResponse::error(403);
        }
        let ttl = header(headers, TTL_HEADER)
            .filter(|v| !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs)
            .filter(|ttl| !ttl.is_zero() && *ttl <= MAX_TOKEN_TTL);
        let Some(ttl) = ttl else {
            return HttpResponse::error(400);
        };
        let Some(token) = tokens.issue(ttl, now) else {
            return HttpResponse::error(503);
        };
        let mut response = HttpResponse::text(200, token);
        response
            .headers
            .push((TTL_HEADER, ttl.as_secs().to_string()));
        return response;
    }
    if method != "GET" {
        return HttpResponse::error(405);
    }
    if let Some(token) = header(headers, TOKEN_HEADER)
        && !tokens.check(token, now)
    {
        return HttpResponse::error(401);
    }
    match lookup(meta, path) {
        Some(Node::Listing(entries)) => HttpResponse::text(200, entries.join("\n")),
        Some(Node::Text(value)) => HttpResponse::text(200, value),
        Some(Node::Bytes(content_type, body)) => HttpResponse {
            status: 200,
            content_type,
            headers: Vec::new(),
            body,
        },
        None => HttpResponse::error(404),
    }
}

fn listing(entries: &[&str]) -> Option<Node> {
    Some(Node::Listing(
        entries.iter().map(|e| (*e).to_owned()).collect(),
    ))
}

fn text(value: impl Into<String>) -> Option<Node> {
    Some(Node::Text(value.into()))
}

fn lines(values: &[String]) -> Option<Node> {
    text(values.join("\n"))
}

/// The node at `path` (without query string), if any.
fn lookup(meta: &InstanceMetadata, path: &str) -> Option<Node> {
    if path == "/" {
        return listing(&["latest"]);
    }
    let rest = path.strip_prefix("/latest")?;
    // Directories answer with and without a trailing slash; leaves only without.
    let (rest, slash) = match rest.strip_suffix('/') {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let node = match rest {
        "" => listing(&["dynamic", "meta-data", "user-data"]),
        "/user-data" => meta
            .user_data
            .clone()
            .map(|d| Node::Bytes("application/octet-stream", d)),
        "/dynamic" => listing(&["instance-identity/"]),
        "/dynamic/instance-identity" => listing(&["document"]),
        "/dynamic/instance-identity/document" => {
            Some(Node::Bytes("application/json", identity_document(meta)))
        }
        "/meta-data" => listing(&[
            "hostname",
            "instance-id",
            "instance-type",
            "local-hostname",
            "local-ipv4",
            "mac",
            "network/",
            "placement/",
            "security-groups",
        ]),
        "/meta-data/hostname" | "/meta-data/local-hostname" => text(&meta.hostname),
        "/meta-data/instance-id" => text(&meta.instance_id),
        "/meta-data/instance-type" => text(&meta.instance_type),
        "/meta-data/local-ipv4" => text(meta.local_ipv4.to_string()),
        "/meta-data/mac" => text(&meta.mac),
        "/meta-data/security-groups" => lines(&meta.security_groups),
        "/meta-data/placement" => listing(&["availability-zone", "host-id"]),
        "/meta-data/placement/availability-zone" => text(&meta.availability_zone),
        "/meta-data/placement/host-id" => text(&meta.host_id),
        "/meta-data/network" => listing(&["interfaces/"]),
        "/meta-data/network/interfaces" => listing(&["macs/"]),
        "/meta-data/network/interfaces/macs" => Some(Node::Listing(vec![format!("{}/", meta.mac)])),
        other => {
            let rest = other.strip_prefix("/meta-data/network/interfaces/macs/")?;
            let (mac, leaf) = rest.split_once('/').unwrap_or((rest, ""));
            if !mac.eq_ignore_ascii_case(&meta.mac) {
                return None;
            }
            interface(meta, leaf)
        }
    }?;
    if slash && !matches!(node, Node::Listing(_)) {
        return None;
    }
    Some(node)
}

/// The node under `network/interfaces/macs/<mac>/`.
fn interface(meta: &InstanceMetadata, leaf: &str) -> Option<Node> {
    match leaf {
        "" => listing(&[
            "device-number",
            "local-hostname",
            "local-ipv4s",
            "mac",
            "owner-id",
            "security-group-ids",
            "security-groups",
            "subnet-id",
            "subnet-ipv4-cidr-block",
            "vpc-id",
            "vpc-ipv4-cidr-block",
        ]),
        "device-number" => text("0"),
        "local-hostname" => text(&meta.hostname),
        "local-ipv4s" => text(meta.local_ipv4.to_string()),
        "mac" => text(&meta.mac),
        "owner-id" => text(&meta.account_id),
        "security-group-ids" => lines(&meta.security_group_ids),
        "security-groups" => lines(&meta.security_groups),
        "subnet-id" => text(&meta.subnet_id),
        "subnet-ipv4-cidr-block" => text(&meta.subnet_cidr),
        "vpc-id" => text(&meta.vpc_id),
        "vpc-ipv4-cidr-block" => text(&meta.vpc_cidr),
        _ => None,
    }
}

/// `dynamic/instance-identity/document`: EC2's fields that mean something here.
fn identity_document(meta: &InstanceMetadata) -> Vec<u8> {
    let doc = serde_json::json!({
        "accountId": meta.account_id,
        "availabilityZone": meta.availability_zone,
        "instanceId": meta.instance_id,
        "instanceType": meta.instance_type,
        "pendingTime": meta.launch_time,
        "privateIp": meta.local_ipv4.to_string(),
        "region": REGION,
        "version": "2017-09-30",
    });
    let mut body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    body.push(b'\n');
    body
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn meta() -> InstanceMetadata {
        InstanceMetadata {
            instance_id: "i-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            account_id: "123456789012".into(),
            local_ipv4: Ipv4Addr::new(10, 0, 1, 4),
            mac: "02:00:0a:00:01:04".into(),
            hostname: "ip-10-0-1-4".into(),
            security_groups: vec!["default".into(), "web".into()],
            security_group_ids: vec!["sg-1".into(), "sg-2".into()],
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.1.0/24".into(),
            vpc_id: "vpc-1".into(),
            vpc_cidr: "10.0.0.0/16".into(),
            availability_zone: "local-1a".into(),
            host_id: "host-1".into(),
            launch_time: "2025-01-02T03:04:05Z".into(),
            user_data: Some(b"#!/bin/sh\necho hi\n\x00\xff".to_vec()),
        }
    }

    fn get(meta: &InstanceMetadata, path: &str) -> HttpResponse {
        answer(
            meta,
            "GET",
            path,
            &[],
            &mut TokenStore::new(),
            Instant::now(),
        )
    }

    fn body(meta: &InstanceMetadata, path: &str) -> String {
        let r = get(meta, path);
        assert_eq!(r.status, 200, "{path}: {r:?}");
        String::from_utf8(r.body).unwrap()
    }

    fn hdr(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn every_path() {
        let m = meta();
        let mac = "/latest/meta-data/network/interfaces/macs/02:00:0a:00:01:04";
        for (path, want) in [
            ("/", "latest"),
            ("/latest", "dynamic\nmeta-data\nuser-data"),
            ("/latest/", "dynamic\nmeta-data\nuser-data"),
            (
                "/latest/meta-data/",
                "hostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/\nsecurity-groups",
            ),
            ("/latest/meta-data/instance-id", "i-0123456789abcdef0"),
            ("/latest/meta-data/instance-id?x=1", "i-0123456789abcdef0"),
            ("/latest/meta-data/instance-type", "t3.micro"),
            ("/latest/meta-data/local-ipv4", "10.0.1.4"),
            ("/latest/meta-data/mac", "02:00:0a:00:01:04"),
            ("/latest/meta-data/hostname", "ip-10-0-1-4"),
            ("/latest/meta-data/local-hostname", "ip-10-0-1-4"),
            ("/latest/meta-data/security-groups", "default\nweb"),
            ("/latest/meta-data/placement/", "availability-zone\nhost-id"),
            ("/latest/meta-data/placement/availability-zone", "local-1a"),
            ("/latest/meta-data/placement/host-id", "host-1"),
            ("/latest/meta-data/network/", "interfaces/"),
            ("/latest/meta-data/network/interfaces/", "macs/"),
            (
                "/latest/meta-data/network/interfaces/macs/",
                "02:00:0a:00:01:04/",
            ),
            (
                &format!("{mac}/"),
                "device-number\nlocal-hostname\nlocal-ipv4s\nmac\nowner-id\nsecurity-group-ids\nsecurity-groups\nsubnet-id\nsubnet-ipv4-cidr-block\nvpc-id\nvpc-ipv4-cidr-block",
            ),
            (&format!("{mac}/device-number"), "0"),
            (&format!("{mac}/local-hostname"), "ip-10-0-1-4"),
            (&format!("{mac}/local-ipv4s"), "10.0.1.4"),
            (&format!("{mac}/mac"), "02:00:0a:00:01:04"),
            (&format!("{mac}/owner-id"), "123456789012"),
            (&format!("{mac}/security-group-ids"), "sg-1\nsg-2"),
            (&format!("{mac}/security-groups"), "default\nweb"),
            (&format!("{mac}/subnet-id"), "subnet-1"),
            (&format!("{mac}/subnet-ipv4-cidr-block"), "10.0.1.0/24"),
            (&format!("{mac}/vpc-id"), "vpc-1"),
            (&format!("{mac}/vpc-ipv4-cidr-block"), "10.0.0.0/16"),
            ("/latest/dynamic/", "instance-identity/"),
            ("/latest/dynamic/instance-identity/", "document"),
        ] {
            assert_eq!(body(&m, path), want, "{path}");
        }
        // Text leaves are text/plain.
        assert_eq!(get(&m, "/latest/meta-data/mac").content_type, "text/plain");
    }

    #[test]
    fn user_data_is_raw_or_404() {
        let mut m = meta();
        let r = get(&m, "/latest/user-data");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"#!/bin/sh\necho hi\n\x00\xff");
        assert_eq!(r.content_type, "application/octet-stream");
        m.user_data = None;
        assert_eq!(get(&m, "/latest/user-data").status, 404);
    }

    #[test]
    fn identity_document_is_json() {
        let r = get(&meta(), "/latest/dynamic/instance-identity/document");
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(doc["accountId"], "123456789012");
        assert_eq!(doc["availabilityZone"], "local-1a");
        assert_eq!(doc["instanceId"], "i-0123456789abcdef0");
        assert_eq!(doc["instanceType"], "t3.micro");
        assert_eq!(doc["privateIp"], "10.0.1.4");
        assert_eq!(doc["pendingTime"], "2025-01-02T03:04:05Z");
        assert_eq!(doc["region"], "local");
    }

    #[test]
    fn unknown_paths_are_404() {
        let m = meta();
        for path in [
            "/x",
            "/latest/x",
            "/latest/meta-data/ami-id",
            "/latest/meta-data/instance-id/",
            "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:99/mac",
            "/latest/meta-data/network/interfaces/macs/02:00:0a:00:01:04/nope",
            "/latest/meta-data/network/interfaces/macs/02:00:0a:00:01:04/mac/",
            "/latest/user-data/",
            "/latestx/meta-data",
            "/2009-04-04/meta-data/",
        ] {
            assert_eq!(get(&m, path).status, 404, "{path}");
        }
    }

    #[test]
    fn other_methods_are_405() {
        let m = meta();
        let mut tokens = TokenStore::new();
        let now = Instant::now();
        for (method, path) in [
            ("POST", "/latest/meta-data/"),
            ("DELETE", "/latest/meta-data/instance-id"),
            ("PUT", "/latest/meta-data/instance-id"),
            ("HEAD", "/"),
            ("GET", "/latest/api/token"),
            ("get", "/"),
        ] {
            let r = answer(&m, method, path, &[], &mut tokens, now);
            assert_eq!(r.status, 405, "{method} {path}");
        }
    }

    #[test]
    fn token_flow() {
        let m = meta();
        let mut tokens = TokenStore::new();
        let now = Instant::now();
        let put = |tokens: &mut TokenStore, ttl: &str, at| {
            answer(
                &m,
                "PUT",
                "/latest/api/token",
                &[hdr(TTL_HEADER, ttl)],
                tokens,
                at,
            )
        };
        let r = put(&mut tokens, "60", now);
        assert_eq!(r.status, 200);
        assert_eq!(r.headers, vec![(TTL_HEADER, "60".to_owned())]);
        let token = String::from_utf8(r.body).unwrap();
        assert_eq!(token.len(), 43);
        let other = String::from_utf8(put(&mut tokens, "21600", now).body).unwrap();
        assert_ne!(token, other);

        let with = |tokens: &mut TokenStore, token: &str, at| {
            answer(
                &m,
                "GET",
                "/latest/meta-data/instance-id",
                &[hdr("x-aws-ec2-metadata-token", token)],
                tokens,
                at,
            )
        };
        let r = with(&mut tokens, &token, now + Duration::from_secs(59));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"i-0123456789abcdef0");
        // Expired, unknown, empty.
        assert_eq!(
            with(&mut tokens, &token, now + Duration::from_secs(60)).status,
            401
        );
        assert_eq!(with(&mut tokens, &token, now).status, 401, "forgotten");
        assert_eq!(with(&mut tokens, "nope", now).status, 401);
        assert_eq!(with(&mut tokens, "", now).status, 401);
        assert_eq!(with(&mut tokens, &other, now).status, 200);
        // IMDSv1: no token at all.
        assert_eq!(
            answer(&m, "GET", "/latest/meta-data/", &[], &mut tokens, now).status,
            200
        );
    }

    #[test]
    fn bad_token_requests() {
        let m = meta();
        let mut tokens = TokenStore::new();
        let now = Instant::now();
        for ttl in [
            "0",
            "21601",
            "-1",
            "",
            "abc",
            "1.5",
            "999999999999999999999",
        ] {
            let r = answer(
                &m,
                "PUT",
                "/latest/api/token",
                &[hdr(TTL_HEADER, ttl)],
                &mut tokens,
                now,
            );
            assert_eq!(r.status, 400, "ttl {ttl:?}");
        }
        let r = answer(&m, "PUT", "/latest/api/token", &[], &mut tokens, now);
        assert_eq!(r.status, 400, "no ttl");
        let r = answer(
            &m,
            "PUT",
            "/latest/api/token",
            &[hdr(TTL_HEADER, "1"), hdr("X-Forwarded-For", "1.2.3.4")],
            &mut tokens,
            now,
        );
        assert_eq!(r.status, 403);
        assert!(tokens.is_empty());
        let r = answer(
            &m,
            "PUT",
            "/latest/api/token",
            &[hdr(TTL_HEADER, "1")],
            &mut tokens,
            now,
        );
        assert_eq!(r.status, 200);
    }

    #[test]
    fn token_store_is_bounded() {
        let mut tokens = TokenStore::new();
        let now = Instant::now();
        let first = tokens.issue(Duration::from_secs(1), now).unwrap();
        for i in 1..MAX_TOKENS + 10 {
            tokens
                .issue(Duration::from_secs(10 + i as u64), now)
                .unwrap();
        }
        assert_eq!(tokens.len(), MAX_TOKENS);
        assert!(
            !tokens.check(&first, now),
            "the soonest-expiring is evicted"
        );
    }
}
