//! The host-side client against a guest that plays the input as a script:
//! see `forkd_protocol::fuzzing::client_replies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| forkd_protocol::fuzzing::client_replies(data));
