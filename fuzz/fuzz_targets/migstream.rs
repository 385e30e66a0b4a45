//! The migration-stream splitter on arbitrary bytes and on streams
//! synthesized from them: see `forkd_migstream::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    forkd_migstream::fuzzing::check(data);
    forkd_migstream::fuzzing::check(&forkd_migstream::fuzzing::synthesize(data));
});
