//! The predecessor's remaining routes, with its request and response shapes: device path to volume, export
//! validation, the orphan count and clean-up (a dry run unless asked), and `admin/force-sync` (a reconcile
//! with `apply`), and the test-failover clean-up (journaled, as `test_failover_cleanup`).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use volume_api::{
    ExportAgeCleanupRequest, ExportCleanupRequest, ForceSyncResult, OrphanedExportCount,
    TestFailoverCleanupRequest,
};
// Named only in the OpenAPI annotations of the handlers.
#[allow(unused_imports)]
use volume_api::{DeviceMapping, ErrorBody, ExportCleanupResult, ExportValidation, Operation};

use super::extract::{JsonBody, NoBody};
use super::{convert, submit, ApiError, AppState};
use crate::engine::Request;

/// The routes, to be nested under the API prefix.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices/{path}/volume", get(device_path_to_volume))
        .route("/exports/validate", post(validate_exports))
        .route("/exports/orphaned/count", get(orphaned_count))
        .route("/exports/cleanup", post(cleanup_exports))
        .route("/exports/cleanup/age", post(cleanup_exports_by_age))
        .route("/admin/force-sync", post(force_sync))
        .route("/cleanup/test-failover", post(cleanup_test_failover))
}

/// The device path a `/devices/{path}/volume` segment names: the segment percent-decoded, with a leading `/`
/// added when it has none (as the predecessor did).
fn device_path(segment: &str) -> String {
    if segment.starts_with('/') {
        segment.to_string()
    } else {
        format!("/{segment}")
    }
}

#[utoipa::path(
    get,
    path = "/devices/{path}/volume",
    tag = "devices",
    params(("path" = String, Path, description = "a device path, percent-encoded as one segment (`%2Fdev%2Fdisk%2Fby-id%2Fvirtio-…`); a leading `/` is added when missing")),
    responses(
        (status = 200, description = "the mapping of the volume with that device (as `GET /devices/volume?path=…`)", body = DeviceMapping),
        (status = 404, description = "no attached volume has that device", body = ErrorBody),
    )
)]
pub(super) async fn device_path_to_volume(
    State(st): State<AppState>,
    Path(segment): Path<String>,
) -> Result<Response, ApiError> {
    let path = device_path(&segment);
    let d = st
        .engine
        .device_by_path(&path)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no attached volume has device {path}")))?;
    Ok(Json(convert::device_mapping(&d)).into_response())
}

#[utoipa::path(
    post,
    path = "/exports/validate",
    tag = "exports",
    responses((status = 200, description = "export records compared with the attachments and what the NBD server serves; nothing is changed", body = ExportValidation))
)]
pub(super) async fn validate_exports(
    State(st): State<AppState>,
    _: NoBody,
) -> Result<Response, ApiError> {
    Ok(Json(st.engine.validate_exports().await?).into_response())
}

#[utoipa::path(
    get,
    path = "/exports/orphaned/count",
    tag = "exports",
    responses((status = 200, description = "how many exports are recorded or served for volumes not attached to the appliance", body = OrphanedExportCount))
)]
pub(super) async fn orphaned_count(State(st): State<AppState>) -> Result<Response, ApiError> {
    let n = st.engine.orphaned_export_count().await?;
    Ok(Json(OrphanedExportCount {
        orphaned_exports_count: n,
        timestamp: chrono::Utc::now(),
    })
    .into_response())
}

#[utoipa::path(
    post,
    path = "/exports/cleanup",
    tag = "exports",
    request_body(content = Option<ExportCleanupRequest>, description = "a dry run unless `dry_run` is false"),
    responses(
        (status = 200, description = "the orphaned exports; without the dry run each is removed by a `repair` operation (`remove_orphan_export`)", body = ExportCleanupResult),
        (status = 400, description = "invalid body", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
    )
)]
pub(super) async fn cleanup_exports(
    State(st): State<AppState>,
    body: Option<JsonBody<ExportCleanupRequest>>,
) -> Result<Response, ApiError> {
    let dry_run = body.and_then(|JsonBody(b)| b.dry_run).unwrap_or(true);
    Ok(Json(st.engine.cleanup_exports(dry_run, None).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/exports/cleanup/age",
    tag = "exports",
    request_body(content = ExportAgeCleanupRequest, description = "orphans recorded at least `max_age_hours` ago; a dry run unless `dry_run` is false"),
    responses(
        (status = 200, description = "those orphaned exports; without the dry run each is removed by a `repair` operation", body = ExportCleanupResult),
        (status = 400, description = "`max_age_hours` missing or invalid", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
    )
)]
pub(super) async fn cleanup_exports_by_age(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<ExportAgeCleanupRequest>,
) -> Result<Response, ApiError> {
    // An age older than any date chrono can name means every recorded orphan.
    let cutoff = chrono::Utc::now()
        .checked_sub_signed(chrono::TimeDelta::hours(i64::from(body.max_age_hours)))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let dry_run = body.dry_run.unwrap_or(true);
    Ok(Json(st.engine.cleanup_exports(dry_run, Some(cutoff)).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/admin/force-sync",
    tag = "reconcile",
    responses((status = 200, description = "a reconcile with `apply` ran; `report` is its answer (as `POST /reconcile` with `apply`)", body = ForceSyncResult))
)]
pub(super) async fn force_sync(
    State(st): State<AppState>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let report = crate::reconcile::run(&st.engine, true).await?;
    Ok(Json(ForceSyncResult {
        message: "Force sync completed successfully".into(),
        timestamp: chrono::Utc::now(),
        report,
    })
    .into_response())
}

#[utoipa::path(
    post,
    path = "/cleanup/test-failover",
    tag = "volumes",
    request_body = TestFailoverCleanupRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same request again returns the first operation with `Idempotent-Replayed: true`")),
    responses(
        (status = 201, description = "journaled; `type` is `test_failover_cleanup`, `vm_id` the test VM; the test VM is stopped (unless `force_clean`), the volume detached from it, the test VM destroyed (`delete_vm`), and the volume attached, named and exported on the appliance", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 400, description = "invalid input, or `oma_vm_id` is not this daemon's appliance", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "the volume is not attached to the test VM, or belongs to another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
pub(super) async fn cleanup_test_failover(
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TestFailoverCleanupRequest>,
) -> Result<Response, ApiError> {
    submit(&st, Request::TestFailoverCleanup(body), &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_names_an_absolute_device_path() {
        assert_eq!(device_path("dev/vdb"), "/dev/vdb");
        assert_eq!(
            device_path("/dev/disk/by-id/virtio-0123"),
            "/dev/disk/by-id/virtio-0123"
        );
    }
}
