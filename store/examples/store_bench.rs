//! Latency of the redb store on a store holding 10 000 keys:
//!
//! ```sh
//! cargo run --release -p vpc-store --example store_bench [-- DIR]
//! ```
//!
//! Measures a transaction (one put guarded by `Compare::Absent`, fsync included) from one
//! client and from 16 concurrent clients (group commit shares fsyncs among them), a `get`,
//! and a `range` page of 100 keys at a random place. The database goes in `DIR` (default: a
//! temporary directory), which should be on the disk being measured.

use std::{
    io::Write as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use vpc_store::{Compare, Op, RedbStore, Store, TxnOutcome};

const KEYS: usize = 10_000;
const SAMPLES: usize = 1_000;
const CLIENTS: usize = 16;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| tmp.path().to_owned(), Into::into);
    let mut lat = fsync_floor(&dir.join("fsync.probe"))?;
    report("fsync of 4 KiB (the disk's floor)", &mut lat, None);
    let store = Arc::new(RedbStore::open(dir.join("bench.redb"))?);

    let load = Instant::now();
    for chunk in 0..KEYS / 100 {
        let ops = (0..100)
            .map(|i| Op::Put(key("/bench/k", chunk * 100 + i), vec![b'x'; 200]))
            .collect();
        committed(store.txn(vec![], ops).await?)?;
    }
    println!(
        "loaded {KEYS} keys (200-byte values, 100 per txn) in {:?}",
        load.elapsed()
    );

    let mut lat = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let k = key("/bench/new", i);
        let t = Instant::now();
        committed(
            store
                .txn(
                    vec![Compare::Absent(k.clone())],
                    vec![Op::Put(k, vec![b'y'; 200])],
                )
                .await?,
        )?;
        lat.push(t.elapsed());
    }
    report("txn (put if absent), 1 client", &mut lat, None);

    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(SAMPLES / CLIENTS * 4);
            for i in 0..SAMPLES / CLIENTS * 4 {
                let k = key(&format!("/bench/c{c}/"), i);
                let t = Instant::now();
                let out = store
                    .txn(
                        vec![Compare::Absent(k.clone())],
                        vec![Op::Put(k, vec![b'z'; 200])],
                    )
                    .await;
                assert!(matches!(out, Ok(TxnOutcome::Committed(_))), "{out:?}");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    report(
        &format!("txn (put if absent), {CLIENTS} clients"),
        &mut lat,
        Some(start.elapsed()),
    );

    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut lat = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let k = key("/bench/k", next(&mut rng) % KEYS);
        let t = Instant::now();
        let kv = store.get(&k).await?;
        lat.push(t.elapsed());
        assert!(kv.is_some(), "{k} missing");
    }
    report("get", &mut lat, None);

    let mut lat = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let after = key("/bench/k", next(&mut rng) % (KEYS - 100));
        let t = Instant::now();
        let page = store.range("/bench/k", Some(&after), 100).await?;
        lat.push(t.elapsed());
        assert_eq!(page.kvs.len(), 100, "page after {after}");
    }
    report("range page of 100 keys", &mut lat, None);
    Ok(())
}

/// Latencies of writing 4 KiB and `fdatasync`ing it: what one durable commit costs at least.
fn fsync_floor(path: &Path) -> std::io::Result<Vec<Duration>> {
    let mut file = std::fs::File::create(path)?;
    let mut lat = Vec::with_capacity(SAMPLES / 4);
    for _ in 0..SAMPLES / 4 {
        file.write_all(&[0; 4096])?;
        let t = Instant::now();
        file.sync_data()?;
        lat.push(t.elapsed());
    }
    std::fs::remove_file(path)?;
    Ok(lat)
}

fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:06}")
}

fn committed(out: TxnOutcome) -> Result<i64, String> {
    match out {
        TxnOutcome::Committed(rev) => Ok(rev),
        TxnOutcome::Conflict(rev) => Err(format!("unexpected conflict at {rev}")),
    }
}

/// xorshift64: a repeatable spread of keys.
fn next(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    usize::try_from(*state % (1 << 32)).unwrap_or(0)
}

fn report(what: &str, lat: &mut [Duration], wall: Option<Duration>) {
    lat.sort_unstable();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    let rate = wall.map_or(String::new(), |w| {
        format!(", {:.0} txn/s", lat.len() as f64 / w.as_secs_f64())
    });
    println!(
        "{what:<36} n={:<5} p50={:>9.3?} p99={:>9.3?} max={:>9.3?}{rate}",
        lat.len(),
        pct(50),
        pct(99),
        lat[lat.len() - 1],
    );
}
