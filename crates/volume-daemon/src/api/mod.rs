//! The REST API: the compatibility contract of `docs/api.md` plus the daemon's own endpoints. The app is a
//! function of its state ([`router`]); handlers only translate between HTTP and the engine.

mod convert;
mod error;
mod extract;
mod health;
mod listener;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;
use volume_api::{
    AttachVolumeRequest, CloudOffering, CloudVm, CloudZone, CreateExportRequest,
    CreateVolumeRequest, ExportList, ReconcileRequest, SetApplianceRequest, VolumeOperationRequest,
    IDEMPOTENCY_KEY_HEADER,
};

pub use error::ApiError;
pub use health::HealthState;
pub use listener::{serve, ListenerLimits};

use crate::config::Secret;
use crate::engine::{Engine, EngineError, Request};
use crate::store::OperationFilter;
use extract::JsonBody;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub health: Arc<HealthState>,
    pub api_token: Option<Secret>,
}

/// The longest server-side wait of `GET /operations/{id}?wait=SECONDS`.
pub const MAX_WAIT_SECS: u64 = 300;

/// The HTTP application.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/health", get(health::health))
        .route("/volumes", post(create_volume).get(list_volumes))
        .route("/volumes/{id}", get(get_volume).delete(delete_volume))
        .route("/volumes/{id}/attach", post(attach_volume))
        .route("/volumes/{id}/attach-root", post(attach_root))
        .route("/volumes/{id}/detach", post(detach_volume))
        .route("/volumes/{id}/device", get(get_device))
        .route("/devices/volume", get(device_to_volume))
        .route("/vms/{vm_id}/volumes", get(vm_volumes))
        .route("/cloud/zones", get(cloud_zones))
        .route("/cloud/offerings", get(cloud_offerings))
        .route("/cloud/vms", get(cloud_vms))
        .route("/operations", get(list_operations))
        .route("/operations/{id}", get(get_operation))
        .route("/exports", post(create_export).get(list_exports))
        .route(
            "/exports/{volume_id}",
            get(get_export).delete(delete_export),
        )
        .route("/appliance", get(get_appliance).put(put_appliance))
        .route("/reconcile", post(reconcile))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics));
    Router::new()
        .route("/health", get(health::health))
        .route("/metrics", get(metrics))
        .nest(volume_api::API_PREFIX, v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(
    State(st): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Result<Response, ApiError> {
    let open = matches!(req.uri().path(), "/health" | "/api/v1/health");
    if let Some(token) = st.api_token.as_ref().filter(|t| !t.is_empty()) {
        if !open {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) {
                return Err(ApiError::Unauthorized);
            }
        }
    }
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no such endpoint: {}; see /api/v1/openapi.json",
        uri.path()
    ))
}

fn parse_volume_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::bad(
            "volume_id",
            format!("volume id {s:?} is not a UUID like 60338035-92fb-4d27-98d4-b60ad4b38b87"),
        )
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                ApiError::bad(
                    IDEMPOTENCY_KEY_HEADER,
                    "Idempotency-Key must be visible ASCII",
                )
            })?;
            if s.is_empty() || s.len() > 200 {
                return Err(ApiError::bad(
                    IDEMPOTENCY_KEY_HEADER,
                    "Idempotency-Key must be 1 to 200 characters",
                ));
            }
            Ok(Some(s.to_string()))
        }
    }
}

async fn submit(st: &AppState, req: Request, headers: &HeaderMap) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    let sub = st.engine.submit(req, key).await?;
    let mut resp = (
        StatusCode::CREATED,
        Json(convert::operation(&sub.operation)),
    )
        .into_response();
    if !sub.created {
        resp.headers_mut().insert(
            "Idempotent-Replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

async fn create_volume(
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateVolumeRequest>,
) -> Result<Response, ApiError> {
    submit(&st, Request::Create(body), &headers).await
}

async fn attach_common(
    st: AppState,
    id: String,
    headers: HeaderMap,
    body: AttachVolumeRequest,
    root: bool,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    if let Some(v) = &body.volume_id {
        if Uuid::parse_str(v).ok() != Some(volume_id) {
            return Err(ApiError::bad(
                "volume_id",
                format!("body volume_id {v:?} differs from the volume in the path {volume_id}; leave it out"),
            ));
        }
    }
    submit(&st, Request::attach(volume_id, body.vm_id, root), &headers).await
}

async fn attach_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AttachVolumeRequest>,
) -> Result<Response, ApiError> {
    attach_common(st, id, headers, body, false).await
}

async fn attach_root(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AttachVolumeRequest>,
) -> Result<Response, ApiError> {
    attach_common(st, id, headers, body, true).await
}

async fn detach_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    submit(
        &st,
        Request::Detach(VolumeOperationRequest { volume_id }),
        &headers,
    )
    .await
}

async fn delete_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    submit(
        &st,
        Request::Delete(VolumeOperationRequest { volume_id }),
        &headers,
    )
    .await
}

async fn list_volumes(State(st): State<AppState>) -> Result<Response, ApiError> {
    let vols = st.engine.store().list_volumes(false).await?;
    let mut out = Vec::with_capacity(vols.len());
    for v in vols {
        out.push(convert::volume_status(&st.engine, v, false).await?);
    }
    Ok(Json(out).into_response())
}

async fn get_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let v = st
        .engine
        .store()
        .get_volume(volume_id)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("volume {volume_id} is not known to the daemon"))
        })?;
    Ok(Json(convert::volume_status(&st.engine, v, true).await?).into_response())
}

async fn get_device(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let a = st
        .engine
        .store()
        .get_attachment(volume_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("mapping not found for volume: {volume_id}")))?;
    Ok(Json(convert::device_mapping(&st.engine, a).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceQuery {
    path: String,
}

async fn device_to_volume(
    State(st): State<AppState>,
    q: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::bad("path", format!("{e}: use ?path=/dev/disk/by-id/virtio-…")))?;
    let a = st
        .engine
        .store()
        .find_attachment_by_device(&q.path)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no attached volume has device {}", q.path)))?;
    Ok(Json(convert::device_mapping(&st.engine, a).await?).into_response())
}

async fn vm_volumes(
    State(st): State<AppState>,
    Path(vm_id): Path<String>,
) -> Result<Response, ApiError> {
    let atts = st
        .engine
        .store()
        .list_attachments(&crate::store::AttachmentFilter {
            vm_id: Some(vm_id),
            target: None,
        })
        .await?;
    let mut out = Vec::with_capacity(atts.len());
    for a in atts {
        out.push(convert::vm_volume(&st.engine, a).await?);
    }
    Ok(Json(out).into_response())
}

/// `GET /cloud/zones`: the zones the cloud lists, by name.
async fn cloud_zones(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out: Vec<CloudZone> = st
        .engine
        .cloud()
        .zones()
        .await
        .map_err(EngineError::from)?
        .into_iter()
        .map(|z| CloudZone {
            id: z.id,
            name: z.name,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out).into_response())
}

/// `GET /cloud/offerings`: the disk offerings the cloud lists, by name.
async fn cloud_offerings(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out: Vec<CloudOffering> = st
        .engine
        .cloud()
        .disk_offerings()
        .await
        .map_err(EngineError::from)?
        .into_iter()
        .map(|o| CloudOffering {
            id: o.id,
            name: o.name,
            custom: o.size_bytes.is_none(),
            size: o.size_bytes,
            description: o.display_text,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out).into_response())
}

/// `GET /cloud/vms`: the VMs the cloud lists, by name, the appliance marked.
async fn cloud_vms(State(st): State<AppState>) -> Result<Response, ApiError> {
    let appliance = st.engine.identity().current().await.vm_id;
    let mut out: Vec<CloudVm> = st
        .engine
        .cloud()
        .vms()
        .await
        .map_err(EngineError::from)?
        .into_iter()
        .map(|vm| CloudVm {
            appliance: appliance.as_deref() == Some(vm.id.as_str()),
            id: vm.id,
            name: vm.name,
            state: vm.state,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpsQuery {
    #[serde(rename = "type")]
    op_type: Option<String>,
    status: Option<String>,
    volume_id: Option<String>,
    vm_id: Option<String>,
    limit: Option<u32>,
}

async fn list_operations(
    State(st): State<AppState>,
    q: Result<Query<OpsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!("{e}: filters are type, status, volume_id, vm_id, limit"),
    })?;
    let op_type = match q.op_type.as_deref() {
        None | Some("") => None,
        Some(t) => Some(
            volume_api::OperationType::parse(t)
                .map(convert::op_type_to_store)
                .ok_or_else(|| {
                    ApiError::bad(
                        "type",
                        format!("type {t:?} is not one of create, attach, detach, delete"),
                    )
                })?,
        ),
    };
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            volume_api::OperationStatus::parse(s)
                .map(convert::op_status_to_store)
                .ok_or_else(|| {
                    ApiError::bad(
                        "status",
                        format!("status {s:?} is not one of pending, executing, completed, failed, cancelled"),
                    )
                })?,
        ),
    };
    let volume_id = match q.volume_id.as_deref() {
        None | Some("") => None,
        Some(v) => Some(parse_volume_id(v)?),
    };
    if let Some(l) = q.limit {
        if l == 0 || l > 1000 {
            return Err(ApiError::bad("limit", "limit must be between 1 and 1000"));
        }
    }
    let ops = st
        .engine
        .store()
        .list_operations(&OperationFilter {
            op_type,
            status,
            volume_id,
            vm_id: q.vm_id.filter(|s| !s.is_empty()),
            limit: q.limit,
        })
        .await?;
    Ok(Json(ops.iter().map(convert::operation).collect::<Vec<_>>()).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait: Option<f64>,
}

async fn get_operation(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad("id", format!("operation id {id:?} is not a UUID")))?;
    let Query(q) =
        q.map_err(|e| ApiError::bad("wait", format!("{e}: wait is a number of seconds")))?;
    let wait = match q.wait {
        None => Duration::ZERO,
        Some(w) if w.is_finite() && w >= 0.0 => {
            Duration::from_secs_f64(w.min(MAX_WAIT_SECS as f64))
        }
        Some(_) => {
            return Err(ApiError::bad(
                "wait",
                "wait must be a non-negative number of seconds",
            ))
        }
    };
    let op = st
        .engine
        .operation(id, wait)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("operation not found: {id}")))?;
    Ok(Json(convert::operation(&op)).into_response())
}

async fn create_export(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<CreateExportRequest>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&body.volume_id)?;
    if body.read_only == Some(true) {
        return Err(ApiError::bad(
            "read_only",
            "exports of attached volumes are read-write; read_only is not supported",
        ));
    }
    let rec = st
        .engine
        .ensure_export(volume_id, body.device_path.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(convert::export(&st.engine, &rec))).into_response())
}

async fn list_exports(State(st): State<AppState>) -> Result<Response, ApiError> {
    let recs = st.engine.store().list_exports().await?;
    let exports: Vec<_> = recs
        .iter()
        .map(|r| convert::export(&st.engine, r))
        .collect();
    Ok(Json(ExportList {
        count: exports.len(),
        exports,
    })
    .into_response())
}

async fn get_export(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let rec = st
        .engine
        .store()
        .get_export(volume_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no export for volume {volume_id}")))?;
    Ok(Json(convert::export(&st.engine, &rec)).into_response())
}

async fn delete_export(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let removed = st.engine.remove_export(volume_id).await?;
    Ok(Json(serde_json::json!({
        "message": if removed { "NBD export deleted successfully" } else { "no export existed for this volume" },
        "volume_id": volume_id,
        "removed": removed,
    }))
    .into_response())
}

async fn get_appliance(State(st): State<AppState>) -> Response {
    Json(convert::appliance(&st.engine.identity().current().await)).into_response()
}

async fn put_appliance(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<SetApplianceRequest>,
) -> Result<Response, ApiError> {
    if body.vm_id.trim().is_empty() {
        return Err(ApiError::bad("vm_id", "vm_id must not be empty"));
    }
    let s = st.engine.identity().set(body.vm_id.trim()).await?;
    Ok(Json(convert::appliance(&s)).into_response())
}

async fn reconcile(
    State(st): State<AppState>,
    body: Option<JsonBody<ReconcileRequest>>,
) -> Result<Response, ApiError> {
    let apply = body.map(|JsonBody(b)| b.apply).unwrap_or(false);
    let report = crate::reconcile::run(&st.engine, apply).await?;
    Ok(Json(report).into_response())
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let exports = st.engine.exports().list();
    let unfinished = st
        .engine
        .store()
        .unfinished_operations()
        .await
        .map(|v| v.len() as f64)
        .unwrap_or(f64::NAN);
    let ready = if st.health.is_ready() { 1.0 } else { 0.0 };
    let body = st.engine.metrics().render(
        &exports,
        &[
            (
                "volume_daemon_ready",
                "1 when the daemon serves requests.",
                ready,
            ),
            (
                "volume_daemon_operations_unfinished",
                "Operations pending or executing.",
                unfinished,
            ),
            (
                "volume_daemon_exports",
                "Live NBD exports.",
                exports.len() as f64,
            ),
        ],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
