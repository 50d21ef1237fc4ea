//! Request bodies: the JSON body extractor, and the one of requests that take none. A missing body,
//! malformed JSON, a value that is not an object, nesting deeper than [`MAX_DEPTH`], unknown or missing
//! fields all become a 400 naming the problem and, where there is one, the field at fault; so does a control
//! character in any string of the body. A body over [`MAX_BODY`] is a 413, another media type or a content
//! coding a 415, a transfer coding other than chunked a 501, and a body that has not arrived within the
//! listener's header timeout ([`BodyTimeout`]) a 408. Query strings that do not parse are a 400 naming the
//! parameter at fault ([`query_error`]).

use std::time::Duration;

use axum::extract::{FromRequest, OptionalFromRequest, Request};
use axum::http::header;
use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{echo, ApiError};

/// How long a request's body may take to arrive, from the handler's first read of it: the listener puts
/// its header timeout here (a request extension), so that a client trickling a body holds its connection
/// no longer than one trickling headers. Without it (a router served another way) bodies are not timed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyTimeout(pub Duration);

/// Deepest nesting of objects and arrays a body may have (the body itself is level 1): enough for any
/// `metadata`, and shallow enough that every answer repeating it (an operation's `request`, in a listing)
/// stays within what JSON parsers read by default (serde_json: 128).
pub const MAX_DEPTH: usize = 32;

/// Largest request body accepted (also the router's default body limit, for any other extractor).
pub const MAX_BODY: usize = 1 << 20;

/// A body over [`MAX_BODY`] is still read, and dropped, up to this size before the 413 is sent.
const DRAIN_LIMIT: usize = 16 << 20;

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// Where `v` nests deeper than [`MAX_DEPTH`], as a path like `metadata.a[0]` (the notation of the body's
/// other field errors); `None` when it does not.
fn too_deep(v: &Value) -> Option<String> {
    fn walk(v: &Value, depth: usize, path: &mut Vec<String>) -> Option<String> {
        let children: Box<dyn Iterator<Item = (String, &Value)>> = match v {
            Value::Array(items) => Box::new(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("[{i}]"), item)),
            ),
            Value::Object(map) => Box::new(map.iter().map(|(k, item)| (k.clone(), item))),
            _ => return None,
        };
        if depth > MAX_DEPTH {
            return Some(if path.is_empty() {
                "body".to_string()
            } else {
                path.join(".").replace(".[", "[")
            });
        }
        for (name, item) in children {
            path.push(name);
            let found = walk(item, depth + 1, path);
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }
    walk(v, 1, &mut Vec::new())
}

/// Refuses a body that is not one JSON object (trailing text included), one nested deeper than
/// [`MAX_DEPTH`], and one with a control character in any string, naming the field.
fn check_object(bytes: &[u8]) -> Result<Value, ApiError> {
    let v = super::control::check_json(bytes)?;
    if !v.is_object() {
        return Err(ApiError::BadRequest {
            field: None,
            message: "request body must be a JSON object ({...}), not an array or a single value"
                .into(),
        });
    }
    if let Some(path) = too_deep(&v) {
        // The field is the body's own (`metadata`); the message says where inside it.
        let field = path.split(['.', '[']).next().unwrap_or("body").to_string();
        return Err(ApiError::BadRequest {
            message: format!(
                "{path} nests objects and arrays deeper than {MAX_DEPTH} levels; flatten it"
            ),
            field: Some(field),
        });
    }
    Ok(v)
}

pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    check_object(bytes)?;
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

/// The media type of a `Content-Type` value (before any parameter), lower-cased.
fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a media type is JSON: `application/json`, or `application/…+json` (RFC 6839).
fn is_json(media: &str) -> bool {
    media == "application/json"
        || media
            .strip_prefix("application/")
            .is_some_and(|sub| sub.len() > "+json".len() && sub.ends_with("+json"))
}

/// The head checks of a request with a body: its media type, content and transfer codings, and an
/// announced length over the limit that the client waits to hear about (`Expect: 100-continue`) or that is
/// beyond what is drained.
fn check_head(req: &Request) -> Result<(), ApiError> {
    let headers = req.headers();
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = String::from_utf8_lossy(ct.as_bytes());
        if !ct.trim().is_empty() && !is_json(&media_type(&ct)) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content type {} is not application/json; send the body as JSON with Content-Type: \
                 application/json",
                echo(&ct)
            )));
        }
    }
    for coding in headers.get_all(header::CONTENT_ENCODING) {
        let coding = String::from_utf8_lossy(coding.as_bytes());
        if coding
            .split(',')
            .any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"))
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content coding {} is not supported; send the body uncompressed",
                echo(&coding)
            )));
        }
    }
    for coding in headers.get_all(header::TRANSFER_ENCODING) {
        let coding = String::from_utf8_lossy(coding.as_bytes());
        if coding
            .split(',')
            .any(|c| !c.trim().eq_ignore_ascii_case("chunked"))
        {
            return Err(ApiError::UnsupportedTransferCoding(format!(
                "transfer coding {} is not supported; send the body with Content-Length or chunked",
                echo(&coding)
            )));
        }
    }
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let waits = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if announced.is_some_and(|n| n > DRAIN_LIMIT as u64 || (waits && n > MAX_BODY as u64)) {
        return Err(ApiError::TooLarge { limit: MAX_BODY });
    }
    Ok(())
}

async fn body_bytes(req: Request) -> Result<Option<Bytes>, ApiError> {
    check_head(&req)?;
    let timeout = req.extensions().get::<BodyTimeout>().map(|t| t.0);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    // Read past the limit (dropping what comes) up to `DRAIN_LIMIT`, so that the 413 is not lost: a server
    // that closes a connection with unread data resets it, and the client may then never see the answer.
    let mut stream = req.into_body().into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    loop {
        let next = match deadline {
            Some(at) => tokio::time::timeout_at(at, stream.next())
                .await
                .map_err(|_| ApiError::BodyTimedOut {
                    secs: timeout.map_or(0, |t| t.as_secs()),
                })?,
            None => stream.next().await,
        };
        let Some(chunk) = next else { break };
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

/// A request that takes no body: it may come with none, or with an empty JSON object (`{}`); anything
/// else is refused as a body with unknown fields is elsewhere, so that a caller who sends options (say
/// `{"apply": false}` to a call that always applies) learns that they are not heard.
#[derive(Debug)]
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(bytes) = body_bytes(req).await? else {
            return Ok(NoBody);
        };
        let v = check_object(&bytes)?;
        match v.as_object().and_then(|o| o.keys().next()) {
            None => Ok(NoBody),
            Some(field) => Err(ApiError::BadRequest {
                field: Some(field.clone()),
                message: format!(
                    "unknown field {}: this request takes no body (send none, or {{}})",
                    echo(field)
                ),
            }),
        }
    }
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

/// A query string that did not parse as a handler's parameters: a 400 naming the parameter at fault (an
/// unknown or repeated one, or the one parameter there is) and listing the ones the call takes.
pub(crate) fn query_error(
    e: axum::extract::rejection::QueryRejection,
    known: &[&'static str],
) -> ApiError {
    let msg = e.body_text();
    // serde names the parameter in backticks for unknown and repeated ones.
    let named = msg.split('`').nth(1).map(str::to_string);
    let field = named.or_else(|| match known {
        [only] => Some((*only).to_string()),
        _ => None,
    });
    ApiError::BadRequest {
        field,
        message: format!("{msg}: parameters are {}", known.join(", ")),
    }
}
