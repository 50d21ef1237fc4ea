//! The `delete` workflow: the detach steps when attached, then deleteVolume, then the commit that leaves the
//! volume's tombstone (a volume the daemon never recorded gets one too, so its id stays known as deleted).

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;
use volume_api::{DeleteVolumeResponse, VolumeOperationRequest};

use super::detach::DetachOutcome;
use super::journal::{json_of, DeleteStep, Entry};
use super::{EngineError, Inner};
use crate::cloud::CloudErrorKind;
use crate::store::VolumeRecord;

impl Inner {
    pub(super) async fn delete(
        &self,
        op: &Entry<VolumeOperationRequest, DeleteStep>,
    ) -> Result<(), EngineError> {
        let volume_id = op.request.volume_id;
        let out = if op.step == DeleteStep::CloudDeleteSent {
            DetachOutcome::NOT_ATTACHED
        } else {
            self.detach_steps(op, volume_id).await?
        };
        // The cloud detached it: the records say so at once, so that a deleteVolume that fails (refused, or
        // the cloud gone for longer than the operation waits) leaves a detached volume, as the cloud has it.
        if out.was_attached {
            self.store.clear_attachment(volume_id).await?;
        }
        self.step(op, DeleteStep::CloudDeleteSent).await?;
        let existed = match self.cloud.delete_volume(&volume_id.to_string()).await {
            Ok(b) => b,
            Err(e) if e.kind == CloudErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        if self.store.get_volume(volume_id).await?.is_none() {
            // Never recorded (a foreign volume): keep a tombstone so that the id stays known as deleted.
            if let Err(e) = self.tombstone(volume_id).await {
                tracing::warn!(volume = %volume_id, error = %crate::error_chain(&e), "cannot record the deleted volume");
            }
        }
        let mut message = if existed {
            "volume deleted".to_string()
        } else {
            "volume was already gone from CloudStack".to_string()
        };
        // CloudStack keeps a deleted volume's snapshots, and no route of the daemon shows them once the
        // volume is deleted: the answer names them (best effort: a listing that fails names none).
        if let Ok(left) = self.cloud.snapshots_of(&volume_id.to_string()).await {
            if !left.is_empty() {
                let ids = left.iter().map(|s| s.id.as_str()).collect::<Vec<_>>();
                message.push_str(&format!(
                    "; CloudStack keeps its {} snapshot(s) ({}): delete them in CloudStack once they are no \
                     longer needed",
                    ids.len(),
                    ids.join(", ")
                ));
            }
        }
        let response = DeleteVolumeResponse {
            volume_id,
            detached_from: out.vm_id,
            message,
        };
        let response = json_of(&response);
        self.commit(op, || self.store.commit_delete(op.id, volume_id, &response))
            .await
    }

    async fn tombstone(&self, volume_id: Uuid) -> Result<(), EngineError> {
        let now = Utc::now();
        self.store
            .upsert_volume(&VolumeRecord {
                id: volume_id,
                name: String::new(),
                size_bytes: 0,
                disk_offering_id: String::new(),
                zone_id: String::new(),
                metadata: json!({}),
                cloud_state: None,
                snapshot: Default::default(),
                created_at: now,
                updated_at: now,
                deleted_at: None,
            })
            .await?;
        Ok(())
    }
}
