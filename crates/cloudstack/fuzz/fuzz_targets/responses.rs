//! Fuzz target: one CloudStack answer (HTTP status, command, body) through the client's interpretation and
//! every typed decoder (see `cloudstack::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudstack::fuzzing::response(data);
});
