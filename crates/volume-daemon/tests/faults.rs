//! Faults injected into the simulator: each ends in a failed operation with a clear error and kind, and the
//! cloud attachment undone (or never made). Also: transient cloud errors are retried and do not fail anything.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use cloudsim::FaultSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

async fn attach_appliance(d: &TestDaemon, vol: Uuid) -> Value {
    let (s, op) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    d.wait_op(&op).await
}

/// Cloud, database and export registry all say "not attached".
async fn assert_undone(d: &TestDaemon, vol: Uuid) {
    let (_, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(st["state"], "detached", "{st}");
    assert!(st["attachment"].is_null(), "{st}");
    assert!(
        st["cloudstack_data"]["virtualmachineid"].is_null(),
        "the cloud attachment must be undone: {st}"
    );
    let (_, exports) = d.get("/exports").await;
    assert_eq!(exports["count"], 0, "{exports}");
    let (s, _) = d.get(&format!("/volumes/{vol}/device")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attach_job_fails_the_operation_with_the_cloud_error() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("f1", GIB).await;
    d.sim().faults().add(FaultSpec::FailJob {
        command: "attachVolume".into(),
        count: 1,
        errorcode: 530,
        errortext: Some("Failed to attach volume: storage pool unreachable".into()),
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("storage pool unreachable"),
        "the cloud's reason is passed on: {done}"
    );
    assert_undone(&d, vol).await;
    // The volume is usable afterwards.
    let ok = attach_appliance(&d, vol).await;
    assert_eq!(ok["status"], "completed", "{ok}");
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_appears_is_detached_again() {
    let d = TestDaemon::start_with(|c| c.device_timeout_secs = 2).await;
    let vol = d.create_volume("f2", GIB).await;
    d.sim().faults().add(FaultSpec::SkipLinkOnAttach {
        volume_id: Some(vol.to_string()),
        count: 1,
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "device_timeout", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains(&vol.simple().to_string()[..20]),
        "the error names the serial looked for: {err}"
    );
    assert!(
        err.contains("detached from the appliance"),
        "the error says how the undo went: {err}"
    );
    assert_undone(&d, vol).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_of_the_wrong_size_is_refused_and_detached_again() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("f3", GIB).await;
    d.sim().faults().add(FaultSpec::WrongSize {
        volume_id: Some(vol.to_string()),
        delta_bytes: 1 << 20,
    });
    let done = attach_appliance(&d, vol).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "device_mismatch", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains(&GIB.to_string()) && err.contains(&(GIB + (1 << 20)).to_string()),
        "the error names both sizes: {err}"
    );
    d.sim().faults().clear();
    assert_undone(&d, vol).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_cloud_errors_are_retried() {
    let d = TestDaemon::start().await;
    d.sim().faults().add(FaultSpec::Throttle {
        count: 2,
        probability: None,
    });
    d.sim().faults().add(FaultSpec::FailCommand {
        command: "createVolume".into(),
        count: 1,
        errorcode: 530,
        cserrorcode: Some(4250),
        errortext: Some("temporarily unavailable".into()),
        probability: None,
    });
    let vol = d.create_volume("f4", GIB).await;
    let (s, st) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_appliance_identity_fails_appliance_requests_clearly() {
    let d = TestDaemon::start_with(|c| {
        c.appliance_vm_id = Some("00000000-0000-4000-8000-000000000000".into())
    })
    .await;
    let vol = d.create_volume("f5", GIB).await;
    let (s, v) = d
        .post(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.other_vm(0)}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "never a silent remote attach: {v}"
    );
    assert_eq!(v["code"], "appliance_identity_unknown");
    let (s, h) = d.get("/health").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{h}");
    assert_eq!(h["components"]["appliance_identity"]["status"], "failed");
    // Setting it through the API is refused while the configuration fixes it.
    let (s, v) = d
        .send(
            reqwest::Method::PUT,
            "/appliance",
            Some(json!({"vm_id": d.appliance()})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    d.stop().await;
}
