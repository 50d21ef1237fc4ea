//! Which client certificates a server with `--tls-verify-peer` trusts: revocation lists (`ca-crl.pem`), the
//! limits of each CA in `ca-cert.pem` (CA flag, key usage, validity, path length), and how names on an
//! export's access list match a certificate's names; each case through a real TLS session to a served file.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{ca_with as ca, Ca};
use nbd::client::Handshake;
use nbd::{Access, ServerConfig, Tls, TlsSettings};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client certificate (common name `cn`, DNS names `sans`, serial `serial`) signed by `by`: its PEM and key.
fn client(by: &Ca, cn: &str, sans: &[&str], serial: u64) -> (String, KeyPair) {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(SerialNumber::from(serial));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    (p.signed_by(&key, &by.cert, &by.key).unwrap().pem(), key)
}

/// A server certificate directory: `server-cert.pem` and `server-key.pem` from their own CA (which the
/// clients trust), and `ca-cert.pem` holding `client_cas`.
struct ServerDir {
    dir: tempfile::TempDir,
    server_ca: Ca,
}

impl ServerDir {
    fn new(client_cas: &[&Certificate]) -> ServerDir {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = ca("server CA", |_| {}, None);
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &server_ca.cert, &server_ca.key).unwrap();
        std::fs::write(dir.path().join("server-cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), key.serialize_pem()).unwrap();
        let cas: String = client_cas.iter().map(|c| c.pem()).collect();
        std::fs::write(dir.path().join("ca-cert.pem"), cas).unwrap();
        ServerDir { dir, server_ca }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn settings(&self) -> Result<TlsSettings, nbd::NbdError> {
        TlsSettings::from_dir(self.path(), true)
    }

    /// A TLS client trusting this server, presenting `chain` (PEM certificates, the client's first).
    fn connector(&self, chain: &[&str], key: &KeyPair) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.server_ca.cert.der().clone()).unwrap();
        let certs: Vec<CertificateDer<'static>> = chain
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// A 1 MiB file served as "f" (open to `access`) with TLS required and clients verified by `dir`.
async fn serve(dir: &ServerDir, access: Access) -> (common::FileServer, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let cfg = ServerConfig {
        tls: Tls::Require(Arc::new(dir.settings().unwrap())),
        ..ServerConfig::default()
    };
    (
        common::serve_file_to(file.path(), cfg, false, access).await,
        file,
    )
}

/// Opens "f" over TLS with `connector` and reads a block: `Err` with the reason when it cannot.
async fn open(
    srv: &common::FileServer,
    connector: &tokio_rustls::TlsConnector,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (tls, flags) = common::try_starttls(tcp, connector)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut c = Handshake::resume(tls, flags)
        .go("f")
        .await
        .map_err(|e| format!("go: {e}"))?;
    c.read(0, 4096).await.map_err(|e| format!("read: {e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused_and_others_get_in() {
    let root = ca("client CA", |_| {}, None);
    let dir = ServerDir::new(&[&root.cert]);
    let (revoked, revoked_key) = client(&root, "writer-1", &[], 1001);
    let (kept, kept_key) = client(&root, "writer-2", &[], 1002);
    let crl = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2025, 1, 1),
        next_update: rcgen::date_time_ymd(2090, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(1001u64),
            revocation_time: rcgen::date_time_ymd(2025, 6, 1),
            reason_code: None,
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&root.cert, &root.key)
    .unwrap();
    std::fs::write(dir.path().join("ca-crl.pem"), crl.pem().unwrap()).unwrap();
    let (srv, _file) = serve(&dir, Access::Anyone).await;
    let refused = open(&srv, &dir.connector(&[&revoked], &revoked_key)).await;
    assert!(refused.is_err(), "a revoked certificate opened the export");
    open(&srv, &dir.connector(&[&kept], &kept_key))
        .await
        .expect("a certificate the list does not name is refused");

    // A revocation list file that holds no list refuses the start instead of being ignored.
    std::fs::write(dir.path().join("ca-crl.pem"), "not a list\n").unwrap();
    let e = dir.settings().unwrap_err().to_string();
    assert!(e.contains("ca-crl.pem"), "{e}");
}

#[test]
fn ca_certificates_that_may_not_sign_are_refused_at_start() {
    let not_ca = ca("leaf as CA", |p| p.is_ca = IsCa::ExplicitNoCa, None);
    let e = ServerDir::new(&[&not_ca.cert])
        .settings()
        .unwrap_err()
        .to_string();
    assert!(e.contains("CA:FALSE") && e.contains("ca-cert.pem"), "{e}");
    let no_sign = ca(
        "no keyCertSign",
        |p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature],
        None,
    );
    let e = ServerDir::new(&[&no_sign.cert])
        .settings()
        .unwrap_err()
        .to_string();
    assert!(e.contains("keyCertSign"), "{e}");
    // One good CA beside a bad one does not make the file acceptable.
    let good = ca("good", |_| {}, None);
    assert!(ServerDir::new(&[&good.cert, &not_ca.cert])
        .settings()
        .is_err());
    assert!(ServerDir::new(&[&good.cert]).settings().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_to_an_expired_ca_or_past_its_path_length_is_refused() {
    // A CA whose validity ended: webpki does not check a trust anchor's dates, GnuTLS does.
    let expired = ca(
        "expired CA",
        |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        },
        None,
    );
    let dir = ServerDir::new(&[&expired.cert]);
    let (cert, key) = client(&expired, "writer-1", &[], 1);
    let (srv, _file) = serve(&dir, Access::Anyone).await;
    let e = open(&srv, &dir.connector(&[&cert], &key)).await;
    assert!(e.is_err(), "a chain to an expired CA was trusted");

    // pathlen:0 allows no intermediate CA below the root; pathlen:1 allows one.
    for (path_len, admitted) in [(0u8, false), (1, true)] {
        let root = ca(
            "root",
            |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len)),
            None,
        );
        let inter = ca("intermediate", |_| {}, Some(&root));
        let dir = ServerDir::new(&[&root.cert]);
        let (cert, key) = client(&inter, "writer-1", &[], 2);
        let (srv, _file) = serve(&dir, Access::Anyone).await;
        let got = open(&srv, &dir.connector(&[&cert, &inter.cert.pem()], &key)).await;
        assert_eq!(got.is_ok(), admitted, "pathlen:{path_len}: {got:?}");
        // An intermediate that carries the root's own name is still an intermediate.
        let namesake = ca("root", |_| {}, Some(&root));
        let (cert, key) = client(&namesake, "writer-3", &[], 4);
        let got = open(&srv, &dir.connector(&[&cert, &namesake.cert.pem()], &key)).await;
        assert_eq!(
            got.is_ok(),
            admitted,
            "pathlen:{path_len}, intermediate named as the root: {got:?}"
        );
        // Directly under the root, the client is admitted either way.
        let (direct, direct_key) = client(&root, "writer-2", &[], 3);
        open(&srv, &dir.connector(&[&direct], &direct_key))
            .await
            .unwrap_or_else(|e| panic!("pathlen:{path_len}, no intermediate: {e}"));
    }
}

/// Six intermediate CAs between a client and the CA are admitted; seven are refused (the verifier's limit,
/// as `crates/nbd/README.md` says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_up_to_six_intermediate_cas_is_admitted_and_a_longer_one_refused() {
    let root = ca("root", |_| {}, None);
    let dir = ServerDir::new(&[&root.cert]);
    let (srv, _file) = serve(&dir, Access::Anyone).await;
    let mut chain: Vec<Ca> = Vec::new();
    for depth in 1..=7usize {
        let inter = ca(
            &format!("intermediate {depth}"),
            |_| {},
            chain.last().or(Some(&root)),
        );
        chain.push(inter);
        let (cert, key) = client(chain.last().unwrap(), "writer-1", &[], depth as u64);
        let pems: Vec<String> = chain.iter().rev().map(|c| c.cert.pem()).collect();
        let mut presented: Vec<&str> = vec![&cert];
        presented.extend(pems.iter().map(String::as_str));
        let got = open(&srv, &dir.connector(&presented, &key)).await;
        assert_eq!(got.is_ok(), depth <= 6, "{depth} intermediate CAs: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_match_ignoring_letter_case_and_sessions_show_the_name_that_was_admitted() {
    let root = ca("client CA", |_| {}, None);
    let dir = ServerDir::new(&[&root.cert]);
    let (srv, _file) = serve(
        &dir,
        Access::Clients(vec!["writer.example.com".into(), "writer-3".into()]),
    )
    .await;
    // Admitted by its second name, a DNS name in other letter case; the first (its common name) is not on
    // the list, so the session shows the name that matched.
    let (cert, key) = client(&root, "someone-else", &["Writer.Example.COM"], 1);
    let connector = dir.connector(&[&cert], &key);
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (tls, flags) = common::starttls(tcp, &connector).await;
    let mut c = Handshake::resume(tls, flags).go("f").await.unwrap();
    c.read(0, 4096).await.unwrap();
    let identities = srv.registry.get("f").unwrap().counters.identities;
    assert_eq!(identities, vec![Some("Writer.Example.COM".to_string())]);
    // A common name in other letter case matches too; a name that only contains a listed one does not.
    let (cert, key) = client(&root, "WRITER-3", &[], 2);
    open(&srv, &dir.connector(&[&cert], &key)).await.unwrap();
    let (cert, key) = client(&root, "writer-30", &[], 3);
    assert!(open(&srv, &dir.connector(&[&cert], &key)).await.is_err());
}

#[test]
fn an_encrypted_server_key_is_refused_naming_the_cause() {
    let root = ca("client CA", |_| {}, None);
    let dir = ServerDir::new(&[&root.cert]);
    std::fs::write(
        dir.path().join("server-key.pem"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = dir.settings().unwrap_err().to_string();
    assert!(e.contains("is encrypted"), "{e}");
}

#[test]
fn nbd_serve_refuses_an_access_list_without_verified_clients() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nbd-serve"))
        .args(["--listen", "127.0.0.1:0", "--allow", "f=writer-1"])
        .arg(format!("f={}", file.path().display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nbd-serve started serving an export that nobody could open");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow needs --tls-verify-peer"), "{err}");
    assert!(out.stdout.is_empty(), "it must not say it listens");
}
