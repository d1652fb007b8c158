//! The `rejected/` area: records a target refused for good (a status that is
//! neither 2xx nor in `retry_statuses`), kept for an operator to look at.
//!
//! One file per record, `<number>.rec` with a 20-digit number that grows with
//! every rejection; each file is a segment header (base = the number) followed
//! by exactly one record frame, so the same decoder reads it. Written
//! atomically (temp file, fsync, rename, directory fsync). The area is bounded
//! by `rejected_max_size`: the oldest files are deleted first.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::format::{self, Record, SEGMENT_HEADER_LEN, SegmentHeader};
use super::fsutil;
use super::{SpoolError, scan};

pub const REJECTED_DIR: &str = "rejected";
const SUFFIX: &str = ".rec";

/// Counters of the rejected area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectedStats {
    pub records: u64,
    pub bytes: u64,
    /// Rejected records deleted to keep the area within its bound.
    pub evicted: u64,
}

#[derive(Debug)]
pub struct RejectedStore {
    dir: PathBuf,
    max_bytes: u64,
    files: BTreeMap<u64, u64>,
    next: u64,
    stats: RejectedStats,
}

fn file_name(n: u64) -> String {
    format!("{n:020}{SUFFIX}")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    (digits.len() == scan::SEGMENT_NAME_DIGITS && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Lists the rejected files in `spool_dir/rejected` by number (read-only).
pub fn list(spool_dir: &Path) -> io::Result<Vec<(u64, PathBuf, u64)>> {
    let dir = spool_dir.join(REJECTED_DIR);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some(n) = entry.file_name().to_str().and_then(parse_name) else {
            continue;
        };
        let len = entry.metadata()?.len();
        out.push((n, entry.path(), len));
    }
    out.sort_by_key(|(n, _, _)| *n);
    Ok(out)
}

/// Reads one rejected record file.
pub fn read(path: &Path) -> Result<Record, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    SegmentHeader::decode(&bytes).map_err(|e| e.to_string())?;
    let frame = Bytes::from(bytes).slice(SEGMENT_HEADER_LEN as usize..);
    format::decode_frame(&frame)
        .map(|(r, _)| r)
        .map_err(|e| e.to_string())
}

impl RejectedStore {
    /// Opens (creating) the area, removing temp files left by a crash.
    pub fn open(spool_dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let dir = spool_dir.join(REJECTED_DIR);
        fsutil::create_dir(&dir)?;
        for entry in fs::read_dir(&dir).map_err(|e| SpoolError::io("list", &dir, e))? {
            let entry = entry.map_err(|e| SpoolError::io("list", &dir, e))?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".tmp"))
            {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| SpoolError::io("remove", &path, e))?;
            }
        }
        let mut files = BTreeMap::new();
        for (n, _, len) in list(spool_dir).map_err(|e| SpoolError::io("list", &dir, e))? {
            files.insert(n, len);
        }
        let next = files.keys().next_back().map_or(0, |n| n + 1);
        let mut store = RejectedStore {
            dir,
            max_bytes,
            files,
            next,
            stats: RejectedStats::default(),
        };
        store.refresh_stats();
        store.evict()?;
        Ok(store)
    }

    fn refresh_stats(&mut self) {
        self.stats.records = self.files.len() as u64;
        self.stats.bytes = self.files.values().sum();
    }

    pub fn stats(&self) -> RejectedStats {
        self.stats
    }

    /// Keeps `record`, then deletes the oldest records beyond the bound.
    pub fn put(&mut self, record: &Record) -> Result<(), SpoolError> {
        let n = self.next;
        self.next += 1;
        let mut buf = Vec::with_capacity((SEGMENT_HEADER_LEN + record.encoded_len()) as usize);
        buf.extend_from_slice(&SegmentHeader { base: n }.encode());
        record.encode_into(&mut buf);
        let len = buf.len() as u64;
        if len > self.max_bytes {
            // Larger than the whole area: keeping it would evict everything else.
            self.stats.evicted += 1;
            return Ok(());
        }
        let name = file_name(n);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let result = fsutil::create_new(&tmp)
            .and_then(|mut f| {
                f.write_all(&buf)?;
                f.sync_data()
            })
            .and_then(|()| fs::rename(&tmp, self.dir.join(&name)))
            .and_then(|()| fsutil::sync_dir(&self.dir));
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(SpoolError::io(
                "write rejected record",
                &self.dir.join(name),
                e,
            ));
        }
        self.files.insert(n, len);
        self.refresh_stats();
        self.evict()
    }

    fn evict(&mut self) -> Result<(), SpoolError> {
        let mut removed = false;
        while self.stats.bytes > self.max_bytes {
            let Some((n, _)) = self.files.pop_first() else {
                break;
            };
            let path = self.dir.join(file_name(n));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io("remove", &path, e)),
            }
            self.stats.evicted += 1;
            self.refresh_stats();
            removed = true;
        }
        if removed {
            fsutil::sync_dir(&self.dir).map_err(|e| SpoolError::io("sync", &self.dir, e))?;
        }
        Ok(())
    }
}
