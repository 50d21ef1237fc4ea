//! Every input kept under `fuzz/regressions/` (seeds, and any input a fuzz target ever crashed or hung on)
//! runs through the same harness as the fuzz targets; none may panic or hang.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn negotiation_regressions_run_clean() {
    for (name, data) in inputs("negotiation") {
        let sent = nbd::fuzzing::serve_input(&data);
        println!("{name}: server sent {sent} bytes");
        // Every input gets at least the greeting (18 bytes).
        assert!(sent >= 18, "{name}: server sent {sent} bytes");
    }
}

#[test]
fn request_regressions_run_clean() {
    let handshake_only = nbd::fuzzing::serve_input(&nbd::fuzzing::after_handshake(&[]));
    for (name, data) in inputs("requests") {
        let sent = nbd::fuzzing::serve_input(&nbd::fuzzing::after_handshake(&data));
        println!("{name}: server sent {sent} bytes after a {handshake_only}-byte handshake");
        assert!(sent >= handshake_only, "{name}");
    }
    // The all-commands seed is answered in full: 9 requests, DISC unanswered, READ data included.
    let all = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/requests/all-commands"),
    )
    .unwrap();
    let sent = nbd::fuzzing::serve_input(&nbd::fuzzing::after_handshake(&all));
    assert!(
        sent >= handshake_only + 7 * 16 + 28 + 8,
        "every request got its reply ({sent} bytes sent)"
    );
}
