//! TLS toward callers: certificates loaded and checked at configuration load, served by SNI
//! and swapped in place when a reload re-reads them (new handshakes get the new ones, open
//! connections keep theirs); client certificates verified against a CA bundle, required or
//! optional per listener, with the verified identity handed to the `mtls` policy.
//!
//! Protocols and ciphers are rustls's (TLS 1.2 and 1.3 only, AEAD suites with forward secrecy
//! only, no renegotiation), with ring as the one crypto provider.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sha2::Digest;
use std::any::Any;
use std::path::Path;
use std::sync::Arc;

/// Largest PEM file read (a chain of a few certificates is a few KB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// At most this many names of each kind are kept from a client certificate, each at most
/// [`MAX_NAME_BYTES`]: a certificate is the client's input.
const MAX_NAMES: usize = 32;
const MAX_NAME_BYTES: usize = 256;

fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("{what} {}: larger than {MAX_PEM_BYTES} bytes", path.display()));
    }
    Ok(bytes)
}

/// Every certificate of a PEM file, in order.
pub fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_bounded(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in the file (PEM, BEGIN CERTIFICATE)",
            path.display()
        ));
    }
    Ok(certs)
}

pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_bounded(path, "key")?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("key {}: no private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}", path.display()))
}

/// A CA bundle as trust roots.
pub fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path, what)? {
        roots.add(cert).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// One served certificate with the names it answers SNI for.
#[derive(Debug)]
pub struct ServedCertificate {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names of the leaf's subjectAltName (`*.example.com` included as written).
    pub names: Vec<String>,
    /// The leaf's notAfter, seconds since the epoch.
    pub not_after: i64,
    pub fingerprint: String,
}

/// Load and check a certificate chain and its key (and an OCSP response to staple).
pub fn load_certificate(cert: &Path, key: &Path, ocsp: Option<&Path>) -> Result<ServedCertificate, String> {
    let chain = read_certificates(cert, "certificate")?;
    let private = read_private_key(key)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| format!("key {}: {e}", key.display()))?;
    let leaf = chain[0].clone();
    let mut certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        format!("key {} does not belong to the certificate {}", key.display(), cert.display())
    })?;
    if let Some(path) = ocsp {
        certified.ocsp = Some(read_bounded(path, "ocsp")?);
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| format!("certificate {}: {e}", cert.display()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    Ok(ServedCertificate {
        key: Arc::new(certified),
        names,
        not_after: parsed.validity().not_after.timestamp(),
        fingerprint: fingerprint(&leaf),
    })
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

/// The certificates of one listener, the first one the default (no SNI, or a name none has).
#[derive(Debug)]
pub struct Certificates(pub Vec<ServedCertificate>);

impl Certificates {
    pub fn for_name(&self, sni: Option<&str>) -> Option<&ServedCertificate> {
        let found = sni.map(|n| n.to_ascii_lowercase()).and_then(|name| {
            let exact = self.0.iter().find(|c| c.names.contains(&name));
            exact.or_else(|| {
                let parent = name.split_once('.').map(|(_, p)| p)?;
                self.0.iter().find(|c| c.names.iter().any(|n| n.strip_prefix("*.") == Some(parent)))
            })
        });
        found.or(self.0.first())
    }
}

/// Serves the listener's certificates by SNI; `update` swaps them for the next handshakes.
#[derive(Debug)]
pub struct CertResolver(ArcSwap<Certificates>);

impl CertResolver {
    pub fn new(certs: Arc<Certificates>) -> Self {
        CertResolver(ArcSwap::new(certs))
    }

    pub fn update(&self, certs: Arc<Certificates>) {
        self.0.store(certs);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().for_name(hello.server_name()).map(|c| c.key.clone())
    }
}

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// A client without a valid certificate from the CA bundle is refused in the handshake.
    Required,
    /// The handshake takes any certificate or none; the `mtls` policy of a route decides (401).
    Optional,
}

/// Verifies client certificates against a CA bundle that a reload can swap.
#[derive(Debug)]
pub struct ClientVerifier {
    mode: ClientAuthMode,
    webpki: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

fn webpki(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder(roots)
        .build()
        .map_err(|e| e.to_string())
        .map(|v| v as Arc<dyn ClientCertVerifier>)
}

impl ClientVerifier {
    pub fn new(mode: ClientAuthMode, roots: Arc<RootCertStore>) -> Result<Self, String> {
        Ok(ClientVerifier { mode, webpki: ArcSwap::from_pointee(webpki(roots)?) })
    }

    pub fn update(&self, roots: Arc<RootCertStore>) -> Result<(), String> {
        self.webpki.store(Arc::new(webpki(roots)?));
        Ok(())
    }

    /// Chain, validity and CA check of a presented certificate.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        self.webpki.load().verify_client_cert(end_entity, intermediates, UnixTime::now()).map(|_| ())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mode == ClientAuthMode::Required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the bundle can change under a reload, and clients send the one
        // certificate they were given.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.mode {
            ClientAuthMode::Required => {
                self.check(end_entity, intermediates).map(|_| ClientCertVerified::assertion())
            }
            // Optional: the handshake completes and the identity records why the certificate
            // is not accepted, so a route's `mtls` policy can answer with a problem.
            ClientAuthMode::Optional => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Possession of the certificate's key is always proven, whatever the mode.
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// What a client certificate says, recorded when the handshake completes; the `mtls` policy
/// maps it to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientIdentity {
    /// Why the certificate is not one the CA bundle vouches for (only on a listener where
    /// client certificates are optional; a required one refuses it in the handshake).
    pub verified: Result<(), CertProblem>,
    pub subject_cn: Option<String>,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub emails: Vec<String>,
    /// SHA-256 of the leaf, lower-case hex.
    pub fingerprint: String,
}

impl ClientIdentity {
    pub fn from_der(der: &[u8], verified: Result<(), CertProblem>) -> Self {
        let bounded = |s: &str| -> String {
            let mut end = s.len().min(MAX_NAME_BYTES);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        };
        let mut identity = ClientIdentity {
            verified,
            subject_cn: None,
            dns: Vec::new(),
            uris: Vec::new(),
            emails: Vec::new(),
            fingerprint: fingerprint(der),
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            identity.verified = Err(CertProblem::Unreadable);
            return identity;
        };
        identity.subject_cn =
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(bounded);
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            use x509_parser::extensions::GeneralName;
            for name in &san.value.general_names {
                let (list, value) = match name {
                    GeneralName::DNSName(v) => (&mut identity.dns, v),
                    GeneralName::URI(v) => (&mut identity.uris, v),
                    GeneralName::RFC822Name(v) => (&mut identity.emails, v),
                    _ => continue,
                };
                if list.len() < MAX_NAMES {
                    list.push(bounded(value));
                }
            }
        }
        identity
    }
}

/// Records the client certificate's identity on the connection (pingora's handshake hook); the
/// proxy reads it from the session's TLS digest.
pub struct IdentityRecorder {
    pub verifier: Arc<ClientVerifier>,
}

#[async_trait]
impl TlsAccept for IdentityRecorder {
    async fn handshake_complete_callback(&self, tls: &TlsRef) -> Option<Arc<dyn Any + Send + Sync>> {
        let chain = tls.peer_cert_chain_der()?;
        let (leaf, intermediates) = chain.split_first()?;
        let verified = self.verifier.check(leaf, intermediates).map_err(|e| CertProblem::of(&e));
        Some(Arc::new(ClientIdentity::from_der(leaf, verified)))
    }
}

/// Why a client certificate is not accepted: a bounded set (a metrics label, a problem reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    Expired,
    NotValidYet,
    UnknownIssuer,
    Revoked,
    /// Wrong key usage, a bad signature, an unreadable certificate...
    Unreadable,
}

impl CertProblem {
    fn of(e: &rustls::Error) -> Self {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => CertProblem::Expired,
            rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                CertProblem::NotValidYet
            }
            rustls::Error::InvalidCertificate(C::UnknownIssuer) => CertProblem::UnknownIssuer,
            rustls::Error::InvalidCertificate(C::Revoked) => CertProblem::Revoked,
            _ => CertProblem::Unreadable,
        }
    }
}

/// The TLS state of one listener that outlives a configuration: its certificate resolver and
/// client verifier, built once at start and updated in place when a reload re-reads the files.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub resolver: Arc<CertResolver>,
    pub verifier: Option<Arc<ClientVerifier>>,
}

impl ListenerTls {
    pub fn new(
        certs: Arc<Certificates>,
        client_auth: Option<(ClientAuthMode, Arc<RootCertStore>)>,
    ) -> Result<Self, String> {
        let verifier = match client_auth {
            Some((mode, roots)) => Some(Arc::new(ClientVerifier::new(mode, roots)?)),
            None => None,
        };
        Ok(ListenerTls { resolver: Arc::new(CertResolver::new(certs)), verifier })
    }

    /// New certificates (and CA bundle) for the next handshakes. A change of client
    /// certificate mode takes a restart.
    pub fn update(
        &self,
        certs: Arc<Certificates>,
        client_auth: Option<&(ClientAuthMode, Arc<RootCertStore>)>,
    ) {
        self.resolver.update(certs);
        if let (Some(verifier), Some((_, roots))) = (&self.verifier, client_auth) {
            if let Err(e) = verifier.update(roots.clone()) {
                tracing::error!(error = %e, "client CA bundle not applied; the previous one stays");
            }
        }
    }
}
