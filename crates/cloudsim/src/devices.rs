//! Volume storage and the appliance's view of it: sparse backing files, sparse snapshot copies of them,
//! loop devices over them, and the `virtio-<serial>` links in the by-id directory (made atomically:
//! symlink to a temporary name, then rename).

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use blockdev::loopdev::{self, LoopDevice};

use crate::error::SimError;
use crate::model::virtio_serial;

/// File and device operations of one simulator.
#[derive(Debug, Clone)]
pub(crate) struct Devices {
    volumes_dir: PathBuf,
    snapshots_dir: PathBuf,
    by_id_dir: PathBuf,
    use_loop_devices: bool,
}

/// What an appliance attachment exposed.
#[derive(Debug, Clone)]
pub(crate) struct Exposed {
    pub device: PathBuf,
    pub loop_device: bool,
}

impl Devices {
    pub fn new(state_dir: &Path, by_id_dir: &Path, use_loop_devices: bool) -> Self {
        Self {
            volumes_dir: state_dir.join("volumes"),
            snapshots_dir: state_dir.join("snapshots"),
            by_id_dir: by_id_dir.to_path_buf(),
            use_loop_devices,
        }
    }

    /// Creates the volume and by-id directories.
    pub fn prepare(&self) -> Result<(), SimError> {
        fs::create_dir_all(&self.volumes_dir)
            .map_err(SimError::io("create directory", &self.volumes_dir))?;
        fs::create_dir_all(&self.snapshots_dir)
            .map_err(SimError::io("create directory", &self.snapshots_dir))?;
        fs::create_dir_all(&self.by_id_dir)
            .map_err(SimError::io("create directory", &self.by_id_dir))?;
        Ok(())
    }

    /// `<state_dir>/snapshots/<uuid>.img`.
    pub fn snapshot_path(&self, snapshot_id: &str) -> PathBuf {
        self.snapshots_dir.join(format!("{snapshot_id}.img"))
    }

    /// Copies the volume's content into a new snapshot file.
    pub fn take_snapshot(&self, volume_id: &str, snapshot_id: &str) -> Result<(), SimError> {
        let (from, to) = (
            self.backing_path(volume_id),
            self.snapshot_path(snapshot_id),
        );
        copy_sparse(&from, &to).map_err(|source| SimError::Copy { from, to, source })
    }

    /// Writes a snapshot's content back over the volume, in place (a loop device over it sees the change).
    pub fn revert_snapshot(&self, snapshot_id: &str, volume_id: &str) -> Result<(), SimError> {
        let (from, to) = (
            self.snapshot_path(snapshot_id),
            self.backing_path(volume_id),
        );
        copy_sparse(&from, &to).map_err(|source| SimError::Copy { from, to, source })
    }

    /// Removes a snapshot file (absent is fine).
    pub fn remove_snapshot(&self, snapshot_id: &str) -> Result<(), SimError> {
        let path = self.snapshot_path(snapshot_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(SimError::io("remove snapshot file", path)(e))
            }
            _ => Ok(()),
        }
    }

    /// `<state_dir>/volumes/<uuid>.img`.
    pub fn backing_path(&self, volume_id: &str) -> PathBuf {
        self.volumes_dir.join(format!("{volume_id}.img"))
    }

    /// `<by_id_dir>/virtio-<first 20 hex digits>`.
    pub fn link_path(&self, volume_id: &str) -> Result<PathBuf, SimError> {
        let serial = virtio_serial(volume_id).ok_or_else(|| SimError::NotUuid {
            id: volume_id.to_owned(),
        })?;
        Ok(self.by_id_dir.join(format!("virtio-{serial}")))
    }

    /// Creates the sparse backing file of `size` bytes.
    pub fn create_backing(&self, volume_id: &str, size: u64) -> Result<PathBuf, SimError> {
        let path = self.backing_path(volume_id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(SimError::io("create backing file", &path))?;
        file.set_len(size)
            .map_err(SimError::io("size backing file", &path))?;
        Ok(path)
    }

    /// Removes the backing file (absent is fine).
    pub fn remove_backing(&self, volume_id: &str) -> Result<(), SimError> {
        let path = self.backing_path(volume_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(SimError::io("remove backing file", path)(e))
            }
            _ => Ok(()),
        }
    }

    /// Exposes the volume to the appliance: a loop device over the backing file, or the file itself.
    pub fn expose(&self, volume_id: &str) -> Result<Exposed, SimError> {
        let file = self.backing_path(volume_id);
        if !file.exists() {
            return Err(SimError::io("find backing file", &file)(
                std::io::Error::from(ErrorKind::NotFound),
            ));
        }
        if self.use_loop_devices {
            let dev = LoopDevice::attach(&file, false)
                .map_err(|source| SimError::LoopAttach { file, source })?;
            Ok(Exposed {
                device: dev.keep(),
                loop_device: true,
            })
        } else {
            Ok(Exposed {
                device: file,
                loop_device: false,
            })
        }
    }

    /// Finds the exposure of a volume after a restart: an existing loop device over its file, else a new one.
    pub fn recover(&self, volume_id: &str) -> Result<Exposed, SimError> {
        if self.use_loop_devices {
            let file = self.backing_path(volume_id);
            let found = loopdev::find_by_backing(&file).map_err(|source| SimError::LoopAttach {
                file: file.clone(),
                source,
            })?;
            if let Some(device) = found.into_iter().next() {
                return Ok(Exposed {
                    device,
                    loop_device: true,
                });
            }
        }
        self.expose(volume_id)
    }

    /// Releases the volume's exposure: detaches its loop device (a device already gone is fine). A loop
    /// device of that number that no longer has the volume's file behind it (detached behind the
    /// simulator's back, its number since handed to another file) is another disk, and is left alone.
    pub fn release(
        &self,
        volume_id: &str,
        device: &Path,
        loop_device: bool,
    ) -> Result<(), SimError> {
        if !loop_device {
            return Ok(());
        }
        let file = self.backing_path(volume_id);
        let ours = loopdev::find_by_backing(&file).map_err(|source| SimError::LoopDetach {
            device: device.to_path_buf(),
            source,
        })?;
        if !ours.iter().any(|d| d == device) {
            return Ok(());
        }
        match loopdev::detach_path(device) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == blockdev::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SimError::LoopDetach {
                device: device.to_path_buf(),
                source,
            }),
        }
    }

    /// Points the volume's by-id link at `device`, atomically replacing any old link.
    pub fn link(&self, volume_id: &str, device: &Path) -> Result<PathBuf, SimError> {
        let link = self.link_path(volume_id)?;
        let tmp = self.by_id_dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            link.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(device, &tmp).map_err(SimError::io("create link", &tmp))?;
        fs::rename(&tmp, &link).map_err(SimError::io("rename link into place at", &link))?;
        Ok(link)
    }

    /// Removes a by-id link (absent is fine).
    pub fn unlink(&self, link: &Path) -> Result<(), SimError> {
        match fs::remove_file(link) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(SimError::io("remove link", link)(e)),
            _ => Ok(()),
        }
    }
}

/// Copies `from` over `to` (created if absent, same inode otherwise), reading only the data extents of
/// `from` (`SEEK_DATA`/`SEEK_HOLE`), so sparse files stay sparse and copies cost what was written.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{seek, SeekFrom};
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)?;
    dst.set_len(0)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(&src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let end = seek(&src, SeekFrom::Hole(data))?.min(len);
        let mut at = data;
        while at < end {
            let want = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = src.read_at(&mut buf[..want], at)?;
            if n == 0 {
                break;
            }
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&a).expect("create");
        f.set_len(64 << 20).expect("size");
        f.write_all_at(b"start", 0).expect("write");
        f.write_all_at(b"middle", 32 << 20).expect("write");
        // The target had other content, longer than the source.
        fs::write(&b, vec![7u8; 1 << 20]).expect("old content");
        copy_sparse(&a, &b).expect("copy");
        let got = fs::read(&b).expect("read");
        assert_eq!(got.len(), 64 << 20);
        assert_eq!(&got[..5], b"start");
        assert_eq!(&got[32 << 20..(32 << 20) + 6], b"middle");
        assert!(got[5..32 << 20].iter().all(|x| *x == 0));
        use std::os::unix::fs::MetadataExt as _;
        assert!(
            fs::metadata(&b).expect("meta").blocks() * 512 < 8 << 20,
            "the copy stays sparse"
        );
    }
}
