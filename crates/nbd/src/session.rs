//! The transmission phase of one NBD connection (NetworkBlockDevice/nbd `doc/proto.md`, "Transmission
//! phase") as one asynchronous task over any byte stream (TCP or TLS).
//!
//! The task reads every request the client has sent, runs at once those that cannot wait for a device
//! (reads served from cache, writes to memory-backed files, see [`Backend::read_nowait`]), hands the rest
//! (flush, trim, zero, large or uncached I/O) to a bounded pool of blocking threads, and writes completed
//! replies together with one vectored write. An idle session is a parked future: it costs no thread.
//!
//! Bounds: a connection has at most `max_in_flight` requests read and not yet answered, and holds at most
//! `max_connection_bytes` of request payload (WRITE data, READ reply data); the server as a whole holds at
//! most `in_flight_budget` bytes, and [`SMALL_RESERVE`] more for requests of at most [`SMALL_MAX`]. When
//! any bound is reached the task stops reading the socket until replies drain, so TCP back-pressure
//! reaches the client instead of memory growing. A client that stops reading
//! replies is closed after `send_timeout`, releasing what it held.
//!
//! [`Backend::read_nowait`]: crate::Backend::read_nowait

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    Take,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backend::Extent;
use crate::bufpool::BufPool;
use crate::mapping;
use crate::proto::*;
use crate::registry::Export;

/// Socket read buffer of a session.
const READ_BUFFER: usize = 256 * 1024;
/// READ and WRITE requests up to this size may run on the session's own thread (when they cannot wait for a
/// device); larger ones always go to the blocking pool, so one request never holds a runtime thread for more
/// than a copy of this size (well under a millisecond). Handing 1 MiB writes to the pool instead cost a
/// context switch each and made several pool threads contend for the file's inode lock: fio's 1 MiB
/// sequential writes ran 15-25 % slower than in place.
const INLINE_MAX: u32 = 4 * 1024 * 1024;
/// After running this many requests in a row, the reader lets the writer send their replies before it
/// reads on: a client that sent a burst gets answers while the rest of the burst runs, instead of in one
/// block at the end (which would leave it idle meanwhile).
const REPLY_EVERY: u32 = 4;
/// [`REPLY_EVERY`] while more sessions are busy than the runtime has workers. Letting the writer run means
/// yielding the session's task, which then waits behind every other runnable session; with sessions
/// queueing for workers, each yield costs a round of them. fio with 4 jobs on 2 workers: 13-17 % more 4k
/// IOPS and 24 % more 1 MiB throughput than yielding every 4 requests. With a worker to spare, yielding
/// is cheap and early replies keep the client busy: one job with 16 lost 2-5 % of 4k IOPS and 12 % of
/// 1 MiB throughput.
const REPLY_EVERY_CROWDED: u32 = 16;
/// Each this many bytes of a request's payload count as one more request towards the batch
/// ([`reply_every`]), so a client with few large requests in flight (fio, 1 MiB, queue depth 8) alone on
/// the server gets each reply as soon as its request is done instead of four at a time: 9 % more
/// throughput on one connection.
const REPLY_BYTES: u32 = 256 * 1024;
/// READ replies and WRITE payloads at least this large move directly between a plain TCP socket and a
/// mapped memory-backed file (see `mapping.rs`). Smaller WRITE payloads mostly arrived in the read buffer
/// with their header already, and are written from there. Smaller READs are copied with `pread`: each
/// scattered small read through the mapping would take a page fault (the mapping's pages are dropped
/// every 32 MiB moved), which cost more than the copy it saved (fio 4k random reads, 4 jobs: 25 % fewer
/// IOPS).
const DIRECT_MIN: u32 = 64 * 1024;
/// A WRITE payload holds budget for at most this much beyond what has arrived of it: a client that
/// announces a large WRITE and then trickles its payload cannot hold the budget of data it never sends.
/// Payloads up to this size are reserved at once, as before they arrive; a larger one one piece at a time.
/// When the budget has no room for the next piece, what arrived is written to the export first and its
/// budget released, so a payload never waits for budget while holding some (two payloads each waiting for
/// the other's share would wait forever).
const PIECE: u32 = 1024 * 1024;
/// Requests of at most this size may take budget from [`SMALL_RESERVE`] when the server's budget is
/// spent (see [`reserve`]).
pub const SMALL_MAX: u32 = 256 * 1024;
/// Budget beyond `in_flight_budget` that only requests of at most [`SMALL_MAX`] take, when the budget has
/// no room for them. Waiters for the budget are served in order, so without it a small request waits
/// behind every large one queued before it: clients that never take their READ replies hold the whole
/// budget, their queued requests get it as each is closed for the send timeout, and another client's
/// 4 KiB READ waited for several such waves.
pub const SMALL_RESERVE: usize = 8 * 1024 * 1024;
/// Most extents in one BLOCK_STATUS reply (one with `NBD_CMD_FLAG_REQ_ONE`). Each costs the backend up to
/// two `lseek` calls, so a reply to a client that asked for one extent looks up only that one.
const MAX_EXTENTS: usize = 1024;
/// Most replies gathered into one vectored write.
const BATCH: usize = 64;

/// Resources shared by every session of a server.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Bytes of request payload the whole server may hold.
    pub budget: Arc<Semaphore>,
    /// [`SMALL_RESERVE`] more bytes, for requests of at most [`SMALL_MAX`] when `budget` is spent.
    pub small: Arc<Semaphore>,
    /// Blocking I/O calls running at once.
    pub pool: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub max_connection_bytes: usize,
    pub idle_timeout: Option<Duration>,
    pub send_timeout: Duration,
    pub shutdown_drain: Duration,
    /// Buffers for WRITE payloads and READ data, reused across requests.
    pub buffers: Arc<BufPool>,
    /// Sessions with a request being run or answered (see [`Busy`]).
    pub busy: Arc<AtomicUsize>,
    /// See `ServerConfig::write_fence`.
    pub write_fence: Option<Arc<crate::WriteFence>>,
}

/// Requests a session's reader runs before it yields to its writer (see [`REPLY_EVERY_CROWDED`]).
fn reply_every(busy: usize, workers: usize) -> u32 {
    if busy > workers {
        REPLY_EVERY_CROWDED
    } else {
        REPLY_EVERY
    }
}

/// A session's place in [`Shared::busy`]: counted from the first request it reads while idle until it
/// waits for the next one with every reply written.
struct Busy<'a> {
    count: &'a AtomicUsize,
    on: bool,
}

impl Busy<'_> {
    fn set(&mut self, on: bool) {
        if on != self.on {
            self.on = on;
            if on {
                self.count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// What negotiation decided for this session.
pub(crate) struct SessionParams {
    pub export: Arc<Export>,
    pub structured: bool,
    pub meta_allocation: bool,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client disconnected (DISC or EOF).
    Client,
    /// The client broke the protocol (bad magic).
    Protocol,
    /// No request arrived for the idle timeout while nothing was in flight.
    Idle,
    /// The export was removed.
    Killed,
    /// The server is shutting down.
    Stopped,
    /// Replies could not be written (client gone or not reading them).
    Send,
}

/// A request's share of the connection's and of the server's byte budget.
type Bytes = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// `n` bytes of the server's budget now: from `budget`, or for a `small` request (its whole length at
/// most [`SMALL_MAX`], so its budget is one permit that is never merged with one of `budget`) from the
/// reserve.
fn try_global(shared: &Shared, n: u32, small: bool) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = Arc::clone(&shared.budget).try_acquire_many_owned(n) {
        return Some(p);
    }
    if small {
        return Arc::clone(&shared.small).try_acquire_many_owned(n).ok();
    }
    None
}

/// `n` bytes of both budgets if both have room now.
fn try_reserve(conn: &Conn, n: u32, small: bool) -> Option<Bytes> {
    let c = Arc::clone(&conn.bytes).try_acquire_many_owned(n).ok()?;
    let g = try_global(&conn.shared, n, small)?;
    Some((c, g))
}

/// `n` bytes of both budgets, waiting for them; the session's end when it stops or breaks meanwhile. A
/// `small` request (see [`try_global`]) takes whichever of the budget and [`SMALL_RESERVE`] has room
/// first.
async fn reserve(
    conn: &Conn,
    n: u32,
    small: bool,
    stop: &CancellationToken,
    broken: &CancellationToken,
) -> Result<Bytes, End> {
    // Nothing waits for budget while there is room (a semaphore's permits stay free only while nobody
    // waits), so taking it at once changes no order and spares the futures and the runtime's budget.
    if let Some(b) = try_reserve(conn, n, small) {
        return Ok(b);
    }
    // Budgets are taken before any buffer exists: when they are spent, the socket is not read.
    let take = async {
        let c = Arc::clone(&conn.bytes).acquire_many_owned(n).await;
        let shared = &conn.shared;
        let g = match try_global(shared, n, small) {
            Some(p) => Ok(p),
            None if small => tokio::select! {
                p = Arc::clone(&shared.budget).acquire_many_owned(n) => p,
                p = Arc::clone(&shared.small).acquire_many_owned(n) => p,
            },
            None => Arc::clone(&shared.budget).acquire_many_owned(n).await,
        };
        (
            c.expect("session semaphores are never closed (invariant)"),
            g.expect("the server budget is never closed (invariant)"),
        )
    };
    tokio::select! {
        _ = stop.cancelled() => Err(End::Stopped),
        _ = broken.cancelled() => Err(End::Send),
        p = take => Ok(p),
    }
}

/// Everything a request holds until its reply is written or dropped: its queue slot, its share of the
/// byte budgets, and its place in the export's in-flight count.
struct Hold {
    export: Arc<Export>,
    _depth: OwnedSemaphorePermit,
    _bytes: Option<Bytes>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.export.request_done();
    }
}

/// An encoded reply: a header (with any small body) and optional READ data.
struct Reply {
    head: Vec<u8>,
    data: Data,
    /// Released when the reply is written or dropped; also keeps the export (and its mapping) alive.
    hold: Hold,
}

/// The data of a READ reply.
enum Data {
    None,
    /// Read into a buffer (from the pool).
    Owned(Vec<u8>),
    /// `len` bytes at `offset` of the export's mapped file, sent by the kernel straight from it (plain TCP
    /// sessions only, see `mapping.rs`). The reply's hold keeps the export, and so the mapping, alive.
    Mapped {
        offset: u64,
        len: usize,
    },
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::None => 0,
            Data::Owned(v) => v.len(),
            Data::Mapped { len, .. } => *len,
        }
    }
}

struct Conn {
    params: SessionParams,
    shared: Arc<Shared>,
    depth: Arc<Semaphore>,
    /// The permits of `depth`: all of them are free when no request is held.
    depth_total: u32,
    bytes: Arc<Semaphore>,
    tx: UnboundedSender<Reply>,
    /// A plain TCP session: READ replies and large WRITE payloads may move through the export's mapping.
    direct: bool,
    /// Whether any write-like request ran (flush on graceful shutdown).
    wrote: Arc<AtomicBool>,
}

impl Conn {
    /// Whether a request of this session is being run or answered (its queue depth is not all free).
    fn holds_requests(&self) -> bool {
        self.depth.available_permits() < self.depth_total as usize
    }
}

/// Runs the transmission phase on `stream` until the client leaves, the export is removed (`kill`) or the
/// server stops (`stop`: stop reading, answer what is in flight within the drain time, flush).
pub(crate) async fn run<S>(
    stream: S,
    params: SessionParams,
    shared: Arc<Shared>,
    kill: CancellationToken,
    stop: CancellationToken,
) -> End
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    run_halves(rd, wr, params, shared, kill, stop).await
}

/// [`run`] on a plain TCP connection, whose payloads may move through the export's mapping (see
/// `mapping.rs`).
pub(crate) async fn run_tcp(
    stream: TcpStream,
    params: SessionParams,
    shared: Arc<Shared>,
    kill: CancellationToken,
    stop: CancellationToken,
) -> End {
    let (rd, wr) = stream.into_split();
    run_halves(rd, wr, params, shared, kill, stop).await
}

/// A half of a session's stream, and the TCP socket under it when there is nothing between them (no
/// TLS), for direct I/O through the export's mapping.
pub(crate) trait Half {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl<S> Half for tokio::io::ReadHalf<S> {}
impl<S> Half for tokio::io::WriteHalf<S> {}
impl Half for OwnedReadHalf {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}
impl Half for OwnedWriteHalf {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

async fn run_halves<R, W>(
    rd: R,
    wr: W,
    params: SessionParams,
    shared: Arc<Shared>,
    kill: CancellationToken,
    stop: CancellationToken,
) -> End
where
    R: AsyncRead + Half + Unpin + Send,
    W: AsyncWrite + Half + Unpin + Send,
{
    let (tx, rx) = unbounded_channel();
    let direct = rd.tcp().is_some() && wr.tcp().is_some();
    let export = Arc::clone(&params.export);
    let read_only = export.read_only;
    let wrote = Arc::new(AtomicBool::new(false));
    let conn_bytes = shared.max_connection_bytes.max(BLOCK_MAX as usize);
    // Semaphore::acquire_many counts in u32; more requests in flight than that would be no bound anyway.
    let depth_total = u32::try_from(shared.max_in_flight.max(1)).unwrap_or(u32::MAX);
    let conn = Conn {
        depth: Arc::new(Semaphore::new(depth_total as usize)),
        depth_total,
        bytes: Arc::new(Semaphore::new(conn_bytes)),
        params,
        shared: Arc::clone(&shared),
        tx,
        direct,
        wrote: Arc::clone(&wrote),
    };
    // Cancelled by the writer when the client stops taking replies, so the reader stops too.
    let broken = CancellationToken::new();
    let reader = async {
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd.take(u64::MAX));
        let end = read_requests(&mut rd, &conn, &stop, &broken).await;
        drop(conn);
        end
    };
    let writer = async {
        let r = write_replies(wr, rx, shared.send_timeout, &shared.buffers).await;
        if r.is_err() {
            broken.cancel();
        }
        r
    };
    let both = async { tokio::join!(reader, writer) };
    let drain_deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(shared.shutdown_drain).await;
    };
    let end = tokio::select! {
        _ = kill.cancelled() => End::Killed,
        _ = drain_deadline => End::Stopped,
        (end, written) = both => if written.is_err() { End::Send } else { end },
    };
    // A session that wrote flushes as it ends, however it ends, so that what its client was told is
    // written reaches the device even when the client never flushed (nbdcopy flushes only with --flush),
    // before anything reading the device from outside (a snapshot) looks. A removed export (`Killed`) is
    // flushed by its removal, after all its sessions are closed.
    if end != End::Killed && wrote.load(Ordering::Relaxed) && !read_only {
        let b = Arc::clone(&export.backend);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || b.flush()).await {
            tracing::warn!(export = %export.name, error = %e, "the flush at the end of a session failed");
        }
    }
    end
}

/// Answers a request that is not run with `errno` (a structured error chunk where the reply to a READ or
/// BLOCK_STATUS is structured); its hold is released once the reply is sent.
fn refuse(conn: &Conn, req: &Request, errno: u32, hold: Hold) {
    let structured = conn.params.structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS);
    let _ = conn
        .tx
        .send(error_reply(req.cookie, structured, errno, hold));
}

enum Next {
    Header([u8; REQUEST_LEN]),
    End(End),
}

async fn next_header<R: AsyncRead + Unpin>(
    rd: &mut BufReader<Take<R>>,
    conn: &Conn,
    stop: &CancellationToken,
    broken: &CancellationToken,
) -> Next {
    let mut hdr = [0u8; REQUEST_LEN];
    // The idle timer starts once every request read so far has been answered (its reply handed to the
    // socket), which is often after this wait for the next header began: a session waiting for its own
    // replies is not idle, one that was answered and sends nothing is. Holding every queue slot while the
    // timer runs takes nothing from anyone: only this reader takes slots, and it is waiting here.
    let idle = async {
        match conn.shared.idle_timeout {
            Some(t) => {
                let _all_answered = conn.depth.acquire_many(conn.depth_total).await;
                tokio::time::sleep(t).await;
            }
            None => std::future::pending().await,
        }
    };
    let read = async { rd.read_exact(&mut hdr).await.map_err(|_| End::Client) };
    tokio::select! {
        _ = stop.cancelled() => Next::End(End::Stopped),
        _ = broken.cancelled() => Next::End(End::Send),
        _ = idle => Next::End(End::Idle),
        r = read => match r {
            Ok(_) => Next::Header(hdr),
            Err(e) => Next::End(e),
        },
    }
}

/// Reads and dispatches requests until the client disconnects, breaks the protocol, idles out or the
/// server stops.
async fn read_requests<R: AsyncRead + Half + Unpin>(
    rd: &mut BufReader<Take<R>>,
    conn: &Conn,
    stop: &CancellationToken,
    broken: &CancellationToken,
) -> End {
    let export = &conn.params.export;
    let mut since_yield = 0u32;
    let direct_writes = conn.direct && export.backend.mapping().is_some_and(|m| m.writable());
    let mut last_direct = false;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let mut busy = Busy {
        count: &conn.shared.busy,
        on: false,
    };
    loop {
        if since_yield >= reply_every(conn.shared.busy.load(Ordering::Relaxed), workers) {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
        busy.set(conn.holds_requests());
        // After a payload received into the mapping the next one likely is too: read only the next
        // header, so the read buffer does not take (and copy) the start of its payload.
        rd.get_mut().set_limit(if last_direct {
            REQUEST_LEN as u64
        } else {
            u64::MAX
        });
        let next = next_header(rd, conn, stop, broken).await;
        rd.get_mut().set_limit(u64::MAX);
        last_direct = false;
        busy.set(true);
        let hdr = match next {
            Next::Header(h) => h,
            Next::End(e) => {
                if e == End::Idle {
                    tracing::info!(export = %export.name, "closing a session idle for longer than the idle timeout");
                }
                return e;
            }
        };
        let Some(req) = Request::decode(&hdr) else {
            tracing::info!(export = %export.name, "bad request magic; closing the connection");
            return End::Protocol;
        };
        if req.command == CMD_DISC {
            return End::Client;
        }
        let depth = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            _ = broken.cancelled() => return End::Send,
            p = Arc::clone(&conn.depth).acquire_owned() => p.expect("session semaphores are never closed (invariant)"),
        };
        if let Some(error) = refusal(&conn.params, &req).or_else(|| fenced(&conn.shared, &req)) {
            if req.command == CMD_WRITE
                && !drain_payload(rd, req.length as usize, conn.shared.send_timeout).await
            {
                return End::Client;
            }
            export.request_start();
            let hold = Hold {
                export: Arc::clone(export),
                _depth: depth,
                _bytes: None,
            };
            refuse(conn, &req, error, hold);
            continue;
        }
        // A READ's reply data is held from now until it is sent; a WRITE's payload holds budget as it
        // arrives (see `take_payload`).
        let bytes = if req.command == CMD_READ {
            match reserve(conn, req.length, req.length <= SMALL_MAX, stop, broken).await {
                Ok(b) => Some(b),
                Err(e) => return e,
            }
        } else {
            None
        };
        if direct_writes
            && req.command == CMD_WRITE
            && req.length >= DIRECT_MIN
            && req.flags & CMD_FLAG_FUA == 0
        {
            // A payload received into the mapping lands in the file, not in memory: it holds no budget,
            // but waits, like any request, while the budget is spent.
            let small = req.length <= SMALL_MAX;
            match reserve(conn, req.length.min(PIECE), small, stop, broken).await {
                Ok(b) => drop(b),
                Err(e) => return e,
            }
            export.request_start();
            let hold = Hold {
                export: Arc::clone(export),
                _depth: depth,
                _bytes: None,
            };
            if export.is_closing() {
                // The export began closing while this WRITE waited for budget: refused as below.
                if !drain_payload(rd, req.length as usize, conn.shared.send_timeout).await {
                    return End::Client;
                }
                let _ = conn
                    .tx
                    .send(error_reply(req.cookie, false, ESHUTDOWN, hold));
                continue;
            }
            let result = match direct_write(rd, conn, &req, stop, broken).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            export.counters.touch();
            conn.wrote.store(true, Ordering::Relaxed);
            let error = match result {
                Ok(()) => {
                    count_write(export, req.offset, req.length);
                    0
                }
                Err(e) => errno_of(&e),
            };
            let _ = conn.tx.send(error_reply(req.cookie, false, error, hold));
            last_direct = true;
            since_yield += 1 + req.length / REPLY_BYTES;
            continue;
        }
        let mut req = req;
        let mut bytes = bytes;
        let mut started = false;
        let payload = if req.command == CMD_WRITE {
            let taken = take_payload(
                rd,
                conn,
                req.offset,
                req.length as usize,
                &mut started,
                stop,
                broken,
            )
            .await;
            match taken {
                Ok(Taken::Held {
                    buf,
                    bytes: held,
                    written,
                }) => {
                    // What was written already (the budget had no room for all of it) is counted
                    // now; the request goes on as a WRITE of the rest.
                    let written = u32::try_from(written).expect("a payload is at most BLOCK_MAX");
                    req.offset += u64::from(written);
                    req.length -= written;
                    bytes = Some(held);
                    Some(buf)
                }
                Ok(Taken::Refused(errno)) => {
                    let hold = Hold {
                        export: Arc::clone(export),
                        _depth: depth,
                        _bytes: None,
                    };
                    let _ = conn.tx.send(error_reply(req.cookie, false, errno, hold));
                    continue;
                }
                Err(e) => return e,
            }
        } else {
            None
        };
        if !started {
            export.request_start();
        }
        let hold = Hold {
            export: Arc::clone(export),
            _depth: depth,
            _bytes: bytes,
        };
        if !started && export.is_closing() {
            // The export began closing after the request was checked, while it waited for budget or its
            // payload arrived. The drain, which counts requests from `request_start`, may already have
            // found the export idle and the final flush begun: run now, the request could be acknowledged
            // after that flush. It is refused like any request that arrives once the export is closing
            // (`request_start` before this check, and the closer's `closing` before its count, both
            // sequentially consistent, make sure one of the two sees the other).
            refuse(conn, &req, ESHUTDOWN, hold);
            continue;
        }
        export.counters.touch();
        if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
            conn.wrote.store(true, Ordering::Relaxed);
        }
        dispatch(conn, req, payload, hold, stop, broken).await;
        since_yield += 1 + req.length / REPLY_BYTES;
    }
}

/// Writes a WRITE request's payload to the export's mapped file: what the read buffer already holds with
/// a plain write, the rest received from the socket straight into the mapping. What the mapping cannot
/// take (a page tmpfs has no room for, a file shrunk under the server, a kernel without
/// `MADV_POPULATE_READ`, a seccomp filter refusing `madvise`) is read into a buffer and written the
/// ordinary way, which reports the file's error. The session's end when the connection failed or stalled
/// mid-payload; otherwise the file's result.
async fn direct_write<R: AsyncRead + Half + Unpin>(
    rd: &mut BufReader<Take<R>>,
    conn: &Conn,
    req: &Request,
    stop: &CancellationToken,
    broken: &CancellationToken,
) -> Result<io::Result<()>, End> {
    let b = &conn.params.export.backend;
    let len = req.length as usize;
    let held = rd.buffer();
    let n = held.len().min(len);
    let mut result = if n > 0 {
        b.write_at(&held[..n], req.offset)
    } else {
        Ok(())
    };
    std::pin::Pin::new(&mut *rd).consume(n);
    let sock = rd
        .get_ref()
        .get_ref()
        .tcp()
        .expect("direct writes are chosen only on a TCP stream (invariant)");
    let map = b
        .mapping()
        .expect("direct writes are chosen only for a backend with a writable mapping (invariant)");
    let received = map
        .receive(
            sock,
            req.offset + n as u64,
            len - n,
            conn.shared.send_timeout,
        )
        .await
        .ok_or(End::Client)?;
    let pos = req.offset + (n + received) as u64;
    let left = len - n - received;
    if left > 0 {
        let r = match take_payload(rd, conn, pos, left, &mut true, stop, broken).await? {
            Taken::Held { buf, written, .. } => {
                let r = b.write_at(&buf, pos + written as u64);
                conn.shared.buffers.give(buf);
                r
            }
            Taken::Refused(errno) => Err(io::Error::from_raw_os_error(errno as i32)),
        };
        if result.is_ok() {
            result = r;
        }
    }
    Ok(result)
}

/// A WRITE payload as [`take_payload`] took it.
enum Taken {
    /// The payload's last `buf.len()` bytes, in a pooled buffer holding their budget; the `written` bytes
    /// before them are in the export already.
    Held {
        buf: Vec<u8>,
        bytes: Bytes,
        written: usize,
    },
    /// Writing what had arrived failed (with this errno), or the export began closing before it could:
    /// the rest of the payload was read and dropped, and the request is answered with the error.
    Refused(u32),
}

/// Reads the `len` payload bytes of a WRITE at `offset` into a pooled buffer, reserving budget for at
/// most [`PIECE`] bytes beyond what has arrived. When the budget has no room for the next piece, what
/// arrived is written to the export first (the request counts in the export's drain from then on:
/// `started`) and its budget released. The session's end when the client sends nothing for the send
/// timeout, the connection fails, or the session stops.
async fn take_payload<R: AsyncRead + Unpin>(
    rd: &mut BufReader<Take<R>>,
    conn: &Conn,
    offset: u64,
    len: usize,
    started: &mut bool,
    stop: &CancellationToken,
    broken: &CancellationToken,
) -> Result<Taken, End> {
    let export = &conn.params.export;
    let stall = conn.shared.send_timeout;
    // Room for the whole payload when it may run in place (no growing on the way), one piece otherwise.
    let mut buf = conn.shared.buffers.take(if len <= INLINE_MAX as usize {
        len
    } else {
        PIECE as usize
    });
    let mut bytes: Option<Bytes> = None;
    let mut written = 0usize;
    let small = len <= SMALL_MAX as usize;
    while written + buf.len() < len {
        let piece = (len - written - buf.len()).min(PIECE as usize) as u32;
        let more = match try_reserve(conn, piece, small) {
            Some(p) => p,
            None => {
                if !buf.is_empty() {
                    let refused = if !*started {
                        export.request_start();
                        *started = true;
                        export.is_closing().then_some(ESHUTDOWN)
                    } else {
                        None
                    };
                    let refused = match refused {
                        Some(errno) => Some(errno),
                        None => {
                            let n = buf.len();
                            let r;
                            (buf, r) = write_out(conn, buf, offset + written as u64).await;
                            bytes = None;
                            written += n;
                            r.err().map(|e| errno_of(&e))
                        }
                    };
                    if let Some(errno) = refused {
                        let left = len - written - buf.len();
                        conn.shared.buffers.give(buf);
                        return if drain_payload(rd, left, stall).await {
                            Ok(Taken::Refused(errno))
                        } else {
                            Err(End::Client)
                        };
                    }
                }
                match reserve(conn, piece, small, stop, broken).await {
                    Ok(p) => p,
                    Err(e) => {
                        conn.shared.buffers.give(buf);
                        return Err(e);
                    }
                }
            }
        };
        bytes = Some(match bytes {
            Some((mut c, mut g)) => {
                c.merge(more.0);
                g.merge(more.1);
                (c, g)
            }
            None => more,
        });
        if read_payload(rd, &mut buf, piece as usize, stall)
            .await
            .is_err()
        {
            conn.shared.buffers.give(buf);
            return Err(End::Client);
        }
    }
    Ok(Taken::Held {
        buf,
        bytes: bytes.expect("a WRITE payload has at least one byte (invariant)"),
        written,
    })
}

/// Writes what arrived of a payload to the export at `offset` (in place when that cannot wait for a
/// device, otherwise on the blocking pool) and returns the buffer emptied, with the result.
async fn write_out(conn: &Conn, mut buf: Vec<u8>, offset: u64) -> (Vec<u8>, io::Result<()>) {
    let export = &conn.params.export;
    export.counters.touch();
    conn.wrote.store(true, Ordering::Relaxed);
    let done = match export.backend.write_nowait(&buf, offset) {
        Ok(n) => n,
        Err(e) => {
            buf.clear();
            return (buf, Err(e));
        }
    };
    let r = if done == buf.len() {
        Ok(())
    } else {
        let permit = Arc::clone(&conn.shared.pool)
            .acquire_owned()
            .await
            .expect("the blocking pool semaphore is never closed (invariant)");
        let b = Arc::clone(&export.backend);
        let task = tokio::task::spawn_blocking(move || {
            let r = b.write_at(&buf[done..], offset + done as u64);
            drop(permit);
            (buf, r)
        });
        match task.await {
            Ok((back, r)) => {
                buf = back;
                r
            }
            Err(e) => {
                buf = Vec::new();
                Err(io::Error::other(e))
            }
        }
    };
    if r.is_ok() {
        let c = &export.counters;
        c.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        c.wrote(offset + buf.len() as u64);
    }
    buf.clear();
    (buf, r)
}

/// Reads and drops the `len` payload bytes of a refused WRITE through the read buffer, so the connection
/// stays in step without holding the payload. `false` when the client leaves, or sends nothing for
/// `stall`, in the middle of it: a refused request must not keep a session open past the timeouts an
/// accepted one has.
async fn drain_payload<R: AsyncRead + Unpin>(
    rd: &mut BufReader<Take<R>>,
    len: usize,
    stall: Duration,
) -> bool {
    let mut left = len;
    while left > 0 {
        let n = match tokio::time::timeout(stall, rd.fill_buf()).await {
            Ok(Ok(held)) if !held.is_empty() => held.len().min(left),
            _ => return false,
        };
        std::pin::Pin::new(&mut *rd).consume(n);
        left -= n;
    }
    true
}

/// Appends `len` bytes of payload to `buf`: what the read buffer already holds, then the rest straight
/// from the socket into `buf`, so a large payload is not copied through the read buffer. Fails with
/// `TimedOut` when nothing arrives for `stall`: a slow client that keeps sending is not cut off.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut BufReader<Take<R>>,
    buf: &mut Vec<u8>,
    len: usize,
    stall: Duration,
) -> io::Result<()> {
    let target = buf.len() + len;
    let held = rd.buffer();
    let n = held.len().min(len);
    buf.extend_from_slice(&held[..n]);
    std::pin::Pin::new(&mut *rd).consume(n);
    if buf.len() == target {
        return Ok(());
    }
    buf.reserve(target - buf.len());
    let inner = rd.get_mut();
    // One timer for the payload, moved on only when it fires after progress: no timer call per read.
    let mut progress = tokio::time::Instant::now();
    let timer = tokio::time::sleep_until(progress + stall);
    tokio::pin!(timer);
    while buf.len() < target {
        let want = target - buf.len();
        let mut limited = (&mut *inner).take(want as u64);
        tokio::select! {
            r = limited.read_buf(buf) => {
                if r? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                progress = tokio::time::Instant::now();
            }
            _ = &mut timer => {
                if progress.elapsed() >= stall {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                timer.as_mut().reset(progress + stall);
            }
        }
    }
    Ok(())
}

/// `ESHUTDOWN` for a request that changes or commits data once the server's write fence has closed.
fn fenced(shared: &Shared, req: &Request) -> Option<u32> {
    let writes = matches!(
        req.command,
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH
    );
    match &shared.write_fence {
        Some(f) if writes && !f.open() => Some(ESHUTDOWN),
        _ => None,
    }
}

/// The error a request is refused with before it runs, if any.
fn refusal(p: &SessionParams, req: &Request) -> Option<u32> {
    let export = &p.export;
    let len = req.length;
    let in_range = req
        .offset
        .checked_add(u64::from(len))
        .is_some_and(|e| e <= export.backend.size());
    if export.is_closing() {
        return Some(ESHUTDOWN);
    }
    if req.flags & !allowed_flags(p, req.command) != 0 {
        return Some(EINVAL);
    }
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
}

/// The command flags a request of `command` may carry in this session: FUA on any command (the server
/// advertises `NBD_FLAG_SEND_FUA`), DF on READ once structured replies are negotiated, NO_HOLE and (where
/// advertised) FAST_ZERO on WRITE_ZEROES, REQ_ONE on BLOCK_STATUS. The protocol asks a server to answer
/// `EINVAL` to any other flag, unknown or not applicable (NetworkBlockDevice/nbd `doc/proto.md`, "Error
/// values"), as nbdkit does; a flag the server ignored could change what the client believes happened.
fn allowed_flags(p: &SessionParams, command: u16) -> u16 {
    CMD_FLAG_FUA
        | match command {
            CMD_READ if p.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => {
                let b = &p.export.backend;
                CMD_FLAG_NO_HOLE
                    | if b.can_fast_zero() {
                        CMD_FLAG_FAST_ZERO
                    } else {
                        0
                    }
            }
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Runs a request in place when it cannot wait for a device, otherwise on the blocking pool.
async fn dispatch(
    conn: &Conn,
    req: Request,
    payload: Option<Vec<u8>>,
    hold: Hold,
    stop: &CancellationToken,
    broken: &CancellationToken,
) {
    let export = &conn.params.export;
    let b = &export.backend;
    let structured = conn.params.structured;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    // Checked again now that the payload has arrived: the fence may have closed meanwhile.
    if let Some(error) = fenced(&conn.shared, &req) {
        if let Some(p) = payload {
            conn.shared.buffers.give(p);
        }
        let _ = conn.tx.send(error_reply(req.cookie, false, error, hold));
        return;
    }
    let mut payload = payload;
    let mut done_prefix = 0usize;
    if req.length <= INLINE_MAX {
        match req.command {
            CMD_READ => {
                if conn.direct && req.length >= DIRECT_MIN && b.mapped_reads() {
                    count_read(export, req.length);
                    let data = Data::Mapped {
                        offset: req.offset,
                        len: req.length as usize,
                    };
                    let _ = conn
                        .tx
                        .send(read_reply(req.cookie, req.offset, data, structured, hold));
                    return;
                }
                let mut data = conn.shared.buffers.take(req.length as usize);
                match b.read_nowait(&mut data, req.offset, req.length as usize) {
                    Ok(true) => {
                        count_read(export, req.length);
                        let data = Data::Owned(data);
                        let _ = conn
                            .tx
                            .send(read_reply(req.cookie, req.offset, data, structured, hold));
                        return;
                    }
                    Ok(false) => conn.shared.buffers.give(data),
                    Err(e) => {
                        conn.shared.buffers.give(data);
                        let _ =
                            conn.tx
                                .send(error_reply(req.cookie, structured, errno_of(&e), hold));
                        return;
                    }
                }
            }
            CMD_WRITE => {
                let data = payload
                    .as_deref()
                    .expect("WRITE requests carry their payload (invariant)");
                let error = match b.write_nowait(data, req.offset) {
                    Ok(n) if n == data.len() && !fua => {
                        count_write(export, req.offset, req.length);
                        Some(0)
                    }
                    Ok(n) => {
                        done_prefix = n;
                        None
                    }
                    Err(e) => Some(errno_of(&e)),
                };
                if let Some(error) = error {
                    if let Some(p) = payload {
                        conn.shared.buffers.give(p);
                    }
                    let _ = conn.tx.send(error_reply(req.cookie, false, error, hold));
                    return;
                }
            }
            _ => {}
        }
    }
    let permit = tokio::select! {
        _ = stop.cancelled() => return,
        _ = broken.cancelled() => return,
        p = Arc::clone(&conn.shared.pool).acquire_owned() => p.expect("the blocking pool semaphore is never closed (invariant)"),
    };
    let export = Arc::clone(export);
    let tx = conn.tx.clone();
    let buffers = Arc::clone(&conn.shared.buffers);
    if let Some(p) = payload.as_mut() {
        if done_prefix > 0 {
            p.drain(..done_prefix);
        }
    }
    let skip = done_prefix as u64;
    tokio::task::spawn_blocking(move || {
        let reply = execute(&export, &buffers, req, payload, skip, structured, hold);
        drop(permit);
        let _ = tx.send(reply);
    });
}

fn count_read(export: &Export, len: u32) {
    let c = &export.counters;
    c.reads.fetch_add(1, Ordering::Relaxed);
    c.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
}

fn count_write(export: &Export, offset: u64, len: u32) {
    let c = &export.counters;
    c.writes.fetch_add(1, Ordering::Relaxed);
    c.bytes_written.fetch_add(u64::from(len), Ordering::Relaxed);
    c.wrote(offset + u64::from(len));
}

fn error_reply(cookie: u64, structured_err: bool, error: u32, hold: Hold) -> Reply {
    if structured_err && error != 0 {
        let msg = error_name(error).as_bytes();
        let len = 6 + msg.len() as u32;
        let mut head = Vec::with_capacity(26 + msg.len());
        head.extend_from_slice(&structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            len,
        ));
        head.extend_from_slice(&error.to_be_bytes());
        head.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        head.extend_from_slice(msg);
        Reply {
            head,
            data: Data::None,
            hold,
        }
    } else {
        Reply {
            head: simple_reply(error, cookie).to_vec(),
            data: Data::None,
            hold,
        }
    }
}

fn read_reply(cookie: u64, offset: u64, data: Data, structured: bool, hold: Hold) -> Reply {
    let head = if structured {
        let len = u32::try_from(8 + data.len()).expect("reads are at most BLOCK_MAX (invariant)");
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            len,
        ));
        h.extend_from_slice(&offset.to_be_bytes());
        h
    } else {
        simple_reply(0, cookie).to_vec()
    };
    Reply { head, data, hold }
}

fn block_status_reply(cookie: u64, extents: &[Extent], hold: Hold) -> Reply {
    let len = u32::try_from(4 + 8 * extents.len()).expect("extent count is bounded (invariant)");
    let mut head = Vec::with_capacity(20 + len as usize);
    head.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
    head.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
    for e in extents {
        head.extend_from_slice(&u32::try_from(e.length).unwrap_or(u32::MAX).to_be_bytes());
        head.extend_from_slice(&e.flags.to_be_bytes());
    }
    Reply {
        head,
        data: Data::None,
        hold,
    }
}

/// Runs one request with blocking calls (on the pool). `skip` bytes of a WRITE were already written.
fn execute(
    export: &Export,
    buffers: &BufPool,
    req: Request,
    payload: Option<Vec<u8>>,
    skip: u64,
    structured: bool,
    hold: Hold,
) -> Reply {
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
    let status = |r: io::Result<()>, structured_err: bool, hold: Hold| match r {
        Ok(()) => error_reply(cookie, false, 0, hold),
        Err(e) => error_reply(cookie, structured_err, errno_of(&e), hold),
    };
    match req.command {
        CMD_READ => {
            let mut data = buffers.take(req.length as usize);
            match b.read_at(&mut data, off, req.length as usize) {
                Ok(()) => {
                    count_read(export, req.length);
                    read_reply(cookie, off, Data::Owned(data), structured, hold)
                }
                Err(e) => {
                    buffers.give(data);
                    error_reply(cookie, structured, errno_of(&e), hold)
                }
            }
        }
        CMD_WRITE => {
            let data = payload.expect("WRITE requests carry their payload (invariant)");
            let r = then_fua(b.write_at(&data, off + skip));
            buffers.give(data);
            if r.is_ok() {
                count_write(export, off, req.length);
            }
            status(r, false, hold)
        }
        CMD_FLUSH => {
            let r = b.flush();
            if r.is_ok() {
                c.flushes.fetch_add(1, Relaxed);
            }
            status(r, false, hold)
        }
        CMD_TRIM => {
            let r = then_fua(b.trim(off, len));
            if r.is_ok() {
                c.trims.fetch_add(1, Relaxed);
                c.wrote(off + len);
            }
            status(r, false, hold)
        }
        CMD_WRITE_ZEROES => {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            let r = then_fua(b.zero(off, len, may_trim, fast));
            if r.is_ok() {
                c.zeroes.fetch_add(1, Relaxed);
                c.wrote(off + len);
            }
            status(r, false, hold)
        }
        CMD_CACHE => status(b.cache(off, len), false, hold),
        CMD_BLOCK_STATUS => {
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            match b.block_status(off, len, max) {
                Ok(mut extents) if !extents.is_empty() => {
                    c.block_status.fetch_add(1, Relaxed);
                    extents.truncate(max);
                    block_status_reply(cookie, &extents, hold)
                }
                Ok(_) => error_reply(cookie, true, EIO, hold),
                Err(e) => error_reply(cookie, true, errno_of(&e), hold),
            }
        }
        _ => error_reply(cookie, false, EINVAL, hold),
    }
}

/// Writes replies as they complete, gathering all that are ready into one vectored write. Each reply's
/// hold (queue slot, budget) is released once its bytes are handed to the socket. Ends when every sender
/// is gone; fails when the client does not take a batch, or the end of the stream (TLS close_notify), within
/// `send_timeout`.
async fn write_replies<W: AsyncWrite + Half + Unpin>(
    mut wr: W,
    mut rx: UnboundedReceiver<Reply>,
    send_timeout: Duration,
    buffers: &BufPool,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(BATCH);
    let mut segments: Vec<(usize, usize)> = Vec::with_capacity(BATCH * 2);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let sent = match wr.tcp() {
            Some(sock) => {
                // By address: mapped READ data can only be named that way (see `mapping.rs`).
                segments.clear();
                for r in &batch {
                    segments.push((r.head.as_ptr() as usize, r.head.len()));
                    match &r.data {
                        Data::None => {}
                        Data::Owned(v) => segments.push((v.as_ptr() as usize, v.len())),
                        Data::Mapped { offset, len } => {
                            let map = r.hold.export.backend.mapping();
                            let addr =
                                map.and_then(|m| m.addr(*offset, *len)).ok_or_else(|| {
                                    io::Error::other("a mapped READ reply outlived its mapping")
                                })?;
                            segments.push((addr, *len));
                        }
                    }
                }
                mapping::send_segments(sock, &mut segments, send_timeout).await
            }
            None => {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
                for r in &batch {
                    slices.push(IoSlice::new(&r.head));
                    match &r.data {
                        Data::None => {}
                        Data::Owned(v) => slices.push(IoSlice::new(v)),
                        Data::Mapped { .. } => {
                            return Err(io::Error::other(
                                "mapped READ data on a stream that is not plain TCP",
                            ))
                        }
                    }
                }
                match tokio::time::timeout(send_timeout, write_all_vectored(&mut wr, &mut slices))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(io::ErrorKind::TimedOut.into()),
                }
            }
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                tracing::info!(
                    "client took no reply data for the send timeout; closing the session"
                );
                return Err(e);
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                tracing::warn!("a READ reply could not be read from the export's file (did the file shrink under the server?); closing the session");
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        for r in batch.drain(..) {
            match r.data {
                Data::Owned(v) => buffers.give(v),
                Data::Mapped { len, .. } => {
                    if let Some(m) = r.hold.export.backend.mapping() {
                        m.moved(len);
                    }
                }
                Data::None => {}
            }
        }
    }
    // Closing a TLS stream sends an alert (close_notify), a write like any reply: a client that takes
    // nothing more must not hold the session past the send timeout here either.
    let close = async {
        wr.flush().await?;
        let _ = wr.shutdown().await;
        Ok(())
    };
    match tokio::time::timeout(send_timeout, close).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!(
                "client took no data for the send timeout while the session was closing; closing it"
            );
            Err(io::ErrorKind::TimedOut.into())
        }
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush().await
}
