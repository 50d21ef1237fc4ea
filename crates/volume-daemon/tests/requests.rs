//! Requests at the edges of HTTP and JSON: the answers `docs/api.md` promises for sloppy or hostile input —
//! bodies that are not one object or nest too deep, fields sent to calls that take none, media types and
//! codings the API does not speak, bodies that trickle, `Host` headers, ids of absurd length, query
//! parameters and cursors that are not the API's — and that none of them is acted on.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::raw::{read_answer, send as raw};
use support::{TestDaemon, GIB};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A POST of `body` to `path` with extra header lines (each ending in CRLF).
fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST /api/v1{path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A 400 naming `field`.
fn assert_bad(status: StatusCode, v: &Value, field: &str, what: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {v}");
    assert_eq!(v["code"], "invalid_request", "{what}: {v}");
    assert_eq!(v["field"], field, "{what}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_what_a_call_takes_are_refused_and_nothing_is_done() {
    let d = TestDaemon::start().await;
    let (zone, off) = (d.zone(), d.custom_offering());
    let create = |metadata: Value| json!({"name": "n", "size": GIB, "disk_offering_id": off, "zone_id": zone, "metadata": metadata});
    // Nested 32 levels (the body itself is the first) is taken; one more is refused, naming where.
    let nest = |levels: usize| {
        let mut v = json!("leaf");
        for _ in 0..levels {
            v = json!({ "k": v });
        }
        v
    };
    let (s, v) = d.post("/volumes", create(nest(31))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    d.wait_op(&v).await;
    let (s, v) = d.post("/volumes", create(nest(32))).await;
    assert_bad(s, &v, "metadata", "33 levels");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with(&format!("metadata{} nests", ".k".repeat(31))),
        "{v}"
    );
    let arrays: Value =
        serde_json::from_str(&format!("{}{}", "[".repeat(45), "]".repeat(45))).unwrap();
    let (s, v) = d.post("/volumes", create(arrays)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "metadata", "{v}");
    // Every listing and the volume itself stay readable by a JSON parser with the usual depth limit.
    for path in ["/volumes", "/operations"] {
        let text = d
            .http
            .get(format!("{}{path}", d.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    }

    // An array or a single value where an object is expected.
    for body in [
        json!(["arr", GIB, off, zone, null]),
        json!("text"),
        json!(7),
    ] {
        let (s, v) = d.post("/volumes", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("JSON object"),
            "{body}: {v}"
        );
    }

    // Calls that take no body: none and `{}` are taken, a field is refused by name before anything runs.
    let vol = d.create_volume("nobody", GIB).await;
    d.attach_to_appliance(vol).await;
    let before = d.get("/operations").await.1.as_array().unwrap().len();
    for (method, path, field) in [
        (
            reqwest::Method::POST,
            format!("/volumes/{vol}/detach"),
            "force",
        ),
        (reqwest::Method::DELETE, format!("/volumes/{vol}"), "force"),
        (reqwest::Method::POST, format!("/volumes/{vol}/adopt"), "x"),
        (reqwest::Method::DELETE, format!("/exports/{vol}"), "x"),
        (
            reqwest::Method::POST,
            "/admin/force-sync".to_string(),
            "apply",
        ),
        (reqwest::Method::POST, "/exports/validate".to_string(), "x"),
    ] {
        let (s, v) = d
            .send(method.clone(), &path, Some(json!({ field: false })))
            .await;
        assert_bad(s, &v, field, &format!("{method} {path}"));
        assert!(
            v["error"].as_str().unwrap().contains("takes no body"),
            "{v}"
        );
    }
    let (s, v) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(s, StatusCode::OK, "the export is still there: {v}");
    assert_eq!(
        d.get("/operations").await.1.as_array().unwrap().len(),
        before,
        "a refused call journaled an operation"
    );
    // The predecessor's client sends its detach with no body at all, and scripts with an empty one.
    let r = d
        .http
        .post(format!("{}/volumes/{vol}/detach", d.base))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let op: Value = r.json().await.unwrap();
    assert_eq!(d.wait_op(&op).await["status"], "completed");

    // CloudStack ids of absurd length are refused by name, before CloudStack is asked or anything journaled.
    let long = "v".repeat(100_000);
    let (s, v) = d
        .post(&format!("/volumes/{vol}/attach"), json!({"vm_id": long}))
        .await;
    assert_bad(s, &v, "vm_id", "a 100,000-byte vm_id");
    assert!(v.to_string().len() < 1000, "{v}");
    let (s, v) = d
        .post(
            "/volumes",
            json!({"name": "n", "size": GIB, "disk_offering_id": off, "zone_id": "z".repeat(256)}),
        )
        .await;
    assert_bad(s, &v, "zone_id", "a 256-byte zone_id");
    // A zone CloudStack does not list is refused like an unknown offering; a value the error repeats is cut.
    let (s, v) = d
        .post(
            "/volumes",
            json!({"name": "n", "size": GIB, "disk_offering_id": off, "zone_id": "no-such-zone"}),
        )
        .await;
    assert_bad(s, &v, "zone_id", "an unknown zone");
    let (s, v) = d
        .post(
            "/volumes",
            json!({"name": "n", "size": GIB, "disk_offering_id": "d".repeat(200), "zone_id": zone}),
        )
        .await;
    assert_bad(s, &v, "disk_offering_id", "an unknown offering");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("… (200 bytes)") && !error.contains(&"d".repeat(65)),
        "{error}"
    );
    // An export for a volume nobody knows is a 404, as for every other call naming one.
    let (s, v) = d
        .post(
            "/exports",
            json!({"volume_id": "00000000-0000-0000-0000-0000000000aa"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        d.get("/operations").await.1.as_array().unwrap().len(),
        before + 1,
        "only the detach was journaled"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_types_codings_host_headers_and_announced_sizes_get_their_http_answers() {
    let d = TestDaemon::start().await;
    let body = json!({"name": "n", "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()})
        .to_string();
    // Media types: JSON in any letter case and with parameters, `+json` suffixes; nothing else.
    for (ct, status) in [
        ("application/json", 201),
        ("Application/JSON; charset=utf-8", 201),
        ("application/merge-patch+json", 201),
        ("text/plain", 415),
        ("application/jsonp", 415),
        ("text/plain+json", 415),
        ("application/x-www-form-urlencoded", 415),
    ] {
        let a = raw(
            &d,
            &post("/volumes", &format!("Content-Type: {ct}\r\n"), &body),
        )
        .await;
        assert_eq!(a.status, status, "{ct}: {}", a.body);
        if status == 201 {
            d.wait_op(&a.body).await;
            // What was created is the operation.
            let id = a.body["id"].as_str().unwrap();
            assert!(
                a.head
                    .contains(&format!("location: /api/v1/operations/{id}")),
                "{}",
                a.head
            );
        } else {
            assert_eq!(a.body["code"], "invalid_request", "{ct}: {}", a.body);
        }
    }
    let a = raw(
        &d,
        &post(
            "/volumes",
            "Content-Type: application/json\r\nContent-Encoding: gzip\r\n",
            &body,
        ),
    )
    .await;
    assert_eq!(a.status, 415, "{}", a.body);
    // A transfer coding the server does not apply is not taken for chunked.
    let chunk = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let a = raw(
        &d,
        &format!(
            "POST /api/v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: gzip, chunked\r\n\r\n{chunk}"
        ),
    )
    .await;
    assert_eq!(a.status, 501, "{}", a.body);
    assert!(a.head.contains("connection: close"), "{}", a.head);
    // Plain chunked is fine.
    let a = raw(
        &d,
        &format!(
            "POST /api/v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{chunk}"
        ),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    d.wait_op(&a.body).await;

    // Host: exactly one in HTTP/1.1; HTTP/1.0 may leave it out.
    for (request, status) in [
        ("GET /api/v1/volumes HTTP/1.1\r\n\r\n", 400),
        (
            "GET /api/v1/volumes HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        ("GET /api/v1/volumes HTTP/1.0\r\n\r\n", 200),
        ("GET /api/v1/volumes HTTP/1.1\r\nHost: a\r\n\r\n", 200),
    ] {
        let a = raw(&d, request).await;
        assert_eq!(a.status, status, "{request:?}: {}", a.body);
        if status == 400 {
            assert_eq!(a.body["field"], "Host", "{}", a.body);
        }
    }

    // A body over the limit announced with `Expect: 100-continue` is refused before it is sent: no
    // `100 Continue`, the 413 at once.
    let mut s = TcpStream::connect(d.api_addr()).await.unwrap();
    s.write_all(
        b"POST /api/v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n",
    )
    .await
    .unwrap();
    let a = read_answer(&mut s).await;
    assert_eq!(a.status, 413, "{}: {}", a.head, a.body);
    // Within the limit, the client is told to go on.
    let mut s = TcpStream::connect(d.api_addr()).await.unwrap();
    s.write_all(
        format!(
            "POST /api/v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with(b"HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_at_the_header_timeout_and_others_are_served() {
    let d = TestDaemon::start_with(|c| {
        c.api_header_timeout_secs = 2;
        c.api_max_connections = 4;
    })
    .await;
    // Four clients (the connection cap) announce a body and send a byte a second: each gets a 408 when
    // the header timeout has passed since its body was first read, and its connection closes.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(d.api_addr()).await.unwrap();
        s.write_all(
            b"POST /api/v1/reconcile HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
        slow.push(s);
    }
    let start = Instant::now();
    let mut clients = Vec::new();
    for s in slow {
        let (mut rd, mut wr) = s.into_split();
        let trickle = tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if wr.write_all(b" ").await.is_err() {
                    break;
                }
            }
            wr
        });
        clients.push(tokio::spawn(async move {
            let a = read_answer(&mut rd).await;
            let at = start.elapsed();
            // Then the server closes the connection.
            let mut rest = [0u8; 64];
            let closed = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut rest)).await;
            trickle.abort();
            (a, at, matches!(closed, Ok(Ok(0)) | Ok(Err(_))))
        }));
    }
    for c in clients {
        let (a, at, closed) = c.await.unwrap();
        assert_eq!(a.status, 408, "{}: {}", a.head, a.body);
        assert_eq!(a.body["code"], "invalid_request", "{}", a.body);
        assert!(a.head.contains("connection: close"), "{}", a.head);
        assert!(
            at >= Duration::from_millis(1500) && at < Duration::from_secs(8),
            "answered after {at:?}"
        );
        assert!(closed, "the connection stayed open after the 408");
    }
    // The slots are free again: a real client is served at once.
    let (s, _) = d.get("/health").await;
    assert_eq!(s, StatusCode::OK);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameters_and_cursors_are_refused_by_name() {
    let d = TestDaemon::start().await;
    for (path, field) in [
        ("/volumes?foo=bar", "foo"),
        ("/volumes?limit=1&limit=2", "limit"),
        ("/operations?colour=red", "colour"),
        ("/exports?foo=1", "foo"),
        (
            "/operations/60338035-92fb-4d27-98d4-b60ad4b38b87?foo=1",
            "foo",
        ),
        (
            "/operations/60338035-92fb-4d27-98d4-b60ad4b38b87?wait=soon",
            "wait",
        ),
        ("/devices/volume?path=/dev/x&path=/dev/y", "path"),
    ] {
        let (s, v) = d.get(path).await;
        assert_bad(s, &v, field, path);
    }
    // An empty parameter is no parameter, in a listing as in a long poll.
    let (s, _) = d
        .get("/operations/60338035-92fb-4d27-98d4-b60ad4b38b87?wait=")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A cursor the daemon did not give out is refused, whatever it decodes to.
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for (path, cursor) in [
        (
            "/volumes",
            "x' OR 1=1 --\n60338035-92fb-4d27-98d4-b60ad4b38b87",
        ),
        ("/operations", "2026-01-02T03:04:05.000001Z\nnot-a-uuid"),
        (
            "/exports",
            "migration-vol-x\n60338035-92fb-4d27-98d4-b60ad4b38b87",
        ),
    ] {
        let (s, v) = d
            .get(&format!("{path}?limit=1&after={}", hex(cursor)))
            .await;
        assert_bad(s, &v, "after", path);
    }
    // The cursors it does give out work.
    for i in 0..3 {
        d.create_volume(&format!("page-{i}"), GIB).await;
    }
    let r = d
        .http
        .get(format!("{}/volumes?limit=2", d.base))
        .send()
        .await
        .unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    let next = link
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap()
        .to_string();
    let next = next.trim_start_matches("/api/v1");
    let (s, v) = d.get(next).await;
    assert_eq!(s, StatusCode::OK, "{next}: {v}");
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_checked_on_every_mutation_and_401_names_the_scheme() {
    let d =
        TestDaemon::start_with(|c| c.api_token = Some(volume_daemon::config::Secret::new("t0ken")))
            .await;
    let r = d
        .http
        .get(format!("{}/volumes", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"volume-daemon\""
    );
    for (method, path) in [
        (reqwest::Method::POST, "/exports"),
        (reqwest::Method::POST, "/exports/cleanup"),
        (reqwest::Method::POST, "/reconcile"),
        (
            reqwest::Method::DELETE,
            "/exports/60338035-92fb-4d27-98d4-b60ad4b38b87",
        ),
    ] {
        let r = d
            .http
            .request(method.clone(), format!("{}{path}", d.base))
            .bearer_auth("t0ken")
            .header("Idempotency-Key", "a b")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_bad(status, &v, "Idempotency-Key", &format!("{method} {path}"));
    }
    d.stop().await;
}
