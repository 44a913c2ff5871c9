//! `aya::Pod` for the map types, so user space can read and write them through aya maps.

use crate::{
    Counter, FilterKey, FilterValue,
    overlay::{Endpoint, Neighbor, NeighborKey, OverlayConfig, Route, RoutePrefix},
};

// SAFETY: `Counter` is `#[repr(C)]`, made of two `u64`, has no padding (size asserted) and
// every bit pattern is a valid value.
unsafe impl aya::Pod for Counter {}
// SAFETY: `FilterKey` is `#[repr(C)]`, made of integers and byte arrays, has no implicit
// padding (size asserted; the one spare byte is an explicit field) and every bit pattern is
// valid.
unsafe impl aya::Pod for FilterKey {}
// SAFETY: `FilterValue` is `#[repr(C)]` around one `u32`; every bit pattern is valid (unknown
// actions are interpreted as drop).
unsafe impl aya::Pod for FilterValue {}
// SAFETY: the overlay types are `#[repr(C)]`, made of integers and byte arrays, have no
// implicit padding (sizes asserted; spare bytes are explicit fields) and accept every bit
// pattern.
unsafe impl aya::Pod for Endpoint {}
// SAFETY: as above.
unsafe impl aya::Pod for NeighborKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Neighbor {}
// SAFETY: as above.
unsafe impl aya::Pod for RoutePrefix {}
// SAFETY: as above.
unsafe impl aya::Pod for Route {}
// SAFETY: as above.
unsafe impl aya::Pod for OverlayConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::conntrack::CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::conntrack::CtEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::conntrack::CtConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::policy::PolicyAddrKey {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::policy::PolicyPortKey {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::policy::AclVerdict {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::stats::EndpointDropKey {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::lb::LbServiceKey {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::lb::LbService {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::lb::LbBackend {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::lb::LbTuple {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::lb::LbFlow {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::lb::LbReverse {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::conntrack::CtEntryV5 {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::conntrack::CtBudget {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::stats::EndpointStatsKey {}
// SAFETY: as above (the `Decision` inside is `#[repr(C)]` integers with explicit padding).
unsafe impl aya::Pod for crate::flowlog::FlowEvent {}
// SAFETY: as above.
unsafe impl aya::Pod for crate::trace::TraceEvent {}
