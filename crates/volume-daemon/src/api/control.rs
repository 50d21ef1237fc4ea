//! Control characters are refused at the edge: a NUL or any other control character (Unicode category Cc:
//! U+0000–U+001F, U+007F–U+009F) in a path parameter, a query parameter, the `Idempotency-Key` header or any
//! string (or object key) of a JSON body is a 400 `invalid_request` naming the field, before anything is
//! journaled or sent to the cloud. Such text cannot be stored by every database (PostgreSQL refuses NUL), so
//! letting it in would leave a cloud volume without a record or a journal entry that cannot be finished.

use axum::extract::{Query, RawPathParams, Request};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::Value;
use volume_api::IDEMPOTENCY_KEY_HEADER;

use super::error::ApiError;
use crate::engine::{control_in_json, has_control};

fn refused(field: &str, what: &str) -> ApiError {
    ApiError::bad(
        field,
        format!("{what} {field} contains a control character (such as NUL); send printable text"),
    )
}

/// Refuses a body that is not one JSON value (trailing text included), and one with a control character in
/// any string, naming the field; returns the value. Every body the typed parse may accept has been through
/// this check.
pub(crate) fn check_json(bytes: &[u8]) -> Result<Value, ApiError> {
    let v = serde_json::from_slice::<Value>(bytes).map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!("request body is not valid JSON: {e}"),
    })?;
    match control_in_json(&v) {
        Some(field) => Err(refused(&field, "request body field")),
        None => Ok(v),
    }
}

/// Middleware of every route: refuses control characters in path parameters, query parameters and the
/// `Idempotency-Key` header, and a malformed `Idempotency-Key` on any mutation.
pub(crate) async fn refuse_control_characters(
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    match &params {
        Ok(params) => {
            if let Some((name, _)) = params.iter().find(|(_, value)| has_control(value)) {
                return Err(refused(
                    path_field(name, req.uri().path()),
                    "path parameter",
                ));
            }
        }
        // A parameter that does not decode to UTF-8: named, like any other bad field (the rejection names
        // the parameter in backticks).
        Err(e) => {
            let text = e.body_text();
            if let Some(name) = text.split('`').nth(1) {
                let field = path_field(name, req.uri().path());
                return Err(ApiError::bad(
                    field,
                    format!(
                        "path parameter {field} is not UTF-8 once percent-decoded; send UTF-8 text"
                    ),
                ));
            }
        }
    }
    // A query that does not decode is reported by the handler's own extractor.
    if let Ok(Query(pairs)) = Query::<Vec<(String, String)>>::try_from_uri(req.uri()) {
        if let Some((name, _)) = pairs
            .iter()
            .find(|(name, value)| has_control(name) || has_control(value))
        {
            let field = if has_control(name) { "query" } else { name };
            return Err(refused(field, "query parameter"));
        }
    }
    if let Some(v) = req.headers().get(IDEMPOTENCY_KEY_HEADER) {
        if v.as_bytes().iter().any(|b| b.is_ascii_control()) {
            return Err(refused(IDEMPOTENCY_KEY_HEADER, "header"));
        }
    }
    // Every mutation takes the header in the same form, also one that is idempotent by nature and so
    // has no use for it.
    if !req.method().is_safe() {
        super::idempotency_key(req.headers())?;
    }
    Ok(next.run(req).await)
}

/// The field name a path parameter is reported under: the routes call a volume's id `id` (reported as
/// `volume_id`), except `/operations/{id}`, an operation's.
fn path_field<'a>(param: &'a str, path: &str) -> &'a str {
    let operation = path
        .strip_prefix(volume_api::API_PREFIX)
        .unwrap_or(path)
        .starts_with("/operations/");
    match param {
        "id" if !operation => "volume_id",
        other => other,
    }
}
