//! The NBD server: accepts connections, runs the fixed-newstyle negotiation (NetworkBlockDevice/nbd
//! `doc/proto.md`, "Newstyle negotiation") on the async runtime, then hands each session to its worker
//! threads (see `session`) and supervises it: export removal, server shutdown, connection limits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::NbdError;
use crate::proto::*;
use crate::registry::{AttachRefusal, Export, Registry, SessionGuard};
use crate::session::{worker, Conn, SessionParams};

/// Limits and timeouts of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest time from accept to the end of negotiation.
    pub handshake_timeout: Duration,
    /// Connections open at once, over all exports (including those still negotiating).
    pub max_connections: usize,
    /// Requests executed at once per connection, each by its own worker thread (so also the number of
    /// payload buffers, of at most 32 MiB each, a connection can hold). Further pipelined requests wait
    /// in the socket.
    pub max_in_flight: usize,
    /// On shutdown, how long in-flight requests may take before sessions are closed anyway.
    pub shutdown_drain: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_in_flight: 8,
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

/// Hands the socket to the session's worker threads and supervises them: export removal closes the
/// socket at once; server shutdown stops reading, lets in-flight requests finish (bounded), then flushes.
async fn transmission(
    rd: BufReader<OwnedReadHalf>,
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
    // Requests the client pipelined right after GO may already sit in the negotiation buffer.
    let leftover = rd.buffer().to_vec();
    let stream = rd
        .into_inner()
        .reunite(wr.into_inner())
        .map_err(|_| NbdError::Protocol("socket halves do not belong together".into()))?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let read_only = export.read_only;
    let conn = Conn::new(
        stream,
        leftover,
        SessionParams {
            export,
            structured,
            meta_allocation,
        },
    )?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    for _ in 0..cfg.max_in_flight.max(1) {
        let c = Arc::clone(&conn);
        let tx = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-io".into())
            .spawn(move || {
                worker(c);
                drop(tx);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a session worker thread");
            conn.kill();
            break;
        }
    }
    drop(done_tx);
    enum Why {
        Ended,
        Killed,
        Stopped,
    }
    let why = tokio::select! {
        _ = done_rx.recv() => Why::Ended,
        _ = kill.cancelled() => Why::Killed,
        _ = stop.cancelled() => Why::Stopped,
    };
    match why {
        Why::Ended => {}
        Why::Killed => {
            conn.kill();
            let _ = done_rx.recv().await;
        }
        Why::Stopped => {
            conn.stop_reading();
            if tokio::time::timeout(cfg.shutdown_drain, done_rx.recv())
                .await
                .is_err()
            {
                conn.kill();
                let _ = done_rx.recv().await;
            }
            if conn.wrote.load(Ordering::Relaxed) && !read_only {
                let b = Arc::clone(&conn.export().backend);
                let _ = tokio::task::spawn_blocking(move || b.flush()).await;
            }
        }
    }
    conn.kill();
    drop(guard);
    Ok(())
}

struct Opt {
    code: u32,
    data: Vec<u8>,
    too_big: bool,
}

async fn read_option<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Opt, NbdError> {
    let magic = rd.read_u64().await?;
    if magic != IHAVEOPT {
        return Err(NbdError::Protocol(format!("option magic {magic:#x}")));
    }
    let code = rd.read_u32().await?;
    let len = rd.read_u32().await?;
    if len > MAX_OPTION_LEN {
        tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
        return Ok(Opt {
            code,
            data: Vec::new(),
            too_big: true,
        });
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data).await?;
    Ok(Opt {
        code,
        data,
        too_big: false,
    })
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len = u32::try_from(data.len()).expect("option replies are small");
    wr.write_all(&option_reply_header(option, reply, len))
        .await?;
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
        let opt = read_option(rd).await?;
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
                wr.write_u16(transmission_flags(&export, structured))
                    .await?;
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
                    opt_reply(wr, code, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
                } else {
                    structured = true;
                    opt_reply(wr, code, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    opt_reply(
                        wr,
                        code,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&opt.data) else {
                    opt_reply(wr, code, REP_ERR_INVALID, b"malformed meta context request").await?;
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
                opt_reply(
                    wr,
                    code,
                    REP_ERR_UNSUP,
                    b"TLS is not offered by this server",
                )
                .await?;
            }
            _ => {
                let msg = format!("option {code} is not supported");
                opt_reply(wr, code, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}
