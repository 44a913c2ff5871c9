//! Connection tracking: the datapath's own, per host, keyed by VPC and 5-tuple.
//!
//! One entry per flow, whichever direction a packet travels: the key orders the two
//! endpoints canonically (`lo` is the smaller (address, port) pair) and the entry records
//! which side opened the flow, so one lookup tells original from reply direction.
//!
//! Tracked: TCP and UDP by ports, ICMP echo by identifier (request and reply carry the same
//! id). Other ICMP messages and protocols without ports are tracked by addresses alone
//! (ports zero).
//!
//! Map: `CONNTRACK`, an LRU hash of [`CtKey`] -> [`CtEntry`]; `CT_CONFIG` holds the idle
//! timeouts ([`CtConfig`]). The kernel evicts the least recently used entry when the table is
//! full, so a full table never fails an insert; user space deletes expired entries (GC) and
//! reports pressure.

use crate::parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IpPacket};

/// Key of `CONNTRACK`: the flow, endpoints in canonical order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// VNI of the VPC (tenants' overlapping CIDRs never share an entry).
    pub vni: u32,
    /// The smaller (address, port) side's address (IPv4-mapped for IPv4).
    pub lo_addr: [u8; 16],
    /// The other side's address.
    pub hi_addr: [u8; 16],
    /// The smaller side's port (ICMP echo: the identifier).
    pub lo_port: u16,
    /// The other side's port (ICMP echo: the identifier).
    pub hi_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Reserved, zero (explicit padding).
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 44);

/// State of a tracked flow; decides its idle timeout.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtState {
    /// TCP: the opener's SYN seen, no answer yet.
    SynSent = 1,
    /// TCP: the responder answered (SYN-ACK or any ACK).
    Established = 2,
    /// TCP: a FIN or RST was seen; the flow is closing.
    Closing = 3,
    /// UDP, ICMP and other protocols: no handshake; one state.
    Open = 4,
}

impl CtState {
    /// The state with this number.
    pub fn from_u32(v: u32) -> Option<CtState> {
        [
            CtState::SynSent,
            CtState::Established,
            CtState::Closing,
            CtState::Open,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// [`CtEntry::flags`]: the `lo` side opened the flow.
pub const CT_OPENED_BY_LO: u32 = 1;
/// [`CtEntry::flags`]: a packet in the reply direction was seen.
pub const CT_REPLIED: u32 = 2;

/// Value of `CONNTRACK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet, to the millisecond.
    pub last_seen_ns: u64,
    /// A [`CtState`] as its number.
    pub state: u32,
    /// `CT_*` flags.
    pub flags: u32,
    /// Packets of the flow, both directions (atomically added by the datapath; since the
    /// entry was created). Added in maps ABI v6: `vpc flows top` ranks flows by it.
    pub packets: u64,
    /// Bytes of the flow, both directions (frame length as the hook saw it).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

/// The maps-ABI v5 layout of [`CtEntry`] (no counters), read by the v5 -> v6 migration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtEntryV5 {
    /// As [`CtEntry::last_seen_ns`].
    pub last_seen_ns: u64,
    /// As [`CtEntry::state`].
    pub state: u32,
    /// As [`CtEntry::flags`].
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<CtEntryV5>() == 16);

impl From<CtEntryV5> for CtEntry {
    fn from(old: CtEntryV5) -> CtEntry {
        CtEntry {
            last_seen_ns: old.last_seen_ns,
            state: old.state,
            flags: old.flags,
            packets: 0,
            bytes: 0,
        }
    }
}

/// Value of `CT_BUDGET` (key: VNI): a VPC's share of `CONNTRACK` on this host.
///
/// The datapath refuses to track a new flow of the VPC once `count >= limit` (drop reason
/// `CtBudgetExceeded`), so one tenant cannot fill the LRU table and evict the others' flows.
/// `count` is added to atomically by the datapath on each insert; the agent's conntrack GC
/// recounts the VPC's live entries and writes the true value back (evictions and expiries
/// are only seen there), so between two GCs the count can only over-estimate.
/// `limit` 0 means no budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtBudget {
    /// Entries the VPC may hold; 0: unlimited.
    pub limit: u32,
    /// Entries the VPC holds (see above).
    pub count: u32,
}

const _: () = assert!(core::mem::size_of::<CtBudget>() == 8);

/// Value of `CT_CONFIG` (index 0): idle timeouts in seconds. All zero (not yet written by the
/// agent) means the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtConfig {
    /// TCP before the responder answers.
    pub tcp_syn_secs: u32,
    /// TCP established (AWS: 432000 s by default, 60..=432000 configurable).
    pub tcp_established_secs: u32,
    /// TCP after FIN or RST.
    pub tcp_closing_secs: u32,
    /// UDP (AWS: 30 s).
    pub udp_secs: u32,
    /// ICMP and every other protocol (AWS: 600 s).
    pub other_secs: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}

const _: () = assert!(core::mem::size_of::<CtConfig>() == 24);

impl CtConfig {
    /// AWS's documented idle timeouts; SYN and closing as Linux conntrack's.
    pub const DEFAULT: CtConfig = CtConfig {
        tcp_syn_secs: 120,
        tcp_established_secs: 432_000,
        tcp_closing_secs: 120,
        udp_secs: 30,
        other_secs: 600,
        _reserved: 0,
    };

    /// `self`, or the defaults when unset (all zero).
    #[inline(always)]
    pub fn or_default(self) -> CtConfig {
        if self.tcp_established_secs == 0 {
            CtConfig::DEFAULT
        } else {
            self
        }
    }

    /// Idle timeout of a flow of `proto` in `state`, in nanoseconds.
    #[inline(always)]
    pub fn timeout_ns(&self, proto: u8, state: u32) -> u64 {
        let secs = match proto {
            IPPROTO_TCP => {
                if state == CtState::Established as u32 {
                    self.tcp_established_secs
                } else if state == CtState::SynSent as u32 {
                    self.tcp_syn_secs
                } else {
                    self.tcp_closing_secs
                }
            }
            IPPROTO_UDP => self.udp_secs,
            _ => self.other_secs,
        };
        u64::from(secs) * 1_000_000_000
    }

    /// Whether `entry` has been idle past its timeout at `now_ns`.
    #[inline(always)]
    pub fn expired(&self, key: &CtKey, entry: &CtEntry, now_ns: u64) -> bool {
        now_ns.saturating_sub(entry.last_seen_ns) > self.timeout_ns(key.proto, entry.state)
    }
}

impl Default for CtConfig {
    fn default() -> Self {
        CtConfig::DEFAULT
    }
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A packet's flow: the key, and whether the packet travels from `lo` to `hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Canonical key.
    pub key: CtKey,
    /// The packet's source is the key's `lo` side.
    pub from_lo: bool,
}

/// The flow of `ip` in VPC `vni`.
#[inline(always)]
pub fn flow(vni: u32, ip: &IpPacket) -> Flow {
    let (sport, dport) = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP if ip.has_l4 => (ip.src_port, ip.dst_port),
        // Echo request (type 8) and reply (type 0) carry the same identifier, which the
        // parser puts in `src_port`; other messages are keyed without it.
        IPPROTO_ICMP if ip.has_l4 && matches!(ip.dst_port >> 8, 0 | 8) => {
            (ip.src_port, ip.src_port)
        }
        _ => (0, 0),
    };
    // As integers: a byte-array comparison becomes a `memcmp` loop in BPF.
    let from_lo = (u128::from_be_bytes(ip.src), sport) <= (u128::from_be_bytes(ip.dst), dport);
    let (lo_addr, lo_port, hi_addr, hi_port) = if from_lo {
        (ip.src, sport, ip.dst, dport)
    } else {
        (ip.dst, dport, ip.src, sport)
    };
    Flow {
        key: CtKey {
            vni,
            lo_addr,
            hi_addr,
            lo_port,
            hi_port,
            proto: ip.proto,
            _pad: [0; 3],
        },
        from_lo,
    }
}

/// Whether a TCP flag combination is never valid (SYN with FIN or RST, or no flags at all):
/// such packets are dropped as conntrack-invalid whatever the rules say.
#[inline(always)]
pub fn tcp_flags_invalid(flags: u8) -> bool {
    let f = flags & (tcp_flags::FIN | tcp_flags::SYN | tcp_flags::RST | tcp_flags::ACK);
    f == 0
        || (f & tcp_flags::SYN != 0 && f & (tcp_flags::FIN | tcp_flags::RST) != 0)
        || f == tcp_flags::FIN
}

/// Whether the flow's entry still stands for the connection this packet belongs to. A SYN
/// without ACK from the opener on a closing TCP entry starts a new connection on the same
/// 5-tuple, which must be admitted by the rules again.
#[inline(always)]
pub fn continues(entry: &CtEntry, proto: u8, tcp: u8, from_opener: bool) -> bool {
    !(proto == IPPROTO_TCP
        && entry.state == CtState::Closing as u32
        && from_opener
        && tcp & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN)
}

/// The entry of a new flow opened by this packet (`tcp`: its TCP flags, 0 for other
/// protocols). A TCP flow picked up mid-stream (first packet not a SYN) starts established,
/// as Linux's loose tracking does.
#[inline(always)]
pub fn open(proto: u8, tcp: u8, from_lo: bool, now_ns: u64) -> CtEntry {
    let state = if proto != IPPROTO_TCP {
        CtState::Open
    } else if tcp & tcp_flags::SYN != 0 && tcp & tcp_flags::ACK == 0 {
        CtState::SynSent
    } else if tcp & (tcp_flags::FIN | tcp_flags::RST) != 0 {
        CtState::Closing
    } else {
        CtState::Established
    };
    CtEntry {
        last_seen_ns: now_ns,
        state: state as u32,
        flags: if from_lo { CT_OPENED_BY_LO } else { 0 },
        packets: 0,
        bytes: 0,
    }
}

/// The entry after a packet of an existing flow (`from_opener`: it travels in the original
/// direction). Returns `None` when nothing worth writing changed (same state and flags, and
/// less than a millisecond since the last write), which keeps the cache line clean on the
/// established fast path.
#[inline(always)]
pub fn advance(
    entry: &CtEntry,
    proto: u8,
    tcp: u8,
    from_opener: bool,
    now_ns: u64,
) -> Option<CtEntry> {
    let mut next = *entry;
    if !from_opener {
        next.flags |= CT_REPLIED;
    }
    if proto == IPPROTO_TCP {
        if tcp & (tcp_flags::FIN | tcp_flags::RST) != 0 {
            next.state = CtState::Closing as u32;
        } else if entry.state == CtState::SynSent as u32
            && !from_opener
            && tcp & tcp_flags::ACK != 0
        {
            next.state = CtState::Established as u32;
        }
    }
    if next.state == entry.state
        && next.flags == entry.flags
        && now_ns.saturating_sub(entry.last_seen_ns) < 1_000_000
    {
        return None;
    }
    next.last_seen_ns = now_ns;
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::{tcp_flags::*, *};
    use crate::parse::Family;

    fn ip(src: u8, dst: u8, proto: u8, sport: u16, dport: u16) -> IpPacket {
        let a = |x| crate::filter::ipv4_mapped([10, 0, 0, x]);
        IpPacket {
            family: Family::V4,
            src: a(src),
            dst: a(dst),
            proto,
            l3_offset: 14,
            l4_offset: 34,
            has_l4: true,
            src_port: sport,
            dst_port: dport,
        }
    }

    #[test]
    fn both_directions_share_one_key() {
        let there = flow(7, &ip(1, 2, IPPROTO_TCP, 40000, 80));
        let back = flow(7, &ip(2, 1, IPPROTO_TCP, 80, 40000));
        assert_eq!(there.key, back.key);
        assert!(there.from_lo && !back.from_lo);
        // Another VPC with the same addresses is another flow.
        assert_ne!(flow(8, &ip(1, 2, IPPROTO_TCP, 40000, 80)).key, there.key);
        // ICMP echo request (type 8) and reply (type 0) of one id share a key.
        let req = flow(7, &ip(1, 2, IPPROTO_ICMP, 99, 0x0800));
        let rep = flow(7, &ip(2, 1, IPPROTO_ICMP, 99, 0x0000));
        assert_eq!(req.key, rep.key);
        assert_eq!((req.key.lo_port, req.key.hi_port), (99, 99));
    }

    #[test]
    fn tcp_life_cycle_sets_the_timeouts() {
        let cfg = CtConfig::DEFAULT;
        let e = open(IPPROTO_TCP, SYN, true, 1_000);
        assert_eq!(e.state, CtState::SynSent as u32);
        assert_eq!(cfg.timeout_ns(IPPROTO_TCP, e.state), 120_000_000_000);
        // A retransmitted SYN from the opener changes nothing (within the millisecond).
        assert_eq!(advance(&e, IPPROTO_TCP, SYN, true, 1_500), None);
        let e = advance(&e, IPPROTO_TCP, SYN | ACK, false, 2_000_000).unwrap();
        assert_eq!(e.state, CtState::Established as u32);
        assert_eq!(e.flags, CT_OPENED_BY_LO | CT_REPLIED);
        assert_eq!(
            cfg.timeout_ns(IPPROTO_TCP, e.state),
            432_000 * 1_000_000_000
        );
        let e = advance(&e, IPPROTO_TCP, FIN | ACK, true, 3_000_000).unwrap();
        assert_eq!(e.state, CtState::Closing as u32);
        // A new SYN on the closed 5-tuple is a new connection; a late ACK is not.
        assert!(!continues(&e, IPPROTO_TCP, SYN, true));
        assert!(continues(&e, IPPROTO_TCP, ACK, true));
        assert!(continues(&e, IPPROTO_TCP, SYN, false));
    }

    #[test]
    fn mid_stream_pickup_and_expiry() {
        let cfg = CtConfig::DEFAULT;
        let e = open(IPPROTO_TCP, ACK, false, 0);
        assert_eq!(e.state, CtState::Established as u32);
        assert_eq!(e.flags, 0);
        let udp = open(IPPROTO_UDP, 0, true, 0);
        let key = flow(1, &ip(1, 2, IPPROTO_UDP, 1, 2)).key;
        assert!(!cfg.expired(&key, &udp, 30_000_000_000));
        assert!(cfg.expired(&key, &udp, 30_000_000_001));
        // Refreshing moves the deadline.
        let later = advance(&udp, IPPROTO_UDP, 0, true, 29_000_000_000).unwrap();
        assert!(!cfg.expired(&key, &later, 58_000_000_000));
    }

    #[test]
    fn invalid_flag_combinations() {
        for bad in [0, SYN | FIN, SYN | RST, FIN, SYN | FIN | ACK] {
            assert!(tcp_flags_invalid(bad), "{bad:#x}");
        }
        for good in [SYN, SYN | ACK, ACK, FIN | ACK, RST, RST | ACK] {
            assert!(!tcp_flags_invalid(good), "{good:#x}");
        }
    }

    #[test]
    fn unset_config_means_defaults() {
        let zero = CtConfig {
            tcp_syn_secs: 0,
            tcp_established_secs: 0,
            tcp_closing_secs: 0,
            udp_secs: 0,
            other_secs: 0,
            _reserved: 0,
        };
        assert_eq!(zero.or_default(), CtConfig::DEFAULT);
    }
}
