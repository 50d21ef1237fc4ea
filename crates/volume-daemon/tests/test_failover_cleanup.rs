//! `POST /cleanup/test-failover` end to end: a real daemon with the built-in simulator over real HTTP. A volume
//! written through the appliance's NBD export goes to a test VM (a VM deployed in the simulator), and the
//! clean-up brings it back: the test VM stopped first (or destroyed with `delete_vm`), the volume attached,
//! named and exported on the appliance again, its data read back through the export. The refusals happen
//! before anything is journaled, and a test VM that does not stop fails the operation with the volume left
//! where it was.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use cloudsim::FaultSpec;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

const PATTERN: &[u8] = b"written before the test failover";

/// A fresh running test VM in the simulator.
fn deploy_test_vm(d: &TestDaemon, name: &str) -> String {
    let vm = d.sim().faults().deploy_vm(name).unwrap();
    vm["id"].as_str().unwrap().to_string()
}

/// The simulator's state of a VM; `None` once it is gone.
fn vm_state(d: &TestDaemon, vm: &str) -> Option<String> {
    d.sim()
        .vms()
        .into_iter()
        .find(|(id, ..)| id == vm)
        .map(|(_, _, state, _)| state)
}

async fn nbd_client(d: &TestDaemon, volume: Uuid) -> nbd::client::Client {
    nbd::client::Handshake::connect(d.daemon().nbd_addr())
        .await
        .unwrap()
        .go(&volume_api::export_name(volume))
        .await
        .unwrap()
}

/// A volume with [`PATTERN`] at 1 MiB, written through the appliance's export, then attached to `test_vm` as a
/// test failover does.
async fn volume_on_test_vm(d: &TestDaemon, name: &str, test_vm: &str) -> Uuid {
    let vol = d.create_volume(name, GIB).await;
    d.run_ok(
        &format!("/volumes/{vol}/attach"),
        json!({"vm_id": d.appliance()}),
    )
    .await;
    let mut c = nbd_client(d, vol).await;
    c.write(1 << 20, PATTERN, 0).await.unwrap();
    c.flush().await.unwrap();
    drop(c);
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let op = d
        .run_ok(&format!("/volumes/{vol}/attach"), json!({"vm_id": test_vm}))
        .await;
    assert_eq!(op["response"]["device_path"], Value::Null, "{op}");
    vol
}

fn cleanup_body(test_vm: &str, vol: Uuid, oma: &str, delete_vm: bool, force: bool) -> Value {
    json!({"test_vm_id": test_vm, "volume_id": vol, "oma_vm_id": oma, "delete_vm": delete_vm,
           "force_clean": force})
}

/// The volume is attached to the appliance, named, and served with the data written before the failover.
async fn assert_back_on_the_appliance(d: &TestDaemon, vol: Uuid, done: &Value) {
    let r = &done["response"];
    let (s, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["attachment"]["vm_id"], d.appliance(), "{v}");
    assert_eq!(v["attachment"]["target"], "appliance", "{v}");
    assert_eq!(v["linux_state"], "present", "{v}");
    let link = r["symlink_path"].as_str().unwrap();
    assert!(
        std::path::Path::new(link).exists(),
        "stable name {link}: {done}"
    );
    assert_eq!(
        v["attachment"]["persistent_device_name"],
        r["persistent_device_name"]
    );
    let (s, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    assert_eq!(e["export_name"], r["export_name"]);
    assert_eq!(e["status"], "active", "{e}");
    assert_eq!(e["device_path"], r["device_path"]);
    let mut c = nbd_client(d, vol).await;
    let read = c.read(1 << 20, PATTERN.len() as u32).await.unwrap();
    assert_eq!(read, PATTERN, "the data written before the failover");
    let cloud = d.sim().root_volume_id(&d.appliance());
    assert!(cloud.is_some(), "the appliance keeps its root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_test_vm_is_stopped_and_the_volume_goes_back_to_the_appliance() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-keep");
    let vol = volume_on_test_vm(&d, "tf-keep", &test_vm).await;
    assert_eq!(vm_state(&d, &test_vm).as_deref(), Some("Running"));

    let (s, op) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, vol, &d.appliance(), false, false),
        )
        .await;
    // The predecessor's answer: 201 with the operation, the test VM as its VM, the request as sent.
    assert_eq!(s, StatusCode::CREATED, "{op}");
    assert_eq!(op["type"], "test_failover_cleanup", "{op}");
    assert_eq!(op["vm_id"], test_vm);
    assert_eq!(op["volume_id"], vol.to_string());
    assert!(Uuid::parse_str(op["id"].as_str().unwrap()).is_ok());
    assert!(matches!(
        op["status"].as_str(),
        Some("pending" | "executing")
    ));
    assert_eq!(
        op["request"],
        cleanup_body(&test_vm, vol, &d.appliance(), false, false)
    );
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "completed", "{done}");
    let r = &done["response"];
    // The predecessor's response keys, with this daemon's values.
    assert_eq!(r["test_vm_id"], test_vm);
    assert_eq!(r["volume_id"], vol.to_string());
    assert_eq!(r["oma_vm_id"], d.appliance());
    assert_eq!(r["vm_deleted"], false);
    assert!(r["message"]
        .as_str()
        .unwrap()
        .contains("detached from test VM"));
    let path = r["device_path"].as_str().unwrap();
    assert!(path.contains("virtio-"), "the by-id path: {r}");
    assert_eq!(r["nbd_port"], d.daemon().nbd_addr().port());
    assert_eq!(r["export_name"], volume_api::export_name(vol));
    assert!(done["cloudstack_job_id"].as_str().is_some(), "{done}");
    // Stopped first (it was running), kept (no delete_vm).
    assert_eq!(vm_state(&d, &test_vm).as_deref(), Some("Stopped"));
    assert_back_on_the_appliance(&d, vol, &done).await;
    let (_, on_test) = d.get(&format!("/vms/{test_vm}/volumes")).await;
    assert_eq!(on_test, json!([]), "nothing recorded on the test VM");
    // The same request again is refused: the volume is no longer on the test VM.
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, vol, &d.appliance(), false, false),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_vm_destroys_the_test_vm_and_its_other_volume_comes_back_too() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-delete");
    let first = volume_on_test_vm(&d, "tf-delete-1", &test_vm).await;
    let second = volume_on_test_vm(&d, "tf-delete-2", &test_vm).await;

    let done = d
        .run_ok(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, first, &d.appliance(), true, false),
        )
        .await;
    assert_eq!(done["response"]["vm_deleted"], true, "{done}");
    assert!(done["response"]["message"]
        .as_str()
        .unwrap()
        .contains("the test VM destroyed"));
    assert_eq!(vm_state(&d, &test_vm), None, "expunged from the simulator");
    assert_back_on_the_appliance(&d, first, &done).await;
    // CloudStack detached the VM's other data volume (and removed its root volume with the VM).
    let (_, v) = d.get(&format!("/volumes/{second}")).await;
    assert!(v["cloudstack_data"]["virtualmachineid"].is_null(), "{v}");
    assert_eq!(v["attachment"]["vm_id"], test_vm, "still recorded: {v}");

    // The second volume is still recorded on the test VM: its clean-up skips the VM's part.
    let done = d
        .run_ok(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, second, &d.appliance(), true, false),
        )
        .await;
    assert_eq!(done["response"]["vm_deleted"], true, "{done}");
    assert_back_on_the_appliance(&d, second, &done).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_clean_detaches_from_a_running_test_vm_without_stopping_it() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-force");
    let vol = volume_on_test_vm(&d, "tf-force", &test_vm).await;
    let done = d
        .run_ok(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, vol, &d.appliance(), false, true),
        )
        .await;
    assert_eq!(vm_state(&d, &test_vm).as_deref(), Some("Running"));
    assert_back_on_the_appliance(&d, vol, &done).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_vm_that_does_not_stop_fails_the_clean_up_with_the_volume_left_on_it() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-stuck");
    let vol = volume_on_test_vm(&d, "tf-stuck", &test_vm).await;
    d.sim().faults().add(FaultSpec::FailJob {
        command: "stopVirtualMachine".into(),
        count: 1,
        errorcode: 530,
        errortext: Some("Unable to stop the VM: the host does not answer".into()),
    });
    let (s, op) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, vol, &d.appliance(), true, false),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let done = d.wait_op(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "conflict", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("the test VM {test_vm} is Running")),
        "{err}"
    );
    assert!(err.contains("the host does not answer"), "{err}");
    assert!(err.contains("force_clean"), "{err}");
    assert_eq!(done["step"], "cloud_stop_job", "{done}");
    // Nothing moved: still on the running test VM, in the records and in the cloud; the VM is kept.
    assert_eq!(vm_state(&d, &test_vm).as_deref(), Some("Running"));
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(v["attachment"]["vm_id"], test_vm, "{v}");
    assert_eq!(v["cloudstack_data"]["virtualmachineid"], test_vm, "{v}");
    let (s, _) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Once the VM stops, the same clean-up goes through.
    let done = d
        .run_ok(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, vol, &d.appliance(), true, false),
        )
        .await;
    assert_back_on_the_appliance(&d, vol, &done).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_ups_that_cannot_be_right_are_refused_before_anything_is_journaled() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-refusals");
    let other = d.other_vm(0);
    let on_test = volume_on_test_vm(&d, "tf-refused", &test_vm).await;
    let detached = d.create_volume("tf-detached", GIB).await;
    let elsewhere = d.create_volume("tf-elsewhere", GIB).await;
    d.run_ok(
        &format!("/volumes/{elsewhere}/attach"),
        json!({"vm_id": other}),
    )
    .await;

    // Another appliance.
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, on_test, &other, false, false),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["field"], "oma_vm_id", "{e}");
    assert!(e["error"]
        .as_str()
        .unwrap()
        .contains("is not the appliance this daemon runs on"));
    // The appliance named as the test VM.
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&d.appliance(), on_test, &d.appliance(), false, false),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["field"], "test_vm_id", "{e}");
    // A volume that is not on the test VM: detached, or on another VM.
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, detached, &d.appliance(), false, false),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["code"], "conflict");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains(&format!("is not attached to the test VM {test_vm}")),
        "{msg}"
    );
    assert!(msg.contains("the daemon records it detached"), "{msg}");
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, elsewhere, &d.appliance(), false, false),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains(&format!("records it attached to VM {other}")),
        "{msg}"
    );
    // An unknown volume, and a body that is not the predecessor's.
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, Uuid::new_v4(), &d.appliance(), false, false),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    let (s, e) = d
        .post(
            "/cleanup/test-failover",
            json!({"test_vm_id": test_vm, "volume_id": "not-a-uuid", "oma_vm_id": d.appliance()}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (_, ops) = d.get("/operations?type=test_failover_cleanup").await;
    assert_eq!(ops, json!([]), "nothing was journaled");
    // Nothing moved.
    assert_eq!(vm_state(&d, &test_vm).as_deref(), Some("Running"));
    let (_, v) = d.get(&format!("/volumes/{on_test}")).await;
    assert_eq!(v["attachment"]["vm_id"], test_vm, "{v}");
    d.stop().await;
}

/// A clean-up queued behind another operation (so its check at submission is left to its turn) and run after
/// the volume is back on the appliance, as a retried clean-up is: it fails with `conflict` and leaves the
/// export, its access list and its writer's session as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_up_that_finds_the_volume_already_back_on_the_appliance_changes_nothing() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-twice");
    let vol = volume_on_test_vm(&d, "tf-twice", &test_vm).await;
    let body = cleanup_body(&test_vm, vol, &d.appliance(), false, true);
    let first = d.run_ok("/cleanup/test-failover", body.clone()).await;
    let mut writer = nbd_client(&d, vol).await;
    writer.write(0, b"live", 0).await.unwrap();
    let (_, before) = d.get(&format!("/volumes/{vol}")).await;

    // A slow snapshot keeps an operation unfinished, so the retried clean-up is journaled behind it.
    d.sim().faults().add(FaultSpec::SlowJob {
        command: "createSnapshot".into(),
        extra_delay_ms: 1_500,
        count: 1,
    });
    let (s, snap) = d
        .post(&format!("/volumes/{vol}/snapshots"), json!({}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    let (s, again) = d.post("/cleanup/test-failover", body).await;
    assert_eq!(s, StatusCode::CREATED, "{again}");
    let again = d.wait_op(&again).await;
    assert_eq!(again["status"], "failed", "{again}");
    assert_eq!(again["error_code"], "conflict", "{again}");
    assert!(
        again["error"]
            .as_str()
            .unwrap()
            .contains("already attached to the appliance"),
        "{again}"
    );
    assert_eq!(d.wait_op(&snap).await["status"], "completed");
    let (_, after) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(after["attachment"], before["attachment"], "{after}");
    let (_, e) = d.get(&format!("/exports/{vol}")).await;
    assert_eq!(
        e["generation"], first["response"]["export_generation"],
        "{e}"
    );
    writer.write(4, b"same", 0).await.unwrap();
    writer.flush().await.expect("the writer's session goes on");
    assert_eq!(writer.read(0, 8).await.unwrap(), b"livesame");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clean_up_route_is_in_the_openapi_document() {
    let d = TestDaemon::start().await;
    let (_, spec) = d.get("/openapi.json").await;
    assert!(spec["paths"]["/cleanup/test-failover"]["post"].is_object());
    let req = &spec["components"]["schemas"]["TestFailoverCleanupRequest"]["properties"];
    for f in [
        "test_vm_id",
        "volume_id",
        "oma_vm_id",
        "delete_vm",
        "force_clean",
    ] {
        assert!(req[f].is_object(), "request lacks {f}");
    }
    d.stop().await;
}

/// `delete_vm` never destroys a test VM whose root disk is a volume the daemon manages (a migrated boot disk
/// attached with attach-root): destroying it with expunge would delete that volume. The clean-up moves its
/// own volume back and says why the VM stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_vm_keeps_a_test_vm_whose_root_disk_is_a_managed_volume() {
    let d = TestDaemon::start().await;
    let test_vm = deploy_test_vm(&d, "test-failover-managed-root");
    d.stop_vm_and_detach_its_root(&test_vm);
    let root = d.create_volume("tf-boot", GIB).await;
    d.run_ok(
        &format!("/volumes/{root}/attach-root"),
        json!({"vm_id": test_vm}),
    )
    .await;
    let data = volume_on_test_vm(&d, "tf-data", &test_vm).await;

    let done = d
        .run_ok(
            "/cleanup/test-failover",
            cleanup_body(&test_vm, data, &d.appliance(), true, false),
        )
        .await;
    assert_eq!(done["response"]["vm_deleted"], false, "{done}");
    let message = done["response"]["message"].as_str().unwrap();
    assert!(
        message.contains("was not destroyed") && message.contains(&root.to_string()),
        "{message}"
    );
    assert!(vm_state(&d, &test_vm).is_some(), "the test VM stays");
    assert_back_on_the_appliance(&d, data, &done).await;
    // The managed boot disk is still in the cloud, on the test VM.
    let (_, v) = d.get(&format!("/volumes/{root}")).await;
    assert_eq!(v["cloudstack_data"]["virtualmachineid"], test_vm, "{v}");
    d.stop().await;
}
