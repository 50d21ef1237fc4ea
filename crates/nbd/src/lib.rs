//! NBD protocol (NetworkBlockDevice/nbd doc/proto.md) and an asynchronous server with a run-time export registry.
//!
//! A [`Registry`] holds exports by name; a [`Server`] serves it on a TCP listener. Exports can be added and
//! removed while clients are connected: removal drains in-flight requests, closes the sessions of that export's
//! generation only and flushes. [`ServerConfig`] bounds what clients can make the server hold (in-flight
//! request bytes, queue depth, connections per address, idle and send timeouts) and sets the TLS policy
//! ([`Tls`]); each export's [`Access`] says which verified client identities may list and open it.

mod backend;
mod bufpool;
pub mod client;
mod error;
mod fence;
#[doc(hidden)]
pub mod fuzzing;
mod logging;
mod mapping;
mod negotiate;
pub mod proto;
mod registry;
mod server;
mod session;
mod tls;

pub use backend::{Backend, Extent, FileBackend, MemoryBackend};
pub use error::{NbdError, NbdErrorKind};
pub use fence::WriteFence;
pub use logging::{log_colour, log_filter, LossyStderr};
pub use mapping::{Mapping, UNMAP_EVERY};
pub use registry::{CountersSnapshot, ExportConfig, ExportSnapshot, Registry, RemoveReport};
pub use server::{BudgetProbe, ConnectionProbe, Server, ServerConfig, LISTEN_BACKLOG};
pub use session::{SMALL_MAX, SMALL_RESERVE};
pub use tls::{Access, ClientIdentity, Tls, TlsSettings, CA_CERT, SERVER_CERT, SERVER_KEY};
