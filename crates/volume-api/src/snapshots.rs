//! Volume snapshots on the wire: the daemon's snapshot operations (create, revert, delete; journaled), the
//! cloud's snapshots of a volume, and the predecessor's `/snapshots/*` bookkeeping routes in its field names.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::enums::OperationMode;

/// `POST /volumes/{id}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The snapshot's name in CloudStack; CloudStack names it when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The migration context the snapshot belongs to (the predecessor's `vm_context_id`), kept on the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_context_id: Option<String>,
}

/// The request a `snapshot_create`, `snapshot_revert` or `snapshot_delete` operation journals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotOperationRequest {
    pub volume_id: Uuid,
    /// The snapshot reverted to or deleted (absent for `snapshot_create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_context_id: Option<String>,
}

/// The response of a completed snapshot operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotOperationResponse {
    pub volume_id: Uuid,
    pub snapshot_id: String,
    pub snapshot_name: Option<String>,
    /// The volume's `snapshot_status` after the operation: `ready`, `reverted` or `none`.
    pub snapshot_status: String,
    pub message: String,
}

/// One CloudStack snapshot of a volume (`GET /volumes/{id}/snapshots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshot {
    pub id: String,
    pub name: String,
    pub volume_id: Uuid,
    /// CloudStack's state in its own spelling (`BackedUp`, `CreatedOnPrimary`, …).
    pub state: String,
    /// CloudStack's creation time as it wrote it.
    pub created: Option<String>,
    /// Bytes of the volume it was taken of.
    pub size: Option<u64>,
    /// True for the snapshot the volume record tracks (`snapshot.snapshot_id`).
    pub tracked: bool,
}

/// `POST /snapshots/track`: records a snapshot taken elsewhere on the volume record (bookkeeping only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackSnapshotRequest {
    pub volume_uuid: String,
    pub vm_context_id: String,
    pub snapshot_id: String,
    /// Kept on the volume record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_name: Option<String>,
    /// Accepted for compatibility; not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_id: Option<String>,
    /// `ready` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_status: Option<String>,
}

/// Answer of `POST /snapshots/track`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTracked {
    pub message: String,
    pub volume_uuid: Uuid,
    pub snapshot_id: String,
    pub vm_context_id: String,
}

/// The snapshot tracking of one volume of a migration context (the predecessor's `VolumeSnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeSnapshotInfo {
    pub volume_uuid: Uuid,
    pub vm_context_id: String,
    /// The device path while attached to the appliance; empty otherwise.
    pub device_path: String,
    /// `oma` or `failover` while attached; null while detached.
    pub operation_mode: Option<OperationMode>,
    pub snapshot_id: Option<String>,
    pub snapshot_created_at: Option<DateTime<Utc>>,
    /// `none` when nothing is tracked.
    pub snapshot_status: String,
}

/// Answer of `GET /snapshots/vm/{vm_context_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSnapshots {
    pub vm_context_id: String,
    pub snapshots: Vec<VolumeSnapshotInfo>,
    pub count: usize,
}

/// Answer of `DELETE /snapshots/vm/{vm_context_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSnapshotsCleared {
    pub message: String,
    pub vm_context_id: String,
    pub snapshots_cleared: usize,
}

/// `PUT /snapshots/{volume_uuid}`: a partial update of the volume's snapshot tracking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSnapshotRequest {
    /// Ignored (the path names the volume); accepted because the predecessor's clients send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_uuid: Option<String>,
    /// A non-empty id also sets `snapshot_created_at` to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_status: Option<String>,
}

/// Answer of `PUT /snapshots/{volume_uuid}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotUpdated {
    pub message: String,
    pub volume_uuid: Uuid,
}
