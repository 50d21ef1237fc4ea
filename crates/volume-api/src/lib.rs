//! Wire types of the volume-daemon REST API: requests, responses and errors, shared by the daemon and its clients.
//!
//! These types are the compatibility contract (see `docs/api.md`): field names and value spellings match what
//! callers of the predecessor service send and read. Runtime and persisted types live in the daemon and are
//! converted to these explicitly.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Path prefix of every versioned endpoint.
pub const API_PREFIX: &str = "/api/v1";
/// Header carrying a caller-chosen idempotency key on mutations.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
/// Prefix of every NBD export name the daemon creates; the rest is the volume UUID.
pub const EXPORT_NAME_PREFIX: &str = "migration-vol-";

/// The kind of a journaled operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationType {
    Create,
    Attach,
    Detach,
    Delete,
}

impl OperationType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Attach => "attach",
            Self::Detach => "detach",
            Self::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Self::Create),
            "attach" => Some(Self::Attach),
            "detach" => Some(Self::Detach),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// Where an operation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationStatus {
    Pending,
    Executing,
    Completed,
    Failed,
    Cancelled,
}

impl OperationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Executing => "executing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "executing" => Some(Self::Executing),
            "completed" => Some(Self::Completed),
            "failed" => Some(Self::Failed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// The last journaled step of an operation. Stored as text in the journal and shown as `step`; the
/// spellings never change, so a journal written by an earlier version resumes. Each operation kind uses
/// a subset (the daemon's journal module types them per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStep {
    /// Journaled, not yet started.
    Accepted,
    /// Started (a resumed operation keeps its last step instead).
    Started,
    /// `create`: createVolume is being sent (its job id is not known yet).
    CloudCreateSent,
    /// `create`: the createVolume job id is journaled.
    CloudCreateJob,
    /// `attach`: the attachVolume job id is journaled.
    CloudAttachJob,
    /// `attach`: the cloud reports the volume attached.
    CloudAttached,
    /// `attach` (appliance): the device was found by identity and verified.
    DeviceFound,
    /// `attach` (appliance): the stable name link exists.
    Named,
    /// `attach` (appliance): the NBD export is served.
    Exported,
    /// `attach`: a later step failed; the attach is being undone.
    Compensating,
    /// `attach`: the undoing detachVolume job id is journaled.
    CompensateDetachJob,
    /// `detach`/`delete`: the appliance's export and stable name are gone.
    ExportRemoved,
    /// `detach`/`delete`: the detachVolume job id is journaled.
    CloudDetachJob,
    /// `detach`/`delete`: the cloud reports the volume detached.
    CloudDetached,
    /// `delete`: deleteVolume is being sent.
    CloudDeleteSent,
}

impl OperationStep {
    pub const ALL: [OperationStep; 15] = [
        Self::Accepted,
        Self::Started,
        Self::CloudCreateSent,
        Self::CloudCreateJob,
        Self::CloudAttachJob,
        Self::CloudAttached,
        Self::DeviceFound,
        Self::Named,
        Self::Exported,
        Self::Compensating,
        Self::CompensateDetachJob,
        Self::ExportRemoved,
        Self::CloudDetachJob,
        Self::CloudDetached,
        Self::CloudDeleteSent,
    ];

    /// The stored (and wire) spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Started => "started",
            Self::CloudCreateSent => "cloud_create_sent",
            Self::CloudCreateJob => "cloud_create_job",
            Self::CloudAttachJob => "cloud_attach_job",
            Self::CloudAttached => "cloud_attached",
            Self::DeviceFound => "device_found",
            Self::Named => "named",
            Self::Exported => "exported",
            Self::Compensating => "compensating",
            Self::CompensateDetachJob => "compensate_detach_job",
            Self::ExportRemoved => "export_removed",
            Self::CloudDetachJob => "cloud_detach_job",
            Self::CloudDetached => "cloud_detached",
            Self::CloudDeleteSent => "cloud_delete_sent",
        }
    }

    /// Parses a stored step. Journals of earlier versions may carry a suffix after `compensating`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .or_else(|| s.starts_with("compensating").then_some(Self::Compensating))
    }
}

/// The role of a disk in the VM it is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    Data,
    /// Attached as CloudStack device id 0 (`attach-root`).
    Root,
}

impl DiskRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Root => "root",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "data" => Some(Self::Data),
            "root" => Some(Self::Root),
            _ => None,
        }
    }
}

/// The `request` of an `attach` operation, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachOperationRequest {
    pub volume_id: Uuid,
    pub vm_id: String,
    /// `0` for `attach-root`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<u32>,
    /// `root` for `attach-root`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_as: Option<DiskRole>,
}

impl AttachOperationRequest {
    /// Whether the volume is attached as the VM's root disk.
    pub fn is_root(&self) -> bool {
        self.attach_as == Some(DiskRole::Root)
    }
}

/// The `request` of a `detach` or `delete` operation, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeOperationRequest {
    pub volume_id: Uuid,
}

/// The `response` of a completed `create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVolumeResponse {
    pub volume_id: Uuid,
    /// Size in bytes as the cloud created it.
    pub size: u64,
    pub cloudstack_state: String,
    pub message: String,
}

/// The `response` of a completed `attach`. The local fields are present only for the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachVolumeResponse {
    pub volume_id: Uuid,
    pub vm_id: String,
    /// The by-id path on the appliance; null for other VMs.
    pub device_path: Option<String>,
    pub device_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_as: Option<DiskRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_device_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_appeared_ms: Option<u64>,
    pub message: String,
}

/// The `response` of a completed `detach`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetachVolumeResponse {
    pub volume_id: Uuid,
    /// The device path it had on the appliance; empty otherwise.
    pub device_path: String,
    /// The VM it was detached from; null when it was not attached.
    pub vm_id: Option<String>,
    pub message: String,
}

/// The `response` of a completed `delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteVolumeResponse {
    pub volume_id: Uuid,
    /// The VM it was detached from first, if it was attached.
    pub detached_from: Option<String>,
    pub message: String,
}

/// A journaled operation as the API shows it (`GET /operations/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub op_type: OperationType,
    pub status: OperationStatus,
    /// The volume the operation acts on; for `create`, set once the cloud has named the new volume.
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<String>,
    pub request: Value,
    pub response: Option<Value>,
    /// Human-readable failure, present when `status` is `failed`.
    pub error: Option<String>,
    /// Stable failure kind, present when `status` is `failed`.
    #[serde(default)]
    pub error_code: Option<String>,
    /// The last journaled step.
    #[serde(default)]
    pub step: String,
    /// The CloudStack job this operation waits for, once known.
    #[serde(default)]
    pub cloudstack_job_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// `POST /volumes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    pub name: String,
    /// Size in bytes, rounded up to whole GiB: required for a custom-size offering; for a fixed-size
    /// offering optional, and when given it must equal the offering's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub disk_offering_id: String,
    pub zone_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, Value>>,
}

/// `POST /volumes/{id}/attach` and `POST /volumes/{id}/attach-root`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    pub vm_id: String,
    /// Accepted for compatibility; when present it must equal the volume id in the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
}

/// `POST /exports`: (re)create the export of a volume attached to the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// `PUT /api/v1/appliance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetApplianceRequest {
    pub vm_id: String,
}

/// `GET|PUT /api/v1/appliance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Appliance {
    /// The appliance VM's CloudStack id, when known.
    pub vm_id: Option<String>,
    /// Where the identity came from: `config`, `database`, `detected`, `simulator`, or `unknown`.
    pub source: String,
    /// Whether the cloud confirmed the VM exists.
    pub verified: bool,
    pub vm_name: Option<String>,
    pub vm_state: Option<String>,
    /// Why the identity is not usable, when it is not.
    pub problem: Option<String>,
}

/// `POST /api/v1/reconcile`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Repair the drift found instead of only reporting it.
    #[serde(default)]
    pub apply: bool,
}

/// One difference between the database, the cloud, the devices and the exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub volume_id: Option<Uuid>,
    /// Stable kind, e.g. `export_missing`, `export_orphaned`, `attachment_missing_in_cloud`.
    pub kind: String,
    pub detail: String,
    /// What `apply` does (or did) about it; `none` when it needs an operator.
    pub action: String,
    pub applied: bool,
}

/// Answer of `POST /api/v1/reconcile`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub dry_run: bool,
    pub checked_volumes: usize,
    pub drift: Vec<Drift>,
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub vm_id: String,
    /// `appliance` or `remote`.
    pub target: String,
    /// `data` or `root`.
    pub role: String,
    pub device_id: Option<u32>,
    /// Local device path (by-id) when attached to the appliance.
    pub device_path: Option<String>,
    pub kernel_device: Option<String>,
    pub persistent_device_name: Option<String>,
    pub symlink_path: Option<String>,
}

/// `GET /volumes/{id}`: the volume's real status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub volume_id: Uuid,
    pub name: String,
    /// Size in bytes as recorded (the cloud's view when it answered).
    pub size: u64,
    pub disk_offering_id: String,
    pub zone_id: String,
    pub metadata: Value,
    /// `attached` or `detached` as the daemon recorded it; `deleted` after deletion.
    pub state: String,
    pub attachment: Option<AttachmentInfo>,
    /// Present only when the volume is exported on the appliance.
    pub export: Option<Export>,
    /// The cloud's answer (`state`, `virtualmachineid`, `deviceid`, `size`), or null when it could not be asked.
    pub cloudstack_data: Option<Value>,
    /// Why `cloudstack_data` is missing.
    pub cloudstack_error: Option<String>,
    /// The local device's state when attached to the appliance: `present`, `missing`, or a verification problem.
    pub linux_state: Option<String>,
    pub snapshot: SnapshotInfo,
    pub last_operation: Option<Operation>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Snapshot tracking kept on the volume record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub snapshot_id: Option<String>,
    pub snapshot_name: Option<String>,
    pub snapshot_status: Option<String>,
    pub vm_context_id: Option<String>,
    pub snapshot_created_at: Option<DateTime<Utc>>,
}

/// `GET /volumes/{id}/device` (compatible with the predecessor's device mapping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceMapping {
    pub volume_id: Uuid,
    pub volume_uuid: Uuid,
    pub vm_id: String,
    /// `oma` when attached to the appliance, `failover` when attached to another VM.
    pub operation_mode: String,
    pub cloudstack_device_id: Option<u32>,
    /// by-id path for the appliance; null for other VMs.
    pub device_path: Option<String>,
    pub persistent_device_name: Option<String>,
    pub symlink_path: Option<String>,
    pub kernel_device: Option<String>,
    pub size: u64,
    pub cloudstack_state: String,
    pub linux_state: String,
    pub disk_role: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One volume attached to a VM (`GET /vms/{vm_id}/volumes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmVolume {
    pub volume_id: Uuid,
    pub name: String,
    pub vm_id: String,
    pub device_path: Option<String>,
    pub device_id: Option<u32>,
    pub role: String,
    pub state: String,
    pub size: u64,
}

/// A zone of the cloud (`GET /cloud/zones`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudZone {
    pub id: String,
    pub name: String,
}

/// A disk offering of the cloud (`GET /cloud/offerings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudOffering {
    pub id: String,
    pub name: String,
    /// True when `POST /volumes` must give `size`; false for a fixed-size offering.
    pub custom: bool,
    /// The fixed size in bytes; `None` for a custom-size offering.
    pub size: Option<u64>,
    pub description: Option<String>,
}

/// A VM of the cloud (`GET /cloud/vms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudVm {
    pub id: String,
    pub name: String,
    /// CloudStack's state: `Running`, `Stopped`, …
    pub state: String,
    /// True for the daemon's own appliance VM.
    pub appliance: bool,
}

/// An NBD export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Export {
    pub export_name: String,
    pub volume_id: Uuid,
    pub device_path: String,
    pub port: u16,
    /// `active` when served, `missing` when recorded but not served.
    pub status: String,
    pub read_only: bool,
    pub generation: u64,
    pub size: u64,
    pub connections: u64,
    pub total_connections: u64,
    pub peers: Vec<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub highest_offset_written: Option<u64>,
    pub last_activity: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /exports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportList {
    pub exports: Vec<Export>,
    pub count: usize,
}

/// One component of `/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// `ok`, `degraded` or `failed`.
    pub status: String,
    pub detail: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `healthy`, `degraded` (serving, with a problem) or `unhealthy` (cannot serve; HTTP 503).
    pub status: String,
    pub ready: bool,
    pub service: String,
    pub version: String,
    pub timestamp: DateTime<Utc>,
    pub components: BTreeMap<String, ComponentHealth>,
}

/// Where the appliance identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplianceSource {
    Config,
    Simulator,
    Database,
    Detected,
    Unknown,
}

impl ApplianceSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Simulator => "simulator",
            Self::Database => "database",
            Self::Detected => "detected",
            Self::Unknown => "unknown",
        }
    }
}

/// Where a volume is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachTarget {
    /// The appliance the daemon runs on: a local device, a stable name and an NBD export.
    Appliance,
    /// Any other VM.
    Remote,
}

impl AttachTarget {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Appliance => "appliance",
            Self::Remote => "remote",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "appliance" => Some(Self::Appliance),
            "remote" => Some(Self::Remote),
            _ => None,
        }
    }
}

/// The predecessor's name for the attach target: `oma` for the appliance, `failover` for another VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationMode {
    Oma,
    Failover,
}

impl From<AttachTarget> for OperationMode {
    fn from(t: AttachTarget) -> Self {
        match t {
            AttachTarget::Appliance => Self::Oma,
            AttachTarget::Remote => Self::Failover,
        }
    }
}

/// A volume's state as the daemon recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Attached,
    Detached,
    Deleted,
}

/// The local device's state of an attached volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinuxState {
    /// Found by identity and verified.
    Present,
    /// No device with the volume's identity.
    Missing,
    /// A device was found but failed verification (`linux_problem` says why).
    Unverified,
    /// Attached to another VM: there is no local device.
    Remote,
}

/// Whether an export is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportStatus {
    /// Served by the NBD server under the recorded generation.
    Active,
    /// Recorded but not served (run `POST /reconcile` with `apply`, or `POST /exports`).
    Inactive,
}

/// The state of one `/health` component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentStatus {
    Ok,
    Failed,
}

/// The overall `/health` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Every component is ok (HTTP 200).
    Healthy,
    /// A component failed; the daemon cannot serve (HTTP 503).
    Unhealthy,
}

/// The kind of a difference the reconciler found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// CloudStack could not be asked about the volume.
    CloudUnavailable,
    /// The database knows the volume, CloudStack does not.
    MissingInCloud,
    /// The database records an attachment CloudStack does not have (repairable).
    AttachedOnlyInDatabase,
    /// CloudStack has an attachment the database does not.
    AttachedOnlyInCloud,
    /// The database and CloudStack name different VMs.
    AttachedElsewhere,
    /// The device of an appliance volume is missing or fails verification.
    DeviceProblem,
    /// Attached to the appliance but not served (repairable).
    ExportMissing,
    /// Served without an appliance attachment (repairable).
    ExportWithoutAttachment,
    /// The appliance identity is unknown.
    ApplianceIdentityUnknown,
}

/// The stable kind of a failure: the `code` of an error body and the `error_code` of a failed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a field is invalid (`field` names it).
    InvalidRequest,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// No such volume, operation, export or endpoint.
    NotFound,
    /// The request conflicts with the current state (e.g. attached elsewhere).
    Conflict,
    /// The daemon is starting up or shutting down.
    Unavailable,
    /// The database failed or is unreachable.
    DatabaseError,
    /// The appliance VM identity is unknown or unverified.
    ApplianceIdentityUnknown,
    /// The appliance identity is fixed by configuration.
    ApplianceIdentityFixed,
    /// The VM named as the appliance does not exist.
    NoSuchVm,
    CloudNotFound,
    CloudInvalidParameter,
    CloudInUse,
    CloudLimitExceeded,
    CloudUnauthorized,
    /// CloudStack cannot be reached or answers with a server error.
    CloudUnavailable,
    /// A CloudStack job failed.
    CloudJobFailed,
    /// A CloudStack job did not finish in time.
    CloudJobTimeout,
    CloudError,
    /// The volume's device did not appear on the appliance.
    DeviceNotFound,
    DeviceTimeout,
    /// The device found does not match the volume (serial or size).
    DeviceMismatch,
    DeviceNotBlockDevice,
    /// The daemon lacks permission on the device.
    DevicePermission,
    DeviceError,
    /// Opening or removing an NBD export failed.
    ExportFailed,
    /// A bug or an unexpected state; the message says what failed.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 26] = [
        Self::InvalidRequest,
        Self::Unauthorized,
        Self::NotFound,
        Self::Conflict,
        Self::Unavailable,
        Self::DatabaseError,
        Self::ApplianceIdentityUnknown,
        Self::ApplianceIdentityFixed,
        Self::NoSuchVm,
        Self::CloudNotFound,
        Self::CloudInvalidParameter,
        Self::CloudInUse,
        Self::CloudLimitExceeded,
        Self::CloudUnauthorized,
        Self::CloudUnavailable,
        Self::CloudJobFailed,
        Self::CloudJobTimeout,
        Self::CloudError,
        Self::DeviceNotFound,
        Self::DeviceTimeout,
        Self::DeviceMismatch,
        Self::DeviceNotBlockDevice,
        Self::DevicePermission,
        Self::DeviceError,
        Self::ExportFailed,
        Self::Internal,
    ];

    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::DatabaseError => "database_error",
            Self::ApplianceIdentityUnknown => "appliance_identity_unknown",
            Self::ApplianceIdentityFixed => "appliance_identity_fixed",
            Self::NoSuchVm => "no_such_vm",
            Self::CloudNotFound => "cloud_not_found",
            Self::CloudInvalidParameter => "cloud_invalid_parameter",
            Self::CloudInUse => "cloud_in_use",
            Self::CloudLimitExceeded => "cloud_limit_exceeded",
            Self::CloudUnauthorized => "cloud_unauthorized",
            Self::CloudUnavailable => "cloud_unavailable",
            Self::CloudJobFailed => "cloud_job_failed",
            Self::CloudJobTimeout => "cloud_job_timeout",
            Self::CloudError => "cloud_error",
            Self::DeviceNotFound => "device_not_found",
            Self::DeviceTimeout => "device_timeout",
            Self::DeviceMismatch => "device_mismatch",
            Self::DeviceNotBlockDevice => "device_not_block_device",
            Self::DevicePermission => "device_permission",
            Self::DeviceError => "device_error",
            Self::ExportFailed => "export_failed",
            Self::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every error body: `{"error": "...", "code": "..."}`, plus the offending field when one is at fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The export name of a volume: `migration-vol-<uuid>`.
pub fn export_name(volume_id: Uuid) -> String {
    format!("{EXPORT_NAME_PREFIX}{volume_id}")
}

/// The volume an export name of the daemon's scheme names, if it is one.
pub fn volume_of_export(name: &str) -> Option<Uuid> {
    name.strip_prefix(EXPORT_NAME_PREFIX)
        .and_then(|s| Uuid::parse_str(s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVolumeRequest>(
            r#"{"name":"a","size":1,"disk_offering_id":"d","zone_id":"z","bogus":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn operation_uses_contract_spellings() {
        let op = Operation {
            id: Uuid::nil(),
            op_type: OperationType::Attach,
            status: OperationStatus::Executing,
            volume_id: None,
            vm_id: Some("vm".into()),
            request: serde_json::json!({}),
            response: None,
            error: None,
            error_code: None,
            step: "cloud_attach".into(),
            cloudstack_job_id: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            completed_at: None,
        };
        let v = serde_json::to_value(&op).unwrap();
        assert_eq!(v["type"], "attach");
        assert_eq!(v["status"], "executing");
        assert!(v["volume_id"].is_null());
    }

    #[test]
    fn export_names_follow_the_scheme() {
        let id = Uuid::parse_str("60338035-92fb-4d27-98d4-b60ad4b38b87").unwrap();
        assert_eq!(
            export_name(id),
            "migration-vol-60338035-92fb-4d27-98d4-b60ad4b38b87"
        );
        assert_eq!(volume_of_export(&export_name(id)), Some(id));
        assert_eq!(
            volume_of_export("other-60338035-92fb-4d27-98d4-b60ad4b38b87"),
            None
        );
        assert_eq!(volume_of_export("migration-vol-x"), None);
    }
}
