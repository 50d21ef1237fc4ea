//! Idempotency keys as Stripe's API defines them: the key is looked up before anything else, so a replay
//! (also after the operation completed and changed what the pre-checks see) answers as the first request did,
//! with `Idempotent-Replayed: true`; the same key for another request is a 422 `idempotency_key_reused`.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};

struct Answer {
    status: StatusCode,
    replayed: Option<String>,
    body: Value,
}

async fn send(
    d: &TestDaemon,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Answer {
    let mut req = d
        .http
        .request(method, format!("{}{path}", d.base))
        .header("Idempotency-Key", key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    Answer {
        status: resp.status(),
        replayed: resp
            .headers()
            .get("Idempotent-Replayed")
            .map(|v| v.to_str().unwrap().to_string()),
        body: resp.json().await.unwrap(),
    }
}

/// Runs a mutation with `key` to completion, then sends it again: the replay is the first operation.
async fn run_then_replay(
    d: &TestDaemon,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Value {
    let first = send(d, method.clone(), path, key, body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{path}: {}", first.body);
    assert_eq!(first.replayed, None, "{path}: a first request is no replay");
    let done = d.wait_op(&first.body).await;
    assert_eq!(done["status"], "completed", "{path}: {done}");
    let again = send(d, method, path, key, body).await;
    assert_eq!(
        again.status,
        StatusCode::CREATED,
        "{path}: a replay after completion answers as the first request did: {}",
        again.body
    );
    assert_eq!(again.replayed.as_deref(), Some("true"), "{path}");
    assert_eq!(
        again.body["id"], first.body["id"],
        "{path}: the first operation"
    );
    assert_eq!(again.body["status"], "completed", "{path}: {}", again.body);
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_after_completion_return_the_first_operation_for_every_kind() {
    let d = TestDaemon::start().await;
    let create = json!({"name": "idem", "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()});
    let done = run_then_replay(
        &d,
        reqwest::Method::POST,
        "/volumes",
        "create-1",
        Some(create),
    )
    .await;
    let vol = done["response"]["volume_id"].as_str().unwrap().to_string();
    let vm = d.other_vm(0);
    // The attach's pre-check would now say "already attached" (409): the key comes first.
    run_then_replay(
        &d,
        reqwest::Method::POST,
        &format!("/volumes/{vol}/attach"),
        "attach-1",
        Some(json!({"vm_id": vm})),
    )
    .await;
    run_then_replay(
        &d,
        reqwest::Method::POST,
        &format!("/volumes/{vol}/detach"),
        "detach-1",
        None,
    )
    .await;
    // The delete's pre-check would now say "no such volume" (404).
    run_then_replay(
        &d,
        reqwest::Method::DELETE,
        &format!("/volumes/{vol}"),
        "delete-1",
        None,
    )
    .await;
    let (_, ops) = d.get("/operations").await;
    assert_eq!(
        ops.as_array().unwrap().len(),
        4,
        "no replay journaled anything: {ops}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_for_another_request_is_refused() {
    let d = TestDaemon::start().await;
    let body = |name: &str| json!({"name": name, "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()});
    let first = send(
        &d,
        reqwest::Method::POST,
        "/volumes",
        "k",
        Some(body("one")),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let done = d.wait_op(&first.body).await;
    let vol = done["response"]["volume_id"].as_str().unwrap().to_string();

    // Another body of the same kind, then another kind.
    let other_body = send(
        &d,
        reqwest::Method::POST,
        "/volumes",
        "k",
        Some(body("two")),
    )
    .await;
    let other_kind = send(
        &d,
        reqwest::Method::POST,
        &format!("/volumes/{vol}/detach"),
        "k",
        None,
    )
    .await;
    for (what, a) in [("another body", other_body), ("another kind", other_kind)] {
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{what}: {}",
            a.body
        );
        assert_eq!(
            a.body["code"], "idempotency_key_reused",
            "{what}: {}",
            a.body
        );
        assert_eq!(a.body["field"], "Idempotency-Key", "{what}: {}", a.body);
        assert!(
            a.body["error"]
                .as_str()
                .unwrap()
                .contains(first.body["id"].as_str().unwrap()),
            "{what}: the error names the first operation: {}",
            a.body
        );
        assert_eq!(a.replayed, None, "{what}");
    }
    let (_, ops) = d.get("/operations").await;
    assert_eq!(
        ops.as_array().unwrap().len(),
        1,
        "nothing else journaled: {ops}"
    );
    d.stop().await;
}

/// A key that is not 1 to 200 visible ASCII characters, or more than one key, is a 400 naming the header,
/// and nothing is journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_repeated_keys_are_refused_and_nothing_is_recorded() {
    let d = TestDaemon::start().await;
    let body = json!({"name": "k", "size": GIB, "zone_id": d.zone(), "disk_offering_id": d.custom_offering()});
    let long = "k".repeat(201);
    for key in ["a b", "tab\there", "", long.as_str()] {
        let a = send(
            &d,
            reqwest::Method::POST,
            "/volumes",
            key,
            Some(body.clone()),
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "key {key:?}: {}", a.body);
        assert_eq!(
            a.body["field"], "Idempotency-Key",
            "key {key:?}: {}",
            a.body
        );
    }
    let resp = d
        .http
        .post(format!("{}/volumes", d.base))
        .header("Idempotency-Key", "first")
        .header("Idempotency-Key", "second")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["field"], "Idempotency-Key", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("more than one"),
        "{v}"
    );
    let (_, ops) = d.get("/operations").await;
    assert_eq!(ops.as_array().map(Vec::len), Some(0), "{ops}");
    // The largest key accepted.
    let ok = send(
        &d,
        reqwest::Method::POST,
        "/volumes",
        &"k".repeat(200),
        Some(body),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_check_saw_the_same_keys_first_request_run_is_its_replay() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("idem-race", GIB).await;
    let vm = d.other_vm(0);
    let path = format!("/volumes/{vol}/attach");
    // The first request's check is slow (CloudStack answers its VM look-up late); the same request sent
    // meanwhile is journaled and has attached the volume by the time that check looks.
    d.sim().faults().add(cloudsim::FaultSpec::SlowCommand {
        command: "listVirtualMachines".into(),
        delay_ms: 2000,
        count: 1,
    });
    let slow = {
        let (http, base, path, vm) = (d.http.clone(), d.base.clone(), path.clone(), vm.clone());
        tokio::spawn(async move {
            let resp = http
                .post(format!("{base}{path}"))
                .header("Idempotency-Key", "attach-race")
                .json(&json!({ "vm_id": vm }))
                .send()
                .await
                .unwrap();
            let replayed = resp
                .headers()
                .get("Idempotent-Replayed")
                .map(|v| v.to_str().unwrap().to_string());
            (resp.status(), replayed, resp.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let fast = send(
        &d,
        reqwest::Method::POST,
        &path,
        "attach-race",
        Some(json!({ "vm_id": vm })),
    )
    .await;
    assert_eq!(fast.status, StatusCode::CREATED, "{}", fast.body);
    let done = d.wait_op(&fast.body).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (status, replayed, body) = slow.await.unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the slow request is the same request again: {body}"
    );
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(body["id"], fast.body["id"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_journaled_for_a_client_that_went_away_still_runs() {
    use tokio::io::AsyncWriteExt;
    let d = TestDaemon::start().await;
    let addr = d
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // Clients that send a create and disconnect at once, at staggered moments: some before the request
    // was read, some while it is being checked or journaled, some after it was answered.
    for i in 0..200u64 {
        let body = json!({"name": format!("gone-{i}"), "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()}).to_string();
        let req = format!(
            "POST /api/v1/volumes HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_micros((i % 40) * 150)).await;
        drop(s);
    }
    // Every operation journaled runs to the end; none waits, unqueued, for a restart.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (s, unfinished) = d.get("/operations?status=pending").await;
        assert_eq!(s, StatusCode::OK, "{unfinished}");
        let (_, running) = d.get("/operations?status=executing").await;
        let left = unfinished.as_array().unwrap().len() + running.as_array().unwrap().len();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} operations still unfinished after 60 s: {unfinished}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let (_, all) = d.get("/operations").await;
    assert!(
        !all.as_array().unwrap().is_empty(),
        "some creates were journaled"
    );
    d.stop().await;
}
