//! Recovery that serves at once: start-up re-queues the unfinished operations and serves the API without
//! waiting for them; reads answer, a new request on the same volume queues behind the resumed operation, and
//! `/health` says recovery is in progress until the resumed operations have ended.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{call, call_ok, GIB};
use uuid::Uuid;
use volume_daemon::daemon::RunningDaemon;
use volume_daemon::store::{NewOperation, OpStatus, OpType, Store};

/// How long each of the simulator's jobs takes in the second run.
const SLOW_JOB: Duration = Duration::from_secs(4);

/// Journals an operation as a run that stopped mid-way leaves it: `op_type` on `volume`, executing at `step`.
/// Returns its id.
async fn journal_in_flight(
    url: &str,
    op_type: OpType,
    volume: Uuid,
    vm_id: Option<String>,
    request: serde_json::Value,
    step: &str,
) -> Uuid {
    let store = Store::connect(url).await.unwrap();
    let id = Uuid::new_v4();
    store
        .insert_operation(&NewOperation {
            id,
            op_type,
            volume_id: Some(volume),
            vm_id,
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
    store.close().await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_while_resumed_operations_run_and_new_ones_queue_behind_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path());
    let url = cfg.effective_database_url();
    let first = RunningDaemon::start(cfg.clone()).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let vm = sim.other_vm_ids()[0].clone();
    let offering = support::custom_offering_of(sim);
    let op = call(
        &base,
        reqwest::Method::POST,
        "/volumes",
        Some(json!({"name": "resumed", "size": GIB, "disk_offering_id": offering, "zone_id": sim.zone_id()})),
    )
    .await;
    let done = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{}?wait=60", op["id"].as_str().unwrap()),
        None,
    )
    .await;
    let vol = Uuid::parse_str(done["response"]["volume_id"].as_str().unwrap()).unwrap();
    first.shutdown().await;

    // An attach the previous run had started when it stopped.
    let attach = journal_in_flight(
        &url,
        OpType::Attach,
        vol,
        Some(vm.clone()),
        json!({"volume_id": vol, "vm_id": vm}),
        "started",
    )
    .await;

    let mut slow = cfg;
    slow.sim.job_delay_ms = SLOW_JOB.as_millis() as u64;
    let begun = Instant::now();
    let second = RunningDaemon::start(slow).await.unwrap();
    assert!(
        begun.elapsed() < SLOW_JOB,
        "the API serves before the resumed attach's job ends ({:?})",
        begun.elapsed()
    );
    let base = format!("http://{}/api/v1", second.api_addr());
    let health = call(&base, reqwest::Method::GET, "/health", None).await;
    let journal = &health["components"]["journal"];
    assert_eq!(journal["status"], "failed", "{health}");
    assert!(
        journal["detail"]
            .as_str()
            .unwrap()
            .contains("recovery in progress"),
        "{health}"
    );
    let volume = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{vol}"),
        None,
    )
    .await;
    assert_eq!(
        volume["volume_id"],
        vol.to_string(),
        "reads answer: {volume}"
    );

    // A detach submitted now runs after the resumed attach.
    let detach = call(
        &base,
        reqwest::Method::POST,
        &format!("/volumes/{vol}/detach"),
        None,
    )
    .await;
    let detached = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{}?wait=60", detach["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(detached["status"], "completed", "{detached}");
    assert_eq!(
        detached["response"]["vm_id"], vm,
        "it detached what the attach attached: {detached}"
    );
    let attached = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{attach}"),
        None,
    )
    .await;
    assert_eq!(attached["status"], "completed", "{attached}");
    assert!(
        attached["completed_at"].as_str().unwrap() <= detached["completed_at"].as_str().unwrap(),
        "the resumed attach ended first: {attached} {detached}"
    );
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let health = call(&base, reqwest::Method::GET, "/health", None).await;
        if health["components"]["journal"]["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < end, "recovery never ends: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await;
}

/// A detach interrupted after the cloud detached the volume (its device is gone): start-up does not try to
/// serve the volume again, so `/health` reports no export problem, and the resumed detach completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_with_an_interrupted_detach_is_not_exported_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path());
    let url = cfg.effective_database_url();
    let first = RunningDaemon::start(cfg.clone()).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let appliance = sim.appliance_vm_id().to_string();
    let offering = support::custom_offering_of(sim);
    let wait = |op: serde_json::Value| support::wait_for(base.clone(), op);
    let created = wait(
        call(
            &base,
            reqwest::Method::POST,
            "/volumes",
            Some(json!({"name": "leaving", "size": GIB, "disk_offering_id": offering, "zone_id": sim.zone_id()})),
        )
        .await,
    )
    .await;
    let vol = Uuid::parse_str(created["response"]["volume_id"].as_str().unwrap()).unwrap();
    let attached = wait(
        call(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{vol}/attach"),
            Some(json!({"vm_id": appliance})),
        )
        .await,
    )
    .await;
    assert_eq!(attached["status"], "completed", "{attached}");
    // The previous run had removed the export and the cloud had detached the volume when it stopped.
    sim.faults().detach_volume(&vol.to_string()).unwrap();
    first.shutdown().await;
    let detach = journal_in_flight(
        &url,
        OpType::Detach,
        vol,
        None,
        json!({"volume_id": vol}),
        "export_removed",
    )
    .await;

    let second = RunningDaemon::start(cfg).await.unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let health = call(&base, reqwest::Method::GET, "/health", None).await;
    assert_eq!(
        health["components"]["exports"]["status"], "ok",
        "no attempt to serve a volume that is leaving: {health}"
    );
    let done = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{detach}?wait=60"),
        None,
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let volume = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{vol}"),
        None,
    )
    .await;
    assert_eq!(volume["state"], "detached", "{volume}");
    second.sim().unwrap().detach_all_devices();
    second.shutdown().await;
}

/// A CloudStack client of the daemon's built-in simulator (its default credentials).
fn sim_client(sim: &cloudsim::RunningSimulator) -> cloudstack::Client {
    cloudstack::Client::new(cloudstack::Config {
        url: sim.api_url(),
        api_key: "sim-api-key".into(),
        secret_key: cloudstack::Secret::new("sim-secret-key"),
        ..cloudstack::Config::default()
    })
    .unwrap()
}

/// An attach or a detach the previous run had sent to CloudStack when it stopped, before it journaled the
/// job's id.
#[derive(Clone, Copy, Debug)]
enum LostCall {
    Attach,
    Detach,
}

/// The previous run sent attachVolume (to another VM) or detachVolume (from the appliance) and stopped
/// before journaling the job's id: its job is still pending in the cloud at the restart. The resumed
/// operation adopts that job (or, had it ended by then, would find the volume where it wanted it; a call sent
/// again whose job fails because the first one got there is no failure either), so the operation completes
/// and the records say so.
async fn a_call_whose_job_id_was_lost(lost: LostCall) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = support::config(dir.path());
    // Slow enough that the first job is still pending when the first run stops.
    cfg.sim.job_delay_ms = 1000;
    let url = cfg.effective_database_url();
    let first = RunningDaemon::start(cfg.clone()).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let appliance = sim.appliance_vm_id().to_string();
    let vm = sim.other_vm_ids()[0].clone();
    let offering = support::custom_offering_of(sim);
    let created = call_ok(
        &base,
        reqwest::Method::POST,
        "/volumes",
        Some(json!({"name": "lost-job", "size": GIB, "disk_offering_id": offering, "zone_id": sim.zone_id()})),
    )
    .await;
    let vol = Uuid::parse_str(created["response"]["volume_id"].as_str().unwrap()).unwrap();
    if let LostCall::Detach = lost {
        call_ok(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{vol}/attach"),
            Some(json!({"vm_id": appliance})),
        )
        .await;
    }
    let (op_type, target, request) = lost.send(&sim_client(sim), vol, &vm).await;
    first.shutdown().await;
    let id = journal_in_flight(&url, op_type, vol, target, request, "started").await;

    let second = RunningDaemon::start(cfg).await.unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let done = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{id}?wait=60"),
        None,
    )
    .await;
    assert_eq!(done["status"], "completed", "{lost:?}: {done}");
    let volume = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{vol}"),
        None,
    )
    .await;
    match lost {
        LostCall::Attach => {
            assert_eq!(volume["state"], "attached", "{volume}");
            assert_eq!(volume["attachment"]["vm_id"], vm, "{volume}");
        }
        LostCall::Detach => {
            assert_eq!(volume["state"], "detached", "{volume}");
            assert!(volume["attachment"].is_null(), "{volume}");
        }
    }
    second.sim().unwrap().detach_all_devices();
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_detach_whose_lost_first_request_detached_the_volume_completes() {
    a_call_whose_job_id_was_lost(LostCall::Detach).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_attach_whose_lost_first_request_attached_the_volume_completes() {
    a_call_whose_job_id_was_lost(LostCall::Attach).await;
}

impl LostCall {
    /// Sends the call straight to the cloud (attachVolume to `vm`, or detachVolume) as the previous run did,
    /// and returns what the operation journals: its type, its target VM and its request.
    async fn send(
        self,
        cloud: &cloudstack::Client,
        vol: Uuid,
        vm: &str,
    ) -> (OpType, Option<String>, serde_json::Value) {
        match self {
            Self::Attach => {
                cloud
                    .attach_volume(&vol.to_string(), vm, None)
                    .await
                    .unwrap();
                (
                    OpType::Attach,
                    Some(vm.to_string()),
                    json!({"volume_id": vol, "vm_id": vm}),
                )
            }
            Self::Detach => {
                cloud.detach_volume(&vol.to_string()).await.unwrap();
                (OpType::Detach, None, json!({"volume_id": vol}))
            }
        }
    }

    /// The API command and the class CloudStack reports in a job's `cmd`.
    fn command(self) -> (&'static str, &'static str) {
        match self {
            Self::Attach => ("attachVolume", "AttachVolumeCmd"),
            Self::Detach => ("detachVolume", "DetachVolumeCmd"),
        }
    }
}

/// The jobs of the simulator's account on `volume` whose command class ends with `class`: (id, jobstatus).
async fn jobs_on(cloud: &cloudstack::Client, volume: Uuid, class: &str) -> Vec<(String, i64)> {
    cloud
        .list_async_jobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.instance_id.as_deref() == Some(volume.to_string().as_str()))
        .filter(|j| j.cmd.as_deref().is_some_and(|c| c.ends_with(class)))
        .map(|j| (j.job_id, j.job_status.unwrap()))
        .collect()
}

/// The previous run sent attachVolume or detachVolume (a volume and another VM) and stopped before journaling
/// the job's id; that job is slow and still pending when the daemon restarts, well after the resumed operation
/// could have sent the call again and seen its own job end. The resumed operation must adopt the pending job
/// rather than send a second one, or the first, running late, undoes what comes next: here the opposite
/// operation, submitted once the resumed one completed. After every job on the volume has ended, the cloud
/// and the daemon must agree that the volume is where that last operation left it, and the cloud must have
/// run exactly one job of the lost command on the volume.
async fn a_lost_call_still_running_is_adopted(lost: LostCall) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::config(dir.path());
    let url = cfg.effective_database_url();
    let first = RunningDaemon::start(cfg.clone()).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let vm = sim.other_vm_ids()[0].clone();
    let offering = support::custom_offering_of(sim);
    let created = call_ok(
        &base,
        reqwest::Method::POST,
        "/volumes",
        Some(json!({"name": "adopted-job", "size": GIB, "disk_offering_id": offering, "zone_id": sim.zone_id()})),
    )
    .await;
    let vol = Uuid::parse_str(created["response"]["volume_id"].as_str().unwrap()).unwrap();
    let attach_path = format!("/volumes/{vol}/attach");
    let detach_path = format!("/volumes/{vol}/detach");
    if let LostCall::Detach = lost {
        call_ok(
            &base,
            reqwest::Method::POST,
            &attach_path,
            Some(json!({"vm_id": vm})),
        )
        .await;
    }
    // The lost call: its job takes seconds, the others 20 ms.
    let (command, class) = lost.command();
    sim.faults().add(cloudsim::FaultSpec::SlowJob {
        command: command.into(),
        extra_delay_ms: 5_000,
        count: 1,
    });
    let (op_type, target, request) = lost.send(&sim_client(sim), vol, &vm).await;
    first.shutdown().await;
    let id = journal_in_flight(&url, op_type, vol, target, request, "started").await;

    let second = RunningDaemon::start(cfg).await.unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let cloud = sim_client(second.sim().unwrap());
    let pending = jobs_on(&cloud, vol, class).await;
    assert!(
        pending.iter().any(|(_, status)| *status == 0),
        "{lost:?}: the lost job is still pending at the restart: {pending:?}"
    );
    let done = call(
        &base,
        reqwest::Method::GET,
        &format!("/operations/{id}?wait=60"),
        None,
    )
    .await;
    assert_eq!(done["status"], "completed", "{lost:?}: {done}");
    // What comes next: the opposite operation.
    match lost {
        LostCall::Attach => call_ok(&base, reqwest::Method::POST, &detach_path, None).await,
        LostCall::Detach => {
            call_ok(
                &base,
                reqwest::Method::POST,
                &attach_path,
                Some(json!({"vm_id": vm})),
            )
            .await
        }
    };
    // Every job on the volume ends (the lost one within seconds of the restart).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: Vec<_> = cloud
            .list_async_jobs()
            .await
            .unwrap()
            .into_iter()
            .filter(|j| j.instance_id.as_deref() == Some(vol.to_string().as_str()))
            .filter(|j| j.job_status == Some(0))
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "jobs still pending: {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_cloud = cloud.get_volume(&vol.to_string()).await.unwrap().unwrap();
    let volume = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{vol}"),
        None,
    )
    .await;
    match lost {
        LostCall::Attach => {
            assert_eq!(
                in_cloud.virtualmachine_id, None,
                "the detach that followed the resumed attach was undone by the lost attach job"
            );
            assert_eq!(volume["state"], "detached", "{volume}");
        }
        LostCall::Detach => {
            assert_eq!(
                in_cloud.virtualmachine_id.as_deref(),
                Some(vm.as_str()),
                "the attach that followed the resumed detach was undone by the lost detach job"
            );
            assert_eq!(volume["state"], "attached", "{volume}");
            assert_eq!(volume["attachment"]["vm_id"], vm, "{volume}");
        }
    }
    // The lost call is the only one of its command on the volume (the operations around it ran the other).
    let lost_jobs = jobs_on(&cloud, vol, class).await;
    assert_eq!(
        lost_jobs.len(),
        1,
        "{lost:?}: {command} was sent again: {lost_jobs:?}"
    );
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_attach_adopts_its_lost_pending_job_and_a_later_detach_stays() {
    a_lost_call_still_running_is_adopted(LostCall::Attach).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_detach_adopts_its_lost_pending_job_and_a_later_attach_stays() {
    a_lost_call_still_running_is_adopted(LostCall::Detach).await;
}

/// A volume whose export start-up could not restore (detached behind the daemon's back while it was down)
/// fails `/health`'s `exports` component only until it is resolved: once the reconcile's repair forgets the
/// attachment, `/health` is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exports_component_recovers_once_a_volume_not_restored_at_start_up_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = support::config(dir.path());
    cfg.reconcile_repair = false;
    let first = RunningDaemon::start(cfg.clone()).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let created = call_ok(
        &base,
        reqwest::Method::POST,
        "/volumes",
        Some(json!({"name": "gone-while-down", "size": GIB,
            "disk_offering_id": support::custom_offering_of(sim), "zone_id": sim.zone_id()})),
    )
    .await;
    let vol = created["response"]["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    call_ok(
        &base,
        reqwest::Method::POST,
        &format!("/volumes/{vol}/attach"),
        Some(json!({"vm_id": sim.appliance_vm_id()})),
    )
    .await;
    // Detached in CloudStack behind the daemon's back just before it stops.
    let cs = sim_client(sim);
    let job = cs.detach_volume(&vol).await.unwrap();
    cs.wait_job(&job.job_id, Duration::from_secs(30))
        .await
        .unwrap();
    first.shutdown().await;

    let second = RunningDaemon::start(cfg).await.unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    let health = || async {
        let r = reqwest::get(format!("{base}/health")).await.unwrap();
        (r.status(), r.json::<serde_json::Value>().await.unwrap())
    };
    // Degraded, not failed: the daemon serves every other volume and takes operations (this one's too).
    let (status, h) = health().await;
    assert_eq!(status, reqwest::StatusCode::OK, "{h}");
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["components"]["exports"]["status"], "degraded", "{h}");
    assert!(
        h["components"]["exports"]["detail"]
            .as_str()
            .unwrap()
            .contains(&vol),
        "{h}"
    );
    let report = call(
        &base,
        reqwest::Method::POST,
        "/reconcile",
        Some(json!({"apply": true})),
    )
    .await;
    assert_eq!(
        report["drift"][0]["action"], "forget_attachment",
        "{report}"
    );
    let repair = format!(
        "/operations/{}?wait=30",
        report["drift"][0]["operation_id"].as_str().unwrap()
    );
    let done = call(&base, reqwest::Method::GET, &repair, None).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (status, h) = health().await;
    assert_eq!(status, reqwest::StatusCode::OK, "{h}");
    assert_eq!(h["components"]["exports"]["status"], "ok", "{h}");
    second.sim().unwrap().detach_all_devices();
    second.shutdown().await;
}
