//! Block-device ioctls from `<linux/fs.h>`: size, block sizes, zero-out, discard, buffer flush, read-only.
//!
//! Each call also accepts a regular file where that has a meaning (size, zero-out and discard through
//! `fallocate(2)`), so file-backed volumes take the same path.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::sys;

fn is_regular(f: &File) -> io::Result<bool> {
    Ok(f.metadata()?.file_type().is_file())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Size in bytes (`BLKGETSIZE64`; the length of a regular file).
pub fn size(f: &File) -> io::Result<u64> {
    if is_regular(f)? {
        return Ok(f.metadata()?.len());
    }
    let mut out: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `out` for the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), sys::BLKGETSIZE64 as _, &mut out as *mut u64) })?;
    Ok(out)
}

fn int_ioctl(f: &File, req: libc::c_ulong) -> io::Result<libc::c_int> {
    let mut out: libc::c_int = 0;
    // SAFETY: these ioctls write one int through the pointer, which points at `out` for the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut out as *mut libc::c_int) })?;
    Ok(out)
}

fn to_u32(v: libc::c_int) -> io::Result<u32> {
    u32::try_from(v).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "kernel returned a negative block size",
        )
    })
}

/// Logical block size (`BLKSSZGET`; 512 for a regular file).
pub fn logical_block_size(f: &File) -> io::Result<u32> {
    if is_regular(f)? {
        return Ok(512);
    }
    to_u32(int_ioctl(f, sys::BLKSSZGET)?)
}

/// Physical block size (`BLKPBSZGET`; the file system's block size for a regular file).
pub fn physical_block_size(f: &File) -> io::Result<u32> {
    if is_regular(f)? {
        use std::os::unix::fs::MetadataExt;
        return u32::try_from(f.metadata()?.blksize())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "block size out of range"));
    }
    // BLKPBSZGET writes an unsigned int.
    to_u32(int_ioctl(f, sys::BLKPBSZGET)?)
}

/// Whether the device is read-only (`BLKROGET`; the file's write permission for a regular file).
pub fn read_only(f: &File) -> io::Result<bool> {
    if is_regular(f)? {
        return Ok(f.metadata()?.permissions().readonly());
    }
    Ok(int_ioctl(f, sys::BLKROGET)? != 0)
}

fn range(off: u64, len: u64) -> io::Result<[u64; 2]> {
    if off % 512 != 0 || len % 512 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {off}+{len} is not aligned to 512 bytes"),
        ));
    }
    off.checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range end overflows"))?;
    Ok([off, len])
}

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain system call on a valid descriptor; no memory is passed.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) })
}

fn range_ioctl(f: &File, req: libc::c_ulong, r: [u64; 2]) -> io::Result<()> {
    // SAFETY: BLKZEROOUT and BLKDISCARD read a `uint64_t[2]` {start, length}, which `r` is, alive for the call.
    check(unsafe { libc::ioctl(f.as_raw_fd(), req as _, r.as_ptr()) })
}

/// Writes zeroes over `len` bytes at `off` (`BLKZEROOUT`; `FALLOC_FL_ZERO_RANGE` on a regular file).
/// Both must be multiples of 512.
pub fn zero_out(f: &File, off: u64, len: u64) -> io::Result<()> {
    let r = range(off, len)?;
    if len == 0 {
        return Ok(());
    }
    if is_regular(f)? {
        return fallocate(
            f,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        );
    }
    range_ioctl(f, sys::BLKZEROOUT, r)
}

/// Discards `len` bytes at `off` (`BLKDISCARD`; punches a hole in a regular file).
/// Both must be multiples of 512. What a discarded range reads back as depends on the device.
pub fn discard(f: &File, off: u64, len: u64) -> io::Result<()> {
    let r = range(off, len)?;
    if len == 0 {
        return Ok(());
    }
    if is_regular(f)? {
        return fallocate(
            f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        );
    }
    range_ioctl(f, sys::BLKDISCARD, r)
}

/// Writes dirty buffers and drops the device's buffer cache (`BLKFLSBUF`; `fsync` on a regular file).
pub fn flush_buffers(f: &File) -> io::Result<()> {
    if is_regular(f)? {
        return f.sync_all();
    }
    // SAFETY: BLKFLSBUF takes no argument; the descriptor is valid.
    check(unsafe { libc::ioctl(f.as_raw_fd(), sys::BLKFLSBUF as _, 0 as libc::c_ulong) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn regular_files_take_the_file_path() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(&vec![7u8; 64 * 1024]).expect("write");
        assert_eq!(size(&f).expect("size"), 64 * 1024);
        assert_eq!(logical_block_size(&f).expect("lbs"), 512);
        assert!(!read_only(&f).expect("ro"));
        zero_out(&f, 4096, 8192).expect("zero");
        discard(&f, 32768, 4096).expect("discard");
        flush_buffers(&f).expect("flush");
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut back).expect("read");
        assert_eq!(back.len(), 64 * 1024, "size kept");
        assert!(back[..4096].iter().all(|&b| b == 7));
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[12288..32768].iter().all(|&b| b == 7));
        assert!(back[32768..36864].iter().all(|&b| b == 0));
        assert!(back[36864..].iter().all(|&b| b == 7));
        assert_eq!(
            zero_out(&f, 1, 512).expect_err("unaligned").kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(crate::sys::BLKGETSIZE64, 0x8008_1272);
    }
}
