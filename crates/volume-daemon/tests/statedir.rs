//! The state directory as the binary treats it: one daemon per directory, private modes, and a `check`
//! that takes `serve`'s flags and leaves nothing behind; and what `serve --sim` says at start.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_sim(state: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_volume-daemon"));
    cmd.arg("serve")
        .arg("--sim")
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .args(["--sim-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .env_remove("VOLUME_DAEMON_CONFIG");
    cmd
}

/// Starts `serve --sim` and waits until it says its API listens.
fn start(state: &std::path::Path) -> Proc {
    let mut child = serve_sim(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn volume-daemon");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("api listening on ") => break,
            Some(Ok(_)) => {}
            _ => panic!("the daemon exited before serving"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Proc(child)
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn a_second_daemon_on_one_state_directory_exits_naming_the_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let first = start(&state);

    let started = Instant::now();
    let out = serve_sim(&state).output().expect("run a second daemon");
    assert!(!out.status.success(), "the second daemon must not run");
    assert!(started.elapsed() < Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It never got as far as the simulator, the database or any listener.
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains("in use by another volume-daemon")
            && stderr.contains(&format!("pid {}", first.0.id())),
        "{stderr}"
    );

    // Private modes on what the daemon created itself.
    assert_eq!(mode(&state) & 0o027, 0, "state dir {:o}", mode(&state));
    let db = state.join("volume-daemon.db");
    assert_eq!(mode(&db) & 0o037, 0, "database {:o}", mode(&db));
    drop(first);
}

#[test]
fn check_takes_serve_flags_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("never-created");
    let out = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .arg("check")
        .arg("--sim")
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .args(["--sim-listen", "127.0.0.1:0", "--sim-job-delay-ms", "5"])
        .arg("--state-dir")
        .arg(&state)
        .env("RUST_LOG", "warn")
        .env_remove("VOLUME_DAEMON_CONFIG")
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
    for name in [
        "configuration",
        "state directory",
        "database",
        "REST API listener",
        "cloudstack",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "no passing {name:?} line in:\n{stdout}{stderr}"
        );
    }
    assert!(!state.exists(), "check created {}", state.display());
}

#[test]
fn check_reports_who_holds_a_state_directory_in_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let daemon = start(&state);
    let out = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .arg("check")
        .arg("--sim")
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(&state)
        .env("RUST_LOG", "warn")
        .env_remove("VOLUME_DAEMON_CONFIG")
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("in use by pid {}", daemon.0.id())),
        "{stdout}"
    );
    drop(daemon);
}

/// `serve --sim` logs the simulator's address and both its credentials (simulator credentials, not secrets),
/// so a CloudStack client can be pointed at it.
#[test]
fn serve_sim_logs_the_simulators_credentials() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = serve_sim(&tmp.path().join("state"))
        .args([
            "--sim-api-key",
            "key-4711",
            "--sim-secret-key",
            "secret-0815",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn volume-daemon");
    let stderr = child.stderr.take().expect("stderr");
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("simulator started") => break l,
            Ok(_) => {}
            Err(e) => panic!("no simulator line within 60 s: {e}"),
        }
    };
    assert!(line.contains("key-4711"), "{line}");
    assert!(line.contains("secret-0815"), "{line}");
    drop(proc);
}

/// SIGTERM (systemd's stop), SIGINT (Ctrl-C) and SIGHUP (the terminal of `serve --sim` closed) each shut the
/// daemon down cleanly: exit status 0, and the state directory is free for the next start at once.
#[test]
fn each_stop_signal_shuts_the_daemon_down_cleanly() {
    use rustix::process::{kill_process, Pid, Signal};
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    for signal in [Signal::HUP, Signal::TERM, Signal::INT] {
        let mut daemon = start(&state);
        let pid = Pid::from_raw(daemon.0.id() as i32).expect("a child's pid is positive");
        kill_process(pid, signal).expect("signal the daemon");
        let started = Instant::now();
        let status = loop {
            if let Some(s) = daemon.0.try_wait().expect("wait for the daemon") {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{signal:?}: the daemon did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(0), "{signal:?}: {status}");
    }
    drop(start(&state));
}

/// `check | head -1`: a reader that goes away ends the report, not with a panic; the exit status still
/// says whether the checks passed.
#[test]
fn check_into_a_closed_pipe_exits_by_its_checks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .arg("check")
        .arg("--sim")
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .args(["--sim-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .env("RUST_LOG", "warn")
        .env_remove("VOLUME_DAEMON_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run check");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// Logs written to a file or a pipe (the journal) are plain text: no terminal colour codes, from the daemon
/// and from the other binaries of the workspace that log (`cloudsim` here; `nbd-serve` shares the setting).
#[test]
fn logs_into_a_pipe_carry_no_colour_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_volume-daemon"));
    let cloudsim = exe.with_file_name("cloudsim");
    assert!(
        cloudsim.exists(),
        "{} is missing: cargo build --workspace --bins",
        cloudsim.display()
    );
    let mut daemon = serve_sim(&tmp.path().join("state"));
    daemon.env("RUST_LOG", "info");
    let mut sim = Command::new(&cloudsim);
    sim.args(["--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(tmp.path().join("sim"))
        .arg("--by-id-dir")
        .arg(tmp.path().join("by-id"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    for cmd in [&mut daemon, &mut sim] {
        let mut child = Proc(
            cmd.env_remove("NO_COLOR")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
        let stderr = child.0.stderr.take().expect("stderr");
        let line = BufReader::new(stderr)
            .lines()
            .next()
            .expect("a log line")
            .expect("read a log line");
        assert!(line.contains("INFO"), "{line}");
        assert!(!line.contains('\u{1b}'), "{line:?}");
    }
}

/// `check --sim` tests the simulator's address as `serve --sim` would bind it.
#[test]
fn check_sim_fails_on_a_simulator_address_in_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_volume-daemon"))
        .arg("check")
        .arg("--sim")
        .args(["--listen", "127.0.0.1:0", "--nbd-listen", "127.0.0.1:0"])
        .args(["--sim-listen", &addr])
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .env("RUST_LOG", "warn")
        .env_remove("VOLUME_DAEMON_CONFIG")
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("FAIL")
            && l.contains("simulator listener")
            && l.contains(&addr)),
        "{stdout}"
    );
}
