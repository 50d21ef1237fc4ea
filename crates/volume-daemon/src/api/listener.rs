//! The REST API's HTTP/1.1 listener: a cap on open connections (accepting waits while it is reached),
//! a deadline for each request's headers that also closes idle keep-alive connections, a time limit on
//! each request, and a graceful stop.

use std::time::Duration;

use axum::Router;
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
    /// bounds slow headers and idle keep-alive connections alike.
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
    let app = app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        limits.request_timeout,
    ));
    let max = limits.max_connections.max(1);
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // One task per connection; finished ones are reaped as they end, so what they held is freed at once.
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            // At the cap, further clients wait in the kernel's accept queue.
            r = listener.accept(), if conns.len() < max => {
                let (stream, peer) = match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little rather than spin.
                        tracing::warn!(error = %e, "REST API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "REST API connection ended with an error");
                    }
                });
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
