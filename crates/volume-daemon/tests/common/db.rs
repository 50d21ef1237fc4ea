//! Throwaway databases for tests: a SQLite file in a temp dir, or a fresh database on a private PostgreSQL
//! or MariaDB server that this process starts on a free port in its own temp dir and stops at exit.
//!
//! One server per test binary and backend; every test gets its own database on it. Missing server binaries
//! make the test fail with a message naming the package to install.

#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection, Executor};
use tokio::sync::OnceCell;

/// Declares each named `async fn NAME(db: &TestDb) -> anyhow::Result<()>` of the including file as a test on
/// each database: `sqlite::NAME`, `ext_postgres::NAME` and `ext_mariadb::NAME`. Include this module with
/// `#[macro_use]` and call the macro after it.
#[allow(unused_macros)]
macro_rules! on_every_database {
    ($($test:ident),* $(,)?) => {
        on_every_database!(@on sqlite, crate::db::sqlite(), $($test),*);
        on_every_database!(@on ext_postgres, crate::db::postgres().await, $($test),*);
        on_every_database!(@on ext_mariadb, crate::db::mariadb().await, $($test),*);
    };
    (@on $module:ident, $open:expr, $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let db = $open;
                    if let Err(e) = super::$test(&db).await {
                        panic!("{e:#}");
                    }
                }
            )*
        }
    };
}

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A database for one test. Dropping it removes a SQLite database; server databases go with the server.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MariaDb,
}

impl Backend {
    /// The migration directory name of this backend.
    pub fn migrations(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::MariaDb => "mysql",
        }
    }
}

/// A SQLite database file in a new temp dir.
pub fn sqlite() -> TestDb {
    let dir = tempfile::Builder::new()
        .prefix("store-sqlite-")
        .tempdir()
        .expect("create a temp dir for SQLite");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("state.db").display()
    );
    TestDb {
        url,
        backend: Backend::Sqlite,
        _dir: Some(dir),
    }
}

static NEXT_DB: AtomicU32 = AtomicU32::new(1);

fn db_name() -> String {
    format!(
        "store_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    )
}

// ---- server bookkeeping --------------------------------------------------------------------------------

struct Running {
    child: Child,
    dir: PathBuf,
}

/// Servers this process started, stopped (and their dirs removed) at exit.
static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());

extern "C" fn stop_servers_at_exit() {
    let mut running = match RUNNING.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    for r in running.drain(..) {
        stop(r);
    }
}

fn stop(mut r: Running) {
    if let Ok(pid) = i32::try_from(r.child.id()) {
        // SAFETY: sends a signal to the child this process started and has not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match r.child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _ = std::fs::remove_dir_all(&r.dir);
}

fn register(child: Child, dir: PathBuf) {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function without arguments.
        let rc = unsafe { libc::atexit(stop_servers_at_exit) };
        assert_eq!(rc, 0, "atexit failed");
    });
    RUNNING
        .lock()
        .expect("server list lock")
        .push(Running { child, dir });
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

fn server_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temp dir for the server")
        .keep();
    dir
}

/// uid and gid of a system user, when running as root (servers refuse to run as root).
fn system_user(name: &str) -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let cname = std::ffi::CString::new(name).expect("user name without NUL");
    // getpwnam_r, not getpwnam: tests start PostgreSQL and MariaDB from parallel threads, and getpwnam's
    // one static record would let one thread read the other's user (a server dir chowned to the wrong
    // user, so the server cannot create its socket there).
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: cname is NUL-terminated; pwd, buf (with its true length) and found outlive the call, which
    // writes only into them.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    assert!(
        rc == 0 && !found.is_null(),
        "system user {name:?} does not exist (getpwnam_r: {rc}); install the server package that creates it"
    );
    Some((pwd.pw_uid, pwd.pw_gid))
}

fn chown_tree(path: &Path, ids: Option<(u32, u32)>) {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the server dir");
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(3000);
    s[start..].to_string()
}

fn run_checked(cmd: &mut Command, what: &str, log: &Path) {
    let out = cmd
        .stdout(File::create(log).expect("create log"))
        .stderr(Stdio::from(
            File::options().append(true).open(log).expect("open log"),
        ))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(out.success(), "{what} failed ({out}):\n{}", log_tail(log));
}

fn spawn(cmd: &mut Command, what: &str, log: &Path) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(File::create(log).expect("create log"))
        .stderr(Stdio::from(
            File::options().append(true).open(log).expect("open log"),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

/// Polls `connect` until it succeeds; fails when the server exits or the deadline passes.
async fn wait_ready<F, Fut>(what: &str, log: &Path, pid: u32, mut connect: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let err = match connect().await {
            Ok(()) => return,
            Err(e) => e,
        };
        let exited = {
            let mut running = RUNNING.lock().expect("server list lock");
            running
                .iter_mut()
                .find(|r| r.child.id() == pid)
                .map(|r| matches!(r.child.try_wait(), Ok(Some(_))))
                .unwrap_or(true)
        };
        assert!(
            !exited,
            "{what} exited before accepting connections:\n{}",
            log_tail(log)
        );
        assert!(
            Instant::now() < deadline,
            "{what} did not accept connections within {READY_TIMEOUT:?} (last error: {err}):\n{}",
            log_tail(log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- PostgreSQL ----------------------------------------------------------------------------------------

struct PgServer {
    port: u16,
}

fn pg_bin(name: &str) -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let p = e.path().join("bin").join(name);
            p.exists().then_some((v, p))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!("PostgreSQL server binary {name} not found under /usr/lib/postgresql/*/bin; apt-get install postgresql")
        })
}

async fn pg_server() -> &'static PgServer {
    static SERVER: OnceCell<PgServer> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let initdb = pg_bin("initdb");
            let postgres = pg_bin("postgres");
            let ids = system_user("postgres");
            let dir = server_dir("store-pg-");
            chown_tree(&dir, ids);
            let data = dir.join("data");
            let log = dir.join("server.log");
            let mut init = Command::new(&initdb);
            init.current_dir(&dir).args(["-D"]).arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            if let Some((uid, gid)) = ids {
                std::os::unix::process::CommandExt::uid(&mut init, uid);
                std::os::unix::process::CommandExt::gid(&mut init, gid);
            }
            run_checked(&mut init, "initdb", &dir.join("initdb.log"));
            let port = free_port();
            let mut cmd = Command::new(&postgres);
            cmd.current_dir(&dir)
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&dir)
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "fsync=off", "-c", "max_connections=300"]);
            if let Some((uid, gid)) = ids {
                std::os::unix::process::CommandExt::uid(&mut cmd, uid);
                std::os::unix::process::CommandExt::gid(&mut cmd, gid);
            }
            let child = spawn(&mut cmd, "postgres", &log);
            let pid = child.id();
            register(child, dir.clone());
            let opts = sqlx::postgres::PgConnectOptions::new()
                .host("127.0.0.1")
                .port(port)
                .username("postgres")
                .database("postgres");
            wait_ready("postgres", &log, pid, || {
                let opts = opts.clone();
                async move { opts.connect().await?.close().await }
            })
            .await;
            PgServer { port }
        })
        .await
}

/// A fresh database on this process's PostgreSQL server.
pub async fn postgres() -> TestDb {
    let server = pg_server().await;
    let name = db_name();
    let mut admin = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(server.port)
        .username("postgres")
        .database("postgres")
        .connect()
        .await
        .expect("connect to the test PostgreSQL server");
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    TestDb {
        url: format!("postgres://postgres@127.0.0.1:{}/{name}", server.port),
        backend: Backend::Postgres,
        _dir: None,
    }
}

// ---- MariaDB -------------------------------------------------------------------------------------------

struct MariaServer {
    port: u16,
}

const MARIA_USER: &str = "store";
const MARIA_PASSWORD: &str = "store-test";

fn which(name: &str, dirs: &[&str]) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

async fn maria_server() -> &'static MariaServer {
    static SERVER: OnceCell<MariaServer> = OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let bins = ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"];
            let install = which("mariadb-install-db", &bins)
                .expect("mariadb-install-db not found; apt-get install mariadb-server");
            let server = which("mariadbd", &bins)
                .expect("mariadbd not found; apt-get install mariadb-server");
            let ids = system_user("mysql");
            let dir = server_dir("store-maria-");
            chown_tree(&dir, ids);
            let data = dir.join("data");
            let socket = dir.join("mariadbd.sock");
            let user = if ids.is_some() {
                "--user=mysql".to_string()
            } else {
                String::new()
            };
            let mut init = Command::new(&install);
            init.current_dir(&dir)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg("--auth-root-authentication-method=normal")
                .arg("--skip-name-resolve");
            if ids.is_some() {
                init.arg(&user);
            }
            run_checked(&mut init, "mariadb-install-db", &dir.join("install.log"));
            let port = free_port();
            let log = dir.join("error.log");
            let mut cmd = Command::new(&server);
            cmd.current_dir(&dir)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--port={port}"))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", dir.join("mariadbd.pid").display()))
                .arg("--bind-address=127.0.0.1")
                .arg("--skip-name-resolve")
                .arg("--innodb-flush-log-at-trx-commit=0")
                .arg("--max-connections=500");
            if ids.is_some() {
                cmd.arg(&user);
            }
            let child = spawn(&mut cmd, "mariadbd", &log);
            let pid = child.id();
            register(child, dir.clone());
            let root = sqlx::mysql::MySqlConnectOptions::new()
                .socket(&socket)
                .username("root");
            wait_ready("mariadbd", &log, pid, || {
                let root = root.clone();
                async move { root.connect().await?.close().await }
            })
            .await;
            let mut admin = root.connect().await.expect("connect to MariaDB as root");
            for stmt in [
                format!("CREATE USER '{MARIA_USER}'@'%' IDENTIFIED BY '{MARIA_PASSWORD}'"),
                format!("GRANT ALL PRIVILEGES ON *.* TO '{MARIA_USER}'@'%'"),
            ] {
                admin
                    .execute(stmt.as_str())
                    .await
                    .expect("create the test user");
            }
            let _ = admin.close().await;
            MariaServer { port }
        })
        .await
}

/// A fresh database on this process's MariaDB server.
pub async fn mariadb() -> TestDb {
    let server = maria_server().await;
    let name = db_name();
    let mut admin = sqlx::mysql::MySqlConnectOptions::new()
        .host("127.0.0.1")
        .port(server.port)
        .username(MARIA_USER)
        .password(MARIA_PASSWORD)
        .connect()
        .await
        .expect("connect to the test MariaDB server");
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    TestDb {
        url: format!(
            "mariadb://{MARIA_USER}:{MARIA_PASSWORD}@127.0.0.1:{}/{name}",
            server.port
        ),
        backend: Backend::MariaDb,
        _dir: None,
    }
}
