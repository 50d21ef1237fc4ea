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
        let key = PrivateKeyDer::from_pem_file(dir.join(SERVER_KEY))
            .map_err(|e| tls_err(dir, "cannot read the server key server-key.pem", e))?;
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
                        "--tls-verify-peer needs the client CA certificate ca-cert.pem",
                        e,
                    )
                })?;
            for ca in cas {
                roots
                    .add(ca)
                    .map_err(|e| tls_err(dir, "ca-cert.pem is not a usable CA certificate", e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| tls_err(dir, "cannot build the client certificate verifier", e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            tls_err(
                dir,
                "server-cert.pem and server-key.pem do not form a usable pair",
                e,
            )
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
            Access::Clients(allowed) => {
                identity.is_some_and(|id| id.names.iter().any(|n| allowed.iter().any(|a| a == n)))
            }
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
