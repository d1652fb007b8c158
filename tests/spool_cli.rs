#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tests of the `forkd` command line: `--version` and `spool inspect`.
//!
//! No test here opens a spool directory a second time after closing it, so a
//! `forkd` process spawned by a concurrent test, which holds a copy of every
//! descriptor until it execs, cannot make an open fail with `Locked`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use forkd::spool::{FsyncPolicy, Record, Spool, SpoolOptions, WhenFull};
use http::{HeaderMap, HeaderValue, Method};
use tempfile::tempdir;

const SEGMENT_HEADER_LEN: u64 = 32;

fn forkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(args)
        .output()
        .unwrap()
}

fn inspect(dir: &Path, verify: bool) -> Output {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["spool", "inspect", "--dir", dir];
    if verify {
        args.push("--verify");
    }
    forkd(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn opts() -> SpoolOptions {
    SpoolOptions {
        max_size: 1 << 30,
        segment_size: 64 << 10,
        when_full: WhenFull::Reject,
        fsync: FsyncPolicy::Never,
        rejected_max_size: 1 << 20,
        cursor_sync_interval: Duration::from_millis(50),
    }
}

fn record(id: u64, body_len: usize) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Record {
        accepted_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + id),
        request_id: format!("req-{id:010}"),
        method: Method::POST,
        path_and_query: format!("/v1/logs?n={id}").parse().unwrap(),
        headers,
        body: Bytes::from(vec![b'a' + (id % 26) as u8; body_len]),
    }
}

fn append(spool: &Spool, rec: Record) -> u64 {
    let res = spool.try_reserve(rec.encoded_len()).unwrap();
    spool.append_blocking(res, rec).unwrap()
}

/// Creates a closed spool in `dir` holding `n` records; returns their positions.
fn make_spool(dir: &Path, n: u64, body_len: usize) -> Vec<u64> {
    let spool = Spool::open(dir, opts()).unwrap();
    let lsns = (0..n)
        .map(|i| append(&spool, record(i, body_len)))
        .collect();
    spool.close();
    lsns
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

/// The table row of `target`, split on whitespace.
fn row(out: &str, target: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().is_some_and(|c| c == target))
        .ok_or_else(|| format!("no row for {target} in:\n{out}"))
        .unwrap()
}

/// RECORDS column of `target`'s row.
fn records(out: &str, target: &str) -> String {
    row(out, target)[1].clone()
}

/// A column counted from the right (BYTES and OLDEST_AGE hold spaces):
/// 0 is CORRUPT, 1 REJECTED, 2 SEGMENTS.
fn from_right(out: &str, target: &str, i: usize) -> String {
    let cols = row(out, target);
    cols[cols.len() - 1 - i].clone()
}

#[test]
fn version_prints_the_crate_version_and_exits_zero() {
    let out = forkd(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("forkd {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn inspect_of_a_buffer_dir_prints_a_table_naming_each_target_with_its_record_count() {
    let tmp = tempdir().unwrap();
    let buffer = tmp.path().join("buffer");
    make_spool(&buffer.join("primary"), 3, 100);
    make_spool(&buffer.join("backup"), 17, 10_000);
    fs::create_dir_all(buffer.join("not-a-spool")).unwrap();

    let out = inspect(&buffer, false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().next().unwrap().contains("RECORDS"), "{text}");
    assert_eq!(records(&text, "primary"), "3", "{text}");
    assert_eq!(records(&text, "backup"), "17", "{text}");
    assert!(
        !text.contains("not-a-spool"),
        "a directory without a spool is not a target: {text}"
    );
    // The backup spans several 64 KiB segments.
    let segments: u64 = from_right(&text, "backup", 2).parse().unwrap();
    assert!(segments >= 3, "{text}");

    // One target's directory works too.
    let out = inspect(&buffer.join("primary"), true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(records(&stdout(&out), "primary"), "3", "{}", stdout(&out));
}

#[test]
fn inspect_works_while_a_spool_is_open_because_it_takes_no_lock() {
    let tmp = tempdir().unwrap();
    let buffer = tmp.path().join("buffer");
    let spool = Spool::open(buffer.join("live"), opts()).unwrap();
    for i in 0..5 {
        append(&spool, record(i, 200));
    }
    let out = inspect(&buffer, true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(records(&stdout(&out), "live"), "5", "{}", stdout(&out));
    // The spool is untouched and still usable.
    append(&spool, record(5, 200));
    let out = inspect(&buffer, false);
    assert_eq!(records(&stdout(&out), "live"), "6", "{}", stdout(&out));
    assert_eq!(spool.stats().records, 6);
    spool.close();
}

#[test]
fn inspect_tolerates_a_torn_tail_and_reports_it() {
    let tmp = tempdir().unwrap();
    let buffer = tmp.path().join("buffer");
    let dir = buffer.join("torn");
    make_spool(&dir, 4, 300);
    let seg = last_segment(&dir);
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 100)
        .unwrap();

    for verify in [false, true] {
        let out = inspect(&buffer, verify);
        let text = stdout(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify={verify}: {text}{}",
            stderr(&out)
        );
        assert_eq!(records(&text, "torn"), "3", "{text}");
        assert_eq!(
            from_right(&text, "torn", 0),
            "0",
            "a torn tail is not corruption: {text}"
        );
        let torn_bytes = record(3, 300).encoded_len() - 100;
        assert!(
            text.contains(&format!(
                "torn: {torn_bytes} bytes after the last whole record"
            )),
            "{text}"
        );
    }
    // Inspect only reports: the torn bytes are still there.
    assert_eq!(fs::metadata(&seg).unwrap().len(), len - 100);
}

#[test]
fn inspect_verify_exits_one_and_names_a_corrupt_record_and_zero_when_clean() {
    let tmp = tempdir().unwrap();
    let buffer = tmp.path().join("buffer");
    let dir = buffer.join("damaged");
    let lsns = make_spool(&dir, 5, 300);
    make_spool(&buffer.join("clean"), 2, 300);

    let out = inspect(&buffer, true);
    assert_eq!(out.status.code(), Some(0), "clean: {}", stdout(&out));

    // Flip one byte in the body of record 2.
    let seg = last_segment(&dir);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let offset = SEGMENT_HEADER_LEN + lsns[2] + record(2, 300).encoded_len() - 10;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).unwrap();

    let out = inspect(&buffer, true);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(
        text.contains(&format!("damaged: corrupt at position {}", lsns[2])),
        "names the record: {text}"
    );
    assert!(
        text.contains(&seg.display().to_string()),
        "names the file: {text}"
    );
    assert_eq!(records(&text, "damaged"), "4", "{text}");
    assert_eq!(from_right(&text, "damaged", 0), "1", "{text}");
    assert_eq!(from_right(&text, "clean", 0), "0", "{text}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn inspect_of_a_nonexistent_directory_exits_one_with_one_line_on_stderr() {
    let tmp = tempdir().unwrap();
    let missing = tmp.path().join("does-not-exist");
    let out = inspect(&missing, false);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn an_unknown_flag_is_a_usage_error_exiting_two() {
    let tmp = tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    for args in [
        vec!["spool", "inspect", "--dir", dir, "--no-such-flag"],
        vec!["--no-such-flag"],
        vec!["spool", "inspect"],
    ] {
        let out = forkd(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?}");
    }
}

#[test]
fn inspect_reports_bytes_and_oldest_age_of_the_undelivered_records_only() {
    const N: u64 = 17;
    const DELIVERED: usize = 7;
    let tmp = tempdir().unwrap();
    let buffer = tmp.path().join("buffer");
    let dir = buffer.join("partly");
    // Record i was accepted 2 h ago plus i minutes: record 0 is the oldest.
    let now = std::time::SystemTime::now();
    let accepted = |i: u64| now - Duration::from_secs(2 * 3_600) + Duration::from_secs(60 * i);
    let records: Vec<Record> = (0..N)
        .map(|i| Record {
            accepted_at: accepted(i),
            ..record(i, 10_000)
        })
        .collect();
    let spool = Spool::open(&dir, opts()).unwrap();
    let lsns: Vec<u64> = records.iter().map(|r| append(&spool, r.clone())).collect();
    // The first records were delivered: the cursor moves past them (the
    // 64 KiB segments put it in the middle of the second segment).
    spool.ack(lsns[DELIVERED]);
    spool.close();

    let remaining = &records[DELIVERED..];
    let bytes: u64 = remaining.iter().map(Record::encoded_len).sum();
    let out = inspect(&buffer, true);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));

    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "TARGET",
            "RECORDS",
            "BYTES",
            "OLDEST_AGE",
            "SEGMENTS",
            "REJECTED",
            "CORRUPT"
        ],
        "{text}"
    );
    let cols = row(&text, "partly");
    assert_eq!(cols[1], (N as usize - DELIVERED).to_string(), "{text}");
    assert_eq!(
        cols[2],
        forkd::spool::inspect::human_bytes(bytes),
        "BYTES counts the undelivered records only ({bytes} bytes): {text}"
    );
    // Record 7, accepted 1 h 53 min ago, is the oldest left (the age shows
    // 1h53m for a minute).
    assert_eq!(
        cols[3], "1h53m",
        "OLDEST_AGE is the age of the oldest undelivered record: {text}"
    );
    assert_eq!(from_right(&text, "partly", 0), "0", "{text}");
}
