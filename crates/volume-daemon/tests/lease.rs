//! One writer per appliance: two `volume-daemon` processes on one real database (PostgreSQL, MariaDB) and
//! one `cloudsim` process. For the same appliance identity the second exits non-zero naming the first and
//! binds nothing; a daemon whose lease is taken over stops; distinct identities share the database, each
//! managing only its own volumes and refusing the other's with `volume_owned_by_other_appliance`; a daemon
//! started without an identity takes the lease of the one set at run time, or refuses it while another daemon
//! holds that lease.
//! Needs the `cloudsim` binary (cargo build --workspace --bins) and the database servers of `common/db.rs`.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

#[path = "common/db.rs"]
mod db;
mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::processes::bin;
use volume_daemon::store::Store;

const APPLIANCE: &str = "5d0c7e8a-3a5e-4c43-9f0e-6f0b7a1d2c31";

/// A child process killed on drop, with the lines it printed on stdout arriving on `lines`.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The rest of the first stdout line starting with `marker`; `None` when the process ended first.
    fn wait_line(&mut self, marker: &str, within: Duration) -> Option<String> {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(marker) {
                        return Some(rest.trim().to_string());
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits up to `within` for the process to exit; its status and everything it wrote on stderr.
    fn wait_exit(&mut self, within: Duration) -> Option<(ExitStatus, String)> {
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                while let Ok(line) = self.lines.try_recv() {
                    self.seen.push(line);
                }
                return Some((status, err));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

struct World {
    dir: tempfile::TempDir,
    sim_url: String,
    db_url: String,
    _db: db::TestDb,
    _sim: Proc,
}

impl World {
    fn new(db: db::TestDb) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut sim = Proc::spawn(
            Command::new(bin("cloudsim"))
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--state-dir")
                .arg(dir.path().join("sim"))
                .arg("--by-id-dir")
                .arg(dir.path().join("by-id"))
                .arg("--appliance-vm-id")
                .arg(APPLIANCE)
                .args(["--job-delay-ms", "50", "--no-loop-devices"]),
        );
        let addr = sim
            .wait_line("listening on ", Duration::from_secs(30))
            .expect("cloudsim listening");
        Self {
            sim_url: format!("http://{addr}/client/api"),
            db_url: db.url.clone(),
            dir,
            _db: db,
            _sim: sim,
        }
    }

    /// A `serve` process for appliance `vm` with its own state directory `name` (not yet waited for).
    fn daemon(&self, name: &str, vm: &str, lease: (u64, u64)) -> Proc {
        self.daemon_for(name, Some(vm), lease)
    }

    /// A `serve` process for appliance `vm`, or without a configured identity (not yet waited for).
    fn daemon_for(&self, name: &str, vm: Option<&str>, lease: (u64, u64)) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_volume-daemon"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(self.dir.path().join(name))
            .args(["--database", &self.db_url])
            .args(["--cloudstack-url", &self.sim_url])
            .args([
                "--cloudstack-api-key",
                "sim-api-key",
                "--cloudstack-secret-key",
                "sim-secret-key",
            ])
            .args(vm.map(|vm| ["--appliance-vm-id", vm]).into_iter().flatten())
            .arg("--by-id-dir")
            .arg(self.dir.path().join("by-id"))
            .env("VOLUME_DAEMON_LEASE_TTL_SECS", lease.0.to_string())
            .env("VOLUME_DAEMON_LEASE_HEARTBEAT_SECS", lease.1.to_string())
            .env("VOLUME_DAEMON_ALLOW_REGULAR_FILES", "true")
            .env("RUST_LOG", "warn");
        Proc::spawn(&mut cmd)
    }

    /// A daemon that serves: its process and its API base URL.
    fn serving(&self, name: &str, vm: &str, lease: (u64, u64)) -> (Proc, String) {
        self.serving_for(name, Some(vm), lease)
    }

    /// A daemon that serves, for `vm` or without a configured identity: its process and its API base URL.
    fn serving_for(&self, name: &str, vm: Option<&str>, lease: (u64, u64)) -> (Proc, String) {
        let mut p = self.daemon_for(name, vm, lease);
        let addr = p
            .wait_line("api listening on ", Duration::from_secs(60))
            .unwrap_or_else(|| {
                let out = p.wait_exit(Duration::from_secs(5));
                panic!("daemon {name} did not serve: {out:?}")
            });
        (p, format!("http://{addr}/api/v1"))
    }

    /// A signed CloudStack call through the real client.
    async fn cloud(&self, command: &str) -> Value {
        let client = cloudstack::Client::new(cloudstack::Config {
            url: self.sim_url.clone(),
            api_key: "sim-api-key".into(),
            secret_key: cloudstack::Secret::new("sim-secret-key"),
            ..cloudstack::Config::default()
        })
        .unwrap();
        client.request(command, &[]).await.unwrap()
    }

    /// The simulator's VMs other than the first appliance.
    async fn other_vms(&self) -> Vec<String> {
        let vms = self.cloud("listVirtualMachines").await;
        vms["virtualmachine"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["id"].as_str())
            .filter(|id| *id != APPLIANCE)
            .map(str::to_string)
            .collect()
    }

    /// A create request for a 1 GiB volume named `name` in the simulator's zone.
    async fn create_body(&self, name: &str) -> Value {
        let zones = self.cloud("listZones").await;
        let offs = self.cloud("listDiskOfferings").await;
        let off = offs["diskoffering"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["iscustomized"] == true)
            .expect("custom offering")["id"]
            .clone();
        json!({"name": name, "size": cloudstack::GIB, "zone_id": zones["zone"][0]["id"], "disk_offering_id": off})
    }
}

async fn call(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .timeout(Duration::from_secs(120));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Runs the operation submitted by `(status, body)` to its end; it must complete.
async fn completed(api: &str, submitted: (u16, Value)) -> Value {
    let (s, op) = submitted;
    assert_eq!(s, 201, "{op}");
    let (s, done) = call(
        reqwest::Method::GET,
        &format!("{api}/operations/{}?wait=60", op["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["status"], "completed", "{done}");
    done
}

async fn create(world: &World, api: &str, name: &str) -> String {
    let body = world.create_body(name).await;
    let done = completed(
        api,
        call(reqwest::Method::POST, &format!("{api}/volumes"), Some(body)).await,
    )
    .await;
    done["response"]["volume_id"].as_str().unwrap().to_string()
}

fn host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

async fn same_identity_second_daemon_exits_naming_the_holder(db: db::TestDb) {
    let world = World::new(db);
    let (first, api) = world.serving("first", APPLIANCE, (30, 5));
    let (s, _) = call(reqwest::Method::GET, &format!("{api}/health"), None).await;
    assert_eq!(s, 200);

    let mut second = world.daemon("second", APPLIANCE, (30, 5));
    let (status, stderr) = second
        .wait_exit(Duration::from_secs(60))
        .expect("the second daemon exits");
    assert!(!status.success(), "second daemon: {status}; {stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())) && stderr.contains(&host()),
        "the error names the holder (pid {} on {}): {stderr}",
        first.pid(),
        host()
    );
    assert!(stderr.contains("last heartbeat"), "{stderr}");
    assert!(
        !second.seen.iter().any(|l| l.contains("listening")),
        "the second daemon bound a listener: {:?}",
        second.seen
    );
    // The first still serves, with the token it took.
    let (s, v) = call(reqwest::Method::GET, &format!("{api}/volumes"), None).await;
    assert_eq!(s, 200, "{v}");
    let store = Store::connect(&world.db_url).await.unwrap();
    let lease = store.lease_of(APPLIANCE).await.unwrap().unwrap();
    assert_eq!(lease.pid, i64::from(first.pid()));
    assert_eq!(lease.token, 1);
    store.close().await;
}

async fn distinct_identities_share_the_database(db: db::TestDb) {
    let world = World::new(db);
    let others = world.other_vms().await;
    assert!(others.len() >= 2, "the simulator has spare VMs: {others:?}");
    let (_a, api_a) = world.serving("a", APPLIANCE, (30, 5));
    let (_b, api_b) = world.serving("b", &others[0], (30, 5));

    let vol_a = create(&world, &api_a, "of-a").await;
    let vol_b = create(&world, &api_b, "of-b").await;
    // Each attaches its own volume to a third VM (a remote attach needs no device).
    let remote = &others[1];
    completed(
        &api_a,
        call(
            reqwest::Method::POST,
            &format!("{api_a}/volumes/{vol_a}/attach"),
            Some(json!({"vm_id": remote})),
        )
        .await,
    )
    .await;

    // Each lists only its own volumes, operations and attachments.
    for (api, own, other) in [(&api_a, &vol_a, &vol_b), (&api_b, &vol_b, &vol_a)] {
        let (s, list) = call(reqwest::Method::GET, &format!("{api}/volumes"), None).await;
        assert_eq!(s, 200, "{list}");
        let ids: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["volume_id"].as_str())
            .collect();
        assert_eq!(ids, vec![own.as_str()], "{list}");
        let (_, ops) = call(reqwest::Method::GET, &format!("{api}/operations"), None).await;
        assert!(
            ops.as_array()
                .unwrap()
                .iter()
                .all(|o| o["volume_id"] != other.as_str()),
            "{ops}"
        );
    }
    let (_, on_remote) = call(
        reqwest::Method::GET,
        &format!("{api_b}/vms/{remote}/volumes"),
        None,
    )
    .await;
    assert!(
        !on_remote.to_string().contains(vol_a.as_str()),
        "B sees A's attachment: {on_remote}"
    );

    // A request for the other's volume is refused, whatever it is.
    let refused = [
        (
            reqwest::Method::GET,
            format!("{api_a}/volumes/{vol_b}"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("{api_a}/volumes/{vol_b}/attach"),
            Some(json!({"vm_id": remote})),
        ),
        (
            reqwest::Method::POST,
            format!("{api_b}/volumes/{vol_a}/detach"),
            Some(json!({})),
        ),
        (
            reqwest::Method::DELETE,
            format!("{api_b}/volumes/{vol_a}"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("{api_b}/exports/{vol_a}"),
            None,
        ),
        (
            reqwest::Method::GET,
            format!("{api_a}/volumes/{vol_b}/snapshots"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("{api_a}/volumes/{vol_b}/snapshots"),
            Some(json!({})),
        ),
        (
            reqwest::Method::POST,
            format!("{api_a}/snapshots/track"),
            Some(json!({"volume_uuid": vol_b, "vm_context_id": "ctx-1", "snapshot_id": "snap-1"})),
        ),
        (
            reqwest::Method::PUT,
            format!("{api_b}/snapshots/{vol_a}"),
            Some(json!({"snapshot_status": "ready"})),
        ),
    ];
    for (method, url, body) in refused {
        let (s, v) = call(method.clone(), &url, body).await;
        assert_eq!(s, 409, "{method} {url}: {v}");
        assert_eq!(v["code"], "volume_owned_by_other_appliance", "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("belongs to appliance"),
            "{v}"
        );
    }
    // Nothing changed: A's volume is still attached to the remote VM, B's still exists.
    let (_, va) = call(
        reqwest::Method::GET,
        &format!("{api_a}/volumes/{vol_a}"),
        None,
    )
    .await;
    assert_eq!(va["attachment"]["vm_id"], remote.as_str(), "{va}");
    let (s, vb) = call(
        reqwest::Method::GET,
        &format!("{api_b}/volumes/{vol_b}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{vb}");
    // The same Idempotency-Key used by both appliances names two requests, one each.
    let mut ops = Vec::new();
    for api in [&api_a, &api_b] {
        let body = world.create_body("keyed").await;
        let resp = reqwest::Client::new()
            .post(format!("{api}/volumes"))
            .header("Idempotency-Key", "shared-key")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "{api}");
        let op: Value = resp.json().await.unwrap();
        ops.push(op["id"].as_str().unwrap().to_string());
    }
    assert_ne!(ops[0], ops[1], "each appliance journals its own operation");
}

async fn lost_lease_stops_the_daemon(db: db::TestDb) {
    let world = World::new(db);
    let (mut first, api) = world.serving("first", APPLIANCE, (3, 1));
    // A writer holds a session on one of the first daemon's exports.
    let nbd_addr = first
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("nbd listening on "))
        .expect("the daemon names its NBD address")
        .trim()
        .to_string();
    let vol = create(&world, &api, "fenced-writes").await;
    let attached = completed(
        &api,
        call(
            reqwest::Method::POST,
            &format!("{api}/volumes/{vol}/attach"),
            Some(json!({"vm_id": APPLIANCE})),
        )
        .await,
    )
    .await;
    let export = attached["response"]["export_name"].as_str().unwrap();
    let mut writer = nbd::client::Handshake::connect(nbd_addr.as_str())
        .await
        .unwrap()
        .go(export)
        .await
        .unwrap();
    writer.write(0, &[b'A'; 4096], 0).await.unwrap();
    writer.flush().await.unwrap();
    // The first stops heartbeating (frozen, as a hung host would be); its lease expires and a second daemon
    // for the same appliance takes it over.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first.pid() as i32).unwrap(),
        rustix::process::Signal::STOP,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_second, api2) = world.serving("second", APPLIANCE, (3, 1));
    let store = Store::connect(&world.db_url).await.unwrap();
    let lease = store.lease_of(APPLIANCE).await.unwrap().unwrap();
    assert_eq!(lease.token, 2, "takeover increments the fencing token");
    // The writer's next WRITE and FLUSH wait in the frozen daemon's socket.
    let late = tokio::spawn(async move {
        let wrote = writer.write(4096, &[b'Z'; 4096], 0).await;
        let flushed = writer.flush().await;
        (wrote, flushed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Woken, the first finds its lease gone at its next heartbeat: it closes its exports and exits non-zero.
    // Before that, it runs no write: its right to write lapsed with the lease, whatever it has noticed.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first.pid() as i32).unwrap(),
        rustix::process::Signal::CONT,
    )
    .unwrap();
    let (wrote, flushed) = tokio::time::timeout(Duration::from_secs(20), late)
        .await
        .expect("the late requests are answered or their connection closed")
        .unwrap();
    assert!(
        wrote.is_err() && flushed.is_err(),
        "a daemon whose lease was taken over acknowledged a write ({wrote:?}) or a flush ({flushed:?})"
    );
    let (status, stderr) = first
        .wait_exit(Duration::from_secs(20))
        .expect("the fenced daemon exits");
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("lease was lost"), "{stderr}");
    // The second serves on.
    let (s, _) = call(reqwest::Method::GET, &format!("{api2}/volumes"), None).await;
    assert_eq!(s, 200);
    let lease = store.lease_of(APPLIANCE).await.unwrap().unwrap();
    assert_eq!(lease.token, 2);
    store.close().await;
}

/// The `/health` detail of component `lease`.
async fn lease_detail(api: &str) -> String {
    let (_, h) = call(reqwest::Method::GET, &format!("{api}/health"), None).await;
    h["components"]["lease"]["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no lease component: {h}"))
        .to_string()
}

async fn identity_set_at_run_time_takes_the_lease(db: db::TestDb) {
    let world = World::new(db);
    let others = world.other_vms().await;
    let (other, _) = world.serving("other", &others[0], (30, 5));
    let (first, api) = world.serving_for("first", None, (30, 5));
    assert!(lease_detail(&api).await.contains("(identity unknown)"));
    let vol = create(&world, &api, "before-the-identity").await;

    // Another daemon serves others[0]: this one may not become it, and nothing changes.
    let (s, v) = call(
        reqwest::Method::PUT,
        &format!("{api}/appliance"),
        Some(json!({"vm_id": others[0]})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["code"], "appliance_lease_held", "{v}");
    assert_eq!(v["field"], "vm_id", "{v}");
    assert!(v["error"].as_str().unwrap().contains("pid "), "{v}");
    let (_, shown) = call(reqwest::Method::GET, &format!("{api}/appliance"), None).await;
    assert!(shown["vm_id"].is_null(), "{shown}");
    assert!(lease_detail(&api).await.contains("(identity unknown)"));
    let store = Store::connect(&world.db_url).await.unwrap();
    let held = store.lease_of(&others[0]).await.unwrap().unwrap();
    assert_eq!((held.pid, held.token), (i64::from(other.pid()), 1));

    // A free appliance: its lease is taken before the identity takes effect, the one held for the unknown
    // identity is released, and the records written meanwhile go with the lease.
    let (s, v) = call(
        reqwest::Method::PUT,
        &format!("{api}/appliance"),
        Some(json!({"vm_id": APPLIANCE})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let lease = store.lease_of(APPLIANCE).await.unwrap().unwrap();
    assert_eq!((lease.pid, lease.token), (i64::from(first.pid()), 1));
    assert!(lease.expires_at > chrono::Utc::now());
    let unknown = store.lease_of("").await.unwrap().unwrap();
    assert!(unknown.expires_at <= chrono::Utc::now(), "{unknown:?}");
    let detail = lease_detail(&api).await;
    assert!(detail.contains(APPLIANCE), "{detail}");
    let owner = store
        .reading_as("nobody")
        .foreign_owner(vol.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(owner.as_deref(), Some(APPLIANCE));

    // A second daemon for that appliance now exits naming the first, as at start-up.
    let mut second = world.daemon("second", APPLIANCE, (30, 5));
    let (status, stderr) = second
        .wait_exit(Duration::from_secs(60))
        .expect("the second daemon exits");
    assert!(!status.success(), "second daemon: {status}; {stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    assert!(
        !second.seen.iter().any(|l| l.contains("listening")),
        "{:?}",
        second.seen
    );
    let (s, v) = call(reqwest::Method::GET, &format!("{api}/volumes/{vol}"), None).await;
    assert_eq!(s, 200, "{v}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_set_at_run_time_takes_the_lease_on_sqlite() {
    identity_set_at_run_time_takes_the_lease(db::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_postgres_identity_set_at_run_time_takes_the_lease() {
    identity_set_at_run_time_takes_the_lease(db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_mariadb_identity_set_at_run_time_takes_the_lease() {
    identity_set_at_run_time_takes_the_lease(db::mariadb().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_postgres_same_identity_second_daemon_exits_naming_the_holder() {
    same_identity_second_daemon_exits_naming_the_holder(db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_postgres_distinct_identities_share_the_database() {
    distinct_identities_share_the_database(db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_postgres_lost_lease_stops_the_daemon() {
    lost_lease_stops_the_daemon(db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_mariadb_same_identity_second_daemon_exits_naming_the_holder() {
    same_identity_second_daemon_exits_naming_the_holder(db::mariadb().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_mariadb_distinct_identities_share_the_database() {
    distinct_identities_share_the_database(db::mariadb().await).await;
}
