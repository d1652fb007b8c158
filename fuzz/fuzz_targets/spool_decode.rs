//! The spool's pure decoders on arbitrary bytes: the segment header, one
//! frame, and a whole segment data area. Nothing may panic, and nothing
//! whose checksum does not verify may come back as a record.
#![no_main]

use forkd::spool::fuzzing::check_decoders;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = check_decoders(1 << 20, data) {
        panic!("{broken}");
    }
});
