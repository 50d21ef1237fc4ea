//! Command failures and the documented exit codes (`volumectl --help`, docs/operations.md) they map to.

use std::process::ExitCode;
use std::time::Duration;

use uuid::Uuid;
use volume_api::Operation;

use crate::client::{ClientError, ClientErrorKind};

/// The exit codes scripts can rely on. The numbers are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// The operation failed or was cancelled; `health` found a problem.
    Failed = 1,
    /// Bad command line, or the daemon rejected the request as invalid.
    Usage = 2,
    NotFound = 3,
    /// Conflict, unknown reference or authentication.
    Refused = 4,
    Unreachable = 5,
    /// The daemon failed or answered nonsense.
    Server = 6,
    /// The daemon cannot serve the request now (503).
    Unavailable = 7,
    /// Gave up waiting; the operation is still running.
    WaitTimedOut = 8,
    /// Interrupted (Ctrl-C, SIGINT) while waiting; the operation is still running. 128 + SIGINT, as shells do.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// A command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{}", failed_message(.0))]
    OperationFailed(Box<Operation>),
    #[error("operation {id} is still {status} after {waited:?}; wait longer with `volumectl ops wait {id}`")]
    WaitTimedOut {
        id: Uuid,
        status: &'static str,
        waited: Duration,
    },
    /// The daemon could not be asked about an accepted operation: the operation may well go on.
    #[error("stopped following operation {id}, which may go on in the daemon (wait for it again with `volumectl ops wait {id}`)")]
    WaitFailed {
        id: Uuid,
        #[source]
        source: ClientError,
    },
    #[error("interrupted while waiting for operation {id}, which goes on in the daemon; wait for it again with `volumectl ops wait {id}`")]
    Interrupted { id: Uuid },
    #[error("cannot watch for Ctrl-C")]
    Signal(#[source] std::io::Error),
    #[error("the daemon reports {status}: see the components above and docs/operations.md")]
    Unhealthy { status: String },
    #[error("the daemon does not know its appliance identity: set it with `volumectl appliance set VM_ID` or appliance_vm_id in its configuration")]
    NoAppliance,
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

fn failed_message(op: &Operation) -> String {
    let mut m = format!("operation {} ({}) {}", op.id, op.op_type(), op.status);
    if let Some(e) = &op.error {
        m.push_str(&format!(": {e}"));
    }
    if let Some(c) = &op.error_code {
        m.push_str(&format!(" [{c}]"));
    }
    m
}

impl CliError {
    /// The exit code of this failure.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Client(e) | Self::WaitFailed { source: e, .. } => exit_of_kind(e.kind()),
            Self::OperationFailed(_) | Self::Unhealthy { .. } => Exit::Failed,
            Self::WaitTimedOut { .. } => Exit::WaitTimedOut,
            Self::Interrupted { .. } => Exit::Interrupted,
            Self::NoAppliance => Exit::Unavailable,
            Self::Output(_) | Self::Runtime(_) | Self::Signal(_) => Exit::Server,
        }
    }
}

/// The exit code of a client failure kind.
pub fn exit_of_kind(kind: ClientErrorKind) -> Exit {
    match kind {
        ClientErrorKind::Usage | ClientErrorKind::Invalid => Exit::Usage,
        ClientErrorKind::Unreachable => Exit::Unreachable,
        ClientErrorKind::NotFound => Exit::NotFound,
        ClientErrorKind::Refused => Exit::Refused,
        ClientErrorKind::Unavailable => Exit::Unavailable,
        ClientErrorKind::Server => Exit::Server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;
    use volume_api::ErrorBody;

    fn api(status: StatusCode) -> CliError {
        CliError::Client(ClientError::Api {
            status,
            body: ErrorBody {
                error: "x".into(),
                code: volume_api::ErrorCode::Conflict,
                field: None,
            },
        })
    }

    #[test]
    fn exit_codes_are_the_documented_ones() {
        assert_eq!(api(StatusCode::BAD_REQUEST).exit() as u8, 2);
        assert_eq!(api(StatusCode::NOT_FOUND).exit() as u8, 3);
        assert_eq!(api(StatusCode::CONFLICT).exit() as u8, 4);
        assert_eq!(api(StatusCode::UNAUTHORIZED).exit() as u8, 4);
        assert_eq!(api(StatusCode::INTERNAL_SERVER_ERROR).exit() as u8, 6);
        assert_eq!(api(StatusCode::BAD_GATEWAY).exit() as u8, 6);
        assert_eq!(api(StatusCode::SERVICE_UNAVAILABLE).exit() as u8, 7);
        assert_eq!(
            CliError::Unhealthy {
                status: "degraded".into()
            }
            .exit() as u8,
            1
        );
        assert_eq!(
            CliError::WaitTimedOut {
                id: Uuid::nil(),
                status: "executing",
                waited: Duration::from_secs(1)
            }
            .exit() as u8,
            8
        );
        assert_eq!(
            CliError::Client(ClientError::BadUrl { url: "x".into() }).exit() as u8,
            2
        );
    }

    #[test]
    fn every_documented_code_is_in_the_help_text() {
        for code in (0..=8u8).chain([130]) {
            assert!(
                crate::cli::AFTER_LONG_HELP.contains(&format!("\n  {code}  ")),
                "exit code {code} is not documented"
            );
        }
    }
}
