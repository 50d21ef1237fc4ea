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
    /// Another volume's export serves the same device: one device is never served as two volumes.
    #[error(
        "device {path} is already served as volume {other}'s export; export {name} is not opened on it \
         (the device found for the volume is another volume's disk: check its by-id link)"
    )]
    DeviceServed {
        name: String,
        path: String,
        other: Uuid,
    },
    /// The export was closed but its final flush failed: what was written may not be on the device.
    #[error("the final flush of export {name} failed; what was written may not be on the device")]
    Flush {
        name: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A live export could not be flushed (before a snapshot): what its clients wrote may not be on the
    /// device yet.
    #[error("cannot flush export {name}; what its clients wrote may not be on the device yet")]
    FlushLive {
        name: String,
        #[source]
        source: nbd::NbdError,
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
    /// The device each volume's live export serves (`st_rdev` of a block device, or `st_dev` and `st_ino`
    /// of a file), so that no device is served as two volumes.
    devices: Arc<std::sync::Mutex<std::collections::HashMap<Uuid, DeviceKey>>>,
}

/// What identifies a served device: a block device's number, or a file's device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceKey {
    Block(u64),
    File(u64, u64),
}

impl DeviceKey {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
        let m = std::fs::metadata(path)?;
        Ok(if m.file_type().is_block_device() {
            Self::Block(m.rdev())
        } else {
            Self::File(m.dev(), m.ino())
        })
    }
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
        Self {
            registry,
            port,
            devices: Arc::default(),
        }
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
        let key = DeviceKey::of(device).map_err(|e| ExportError::Open {
            name: name.clone(),
            path: device.display().to_string(),
            source: nbd::NbdError::from(e),
        })?;
        let other = self.served_as(key, volume_id);
        if let Some(other) = other {
            return Err(ExportError::DeviceServed {
                name,
                path: device.display().to_string(),
                other,
            });
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
        let snap = self
            .registry
            .add(nbd::ExportConfig {
                name: name.clone(),
                backend: Arc::new(backend),
                read_only: false,
                max_connections: None,
                // The volume it serves; the appliance's device paths are not the clients' business.
                description: Some(format!("volume {volume_id}")),
                access: access(clients),
            })
            .map_err(|source| ExportError::Register { name, source })?;
        if let Ok(mut d) = self.devices.lock() {
            d.insert(volume_id, key);
        }
        Ok(snap)
    }

    /// The volume other than `volume_id` whose live export serves the device `key`.
    fn served_as(&self, key: DeviceKey, volume_id: Uuid) -> Option<Uuid> {
        let devices = self.devices.lock().ok()?;
        devices
            .iter()
            .find(|(v, k)| **v != volume_id && **k == key)
            .map(|(v, _)| *v)
            .filter(|v| self.get(*v).is_some())
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
        if let Ok(mut d) = self.devices.lock() {
            d.remove(&volume_id);
        }
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

    /// Flushes a volume's live export to its device, so that every write acknowledged so far is on the
    /// device (a snapshot taken next holds it); `Ok(false)` when the volume has no live export (a closed
    /// one was flushed as it closed).
    pub async fn flush(&self, volume_id: Uuid) -> Result<bool, ExportError> {
        let name = volume_api::export_name(volume_id);
        match self.registry.flush(&name).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == nbd::NbdErrorKind::NotFound => Ok(false),
            Err(source) => Err(ExportError::FlushLive { name, source }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_device_is_never_served_as_two_volumes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (disk_a, disk_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        for p in [&disk_a, &disk_b] {
            std::fs::File::create(p)
                .and_then(|f| f.set_len(1 << 20))
                .expect("disk");
        }
        let exports = Exports::new(nbd::Registry::new(), 10809);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let drain = Duration::from_secs(1);
        exports.open(a, &disk_a, &[], drain).await.expect("a");
        // B's device found as A's disk (through a link, as a symlink here): refused, A untouched.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&disk_a, &link).expect("link");
        let e = exports
            .open(b, &link, &[], drain)
            .await
            .expect_err("A's disk served as B");
        assert!(
            matches!(&e, ExportError::DeviceServed { other, .. } if *other == a),
            "{e}"
        );
        assert!(exports.get(a).is_some() && exports.get(b).is_none());
        // A's own device again (a new generation) is fine, and B's own device too.
        exports.open(a, &link, &[], drain).await.expect("a again");
        exports.open(b, &disk_b, &[], drain).await.expect("b");
        // Once A's export is closed, its device may serve another volume.
        exports.close(a, drain).await.expect("close a");
        exports.close(b, drain).await.expect("close b");
        exports
            .open(b, &disk_a, &[], drain)
            .await
            .expect("b on a's old disk");
    }
}
