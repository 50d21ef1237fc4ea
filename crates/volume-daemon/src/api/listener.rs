//! The REST API's HTTP/1.1 listener: a cap on open connections (at the cap a new client takes the place of
//! the connection idle longest, one with no request in progress; accepting waits while every one is busy),
//! a deadline for each request's headers that also closes idle keep-alive connections and, the same
//! length, connections whose client reads nothing of an answer; a time limit on each request, and a
//! graceful stop.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Limits of the REST listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Open connections at most; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request's headers must arrive within this time of the connection being ready for one: it
    /// bounds slow headers and idle keep-alive connections alike. An answer the client reads nothing of
    /// for this long closes the connection too.
    pub header_timeout: Duration,
    /// A request is answered (503) when its handler has not finished in this time.
    pub request_timeout: Duration,
}

/// How long a stop waits for open requests before closing their connections.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop` resolves; then stops accepting, lets open requests end
/// (at most [`STOP_GRACE`]) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let limit = limits.request_timeout;
    let app = app
        .layer(axum::middleware::from_fn(require_one_host))
        .layer(axum::Extension(super::extract::BodyTimeout(
            limits.header_timeout,
        )))
        .layer(axum::middleware::from_fn(move |req, next| {
            super::error::answer_within(limit, req, next)
        }));
    let max = limits.max_connections.max(1);
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // One task per connection; finished ones are reaped as they end, so what they held is freed at once.
    let mut conns = tokio::task::JoinSet::new();
    let mut open: HashMap<tokio::task::Id, Open> = HashMap::new();
    let epoch = Instant::now();
    // At the cap, whether a connection has become idle long enough to give its place is looked at again
    // this often.
    let mut recheck = tokio::time::interval(Duration::from_millis(250));
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let full = conns.len() >= max;
        let replaceable = full && idlest(&open, epoch).is_some();
        tokio::select! {
            () = &mut stop => break,
            Some(done) = conns.join_next_with_id(), if !conns.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                open.remove(&id);
            }
            _ = recheck.tick(), if full && !replaceable => {}
            // At the cap, further clients wait in the kernel's accept queue while every connection is busy.
            r = listener.accept(), if !full || replaceable => {
                let (stream, peer) = match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(error = %e, "REST API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if conns.len() >= max {
                    if let Some(id) = idlest(&open, epoch) {
                        if let Some(old) = open.remove(&id) {
                            tracing::debug!(
                                peer = %old.peer,
                                idle_ms = old.activity.idle_ms(epoch),
                                "REST API connections at api_max_connections: closing the one idle longest"
                            );
                            old.abort.abort();
                        }
                    }
                }
                let _ = stream.set_nodelay(true);
                let stream = SendDeadline::new(stream, limits.header_timeout);
                let activity = Arc::new(Activity::new(epoch));
                let service = counted(TowerToHyperService::new(app.clone()), activity.clone(), epoch);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                let abort = conns.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "REST API connection ended with an error");
                    }
                });
                open.insert(abort.id(), Open { activity, abort, peer });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("REST API connections still open after the stop grace; closing them");
    }
    conns.abort_all();
}

/// How long a connection must have had no request in progress before a new client may take its place.
const IDLE_BEFORE_REPLACED: Duration = Duration::from_secs(1);

/// One open connection, as the accept loop keeps it.
struct Open {
    activity: Arc<Activity>,
    abort: tokio::task::AbortHandle,
    peer: std::net::SocketAddr,
}

/// Requests of one connection in progress (its handler running, or its answer still being sent) and when
/// it last had none, in milliseconds since the listener started.
struct Activity {
    busy: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        Self {
            busy: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(ms_since(epoch)),
        }
    }

    /// How long the connection has had no request in progress; `None` while it has one.
    fn idle_ms(&self, epoch: Instant) -> Option<u64> {
        (self.busy.load(Ordering::Acquire) == 0)
            .then(|| ms_since(epoch).saturating_sub(self.idle_since_ms.load(Ordering::Acquire)))
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A request in progress on a connection: counted from the call until its answer's body is dropped (sent,
/// or the connection closed).
struct Busy {
    activity: Arc<Activity>,
    epoch: Instant,
}

impl Busy {
    fn enter(activity: Arc<Activity>, epoch: Instant) -> Self {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        Self { activity, epoch }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Idle from now when this was the last one.
        self.activity
            .idle_since_ms
            .store(ms_since(self.epoch), Ordering::Release);
        self.activity.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `service`, counting each request in progress in `activity`.
fn counted<S>(
    service: S,
    activity: Arc<Activity>,
    epoch: Instant,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future<
        Output = Result<hyper::Response<axum::body::Body>, std::convert::Infallible>,
    > + Send,
> + Clone
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<axum::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    hyper::service::service_fn(move |req| {
        let busy = Busy::enter(activity.clone(), epoch);
        let answer = service.call(req);
        async move {
            let resp = answer.await?;
            // The guard goes with the body: the request is in progress until its answer has been sent.
            Ok(resp.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _in_progress = &busy;
                    frame
                }))
            }))
        }
    })
}

/// The connection idle longest, if one has been idle at least [`IDLE_BEFORE_REPLACED`].
fn idlest(open: &HashMap<tokio::task::Id, Open>, epoch: Instant) -> Option<tokio::task::Id> {
    let floor = u64::try_from(IDLE_BEFORE_REPLACED.as_millis()).unwrap_or(u64::MAX);
    open.iter()
        .filter_map(|(id, o)| o.activity.idle_ms(epoch).map(|idle| (idle, *id)))
        .filter(|(idle, _)| *idle >= floor)
        .max_by_key(|(idle, _)| *idle)
        .map(|(_, id)| id)
}

/// RFC 9112 3.2: an HTTP/1.1 request without a `Host` header, or with more than one, is a 400.
async fn require_one_host(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let hosts = req
        .headers()
        .get_all(axum::http::header::HOST)
        .iter()
        .count();
    let needs_one = req.version() >= axum::http::Version::HTTP_11;
    if hosts > 1 || (needs_one && hosts == 0) {
        return axum::response::IntoResponse::into_response(super::ApiError::BadRequest {
            field: Some("Host".into()),
            message: "an HTTP/1.1 request needs exactly one Host header".into(),
        });
    }
    next.run(req).await
}

/// A connection whose writes fail with `TimedOut` once one has waited `limit` for the client to read
/// (the socket's send buffer stayed full): a client that pipelines requests and never reads the
/// answers would otherwise hold its connection, and one of the listener's slots, for as long as it
/// likes. A client that reads slowly but steadily is never cut off.
struct SendDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write first found no room, cleared by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After a write found no room: `Pending` until the limit, then the error that ends the connection.
    fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of the answer within the header timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.wait(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(r, cx)
    }
}
