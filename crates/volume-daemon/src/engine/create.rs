//! The `create` workflow: createVolume (its job id journaled), then the volume record, in one commit. Before
//! sending, the ids of the cloud volumes that already carry the name are journaled with the
//! `cloud_create_sent` step; an entry interrupted while createVolume was in flight adopts only a volume of that
//! name outside that list (so never one that existed before its request), and sends again when there is none.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;
use volume_api::{CreateVolumeRequest, CreateVolumeResponse};

use super::journal::{json_of, CreateStep, Entry, Step};
use super::validate::{create_size, validate_create};
use super::{EngineError, Inner};
use crate::cloud::{CloudError, CloudErrorKind, NewCloudVolume};
use crate::store::VolumeRecord;

/// The cloud's name of a volume as a UUID.
fn volume_uuid(name: &str) -> Result<Uuid, EngineError> {
    Uuid::parse_str(name).map_err(|_| {
        EngineError::CloudDisagrees(format!(
            "CloudStack named the new volume {name:?}, which is not a UUID"
        ))
    })
}

impl Inner {
    pub(super) async fn create(
        &self,
        op: &Entry<CreateVolumeRequest, CreateStep>,
    ) -> Result<(), EngineError> {
        let c = &op.request;
        validate_create(c)?;
        let offering = self.disk_offering(&c.disk_offering_id).await?;
        let (size_sent, size) = create_size(c, &offering)?;
        let mut volume_id = op.volume_id;
        if volume_id.is_none()
            && op.cloud_job_id.is_none()
            && op.step == CreateStep::CloudCreateSent
        {
            volume_id = self.adopt_interrupted_create(op).await?;
        }
        let cv = match (volume_id, &op.cloud_job_id) {
            // Adopted: nothing to wait for.
            (Some(v), None) => self.cloud_volume(v).await?,
            _ => {
                let job_id = self
                    .start_or_resume_job_of(op, CreateStep::CloudCreateJob, async {
                        let preexisting = self
                            .cloud
                            .volumes_named(&c.name)
                            .await?
                            .into_iter()
                            .map(|v| v.id)
                            .collect::<Vec<_>>();
                        let sent = CreateStep::CloudCreateSent.wire().as_str();
                        self.journal_step(
                            CreateStep::KIND,
                            sent,
                            "journaling the send of a create",
                            || self.store.journal_create_send(op.id, sent, &preexisting),
                        )
                        .await?;
                        self.notify();
                        let job = self
                            .cloud
                            .create_volume(&NewCloudVolume {
                                name: c.name.clone(),
                                disk_offering_id: c.disk_offering_id.clone(),
                                zone_id: c.zone_id.clone(),
                                size_bytes: size_sent,
                            })
                            .await?;
                        // The volume is journaled with the job id, in the same write.
                        let named = job.resource_id.as_deref().map(volume_uuid).transpose()?;
                        if named.is_some() {
                            volume_id = named;
                        }
                        Ok((job, named))
                    })
                    .await?;
                match volume_id {
                    Some(v) => match self.finish_job(&job_id, v).await {
                        // A job that failed, or still runs at the deadline: the operation fails, and the
                        // volume CloudStack made when it accepted the call must not outlive it unrecorded.
                        Err(EngineError::Cloud(e))
                            if e.is_failed_job() || e.kind == CloudErrorKind::JobStillRunning =>
                        {
                            return Err(self.remove_failed_create(v, e).await);
                        }
                        other => other?,
                    },
                    None => self.cloud.wait_job(&job_id, self.cfg.job_timeout).await?,
                }
            }
        };
        let cv = cv.ok_or_else(|| {
            EngineError::CloudDisagrees("CloudStack finished createVolume without a volume".into())
        })?;
        let id = volume_uuid(&cv.id)?;
        let now = Utc::now();
        let rec = VolumeRecord {
            id,
            name: c.name.clone(),
            size_bytes: if cv.size > 0 { cv.size } else { size },
            disk_offering_id: c.disk_offering_id.clone(),
            zone_id: c.zone_id.clone(),
            metadata: match &c.metadata {
                Some(m) => json_of(m),
                None => json!({}),
            },
            cloud_state: Some(cv.state.clone()),
            snapshot: Default::default(),
            created_at: now,
            updated_at: now,
            deleted_at: None,
        };
        let response = CreateVolumeResponse {
            volume_id: id,
            size: rec.size_bytes,
            cloudstack_state: cv.state.as_str().into(),
            message: "volume created".into(),
        };
        let response = json_of(&response);
        self.commit(op, || self.store.commit_create(op.id, &rec, &response))
            .await
    }

    /// After the createVolume job failed, or still ran at `job_timeout`: deletes the volume CloudStack made
    /// when the call was accepted (it is no one's: the daemon records a volume only when the create
    /// completes, so a volume left behind would be a leak no listing shows), and returns the job's failure
    /// with what became of that volume. Run again (a resumed entry meets the same job), it finds the volume
    /// gone.
    async fn remove_failed_create(&self, volume_id: Uuid, cause: CloudError) -> EngineError {
        let outcome = match self.cloud_volume(volume_id).await {
            Ok(None) => return EngineError::Cloud(cause),
            Ok(Some(_)) => {
                self.metrics.compensated();
                match self.cloud.delete_volume(&volume_id.to_string()).await {
                    Ok(_) => format!("volume {volume_id}, which CloudStack made for this create, was deleted"),
                    Err(e) => format!(
                        "volume {volume_id}, which CloudStack made for this create, could not be deleted: {}; \
                         delete it in CloudStack",
                        e.chain()
                    ),
                }
            }
            Err(e) => format!(
                "whether CloudStack still has volume {volume_id}, made for this create, is unknown ({}); \
                 delete it in CloudStack if it is listed",
                crate::error_chain(&e)
            ),
        };
        EngineError::Compensated {
            cause: Box::new(EngineError::Cloud(cause)),
            outcome,
        }
    }

    /// Interrupted between journaling `cloud_create_sent` and journaling createVolume's answer: adopts the one
    /// volume of the name that neither existed before the request (the journaled list) nor is known to the
    /// daemon; `None` when there is none (the request never reached the cloud, so it is sent again).
    async fn adopt_interrupted_create(
        &self,
        op: &Entry<CreateVolumeRequest, CreateStep>,
    ) -> Result<Option<Uuid>, EngineError> {
        let name = &op.request.name;
        let preexisting = self.store.create_preexisting(op.id).await?;
        let mut candidates = Vec::new();
        for v in self.cloud.volumes_named(name).await? {
            if preexisting.as_ref().is_some_and(|p| p.contains(&v.id)) {
                continue;
            }
            if let Ok(id) = Uuid::parse_str(&v.id) {
                if self.store.get_volume(id).await?.is_none() {
                    candidates.push(id);
                }
            }
        }
        let list = || {
            candidates
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (preexisting.is_some(), candidates.as_slice()) {
            (_, []) => Ok(None),
            (true, [one]) => {
                self.store.set_operation_volume(op.id, *one).await?;
                tracing::info!(op = %op.id, volume = %one, "adopted the volume an interrupted create made");
                Ok(Some(*one))
            }
            (true, _) => Err(EngineError::Conflict(format!(
                "interrupted while createVolume was in flight, and CloudStack now has {} new volumes named {name:?} \
                 ({}); keep the one this create made, delete the others, and create again",
                candidates.len(),
                list(),
            ))),
            (false, _) => Err(EngineError::Conflict(format!(
                "interrupted while createVolume was in flight, journaled without the list of volumes that existed \
                 before it, so it cannot prove which of the volumes named {name:?} unknown to the daemon ({}) it \
                 made; check them in CloudStack, delete the one it made if any, and create again",
                list(),
            ))),
        }
    }
}
