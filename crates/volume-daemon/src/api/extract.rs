//! The JSON body extractor: a missing body, malformed JSON, a wrong content type, unknown or missing fields
//! all become a 400 naming the problem and, where there is one, the field at fault; so does a control
//! character in any string of the body. A body over [`MAX_BODY`] is a 413.

use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::header;
use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::error::{echo, ApiError};

/// Largest request body accepted (also the router's default body limit, for any other extractor).
pub const MAX_BODY: usize = 1 << 20;

/// A body over [`MAX_BODY`] is still read, and dropped, up to this size before the 413 is sent.
const DRAIN_LIMIT: usize = 16 << 20;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    super::control::check_json(bytes)?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde names the field in backticks for unknown and missing fields.
        let named = msg.split('`').nth(1).map(str::to_string);
        let field = if path != "." { Some(path) } else { named };
        let what = if inner.is_syntax() || inner.is_eof() {
            format!("request body is not valid JSON: {msg}")
        } else {
            format!("invalid request body: {msg}")
        };
        ApiError::BadRequest {
            field,
            message: what,
        }
    })?;
    // `check_json` refused trailing text already; this keeps the typed parse itself strict too.
    de.end().map_err(|e| ApiError::BadRequest {
        field: None,
        message: format!("request body is not valid JSON: {e}"),
    })?;
    Ok(parsed)
}

async fn body_bytes(req: Request) -> Result<Option<Bytes>, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        // Media types are case-insensitive (RFC 9110 8.3.1).
        let ct = ct.to_str().unwrap_or("");
        let lower = ct.to_ascii_lowercase();
        if !ct.is_empty() && !lower.starts_with("application/json") && !lower.contains("+json") {
            return Err(ApiError::BadRequest {
                field: None,
                message: format!("content type {} is not application/json", echo(ct)),
            });
        }
    }
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(ApiError::TooLarge { limit: MAX_BODY });
    }
    // Read past the limit (dropping what comes) up to `DRAIN_LIMIT`, so that the 413 is not lost: a server
    // that closes a connection with unread data resets it, and the client may then never see the answer.
    let mut stream = req.into_body().into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest {
            field: None,
            message: format!("cannot read the request body: {e}"),
        })?;
        seen = seen.saturating_add(chunk.len());
        if seen <= MAX_BODY {
            bytes.extend_from_slice(&chunk);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > MAX_BODY {
        return Err(ApiError::TooLarge { limit: MAX_BODY });
    }
    let bytes = Bytes::from(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(Some(bytes))
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        match body_bytes(req).await? {
            Some(b) => Ok(Self(parse(&b)?)),
            None => Err(ApiError::BadRequest {
                field: None,
                message: format!(
                    "request body is required: a JSON object ({})",
                    std::any::type_name::<T>()
                        .rsplit("::")
                        .next()
                        .unwrap_or("object")
                ),
            }),
        }
    }
}

impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Option<Self>, Self::Rejection> {
        match body_bytes(req).await? {
            Some(b) => Ok(Some(Self(parse(&b)?))),
            None => Ok(None),
        }
    }
}
