//! Volumes, devices, exports, the appliance identity, reconciliation, health and errors on the wire.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::cloud_states::{CloudVmState, CloudVolumeState};
use crate::enums::{
    ApplianceSource, AttachTarget, ComponentStatus, DiskRole, DriftAction, DriftKind, ErrorCode,
    ExportStatus, HealthComponent, HealthStatus, LinuxState, OperationMode, VolumeState,
};
use crate::operations::Operation;

/// `POST /exports`: (re)create the export of a volume attached to the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExportRequest {
    pub volume_id: String,
    /// Accepted for compatibility and echoed in the export's metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_number: Option<u32>,
    /// Accepted for compatibility; when present it must name the volume's verified device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, Value>>,
}

/// `DELETE /exports/{volume_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExportRemoved {
    pub message: String,
    pub volume_id: Uuid,
    /// False when there was no export to remove.
    pub removed: bool,
}

/// `PUT /api/v1/appliance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetApplianceRequest {
    pub vm_id: String,
}

/// `GET|PUT /api/v1/appliance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Appliance {
    /// The appliance VM's CloudStack id, when known.
    pub vm_id: Option<String>,
    pub source: ApplianceSource,
    /// Whether the cloud confirmed the VM exists.
    pub verified: bool,
    pub vm_name: Option<String>,
    /// CloudStack's state of the VM (its own spelling, e.g. `Running`).
    pub vm_state: Option<CloudVmState>,
    /// Why the identity is not usable, when it is not.
    pub problem: Option<String>,
}

/// `POST /api/v1/reconcile`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Repair the drift found instead of only reporting it.
    #[serde(default)]
    pub apply: bool,
}

/// One difference between the database, the cloud, the devices and the exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Drift {
    pub volume_id: Option<Uuid>,
    pub kind: DriftKind,
    pub detail: String,
    /// What `apply` does (or did) about it, or what an operator should do.
    pub action: DriftAction,
    /// The action in words, with the call to make when it needs an operator.
    pub hint: String,
    /// The `repair` operation that `apply` submitted for it.
    #[serde(default)]
    pub operation_id: Option<Uuid>,
    /// Whether that operation completed.
    pub applied: bool,
}

/// Answer of `POST /api/v1/reconcile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReconcileReport {
    pub dry_run: bool,
    pub checked_volumes: usize,
    pub drift: Vec<Drift>,
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttachmentInfo {
    pub vm_id: String,
    pub target: AttachTarget,
    pub role: DiskRole,
    pub device_id: Option<u32>,
    /// Local device path (by-id) when attached to the appliance.
    pub device_path: Option<String>,
    pub kernel_device: Option<String>,
    pub persistent_device_name: Option<String>,
    pub symlink_path: Option<String>,
    /// Appliance only: the NBD client identities that may open the export; empty admits every client that
    /// passes the server's TLS policy.
    #[serde(default)]
    pub nbd_clients: Vec<String>,
}

/// `GET /volumes/{id}`: the volume's real status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeStatus {
    pub volume_id: Uuid,
    pub name: String,
    /// Size in bytes as recorded (the cloud's view when it answered).
    pub size: u64,
    pub disk_offering_id: String,
    pub zone_id: String,
    pub metadata: Value,
    pub state: VolumeState,
    pub attachment: Option<AttachmentInfo>,
    /// Present only when the volume is exported on the appliance.
    pub export: Option<Export>,
    /// The cloud's answer (`state`, `virtualmachineid`, `deviceid`, `size`, `type`), or null when it could not
    /// be asked.
    pub cloudstack_data: Option<CloudVolumeData>,
    /// Why `cloudstack_data` is missing.
    pub cloudstack_error: Option<String>,
    /// The local device's state when attached to the appliance.
    pub linux_state: Option<LinuxState>,
    /// Why the device is `unverified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux_problem: Option<String>,
    pub snapshot: SnapshotInfo,
    pub last_operation: Option<Operation>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The cloud's view of a volume, in CloudStack's own field names and spellings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudVolumeData {
    pub state: CloudVolumeState,
    pub virtualmachineid: Option<String>,
    pub deviceid: Option<u32>,
    pub size: u64,
    #[serde(rename = "type")]
    pub volume_type: Option<String>,
}

/// A zone of the cloud (`GET /cloud/zones`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudZone {
    pub id: String,
    pub name: String,
}

/// A disk offering of the cloud (`GET /cloud/offerings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudOffering {
    pub id: String,
    pub name: String,
    /// True when `POST /volumes` must give `size`; false for a fixed-size offering.
    pub custom: bool,
    /// The fixed size in bytes; null for a custom-size offering.
    pub size: Option<u64>,
    pub description: Option<String>,
}

/// A VM of the cloud (`GET /cloud/vms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudVm {
    pub id: String,
    pub name: String,
    /// CloudStack's state: `Running`, `Stopped`, …
    pub state: CloudVmState,
    /// True for the daemon's own appliance VM.
    pub appliance: bool,
}

/// Snapshot tracking kept on the volume record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub snapshot_id: Option<String>,
    pub snapshot_name: Option<String>,
    pub snapshot_status: Option<String>,
    pub vm_context_id: Option<String>,
    pub snapshot_created_at: Option<DateTime<Utc>>,
}

/// `GET /volumes/{id}/device` (compatible with the predecessor's device mapping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceMapping {
    pub volume_id: Uuid,
    pub volume_uuid: Uuid,
    pub vm_id: String,
    pub operation_mode: OperationMode,
    pub cloudstack_device_id: Option<u32>,
    /// by-id path for the appliance; null for other VMs.
    pub device_path: Option<String>,
    pub persistent_device_name: Option<String>,
    pub symlink_path: Option<String>,
    pub kernel_device: Option<String>,
    pub size: u64,
    /// CloudStack's state of the volume now, else as last recorded (its own spelling); `Other` text when it
    /// was never recorded.
    pub cloudstack_state: CloudVolumeState,
    pub linux_state: LinuxState,
    /// Why the device is `unverified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux_problem: Option<String>,
    pub disk_role: DiskRole,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One volume attached to a VM (`GET /vms/{vm_id}/volumes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmVolume {
    pub volume_id: Uuid,
    pub name: String,
    pub vm_id: String,
    pub device_path: Option<String>,
    pub device_id: Option<u32>,
    pub role: DiskRole,
    pub state: VolumeState,
    pub size: u64,
}

/// An NBD export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Export {
    pub export_name: String,
    pub volume_id: Uuid,
    pub device_path: String,
    pub port: u16,
    pub status: ExportStatus,
    pub read_only: bool,
    pub generation: u64,
    pub size: u64,
    pub connections: u64,
    pub total_connections: u64,
    pub peers: Vec<String>,
    /// The client identities the served export admits (names in verified client certificates); empty admits
    /// every client that passes the server's TLS policy.
    #[serde(default)]
    pub nbd_clients: Vec<String>,
    /// The verified identity of each open session that has one.
    #[serde(default)]
    pub client_identities: Vec<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub highest_offset_written: Option<u64>,
    pub last_activity: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /exports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExportList {
    pub exports: Vec<Export>,
    pub count: usize,
}

/// One component of `/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComponentHealth {
    pub status: ComponentStatus,
    pub detail: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `healthy` (HTTP 200) or `unhealthy` (HTTP 503).
    pub status: HealthStatus,
    pub ready: bool,
    pub service: String,
    pub version: String,
    pub timestamp: DateTime<Utc>,
    /// By name, each a [`HealthComponent`]; the document lists them all (a newer daemon may add one).
    #[schema(schema_with = health_components)]
    pub components: BTreeMap<String, ComponentHealth>,
    /// The predecessor's summary of component `cloudstack`: `healthy`, `degraded` or `unhealthy` (the status
    /// only, never an error's text).
    #[serde(default)]
    pub cloudstack_health: String,
    /// The predecessor's summary of component `database`, as `cloudstack_health`.
    #[serde(default)]
    pub database_health: String,
    /// The predecessor's summary of component `privileges` (device access), as `cloudstack_health`.
    #[serde(default)]
    pub device_monitor: String,
    /// Fixed facts the predecessor's deployment scripts read; never an error's text, so open without the
    /// token.
    #[serde(default)]
    pub details: HealthDetails,
}

/// The schema of `components` of `GET /health`: one optional property per [`HealthComponent`], so the document
/// names every component the daemon can report.
fn health_components() -> utoipa::openapi::Object {
    use utoipa::openapi::{ObjectBuilder, Ref};
    let mut o = ObjectBuilder::new().description(Some(
        "By component name: database, cloudstack, appliance_identity and journal in every answer; \
         privileges, lease, nbd and exports once start-up has set them; drift after the first scheduled \
         reconcile; hub with the hub_database_url setting; hub_import with the hub_import_on_start setting",
    ));
    for c in HealthComponent::ALL {
        o = o.property(c.as_str(), Ref::from_schema_name("ComponentHealth"));
    }
    o.additional_properties(Some(Ref::from_schema_name("ComponentHealth")))
        .build()
}

/// `details` of `GET /health`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthDetails {
    /// `complete`: the predecessor's upgrade script takes any value but its first release's
    /// `phase_1_foundation` as the sign that the upgraded service runs.
    pub implementation_status: String,
    pub service: String,
    pub version: String,
}

/// `details.implementation_status` of `GET /health`.
pub const IMPLEMENTATION_STATUS: &str = "complete";

/// Every error body: `{"error": "...", "code": "..."}`, plus the offending field when one is at fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
