//! The NBD server: accepts connections, runs the fixed-newstyle negotiation (NetworkBlockDevice/nbd
//! `doc/proto.md`, "Newstyle negotiation") and the transmission phase with pipelined, out-of-order replies.
//! Blocking backend calls run on the runtime's blocking pool; replies go through one buffered writer task.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Extent;
use crate::error::NbdError;
use crate::proto::*;
use crate::registry::{AttachRefusal, Export, Registry, SessionGuard};

/// Limits and timeouts of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest time from accept to the end of negotiation.
    pub handshake_timeout: Duration,
    /// Connections open at once, over all exports (including those still negotiating).
    pub max_connections: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Payload bytes in flight per connection (requests wait beyond it).
    pub max_in_flight_bytes: usize,
    /// On shutdown, how long in-flight requests may take before sessions are closed anyway.
    pub shutdown_drain: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_in_flight: 64,
            max_in_flight_bytes: 128 << 20,
            shutdown_drain: Duration::from_secs(10),
        }
    }
}

/// Serves the exports of a [`Registry`] on a listener.
#[derive(Debug)]
pub struct Server {
    registry: Registry,
    cfg: Arc<ServerConfig>,
}

const SOCKET_BUFFER: usize = 256 * 1024;

impl Server {
    pub fn new(registry: Registry, cfg: ServerConfig) -> Self {
        Server {
            registry,
            cfg: Arc::new(cfg),
        }
    }

    /// Accepts connections until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (up to `shutdown_drain`), flushes and closes every session.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NbdError> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let open = Arc::new(AtomicUsize::new(0));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_connections {
                open.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%peer, limit = self.cfg.max_connections, "connection refused: server connection limit reached");
                drop(stream);
                continue;
            }
            let registry = self.registry.clone();
            let cfg = Arc::clone(&self.cfg);
            let stop = stop.clone();
            let open = Arc::clone(&open);
            tracker.spawn(async move {
                if let Err(e) = handle_connection(stream, peer, registry, cfg, stop).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                open.fetch_sub(1, Ordering::AcqRel);
            });
        }
        drop(listener);
        stop.cancel();
        tracker.close();
        let limit = self.cfg.shutdown_drain + Duration::from_secs(5);
        if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
            tracing::warn!("sessions still open after the shutdown deadline");
        }
        Ok(())
    }
}

/// The state chosen during negotiation.
struct Negotiated {
    export: Arc<Export>,
    guard: SessionGuard,
    kill: CancellationToken,
    structured: bool,
    meta_allocation: bool,
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    registry: Registry,
    cfg: Arc<ServerConfig>,
    stop: CancellationToken,
) -> Result<(), NbdError> {
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(SOCKET_BUFFER, rd);
    let mut wr = BufWriter::with_capacity(SOCKET_BUFFER, wr);
    let negotiated = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = tokio::time::timeout(cfg.handshake_timeout, negotiate(&mut rd, &mut wr, &registry, peer)) => match r {
            Err(_) => {
                tracing::info!(%peer, "handshake timed out");
                return Err(NbdError::Timeout("waiting for the client to finish negotiation"));
            }
            Ok(r) => r?,
        },
    };
    let Some(n) = negotiated else {
        return Ok(());
    };
    tracing::debug!(%peer, export = %n.export.name, generation = n.export.generation, "session started");
    transmission(rd, wr, n, &cfg, &stop).await
}

struct Opt {
    code: u32,
    data: Vec<u8>,
    too_big: bool,
}

async fn read_option<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Option<Opt>, NbdError> {
    let magic = rd.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!("option magic {magic:#x}")));
    }
    let code = rd.read_u32().await?;
    let len = rd.read_u32().await?;
    if len > MAX_OPTION_LEN {
        tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
        return Ok(Some(Opt {
            code,
            data: Vec::new(),
            too_big: true,
        }));
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data).await?;
    Ok(Some(Opt {
        code,
        data,
        too_big: false,
    }))
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len = u32::try_from(data.len()).expect("option replies are small");
    wr.write_all(&option_reply_header(option, reply, len)).await?;
    wr.write_all(data).await?;
    Ok(())
}

/// A cursor over an option payload.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_first_chunk::<2>()?;
        self.0 = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.bytes(n)?.to_vec()).ok()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses `name, n, n x u16` (GO/INFO).
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut infos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.done().then_some((name, infos))
}

/// Parses `name, n, n x string` (LIST/SET_META_CONTEXT).
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cur(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut q = Vec::new();
    for _ in 0..n {
        q.push(c.string()?);
    }
    c.done().then_some((name, q))
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let b = &export.backend;
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if export.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_WRITE_ZEROES;
        if b.can_trim() {
            f |= TFLAG_SEND_TRIM;
        }
        if b.can_fast_zero() {
            f |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if b.can_multi_conn() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    if b.is_rotational() {
        f |= TFLAG_ROTATIONAL;
    }
    f
}

async fn send_info_replies<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    export: &Export,
    requested: &[u16],
    structured: bool,
) -> Result<(), NbdError> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.backend.size().to_be_bytes());
    d.extend_from_slice(&transmission_flags(export, structured).to_be_bytes());
    opt_reply(wr, option, REP_INFO, &d).await?;
    if requested.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        opt_reply(wr, option, REP_INFO, &d).await?;
    }
    if let Some(desc) = export
        .description
        .as_ref()
        .filter(|_| requested.contains(&INFO_DESCRIPTION))
    {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(&desc.as_bytes()[..desc.len().min(4096)]);
        opt_reply(wr, option, REP_INFO, &d).await?;
    }
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&BLOCK_MIN.to_be_bytes());
    d.extend_from_slice(&BLOCK_PREFERRED.to_be_bytes());
    d.extend_from_slice(&BLOCK_MAX.to_be_bytes());
    opt_reply(wr, option, REP_INFO, &d).await
}

/// Runs the negotiation phase. `None` when the client aborted or asked for an export it cannot have.
async fn negotiate(
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut BufWriter<OwnedWriteHalf>,
    registry: &Registry,
    peer: SocketAddr,
) -> Result<Option<Negotiated>, NbdError> {
    wr.write_u64(NBDMAGIC).await?;
    wr.write_u64(IHAVEOPT).await?;
    wr.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta_allocation = false;
    loop {
        wr.flush().await?;
        let Some(opt) = read_option(rd).await? else {
            return Ok(None);
        };
        let code = opt.code;
        if opt.too_big {
            if code == OPT_EXPORT_NAME {
                return Ok(None);
            }
            opt_reply(wr, code, REP_ERR_TOO_BIG, b"option payload too large").await?;
            continue;
        }
        match code {
            OPT_EXPORT_NAME => {
                let Ok(name) = String::from_utf8(opt.data) else {
                    return Ok(None);
                };
                let Some(export) = registry.lookup(&name) else {
                    tracing::info!(%peer, export = %name, "unknown export requested; closing");
                    return Ok(None);
                };
                let kill = CancellationToken::new();
                let Ok(guard) = export.attach(peer, kill.clone()) else {
                    return Ok(None);
                };
                wr.write_u64(export.backend.size()).await?;
                wr.write_u16(transmission_flags(&export, structured)).await?;
                if !no_zeroes {
                    wr.write_all(&[0u8; 124]).await?;
                }
                wr.flush().await?;
                return Ok(Some(Negotiated {
                    export,
                    guard,
                    kill,
                    structured,
                    meta_allocation,
                }));
            }
            OPT_ABORT => {
                let _ = opt_reply(wr, code, REP_ACK, &[]).await;
                let _ = wr.flush().await;
                return Ok(None);
            }
            OPT_LIST => {
                if !opt.data.is_empty() {
                    opt_reply(wr, code, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for e in registry.all() {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    opt_reply(wr, code, REP_SERVER, &d).await?;
                }
                opt_reply(wr, code, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info_request(&opt.data) else {
                    opt_reply(wr, code, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let Some(export) = registry.lookup(&name) else {
                    let msg = format!("no export named {name:?}");
                    opt_reply(wr, code, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                if export.is_closing() {
                    opt_reply(wr, code, REP_ERR_SHUTDOWN, b"export is being removed").await?;
                    continue;
                }
                if code == OPT_INFO {
                    send_info_replies(wr, code, &export, &infos, structured).await?;
                    opt_reply(wr, code, REP_ACK, &[]).await?;
                    continue;
                }
                let kill = CancellationToken::new();
                let guard = match export.attach(peer, kill.clone()) {
                    Ok(g) => g,
                    Err(AttachRefusal::Limit) => {
                        opt_reply(
                            wr,
                            code,
                            REP_ERR_POLICY,
                            b"export connection limit reached; retry later",
                        )
                        .await?;
                        continue;
                    }
                    Err(AttachRefusal::Closing) => {
                        opt_reply(wr, code, REP_ERR_SHUTDOWN, b"export is being removed").await?;
                        continue;
                    }
                };
                send_info_replies(wr, code, &export, &infos, structured).await?;
                opt_reply(wr, code, REP_ACK, &[]).await?;
                wr.flush().await?;
                return Ok(Some(Negotiated {
                    export,
                    guard,
                    kill,
                    structured,
                    meta_allocation,
                }));
            }
            OPT_STRUCTURED_REPLY => {
                if !opt.data.is_empty() {
                    opt_reply(wr, code, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
                        .await?;
                } else {
                    structured = true;
                    opt_reply(wr, code, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    opt_reply(wr, code, REP_ERR_INVALID, b"negotiate structured replies first")
                        .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&opt.data) else {
                    opt_reply(wr, code, REP_ERR_INVALID, b"malformed meta context request")
                        .await?;
                    continue;
                };
                if registry.lookup(&name).is_none() {
                    let msg = format!("no export named {name:?}");
                    opt_reply(wr, code, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let matches = if code == OPT_LIST_META_CONTEXT {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
                } else {
                    queries.iter().any(|q| q == META_BASE_ALLOCATION)
                };
                if code == OPT_SET_META_CONTEXT {
                    meta_allocation = matches;
                }
                if matches {
                    let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    opt_reply(wr, code, REP_META_CONTEXT, &d).await?;
                }
                opt_reply(wr, code, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                opt_reply(wr, code, REP_ERR_UNSUP, b"TLS is not offered by this server").await?;
            }
            _ => {
                let msg = format!("option {code} is not supported");
                opt_reply(wr, code, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

/// A reply queued for the writer task; the permits are released once it is written.
struct Reply {
    body: ReplyBody,
    _permits: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
}

enum ReplyBody {
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

async fn write_reply<W: AsyncWrite + Unpin>(wr: &mut W, r: &ReplyBody) -> std::io::Result<()> {
    match r {
        ReplyBody::Simple { cookie, error } => wr.write_all(&simple_reply(*error, *cookie)).await,
        ReplyBody::StructuredError { cookie, error } => {
            let msg = error_name(*error).as_bytes();
            let len = 6 + msg.len() as u32;
            wr.write_all(&structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, *cookie, len))
                .await?;
            wr.write_all(&error.to_be_bytes()).await?;
            wr.write_all(&(msg.len() as u16).to_be_bytes()).await?;
            wr.write_all(msg).await
        }
        ReplyBody::Read {
            cookie,
            offset,
            data,
            structured,
        } => {
            if *structured {
                let len = u32::try_from(8 + data.len()).expect("reads are at most BLOCK_MAX");
                wr.write_all(&structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    *cookie,
                    len,
                ))
                .await?;
                wr.write_all(&offset.to_be_bytes()).await?;
            } else {
                wr.write_all(&simple_reply(0, *cookie)).await?;
            }
            wr.write_all(data).await
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
            wr.write_all(&b).await
        }
    }
}

async fn writer_task(mut wr: BufWriter<OwnedWriteHalf>, mut rx: mpsc::Receiver<Reply>) {
    while let Some(r) = rx.recv().await {
        if write_reply(&mut wr, &r.body).await.is_err() {
            return;
        }
        drop(r);
        while let Ok(r) = rx.try_recv() {
            if write_reply(&mut wr, &r.body).await.is_err() {
                return;
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// How the request loop ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Client disconnected (DISC or EOF): finish in-flight requests, then close.
    Client,
    /// Server shutdown: finish in-flight requests up to the deadline, flush, close.
    Shutdown,
    /// Export removed: the registry already drained and flushed; close now.
    Killed,
    /// The client broke the protocol or the socket failed: close now.
    Broken,
}

fn io_reply(cookie: u64, structured_err: bool, r: std::io::Result<()>) -> ReplyBody {
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

async fn drain<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> std::io::Result<()> {
    let n = tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if n < u64::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn transmission(
    mut rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    n: Negotiated,
    cfg: &ServerConfig,
    stop: &CancellationToken,
) -> Result<(), NbdError> {
    let Negotiated {
        export,
        guard,
        kill,
        structured,
        meta_allocation,
    } = n;
    let (tx, rx) = mpsc::channel::<Reply>(cfg.max_in_flight.max(1) * 2);
    let mut writer = tokio::spawn(writer_task(wr, rx));
    let count = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let byte_unit: usize = 4096;
    let byte_units = (cfg.max_in_flight_bytes / byte_unit).max((BLOCK_MAX as usize) / byte_unit);
    let bytes = Arc::new(Semaphore::new(byte_units));
    let size = export.backend.size();
    let mut wrote = false;

    let end = loop {
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = kill.cancelled() => break End::Killed,
            _ = stop.cancelled() => break End::Shutdown,
            r = rd.read_exact(&mut hdr) => r,
        };
        if read.is_err() {
            break End::Client;
        }
        let Some(req) = Request::decode(&hdr) else {
            tracing::info!(export = %export.name, "bad request magic; closing the connection");
            break End::Broken;
        };
        let cookie = req.cookie;
        let len = req.length;
        let end_off = req.offset.checked_add(u64::from(len));
        let in_range = end_off.is_some_and(|e| e <= size);
        let has_payload = req.command == CMD_WRITE;
        // Requests refused without touching the backend.
        let refuse = if req.command == CMD_DISC {
            break End::Client;
        } else if export.is_closing() {
            Some(ESHUTDOWN)
        } else {
            match req.command {
                CMD_READ | CMD_WRITE if len == 0 => Some(EINVAL),
                CMD_READ | CMD_WRITE if len > BLOCK_MAX => Some(EINVAL),
                CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if export.read_only => Some(EPERM),
                CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Some(ENOSPC),
                CMD_READ | CMD_TRIM | CMD_CACHE | CMD_BLOCK_STATUS if !in_range => Some(EINVAL),
                CMD_BLOCK_STATUS if !(structured && meta_allocation) || len == 0 => Some(EINVAL),
                CMD_WRITE_ZEROES | CMD_TRIM if len == 0 => Some(EINVAL),
                CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES
                | CMD_BLOCK_STATUS => None,
                _ => Some(EINVAL),
            }
        };
        if let Some(error) = refuse {
            if has_payload && drain(&mut rd, len).await.is_err() {
                break End::Client;
            }
            let body = if structured && matches!(req.command, CMD_READ | CMD_BLOCK_STATUS) {
                ReplyBody::StructuredError { cookie, error }
            } else {
                ReplyBody::Simple { cookie, error }
            };
            if tx
                .send(Reply {
                    body,
                    _permits: None,
                })
                .await
                .is_err()
            {
                break End::Broken;
            }
            continue;
        }
        // Admission: bounded requests and payload bytes in flight on this connection.
        let data_len = if matches!(req.command, CMD_READ | CMD_WRITE) {
            len as usize
        } else {
            0
        };
        let units = u32::try_from(data_len.div_ceil(byte_unit)).expect("bounded by BLOCK_MAX");
        let permits = tokio::select! {
            biased;
            _ = kill.cancelled() => break End::Killed,
            p = async {
                let c = Arc::clone(&count).acquire_owned().await;
                let b = if units > 0 { Some(Arc::clone(&bytes).acquire_many_owned(units).await) } else { None };
                (c, b)
            } => p,
        };
        let permits = match permits {
            (Ok(c), None) => (c, None),
            (Ok(c), Some(Ok(b))) => (c, Some(b)),
            _ => break End::Broken,
        };
        let payload = if has_payload {
            let mut buf = Vec::with_capacity(data_len);
            let mut ok = true;
            while buf.len() < data_len {
                let want = (data_len - buf.len()) as u64;
                match (&mut rd).take(want).read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        ok = false;
                        break;
                    }
                    Ok(_) => {}
                }
            }
            if !ok {
                break End::Client;
            }
            Some(buf)
        } else {
            None
        };
        if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
            wrote = true;
        }
        export.request_start();
        export.counters.touch();
        let ex = Arc::clone(&export);
        let tx2 = tx.clone();
        tokio::task::spawn_blocking(move || {
            let body = execute(&ex, req, payload, structured);
            let _ = tx2.blocking_send(Reply {
                body,
                _permits: Some(permits),
            });
            ex.request_done();
        });
    };
    drop(tx);
    match end {
        End::Client | End::Shutdown => {
            let drained = tokio::time::timeout(cfg.shutdown_drain, &mut writer).await;
            if drained.is_err() {
                writer.abort();
            }
            if end == End::Shutdown && wrote && !export.read_only {
                let b = Arc::clone(&export.backend);
                let _ = tokio::task::spawn_blocking(move || b.flush()).await;
            }
        }
        End::Killed | End::Broken => writer.abort(),
    }
    drop(guard);
    Ok(())
}

/// Runs one admitted request against the backend (blocking).
fn execute(export: &Export, req: Request, payload: Option<Vec<u8>>, structured: bool) -> ReplyBody {
    use std::sync::atomic::Ordering::Relaxed;
    let b = &export.backend;
    let c = &export.counters;
    let cookie = req.cookie;
    let off = req.offset;
    let len = u64::from(req.length);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let then_fua = |r: std::io::Result<()>| -> std::io::Result<()> {
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
