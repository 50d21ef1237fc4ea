//! Operations on the wire: the mutation requests, the journaled operation with its typed request and response
//! per kind (`type` selects them), and the response of each kind.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::cloud_states::CloudVolumeState;
use crate::compat::{TestFailoverCleanupRequest, TestFailoverCleanupResponse};
use crate::enums::{
    DiskRole, ErrorCode, OperationStatus, OperationStep, OperationType, RepairKind,
};
use crate::snapshots::{SnapshotOperationRequest, SnapshotOperationResponse};

/// A journaled operation as the API shows it (`GET /operations/{id}`, and the 201 answer of every mutation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: Uuid,
    /// `type`, `request` and `response`.
    #[serde(flatten)]
    pub kind: OperationKind,
    pub status: OperationStatus,
    /// The volume the operation acts on; for `create`, set once the cloud has named the new volume.
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<String>,
    /// Human-readable failure, present when `status` is `failed`.
    pub error: Option<String>,
    /// Stable failure kind, present when `status` is `failed`.
    #[serde(default)]
    pub error_code: Option<ErrorCode>,
    /// The last journaled step.
    pub step: OperationStep,
    /// The CloudStack job this operation waits for, once known.
    #[serde(default)]
    pub cloudstack_job_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// The kind of an operation with its request and (once completed) its response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OperationKind {
    Create {
        request: CreateVolumeRequest,
        response: Option<CreateVolumeResponse>,
    },
    Attach {
        request: AttachOperationRequest,
        response: Option<AttachVolumeResponse>,
    },
    Detach {
        request: VolumeOperationRequest,
        response: Option<DetachVolumeResponse>,
    },
    Delete {
        request: VolumeOperationRequest,
        response: Option<DeleteVolumeResponse>,
    },
    /// A repair submitted by `POST /reconcile` with `apply`.
    Repair {
        request: RepairRequest,
        response: Option<RepairResponse>,
    },
    #[serde(rename = "snapshot_create")]
    SnapshotCreate {
        request: SnapshotOperationRequest,
        response: Option<SnapshotOperationResponse>,
    },
    #[serde(rename = "snapshot_revert")]
    SnapshotRevert {
        request: SnapshotOperationRequest,
        response: Option<SnapshotOperationResponse>,
    },
    #[serde(rename = "snapshot_delete")]
    SnapshotDelete {
        request: SnapshotOperationRequest,
        response: Option<SnapshotOperationResponse>,
    },
    /// `POST /cleanup/test-failover`.
    #[serde(rename = "test_failover_cleanup")]
    TestFailoverCleanup {
        request: TestFailoverCleanupRequest,
        response: Option<TestFailoverCleanupResponse>,
    },
}

impl OperationKind {
    pub fn op_type(&self) -> OperationType {
        match self {
            Self::Create { .. } => OperationType::Create,
            Self::Attach { .. } => OperationType::Attach,
            Self::Detach { .. } => OperationType::Detach,
            Self::Delete { .. } => OperationType::Delete,
            Self::Repair { .. } => OperationType::Repair,
            Self::SnapshotCreate { .. } => OperationType::SnapshotCreate,
            Self::SnapshotRevert { .. } => OperationType::SnapshotRevert,
            Self::SnapshotDelete { .. } => OperationType::SnapshotDelete,
            Self::TestFailoverCleanup { .. } => OperationType::TestFailoverCleanup,
        }
    }
}

impl Operation {
    pub fn op_type(&self) -> OperationType {
        self.kind.op_type()
    }

    /// The volume the completed operation produced or acted on, as its response names it.
    pub fn response_volume_id(&self) -> Option<Uuid> {
        match &self.kind {
            OperationKind::Create { response, .. } => response.as_ref().map(|r| r.volume_id),
            OperationKind::Attach { response, .. } => response.as_ref().map(|r| r.volume_id),
            OperationKind::Detach { response, .. } => response.as_ref().map(|r| r.volume_id),
            OperationKind::Delete { response, .. } => response.as_ref().map(|r| r.volume_id),
            OperationKind::Repair { response, .. } => response.as_ref().map(|r| r.volume_id),
            OperationKind::SnapshotCreate { response, .. }
            | OperationKind::SnapshotRevert { response, .. }
            | OperationKind::SnapshotDelete { response, .. } => {
                response.as_ref().map(|r| r.volume_id)
            }
            OperationKind::TestFailoverCleanup { response, .. } => {
                response.as_ref().map(|r| r.volume_id)
            }
        }
    }

    /// The device path a completed attach (or detach) reports, when it has one.
    pub fn response_device_path(&self) -> Option<&str> {
        match &self.kind {
            OperationKind::Attach {
                response: Some(r), ..
            } => r.device_path.as_deref(),
            OperationKind::Detach {
                response: Some(r), ..
            } => Some(r.device_path.as_str()).filter(|p| !p.is_empty()),
            OperationKind::TestFailoverCleanup {
                response: Some(r), ..
            } => Some(r.device_path.as_str()).filter(|p| !p.is_empty()),
            _ => None,
        }
    }

    /// The export a completed appliance attach (or test-failover clean-up) opened.
    pub fn response_export_name(&self) -> Option<&str> {
        match &self.kind {
            OperationKind::Attach {
                response: Some(r), ..
            } => r.export_name.as_deref(),
            OperationKind::TestFailoverCleanup {
                response: Some(r), ..
            } => Some(r.export_name.as_str()),
            _ => None,
        }
    }
}

/// `POST /volumes`; also the `request` of a `create` operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolumeRequest {
    pub vm_id: String,
    /// Accepted for compatibility; when present it must equal the volume id in the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// Appliance only: the NBD client identities (names in verified client certificates) that may list and
    /// open the export; absent takes the daemon's `nbd_default_clients`. See [`check_nbd_clients`](crate::check_nbd_clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_clients: Option<Vec<String>>,
}

/// The `request` of an `attach` operation, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AttachOperationRequest {
    pub volume_id: Uuid,
    pub vm_id: String,
    /// `0` for `attach-root`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<u32>,
    /// `root` for `attach-root`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_as: Option<DiskRole>,
    /// The NBD client identities asked for; absent when the daemon's default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_clients: Option<Vec<String>>,
}

impl AttachOperationRequest {
    /// Whether the volume is attached as the VM's root disk.
    pub fn is_root(&self) -> bool {
        self.attach_as == Some(DiskRole::Root)
    }
}

/// The `request` of a `detach` or `delete` operation, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeOperationRequest {
    pub volume_id: Uuid,
}

/// The `response` of a completed `create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateVolumeResponse {
    pub volume_id: Uuid,
    /// Size in bytes as the cloud created it.
    pub size: u64,
    /// CloudStack's state of the new volume (its own spelling, e.g. `Ready`, `Allocated`).
    pub cloudstack_state: CloudVolumeState,
    pub message: String,
}

/// The `response` of a completed `attach`. The local fields are present only for the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DetachVolumeResponse {
    pub volume_id: Uuid,
    /// The device path it had on the appliance; empty otherwise.
    pub device_path: String,
    /// The VM it was detached from; null when it was not attached.
    pub vm_id: Option<String>,
    pub message: String,
}

/// The `response` of a completed `delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeleteVolumeResponse {
    pub volume_id: Uuid,
    /// The VM it was detached from first, if it was attached.
    pub detached_from: Option<String>,
    pub message: String,
}

/// The `request` of a `repair` operation, as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RepairRequest {
    pub volume_id: Uuid,
    pub repair: RepairKind,
}

/// The `response` of a completed `repair`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RepairResponse {
    pub volume_id: Uuid,
    pub repair: RepairKind,
    /// The export generation now served, after a `reexport`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_generation: Option<u64>,
    pub message: String,
}
