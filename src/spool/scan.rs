//! Reading segments back: listing a directory and scanning a segment's frames.
//!
//! Scanning never modifies anything; [`super::Spool::open`] applies what a scan
//! finds (truncating a torn tail, deleting segments behind the cursor), while
//! `forkd spool inspect` only reports it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::format::{
    self, FRAME_HEADER_LEN, FRAME_MAGIC, FrameHeader, SEGMENT_HEADER_LEN, SegmentHeader,
};

/// File name suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Digits in a segment file name: the base position, zero-padded.
pub const SEGMENT_NAME_DIGITS: usize = 20;

/// Name of the segment file that starts at log position `base`.
pub fn segment_name(base: u64) -> String {
    format!("{base:020}{SEGMENT_SUFFIX}")
}

/// Parses a segment file name back into its base position.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a directory listing found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Segment files, by base position, ascending.
    pub segments: Vec<(u64, PathBuf)>,
    /// Leftover temporary files from an interrupted atomic write.
    pub temp_files: Vec<PathBuf>,
}

/// Lists the segment and temporary files of a spool directory.
pub fn list_dir(dir: &Path) -> io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = parse_segment_name(name) {
            listing.segments.push((base, entry.path()));
        } else if name.ends_with(".tmp") {
            listing.temp_files.push(entry.path());
        }
    }
    listing.segments.sort_by_key(|(base, _)| *base);
    Ok(listing)
}

/// A record found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundRecord {
    /// Log position of the frame's first byte.
    pub lsn: u64,
    /// Frame length, header included.
    pub len: u64,
    /// Accepted-at time, milliseconds since the Unix epoch.
    pub accepted_ms: u64,
}

/// How a segment's data ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The last frame ends exactly at the end of the file.
    Clean,
    /// An incomplete frame (or zero fill) from `valid_len` on: an interrupted append.
    Torn,
    /// Damaged bytes from `valid_len` on with no valid frame after them.
    Garbage,
}

/// The result of scanning one segment's frames.
#[derive(Debug, Clone)]
pub struct SegmentScan {
    pub base: u64,
    pub records: Vec<FoundRecord>,
    /// Damaged frames skipped (position and length of each damaged region).
    pub corrupt: Vec<(u64, u64)>,
    /// Data bytes (after the segment header) up to the end of the last usable frame.
    pub valid_len: u64,
    /// Data bytes in the file.
    pub data_len: u64,
    pub tail: Tail,
}

/// Errors that make a whole segment unusable.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Header(format::DecodeError),
    #[error("header says base {found}, file name says {expected}")]
    BaseMismatch { expected: u64, found: u64 },
    #[error("file is shorter than its header ({0} bytes)")]
    Short(u64),
}

/// Reads and scans a segment file. `verify` checks every record's CRC; without
/// it only frame headers are checked (fast, for `inspect` without `--verify`).
pub fn scan_segment_file(
    base: u64,
    path: &Path,
    verify: bool,
) -> Result<SegmentScan, SegmentError> {
    let bytes = fs::read(path)?;
    if (bytes.len() as u64) < SEGMENT_HEADER_LEN {
        return Err(SegmentError::Short(bytes.len() as u64));
    }
    let header = SegmentHeader::decode(&bytes).map_err(SegmentError::Header)?;
    if header.base != base {
        return Err(SegmentError::BaseMismatch {
            expected: base,
            found: header.base,
        });
    }
    Ok(scan_data(
        base,
        &bytes[SEGMENT_HEADER_LEN as usize..],
        verify,
    ))
}

/// Scans the frames in a segment's data area (the bytes after its header).
pub fn scan_data(base: u64, data: &[u8], verify: bool) -> SegmentScan {
    let n = data.len();
    let mut scan = SegmentScan {
        base,
        records: Vec::new(),
        corrupt: Vec::new(),
        valid_len: 0,
        data_len: n as u64,
        tail: Tail::Clean,
    };
    let mut p = 0usize;
    while p < n {
        let rest = &data[p..];
        let Some(hdr_bytes) = format::frame_header_bytes(rest) else {
            scan.tail = Tail::Torn;
            break;
        };
        match FrameHeader::decode(hdr_bytes) {
            Ok(hdr) => {
                let flen = hdr.frame_len();
                if (rest.len() as u64) < flen {
                    scan.tail = Tail::Torn;
                    break;
                }
                let flen = flen as usize;
                let payload = &rest[FRAME_HEADER_LEN..flen];
                if !verify || hdr.verify(hdr_bytes, payload).is_ok() {
                    scan.records.push(FoundRecord {
                        lsn: base + p as u64,
                        len: flen as u64,
                        accepted_ms: format::payload_accepted_at_millis(payload).unwrap_or(0),
                    });
                } else {
                    scan.corrupt.push((base + p as u64, flen as u64));
                }
                p += flen;
            }
            Err(_) if rest.iter().all(|&b| b == 0) => {
                scan.tail = Tail::Torn;
                break;
            }
            Err(_) => match find_next_frame(data, p + 1, verify) {
                Some(q) => {
                    scan.corrupt.push((base + p as u64, (q - p) as u64));
                    p = q;
                }
                None => {
                    scan.corrupt.push((base + p as u64, (n - p) as u64));
                    scan.tail = Tail::Garbage;
                    break;
                }
            },
        }
    }
    scan.valid_len = p.min(n) as u64;
    scan
}

/// Finds the first position at or after `from` holding a whole, valid frame.
fn find_next_frame(data: &[u8], from: usize, verify: bool) -> Option<usize> {
    let n = data.len();
    let mut q = from;
    while q + FRAME_HEADER_LEN <= n {
        let off = data[q..n - FRAME_HEADER_LEN + 4]
            .windows(4)
            .position(|w| w == FRAME_MAGIC)?;
        q += off;
        if let Some(hdr_bytes) = format::frame_header_bytes(&data[q..])
            && let Ok(hdr) = FrameHeader::decode(hdr_bytes)
        {
            let end = q as u64 + hdr.frame_len();
            if end <= n as u64 {
                let payload = &data[q + FRAME_HEADER_LEN..end as usize];
                if !verify || hdr.verify(hdr_bytes, payload).is_ok() {
                    return Some(q);
                }
            }
        }
        q += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_fixed_width_and_parse_back() {
        let name = segment_name(42);
        assert_eq!(name, "00000000000000000042.seg");
        assert_eq!(parse_segment_name(&name), Some(42));
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
    }

    #[test]
    fn an_empty_data_area_is_a_clean_empty_segment() {
        let scan = scan_data(7, &[], true);
        assert!(scan.records.is_empty());
        assert_eq!(scan.tail, Tail::Clean);
        assert_eq!(scan.valid_len, 0);
    }

    #[test]
    fn zero_fill_after_the_last_record_is_a_torn_tail_not_corruption() {
        let scan = scan_data(0, &[0u8; 100], true);
        assert_eq!(scan.tail, Tail::Torn);
        assert!(scan.corrupt.is_empty());
    }

    #[test]
    fn random_garbage_is_one_corrupt_region() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        let scan = scan_data(0, &data, true);
        assert_eq!(scan.tail, Tail::Garbage);
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.valid_len, 0);
    }
}
