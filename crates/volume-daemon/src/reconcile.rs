//! The reconciler: compares the database, the cloud, the appliance's devices and the live NBD exports, reports
//! every disagreement and, when asked, repairs the ones that have one safe repair. Volumes with an unfinished
//! operation are left to that operation.

use std::collections::HashSet;

use uuid::Uuid;
use volume_api::{Drift, ReconcileReport};

use crate::engine::{Engine, EngineError, Repair};
use crate::store::{AttachTarget, AttachmentFilter};

fn drift(volume_id: Option<Uuid>, kind: &str, detail: String, action: &str) -> Drift {
    Drift {
        volume_id,
        kind: kind.into(),
        detail,
        action: action.into(),
        applied: false,
    }
}

/// Checks every known volume and live export; repairs when `apply`.
pub async fn run(engine: &Engine, apply: bool) -> Result<ReconcileReport, EngineError> {
    let store = engine.store();
    let busy: HashSet<Uuid> = store
        .unfinished_operations()
        .await?
        .iter()
        .filter_map(|o| o.volume_id)
        .collect();
    let volumes = store.list_volumes(false).await?;
    let appliance = engine.identity().current().await.vm_id;
    let mut out = Vec::new();
    for v in &volumes {
        if busy.contains(&v.id) {
            continue;
        }
        let att = store.get_attachment(v.id).await?;
        let cloud = match engine.cloud().get_volume(&v.id.to_string()).await {
            Ok(c) => c,
            Err(e) => {
                out.push(drift(
                    Some(v.id),
                    "cloud_unavailable",
                    format!("cannot ask CloudStack: {}", e.chain()),
                    "none; retry when CloudStack answers",
                ));
                continue;
            }
        };
        let Some(cv) = cloud else {
            out.push(drift(
                Some(v.id),
                "missing_in_cloud",
                "the database knows this volume but CloudStack does not".into(),
                "none; delete it through DELETE /api/v1/volumes/{id} to record the deletion",
            ));
            continue;
        };
        match (&att, cv.vm_id.as_deref()) {
            (Some(a), None) => {
                let mut d = drift(
                    Some(v.id),
                    "attached_only_in_database",
                    format!(
                        "the database records an attachment to VM {} that CloudStack does not have",
                        a.vm_id
                    ),
                    "remove the attachment (and its export) from the daemon",
                );
                if apply {
                    engine.repair(v.id, Repair::ForgetAttachment).await?;
                    d.applied = true;
                }
                out.push(d);
            }
            (None, Some(vm)) => out.push(drift(
                Some(v.id),
                "attached_only_in_cloud",
                format!(
                    "CloudStack has the volume attached to VM {vm}; the database has no attachment"
                ),
                "none automatic; detach it (POST /api/v1/volumes/{id}/detach) and attach it again",
            )),
            (Some(a), Some(vm)) if a.vm_id != vm => out.push(drift(
                Some(v.id),
                "attached_elsewhere",
                format!("the database says VM {}, CloudStack says VM {vm}", a.vm_id),
                "none automatic; detach it and attach it again",
            )),
            (Some(a), Some(_)) if a.target == AttachTarget::Appliance => {
                match engine.devices().resolve(v.id, v.size_bytes).await {
                    Ok(_) => {}
                    Err(e) => {
                        out.push(drift(
                            Some(v.id),
                            "device_problem",
                            crate::error_chain(&e),
                            "none automatic; see docs/operations.md (device never appeared / size mismatch)",
                        ));
                        continue;
                    }
                }
                let live = engine.exports().get(v.id);
                let rec = store.get_export(v.id).await?;
                let served = match (&live, &rec) {
                    (Some(l), Some(r)) => l.generation == r.generation,
                    _ => false,
                };
                if !served {
                    let mut d = drift(
                        Some(v.id),
                        "export_missing",
                        "attached to the appliance but its NBD export is not served".into(),
                        "re-verify the device and serve the export again",
                    );
                    if apply {
                        engine.repair(v.id, Repair::Reexport).await?;
                        d.applied = true;
                    }
                    out.push(d);
                }
            }
            _ => {}
        }
    }
    // Live exports without an appliance attachment.
    let attached: HashSet<Uuid> = store
        .list_attachments(&AttachmentFilter {
            vm_id: None,
            target: Some(AttachTarget::Appliance),
        })
        .await?
        .iter()
        .map(|a| a.volume_id)
        .collect();
    for snap in engine.exports().list() {
        let Some(id) = volume_api::volume_of_export(&snap.name) else {
            continue;
        };
        if attached.contains(&id) || busy.contains(&id) {
            continue;
        }
        let mut d = drift(
            Some(id),
            "export_without_attachment",
            format!(
                "export {} is served but the volume is not attached to the appliance",
                snap.name
            ),
            "remove the export",
        );
        if apply {
            engine.repair(id, Repair::RemoveOrphanExport).await?;
            d.applied = true;
        }
        out.push(d);
    }
    if appliance.is_none() {
        out.push(drift(
            None,
            "appliance_identity_unknown",
            "the appliance VM id is unknown, so appliance attachments cannot be checked against it"
                .into(),
            "set appliance_vm_id or PUT /api/v1/appliance",
        ));
    }
    Ok(ReconcileReport {
        dry_run: !apply,
        checked_volumes: volumes.len(),
        drift: out,
    })
}
