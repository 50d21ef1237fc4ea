//! The OpenAPI document of the REST API, generated from the handlers' annotations and the `volume-api` types
//! (`GET /api/v1/openapi.json`), and the check that `docs/api.md` names only what the types have.

use utoipa::OpenApi;
use volume_api::{
    Appliance, ApplianceSource, AttachOperationRequest, AttachTarget, AttachVolumeRequest,
    AttachVolumeResponse, AttachmentInfo, CloudOffering, CloudVm, CloudVmState, CloudVolumeData,
    CloudVolumeState, CloudZone, ComponentHealth, ComponentStatus, CreateExportRequest,
    CreateSnapshotRequest, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeResponse,
    DetachVolumeResponse, DeviceMapping, DiskRole, Drift, DriftAction, DriftKind, ErrorBody,
    ErrorCode, Export, ExportAgeCleanupRequest, ExportCleanupRequest, ExportCleanupResult,
    ExportList, ExportRemoved, ExportStatus, ExportValidation, ForceSyncResult, Health,
    HealthDetails, HealthStatus, LinuxState, Operation, OperationKind, OperationMode,
    OperationStatus, OperationStep, OperationType, OrphanedExport, OrphanedExportCount,
    ReconcileReport, ReconcileRequest, RepairKind, RepairRequest, RepairResponse,
    SetApplianceRequest, SnapshotInfo, SnapshotOperationRequest, SnapshotOperationResponse,
    SnapshotTracked, SnapshotUpdated, TestFailoverCleanupRequest, TestFailoverCleanupResponse,
    TrackSnapshotRequest, UpdateSnapshotRequest, VmSnapshots, VmSnapshotsCleared, VmVolume,
    VolumeOperationRequest, VolumeSnapshot, VolumeSnapshotInfo, VolumeState, VolumeStatus,
};

#[derive(OpenApi)]
#[openapi(
    servers((url = "/api/v1", description = "every path below is under /api/v1; /health and /metrics also at the root")),
    info(
        title = "volume-daemon",
        description = "CloudStack volumes of a migration appliance: created, attached, found, named, exported \
                       over NBD, detached and deleted, every step journaled. Errors are ErrorBody with a stable \
                       `code`.",
    ),
    paths(
        super::health::health,
        super::create_volume,
        super::list_volumes,
        super::get_volume,
        super::delete_volume,
        super::attach_volume,
        super::attach_root,
        super::detach_volume,
        super::adopt_volume,
        super::get_device,
        super::device_to_volume,
        super::vm_volumes,
        super::cloud_zones,
        super::cloud_offerings,
        super::cloud_vms,
        super::list_operations,
        super::get_operation,
        super::create_export,
        super::list_exports,
        super::get_export,
        super::delete_export,
        super::get_appliance,
        super::put_appliance,
        super::reconcile,
        super::openapi,
        super::metrics,
        super::compat::device_path_to_volume,
        super::compat::validate_exports,
        super::compat::orphaned_count,
        super::compat::cleanup_exports,
        super::compat::cleanup_exports_by_age,
        super::compat::force_sync,
        super::compat::cleanup_test_failover,
        super::snapshots::create_snapshot,
        super::snapshots::list_snapshots,
        super::snapshots::revert_snapshot,
        super::snapshots::delete_snapshot,
        super::snapshots::track_snapshot,
        super::snapshots::context_snapshots,
        super::snapshots::clear_context_snapshots,
        super::snapshots::update_snapshot,
    ),
    components(schemas(
        CreateSnapshotRequest,
        SnapshotOperationRequest,
        SnapshotOperationResponse,
        SnapshotTracked,
        SnapshotUpdated,
        TrackSnapshotRequest,
        UpdateSnapshotRequest,
        VmSnapshots,
        VmSnapshotsCleared,
        VolumeSnapshot,
        VolumeSnapshotInfo,
        ExportAgeCleanupRequest,
        ExportCleanupRequest,
        ExportCleanupResult,
        ExportValidation,
        ForceSyncResult,
        OrphanedExport,
        OrphanedExportCount,
        TestFailoverCleanupRequest,
        TestFailoverCleanupResponse,
        Appliance,
        ApplianceSource,
        AttachOperationRequest,
        AttachTarget,
        AttachVolumeRequest,
        AttachVolumeResponse,
        AttachmentInfo,
        CloudOffering,
        CloudVm,
        CloudVolumeData,
        CloudVolumeState,
        CloudVmState,
        CloudZone,
        ComponentHealth,
        ComponentStatus,
        CreateExportRequest,
        CreateVolumeRequest,
        CreateVolumeResponse,
        DeleteVolumeResponse,
        DetachVolumeResponse,
        DeviceMapping,
        DiskRole,
        Drift,
        DriftAction,
        DriftKind,
        ErrorBody,
        ErrorCode,
        Export,
        ExportList,
        ExportRemoved,
        ExportStatus,
        Health,
        HealthDetails,
        HealthStatus,
        LinuxState,
        Operation,
        OperationKind,
        OperationMode,
        OperationStatus,
        OperationStep,
        OperationType,
        ReconcileReport,
        ReconcileRequest,
        RepairKind,
        RepairRequest,
        RepairResponse,
        SetApplianceRequest,
        SnapshotInfo,
        VmVolume,
        VolumeOperationRequest,
        VolumeState,
        VolumeStatus,
    ))
)]
pub(crate) struct ApiDoc;

/// The document as served: the handlers' own answers, and those every call can get from the layers in
/// front of them — 400 (a bad `Host` or `Idempotency-Key` header, a parameter), 401 (every call but
/// `/health` when `api_token` is set: the `bearer` scheme), and on every call that reads a body 408, 413,
/// 415 and 501 (see `extract`).
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::path::PathItemType;
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};

    let mut doc = ApiDoc::openapi();
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    Content::new(Ref::from_schema_name("ErrorBody")),
                )
                .build(),
        )
    };
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in item.operations.iter_mut() {
            let answers = &mut op.responses.responses;
            let mut add = |status: &str, description: &str| {
                answers
                    .entry(status.to_string())
                    .or_insert_with(|| error(description));
            };
            add(
                "400",
                "invalid input; `field` names it (also a missing or repeated `Host` header, or a malformed \
                 `Idempotency-Key` on a mutation)",
            );
            if path != "/health" {
                add(
                    "401",
                    "missing or wrong bearer token (when `api_token` is set; every call but health); the \
                     answer carries `WWW-Authenticate: Bearer`",
                );
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
            }
            if !matches!(method, PathItemType::Get | PathItemType::Head) {
                add(
                    "408",
                    "the body did not arrive within api_header_timeout_secs",
                );
                add("413", "the body is over 1 MiB");
                add(
                    "415",
                    "a body in another media type than application/json, or with a content coding",
                );
                add("501", "a transfer coding other than chunked");
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn doc() -> Value {
        serde_json::to_value(document()).unwrap()
    }

    /// Every property name, enum value, parameter and path segment of the document.
    fn known_names(doc: &Value) -> BTreeSet<String> {
        fn walk(v: &Value, out: &mut BTreeSet<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::Object(props)) = m.get("properties") {
                        out.extend(props.keys().cloned());
                    }
                    if let Some(Value::Array(vals)) = m.get("enum") {
                        out.extend(vals.iter().filter_map(|x| x.as_str().map(str::to_string)));
                    }
                    if m.get("in").is_some() {
                        if let Some(Value::String(n)) = m.get("name") {
                            out.insert(n.clone());
                        }
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        let mut out = BTreeSet::new();
        walk(doc, &mut out);
        out
    }

    /// `/api/v1/volumes/{id}` → `/api/v1/volumes/{}`.
    fn shape(path: &str) -> String {
        let mut out = String::new();
        let mut skip = false;
        for c in path.chars() {
            match c {
                '{' => {
                    skip = true;
                    out.push_str("{}");
                }
                '}' => skip = false,
                _ if !skip => out.push(c),
                _ => {}
            }
        }
        out
    }

    fn path_exists(doc: &Value, method: Option<&str>, path: &str) -> bool {
        let path = path.split(['?', '[']).next().unwrap_or(path).trim();
        // Paths are documented under the server base `/api/v1`.
        let want = [shape(
            path.strip_prefix(volume_api::API_PREFIX).unwrap_or(path),
        )];
        doc["paths"].as_object().unwrap().iter().any(|(p, ops)| {
            want.contains(&shape(p)) && method.is_none_or(|m| ops.get(m.to_lowercase()).is_some())
        })
    }

    fn is_ident(s: &str) -> bool {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_lowercase())
            && c.all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == '_')
    }

    /// What the document says each code span of the API guide names that it does not have.
    fn unknown_in(text: &str, doc: &Value) -> Vec<String> {
        let known = known_names(doc);
        let mut bad = Vec::new();
        let check = |name: &str, bad: &mut Vec<String>| {
            if is_ident(name) && !known.contains(name) {
                bad.push(name.to_string());
            }
        };
        for (i, span) in text.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let span = span.trim();
            let (method, rest) = match span.split_once(' ') {
                Some((m, r)) if ["GET", "POST", "PUT", "DELETE"].contains(&m) => (Some(m), r),
                _ => (None, span),
            };
            if rest.starts_with('/') {
                let (path, body) = match rest.split_once(" {") {
                    Some((p, b)) => (p, Some(b)),
                    None => (rest, None),
                };
                if !path_exists(doc, method, path) {
                    bad.push(format!("{} {path}", method.unwrap_or("")));
                }
                for f in body
                    .into_iter()
                    .flat_map(|b| b.trim_end_matches('}').split(','))
                {
                    check(f.trim().trim_end_matches('?'), &mut bad);
                }
            } else if rest.starts_with("{\"") {
                for part in rest.split('"').skip(1).step_by(4) {
                    check(part, &mut bad);
                }
            } else if let Some(list) = rest.strip_prefix('{') {
                for item in list.trim_end_matches('}').split(',') {
                    let item = item.trim().trim_end_matches('?');
                    match item.split_once(':') {
                        Some((field, values)) => {
                            check(field.trim(), &mut bad);
                            for v in values.split('/') {
                                check(v.trim().trim_matches('"'), &mut bad);
                            }
                        }
                        None => check(item, &mut bad),
                    }
                }
            } else {
                check(rest, &mut bad);
            }
        }
        // HTTP statuses named in the prose.
        let statuses: BTreeSet<String> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|ops| ops.as_object().unwrap().values())
            .filter_map(|op| op.get("responses").and_then(Value::as_object))
            .flat_map(|r| r.keys().cloned())
            .collect();
        for (i, prose) in text.split('`').enumerate() {
            if i % 2 == 1 {
                continue;
            }
            for word in prose.split(|c: char| !c.is_ascii_digit()) {
                let n: u16 = match word.parse() {
                    Ok(n) if word.len() == 3 => n,
                    _ => continue,
                };
                if ((200..300).contains(&n) || (400..600).contains(&n)) && !statuses.contains(word)
                {
                    bad.push(format!("HTTP {n}"));
                }
            }
        }
        bad
    }

    #[test]
    fn the_api_guide_names_only_codes_statuses_and_fields_the_types_have() {
        let guide =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md"))
                .expect("docs/api.md");
        let doc = doc();
        let bad = unknown_in(&guide, &doc);
        assert!(
            bad.is_empty(),
            "docs/api.md names what the API does not have: {bad:?}"
        );
        // Every error code is documented.
        for c in ErrorCode::ALL {
            assert!(
                guide.contains(&format!("`{c}`")),
                "docs/api.md does not list error code {c}"
            );
        }
    }

    #[test]
    fn the_check_catches_names_the_types_do_not_have() {
        let doc = doc();
        assert!(unknown_in(
            "`{volume_id, vm_id}` `completed` `device_timeout` 201 409",
            &doc
        )
        .is_empty());
        assert_eq!(unknown_in("status `stale`", &doc), ["stale"]);
        assert_eq!(unknown_in("`{volume_id, colour}`", &doc), ["colour"]);
        assert_eq!(
            unknown_in("`GET /volumes/{id}/colour`", &doc),
            ["GET /volumes/{id}/colour"]
        );
        assert_eq!(unknown_in("answers 418", &doc), ["HTTP 418"]);
        assert_eq!(unknown_in("`stalled`", &doc), ["stalled"]);
    }

    #[test]
    fn the_document_describes_every_route_with_its_types() {
        let doc = doc();
        for (method, path) in [
            ("post", "/volumes"),
            ("get", "/operations/{id}"),
            ("delete", "/exports/{volume_id}"),
            ("get", "/openapi.json"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        assert_eq!(codes.as_array().unwrap().len(), ErrorCode::ALL.len());
        let steps = &doc["components"]["schemas"]["OperationStep"]["enum"];
        assert!(steps
            .as_array()
            .unwrap()
            .contains(&Value::from("cloud_attach_job")));
    }
}
