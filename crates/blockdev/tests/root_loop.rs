//! Loop devices on the real kernel (needs root and /dev/loop-control).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use blockdev::loopdev::{self, LoopDevice};
use blockdev::{ioctl, ErrorKind};

const SIZE: u64 = 8 << 20;

/// Serialises this file's tests: a freed loop number is handed out again at once, so one test's check on a
/// device node it just detached would otherwise hit the device another test attached meanwhile.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn require_root() -> std::sync::MutexGuard<'static, ()> {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (loop devices); run it as root or skip tests named root_*"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "this test needs /dev/loop-control (loop module)"
    );
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn backing(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).expect("create backing file");
    f.set_len(size).expect("size backing file");
    p
}

#[test]
fn root_attach_find_detach() {
    let _serial = require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = backing(dir.path(), "a.img", SIZE);
    let dev = LoopDevice::attach(&file, false).expect("attach");
    let path = dev.path().to_path_buf();
    assert!(path.to_string_lossy().starts_with("/dev/loop"));
    let found = loopdev::find_by_backing(&file).expect("find");
    assert_eq!(found, vec![path.clone()]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open loop");
    assert_eq!(ioctl::size(&f).expect("size"), SIZE);
    assert!(!ioctl::read_only(&f).expect("ro"));
    drop(f);
    dev.detach().expect("detach");
    assert!(loopdev::find_by_backing(&file).expect("find").is_empty());
    let e = loopdev::detach_path(&path).expect_err("second detach must fail");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

#[test]
fn root_drop_detaches_and_keep_persists() {
    let _serial = require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = backing(dir.path(), "b.img", SIZE);
    {
        let _dev = LoopDevice::attach(&file, false).expect("attach");
        assert_eq!(loopdev::find_by_backing(&file).expect("find").len(), 1);
    }
    assert!(
        loopdev::find_by_backing(&file).expect("find").is_empty(),
        "drop must detach"
    );
    let kept = LoopDevice::attach(&file, false).expect("attach").keep();
    assert_eq!(
        loopdev::find_by_backing(&file).expect("find"),
        vec![kept.clone()]
    );
    loopdev::detach_path(&kept).expect("detach kept");
    assert!(loopdev::find_by_backing(&file).expect("find").is_empty());
}

#[test]
fn root_read_only_attach() {
    let _serial = require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = backing(dir.path(), "c.img", SIZE);
    let dev = LoopDevice::attach(&file, true).expect("attach");
    let f = File::open(dev.path()).expect("open");
    assert!(ioctl::read_only(&f).expect("ro"));
    // The kernel refuses writes to a read-only device either at open or at write time.
    let refused = match OpenOptions::new().write(true).open(dev.path()) {
        Err(e) => e,
        Ok(mut w) => w
            .write_all(&[1u8; 512])
            .expect_err("write to a read-only loop device must fail"),
    };
    assert!(
        matches!(
            refused.raw_os_error(),
            Some(libc::EROFS | libc::EPERM | libc::EACCES)
        ),
        "unexpected error {refused}"
    );
}

#[test]
fn root_parallel_attach_gets_distinct_devices() {
    let _serial = require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let files: Vec<_> = (0..6)
        .map(|i| backing(dir.path(), &format!("p{i}.img"), SIZE))
        .collect();
    let devs: Vec<LoopDevice> = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .iter()
            .map(|f| s.spawn(move || LoopDevice::attach(f, false)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("thread").expect("attach"))
            .collect()
    });
    let mut paths: Vec<_> = devs.iter().map(|d| d.path().to_path_buf()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 6);
    for (f, d) in files.iter().zip(&devs) {
        assert_eq!(
            loopdev::find_by_backing(f).expect("find"),
            vec![d.path().to_path_buf()]
        );
    }
}

#[test]
fn root_zero_discard_flush_read_back() {
    let _serial = require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = backing(dir.path(), "z.img", SIZE);
    let dev = LoopDevice::attach(&file, false).expect("attach");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.path())
        .expect("open");
    assert_eq!(ioctl::logical_block_size(&f).expect("lbs"), 512);
    assert!(ioctl::physical_block_size(&f).expect("pbs") >= 512);
    let pattern = vec![0xA5u8; 1 << 20];
    f.write_all(&pattern).expect("write");
    f.write_all(&pattern).expect("write");
    ioctl::flush_buffers(&f).expect("flush");
    let mut back = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_exact(&mut back).expect("read");
    assert_eq!(back, pattern);
    // The flushed data reached the backing file.
    let mut raw = vec![0u8; 1 << 20];
    File::open(&file)
        .expect("open file")
        .read_exact(&mut raw)
        .expect("read file");
    assert_eq!(raw, pattern);

    ioctl::zero_out(&f, 4096, 65536).expect("zero out");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_exact(&mut back).expect("read");
    assert!(back[..4096].iter().all(|&b| b == 0xA5));
    assert!(back[4096..4096 + 65536].iter().all(|&b| b == 0));
    assert!(back[4096 + 65536..].iter().all(|&b| b == 0xA5));

    ioctl::discard(&f, 1 << 20, 1 << 20).expect("discard");
    let mut second = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(1 << 20)).expect("seek");
    f.read_exact(&mut second).expect("read");
    assert!(
        second.iter().all(|&b| b == 0),
        "a discarded range of a loop device over a sparse-capable file reads as zeroes"
    );

    let e = ioctl::zero_out(&f, 1, 512).expect_err("unaligned range must be rejected");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}
