//! `forkd spool inspect`: a read-only report on spool directories.
//!
//! Takes no lock and writes nothing, so it is safe beside a running daemon. A
//! torn tail (the daemon may be appending right now) is reported, not an error.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::format::millis_to_time;
use super::{cursor, rejected, scan};

/// One corrupt record or region found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment: PathBuf,
    pub position: u64,
    pub detail: String,
}

/// Report on one target's spool directory.
#[derive(Debug, Clone, Default)]
pub struct TargetReport {
    pub name: String,
    pub dir: PathBuf,
    pub records: u64,
    pub bytes: u64,
    pub oldest_accepted_at: Option<SystemTime>,
    pub segments: u64,
    pub rejected_records: u64,
    pub rejected_bytes: u64,
    pub damage: Vec<Damage>,
    /// Bytes after the last whole record of the last segment (an append in progress, or a torn write).
    pub torn_tail_bytes: u64,
}

/// Report on a `buffer.dir` (one entry per target) or a single target directory.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub targets: Vec<TargetReport>,
    pub verified: bool,
}

impl Report {
    pub fn corrupt(&self) -> bool {
        self.targets.iter().any(|t| !t.damage.is_empty())
    }
}

fn is_target_dir(dir: &Path) -> bool {
    dir.join(cursor::CURSOR_FILE).exists()
        || dir.join(super::fsutil::LOCK_FILE).exists()
        || scan::list_dir(dir).is_ok_and(|l| !l.segments.is_empty())
}

/// Inspects `dir`: a spool's `buffer.dir` or one target's directory.
pub fn inspect(dir: &Path, verify: bool) -> Result<Report, String> {
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mut report = Report {
        targets: Vec::new(),
        verified: verify,
    };
    if is_target_dir(dir) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        report.targets.push(inspect_target(&name, dir, verify)?);
        return Ok(report);
    }
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && is_target_dir(p))
        .collect();
    subdirs.sort();
    for sub in subdirs {
        let name = sub
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        report.targets.push(inspect_target(&name, &sub, verify)?);
    }
    Ok(report)
}

fn inspect_target(name: &str, dir: &Path, verify: bool) -> Result<TargetReport, String> {
    let mut t = TargetReport {
        name: name.to_owned(),
        dir: dir.to_path_buf(),
        ..TargetReport::default()
    };
    let listing = scan::list_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let cursor = match cursor::load(dir) {
        Ok(cursor::Stored::At(c)) => c,
        _ => 0,
    };
    let count = listing.segments.len();
    let mut oldest_ms: Option<u64> = None;
    for (i, (base, path)) in listing.segments.iter().enumerate() {
        t.segments += 1;
        let is_last = i + 1 == count;
        let scanned = match scan::scan_segment_file(*base, path, verify) {
            Ok(s) => s,
            Err(scan::SegmentError::Short(_)) if is_last => continue,
            Err(e) => {
                t.damage.push(Damage {
                    segment: path.clone(),
                    position: *base,
                    detail: format!("segment unusable: {e}"),
                });
                continue;
            }
        };
        for r in scanned.records.iter().filter(|r| r.lsn >= cursor) {
            t.records += 1;
            t.bytes += r.len;
            oldest_ms = Some(oldest_ms.map_or(r.accepted_ms, |o| o.min(r.accepted_ms)));
        }
        for (pos, len) in scanned.corrupt.iter().filter(|(pos, _)| *pos >= cursor) {
            t.damage.push(Damage {
                segment: path.clone(),
                position: *pos,
                detail: format!("{len} damaged bytes skipped"),
            });
        }
        if scanned.tail == scan::Tail::Torn {
            if is_last {
                t.torn_tail_bytes = scanned.data_len - scanned.valid_len;
            } else if scanned.base + scanned.valid_len >= cursor {
                t.damage.push(Damage {
                    segment: path.clone(),
                    position: scanned.base + scanned.valid_len,
                    detail: "sealed segment ends in an incomplete record".into(),
                });
            }
        }
    }
    t.oldest_accepted_at = oldest_ms.map(millis_to_time);
    let rejected = rejected::list(dir)
        .map_err(|e| format!("cannot list rejected records in {}: {e}", dir.display()))?;
    for (_, path, len) in &rejected {
        t.rejected_records += 1;
        t.rejected_bytes += len;
        if verify && let Err(e) = rejected::read(path) {
            t.damage.push(Damage {
                segment: path.clone(),
                position: 0,
                detail: format!("rejected record unreadable: {e}"),
            });
        }
    }
    Ok(t)
}

/// Formats a byte count the way operators read it, without spaces ("1.2KiB").
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n)
        .display()
        .iec()
        .to_string()
        .replace(' ', "")
}

/// Formats an age with its two largest units and no spaces ("3d4h", "12m5s").
fn human_age(since: Option<SystemTime>, now: SystemTime) -> String {
    let Some(t) = since else { return "-".into() };
    let secs = now.duration_since(t).unwrap_or(Duration::ZERO).as_secs();
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, name) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.concat()
}

/// Renders the report as a table (plus the damage list).
pub fn render(report: &Report, now: SystemTime) -> String {
    let mut out = String::new();
    if report.targets.is_empty() {
        out.push_str("no spool found\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:>10} {:>12} {:>14} {:>9} {:>9} {:>8}",
        "TARGET", "RECORDS", "BYTES", "OLDEST_AGE", "SEGMENTS", "REJECTED", "CORRUPT"
    );
    for t in &report.targets {
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>12} {:>14} {:>9} {:>9} {:>8}",
            t.name,
            t.records,
            human_bytes(t.bytes),
            human_age(t.oldest_accepted_at, now),
            t.segments,
            t.rejected_records,
            t.damage.len()
        );
    }
    for t in &report.targets {
        for d in &t.damage {
            let _ = writeln!(
                out,
                "{}: corrupt at position {} in {}: {}",
                t.name,
                d.position,
                d.segment.display(),
                d.detail
            );
        }
        if t.torn_tail_bytes > 0 {
            let _ = writeln!(
                out,
                "{}: {} bytes after the last whole record (a write in progress, or torn by a crash)",
                t.name, t.torn_tail_bytes
            );
        }
    }
    if !report.verified {
        out.push_str("(frame headers checked; add --verify to check every record's checksum)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_render_without_spaces_so_columns_split_cleanly() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        assert_eq!(human_age(None, now), "-");
        assert_eq!(human_age(ago(0), now), "0s");
        assert_eq!(human_age(ago(75), now), "1m15s");
        assert_eq!(human_age(ago(3 * 86_400 + 4 * 3_600 + 5), now), "3d4h");
        assert_eq!(human_bytes(1536), "1.5KiB");
    }
}
