//! The hub projection: the migration platform's MariaDB tables (`device_mappings`, `nbd_exports`,
//! `ossea_volumes`, read-only `ossea_configs`) kept true from the daemon's own journal.
//!
//! Commits journal a hub change in the daemon's own database (`store::outbox`); [`outbox`] delivers those
//! rows to the hub in order, retrying through outages; [`projection`] turns one row into the hub's rows and
//! writes only what differs (so a row applied twice writes nothing the second time); [`schema`] checks the
//! hub's tables (the daemon never creates or drops them); [`import`] adopts what a predecessor left.

pub mod import;
pub mod outbox;
pub mod projection;
pub mod schema;

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::Row;

pub use outbox::{HubMonitor, HubReport};
pub use projection::{remote_device_path, Applied};
pub use schema::SchemaReport;

/// How long a hub call waits for a connection before the hub counts as unreachable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one hub call (a whole change, a read) may take before it is given up and retried: a hub that
/// accepts connections but answers nothing (a table lock held, a stalled server) must not hold delivery, the
/// start-up or an import forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed hub call.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("hub_database_url {url:?} is not a MariaDB/MySQL URL; use mysql://USER:PASSWORD@HOST:PORT/DATABASE")]
    BadUrl {
        /// The URL without its password.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "{action} in the hub database failed; check that it is reachable and hub_database_url"
    )]
    Query {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "{action} in the hub database got no answer within {secs} s; check that it is reachable and that \
         nothing holds its tables locked"
    )]
    Timeout { action: &'static str, secs: u64 },
    #[error("the hub's tables are not as expected: {0}")]
    Schema(String),
}

/// The stable kind of a [`HubError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubErrorKind {
    Config,
    Unavailable,
    Schema,
}

impl HubError {
    pub fn kind(&self) -> HubErrorKind {
        match self {
            Self::BadUrl { .. } => HubErrorKind::Config,
            Self::Query { .. } | Self::Timeout { .. } => HubErrorKind::Unavailable,
            Self::Schema(_) => HubErrorKind::Schema,
        }
    }
}

fn q(action: &'static str) -> impl FnOnce(sqlx::Error) -> HubError {
    move |source| HubError::Query { action, source }
}

/// `call`, given up after [`CALL_TIMEOUT`] (its connection and an open transaction are dropped, which the
/// hub rolls back).
async fn within<T>(
    action: &'static str,
    call: impl std::future::Future<Output = Result<T, HubError>>,
) -> Result<T, HubError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| HubError::Timeout {
            action,
            secs: CALL_TIMEOUT.as_secs(),
        })?
}

/// The hub's database: a small pool, connected lazily (start-up never waits for the hub).
#[derive(Clone)]
pub struct Hub {
    pool: MySqlPool,
    /// The NBD port written into `nbd_exports.port`.
    nbd_port: u16,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("nbd_port", &self.nbd_port)
            .finish_non_exhaustive()
    }
}

/// Whether the URL's query names `param`.
fn has_query_param(url: &str, param: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|kv| kv.split('=').next() == Some(param))
    })
}

impl Hub {
    /// A hub at `url` (`mysql://…` or `mariadb://…`); nothing is connected until the first call.
    pub fn new(url: &str, nbd_port: u16) -> Result<Self, HubError> {
        let url_for_driver = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_string(),
        };
        let mut opts: MySqlConnectOptions =
            url_for_driver.parse().map_err(|source| HubError::BadUrl {
                url: crate::store::redact_url(url),
                source,
            })?;
        // `NOW()` in the hub's `datetime` columns is the hub server's local time, as the hub itself and the
        // predecessor write it; the driver would otherwise set each session to UTC. A `timezone=` in the URL
        // still sets one.
        if !has_query_param(&url_for_driver, "timezone")
            && !has_query_param(&url_for_driver, "time-zone")
        {
            opts = opts.timezone(None);
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_lazy_with(opts);
        Ok(Self { pool, nbd_port })
    }

    /// The same hub, writing `port` into export rows.
    pub fn with_nbd_port(mut self, port: u16) -> Self {
        self.nbd_port = port;
        self
    }

    /// The NBD port written into export rows.
    pub fn nbd_port(&self) -> u16 {
        self.nbd_port
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The appliance's own VM id as the hub knows it: `ossea_configs.oma_vm_id` of the active configuration
    /// (`None` when there is no active row or it has none).
    pub async fn appliance_vm_id(&self) -> Result<Option<String>, HubError> {
        within(
            "reading ossea_configs.oma_vm_id of the active configuration",
            self.appliance_vm_id_now(),
        )
        .await
    }

    async fn appliance_vm_id_now(&self) -> Result<Option<String>, HubError> {
        let row = sqlx::query(
            "SELECT CAST(oma_vm_id AS CHAR) AS oma_vm_id FROM ossea_configs WHERE is_active = 1 \
             ORDER BY id ASC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(q(
            "reading ossea_configs.oma_vm_id of the active configuration",
        ))?;
        Ok(row
            .and_then(|r| r.try_get::<Option<String>, _>("oma_vm_id").ok().flatten())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()))
    }

    /// The `device_mappings` rows, by volume (for import).
    pub async fn device_mappings(&self) -> Result<Vec<HubMapping>, HubError> {
        within("reading device_mappings", self.device_mappings_now()).await
    }

    async fn device_mappings_now(&self) -> Result<Vec<HubMapping>, HubError> {
        let rows = sqlx::query(
            "SELECT CAST(volume_uuid AS CHAR) AS volume_uuid, CAST(vm_id AS CHAR) AS vm_id, \
             CAST(operation_mode AS CHAR) AS operation_mode, CAST(device_path AS CHAR) AS device_path \
             FROM device_mappings ORDER BY volume_uuid",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading device_mappings"))?;
        rows.iter()
            .map(|r| {
                Ok(HubMapping {
                    volume_uuid: r
                        .try_get("volume_uuid")
                        .map_err(q("reading device_mappings"))?,
                    vm_id: r.try_get("vm_id").map_err(q("reading device_mappings"))?,
                    operation_mode: r
                        .try_get::<Option<String>, _>("operation_mode")
                        .map_err(q("reading device_mappings"))?,
                    device_path: r
                        .try_get("device_path")
                        .map_err(q("reading device_mappings"))?,
                })
            })
            .collect()
    }
}

impl Hub {
    /// `(volume_id, export_name)` of every `nbd_exports` row (for import); a row without `volume_id` (NULL or
    /// empty) is of the volume its export name names (`migration-vol-<volume id>`), or has an empty one.
    pub async fn export_rows(&self) -> Result<Vec<(String, String)>, HubError> {
        within("reading nbd_exports", self.export_rows_now()).await
    }

    async fn export_rows_now(&self) -> Result<Vec<(String, String)>, HubError> {
        let rows = sqlx::query(
            "SELECT CAST(volume_id AS CHAR) AS volume_id, CAST(export_name AS CHAR) AS export_name \
             FROM nbd_exports ORDER BY volume_id, export_name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading nbd_exports"))?;
        rows.iter()
            .map(|r| {
                let volume: Option<String> =
                    r.try_get("volume_id").map_err(q("reading nbd_exports"))?;
                let name: String = r.try_get("export_name").map_err(q("reading nbd_exports"))?;
                let volume = volume.filter(|v| !v.trim().is_empty()).unwrap_or_else(|| {
                    volume_api::volume_of_export(&name)
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                });
                Ok((volume, name))
            })
            .collect()
    }
}

/// One `device_mappings` row as a predecessor (or this daemon) left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubMapping {
    pub volume_uuid: String,
    pub vm_id: String,
    pub operation_mode: Option<String>,
    pub device_path: String,
}

/// The identity source `hub`: the active configuration's `oma_vm_id`, when the hub has one. A hub that cannot
/// be read is logged and skipped (the stored identity or detection is used then); the identity is verified
/// with CloudStack like every source.
pub async fn appliance_identity(hub: &Hub) -> Option<String> {
    match hub.appliance_vm_id().await {
        Ok(Some(id)) => {
            tracing::info!(vm_id = %id, "appliance identity read from the hub (ossea_configs.oma_vm_id)");
            Some(id)
        }
        Ok(None) => {
            tracing::warn!("the hub has no active ossea_configs row with an oma_vm_id; the identity comes from elsewhere");
            None
        }
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot read the appliance identity from the hub; the identity comes from elsewhere");
            None
        }
    }
}

/// Journals the current state of every volume the daemon holds as a hub change, so that the hub is brought in
/// line with the daemon at start-up (a change the hub already holds writes nothing when delivered): an
/// attached volume's rows are written as they should be, a detached volume's mapping and export rows (left
/// by hand, or by a predecessor) are removed; `ossea_volumes` of a detached volume is left as the hub has it.
/// Runs before any operation does. Returns the number of (attached, detached) volumes queued.
pub async fn resync(
    store: &crate::store::Store,
) -> Result<(usize, usize), crate::store::StoreError> {
    let attachments = store
        .list_attachments(&crate::store::AttachmentFilter::default())
        .await?;
    let attached: std::collections::HashSet<uuid::Uuid> =
        attachments.iter().map(|a| a.volume_id).collect();
    let mut changes: Vec<_> = attachments
        .iter()
        .map(|a| (a.volume_id, crate::store::OsseaChange::Attached))
        .collect();
    changes.extend(
        store
            .list_volumes(false)
            .await?
            .into_iter()
            .filter(|v| !attached.contains(&v.id))
            .map(|v| (v.id, crate::store::OsseaChange::Unchanged)),
    );
    store.record_hub_states(&changes).await?;
    Ok((attachments.len(), changes.len() - attachments.len()))
}

#[cfg(test)]
mod tests {
    use super::has_query_param;

    #[test]
    fn a_time_zone_in_the_url_is_found_by_either_spelling() {
        let base = "mysql://u:p@h:3306/hub";
        assert!(!has_query_param(base, "timezone"));
        assert!(has_query_param(
            &format!("{base}?ssl-mode=disabled&timezone=%2B00:00"),
            "timezone"
        ));
        assert!(has_query_param(
            &format!("{base}?time-zone=SYSTEM"),
            "time-zone"
        ));
        assert!(!has_query_param(&format!("{base}?timezones=x"), "timezone"));
    }
}
