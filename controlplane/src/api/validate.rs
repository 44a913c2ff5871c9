//! Field validation shared by the services: pure functions from request fields to model
//! values or an INVALID_ARGUMENT naming the field.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::error::{ApiError, ApiResult};
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

/// Whether `ip` is one of the subnet's reserved addresses (network, +1, +2, +3, last).
pub fn is_reserved(net: Ipv4Network, ip: Ipv4Addr) -> bool {
    let n = u32::from(net.network());
    let off = u32::from(ip).wrapping_sub(n);
    off <= 3 || ip == net.broadcast()
}

/// The subnet's gateway (network + 1).
pub fn gateway(net: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
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
