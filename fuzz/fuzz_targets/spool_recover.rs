//! Recovery on arbitrary files: the input is cut into a cursor file and up
//! to three segment files (valid headers, fuzzed data, or fuzzed headers),
//! then `Spool::open` recovers the directory and every record is read back.
//! Opening never panics and never fails for damaged data; reading returns
//! only records that decode.
#![no_main]

use forkd::spool::fuzzing::{SEGMENT_HEADER_LEN, SegmentHeader};
use forkd::spool::{FsyncPolicy, Spool, SpoolOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::Builder::new()
        .prefix("forkd-fuzz-")
        .tempdir_in(tmp_base())
    else {
        return;
    };
    let parts: Vec<&[u8]> = rest.splitn(4, |&b| b == 0xA5).collect();
    // The first part is the cursor file, if the control byte says so.
    if ctl & 1 == 1 {
        let _ = std::fs::write(dir.path().join("cursor"), parts[0]);
    }
    let mut base = 0u64;
    for (i, part) in parts.iter().enumerate().skip(1) {
        let mut file = Vec::new();
        if ctl & (2 << i) == 0 {
            // A valid header, fuzzed frames.
            file.extend_from_slice(&SegmentHeader { base }.encode());
        }
        file.extend_from_slice(part);
        let name = format!("{base:020}.seg");
        let _ = std::fs::write(dir.path().join(name), &file);
        base += (file.len() as u64).saturating_sub(SEGMENT_HEADER_LEN) + u64::from(ctl >> 6);
    }
    let opts = SpoolOptions {
        fsync: FsyncPolicy::Never,
        max_size: 1 << 30,
        ..SpoolOptions::default()
    };
    let spool = match Spool::open(dir.path(), opts) {
        Ok(s) => s,
        Err(e) => panic!("recovery refused damaged data: {e}"),
    };
    let mut reader = spool.reader();
    let mut last = None;
    for _ in 0..10_000 {
        match reader.read_batch(64, 1 << 20) {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => {
                for s in &batch {
                    assert!(last.is_none_or(|l| s.lsn > l), "records out of order");
                    last = Some(s.lsn);
                }
                if let Some(s) = batch.last() {
                    spool.ack(s.end);
                }
            }
            Err(e) => panic!("reading a recovered spool failed: {e}"),
        }
    }
    spool.close();
});

/// A RAM-backed directory when there is one: the target writes files on every run.
fn tmp_base() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
