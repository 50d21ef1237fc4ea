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
    /// Size in bytes; rounded up to whole GiB.
    pub size: u64,
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
    }
}
