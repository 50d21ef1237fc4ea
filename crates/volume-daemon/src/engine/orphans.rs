//! Export audit for the predecessor's clean-up routes: which exports are orphaned (recorded or served for a
//! volume that is not attached to the appliance), how the records compare with what the NBD server serves, and
//! the clean-up, which removes only orphans, each as a `repair` operation (`remove_orphan_export`) through the
//! one teardown.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use chrono::{DateTime, Utc};
use uuid::Uuid;
use volume_api::{ExportCleanupResult, ExportStatus, ExportValidation, OrphanedExport, RepairKind};

use super::{Engine, EngineError};
use crate::store::{AttachTarget, AttachmentFilter, AttachmentRecord, ExportRecord};

/// Every export the daemon records or serves, by volume, with its attachment.
struct Audit {
    records: HashMap<Uuid, ExportRecord>,
    /// Volume → generation served now.
    served: HashMap<Uuid, u64>,
    /// Served exports whose name is not of the daemon's scheme.
    foreign: Vec<String>,
    attachments: HashMap<Uuid, AttachmentRecord>,
    busy: HashSet<Uuid>,
}

impl Audit {
    fn volumes(&self) -> Vec<Uuid> {
        let mut all: Vec<Uuid> = self
            .records
            .keys()
            .chain(self.served.keys())
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        all.sort();
        all
    }

    fn on_appliance(&self, id: Uuid) -> bool {
        self.attachments
            .get(&id)
            .is_some_and(|a| a.target == AttachTarget::Appliance)
    }

    /// Differences between records, attachments and the NBD server; an orphan is one of them.
    fn inconsistencies(&self) -> Vec<String> {
        let mut out = Vec::new();
        for id in self.volumes() {
            let name = volume_api::export_name(id);
            match (self.records.get(&id), self.served.get(&id)) {
                (Some(_), None) => out.push(format!(
                    "export {name} is recorded but not served (POST /api/v1/exports serves it again)"
                )),
                (None, Some(_)) => out.push(format!("export {name} is served but not recorded")),
                (Some(r), Some(g)) if r.generation != *g => out.push(format!(
                    "export {name} is served under generation {g}, recorded as {}",
                    r.generation
                )),
                _ => {}
            }
            if !self.on_appliance(id) && !self.busy.contains(&id) {
                out.push(format!(
                    "export {name} belongs to volume {id}, which is not attached to the appliance"
                ));
            }
        }
        let mut attached: Vec<&AttachmentRecord> = self
            .attachments
            .values()
            .filter(|a| a.target == AttachTarget::Appliance)
            .filter(|a| {
                !self.records.contains_key(&a.volume_id) && !self.busy.contains(&a.volume_id)
            })
            .collect();
        attached.sort_by_key(|a| a.volume_id);
        for a in attached {
            out.push(format!(
                "volume {} is attached to the appliance without an export record \
                 (POST /api/v1/reconcile with apply serves it again)",
                a.volume_id
            ));
        }
        out.extend(
            self.foreign.iter().map(|n| {
                format!("export {n} is served but its name is not of the daemon's scheme")
            }),
        );
        out
    }
}

impl Engine {
    async fn audit(&self) -> Result<Audit, EngineError> {
        let store = &self.inner.store;
        let records = store
            .list_exports()
            .await?
            .into_iter()
            .map(|r| (r.volume_id, r))
            .collect();
        let mut served = HashMap::new();
        let mut foreign = Vec::new();
        for snap in self.inner.exports.list() {
            match volume_api::volume_of_export(&snap.name) {
                Some(id) => {
                    served.insert(id, snap.generation);
                }
                None => foreign.push(snap.name),
            }
        }
        let attachments = store
            .list_attachments(&AttachmentFilter::default())
            .await?
            .into_iter()
            .map(|a| (a.volume_id, a))
            .collect();
        // Read last: an operation that ended after the reads above is not taken for an orphan's cause.
        let busy = self.busy_volumes().await?;
        Ok(Audit {
            records,
            served,
            foreign,
            attachments,
            busy,
        })
    }

    /// The exports recorded or served for volumes not attached to the appliance (volumes with an unfinished
    /// operation are left to it), oldest record first.
    async fn orphans(&self, audit: &Audit) -> Result<Vec<OrphanedExport>, EngineError> {
        let mut out = Vec::new();
        for id in audit.volumes() {
            if audit.on_appliance(id) || audit.busy.contains(&id) {
                continue;
            }
            let record = audit.records.get(&id);
            let attachment = audit.attachments.get(&id);
            let volume_exists = self
                .inner
                .store
                .get_volume(id)
                .await?
                .is_some_and(|v| v.deleted_at.is_none());
            let orphan_reason = match (record.is_some(), attachment) {
                (_, Some(a)) => format!(
                    "the volume is attached to VM {}, not to the appliance",
                    a.vm_id
                ),
                (true, None) => "recorded, but the volume is not attached to the appliance".into(),
                (false, None) => {
                    "served, but neither recorded nor attached to the appliance".into()
                }
            };
            out.push(OrphanedExport {
                volume_id: id,
                export_name: volume_api::export_name(id),
                device_path: record.map(|r| r.device_path.clone()),
                device_mapping_uuid: attachment.map(|a| a.volume_id),
                status: if audit.served.contains_key(&id) {
                    ExportStatus::Active
                } else {
                    ExportStatus::Inactive
                },
                created_at: record.map(|r| r.created_at),
                orphan_reason,
                device_mapping_exists: attachment.is_some(),
                volume_exists,
                device_exists: record.is_some_and(|r| Path::new(&r.device_path).exists()),
                operation_id: None,
                cleaned: false,
            });
        }
        out.sort_by_key(|o| (o.created_at, o.volume_id));
        Ok(out)
    }

    /// `GET /exports/orphaned/count`.
    pub(crate) async fn orphaned_export_count(&self) -> Result<usize, EngineError> {
        let audit = self.audit().await?;
        Ok(self.orphans(&audit).await?.len())
    }

    /// `POST /exports/validate`: compares; changes nothing.
    pub(crate) async fn validate_exports(&self) -> Result<ExportValidation, EngineError> {
        let audit = self.audit().await?;
        let inconsistencies = audit.inconsistencies();
        let valid = inconsistencies.is_empty();
        Ok(ExportValidation {
            message: if valid {
                "NBD exports validation completed successfully: records and served exports agree"
                    .into()
            } else {
                format!(
                    "NBD exports validation completed: {} inconsistencies; POST /api/v1/exports/cleanup \
                     removes orphaned exports, POST /api/v1/reconcile repairs the rest",
                    inconsistencies.len()
                )
            },
            valid,
            recorded_exports: audit.records.len(),
            served_exports: audit.served.len() + audit.foreign.len(),
            inconsistencies,
        })
    }

    /// `POST /exports/cleanup` (and `/age` with `recorded_before`): the orphans, and unless `dry_run` each
    /// removed by a `repair` operation, which re-checks in the volume's turn that it is still an orphan.
    /// With `recorded_before`, only orphans recorded before it (an orphan served without a record has no
    /// age and is left).
    pub(crate) async fn cleanup_exports(
        &self,
        dry_run: bool,
        recorded_before: Option<DateTime<Utc>>,
    ) -> Result<ExportCleanupResult, EngineError> {
        let started = Instant::now();
        let audit = self.audit().await?;
        let mut orphans = self.orphans(&audit).await?;
        if let Some(cutoff) = recorded_before {
            orphans.retain(|o| o.created_at.is_some_and(|t| t < cutoff));
        }
        let mut cleanup_errors = Vec::new();
        if !dry_run {
            for o in orphans.iter_mut() {
                o.operation_id = Some(
                    self.submit_repair(o.volume_id, RepairKind::RemoveOrphanExport)
                        .await?,
                );
            }
            for o in orphans.iter_mut() {
                let Some(id) = o.operation_id else { continue };
                match self.wait_repair(id).await? {
                    Some(op) if op.status == crate::store::OpStatus::Completed => o.cleaned = true,
                    Some(op) => cleanup_errors.push(format!(
                        "export {} not removed (operation {id}): {}",
                        o.export_name,
                        op.error
                            .map(|e| e.message)
                            .unwrap_or_else(|| "did not finish in time".into())
                    )),
                    None => cleanup_errors.push(format!(
                        "export {}: operation {id} vanished from the journal",
                        o.export_name
                    )),
                }
            }
        }
        let cleaned = orphans.iter().filter(|o| o.cleaned).count();
        Ok(ExportCleanupResult {
            dry_run,
            total_exports: audit.volumes().len() + audit.foreign.len(),
            orphaned_exports: orphans.len(),
            cleaned_exports: cleaned,
            failed_cleanups: if dry_run { 0 } else { orphans.len() - cleaned },
            database_inconsistencies: audit.inconsistencies(),
            orphaned_export_details: orphans,
            cleanup_errors,
            config_files_validated: true,
            operation_time: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        })
    }
}
