//! The store's etcd backend on a real etcd (a private one per test, see `vpc_tests::etcd`):
//! the backend-independent conformance checks, compaction, namespaces, replicas sharing one
//! etcd, and etcd going away. Fails (does not skip) when etcd is not installed.

use std::{sync::Arc, time::Duration};

use tokio_stream::StreamExt as _;
use vpc_store::{Compare, EtcdOptions, EtcdStore, Op, Store, StoreError, TxnOutcome, conformance};
use vpc_tests::etcd::EtcdServer;

fn start(tag: &str) -> EtcdServer {
    EtcdServer::start(tag).unwrap_or_else(|e| panic!("starting etcd: {e:#}"))
}

async fn connect(server: &EtcdServer, namespace: &str) -> EtcdStore {
    EtcdStore::connect(EtcdOptions::new([server.client_url()], namespace))
        .await
        .unwrap_or_else(|e| panic!("connecting to etcd at {}: {e}", server.client_url()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_conforms() {
    let server = start("conforms");
    let store = connect(&server, "/vpc").await;
    conformance::run_all(Arc::new(store.clone())).await;
    conformance::watch_compacted(&store, |rev| {
        let store = store.clone();
        async move { store.compact(rev).await.expect("compact") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_empty_namespace_conforms() {
    let server = start("nonamespace");
    let store = connect(&server, "").await;
    conformance::run_all(Arc::new(store)).await;
}

/// Two namespaces on one etcd do not see each other's keys (they share etcd's revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_namespaces_are_isolated() {
    let server = start("namespaces");
    let a = connect(&server, "/tenant-a").await;
    let b = connect(&server, "/tenant-b").await;
    let mut watch_b = b.watch("/", 1).await.expect("watch b");
    let put = |v: &str| vec![Op::Put("/k".into(), v.as_bytes().to_vec())];
    let ra = a.txn(vec![], put("a")).await.expect("txn a");
    let rb = b
        .txn(vec![Compare::Absent("/k".into())], put("b"))
        .await
        .expect("txn b");
    assert!(matches!(ra, TxnOutcome::Committed(_)), "{ra:?}");
    assert!(
        matches!(rb, TxnOutcome::Committed(_)),
        "b's /k is not a's /k: {rb:?}"
    );
    let got = a.get("/k").await.expect("get a").expect("a's /k");
    assert_eq!(got.value, b"a", "a's value");
    let page = b.range("/", None, 0).await.expect("range b");
    let keys: Vec<&str> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/k"],
        "b lists only its own key, without its namespace"
    );
    let batch = tokio::time::timeout(Duration::from_secs(10), watch_b.next())
        .await
        .expect("b's watch in time")
        .expect("b's watch open")
        .expect("b's watch ok");
    let TxnOutcome::Committed(rev_b) = rb else {
        unreachable!()
    };
    assert_eq!(batch.revision, rev_b, "b's watch skips a's transaction");
}

/// Two replicas (stores) on the same namespace see each other's writes at once, and a
/// compare-and-swap from a stale read fails: nothing is cached in the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_replicas_share_state() {
    let server = start("replicas");
    let r1 = connect(&server, "/vpc").await;
    let r2 = connect(&server, "/vpc").await;
    let key = "/shared";
    let rev = match r1
        .txn(
            vec![Compare::Absent(key.into())],
            vec![Op::Put(key.into(), b"1".to_vec())],
        )
        .await
        .expect("r1 create")
    {
        TxnOutcome::Committed(rev) => rev,
        other => panic!("r1 create: {other:?}"),
    };
    let seen = r2
        .get(key)
        .await
        .expect("r2 get")
        .expect("r2 sees r1's key");
    assert_eq!(seen.mod_revision, rev, "r2 reads r1's revision");
    assert_eq!(
        r2.revision().await.expect("r2 revision"),
        rev,
        "one revision for both"
    );
    let mut w = r2.watch(key, rev + 1).await.expect("r2 watch");
    // r1 moves the key on; r2's compare against what it read must fail.
    let r1_update = r1
        .txn(
            vec![Compare::ModRevision(key.into(), rev)],
            vec![Op::Put(key.into(), b"2".to_vec())],
        )
        .await
        .expect("r1 update");
    let TxnOutcome::Committed(rev2) = r1_update else {
        panic!("r1 update: {r1_update:?}")
    };
    let stale = r2
        .txn(
            vec![Compare::ModRevision(key.into(), rev)],
            vec![Op::Put(key.into(), b"3".to_vec())],
        )
        .await
        .expect("r2 stale update");
    assert_eq!(
        stale,
        TxnOutcome::Conflict(rev2),
        "r2's stale compare-and-swap"
    );
    let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("r2's watch in time")
        .expect("r2's watch open")
        .expect("r2's watch ok");
    assert_eq!(batch.revision, rev2, "r2's watch sees r1's write");
}

/// A stopped etcd makes calls fail with `Unavailable` (not hang, not `Backend`), and ends
/// open watches with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_unavailable() {
    let mut server = start("down");
    let mut options = EtcdOptions::new([server.client_url()], "/vpc");
    options.request_timeout = Duration::from_secs(2);
    let store = EtcdStore::connect(options.clone()).await.expect("connect");
    let mut w = store.watch("/", 1).await.expect("watch");
    server.kill();

    match store.get("/k").await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("get with etcd down: expected Unavailable, got {other:?}"),
    }
    match store
        .txn(vec![], vec![Op::Put("/k".into(), b"v".to_vec())])
        .await
    {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("txn with etcd down: expected Unavailable, got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        Ok(Some(Err(StoreError::Unavailable(_)))) => {}
        other => panic!("watch with etcd down: expected an Unavailable error, got {other:?}"),
    }
    match EtcdStore::connect(options).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("connect with etcd down: expected Unavailable, got {other:?}"),
    }
}
