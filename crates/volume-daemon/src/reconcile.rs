//! The reconciler: compares the database, the cloud, the appliance's devices and the live NBD exports, reports
//! every disagreement and, when asked, repairs the ones that have one safe repair: each repair is submitted to
//! the engine as a journaled `repair` operation (queued in the volume's FIFO like any other), and the report
//! names that operation and whether it completed. Volumes with an unfinished operation are left to that
//! operation.

use std::collections::HashSet;

use uuid::Uuid;
use volume_api::{Drift, DriftAction, DriftKind, OperationStatus, ReconcileReport};

use crate::engine::{DeviceCheck, Engine, EngineError};
use crate::store::AttachTarget;

fn drift(
    volume_id: Option<Uuid>,
    kind: DriftKind,
    detail: String,
    action: DriftAction,
    hint: &str,
) -> Drift {
    Drift {
        volume_id,
        kind,
        detail,
        action,
        hint: hint.into(),
        operation_id: None,
        applied: false,
    }
}

/// Checks every known volume and live export; repairs when `apply`.
pub async fn run(engine: &Engine, apply: bool) -> Result<ReconcileReport, EngineError> {
    let busy = engine.busy_volumes().await?;
    let (views, checked_volumes) = engine.reconcile_views(&busy).await?;
    let appliance = engine.appliance().await.vm_id;
    let mut out = Vec::new();
    for v in &views {
        let id = v.volume.id;
        let cv = match &v.cloud {
            Some(Ok(Some(cv))) => cv,
            Some(Err(e)) => {
                out.push(drift(
                    Some(id),
                    DriftKind::CloudUnavailable,
                    format!("cannot ask CloudStack: {}", e.chain()),
                    DriftAction::RetryLater,
                    "none; retry when CloudStack answers",
                ));
                continue;
            }
            Some(Ok(None)) | None => {
                out.push(drift(
                    Some(id),
                    DriftKind::MissingInCloud,
                    "the database knows this volume but CloudStack does not".into(),
                    DriftAction::DeleteVolume,
                    "none; delete it through DELETE /api/v1/volumes/{id} to record the deletion",
                ));
                continue;
            }
        };
        match (&v.attachment, cv.vm_id.as_deref()) {
            (Some(a), None) => {
                out.push(drift(
                    Some(id),
                    DriftKind::AttachedOnlyInDatabase,
                    format!(
                        "the database records an attachment to VM {} that CloudStack does not have",
                        a.vm_id
                    ),
                    DriftAction::ForgetAttachment,
                    "remove the attachment (and its export) from the daemon",
                ));
            }
            (None, Some(vm)) => out.push(drift(
                Some(id),
                DriftKind::AttachedOnlyInCloud,
                format!(
                    "CloudStack has the volume attached to VM {vm}; the database has no attachment"
                ),
                DriftAction::DetachAndReattach,
                "none automatic; detach it (POST /api/v1/volumes/{id}/detach) and attach it again",
            )),
            (Some(a), Some(vm)) if a.vm_id != vm => out.push(drift(
                Some(id),
                DriftKind::AttachedElsewhere,
                format!("the database says VM {}, CloudStack says VM {vm}", a.vm_id),
                DriftAction::DetachAndReattach,
                "none automatic; detach it and attach it again",
            )),
            (Some(a), Some(_)) if a.target == AttachTarget::Appliance => {
                if let Some(problem) = match &v.device {
                    Some(DeviceCheck::Present) | None => None,
                    Some(DeviceCheck::Missing) => {
                        Some("no device has the volume's identity".to_string())
                    }
                    Some(DeviceCheck::Unverified(e)) => Some(crate::error_chain(e)),
                } {
                    out.push(drift(
                        Some(id),
                        DriftKind::DeviceProblem,
                        problem,
                        DriftAction::CheckDevice,
                        "none automatic; see docs/operations.md (device never appeared / size mismatch)",
                    ));
                    continue;
                }
                if v.export.as_ref().is_none_or(|e| e.live.is_none()) {
                    out.push(drift(
                        Some(id),
                        DriftKind::ExportMissing,
                        "attached to the appliance but its NBD export is not served".into(),
                        DriftAction::Reexport,
                        "re-verify the device and serve the export again",
                    ));
                }
            }
            _ => {}
        }
    }
    // Live exports without an appliance attachment.
    let attached: HashSet<Uuid> = views
        .iter()
        .filter(|v| {
            v.attachment
                .as_ref()
                .is_some_and(|a| a.target == AttachTarget::Appliance)
        })
        .map(|v| v.volume.id)
        .collect();
    for snap in engine.live_exports() {
        let Some(id) = volume_api::volume_of_export(&snap.name) else {
            continue;
        };
        if attached.contains(&id) || busy.contains(&id) {
            continue;
        }
        out.push(drift(
            Some(id),
            DriftKind::ExportWithoutAttachment,
            format!(
                "export {} is served but the volume is not attached to the appliance",
                snap.name
            ),
            DriftAction::RemoveOrphanExport,
            "remove the export",
        ));
    }
    if apply {
        apply_repairs(engine, &mut out).await?;
    }
    if appliance.is_none() {
        out.push(drift(
            None,
            DriftKind::ApplianceIdentityUnknown,
            "the appliance VM id is unknown, so appliance attachments cannot be checked against it"
                .into(),
            DriftAction::SetApplianceIdentity,
            "set appliance_vm_id or PUT /api/v1/appliance",
        ));
    }
    Ok(ReconcileReport {
        dry_run: !apply,
        checked_volumes,
        drift: out,
    })
}

/// Submits a `repair` operation for every drift that has one (all first, so repairs of different volumes run
/// side by side), then waits for each and records its id and whether it completed.
async fn apply_repairs(engine: &Engine, out: &mut [Drift]) -> Result<(), EngineError> {
    for d in out.iter_mut() {
        if let (Some(volume_id), Some(repair)) = (d.volume_id, d.action.repair()) {
            d.operation_id = Some(engine.submit_repair(volume_id, repair).await?);
        }
    }
    for d in out.iter_mut() {
        let Some(id) = d.operation_id else { continue };
        let op = engine.wait_repair(id).await?;
        d.applied = op.is_some_and(|o| o.status == OperationStatus::Completed);
        if !d.applied {
            tracing::warn!(op = %id, volume = ?d.volume_id, action = %d.action, "a repair did not complete; GET /api/v1/operations/{id} says why");
        }
    }
    Ok(())
}
