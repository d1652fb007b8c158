//! The spool's pure decoders on arbitrary bytes: the segment header, one
//! frame, and a whole segment data area. Nothing may panic, and nothing
//! whose checksum does not verify may come back as a record.
#![no_main]

use bytes::Bytes;
use forkd::spool::fuzzing::{
    FRAME_HEADER_LEN, FrameHeader, SegmentHeader, decode_frame, frame_header_bytes, scan_data,
};
use libfuzzer_sys::fuzz_target;

fn verifies(buf: &[u8]) -> bool {
    let Some(hdr_bytes) = frame_header_bytes(buf) else {
        return false;
    };
    let Ok(hdr) = FrameHeader::decode(hdr_bytes) else {
        return false;
    };
    let end = hdr.frame_len() as usize;
    end <= buf.len() && hdr.verify(hdr_bytes, &buf[FRAME_HEADER_LEN..end]).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data);
    if let Ok((record, len)) = decode_frame(&Bytes::copy_from_slice(data)) {
        assert!(len as usize <= data.len());
        assert!(verifies(data), "decoded a frame whose CRC does not verify");
        assert_eq!(len, record.encoded_len());
    }
    let base = 1 << 20;
    for verify in [true, false] {
        let scan = scan_data(base, data, verify);
        assert!(scan.valid_len <= scan.data_len);
        let mut next = base;
        for r in &scan.records {
            assert!(r.lsn >= next, "records overlap or go backwards");
            let at = (r.lsn - base) as usize;
            let end = at + r.len as usize;
            assert!(end <= data.len());
            if verify {
                assert!(
                    verifies(&data[at..end]),
                    "scanned a record that does not verify"
                );
                // What the scanner accepts, the reader decodes or reports as damaged.
                let _ = decode_frame(&Bytes::copy_from_slice(&data[at..end]));
            }
            next = r.lsn + r.len;
        }
    }
});
