//! The embedded backend, on [redb](https://www.redb.org): one file, crash-safe, the default
//! for a single control-plane replica.
//!
//! Tables:
//! - `kv`: key -> `create_revision` (i64 LE), `mod_revision` (i64 LE), value bytes;
//! - `meta`: the store's revision and the newest revision dropped from the history;
//! - `history`: revision -> the batch of events of that transaction, for the last
//!   [`RedbOptions::history`] revisions (a watch from an older revision gets
//!   [`StoreError::Compacted`]).
//!
//! Writes go through one writer thread that does group commit: transactions queued while a
//! commit is in flight are applied in arrival order in the next redb write transaction, each
//! with its compares evaluated against the state its predecessors left and its own revision,
//! and share that transaction's fsync (`Durability::Immediate`). No caller hears `Committed`
//! before its fsync has returned, so an acknowledged write survives a crash (kill -9, power
//! loss on honest disks). Reads run on tokio's blocking pool on a redb snapshot.
//!
//! Architecture invariant: batches are published to watchers only by the writer thread,
//! after their commit, under the `state` lock and in revision order; a watch subscribes under
//! the same lock, so replay (history up to the published revision) and live part neither
//! overlap nor leave a gap.

use std::{
    ops::Bound,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, mpsc},
    thread,
};

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase as _, ReadableTable, Table, TableDefinition};
use tokio::sync::{broadcast, oneshot};
use tokio_stream::{StreamExt as _, wrappers::BroadcastStream};

use crate::{
    Compare, Event, KeyValue, Op, Page, Store, StoreError, TxnOutcome, WatchBatch, WatchStream,
    mem::filter_batch,
};

/// key -> encoded [`KeyValue`] without its key (see [`encode_kv`]).
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// [`META_REVISION`] and [`META_COMPACTED`].
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// revision -> encoded batch of that transaction's events (see [`encode_batch`]).
const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
/// The revision of the newest committed transaction.
const META_REVISION: &str = "revision";
/// The newest revision removed from `history` (0: none).
const META_COMPACTED: &str = "compacted";

/// Batches a lagging watcher may fall behind by before its watch ends (as in `MemStore`).
const WATCH_BUFFER: usize = 4096;
/// Most transactions one group commit applies: bounds the latency a large group adds to the
/// transactions queued behind it.
const MAX_GROUP: usize = 256;

/// Tuning of a [`RedbStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedbOptions {
    /// Revisions of history kept for watches (at least 1): a watch can start from any of the
    /// last `history` revisions.
    pub history: u64,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions { history: 10_000 }
    }
}

/// A transaction waiting for the writer thread.
struct TxnRequest {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

/// What the writer has published to watchers.
#[derive(Debug)]
struct State {
    /// Revision of the newest batch published (= committed and visible to `revision()`).
    revision: i64,
}

/// Shared by the handles and the writer thread.
#[derive(Debug)]
struct Shared {
    db: Database,
    path: PathBuf,
    history: i64,
    state: Mutex<State>,
    tx: broadcast::Sender<WatchBatch>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Owns the writer thread: dropping the last [`RedbStore`] clone closes the queue and waits
/// for the writer to finish the group it is committing, so the file is closed when drop
/// returns (and can be opened again) unless a canceled read is still running on the
/// blocking pool.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<TxnRequest>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.shared.path.display(), "store writer thread panicked");
        }
    }
}

/// The redb-backed store (clones share the same database and writer).
#[derive(Clone, Debug)]
pub struct RedbStore {
    inner: Arc<Handle>,
}

impl RedbStore {
    /// Opens (creating it if needed) the database at `path`, with default options. After a
    /// crash, redb recovers the last committed transaction (repair may take a while on a
    /// large file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, RedbOptions::default())
    }

    /// As [`RedbStore::open`], with `options`.
    pub fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let db = Database::create(&path)
            .map_err(|e| StoreError::Backend(format!("opening redb at {}: {e}", path.display())))?;
        let revision = init(&db).map_err(backend)?;
        let shared = Arc::new(Shared {
            db,
            path,
            history: i64::try_from(options.history.max(1)).unwrap_or(i64::MAX),
            state: Mutex::new(State { revision }),
            tx: broadcast::channel(WATCH_BUFFER).0,
        });
        let (requests, queue) = mpsc::channel();
        let writer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("vpc-store-writer".into())
                .spawn(move || writer_loop(&shared, &queue))
                .map_err(|e| StoreError::Backend(format!("spawning the writer thread: {e}")))?
        };
        Ok(RedbStore {
            inner: Arc::new(Handle {
                shared,
                requests: Some(requests),
                writer: Some(writer),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    /// Runs `f` (reads from a snapshot) on tokio's blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, redb::Error> + Send + 'static,
    {
        let shared = Arc::clone(&self.inner.shared);
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Backend(format!("store read task: {e}")))?
            .map_err(backend)
    }
}

/// Creates the tables of a new database; returns the committed revision.
fn init(db: &Database) -> Result<i64, redb::Error> {
    let wtx = db.begin_write()?;
    let revision = {
        wtx.open_table(KV)?;
        wtx.open_table(HISTORY)?;
        let meta = wtx.open_table(META)?;
        meta_get(&meta, META_REVISION)?
    };
    wtx.commit()?;
    Ok(revision)
}

fn meta_get(meta: &impl ReadableTable<&'static str, i64>, key: &str) -> Result<i64, redb::Error> {
    Ok(meta.get(key)?.map_or(0, |g| g.value()))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("redb: {e}"))
}

/// Encodes a stored key's revisions and value.
fn encode_kv(create_revision: i64, mod_revision: i64, value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + value.len());
    buf.extend_from_slice(&create_revision.to_le_bytes());
    buf.extend_from_slice(&mod_revision.to_le_bytes());
    buf.extend_from_slice(value);
    buf
}

fn decode_kv(key: &str, buf: &[u8]) -> Result<KeyValue, redb::Error> {
    let mut r = Reader::new(buf);
    let create_revision = r.i64()?;
    let mod_revision = r.i64()?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: r.rest().to_vec(),
        create_revision,
        mod_revision,
    })
}

/// Tags of events in an encoded batch.
const TAG_PUT: u8 = 0;
const TAG_DELETE: u8 = 1;

/// Encodes the events of the transaction at one revision: per event a tag, the key (u32 LE
/// length, bytes) and, for a put, its create revision (i64 LE) and value (u32 LE length,
/// bytes). The mod revision of every put and the revision of every delete is the batch's.
fn encode_batch(events: &[Event]) -> Result<Vec<u8>, redb::Error> {
    fn bytes(buf: &mut Vec<u8>, b: &[u8]) -> Result<(), redb::Error> {
        let len = u32::try_from(b.len()).map_err(|_| redb::Error::ValueTooLarge(b.len()))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(b);
        Ok(())
    }
    let mut buf = Vec::new();
    for e in events {
        match e {
            Event::Put(kv) => {
                buf.push(TAG_PUT);
                bytes(&mut buf, kv.key.as_bytes())?;
                buf.extend_from_slice(&kv.create_revision.to_le_bytes());
                bytes(&mut buf, &kv.value)?;
            }
            Event::Delete { key, .. } => {
                buf.push(TAG_DELETE);
                bytes(&mut buf, key.as_bytes())?;
            }
        }
    }
    Ok(buf)
}

fn decode_batch(revision: i64, buf: &[u8]) -> Result<WatchBatch, redb::Error> {
    let mut r = Reader::new(buf);
    let mut events = Vec::new();
    while !r.is_empty() {
        let tag = r.u8()?;
        let key = String::from_utf8(r.bytes()?.to_vec())
            .map_err(|_| corrupt(format!("history {revision}: key is not UTF-8")))?;
        events.push(match tag {
            TAG_PUT => {
                let create_revision = r.i64()?;
                Event::Put(KeyValue {
                    key,
                    value: r.bytes()?.to_vec(),
                    create_revision,
                    mod_revision: revision,
                })
            }
            TAG_DELETE => Event::Delete { key, revision },
            t => return Err(corrupt(format!("history {revision}: event tag {t}"))),
        });
    }
    Ok(WatchBatch { revision, events })
}

fn corrupt(what: String) -> redb::Error {
    redb::Error::Corrupted(format!("vpc-store record: {what}"))
}

/// A cursor over an encoded record; every read checks the length.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], redb::Error> {
        if self.buf.len() < n {
            return Err(corrupt(format!(
                "truncated ({n} bytes wanted, {} left)",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, redb::Error> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, redb::Error> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(b))
    }

    fn bytes(&mut self) -> Result<&'a [u8], redb::Error> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        let len = usize::try_from(u32::from_le_bytes(b))
            .map_err(|_| corrupt("length does not fit usize".into()))?;
        self.take(len)
    }

    fn rest(self) -> &'a [u8] {
        self.buf
    }
}

/// The writer thread: takes every queued transaction (up to [`MAX_GROUP`]), commits them
/// in one redb write transaction, publishes their batches, then answers. Ends when every
/// sender is gone.
fn writer_loop(shared: &Shared, queue: &mpsc::Receiver<TxnRequest>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(group.len());
        let mut txns = Vec::with_capacity(group.len());
        for r in group {
            replies.push(r.reply);
            txns.push((r.compares, r.ops));
        }
        match commit_group(shared, txns) {
            Ok(committed) => {
                if let Some((revision, batches)) = committed.published {
                    let mut state = shared.lock();
                    state.revision = revision;
                    for b in batches {
                        // No receiver is fine.
                        let _ = shared.tx.send(b);
                    }
                }
                for (reply, outcome) in replies.into_iter().zip(committed.outcomes) {
                    // The caller may have gone away; its transaction stands.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(path = %shared.path.display(), error = %e, "store commit failed");
                for reply in replies {
                    let _ = reply.send(Err(backend(&e)));
                }
            }
        }
    }
}

/// The result of one group commit.
struct Committed {
    /// One outcome per transaction, in order.
    outcomes: Vec<TxnOutcome>,
    /// The new revision and the batches to publish (None when nothing was written).
    published: Option<(i64, Vec<WatchBatch>)>,
}

/// Applies `txns` in order in one durable redb transaction (nothing of the group is applied
/// if any step fails).
fn commit_group(
    shared: &Shared,
    txns: Vec<(Vec<Compare>, Vec<Op>)>,
) -> Result<Committed, redb::Error> {
    let mut wtx = shared.db.begin_write()?;
    wtx.set_durability(Durability::Immediate)?;
    let mut outcomes = Vec::with_capacity(txns.len());
    let mut batches = Vec::new();
    let revision = {
        let mut kv = wtx.open_table(KV)?;
        let mut history = wtx.open_table(HISTORY)?;
        let mut meta = wtx.open_table(META)?;
        let mut revision = meta_get(&meta, META_REVISION)?;
        for (compares, ops) in txns {
            if !all_hold(&kv, &compares)? {
                outcomes.push(TxnOutcome::Conflict(revision));
                continue;
            }
            if ops.is_empty() {
                outcomes.push(TxnOutcome::Committed(revision));
                continue;
            }
            revision += 1;
            let events = apply(&mut kv, ops, revision)?;
            history.insert(revision, encode_batch(&events)?.as_slice())?;
            batches.push(WatchBatch { revision, events });
            outcomes.push(TxnOutcome::Committed(revision));
        }
        if !batches.is_empty() {
            meta.insert(META_REVISION, revision)?;
            compact(&mut history, &mut meta, revision - shared.history)?;
        }
        revision
    };
    if batches.is_empty() {
        // Conflicts and no-ops only: nothing to make durable.
        wtx.abort()?;
        return Ok(Committed {
            outcomes,
            published: None,
        });
    }
    wtx.commit()?;
    Ok(Committed {
        outcomes,
        published: Some((revision, batches)),
    })
}

fn all_hold(kv: &Table<&str, &[u8]>, compares: &[Compare]) -> Result<bool, redb::Error> {
    for c in compares {
        let holds = match c {
            Compare::Absent(k) => kv.get(k.as_str())?.is_none(),
            Compare::ModRevision(k, rev) => match kv.get(k.as_str())? {
                Some(g) => decode_kv(k, g.value())?.mod_revision == *rev,
                None => false,
            },
        };
        if !holds {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Applies one transaction's operations at `revision`; returns its events.
fn apply(
    kv: &mut Table<&str, &[u8]>,
    ops: Vec<Op>,
    revision: i64,
) -> Result<Vec<Event>, redb::Error> {
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put(key, value) => {
                let create_revision = match kv.get(key.as_str())? {
                    Some(g) => decode_kv(&key, g.value())?.create_revision,
                    None => revision,
                };
                kv.insert(
                    key.as_str(),
                    encode_kv(create_revision, revision, &value).as_slice(),
                )?;
                events.push(Event::Put(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: revision,
                }));
            }
            Op::Delete(key) => {
                if kv.remove(key.as_str())?.is_some() {
                    events.push(Event::Delete { key, revision });
                }
            }
        }
    }
    Ok(events)
}

/// Drops history up to `through` (inclusive).
fn compact(
    history: &mut Table<i64, &[u8]>,
    meta: &mut Table<&str, i64>,
    through: i64,
) -> Result<(), redb::Error> {
    let compacted = meta_get(meta, META_COMPACTED)?;
    if through > compacted {
        history.retain_in((compacted + 1)..=through, |_, _| false)?;
        meta.insert(META_COMPACTED, through)?;
    }
    Ok(())
}

/// One key from a snapshot.
fn get_kv(s: &Shared, key: &str) -> Result<Option<KeyValue>, redb::Error> {
    let rtx = s.db.begin_read()?;
    let kv = rtx.open_table(KV)?;
    kv.get(key)?.map(|g| decode_kv(key, g.value())).transpose()
}

/// A page from a snapshot (same bounds as `MemStore::range`).
fn range_page(
    s: &Shared,
    prefix: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<Page, redb::Error> {
    let rtx = s.db.begin_read()?;
    let revision = meta_get(&rtx.open_table(META)?, META_REVISION)?;
    let kv = rtx.open_table(KV)?;
    let lower = match start_after {
        Some(k) if k >= prefix => Bound::Excluded(k),
        _ => Bound::Included(prefix),
    };
    let mut kvs = Vec::new();
    let mut more = false;
    for entry in kv.range::<&str>((lower, Bound::Unbounded))? {
        let (k, v) = entry?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        if limit != 0 && kvs.len() == limit {
            more = true;
            break;
        }
        kvs.push(decode_kv(key, v.value())?);
    }
    Ok(Page {
        kvs,
        more,
        revision,
    })
}

/// How a watch starts.
enum WatchStart {
    /// `from` is older than the history kept; the oldest revision a watch can start from.
    Compacted(i64),
    /// The kept batches from `from` up to `published`, and the live batches after it.
    Ready {
        rx: broadcast::Receiver<WatchBatch>,
        replay: Vec<Result<WatchBatch, StoreError>>,
        published: i64,
    },
}

fn watch_start(s: &Shared, prefix: &str, from: i64) -> Result<WatchStart, redb::Error> {
    // Subscribe and take the snapshot under the lock: every batch up to `published` is in
    // the snapshot, every later one comes to `rx`.
    let (rx, published, rtx) = {
        let state = s.lock();
        let rx = s.tx.subscribe();
        (rx, state.revision, s.db.begin_read()?)
    };
    // Read from the same snapshot: a group committed after it may have compacted further.
    let compacted = meta_get(&rtx.open_table(META)?, META_COMPACTED)?;
    let start = from.max(1);
    if start <= compacted {
        return Ok(WatchStart::Compacted(compacted + 1));
    }
    let history = rtx.open_table(HISTORY)?;
    let mut replay = Vec::new();
    for entry in history.range(start..=published)? {
        let (rev, buf) = entry?;
        let batch = decode_batch(rev.value(), buf.value())?;
        if let Some(b) = filter_batch(&batch, prefix) {
            replay.push(Ok(b));
        }
    }
    Ok(WatchStart::Ready {
        rx,
        replay,
        published,
    })
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read(move |s| get_kv(s, &key)).await
    }

    async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        self.read(move |s| range_page(s, &prefix, start_after.as_deref(), limit))
            .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let closed = || StoreError::Backend("the store's writer thread has stopped".into());
        let (reply, outcome) = oneshot::channel();
        self.inner
            .requests
            .as_ref()
            .ok_or_else(closed)?
            .send(TxnRequest {
                compares,
                ops,
                reply,
            })
            .map_err(|_| closed())?;
        outcome.await.map_err(|_| closed())?
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.inner.shared.lock().revision)
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchStream, StoreError> {
        let owned = prefix.to_owned();
        let (rx, replay, published) = match self.read(move |s| watch_start(s, &owned, from)).await?
        {
            WatchStart::Compacted(oldest) => {
                return Err(StoreError::Compacted {
                    requested: from,
                    oldest,
                });
            }
            WatchStart::Ready {
                rx,
                replay,
                published,
            } => (rx, replay, published),
        };
        let prefix = prefix.to_owned();
        let live = BroadcastStream::new(rx).filter_map(move |r| match r {
            // Already in the replay (cannot happen: sent before the subscription) or before
            // `from`.
            Ok(b) if b.revision <= published || b.revision < from => None,
            Ok(b) => filter_batch(&b, &prefix).map(Ok),
            Err(e) => Some(Err(StoreError::Unavailable(format!("watch lagged: {e}")))),
        });
        Ok(Box::pin(tokio_stream::iter(replay).chain(live)))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put(key.to_owned(), value.as_bytes().to_vec())
    }

    #[test]
    fn batch_encoding_round_trips() {
        let batch = WatchBatch {
            revision: 7,
            events: vec![
                Event::Put(KeyValue {
                    key: "/a".into(),
                    value: b"x".to_vec(),
                    create_revision: 3,
                    mod_revision: 7,
                }),
                Event::Delete {
                    key: "/b".into(),
                    revision: 7,
                },
                Event::Put(KeyValue {
                    key: "/c".into(),
                    value: Vec::new(),
                    create_revision: 7,
                    mod_revision: 7,
                }),
            ],
        };
        let buf = encode_batch(&batch.events).expect("encode");
        assert_eq!(decode_batch(7, &buf).expect("decode"), batch);
        assert!(
            decode_batch(7, &buf[..buf.len() - 1]).is_err(),
            "a truncated record decodes"
        );
    }

    #[tokio::test]
    async fn reopening_keeps_data_revision_and_history() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.redb");
        let store = RedbStore::open(&path).expect("open");
        store
            .txn(vec![], vec![put("/a", "1")])
            .await
            .expect("txn 1");
        store
            .txn(vec![], vec![put("/b", "2"), Op::Delete("/a".into())])
            .await
            .expect("txn 2");
        drop(store);

        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.revision().await.expect("revision"), 2);
        assert_eq!(store.get("/a").await.expect("get a"), None);
        assert_eq!(
            store.get("/b").await.expect("get b").map(|kv| kv.value),
            Some(b"2".to_vec())
        );
        let mut w = store.watch("/", 1).await.expect("watch");
        for rev in [1, 2] {
            let b = w.next().await.expect("open").expect("batch");
            assert_eq!(b.revision, rev, "replayed after reopening");
        }
        assert_eq!(
            store
                .txn(vec![], vec![put("/c", "3")])
                .await
                .expect("txn 3"),
            TxnOutcome::Committed(3)
        );
    }

    #[tokio::test]
    async fn history_keeps_the_last_n_revisions() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open_with(dir.path().join("s.redb"), RedbOptions { history: 3 })
            .expect("open");
        for i in 0..10 {
            store
                .txn(vec![], vec![put("/k", &i.to_string())])
                .await
                .expect("txn");
        }
        // Revisions 8, 9, 10 are kept.
        match store.watch("/", 7).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (7, 8));
            }
            other => panic!("watch from 7: {:?}", other.map(|_| "a stream")),
        }
        let mut w = store.watch("/", 8).await.expect("watch from 8");
        let b = w.next().await.expect("open").expect("batch");
        assert_eq!(b.revision, 8);
    }

    /// Transactions queued together (one group commit) still see each other's writes:
    /// of many concurrent creates of one key, exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn grouped_compares_see_earlier_members() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(dir.path().join("s.redb")).expect("open");
        let mut tasks = Vec::new();
        for i in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .txn(
                        vec![Compare::Absent("/once".into())],
                        vec![put("/once", &i.to_string())],
                    )
                    .await
                    .expect("txn")
            }));
        }
        let mut committed = 0;
        for t in tasks {
            if let TxnOutcome::Committed(rev) = t.await.expect("task") {
                assert_eq!(rev, 1);
                committed += 1;
            }
        }
        assert_eq!(committed, 1, "creates that won");
        assert_eq!(store.revision().await.expect("revision"), 1);
    }
}
