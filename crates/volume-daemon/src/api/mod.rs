//! The REST API: the compatibility contract of `docs/api.md` plus the daemon's own endpoints. The app is a
//! function of its state ([`router`]); handlers only translate between HTTP and the engine.

mod compat;
mod control;
mod convert;
mod error;
mod extract;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod listener;
mod openapi;
mod page;
mod snapshots;

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
    CreateVolumeRequest, ExportList, ExportRemoved, ExportStatus, OperationStatus, OperationType,
    ReconcileRequest, SetApplianceRequest, VolumeOperationRequest, VolumeState,
    IDEMPOTENCY_KEY_HEADER,
};
// Named only in the OpenAPI annotations of the handlers.
#[allow(unused_imports)]
use volume_api::{
    Appliance, DeviceMapping, ErrorBody, Export, Operation, ReconcileReport, VmVolume, VolumeStatus,
};

use error::echo;
pub(crate) use error::ApiError;
pub(crate) use health::HealthState;
pub(crate) use listener::{serve, ListenerLimits};

use crate::config::Secret;
use crate::engine::{Engine, Request};
use crate::store::{OperationFilter, VolumeFilter};
use extract::{query_error, JsonBody, NoBody};

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
        .route("/volumes/{id}/adopt", post(adopt_volume))
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
        .route("/metrics", get(metrics))
        .merge(compat::routes())
        .merge(snapshots::routes())
        .route_layer(middleware::from_fn(control::refuse_control_characters));
    Router::new()
        .route("/health", get(health::health))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn(control::refuse_control_characters))
        .nest(volume_api::API_PREFIX, v1)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(extract::MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(
    State(st): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Result<Response, ApiError> {
    let open = matches!(req.uri().path(), "/health" | "/api/v1/health");
    if !open && !authorized(&st, req.headers()) {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(req).await)
}

/// Whether the request may see everything: no `api_token` is configured, or it sends the right one.
pub(crate) fn authorized(st: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = st.api_token.as_ref().filter(|t| !t.is_empty()) else {
        return true;
    };
    // The scheme's name is case-insensitive and may be followed by more than one space (RFC 9110 11.4).
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, g)| {
            constant_time_eq(
                g.trim_start_matches(' ').as_bytes(),
                token.expose().as_bytes(),
            )
        })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no such endpoint: {}; see /api/v1/openapi.json",
        echo(uri.path())
    ))
}

fn parse_volume_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| {
        ApiError::bad(
            "volume_id",
            format!(
                "volume id {} is not a UUID like 60338035-92fb-4d27-98d4-b60ad4b38b87",
                echo(s)
            ),
        )
    })
}

/// A `?volume_id=` filter: absent or empty is no filter, anything else must be a UUID.
fn volume_id_filter(raw: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    raw.filter(|v| !v.is_empty())
        .map(parse_volume_id)
        .transpose()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut keys = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    match (keys.next(), keys.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(ApiError::bad(
            IDEMPOTENCY_KEY_HEADER,
            "more than one Idempotency-Key header: send one",
        )),
        (Some(v), None) => {
            // Visible ASCII: no space, tab or other control character, nothing above 0x7e.
            let visible = v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b));
            let s = v.to_str().ok().filter(|_| visible).ok_or_else(|| {
                ApiError::bad(
                    IDEMPOTENCY_KEY_HEADER,
                    "Idempotency-Key must be visible ASCII (no spaces)",
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
        Json(convert::operation(&sub.operation)?),
    )
        .into_response();
    // The operation is what was created (RFC 9110 15.3.2); its id is a UUID, always a valid header value.
    if let Ok(at) = header::HeaderValue::from_str(&format!(
        "{}/operations/{}",
        volume_api::API_PREFIX,
        sub.operation.id
    )) {
        resp.headers_mut().insert(header::LOCATION, at);
    }
    if !sub.created {
        resp.headers_mut().insert(
            "Idempotent-Replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// Answers of every mutation.
#[utoipa::path(
    post,
    path = "/volumes",
    tag = "volumes",
    request_body = CreateVolumeRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "looked up before anything else: the same request again returns the first operation with `Idempotent-Replayed: true`; another request with the key is a 422 `idempotency_key_reused`")),
    responses(
        (status = 201, description = "journaled; `type` is `create` (also a replay of an earlier request with the same Idempotency-Key)", body = Operation),
        (status = 422, description = "the Idempotency-Key was used for another request", body = ErrorBody),
        (status = 400, description = "invalid input; `field` names it", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 401, description = "missing or wrong bearer token (when `api_token` is set; on every endpoint but health)", body = ErrorBody),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
    )
)]
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
                format!(
                    "body volume_id {} differs from the volume in the path {volume_id}; leave it out",
                    echo(v)
                ),
            ));
        }
    }
    submit(
        &st,
        Request::attach(volume_id, body.vm_id, root, body.nbd_clients),
        &headers,
    )
    .await
}

#[utoipa::path(
    post,
    path = "/volumes/{id}/attach",
    tag = "volumes",
    request_body = AttachVolumeRequest,
    params(("id" = Uuid, Path, description = "volume id"),
           ("Idempotency-Key" = Option<String>, Header, description = "looked up before anything else: the same request again returns the first operation with `Idempotent-Replayed: true`; another request with the key is a 422 `idempotency_key_reused`")),
    responses(
        (status = 201, description = "journaled; `type` is `attach`; the appliance gets a device, a stable name and an export", body = Operation),
        (status = 422, description = "no such VM, or the Idempotency-Key was used for another request", body = ErrorBody),
        (status = 400, description = "invalid input", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "attached elsewhere, or volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
        (status = 502, description = "CloudStack refused a synchronous check", body = ErrorBody),
        (status = 503, description = "appliance identity unknown, or starting up", body = ErrorBody),
    )
)]
async fn attach_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AttachVolumeRequest>,
) -> Result<Response, ApiError> {
    attach_common(st, id, headers, body, false).await
}

#[utoipa::path(
    post,
    path = "/volumes/{id}/attach-root",
    tag = "volumes",
    request_body = AttachVolumeRequest,
    params(("id" = Uuid, Path, description = "volume id"),
           ("Idempotency-Key" = Option<String>, Header, description = "looked up before anything else: the same request again returns the first operation with `Idempotent-Replayed: true`; another request with the key is a 422 `idempotency_key_reused`")),
    responses(
        (status = 201, description = "journaled; CloudStack device id 0 on a VM other than the appliance", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 422, description = "no such VM, or the Idempotency-Key was used for another request", body = ErrorBody),
        (status = 400, description = "invalid input, or the appliance named", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "attached elsewhere, or volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn attach_root(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<AttachVolumeRequest>,
) -> Result<Response, ApiError> {
    attach_common(st, id, headers, body, true).await
}

#[utoipa::path(
    post,
    path = "/volumes/{id}/detach",
    tag = "volumes",
    params(("id" = Uuid, Path, description = "volume id"),
           ("Idempotency-Key" = Option<String>, Header, description = "looked up before anything else: the same request again returns the first operation with `Idempotent-Replayed: true`; another request with the key is a 422 `idempotency_key_reused`")),
    responses(
        (status = 201, description = "journaled; `type` is `detach`; the export is drained first", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 400, description = "invalid volume id or Idempotency-Key", body = ErrorBody),
        (status = 422, description = "the Idempotency-Key was used for another request", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn detach_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    _: NoBody,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    submit(
        &st,
        Request::Detach(VolumeOperationRequest { volume_id }),
        &headers,
    )
    .await
}

#[utoipa::path(
    post,
    path = "/volumes/{id}/adopt",
    tag = "volumes",
    params(("id" = Uuid, Path, description = "volume id"),
           ("Idempotency-Key" = Option<String>, Header, description = "a repeated key returns the first operation")),
    responses(
        (status = 201, description = "journaled as a `repair` operation with `repair` `adopt`: a volume CloudStack has attached to the appliance is verified, named and served; CloudStack is not asked to change anything", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn adopt_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    _: NoBody,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    submit(
        &st,
        Request::repair(volume_id, volume_api::RepairKind::Adopt),
        &headers,
    )
    .await
}

#[utoipa::path(
    delete,
    path = "/volumes/{id}",
    tag = "volumes",
    params(("id" = Uuid, Path, description = "volume id"),
           ("Idempotency-Key" = Option<String>, Header, description = "looked up before anything else: the same request again returns the first operation with `Idempotent-Replayed: true`; another request with the key is a 422 `idempotency_key_reused`")),
    responses(
        (status = 201, description = "journaled; `type` is `delete`; detached first when attached", body = Operation),
        (status = 503, description = "starting up or shutting down", body = ErrorBody),
        (status = 400, description = "invalid volume id or Idempotency-Key", body = ErrorBody),
        (status = 422, description = "the Idempotency-Key was used for another request", body = ErrorBody),
        (status = 404, description = "unknown or already deleted volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn delete_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    _: NoBody,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    submit(
        &st,
        Request::Delete(VolumeOperationRequest { volume_id }),
        &headers,
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumesQuery {
    vm_id: Option<String>,
    state: Option<String>,
    name: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// A query filter naming a value of a wire enum: absent or empty filters nothing; anything else must be one of
/// the enum's spellings, and the 400 lists them all.
fn enum_filter<T: Copy + std::fmt::Display>(
    field: &'static str,
    value: Option<&str>,
    parse: fn(&str) -> Option<T>,
    all: &[T],
) -> Result<Option<T>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => parse(v).map(Some).ok_or_else(|| {
            let names: Vec<String> = all.iter().map(T::to_string).collect();
            ApiError::bad(
                field,
                format!("{field} {} is not one of {}", echo(v), names.join(", ")),
            )
        }),
    }
}

#[utoipa::path(
    get,
    path = "/volumes",
    tag = "volumes",
    params(
        ("vm_id" = Option<String>, Query, description = "only volumes attached to this VM"),
        ("state" = Option<VolumeState>, Query, description = "only volumes in this state (deleted volumes are listed only with `deleted`)"),
        ("name" = Option<String>, Query, description = "only volumes of exactly this name"),
        ("limit" = Option<u32>, Query, description = "a page of at most this many (1 to 1000); a `Link: <…>; rel=\"next\"` header names the next page"),
        ("after" = Option<String>, Query, description = "the cursor of the next page, as the `Link` header of the previous one gives it"),
    ),
    responses(
        (status = 200, description = "the volumes the daemon knows, oldest first (the cloud is not asked); with `limit`, one page and a `Link` header when there are more",
         body = Vec<VolumeStatus>,
         headers(("Link" = String, description = "`<URL>; rel=\"next\"` (RFC 8288) when another page follows"))),
        (status = 400, description = "an unknown filter value, a bad limit or cursor; `field` names it", body = ErrorBody),
    )
)]
async fn list_volumes(
    State(st): State<AppState>,
    q: Result<Query<VolumesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| query_error(e, &["vm_id", "state", "name", "limit", "after"]))?;
    let state = enum_filter(
        "state",
        q.state.as_deref(),
        VolumeState::parse,
        VolumeState::ALL,
    )?;
    let filter = VolumeFilter {
        vm_id: q.vm_id.filter(|s| !s.is_empty()),
        state,
        name: q.name.filter(|s| !s.is_empty()),
        limit: page::limit(q.limit.as_deref())?,
        after: page::after(q.after.as_deref(), page::CursorKey::Created)?,
    };
    let (views, next) = st.engine.volume_page(&filter).await?;
    let link = match (next, filter.limit) {
        (Some(next), Some(limit)) => Some(page::next_link(
            "/volumes",
            &[
                ("vm_id", filter.vm_id.clone()),
                ("state", filter.state.map(|s| s.to_string())),
                ("name", filter.name.clone()),
            ],
            limit,
            &next,
        )?),
        _ => None,
    };
    let items = views
        .into_iter()
        .map(convert::volume_status)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(page::json_array(items, link))
}

#[utoipa::path(
    get,
    path = "/volumes/{id}",
    tag = "volumes",
    params(("id" = Uuid, Path, description = "volume id")),
    responses(
        (status = 200, description = "the volume's real status: record, attachment, device, export, the cloud's view", body = VolumeStatus),
        (status = 404, description = "unknown volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn get_volume(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let v = st.engine.volume_view(volume_id).await?.ok_or_else(|| {
        ApiError::NotFound(format!("volume {volume_id} is not known to the daemon"))
    })?;
    Ok(Json(convert::volume_status(v)?).into_response())
}

#[utoipa::path(
    get,
    path = "/volumes/{id}/device",
    tag = "devices",
    params(("id" = Uuid, Path, description = "volume id")),
    responses(
        (status = 200, description = "the device mapping of an attached volume", body = DeviceMapping),
        (status = 404, description = "not attached", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn get_device(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let d = st
        .engine
        .device_of_volume(volume_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("mapping not found for volume: {volume_id}")))?;
    Ok(Json(convert::device_mapping(&d)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceQuery {
    path: String,
}

#[utoipa::path(
    get,
    path = "/devices/volume",
    tag = "devices",
    params(("path" = String, Query, description = "a device path: by-id, kernel or stable name")),
    responses(
        (status = 200, description = "the mapping of the volume with that device", body = DeviceMapping),
        (status = 400, description = "no path given", body = ErrorBody),
        (status = 404, description = "no attached volume has that device", body = ErrorBody),
    )
)]
async fn device_to_volume(
    State(st): State<AppState>,
    q: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| query_error(e, &["path"]))?;
    let d =
        st.engine.device_by_path(&q.path).await?.ok_or_else(|| {
            ApiError::NotFound(format!("no attached volume has device {}", q.path))
        })?;
    Ok(Json(convert::device_mapping(&d)).into_response())
}

#[utoipa::path(
    get,
    path = "/vms/{vm_id}/volumes",
    tag = "volumes",
    params(("vm_id" = String, Path, description = "CloudStack VM id")),
    responses((status = 200, description = "volumes attached to that VM", body = Vec<VmVolume>))
)]
async fn vm_volumes(
    State(st): State<AppState>,
    Path(vm_id): Path<String>,
) -> Result<Response, ApiError> {
    let atts = st.engine.vm_volumes(vm_id).await?;
    let out: Vec<_> = atts.iter().map(|(a, v)| convert::vm_volume(a, v)).collect();
    Ok(Json(out).into_response())
}

/// `GET /cloud/zones`: the zones the cloud lists, by name.
#[utoipa::path(
    get,
    path = "/cloud/zones",
    tag = "cloud",
    responses(
        (status = 200, description = "the cloud's zones, by name", body = Vec<CloudZone>),
        (status = 503, description = "CloudStack cannot be reached", body = ErrorBody),
    )
)]
async fn cloud_zones(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out: Vec<CloudZone> = st
        .engine
        .cloud_zones()
        .await?
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
#[utoipa::path(
    get,
    path = "/cloud/offerings",
    tag = "cloud",
    responses(
        (status = 200, description = "the cloud's disk offerings, by name", body = Vec<CloudOffering>),
        (status = 503, description = "CloudStack cannot be reached", body = ErrorBody),
    )
)]
async fn cloud_offerings(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out: Vec<CloudOffering> = st
        .engine
        .cloud_offerings()
        .await?
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
#[utoipa::path(
    get,
    path = "/cloud/vms",
    tag = "cloud",
    responses(
        (status = 200, description = "the cloud's VMs, by name, the appliance marked", body = Vec<CloudVm>),
        (status = 503, description = "CloudStack cannot be reached", body = ErrorBody),
    )
)]
async fn cloud_vms(State(st): State<AppState>) -> Result<Response, ApiError> {
    let appliance = st.engine.appliance().await.vm_id;
    let mut out: Vec<CloudVm> = st
        .engine
        .cloud_vms()
        .await?
        .into_iter()
        .map(|vm| CloudVm {
            appliance: appliance.as_deref() == Some(vm.id.as_str()),
            id: vm.id,
            name: vm.name,
            state: vm.state.as_str().into(),
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
    limit: Option<String>,
    after: Option<String>,
}

#[utoipa::path(
    get,
    path = "/operations",
    tag = "operations",
    params(
        ("type" = Option<OperationType>, Query, description = "only this kind"),
        ("status" = Option<OperationStatus>, Query, description = "only this status"),
        ("volume_id" = Option<Uuid>, Query, description = "only on this volume"),
        ("vm_id" = Option<String>, Query, description = "only for this VM"),
        ("limit" = Option<u32>, Query, description = "a page of at most this many (1 to 1000); a `Link: <…>; rel=\"next\"` header names the next page"),
        ("after" = Option<String>, Query, description = "the cursor of the next page, as the `Link` header of the previous one gives it"),
    ),
    responses(
        (status = 200, description = "newest first; an empty array when none match; with `limit`, one page and a `Link` header when there are more",
         body = Vec<Operation>,
         headers(("Link" = String, description = "`<URL>; rel=\"next\"` (RFC 8288) when another page follows"))),
        (status = 400, description = "an unknown filter value, a bad limit or cursor; `field` names it", body = ErrorBody),
    )
)]
async fn list_operations(
    State(st): State<AppState>,
    q: Result<Query<OpsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| {
        query_error(
            e,
            &["type", "status", "volume_id", "vm_id", "limit", "after"],
        )
    })?;
    let op_type = enum_filter(
        "type",
        q.op_type.as_deref(),
        OperationType::parse,
        OperationType::ALL,
    )?;
    let status = enum_filter(
        "status",
        q.status.as_deref(),
        OperationStatus::parse,
        OperationStatus::ALL,
    )?;
    let volume_id = volume_id_filter(q.volume_id.as_deref())?;
    let filter = OperationFilter {
        op_type,
        status,
        volume_id,
        vm_id: q.vm_id.filter(|s| !s.is_empty()),
        limit: page::limit(q.limit.as_deref())?,
        after: page::after(q.after.as_deref(), page::CursorKey::Created)?,
    };
    let ops = st.engine.operations(&filter).await?;
    let link = match (ops.next, filter.limit) {
        (Some(next), Some(limit)) => Some(page::next_link(
            "/operations",
            &[
                ("type", filter.op_type.map(|t| t.as_str().to_string())),
                ("status", filter.status.map(|s| s.as_str().to_string())),
                ("volume_id", filter.volume_id.map(|v| v.to_string())),
                ("vm_id", filter.vm_id.clone()),
            ],
            limit,
            &next,
        )?),
        _ => None,
    };
    let items = ops
        .items
        .iter()
        .map(convert::operation)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(page::json_array(items, link))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait: Option<String>,
}

#[utoipa::path(
    get,
    path = "/operations/{id}",
    tag = "operations",
    params(("id" = Uuid, Path, description = "operation id"),
           ("wait" = Option<f64>, Query, description = "long-poll up to this many seconds (at most 300) until terminal")),
    responses(
        (status = 200, description = "the operation", body = Operation),
        (status = 400, description = "not a UUID, or a bad wait", body = ErrorBody),
        (status = 404, description = "unknown operation", body = ErrorBody),
    )
)]
async fn get_operation(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad("id", format!("operation id {} is not a UUID", echo(&id))))?;
    let Query(q) = q.map_err(|e| query_error(e, &["wait"]))?;
    // An empty parameter is no parameter, as in the listings.
    let wait = match q.wait.as_deref().filter(|w| !w.is_empty()).map(|w| {
        w.trim().parse::<f64>().map_err(|_| {
            ApiError::bad(
                "wait",
                format!("wait {} is not a number of seconds", echo(w)),
            )
        })
    }) {
        None => Duration::ZERO,
        Some(Err(e)) => return Err(e),
        Some(Ok(w)) => match w {
            w if w.is_finite() && w >= 0.0 => Duration::from_secs_f64(w.min(MAX_WAIT_SECS as f64)),
            _ => {
                return Err(ApiError::bad(
                    "wait",
                    "wait must be a non-negative number of seconds",
                ))
            }
        },
    };
    let op = st
        .engine
        .operation(id, wait)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("operation not found: {id}")))?;
    Ok(Json(convert::operation(&op)?).into_response())
}

#[utoipa::path(
    post,
    path = "/exports",
    tag = "exports",
    request_body = CreateExportRequest,
    responses(
        (status = 201, description = "the volume's export, served again when it was not", body = Export),
        (status = 400, description = "invalid input (`read_only` is not supported)", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 409, description = "not attached to the appliance, or not its device, or volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
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
    Ok((
        StatusCode::CREATED,
        Json(convert::export(&st.engine.export_of(rec))),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportsQuery {
    limit: Option<String>,
    after: Option<String>,
    volume_id: Option<String>,
    status: Option<String>,
    vm_name: Option<String>,
}

#[utoipa::path(
    get,
    path = "/exports",
    tag = "exports",
    params(
        ("limit" = Option<u32>, Query, description = "a page of at most this many (1 to 1000); a `Link: <…>; rel=\"next\"` header names the next page"),
        ("after" = Option<String>, Query, description = "the cursor of the next page, as the `Link` header of the previous one gives it"),
        ("volume_id" = Option<Uuid>, Query, description = "only the export of this volume"),
        ("status" = Option<ExportStatus>, Query, description = "only exports in this status (a page may then hold fewer than `limit`)"),
        ("vm_name" = Option<String>, Query, description = "the predecessor's filter by the VM name given to its `POST /exports`, which this daemon does not record: refused (400) unless empty"),
    ),
    responses(
        (status = 200, description = "the recorded exports with their live state, by export name; `count` counts this page; with `limit`, a `Link` header when there are more",
         body = ExportList,
         headers(("Link" = String, description = "`<URL>; rel=\"next\"` (RFC 8288) when another page follows"))),
        (status = 400, description = "a bad limit, cursor or filter; `field` names it", body = ErrorBody),
    )
)]
async fn list_exports(
    State(st): State<AppState>,
    q: Result<Query<ExportsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| query_error(e, &["limit", "after", "volume_id", "status", "vm_name"]))?;
    let limit = page::limit(q.limit.as_deref())?;
    let after = page::after(q.after.as_deref(), page::CursorKey::ExportName)?;
    let status = enum_filter(
        "status",
        q.status.as_deref(),
        ExportStatus::parse,
        ExportStatus::ALL,
    )?;
    let volume_id = volume_id_filter(q.volume_id.as_deref())?;
    if q.vm_name.as_deref().is_some_and(|n| !n.is_empty()) {
        return Err(ApiError::bad(
            "vm_name",
            "exports are not recorded with a VM name (the predecessor kept the one its POST /exports was \
             given); filter by volume_id or status",
        ));
    }
    let (views, next) = match volume_id {
        // One volume has at most one export: no page to turn.
        Some(v) => (
            st.engine
                .export(v)
                .await?
                .into_iter()
                .filter(|e| after.as_ref().is_none_or(|c| e.record.export_name > c.key))
                .collect(),
            None,
        ),
        None => st.engine.export_list(limit, after.as_ref()).await?,
    };
    let exports: Vec<_> = views
        .iter()
        .map(convert::export)
        .filter(|e| status.is_none_or(|s| e.status == s))
        .collect();
    let mut resp = Json(ExportList {
        count: exports.len(),
        exports,
    })
    .into_response();
    if let (Some(next), Some(limit)) = (next, limit) {
        resp.headers_mut().insert(
            header::LINK,
            page::next_link(
                "/exports",
                &[("status", status.map(|s| s.as_str().to_string()))],
                limit,
                &next,
            )?,
        );
    }
    Ok(resp)
}

#[utoipa::path(
    get,
    path = "/exports/{volume_id}",
    tag = "exports",
    params(("volume_id" = Uuid, Path, description = "volume id")),
    responses(
        (status = 200, description = "the export", body = Export),
        (status = 404, description = "no export for that volume", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn get_export(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let e = st
        .engine
        .export(volume_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no export for volume {volume_id}")))?;
    Ok(Json(convert::export(&e)).into_response())
}

#[utoipa::path(
    delete,
    path = "/exports/{volume_id}",
    tag = "exports",
    params(("volume_id" = Uuid, Path, description = "volume id")),
    responses(
        (status = 200, description = "the export is drained and removed (`removed` true; the attachment stays), or there was none, also for a volume the daemon does not know (`removed` false): the predecessor's delete was idempotent, and its clients take 200 as done", body = ExportRemoved),
        (status = 400, description = "the volume id is not a UUID", body = ErrorBody),
        (status = 409, description = "volume held by another appliance sharing the database (`volume_owned_by_other_appliance`)", body = ErrorBody),
    )
)]
async fn delete_export(
    State(st): State<AppState>,
    Path(id): Path<String>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let volume_id = parse_volume_id(&id)?;
    let removed = st.engine.remove_export(volume_id).await?;
    Ok(Json(ExportRemoved {
        message: if removed {
            "NBD export deleted successfully"
        } else {
            "no export existed for this volume"
        }
        .into(),
        volume_id,
        removed,
    })
    .into_response())
}

#[utoipa::path(
    get,
    path = "/appliance",
    tag = "appliance",
    responses((status = 200, description = "the appliance identity, its source and verification", body = Appliance))
)]
async fn get_appliance(State(st): State<AppState>) -> Response {
    Json(convert::appliance(&st.engine.appliance().await)).into_response()
}

#[utoipa::path(
    put,
    path = "/appliance",
    tag = "appliance",
    request_body = SetApplianceRequest,
    responses(
        (status = 200, description = "stored and verified", body = Appliance),
        (status = 400, description = "empty vm_id", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
        (status = 409, description = "fixed by configuration (`appliance_identity_fixed`), or the VM's appliance lease is held by another daemon (`appliance_lease_held`)", body = ErrorBody),
        (status = 422, description = "no such VM", body = ErrorBody),
        (status = 503, description = "CloudStack cannot verify it now", body = ErrorBody),
    )
)]
async fn put_appliance(
    State(st): State<AppState>,
    JsonBody(body): JsonBody<SetApplianceRequest>,
) -> Result<Response, ApiError> {
    if body.vm_id.trim().is_empty() {
        return Err(ApiError::bad("vm_id", "vm_id must not be empty"));
    }
    let s = st.engine.set_appliance(body.vm_id.trim()).await?;
    // The lease moved with the identity: /health names the one held now.
    if let Some(lease) = st.engine.lease() {
        st.health
            .set_fact(volume_api::HealthComponent::Lease, true, lease.detail());
    }
    Ok(Json(convert::appliance(&s)).into_response())
}

#[utoipa::path(
    post,
    path = "/reconcile",
    tag = "reconcile",
    request_body(content = Option<ReconcileRequest>, description = "dry run unless `apply`"),
    responses(
        (status = 200, description = "the drift found (and repaired with `apply`)", body = ReconcileReport),
        (status = 400, description = "a body that is not a reconcile request", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
    )
)]
async fn reconcile(
    State(st): State<AppState>,
    body: Option<JsonBody<ReconcileRequest>>,
) -> Result<Response, ApiError> {
    let apply = body.map(|JsonBody(b)| b.apply).unwrap_or(false);
    let report = crate::reconcile::run(&st.engine, apply).await?;
    crate::watch::publish(&st.health, st.engine.metrics(), &report);
    Ok(Json(report).into_response())
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "this document, generated from the wire types", content_type = "application/json", body = serde_json::Value))
)]
async fn openapi() -> Response {
    Json(openapi::document()).into_response()
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "Prometheus text (also at /metrics)", content_type = "text/plain", body = String))
)]
async fn metrics(State(st): State<AppState>) -> Response {
    let exports = st.engine.live_exports().len();
    let unfinished = st
        .engine
        .unfinished_count()
        .await
        .map(|n| n as f64)
        .unwrap_or(f64::NAN);
    let ready = if st.health.is_ready() { 1.0 } else { 0.0 };
    let nbd = st.health.nbd_connections();
    let (open, limit) = nbd
        .as_ref()
        .map_or((f64::NAN, f64::NAN), |p| (p.open() as f64, p.max() as f64));
    let refused = nbd.map_or(f64::NAN, |p| p.refused_full() as f64);
    let body = st.engine.metrics_text(&[
        (
            "volume_daemon_ready",
            "1 when the daemon serves requests.",
            ready,
        ),
        (
            "volume_daemon_nbd_connections",
            "NBD connections open (negotiating or with a session).",
            open,
        ),
        (
            "volume_daemon_nbd_connection_limit",
            "NBD connections allowed at once (nbd_max_connections).",
            limit,
        ),
        (
            "volume_daemon_nbd_connections_refused_full_total",
            "NBD connections refused since start because every open one had a session.",
            refused,
        ),
        (
            "volume_daemon_operations_unfinished",
            "Operations pending or executing.",
            unfinished,
        ),
        ("volume_daemon_exports", "Live NBD exports.", exports as f64),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
