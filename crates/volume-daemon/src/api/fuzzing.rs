//! Harness for the fuzz target in `crates/volume-daemon/fuzz` and its regression test: what a caller of the
//! REST API controls before any handler runs — a JSON body of each request type, through the real body
//! check and typed parse, and the `limit` and `after` query values of the paged listings.
//!
//! Not a stable API; public only so the fuzz crate and the regression test can call it.

use volume_api::{
    AttachVolumeRequest, CreateExportRequest, CreateSnapshotRequest, CreateVolumeRequest,
    ExportAgeCleanupRequest, ExportCleanupRequest, ReconcileRequest, SetApplianceRequest,
    TestFailoverCleanupRequest, TrackSnapshotRequest, UpdateSnapshotRequest,
};

use super::{extract, page};
use crate::engine::control_in_json;

/// What one input came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A body that parsed into its request type.
    Accepted,
    /// A body refused with a 400.
    Refused,
    /// Query values (`limit`, `after`), whatever they came to.
    Query,
}

/// The request types whose bodies are parsed (the first byte of an input picks one; one more value picks
/// the query instead).
pub const BODIES: usize = 11;

/// Runs one input: its first byte picks a request type (or the listings' query values), the rest is the
/// body (or the query values, split at the first `&`). Panics when a guarantee fails: a body that parsed
/// holds no control character in any string, and a cursor that was taken encodes back to one that is.
pub fn api_input(data: &[u8]) -> Outcome {
    let Some((&pick, rest)) = data.split_first() else {
        return Outcome::Refused;
    };
    match usize::from(pick) % (BODIES + 1) {
        0 => body::<CreateVolumeRequest>(rest),
        1 => body::<AttachVolumeRequest>(rest),
        2 => body::<CreateExportRequest>(rest),
        3 => body::<SetApplianceRequest>(rest),
        4 => body::<ReconcileRequest>(rest),
        5 => body::<CreateSnapshotRequest>(rest),
        6 => body::<TrackSnapshotRequest>(rest),
        7 => body::<UpdateSnapshotRequest>(rest),
        8 => body::<TestFailoverCleanupRequest>(rest),
        9 => body::<ExportCleanupRequest>(rest),
        10 => body::<ExportAgeCleanupRequest>(rest),
        _ => query(rest),
    }
}

fn body<T: serde::de::DeserializeOwned + serde::Serialize>(bytes: &[u8]) -> Outcome {
    match extract::parse::<T>(bytes) {
        Ok(request) => {
            let v =
                serde_json::to_value(&request).expect("a parsed request serializes (invariant)");
            assert_eq!(
                control_in_json(&v),
                None,
                "a request holding a control character was accepted: {v}"
            );
            Outcome::Accepted
        }
        Err(e) => {
            std::hint::black_box(crate::error_chain(&e));
            Outcome::Refused
        }
    }
}

fn query(bytes: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    let (limit, after) = text.split_once('&').unwrap_or((&text, ""));
    let _ = page::limit(Some(limit));
    for key in [page::CursorKey::Created, page::CursorKey::ExportName] {
        let Ok(Some(cursor)) = page::after(Some(after), key) else {
            continue;
        };
        let again = page::encode(&cursor);
        assert_eq!(
            page::after(Some(&again), key).ok().flatten().as_ref(),
            Some(&cursor),
            "the cursor of {after:?} encodes to {again:?}, which does not decode to it"
        );
    }
    Outcome::Query
}
