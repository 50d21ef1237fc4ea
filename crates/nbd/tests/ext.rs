//! Real NBD clients (nbdinfo, nbdcopy, nbdsh, qemu-img, fio) against `nbd-serve`, on files in /dev/shm
//! (`ext_` tests) and on loop devices created here (`root_` tests).
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
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

/// A running `nbd-serve`, killed (by its own pid) when dropped.
struct Served {
    child: Child,
    addr: String,
}

impl Served {
    fn start(extra: &[&str], exports: &[(&str, &Path)]) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-serve"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
        for (name, path) in exports {
            cmd.arg(format!("{name}={}", path.display()));
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start nbd-serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout piped"))
            .read_line(&mut line)
            .expect("read nbd-serve's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Served { child, addr }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.addr)
    }

    /// Sends SIGTERM and checks a clean exit.
    fn terminate(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "nbd-serve exited with {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nbd-serve did not stop on SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let prelude = "import os\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\nh.connect_uri(os.environ['NBD_URI'])\n";
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

fn nbdcopy_round_trip(target: &Path, size: u64) {
    let src = random_file(size);
    let srv = Served::start(&[], &[("disk", target)]);
    for conns in ["1", "4"] {
        let dst = shm_file(0);
        run(Command::new("nbdcopy")
            .args(["--flush", "-C", conns])
            .arg(src.path())
            .arg(srv.uri("disk")));
        run(Command::new("nbdcopy")
            .args(["-C", conns])
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

fn qemu_img_convert_compare(target: &Path, size: u64) {
    let src = random_file(size);
    let srv = Served::start(&[], &[("disk", target)]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(src.path())
        .arg(srv.uri("disk")));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(src.path())
        .arg(srv.uri("disk")));
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

fn nbdsh_trim_flush_fua(target: &Path) {
    fill(target, 0x11, 16 * MIB);
    let srv = Served::start(&[], &[("disk", target)]);
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

fn fio_randwrite_verify(target: &Path) {
    let srv = Served::start(&[], &[("disk", target)]);
    // fio writes verify-state files into its working directory: keep them out of the source tree.
    let scratch = tempfile::tempdir().unwrap();
    let out = run(Command::new("fio").current_dir(scratch.path()).args([
        "--verify_state_save=0",
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri("disk")),
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
    nbdcopy_round_trip(t.path(), 256 * MIB);
}

#[test]
fn ext_qemu_img_convert_and_compare() {
    require(&["qemu-img"]);
    let t = shm_file(128 * MIB);
    qemu_img_convert_compare(t.path(), 128 * MIB);
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
    nbdsh_trim_flush_fua(t.path());
}

#[test]
fn ext_fio_randwrite_verify_crc32c() {
    require(&["fio"]);
    let t = shm_file(64 * MIB);
    fio_randwrite_verify(t.path());
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
    nbdcopy_round_trip(lo.path(), 256 * MIB);
    qemu_img_convert_compare(lo.path(), 256 * MIB);
    nbdsh_trim_flush_fua(lo.path());
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
    fio_randwrite_verify(lo.path());
}
