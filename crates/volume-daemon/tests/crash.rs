//! Crash recovery: the simulator and the daemon run as separate processes; the daemon is killed with
//! SIGKILL while an attach or a detach is in flight, at several journaled steps, and restarted. Every
//! operation must reach a terminal state, the cloud and the database must agree, and the export must be
//! served exactly when the volume is attached to the appliance. Needs the `cloudsim` binary and nbdinfo.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const APPLIANCE: &str = "1b2f6a7e-0c55-4d0f-9a41-3c3f9e0e2a11";

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .parent()
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: build all binaries first (cargo build --workspace --bins; scripts/test does)",
        p.display()
    );
    p
}

/// A child process killed on drop; reads the `... listening on ADDR` line it prints.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(cmd: &mut Command, marker: &str) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut found = None;
    for line in lines.by_ref() {
        let line = line.expect("stdout line");
        if let Some(addr) = line.strip_prefix(marker) {
            found = Some(addr.trim().to_string());
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let addr = found.unwrap_or_else(|| panic!("process exited before printing {marker:?}"));
    (Proc { child }, addr)
}

struct World {
    dir: tempfile::TempDir,
    sim_url: String,
    _sim: Proc,
}

impl World {
    fn new(job_delay_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (sim, addr) = spawn(
            Command::new(bin("cloudsim"))
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--state-dir")
                .arg(dir.path().join("sim"))
                .arg("--by-id-dir")
                .arg(dir.path().join("by-id"))
                .arg("--appliance-vm-id")
                .arg(APPLIANCE)
                .arg("--job-delay-ms")
                .arg(job_delay_ms.to_string()),
            "listening on ",
        );
        Self {
            sim_url: format!("http://{addr}/client/api"),
            dir,
            _sim: sim,
        }
    }

    fn daemon(&self) -> (Proc, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_volume-daemon"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(self.dir.path().join("daemon"))
            .args(["--cloudstack-url", &self.sim_url])
            .args([
                "--cloudstack-api-key",
                "sim-api-key",
                "--cloudstack-secret-key",
                "sim-secret-key",
            ])
            .args(["--appliance-vm-id", APPLIANCE])
            .arg("--by-id-dir")
            .arg(self.dir.path().join("by-id"))
            .env("VOLUME_DAEMON_DEVICE_TIMEOUT_SECS", "3")
            .env("RUST_LOG", "warn");
        if !volume_daemon::sim::running_as_root() {
            cmd.env("VOLUME_DAEMON_ALLOW_REGULAR_FILES", "true");
        }
        let (p, addr) = spawn(&mut cmd, "api listening on ");
        (p, format!("http://{addr}/api/v1"))
    }
}

impl Drop for World {
    /// Detaches the loop devices this test's simulator made over its own volume files, whatever the outcome.
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("sim").join("volumes")) else {
            return;
        };
        for e in entries.flatten() {
            for dev in blockdev::loopdev::find_by_backing(&e.path()).unwrap_or_default() {
                let _ = blockdev::loopdev::detach_path(&dev);
            }
        }
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn call(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = http().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn wait_terminal(api: &str, id: &str) -> Value {
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{api}/operations/{id}?wait=60"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        matches!(v["status"].as_str(), Some("completed" | "failed")),
        "operation {id} is not terminal after restart: {v}"
    );
    v
}

/// Polls the operation until it has journaled `step`.
fn wait_step(api: &str, id: &str, step: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = call(
            reqwest::Method::GET,
            &format!("{api}/operations/{id}"),
            None,
        );
        if v["step"] == step {
            return;
        }
        assert!(
            !matches!(v["status"].as_str(), Some("completed" | "failed")),
            "operation finished before reaching step {step}: {v}"
        );
        assert!(Instant::now() < end, "step {step} not reached: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The simulator's zone and its custom-size disk offering.
fn zone_and_offering(sim_url: &str) -> (String, String) {
    let zones = cloud(sim_url, "listZones", &[]);
    let zone = zones["zone"][0]["id"].as_str().unwrap().to_string();
    let offs = cloud(sim_url, "listDiskOfferings", &[]);
    let off = offs["diskoffering"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["iscustomized"] == true)
        .expect("custom offering")["id"]
        .as_str()
        .unwrap()
        .to_string();
    (zone, off)
}

/// Submits a create of a 1 GiB volume named `name`; returns the operation id.
fn submit_create(api: &str, sim_url: &str, name: &str) -> String {
    let (zone, off) = zone_and_offering(sim_url);
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes"),
        Some(
            json!({"name": name, "size": cloudstack::GIB, "zone_id": zone, "disk_offering_id": off}),
        ),
    );
    assert_eq!(s, 201, "{op}");
    op["id"].as_str().unwrap().to_string()
}

fn create_volume(api: &str, sim_url: &str) -> String {
    let id = submit_create(api, sim_url, "crash");
    let done = wait_terminal(api, &id);
    assert_eq!(done["status"], "completed", "{done}");
    done["response"]["volume_id"].as_str().unwrap().to_string()
}

/// A signed CloudStack call through the real client.
fn cloud(sim_url: &str, command: &str, params: &[(&str, String)]) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = cloudstack::Client::new(cloudstack::Config {
            url: sim_url.to_string(),
            api_key: "sim-api-key".into(),
            secret_key: cloudstack::Secret::new("sim-secret-key"),
            ..cloudstack::Config::default()
        })
        .unwrap();
        client.request(command, params).await.unwrap()
    })
}

fn cloud_vm_of(sim_url: &str, volume: &str) -> Option<String> {
    let v = cloud(sim_url, "listVolumes", &[("id", volume.to_string())]);
    v["volume"][0]["virtualmachineid"]
        .as_str()
        .map(str::to_string)
}

fn export_served(api: &str, volume: &str) -> bool {
    let (_, list) = call(reqwest::Method::GET, &format!("{api}/exports"), None);
    let listed = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["volume_id"] == volume && e["status"] == "active");
    let port = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["volume_id"] == volume)
        .and_then(|e| e["port"].as_u64());
    let reachable = port.is_some_and(|p| {
        let out = Command::new("nbdinfo")
            .arg(format!("nbd://127.0.0.1:{p}/migration-vol-{volume}"))
            .output()
            .expect("nbdinfo is required (apt-get install libnbd-bin)");
        out.status.success()
    });
    assert_eq!(
        listed, reachable,
        "export list and NBD server disagree for {volume}"
    );
    listed
}

/// The database (via the API) and the cloud agree, and the export is served exactly when attached to the
/// appliance.
fn assert_consistent(api: &str, sim_url: &str, volume: &str) {
    let (_, st) = call(
        reqwest::Method::GET,
        &format!("{api}/volumes/{volume}"),
        None,
    );
    let cloud_vm = cloud_vm_of(sim_url, volume);
    let db_vm = st["attachment"]["vm_id"].as_str().map(str::to_string);
    assert_eq!(db_vm, cloud_vm, "database and cloud disagree: {st}");
    assert_eq!(
        export_served(api, volume),
        cloud_vm.as_deref() == Some(APPLIANCE),
        "export served iff attached to the appliance: {st}"
    );
}

fn kill(p: &mut Proc) {
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
}

#[test]
fn ext_crash_during_attach_job_resumes_the_job_and_exports() {
    let w = World::new(1500);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(s, 201, "{op}");
    let id = op["id"].as_str().unwrap();
    wait_step(&api, id, "cloud_attach_job");
    kill(&mut d);
    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_consistent(&api, &w.sim_url, &vol);
    assert!(export_served(&api, &vol));
    let (_, ops) = call(
        reqwest::Method::GET,
        &format!("{api}/operations?status=executing"),
        None,
    );
    assert_eq!(ops, json!([]));
    detach_all(&api, &vol);
}

#[test]
fn ext_crash_during_detach_job_finishes_the_detach() {
    let w = World::new(1500);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let (_, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(
        wait_terminal(&api, op["id"].as_str().unwrap())["status"],
        "completed"
    );
    assert!(export_served(&api, &vol));
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/detach"),
        None,
    );
    assert_eq!(s, 201, "{op}");
    let id = op["id"].as_str().unwrap();
    wait_step(&api, id, "cloud_detach_job");
    kill(&mut d);
    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_consistent(&api, &w.sim_url, &vol);
    assert!(!export_served(&api, &vol));
}

#[test]
fn ext_crash_after_export_before_restart_reexports_after_verifying() {
    let w = World::new(100);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let (_, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(
        wait_terminal(&api, op["id"].as_str().unwrap())["status"],
        "completed"
    );
    kill(&mut d);
    let (_d2, api) = w.daemon();
    assert_consistent(&api, &w.sim_url, &vol);
    assert!(
        export_served(&api, &vol),
        "the export is re-created at start-up"
    );
    let (s, h) = call(reqwest::Method::GET, &format!("{api}/health"), None);
    assert_eq!(s, 200, "{h}");
    detach_all(&api, &vol);
}

fn detach_all(api: &str, vol: &str) {
    let (_, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/detach"),
        None,
    );
    assert_eq!(
        wait_terminal(api, op["id"].as_str().unwrap())["status"],
        "completed"
    );
}

/// The ids of the cloud volumes named `name`.
fn cloud_volumes_named(sim_url: &str, name: &str) -> Vec<String> {
    let v = cloud(sim_url, "listVolumes", &[("name", name.to_string())]);
    v["volume"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|v| v["name"] == name)
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn sim_faults(sim_url: &str) -> String {
    sim_url.replace("/client/api", "/sim/faults")
}

#[test]
fn ext_crash_before_create_reaches_the_cloud_never_adopts_a_same_named_foreign_volume() {
    let w = World::new(0);
    let (mut d, api) = w.daemon();
    // Someone else's volume with the name the caller is about to use.
    let (zone, off) = zone_and_offering(&w.sim_url);
    let foreign = cloud(
        &w.sim_url,
        "createVolume",
        &[
            ("name", "shared-name".into()),
            ("zoneid", zone),
            ("diskofferingid", off),
            ("size", "1".into()),
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    // createVolume never gets through: the daemon journals `cloud_create_sent` and keeps retrying.
    let (s, v) = call(
        reqwest::Method::POST,
        &sim_faults(&w.sim_url),
        Some(
            json!({"type": "fail_command", "command": "createVolume", "count": 1000, "errorcode": 503}),
        ),
    );
    assert!(s < 300, "{s} {v}");
    let op = submit_create(&api, &w.sim_url, "shared-name");
    wait_step(&api, &op, "cloud_create_sent");
    kill(&mut d);
    let (s, _) = call(reqwest::Method::DELETE, &sim_faults(&w.sim_url), None);
    assert!(s < 300, "{s}");
    assert_eq!(
        cloud_volumes_named(&w.sim_url, "shared-name"),
        vec![foreign.clone()]
    );

    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, &op);
    assert_eq!(done["status"], "completed", "{done}");
    let made = done["response"]["volume_id"].as_str().unwrap().to_string();
    assert_ne!(
        made, foreign,
        "the interrupted create adopted someone else's volume: {done}"
    );
    let mut named = cloud_volumes_named(&w.sim_url, "shared-name");
    named.sort();
    let mut want = vec![foreign.clone(), made.clone()];
    want.sort();
    assert_eq!(named, want, "the create was sent again exactly once");
    // The daemon knows only its own volume.
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{api}/volumes/{foreign}"),
        None,
    );
    assert_eq!(s, 404);
    let (s, _) = call(reqwest::Method::GET, &format!("{api}/volumes/{made}"), None);
    assert_eq!(s, 200);
}

#[test]
fn ext_crash_after_create_reached_the_cloud_adopts_the_volume_it_made() {
    let w = World::new(0);
    let (mut d, api) = w.daemon();
    let (zone, off) = zone_and_offering(&w.sim_url);
    let foreign = cloud(
        &w.sim_url,
        "createVolume",
        &[
            ("name", "mine-and-theirs".into()),
            ("zoneid", zone),
            ("diskofferingid", off),
            ("size", "1".into()),
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The job runs long enough to kill the daemon while it waits.
    let (s, v) = call(
        reqwest::Method::POST,
        &sim_faults(&w.sim_url),
        Some(json!({"type": "slow_job", "command": "createVolume", "extra_delay_ms": 3000})),
    );
    assert!(s < 300, "{s} {v}");
    let op = submit_create(&api, &w.sim_url, "mine-and-theirs");
    wait_step(&api, &op, "cloud_create_job");
    kill(&mut d);
    // Rewind the journal to the moment between sending createVolume and journaling its answer.
    let db = w.dir.path().join("daemon").join("volume-daemon.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        let done = sqlx::query(
            "UPDATE operations SET step = 'cloud_create_sent', cloud_job_id = NULL, volume_id = NULL \
             WHERE id = ?",
        )
        .bind(&op)
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    });
    let named = cloud_volumes_named(&w.sim_url, "mine-and-theirs");
    assert_eq!(named.len(), 2, "{named:?}");
    let made = named.iter().find(|v| **v != foreign).unwrap().clone();

    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, &op);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"]["volume_id"], made.as_str(), "{done}");
    assert_eq!(
        cloud_volumes_named(&w.sim_url, "mine-and-theirs").len(),
        2,
        "not sent twice"
    );
}
