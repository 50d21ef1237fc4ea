//! Loop devices through `/dev/loop-control` (see `loop(4)`): attach a file, detach, find by backing file.
//!
//! A [`LoopDevice`] owns an attached device and detaches it when dropped, so tests clean up even when
//! they fail; [`LoopDevice::keep`] hands the device over to outlive the handle. Devices are attached
//! without autoclear (they persist while kept) and without direct I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::{self, LoopConfig, LoopInfo64};
use crate::sysfs::SysRoot;
use crate::Error;

const LOOP_CONTROL: &str = "/dev/loop-control";
/// How often to try again when another process takes the free index first.
const ATTACH_ATTEMPTS: usize = 32;
/// How long a new `/dev/loopN` node may take to appear.
const NODE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a detach waits for the kernel to finish it. While another process (udev probing a new
/// device, say) holds the device open, `LOOP_CLR_FD` only marks it for detaching at the last close.
const RELEASE_DEADLINE: Duration = Duration::from_secs(2);

/// An attached loop device; dropping it detaches the device (`LOOP_CLR_FD`) unless it was kept.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    /// `None` once kept or detached.
    file: Option<File>,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device (read-only when asked).
    ///
    /// Uses `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE`, falling back to `LOOP_SET_FD` + `LOOP_SET_STATUS64`
    /// on kernels without `LOOP_CONFIGURE`; retries when another process grabs the same index.
    pub fn attach(file: &Path, read_only: bool) -> Result<LoopDevice, Error> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(file)
            .map_err(Error::io("open the backing file", file))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(LOOP_CONTROL)
            .map_err(Error::io(
                "open (needs CAP_SYS_ADMIN and the loop module)",
                LOOP_CONTROL,
            ))?;
        let mut last_busy = None;
        for _ in 0..ATTACH_ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index; the fd is a valid open file.
            let index = unsafe { libc::ioctl(control.as_raw_fd(), sys::LOOP_CTL_GET_FREE as _) };
            if index < 0 {
                return Err(Error::io("get a free loop device from", LOOP_CONTROL)(
                    io::Error::last_os_error(),
                ));
            }
            let path = PathBuf::from(format!("/dev/loop{index}"));
            let dev = match open_new_node(&path, read_only) {
                Ok(dev) => dev,
                // The index was being torn down by a concurrent detach (ENXIO): ask for a free one again.
                Err(e) if e.kind() == crate::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match configure(&dev, &backing, file, read_only) {
                Ok(()) => {
                    tracing::debug!(device = %path.display(), file = %file.display(), "loop device attached");
                    return Ok(LoopDevice {
                        path,
                        file: Some(dev),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last_busy = Some(e);
                }
                Err(e) => return Err(Error::io("attach the backing file to", path)(e)),
            }
        }
        Err(Error::io(
            "attach (every free loop device was taken first)",
            file,
        )(last_busy.unwrap_or_else(|| {
            io::Error::from_raw_os_error(libc::EBUSY)
        })))
    }

    /// The device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the device attached after this handle is gone; returns its node.
    pub fn keep(mut self) -> PathBuf {
        self.file = None;
        std::mem::take(&mut self.path)
    }

    /// Detaches the device now.
    pub fn detach(mut self) -> Result<(), Error> {
        match self.file.take() {
            Some(f) => detach_open(f, &self.path).map_err(Error::io("detach", self.path.clone())),
            None => Ok(()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            if let Err(e) = detach_open(f, &self.path) {
                tracing::warn!(device = %self.path.display(), error = %e, "could not detach loop device");
            }
        }
    }
}

/// Detaches the loop device at `dev`. `NotFound` when it does not exist or is not attached.
pub fn detach_path(dev: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(dev).map_err(Error::io("inspect", dev))?;
    if !meta.file_type().is_block_device() {
        return Err(Error::NotBlockDevice {
            path: dev.to_path_buf(),
            found: crate::node::file_kind(&meta.file_type()),
        });
    }
    let major = rustix::fs::major(meta.rdev());
    if major != sys::LOOP_MAJOR {
        return Err(Error::Invalid {
            what: "loop device",
            detail: format!(
                "{} has block major {major}, not a loop device (major 7)",
                dev.display()
            ),
        });
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dev)
        .map_err(Error::io("open", dev))?;
    detach_open(f, dev).map_err(Error::io("detach", dev))
}

/// Detaches the loop device open as `f` (node `dev`), closes it, and waits (bounded) until the kernel has
/// released it, so the caller sees the device gone when this returns. A device still held open elsewhere
/// past the deadline is detached by the kernel at its last close.
fn detach_open(f: File, dev: &Path) -> io::Result<()> {
    clear_fd(&f)?;
    drop(f);
    let Some(name) = dev.file_name() else {
        return Ok(());
    };
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    while backing.exists() && start.elapsed() < RELEASE_DEADLINE {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    if backing.exists() {
        tracing::warn!(device = %dev.display(), "loop device still open elsewhere; the kernel detaches it at its last close");
    }
    Ok(())
}

/// The loop devices (`/dev/loopN`) whose backing file is `file`, in index order.
pub fn find_by_backing(file: &Path) -> Result<Vec<PathBuf>, Error> {
    find_by_backing_in(&SysRoot::system(), file)
}

/// [`find_by_backing`] under an explicit sysfs/dev root.
pub fn find_by_backing_in(root: &SysRoot, file: &Path) -> Result<Vec<PathBuf>, Error> {
    let wanted = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let block = root.sys().join("block");
    let entries = std::fs::read_dir(&block).map_err(Error::io("list", block.clone()))?;
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("list", block.clone()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name
            .strip_prefix("loop")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let text = text.strip_suffix(b"\n").unwrap_or(&text);
        if text == wanted.as_os_str().as_bytes() {
            found.push((index, root.dev().join(&name)));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Opens a loop node just handed out by `LOOP_CTL_GET_FREE`, waiting (bounded) for it to appear.
fn open_new_node(path: &Path, read_only: bool) -> Result<File, Error> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && start.elapsed() < NODE_DEADLINE => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Timeout {
                    what: format!("device node {} to appear", path.display()),
                    waited: start.elapsed(),
                    last: "absent".into(),
                })
            }
            Err(e) => return Err(Error::io("open", path)(e)),
        }
    }
}

fn configure(dev: &File, backing: &File, name: &Path, read_only: bool) -> io::Result<()> {
    let mut info = LoopInfo64::zeroed();
    if read_only {
        info.lo_flags |= sys::LO_FLAGS_READ_ONLY;
    }
    let bytes = name.as_os_str().as_bytes();
    let n = bytes.len().min(sys::LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&bytes[..n]);
    let fd = u32::try_from(backing.as_raw_fd())
        .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let config = LoopConfig {
        fd,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is (repr(C), size checked),
    // and it lives across the call.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            sys::LOOP_CONFIGURE as _,
            &config as *const LoopConfig,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) {
        return Err(err);
    }
    // Kernels before 5.8: two steps.
    // SAFETY: LOOP_SET_FD takes the backing file descriptor by value.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            sys::LOOP_SET_FD as _,
            backing.as_raw_fd() as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, which `info` is and which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            sys::LOOP_SET_STATUS64 as _,
            &info as *const LoopInfo64,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        let _ = clear_fd(dev);
        return Err(err);
    }
    Ok(())
}

fn clear_fd(dev: &File) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is a valid open loop device.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), sys::LOOP_CLR_FD as _) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
