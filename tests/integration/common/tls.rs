//! Certificates made per run (rcgen), TLS clients that trust them, and a TLS ERP: a rustls server
//! that requires a client certificate and forwards what it decrypts to the sandbox.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use time::{Duration as TimeDuration, OffsetDateTime};

/// A certificate authority of the test's own.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Issued {
    /// Write `NAME.pem` and `NAME.key` into `dir`; returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, &self.cert).unwrap();
        std::fs::write(&key, &self.key).unwrap();
        (cert, key)
    }

    /// The client identity reqwest presents (certificate chain and key, PEM).
    pub fn identity(&self) -> reqwest::Identity {
        reqwest::Identity::from_pem(format!("{}{}", self.cert, self.key).as_bytes()).unwrap()
    }
}

/// What to put in an issued certificate.
pub struct Leaf<'a> {
    pub cn: &'a str,
    pub dns: &'a [&'a str],
    pub uris: &'a [&'a str],
    pub client: bool,
    /// Validity relative to now, in days.
    pub from_days: i64,
    pub to_days: i64,
}

impl<'a> Leaf<'a> {
    pub fn server(dns: &'a [&'a str]) -> Self {
        Leaf { cn: dns[0], dns, uris: &[], client: false, from_days: -1, to_days: 30 }
    }

    pub fn client(cn: &'a str) -> Self {
        Leaf { cn, dns: &[], uris: &[], client: true, from_days: -1, to_days: 30 }
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    pub fn issue(&self, leaf: &Leaf<'_>) -> Issued {
        let mut params =
            CertificateParams::new(leaf.dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for uri in leaf.uris {
            params.subject_alt_names.push(SanType::URI(uri.to_string().try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, leaf.cn);
        let now = OffsetDateTime::now_utc();
        params.not_before = now + TimeDuration::days(leaf.from_days);
        params.not_after = now + TimeDuration::days(leaf.to_days);
        params.extended_key_usages = vec![if leaf.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued { cert: cert.pem(), key: key.serialize_pem() }
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// A client that trusts `ca` (and nothing else), optionally presenting `identity`.
pub fn client(ca: &Ca, identity: Option<&Issued>) -> reqwest::Client {
    super::install_tls_provider();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .timeout(std::time::Duration::from_secs(10));
    if let Some(id) = identity {
        builder = builder.identity(id.identity());
    }
    builder.build().unwrap()
}

/// The SHA-256 fingerprint of the leaf certificate `host:port` serves for `sni` (through
/// `openssl s_client`), lower-case hex without colons.
pub fn served_fingerprint(port: u16, sni: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {sni} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().rsplit('=').next().unwrap_or("").replace(':', "").to_ascii_lowercase()
}

pub fn fingerprint(pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    hex::encode(sha2::Sha256::digest(&der))
}

/// A TLS ERP in front of the sandbox: TLS with `server`, a client certificate from `client_ca`
/// required, then the decrypted bytes forwarded to `backend`. Counts what it saw.
pub struct TlsErp {
    pub port: u16,
    /// Connections whose first byte was not a TLS handshake record: plaintext.
    pub plaintext: Arc<AtomicU64>,
    pub handshakes_ok: Arc<AtomicU64>,
    pub handshakes_failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsErp {
    pub async fn start(server: &Issued, client_ca: &Ca, backend: std::net::SocketAddr) -> TlsErp {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        super::install_tls_provider();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server.cert.as_bytes()).map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(client_ca.pem.as_bytes()).unwrap()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (plaintext, ok, failed) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counters = (plaintext.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let (plaintext, ok, failed) = counters.clone();
                tokio::spawn(async move {
                    // A connection that closes without a byte (a reachability probe) sent nothing.
                    let mut first = [0u8; 1];
                    match tcp.peek(&mut first).await {
                        Ok(1) if first[0] != 0x16 => {
                            plaintext.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(1) => {}
                        _ => return,
                    }
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    ok.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        TlsErp { port, plaintext, handshakes_ok: ok, handshakes_failed: failed, task }
    }
}

impl Drop for TlsErp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A ClientHello offering `legacy_version` only (no supported_versions extension: how TLS 1.0
/// and 1.1 clients ask) with `suites` (pass many for a hostile hello); split into records of at
/// most 16 KiB as TLS allows.
pub fn client_hello(legacy_version: [u8; 2], suites: &[u16]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(legacy_version);
    body.extend([7u8; 32]); // random
    body.push(0); // session id
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]); // compression: null
    let mut handshake = vec![1u8];
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut records = Vec::new();
    for chunk in handshake.chunks(16_384) {
        records.extend([0x16, 3, 1]);
        records.extend((chunk.len() as u16).to_be_bytes());
        records.extend(chunk);
    }
    records
}

/// A TLS 1.0/1.1 client's hello with the suites such clients offered.
pub fn legacy_client_hello(version: [u8; 2], _records: usize) -> Vec<u8> {
    client_hello(version, &[0x002f, 0x0035, 0xc013, 0xc014, 0x000a])
}

/// Send `bytes` to `port` and read what comes back within two seconds (empty: closed).
pub async fn raw_handshake(port: u16, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut answer = vec![0u8; 4096];
    match tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut answer)).await {
        Ok(Ok(n)) => answer.truncate(n),
        _ => answer.clear(),
    }
    answer
}

/// Whether the server answered with a ServerHello (accepted the hello).
pub fn is_server_hello(answer: &[u8]) -> bool {
    answer.len() > 5 && answer[0] == 0x16 && answer[5] == 0x02
}

/// A TLS connection to the gateway, trusting `ca`, naming `sni`.
pub async fn connect(
    port: u16,
    ca: &Ca,
    sni: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    handshake(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap(), ca, sni).await
}

/// TLS over an open connection (after a PROXY header, say).
pub async fn handshake(
    tcp: tokio::net::TcpStream,
    ca: &Ca,
    sni: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    handshake_alpn(tcp, ca, sni, b"http/1.1").await
}

/// A TLS connection to the gateway asking for one application protocol (`h2`, say).
pub async fn connect_alpn(
    port: u16,
    ca: &Ca,
    sni: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    handshake_alpn(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap(), ca, sni, alpn).await
}

async fn handshake_alpn(
    tcp: tokio::net::TcpStream,
    ca: &Ca,
    sni: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    super::install_tls_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector.connect(rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap(), tcp).await.unwrap()
}

/// Records the OCSP response the server staples, after verifying its certificate as usual.
#[derive(Debug)]
struct OcspRecorder {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    stapled: std::sync::Mutex<Vec<u8>>,
}

impl rustls::client::danger::ServerCertVerifier for OcspRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.stapled.lock().unwrap() = ocsp_response.to_vec();
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The OCSP response stapled to the certificate served for `sni` (empty when none is), from a
/// handshake of the given TLS version that verifies the certificate against `ca`.
pub async fn stapled_ocsp(
    port: u16,
    ca: &Ca,
    sni: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    super::install_tls_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let recorder = Arc::new(OcspRecorder {
        inner: rustls::client::WebPkiServerVerifier::builder(Arc::new(roots)).build().unwrap(),
        stapled: Default::default(),
    });
    let config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector.connect(rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap(), tcp).await.unwrap();
    let stapled = recorder.stapled.lock().unwrap().clone();
    stapled
}
