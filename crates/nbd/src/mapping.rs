//! The shared memory mapping of an export file on tmpfs or ramfs, through which the kernel copies READ
//! reply data straight from the page cache into the socket and WRITE payloads straight from the socket
//! into the page cache: one copy each way instead of two (through a user buffer).
//!
//! The process never loads or stores through the mapping. Its addresses only go to `sendmsg`, `recv` and
//! `madvise`, so a page the kernel cannot provide (a file truncated under the server, a full tmpfs) fails
//! that call with `EFAULT` or `ENOSPC` instead of raising `SIGBUS`, and no Rust reference ever points into
//! memory that other writers change. Only plain TCP sessions use it; TLS sessions encrypt from a copy.
//!
//! Pages touched through the mapping count in the process's resident set (as shared memory) although
//! they are the file's page cache, which exists either way. So that the resident set stays bounded by the
//! server's budgets and not by the size of the files it serves, every [`UNMAP_EVERY`] bytes moved through
//! a mapping drop its page-table entries (`MADV_DONTNEED`, which keeps a shared file's data); later
//! accesses map the pages again.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved through one mapping between two drops of its page-table entries.
pub const UNMAP_EVERY: usize = 32 * 1024 * 1024;

/// Bytes of a WRITE payload's range mapped at a time ahead of receiving into it (see [`Mapping::receive`]).
const POPULATE_STEP: usize = 1024 * 1024;

/// A `MAP_SHARED` mapping of a whole export file, writable unless the export is read-only.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
    writable: bool,
    /// Bytes moved through the mapping since its page-table entries were last dropped.
    moved: AtomicUsize,
}

// SAFETY: the mapping is shared file memory that lives until `Drop`; the process only hands its
// addresses to system calls and never dereferences them, so using it from several threads is no more
// than several threads passing the same address to the kernel.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`; the only state changed through `&self` is an atomic counter.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (`None` for an empty file, which has nothing to map).
    pub(crate) fn new(file: &File, len: u64, writable: bool) -> io::Result<Option<Self>> {
        if len == 0 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (null hint) of an open descriptor; it overlaps
        // no memory the program uses, and `Drop` unmaps exactly this range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Some(Mapping {
            base,
            len,
            writable,
            moved: AtomicUsize::new(0),
        }))
    }

    /// Whether WRITE payloads can be received into the mapping.
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// The address of `offset` for an iovec, when `[offset, offset+len)` lies inside the mapping.
    pub(crate) fn addr(&self, offset: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len)? <= self.len).then(|| self.base.as_ptr() as usize + off)
    }

    /// Maps every page of a range ahead of a `recv` into it (`MADV_POPULATE_READ`), so the copy takes no
    /// page fault per page. A shared mapping of tmpfs needs no write notification, so read faults map
    /// pages writable, and they map up to 16 cached pages per fault where write faults map one
    /// (`MADV_POPULATE_WRITE` cost 2 % of nbdcopy's write throughput); tmpfs allocates pages of holes
    /// here. Fails with what the file would give (`EFAULT` for a page past the end or one tmpfs has no
    /// room for, `ENOMEM`), or `EINVAL` on a kernel without the call (before 5.14): the caller then
    /// writes through a buffer.
    fn populate_for_write(&self, offset: u64, len: usize) -> io::Result<()> {
        let addr = self
            .addr(offset, len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let page = rustix::param::page_size();
        let start = addr & !(page - 1);
        // SAFETY: the range lies inside this mapping (checked above, widened down to its page start,
        // which is inside the page-aligned mapping); populating changes no contents.
        let r = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                addr + len - start,
                libc::MADV_POPULATE_READ,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Receives `len` payload bytes from `sock` into the file at `offset`. Returns how many arrived
    /// before a page of the file failed (`len` when all did): the caller reads the rest the ordinary way,
    /// which reports the file's error. `None` when the connection failed, or the client sent nothing for
    /// `timeout` in the middle of the payload: the session ends.
    ///
    /// Pages are mapped [`POPULATE_STEP`] bytes at a time, each step once the payload has reached it: a
    /// client that announces a large WRITE and sends little of it makes tmpfs allocate pages only for
    /// what it sent and one step more, not for the whole announced range.
    pub(crate) async fn receive(
        &self,
        sock: &TcpStream,
        offset: u64,
        len: usize,
        timeout: Duration,
    ) -> Option<usize> {
        if !self.writable || len == 0 {
            return Some(0);
        }
        let Some(base) = self.addr(offset, len) else {
            return Some(0);
        };
        let mut done = 0;
        // The end of the populated part of the payload.
        let mut ready = 0;
        while done < len {
            if done == ready {
                let step = (len - done).min(POPULATE_STEP);
                if self.populate_for_write(offset + done as u64, step).is_err() {
                    break;
                }
                ready += step;
            }
            let r = sock.try_io(Interest::READABLE, || {
                // SAFETY: `[base+done, base+ready)` lies inside this writable mapping, which outlives
                // the call; the kernel writes the received bytes there and nothing else.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        (base + done) as *mut libc::c_void,
                        ready - done,
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(0) => return None,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !matches!(
                        tokio::time::timeout(timeout, sock.readable()).await,
                        Ok(Ok(()))
                    ) {
                        return None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => break,
                Err(_) => return None,
            }
        }
        self.moved(done);
        Some(done)
    }

    /// Counts `n` bytes moved through the mapping, and drops its page-table entries every
    /// [`UNMAP_EVERY`] bytes so the resident set stays bounded.
    pub(crate) fn moved(&self, n: usize) {
        let before = self.moved.fetch_add(n, Ordering::Relaxed);
        if before < UNMAP_EVERY && before + n >= UNMAP_EVERY {
            self.moved.store(0, Ordering::Relaxed);
            // SAFETY: exactly this mapping's range. For a shared file mapping MADV_DONTNEED only drops
            // page-table entries: the data stays in the file, and a system call using an address in the
            // range meanwhile maps the page again.
            unsafe {
                libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `new` mapped; every user holds the export (and so this
        // mapping) until its system calls returned.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Sends `segments` (address, length) in order on `sock` with `sendmsg`, waiting for room up to
/// `timeout` at a time. Addresses point into buffers the caller keeps alive, or into a [`Mapping`] the
/// caller's requests hold; a page of a mapping the kernel cannot read fails the send with `EFAULT`.
pub(crate) async fn send_segments(
    sock: &TcpStream,
    segments: &mut [(usize, usize)],
    timeout: Duration,
) -> io::Result<()> {
    let mut first = 0;
    while first < segments.len() {
        let r = sock.try_io(Interest::WRITABLE, || {
            let live = &segments[first..segments.len().min(first + IOV_MAX)];
            let iov: Vec<libc::iovec> = live
                .iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len,
                })
                .collect();
            // SAFETY: a zeroed msghdr is valid (no name, no control data); it points at `iov`, which
            // lives across the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr().cast_mut();
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: every iovec names memory the caller keeps alive and readable for the call (see
            // above); the kernel only reads it.
            let n = unsafe {
                libc::sendmsg(
                    sock.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                while n > 0 {
                    let seg = &mut segments[first];
                    if n >= seg.1 {
                        n -= seg.1;
                        first += 1;
                    } else {
                        seg.0 += n;
                        seg.1 -= n;
                        n = 0;
                    }
                }
                while first < segments.len() && segments[first].1 == 0 {
                    first += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(timeout, sock.writable()).await {
                    Ok(r) => r?,
                    Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Most iovecs one `sendmsg` takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;
