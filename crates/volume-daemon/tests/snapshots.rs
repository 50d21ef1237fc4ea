//! Snapshots through the daemon end to end: create, list, revert (refused while attached), delete, each a
//! journaled operation against the built-in simulator over real HTTP, with the data checked through the
//! appliance's device before and after the revert; and the predecessor's `/snapshots/*` bookkeeping routes.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::FileExt as _;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

const OFFSET: u64 = 1 << 20;

/// Attaches the volume to the appliance and returns its device path.
async fn attach(d: &TestDaemon, vol: Uuid) -> String {
    let op = d
        .run_ok(
            &format!("/volumes/{vol}/attach"),
            json!({"vm_id": d.appliance()}),
        )
        .await;
    op["response"]["device_path"].as_str().unwrap().to_string()
}

fn write_at(device: &str, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap();
    f.write_all_at(data, OFFSET).unwrap();
    f.sync_all().unwrap();
}

fn read_at(device: &str, n: usize) -> Vec<u8> {
    let f = std::fs::File::open(device).unwrap();
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, OFFSET).unwrap();
    buf
}

/// Takes a snapshot of `vol` named `name`; returns its id.
async fn take_snapshot(d: &TestDaemon, vol: Uuid, name: &str) -> String {
    let op = d
        .run_ok(&format!("/volumes/{vol}/snapshots"), json!({"name": name}))
        .await;
    op["response"]["snapshot_id"].as_str().unwrap().to_string()
}

/// Makes the next createSnapshot job take `ms` longer.
fn slow_snapshot_job(d: &TestDaemon, ms: u64) {
    d.sim().faults().add(cloudsim::FaultSpec::SlowJob {
        command: "createSnapshot".into(),
        extra_delay_ms: ms,
        count: 1,
    });
}

async fn ops_of_type(d: &TestDaemon, t: &str) -> Vec<Value> {
    let (s, v) = d.get(&format!("/operations?type={t}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_taken_reverted_only_when_detached_and_deleted_with_the_data_restored() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("snap-data", GIB).await;
    let dev = attach(&d, vol).await;
    write_at(&dev, b"before the snapshot");

    // Take it (the volume may stay attached): a journaled snapshot_create.
    let op = d
        .run_ok(
            &format!("/volumes/{vol}/snapshots"),
            json!({"name": "pre-test", "vm_context_id": "ctx-1"}),
        )
        .await;
    assert_eq!(op["type"], "snapshot_create", "{op}");
    assert_eq!(op["volume_id"], vol.to_string());
    assert_eq!(op["request"]["name"], "pre-test");
    assert_eq!(op["step"], "cloud_snapshot_job", "{op}");
    assert!(op["cloudstack_job_id"].is_string(), "{op}");
    let snap = op["response"]["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(op["response"]["snapshot_name"], "pre-test");
    assert_eq!(op["response"]["snapshot_status"], "ready");
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(v["snapshot"]["snapshot_id"], snap, "{v}");
    assert_eq!(v["snapshot"]["snapshot_name"], "pre-test");
    assert_eq!(v["snapshot"]["snapshot_status"], "ready");
    assert_eq!(v["snapshot"]["vm_context_id"], "ctx-1");
    assert!(v["snapshot"]["snapshot_created_at"].is_string());

    let (s, list) = d.get(&format!("/volumes/{vol}/snapshots")).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], snap);
    assert_eq!(list[0]["name"], "pre-test");
    assert_eq!(list[0]["volume_id"], vol.to_string());
    assert_eq!(list[0]["state"], "BackedUp");
    assert_eq!(list[0]["tracked"], true);

    write_at(&dev, b"written after it!!!");
    assert_eq!(read_at(&dev, 19), b"written after it!!!");

    // Attached: refused with volume_attached before anything is journaled or asked of the cloud.
    let (s, e) = d
        .post(
            &format!("/volumes/{vol}/snapshots/{snap}/revert"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["code"], "volume_attached", "{e}");
    assert!(e["error"].as_str().unwrap().contains("detach"), "{e}");
    assert!(ops_of_type(&d, "snapshot_revert").await.is_empty());

    // Detached, the revert runs; attached again, the device holds the snapshot's data.
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    let op = d
        .run_ok(
            &format!("/volumes/{vol}/snapshots/{snap}/revert"),
            json!({}),
        )
        .await;
    assert_eq!(op["type"], "snapshot_revert", "{op}");
    assert_eq!(op["step"], "cloud_revert_job", "{op}");
    assert_eq!(op["response"]["snapshot_id"], snap);
    assert_eq!(op["response"]["snapshot_status"], "reverted");
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(v["snapshot"]["snapshot_status"], "reverted", "{v}");
    let dev = attach(&d, vol).await;
    assert_eq!(
        read_at(&dev, 19),
        b"before the snapshot",
        "the revert restored the data as of the snapshot"
    );

    // Unknown snapshot: 404; another volume's snapshot: 400 naming snapshot_id.
    let (s, e) = d
        .post(
            &format!("/volumes/{vol}/snapshots/no-such-snapshot/revert"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["code"], "not_found", "{e}");
    let other = d.create_volume("snap-other", GIB).await;
    let (s, e) = d
        .post(
            &format!("/volumes/{other}/snapshots/{snap}/revert"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["field"], "snapshot_id", "{e}");

    // Delete: journaled; the cloud no longer lists it and the record stops tracking it.
    let (s, op) = d
        .send(
            Method::DELETE,
            &format!("/volumes/{vol}/snapshots/{snap}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let op = d.wait_op(&op).await;
    assert_eq!(op["status"], "completed", "{op}");
    assert_eq!(op["type"], "snapshot_delete");
    assert_eq!(op["step"], "cloud_snapshot_delete_job");
    let (_, list) = d.get(&format!("/volumes/{vol}/snapshots")).await;
    assert_eq!(list, json!([]));
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert!(v["snapshot"]["snapshot_id"].is_null(), "{v}");
    assert_eq!(v["snapshot"]["snapshot_status"], "none");
    assert_eq!(v["snapshot"]["vm_context_id"], "ctx-1", "the context stays");
    // The three kinds are listed by type.
    for t in ["snapshot_create", "snapshot_revert", "snapshot_delete"] {
        assert_eq!(ops_of_type(&d, t).await.len(), 1, "{t}");
    }
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    // A deleted volume's snapshots are a 404 that says so.
    d.delete_ok(vol).await;
    let (s, v) = d.get(&format!("/volumes/{vol}/snapshots")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"].as_str().unwrap().ends_with("was deleted"), "{v}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_predecessors_snapshot_routes_keep_their_shapes_and_outlive_detach() {
    let d = TestDaemon::start().await;
    let a = d.create_volume("ctx-a", GIB).await;
    let b = d.create_volume("ctx-b", GIB).await;
    let dev = attach(&d, a).await;

    // track: bookkeeping on the volume record.
    let (s, t) = d
        .post(
            "/snapshots/track",
            json!({"volume_uuid": a, "vm_context_id": "ctx-7", "snapshot_id": "snap-a",
                   "snapshot_name": "a-before", "disk_id": "disk-2000"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(
        t,
        json!({"message": "Volume snapshot tracked successfully", "volume_uuid": a,
               "snapshot_id": "snap-a", "vm_context_id": "ctx-7"})
    );
    let (s, _) = d
        .post(
            "/snapshots/track",
            json!({"volume_uuid": b, "vm_context_id": "ctx-7", "snapshot_id": "snap-b",
                   "snapshot_status": "creating"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    for (body, field) in [
        (
            json!({"volume_uuid": a, "vm_context_id": "ctx-7"}),
            "snapshot_id",
        ),
        (
            json!({"volume_uuid": a, "vm_context_id": "", "snapshot_id": "s"}),
            "vm_context_id",
        ),
        (
            json!({"volume_uuid": "nope", "vm_context_id": "c", "snapshot_id": "s"}),
            "volume_uuid",
        ),
    ] {
        let (s, e) = d.post("/snapshots/track", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert_eq!(e["field"], field, "{e}");
    }
    let (s, _) = d
        .post(
            "/snapshots/track",
            json!({"volume_uuid": Uuid::new_v4(), "vm_context_id": "c", "snapshot_id": "s"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, g) = d.get("/snapshots/vm/ctx-7").await;
    assert_eq!(s, StatusCode::OK, "{g}");
    assert_eq!(g["vm_context_id"], "ctx-7");
    assert_eq!(g["count"], 2, "{g}");
    let first = &g["snapshots"][0];
    assert_eq!(
        first["volume_uuid"],
        a.to_string(),
        "oldest volume first: {g}"
    );
    assert_eq!(first["vm_context_id"], "ctx-7");
    assert_eq!(first["snapshot_id"], "snap-a");
    assert_eq!(first["snapshot_status"], "ready");
    assert_eq!(first["operation_mode"], "oma");
    assert_eq!(first["device_path"], dev);
    assert!(first["snapshot_created_at"].is_string());
    let second = &g["snapshots"][1];
    assert_eq!(second["snapshot_status"], "creating");
    assert!(second["operation_mode"].is_null(), "b is detached: {g}");
    assert_eq!(second["device_path"], "");

    // The tracking is on the volume, so it survives a detach (the predecessor lost it with the mapping).
    d.run_ok(&format!("/volumes/{a}/detach"), json!({})).await;
    let (_, g) = d.get("/snapshots/vm/ctx-7").await;
    assert_eq!(g["snapshots"][0]["snapshot_id"], "snap-a", "{g}");

    // PUT: a partial update; a new id sets the time.
    let (s, u) = d
        .send(
            Method::PUT,
            &format!("/snapshots/{b}"),
            Some(json!({"snapshot_id": "snap-b2", "snapshot_status": "ready"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{u}");
    assert_eq!(
        u,
        json!({"message": "Volume snapshot updated successfully", "volume_uuid": b})
    );
    let (_, v) = d.get(&format!("/volumes/{b}")).await;
    assert_eq!(v["snapshot"]["snapshot_id"], "snap-b2", "{v}");
    assert_eq!(v["snapshot"]["snapshot_status"], "ready");
    assert!(v["snapshot"]["snapshot_created_at"].is_string());
    let (s, _) = d
        .send(
            Method::PUT,
            &format!("/snapshots/{}", Uuid::new_v4()),
            Some(json!({"snapshot_status": "ready"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // DELETE: clears the tracking of the context's volumes; the count says how many had some.
    let (s, c) = d.send(Method::DELETE, "/snapshots/vm/ctx-7", None).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(
        c,
        json!({"message": "VM volume snapshots cleared successfully", "vm_context_id": "ctx-7",
               "snapshots_cleared": 2})
    );
    let (_, g) = d.get("/snapshots/vm/ctx-7").await;
    assert_eq!(g["count"], 2);
    for s in g["snapshots"].as_array().unwrap() {
        assert!(s["snapshot_id"].is_null(), "{g}");
        assert_eq!(s["snapshot_status"], "none");
    }
    let (_, c) = d.send(Method::DELETE, "/snapshots/vm/ctx-7", None).await;
    assert_eq!(c["snapshots_cleared"], 0, "nothing left to clear: {c}");
    let (_, g) = d.get("/snapshots/vm/unknown-context").await;
    assert_eq!(
        g,
        json!({"vm_context_id": "unknown-context", "snapshots": [], "count": 0})
    );
    d.stop().await;
}

/// What an NBD writer was told is written is in a snapshot taken next, whether or not it flushed: the
/// daemon flushes the volume's export to the device before asking for the snapshot (nbdcopy flushes only
/// with `--flush`). On a loop device the unflushed writes sit in the device's cache, where the cloud (the
/// simulator copying the backing file, a hypervisor reading the disk) does not see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_snapshot_holds_the_writes_an_nbd_client_never_flushed() {
    support::require_root();
    let d = TestDaemon::start().await;
    let vol = d.create_volume("snap-unflushed", GIB).await;
    let attached = d.attach_to_appliance(vol).await;
    let pattern: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut nbd = d.nbd_session(&attached).await;
    for (i, chunk) in pattern.chunks(1 << 20).enumerate() {
        nbd.write(OFFSET + ((i as u64) << 20), chunk, 0)
            .await
            .unwrap();
    }
    // A clean disconnect, no flush.
    nbd.disconnect().await.unwrap();
    let snap = take_snapshot(&d, vol, "after-copy").await;
    // Overwritten and flushed after the snapshot, then reverted: the pattern comes back whole.
    let mut nbd = d.nbd_session(&attached).await;
    nbd.zero(OFFSET, pattern.len() as u32, 0).await.unwrap();
    nbd.flush().await.unwrap();
    nbd.disconnect().await.unwrap();
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.run_ok(
        &format!("/volumes/{vol}/snapshots/{snap}/revert"),
        json!({}),
    )
    .await;
    let dev = attach(&d, vol).await;
    let back = read_at(&dev, pattern.len());
    let differing = back.iter().zip(&pattern).filter(|(a, b)| a != b).count();
    assert_eq!(
        differing,
        0,
        "{differing} of {} bytes differ from what was written before the snapshot",
        pattern.len()
    );
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

/// The backing file of a simulated volume (`…/volumes/<uuid>.img` under the daemon's state directory).
fn backing_file(d: &TestDaemon, vol: Uuid) -> std::path::PathBuf {
    fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.file_name().is_some_and(|n| n == name) {
                return Some(path);
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Some(found) = find(&path, name) {
                    return Some(found);
                }
            }
        }
        None
    }
    find(d.dir.path(), &format!("{vol}.img")).expect("the volume's backing file")
}

/// A session that wrote flushes when its client leaves without flushing: what the client was told is
/// written reaches the disk the cloud sees (here the loop device's backing file), so that a snapshot the
/// hub takes in CloudStack itself once its writer is done holds it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_writes_reach_the_disk_when_their_nbd_client_leaves_without_flushing() {
    support::require_root();
    let d = TestDaemon::start().await;
    let vol = d.create_volume("leaves-unflushed", GIB).await;
    let attached = d.attach_to_appliance(vol).await;
    let backing = backing_file(&d, vol);
    let pattern = b"written, acknowledged, never flushed".repeat(1000);
    let mut nbd = d.nbd_session(&attached).await;
    nbd.write(OFFSET, &pattern, 0).await.unwrap();
    nbd.disconnect().await.unwrap();
    let on_disk = || {
        let f = std::fs::File::open(&backing).unwrap();
        let mut buf = vec![0u8; pattern.len()];
        f.read_exact_at(&mut buf, OFFSET).unwrap();
        buf == pattern
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !on_disk() {
        assert!(
            std::time::Instant::now() < deadline,
            "the write is not on the disk 3 s after its client left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    d.run_ok(&format!("/volumes/{vol}/detach"), json!({})).await;
    d.stop().await;
}

/// A revert or delete naming another volume's snapshot, let through at submission because CloudStack did
/// not answer the check in time, is refused in the volume's turn: it never reverts or deletes the other
/// volume's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_volumes_snapshot_is_refused_in_turn_when_the_submission_check_had_no_answer() {
    let d = TestDaemon::start().await;
    let mine = d.create_volume("snap-mine", GIB).await;
    let theirs = d.create_volume("snap-theirs", GIB).await;
    let snap = take_snapshot(&d, theirs, "theirs-1").await;
    for (method, path) in [
        (
            Method::POST,
            format!("/volumes/{mine}/snapshots/{snap}/revert"),
        ),
        (Method::DELETE, format!("/volumes/{mine}/snapshots/{snap}")),
    ] {
        // The submission's check waits 5 s for listSnapshots; this answer takes longer.
        d.sim().faults().add(cloudsim::FaultSpec::SlowCommand {
            command: "listSnapshots".into(),
            delay_ms: 7_000,
            count: 1,
        });
        let body = (method == Method::POST).then(|| json!({}));
        let (s, op) = d.send(method.clone(), &path, body).await;
        assert_eq!(s, StatusCode::CREATED, "{method} {path}: {op}");
        let op = d.wait_op(&op).await;
        assert_eq!(op["status"], "failed", "{op}");
        assert_eq!(op["error_code"], "invalid_request", "{op}");
        assert!(
            op["error"].as_str().unwrap().contains(&theirs.to_string()),
            "{op}"
        );
        assert!(
            op["cloudstack_job_id"].is_null(),
            "nothing was asked of the cloud: {op}"
        );
    }
    // Their snapshot is still there, tracked and never reverted.
    let (_, list) = d.get(&format!("/volumes/{theirs}/snapshots")).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], snap.as_str());
    let (_, v) = d.get(&format!("/volumes/{theirs}")).await;
    assert_eq!(v["snapshot"]["snapshot_status"], "ready", "{v}");
    d.stop().await;
}

/// CloudStack keeps a deleted volume's snapshots, which no route shows once the volume is deleted: the
/// delete's answer names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_volume_names_the_snapshots_cloudstack_keeps() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("snap-kept", GIB).await;
    let snap = take_snapshot(&d, vol, "kept-1").await;
    let (s, op) = d
        .send(Method::DELETE, &format!("/volumes/{vol}"), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let op = d.wait_op(&op).await;
    assert_eq!(op["status"], "completed", "{op}");
    let message = op["response"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("volume deleted; CloudStack keeps its 1 snapshot(s)")
            && message.contains(&snap),
        "{message}"
    );
    d.stop().await;
}

/// A revert of a volume attached behind the daemon's back (directly in CloudStack) is refused at submission,
/// as for one the daemon attached: 409 `volume_attached`, nothing journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_of_a_volume_attached_behind_the_daemons_back_is_refused_at_submission() {
    let d = TestDaemon::start().await;
    let vol = d.create_volume("snap-elsewhere", GIB).await;
    let snap = take_snapshot(&d, vol, "elsewhere-1").await;
    let vm = d.other_vm(0);
    let cs = d.cloud_client();
    let job = cs.attach_volume(&vol.to_string(), &vm, None).await.unwrap();
    cs.wait_job(&job.job_id, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let (s, e) = d
        .post(
            &format!("/volumes/{vol}/snapshots/{snap}/revert"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["code"], "volume_attached", "{e}");
    assert!(e["error"].as_str().unwrap().contains(&vm), "{e}");
    assert!(ops_of_type(&d, "snapshot_revert").await.is_empty());
    d.stop().await;
}

/// Taking a snapshot copies the volume to secondary storage, hours for a large one: a snapshot job is
/// waited for until `snapshot_timeout_secs`, not the `job_timeout_secs` of attaches and creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_job_longer_than_the_job_timeout_is_waited_for() {
    let d = TestDaemon::start_with(|c| c.job_timeout_secs = 1).await;
    let vol = d.create_volume("snap-slow", GIB).await;
    slow_snapshot_job(&d, 2_500);
    let snap = take_snapshot(&d, vol, "slow-1").await;
    let (_, v) = d.get(&format!("/volumes/{vol}")).await;
    assert_eq!(v["snapshot"]["snapshot_id"], snap.as_str(), "{v}");
    d.stop().await;
}

/// A snapshot job still running at `snapshot_timeout_secs` fails the create, and the error says that
/// CloudStack may still take the snapshot and where it is found then (not "wait again with the job id",
/// which no API caller can do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_job_still_running_at_the_snapshot_timeout_says_where_the_snapshot_will_be() {
    let d = TestDaemon::start_with(|c| c.snapshot_timeout_secs = 1).await;
    let vol = d.create_volume("snap-slower", GIB).await;
    slow_snapshot_job(&d, 3_000);
    let (s, op) = d
        .post(
            &format!("/volumes/{vol}/snapshots"),
            json!({"name": "slower-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    let op = d.wait_op(&op).await;
    assert_eq!(op["status"], "failed", "{op}");
    assert_eq!(op["error_code"], "cloud_job_timeout", "{op}");
    let error = op["error"].as_str().unwrap();
    assert!(
        error.contains("still running after 1 s")
            && error.contains("CloudStack may still take the snapshot, untracked")
            && error.contains(&format!("GET /api/v1/volumes/{vol}/snapshots"))
            && !error.contains("wait again"),
        "{error}"
    );
    // CloudStack finishes it: the listing shows it, untracked, as the error said.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (s, list) = d.get(&format!("/volumes/{vol}/snapshots")).await;
        assert_eq!(s, StatusCode::OK, "{list}");
        let taken = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "slower-1" && s["state"] == "BackedUp")
            .cloned();
        if let Some(taken) = taken {
            assert_eq!(taken["tracked"], false, "{taken}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{list}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    d.stop().await;
}

/// An outage that begins after a snapshot job has run longer than `job_timeout_secs` is ridden out like
/// any other: the operation goes on once the cloud answers again, within `job_timeout_secs` of the outage's
/// beginning (not of the operation's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_outage_late_in_a_long_snapshot_job_delays_it_without_failing_it() {
    let d = TestDaemon::start_with(|c| c.job_timeout_secs = 6).await;
    let vol = d.create_volume("snap-outage", GIB).await;
    let faults = d.sim().faults();
    slow_snapshot_job(&d, 8_000);
    let (s, op) = d
        .post(
            &format!("/volumes/{vol}/snapshots"),
            json!({"name": "outage-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{op}");
    tokio::time::sleep(std::time::Duration::from_millis(6_500)).await;
    // Every poll of the job fails for 5 s: the wait gives up after its retry budget (2-4 s).
    faults.add(cloudsim::FaultSpec::FailCommand {
        command: "queryAsyncJobResult".into(),
        count: 100_000,
        errorcode: 530,
        cserrorcode: None,
        errortext: Some("the management server is temporarily unavailable".into()),
        probability: None,
    });
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let (_, during) = d
        .get(&format!("/operations/{}", op["id"].as_str().unwrap()))
        .await;
    assert_eq!(during["status"], "executing", "{during}");
    faults.clear();
    let op = d.wait_op(&op).await;
    assert_eq!(op["status"], "completed", "{op}");
    d.stop().await;
}
