//! The volume daemon: configuration, store, operation engine, appliance identity, exports, REST API.
//!
//! Public only where the binary and the integration tests need it (configuration, start-up, the store and its
//! shared test suite); everything else is crate-private so that unused items are reported.

mod api;
mod cloud;
pub mod config;
pub mod daemon;
mod devices;
mod engine;
mod exports;
mod identity;
mod locks;
mod metrics;
mod reconcile;
mod sdnotify;
pub mod sim;
pub mod statedir;
pub mod store;

/// Renders an error and its `source()` chain as one line: `outer: inner: root`.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}
