//! Compiled policy tables and their kernel map entries.
//!
//! [`SgTables`] and [`AclTables`] are what one security-group policy or one network ACL puts
//! in the datapath's tries, independent of the id it is installed under: plain, ordered
//! (BTree) and comparable with `==`. `entries(id)` gives the map entries for an id;
//! `from_entries` reads them back (a round trip is the identity), so the agent can tell
//! whether an installed id already holds what a fresh compile wants.

use std::collections::BTreeMap;

use dataplane_common::{
    filter::ipv4_mapped,
    policy::{ACL_ALLOW, ACL_DENY, AclVerdict, PolicyAddrKey, PolicyPortKey, class_id},
};
use ipnetwork::Ipv4Network;

/// One entry of an address trie: (LPM prefix length, key, class id).
pub type AddrEntry = (u32, PolicyAddrKey, u32);
/// One entry of `SG_PORT`: (LPM prefix length, key, rule reference). The reference is
/// policy-local (see `SgRuleIndex`); 0 denies (it overrides a broader entry).
pub type SgPortEntry = (u32, PolicyPortKey, u32);
/// One entry of `ACL_PORT`: (LPM prefix length, key, verdict).
pub type AclPortEntry = (u32, PolicyPortKey, AclVerdict);

/// The rule number reported for AWS's implicit final deny (`*`).
pub const IMPLICIT_DENY_RULE: u16 = 32767;

/// The address stage of one policy or ACL: (direction, remote prefix) -> class number `n`
/// (the class id is `id << 16 | n`). Prefixes are canonical (host bits zero).
pub type AddrTable = BTreeMap<(u32, Ipv4Network), u16>;

/// What a port-stage entry matches within its class.
///
/// Canonical forms: all protocols is [`PortMatch::ALL`] (`proto: None, port: 0, bits: 16`);
/// one protocol, all ports is `port: 0, bits: 16`; otherwise the aligned block of `2^bits`
/// ports (ICMP types) starting at `port`, a multiple of `2^bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMatch {
    /// IP protocol; `None` for all protocols.
    pub proto: Option<u8>,
    /// First port of the block.
    pub port: u16,
    /// log2 of the block size, 0..=16.
    pub bits: u8,
}

impl PortMatch {
    /// Every protocol and port.
    pub const ALL: PortMatch = PortMatch {
        proto: None,
        port: 0,
        bits: 16,
    };

    /// Every port of `proto`.
    pub const fn all_ports(proto: u8) -> PortMatch {
        PortMatch {
            proto: Some(proto),
            port: 0,
            bits: 16,
        }
    }

    /// The LPM prefix length of the entry.
    pub const fn lpm_len(&self) -> u32 {
        match self.proto {
            None => PolicyPortKey::ALL_PROTOCOLS_LEN,
            Some(_) => PolicyPortKey::block_len(self.bits as u32),
        }
    }

    /// The entry's key in class `class`.
    pub const fn key(&self, class: u32) -> PolicyPortKey {
        match self.proto {
            None => PolicyPortKey::new(class, 0, 0),
            Some(p) => PolicyPortKey::new(class, p, self.port),
        }
    }

    /// Whether the entry covers a lookup of (`proto`, `port`).
    pub const fn covers(&self, proto: u8, port: u16) -> bool {
        match self.proto {
            None => true,
            Some(p) => p == proto && (port as u32 >> self.bits) == (self.port as u32 >> self.bits),
        }
    }

    /// The class id and match of a `*_PORT` entry, `None` unless it is in canonical form.
    pub fn from_key(len: u32, key: &PolicyPortKey) -> Option<(u32, PortMatch)> {
        if key._pad != 0 {
            return None;
        }
        let class = u32::from_be_bytes(key.class_be);
        let port = u16::from_be_bytes(key.port_be);
        let m = if len == PolicyPortKey::ALL_PROTOCOLS_LEN {
            PortMatch::ALL
        } else if (PolicyPortKey::ALL_PORTS_LEN..=PolicyPortKey::FULL_LEN).contains(&len) {
            let bits = PolicyPortKey::FULL_LEN - len;
            PortMatch {
                proto: Some(key.proto),
                port,
                bits: u8::try_from(bits).ok()?,
            }
        } else {
            return None;
        };
        // Canonical: the bits outside the prefix are zero.
        (m.key(class) == *key && (u32::from(port) & ((1 << m.bits) - 1)) == 0).then_some((class, m))
    }
}

/// A security-group policy (the union of one set of groups) as trie contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgTables {
    /// `SG_ADDR`: (direction, remote prefix) -> class number.
    pub addr: AddrTable,
    /// `SG_PORT`: (class number, match) -> rule reference (0: denies within a broader
    /// entry). Entries of one class and protocol are disjoint blocks under an optional
    /// all-ports entry, as for ACLs.
    pub ports: BTreeMap<(u16, PortMatch), u32>,
}

/// A network ACL as trie contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AclTables {
    /// `ACL_ADDR`: (direction, remote prefix) -> class number.
    pub addr: AddrTable,
    /// `ACL_PORT`: (class number, match) -> the verdict of the first matching rule.
    pub ports: BTreeMap<(u16, PortMatch), AclVerdict>,
}

fn addr_entries(addr: &AddrTable, id: u32) -> Vec<AddrEntry> {
    addr.iter()
        .map(|(&(dir, net), &n)| {
            (
                PolicyAddrKey::ipv4_prefix_len(net.prefix()),
                PolicyAddrKey::new(id, dir, ipv4_mapped(net.network().octets())),
                class_id(id, u32::from(n)),
            )
        })
        .collect()
}

/// The class number of `class` if it belongs to `id`.
fn class_n(id: u32, class: u32) -> Option<u16> {
    (class >> 16 == id).then_some((class & 0xffff) as u16)
}

fn addr_from_entries(id: u32, entries: &[AddrEntry]) -> Option<AddrTable> {
    let mut addr = AddrTable::new();
    for &(len, key, class) in entries {
        let (kid, dir) = key.scope();
        let prefix = len.checked_sub(PolicyAddrKey::ipv4_prefix_len(0))?;
        if kid != id || prefix > 32 || key.addr[..12] != ipv4_mapped([0; 4])[..12] {
            return None;
        }
        let ip = std::net::Ipv4Addr::from(dataplane_common::overlay::v4(&key.addr));
        let net = Ipv4Network::new(ip, prefix as u8).ok()?;
        if net.network() != ip {
            return None;
        }
        if addr.insert((dir, net), class_n(id, class)?).is_some() {
            return None;
        }
    }
    Some(addr)
}

impl SgTables {
    /// The map entries of this policy installed as policy `id` (1..=`MAX_POLICY_ID`):
    /// `SG_ADDR` and `SG_PORT` entries, in table order.
    pub fn entries(&self, id: u32) -> (Vec<AddrEntry>, Vec<SgPortEntry>) {
        let ports = self
            .ports
            .iter()
            .map(|(&(n, m), &r)| (m.lpm_len(), m.key(class_id(id, u32::from(n))), r))
            .collect();
        (addr_entries(&self.addr, id), ports)
    }

    /// The tables that installed as `id` give these entries: the inverse of
    /// [`SgTables::entries`]. `None` if an entry belongs to another id or is not in the form
    /// `entries` writes.
    pub fn from_entries(id: u32, addr: &[AddrEntry], ports: &[SgPortEntry]) -> Option<SgTables> {
        let mut map = BTreeMap::new();
        for (len, key, r) in ports {
            let (class, m) = PortMatch::from_key(*len, key)?;
            if map.insert((class_n(id, class)?, m), *r).is_some() {
                return None;
            }
        }
        Some(SgTables {
            addr: addr_from_entries(id, addr)?,
            ports: map,
        })
    }
}

impl AclTables {
    /// The map entries of this ACL installed as ACL `id` (1..=`MAX_POLICY_ID`): `ACL_ADDR`
    /// and `ACL_PORT` entries, in table order.
    pub fn entries(&self, id: u32) -> (Vec<AddrEntry>, Vec<AclPortEntry>) {
        let ports = self
            .ports
            .iter()
            .map(|(&(n, m), &v)| (m.lpm_len(), m.key(class_id(id, u32::from(n))), v))
            .collect();
        (addr_entries(&self.addr, id), ports)
    }

    /// The inverse of [`AclTables::entries`]; `None` on entries of another id, in another
    /// form, or with a verdict that is not allow or deny with a rule number 1..=32767.
    pub fn from_entries(id: u32, addr: &[AddrEntry], ports: &[AclPortEntry]) -> Option<AclTables> {
        let mut map = BTreeMap::new();
        for (len, key, v) in ports {
            let (class, m) = PortMatch::from_key(*len, key)?;
            let valid = matches!(v.action, ACL_ALLOW | ACL_DENY)
                && (1..=u32::from(IMPLICIT_DENY_RULE)).contains(&v.rule);
            if !valid || map.insert((class_n(id, class)?, m), *v).is_some() {
                return None;
            }
        }
        Some(AclTables {
            addr: addr_from_entries(id, addr)?,
            ports: map,
        })
    }
}
