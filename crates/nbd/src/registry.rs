//! The run-time export registry: exports by name, each with a generation, counters, its live sessions,
//! and removal with drain semantics (stop accepting, let in-flight requests finish, close, flush).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::error::NbdError;
use crate::proto::MAX_STRING;
use crate::tls::{Access, ClientIdentity};

/// What to serve under a name.
pub struct ExportConfig {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
    /// Concurrent connections allowed to this export; `None` for no per-export limit.
    pub max_connections: Option<usize>,
    pub description: Option<String>,
    /// Which clients may list and open the export.
    pub access: Access,
}

impl std::fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("max_connections", &self.max_connections)
            .field("description", &self.description)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// A point-in-time view of an export.
#[derive(Clone, Debug)]
pub struct ExportSnapshot {
    pub name: String,
    pub generation: u64,
    pub size: u64,
    pub read_only: bool,
    pub description: Option<String>,
    pub max_connections: Option<usize>,
    pub access: Access,
    pub counters: CountersSnapshot,
}

/// Counters of one export, read at any time.
#[derive(Clone, Debug, Default)]
pub struct CountersSnapshot {
    pub connections_current: u64,
    pub connections_total: u64,
    pub peers: Vec<SocketAddr>,
    /// Verified client identity of each open session, in the order of `peers` (`None` without one).
    pub identities: Vec<Option<String>>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub reads: u64,
    pub writes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub block_status: u64,
    pub flushes: u64,
    pub last_activity: Option<SystemTime>,
    /// End (exclusive) of the furthest byte range written, zeroed or trimmed.
    pub highest_offset_written: Option<u64>,
}

/// What removing an export did.
#[derive(Clone, Debug)]
pub struct RemoveReport {
    pub generation: u64,
    /// Sessions open when removal started; all of them are closed when it returns.
    pub sessions_closed: usize,
    /// Whether every in-flight request finished before the deadline.
    pub drained_in_time: bool,
    /// Why the final flush of a writable export failed (`None`: flushed, or read-only). Data written
    /// through the export may not be on stable storage then.
    pub flush_error: Option<std::sync::Arc<std::io::Error>>,
    /// What the generation read and wrote in all, counted once its sessions were closed.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub connections_current: AtomicU64,
    pub connections_total: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub block_status: AtomicU64,
    pub flushes: AtomicU64,
    /// Nanoseconds since the Unix epoch; 0 for never.
    pub last_activity: AtomicU64,
    /// 0 for never written.
    pub highest_written_end: AtomicU64,
}

impl Counters {
    pub(crate) fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(1);
        self.last_activity.store(now.max(1), Ordering::Relaxed);
    }

    pub(crate) fn wrote(&self, end: u64) {
        self.highest_written_end.fetch_max(end, Ordering::Relaxed);
    }
}

/// A live session's handle kept by its export.
struct SessionEntry {
    peer: SocketAddr,
    identity: Option<String>,
    cancel: CancellationToken,
}

/// One generation of an export. Sessions hold it; removal closes it.
pub(crate) struct Export {
    pub name: String,
    pub generation: u64,
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
    pub max_connections: Option<usize>,
    pub description: Option<String>,
    pub access: Access,
    pub counters: Counters,
    /// Set once removal starts: no new sessions, new requests refused.
    closing: AtomicBool,
    /// Requests accepted and not yet answered, over all sessions.
    in_flight: AtomicUsize,
    idle: Notify,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    next_session: AtomicU64,
}

impl Export {
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Registers a session; `None` when the export is closing or at its connection limit.
    pub(crate) fn attach(
        self: &Arc<Self>,
        peer: SocketAddr,
        identity: Option<&ClientIdentity>,
        cancel: CancellationToken,
    ) -> Result<SessionGuard, AttachRefusal> {
        let mut sessions = self.sessions.lock().expect("sessions lock poisoned");
        if self.is_closing() {
            return Err(AttachRefusal::Closing);
        }
        if let Some(max) = self.max_connections {
            if sessions.len() >= max {
                return Err(AttachRefusal::Limit);
            }
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        sessions.insert(
            id,
            SessionEntry {
                peer,
                identity: self.access.admitted_as(identity).map(str::to_string),
                cancel,
            },
        );
        self.counters
            .connections_current
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        self.counters.touch();
        Ok(SessionGuard {
            export: Arc::clone(self),
            id,
        })
    }

    /// Counts a request in; it must be balanced by [`Export::request_done`].
    pub(crate) fn request_start(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn request_done(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight.load(Ordering::SeqCst) == 0;
            }
        }
    }

    fn snapshot(&self) -> ExportSnapshot {
        let c = &self.counters;
        let (peers, identities) = {
            let sessions = self.sessions.lock().expect("sessions lock poisoned");
            let mut v: Vec<(&u64, &SessionEntry)> = sessions.iter().collect();
            v.sort_by_key(|(id, _)| **id);
            v.iter().map(|(_, s)| (s.peer, s.identity.clone())).unzip()
        };
        let last = c.last_activity.load(Ordering::Relaxed);
        let hi = c.highest_written_end.load(Ordering::Relaxed);
        ExportSnapshot {
            name: self.name.clone(),
            generation: self.generation,
            size: self.backend.size(),
            read_only: self.read_only,
            description: self.description.clone(),
            max_connections: self.max_connections,
            access: self.access.clone(),
            counters: CountersSnapshot {
                connections_current: c.connections_current.load(Ordering::Relaxed),
                connections_total: c.connections_total.load(Ordering::Relaxed),
                peers,
                identities,
                bytes_read: c.bytes_read.load(Ordering::Relaxed),
                bytes_written: c.bytes_written.load(Ordering::Relaxed),
                reads: c.reads.load(Ordering::Relaxed),
                writes: c.writes.load(Ordering::Relaxed),
                trims: c.trims.load(Ordering::Relaxed),
                zeroes: c.zeroes.load(Ordering::Relaxed),
                block_status: c.block_status.load(Ordering::Relaxed),
                flushes: c.flushes.load(Ordering::Relaxed),
                last_activity: (last != 0).then(|| UNIX_EPOCH + Duration::from_nanos(last)),
                highest_offset_written: (hi != 0).then_some(hi),
            },
        }
    }
}

/// Why a session could not attach to an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachRefusal {
    Closing,
    Limit,
}

/// Deregisters a session from its export when dropped.
pub(crate) struct SessionGuard {
    export: Arc<Export>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let removed = self
            .export
            .sessions
            .lock()
            .map(|mut s| s.remove(&self.id).is_some())
            .unwrap_or(false);
        if removed {
            self.export
                .counters
                .connections_current
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.export.idle.notify_waiters();
    }
}

struct Inner {
    exports: Mutex<HashMap<String, Arc<Export>>>,
    next_generation: AtomicU64,
}

/// Exports by name; cheap to clone (shared state), safe to use from any thread.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .inner
            .exports
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Registry").field("exports", &names).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            inner: Arc::new(Inner {
                exports: Mutex::new(HashMap::new()),
                next_generation: AtomicU64::new(1),
            }),
        }
    }

    /// Adds an export under a new generation. `Conflict` if the name is live.
    pub fn add(&self, cfg: ExportConfig) -> Result<ExportSnapshot, NbdError> {
        if cfg.name.len() > MAX_STRING {
            return Err(NbdError::Invalid(format!(
                "export name is {} bytes; at most {MAX_STRING} are allowed",
                cfg.name.len()
            )));
        }
        if cfg.name.contains('\0') {
            return Err(NbdError::Invalid(
                "export name contains a NUL character, which no NBD client can send".into(),
            ));
        }
        if cfg.max_connections == Some(0) {
            return Err(NbdError::Invalid(
                "max_connections must be at least 1 (or None for no limit)".into(),
            ));
        }
        let mut map = self.inner.exports.lock().expect("registry lock poisoned");
        if map.contains_key(&cfg.name) {
            return Err(NbdError::Conflict { name: cfg.name });
        }
        let export = Arc::new(Export {
            generation: self.inner.next_generation.fetch_add(1, Ordering::Relaxed),
            name: cfg.name.clone(),
            backend: cfg.backend,
            read_only: cfg.read_only,
            max_connections: cfg.max_connections,
            description: cfg.description,
            access: cfg.access,
            counters: Counters::default(),
            closing: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
        });
        let snap = export.snapshot();
        map.insert(cfg.name, export);
        Ok(snap)
    }

    /// The live export of that name.
    pub fn get(&self, name: &str) -> Option<ExportSnapshot> {
        self.lookup(name).map(|e| e.snapshot())
    }

    /// All live exports, sorted by name.
    pub fn list(&self) -> Vec<ExportSnapshot> {
        let mut v: Vec<ExportSnapshot> = self.all().iter().map(|e| e.snapshot()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.inner
            .exports
            .lock()
            .expect("registry lock poisoned")
            .get(name)
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        self.inner
            .exports
            .lock()
            .expect("registry lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Flushes an export's backend (as an `NBD_CMD_FLUSH` would) without touching its sessions: every write
    /// acknowledged before the call is then durable on the backend, whether or not its client flushed.
    /// For what reads the backend from outside the server (a snapshot of the device). `NotFound` if no such
    /// export; a read-only export has nothing to flush.
    pub async fn flush(&self, name: &str) -> Result<(), NbdError> {
        let export = self
            .lookup(name)
            .ok_or_else(|| NbdError::NotFound { name: name.into() })?;
        if export.read_only {
            return Ok(());
        }
        let backend = Arc::clone(&export.backend);
        tokio::task::spawn_blocking(move || backend.flush())
            .await
            .map_err(|e| NbdError::io_op("flush an export", std::io::Error::other(e)))?
            .map_err(|e| NbdError::io_op("flush an export", e))
    }

    /// Removes an export: new connections are refused at once, requests arriving from now on get
    /// `ESHUTDOWN`, in-flight requests may finish until `drain` elapses, then every session of this generation is
    /// closed (no reply is sent after that) and the backend is flushed. `NotFound` if no such export.
    pub async fn remove(&self, name: &str, drain: Duration) -> Result<RemoveReport, NbdError> {
        let export = self
            .inner
            .exports
            .lock()
            .expect("registry lock poisoned")
            .remove(name)
            .ok_or_else(|| NbdError::NotFound { name: name.into() })?;
        Ok(close_export(&export, drain).await)
    }
}

/// Drains, closes every session of one export generation and flushes. The sessions are closed before the
/// flush: a request still running at the drain deadline must not be acknowledged once the flush has begun,
/// which might not cover it (unanswered, the client has to repeat it as any unacknowledged write).
pub(crate) async fn close_export(export: &Arc<Export>, drain: Duration) -> RemoveReport {
    let sessions_at_start = {
        let sessions = export.sessions.lock().expect("sessions lock poisoned");
        export.closing.store(true, Ordering::SeqCst);
        sessions.len()
    };
    let deadline = tokio::time::Instant::now() + drain;
    let drained_in_time = export.wait_idle(deadline).await;
    let cancels: Vec<CancellationToken> = export
        .sessions
        .lock()
        .expect("sessions lock poisoned")
        .values()
        .map(|s| s.cancel.clone())
        .collect();
    for c in &cancels {
        c.cancel();
    }
    // Wait (bounded) for the sessions to deregister so callers see them gone and no reply follows.
    let close_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let notified = export.idle.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if export
            .sessions
            .lock()
            .expect("sessions lock poisoned")
            .is_empty()
        {
            break;
        }
        if tokio::time::timeout_at(close_deadline, notified)
            .await
            .is_err()
        {
            break;
        }
    }
    let backend = Arc::clone(&export.backend);
    let mut flush_error = None;
    if !export.read_only {
        let flushed = tokio::task::spawn_blocking(move || backend.flush()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(export = %export.name, error = %e, "flush on removal failed");
                flush_error = Some(Arc::new(e));
            }
            Err(e) => {
                tracing::warn!(export = %export.name, error = %e, "flush on removal panicked");
                flush_error = Some(Arc::new(std::io::Error::other(e)));
            }
        }
    }
    RemoveReport {
        generation: export.generation,
        sessions_closed: sessions_at_start,
        drained_in_time,
        flush_error,
        bytes_read: export.counters.bytes_read.load(Ordering::Relaxed),
        bytes_written: export.counters.bytes_written.load(Ordering::Relaxed),
    }
}
