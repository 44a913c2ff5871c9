//! The behaviour every [`Store`] backend shares, as checks that panic with a message saying
//! what differed (feature `testing`; the crate's own tests run them on `MemStore` and
//! `RedbStore`, the root-only `tests` crate on etcd).
//!
//! Each check writes under its own prefix (`/conformance/<check>/`) and expects to be the
//! only writer while it runs (several assert exact revisions): run them one after another,
//! [`run_all`] does. A store may be reused across runs of different checks, but not of the
//! same check (keys are expected absent at the start).

use std::{sync::Arc, time::Duration};

use tokio_stream::StreamExt as _;

use crate::{Compare, Event, KeyValue, Op, Store, StoreError, TxnOutcome, WatchBatch, WatchStream};

/// Longest wait for a watch batch that should come.
const WATCH_WAIT: Duration = Duration::from_secs(10);

/// Runs every check that applies to any backend, in order (`watch_compacted` needs a
/// backend-specific way to compact and is run separately).
pub async fn run_all(store: Arc<dyn Store>) {
    put_get(&*store).await;
    txn_compare_absent(&*store).await;
    txn_compare_mod_revision_conflict(&*store).await;
    revision_increments_once_per_txn(&*store).await;
    range_prefix_pagination(&*store).await;
    delete(&*store).await;
    watch_replay_and_live(&*store).await;
    watch_prefix_filter(&*store).await;
    concurrent_txns_serialize(Arc::clone(&store), 16).await;
}

fn put(key: &str, value: &str) -> Op {
    Op::Put(key.to_owned(), value.as_bytes().to_vec())
}

/// Runs a transaction that must commit; returns its revision.
async fn commit(store: &dyn Store, what: &str, compares: Vec<Compare>, ops: Vec<Op>) -> i64 {
    match store.txn(compares, ops).await {
        Ok(TxnOutcome::Committed(rev)) => rev,
        other => panic!("{what}: expected Committed, got {other:?}"),
    }
}

/// Runs a transaction that must fail its compares; returns the revision reported.
async fn conflict(store: &dyn Store, what: &str, compares: Vec<Compare>, ops: Vec<Op>) -> i64 {
    match store.txn(compares, ops).await {
        Ok(TxnOutcome::Conflict(rev)) => rev,
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

async fn get(store: &dyn Store, key: &str) -> Option<KeyValue> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
}

async fn revision(store: &dyn Store) -> i64 {
    store
        .revision()
        .await
        .unwrap_or_else(|e| panic!("revision: {e}"))
}

fn kv(key: &str, value: &str, create_revision: i64, mod_revision: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        create_revision,
        mod_revision,
    }
}

async fn watch(store: &dyn Store, prefix: &str, from: i64) -> WatchStream {
    store
        .watch(prefix, from)
        .await
        .unwrap_or_else(|e| panic!("watch {prefix} from {from}: {e}"))
}

/// The next batch of `stream`, within [`WATCH_WAIT`].
async fn next_batch(stream: &mut WatchStream, what: &str) -> WatchBatch {
    match tokio::time::timeout(WATCH_WAIT, stream.next()).await {
        Ok(Some(Ok(batch))) => batch,
        Ok(Some(Err(e))) => panic!("{what}: the watch failed: {e}"),
        Ok(None) => panic!("{what}: the watch ended"),
        Err(_) => panic!("{what}: no batch within {WATCH_WAIT:?}"),
    }
}

/// A missing key reads as None; a put creates it at the transaction's revision; an
/// overwrite keeps its create revision and moves its mod revision.
pub async fn put_get(store: &dyn Store) {
    let key = "/conformance/put_get/k";
    assert_eq!(
        get(store, key).await,
        None,
        "put_get: {key} exists before the test"
    );
    let r1 = commit(store, "put_get: first put", vec![], vec![put(key, "v1")]).await;
    assert_eq!(
        get(store, key).await,
        Some(kv(key, "v1", r1, r1)),
        "put_get: a new key has create = mod = the put's revision"
    );
    let r2 = commit(store, "put_get: overwrite", vec![], vec![put(key, "v2")]).await;
    assert!(r2 > r1, "put_get: overwrite revision {r2} not after {r1}");
    assert_eq!(
        get(store, key).await,
        Some(kv(key, "v2", r1, r2)),
        "put_get: an overwrite keeps the create revision and moves the mod revision"
    );
}

/// `Compare::Absent` holds for a missing key only; a failed compare writes nothing and
/// reports the current revision.
pub async fn txn_compare_absent(store: &dyn Store) {
    let key = "/conformance/txn_compare_absent/k";
    let absent = || vec![Compare::Absent(key.to_owned())];
    let r1 = commit(store, "absent: create", absent(), vec![put(key, "first")]).await;
    let r = conflict(
        store,
        "absent: create again",
        absent(),
        vec![put(key, "second")],
    )
    .await;
    assert_eq!(r, r1, "absent: a conflict reports the current revision");
    assert_eq!(
        revision(store).await,
        r1,
        "absent: a conflict moved the revision"
    );
    assert_eq!(
        get(store, key).await,
        Some(kv(key, "first", r1, r1)),
        "absent: a conflicting transaction wrote"
    );
}

/// `Compare::ModRevision` holds only for an existing key last written at exactly that
/// revision; every compare of a transaction must hold, else none of its operations apply.
pub async fn txn_compare_mod_revision_conflict(store: &dyn Store) {
    let a = "/conformance/txn_compare_mod_revision/a";
    let b = "/conformance/txn_compare_mod_revision/b";
    let missing = "/conformance/txn_compare_mod_revision/missing";
    let modrev = |k: &str, r: i64| Compare::ModRevision(k.to_owned(), r);

    let r1 = commit(
        store,
        "modrev: create a, b",
        vec![],
        vec![put(a, "1"), put(b, "1")],
    )
    .await;
    let r2 = commit(
        store,
        "modrev: CAS a",
        vec![modrev(a, r1)],
        vec![put(a, "2")],
    )
    .await;
    conflict(
        store,
        "modrev: stale CAS a",
        vec![modrev(a, r1)],
        vec![put(a, "3")],
    )
    .await;
    assert_eq!(
        get(store, a).await,
        Some(kv(a, "2", r1, r2)),
        "modrev: a stale compare-and-swap wrote"
    );
    conflict(
        store,
        "modrev: missing key",
        vec![modrev(missing, r2)],
        vec![put(missing, "x")],
    )
    .await;
    conflict(
        store,
        "modrev: revision 0",
        vec![modrev(missing, 0)],
        vec![put(missing, "x")],
    )
    .await;
    assert_eq!(
        get(store, missing).await,
        None,
        "modrev: a failed compare created a key"
    );

    // One compare holds (b), the other not (a is at r2): nothing applies.
    conflict(
        store,
        "modrev: one of two compares fails",
        vec![modrev(b, r1), modrev(a, r1)],
        vec![put(a, "4"), put(b, "4")],
    )
    .await;
    assert_eq!(
        get(store, a).await,
        Some(kv(a, "2", r1, r2)),
        "modrev: partial apply of a"
    );
    assert_eq!(
        get(store, b).await,
        Some(kv(b, "1", r1, r1)),
        "modrev: partial apply of b"
    );
    let r3 = commit(
        store,
        "modrev: both compares hold",
        vec![
            modrev(b, r1),
            modrev(a, r2),
            Compare::Absent(missing.to_owned()),
        ],
        vec![put(a, "5"), put(b, "5")],
    )
    .await;
    assert_eq!(
        get(store, a).await,
        Some(kv(a, "5", r1, r3)),
        "modrev: a after both hold"
    );
    assert_eq!(
        get(store, b).await,
        Some(kv(b, "5", r1, r3)),
        "modrev: b after both hold"
    );
}

/// A committed transaction with writes advances the revision by exactly one, however many
/// keys it writes; conflicts and transactions without operations do not.
pub async fn revision_increments_once_per_txn(store: &dyn Store) {
    let p = "/conformance/revision_increments";
    let r0 = revision(store).await;
    let r1 = commit(
        store,
        "revision: three puts",
        vec![],
        vec![
            put(&format!("{p}/a"), "1"),
            put(&format!("{p}/b"), "1"),
            put(&format!("{p}/c"), "1"),
        ],
    )
    .await;
    assert_eq!(
        r1,
        r0 + 1,
        "revision: a three-key transaction moved the revision by {}",
        r1 - r0
    );
    assert_eq!(revision(store).await, r1, "revision() after a commit");
    for k in ["a", "b", "c"] {
        let key = format!("{p}/{k}");
        assert_eq!(
            get(store, &key).await.map(|kv| kv.mod_revision),
            Some(r1),
            "revision: every key of a transaction has its revision ({key})"
        );
    }
    let r = conflict(
        store,
        "revision: conflict",
        vec![Compare::Absent(format!("{p}/a"))],
        vec![put(&format!("{p}/d"), "1")],
    )
    .await;
    assert_eq!(r, r1, "revision: a conflict reports the current revision");
    let r = commit(store, "revision: no operations", vec![], vec![]).await;
    assert_eq!(
        r, r1,
        "revision: a transaction without operations reports the current revision"
    );
    let r2 = commit(
        store,
        "revision: next",
        vec![],
        vec![put(&format!("{p}/a"), "2")],
    )
    .await;
    assert_eq!(r2, r1 + 1, "revision: the next transaction");
    assert_eq!(
        revision(store).await,
        r2,
        "revision() after the next transaction"
    );
}

/// Range returns the keys under a prefix in ascending order, pages with `start_after` and
/// `limit`, says whether more follow, and reads at the current revision.
pub async fn range_prefix_pagination(store: &dyn Store) {
    let p = "/conformance/range/";
    let keys: Vec<String> = (0..25).map(|i| format!("{p}k{i:02}")).collect();
    // Neighbours that share a byte prefix but are not under `p`.
    let outside = [
        "/conformance/range",
        "/conformance/range0",
        "/conformance/rangf/x",
    ];
    let mut ops: Vec<Op> = keys.iter().rev().map(|k| put(k, k)).collect();
    ops.extend(outside.iter().map(|k| put(k, "outside")));
    let rev = commit(store, "range: fill", vec![], ops).await;

    let page = |start_after: Option<String>, limit: usize| async move {
        store
            .range(p, start_after.as_deref(), limit)
            .await
            .unwrap_or_else(|e| panic!("range {p} after {start_after:?} limit {limit}: {e}"))
    };
    let all = page(None, 0).await;
    let got: Vec<&str> = all.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        got, keys,
        "range: every key under the prefix, in order, nothing else"
    );
    assert!(!all.more, "range: `more` without a limit");
    assert_eq!(all.revision, rev, "range: the page's revision");
    assert!(
        all.kvs
            .iter()
            .all(|kv| kv.value == kv.key.as_bytes() && kv.mod_revision == rev),
        "range: values and revisions"
    );

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = Vec::new();
    loop {
        let pg = page(after.clone(), 10).await;
        assert!(
            pg.kvs.len() <= 10,
            "range: a page of {} keys with limit 10",
            pg.kvs.len()
        );
        pages.push((pg.kvs.len(), pg.more));
        seen.extend(pg.kvs.iter().map(|kv| kv.key.clone()));
        if !pg.more {
            break;
        }
        after = pg.kvs.last().map(|kv| kv.key.clone());
        assert!(pages.len() < 10, "range: pagination does not end");
    }
    assert_eq!(
        pages,
        [(10, true), (10, true), (5, false)],
        "range: page sizes and `more`"
    );
    assert_eq!(seen, keys, "range: pages together are the whole range");

    let exact = page(Some(keys[14].clone()), 10).await;
    assert_eq!(
        (exact.kvs.len(), exact.more),
        (10, false),
        "range: the last 10 after the 15th key: exactly 10, no more"
    );
    let before = page(Some("/a".into()), 3).await;
    let got: Vec<&str> = before.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        got,
        keys[..3],
        "range: start_after before the prefix starts at the prefix"
    );
    let past = page(Some("/conformance/rangf".into()), 0).await;
    assert!(
        past.kvs.is_empty() && !past.more,
        "range: start_after past the prefix: {past:?}"
    );
    assert_eq!(past.revision, rev, "range: an empty page's revision");
    let none = store
        .range("/conformance/range/none/", None, 0)
        .await
        .unwrap_or_else(|e| panic!("range of an empty prefix: {e}"));
    assert!(
        none.kvs.is_empty() && !none.more,
        "range: an empty prefix: {none:?}"
    );
}

/// Delete removes a key (and range no longer lists it); deleting a missing key is not an
/// error; a key created again starts a new life (new create revision).
pub async fn delete(store: &dyn Store) {
    let key = "/conformance/delete/k";
    let r1 = commit(store, "delete: create", vec![], vec![put(key, "v")]).await;
    let r2 = commit(
        store,
        "delete: delete",
        vec![],
        vec![Op::Delete(key.to_owned())],
    )
    .await;
    assert_eq!(r2, r1 + 1, "delete: a delete advances the revision");
    assert_eq!(
        get(store, key).await,
        None,
        "delete: the key is still there"
    );
    let page = store
        .range("/conformance/delete/", None, 0)
        .await
        .unwrap_or_else(|e| panic!("delete: range: {e}"));
    assert!(
        page.kvs.is_empty(),
        "delete: range still lists {:?}",
        page.kvs
    );
    // (Whether this advances the revision differs: etcd does not count a no-op.)
    commit(
        store,
        "delete: a missing key",
        vec![],
        vec![Op::Delete(key.to_owned())],
    )
    .await;
    let r3 = commit(
        store,
        "delete: recreate",
        vec![Compare::Absent(key.to_owned())],
        vec![put(key, "again")],
    )
    .await;
    assert_eq!(
        get(store, key).await,
        Some(kv(key, "again", r3, r3)),
        "delete: a recreated key has a new create revision"
    );
}

/// A watch from a past revision first replays the kept batches (one per transaction, events
/// in operation order), then delivers new ones; a watch from `revision + 1` sees only new
/// ones.
pub async fn watch_replay_and_live(store: &dyn Store) {
    let p = "/conformance/watch_replay/";
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let r1 = commit(
        store,
        "watch: first",
        vec![],
        vec![put(&a, "1"), put(&b, "1")],
    )
    .await;
    let r2 = commit(
        store,
        "watch: second",
        vec![],
        vec![put(&c, "1"), Op::Delete(a.clone())],
    )
    .await;
    let mut from_past = watch(store, p, r1).await;
    let mut from_now = watch(store, p, r2 + 1).await;

    let expect1 = WatchBatch {
        revision: r1,
        events: vec![
            Event::Put(kv(&a, "1", r1, r1)),
            Event::Put(kv(&b, "1", r1, r1)),
        ],
    };
    let expect2 = WatchBatch {
        revision: r2,
        events: vec![
            Event::Put(kv(&c, "1", r2, r2)),
            Event::Delete {
                key: a.clone(),
                revision: r2,
            },
        ],
    };
    assert_eq!(
        next_batch(&mut from_past, "watch: replay 1").await,
        expect1,
        "watch: replay 1"
    );
    assert_eq!(
        next_batch(&mut from_past, "watch: replay 2").await,
        expect2,
        "watch: replay 2"
    );

    let r3 = commit(store, "watch: live", vec![], vec![put(&b, "2")]).await;
    let expect3 = WatchBatch {
        revision: r3,
        events: vec![Event::Put(kv(&b, "2", r1, r3))],
    };
    assert_eq!(
        next_batch(&mut from_past, "watch: live").await,
        expect3,
        "watch: live after replay"
    );
    assert_eq!(
        next_batch(&mut from_now, "watch from now").await,
        expect3,
        "watch: a watch from revision + 1 sees only the new transaction"
    );

    // A watch from the middle starts there.
    let mut from_mid = watch(store, p, r2).await;
    assert_eq!(
        next_batch(&mut from_mid, "watch: from r2").await,
        expect2,
        "watch: from r2"
    );
    assert_eq!(
        next_batch(&mut from_mid, "watch: from r2, live").await,
        expect3,
        "watch: from r2"
    );
}

/// A watch sees only keys under its prefix: a transaction's other keys are left out of its
/// batch, a transaction with none is skipped.
pub async fn watch_prefix_filter(store: &dyn Store) {
    let p = "/conformance/watch_prefix/";
    let (a1, a2, b1) = (format!("{p}a/1"), format!("{p}a/2"), format!("{p}b/1"));
    let from = revision(store).await + 1;
    let mut w = watch(store, &format!("{p}a/"), from).await;
    let r1 = commit(
        store,
        "prefix: mixed",
        vec![],
        vec![put(&b1, "x"), put(&a1, "x")],
    )
    .await;
    let r2 = commit(store, "prefix: other only", vec![], vec![put(&b1, "y")]).await;
    let r3 = commit(store, "prefix: inside only", vec![], vec![put(&a2, "x")]).await;
    assert!(r1 < r2 && r2 < r3, "prefix: revisions {r1} {r2} {r3}");
    assert_eq!(
        next_batch(&mut w, "prefix: mixed").await,
        WatchBatch {
            revision: r1,
            events: vec![Event::Put(kv(&a1, "x", r1, r1))],
        },
        "prefix: a mixed transaction keeps only the watched keys"
    );
    assert_eq!(
        next_batch(&mut w, "prefix: after skip").await,
        WatchBatch {
            revision: r3,
            events: vec![Event::Put(kv(&a2, "x", r3, r3))],
        },
        "prefix: a transaction outside the prefix is skipped"
    );
}

/// For a backend with a bounded history: after `compact(revision)` makes the backend drop
/// the history before `revision` (for redb: a store that keeps 1 revision needs nothing), a
/// watch from before it fails with [`StoreError::Compacted`] (from `watch` or as the
/// stream's first item), and a watch from `revision` still works.
pub async fn watch_compacted<F, Fut>(store: &dyn Store, compact: F)
where
    F: FnOnce(i64) -> Fut,
    Fut: Future<Output = ()>,
{
    let p = "/conformance/watch_compacted/";
    let mut revs = Vec::new();
    for i in 0..5 {
        let key = format!("{p}k{i}");
        revs.push(commit(store, "compacted: fill", vec![], vec![put(&key, "x")]).await);
    }
    let (first, last) = (revs[0], revs[4]);
    compact(last).await;

    let err = match store.watch(p, first).await {
        Err(e) => e,
        Ok(mut stream) => match tokio::time::timeout(WATCH_WAIT, stream.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("compacted: watch from {first} gave {other:?}, not an error"),
        },
    };
    match err {
        StoreError::Compacted { requested, oldest } => {
            assert_eq!(requested, first, "compacted: the requested revision");
            assert!(
                oldest > first && oldest <= last,
                "compacted: oldest kept {oldest} not in ({first}, {last}]"
            );
        }
        other => panic!("compacted: watch from {first}: expected Compacted, got {other}"),
    }

    let mut w = watch(store, p, last).await;
    let batch = next_batch(&mut w, "compacted: watch from the compaction revision").await;
    assert_eq!(batch.revision, last, "compacted: the first batch kept");
}

/// `n` tasks each add one to a counter with compare-and-swap retries: the final value is
/// `n` and every successful increment got its own revision.
pub async fn concurrent_txns_serialize(store: Arc<dyn Store>, n: usize) {
    let key = "/conformance/concurrent/counter";
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for attempt in 0.. {
                assert!(
                    attempt < 10_000,
                    "concurrent: no progress after {attempt} retries"
                );
                let current = get(&*store, key).await;
                let (compare, value) = match &current {
                    None => (Compare::Absent(key.to_owned()), 1),
                    Some(kv) => {
                        let text = std::str::from_utf8(&kv.value)
                            .unwrap_or_else(|e| panic!("concurrent: counter is not UTF-8: {e}"));
                        let v: usize = text
                            .parse()
                            .unwrap_or_else(|e| panic!("concurrent: counter {text:?}: {e}"));
                        (Compare::ModRevision(key.to_owned(), kv.mod_revision), v + 1)
                    }
                };
                let op = Op::Put(key.to_owned(), value.to_string().into_bytes());
                match store.txn(vec![compare], vec![op]).await {
                    Ok(TxnOutcome::Committed(rev)) => return rev,
                    Ok(TxnOutcome::Conflict(_)) => continue,
                    Err(e) => panic!("concurrent: txn failed: {e}"),
                }
            }
            unreachable!("the retry loop returns or panics")
        }));
    }
    let mut revisions = Vec::with_capacity(n);
    for t in tasks {
        revisions.push(t.await.unwrap_or_else(|e| panic!("concurrent: task: {e}")));
    }
    let last = get(&*store, key)
        .await
        .unwrap_or_else(|| panic!("concurrent: no counter"));
    assert_eq!(
        last.value,
        n.to_string().into_bytes(),
        "concurrent: final counter value"
    );
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        n,
        "concurrent: two increments share a revision"
    );
    assert_eq!(
        revisions.last().copied(),
        Some(last.mod_revision),
        "concurrent: last revision"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStore, RedbOptions, RedbStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mem_store_conforms() {
        run_all(Arc::new(MemStore::new())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redb_store_conforms() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(dir.path().join("store.redb")).expect("open");
        run_all(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redb_store_watch_compacted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open_with(dir.path().join("store.redb"), RedbOptions { history: 1 })
            .expect("open");
        // History of 1: each commit already dropped the revisions before it.
        watch_compacted(&store, |_| async {}).await;
    }
}
