//! Model-based property test of the data path: random sequences of WRITE (with and without FUA),
//! WRITE_ZEROES (NO_HOLE, FAST_ZERO), TRIM, READ, FLUSH, CACHE and BLOCK_STATUS, alone or pipelined over 1-3
//! connections, at unaligned offsets and lengths around 4 KiB / 64 KiB / 1 MiB / 4 MiB and the export's end,
//! checked against an in-memory model of the export: files on tmpfs (dense, sparse, read-only) and ext4,
//! and (`root_`) loop devices with 512- and 4096-byte sectors, one without write-zeroes or discard, and
//! (`root_ext_`) one whose write-zeroes command is claimed but always fails (a file nbdfuse presents);
//! over TCP, and (the buffered session) over Unix socket pairs and TLS.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

mod common;

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nbd::client::{Client, Handshake, Reply};
use nbd::proto::*;
use nbd::ServerConfig;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Bytes of random data payloads are cut from (any offset, up to the largest WRITE).
const NOISE: usize = 8 << 20;
/// Pipelined requests whose ranges touch the same page of this size are not sent together: their order
/// is unspecified, and the model cannot tell what they should leave.
const PAGE: u64 = 4096;

// ---- what a case does ----

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write {
        fua: bool,
        seed: u32,
    },
    Zero {
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
    Trim {
        fua: bool,
    },
    Read,
    Cache,
    Status {
        req_one: bool,
    },
    Flush,
}

impl Kind {
    fn command(self) -> u16 {
        match self {
            Kind::Write { .. } => CMD_WRITE,
            Kind::Zero { .. } => CMD_WRITE_ZEROES,
            Kind::Trim { .. } => CMD_TRIM,
            Kind::Read => CMD_READ,
            Kind::Cache => CMD_CACHE,
            Kind::Status { .. } => CMD_BLOCK_STATUS,
            Kind::Flush => CMD_FLUSH,
        }
    }

    fn flags(self) -> u16 {
        let f = |on: bool, flag: u16| if on { flag } else { 0 };
        match self {
            Kind::Write { fua, .. } | Kind::Trim { fua } => f(fua, CMD_FLAG_FUA),
            Kind::Zero { no_hole, fast, fua } => {
                f(no_hole, CMD_FLAG_NO_HOLE) | f(fast, CMD_FLAG_FAST_ZERO) | f(fua, CMD_FLAG_FUA)
            }
            Kind::Status { req_one } => f(req_one, CMD_FLAG_REQ_ONE),
            Kind::Read | Kind::Cache | Kind::Flush => 0,
        }
    }

    fn mutates(self) -> bool {
        matches!(
            self,
            Kind::Write { .. } | Kind::Zero { .. } | Kind::Trim { .. }
        )
    }
}

/// A length, resolved against the export's size.
#[derive(Debug, Clone, Copy)]
enum Len {
    Small(u32),
    /// `k * unit + delta` (at least 1).
    Near {
        unit: u64,
        k: u64,
        delta: i64,
    },
    Large(u32),
    Zero,
}

/// Where a request starts, resolved against its length and the export's size.
#[derive(Debug, Clone, Copy)]
enum Place {
    Anywhere(u64),
    /// `k * unit + delta`, moved back so that the request ends inside the export.
    Near {
        unit: u64,
        k: u64,
        delta: i64,
    },
    /// Ends exactly at the export's end.
    AtEnd,
    /// Starts `n` bytes after where it would end exactly at the export's end: past it.
    PastEnd(u64),
}

#[derive(Debug, Clone, Copy)]
struct Op {
    conn: usize,
    kind: Kind,
    len: Len,
    place: Place,
}

impl Op {
    /// (offset, length) on an export of `size` bytes.
    fn resolve(&self, size: u64) -> (u64, u32) {
        if matches!(self.kind, Kind::Flush) {
            return (0, 0);
        }
        let len = match self.len {
            Len::Small(n) | Len::Large(n) => u64::from(n),
            Len::Near { unit, k, delta } => (unit * k).saturating_add_signed(delta).max(1),
            Len::Zero => 0,
        };
        let len = len.min(size);
        let last = size - len;
        let off = match self.place {
            Place::Anywhere(r) => r % (last + 1),
            Place::Near { unit, k, delta } => (unit * k).saturating_add_signed(delta).min(last),
            Place::AtEnd => last,
            Place::PastEnd(n) => last + n,
        };
        (off, u32::try_from(len).unwrap())
    }
}

#[derive(Debug, Clone)]
enum Step {
    One(Op),
    /// Sent back to back (on one or several connections) before any reply is read.
    Batch(Vec<Op>),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => (prop::bool::weighted(0.2), any::<u32>())
            .prop_map(|(fua, seed)| Kind::Write { fua, seed }),
        3 => (any::<bool>(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(no_hole, fast, fua)| Kind::Zero { no_hole, fast, fua }),
        2 => prop::bool::weighted(0.2).prop_map(|fua| Kind::Trim { fua }),
        5 => Just(Kind::Read),
        1 => Just(Kind::Cache),
        2 => any::<bool>().prop_map(|req_one| Kind::Status { req_one }),
        1 => Just(Kind::Flush),
    ]
}

fn unit() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(512),
        Just(4 * KIB),
        Just(64 * KIB),
        Just(MIB),
        Just(4 * MIB)
    ]
}

fn delta() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), -3i64..=3, -600i64..=600]
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        3 => (1u32..=600).prop_map(Len::Small),
        5 => (unit(), 1u64..=3, delta()).prop_map(|(unit, k, delta)| Len::Near { unit, k, delta }),
        2 => (64 * 1024u32..=4608 * 1024).prop_map(Len::Large),
        1 => Just(Len::Zero),
    ]
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        4 => any::<u64>().prop_map(Place::Anywhere),
        4 => (unit(), 0u64..=12, delta())
            .prop_map(|(unit, k, delta)| Place::Near { unit, k, delta }),
        2 => Just(Place::AtEnd),
        1 => prop_oneof![1u64..=3, 1u64..=8192].prop_map(Place::PastEnd),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    (0usize..3, kind(), len(), place()).prop_map(|(conn, kind, len, place)| Op {
        conn,
        kind,
        len,
        place,
    })
}

/// 1-3 connections and the steps of a case.
fn case() -> impl Strategy<Value = (usize, Vec<Step>)> {
    let step = prop_oneof![
        3 => op().prop_map(Step::One),
        1 => prop::collection::vec(op(), 2..8).prop_map(Step::Batch),
    ];
    (1usize..=3, prop::collection::vec(step, 10..40))
}

// ---- the model ----

/// What the export must hold: `data` wherever it is known; trimmed ranges are unknown until written again.
struct Model {
    data: Vec<u8>,
    /// Sorted, disjoint, non-adjacent `[start, end)` ranges whose contents are unspecified.
    unknown: Vec<(u64, u64)>,
}

impl Model {
    fn forget(&mut self, s: u64, e: u64) {
        self.know(s, e);
        let i = self.unknown.partition_point(|&(a, _)| a < s);
        self.unknown.insert(i, (s, e));
        // Merge with touching neighbours.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.unknown.len());
        for &(a, b) in &self.unknown {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.unknown = merged;
    }

    fn know(&mut self, s: u64, e: u64) {
        let mut out = Vec::with_capacity(self.unknown.len() + 1);
        for &(a, b) in &self.unknown {
            if b <= s || a >= e {
                out.push((a, b));
                continue;
            }
            if a < s {
                out.push((a, s));
            }
            if b > e {
                out.push((e, b));
            }
        }
        self.unknown = out;
    }

    fn write(&mut self, off: u64, bytes: &[u8]) {
        let s = off as usize;
        self.data[s..s + bytes.len()].copy_from_slice(bytes);
        self.know(off, off + bytes.len() as u64);
    }

    fn zero(&mut self, off: u64, len: u64) {
        self.data[off as usize..(off + len) as usize].fill(0);
        self.know(off, off + len);
    }

    /// Known sub-ranges of `[s, e)`.
    fn known(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = s;
        for &(a, b) in &self.unknown {
            if b <= pos {
                continue;
            }
            if a >= e {
                break;
            }
            if a > pos {
                out.push((pos, a));
            }
            pos = b;
        }
        if pos < e {
            out.push((pos, e));
        }
        out
    }

    /// Checks `got`, read at `off`, against every known byte.
    fn check(&self, off: u64, got: &[u8], what: &str) -> Result<(), String> {
        for (a, b) in self.known(off, off + got.len() as u64) {
            let want = &self.data[a as usize..b as usize];
            let have = &got[(a - off) as usize..(b - off) as usize];
            if want != have {
                let i = want.iter().zip(have).position(|(x, y)| x != y).unwrap();
                let at = a + i as u64;
                let run = want[i..]
                    .iter()
                    .zip(&have[i..])
                    .take_while(|(x, y)| x != y)
                    .count();
                return Err(format!(
                    "{what}: byte {at} (+{run} more differing) is {:#04x}, the model has {:#04x}",
                    have[i], want[i]
                ));
            }
        }
        Ok(())
    }
}

fn noise() -> &'static [u8] {
    static NOISE_BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    NOISE_BYTES.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut v = Vec::with_capacity(NOISE + 8);
        while v.len() < NOISE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(NOISE);
        v
    })
}

/// The payload of a WRITE of `len` bytes with `seed`.
fn payload(seed: u32, len: u32) -> &'static [u8] {
    let start = seed as usize % (NOISE - len as usize + 1);
    &noise()[start..start + len as usize]
}

// ---- the server side ----

/// What serves the export: how the case's backing store is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// A file on /dev/shm, fully written (mapped reads and writes).
    ShmDense,
    /// A sparse file on /dev/shm with a few written islands.
    ShmSparse,
    /// A sparse file with islands on the ext4 (or whatever) file system of /var/tmp.
    VarTmp,
    /// Like [`Store::ShmSparse`] and [`Store::VarTmp`], the case's window starting 3 MiB before 4 GiB
    /// (see [`Store::base`]).
    ShmHigh,
    VarTmpHigh,
    /// A loop device with this logical sector size over a sparse file with islands in /var/tmp.
    Loop(u32),
    /// A loop device over a file on a ramfs, which has no `fallocate`: the device has neither discard
    /// nor write-zeroes.
    LoopRamfs,
    /// A loop device over the file nbdfuse presents of an nbdkit export that can neither trim nor zero:
    /// FUSE has `fallocate`, so the device claims write-zeroes (and discard), and every one fails with
    /// EOPNOTSUPP, as a disk does whose driver offers a command the disk then refuses.
    LoopFuse,
}

impl Store {
    /// The size of the window of the export a case works on (and models), from [`Store::base`] to the
    /// export's end: not a multiple of 512 where the store allows it.
    fn size(self) -> u64 {
        match self {
            Store::Loop(_) | Store::LoopRamfs | Store::LoopFuse => 6 * MIB + 3 * PAGE,
            _ => 6 * MIB + 3 * PAGE + 777,
        }
    }

    /// Where the window starts in the export: requests and the model use offsets in the window, the
    /// wire `base` more. Before it the export is a hole no request touches.
    fn base(self) -> u64 {
        match self {
            Store::ShmHigh | Store::VarTmpHigh => 4096 * MIB - 3 * MIB,
            _ => 0,
        }
    }
}

/// A file system mounted on a fresh directory for a store that needs one: a ramfs, or nbdfuse presenting
/// an nbdkit export as `DIR/disk`. Unmounted on drop (nbdfuse then exits).
struct Mount {
    dir: tempfile::TempDir,
    /// nbdfuse, and the file nbdkit stores the export in.
    fuse: Option<(std::process::Child, tempfile::NamedTempFile)>,
}

impl Mount {
    /// What `store` needs mounted, if anything.
    fn for_store(store: Store) -> Option<Mount> {
        match store {
            Store::LoopRamfs => Some(Mount::ramfs()),
            Store::LoopFuse => Some(Mount::nbdfuse(store.size())),
            _ => None,
        }
    }

    fn fresh_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("nbd-model-mount-")
            .tempdir()
            .unwrap()
    }

    fn ramfs() -> Mount {
        let dir = Mount::fresh_dir();
        let target = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"ramfs".as_ptr(),
                target.as_ptr(),
                c"ramfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount a ramfs: {}", std::io::Error::last_os_error());
        Mount { dir, fuse: None }
    }

    /// nbdfuse over `nbdkit eval` storing `size` bytes in a file on /dev/shm with `dd`. The eval plugin
    /// has no `trim` or `zero` method, so the export can do neither, and nbdfuse refuses every
    /// `fallocate` with EOPNOTSUPP.
    fn nbdfuse(size: u64) -> Mount {
        let store = tempfile::Builder::new()
            .prefix("nbd-model-fuse-")
            .tempfile_in("/dev/shm")
            .unwrap();
        store.as_file().set_len(size).unwrap();
        let path = store.path().to_str().unwrap().to_owned();
        let dir = Mount::fresh_dir();
        let child = std::process::Command::new("nbdfuse")
            .arg(dir.path().join("disk"))
            .args(["--command", "nbdkit", "-s", "--exit-with-parent", "eval"])
            .arg(format!("get_size=echo {size}"))
            .args(["can_write=exit 0", "can_flush=exit 0", "flush=exit 0"])
            .arg(format!(
                "pread=exec dd if={path} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none"
            ))
            .arg(format!(
                "pwrite=exec dd of={path} oflag=seek_bytes conv=notrunc seek=$4 status=none"
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("run nbdfuse (libnbd-bin) and nbdkit");
        let mount = Mount {
            dir,
            fuse: Some((child, store)),
        };
        let disk = mount.dir.path().join("disk");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&disk).map(|m| m.len()).ok() != Some(size) {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not present {} within 20 s",
                disk.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        mount
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
        let flags = if self.fuse.is_some() {
            0
        } else {
            libc::MNT_DETACH
        };
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), flags) };
        if let Some((child, _)) = &mut self.fuse {
            // Unmounted, nbdfuse exits; if it could not be, it is stopped (lazily unmounting what is left).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    // SAFETY: as above.
                    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// `LOOP_SET_BLOCK_SIZE` (`<linux/loop.h>`).
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;

/// The backing store of one case; removes what it made when dropped (loop device first).
struct Backing {
    path: PathBuf,
    initial: Vec<u8>,
    _loop: Option<blockdev::LoopDevice>,
    /// The file made for the case (`None` where a mount presents it).
    _file: Option<tempfile::NamedTempFile>,
}

/// Fills `initial` (and the file) with noise at a few places, leaving the rest a hole.
fn islands(file: &std::fs::File, base: u64, initial: &mut [u8]) {
    let size = initial.len() as u64;
    for (i, &(off, len)) in [(0, 3000), (MIB - 100, 70_000), (3 * MIB + 5, 9000)]
        .iter()
        .enumerate()
    {
        let len = len.min(size - off) as u32;
        let data = payload(i as u32 * 7919, len);
        file.write_all_at(data, base + off).unwrap();
        initial[off as usize..(off + u64::from(len)) as usize].copy_from_slice(data);
    }
}

fn backing(store: Store, mount: Option<&Mount>) -> Backing {
    let size = store.size();
    let mut initial = vec![0u8; size as usize];
    if store == Store::LoopFuse {
        // The one file the mount presents, its whole contents written afresh for the case.
        let path = mount.unwrap().dir.path().join("disk");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        islands(&f, 0, &mut initial);
        f.write_all_at(&initial, 0).unwrap();
        f.sync_all().unwrap();
        let lo = blockdev::LoopDevice::attach(&path, false).unwrap();
        return Backing {
            path: lo.path().to_path_buf(),
            initial,
            _loop: Some(lo),
            _file: None,
        };
    }
    let dir: &Path = match store {
        Store::ShmDense | Store::ShmSparse | Store::ShmHigh => Path::new("/dev/shm"),
        Store::VarTmp | Store::VarTmpHigh | Store::Loop(_) => Path::new("/var/tmp"),
        Store::LoopRamfs | Store::LoopFuse => mount.unwrap().dir.path(),
    };
    let file = tempfile::Builder::new()
        .prefix("nbd-model-")
        .tempfile_in(dir)
        .unwrap();
    match store {
        Store::ShmDense => {
            initial.copy_from_slice(payload(12345, size as u32));
            file.as_file().write_all_at(&initial, 0).unwrap();
        }
        _ => {
            file.as_file().set_len(store.base() + size).unwrap();
            islands(file.as_file(), store.base(), &mut initial);
        }
    }
    file.as_file().sync_all().unwrap();
    let lo = match store {
        Store::Loop(_) | Store::LoopRamfs => {
            let lo = blockdev::LoopDevice::attach(file.path(), false).unwrap();
            if let Store::Loop(sector) = store {
                let dev = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(lo.path())
                    .unwrap();
                // SAFETY: an ioctl on an open loop device taking its argument by value.
                let rc = unsafe {
                    libc::ioctl(
                        dev.as_raw_fd(),
                        LOOP_SET_BLOCK_SIZE as _,
                        libc::c_ulong::from(sector),
                    )
                };
                assert_eq!(
                    rc,
                    0,
                    "LOOP_SET_BLOCK_SIZE {sector}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Some(lo)
        }
        _ => None,
    };
    let path = lo
        .as_ref()
        .map_or_else(|| file.path().to_path_buf(), |l| l.path().to_path_buf());
    Backing {
        path,
        initial,
        _loop: lo,
        _file: Some(file),
    }
}

/// How a case's connections reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// TCP: the session that moves a tmpfs file's payloads through its mapping.
    Tcp,
    /// A Unix socket pair served with `Server::serve_stream`: the buffered session.
    Unix,
    /// TLS over TCP (STARTTLS, which the server requires): the buffered session over rustls.
    Tls,
}

/// What a model run keeps for all its cases: the store's mount, and for TLS the certificates.
struct Run {
    store: Store,
    transport: Transport,
    read_only: bool,
    mount: Option<Mount>,
    pki: Option<common::Pki>,
}

impl Run {
    fn new(store: Store, transport: Transport, read_only: bool) -> Run {
        Run {
            store,
            transport,
            read_only,
            mount: Mount::for_store(store),
            pki: (transport == Transport::Tls).then(common::Pki::new),
        }
    }

    fn server_config(&self) -> ServerConfig {
        let mut cfg = ServerConfig::default();
        if let Some(pki) = &self.pki {
            let settings = nbd::TlsSettings::from_dir(&pki.server_dir(), false).unwrap();
            cfg.tls = nbd::Tls::Require(std::sync::Arc::new(settings));
        }
        cfg
    }
}

/// Where a case's connections go.
struct Endpoint {
    transport: Transport,
    addr: SocketAddr,
    /// Serves the Unix socket pairs (over the TCP server's registry).
    server: std::sync::Arc<nbd::Server>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Endpoint {
    async fn handshake(&self) -> Handshake {
        match self.transport {
            Transport::Tcp => Handshake::connect(self.addr).await.unwrap(),
            Transport::Unix => {
                let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
                let server = std::sync::Arc::clone(&self.server);
                let peer = "127.0.0.1:9".parse().unwrap();
                tokio::spawn(async move { server.serve_stream(theirs, peer).await });
                Handshake::over(ours).await.unwrap()
            }
            Transport::Tls => {
                let s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                let (tls, flags) = common::starttls(s, self.tls.as_ref().unwrap()).await;
                Handshake::resume(tls, flags)
            }
        }
    }

    /// Connection `i` (see [`negotiate`]).
    async fn connect(&self, i: usize) -> Client {
        negotiate(self.handshake().await, i).await
    }
}

/// Connection `i` over TCP.
async fn connect(addr: SocketAddr, i: usize) -> Client {
    negotiate(Handshake::connect(addr).await.unwrap(), i).await
}

/// Connection `i`: structured replies and `base:allocation` on the first two, simple replies on the third.
async fn negotiate(mut h: Handshake, i: usize) -> Client {
    if i < 2 {
        h.structured_replies().await.unwrap();
        h.set_meta_context("f", &[META_BASE_ALLOCATION])
            .await
            .unwrap();
    }
    h.go("f").await.unwrap()
}

// ---- running a case ----

/// One request as sent: what it was and where.
struct Sent {
    op: Op,
    off: u64,
    len: u32,
    cookie: u64,
}

/// The error the server must refuse a request with, if any (README "Requests"). On a read-only export
/// every WRITE_ZEROES gets EPERM, also with FAST_ZERO (not advertised there), as with nbdkit.
fn refusal(op: &Op, off: u64, len: u32, size: u64, c: &Client) -> Option<u32> {
    let in_range = off + u64::from(len) <= size;
    let read_only = c.info.flags & TFLAG_READ_ONLY != 0;
    let fast_ok = c.info.flags & TFLAG_SEND_FAST_ZERO != 0;
    match op.kind {
        Kind::Zero { fast: true, .. } if !fast_ok && !read_only => Some(EINVAL),
        Kind::Read | Kind::Write { .. } if len == 0 => Some(EINVAL),
        k if k.mutates() && read_only => Some(EPERM),
        Kind::Write { .. } | Kind::Zero { .. } if !in_range => Some(ENOSPC),
        Kind::Read | Kind::Trim { .. } | Kind::Cache | Kind::Status { .. } if !in_range => {
            Some(EINVAL)
        }
        Kind::Status { .. } if !c.structured() || len == 0 => Some(EINVAL),
        Kind::Zero { .. } | Kind::Trim { .. } if len == 0 => Some(EINVAL),
        _ => None,
    }
}

/// Sends `op` (in a window of `size` bytes at `base`).
async fn send(c: &mut Client, op: Op, base: u64, size: u64) -> Sent {
    let (off, len) = op.resolve(size);
    let data: &[u8] = match op.kind {
        Kind::Write { seed, .. } => payload(seed, len),
        _ => &[],
    };
    let cookie = c
        .send(op.kind.command(), op.kind.flags(), base + off, len, data)
        .await
        .unwrap();
    Sent {
        op,
        off,
        len,
        cookie,
    }
}

/// Checks a reply against the model as it was before the request, and returns ZERO extents to read back.
/// Applies nothing: see [`apply`].
fn check(
    m: &Model,
    s: &Sent,
    r: &Reply,
    expected_error: Option<u32>,
) -> Result<Vec<(u64, u64)>, String> {
    let what = format!("{:?} at {} len {}", s.op.kind, s.off, s.len);
    if let Some(e) = expected_error {
        if r.error != e {
            return Err(format!("{what}: answered error {}, expected {e}", r.error));
        }
        return Ok(Vec::new());
    }
    match s.op.kind {
        Kind::Zero { fast: true, .. } if r.error == ENOTSUP => {}
        _ if r.error != 0 => return Err(format!("{what}: failed with error {}", r.error)),
        _ => {}
    }
    match s.op.kind {
        Kind::Read => {
            if r.data.len() != s.len as usize {
                return Err(format!("{what}: {} bytes came back", r.data.len()));
            }
            m.check(s.off, &r.data, &what)?;
        }
        Kind::Status { req_one } => {
            let e = &r.extents;
            if e.is_empty() {
                return Err(format!("{what}: no extents"));
            }
            if req_one && e.len() != 1 {
                return Err(format!("{what}: REQ_ONE answered {} extents", e.len()));
            }
            let total: u64 = e.iter().map(|&(l, _)| u64::from(l)).sum();
            if e.iter().any(|&(l, _)| l == 0) || total > u64::from(s.len) {
                return Err(format!("{what}: extents {e:?} do not tile the range"));
            }
            if e.iter().any(|&(_, f)| f & !(STATE_HOLE | STATE_ZERO) != 0) {
                return Err(format!("{what}: unknown extent flags in {e:?}"));
            }
            let mut zeros = Vec::new();
            let mut pos = s.off;
            for &(l, f) in e {
                let end = pos + u64::from(l);
                if f & STATE_ZERO != 0 {
                    for (a, b) in m.known(pos, end) {
                        if let Some(i) = m.data[a as usize..b as usize].iter().position(|&x| x != 0)
                        {
                            return Err(format!(
                                "{what}: extent [{pos}, {end}) is ZERO but the model has {:#04x} at {}",
                                m.data[a as usize + i],
                                a + i as u64
                            ));
                        }
                    }
                    zeros.push((pos, end));
                }
                pos = end;
            }
            return Ok(zeros);
        }
        _ => {}
    }
    Ok(Vec::new())
}

/// What a request that succeeded (or was refused, or failed with an allowed error) leaves in the model.
fn apply(m: &mut Model, s: &Sent, r: &Reply, expected_error: Option<u32>) {
    if expected_error.is_some() || r.error != 0 {
        return;
    }
    let end = s.off + u64::from(s.len);
    match s.op.kind {
        Kind::Write { seed, .. } => m.write(s.off, payload(seed, s.len)),
        Kind::Zero { .. } => m.zero(s.off, u64::from(s.len)),
        Kind::Trim { .. } => m.forget(s.off, end),
        _ => {}
    }
}

/// The byte range a request may touch, widened to whole pages (`None` when it touches nothing).
fn footprint(op: &Op, size: u64) -> Option<(u64, u64)> {
    let (off, len) = op.resolve(size);
    if matches!(op.kind, Kind::Flush | Kind::Cache) || len == 0 {
        return None;
    }
    let end = (off + u64::from(len)).min(size);
    Some((off / PAGE * PAGE, end.div_ceil(PAGE) * PAGE))
}

/// The ops of a batch that may be in flight together: a mutation shares no page with any other request.
fn compatible(ops: &[Op], size: u64) -> Vec<Op> {
    let mut kept: Vec<Op> = Vec::new();
    for op in ops {
        let clash = footprint(op, size).is_some_and(|(a, b)| {
            kept.iter().any(|k| {
                (k.kind.mutates() || op.kind.mutates())
                    && footprint(k, size).is_some_and(|(c, d)| a < d && c < b)
            })
        });
        if !clash {
            kept.push(*op);
        }
    }
    kept
}

/// Reads `[s, e)` of the window at `base` on `c` in pieces; checks it against the model and, with
/// `zeros`, that it is all zeros.
async fn read_check(
    c: &mut Client,
    base: u64,
    m: &Model,
    s: u64,
    e: u64,
    zeros: bool,
    what: &str,
) -> Result<(), String> {
    let mut pos = s;
    while pos < e {
        let n = (e - pos).min(4 * MIB) as u32;
        let got = c
            .read(base + pos, n)
            .await
            .map_err(|err| format!("{what}: read at {pos}: {err}"))?;
        m.check(pos, &got, what)?;
        if zeros {
            if let Some(i) = got.iter().position(|&x| x != 0) {
                return Err(format!(
                    "{what}: byte {} is {:#04x}, not zero",
                    pos + i as u64,
                    got[i]
                ));
            }
        }
        pos += u64::from(n);
    }
    Ok(())
}

async fn run_case(run: &Run, conns: usize, steps: &[Step]) -> Result<(), String> {
    let (store, read_only) = (run.store, run.read_only);
    let b = backing(store, run.mount.as_ref());
    let size = store.size();
    let base = store.base();
    let cfg = run.server_config();
    let common::FileServer {
        addr,
        stop,
        task,
        registry,
    } = common::serve_file(&b.path, cfg.clone(), read_only).await;
    let endpoint = Endpoint {
        transport: run.transport,
        addr,
        server: std::sync::Arc::new(nbd::Server::new(registry, cfg)),
        tls: run
            .pki
            .as_ref()
            .map(|p| common::tls_connector(&p.server_dir())),
    };
    let mut cs = Vec::new();
    for i in 0..conns {
        cs.push(endpoint.connect(i).await);
    }
    for c in &cs {
        assert_eq!(c.size(), base + size);
        assert_ne!(c.info.flags & TFLAG_CAN_MULTI_CONN, 0);
    }
    let mut m = Model {
        data: b.initial.clone(),
        unknown: Vec::new(),
    };
    let result = async {
        for (n, step) in steps.iter().enumerate() {
            let ops = match step {
                Step::One(op) => vec![*op],
                Step::Batch(ops) => compatible(ops, size),
            };
            let mut sent: Vec<Vec<Sent>> = (0..conns).map(|_| Vec::new()).collect();
            for op in &ops {
                let i = op.conn % conns;
                let s = send(&mut cs[i], *op, base, size).await;
                sent[i].push(s);
            }
            let mut done: Vec<(Sent, Reply, Option<u32>)> = Vec::new();
            for (i, list) in sent.into_iter().enumerate() {
                let mut replies = Vec::new();
                for _ in 0..list.len() {
                    // A reply that never comes (a session that stalls) fails the case.
                    let r = tokio::time::timeout(std::time::Duration::from_secs(60), cs[i].recv())
                        .await
                        .map_err(|_| format!("step {n}: no reply within 60 s"))?;
                    replies.push(r.map_err(|e| format!("step {n}: {e}"))?);
                }
                for s in list {
                    let r = replies
                        .iter()
                        .position(|r| r.cookie == s.cookie)
                        .map(|j| replies.swap_remove(j))
                        .ok_or_else(|| format!("step {n}: no reply to cookie {}", s.cookie))?;
                    let expected = refusal(&s.op, s.off, s.len, size, &cs[i]);
                    done.push((s, r, expected));
                }
            }
            if std::env::var_os("NBD_MODEL_TRACE").is_some() {
                for (s, r, e) in &done {
                    eprintln!(
                        "step {n} conn {}: {:?} at {} len {} -> error {} (expected {e:?}) extents {:?}",
                        s.op.conn % conns,
                        s.op.kind,
                        s.off,
                        s.len,
                        r.error,
                        r.extents
                    );
                }
            }
            let mut zeros = Vec::new();
            for (s, r, e) in &done {
                let z = check(&m, s, r, *e).map_err(|e| format!("step {n}: {e}"))?;
                zeros.extend(z);
            }
            for (s, r, e) in &done {
                apply(&mut m, s, r, *e);
            }
            // ZERO extents read back as zeros (on the first connection, after the whole step).
            let what = format!("step {n}: ZERO extent");
            for (s, e) in zeros {
                read_check(&mut cs[0], base, &m, s, e, true, &what).await?;
            }
        }
        // Everything, through the server and then straight from the store.
        read_check(&mut cs[0], base, &m, 0, size, false, "final read").await?;
        Ok::<(), String>(())
    }
    .await;
    for c in cs {
        c.disconnect().await.unwrap();
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    result?;
    let f = std::fs::File::open(&b.path).unwrap();
    let mut on_store = vec![0u8; size as usize];
    f.read_exact_at(&mut on_store, base).unwrap();
    m.check(0, &on_store, "the store after the server stopped")
}

/// Runs `cases` generated cases (from a fixed seed, so every run tries the same ones) on `store`.
/// `NBD_MODEL_CASES` and `NBD_MODEL_SEED` (a number) explore further; `NBD_MODEL_TRACE` prints every
/// request and its reply.
fn run_model(store: Store, read_only: bool, cases: u32, seed: u8) {
    run_model_over(store, Transport::Tcp, read_only, cases, seed);
}

fn run_model_over(store: Store, transport: Transport, read_only: bool, cases: u32, seed: u8) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let cases = env("NBD_MODEL_CASES").unwrap_or(cases);
    let seed = env("NBD_MODEL_SEED").map_or(seed, |s| seed.wrapping_add(s as u8));
    let run = Run::new(store, transport, read_only);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = Config {
        cases,
        max_shrink_iters: 64,
        max_shrink_time: 60_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    );
    let result = runner.run(&case(), |(conns, steps)| {
        rt.block_on(run_case(&run, conns, &steps))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{store:?} over {transport:?}: {e}");
    }
}

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "root_ tests need root (loop devices, mounts); skip tests named root_* otherwise"
    );
}

#[test]
fn tmpfs_dense_file_matches_the_model() {
    run_model(Store::ShmDense, false, 24, 1);
}

#[test]
fn tmpfs_sparse_file_matches_the_model() {
    run_model(Store::ShmSparse, false, 24, 2);
}

/// Offsets past 4 GiB: the window straddles it.
#[test]
fn tmpfs_file_past_4_gib_matches_the_model() {
    run_model(Store::ShmHigh, false, 12, 8);
}

#[test]
fn var_tmp_file_past_4_gib_matches_the_model() {
    run_model(Store::VarTmpHigh, false, 12, 9);
}

/// A read-only export refuses every change (and reads what the file holds).
/// The buffered session, which serves every stream but plain TCP, over a Unix socket pair.
#[test]
fn tmpfs_dense_file_over_a_unix_socket_matches_the_model() {
    run_model_over(Store::ShmDense, Transport::Unix, false, 16, 11);
}

#[test]
fn var_tmp_file_over_a_unix_socket_matches_the_model() {
    run_model_over(Store::VarTmp, Transport::Unix, false, 12, 12);
}

/// The buffered session over TLS.
#[test]
fn tmpfs_sparse_file_over_tls_matches_the_model() {
    run_model_over(Store::ShmSparse, Transport::Tls, false, 16, 13);
}

#[test]
fn var_tmp_file_past_4_gib_over_tls_matches_the_model() {
    run_model_over(Store::VarTmpHigh, Transport::Tls, false, 12, 14);
}

#[test]
fn read_only_tmpfs_file_refuses_every_change() {
    run_model(Store::ShmDense, true, 8, 7);
}

#[test]
fn var_tmp_file_matches_the_model() {
    run_model(Store::VarTmp, false, 24, 3);
}

#[test]
fn root_loop_device_512_matches_the_model() {
    require_root();
    run_model(Store::Loop(512), false, 12, 4);
}

#[test]
fn root_loop_device_4096_matches_the_model() {
    require_root();
    run_model(Store::Loop(4096), false, 12, 5);
}

#[test]
fn root_loop_device_without_write_zeroes_matches_the_model() {
    require_root();
    run_model(Store::LoopRamfs, false, 12, 6);
}

#[test]
fn root_ext_loop_device_whose_write_zeroes_fail_matches_the_model() {
    require_root();
    run_model(Store::LoopFuse, false, 8, 10);
}

/// A WRITE not yet written back, then FAST_ZERO over it on a block device that cannot zero fast: the
/// request must fail with ENOTSUP and leave the written data, also through the page cache the server
/// shares with everyone reading the device. (`fallocate(PUNCH_HOLE)` on a block device drops the range's
/// cached pages, dirty ones included, before it asks the device.)
#[test]
fn root_refused_fast_zero_on_a_device_without_write_zeroes_keeps_unflushed_writes() {
    require_root();
    refused_fast_zero_keeps_unflushed_writes(Store::LoopRamfs);
}

/// The same on a device that claims a write-zeroes command and then fails it, so the server does ask
/// the kernel, which drops the cached pages before the device refuses.
#[test]
fn root_ext_refused_fast_zero_on_a_device_that_claims_write_zeroes_keeps_unflushed_writes() {
    require_root();
    refused_fast_zero_keeps_unflushed_writes(Store::LoopFuse);
}

fn refused_fast_zero_keeps_unflushed_writes(store: Store) {
    let mount = Mount::for_store(store);
    let b = backing(store, mount.as_ref());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let common::FileServer {
            addr, stop, task, ..
        } = common::serve_file(&b.path, ServerConfig::default(), false).await;
        let mut c = connect(addr, 0).await;
        assert_ne!(c.info.flags & TFLAG_SEND_FAST_ZERO, 0);
        let data = payload(77, MIB as u32);
        c.write(MIB, data, 0).await.unwrap();
        let err = c
            .zero(MIB, MIB as u32, CMD_FLAG_FAST_ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.remote_code(), Some(ENOTSUP), "{err}");
        assert!(
            c.read(MIB, MIB as u32).await.unwrap() == data,
            "the refused fast zero changed the data"
        );
        // Also after a flush, over parts of two pages and a whole one between them (512-byte sectors),
        // and in part of one page.
        c.flush().await.unwrap();
        for (off, len) in [(512, 2 * PAGE as u32), (512, 1024)] {
            let err = c
                .zero(MIB + off, len, CMD_FLAG_FAST_ZERO)
                .await
                .unwrap_err();
            assert_eq!(err.remote_code(), Some(ENOTSUP), "{err}");
            assert!(
                c.read(MIB, 3 * PAGE as u32).await.unwrap() == data[..3 * PAGE as usize],
                "the refused fast zero of {len} bytes changed the data in cached pages"
            );
        }
        c.disconnect().await.unwrap();
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    });
    let f = std::fs::File::open(&b.path).unwrap();
    let mut got = vec![0u8; MIB as usize];
    f.read_exact_at(&mut got, MIB).unwrap();
    assert!(got == payload(77, MIB as u32), "the device lost the write");
}
