//! A detach flushes the export before it asks the cloud: when the final flush fails, the detach fails with
//! that cause, the cloud attachment stays and the volume is served again.
//!
//! The failing flush is real: the simulator's volume files live on a 1 MiB tmpfs, so the loop device over a
//! (sparse, larger) volume file accepts writes into its page cache but cannot write them back, and the
//! export's `fdatasync` fails. Needs root (mount, loop devices): named `root_`.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::{call, GIB};
use volume_daemon::daemon::RunningDaemon;

/// A tmpfs mounted by this test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_failed_flush_fails_the_detach_before_the_cloud_and_keeps_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let _volumes = Tmpfs::mount(&dir.path().join("sim").join("volumes"), "1m");
    let daemon = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", daemon.api_addr());
    let sim = daemon.sim().unwrap();
    let appliance = sim.appliance_vm_id().to_string();
    let offering = support::custom_offering_of(sim);
    let wait = |op: serde_json::Value| support::wait_for(base.clone(), op);
    let created = wait(
        call(
            &base,
            reqwest::Method::POST,
            "/volumes",
            Some(json!({"name": "flush", "size": GIB, "disk_offering_id": offering, "zone_id": sim.zone_id()})),
        )
        .await,
    )
    .await;
    assert_eq!(created["status"], "completed", "{created}");
    let vol = created["response"]["volume_id"]
        .as_str()
        .unwrap()
        .to_string();
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

    // A writer puts 4 MiB into the export (more than the tmpfs holds) and stays connected, without a flush.
    let export = volume_api::export_name(vol.parse().unwrap());
    let mut writer = nbd::client::Handshake::connect(daemon.nbd_addr())
        .await
        .unwrap()
        .go(&export)
        .await
        .unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    for i in 0..4u64 {
        writer
            .send(nbd::proto::CMD_WRITE, 0, i << 20, 1 << 20, &chunk)
            .await
            .unwrap();
        let reply = writer.recv().await.unwrap();
        assert_eq!(reply.error, 0, "the write lands in the device's page cache");
    }

    let detach = wait(
        call(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{vol}/detach"),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(detach["status"], "failed", "{detach}");
    assert_eq!(detach["error_code"], "export_failed", "{detach}");
    let error = detach["error"].as_str().unwrap();
    assert!(error.contains("flush"), "the cause is named: {detach}");
    assert!(
        error.contains("served again"),
        "the error says the volume is served again: {detach}"
    );
    assert_ne!(
        detach["step"], "cloud_detach_job",
        "the cloud was not asked: {detach}"
    );

    let status = call(
        &base,
        reqwest::Method::GET,
        &format!("/volumes/{vol}"),
        None,
    )
    .await;
    assert_eq!(status["state"], "attached", "{status}");
    assert_eq!(
        status["cloudstack_data"]["virtualmachineid"], appliance,
        "the cloud attachment remains: {status}"
    );
    let exp = call(
        &base,
        reqwest::Method::GET,
        &format!("/exports/{vol}"),
        None,
    )
    .await;
    assert_eq!(
        exp["status"], "active",
        "the volume is exported again: {exp}"
    );

    drop(writer);
    sim.detach_all_devices();
    daemon.shutdown().await;
}
