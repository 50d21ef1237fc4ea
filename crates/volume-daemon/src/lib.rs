//! The volume daemon: configuration, store, operation engine, appliance identity, exports, REST API.

pub mod api;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod devices;
pub mod engine;
pub mod exports;
pub mod identity;
pub mod locks;
pub mod metrics;
pub mod reconcile;
pub mod sdnotify;
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
