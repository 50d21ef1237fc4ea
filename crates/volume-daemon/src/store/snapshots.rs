//! The snapshot tracking kept on volume records: written with a snapshot operation's completion, changed by
//! the predecessor's bookkeeping routes, and read per migration context (`vm_context_id`).

use serde_json::Value;
use uuid::Uuid;

use super::rows::{now, opt_ts};
use super::VOLUME_COLS;
use super::{
    cols, q, volume_from_row, OpStatus, SnapshotTracking, Store, StoreError, VolumeRecord,
};

const SET_TRACKING: &str =
    "UPDATE volumes SET snapshot_id = ?, snapshot_name = ?, snapshot_status = ?, \
                            vm_context_id = ?, snapshot_created_at = ?, updated_at = ? \
                            WHERE id = ? AND appliance_id = ? AND deleted_at IS NULL";

impl Store {
    async fn set_tracking_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        volume_id: Uuid,
        t: &SnapshotTracking,
    ) -> Result<bool, StoreError> {
        let sql = self.dialect.sql(SET_TRACKING);
        let res = sqlx::query(&sql)
            .bind(t.snapshot_id.clone())
            .bind(t.snapshot_name.clone())
            .bind(t.snapshot_status.clone())
            .bind(t.vm_context_id.clone())
            .bind(opt_ts(t.snapshot_created_at))
            .bind(now())
            .bind(volume_id.to_string())
            .bind(self.owner().to_string())
            .execute(conn)
            .await
            .map_err(q("writing the snapshot tracking of a volume"))?;
        Ok(res.rows_affected() > 0)
    }

    /// Replaces the snapshot tracking of a live volume; false when there is no such live volume.
    pub async fn set_snapshot_tracking(
        &self,
        volume_id: Uuid,
        t: &SnapshotTracking,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let changed = self.set_tracking_in(&mut tx, volume_id, t).await?;
        tx.commit()
            .await
            .map_err(q("committing the snapshot tracking of a volume"))?;
        Ok(changed)
    }

    /// Records the volume's snapshot tracking and completes the snapshot operation with `response`, in one
    /// transaction.
    pub async fn commit_snapshot(
        &self,
        op_id: Uuid,
        volume_id: Uuid,
        t: &SnapshotTracking,
        response: &Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.require_unfinished(&mut tx, op_id, self.dialect.for_update())
            .await?;
        self.set_tracking_in(&mut tx, volume_id, t).await?;
        self.finish_in(&mut tx, op_id, OpStatus::Completed, Some(response), None)
            .await?;
        tx.commit()
            .await
            .map_err(q("committing a snapshot operation"))
    }

    /// The live volumes of a migration context, oldest first.
    pub async fn volumes_of_context(
        &self,
        vm_context_id: &str,
    ) -> Result<Vec<VolumeRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {} FROM volumes WHERE vm_context_id = ? AND appliance_id = ? AND deleted_at IS NULL \
             ORDER BY created_at ASC, id ASC",
            cols(&VOLUME_COLS)
        ));
        sqlx::query(&sql)
            .bind(vm_context_id.to_string())
            .bind(self.owner().to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing the volumes of a migration context"))?
            .iter()
            .map(volume_from_row)
            .collect()
    }
}
