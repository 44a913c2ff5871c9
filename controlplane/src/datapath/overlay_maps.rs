//! The pinned overlay maps: reading what the kernel holds, and applying map operations.
//!
//! The agent reconciles level-triggered: it reads the maps back ([`OverlayMaps::read`]),
//! diffs them against the compiled desired state and applies only the difference. After a
//! crash or restart the maps are the truth, so nothing is lost or written twice.

use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use dataplane_common::{
    maps,
    overlay::{Endpoint, Neighbor, NeighborKey, OverlayConfig, Route, RouteKind, RoutePrefix},
};

use super::{
    DatapathError, PinLayout,
    map_io::{map_err, open, removed},
};
use crate::overlay::{
    MapOp,
    compile::{EndpointEntry, HostMaps, NeighborEntry},
};

/// Handles on the pinned overlay maps of one datapath.
pub struct OverlayMaps {
    endpoints: HashMap<MapData, u32, Endpoint>,
    neighbors: HashMap<MapData, NeighborKey, Neighbor>,
    routes: LpmTrie<MapData, RoutePrefix, Route>,
    vteps: HashMap<MapData, [u8; 4], u32>,
    vnis: HashMap<MapData, u32, u32>,
    config: Array<MapData, OverlayConfig>,
}

impl std::fmt::Debug for OverlayMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayMaps").finish_non_exhaustive()
    }
}

impl OverlayMaps {
    /// Opens the overlay maps pinned under `layout`.
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(OverlayMaps {
            endpoints: HashMap::try_from(Map::HashMap(open(layout, maps::ENDPOINTS)?))
                .map_err(map_err(maps::ENDPOINTS))?,
            neighbors: HashMap::try_from(Map::HashMap(open(layout, maps::NEIGHBORS)?))
                .map_err(map_err(maps::NEIGHBORS))?,
            routes: LpmTrie::try_from(Map::LpmTrie(open(layout, maps::ROUTES)?))
                .map_err(map_err(maps::ROUTES))?,
            vteps: HashMap::try_from(Map::HashMap(open(layout, maps::VTEPS)?))
                .map_err(map_err(maps::VTEPS))?,
            vnis: HashMap::try_from(Map::HashMap(open(layout, maps::VNIS)?))
                .map_err(map_err(maps::VNIS))?,
            config: Array::try_from(Map::Array(open(layout, maps::OVERLAY_CONFIG)?))
                .map_err(map_err(maps::OVERLAY_CONFIG))?,
        })
    }

    /// Writes this host's overlay configuration.
    pub fn set_config(&mut self, config: &OverlayConfig) -> Result<(), DatapathError> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(maps::OVERLAY_CONFIG))
    }

    /// This host's overlay configuration.
    pub fn config(&self) -> Result<OverlayConfig, DatapathError> {
        self.config
            .get(&0, 0)
            .map_err(map_err(maps::OVERLAY_CONFIG))
    }

    /// What the maps hold now, in the compiler's terms. Entries of kinds this agent does not
    /// know are left out (and so are never deleted by a diff).
    pub fn read(&self) -> Result<HostMaps, DatapathError> {
        let mut out = HostMaps::default();
        for r in self.vnis.keys() {
            out.vnis.insert(r.map_err(map_err(maps::VNIS))?);
        }
        for r in self.vteps.keys() {
            out.vteps
                .insert(Ipv4Addr::from(r.map_err(map_err(maps::VTEPS))?));
        }
        for r in self.routes.iter() {
            let (key, route) = r.map_err(map_err(maps::ROUTES))?;
            let kind = match route.kind {
                k if k == RouteKind::Local as u32 => RouteKind::Local,
                k if k == RouteKind::Blackhole as u32 => RouteKind::Blackhole,
                _ => continue,
            };
            out.routes.insert((key.prefix_len(), key.data()), kind);
        }
        for r in self.neighbors.iter() {
            let (key, value) = r.map_err(map_err(maps::NEIGHBORS))?;
            if let Some(entry) = NeighborEntry::from_value(&value) {
                out.neighbors.insert((key.vni, key.addr), entry);
            }
        }
        for r in self.endpoints.iter() {
            let (ifindex, value) = r.map_err(map_err(maps::ENDPOINTS))?;
            out.endpoints
                .insert(ifindex, EndpointEntry::from_value(&value));
        }
        Ok(out)
    }

    /// Applies `ops` in order. Deleting an absent key counts as done, so a half-applied
    /// batch (agent killed midway) is finished by the next reconcile.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        for op in ops {
            self.apply_one(op)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        match op {
            MapOp::AddVni(vni) => self.vnis.insert(vni, 1, 0).map_err(map_err(maps::VNIS)),
            MapOp::DelVni(vni) => removed(self.vnis.remove(vni), maps::VNIS),
            MapOp::AddVtep(ip) => self
                .vteps
                .insert(ip.octets(), 1, 0)
                .map_err(map_err(maps::VTEPS)),
            MapOp::DelVtep(ip) => removed(self.vteps.remove(&ip.octets()), maps::VTEPS),
            MapOp::PutRoute(len, prefix, kind) => self
                .routes
                .insert(&Key::new(*len, *prefix), Route { kind: *kind as u32 }, 0)
                .map_err(map_err(maps::ROUTES)),
            MapOp::DelRoute(len, prefix) => {
                removed(self.routes.remove(&Key::new(*len, *prefix)), maps::ROUTES)
            }
            MapOp::PutNeighbor(vni, addr, entry) => self
                .neighbors
                .insert(
                    NeighborKey {
                        vni: *vni,
                        addr: *addr,
                    },
                    entry.value(),
                    0,
                )
                .map_err(map_err(maps::NEIGHBORS)),
            MapOp::DelNeighbor(vni, addr) => removed(
                self.neighbors.remove(&NeighborKey {
                    vni: *vni,
                    addr: *addr,
                }),
                maps::NEIGHBORS,
            ),
            MapOp::PutEndpoint(ifindex, entry) => self
                .endpoints
                .insert(ifindex, entry.value(), 0)
                .map_err(map_err(maps::ENDPOINTS)),
            MapOp::DelEndpoint(ifindex) => removed(self.endpoints.remove(ifindex), maps::ENDPOINTS),
        }
    }
}
