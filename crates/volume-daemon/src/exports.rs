//! Export lifecycle: one NBD export `migration-vol-<uuid>` per volume attached to the appliance, bound to the
//! verified device of one attachment generation, served by the embedded NBD server's registry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

/// Failures of the export layer.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot open device {path} for export {name}")]
    Open {
        name: String,
        path: String,
        #[source]
        source: nbd::NbdError,
    },
    #[error("cannot register export {name}")]
    Register {
        name: String,
        #[source]
        source: nbd::NbdError,
    },
    #[error("cannot remove export {name}")]
    Remove {
        name: String,
        #[source]
        source: nbd::NbdError,
    },
    /// The export was closed but its final flush failed: what was written may not be on the device.
    #[error("the final flush of export {name} failed; what was written may not be on the device")]
    Flush {
        name: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// The access of an export admitting `clients`; none named admits anyone.
pub fn access(clients: &[String]) -> nbd::Access {
    if clients.is_empty() {
        nbd::Access::Anyone
    } else {
        nbd::Access::Clients(clients.to_vec())
    }
}

/// The client identities an access admits; empty for anyone.
pub fn clients_of(access: &nbd::Access) -> Vec<String> {
    match access {
        nbd::Access::Anyone => Vec::new(),
        nbd::Access::Clients(c) => c.clone(),
    }
}

/// What removing an export did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub generation: u64,
    pub sessions_closed: usize,
    pub drained_in_time: bool,
    /// What the generation read and wrote in all.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// The daemon's view of the NBD registry.
#[derive(Clone)]
pub struct Exports {
    registry: nbd::Registry,
    port: u16,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Exports {
    pub fn new(registry: nbd::Registry, port: u16) -> Self {
        Self { registry, port }
    }

    /// The NBD port exports are served on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves `device` as the volume's export (read-write) to the client identities `clients` (empty: every
    /// client that passes the server's TLS policy), replacing an export of the same name that serves a
    /// different device. Returns the live export (a new generation unless the same device was already served).
    pub async fn open(
        &self,
        volume_id: Uuid,
        device: &Path,
        clients: &[String],
        drain: Duration,
    ) -> Result<nbd::ExportSnapshot, ExportError> {
        let name = volume_api::export_name(volume_id);
        if self.registry.get(&name).is_some() {
            // A previous generation (from an earlier attachment or an interrupted attach) is never reused.
            self.close(volume_id, drain).await?;
        }
        let path = device.to_path_buf();
        let backend = tokio::task::spawn_blocking(move || nbd::FileBackend::open(&path, false))
            .await
            .map_err(|e| ExportError::Open {
                name: name.clone(),
                path: device.display().to_string(),
                source: nbd::NbdError::from(std::io::Error::other(e)),
            })?
            .map_err(|source| ExportError::Open {
                name: name.clone(),
                path: device.display().to_string(),
                source,
            })?;
        self.registry
            .add(nbd::ExportConfig {
                name: name.clone(),
                backend: Arc::new(backend),
                read_only: false,
                max_connections: None,
                // The volume it serves; the appliance's device paths are not the clients' business.
                description: Some(format!("volume {volume_id}")),
                access: access(clients),
            })
            .map_err(|source| ExportError::Register { name, source })
    }

    /// Stops new connections, drains in-flight requests up to `drain`, closes the sessions and flushes.
    /// `Ok(None)` when there was no such export; [`ExportError::Flush`] when it was closed but its final flush
    /// failed.
    pub async fn close(
        &self,
        volume_id: Uuid,
        drain: Duration,
    ) -> Result<Option<Closed>, ExportError> {
        let name = volume_api::export_name(volume_id);
        if self.registry.get(&name).is_none() {
            return Ok(None);
        }
        match self.registry.remove(&name, drain).await {
            Ok(nbd::RemoveReport {
                flush_error: Some(source),
                ..
            }) => Err(ExportError::Flush { name, source }),
            Ok(r) => Ok(Some(Closed {
                generation: r.generation,
                sessions_closed: r.sessions_closed,
                drained_in_time: r.drained_in_time,
                bytes_read: r.bytes_read,
                bytes_written: r.bytes_written,
            })),
            Err(e) if e.kind() == nbd::NbdErrorKind::NotFound => Ok(None),
            Err(source) => Err(ExportError::Remove { name, source }),
        }
    }

    /// The live export of a volume.
    pub fn get(&self, volume_id: Uuid) -> Option<nbd::ExportSnapshot> {
        self.registry.get(&volume_api::export_name(volume_id))
    }

    /// All live exports.
    pub fn list(&self) -> Vec<nbd::ExportSnapshot> {
        self.registry.list()
    }
}
