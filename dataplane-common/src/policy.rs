//! Security groups and network ACLs: the map layout and the per-packet verdict.
//!
//! Rules are compiled in user space (`controlplane::policy`) into two-stage lookups, so the
//! cost per packet does not depend on how many rules exist:
//!
//! 1. **Address stage** (`SG_ADDR`, `ACL_ADDR`: LPM tries of [`PolicyAddrKey`] -> class id).
//!    The key's scope is (policy or ACL id, direction); the trie returns the class of the
//!    longest stored prefix covering the remote address. User space gives each stored prefix
//!    the class of *all* rules whose CIDR covers that prefix, so the longest match alone
//!    determines every rule that matches the address.
//! 2. **Port stage** (`SG_PORT`, `ACL_PORT`: LPM tries of [`PolicyPortKey`] -> value). Key:
//!    (class, protocol, port); port ranges are stored as aligned power-of-two blocks (prefix
//!    lengths), "all protocols" as the class alone. For security groups (allow-only, union)
//!    any match allows. For ACLs (first match wins) user space stores, per class and
//!    protocol, a partition of the port space with the winning rule's verdict, so the
//!    longest match is that verdict; no match is the implicit deny.
//!
//! Ids: a security-group *policy* is the union of the groups one endpoint has (endpoints
//! with the same groups share it); an ACL id names one compiled network ACL. Class ids are
//! `id << 16 | n`. Changes are made by installing a new id beside the old one and then
//! switching the endpoint to it (one map update), so no packet sees a half-applied set.
//!
//! Order (AWS): outbound, security group then ACL; inbound, ACL then security group. ACLs are
//! stateless and apply only where traffic crosses the subnet boundary; security groups are
//! stateful: a packet of a tracked flow skips them in both directions (conntrack).

use crate::{
    DropReason,
    conntrack::{
        CT_OPENED_BY_LO, CtBudget, CtConfig, CtEntry, CtKey, advance, continues, flow, open,
        tcp_flags_invalid,
    },
    flowlog::Decision,
    overlay::{Endpoint, v4},
    packet::PacketView,
    parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IpPacket},
};

/// Direction of a rule list, relative to the endpoint it protects.
pub const INGRESS: u32 = 0;
/// Outbound rules.
pub const EGRESS: u32 = 1;

/// Largest security-group policy or ACL id (class ids are `id << 16 | n`).
pub const MAX_POLICY_ID: u32 = 0xffff;
/// Classes per policy (and per ACL).
pub const MAX_CLASSES: u32 = 0x1_0000;

/// The class id of class `n` of policy (or ACL) `id`.
#[inline(always)]
pub const fn class_id(id: u32, n: u32) -> u32 {
    (id << 16) | n
}

/// Key of `SG_ADDR` and `ACL_ADDR` (LPM data).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyAddrKey {
    /// `(id << 1 | direction)`, big endian (LPM tries compare bytes from the first); always
    /// matched in full.
    pub scope_be: [u8; 4],
    /// Remote address or prefix (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<PolicyAddrKey>() == 20);

impl PolicyAddrKey {
    /// Prefix length of a lookup (everything).
    pub const FULL_LEN: u32 = 160;

    /// The key of `addr` in the rule list of `id` for `dir`.
    #[inline(always)]
    pub const fn new(id: u32, dir: u32, addr: [u8; 16]) -> Self {
        PolicyAddrKey {
            scope_be: ((id << 1) | dir).to_be_bytes(),
            addr,
        }
    }

    /// The LPM prefix length of an IPv4 CIDR of `/prefix`.
    pub const fn ipv4_prefix_len(prefix: u8) -> u32 {
        32 + 96 + prefix as u32
    }

    /// The (id, direction) this key belongs to.
    pub const fn scope(&self) -> (u32, u32) {
        let s = u32::from_be_bytes(self.scope_be);
        (s >> 1, s & 1)
    }
}

/// Key of `SG_PORT` and `ACL_PORT` (LPM data).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPortKey {
    /// Class id, big endian; always matched in full.
    pub class_be: [u8; 4],
    /// IP protocol (matched unless the entry covers all protocols).
    pub proto: u8,
    /// Destination port (TCP, UDP) or ICMP type (low byte), big endian; 0 for other
    /// protocols.
    pub port_be: [u8; 2],
    /// Reserved, zero; never part of a prefix.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<PolicyPortKey>() == 8);

impl PolicyPortKey {
    /// Prefix length of a lookup (class, protocol and port).
    pub const FULL_LEN: u32 = 56;
    /// Prefix length of an entry for all protocols of a class.
    pub const ALL_PROTOCOLS_LEN: u32 = 32;
    /// Prefix length of an entry for all ports of one protocol.
    pub const ALL_PORTS_LEN: u32 = 40;

    /// The key of (class, protocol, port).
    #[inline(always)]
    pub const fn new(class: u32, proto: u8, port: u16) -> Self {
        PolicyPortKey {
            class_be: class.to_be_bytes(),
            proto,
            port_be: port.to_be_bytes(),
            _pad: 0,
        }
    }

    /// Prefix length of an aligned block of `2^bits` ports.
    pub const fn block_len(bits: u32) -> u32 {
        Self::FULL_LEN - bits
    }
}

/// `ACL_PORT` value: allow.
pub const ACL_ALLOW: u32 = 1;
/// `ACL_PORT` value: deny.
pub const ACL_DENY: u32 = 2;

/// Value of `ACL_PORT`: the verdict of the first matching rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclVerdict {
    /// `ACL_ALLOW` or `ACL_DENY`.
    pub action: u32,
    /// Number of the rule that decided (for inspection).
    pub rule: u32,
}

const _: () = assert!(core::mem::size_of::<AclVerdict>() == 8);

/// A conntrack entry in place: read it, write it back (the kernel writes into the map value
/// it found, so an established packet costs one hash lookup).
pub trait CtSlot {
    /// The entry's current value.
    fn get(&self) -> CtEntry;
    /// Replaces the entry's state: `last_seen_ns`, `state` and `flags`. The counters are
    /// left alone (other CPUs add to them concurrently; writing back a stale copy would
    /// lose their packets).
    fn set(&self, entry: &CtEntry);
    /// Adds one packet of `bytes` to the entry's counters (atomically in the kernel).
    fn count(&self, bytes: u32);
}

/// The policy maps as the verdict logic reads them: the kernel implements it over the BPF
/// maps, host tests over in-memory tables.
pub trait PolicyTables {
    /// A found conntrack entry.
    type Slot: CtSlot;
    /// Longest-prefix match in `SG_ADDR`: the class of the remote address.
    fn sg_class(&self, key: &PolicyAddrKey) -> Option<u32>;
    /// Longest-prefix match in `SG_PORT`: the rule reference of the entry covering the key
    /// (nonzero: allowed; `None` or 0: no rule allows).
    fn sg_port(&self, key: &PolicyPortKey) -> Option<u32>;
    /// Longest-prefix match in `ACL_ADDR`.
    fn acl_class(&self, key: &PolicyAddrKey) -> Option<u32>;
    /// Longest-prefix match in `ACL_PORT`.
    fn acl_port(&self, key: &PolicyPortKey) -> Option<AclVerdict>;
    /// The `CONNTRACK` entry of `key`.
    fn ct_get(&self, key: &CtKey) -> Option<Self::Slot>;
    /// Inserts (or replaces) an entry; a full table evicts the least recently used one.
    fn ct_create(&self, key: &CtKey, entry: &CtEntry);
    /// `CT_BUDGET` of VPC `vni`, if it has one.
    fn ct_budget(&self, vni: u32) -> Option<CtBudget>;
    /// Adds one entry to the `count` of `CT_BUDGET[vni]` if it exists (atomically in the
    /// kernel).
    fn ct_budget_charge(&self, vni: u32);
    /// `CT_CONFIG` (all zero before the agent writes it).
    fn ct_config(&self) -> CtConfig;
}

/// The protocol and port rules match: the destination port for TCP and UDP, the type for
/// ICMP, 0 otherwise (and for fragments without an L4 header).
#[inline(always)]
pub fn rule_port(ip: &IpPacket) -> u16 {
    if !ip.has_l4 {
        return 0;
    }
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => ip.dst_port,
        IPPROTO_ICMP => ip.dst_port >> 8,
        _ => 0,
    }
}

/// Whether `addr` is inside the subnet of `ep` (its gateway and prefix length).
#[inline(always)]
pub fn in_subnet(ep: &Endpoint, addr: &[u8; 16]) -> bool {
    let bits = ep.subnet_bits;
    if bits == 0 {
        return true;
    }
    let mask = if bits >= 32 {
        u32::MAX
    } else {
        !(u32::MAX >> bits)
    };
    let a = u32::from_be_bytes(v4(addr));
    let g = u32::from_be_bytes(v4(&ep.gateway));
    (a ^ g) & mask == 0
}

/// The rule of security-group policy `policy` for `dir` admitting `remote`, `proto`,
/// `port`: its rule reference as stored in `SG_PORT` (nonzero), 0 when no rule does. Never
/// inlined: in the kernel it is a BPF subprogram, so its keys take stack only while it runs
/// (the 512-byte limit covers the whole call chain).
#[inline(never)]
pub fn sg_rule<T: PolicyTables>(
    t: &T,
    policy: u32,
    dir: u32,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
) -> u32 {
    match t.sg_class(&PolicyAddrKey::new(policy, dir, *remote)) {
        Some(class) => t
            .sg_port(&PolicyPortKey::new(class, proto, port))
            .unwrap_or(0),
        None => 0,
    }
}

/// Whether the security-group policy `policy` has a rule for `dir` admitting `remote`,
/// `proto`, `port`.
#[inline(always)]
pub fn sg_allows<T: PolicyTables>(
    t: &T,
    policy: u32,
    dir: u32,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
) -> bool {
    sg_rule(t, policy, dir, remote, proto, port) != 0
}

/// The verdict of ACL `acl` (nonzero) on this traffic in `dir`, packed as
/// `action << 32 | rule` (a scalar, so the BPF subprogram returns it in a register): no
/// matching entry is `0` (action 0, rule 0: the implicit deny). A BPF subprogram in the
/// kernel, as [`sg_rule`].
#[inline(never)]
pub fn acl_verdict<T: PolicyTables>(
    t: &T,
    acl: u32,
    dir: u32,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
) -> u64 {
    let Some(class) = t.acl_class(&PolicyAddrKey::new(acl, dir, *remote)) else {
        return 0;
    };
    match t.acl_port(&PolicyPortKey::new(class, proto, port)) {
        Some(v) => (u64::from(v.action) << 32) | u64::from(v.rule),
        None => 0,
    }
}

/// Whether ACL `acl` (0: none, allow everything) lets this traffic through in `dir`.
#[inline(always)]
pub fn acl_allows<T: PolicyTables>(
    t: &T,
    acl: u32,
    dir: u32,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
) -> bool {
    acl == 0 || acl_verdict(t, acl, dir, remote, proto, port) >> 32 == u64::from(ACL_ALLOW)
}

/// Applies ACL `acl` in `dir` unless it is 0 (no ACL): records the deciding rule number
/// in `rule` and returns whether the traffic may pass.
#[inline(always)]
fn acl_stage<T: PolicyTables>(
    t: &T,
    acl: u32,
    dir: u32,
    remote: &[u8; 16],
    ip: &IpPacket,
    port: u16,
    rule: &mut u32,
) -> bool {
    if acl == 0 {
        return true;
    }
    let v = acl_verdict(t, acl, dir, remote, ip.proto, port);
    *rule = v as u32;
    v >> 32 == u64::from(ACL_ALLOW)
}

/// Advances a tracked flow's entry by one packet (`flags`: protocol << 8 | TCP flags, bit
/// 16 set when it travels in the original direction) and counts it. Never inlined: in the
/// kernel a BPF subprogram, so the entry copies live in its own frame, not the verdict's.
#[inline(never)]
pub fn refresh<S: CtSlot>(slot: &S, flags: u32, now_ns: u64, len: u32) {
    let e = slot.get();
    let proto = (flags >> 8) as u8;
    let from_opener = flags & (1 << 16) != 0;
    if let Some(next) = advance(&e, proto, flags as u8, from_opener, now_ns) {
        slot.set(&next);
    }
    slot.count(len);
}

/// Whether a VPC at `budget` may track one more flow: no budget, limit 0 (unlimited), or
/// fewer entries than the limit.
#[inline(always)]
pub fn budget_admits(budget: Option<CtBudget>) -> bool {
    match budget {
        Some(b) => b.limit == 0 || b.count < b.limit,
        None => true,
    }
}

/// Applies the policy of the sending endpoint `out` (outbound rules; `None` when it lives on
/// another host, which enforced them) and of the receiving endpoint `inb` (inbound rules;
/// `None` when it lives elsewhere) to packet `ip` of VPC `vni` (`len` bytes), records the
/// flow in conntrack (a new one only within the VPC's conntrack budget) and counts the
/// packet in its entry. `now_ns` is `bpf_ktime_get_ns`. `d` receives what decided: the
/// packet's TCP flags, whether it was tracked, and each stage's rule (stages that did not
/// run keep [`crate::flowlog::DECISION_NONE`]; `d` should start as [`Decision::EMPTY`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn evaluate<P: PacketView, T: PolicyTables>(
    pkt: &P,
    ip: &IpPacket,
    vni: u32,
    out: Option<&Endpoint>,
    inb: Option<&Endpoint>,
    now_ns: u64,
    t: &T,
    d: &mut Decision,
) -> Result<(), DropReason> {
    let len = pkt.len() as u32;
    let tcp = if ip.proto == IPPROTO_TCP && ip.has_l4 {
        // Two bytes (data offset and flags): see `port.rs` on one-byte reads.
        let b: [u8; 2] = pkt
            .read(usize::from(ip.l4_offset) + 12)
            .ok_or(DropReason::Truncated)?;
        d.tcp_flags = b[1];
        if tcp_flags_invalid(b[1]) {
            return Err(DropReason::CtInvalid);
        }
        b[1]
    } else {
        0
    };
    let f = flow(vni, ip);
    let cfg = t.ct_config().or_default();
    let mut tracked = None;
    if let Some(slot) = t.ct_get(&f.key) {
        let e = slot.get();
        let from_opener = f.from_lo == (e.flags & CT_OPENED_BY_LO != 0);
        if !cfg.expired(&f.key, &e, now_ns) && continues(&e, ip.proto, tcp, from_opener) {
            tracked = Some((slot, from_opener));
        }
    }
    d.tracked = u8::from(tracked.is_some());
    let port = rule_port(ip);
    if let Some(o) = out {
        if tracked.is_none() {
            d.sg_out = sg_rule(t, o.policy, EGRESS, &ip.dst, ip.proto, port);
            if d.sg_out == 0 {
                return Err(DropReason::SgEgress);
            }
        }
        if !in_subnet(o, &ip.dst) && !acl_stage(t, o.acl, EGRESS, &ip.dst, ip, port, &mut d.acl_out)
        {
            return Err(DropReason::AclEgress);
        }
    }
    if let Some(i) = inb {
        if !in_subnet(i, &ip.src) && !acl_stage(t, i.acl, INGRESS, &ip.src, ip, port, &mut d.acl_in)
        {
            return Err(DropReason::AclIngress);
        }
        if tracked.is_none() {
            d.sg_in = sg_rule(t, i.policy, INGRESS, &ip.src, ip.proto, port);
            if d.sg_in == 0 {
                return Err(DropReason::SgIngress);
            }
        }
    }
    match tracked {
        Some((slot, from_opener)) => {
            let flags =
                (u32::from(ip.proto) << 8) | u32::from(tcp) | (u32::from(from_opener) << 16);
            refresh(&slot, flags, now_ns, len);
        }
        None => {
            if !budget_admits(t.ct_budget(vni)) {
                return Err(DropReason::CtBudgetExceeded);
            }
            let mut e = open(ip.proto, tcp, f.from_lo, now_ns);
            e.packets = 1;
            e.bytes = u64::from(len);
            t.ct_create(&f.key, &e);
            t.ct_budget_charge(vni);
        }
    }
    Ok(())
}
