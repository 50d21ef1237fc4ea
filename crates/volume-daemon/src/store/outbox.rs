//! The hub outbox: what each committed change of a volume's attachment or export means for the hub's tables,
//! written in the same transaction as the change (so a crash never keeps one without the other), and read
//! back in commit order by the delivery task (`crate::hub`).
//!
//! A row carries the volume's state as committed, not a delta: applying one twice gives what applying it once
//! gives. Rows of one volume are written in the order of its operations (they run one at a time, in the
//! volume's turn), so delivering in `seq` order never reorders a volume's changes.

use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use uuid::Uuid;

use super::rows::{now, Reader};
use super::{
    attachment_from_row, cols, export_from_row, q, Dialect, Store, StoreError, ATTACHMENT_COLS,
    EXPORT_COLS, EXPORT_COUNTER_COLS,
};
use crate::store::records::{AttachTarget, DiskRole};

/// What a change does to the hub's `ossea_volumes` row of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OsseaChange {
    /// `status = 'attached'` with the device path (attach).
    Attached,
    /// `status = 'detached'`, no device path (detach, or delete of an attached volume).
    Detached,
    /// Left as it is (an export re-served or dropped, a delete of a detached volume).
    Unchanged,
}

/// A volume's attachment as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubAttachment {
    pub vm_id: String,
    pub target: AttachTarget,
    pub role: DiskRole,
    pub device_id: Option<u32>,
    /// The appliance device path the API reports (`/dev/disk/by-id/virtio-…`, else the kernel device).
    pub device_path: Option<String>,
    /// The stable name's path.
    pub stable_name: Option<String>,
}

/// A volume's export as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubExport {
    pub export_name: String,
    pub device_path: String,
}

/// One outbox row's payload: the volume's state after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubChange {
    pub volume_id: Uuid,
    pub size_bytes: u64,
    pub attachment: Option<HubAttachment>,
    pub export: Option<HubExport>,
    pub ossea: OsseaChange,
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: i64,
    pub change: HubChange,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub attempts: u64,
    pub last_error: Option<String>,
}

/// How much is waiting for the hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxBacklog {
    pub pending: u64,
    pub oldest_created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads the volume's attachment and export inside the transaction (after the change) and journals the
/// hub change; does nothing while the outbox is off. `ossea` says what the change means for `ossea_volumes`.
pub(super) async fn record_in(
    store: &Store,
    conn: &mut AnyConnection,
    volume_id: Uuid,
    ossea: OsseaChange,
) -> Result<(), StoreError> {
    if store.hub_outbox.is_none() {
        return Ok(());
    }
    let d: Dialect = store.dialect;
    let id = volume_id.to_string();
    let sql = d.sql(&format!(
        "SELECT {} FROM attachments WHERE volume_id = ?",
        cols(&ATTACHMENT_COLS)
    ));
    let attachment = sqlx::query(&sql)
        .bind(id.clone())
        .fetch_optional(&mut *conn)
        .await
        .map_err(q("reading an attachment for the hub outbox"))?
        .map(|r| attachment_from_row(&r))
        .transpose()?;
    let sql = d.sql(&format!(
        "SELECT {}, {} FROM exports WHERE volume_id = ?",
        cols(&EXPORT_COLS),
        cols(&EXPORT_COUNTER_COLS)
    ));
    let export = sqlx::query(&sql)
        .bind(id.clone())
        .fetch_optional(&mut *conn)
        .await
        .map_err(q("reading an export for the hub outbox"))?
        .map(|r| export_from_row(&r))
        .transpose()?;
    let sql = d.sql("SELECT id, size_bytes FROM volumes WHERE id = ?");
    let size_bytes = match sqlx::query(&sql)
        .bind(id.clone())
        .fetch_optional(&mut *conn)
        .await
        .map_err(q("reading a volume for the hub outbox"))?
    {
        Some(row) => Reader::new(&row, "volumes", "id").u64("size_bytes")?,
        None => 0,
    };
    let change = HubChange {
        volume_id,
        size_bytes,
        attachment: attachment.map(|a| HubAttachment {
            device_path: a.by_id_path.clone().or_else(|| a.kernel_device.clone()),
            vm_id: a.vm_id,
            target: a.target,
            role: a.role,
            device_id: a.device_id,
            stable_name: a.stable_name,
        }),
        export: export.map(|e| HubExport {
            export_name: e.export_name,
            device_path: e.device_path,
        }),
        ossea,
    };
    let payload = serde_json::to_string(&change).map_err(|e| StoreError::Corrupt {
        what: format!("the hub change of volume {volume_id}"),
        detail: e.to_string(),
    })?;
    let sql = d.sql(
        "INSERT INTO hub_outbox (volume_id, payload, created_at, attempts, appliance_id) \
         VALUES (?, ?, ?, 0, ?)",
    );
    sqlx::query(&sql)
        .bind(id)
        .bind(payload)
        .bind(now())
        .bind(store.owner().to_string())
        .execute(&mut *conn)
        .await
        .map_err(q("journaling a hub change"))?;
    Ok(())
}

impl Store {
    /// Turns the hub outbox on: from now on every committed change of an attachment or export also journals
    /// its hub change. Returns what commits notify (after they commit) so that delivery starts at once.
    pub fn enable_hub_outbox(&mut self) -> std::sync::Arc<tokio::sync::Notify> {
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        self.hub_outbox = Some(std::sync::Arc::clone(&notify));
        notify
    }

    /// Whether commits journal hub changes.
    pub fn hub_outbox_enabled(&self) -> bool {
        self.hub_outbox.is_some()
    }

    /// Wakes the delivery task after a commit that may have journaled a hub change.
    pub(super) fn outbox_committed(&self) {
        if let Some(n) = &self.hub_outbox {
            n.notify_one();
        }
    }

    /// Journals each volume's current state as a hub change, all in one transaction: for start-up and
    /// import, where no operation commits with them. Does nothing while the outbox is off.
    pub async fn record_hub_states(
        &self,
        changes: &[(Uuid, OsseaChange)],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for (volume_id, ossea) in changes {
            record_in(self, &mut tx, *volume_id, *ossea).await?;
        }
        tx.commit().await.map_err(q("committing hub changes"))?;
        self.outbox_committed();
        Ok(())
    }

    /// Undelivered rows of this store's appliance, oldest first, at most `limit`.
    pub async fn pending_hub_changes(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT seq, volume_id, payload, created_at, attempts, last_error FROM hub_outbox \
             WHERE delivered_at IS NULL AND appliance_id = ? ORDER BY seq ASC LIMIT {limit}"
        ));
        let rows = sqlx::query(&sql)
            .bind(self.owner().to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(q("reading the hub outbox"))?;
        rows.iter()
            .map(|row| {
                let r = Reader::new(row, "hub_outbox", "volume_id");
                let payload = r.text("payload")?;
                let volume = r.text("volume_id")?;
                let change: HubChange =
                    serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt {
                        what: format!("hub outbox row of volume {volume}"),
                        detail: e.to_string(),
                    })?;
                Ok(OutboxEntry {
                    seq: r.i64("seq")?,
                    change,
                    created_at: r.ts("created_at")?,
                    attempts: r.u64("attempts")?,
                    last_error: r.opt_text("last_error")?,
                })
            })
            .collect()
    }

    /// Marks a row delivered (once; marking it again changes nothing). Under the lease, like every write.
    pub async fn mark_hub_change_delivered(&self, seq: i64) -> Result<(), StoreError> {
        let sql = self.dialect.sql(
            "UPDATE hub_outbox SET delivered_at = ?, last_error = NULL WHERE seq = ? AND delivered_at IS NULL",
        );
        let mut tx = self.begin_write().await?;
        sqlx::query(&sql)
            .bind(now())
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(q("marking a hub change delivered"))?;
        tx.commit()
            .await
            .map_err(q("committing a hub change's delivery"))
    }

    /// Records a failed delivery attempt of a row.
    pub async fn note_hub_change_failed(&self, seq: i64, error: &str) -> Result<(), StoreError> {
        let sql = self.dialect.sql(
            "UPDATE hub_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ? AND delivered_at IS NULL",
        );
        sqlx::query(&sql)
            .bind(storable(error))
            .bind(seq)
            .execute(&self.pool)
            .await
            .map_err(q("recording a failed hub delivery"))?;
        Ok(())
    }

    /// How many rows wait and since when.
    pub async fn hub_backlog(&self) -> Result<OutboxBacklog, StoreError> {
        let sql = self.dialect.sql(
            "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest FROM hub_outbox \
             WHERE delivered_at IS NULL AND appliance_id = ?",
        );
        let row = sqlx::query(&sql)
            .bind(self.owner().to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting pending hub changes"))?;
        let r = Reader::new(&row, "hub_outbox", "pending");
        Ok(OutboxBacklog {
            pending: u64::try_from(r.i64("pending")?).unwrap_or(0),
            oldest_created_at: r.opt_ts("oldest")?,
        })
    }

    /// Drops delivered rows older than `before` (they are kept a while to be read when investigating).
    pub async fn prune_hub_outbox(
        &self,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError> {
        let sql = self
            .dialect
            .sql("DELETE FROM hub_outbox WHERE delivered_at IS NOT NULL AND delivered_at < ? AND appliance_id = ?");
        let res = sqlx::query(&sql)
            .bind(super::rows::ts(before))
            .bind(self.owner().to_string())
            .execute(&self.pool)
            .await
            .map_err(q("pruning the hub outbox"))?;
        Ok(res.rows_affected())
    }
}

/// An error text every database stores: control characters escaped, at most 2000 characters.
fn storable(text: &str) -> String {
    text.chars()
        .take(2000)
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
