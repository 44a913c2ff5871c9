use std::{io, path::PathBuf};

use aya::{EbpfError, maps::MapError, pin::PinError, programs::ProgramError};

/// Errors of the datapath layer.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The pin directory is not on a bpffs mount.
    #[error(
        "{path} is not on a bpf filesystem; mount one there (`mount -t bpf bpf DIR`) or pick a \
         pin directory under /sys/fs/bpf"
    )]
    NotBpffs {
        /// The offending directory.
        path: PathBuf,
    },
    /// A filesystem operation on the pin tree failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// Mounting bpffs failed.
    #[error("mounting bpffs at {path}: {source}")]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// Why it failed.
        source: nix::Error,
    },
    /// The kernel refused the object (map creation, relocation, ...).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    /// The object lacks a program the loader expects (object and loader out of sync).
    #[error("program `{0}` is missing from the eBPF object")]
    MissingProgram(&'static str),
    /// A program operation (verification, attach, link update) failed.
    #[error("program `{program}`: {source}")]
    Program {
        /// Program name.
        program: &'static str,
        /// Why it failed.
        source: ProgramError,
    },
    /// Attaching to an interface failed.
    #[error("attaching `{program}` to {iface}: {source}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name.
        iface: String,
        /// Why it failed.
        source: ProgramError,
    },
    /// The interface does not exist in this network namespace.
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    /// Pinning or opening a pinned link failed.
    #[error("link pin {path}: {reason}")]
    LinkPin {
        /// Pin path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Pinning an object failed.
    #[error("pinning: {0}")]
    Pin(#[from] PinError),
    /// A map operation failed.
    #[error("map `{map}`: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Why it failed.
        source: MapError,
    },
    /// Migrating the pins of an older maps ABI failed (`migrate`).
    #[error("migrating map `{map}`: {reason}")]
    Migration {
        /// Map name (empty when not about one map).
        map: String,
        /// What went wrong.
        reason: String,
    },
}
