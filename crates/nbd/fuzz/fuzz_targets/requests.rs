//! Fuzz target: arbitrary transmission-phase requests after a valid handshake (structured replies,
//! `base:allocation`, GO on a writable in-memory export).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::requests(data);
});
