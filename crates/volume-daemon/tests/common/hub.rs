//! The migration platform's hub for tests: its four tables (as the appliance's production schema defines
//! them, without the foreign keys to hub tables the daemon never touches) in a fresh MariaDB database, a
//! write audit (triggers) to count what the daemon writes, and a TCP proxy in front of it whose outage the
//! test controls.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::mysql::MySqlPool;
use sqlx::{Executor, Row};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::db;

pub const TABLES: &[&str] = &[
    "CREATE TABLE ossea_configs (
  id bigint(20) NOT NULL AUTO_INCREMENT,
  name varchar(191) NOT NULL,
  api_url longtext NOT NULL,
  api_key longtext NOT NULL,
  secret_key longtext NOT NULL,
  domain longtext DEFAULT NULL,
  zone longtext NOT NULL,
  template_id longtext DEFAULT NULL,
  network_id longtext DEFAULT NULL,
  service_offering_id longtext DEFAULT NULL,
  disk_offering_id longtext DEFAULT NULL,
  oma_vm_id longtext DEFAULT NULL,
  created_at datetime(3) DEFAULT NULL,
  updated_at datetime(3) DEFAULT NULL,
  is_active tinyint(1) DEFAULT 1,
  PRIMARY KEY (id),
  UNIQUE KEY idx_ossea_configs_name (name)
)",
    "CREATE TABLE ossea_volumes (
  id bigint(20) NOT NULL AUTO_INCREMENT,
  vm_context_id varchar(64) DEFAULT NULL,
  volume_id varchar(191) NOT NULL,
  volume_name longtext NOT NULL,
  size_gb bigint(20) NOT NULL,
  ossea_config_id bigint(20) DEFAULT NULL,
  volume_type longtext DEFAULT NULL,
  device_path longtext DEFAULT NULL,
  mount_point longtext DEFAULT NULL,
  status varchar(191) DEFAULT 'creating',
  created_at datetime(3) DEFAULT NULL,
  updated_at datetime(3) DEFAULT NULL,
  snapshot_id varchar(191) DEFAULT NULL,
  snapshot_created_at timestamp NULL DEFAULT NULL,
  snapshot_status varchar(50) DEFAULT 'none',
  PRIMARY KEY (id),
  UNIQUE KEY idx_ossea_volumes_volume_id (volume_id)
)",
    "CREATE TABLE device_mappings (
  id varchar(64) NOT NULL DEFAULT uuid(),
  vm_context_id varchar(64) DEFAULT NULL,
  volume_uuid varchar(64) NOT NULL,
  volume_id_numeric bigint(20) DEFAULT NULL,
  vm_id varchar(64) NOT NULL,
  operation_mode enum('oma','failover') DEFAULT 'oma',
  cloudstack_device_id int(11) DEFAULT NULL,
  requires_device_correlation tinyint(1) DEFAULT 1,
  device_path varchar(255) NOT NULL,
  cloudstack_state varchar(32) NOT NULL,
  linux_state varchar(32) NOT NULL,
  size bigint(20) NOT NULL,
  last_sync timestamp NULL DEFAULT current_timestamp(),
  created_at timestamp NULL DEFAULT current_timestamp(),
  updated_at timestamp NULL DEFAULT current_timestamp() ON UPDATE current_timestamp(),
  ossea_snapshot_id varchar(191) DEFAULT NULL,
  snapshot_created_at timestamp NULL DEFAULT NULL,
  snapshot_status varchar(50) DEFAULT 'none',
  persistent_device_name varchar(255) DEFAULT NULL,
  symlink_path varchar(255) DEFAULT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY volume_id (volume_uuid),
  UNIQUE KEY unique_volume_id (volume_uuid),
  UNIQUE KEY unique_device_path (device_path),
  KEY idx_device_mappings_vm_id (vm_id)
)",
    "CREATE TABLE nbd_exports (
  id bigint(20) unsigned NOT NULL AUTO_INCREMENT,
  vm_context_id varchar(64) DEFAULT NULL,
  job_id varchar(191) DEFAULT NULL,
  volume_id varchar(64) DEFAULT '',
  vm_disk_id bigint(20) DEFAULT NULL,
  device_mapping_uuid varchar(64) DEFAULT NULL,
  export_name varchar(191) NOT NULL,
  port bigint(20) NOT NULL,
  device_path longtext NOT NULL,
  config_path longtext DEFAULT '',
  status varchar(191) NOT NULL DEFAULT 'pending',
  created_at datetime(3) DEFAULT NULL,
  updated_at datetime(3) DEFAULT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uni_nbd_exports_export_name (export_name),
  KEY fk_nbd_device (device_mapping_uuid),
  CONSTRAINT fk_nbd_device FOREIGN KEY (device_mapping_uuid) REFERENCES device_mappings (volume_uuid) ON DELETE CASCADE
)",
];

/// A hub database with the four tables (only those named in `only`, when given) and the write audit.
pub struct TestHub {
    pub db: db::TestDb,
    pub pool: MySqlPool,
}

impl TestHub {
    pub async fn new() -> Self {
        Self::with_tables(TABLES).await
    }

    pub async fn with_tables(tables: &[&str]) -> Self {
        let db = db::mariadb().await;
        let url = db.url.replacen("mariadb://", "mysql://", 1);
        let pool = MySqlPool::connect(&url).await.unwrap();
        for t in tables {
            pool.execute(*t).await.unwrap();
        }
        pool.execute(
            "CREATE TABLE hub_audit (id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY, tbl varchar(32), op varchar(8))",
        )
        .await
        .unwrap();
        let existing: Vec<String> = sqlx::query("SHOW TABLES")
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        for tbl in ["device_mappings", "nbd_exports", "ossea_volumes"] {
            if !existing.iter().any(|t| t == tbl) {
                continue;
            }
            for op in ["INSERT", "UPDATE", "DELETE"] {
                let sql = format!(
                    "CREATE TRIGGER audit_{tbl}_{op} AFTER {op} ON {tbl} FOR EACH ROW \
                     INSERT INTO hub_audit (tbl, op) VALUES ('{tbl}', '{op}')"
                );
                pool.execute(sql.as_str()).await.unwrap();
            }
        }
        Self { db, pool }
    }

    /// The database's port and URL with another port (the proxy's).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        let (head, rest) = self.db.url.split_once("@127.0.0.1:").unwrap();
        let (_, tail) = rest.split_once('/').unwrap();
        format!("{head}@{addr}/{tail}")
    }

    pub fn port(&self) -> u16 {
        let (_, rest) = self.db.url.split_once("@127.0.0.1:").unwrap();
        rest.split_once('/').unwrap().0.parse().unwrap()
    }

    /// Writes the daemon made to `tbl` with `op` (INSERT, UPDATE, DELETE).
    pub async fn writes(&self, tbl: &str, op: &str) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM hub_audit WHERE tbl = ? AND op = ?")
            .bind(tbl)
            .bind(op)
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get(0)
    }

    /// Every audited write.
    pub async fn all_writes(&self) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM hub_audit")
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .get(0)
    }

    /// Audited writes a daemon can make (the hub's own inserts into ossea_volumes excluded).
    pub async fn daemon_writes(&self) -> i64 {
        sqlx::query(
            "SELECT COUNT(*) FROM hub_audit WHERE NOT (tbl = 'ossea_volumes' AND op = 'INSERT')",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
        .get(0)
    }

    pub async fn set_appliance(&self, active: &str, inactive: &str) {
        for (name, id, on) in [("old", inactive, 0), ("production", active, 1)] {
            sqlx::query(
                "INSERT INTO ossea_configs (name, api_url, api_key, secret_key, zone, oma_vm_id, is_active) \
                 VALUES (?, 'http://cloud', 'k', 's', 'zone', ?, ?)",
            )
            .bind(name)
            .bind(id)
            .bind(on)
            .execute(&self.pool)
            .await
            .unwrap();
        }
    }

    /// A volume row as the hub creates it.
    pub async fn add_volume(&self, volume: &str, context: &str) {
        sqlx::query(
            "INSERT INTO ossea_volumes (vm_context_id, volume_id, volume_name, size_gb, status, created_at, updated_at) \
             VALUES (?, ?, 'disk', 1, 'creating', NOW(3), NOW(3))",
        )
        .bind(context)
        .bind(volume)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// `device_mappings` of the volume: (vm_id, operation_mode, device_path, cloudstack_device_id,
    /// linux_state, size, persistent_device_name, symlink_path, vm_context_id, id).
    pub async fn mapping(&self, volume: &str) -> Option<Mapping> {
        sqlx::query(
            "SELECT id, vm_id, CAST(operation_mode AS CHAR) AS operation_mode, device_path, cloudstack_device_id, \
             cloudstack_state, linux_state, size, persistent_device_name, symlink_path, vm_context_id \
             FROM device_mappings WHERE volume_uuid = ?",
        )
        .bind(volume)
        .fetch_optional(&self.pool)
        .await
        .unwrap()
        .map(|r| Mapping {
            id: r.get("id"),
            vm_id: r.get("vm_id"),
            operation_mode: r.get("operation_mode"),
            device_path: r.get("device_path"),
            cloudstack_device_id: r.get("cloudstack_device_id"),
            cloudstack_state: r.get("cloudstack_state"),
            linux_state: r.get("linux_state"),
            size: r.get("size"),
            persistent_device_name: r.get("persistent_device_name"),
            symlink_path: r.get("symlink_path"),
            vm_context_id: r.get("vm_context_id"),
        })
    }

    /// `nbd_exports` rows of the volume.
    pub async fn exports(&self, volume: &str) -> Vec<ExportRow> {
        sqlx::query(
            "SELECT id, export_name, port, device_path, status, device_mapping_uuid, vm_context_id \
             FROM nbd_exports WHERE volume_id = ? ORDER BY id",
        )
        .bind(volume)
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| ExportRow {
            id: r.get("id"),
            export_name: r.get("export_name"),
            port: r.get("port"),
            device_path: r.get("device_path"),
            status: r.get("status"),
            device_mapping_uuid: r.get("device_mapping_uuid"),
            vm_context_id: r.get("vm_context_id"),
        })
        .collect()
    }

    /// `ossea_volumes` (status, device_path) of the volume.
    pub async fn volume(&self, volume: &str) -> (Option<String>, Option<String>) {
        let r = sqlx::query("SELECT status, device_path FROM ossea_volumes WHERE volume_id = ?")
            .bind(volume)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        (r.get("status"), r.get("device_path"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub id: String,
    pub vm_id: String,
    pub operation_mode: String,
    pub device_path: String,
    pub cloudstack_device_id: Option<i32>,
    pub cloudstack_state: String,
    pub linux_state: String,
    pub size: i64,
    pub persistent_device_name: Option<String>,
    pub symlink_path: Option<String>,
    pub vm_context_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    pub id: u64,
    pub export_name: String,
    pub port: i64,
    pub device_path: String,
    pub status: String,
    pub device_mapping_uuid: Option<String>,
    pub vm_context_id: Option<String>,
}

/// A TCP proxy to `upstream` whose outage the test switches: while down, every connection is cut and new
/// ones are closed at once.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (up, conns) = (Arc::clone(&up), Arc::clone(&conns));
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) =
                            TcpStream::connect(("127.0.0.1", upstream_port)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().unwrap().push(task);
                }
            })
        };
        Self {
            addr,
            up,
            conns,
            accept,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.down();
    }
}
