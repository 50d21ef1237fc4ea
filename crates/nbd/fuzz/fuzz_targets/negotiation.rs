//! Fuzz target: arbitrary client bytes after the greeting, through the real negotiation and, when they
//! reach GO, the transmission phase.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::negotiation(data);
});
