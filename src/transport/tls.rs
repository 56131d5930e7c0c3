//! TLS (RFC 3261 §26.2.1, RFC 5922 §7): the rustls server side of `tls:` listeners and the
//! client side of connections we open. Built once from the `[tls]` table's files; the
//! handshakes themselves run in [`super::tcp`] and [`super::connect`].
//!
//! Server names (RFC 5922 §4): a connection we open is verified against the host of the hop
//! it was opened for (the Request-URI's or the next hop's host, before resolution), which the
//! layer that resolved it leaves in [`super::Transports::set_tls_name`]; without one, the
//! certificate must name the IP address itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::warn;

/// What the `[tls]` table says, with paths as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Our certificate chain (PEM), leaf first: presented by `tls:` listeners, and to servers
    /// that ask for a client certificate.
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub private_key: Option<PathBuf>,
    /// Roots for verifying the servers we connect to; `None` = the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Verify the certificate of the servers we connect to (name and chain).
    pub verify_server: bool,
    /// A handshake (either side) must complete within this.
    pub handshake_timeout: Duration,
}

/// A `[tls]` setting that cannot be used; `key` is the dotted config key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsSetupError {
    pub key: &'static str,
    pub reason: String,
}

fn setup_error(key: &'static str, reason: impl Into<String>) -> TlsSetupError {
    TlsSetupError {
        key,
        reason: reason.into(),
    }
}

/// The built TLS sides.
#[derive(Clone)]
pub struct Tls {
    /// For `tls:` listeners; `None` without a certificate.
    pub(super) acceptor: Option<TlsAcceptor>,
    pub(super) connector: TlsConnector,
    pub(super) handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server", &self.acceptor.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// The *ring* backend (the dependency chosen for #13: pure Rust and C, no cmake). rustls
/// 0.23.48 deprecates it for lacking post-quantum key exchange; SIP peers do not offer
/// that yet, and classic X25519/P-256 stay the defaults here.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

/// Reads a certificate chain (at least one certificate).
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| setup_error(key, format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_error(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(setup_error(
            key,
            format!("{}: no PEM CERTIFICATE in the file", path.display()),
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        setup_error(
            "tls.private_key",
            format!("{}: {e} (a PEM private key is expected)", path.display()),
        )
    })
}

impl TlsSettings {
    /// Reads the files and builds both sides. `system_roots` is asked for the roots when no
    /// `ca_file` is given (and only then); `None` from it means "not loaded" (a
    /// configuration check). An empty set is a warning, not an error: servers cannot be
    /// verified then, so connections to them fail (and are reported).
    pub fn build(
        &self,
        system_roots: impl FnOnce() -> Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Tls, TlsSetupError> {
        let provider = provider();
        let ours = match (&self.certificate, &self.private_key) {
            (Some(c), Some(k)) => Some((load_certs("tls.certificate", c)?, load_key(k)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(setup_error(
                    "tls.private_key",
                    "is required with tls.certificate",
                ));
            }
            (None, Some(_)) => {
                return Err(setup_error(
                    "tls.certificate",
                    "is required with tls.private_key",
                ));
            }
        };
        let acceptor = match &ours {
            Some((certs, key)) => {
                let server = ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| setup_error("tls", e.to_string()))?
                    .with_no_client_auth()
                    .with_single_cert(certs.clone(), key.clone_key())
                    .map_err(|e| {
                        setup_error(
                            "tls.private_key",
                            format!("does not fit tls.certificate: {e}"),
                        )
                    })?;
                Some(TlsAcceptor::from(Arc::new(server)))
            }
            None => None,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup_error("tls", e.to_string()))?;
        let builder = if self.verify_server {
            let (roots, checking) = match &self.ca_file {
                Some(path) => (load_certs("tls.ca_file", path)?, false),
                None => match system_roots() {
                    Some(roots) => (roots, false),
                    None => (Vec::new(), true),
                },
            };
            let mut store = RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(roots);
            if added == 0 {
                if let Some(path) = &self.ca_file {
                    return Err(setup_error(
                        "tls.ca_file",
                        format!("{}: no usable CA certificate", path.display()),
                    ));
                }
                if !checking {
                    warn!(
                        "no system CA certificates found: TLS servers cannot be verified (set tls.ca_file)"
                    );
                }
            }
            builder.with_root_certificates(store)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
        };
        let client = match ours {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| setup_error("tls.certificate", e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Tls {
            acceptor,
            connector: TlsConnector::from(Arc::new(client)),
            handshake_timeout: self.handshake_timeout,
        })
    }
}

/// The system's roots (`rustls-native-certs`); files it cannot read are logged.
pub fn system_roots() -> Option<Vec<CertificateDer<'static>>> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        warn!(%error, "reading the system CA certificates");
    }
    Some(found.certs)
}

/// The name a connection to `dest` is verified against: the hop's host name, else the IP.
pub(super) fn server_name(name: Option<&str>, dest: std::net::SocketAddr) -> ServerName<'static> {
    name.and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(dest.ip().into()))
}

/// `tls.verify_server = false`: any certificate is accepted (the handshake's signatures
/// are still checked, so the peer holds the key of the certificate it showed).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> TlsSettings {
        TlsSettings {
            certificate: Some(dir.join("cert.pem")),
            private_key: Some(dir.join("key.pem")),
            ca_file: None,
            verify_server: true,
            handshake_timeout: Duration::from_secs(5),
        }
    }

    fn write_pair(dir: &Path) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["sip.example.net".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sipedge-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn builds_both_sides_from_pem_files() {
        let d = tempdir("ok");
        write_pair(&d);
        let tls = settings(&d).build(|| Some(Vec::new())).unwrap();
        assert!(tls.acceptor.is_some());
        // A CA file of the same self-signed certificate is a usable root.
        let mut s = settings(&d);
        s.ca_file = Some(d.join("cert.pem"));
        s.build(|| panic!("system roots are not read when tls.ca_file is set"))
            .unwrap();
    }

    #[test]
    fn errors_name_the_key_at_fault() {
        let d = tempdir("bad");
        write_pair(&d);
        let mut s = settings(&d);
        s.certificate = Some(d.join("missing.pem"));
        assert_eq!(s.build(|| None).unwrap_err().key, "tls.certificate");
        let mut s = settings(&d);
        s.private_key = Some(d.join("cert.pem"));
        assert_eq!(s.build(|| None).unwrap_err().key, "tls.private_key");
        let mut s = settings(&d);
        s.private_key = None;
        assert_eq!(s.build(|| None).unwrap_err().key, "tls.private_key");
        let mut s = settings(&d);
        s.ca_file = Some(d.join("key.pem"));
        assert_eq!(s.build(|| None).unwrap_err().key, "tls.ca_file");
        // Another key than the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(d.join("other.pem"), other.serialize_pem()).unwrap();
        let mut s = settings(&d);
        s.private_key = Some(d.join("other.pem"));
        assert_eq!(s.build(|| None).unwrap_err().key, "tls.private_key");
    }

    #[test]
    fn server_name_is_the_hop_name_else_the_ip() {
        let dest: std::net::SocketAddr = "192.0.2.7:5061".parse().unwrap();
        assert_eq!(
            server_name(Some("sip.example.net"), dest),
            ServerName::try_from("sip.example.net").unwrap()
        );
        assert_eq!(
            server_name(None, dest),
            ServerName::IpAddress(dest.ip().into())
        );
    }
}
