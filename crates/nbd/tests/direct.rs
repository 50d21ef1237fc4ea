//! Payloads moved by the kernel between a plain TCP socket and a mapped memory-backed file: WRITE data
//! received into the mapping (contents, the buffered prefix of a payload, errors from the file, clients
//! that leave mid-payload), READ replies sent from it only while the file has no holes, and a file
//! shrunk under the server.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nbd::client::{Client, Handshake};
use nbd::proto::*;
use nbd::{Registry, ServerConfig};

use common::eventually;

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// KiB of `path` resident in this process's mappings of it: pages the kernel mapped for I/O through the
/// server's mapping. `None` when the file is not mapped.
fn mapped_rss_kib(path: &Path) -> Option<u64> {
    common::smaps::mapped_rss_kib(std::process::id(), path)
}

/// A sparse file of `len` bytes on tmpfs, removed when dropped.
fn shm_file(len: usize) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix("nbd-direct-")
        .tempfile_in("/dev/shm")
        .unwrap();
    file.as_file().set_len(len as u64).unwrap();
    file
}

/// A client in transmission on the export `serve` makes.
async fn open(addr: SocketAddr) -> Client {
    Handshake::connect(addr)
        .await
        .unwrap()
        .go("f")
        .await
        .unwrap()
}

/// Serves `path` as export "f" on a fresh listener; returns its address and the server's stop handle.
async fn serve(path: &Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (addr, stop, _) = serve_with(path, ServerConfig::default(), false).await;
    (addr, stop)
}

/// [`serve`] with `cfg`, read-only or not, also returning the registry (for the export's counters).
async fn serve_with(
    path: &Path,
    cfg: ServerConfig,
    read_only: bool,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, Registry) {
    let s = common::serve_file(path, cfg, read_only).await;
    (s.addr, s.stop, s.registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_over_tcp_are_received_into_the_mapping_and_land_exactly() {
    let file = shm_file(32 * MIB);
    let (addr, stop) = serve(file.path()).await;
    assert_eq!(
        mapped_rss_kib(file.path()),
        Some(0),
        "the server maps the file, and nothing is resident yet"
    );
    let mut c = open(addr).await;

    // Sizes on both sides of the 64 KiB threshold, sent back to back before any reply is read, so the
    // server's read buffer holds headers and the first bytes of payloads that are then received into
    // the mapping. Two are FUA (written from a buffer), one starts at an odd offset.
    let writes: Vec<(u64, usize, u16)> = vec![
        (0, 4096, 0),
        (4096, 65536, 0),
        (MIB as u64, MIB, 0),
        (2 * MIB as u64 + 1, 3000, 0),
        (3 * MIB as u64 + 7, 2 * MIB + 123, 0),
        (6 * MIB as u64, 4 * MIB, 0),
        (11 * MIB as u64, 65537, CMD_FLAG_FUA),
        (12 * MIB as u64, 512, 0),
        (13 * MIB as u64, 8 * MIB, 0),
        (22 * MIB as u64, MIB, CMD_FLAG_FUA),
        (24 * MIB as u64 - 3, 65536, 0),
    ];
    let mut expected = vec![0u8; 32 * MIB];
    for (i, &(off, len, flags)) in writes.iter().enumerate() {
        let data = pattern(len, i as u8 + 1);
        expected[off as usize..off as usize + len].copy_from_slice(&data);
        c.send(CMD_WRITE, flags, off, len as u32, &data)
            .await
            .unwrap();
    }
    for _ in &writes {
        let r = c.recv().await.unwrap();
        assert_eq!(r.error, 0, "write {} failed", r.cookie);
    }
    let resident = mapped_rss_kib(file.path()).unwrap();
    assert!(
        resident >= 8 * 1024,
        "the large payloads went through the mapping ({resident} KiB resident in it)"
    );
    assert!(
        std::fs::read(file.path()).unwrap() == expected,
        "the file has exactly what was written"
    );
    // And the same through the server, in pieces.
    for off in (0..32 * MIB).step_by(4 * MIB) {
        let got = c.read(off as u64, 4 * MIB as u32).await.unwrap();
        assert!(got == expected[off..off + 4 * MIB], "read back at {off}");
    }
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();
}

/// A tmpfs of `size` bytes mounted on a fresh directory, unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let target = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        let opts = std::ffi::CString::new(format!("size={size}")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount a tmpfs: {}", std::io::Error::last_os_error());
        SmallTmpfs { dir }
    }
}

impl SmallTmpfs {
    /// A sparse file of `len` bytes on it.
    fn sparse_file(&self, len: usize) -> std::path::PathBuf {
        let path = self.dir.path().join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(len as u64)
            .unwrap();
        path
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_full_file_system_fails_a_large_write_with_enospc_and_the_session_goes_on() {
    // A 16 MiB sparse file on a 2 MiB file system: the first 2 MiB of a write fit, the rest does not.
    let fs = SmallTmpfs::mount(2 * MIB);
    let path = fs.sparse_file(16 * MIB);
    let (addr, stop) = serve(&path).await;
    let mut c = open(addr).await;
    let big = pattern(4 * MIB, 9);
    let err = c.write(4 * MIB as u64, &big, 0).await.unwrap_err();
    assert_eq!(err.remote_code(), Some(ENOSPC), "{err}");
    // The whole payload was consumed: the next requests are read in step and answered. (The file system
    // is full, so only pages the failed write allocated can be written.)
    let small = pattern(4096, 3);
    c.write(4 * MIB as u64, &small, 0).await.unwrap();
    assert_eq!(c.read(4 * MIB as u64, 4096).await.unwrap(), small);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4 * MIB..4 * MIB + 4096], &small[..]);
    assert_eq!(
        &on_disk[4 * MIB + 4096..5 * MIB],
        &big[4096..MIB],
        "what fit of the failed write is there"
    );
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_or_stall_mid_payload_are_closed_and_others_go_on() {
    let file = shm_file(8 * MIB);
    let cfg = ServerConfig {
        send_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let (addr, stop, registry) = serve_with(file.path(), cfg, false).await;
    let hdr = |offset: u64| {
        Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: 7,
            offset,
            length: MIB as u32,
        }
        .encode()
    };
    // One client's session received a large write into the mapping when it vanishes mid-payload.
    let mut gone = open(addr).await;
    gone.write(0, &pattern(256 * 1024, 1), 0).await.unwrap();
    gone.send_raw(&hdr(MIB as u64)).await.unwrap();
    gone.send_raw(&pattern(300_000, 2)).await.unwrap();
    drop(gone);
    // Another stops sending in the middle of a payload and stays connected.
    let mut stalled = open(addr).await;
    stalled.send_raw(&hdr(2 * MIB as u64)).await.unwrap();
    stalled.send_raw(&pattern(100_000, 3)).await.unwrap();
    eventually(
        "both sessions closed by the server (connections)",
        || registry.get("f").unwrap().counters.connections_current,
        |&n| n == 0,
    )
    .await;
    // A new client is served, and its write lands whole over what the others left.
    let mut c = open(addr).await;
    let data = pattern(MIB, 4);
    c.write(2 * MIB as u64, &data, 0).await.unwrap();
    assert_eq!(c.read(2 * MIB as u64, MIB as u32).await.unwrap(), data);
    c.disconnect().await.unwrap();
    drop(stalled);
    stop.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_write_allocates_pages_only_as_its_payload_arrives() {
    // Four clients each announce a 32 MiB WRITE into a sparse file and send 100 KB of it. tmpfs
    // allocates pages where the server maps them for the payload; mapping the whole announced range
    // at the header allocated 128 MiB of file for 400 KB sent.
    let file = shm_file(256 * MIB);
    let (addr, stop) = serve(file.path()).await;
    let mut clients = Vec::new();
    for i in 0..4u64 {
        let mut c = open(addr).await;
        let hdr = Request {
            flags: 0,
            command: CMD_WRITE,
            cookie: i,
            offset: i * 64 * MIB as u64,
            length: 32 * MIB as u32,
        };
        c.send_raw(&hdr.encode()).await.unwrap();
        c.send_raw(&pattern(100_000, i as u8)).await.unwrap();
        clients.push(c);
    }
    eventually(
        "the 400 KB sent are in the file (512-byte blocks allocated)",
        || blocks(file.path()),
        |&b| b * 512 >= 400_000,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let allocated = blocks(file.path()) * 512;
    assert!(
        allocated <= 4 * (MIB as u64 + 128 * 1024),
        "{allocated} bytes allocated for 400 KB of payload"
    );
    drop(clients);
    // A payload that spans several steps still lands whole.
    let mut c = open(addr).await;
    let data = pattern(5 * MIB + 4321, 9);
    c.write(3, &data, 0).await.unwrap();
    assert_eq!(c.read(3, data.len() as u32).await.unwrap(), data);
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();
}

/// `len` bytes of `pattern` in a file on tmpfs: every page allocated.
fn dense_shm_file(len: usize, seed: u8) -> (tempfile::NamedTempFile, Vec<u8>) {
    let file = shm_file(0);
    let data = pattern(len, seed);
    std::fs::write(file.path(), &data).unwrap();
    (file, data)
}

fn blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_sent_from_the_mapping_only_when_the_file_has_no_holes() {
    // A sparse file: reading it through a mapping would allocate every page it touched.
    let sparse = shm_file(16 * MIB);
    let (addr, stop, _) = serve_with(sparse.path(), ServerConfig::default(), true).await;
    let mut c = open(addr).await;
    for off in (0..16 * MIB).step_by(MIB) {
        let got = c.read(off as u64, MIB as u32).await.unwrap();
        assert!(got.iter().all(|&b| b == 0), "zeros at {off}");
    }
    assert_eq!(
        blocks(sparse.path()),
        0,
        "reading the holes allocated nothing"
    );
    assert_eq!(
        mapped_rss_kib(sparse.path()),
        Some(0),
        "nothing was read through the mapping"
    );
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();

    // A file without holes is read through the mapping, pipelined and at odd offsets.
    let (dense, data) = dense_shm_file(16 * MIB, 5);
    let (addr, stop, _) = serve_with(dense.path(), ServerConfig::default(), true).await;
    let mut c = open(addr).await;
    let reads: Vec<(usize, usize)> = (0..40)
        .map(|i| ((i * 397_121) % (15 * MIB), 1 + (i * 65_537) % MIB))
        .collect();
    let mut sent = std::collections::HashMap::new();
    for &(off, len) in &reads {
        let cookie = c
            .send(CMD_READ, 0, off as u64, len as u32, &[])
            .await
            .unwrap();
        sent.insert(cookie, (off, len));
    }
    for _ in &reads {
        let r = c.recv().await.unwrap();
        let (off, len) = sent[&r.cookie];
        assert_eq!(r.error, 0, "read at {off}");
        assert!(r.data == data[off..off + len], "read at {off}, {len} bytes");
    }
    let resident = mapped_rss_kib(dense.path()).unwrap();
    assert!(
        resident > 0,
        "the replies came from the mapping ({resident} KiB resident)"
    );
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();
}

/// Blocks reserved past a file's end (`fallocate` with `KEEP_SIZE`) count in `st_blocks` as much as its
/// pages do: a file with a hole and as much reserved past its end must still be seen to have the hole,
/// reported as one and read without allocating it (nor closing the session when the file system is full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_beside_blocks_reserved_past_the_end_is_reported_and_read_without_allocating_it() {
    use rustix::fs::{fallocate, FallocateFlags};
    let (file, mut data) = dense_shm_file(16 * MIB, 9);
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    fallocate(file.as_file(), punch, 4 * MIB as u64, MIB as u64).unwrap();
    data[4 * MIB..5 * MIB].fill(0);
    fallocate(
        file.as_file(),
        FallocateFlags::KEEP_SIZE,
        16 * MIB as u64,
        2 * MIB as u64,
    )
    .unwrap();
    let before = blocks(file.path());
    for read_only in [true, false] {
        let (addr, stop, _) = serve_with(file.path(), ServerConfig::default(), read_only).await;
        let mut hs = Handshake::connect(addr).await.unwrap();
        hs.structured_replies().await.unwrap();
        hs.set_meta_context("f", &[META_BASE_ALLOCATION])
            .await
            .unwrap();
        let mut c = hs.go("f").await.unwrap();
        let ext = c
            .block_status(3 * MIB as u64, 3 * MIB as u32, 0)
            .await
            .unwrap();
        let m = MIB as u32;
        assert_eq!(
            ext,
            [(m, 0), (m, STATE_HOLE | STATE_ZERO), (m, 0)],
            "read_only {read_only}"
        );
        let got = c.read(3 * MIB as u64, 3 * MIB as u32).await.unwrap();
        assert!(got == data[3 * MIB..6 * MIB], "read_only {read_only}");
        assert_eq!(blocks(file.path()), before, "reading the hole allocated it");
        c.disconnect().await.unwrap();
        stop.send(()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_shrunk_under_mapped_reads_closes_only_that_session_and_later_reads_get_zeros() {
    let (file, data) = dense_shm_file(8 * MIB, 7);
    let (addr, stop, _) = serve_with(file.path(), ServerConfig::default(), true).await;
    let mut c = open(addr).await;
    assert!(c.read(4 * MIB as u64, MIB as u32).await.unwrap() == data[4 * MIB..5 * MIB]);
    // Another process shrinks the file: the pages past its end no longer exist. Had the server touched
    // them itself, SIGBUS would end this test's process.
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.path())
        .unwrap()
        .set_len(0)
        .unwrap();
    match c.read(4 * MIB as u64, MIB as u32).await {
        // Sent from the mapping: the kernel fails the send, and the server closes the session rather
        // than answer with data it does not have.
        Err(e) => {
            assert!(e.remote_code().is_none(), "the session was closed: {e}");
            println!("the mapped read of a shrunk file closed the session");
        }
        // Read with pread (the server had already seen the file shrink): zeros.
        Ok(got) => {
            assert!(
                got.iter().all(|&b| b == 0),
                "what was cut off reads as zeros"
            );
            println!("the server had seen the file shrink and read zeros");
        }
    }
    // Once the server has looked at the file again (at least every second), reads are served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut d = open(addr).await;
    let got = d.read(4 * MIB as u64, MIB as u32).await.unwrap();
    assert!(
        got.iter().all(|&b| b == 0),
        "what was cut off reads as zeros"
    );
    d.disconnect().await.unwrap();
    stop.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_resident_through_the_mapping_stay_bounded_while_a_large_file_is_read_and_written() {
    let (file, data) = dense_shm_file(96 * MIB, 11);
    let (addr, stop) = serve(file.path()).await;
    let mut c = open(addr).await;
    let mut peak = 0;
    for off in (0..96 * MIB).step_by(MIB) {
        let got = c.read(off as u64, MIB as u32).await.unwrap();
        assert!(got == data[off..off + MIB], "read at {off}");
        peak = peak.max(mapped_rss_kib(file.path()).unwrap());
    }
    let fresh = pattern(MIB, 12);
    for off in (0..96 * MIB).step_by(MIB) {
        c.write(off as u64, &fresh, 0).await.unwrap();
        peak = peak.max(mapped_rss_kib(file.path()).unwrap());
    }
    println!("peak resident through the mapping: {peak} KiB");
    assert!(
        peak >= 8 * 1024,
        "the I/O went through the mapping ({peak} KiB)"
    );
    // Dropped every 32 MiB moved; a request or two more may be mapped when the drop comes.
    assert!(
        peak <= 36 * 1024,
        "resident through the mapping: {peak} KiB"
    );
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();
}

/// A write-back that fails loses writes the server acknowledged, and the kernel says so once per open
/// file: the first flush to see it fails, and so must every later one (a client's FLUSH, the export's
/// flush for a snapshot or a detach), or a writer that never flushed (its session flushes as it leaves)
/// would have its loss reported to no one. Here a loop device over a sparse file on a 2 MiB tmpfs takes 6
/// MiB of writes into its page cache; writing them back to the file fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_lost_write_back_fails_every_later_flush_of_the_export() {
    let fs = SmallTmpfs::mount(2 * MIB);
    let path = fs.sparse_file(16 * MIB);
    let lo = blockdev::LoopDevice::attach(&path, false).unwrap();
    let (addr, stop, registry) = serve_with(lo.path(), ServerConfig::default(), false).await;
    // A writer that never flushes: its session's flush as it leaves meets the failure (and logs it).
    let mut writer = open(addr).await;
    writer.write(0, &pattern(6 * MIB, 5), 0).await.unwrap();
    writer.disconnect().await.unwrap();
    eventually(
        "the writer's session ended",
        || registry.get("f").unwrap().counters.connections_current,
        |&n| n == 0,
    )
    .await;
    // Give the session's closing flush time to run before looking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = registry.flush("f").await.unwrap_err();
    assert!(
        err.to_string().contains("write-back") || format!("{err:?}").contains("write-back"),
        "{err:?}"
    );
    // A later client's FLUSH fails too, though it wrote nothing itself.
    let mut c = open(addr).await;
    let e = c.flush().await.unwrap_err();
    assert_eq!(e.remote_code(), Some(EIO), "{e}");
    c.disconnect().await.unwrap();
    stop.send(()).unwrap();
    drop(registry);
    lo.detach().unwrap();
}
