//! API errors: every failure maps to one HTTP status in one exhaustive `match`, with the body
//! `{"error": "...", "code": "...", "field": "..."}`. Internal details are logged, not sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use volume_api::{ErrorBody, ErrorCode};

use crate::cloud::CloudErrorKind;
use crate::engine::EngineError;
use crate::identity::{IdentityError, IdentitySetError};
use crate::store::{StoreError, StoreErrorKind};

/// A failed API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    #[error("request body is larger than {limit} bytes; send at most {limit}")]
    TooLarge { limit: usize },
    /// A body in another media type, or with a content coding (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A transfer coding other than chunked (501).
    #[error("{0}")]
    UnsupportedTransferCoding(String),
    /// The body did not arrive in time (408); the connection is closed.
    #[error(
        "the request body did not arrive within api_header_timeout_secs ({secs} s); send it at once"
    )]
    BodyTimedOut { secs: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("missing or wrong bearer token: send Authorization: Bearer <api_token>")]
    Unauthorized,
    #[error("method {method} is not allowed on {path}; see /api/v1/openapi.json")]
    MethodNotAllowed { method: String, path: String },
    #[error(
        "the request was not answered within api_request_timeout_secs ({secs} s); retry it, or wait \
         for an operation with a shorter ?wait="
    )]
    TimedOut { secs: u64 },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Identity(#[from] IdentitySetError),
}

/// Characters of a caller's value an error message (or its field) repeats.
const ECHO_CHARS: usize = 64;
/// Characters of an error message sent at most: no message the daemon writes is near this, and quoted
/// values in a library's words are cut to [`ECHO_CHARS`] (see [`cut_quoted`]); this bounds the rest.
const MESSAGE_CHARS: usize = 4096;

/// `text` up to `max` characters when it is longer.
fn cut(text: &str, max: usize) -> Option<&str> {
    text.char_indices().nth(max).map(|(at, _)| &text[..at])
}

/// A caller's value as an error message shows it: quoted and escaped, cut after [`ECHO_CHARS`] characters
/// with its length in bytes, so that a huge value is not sent back (or logged) whole.
pub(super) fn echo(value: &str) -> String {
    match cut(value, ECHO_CHARS) {
        None => format!("{value:?}"),
        Some(head) => format!("{head:?}… ({} bytes)", value.len()),
    }
}

/// `text` with every quoted part (in `"` or backticks, as serde and the HTTP layer quote what they were
/// sent) over [`ECHO_CHARS`] characters cut like [`echo`]: refusals written by libraries repeat the
/// caller's value (an unknown field's name, a string of the wrong type) whole.
fn cut_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MESSAGE_CHARS));
    let mut rest = text;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        let inner = &rest[open + 1..];
        // The closing quote: the next one not escaped by a backslash.
        let mut close = None;
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            if c == quote && !escaped {
                close = Some(i);
                break;
            }
            escaped = c == '\\' && !escaped;
        }
        let Some(close) = close else {
            out.push_str(inner);
            return out;
        };
        let quoted = &inner[..close];
        match cut(quoted, ECHO_CHARS) {
            None => {
                out.push_str(quoted);
                out.push(quote);
            }
            Some(head) => {
                out.push_str(head);
                out.push(quote);
                out.push_str(&format!("… ({} bytes)", quoted.len()));
            }
        }
        rest = &inner[close + quote.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// `text` cut after `max` characters, saying how long it was.
fn clip(text: String, max: usize) -> String {
    match cut(&text, max) {
        None => text,
        Some(head) => format!("{head}… ({} bytes)", text.len()),
    }
}

impl ApiError {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    fn parts(&self) -> (StatusCode, ErrorCode, Option<String>) {
        match self {
            Self::BadRequest { field, .. } => (
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                field.clone(),
            ),
            Self::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::InvalidRequest,
                None,
            ),
            Self::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::InvalidRequest,
                None,
            ),
            Self::UnsupportedTransferCoding(_) => {
                (StatusCode::NOT_IMPLEMENTED, ErrorCode::InvalidRequest, None)
            }
            Self::BodyTimedOut { .. } => {
                (StatusCode::REQUEST_TIMEOUT, ErrorCode::InvalidRequest, None)
            }
            Self::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound, None),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, None),
            Self::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::InvalidRequest,
                None,
            ),
            Self::TimedOut { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                None,
            ),
            Self::Identity(e) => match e {
                IdentitySetError::Identity(IdentityError::Fixed(_)) => (
                    StatusCode::CONFLICT,
                    ErrorCode::ApplianceIdentityFixed,
                    Some("vm_id".into()),
                ),
                IdentitySetError::Identity(IdentityError::NoSuchVm(_)) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCode::NoSuchVm,
                    Some("vm_id".into()),
                ),
                IdentitySetError::Identity(IdentityError::CloudUnavailable { .. }) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::CloudUnavailable,
                    None,
                ),
                IdentitySetError::Identity(IdentityError::Unknown(_))
                | IdentitySetError::Identity(IdentityError::Unverified { .. })
                | IdentitySetError::Identity(IdentityError::LookupFailed { .. }) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::ApplianceIdentityUnknown,
                    None,
                ),
                IdentitySetError::Store(e) => (store_status(e), ErrorCode::DatabaseError, None),
                IdentitySetError::LeaseHeld(_) => (
                    StatusCode::CONFLICT,
                    ErrorCode::ApplianceLeaseHeld,
                    Some("vm_id".into()),
                ),
            },
            Self::Engine(e) => {
                let code = e.code();
                match e {
                    EngineError::Invalid { field, .. } => {
                        (StatusCode::BAD_REQUEST, code, Some((*field).to_string()))
                    }
                    EngineError::NotFound(_) => (StatusCode::NOT_FOUND, code, None),
                    EngineError::Conflict(_)
                    | EngineError::OwnedElsewhere { .. }
                    | EngineError::VolumeAttached(_) => (StatusCode::CONFLICT, code, None),
                    EngineError::NoSuchVm(_) => {
                        (StatusCode::UNPROCESSABLE_ENTITY, code, Some("vm_id".into()))
                    }
                    EngineError::IdempotencyKeyReused(_) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        code,
                        Some(volume_api::IDEMPOTENCY_KEY_HEADER.into()),
                    ),
                    EngineError::Identity(_) => (StatusCode::SERVICE_UNAVAILABLE, code, None),
                    EngineError::NotAccepting => (StatusCode::SERVICE_UNAVAILABLE, code, None),
                    EngineError::Store(s) => (store_status(s), code, None),
                    EngineError::Cloud(c) if c.kind == CloudErrorKind::Unavailable => {
                        (StatusCode::SERVICE_UNAVAILABLE, code, None)
                    }
                    EngineError::Cloud(_) | EngineError::CloudJobUnknown { .. } => {
                        (StatusCode::BAD_GATEWAY, code, None)
                    }
                    EngineError::Device(_)
                    | EngineError::Export(_)
                    | EngineError::Compensated { .. }
                    | EngineError::CloudDisagrees(_)
                    | EngineError::Interrupted(_)
                    | EngineError::Journal { .. }
                    | EngineError::Panicked(_) => (StatusCode::INTERNAL_SERVER_ERROR, code, None),
                }
            }
        }
    }
}

fn store_status(e: &StoreError) -> StatusCode {
    match e.kind() {
        StoreErrorKind::NotFound => StatusCode::NOT_FOUND,
        StoreErrorKind::Conflict => StatusCode::CONFLICT,
        StoreErrorKind::Unavailable | StoreErrorKind::Fenced => StatusCode::SERVICE_UNAVAILABLE,
        StoreErrorKind::SchemaTooNew | StoreErrorKind::Corrupt | StoreErrorKind::Other => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.parts();
        // A refusal of the caller's request, not a failure of the daemon's, although 5xx.
        let refusal = matches!(self, Self::UnsupportedTransferCoding(_));
        let message = if status.is_server_error() && !refusal {
            // Full chain in the log; the caller gets the chain too, since it names what failed and what to do,
            // but never secrets (errors never carry them).
            let chain = crate::error_chain(&self);
            tracing::error!(status = status.as_u16(), code = %code, error = %chain, "request failed");
            chain
        } else {
            // A refusal may repeat what the caller sent, in a library's words: cut like any echo.
            cut_quoted(&crate::error_chain(&self))
        };
        let mut resp = (
            status,
            Json(ErrorBody {
                error: clip(message, MESSAGE_CHARS),
                code,
                // A field can be a name the caller sent (an unknown one): cut like a value.
                field: field.map(|f| clip(f, ECHO_CHARS)),
            }),
        )
            .into_response();
        let headers = resp.headers_mut();
        match status {
            // RFC 9110 11.6.1: a 401 names the scheme the caller must use (RFC 6750 3).
            StatusCode::UNAUTHORIZED => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"volume-daemon\""),
                );
            }
            // What is left of the body is not read: the connection cannot carry another request.
            StatusCode::REQUEST_TIMEOUT | StatusCode::NOT_IMPLEMENTED => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

/// Answers each request within `limit` ([`ApiError::TimedOut`] beyond it), and gives every error answer
/// the documented JSON shape: the router's and extractors' own refusals (a method a path does not take,
/// a path parameter that is not UTF-8, …) come as plain text or empty otherwise.
pub(super) async fn answer_within(
    limit: std::time::Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let Ok(resp) = tokio::time::timeout(limit, next.run(req)).await else {
        return ApiError::TimedOut {
            secs: limit.as_secs(),
        }
        .into_response();
    };
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), MESSAGE_CHARS * 4).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let said = |what: &str| {
        if text.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {text}")
        }
    };
    let err = match status {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed {
            method: echo(method.as_str()),
            path: echo(&path),
        },
        StatusCode::NOT_FOUND => ApiError::NotFound(said("not found")),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
            limit: super::extract::MAX_BODY,
        },
        s if s.is_client_error() => ApiError::BadRequest {
            field: None,
            message: said("malformed request"),
        },
        _ => {
            return (
                status,
                Json(ErrorBody {
                    error: clip(said("the request failed"), MESSAGE_CHARS),
                    code: ErrorCode::Internal,
                    field: None,
                }),
            )
                .into_response()
        }
    };
    let mut out = err.into_response();
    if status.is_client_error() {
        // The refusal keeps its own status (415, 422, …), with the shape of every other error.
        *out.status_mut() = status;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_echoed_quoted_and_cut_at_a_character_boundary() {
        assert_eq!(echo("vol-1"), "\"vol-1\"");
        assert_eq!(echo("a\u{0}b"), "\"a\\0b\"");
        let long = "é".repeat(100);
        let shown = echo(&long);
        assert_eq!(shown, format!("{:?}… (200 bytes)", "é".repeat(ECHO_CHARS)));
        assert_eq!(
            echo(&"x".repeat(ECHO_CHARS)),
            format!("{:?}", "x".repeat(ECHO_CHARS))
        );
    }

    #[test]
    fn quoted_parts_over_the_echo_bound_are_cut() {
        let long = "q".repeat(300);
        let msg = format!("invalid type: string \"{long}\", expected u64 at `{long}` and \"ok\"");
        let cut = cut_quoted(&msg);
        let head = "q".repeat(ECHO_CHARS);
        assert_eq!(
            cut,
            format!(
                "invalid type: string \"{head}\"… (300 bytes), expected u64 at `{head}`… (300 bytes) and \"ok\""
            )
        );
        assert_eq!(cut_quoted("a \"b\\\"c\" d"), "a \"b\\\"c\" d");
        assert_eq!(cut_quoted("open \"end"), "open \"end");
        let echoed = echo(&long);
        assert_eq!(cut_quoted(&echoed), echoed);
    }

    #[test]
    fn answers_never_carry_more_than_the_message_and_field_bounds() {
        let huge = "y".repeat(1 << 20);
        let err = ApiError::bad(huge.clone(), format!("invalid type: string {huge:?}"));
        let body = clip(err.to_string(), MESSAGE_CHARS);
        assert!(
            body.chars().count() < MESSAGE_CHARS + 32,
            "{} chars",
            body.len()
        );
        assert!(
            body.ends_with(&format!("… ({} bytes)", huge.len() + 23)),
            "{}",
            &body[body.len() - 40..]
        );
        assert_eq!(clip("short".into(), ECHO_CHARS), "short");
    }
}
