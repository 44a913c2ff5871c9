//! IP address management: addresses of a subnet are held by objects (instances, load
//! balancer VIPs, health-check nodes) through `/ip/<subnet>/<ip>` keys, written in the same
//! transaction as the holder (with an absent-compare, so two writers never get one
//! address), deleted with it. An address is never handed out while held; the store makes
//! holds survive restarts.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

use super::error::{ApiError, ApiResult};
use super::records::{ip_key, ip_of_key, ip_prefix};
use super::tx::Tx;
use super::validate::{is_reserved, usable_ip};

/// Which end of the subnet to allocate from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// Lowest free address (instances, as AWS).
    Bottom,
    /// Highest free address (VIPs, health-check nodes: out of the instances' way).
    Top,
}

/// The lowest (or highest) usable address of `net` not in `held`.
pub fn pick(net: Ipv4Network, held: &BTreeSet<Ipv4Addr>, from: From) -> Option<Ipv4Addr> {
    let first = u32::from(net.network());
    let last = u32::from(net.broadcast());
    let ok = |a: u32| {
        let ip = Ipv4Addr::from(a);
        !is_reserved(net, ip) && !held.contains(&ip)
    };
    match from {
        From::Bottom => (first..=last).find(|a| ok(*a)).map(Ipv4Addr::from),
        From::Top => (first..=last).rev().find(|a| ok(*a)).map(Ipv4Addr::from),
    }
}

/// The addresses held in a subnet.
pub async fn held(tx: &Tx, subnet: &str) -> ApiResult<BTreeSet<Ipv4Addr>> {
    Ok(tx
        .keys(&ip_prefix(subnet), 0)
        .await?
        .iter()
        .filter_map(|kv| ip_of_key(&kv.key))
        .collect())
}

/// Allocates an address of `subnet` for `holder`: the one asked for (which must be usable
/// and free) or a free one; staged in `tx`. `taken` are addresses this request already
/// allocated (several instances in one call).
pub async fn allocate(
    tx: &mut Tx,
    subnet: &str,
    net: Ipv4Network,
    holder: &str,
    wanted: Option<(&str, Ipv4Addr)>,
    from: From,
    taken: &mut BTreeSet<Ipv4Addr>,
) -> ApiResult<Ipv4Addr> {
    let mut held = held(tx, subnet).await?;
    held.extend(taken.iter().copied());
    let ip = match wanted {
        Some((field, ip)) => {
            usable_ip(field, net, ip)?;
            if held.contains(&ip) {
                return Err(ApiError::invalid(
                    field,
                    format!("{ip} is already in use in {subnet}"),
                ));
            }
            ip
        }
        None => pick(net, &held, from).ok_or_else(|| {
            ApiError::Exhausted(format!("subnet {subnet} ({net}) has no free address left"))
        })?,
    };
    let key = ip_key(subnet, ip);
    tx.require_absent(key.clone());
    tx.put_raw(key, holder.as_bytes().to_vec());
    taken.insert(ip);
    Ok(ip)
}

/// Releases an address (staged in `tx`).
pub fn release(tx: &mut Tx, subnet: &str, ip: Ipv4Addr) {
    tx.delete_raw(ip_key(subnet, ip));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn picks_skip_reserved_and_held() {
        let n = net("10.0.1.0/28");
        let mut held = BTreeSet::new();
        assert_eq!(
            pick(n, &held, From::Bottom),
            Some("10.0.1.4".parse().unwrap())
        );
        assert_eq!(
            pick(n, &held, From::Top),
            Some("10.0.1.14".parse().unwrap())
        );
        held.insert("10.0.1.4".parse().unwrap());
        assert_eq!(
            pick(n, &held, From::Bottom),
            Some("10.0.1.5".parse().unwrap())
        );
        // A /28 has 11 usable addresses.
        for a in 4..=14u8 {
            held.insert(Ipv4Addr::new(10, 0, 1, a));
        }
        assert_eq!(pick(n, &held, From::Bottom), None);
        assert_eq!(pick(n, &held, From::Top), None);
    }
}
