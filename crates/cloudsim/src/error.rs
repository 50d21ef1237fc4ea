//! The simulator's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the simulator could not start, save its state or expose a device.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot {what} {path}; check that the directory exists and is writable")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}; pick a free address")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is not valid simulator state; move it away to start from an empty cloud"
    )]
    CorruptState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "state file {path} has layout version {found}, this simulator reads {expected}; \
         move the state directory away to start from an empty cloud"
    )]
    StateVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "the state in {state_dir} belongs to appliance VM {stored}, not {requested}; \
         omit the appliance VM id or use another state directory"
    )]
    ApplianceMismatch {
        state_dir: PathBuf,
        stored: String,
        requested: String,
    },
    #[error("cannot attach a loop device over {file}; run as root or disable loop devices")]
    LoopAttach {
        file: PathBuf,
        #[source]
        source: blockdev::Error,
    },
    #[error("cannot detach loop device {device}")]
    LoopDetach {
        device: PathBuf,
        #[source]
        source: blockdev::Error,
    },
    #[error("volume id {id} is not a UUID, so it has no virtio serial")]
    NotUuid { id: String },
    #[error("cannot copy {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why an action behind the client's back (`FaultHandle::stop_vm`, `detach_volume`, …) did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("the simulator is not running; start it before acting on it")]
    NotRunning,
    #[error("the simulator refused the action: {errortext}")]
    Refused { errortext: String },
}

/// Stable classification of [`SimError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimErrorKind {
    Io,
    Bind,
    State,
    Device,
}

impl SimError {
    /// The error's kind.
    pub fn kind(&self) -> SimErrorKind {
        match self {
            Self::Io { .. } | Self::Copy { .. } => SimErrorKind::Io,
            Self::Bind { .. } => SimErrorKind::Bind,
            Self::CorruptState { .. }
            | Self::StateVersion { .. }
            | Self::ApplianceMismatch { .. } => SimErrorKind::State,
            Self::LoopAttach { .. } | Self::LoopDetach { .. } | Self::NotUuid { .. } => {
                SimErrorKind::Device
            }
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}
