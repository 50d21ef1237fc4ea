//! Device access for the engine: finds an appliance volume's block device by its identity, verifies it,
//! waits for it to come and go, and keeps its stable name. A thin layer over `blockdev` that adds the
//! daemon's error kinds and the volume → stable-name bookkeeping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockdev::{ErrorKind, ResolvedDevice, Resolver, StableNames};
use uuid::Uuid;
use volume_api::ErrorCode;

/// A verified device of an appliance volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The node the NBD export opens (`/dev/loop3`, `/dev/vdb`, or the backing file in file mode).
    pub dev_path: PathBuf,
    /// The by-id link the device was found through, when there is one.
    pub by_id_path: Option<PathBuf>,
    pub kernel_name: Option<String>,
    pub size: u64,
}

impl Device {
    /// What the stable name points at and callers see as the device path: the by-id link when there is one.
    pub fn link_target(&self) -> &Path {
        self.by_id_path.as_deref().unwrap_or(&self.dev_path)
    }
}

impl From<ResolvedDevice> for Device {
    fn from(d: ResolvedDevice) -> Self {
        Self {
            dev_path: d.dev_path,
            by_id_path: Some(d.by_id_path),
            kernel_name: d.kernel_name,
            size: d.size,
        }
    }
}

/// A device step failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device of volume {volume_id}: {what}")]
    Blockdev {
        volume_id: Uuid,
        what: &'static str,
        #[source]
        source: blockdev::Error,
    },
    #[error("device of volume {volume_id}: {what}: the blocking task did not finish; restart the daemon")]
    Task {
        volume_id: Uuid,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the stable-name bookkeeping is poisoned by an earlier panic; restart the daemon")]
    Poisoned,
}

impl DeviceError {
    /// Stable failure kind, used as the operation's `error_code`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Blockdev { source, .. } => match source.kind() {
                ErrorKind::NotFound => ErrorCode::DeviceNotFound,
                ErrorKind::Timeout => ErrorCode::DeviceTimeout,
                ErrorKind::Mismatch => ErrorCode::DeviceMismatch,
                ErrorKind::NotBlockDevice => ErrorCode::DeviceNotBlockDevice,
                ErrorKind::Permission => ErrorCode::DevicePermission,
                ErrorKind::Io | ErrorKind::Invalid => ErrorCode::DeviceError,
            },
            Self::Task { .. } | Self::Poisoned => ErrorCode::Internal,
        }
    }

    /// Whether no device has the volume's identity.
    pub fn is_not_found(&self) -> bool {
        self.code() == ErrorCode::DeviceNotFound
    }
}

/// Runs a blocking `blockdev` call (sysfs and /dev reads) off the async worker threads.
async fn blocking<T: Send + 'static>(
    volume_id: Uuid,
    what: &'static str,
    f: impl FnOnce() -> Result<T, blockdev::Error> + Send + 'static,
) -> Result<T, DeviceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|join| DeviceError::Task {
            volume_id,
            what,
            source: Box::new(join),
        })?
        .map_err(|source| DeviceError::Blockdev {
            volume_id,
            what,
            source,
        })
}

/// The engine's device access.
#[derive(Clone)]
pub struct Devices {
    resolver: Arc<Resolver>,
    names: Arc<StableNames>,
    names_dir: PathBuf,
    /// volume → stable name, re-derived from the database at start-up.
    named: Arc<Mutex<HashMap<Uuid, String>>>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("names_dir", &self.names_dir)
            .finish_non_exhaustive()
    }
}

impl Devices {
    pub fn new(resolver: Resolver, names_dir: PathBuf) -> Self {
        Self {
            resolver: Arc::new(resolver),
            names: Arc::new(StableNames::new(names_dir.clone())),
            names_dir,
            named: Arc::default(),
        }
    }

    /// Waits (event driven, with a deadline) for the volume's device, verified against `size`.
    pub async fn wait_for(
        &self,
        volume_id: Uuid,
        size: u64,
        deadline: Duration,
    ) -> Result<(Device, Duration), DeviceError> {
        self.resolver
            .wait_for(&volume_id, size, deadline)
            .await
            .map(|(d, took)| (d.into(), took))
            .map_err(|source| DeviceError::Blockdev {
                volume_id,
                what: "waiting for it to appear",
                source,
            })
    }

    /// Finds and verifies the device now (no waiting). The sysfs scan runs on a blocking thread.
    pub async fn resolve(&self, volume_id: Uuid, size: u64) -> Result<Device, DeviceError> {
        let resolver = Arc::clone(&self.resolver);
        blocking(volume_id, "verifying it", move || {
            resolver.resolve(&volume_id, size)
        })
        .await
        .map(Into::into)
    }

    /// Why the appliance itself uses the device (mounted, swap, or held by device-mapper, LVM or md), if it
    /// does: such a disk is never served. A file-backed device (simulator mode) is never in use.
    pub async fn in_use(
        &self,
        volume_id: Uuid,
        dev: &Device,
    ) -> Result<Option<String>, DeviceError> {
        let Some(name) = dev.kernel_name.clone() else {
            return Ok(None);
        };
        let resolver = Arc::clone(&self.resolver);
        blocking(
            volume_id,
            "checking whether the appliance uses it",
            move || blockdev::sysfs::in_use_now(resolver.root(), &name),
        )
        .await
    }

    /// Finds and verifies several devices now, together on one blocking thread; results in input order.
    pub async fn verify_all(&self, volumes: Vec<(Uuid, u64)>) -> Vec<Result<(), DeviceError>> {
        if volumes.is_empty() {
            return Vec::new();
        }
        let resolver = Arc::clone(&self.resolver);
        let ids: Vec<Uuid> = volumes.iter().map(|(v, _)| *v).collect();
        let checked = tokio::task::spawn_blocking(move || {
            volumes
                .iter()
                .map(|(v, size)| resolver.resolve(v, *size).map(|_| ()))
                .collect::<Vec<_>>()
        })
        .await;
        match checked {
            Ok(results) => results
                .into_iter()
                .zip(&ids)
                .map(|(r, v)| {
                    r.map_err(|source| DeviceError::Blockdev {
                        volume_id: *v,
                        what: "verifying it",
                        source,
                    })
                })
                .collect(),
            Err(join) => {
                let msg = join.to_string();
                ids.into_iter()
                    .map(|volume_id| DeviceError::Task {
                        volume_id,
                        what: "verifying it",
                        source: Box::new(std::io::Error::other(msg.clone())),
                    })
                    .map(Err)
                    .collect()
            }
        }
    }

    /// Waits until the volume's device is gone; returns at once when there is none.
    pub async fn wait_gone(&self, volume_id: Uuid, deadline: Duration) -> Result<(), DeviceError> {
        let resolver = Arc::clone(&self.resolver);
        let current = blocking(volume_id, "looking it up", move || {
            resolver.lookup(&volume_id)
        })
        .await?;
        let Some(dev) = current else { return Ok(()) };
        self.resolver
            .wait_gone(&volume_id, &dev, deadline)
            .await
            .map(|_| ())
            .map_err(|source| DeviceError::Blockdev {
                volume_id,
                what: "waiting for it to go away after detach",
                source,
            })
    }

    /// Creates (or re-points) the volume's stable-name link to `target`; returns the link path.
    pub fn name(&self, volume_id: Uuid, target: &Path) -> Result<PathBuf, DeviceError> {
        let mut named = self.named.lock().map_err(|_| DeviceError::Poisoned)?;
        let name = match named.get(&volume_id) {
            Some(n) => n.clone(),
            None => {
                let taken: Vec<(Uuid, String)> =
                    named.iter().map(|(v, n)| (*v, n.clone())).collect();
                self.names.name_for(&volume_id, &taken)
            }
        };
        let path = self
            .names
            .link(&name, target)
            .map_err(|source| DeviceError::Blockdev {
                volume_id,
                what: "creating its stable name",
                source,
            })?;
        named.insert(volume_id, name);
        Ok(path)
    }

    /// Removes the volume's stable-name link, if it has one. A volume this run has not named (its link was
    /// made before a crash, and its attach never committed it) loses each link its own names would have that
    /// no other known volume holds.
    pub fn unname(&self, volume_id: Uuid) -> Result<(), DeviceError> {
        let mut named = self.named.lock().map_err(|_| DeviceError::Poisoned)?;
        let names = match named.get(&volume_id) {
            Some(name) => vec![name.clone()],
            None => StableNames::candidates(&volume_id)
                .into_iter()
                .filter(|c| !named.values().any(|n| n == c))
                .collect(),
        };
        for name in names {
            self.names
                .unlink(&name)
                .map_err(|source| DeviceError::Blockdev {
                    volume_id,
                    what: "removing its stable name",
                    source,
                })?;
        }
        named.remove(&volume_id);
        Ok(())
    }

    /// Records a stable name known from the database (start-up), so later names avoid it.
    pub fn remember(&self, volume_id: Uuid, link: &Path) -> Result<(), DeviceError> {
        let mut named = self.named.lock().map_err(|_| DeviceError::Poisoned)?;
        if let Some(n) = link.file_name() {
            named.insert(volume_id, n.to_string_lossy().into_owned());
        }
        Ok(())
    }
}
