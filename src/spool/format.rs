//! On-disk encoding: segment headers, record frames and record payloads.
//!
//! Pure functions over byte slices, so the decoder can be fuzzed and tested
//! without a file system. The layout is described in the parent module's
//! documentation and in `docs/spool-format.md`; keep the three in step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method};

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"FORKDSEG";
/// Format version written in every segment header.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the segment header; record frames start right after it.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// First four bytes of every record frame.
pub const FRAME_MAGIC: [u8; 4] = *b"FKR1";
/// Size of a record frame header (magic, length, header CRC, CRC).
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload a frame can describe.
pub const MAX_PAYLOAD_LEN: u64 = u32::MAX as u64;

/// One spooled request: everything needed to send it again later.
///
/// Target headers and the client's `Authorization` are never part of a record;
/// the daemon applies target headers at each send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// When forkd accepted the request (stored with millisecond precision).
    pub accepted_at: SystemTime,
    /// `X-Request-Id` sent with every attempt.
    pub request_id: String,
    /// Request method.
    pub method: Method,
    /// Path and query as the client sent them (the target URL is joined at send).
    pub path_and_query: PathAndQuery,
    /// End-to-end request headers.
    pub headers: HeaderMap,
    /// Request body, shared with every other copy of the request.
    pub body: Bytes,
}

/// Why a frame or payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame magic mismatch")]
    BadMagic,
    #[error("frame header checksum mismatch")]
    BadHeaderChecksum,
    #[error("record checksum mismatch")]
    BadChecksum,
    #[error("record payload is malformed: {0}")]
    Malformed(&'static str),
    #[error("segment header is invalid: {0}")]
    BadSegmentHeader(&'static str),
}

/// Segment header: identifies a segment file and the log position it starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Log position (LSN) of the first frame byte in this segment.
    pub base: u64,
}

impl SegmentHeader {
    /// Encodes the 32-byte header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut out = [0u8; SEGMENT_HEADER_LEN as usize];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        // 12..16 reserved (zero)
        out[16..24].copy_from_slice(&self.base.to_le_bytes());
        // 24..28 reserved (zero)
        let crc = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < SEGMENT_HEADER_LEN as usize {
            return Err(DecodeError::BadSegmentHeader("too short"));
        }
        if buf[0..8] != SEGMENT_MAGIC {
            return Err(DecodeError::BadSegmentHeader("bad magic"));
        }
        let crc = u32::from_le_bytes([buf[28], buf[29], buf[30], buf[31]]);
        if crc32c::crc32c(&buf[0..28]) != crc {
            return Err(DecodeError::BadSegmentHeader("checksum mismatch"));
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != FORMAT_VERSION {
            return Err(DecodeError::BadSegmentHeader("unsupported format version"));
        }
        let header_len = u16::from_le_bytes([buf[10], buf[11]]);
        if u64::from(header_len) != SEGMENT_HEADER_LEN {
            return Err(DecodeError::BadSegmentHeader("unsupported header length"));
        }
        Ok(SegmentHeader {
            base: read_u64(&buf[16..24]),
        })
    }
}

/// A frame header that passed its own checksum: the payload length is trustworthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub payload_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Total frame size: header plus payload.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.payload_len)
    }

    /// Decodes the 16-byte frame header, checking magic and header CRC.
    pub fn decode(buf: &[u8; FRAME_HEADER_LEN]) -> Result<Self, DecodeError> {
        if buf[0..4] != FRAME_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let hcrc = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if crc32c::crc32c(&buf[0..8]) != hcrc {
            return Err(DecodeError::BadHeaderChecksum);
        }
        Ok(FrameHeader {
            payload_len: u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]),
            crc: u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]),
        })
    }

    /// Checks the record CRC, which covers the first 12 header bytes and the payload.
    pub fn verify(
        &self,
        header: &[u8; FRAME_HEADER_LEN],
        payload: &[u8],
    ) -> Result<(), DecodeError> {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[0..12]), payload);
        if crc == self.crc {
            Ok(())
        } else {
            Err(DecodeError::BadChecksum)
        }
    }
}

/// Copies the first 16 bytes of `buf` into a frame header array, if there are 16.
pub fn frame_header_bytes(buf: &[u8]) -> Option<&[u8; FRAME_HEADER_LEN]> {
    buf.get(..FRAME_HEADER_LEN).and_then(|s| s.try_into().ok())
}

/// Decodes and verifies one whole frame starting at `buf[0]`.
///
/// Returns the record and the frame length. `buf` must hold at least the frame.
pub fn decode_frame(buf: &Bytes) -> Result<(Record, u64), DecodeError> {
    let hdr_bytes = frame_header_bytes(buf).ok_or(DecodeError::Malformed("short frame"))?;
    let hdr = FrameHeader::decode(hdr_bytes)?;
    let end =
        usize::try_from(hdr.frame_len()).map_err(|_| DecodeError::Malformed("frame too large"))?;
    if buf.len() < end {
        return Err(DecodeError::Malformed("short frame"));
    }
    hdr.verify(hdr_bytes, &buf[FRAME_HEADER_LEN..end])?;
    let record = decode_payload(buf.slice(FRAME_HEADER_LEN..end))?;
    Ok((record, hdr.frame_len()))
}

impl Record {
    /// Payload size in bytes (frame minus its 16-byte header).
    pub fn payload_len(&self) -> u64 {
        let mut len = 8 + 1 + self.method.as_str().len() as u64;
        len += 2 + self.request_id.len() as u64;
        len += 4 + self.path_and_query.as_str().len() as u64;
        len += 2;
        for (name, value) in &self.headers {
            len += 2 + name.as_str().len() as u64 + 4 + value.as_bytes().len() as u64;
        }
        len + 4 + self.body.len() as u64
    }

    /// Bytes this record takes in a segment, framing included.
    ///
    /// This is the unit in which `max_size` and reservations are counted.
    pub fn encoded_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + self.payload_len()
    }

    /// Checks that the record fits the format's length fields.
    pub fn check_encodable(&self) -> Result<(), &'static str> {
        self.checked_encoded_len().map(|_| ())
    }

    /// [`Record::encoded_len`], once the record is known to fit the
    /// format's length fields (one walk over the headers for both).
    pub fn checked_encoded_len(&self) -> Result<u64, &'static str> {
        if self.method.as_str().len() > usize::from(u8::MAX) {
            return Err("method longer than 255 bytes");
        }
        if self.request_id.len() > usize::from(u16::MAX) {
            return Err("request id longer than 65535 bytes");
        }
        if self.headers.len() > usize::from(u16::MAX) {
            return Err("more than 65535 headers");
        }
        if self.path_and_query.as_str().len() > u32::MAX as usize {
            return Err("path longer than 4 GiB");
        }
        let payload_len = self.payload_len();
        if payload_len > MAX_PAYLOAD_LEN {
            return Err("record larger than 4 GiB");
        }
        Ok(FRAME_HEADER_LEN as u64 + payload_len)
    }

    /// Appends the whole frame (header and payload) to `out`.
    ///
    /// The caller must have checked [`Record::check_encodable`]; lengths that do
    /// not fit are saturated, which the CRC then exposes at read time.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_head_into(out, self.encoded_len());
        out.extend_from_slice(&self.body);
    }

    /// Appends the frame without its body bytes: the frame header and every
    /// payload field up to and including the body's length prefix. The body
    /// follows on disk as it is (the writer hands it to the kernel straight
    /// from [`Record::body`]); the record CRC in the head already covers it.
    ///
    /// `encoded_len` is the record's [`Record::encoded_len`], computed once by
    /// the caller. The caller must have checked [`Record::check_encodable`].
    pub fn encode_head_into(&self, out: &mut Vec<u8>, encoded_len: u64) {
        let payload_len =
            u32::try_from(encoded_len.saturating_sub(FRAME_HEADER_LEN as u64)).unwrap_or(u32::MAX);
        let start = out.len();
        let head_len = (FRAME_HEADER_LEN + payload_len as usize).saturating_sub(self.body.len());
        out.reserve(head_len);
        out.put_slice(&FRAME_MAGIC);
        out.put_u32_le(payload_len);
        let hcrc = crc32c::crc32c(&out[start..start + 8]);
        out.put_u32_le(hcrc);
        out.put_u32_le(0); // record CRC, filled in below
        let payload_start = out.len();

        let millis = self
            .accepted_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        out.put_u64_le(millis);
        put_short(out, self.method.as_str().as_bytes());
        put_u16_prefixed(out, self.request_id.as_bytes());
        put_u32_prefixed(out, self.path_and_query.as_str().as_bytes());
        out.put_u16_le(u16::try_from(self.headers.len()).unwrap_or(u16::MAX));
        for (name, value) in &self.headers {
            put_u16_prefixed(out, name.as_str().as_bytes());
            put_u32_prefixed(out, value.as_bytes());
        }
        out.put_u32_le(u32::try_from(self.body.len()).unwrap_or(u32::MAX));

        let crc = crc32c::crc32c_append(
            crc32c::crc32c_append(
                crc32c::crc32c(&out[start..start + 12]),
                &out[payload_start..],
            ),
            &self.body,
        );
        out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Reads the accepted-at time (the first payload field) without decoding the rest.
pub fn payload_accepted_at_millis(payload: &[u8]) -> Option<u64> {
    payload.get(0..8).map(read_u64)
}

/// Converts stored milliseconds back to a time.
pub fn millis_to_time(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// Truncates a time to the millisecond precision the format stores.
pub fn truncate_to_millis(t: SystemTime) -> SystemTime {
    let millis = t
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    millis_to_time(millis)
}

/// Decodes a payload whose CRC has already been verified. Zero-copy: the
/// body, path and header values are slices of `payload`.
pub fn decode_payload(payload: Bytes) -> Result<Record, DecodeError> {
    let mut r = Cursor {
        buf: &payload,
        pos: 0,
    };
    let millis = r.u64()?;
    let method_len = usize::from(r.u8()?);
    let method = Method::from_bytes(r.take(method_len)?)
        .map_err(|_| DecodeError::Malformed("invalid method"))?;
    let id_len = usize::from(r.u16()?);
    let request_id = std::str::from_utf8(r.take(id_len)?)
        .map_err(|_| DecodeError::Malformed("request id is not UTF-8"))?
        .to_owned();
    let path_len = r.u32()? as usize;
    let path_range = r.range(path_len)?;
    let path_and_query = PathAndQuery::from_maybe_shared(payload.slice(path_range))
        .map_err(|_| DecodeError::Malformed("invalid path and query"))?;
    let header_count = usize::from(r.u16()?);
    let mut headers = HeaderMap::with_capacity(header_count);
    for _ in 0..header_count {
        let name_len = usize::from(r.u16()?);
        let name = HeaderName::from_bytes(r.take(name_len)?)
            .map_err(|_| DecodeError::Malformed("invalid header name"))?;
        let value_len = r.u32()? as usize;
        let value_range = r.range(value_len)?;
        let value = HeaderValue::from_maybe_shared(payload.slice(value_range))
            .map_err(|_| DecodeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    let body_len = r.u32()? as usize;
    let body_range = r.range(body_len)?;
    if r.pos != payload.len() {
        return Err(DecodeError::Malformed("trailing bytes after body"));
    }
    Ok(Record {
        accepted_at: millis_to_time(millis),
        request_id,
        method,
        path_and_query,
        headers,
        body: payload.slice(body_range),
    })
}

fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u8(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.put_slice(bytes);
}

fn put_u16_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u16_le(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    out.put_slice(bytes);
}

fn put_u32_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32_le(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.put_slice(bytes);
}

pub(crate) fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Bounds-checked little-endian reader over a payload.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn range(&mut self, n: usize) -> Result<std::ops::Range<usize>, DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Malformed(
                "field runs past the end of the record",
            ))?;
        let r = self.pos..end;
        self.pos = end;
        Ok(r)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let r = self.range(n)?;
        Ok(&self.buf[r])
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(read_u64(self.take(8)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn sample() -> Record {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Record {
            accepted_at: truncate_to_millis(SystemTime::now()),
            request_id: "0190f0a8-0000-7000-8000-000000000001".into(),
            method: Method::POST,
            path_and_query: PathAndQuery::from_static("/v1/logs?x=1"),
            headers,
            body: Bytes::from_static(b"hello body"),
        }
    }

    #[test]
    fn encoded_len_matches_the_bytes_written() {
        let rec = sample();
        let mut out = Vec::new();
        rec.encode_into(&mut out);
        assert_eq!(out.len() as u64, rec.encoded_len());
    }

    #[test]
    fn the_frame_head_followed_by_the_body_is_the_whole_frame() -> TestResult {
        let rec = sample();
        let len = rec.checked_encoded_len()?;
        assert_eq!(len, rec.encoded_len());
        let mut head = Vec::new();
        rec.encode_head_into(&mut head, len);
        assert_eq!(head.len() + rec.body.len(), len as usize);
        head.extend_from_slice(&rec.body);
        let mut whole = Vec::new();
        rec.encode_into(&mut whole);
        assert_eq!(head, whole);
        assert_eq!(decode_frame(&Bytes::from(head))?.0, rec);
        Ok(())
    }

    #[test]
    fn a_frame_decodes_back_to_the_same_record() -> TestResult {
        let rec = sample();
        let mut out = Vec::new();
        rec.encode_into(&mut out);
        let (back, len) = decode_frame(&Bytes::from(out))?;
        assert_eq!(back, rec);
        assert_eq!(len, rec.encoded_len());
        Ok(())
    }

    #[test]
    fn every_single_bit_flip_in_a_frame_is_detected() {
        let rec = sample();
        let mut out = Vec::new();
        rec.encode_into(&mut out);
        for i in 0..out.len() {
            for bit in 0..8 {
                let mut bad = out.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode_frame(&Bytes::from(bad)).is_err(),
                    "flip at byte {i} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_segment_header_round_trips_and_rejects_damage() -> TestResult {
        let h = SegmentHeader { base: 123_456 };
        let enc = h.encode();
        assert_eq!(SegmentHeader::decode(&enc)?, h);
        for i in 0..enc.len() {
            let mut bad = enc;
            bad[i] ^= 0x40;
            assert!(
                SegmentHeader::decode(&bad).is_err(),
                "damage at byte {i} went unnoticed"
            );
        }
        Ok(())
    }
}
