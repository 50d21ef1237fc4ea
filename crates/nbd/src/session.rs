//! The transmission phase of one NBD connection (NetworkBlockDevice/nbd `doc/proto.md`, "Transmission
//! phase"). A few dedicated worker threads share the socket: each takes the read lock, reads one request
//! (and its payload), releases it, runs the request against the backend, then writes its reply under the
//! write lock. Requests are therefore pipelined and answered out of order, blocking I/O never runs on the
//! async runtime, and a connection holds at most one payload buffer per worker.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::Extent;
use crate::proto::*;
use crate::registry::Export;

/// Socket read buffer of a session.
const READ_BUFFER: usize = 256 * 1024;

/// What negotiation decided for this session.
pub(crate) struct SessionParams {
    pub export: Arc<Export>,
    pub structured: bool,
    pub meta_allocation: bool,
}

/// State shared by the worker threads of one connection.
pub(crate) struct Conn {
    params: SessionParams,
    reader: Mutex<BufReader<io::Chain<io::Cursor<Vec<u8>>, TcpStream>>>,
    writer: Mutex<TcpStream>,
    control: TcpStream,
    /// Set when the connection must stop reading requests (DISC, EOF, protocol error, shutdown).
    done: AtomicBool,
    /// Whether any write-like request was executed (flush on graceful shutdown).
    pub wrote: AtomicBool,
}

impl Conn {
    /// `leftover` holds bytes already read past the end of negotiation.
    pub(crate) fn new(
        stream: TcpStream,
        leftover: Vec<u8>,
        params: SessionParams,
    ) -> io::Result<Arc<Conn>> {
        let writer = stream.try_clone()?;
        let control = stream.try_clone()?;
        Ok(Arc::new(Conn {
            params,
            reader: Mutex::new(BufReader::with_capacity(
                READ_BUFFER,
                io::Cursor::new(leftover).chain(stream),
            )),
            writer: Mutex::new(writer),
            control,
            done: AtomicBool::new(false),
            wrote: AtomicBool::new(false),
        }))
    }

    /// Stops reading requests; in-flight requests still get their replies.
    pub(crate) fn stop_reading(&self) {
        self.done.store(true, Ordering::Release);
        let _ = self.control.shutdown(Shutdown::Read);
    }

    /// Closes the socket in both directions at once.
    pub(crate) fn kill(&self) {
        self.done.store(true, Ordering::Release);
        let _ = self.control.shutdown(Shutdown::Both);
    }

    pub(crate) fn export(&self) -> &Arc<Export> {
        &self.params.export
    }
}

/// One admitted request, read off the socket.
struct Admitted {
    req: Request,
    payload: Option<Vec<u8>>,
}

enum Next {
    Run(Admitted),
    Refuse(Request, u32),
    Stop,
}

/// Reads the next request under the read lock; `Stop` ends this worker.
fn next_request(conn: &Conn) -> Next {
    let mut rd = conn.reader.lock().expect("session reader lock poisoned");
    if conn.done.load(Ordering::Acquire) {
        return Next::Stop;
    }
    let mut hdr = [0u8; REQUEST_LEN];
    if rd.read_exact(&mut hdr).is_err() {
        conn.done.store(true, Ordering::Release);
        return Next::Stop;
    }
    let Some(req) = Request::decode(&hdr) else {
        tracing::info!(export = %conn.params.export.name, "bad request magic; closing the connection");
        conn.kill();
        return Next::Stop;
    };
    if req.command == CMD_DISC {
        conn.done.store(true, Ordering::Release);
        return Next::Stop;
    }
    let export = &conn.params.export;
    let len = req.length;
    let size = export.backend.size();
    let in_range = req
        .offset
        .checked_add(u64::from(len))
        .is_some_and(|e| e <= size);
    let p = &conn.params;
    let refuse = if export.is_closing() {
        Some(ESHUTDOWN)
    } else {
        match req.command {
            CMD_READ | CMD_WRITE if len == 0 || len > BLOCK_MAX => Some(EINVAL),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if export.read_only => Some(EPERM),
            CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Some(ENOSPC),
            CMD_READ | CMD_TRIM | CMD_CACHE | CMD_BLOCK_STATUS if !in_range => Some(EINVAL),
            CMD_BLOCK_STATUS if !(p.structured && p.meta_allocation) || len == 0 => Some(EINVAL),
            CMD_WRITE_ZEROES | CMD_TRIM if len == 0 => Some(EINVAL),
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS => None,
            _ => Some(EINVAL),
        }
    };
    if let Some(error) = refuse {
        if req.command == CMD_WRITE {
            // The payload is drained so the connection stays in step.
            let n = io::copy(&mut (&mut *rd).take(u64::from(len)), &mut io::sink());
            if !matches!(n, Ok(n) if n == u64::from(len)) {
                conn.done.store(true, Ordering::Release);
                return Next::Stop;
            }
        }
        export.request_start();
        return Next::Refuse(req, error);
    }
    let payload = if req.command == CMD_WRITE {
        let mut buf = Vec::with_capacity(len as usize);
        // `read_to_end` fills the spare capacity without zeroing it first.
        match (&mut *rd).take(u64::from(len)).read_to_end(&mut buf) {
            Ok(n) if n == len as usize => Some(buf),
            _ => {
                conn.done.store(true, Ordering::Release);
                return Next::Stop;
            }
        }
    } else {
        None
    };
    export.request_start();
    export.counters.touch();
    Next::Run(Admitted { req, payload })
}

/// Runs one worker thread until the connection stops.
pub(crate) fn worker(conn: Arc<Conn>) {
    let export = Arc::clone(&conn.params.export);
    loop {
        let body = match next_request(&conn) {
            Next::Stop => return,
            Next::Refuse(req, error) => {
                if conn.params.structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) {
                    ReplyBody::StructuredError {
                        cookie: req.cookie,
                        error,
                    }
                } else {
                    ReplyBody::Simple {
                        cookie: req.cookie,
                        error,
                    }
                }
            }
            Next::Run(a) => {
                if matches!(a.req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
                    conn.wrote.store(true, Ordering::Relaxed);
                }
                execute(&export, a.req, a.payload, conn.params.structured)
            }
        };
        let sent = {
            let mut wr = conn.writer.lock().expect("session writer lock poisoned");
            write_reply(&mut wr, &body)
        };
        export.request_done();
        if sent.is_err() {
            conn.kill();
            return;
        }
    }
}

pub(crate) enum ReplyBody {
    Simple {
        cookie: u64,
        error: u32,
    },
    /// A structured error chunk (used for READ and BLOCK_STATUS when structured replies are on).
    StructuredError {
        cookie: u64,
        error: u32,
    },
    Read {
        cookie: u64,
        offset: u64,
        data: Vec<u8>,
        structured: bool,
    },
    BlockStatus {
        cookie: u64,
        extents: Vec<Extent>,
    },
}

/// Writes all of `bufs` with as few system calls as possible.
fn write_all_vectored(w: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_reply(wr: &mut TcpStream, r: &ReplyBody) -> io::Result<()> {
    match r {
        ReplyBody::Simple { cookie, error } => wr.write_all(&simple_reply(*error, *cookie)),
        ReplyBody::StructuredError { cookie, error } => {
            let msg = error_name(*error).as_bytes();
            let len = 6 + msg.len() as u32;
            let mut b = Vec::with_capacity(26 + msg.len());
            b.extend_from_slice(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                *cookie,
                len,
            ));
            b.extend_from_slice(&error.to_be_bytes());
            b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            b.extend_from_slice(msg);
            wr.write_all(&b)
        }
        ReplyBody::Read {
            cookie,
            offset,
            data,
            structured,
        } => {
            if *structured {
                let len = u32::try_from(8 + data.len()).expect("reads are at most BLOCK_MAX");
                let mut h = [0u8; 28];
                h[..20].copy_from_slice(&structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    *cookie,
                    len,
                ));
                h[20..].copy_from_slice(&offset.to_be_bytes());
                write_all_vectored(wr, &mut [IoSlice::new(&h), IoSlice::new(data)])
            } else {
                let h = simple_reply(0, *cookie);
                write_all_vectored(wr, &mut [IoSlice::new(&h), IoSlice::new(data)])
            }
        }
        ReplyBody::BlockStatus { cookie, extents } => {
            let len = u32::try_from(4 + 8 * extents.len()).expect("extent count is bounded");
            let mut b = Vec::with_capacity(20 + len as usize);
            b.extend_from_slice(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                *cookie,
                len,
            ));
            b.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
            for e in extents {
                b.extend_from_slice(&u32::try_from(e.length).unwrap_or(u32::MAX).to_be_bytes());
                b.extend_from_slice(&e.flags.to_be_bytes());
            }
            wr.write_all(&b)
        }
    }
}

fn io_reply(cookie: u64, structured_err: bool, r: io::Result<()>) -> ReplyBody {
    match r {
        Ok(()) => ReplyBody::Simple { cookie, error: 0 },
        Err(e) => {
            let error = errno_of(&e);
            if structured_err {
                ReplyBody::StructuredError { cookie, error }
            } else {
                ReplyBody::Simple { cookie, error }
            }
        }
    }
}

fn execute(export: &Export, req: Request, payload: Option<Vec<u8>>, structured: bool) -> ReplyBody {
    use std::sync::atomic::Ordering::Relaxed;
    let b = &export.backend;
    let c = &export.counters;
    let cookie = req.cookie;
    let off = req.offset;
    let len = u64::from(req.length);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let then_fua = |r: io::Result<()>| -> io::Result<()> {
        r?;
        if fua {
            b.flush()?;
        }
        Ok(())
    };
    match req.command {
        CMD_READ => {
            let mut data = Vec::new();
            match b.read_at(&mut data, off, req.length as usize) {
                Ok(()) => {
                    c.reads.fetch_add(1, Relaxed);
                    c.bytes_read.fetch_add(len, Relaxed);
                    ReplyBody::Read {
                        cookie,
                        offset: off,
                        data,
                        structured,
                    }
                }
                Err(e) => io_reply(cookie, structured, Err(e)),
            }
        }
        CMD_WRITE => {
            let data = payload.expect("WRITE requests carry their payload");
            let r = then_fua(b.write_at(&data, off));
            if r.is_ok() {
                c.writes.fetch_add(1, Relaxed);
                c.bytes_written.fetch_add(len, Relaxed);
                c.wrote(off + len);
            }
            io_reply(cookie, false, r)
        }
        CMD_FLUSH => {
            let r = b.flush();
            if r.is_ok() {
                c.flushes.fetch_add(1, Relaxed);
            }
            io_reply(cookie, false, r)
        }
        CMD_TRIM => {
            let r = then_fua(b.trim(off, len));
            if r.is_ok() {
                c.trims.fetch_add(1, Relaxed);
                c.wrote(off + len);
            }
            io_reply(cookie, false, r)
        }
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            let r = then_fua(b.zero(off, len, may_trim, fast));
            if r.is_ok() {
                c.zeroes.fetch_add(1, Relaxed);
                c.wrote(off + len);
            }
            io_reply(cookie, false, r)
        }
        CMD_CACHE => io_reply(cookie, false, b.cache(off, len)),
        CMD_BLOCK_STATUS => match b.block_status(off, len) {
            Ok(mut extents) if !extents.is_empty() => {
                c.block_status.fetch_add(1, Relaxed);
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    extents.truncate(1);
                }
                ReplyBody::BlockStatus { cookie, extents }
            }
            Ok(_) => ReplyBody::StructuredError { cookie, error: EIO },
            Err(e) => io_reply(cookie, true, Err(e)),
        },
        _ => ReplyBody::Simple {
            cookie,
            error: EINVAL,
        },
    }
}
