//! The pure decoding functions of the on-disk format, and the invariants they
//! keep on any input, for the cargo-fuzz targets (`fuzz/`) and their proptest
//! equivalents (`tests/fuzz_props.rs`): one checker, so both check the same.

use bytes::Bytes;

pub use super::format::{
    FRAME_HEADER_LEN, FrameHeader, SEGMENT_HEADER_LEN, SegmentHeader, decode_frame, decode_payload,
    frame_header_bytes,
};
pub use super::scan::{FoundRecord, SegmentScan, Tail, parse_segment_name, scan_data};

/// True when the frame at the start of `buf` has a valid header and record CRC.
pub fn verifies(buf: &[u8]) -> bool {
    let Some(hdr_bytes) = frame_header_bytes(buf) else {
        return false;
    };
    let Ok(hdr) = FrameHeader::decode(hdr_bytes) else {
        return false;
    };
    let Ok(end) = usize::try_from(hdr.frame_len()) else {
        return false;
    };
    buf.get(FRAME_HEADER_LEN..end)
        .is_some_and(|payload| hdr.verify(hdr_bytes, payload).is_ok())
}

/// Feeds `data` to every decoder as a segment header, as one frame and as a
/// segment's data area starting at log position `base`, and checks what they
/// may return: nothing panics, nothing whose checksum does not verify comes
/// back as a record, and scanned records and damaged ranges lie inside
/// `data`, in order, without overlap. The first broken invariant is the error.
pub fn check_decoders(base: u64, data: &[u8]) -> Result<(), String> {
    let _ = SegmentHeader::decode(data);
    if let Ok((record, len)) = decode_frame(&Bytes::copy_from_slice(data)) {
        ensure(
            len <= data.len() as u64,
            "decoded a frame longer than the input",
        )?;
        ensure(verifies(data), "decoded a frame whose CRC does not verify")?;
        ensure(
            len == record.encoded_len(),
            "a decoded record re-encodes to another length",
        )?;
    }
    for verify in [true, false] {
        let scan = scan_data(base, data, verify);
        ensure(
            scan.valid_len <= scan.data_len,
            "valid length past the data",
        )?;
        ensure(
            scan.data_len == data.len() as u64,
            "data length is not the input's",
        )?;
        let mut next = base;
        for r in &scan.records {
            ensure(r.lsn >= next, "records overlap or go backwards")?;
            let range = usize::try_from(r.lsn - base)
                .ok()
                .and_then(|at| Some(at..at.checked_add(usize::try_from(r.len).ok()?)?));
            let frame = range
                .and_then(|range| data.get(range))
                .ok_or("a scanned record lies outside the data")?;
            if verify {
                ensure(
                    verifies(frame),
                    "the scanner returned a record whose CRC does not verify",
                )?;
                // What the scanner accepts, the reader decodes or reports as damaged.
                let _ = decode_frame(&Bytes::copy_from_slice(frame));
            }
            next = r.lsn + r.len;
        }
        for &(lsn, len) in &scan.corrupt {
            ensure(
                lsn >= base && lsn - base + len <= data.len() as u64,
                "a damaged range lies outside the data",
            )?;
        }
    }
    Ok(())
}

fn ensure(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_owned()) }
}
