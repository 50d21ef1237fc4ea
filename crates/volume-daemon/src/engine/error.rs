//! Engine failures: a small set of kinds the API maps to HTTP statuses and failed operations record as their
//! `error_code`, each keeping its cause as `source`.

use uuid::Uuid;
use volume_api::ErrorCode;

use crate::cloud::CloudError;
use crate::devices::DeviceError;
use crate::exports::ExportError;
use crate::identity::IdentityError;
use crate::store::{OpError, StoreError};

/// Engine failures: what the API maps to HTTP statuses and what failed operations record.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The volume is attached to a VM and the operation needs it detached (a snapshot revert).
    #[error("{0}")]
    VolumeAttached(String),
    /// The VM named in the request does not exist in the cloud.
    #[error("VM {0:?} does not exist in CloudStack; list the VMs with `volumectl cloud vms`")]
    NoSuchVm(String),
    /// The idempotency key was used before for another request; the message names the first operation.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// The volume is recorded for another appliance sharing the database.
    #[error(
        "volume {volume_id} belongs to appliance {owner}, which shares this database; send the request to \
         that appliance's volume-daemon"
    )]
    OwnedElsewhere { volume_id: Uuid, owner: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "the daemon is not accepting operations: it is starting up or shutting down; retry shortly"
    )]
    NotAccepting,
    #[error("journal or database failure")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// CloudStack does not know a job the operation waits for (purged, or never recorded), and does not report
    /// the volume as the job was to leave it.
    #[error("CloudStack does not know job {job_id}, so what became of it is unknown, and reports volume {volume_id} {now}; check the volume in CloudStack and run the operation again")]
    CloudJobUnknown {
        job_id: String,
        volume_id: Uuid,
        /// Where the cloud reports the volume ("not attached", "attached to VM …", "gone").
        now: String,
        #[source]
        source: CloudError,
    },
    /// The cloud finished a job but reports a state the job should have changed.
    #[error("{0}; run POST /api/v1/reconcile to see the drift")]
    CloudDisagrees(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A step failed; `outcome` says what became of what was done before it (undone, or left to the caller).
    #[error("{}; {outcome}", crate::error_chain(cause.as_ref()))]
    Compensated {
        #[source]
        cause: Box<EngineError>,
        outcome: String,
    },
    /// The operation's run panicked twice (a defect); the message is the panic's.
    #[error("the operation stopped unexpectedly twice ({0}); report it with the daemon's log, check the volume with POST /api/v1/reconcile, and run the operation again")]
    Panicked(String),
    /// An operation that failed earlier was interrupted while its effects were being undone.
    #[error("{0} failed and was interrupted while being undone")]
    Interrupted(&'static str),
    /// A journal entry this version cannot read (written by a newer version, or damaged).
    #[error("journal entry {operation} cannot be resumed: {problem}; run the daemon version that wrote it, or cancel the operation")]
    Journal { operation: Uuid, problem: String },
}

impl EngineError {
    /// Stable failure kind (the API's `code`, an operation's `error_code`).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid { .. } => ErrorCode::InvalidRequest,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::VolumeAttached(_) => ErrorCode::VolumeAttached,
            Self::NoSuchVm(_) => ErrorCode::NoSuchVm,
            Self::IdempotencyKeyReused(_) => ErrorCode::IdempotencyKeyReused,
            Self::OwnedElsewhere { .. } => ErrorCode::VolumeOwnedByOtherAppliance,
            Self::Identity(_) => ErrorCode::ApplianceIdentityUnknown,
            Self::NotAccepting => ErrorCode::Unavailable,
            Self::Store(_) => ErrorCode::DatabaseError,
            Self::Cloud(e) => e.kind.code(),
            Self::CloudJobUnknown { source, .. } => source.kind.code(),
            Self::Device(e) => e.code(),
            Self::Export(_) => ErrorCode::ExportFailed,
            Self::Compensated { cause, .. } => cause.code(),
            Self::CloudDisagrees(_)
            | Self::Interrupted(_)
            | Self::Journal { .. }
            | Self::Panicked(_) => ErrorCode::Internal,
        }
    }

    pub(super) fn to_op_error(&self) -> OpError {
        OpError {
            code: self.code().as_str().to_string(),
            // A cause may quote what the request or the cloud said, control characters included.
            message: super::persist::printable(&crate::error_chain(self)),
        }
    }
}
