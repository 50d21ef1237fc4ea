//! Storage behind an export: the [`Backend`] trait, [`FileBackend`] for regular files and block devices,
//! and [`MemoryBackend`] for tests. Every method is blocking; the server calls them off the runtime threads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::Instant;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::ReadWriteFlags;

use crate::error::NbdError;
use crate::mapping::Mapping;
use crate::proto::{STATE_HOLE, STATE_ZERO};

/// One run of blocks with the same allocation state (`base:allocation` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// `STATE_HOLE` and/or `STATE_ZERO`, 0 for allocated data.
    pub flags: u32,
}

/// Storage served by an export. All methods block; ranges are already checked against [`Backend::size`].
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes, fixed for the life of the backend.
    fn size(&self) -> u64;
    /// Appends exactly `len` bytes read at `offset` to `buf`.
    fn read_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Reads like [`Backend::read_at`] only if that cannot wait for a device (data cached, or memory-backed
    /// storage); `Ok(false)` with `buf` unchanged when it would have to wait. Called on the session's own
    /// thread, so it must never sleep. The default never tries.
    fn read_nowait(&self, _buf: &mut Vec<u8>, _offset: u64, _len: usize) -> io::Result<bool> {
        Ok(false)
    }
    /// Writes a prefix of `data` at `offset` without waiting for a device and returns its length (0 to
    /// `data.len()`); the caller writes the rest with [`Backend::write_at`] off the session's thread. The
    /// default writes nothing.
    fn write_nowait(&self, _data: &[u8], _offset: u64) -> io::Result<usize> {
        Ok(0)
    }
    /// The shared mapping through which a plain TCP session moves payloads directly between socket and
    /// storage, for storage whose I/O is memory copies that never wait (see `mapping.rs`); `None` (the
    /// default) keeps the buffered path.
    fn mapping(&self) -> Option<&Mapping> {
        None
    }
    /// Whether a READ through [`Backend::mapping`] allocates nothing now (tmpfs allocates a page for
    /// any hole a mapping touches, where `pread` reads zeros).
    fn mapped_reads(&self) -> bool {
        false
    }
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range (advisory: contents afterwards are unspecified).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read back as zeros. `may_trim` allows deallocation; with `fast` the call must fail with
    /// `EOPNOTSUPP` instead of falling back to something slower than a metadata operation.
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> io::Result<()>;
    /// Allocation state of `[offset, offset+len)`, in order from `offset`: at most `max_extents` extents
    /// (at least one), which may cover less than `len` but at least one byte. The caller asks for as many
    /// as its reply carries, so a client that wants one (`NBD_CMD_FLAG_REQ_ONE`) costs one lookup.
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> io::Result<Vec<Extent>>;
    /// Prefetches a range; a no-op by default.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Whether trim does anything.
    fn can_trim(&self) -> bool {
        true
    }
    /// Whether a fast zero can ever succeed.
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// Whether flush on one connection covers writes completed on every connection.
    fn can_multi_conn(&self) -> bool {
        true
    }
    /// Whether the medium is rotational.
    fn is_rotational(&self) -> bool {
        false
    }
}

/// `statfs` magic numbers of file systems whose file I/O is memory copies (`<linux/magic.h>`).
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// How often a mapped file is looked at again for holes (see [`FileBackend::mapping`]).
const DENSE_RECHECK_MS: u64 = 1000;

/// Milliseconds since the first call: a monotonic clock for [`FileBackend::mapping`].
fn millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Largest chunk written when zeros must be written explicitly.
const ZERO_CHUNK: usize = 1 << 20;
static ZEROS: [u8; ZERO_CHUNK] = [0u8; ZERO_CHUNK];

/// A regular file or a block device, accessed with positional I/O.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    block_device: bool,
    /// Logical block size of a block device (1 for files).
    sector: u64,
    /// The block device's `write_zeroes_max_bytes` in sysfs (`None` for files).
    write_zeroes_limit: Option<PathBuf>,
    /// The file lives on tmpfs or ramfs: reads and writes are memory copies and never wait for a device.
    memory_backed: bool,
    /// The file mapped for direct socket I/O (memory-backed files only).
    mapping: Option<Mapping>,
    /// Whether the file had no holes when last looked at (bit 0), and how often this backend has begun
    /// or finished punching holes (the rest, in steps of 2): see [`FileBackend::refresh_dense`].
    dense: AtomicU64,
    /// When `dense` was last refreshed, as [`millis`].
    dense_checked: AtomicU64,
    /// Whether `RWF_NOWAIT` reads and writes are still worth trying (cleared when the kernel refuses them).
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// The error of the first write-back that failed (`fdatasync`, `sync_file_range`), 0 while none has. The
    /// kernel reports a lost write-back once per open file, so without this a later flush would succeed
    /// although writes acknowledged before it never reached the device: every flush fails from then on.
    lost_write_back: AtomicI32,
}

impl FileBackend {
    /// Opens a regular file or block device; `read_only` opens it without write access.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, NbdError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| NbdError::io_op("open the export's file or device", e))?;
        let meta = file
            .metadata()
            .map_err(|e| NbdError::io_op("stat the export's file or device", e))?;
        let ft = meta.file_type();
        if ft.is_block_device() {
            let size = blockdev::ioctl::size(&file)
                .map_err(|e| NbdError::io_op("read the block device size (BLKGETSIZE64)", e))?;
            let sector = blockdev::ioctl::logical_block_size(&file)
                .map_err(|e| NbdError::io_op("read the logical block size (BLKSSZGET)", e))?;
            Ok(FileBackend {
                file,
                size,
                block_device: true,
                sector: u64::from(sector.max(512)),
                write_zeroes_limit: Some(write_zeroes_limit(meta.rdev())),
                memory_backed: false,
                mapping: None,
                dense: AtomicU64::new(0),
                dense_checked: AtomicU64::new(0),
                nowait_reads: AtomicBool::new(true),
                nowait_writes: AtomicBool::new(true),
                lost_write_back: AtomicI32::new(0),
            })
        } else if ft.is_file() {
            let memory_backed = rustix::fs::fstatfs(&file)
                .map(|st| {
                    let magic = st.f_type as u64;
                    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
                })
                .unwrap_or(false);
            let mapping = if memory_backed {
                Mapping::new(&file, meta.len(), !read_only).unwrap_or_else(|e| {
                    tracing::debug!(error = %e, path = %path.display(), "cannot map the export file; payloads are copied through buffers");
                    None
                })
            } else {
                None
            };
            let backend = FileBackend {
                file,
                size: meta.len(),
                block_device: false,
                sector: 1,
                write_zeroes_limit: None,
                memory_backed,
                mapping,
                dense: AtomicU64::new(0),
                dense_checked: AtomicU64::new(0),
                nowait_reads: AtomicBool::new(true),
                nowait_writes: AtomicBool::new(true),
                lost_write_back: AtomicI32::new(0),
            };
            backend.refresh_dense();
            backend.dense_checked.store(millis(), Ordering::Relaxed);
            Ok(backend)
        } else {
            Err(NbdError::Invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )))
        }
    }

    /// Whether this backend is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether every page of a memory-backed file is allocated up to the export's size, so it has no
    /// hole and has not shrunk. tmpfs counts the pages it holds in `st_blocks`, which one `fstat` reads,
    /// but pages reserved past the end (`fallocate` with `KEEP_SIZE`) count too, so enough blocks only
    /// rule holes out when `SEEK_HOLE` confirms it: it walks the file's pages up to the first hole or
    /// the end (5.5 ms for a 1 GiB file), which is why the answer is kept (see [`Self::dense_now`]).
    fn fully_allocated(&self) -> io::Result<bool> {
        let st = rustix::fs::fstat(&self.file)?;
        let allocated = (st.st_blocks as u64).saturating_mul(512);
        if (st.st_size as u64) < self.size || allocated < self.size {
            return Ok(false);
        }
        match rustix::fs::seek(&self.file, SeekFrom::Hole(0)) {
            Ok(hole) => Ok(hole >= self.size),
            Err(e) => Err(e.into()),
        }
    }

    /// Looks again whether the file has holes (see [`FileBackend::fully_allocated`]). The answer is
    /// kept only if this backend did not begin or finish punching a hole meanwhile: a look that raced
    /// with a punch may have seen the file before it.
    fn refresh_dense(&self) {
        let before = self.dense.load(Ordering::Acquire);
        let dense = self.mapping.is_some() && self.fully_allocated().unwrap_or(false);
        let _ = self.dense.compare_exchange(
            before,
            (before & !1) | u64::from(dense),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Whether the file had no holes, looked at again when the last look is [`DENSE_RECHECK_MS`] old (by
    /// one caller at a time) and at once after this backend punched a hole. A hole punched by another
    /// process goes unseen for at most that time.
    fn dense_now(&self) -> bool {
        if self.mapping.is_none() {
            return false;
        }
        let now = millis();
        let last = self.dense_checked.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= DENSE_RECHECK_MS
            && self
                .dense_checked
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refresh_dense();
        }
        self.dense.load(Ordering::Acquire) & 1 == 1
    }

    /// Marks the file as possibly holed for as long as the returned guard lives (a trim or zero
    /// punching some), and once more when it is dropped, so that no look at the file begun before the
    /// punch ended can mark it dense again.
    fn punching(&self) -> Punching<'_> {
        self.punched();
        Punching(self)
    }

    fn punched(&self) {
        if self.mapping.is_some() {
            let _ = self
                .dense
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |s| {
                    Some(s.wrapping_add(2) & !1)
                });
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        while offset < end {
            let n =
                usize::try_from((end - offset).min(ZERO_CHUNK as u64)).expect("chunk fits usize");
            self.write_at(&ZEROS[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Whether the block device zeroes ranges with a command of its own (sysfs says so; `false` when
    /// sysfs cannot be read). `fallocate` on a block device drops the range from the page cache, dirty
    /// pages included, before it asks the device: on a device without the command it then fails with
    /// `EOPNOTSUPP` having thrown away writes not yet written back, so it must not be tried there.
    fn device_zeroes(&self) -> bool {
        self.write_zeroes_limit
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    }

    /// Writes the range's dirty pages to the device and waits for them (`sync_file_range`): what the
    /// device then reads back is what was written, whatever later happens to the page cache. It does
    /// not flush the device's own cache; a crash may still lose them, as before any FLUSH.
    fn write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        self.lost()?;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        loop {
            // SAFETY: a system call on a descriptor this backend owns; it takes no memory.
            let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, n, flags) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(self.remember_lost(err));
            }
        }
    }

    /// Fails once a write-back has failed (see `lost_write_back`).
    fn lost(&self) -> io::Result<()> {
        match self.lost_write_back.load(Ordering::Acquire) {
            0 => Ok(()),
            errno => Err(io::Error::other(format!(
                "an earlier write-back to the device failed ({}): writes acknowledged before it may not \
                 be on the device; every flush of this export fails from now on",
                io::Error::from_raw_os_error(errno)
            ))),
        }
    }

    /// Records a failed write-back (the first one's error is kept) and returns the error.
    fn remember_lost(&self, err: io::Error) -> io::Error {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        let _ =
            self.lost_write_back
                .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
        err
    }

    /// Aligned sub-range `[start, end)` of `[offset, offset+len)` on sector boundaries (may be empty).
    fn aligned(&self, offset: u64, len: u64) -> (u64, u64) {
        aligned_to(offset, len, self.sector)
    }
}

/// Sub-range `[start, end)` of `[offset, offset+len)` on multiples of `unit` (may be empty).
fn aligned_to(offset: u64, len: u64, unit: u64) -> (u64, u64) {
    let s = offset.div_ceil(unit) * unit;
    let e = (offset + len) / unit * unit;
    (s, e.max(s))
}

/// Where sysfs tells how much a block device zeroes with one write-zeroes command of its own: 0 when it
/// has none. A partition's directory has no `queue`; its disk's (the parent directory) applies.
fn write_zeroes_limit(rdev: u64) -> PathBuf {
    let dev = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    );
    let own = Path::new(&dev).join("queue/write_zeroes_max_bytes");
    if own.exists() {
        own
    } else {
        Path::new(&dev).join("../queue/write_zeroes_max_bytes")
    }
}

/// See [`FileBackend::punching`].
struct Punching<'a>(&'a FileBackend);

impl Drop for Punching<'_> {
    fn drop(&mut self) {
        self.0.punched();
    }
}

fn unsupported(e: &rustix::io::Errno) -> bool {
    *e == rustix::io::Errno::OPNOTSUPP || *e == rustix::io::Errno::NOSYS
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
        buf.reserve(len);
        let target = buf.len() + len;
        let mut pos = offset;
        while buf.len() < target {
            let want = target - buf.len();
            let spare = &mut buf.spare_capacity_mut()[..want];
            let n = rustix::io::pread(&self.file, spare, pos).map(|(init, _)| init.len());
            match n {
                Ok(0) => {
                    // The file shrank underneath: what is past its end reads as zeros.
                    buf.resize(target, 0);
                }
                Ok(n) => {
                    // SAFETY: pread initialized the first `n` bytes of the spare capacity.
                    unsafe { buf.set_len(buf.len() + n) };
                    pos += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_at(&self, mut data: &[u8], mut offset: u64) -> io::Result<()> {
        while !data.is_empty() {
            match rustix::io::pwrite(&self.file, data, offset) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    data = &data[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.lost()?;
        loop {
            match rustix::fs::fdatasync(&self.file) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.remember_lost(e.into())),
            }
        }
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            let (s, e) = self.aligned(offset, len);
            if e > s {
                match blockdev::ioctl::discard(&self.file, s, e - s) {
                    Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    r => r?,
                }
            }
            return Ok(());
        }
        let _punching = self.punching();
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r.map_err(Into::into),
        }
    }

    fn zero(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> io::Result<()> {
        let not_fast = || io::Error::from_raw_os_error(libc::EOPNOTSUPP);
        if self.block_device {
            if fast {
                // The kernel zeroes a block device range with `FALLOC_FL_PUNCH_HOLE` only through the
                // device's own write-zeroes command (`BLKDEV_ZERO_NOFALLBACK`): it fails with EOPNOTSUPP
                // instead of writing zeros, but only after it dropped the range from the page cache, dirty
                // pages included, and zeroed the range's part of a page it covers in part. So it is asked
                // only when the device has that command, only for whole pages, and only once their
                // writes reached the device, since a device may claim the command and then fail it: a
                // refusal then leaves the data as it was. The parts of pages at either end are written.
                // Without permission to deallocate there is no such call.
                let page = (rustix::param::page_size() as u64).max(self.sector);
                let (s, e) = aligned_to(offset, len, page);
                if !may_trim || e <= s || !self.device_zeroes() {
                    return Err(not_fast());
                }
                self.write_back(s, e - s)?;
                let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                rustix::fs::fallocate(&self.file, punch, s, e - s).map_err(|e| {
                    if unsupported(&e) {
                        not_fast()
                    } else {
                        e.into()
                    }
                })?;
                self.write_zeros(offset, s - offset)?;
                return self.write_zeros(e, offset + len - e);
            }
            let (s, e) = self.aligned(offset, len);
            if e > s {
                match blockdev::ioctl::zero_out(&self.file, s, e - s) {
                    Ok(()) => {
                        self.write_zeros(offset, s - offset)?;
                        return self.write_zeros(e, offset + len - e);
                    }
                    Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    Err(err) => return Err(err),
                }
            }
            return self.write_zeros(offset, len);
        }
        let _punching = self.punching();
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let zero_range = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if may_trim {
            match rustix::fs::fallocate(&self.file, punch, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match rustix::fs::fallocate(&self.file, zero_range, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e.into()),
        }
        if !may_trim {
            // Punch a hole, then allocate the range again: zeros without leaving it sparse.
            match rustix::fs::fallocate(&self.file, punch, offset, len) {
                Ok(()) => {
                    return match rustix::fs::fallocate(
                        &self.file,
                        FallocateFlags::KEEP_SIZE,
                        offset,
                        len,
                    ) {
                        Err(e) if !unsupported(&e) => Err(e.into()),
                        _ => Ok(()),
                    };
                }
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if fast {
            return Err(not_fast());
        }
        self.write_zeros(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let max_extents = max_extents.max(1);
        if self.block_device || (self.memory_backed && self.dense_now()) {
            return Ok(vec![Extent {
                length: len,
                flags: 0,
            }]);
        }
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_extents {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) if unsupported(&e) || e == rustix::io::Errno::INVAL => {
                    out.push(Extent {
                        length: end - pos,
                        flags: 0,
                    });
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let stop = data.min(end);
                out.push(Extent {
                    length: stop - pos,
                    flags: STATE_HOLE | STATE_ZERO,
                });
                pos = stop;
                continue;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            let stop = hole.clamp(pos + 1, end);
            out.push(Extent {
                length: stop - pos,
                flags: 0,
            });
            pos = stop;
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
        Ok(())
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn mapping(&self) -> Option<&Mapping> {
        self.mapping.as_ref()
    }

    /// Only while the file has no holes. That is looked at again at least every [`DENSE_RECHECK_MS`]
    /// (a second), and at once after this backend punched a hole, so a hole punched by another process
    /// can be filled by reads only within that time, and never beyond the file's size.
    fn mapped_reads(&self) -> bool {
        self.dense_now()
    }

    fn read_nowait(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<bool> {
        if self.memory_backed {
            self.read_at(buf, offset, len)?;
            return Ok(true);
        }
        if !self.nowait_reads.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let start = buf.len();
        buf.reserve(len);
        let target = start + len;
        let mut pos = offset;
        while buf.len() < target {
            let want = target - buf.len();
            let spare = &mut buf.spare_capacity_mut()[..want];
            let iov = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            let off = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: the iovec points at the vector's spare capacity, valid for writes of `iov_len` bytes
            // for the duration of the call; the descriptor is open.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
            if n > 0 {
                let n = n as usize;
                // SAFETY: preadv2 initialized the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                pos += n as u64;
                continue;
            }
            let err = if n == 0 {
                // End of file (the file shrank): the blocking path fills zeros.
                None
            } else {
                Some(io::Error::last_os_error())
            };
            match err.as_ref().and_then(io::Error::raw_os_error) {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => self.nowait_reads.store(false, Ordering::Relaxed),
                Some(libc::EAGAIN) | None => {}
                Some(_) => {
                    buf.truncate(start);
                    return Err(err.expect("an errno was read"));
                }
            }
            buf.truncate(start);
            return Ok(false);
        }
        Ok(true)
    }

    fn write_nowait(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        if self.memory_backed {
            self.write_at(data, offset)?;
            return Ok(data.len());
        }
        if !self.nowait_writes.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut done = 0;
        while done < data.len() {
            let iov = [io::IoSlice::new(&data[done..])];
            match rustix::io::pwritev2(
                &self.file,
                &iov,
                offset + done as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) if unsupported(&e) => {
                    self.nowait_writes.store(false, Ordering::Relaxed);
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }
}

/// An in-memory disk for tests.
#[derive(Debug)]
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
}

impl MemoryBackend {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0u8; size])
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemoryBackend {
            data: RwLock::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data
            .read()
            .expect("memory backend lock poisoned")
            .clone()
    }

    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        let s = usize::try_from(offset).expect("offset checked against size");
        let e = usize::try_from(offset + len).expect("range checked against size");
        s..e
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.data
            .read()
            .expect("memory backend lock poisoned")
            .len() as u64
    }

    fn read_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
        let d = self.data.read().expect("memory backend lock poisoned");
        buf.extend_from_slice(&d[Self::range(offset, len as u64)]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.data.write().expect("memory backend lock poisoned");
        d[Self::range(offset, data.len() as u64)].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero(offset, len, true, false)
    }

    fn zero(&self, offset: u64, len: u64, _may_trim: bool, _fast: bool) -> io::Result<()> {
        let mut d = self.data.write().expect("memory backend lock poisoned");
        d[Self::range(offset, len)].fill(0);
        Ok(())
    }

    fn block_status(&self, _offset: u64, len: u64, _max_extents: usize) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn read_nowait(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<bool> {
        self.read_at(buf, offset, len).map(|()| true)
    }

    fn write_nowait(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        self.write_at(data, offset).map(|()| data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_fully_written_tmpfs_file_is_one_data_extent_and_a_punched_hole_shows() {
        let mut f = tempfile::Builder::new()
            .prefix("nbd-extents-")
            .tempfile_in("/dev/shm")
            .unwrap();
        f.write_all(&vec![0x5au8; 8 << 20]).unwrap();
        let extents = |b: &FileBackend, offset: u64, len: u64| -> Vec<(u64, u32)> {
            let ext = b.block_status(offset, len, 1024).unwrap();
            ext.iter().map(|e| (e.length, e.flags)).collect()
        };
        let b = FileBackend::open(f.path(), false).unwrap();
        assert!(b.memory_backed, "/dev/shm is tmpfs");
        assert!(b.fully_allocated().unwrap());
        assert_eq!(
            b.block_status(4096, (8 << 20) - 4096, 1024).unwrap(),
            [Extent {
                length: (8 << 20) - 4096,
                flags: 0
            }]
        );
        // A hole anywhere, even outside the range asked about, makes the file's extents be looked up.
        b.zero(1 << 20, 1 << 20, true, false).unwrap();
        assert!(!b.fully_allocated().unwrap());
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            extents(&b, 0, 8 << 20),
            [(1 << 20, 0), (1 << 20, hole), (6 << 20, 0)]
        );
        // A sparse tail (the file grew without writes) is a hole too.
        let c = tempfile::Builder::new().tempfile_in("/dev/shm").unwrap();
        c.as_file().set_len(4 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(c.as_file(), &[1u8; 4096], 0).unwrap();
        let b = FileBackend::open(c.path(), false).unwrap();
        assert_eq!(
            extents(&b, 0, 4 << 20),
            [(4096, 0), ((4 << 20) - 4096, hole)]
        );
    }

    #[test]
    fn file_zero_and_block_status() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0xabu8; 1 << 20]).unwrap();
        f.flush().unwrap();
        let b = FileBackend::open(f.path(), false).unwrap();
        assert_eq!(b.size(), 1 << 20);
        b.zero(4096, 8192, true, false).unwrap();
        b.zero(65536, 4096, false, false).unwrap();
        let mut buf = Vec::new();
        b.read_at(&mut buf, 0, 1 << 20).unwrap();
        assert!(buf[4096..12288].iter().all(|&x| x == 0));
        assert!(buf[65536..69632].iter().all(|&x| x == 0));
        assert!(buf[..4096].iter().all(|&x| x == 0xab));
        assert!(buf[12288..65536].iter().all(|&x| x == 0xab));
        let ext = b.block_status(0, 1 << 20, 1024).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        b.write_at(b"hello", 100).unwrap();
        b.flush().unwrap();
        let mut buf = Vec::new();
        b.read_at(&mut buf, 100, 5).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn open_rejects_directories() {
        let d = tempfile::tempdir().unwrap();
        let e = FileBackend::open(d.path(), true).unwrap_err();
        assert_eq!(e.kind(), crate::NbdErrorKind::Invalid);
    }
}
