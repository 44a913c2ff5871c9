//! An in-memory store: the reference semantics of [`Store`] for unit tests (nothing is
//! durable).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio_stream::{StreamExt as _, wrappers::BroadcastStream};

use crate::{
    Compare, Event, KeyValue, Op, Page, Store, StoreError, TxnOutcome, WatchBatch, WatchStream,
};

/// Batches a lagging watcher may fall behind by before its watch ends.
const WATCH_BUFFER: usize = 4096;

#[derive(Debug, Default)]
struct Inner {
    revision: i64,
    kvs: BTreeMap<String, KeyValue>,
    history: Vec<WatchBatch>,
}

/// The in-memory store (clones share the same data).
#[derive(Clone, Debug)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<WatchBatch>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            inner: Arc::default(),
            tx: broadcast::channel(WATCH_BUFFER).0,
        }
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `compare` holds in `kvs`.
pub(crate) fn holds(kvs: &BTreeMap<String, KeyValue>, compare: &Compare) -> bool {
    match compare {
        Compare::Absent(k) => !kvs.contains_key(k),
        Compare::ModRevision(k, rev) => kvs.get(k).is_some_and(|kv| kv.mod_revision == *rev),
    }
}

/// Filters a batch to the keys under `prefix` (None when nothing is left).
pub fn filter_batch(batch: &WatchBatch, prefix: &str) -> Option<WatchBatch> {
    let events: Vec<Event> = batch
        .events
        .iter()
        .filter(|e| e.key().starts_with(prefix))
        .cloned()
        .collect();
    (!events.is_empty()).then_some(WatchBatch {
        revision: batch.revision,
        events,
    })
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        use std::ops::Bound;
        let inner = self.lock();
        let lower = match start_after {
            Some(k) if k >= prefix => Bound::Excluded(k.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        let mut kvs = Vec::new();
        let mut more = false;
        for (k, kv) in inner.kvs.range((lower, Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if limit != 0 && kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(kv.clone());
        }
        Ok(Page {
            kvs,
            more,
            revision: inner.revision,
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let mut inner = self.lock();
        if !compares.iter().all(|c| holds(&inner.kvs, c)) {
            return Ok(TxnOutcome::Conflict(inner.revision));
        }
        if ops.is_empty() {
            return Ok(TxnOutcome::Committed(inner.revision));
        }
        let revision = inner.revision + 1;
        inner.revision = revision;
        let mut events = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put(key, value) => {
                    let create_revision = inner
                        .kvs
                        .get(&key)
                        .map_or(revision, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                    };
                    inner.kvs.insert(key, kv.clone());
                    events.push(Event::Put(kv));
                }
                Op::Delete(key) => {
                    if inner.kvs.remove(&key).is_some() {
                        events.push(Event::Delete { key, revision });
                    }
                }
            }
        }
        let batch = WatchBatch { revision, events };
        inner.history.push(batch.clone());
        // No receiver is fine.
        let _ = self.tx.send(batch);
        Ok(TxnOutcome::Committed(revision))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.lock().revision)
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchStream, StoreError> {
        let inner = self.lock();
        // Subscribe under the lock so no batch falls between the replay and the live part.
        let rx = self.tx.subscribe();
        let replay: Vec<Result<WatchBatch, StoreError>> = inner
            .history
            .iter()
            .filter(|b| b.revision >= from)
            .filter_map(|b| filter_batch(b, prefix))
            .map(Ok)
            .collect();
        drop(inner);
        let prefix = prefix.to_owned();
        let live = BroadcastStream::new(rx).filter_map(move |r| match r {
            Ok(b) if b.revision < from => None,
            Ok(b) => filter_batch(&b, &prefix).map(Ok),
            Err(e) => Some(Err(StoreError::Unavailable(format!("watch lagged: {e}")))),
        });
        Ok(Box::pin(tokio_stream::iter(replay).chain(live)))
    }
}
