//! The NBD server: accepts connections, enforces the server-wide and per-client connection limits, runs
//! the negotiation (see `negotiate`) with STARTTLS under the configured TLS policy, then runs each session
//! as one task (see `session`) and supervises it: export removal, server shutdown, idle timeout.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bufpool::{BufPool, DEFAULT_POOL_BYTES};
use crate::error::NbdError;
use crate::negotiate::{self, Context, Negotiated, Outcome};
use crate::proto::BLOCK_MAX;
use crate::registry::Registry;
use crate::session::{self, SessionParams, Shared, SMALL_RESERVE};
use crate::tls::{ClientIdentity, Tls};

/// Connections the kernel queues on the listener before the server accepts them, as nbdkit asks for; the
/// kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4). With tokio's default of 1024,
/// or a caller's 128, a burst of connects overflows the queue and the dropped SYNs are retried after a
/// second.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Limits, timeouts and TLS policy of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Longest time from accept to the end of negotiation (TLS handshake included).
    pub handshake_timeout: Duration,
    /// Connections open at once, over all exports (including those still negotiating). When they are all
    /// open, a new connection takes the place of the oldest one still negotiating (which is closed), so that
    /// connections that never finish negotiating cannot keep clients out; it is refused only when every
    /// connection has a session.
    pub max_connections: usize,
    /// Connections open at once from one client IP address.
    pub max_connections_per_client: usize,
    /// Requests of one connection read and not yet answered. Further pipelined requests wait in the socket.
    pub max_in_flight: usize,
    /// Bytes of request payload (WRITE data being executed, READ data not yet sent) the whole server may
    /// hold. When it is spent, sessions stop reading requests until replies drain. At least 32 MiB.
    pub in_flight_budget: usize,
    /// Bytes of request payload one connection may hold (at least 32 MiB, the largest request).
    pub max_connection_bytes: usize,
    /// Closes a negotiated session when no request arrives for this long while none is in flight.
    pub idle_timeout: Option<Duration>,
    /// Closes a session whose client does not take reply data (or send a WRITE payload) for this long.
    pub send_timeout: Duration,
    /// Blocking I/O calls (flush, zero, trim, large or uncached reads and writes) running at once over
    /// the whole server.
    pub io_threads: usize,
    /// On shutdown, how long in-flight requests may take before sessions are closed anyway.
    pub shutdown_drain: Duration,
    /// TLS policy (nbdkit's `--tls=off|on|require`).
    pub tls: Tls,
    /// Past its deadline, WRITE, WRITE_ZEROES, TRIM and FLUSH get `ESHUTDOWN` (reads go on); `None`: writes
    /// are always run.
    pub write_fence: Option<Arc<crate::WriteFence>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_connections_per_client: 64,
            max_in_flight: 64,
            in_flight_budget: 256 * 1024 * 1024,
            max_connection_bytes: 64 * 1024 * 1024,
            idle_timeout: None,
            send_timeout: Duration::from_secs(60),
            io_threads: 16,
            shutdown_drain: Duration::from_secs(10),
            tls: Tls::Off,
            write_fence: None,
        }
    }
}

impl ServerConfig {
    /// Whether [`Server::try_new`] accepts these limits: `Invalid`, naming the one at fault, when not.
    pub fn validate(&self) -> Result<(), NbdError> {
        let min = BLOCK_MAX as usize;
        if self.in_flight_budget < min || self.max_connection_bytes < min {
            return Err(NbdError::Invalid(format!(
                "in_flight_budget and max_connection_bytes must be at least {min} bytes (one largest request)"
            )));
        }
        if self.in_flight_budget > Semaphore::MAX_PERMITS {
            return Err(NbdError::Invalid("in_flight_budget is too large".into()));
        }
        for (what, v) in [
            ("max_connections", self.max_connections),
            (
                "max_connections_per_client",
                self.max_connections_per_client,
            ),
            ("max_in_flight", self.max_in_flight),
            ("io_threads", self.io_threads),
        ] {
            if v == 0 {
                return Err(NbdError::Invalid(format!("{what} must be at least 1")));
            }
        }
        Ok(())
    }
}

/// Connections open per client address; a slot is released when its guard drops.
#[derive(Debug, Default)]
struct PerClient {
    open: Mutex<HashMap<IpAddr, usize>>,
}

struct ClientSlot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut m = self.open.lock().expect("per-client lock poisoned");
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.owner.open.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// Connections still negotiating (no session yet), oldest first: the ones a new connection may take the
/// place of when the server is full.
#[derive(Debug, Default)]
struct Negotiating {
    table: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

/// A connection's place in [`Negotiating`]; it leaves the table when its session starts or it ends.
struct Pending {
    owner: Arc<Negotiating>,
    seq: u64,
}

impl Negotiating {
    fn enter(self: &Arc<Self>, cancel: CancellationToken) -> Pending {
        let mut t = self.table.lock().expect("negotiating lock poisoned");
        t.0 += 1;
        let seq = t.0;
        t.1.insert(seq, cancel);
        Pending {
            owner: Arc::clone(self),
            seq,
        }
    }

    /// Closes the oldest connection still negotiating; `false` when there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self
            .table
            .lock()
            .expect("negotiating lock poisoned")
            .1
            .pop_first();
        match oldest {
            Some((_, cancel)) => {
                tracing::info!("connection limit reached: the oldest connection still negotiating is closed to make room");
                cancel.cancel();
                true
            }
            None => false,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut t) = self.owner.table.lock() {
            t.1.remove(&self.seq);
        }
    }
}

/// The connection table's counts, shared by [`Server::serve`] and its [`ConnectionProbe`]s.
#[derive(Debug, Default)]
struct Table {
    open: AtomicUsize,
    /// Connections refused because every open connection had a session.
    refused_full: AtomicU64,
    /// When the last of those was refused (milliseconds since the Unix epoch; 0: never).
    last_refused_full_ms: AtomicU64,
}

/// Reads how full the server's connection table is (for health reports and metrics).
#[derive(Debug, Clone)]
pub struct ConnectionProbe {
    table: Arc<Table>,
    max: usize,
}

impl ConnectionProbe {
    /// Connections open right now (negotiating or with a session).
    pub fn open(&self) -> usize {
        self.table.open.load(Ordering::Relaxed)
    }

    /// The table's size (`ServerConfig::max_connections`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections refused so far because every open connection had a session.
    pub fn refused_full(&self) -> u64 {
        self.table.refused_full.load(Ordering::Relaxed)
    }

    /// When the last of [`Self::refused_full`] was refused.
    pub fn last_refused_full(&self) -> Option<SystemTime> {
        match self.table.last_refused_full_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }
}

/// Serves the exports of a [`Registry`] on a listener.
#[derive(Debug)]
pub struct Server {
    registry: Registry,
    cfg: Arc<ServerConfig>,
    shared: Arc<Shared>,
    table: Arc<Table>,
}

impl Server {
    /// A server for `registry`. Fails when the configuration is inconsistent (budgets below one request).
    pub fn new(registry: Registry, cfg: ServerConfig) -> Self {
        Self::try_new(registry, cfg)
            .expect("ServerConfig is valid; use Server::try_new to check it")
    }

    /// A server for `registry`; `Invalid` when the configuration is inconsistent.
    pub fn try_new(registry: Registry, cfg: ServerConfig) -> Result<Self, NbdError> {
        cfg.validate()?;
        let shared = Arc::new(Shared {
            budget: Arc::new(Semaphore::new(cfg.in_flight_budget)),
            small: Arc::new(Semaphore::new(SMALL_RESERVE)),
            pool: Arc::new(Semaphore::new(cfg.io_threads)),
            max_in_flight: cfg.max_in_flight,
            max_connection_bytes: cfg.max_connection_bytes,
            idle_timeout: cfg.idle_timeout,
            send_timeout: cfg.send_timeout,
            shutdown_drain: cfg.shutdown_drain,
            buffers: Arc::new(BufPool::new(DEFAULT_POOL_BYTES)),
            busy: Arc::new(AtomicUsize::new(0)),
            write_fence: cfg.write_fence.clone(),
        });
        Ok(Server {
            registry,
            cfg: Arc::new(cfg),
            shared,
            table: Arc::default(),
        })
    }

    /// A handle that reports how full the connection table is, after the server was moved into `serve`.
    pub fn connection_probe(&self) -> ConnectionProbe {
        ConnectionProbe {
            table: Arc::clone(&self.table),
            max: self.cfg.max_connections,
        }
    }

    /// Bytes of the in-flight budget held right now by requests being executed or replies being sent.
    pub fn budget_in_use(&self) -> usize {
        self.budget_probe().in_use()
    }

    /// A handle that reports [`Server::budget_in_use`] after the server was moved into `serve`.
    pub fn budget_probe(&self) -> BudgetProbe {
        BudgetProbe {
            total: self.cfg.in_flight_budget,
            budget: Arc::clone(&self.shared.budget),
            small: Arc::clone(&self.shared.small),
            busy: Arc::clone(&self.shared.busy),
        }
    }

    /// Accepts connections until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish (up to `shutdown_drain`), closes every session and flushes the exports it wrote to. The
    /// listener's queue of connections not yet accepted is set to [`LISTEN_BACKLOG`] first, whatever it
    /// was bound with (`listen` again on a listening socket changes only that).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NbdError> {
        rustix::net::listen(&listener, LISTEN_BACKLOG).map_err(|e| {
            NbdError::io_op("set the listener's backlog (listen)", io::Error::from(e))
        })?;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let per_client = Arc::new(PerClient::default());
        let negotiating = Arc::new(Negotiating::default());
        let this = Arc::new(self);
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
            let Some(slot) = per_client.take(peer.ip(), this.cfg.max_connections_per_client) else {
                tracing::warn!(%peer, limit = this.cfg.max_connections_per_client, "connection refused: per-client connection limit reached");
                drop(stream);
                continue;
            };
            // Full: the oldest connection still negotiating makes room (it is closed at once, and the count
            // is over the limit only until its task has ended).
            let table = Arc::clone(&this.table);
            if table.open.fetch_add(1, Ordering::AcqRel) >= this.cfg.max_connections
                && !negotiating.evict_oldest()
            {
                table.open.fetch_sub(1, Ordering::AcqRel);
                table.refused_full.fetch_add(1, Ordering::Relaxed);
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                table.last_refused_full_ms.store(now_ms, Ordering::Relaxed);
                tracing::warn!(%peer, limit = this.cfg.max_connections, "connection refused: server connection limit reached, every connection has a session");
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let this = Arc::clone(&this);
            let stop = stop.child_token();
            let pending = negotiating.enter(stop.clone());
            tracker.spawn(async move {
                if let Err(e) = this.handle(stream, peer, stop, Some(pending)).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
                table.open.fetch_sub(1, Ordering::AcqRel);
            });
        }
        drop(listener);
        stop.cancel();
        tracker.close();
        let limit = this.cfg.shutdown_drain + Duration::from_secs(5);
        if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
            tracing::warn!("sessions still open after the shutdown deadline");
        }
        Ok(())
    }

    /// Serves one already accepted connection over any byte stream (a TCP or Unix socket, an in-memory
    /// pipe) until it ends. The server's TLS policy, limits and timeouts apply, except the connection
    /// counts, which belong to [`Server::serve`].
    pub async fn serve_stream<S>(&self, stream: S, peer: SocketAddr) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.handle(stream, peer, CancellationToken::new(), None)
            .await
    }

    /// One connection: negotiation, then its session. `pending` is its place among the connections still
    /// negotiating, given up when the session starts.
    async fn handle<S>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        stop: CancellationToken,
        pending: Option<Pending>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        let timed_out = || {
            tracing::info!(%peer, "handshake timed out");
            NbdError::Timeout("waiting for the client to finish negotiation")
        };
        let no_zeroes = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = tokio::time::timeout_at(deadline, negotiate::greet(&mut stream)) => r.map_err(|_| timed_out())??,
        };
        let ctx = Context {
            registry: &self.registry,
            peer,
            tls: &self.cfg.tls,
            secure: false,
            identity: None,
            no_zeroes,
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = tokio::time::timeout_at(deadline, negotiate::negotiate(&mut stream, &ctx)) => r.map_err(|_| timed_out())??,
        };
        match outcome {
            Outcome::Close => Ok(()),
            Outcome::Go(n) => {
                drop(pending);
                self.transmission(stream, n, &stop).await;
                Ok(())
            }
            Outcome::StartTls => {
                let settings = self
                    .cfg
                    .tls
                    .settings()
                    .expect("STARTTLS is acknowledged only when TLS is configured (invariant)");
                let mut tls = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = tokio::time::timeout_at(deadline, settings.acceptor().accept(stream)) => r.map_err(|_| timed_out())?.map_err(|e| {
                        // A refused or missing client certificate, or a client that does not trust ours:
                        // the client only sees an alert, so the reason is told here, as nbdkit does.
                        tracing::warn!(%peer, error = %e, "TLS handshake failed");
                        NbdError::TlsHandshake(e)
                    })?,
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| ClientIdentity::from_certificate(c));
                tracing::debug!(%peer, identity = ?identity, "TLS established");
                let ctx = Context {
                    secure: true,
                    identity: identity.as_ref(),
                    ..ctx
                };
                let outcome = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = tokio::time::timeout_at(deadline, negotiate::negotiate(&mut tls, &ctx)) => r.map_err(|_| timed_out())??,
                };
                match outcome {
                    Outcome::Go(n) => {
                        drop(pending);
                        self.transmission(tls, n, &stop).await;
                    }
                    Outcome::Close | Outcome::StartTls => {}
                }
                Ok(())
            }
        }
    }

    async fn transmission<S>(&self, stream: S, n: Negotiated, stop: &CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Negotiated {
            export,
            guard,
            kill,
            structured,
            meta_allocation,
        } = n;
        tracing::debug!(export = %export.name, generation = export.generation, "session started");
        let params = SessionParams {
            export: Arc::clone(&export),
            structured,
            meta_allocation,
        };
        let shared = Arc::clone(&self.shared);
        // A plain TCP stream gets the session that moves payloads through the export's mapping; anything
        // else (TLS, a Unix socket, an in-memory pipe) the buffered one.
        let mut slot = Some(stream);
        let end = match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<TcpStream>>() {
            Some(tcp) => {
                let tcp = tcp.take().expect("the slot was just filled (invariant)");
                session::run_tcp(tcp, params, shared, kill, stop.clone()).await
            }
            None => {
                let stream = slot.take().expect("the slot was just filled (invariant)");
                session::run(stream, params, shared, kill, stop.clone()).await
            }
        };
        tracing::debug!(export = %export.name, ?end, "session ended");
        drop(guard);
    }
}

/// Reads how much of a server's in-flight budget is held, and how many sessions are busy (for tests and
/// metrics).
#[derive(Debug, Clone)]
pub struct BudgetProbe {
    total: usize,
    budget: Arc<Semaphore>,
    small: Arc<Semaphore>,
    busy: Arc<AtomicUsize>,
}

impl BudgetProbe {
    /// Bytes held right now, of the budget and of the reserve for small requests.
    pub fn in_use(&self) -> usize {
        self.total - self.budget.available_permits() + SMALL_RESERVE
            - self.small.available_permits()
    }

    /// Sessions with a request being run or answered right now. While there are more of them than the
    /// runtime has worker threads, each session answers in larger batches.
    pub fn busy_sessions(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }
}
