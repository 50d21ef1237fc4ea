//! Real NBD clients (nbdinfo, nbdcopy, nbdsh, qemu-img, fio) against `nbd-serve` (and nbdcopy against the
//! benchmarks' lean server), on files in /dev/shm (`ext_` tests) and on loop devices created here (`root_`
//! tests).
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

mod common;
use common::smaps::mapped_rss_kib;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MIB: u64 = 1 << 20;

/// Panics unless `tool` is on PATH.
fn require(tools: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        let found = std::env::split_paths(&path).any(|d| d.join(tool).is_file());
        assert!(
            found,
            "required program {tool} not found on PATH: apt-get install libnbd-bin python3-libnbd nbdkit qemu-utils fio"
        );
    }
}

/// How clients reach the server: in clear text, or over TLS with verified client certificates; or in
/// clear text to a server whose `madvise(2)` calls a seccomp filter refuses.
#[derive(Clone, Copy)]
enum Mode<'a> {
    Plain,
    Tls(&'a common::Pki),
    MadviseRefused,
}

/// A seccomp filter that fails `madvise(2)` with EPERM and allows every other call: what a unit's
/// `SystemCallFilter=` without it and `SystemCallErrorNumber=EPERM` does.
static DENY_MADVISE: [libc::sock_filter; 4] = [
    // A = seccomp_data.nr
    libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    },
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf: 1,
        k: libc::SYS_madvise as u32,
    },
    libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
    },
    libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_ALLOW,
    },
];

/// Installs [`DENY_MADVISE`] in the calling process (a child between fork and exec).
fn deny_madvise() -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: DENY_MADVISE.len() as u16,
        filter: DENY_MADVISE.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `prog` points at a static filter that outlives them, and the kernel copies it.
    let rc = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            -1
        } else {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            )
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A running `nbd-serve`, killed (by its own pid) when dropped.
struct Served {
    child: Child,
    addr: String,
    /// What the server wrote to standard error (its log), shown when a test fails.
    log: tempfile::NamedTempFile,
    /// libnbd/qemu certificate directory of the client, when the server requires TLS.
    client_dir: Option<PathBuf>,
}

impl Served {
    fn start(extra: &[&str], exports: &[(&str, &Path)]) -> Served {
        Self::start_mode(Mode::Plain, extra, exports)
    }

    /// With `Mode::Tls`, the server requires TLS and client certificates, and clients use `writer-1`'s.
    fn start_mode(mode: Mode<'_>, extra: &[&str], exports: &[(&str, &Path)]) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-serve"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
        let client_dir = match mode {
            Mode::Plain => None,
            Mode::MadviseRefused => {
                // SAFETY: the closure only makes two prctl calls, which are async-signal-safe.
                unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, deny_madvise) };
                None
            }
            Mode::Tls(pki) => {
                cmd.arg("--tls=require")
                    .arg(format!("--tls-certificates={}", pki.server_dir().display()))
                    .arg("--tls-verify-peer");
                Some(pki.client("writer-1"))
            }
        };
        for (name, path) in exports {
            cmd.arg(format!("{name}={}", path.display()));
        }
        let mut srv = spawn_listening(&mut cmd);
        srv.client_dir = client_dir;
        srv
    }

    /// The server's log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    fn uri(&self, name: &str) -> String {
        match &self.client_dir {
            None => format!("nbd://{}/{name}", self.addr),
            Some(dir) => self.tls_uri(name, dir),
        }
    }

    /// An `nbds://` URI with the client certificates of `dir`.
    fn tls_uri(&self, name: &str, dir: &Path) -> String {
        format!(
            "nbds://{}/{name}?tls-certificates={}",
            self.addr,
            dir.display()
        )
    }

    /// qemu-img arguments naming the export: `--object` (TLS only) and the image (a URI, or image
    /// options with the TLS credentials).
    fn qemu_image(&self, name: &str) -> (Vec<String>, String) {
        match &self.client_dir {
            None => (Vec::new(), self.uri(name)),
            Some(dir) => self.qemu_tls_image(name, dir),
        }
    }

    /// qemu arguments naming the export over TLS with the credentials of `dir` (qemu's
    /// `tls-creds-x509` layout: `ca-cert.pem`, and `client-cert.pem`/`client-key.pem` when present).
    fn qemu_tls_image(&self, name: &str, dir: &Path) -> (Vec<String>, String) {
        let (host, port) = self.addr.rsplit_once(':').unwrap();
        (
            vec![
                "--object".into(),
                format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()),
            ],
            format!("driver=nbd,server.type=inet,server.host={host},server.port={port},export={name},tls-creds=tls0"),
        )
    }

    /// Sends SIGTERM and checks a clean exit.
    fn terminate(self) {
        self.stop_with(rustix::process::Signal::TERM);
    }

    /// Sends `signal` and checks a clean exit.
    fn stop_with(mut self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("child pid");
        rustix::process::kill_process(pid, signal).expect("signal nbd-serve");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "nbd-serve exited with {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nbd-serve did not stop on {signal:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            eprintln!("server log:\n{log}");
        }
    }
}

/// Starts a server that prints `listening on ADDR` first (nbd-serve, the benchmarks' lean server), with
/// its standard error in a file, and returns it with that address (in clear text: no client directory).
fn spawn_listening(cmd: &mut Command) -> Served {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .expect("read the server's first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Served {
        child,
        addr,
        log,
        client_dir: None,
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shm_file(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("nbd-test-")
        .tempfile_in("/dev/shm")
        .expect("create a file in /dev/shm");
    f.as_file().set_len(size).unwrap();
    f
}

fn random_file(size: u64) -> tempfile::NamedTempFile {
    let mut f = shm_file(0);
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
    f
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn fill(path: &Path, byte: u8, size: u64) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let buf = vec![byte; MIB as usize];
    for _ in 0..size / MIB {
        f.write_all(&buf).unwrap();
    }
    f.sync_data().unwrap();
}

fn nbdsh(uri: &str, script: &str) -> String {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let prelude = "import os\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.set_uri_allow_local_file(True)\nh.connect_uri(os.environ['NBD_URI'])\n";
    f.write_all(prelude.as_bytes()).unwrap();
    f.write_all(script.as_bytes()).unwrap();
    f.flush().unwrap();
    // nbdsh runs `python3` from PATH; the libnbd module belongs to the system interpreter.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("nbdsh")
        .env("PATH", path)
        .env("NBD_URI", uri)
        .arg("-c")
        .arg(format!(
            "exec(open({:?}).read())",
            f.path().display().to_string()
        )))
}

// ---- scenarios shared by the file and loop-device variants ----

fn nbdcopy_round_trip(mode: Mode<'_>, target: &Path, size: u64) {
    let src = random_file(size);
    let srv = Served::start_mode(mode, &[], &[("disk", target)]);
    // nbdcopy opens at most one connection per thread and runs one thread per CPU by default; -T makes it
    // open as many connections as asked for on any machine.
    for conns in ["1", "4"] {
        let dst = shm_file(0);
        run(Command::new("nbdcopy")
            .args(["--flush", "-C", conns, "-T", conns])
            .arg(src.path())
            .arg(srv.uri("disk")));
        run(Command::new("nbdcopy")
            .args(["-C", conns, "-T", conns])
            .arg(srv.uri("disk"))
            .arg(dst.path()));
        let want = read_all(src.path());
        assert!(
            read_all(dst.path()) == want,
            "copy out with {conns} connections equals the source"
        );
        let mut on_disk = read_all(target);
        on_disk.truncate(want.len());
        assert!(
            on_disk == want,
            "target holds the source after copy in with {conns} connections"
        );
        fill(src.path(), 0x3c, size); // a different payload for the next round
    }
    srv.terminate();
}

fn qemu_img_convert_compare(mode: Mode<'_>, target: &Path, size: u64) {
    let src = random_file(size);
    let srv = Served::start_mode(mode, &[], &[("disk", target)]);
    let (objects, image) = srv.qemu_image("disk");
    if objects.is_empty() {
        run(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(src.path())
            .arg(&image));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(src.path())
            .arg(&image));
    } else {
        run(Command::new("qemu-img")
            .args(["convert", "-n"])
            .args(&objects)
            .args(["-f", "raw", "--target-image-opts"])
            .arg(src.path())
            .arg(&image));
        run(Command::new("qemu-img")
            .arg("compare")
            .args(&objects)
            .arg("--image-opts")
            .arg(format!("driver=file,filename={}", src.path().display()))
            .arg(&image));
    }
    srv.terminate();
}

/// Zeroes 128 MiB and 1 GiB in single requests over a 0xAB-filled export and checks every byte.
fn nbdsh_big_zeroes(target: &Path, size: u64) {
    assert_eq!(size, 1280 * MIB);
    fill(target, 0xab, size);
    let srv = Served::start(&[], &[("disk", target)]);
    let out = nbdsh(
        &srv.uri("disk"),
        r#"
M = 2**20
h.zero(128 * M, 32 * M)
h.zero(1024 * M, 192 * M, nbd.CMD_FLAG_NO_HOLE)
h.flush()
z = bytes(32 * M)
ab = b'\xab' * (32 * M)
for off in range(0, h.get_size(), 32 * M):
    want = z if (32 * M <= off < 160 * M or 192 * M <= off < 1216 * M) else ab
    assert h.pread(32 * M, off) == want, off
print("verified", h.get_size())
"#,
    );
    assert!(out.contains("verified 1342177280"), "nbdsh output: {out}");
    srv.terminate();
    let data = read_all(target);
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        let i = i as u64;
        let zero = (32..160).contains(&i) || (192..1216).contains(&i);
        let want = if zero { 0 } else { 0xab };
        assert!(
            chunk.iter().all(|&b| b == want),
            "MiB {i} should be {want:#x}"
        );
    }
}

fn nbdsh_trim_flush_fua(mode: Mode<'_>, target: &Path) {
    fill(target, 0x11, 16 * MIB);
    let srv = Served::start_mode(mode, &[], &[("disk", target)]);
    let out = nbdsh(
        &srv.uri("disk"),
        r#"
M = 2**20
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_multi_conn()
h.pwrite(b'F' * 65536, 0, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, 0) == b'F' * 65536
h.trim(M, M, nbd.CMD_FLAG_FUA)
h.zero(65536, 2 * M, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 2 * M) == bytes(65536)
h.pwrite(b'T' * 4096, 8 * M)
h.flush()
ext = []
h.block_status(16 * M, 0, lambda ctx, off, entries, err: ext.append((ctx, list(entries))) or 0)
assert ext and ext[0][0] == nbd.CONTEXT_BASE_ALLOCATION, ext
print("ok", sum(ext[0][1][0::2]))
"#,
    );
    assert!(out.contains("ok "), "nbdsh output: {out}");
    srv.terminate();
    let data = read_all(target);
    assert!(data[..65536].iter().all(|&b| b == b'F'));
    let z = 2 * MIB as usize;
    assert!(
        data[z..z + 65536].iter().all(|&b| b == 0),
        "zeroed range reads as zeros"
    );
    assert!(
        data[65536..MIB as usize].iter().all(|&b| b == 0x11),
        "untouched range kept"
    );
    assert!(data[8 * MIB as usize..8 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == b'T'));
}

fn fio_randwrite_verify(mode: Mode<'_>, target: &Path) {
    let srv = Served::start_mode(mode, &[], &[("disk", target)]);
    // fio writes verify-state files into its working directory: keep them out of the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let mut fio = Command::new("fio");
    // fio's nbd engine does not let libnbd read `tls-certificates=` from a URI. libnbd then takes the
    // client certificates from $HOME/.pki/libnbd, except for root (only /etc/pki/libnbd, which a test must
    // not touch): fio runs as `nobody` with HOME in the scratch directory holding a copy of them.
    let uri = match &srv.client_dir {
        None => srv.uri("disk"),
        Some(dir) => {
            use std::os::unix::fs::PermissionsExt;
            use std::os::unix::process::CommandExt;
            let certs = scratch.path().join(".pki/libnbd");
            std::fs::create_dir_all(&certs).unwrap();
            for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
                std::fs::copy(dir.join(f), certs.join(f)).unwrap();
            }
            if rustix::process::geteuid().is_root() {
                for d in [scratch.path(), &scratch.path().join(".pki"), &certs] {
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
                }
                for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
                    std::fs::set_permissions(certs.join(f), std::fs::Permissions::from_mode(0o644))
                        .unwrap();
                }
                fio.uid(65534).gid(65534);
            }
            fio.env("HOME", scratch.path());
            format!("nbds://{}/disk", srv.addr)
        }
    };
    let out = run(fio.current_dir(scratch.path()).args([
        "--verify_state_save=0",
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json = &out[out.find('{').expect("fio printed JSON")..];
    let j: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "verify phase read everything back"
    );
    srv.terminate();
}

/// SIGTERM, SIGINT and SIGHUP (nbdkit's quit signals) each stop nbd-serve cleanly, exit status 0.
#[test]
fn each_stop_signal_stops_nbd_serve_cleanly() {
    use rustix::process::Signal;
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(MIB).unwrap();
    for signal in [Signal::HUP, Signal::INT, Signal::TERM] {
        Served::start(&[], &[("disk", file.path())]).stop_with(signal);
    }
}

// ---- ext_: files in /dev/shm ----

#[test]
fn ext_nbdinfo_json_reports_size_flags_and_list() {
    require(&["nbdinfo"]);
    let a = shm_file(64 * MIB);
    let b = shm_file(3 * MIB);
    let srv = Served::start(&[], &[("alpha", a.path()), ("beta", b.path())]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(srv.uri("alpha")));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    let e = &j["exports"][0];
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    assert_eq!(e["export-name"], "alpha");
    assert_eq!(e["export-size"], 64 * MIB);
    for key in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_fast_zero",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[key], true, "{key}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert!(e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(srv.uri("")));
    let l: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list JSON");
    let mut names: Vec<String> = l["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta"]);
    // Neither the listing nor an export's details show where the server keeps its files.
    for shown in [&list, &out] {
        assert!(
            !shown.contains(a.path().to_str().unwrap()),
            "the file's path is shown: {shown}"
        );
    }
    srv.terminate();
    let ro = Served::start(&["--read-only"], &[("alpha", a.path())]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(ro.uri("alpha")));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["exports"][0]["is_read_only"], true);
    ro.terminate();
}

#[test]
fn ext_nbdcopy_in_and_out_with_1_and_4_connections() {
    require(&["nbdcopy"]);
    let t = shm_file(256 * MIB);
    nbdcopy_round_trip(Mode::Plain, t.path(), 256 * MIB);
}

/// The benchmarks' yardstick (`examples/lean_server.rs`) must store what it is sent, or the ratios to it
/// mean nothing: nbdcopy writes a file through it over 4 connections, and reads it back.
#[test]
fn ext_lean_server_stores_and_returns_what_nbdcopy_sends() {
    require(&["nbdcopy"]);
    // Tests run from target/<profile>/deps; `cargo test` builds the examples into target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let lean = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/lean_server");
    assert!(
        lean.is_file(),
        "{} is missing: build it with `cargo build -p nbd --example lean_server` (cargo test builds it)",
        lean.display()
    );
    let src = random_file(40 * MIB);
    let img = shm_file(40 * MIB);
    let srv = spawn_listening(Command::new(&lean).arg(img.path()));
    run(Command::new("nbdcopy")
        .args(["--flush", "-C", "4", "-T", "4"])
        .arg(src.path())
        .arg(srv.uri("disk")));
    assert!(
        read_all(img.path()) == read_all(src.path()),
        "the lean server stored exactly what nbdcopy sent"
    );
    let back = shm_file(0);
    run(Command::new("nbdcopy")
        .args(["-C", "4", "-T", "4"])
        .arg(srv.uri("disk"))
        .arg(back.path()));
    assert!(
        read_all(back.path()) == read_all(src.path()),
        "the lean server returned what it stored"
    );
}

#[test]
fn ext_nbdcopy_in_and_out_when_seccomp_refuses_madvise() {
    require(&["nbdcopy"]);
    let t = shm_file(256 * MIB);
    nbdcopy_round_trip(Mode::MadviseRefused, t.path(), 256 * MIB);
}

#[test]
fn ext_nbdcopy_and_qemu_img_read_a_tmpfs_file_without_holes_through_the_mapping() {
    require(&["nbdcopy", "qemu-img"]);
    // Written whole, so it has no holes and READs of 64 KiB or more are sent from the server's mapping.
    // 40 MiB: the server drops the mapping's pages every 32 MiB, so some stay resident after each copy.
    let disk = random_file(40 * MIB);
    let want = read_all(disk.path());
    let srv = Served::start(&["--read-only"], &[("disk", disk.path())]);
    let mut resident = Vec::new();
    for conns in ["1", "4"] {
        let dst = shm_file(0);
        run(Command::new("nbdcopy")
            .args(["-C", conns, "-T", conns])
            .arg(srv.uri("disk"))
            .arg(dst.path()));
        assert!(
            read_all(dst.path()) == want,
            "nbdcopy -C {conns} read the file exactly"
        );
        resident.push(mapped_rss_kib(srv.child.id(), disk.path()).unwrap_or(0));
    }
    let (_, image) = srv.qemu_image("disk");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(disk.path())
        .arg(&image));
    resident.push(mapped_rss_kib(srv.child.id(), disk.path()).unwrap_or(0));
    assert!(
        resident.iter().all(|&kib| kib > 0),
        "the server sent the replies from its mapping of the file (KiB resident after each: {resident:?})"
    );
    srv.terminate();
}

#[test]
fn ext_qemu_img_convert_and_compare() {
    require(&["qemu-img"]);
    let t = shm_file(128 * MIB);
    qemu_img_convert_compare(Mode::Plain, t.path(), 128 * MIB);
}

#[test]
fn ext_nbdsh_zeroes_128m_and_1g_in_single_requests() {
    require(&["nbdsh"]);
    let t = shm_file(1280 * MIB);
    nbdsh_big_zeroes(t.path(), 1280 * MIB);
}

#[test]
fn ext_nbdsh_trim_flush_fua() {
    require(&["nbdsh"]);
    let t = shm_file(16 * MIB);
    nbdsh_trim_flush_fua(Mode::Plain, t.path());
}

#[test]
fn ext_nbdsh_flags_not_documented_for_a_command_get_einval() {
    require(&["nbdsh"]);
    let t = shm_file(4 * MIB);
    fill(t.path(), 0x22, 4 * MIB);
    let srv = Served::start_mode(Mode::Plain, &[], &[("disk", t.path())]);
    // libnbd refuses to send such flags unless strict mode is off; a client that sends them anyway gets
    // EINVAL, nothing changes, and the connection goes on.
    let out = nbdsh(
        &srv.uri("disk"),
        r#"
import errno
h.set_strict_mode(0)
refused = [
    lambda: h.pwrite(b'X' * 4096, 0, nbd.CMD_FLAG_DF),
    lambda: h.pwrite(b'X' * 4096, 0, nbd.CMD_FLAG_NO_HOLE),
    lambda: h.pwrite(b'X' * 4096, 0, 0x40),
    lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE),
    lambda: h.trim(4096, 0, nbd.CMD_FLAG_FAST_ZERO),
    lambda: h.zero(4096, 0, nbd.CMD_FLAG_DF),
]
for i, f in enumerate(refused):
    try:
        f()
        raise SystemExit("request %d was taken" % i)
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, (i, e)
assert h.pread(4096, 0, nbd.CMD_FLAG_DF) == b'\x22' * 4096
h.pwrite(b'Y' * 4096, 4096, nbd.CMD_FLAG_FUA)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
print("refused", len(refused))
"#,
    );
    assert!(out.contains("refused 6"), "nbdsh output: {out}");
    srv.terminate();
    let data = read_all(t.path());
    assert!(
        data[..4096].iter().all(|&b| b == 0x22),
        "refused writes changed nothing"
    );
    assert!(data[4096..8192].iter().all(|&b| b == b'Y'));
    assert!(data[8192..12288].iter().all(|&b| b == 0));
    assert!(data[12288..].iter().all(|&b| b == 0x22));
}

#[test]
fn ext_fio_randwrite_verify_crc32c() {
    require(&["fio"]);
    let t = shm_file(64 * MIB);
    fio_randwrite_verify(Mode::Plain, t.path());
}

// ---- ext_tls_: the same over TLS with verified client certificates, and the TLS policy ----

#[test]
fn ext_tls_nbdinfo_nbdcopy_qemu_img_nbdsh_and_fio_over_tls() {
    require(&["nbdinfo", "nbdcopy", "qemu-img", "nbdsh", "fio"]);
    let pki = common::Pki::new();
    let t = shm_file(128 * MIB);
    let srv = Served::start_mode(Mode::Tls(&pki), &[], &[("disk", t.path())]);
    let out = run(Command::new("nbdinfo").arg("--json").arg(srv.uri("disk")));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    assert_eq!(j["TLS"], true, "nbdinfo negotiated TLS: {out}");
    assert_eq!(j["exports"][0]["export-size"], 128 * MIB);
    srv.terminate();
    nbdcopy_round_trip(Mode::Tls(&pki), t.path(), 128 * MIB);
    qemu_img_convert_compare(Mode::Tls(&pki), t.path(), 128 * MIB);
    nbdsh_trim_flush_fua(Mode::Tls(&pki), t.path());
    fio_randwrite_verify(Mode::Tls(&pki), t.path());
}

/// Runs `cmd` and asserts that it fails, and within 8 s: a refusal must be prompt, not the server's
/// 10 s handshake timeout or a hang. Returns its stderr.
fn run_fails(cmd: &mut Command) -> String {
    let out_file = tempfile::tempfile().unwrap();
    let err_file = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().unwrap())
        .stderr(err_file.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} was still running after 8 s instead of being refused");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let text = |mut f: File| {
        let mut s = String::new();
        std::io::Seek::rewind(&mut f).unwrap();
        f.read_to_string(&mut s).unwrap();
        s
    };
    assert!(
        !status.success(),
        "{cmd:?} should have failed but printed:\n{}",
        text(out_file)
    );
    text(err_file)
}

fn listed(srv: &Served, uri: &str) -> Vec<String> {
    let _ = srv;
    let out = run(Command::new("nbdinfo").arg("--list").arg("--json").arg(uri));
    let l: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --list JSON");
    let mut names: Vec<String> = l["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn ext_tls_unauthenticated_clients_list_and_read_nothing() {
    require(&["nbdinfo", "nbdcopy"]);
    let pki = common::Pki::new();
    let t = random_file(4 * MIB);
    let srv = Served::start_mode(Mode::Tls(&pki), &[], &[("disk", t.path())]);
    let plain = format!("nbd://{}/disk", srv.addr);
    let plain_list = format!("nbd://{}/", srv.addr);
    run_fails(Command::new("nbdinfo").arg("--list").arg(&plain_list));
    run_fails(Command::new("nbdinfo").arg(&plain));
    let dst = shm_file(0);
    run_fails(Command::new("nbdcopy").arg(&plain).arg(dst.path()));
    let anonymous = pki.anonymous_client();
    run_fails(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(srv.tls_uri("", &anonymous)),
    );
    run_fails(
        Command::new("nbdcopy")
            .arg(srv.tls_uri("disk", &anonymous))
            .arg(dst.path()),
    );
    let rogue = pki.rogue_client("writer-1");
    run_fails(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(srv.tls_uri("", &rogue)),
    );
    run_fails(
        Command::new("nbdcopy")
            .arg(srv.tls_uri("disk", &rogue))
            .arg(dst.path()),
    );
    assert_eq!(
        std::fs::metadata(dst.path()).unwrap().len(),
        0,
        "nothing was read"
    );
    // The legitimate client still gets in.
    assert_eq!(listed(&srv, &srv.uri("")), ["disk"]);
    srv.terminate();
}

/// qemu's own NBD client (qemu-img, qemu-io, qemu-nbd --list) over TLS with client certificates, as it
/// works against nbdkit: data written and read back with `qemu-img convert`, `qemu-io` write, write -z,
/// discard, aio_write and flush; clients without a certificate, in clear text or expecting another host
/// name are refused at once, and the server goes on serving.
#[test]
fn ext_tls_qemu_img_qemu_io_and_qemu_nbd_list_with_client_certificates() {
    require(&["qemu-img", "qemu-io", "qemu-nbd"]);
    let pki = common::Pki::new();
    let t = shm_file(32 * MIB);
    let src = random_file(16 * MIB);
    let srv = Served::start_mode(Mode::Tls(&pki), &[], &[("disk", t.path())]);
    let (objects, image) = srv.qemu_image("disk");
    run(Command::new("qemu-img")
        .args(["convert", "-n"])
        .args(&objects)
        .args(["-f", "raw", "--target-image-opts"])
        .arg(src.path())
        .arg(&image));
    let back = shm_file(0);
    run(Command::new("qemu-img")
        .arg("convert")
        .args(&objects)
        .arg("--image-opts")
        .arg(&image)
        .args(["-O", "raw"])
        .arg(back.path()));
    let mut want = read_all(src.path());
    want.resize(32 * MIB as usize, 0);
    assert!(
        read_all(back.path()) == want,
        "qemu-img convert read back what it wrote"
    );
    // qemu-io exits with 1 when a command fails, also a `read -P` whose data differs.
    run(Command::new("qemu-io")
        .args(&objects)
        .arg("--image-opts")
        .arg(&image)
        .args(["-c", "write -P 0xab 0 1M"])
        .args(["-c", "write -z 1M 1M"])
        .args(["-c", "discard 2M 1M"])
        .args(["-c", "aio_write -P 0xcd 4M 64k"])
        .args(["-c", "aio_flush"])
        .args(["-c", "write -f -P 0xef 5M 4k"])
        .args(["-c", "flush"])
        .args(["-c", "read -P 0xab 0 1M"])
        .args(["-c", "read -P 0 1M 1M"])
        .args(["-c", "read -P 0xcd 4M 64k"])
        .args(["-c", "read -P 0xef 5M 4k"]));
    let list = run(Command::new("qemu-nbd")
        .args(&objects)
        .args(["--tls-creds=tls0", "--list", "--bind=127.0.0.1"])
        .arg(format!("--port={}", srv.addr.rsplit_once(':').unwrap().1)));
    assert!(list.contains("export: 'disk'"), "qemu-nbd --list: {list}");
    // Refused: no client certificate, clear text against --tls=require, a host name the server's
    // certificate does not carry.
    let (anon_objects, anon_image) = srv.qemu_tls_image("disk", &pki.anonymous_client());
    run_fails(
        Command::new("qemu-io")
            .args(&anon_objects)
            .arg("--image-opts")
            .arg(&anon_image)
            .args(["-c", "write -P 0x11 0 64k"]),
    );
    let err = run_fails(
        Command::new("qemu-img")
            .args(["info", "-f", "raw"])
            .arg(format!("nbd://{}/disk", srv.addr)),
    );
    assert!(
        err.contains("TLS negotiation required"),
        "qemu-img in clear text: {err}"
    );
    let err = run_fails(
        Command::new("qemu-img")
            .arg("info")
            .args(&objects)
            .arg("--image-opts")
            .arg(format!("{image},tls-hostname=elsewhere.example")),
    );
    assert!(
        err.contains("does not match the hostname"),
        "qemu-img with another host name: {err}"
    );
    run(Command::new("qemu-img")
        .arg("info")
        .args(&objects)
        .arg("--image-opts")
        .arg(format!("{image},tls-hostname=localhost")));
    // The server logs each refused handshake with its cause, and nothing about the sessions that ended
    // normally (nbd-serve logs warnings and errors).
    let log = srv.log();
    assert!(
        log.lines()
            .any(|l| l.contains("TLS handshake failed") && l.contains("no certificates")),
        "the missing client certificate is logged: {log}"
    );
    assert!(
        log.lines()
            .all(|l| l.trim().is_empty() || l.contains("TLS handshake failed")),
        "nothing but the refused handshakes is logged: {log}"
    );
    srv.terminate();
    let data = read_all(t.path());
    let m = MIB as usize;
    assert!(
        data[..m].iter().all(|&b| b == 0xab),
        "refused client wrote nothing"
    );
    assert!(
        data[m..3 * m].iter().all(|&b| b == 0),
        "write -z and discard read as zeros"
    );
    assert!(data[3 * m..4 * m] == want[3 * m..4 * m]);
    assert!(data[4 * m..4 * m + 65536].iter().all(|&b| b == 0xcd));
    assert!(data[5 * m..5 * m + 4096].iter().all(|&b| b == 0xef));
    assert!(data[6 * m..] == want[6 * m..]);
    // A TLS client against a server without TLS is refused too, with the server's reason.
    let plain = Served::start(&[], &[("disk", t.path())]);
    let client = pki.client("writer-1");
    let (objects, image) = plain.qemu_tls_image("disk", &client);
    let err = run_fails(
        Command::new("qemu-img")
            .arg("info")
            .args(&objects)
            .arg("--image-opts")
            .arg(&image),
    );
    assert!(
        err.contains("starttls"),
        "qemu-img with TLS against --tls=off: {err}"
    );
    plain.terminate();
}

#[test]
fn ext_tls_export_access_lists_and_opens_only_permitted_exports() {
    require(&["nbdinfo", "nbdcopy"]);
    let pki = common::Pki::new();
    let public = random_file(2 * MIB);
    let secret = random_file(3 * MIB);
    let srv = Served::start_mode(
        Mode::Tls(&pki),
        &["--allow", "secret=writer-2"],
        &[("public", public.path()), ("secret", secret.path())],
    );
    // writer-1 (the default client) sees and opens only the public export.
    assert_eq!(listed(&srv, &srv.uri("")), ["public"]);
    run(Command::new("nbdinfo").arg(srv.uri("public")));
    run_fails(Command::new("nbdinfo").arg(srv.uri("secret")));
    let dst = shm_file(0);
    run_fails(
        Command::new("nbdcopy")
            .arg(srv.uri("secret"))
            .arg(dst.path()),
    );
    // writer-2 sees both and reads the secret one.
    let w2 = pki.client("writer-2");
    assert_eq!(listed(&srv, &srv.tls_uri("", &w2)), ["public", "secret"]);
    run(Command::new("nbdcopy")
        .arg(srv.tls_uri("secret", &w2))
        .arg(dst.path()));
    assert!(read_all(dst.path()) == read_all(secret.path()));
    srv.terminate();
    // With --tls=on, clear-text clients are served, but never a restricted export.
    let srv = spawn_listening(
        Command::new(env!("CARGO_BIN_EXE_nbd-serve"))
            .args(["--listen", "127.0.0.1:0", "--tls=on", "--tls-verify-peer"])
            .arg(format!("--tls-certificates={}", pki.server_dir().display()))
            .args(["--allow", "secret=writer-2"])
            .arg(format!("public={}", public.path().display()))
            .arg(format!("secret={}", secret.path().display())),
    );
    assert_eq!(listed(&srv, &srv.uri("")), ["public"]);
    run_fails(Command::new("nbdinfo").arg(srv.uri("secret")));
    assert_eq!(listed(&srv, &srv.tls_uri("", &w2)), ["public", "secret"]);
    srv.terminate();
}

/// The export names `nbd-client -l` (nbd's own client, GnuTLS) prints on standard output, sorted; the
/// client's other lines ("Negotiation: ..") go there too and are left out.
fn nbd_client_list(srv: &Served, tls: Option<&Path>) -> Vec<String> {
    let (host, port) = srv.addr.rsplit_once(':').unwrap();
    let mut cmd = Command::new("nbd-client");
    if let Some(dir) = tls {
        cmd.arg("-x")
            .arg("--cacertfile")
            .arg(dir.join("ca-cert.pem"))
            .args(["--tlshostname", "localhost"]);
        if dir.join("client-cert.pem").exists() {
            cmd.arg("--certfile")
                .arg(dir.join("client-cert.pem"))
                .arg("--keyfile")
                .arg(dir.join("client-key.pem"));
        }
    }
    let out = run(cmd.args(["-l", host, port]));
    let mut names: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with("Negotiation:") && !l.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// nbd's own client (`nbd-client -l`, from the nbd-client package, with GnuTLS) lists exports in clear
/// text and over TLS with a client certificate, seeing only what its identity may open; without a
/// certificate, or in clear text where TLS is required, it lists nothing.
#[test]
fn ext_nbd_client_lists_exports_in_clear_text_and_over_tls() {
    require(&["nbd-client"]);
    let a = shm_file(MIB);
    let b = shm_file(MIB);
    let srv = Served::start(&[], &[("alpha", a.path()), ("beta", b.path())]);
    assert_eq!(nbd_client_list(&srv, None), ["alpha", "beta"]);
    srv.terminate();

    let pki = common::Pki::new();
    let srv = Served::start_mode(
        Mode::Tls(&pki),
        &["--allow", "beta=writer-2"],
        &[("alpha", a.path()), ("beta", b.path())],
    );
    assert_eq!(
        nbd_client_list(&srv, Some(&pki.client("writer-1"))),
        ["alpha"]
    );
    assert_eq!(
        nbd_client_list(&srv, Some(&pki.client("writer-2"))),
        ["alpha", "beta"]
    );
    let (host, port) = srv.addr.rsplit_once(':').unwrap();
    let refused = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !out.status.success() && !stdout.contains("alpha") && !stdout.contains("beta"),
            "{cmd:?} listed exports ({}):\n{stdout}",
            out.status
        );
    };
    refused(Command::new("nbd-client").args(["-l", host, port]));
    let anonymous = pki.anonymous_client();
    refused(
        Command::new("nbd-client")
            .args(["-x", "--tlshostname", "localhost", "--cacertfile"])
            .arg(anonymous.join("ca-cert.pem"))
            .args(["-l", host, port]),
    );
    // The server goes on serving its legitimate clients.
    assert_eq!(
        nbd_client_list(&srv, Some(&pki.client("writer-1"))),
        ["alpha"]
    );
    srv.terminate();
}

// ---- root_: the same on loop devices ----

/// A loop device (the project's own, from `blockdev`) over a backing file; detached when dropped, also on
/// panic, before the backing file goes.
struct LoopDevice {
    dev: blockdev::LoopDevice,
    _backing: tempfile::NamedTempFile,
}

impl LoopDevice {
    fn attach(backing: tempfile::NamedTempFile) -> LoopDevice {
        assert!(
            rustix::process::geteuid().is_root(),
            "root_ tests need root (loop devices)"
        );
        let dev =
            blockdev::LoopDevice::attach(backing.path(), false).expect("attach a loop device");
        LoopDevice {
            dev,
            _backing: backing,
        }
    }

    fn path(&self) -> &Path {
        self.dev.path()
    }
}

#[test]
fn root_loop_nbdcopy_qemu_img_and_trim_flush_fua() {
    require(&["nbdcopy", "qemu-img", "nbdsh"]);
    let lo = LoopDevice::attach(shm_file(256 * MIB));
    nbdcopy_round_trip(Mode::Plain, lo.path(), 256 * MIB);
    qemu_img_convert_compare(Mode::Plain, lo.path(), 256 * MIB);
    nbdsh_trim_flush_fua(Mode::Plain, lo.path());
}

#[test]
fn root_loop_nbdsh_zeroes_128m_and_1g_in_single_requests() {
    require(&["nbdsh"]);
    let lo = LoopDevice::attach(shm_file(1280 * MIB));
    nbdsh_big_zeroes(lo.path(), 1280 * MIB);
}

#[test]
fn root_loop_fio_randwrite_verify_crc32c() {
    require(&["fio"]);
    let lo = LoopDevice::attach(shm_file(64 * MIB));
    fio_randwrite_verify(Mode::Plain, lo.path());
}

#[test]
fn root_loop_fast_zero_uses_the_device_or_fails_with_enotsup() {
    require(&["nbdsh"]);
    let lo = LoopDevice::attach(shm_file(64 * MIB));
    fill(lo.path(), 0xab, 64 * MIB);
    let srv = Served::start(&[], &[("disk", lo.path())]);
    // A loop device over a tmpfs file zeroes through the backing file's fallocate: fast. Keeping the
    // blocks allocated (NO_HOLE) has no fast path, so the request must fail with ENOTSUP, not write zeros.
    let out = nbdsh(
        &srv.uri("disk"),
        r#"
import errno
M = 2**20
assert h.can_fast_zero()
h.zero(16 * M, 8 * M, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(16 * M, 8 * M) == bytes(16 * M)
try:
    h.zero(M, 32 * M, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("fast zero without hole punching succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
assert h.pread(M, 32 * M) == b'\xab' * M
print("fast zero ok")
"#,
    );
    assert!(out.contains("fast zero ok"), "nbdsh output: {out}");
    srv.terminate();
    let data = read_all(lo.path());
    assert!(data[8 * MIB as usize..24 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(data[32 * MIB as usize..33 * MIB as usize]
        .iter()
        .all(|&b| b == 0xab));
}
