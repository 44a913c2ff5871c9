//! The kernel maps as the pure logic's lookup traits.
//!
//! Values are copied out at once. User space replaces entries whole with one
//! BPF_MAP_UPDATE_ELEM each, so a concurrent update yields the old or the new value, both
//! valid.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::maps::lpm_trie::Key;
use dataplane_common::{
    FilterKey, FilterValue,
    conntrack::{CtBudget, CtConfig, CtEntry, CtKey},
    lb::{LbBackend, LbFlow, LbReverse, LbService, LbServiceKey, LbTables, LbTuple},
    overlay::{Neighbor, NeighborKey, OverlayConfig, OverlayTables, Route, RoutePrefix},
    policy::{AclVerdict, CtSlot, PolicyAddrKey, PolicyPortKey, PolicyTables},
    verdict::FilterTable,
};

use crate::maps::{
    ACL_ADDR, ACL_PORT, CONNTRACK, CT_BUDGET, CT_CONFIG, FILTER, LB_BACKENDS, LB_FLOWS, LB_MAGLEV,
    LB_REVERSE, LB_SERVICES, NEIGHBORS, OVERLAY_CONFIG, ROUTES, SG_ADDR, SG_PORT, VNIS, VTEPS,
};

/// All lookup tables of the datapath.
pub struct KernelTables;

impl FilterTable for KernelTables {
    #[inline(always)]
    fn get(&self, key: &FilterKey) -> Option<FilterValue> {
        // SAFETY: see the module docs; the value is copied before the reference can go stale.
        unsafe { FILTER.get(key).copied() }
    }
}

impl OverlayTables for KernelTables {
    #[inline(always)]
    fn route(&self, key: &RoutePrefix) -> Option<Route> {
        // Full-length key: the trie returns the longest stored prefix covering it.
        let key = Key::new((core::mem::size_of::<RoutePrefix>() * 8) as u32, *key);
        ROUTES.get(&key).copied()
    }

    #[inline(always)]
    fn neighbor(&self, key: &NeighborKey) -> Option<Neighbor> {
        // SAFETY: see the module docs.
        unsafe { NEIGHBORS.get(key).copied() }
    }

    #[inline(always)]
    fn is_vtep(&self, addr: [u8; 4]) -> bool {
        // SAFETY: see the module docs; only presence is read.
        unsafe { VTEPS.get(addr).is_some() }
    }

    #[inline(always)]
    fn is_vni(&self, vni: u32) -> bool {
        // SAFETY: see the module docs; only presence is read.
        unsafe { VNIS.get(vni).is_some() }
    }
}

/// This host's overlay configuration (all zero until the agent writes it).
#[inline(always)]
pub fn overlay_config() -> OverlayConfig {
    OVERLAY_CONFIG.get(0).copied().unwrap_or_default()
}

/// The conntrack timeouts (`CT_CONFIG`; policy and load balancer both read them).
#[inline(always)]
fn ct_config() -> CtConfig {
    CT_CONFIG.get(0).copied().unwrap_or_default()
}

/// Atomically adds `n` to `*dst` (a BPF atomic add; the result is unused, so no fetch
/// variant is needed). `core::sync::atomic` offers no `fetch_add` on the BPF target.
///
/// # Safety
/// `dst` must point to a live, aligned integer in a map value.
#[inline(always)]
unsafe fn atomic_add<T: Copy>(dst: *mut T, n: T) {
    // SAFETY: the caller's contract.
    unsafe {
        atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(dst, n);
    }
}

/// A conntrack entry in the map, written in place (not in a trace run).
pub struct KernelCt(*mut CtEntry, bool);

impl CtSlot for KernelCt {
    #[inline(always)]
    fn get(&self) -> CtEntry {
        // SAFETY: the pointer came from a successful lookup and points into the map's
        // element, valid for the program run (RCU). Concurrent writers on other CPUs race
        // benignly: every field is a plain integer and any mix is a valid entry.
        unsafe { *self.0 }
    }

    #[inline(always)]
    fn set(&self, entry: &CtEntry) {
        if self.1 {
            return;
        }
        // SAFETY: as in `get`. The counters are not written (see `CtSlot::set`).
        unsafe {
            (*self.0).last_seen_ns = entry.last_seen_ns;
            (*self.0).state = entry.state;
            (*self.0).flags = entry.flags;
        }
    }

    #[inline(always)]
    fn count(&self, bytes: u32) {
        if self.1 {
            return;
        }
        // SAFETY: as in `get`; the counters are 8-byte aligned `u64`s in the map value,
        // only ever accessed atomically by the programs (user space reads them as a copy).
        unsafe {
            atomic_add(&raw mut (*self.0).packets, 1);
            atomic_add(&raw mut (*self.0).bytes, u64::from(bytes));
        }
    }
}

/// The policy maps as `policy::evaluate` uses them; in a trace run (`trace`) every write
/// (conntrack create, refresh and counters, budget count) is skipped.
pub struct PolicyKernel {
    /// A trace run: change nothing.
    pub trace: bool,
}

impl PolicyKernel {
    /// `CT_BUDGET` of VPC `vni`.
    #[inline(always)]
    pub fn budget(vni: u32) -> Option<CtBudget> {
        // SAFETY: see the module docs; `count` may be added to concurrently (a plain
        // integer: any value read is a valid count).
        unsafe { CT_BUDGET.get(vni).copied() }
    }
}

impl PolicyTables for PolicyKernel {
    type Slot = KernelCt;

    #[inline(always)]
    fn sg_class(&self, key: &PolicyAddrKey) -> Option<u32> {
        SG_ADDR
            .get(Key::new(PolicyAddrKey::FULL_LEN, *key))
            .copied()
    }

    #[inline(always)]
    fn sg_port(&self, key: &PolicyPortKey) -> Option<u32> {
        SG_PORT
            .get(Key::new(PolicyPortKey::FULL_LEN, *key))
            .copied()
    }

    #[inline(always)]
    fn acl_class(&self, key: &PolicyAddrKey) -> Option<u32> {
        ACL_ADDR
            .get(Key::new(PolicyAddrKey::FULL_LEN, *key))
            .copied()
    }

    #[inline(always)]
    fn acl_port(&self, key: &PolicyPortKey) -> Option<AclVerdict> {
        ACL_PORT
            .get(Key::new(PolicyPortKey::FULL_LEN, *key))
            .copied()
    }

    #[inline(always)]
    fn ct_get(&self, key: &CtKey) -> Option<KernelCt> {
        CONNTRACK.get_ptr_mut(key).map(|e| KernelCt(e, self.trace))
    }

    #[inline(always)]
    fn ct_create(&self, key: &CtKey, entry: &CtEntry) {
        if self.trace {
            return;
        }
        // An LRU map evicts to make room, so this only fails on memory pressure; the packet
        // passes either way (its next packet is evaluated as new again).
        let _ = CONNTRACK.insert(key, entry, 0);
    }

    #[inline(always)]
    fn ct_config(&self) -> CtConfig {
        ct_config()
    }

    #[inline(always)]
    fn ct_budget(&self, vni: u32) -> Option<CtBudget> {
        Self::budget(vni)
    }

    #[inline(always)]
    fn ct_budget_charge(&self, vni: u32) {
        if self.trace {
            return;
        }
        if let Some(b) = CT_BUDGET.get_ptr_mut(vni) {
            // SAFETY: the pointer came from a successful lookup into a live element (RCU);
            // `count` is a 4-byte aligned `u32` the programs only add to atomically.
            unsafe {
                atomic_add(&raw mut (*b).count, 1u32);
            }
        }
    }
}

impl LbTables for KernelTables {
    #[inline(always)]
    fn service(&self, key: &LbServiceKey) -> Option<LbService> {
        // SAFETY: see the module docs.
        unsafe { LB_SERVICES.get(key).copied() }
    }

    #[inline(always)]
    fn slot(&self, slot: u32) -> Option<u32> {
        LB_MAGLEV.get(slot).copied()
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<LbBackend> {
        // SAFETY: see the module docs.
        unsafe { LB_BACKENDS.get(id).copied() }
    }

    #[inline(always)]
    fn flow(&self, key: &LbTuple) -> Option<LbFlow> {
        // SAFETY: see the module docs; a concurrent refresh races benignly (plain integers).
        unsafe { LB_FLOWS.get(key).copied() }
    }

    #[inline(always)]
    fn record(&self, key: &LbTuple, flow: &LbFlow, reply: &LbTuple, rev: &LbReverse) {
        // LRU maps evict to make room; a failure under memory pressure only means the next
        // packet is balanced again.
        let _ = LB_FLOWS.insert(key, flow, 0);
        let _ = LB_REVERSE.insert(reply, rev, 0);
    }

    #[inline(always)]
    fn reverse(&self, key: &LbTuple) -> Option<LbReverse> {
        // SAFETY: see the module docs.
        unsafe { LB_REVERSE.get(key).copied() }
    }

    #[inline(always)]
    fn ct_config(&self) -> CtConfig {
        ct_config()
    }
}
