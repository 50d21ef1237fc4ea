//! The JSON body extractor: a missing body, malformed JSON, a wrong content type, unknown or missing fields
//! all become a 400 naming the problem and, where there is one, the field at fault; so does a control
//! character in any string of the body. A body over [`MAX_BODY`] is a 413.

use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted (the router's body limit too, so a larger one is never buffered).
pub const MAX_BODY: usize = 1 << 20;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    super::control::check_json(bytes)?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
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
    })
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Option<Bytes>, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        if !ct.is_empty() && !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(ApiError::BadRequest {
                field: None,
                message: format!("content type {ct:?} is not application/json"),
            });
        }
    }
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit: MAX_BODY }
        } else {
            ApiError::BadRequest {
                field: None,
                message: format!("cannot read the request body: {}", e.body_text()),
            }
        }
    })?;
    if bytes.len() > MAX_BODY {
        return Err(ApiError::TooLarge { limit: MAX_BODY });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(Some(bytes))
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match body_bytes(req, state).await? {
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

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        match body_bytes(req, state).await? {
            Some(b) => Ok(Some(Self(parse(&b)?))),
            None => Ok(None),
        }
    }
}
