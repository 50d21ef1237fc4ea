//! Finding a CloudStack volume's block device by identity and verifying it before use.
//!
//! CloudStack's KVM agent gives each virtio disk the serial "first 20 hex digits of the volume UUID
//! without dashes". A device is found through the by-id directory (`virtio-<serial>`,
//! `scsi-0QEMU_QEMU_HARDDISK_<serial>`, `scsi-<serial>`) and by scanning sysfs serials (which needs no
//! udev), then verified: the link leads to a block device, the kernel's serial matches where it exposes
//! one (a loop device, which has none, must not have a backing file named for another volume, as the
//! simulator's are named for theirs), and the size equals the cloud's. Nothing is ever picked by order, time or size alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

use crate::node::{self, Node};
use crate::sysfs::{self, BlockDeviceInfo, SysRoot};
use crate::{Error, ErrorKind};

/// The serial CloudStack gives a volume's virtio disk: the first 20 hex digits of its UUID, no dashes.
pub fn serial_for_volume(volume_id: &Uuid) -> String {
    let mut s = volume_id.simple().to_string();
    s.truncate(20);
    s
}

/// The by-id link names a volume's disk may have, most specific first.
pub fn by_id_names(serial: &str) -> [String; 3] {
    [
        format!("virtio-{serial}"),
        format!("scsi-0QEMU_QEMU_HARDDISK_{serial}"),
        format!("scsi-{serial}"),
    ]
}

/// Whether a loop device's backing file is named for another volume than the one whose serial is `serial`:
/// its name carries a volume id or serial (a run of at least 20 hex digits, dashes aside), and none is this
/// volume's. A name that carries none says nothing either way.
fn backing_names_another_volume(backing: &Path, serial: &str) -> bool {
    let Some(name) = backing.file_name() else {
        return false;
    };
    let name = name.to_string_lossy().to_ascii_lowercase();
    let ids: Vec<String> = name
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .map(|t| t.replace('-', ""))
        .filter(|t| t.len() >= serial.len())
        .collect();
    !ids.is_empty() && !ids.iter().any(|t| t.contains(serial))
}

/// Whether a serial read from the kernel is the volume's serial (the 20-digit form, or the full
/// 32-digit UUID some buses carry).
fn serial_matches(found: &str, serial: &str) -> bool {
    let found = found.trim().to_ascii_lowercase();
    found == serial || (found.len() == 32 && found.starts_with(serial))
}

/// A verified device of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDevice {
    /// Kernel name (`vdb`, `loop3`); `None` for a regular file.
    pub kernel_name: Option<String>,
    pub major_minor: Option<(u32, u32)>,
    /// The by-id link the device was found through; the device node itself when it was found by
    /// scanning sysfs serials and no link exists.
    pub by_id_path: PathBuf,
    /// The node to open: `/dev/loop3`, `/dev/vdb`, or the file.
    pub dev_path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// The serial the kernel exposes, if it exposes one.
    pub serial: Option<String>,
}

/// Finds and verifies volumes' devices under a sysfs/dev root and a by-id directory.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub(crate) root: SysRoot,
    pub(crate) by_id_dir: PathBuf,
    pub(crate) allow_regular_files: bool,
    pub(crate) rescan: Duration,
}

impl Resolver {
    /// A resolver that accepts only block devices.
    pub fn new(root: SysRoot, by_id_dir: PathBuf) -> Self {
        Self {
            root,
            by_id_dir,
            allow_regular_files: false,
            rescan: Duration::from_millis(500),
        }
    }

    /// Accepts a regular file where a block device is expected (the file-backed simulator mode only).
    pub fn allow_regular_files(mut self, yes: bool) -> Self {
        self.allow_regular_files = yes;
        self
    }

    /// How often waits rescan when no event arrives (default 500 ms).
    pub fn rescan_interval(mut self, every: Duration) -> Self {
        self.rescan = every.max(Duration::from_millis(10));
        self
    }

    /// The by-id directory this resolver looks in.
    pub fn by_id_dir(&self) -> &Path {
        &self.by_id_dir
    }

    /// The sysfs/dev root this resolver reads.
    pub fn root(&self) -> &SysRoot {
        &self.root
    }

    /// Finds the volume's device and verifies it, including `size == expected_size`.
    pub fn resolve(&self, volume_id: &Uuid, expected_size: u64) -> Result<ResolvedDevice, Error> {
        let dev = self.find(volume_id)?;
        if dev.size != expected_size {
            return Err(Error::Mismatch {
                what: "size",
                path: dev.dev_path,
                expected: format!("{expected_size} bytes (the cloud's size of volume {volume_id})"),
                found: format!("{} bytes", dev.size),
            });
        }
        Ok(dev)
    }

    /// Finds the volume's device without a size check; `None` when there is none.
    /// A device that is there but fails verification (wrong serial, not a block device) is an error.
    pub fn lookup(&self, volume_id: &Uuid) -> Result<Option<ResolvedDevice>, Error> {
        match self.find(volume_id) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Finds and identity-checks the device (no size check). `NotFound` when there is none yet.
    pub(crate) fn find(&self, volume_id: &Uuid) -> Result<ResolvedDevice, Error> {
        let serial = serial_for_volume(volume_id);
        let snap = sysfs::snapshot(&self.root)?;
        let mut by_link: Option<ResolvedDevice> = None;
        let mut notes: Vec<String> = Vec::new();
        for name in by_id_names(&serial) {
            let link = self.by_id_dir.join(&name);
            match fs::symlink_metadata(&link) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("inspect", link)(e)),
            }
            let target = match fs::canonicalize(&link) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let to = fs::read_link(&link)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    notes.push(format!(
                        "stale link {} -> {to} (target missing)",
                        link.display()
                    ));
                    continue;
                }
                Err(e) => return Err(Error::io("follow link", link)(e)),
            };
            let dev = match self.identify(&link, &target, &serial, &snap) {
                Ok(d) => d,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    notes.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            match &by_link {
                None => by_link = Some(dev),
                Some(prev) if prev.dev_path == dev.dev_path => {}
                Some(prev) => {
                    return Err(Error::Mismatch {
                        what: "by-id links",
                        path: link,
                        expected: format!(
                            "{} (as {} says)",
                            prev.dev_path.display(),
                            prev.by_id_path.display()
                        ),
                        found: dev.dev_path.display().to_string(),
                    })
                }
            }
        }

        let carriers: Vec<&BlockDeviceInfo> = snap
            .iter()
            .filter(|d| {
                d.serial
                    .as_deref()
                    .is_some_and(|s| serial_matches(s, &serial))
            })
            .collect();
        if let [a, b, ..] = carriers.as_slice() {
            return Err(Error::Mismatch {
                what: "serial",
                path: self.root.dev().join(&b.name),
                expected: format!("one device with serial {serial} ({})", a.name),
                found: format!("also {}", b.name),
            });
        }
        match (by_link, carriers.first()) {
            (Some(d), Some(c)) if d.kernel_name.as_deref() != Some(c.name.as_str()) => {
                Err(Error::Mismatch {
                    what: "device",
                    path: d.by_id_path.clone(),
                    expected: format!("{} (the disk whose serial is {serial})", c.name),
                    found: d.dev_path.display().to_string(),
                })
            }
            (Some(d), _) => Ok(d),
            (None, Some(c)) => {
                let node = self.root.dev().join(&c.name);
                let dev = self.identify(&node, &node, &serial, &snap)?;
                Ok(dev)
            }
            (None, None) => {
                let mut what = format!(
                    "device of volume {volume_id} (serial {serial}: no link virtio-{serial}, \
                     scsi-0QEMU_QEMU_HARDDISK_{serial} or scsi-{serial} in {}, and no disk in {}/block \
                     carries the serial",
                    self.by_id_dir.display(),
                    self.root.sys().display()
                );
                for n in notes {
                    what.push_str("; ");
                    what.push_str(&n);
                }
                what.push(')');
                Err(Error::NotFound {
                    what,
                    hint: "check that the volume is attached to this machine",
                })
            }
        }
    }

    /// Identifies what `target` (reached through `link`) is and checks it against `serial`.
    fn identify(
        &self,
        link: &Path,
        target: &Path,
        serial: &str,
        snap: &[BlockDeviceInfo],
    ) -> Result<ResolvedDevice, Error> {
        match node::probe(&self.root, target)? {
            Node::Block { major, minor } => {
                let Some(d) = snap.iter().find(|d| (d.major, d.minor) == (major, minor)) else {
                    return Err(Error::Mismatch {
                        what: "device",
                        path: link.to_path_buf(),
                        expected: "a whole disk listed in sysfs".into(),
                        found: format!(
                            "block device {major}:{minor} at {} (a partition or unknown disk)",
                            target.display()
                        ),
                    });
                };
                if let Some(s) = &d.serial {
                    if !serial_matches(s, serial) {
                        return Err(Error::Mismatch {
                            what: "serial",
                            path: link.to_path_buf(),
                            expected: serial.to_string(),
                            found: format!("{s} (on {})", d.name),
                        });
                    }
                } else if let Some(backing) = &d.backing_file {
                    // A loop device exposes no serial: one whose backing file is named for another volume (the
                    // simulator's are `<uuid>.img`) is that volume's disk, so a link led to it is refused like a
                    // wrong serial.
                    if backing_names_another_volume(backing, serial) {
                        return Err(Error::Mismatch {
                            what: "loop device backing file",
                            path: link.to_path_buf(),
                            expected: format!(
                                "a backing file named for the volume (serial {serial}) or for none"
                            ),
                            found: format!("{} (behind {})", backing.display(), d.name),
                        });
                    }
                }
                if d.size == 0 {
                    return Err(Error::NotFound {
                        what: format!("medium of {} (size 0)", target.display()),
                        hint: "the device exists but nothing is attached to it yet",
                    });
                }
                Ok(ResolvedDevice {
                    kernel_name: Some(d.name.clone()),
                    major_minor: Some((major, minor)),
                    by_id_path: link.to_path_buf(),
                    dev_path: target.to_path_buf(),
                    size: d.size,
                    serial: d.serial.clone(),
                })
            }
            Node::Regular { size } if self.allow_regular_files => Ok(ResolvedDevice {
                kernel_name: None,
                major_minor: None,
                by_id_path: link.to_path_buf(),
                dev_path: target.to_path_buf(),
                size,
                serial: None,
            }),
            Node::Regular { .. } => Err(Error::NotBlockDevice {
                path: target.to_path_buf(),
                found: "regular file",
            }),
            Node::Other(kind) => Err(Error::NotBlockDevice {
                path: target.to_path_buf(),
                found: kind,
            }),
        }
    }

    /// Whether `device` (found earlier for `volume_id`) is gone: no link or serial leads to it any
    /// more, and the kernel device is removed, detached (size 0) or now another disk.
    pub(crate) fn is_gone(&self, volume_id: &Uuid, device: &ResolvedDevice) -> Result<bool, Error> {
        match self.find(volume_id) {
            Ok(d) if d.dev_path == device.dev_path && d.major_minor == device.major_minor => {
                return Ok(false)
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::NotFound | ErrorKind::Mismatch | ErrorKind::NotBlockDevice
                ) => {}
            Err(e) => return Err(e),
        }
        let Some(name) = &device.kernel_name else {
            return Ok(true);
        };
        Ok(match sysfs::device(&self.root, name)? {
            None => true,
            Some(info) => {
                info.size == 0
                    || Some((info.major, info.minor)) != device.major_minor
                    || (device.serial.is_some() && info.serial != device.serial)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::fixture::Tree;

    const GIB: u64 = 1 << 30;

    fn vol(s: &str) -> Uuid {
        Uuid::parse_str(s).expect("uuid")
    }

    fn resolver(t: &Tree) -> Resolver {
        Resolver::new(t.root.clone(), t.by_id.clone())
    }

    #[test]
    fn serial_is_first_20_hex_digits() {
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(serial_for_volume(&v), "6f0e1c2a3b4d4e5f8a9b");
    }

    #[test]
    fn matching_serial_through_virtio_link() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        t.disk("vda", 252, 0, 20 * GIB, Some("root-disk-serial"));
        let node = t.disk("vdb", 252, 16, GIB, Some("6f0e1c2a3b4d4e5f8a9b"));
        let link = t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &node);
        let d = resolver(&t).resolve(&v, GIB).expect("resolve");
        assert_eq!(d.kernel_name.as_deref(), Some("vdb"));
        assert_eq!(d.major_minor, Some((252, 16)));
        assert_eq!(d.by_id_path, link);
        assert_eq!(d.dev_path, fs::canonicalize(&node).expect("canon"));
        assert_eq!(d.size, GIB);
        assert_eq!(d.serial.as_deref(), Some("6f0e1c2a3b4d4e5f8a9b"));
    }

    #[test]
    fn found_by_sysfs_serial_without_any_link() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        t.disk("vdc", 252, 32, GIB, Some("6f0e1c2a3b4d4e5f8a9b\n"));
        let d = resolver(&t).resolve(&v, GIB).expect("resolve");
        assert_eq!(d.kernel_name.as_deref(), Some("vdc"));
        assert_eq!(d.dev_path, t.root.dev().join("vdc"));
    }

    #[test]
    fn mismatched_serial_names_both_values() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let node = t.disk("vdb", 252, 16, GIB, Some("ffffffffffffffffffff"));
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &node);
        let e = resolver(&t).resolve(&v, GIB).expect_err("must not accept");
        assert_eq!(e.kind(), ErrorKind::Mismatch);
        let msg = e.to_string();
        assert!(
            msg.contains("6f0e1c2a3b4d4e5f8a9b") && msg.contains("ffffffffffffffffffff"),
            "{msg}"
        );
        assert!(matches!(resolver(&t).lookup(&v), Err(e) if e.kind() == ErrorKind::Mismatch));
    }

    #[test]
    fn link_disagreeing_with_the_serial_carrier_is_refused() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let wrong = t.disk("loop0", 7, 0, GIB, None);
        t.disk("vdb", 252, 16, GIB, Some("6f0e1c2a3b4d4e5f8a9b"));
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &wrong);
        let e = resolver(&t).resolve(&v, GIB).expect_err("must not accept");
        assert_eq!(e.kind(), ErrorKind::Mismatch);
        assert!(e.to_string().contains("vdb"), "{e}");
    }

    #[test]
    fn a_loop_device_is_the_volume_s_only_when_its_backing_file_is_named_for_it() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let other = t.disk("loop2", 7, 2, GIB, None);
        t.attr(
            "loop2",
            "loop/backing_file",
            b"/var/lib/sim/volumes/0d3e9c11-5a2b-4c6d-9e8f-7a6b5c4d3e2f.img\n",
        );
        let link = t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &other);
        let e = resolver(&t)
            .resolve(&v, GIB)
            .expect_err("another volume's loop device");
        assert_eq!(e.kind(), ErrorKind::Mismatch);
        assert!(e.to_string().contains("0d3e9c11-5a2b"), "{e}");
        let own = t.disk("loop3", 7, 3, GIB, None);
        t.attr(
            "loop3",
            "loop/backing_file",
            b"/var/lib/sim/volumes/6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b.img (deleted)\n",
        );
        fs::remove_file(&link).expect("unlink");
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &own);
        let d = resolver(&t).resolve(&v, GIB).expect("its own loop device");
        assert_eq!(d.kernel_name.as_deref(), Some("loop3"));
        // A backing file named for no volume says nothing: the link and the size decide, as for any disk
        // without a serial.
        let plain = t.disk("loop4", 7, 4, GIB, None);
        t.attr(
            "loop4",
            "loop/backing_file",
            b"/srv/disks/data-disk-1.img\n",
        );
        fs::remove_file(t.by_id.join("virtio-6f0e1c2a3b4d4e5f8a9b")).expect("unlink");
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &plain);
        let d = resolver(&t)
            .resolve(&v, GIB)
            .expect("a loop device named for no volume");
        assert_eq!(d.kernel_name.as_deref(), Some("loop4"));
    }

    #[test]
    fn wrong_size_names_both_values() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let node = t.disk("vdb", 252, 16, GIB, Some("6f0e1c2a3b4d4e5f8a9b"));
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &node);
        let e = resolver(&t)
            .resolve(&v, 2 * GIB)
            .expect_err("must not accept");
        assert_eq!(e.kind(), ErrorKind::Mismatch);
        let msg = e.to_string();
        assert!(
            msg.contains(&(2 * GIB).to_string()) && msg.contains(&GIB.to_string()),
            "{msg}"
        );
        // lookup does not check the size
        assert_eq!(
            resolver(&t).lookup(&v).expect("lookup").map(|d| d.size),
            Some(GIB)
        );
    }

    #[test]
    fn stale_link_to_missing_device_is_not_found() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &t.root.dev().join("vdq"));
        let e = resolver(&t).resolve(&v, GIB).expect_err("nothing there");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("stale link"), "{e}");
        assert_eq!(resolver(&t).lookup(&v).expect("lookup"), None);
    }

    #[test]
    fn link_to_non_block_file_is_refused_unless_files_are_allowed() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let file = t.dir.path().join("vol.img");
        fs::write(&file, vec![0u8; 4096]).expect("write");
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &file);
        let e = resolver(&t).resolve(&v, 4096).expect_err("regular file");
        assert_eq!(e.kind(), ErrorKind::NotBlockDevice);
        assert!(e.to_string().contains("regular file"), "{e}");

        // regular-file mode (simulator without root)
        let r = resolver(&t).allow_regular_files(true);
        let d = r.resolve(&v, 4096).expect("file mode");
        assert_eq!(d.kernel_name, None);
        assert_eq!(d.major_minor, None);
        assert_eq!(d.dev_path, fs::canonicalize(&file).expect("canon"));
        assert_eq!(
            r.resolve(&v, 8192).expect_err("size").kind(),
            ErrorKind::Mismatch
        );
    }

    #[test]
    fn link_to_directory_is_not_a_block_device() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", t.dir.path());
        let e = resolver(&t)
            .allow_regular_files(true)
            .resolve(&v, 1)
            .expect_err("dir");
        assert_eq!(e.kind(), ErrorKind::NotBlockDevice);
    }

    #[test]
    fn virtio_scsi_names_are_found() {
        let t = Tree::new();
        let a = vol("11111111-2222-4333-8444-555555555555");
        let b = vol("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee");
        let sdb = t.disk("sdb", 8, 16, GIB, None);
        let mut page = vec![0u8, 0x80, 0, 20];
        page.extend_from_slice(b"aaaaaaaabbbb4ccc8ddd");
        let sdc = t.disk("sdc", 8, 32, 2 * GIB, None);
        t.attr("sdc", "device/vpd_pg80", &page);
        t.link("scsi-0QEMU_QEMU_HARDDISK_11111111222243338444", &sdb);
        t.link("scsi-aaaaaaaabbbb4ccc8ddd", &sdc);
        let r = resolver(&t);
        assert_eq!(
            r.resolve(&a, GIB).expect("a").kernel_name.as_deref(),
            Some("sdb")
        );
        let db = r.resolve(&b, 2 * GIB).expect("b");
        assert_eq!(db.kernel_name.as_deref(), Some("sdc"));
        assert_eq!(db.serial.as_deref(), Some("aaaaaaaabbbb4ccc8ddd"));
    }

    #[test]
    fn two_links_to_different_devices_are_refused() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let x = t.disk("sdb", 8, 16, GIB, None);
        let y = t.disk("sdc", 8, 32, GIB, None);
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &x);
        t.link("scsi-6f0e1c2a3b4d4e5f8a9b", &y);
        assert_eq!(
            resolver(&t).resolve(&v, GIB).expect_err("ambiguous").kind(),
            ErrorKind::Mismatch
        );
    }

    #[test]
    fn partition_target_is_refused() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        t.disk("vdb", 252, 16, GIB, None);
        let part = t.root.dev().join("vdb1");
        fs::write(&part, "block 252:17").expect("write");
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &part);
        assert_eq!(
            resolver(&t).resolve(&v, GIB).expect_err("partition").kind(),
            ErrorKind::Mismatch
        );
    }

    #[test]
    fn gone_after_link_removed_and_device_detached() {
        let t = Tree::new();
        let v = vol("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b");
        let node = t.disk("loop5", 7, 5, GIB, None);
        let link = t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &node);
        let r = resolver(&t);
        let d = r.resolve(&v, GIB).expect("resolve");
        assert!(!r.is_gone(&v, &d).expect("check"));
        fs::remove_file(&link).expect("unlink");
        assert!(!r.is_gone(&v, &d).expect("check"), "device still attached");
        t.attr("loop5", "size", b"0\n");
        assert!(r.is_gone(&v, &d).expect("check"));
    }
}
