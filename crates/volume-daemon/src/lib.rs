//! The volume daemon: configuration, store, operation engine, appliance identity, exports, REST API.
//!
//! Public only where the binary and the integration tests need it (configuration, start-up, the store and its
//! shared test suite); everything else is crate-private so that unused items are reported.

// Not in fuzz builds: their address sanitizer must see every allocation.
#[cfg(all(target_os = "linux", target_env = "gnu", not(fuzzing)))]
mod alloc;
mod api;
mod cloud;
pub mod config;
pub mod daemon;
/// Fail points at every journal write (armed only in a build with the `failpoints` feature).
pub use engine::failpoints;
mod devices;
mod engine;
mod exports;
/// Harness of the REST API's fuzz target (not a stable API).
#[doc(hidden)]
pub use api::fuzzing;
pub mod hub;
mod identity;
mod locks;
mod metrics;
mod reconcile;
mod sdnotify;
pub mod sim;
pub mod statedir;
pub mod store;
mod watch;

pub(crate) use volume_api::error_chain;
