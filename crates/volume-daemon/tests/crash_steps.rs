//! Crash at every step: for each fail point of the daemon (`volume_daemon::failpoints::all`, before and after
//! every step and commit each kind of operation journals), a daemon built with the `failpoints` feature is
//! started with that point armed (`FAILPOINTS=NAME=return(kill)`), driven through the workflow that reaches it
//! until it kills itself there (SIGKILL), and restarted without it. Then every operation must be terminal and
//! the database, the cloud (the simulator, a separate process, over its API) and the exports (the API and
//! nbdinfo) must agree, with no cloud volume, export or stable name the daemon does not account for; a
//! snapshot operation must have its outcome exactly once (one CloudStack snapshot taken, the volume reverted,
//! the snapshot deleted). A point the workflows never reach fails the test. Runs on SQLite and on PostgreSQL
//! (started by the harness).
//!
//! The hub outbox's delivery is killed the same way at its two points (`failpoints::HUB_OUTBOX_POINTS`:
//! after the daemon's commit but before the hub update, and after the hub update but before the change is
//! marked delivered), against a MariaDB hub behind a proxy; after the restart each change must have been
//! applied exactly once and in order (counted by the hub's write audit).
//!
//! Run with `cargo test -p volume-daemon --features failpoints --test crash_steps` after
//! `cargo build --workspace --bins` (scripts/test does both); `CRASH_STEPS_KINDS=snapshot_create,…` limits a
//! run by hand to the points of those operation kinds.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

#[path = "common/db.rs"]
mod db;
#[path = "common/hub.rs"]
mod hub;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use support::processes::{
    cloud, create_body, export_served, try_call, wait_terminal, World, APPLIANCE,
};

/// How the daemon is told to die at a point.
const KILL: &str = "return(kill)";

/// One daemon run with a fail point armed: the daemon, its API, and its stderr log.
struct Run<'a> {
    world: &'a World,
    database: Option<&'a str>,
    log: std::path::PathBuf,
}

impl Run<'_> {
    fn command(&self, failpoints: Option<&str>) -> Command {
        let mut cmd = self.world.daemon_command();
        if let Some(db) = self.database {
            cmd.args(["--database", db]);
        }
        match failpoints {
            Some(f) => cmd.env("FAILPOINTS", f),
            None => cmd.env_remove("FAILPOINTS"),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        cmd.stderr(Stdio::from(log));
        cmd
    }
}

/// What the workflow of a kind of operation does, step by step, until the daemon dies.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Creates a volume (the round's volume).
    Create,
    AttachToAppliance,
    Detach,
    Delete,
    /// Detaches the volume directly in the cloud, then reconciles with `apply` (a `forget_attachment` repair).
    DetachInCloudAndReconcile,
    /// Attaches the volume directly in the cloud, then adopts it (an `adopt` repair).
    AttachInCloudAndAdopt,
    /// Takes a snapshot of the (detached) volume (the round's snapshot).
    TakeSnapshot,
    /// Reverts the volume to the round's snapshot.
    RevertSnapshot,
    /// Deletes the round's snapshot.
    DeleteSnapshot,
    /// Deploys a running test VM in the cloud and attaches the volume to it (a test failover).
    AttachToTestVm,
    /// `POST /cleanup/test-failover` with `delete_vm`: stop, detach, destroy, attach to the appliance.
    CleanupTestFailover,
}

/// What a round's workflow made so far: its volume, snapshot and test VM.
#[derive(Debug, Default)]
struct Made {
    volume: Option<String>,
    snapshot: Option<String>,
    test_vm: Option<String>,
}

/// The actions that reach every point of `kind`, and the fail points armed with the one under test.
fn workflow(point: &str) -> (Vec<Action>, Vec<String>) {
    use Action::*;
    let kind = point.split('.').next().unwrap();
    let step = point.split('.').nth(1).unwrap();
    let mut extra = Vec::new();
    let actions = match kind {
        "create" => vec![Create],
        "attach" => {
            if matches!(step, "compensating" | "compensate_detach_job") {
                // Compensation follows a failure after the cloud attach: the commit fails for good.
                extra.push("attach.commit.before=return".to_string());
            }
            vec![Create, AttachToAppliance]
        }
        "detach" => vec![Create, AttachToAppliance, Detach],
        "delete" => vec![Create, AttachToAppliance, Delete],
        "repair" => vec![
            Create,
            AttachToAppliance,
            DetachInCloudAndReconcile,
            AttachInCloudAndAdopt,
        ],
        "snapshot_create" => vec![Create, TakeSnapshot],
        "snapshot_revert" => vec![Create, TakeSnapshot, RevertSnapshot],
        "snapshot_delete" => vec![Create, TakeSnapshot, DeleteSnapshot],
        "test_failover_cleanup" => {
            if matches!(step, "compensating" | "compensate_detach_job") {
                // Compensation follows a failure after the appliance attach: the commit fails for good.
                extra.push("test_failover_cleanup.commit.before=return".to_string());
            }
            vec![Create, AttachToTestVm, CleanupTestFailover]
        }
        other => panic!("no workflow drives operations of kind {other}"),
    };
    (actions, extra)
}

/// Submits a mutation and waits for it; `None` when the daemon died meanwhile.
fn submit(api: &str, method: Method, path: &str, body: Option<Value>) -> Option<Value> {
    let (s, op) = try_call(method, &format!("{api}{path}"), body)?;
    assert_eq!(s, 201, "{path}: {op}");
    let id = op["id"].as_str().unwrap();
    let (s, done) = try_call(Method::GET, &format!("{api}/operations/{id}?wait=60"), None)?;
    assert_eq!(s, 200, "{done}");
    Some(done)
}

/// Runs one action; `None` when the daemon died during it.
fn act(w: &World, api: &str, action: Action, name: &str, made: &mut Made) -> Option<()> {
    let volume = &mut made.volume;
    match action {
        Action::Create => {
            let done = submit(
                api,
                Method::POST,
                "/volumes",
                Some(create_body(&w.sim_url, name)),
            )?;
            assert_eq!(done["status"], "completed", "{done}");
            *volume = Some(done["response"]["volume_id"].as_str().unwrap().to_string());
        }
        Action::AttachToAppliance => {
            let v = volume.as_deref().unwrap();
            // May fail (an injected failure of its commit): its compensation is what is under test.
            submit(
                api,
                Method::POST,
                &format!("/volumes/{v}/attach"),
                Some(json!({"vm_id": APPLIANCE})),
            )?;
        }
        Action::Detach => {
            let v = volume.as_deref().unwrap();
            let done = submit(api, Method::POST, &format!("/volumes/{v}/detach"), None)?;
            assert_eq!(done["status"], "completed", "{done}");
        }
        Action::Delete => {
            let v = volume.as_deref().unwrap();
            let done = submit(api, Method::DELETE, &format!("/volumes/{v}"), None)?;
            assert_eq!(done["status"], "completed", "{done}");
        }
        Action::DetachInCloudAndReconcile => {
            let v = volume.as_deref().unwrap();
            w.force_detach(v);
            let (s, report) = try_call(
                Method::POST,
                &format!("{api}/reconcile"),
                Some(json!({"apply": true})),
            )?;
            assert_eq!(s, 200, "{report}");
        }
        Action::AttachInCloudAndAdopt => {
            let v = volume.as_deref().unwrap();
            attach_in_cloud(w, v);
            let done = submit(api, Method::POST, &format!("/volumes/{v}/adopt"), None)?;
            assert_eq!(done["status"], "completed", "{done}");
        }
        Action::TakeSnapshot => {
            let v = volume.as_deref().unwrap();
            let done = submit(
                api,
                Method::POST,
                &format!("/volumes/{v}/snapshots"),
                Some(json!({"name": format!("{name}-snap")})),
            )?;
            assert_eq!(done["status"], "completed", "{done}");
            made.snapshot = Some(done["response"]["snapshot_id"].as_str().unwrap().into());
        }
        Action::RevertSnapshot => {
            let v = volume.as_deref().unwrap();
            let s = made.snapshot.as_deref().unwrap();
            let done = submit(
                api,
                Method::POST,
                &format!("/volumes/{v}/snapshots/{s}/revert"),
                Some(json!({})),
            )?;
            assert_eq!(done["status"], "completed", "{done}");
        }
        Action::DeleteSnapshot => {
            let v = volume.as_deref().unwrap();
            let s = made.snapshot.as_deref().unwrap();
            let done = submit(
                api,
                Method::DELETE,
                &format!("/volumes/{v}/snapshots/{s}"),
                None,
            )?;
            assert_eq!(done["status"], "completed", "{done}");
        }
        Action::AttachToTestVm => {
            let v = volume.as_deref().unwrap();
            let url = w.sim_url.replace("/client/api", "/sim/vms");
            let (s, vm) = support::processes::call(
                Method::POST,
                &url,
                Some(json!({"name": format!("test-{name}")})),
            );
            assert_eq!(s, 200, "deploy a test VM: {vm}");
            let vm = vm["id"].as_str().unwrap().to_string();
            let done = submit(
                api,
                Method::POST,
                &format!("/volumes/{v}/attach"),
                Some(json!({"vm_id": vm})),
            )?;
            assert_eq!(done["status"], "completed", "{done}");
            made.test_vm = Some(vm);
        }
        Action::CleanupTestFailover => {
            let v = volume.as_deref().unwrap();
            let vm = made.test_vm.as_deref().unwrap();
            // May fail (an injected failure of its commit): its compensation is what is under test.
            submit(
                api,
                Method::POST,
                "/cleanup/test-failover",
                Some(
                    json!({"test_vm_id": vm, "volume_id": v, "oma_vm_id": APPLIANCE,
                            "delete_vm": true, "force_clean": false}),
                ),
            )?;
        }
    }
    Some(())
}

/// attachVolume to the appliance directly in the cloud, until CloudStack reports it attached.
fn attach_in_cloud(w: &World, volume: &str) {
    cloud(
        &w.sim_url,
        "attachVolume",
        &[
            ("id", volume.to_string()),
            ("virtualmachineid", APPLIANCE.to_string()),
        ],
    );
    let end = Instant::now() + Duration::from_secs(30);
    while support::processes::cloud_vm_of(&w.sim_url, volume).as_deref() != Some(APPLIANCE) {
        assert!(
            Instant::now() < end,
            "the cloud attach of {volume} did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The line the daemon logs when it kills itself at fail point `point`.
fn reached_line(point: &str) -> String {
    format!("fail point {point} reached: killing the daemon")
}

/// Whether `line` appears in the log at `log` within `within`.
fn logged_within(log: &Path, line: &str, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(line)) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the daemon to exit; panics unless it killed itself at `point`.
fn assert_died_at(d: &mut support::processes::Proc, point: &str, log: &Path) {
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "fail point {point}: the daemon did not die"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "fail point {point}: the daemon exited with {status} instead of being killed there; its log:\n{text}"
    );
    assert!(
        text.contains(&reached_line(point)),
        "the daemon was killed, but not at fail point {point}; its log:\n{text}"
    );
}

/// Every operation is terminal (waiting for those resumed), and database, cloud, exports and stable names
/// agree, with nothing leaked.
fn assert_invariants(w: &World, api: &str, point: &str, log: &Path) {
    let (status, ops) = support::processes::call(Method::GET, &format!("{api}/operations"), None);
    let ops = ops.as_array().unwrap_or_else(|| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        panic!("after fail point {point}: GET /operations answered {status}: {ops}; daemon log:\n{text}")
    });
    for op in ops {
        if !matches!(op["status"].as_str(), Some("completed" | "failed")) {
            wait_terminal(api, op["id"].as_str().unwrap());
        }
    }
    let (_, live) = support::processes::call(Method::GET, &format!("{api}/volumes"), None);
    let (_, deleted) =
        support::processes::call(Method::GET, &format!("{api}/volumes?state=deleted"), None);
    let live = live.as_array().unwrap();
    let known: BTreeSet<String> = live
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap().to_string())
        .collect();
    // Every cloud data volume is the daemon's, live; every live volume of the daemon is in the cloud.
    let listed = cloud(&w.sim_url, "listVolumes", &[("listall", "true".into())]);
    let in_cloud: BTreeSet<String> = listed["volume"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|v| v["type"] != "ROOT")
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        in_cloud, known,
        "after a crash at {point}: the cloud's data volumes and the daemon's live volumes differ"
    );
    for v in deleted.as_array().unwrap() {
        let id = v["volume_id"].as_str().unwrap();
        assert!(
            !in_cloud.contains(id),
            "after a crash at {point}: deleted volume {id} is still in the cloud"
        );
    }
    let mut appliance = BTreeSet::new();
    for v in live {
        let id = v["volume_id"].as_str().unwrap();
        let cloud_vm = support::processes::cloud_vm_of(&w.sim_url, id);
        let db_vm = v["attachment"]["vm_id"].as_str().map(str::to_string);
        assert_eq!(
            db_vm, cloud_vm,
            "after a crash at {point}: database and cloud disagree on volume {id}: {v}"
        );
        let on_appliance = cloud_vm.as_deref() == Some(APPLIANCE);
        assert_eq!(
            export_served(api, id),
            on_appliance,
            "after a crash at {point}: volume {id} must be served exactly when attached to the appliance: {v}"
        );
        if on_appliance {
            appliance.insert(id.to_string());
        }
    }
    // No export, and no stable name, of a volume not on the appliance.
    let (_, exports) = support::processes::call(Method::GET, &format!("{api}/exports"), None);
    let exported: BTreeSet<String> = exports["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["volume_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        exported, appliance,
        "after a crash at {point}: exports and appliance volumes differ"
    );
    let names: BTreeSet<String> = std::fs::read_dir(w.dir.path().join("daemon").join("names"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    let expected_names: BTreeSet<String> = live
        .iter()
        .filter(|v| appliance.contains(v["volume_id"].as_str().unwrap()))
        .filter_map(|v| {
            v["attachment"]["persistent_device_name"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        names, expected_names,
        "after a crash at {point}: stable names and appliance volumes differ"
    );
}

/// The outcome of the snapshot operation a crash at `point` interrupted, after recovery: journaled (any point
/// but its `accepted.before`), it completed exactly once; never journaled, it left no trace in the cloud.
fn assert_snapshot_outcome(w: &World, api: &str, point: &str, made: &Made) {
    let kind = point.split('.').next().unwrap();
    if !kind.starts_with("snapshot_") {
        return;
    }
    let journaled = !point.ends_with(".accepted.before");
    let volume = made.volume.as_deref().unwrap();
    let (_, ops) =
        support::processes::call(Method::GET, &format!("{api}/operations?type={kind}"), None);
    let ops: Vec<&Value> = ops
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["volume_id"] == volume)
        .collect();
    assert_eq!(
        ops.len(),
        usize::from(journaled),
        "after a crash at {point}: {kind} operations {ops:?}"
    );
    if let Some(op) = ops.first() {
        assert_eq!(op["status"], "completed", "after a crash at {point}: {op}");
    }
    let listed = cloud(
        &w.sim_url,
        "listSnapshots",
        &[("volumeid", volume.to_string())],
    );
    let snaps: Vec<Value> = listed["snapshot"].as_array().cloned().unwrap_or_default();
    let (_, record) =
        support::processes::call(Method::GET, &format!("{api}/volumes/{volume}"), None);
    let tracked = &record["snapshot"];
    match kind {
        "snapshot_create" => {
            // Exactly one CloudStack snapshot when the operation was journaled (never a second one taken by
            // the resumed operation), none otherwise.
            assert_eq!(
                snaps.len(),
                usize::from(journaled),
                "after a crash at {point}: the cloud's snapshots of volume {volume}: {snaps:?}"
            );
            if let (Some(op), Some(snap)) = (ops.first(), snaps.first()) {
                assert_eq!(op["response"]["snapshot_id"], snap["id"], "{op}");
                assert_eq!(snap["state"], "BackedUp", "{snap}");
                assert_eq!(tracked["snapshot_id"], snap["id"], "{record}");
                assert_eq!(tracked["snapshot_status"], "ready", "{record}");
            } else {
                assert!(tracked["snapshot_id"].is_null(), "{record}");
            }
        }
        "snapshot_revert" => {
            assert_eq!(snaps.len(), 1, "after a crash at {point}: {snaps:?}");
            let status = if journaled { "reverted" } else { "ready" };
            assert_eq!(
                tracked["snapshot_status"], status,
                "after a crash at {point}: {record}"
            );
        }
        "snapshot_delete" => {
            assert_eq!(
                snaps.len(),
                usize::from(!journaled),
                "after a crash at {point}: {snaps:?}"
            );
            if journaled {
                assert!(tracked["snapshot_id"].is_null(), "{record}");
                assert_eq!(tracked["snapshot_status"], "none", "{record}");
            } else {
                assert_eq!(tracked["snapshot_id"], snaps[0]["id"], "{record}");
            }
        }
        other => panic!("no outcome known for {other}"),
    }
}

/// Deletes every live volume (detaching it first), so that each round starts from an empty appliance.
fn delete_all(api: &str, point: &str) {
    let (_, live) = support::processes::call(Method::GET, &format!("{api}/volumes"), None);
    for v in live.as_array().unwrap() {
        let id = v["volume_id"].as_str().unwrap();
        let done = submit(api, Method::DELETE, &format!("/volumes/{id}"), None)
            .expect("the daemon runs without fail points");
        assert_eq!(
            done["status"], "completed",
            "after a crash at {point}: {done}"
        );
    }
}

/// Drives every fail point in turn on one simulator and one database.
fn crash_at_every_step(database: Option<&str>) {
    let points = volume_daemon::failpoints::all();
    assert!(points.len() >= 40, "{points:?}");
    // CRASH_STEPS_KINDS=snapshot_create,attach narrows a run by hand to the points of those kinds.
    let points: Vec<String> = match std::env::var("CRASH_STEPS_KINDS") {
        Ok(kinds) => {
            let kinds: Vec<&str> = kinds.split(',').map(str::trim).collect();
            let chosen: Vec<String> = points
                .into_iter()
                .filter(|p| kinds.contains(&p.split('.').next().unwrap()))
                .collect();
            assert!(
                !chosen.is_empty(),
                "CRASH_STEPS_KINDS={kinds:?} names no kind"
            );
            eprintln!("CRASH_STEPS_KINDS: only {} points", chosen.len());
            chosen
        }
        Err(_) => points,
    };
    let w = World::new(0);
    let run = Run {
        world: &w,
        database,
        log: w.dir.path().join("daemon.log"),
    };
    let started = Instant::now();
    for (i, point) in points.iter().enumerate() {
        let (actions, extra) = workflow(point);
        let armed = std::iter::once(format!("{point}={KILL}"))
            .chain(extra)
            .collect::<Vec<_>>()
            .join(";");
        let _ = std::fs::remove_file(&run.log);
        let (mut d, api) = World::start_daemon(&mut run.command(Some(&armed)));
        let mut made = Made::default();
        let name = format!("step-{i}");
        let all_answered = actions
            .iter()
            .all(|a| act(&w, &api, *a, &name, &mut made).is_some());
        // A point after a commit may kill the daemon just after the waiting client got its answer: the
        // daemon's log, not whether every action was answered, says whether the point was reached.
        if all_answered && !logged_within(&run.log, &reached_line(point), Duration::from_secs(10)) {
            let text = std::fs::read_to_string(&run.log).unwrap_or_default();
            panic!("fail point {point} was never reached by {actions:?}; daemon log:\n{text}");
        }
        assert_died_at(&mut d, point, &run.log);
        drop(d);
        let (_d, api) = World::start_daemon(&mut run.command(None));
        if point.starts_with("repair.") {
            // The drift the repair was for came from outside, not from the crash; a repair that never got
            // journaled is submitted again by the next reconcile (periodic, or this one).
            let (s, report) = support::processes::call(
                Method::POST,
                &format!("{api}/reconcile"),
                Some(json!({"apply": true})),
            );
            assert_eq!(s, 200, "after a crash at {point}: {report}");
        }
        assert_invariants(&w, &api, point, &run.log);
        assert_snapshot_outcome(&w, &api, point, &made);
        delete_all(&api, point);
        eprintln!(
            "crash at {point}: recovered and consistent ({:.1} s in)",
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn ext_crash_at_every_journal_step_recovers_consistently_on_sqlite() {
    crash_at_every_step(None);
}

#[test]
fn ext_postgres_crash_at_every_journal_step_recovers_consistently() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(db::postgres());
    crash_at_every_step(Some(&db.url));
}

/// A commit that lands but whose answer is lost (`attach.commit.after` fails once) is retried like any journal
/// write; the retry finds the operation completed, so the attach stands and is not undone.
#[test]
fn ext_an_attach_whose_commit_answer_is_lost_stands() {
    let w = World::new(0);
    let run = Run {
        world: &w,
        database: None,
        log: w.dir.path().join("daemon.log"),
    };
    let (_d, api) = World::start_daemon(&mut run.command(Some("attach.commit.after=1*return")));
    let mut made = Made::default();
    act(&w, &api, Action::Create, "lost-answer", &mut made).unwrap();
    let v = made.volume.unwrap();
    let done = submit(
        &api,
        Method::POST,
        &format!("/volumes/{v}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    )
    .unwrap();
    let log = std::fs::read_to_string(&run.log).unwrap_or_default();
    assert!(
        log.contains("fail point attach.commit.after reached: the journal write fails"),
        "{log}"
    );
    assert_eq!(done["status"], "completed", "{done}");
    assert_invariants(&w, &api, "attach.commit.after (answer lost)", &run.log);
    assert!(export_served(&api, &v));
}

/// The hub component of the daemon's `/health` (`api` is its API base URL).
fn hub_health(api: &str) -> Value {
    let base = api.trim_end_matches("/api/v1");
    let (_, h) = support::processes::call(Method::GET, &format!("{base}/health"), None);
    h["components"]["hub"].clone()
}

/// Waits until the hub component says `want` holds of its detail.
fn wait_hub(api: &str, what: &str, want: impl Fn(&str) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let c = hub_health(api);
        if c["detail"].as_str().is_some_and(&want) {
            return c;
        }
        assert!(Instant::now() < end, "{what}: the hub component is {c}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon, killed by SIGKILL inside the hub outbox's delivery (at each of its fail points), with an attach
/// and a detach of one volume journaled but not yet delivered: after the restart the hub holds what the
/// journal says (no mapping, no export row, the volume `detached`), each change was applied exactly once
/// (one insert and one delete per table, never a second insert) and in commit order.
#[test]
fn ext_a_daemon_killed_between_its_commit_and_the_hub_update_delivers_each_change_once_in_order() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for point in volume_daemon::failpoints::HUB_OUTBOX_POINTS {
        let hub = rt.block_on(hub::TestHub::new());
        let proxy = rt.block_on(hub::Proxy::start(hub.port()));
        let w = World::new(0);
        let run = Run {
            world: &w,
            database: None,
            log: w.dir.path().join("daemon.log"),
        };
        let hub_url = hub.url_via(proxy.addr);
        let command = |failpoints: Option<&str>| {
            let mut cmd = run.command(failpoints);
            // The port the hub's export rows name stays the same across the restart, as on an appliance.
            cmd.env("VOLUME_DAEMON_HUB_DATABASE_URL", &hub_url)
                .env("VOLUME_DAEMON_NBD_ADVERTISED_PORT", "10809");
            cmd
        };

        // The hub is unreachable while the attach and the detach commit, so both wait in the outbox.
        proxy.down();
        let (mut d, api) = World::start_daemon(&mut command(Some(&format!("{point}={KILL}"))));
        let mut made = Made::default();
        act(&w, &api, Action::Create, "hub-crash", &mut made).unwrap();
        let v = made.volume.clone().unwrap();
        rt.block_on(hub.add_volume(&v, "ctx-crash"));
        act(&w, &api, Action::AttachToAppliance, "hub-crash", &mut made).unwrap();
        act(&w, &api, Action::Detach, "hub-crash", &mut made).unwrap();
        let c = wait_hub(&api, "both changes pending", |d| {
            d.starts_with("2 changes pending")
        });
        assert_eq!(c["status"], "degraded", "{c}");
        assert_eq!(rt.block_on(hub.daemon_writes()), 0);

        // The hub comes back: the delivery of the attach kills the daemon at the point.
        proxy.up();
        assert_died_at(&mut d, point, &run.log);
        drop(d);
        let applied_before_death = rt.block_on(hub.mapping(&v)).is_some();
        assert_eq!(
            applied_before_death,
            point.starts_with("hub_outbox.mark_delivered"),
            "at {point} the attach is applied to the hub exactly when the kill came after the hub update"
        );

        let (_d, api) = World::start_daemon(&mut command(None));
        wait_hub(&api, "the hub in step after the restart", |d| {
            d.starts_with("in step")
        });
        assert_eq!(
            rt.block_on(hub.mapping(&v)),
            None,
            "after a crash at {point}"
        );
        assert!(
            rt.block_on(hub.exports(&v)).is_empty(),
            "after a crash at {point}"
        );
        assert_eq!(
            rt.block_on(hub.volume(&v)),
            (Some("detached".into()), None),
            "after a crash at {point}"
        );
        for (tbl, op, n) in [
            ("device_mappings", "INSERT", 1),
            ("device_mappings", "DELETE", 1),
            ("nbd_exports", "INSERT", 1),
            ("nbd_exports", "DELETE", 1),
            ("ossea_volumes", "UPDATE", 2),
        ] {
            assert_eq!(
                rt.block_on(hub.writes(tbl, op)),
                n,
                "after a crash at {point}: {op}s of {tbl}"
            );
        }
        assert_eq!(
            rt.block_on(hub.daemon_writes()),
            6,
            "after a crash at {point}: nothing else was written"
        );
        eprintln!("hub delivery killed at {point}: each change applied once, in order");
    }
}

/// A workflow that panics (a defect) is taken like a crash of the daemon while it ran: the operation runs
/// again from its journaled step and completes; one that panics again fails (code `internal`), so no
/// operation stays executing with nothing running it, and the daemon goes on serving.
#[test]
fn ext_an_operation_whose_run_panics_runs_again_from_its_step_or_fails() {
    let w = World::new(0);
    let run = Run {
        world: &w,
        database: None,
        log: w.dir.path().join("daemon.log"),
    };
    let (_d, api) = World::start_daemon(&mut run.command(Some(
        "attach.cloud_attach_job.after=1*return(panic);detach.cloud_detach_job.after=2*return(panic)",
    )));
    let mut made = Made::default();
    act(&w, &api, Action::Create, "panicky", &mut made).unwrap();
    let v = made.volume.unwrap();
    let attached = submit(
        &api,
        Method::POST,
        &format!("/volumes/{v}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    )
    .unwrap();
    assert_eq!(attached["status"], "completed", "{attached}");
    assert!(export_served(&api, &v));
    let detached = submit(
        &api,
        Method::POST,
        &format!("/volumes/{v}/detach"),
        Some(json!({})),
    )
    .unwrap();
    assert_eq!(detached["status"], "failed", "{detached}");
    assert_eq!(detached["error_code"], "internal", "{detached}");
    assert!(
        detached["error"]
            .as_str()
            .unwrap()
            .contains("stopped unexpectedly twice"),
        "{detached}"
    );
    let log = std::fs::read_to_string(&run.log).unwrap_or_default();
    assert_eq!(
        log.matches("fail point detach.cloud_detach_job.after reached: panicking")
            .count(),
        2,
        "{log}"
    );
    // The daemon goes on: the next detach (no point armed any more) completes.
    let again = submit(
        &api,
        Method::POST,
        &format!("/volumes/{v}/detach"),
        Some(json!({})),
    )
    .unwrap();
    assert_eq!(again["status"], "completed", "{again}");
}
