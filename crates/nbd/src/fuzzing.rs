//! Harnesses for the fuzz targets in `crates/nbd/fuzz` and their regression tests: feed arbitrary client
//! bytes through the real negotiation and transmission code over an in-memory stream.
//!
//! Not a stable API; public only so the fuzz crate and the regression test can call it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::*;
use crate::{Access, ExportConfig, MemoryBackend, Registry, Server, ServerConfig};

/// Size of the exports served to fuzz inputs.
const DISK: usize = 1 << 20;

fn server() -> Server {
    let registry = Registry::new();
    for (name, read_only, access) in [
        ("a", false, Access::Anyone),
        ("ro", true, Access::Anyone),
        ("restricted", false, Access::Clients(vec!["nobody".into()])),
    ] {
        registry
            .add(ExportConfig {
                name: name.into(),
                backend: Arc::new(MemoryBackend::new(DISK)),
                read_only,
                max_connections: None,
                description: Some(format!("fuzz disk {name}")),
                access,
            })
            .expect("fuzz export names are distinct (invariant)");
    }
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_secs(5),
        send_timeout: Duration::from_secs(5),
        shutdown_drain: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    Server::try_new(registry, cfg).expect("the fuzz server configuration is valid (invariant)")
}

/// Serves one connection whose client sends `input` and then closes its side; everything the server
/// sends is read and dropped. Returns the number of bytes the server sent. Panics (a finding) only if the
/// server panics or does not finish within 20 seconds.
pub fn serve_input(input: &[u8]) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime can be built (invariant)");
    rt.block_on(async {
        let server = server();
        let (client, conn) = tokio::io::duplex(1 << 20);
        let (mut rd, mut wr) = tokio::io::split(client);
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let input = input.to_vec();
        let feed = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
            // Keep the write half open until the server is done: dropping it early is a different input.
            std::future::pending::<()>().await;
        };
        let drain = async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        };
        let serve = server.serve_stream(conn, peer);
        let run = async {
            tokio::select! {
                _ = feed => unreachable!("the feeder never ends"),
                (r, sent) = async { tokio::join!(serve, drain) } => { let _ = r; sent }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the server finishes a connection whose client stopped sending")
    })
}

/// Client bytes of a complete handshake (fixed newstyle, structured replies, `base:allocation`, GO on a
/// writable export), after which `requests` are sent as the transmission phase.
pub fn after_handshake(requests: &[u8]) -> Vec<u8> {
    fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut out = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    option(&mut out, OPT_STRUCTURED_REPLY, &[]);
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"a");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    option(&mut out, OPT_SET_META_CONTEXT, &meta);
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"a");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, OPT_GO, &go);
    out.extend_from_slice(requests);
    out
}

/// Fuzz entry for option negotiation: `data` is everything the client sends after the greeting.
pub fn negotiation(data: &[u8]) {
    serve_input(data);
}

/// Fuzz entry for the transmission phase: `data` is sent as requests after a valid handshake.
pub fn requests(data: &[u8]) {
    serve_input(&after_handshake(data));
}
