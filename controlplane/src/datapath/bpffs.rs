//! bpffs mounting and the layout of the pin tree.
//!
//! ```text
//! <root>/                       e.g. /sys/fs/bpf/vpc
//!   v6/                         MAPS_ABI: bumped when any map layout changes
//!     maps/<MAP>                every map, pinned by name (reused on restart)
//!     links/<iface>/<program>   one bpf_link per attachment (keeps it attached while no
//!                               agent runs; replaced atomically by the next agent)
//!   v5/                         the previous ABI's tree, present only until an agent of
//!                               this one migrated it (`super::migrate`)
//! ```

use std::path::{Path, PathBuf};

use dataplane_common::maps::MAPS_ABI;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::DatapathError;

/// Where bpffs is conventionally mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Paths of the pin tree under one root.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout rooted at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of this ABI version.
    pub fn abi_dir(&self) -> PathBuf {
        self.root.join(MAPS_ABI)
    }

    /// Directory holding the pinned maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.abi_dir().join("maps")
    }

    /// Pin path of one map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Directory holding the link pins of one interface.
    pub fn links_dir(&self, iface: &str) -> PathBuf {
        self.abi_dir().join("links").join(iface)
    }

    /// Pin path of the link of `program` on `iface`.
    pub fn link(&self, iface: &str, program: &str) -> PathBuf {
        self.links_dir(iface).join(program)
    }

    /// Creates the directories, mounting bpffs at [`BPFFS_MOUNT`] first when the root lies
    /// under it and nothing is mounted there yet. Fails when the root is not on bpffs.
    pub fn prepare(&self) -> Result<(), DatapathError> {
        if self.root.starts_with(BPFFS_MOUNT) && !is_bpffs(Path::new(BPFFS_MOUNT)) {
            mount_bpffs(Path::new(BPFFS_MOUNT))?;
        }
        for dir in [self.maps_dir(), self.abi_dir().join("links")] {
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
                action: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        if !is_bpffs(&self.root) {
            return Err(DatapathError::NotBpffs {
                path: self.root.clone(),
            });
        }
        Ok(())
    }

    /// Removes the whole pin tree: every link is detached from its hook first (synchronously,
    /// so no packet meets the programs once this returns), then all pins are removed.
    pub fn remove_all(&self) -> Result<(), DatapathError> {
        let links = self.abi_dir().join("links");
        // Links of any ABI tree under the root (an older one not migrated yet) included.
        let mut trees: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .map(|d| d.flatten().map(|e| e.path().join("links")).collect())
            .unwrap_or_default();
        trees.sort();
        for tree in &trees {
            for pin in pinned_links(tree) {
                self.remove_link(&pin)?;
            }
        }
        for dir in [links, self.root.clone()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DatapathError::Io {
                        action: "removing",
                        path: dir,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

impl PinLayout {
    /// Detaches the link pinned at `pin` from its hook (synchronously) and removes the pin.
    /// No pin: nothing to do.
    pub fn remove_link(&self, pin: &Path) -> Result<(), DatapathError> {
        let fd = match super::sys::obj_get(pin) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(DatapathError::Io {
                    action: "opening the link pinned at",
                    path: pin.to_owned(),
                    source,
                });
            }
        };
        super::sys::link_detach(&fd).map_err(|source| DatapathError::Io {
            action: "detaching the link pinned at",
            path: pin.to_owned(),
            source,
        })?;
        std::fs::remove_file(pin).map_err(|source| DatapathError::Io {
            action: "removing",
            path: pin.to_owned(),
            source,
        })
    }
}

/// Files under `links/<iface>/` (one per attachment).
fn pinned_links(links: &Path) -> Vec<PathBuf> {
    let Ok(ifaces) = std::fs::read_dir(links) else {
        return Vec::new();
    };
    ifaces
        .flatten()
        .filter_map(|iface| std::fs::read_dir(iface.path()).ok())
        .flat_map(|pins| pins.flatten().map(|p| p.path()))
        .collect()
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts a bpffs instance at `path`.
pub fn mount_bpffs(path: &Path) -> Result<(), DatapathError> {
    std::fs::create_dir_all(path).map_err(|source| DatapathError::Io {
        action: "creating",
        path: path.to_owned(),
        source,
    })?;
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| DatapathError::Mount {
        path: path.to_owned(),
        source,
    })?;
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}
