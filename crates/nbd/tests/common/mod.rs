//! Helpers shared by the test binaries: a file served in-process ([`serve_file`]), test certificates in
//! nbdkit's and libnbd's directory layouts, made fresh for each test with rcgen, waiting for a condition
//! ([`eventually`]), and (`smaps`) what a process keeps resident of a mapped file.
#![allow(dead_code)] // each test binary uses a part of it

pub mod smaps;

/// A file served in-process as export "f" (see [`serve_file`]).
pub struct FileServer {
    pub addr: std::net::SocketAddr,
    /// Stops the server (it drains and flushes, then its task ends).
    pub stop: tokio::sync::oneshot::Sender<()>,
    /// The server's registry, for the export's counters.
    pub registry: nbd::Registry,
    pub task: tokio::task::JoinHandle<Result<(), nbd::NbdError>>,
}

/// Serves `path` as export "f", read-only or not, with `cfg` on a fresh listener on a free port.
pub async fn serve_file(path: &Path, cfg: nbd::ServerConfig, read_only: bool) -> FileServer {
    serve_file_to(path, cfg, read_only, nbd::Access::Anyone).await
}

/// [`serve_file`] with the export open only to the clients `access` admits.
pub async fn serve_file_to(
    path: &Path,
    cfg: nbd::ServerConfig,
    read_only: bool,
    access: nbd::Access,
) -> FileServer {
    let registry = nbd::Registry::new();
    registry
        .add(nbd::ExportConfig {
            name: "f".into(),
            backend: std::sync::Arc::new(nbd::FileBackend::open(path, read_only).unwrap()),
            read_only,
            max_connections: None,
            description: None,
            access,
        })
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        nbd::Server::new(registry.clone(), cfg).serve(listener, async move {
            let _ = rx.await;
        }),
    );
    FileServer {
        addr,
        stop,
        registry,
        task,
    }
}

/// Waits up to 10 s for `done` to hold of `value()`, checking every 10 ms; panics with `what` and the last
/// value.
pub async fn eventually<T: std::fmt::Debug>(
    what: &str,
    value: impl Fn() -> T,
    done: impl Fn(&T) -> bool,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = value();
        if done(&v) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still {v:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority made for a test: its certificate and key.
pub struct Ca {
    pub cert: Certificate,
    pub key: KeyPair,
}

fn ca(name: &str) -> Ca {
    ca_with(name, |_| {}, None)
}

/// A CA named `name` (unconstrained, allowed to sign certificates and CRLs) after `edit` changed its
/// parameters: self-signed, or an intermediate signed by `parent`.
pub fn ca_with(name: &str, edit: impl FnOnce(&mut CertificateParams), parent: Option<&Ca>) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    edit(&mut p);
    let key = KeyPair::generate().unwrap();
    let cert = match parent {
        None => p.self_signed(&key).unwrap(),
        Some(s) => p.signed_by(&key, &s.cert, &s.key).unwrap(),
    };
    Ca { cert, key }
}

fn leaf(ca: &Ca, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// A CA, the server's directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) and client
/// directories (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`) as libnbd and qemu read them.
pub struct Pki {
    root: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        let root = tempfile::tempdir().unwrap();
        let ca = ca("nbd test CA");
        let server = root.path().join("server");
        std::fs::create_dir(&server).unwrap();
        write(&server, "ca-cert.pem", &ca.cert.pem());
        let (cert, key) = leaf(
            &ca,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write(&server, "server-cert.pem", &cert);
        write(&server, "server-key.pem", &key);
        Pki { root, ca }
    }

    /// The server's certificate directory.
    pub fn server_dir(&self) -> PathBuf {
        self.root.path().join("server")
    }

    /// A client directory with a certificate for `cn` signed by this CA.
    pub fn client(&self, cn: &str) -> PathBuf {
        let (cert, key) = leaf(&self.ca, cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        self.client_dir(cn, Some((cert, key)))
    }

    /// A client directory that trusts this CA but has no certificate of its own.
    pub fn anonymous_client(&self) -> PathBuf {
        self.client_dir("anonymous", None)
    }

    /// A client directory whose certificate for `cn` comes from another CA.
    pub fn rogue_client(&self, cn: &str) -> PathBuf {
        let rogue = ca("rogue CA");
        let (cert, key) = leaf(&rogue, cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        self.client_dir(&format!("rogue-{cn}"), Some((cert, key)))
    }

    fn client_dir(&self, label: &str, pair: Option<(String, String)>) -> PathBuf {
        let dir = self.root.path().join(format!("client-{label}"));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "ca-cert.pem", &self.ca.cert.pem());
        if let Some((cert, key)) = pair {
            write(&dir, "client-cert.pem", &cert);
            write(&dir, "client-key.pem", &key);
        }
        dir
    }
}

/// A TLS client that trusts the CA of a test certificate directory (`ca-cert.pem`) and presents no
/// certificate.
pub fn tls_connector(dir: &Path) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(dir.join("ca-cert.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// On a fresh connection to a server: reads the greeting, answers fixed newstyle without zeroes, asks
/// for STARTTLS and runs the TLS handshake (the server named `localhost`). Returns the TLS session, on
/// which negotiation goes on, and the greeting's handshake flags.
pub async fn starttls<S>(
    s: S,
    connector: &tokio_rustls::TlsConnector,
) -> (tokio_rustls::client::TlsStream<S>, u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    try_starttls(s, connector).await.unwrap()
}

/// [`starttls`], returning the TLS handshake's failure instead of panicking on it.
pub async fn try_starttls<S>(
    mut s: S,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<(tokio_rustls::client::TlsStream<S>, u16)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use nbd::proto::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(greeting[8..16].try_into().unwrap()),
        IHAVEOPT
    );
    let flags = u16::from_be_bytes(greeting[16..].try_into().unwrap());
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    let mut option = IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    option.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&option).await.unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        OPT_REPLY_MAGIC
    );
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().unwrap()),
        REP_ACK,
        "STARTTLS refused"
    );
    assert_eq!(u32::from_be_bytes(reply[16..].try_into().unwrap()), 0);
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    Ok((connector.connect(name, s).await?, flags))
}
