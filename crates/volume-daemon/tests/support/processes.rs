//! The simulator and the daemon as separate processes (so that the daemon can be killed and restarted while
//! the cloud lives on), a blocking JSON client for the daemon's API, and signed calls to the simulator's
//! CloudStack API. Needs the `cloudsim` binary and, for [`export_served`], nbdinfo.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The appliance VM the simulator is started with.
pub const APPLIANCE: &str = "1b2f6a7e-0c55-4d0f-9a41-3c3f9e0e2a11";

/// A binary of the workspace, next to this package's `volume-daemon`.
pub fn bin(name: &str) -> PathBuf {
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

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and reads its stdout up to the line starting with `marker`; returns the rest of that line
/// (the address it listens on). Its stderr goes where `cmd` says (inherited unless set).
pub fn spawn(cmd: &mut Command, marker: &str) -> (Proc, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
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

/// A simulator process with its state (and the daemon's) in a temp dir.
pub struct World {
    pub dir: tempfile::TempDir,
    pub sim_url: String,
    _sim: Proc,
}

impl World {
    pub fn new(job_delay_ms: u64) -> Self {
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
                .arg(job_delay_ms.to_string())
                .env("RUST_LOG", "warn"),
            "listening on ",
        );
        Self {
            sim_url: format!("http://{addr}/client/api"),
            dir,
            _sim: sim,
        }
    }

    /// The command that runs the daemon on this world's simulator (SQLite in the state dir unless
    /// `--database` is added).
    pub fn daemon_command(&self) -> Command {
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
        cmd
    }

    /// Starts `cmd` (from [`World::daemon_command`]); returns it and its API base URL.
    pub fn start_daemon(cmd: &mut Command) -> (Proc, String) {
        let (p, addr) = spawn(cmd, "api listening on ");
        (p, format!("http://{addr}/api/v1"))
    }

    /// The daemon on SQLite in the state dir.
    pub fn daemon(&self) -> (Proc, String) {
        Self::start_daemon(&mut self.daemon_command())
    }

    /// The simulator's fault-injection endpoint.
    fn sim_faults(&self) -> String {
        self.sim_url.replace("/client/api", "/sim/faults")
    }

    /// Arms a fault in the simulator (`spec` in the shape of `/sim/faults`).
    pub fn add_fault(&self, spec: Value) {
        let (s, v) = call(reqwest::Method::POST, &self.sim_faults(), Some(spec));
        assert!(s < 300, "adding a fault: {s} {v}");
    }

    /// Clears every fault armed in the simulator.
    pub fn clear_faults(&self) {
        let (s, v) = call(reqwest::Method::DELETE, &self.sim_faults(), None);
        assert!(s < 300, "clearing the faults: {s} {v}");
    }

    /// Detaches volume `id` directly in the simulator, behind the daemon's back.
    pub fn force_detach(&self, id: &str) {
        let url = self
            .sim_url
            .replace("/client/api", &format!("/sim/volumes/{id}/detach"));
        let (s, v) = call(reqwest::Method::POST, &url, None);
        assert!(s < 300, "force detach {id}: {s} {v}");
    }
}

impl Drop for World {
    /// Detaches the loop devices this test's simulator made over its own volume files, whatever the outcome.
    fn drop(&mut self) {
        super::detach_loop_devices_of(self.dir.path());
    }
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// One JSON request; `None` when it got no answer (the daemon died meanwhile).
pub fn try_call(method: reqwest::Method, url: &str, body: Option<Value>) -> Option<(u16, Value)> {
    let mut req = http().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().ok()?;
    let status = resp.status().as_u16();
    // An empty body is `null`; a body cut short or not JSON is a string saying so, for the assertion to show.
    let body = match resp.bytes() {
        Err(e) => Value::String(format!("<the body could not be read: {e}>")),
        Ok(b) if b.is_empty() => Value::Null,
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            Value::String(format!(
                "<not JSON ({e}): {}>",
                String::from_utf8_lossy(&b[..b.len().min(4096)])
            ))
        }),
    };
    Some((status, body))
}

/// One JSON request that must be answered.
pub fn call(method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
    try_call(method, url, body).expect("request")
}

/// Waits for the operation to end; panics if it has not ended within a minute.
pub fn wait_terminal(api: &str, id: &str) -> Value {
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
pub fn wait_step(api: &str, id: &str, step: &str) {
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
pub fn zone_and_offering(sim_url: &str) -> (String, String) {
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

/// The body of a create of a 1 GiB volume named `name`.
pub fn create_body(sim_url: &str, name: &str) -> Value {
    let (zone, off) = zone_and_offering(sim_url);
    json!({"name": name, "size": cloudstack::GIB, "zone_id": zone, "disk_offering_id": off})
}

/// Submits a create of a 1 GiB volume named `name`; returns the operation id.
pub fn submit_create(api: &str, sim_url: &str, name: &str) -> String {
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes"),
        Some(create_body(sim_url, name)),
    );
    assert_eq!(s, 201, "{op}");
    op["id"].as_str().unwrap().to_string()
}

/// A signed CloudStack call through the real client.
pub fn cloud(sim_url: &str, command: &str, params: &[(&str, String)]) -> Value {
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

/// The VM CloudStack has the volume attached to.
pub fn cloud_vm_of(sim_url: &str, volume: &str) -> Option<String> {
    let v = cloud(sim_url, "listVolumes", &[("id", volume.to_string())]);
    v["volume"][0]["virtualmachineid"]
        .as_str()
        .map(str::to_string)
}

/// The ids of the cloud volumes named `name`.
pub fn cloud_volumes_named(sim_url: &str, name: &str) -> Vec<String> {
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

/// Whether the daemon lists the volume's export as active, checked against the NBD server itself (nbdinfo
/// opens the export exactly when it is listed).
pub fn export_served(api: &str, volume: &str) -> bool {
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
pub fn assert_consistent(api: &str, sim_url: &str, volume: &str) {
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

/// SIGKILL, then reap.
pub fn kill(p: &mut Proc) {
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}
