//! Export lifecycle of appliance volumes: serving a verified device under a new generation, and the one
//! teardown (stop new connections, drain in-flight requests, close sessions, flush, then optionally remove
//! the stable name) that detach, compensation, `DELETE /exports`, the reconciler and shutdown all use.

use std::path::PathBuf;

use chrono::Utc;
use uuid::Uuid;
use volume_api::DiskRole;

use super::{Engine, EngineError, Inner};
use crate::devices::Device;
use crate::exports::Closed;
use crate::store::{AttachTarget, AttachmentRecord, ExportRecord, VolumeRecord};

/// A verified device named and served: the records an attach or an adoption commits with its operation.
pub(super) struct Served {
    pub attachment: AttachmentRecord,
    pub export: ExportRecord,
    /// The stable name's path.
    pub name: PathBuf,
    pub snap: nbd::ExportSnapshot,
}

/// What a teardown removes besides the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Teardown {
    /// Only the export; the stable name stays (the volume stays attached).
    Export,
    /// The export and the stable name (the volume is leaving the appliance).
    ExportAndName,
}

impl Inner {
    /// Stops serving the volume (drained, bounded by the drain timeout) and, with
    /// [`Teardown::ExportAndName`], removes its stable name. Both are attempted; the first failure is returned.
    pub(super) async fn teardown(
        &self,
        volume_id: Uuid,
        what: Teardown,
    ) -> Result<Option<Closed>, EngineError> {
        let closed = self.exports.close(volume_id, self.cfg.drain_timeout).await;
        if let Ok(Some(c)) = &closed {
            if !c.drained_in_time {
                tracing::warn!(volume = %volume_id, "in-flight NBD requests did not finish before the drain deadline");
            }
            // The closed generation's final counts: the next generation of the record adds them to its
            // totals (see `Store::upsert_export`); a periodic save that read them earlier cannot lower them.
            if let Err(e) = self
                .store
                .save_export_run_bytes(volume_id, c.generation, c.bytes_read, c.bytes_written)
                .await
            {
                tracing::warn!(volume = %volume_id, error = %crate::error_chain(&e), "the byte counters of a closed export were not saved");
            }
        }
        let unnamed = match what {
            Teardown::Export => Ok(()),
            Teardown::ExportAndName => self.devices.unname(volume_id),
        };
        let closed = closed?;
        unnamed?;
        Ok(closed)
    }

    /// The teardown of a volume leaving the appliance.
    pub(super) async fn teardown_local(&self, volume_id: Uuid) -> Result<(), EngineError> {
        self.teardown(volume_id, Teardown::ExportAndName)
            .await
            .map(|_| ())
    }

    /// Names a device verified against `size` and serves it under a new export generation for `clients`;
    /// returns the attachment (to the appliance `vm_id`) and export records to commit. The volume record takes
    /// the verified size when it differed (a stale size would fail every later verification).
    pub(super) async fn serve_verified(
        &self,
        volume: &VolumeRecord,
        size: u64,
        dev: &Device,
        vm_id: &str,
        device_id: Option<u32>,
        clients: Vec<String>,
    ) -> Result<Served, EngineError> {
        let volume_id = volume.id;
        if volume.size_bytes != size {
            let mut updated = volume.clone();
            updated.size_bytes = size;
            updated.updated_at = Utc::now();
            self.store.upsert_volume(&updated).await?;
        }
        let link_target = dev.link_target().to_path_buf();
        let name = self.devices.name(volume_id, &link_target)?;
        let snap = self
            .exports
            .open(volume_id, &dev.dev_path, &clients, self.cfg.drain_timeout)
            .await?;
        let now = Utc::now();
        let attachment = AttachmentRecord {
            volume_id,
            vm_id: vm_id.to_string(),
            target: AttachTarget::Appliance,
            role: DiskRole::Data,
            device_id,
            by_id_path: dev.by_id_path.as_ref().map(|p| p.display().to_string()),
            kernel_device: Some(dev.dev_path.display().to_string()),
            stable_name: Some(name.display().to_string()),
            export_generation: Some(snap.generation),
            nbd_clients: clients,
            created_at: now,
            updated_at: now,
        };
        let export = ExportRecord {
            volume_id,
            export_name: snap.name.clone(),
            device_path: link_target.display().to_string(),
            generation: snap.generation,
            read_only: false,
            created_at: now,
            updated_at: now,
            bytes_read_before: 0,
            bytes_written_before: 0,
        };
        Ok(Served {
            attachment,
            export,
            name,
            snap,
        })
    }

    /// Verifies the attachment's device, re-creates its stable name and opens a new export generation; the
    /// attachment records the device as found now.
    pub(super) async fn reexport(
        &self,
        att: &AttachmentRecord,
    ) -> Result<ExportRecord, EngineError> {
        let volume_id = att.volume_id;
        let size = self
            .store
            .get_volume(volume_id)
            .await?
            .map(|v| v.size_bytes)
            .ok_or_else(|| EngineError::NotFound(format!("volume {volume_id} has no record")))?;
        let dev = self.devices.resolve(volume_id, size).await?;
        let link_target = dev.link_target().to_path_buf();
        self.devices.name(volume_id, &link_target)?;
        // A generation still served is closed here, so that its final counts are saved for the totals.
        self.teardown(volume_id, Teardown::Export).await?;
        let snap = self
            .exports
            .open(
                volume_id,
                &dev.dev_path,
                &att.nbd_clients,
                self.cfg.drain_timeout,
            )
            .await?;
        let now = chrono::Utc::now();
        let rec = ExportRecord {
            volume_id,
            export_name: snap.name.clone(),
            device_path: link_target.display().to_string(),
            generation: snap.generation,
            read_only: false,
            created_at: now,
            updated_at: now,
            // Carried over by the store from the record's earlier generations; read back below.
            bytes_read_before: 0,
            bytes_written_before: 0,
        };
        // The device may have come back under another kernel name: the attachment records the one verified now.
        let by_id_path = dev.by_id_path.as_ref().map(|p| p.display().to_string());
        self.store
            .upsert_export_on_device(
                &rec,
                by_id_path.as_deref(),
                &dev.dev_path.display().to_string(),
            )
            .await?;
        Ok(self
            .store
            .get_export(volume_id)
            .await
            .ok()
            .flatten()
            .unwrap_or(rec))
    }
}

impl Engine {
    /// `POST /exports`: makes sure an appliance-attached volume is exported (re-opening it after a
    /// `DELETE /exports`). A device path that is not the volume's own device is refused. Once accepted it runs to
    /// the end, in the volume's turn, whether or not its client waits.
    pub async fn ensure_export(
        &self,
        volume_id: Uuid,
        device_path: Option<&str>,
    ) -> Result<ExportRecord, EngineError> {
        self.inner.refuse_foreign(volume_id).await?;
        let device_path = device_path.map(str::to_owned);
        self.to_the_end(move |engine| async move {
            engine.ensure_export_in_turn(volume_id, device_path).await
        })
        .await
    }

    async fn ensure_export_in_turn(
        &self,
        volume_id: Uuid,
        device_path: Option<String>,
    ) -> Result<ExportRecord, EngineError> {
        self.in_turn(volume_id, async {
            let inner = &self.inner;
            let att = match inner
                .store
                .get_attachment(volume_id)
                .await?
                .filter(|a| a.target == AttachTarget::Appliance)
            {
                Some(att) => att,
                None => {
                    // An unknown (or deleted) volume is a 404, as everywhere else.
                    inner.require_volume(volume_id).await?;
                    return Err(EngineError::Conflict(format!(
                        "volume {volume_id} is not attached to the appliance; attach it first \
                         (POST /api/v1/volumes/{volume_id}/attach)"
                    )));
                }
            };
            if let Some(p) = device_path.as_deref().filter(|p| !p.is_empty()) {
                let own = [
                    att.by_id_path.as_deref(),
                    att.kernel_device.as_deref(),
                    att.stable_name.as_deref(),
                ];
                if !own.contains(&Some(p)) {
                    return Err(EngineError::Conflict(format!(
                        "device_path {p} is not the device of volume {volume_id} ({}); leave device_path out",
                        att.by_id_path
                            .as_deref()
                            .or(att.kernel_device.as_deref())
                            .unwrap_or("unknown")
                    )));
                }
            }
            if let Some(rec) = inner.store.get_export(volume_id).await? {
                if inner
                    .exports
                    .get(volume_id)
                    .is_some_and(|s| s.generation == rec.generation)
                {
                    return Ok(rec);
                }
            }
            inner.reexport(&att).await
        })
        .await
    }

    /// `DELETE /exports/{volume_id}`: stops serving the volume (drained); the attachment stays. Once accepted it
    /// runs to the end, in the volume's turn, whether or not its client waits: a teardown cut short would leave
    /// the export out of the NBD server with its sessions open and its record kept.
    pub async fn remove_export(&self, volume_id: Uuid) -> Result<bool, EngineError> {
        self.inner.refuse_foreign(volume_id).await?;
        self.to_the_end(move |engine| async move {
            engine
                .in_turn(volume_id, async {
                    let inner = &engine.inner;
                    let closed = inner.teardown(volume_id, Teardown::Export).await?;
                    let had_record = inner.store.delete_export(volume_id).await?;
                    Ok(closed.is_some() || had_record)
                })
                .await
        })
        .await
    }

    /// Shutdown: every live export is drained and closed; names and records stay for the next start.
    /// Saves the byte counters of every live export as the current run's (every few seconds and at
    /// stop), so that totals survive a restart; see `Store::fold_export_run_bytes`.
    pub async fn save_export_counters(&self) {
        for snap in self.inner.exports.list() {
            let Some(volume_id) = volume_api::volume_of_export(&snap.name) else {
                continue;
            };
            let c = &snap.counters;
            if let Err(e) = self
                .inner
                .store
                .save_export_run_bytes(volume_id, snap.generation, c.bytes_read, c.bytes_written)
                .await
            {
                tracing::warn!(export = %snap.name, error = %crate::error_chain(&e), "export byte counters not saved");
            }
        }
    }

    pub async fn close_all_exports(&self) {
        for snap in self.inner.exports.list() {
            let Some(volume_id) = volume_api::volume_of_export(&snap.name) else {
                continue;
            };
            if let Err(e) = self.inner.teardown(volume_id, Teardown::Export).await {
                tracing::warn!(export = %snap.name, error = %crate::error_chain(&e), "export did not close cleanly");
            }
        }
    }
}
