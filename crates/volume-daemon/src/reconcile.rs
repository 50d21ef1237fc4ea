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

/// Checks every known volume, live export and volume CloudStack has attached to the appliance; with `apply`
/// repairs what has one safe repair and adopts unmanaged appliance volumes.
pub async fn run(engine: &Engine, apply: bool) -> Result<ReconcileReport, EngineError> {
    run_with(engine, apply, apply).await
}

/// The scheduled reconcile: like [`run`], but it never adopts (a person decides that).
pub async fn run_scheduled(engine: &Engine, repair: bool) -> Result<ReconcileReport, EngineError> {
    run_with(engine, repair, false).await
}

/// Whether CloudStack reports the volume as a VM's root disk.
fn is_root_disk(cv: &crate::cloud::CloudVolume) -> bool {
    cv.device_id == Some(0) || cv.volume_type.as_deref() == Some("ROOT")
}

fn unmanaged_on_appliance(id: Uuid, cv: &crate::cloud::CloudVolume) -> Drift {
    drift(
        Some(id),
        DriftKind::UnknownApplianceVolume,
        format!(
            "CloudStack has volume {:?} attached to the appliance (device id {}); the daemon does not manage it",
            cv.name,
            cv.device_id.map_or("unknown".to_string(), |d| d.to_string())
        ),
        DriftAction::Adopt,
        "adopt it (volumectl adopt ID, POST /api/v1/volumes/{id}/adopt, or reconcile with apply): its device is \
         verified like any attach, then named and served",
    )
}

async fn run_with(
    engine: &Engine,
    apply: bool,
    adopt: bool,
) -> Result<ReconcileReport, EngineError> {
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
            (None, Some(vm)) if Some(vm) == appliance.as_deref() && !is_root_disk(cv) => {
                out.push(unmanaged_on_appliance(id, cv));
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
    // Volumes attached to the appliance that the daemon does not know at all (e.g. attached before an upgrade).
    if let Some(app) = appliance.as_deref() {
        let known: HashSet<Uuid> = views.iter().map(|v| v.volume.id).collect();
        match engine.cloud_volumes_of(app).await {
            Ok(volumes) => {
                for cv in volumes.iter().filter(|cv| !is_root_disk(cv)) {
                    let Ok(id) = Uuid::parse_str(&cv.id) else {
                        continue;
                    };
                    if known.contains(&id) || busy.contains(&id) {
                        continue;
                    }
                    out.push(unmanaged_on_appliance(id, cv));
                }
            }
            Err(e) => out.push(drift(
                None,
                DriftKind::CloudUnavailable,
                format!(
                    "cannot list the volumes CloudStack has attached to the appliance: {}",
                    e.chain()
                ),
                DriftAction::RetryLater,
                "none; retry when CloudStack answers",
            )),
        }
    }
    if apply {
        apply_repairs(engine, &mut out, adopt).await?;
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
async fn apply_repairs(engine: &Engine, out: &mut [Drift], adopt: bool) -> Result<(), EngineError> {
    for d in out.iter_mut() {
        if d.action == DriftAction::Adopt && !adopt {
            continue;
        }
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
