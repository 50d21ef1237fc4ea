//! The daemon's persistent state: migrations and one store over SQLite, PostgreSQL and MariaDB.
//!
//! [`Store`] is written once against sqlx's `Any` driver; what differs between the databases (URLs,
//! placeholders, upserts, row locks, migrations) lives in [`dialect`]. Every `commit_*` call is one
//! transaction that writes a state change and completes its operation together, so a crash never leaves a
//! state change without its journal entry (or the reverse).

mod dialect;
mod error;
mod lease;
mod outbox;
mod records;
mod rows;
mod snapshots;

use std::sync::{Arc, Once};
use std::time::Duration;

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Executor as _};
use uuid::Uuid;

pub use dialect::{redact as redact_url, Dialect};
pub use error::{StoreError, StoreErrorKind};
pub use lease::{Lease, LeaseHolder, LeaseRecord};
pub use outbox::{HubAttachment, HubChange, HubExport, OsseaChange, OutboxBacklog, OutboxEntry};
pub use records::{
    ApplianceRecord, AttachTarget, AttachmentFilter, AttachmentRecord, Cursor, DiskRole,
    ExportRecord, Inserted, NewOperation, OpError, OpStatus, OpType, OperationFilter,
    OperationRecord, Page, SnapshotTracking, VolumeFilter, VolumeRecord, VolumeRow, INITIAL_STEP,
};
pub(crate) use rows::ts;
use rows::{int, now, opt_ts, Reader};

const OP_COLS: &str = "id, op_type, status, step, volume_id, vm_id, request, response, error_code, \
                       error_message, cloud_job_id, idempotency_key, created_at, updated_at, completed_at";
const VOLUME_COLS: [&str; 15] = [
    "id",
    "name",
    "size_bytes",
    "disk_offering_id",
    "zone_id",
    "metadata",
    "cloud_state",
    "snapshot_id",
    "snapshot_name",
    "snapshot_status",
    "vm_context_id",
    "snapshot_created_at",
    "created_at",
    "updated_at",
    "deleted_at",
];
const ATTACHMENT_COLS: [&str; 12] = [
    "volume_id",
    "vm_id",
    "target",
    "role",
    "device_id",
    "by_id_path",
    "kernel_device",
    "stable_name",
    "export_generation",
    "nbd_clients",
    "created_at",
    "updated_at",
];
const EXPORT_COLS: [&str; 7] = [
    "volume_id",
    "export_name",
    "device_path",
    "generation",
    "read_only",
    "created_at",
    "updated_at",
];
/// Read with an export, never written by [`Store::upsert_export`].
const EXPORT_COUNTER_COLS: [&str; 2] = ["bytes_read_before", "bytes_written_before"];
const UNFINISHED: &str = "status IN ('pending', 'executing')";
/// The condition that a row keyed by `volume_id` (attachments, exports) belongs to the appliance bound as `?`.
const OWN_VOLUME: &str = "volume_id IN (SELECT id FROM volumes WHERE appliance_id IN (?, ''))";

/// How long a caller waits for a free connection before the database counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(15);

/// The store: a pool of connections to one database. Cheap to clone. Bound to an appliance lease
/// ([`Store::acquire_lease`]), it reads only that appliance's records and writes only while it holds the lease.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    lease: Option<lease::LeaseSlot>,
    /// Set when the hub projection is on: commits journal hub changes (see [`outbox`]) and notify this.
    hub_outbox: Option<Arc<tokio::sync::Notify>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.dialect)
            .finish_non_exhaustive()
    }
}

/// A bind value of a dynamically built statement.
enum Arg {
    Text(String),
}

fn q(action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { action, source }
}

fn cols(c: &[&str]) -> String {
    c.join(", ")
}

/// Turns SQLite's memory statistics off before this process opens its first SQLite connection. With them on,
/// every allocation and free inside the library takes one process-wide mutex: a large listing, whose values
/// are copied on the connection's thread and freed on the runtime's, spent much of its time waiting on it.
fn sqlite_without_memory_statistics() {
    // SAFETY: `sqlite3_config` must not run while another thread uses SQLite. It runs once, before the first
    // connection of the store, which is this process's only user of the library; once the library is
    // initialized it changes nothing and returns SQLITE_MISUSE.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_config(
            libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
            std::ffi::c_int::from(0u8),
        )
    };
    if rc != libsqlite3_sys::SQLITE_OK {
        tracing::debug!(
            rc,
            "SQLite was already initialized; its memory statistics stay on"
        );
    }
}

impl Store {
    /// Connects to `url`: `sqlite://PATH?mode=rwc`, `postgres://…`, `mysql://…` or `mariadb://…`. Does not
    /// migrate; call [`Store::migrate`] next.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(|| {
            sqlite_without_memory_statistics();
            sqlx::any::install_default_drivers();
        });
        let (dialect, driver_url) = Dialect::from_url(url)?;
        let setup = dialect.session_setup();
        let pool = AnyPoolOptions::new()
            .max_connections(match dialect {
                Dialect::Sqlite => 8,
                Dialect::Postgres | Dialect::MySql => 10,
            })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A connection whose transaction could not be ended is closed rather than reused. When a write
            // fails for lack of space (SQLITE_FULL), SQLite rolls the transaction back itself; the ROLLBACK
            // sent when the transaction is dropped then fails, the driver keeps counting the transaction
            // open, and every later BEGIN on that connection would fail, long after the space returned.
            .before_acquire(|conn, _| {
                Box::pin(async move {
                    Ok(<sqlx::any::AnyTransactionManager as sqlx::TransactionManager>::get_transaction_depth(conn) == 0)
                })
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    for stmt in setup {
                        conn.execute(*stmt).await?;
                    }
                    Ok(())
                })
            })
            .connect(&driver_url)
            .await
            .map_err(|source| StoreError::Connect {
                url: dialect::redact(url),
                source,
            })?;
        Ok(Self {
            pool,
            dialect,
            lease: None,
            hub_outbox: None,
        })
    }

    /// The dialect of the connected database.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The newest migration applied to the database (`None` before the first) and the newest this
    /// binary knows; reads only.
    pub async fn schema_versions(&self) -> (Option<i64>, i64) {
        let known = self
            .dialect
            .migrator()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0);
        // The table does not exist before the first migration; any error here means "nothing applied yet".
        let found: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await
            .ok()
            .flatten();
        (found, known)
    }

    /// Applies the embedded migrations. Fails with `SchemaTooNew` when the database was migrated by a newer
    /// binary, and never touches such a database.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = self.dialect.migrator();
        let (found, known) = self.schema_versions().await;
        if let Some(found) = found.filter(|f| *f > known) {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        migrator.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(found) => {
                StoreError::SchemaTooNew { found, known }
            }
            e => StoreError::Migrate(e),
        })
    }

    /// Closes every connection; later calls fail with `Unavailable`.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, StoreError> {
        self.pool
            .acquire()
            .await
            .map_err(q("waiting for a database connection"))
    }

    /// A transaction without the lease check: for the lease itself. Writes use [`Store::begin_write`].
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        match self.dialect.begin() {
            Some(stmt) => self.pool.begin_with(stmt).await,
            None => self.pool.begin().await,
        }
        .map_err(q("starting a transaction"))
    }

    // ---- operations ---------------------------------------------------------------------------------------

    /// Journals a new operation (`pending`, step [`INITIAL_STEP`]). When its idempotency key was already used
    /// for an operation of the same type, returns that operation unchanged instead.
    pub async fn insert_operation(&self, new: &NewOperation) -> Result<Inserted, StoreError> {
        let mut tx = self.begin_write().await?;
        let t = now();
        let sql = self.dialect.sql(
            "INSERT INTO operations (id, op_type, status, step, volume_id, vm_id, request, idempotency_key, \
             created_at, updated_at, queue_seq, appliance_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        );
        let res = sqlx::query(&sql)
            .bind(new.id.to_string())
            .bind(new.op_type.as_str())
            .bind(OpStatus::Pending.as_str())
            .bind(INITIAL_STEP)
            .bind(new.volume_id.map(|v| v.to_string()))
            .bind(new.vm_id.clone())
            .bind(new.request.to_string())
            .bind(new.idempotency_key.clone())
            .bind(t.clone())
            .bind(t)
            .bind(new.queue_seq)
            .bind(self.owner().to_string())
            .execute(&mut *tx)
            .await;
        match res {
            Ok(_) => {
                let rec = self
                    .fetch_operation(&mut tx, new.id)
                    .await?
                    .ok_or_else(|| {
                        StoreError::not_found(format!("operation {} just written", new.id))
                    })?;
                tx.commit().await.map_err(q("committing a new operation"))?;
                Ok(Inserted::Created(rec))
            }
            Err(e) if StoreError::is_constraint_violation(&e) => {
                // The failed statement ends the transaction (PostgreSQL refuses anything more in it).
                drop(tx);
                if let Some(key) = &new.idempotency_key {
                    if let Some(first) = self.operation_by_idempotency_key(key).await? {
                        return Ok(Inserted::Existing(first));
                    }
                }
                Err(StoreError::conflict(format!(
                    "operation {} already exists; submit it with a new id",
                    new.id
                )))
            }
            Err(e) => Err(q("journaling a new operation")(e)),
        }
    }

    /// The operation first journaled with idempotency key `key`, of whatever kind.
    pub async fn operation_by_idempotency_key(
        &self,
        key: &str,
    ) -> Result<Option<OperationRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {OP_COLS} FROM operations WHERE appliance_id IN (?, '') AND idempotency_key = ? \
             ORDER BY created_at ASC, id ASC"
        ));
        sqlx::query(&sql)
            .bind(self.owner().to_string())
            .bind(key.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading the operation of an idempotency key"))?
            .map(|r| operation_from_row(&r))
            .transpose()
    }

    async fn fetch_operation(
        &self,
        conn: &mut AnyConnection,
        id: Uuid,
    ) -> Result<Option<OperationRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {OP_COLS} FROM operations WHERE id = ? AND appliance_id IN (?, '')"
        ));
        sqlx::query(&sql)
            .bind(id.to_string())
            .bind(self.owner().to_string())
            .fetch_optional(conn)
            .await
            .map_err(q("reading an operation"))?
            .map(|r| operation_from_row(&r))
            .transpose()
    }

    pub async fn get_operation(&self, id: Uuid) -> Result<Option<OperationRecord>, StoreError> {
        let mut conn = self.conn().await?;
        self.fetch_operation(&mut conn, id).await
    }

    /// Operations matching `filter`, newest first.
    pub async fn list_operations(
        &self,
        filter: &OperationFilter,
    ) -> Result<Vec<OperationRecord>, StoreError> {
        let mut conds = vec!["appliance_id IN (?, '')"];
        let mut args = vec![Arg::Text(self.owner().to_string())];
        if let Some(t) = filter.op_type {
            conds.push("op_type = ?");
            args.push(Arg::Text(t.as_str().into()));
        }
        if let Some(s) = filter.status {
            conds.push("status = ?");
            args.push(Arg::Text(s.as_str().into()));
        }
        if let Some(v) = filter.volume_id {
            conds.push("volume_id = ?");
            args.push(Arg::Text(v.to_string()));
        }
        if let Some(vm) = &filter.vm_id {
            conds.push("vm_id = ?");
            args.push(Arg::Text(vm.clone()));
        }
        if let Some(c) = &filter.after {
            // Newest first: the next page holds the older rows.
            conds.push("(created_at < ? OR (created_at = ? AND id < ?))");
            args.extend(keyset_args(c));
        }
        let mut sql = format!("SELECT {OP_COLS} FROM operations WHERE ");
        sql.push_str(&conds.join(" AND "));
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        if let Some(l) = filter.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        self.read_all(&sql, args, "listing operations", operation_from_row)
            .await
    }

    /// One page of the operations matching `filter` (its `limit` is the page size), newest first.
    pub async fn page_operations(
        &self,
        filter: &OperationFilter,
    ) -> Result<Page<OperationRecord>, StoreError> {
        let mut f = filter.clone();
        f.limit = filter.limit.map(|l| l.saturating_add(1));
        let rows = self.list_operations(&f).await?;
        Ok(paged(rows, filter.limit, |o| Cursor {
            key: ts(o.created_at),
            id: o.id.to_string(),
        }))
    }

    /// Runs a listing statement (`?` placeholders, bound in order) and converts each row as it arrives, so
    /// that the driver's rows of a large listing are never all held at once.
    async fn read_all<T>(
        &self,
        sql: &str,
        args: Vec<Arg>,
        action: &'static str,
        convert: impl Fn(&AnyRow) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        use futures::TryStreamExt as _;
        let sql = self.dialect.sql(sql);
        let mut query = sqlx::query(&sql);
        for a in args {
            match a {
                Arg::Text(s) => query = query.bind(s),
            }
        }
        let mut rows = query.fetch(&self.pool);
        let mut out = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(q(action))? {
            out.push(convert(&row)?);
        }
        Ok(out)
    }

    /// This appliance's operations that are `pending` or `executing`, in the order they were queued: by
    /// `queue_seq`, rows of earlier versions (without one) first and among themselves by `created_at`.
    pub async fn unfinished_operations(&self) -> Result<Vec<OperationRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {OP_COLS} FROM operations WHERE appliance_id IN (?, '') AND {UNFINISHED} \
             ORDER BY CASE WHEN queue_seq IS NULL THEN 0 ELSE 1 END, queue_seq ASC, created_at ASC, id ASC"
        ));
        sqlx::query(&sql)
            .bind(self.owner().to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing unfinished operations"))?
            .iter()
            .map(operation_from_row)
            .collect()
    }

    /// The highest `queue_seq` journaled (0 when none): numbering continues above it after a restart.
    pub async fn max_queue_seq(&self) -> Result<i64, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT MAX(queue_seq) FROM operations")
            .fetch_one(&self.pool)
            .await
            .map_err(q("reading the highest queue sequence number"))?;
        Ok(found.unwrap_or(0))
    }

    /// Updates an unfinished operation with `SET …` (placeholders first, then the id). NotFound when it does
    /// not exist, Conflict when it has already finished.
    async fn update_unfinished(
        &self,
        conn: &mut AnyConnection,
        id: Uuid,
        set: &str,
        args: Vec<Option<String>>,
        action: &'static str,
    ) -> Result<(), StoreError> {
        let sql = self.dialect.sql(&format!(
            "UPDATE operations SET {set} WHERE id = ? AND {UNFINISHED}"
        ));
        let mut query = sqlx::query(&sql);
        for a in args {
            query = query.bind(a);
        }
        let res = query
            .bind(id.to_string())
            .execute(&mut *conn)
            .await
            .map_err(q(action))?;
        if res.rows_affected() > 0 {
            return Ok(());
        }
        // Nothing changed: the operation is missing, finished, or (MariaDB counts only changed rows) the
        // update wrote the values it already had.
        self.require_unfinished(conn, id, "").await.map(|_| ())
    }

    /// The status of an unfinished operation (locked until the transaction ends when `lock` is the dialect's
    /// `FOR UPDATE`).
    async fn require_unfinished(
        &self,
        conn: &mut AnyConnection,
        id: Uuid,
        lock: &str,
    ) -> Result<OpStatus, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT id, status FROM operations WHERE id = ?{lock}"
        ));
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(conn)
            .await
            .map_err(q("reading the status of an operation"))?
            .ok_or_else(|| StoreError::not_found(format!("operation {id}")))?;
        let status = Reader::new(&row, "operations", "id").parsed("status", OpStatus::parse)?;
        if status.is_terminal() {
            return Err(StoreError::conflict(format!(
                "operation {id} has already finished ({}); it cannot change any more",
                status.as_str()
            )));
        }
        Ok(status)
    }

    /// Records the status (normally `executing`) and the step an unfinished operation has reached.
    pub async fn set_operation_step(
        &self,
        id: Uuid,
        status: OpStatus,
        step: &str,
    ) -> Result<(), StoreError> {
        if status.is_terminal() {
            return Err(StoreError::conflict(format!(
                "status {} is terminal; finish operation {id} with finish_operation",
                status.as_str()
            )));
        }
        let mut tx = self.begin_write().await?;
        self.update_unfinished(
            &mut tx,
            id,
            "status = ?, step = ?, updated_at = ?",
            vec![Some(status.as_str().into()), Some(step.into()), Some(now())],
            "journaling the step of an operation",
        )
        .await?;
        tx.commit()
            .await
            .map_err(q("committing the step of an operation"))
    }

    /// Records the CloudStack job an unfinished operation waits for, with the step that started it.
    pub async fn set_operation_job(
        &self,
        id: Uuid,
        step: &str,
        job_id: &str,
    ) -> Result<(), StoreError> {
        self.set_operation_job_of(id, step, job_id, None).await
    }

    /// [`Store::set_operation_job`], also recording the volume the job acts on when it is given (one write).
    pub async fn set_operation_job_of(
        &self,
        id: Uuid,
        step: &str,
        job_id: &str,
        volume_id: Option<Uuid>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let mut set = String::from("step = ?, cloud_job_id = ?, updated_at = ?");
        let mut args = vec![Some(step.into()), Some(job_id.into()), Some(now())];
        if let Some(v) = volume_id {
            set.push_str(", volume_id = ?");
            args.push(Some(v.to_string()));
        }
        self.update_unfinished(
            &mut tx,
            id,
            &set,
            args,
            "journaling the job id of an operation",
        )
        .await?;
        tx.commit()
            .await
            .map_err(q("committing the job id of an operation"))
    }

    /// Records the volume an unfinished operation acts on (for `create`, once the cloud named it).
    pub async fn set_operation_volume(&self, id: Uuid, volume_id: Uuid) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.update_unfinished(
            &mut tx,
            id,
            "volume_id = ?, updated_at = ?",
            vec![Some(volume_id.to_string()), Some(now())],
            "journaling the volume of an operation",
        )
        .await?;
        tx.commit()
            .await
            .map_err(q("committing the volume of an operation"))
    }

    /// Journals that a create is about to send createVolume (`step`) together with the ids of the cloud volumes
    /// that already carry its name, in one transaction: recovery adopts only a volume outside that list. A
    /// `snapshot_create` journals the ids of the volume's existing snapshots the same way before createSnapshot.
    pub async fn journal_create_send(
        &self,
        id: Uuid,
        step: &str,
        preexisting: &[String],
    ) -> Result<(), StoreError> {
        let ids = serde_json::to_string(preexisting).map_err(|e| StoreError::Corrupt {
            what: format!("the pre-existing volume ids of operation {id}"),
            detail: e.to_string(),
        })?;
        let mut tx = self.begin_write().await?;
        self.update_unfinished(
            &mut tx,
            id,
            "status = ?, step = ?, updated_at = ?",
            vec![
                Some(OpStatus::Executing.as_str().into()),
                Some(step.into()),
                Some(now()),
            ],
            "journaling the step of an operation",
        )
        .await?;
        for (sql, action) in [
            (
                "DELETE FROM create_preexisting WHERE operation_id = ?",
                "replacing the pre-existing volume ids of a create",
            ),
            (
                "INSERT INTO create_preexisting (operation_id, volume_ids) VALUES (?, ?)",
                "journaling the pre-existing volume ids of a create",
            ),
        ] {
            let sql = self.dialect.sql(sql);
            let mut query = sqlx::query(&sql).bind(id.to_string());
            if sql.contains("INSERT") {
                query = query.bind(ids.clone());
            }
            query.execute(&mut *tx).await.map_err(q(action))?;
        }
        tx.commit()
            .await
            .map_err(q("committing the send of a create"))
    }

    /// The ids a create recorded with [`Store::journal_create_send`]; `None` when it recorded none (an entry
    /// journaled before this record existed).
    pub async fn create_preexisting(&self, id: Uuid) -> Result<Option<Vec<String>>, StoreError> {
        let sql = self
            .dialect
            .sql("SELECT operation_id, volume_ids FROM create_preexisting WHERE operation_id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&mut *self.conn().await?)
            .await
            .map_err(q("reading the pre-existing volume ids of a create"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let text = Reader::new(&row, "create_preexisting", "operation_id").text("volume_ids")?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                what: format!("the pre-existing volume ids of operation {id}"),
                detail: e.to_string(),
            })
    }

    /// Finishes an unfinished operation with a terminal status. Conflict when it has already finished.
    pub async fn finish_operation(
        &self,
        id: Uuid,
        status: OpStatus,
        response: Option<&Value>,
        error: Option<&OpError>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.finish_in(&mut tx, id, status, response, error).await?;
        tx.commit()
            .await
            .map_err(q("committing a finished operation"))
    }

    async fn finish_in(
        &self,
        conn: &mut AnyConnection,
        id: Uuid,
        status: OpStatus,
        response: Option<&Value>,
        error: Option<&OpError>,
    ) -> Result<(), StoreError> {
        if !status.is_terminal() {
            return Err(StoreError::conflict(format!(
                "status {} is not terminal; record it with set_operation_step",
                status.as_str()
            )));
        }
        let t = now();
        self.update_unfinished(
            conn,
            id,
            "status = ?, response = ?, error_code = ?, error_message = ?, updated_at = ?, completed_at = ?",
            vec![
                Some(status.as_str().into()),
                response.map(Value::to_string),
                error.map(|e| e.code.clone()),
                error.map(|e| e.message.clone()),
                Some(t.clone()),
                Some(t),
            ],
            "finishing an operation",
        )
        .await
    }

    // ---- volumes ------------------------------------------------------------------------------------------

    async fn upsert_volume_in(
        &self,
        conn: &mut AnyConnection,
        v: &VolumeRecord,
    ) -> Result<(), StoreError> {
        // A volume recorded by another appliance stays that appliance's.
        let sql = self.dialect.sql(&format!(
            "SELECT appliance_id FROM volumes WHERE id = ?{}",
            self.dialect.for_update()
        ));
        let owner: Option<String> = sqlx::query_scalar(&sql)
            .bind(v.id.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(q("reading the owner of a volume"))?;
        if let Some(other) = owner.filter(|o| **o != self.owner() && !o.is_empty()) {
            return Err(StoreError::conflict(format!(
                "volume {} belongs to appliance {other}; only that appliance's daemon may change it",
                v.id
            )));
        }
        let all: Vec<&str> = VOLUME_COLS
            .iter()
            .copied()
            .chain(["appliance_id"])
            .collect();
        let sql = self.dialect.upsert(
            "volumes",
            "id",
            &all,
            &update_cols(&all, &["id", "created_at", "appliance_id"]),
        );
        let sql = self.dialect.sql(&sql);
        sqlx::query(&sql)
            .bind(v.id.to_string())
            .bind(v.name.clone())
            .bind(int("volume size", v.size_bytes)?)
            .bind(v.disk_offering_id.clone())
            .bind(v.zone_id.clone())
            .bind(v.metadata.to_string())
            .bind(v.cloud_state.clone())
            .bind(v.snapshot.snapshot_id.clone())
            .bind(v.snapshot.snapshot_name.clone())
            .bind(v.snapshot.snapshot_status.clone())
            .bind(v.snapshot.vm_context_id.clone())
            .bind(opt_ts(v.snapshot.snapshot_created_at))
            .bind(ts(v.created_at))
            .bind(ts(v.updated_at))
            .bind(opt_ts(v.deleted_at))
            .bind(self.owner().to_string())
            .execute(conn)
            .await
            .map_err(q("writing a volume"))?;
        Ok(())
    }

    /// Inserts the volume or replaces everything but its creation time.
    pub async fn upsert_volume(&self, v: &VolumeRecord) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.upsert_volume_in(&mut tx, v).await?;
        tx.commit().await.map_err(q("committing a volume"))
    }

    /// The volume, including a deleted one (`deleted_at` set).
    pub async fn get_volume(&self, id: Uuid) -> Result<Option<VolumeRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {} FROM volumes WHERE id = ? AND appliance_id IN (?, '')",
            cols(&VOLUME_COLS)
        ));
        sqlx::query(&sql)
            .bind(id.to_string())
            .bind(self.owner().to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a volume"))?
            .map(|r| volume_from_row(&r))
            .transpose()
    }

    /// All volumes, oldest first; deleted ones only when `include_deleted`.
    pub async fn list_volumes(
        &self,
        include_deleted: bool,
    ) -> Result<Vec<VolumeRecord>, StoreError> {
        let filter = if include_deleted {
            ""
        } else {
            " AND deleted_at IS NULL"
        };
        let sql = self.dialect.sql(&format!(
            "SELECT {} FROM volumes WHERE appliance_id IN (?, ''){filter} ORDER BY created_at ASC, id ASC",
            cols(&VOLUME_COLS)
        ));
        sqlx::query(&sql)
            .bind(self.owner().to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing volumes"))?
            .iter()
            .map(volume_from_row)
            .collect()
    }

    /// One page of the volumes matching `filter`, oldest first, each with its attachment, export and newest
    /// operation: one statement, whatever the number of volumes.
    pub async fn page_volumes(&self, filter: &VolumeFilter) -> Result<Page<VolumeRow>, StoreError> {
        let mut conds = vec![match filter.state {
            None => "v.deleted_at IS NULL",
            Some(volume_api::VolumeState::Attached) => {
                "v.deleted_at IS NULL AND a.volume_id IS NOT NULL"
            }
            Some(volume_api::VolumeState::Detached) => {
                "v.deleted_at IS NULL AND a.volume_id IS NULL"
            }
            Some(volume_api::VolumeState::Deleted) => "v.deleted_at IS NOT NULL",
        }];
        let mut args = Vec::new();
        if let Some(vm) = &filter.vm_id {
            conds.push("a.vm_id = ?");
            args.push(Arg::Text(vm.clone()));
        }
        if let Some(n) = &filter.name {
            conds.push("v.name = ?");
            args.push(Arg::Text(n.clone()));
        }
        if let Some(c) = &filter.after {
            conds.push("(v.created_at > ? OR (v.created_at = ? AND v.id > ?))");
            args.extend(keyset_args(c));
        }
        let rows = self
            .volume_rows(&conds, args, filter.limit.map(|l| u64::from(l) + 1))
            .await?;
        Ok(paged(rows, filter.limit, |r| Cursor {
            key: ts(r.volume.created_at),
            id: r.volume.id.to_string(),
        }))
    }

    /// The volume (also a deleted one) with its attachment, export and newest operation, in one statement.
    pub async fn get_volume_row(&self, id: Uuid) -> Result<Option<VolumeRow>, StoreError> {
        Ok(self
            .volume_rows(&["v.id = ?"], vec![Arg::Text(id.to_string())], Some(1))
            .await?
            .pop())
    }

    /// The one statement behind [`Store::page_volumes`] and [`Store::get_volume_row`]: this appliance's
    /// volumes meeting every condition of `conds` (over `v`, `a`, `e`, `o`; `?` bound from `args` in
    /// order), oldest first, at most `limit`, joined with their attachment, export and newest operation.
    async fn volume_rows(
        &self,
        conds: &[&str],
        args: Vec<Arg>,
        limit: Option<u64>,
    ) -> Result<Vec<VolumeRow>, StoreError> {
        let join = |alias: &str, cols_of: &[&str], prefix: &str| {
            cols_of
                .iter()
                .map(|c| format!("{alias}.{c} AS {prefix}{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let op_cols: Vec<&str> = OP_COLS.split(',').map(str::trim).collect();
        let mut sql = format!(
            "SELECT {}, {}, {}, {}, {} FROM volumes v \
             LEFT JOIN attachments a ON a.volume_id = v.id \
             LEFT JOIN exports e ON e.volume_id = v.id \
             LEFT JOIN operations o ON o.id = (SELECT o2.id FROM operations o2 WHERE o2.volume_id = v.id \
             ORDER BY o2.created_at DESC, o2.id DESC LIMIT 1) WHERE {} IN (?, '')",
            join("v", &VOLUME_COLS, ""),
            join("a", &ATTACHMENT_COLS, "a_"),
            join("e", &EXPORT_COLS, "e_"),
            join("e", &EXPORT_COUNTER_COLS, "e_"),
            join("o", &op_cols, "o_"),
            // The rows come in the order of the index on (created_at, id), so no sort of whole rows (which
            // SQLite spills to temporary files) and a page stops after its last row.
            self.dialect.not_indexed("v.appliance_id"),
        );
        for c in conds {
            sql.push_str(" AND ");
            sql.push_str(c);
        }
        sql.push_str(" ORDER BY v.created_at ASC, v.id ASC");
        if let Some(l) = limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut all_args = vec![Arg::Text(self.owner().to_string())];
        all_args.extend(args);
        // Columns are read by position: the volume's, the attachment's, the export's, then the operation's.
        let export_cols: Vec<&str> = EXPORT_COLS
            .iter()
            .chain(&EXPORT_COUNTER_COLS)
            .copied()
            .collect();
        let a_at = VOLUME_COLS.len();
        let e_at = a_at + ATTACHMENT_COLS.len();
        let o_at = e_at + export_cols.len();
        self.read_all(&sql, all_args, "listing volumes", |row| {
            let v = Reader::at(row, "volumes", "id", &VOLUME_COLS, 0);
            let a = Reader::at(row, "attachments", "volume_id", &ATTACHMENT_COLS, a_at);
            let e = Reader::at(row, "exports", "volume_id", &export_cols, e_at);
            let o = Reader::at(row, "operations", "id", &op_cols, o_at);
            Ok(VolumeRow {
                volume: volume_from(&v)?,
                attachment: a.present().then(|| attachment_from(&a)).transpose()?,
                export: e.present().then(|| export_from(&e)).transpose()?,
                last_operation: o.present().then(|| operation_from(&o)).transpose()?,
            })
        })
        .await
    }

    /// Removes the volume's record for good (deletion through the API keeps a tombstone instead). Conflict
    /// while it has an attachment or an export. Returns whether a record existed.
    pub async fn delete_volume(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let sql = self
            .dialect
            .sql("DELETE FROM volumes WHERE id = ? AND appliance_id IN (?, '')");
        match sqlx::query(&sql)
            .bind(id.to_string())
            .bind(self.owner().to_string())
            .execute(&mut *tx)
            .await
        {
            Ok(r) => {
                tx.commit()
                    .await
                    .map_err(q("committing the removal of a volume"))?;
                Ok(r.rows_affected() > 0)
            }
            Err(e) if StoreError::is_constraint_violation(&e) => Err(StoreError::conflict(
                format!("volume {id} still has an attachment or an export; detach it first"),
            )),
            Err(e) => Err(q("deleting a volume")(e)),
        }
    }

    // ---- attachments --------------------------------------------------------------------------------------

    pub async fn get_attachment(
        &self,
        volume_id: Uuid,
    ) -> Result<Option<AttachmentRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {} FROM attachments WHERE volume_id = ? AND {OWN_VOLUME}",
            cols(&ATTACHMENT_COLS)
        ));
        sqlx::query(&sql)
            .bind(volume_id.to_string())
            .bind(self.owner().to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading an attachment"))?
            .map(|r| attachment_from_row(&r))
            .transpose()
    }

    /// Attachments matching `filter`, ordered by VM, device id and volume.
    pub async fn list_attachments(
        &self,
        filter: &AttachmentFilter,
    ) -> Result<Vec<AttachmentRecord>, StoreError> {
        let mut conds = vec![OWN_VOLUME];
        let mut args = vec![Arg::Text(self.owner().to_string())];
        if let Some(vm) = &filter.vm_id {
            conds.push("vm_id = ?");
            args.push(Arg::Text(vm.clone()));
        }
        if let Some(t) = filter.target {
            conds.push("target = ?");
            args.push(Arg::Text(t.as_str().into()));
        }
        let mut sql = format!("SELECT {} FROM attachments WHERE ", cols(&ATTACHMENT_COLS));
        sql.push_str(&conds.join(" AND "));
        // NULL device ids last on every backend.
        sql.push_str(" ORDER BY vm_id ASC, (device_id IS NULL) ASC, device_id ASC, volume_id ASC");
        let sql = self.dialect.sql(&sql);
        let mut query = sqlx::query(&sql);
        for a in args {
            match a {
                Arg::Text(s) => query = query.bind(s),
            }
        }
        query
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing attachments"))?
            .iter()
            .map(attachment_from_row)
            .collect()
    }

    /// The attachment whose by-id path, kernel device or stable name is `path`.
    pub async fn find_attachment_by_device(
        &self,
        path: &str,
    ) -> Result<Option<AttachmentRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {} FROM attachments WHERE (by_id_path = ? OR kernel_device = ? OR stable_name = ?) \
             AND {OWN_VOLUME} ORDER BY volume_id ASC",
            cols(&ATTACHMENT_COLS)
        ));
        let rows = sqlx::query(&sql)
            .bind(path)
            .bind(path)
            .bind(path)
            .bind(self.owner().to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(q("looking up an attachment by device"))?;
        rows.first().map(attachment_from_row).transpose()
    }

    /// Removes the volume's attachment record (the volume stays). Returns whether one existed.
    pub async fn delete_attachment(&self, volume_id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let existed = delete_by_volume(
            &mut tx,
            self.dialect,
            &self.owner(),
            "attachments",
            volume_id,
        )
        .await?;
        tx.commit().await.map_err(q("committing a removal"))?;
        Ok(existed)
    }

    /// Removes the volume's export and attachment records together (one transaction); `true` when an
    /// attachment existed. For undoing an attach and for repairs, where no operation completes with it.
    pub async fn clear_attachment(&self, volume_id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let existed = clear_attachment_in(&mut tx, self.dialect, &self.owner(), volume_id).await?;
        if existed {
            outbox::record_in(self, &mut tx, volume_id, OsseaChange::Detached).await?;
        }
        tx.commit()
            .await
            .map_err(q("committing the removal of an attachment"))?;
        self.outbox_committed();
        Ok(existed)
    }

    // ---- exports ------------------------------------------------------------------------------------------

    async fn upsert_export_in(
        &self,
        conn: &mut AnyConnection,
        e: &ExportRecord,
    ) -> Result<(), StoreError> {
        let sql = self.dialect.upsert(
            "exports",
            "volume_id",
            &EXPORT_COLS,
            &update_cols(&EXPORT_COLS, &["volume_id", "created_at"]),
        );
        let sql = self.dialect.sql(&sql);
        sqlx::query(&sql)
            .bind(e.volume_id.to_string())
            .bind(e.export_name.clone())
            .bind(e.device_path.clone())
            .bind(int("export generation", e.generation)?)
            .bind(i64::from(e.read_only))
            .bind(ts(e.created_at))
            .bind(ts(e.updated_at))
            .execute(&mut *conn)
            .await
            .map_err(|err| {
                if StoreError::is_constraint_violation(&err) {
                    StoreError::conflict(format!(
                        "export {} cannot be recorded for volume {}: the volume is unknown or the name is taken",
                        e.export_name, e.volume_id
                    ))
                } else {
                    q("writing an export")(err)
                }
            })?;
        // An attachment names the generation that serves it.
        let sql = self
            .dialect
            .sql("UPDATE attachments SET export_generation = ? WHERE volume_id = ?");
        sqlx::query(&sql)
            .bind(int("export generation", e.generation)?)
            .bind(e.volume_id.to_string())
            .execute(conn)
            .await
            .map_err(q("recording the export generation of an attachment"))?;
        Ok(())
    }

    /// A kernel device node names one disk at a time: the one just verified as `volume_id`'s. Another of this
    /// appliance's attachments still recording it (its disk went away behind the daemon's back, or did not come
    /// back after a restart) records none any more, so that no read or look-up by that node finds the wrong
    /// volume. That includes a by-id path that is the bare node (a machine without udev's by-id links).
    async fn disown_kernel_device_in(
        &self,
        conn: &mut AnyConnection,
        kernel_device: &str,
        volume_id: Uuid,
    ) -> Result<(), StoreError> {
        for column in ["kernel_device", "by_id_path"] {
            let sql = self.dialect.sql(&format!(
                "UPDATE attachments SET {column} = NULL WHERE {column} = ? AND volume_id <> ? \
                 AND {OWN_VOLUME}"
            ));
            sqlx::query(&sql)
                .bind(kernel_device.to_owned())
                .bind(volume_id.to_string())
                .bind(self.owner().to_string())
                .execute(&mut *conn)
                .await
                .map_err(q("releasing a kernel device recorded for another volume"))?;
        }
        Ok(())
    }

    /// Inserts or replaces the volume's export (and records its generation on the volume's attachment), in
    /// one transaction. The byte counters are the record's, not `e`'s: a new generation adds what the one it
    /// replaces counted in this run (saved by [`Self::save_export_run_bytes`]) to the totals.
    pub async fn upsert_export(&self, e: &ExportRecord) -> Result<(), StoreError> {
        self.write_export(e, None).await
    }

    /// [`Self::upsert_export`] for an export opened on a device verified now, which the volume's attachment
    /// records too (its by-id link and kernel node), in the same transaction: a disk that came back under
    /// another kernel name (the appliance restarted) is never reported or found under its old one, which
    /// may name another volume's disk by now.
    pub async fn upsert_export_on_device(
        &self,
        e: &ExportRecord,
        by_id_path: Option<&str>,
        kernel_device: &str,
    ) -> Result<(), StoreError> {
        self.write_export(e, Some((by_id_path, kernel_device)))
            .await
    }

    /// The export, and the attachment's device (by-id path, kernel node) when given, in one transaction.
    async fn write_export(
        &self,
        e: &ExportRecord,
        device: Option<(Option<&str>, &str)>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        // In the transaction that replaces the generation, so that no later save for the old one matches.
        let sql = self.dialect.sql(
            "UPDATE exports SET bytes_read_before = bytes_read_before + bytes_read_run, \
             bytes_written_before = bytes_written_before + bytes_written_run, \
             bytes_read_run = 0, bytes_written_run = 0 WHERE volume_id = ? AND generation <> ?",
        );
        sqlx::query(&sql)
            .bind(e.volume_id.to_string())
            .bind(int("export generation", e.generation)?)
            .execute(&mut *tx)
            .await
            .map_err(q(
                "keeping the byte counts of an export's earlier generation",
            ))?;
        self.upsert_export_in(&mut tx, e).await?;
        if let Some((by_id_path, kernel_device)) = device {
            self.disown_kernel_device_in(&mut tx, kernel_device, e.volume_id)
                .await?;
            let sql = self.dialect.sql(
                "UPDATE attachments SET by_id_path = ?, kernel_device = ? WHERE volume_id = ?",
            );
            sqlx::query(&sql)
                .bind(by_id_path.map(str::to_owned))
                .bind(kernel_device.to_owned())
                .bind(e.volume_id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(q("recording the device of an attachment"))?;
        }
        outbox::record_in(self, &mut tx, e.volume_id, OsseaChange::Unchanged).await?;
        tx.commit().await.map_err(q("committing an export"))?;
        self.outbox_committed();
        Ok(())
    }

    pub async fn get_export(&self, volume_id: Uuid) -> Result<Option<ExportRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {}, {} FROM exports WHERE volume_id = ? AND {OWN_VOLUME}",
            cols(&EXPORT_COLS),
            cols(&EXPORT_COUNTER_COLS)
        ));
        sqlx::query(&sql)
            .bind(volume_id.to_string())
            .bind(self.owner().to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading an export"))?
            .map(|r| export_from_row(&r))
            .transpose()
    }

    /// All exports, by export name.
    pub async fn list_exports(&self) -> Result<Vec<ExportRecord>, StoreError> {
        let sql = self.dialect.sql(&format!(
            "SELECT {}, {} FROM exports WHERE {OWN_VOLUME} ORDER BY export_name ASC",
            cols(&EXPORT_COLS),
            cols(&EXPORT_COUNTER_COLS)
        ));
        sqlx::query(&sql)
            .bind(self.owner().to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing exports"))?
            .iter()
            .map(export_from_row)
            .collect()
    }

    /// One page of the exports, by export name: at most `limit` (all when `None`), after `after`.
    pub async fn page_exports(
        &self,
        limit: Option<u32>,
        after: Option<&Cursor>,
    ) -> Result<Page<ExportRecord>, StoreError> {
        let mut sql = format!(
            "SELECT {}, {} FROM exports WHERE {OWN_VOLUME}",
            cols(&EXPORT_COLS),
            cols(&EXPORT_COUNTER_COLS)
        );
        let mut args = vec![Arg::Text(self.owner().to_string())];
        if let Some(c) = after {
            sql.push_str(" AND (export_name > ? OR (export_name = ? AND volume_id > ?))");
            args.extend(keyset_args(c));
        }
        sql.push_str(" ORDER BY export_name ASC, volume_id ASC");
        if let Some(l) = limit {
            sql.push_str(&format!(" LIMIT {}", u64::from(l) + 1));
        }
        let rows = self
            .read_all(&sql, args, "listing exports", export_from_row)
            .await?;
        Ok(paged(rows, limit, |e| Cursor {
            key: e.export_name.clone(),
            id: e.volume_id.to_string(),
        }))
    }

    /// Saves what the current run has counted on the volume's export of `generation` (overwriting the
    /// previous save of this run; lower counts, read before the saved ones, change nothing).
    pub async fn save_export_run_bytes(
        &self,
        volume_id: Uuid,
        generation: u64,
        read: u64,
        written: u64,
    ) -> Result<(), StoreError> {
        let sql = self.dialect.sql(
            "UPDATE exports SET bytes_read_run = ?, bytes_written_run = ? \
             WHERE volume_id = ? AND generation = ? AND bytes_read_run <= ? AND bytes_written_run <= ?",
        );
        let (read, written) = (int("bytes read", read)?, int("bytes written", written)?);
        let mut tx = self.begin_write().await?;
        sqlx::query(&sql)
            .bind(read)
            .bind(written)
            .bind(volume_id.to_string())
            .bind(int("export generation", generation)?)
            .bind(read)
            .bind(written)
            .execute(&mut *tx)
            .await
            .map_err(q("saving export byte counters"))?;
        tx.commit()
            .await
            .map_err(q("committing export byte counters"))
    }

    /// At start-up: adds what the previous run counted to the totals of earlier runs.
    pub async fn fold_export_run_bytes(&self) -> Result<(), StoreError> {
        let sql = self.dialect.sql(&format!(
            "UPDATE exports SET bytes_read_before = bytes_read_before + bytes_read_run, \
             bytes_written_before = bytes_written_before + bytes_written_run, \
             bytes_read_run = 0, bytes_written_run = 0 \
             WHERE (bytes_read_run <> 0 OR bytes_written_run <> 0) AND {OWN_VOLUME}"
        ));
        let mut tx = self.begin_write().await?;
        sqlx::query(&sql)
            .bind(self.owner().to_string())
            .execute(&mut *tx)
            .await
            .map_err(q("folding export byte counters"))?;
        tx.commit()
            .await
            .map_err(q("committing folded export byte counters"))
    }

    /// Removes the volume's export record. Returns whether one existed.
    pub async fn delete_export(&self, volume_id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let existed =
            delete_by_volume(&mut tx, self.dialect, &self.owner(), "exports", volume_id).await?;
        if existed {
            outbox::record_in(self, &mut tx, volume_id, OsseaChange::Unchanged).await?;
        }
        tx.commit()
            .await
            .map_err(q("committing the removal of an export"))?;
        self.outbox_committed();
        Ok(existed)
    }

    // ---- appliance ----------------------------------------------------------------------------------------

    pub async fn get_appliance(&self) -> Result<Option<ApplianceRecord>, StoreError> {
        let row =
            sqlx::query("SELECT vm_id, source, updated_at FROM appliance WHERE singleton = 1")
                .fetch_optional(&self.pool)
                .await
                .map_err(q("reading the appliance identity"))?;
        row.map(|row| {
            let r = Reader::new(&row, "appliance", "vm_id");
            Ok(ApplianceRecord {
                vm_id: r.text("vm_id")?,
                source: r.text("source")?,
                updated_at: r.ts("updated_at")?,
            })
        })
        .transpose()
    }

    pub async fn set_appliance(&self, a: &ApplianceRecord) -> Result<(), StoreError> {
        let sql = self.dialect.upsert(
            "appliance",
            "singleton",
            &["singleton", "vm_id", "source", "updated_at"],
            &["vm_id", "source", "updated_at"],
        );
        let mut tx = self.begin_write().await?;
        sqlx::query(&self.dialect.sql(&sql))
            .bind(1_i64)
            .bind(a.vm_id.clone())
            .bind(a.source.clone())
            .bind(ts(a.updated_at))
            .execute(&mut *tx)
            .await
            .map_err(q("storing the appliance identity"))?;
        tx.commit()
            .await
            .map_err(q("committing the appliance identity"))
    }

    // ---- commits: one transaction each ---------------------------------------------------------------------

    /// Records the created volume and completes the create operation (naming the volume) with `response`.
    pub async fn commit_create(
        &self,
        op_id: Uuid,
        volume: &VolumeRecord,
        response: &Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.require_unfinished(&mut tx, op_id, self.dialect.for_update())
            .await?;
        self.upsert_volume_in(&mut tx, volume).await?;
        let sql = self
            .dialect
            .sql("UPDATE operations SET volume_id = ? WHERE id = ?");
        sqlx::query(&sql)
            .bind(volume.id.to_string())
            .bind(op_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(q("naming the volume of a create operation"))?;
        self.finish_in(&mut tx, op_id, OpStatus::Completed, Some(response), None)
            .await?;
        tx.commit().await.map_err(q("committing a created volume"))
    }

    /// Records the attachment (and, for the appliance, its export) and completes the attach operation with
    /// `response`. Conflict, with nothing written, when the volume is attached to another VM or the operation
    /// has already finished; an attachment to the same VM is replaced.
    pub async fn commit_attach(
        &self,
        op_id: Uuid,
        attachment: &AttachmentRecord,
        export: Option<&ExportRecord>,
        response: &Value,
    ) -> Result<(), StoreError> {
        self.commit_attach_replacing(op_id, None, attachment, export, response)
            .await
    }

    /// [`Self::commit_attach`] that also replaces a recorded attachment to `replaces` (a test-failover
    /// clean-up moves the volume from its test VM to the appliance: the cloud has detached it from there).
    pub async fn commit_attach_replacing(
        &self,
        op_id: Uuid,
        replaces: Option<&str>,
        attachment: &AttachmentRecord,
        export: Option<&ExportRecord>,
        response: &Value,
    ) -> Result<(), StoreError> {
        let volume_id = attachment.volume_id;
        let mut tx = self.begin_write().await?;
        self.require_unfinished(&mut tx, op_id, self.dialect.for_update())
            .await?;
        let sql = self
            .dialect
            .sql("SELECT volume_id, vm_id FROM attachments WHERE volume_id = ?");
        let existing = sqlx::query(&sql)
            .bind(volume_id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("reading an attachment"))?;
        let conflict = |vm: &str| {
            StoreError::conflict(format!(
                "volume {volume_id} is already attached to VM {vm}; detach it first"
            ))
        };
        let a = attachment;
        let values = (
            a.vm_id.clone(),
            a.target.as_str(),
            a.role.as_str(),
            a.device_id.map(i64::from),
            a.by_id_path.clone(),
            a.kernel_device.clone(),
            a.stable_name.clone(),
            a.export_generation
                .map(|g| int("export generation", g))
                .transpose()?,
            (!a.nbd_clients.is_empty())
                .then(|| serde_json::Value::from(a.nbd_clients.clone()).to_string()),
        );
        match existing {
            Some(row) => {
                let vm = Reader::new(&row, "attachments", "volume_id").text("vm_id")?;
                if vm != a.vm_id && replaces != Some(vm.as_str()) {
                    return Err(conflict(&vm));
                }
                let sql = self.dialect.sql(
                    "UPDATE attachments SET vm_id = ?, target = ?, role = ?, device_id = ?, by_id_path = ?, \
                     kernel_device = ?, stable_name = ?, export_generation = ?, nbd_clients = ?, \
                     updated_at = ? WHERE volume_id = ?",
                );
                sqlx::query(&sql)
                    .bind(values.0)
                    .bind(values.1)
                    .bind(values.2)
                    .bind(values.3)
                    .bind(values.4)
                    .bind(values.5)
                    .bind(values.6)
                    .bind(values.7)
                    .bind(values.8)
                    .bind(ts(a.updated_at))
                    .bind(volume_id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(q("replacing an attachment"))?;
            }
            None => {
                let sql = format!(
                    "INSERT INTO attachments ({}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    cols(&ATTACHMENT_COLS)
                );
                let res = sqlx::query(&self.dialect.sql(&sql))
                    .bind(volume_id.to_string())
                    .bind(values.0)
                    .bind(values.1)
                    .bind(values.2)
                    .bind(values.3)
                    .bind(values.4)
                    .bind(values.5)
                    .bind(values.6)
                    .bind(values.7)
                    .bind(values.8)
                    .bind(ts(a.created_at))
                    .bind(ts(a.updated_at))
                    .execute(&mut *tx)
                    .await;
                match res {
                    Ok(_) => {}
                    Err(e) if StoreError::is_constraint_violation(&e) => {
                        return Err(StoreError::conflict(format!(
                            "volume {volume_id} cannot be attached: it has no volume record or was attached \
                             concurrently; read it again and retry"
                        )))
                    }
                    Err(e) => return Err(q("recording an attachment")(e)),
                }
            }
        }
        if let Some(k) = &a.kernel_device {
            self.disown_kernel_device_in(&mut tx, k, volume_id).await?;
        }
        if let Some(e) = export {
            if e.volume_id != volume_id {
                return Err(StoreError::conflict(format!(
                    "export {} belongs to volume {}, not to the attached volume {volume_id}",
                    e.export_name, e.volume_id
                )));
            }
            self.upsert_export_in(&mut tx, e).await?;
        }
        outbox::record_in(self, &mut tx, volume_id, OsseaChange::Attached).await?;
        self.finish_in(&mut tx, op_id, OpStatus::Completed, Some(response), None)
            .await?;
        tx.commit().await.map_err(q("committing an attachment"))?;
        self.outbox_committed();
        Ok(())
    }

    /// Removes the volume's export and attachment records and completes the detach operation with `response`.
    pub async fn commit_detach(
        &self,
        op_id: Uuid,
        volume_id: Uuid,
        response: &Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.require_unfinished(&mut tx, op_id, self.dialect.for_update())
            .await?;
        clear_attachment_in(&mut tx, self.dialect, &self.owner(), volume_id).await?;
        outbox::record_in(self, &mut tx, volume_id, OsseaChange::Detached).await?;
        self.finish_in(&mut tx, op_id, OpStatus::Completed, Some(response), None)
            .await?;
        tx.commit().await.map_err(q("committing a detach"))?;
        self.outbox_committed();
        Ok(())
    }

    /// Removes the volume's export and attachment records, marks the volume deleted (its record stays as a
    /// tombstone) and completes the delete operation with `response`.
    pub async fn commit_delete(
        &self,
        op_id: Uuid,
        volume_id: Uuid,
        response: &Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        self.require_unfinished(&mut tx, op_id, self.dialect.for_update())
            .await?;
        let was_attached =
            clear_attachment_in(&mut tx, self.dialect, &self.owner(), volume_id).await?;
        let ossea = if was_attached {
            OsseaChange::Detached
        } else {
            OsseaChange::Unchanged
        };
        outbox::record_in(self, &mut tx, volume_id, ossea).await?;
        let t = now();
        let sql = self.dialect.sql(
            "UPDATE volumes SET deleted_at = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
        );
        sqlx::query(&sql)
            .bind(t.clone())
            .bind(t)
            .bind(volume_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(q("marking a volume deleted"))?;
        self.finish_in(&mut tx, op_id, OpStatus::Completed, Some(response), None)
            .await?;
        tx.commit().await.map_err(q("committing a delete"))?;
        self.outbox_committed();
        Ok(())
    }
}

/// The binds of a keyset condition `(key <op> ? OR (key = ? AND id <op> ?))`.
fn keyset_args(c: &Cursor) -> [Arg; 3] {
    [
        Arg::Text(c.key.clone()),
        Arg::Text(c.key.clone()),
        Arg::Text(c.id.clone()),
    ]
}

/// Cuts rows read with one more than `limit` into a page: the extra row only says that there is more, and
/// the cursor names the last row kept.
fn paged<T>(mut rows: Vec<T>, limit: Option<u32>, cursor: impl Fn(&T) -> Cursor) -> Page<T> {
    let next = match limit {
        Some(l) if rows.len() > l as usize => {
            rows.truncate(l as usize);
            rows.last().map(cursor)
        }
        _ => None,
    };
    Page { items: rows, next }
}

fn update_cols<'a>(all: &[&'a str], keep: &[&str]) -> Vec<&'a str> {
    all.iter().copied().filter(|c| !keep.contains(c)).collect()
}

/// Removes a volume's export and attachment rows (export first: it refers to the attachment); `true` when
/// an attachment existed. Runs inside the caller's transaction.
async fn clear_attachment_in(
    conn: &mut AnyConnection,
    dialect: Dialect,
    owner: &str,
    volume_id: Uuid,
) -> Result<bool, StoreError> {
    delete_by_volume(conn, dialect, owner, "exports", volume_id).await?;
    delete_by_volume(conn, dialect, owner, "attachments", volume_id).await
}

/// Deletes the row of `table` of one of `owner`'s volumes.
async fn delete_by_volume(
    conn: &mut AnyConnection,
    dialect: Dialect,
    owner: &str,
    table: &'static str,
    volume_id: Uuid,
) -> Result<bool, StoreError> {
    let sql = dialect.sql(&format!(
        "DELETE FROM {table} WHERE volume_id = ? AND {OWN_VOLUME}"
    ));
    let res = sqlx::query(&sql)
        .bind(volume_id.to_string())
        .bind(owner.to_string())
        .execute(conn)
        .await
        .map_err(q(match table {
            "exports" => "deleting an export",
            _ => "deleting an attachment",
        }))?;
    Ok(res.rows_affected() > 0)
}

fn operation_from_row(row: &AnyRow) -> Result<OperationRecord, StoreError> {
    operation_from(&Reader::new(row, "operations", "id"))
}

fn operation_from(r: &Reader<'_>) -> Result<OperationRecord, StoreError> {
    let error = match (r.opt_text("error_code")?, r.opt_text("error_message")?) {
        (None, None) => None,
        (code, message) => Some(OpError {
            code: code.unwrap_or_default(),
            message: message.unwrap_or_default(),
        }),
    };
    Ok(OperationRecord {
        id: r.uuid("id")?,
        op_type: r.parsed("op_type", OpType::parse)?,
        status: r.parsed("status", OpStatus::parse)?,
        step: r.text("step")?,
        volume_id: r.opt_uuid("volume_id")?,
        vm_id: r.opt_text("vm_id")?,
        request: r.json("request")?,
        response: r.opt_json("response")?,
        error,
        cloud_job_id: r.opt_text("cloud_job_id")?,
        idempotency_key: r.opt_text("idempotency_key")?,
        created_at: r.ts("created_at")?,
        updated_at: r.ts("updated_at")?,
        completed_at: r.opt_ts("completed_at")?,
    })
}

fn volume_from_row(row: &AnyRow) -> Result<VolumeRecord, StoreError> {
    volume_from(&Reader::new(row, "volumes", "id"))
}

fn volume_from(r: &Reader<'_>) -> Result<VolumeRecord, StoreError> {
    Ok(VolumeRecord {
        id: r.uuid("id")?,
        name: r.text("name")?,
        size_bytes: r.u64("size_bytes")?,
        disk_offering_id: r.text("disk_offering_id")?,
        zone_id: r.text("zone_id")?,
        metadata: r.json("metadata")?,
        cloud_state: r.opt_text("cloud_state")?,
        snapshot: SnapshotTracking {
            snapshot_id: r.opt_text("snapshot_id")?,
            snapshot_name: r.opt_text("snapshot_name")?,
            snapshot_status: r.opt_text("snapshot_status")?,
            vm_context_id: r.opt_text("vm_context_id")?,
            snapshot_created_at: r.opt_ts("snapshot_created_at")?,
        },
        created_at: r.ts("created_at")?,
        updated_at: r.ts("updated_at")?,
        deleted_at: r.opt_ts("deleted_at")?,
    })
}

fn attachment_from_row(row: &AnyRow) -> Result<AttachmentRecord, StoreError> {
    attachment_from(&Reader::new(row, "attachments", "volume_id"))
}

fn attachment_from(r: &Reader<'_>) -> Result<AttachmentRecord, StoreError> {
    Ok(AttachmentRecord {
        volume_id: r.uuid("volume_id")?,
        vm_id: r.text("vm_id")?,
        target: r.parsed("target", AttachTarget::parse)?,
        role: r.parsed("role", DiskRole::parse)?,
        device_id: r.opt_u32("device_id")?,
        by_id_path: r.opt_text("by_id_path")?,
        kernel_device: r.opt_text("kernel_device")?,
        stable_name: r.opt_text("stable_name")?,
        export_generation: r.opt_u64("export_generation")?,
        nbd_clients: r.opt_json_as("nbd_clients")?.unwrap_or_default(),
        created_at: r.ts("created_at")?,
        updated_at: r.ts("updated_at")?,
    })
}

fn export_from_row(row: &AnyRow) -> Result<ExportRecord, StoreError> {
    export_from(&Reader::new(row, "exports", "volume_id"))
}

fn export_from(r: &Reader<'_>) -> Result<ExportRecord, StoreError> {
    Ok(ExportRecord {
        volume_id: r.uuid("volume_id")?,
        export_name: r.text("export_name")?,
        device_path: r.text("device_path")?,
        generation: r.u64("generation")?,
        read_only: r.i64("read_only")? != 0,
        created_at: r.ts("created_at")?,
        updated_at: r.ts("updated_at")?,
        bytes_read_before: r.u64("bytes_read_before")?,
        bytes_written_before: r.u64("bytes_written_before")?,
    })
}
