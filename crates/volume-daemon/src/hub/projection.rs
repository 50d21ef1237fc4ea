//! One hub change applied to the hub's tables, in one hub transaction, writing only what differs from what
//! the hub holds: applying a change a second time (after a crash between applying it and marking it
//! delivered) writes nothing.
//!
//! What is written, as the predecessor did:
//! - `device_mappings`: one row per attached volume, keyed by `volume_uuid`; deleted when it is detached.
//!   `operation_mode` is `oma` for the appliance and `failover` for any other VM, written when the row is
//!   inserted or moves to another VM (the hub's own later changes of it on the same attachment are kept).
//!   A volume attached to another VM has no appliance device: its `device_path` is the placeholder of
//!   [`remote_device_path`], unique per volume.
//! - `nbd_exports`: one row per served export (`migration-vol-<volume id>`, status `active`), with
//!   `device_mapping_uuid` naming the mapping; deleted when the export is.
//! - `ossea_volumes`: `status` and `device_path` of an existing row (attached / detached); never inserted.

use sqlx::mysql::MySql;
use sqlx::{Row, Transaction};
use uuid::Uuid;

use super::{q, within, Hub, HubError};
use crate::store::{AttachTarget, DiskRole, HubAttachment, HubChange, OsseaChange};

/// The `device_path` of a volume attached to a VM other than the appliance:
/// `remote-vm-<vm id>-vol-<volume id>` (`remote-vm-root-<vm id>-vol-<volume id>` for a root disk). It keeps
/// the predecessor's `remote-vm-` prefix (nothing local exists) and is unique, because it names the volume.
pub fn remote_device_path(vm_id: &str, volume_id: Uuid, role: DiskRole) -> String {
    match role {
        DiskRole::Root => format!("remote-vm-root-{vm_id}-vol-{volume_id}"),
        DiskRole::Data => format!("remote-vm-{vm_id}-vol-{volume_id}"),
    }
}

/// The device path the hub records for an attachment.
fn hub_device_path(volume_id: Uuid, a: &HubAttachment) -> String {
    match (a.target, &a.device_path) {
        (AttachTarget::Appliance, Some(p)) => p.clone(),
        // An appliance attachment always has a device; should one not, the placeholder keeps the row unique.
        _ => remote_device_path(&a.vm_id, volume_id, a.role),
    }
}

/// The `device_mappings` columns the daemon owns, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MappingRow {
    vm_id: String,
    operation_mode: String,
    cloudstack_device_id: Option<i64>,
    device_path: String,
    cloudstack_state: String,
    linux_state: String,
    size: i64,
    persistent_device_name: Option<String>,
    symlink_path: Option<String>,
}

fn mapping_row(volume_id: Uuid, size: u64, a: &HubAttachment) -> MappingRow {
    let appliance = a.target == AttachTarget::Appliance;
    MappingRow {
        vm_id: a.vm_id.clone(),
        operation_mode: if appliance { "oma" } else { "failover" }.into(),
        cloudstack_device_id: a.device_id.map(i64::from),
        device_path: hub_device_path(volume_id, a),
        cloudstack_state: "attached".into(),
        linux_state: if appliance { "detected" } else { "n/a" }.into(),
        size: if appliance {
            i64::try_from(size).unwrap_or(i64::MAX)
        } else {
            0
        },
        persistent_device_name: a.stable_name.as_deref().and_then(|p| {
            std::path::Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        }),
        symlink_path: a.stable_name.clone(),
    }
}

/// The `nbd_exports` columns the daemon owns, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportRow {
    export_name: String,
    port: i64,
    device_path: String,
    status: String,
    device_mapping_uuid: Option<String>,
}

/// What one application wrote (rows inserted, updated or deleted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub writes: u64,
}

type Tx = Transaction<'static, MySql>;

impl Hub {
    /// Applies one change in one hub transaction. `volume_context` says whether `ossea_volumes` has a
    /// `vm_context_id` to copy into new rows.
    pub async fn apply(
        &self,
        change: &HubChange,
        volume_context: bool,
    ) -> Result<Applied, HubError> {
        within("applying a change", self.apply_now(change, volume_context)).await
    }

    async fn apply_now(
        &self,
        change: &HubChange,
        volume_context: bool,
    ) -> Result<Applied, HubError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;
        let mut out = Applied::default();
        let volume = change.volume_id.to_string();
        let context = if volume_context {
            context_of(&mut tx, &volume).await?
        } else {
            None
        };
        match &change.attachment {
            Some(a) => {
                let row = mapping_row(change.volume_id, change.size_bytes, a);
                out.writes += upsert_mapping(&mut tx, &volume, &row, context.as_deref()).await?;
            }
            None => {
                out.writes += exec(
                    &mut tx,
                    OWN_EXPORT_ROWS_DELETE,
                    &[&volume, &volume_api::export_name(change.volume_id)],
                    "removing the export rows of a detached volume",
                )
                .await?;
                out.writes += exec(
                    &mut tx,
                    "DELETE FROM device_mappings WHERE volume_uuid = ?",
                    &[&volume],
                    "removing the mapping of a detached volume",
                )
                .await?;
            }
        }
        let export = match (&change.attachment, &change.export) {
            (Some(a), Some(e)) if a.target == AttachTarget::Appliance => Some(ExportRow {
                export_name: e.export_name.clone(),
                port: i64::from(self.nbd_port),
                device_path: e.device_path.clone(),
                status: "active".into(),
                device_mapping_uuid: Some(volume.clone()),
            }),
            _ => None,
        };
        out.writes += sync_export(
            &mut tx,
            change.volume_id,
            export.as_ref(),
            context.as_deref(),
        )
        .await?;
        match change.ossea {
            OsseaChange::Attached => {
                let path = change
                    .attachment
                    .as_ref()
                    .map(|a| hub_device_path(change.volume_id, a));
                out.writes += sqlx::query(
                    "UPDATE ossea_volumes SET device_path = ?, status = 'attached', updated_at = NOW(3) \
                     WHERE volume_id = ? AND NOT (status <=> 'attached' AND device_path <=> ?)",
                )
                .bind(path.clone())
                .bind(&volume)
                .bind(path)
                .execute(&mut *tx)
                .await
                .map_err(q("marking the hub's volume attached"))?
                .rows_affected();
            }
            OsseaChange::Detached => {
                out.writes += exec(
                    &mut tx,
                    "UPDATE ossea_volumes SET device_path = NULL, status = 'detached', updated_at = NOW(3) \
                     WHERE volume_id = ? AND NOT (status <=> 'detached' AND device_path IS NULL)",
                    &[&volume],
                    "marking the hub's volume detached",
                )
                .await?;
            }
            OsseaChange::Unchanged => {}
        }
        tx.commit().await.map_err(q("committing a hub change"))?;
        Ok(out)
    }
}

async fn exec(
    tx: &mut Tx,
    sql: &str,
    binds: &[&str],
    action: &'static str,
) -> Result<u64, HubError> {
    let mut query = sqlx::query(sql);
    for b in binds {
        query = query.bind(*b);
    }
    Ok(query
        .execute(&mut **tx)
        .await
        .map_err(q(action))?
        .rows_affected())
}

/// `ossea_volumes.vm_context_id` of the volume, as the predecessor copied it into new rows.
async fn context_of(tx: &mut Tx, volume: &str) -> Result<Option<String>, HubError> {
    let row = sqlx::query(
        "SELECT CAST(vm_context_id AS CHAR) AS ctx FROM ossea_volumes WHERE volume_id = ? LIMIT 1",
    )
    .bind(volume)
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("reading the volume's context"))?;
    Ok(row.and_then(|r| r.try_get::<Option<String>, _>("ctx").ok().flatten()))
}

/// Inserts or updates the volume's mapping; a row of another volume claiming the same device path is stale
/// (the daemon verified the device) and is removed first. Returns the rows written.
async fn upsert_mapping(
    tx: &mut Tx,
    volume: &str,
    row: &MappingRow,
    context: Option<&str>,
) -> Result<u64, HubError> {
    let mut writes = exec(
        tx,
        "DELETE FROM device_mappings WHERE device_path = ? AND volume_uuid <> ?",
        &[&row.device_path, volume],
        "removing a stale mapping of the same device path",
    )
    .await?;
    if writes > 0 {
        tracing::warn!(volume, device_path = %row.device_path, "the hub had another volume's mapping on this device path; it was removed");
    }
    // Integer columns are read through a cast: a hub may declare them UNSIGNED.
    let existing = sqlx::query(
        "SELECT CAST(vm_id AS CHAR) AS vm_id, CAST(operation_mode AS CHAR) AS operation_mode, \
         CAST(cloudstack_device_id AS SIGNED) AS cloudstack_device_id, CAST(device_path AS CHAR) AS device_path, \
         CAST(cloudstack_state AS CHAR) AS cloudstack_state, CAST(linux_state AS CHAR) AS linux_state, \
         CAST(size AS SIGNED) AS size, CAST(persistent_device_name AS CHAR) AS persistent_device_name, \
         CAST(symlink_path AS CHAR) AS symlink_path \
         FROM device_mappings WHERE volume_uuid = ? FOR UPDATE",
    )
    .bind(volume)
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("reading the volume's mapping"))?;
    // A column left NULL (by hand, or by an older writer) reads as empty, unlike what is wanted, and is
    // written.
    let read = |r: &sqlx::mysql::MySqlRow| -> Result<MappingRow, sqlx::Error> {
        let text = |c: &str| -> Result<String, sqlx::Error> {
            Ok(r.try_get::<Option<String>, _>(c)?.unwrap_or_default())
        };
        Ok(MappingRow {
            vm_id: text("vm_id")?,
            operation_mode: r
                .try_get::<Option<String>, _>("operation_mode")?
                .unwrap_or_default(),
            cloudstack_device_id: r.try_get::<Option<i64>, _>("cloudstack_device_id")?,
            device_path: text("device_path")?,
            cloudstack_state: text("cloudstack_state")?,
            linux_state: text("linux_state")?,
            size: r.try_get::<Option<i64>, _>("size")?.unwrap_or(-1),
            persistent_device_name: r.try_get("persistent_device_name")?,
            symlink_path: r.try_get("symlink_path")?,
        })
    };
    match existing {
        None => {
            sqlx::query(
                "INSERT INTO device_mappings (volume_uuid, vm_id, operation_mode, cloudstack_device_id, \
                 device_path, cloudstack_state, linux_state, size, persistent_device_name, symlink_path, \
                 vm_context_id, last_sync, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NOW(), NOW(), NOW())",
            )
            .bind(volume)
            .bind(&row.vm_id)
            .bind(&row.operation_mode)
            .bind(row.cloudstack_device_id)
            .bind(&row.device_path)
            .bind(&row.cloudstack_state)
            .bind(&row.linux_state)
            .bind(row.size)
            .bind(&row.persistent_device_name)
            .bind(&row.symlink_path)
            .bind(context)
            .execute(&mut **tx)
            .await
            .map_err(q("inserting the volume's mapping"))?;
            writes += 1;
        }
        Some(r) => {
            let have = read(&r).map_err(q("reading the volume's mapping"))?;
            // The hub flips operation_mode itself during failover: it is the daemon's to write only when the
            // attachment moves to another VM.
            let mode = if have.vm_id == row.vm_id {
                have.operation_mode.clone()
            } else {
                row.operation_mode.clone()
            };
            let want = MappingRow {
                operation_mode: mode,
                ..row.clone()
            };
            if want != have {
                sqlx::query(
                    "UPDATE device_mappings SET vm_id = ?, operation_mode = ?, cloudstack_device_id = ?, \
                     device_path = ?, cloudstack_state = ?, linux_state = ?, size = ?, \
                     persistent_device_name = ?, symlink_path = ?, last_sync = NOW(), updated_at = NOW() \
                     WHERE volume_uuid = ?",
                )
                .bind(&want.vm_id)
                .bind(&want.operation_mode)
                .bind(want.cloudstack_device_id)
                .bind(&want.device_path)
                .bind(&want.cloudstack_state)
                .bind(&want.linux_state)
                .bind(want.size)
                .bind(&want.persistent_device_name)
                .bind(&want.symlink_path)
                .bind(volume)
                .execute(&mut **tx)
                .await
                .map_err(q("updating the volume's mapping"))?;
                writes += 1;
            }
        }
    }
    Ok(writes)
}

/// Deletes a volume's export rows: those naming it, and a row without `volume_id` (NULL, or the column's
/// default '') under its export name (a predecessor's, or one written by hand), which is the volume's as
/// surely.
const OWN_EXPORT_ROWS_DELETE: &str = "DELETE FROM nbd_exports WHERE volume_id = ? \
     OR ((volume_id IS NULL OR volume_id = '') AND export_name = ?)";

/// Makes the volume's export rows `want` (one row) or none. Returns the rows written.
async fn sync_export(
    tx: &mut Tx,
    volume_id: Uuid,
    want: Option<&ExportRow>,
    context: Option<&str>,
) -> Result<u64, HubError> {
    let volume = &volume_id.to_string();
    let Some(want) = want else {
        return exec(
            tx,
            OWN_EXPORT_ROWS_DELETE,
            &[volume, &volume_api::export_name(volume_id)],
            "removing the volume's export rows",
        )
        .await;
    };
    // Rows of this volume under another name, and a row of another volume under this name, are stale. A
    // row under this name without `volume_id` (NULL or '') is this volume's: it is taken over below, with
    // `volume_id` set.
    let mut writes = exec(
        tx,
        "DELETE FROM nbd_exports WHERE (volume_id = ? AND export_name <> ?) \
         OR (export_name = ? AND volume_id <> ? AND volume_id <> '')",
        &[volume, &want.export_name, &want.export_name, volume],
        "removing stale export rows",
    )
    .await?;
    // Integer columns are read through a cast: a hub may declare them UNSIGNED.
    let existing = sqlx::query(
        "SELECT CAST(export_name AS CHAR) AS export_name, CAST(port AS SIGNED) AS port, \
         CAST(device_path AS CHAR) AS device_path, CAST(status AS CHAR) AS status, \
         CAST(device_mapping_uuid AS CHAR) AS device_mapping_uuid, CAST(volume_id AS CHAR) AS volume_id \
         FROM nbd_exports WHERE export_name = ? FOR UPDATE",
    )
    .bind(&want.export_name)
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("reading the volume's export row"))?;
    match existing {
        None => {
            sqlx::query(
                "INSERT INTO nbd_exports (vm_context_id, volume_id, device_mapping_uuid, export_name, port, \
                 device_path, config_path, status, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, '', ?, NOW(3), NOW(3))",
            )
            .bind(context)
            .bind(volume)
            .bind(&want.device_mapping_uuid)
            .bind(&want.export_name)
            .bind(want.port)
            .bind(&want.device_path)
            .bind(&want.status)
            .execute(&mut **tx)
            .await
            .map_err(q("inserting the volume's export row"))?;
            writes += 1;
        }
        Some(r) => {
            let (have, owner) = (|| -> Result<(ExportRow, Option<String>), sqlx::Error> {
                Ok((
                    // A column left NULL reads as unlike what is wanted, and is written.
                    ExportRow {
                        export_name: r.try_get("export_name")?,
                        port: r.try_get::<Option<i64>, _>("port")?.unwrap_or(-1),
                        device_path: r
                            .try_get::<Option<String>, _>("device_path")?
                            .unwrap_or_default(),
                        status: r
                            .try_get::<Option<String>, _>("status")?
                            .unwrap_or_default(),
                        device_mapping_uuid: r.try_get("device_mapping_uuid")?,
                    },
                    r.try_get("volume_id")?,
                ))
            })()
            .map_err(q("reading the volume's export row"))?;
            if &have != want || owner.as_deref() != Some(volume.as_str()) {
                sqlx::query(
                    "UPDATE nbd_exports SET volume_id = ?, port = ?, device_path = ?, status = ?, \
                     device_mapping_uuid = ?, updated_at = NOW(3) WHERE export_name = ?",
                )
                .bind(volume)
                .bind(want.port)
                .bind(&want.device_path)
                .bind(&want.status)
                .bind(&want.device_mapping_uuid)
                .bind(&want.export_name)
                .execute(&mut **tx)
                .await
                .map_err(q("updating the volume's export row"))?;
                writes += 1;
            }
        }
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_placeholders_are_unique_per_volume() {
        let vm = "5d2b6c7e-1111-2222-3333-444455556666";
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        assert_ne!(
            remote_device_path(vm, a, DiskRole::Data),
            remote_device_path(vm, b, DiskRole::Data)
        );
        assert_eq!(
            remote_device_path(vm, a, DiskRole::Root),
            format!("remote-vm-root-{vm}-vol-{a}")
        );
        assert!(remote_device_path(vm, a, DiskRole::Data).len() <= 255);
    }
}
