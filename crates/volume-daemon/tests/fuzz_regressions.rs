//! Every input kept under `fuzz/regressions/api/` (seeds, and any input the fuzz target ever crashed or hung
//! on) runs through the target's harness (`volume_daemon::fuzzing`): none may panic, and the seeds come to
//! what the API promises (a body with a control character anywhere, even escaped, is refused).
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::Path;

use volume_daemon::fuzzing::{api_input, Outcome};

#[test]
fn kept_api_inputs_run_clean_and_the_seeds_come_to_what_the_api_promises() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/api");
    let expected = [
        ("create-volume", Outcome::Accepted),
        ("create-volume-c1-control-in-metadata-key", Outcome::Refused),
        ("create-volume-del-in-nested-metadata", Outcome::Refused),
        ("attach-nul-in-client", Outcome::Refused),
        ("attach-nul-in-client-then-trailing-bytes", Outcome::Refused),
        ("reconcile-then-trailing-text", Outcome::Refused),
        ("attach-duplicate-field", Outcome::Refused),
        ("appliance-lone-surrogate", Outcome::Refused),
        ("test-failover-wrong-type", Outcome::Refused),
        ("age-cleanup-huge-number", Outcome::Refused),
        ("query-cursor", Outcome::Query),
        ("query-cursor-upper-hex", Outcome::Query),
        ("query-cursor-empty-key", Outcome::Query),
    ];
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        let outcome = api_input(&std::fs::read(dir.join(name)).unwrap());
        if let Some((_, want)) = expected.iter().find(|(n, _)| n == name) {
            assert_eq!(outcome, *want, "{name}");
        }
    }
    for (name, _) in expected {
        assert!(names.iter().any(|n| n == name), "seed {name} is missing");
    }
}
