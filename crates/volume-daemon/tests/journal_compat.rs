//! A journal written by an earlier version resumes: operations journaled with the stored spellings of
//! earlier versions (steps as text, the attach-root request as `{"device_id": 0, "attach_as": "root"}`)
//! are found unfinished at start-up and finished with the same meaning.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use support::call;

use serde_json::{json, Value};
use uuid::Uuid;
use volume_daemon::daemon::RunningDaemon;
use volume_daemon::store::{NewOperation, OpStatus, OpType, Store};

async fn created_volume(base: &str, zone: &str, offering: &str, name: &str) -> Uuid {
    let op = call(
        base,
        reqwest::Method::POST,
        "/volumes",
        Some(json!({"name": name, "size": support::GIB, "disk_offering_id": offering, "zone_id": zone})),
    )
    .await;
    let done = call(
        base,
        reqwest::Method::GET,
        &format!("/operations/{}?wait=60", op["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    Uuid::parse_str(done["response"]["volume_id"].as_str().unwrap()).unwrap()
}

/// Journals an operation the way earlier versions wrote it, stopped at `step`.
async fn journal_old(
    store: &Store,
    op_type: OpType,
    volume: Uuid,
    vm: Option<&str>,
    request: Value,
    step: &str,
) -> Uuid {
    let id = Uuid::new_v4();
    store
        .insert_operation(&NewOperation {
            id,
            op_type,
            volume_id: Some(volume),
            vm_id: vm.map(str::to_string),
            request,
            idempotency_key: None,
            queue_seq: None,
        })
        .await
        .unwrap();
    store
        .set_operation_step(id, OpStatus::Executing, step)
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_journaled_by_an_earlier_version_resume_with_the_same_meaning() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path());
    let db_url = cfg.effective_database_url();
    let first = RunningDaemon::start(cfg).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let (zone, other) = (sim.zone_id().to_string(), sim.other_vm_ids()[0].clone());
    let offering = support::custom_offering_of(sim);
    let to_attach = created_volume(&base, &zone, &offering, "old-attach").await;
    let to_delete = created_volume(&base, &zone, &offering, "old-delete").await;
    // As CloudStack requires for a root attach: the VM stopped and its old root detached.
    let faults = sim.faults();
    faults.stop_vm(&other).unwrap();
    if let Some(root) = sim.root_volume_id(&other) {
        faults.detach_volume(&root).unwrap();
    }
    first.shutdown().await;

    // Rows as an earlier version left them when it stopped.
    let store = Store::connect(&db_url).await.unwrap();
    let attach = journal_old(
        &store,
        OpType::Attach,
        to_attach,
        Some(&other),
        json!({"volume_id": to_attach, "vm_id": other, "device_id": 0, "attach_as": "root"}),
        "started",
    )
    .await;
    let delete = journal_old(
        &store,
        OpType::Delete,
        to_delete,
        None,
        json!({"volume_id": to_delete}),
        "cloud_delete_sent",
    )
    .await;
    store.close().await;

    // Start-up re-queues both; they finish soon after.
    let second = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let a = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{attach}?wait=60"),
        None,
    )
    .await;
    assert_eq!(a["status"], "completed", "{a}");
    assert_eq!(a["request"]["attach_as"], "root", "{a}");
    assert_eq!(a["response"]["attach_as"], "root", "{a}");
    let on_vm = call(
        &base,
        reqwest::Method::GET,
        &format!("/vms/{other}/volumes"),
        None,
    )
    .await;
    assert_eq!(on_vm[0]["volume_id"], to_attach.to_string(), "{on_vm}");
    assert_eq!(on_vm[0]["role"], "root", "{on_vm}");
    assert_eq!(on_vm[0]["device_id"], 0, "{on_vm}");
    let d = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{delete}?wait=60"),
        None,
    )
    .await;
    assert_eq!(d["status"], "completed", "{d}");
    let v = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{to_delete}"),
        None,
    )
    .await;
    assert_eq!(v["state"], "deleted", "{v}");
    assert!(
        v["cloudstack_data"].is_null(),
        "deleted in the cloud too: {v}"
    );
    if let Some(s) = second.sim() {
        s.detach_all_devices();
    }
    second.shutdown().await;
}

/// A reconciler's repair journaled by a daemon that stopped before running it (as `POST /reconcile` with
/// `apply` leaves it when the process dies) is resumed at the next start and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journaled_repair_that_never_ran_resumes_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path());
    let db_url = cfg.effective_database_url();
    let first = RunningDaemon::start(cfg).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let (zone, appliance) = (sim.zone_id().to_string(), sim.appliance_vm_id().to_string());
    let offering = support::custom_offering_of(sim);
    let vol = created_volume(&base, &zone, &offering, "to-repair").await;
    let op = call(
        &base,
        reqwest::Method::POST,
        &format!("/volumes/{vol}/attach"),
        Some(json!({"vm_id": appliance})),
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
    // Detached behind the daemon's back; the daemon stops before it repairs what it journaled.
    sim.faults().detach_volume(&vol.to_string()).unwrap();
    first.shutdown().await;
    let store = Store::connect(&db_url).await.unwrap();
    let repair = journal_old(
        &store,
        OpType::Repair,
        vol,
        None,
        json!({"volume_id": vol, "repair": "forget_attachment"}),
        "accepted",
    )
    .await;
    store.close().await;

    let second = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let r = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{repair}?wait=60"),
        None,
    )
    .await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["type"], "repair", "{r}");
    assert_eq!(r["request"]["repair"], "forget_attachment", "{r}");
    assert_eq!(r["response"]["volume_id"], vol.to_string(), "{r}");
    let listed = call(&base, reqwest::Method::GET, "/operations?type=repair", None).await;
    assert_eq!(listed[0]["id"], repair.to_string(), "{listed}");
    let v = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{vol}"),
        None,
    )
    .await;
    assert_eq!(v["state"], "detached", "{v}");
    let exports = call(&base, reqwest::Method::GET, "/exports", None).await;
    assert_eq!(exports["count"], 0, "{exports}");
    let report = call(&base, reqwest::Method::POST, "/reconcile", Some(json!({}))).await;
    assert_eq!(report["drift"], json!([]), "{report}");
    if let Some(s) = second.sim() {
        s.detach_all_devices();
    }
    second.shutdown().await;
}
