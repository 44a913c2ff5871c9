//! Helpers every pinned-map handle uses: opening a pin by name, naming the map in errors,
//! and treating a delete of an absent key as done.

use aya::maps::{MapData, MapError};

use super::{DatapathError, PinLayout};

/// Wraps a map error with the map's name.
pub(super) fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Opens the map pinned as `name` under `layout`.
pub(super) fn open(layout: &PinLayout, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(layout.map(name)).map_err(map_err(name))
}

/// Whether a delete failed only because the key was not there (aya reports the raw ENOENT
/// of BPF_MAP_DELETE_ELEM for some map types).
pub(super) fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// A delete's result, with an absent key counted as done (the goal state holds).
pub(super) fn removed(r: Result<(), MapError>, name: &'static str) -> Result<(), DatapathError> {
    match r {
        Err(e) if !is_missing(&e) => Err(map_err(name)(e)),
        _ => Ok(()),
    }
}

/// Wraps the error of a batched syscall (`sys::*_batch`) with the map's name.
pub(super) fn batch_err(map: &'static str) -> impl Fn(std::io::Error) -> DatapathError {
    move |io_error| DatapathError::Map {
        map,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf batch",
            io_error,
        }),
    }
}
