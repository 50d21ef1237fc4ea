//! The `test_failover_cleanup` workflow (`POST /cleanup/test-failover`): after a test failover, the volume
//! goes back from the test VM to the appliance as one journaled operation. Unless `force_clean`, the test VM
//! is stopped first (stopVirtualMachine, forced; job id journaled) and must then be `Stopped`; the volume is
//! detached from it (the detach's step and job); with `delete_vm` the test VM is destroyed and expunged
//! (job id journaled; a failed destroy is reported in the answer, the volume still goes back); then the
//! attach to the appliance runs with the attach's own steps and functions (cloud attach, device, name,
//! export, commit, and its compensation when the appliance's part fails).
//!
//! Each part is skipped when the cloud shows it done, so a resumed entry picks up where it stopped; a part is
//! started again only from the steps before its own, so a job in flight is never doubled by a later one.

use volume_api::{TestFailoverCleanupRequest, TestFailoverCleanupResponse};

use super::attach::OnAppliance;
use super::export::Served;
use super::journal::{json_of, CleanupStep, Entry};
use super::{EngineError, Inner};
use crate::cloud::CloudErrorKind;

type CleanupEntry = Entry<TestFailoverCleanupRequest, CleanupStep>;

/// CloudStack's state of a stopped VM.
const STOPPED: &str = "Stopped";

/// Whether a VM CloudStack reports (or no longer reports) is destroyed.
fn destroyed(state: Option<&str>) -> bool {
    matches!(state, None | Some("Destroyed" | "Expunging" | "Expunged"))
}

/// The error of a clean-up that names an appliance other than the daemon's.
pub(super) fn wrong_appliance(oma_vm_id: &str, appliance: &str) -> EngineError {
    EngineError::Invalid {
        field: "oma_vm_id",
        message: format!(
            "oma_vm_id {oma_vm_id} is not the appliance this daemon runs on ({appliance}); send the clean-up to \
             the daemon of that appliance, or name {appliance}"
        ),
    }
}

impl CleanupStep {
    /// Whether the entry is before `step` in the workflow (a part is started only from steps before its own).
    fn before(self, step: CleanupStep) -> bool {
        const ORDER: [CleanupStep; 7] = [
            CleanupStep::Accepted,
            CleanupStep::Started,
            CleanupStep::CloudStopJob,
            CleanupStep::CloudDetachJob,
            CleanupStep::CloudDestroyJob,
            CleanupStep::CloudAttachJob,
            CleanupStep::CloudAttached,
        ];
        let at = |s| ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len());
        at(self) <= at(step)
    }
}

impl Inner {
    pub(super) async fn test_failover_cleanup(&self, op: &CleanupEntry) -> Result<(), EngineError> {
        let req = &op.request;
        let (volume_id, test_vm) = (req.volume_id, req.test_vm_id.as_str());
        let appliance = self.identity.require().await?;
        if req.oma_vm_id != appliance {
            return Err(wrong_appliance(&req.oma_vm_id, &appliance));
        }
        if matches!(
            op.step,
            CleanupStep::Compensating | CleanupStep::CompensateDetachJob
        ) {
            // Interrupted while undoing a failed attach to the appliance: finish undoing it.
            let _vm = self.vm_locks.lock(&appliance).await;
            let outcome = self.compensate_attach(op, volume_id, &appliance).await;
            return Err(EngineError::Compensated {
                cause: Box::new(EngineError::Interrupted("the test-failover clean-up")),
                outcome,
            });
        }
        let volume = self.volume_record(volume_id).await?;
        let missing =
            || EngineError::NotFound(format!("volume {volume_id} does not exist in CloudStack"));
        let mut cv = self.cloud_volume(volume_id).await?.ok_or_else(missing)?;
        let recorded_on_appliance = self
            .store
            .get_attachment(volume_id)
            .await?
            .is_some_and(|a| a.vm_id == appliance);
        match cv.vm_id.as_deref() {
            // A resumed entry finds its own attach done here (its commit records the attachment); an
            // attachment to the appliance already recorded is another operation's, whose export and sessions
            // must stay as they are.
            Some(v) if v == appliance && recorded_on_appliance => {
                return Err(EngineError::Conflict(format!(
                    "volume {volume_id} is already attached to the appliance {appliance} and served; there is \
                     nothing to clean up, nothing was changed"
                )));
            }
            Some(v) if v == appliance => {}
            Some(v) if v == test_vm => {
                let _vm = self.vm_locks.lock(test_vm).await;
                if !req.force_clean && op.step.before(CleanupStep::CloudStopJob) {
                    self.stop_test_vm(op, test_vm).await?;
                }
                self.cloud_detach(op, volume_id).await?;
                cv = self.cloud_volume(volume_id).await?.ok_or_else(missing)?;
            }
            Some(other) => {
                return Err(EngineError::Conflict(format!(
                    "CloudStack reports volume {volume_id} attached to VM {other}, not to the test VM {test_vm}; \
                     nothing was changed"
                )))
            }
            None if op.step.before(CleanupStep::Started) => {
                // Fresh: the volume must be the test VM's as the daemon records it (the submission checked).
                let recorded = self.store.get_attachment(volume_id).await?;
                if recorded.as_ref().map(|a| a.vm_id.as_str()) != Some(test_vm) {
                    return Err(not_attached(volume_id, test_vm, recorded.map(|a| a.vm_id), None));
                }
            }
            None => {}
        }
        let mut notes = Vec::new();
        if cv.vm_id.as_deref() != Some(appliance.as_str()) {
            if req.delete_vm && op.step.before(CleanupStep::CloudDestroyJob) {
                if let Some(problem) = self.destroy_test_vm(op, test_vm).await? {
                    notes.push(problem);
                }
            }
            let _vm = self.vm_locks.lock(&appliance).await;
            cv = match self.cloud_attach(op, volume_id, &appliance, None).await {
                Ok(cv) => cv,
                Err(e) => {
                    // Detached from the test VM but not attached to the appliance: the records say so too.
                    if self
                        .cloud_volume(volume_id)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|v| v.vm_id.is_none())
                    {
                        self.store.clear_attachment(volume_id).await?;
                    }
                    return Err(e);
                }
            };
        }
        let vm_deleted = req.delete_vm
            && destroyed(
                self.cloud
                    .get_vm(test_vm)
                    .await?
                    .as_ref()
                    .map(|v| v.state.as_str()),
            );
        let _vm = self.vm_locks.lock(&appliance).await;
        let clients = self.cfg.nbd_default_clients.clone();
        let on = match self
            .serve_on_appliance(&volume, &cv, &appliance, clients)
            .await
        {
            Ok(on) => on,
            Err(cause) => return Err(self.undo_attach(op, volume_id, &appliance, cause).await),
        };
        let OnAppliance {
            served:
                Served {
                    attachment: att,
                    export,
                    name,
                    snap,
                },
            device,
            took: _,
        } = on;
        let mut message = if vm_deleted {
            format!("volume detached from test VM {test_vm}, the test VM destroyed, and the volume attached to the appliance and exported")
        } else {
            format!(
                "volume detached from test VM {test_vm}, attached to the appliance and exported"
            )
        };
        for n in &notes {
            message.push_str("; ");
            message.push_str(n);
        }
        let response = TestFailoverCleanupResponse {
            test_vm_id: test_vm.to_string(),
            volume_id,
            oma_vm_id: appliance.clone(),
            device_path: export.device_path.clone(),
            vm_deleted,
            message,
            kernel_device: Some(device.dev_path.display().to_string()),
            symlink_path: Some(name.display().to_string()),
            persistent_device_name: name.file_name().map(|n| n.to_string_lossy().to_string()),
            export_name: snap.name,
            nbd_port: self.exports.port(),
            export_generation: snap.generation,
        };
        let response = json_of(&response);
        let committed = self
            .commit(op, || {
                self.store.commit_attach_replacing(
                    op.id,
                    Some(test_vm),
                    &att,
                    Some(&export),
                    &response,
                )
            })
            .await;
        match committed {
            Ok(()) => Ok(()),
            Err(cause) => Err(self.undo_attach(op, volume_id, &appliance, cause).await),
        }
    }

    /// Stops the test VM (forced) unless CloudStack reports it stopped, and checks that it then is.
    async fn stop_test_vm(&self, op: &CleanupEntry, test_vm: &str) -> Result<(), EngineError> {
        let state = |vm: Option<crate::cloud::CloudVm>| vm.map(|v| v.state);
        let before = state(self.cloud.get_vm(test_vm).await?);
        if before.as_deref() == Some(STOPPED) {
            return Ok(());
        }
        let job_id = self
            .start_or_resume_job(op, CleanupStep::CloudStopJob, async {
                Ok(self.cloud.stop_vm(test_vm).await?)
            })
            .await?;
        // Whatever the job says, the VM's state decides (a job the cloud forgot, or a failed one that stopped
        // it anyway); only an unreachable cloud is waited out.
        let job_error = match self.cloud.wait_vm_job(&job_id, self.cfg.job_timeout).await {
            Ok(_) => None,
            Err(e) if e.kind == CloudErrorKind::Unavailable => return Err(e.into()),
            Err(e) => Some(e.chain()),
        };
        let after = state(self.cloud.get_vm(test_vm).await?);
        if after.as_deref() != Some(STOPPED) {
            let job = match job_error {
                Some(e) => format!("job {job_id} failed: {e}"),
                None => format!("job {job_id}"),
            };
            return Err(EngineError::Conflict(format!(
                "the test VM {test_vm} is {} after a forced stopVirtualMachine ({job}); the volume was not \
                 detached. Stop the VM in CloudStack and retry, or retry with force_clean to detach it from a \
                 running VM",
                after.as_deref().unwrap_or("gone")
            )));
        }
        tracing::info!(vm = %test_vm, job = %job_id, "test VM stopped");
        Ok(())
    }

    /// Destroys the test VM with expunge unless it is gone already. A failed destroy job does not fail the
    /// clean-up (the volume is already detached from it): it is returned, for the answer.
    async fn destroy_test_vm(
        &self,
        op: &CleanupEntry,
        test_vm: &str,
    ) -> Result<Option<String>, EngineError> {
        if self.cloud.get_vm(test_vm).await?.is_none() {
            // Gone: destroyed by this entry before it stopped, or by someone else.
            return Ok(None);
        }
        let _vm = self.vm_locks.lock(test_vm).await;
        // Destroying with expunge deletes the VM's root volume: never one the daemon manages (a migrated
        // boot disk attached with attach-root). Its data volumes are only detached.
        for v in self.cloud.volumes_of_vm(test_vm).await? {
            let root = v
                .volume_type
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("ROOT"));
            let Ok(id) = uuid::Uuid::parse_str(&v.id) else {
                continue;
            };
            if root
                && self
                    .store
                    .get_volume(id)
                    .await?
                    .is_some_and(|r| r.deleted_at.is_none())
            {
                tracing::warn!(vm = %test_vm, volume = %id, "not destroying the test VM: its root disk is a managed volume");
                return Ok(Some(format!(
                    "the test VM {test_vm} was not destroyed: its root disk is volume {id}, which the daemon \
                     manages, and destroying the VM would delete it; clean that volume up too \
                     (cleanup-test-failover {id}), then destroy the VM in CloudStack"
                )));
            }
        }
        let job_id = self
            .start_or_resume_job(op, CleanupStep::CloudDestroyJob, async {
                Ok(self.cloud.destroy_vm(test_vm).await?)
            })
            .await?;
        match self.cloud.wait_vm_job(&job_id, self.cfg.job_timeout).await {
            Ok(_) => {
                tracing::info!(vm = %test_vm, job = %job_id, "test VM destroyed");
                Ok(None)
            }
            Err(e) if e.kind == CloudErrorKind::NotFound => Ok(None),
            Err(e) if e.kind == CloudErrorKind::Unavailable => Err(e.into()),
            Err(e) => {
                tracing::warn!(vm = %test_vm, job = %job_id, error = %e.chain(), "destroying the test VM failed");
                Ok(Some(format!(
                    "destroying the test VM {test_vm} failed ({}); destroy it in CloudStack",
                    e.chain()
                )))
            }
        }
    }
}

/// The refusal of a clean-up of a volume that is not attached to the test VM.
pub(super) fn not_attached(
    volume_id: uuid::Uuid,
    test_vm: &str,
    recorded: Option<String>,
    cloud: Option<Option<String>>,
) -> EngineError {
    let recorded = match recorded {
        Some(vm) => format!("the daemon records it attached to VM {vm}"),
        None => "the daemon records it detached".to_string(),
    };
    let cloud = match cloud {
        Some(Some(vm)) => format!(" and CloudStack reports it attached to VM {vm}"),
        Some(None) => " and CloudStack reports it detached".to_string(),
        None => String::new(),
    };
    EngineError::Conflict(format!(
        "volume {volume_id} is not attached to the test VM {test_vm}: {recorded}{cloud}; nothing was changed"
    ))
}
