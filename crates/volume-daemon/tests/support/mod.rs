//! Test harness: a daemon with the built-in simulator, on free ports, in a temporary state dir, and a
//! small JSON client for its API. Cleans up only what its own simulator created.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;
use volume_daemon::config::Config;
use volume_daemon::daemon::RunningDaemon;

#[allow(unused_imports)] // not every test that includes the harness uses it
pub use cloudstack::GIB;

pub mod processes;
pub mod raw;

/// Fails (never skips) a `root_` test run without root: loop devices need it.
pub fn require_root() {
    assert!(
        volume_daemon::sim::running_as_root(),
        "root_ tests need root (loop devices)"
    );
}

pub struct TestDaemon {
    daemon: Option<RunningDaemon>,
    pub base: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

pub fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config {
        state_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        nbd_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    cfg.sim.enabled = true;
    cfg.sim.listen = "127.0.0.1:0".parse().unwrap();
    cfg.sim.job_delay_ms = 20;
    cfg.device_timeout_secs = 5;
    cfg.job_timeout_secs = 60;
    cfg.drain_timeout_secs = 5;
    cfg
}

impl TestDaemon {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = config(dir.path());
        f(&mut cfg);
        let daemon = RunningDaemon::start(cfg).await.expect("daemon starts");
        let base = format!("http://{}/api/v1", daemon.api_addr());
        Self {
            daemon: Some(daemon),
            base,
            http: reqwest::Client::new(),
            dir,
        }
    }

    pub fn daemon(&self) -> &RunningDaemon {
        self.daemon.as_ref().expect("running")
    }

    pub fn sim(&self) -> &cloudsim::RunningSimulator {
        self.daemon().sim().expect("simulator")
    }

    pub fn appliance(&self) -> String {
        self.sim().appliance_vm_id().to_string()
    }

    pub fn other_vm(&self, i: usize) -> String {
        self.sim().other_vm_ids()[i].clone()
    }

    /// What an operator does before a root-disk swap (the failover flow): stop the VM and detach its
    /// current root, both directly in the cloud.
    pub fn stop_vm_and_detach_its_root(&self, vm: &str) {
        let faults = self.sim().faults();
        faults.stop_vm(vm).expect("stop the VM");
        if let Some(root) = self.sim().root_volume_id(vm) {
            faults.detach_volume(&root).expect("detach the VM's root");
        }
    }

    /// The host:port the API listens on.
    pub fn api_addr(&self) -> String {
        self.daemon().api_addr().to_string()
    }

    /// A CloudStack client of the simulator, acting behind the daemon's back.
    pub fn cloud_client(&self) -> cloudstack::Client {
        cloudstack::Client::new(cloudstack::Config {
            url: self.sim().api_url(),
            api_key: "sim-api-key".into(),
            secret_key: cloudstack::Secret::new("sim-secret-key"),
            ..cloudstack::Config::default()
        })
        .unwrap()
    }

    /// Detaches `vol` directly in CloudStack, as an operator or another tool would.
    pub async fn detach_behind_the_daemons_back(&self, vol: Uuid) {
        let cs = self.cloud_client();
        let job = cs.detach_volume(&vol.to_string()).await.unwrap();
        cs.wait_job(&job.job_id, Duration::from_secs(30))
            .await
            .unwrap();
    }

    pub fn nbd_url(&self, volume: Uuid) -> String {
        format!(
            "nbd://{}/{}",
            self.daemon().nbd_addr(),
            volume_api::export_name(volume)
        )
    }

    /// Stops the daemon; the simulator's loop devices and links are removed first.
    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            if let Some(s) = d.sim() {
                s.detach_all_devices();
            }
            d.shutdown().await;
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// Waits for an operation to be terminal and returns it.
    pub async fn wait_op(&self, op: &Value) -> Value {
        let id = op["id"].as_str().expect("operation id");
        for _ in 0..10 {
            let (s, v) = self.get(&format!("/operations/{id}?wait=30")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if matches!(
                v["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return v;
            }
        }
        panic!("operation {id} did not finish in 300 s");
    }

    /// Submits and waits; panics unless the operation completed.
    pub async fn run_ok(&self, path: &str, body: Value) -> Value {
        let (s, op) = self.post(path, body).await;
        assert_eq!(s, StatusCode::CREATED, "{path}: {op}");
        let done = self.wait_op(&op).await;
        assert_eq!(done["status"], "completed", "{path}: {done}");
        done
    }

    /// Deletes a volume and waits; panics unless it completed.
    pub async fn delete_ok(&self, volume: Uuid) -> Value {
        let (s, op) = self
            .send(reqwest::Method::DELETE, &format!("/volumes/{volume}"), None)
            .await;
        assert_eq!(s, StatusCode::CREATED, "delete {volume}: {op}");
        let done = self.wait_op(&op).await;
        assert_eq!(done["status"], "completed", "delete {volume}: {done}");
        done
    }

    pub fn zone(&self) -> String {
        self.sim().zone_id().to_string()
    }

    /// The custom-size disk offering.
    pub fn custom_offering(&self) -> String {
        custom_offering_of(self.sim())
    }

    /// Attaches `volume` to the appliance and waits; panics unless it completed. Returns the operation.
    pub async fn attach_to_appliance(&self, volume: Uuid) -> Value {
        self.run_ok(
            &format!("/volumes/{volume}/attach"),
            json!({"vm_id": self.appliance()}),
        )
        .await
    }

    /// An NBD session (plain, no TLS) on the export named in an attach operation's `response`.
    pub async fn nbd_session(&self, attached: &Value) -> nbd::client::Client {
        let export = attached["response"]["export_name"]
            .as_str()
            .expect("export_name");
        nbd::client::Handshake::connect(self.daemon().nbd_addr())
            .await
            .expect("connect")
            .go(export)
            .await
            .expect("open the export")
    }

    pub async fn create_volume(&self, name: &str, size: u64) -> Uuid {
        let op = self
            .run_ok(
                "/volumes",
                json!({"name": name, "size": size, "disk_offering_id": self.custom_offering(), "zone_id": self.zone()}),
            )
            .await;
        Uuid::parse_str(op["response"]["volume_id"].as_str().expect("volume_id")).expect("uuid")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(d) = &self.daemon {
            if let Some(s) = d.sim() {
                s.detach_all_devices();
            }
        }
    }
}

/// The simulator's custom-size disk offering.
pub fn custom_offering_of(sim: &cloudsim::RunningSimulator) -> String {
    sim.disk_offerings()
        .into_iter()
        .find(|(_, _, gb)| gb.is_none())
        .expect("a custom-size offering")
        .0
}

/// One JSON request to the API at `base` (a daemon started without [`TestDaemon`]); the body as JSON.
pub async fn call(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap().json().await.unwrap()
}

/// Waits up to 60 s for the operation `op` (as submitted) at the API at `base` (a daemon started without
/// [`TestDaemon`]); the operation as it then is.
pub async fn wait_for(base: String, op: Value) -> Value {
    let id = op["id"].as_str().expect("operation id");
    call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{id}?wait=60"),
        None,
    )
    .await
}

/// Submits a mutation to the API at `base` (a daemon started without [`TestDaemon`]) and waits for it;
/// panics unless it completed.
pub async fn call_ok(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let op = call(base, method, path, body).await;
    let done = wait_for(base.to_string(), op).await;
    assert_eq!(done["status"], "completed", "{path}: {done}");
    done
}

/// Detaches the loop devices over the volume files of the simulator whose state is under `state_dir`
/// (`<state_dir>/sim/volumes`, as `serve --sim` keeps it), whatever made them.
pub fn detach_loop_devices_of(state_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(state_dir.join("sim").join("volumes")) else {
        return;
    };
    for e in entries.flatten() {
        for dev in blockdev::loopdev::find_by_backing(&e.path()).unwrap_or_default() {
            let _ = blockdev::loopdev::detach_path(&dev);
        }
    }
}

/// Waits until `f` is true, polling; panics after `deadline`.
pub async fn eventually(deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + deadline;
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "condition not reached in {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
