//! Everything that differs between SQLite, PostgreSQL and MariaDB: URLs, connection set-up, placeholders,
//! upserts, row locks and migrations. The rest of the store is written once against sqlx's `Any` driver.

use sqlx::migrate::Migrator;

use super::error::StoreError;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");
static MYSQL_MIGRATIONS: Migrator = sqlx::migrate!("migrations/mysql");

/// The SQL dialect of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Sqlite,
    Postgres,
    /// MariaDB (or MySQL).
    MySql,
}

impl Dialect {
    /// The dialect of a database URL and the URL as the driver wants it (`mariadb://` becomes `mysql://`).
    pub fn from_url(url: &str) -> Result<(Self, String), StoreError> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("sqlite") => Ok((Self::Sqlite, url.to_string())),
            Some("postgres" | "postgresql") => Ok((Self::Postgres, url.to_string())),
            Some("mysql") => Ok((Self::MySql, url.to_string())),
            Some("mariadb") => Ok((Self::MySql, format!("mysql{}", &url["mariadb".len()..]))),
            _ => Err(StoreError::UnsupportedUrl { url: redact(url) }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
        }
    }

    /// The embedded migrations of this dialect.
    pub fn migrator(self) -> &'static Migrator {
        match self {
            Self::Sqlite => &SQLITE_MIGRATIONS,
            Self::Postgres => &POSTGRES_MIGRATIONS,
            Self::MySql => &MYSQL_MIGRATIONS,
        }
    }

    /// `col` written so that a condition on it does not pick an index: SQLite's planner otherwise prefers
    /// the index of an equality (`appliance_id IN (…)`) over the one that gives the listing's order, and
    /// then sorts every row. SQLite's unary `+` does that; the other servers plan by their statistics.
    pub fn not_indexed(self, col: &str) -> String {
        match self {
            Self::Sqlite => format!("+{col}"),
            Self::Postgres | Self::MySql => col.to_string(),
        }
    }

    /// Statements run on every new connection.
    pub fn session_setup(self) -> &'static [&'static str] {
        match self {
            // WAL for concurrent readers; every commit synced (the journal must survive power loss, not
            // only a crash of the daemon); foreign keys are off by default in SQLite; wait for locks rather
            // than failing at once. Each pooled connection keeps at most 512 KiB of pages (SQLite's default is
            // 2 MiB): the pool's eight caches are what a busy daemon keeps of its database in its own memory,
            // and the kernel's page cache holds the file anyway.
            Self::Sqlite => &[
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                "PRAGMA foreign_keys = ON",
                "PRAGMA busy_timeout = 15000",
                "PRAGMA cache_size = -512",
            ],
            Self::Postgres | Self::MySql => &[],
        }
    }

    /// The statement that opens a write transaction. SQLite takes the write lock up front, so that a
    /// transaction never fails half-way when it first writes after reading.
    pub fn begin(self) -> Option<&'static str> {
        match self {
            Self::Sqlite => Some("BEGIN IMMEDIATE"),
            Self::Postgres | Self::MySql => None,
        }
    }

    /// Suffix of a `SELECT` that locks the rows it reads until the transaction ends.
    pub fn for_update(self) -> &'static str {
        match self {
            // The whole database is already locked by `BEGIN IMMEDIATE`.
            Self::Sqlite => "",
            Self::Postgres | Self::MySql => " FOR UPDATE",
        }
    }

    /// Rewrites `?` placeholders into this dialect's form (`$1, $2, …` for PostgreSQL). Statements of the
    /// store never contain `?` inside literals.
    pub fn sql(self, q: &str) -> String {
        match self {
            Self::Sqlite | Self::MySql => q.to_string(),
            Self::Postgres => {
                let mut out = String::with_capacity(q.len() + 8);
                let mut n = 0;
                for c in q.chars() {
                    if c == '?' {
                        n += 1;
                        out.push('$');
                        out.push_str(&n.to_string());
                    } else {
                        out.push(c);
                    }
                }
                out
            }
        }
    }

    /// `INSERT INTO table (cols…) VALUES (?…)` that replaces the columns `update` of an existing row with the
    /// same `key`.
    pub fn upsert(self, table: &str, key: &str, cols: &[&str], update: &[&str]) -> String {
        let placeholders = vec!["?"; cols.len()].join(", ");
        let head = format!(
            "INSERT INTO {table} ({}) VALUES ({placeholders})",
            cols.join(", ")
        );
        match self {
            Self::Sqlite | Self::Postgres => {
                let set: Vec<String> = update
                    .iter()
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                format!(
                    "{head} ON CONFLICT ({key}) DO UPDATE SET {}",
                    set.join(", ")
                )
            }
            Self::MySql => {
                let set: Vec<String> = update
                    .iter()
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect();
                format!("{head} ON DUPLICATE KEY UPDATE {}", set.join(", "))
            }
        }
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or(userinfo);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_placeholders_are_numbered() {
        assert_eq!(
            Dialect::Postgres.sql("UPDATE t SET a = ?, b = ? WHERE id = ?"),
            "UPDATE t SET a = $1, b = $2 WHERE id = $3"
        );
        assert_eq!(Dialect::MySql.sql("a = ?"), "a = ?");
    }

    #[test]
    fn urls_select_the_dialect() {
        assert_eq!(
            Dialect::from_url("sqlite:///x.db?mode=rwc").unwrap().0,
            Dialect::Sqlite
        );
        assert_eq!(
            Dialect::from_url("postgres://u@h/db").unwrap().0,
            Dialect::Postgres
        );
        assert_eq!(
            Dialect::from_url("postgresql://u@h/db").unwrap().0,
            Dialect::Postgres
        );
        let (d, url) = Dialect::from_url("mariadb://u:p@h:3306/db").unwrap();
        assert_eq!((d, url.as_str()), (Dialect::MySql, "mysql://u:p@h:3306/db"));
        assert!(Dialect::from_url("redis://h").is_err());
        assert!(Dialect::from_url("no-scheme").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("mysql://u@h/db"), "mysql://u@h/db");
        assert_eq!(
            redact("sqlite:///var/lib/x.db?mode=rwc"),
            "sqlite:///var/lib/x.db?mode=rwc"
        );
    }

    #[test]
    fn upserts_per_dialect() {
        let q = Dialect::MySql.upsert("t", "id", &["id", "a"], &["a"]);
        assert_eq!(
            q,
            "INSERT INTO t (id, a) VALUES (?, ?) ON DUPLICATE KEY UPDATE a = VALUES(a)"
        );
        let q = Dialect::Sqlite.upsert("t", "id", &["id", "a"], &["a"]);
        assert_eq!(
            q,
            "INSERT INTO t (id, a) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET a = excluded.a"
        );
    }
}
