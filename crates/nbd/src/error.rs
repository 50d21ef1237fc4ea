//! The crate's error type: one enum for every layer of the NBD server, with a stable [`NbdErrorKind`].

use std::io;

/// A stable classification of [`NbdError`] for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrorKind {
    /// The named export does not exist.
    NotFound,
    /// An export of that name already exists.
    Conflict,
    /// An operating-system I/O call failed.
    Io,
    /// The peer broke the NBD protocol.
    Protocol,
    /// A configured limit was reached.
    Limit,
    /// The argument was invalid (empty or oversized export name, bad configuration).
    Invalid,
    /// The operation gave up after its deadline.
    Timeout,
}

/// Failures of the NBD library.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("export {name:?} does not exist; list the registry to see the live exports")]
    NotFound { name: String },
    #[error("export {name:?} already exists; remove it before adding it again")]
    Conflict { name: String },
    #[error("I/O failed")]
    Io(#[from] io::Error),
    #[error("I/O failed while trying to {op}")]
    IoOp {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    #[error("NBD server replied with error {code} ({what})")]
    Remote { code: u32, what: String },
    #[error("limit reached: {0}")]
    Limit(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("timed out while {0}")]
    Timeout(&'static str),
    #[error(
        "TLS configuration: {what}; see the certificate directory layout in the nbd crate's README"
    )]
    TlsConfig {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("TLS handshake with the client failed")]
    TlsHandshake(#[source] io::Error),
}

impl NbdError {
    /// The stable classification of this error.
    pub fn kind(&self) -> NbdErrorKind {
        match self {
            NbdError::NotFound { .. } => NbdErrorKind::NotFound,
            NbdError::Conflict { .. } => NbdErrorKind::Conflict,
            NbdError::Io(_) | NbdError::IoOp { .. } => NbdErrorKind::Io,
            NbdError::Protocol(_) | NbdError::Remote { .. } => NbdErrorKind::Protocol,
            NbdError::Limit(_) => NbdErrorKind::Limit,
            NbdError::Invalid(_) | NbdError::TlsConfig { .. } => NbdErrorKind::Invalid,
            NbdError::TlsHandshake(_) => NbdErrorKind::Protocol,
            NbdError::Timeout(_) => NbdErrorKind::Timeout,
        }
    }

    pub(crate) fn io_op(op: &'static str, source: io::Error) -> Self {
        NbdError::IoOp { op, source }
    }
}

impl From<rustix::io::Errno> for NbdError {
    fn from(e: rustix::io::Errno) -> Self {
        NbdError::Io(e.into())
    }
}
