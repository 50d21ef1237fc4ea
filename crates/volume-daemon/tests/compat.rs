//! The predecessor's remaining routes end to end, with their shapes: `/health`'s summary fields, device path to
//! volume, export validation, the orphan count and clean-up, `admin/force-sync`. A real daemon with the
//! built-in simulator over real HTTP; an orphan is made by removing an attachment row behind the daemon's back.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use cloudsim::FaultSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_carries_the_predecessors_fields_and_only_status_words_without_the_token() {
    let d =
        TestDaemon::start_with(|c| c.api_token = Some(volume_daemon::config::Secret::new("t0ken")))
            .await;
    let (s, open) = d.get("/health").await;
    assert_eq!(s, StatusCode::OK, "{open}");
    assert_eq!(
        open["details"]["implementation_status"], "complete",
        "{open}"
    );
    assert_eq!(open["details"]["service"], "volume-daemon");
    assert_eq!(open["details"]["version"], open["version"]);
    for f in ["cloudstack_health", "database_health", "device_monitor"] {
        assert_eq!(open[f], "healthy", "{f}: {open}");
    }
    for (name, c) in open["components"].as_object().unwrap() {
        assert_eq!(
            c["detail"], "details need the bearer token",
            "{name} without the token: {open}"
        );
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
    assert_ne!(
        full["components"]["database"]["detail"],
        "details need the bearer token"
    );
    for f in [
        "cloudstack_health",
        "database_health",
        "device_monitor",
        "details",
    ] {
        assert_eq!(
            open[f], full[f],
            "{f} is the same with or without the token"
        );
    }
    // The root path answers the same shape.
    let root: Value = reqwest::get(format!("http://{}/health", d.daemon().api_addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(root["details"]["implementation_status"], "complete");
    d.stop().await;
}

/// The daemon's own database, opened beside it.
/// Removes a volume's attachment row directly in the daemon's database, as a change behind its back would.
async fn delete_attachment_row(d: &TestDaemon, volume: Uuid) {
    use sqlx::Connection;
    let url = support::config(d.dir.path()).effective_database_url();
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let gone = sqlx::query("DELETE FROM attachments WHERE volume_id = ?")
        .bind(volume.to_string())
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone.rows_affected(), 1);
    conn.close().await.unwrap();
}

async fn attach_to_appliance(d: &TestDaemon, name: &str) -> (Uuid, String) {
    let vol = d.create_volume(name, GIB).await;
    let op = d
        .run_ok(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    (
        vol,
        op["response"]["device_path"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_path_in_one_segment_names_its_volume() {
    let d = TestDaemon::start().await;
    let (vol, path) = attach_to_appliance(&d, "by-path").await;
    let (s, m) = d
        .get(&format!("/devices/{}/volume", path.replace('/', "%2F")))
        .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["volume_id"], vol.to_string());
    assert_eq!(m["device_path"], path);
    assert_eq!(m["operation_mode"], "oma");
    // Without the leading slash, as the predecessor's handler took it.
    let (s, m) = d
        .get(&format!(
            "/devices/{}/volume",
            path.trim_start_matches('/').replace('/', "%2F")
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["volume_id"], vol.to_string());
    let (s, e) = d.get("/devices/%2Fdev%2Fvdz/volume").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["code"], "not_found");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let (s, _) = d
        .get(&format!("/devices/{}/volume", path.replace('/', "%2F")))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a detached volume has no device");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_cleanup_is_a_dry_run_by_default_and_removes_only_true_orphans() {
    let d = TestDaemon::start().await;
    let (kept, _) = attach_to_appliance(&d, "kept").await;
    let (orphan, _) = attach_to_appliance(&d, "orphan").await;

    // All consistent: nothing orphaned, validation passes.
    let (s, c) = d.get("/exports/orphaned/count").await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["orphaned_exports_count"], 0, "{c}");
    assert!(c["timestamp"].is_string());
    let (s, v) = d.post("/exports/validate", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["recorded_exports"], 2);
    assert_eq!(v["served_exports"], 2);
    assert_eq!(v["inconsistencies"], json!([]));
    assert!(v["message"].as_str().unwrap().contains("successfully"));

    // The attachment row of one volume disappears behind the daemon's back: its export is now an orphan.
    delete_attachment_row(&d, orphan).await;

    let (_, c) = d.get("/exports/orphaned/count").await;
    assert_eq!(c["orphaned_exports_count"], 1, "{c}");
    let (_, v) = d.post("/exports/validate", json!({})).await;
    assert_eq!(v["valid"], false, "{v}");
    assert!(
        v["inconsistencies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().contains(&orphan.to_string())),
        "{v}"
    );

    // No body: a dry run. Nothing is removed.
    let resp = d
        .http
        .post(format!("{}/exports/cleanup", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let dry: Value = resp.json().await.unwrap();
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["total_exports"], 2, "{dry}");
    assert_eq!(dry["orphaned_exports"], 1, "{dry}");
    assert_eq!(dry["cleaned_exports"], 0);
    assert_eq!(dry["failed_cleanups"], 0);
    assert_eq!(dry["config_files_validated"], true);
    assert!(dry["operation_time"].as_u64().is_some(), "{dry}");
    assert!(!dry["database_inconsistencies"]
        .as_array()
        .unwrap()
        .is_empty());
    let o = &dry["orphaned_export_details"][0];
    assert_eq!(o["volume_id"], orphan.to_string(), "{dry}");
    assert_eq!(o["export_name"], format!("migration-vol-{orphan}"));
    assert_eq!(o["status"], "active");
    assert_eq!(o["device_mapping_exists"], false);
    assert_eq!(o["volume_exists"], true);
    assert_eq!(o["device_exists"], true);
    assert!(o["device_mapping_uuid"].is_null());
    assert!(o["created_at"].is_string());
    assert!(o["operation_id"].is_null());
    assert!(!o["orphan_reason"].as_str().unwrap().is_empty());
    let (_, dry2) = d.post("/exports/cleanup", json!({})).await;
    assert_eq!(dry2["dry_run"], true, "an empty body is a dry run too");
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 2, "a dry run removes nothing: {exports}");

    // By age: recorded just now, so younger than an hour; max_age_hours is required; a dry run by default.
    let (s, young) = d
        .post("/exports/cleanup/age", json!({"max_age_hours": 1}))
        .await;
    assert_eq!(s, StatusCode::OK, "{young}");
    assert_eq!(young["dry_run"], true, "{young}");
    assert_eq!(young["orphaned_exports"], 0, "{young}");
    let (s, e) = d
        .post("/exports/cleanup/age", json!({"dry_run": false}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["field"], "max_age_hours", "{e}");
    let (s, old) = d
        .post("/exports/cleanup/age", json!({"max_age_hours": 0}))
        .await;
    assert_eq!(s, StatusCode::OK, "{old}");
    assert_eq!(old["orphaned_exports"], 1, "{old}");

    // The clean-up itself: a repair operation removes the orphan's export; the attached volume's stays.
    let (s, done) = d.post("/exports/cleanup", json!({"dry_run": false})).await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert_eq!(done["dry_run"], false);
    assert_eq!(done["orphaned_exports"], 1, "{done}");
    assert_eq!(done["cleaned_exports"], 1, "{done}");
    assert_eq!(done["failed_cleanups"], 0, "{done}");
    assert_eq!(done["cleanup_errors"], json!([]));
    let o = &done["orphaned_export_details"][0];
    assert_eq!(o["cleaned"], true);
    let op_id = o["operation_id"].as_str().unwrap();
    let (_, op) = d.get(&format!("/operations/{op_id}")).await;
    assert_eq!(op["type"], "repair", "{op}");
    assert_eq!(op["request"]["repair"], "remove_orphan_export");
    assert_eq!(op["status"], "completed");
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 1, "{exports}");
    assert_eq!(exports["exports"][0]["volume_id"], kept.to_string());
    assert_eq!(exports["exports"][0]["status"], "active");
    let (_, c) = d.get("/exports/orphaned/count").await;
    assert_eq!(c["orphaned_exports_count"], 0, "{c}");
    let (_, again) = d.post("/exports/cleanup", json!({"dry_run": false})).await;
    assert_eq!(again["orphaned_exports"], 0, "{again}");

    // admin/force-sync: a reconcile with apply, in the predecessor's envelope.
    let (s, sync) = d.post("/admin/force-sync", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{sync}");
    assert_eq!(sync["message"], "Force sync completed successfully");
    assert!(sync["timestamp"].is_string());
    assert_eq!(sync["report"]["dry_run"], false, "{sync}");
    d.run_ok(&format!("/volumes/{kept}/detach"), json!({}))
        .await;
    d.stop().await;
}

/// The predecessor's `DELETE /exports/{volume_id}` was idempotent (200 even when nothing existed) and its client
/// takes 200 as done: an export that is not there, of a known or an unknown volume, is 200 with `removed` false.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_export_that_is_not_there_answers_200_removed_false() {
    let d = TestDaemon::start().await;
    let (volume, _) = attach_to_appliance(&d, "unexported").await;
    let (s, v) = d
        .send(reqwest::Method::DELETE, &format!("/exports/{volume}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["removed"], true, "{v}");
    let (s, v) = d
        .send(reqwest::Method::DELETE, &format!("/exports/{volume}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "a second delete: {v}");
    assert_eq!(v["removed"], false, "{v}");
    let unknown = Uuid::new_v4();
    let (s, v) = d
        .send(
            reqwest::Method::DELETE,
            &format!("/exports/{unknown}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "an unknown volume: {v}");
    assert_eq!(v["removed"], false, "{v}");
    assert_eq!(v["volume_id"], unknown.to_string(), "{v}");
    let (s, v) = d
        .send(reqwest::Method::DELETE, "/exports/not-a-uuid", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // The document says so.
    let (_, spec) = d.get("/openapi.json").await;
    let answers = &spec["paths"]["/exports/{volume_id}"]["delete"]["responses"];
    assert!(
        answers["200"]["description"]
            .as_str()
            .unwrap()
            .contains("`removed` false"),
        "{answers}"
    );
    assert!(answers["400"].is_object(), "{answers}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_routes_are_in_the_openapi_document() {
    let d = TestDaemon::start().await;
    let (_, spec) = d.get("/openapi.json").await;
    for (m, p) in [
        ("get", "/devices/{path}/volume"),
        ("post", "/exports/validate"),
        ("get", "/exports/orphaned/count"),
        ("post", "/exports/cleanup"),
        ("post", "/exports/cleanup/age"),
        ("post", "/admin/force-sync"),
    ] {
        assert!(spec["paths"][p][m].is_object(), "openapi lacks {m} {p}");
    }
    let health = &spec["components"]["schemas"]["Health"]["properties"];
    for f in [
        "cloudstack_health",
        "database_health",
        "device_monitor",
        "details",
    ] {
        assert!(health[f].is_object(), "Health lacks {f}");
    }
    // Every component the daemon can report is named, and every one it reports now is among them.
    let named = &health["components"]["properties"];
    for c in volume_api::HealthComponent::ALL {
        assert!(named[c.as_str()].is_object(), "Health.components lacks {c}");
    }
    for c in ["lease", "drift", "hub", "hub_import"] {
        assert!(named[c].is_object(), "Health.components lacks {c}");
    }
    let (_, now) = d.get("/health").await;
    let reported = now["components"].as_object().unwrap();
    assert!(reported.contains_key("lease"), "{now}");
    for c in reported.keys() {
        assert!(
            named[c].is_object(),
            "Health.components lacks {c}, which /health reports"
        );
    }
    d.stop().await;
}

/// The predecessor answered from its database alone, and its clients give up on a request after 30 s (and take a
/// failed `GET /volumes/{id}/device` for "not attached"): a CloudStack that answers late holds neither that
/// mapping nor a mutation's checks for more than a few seconds. The mapping shows the last recorded state, and
/// the attach is journaled at once and checked in its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cloud_holds_no_request_of_the_predecessors_clients() {
    let d = TestDaemon::start().await;
    let (on_appliance, path) = attach_to_appliance(&d, "late-cloud-1").await;
    let detached = d.create_volume("late-cloud-2", GIB).await;
    let (s, before) = d.get(&format!("/volumes/{on_appliance}/device")).await;
    assert_eq!(s, StatusCode::OK, "{before}");
    for command in ["listVolumes", "listVirtualMachines"] {
        d.sim().faults().add(FaultSpec::SlowCommand {
            command: command.into(),
            delay_ms: 12_000,
            count: 1000,
        });
    }

    let t = Instant::now();
    let (s, mapping) = d.get(&format!("/volumes/{on_appliance}/device")).await;
    let took = t.elapsed();
    assert_eq!(s, StatusCode::OK, "{mapping}");
    assert!(took < Duration::from_secs(10), "the mapping took {took:?}");
    assert_eq!(mapping["device_path"], path.as_str());
    // The state recorded by the daemon (CloudStack's own is not waited for).
    assert!(mapping["cloudstack_state"].is_string(), "{mapping}");
    assert_eq!(mapping["linux_state"], before["linux_state"]);

    let t = Instant::now();
    let (s, op) = d
        .post(
            &format!("/volumes/{detached}/attach"),
            json!({"vm_id": d.other_vm(0)}),
        )
        .await;
    let took = t.elapsed();
    assert_eq!(s, StatusCode::CREATED, "{op}");
    assert!(took < Duration::from_secs(10), "the attach took {took:?}");

    d.sim().faults().clear();
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "completed", "{done}");
    d.stop().await;
}
