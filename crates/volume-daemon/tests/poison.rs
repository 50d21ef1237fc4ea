//! Text no database can store never gets in, and a journal entry that cannot be written never stops the
//! daemon: control characters are refused at the edge (every string of every request), a request an earlier
//! version journaled with such text fails without touching the cloud, and an entry whose every write the
//! database refuses is retried a bounded number of times, then reported by `/health` while the daemon serves.
//! Tests named `ext_` run against a throwaway PostgreSQL server.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

#[path = "common/db.rs"]
mod db;
mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{call, TestDaemon, GIB};
use uuid::Uuid;
use volume_daemon::config::Config;
use volume_daemon::daemon::RunningDaemon;
use volume_daemon::store::{NewOperation, OpType, Store};

/// Start-up must finish well within this (it used to wait forever on an entry it could not finish).
const START_LIMIT: Duration = Duration::from_secs(60);

async fn start(cfg: Config) -> RunningDaemon {
    tokio::time::timeout(START_LIMIT, RunningDaemon::start(cfg))
        .await
        .expect("start-up completes although the journal holds an entry it cannot finish")
        .expect("daemon starts")
}

/// The data volumes the cloud has (the simulator's VMs have root volumes of their own).
async fn cloud_data_volumes(sim: &cloudsim::RunningSimulator) -> usize {
    let cs = cloudstack::Client::new(cloudstack::Config {
        url: sim.api_url(),
        api_key: "sim-api-key".into(),
        secret_key: cloudstack::Secret::new("sim-secret-key"),
        ..cloudstack::Config::default()
    })
    .unwrap();
    cs.list_volumes(&cloudstack::ListVolumes {
        volume_type: Some("DATADISK".into()),
        ..Default::default()
    })
    .await
    .unwrap()
    .len()
}

fn assert_refused(what: &str, status: StatusCode, body: &Value, field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    assert_eq!(body["code"], "invalid_request", "{what}: {body}");
    assert_eq!(body["field"], field, "{what}: {body}");
}

/// Every kind of string a request carries: body fields (nested too), path and query parameters and the
/// idempotency key. Nothing is journaled and nothing reaches the cloud.
async fn refuses_control_characters_everywhere(d: &TestDaemon) {
    let (zone, off) = (d.zone(), d.custom_offering());
    let before = cloud_data_volumes(d.sim()).await;
    let create = |name: &str, zone: &str, metadata: Value| json!({"name": name, "size": GIB, "disk_offering_id": off, "zone_id": zone, "metadata": metadata});
    for (what, body, field) in [
        ("NUL in name", create("a\u{0}", &zone, json!({})), "name"),
        (
            "NUL in zone_id",
            create("a", "a\u{0}", json!({})),
            "zone_id",
        ),
        (
            "BEL in a metadata value",
            create("a", &zone, json!({"owner": "x\u{7}"})),
            "metadata.owner",
        ),
        (
            "newline in a metadata key",
            create("a", &zone, json!({"a\nb": "x"})),
            "metadata",
        ),
        (
            "C1 control in disk_offering_id",
            json!({"name": "a", "size": GIB, "disk_offering_id": "o\u{85}", "zone_id": zone}),
            "disk_offering_id",
        ),
    ] {
        let (s, v) = d.post("/volumes", body).await;
        assert_refused(what, s, &v, field);
    }
    let vol = Uuid::new_v4();
    let (s, v) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": "vm\u{0}"}),
        )
        .await;
    assert_refused("NUL in vm_id", s, &v, "vm_id");
    let (s, v) = d.get("/vms/vm%00/volumes").await;
    assert_refused("NUL in a path parameter", s, &v, "vm_id");
    let (s, v) = d.get("/volumes/a%01b").await;
    assert_refused("control in the volume id", s, &v, "volume_id");
    let (s, v) = d.get("/operations?vm_id=a%00").await;
    assert_refused("NUL in a query parameter", s, &v, "vm_id");
    let (s, v) = d.get("/devices/volume?path=%2Fdev%2F%1B").await;
    assert_refused("ESC in a query parameter", s, &v, "path");
    let resp = d
        .http
        .post(format!("{}/volumes", d.base))
        .header("Idempotency-Key", "key\twith-tab")
        .json(&create("a", &zone, json!({})))
        .send()
        .await
        .unwrap();
    let s = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_refused("tab in Idempotency-Key", s, &v, "Idempotency-Key");

    let (_, ops) = d.get("/operations").await;
    assert_eq!(ops, json!([]), "nothing is journaled");
    assert_eq!(
        cloud_data_volumes(d.sim()).await,
        before,
        "nothing reaches the cloud"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_refused_at_the_edge_naming_the_field() {
    let d = TestDaemon::start().await;
    refuses_control_characters_everywhere(&d).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_postgres_control_characters_are_refused_at_the_edge_naming_the_field() {
    let db = db::postgres().await;
    let d = TestDaemon::start_with(|c| c.database_url = Some(db.url.clone())).await;
    refuses_control_characters_everywhere(&d).await;
    d.stop().await;
}

/// Journals a `create` the way an earlier version accepted it.
async fn journal_create(url: &str, request: Value) -> Uuid {
    let store = Store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    let id = Uuid::new_v4();
    store
        .insert_operation(&NewOperation {
            id,
            op_type: OpType::Create,
            volume_id: None,
            vm_id: None,
            request,
            idempotency_key: None,
            queue_seq: None,
        })
        .await
        .unwrap();
    store.close().await;
    id
}

/// An earlier version journaled `zone_id` and `name` with a NUL (PostgreSQL stores the JSON text, escaped;
/// it refuses the NUL itself in any later write). Start-up fails both entries at once, naming the field,
/// without asking the cloud for a volume, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_postgres_a_journaled_request_with_nul_fails_at_start_without_touching_the_cloud() {
    let db = db::postgres().await;
    // A first run to learn the simulator's zone and offering (they are the same in every run).
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = support::config(dir.path());
    cfg.database_url = Some(db.url.clone());
    let first = start(cfg.clone()).await;
    let sim = first.sim().unwrap();
    let (zone, off) = (sim.zone_id().to_string(), support::custom_offering_of(sim));
    first.shutdown().await;

    let bad_zone = journal_create(
        &db.url,
        json!({"name": "z", "size": GIB, "disk_offering_id": off, "zone_id": "a\u{0}"}),
    )
    .await;
    let bad_name = journal_create(
        &db.url,
        json!({"name": "n\u{0}", "size": GIB, "disk_offering_id": off, "zone_id": zone}),
    )
    .await;

    let second = start(cfg).await;
    let base = format!("http://{}/api/v1", second.api_addr());
    for (id, field) in [(bad_zone, "zone_id"), (bad_name, "name")] {
        let op = call(
            &base,
            reqwest::Method::GET,
            &format!("/operations/{id}?wait=30"),
            None,
        )
        .await;
        assert_eq!(op["status"], "failed", "{op}");
        assert_eq!(op["error_code"], "invalid_request", "{op}");
        assert!(
            op["error"].as_str().unwrap().contains(field),
            "the error names {field}: {op}"
        );
    }
    assert_eq!(
        cloud_data_volumes(second.sim().unwrap()).await,
        0,
        "no cloud volume was created"
    );
    // Recovery is over once the resumed operations have ended; nothing is left stuck.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health = call(&base, reqwest::Method::GET, "/health", None).await;
        if health["components"]["journal"]["status"] == "ok" {
            break;
        }
        assert!(std::time::Instant::now() < end, "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await;
}

/// The database refuses every write of one journal entry (a trigger, as a damaged or foreign row would).
/// Start-up tries a bounded number of times, then completes; the API serves other requests and `/health`
/// names the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_database_refuses_to_write_leaves_the_daemon_serving_and_health_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path());
    let url = cfg.effective_database_url();
    let first = start(cfg.clone()).await;
    let sim = first.sim().unwrap();
    let (zone, off) = (sim.zone_id().to_string(), support::custom_offering_of(sim));
    first.shutdown().await;

    let poisoned = journal_create(
        &url,
        json!({"name": "p", "size": GIB, "disk_offering_id": off, "zone_id": zone}),
    )
    .await;
    {
        use sqlx::{Connection, Executor};
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        conn.execute(
            format!(
                "CREATE TRIGGER poisoned BEFORE UPDATE ON operations WHEN OLD.id = '{poisoned}' \
                 BEGIN SELECT RAISE(ABORT, 'this row cannot be written'); END"
            )
            .as_str(),
        )
        .await
        .unwrap();
        conn.close().await.unwrap();
    }

    let second = start(cfg).await;
    let base = format!("http://{}/api/v1", second.api_addr());
    // The API serves at once; the entry is reported stuck once its bounded retries are spent.
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let health = loop {
        let resp = reqwest::get(format!("{base}/health")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let health: Value = resp.json().await.unwrap();
        let journal = &health["components"]["journal"];
        assert_eq!(journal["status"], "failed", "{health}");
        if journal["detail"]
            .as_str()
            .unwrap()
            .contains(&poisoned.to_string())
        {
            break health;
        }
        assert!(
            std::time::Instant::now() < end,
            "/health names the stuck operation: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        health["components"]["journal"]["detail"]
            .as_str()
            .unwrap()
            .contains("stuck"),
        "{health}"
    );
    // The daemon serves: reads answer and a new operation runs to its end.
    let op = call(
        &base,
        reqwest::Method::POST,
        "/volumes",
        Some(json!({"name": "fresh", "size": GIB, "disk_offering_id": off, "zone_id": zone})),
    )
    .await;
    let done = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{}?wait=60", op["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let stuck = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{poisoned}"),
        None,
    )
    .await;
    assert_eq!(stuck["status"], "pending", "{stuck}");
    second.shutdown().await;
}
