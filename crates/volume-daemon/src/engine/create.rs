//! The `create` workflow: createVolume (its job id journaled), then the volume record, in one commit. An entry
//! interrupted while createVolume was in flight adopts the one volume of that name the daemon does not know.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;
use volume_api::{CreateVolumeRequest, CreateVolumeResponse};

use super::journal::{json_of, CreateStep, Entry};
use super::validate::{create_size, validate_create};
use super::{EngineError, Inner};
use crate::cloud::NewCloudVolume;
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
                        self.step(op, CreateStep::CloudCreateSent).await?;
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
                    Some(v) => self.finish_job(&job_id, v).await?,
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
            cloudstack_state: cv.state,
            message: "volume created".into(),
        };
        self.store
            .commit_create(op.id, &rec, &json_of(&response))
            .await?;
        Ok(())
    }

    /// Interrupted between sending createVolume and journaling its answer: adopts the volume if the cloud has
    /// exactly one by that name that the daemon does not know; `None` when it never reached the cloud.
    async fn adopt_interrupted_create(
        &self,
        op: &Entry<CreateVolumeRequest, CreateStep>,
    ) -> Result<Option<Uuid>, EngineError> {
        let name = &op.request.name;
        let mut unknown = Vec::new();
        for v in self.cloud.volumes_named(name).await? {
            if let Ok(id) = Uuid::parse_str(&v.id) {
                if self.store.get_volume(id).await?.is_none() {
                    unknown.push(id);
                }
            }
        }
        match unknown.as_slice() {
            [one] => {
                self.store.set_operation_volume(op.id, *one).await?;
                Ok(Some(*one))
            }
            [] => Ok(None),
            _ => Err(EngineError::Conflict(format!(
                "interrupted while createVolume was in flight and CloudStack now has {} unknown volumes named {name:?}; \
                 delete the extra ones and create again",
                unknown.len(),
            ))),
        }
    }
}
