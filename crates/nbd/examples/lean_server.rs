//! The benchmarks' lean server: the least a server can do to store NBD writes the way nbd-serve does. A
//! thread per connection blocks in `recv(MSG_WAITALL)` and receives each payload straight into a shared
//! mapping of the file (pages mapped first with `MADV_POPULATE_READ`, page tables dropped every
//! [`nbd::UNMAP_EVERY`] bytes moved, as nbd-serve bounds its resident set), then answers at once. No
//! budgets, queue bounds, timeouts, TLS or structured replies, and one request at a time per connection: a
//! yardstick for large writes in `bench/`, not a server to run.
//!
//! `cargo run --release -p nbd --example lean_server -- FILE [--listen ADDR]` prints `listening on ADDR`
//! and serves FILE under any export name, with READ, WRITE, FLUSH and multi-conn.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use nbd::proto::*;
use nbd::UNMAP_EVERY;

struct Map {
    base: usize,
    len: usize,
    moved: AtomicUsize,
}

impl Map {
    /// The address of `[offset, offset+len)` when it lies inside the mapping.
    fn range(&self, offset: u64, len: u32) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len as usize)? <= self.len).then_some(self.base + off)
    }

    fn moved(&self, n: usize) {
        let before = self.moved.fetch_add(n, Ordering::Relaxed);
        if before < UNMAP_EVERY && before + n >= UNMAP_EVERY {
            self.moved.store(0, Ordering::Relaxed);
            // SAFETY: exactly the mapping's range; for a shared file mapping MADV_DONTNEED only drops page
            // tables, and the data stays in the file.
            unsafe {
                libc::madvise(
                    self.base as *mut libc::c_void,
                    self.len,
                    libc::MADV_DONTNEED,
                )
            };
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let mut listen = "127.0.0.1:0".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().context("--listen needs an address")?,
            _ if file.is_none() => file = Some(a),
            _ => bail!("usage: lean_server FILE [--listen ADDR]"),
        }
    }
    let path = file.context("usage: lean_server FILE [--listen ADDR]")?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {path}"))?;
    let len = usize::try_from(f.metadata()?.len())?;
    if len == 0 {
        bail!("{path} is empty");
    }
    // SAFETY: a fresh shared mapping chosen by the kernel of an open descriptor; it overlaps nothing the
    // program uses and lives until the process exits. Only system calls touch it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error()).context("cannot map the file");
    }
    let map = Arc::new(Map {
        base: p as usize,
        len,
        moved: AtomicUsize::new(0),
    });
    let listener =
        TcpListener::bind(&listen).with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let map = Arc::clone(&map);
        std::thread::spawn(move || {
            let _ = serve(stream, &map);
        });
    }
    Ok(())
}

fn serve(mut s: TcpStream, map: &Map) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    let mut client = [0u8; 4];
    s.read_exact(&mut client)?;
    let no_zeroes = u32::from_be_bytes(client) & CLIENT_NO_ZEROES != 0;
    let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    let size = map.len as u64;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let olen = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if olen > MAX_OPTION_LEN {
            return Ok(());
        }
        let mut data = vec![0u8; olen as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut r = size.to_be_bytes().to_vec();
                r.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0; 124]);
                }
                s.write_all(&r)?;
                break;
            }
            OPT_GO | OPT_INFO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                option_reply(&mut s, opt, REP_INFO, &info)?;
                option_reply(&mut s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            OPT_ABORT => return Ok(()),
            _ => option_reply(&mut s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
    let fd = s.as_raw_fd();
    loop {
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h)?;
        let Some(Request {
            command,
            cookie,
            offset,
            length,
            ..
        }) = Request::decode(&h)
        else {
            return Ok(());
        };
        let mut reply = simple_reply(0, cookie);
        let range = (length <= BLOCK_MAX)
            .then(|| map.range(offset, length))
            .flatten();
        match (command, range) {
            (CMD_WRITE, Some(addr)) => {
                let page = rustix::param::page_size();
                let start = addr & !(page - 1);
                // SAFETY: the range lies inside the mapping (checked), widened down to its page start,
                // which is inside the page-aligned mapping; populating changes no contents.
                unsafe {
                    libc::madvise(
                        start as *mut libc::c_void,
                        addr + length as usize - start,
                        libc::MADV_POPULATE_READ,
                    )
                };
                // SAFETY: `[addr, addr+length)` lies inside the writable mapping, which outlives the call;
                // the kernel writes the received bytes there and nothing else.
                let n = unsafe {
                    libc::recv(
                        fd,
                        addr as *mut libc::c_void,
                        length as usize,
                        libc::MSG_WAITALL,
                    )
                };
                if n != length as isize {
                    return Ok(());
                }
                map.moved(length as usize);
                s.write_all(&reply)?;
            }
            (CMD_WRITE, None) => return Ok(()),
            (CMD_READ, Some(addr)) => {
                let iov = [
                    libc::iovec {
                        iov_base: reply.as_mut_ptr().cast(),
                        iov_len: reply.len(),
                    },
                    libc::iovec {
                        iov_base: addr as *mut libc::c_void,
                        iov_len: length as usize,
                    },
                ];
                let mut sent = 0;
                let total = reply.len() + length as usize;
                while sent < total {
                    let (first, skip) = if sent < reply.len() {
                        (0, sent)
                    } else {
                        (1, sent - reply.len())
                    };
                    let mut v = iov;
                    v[first].iov_base = (v[first].iov_base as usize + skip) as *mut libc::c_void;
                    v[first].iov_len -= skip;
                    // SAFETY: both iovecs point into live memory: the reply on this stack frame and a
                    // range inside the mapping (checked); the kernel only reads them.
                    let n = unsafe { libc::writev(fd, v[first..].as_ptr(), (2 - first) as i32) };
                    if n <= 0 {
                        return Ok(());
                    }
                    sent += n as usize;
                }
                map.moved(length as usize);
            }
            (CMD_DISC, _) => return Ok(()),
            (CMD_FLUSH, _) => s.write_all(&reply)?,
            _ => s.write_all(&simple_reply(libc::EINVAL as u32, cookie))?,
        }
    }
}

fn option_reply(s: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut r = option_reply_header(opt, kind, data.len() as u32).to_vec();
    r.extend_from_slice(data);
    s.write_all(&r)
}
