//! Event-driven waits for a device to appear or go away: inotify on the by-id directory
//! (`inotify(7)`), kernel uevents on a `NETLINK_KOBJECT_UEVENT` socket (`netlink(7)`), and a bounded
//! periodic rescan as a safety net. Checks read sysfs on the blocking pool, never on runtime threads.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchMask};
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{self, AddressFamily, RecvFlags, SocketFlags, SocketType};
use std::os::fd::AsRawFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use uuid::Uuid;

use crate::resolve::{serial_for_volume, ResolvedDevice, Resolver};
use crate::{Error, ErrorKind};

/// Opens a socket receiving kernel uevents (multicast group 1), non-blocking.
pub(crate) fn uevent_socket() -> io::Result<OwnedFd> {
    let fd = net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        Some(netlink::KOBJECT_UEVENT),
    )?;
    net::bind(&fd, &SocketAddrNetlink::new(0, 1))?;
    Ok(fd)
}

/// Starts an inotify watch on the entries of `dir`.
pub(crate) fn dir_watch(dir: &Path) -> io::Result<Inotify> {
    let ino = Inotify::init()?;
    ino.watches().add(
        dir,
        WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::ATTRIB
            | WatchMask::CLOSE_WRITE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF,
    )?;
    Ok(ino)
}

/// Registers an owned descriptor with the runtime for readability.
fn register<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is an `Inotify` or an `OwnedFd`: it owns its descriptor, keeps it open until it is
    // dropped with the `AsyncFd`, and always returns the same descriptor from `as_raw_fd`.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Wake-ups for anything that may have changed the devices: inotify on the by-id directory and kernel
/// block uevents. Either source may be missing; callers rescan on a timeout as well.
pub struct DeviceEvents {
    inotify: Option<AsyncFd<Inotify>>,
    uevent: Option<AsyncFd<OwnedFd>>,
}

impl DeviceEvents {
    /// Opens both sources (each one that cannot be opened is left out, logged at debug level).
    pub fn open(by_id_dir: &Path) -> Self {
        let inotify = match dir_watch(by_id_dir).and_then(register) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(dir = %by_id_dir.display(), error = %e, "no inotify watch; relying on uevents and rescans");
                None
            }
        };
        let uevent = match uevent_socket().and_then(register) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(error = %e, "no uevent socket; relying on inotify and rescans");
                None
            }
        };
        Self { inotify, uevent }
    }

    /// Returns when something may have changed, or after `timeout`.
    pub async fn next(&mut self, timeout: Duration) {
        let Self { inotify, uevent } = self;
        tokio::select! {
            r = drain_inotify(inotify) => if let Err(e) = r {
                tracing::debug!(error = %e, "inotify watch failed; dropping it");
                *inotify = None;
            },
            r = drain_uevents(uevent) => if let Err(e) = r {
                tracing::debug!(error = %e, "uevent socket failed; dropping it");
                *uevent = None;
            },
            () = tokio::time::sleep(timeout) => {}
        }
    }
}

async fn drain_inotify(fd: &mut Option<AsyncFd<Inotify>>) -> io::Result<()> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; 4096];
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut got = false;
        loop {
            match guard.get_inner_mut().read_events(&mut buf) {
                Ok(events) => {
                    got |= events.count() > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if got {
            return Ok(());
        }
    }
}

async fn drain_uevents(fd: &mut Option<AsyncFd<OwnedFd>>) -> io::Result<()> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut guard = fd.readable().await?;
        let mut block = false;
        loop {
            match net::recv(fd.get_ref(), &mut buf[..], RecvFlags::DONTWAIT) {
                Ok((n, _)) => block |= is_block_uevent(&buf[..n.min(buf.len())]),
                Err(rustix::io::Errno::AGAIN) => {
                    guard.clear_ready();
                    break;
                }
                // Overflow: events were lost, so treat it as a change.
                Err(rustix::io::Errno::NOBUFS) => block = true,
                Err(e) => return Err(e.into()),
            }
        }
        if block {
            return Ok(());
        }
    }
}

/// Whether a raw uevent message (`ACTION@DEVPATH\0KEY=VALUE\0…`) concerns the block subsystem.
fn is_block_uevent(msg: &[u8]) -> bool {
    msg.split(|&b| b == 0)
        .any(|field| field == b"SUBSYSTEM=block")
}

impl Resolver {
    /// Waits until the volume's device appears and verifies (serial, size), woken by inotify and
    /// uevents with a periodic rescan. Returns the device and how long the wait took. Fails at once
    /// on a device that is there but wrong; `Timeout` at the deadline names what was looked for.
    pub async fn wait_for(
        &self,
        volume_id: &Uuid,
        expected_size: u64,
        deadline: Duration,
    ) -> Result<(ResolvedDevice, Duration), Error> {
        let start = Instant::now();
        let mut events = DeviceEvents::open(&self.by_id_dir);
        let id = *volume_id;
        loop {
            let r = self.clone();
            let outcome = tokio::task::spawn_blocking(move || r.resolve(&id, expected_size))
                .await
                .map_err(join_error)?;
            let last = match outcome {
                Ok(dev) => return Ok((dev, start.elapsed())),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Io) => e,
                Err(e) => return Err(e),
            };
            let waited = start.elapsed();
            if waited >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "the device of volume {id} (serial {}, by-id dir {}, size {expected_size} bytes)",
                        serial_for_volume(&id),
                        self.by_id_dir.display()
                    ),
                    waited,
                    last: last.to_string(),
                });
            }
            events.next(self.rescan.min(deadline - waited)).await;
        }
    }

    /// Waits until `device` (found earlier for `volume_id`) is gone: no by-id link or serial leads to
    /// it and the kernel device is removed or detached. Returns how long that took.
    pub async fn wait_gone(
        &self,
        volume_id: &Uuid,
        device: &ResolvedDevice,
        deadline: Duration,
    ) -> Result<Duration, Error> {
        let start = Instant::now();
        let mut events = DeviceEvents::open(&self.by_id_dir);
        let id = *volume_id;
        loop {
            let r = self.clone();
            let d = device.clone();
            let gone = tokio::task::spawn_blocking(move || r.is_gone(&id, &d))
                .await
                .map_err(join_error)??;
            if gone {
                return Ok(start.elapsed());
            }
            let waited = start.elapsed();
            if waited >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "device {} of volume {id} to go away",
                        device.dev_path.display()
                    ),
                    waited,
                    last: format!("still present (by-id {})", device.by_id_path.display()),
                });
            }
            events.next(self.rescan.min(deadline - waited)).await;
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::io("run a device check on the blocking pool for", "sysfs")(io::Error::other(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::fixture::Tree;

    #[test]
    fn uevent_filter_sees_block_subsystem_only() {
        assert!(is_block_uevent(
            b"add@/devices/virtual/block/loop3\0ACTION=add\0SUBSYSTEM=block\0"
        ));
        assert!(!is_block_uevent(
            b"add@/devices/virtual/net/x\0ACTION=add\0SUBSYSTEM=net\0"
        ));
    }

    #[tokio::test]
    async fn wait_for_wakes_on_the_link_not_the_rescan() {
        let t = Tree::new();
        let v = Uuid::parse_str("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b").expect("uuid");
        let node = t.disk("vdb", 252, 16, 1 << 20, None);
        // A long rescan interval: only the inotify event can end the wait quickly.
        let r =
            Resolver::new(t.root.clone(), t.by_id.clone()).rescan_interval(Duration::from_secs(30));
        let by_id = t.by_id.clone();
        let maker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::os::unix::fs::symlink(&node, by_id.join("virtio-6f0e1c2a3b4d4e5f8a9b"))
                .expect("link");
            Instant::now()
        });
        let (dev, took) = r
            .wait_for(&v, 1 << 20, Duration::from_secs(10))
            .await
            .expect("wait");
        let made = maker.await.expect("maker");
        assert_eq!(dev.kernel_name.as_deref(), Some("vdb"));
        assert!(took >= Duration::from_millis(100));
        assert!(
            made.elapsed() < Duration::from_secs(2),
            "woke {:?} after the link",
            made.elapsed()
        );
    }

    #[tokio::test]
    async fn wait_for_times_out_naming_the_volume() {
        let t = Tree::new();
        let v = Uuid::parse_str("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b").expect("uuid");
        let r = Resolver::new(t.root.clone(), t.by_id.clone())
            .rescan_interval(Duration::from_millis(20));
        let e = r
            .wait_for(&v, 1, Duration::from_millis(200))
            .await
            .expect_err("nothing comes");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.to_string().contains("6f0e1c2a3b4d4e5f8a9b"), "{e}");
    }

    #[tokio::test]
    async fn wait_for_fails_fast_on_a_wrong_device() {
        let t = Tree::new();
        let v = Uuid::parse_str("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b").expect("uuid");
        let node = t.disk("vdb", 252, 16, 1 << 20, None);
        t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &node);
        let r = Resolver::new(t.root.clone(), t.by_id.clone());
        let start = Instant::now();
        let e = r
            .wait_for(&v, 2 << 20, Duration::from_secs(10))
            .await
            .expect_err("wrong size");
        assert_eq!(e.kind(), ErrorKind::Mismatch);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn wait_gone_sees_unlink_and_detach() {
        let t = Tree::new();
        let v = Uuid::parse_str("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b").expect("uuid");
        let node = t.disk("loop9", 7, 9, 1 << 20, None);
        let link = t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &node);
        let r =
            Resolver::new(t.root.clone(), t.by_id.clone()).rescan_interval(Duration::from_secs(30));
        let dev = r.resolve(&v, 1 << 20).expect("resolve");
        let e = r
            .wait_gone(&v, &dev, Duration::from_millis(100))
            .await
            .expect_err("still there");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        let size = t.root.sys().join("block/loop9/size");
        let remover = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(size, "0\n").expect("detach");
            std::fs::remove_file(link).expect("unlink");
        });
        let took = r
            .wait_gone(&v, &dev, Duration::from_secs(10))
            .await
            .expect("gone");
        remover.await.expect("remover");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[tokio::test]
    async fn wait_gone_in_file_mode_needs_only_the_link_to_go() {
        let t = Tree::new();
        let v = Uuid::parse_str("6f0e1c2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b").expect("uuid");
        let file = t.dir.path().join("vol.img");
        std::fs::write(&file, vec![0u8; 8192]).expect("write");
        let link = t.link("virtio-6f0e1c2a3b4d4e5f8a9b", &file);
        let r = Resolver::new(t.root.clone(), t.by_id.clone())
            .allow_regular_files(true)
            .rescan_interval(Duration::from_secs(30));
        let (dev, _) = r
            .wait_for(&v, 8192, Duration::from_secs(5))
            .await
            .expect("present");
        assert_eq!(dev.kernel_name, None);
        let remover = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::remove_file(link).expect("unlink");
        });
        let took = r
            .wait_gone(&v, &dev, Duration::from_secs(10))
            .await
            .expect("gone");
        remover.await.expect("remover");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(file.exists(), "the file itself stays");
    }

    #[tokio::test]
    async fn root_uevent_socket_sees_a_loop_attach() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (loop devices); run it as root or skip tests named root_*"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("u.img");
        std::fs::File::create(&file)
            .expect("create")
            .set_len(1 << 20)
            .expect("size");
        let mut events = DeviceEvents::open(dir.path());
        assert!(events.uevent.is_some(), "uevent socket must open as root");
        // Drop the inotify source so only a uevent can wake us.
        events.inotify = None;
        let dev = crate::LoopDevice::attach(&file, false).expect("attach");
        let woke =
            tokio::time::timeout(Duration::from_secs(5), drain_uevents(&mut events.uevent)).await;
        assert!(
            matches!(woke, Ok(Ok(()))),
            "no block uevent within 5 s of attaching {}",
            dev.path().display()
        );
    }
}
