//! Snapshot routes: the daemon's own (`/volumes/{id}/snapshots…`: journaled create, revert and delete, and the
//! cloud's list) and the predecessor's `/snapshots/*` bookkeeping on the volume record, in its shapes.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use uuid::Uuid;
use volume_api::{
    CreateSnapshotRequest, OperationMode, SnapshotOperationRequest, SnapshotTracked,
    SnapshotUpdated, TrackSnapshotRequest, UpdateSnapshotRequest, VmSnapshots, VmSnapshotsCleared,
    VolumeSnapshotInfo,
};
// Named only in the OpenAPI annotations of the handlers.
#[allow(unused_imports)]
use volume_api::{ErrorBody, Operation, VolumeSnapshot};

use super::error::echo;
use super::extract::{JsonBody, NoBody};
use super::{parse_volume_id, submit, ApiError, AppState};
use crate::engine::Request;

/// The routes, to be nested under the API prefix.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/volumes/{id}/snapshots",
            post(create_snapshot).get(list_snapshots),
        )
        .route(
            "/volumes/{id}/snapshots/{snapshot_id}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/volumes/{id}/snapshots/{snapshot_id}/revert",
            post(revert_snapshot),
        )
        .route("/snapshots/track", post(track_snapshot))
        .route(
            "/snapshots/vm/{vm_context_id}",
            get(context_snapshots).delete(clear_context_snapshots),
        )
        .route("/snapshots/{volume_uuid}", put(update_snapshot))
}

#[utoipa::path(
    post,
    path = "/volumes/{id}/snapshots",
    tag = "snapshots",
    request_body(content = Option<CreateSnapshotRequest>, description = "optional name and migration context"),
    params(("id" = Uuid, Path, description = "volume id"),
           ("Idempotency-Key" = Option<String>, Header, description = "the same request again returns the first operation with `Idempotent-Replayed: true`")),
    responses(
        (status = 201, description = "journaled; `type` is `snapshot_create`; on completion the volume's `snapshot` tracks the new snapshot", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 400, description = "invalid input", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
pub(super) async fn create_snapshot(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Option<JsonBody<CreateSnapshotRequest>>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let body = body.map(|JsonBody(b)| b).unwrap_or_default();
    let req = Request::SnapshotCreate(SnapshotOperationRequest {
        volume_id,
        snapshot_id: None,
        name: body.name,
        vm_context_id: body.vm_context_id.filter(|c| !c.is_empty()),
    });
    submit(&st, req, &headers).await
}

#[utoipa::path(
    get,
    path = "/volumes/{id}/snapshots",
    tag = "snapshots",
    params(("id" = Uuid, Path, description = "volume id")),
    responses(
        (status = 200, description = "the cloud's snapshots of the volume; `tracked` marks the one the volume record tracks", body = Vec<VolumeSnapshot>),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
        (status = 503, description = "CloudStack cannot be reached", body = ErrorBody),
    )
)]
pub(super) async fn list_snapshots(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    Ok(Json(st.engine.volume_snapshots(volume_id).await?).into_response())
}

#[utoipa::path(
    post,
    path = "/volumes/{id}/snapshots/{snapshot_id}/revert",
    tag = "snapshots",
    params(("id" = Uuid, Path, description = "volume id"),
           ("snapshot_id" = String, Path, description = "CloudStack snapshot id"),
           ("Idempotency-Key" = Option<String>, Header, description = "the same request again returns the first operation with `Idempotent-Replayed: true`")),
    responses(
        (status = 201, description = "journaled; `type` is `snapshot_revert`; the volume's data becomes the snapshot's", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 400, description = "the snapshot is another volume's", body = ErrorBody),
        (status = 404, description = "unknown volume or snapshot", body = ErrorBody),
        (status = 409, description = "`volume_attached`: the volume is attached; detach it first; or `volume_owned_by_other_appliance`: the volume is held by another appliance sharing the database", body = ErrorBody),
    )
)]
pub(super) async fn revert_snapshot(
    State(st): State<AppState>,
    Path((id, snapshot_id)): Path<(String, String)>,
    headers: HeaderMap,
    _: NoBody,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let req = Request::SnapshotRevert(SnapshotOperationRequest {
        volume_id,
        snapshot_id: Some(snapshot_id),
        name: None,
        vm_context_id: None,
    });
    submit(&st, req, &headers).await
}

#[utoipa::path(
    delete,
    path = "/volumes/{id}/snapshots/{snapshot_id}",
    tag = "snapshots",
    params(("id" = Uuid, Path, description = "volume id"),
           ("snapshot_id" = String, Path, description = "CloudStack snapshot id"),
           ("Idempotency-Key" = Option<String>, Header, description = "the same request again returns the first operation with `Idempotent-Replayed: true`")),
    responses(
        (status = 201, description = "journaled; `type` is `snapshot_delete`; the volume stops tracking it", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 400, description = "the snapshot is another volume's", body = ErrorBody),
        (status = 404, description = "unknown volume or snapshot", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
pub(super) async fn delete_snapshot(
    State(st): State<AppState>,
    Path((id, snapshot_id)): Path<(String, String)>,
    headers: HeaderMap,
    _: NoBody,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let req = Request::SnapshotDelete(SnapshotOperationRequest {
        volume_id,
        snapshot_id: Some(snapshot_id),
        name: None,
        vm_context_id: None,
    });
    submit(&st, req, &headers).await
}

fn not_empty(field: &str, v: &str) -> Result<(), ApiError> {
    if v.trim().is_empty() {
        return Err(ApiError::bad(field, format!("{field} must not be empty")));
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/snapshots/track",
    tag = "snapshots",
    request_body = TrackSnapshotRequest,
    responses(
        (status = 200, description = "the volume record tracks the snapshot (bookkeeping only; CloudStack is not asked)", body = SnapshotTracked),
        (status = 400, description = "a required field is missing or empty", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
pub(super) async fn track_snapshot(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<TrackSnapshotRequest>,
) -> Result<Response, ApiError> {
    let volume_id = Uuid::parse_str(&body.volume_uuid).map_err(|_| {
        ApiError::bad(
            "volume_uuid",
            format!("volume_uuid {} is not a UUID", echo(&body.volume_uuid)),
        )
    })?;
    not_empty("vm_context_id", &body.vm_context_id)?;
    not_empty("snapshot_id", &body.snapshot_id)?;
    let status = body
        .snapshot_status
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| crate::engine::SNAPSHOT_READY.into());
    st.engine
        .update_snapshot_tracking(volume_id, |t| {
            t.snapshot_id = Some(body.snapshot_id.clone());
            if body.snapshot_name.is_some() {
                t.snapshot_name = body.snapshot_name.clone();
            }
            t.snapshot_status = Some(status);
            t.vm_context_id = Some(body.vm_context_id.clone());
            t.snapshot_created_at = Some(Utc::now());
        })
        .await?;
    Ok(Json(SnapshotTracked {
        message: "Volume snapshot tracked successfully".into(),
        volume_uuid: volume_id,
        snapshot_id: body.snapshot_id,
        vm_context_id: body.vm_context_id,
    })
    .into_response())
}

#[utoipa::path(
    get,
    path = "/snapshots/vm/{vm_context_id}",
    tag = "snapshots",
    params(("vm_context_id" = String, Path, description = "migration context")),
    responses((status = 200, description = "the snapshot tracking of every volume of the context, oldest volume first (an empty list when none)", body = VmSnapshots))
)]
pub(super) async fn context_snapshots(
    State(st): State<AppState>,
    Path(ctx): Path<String>,
) -> Result<Response, ApiError> {
    let snapshots: Vec<VolumeSnapshotInfo> = st
        .engine
        .context_volumes(&ctx)
        .await?
        .into_iter()
        .map(|(v, a)| VolumeSnapshotInfo {
            volume_uuid: v.id,
            vm_context_id: ctx.clone(),
            device_path: a
                .as_ref()
                .and_then(|a| a.by_id_path.clone().or_else(|| a.kernel_device.clone()))
                .unwrap_or_default(),
            operation_mode: a.as_ref().map(|a| OperationMode::from(a.target)),
            snapshot_id: v.snapshot.snapshot_id,
            snapshot_created_at: v.snapshot.snapshot_created_at,
            snapshot_status: v
                .snapshot
                .snapshot_status
                .unwrap_or_else(|| crate::engine::SNAPSHOT_NONE.into()),
        })
        .collect();
    Ok(Json(VmSnapshots {
        vm_context_id: ctx,
        count: snapshots.len(),
        snapshots,
    })
    .into_response())
}

#[utoipa::path(
    delete,
    path = "/snapshots/vm/{vm_context_id}",
    tag = "snapshots",
    params(("vm_context_id" = String, Path, description = "migration context")),
    responses((status = 200, description = "the snapshot tracking of the context's volumes is cleared (bookkeeping only: the CloudStack snapshots stay; `DELETE /volumes/{id}/snapshots/{snapshot_id}` deletes one)", body = VmSnapshotsCleared))
)]
pub(super) async fn clear_context_snapshots(
    State(st): State<AppState>,
    Path(ctx): Path<String>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let mut cleared = 0;
    for (v, _) in st.engine.context_volumes(&ctx).await? {
        let tracked = v.snapshot.snapshot_id.is_some()
            || v.snapshot
                .snapshot_status
                .as_deref()
                .is_some_and(|s| s != crate::engine::SNAPSHOT_NONE);
        if !tracked {
            continue;
        }
        st.engine
            .update_snapshot_tracking(v.id, |t| {
                t.snapshot_id = None;
                t.snapshot_created_at = None;
                t.snapshot_status = Some(crate::engine::SNAPSHOT_NONE.into());
            })
            .await?;
        cleared += 1;
    }
    Ok(Json(VmSnapshotsCleared {
        message: "VM volume snapshots cleared successfully".into(),
        vm_context_id: ctx,
        snapshots_cleared: cleared,
    })
    .into_response())
}

#[utoipa::path(
    put,
    path = "/snapshots/{volume_uuid}",
    tag = "snapshots",
    params(("volume_uuid" = Uuid, Path, description = "volume id")),
    request_body = UpdateSnapshotRequest,
    responses(
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 200, description = "the given fields of the volume's snapshot tracking are set (bookkeeping only)", body = SnapshotUpdated),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
pub(super) async fn update_snapshot(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<UpdateSnapshotRequest>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    st.engine
        .update_snapshot_tracking(volume_id, |t| {
            if let Some(s) = body.snapshot_id.filter(|s| !s.is_empty()) {
                t.snapshot_id = Some(s);
                t.snapshot_created_at = Some(Utc::now());
            }
            if let Some(n) = body.snapshot_name {
                t.snapshot_name = Some(n);
            }
            if let Some(s) = body.snapshot_status {
                t.snapshot_status = Some(s);
            }
        })
        .await?;
    Ok(Json(SnapshotUpdated {
        message: "Volume snapshot updated successfully".into(),
        volume_uuid: volume_id,
    })
    .into_response())
}
