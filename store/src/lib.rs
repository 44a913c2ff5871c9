//! The control plane's store: a key-value space with a global revision, multi-key
//! transactions guarded by compares, and a watch from a revision (etcd's v3 model, so an etcd
//! cluster can back several control-plane replicas).
//!
//! Keys are UTF-8 paths (`/a/<account>/vpc/<id>`); values are opaque bytes (the control plane
//! stores JSON). Every successful write transaction advances the store's revision by exactly
//! one; each key remembers the revision that created it and the one that last modified it.
//! A transaction is acknowledged only once it is durable: a crash right after `txn` returns
//! loses nothing.
//!
//! Backends: [`MemStore`] (tests), [`RedbStore`] (embedded, the default) and [`EtcdStore`]
//! (several control-plane replicas sharing one etcd). With the `testing` feature,
//! [`conformance`] holds the checks every backend passes.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod etcd_store;
pub mod mem;
pub mod redb_store;

pub use etcd_store::{EtcdOptions, EtcdStore};
pub use mem::MemStore;
pub use redb_store::{RedbOptions, RedbStore};

use std::pin::Pin;

use async_trait::async_trait;

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (since its last deletion).
    pub create_revision: i64,
    /// Revision of the transaction that last wrote it.
    pub mod_revision: i64,
}

/// A condition a transaction checks before applying its operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last written at exactly this revision.
    ModRevision(String, i64),
}

/// A write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or overwrite.
    Put(String, Vec<u8>),
    /// Delete (a missing key is not an error).
    Delete(String),
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held; the operations were applied (durably) at this revision.
    Committed(i64),
    /// A compare failed; nothing was written. The store's revision at that moment.
    Conflict(i64),
}

/// A page of a range read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Keys in ascending byte order.
    pub kvs: Vec<KeyValue>,
    /// More keys match after the last one returned.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: i64,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key was written (its new value and revisions).
    Put(KeyValue),
    /// A key was deleted at `revision`.
    Delete {
        /// Key.
        key: String,
        /// Revision of the deleting transaction.
        revision: i64,
    },
}

impl Event {
    /// The revision of the transaction that made this change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key changed.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// The events of one transaction, in operation order (a transaction is never split across
/// batches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// Revision of the transaction.
    pub revision: i64,
    /// Its changes under the watched prefix.
    pub events: Vec<Event>,
}

/// A stream of batches in revision order; ends with an error if the watch is lost (the
/// watcher then re-reads and watches again).
pub type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The watch asked for a revision older than the backend still keeps.
    #[error("revision {requested} has been compacted (oldest kept: {oldest})")]
    Compacted {
        /// Requested start revision.
        requested: i64,
        /// Oldest revision a watch can start from.
        oldest: i64,
    },
    /// The backend cannot be reached (etcd down, ...): the call may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend failed (I/O, corruption, protocol).
    #[error("store failure: {0}")]
    Backend(String),
}

/// The store.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Keys starting with `prefix`, in ascending order, strictly after `start_after` if given,
    /// at most `limit` (0: no limit).
    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError>;

    /// Applies `ops` atomically if every compare holds; durable before it returns
    /// `Committed`.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError>;

    /// The current revision (0 for an empty, never written store).
    async fn revision(&self) -> Result<i64, StoreError>;

    /// Changes under `prefix` from revision `from` (inclusive) on: first every kept batch
    /// with revision >= `from`, then live ones. `from` = current revision + 1 sees only
    /// future changes.
    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchStream, StoreError>;
}
