//! Crash recovery: the simulator and the daemon run as separate processes; the daemon is killed with
//! SIGKILL while an attach or a detach is in flight, at several journaled steps, and restarted. Every
//! operation must reach a terminal state, the cloud and the database must agree, and the export must be
//! served exactly when the volume is attached to the appliance. Needs the `cloudsim` binary and nbdinfo.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use serde_json::json;
use support::processes::{
    assert_consistent, call, cloud, cloud_volumes_named, export_served, kill, submit_create,
    wait_step, wait_terminal, zone_and_offering, World, APPLIANCE,
};

fn create_volume(api: &str, sim_url: &str) -> String {
    let id = submit_create(api, sim_url, "crash");
    let done = wait_terminal(api, &id);
    assert_eq!(done["status"], "completed", "{done}");
    done["response"]["volume_id"].as_str().unwrap().to_string()
}

#[test]
fn ext_crash_during_attach_job_resumes_the_job_and_exports() {
    let w = World::new(1500);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(s, 201, "{op}");
    let id = op["id"].as_str().unwrap();
    wait_step(&api, id, "cloud_attach_job");
    kill(&mut d);
    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_consistent(&api, &w.sim_url, &vol);
    assert!(export_served(&api, &vol));
    let (_, ops) = call(
        reqwest::Method::GET,
        &format!("{api}/operations?status=executing"),
        None,
    );
    assert_eq!(ops, json!([]));
    detach_all(&api, &vol);
}

#[test]
fn ext_crash_during_detach_job_finishes_the_detach() {
    let w = World::new(1500);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let (_, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(
        wait_terminal(&api, op["id"].as_str().unwrap())["status"],
        "completed"
    );
    assert!(export_served(&api, &vol));
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/detach"),
        None,
    );
    assert_eq!(s, 201, "{op}");
    let id = op["id"].as_str().unwrap();
    wait_step(&api, id, "cloud_detach_job");
    kill(&mut d);
    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_consistent(&api, &w.sim_url, &vol);
    assert!(!export_served(&api, &vol));
}

#[test]
fn ext_crash_after_export_before_restart_reexports_after_verifying() {
    let w = World::new(100);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let (_, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": APPLIANCE})),
    );
    assert_eq!(
        wait_terminal(&api, op["id"].as_str().unwrap())["status"],
        "completed"
    );
    kill(&mut d);
    let (_d2, api) = w.daemon();
    assert_consistent(&api, &w.sim_url, &vol);
    assert!(
        export_served(&api, &vol),
        "the export is re-created at start-up"
    );
    let (s, h) = call(reqwest::Method::GET, &format!("{api}/health"), None);
    assert_eq!(s, 200, "{h}");
    detach_all(&api, &vol);
}

fn detach_all(api: &str, vol: &str) {
    let (_, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/detach"),
        None,
    );
    assert_eq!(
        wait_terminal(api, op["id"].as_str().unwrap())["status"],
        "completed"
    );
}

#[test]
fn ext_crash_before_create_reaches_the_cloud_never_adopts_a_same_named_foreign_volume() {
    let w = World::new(0);
    let (mut d, api) = w.daemon();
    // Someone else's volume with the name the caller is about to use.
    let (zone, off) = zone_and_offering(&w.sim_url);
    let foreign = cloud(
        &w.sim_url,
        "createVolume",
        &[
            ("name", "shared-name".into()),
            ("zoneid", zone),
            ("diskofferingid", off),
            ("size", "1".into()),
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    // createVolume never gets through: the daemon journals `cloud_create_sent` and keeps retrying.
    w.add_fault(
        json!({"type": "fail_command", "command": "createVolume", "count": 1000, "errorcode": 503}),
    );
    let op = submit_create(&api, &w.sim_url, "shared-name");
    wait_step(&api, &op, "cloud_create_sent");
    kill(&mut d);
    w.clear_faults();
    assert_eq!(
        cloud_volumes_named(&w.sim_url, "shared-name"),
        vec![foreign.clone()]
    );

    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, &op);
    assert_eq!(done["status"], "completed", "{done}");
    let made = done["response"]["volume_id"].as_str().unwrap().to_string();
    assert_ne!(
        made, foreign,
        "the interrupted create adopted someone else's volume: {done}"
    );
    let mut named = cloud_volumes_named(&w.sim_url, "shared-name");
    named.sort();
    let mut want = vec![foreign.clone(), made.clone()];
    want.sort();
    assert_eq!(named, want, "the create was sent again exactly once");
    // The daemon knows only its own volume.
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{api}/volumes/{foreign}"),
        None,
    );
    assert_eq!(s, 404);
    let (s, _) = call(reqwest::Method::GET, &format!("{api}/volumes/{made}"), None);
    assert_eq!(s, 200);
}

/// Sets `columns` (SQL assignments) on operation `op` in the stopped daemon's SQLite journal, as a run that
/// died a moment earlier would have left it.
fn rewind(w: &World, op: &str, columns: &str) {
    let db = w.dir.path().join("daemon").join("volume-daemon.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .connect()
            .await
            .unwrap();
        let done = sqlx::query(&format!("UPDATE operations SET {columns} WHERE id = ?"))
            .bind(op)
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
    });
}

#[test]
fn ext_crash_after_create_reached_the_cloud_adopts_the_volume_it_made() {
    let w = World::new(0);
    let (mut d, api) = w.daemon();
    let (zone, off) = zone_and_offering(&w.sim_url);
    let foreign = cloud(
        &w.sim_url,
        "createVolume",
        &[
            ("name", "mine-and-theirs".into()),
            ("zoneid", zone),
            ("diskofferingid", off),
            ("size", "1".into()),
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The job runs long enough to kill the daemon while it waits.
    w.add_fault(json!({"type": "slow_job", "command": "createVolume", "extra_delay_ms": 3000}));
    let op = submit_create(&api, &w.sim_url, "mine-and-theirs");
    wait_step(&api, &op, "cloud_create_job");
    kill(&mut d);
    // Rewind the journal to the moment between sending createVolume and journaling its answer.
    rewind(
        &w,
        &op,
        "step = 'cloud_create_sent', cloud_job_id = NULL, volume_id = NULL",
    );
    let named = cloud_volumes_named(&w.sim_url, "mine-and-theirs");
    assert_eq!(named.len(), 2, "{named:?}");
    let made = named.iter().find(|v| **v != foreign).unwrap().clone();

    let (_d2, api) = w.daemon();
    let done = wait_terminal(&api, &op);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"]["volume_id"], made.as_str(), "{done}");
    assert_eq!(
        cloud_volumes_named(&w.sim_url, "mine-and-theirs").len(),
        2,
        "not sent twice"
    );
}

/// A resumed attach whose first call's job is still running and whose job id was never journaled, when the
/// cloud cannot list its jobs (listAsyncJobs fails): the daemon cannot adopt the lost job, so it says why
/// and sends the call again; the operation completes, the cloud and the database agree once every job on
/// the volume has ended, and the log names the fallback.
#[test]
fn ext_a_resumed_attach_that_cannot_list_the_clouds_jobs_sends_again_and_completes() {
    let w = World::new(20);
    let (mut d, api) = w.daemon();
    let vol = create_volume(&api, &w.sim_url);
    let vms = cloud(&w.sim_url, "listVirtualMachines", &[]);
    let vm = vms["virtualmachine"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] != APPLIANCE && v["state"] == "Running")
        .expect("a running VM besides the appliance")["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The first attach job runs long enough to kill the daemon while it waits, and to be pending still
    // when the next run resumes the operation.
    w.add_fault(json!({"type": "slow_job", "command": "attachVolume", "extra_delay_ms": 4000}));
    let (s, op) = call(
        reqwest::Method::POST,
        &format!("{api}/volumes/{vol}/attach"),
        Some(json!({"vm_id": vm})),
    );
    assert_eq!(s, 201, "{op}");
    let op = op["id"].as_str().unwrap().to_string();
    wait_step(&api, &op, "cloud_attach_job");
    kill(&mut d);
    // Rewind the journal to the moment between sending attachVolume and journaling its job id.
    rewind(&w, &op, "step = 'started', cloud_job_id = NULL");
    w.add_fault(json!({"type": "fail_command", "command": "listAsyncJobs", "count": 1000}));

    let log = w.dir.path().join("second-run.log");
    let mut cmd = w.daemon_command();
    cmd.stderr(std::process::Stdio::from(
        std::fs::File::create(&log).unwrap(),
    ));
    let (_d2, api) = World::start_daemon(&mut cmd);
    let done = wait_terminal(&api, &op);
    assert_eq!(done["status"], "completed", "{done}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("cannot list CloudStack's jobs"),
        "the fallback is not logged: {logged}"
    );

    // Both attach jobs end: the lost one within seconds.
    w.clear_faults();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let attach_jobs = loop {
        let jobs = cloud(&w.sim_url, "listAsyncJobs", &[]);
        let on_volume: Vec<_> = jobs["asyncjobs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|j| j["jobinstanceid"] == vol.as_str())
            .filter(|j| {
                j["cmd"]
                    .as_str()
                    .is_some_and(|c| c.ends_with("AttachVolumeCmd"))
            })
            .collect();
        if on_volume.iter().all(|j| j["jobstatus"] != 0) {
            break on_volume;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs still pending: {on_volume:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(
        attach_jobs.len(),
        2,
        "the call was sent again: {attach_jobs:?}"
    );
    assert_consistent(&api, &w.sim_url, &vol);
    let (_, st) = call(reqwest::Method::GET, &format!("{api}/volumes/{vol}"), None);
    assert_eq!(st["attachment"]["vm_id"], vm.as_str(), "{st}");
}

/// A log that cannot be written (standard error on a full disk; here /dev/full, where every write fails)
/// loses log lines, nothing else: the daemon starts, and operations that log as they succeed and fail end
/// as they would with a log, none left executing.
#[test]
fn ext_a_log_that_cannot_be_written_loses_lines_not_operations() {
    let w = World::new(50);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (_d, api) = World::start_daemon(
        w.daemon_command()
            .env("RUST_LOG", "debug")
            .stderr(std::process::Stdio::from(full)),
    );
    let vol = create_volume(&api, &w.sim_url);
    let attach = || {
        let (s, op) = call(
            reqwest::Method::POST,
            &format!("{api}/volumes/{vol}/attach"),
            Some(json!({"vm_id": APPLIANCE})),
        );
        assert_eq!(s, 201, "{op}");
        wait_terminal(&api, op["id"].as_str().unwrap())
    };
    w.add_fault(json!({"type": "fail_job", "command": "attachVolume", "errortext": "no capacity"}));
    let done = attach();
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "cloud_job_failed", "{done}");
    let done = attach();
    assert_eq!(done["status"], "completed", "{done}");
    assert_consistent(&api, &w.sim_url, &vol);
}
