#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Integration tests of the spool storage engine: round trips, crash recovery,
//! corruption, bounds, locking, a full disk, and a model-based property test.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::future::Future;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use forkd::spool::fuzzing::SegmentHeader;
use forkd::spool::{
    FsyncPolicy, MIN_SEGMENT_SIZE, Record, Refused, Spool, SpoolError, SpoolOptions, Spooled,
    WhenFull, truncate_to_millis,
};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use tempfile::tempdir;

// ---------------------------------------------------------------- helpers

// flock(2) locks belong to an open file description, and a child process holds
// a duplicate of every descriptor from fork until exec (close-on-exec acts only
// at exec). So a test that spawns a process can keep another test's spool lock
// alive for an instant after that test closed its spool, and that test's next
// open fails with `Locked`. Processes are therefore spawned only while no other
// test has a spool open: every test holds `GATE` for reading, a spawn takes it
// for writing, and the tests that spawn are serialised by `SPAWNERS`.
static GATE: RwLock<()> = RwLock::new(());
static SPAWNERS: Mutex<()> = Mutex::new(());

fn gate() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(PoisonError::into_inner)
}

fn spawner() -> MutexGuard<'static, ()> {
    SPAWNERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `cmd` to completion; only call this from a test holding [`spawner`].
fn run(cmd: &mut Command) -> std::io::Result<Output> {
    let child = {
        let _exclusive = GATE.write().unwrap_or_else(PoisonError::into_inner);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?
    };
    child.wait_with_output()
}

const SEGMENT_HEADER_LEN: u64 = 32;
const MIB: u64 = 1 << 20;

fn opts(max_size: u64, segment_size: u64) -> SpoolOptions {
    SpoolOptions {
        max_size,
        segment_size,
        when_full: WhenFull::Reject,
        fsync: FsyncPolicy::Never,
        rejected_max_size: MIB,
        cursor_sync_interval: Duration::from_millis(50),
    }
}

/// Options for tests that do not care about bounds: 1 GiB, 64 KiB segments.
fn small_segments() -> SpoolOptions {
    opts(1 << 30, MIN_SEGMENT_SIZE)
}

/// [`small_segments`] with `fsync = "always"`: a torn tail was never acknowledged.
fn small_segments_always() -> SpoolOptions {
    SpoolOptions {
        fsync: FsyncPolicy::Always,
        ..small_segments()
    }
}

/// Body bytes made of lowercase letters only, so a body never holds a frame magic.
fn body(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| b'a' + ((seed as usize).wrapping_mul(7).wrapping_add(i) % 26) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A deterministic record identified by `id`; its length depends only on `body_len`.
fn record(id: u64, body_len: usize) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Record {
        accepted_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + id * 1_001),
        request_id: format!("req-{id:010}"),
        method: Method::POST,
        path_and_query: format!("/v1/logs?n={id:010}").parse().unwrap(),
        headers,
        body: body(id, body_len),
    }
}

fn id_of(r: &Record) -> u64 {
    r.request_id["req-".len()..].parse().unwrap()
}

fn ids(v: &[Spooled]) -> Vec<u64> {
    v.iter().map(|s| id_of(&s.record)).collect()
}

fn append(spool: &Spool, rec: Record) -> u64 {
    let res = spool.try_reserve(rec.encoded_len()).unwrap();
    spool.append_blocking(res, rec).unwrap()
}

/// Reads everything from the cursor on with a fresh reader.
fn read_all(spool: &Spool) -> Vec<Spooled> {
    let mut reader = spool.reader();
    let mut out = Vec::new();
    loop {
        let batch = reader.read_batch(64, 4 * MIB).unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

/// Segment files of a spool directory by base position.
fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digits = name.strip_suffix(".seg")?;
            if digits.len() != 20 {
                return None;
            }
            Some((digits.parse().ok()?, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir).pop().unwrap().1
}

/// File and offset in it holding position `lsn`.
fn locate(dir: &Path, lsn: u64) -> (PathBuf, u64) {
    let (base, path) = segments(dir)
        .into_iter()
        .rfind(|(base, _)| *base <= lsn)
        .unwrap();
    (path, SEGMENT_HEADER_LEN + lsn - base)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn flip_byte(path: &Path, offset: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xA5;
    f.write_all_at(&b, offset).unwrap();
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, file_len(path)).unwrap();
}

/// Copies the regular files of a spool directory (not `rejected/`, not the lock).
fn copy_spool(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "lock" {
            fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A closed spool of two segments: four 15 KB records and one that fills the
/// rest of the first segment exactly, then three small records in the last
/// one. Copied for every damage scenario.
struct Template {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    records: Vec<Record>,
    lsns: Vec<u64>,
}

impl Template {
    fn build() -> Template {
        let tmp = tempdir().unwrap();
        let dir = tmp.path().join("template");
        let spool = Spool::open(&dir, small_segments()).unwrap();
        let mut records: Vec<Record> = (0..4).map(|i| record(i, 15_000)).collect();
        let used: u64 = records.iter().map(Record::encoded_len).sum();
        records.push(record_of_len(4, MIN_SEGMENT_SIZE - used));
        records.extend([record(5, 80), record(6, 120), record(7, 90)]);
        let lsns: Vec<u64> = records.iter().map(|r| append(&spool, r.clone())).collect();
        spool.close();
        let segs = segments(&dir);
        assert_eq!(segs.len(), 2, "template should span two segments");
        assert_eq!(
            segs[1].0, lsns[5],
            "the small records start the last segment"
        );
        Template {
            _tmp: tmp,
            dir,
            records,
            lsns,
        }
    }

    /// (file, first byte, one past the last byte) of record `i`.
    fn extent(&self, dir: &Path, i: usize) -> (PathBuf, u64, u64) {
        let (path, start) = locate(dir, self.lsns[i]);
        (path, start, start + self.records[i].encoded_len())
    }

    fn copy_to(&self, dst: &Path) {
        copy_spool(&self.dir, dst);
    }
}

// ---------------------------------------------------------------- round trip and order

#[test]
fn every_field_of_a_record_round_trips_through_the_spool_and_a_reopen() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/x-protobuf"),
    );
    headers.append("x-repeated", HeaderValue::from_static("first"));
    headers.append("x-repeated", HeaderValue::from_static("second"));
    headers.append("x-repeated", HeaderValue::from_static("third"));
    // obs-text: valid in a header value, not UTF-8.
    headers.insert(
        "x-binary",
        HeaderValue::from_bytes(&[b'a', 0x80, 0xfe, 0xff, b'\t', b'z']).unwrap(),
    );
    headers.insert("x-empty", HeaderValue::from_static(""));
    let precise = UNIX_EPOCH + Duration::new(1_712_345_678, 987_654_321);
    let records = vec![
        Record {
            accepted_at: truncate_to_millis(SystemTime::now()),
            request_id: "0190f0a8-0000-7000-8000-000000000001".into(),
            method: Method::POST,
            path_and_query: PathAndQuery::from_static("/v1/logs?tenant=a%20b&x=1&x=2"),
            headers: headers.clone(),
            body: Bytes::new(),
        },
        Record {
            accepted_at: truncate_to_millis(precise),
            request_id: "request-ü-2".into(),
            method: Method::from_bytes(b"PURGE").unwrap(),
            path_and_query: PathAndQuery::from_static("/"),
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"x"),
        },
        Record {
            accepted_at: UNIX_EPOCH,
            request_id: String::new(),
            method: Method::PUT,
            path_and_query: PathAndQuery::from_static("/api/v2/write?org=o&bucket=b&precision=ns"),
            headers,
            body: (0..3 * MIB as usize)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<_>>()
                .into(),
        },
    ];
    let spool = Spool::open(&dir, opts(1 << 30, 64 * MIB)).unwrap();
    for r in &records {
        append(&spool, r.clone());
    }
    let got: Vec<Record> = read_all(&spool).into_iter().map(|s| s.record).collect();
    assert_eq!(got, records);
    spool.close();

    let spool = Spool::open(&dir, opts(1 << 30, 64 * MIB)).unwrap();
    let got: Vec<Record> = read_all(&spool).into_iter().map(|s| s.record).collect();
    assert_eq!(got, records);
    // Repeated header values come back in order, and the times at millisecond precision.
    let values: Vec<&[u8]> = got[0]
        .headers
        .get_all("x-repeated")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    assert_eq!(values, [&b"first"[..], b"second", b"third"]);
    assert_eq!(
        got[1].accepted_at,
        UNIX_EPOCH + Duration::from_millis(1_712_345_678_987)
    );
    assert_eq!(got[1].method.as_str(), "PURGE");
    assert_eq!(got[0].path_and_query.query(), Some("tenant=a%20b&x=1&x=2"));
    assert_eq!(
        got[0].headers.get("x-binary").unwrap().as_bytes(),
        &[b'a', 0x80, 0xfe, 0xff, b'\t', b'z']
    );
    assert_eq!(spool.stats().dropped_corrupt, 0);
    spool.close();
}

#[test]
fn a_time_below_millisecond_precision_comes_back_truncated_to_the_millisecond() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let spool = Spool::open(tmp.path().join("t"), small_segments()).unwrap();
    let mut rec = record(1, 10);
    rec.accepted_at = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    append(&spool, rec.clone());
    let got = read_all(&spool);
    assert_eq!(
        got[0].record.accepted_at,
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
    );
    assert_eq!(
        got[0].record.accepted_at,
        truncate_to_millis(rec.accepted_at)
    );
    spool.close();
}

#[test]
fn records_keep_their_order_across_several_close_and_reopen_cycles_while_more_are_appended() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let mut expected = Vec::new();
    let mut next = 0u64;
    let mut prev: Option<u64> = None;
    for cycle in 0..5 {
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(
            ids(&read_all(&spool)),
            expected,
            "cycle {cycle}: records before appending"
        );
        for _ in 0..7 {
            // Varied sizes so that some cycles roll segments.
            let rec = record(next, (next as usize * 4_099) % 20_000);
            let lsn = append(&spool, rec);
            assert!(prev.is_none_or(|p| lsn > p), "positions grow");
            prev = Some(lsn);
            expected.push(next);
            next += 1;
        }
        let got = read_all(&spool);
        assert_eq!(ids(&got), expected, "cycle {cycle}: after appending");
        assert!(got.windows(2).all(|w| w[0].end <= w[1].lsn));
        spool.close();
    }
    let spool = Spool::open(&dir, small_segments()).unwrap();
    let got = read_all(&spool);
    assert_eq!(ids(&got), expected);
    for s in &got {
        let id = id_of(&s.record);
        assert_eq!(s.record, record(id, (id as usize * 4_099) % 20_000));
    }
    assert!(spool.stats().segments > 1, "the test should roll segments");
    spool.close();
}

// ---------------------------------------------------------------- torn tails

#[test]
fn a_torn_tail_cut_at_every_byte_of_the_last_record_is_truncated_and_earlier_records_survive() {
    let _gate = gate();
    let t = Template::build();
    let root = tempdir().unwrap();
    let last = t.records.len() - 1;
    let (_, start, end) = t.extent(&t.dir, last);
    assert_eq!(end, file_len(&last_segment(&t.dir)));
    let survivors: Vec<u64> = (0..last as u64).collect();
    for cut in start..end {
        let dir = root.path().join(format!("cut{cut}"));
        t.copy_to(&dir);
        let seg = last_segment(&dir);
        truncate(&seg, cut);

        let spool = Spool::open(&dir, small_segments_always()).unwrap();
        assert_eq!(
            file_len(&seg),
            start,
            "cut at {cut}: torn bytes are truncated"
        );
        let got = read_all(&spool);
        assert_eq!(ids(&got), survivors, "cut at {cut}");
        for (s, r) in got.iter().zip(&t.records) {
            assert_eq!(&s.record, r);
        }
        let stats = spool.stats();
        assert_eq!(
            stats.dropped_corrupt, 0,
            "cut at {cut}: a torn tail is not corruption"
        );
        assert_eq!(stats.records, last as u64);

        let lsn = append(&spool, record(100, 50));
        assert_eq!(
            lsn, t.lsns[last],
            "cut at {cut}: the new record takes the torn one's place"
        );
        let mut want = survivors.clone();
        want.push(100);
        assert_eq!(
            ids(&read_all(&spool)),
            want,
            "cut at {cut}: after appending"
        );
        spool.close();
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_zero_filled_tail_is_truncated_at_open_without_counting_corruption() {
    let _gate = gate();
    let t = Template::build();
    let root = tempdir().unwrap();
    let all: Vec<u64> = (0..t.records.len() as u64).collect();
    let last = t.records.len() - 1;
    let (_, start, end) = t.extent(&t.dir, last);
    // (description, zero bytes appended, zero the last record, records expected back)
    let cases: Vec<(&str, u64, bool, Vec<u64>)> = vec![
        ("1 zero byte", 1, false, all.clone()),
        ("15 zero bytes", 15, false, all.clone()),
        ("16 zero bytes", 16, false, all.clone()),
        ("17 zero bytes", 17, false, all.clone()),
        ("a page of zeros", 4096, false, all.clone()),
        ("the last record zeroed", 0, true, all[..last].to_vec()),
        (
            "the last record zeroed plus a page",
            4096,
            true,
            all[..last].to_vec(),
        ),
    ];
    for (what, extra, zero_last, want) in cases {
        let dir = root.path().join(what.replace(' ', "_"));
        t.copy_to(&dir);
        let seg = last_segment(&dir);
        if zero_last {
            let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.write_all_at(&vec![0u8; (end - start) as usize], start)
                .unwrap();
        }
        append_bytes(&seg, &vec![0u8; extra as usize]);

        let spool = Spool::open(&dir, small_segments_always()).unwrap();
        let kept = if zero_last { start } else { end };
        assert_eq!(file_len(&seg), kept, "{what}: zero fill is truncated");
        assert_eq!(ids(&read_all(&spool)), want, "{what}");
        assert_eq!(spool.stats().dropped_corrupt, 0, "{what}");
        append(&spool, record(100, 10));
        let mut want2 = want.clone();
        want2.push(100);
        assert_eq!(ids(&read_all(&spool)), want2, "{what}: after appending");
        spool.close();
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(ids(&read_all(&spool)), want2, "{what}: after reopening");
        assert_eq!(spool.stats().dropped_corrupt, 0, "{what}");
        spool.close();
    }
}

#[test]
fn without_fsync_always_a_torn_tail_is_counted_as_a_possibly_acknowledged_record() {
    let _gate = gate();
    let t = Template::build();
    let root = tempdir().unwrap();
    let last = t.records.len() - 1;
    let (_, start, end) = t.extent(&t.dir, last);
    let survivors: Vec<u64> = (0..last as u64).collect();
    let policies = [
        FsyncPolicy::Never,
        FsyncPolicy::Interval(Duration::from_millis(100)),
    ];
    for (i, fsync) in policies.into_iter().enumerate() {
        for (what, damage) in [("cut mid-record", 0u64), ("zero-filled", 4096)] {
            let dir = root.path().join(format!("{i}-{what}").replace(' ', "_"));
            t.copy_to(&dir);
            let seg = last_segment(&dir);
            if damage == 0 {
                truncate(&seg, start + (end - start) / 2);
            } else {
                let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
                f.write_all_at(&vec![0u8; (end - start) as usize], start)
                    .unwrap();
                append_bytes(&seg, &vec![0u8; damage as usize]);
            }
            let spool = Spool::open(
                &dir,
                SpoolOptions {
                    fsync,
                    ..small_segments()
                },
            )
            .unwrap();
            assert_eq!(file_len(&seg), start, "{fsync} {what}: truncated");
            assert_eq!(ids(&read_all(&spool)), survivors, "{fsync} {what}");
            assert_eq!(
                spool.stats().dropped_corrupt,
                1,
                "{fsync} {what}: a loss within the fsync interval is counted"
            );
            spool.close();
        }
    }
}

#[test]
fn a_last_segment_cut_inside_its_header_or_with_a_zeroed_header_is_replaced_at_open() {
    let _gate = gate();
    let t = Template::build();
    let root = tempdir().unwrap();
    // Only the records of the first segment are left when the last one is unusable.
    let first_segment: Vec<u64> = (0..5).collect();
    let cases: Vec<(String, Option<u64>)> = (0..SEGMENT_HEADER_LEN)
        .map(|cut| (format!("cut{cut}"), Some(cut)))
        .chain([("zeroed".to_owned(), None)])
        .collect();
    for (what, cut) in cases {
        let dir = root.path().join(&what);
        t.copy_to(&dir);
        let seg = last_segment(&dir);
        match cut {
            Some(cut) => truncate(&seg, cut),
            None => {
                truncate(&seg, 0);
                truncate(&seg, SEGMENT_HEADER_LEN);
            }
        }
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(ids(&read_all(&spool)), first_segment, "{what}");
        append(&spool, record(100, 10));
        let mut want = first_segment.clone();
        want.push(100);
        assert_eq!(ids(&read_all(&spool)), want, "{what}: after appending");
        spool.close();
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(ids(&read_all(&spool)), want, "{what}: after reopening");
        spool.close();
    }
}

#[test]
fn an_empty_segment_followed_by_one_cut_inside_its_header_opens_and_takes_appends() {
    // Found by fuzz/fuzz_targets/spool_recover.rs: recovery refused to start
    // ("cannot create segment …: File exists"): it removed the cut segment and
    // made a new one where the empty segment already was.
    let _gate = gate();
    let root = tempdir().unwrap();
    let dir = root.path().join("spool");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("00000000000000000000.seg"),
        SegmentHeader { base: 0 }.encode(),
    )
    .unwrap();
    fs::write(dir.join("00000000000000000001.seg"), b"NKF").unwrap();
    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert!(read_all(&spool).is_empty());
    append(&spool, record(1, 10));
    append(&spool, record(2, 10));
    assert_eq!(ids(&read_all(&spool)), [1, 2]);
    spool.close();
    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert_eq!(ids(&read_all(&spool)), [1, 2]);
    assert_eq!(spool.stats().dropped_corrupt, 0);
    spool.close();
}

#[test]
fn a_damaged_or_missing_cursor_restarts_delivery_at_the_oldest_segment_and_loses_nothing() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    for damage in ["flipped", "truncated", "removed"] {
        let dir = tmp.path().join(damage);
        let spool = Spool::open(&dir, small_segments()).unwrap();
        for i in 0..10 {
            append(&spool, record(i, 100));
        }
        let got = read_all(&spool);
        spool.ack(got[3].end);
        spool.close();
        let cursor = dir.join("cursor");
        match damage {
            "flipped" => flip_byte(&cursor, 10),
            "truncated" => truncate(&cursor, 7),
            _ => fs::remove_file(&cursor).unwrap(),
        }
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(
            ids(&read_all(&spool)),
            (0..10).collect::<Vec<_>>(),
            "{damage}"
        );
        let got = read_all(&spool);
        spool.ack(got[5].end);
        spool.close();
        // The cursor is written anew and holds again.
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(
            ids(&read_all(&spool)),
            (6..10).collect::<Vec<_>>(),
            "{damage}"
        );
        spool.close();
    }
}

#[test]
fn a_cursor_beyond_the_end_of_the_data_opens_cleanly_and_new_records_are_delivered() {
    let _gate = gate();
    // What a power failure under fsync "never" can leave: the cursor was synced,
    // the records it passed were not.
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let spool = Spool::open(&dir, small_segments()).unwrap();
    for i in 0..20 {
        append(&spool, record(i, 6_000));
    }
    let got = read_all(&spool);
    spool.ack(got.last().unwrap().end);
    spool.close();
    let seg = last_segment(&dir);
    truncate(&seg, SEGMENT_HEADER_LEN);

    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert!(read_all(&spool).is_empty());
    assert_eq!(spool.stats().records, 0);
    let lsn = append(&spool, record(20, 10));
    assert!(lsn >= got.last().unwrap().end, "positions never go back");
    assert_eq!(ids(&read_all(&spool)), [20]);
    spool.close();
    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert_eq!(ids(&read_all(&spool)), [20]);
    spool.close();
}

// ---------------------------------------------------------------- corruption

fn all_but(n: usize, skip: usize) -> Vec<u64> {
    (0..n as u64).filter(|&i| i != skip as u64).collect()
}

#[test]
fn one_flipped_byte_anywhere_in_a_record_costs_that_record_only_and_is_counted() {
    let _gate = gate();
    let t = Template::build();
    let root = tempdir().unwrap();
    let n = t.records.len();
    let mut cases: Vec<(usize, u64)> = Vec::new();
    // Every byte of a middle record and of the last record (both in the last segment).
    for victim in [n - 2, n - 1] {
        let (_, start, end) = t.extent(&t.dir, victim);
        cases.extend((start..end).map(|p| (victim, p)));
    }
    // A sample of bytes of a record in a sealed (not last) segment.
    let (_, start, end) = t.extent(&t.dir, 1);
    cases.extend(
        (start..start + 20)
            .chain([start + 100, start + 7_777, end - 2, end - 1])
            .map(|p| (1, p)),
    );
    for (victim, pos) in cases {
        let dir = root.path().join(format!("flip{victim}_{pos}"));
        t.copy_to(&dir);
        let (seg, _, _) = t.extent(&dir, victim);
        flip_byte(&seg, pos);

        let spool = Spool::open(&dir, small_segments()).unwrap();
        let got = read_all(&spool);
        let what = format!("record {victim}, byte {pos}");
        assert_eq!(ids(&got), all_but(n, victim), "{what}");
        for s in &got {
            assert_eq!(s.record, t.records[id_of(&s.record) as usize], "{what}");
        }
        assert_eq!(spool.stats().dropped_corrupt, 1, "{what}");
        assert_eq!(spool.stats().records, n as u64 - 1, "{what}");
        if victim == n - 1 {
            append(&spool, record(100, 10));
            let mut want = all_but(n, victim);
            want.push(100);
            assert_eq!(ids(&read_all(&spool)), want, "{what}: after appending");
        }
        spool.close();
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_byte_flipped_after_open_is_found_at_read_time_skipped_and_counted() {
    let _gate = gate();
    let t = Template::build();
    let root = tempdir().unwrap();
    let n = t.records.len();
    let mut cases: Vec<(usize, u64)> = Vec::new();
    let (_, start, end) = t.extent(&t.dir, n - 2);
    cases.extend((start..end).map(|p| (n - 2, p)));
    let (_, start, end) = t.extent(&t.dir, n - 1);
    cases
        .extend([start, start + 5, start + 9, start + 13, start + 16, end - 1].map(|p| (n - 1, p)));
    let (_, start, end) = t.extent(&t.dir, 0);
    cases.extend([start, start + 4, start + 8, start + 12, start + 40, end - 1].map(|p| (0, p)));
    for (victim, pos) in cases {
        let what = format!("record {victim}, byte {pos}");
        let dir = root.path().join(format!("flip{victim}_{pos}"));
        t.copy_to(&dir);
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(spool.stats().records, n as u64, "{what}: intact at open");
        let (seg, _, _) = t.extent(&dir, victim);
        flip_byte(&seg, pos);

        let got = read_all(&spool);
        assert_eq!(ids(&got), all_but(n, victim), "{what}");
        assert_eq!(spool.stats().dropped_corrupt, 1, "{what}");
        assert_eq!(spool.stats().records, n as u64 - 1, "{what}");
        // Reading again does not count it twice.
        assert_eq!(ids(&read_all(&spool)), all_but(n, victim), "{what}");
        assert_eq!(spool.stats().dropped_corrupt, 1, "{what}");
        spool.abandon();
        fs::remove_dir_all(&dir).unwrap();
    }
}

// ---------------------------------------------------------------- crashes

#[test]
fn a_crash_between_the_cursor_write_and_the_segment_delete_loses_nothing_and_reopens_cleanly() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let backup = tmp.path().join("backup");
    let n = 40u64;
    let spool = Spool::open(&dir, small_segments()).unwrap();
    let lsns: Vec<u64> = (0..n).map(|i| append(&spool, record(i, 6_000))).collect();
    spool.close();
    let before = segments(&dir);
    assert!(
        before.len() >= 4,
        "need several segments, got {}",
        before.len()
    );
    copy_spool(&dir, &backup);

    // Deliver and acknowledge the first 23 records, then close: the cursor is
    // made durable and the segments wholly behind it are deleted.
    let acked = 23usize;
    let spool = Spool::open(&dir, small_segments()).unwrap();
    let got = read_all(&spool);
    assert_eq!(got.len(), n as usize);
    spool.ack(got[acked - 1].end);
    spool.close();
    let cursor = lsns[acked];
    let deleted: Vec<(u64, PathBuf)> = before
        .iter()
        .filter(|(base, path)| {
            let len = file_len(&backup.join(path.file_name().unwrap()));
            base + len - SEGMENT_HEADER_LEN <= cursor
        })
        .cloned()
        .collect();
    assert!(
        deleted.len() >= 2,
        "the ack should pass at least two segments"
    );
    for (_, path) in &deleted {
        assert!(
            !path.exists(),
            "{} should have been deleted",
            path.display()
        );
    }

    // The crash state: a durable cursor past segments that still exist.
    for (_, path) in &deleted {
        fs::copy(backup.join(path.file_name().unwrap()), path).unwrap();
    }
    let want: Vec<u64> = (acked as u64..n).collect();
    let spool = Spool::open(&dir, small_segments()).unwrap();
    for (_, path) in &deleted {
        assert!(
            !path.exists(),
            "{} should be deleted at open",
            path.display()
        );
    }
    assert_eq!(ids(&read_all(&spool)), want);
    let stats = spool.stats();
    assert_eq!(stats.dropped_corrupt, 0);
    assert_eq!(stats.records, n - acked as u64);
    assert_eq!(stats.segments, (before.len() - deleted.len()) as u64);
    append(&spool, record(n, 100));
    spool.close();

    let mut want = want;
    want.push(n);
    for _ in 0..2 {
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(ids(&read_all(&spool)), want);
        assert_eq!(spool.stats().dropped_corrupt, 0);
        spool.close();
    }
}

#[test]
fn an_abandoned_spool_redelivers_acknowledged_records_whose_cursor_was_not_persisted_and_loses_none()
 {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let mut o = small_segments();
    o.cursor_sync_interval = Duration::from_secs(3600);
    let n = 30u64;
    let spool = Spool::open(&dir, o.clone()).unwrap();
    for i in 0..n {
        append(&spool, record(i, 3_000));
    }
    spool.close();

    // Ack 10, crash before the cursor is written: all 30 come back.
    let spool = Spool::open(&dir, o.clone()).unwrap();
    let got = read_all(&spool);
    spool.ack(got[9].end);
    assert_eq!(ids(&read_all(&spool)), (10..n).collect::<Vec<_>>());
    spool.abandon();
    let spool = Spool::open(&dir, o.clone()).unwrap();
    assert_eq!(ids(&read_all(&spool)), (0..n).collect::<Vec<_>>());

    // Ack 10 and close cleanly: durable. Then ack 12 more, append 2, crash.
    let got = read_all(&spool);
    spool.ack(got[9].end);
    spool.close();
    let spool = Spool::open(&dir, o.clone()).unwrap();
    let got = read_all(&spool);
    assert_eq!(ids(&got), (10..n).collect::<Vec<_>>());
    spool.ack(got[11].end);
    append(&spool, record(n, 10));
    append(&spool, record(n + 1, 10));
    spool.abandon();
    let spool = Spool::open(&dir, o).unwrap();
    assert_eq!(ids(&read_all(&spool)), (10..n + 2).collect::<Vec<_>>());
    assert_eq!(spool.stats().dropped_corrupt, 0);
    spool.close();
}

// ---------------------------------------------------------------- bounds

/// A record whose encoded length is exactly `len`.
fn record_of_len(id: u64, len: u64) -> Record {
    let overhead = record(id, 0).encoded_len();
    let r = record(id, (len - overhead) as usize);
    assert_eq!(r.encoded_len(), len);
    r
}

/// Opens a 1 MiB spool with `when_full` and fills it to exactly 1 MiB with 16 KiB records.
fn full_spool(dir: &Path, when_full: WhenFull) -> (Spool, u64, u64) {
    let mut o = opts(MIB, MIB);
    o.when_full = when_full;
    let spool = Spool::open(dir, o).unwrap();
    let len = 16 << 10;
    let fit = MIB / len;
    assert_eq!(fit * len, MIB);
    for i in 0..fit {
        let r = record_of_len(i, len);
        let res = spool
            .try_reserve(len)
            .map_err(|e| format!("record {i} should fit but was refused: {e}"))
            .unwrap();
        spool.append_blocking(res, r).unwrap();
    }
    let stats = spool.stats();
    assert_eq!(stats.bytes, MIB, "filled to exactly max_size");
    assert_eq!(stats.records, fit);
    (spool, fit, len)
}

#[test]
fn reject_refuses_exactly_the_first_record_past_max_size_and_changes_nothing() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let (spool, fit, len) = full_spool(&tmp.path().join("t"), WhenFull::Reject);
    let before = spool.stats();
    assert_eq!(spool.try_reserve(len).unwrap_err(), Refused::Rejected);
    assert_eq!(spool.try_reserve(1).unwrap_err(), Refused::Rejected);
    assert_eq!(spool.stats(), before);
    assert_eq!(ids(&read_all(&spool)), (0..fit).collect::<Vec<_>>());
    // Acknowledging one record makes room for exactly one more.
    let got = read_all(&spool);
    spool.ack(got[0].end);
    let res = spool.try_reserve(len).unwrap();
    assert_eq!(spool.try_reserve(1).unwrap_err(), Refused::Rejected);
    spool.append_blocking(res, record_of_len(fit, len)).unwrap();
    assert_eq!(ids(&read_all(&spool)), (1..=fit).collect::<Vec<_>>());
    spool.close();
}

#[test]
fn a_lossless_reservation_is_decided_only_when_it_drops_nothing() {
    let _gate = gate();
    for when_full in [WhenFull::DropNewest, WhenFull::DropOldest, WhenFull::Reject] {
        let tmp = tempdir().unwrap();
        let (spool, fit, len) = full_spool(&tmp.path().join("t"), when_full);
        let before = spool.stats();
        let decided = spool.try_reserve_lossless(len);
        if when_full == WhenFull::Reject {
            assert_eq!(decided.unwrap().unwrap_err(), Refused::Rejected);
        } else {
            assert!(
                decided.is_none(),
                "{when_full:?}: decided at the cost of a record"
            );
        }
        assert_eq!(spool.stats(), before, "{when_full:?}: the spool changed");
        assert_eq!(ids(&read_all(&spool)), (0..fit).collect::<Vec<_>>());
        // With room, it reserves like `try_reserve`.
        let got = read_all(&spool);
        spool.ack(got[0].end);
        let res = spool.try_reserve_lossless(len).unwrap().unwrap();
        spool.append_blocking(res, record_of_len(fit, len)).unwrap();
        assert_eq!(ids(&read_all(&spool)), (1..=fit).collect::<Vec<_>>());
        spool.close();
    }
}

#[test]
fn drop_newest_drops_exactly_the_first_record_past_max_size_and_counts_it() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let (spool, fit, len) = full_spool(&tmp.path().join("t"), WhenFull::DropNewest);
    assert_eq!(spool.stats().dropped_newest, 0);
    assert_eq!(spool.try_reserve(len).unwrap_err(), Refused::Dropped);
    assert_eq!(spool.stats().dropped_newest, 1);
    assert_eq!(spool.try_reserve(1).unwrap_err(), Refused::Dropped);
    let stats = spool.stats();
    assert_eq!(stats.dropped_newest, 2);
    assert_eq!(stats.dropped_full, 0);
    assert_eq!(stats.records, fit);
    assert_eq!(stats.bytes, MIB);
    assert_eq!(ids(&read_all(&spool)), (0..fit).collect::<Vec<_>>());
    spool.close();
}

#[test]
fn drop_oldest_evicts_the_oldest_records_to_make_room_and_counts_them() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let (spool, fit, len) = full_spool(&dir, WhenFull::DropOldest);
    let res = spool.try_reserve(len).unwrap();
    assert_eq!(spool.stats().dropped_full, 1);
    spool.append_blocking(res, record_of_len(fit, len)).unwrap();
    assert_eq!(ids(&read_all(&spool)), (1..=fit).collect::<Vec<_>>());

    // A reservation three records long evicts three more.
    let res = spool.try_reserve(3 * len).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.dropped_full, 4);
    assert_eq!(stats.records, fit - 3);
    assert_eq!(stats.bytes + stats.reserved_bytes, MIB);
    spool
        .append_blocking(res, record_of_len(fit + 1, 3 * len))
        .unwrap();
    let mut want: Vec<u64> = (4..=fit).collect();
    want.push(fit + 1);
    let got = read_all(&spool);
    assert_eq!(ids(&got), want);
    assert_eq!(got.last().unwrap().record.encoded_len(), 3 * len);
    assert_eq!(spool.stats().bytes, MIB);
    spool.close();

    // The evictions are durable: a reopen starts after them.
    let mut o = opts(MIB, MIB);
    o.when_full = WhenFull::DropOldest;
    let spool = Spool::open(&dir, o).unwrap();
    assert_eq!(ids(&read_all(&spool)), want);
    spool.close();
}

#[test]
fn reservations_count_against_max_size_until_appended_or_dropped() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let spool = Spool::open(tmp.path().join("t"), opts(MIB, MIB)).unwrap();
    let big = spool.try_reserve(MIB - 100).unwrap();
    assert_eq!(big.bytes(), MIB - 100);
    assert_eq!(spool.stats().reserved_bytes, MIB - 100);
    assert_eq!(spool.try_reserve(101).unwrap_err(), Refused::Rejected);
    let small = spool.try_reserve(100).unwrap();
    assert_eq!(spool.try_reserve(1).unwrap_err(), Refused::Rejected);
    drop(big);
    assert_eq!(spool.stats().reserved_bytes, 100);
    let big = spool.try_reserve(MIB - 100).unwrap();
    assert_eq!(spool.try_reserve(1).unwrap_err(), Refused::Rejected);
    drop(big);
    drop(small);
    assert_eq!(spool.stats().reserved_bytes, 0);

    // Appending turns the reservation into stored bytes.
    let rec = record(1, 1_000);
    let len = rec.encoded_len();
    let res = spool.try_reserve(len).unwrap();
    spool.append_blocking(res, rec).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.reserved_bytes, 0);
    assert_eq!(stats.bytes, len);
    assert!(spool.try_reserve(MIB - len + 1).is_err());
    let _exact = spool.try_reserve(MIB - len).unwrap();
    spool.close();
}

#[test]
fn reserve_overcommit_always_succeeds_even_when_the_spool_is_full() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    for when_full in [WhenFull::Reject, WhenFull::DropNewest] {
        let (spool, fit, len) = full_spool(&tmp.path().join(when_full.to_string()), when_full);
        assert!(spool.try_reserve(len).is_err());
        let res = spool.reserve_overcommit(len);
        assert_eq!(res.bytes(), len);
        let more = spool.reserve_overcommit(MIB);
        assert_eq!(spool.stats().reserved_bytes, MIB + len);
        drop(more);
        spool.append_blocking(res, record_of_len(fit, len)).unwrap();
        let stats = spool.stats();
        assert_eq!(stats.bytes, MIB + len, "{when_full}: overcommitted");
        assert_eq!(stats.dropped_full, 0);
        assert_eq!(ids(&read_all(&spool)), (0..=fit).collect::<Vec<_>>());
        spool.close();
    }
}

// ---------------------------------------------------------------- locking

const CHILD_DIR_ENV: &str = "FORKD_TEST_SPOOL_DIR";
const CHILD_TEST: &str =
    "child_process_probe_opens_the_spool_in_the_directory_given_by_the_environment";
const CHILD_LOCKED: i32 = 42;
const CHILD_OPENED: i32 = 43;
const CHILD_OTHER_ERROR: i32 = 44;

/// Run by the test below in a child process; does nothing in a normal run.
#[test]
#[ignore = "run in a child process by a_second_process_opening_the_same_directory_is_refused_with_an_error_naming_it"]
fn child_process_probe_opens_the_spool_in_the_directory_given_by_the_environment() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    match Spool::open(&dir, small_segments()) {
        Err(e @ SpoolError::Locked { .. }) => {
            println!("CHILD-ERROR: {e}");
            std::process::exit(CHILD_LOCKED);
        }
        Err(e) => {
            println!("CHILD-ERROR: {e}");
            std::process::exit(CHILD_OTHER_ERROR);
        }
        Ok(spool) => {
            println!("CHILD-OPENED: {} records", spool.stats().records);
            spool.close();
            std::process::exit(CHILD_OPENED);
        }
    }
}

fn run_child(dir: &Path) -> (Option<i32>, String) {
    let out = run(Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CHILD_TEST, "--nocapture", "--include-ignored"])
        .env(CHILD_DIR_ENV, dir))
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn a_second_process_opening_the_same_directory_is_refused_with_an_error_naming_it() {
    let _spawner = spawner();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("target-a");
    let spool = Spool::open(&dir, small_segments()).unwrap();
    append(&spool, record(1, 10));

    let (code, text) = run_child(&dir);
    assert_eq!(code, Some(CHILD_LOCKED), "child output: {text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("CHILD-ERROR: "))
        .unwrap();
    assert!(line.contains(&dir.display().to_string()), "{line}");
    assert!(line.contains("in use by another process"), "{line}");
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "the error names the holder: {line}"
    );
    // The refused child changed nothing.
    assert_eq!(ids(&read_all(&spool)), [1]);
    spool.close();

    let (code, text) = run_child(&dir);
    assert_eq!(code, Some(CHILD_OPENED), "child output: {text}");
    assert!(text.contains("CHILD-OPENED: 1 records"), "{text}");
}

#[test]
fn a_second_open_in_the_same_process_is_refused_until_the_first_is_closed() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let first = Spool::open(&dir, small_segments()).unwrap();
    let clone = first.clone();
    let err = Spool::open(&dir, small_segments()).unwrap_err();
    assert!(
        matches!(&err, SpoolError::Locked { dir: d, .. } if d == &dir),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert_eq!(msg.lines().count(), 1);
    // A clone still holds it.
    drop(first);
    assert!(matches!(
        Spool::open(&dir, small_segments()),
        Err(SpoolError::Locked { .. })
    ));
    let reader = clone.reader();
    clone.close();
    // A reader left over does not hold the lock.
    let again = Spool::open(&dir, small_segments()).unwrap();
    drop(reader);
    again.close();
}

// ---------------------------------------------------------------- full disk

/// A tmpfs mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path))
        .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Tmpfs(path.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = run(Command::new("umount").arg(&self.0)).is_ok_and(|o| o.status.success());
        if !ok {
            let _ = run(Command::new("umount").arg("-l").arg(&self.0));
        }
    }
}

fn fill_disk_and_recover(mnt: &Path, segment_size: u64) {
    let what = format!("segment_size {segment_size}");
    let filler = mnt.join("filler");
    fs::write(&filler, vec![7u8; (1536 << 10) as usize]).unwrap();
    let dir = mnt.join("spool");
    let mut o = opts(1 << 30, segment_size);
    o.fsync = FsyncPolicy::Always;
    let spool = Spool::open(&dir, o.clone()).unwrap();

    let mut stored = Vec::new();
    let mut error = None;
    for i in 0..1_000u64 {
        let rec = record(i, 4_000);
        let res = spool.try_reserve(rec.encoded_len()).unwrap();
        match spool.append_blocking(res, rec) {
            Ok(_) => stored.push(i),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.expect("the disk never filled up");
    assert!(error.is_storage_full(), "{what}: {error}");
    assert!(
        !stored.is_empty(),
        "{what}: some records fit before the disk filled"
    );
    let stats = spool.stats();
    let write_error = stats
        .write_error
        .expect("the write error is reported in stats");
    assert!(
        write_error.contains(&dir.display().to_string()),
        "{what}: {write_error}"
    );
    // Failed appends neither count as stored nor hold room under max_size.
    assert_eq!(stats.records, stored.len() as u64, "{what}");
    assert_eq!(
        stats.bytes,
        stored.len() as u64 * record(0, 4_000).encoded_len(),
        "{what}"
    );
    assert_eq!(stats.reserved_bytes, 0, "{what}");
    // Still full: the next append fails the same way.
    let rec = record(5_000, 4_000);
    let res = spool.try_reserve(rec.encoded_len()).unwrap();
    let again = spool.append_blocking(res, rec).unwrap_err();
    assert!(again.is_storage_full(), "{what}: {again}");
    assert_eq!(ids(&read_all(&spool)), stored, "{what}: while full");

    // Free space: appends work again and clear the error.
    fs::remove_file(&filler).unwrap();
    for i in 10_000..10_020u64 {
        append(&spool, record(i, 4_000));
        stored.push(i);
    }
    assert_eq!(spool.stats().write_error, None, "{what}");
    assert_eq!(ids(&read_all(&spool)), stored, "{what}: after recovery");
    spool.close();

    let spool = Spool::open(&dir, o).unwrap();
    assert_eq!(ids(&read_all(&spool)), stored, "{what}: after reopening");
    assert_eq!(spool.stats().dropped_corrupt, 0, "{what}");
    spool.close();
    fs::remove_dir_all(&dir).unwrap();
}

/// With `FORKD_REQUIRE_PRIVILEGED_TESTS=1` (`.ci/run`, as root) a test that
/// cannot mount its tmpfs fails instead of skipping.
fn skip_unless_privileged_tests_optional(why: &str) {
    assert!(
        !std::env::var("FORKD_REQUIRE_PRIVILEGED_TESTS").is_ok_and(|v| v.trim() == "1"),
        "FORKD_REQUIRE_PRIVILEGED_TESTS=1 and a tmpfs cannot be mounted: {why}"
    );
}

#[test]
fn a_full_disk_fails_appends_with_a_storage_full_error_and_the_spool_recovers_when_space_returns() {
    let _spawner = spawner();
    let tmp = tempdir().unwrap();
    for (i, segment_size) in [64 * MIB, MIN_SEGMENT_SIZE].into_iter().enumerate() {
        let mnt = tmp.path().join(format!("mnt{i}"));
        let _guard = match Tmpfs::mount(&mnt, "2m") {
            Ok(g) => g,
            Err(why) => {
                skip_unless_privileged_tests_optional(&why);
                eprintln!(
                    "SKIPPED a_full_disk_fails_appends...: cannot mount a tmpfs (needs root): {why}"
                );
                return;
            }
        };
        fill_disk_and_recover(&mnt, segment_size);
    }
}

/// Writes `path` until the file system is full.
fn fill_file_system(path: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![7u8; 4096];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            return;
        }
    }
}

#[test]
fn a_full_disk_when_a_new_segment_is_needed_fails_the_append_and_reports_the_write_error() {
    let _spawner = spawner();
    let tmp = tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let _guard = match Tmpfs::mount(&mnt, "1m") {
        Ok(g) => g,
        Err(why) => {
            skip_unless_privileged_tests_optional(&why);
            eprintln!(
                "SKIPPED a_full_disk_when_a_new_segment...: cannot mount a tmpfs (needs root): {why}"
            );
            return;
        }
    };
    let dir = mnt.join("spool");
    let o = small_segments();
    let spool = Spool::open(&dir, o.clone()).unwrap();
    // Fill the first segment exactly, then the disk: the next record needs a
    // new segment file and there is no room for it.
    let first = record_of_len(0, MIN_SEGMENT_SIZE / 2);
    let second = record_of_len(1, MIN_SEGMENT_SIZE / 2);
    append(&spool, first);
    append(&spool, second);
    assert_eq!(spool.stats().segments, 1);
    let filler = mnt.join("filler");
    fill_file_system(&filler);

    let rec = record(2, 100);
    let res = spool.try_reserve(rec.encoded_len()).unwrap();
    let err = spool.append_blocking(res, rec).unwrap_err();
    assert!(err.is_storage_full(), "{err}");
    let stats = spool.stats();
    assert!(
        stats.write_error.is_some(),
        "the failure is reported: {stats:?}"
    );
    assert_eq!(stats.records, 2);
    assert_eq!(stats.bytes, MIN_SEGMENT_SIZE);
    assert_eq!(ids(&read_all(&spool)), [0, 1]);

    fs::remove_file(&filler).unwrap();
    append(&spool, record(3, 100));
    let stats = spool.stats();
    assert_eq!(stats.write_error, None);
    assert_eq!(stats.segments, 2);
    assert_eq!(ids(&read_all(&spool)), [0, 1, 3]);
    spool.close();
    let spool = Spool::open(&dir, o).unwrap();
    assert_eq!(ids(&read_all(&spool)), [0, 1, 3]);
    assert_eq!(spool.stats().dropped_corrupt, 0);
    spool.close();
}

// ---------------------------------------------------------------- model-based property test

#[derive(Debug, Clone)]
enum CrashTail {
    Nothing,
    Garbage(Vec<u8>),
    /// A prefix (this many bytes, modulo the frame length) of a valid frame.
    FramePrefix(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Append { n: usize, body: usize },
    ReadAck { read: usize, ack: usize },
    Reopen,
    Crash(CrashTail),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let body = prop_oneof![0usize..200, 4_000usize..24_000];
    let tail = prop_oneof![
        Just(CrashTail::Nothing),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(CrashTail::Garbage),
        (0usize..4096).prop_map(CrashTail::FramePrefix),
    ];
    prop_oneof![
        4 => (1usize..6, body).prop_map(|(n, body)| Op::Append { n, body }),
        3 => (0usize..10, 0usize..10).prop_map(|(read, ack)| Op::ReadAck { read, ack }),
        1 => Just(Op::Reopen),
        1 => tail.prop_map(Op::Crash),
    ]
}

/// Checks that `s` is `history[start..]` for a `start` in `lo..=hi`; returns `start`.
fn check_suffix(
    s: &[Spooled],
    history: &[Record],
    lo: usize,
    hi: usize,
) -> Result<usize, TestCaseError> {
    prop_assert!(s.len() <= history.len(), "more records than were appended");
    let start = history.len() - s.len();
    prop_assert!(
        (lo..=hi).contains(&start),
        "delivery starts at record {start}, expected {lo}..={hi} (ids {:?})",
        ids(s)
    );
    for (got, want) in s.iter().zip(&history[start..]) {
        prop_assert_eq!(&got.record, want, "a record was changed, invented or moved");
    }
    prop_assert!(s.windows(2).all(|w| w[0].end <= w[1].lsn));
    Ok(start)
}

fn check_stats(spool: &Spool, history: &[Record], acked: usize) -> Result<(), TestCaseError> {
    let stats = spool.stats();
    prop_assert_eq!(stats.records, (history.len() - acked) as u64);
    prop_assert_eq!(
        stats.bytes,
        history[acked..]
            .iter()
            .map(Record::encoded_len)
            .sum::<u64>()
    );
    Ok(())
}

fn run_model(ops: Vec<Op>, persist_cursor_at_once: bool) -> Result<(), TestCaseError> {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let mut o = small_segments();
    // Either the cursor is written right after every ack (racing the crash) or
    // only at a clean close.
    o.cursor_sync_interval = if persist_cursor_at_once {
        Duration::ZERO
    } else {
        Duration::from_secs(3600)
    };
    let mut spool = Spool::open(&dir, o.clone()).unwrap();
    let mut history: Vec<Record> = Vec::new();
    // Records before `acked` are acknowledged in this session.
    let mut acked = 0usize;
    // Records before `floor` are known to be behind a durable cursor.
    let mut floor = 0usize;
    for op in ops {
        match op {
            Op::Append { n, body } => {
                for _ in 0..n {
                    let rec = record(history.len() as u64, body);
                    append(&spool, rec.clone());
                    history.push(rec);
                }
            }
            Op::ReadAck { read, ack } => {
                let mut reader = spool.reader();
                let mut got = Vec::new();
                while got.len() < read {
                    let batch = reader.read_batch(read - got.len(), 4 * MIB).unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    got.extend(batch);
                }
                prop_assert_eq!(got.len(), read.min(history.len() - acked));
                for (g, want) in got.iter().zip(&history[acked..]) {
                    prop_assert_eq!(&g.record, want);
                }
                let ack = ack.min(got.len());
                if ack > 0 {
                    spool.ack(got[ack - 1].end);
                    acked += ack;
                }
            }
            Op::Reopen => {
                spool.close();
                spool = Spool::open(&dir, o.clone()).unwrap();
                let s = read_all(&spool);
                check_suffix(&s, &history, acked, acked)?;
                prop_assert_eq!(spool.stats().dropped_corrupt, 0);
                floor = acked;
            }
            Op::Crash(tail) => {
                spool.abandon();
                let seg = last_segment(&dir);
                // (garbage appended, an incomplete frame appended)
                let (garbage, torn) = match &tail {
                    CrashTail::Nothing => (false, false),
                    CrashTail::Garbage(bytes) => {
                        append_bytes(&seg, bytes);
                        (true, false)
                    }
                    CrashTail::FramePrefix(len) => {
                        let mut frame = Vec::new();
                        record(999_999, 300).encode_into(&mut frame);
                        append_bytes(&seg, &frame[..len % frame.len()]);
                        (false, len % frame.len() > 0)
                    }
                };
                spool = Spool::open(&dir, o.clone()).unwrap();
                let s = read_all(&spool);
                let start = check_suffix(&s, &history, floor, acked)?;
                let corrupt = spool.stats().dropped_corrupt;
                if garbage {
                    prop_assert!(corrupt <= 1, "garbage tail counted {} times", corrupt);
                } else if torn {
                    // Under fsync "never" an incomplete frame at the tail may
                    // be an acknowledged record cut by a power loss: counted.
                    prop_assert_eq!(corrupt, 1);
                } else {
                    prop_assert_eq!(corrupt, 0);
                }
                // What was re-delivered is unacknowledged again.
                acked = start;
                floor = start;
            }
        }
        check_stats(&spool, &history, acked)?;
    }
    spool.close();
    let spool = Spool::open(&dir, o).unwrap();
    check_suffix(&read_all(&spool), &history, acked, acked)?;
    spool.close();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    // fsync "never" is enough here: `abandon` stops the process's writer the way
    // a process crash does, and the page cache survives a process crash. What
    // the test exercises is the cursor and segment logic, not power loss.
    #[test]
    fn a_random_sequence_of_appends_acks_reopens_and_crashes_never_loses_invents_or_reorders_records(
        ops in proptest::collection::vec(op_strategy(), 1..40),
        persist_cursor_at_once in any::<bool>(),
    ) {
        run_model(ops, persist_cursor_at_once)?;
    }
}

// ---------------------------------------------------------------- files, stats, damage

#[test]
fn spool_files_are_private_to_the_owner() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let buffer = tmp.path().join("buffer");
    let dir = buffer.join("target");
    let spool = Spool::open(&dir, small_segments()).unwrap();
    for i in 0..20 {
        append(&spool, record(i, 6_000));
    }
    spool.reject(&record(99, 10)).unwrap();
    let got = read_all(&spool);
    spool.ack(got[0].end);
    spool.close();

    assert_eq!(mode(&buffer), 0o700, "parent created by the spool");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("rejected")), 0o700);
    let mut files = vec![dir.join("lock"), dir.join("cursor")];
    files.extend(segments(&dir).into_iter().map(|(_, p)| p));
    let rejected: Vec<PathBuf> = fs::read_dir(dir.join("rejected"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(rejected.len(), 1);
    files.extend(rejected);
    assert!(files.len() >= 5);
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }

    // An existing directory that is too open is tightened.
    let loose = tmp.path().join("loose");
    fs::create_dir(&loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
    Spool::open(&loose, small_segments()).unwrap().close();
    assert_eq!(mode(&loose), 0o700);
}

fn rejected_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir.join("rejected"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_rejected_area_is_bounded_and_evicts_its_oldest_records_first() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let len = record(0, 500).encoded_len() + SEGMENT_HEADER_LEN;
    let mut o = small_segments();
    o.rejected_max_size = 3 * len;
    let spool = Spool::open(&dir, o.clone()).unwrap();
    for i in 0..5 {
        spool.reject(&record(i, 500)).unwrap();
    }
    let stats = spool.stats().rejected;
    assert_eq!(stats.records, 3);
    assert_eq!(stats.bytes, 3 * len);
    assert_eq!(stats.evicted, 2);
    let files = rejected_files(&dir);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "00000000000000000002.rec",
            "00000000000000000003.rec",
            "00000000000000000004.rec"
        ]
    );
    for (i, bytes) in files.values().enumerate() {
        let id = record(i as u64 + 2, 0).request_id;
        assert!(contains(bytes, id.as_bytes()), "file {i} holds record {id}");
        assert_eq!(bytes.len() as u64, len);
    }
    // A record larger than the whole area is not kept and evicts nothing.
    spool.reject(&record(50, 5_000)).unwrap();
    assert_eq!(rejected_files(&dir).len(), 3);
    assert_eq!(spool.stats().rejected.records, 3);
    // Rejected records are not part of the log.
    assert!(read_all(&spool).is_empty());
    spool.close();

    let spool = Spool::open(&dir, o).unwrap();
    assert_eq!(spool.stats().rejected.records, 3);
    spool.reject(&record(6, 500)).unwrap();
    let files = rejected_files(&dir);
    let first = files.keys().next().unwrap().clone();
    let last = files.keys().next_back().unwrap().clone();
    assert_eq!(files.len(), 3);
    assert_eq!(first, "00000000000000000003.rec");
    assert!(last.as_str() > "00000000000000000004.rec");
    assert!(contains(&files[&last], record(6, 0).request_id.as_bytes()));
    spool.close();
}

#[test]
fn a_record_larger_than_a_segment_is_stored_read_back_and_survives_a_reopen() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let o = small_segments();
    assert_eq!(o.effective_segment_size(), MIN_SEGMENT_SIZE);
    let spool = Spool::open(&dir, o.clone()).unwrap();
    let records = [
        record(0, 100),
        record(1, 200_000),
        record(2, 100),
        record(3, 300_000),
    ];
    assert!(records[1].encoded_len() > MIN_SEGMENT_SIZE);
    for r in &records {
        append(&spool, r.clone());
    }
    let got: Vec<Record> = read_all(&spool).into_iter().map(|s| s.record).collect();
    assert_eq!(got, records);
    assert_eq!(
        spool.stats().segments,
        4,
        "each large record gets a segment of its own"
    );
    spool.close();
    let spool = Spool::open(&dir, o.clone()).unwrap();
    let got = read_all(&spool);
    assert_eq!(
        got.iter().map(|s| s.record.clone()).collect::<Vec<_>>(),
        records
    );
    assert_eq!(spool.stats().dropped_corrupt, 0);
    // Reading one at a time with a small byte budget still returns the large ones.
    let mut reader = spool.reader();
    for want in &records {
        let batch = reader.read_batch(10, 1).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(&batch[0].record, want);
    }
    spool.ack(got.last().unwrap().end);
    spool.close();
    let spool = Spool::open(&dir, o).unwrap();
    assert!(read_all(&spool).is_empty());
    assert_eq!(spool.stats().segments, 1, "delivered segments are deleted");
    spool.close();
}

#[test]
fn stats_count_records_bytes_with_framing_oldest_time_and_segments() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let o = small_segments();
    let spool = Spool::open(&dir, o.clone()).unwrap();
    let empty = spool.stats();
    assert_eq!(empty.records, 0);
    assert_eq!(empty.bytes, 0);
    assert_eq!(empty.oldest_accepted_at, None);
    assert_eq!(empty.segments, 1);
    assert_eq!(empty.write_error, None);

    let records: Vec<Record> = (0..12).map(|i| record(i, 10_000)).collect();
    for r in &records {
        append(&spool, r.clone());
    }
    let len = records[0].encoded_len();
    let per_segment = MIN_SEGMENT_SIZE / len;
    let want_segments = 12u64.div_ceil(per_segment);
    let near = |t: Option<SystemTime>, r: &Record| {
        let t = t.unwrap();
        t <= r.accepted_at && r.accepted_at.duration_since(t).unwrap() < Duration::from_secs(1)
    };
    let stats = spool.stats();
    assert_eq!(stats.records, 12);
    assert_eq!(
        stats.bytes,
        records.iter().map(Record::encoded_len).sum::<u64>()
    );
    assert_eq!(stats.bytes, 12 * len);
    assert_eq!(stats.reserved_bytes, 0);
    assert_eq!(stats.segments, want_segments);
    assert_eq!(
        fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg"))
            .count() as u64,
        want_segments
    );
    assert!(near(stats.oldest_accepted_at, &records[0]), "{stats:?}");

    let got = read_all(&spool);
    spool.ack(got[2].end);
    let stats = spool.stats();
    assert_eq!(stats.records, 9);
    assert_eq!(stats.bytes, 9 * len);
    assert!(near(stats.oldest_accepted_at, &records[3]), "{stats:?}");
    spool.close();

    let spool = Spool::open(&dir, o.clone()).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.records, 9);
    assert_eq!(stats.bytes, 9 * len);
    assert_eq!(stats.segments, want_segments);
    assert!(near(stats.oldest_accepted_at, &records[3]), "{stats:?}");
    let got = read_all(&spool);
    spool.ack(got.last().unwrap().end);
    spool.close();

    let spool = Spool::open(&dir, o).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.records, 0);
    assert_eq!(stats.bytes, 0);
    assert_eq!(stats.oldest_accepted_at, None);
    assert_eq!(stats.segments, 1);
    spool.close();
}

/// A closed spool of several segments; returns the segments and record positions.
fn several_segments(dir: &Path, n: u64) -> (Vec<(u64, PathBuf)>, Vec<u64>) {
    let spool = Spool::open(dir, small_segments()).unwrap();
    let lsns = (0..n).map(|i| append(&spool, record(i, 6_000))).collect();
    spool.close();
    let segs = segments(dir);
    assert!(segs.len() >= 4, "need several segments, got {}", segs.len());
    (segs, lsns)
}

/// Ids of the records in segment `k` of `segs`.
fn ids_in_segment(segs: &[(u64, PathBuf)], lsns: &[u64], k: usize) -> Vec<u64> {
    let lo = segs[k].0;
    let hi = segs.get(k + 1).map_or(u64::MAX, |s| s.0);
    (0..lsns.len() as u64)
        .filter(|&i| (lo..hi).contains(&lsns[i as usize]))
        .collect()
}

#[test]
fn a_missing_middle_segment_is_skipped_and_the_other_segments_are_delivered() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let n = 40;
    let (segs, lsns) = several_segments(&dir, n);
    let lost = ids_in_segment(&segs, &lsns, 1);
    assert!(!lost.is_empty());
    fs::remove_file(&segs[1].1).unwrap();

    let want: Vec<u64> = (0..n).filter(|i| !lost.contains(i)).collect();
    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert_eq!(ids(&read_all(&spool)), want);
    assert_eq!(spool.stats().records, want.len() as u64);
    append(&spool, record(n, 10));
    spool.close();
    let spool = Spool::open(&dir, small_segments()).unwrap();
    let mut want = want;
    want.push(n);
    assert_eq!(ids(&read_all(&spool)), want);
    spool.close();
}

#[test]
fn a_segment_with_a_damaged_header_is_skipped_and_the_other_segments_are_delivered() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let n = 40;
    for (victim, byte) in [(1usize, 0u64), (2, 17), (usize::MAX, 29)] {
        let dir = tmp.path().join(format!("t{victim}_{byte}"));
        let (segs, lsns) = several_segments(&dir, n);
        let victim = victim.min(segs.len() - 1);
        let lost = ids_in_segment(&segs, &lsns, victim);
        assert!(!lost.is_empty());
        flip_byte(&segs[victim].1, byte);

        let want: Vec<u64> = (0..n).filter(|i| !lost.contains(i)).collect();
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(
            ids(&read_all(&spool)),
            want,
            "segment {victim}, byte {byte}"
        );
        append(&spool, record(n, 10));
        let mut want = want;
        want.push(n);
        assert_eq!(
            ids(&read_all(&spool)),
            want,
            "segment {victim}, byte {byte}"
        );
        spool.close();
        let spool = Spool::open(&dir, small_segments()).unwrap();
        assert_eq!(
            ids(&read_all(&spool)),
            want,
            "segment {victim}, byte {byte}: reopened"
        );
        spool.close();
    }
}

#[test]
fn leftover_temp_files_are_removed_at_open() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let spool = Spool::open(&dir, small_segments()).unwrap();
    append(&spool, record(0, 10));
    append(&spool, record(1, 10));
    spool.close();
    let temps = [
        dir.join("cursor.tmp"),
        dir.join("00000000000000000000.seg.tmp"),
        dir.join("rejected").join("00000000000000000003.rec.tmp"),
    ];
    for t in &temps {
        fs::write(t, b"half-written").unwrap();
    }
    let keep = dir.join("unrelated.txt");
    fs::write(&keep, b"not ours").unwrap();

    let spool = Spool::open(&dir, small_segments()).unwrap();
    for t in &temps {
        assert!(!t.exists(), "{} should be removed", t.display());
    }
    assert!(keep.exists(), "files the spool does not own are left alone");
    assert_eq!(ids(&read_all(&spool)), [0, 1]);
    assert_eq!(spool.stats().rejected.records, 0);
    spool.close();
}

// ---------------------------------------------------------------- async

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::await_holding_lock,
    reason = "the gate guards no data; it only keeps process spawns out of this test"
)]
async fn concurrent_async_appends_from_many_tasks_all_complete_and_are_read_back_exactly_once() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let mut o = small_segments();
    o.fsync = FsyncPolicy::Always;
    let spool = Spool::open(tmp.path().join("t"), o).unwrap();
    let (tasks, per_task) = (16u64, 20u64);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let spool = spool.clone();
        handles.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for j in 0..per_task {
                let rec = record(t * 1_000 + j, ((t * 7 + j * 13) % 50) as usize * 100);
                let res = spool.try_reserve(rec.encoded_len()).unwrap();
                pending.push((rec.clone(), spool.append(res, rec)));
                if j % 4 == 3 {
                    tokio::task::yield_now().await;
                }
            }
            let mut done = Vec::new();
            for (rec, fut) in pending {
                done.push((rec, fut.await.unwrap()));
            }
            done
        }));
    }
    let mut appended = BTreeMap::new();
    for h in handles {
        let done = h.await.unwrap();
        assert!(
            done.windows(2).all(|w| w[0].1 < w[1].1),
            "one task's appends keep their order"
        );
        for (rec, lsn) in done {
            assert!(appended.insert(id_of(&rec), (rec, lsn)).is_none());
        }
    }
    assert_eq!(appended.len() as u64, tasks * per_task);

    let got = read_all(&spool);
    assert_eq!(got.len() as u64, tasks * per_task);
    let mut seen = HashSet::new();
    for s in &got {
        let id = id_of(&s.record);
        assert!(seen.insert(id), "record {id} read twice");
        let (rec, lsn) = &appended[&id];
        assert_eq!(&s.record, rec);
        assert_eq!(s.lsn, *lsn);
    }
    assert!(got.windows(2).all(|w| w[0].end <= w[1].lsn));
    assert_eq!(spool.stats().records, tasks * per_task);
    // Under `always` a separate syncer thread pipelines the fsyncs only when
    // the process may use more than one CPU.
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(
        thread_names().iter().any(|n| n == "forkd-spool-syn"),
        cpus > 1,
        "syncer thread with {cpus} CPU(s)"
    );
    spool.close();
}

/// Names of this process's threads (as the kernel keeps them: 15 bytes).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_owned())
        .collect()
}

#[test]
fn on_a_single_cpu_synced_appends_are_made_durable_by_the_writer_itself_and_all_complete() {
    let _one = spawner();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let first_cpu: String = allowed.chars().take_while(char::is_ascii_digit).collect();
    let test =
        "concurrent_async_appends_from_many_tasks_all_complete_and_are_read_back_exactly_once";
    let out = run(Command::new("taskset")
        .args(["-c", &first_cpu])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"]))
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
fn a_reader_that_has_read_everything_waits_for_new_data_even_after_a_skipped_damaged_record() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let spool = Spool::open(&dir, small_segments()).unwrap();
    let lsns: Vec<u64> = (0..3).map(|i| append(&spool, record(i, 100))).collect();
    spool.close();
    // Damage the payload of the last record: the frame stays whole, the record is skipped.
    let (seg, offset) = locate(&dir, lsns[2]);
    flip_byte(&seg, offset + 40);

    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert_eq!(spool.stats().dropped_corrupt, 1);
    let mut reader = spool.reader();
    assert_eq!(ids(&reader.read_batch(10, MIB).unwrap()), [0, 1]);
    assert!(reader.read_batch(10, MIB).unwrap().is_empty());
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    {
        let mut wait = std::pin::pin!(reader.wait());
        assert!(
            poll_once(wait.as_mut(), &waker).is_pending(),
            "nothing is readable: wait must not return (a delivery loop would spin)"
        );
        append(&spool, record(3, 100));
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(poll_once(wait.as_mut(), &waker).is_ready());
    }
    assert_eq!(ids(&reader.read_batch(10, MIB).unwrap()), [3]);
    spool.close();
}

#[test]
fn fsync_policies_parse_and_a_spool_under_each_policy_round_trips() {
    let _gate = gate();
    assert_eq!("always".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Always));
    assert_eq!("never".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Never));
    assert_eq!(
        "250ms".parse::<FsyncPolicy>(),
        Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
    );
    assert!("0s".parse::<FsyncPolicy>().is_err());
    assert!("sometimes".parse::<FsyncPolicy>().is_err());
    for p in [
        FsyncPolicy::Always,
        FsyncPolicy::Never,
        FsyncPolicy::Interval(Duration::from_millis(5)),
    ] {
        assert_eq!(p.to_string().parse::<FsyncPolicy>(), Ok(p));
        let tmp = tempdir().unwrap();
        let mut o = small_segments();
        o.fsync = p;
        let spool = Spool::open(tmp.path().join("t"), o.clone()).unwrap();
        for i in 0..20 {
            append(&spool, record(i, 5_000));
        }
        spool.close();
        let spool = Spool::open(tmp.path().join("t"), o).unwrap();
        assert_eq!(ids(&read_all(&spool)), (0..20).collect::<Vec<_>>(), "{p}");
        spool.close();
    }
}

#[test]
fn a_reader_rewinds_to_the_oldest_unacknowledged_record() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let spool = Spool::open(tmp.path().join("t"), small_segments()).unwrap();
    for i in 0..6 {
        append(&spool, record(i, 100));
    }
    let mut reader = spool.reader();
    let first = reader.read_batch(4, MIB).unwrap();
    assert_eq!(ids(&first), [0, 1, 2, 3]);
    assert_eq!(reader.position(), first[3].end);
    reader.rewind();
    assert_eq!(ids(&reader.read_batch(2, MIB).unwrap()), [0, 1]);
    spool.ack(first[1].end);
    reader.rewind();
    assert_eq!(ids(&reader.read_batch(10, MIB).unwrap()), [2, 3, 4, 5]);
    // An acknowledgement past the read position moves the reader on.
    let mut behind = spool.reader();
    spool.ack(first[3].end);
    assert_eq!(ids(&behind.read_batch(10, MIB).unwrap()), [4, 5]);
    spool.close();
}

#[test]
fn appending_through_a_clone_after_close_fails_with_closed_instead_of_hanging() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let dir = tmp.path().join("t");
    let spool = Spool::open(&dir, small_segments()).unwrap();
    let clone = spool.clone();
    append(&spool, record(0, 10));
    spool.close();
    let rec = record(1, 10);
    let res = clone.try_reserve(rec.encoded_len()).unwrap();
    let err = clone.append_blocking(res, rec).unwrap_err();
    assert!(matches!(err, SpoolError::Closed(_)), "{err}");
    assert_eq!(clone.stats().records, 1);
    drop(clone);
    let spool = Spool::open(&dir, small_segments()).unwrap();
    assert_eq!(ids(&read_all(&spool)), [0]);
    spool.close();
}

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(waker))
}

/// The delivery worker reads, finds nothing, checks whether the spool is
/// idle (nothing spooled, pending or reserved) and waits. Room reserved
/// for a record that is then never appended (its append failed, or the
/// request was refused at another target) makes the spool idle without an
/// append: the waiting reader must wake, or its target stays `down` or
/// `draining` with an empty spool.
#[test]
fn a_waiting_reader_wakes_when_reserved_room_is_given_back() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let spool = Spool::open(tmp.path().join("t"), small_segments()).unwrap();
    let mut reader = spool.reader();
    let reservation = spool.try_reserve(100).unwrap();
    assert!(reader.read_batch(10, MIB).unwrap().is_empty());
    assert!(!spool.is_idle(), "the reservation holds the spool busy");
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    {
        let mut wait = std::pin::pin!(reader.wait());
        assert!(poll_once(wait.as_mut(), &waker).is_pending());
        drop(reservation);
        assert!(
            flag.0.load(Ordering::SeqCst),
            "giving the room back woke no one"
        );
        assert!(poll_once(wait.as_mut(), &waker).is_ready());
    }
    assert!(spool.is_idle());

    // The same when the room is given back between the empty read and the
    // wait (the worker's check of `is_idle` came before it): the wait
    // returns at once instead of missing it.
    let reservation = spool.try_reserve(100).unwrap();
    assert!(reader.read_batch(10, MIB).unwrap().is_empty());
    drop(reservation);
    assert!(poll_once(std::pin::pin!(reader.wait()), Waker::noop()).is_ready());
}

#[test]
fn a_waiting_reader_wakes_when_a_record_is_appended() {
    let _gate = gate();
    let tmp = tempdir().unwrap();
    let spool = Spool::open(tmp.path().join("t"), small_segments()).unwrap();
    let mut reader = spool.reader();
    for round in 0..3u64 {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        {
            let mut wait = std::pin::pin!(reader.wait());
            assert!(
                poll_once(wait.as_mut(), &waker).is_pending(),
                "round {round}: nothing to read yet"
            );
            assert!(!flag.0.load(Ordering::SeqCst));
            append(&spool, record(round, 100));
            assert!(
                flag.0.load(Ordering::SeqCst),
                "round {round}: the append woke the reader"
            );
            assert!(poll_once(wait.as_mut(), &waker).is_ready());
        }
        let batch = reader.read_batch(10, MIB).unwrap();
        assert_eq!(ids(&batch), [round]);
    }
    // Data already there: wait returns at once.
    append(&spool, record(9, 100));
    let waker = Waker::noop();
    assert!(poll_once(std::pin::pin!(reader.wait()), waker).is_ready());
    spool.close();
}
