//! TLS for NBD (NetworkBlockDevice/nbd `doc/proto.md`, "TLS support" and `NBD_OPT_STARTTLS`) with rustls:
//! the server's TLS mode, its certificates in nbdkit's directory layout, the identity of a verified client
//! certificate, and per-export [`Access`] lists over those identities.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::error::NbdError;

/// The CA certificate file of a certificate directory (verifies client certificates).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server certificate chain file of a certificate directory.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server private key file of a certificate directory.
pub const SERVER_KEY: &str = "server-key.pem";
/// The optional certificate revocation lists of a certificate directory (checked with `--tls-verify-peer`).
pub const CA_CRL: &str = "ca-crl.pem";

/// Server TLS settings: certificates, key and whether client certificates are required.
#[derive(Clone)]
pub struct TlsSettings {
    acceptor: TlsAcceptor,
    verify_peer: bool,
    dir: PathBuf,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("dir", &self.dir)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

fn tls_err(
    dir: &Path,
    what: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> NbdError {
    NbdError::TlsConfig {
        what: format!("{what} in {}", dir.display()),
        source: Box::new(source),
    }
}

impl TlsSettings {
    /// Loads `server-cert.pem` and `server-key.pem` from `dir` (nbdkit's `--tls-certificates` layout).
    /// With `verify_peer`, clients must present a certificate signed by `ca-cert.pem` from the same directory.
    pub fn from_dir(dir: &Path, verify_peer: bool) -> Result<Self, NbdError> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join(SERVER_CERT))
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    tls_err(dir, "cannot read the server certificate server-cert.pem", e)
                })?;
        if certs.is_empty() {
            return Err(NbdError::Invalid(format!(
                "{} holds no certificate; put the server's PEM certificate chain there",
                dir.join(SERVER_CERT).display()
            )));
        }
        let key = read_server_key(dir)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(dir, "no usable TLS protocol version", e))?;
        let builder = if verify_peer {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(dir.join(CA_CERT))
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    tls_err(
                        dir,
                        "verifying client certificates (nbd-serve's --tls-verify-peer, the daemon's \
                         nbd_tls_verify_peer) needs the client CA certificate ca-cert.pem",
                        e,
                    )
                })?;
            let mut anchors = Vec::with_capacity(cas.len());
            for ca in cas {
                anchors.push(Anchor::of(&ca).map_err(|why| {
                    NbdError::Invalid(format!(
                        "{} holds a certificate that cannot sign client certificates: {why}; \
                         put only CA certificates there",
                        dir.join(CA_CERT).display()
                    ))
                })?);
                roots
                    .add(ca)
                    .map_err(|e| tls_err(dir, "ca-cert.pem is not a usable CA certificate", e))?;
            }
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let crl_path = dir.join(CA_CRL);
            if crl_path.exists() {
                let crls =
                    rustls::pki_types::CertificateRevocationListDer::pem_file_iter(&crl_path)
                        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| {
                            tls_err(dir, "cannot read the revocation lists ca-crl.pem", e)
                        })?;
                if crls.is_empty() {
                    return Err(NbdError::Invalid(format!(
                        "{} holds no revocation list; put the CA's PEM CRLs there or remove the file",
                        crl_path.display()
                    )));
                }
                // Certificates whose issuer has no list here are not refused for that (GnuTLS's rule).
                verifier = verifier.with_crls(crls).allow_unknown_revocation_status();
            }
            let verifier = verifier.build().map_err(|e| {
                tls_err(
                    dir,
                    "cannot build the client certificate verifier (ca-crl.pem?)",
                    e,
                )
            })?;
            builder.with_client_cert_verifier(Arc::new(AnchorLimits {
                inner: verifier,
                anchors,
            }))
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            let what = match &e {
                rustls::Error::General(m) if m.starts_with("failed to parse") => {
                    "the algorithm or size of the key in server-key.pem is not supported (use RSA \
                     of 2048 bits or more, ECDSA P-256 or P-384, or Ed25519)"
                }
                _ => "server-cert.pem and server-key.pem do not form a usable pair",
            };
            tls_err(dir, what, e)
        })?;
        Ok(TlsSettings {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verify_peer,
            dir: dir.to_path_buf(),
        })
    }

    /// Whether clients must present a certificate signed by the CA.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// Reads `server-key.pem`, saying so when the key is encrypted (the server has no passphrase to open it).
fn read_server_key(dir: &Path) -> Result<PrivateKeyDer<'static>, NbdError> {
    let path = dir.join(SERVER_KEY);
    let text = std::fs::read(&path)
        .map_err(|e| tls_err(dir, "cannot read the server key server-key.pem", e))?;
    let encrypted = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    if encrypted(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || encrypted(b"Proc-Type: 4,ENCRYPTED") {
        return Err(NbdError::Invalid(format!(
            "{} is encrypted and the server has no passphrase for it; store it unencrypted \
             (e.g. `openssl pkey -in KEY -out server-key.pem`), readable only by the server",
            path.display()
        )));
    }
    PrivateKeyDer::from_pem_slice(&text)
        .map_err(|e| tls_err(dir, "cannot read the server key server-key.pem", e))
}

/// What a CA certificate of `ca-cert.pem` allows beyond its name and key, which webpki does not check
/// on trust anchors: its validity period and its path length constraint (GnuTLS, and so nbdkit, checks both).
#[derive(Debug)]
struct Anchor {
    subject: Vec<u8>,
    /// The CA's public key (DER SubjectPublicKeyInfo): a certificate is this CA's only when it verifies.
    key: Vec<u8>,
    not_before: i64,
    not_after: i64,
    path_len: Option<u32>,
}

impl Anchor {
    /// The limits of a CA certificate; an error saying why when the certificate may not sign others
    /// (basic constraints CA:FALSE, or a key usage without keyCertSign).
    fn of(der: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("it cannot be parsed ({e})"))?;
        let subject = cert.subject().to_string();
        let constraints = cert
            .basic_constraints()
            .map_err(|e| format!("{subject}: its basic constraints cannot be parsed ({e})"))?;
        if constraints.as_ref().is_some_and(|c| !c.value.ca) {
            return Err(format!("{subject} is marked CA:FALSE"));
        }
        let usage = cert
            .key_usage()
            .map_err(|e| format!("{subject}: its key usage cannot be parsed ({e})"))?;
        if usage.as_ref().is_some_and(|u| !u.value.key_cert_sign()) {
            return Err(format!("{subject} has a key usage without keyCertSign"));
        }
        Ok(Anchor {
            subject: cert.subject().as_raw().to_vec(),
            key: cert.public_key().raw.to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            path_len: constraints.and_then(|c| c.value.path_len_constraint),
        })
    }
}

impl Anchor {
    /// Whether this CA's key verifies `cert`'s signature.
    fn signed(&self, cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
        use x509_parser::prelude::FromDer;
        x509_parser::x509::SubjectPublicKeyInfo::from_der(&self.key)
            .is_ok_and(|(_, key)| cert.verify_signature(Some(&key)).is_ok())
    }
}

/// A client certificate verifier that also holds each CA of `ca-cert.pem` to its validity period and
/// path length constraint, after webpki has verified the chain.
#[derive(Debug)]
struct AnchorLimits {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    anchors: Vec<Anchor>,
}

/// Why a chain that webpki accepted is refused by [`AnchorLimits`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AnchorRefusal(String);

impl AnchorLimits {
    /// Walks from the client's certificate through the intermediates it sent to a CA of `ca-cert.pem`
    /// (by issuer name) and checks that CA's limits; `Err` with the reason otherwise.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: i64,
    ) -> Result<(), String> {
        fn parse<'a>(
            der: &'a CertificateDer<'_>,
        ) -> Result<x509_parser::certificate::X509Certificate<'a>, String> {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, c)| c)
                .map_err(|e| format!("a certificate of the chain cannot be parsed ({e})"))
        }
        let mut current = parse(end_entity)?;
        for below in 0..=u32::try_from(intermediates.len()).unwrap_or(u32::MAX) {
            let issuer = current.issuer().as_raw();
            // A CA of ca-cert.pem by name and by key: an intermediate may carry a CA's name (and its
            // limits do not apply to it) without its key.
            let mut named = self
                .anchors
                .iter()
                .filter(|a| a.subject == issuer && a.signed(&current))
                .peekable();
            if named.peek().is_some() {
                let mut why = String::new();
                for a in named {
                    if now < a.not_before || now > a.not_after {
                        why = format!("the CA {} is outside its validity period", current.issuer());
                    } else if a.path_len.is_some_and(|max| below > max) {
                        why = format!(
                            "the CA {} allows {} intermediate CAs below it, the chain has {below}",
                            current.issuer(),
                            a.path_len.unwrap_or_default()
                        );
                    } else {
                        return Ok(());
                    }
                }
                return Err(why);
            }
            let next = intermediates
                .iter()
                .map(parse)
                .filter_map(Result::ok)
                .find(|c| c.subject().as_raw() == issuer)
                .ok_or_else(|| format!("no CA of {CA_CERT} issued {}", current.issuer()))?;
            current = next;
        }
        Err("the chain does not end at a CA of ca-cert.pem".to_string())
    }
}

impl rustls::server::danger::ClientCertVerifier for AnchorLimits {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        self.check(end_entity, intermediates, now).map_err(|why| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(AnchorRefusal(why)),
            )))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How the server offers TLS (nbdkit's `--tls=off|on|require`).
#[derive(Clone, Debug, Default)]
pub enum Tls {
    /// No TLS: `NBD_OPT_STARTTLS` is refused.
    #[default]
    Off,
    /// TLS is offered; clients may also negotiate in clear text.
    On(Arc<TlsSettings>),
    /// Nothing but `NBD_OPT_STARTTLS` (and `NBD_OPT_ABORT`) is answered before the TLS handshake.
    Require(Arc<TlsSettings>),
}

impl Tls {
    pub(crate) fn settings(&self) -> Option<&TlsSettings> {
        match self {
            Tls::Off => None,
            Tls::On(s) | Tls::Require(s) => Some(s),
        }
    }

    pub(crate) fn required(&self) -> bool {
        matches!(self, Tls::Require(_))
    }
}

/// Names of a client taken from its verified certificate: the subject's common names, then the DNS,
/// e-mail and URI subject alternative names, in certificate order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub names: Vec<String>,
}

impl ClientIdentity {
    /// The identity in a certificate (DER); `None` when it cannot be parsed or names nobody.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                        names.push((*s).to_string())
                    }
                    _ => {}
                }
            }
        }
        (!names.is_empty()).then_some(ClientIdentity { names })
    }

    /// The name shown for this identity (its first name).
    pub fn primary(&self) -> &str {
        self.names.first().map(String::as_str).unwrap_or("")
    }
}

/// Which clients may see and open an export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// Every client that passed the server's TLS policy.
    #[default]
    Anyone,
    /// Only clients whose verified certificate carries one of these names (common name or subject
    /// alternative name). Clients without a verified certificate never see the export.
    Clients(Vec<String>),
}

impl Access {
    /// Whether a client with `identity` (none without a verified certificate) may list and open the export.
    pub fn permits(&self, identity: Option<&ClientIdentity>) -> bool {
        match self {
            Access::Anyone => true,
            Access::Clients(_) => self.admitted_as(identity).is_some(),
        }
    }

    /// The name under which a client with `identity` is admitted: for [`Access::Clients`] the first of its
    /// names on the list (names are compared ignoring ASCII letter case, as DNS names are), otherwise its
    /// first name; `None` for a client that is refused or has no verified certificate.
    pub fn admitted_as<'a>(&self, identity: Option<&'a ClientIdentity>) -> Option<&'a str> {
        let id = identity?;
        match self {
            Access::Anyone => id.names.first().map(String::as_str),
            Access::Clients(allowed) => id
                .names
                .iter()
                .find(|n| allowed.iter().any(|a| a.eq_ignore_ascii_case(n)))
                .map(String::as_str),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_matches_any_name_and_never_an_anonymous_client() {
        let id = ClientIdentity {
            names: vec!["writer-1".into(), "writer.example".into()],
        };
        assert!(Access::Anyone.permits(None));
        assert!(Access::Anyone.permits(Some(&id)));
        let only = Access::Clients(vec!["writer.example".into()]);
        assert!(only.permits(Some(&id)));
        assert!(!only.permits(None));
        let other = Access::Clients(vec!["writer-2".into()]);
        assert!(!other.permits(Some(&id)));
        assert!(!Access::Clients(vec![]).permits(Some(&id)));
    }
}
