//! HTTPS: certificates are verified by default, `ca_file` adds a trusted root, and an untrusted
//! certificate is a configuration error that is not retried.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudstack::{Client, Config, ErrorKind, RetryPolicy, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A minimal HTTPS server answering every request with a `listZones` body. Returns its port, a
/// counter of completed TLS handshakes and one of accepted TCP connections.
async fn start_https() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_fixture("server.pem"))
            .expect("open server.pem")
            .collect::<Result<_, _>>()
            .expect("parse server.pem");
    let key = PrivateKeyDer::from_pem_file(tls_fixture("server.key")).expect("parse server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let port = listener.local_addr().expect("addr").port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&handshakes);
    let accepts = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&accepts);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake; nothing to answer then.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = r#"{ "listzonesresponse" : { "count": 1, "zone" : [ {"id":"z1","name":"Secure"} ] } }"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, handshakes, accepts)
}

fn config(port: u16, ca_file: Option<PathBuf>) -> Config {
    Config {
        ca_file,
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        },
        ..Config::new(
            format!("https://localhost:{port}/client/api"),
            "KEY",
            Secret::new("SECRET"),
        )
    }
}

#[tokio::test]
async fn ca_file_makes_the_server_trusted() {
    let (port, handshakes, _) = start_https().await;
    let client = Client::new(config(port, Some(tls_fixture("ca.pem")))).expect("client");
    let zones = client
        .list_zones()
        .await
        .expect("listZones over verified TLS");
    assert_eq!(zones[0].name, "Secure");
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn untrusted_certificate_is_refused_without_retry() {
    let (port, handshakes, accepts) = start_https().await;
    for ca in [None, Some(tls_fixture("other-ca.pem"))] {
        let client = Client::new(config(port, ca.clone())).expect("client");
        let err = client
            .list_zones()
            .await
            .expect_err("must not trust the test CA");
        assert_eq!(err.kind(), ErrorKind::Config, "{ca:?}: {err}");
        assert!(err.to_string().contains("ca_file"), "{err}");
    }
    assert_eq!(handshakes.load(Ordering::SeqCst), 0);
    // One connection per client: the refusal was not retried.
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
}
