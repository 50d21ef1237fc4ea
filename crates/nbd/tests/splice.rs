//! WRITE payloads spliced from a plain TCP socket into a memory-backed file: contents, the buffered
//! prefix of a payload, errors from the file, and the pipe a session holds. A binary of its own, so the
//! process's open pipes are this file's alone.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbd::client::{Client, Handshake};
use nbd::proto::*;
use nbd::{ExportConfig, FileBackend, Registry, Server, ServerConfig};

/// The tests of this binary run one at a time: they count the process's pipes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Pipes this process holds open.
fn open_pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// A sparse file of `len` bytes on tmpfs, removed when dropped.
fn shm_file(len: usize) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .prefix("nbd-splice-")
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
    let (addr, stop, _) = serve_with(path, ServerConfig::default()).await;
    (addr, stop)
}

/// [`serve`] with `cfg`, also returning the registry (for the export's counters).
async fn serve_with(
    path: &Path,
    cfg: ServerConfig,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, Registry) {
    let registry = Registry::new();
    registry
        .add(ExportConfig {
            name: "f".into(),
            backend: Arc::new(FileBackend::open(path, false).unwrap()),
            read_only: false,
            max_connections: None,
            description: None,
            access: nbd::Access::Anyone,
        })
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::new(registry.clone(), cfg).serve(listener, async move {
            let _ = rx.await;
        }),
    );
    (addr, tx, registry)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_over_tcp_are_spliced_and_land_exactly() {
    let _serial = SERIAL.lock().await;
    let file = shm_file(32 * MIB);
    let (addr, stop) = serve(file.path()).await;
    let pipes_before = open_pipes();
    let mut c = open(addr).await;

    // Sizes on both sides of the splicing threshold, sent back to back before any reply is read, so the
    // server's read buffer holds headers and the first bytes of payloads that are then spliced. Two are
    // FUA (never spliced), one starts at an odd offset.
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
    assert!(
        open_pipes() >= pipes_before + 2,
        "the session holds a pipe for splicing ({} open, {pipes_before} before)",
        open_pipes()
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
    eventually("the session's pipe to be closed", || {
        open_pipes() == pipes_before
    })
    .await;
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

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_full_file_system_fails_a_spliced_write_with_enospc_and_the_session_goes_on() {
    let _serial = SERIAL.lock().await;
    // A 16 MiB sparse file on a 2 MiB file system: the first 2 MiB of a write fit, the rest does not.
    let fs = SmallTmpfs::mount(2 * MIB);
    let path = fs.dir.path().join("disk");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 * MIB as u64)
        .unwrap();
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
async fn clients_that_vanish_or_stall_mid_spliced_payload_are_closed_and_others_go_on() {
    let _serial = SERIAL.lock().await;
    let file = shm_file(8 * MIB);
    let cfg = ServerConfig {
        send_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let (addr, stop, registry) = serve_with(file.path(), cfg).await;
    let pipes_before = open_pipes();
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
    // One client's session is splicing (its first large write landed) when it vanishes mid-payload.
    let mut gone = open(addr).await;
    gone.write(0, &pattern(256 * 1024, 1), 0).await.unwrap();
    gone.send_raw(&hdr(MIB as u64)).await.unwrap();
    gone.send_raw(&pattern(300_000, 2)).await.unwrap();
    drop(gone);
    // Another stops sending in the middle of a payload and stays connected.
    let mut stalled = open(addr).await;
    stalled.send_raw(&hdr(2 * MIB as u64)).await.unwrap();
    stalled.send_raw(&pattern(100_000, 3)).await.unwrap();
    eventually("both sessions closed by the server", || {
        registry.get("f").unwrap().counters.connections_current == 0
    })
    .await;
    assert_eq!(
        open_pipes(),
        pipes_before,
        "the sessions' pipes were closed"
    );
    // A new client is served, and its write lands whole over what the others left.
    let mut c = open(addr).await;
    let data = pattern(MIB, 4);
    c.write(2 * MIB as u64, &data, 0).await.unwrap();
    assert_eq!(c.read(2 * MIB as u64, MIB as u32).await.unwrap(), data);
    c.disconnect().await.unwrap();
    drop(stalled);
    stop.send(()).unwrap();
}
