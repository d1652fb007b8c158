#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Spool throughput: appends under every fsync policy with 1 and 64 concurrent
//! appenders, and replay (`read_batch` + `ack`) from the page cache.
//!
//! Run with `cargo bench --bench spool`; filter with e.g.
//! `cargo bench --bench spool -- append/always/c64/4KiB`. Results and the
//! comparison with fio are in `docs/performance.md`.
//!
//! One iteration is one record. Throughput is counted in framed bytes (what
//! reaches the segment file: 16-byte frame header, request metadata and
//! body), so it compares directly with a raw-disk measurement; the body share
//! is printed once per size at start-up.
//!
//! Each timed call (`iter_custom`) opens a fresh spool in a new directory under
//! `CARGO_TARGET_TMPDIR` (the real disk, not tmpfs), and closes and deletes it
//! outside the timed part. Each call is bounded by a watchdog.
//!
//! Set `FORKD_BENCH_STATS=1` to print, at the end, how many appends and spool
//! opens the run made (used to turn an `strace -c` count of `fdatasync` calls
//! into records per group commit).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group};
use forkd::spool::{FsyncPolicy, Record, Spool, SpoolOptions};
use http::Method;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

/// Body sizes under test.
const SIZES: [(usize, &str); 3] = [(512, "512B"), (4 << 10, "4KiB"), (64 << 10, "64KiB")];
/// Concurrent appenders under test.
const CONCURRENCY: [usize; 2] = [1, 64];
/// `read_batch` limits used by the replay benchmark.
const REPLAY_MAX_RECORDS: usize = 1024;
const REPLAY_MAX_BYTES: u64 = 4 << 20;
/// Longest one timed call may take before the benchmark fails instead of hanging.
const WATCHDOG: Duration = Duration::from_secs(300);

static APPENDS: AtomicU64 = AtomicU64::new(0);
static OPENS: AtomicU64 = AtomicU64::new(0);

fn policies() -> [(FsyncPolicy, &'static str); 3] {
    [
        (FsyncPolicy::Always, "always"),
        (FsyncPolicy::Never, "never"),
        (
            FsyncPolicy::Interval(Duration::from_millis(100)),
            "interval100ms",
        ),
    ]
}

fn tmp_root() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A typical ingested request: an OTLP-like POST with one header.
fn template(body_len: usize) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    Record {
        accepted_at: SystemTime::now(),
        request_id: "0190f0a8-0000-7000-8000-000000000001".into(),
        method: Method::POST,
        path_and_query: PathAndQuery::from_static("/v1/logs"),
        headers,
        body: Bytes::from(vec![0x5a; body_len]),
    }
}

fn options(fsync: FsyncPolicy) -> SpoolOptions {
    SpoolOptions {
        // Never the limit here: admission is not what is measured.
        max_size: 1 << 40,
        fsync,
        ..SpoolOptions::default()
    }
}

/// A fresh spool in a new temporary directory on the real disk.
fn fresh_spool(fsync: FsyncPolicy) -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir_in(tmp_root()).expect("temp dir");
    let spool = Spool::open(dir.path().join("target"), options(fsync)).expect("open spool");
    OPENS.fetch_add(1, Ordering::Relaxed);
    (dir, spool)
}

/// One appender: reserve, append, await durability, until `left` is used up.
async fn appender(spool: Spool, rec: Record, left: Arc<AtomicU64>) {
    let len = rec.encoded_len();
    while left
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        let reservation = spool.try_reserve(len).expect("reserve");
        spool
            .append(reservation, rec.clone())
            .await
            .expect("append");
    }
}

/// Appends `iters` records with `concurrency` tasks; returns the time taken.
fn run_appends(
    rt: &Runtime,
    fsync: FsyncPolicy,
    rec: &Record,
    concurrency: usize,
    iters: u64,
) -> Duration {
    let (dir, spool) = fresh_spool(fsync);
    let left = Arc::new(AtomicU64::new(iters));
    let tasks = concurrency
        .min(usize::try_from(iters).unwrap_or(usize::MAX))
        .max(1);
    let elapsed = rt.block_on(async {
        let work = async {
            let start = Instant::now();
            // Appenders run as runtime tasks, as request handlers would.
            let mut set = JoinSet::new();
            for _ in 0..tasks {
                set.spawn(appender(spool.clone(), rec.clone(), left.clone()));
            }
            while let Some(done) = set.join_next().await {
                done.expect("appender task");
            }
            start.elapsed()
        };
        tokio::time::timeout(WATCHDOG, work)
            .await
            .expect("append benchmark exceeded its watchdog")
    });
    APPENDS.fetch_add(iters, Ordering::Relaxed);
    spool.close();
    drop(dir);
    elapsed
}

/// Fills a fresh spool with `iters` records (untimed), then times reading them
/// all back with `read_batch` and acknowledging each batch.
fn run_replay(rt: &Runtime, rec: &Record, iters: u64) -> Duration {
    let (dir, spool) = fresh_spool(FsyncPolicy::Never);
    let len = rec.encoded_len();
    let elapsed = rt.block_on(async {
        let work = async {
            // Appends are queued when `append` is called; await them in order.
            let pending: Vec<_> = (0..iters)
                .map(|_| {
                    let reservation = spool.try_reserve(len).expect("reserve");
                    spool.append(reservation, rec.clone())
                })
                .collect();
            for p in pending {
                p.await.expect("append");
            }
            // The segments were just written: they are in the page cache.
            let start = Instant::now();
            let mut reader = spool.reader();
            let mut read = 0u64;
            loop {
                let batch = reader
                    .read_batch(REPLAY_MAX_RECORDS, REPLAY_MAX_BYTES)
                    .expect("read_batch");
                let Some(last) = batch.last() else { break };
                spool.ack(last.end);
                read += batch.len() as u64;
                black_box(batch);
            }
            let elapsed = start.elapsed();
            assert_eq!(read, iters, "replay returned a different number of records");
            elapsed
        };
        tokio::time::timeout(WATCHDOG, work)
            .await
            .expect("replay benchmark exceeded its watchdog")
    });
    spool.close();
    drop(dir);
    elapsed
}

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    for (policy, policy_name) in policies() {
        let mut group = c.benchmark_group(format!("append/{policy_name}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sampling_mode(SamplingMode::Flat);
        for concurrency in CONCURRENCY {
            for (size, size_name) in SIZES {
                let rec = template(size);
                group.throughput(Throughput::Bytes(rec.encoded_len()));
                group.bench_function(
                    BenchmarkId::new(format!("c{concurrency}"), size_name),
                    |b| {
                        b.iter_custom(|iters| run_appends(&rt, policy, &rec, concurrency, iters));
                    },
                );
            }
        }
        group.finish();
    }
}

fn bench_replay(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("replay");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat);
    for (size, size_name) in SIZES {
        let rec = template(size);
        group.throughput(Throughput::Bytes(rec.encoded_len()));
        group.bench_function(size_name, |b| {
            b.iter_custom(|iters| run_replay(&rt, &rec, iters));
        });
    }
    group.finish();
}

criterion_group!(benches, bench_append, bench_replay);

fn main() {
    for (size, name) in SIZES {
        let framed = template(size).encoded_len();
        eprintln!("record {name}: body {size} B, framed {framed} B on disk");
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::var_os("FORKD_BENCH_STATS").is_some() {
        eprintln!(
            "FORKD_BENCH_STATS appends={} spool_opens={}",
            APPENDS.load(Ordering::Relaxed),
            OPENS.load(Ordering::Relaxed)
        );
    }
}
