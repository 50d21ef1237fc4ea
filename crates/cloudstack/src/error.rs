//! Errors of the CloudStack client: one enum for the layer, a stable [`ErrorKind`] for callers, and the
//! classification of CloudStack's `errorcode`/`cserrorcode`/`errortext` into kinds.

use std::time::Duration;

use crate::types::JobError;

/// What kind of failure an [`Error`] is; stable, for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The resource (volume, VM, job, offering, …) does not exist.
    NotFound,
    /// A parameter was missing or invalid; retrying the same call cannot succeed.
    InvalidParameter,
    /// The resource is in use or unavailable (attached elsewhere, host or storage unavailable).
    InUse,
    /// An account or capacity limit, or the per-VM maximum of data disks, was reached.
    LimitExceeded,
    /// Credentials or signature refused, or permission denied.
    Unauthorized,
    /// Throttling (429), internal errors, 5xx, transport failures, an unreadable answer to a change: may
    /// pass by retrying later (a change after checking whether it was carried out).
    Transient,
    /// An asynchronous job finished with an error.
    JobFailed,
    /// An asynchronous job was still running at the waiting deadline; it may still finish.
    JobStillRunning,
    /// The response could not be understood.
    Decode,
    /// The client configuration is unusable (URL, CA file, …).
    Config,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// A short stable name (`not_found`, `transient`, …) for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::InvalidParameter => "invalid_parameter",
            Self::InUse => "in_use",
            Self::LimitExceeded => "limit_exceeded",
            Self::Unauthorized => "unauthorized",
            Self::Transient => "transient",
            Self::JobFailed => "job_failed",
            Self::JobStillRunning => "job_still_running",
            Self::Decode => "decode",
            Self::Config => "config",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the CloudStack client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot be used.
    #[error("CloudStack client configuration is invalid: {reason}; fix the configuration")]
    Config {
        reason: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A caller-supplied argument was rejected before anything was sent.
    #[error("invalid argument for {command}: {reason}")]
    InvalidInput { command: String, reason: String },
    /// The request could not be sent or its answer not received.
    #[error(
        "{command} could not reach CloudStack ({attempts} attempt(s)); check the URL, the network and TLS trust"
    )]
    Transport {
        command: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    /// The server's TLS certificate was not trusted (or TLS failed to set up); retrying cannot help.
    #[error("TLS with CloudStack failed for {command}; check the URL's host name and set ca_file to the CA that signed the server's certificate")]
    Tls {
        command: String,
        #[source]
        source: reqwest::Error,
    },
    /// CloudStack answered with an error body.
    #[error("CloudStack refused {command} (HTTP {http_status}, errorcode {errorcode}{}): {errortext}",
        cserrorcode.map(|c| format!(", cserrorcode {c}")).unwrap_or_default())]
    Api {
        command: String,
        http_status: u16,
        errorcode: u32,
        cserrorcode: Option<u32>,
        errortext: String,
        kind: ErrorKind,
        attempts: u32,
    },
    /// An HTTP error without a CloudStack error body (proxy, wrong URL, …).
    #[error("{command} got HTTP {status} without a CloudStack error body ({attempts} attempt(s)); check that the URL points at the CloudStack API (…/client/api)")]
    Http {
        command: String,
        status: u16,
        attempts: u32,
    },
    /// The response was not what CloudStack sends for this command.
    #[error("could not decode the response to {command}: {what}")]
    Decode {
        command: String,
        what: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    /// A change reached CloudStack but its answer could not be read (empty, cut off, not CloudStack's): it
    /// may have been carried out, like a change whose answer was lost.
    #[error("the answer to {command} could not be read, so whether CloudStack carried it out is unknown; check the cloud's state before sending it again")]
    Unanswered {
        command: String,
        #[source]
        source: Box<Error>,
    },
    /// An asynchronous job failed.
    #[error("CloudStack job {job_id} failed (errorcode {}): {}", error.errorcode, error.errortext)]
    JobFailed { job_id: String, error: JobError },
    /// An asynchronous job was still running when the caller's deadline passed.
    #[error("CloudStack job {job_id} was still running after {} s", waited.as_secs())]
    JobStillRunning { job_id: String, waited: Duration },
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config { .. } => ErrorKind::Config,
            Self::InvalidInput { .. } => ErrorKind::InvalidParameter,
            Self::Transport { .. } => ErrorKind::Transient,
            Self::Tls { .. } => ErrorKind::Config,
            Self::Api { kind, .. } => *kind,
            Self::Http { status, .. } => http_status_kind(*status),
            Self::Decode { .. } => ErrorKind::Decode,
            Self::Unanswered { .. } => ErrorKind::Transient,
            Self::JobFailed { .. } => ErrorKind::JobFailed,
            Self::JobStillRunning { .. } => ErrorKind::JobStillRunning,
        }
    }

    /// CloudStack's `errortext`, for API errors and failed jobs.
    pub fn error_text(&self) -> Option<&str> {
        match self {
            Self::Api { errortext, .. } => Some(errortext),
            Self::JobFailed { error, .. } => Some(&error.errortext),
            _ => None,
        }
    }

    /// CloudStack's `errorcode`, for API errors and failed jobs.
    pub fn error_code(&self) -> Option<u32> {
        match self {
            Self::Api { errorcode, .. } => Some(*errorcode),
            Self::JobFailed { error, .. } => Some(error.errorcode),
            _ => None,
        }
    }

    /// CloudStack's `cserrorcode`, for API errors and failed jobs that carry one.
    pub fn cs_error_code(&self) -> Option<u32> {
        match self {
            Self::Api { cserrorcode, .. } => *cserrorcode,
            Self::JobFailed { error, .. } => error.cserrorcode,
            _ => None,
        }
    }

    /// The job error of a failed job; its [`JobError::kind`] tells why the job failed.
    pub fn job_error(&self) -> Option<&JobError> {
        match self {
            Self::JobFailed { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn http_status_kind(status: u16) -> ErrorKind {
    match status {
        401 | 403 => ErrorKind::Unauthorized,
        429 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    }
}

fn text_says_not_found(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "not found",
        "does not exist",
        "unable to find",
        "doesn't exist",
        "no such",
        // deleteVolume of a volume already removed, CloudStack 4.13 and older (VolumeManagerImpl), sic.
        "unable to aquire volume with id",
    ]
    .iter()
    .any(|p| t.contains(p))
}

fn text_says_in_use(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "in use",
        "already attached",
        "is attached to",
        "not attached to any vm",
        "is not in ready state",
        "another operation",
    ]
    .iter()
    .any(|p| t.contains(p))
}

fn text_says_limit(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("maximum number of data disks")
        || t.contains("limit exceeded")
        || t.contains("resource limit")
}

/// Groups a CloudStack error into an [`ErrorKind`].
///
/// `errorcode` is CloudStack's `ApiErrorCode` (equal to the HTTP status of synchronous errors),
/// `cserrorcode` its `CSExceptionErrorCode`. Rules, first match wins:
/// - 401, 531 (account error) or cserrorcode 4365 (permission denied) → `Unauthorized`;
/// - text saying "not found", "does not exist", "Unable to find", or "Unable to aquire volume with ID" (sic,
///   deleteVolume of a removed volume on CloudStack 4.13 and older) → `NotFound` (CloudStack reports
///   missing entities as parameter errors, 431/4350, or wrapped in 530);
/// - 429 (API throttling) → `Transient`;
/// - 532, 533 or the per-VM data-disk maximum → `LimitExceeded`;
/// - 536, 534, cserrorcode 4375/4380/4385, or text saying the resource is in use / attached → `InUse`;
/// - 430, 431, 432, cserrorcode 4350 → `InvalidParameter`;
/// - 530 and other 5xx → `Transient`; anything else → `Other`.
pub fn classify(errorcode: u32, cserrorcode: Option<u32>, errortext: &str) -> ErrorKind {
    if matches!(errorcode, 401 | 531) || cserrorcode == Some(4365) {
        return ErrorKind::Unauthorized;
    }
    if text_says_not_found(errortext) {
        return ErrorKind::NotFound;
    }
    if errorcode == 429 {
        return ErrorKind::Transient;
    }
    if matches!(errorcode, 532 | 533) || text_says_limit(errortext) {
        return ErrorKind::LimitExceeded;
    }
    if matches!(errorcode, 534 | 536)
        || matches!(cserrorcode, Some(4375 | 4380 | 4385))
        || text_says_in_use(errortext)
    {
        return ErrorKind::InUse;
    }
    if matches!(errorcode, 430..=432) || cserrorcode == Some(4350) {
        return ErrorKind::InvalidParameter;
    }
    if (500..=599).contains(&errorcode) && errorcode != 535 && errorcode != 537 {
        return ErrorKind::Transient;
    }
    ErrorKind::Other
}

/// Whether an API error may pass by sending the same request again: throttling (429), internal errors
/// (530, unless they name a parameter or missing entity), resources temporarily unavailable (534) and
/// other 5xx statuses without a CloudStack meaning. Parameter, permission and limit errors never are.
pub(crate) fn api_error_retryable(errorcode: u32, kind: ErrorKind) -> bool {
    match errorcode {
        429 => true,
        530 | 534 => matches!(kind, ErrorKind::Transient | ErrorKind::InUse),
        c if (500..=599).contains(&c) && !(530..=537).contains(&c) => kind == ErrorKind::Transient,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_documented_rules() {
        assert_eq!(
            classify(431, Some(4350), "Unable to find volume by id"),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify(431, Some(4350), "Invalid parameter id value=x due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class."),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify(431, Some(4350), "Unable to aquire volume with ID: 42"),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify(
                431,
                None,
                "Please provide either a volume id, or a tuple(device id, instance id)"
            ),
            ErrorKind::InvalidParameter
        );
        assert_eq!(
            classify(431, Some(4350), "Unable to find service offering: 104"),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify(431, Some(4350), "The specified VM already has the maximum number of data disks (6) attached. Please specify another VM."),
            ErrorKind::LimitExceeded
        );
        assert_eq!(
            classify(
                431,
                Some(4350),
                "Please specify a volume that is not attached to any VM."
            ),
            ErrorKind::InUse
        );
        assert_eq!(
            classify(
                401,
                None,
                "unable to verify user credentials and/or request signature"
            ),
            ErrorKind::Unauthorized
        );
        assert_eq!(classify(530, Some(4365), "denied"), ErrorKind::Unauthorized);
        assert_eq!(
            classify(429, None, "too many requests"),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(530, Some(4345), "Internal error executing command"),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(534, Some(4380), "host unavailable"),
            ErrorKind::InUse
        );
        assert_eq!(classify(536, Some(4375), "busy"), ErrorKind::InUse);
        assert_eq!(
            classify(
                532,
                None,
                "Maximum number of resources of type 'volume' for account exceeded"
            ),
            ErrorKind::LimitExceeded
        );
        assert_eq!(
            classify(432, None, "unsupported"),
            ErrorKind::InvalidParameter
        );
        assert_eq!(classify(537, None, "conflict"), ErrorKind::Other);
    }

    #[test]
    fn retry_decisions() {
        assert!(api_error_retryable(429, classify(429, None, "")));
        assert!(api_error_retryable(530, classify(530, None, "internal")));
        assert!(api_error_retryable(534, classify(534, None, "unavailable")));
        assert!(api_error_retryable(503, classify(503, None, "")));
        assert!(!api_error_retryable(
            530,
            classify(530, None, "Unable to find volume")
        ));
        assert!(!api_error_retryable(431, classify(431, None, "bad")));
        assert!(!api_error_retryable(401, classify(401, None, "")));
        assert!(!api_error_retryable(532, classify(532, None, "")));
        assert!(!api_error_retryable(536, classify(536, None, "")));
    }
}
