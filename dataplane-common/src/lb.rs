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

use crate::parse::IpPacket;

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
