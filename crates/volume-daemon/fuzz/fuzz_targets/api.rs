//! Fuzz target: a REST API request body of each type, or the listings' query values, through the daemon's
//! real checks and typed parse (see `volume_daemon::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    volume_daemon::fuzzing::api_input(data);
});
