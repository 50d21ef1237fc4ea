//! The predecessor's remaining routes on the wire: export validation and orphan clean-up, the orphan count and
//! `admin/force-sync`, in the predecessor's field names.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::enums::ExportStatus;
use crate::resources::ReconcileReport;

/// `POST /cleanup/test-failover`; also the `request` of a `test_failover_cleanup` operation. The predecessor's
/// field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverCleanupRequest {
    /// The test VM the volume is attached to (recorded by the daemon, or in CloudStack).
    pub test_vm_id: String,
    pub volume_id: Uuid,
    /// Must be the appliance the daemon runs on (`GET /appliance`).
    pub oma_vm_id: String,
    /// Destroy the test VM (expunged) once the volume is detached from it.
    #[serde(default)]
    pub delete_vm: bool,
    /// Detach without making sure the test VM is stopped first.
    #[serde(default)]
    pub force_clean: bool,
}

/// The `response` of a completed `test_failover_cleanup`: the predecessor's keys, then where the volume is
/// served now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TestFailoverCleanupResponse {
    pub test_vm_id: String,
    pub volume_id: Uuid,
    pub oma_vm_id: String,
    /// The by-id path on the appliance.
    pub device_path: String,
    /// Whether the test VM was destroyed (by this operation, or found gone when `delete_vm` was asked).
    pub vm_deleted: bool,
    pub message: String,
    /// The kernel device on the appliance (`/dev/vdX`).
    pub kernel_device: Option<String>,
    /// The stable name's path.
    pub symlink_path: Option<String>,
    pub persistent_device_name: Option<String>,
    pub export_name: String,
    pub nbd_port: u16,
    pub export_generation: u64,
}

/// `POST /exports/cleanup`: a dry run unless `dry_run` is `false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportCleanupRequest {
    /// Only report (the default); `false` removes the orphaned exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// `POST /exports/cleanup/age`: only orphans recorded at least `max_age_hours` ago; a dry run unless `dry_run`
/// is `false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportAgeCleanupRequest {
    pub max_age_hours: u32,
    /// Only report (the default, unlike the predecessor); `false` removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// An export served or recorded for a volume that is not attached to the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrphanedExport {
    pub volume_id: Uuid,
    pub export_name: String,
    /// The recorded device path; null when the export is served without a record.
    pub device_path: Option<String>,
    /// The volume of the attachment (the predecessor's mapping key); null: no attachment.
    pub device_mapping_uuid: Option<Uuid>,
    pub status: ExportStatus,
    /// When the export was recorded; null when it is served without a record.
    pub created_at: Option<DateTime<Utc>>,
    pub orphan_reason: String,
    pub device_mapping_exists: bool,
    /// Whether the daemon knows the volume (not deleted).
    pub volume_exists: bool,
    /// Whether the recorded device path exists on the appliance.
    pub device_exists: bool,
    /// The `repair` operation (`remove_orphan_export`) that removed it, when not a dry run.
    pub operation_id: Option<Uuid>,
    /// Whether that operation completed.
    pub cleaned: bool,
}

/// Answer of `POST /exports/cleanup` and `POST /exports/cleanup/age`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExportCleanupResult {
    pub dry_run: bool,
    /// Exports recorded or served.
    pub total_exports: usize,
    pub orphaned_exports: usize,
    pub cleaned_exports: usize,
    pub failed_cleanups: usize,
    pub orphaned_export_details: Vec<OrphanedExport>,
    pub cleanup_errors: Vec<String>,
    /// True: records and the NBD server were compared (`database_inconsistencies` lists the differences).
    pub config_files_validated: bool,
    pub database_inconsistencies: Vec<String>,
    /// Nanoseconds the analysis (and clean-up) took.
    pub operation_time: u64,
}

/// Answer of `GET /exports/orphaned/count`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrphanedExportCount {
    pub orphaned_exports_count: usize,
    pub timestamp: DateTime<Utc>,
}

/// Answer of `POST /exports/validate`: records compared with what the NBD server serves; nothing is changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExportValidation {
    pub message: String,
    /// True when records, attachments and served exports agree.
    pub valid: bool,
    pub recorded_exports: usize,
    pub served_exports: usize,
    pub inconsistencies: Vec<String>,
}

/// Answer of `POST /admin/force-sync`: a reconcile with `apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ForceSyncResult {
    pub message: String,
    pub timestamp: DateTime<Utc>,
    pub report: ReconcileReport,
}
