//! The `attach` workflow (guarantee 4): cloud attach (job id journaled) → for the appliance: device by identity
//! → verify → stable name → export (new generation) → commit; for any other VM: commit. A failure after the
//! cloud attach on the appliance is compensated (export and name removed, the volume detached again), and an
//! entry interrupted while compensating finishes compensating. The cloud attach, the appliance's part and the
//! compensation are generic over the journal's step type, so that a test-failover clean-up journals them as
//! its own steps.

use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;
use volume_api::{AttachOperationRequest, AttachVolumeResponse, DiskRole};

use super::export::{Served, Teardown};
use super::journal::{json_of, AttachStep, Entry, Step};
use super::{EngineError, Inner};
use crate::cloud::{CloudErrorKind, CloudVolume, VolumeJobKind};
use crate::devices::Device;
use crate::store::{AttachTarget, AttachmentRecord, VolumeRecord};

/// A volume's device on the appliance, verified, named and served: what an attach to the appliance commits.
pub(super) struct OnAppliance {
    pub served: Served,
    pub device: Device,
    /// How long the device took to appear.
    pub took: Duration,
}

type AttachEntry = Entry<AttachOperationRequest, AttachStep>;

impl Inner {
    pub(super) async fn attach(&self, op: &AttachEntry) -> Result<(), EngineError> {
        let req = &op.request;
        let (volume_id, vm_id) = (req.volume_id, req.vm_id.as_str());
        let appliance = self.identity.require().await?;
        let local = vm_id == appliance;
        let _vm = self.vm_locks.lock(vm_id).await;
        if matches!(
            op.step,
            AttachStep::Compensating | AttachStep::CompensateDetachJob
        ) {
            // Interrupted while undoing a failed attach: finish undoing it.
            let outcome = self.compensate_attach(op, volume_id, vm_id).await;
            return Err(EngineError::Compensated {
                cause: Box::new(EngineError::Interrupted("the attach")),
                outcome,
            });
        }
        let volume = self.volume_record(volume_id).await?;
        // An attachment is recorded only with the commit that ends an attach, so one found here is another
        // operation's: an attach queued behind it (its check passed while that one ran) must not serve the
        // export again under its clients, nor undo that attach when its own part fails.
        // CloudStack has the last word on whether the record still holds: one whose volume CloudStack reports
        // detached (detached behind the daemon's back: a hub's emergency path, an operator) is forgotten as the
        // reconcile's `forget_attachment` repair forgets it, export and stable name included, and the attach
        // goes on. Done again when the operation resumes after a crash.
        let recorded = self.store.get_attachment(volume_id).await?;
        let cv = self.cloud_volume(volume_id).await?;
        if let Some(a) = &recorded {
            let cloud_vm = cv.as_ref().and_then(|v| v.vm_id.as_deref());
            if cloud_vm.is_some() {
                let which = if a.vm_id == vm_id { "already " } else { "" };
                let cloud = match cloud_vm {
                    Some(c) if c != a.vm_id => format!(" (CloudStack reports VM {c})"),
                    _ => String::new(),
                };
                return Err(EngineError::Conflict(format!(
                    "volume {volume_id} is {which}attached to VM {}{cloud}; detach it first",
                    a.vm_id
                )));
            }
            tracing::warn!(
                volume = %volume_id,
                recorded_vm = %a.vm_id,
                "CloudStack reports the volume detached: its attachment record is forgotten before the attach"
            );
            self.teardown(volume_id, Teardown::ExportAndName).await?;
            self.store.clear_attachment(volume_id).await?;
        }
        let cv = cv.ok_or_else(|| {
            EngineError::NotFound(format!("volume {volume_id} does not exist in CloudStack"))
        })?;
        let cv = match cv.vm_id.as_deref() {
            Some(v) if v == vm_id => cv,
            Some(other) => {
                return Err(EngineError::Conflict(format!(
                    "CloudStack reports volume {volume_id} attached to VM {other}; detach it first"
                )))
            }
            None => {
                self.cloud_attach(op, volume_id, vm_id, req.device_id)
                    .await?
            }
        };
        if !local {
            // Nothing local follows: the commit itself records that the cloud attach is done.
            return self.commit_remote_attach(op, &cv).await;
        }
        match self.attach_local(op, &volume, &cv).await {
            Ok(()) => Ok(()),
            Err(cause) => Err(self.undo_attach(op, volume_id, vm_id, cause).await),
        }
    }

    /// attachVolume (or the journaled job), journaled with the entry's `cloud_attach_job`, until the cloud
    /// reports the volume attached to `vm_id`.
    pub(super) async fn cloud_attach<R, S: Step + From<AttachStep>>(
        &self,
        op: &Entry<R, S>,
        volume_id: Uuid,
        vm_id: &str,
        device_id: Option<u32>,
    ) -> Result<CloudVolume, EngineError> {
        let job_id = self
            .start_or_adopt_volume_job(
                op,
                AttachStep::CloudAttachJob.into(),
                volume_id,
                VolumeJobKind::Attach,
                async {
                    Ok(self
                        .cloud
                        .attach_volume(&volume_id.to_string(), vm_id, device_id)
                        .await?)
                },
            )
            .await?;
        let v = match self
            .finish_job_or_reached(&job_id, volume_id, |v| {
                v.is_some_and(|v| v.vm_id.as_deref() == Some(vm_id))
            })
            .await
        {
            // CloudStack may yet attach it: the error says how to take it over or undo it then.
            Err(EngineError::Cloud(e)) if e.kind == CloudErrorKind::JobStillRunning => {
                return Err(EngineError::Compensated {
                    cause: Box::new(EngineError::Cloud(e)),
                    outcome: format!(
                        "CloudStack may still attach volume {volume_id} to VM {vm_id}; once the job has ended, \
                         POST /api/v1/volumes/{volume_id}/adopt takes the attachment over (or detach it in \
                         CloudStack); POST /api/v1/reconcile lists it"
                    ),
                });
            }
            other => other?,
        }
        .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "volume {volume_id} disappeared from CloudStack during attach"
                ))
            })?;
        if v.vm_id.as_deref() != Some(vm_id) {
            return Err(EngineError::CloudDisagrees(format!(
                "CloudStack finished the attach job {job_id} but reports volume {volume_id} {}",
                super::whereabouts(Some(&v))
            )));
        }
        Ok(v)
    }

    /// After a failure of the appliance's part of an attach: undoes the attach and returns the error that
    /// says what failed and what the undoing did.
    pub(super) async fn undo_attach<R, S: Step + From<AttachStep>>(
        &self,
        op: &Entry<R, S>,
        volume_id: Uuid,
        vm_id: &str,
        cause: EngineError,
    ) -> EngineError {
        self.metrics.compensated();
        let outcome = self.compensate_attach(op, volume_id, vm_id).await;
        EngineError::Compensated {
            cause: Box::new(cause),
            outcome,
        }
    }

    /// The appliance's part of an attach, once the cloud reports the volume attached to the appliance: device
    /// by identity → verify → stable name → export. Nothing is journaled: all of it is local and idempotent,
    /// an entry stopped before the commit (at `cloud_attach_job`) finds the volume attached in the cloud and
    /// redoes it, and its results are committed with the attachment in one transaction.
    pub(super) async fn serve_on_appliance(
        &self,
        volume: &VolumeRecord,
        cv: &CloudVolume,
        vm_id: &str,
        clients: Vec<String>,
    ) -> Result<OnAppliance, EngineError> {
        let volume_id = volume.id;
        let size = if cv.size > 0 {
            cv.size
        } else {
            volume.size_bytes
        };
        let (dev, took) = self
            .devices
            .wait_for(volume_id, size, self.cfg.device_timeout)
            .await?;
        self.metrics.device_appeared(took);
        tracing::info!(volume = %volume_id, device = %dev.dev_path.display(), took_ms = took.as_millis() as u64, "device found");
        let served = self
            .serve_verified(volume, size, &dev, vm_id, cv.device_id, clients)
            .await?;
        Ok(OnAppliance {
            served,
            device: dev,
            took,
        })
    }

    async fn commit_remote_attach(
        &self,
        op: &AttachEntry,
        cv: &CloudVolume,
    ) -> Result<(), EngineError> {
        let req = &op.request;
        let now = Utc::now();
        let att = AttachmentRecord {
            volume_id: req.volume_id,
            vm_id: req.vm_id.clone(),
            target: AttachTarget::Remote,
            role: if req.is_root() {
                DiskRole::Root
            } else {
                DiskRole::Data
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
        let response = AttachVolumeResponse {
            volume_id: req.volume_id,
            vm_id: req.vm_id.clone(),
            device_path: None,
            device_id: cv.device_id,
            attach_as: req.attach_as,
            kernel_device: None,
            persistent_device_name: None,
            symlink_path: None,
            export_name: None,
            nbd_port: None,
            export_generation: None,
            device_appeared_ms: None,
            message: "volume attached".into(),
        };
        let response = json_of(&response);
        self.commit(op, || {
            self.store.commit_attach(op.id, &att, None, &response)
        })
        .await
    }

    /// The appliance's part ([`Self::serve_on_appliance`]) → commit, with one journal write: the commit.
    async fn attach_local(
        &self,
        op: &AttachEntry,
        volume: &VolumeRecord,
        cv: &CloudVolume,
    ) -> Result<(), EngineError> {
        let volume_id = volume.id;
        let clients = op
            .request
            .nbd_clients
            .clone()
            .unwrap_or_else(|| self.cfg.nbd_default_clients.clone());
        let OnAppliance {
            served:
                Served {
                    attachment: att,
                    export,
                    name,
                    snap,
                },
            device: dev,
            took,
        } = self
            .serve_on_appliance(volume, cv, &op.request.vm_id, clients)
            .await?;
        let device_path = export.device_path.clone();
        let response = AttachVolumeResponse {
            volume_id,
            vm_id: op.request.vm_id.clone(),
            device_path: Some(device_path),
            device_id: cv.device_id,
            attach_as: None,
            kernel_device: Some(dev.dev_path.display().to_string()),
            persistent_device_name: name.file_name().map(|n| n.to_string_lossy().to_string()),
            symlink_path: Some(name.display().to_string()),
            export_name: Some(snap.name),
            nbd_port: Some(self.exports.port()),
            export_generation: Some(snap.generation),
            device_appeared_ms: Some(took.as_millis() as u64),
            message: "volume attached to the appliance and exported".into(),
        };
        let response = json_of(&response);
        self.commit(op, || {
            self.store
                .commit_attach(op.id, &att, Some(&export), &response)
        })
        .await
    }

    /// Undoes an appliance attach whose later step failed; returns what happened, for the operation's error.
    pub(super) async fn compensate_attach<R, S: Step + From<AttachStep>>(
        &self,
        op: &Entry<R, S>,
        volume_id: Uuid,
        vm_id: &str,
    ) -> String {
        let _ = self.step(op, AttachStep::Compensating.into()).await;
        let mut problems = Vec::new();
        if let Err(e) = self.teardown_local(volume_id).await {
            problems.push(format!(
                "removing the export and stable name failed: {}",
                crate::error_chain(&e)
            ));
        }
        match self.detach_again(op, volume_id, vm_id).await {
            Ok(_) => {
                if let Err(e) = self
                    .devices
                    .wait_gone(volume_id, self.cfg.device_timeout)
                    .await
                {
                    problems.push(format!(
                        "the device did not go away: {}",
                        crate::error_chain(&e)
                    ));
                }
            }
            Err(e) => problems.push(format!(
                "detaching it again failed: {}; run POST /api/v1/reconcile",
                crate::error_chain(&e)
            )),
        }
        if let Err(e) = self.store.clear_attachment(volume_id).await {
            problems.push(format!(
                "clearing the attachment record failed: {}; run POST /api/v1/reconcile",
                crate::error_chain(&e)
            ));
        }
        if problems.is_empty() {
            format!("the volume was detached from the appliance {vm_id} again")
        } else {
            format!("undoing the attach was incomplete: {}", problems.join("; "))
        }
    }

    /// The compensation's cloud detach; `false` when the cloud no longer has it attached to `vm_id`.
    async fn detach_again<R, S: Step + From<AttachStep>>(
        &self,
        op: &Entry<R, S>,
        volume_id: Uuid,
        vm_id: &str,
    ) -> Result<bool, EngineError> {
        let cv = self.cloud_volume(volume_id).await?;
        if cv.as_ref().and_then(|v| v.vm_id.as_deref()) != Some(vm_id) {
            return Ok(false);
        }
        let job_id = self
            .start_or_adopt_volume_job(
                op,
                AttachStep::CompensateDetachJob.into(),
                volume_id,
                VolumeJobKind::Detach,
                async { Ok(self.cloud.detach_volume(&volume_id.to_string()).await?) },
            )
            .await?;
        self.finish_job_or_reached(&job_id, volume_id, |v| {
            v.and_then(|v| v.vm_id.as_deref()) != Some(vm_id)
        })
        .await?;
        Ok(true)
    }
}
