//! Export byte counters are totals across the daemon's runs: what an NBD client wrote before a restart is
//! still counted after it.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use support::call;

use serde_json::{json, Value};
use volume_daemon::daemon::RunningDaemon;

async fn run(base: &str, method: reqwest::Method, path: &str, body: Value) -> Value {
    let op = call(base, method, path, Some(body)).await;
    let done = call(
        base,
        reqwest::Method::GET,
        &format!("/operations/{}?wait=60", op["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    done
}

/// Creates a 1 GiB volume named `name` and attaches it to the appliance: its id and the attach operation.
async fn create_and_attach(daemon: &RunningDaemon, name: &str) -> (String, Value) {
    let base = format!("http://{}/api/v1", daemon.api_addr());
    let sim = daemon.sim().unwrap();
    let body = json!({"name": name, "size": support::GIB,
        "disk_offering_id": support::custom_offering_of(sim), "zone_id": sim.zone_id()});
    let created = run(&base, reqwest::Method::POST, "/volumes", body).await;
    let volume = created["response"]["volume_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let attached = run(
        &base,
        reqwest::Method::POST,
        &format!("/volumes/{volume}/attach"),
        json!({"vm_id": sim.appliance_vm_id()}),
    )
    .await;
    (volume, attached)
}

/// Detaches `volume`, removes the simulator's devices and stops the daemon.
async fn detach_and_stop(daemon: RunningDaemon, volume: &str) {
    let base = format!("http://{}/api/v1", daemon.api_addr());
    run(
        &base,
        reqwest::Method::POST,
        &format!("/volumes/{volume}/detach"),
        json!({}),
    )
    .await;
    daemon.sim().unwrap().detach_all_devices();
    daemon.shutdown().await;
}

async fn write_mib(daemon: &RunningDaemon, export: &str, mib: u64) {
    let mut c = nbd::client::Handshake::connect(daemon.nbd_addr())
        .await
        .unwrap()
        .go(export)
        .await
        .unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..mib {
        c.write(i << 20, &chunk, 0).await.unwrap();
    }
    c.flush().await.unwrap();
}

async fn bytes_written(base: &str, volume: &str) -> u64 {
    let e = call(
        base,
        reqwest::Method::GET,
        &format!("/exports/{volume}"),
        None,
    )
    .await;
    e["bytes_written"].as_u64().unwrap_or_else(|| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_byte_counters_are_totals_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let (volume, attached) = create_and_attach(&first, "counted").await;
    let export = attached["response"]["export_name"]
        .as_str()
        .unwrap()
        .to_owned();

    write_mib(&first, &export, 2).await;
    assert_eq!(bytes_written(&base, &volume).await, 2 << 20);
    first.shutdown().await;

    // The volume stays attached across the restart; its export is served again with the total.
    let second = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    assert_eq!(bytes_written(&base, &volume).await, 2 << 20);
    write_mib(&second, &export, 1).await;
    assert_eq!(bytes_written(&base, &volume).await, 3 << 20);

    detach_and_stop(second, &volume).await;
}

/// The volume's device vanishes and comes back while it stays attached: its export is fenced (closed) and
/// served again under a new generation by a `reexport` repair. What the closed generation counted stays in
/// the totals, in this run and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_byte_counters_keep_what_a_closed_generation_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = support::config(dir.path());
        c.reconcile_repair = false;
        c
    };
    let first = RunningDaemon::start(config()).await.unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let (volume, attached) = create_and_attach(&first, "regenerated").await;
    let export = attached["response"]["export_name"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = std::path::PathBuf::from(attached["response"]["device_path"].as_str().unwrap());
    write_mib(&first, &export, 2).await;
    assert_eq!(bytes_written(&base, &volume).await, 2 << 20);

    // The device's by-id link goes away (a hot-unplug): the export is fenced.
    let target = std::fs::read_link(&link).unwrap();
    std::fs::remove_file(&link).unwrap();
    let path = format!("/exports/{volume}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while call(&base, reqwest::Method::GET, &path, None).await["status"] != "inactive" {
        assert!(std::time::Instant::now() < end, "the export was not fenced");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // It comes back; the repair serves it again under a new generation.
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let report = call(
        &base,
        reqwest::Method::POST,
        "/reconcile",
        Some(json!({"apply": true})),
    )
    .await;
    assert_eq!(report["drift"][0]["action"], "reexport", "{report}");
    assert_eq!(report["drift"][0]["applied"], true, "{report}");
    let e = call(&base, reqwest::Method::GET, &path, None).await;
    assert_eq!(e["status"], "active", "{e}");
    assert_ne!(e["generation"], attached["response"]["export_generation"]);
    assert_eq!(bytes_written(&base, &volume).await, 2 << 20);
    write_mib(&first, &export, 1).await;
    assert_eq!(bytes_written(&base, &volume).await, 3 << 20);
    first.shutdown().await;

    let second = RunningDaemon::start(config()).await.unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    assert_eq!(bytes_written(&base, &volume).await, 3 << 20);
    detach_and_stop(second, &volume).await;
}
