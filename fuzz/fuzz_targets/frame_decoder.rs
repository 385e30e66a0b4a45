//! The frame decoder on arbitrary bytes: see `forkd_protocol::fuzzing::decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| forkd_protocol::fuzzing::decoder(data));
