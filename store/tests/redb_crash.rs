//! An acknowledged transaction survives kill -9: a child process (this test binary again, in
//! child mode) commits transactions from several tasks and prints each acknowledgement; the
//! parent SIGKILLs it mid-stream, reopens the file and finds every acknowledged key, with the
//! revision and history intact.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use tokio_stream::StreamExt as _;
use vpc_store::{Compare, Op, RedbStore, Store, TxnOutcome};

/// Set in the child: the database path.
const CHILD_ENV: &str = "VPC_STORE_CRASH_CHILD";
/// Writer tasks in the child (several, so group commit is under test too).
const WRITERS: usize = 8;
/// Acknowledgements the parent waits for before killing.
const ACKS_BEFORE_KILL: usize = 400;

#[test]
fn acknowledged_txns_survive_sigkill() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&path));
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("crash.redb");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "acknowledged_txns_survive_sigkill",
            "--nocapture",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // key -> (value, revision) of every acknowledged transaction.
    let mut acked = BTreeMap::new();
    let mut record = |line: String| {
        if let Some(rest) = line.strip_prefix("ack ") {
            let mut f = rest.split(' ');
            let (Some(key), Some(value), Some(rev)) = (f.next(), f.next(), f.next()) else {
                panic!("malformed ack line {line:?}");
            };
            let rev: i64 = rev.parse().expect("ack revision");
            acked.insert(key.to_owned(), (value.to_owned(), rev));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("child gave {seen} acks, then {e}"));
        if line.starts_with("ack ") {
            seen += 1;
        }
        record(line);
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("wait for the child");
    assert!(
        !status.success(),
        "the child was killed, yet exited with {status}"
    );
    // What the child wrote before dying is still in the pipe: those were acknowledged too.
    reader.join().expect("reader thread");
    for line in lines.try_iter() {
        record(line);
    }
    assert!(acked.len() >= ACKS_BEFORE_KILL, "{} acks", acked.len());

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = RedbStore::open(&path).expect("reopen after SIGKILL");
        let revision = store.revision().await.expect("revision");
        let max_acked = acked.values().map(|(_, r)| *r).max().unwrap_or(0);
        assert!(
            revision >= max_acked,
            "revision {revision} after reopening, but {max_acked} was acknowledged"
        );
        for (key, (value, rev)) in &acked {
            let kv = store
                .get(key)
                .await
                .expect("get")
                .unwrap_or_else(|| panic!("acknowledged {key} (revision {rev}) lost"));
            assert_eq!(kv.value, value.as_bytes(), "value of {key}");
            assert_eq!(kv.mod_revision, *rev, "revision of {key}");
        }
        // Every transaction created one key: the revision counts them, nothing half-applied.
        let page = store.range("/crash/", None, 0).await.expect("range");
        assert_eq!(
            i64::try_from(page.kvs.len()).expect("count"),
            revision,
            "keys present vs revision after reopening"
        );
        // History survived: a watch replays the last transactions.
        let from = (revision - 10).max(1);
        let mut w = store.watch("/crash/", from).await.expect("watch");
        for rev in from..=revision {
            let batch = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("replay in time")
                .expect("replay batch")
                .expect("replay ok");
            assert_eq!(batch.revision, rev, "replayed revision");
        }
        // And writing goes on from there.
        let next = store
            .txn(vec![], vec![Op::Put("/after".into(), b"x".to_vec())])
            .await
            .expect("txn after reopening");
        assert_eq!(
            next,
            TxnOutcome::Committed(revision + 1),
            "first txn after reopening"
        );
    });
}

/// Commits one new key per transaction from [`WRITERS`] tasks and prints `ack KEY VALUE REV`
/// once each is acknowledged, until killed (or 60 s, so an orphan ends by itself).
fn child(path: &Path) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(path).expect("open"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    if Instant::now() > deadline {
                        return;
                    }
                    let key = format!("/crash/{w}/{i:08}");
                    let value = format!("v{w}.{i}");
                    let out = store
                        .txn(
                            vec![Compare::Absent(key.clone())],
                            vec![Op::Put(key.clone(), value.clone().into_bytes())],
                        )
                        .await
                        .expect("txn");
                    let TxnOutcome::Committed(rev) = out else {
                        panic!("{key}: {out:?}");
                    };
                    // Not println!: the test harness may capture it.
                    let mut stdout = std::io::stdout().lock();
                    writeln!(stdout, "ack {key} {value} {rev}").expect("stdout");
                    stdout.flush().expect("flush");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
    });
}
