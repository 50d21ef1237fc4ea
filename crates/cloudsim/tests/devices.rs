//! Appliance attachments backed by real loop devices (root), and the `cloudsim` binary.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Harness;

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (loop devices); run it as root or skip it with `--skip root_`"
    );
    assert!(
        std::path::Path::new("/dev/loop-control").exists(),
        "this test needs /dev/loop-control (the loop driver)"
    );
}

#[tokio::test]
async fn root_appliance_attach_makes_a_loop_device_and_link() {
    require_root();
    let h = Harness::start_with(|c| c.use_loop_devices = true).await;
    let appliance = h.sim.appliance_vm_id().to_owned();
    let id = h.create_volume("loop", 1).await;
    let backing = h.backing_of(&id);
    let job = h.attach(&id, &appliance, None).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    let link = h.link_of(&id);
    let dev = std::fs::read_link(&link).expect("by-id link");
    let guard = LoopGuard(dev.clone());
    assert!(
        dev.to_string_lossy().starts_with("/dev/loop"),
        "{}",
        dev.display()
    );
    assert!(std::fs::metadata(&dev)
        .expect("device node")
        .file_type()
        .is_block_device());
    let found = blockdev::loopdev::find_by_backing(&backing).expect("find_by_backing");
    assert_eq!(found, vec![dev.clone()]);

    // A restart finds the same loop device again instead of making another.
    let Harness { dir, sim, http } = h;
    sim.shutdown().await;
    let mut cfg = common::config(&dir);
    cfg.use_loop_devices = true;
    let sim = cloudsim::Simulator::start(cfg).await.expect("restart");
    let h = Harness { dir, sim, http };
    assert_eq!(std::fs::read_link(&link).expect("link after restart"), dev);
    assert_eq!(
        blockdev::loopdev::find_by_backing(&backing).expect("find"),
        vec![dev.clone()]
    );

    let job = h.detach(&id).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert!(std::fs::symlink_metadata(&link).is_err(), "link removed");
    assert!(
        blockdev::loopdev::find_by_backing(&backing)
            .expect("find")
            .is_empty(),
        "loop device detached"
    );
    drop(guard);
    h.sim.detach_all_devices();
    h.sim.shutdown().await;
}

/// A volume's loop device detached behind the simulator's back, and its number since given to another
/// file: detaching the volume leaves that other disk alone (CloudStack removes its own disk from the VM,
/// never another).
#[tokio::test]
async fn root_a_detach_leaves_alone_a_loop_device_that_since_backs_another_file() {
    require_root();
    let h = Harness::start_with(|c| c.use_loop_devices = true).await;
    let appliance = h.sim.appliance_vm_id().to_owned();
    let id = h.create_volume("renumbered", 1).await;
    let job = h.attach(&id, &appliance, None).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    let dev = std::fs::read_link(h.link_of(&id)).expect("by-id link");
    blockdev::loopdev::detach_path(&dev).expect("detach behind the simulator's back");
    // The same number, now over another file.
    let other = tempfile::NamedTempFile::new().expect("temp file");
    other.as_file().set_len(1 << 20).expect("size");
    let mut attached = false;
    for _ in 0..50 {
        let st = Command::new("losetup")
            .arg(&dev)
            .arg(other.path())
            .status()
            .expect("run losetup");
        if st.success() {
            attached = true;
            break;
        }
        // The kernel finishes a detach asynchronously.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(attached, "losetup {} over another file", dev.display());
    let guard = LoopGuard(dev.clone());

    let job = h.detach(&id).await;
    assert_eq!(job["jobstatus"], 1, "{job}");
    assert_eq!(
        blockdev::loopdev::find_by_backing(other.path()).expect("find"),
        vec![dev.clone()],
        "the other file's loop device is still there"
    );
    let autoclear = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/autoclear",
        dev.file_name().unwrap().to_string_lossy()
    ))
    .expect("autoclear");
    assert_eq!(autoclear.trim(), "0", "and not set to vanish");
    drop(guard);
    h.sim.detach_all_devices();
    h.sim.shutdown().await;
}

/// Detaches the loop device if the test fails half-way.
struct LoopGuard(std::path::PathBuf);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = blockdev::loopdev::detach_path(&self.0);
    }
}

#[test]
fn binary_prints_its_address_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudsim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            common::KEY,
            "--secret-key",
            common::SECRET,
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--by-id-dir")
        .arg(dir.path().join("by-id"))
        .args(["--job-delay-ms", "10", "--seed", "3", "--no-loop-devices"])
        .args([
            "--fault",
            r#"{"type":"fail_command","command":"listZones","errorcode":534}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cloudsim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_owned();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/client/api");
        let p = common::signed(
            common::KEY,
            common::SECRET,
            "listZones",
            &[],
            Some(common::future_expiry()),
        );
        let first = http
            .get(format!("{url}?{}", common::encode(&p)))
            .send()
            .await
            .expect("request");
        assert_eq!(first.status(), 534, "the --fault given at start applies");
        let second = http
            .get(format!("{url}?{}", common::encode(&p)))
            .send()
            .await
            .expect("request");
        assert_eq!(second.status(), 200);
        let body: serde_json::Value = second.json().await.expect("json");
        assert_eq!(body["listzonesresponse"]["count"], 1);
    });
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cloudsim did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(dir.path().join("state/state.json").exists());
}
