//! The durable cursor: the log position of the oldest record not yet delivered.
//!
//! Stored in the file `cursor` as 20 bytes: magic `FKCURSR1`, the position as a
//! little-endian u64, and a CRC-32C of those 16 bytes. Replaced atomically
//! (temp file, fsync, rename, directory fsync), so a reader sees the old or the
//! new cursor, never a mix.

use std::io;
use std::path::Path;

use super::format::read_u64;
use super::fsutil;

pub const CURSOR_FILE: &str = "cursor";
const MAGIC: [u8; 8] = *b"FKCURSR1";
const LEN: usize = 20;

/// What was found in the cursor file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// No cursor file: nothing was ever acknowledged.
    Missing,
    /// A valid cursor.
    At(u64),
    /// A cursor file that fails its checksum (treated as missing, with a warning).
    Corrupt,
}

pub fn encode(lsn: u64) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32c::crc32c(&out[0..16]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode(buf: &[u8]) -> Stored {
    if buf.len() != LEN || buf[0..8] != MAGIC {
        return Stored::Corrupt;
    }
    let crc = u32::from_le_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if crc32c::crc32c(&buf[0..16]) != crc {
        return Stored::Corrupt;
    }
    Stored::At(read_u64(&buf[8..16]))
}

pub fn load(dir: &Path) -> io::Result<Stored> {
    match std::fs::read(dir.join(CURSOR_FILE)) {
        Ok(buf) => Ok(decode(&buf)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Stored::Missing),
        Err(e) => Err(e),
    }
}

pub fn store(dir: &Path, lsn: u64) -> io::Result<()> {
    fsutil::write_atomic(dir, CURSOR_FILE, &encode(lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_any_damage_reads_as_corrupt() {
        let enc = encode(987_654_321);
        assert_eq!(decode(&enc), Stored::At(987_654_321));
        for i in 0..LEN {
            let mut bad = enc;
            bad[i] ^= 1;
            assert_eq!(decode(&bad), Stored::Corrupt, "damage at byte {i}");
        }
        assert_eq!(decode(&enc[..19]), Stored::Corrupt);
    }
}
