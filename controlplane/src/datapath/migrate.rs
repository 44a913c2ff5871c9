//! Migrating the pinned datapath from the previous maps ABI to this one, while traffic flows.
//!
//! Pins live under `<root>/<MAPS_ABI>/` (see [`super::bpffs`]). When an agent of a new ABI
//! starts on a host where an agent of an older one ran, the old tree holds the live state
//! (flows, counters, endpoints, policy) and the bpf_links that keep the old programs on the
//! interfaces. [`MIGRATIONS`] is the one place that says, per map, what happens to it:
//!
//! - [`MapChange::Carry`]: same layout. The *same* kernel map is pinned at the new path too
//!   (BPF_OBJ_GET on the old pin, BPF_OBJ_PIN at the new one) before the new object loads,
//!   so the loader reuses it and old and new programs share it: no copy, no gap.
//! - [`MapChange::Convert`]: new layout. The loader creates the map fresh at the new path;
//!   its converter copies the old entries in with batch syscalls before the links are
//!   swapped, and again right after (entries the old programs created meanwhile).
//! - [`MapChange::New`]: the map did not exist; it starts empty.
//!
//! Then every link pinned in the old tree is pinned at the new path and gets the new program
//! with `BPF_LINK_UPDATE` (atomic per hook), and the old tree is removed.
//!
//! Crash safety: every step is idempotent and the old tree goes last, so an agent killed at
//! any point leaves a state the next start completes: carried pins already present are kept,
//! conversion merges (never duplicates or rolls back a newer entry), a link pinned in both
//! trees is the same link (old pin just removed) or, if a new agent attached its own link
//! meanwhile, the old one is detached so one program runs per hook.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::MapData,
    programs::links::{FdLink, PinnedLink},
};
use dataplane_common::{
    conntrack::{CtEntry, CtEntryV5, CtKey},
    maps::{self, MAPS_ABI},
};

use super::{
    DatapathError, PinLayout,
    map_io::{batch_err, map_err},
    sys,
};

/// What a version change does to one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// Same layout: the old map itself is pinned at the new path and shared.
    Carry,
    /// New layout: created fresh, entries converted by the given converter.
    Convert(Converter),
    /// New map: starts empty.
    New,
}

/// The converters of changed maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Converter {
    /// `CONNTRACK` values `CtEntryV5` (16 B) -> `CtEntry` (32 B, packet and byte counters
    /// starting at 0).
    ConntrackV5,
}

/// One migration: from an older ABI to [`MAPS_ABI`].
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// The ABI (pin subdirectory) migrated from.
    pub from: &'static str,
    /// Every map of [`MAPS_ABI`] and what happens to it. A map of the new object missing
    /// here is treated as [`MapChange::New`] (safe: never shares a map of unknown layout);
    /// a test keeps the table complete.
    pub maps: &'static [(&'static str, MapChange)],
}

use MapChange::{Carry, Convert, New};

/// v5 -> v6: `CONNTRACK` values grew packet and byte counters; five maps are new.
const V5_TO_V6: &[(&str, MapChange)] = &[
    (maps::ACTION_STATS, Carry),
    (maps::DROP_STATS, Carry),
    (maps::FILTER, Carry),
    (maps::ENDPOINTS, Carry),
    (maps::NEIGHBORS, Carry),
    (maps::ROUTES, Carry),
    (maps::VTEPS, Carry),
    (maps::VNIS, Carry),
    (maps::OVERLAY_CONFIG, Carry),
    (maps::CONNTRACK, Convert(Converter::ConntrackV5)),
    (maps::CT_CONFIG, Carry),
    (maps::SG_ADDR, Carry),
    (maps::SG_PORT, Carry),
    (maps::ACL_ADDR, Carry),
    (maps::ACL_PORT, Carry),
    (maps::ENDPOINT_DROPS, Carry),
    (maps::LB_SERVICES, Carry),
    (maps::LB_BACKENDS, Carry),
    (maps::LB_MAGLEV, Carry),
    (maps::LB_FLOWS, Carry),
    (maps::LB_REVERSE, Carry),
    (maps::ENDPOINT_STATS, New),
    (maps::FLOW_EVENTS, New),
    (maps::FLOWLOG_LOST, New),
    (maps::TRACE_EVENTS, New),
    (maps::CT_BUDGET, New),
];

/// The migrations this build performs, newest source first. The agent migrates from the
/// first whose directory exists.
pub const MIGRATIONS: &[Migration] = &[Migration {
    from: maps::PREVIOUS_MAPS_ABI,
    maps: V5_TO_V6,
}];

/// What to do with each map, from the table and the pins present (pure: unit-tested).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pin the old map at the new path.
    pub carry: Vec<&'static str>,
    /// Fill the (freshly created) new map from the old one.
    pub convert: Vec<(&'static str, Converter)>,
    /// Let the loader create the map empty (new, or absent from the old tree).
    pub fresh: Vec<&'static str>,
    /// Already pinned at the new path (an interrupted migration): kept as is.
    pub kept: Vec<&'static str>,
    /// Old maps the new ABI does not have: removed with the old tree.
    pub dropped: Vec<String>,
}

/// Plans a migration: `old` and `new` are the map pins present in the old and new trees.
pub fn plan(migration: &Migration, old: &BTreeSet<String>, new: &BTreeSet<String>) -> Plan {
    let mut plan = Plan::default();
    for &(name, change) in migration.maps {
        match change {
            Carry if new.contains(name) => plan.kept.push(name),
            Carry if old.contains(name) => plan.carry.push(name),
            // A converted map is merged into, so a half-done conversion is just redone.
            Convert(c) if old.contains(name) => plan.convert.push((name, c)),
            Convert(_) if new.contains(name) => plan.kept.push(name),
            Carry | Convert(_) | New => plan.fresh.push(name),
        }
    }
    plan.dropped = old
        .iter()
        .filter(|name| !migration.maps.iter().any(|(n, _)| n == name))
        .cloned()
        .collect();
    plan
}

/// Merges old conntrack entries into the new table (pure: unit-tested).
///
/// An entry missing from the new table is converted; one present there is overwritten only
/// when the old one is newer (the old programs saw a later packet, e.g. the FIN), keeping
/// the new entry's counters. Entries the new programs touched last stay. Running it twice is
/// the same as once.
pub fn merge_conntrack(
    old: &[(CtKey, CtEntryV5)],
    new: &HashMap<CtKey, CtEntry>,
) -> Vec<(CtKey, CtEntry)> {
    old.iter()
        .filter_map(|(key, o)| match new.get(key) {
            None => Some((*key, CtEntry::from(*o))),
            Some(n) if o.last_seen_ns > n.last_seen_ns => Some((
                *key,
                CtEntry {
                    packets: n.packets,
                    bytes: n.bytes,
                    ..CtEntry::from(*o)
                },
            )),
            Some(_) => None,
        })
        .collect()
}

/// What a migration did (logged, and kept by the [`super::Datapath`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// The ABI migrated from.
    pub from: String,
    /// Maps shared with the old programs.
    pub carried: Vec<String>,
    /// Converted maps and the entries written into them (both passes).
    pub converted: Vec<(String, usize)>,
    /// Maps created empty.
    pub fresh: Vec<String>,
    /// Links moved to the new tree and given the new programs.
    pub links: usize,
    /// Wall time from the first pin to the old tree's removal (includes loading and
    /// verifying the new programs).
    pub duration: Duration,
    /// Wall time of the switch itself: first conversion pass, link swaps, second pass. Only
    /// in this window do old and new programs run side by side on different copies of a
    /// converted map.
    pub switch: Duration,
}

/// A migration between [`prepare`] (before the object loads) and [`Pending::finish`].
#[derive(Debug)]
pub(crate) struct Pending {
    migration: Migration,
    old: PinLayoutAt,
    plan: Plan,
    report: MigrationReport,
    started: Instant,
}

/// The old tree's directories.
#[derive(Debug)]
struct PinLayoutAt {
    dir: PathBuf,
}

impl PinLayoutAt {
    fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }
    fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
}

/// Step 1, before the new object loads: finds an old tree, plans, checks that carried maps
/// have the layout the new object expects and pins them at the new paths. `None`: nothing
/// to migrate.
pub(crate) fn prepare(layout: &PinLayout, object: &[u8]) -> Result<Option<Pending>, DatapathError> {
    let Some(migration) = MIGRATIONS
        .iter()
        .find(|m| m.from != MAPS_ABI && layout.root().join(m.from).is_dir())
    else {
        return Ok(None);
    };
    let started = Instant::now();
    let old = PinLayoutAt {
        dir: layout.root().join(migration.from),
    };
    let plan = plan(
        migration,
        &pin_names(&old.dir.join("maps")),
        &pin_names(&layout.maps_dir()),
    );
    tracing::info!(
        from = migration.from,
        to = MAPS_ABI,
        carry = plan.carry.len(),
        convert = plan.convert.len(),
        fresh = plan.fresh.len(),
        kept = plan.kept.len(),
        dropped = ?plan.dropped,
        "migrating the pinned datapath"
    );
    let expected = object_maps(object)?;
    for &name in &plan.carry {
        let old_map = MapData::from_pin(old.map(name)).map_err(map_err(name))?;
        check_layout(name, &old_map, expected.get(name))?;
        old_map.pin(layout.map(name)).map_err(DatapathError::Pin)?;
    }
    let report = MigrationReport {
        from: migration.from.to_owned(),
        carried: plan.carry.iter().map(|s| s.to_string()).collect(),
        fresh: plan.fresh.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Ok(Some(Pending {
        migration: *migration,
        old,
        plan,
        report,
        started,
    }))
}

/// (map type, key size, value size) of every map the object pins by name.
fn object_maps(object: &[u8]) -> Result<BTreeMap<String, (u32, u32, u32)>, DatapathError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DatapathError::Migration {
        map: String::new(),
        reason: format!("parsing the eBPF object: {e}"),
    })?;
    Ok(obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| (name.clone(), (m.map_type(), m.key_size(), m.value_size())))
        .collect())
}

/// Refuses to share a map whose layout differs from what the new programs expect (the
/// table would be wrong: that map needs a converter).
fn check_layout(
    name: &str,
    old: &MapData,
    expected: Option<&(u32, u32, u32)>,
) -> Result<(), DatapathError> {
    let info = old.info().map_err(|source| DatapathError::Migration {
        map: name.to_owned(),
        reason: source.to_string(),
    })?;
    let ty = info
        .map_type()
        .map(|t| t as u32)
        .map_err(|source| DatapathError::Migration {
            map: name.to_owned(),
            reason: source.to_string(),
        })?;
    let have = (ty, info.key_size(), info.value_size());
    match expected {
        Some(&want) if want == have => Ok(()),
        Some(want) => Err(DatapathError::Migration {
            map: name.to_owned(),
            reason: format!(
                "marked carry-over, but the pinned map is (type, key, value) {have:?} and the \
                 new object wants {want:?}: it needs a converter"
            ),
        }),
        None => Err(DatapathError::Migration {
            map: name.to_owned(),
            reason: "marked carry-over, but the new object has no such pinned map".to_owned(),
        }),
    }
}

/// Names of the pins in `dir` (none when it does not exist).
fn pin_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `(iface, program, pin)` of every link pinned under `links`.
fn link_pins(links: &Path) -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    for iface in pin_names(links) {
        for program in pin_names(&links.join(&iface)) {
            let pin = links.join(&iface).join(&program);
            out.push((iface.clone(), program, pin));
        }
    }
    out
}

impl Pending {
    /// Step 2, once the new programs are loaded: converts, moves and swaps every link,
    /// converts again, removes the old tree.
    pub(crate) fn finish(
        mut self,
        datapath: &mut super::Datapath,
    ) -> Result<MigrationReport, DatapathError> {
        let layout = datapath.layout().clone();
        let switch = Instant::now();
        let mut converted: BTreeMap<&'static str, usize> = BTreeMap::new();
        for &(name, converter) in &self.plan.convert {
            *converted.entry(name).or_default() += convert(&self.old, &layout, name, converter)?;
        }
        for (iface, program, old_pin) in link_pins(&self.old.links()) {
            move_link(&layout, &iface, &program, &old_pin)?;
            if datapath.replace_pinned(&iface, &program)?.is_some() {
                self.report.links += 1;
            }
        }
        // Entries the old programs created or advanced between the first copy and the swap.
        for &(name, converter) in &self.plan.convert {
            *converted.entry(name).or_default() += convert(&self.old, &layout, name, converter)?;
        }
        self.report.switch = switch.elapsed();
        remove_tree(&self.old.dir)?;
        self.report.converted = converted
            .into_iter()
            .map(|(n, c)| (n.to_owned(), c))
            .collect();
        self.report.duration = self.started.elapsed();
        tracing::info!(
            from = self.migration.from,
            to = MAPS_ABI,
            carried = self.report.carried.len(),
            converted = ?self.report.converted,
            fresh = ?self.report.fresh,
            links = self.report.links,
            duration_ms = self.report.duration.as_secs_f64() * 1e3,
            switch_ms = self.report.switch.as_secs_f64() * 1e3,
            "migrated the pinned datapath; old pins removed"
        );
        Ok(self.report)
    }
}

/// Runs one converter pass; returns the entries written.
fn convert(
    old: &PinLayoutAt,
    layout: &PinLayout,
    name: &'static str,
    converter: Converter,
) -> Result<usize, DatapathError> {
    let old_map = MapData::from_pin(old.map(name)).map_err(map_err(name))?;
    let new_map = MapData::from_pin(layout.map(name)).map_err(map_err(name))?;
    match converter {
        Converter::ConntrackV5 => {
            let old_entries: Vec<(CtKey, CtEntryV5)> =
                sys::lookup_batch(old_map.fd().as_fd()).map_err(batch_err(name))?;
            let new_entries: HashMap<CtKey, CtEntry> =
                sys::lookup_batch::<CtKey, CtEntry>(new_map.fd().as_fd())
                    .map_err(batch_err(name))?
                    .into_iter()
                    .collect();
            let writes = merge_conntrack(&old_entries, &new_entries);
            sys::update_batch(new_map.fd().as_fd(), &writes).map_err(batch_err(name))?;
            Ok(writes.len())
        }
    }
}

/// Pins the link at `old_pin` at its new path and removes the old pin.
///
/// Both pins present: the same link (an interrupted move) loses its old pin; two different
/// links (a new agent attached its own meanwhile) -> the old one is detached, so only the
/// new program runs on that hook.
fn move_link(
    layout: &PinLayout,
    iface: &str,
    program: &str,
    old_pin: &Path,
) -> Result<(), DatapathError> {
    let new_pin = layout.link(iface, program);
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::Io {
            action,
            path,
            source,
        }
    };
    let link_err = |pin: &Path, e: &dyn std::fmt::Display| DatapathError::LinkPin {
        path: pin.to_owned(),
        reason: e.to_string(),
    };
    let old = FdLink::from(PinnedLink::from_pin(old_pin).map_err(|e| link_err(old_pin, &e))?);
    let old_id = old.info().map_err(|e| link_err(old_pin, &e))?.id();
    if new_pin.exists() {
        let new = FdLink::from(PinnedLink::from_pin(&new_pin).map_err(|e| link_err(&new_pin, &e))?);
        let new_id = new.info().map_err(|e| link_err(&new_pin, &e))?.id();
        if new_id != old_id {
            let fd = sys::obj_get(old_pin).map_err(io_err("opening", old_pin))?;
            sys::link_detach(&fd).map_err(io_err("detaching the link pinned at", old_pin))?;
            tracing::warn!(iface, program, "detached an old link beside a new one");
        }
    } else {
        let dir = layout.links_dir(iface);
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        old.pin(&new_pin).map_err(DatapathError::Pin)?;
    }
    std::fs::remove_file(old_pin).map_err(io_err("removing", old_pin))
}

/// Removes the old tree (its links were moved; its maps are carried, converted or dropped).
fn remove_tree(dir: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            action: "removing",
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn v5_pins() -> BTreeSet<String> {
        V5_TO_V6
            .iter()
            .filter(|(_, c)| *c != New)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    #[test]
    fn fresh_migration_carries_unchanged_converts_conntrack_creates_new() {
        let p = plan(&MIGRATIONS[0], &v5_pins(), &BTreeSet::new());
        assert_eq!(p.convert, vec![(maps::CONNTRACK, Converter::ConntrackV5)]);
        assert_eq!(p.carry.len(), 20);
        assert!(p.carry.contains(&maps::ENDPOINTS));
        assert!(!p.carry.contains(&maps::CONNTRACK));
        assert_eq!(
            p.fresh,
            vec![
                maps::ENDPOINT_STATS,
                maps::FLOW_EVENTS,
                maps::FLOWLOG_LOST,
                maps::TRACE_EVENTS,
                maps::CT_BUDGET
            ]
        );
        assert!(p.kept.is_empty() && p.dropped.is_empty());
    }

    #[test]
    fn interrupted_migration_keeps_what_is_pinned_and_redoes_the_conversion() {
        // Killed after carrying two maps and loading (CONNTRACK exists at v6).
        let new = set(&[maps::ENDPOINTS, maps::FILTER, maps::CONNTRACK]);
        let p = plan(&MIGRATIONS[0], &v5_pins(), &new);
        assert_eq!(p.kept, vec![maps::FILTER, maps::ENDPOINTS]);
        assert_eq!(p.carry.len(), 18);
        assert_eq!(p.convert, vec![(maps::CONNTRACK, Converter::ConntrackV5)]);
    }

    #[test]
    fn maps_missing_from_the_old_tree_start_empty_and_unknown_old_maps_are_dropped() {
        let old = set(&[maps::ENDPOINTS, "RETIRED_MAP"]);
        let p = plan(&MIGRATIONS[0], &old, &BTreeSet::new());
        assert_eq!(p.carry, vec![maps::ENDPOINTS]);
        assert!(p.convert.is_empty());
        assert!(p.fresh.contains(&maps::CONNTRACK));
        assert!(p.fresh.contains(&maps::FILTER));
        assert_eq!(p.dropped, vec!["RETIRED_MAP".to_owned()]);
    }

    #[test]
    fn conversion_after_the_old_tree_lost_conntrack_keeps_the_new_one() {
        let p = plan(&MIGRATIONS[0], &set(&[]), &set(&[maps::CONNTRACK]));
        assert_eq!(p.kept, vec![maps::CONNTRACK]);
        assert!(p.convert.is_empty());
    }

    #[test]
    fn every_pinned_map_of_the_object_is_in_the_table_and_names_are_unique() {
        let object = object_maps(super::super::object::DATAPLANE_OBJECT).unwrap();
        for m in MIGRATIONS {
            for name in object.keys() {
                assert!(
                    m.maps.iter().any(|(n, _)| n == name),
                    "map {name} of the object is missing from the {} migration table",
                    m.from
                );
            }
            let names: BTreeSet<_> = m.maps.iter().map(|(n, _)| *n).collect();
            assert_eq!(names.len(), m.maps.len(), "duplicate map in the table");
            assert_ne!(m.from, MAPS_ABI);
        }
    }

    #[test]
    fn converted_conntrack_matches_the_object_layout() {
        let object = object_maps(super::super::object::DATAPLANE_OBJECT).unwrap();
        let (_, key, value) = object[maps::CONNTRACK];
        assert_eq!(
            (key as usize, value as usize),
            (size_of::<CtKey>(), size_of::<CtEntry>())
        );
    }

    fn key(port: u16) -> CtKey {
        CtKey {
            lo_port: port,
            ..Default::default()
        }
    }

    #[test]
    fn conntrack_merge_converts_missing_and_newer_entries_only() {
        let old = vec![
            (
                key(1),
                CtEntryV5 {
                    last_seen_ns: 100,
                    state: 2,
                    flags: 1,
                },
            ),
            (
                key(2),
                CtEntryV5 {
                    last_seen_ns: 300,
                    state: 3,
                    flags: 0,
                },
            ),
            (
                key(3),
                CtEntryV5 {
                    last_seen_ns: 100,
                    state: 1,
                    flags: 0,
                },
            ),
        ];
        let mut new = HashMap::new();
        // Newer in the old table (the old programs saw a FIN after the first copy).
        new.insert(
            key(2),
            CtEntry {
                last_seen_ns: 200,
                state: 2,
                flags: 0,
                packets: 7,
                bytes: 700,
            },
        );
        // Touched by the new programs last: stays.
        new.insert(
            key(3),
            CtEntry {
                last_seen_ns: 500,
                state: 2,
                flags: 0,
                packets: 1,
                bytes: 60,
            },
        );
        let mut out = merge_conntrack(&old, &new);
        out.sort_by_key(|(k, _)| *k);
        assert_eq!(
            out,
            vec![
                (
                    key(1),
                    CtEntry {
                        last_seen_ns: 100,
                        state: 2,
                        flags: 1,
                        packets: 0,
                        bytes: 0
                    }
                ),
                (
                    key(2),
                    CtEntry {
                        last_seen_ns: 300,
                        state: 3,
                        flags: 0,
                        packets: 7,
                        bytes: 700
                    }
                ),
            ]
        );
        // Idempotent: merging the result in again writes nothing.
        for (k, v) in out {
            new.insert(k, v);
        }
        assert!(merge_conntrack(&old, &new).is_empty());
    }
}
