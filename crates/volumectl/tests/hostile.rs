//! `volumectl` against answers it cannot trust and outputs it cannot write: text from the daemon (a VM name the
//! cloud reports, an error message) is printed with its control characters escaped, a standard error that cannot
//! be written keeps the documented exit code, a daemon that does not answer ends a create at the first
//! request, `--timeout` bounds a wait on a daemon that stops answering, and `health` exits 1 when a component is
//! degraded although the daemon calls itself healthy. A small fake daemon stands in for volume-daemon; nothing else is needed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;

/// An HTTP server on an ephemeral port answering each request with `answer(method, path)`: `Some((status,
/// body))` is sent as JSON, `None` closes the connection without an answer. Returns its URL and a count of the
/// requests it read.
fn fake_daemon(answer: fn(&str, &str) -> Option<(u16, String)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let counted = Arc::clone(&counted);
            std::thread::spawn(move || serve(conn, answer, &counted));
        }
    });
    (url, requests)
}

fn serve(mut conn: TcpStream, answer: fn(&str, &str) -> Option<(u16, String)>, n: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let body_len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + 4 + body_len {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        buf.drain(..end + 4 + body_len);
        n.fetch_add(1, Ordering::SeqCst);
        let mut words = head.split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let Some((status, body)) = answer(method, path) else {
            return;
        };
        if status == HOLD {
            // Read, then say nothing while the client waits.
            std::thread::sleep(std::time::Duration::from_secs(120));
            return;
        }
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// The status by which an answer function asks the fake daemon to keep the connection open and never answer.
const HOLD: u16 = 0;

fn ctl(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(args)
        .env("VOLUMECTL_URL", url)
        .env("COLUMNS", "1000")
        .env_remove("VOLUMECTL_TOKEN")
        .env_remove("VOLUMECTL_PAGE_SIZE")
        .stdin(Stdio::null())
        .output()
        .expect("run volumectl")
}

const VOLUME: &str = "60338035-92fb-4d27-98d4-b60ad4b38b87";

/// A VM whose name and id carry terminal escapes (CloudStack lets a display name hold anything), and a 404 whose
/// message carries some.
fn hostile_answers(_method: &str, path: &str) -> Option<(u16, String)> {
    match path {
        "/api/v1/cloud/vms" => Some((
            200,
            r#"[{"id":"vm-\u001b[2J","name":"evil\u001b[31mred\u001b]0;title\u0007\u009b1m\u202etxt","state":"Running","appliance":false}]"#.into(),
        )),
        p if p.starts_with("/api/v1/volumes/") => Some((
            404,
            r#"{"error":"volume \u001b[8mhidden\u001b[0m\nnot known","code":"not_found"}"#.into(),
        )),
        _ => Some((404, r#"{"error":"no such endpoint","code":"not_found"}"#.into())),
    }
}

/// Bytes a terminal would act on: ESC, BEL, a C1 CSI, a right-to-left override.
fn assert_inert(what: &str, bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    assert!(
        !s.contains(['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}']),
        "{what} carries a terminal control character: {s:?}"
    );
}

#[test]
fn control_characters_from_the_daemon_are_shown_escaped() {
    let (url, _) = fake_daemon(hostile_answers);

    // A table: the name is shown escaped, in its row.
    let o = ctl(&url, &["cloud", "vms"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_inert("cloud vms", &o.stdout);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(r"evil\u{1b}[31mred\u{1b}]0;title\u{7}\u{9b}1m\u{202e}txt"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 2, "{out}");

    // Ids alone (-q) are escaped too.
    let o = ctl(&url, &["-q", "cloud", "vms"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_inert("cloud vms -q", &o.stdout);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "vm-\\u{1b}[2J\n");

    // JSON keeps the value exactly (escaped as JSON does), only on standard output.
    let o = ctl(&url, &["--json", "cloud", "vms"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(!o.stdout.contains(&0x1b), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(
        v[0]["name"],
        "evil\u{1b}[31mred\u{1b}]0;title\u{7}\u{9b}1m\u{202e}txt"
    );
    assert!(o.stderr.is_empty(), "{o:?}");

    // An error message is escaped on standard error, with the documented exit code.
    let o = ctl(&url, &["volumes", "show", VOLUME]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_inert("an error message", &o.stderr);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(r"volume \u{1b}[8mhidden\u{1b}[0m"), "{err}");
    assert!(o.stdout.is_empty(), "{o:?}");
}

/// Runs volumectl against a port nothing listens on, standard error going to `stderr`.
fn unreachable_with_stderr(stderr: Stdio) -> Option<i32> {
    Command::new(env!("CARGO_BIN_EXE_volumectl"))
        .args(["--url", "http://127.0.0.1:1", "volumes", "list"])
        .env_remove("VOLUMECTL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .expect("run volumectl")
        .code()
}

#[test]
fn an_unwritable_standard_error_keeps_the_exit_code() {
    // A full device.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    assert_eq!(unreachable_with_stderr(Stdio::from(full)), Some(5));
    // A pipe whose reader is gone (`volumectl … 2>&1 | true`).
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    assert_eq!(unreachable_with_stderr(Stdio::from(writer)), Some(5));
}

#[test]
fn a_create_against_a_daemon_that_does_not_answer_stops_at_the_first_request() {
    // Every connection is closed without an answer: the zone lookup fails, and the create is not sent.
    let (url, requests) = fake_daemon(|_, _| None);
    let o = ctl(
        &url,
        &[
            "volumes",
            "create",
            "--name",
            "x",
            "--size",
            "1G",
            "--zone-id",
            "z",
            "--disk-offering-id",
            "o",
        ],
    );
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach the daemon"),
        "{o:?}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "{o:?}");
}

const OPERATION: &str = "1e58b39f-b0df-4fd7-91f7-a16bfb167723";

/// An operation that stays pending, its CloudStack job id carrying a terminal escape.
fn pending_operation(_method: &str, path: &str) -> Option<(u16, String)> {
    (path == format!("/api/v1/operations/{OPERATION}")).then(|| {
        let op = serde_json::json!({
            "cloudstack_job_id": "job-\u{1b}[31m", "completed_at": null,
            "created_at": "2026-12-02T05:17:03.897641Z", "error": null, "error_code": null,
            "id": OPERATION,
            "request": {"disk_offering_id": "o", "name": "pend", "size": 1073741824, "zone_id": "z"},
            "response": null, "status": "executing", "step": "cloud_create_job", "type": "create",
            "updated_at": "2026-12-02T05:17:03.897641Z", "vm_id": null, "volume_id": null
        });
        (200, op.to_string())
    })
}

#[test]
fn a_short_wait_says_how_long_it_waited_and_progress_is_escaped() {
    let (url, _) = fake_daemon(pending_operation);
    let o = ctl(&url, &["ops", "wait", OPERATION, "--timeout", "300ms"]);
    assert_eq!(o.status.code(), Some(8), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_inert("progress and the timeout message", &o.stderr);
    assert!(err.contains(r"(cloud job job-\u{1b}[31m)"), "{err}");
    let waited = err
        .split("still executing after ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no waited time in {err}"));
    let ms: u64 = waited
        .strip_suffix("ms")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{waited:?} is not milliseconds: {err}"));
    assert!((300..5000).contains(&ms), "{err}");
}

/// The operation is pending when asked at once; a long poll (`?wait=`) finds the daemon gone.
fn daemon_gone_while_waiting(method: &str, path: &str) -> Option<(u16, String)> {
    if method == "POST" {
        return pending_operation("GET", &format!("/api/v1/operations/{OPERATION}"))
            .map(|(_, body)| (201, body));
    }
    match path {
        "/api/v1/cloud/zones" | "/api/v1/cloud/offerings" => Some((200, "[]".into())),
        _ => None,
    }
}

#[test]
fn losing_the_daemon_while_waiting_names_the_operation_to_wait_for() {
    let (url, _) = fake_daemon(daemon_gone_while_waiting);
    for json in [false, true] {
        let mut args = vec!["volumes", "create", "--name", "x", "--size", "1G"];
        args.extend(["--zone-id", "z", "--disk-offering-id", "o"]);
        if json {
            args.insert(0, "--json");
        }
        let o = ctl(&url, &args);
        assert_eq!(o.status.code(), Some(5), "{o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("volumectl: ")
                && last.contains(&format!("volumectl ops wait {OPERATION}"))
                && last.contains("cannot reach the daemon"),
            "{err}"
        );
    }
}

/// The operation is pending when first asked; every later request is read and never answered.
fn answers_once_then_hangs(method: &str, path: &str) -> Option<(u16, String)> {
    static ASKED: AtomicUsize = AtomicUsize::new(0);
    if ASKED.fetch_add(1, Ordering::SeqCst) == 0 {
        return pending_operation(method, path);
    }
    Some((HOLD, String::new()))
}

#[test]
fn the_timeout_bounds_a_wait_on_a_daemon_that_stops_answering() {
    let (url, _) = fake_daemon(answers_once_then_hangs);
    let started = std::time::Instant::now();
    let o = ctl(&url, &["ops", "wait", OPERATION, "--timeout", "2s"]);
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(8), "{o:?}");
    assert!(
        took < std::time::Duration::from_secs(8),
        "--timeout 2s took {took:?}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("volumectl ops wait {OPERATION}")),
        "{err}"
    );
}

/// `/health` as the daemon answers it (200, `healthy`) with component `drift` in the given status.
fn health_with_drift(drift: &str) -> String {
    format!(
        r#"{{"status":"healthy","ready":true,"service":"volume-daemon","version":"0.1.0","timestamp":"2026-01-01T00:00:00Z","components":{{"database":{{"status":"ok","detail":"reachable"}},"drift":{{"status":"{drift}","detail":"1 finding"}},"lease":{{"status":"ok","detail":"held"}}}}}}"#
    )
}

fn healthy_but_drift_degraded(_method: &str, path: &str) -> Option<(u16, String)> {
    (path == "/api/v1/health" || path == "/health").then(|| (200, health_with_drift("degraded")))
}

fn healthy_and_all_ok(_method: &str, path: &str) -> Option<(u16, String)> {
    (path == "/api/v1/health" || path == "/health").then(|| (200, health_with_drift("ok")))
}

#[test]
fn health_exits_1_when_a_component_is_degraded() {
    let (url, _) = fake_daemon(healthy_but_drift_degraded);
    let out = ctl(&url, &["health"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exits 1 unless every component is ok: {err}"
    );
    assert!(
        err.contains("degraded (drift)"),
        "names the component: {err}"
    );
    let out = ctl(&url, &["-q", "health"]);
    assert_eq!(out.status.code(), Some(1), "-q keeps the exit code");
    let (url, _) = fake_daemon(healthy_and_all_ok);
    let out = ctl(&url, &["health"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A peer at `http://ADDR` that treats each connection with `talk`; returns the URL.
fn raw_peer(talk: fn(&mut TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            talk(&mut conn);
        }
    });
    format!("http://{addr}")
}

/// A `--url` that reaches something other than an HTTP server (here an NBD server's greeting): exit 6,
/// "answered something volumectl cannot read", naming the likely mistake; not 5, "unreachable".
#[test]
fn a_peer_that_answers_no_http_exits_6() {
    use std::io::{Read, Write};
    let url = raw_peer(|conn| {
        // NBD's newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
        let _ = conn.write_all(b"NBDMAGICIHAVEOPT\x00\x03");
        let _ = conn.read(&mut [0u8; 4096]);
    });
    let out = ctl(&url, &["volumes", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("not HTTP") && stderr.contains("NBD port"),
        "{stderr}"
    );
}

/// The same when the peer's bytes arrive only after the request (they do not parse as a response).
#[test]
fn a_peer_that_answers_a_request_with_no_http_exits_6() {
    use std::io::{Read, Write};
    let url = raw_peer(|conn| {
        let _ = conn.read(&mut [0u8; 4096]);
        let _ = conn.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
    });
    let out = ctl(&url, &["volumes", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("not HTTP"), "{stderr}");
}
