//! The journal as types: the steps of each operation kind, the request each kind journals, parsing a stored
//! entry into them (the only place stored text becomes a step), recording steps, the one helper that
//! starts a cloud job or resumes the one whose id was journaled, and the one look-up that adopts an attach or
//! detach job a crashed run started without journaling its id.
//!
//! Step life cycles (stored spellings in `volume_api::OperationStep`):
//!
//! ```text
//! create  accepted → started → cloud_create_sent → cloud_create_job (with the volume id) → (commit)
//! attach  accepted → started → cloud_attach_job → (job done; device, name, export: commit)
//!                      any later failure on the appliance → compensating → compensate_detach_job → (failed)
//!         to another VM: accepted → started → cloud_attach_job → (commit)
//! detach  accepted → started → (export removed) → cloud_detach_job → (device gone: commit)
//! delete  the detach steps, then cloud_delete_sent → (commit)
//! repair  accepted → started → export_removed (forget_attachment, remove_orphan_export) → (commit)
//!                             → exported (reexport) → (commit)
//! snapshot_create  accepted → started → cloud_snapshot_sent → cloud_snapshot_job → (commit)
//! snapshot_revert  accepted → started → cloud_revert_job → (commit)
//! snapshot_delete  accepted → started → cloud_snapshot_delete_job → (commit)
//! test_failover_cleanup  accepted → started → [cloud_stop_job] → cloud_detach_job → [cloud_destroy_job]
//!                        → cloud_attach_job → (job done; device, name, export: commit)
//!                        a failure after the appliance attach → compensating → compensate_detach_job → (failed)
//! ```
//!
//! `cloud_attached`, `device_found`, `named`, `exported`, `export_removed` and `cloud_detached` are no longer
//! written (what they marked is redone from the step before them, see `docs/architecture.md`, guarantee 5a);
//! journals of earlier versions that stopped at one of them resume like the step before.

use std::future::Future;

use uuid::Uuid;
use volume_api::{
    AttachOperationRequest, CreateVolumeRequest, DiskRole, OperationKind, OperationStep,
    RepairKind, RepairRequest, SnapshotOperationRequest, TestFailoverCleanupRequest,
    VolumeOperationRequest,
};

use super::{EngineError, Inner};
use crate::cloud::{CloudJob, VolumeJobKind};
use crate::store::{OpStatus, OpType, OperationRecord};

/// The steps of one operation kind.
pub(crate) trait Step: Copy + Eq + std::fmt::Debug + Send + Sync + 'static {
    /// The kind of operation these are the steps of.
    const KIND: OpType;
    /// Every step of the kind.
    const ALL: &'static [Self];
    /// The steps this version journals (the others are only read from journals of earlier versions); each
    /// has its fail points (`failpoints`).
    const WRITTEN: &'static [Self];
    /// The common (stored) spelling.
    fn wire(self) -> OperationStep;
    /// The step of this kind a stored step names, if it is one of this kind's.
    fn from_wire(w: OperationStep) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.wire() == w)
    }
}

/// The name written in place of a step when an operation commits (only a fail point's name uses it: the
/// commit ends the operation, its row keeps the last step).
pub(crate) const COMMIT: &str = "commit";

macro_rules! kind_steps {
    ($(#[$m:meta])* $name:ident ($kind:ident) { $($v:ident),+ $(,)? } $(earlier { $($old:ident),+ $(,)? })?) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum $name {
            $($v,)+
            $($($old,)+)?
        }

        impl Step for $name {
            const KIND: OpType = OpType::$kind;
            const ALL: &'static [Self] = &[$(Self::$v,)+ $($(Self::$old,)+)?];
            const WRITTEN: &'static [Self] = &[$(Self::$v),+];
            fn wire(self) -> OperationStep {
                match self {
                    $(Self::$v => OperationStep::$v,)+
                    $($(Self::$old => OperationStep::$old,)+)?
                }
            }
        }
    };
}

kind_steps!(
    /// Steps of `create`.
    CreateStep (Create) { Accepted, Started, CloudCreateSent, CloudCreateJob }
);
kind_steps!(
    /// Steps of `attach`.
    AttachStep (Attach) {
        Accepted,
        Started,
        CloudAttachJob,
        Compensating,
        CompensateDetachJob,
    }
    earlier { CloudAttached, DeviceFound, Named, Exported }
);
kind_steps!(
    /// Steps of `detach`.
    DetachStep (Detach) { Accepted, Started, CloudDetachJob } earlier { ExportRemoved, CloudDetached }
);
kind_steps!(
    /// Steps of `delete`: the detach steps, then the deletion.
    DeleteStep (Delete) { Accepted, Started, CloudDetachJob, CloudDeleteSent }
    earlier { ExportRemoved, CloudDetached }
);

kind_steps!(
    /// Steps of `repair`: the export torn down (before the records are dropped), or served again.
    RepairStep (Repair) { Accepted, Started, ExportRemoved, Exported }
);

kind_steps!(
    /// Steps of `snapshot_create`.
    SnapshotCreateStep (SnapshotCreate) { Accepted, Started, CloudSnapshotSent, CloudSnapshotJob }
);
kind_steps!(
    /// Steps of `snapshot_revert`.
    SnapshotRevertStep (SnapshotRevert) { Accepted, Started, CloudRevertJob }
);
kind_steps!(
    /// Steps of `snapshot_delete`.
    SnapshotDeleteStep (SnapshotDelete) { Accepted, Started, CloudSnapshotDeleteJob }
);

kind_steps!(
    /// Steps of `test_failover_cleanup`: the test VM stopped (unless `force_clean`), the volume detached from
    /// it, the test VM destroyed (with `delete_vm`), then the attach to the appliance with its steps.
    CleanupStep (TestFailoverCleanup) {
        Accepted,
        Started,
        CloudStopJob,
        CloudDetachJob,
        CloudDestroyJob,
        CloudAttachJob,
        Compensating,
        CompensateDetachJob,
    }
    earlier { CloudAttached }
);

/// The detach part of a clean-up journals the detach's steps as its own.
impl From<DetachStep> for CleanupStep {
    fn from(s: DetachStep) -> Self {
        match s {
            DetachStep::Accepted => Self::Accepted,
            DetachStep::Started => Self::Started,
            // Earlier versions' spellings; never written, so never passed here.
            DetachStep::CloudDetachJob | DetachStep::ExportRemoved | DetachStep::CloudDetached => {
                Self::CloudDetachJob
            }
        }
    }
}

/// The attach part of a clean-up journals the attach's steps as its own.
impl From<AttachStep> for CleanupStep {
    fn from(s: AttachStep) -> Self {
        match s {
            AttachStep::Accepted => Self::Accepted,
            AttachStep::Started => Self::Started,
            AttachStep::CloudAttachJob => Self::CloudAttachJob,
            // Earlier versions' spellings; never written, so never passed here.
            AttachStep::CloudAttached
            | AttachStep::DeviceFound
            | AttachStep::Named
            | AttachStep::Exported => Self::CloudAttached,
            AttachStep::Compensating => Self::Compensating,
            AttachStep::CompensateDetachJob => Self::CompensateDetachJob,
        }
    }
}

impl From<DetachStep> for DeleteStep {
    fn from(s: DetachStep) -> Self {
        match s {
            DetachStep::Accepted => Self::Accepted,
            DetachStep::Started => Self::Started,
            DetachStep::ExportRemoved => Self::ExportRemoved,
            DetachStep::CloudDetachJob => Self::CloudDetachJob,
            DetachStep::CloudDetached => Self::CloudDetached,
        }
    }
}

/// A journal entry read for running: its typed request and the step it stopped at.
#[derive(Debug, Clone)]
pub(crate) struct Entry<R, S> {
    pub id: Uuid,
    /// The volume acted on; for `create`, once the cloud named it.
    pub volume_id: Option<Uuid>,
    pub cloud_job_id: Option<String>,
    /// The step journaled when this run began.
    pub step: S,
    pub request: R,
}

impl<R, S: Step> Entry<R, S> {
    /// The job id journaled with `job_step`, if the entry stopped while waiting for that job.
    fn journaled_job(&self, job_step: S) -> Option<&str> {
        self.cloud_job_id
            .as_deref()
            .filter(|_| self.step == job_step)
    }

    /// Whether an earlier run of the entry got past `accepted` (journaled `started` or a later step), and so may
    /// have sent a call whose job id it never journaled: before a crash, or when an attempt that met an
    /// unavailable cloud is run again. A run journals `started` before it sends anything.
    fn resumed(&self) -> bool {
        self.step.wire() != OperationStep::Accepted
    }
}

/// A mutation request, validated: what the API submits and what the journal stores as `request`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    Create(CreateVolumeRequest),
    Attach(AttachOperationRequest),
    Detach(VolumeOperationRequest),
    Delete(VolumeOperationRequest),
    Repair(RepairRequest),
    SnapshotCreate(SnapshotOperationRequest),
    SnapshotRevert(SnapshotOperationRequest),
    SnapshotDelete(SnapshotOperationRequest),
    TestFailoverCleanup(TestFailoverCleanupRequest),
}

impl Request {
    /// An attach to `vm_id`, as the root disk when `root`; `nbd_clients` (appliance only) limits who may open
    /// the export.
    pub fn attach(
        volume_id: Uuid,
        vm_id: String,
        root: bool,
        nbd_clients: Option<Vec<String>>,
    ) -> Self {
        Self::Attach(AttachOperationRequest {
            volume_id,
            vm_id,
            device_id: root.then_some(0),
            attach_as: root.then_some(DiskRole::Root),
            nbd_clients,
        })
    }

    pub fn op_type(&self) -> OpType {
        match self {
            Self::Create(_) => OpType::Create,
            Self::Attach(_) => OpType::Attach,
            Self::Detach(_) => OpType::Detach,
            Self::Delete(_) => OpType::Delete,
            Self::Repair(_) => OpType::Repair,
            Self::SnapshotCreate(_) => OpType::SnapshotCreate,
            Self::SnapshotRevert(_) => OpType::SnapshotRevert,
            Self::SnapshotDelete(_) => OpType::SnapshotDelete,
            Self::TestFailoverCleanup(_) => OpType::TestFailoverCleanup,
        }
    }

    /// A reconciler's repair of the volume.
    pub fn repair(volume_id: Uuid, repair: RepairKind) -> Self {
        Self::Repair(RepairRequest { volume_id, repair })
    }

    pub fn volume_id(&self) -> Option<Uuid> {
        match self {
            Self::Create(_) => None,
            Self::Attach(a) => Some(a.volume_id),
            Self::Detach(r) | Self::Delete(r) => Some(r.volume_id),
            Self::Repair(r) => Some(r.volume_id),
            Self::SnapshotCreate(r) | Self::SnapshotRevert(r) | Self::SnapshotDelete(r) => {
                Some(r.volume_id)
            }
            Self::TestFailoverCleanup(r) => Some(r.volume_id),
        }
    }

    /// The VM the operation is about: the attach's VM, the clean-up's test VM.
    pub fn vm_id(&self) -> Option<&str> {
        match self {
            Self::Attach(a) => Some(&a.vm_id),
            Self::TestFailoverCleanup(r) => Some(&r.test_vm_id),
            _ => None,
        }
    }

    /// The request as journaled.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Create(c) => json_of(c),
            Self::Attach(a) => json_of(a),
            Self::Detach(r) | Self::Delete(r) => json_of(r),
            Self::Repair(r) => json_of(r),
            Self::SnapshotCreate(r) | Self::SnapshotRevert(r) | Self::SnapshotDelete(r) => {
                json_of(r)
            }
            Self::TestFailoverCleanup(r) => json_of(r),
        }
    }
}

/// A journaled request or response as JSON.
pub(crate) fn json_of<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect(
        "journal types are plain structs with string keys, which always serialize: invariant",
    )
}

/// A journal entry parsed into its kind.
#[derive(Debug, Clone)]
pub(crate) enum Parsed {
    Create(Entry<CreateVolumeRequest, CreateStep>),
    Attach(Entry<AttachOperationRequest, AttachStep>),
    Detach(Entry<VolumeOperationRequest, DetachStep>),
    Delete(Entry<VolumeOperationRequest, DeleteStep>),
    Repair(Entry<RepairRequest, RepairStep>),
    SnapshotCreate(Entry<SnapshotOperationRequest, SnapshotCreateStep>),
    SnapshotRevert(Entry<SnapshotOperationRequest, SnapshotRevertStep>),
    SnapshotDelete(Entry<SnapshotOperationRequest, SnapshotDeleteStep>),
    TestFailoverCleanup(Entry<TestFailoverCleanupRequest, CleanupStep>),
}

impl Parsed {
    /// Reads a stored entry: its step must be one of its kind's and its request that kind's request.
    pub fn from_record(op: &OperationRecord) -> Result<Self, EngineError> {
        fn entry<R: serde::de::DeserializeOwned, S: Step>(
            op: &OperationRecord,
        ) -> Result<Entry<R, S>, EngineError> {
            let step = OperationStep::parse_stored(&op.step)
                .and_then(S::from_wire)
                .ok_or_else(|| EngineError::Journal {
                    operation: op.id,
                    problem: format!(
                        "step {:?} is not a step of a {} operation",
                        op.step,
                        op.op_type.as_str()
                    ),
                })?;
            let request =
                serde_json::from_value(op.request.clone()).map_err(|e| EngineError::Journal {
                    operation: op.id,
                    problem: format!("its {} request cannot be read: {e}", op.op_type.as_str()),
                })?;
            Ok(Entry {
                id: op.id,
                volume_id: op.volume_id,
                cloud_job_id: op.cloud_job_id.clone(),
                step,
                request,
            })
        }
        Ok(match op.op_type {
            OpType::Create => Self::Create(entry(op)?),
            OpType::Attach => Self::Attach(entry(op)?),
            OpType::Detach => Self::Detach(entry(op)?),
            OpType::Delete => Self::Delete(entry(op)?),
            OpType::Repair => Self::Repair(entry(op)?),
            OpType::SnapshotCreate => Self::SnapshotCreate(entry(op)?),
            OpType::SnapshotRevert => Self::SnapshotRevert(entry(op)?),
            OpType::SnapshotDelete => Self::SnapshotDelete(entry(op)?),
            OpType::TestFailoverCleanup => Self::TestFailoverCleanup(entry(op)?),
        })
    }
}

/// A stored entry's kind with its request and response as the wire shows them.
pub(crate) fn wire_kind(op: &OperationRecord) -> Result<OperationKind, EngineError> {
    fn read<T: serde::de::DeserializeOwned>(
        op: &OperationRecord,
        what: &str,
        v: &serde_json::Value,
    ) -> Result<T, EngineError> {
        T::deserialize(v).map_err(|e| EngineError::Journal {
            operation: op.id,
            problem: format!("its {} {what} cannot be read: {e}", op.op_type.as_str()),
        })
    }
    fn response<T: serde::de::DeserializeOwned>(
        op: &OperationRecord,
    ) -> Result<Option<T>, EngineError> {
        op.response
            .as_ref()
            .map(|r| read(op, "response", r))
            .transpose()
    }
    Ok(match op.op_type {
        OpType::Create => OperationKind::Create {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::Attach => OperationKind::Attach {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::Detach => OperationKind::Detach {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::Delete => OperationKind::Delete {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::Repair => OperationKind::Repair {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::SnapshotCreate => OperationKind::SnapshotCreate {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::SnapshotRevert => OperationKind::SnapshotRevert {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::SnapshotDelete => OperationKind::SnapshotDelete {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
        OpType::TestFailoverCleanup => OperationKind::TestFailoverCleanup {
            request: read(op, "request", &op.request)?,
            response: response(op)?,
        },
    })
}

/// The step recorded when an operation (re)starts: a fresh one says `started`, a resumed one keeps its step.
pub(crate) fn resume_step(stored: &str) -> &str {
    match OperationStep::parse_stored(stored) {
        Some(OperationStep::Accepted) => OperationStep::Started.as_str(),
        _ => stored,
    }
}

impl Inner {
    /// Journals that the operation reached `step`.
    pub(super) async fn step<R, S: Step>(
        &self,
        entry: &Entry<R, S>,
        step: S,
    ) -> Result<(), EngineError> {
        let wire = step.wire().as_str();
        self.journal_step(S::KIND, wire, "journaling the step of an operation", || {
            self.store
                .set_operation_step(entry.id, OpStatus::Executing, wire)
        })
        .await?;
        self.notify();
        Ok(())
    }

    /// Starts a cloud job and journals its id with `job_step` before anything waits for it, or, when the entry
    /// stopped at `job_step` with a journaled job id, returns that id so the job is polled again, not resent.
    pub(super) async fn start_or_resume_job<R, S: Step>(
        &self,
        entry: &Entry<R, S>,
        job_step: S,
        start: impl Future<Output = Result<CloudJob, EngineError>>,
    ) -> Result<String, EngineError> {
        self.start_or_resume_job_of(entry, job_step, async { Ok((start.await?, None)) })
            .await
    }

    /// [`Self::start_or_resume_job`] for a job that names the volume it acts on when it starts (`create`):
    /// the job id and the volume are journaled in one write.
    pub(super) async fn start_or_resume_job_of<R, S: Step>(
        &self,
        entry: &Entry<R, S>,
        job_step: S,
        start: impl Future<Output = Result<(CloudJob, Option<Uuid>), EngineError>>,
    ) -> Result<String, EngineError> {
        if let Some(job) = entry.journaled_job(job_step) {
            return Ok(job.to_string());
        }
        let (job, volume_id) = start.await?;
        let wire = job_step.wire().as_str();
        self.journal_step(
            S::KIND,
            wire,
            "journaling the job id of an operation",
            || {
                self.store
                    .set_operation_job_of(entry.id, wire, &job.job_id, volume_id)
            },
        )
        .await?;
        self.notify();
        Ok(job.job_id)
    }

    /// [`Self::start_or_resume_job`] for attachVolume or detachVolume (`kind`) on `volume_id`. An entry resumed
    /// with no job id journaled for `job_step` may have sent the call just before the crash, and that job may
    /// still be running in the cloud: sent again, the second job could end first, and the first one, running
    /// late, would then undo a later attach or detach of the volume. So such an entry first looks for that job
    /// ([`Self::lost_volume_job`]) and adopts it (journals its id with `job_step` and waits for it) instead of
    /// sending the call again; when there is none, or the cloud cannot list its jobs, the call is sent.
    pub(super) async fn start_or_adopt_volume_job<R, S: Step>(
        &self,
        entry: &Entry<R, S>,
        job_step: S,
        volume_id: Uuid,
        kind: VolumeJobKind,
        start: impl Future<Output = Result<CloudJob, EngineError>>,
    ) -> Result<String, EngineError> {
        self.start_or_resume_job(entry, job_step, async {
            if entry.resumed() {
                if let Some(job) = self.lost_volume_job(volume_id, kind).await {
                    return Ok(job);
                }
            }
            start.await
        })
        .await
    }

    /// The account's pending job of `kind` on the volume (listAsyncJobs), when the cloud lists one: the newest
    /// by creation time. Older pending ones of the same kind (several attempts lost the same way) are waited for
    /// first, so that none of them runs after the operation has moved on. `None`, with a warning, when the
    /// cloud cannot list its jobs: the caller then sends the call as it would without the look-up, and
    /// [`Inner::finish_job_or_reached`] still covers a first job that ends first.
    async fn lost_volume_job(&self, volume_id: Uuid, kind: VolumeJobKind) -> Option<CloudJob> {
        let mut jobs: Vec<_> = match self.cloud.pending_volume_jobs(&volume_id.to_string()).await {
            Ok(jobs) => jobs.into_iter().filter(|j| j.kind == kind).collect(),
            Err(e) => {
                tracing::warn!(
                    volume = %volume_id,
                    error = %e.chain(),
                    "cannot list CloudStack's jobs to find one an earlier attempt started on the volume; \
                     sending the call again"
                );
                return None;
            }
        };
        // Stable: among equal creation times the cloud's order stands.
        jobs.sort_by(|a, b| a.created.cmp(&b.created));
        let newest = jobs.pop()?;
        for older in jobs {
            if let Err(e) = self
                .cloud
                .wait_job(&older.job_id, self.cfg.job_timeout)
                .await
            {
                tracing::warn!(volume = %volume_id, job = %older.job_id, error = %e.chain(), "an older job of an earlier attempt on the volume did not succeed");
            }
        }
        tracing::warn!(
            volume = %volume_id,
            job = %newest.job_id,
            kind = ?kind,
            "CloudStack is still running a job on the volume that an earlier attempt (before a crash or a \
             lost answer) started without journaling its id; waiting for it instead of sending the call again"
        );
        Some(CloudJob {
            job_id: newest.job_id,
            resource_id: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    /// The spellings journals written by earlier versions contain.
    const STORED: [&str; 21] = [
        "accepted",
        "started",
        "cloud_create_sent",
        "cloud_create_job",
        "cloud_attach_job",
        "cloud_attached",
        "device_found",
        "named",
        "exported",
        "compensating",
        "compensate_detach_job",
        "export_removed",
        "cloud_detach_job",
        "cloud_detached",
        "cloud_delete_sent",
        "cloud_snapshot_sent",
        "cloud_snapshot_job",
        "cloud_revert_job",
        "cloud_snapshot_delete_job",
        "cloud_stop_job",
        "cloud_destroy_job",
    ];

    fn record(op_type: OpType, step: &str, request: serde_json::Value) -> OperationRecord {
        OperationRecord {
            id: Uuid::new_v4(),
            op_type,
            status: OpStatus::Executing,
            step: step.into(),
            volume_id: Some(Uuid::nil()),
            vm_id: None,
            request,
            response: None,
            error: None,
            cloud_job_id: Some("job-1".into()),
            idempotency_key: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            completed_at: None,
        }
    }

    #[test]
    fn every_stored_spelling_parses_and_prints_back_the_same() {
        for s in STORED {
            let step = OperationStep::parse(s).unwrap_or_else(|| panic!("{s} parses"));
            assert_eq!(step.as_str(), s);
            assert_eq!(serde_json::to_value(step).unwrap(), json!(s));
        }
        assert_eq!(OperationStep::ALL.len(), STORED.len());
        assert_eq!(crate::store::INITIAL_STEP, "accepted");
        assert_eq!(
            OperationStep::parse_stored("compensating: detach failed"),
            Some(OperationStep::Compensating)
        );
        assert_eq!(OperationStep::parse("cloud_attach"), None);
    }

    #[test]
    fn each_kind_accepts_exactly_its_own_steps() {
        let kinds: [(&[OperationStep], OpType); 9] = [
            (
                &CreateStep::ALL.iter().map(|s| s.wire()).collect::<Vec<_>>(),
                OpType::Create,
            ),
            (
                &AttachStep::ALL.iter().map(|s| s.wire()).collect::<Vec<_>>(),
                OpType::Attach,
            ),
            (
                &DetachStep::ALL.iter().map(|s| s.wire()).collect::<Vec<_>>(),
                OpType::Detach,
            ),
            (
                &DeleteStep::ALL.iter().map(|s| s.wire()).collect::<Vec<_>>(),
                OpType::Delete,
            ),
            (
                &RepairStep::ALL.iter().map(|s| s.wire()).collect::<Vec<_>>(),
                OpType::Repair,
            ),
            (
                &SnapshotCreateStep::ALL
                    .iter()
                    .map(|s| s.wire())
                    .collect::<Vec<_>>(),
                OpType::SnapshotCreate,
            ),
            (
                &SnapshotRevertStep::ALL
                    .iter()
                    .map(|s| s.wire())
                    .collect::<Vec<_>>(),
                OpType::SnapshotRevert,
            ),
            (
                &SnapshotDeleteStep::ALL
                    .iter()
                    .map(|s| s.wire())
                    .collect::<Vec<_>>(),
                OpType::SnapshotDelete,
            ),
            (
                &CleanupStep::ALL
                    .iter()
                    .map(|s| s.wire())
                    .collect::<Vec<_>>(),
                OpType::TestFailoverCleanup,
            ),
        ];
        for (steps, kind) in kinds {
            let request = match kind {
                OpType::Create => {
                    json!({"name": "n", "size": 1, "disk_offering_id": "o", "zone_id": "z"})
                }
                OpType::Attach => json!({"volume_id": Uuid::nil(), "vm_id": "vm"}),
                OpType::Repair => json!({"volume_id": Uuid::nil(), "repair": "reexport"}),
                OpType::TestFailoverCleanup => json!({"volume_id": Uuid::nil(),
                    "test_vm_id": "vm", "oma_vm_id": "appliance"}),
                _ => json!({"volume_id": Uuid::nil()}),
            };
            for s in OperationStep::ALL {
                let parsed = Parsed::from_record(&record(kind, s.as_str(), request.clone()));
                assert_eq!(parsed.is_ok(), steps.contains(s), "{kind:?} {s:?}");
            }
        }
    }

    #[test]
    fn journal_rows_of_the_earlier_format_resume_with_the_same_meaning() {
        // attach-root as earlier versions journaled it, stopped while its cloud job ran.
        let old =
            json!({"volume_id": Uuid::nil(), "vm_id": "vm-7", "device_id": 0, "attach_as": "root"});
        let Parsed::Attach(e) =
            Parsed::from_record(&record(OpType::Attach, "cloud_attach_job", old.clone())).unwrap()
        else {
            panic!("an attach entry")
        };
        assert!(e.request.is_root());
        assert_eq!(e.request.vm_id, "vm-7");
        assert_eq!(e.step, AttachStep::CloudAttachJob);
        assert_eq!(e.journaled_job(AttachStep::CloudAttachJob), Some("job-1"));
        assert_eq!(e.journaled_job(AttachStep::CompensateDetachJob), None);
        assert_eq!(
            Request::attach(Uuid::nil(), "vm-7".into(), true, None).to_json(),
            old
        );
        // A plain attach stores no role.
        let plain = json!({"volume_id": Uuid::nil(), "vm_id": "vm-7"});
        assert_eq!(
            Request::attach(Uuid::nil(), "vm-7".into(), false, None).to_json(),
            plain
        );
        let Parsed::Attach(e) =
            Parsed::from_record(&record(OpType::Attach, "compensating", plain)).unwrap()
        else {
            panic!("an attach entry")
        };
        assert!(!e.request.is_root());
        assert_eq!(e.step, AttachStep::Compensating);
        // delete stopped after its detach part.
        let Parsed::Delete(e) = Parsed::from_record(&record(
            OpType::Delete,
            "cloud_delete_sent",
            json!({"volume_id": Uuid::nil()}),
        ))
        .unwrap() else {
            panic!("a delete entry")
        };
        assert_eq!(e.step, DeleteStep::CloudDeleteSent);
        // An unreadable request is a journal error, not a guess.
        let err = Parsed::from_record(&record(OpType::Attach, "started", json!({"volume_id": 1})))
            .unwrap_err();
        assert!(matches!(err, EngineError::Journal { .. }), "{err:?}");
    }

    #[test]
    fn a_fresh_entry_starts_and_a_resumed_one_keeps_its_step() {
        assert_eq!(resume_step("accepted"), "started");
        assert_eq!(resume_step("cloud_detach_job"), "cloud_detach_job");
    }
}
