//! The kernel maps as the pure logic's lookup traits.
//!
//! Values are copied out at once. User space replaces entries whole with one
//! BPF_MAP_UPDATE_ELEM each, so a concurrent update yields the old or the new value, both
//! valid.

use aya_ebpf::maps::lpm_trie::Key;
use dataplane_common::{
    FilterKey, FilterValue,
    overlay::{Neighbor, NeighborKey, OverlayConfig, OverlayTables, Route, RoutePrefix},
    verdict::FilterTable,
};

use crate::maps::{FILTER, NEIGHBORS, OVERLAY_CONFIG, ROUTES, VNIS, VTEPS};

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
