//! Every enum-like field of the wire contract, with its stable spelling in one place.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An enum serialized as one of a fixed set of strings, with `as_str`, `parse`, `ALL` and `Display`. The
/// serialized spelling is the variant's name in snake case (`rename_all`, which the schema derive reads too);
/// each variant also states it, for `as_str`, and a test checks the two agree.
macro_rules! wire_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vm])* $v),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$v),+];

            /// The wire (and stored) spelling.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$v => $s),+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($s => Some(Self::$v),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// The kind of a journaled operation.
    pub enum OperationType {
        Create = "create",
        Attach = "attach",
        Detach = "detach",
        Delete = "delete",
        /// A repair the reconciler found safe (`POST /reconcile` with `apply`).
        Repair = "repair",
        /// A CloudStack snapshot of the volume (`POST /volumes/{id}/snapshots`).
        SnapshotCreate = "snapshot_create",
        /// The volume reverted to one of its snapshots (detached volumes only).
        SnapshotRevert = "snapshot_revert",
        /// A snapshot of the volume deleted.
        SnapshotDelete = "snapshot_delete",
        /// After a test failover: the volume detached from the test VM (stopped first unless `force_clean`),
        /// the test VM destroyed when asked, and the volume attached, named and exported on the appliance
        /// again (`POST /cleanup/test-failover`).
        TestFailoverCleanup = "test_failover_cleanup",
    }
}

wire_enum! {
    /// A component of `/health`: the keys of its `components`. Which are present depends on the daemon's
    /// settings and progress (see each).
    pub enum HealthComponent {
        /// The database answers a query, and the latest lease renewal (a write) succeeded.
        Database = "database",
        /// CloudStack answered now, within a few seconds.
        Cloudstack = "cloudstack",
        /// The appliance identity is known and verified.
        ApplianceIdentity = "appliance_identity",
        /// Recovery finished, operations are accepted and none is stuck.
        Journal = "journal",
        /// The start-up preflight passed (block devices, names directory, uevents, by-id watch).
        Privileges = "privileges",
        /// This daemon holds its appliance's lease in the database.
        Lease = "lease",
        /// The NBD listener is up.
        Nbd = "nbd",
        /// Every volume attached to the appliance is exported again after start-up.
        Exports = "exports",
        /// After the first scheduled reconcile: `degraded` while the latest one left findings.
        Drift = "drift",
        /// Only with the hub_database_url setting: the hub's tables and the delivery of changes to them.
        Hub = "hub",
        /// Only with the hub_import_on_start setting: what the import at start journaled.
        HubImport = "hub_import",
    }
}

wire_enum! {
    /// Where an operation is in its life. `pending` and `executing` are unfinished; the rest are terminal.
    pub enum OperationStatus {
        Pending = "pending",
        Executing = "executing",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl OperationStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

wire_enum! {
    /// The last journaled step of an operation. Stored as text in the journal and shown as `step`; the
    /// spellings never change, so a journal written by an earlier version resumes. Each operation kind uses a
    /// subset (the daemon's journal types them per kind).
    pub enum OperationStep {
        /// Journaled, not yet started.
        Accepted = "accepted",
        /// Started (a resumed operation keeps its last step instead).
        Started = "started",
        /// `create`: createVolume is being sent (its job id is not known yet).
        CloudCreateSent = "cloud_create_sent",
        /// `create`: the createVolume job id is journaled.
        CloudCreateJob = "cloud_create_job",
        /// `attach`: the attachVolume job id is journaled.
        CloudAttachJob = "cloud_attach_job",
        /// `attach`: the cloud reports the volume attached.
        CloudAttached = "cloud_attached",
        /// `attach` (appliance): the device was found by identity and verified.
        DeviceFound = "device_found",
        /// `attach` (appliance): the stable name link exists.
        Named = "named",
        /// `attach` (appliance): the NBD export is served.
        Exported = "exported",
        /// `attach`: a later step failed; the attach is being undone.
        Compensating = "compensating",
        /// `attach`: the undoing detachVolume job id is journaled.
        CompensateDetachJob = "compensate_detach_job",
        /// `detach`/`delete`: the appliance's export and stable name are gone.
        ExportRemoved = "export_removed",
        /// `detach`/`delete`: the detachVolume job id is journaled.
        CloudDetachJob = "cloud_detach_job",
        /// `detach`/`delete`: the cloud reports the volume detached.
        CloudDetached = "cloud_detached",
        /// `delete`: deleteVolume is being sent.
        CloudDeleteSent = "cloud_delete_sent",
        /// `snapshot_create`: createSnapshot is being sent (its job id is not known yet).
        CloudSnapshotSent = "cloud_snapshot_sent",
        /// `snapshot_create`: the createSnapshot job id is journaled.
        CloudSnapshotJob = "cloud_snapshot_job",
        /// `snapshot_revert`: the revertSnapshot job id is journaled.
        CloudRevertJob = "cloud_revert_job",
        /// `snapshot_delete`: the deleteSnapshot job id is journaled.
        CloudSnapshotDeleteJob = "cloud_snapshot_delete_job",
        /// `test_failover_cleanup`: the stopVirtualMachine job id (the test VM, forced) is journaled.
        CloudStopJob = "cloud_stop_job",
        /// `test_failover_cleanup`: the destroyVirtualMachine job id (the test VM, expunged) is journaled.
        CloudDestroyJob = "cloud_destroy_job",
    }
}

impl OperationStep {
    /// Parses a stored step; journals of earlier versions may carry a suffix after `compensating`.
    pub fn parse_stored(s: &str) -> Option<Self> {
        Self::parse(s).or_else(|| s.starts_with("compensating").then_some(Self::Compensating))
    }
}

wire_enum! {
    /// The role of a disk in the VM it is attached to.
    pub enum DiskRole {
        Data = "data",
        /// Attached as CloudStack device id 0 (`attach-root`).
        Root = "root",
    }
}

wire_enum! {
    /// Where a volume is attached.
    pub enum AttachTarget {
        /// The appliance the daemon runs on: a local device, a stable name and an NBD export.
        Appliance = "appliance",
        /// Any other VM.
        Remote = "remote",
    }
}

wire_enum! {
    /// The predecessor's name for the attach target: `oma` for the appliance, `failover` for another VM.
    pub enum OperationMode {
        Oma = "oma",
        Failover = "failover",
    }
}

impl From<AttachTarget> for OperationMode {
    fn from(t: AttachTarget) -> Self {
        match t {
            AttachTarget::Appliance => Self::Oma,
            AttachTarget::Remote => Self::Failover,
        }
    }
}

wire_enum! {
    /// A volume's state as the daemon recorded it.
    pub enum VolumeState {
        Attached = "attached",
        Detached = "detached",
        Deleted = "deleted",
    }
}

wire_enum! {
    /// The local device's state of an attached volume.
    pub enum LinuxState {
        /// Found by identity and verified.
        Present = "present",
        /// No device with the volume's identity.
        Missing = "missing",
        /// A device was found but failed verification (`linux_problem` says why).
        Unverified = "unverified",
        /// Attached to another VM: there is no local device.
        Remote = "remote",
    }
}

wire_enum! {
    /// Whether an export is served.
    pub enum ExportStatus {
        /// Served by the NBD server under the recorded generation.
        Active = "active",
        /// Recorded but not served (`POST /exports` or `POST /reconcile` with `apply` serves it again).
        Inactive = "inactive",
    }
}

wire_enum! {
    /// Where the appliance identity came from.
    pub enum ApplianceSource {
        Config = "config",
        Simulator = "simulator",
        Database = "database",
        Detected = "detected",
        /// `ossea_configs.oma_vm_id` of the active row in the hub database (`hub_database_url`).
        Hub = "hub",
        Unknown = "unknown",
    }
}

wire_enum! {
    /// The state of one `/health` component.
    pub enum ComponentStatus {
        Ok = "ok",
        /// Needs attention, but the daemon still serves (e.g. drift found by the reconciler); `ready` stays true.
        Degraded = "degraded",
        /// The daemon cannot serve; `/health` answers 503.
        Failed = "failed",
    }
}

wire_enum! {
    /// The overall `/health` status.
    pub enum HealthStatus {
        /// Every component is ok (HTTP 200).
        Healthy = "healthy",
        /// A component failed; the daemon cannot serve (HTTP 503).
        Unhealthy = "unhealthy",
    }
}

wire_enum! {
    /// The kind of a difference the reconciler found.
    pub enum DriftKind {
        /// CloudStack could not be asked about the volume.
        CloudUnavailable = "cloud_unavailable",
        /// The database knows the volume, CloudStack does not.
        MissingInCloud = "missing_in_cloud",
        /// The database records an attachment CloudStack does not have (repairable).
        AttachedOnlyInDatabase = "attached_only_in_database",
        /// CloudStack has an attachment the database does not.
        AttachedOnlyInCloud = "attached_only_in_cloud",
        /// The database and CloudStack name different VMs.
        AttachedElsewhere = "attached_elsewhere",
        /// The device of an appliance volume is missing or fails verification.
        DeviceProblem = "device_problem",
        /// Attached to the appliance but not served (repairable).
        ExportMissing = "export_missing",
        /// Served without an appliance attachment (repairable).
        ExportWithoutAttachment = "export_without_attachment",
        /// The appliance identity is unknown.
        ApplianceIdentityUnknown = "appliance_identity_unknown",
        /// CloudStack has a (non-root) volume attached to the appliance that the daemon does not manage, e.g.
        /// one attached before an upgrade (adoptable).
        UnknownApplianceVolume = "unknown_appliance_volume",
    }
}

wire_enum! {
    /// A repair with one safe outcome, run as an operation of type `repair`.
    pub enum RepairKind {
        /// The cloud no longer attaches the volume: forget the attachment, its export and its stable name.
        ForgetAttachment = "forget_attachment",
        /// Attached to the appliance but not served: re-verify the device and serve it again.
        Reexport = "reexport",
        /// Served without an appliance attachment: stop serving it and drop its record.
        RemoveOrphanExport = "remove_orphan_export",
        /// Attached to the appliance in CloudStack but not managed by the daemon: verify its device like any
        /// attach, name and serve it, and record the attachment. CloudStack is not asked to change anything.
        Adopt = "adopt",
    }
}

wire_enum! {
    /// What the reconciler does, or what an operator should do, about a drift. The three repairs are done by
    /// `POST /reconcile` with `apply` (as `repair` operations); the others need an operator.
    pub enum DriftAction {
        /// Repair: forget the attachment the cloud no longer has.
        ForgetAttachment = "forget_attachment",
        /// Repair: re-verify the device and serve the export again.
        Reexport = "reexport",
        /// Repair: stop serving the export and drop its record.
        RemoveOrphanExport = "remove_orphan_export",
        /// Adopt the volume attached to the appliance (verified like any attach); done by `apply` and by
        /// `POST /volumes/{id}/adopt`, never by the scheduled reconcile.
        Adopt = "adopt",
        /// Nothing to do now; run the reconciler again when CloudStack answers.
        RetryLater = "retry_later",
        /// Delete the volume through the API to record that it is gone.
        DeleteVolume = "delete_volume",
        /// Detach the volume through the API and attach it again.
        DetachAndReattach = "detach_and_reattach",
        /// Look at the device (see the operations guide: device never appeared, size mismatch).
        CheckDevice = "check_device",
        /// Set `appliance_vm_id` or `PUT /api/v1/appliance`.
        SetApplianceIdentity = "set_appliance_identity",
    }
}

impl DriftAction {
    /// The repair `apply` runs for this action, when it has one.
    pub fn repair(self) -> Option<RepairKind> {
        match self {
            Self::ForgetAttachment => Some(RepairKind::ForgetAttachment),
            Self::Reexport => Some(RepairKind::Reexport),
            Self::RemoveOrphanExport => Some(RepairKind::RemoveOrphanExport),
            Self::Adopt => Some(RepairKind::Adopt),
            Self::RetryLater
            | Self::DeleteVolume
            | Self::DetachAndReattach
            | Self::CheckDevice
            | Self::SetApplianceIdentity => None,
        }
    }
}

wire_enum! {
    /// The stable kind of a failure: the `code` of an error body and the `error_code` of a failed operation.
    pub enum ErrorCode {
        /// The request is malformed or a field is invalid (`field` names it).
        InvalidRequest = "invalid_request",
        /// Missing or wrong bearer token.
        Unauthorized = "unauthorized",
        /// No such volume, operation, export or endpoint.
        NotFound = "not_found",
        /// The request conflicts with the current state (e.g. attached elsewhere).
        Conflict = "conflict",
        /// The daemon is starting up or shutting down.
        Unavailable = "unavailable",
        /// The database failed or is unreachable.
        DatabaseError = "database_error",
        /// The appliance VM identity is unknown or unverified.
        ApplianceIdentityUnknown = "appliance_identity_unknown",
        /// The appliance identity is fixed by configuration.
        ApplianceIdentityFixed = "appliance_identity_fixed",
        /// Another daemon holds the lease of the VM named as the appliance (it serves that appliance).
        ApplianceLeaseHeld = "appliance_lease_held",
        /// The VM named as the appliance does not exist.
        NoSuchVm = "no_such_vm",
        /// The `Idempotency-Key` was used before for a different request (another kind or another body).
        IdempotencyKeyReused = "idempotency_key_reused",
        /// The volume belongs to another appliance that shares the database; ask that appliance's daemon.
        VolumeOwnedByOtherAppliance = "volume_owned_by_other_appliance",
        /// The volume is attached to a VM; detach it first (a snapshot revert needs a detached volume).
        VolumeAttached = "volume_attached",
        CloudNotFound = "cloud_not_found",
        CloudInvalidParameter = "cloud_invalid_parameter",
        CloudInUse = "cloud_in_use",
        CloudLimitExceeded = "cloud_limit_exceeded",
        CloudUnauthorized = "cloud_unauthorized",
        /// CloudStack cannot be reached or answers with a server error.
        CloudUnavailable = "cloud_unavailable",
        /// A CloudStack job failed.
        CloudJobFailed = "cloud_job_failed",
        /// A CloudStack job did not finish in time.
        CloudJobTimeout = "cloud_job_timeout",
        CloudError = "cloud_error",
        /// The volume's device did not appear on the appliance.
        DeviceNotFound = "device_not_found",
        DeviceTimeout = "device_timeout",
        /// The device found does not match the volume (serial or size).
        DeviceMismatch = "device_mismatch",
        DeviceNotBlockDevice = "device_not_block_device",
        /// The daemon lacks permission on the device.
        DevicePermission = "device_permission",
        DeviceError = "device_error",
        /// Opening or removing an NBD export failed.
        ExportFailed = "export_failed",
        /// A bug or an unexpected state; the message says what failed.
        Internal = "internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agree<T: Serialize + Copy + std::fmt::Display + std::fmt::Debug>(all: &[T]) {
        for v in all {
            assert_eq!(
                serde_json::to_value(v).unwrap(),
                serde_json::Value::String(v.to_string()),
                "{v:?}"
            );
        }
    }

    #[test]
    fn serialized_spellings_are_the_stated_ones() {
        agree(OperationType::ALL);
        agree(OperationStatus::ALL);
        agree(OperationStep::ALL);
        agree(DiskRole::ALL);
        agree(AttachTarget::ALL);
        agree(OperationMode::ALL);
        agree(VolumeState::ALL);
        agree(LinuxState::ALL);
        agree(ExportStatus::ALL);
        agree(ApplianceSource::ALL);
        agree(ComponentStatus::ALL);
        agree(HealthComponent::ALL);
        agree(HealthStatus::ALL);
        agree(DriftKind::ALL);
        agree(RepairKind::ALL);
        agree(DriftAction::ALL);
        agree(ErrorCode::ALL);
    }
}
