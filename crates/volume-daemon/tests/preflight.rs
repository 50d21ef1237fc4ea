//! What `volume-daemon check` reports and when `serve` tells systemd it is ready, against a `cloudsim`
//! process: `check` verifies a configured appliance identity with the cloud whether or not the database
//! exists yet, and `serve` sends `READY=1` (to a `NOTIFY_SOCKET` the test binds) only once the identity is
//! verified, as deploy/volume-daemon.service promises. A configuration `serve` refuses (NBD TLS certificates
//! it cannot read) fails `check` as well, and stops `serve` before it opens the database; one that does not
//! load at all (an unknown key, a wrong type or value, an unknown `VOLUME_DAEMON_*` variable) is reported on
//! `check`'s `configuration` line. Needs the `cloudsim` binary.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::processes::{call, spawn, World, APPLIANCE};

/// A VM id the simulator does not have.
const NO_SUCH_VM: &str = "f9708603-0000-4000-8000-000000000000";

/// `volume-daemon SUBCOMMAND` on `world`'s cloud with its state in `state`, and no configured identity.
fn daemon(world: &World, subcommand: &str, state: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_volume-daemon"));
    cmd.arg(subcommand)
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state)
        .args(["--cloudstack-url", &world.sim_url])
        .args([
            "--cloudstack-api-key",
            "sim-api-key",
            "--cloudstack-secret-key",
            "sim-secret-key",
        ])
        .arg("--by-id-dir")
        .arg(world.dir.path().join("by-id"))
        .env("VOLUME_DAEMON_ALLOW_REGULAR_FILES", "true")
        .env("RUST_LOG", "warn")
        .env_remove("VOLUME_DAEMON_CONFIG")
        .env_remove("NOTIFY_SOCKET");
    cmd
}

/// The `check` line named `name` in `stdout`: whether it passed, and the line.
fn check_line<'a>(stdout: &'a str, name: &str) -> Option<(bool, &'a str)> {
    stdout.lines().find_map(|l| {
        let (status, rest) = l.split_once(' ')?;
        rest.trim_start()
            .starts_with(name)
            .then_some((status == "ok", l))
    })
}

#[test]
fn check_verifies_a_configured_identity_before_the_database_exists() {
    let world = World::new(0);
    let state = world.dir.path().join("fresh");
    let out = daemon(&world, "check", &state)
        .args(["--appliance-vm-id", NO_SUCH_VM])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (ok, db) = check_line(&stdout, "database").expect("a database line");
    assert!(ok && db.contains("does not exist yet"), "{stdout}");
    let (ok, line) = check_line(&stdout, "appliance identity")
        .unwrap_or_else(|| panic!("no appliance identity line:\n{stdout}"));
    assert!(!ok, "{stdout}");
    assert!(
        line.contains(&format!("VM {NO_SUCH_VM} does not exist in CloudStack")),
        "{line}"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(!state.exists(), "check created {}", state.display());

    // The appliance's own id passes the same check.
    let out = daemon(&world, "check", &state)
        .args(["--appliance-vm-id", APPLIANCE])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (ok, line) = check_line(&stdout, "appliance identity").expect("an identity line");
    assert!(ok && line.contains(APPLIANCE), "{stdout}");
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`.
struct Notify {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    /// Every message that arrives within `within` (all of them, up to the first `READY=1`).
    fn read(&self, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(left) = end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let ready = msg.lines().any(|l| l == "READY=1");
                    got.push(msg);
                    if ready {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        got
    }
}

fn ready(messages: &[String]) -> bool {
    messages.iter().any(|m| m.lines().any(|l| l == "READY=1"))
}

#[test]
fn serve_sends_ready_only_once_the_identity_is_verified() {
    let world = World::new(0);

    // A verified identity: READY=1 once the API serves.
    let notify = Notify::new();
    let (first, _) = spawn(
        daemon(&world, "serve", &world.dir.path().join("verified"))
            .args(["--appliance-vm-id", APPLIANCE])
            .env("NOTIFY_SOCKET", &notify.path),
        "api listening on ",
    );
    let got = notify.read(Duration::from_secs(30));
    assert!(ready(&got), "no READY=1: {got:?}");
    drop(first);

    // An identity the cloud does not have: the API serves, /health says why, and no READY=1 is sent.
    let notify = Notify::new();
    let (unverified, addr) = spawn(
        daemon(&world, "serve", &world.dir.path().join("unverified"))
            .args(["--appliance-vm-id", NO_SUCH_VM])
            .env("NOTIFY_SOCKET", &notify.path),
        "api listening on ",
    );
    let (s, h) = call(reqwest::Method::GET, &format!("http://{addr}/health"), None);
    assert_eq!(s, 503, "{h}");
    assert_eq!(h["ready"], false, "{h}");
    let got = notify.read(Duration::from_secs(2));
    assert!(
        !ready(&got),
        "READY=1 sent for an unverified identity: {got:?}"
    );
    assert!(
        got.iter()
            .any(|m| m.contains("STATUS=waiting for the appliance identity")),
        "{got:?}"
    );
    drop(unverified);

    // No identity at all: READY=1 follows the identity set through the API.
    let notify = Notify::new();
    let (_unknown, addr) = spawn(
        daemon(&world, "serve", &world.dir.path().join("unknown"))
            .env("NOTIFY_SOCKET", &notify.path),
        "api listening on ",
    );
    let api = format!("http://{addr}/api/v1");
    let (s, h) = call(reqwest::Method::GET, &format!("{api}/health"), None);
    assert_eq!(s, 503, "{h}");
    assert!(!ready(&notify.read(Duration::from_secs(1))));
    let (s, v) = call(
        reqwest::Method::PUT,
        &format!("{api}/appliance"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(s, 200, "{v}");
    let got = notify.read(Duration::from_secs(30));
    assert!(
        ready(&got),
        "no READY=1 after the identity was set: {got:?}"
    );
}

#[test]
fn unreadable_tls_certificates_fail_check_and_stop_serve_before_the_database() {
    let world = World::new(0);
    let missing = world.dir.path().join("no-certificates");
    let state = world.dir.path().join("tls");
    let with_tls = |cmd: &mut Command| {
        cmd.args(["--appliance-vm-id", APPLIANCE])
            .env("VOLUME_DAEMON_NBD_TLS", "on")
            .env("VOLUME_DAEMON_NBD_TLS_CERTIFICATES", &missing);
    };

    let mut check = daemon(&world, "check", &state);
    with_tls(&mut check);
    let out = check.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (ok, line) = check_line(&stdout, "configuration").expect("a configuration line");
    assert!(!ok, "{stdout}");
    assert!(line.contains("server-cert.pem"), "{line}");
    assert_eq!(out.status.code(), Some(1), "{stdout}");

    let mut serve = daemon(&world, "serve", &state);
    with_tls(&mut serve);
    let out = serve.env("RUST_LOG", "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("server-cert.pem"), "{stderr}");
    assert!(!stderr.contains("appliance lease taken"), "{stderr}");
    assert!(
        !state.join("volume-daemon.db").exists(),
        "serve created its database before refusing the configuration"
    );
}

#[test]
fn a_configuration_that_does_not_load_fails_the_configuration_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("volume-daemon.toml");
    for (toml, env, names) in [
        ("no_such_key = 1\n", None, "no_such_key"),
        ("nbd_budget_mib = \"lots\"\n", None, "nbd_budget_mib"),
        ("nbd_tls = \"sometimes\"\n", None, "nbd_tls"),
        (
            "",
            Some(("VOLUME_DAEMON_NO_SUCH_KEY", "1")),
            "VOLUME_DAEMON_NO_SUCH_KEY",
        ),
    ] {
        std::fs::write(&file, toml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_volume-daemon"));
        cmd.arg("check")
            .arg("--config")
            .arg(&file)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "warn")
            .env_remove("VOLUME_DAEMON_CONFIG");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (ok, line) = check_line(&stdout, "configuration")
            .unwrap_or_else(|| panic!("no configuration line for {names}:\n{stdout}{stderr}"));
        assert!(!ok, "{stdout}");
        assert!(line.starts_with("FAIL configuration"), "{line}");
        assert!(line.contains(names), "{line}");
        assert_eq!(stdout.lines().count(), 1, "one line per check:\n{stdout}");
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    }
}
