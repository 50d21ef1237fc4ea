//! Patient with outages, silent about secrets: a cloud outage shorter than `job_timeout_secs` delays an
//! operation instead of failing it, and `/health` shows a caller without the bearer token only the status
//! of each component, never an error's text; a database whose disk is full for longer than the lease's
//! lifetime leaves the daemon serving its exports until writing resumes.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;
#[path = "common/tmpfs.rs"]
mod tmpfs;

use std::time::{Duration, Instant};

use cloudsim::FaultSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};

/// What the cloud's error says (as a misconfigured management server might: a URL with a password).
const LEAKY: &str = "database postgres://cloud:hunter2@10.0.0.5/cloud refused";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_without_the_token_shows_only_the_status_of_each_component() {
    let d =
        TestDaemon::start_with(|c| c.api_token = Some(volume_daemon::config::Secret::new("t0ken")))
            .await;
    d.sim().faults().add(FaultSpec::FailCommand {
        command: "listZones".into(),
        count: 1000,
        errorcode: 431,
        cserrorcode: None,
        errortext: Some(LEAKY.into()),
        probability: None,
    });

    let open = d
        .http
        .get(format!("{}/health", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = open.text().await.unwrap();
    assert!(
        !text.contains("hunter2"),
        "no error text without the token: {text}"
    );
    let h: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(h["components"]["cloudstack"]["status"], "failed", "{h}");
    assert_eq!(h["components"]["database"]["status"], "ok", "{h}");
    for (name, c) in h["components"].as_object().unwrap() {
        assert_eq!(c["detail"], "details need the bearer token", "{name}: {h}");
    }

    let full: Value = d
        .http
        .get(format!("{}/health", d.base))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        full["components"]["cloudstack"]["status"], "failed",
        "{full}"
    );
    assert!(
        full["components"]["cloudstack"]["detail"]
            .as_str()
            .unwrap()
            .contains("listZones"),
        "with the token, the detail says what failed: {full}"
    );
    d.sim().faults().clear();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_outage_shorter_than_the_job_timeout_delays_an_operation_without_failing_it() {
    let d = TestDaemon::start().await;
    let body = json!({"name": "patient", "size": GIB, "disk_offering_id": d.custom_offering(), "zone_id": d.zone()});
    // The offering is known before the outage (the request's own checks ask the cloud at once).
    d.create_volume("before", GIB).await;

    let faults = d.sim().faults();
    faults.add(FaultSpec::FailCommand {
        command: "createVolume".into(),
        count: 100_000,
        errorcode: 530,
        cserrorcode: None,
        errortext: Some("the management server is temporarily unavailable".into()),
        probability: None,
    });
    let outage = Duration::from_secs(6);
    let begun = Instant::now();
    let (s, op) = d.post("/volumes", body).await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    tokio::time::sleep(outage).await;
    let (_, during) = d
        .get(&format!("/operations/{}", op["id"].as_str().unwrap()))
        .await;
    assert_eq!(
        during["status"], "executing",
        "still trying after {outage:?} of outage: {during}"
    );
    faults.clear();
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(begun.elapsed() >= outage);
    d.stop().await;
}

/// A database whose disk fills keeps the daemon serving: the lease's renewals fail and the lease expires,
/// but no other daemon can take it over while every write to that database fails, so the daemon stays up
/// and its exports are served; `/health` says writes fail (503, component `database` failed, `lease`
/// degraded). Once there is space the lease is renewed, `/health` is 200 again and operations complete,
/// without a restart.
#[test]
fn root_ext_a_full_database_disk_keeps_the_daemon_and_its_exports_until_writing_resumes() {
    use support::processes::{call, export_served, submit_create, wait_terminal, World, APPLIANCE};
    let fs = tmpfs::SmallFs::mount("3m");
    let w = World::new(50);
    let mut cmd = w.daemon_command();
    cmd.arg("--database")
        .arg(format!("sqlite://{}/journal.db", fs.dir.path().display()))
        .env("VOLUME_DAEMON_LEASE_TTL_SECS", "3")
        .env("VOLUME_DAEMON_LEASE_HEARTBEAT_SECS", "1");
    let (mut d, api) = World::start_daemon(&mut cmd);
    let health = |api: &str| call(reqwest::Method::GET, &format!("{api}/health"), None);
    let created = |api: &str| {
        let done = wait_terminal(api, &submit_create(api, &w.sim_url, "full-disk"));
        assert_eq!(done["status"], "completed", "{done}");
        done["response"]["volume_id"].as_str().unwrap().to_string()
    };
    let vol = created(&api);
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(s, 201, "{op}");
    let done = wait_terminal(&api, op["id"].as_str().unwrap());
    assert_eq!(done["status"], "completed", "{done}");
    assert!(export_served(&api, &vol));

    let filler = fs.fill();
    // Three lease lifetimes without a renewal.
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon stopped while the database's disk was full"
    );
    let (s, h) = health(&api);
    assert_eq!(s, 503, "{h}");
    let db = &h["components"]["database"];
    assert_eq!(db["status"], "failed", "{h}");
    let detail = db["detail"].as_str().unwrap();
    assert!(
        detail.contains("writes fail") && detail.contains("full"),
        "{detail}"
    );
    assert_eq!(h["components"]["lease"]["status"], "degraded", "{h}");
    assert!(
        export_served(&api, &vol),
        "the export closed on a full disk"
    );
    let (s, refused) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes"),
        Some(support::processes::create_body(&w.sim_url, "refused")),
    );
    assert_eq!(s, 503, "{refused}");
    assert_eq!(refused["code"], "database_error", "{refused}");

    std::fs::remove_file(filler).unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, h) = health(&api);
        if s == 200 {
            assert_eq!(h["components"]["lease"]["status"], "ok", "{h}");
            break;
        }
        assert!(
            Instant::now() < end,
            "still unhealthy with space again: {h}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    created(&api);
    assert!(export_served(&api, &vol));
    assert!(d.child.try_wait().unwrap().is_none());
}
