//! Ordered map operations from one [`HostMaps`] to another.
//!
//! Order keeps every intermediate state consistent for packets: additions go from the
//! outside in (VNIs and VTEPs, then routes, then neighbors, then ports), so a port never
//! exists before what it needs; removals go from the inside out (ports first, VNIs last).
//! Changed values are upserts in place (one atomic map update each).

use std::{collections::BTreeMap, net::Ipv4Addr};

use dataplane_common::overlay::{RouteKind, RoutePrefix};

use super::compile::{EndpointEntry, HostMaps, NeighborEntry};

/// One write to one overlay map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Insert into `VNIS`.
    AddVni(u32),
    /// Remove from `VNIS`.
    DelVni(u32),
    /// Insert into `VTEPS`.
    AddVtep(Ipv4Addr),
    /// Remove from `VTEPS`.
    DelVtep(Ipv4Addr),
    /// Insert or replace in `ROUTES`.
    PutRoute(u32, RoutePrefix, RouteKind),
    /// Remove from `ROUTES`.
    DelRoute(u32, RoutePrefix),
    /// Insert or replace in `NEIGHBORS`.
    PutNeighbor(u32, [u8; 16], NeighborEntry),
    /// Remove from `NEIGHBORS`.
    DelNeighbor(u32, [u8; 16]),
    /// Insert or replace in `ENDPOINTS`.
    PutEndpoint(u32, EndpointEntry),
    /// Remove from `ENDPOINTS`.
    DelEndpoint(u32),
}

/// Puts for keys new or changed in `new`, and deletes for keys gone from it.
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let puts = new
        .iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let dels = old
        .keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect();
    (puts, dels)
}

/// The operations that turn `old` into `new`, in a packet-safe order. Empty when equal, so
/// re-applying the same desired state writes nothing (level-triggered, idempotent).
pub fn diff(old: &HostMaps, new: &HostMaps) -> Vec<MapOp> {
    let mut ops = Vec::new();
    ops.extend(new.vnis.difference(&old.vnis).map(|v| MapOp::AddVni(*v)));
    ops.extend(new.vteps.difference(&old.vteps).map(|v| MapOp::AddVtep(*v)));
    let (route_puts, route_dels) = changes(&old.routes, &new.routes);
    ops.extend(
        route_puts
            .into_iter()
            .map(|((len, p), k)| MapOp::PutRoute(len, p, k)),
    );
    let (neigh_puts, neigh_dels) = changes(&old.neighbors, &new.neighbors);
    ops.extend(
        neigh_puts
            .into_iter()
            .map(|((vni, a), e)| MapOp::PutNeighbor(vni, a, e)),
    );
    let (ep_puts, ep_dels) = changes(&old.endpoints, &new.endpoints);
    ops.extend(ep_puts.into_iter().map(|(i, e)| MapOp::PutEndpoint(i, e)));

    ops.extend(ep_dels.into_iter().map(MapOp::DelEndpoint));
    ops.extend(
        neigh_dels
            .into_iter()
            .map(|(vni, a)| MapOp::DelNeighbor(vni, a)),
    );
    ops.extend(
        route_dels
            .into_iter()
            .map(|(len, p)| MapOp::DelRoute(len, p)),
    );
    ops.extend(old.vteps.difference(&new.vteps).map(|v| MapOp::DelVtep(*v)));
    ops.extend(old.vnis.difference(&new.vnis).map(|v| MapOp::DelVni(*v)));
    ops
}
