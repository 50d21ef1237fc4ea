//! Snapshots of block devices read from sysfs (`Documentation/ABI/stable/sysfs-block`) under an
//! injectable root, turned into plain data before any decision is made.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::Error;

/// Where sysfs and the device nodes live: `/sys` and `/dev` on a real system, fixture trees in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoot {
    sys: PathBuf,
    dev: PathBuf,
    /// Unit tests only: a regular file in the dev tree whose text is `block MAJ:MIN` stands for a
    /// block device node (creating real nodes needs root).
    #[cfg(test)]
    pub(crate) simulated_nodes: bool,
}

impl SysRoot {
    /// A root with sysfs at `sys` and device nodes under `dev`.
    pub fn new(sys: PathBuf, dev: PathBuf) -> Self {
        Self {
            sys,
            dev,
            #[cfg(test)]
            simulated_nodes: false,
        }
    }

    /// The running system: `/sys` and `/dev`.
    pub fn system() -> Self {
        Self::new("/sys".into(), "/dev".into())
    }

    /// The sysfs mount point.
    pub fn sys(&self) -> &Path {
        &self.sys
    }

    /// The device-node directory.
    pub fn dev(&self) -> &Path {
        &self.dev
    }
}

/// One whole-disk block device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDeviceInfo {
    /// Kernel name, e.g. `vdb`, `sda`, `loop3`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
    /// Size in bytes.
    pub size: u64,
    pub logical_block_size: u32,
    /// The serial the kernel exposes (`serial`, `device/serial`, or SCSI VPD page 0x80), trimmed.
    pub serial: Option<String>,
    /// A loop device's backing file.
    pub backing_file: Option<PathBuf>,
    pub read_only: bool,
    /// Devices stacked on this one (`holders/`).
    pub holders: Vec<String>,
    /// Partition names, sorted.
    pub partitions: Vec<String>,
    /// Disk sequence number (Linux 5.15+).
    pub diskseq: Option<u64>,
}

/// All whole-disk block devices under `root`, sorted by name.
pub fn snapshot(root: &SysRoot) -> Result<Vec<BlockDeviceInfo>, Error> {
    let block = root.sys.join("block");
    let entries = fs::read_dir(&block).map_err(Error::io("list", block.clone()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("list", block.clone()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        // A device removed between listing and reading is simply not part of the snapshot.
        if let Some(info) = device(root, &name)? {
            out.push(info);
        }
    }
    Ok(out)
}

/// One device by kernel name; `None` when sysfs has no such device.
pub fn device(root: &SysRoot, name: &str) -> Result<Option<BlockDeviceInfo>, Error> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Error::Invalid {
            what: "kernel device name",
            detail: format!("{name:?} is not a single path component"),
        });
    }
    let dir = root.sys.join("block").join(name);
    let dev_text = match read_opt(&dir.join("dev"))? {
        Some(t) => t,
        None => return Ok(None),
    };
    let (major, minor) = parse_major_minor(&dev_text).ok_or_else(|| Error::Invalid {
        what: "sysfs dev attribute",
        detail: format!(
            "{}/dev holds {dev_text:?}, expected MAJOR:MINOR",
            dir.display()
        ),
    })?;
    let size = read_u64(&dir.join("size"))?
        .unwrap_or(0)
        .saturating_mul(512);
    let logical_block_size = read_u64(&dir.join("queue/logical_block_size"))?
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(512);
    let read_only = read_opt(&dir.join("ro"))?.is_some_and(|v| v == "1");
    let backing_file = read_opt(&dir.join("loop/backing_file"))?
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let diskseq = read_u64(&dir.join("diskseq"))?;
    let serial = read_serial(&dir)?;
    let holders = list_names(&dir.join("holders"))?;
    let mut partitions = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.path().join("partition").exists() {
                partitions.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    partitions.sort();
    Ok(Some(BlockDeviceInfo {
        name: name.to_string(),
        major,
        minor,
        size,
        logical_block_size,
        serial,
        backing_file,
        read_only,
        holders,
        partitions,
        diskseq,
    }))
}

/// Why a whole disk is in use by the machine itself, if it is: a holder stacked on it or on one of its
/// partitions (device-mapper, LVM, md), or the disk or a partition mounted or used as swap. `mountinfo` is
/// the text of `/proc/self/mountinfo`, `swaps` that of `/proc/swaps`.
pub fn in_use(
    root: &SysRoot,
    disk: &BlockDeviceInfo,
    mountinfo: &str,
    swaps: &str,
) -> Result<Option<String>, Error> {
    if let Some(h) = disk.holders.first() {
        return Ok(Some(format!("{} is held by {h}", disk.name)));
    }
    let mut devices = vec![(disk.name.clone(), (disk.major, disk.minor))];
    for part in &disk.partitions {
        let dir = root.sys.join("block").join(&disk.name).join(part);
        if let Some(h) = list_names(&dir.join("holders"))?.first() {
            return Ok(Some(format!(
                "partition {part} of {} is held by {h}",
                disk.name
            )));
        }
        if let Some(mm) = read_opt(&dir.join("dev"))?
            .as_deref()
            .and_then(parse_major_minor)
        {
            devices.push((part.clone(), mm));
        }
    }
    for line in mountinfo.lines() {
        // id parent major:minor root mountpoint …
        let mut fields = line.split_whitespace();
        let (Some(mm), Some(mount_point)) = (fields.nth(2), fields.nth(1)) else {
            continue;
        };
        let Some(mm) = parse_major_minor(mm) else {
            continue;
        };
        if let Some((name, _)) = devices.iter().find(|(_, d)| *d == mm) {
            return Ok(Some(format!("{name} is mounted at {mount_point}")));
        }
    }
    for line in swaps.lines().skip(1) {
        let Some(path) = line.split_whitespace().next() else {
            continue;
        };
        let base = Path::new(path)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned());
        if let Some((name, _)) = devices.iter().find(|(n, _)| Some(n) == base.as_ref()) {
            return Ok(Some(format!("{name} is used as swap")));
        }
    }
    Ok(None)
}

/// [`in_use`] for the disk `name` on this machine now: reads `/proc/self/mountinfo` (an unreadable one is an
/// error, never "not in use") and `/proc/swaps` (absent without swap support). `None` also when sysfs has no
/// such disk.
pub fn in_use_now(root: &SysRoot, name: &str) -> Result<Option<String>, Error> {
    let Some(info) = device(root, name)? else {
        return Ok(None);
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read", "/proc/self/mountinfo"))?;
    let swaps = match fs::read_to_string("/proc/swaps") {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io("read", "/proc/swaps")(e)),
    };
    in_use(root, &info, &mountinfo, &swaps)
}

/// Parses `MAJOR:MINOR`.
pub fn parse_major_minor(text: &str) -> Option<(u32, u32)> {
    let (a, b) = text.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn read_serial(dir: &Path) -> Result<Option<String>, Error> {
    for attr in ["serial", "device/serial"] {
        if let Some(s) = read_opt(&dir.join(attr))? {
            if !s.is_empty() {
                return Ok(Some(s));
            }
        }
    }
    // SCSI: VPD page 0x80 (unit serial number): 4-byte header, byte 3 = length, then ASCII.
    let vpd = dir.join("device/vpd_pg80");
    match fs::read(&vpd) {
        Ok(bytes) if bytes.len() > 4 => {
            let len = usize::from(bytes[3]).min(bytes.len() - 4);
            let s = String::from_utf8_lossy(&bytes[4..4 + len])
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string();
            Ok((!s.is_empty()).then_some(s))
        }
        Ok(_) => Ok(None),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(Error::io("read", vpd)(e)),
    }
}

fn list_names(dir: &Path) -> Result<Vec<String>, Error> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut v: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            Ok(v)
        }
        Err(e) if absent(&e) => Ok(Vec::new()),
        Err(e) => Err(Error::io("list", dir)(e)),
    }
}

/// Reads a sysfs attribute, trimmed; `None` when it does not exist.
fn read_opt(path: &Path) -> Result<Option<String>, Error> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(
            String::from_utf8_lossy(&bytes)
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string(),
        )),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

fn read_u64(path: &Path) -> Result<Option<u64>, Error> {
    Ok(read_opt(path)?.and_then(|s| s.parse().ok()))
}

/// Errors that mean "not there" for sysfs attributes (the device may vanish while being read).
fn absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO | libc::ENOTDIR)
    )
}

#[cfg(test)]
pub(crate) mod fixture {
    //! Builders for fixture sysfs and dev trees.

    use std::fs;
    use std::path::{Path, PathBuf};

    use super::SysRoot;

    pub(crate) struct Tree {
        pub(crate) dir: tempfile::TempDir,
        pub(crate) root: SysRoot,
        pub(crate) by_id: PathBuf,
    }

    impl Tree {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let sys = dir.path().join("sys");
            let dev = dir.path().join("dev");
            let by_id = dir.path().join("by-id");
            for d in [sys.join("block"), dev.clone(), by_id.clone()] {
                fs::create_dir_all(d).expect("mkdir");
            }
            let mut root = SysRoot::new(sys, dev);
            root.simulated_nodes = true;
            Self { dir, root, by_id }
        }

        /// Adds a whole disk to sysfs and a simulated node for it under dev.
        pub(crate) fn disk(
            &self,
            name: &str,
            major: u32,
            minor: u32,
            size: u64,
            serial: Option<&str>,
        ) -> PathBuf {
            let d = self.root.sys().join("block").join(name);
            fs::create_dir_all(d.join("queue")).expect("mkdir");
            fs::create_dir_all(d.join("holders")).expect("mkdir");
            fs::write(d.join("dev"), format!("{major}:{minor}\n")).expect("write");
            fs::write(d.join("size"), format!("{}\n", size / 512)).expect("write");
            fs::write(d.join("queue/logical_block_size"), "512\n").expect("write");
            fs::write(d.join("ro"), "0\n").expect("write");
            if let Some(s) = serial {
                fs::write(d.join("serial"), s).expect("write");
            }
            let node = self.root.dev().join(name);
            fs::write(&node, format!("block {major}:{minor}")).expect("write");
            node
        }

        pub(crate) fn attr(&self, name: &str, rel: &str, value: &[u8]) {
            let p = self.root.sys().join("block").join(name).join(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, value).expect("write");
        }

        pub(crate) fn link(&self, link_name: &str, target: &Path) -> PathBuf {
            let l = self.by_id.join(link_name);
            std::os::unix::fs::symlink(target, &l).expect("symlink");
            l
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::Tree;
    use super::*;

    #[test]
    fn a_disk_mounted_held_or_swapped_is_in_use_and_a_bare_one_is_not() {
        let t = Tree::new();
        t.disk("vdb", 252, 16, 10 << 20, None);
        t.attr("vdb", "vdb1/partition", b"1\n");
        t.attr("vdb", "vdb1/dev", b"252:17\n");
        t.disk("vdc", 252, 32, 10 << 20, None);
        t.disk("vdd", 252, 48, 10 << 20, None);
        t.attr("vdd", "holders/dm-3", b"");
        t.disk("vde", 252, 64, 10 << 20, None);
        let mountinfo = "22 1 252:1 / / rw - ext4 /dev/vda1 rw\n\
                         40 22 252:17 / /srv/data rw,relatime - xfs /dev/vdb1 rw\n";
        let swaps = "Filename Type Size Used Priority\n/dev/vde partition 1024 0 -2\n";
        let info = |n: &str| device(&t.root, n).unwrap().unwrap();
        assert_eq!(
            in_use(&t.root, &info("vdb"), mountinfo, swaps)
                .unwrap()
                .as_deref(),
            Some("vdb1 is mounted at /srv/data")
        );
        assert_eq!(
            in_use(&t.root, &info("vdc"), mountinfo, swaps).unwrap(),
            None
        );
        assert_eq!(
            in_use(&t.root, &info("vdd"), mountinfo, swaps)
                .unwrap()
                .as_deref(),
            Some("vdd is held by dm-3")
        );
        assert_eq!(
            in_use(&t.root, &info("vde"), mountinfo, swaps)
                .unwrap()
                .as_deref(),
            Some("vde is used as swap")
        );
    }

    #[test]
    fn snapshot_reads_every_attribute() {
        let t = Tree::new();
        t.disk("vdb", 252, 16, 10 << 20, Some("0123456789abcdef0123\n"));
        t.attr("vdb", "ro", b"1\n");
        t.attr("vdb", "diskseq", b"42\n");
        t.attr("vdb", "queue/logical_block_size", b"4096\n");
        t.attr("vdb", "vdb1/partition", b"1\n");
        t.attr("vdb", "holders/dm-0", b"");
        t.disk("loop3", 7, 3, 1 << 20, None);
        t.attr("loop3", "loop/backing_file", b"/var/lib/x.img\n");
        t.attr("loop3", "diskseq", b"7\n");
        let all = snapshot(&t.root).expect("snapshot");
        assert_eq!(all.len(), 2);
        let l = &all[0];
        assert_eq!(l.name, "loop3");
        assert_eq!((l.major, l.minor), (7, 3));
        assert_eq!(l.backing_file.as_deref(), Some(Path::new("/var/lib/x.img")));
        assert_eq!(l.serial, None);
        let v = &all[1];
        assert_eq!(v.name, "vdb");
        assert_eq!(v.size, 10 << 20);
        assert_eq!(v.logical_block_size, 4096);
        assert_eq!(v.serial.as_deref(), Some("0123456789abcdef0123"));
        assert!(v.read_only);
        assert_eq!(v.partitions, vec!["vdb1".to_string()]);
        assert_eq!(v.holders, vec!["dm-0".to_string()]);
        assert_eq!(v.diskseq, Some(42));
        assert_eq!(v.backing_file, None);
    }

    #[test]
    fn scsi_serial_comes_from_vpd_page_80() {
        let t = Tree::new();
        t.disk("sdb", 8, 16, 1 << 20, None);
        let mut page = vec![0u8, 0x80, 0, 20];
        page.extend_from_slice(b"abcdef0123456789abcd");
        t.attr("sdb", "device/vpd_pg80", &page);
        let d = device(&t.root, "sdb").expect("read").expect("present");
        assert_eq!(d.serial.as_deref(), Some("abcdef0123456789abcd"));
    }

    #[test]
    fn the_running_system_snapshots() {
        let all = snapshot(&SysRoot::system()).expect("snapshot of /sys");
        for d in &all {
            assert!(!d.name.is_empty());
            assert!(d.logical_block_size >= 512, "{d:?}");
            assert_eq!(
                device(&SysRoot::system(), &d.name)
                    .expect("read")
                    .map(|x| x.name),
                Some(d.name.clone())
            );
        }
    }

    #[test]
    fn missing_device_is_none_and_bad_names_are_rejected() {
        let t = Tree::new();
        assert_eq!(device(&t.root, "vdz").expect("read"), None);
        let e = device(&t.root, "../etc").expect_err("must reject");
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
    }
}
