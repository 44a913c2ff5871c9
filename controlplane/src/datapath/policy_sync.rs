//! Installing compiled policy into the pinned maps under ids, without a packet ever seeing a
//! half-applied rule set.
//!
//! A rule set's content gets an id; changed content gets a *new* id written beside the old
//! one, the endpoints are then switched to it (one `ENDPOINTS` update each, by the overlay
//! reconciler), and the old id is removed on a later pass, once no endpoint refers to it.
//! Identical content keeps its id, so re-applying the same state writes nothing.
//!
//! Level-triggered: [`PolicySync::resync`] reads what the kernel holds back into the
//! installed set, so a restarted agent adopts the ids a previous one installed (content
//! equal: kept; unreadable or unused: retired).

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::policy::MAX_POLICY_ID;

use super::{
    DatapathError, PolicyMaps,
    policy_maps::{AclEntries, SgEntries},
};
use crate::policy::{
    compile::{CompiledPolicy, SgSetKey},
    tables::{AclTables, SgTables},
};

/// The ids the compiled policy got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Security-group policy id of each set of groups.
    pub sg: BTreeMap<SgSetKey, u32>,
    /// ACL id of each network ACL.
    pub acl: BTreeMap<String, u32>,
}

/// Why a policy cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum PolicySyncError {
    /// Writing or reading the maps failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// Every id is taken.
    #[error("no free {0} id: {max} are installed", max = MAX_POLICY_ID)]
    IdsExhausted(&'static str),
}

/// One kind of installed rule set (security-group policies or ACLs).
#[derive(Debug)]
struct Installed<T> {
    /// Installed content by id.
    by_id: BTreeMap<u32, T>,
    /// Ids no longer wanted, with the pass that retired them.
    retiring: BTreeMap<u32, u64>,
}

impl<T: PartialEq + Clone> Installed<T> {
    fn new() -> Self {
        Installed {
            by_id: BTreeMap::new(),
            retiring: BTreeMap::new(),
        }
    }

    /// The id of `content`, reusing an installed one; `Err(id)` is a fresh id to install.
    fn id_for(
        &mut self,
        content: &T,
        kind: &'static str,
    ) -> Result<Result<u32, u32>, PolicySyncError> {
        if let Some((&id, _)) = self.by_id.iter().find(|(_, t)| *t == content) {
            self.retiring.remove(&id);
            return Ok(Ok(id));
        }
        (1..=MAX_POLICY_ID)
            .find(|id| !self.by_id.contains_key(id))
            .map(Err)
            .ok_or(PolicySyncError::IdsExhausted(kind))
    }

    fn retire_unused(&mut self, used: &BTreeSet<u32>, pass: u64) {
        for id in self.by_id.keys() {
            if !used.contains(id) {
                self.retiring.entry(*id).or_insert(pass);
            }
        }
    }

    /// Retired before `pass` and not referenced: safe to remove now.
    fn collectable(&self, pass: u64, in_use: &BTreeSet<u32>) -> Vec<u32> {
        self.retiring
            .iter()
            .filter(|(id, at)| **at < pass && !in_use.contains(*id))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// The agent's view of the installed policy ids.
#[derive(Debug)]
pub struct PolicySync {
    sg: Installed<SgTables>,
    acl: Installed<AclTables>,
    /// Entries read back that no compiled table stands for (removed as retiring ids).
    stray_sg: BTreeMap<u32, SgEntries>,
    stray_acl: BTreeMap<u32, AclEntries>,
    pass: u64,
}

impl Default for PolicySync {
    fn default() -> Self {
        Self::new()
    }
}

impl PolicySync {
    /// Nothing known installed (call [`PolicySync::resync`] to adopt the kernel's state).
    pub fn new() -> Self {
        PolicySync {
            sg: Installed::new(),
            acl: Installed::new(),
            stray_sg: BTreeMap::new(),
            stray_acl: BTreeMap::new(),
            pass: 0,
        }
    }

    /// Replaces the known installed state with what the maps hold.
    pub fn resync(&mut self, maps: &PolicyMaps) -> Result<(), PolicySyncError> {
        let mut sg = Installed::new();
        self.stray_sg.clear();
        for (id, e) in maps.read_sg()? {
            match SgTables::from_entries(id, &e.addr, &e.ports) {
                Some(t) if id != 0 => {
                    sg.by_id.insert(id, t);
                }
                _ => {
                    self.stray_sg.insert(id, e);
                }
            }
        }
        // Keep retirement ages of ids still there.
        sg.retiring = std::mem::take(&mut self.sg.retiring);
        sg.retiring.retain(|id, _| sg.by_id.contains_key(id));
        self.sg = sg;
        let mut acl = Installed::new();
        self.stray_acl.clear();
        for (id, e) in maps.read_acl()? {
            match AclTables::from_entries(id, &e.addr, &e.ports) {
                Some(t) if id != 0 => {
                    acl.by_id.insert(id, t);
                }
                _ => {
                    self.stray_acl.insert(id, e);
                }
            }
        }
        acl.retiring = std::mem::take(&mut self.acl.retiring);
        acl.retiring.retain(|id, _| acl.by_id.contains_key(id));
        self.acl = acl;
        Ok(())
    }

    /// Installs what `compiled` needs (new ids beside the installed ones); returns the ids
    /// and the number of rule sets written. Ids no longer needed start retiring.
    pub fn install(
        &mut self,
        maps: &mut PolicyMaps,
        compiled: &CompiledPolicy,
    ) -> Result<(Assignment, usize), PolicySyncError> {
        self.pass += 1;
        let mut out = Assignment::default();
        let mut written = 0;
        for (key, tables) in &compiled.sg_sets {
            let id = match self.sg.id_for(tables, "security-group policy")? {
                Ok(id) => id,
                Err(id) => {
                    let (addr, ports) = tables.entries(id);
                    maps.install_sg(&SgEntries { addr, ports })?;
                    self.sg.by_id.insert(id, tables.clone());
                    written += 1;
                    id
                }
            };
            out.sg.insert(key.clone(), id);
        }
        for (name, tables) in &compiled.acls {
            let id = match self.acl.id_for(tables, "network ACL")? {
                Ok(id) => id,
                Err(id) => {
                    let (addr, ports) = tables.entries(id);
                    maps.install_acl(&AclEntries { addr, ports })?;
                    self.acl.by_id.insert(id, tables.clone());
                    written += 1;
                    id
                }
            };
            out.acl.insert(name.clone(), id);
        }
        let used_sg: BTreeSet<u32> = out.sg.values().copied().collect();
        let used_acl: BTreeSet<u32> = out.acl.values().copied().collect();
        self.sg.retire_unused(&used_sg, self.pass);
        self.acl.retire_unused(&used_acl, self.pass);
        Ok((out, written))
    }

    /// Removes rule sets retired by an earlier pass that no endpoint refers to any more
    /// (`in_use_*`: the ids the kernel's `ENDPOINTS` hold now), and stray entries. Returns
    /// the number of rule sets removed.
    pub fn collect(
        &mut self,
        maps: &mut PolicyMaps,
        in_use_sg: &BTreeSet<u32>,
        in_use_acl: &BTreeSet<u32>,
    ) -> Result<usize, PolicySyncError> {
        let mut removed = 0;
        for id in self.sg.collectable(self.pass, in_use_sg) {
            if let Some(t) = self.sg.by_id.remove(&id) {
                let (addr, ports) = t.entries(id);
                maps.remove_sg(&SgEntries { addr, ports })?;
                removed += 1;
            }
            self.sg.retiring.remove(&id);
        }
        for id in self.acl.collectable(self.pass, in_use_acl) {
            if let Some(t) = self.acl.by_id.remove(&id) {
                let (addr, ports) = t.entries(id);
                maps.remove_acl(&AclEntries { addr, ports })?;
                removed += 1;
            }
            self.acl.retiring.remove(&id);
        }
        for (id, e) in std::mem::take(&mut self.stray_sg) {
            if in_use_sg.contains(&id) {
                self.stray_sg.insert(id, e);
            } else {
                maps.remove_sg(&e)?;
                removed += 1;
            }
        }
        for (id, e) in std::mem::take(&mut self.stray_acl) {
            if in_use_acl.contains(&id) {
                self.stray_acl.insert(id, e);
            } else {
                maps.remove_acl(&e)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether security-group policy `id` is installed (current or retiring).
    pub fn is_sg_installed(&self, id: u32) -> bool {
        self.sg.by_id.contains_key(&id)
    }

    /// Installed security-group policies and ACLs (for logs).
    pub fn counts(&self) -> (usize, usize) {
        (self.sg.by_id.len(), self.acl.by_id.len())
    }
}
