//! TLS toward an ERP (`upstreams.NAME.tls`): the CAs that issue its certificate (a private CA,
//! or the system's roots), a client certificate for ERPs that require one, the name checked and
//! sent in SNI, and whether the certificate is checked at all. One trust configuration, loaded
//! once, serves both ways the gateway reaches the ERP: pingora's pooled connections (proxied
//! routes) and the in-process client (mediated routes and the ERP adapters).

use crate::edge::tls::{read_certificates, read_private_key, read_roots};
use pingora::utils::tls::{CertKey, WrappedX509};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::path::Path;
use std::sync::{Arc, OnceLock};

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// PEM bundle of the CAs that issue the ERP's certificate (an on-premises ERP behind a
    /// private CA); without it, the system's roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured).
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
    /// PEM chain and key of the gateway's client certificate, for ERPs that require one.
    #[serde(default)]
    pub client_cert: Option<Spanned<String>>,
    #[serde(default)]
    pub client_key: Option<Spanned<String>>,
    /// The name sent in SNI and checked against the ERP's certificate (default: the URL's host).
    #[serde(default)]
    pub sni: Option<Spanned<String>>,
    /// Check the ERP's certificate (default). `false` is refused unless
    /// `insecure_skip_verify_acknowledged: true` says so too; it is logged at every start.
    #[serde(default = "default_true")]
    pub verify: bool,
    #[serde(default)]
    pub insecure_skip_verify_acknowledged: bool,
}

fn default_true() -> bool {
    true
}

/// The compiled trust toward one ERP.
pub struct UpstreamTls {
    /// Sent in SNI and checked against the certificate.
    pub sni: String,
    pub verify: bool,
    /// pingora's per-peer roots (`None`: the system's, which pingora loads itself).
    pub ca: Option<Arc<[WrappedX509]>>,
    pub client_cert: Option<Arc<CertKey>>,
    /// The same roots, client certificate and verification for in-process calls.
    pub client_config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("verify", &self.verify)
            .field("private_ca", &self.ca.is_some())
            .field("client_cert", &self.client_cert.is_some())
            .finish()
    }
}

/// The system's roots, loaded once (the way pingora loads them for its own connector).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            pingora::tls::load_platform_certs_incl_env_into_store(&mut roots)
                .map_err(|e| format!("cannot load the system's CA certificates: {e}; set tls.ca_file"))?;
            Ok(Arc::new(roots))
        })
        .clone()
}

/// What went wrong, and at which setting.
pub type TlsError<'a> = (Option<&'a Spanned<String>>, String);

/// Compile `spec` (or the defaults: the system's roots, verified) for an upstream whose URL
/// host is `host`; relative paths are in `dir`.
pub fn compile<'a>(
    spec: Option<&'a UpstreamTlsSpec>,
    host: &str,
    dir: &Path,
) -> Result<UpstreamTls, TlsError<'a>> {
    static DEFAULT: std::sync::LazyLock<UpstreamTlsSpec> =
        std::sync::LazyLock::new(|| UpstreamTlsSpec { verify: true, ..Default::default() });
    let spec = spec.unwrap_or(&DEFAULT);
    if !spec.verify && !spec.insecure_skip_verify_acknowledged {
        return Err((
            None,
            "tls.verify: false sends requests, credentials included, to whoever answers at this address; set `insecure_skip_verify_acknowledged: true` as well if that is really meant, or give the ERP's CA in `ca_file`".into(),
        ));
    }
    let sni = match &spec.sni {
        Some(s) => {
            ServerName::try_from(s.value.as_str())
                .map_err(|_| (Some(s), format!("tls.sni: `{}` is not a host name", s.value)))?;
            s.value.clone()
        }
        None => host.to_string(),
    };
    let (roots, ca) = match &spec.ca_file {
        Some(path) => {
            let file = dir.join(&path.value);
            let certs = read_certificates(&file, "tls.ca_file").map_err(|e| (Some(path), e))?;
            let roots = read_roots(&file, "tls.ca_file").map_err(|e| (Some(path), e))?;
            let wrapped: Vec<WrappedX509> =
                certs.iter().map(|c| WrappedX509::new(c.to_vec(), pingora::utils::tls::parse_x509)).collect();
            (Arc::new(roots), Some(Arc::from(wrapped)))
        }
        None if !spec.verify => (Arc::new(RootCertStore::empty()), None),
        None => (system_roots().map_err(|e| (None, e))?, None),
    };
    let client = match (&spec.client_cert, &spec.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let chain =
                read_certificates(&dir.join(&cert.value), "tls.client_cert").map_err(|e| (Some(cert), e))?;
            let private = read_private_key(&dir.join(&key.value)).map_err(|e| (Some(key), e))?;
            let signing = rustls::crypto::ring::sign::any_supported_type(&private)
                .map_err(|e| (Some(key), format!("tls.client_key: {e}")))?;
            let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
            if certified.keys_match().is_err() {
                return Err((Some(key), "tls.client_key does not belong to tls.client_cert".into()));
            }
            Some((chain, private))
        }
        (Some(c), None) | (None, Some(c)) => {
            return Err((Some(c), "tls: client_cert and client_key go together".into()));
        }
    };
    let builder = rustls::ClientConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS12,
        &rustls::version::TLS13,
    ])
    .with_root_certificates(roots);
    let mut config = match &client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| (spec.client_cert.as_ref(), format!("tls.client_cert: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    if !spec.verify {
        config.dangerous().set_certificate_verifier(Arc::new(NoVerification));
    }
    let client_cert = client.map(|(chain, key)| {
        Arc::new(CertKey::new(chain.iter().map(|c| c.to_vec()).collect(), key.secret_der().to_vec()))
    });
    Ok(UpstreamTls { sni, verify: spec.verify, ca, client_cert, client_config: Arc::new(config) })
}

/// `verify: false` (acknowledged): any certificate; the handshake's signatures are still
/// checked, so the peer holds the key of what it presented.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Why TLS with an ERP failed, in words an operator can act on, when `error` (or what caused
/// it) is a TLS failure; `None` for anything else.
pub fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        // An io::Error's `source()` skips the error it wraps, and pingora's errors keep their
        // cause in a field: follow both by hand.
        let pingora_error =
            e.downcast_ref::<pingora::Error>().or_else(|| e.downcast_ref::<pingora::BError>().map(|b| &**b));
        next = if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static))
        } else if let Some(p) = pingora_error {
            p.cause.as_deref().map(|c| c as &(dyn std::error::Error + 'static))
        } else {
            e.source()
        };
    }
    None
}

fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "certificate verification failed: the ERP's certificate is not issued by a CA the gateway trusts".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "certificate verification failed: the ERP's certificate does not name the host the gateway asked for".into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "certificate verification failed: the ERP's certificate has expired".into()
        }
        E::InvalidCertificate(other) => format!("certificate verification failed: {other:?}"),
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied) => {
            format!("the ERP refused the gateway's client certificate ({e})")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_found_in_error_chains_and_described() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper-rustls hands it over: an io::Error wrapping an io::Error wrapping rustls's.
        let io = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, inner));
        let why = tls_failure(&io).unwrap();
        assert!(why.contains("not issued by a CA the gateway trusts"), "{why}");
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(tls_failure(&refused).unwrap().contains("client certificate"));
        assert_eq!(tls_failure(&std::io::Error::other("connection refused")), None);
    }

    #[test]
    fn turning_verification_off_must_be_acknowledged() {
        let spec = UpstreamTlsSpec { verify: false, ..Default::default() };
        let err = compile(Some(&spec), "erp.internal", Path::new(".")).unwrap_err();
        assert!(err.1.contains("insecure_skip_verify_acknowledged"), "{}", err.1);
        let spec =
            UpstreamTlsSpec { verify: false, insecure_skip_verify_acknowledged: true, ..Default::default() };
        let tls = compile(Some(&spec), "erp.internal", Path::new(".")).unwrap();
        assert!(!tls.verify);
        assert_eq!(tls.sni, "erp.internal");
    }
}
