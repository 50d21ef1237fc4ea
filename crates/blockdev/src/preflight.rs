//! Privilege preflight: can this process do what device handling needs, and if not, how to grant it.
//!
//! Checks: CAP_SYS_ADMIN (buffer flush, loop devices), opening a block device read-write, creating and
//! removing a link in the names directory, opening a `NETLINK_KOBJECT_UEVENT` socket, and an inotify
//! watch on the by-id directory. Each failed check carries the fix (systemd settings included).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::names::StableNames;
use crate::wait::{dir_watch, uevent_socket};

/// The outcome of all checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Stable identifier: `cap_sys_admin`, `block_device_rw`, `names_dir`, `uevents`, `by_id_watch`.
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to grant what is missing (only for failed checks).
    pub fix: Option<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The failed checks.
    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.ok)
    }
}

fn pass(name: &'static str, detail: String) -> Check {
    Check {
        name,
        ok: true,
        detail,
        fix: None,
    }
}

fn fail(name: &'static str, detail: String, fix: String) -> Check {
    Check {
        name,
        ok: false,
        detail,
        fix: Some(fix),
    }
}

const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability mask of this process, from `/proc/self/status`.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Runs every check. `probe_block_device`, when given, is opened read-write (nothing is written).
pub fn run(by_id_dir: &Path, names_dir: &Path, probe_block_device: Option<&Path>) -> Report {
    let mut checks = Vec::new();

    checks.push(match effective_caps() {
        Some(caps) if caps & (1 << CAP_SYS_ADMIN) != 0 => pass("cap_sys_admin", "CAP_SYS_ADMIN is effective".into()),
        Some(_) => fail(
            "cap_sys_admin",
            "CAP_SYS_ADMIN is not effective (needed to flush device buffers and manage loop devices)".into(),
            "run as root, or grant it (systemd: AmbientCapabilities=CAP_SYS_ADMIN and CapabilityBoundingSet=CAP_SYS_ADMIN)".into(),
        ),
        None => fail(
            "cap_sys_admin",
            "could not read the capability set from /proc/self/status".into(),
            "mount /proc in the daemon's namespace (systemd: ProtectProc=default)".into(),
        ),
    });

    if let Some(dev) = probe_block_device {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dev)
            .and_then(|f| f.metadata());
        checks.push(match opened {
            Ok(m) if m.file_type().is_block_device() => {
                pass("block_device_rw", format!("opened {} read-write", dev.display()))
            }
            Ok(_) => fail(
                "block_device_rw",
                format!("{} is not a block device", dev.display()),
                "pass a block device node to probe".into(),
            ),
            Err(e) => fail(
                "block_device_rw",
                format!("cannot open {} read-write: {e}", dev.display()),
                "run as root or in the disk group, and allow device access (systemd: DeviceAllow=block-virtblk rw, \
                 DeviceAllow=block-sd rw, DeviceAllow=block-loop rw; PrivateDevices=no)"
                    .into(),
            ),
        });
    }

    let names = StableNames::new(names_dir.to_path_buf());
    let probe_name = format!("volpreflight-{}", std::process::id());
    let link = names
        .link(&probe_name, Path::new("/dev/null"))
        .and_then(|_| names.unlink(&probe_name));
    checks.push(match link {
        Ok(_) => pass("names_dir", format!("created and removed a link in {}", names_dir.display())),
        Err(e) => fail(
            "names_dir",
            format!("cannot create links in {}: {e}", names_dir.display()),
            format!(
                "create {0} and make it writable by the daemon (systemd: ReadWritePaths={0} or StateDirectory=)",
                names_dir.display()
            ),
        ),
    });

    checks.push(match uevent_socket() {
        Ok(_) => pass("uevents", "opened a NETLINK_KOBJECT_UEVENT socket".into()),
        Err(e) => fail(
            "uevents",
            format!("cannot open a NETLINK_KOBJECT_UEVENT socket: {e}"),
            "allow netlink sockets (systemd: RestrictAddressFamilies= must include AF_NETLINK; PrivateNetwork=no)".into(),
        ),
    });

    checks.push(match dir_watch(by_id_dir) {
        Ok(_) => pass("by_id_watch", format!("watching {} with inotify", by_id_dir.display())),
        Err(e) => fail(
            "by_id_watch",
            format!("cannot watch {} with inotify: {e}", by_id_dir.display()),
            format!(
                "make sure {0} exists and is readable (systemd: ReadOnlyPaths={0}); if inotify instances \
                 are exhausted raise fs.inotify.max_user_instances",
                by_id_dir.display()
            ),
        ),
    });

    Report { checks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dirs_fail_with_fixes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").expect("write");
        // names dir below a regular file cannot be created; by-id dir does not exist
        let r = run(&dir.path().join("absent"), &file.join("names"), Some(&file));
        assert!(!r.ok());
        let failed: Vec<&str> = r.failed().map(|c| c.name).collect();
        for name in ["names_dir", "by_id_watch", "block_device_rw"] {
            assert!(failed.contains(&name), "{name} must fail: {r:?}");
        }
        assert!(r.failed().all(|c| c.fix.is_some()));
    }

    #[test]
    fn usable_dirs_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = run(dir.path(), &dir.path().join("names"), None);
        for name in ["names_dir", "by_id_watch", "uevents"] {
            let c = r
                .checks
                .iter()
                .find(|c| c.name == name)
                .expect("check present");
            assert!(c.ok, "{c:?}");
        }
        assert!(StableNames::new(dir.path().join("names"))
            .list()
            .expect("list")
            .is_empty());
    }
}
