//! The persisted record types of the store and their stable text forms.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// The step a freshly journaled operation starts in.
pub const INITIAL_STEP: &str = volume_api::OperationStep::Accepted.as_str();

/// The kind of a journaled operation (stored with its wire spelling).
pub use volume_api::OperationType as OpType;

/// Where an operation is in its life (stored with its wire spelling). `Pending` and `Executing` are
/// unfinished; the rest are terminal.
pub use volume_api::OperationStatus as OpStatus;

/// Why an operation failed: a stable code and a readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: String,
    pub message: String,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    pub id: Uuid,
    pub op_type: OpType,
    pub status: OpStatus,
    /// The last journaled step (free text owned by the engine).
    pub step: String,
    /// The volume acted on; for `create`, set once the cloud has named the new volume.
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<String>,
    pub request: Value,
    pub response: Option<Value>,
    pub error: Option<OpError>,
    pub cloud_job_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// A journal entry about to be written (status `pending`, step [`INITIAL_STEP`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewOperation {
    pub id: Uuid,
    pub op_type: OpType,
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<String>,
    pub request: Value,
    /// Unique per operation type: a second insert with the same type and key returns the first entry.
    pub idempotency_key: Option<String>,
    /// Its place in its volume's queue (see `Store::unfinished_operations`); `None` for rows written the way
    /// earlier versions wrote them.
    pub queue_seq: Option<i64>,
}

/// The outcome of [`crate::store::Store::insert_operation`].
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// A new journal entry.
    Created(OperationRecord),
    /// The idempotency key was already used for this operation type: the earlier entry, unchanged.
    Existing(OperationRecord),
}

impl Inserted {
    pub fn record(&self) -> &OperationRecord {
        match self {
            Self::Created(r) | Self::Existing(r) => r,
        }
    }
}

/// Filters of [`crate::store::Store::list_operations`]; unset fields match everything. Newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationFilter {
    pub op_type: Option<OpType>,
    pub status: Option<OpStatus>,
    pub volume_id: Option<Uuid>,
    pub vm_id: Option<String>,
    pub limit: Option<u32>,
    /// Only operations listed after this one (see [`Cursor`]).
    pub after: Option<Cursor>,
}

/// Where a listing continues: the sort key and the id of the last row of the previous page. Rows are read in
/// (key, id) order, and a row's key never changes (creation time, export name), so a row inserted meanwhile
/// sorts before the cursor or after it, never moving a row across it: paging neither repeats nor skips rows
/// that existed when it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub key: String,
    pub id: String,
}

/// One page of a listing: at most the limit asked for, and the cursor of the next page when there is more.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

/// Filters of [`crate::store::Store::page_volumes`]; unset fields match everything. Oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeFilter {
    /// Only volumes attached to this VM.
    pub vm_id: Option<String>,
    /// Only volumes in this state; deleted volumes (tombstones) are listed only when asked for.
    pub state: Option<volume_api::VolumeState>,
    /// Only volumes of exactly this name.
    pub name: Option<String>,
    pub limit: Option<u32>,
    pub after: Option<Cursor>,
}

/// A volume with its attachment, export and newest operation, as one listing query reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRow {
    pub volume: VolumeRecord,
    pub attachment: Option<AttachmentRecord>,
    pub export: Option<ExportRecord>,
    pub last_operation: Option<OperationRecord>,
}

/// Snapshot tracking of a volume (kept for the predecessor's callers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTracking {
    pub snapshot_id: Option<String>,
    pub snapshot_name: Option<String>,
    pub snapshot_status: Option<String>,
    pub vm_context_id: Option<String>,
    pub snapshot_created_at: Option<DateTime<Utc>>,
}

/// A volume the daemon knows. Outlives its attachments; deletion leaves a tombstone (`deleted_at`).
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRecord {
    pub id: Uuid,
    pub name: String,
    pub size_bytes: u64,
    pub disk_offering_id: String,
    pub zone_id: String,
    pub metadata: Value,
    pub cloud_state: Option<String>,
    pub snapshot: SnapshotTracking,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// Where an attached volume is attached (stored with its wire spelling).
pub use volume_api::AttachTarget;

/// The role of an attached disk in its VM (stored with the wire spelling).
pub use volume_api::DiskRole;

/// The attachment of one volume (at most one per volume).
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentRecord {
    pub volume_id: Uuid,
    pub vm_id: String,
    pub target: AttachTarget,
    pub role: DiskRole,
    /// CloudStack's device id, when it reported one.
    pub device_id: Option<u32>,
    /// `/dev/disk/by-id/…` of the device (appliance only, when the kernel exposes one).
    pub by_id_path: Option<String>,
    /// `/dev/vdX` (appliance only).
    pub kernel_device: Option<String>,
    /// The stable name link (appliance only).
    pub stable_name: Option<String>,
    /// The generation of the export serving it (appliance only).
    pub export_generation: Option<u64>,
    /// The NBD client identities that may open its export (appliance only); empty lets every client that
    /// passes the server's TLS policy.
    pub nbd_clients: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Filters of [`crate::store::Store::list_attachments`]; unset fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttachmentFilter {
    pub vm_id: Option<String>,
    pub target: Option<AttachTarget>,
}

/// The NBD export of an appliance-attached volume.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRecord {
    pub volume_id: Uuid,
    pub export_name: String,
    pub device_path: String,
    pub generation: u64,
    pub read_only: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bytes read and written through this export by earlier runs of the daemon (kept by the store;
    /// writing a record leaves them as they are).
    pub bytes_read_before: u64,
    pub bytes_written_before: u64,
}

/// The appliance identity stored by `PUT /api/v1/appliance`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplianceRecord {
    pub vm_id: String,
    pub source: String,
    pub updated_at: DateTime<Utc>,
}
