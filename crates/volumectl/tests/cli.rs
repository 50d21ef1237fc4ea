//! End-to-end tests of the `volumectl` binary. The `ext_` tests drive it against a real `volume-daemon serve
//! --sim` started as a subprocess (build it first: `cargo build -p volume-daemon`); the others need nothing.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

const SIM_API_KEY: &str = "sim-api-key";
const SIM_SECRET_KEY: &str = "sim-secret-key";
const START_DEADLINE: Duration = Duration::from_secs(90);

/// The daemon binary next to volumectl in the same target directory.
fn daemon_bin() -> PathBuf {
    let ctl = PathBuf::from(env!("CARGO_BIN_EXE_volumectl"));
    let dir = ctl
        .parent()
        .expect("invariant: a binary path has a directory");
    let bin = dir.join("volume-daemon");
    assert!(
        bin.is_file(),
        "{} does not exist: build the daemon first with `cargo build -p volume-daemon` (same CARGO_TARGET_DIR)",
        bin.display()
    );
    bin
}

/// A `volume-daemon serve --sim` on ephemeral ports with its own state directory; killed on drop.
struct Daemon {
    child: Child,
    api: String,
    sim: String,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log file");
        let state = dir.path().join("state");
        let mut child = Command::new(daemon_bin())
            .args([
                "serve",
                "--sim",
                "--listen",
                "127.0.0.1:0",
                "--nbd-listen",
                "127.0.0.1:0",
            ])
            .args(["--sim-listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .args(extra)
            .env_remove("VOLUME_DAEMON_CONFIG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn volume-daemon");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        let (mut api, mut sim) = (None, None);
        while api.is_none() || sim.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("api listening on ") {
                        api = Some(a.trim().to_string());
                    } else if let Some(a) = line.strip_prefix("cloudsim listening on ") {
                        sim = Some(a.trim().to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log =
                        std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
                    panic!(
                        "volume-daemon did not print its api and cloudsim addresses within {START_DEADLINE:?}; its log:\n{log}"
                    );
                }
            }
        }
        // Keep draining stdout so the daemon never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Self {
            child,
            api: format!("http://{}", api.expect("set above")),
            sim: format!("http://{}", sim.expect("set above")),
            dir,
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        run_ctl(&self.api, args)
    }

    /// Runs volumectl and asserts it succeeded.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "volumectl {args:?} failed: stdout {}\nstderr {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs volumectl with `--json`, asserts success and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("volumectl {args:?} printed no JSON ({e}): {s}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Asks the simulator (CloudStack wire protocol, signed) for a list.
    fn cloud_list(&self, command: &str, item: &str) -> Vec<Value> {
        let params = vec![
            ("command".to_string(), command.to_string()),
            ("response".to_string(), "json".to_string()),
            ("apiKey".to_string(), SIM_API_KEY.to_string()),
        ];
        let sig = cloudstack::sign::signature(SIM_SECRET_KEY, &params);
        let url = format!(
            "{}/client/api?{}&signature={}",
            self.sim,
            cloudstack::sign::canonical_query(&params),
            cloudstack::sign::encode_value(&sig)
        );
        let body: Value = reqwest::blocking::get(&url)
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("simulator {command} failed: {e}"));
        let inner = body
            .as_object()
            .and_then(|o| o.values().next())
            .unwrap_or_else(|| panic!("simulator {command} answered {body}"));
        inner[item]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("simulator {command} has no {item} list: {body}"))
    }

    /// A zone and a custom-size disk offering of the simulated cloud.
    fn zone_and_offering(&self) -> (String, String) {
        let zone = self.cloud_list("listZones", "zone")[0]["id"]
            .as_str()
            .expect("zone id")
            .to_string();
        let offerings = self.cloud_list("listDiskOfferings", "diskoffering");
        let custom = offerings
            .iter()
            .find(|o| o["iscustomized"] == Value::Bool(true))
            .unwrap_or_else(|| panic!("no custom-size offering among {offerings:?}"));
        (
            zone,
            custom["id"].as_str().expect("offering id").to_string(),
        )
    }

    /// Adds a fault to the simulator (`POST /sim/faults`).
    fn fault(&self, spec: Value) {
        reqwest::blocking::Client::new()
            .post(format!("{}/sim/faults", self.sim))
            .json(&spec)
            .send()
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("adding fault {spec} failed: {e}"));
    }

    /// Runs volumectl and asserts its exit code; returns its standard error.
    fn exits(&self, code: i32, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "volumectl {args:?}: stdout {}\nstderr {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
        stderr(&o)
    }

    /// Creates a 1 GiB volume on the custom offering and returns its id.
    fn create(&self, name: &str) -> String {
        let (zone, offering) = self.zone_and_offering();
        let op = self.json(&[
            "volumes",
            "create",
            "--name",
            name,
            "--size",
            "1G",
            "--zone-id",
            &zone,
            "--disk-offering-id",
            &offering,
        ]);
        op["response"]["volume_id"]
            .as_str()
            .unwrap_or_else(|| panic!("create printed no volume id: {op}"))
            .to_string()
    }

    fn appliance_id(&self) -> String {
        let a = self.json(&["appliance", "show"]);
        a["vm_id"]
            .as_str()
            .unwrap_or_else(|| panic!("the simulator's appliance has no id: {a}"))
            .to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Our own child, by its handle; SIGTERM first so it removes its loop devices, then make sure.
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped; no memory is involved.
        let _ = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ctl(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(args)
        .env("VOLUMECTL_URL", url)
        .env("COLUMNS", "1000")
        .env_remove("VOLUMECTL_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run volumectl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The UUID following `volume ` in a human outcome line.
fn volume_in(line: &str) -> Uuid {
    let rest = line
        .split("volume ")
        .nth(1)
        .unwrap_or_else(|| panic!("no volume id in {line:?}"));
    Uuid::parse_str(&rest[..36]).unwrap_or_else(|e| panic!("bad volume id in {line:?}: {e}"))
}

#[test]
fn ext_volume_lifecycle_with_json_output() {
    let d = Daemon::start();
    let (zone, offering) = d.zone_and_offering();
    let appliance = d.appliance_id();

    let op = d.json(&[
        "volumes",
        "create",
        "--name",
        "json-disk",
        "--size",
        "1G",
        "--zone-id",
        &zone,
        "--disk-offering-id",
        &offering,
        "--metadata",
        "disk=0",
        "--metadata",
        "vm=web-1",
    ]);
    assert_eq!(op["type"], "create");
    assert_eq!(op["status"], "completed", "{op}");
    let vol = op["response"]["volume_id"]
        .as_str()
        .expect("response.volume_id")
        .to_string();
    Uuid::parse_str(&vol).expect("volume id is a UUID");

    let show = d.json(&["volumes", "show", &vol]);
    assert_eq!(show["volume_id"], vol.as_str());
    assert_eq!(show["name"], "json-disk");
    assert_eq!(show["size"], 1u64 << 30);
    assert_eq!(show["metadata"]["disk"], 0);
    assert_eq!(show["metadata"]["vm"], "web-1");
    assert!(show["attachment"].is_null(), "{show}");

    let list = d.json(&["volumes", "list"]);
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|v| v["volume_id"] == vol.as_str()),
        "{list}"
    );

    let op = d.json(&["volumes", "attach", &vol, "--vm-id", &appliance]);
    assert_eq!(op["type"], "attach");
    assert_eq!(op["status"], "completed", "{op}");
    let show = d.json(&["volumes", "show", &vol]);
    assert_eq!(show["attachment"]["vm_id"], appliance.as_str(), "{show}");
    assert_eq!(show["attachment"]["target"], "appliance", "{show}");

    let export_name = format!("migration-vol-{vol}");
    let exports = d.json(&["exports", "list"]);
    assert_eq!(
        exports["count"],
        exports["exports"].as_array().expect("exports").len()
    );
    let e = exports["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .find(|e| e["export_name"] == export_name.as_str())
        .unwrap_or_else(|| panic!("no export {export_name} in {exports}"))
        .clone();
    assert_eq!(e["connections"], 0);
    assert_eq!(e["bytes_written"], 0);
    let one = d.json(&["exports", "show", &vol]);
    assert_eq!(one["export_name"], export_name.as_str());
    assert_eq!(one["status"], "active", "{one}");

    let ops = d.json(&["ops", "list", "--volume-id", &vol]);
    let ops = ops.as_array().expect("array");
    assert!(ops.len() >= 2, "{ops:?}");
    let first = ops[0]["id"].as_str().expect("id");
    let shown = d.json(&["ops", "show", first]);
    assert_eq!(shown["id"], first);
    let attaches = d.json(&[
        "ops",
        "list",
        "--type",
        "attach",
        "--status",
        "completed",
        "--limit",
        "5",
    ]);
    assert!(attaches
        .as_array()
        .expect("array")
        .iter()
        .all(|o| o["type"] == "attach"));

    let op = d.json(&["volumes", "detach", &vol]);
    assert_eq!(op["status"], "completed", "{op}");
    let gone = d.ctl(&["--json", "exports", "show", &vol]);
    assert_eq!(
        gone.status.code(),
        Some(3),
        "export must be gone after detach: {}",
        stderr(&gone)
    );
    let show = d.json(&["volumes", "show", &vol]);
    assert!(show["attachment"].is_null(), "{show}");

    let op = d.json(&["volumes", "delete", &vol]);
    assert_eq!(op["type"], "delete");
    assert_eq!(op["status"], "completed", "{op}");
}

#[test]
fn ext_volume_lifecycle_with_tables() {
    let d = Daemon::start();
    let (zone, offering) = d.zone_and_offering();

    let out = d.ok(&[
        "volumes",
        "create",
        "--name",
        "table-disk",
        "--size",
        "1073741824",
        "--zone-id",
        &zone,
        "--disk-offering-id",
        &offering,
    ]);
    assert!(out.contains("(create) completed"), "{out}");
    let vol = volume_in(&out).to_string();

    let out = d.ok(&["volumes", "show", &vol]);
    assert!(out.contains("name:") && out.contains("table-disk"), "{out}");
    assert!(out.contains("1 GiB"), "{out}");
    let out = d.ok(&["volumes", "list"]);
    assert!(out.starts_with("VOLUME"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&vol) && l.contains("table-disk")),
        "{out}"
    );

    let out = d.ok(&[
        "volumes",
        "attach",
        &vol,
        "--appliance",
        "--nbd-client",
        "writer-1",
    ]);
    assert!(out.contains("(attach) completed"), "{out}");
    let out = d.ok(&["volumes", "list"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&vol) && l.contains("[appliance]")),
        "{out}"
    );

    let out = d.ok(&["exports", "list"]);
    assert!(out.starts_with("EXPORT"), "{out}");
    assert!(out.contains("CONNS") && out.contains("WRITTEN"), "{out}");
    assert!(out.contains(&format!("migration-vol-{vol}")), "{out}");
    assert!(out.contains("CLIENTS") && out.contains("writer-1"), "{out}");
    let out = d.ok(&["exports", "show", &vol]);
    assert!(
        out.contains("connections:") && out.contains("bytes written:"),
        "{out}"
    );
    assert!(out.contains("clients allowed:"), "{out}");

    let out = d.ok(&["ops", "list"]);
    assert!(out.starts_with("OPERATION"), "{out}");
    let id = out
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .next()
        .expect("id")
        .to_string();
    let out = d.ok(&["ops", "show", &id]);
    assert!(out.contains("operation:") && out.contains(&id), "{out}");

    let out = d.ok(&["volumes", "detach", &vol]);
    assert!(out.contains("(detach) completed"), "{out}");
    let out = d.ok(&["exports", "list"]);
    assert!(
        !out.contains(&vol),
        "export still listed after detach: {out}"
    );
    let out = d.ok(&["volumes", "delete", &vol]);
    assert!(out.contains("(delete) completed"), "{out}");
}

#[test]
fn ext_appliance_health_and_reconcile_in_both_modes() {
    let d = Daemon::start();
    let appliance = d.appliance_id();
    let a = d.json(&["appliance", "show"]);
    assert_eq!(a["verified"], true, "{a}");
    let out = d.ok(&["appliance", "show"]);
    assert!(out.contains("vm:") && out.contains(&appliance), "{out}");

    // The simulator fixes the identity: changing it is refused, with exit code 4 and a reason.
    for json in [false, true] {
        let mut args = vec!["appliance", "set", "00000000-0000-4000-8000-000000000000"];
        if json {
            args.insert(0, "--json");
        }
        let o = d.ctl(&args);
        assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
        assert!(o.stdout.is_empty());
        assert!(stderr(&o).starts_with("volumectl: "), "{}", stderr(&o));
    }

    let h = d.ctl(&["--json", "health"]);
    let body: Value = serde_json::from_slice(&h.stdout).expect("health JSON");
    let expected = if body["status"] == "healthy" { 0 } else { 1 };
    assert_eq!(h.status.code(), Some(expected), "{body}");
    assert!(
        body["components"]
            .as_object()
            .is_some_and(|c| !c.is_empty()),
        "{body}"
    );
    let h = d.ctl(&["health"]);
    assert_eq!(h.status.code(), Some(expected));
    let text = String::from_utf8_lossy(&h.stdout);
    assert!(
        text.contains("COMPONENT") && text.contains("status:"),
        "{text}"
    );

    let r = d.json(&["reconcile"]);
    assert_eq!(r["dry_run"], true, "{r}");
    assert!(r["drift"].is_array(), "{r}");
    let r = d.json(&["reconcile", "--apply"]);
    assert_eq!(r["dry_run"], false, "{r}");
    let out = d.ok(&["reconcile"]);
    assert!(out.starts_with("dry run:"), "{out}");
}

#[test]
fn ext_missing_volume_exits_3() {
    let d = Daemon::start();
    let nobody = Uuid::new_v4().to_string();
    for args in [
        vec!["volumes", "show", nobody.as_str()],
        vec!["--json", "volumes", "show", nobody.as_str()],
        vec!["exports", "show", nobody.as_str()],
        vec!["ops", "show", nobody.as_str()],
        vec!["ops", "wait", nobody.as_str()],
    ] {
        let o = d.ctl(&args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(stderr(&o).contains(&nobody), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn ext_no_wait_then_ops_wait() {
    let d = Daemon::start_with(&["--sim-job-delay-ms", "500"]);
    let (zone, offering) = d.zone_and_offering();
    let create = [
        "volumes",
        "create",
        "--no-wait",
        "--size",
        "1G",
        "--zone-id",
        zone.as_str(),
        "--disk-offering-id",
        offering.as_str(),
        "--name",
    ];

    let mut args = create.to_vec();
    args.push("nowait-text");
    let out = d.ok(&args);
    let id = out.trim();
    Uuid::parse_str(id)
        .unwrap_or_else(|e| panic!("--no-wait printed {out:?}, not an operation id: {e}"));
    let out = d.ok(&["ops", "wait", id, "--timeout", "60s"]);
    assert!(
        out.contains("status:") && out.contains("completed"),
        "{out}"
    );

    let mut args = vec!["--json"];
    args.extend_from_slice(&create);
    args.push("nowait-json");
    let out = d.ok(&args);
    let op: Value = serde_json::from_str(&out).expect("operation JSON");
    let id = op["id"].as_str().expect("id").to_string();
    assert_ne!(
        op["status"], "completed",
        "the create should still be running after --no-wait: {op}"
    );
    let done = d.json(&["ops", "wait", &id]);
    assert_eq!(done["id"], id.as_str());
    assert_eq!(done["status"], "completed", "{done}");
    let vol = done["response"]["volume_id"]
        .as_str()
        .expect("volume id")
        .to_string();

    // A wait that cannot finish in time says so with exit code 8.
    let op = d.json(&["volumes", "delete", "--no-wait", &vol]);
    let id = op["id"].as_str().expect("id").to_string();
    let o = d.ctl(&["ops", "wait", &id, "--timeout", "1ms"]);
    if o.status.code() != Some(0) {
        assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
        assert!(stderr(&o).contains("ops wait"), "{}", stderr(&o));
    }
    let done = d.json(&["ops", "wait", &id]);
    assert_eq!(done["status"], "completed", "{done}");
}

#[test]
fn ext_bearer_token_from_flag_or_environment() {
    let d = Daemon::start_with_env(&[], &[("VOLUME_DAEMON_API_TOKEN", "s3cret-token")]);
    let o = d.ctl(&["volumes", "list"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("VOLUMECTL_TOKEN"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("s3cret-token"), "{}", stderr(&o));
    let o = d.ctl(&["--token", "wrong", "volumes", "list"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let out = d.ok(&["--token", "s3cret-token", "volumes", "list"]);
    assert!(out.starts_with("VOLUME"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(["--json", "appliance", "show"])
        .env("VOLUMECTL_URL", &d.api)
        .env("VOLUMECTL_TOKEN", "s3cret-token")
        .output()
        .expect("run volumectl");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // /health stays open without a token.
    let o = d.ctl(&["--json", "health"]);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
}

#[test]
fn unreachable_daemon_exits_5() {
    for args in [vec!["volumes", "list"], vec!["--json", "health"]] {
        let o = run_ctl("http://127.0.0.1:1", &args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("cannot reach the daemon at http://127.0.0.1:1"),
            "{err}"
        );
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn usage_errors_exit_2_and_help_lists_exit_codes() {
    let o = run_ctl("http://127.0.0.1:1", &["volumes", "show", "not-a-uuid"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run_ctl("not a url", &["volumes", "list"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A misspelt state filter is refused, not taken as "no such volumes".
    let o = run_ctl(
        "http://127.0.0.1:1",
        &["volumes", "list", "--state", "atached"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("attached, detached, deleted"),
        "{}",
        stderr(&o)
    );
    let o = run_ctl("http://127.0.0.1:1", &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("Exit codes:") && help.contains("VOLUMECTL_TOKEN"),
        "{help}"
    );
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run_ctl("http://127.0.0.1:1", &["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", stderr(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(
            s.contains("volumectl") && s.contains("reconcile"),
            "{shell}"
        );
    }
}

#[test]
fn ext_cloud_listings_show_names_and_tables_fit_the_width() {
    let d = Daemon::start();
    let zone = &d.cloud_list("listZones", "zone")[0];
    let out = d.ok(&["cloud", "zones"]);
    assert!(out.starts_with("NAME"), "{out}");
    assert!(
        out.contains(zone["name"].as_str().expect("zone name"))
            && out.contains(zone["id"].as_str().expect("zone id")),
        "{out}"
    );
    let out = d.ok(&["cloud", "offerings"]);
    for o in d.cloud_list("listDiskOfferings", "diskoffering") {
        assert!(out.contains(o["name"].as_str().expect("name")), "{out}");
    }
    assert!(
        out.contains("custom (--size)") && out.contains("5 GiB"),
        "{out}"
    );
    let vms = d.json(&["cloud", "vms"]);
    let appliance = d.appliance_id();
    let out = d.ok(&["cloud", "vms"]);
    for vm in vms.as_array().expect("array") {
        let (id, name) = (vm["id"].as_str().unwrap(), vm["name"].as_str().unwrap());
        let line = out
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} not listed: {out}"));
        assert!(line.starts_with(name), "{line}");
        assert_eq!(line.contains("appliance"), id == appliance, "{line}");
    }

    // Tables fit COLUMNS when standard output is not a terminal; --wide prints every cell in full.
    let narrow = Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(["cloud", "vms"])
        .env("VOLUMECTL_URL", &d.api)
        .env("COLUMNS", "40")
        .output()
        .expect("run volumectl");
    let text = String::from_utf8_lossy(&narrow.stdout);
    assert!(text.lines().count() > 1, "{text}");
    for line in text.lines() {
        assert!(
            line.chars().count() <= 40,
            "{line:?} is wider than 40:\n{text}"
        );
    }
    assert!(text.contains('~'), "{text}");
    let wide = Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(["--wide", "cloud", "vms"])
        .env("VOLUMECTL_URL", &d.api)
        .env("COLUMNS", "40")
        .output()
        .expect("run volumectl");
    assert!(String::from_utf8_lossy(&wide.stdout).contains(&appliance));
}

#[test]
fn ext_volumes_list_filters_and_names_vms() {
    let d = Daemon::start();
    let appliance = d.appliance_id();
    let vms = d.json(&["cloud", "vms"]);
    let other = vms
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["id"] != appliance.as_str() && v["state"] == "Running")
        .expect("a running VM besides the appliance")
        .clone();
    let (other_id, other_name) = (
        other["id"].as_str().unwrap(),
        other["name"].as_str().unwrap(),
    );
    let a = d.create("filter-alpha");
    let b = d.create("filter-beta");
    d.ok(&["volumes", "attach", &a, "--vm-id", other_id]);

    let out = d.ok(&["volumes", "list", "--vm", other_name]);
    assert!(out.contains(&a) && !out.contains(&b), "{out}");
    assert!(out.contains(&format!("{other_name} ({other_id})")), "{out}");
    let out = d.ok(&["volumes", "list", "--vm", other_id]);
    assert!(out.contains(&a) && !out.contains(&b), "{out}");
    let out = d.ok(&["volumes", "list", "--state", "detached"]);
    assert!(!out.contains(&a) && out.contains(&b), "{out}");
    let list = d.json(&["volumes", "list", "--name", "BETA"]);
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![b.as_str()]);
    let out = d.ok(&["ops", "list", "--type", "attach"]);
    assert!(out.contains(&format!("{other_name} ({other_id})")), "{out}");
}

#[test]
fn ext_appliance_attach_prints_the_nbd_url_and_a_second_detach_says_so() {
    let d = Daemon::start();
    let vol = d.create("url-disk");
    let out = d.ok(&["volumes", "attach", &vol, "--appliance"]);
    let port: u16 = d.json(&["exports", "show", &vol])["port"]
        .as_u64()
        .expect("export port") as u16;
    assert!(
        out.lines()
            .any(|l| l == format!("nbd://127.0.0.1:{port}/migration-vol-{vol}")),
        "{out}"
    );
    d.ok(&["volumes", "detach", &vol]);
    let out = d.ok(&["volumes", "detach", &vol]);
    assert!(
        out.contains("it was not attached, nothing to detach"),
        "{out}"
    );
    assert!(!out.contains("device"), "{out}");
}

#[test]
fn ext_exit_codes_are_the_documented_ones() {
    let d = Daemon::start();
    let vol = d.create("codes-disk");
    let appliance = d.appliance_id();
    let zone = d.zone_and_offering().0;
    let fixed = d
        .cloud_list("listDiskOfferings", "diskoffering")
        .into_iter()
        .find(|o| o["iscustomized"] == Value::Bool(false))
        .expect("a fixed-size offering");
    let fixed = fixed["id"].as_str().unwrap();

    // 0: a fixed-size offering needs no size.
    d.ok(&[
        "volumes",
        "create",
        "--name",
        "fixed",
        "--zone-id",
        &zone,
        "--disk-offering-id",
        fixed,
    ]);
    // 2: the daemon rejects the request as invalid, naming the field.
    let err = d.exits(
        2,
        &[
            "volumes",
            "create",
            "--name",
            "x",
            "--size",
            "3G",
            "--zone-id",
            &zone,
            "--disk-offering-id",
            fixed,
        ],
    );
    assert!(err.contains("size"), "{err}");
    // 3: not found.
    d.exits(3, &["volumes", "show", &Uuid::new_v4().to_string()]);
    // 4: an unknown VM.
    let err = d.exits(4, &["volumes", "attach", &vol, "--vm-id", "no-such-vm"]);
    assert!(
        err.contains("no-such-vm") && err.contains("cloud vms"),
        "{err}"
    );
    // 1: the operation failed (CloudStack refuses a root disk on a running VM); its error once, on stderr.
    let running = d
        .json(&["cloud", "vms"])
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["id"] != appliance.as_str() && v["state"] == "Running")
        .expect("a running VM")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = d.ctl(&["volumes", "attach", &vol, "--vm-id", &running, "--root"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(
        stderr(&o).matches("[cloud_invalid_parameter]").count(),
        1,
        "{}",
        stderr(&o)
    );
    // 6: CloudStack refused a synchronous call (HTTP 502 from the daemon).
    d.fault(serde_json::json!({"type": "fail_command", "command": "listZones", "errorcode": 431, "errortext": "refused"}));
    d.exits(6, &["cloud", "zones"]);
    // 7: the cloud is down (HTTP 503 from the daemon).
    d.fault(serde_json::json!({"type": "fail_command", "command": "listZones", "count": 1000, "errorcode": 503}));
    let err = d.exits(7, &["cloud", "zones"]);
    assert!(
        err.contains("cloud_unavailable") || err.contains("listZones"),
        "{err}"
    );
    // 8: gave up waiting; 130: interrupted while waiting. Both say how to wait again.
    let d = Daemon::start_with(&["--sim-job-delay-ms", "3000"]);
    let (zone, offering) = d.zone_and_offering();
    let create = |name: &'static str| {
        vec![
            "volumes".to_string(),
            "create".into(),
            "--name".into(),
            name.into(),
            "--size".into(),
            "1G".into(),
            "--zone-id".into(),
            zone.clone(),
            "--disk-offering-id".into(),
            offering.clone(),
        ]
    };
    let mut args = create("slow");
    args.extend(["--timeout".to_string(), "200ms".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = d.exits(8, &args);
    assert!(err.contains("volumectl ops wait "), "{err}");

    let mut child = Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(create("interrupted"))
        .env("VOLUMECTL_URL", &d.api)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn volumectl");
    let mut err = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut first = String::new();
    err.read_line(&mut first).expect("a progress line");
    assert!(first.starts_with("operation "), "{first}");
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped; no memory is involved.
    let _ = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().expect("volumectl ends");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).expect("stderr");
    assert_eq!(status.code(), Some(130), "{first}{rest}");
    let op_id = &first["operation ".len().."operation ".len() + 36];
    assert!(
        rest.contains(&format!("`volumectl ops wait {op_id}`")) && rest.contains("goes on"),
        "{first}{rest}"
    );
    let done = d.json(&["ops", "wait", op_id]);
    assert_eq!(done["status"], "completed", "{done}");
}

/// The ```sh blocks of README.md's Quickstart section, in order.
fn quickstart_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md at the workspace root");
    let start = readme
        .find("\n## Quickstart")
        .expect("README.md has a Quickstart section");
    let section = &readme[start + 1..];
    let section = match section[3..].find("\n## ") {
        Some(end) => &section[..end + 3],
        None => section,
    };
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + "```sh\n".len()..];
        let close = body.find("```").expect("a closed code block");
        blocks.push(body[..close].to_string());
        rest = &body[close + 3..];
    }
    blocks
}

/// A program on PATH, or a failure naming how to install it.
fn require_tool(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: `sudo apt-get install -y {package}` (or run scripts/test)"
    );
}

#[test]
fn ext_readme_quickstart_runs_verbatim() {
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("nbdinfo", "libnbd-bin");
    let blocks = quickstart_blocks();
    assert!(
        blocks.len() >= 3,
        "the Quickstart has its sh blocks: {blocks:?}"
    );
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("temp dir");
    let ctl_dir = PathBuf::from(env!("CARGO_BIN_EXE_volumectl"))
        .parent()
        .expect("invariant: a binary path has a directory")
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(ctl_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let script = format!("set -euo pipefail\n{}", blocks.join("\n"));
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env("PATH", path)
        .env("VOLUMECTL_URL", &d.api)
        .env_remove("VOLUMECTL_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the Quickstart failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{}\ndaemon log:\n{}",
        stderr(&out),
        d.log()
    );
    assert!(stdout.contains("nbd://127.0.0.1:"), "{stdout}");
    assert!(
        std::fs::read_dir(work.path())
            .expect("work dir")
            .next()
            .is_none(),
        "the Quickstart removes what it creates"
    );
    let left = d.json(&[
        "volumes",
        "list",
        "--name",
        "quickstart-disk",
        "--state",
        "detached",
    ]);
    assert_eq!(
        left,
        Value::Array(vec![]),
        "the Quickstart deletes its volume"
    );
}

#[test]
fn ext_snapshots_create_list_revert_delete() {
    let d = Daemon::start();
    let vol = d.create("snap-disk");
    // Taken while detached; -q prints the snapshot's id.
    let snap = d.ok(&[
        "-q",
        "snapshots",
        "create",
        &vol,
        "--name",
        "before-test",
        "--vm-context",
        "ctx-9",
    ]);
    let snap = snap.trim().to_string();
    assert!(!snap.is_empty(), "snapshots create -q prints the id");
    let list = d.json(&["snapshots", "list", &vol]);
    assert_eq!(list[0]["id"], snap.as_str(), "{list}");
    assert_eq!(list[0]["tracked"], true);
    let table = d.ok(&["snapshots", "list", &vol]);
    assert!(
        table.contains("SNAPSHOT") && table.contains("before-test"),
        "{table}"
    );
    assert!(table.contains(&snap), "{table}");
    let shown = d.json(&["volumes", "show", &vol]);
    assert_eq!(shown["snapshot"]["vm_context_id"], "ctx-9", "{shown}");

    // An attached volume is refused (exit 4, conflict) and names the way out.
    d.ok(&["volumes", "attach", &vol, "--appliance"]);
    let out = d.ctl(&["snapshots", "revert", &vol, &snap]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("detach"), "{}", stderr(&out));
    d.ok(&["volumes", "detach", &vol]);
    let op = d.json(&["snapshots", "revert", &vol, &snap]);
    assert_eq!(op["type"], "snapshot_revert", "{op}");
    assert_eq!(op["status"], "completed", "{op}");
    let out = d.ok(&["snapshots", "delete", &vol, &snap]);
    assert!(
        out.contains("snapshot_delete") && out.contains(&snap),
        "{out}"
    );
    assert_eq!(d.json(&["snapshots", "list", &vol]), serde_json::json!([]));
}
