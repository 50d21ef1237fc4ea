//! The `repair` workflow: the reconciler's repairs, journaled and run like every other operation (in the
//! volume's FIFO turn, so they never interleave with an operation on it, and resumed at start-up from their
//! step) through the same teardown and export code the workflows use.
//!
//! Each repair converges: tearing down an export that is gone, or dropping a record that is gone, does
//! nothing, so a repair interrupted at any step finishes when it runs again.

use std::time::Duration;

use uuid::Uuid;
use volume_api::{RepairKind, RepairRequest, RepairResponse};

use super::export::{Served, Teardown};
use super::journal::{json_of, Entry, RepairStep, Request};
use super::{Engine, EngineError, Inner};
use crate::store::{AttachTarget, OpStatus, OperationRecord};

impl Engine {
    /// Journals a repair of the volume and queues it behind the volume's other operations.
    pub(crate) async fn submit_repair(
        &self,
        volume_id: Uuid,
        repair: RepairKind,
    ) -> Result<Uuid, EngineError> {
        let sub = self
            .submit(Request::repair(volume_id, repair), None)
            .await?;
        Ok(sub.operation.id)
    }

    /// Waits for a repair to end, as long as its longest step may take (a device wait plus a drain).
    pub(crate) async fn wait_repair(
        &self,
        id: Uuid,
    ) -> Result<Option<OperationRecord>, EngineError> {
        let cfg = &self.inner.cfg;
        let bound = cfg.device_timeout + cfg.drain_timeout + Duration::from_secs(60);
        self.operation(id, bound).await
    }
}

impl Inner {
    pub(super) async fn repair(
        &self,
        op: &Entry<RepairRequest, RepairStep>,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let repair = op.request.repair;
        let mut export_generation = None;
        let message = match repair {
            // Commits the attachment and completes the operation itself.
            RepairKind::Adopt => return self.adopt(op).await,
            RepairKind::ForgetAttachment => {
                if op.step != RepairStep::ExportRemoved {
                    // Checked again in the volume's turn: an attach or clean-up since the reconcile looked may
                    // have made the attachment true again (or another one), and the cloud must still have none.
                    self.still_attached_only_in_database(volume_id).await?;
                    self.teardown(volume_id, Teardown::ExportAndName).await?;
                    self.step(op, RepairStep::ExportRemoved).await?;
                }
                self.store.clear_attachment(volume_id).await?;
                "the attachment, its export and its stable name are forgotten"
            }
            RepairKind::Reexport => {
                let att = self
                    .store
                    .get_attachment(volume_id)
                    .await?
                    .filter(|a| a.target == AttachTarget::Appliance)
                    .ok_or_else(|| {
                        EngineError::Conflict(format!(
                            "volume {volume_id} is no longer attached to the appliance"
                        ))
                    })?;
                let served = self.store.get_export(volume_id).await?.filter(|rec| {
                    self.exports
                        .get(volume_id)
                        .is_some_and(|s| s.generation == rec.generation)
                });
                let (rec, message) = match served {
                    // Served meanwhile (start-up restores every export before resuming).
                    Some(rec) => (rec, "the export was already served again"),
                    None => (
                        self.reexport(&att).await?,
                        "the device was verified and the export is served again",
                    ),
                };
                self.step(op, RepairStep::Exported).await?;
                export_generation = Some(rec.generation);
                message
            }
            RepairKind::RemoveOrphanExport => {
                if op.step != RepairStep::ExportRemoved {
                    // Re-checked in the volume's turn: an attach since the export was found makes it no orphan.
                    if let Some(a) = self
                        .store
                        .get_attachment(volume_id)
                        .await?
                        .filter(|a| a.target == AttachTarget::Appliance)
                    {
                        return Err(EngineError::Conflict(format!(
                            "the export of volume {volume_id} is no orphan: the volume is attached to the \
                             appliance ({}) again; nothing was removed",
                            a.vm_id
                        )));
                    }
                    self.teardown(volume_id, Teardown::Export).await?;
                    self.step(op, RepairStep::ExportRemoved).await?;
                }
                self.store.delete_export(volume_id).await?;
                "the export is no longer served and its record is dropped"
            }
        };
        let response = RepairResponse {
            volume_id,
            repair,
            export_generation,
            message: message.into(),
        };
        let response = json_of(&response);
        self.commit(op, || {
            self.store
                .finish_operation(op.id, OpStatus::Completed, Some(&response), None)
        })
        .await?;
        tracing::info!(volume = %volume_id, op = %op.id, %repair, "repaired");
        Ok(())
    }

    /// `Ok` when the database records an attachment of the volume and CloudStack has the volume attached to no
    /// VM (the `attached_only_in_database` finding); otherwise a conflict saying what is there now. A cloud
    /// that does not answer fails the repair, forgetting nothing.
    async fn still_attached_only_in_database(&self, volume_id: Uuid) -> Result<(), EngineError> {
        let Some(att) = self.store.get_attachment(volume_id).await? else {
            return Err(EngineError::Conflict(format!(
                "volume {volume_id} has no attachment to forget any more; nothing was changed"
            )));
        };
        let cv = self.cloud_volume(volume_id).await?;
        match cv.as_ref().and_then(|v| v.vm_id.as_deref()) {
            None => Ok(()),
            Some(vm) => Err(EngineError::Conflict(format!(
                "CloudStack now has volume {volume_id} attached to VM {vm} (the daemon records VM {}); the \
                 attachment is not forgotten, nothing was changed",
                att.vm_id
            ))),
        }
    }

    /// Adopts a volume CloudStack has attached to the appliance but the daemon does not manage: the cloud
    /// attachment is proven first, the device is verified by identity like any attach and must not be in use
    /// by the appliance itself, then it is named and served and the attachment is recorded with the
    /// operation's completion. Nothing is asked of CloudStack, and a failure leaves the cloud as it was.
    async fn adopt(&self, op: &Entry<RepairRequest, RepairStep>) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let appliance = self.identity.require().await?;
        let _vm = self.vm_locks.lock(&appliance).await;
        // A volume the daemon already manages is never adopted again: that would serve its export again
        // under its clients (with the default access list), or tear it down when the adoption fails.
        if let Some(a) = self.store.get_attachment(volume_id).await? {
            let served = if a.vm_id == appliance {
                "; a missing export is served again by POST /api/v1/exports or the reconcile's reexport"
            } else {
                ""
            };
            return Err(EngineError::Conflict(format!(
                "the daemon already manages volume {volume_id}: it is already attached to VM {}; it is not \
                 adopted{served}",
                a.vm_id
            )));
        }
        let cv = self.cloud_volume(volume_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("volume {volume_id} does not exist in CloudStack"))
        })?;
        match cv.vm_id.as_deref() {
            Some(vm) if vm == appliance => {}
            // Attached to another VM (e.g. by a predecessor during failover): recorded as it is.
            Some(vm) => return self.adopt_remote(op, &cv, vm.to_string()).await,
            None => {
                return Err(EngineError::Conflict(format!(
                    "CloudStack does not have volume {volume_id} attached to the appliance {appliance} or any \
                     other VM; attach it instead (POST /api/v1/volumes/{volume_id}/attach)"
                )))
            }
        }
        if cv.device_id == Some(0) || cv.volume_type.as_deref() == Some("ROOT") {
            return Err(EngineError::Conflict(format!(
                "volume {volume_id} is the appliance's own root disk; it is never adopted"
            )));
        }
        let volume = self.volume_record(volume_id).await?;
        let size = if cv.size > 0 {
            cv.size
        } else {
            volume.size_bytes
        };
        let dev = self.devices.resolve(volume_id, size).await?;
        if let Some(why) = self.devices.in_use(volume_id, &dev).await? {
            return Err(EngineError::Conflict(format!(
                "the device of volume {volume_id} is in use by the appliance itself ({why}); it is not adopted"
            )));
        }
        let served = self
            .serve_verified(
                &volume,
                size,
                &dev,
                &appliance,
                cv.device_id,
                self.cfg.nbd_default_clients.clone(),
            )
            .await;
        let Served {
            attachment: att,
            export,
            name,
            snap,
        } = match served {
            Ok(s) => s,
            Err(e) => {
                let _ = self.teardown(volume_id, Teardown::ExportAndName).await;
                return Err(e);
            }
        };
        self.step(op, RepairStep::Exported).await?;
        let response = RepairResponse {
            volume_id,
            repair: RepairKind::Adopt,
            export_generation: Some(snap.generation),
            message: format!(
                "adopted: device {} verified, named {} and served as {}",
                dev.dev_path.display(),
                name.display(),
                snap.name
            ),
        };
        let response = json_of(&response);
        if let Err(e) = self
            .commit(op, || {
                self.store
                    .commit_attach(op.id, &att, Some(&export), &response)
            })
            .await
        {
            let _ = self.teardown(volume_id, Teardown::ExportAndName).await;
            return Err(e);
        }
        tracing::info!(volume = %volume_id, op = %op.id, export = %snap.name, "adopted an appliance volume");
        Ok(())
    }

    /// Adopts a volume CloudStack has attached to a VM other than the appliance: nothing is local, so the
    /// cloud's attachment (proven by the caller) is recorded as a remote one with the operation's completion.
    async fn adopt_remote(
        &self,
        op: &Entry<RepairRequest, RepairStep>,
        cv: &crate::cloud::CloudVolume,
        vm_id: String,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let _vm = self.vm_locks.lock(&vm_id).await;
        self.volume_record(volume_id).await?;
        let now = chrono::Utc::now();
        let root = cv.device_id == Some(0) || cv.volume_type.as_deref() == Some("ROOT");
        let att = crate::store::AttachmentRecord {
            volume_id,
            vm_id: vm_id.clone(),
            target: AttachTarget::Remote,
            role: if root {
                volume_api::DiskRole::Root
            } else {
                volume_api::DiskRole::Data
            },
            device_id: cv.device_id,
            by_id_path: None,
            kernel_device: None,
            stable_name: None,
            export_generation: None,
            nbd_clients: Vec::new(),
            created_at: now,
            updated_at: now,
        };
        let response = RepairResponse {
            volume_id,
            repair: RepairKind::Adopt,
            export_generation: None,
            message: format!("adopted: CloudStack has it attached to VM {vm_id}; recorded as a remote attachment"),
        };
        self.store
            .commit_attach(op.id, &att, None, &json_of(&response))
            .await?;
        tracing::info!(volume = %volume_id, op = %op.id, vm = %vm_id, "adopted a remote attachment");
        Ok(())
    }
}
