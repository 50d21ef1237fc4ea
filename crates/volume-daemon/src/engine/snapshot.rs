//! The snapshot workflows, journaled like every operation and run in the volume's FIFO turn: create a
//! CloudStack snapshot of a volume, revert a detached volume to one of its snapshots, delete a snapshot. Each
//! journals its cloud job id before waiting, resumes by polling that job again, and commits the volume
//! record's snapshot tracking with the operation's completion.
//!
//! Before sending createSnapshot, a create journals `cloud_snapshot_sent` with the ids of the volume's
//! snapshots that exist already (like a volume create). Interrupted before its job id was journaled, it adopts
//! the one snapshot of the volume outside that list (of the requested name, when it names one) instead of
//! taking a second one, and sends again only when there is none. A revert or delete interrupted that way is
//! sent again: reverting twice to the same snapshot ends in the same state, and deleting a snapshot that is
//! gone is the outcome asked for.
//!
//! A revert needs a detached volume: an attached one (recorded by the daemon or reported by the cloud) is
//! refused with `volume_attached` before anything is asked of the cloud, at submission and again in the
//! volume's turn. CloudStack itself refuses to revert a volume attached to a VM that is not stopped, and
//! the appliance, which serves its volumes, always runs.

use chrono::Utc;
use uuid::Uuid;
use volume_api::{SnapshotOperationRequest, SnapshotOperationResponse, VolumeSnapshot};

use super::journal::{
    json_of, Entry, SnapshotCreateStep, SnapshotDeleteStep, SnapshotRevertStep, Step,
};
use super::{Engine, EngineError, Inner};
use crate::cloud::{CloudErrorKind, CloudSnapshot};
use crate::store::SnapshotTracking;

/// `snapshot_status` after a snapshot is taken or tracked.
pub(crate) const STATUS_READY: &str = "ready";
/// `snapshot_status` after the volume was reverted to its tracked snapshot.
pub(crate) const STATUS_REVERTED: &str = "reverted";
/// `snapshot_status` when nothing is tracked.
pub(crate) const STATUS_NONE: &str = "none";
/// CloudStack's state of a snapshot that is taken.
const SNAPSHOT_BACKED_UP: &str = "BackedUp";
/// How often an adopted snapshot that is still being taken is looked at again.
const ADOPT_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// The refusal of a revert or delete naming a snapshot of `owner`, not of `volume_id`.
pub(super) fn another_volumes_snapshot(
    snapshot_id: &str,
    owner: &str,
    volume_id: Uuid,
) -> EngineError {
    EngineError::Invalid {
        field: "snapshot_id",
        message: format!(
            "snapshot {snapshot_id} is a snapshot of volume {owner}, not of {volume_id}"
        ),
    }
}

/// The refusal of a revert naming a snapshot CloudStack does not have.
pub(super) fn no_such_snapshot(snapshot_id: &str, volume_id: Uuid) -> EngineError {
    EngineError::NotFound(format!(
        "CloudStack has no snapshot {snapshot_id}; GET /api/v1/volumes/{volume_id}/snapshots lists them"
    ))
}

/// The refusal of a revert of an attached volume.
pub(super) fn attached(volume_id: Uuid, vm_id: &str) -> EngineError {
    EngineError::VolumeAttached(format!(
        "volume {volume_id} is attached to VM {vm_id}; a snapshot revert needs a detached volume: \
         detach it (POST /api/v1/volumes/{volume_id}/detach), revert, then attach it again"
    ))
}

/// The failure of a snapshot create whose job still ran at `snapshot_timeout`: CloudStack may still take the
/// snapshot, which then exists without the daemon's tracking; the message says where to find it.
fn still_taking(volume_id: Uuid, cause: crate::cloud::CloudError) -> EngineError {
    EngineError::Compensated {
        cause: Box::new(EngineError::Cloud(cause)),
        outcome: format!(
            "CloudStack may still take the snapshot, untracked: GET /api/v1/volumes/{volume_id}/snapshots lists \
             it once taken; track it (PUT /api/v1/snapshots/{volume_id}) or delete it (DELETE \
             /api/v1/volumes/{volume_id}/snapshots/ID) rather than taking another, and raise \
             snapshot_timeout_secs for volumes this large"
        ),
    }
}

impl Inner {
    fn snapshot_id_of(&self, request: &SnapshotOperationRequest) -> Result<String, EngineError> {
        request
            .snapshot_id
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| EngineError::Invalid {
                field: "snapshot_id",
                message: "the operation names no snapshot".into(),
            })
    }

    /// The volume's current tracking (the volume must be live).
    async fn tracking(&self, volume_id: Uuid) -> Result<SnapshotTracking, EngineError> {
        Ok(self.volume_record(volume_id).await?.snapshot)
    }

    pub(super) async fn snapshot_create(
        &self,
        op: &Entry<SnapshotOperationRequest, SnapshotCreateStep>,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let mut tracking = self.tracking(volume_id).await?;
        let vid = volume_id.to_string();
        let adopted =
            if op.cloud_job_id.is_none() && op.step == SnapshotCreateStep::CloudSnapshotSent {
                self.adopt_interrupted_snapshot(op).await?
            } else {
                None
            };
        let snap = match adopted {
            Some(snap) => snap,
            None => {
                let job = self
                    .start_or_resume_job(op, SnapshotCreateStep::CloudSnapshotJob, async {
                        let preexisting = self
                            .cloud
                            .snapshots_of(&vid)
                            .await?
                            .into_iter()
                            .map(|s| s.id)
                            .collect::<Vec<_>>();
                        // Writes the daemon acknowledged sit in the appliance's cache until flushed, out of the
                        // cloud's sight: a snapshot of the volume holds them only once they are on the device,
                        // whether or not the writer flushed.
                        self.exports.flush(volume_id).await?;
                        let sent = SnapshotCreateStep::CloudSnapshotSent.wire().as_str();
                        self.journal_step(
                            SnapshotCreateStep::KIND,
                            sent,
                            "journaling the send of a snapshot create",
                            || self.store.journal_create_send(op.id, sent, &preexisting),
                        )
                        .await?;
                        self.notify();
                        Ok(self
                            .cloud
                            .create_snapshot(&vid, op.request.name.as_deref())
                            .await?)
                    })
                    .await?;
                match self
                    .cloud
                    .wait_snapshot_job(&job, self.cfg.snapshot_timeout)
                    .await
                {
                    Ok(Some(s)) => s,
                    // The job's result says nothing, or the cloud forgot the job: a named snapshot is found
                    // by name.
                    Ok(None)
                    | Err(crate::cloud::CloudError {
                        kind: CloudErrorKind::NotFound,
                        ..
                    }) => {
                        self.find_named(volume_id, op.request.name.as_deref())
                            .await?
                    }
                    Err(e) if e.kind == CloudErrorKind::JobStillRunning => {
                        return Err(still_taking(volume_id, e))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        tracking.snapshot_id = Some(snap.id.clone());
        tracking.snapshot_name = Some(snap.name.clone());
        tracking.snapshot_status = Some(STATUS_READY.into());
        tracking.snapshot_created_at = Some(Utc::now());
        if let Some(ctx) = &op.request.vm_context_id {
            tracking.vm_context_id = Some(ctx.clone());
        }
        let response = SnapshotOperationResponse {
            volume_id,
            snapshot_id: snap.id.clone(),
            snapshot_name: Some(snap.name),
            snapshot_status: STATUS_READY.into(),
            message: format!("snapshot {} of volume {volume_id} taken", snap.id),
        };
        let response = json_of(&response);
        self.commit(op, || {
            self.store
                .commit_snapshot(op.id, volume_id, &tracking, &response)
        })
        .await?;
        tracing::info!(volume = %volume_id, snapshot = tracking.snapshot_id.as_deref().unwrap_or_default(), op = %op.id, "snapshot taken");
        Ok(())
    }

    /// Interrupted between journaling `cloud_snapshot_sent` and journaling createSnapshot's job: the one
    /// snapshot of the volume (of the requested name, when there is one) that is not in the journaled list of
    /// those that existed before, once CloudStack has backed it up; `None` when there is none (the request
    /// never reached the cloud, so it is sent again).
    async fn adopt_interrupted_snapshot(
        &self,
        op: &Entry<SnapshotOperationRequest, SnapshotCreateStep>,
    ) -> Result<Option<CloudSnapshot>, EngineError> {
        let volume_id = op.request.volume_id;
        let Some(preexisting) = self.store.create_preexisting(op.id).await? else {
            return Ok(None);
        };
        let new_ones = |all: Vec<CloudSnapshot>| {
            all.into_iter()
                .filter(|s| !preexisting.contains(&s.id))
                .filter(|s| op.request.name.as_deref().is_none_or(|n| s.name == n))
                .collect::<Vec<_>>()
        };
        let found = new_ones(self.cloud.snapshots_of(&volume_id.to_string()).await?);
        let snap = match found.as_slice() {
            [] => return Ok(None),
            [one] => one.clone(),
            many => {
                return Err(EngineError::Conflict(format!(
                    "interrupted while createSnapshot was in flight, and CloudStack now has {} new snapshots of \
                     volume {volume_id} ({}); keep the one this operation took, delete the others \
                     (DELETE /api/v1/volumes/{volume_id}/snapshots/ID), and take it again",
                    many.len(),
                    many.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", ")
                )))
            }
        };
        tracing::info!(op = %op.id, volume = %volume_id, snapshot = %snap.id, "adopted the snapshot an interrupted snapshot create took");
        let deadline = tokio::time::Instant::now() + self.cfg.snapshot_timeout;
        let mut snap = snap;
        while snap.state != SNAPSHOT_BACKED_UP {
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::CloudDisagrees(format!(
                    "snapshot {} of volume {volume_id} is still {} after {} s (snapshot_timeout_secs); check it in \
                     CloudStack",
                    snap.id,
                    snap.state,
                    self.cfg.snapshot_timeout.as_secs()
                )));
            }
            tokio::time::sleep(ADOPT_POLL).await;
            snap = self
                .cloud
                .get_snapshot(&snap.id)
                .await?
                .ok_or_else(|| {
                    EngineError::CloudDisagrees(format!(
                        "snapshot {} of volume {volume_id} disappeared while it was being taken; take it again",
                        snap.id
                    ))
                })?;
        }
        Ok(Some(snap))
    }

    async fn find_named(
        &self,
        volume_id: Uuid,
        name: Option<&str>,
    ) -> Result<CloudSnapshot, EngineError> {
        let lost = || {
            EngineError::CloudDisagrees(format!(
                "the snapshot job of volume {volume_id} ended without naming its snapshot; \
                 GET /api/v1/volumes/{volume_id}/snapshots lists what CloudStack has"
            ))
        };
        let Some(name) = name else {
            return Err(lost());
        };
        self.cloud
            .snapshots_of(&volume_id.to_string())
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(lost)
    }

    /// The snapshot a revert or delete names, checked in the volume's turn (the check at submission lets a
    /// request through when CloudStack does not answer in time): a snapshot of another volume is refused,
    /// so that an operation queued on one volume never reverts or deletes another volume's snapshot.
    /// `None` when CloudStack has no such snapshot.
    async fn snapshot_in_turn(
        &self,
        volume_id: Uuid,
        snapshot_id: &str,
    ) -> Result<Option<CloudSnapshot>, EngineError> {
        match self.cloud.get_snapshot(snapshot_id).await? {
            Some(s) if s.volume_id != volume_id.to_string() => Err(another_volumes_snapshot(
                snapshot_id,
                &s.volume_id,
                volume_id,
            )),
            found => Ok(found),
        }
    }

    pub(super) async fn snapshot_revert(
        &self,
        op: &Entry<SnapshotOperationRequest, SnapshotRevertStep>,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let snapshot_id = self.snapshot_id_of(&op.request)?;
        let mut tracking = self.tracking(volume_id).await?;
        if op.step != SnapshotRevertStep::CloudRevertJob {
            // Checked again in the volume's turn: an attach may have been queued before this revert.
            if let Some(att) = self.store.get_attachment(volume_id).await? {
                return Err(attached(volume_id, &att.vm_id));
            }
            if let Some(vm) = self.cloud_volume(volume_id).await?.and_then(|cv| cv.vm_id) {
                return Err(attached(volume_id, &vm));
            }
            match self.snapshot_in_turn(volume_id, &snapshot_id).await? {
                None => return Err(no_such_snapshot(&snapshot_id, volume_id)),
                Some(s) if s.state != SNAPSHOT_BACKED_UP => {
                    return Err(EngineError::Conflict(format!(
                        "snapshot {snapshot_id} is {}, not {SNAPSHOT_BACKED_UP}: revert to it once CloudStack has \
                         finished taking it",
                        s.state
                    )))
                }
                Some(_) => {}
            }
        }
        let job = self
            .start_or_resume_job(op, SnapshotRevertStep::CloudRevertJob, async {
                Ok(self.cloud.revert_snapshot(&snapshot_id).await?)
            })
            .await?;
        self.cloud
            .wait_snapshot_job(&job, self.cfg.snapshot_timeout)
            .await?;
        let tracked = tracking.snapshot_id.as_deref() == Some(snapshot_id.as_str());
        if tracked {
            tracking.snapshot_status = Some(STATUS_REVERTED.into());
        }
        let response = SnapshotOperationResponse {
            volume_id,
            snapshot_id: snapshot_id.clone(),
            snapshot_name: tracking.snapshot_name.clone().filter(|_| tracked),
            snapshot_status: tracking
                .snapshot_status
                .clone()
                .unwrap_or_else(|| STATUS_NONE.into()),
            message: format!("volume {volume_id} reverted to snapshot {snapshot_id}"),
        };
        let response = json_of(&response);
        self.commit(op, || {
            self.store
                .commit_snapshot(op.id, volume_id, &tracking, &response)
        })
        .await?;
        tracing::info!(volume = %volume_id, snapshot = %snapshot_id, op = %op.id, "volume reverted to its snapshot");
        Ok(())
    }

    pub(super) async fn snapshot_delete(
        &self,
        op: &Entry<SnapshotOperationRequest, SnapshotDeleteStep>,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let snapshot_id = self.snapshot_id_of(&op.request)?;
        let mut tracking = self.tracking(volume_id).await?;
        if op.step != SnapshotDeleteStep::CloudSnapshotDeleteJob {
            // A snapshot already gone is the outcome asked for (the deletion below says so).
            self.snapshot_in_turn(volume_id, &snapshot_id).await?;
        }
        let started = self
            .start_or_resume_job(op, SnapshotDeleteStep::CloudSnapshotDeleteJob, async {
                Ok(self.cloud.delete_snapshot(&snapshot_id).await?)
            })
            .await;
        let gone = match started {
            Ok(job) => match self
                .cloud
                .wait_snapshot_job(&job, self.cfg.snapshot_timeout)
                .await
            {
                Ok(_) => true,
                // A job the cloud forgot: the snapshot's absence says it was deleted.
                Err(e) if e.kind == CloudErrorKind::NotFound => {
                    self.cloud.get_snapshot(&snapshot_id).await?.is_none()
                }
                Err(e) => return Err(e.into()),
            },
            // Refused because it is gone already (deleted by another client, or by this operation before a
            // restart lost its job): its absence is the outcome asked for.
            Err(EngineError::Cloud(e))
                if matches!(
                    e.kind,
                    CloudErrorKind::NotFound | CloudErrorKind::InvalidParameter
                ) =>
            {
                if self.cloud.get_snapshot(&snapshot_id).await?.is_some() {
                    return Err(EngineError::Cloud(e));
                }
                true
            }
            Err(e) => return Err(e),
        };
        if !gone {
            return Err(EngineError::CloudDisagrees(format!(
                "the deleteSnapshot job of snapshot {snapshot_id} is unknown and CloudStack still lists the snapshot"
            )));
        }
        if tracking.snapshot_id.as_deref() == Some(snapshot_id.as_str()) {
            tracking.snapshot_id = None;
            tracking.snapshot_name = None;
            tracking.snapshot_created_at = None;
            tracking.snapshot_status = Some(STATUS_NONE.into());
        }
        let response = SnapshotOperationResponse {
            volume_id,
            snapshot_id: snapshot_id.clone(),
            snapshot_name: None,
            snapshot_status: tracking
                .snapshot_status
                .clone()
                .unwrap_or_else(|| STATUS_NONE.into()),
            message: format!("snapshot {snapshot_id} of volume {volume_id} deleted"),
        };
        let response = json_of(&response);
        self.commit(op, || {
            self.store
                .commit_snapshot(op.id, volume_id, &tracking, &response)
        })
        .await
    }
}

impl Engine {
    /// `GET /volumes/{id}/snapshots`: the cloud's snapshots of a volume the daemon knows, the tracked one
    /// marked.
    pub(crate) async fn volume_snapshots(
        &self,
        volume_id: Uuid,
    ) -> Result<Vec<VolumeSnapshot>, EngineError> {
        let rec = self.own_volume(volume_id).await?;
        let tracked = rec.snapshot.snapshot_id;
        Ok(self
            .inner
            .cloud
            .snapshots_of(&volume_id.to_string())
            .await?
            .into_iter()
            .map(|s| VolumeSnapshot {
                tracked: tracked.as_deref() == Some(s.id.as_str()),
                id: s.id,
                name: s.name,
                volume_id,
                state: s.state,
                created: s.created,
                size: s.size,
            })
            .collect())
    }

    /// Changes the volume's snapshot tracking in its turn (never between the steps of an operation on it);
    /// `NotFound` for an unknown or deleted volume.
    pub(crate) async fn update_snapshot_tracking(
        &self,
        volume_id: Uuid,
        change: impl FnOnce(&mut SnapshotTracking),
    ) -> Result<SnapshotTracking, EngineError> {
        self.in_turn(volume_id, async {
            let store = &self.inner.store;
            let mut t = self.own_volume(volume_id).await?.snapshot;
            change(&mut t);
            store.set_snapshot_tracking(volume_id, &t).await?;
            Ok(t)
        })
        .await
    }

    /// The record of a volume of this appliance that is not deleted: `OwnedElsewhere` for another appliance's
    /// volume (as every request naming a volume answers), `NotFound` for one nobody has.
    async fn own_volume(&self, volume_id: Uuid) -> Result<crate::store::VolumeRecord, EngineError> {
        match self.inner.store.get_volume(volume_id).await? {
            Some(v) if v.deleted_at.is_none() => Ok(v),
            Some(_) => Err(EngineError::NotFound(format!(
                "volume {volume_id} was deleted"
            ))),
            None => {
                self.inner.refuse_foreign(volume_id).await?;
                Err(EngineError::NotFound(format!(
                    "volume {volume_id} is not known to the daemon"
                )))
            }
        }
    }

    /// The volumes of a migration context with their attachments (the predecessor's `/snapshots/vm/…`).
    pub(crate) async fn context_volumes(
        &self,
        vm_context_id: &str,
    ) -> Result<
        Vec<(
            crate::store::VolumeRecord,
            Option<crate::store::AttachmentRecord>,
        )>,
        EngineError,
    > {
        let store = &self.inner.store;
        let mut out = Vec::new();
        for v in store.volumes_of_context(vm_context_id).await? {
            let a = store.get_attachment(v.id).await?;
            out.push((v, a));
        }
        Ok(out)
    }
}
