//! Resolution, waits and preflight against real loop devices (needs root).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockdev::loopdev::{self, LoopDevice};
use blockdev::sysfs::{self, SysRoot};
use blockdev::{preflight, serial_for_volume, ErrorKind, Resolver};
use uuid::Uuid;

const SIZE: u64 = 16 << 20;

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (loop devices); run it as root or skip tests named root_*"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "this test needs /dev/loop-control (loop module)"
    );
}

/// A backing file of `size` bytes named for `vol`, as the simulator names them: a loop device is a volume's
/// only when its backing file is named for it.
fn backing(dir: &Path, size: u64, vol: &Uuid) -> PathBuf {
    let p = dir.join(format!("{vol}.img"));
    File::create(&p)
        .expect("create")
        .set_len(size)
        .expect("size");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_wait_for_returns_soon_after_the_link_appears() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let by_id = dir.path().join("by-id");
    std::fs::create_dir(&by_id).expect("mkdir");
    let vol = Uuid::new_v4();
    let file = backing(dir.path(), SIZE, &vol);
    let dev = LoopDevice::attach(&file, false).expect("attach");
    let link = by_id.join(format!("virtio-{}", serial_for_volume(&vol)));

    // A long rescan interval: only an event can end the wait quickly.
    let resolver =
        Resolver::new(SysRoot::system(), by_id.clone()).rescan_interval(Duration::from_secs(30));
    let target = dev.path().to_path_buf();
    let maker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::os::unix::fs::symlink(&target, &link).expect("link");
        Instant::now()
    });
    let (found, took) = resolver
        .wait_for(&vol, SIZE, Duration::from_secs(20))
        .await
        .expect("wait_for");
    let returned = Instant::now();
    let made = maker.await.expect("maker");
    let latency = returned.duration_since(made);
    println!("wait_for: link appeared -> device returned in {latency:?} (whole wait {took:?})");
    assert!(latency < Duration::from_secs(1), "latency {latency:?}");
    assert_eq!(found.dev_path, dev.path());
    assert_eq!(found.size, SIZE);
    let name = found.kernel_name.clone().expect("kernel name");
    let info = sysfs::device(&SysRoot::system(), &name)
        .expect("sysfs")
        .expect("present");
    assert_eq!(Some((info.major, info.minor)), found.major_minor);
    assert_eq!(
        info.backing_file.as_deref(),
        Some(std::fs::canonicalize(&file).expect("canon").as_path())
    );

    // the cloud's size must match
    let e = resolver.resolve(&vol, SIZE * 2).expect_err("wrong size");
    assert_eq!(e.kind(), ErrorKind::Mismatch);

    // detach + unlink: wait_gone sees it
    let link = found.by_id_path.clone();
    let gone = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        dev.detach().expect("detach");
        std::fs::remove_file(&link).expect("unlink");
        Instant::now()
    });
    let waited = resolver
        .wait_gone(&vol, &found, Duration::from_secs(20))
        .await
        .expect("wait_gone");
    let after = gone.await.expect("remover").elapsed();
    println!("wait_gone: took {waited:?}, {after:?} after detach+unlink");
    assert!(after < Duration::from_secs(1));
    assert_eq!(resolver.lookup(&vol).expect("lookup"), None);
    assert!(loopdev::find_by_backing(&file).expect("find").is_empty());
}

#[tokio::test]
async fn root_wait_for_sees_a_link_made_before_the_wait() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = Uuid::new_v4();
    let file = backing(dir.path(), SIZE, &vol);
    let dev = LoopDevice::attach(&file, false).expect("attach");
    std::os::unix::fs::symlink(
        dev.path(),
        dir.path()
            .join(format!("virtio-{}", serial_for_volume(&vol))),
    )
    .expect("link");
    let r = Resolver::new(SysRoot::system(), dir.path().to_path_buf());
    let (d, took) = r
        .wait_for(&vol, SIZE, Duration::from_secs(5))
        .await
        .expect("wait");
    assert_eq!(d.dev_path, dev.path());
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[test]
fn root_preflight_passes() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = backing(dir.path(), SIZE, &Uuid::new_v4());
    let dev = LoopDevice::attach(&file, false).expect("attach");
    let report = preflight::run(dir.path(), &dir.path().join("names"), Some(dev.path()));
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.checks.len(), 5);
}
