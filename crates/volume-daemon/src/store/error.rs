//! Store errors: one enum with a small stable kind that callers match on.

use sqlx::error::ErrorKind as DbErrorKind;
use sqlx::migrate::MigrateError;

/// What went wrong, in the terms callers act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreErrorKind {
    /// The record does not exist.
    NotFound,
    /// The change contradicts the stored state (already attached, operation already finished, key taken).
    Conflict,
    /// The database cannot be reached, is overloaded, or cannot write (no space left, read-only); retrying
    /// may help.
    Unavailable,
    /// The database was migrated by a newer binary.
    SchemaTooNew,
    /// A stored value cannot be read back.
    Corrupt,
    /// This daemon's appliance lease was taken over by another daemon: it must not write any more. Fatal,
    /// never retried.
    Fenced,
    /// Anything else (bad URL, failed migration, unexpected database error).
    Other,
}

impl StoreErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::SchemaTooNew => "schema_too_new",
            Self::Corrupt => "corrupt",
            Self::Fenced => "fenced",
            Self::Other => "other",
        }
    }
}

/// A failed store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database URL {url:?} is not supported; use sqlite://PATH?mode=rwc, postgres://… or mysql://… (mariadb://…)"
    )]
    UnsupportedUrl { url: String },

    #[error(
        "cannot connect to the database {url}; check database_url and that the server is running"
    )]
    Connect {
        /// The URL without its password.
        url: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "the database schema is version {found}, newer than this binary knows ({known}); \
         run the newer volume-daemon or restore a backup taken before the upgrade"
    )]
    SchemaTooNew { found: i64, known: i64 },

    #[error("migrating the database schema failed; fix the database and restart")]
    Migrate(#[source] MigrateError),

    #[error("{what} was not found")]
    NotFound { what: String },

    #[error("{message}")]
    Conflict { message: String },

    #[error("stored {what} is unreadable ({detail}); repair or remove that row")]
    Corrupt { what: String, detail: String },

    #[error(
        "appliance {appliance_id} is served by another volume-daemon: pid {pid} on host {host} \
         (holder {holder_id}), last heartbeat {heartbeat_age_secs} s ago, lease expires in {expires_in_secs} s; \
         stop that daemon (or wait for its lease to expire), or give this one its own appliance identity"
    )]
    LeaseHeld {
        appliance_id: String,
        holder_id: String,
        host: String,
        pid: i64,
        heartbeat_age_secs: i64,
        expires_in_secs: i64,
    },

    #[error(
        "the lease of appliance {appliance_id} was taken over (this daemon's fencing token {token} is no \
         longer current; the lease is held by {holder}): this daemon writes nothing more and stops"
    )]
    Fenced {
        appliance_id: String,
        token: i64,
        holder: String,
    },

    #[error("database call failed while {action}")]
    Query {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// The stable kind of this error.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::UnsupportedUrl { .. } => StoreErrorKind::Other,
            Self::Connect { source, .. } => match source {
                sqlx::Error::Configuration(_) => StoreErrorKind::Other,
                e => match classify(e) {
                    StoreErrorKind::Other => StoreErrorKind::Unavailable,
                    k => k,
                },
            },
            Self::SchemaTooNew { .. } => StoreErrorKind::SchemaTooNew,
            Self::Migrate(e) => match e {
                MigrateError::VersionMissing(_) => StoreErrorKind::SchemaTooNew,
                MigrateError::VersionMismatch(_) | MigrateError::Dirty(_) => {
                    StoreErrorKind::Corrupt
                }
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => classify(e),
                _ => StoreErrorKind::Other,
            },
            Self::NotFound { .. } => StoreErrorKind::NotFound,
            Self::Conflict { .. } => StoreErrorKind::Conflict,
            Self::Corrupt { .. } => StoreErrorKind::Corrupt,
            Self::LeaseHeld { .. } => StoreErrorKind::Conflict,
            Self::Fenced { .. } => StoreErrorKind::Fenced,
            Self::Query { source, .. } => classify(source),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict {
            message: message.into(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Whether the database answered and refused the write because its storage is full (SQLite 13,
    /// PostgreSQL 53100, MariaDB 1021 and 1114): a condition every writer of that database meets, not
    /// only this daemon.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Query {
                source: sqlx::Error::Database(db),
                ..
            } => matches!(db.code().as_deref(), Some("13" | "53100" | "1021" | "1114")),
            _ => false,
        }
    }

    /// A constraint violation means the change contradicts the stored state.
    pub(crate) fn is_constraint_violation(e: &sqlx::Error) -> bool {
        classify(e) == StoreErrorKind::Conflict
    }
}

/// The kind of a driver error.
fn classify(e: &sqlx::Error) -> StoreErrorKind {
    match e {
        sqlx::Error::RowNotFound => StoreErrorKind::NotFound,
        sqlx::Error::Database(db) => match db.kind() {
            DbErrorKind::UniqueViolation | DbErrorKind::ForeignKeyViolation => {
                StoreErrorKind::Conflict
            }
            _ => match db.code().as_deref() {
                // SQLite busy/locked, disk full, read-only; PostgreSQL serialization failure, deadlock,
                // disk full, too many connections, shutting down; MariaDB lock wait timeout, deadlock, too
                // many connections, disk full, table full.
                Some(
                    "5" | "6" | "517" | "13" | "8" | "40001" | "40P01" | "53100" | "53300"
                    | "57P01" | "57P03" | "1205" | "1213" | "1040" | "1021" | "1114",
                ) => StoreErrorKind::Unavailable,
                _ => StoreErrorKind::Other,
            },
        },
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreErrorKind::Unavailable,
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_) => StoreErrorKind::Corrupt,
        _ => StoreErrorKind::Other,
    }
}
