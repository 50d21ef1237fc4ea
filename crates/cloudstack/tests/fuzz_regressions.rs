//! The fuzz target's harness (`cloudstack::fuzzing`) on the real fixtures, which must decode, and on every
//! input kept under `fuzz/regressions/responses/` (hostile answers, and any input the target ever crashed
//! or hung on), which must not panic.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::Path;

use cloudstack::fuzzing::{input, response, COMMANDS};

fn files(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn every_fixture_of_a_decoded_command_decodes_through_the_harness() {
    let mut checked = 0;
    for (name, body) in files("tests/fixtures") {
        let Some(command) = name.split('_').next() else {
            continue;
        };
        let Some(data) = input(200, command, &body) else {
            continue;
        };
        assert!(
            response(&data) >= 1,
            "{name}: no decoder took the fixture as {command}'s answer"
        );
        checked += 1;
    }
    assert!(checked >= 14, "only {checked} fixtures were checked");
    // An error answer is decoded by none, whatever its status.
    let error = br#"{"createvolumeresponse":{"errorcode":431,"errortext":"Unable to find zone"}}"#;
    for status in [200, 431, 530] {
        assert_eq!(
            response(&input(status, "createVolume", error).unwrap()),
            0,
            "{status}"
        );
    }
}

#[test]
fn kept_inputs_run_clean() {
    for (name, data) in files("fuzz/regressions/responses") {
        let decoded = response(&data);
        println!("{name}: {decoded} decoders took it");
    }
    // Every command of the harness is reachable, and the input split round-trips.
    for (command, _) in COMMANDS {
        let data = input(200, command, b"{}").unwrap();
        assert_eq!(data[..2], [0, 100]);
        response(&data);
    }
}
