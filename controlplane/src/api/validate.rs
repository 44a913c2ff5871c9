//! Field validation shared by the services: pure functions from request fields to model
//! values or an INVALID_ARGUMENT naming the field.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::error::{ApiError, ApiResult};
pub use crate::overlay::model::{gateway, is_reserved};
use crate::policy::model::Protocol;

/// Smallest and largest VPC/subnet prefix (AWS: /16 to /28).
pub const MIN_PREFIX: u8 = 16;
/// See [`MIN_PREFIX`].
pub const MAX_PREFIX: u8 = 28;
/// Addresses AWS reserves in every subnet: network, router, DNS, future use, broadcast.
pub const RESERVED_PER_SUBNET: u32 = 5;
/// Most tags per object.
pub const MAX_TAGS: usize = 50;

/// A VPC or subnet CIDR: IPv4, /16 to /28, no host bits.
pub fn cidr(field: &str, text: &str) -> ApiResult<Ipv4Network> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::invalid(
            field,
            "required (an IPv4 CIDR such as 10.0.0.0/16)",
        ));
    }
    let net: Ipv4Network = text.parse().map_err(|_| {
        ApiError::invalid(field, format!("{text:?} is not an IPv4 CIDR (a.b.c.d/n)"))
    })?;
    if !text.contains('/') {
        return Err(ApiError::invalid(
            field,
            format!("{text:?} has no prefix length (a.b.c.d/n)"),
        ));
    }
    if net.network() != net.ip() {
        let fixed =
            Ipv4Network::new(net.network(), net.prefix()).map_or(String::new(), |n| n.to_string());
        return Err(ApiError::invalid(
            field,
            format!("{text} has host bits set; did you mean {fixed}?"),
        ));
    }
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&net.prefix()) {
        return Err(ApiError::invalid(
            field,
            format!("{text}: the prefix must be /{MIN_PREFIX} to /{MAX_PREFIX}"),
        ));
    }
    Ok(net)
}

/// A rule's CIDR: any IPv4 prefix, host bits must be zero.
pub fn rule_cidr(field: &str, text: &str) -> ApiResult<Ipv4Network> {
    let net: Ipv4Network = text.trim().parse().map_err(|_| {
        ApiError::invalid(field, format!("{text:?} is not an IPv4 CIDR (a.b.c.d/n)"))
    })?;
    if net.network() != net.ip() {
        return Err(ApiError::invalid(
            field,
            format!(
                "{text} has host bits set; did you mean {}/{}?",
                net.network(),
                net.prefix()
            ),
        ));
    }
    Ok(net)
}

/// An IPv4 address.
pub fn ipv4(field: &str, text: &str) -> ApiResult<Ipv4Addr> {
    text.trim()
        .parse()
        .map_err(|_| ApiError::invalid(field, format!("{text:?} is not an IPv4 address")))
}

/// Whether `a` and `b` share an address.
pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Addresses of a subnet usable by instances (size minus the five reserved).
pub fn usable_count(net: Ipv4Network) -> u32 {
    net.size().saturating_sub(RESERVED_PER_SUBNET)
}

/// An address a caller asks for: inside the subnet and not reserved.
pub fn usable_ip(field: &str, net: Ipv4Network, ip: Ipv4Addr) -> ApiResult<()> {
    if !net.contains(ip) {
        return Err(ApiError::invalid(
            field,
            format!("{ip} is not in the subnet {net}"),
        ));
    }
    if is_reserved(net, ip) {
        return Err(ApiError::invalid(
            field,
            format!(
                "{ip} is reserved in {net} (the network address, the next three and the last \
                 address are reserved)"
            ),
        ));
    }
    Ok(())
}

/// A protocol: tcp, udp, icmp, -1/all, or a number.
pub fn protocol(field: &str, text: &str) -> ApiResult<Protocol> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid(
            field,
            "required: tcp, udp, icmp, -1 (all) or a protocol number",
        ));
    }
    text.parse()
        .map_err(|e: crate::policy::model::ProtocolParseError| {
            ApiError::invalid(field, e.to_string())
        })
}

/// A rule's port range (`from_port`, `to_port` as the API gives them) in model terms:
/// tcp/udp 0-65535 with from <= to; icmp from_port is the type (-1: any; the code is not
/// matched); other protocols take no ports (must be 0 or -1).
pub fn ports(protocol: Protocol, from: i32, to: i32) -> ApiResult<(Option<u16>, Option<u16>)> {
    let port = |field: &str, v: i32| {
        u16::try_from(v)
            .map_err(|_| ApiError::invalid(field, format!("{v} is not a port (0-65535)")))
    };
    match protocol {
        Protocol::TCP | Protocol::UDP => {
            let (f, t) = (port("from_port", from)?, port("to_port", to)?);
            if f > t {
                return Err(ApiError::invalid(
                    "to_port",
                    format!("{t} is below from_port {f}"),
                ));
            }
            Ok((Some(f), Some(t)))
        }
        Protocol::ICMP => match from {
            -1 => Ok((None, None)),
            0..=255 => {
                if !(-1..=255).contains(&to) {
                    return Err(ApiError::invalid(
                        "to_port",
                        format!("{to} is not an ICMP code (-1 or 0-255)"),
                    ));
                }
                let ty = from as u16;
                Ok((Some(ty), Some(ty)))
            }
            _ => Err(ApiError::invalid(
                "from_port",
                format!("{from} is not an ICMP type (-1 or 0-255)"),
            )),
        },
        _ => {
            if (from, to) != (0, 0) && (from, to) != (-1, -1) {
                return Err(ApiError::invalid(
                    "from_port",
                    format!("protocol {protocol} takes no ports (0 or -1)"),
                ));
            }
            Ok((None, None))
        }
    }
}

/// Tags: at most 50, keys 1-128 characters not starting with `aws:`, values up to 256.
pub fn tags(tags: &[vpc_proto::v1::Tag]) -> ApiResult<Vec<(String, String)>> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(
            "tags",
            format!("{} tags; at most {MAX_TAGS}", tags.len()),
        ));
    }
    let mut out = Vec::with_capacity(tags.len());
    for (i, t) in tags.iter().enumerate() {
        if t.key.is_empty() || t.key.chars().count() > 128 {
            return Err(ApiError::invalid(
                format!("tags[{i}].key"),
                "1 to 128 characters",
            ));
        }
        if t.key.starts_with("aws:") {
            return Err(ApiError::invalid(
                format!("tags[{i}].key"),
                "the aws: prefix is reserved",
            ));
        }
        if t.value.chars().count() > 256 {
            return Err(ApiError::invalid(
                format!("tags[{i}].value"),
                "at most 256 characters",
            ));
        }
        if out.iter().any(|(k, _): &(String, String)| *k == t.key) {
            return Err(ApiError::invalid(
                format!("tags[{i}].key"),
                format!("duplicate key {:?}", t.key),
            ));
        }
        out.push((t.key.clone(), t.value.clone()));
    }
    Ok(out)
}

/// An id of the given kind, as a request names it.
pub fn id(field: &str, kind: &str, text: &str) -> ApiResult<String> {
    if text.is_empty() {
        return Err(ApiError::invalid(field, format!("required (a {kind}- id)")));
    }
    if !super::ids::is_id(kind, text) {
        return Err(ApiError::invalid(
            field,
            format!("{text:?} is not a {kind} id ({kind}- and 17 hex digits)"),
        ));
    }
    Ok(text.to_owned())
}

/// A VPC's conntrack share in percent: 1-100, or 0 for the agents' default (`None`).
pub fn ct_share(field: &str, percent: u32) -> ApiResult<Option<u8>> {
    match percent {
        0 => Ok(None),
        1..=100 => Ok(Some(percent as u8)),
        _ => Err(ApiError::invalid(
            field,
            format!("{percent} is not a percentage of the conntrack table (1-100, 0: default)"),
        )),
    }
}

/// A client token: up to 64 ASCII characters.
pub fn client_token(text: &str) -> ApiResult<Option<String>> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > 64 || !text.is_ascii() {
        return Err(ApiError::invalid(
            "client_token",
            "at most 64 ASCII characters",
        ));
    }
    if text.contains('/') {
        return Err(ApiError::invalid("client_token", "must not contain '/'"));
    }
    Ok(Some(text.to_owned()))
}

/// A page size: 0 (default 100) or 1-1000.
pub fn page_size(max_results: u32) -> ApiResult<usize> {
    match max_results {
        0 => Ok(100),
        1..=1000 => Ok(max_results as usize),
        n => Err(ApiError::invalid(
            "page.max_results",
            format!("{n}: expected 1 to 1000"),
        )),
    }
}

/// A name: 1-255 characters of `a-zA-Z0-9 ._-:/()#,@[]+=&;{}!$*`.
pub fn name(field: &str, text: &str, max: usize) -> ApiResult<String> {
    if text.is_empty() || text.chars().count() > max {
        return Err(ApiError::invalid(field, format!("1 to {max} characters")));
    }
    if let Some(c) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || " ._-:/()#,@[]+=&;{}!$*".contains(*c)))
    {
        return Err(ApiError::invalid(
            field,
            format!("character {c:?} is not allowed"),
        ));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    //! Tables for the pure checks (and the pure address picker they feed).

    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn conntrack_share_is_a_percentage_or_the_default() {
        assert_eq!(ct_share("f", 0).unwrap(), None);
        assert_eq!(ct_share("f", 1).unwrap(), Some(1));
        assert_eq!(ct_share("f", 100).unwrap(), Some(100));
        assert!(ct_share("f", 101).is_err());
    }
    use crate::api::ipam::{From, pick};

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[track_caller]
    fn field_of<T: std::fmt::Debug>(r: ApiResult<T>) -> String {
        match r {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn cidr_table() {
        for (text, want) in [
            ("10.0.0.0/16", "10.0.0.0/16"),
            ("10.0.0.0/28", "10.0.0.0/28"),
            ("192.168.4.0/22", "192.168.4.0/22"),
            (" 172.31.0.0/16\n", "172.31.0.0/16"),
        ] {
            assert_eq!(cidr("cidr_block", text).unwrap(), net(want), "{text:?}");
        }
        for bad in [
            "",
            " ",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/15",
            "0.0.0.0/0",
            "10.0.0.0/29",
            "10.0.0.0/32",
            "10.0.0.1/16",
            "10.0.0.8/28",
            "10.0.0.0/33",
            "garbage",
            "10.0.0/16",
            "fd00::/16",
            "10.0.0.0/16/1",
        ] {
            assert_eq!(field_of(cidr("cidr_block", bad)), "cidr_block", "{bad:?}");
        }
        // Host bits: the message suggests the network.
        let e = cidr("cidr_block", "10.0.0.1/16").unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/16"), "{e}");
        // The field name is the caller's.
        assert_eq!(field_of(cidr("subnets[2].cidr", "x")), "subnets[2].cidr");
    }

    #[test]
    fn rule_cidr_and_ipv4() {
        assert_eq!(rule_cidr("cidr", "0.0.0.0/0").unwrap(), net("0.0.0.0/0"));
        assert_eq!(
            rule_cidr("cidr", "10.0.0.5/32").unwrap(),
            net("10.0.0.5/32")
        );
        // A bare address is a /32.
        assert_eq!(rule_cidr("cidr", "10.0.0.5").unwrap(), net("10.0.0.5/32"));
        for bad in ["10.0.0.5/24", "", "x", "10.0.0.0/33"] {
            assert_eq!(field_of(rule_cidr("cidr", bad)), "cidr", "{bad:?}");
        }
        assert_eq!(ipv4("ip", " 10.0.0.5 ").unwrap(), ip("10.0.0.5"));
        for bad in ["", "10.0.0", "10.0.0.256", "10.0.0.5/32", "::1"] {
            assert_eq!(field_of(ipv4("ip", bad)), "ip", "{bad:?}");
        }
    }

    #[test]
    fn overlap_and_sizes() {
        assert!(overlaps(net("10.0.0.0/16"), net("10.0.1.0/24")));
        assert!(overlaps(net("10.0.1.0/24"), net("10.0.0.0/16")));
        assert!(overlaps(net("10.0.1.0/24"), net("10.0.1.0/24")));
        assert!(!overlaps(net("10.0.0.0/24"), net("10.0.1.0/24")));
        assert!(!overlaps(net("10.0.0.0/28"), net("10.0.0.16/28")));
        assert_eq!(usable_count(net("10.0.0.0/16")), 65531);
        assert_eq!(usable_count(net("10.0.0.0/24")), 251);
        assert_eq!(usable_count(net("10.0.0.0/28")), 11);
        assert_eq!(gateway(net("10.0.1.0/24")), ip("10.0.1.1"));
        let n = net("10.0.1.0/24");
        for r in ["10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.255"] {
            assert!(is_reserved(n, ip(r)), "{r}");
            assert_eq!(
                field_of(usable_ip("private_ip_address", n, ip(r))),
                "private_ip_address"
            );
        }
        for ok in ["10.0.1.4", "10.0.1.128", "10.0.1.254"] {
            assert!(!is_reserved(n, ip(ok)), "{ok}");
            usable_ip("private_ip_address", n, ip(ok)).unwrap();
        }
        for outside in ["10.0.0.255", "10.0.2.4", "192.168.1.4"] {
            assert_eq!(
                field_of(usable_ip("private_ip_address", n, ip(outside))),
                "private_ip_address",
                "{outside}"
            );
        }
    }

    #[test]
    fn address_picking() {
        let n = net("10.0.1.0/24");
        let mut held = BTreeSet::new();
        assert_eq!(pick(n, &held, From::Bottom), Some(ip("10.0.1.4")));
        assert_eq!(pick(n, &held, From::Top), Some(ip("10.0.1.254")));
        held.extend([ip("10.0.1.4"), ip("10.0.1.6"), ip("10.0.1.254")]);
        // The lowest free, holes first.
        assert_eq!(pick(n, &held, From::Bottom), Some(ip("10.0.1.5")));
        assert_eq!(pick(n, &held, From::Top), Some(ip("10.0.1.253")));
        // Every usable address of a /24 once, then none.
        let mut all = BTreeSet::new();
        while let Some(a) = pick(n, &all, From::Bottom) {
            assert!(!is_reserved(n, a));
            all.insert(a);
        }
        assert_eq!(all.len(), 251);
        // Holds outside the subnet do not matter.
        let foreign: BTreeSet<Ipv4Addr> = [ip("10.0.2.4")].into();
        assert_eq!(pick(n, &foreign, From::Bottom), Some(ip("10.0.1.4")));
    }

    #[test]
    fn protocols_and_ports() {
        for (text, want) in [
            ("tcp", Protocol::TCP),
            ("udp", Protocol::UDP),
            ("icmp", Protocol::ICMP),
            ("-1", Protocol::All),
        ] {
            assert_eq!(protocol("protocol", text).unwrap(), want, "{text}");
        }
        for bad in ["", " ", "tcpx", "256"] {
            assert_eq!(field_of(protocol("protocol", bad)), "protocol", "{bad:?}");
        }
        assert_eq!(
            ports(Protocol::TCP, 0, 65535).unwrap(),
            (Some(0), Some(65535))
        );
        assert_eq!(ports(Protocol::UDP, 53, 53).unwrap(), (Some(53), Some(53)));
        assert_eq!(ports(Protocol::ICMP, -1, -1).unwrap(), (None, None));
        assert_eq!(ports(Protocol::ICMP, 8, -1).unwrap(), (Some(8), Some(8)));
        assert_eq!(ports(Protocol::All, -1, -1).unwrap(), (None, None));
        assert_eq!(ports(Protocol::All, 0, 0).unwrap(), (None, None));
        for (p, from, to, field) in [
            (Protocol::TCP, -1, 80, "from_port"),
            (Protocol::TCP, 80, 65536, "to_port"),
            (Protocol::TCP, 81, 80, "to_port"),
            (Protocol::ICMP, 256, -1, "from_port"),
            (Protocol::ICMP, 8, 256, "to_port"),
            (Protocol::All, 80, 80, "from_port"),
        ] {
            assert_eq!(field_of(ports(p, from, to)), field, "{p} {from}-{to}");
        }
    }

    #[test]
    fn tags_ids_tokens_pages_names() {
        let tag = |k: &str, v: &str| vpc_proto::v1::Tag {
            key: k.into(),
            value: v.into(),
        };
        assert_eq!(
            tags(&[tag("Name", "web"), tag("env", "")]).unwrap(),
            vec![("Name".into(), "web".into()), ("env".into(), String::new())]
        );
        let many: Vec<_> = (0..51).map(|i| tag(&format!("k{i}"), "")).collect();
        assert_eq!(field_of(tags(&many)), "tags");
        tags(&many[..50]).unwrap();
        for (t, field) in [
            (vec![tag("", "x")], "tags[0].key"),
            (vec![tag(&"k".repeat(129), "x")], "tags[0].key"),
            (vec![tag("a", ""), tag("aws:x", "")], "tags[1].key"),
            (vec![tag("a", &"v".repeat(257))], "tags[0].value"),
            (vec![tag("a", ""), tag("a", "")], "tags[1].key"),
        ] {
            assert_eq!(field_of(tags(&t)), field);
        }
        assert_eq!(
            id("vpc_id", "vpc", "vpc-0123456789abcdef0").unwrap(),
            "vpc-0123456789abcdef0"
        );
        for bad in [
            "",
            "vpc-",
            "vpc-0123456789abcdef",
            "vpc-0123456789abcdef00",
            "vpc-0123456789ABCDEF0",
            "vpc-0123456789abcdefg",
            "subnet-0123456789abcdef0",
            "vpc0123456789abcdef0",
        ] {
            assert_eq!(field_of(id("vpc_id", "vpc", bad)), "vpc_id", "{bad:?}");
        }
        assert_eq!(client_token("").unwrap(), None);
        assert_eq!(client_token("abc-1").unwrap(), Some("abc-1".into()));
        assert!(client_token(&"x".repeat(64)).unwrap().is_some());
        for bad in ["x".repeat(65), "a/b".into(), "é".into()] {
            assert_eq!(field_of(client_token(&bad)), "client_token", "{bad:?}");
        }
        assert_eq!(page_size(0).unwrap(), 100);
        assert_eq!(page_size(1).unwrap(), 1);
        assert_eq!(page_size(1000).unwrap(), 1000);
        assert_eq!(field_of(page_size(1001)), "page.max_results");
        assert_eq!(field_of(page_size(u32::MAX)), "page.max_results");
        assert_eq!(name("n", "web (prod) #1", 255).unwrap(), "web (prod) #1");
        for bad in [String::new(), "x".repeat(256), "a<b".into(), "naïve".into()] {
            assert_eq!(field_of(name("n", &bad, 255)), "n", "{bad:?}");
        }
    }

    #[test]
    fn errors_map_to_codes() {
        use tonic::Code;
        for (e, code) in [
            (ApiError::invalid("f", "m"), Code::InvalidArgument),
            (ApiError::not_found("VPC", "vpc-1"), Code::NotFound),
            (ApiError::AlreadyExists(String::new()), Code::AlreadyExists),
            (
                ApiError::Precondition(String::new()),
                Code::FailedPrecondition,
            ),
            (ApiError::Exhausted(String::new()), Code::ResourceExhausted),
            (
                ApiError::Unauthenticated(String::new()),
                Code::Unauthenticated,
            ),
            (ApiError::Unavailable(String::new()), Code::Unavailable),
            (ApiError::Aborted, Code::Aborted),
            (ApiError::Internal(String::new()), Code::Internal),
        ] {
            assert_eq!(e.code(), code);
            assert_eq!(tonic::Status::from(e).code(), code);
        }
        assert_eq!(
            field_of::<()>(Err(ApiError::invalid("from_port", "x").within("rules", 2))),
            "rules[2].from_port"
        );
    }
}
