//! Start-up recovery (guarantees 3 and 6): exports and stable names re-created from the database after
//! re-verifying each device, then every unfinished journal entry re-queued in the order it was first queued
//! and resumed from its last step.

use std::path::Path;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::{Engine, EngineError};
use crate::store::{AttachTarget, AttachmentFilter, OpType, OperationRecord};

impl Engine {
    /// Re-verifies the device of every appliance attachment and re-creates its stable name and export, except
    /// for volumes with an unfinished detach or delete.
    /// Returns the volumes that could not be restored and why.
    /// Of the volumes whose exports could not be restored at start-up, those still attached to the appliance
    /// (as recorded) and not served now.
    pub async fn still_unexported(
        &self,
        problems: &[(Uuid, String)],
    ) -> Result<Vec<(Uuid, String)>, EngineError> {
        let mut left = Vec::new();
        for (volume_id, why) in problems {
            let on_appliance = self
                .inner
                .store
                .get_attachment(*volume_id)
                .await?
                .is_some_and(|a| a.target == AttachTarget::Appliance);
            if on_appliance && self.inner.exports.get(*volume_id).is_none() {
                left.push((*volume_id, why.clone()));
            }
        }
        Ok(left)
    }

    pub async fn restore_appliance_volumes(&self) -> Result<Vec<(Uuid, String)>, EngineError> {
        let inner = &self.inner;
        let atts = inner
            .store
            .list_attachments(&AttachmentFilter {
                vm_id: None,
                target: Some(AttachTarget::Appliance),
            })
            .await?;
        // A volume whose last operation is an interrupted detach or delete is leaving the appliance: it is not
        // served again (its device may already be gone); the resumed operation finishes the teardown.
        let leaving: std::collections::HashSet<Uuid> = inner
            .store
            .unfinished_operations()
            .await?
            .into_iter()
            .filter(|op| matches!(op.op_type, OpType::Detach | OpType::Delete))
            .filter_map(|op| op.volume_id)
            .collect();
        let mut problems = Vec::new();
        for att in atts {
            if leaving.contains(&att.volume_id) {
                tracing::info!(volume = %att.volume_id, "not exported again: an interrupted detach resumes");
                continue;
            }
            if let Some(name) = &att.stable_name {
                inner.devices.remember(att.volume_id, Path::new(name))?;
            }
            match inner.reexport(&att).await {
                Ok(rec) => {
                    tracing::info!(volume = %att.volume_id, export = %rec.export_name, generation = rec.generation, "export restored")
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    tracing::error!(volume = %att.volume_id, error = %msg, "cannot restore the export of an appliance volume");
                    problems.push((att.volume_id, msg));
                }
            }
        }
        Ok(problems)
    }

    /// Re-queues every unfinished operation (oldest first) in its volume's turn and returns how many, without
    /// waiting for them: new requests queue behind them. [`Engine::recovering`] counts those not yet ended.
    /// Each ends bounded (to its end, or recorded as stuck when its journal cannot be written).
    pub async fn resume_all(&self) -> Result<usize, EngineError> {
        let highest = self.inner.store.max_queue_seq().await?;
        self.inner
            .next_seq
            .fetch_max(highest.saturating_add(1), Ordering::SeqCst);
        let ops = recovery_order(self.inner.store.unfinished_operations().await?);
        let n = ops.len();
        let mut runs = Vec::with_capacity(n);
        for op in ops {
            tracing::info!(op = %op.id, kind = op.op_type.as_str(), step = %op.step, "resuming operation");
            self.inner.metrics.resumed();
            self.inner.recovering.fetch_add(1, Ordering::SeqCst);
            runs.push(self.spawn(op));
        }
        let inner = std::sync::Arc::clone(&self.inner);
        tokio::spawn(async move {
            for run in runs {
                let _ = run.await;
                inner.recovering.fetch_sub(1, Ordering::SeqCst);
            }
            if n > 0 {
                tracing::info!(resumed = n, "journal recovered");
            }
        });
        Ok(n)
    }

    /// Resumed operations that have not ended yet (recovery is in progress while above zero).
    pub fn recovering(&self) -> usize {
        self.inner.recovering.load(Ordering::SeqCst)
    }
}

/// The order operations are re-queued in: the journal's queue order (as read), except that within a volume an
/// operation whose cloud job is in flight goes first, so no later operation on that volume starts a second
/// job on it before the first one's outcome is known.
fn recovery_order(ops: Vec<OperationRecord>) -> Vec<OperationRecord> {
    let in_flight = |o: &OperationRecord| {
        o.cloud_job_id.is_some()
            && volume_api::OperationStep::parse_stored(&o.step)
                .is_some_and(|s| s.as_str().ends_with("_job"))
    };
    let mut first_of_volume: Vec<Option<uuid::Uuid>> = Vec::new();
    let (mut early, mut rest): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for op in ops {
        if in_flight(&op) && !first_of_volume.contains(&op.volume_id) {
            first_of_volume.push(op.volume_id);
            early.push(op);
        } else {
            rest.push(op);
        }
    }
    early.extend(rest);
    early
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{OpStatus, OpType};
    use chrono::Utc;
    use uuid::Uuid;

    fn op(volume: Uuid, step: &str, job: Option<&str>) -> OperationRecord {
        OperationRecord {
            id: Uuid::new_v4(),
            op_type: OpType::Attach,
            status: OpStatus::Executing,
            step: step.into(),
            volume_id: Some(volume),
            vm_id: None,
            request: serde_json::json!({}),
            response: None,
            error: None,
            cloud_job_id: job.map(str::to_string),
            idempotency_key: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            completed_at: None,
        }
    }

    #[test]
    fn an_operation_with_its_cloud_job_in_flight_resumes_before_the_ones_queued_with_it() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let queued = op(a, "accepted", None);
        let in_flight = op(a, "cloud_attach_job", Some("job-1"));
        let other = op(b, "started", None);
        // A job id alone (the job has ended: step moved on) is no reason to go first.
        let done_job = op(b, "cloud_attached", Some("job-2"));
        let order: Vec<Uuid> = recovery_order(vec![
            queued.clone(),
            other.clone(),
            in_flight.clone(),
            done_job.clone(),
        ])
        .iter()
        .map(|o| o.id)
        .collect();
        assert_eq!(order, [in_flight.id, queued.id, other.id, done_job.id]);
    }
}
