//! Network load balancers (NLB semantics): the map layout and the flow hash.
//!
//! A load balancer has a virtual IP (VIP) in a subnet of its VPC and listeners (protocol,
//! port). The VIP is a `NEIGHBORS` entry of kind `LoadBalancer`, so instances ARP for it and
//! the port program only looks for a listener when a packet is addressed to a VIP.
//!
//! Per packet from a client instance to VIP:port (the client's port program, on the client's
//! host):
//!
//! 1. `LB_SERVICES`: [`LbServiceKey`] (VNI, VIP, port, protocol) -> [`LbService`] (id and
//!    the service's range of `LB_MAGLEV`).
//! 2. `LB_FLOWS`: [`LbTuple`] (client -> VIP) -> [`LbFlow`]: a flow already bound to a target
//!    stays on it for its life (while the target is active or draining), whatever the table
//!    says now. Otherwise:
//! 3. `LB_MAGLEV[table_offset + flow_hash % table_size]` -> backend id; `LB_BACKENDS`: id ->
//!    [`LbBackend`] (target address and port). The flow is recorded in `LB_FLOWS`, and its
//!    reply direction in `LB_REVERSE`.
//! 4. The packet is DNATed to the target (client source kept) and forwarded like any other.
//!
//! Replies (target -> client) are reverse-NATed where they are delivered to the client:
//! `LB_REVERSE`: [`LbTuple`] (target -> client) -> [`LbReverse`] (VIP and port), looked up
//! only for endpoints whose VPC has load balancers ([`crate::overlay::EP_LB_CLIENT`]).
//!
//! The Maglev tables are computed in user space (`controlplane::lb::maglev`); the kernel only
//! indexes them. A service switches tables by pointing at a new range (written beside the old
//! one), so no packet sees a half-written table.

use crate::{
    DropReason,
    conntrack::CtConfig,
    parse::{IPPROTO_TCP, IPPROTO_UDP, IpPacket},
};

/// [`LbBackend::state`]: the target takes new flows (it is in the service's table).
pub const LB_BACKEND_ACTIVE: u16 = 1;
/// [`LbBackend::state`]: deregistered, draining: existing flows continue, no new ones (it is
/// not in any table).
pub const LB_BACKEND_DRAINING: u16 = 2;

/// Key of `LB_SERVICES`: a listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbServiceKey {
    /// VNI of the load balancer's VPC.
    pub vni: u32,
    /// The VIP (IPv4-mapped).
    pub vip: [u8; 16],
    /// Listener port.
    pub port: u16,
    /// IP protocol (TCP or UDP).
    pub proto: u8,
    /// Reserved, zero.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<LbServiceKey>() == 24);

/// Value of `LB_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbService {
    /// Service id (unique on the host; flows remember it).
    pub id: u32,
    /// First slot of the service's Maglev table in `LB_MAGLEV`.
    pub table_offset: u32,
    /// Slots of the table (a prime); 0: no target at all, new flows are dropped.
    pub table_size: u32,
    /// Reserved, zero.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<LbService>() == 16);

/// Value of `LB_BACKENDS` (key: backend id, unique on the host).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbBackend {
    /// Target address (IPv4-mapped).
    pub addr: [u8; 16],
    /// Target port.
    pub port: u16,
    /// `LB_BACKEND_ACTIVE` or `LB_BACKEND_DRAINING`.
    pub state: u16,
    /// Id of the service the backend serves.
    pub service: u32,
}

const _: () = assert!(core::mem::size_of::<LbBackend>() == 24);

/// Key of `LB_FLOWS` (client -> VIP) and `LB_REVERSE` (target -> client): one direction of a
/// flow, as the packet carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbTuple {
    /// VNI of the VPC.
    pub vni: u32,
    /// Source address (IPv4-mapped).
    pub src: [u8; 16],
    /// Destination address (IPv4-mapped).
    pub dst: [u8; 16],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Reserved, zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<LbTuple>() == 44);

impl LbTuple {
    /// The tuple of a parsed packet in VPC `vni`.
    #[inline(always)]
    pub fn of(vni: u32, ip: &IpPacket) -> Self {
        LbTuple {
            vni,
            src: ip.src,
            dst: ip.dst,
            sport: ip.src_port,
            dport: ip.dst_port,
            proto: ip.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of `LB_FLOWS`: the target a flow is bound to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbFlow {
    /// `bpf_ktime_get_ns` of the last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
    /// Backend id.
    pub backend: u32,
    /// Service id (a backend id reused by another service never captures the flow).
    pub service: u32,
}

const _: () = assert!(core::mem::size_of::<LbFlow>() == 16);

/// Value of `LB_REVERSE`: what the target's replies must look like to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbReverse {
    /// The VIP (IPv4-mapped): the replies' source.
    pub vip: [u8; 16],
    /// The listener port: the replies' source port.
    pub port: u16,
    /// Reserved, zero.
    pub _pad: u16,
    /// Service id.
    pub service: u32,
}

const _: () = assert!(core::mem::size_of::<LbReverse>() == 24);

/// How often (at most) a packet rewrites its flow's `last_seen_ns`: keeps the established
/// path's cache line clean.
pub const LB_FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Folds an address into 32 bits (IPv4-mapped addresses give their IPv4 word mixed with the
/// constant prefix).
#[inline(always)]
fn fold(a: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    w(0) ^ w(4) ^ w(8).rotate_left(7) ^ w(12)
}

/// The 64-bit finalizer of MurmurHash3: every input bit affects every output bit.
#[inline(always)]
const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The hash a new flow's Maglev slot is chosen by (`slot = hash % table_size`): the
/// 5-tuple, mixed so that consecutive ports and addresses spread evenly. The same function
/// runs in the kernel and in the user-space tests of the tables' balance.
#[inline(always)]
pub fn flow_hash(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let addrs = (u64::from(fold(src)) << 32) | u64::from(fold(dst));
    let ports = (u64::from(sport) << 24) | (u64::from(dport) << 8) | u64::from(proto);
    let h = fmix64(addrs ^ fmix64(ports ^ 0x9e37_79b9_7f4a_7c15));
    (h ^ (h >> 32)) as u32
}

/// The load-balancer maps as the selection logic reads them: the kernel implements it over
/// the BPF maps, host tests over in-memory tables.
pub trait LbTables {
    /// `LB_SERVICES`.
    fn service(&self, key: &LbServiceKey) -> Option<LbService>;
    /// `LB_MAGLEV[slot]`.
    fn slot(&self, slot: u32) -> Option<u32>;
    /// `LB_BACKENDS`.
    fn backend(&self, id: u32) -> Option<LbBackend>;
    /// `LB_FLOWS`.
    fn flow(&self, key: &LbTuple) -> Option<LbFlow>;
    /// Writes a flow's `LB_FLOWS` entry and its replies' `LB_REVERSE` entry (a full LRU
    /// table evicts the stalest).
    fn record(&self, key: &LbTuple, flow: &LbFlow, reply: &LbTuple, rev: &LbReverse);
    /// `LB_REVERSE`.
    fn reverse(&self, key: &LbTuple) -> Option<LbReverse>;
    /// `CT_CONFIG` (flows idle longer than their conntrack timeout are balanced anew).
    fn ct_config(&self) -> CtConfig;
}

/// The outcome of [`select`]: the backend a packet goes to, and whether its flow must be
/// recorded (new) or refreshed ([`record`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// The backend (its address and port are the packet's new destination).
    pub backend: LbBackend,
    /// Its id.
    pub id: u32,
    /// Whether [`record`] must run.
    pub record: bool,
}

/// The target of packet `ip` of VPC `vni`, sent to a VIP, into `out`: the flow's target if
/// it has one that still serves (active or draining), else a new one from the Maglev table,
/// which the caller records for the rest of the flow ([`record`]). `now_ns` is
/// `bpf_ktime_get_ns`. Never inlined: in the kernel a BPF subprogram (its keys take stack
/// only while it runs; the 512-byte limit covers the whole call chain, so `record` is its
/// sibling, not its child), which fills `out` rather than returning a struct.
#[inline(never)]
pub fn select<T: LbTables>(
    ip: &IpPacket,
    vni: u32,
    now_ns: u64,
    t: &T,
    out: &mut Selection,
) -> Result<(), DropReason> {
    if !ip.has_l4 || !matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP) {
        return Err(DropReason::LbNoListener);
    }
    let svc = t
        .service(&LbServiceKey {
            vni,
            vip: ip.dst,
            port: ip.dst_port,
            proto: ip.proto,
            _pad: 0,
        })
        .ok_or(DropReason::LbNoListener)?;
    if let Some(flow) = t.flow(&LbTuple::of(vni, ip))
        && flow.service == svc.id
        && let Some(b) = t.backend(flow.backend)
        && b.service == svc.id
        && (b.state == LB_BACKEND_ACTIVE || b.state == LB_BACKEND_DRAINING)
    {
        let timeout = t
            .ct_config()
            .or_default()
            .timeout_ns(ip.proto, crate::conntrack::CtState::Established as u32);
        let idle = now_ns.saturating_sub(flow.last_seen_ns);
        if idle <= timeout {
            out.backend = b;
            out.id = flow.backend;
            out.record = idle >= LB_FLOW_REFRESH_NS;
            return Ok(());
        }
    }
    if svc.table_size == 0 {
        return Err(DropReason::LbNoTarget);
    }
    let hash = flow_hash(&ip.src, &ip.dst, ip.src_port, ip.dst_port, ip.proto);
    let id = t
        .slot(svc.table_offset + hash % svc.table_size)
        .ok_or(DropReason::LbNoTarget)?;
    let b = t.backend(id).ok_or(DropReason::LbNoTarget)?;
    if b.service != svc.id || b.state != LB_BACKEND_ACTIVE {
        // The table names a backend of another service or one no longer taking flows: user
        // space is between two writes; the client retries.
        return Err(DropReason::LbNoTarget);
    }
    out.backend = b;
    out.id = id;
    out.record = true;
    Ok(())
}

/// Records (or refreshes) the flow of `ip` (VPC `vni`) bound to `sel`'s backend, and its
/// reply direction. A BPF subprogram, as [`select`].
#[inline(never)]
pub fn record<T: LbTables>(t: &T, ip: &IpPacket, vni: u32, sel: &Selection, now_ns: u64) {
    let key = LbTuple::of(vni, ip);
    let (b, id) = (&sel.backend, sel.id);
    let reply = LbTuple {
        vni: key.vni,
        src: b.addr,
        dst: key.src,
        sport: b.port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    t.record(
        &key,
        &LbFlow {
            last_seen_ns: now_ns,
            backend: id,
            service: b.service,
        },
        &reply,
        &LbReverse {
            vip: key.dst,
            port: key.dport,
            _pad: 0,
            service: b.service,
        },
    );
}

/// What a packet delivered to a client of VPC `vni` must look like if it is a target's reply
/// to a balanced flow: the VIP and listener port to put in as its source.
#[inline(always)]
pub fn reverse<T: LbTables>(ip: &IpPacket, vni: u32, t: &T) -> Option<LbReverse> {
    if !ip.has_l4 || !matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP) {
        return None;
    }
    t.reverse(&LbTuple::of(vni, ip))
}

/// Backend state names, as `vpc` and the agent print them.
pub fn backend_state_name(state: u16) -> &'static str {
    match state {
        LB_BACKEND_ACTIVE => "active",
        LB_BACKEND_DRAINING => "draining",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_spreads_consecutive_ports() {
        let src = crate::filter::ipv4_mapped([10, 0, 1, 10]);
        let dst = crate::filter::ipv4_mapped([10, 0, 1, 100]);
        let mut buckets = [0u32; 16];
        for p in 0..16_000u16 {
            buckets[(flow_hash(&src, &dst, 10_000 + p, 80, 6) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
        assert_ne!(
            flow_hash(&src, &dst, 1, 80, 6),
            flow_hash(&src, &dst, 1, 80, 17)
        );
    }
}
