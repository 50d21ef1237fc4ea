//! API errors: every failure maps to one HTTP status in one exhaustive `match`, with the body
//! `{"error": "...", "code": "...", "field": "..."}`. Internal details are logged, not sent.

use axum::http::StatusCode;
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
    #[error("{0}")]
    NotFound(String),
    #[error("missing or wrong bearer token: send Authorization: Bearer <api_token>")]
    Unauthorized,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Identity(#[from] IdentitySetError),
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
            Self::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound, None),
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, None),
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
                    EngineError::Cloud(_) => (StatusCode::BAD_GATEWAY, code, None),
                    EngineError::Device(_)
                    | EngineError::Export(_)
                    | EngineError::Compensated { .. }
                    | EngineError::CloudDisagrees(_)
                    | EngineError::Interrupted(_)
                    | EngineError::Journal { .. } => {
                        (StatusCode::INTERNAL_SERVER_ERROR, code, None)
                    }
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
        let message = if status.is_server_error() {
            // Full chain in the log; the caller gets the chain too, since it names what failed and what to do,
            // but never secrets (errors never carry them).
            let chain = crate::error_chain(&self);
            tracing::error!(status = status.as_u16(), code = %code, error = %chain, "request failed");
            chain
        } else {
            crate::error_chain(&self)
        };
        (
            status,
            Json(ErrorBody {
                error: message,
                code,
                field,
            }),
        )
            .into_response()
    }
}
