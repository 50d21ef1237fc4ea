//! The crate's one error type and its stable kinds.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Stable failure class callers match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The device, link or file does not exist (yet).
    NotFound,
    /// A device exists but its identity (serial, size, target) is not the expected one.
    Mismatch,
    /// A path that must be a block device is something else.
    NotBlockDevice,
    /// The process lacks a privilege or access right.
    Permission,
    /// A wait ran out of time.
    Timeout,
    /// An operating-system call failed for another reason.
    Io,
    /// The caller passed something unusable (bad name, bad range).
    Invalid,
}

/// A block-device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on `path` failed; the kind follows the errno.
    #[error("could not {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Nothing was found for `what`.
    #[error("{what} not found; {hint}")]
    NotFound { what: String, hint: &'static str },
    /// A device exists but one of its facts disagrees with what was expected.
    #[error(
        "{what} mismatch at {path}: expected {expected}, found {found}; the device was not used"
    )]
    Mismatch {
        what: &'static str,
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// `path` is not a block device.
    #[error("{path} is a {found}, not a block device; point the link at a block device")]
    NotBlockDevice { path: PathBuf, found: &'static str },
    /// A wait ended at its deadline.
    #[error("timed out after {waited:?} waiting for {what}; last state: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },
    /// The caller passed an unusable value.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl Error {
    /// The stable kind of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { source, .. } => io_kind(source),
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Mismatch { .. } => ErrorKind::Mismatch,
            Self::NotBlockDevice { .. } => ErrorKind::NotBlockDevice,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Invalid { .. } => ErrorKind::Invalid,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => ErrorKind::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorKind::Permission,
        Some(libc::ENOTBLK) => ErrorKind::NotBlockDevice,
        Some(libc::EINVAL) => ErrorKind::Invalid,
        _ => match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Io,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_kinds_follow_errno() {
        let e = Error::io("open", "/x")(io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.kind(), ErrorKind::Permission);
        let e = Error::io("open", "/x")(io::Error::from_raw_os_error(libc::ENXIO));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = Error::io("open", "/x")(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.to_string(), "could not open /x");
    }
}
