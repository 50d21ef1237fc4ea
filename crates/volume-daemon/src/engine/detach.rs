//! The `detach` workflow (guarantee 5): for the appliance, tear down the export (stop new connections, drain,
//! close sessions, flush) and the stable name; then cloud detach (job id journaled); then wait until the
//! device is gone; commit. Detaching from another VM never touches the appliance's exports. `delete` runs
//! the same steps first.

use uuid::Uuid;
use volume_api::{DetachVolumeResponse, VolumeOperationRequest};

use super::journal::{json_of, DetachStep, Entry, Step};
use super::{EngineError, Inner};
use crate::cloud::{CloudErrorKind, VolumeJobKind};
use crate::store::{AttachTarget, AttachmentRecord};

/// What the detach part of `detach` or `delete` found and did.
pub(super) struct DetachOutcome {
    pub was_attached: bool,
    pub vm_id: Option<String>,
    pub previous_device_path: Option<String>,
}

impl DetachOutcome {
    pub(super) const NOT_ATTACHED: Self = Self {
        was_attached: false,
        vm_id: None,
        previous_device_path: None,
    };
}

impl Inner {
    pub(super) async fn detach(
        &self,
        op: &Entry<VolumeOperationRequest, DetachStep>,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let out = self.detach_steps(op, volume_id).await?;
        let response = DetachVolumeResponse {
            volume_id,
            device_path: out.previous_device_path.unwrap_or_default(),
            vm_id: out.vm_id,
            message: if out.was_attached {
                "volume detached"
            } else {
                "volume was not attached"
            }
            .into(),
        };
        let response = json_of(&response);
        self.commit(op, || self.store.commit_detach(op.id, volume_id, &response))
            .await
    }

    /// The detach steps, journaled in the entry's own kind of step (`detach` or `delete`).
    pub(super) async fn detach_steps<R, S: Step + From<DetachStep>>(
        &self,
        op: &Entry<R, S>,
        volume_id: Uuid,
    ) -> Result<DetachOutcome, EngineError> {
        let att = self.store.get_attachment(volume_id).await?;
        let cv = self.cloud_volume(volume_id).await?;
        let cloud_vm = cv.as_ref().and_then(|v| v.vm_id.clone());
        let vm = match (&att, &cloud_vm) {
            (_, Some(vm)) => vm.clone(),
            (Some(a), None) => a.vm_id.clone(),
            (None, None) => return Ok(DetachOutcome::NOT_ATTACHED),
        };
        let appliance = self.identity.current().await.vm_id;
        let local = att
            .as_ref()
            .is_some_and(|a| a.target == AttachTarget::Appliance)
            || appliance.as_deref() == Some(vm.as_str());
        let _vm = self.vm_locks.lock(&vm).await;
        // Serving stops before the cloud is asked: a failed flush (or any other teardown failure) fails the
        // detach here, with the volume still attached and served again.
        let appliance_att = att
            .as_ref()
            .filter(|a| local && a.target == AttachTarget::Appliance);
        if local {
            // Not journaled on its own (`export_removed`): the teardown is local and idempotent, and an entry
            // resumed from any later point does it again before anything else. A failed teardown (a failed
            // final flush) stops the detach before the cloud and serves the volume again.
            if let Err(cause) = self.teardown_local(volume_id).await {
                return Err(self.serve_again(appliance_att, cause).await);
            }
        }
        if cloud_vm.is_some() {
            match self.cloud_detach(op, volume_id).await {
                Ok(()) => {}
                // No answer that says what became of detachVolume (CloudStack may have acted on it): the
                // volume is not served again, and the operation, run again from its journaled step, finds
                // the job or the volume detached (or sends the call again) when the cloud answers.
                Err(EngineError::Cloud(e)) if e.kind == CloudErrorKind::Unavailable => {
                    return Err(EngineError::Cloud(e));
                }
                // The job still ran at the deadline: CloudStack may yet detach the volume, so it is not served
                // again either (a writer would lose its disk mid-write); the reconcile settles it once the
                // job has ended.
                Err(EngineError::Cloud(e)) if e.kind == CloudErrorKind::JobStillRunning => {
                    return Err(EngineError::Compensated {
                        cause: Box::new(EngineError::Cloud(e)),
                        outcome: format!(
                            "CloudStack may still detach volume {volume_id}, so it is not served again; once \
                             the job has ended, POST /api/v1/reconcile with apply serves it again if it stayed \
                             attached, or forgets the attachment (the scheduled reconcile does the same)"
                        ),
                    });
                }
                // Still attached: an appliance volume is served again rather than left attached unexported.
                Err(cause) => return Err(self.serve_again(appliance_att, cause).await),
            }
        }
        // `cloud_detached` is not journaled on its own: an entry resumed after this point finds the cloud
        // reporting the volume detached, skips the job and only waits for the device and commits.
        if local {
            if let Err(e) = self
                .devices
                .wait_gone(volume_id, self.cfg.device_timeout)
                .await
            {
                // The cloud no longer attaches it: the records go, and the operation says what is left.
                self.store.clear_attachment(volume_id).await?;
                return Err(e.into());
            }
        }
        Ok(DetachOutcome {
            was_attached: true,
            vm_id: Some(vm),
            previous_device_path: att.and_then(|a| a.by_id_path.or(a.kernel_device)),
        })
    }

    /// After a detach failed with the volume still attached: an appliance volume's export is opened again
    /// (a new generation, after re-verifying the device) and the error says how that went.
    async fn serve_again(
        &self,
        appliance_att: Option<&AttachmentRecord>,
        cause: EngineError,
    ) -> EngineError {
        let Some(a) = appliance_att else {
            return cause;
        };
        self.metrics.compensated();
        let outcome = match self.reexport(a).await {
            Ok(rec) => format!(
                "the volume stays attached to the appliance and export {} is served again",
                rec.export_name
            ),
            Err(e) => format!(
                "the volume stays attached to the appliance but serving it again failed: {}; \
                 run POST /api/v1/reconcile with apply",
                crate::error_chain(&e)
            ),
        };
        EngineError::Compensated {
            cause: Box::new(cause),
            outcome,
        }
    }

    /// detachVolume (or the journaled job), until the cloud reports the volume detached.
    pub(super) async fn cloud_detach<R, S: Step + From<DetachStep>>(
        &self,
        op: &Entry<R, S>,
        volume_id: Uuid,
    ) -> Result<(), EngineError> {
        let job_id = self
            .start_or_adopt_volume_job(
                op,
                DetachStep::CloudDetachJob.into(),
                volume_id,
                VolumeJobKind::Detach,
                async { Ok(self.cloud.detach_volume(&volume_id.to_string()).await?) },
            )
            .await?;
        let after = self
            .finish_job_or_reached(&job_id, volume_id, |v| v.is_none_or(|v| v.vm_id.is_none()))
            .await?;
        if let Some(still) = after.and_then(|v| v.vm_id) {
            return Err(EngineError::CloudDisagrees(format!(
                "CloudStack finished detach job {job_id} but still reports volume {volume_id} attached to {still}"
            )));
        }
        Ok(())
    }
}
