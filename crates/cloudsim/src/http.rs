//! The HTTP face: `/client/api` (GET and form POST) with CloudStack's signature check (versions 2 and 3)
//! and response shapes, the `/sim/faults` admin endpoint and the `/sim/vms`, `/sim/volumes` actions.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::engine::{Engine, Params};
use crate::error::ActionError;
use crate::faults::FaultSpec;
use crate::model::{CsError, VmState};

/// Credentials the simulator accepts.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub api_key: String,
    pub secret_key: String,
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub engine: Arc<Engine>,
    pub creds: Arc<Credentials>,
}

/// The router: a function of the shared state.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/client/api", get(client_api).post(client_api))
        .route(
            "/sim/faults",
            get(list_faults).post(add_faults).delete(clear_faults),
        )
        .route("/sim/vms", post(deploy_vm))
        .route("/sim/vms/{id}/stop", post(stop_vm))
        .route("/sim/vms/{id}/start", post(start_vm))
        .route("/sim/volumes/{id}/detach", post(force_detach))
        .with_state(state)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string or form body into name/value pairs.
pub(crate) fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode_component(k), decode_component(v)),
            None => (decode_component(pair), String::new()),
        })
        .collect()
}

fn parse_expires(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let utc = |d: chrono::DateTime<chrono::FixedOffset>| d.with_timezone(&chrono::Utc);
    chrono::DateTime::parse_from_rfc3339(s)
        .map(utc)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%z").map(utc))
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z").map(utc))
        .ok()
}

/// Checks the API key, the signature and (version 3) the expiry, as `ApiServer.verifyRequest` does.
pub(crate) fn authenticate(creds: &Credentials, params: &Params) -> bool {
    let (Some(key), Some(sig)) = (params.get("apiKey"), params.get("signature")) else {
        return false;
    };
    if key != creds.api_key {
        return false;
    }
    if params.get("signatureVersion") == Some("3") {
        let Some(expires) = params.get("expires").and_then(parse_expires) else {
            return false;
        };
        if expires <= chrono::Utc::now() {
            return false;
        }
    }
    let signed: Vec<(String, String)> = params
        .0
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("signature"))
        .cloned()
        .collect();
    cloudstack::sign::verify(&creds.secret_key, &signed, sig)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

/// `<command>response` for a command the API knows, else `errorresponse` (as
/// `ApiServer.getSerializedApiError` names errors of unknown or missing commands).
fn wrapper_key(command: Option<&str>) -> String {
    match command {
        Some(c) if Engine::knows(c) => format!("{}response", c.to_ascii_lowercase()),
        _ => "errorresponse".to_owned(),
    }
}

fn error_response(command: Option<&str>, e: &CsError) -> Response {
    let status = StatusCode::from_u16(e.errorcode).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({ "uuidList": [], "errorcode": e.errorcode, "errortext": e.errortext });
    if e.cserrorcode != 0 {
        body["cserrorcode"] = json!(e.cserrorcode);
    }
    json_response(status, &json!({ wrapper_key(command): body }))
}

async fn client_api(
    State(app): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut pairs = uri.query().map(parse_form).unwrap_or_default();
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if is_form || (!body.is_empty() && headers.get(header::CONTENT_TYPE).is_none()) {
        pairs.extend(parse_form(&String::from_utf8_lossy(&body)));
    }
    let params = Params(pairs);
    let command = params.get("command").map(str::to_owned);
    // `ApiServer.verifyRequest` refuses a request without a command, with a bad key or signature, or
    // naming a command the caller cannot use (unknown or mis-cased: the API registry is case-sensitive)
    // alike, and `ApiServlet` answers all of them 401.
    if !authenticate(&app.creds, &params) {
        return error_response(command.as_deref(), &CsError::unauthorized());
    }
    let Some(command) = command.filter(|c| Engine::knows(c)) else {
        return error_response(None, &CsError::unauthorized());
    };
    let engine = &app.engine;
    if engine.faults.take_throttle() {
        let e = CsError {
            errorcode: 429,
            cserrorcode: 4250,
            errortext: format!(
                "The given command '{command}' has reached the API limit; retry later"
            ),
        };
        return error_response(Some(&command), &e);
    }
    if let Some(e) = engine.faults.take_command_failure(&command) {
        return error_response(Some(&command), &e);
    }
    let delay = engine.faults.take_command_delay(&command);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let result = {
        let engine = Arc::clone(engine);
        let command = command.clone();
        tokio::task::spawn_blocking(move || engine.execute(&command, &params)).await
    };
    if let Some((status, body)) = engine.faults.take_answer_replacement(&command) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        let media = if body.trim_start().starts_with('<') {
            "text/html"
        } else {
            "application/json"
        };
        return (status, [(header::CONTENT_TYPE, media)], body).into_response();
    }
    match result {
        Ok(Ok(body)) => json_response(
            StatusCode::OK,
            &json!({ wrapper_key(Some(&command)): body }),
        ),
        Ok(Err(e)) => error_response(Some(&command), &e),
        Err(e) => {
            tracing::error!(error = %e, "command handler panicked");
            error_response(
                Some(&command),
                &CsError::internal("internal error executing the command"),
            )
        }
    }
}

fn action_response(r: Result<Value, ActionError>) -> Response {
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e @ ActionError::Refused { .. }) => {
            json_response(StatusCode::CONFLICT, &json!({ "error": e.to_string() }))
        }
        Err(e @ ActionError::NotRunning) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": e.to_string() }),
        ),
    }
}

/// Runs an action on a blocking thread (it takes the state lock and syncs the log).
async fn act(
    app: AppState,
    f: impl FnOnce(&crate::faults::FaultHandle) -> Result<Value, ActionError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(move || f(&app.engine.faults)).await {
        Ok(r) => action_response(r),
        Err(e) => {
            tracing::error!(error = %e, "action panicked");
            json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "error": "internal error running the action" }),
            )
        }
    }
}

/// `POST /sim/vms` with `{"name": …}` (optional): a new running KVM VM.
async fn deploy_vm(State(app): State<AppState>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct Deploy {
        name: Option<String>,
    }
    let name = match serde_json::from_slice::<Deploy>(&body) {
        Ok(d) => d.name,
        Err(_) if body.is_empty() => None,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("the body must be {{\"name\": \"…\"}}: {e}") }),
            )
        }
    };
    let name = name.unwrap_or_else(|| "deployed-vm".to_owned());
    act(app, move |f| f.deploy_vm(&name)).await
}

async fn stop_vm(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    act(app, move |f| f.set_vm_state_json(&id, VmState::Stopped)).await
}

async fn start_vm(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    act(app, move |f| f.set_vm_state_json(&id, VmState::Running)).await
}

async fn force_detach(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    act(app, move |f| f.detach_volume_json(&id)).await
}

async fn list_faults(State(app): State<AppState>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "faults": app.engine.faults.list() }),
    )
}

async fn add_faults(State(app): State<AppState>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(FaultSpec),
        Many(Vec<FaultSpec>),
    }
    match serde_json::from_slice::<OneOrMany>(&body) {
        Ok(parsed) => {
            let list = match parsed {
                OneOrMany::One(f) => vec![f],
                OneOrMany::Many(v) => v,
            };
            for f in list {
                app.engine.faults.add(f);
            }
            json_response(
                StatusCode::OK,
                &json!({ "faults": app.engine.faults.list() }),
            )
        }
        Err(e) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": format!("invalid fault specification (see README for the shapes): {e}") }),
        ),
    }
}

async fn clear_faults(State(app): State<AppState>) -> Response {
    app.engine.faults.clear();
    json_response(StatusCode::OK, &json!({ "faults": [] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(
            parse_form("a=1&name=vol+a%2Ab%7Ec&x=&y&bad=%zz%4"),
            vec![
                ("a".into(), "1".into()),
                ("name".into(), "vol a*b~c".into()),
                ("x".into(), "".into()),
                ("y".into(), "".into()),
                ("bad".into(), "%zz%4".into()),
            ]
        );
    }

    #[test]
    fn expires_formats() {
        assert!(parse_expires("2026-08-12T10:00:00Z").is_some());
        assert!(parse_expires("2026-08-12T10:00:00+0000").is_some());
        assert!(parse_expires("2026-08-12T10:00:00.123+02:00").is_some());
        assert!(parse_expires("yesterday").is_none());
    }
}
