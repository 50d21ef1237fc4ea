//! A kernel device name (`/dev/loop3`, `/dev/vdb`) names whichever disk holds it now: after the appliance
//! restarts, its disks come back under other names, and a disk that went away behind the daemon's back leaves
//! its name to the next one. Every device path the API reports for a volume, and every look-up by one, leads
//! to that volume's own disk.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use blockdev::loopdev::LoopDevice;
use serde_json::{json, Value};
use support::{call, call_ok, TestDaemon, GIB};
use volume_daemon::daemon::RunningDaemon;

/// The tests take kernel names on purpose, so they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Detaches the loop devices over the simulator's volume files under its directory when dropped, however the
/// test ended.
struct DetachLoops<'a>(&'a Path);

impl Drop for DetachLoops<'_> {
    fn drop(&mut self) {
        support::detach_loop_devices_of(self.0);
    }
}

/// The first 4 KiB of a volume, written through its export: the volume id, repeated.
fn signature(volume: &str) -> Vec<u8> {
    volume.bytes().cycle().take(4096).collect()
}

fn first_block(path: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

fn text(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_after_a_restart_moves_the_disks_each_volume_reports_and_finds_its_own_device() {
    support::require_root();
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _loops = DetachLoops(dir.path());
    let first = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", first.api_addr());
    let sim = first.sim().unwrap();
    let appliance = sim.appliance_vm_id().to_string();
    let offering = support::custom_offering_of(sim);
    let mut volumes = Vec::new();
    let mut old_devices = Vec::new();
    for name in ["moved-a", "moved-b"] {
        let body = json!({"name": name, "size": GIB, "disk_offering_id": offering, "zone_id": sim.zone_id()});
        let created = call_ok(&base, reqwest::Method::POST, "/volumes", Some(body)).await;
        let volume = text(&created["response"]["volume_id"]);
        let attached = call_ok(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{volume}/attach"),
            Some(json!({"vm_id": appliance})),
        )
        .await;
        let mut c = nbd::client::Handshake::connect(first.nbd_addr())
            .await
            .unwrap()
            .go(&text(&attached["response"]["export_name"]))
            .await
            .unwrap();
        c.write(0, &signature(&volume), 0).await.unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
        old_devices.push(PathBuf::from(text(&attached["response"]["kernel_device"])));
        volumes.push(volume);
    }

    // Power off: the daemon stops, and every disk of the appliance goes away.
    first.shutdown().await;
    for old in &old_devices {
        blockdev::loopdev::detach_path(old).unwrap();
    }
    // Power on: other disks take the kernel names the volumes had, so theirs come back under new ones.
    let scratch = dir.path().join("other-disk.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
    let mut others = Vec::new();
    for _ in 0..64 {
        if old_devices
            .iter()
            .all(|d| others.iter().any(|o: &LoopDevice| o.path() == d))
        {
            break;
        }
        others.push(LoopDevice::attach(&scratch, true).unwrap());
    }
    others.retain(|o| old_devices.iter().any(|d| o.path() == d));
    assert_eq!(
        others.len(),
        old_devices.len(),
        "the old kernel names were taken by other disks"
    );

    let second = RunningDaemon::start(support::config(dir.path()))
        .await
        .unwrap();
    let base = format!("http://{}/api/v1", second.api_addr());
    for volume in &volumes {
        let v = call(
            &base,
            reqwest::Method::GET,
            &format!("/volumes/{volume}"),
            None,
        )
        .await;
        assert_eq!(v["linux_state"], "present", "{v}");
        let att = &v["attachment"];
        let by_id = PathBuf::from(text(&att["device_path"]));
        let kernel = PathBuf::from(text(&att["kernel_device"]));
        assert_eq!(
            std::fs::canonicalize(&by_id).unwrap(),
            kernel,
            "the reported kernel device is the disk the volume's by-id link leads to: {v}"
        );
        assert!(!old_devices.contains(&kernel), "{v}");
        for path in [&kernel, &by_id, &PathBuf::from(text(&att["symlink_path"]))] {
            assert!(
                first_block(path) == signature(volume),
                "{} holds another disk's data, not volume {volume}'s",
                path.display()
            );
        }
        let mapping = call(
            &base,
            reqwest::Method::GET,
            &format!("/devices/volume?path={}", kernel.display()),
            None,
        )
        .await;
        assert_eq!(mapping["volume_id"], json!(volume), "{mapping}");
        assert_eq!(
            mapping["kernel_device"],
            json!(kernel.display().to_string())
        );
    }
    for old in &old_devices {
        let found = call(
            &base,
            reqwest::Method::GET,
            &format!("/devices/volume?path={}", old.display()),
            None,
        )
        .await;
        assert_eq!(
            found["code"],
            "not_found",
            "{} is another disk now, no volume's: {found}",
            old.display()
        );
    }

    for volume in &volumes {
        call_ok(
            &base,
            reqwest::Method::POST,
            &format!("/volumes/{volume}/detach"),
            Some(json!({})),
        )
        .await;
    }
    drop(others);
    let sim = second.sim().unwrap();
    sim.detach_all_devices();
    second.shutdown().await;
}

/// Loop devices over a scratch file holding every free kernel name up to and including `wanted`, so that the
/// next loop device attached gets `wanted` once its holder is dropped; `None` when another process took it.
fn hold_up_to(wanted: &Path, scratch: &Path) -> Option<(LoopDevice, Vec<LoopDevice>)> {
    let mut lower = Vec::new();
    for _ in 0..64 {
        let held = LoopDevice::attach(scratch, true).unwrap();
        if held.path() == wanted {
            return Some((held, lower));
        }
        lower.push(held);
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_disk_gone_behind_the_daemons_back_leaves_its_kernel_name_to_the_next_volume() {
    support::require_root();
    let _serial = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start().await;
    let app = d.appliance();
    let gone = d.create_volume("gone", GIB).await;
    let next = d.create_volume("next", GIB).await;
    let op = d
        .run_ok(&format!("/volumes/{gone}/attach"), json!({"vm_id": app}))
        .await;
    let old = PathBuf::from(text(&op["response"]["kernel_device"]));
    // Detached in the cloud behind the daemon's back: the daemon stops serving it, and its disk goes away.
    d.sim()
        .faults()
        .detach_volume(&gone.to_string())
        .expect("detach in the cloud");
    let backing = Path::new("/sys/block")
        .join(old.file_name().unwrap())
        .join("loop/backing_file");
    support::eventually(std::time::Duration::from_secs(10), || !backing.exists()).await;

    // The next volume's disk gets the kernel name the gone one had.
    let scratch = d.dir.path().join("other-disk.img");
    std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
    // (Another process on the machine may take a loop device in between: then the volume tries again.)
    let mut landed = false;
    for _ in 0..10 {
        let (holder, lower) = hold_up_to(&old, &scratch).expect("the old kernel name is free");
        drop(holder);
        let op = d
            .run_ok(&format!("/volumes/{next}/attach"), json!({"vm_id": app}))
            .await;
        drop(lower);
        if op["response"]["kernel_device"] == json!(old.display().to_string()) {
            landed = true;
            break;
        }
        d.run_ok(&format!("/volumes/{next}/detach"), json!({}))
            .await;
    }
    assert!(
        landed,
        "the next volume never got kernel name {}",
        old.display()
    );

    let (_, mapping) = d
        .get(&format!("/devices/volume?path={}", old.display()))
        .await;
    assert_eq!(mapping["volume_id"], json!(next.to_string()), "{mapping}");
    // The gone volume's record (until the reconciler repairs it) no longer names the other volume's disk.
    let (_, v) = d.get(&format!("/volumes/{gone}")).await;
    assert_eq!(v["linux_state"], "missing", "{v}");
    assert_ne!(
        v["attachment"]["kernel_device"],
        json!(old.display().to_string()),
        "{v}"
    );
    let (_, m) = d.get(&format!("/volumes/{gone}/device")).await;
    assert_ne!(m["kernel_device"], json!(old.display().to_string()), "{m}");
    d.stop().await;
}

/// A volume's by-id link that vanishes and comes back leading to another volume's disk (a loop device, which
/// has no serial) is never served as that volume: the export stays fenced, the repair that would serve it
/// again fails naming the backing file, and the other volume's data and export are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_link_that_comes_back_to_another_volumes_disk_is_never_served() {
    support::require_root();
    let _serial = ONE_AT_A_TIME.lock().await;
    let d = TestDaemon::start_with(|c| c.reconcile_repair = false).await;
    let a = d.create_volume("link-a", GIB).await;
    let b = d.create_volume("link-b", GIB).await;
    let att_a = d.attach_to_appliance(a).await;
    let att_b = d.attach_to_appliance(b).await;
    for (vol, att) in [(a, &att_a), (b, &att_b)] {
        let mut c = d.nbd_session(att).await;
        c.write(0, &signature(&vol.to_string()), 0).await.unwrap();
        c.flush().await.unwrap();
    }
    let link_a = PathBuf::from(text(&att_a["response"]["device_path"]));
    let dev_b = std::fs::read_link(text(&att_b["response"]["device_path"])).unwrap();
    // A's link goes away (its export is fenced), then comes back leading to B's disk.
    std::fs::remove_file(&link_a).unwrap();
    let mut fenced = false;
    for _ in 0..100 {
        let (_, e) = d.get(&format!("/exports/{a}")).await;
        if e["status"] == "inactive" {
            fenced = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(fenced, "A's export was not fenced");
    std::os::unix::fs::symlink(&dev_b, &link_a).unwrap();
    // The reconcile reports A's device as not A's (naming the backing file) and repairs nothing; a repair of
    // A, had one been tried, failed.
    let (_, report) = d.post("/reconcile", json!({"apply": true})).await;
    let on_a: Vec<&Value> = report["drift"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["volume_id"] == a.to_string())
        .collect();
    assert_eq!(on_a.len(), 1, "{report}");
    assert_eq!(on_a[0]["kind"], "device_problem", "{report}");
    assert!(
        text(&on_a[0]["detail"]).contains("backing file"),
        "{report}"
    );
    if let Some(id) = on_a[0]["operation_id"].as_str() {
        let (_, op) = d.get(&format!("/operations/{id}?wait=30")).await;
        assert_eq!(op["status"], "failed", "{op}");
    }
    // Nor does POST /exports serve it.
    let (s, e) = d.post("/exports", json!({"volume_id": a})).await;
    assert!(!s.is_success(), "POST /exports served A: {e}");
    let (_, e) = d.get(&format!("/exports/{a}")).await;
    assert_ne!(e["status"], "active", "A is served from B's disk: {e}");
    let mut c = d.nbd_session(&att_b).await;
    assert_eq!(
        c.read(0, 4096).await.unwrap(),
        signature(&b.to_string()),
        "B's export still reads B's data"
    );
    drop(c);
    std::fs::remove_file(&link_a).unwrap();
    d.stop().await;
}
