//! `listen:` of causeway.yaml: the proxy's plain and TLS listeners, client certificates, the
//! PROXY protocol, trusted proxies, and the operations listeners; compiled with every
//! certificate and key loaded and checked, so a bad file is a `check` error, not a failed start.

use super::{Diagnostics, Env};
use crate::edge::client_addr::{Cidrs, ForwardedHeader};
use crate::edge::tls::{self, Certificates, ClientAuthMode};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    /// Address of the plain-HTTP proxy listener, e.g. `127.0.0.1:8080`; for a TLS-terminating
    /// load balancer in front, or local use. Optional when `tls` listeners are set.
    #[serde(default)]
    pub proxy: Option<Spanned<String>>,
    /// `/healthz`, `/readyz` and the admin API.
    pub admin: Spanned<String>,
    /// Prometheus exposition at `/metrics`.
    pub metrics: Spanned<String>,
    /// Bytes of read buffer per downstream connection (pingora's default is 64 KiB; a small
    /// buffer keeps idle keep-alive connections cheap, larger bodies are read in several calls).
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: usize,
    /// A request header must arrive whole within this time (from accept for a new connection,
    /// from its first byte on a keep-alive one); slower clients are closed (slow-header defence).
    #[serde(default = "default_header_timeout_ms")]
    pub client_header_timeout_ms: u64,
    /// Largest request header accepted, in bytes (400 above it).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most request header fields accepted (400 above it).
    #[serde(default = "default_max_header_fields")]
    pub max_header_fields: usize,
    /// HTTP/2 without TLS (prior knowledge) on the plain listener, besides HTTP/1.1.
    #[serde(default)]
    pub h2c: bool,
    /// The plain listener expects a PROXY protocol header (v1 or v2) on every connection.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// TLS listeners.
    #[serde(default)]
    pub tls: Vec<Spanned<TlsListenerSpec>>,
    /// Load balancers and proxies in front of the gateway (addresses or CIDRs): only their
    /// forwarding headers and PROXY protocol headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// The header those proxies write: `x-forwarded-for` (default) or `forwarded`.
    #[serde(default)]
    pub client_address_header: ForwardedHeader,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerSpec {
    /// Address, e.g. `0.0.0.0:8443`.
    pub address: Spanned<String>,
    /// Certificate chains and keys (PEM); the first is served when the client names no host
    /// (SNI) or one no certificate lists.
    pub certificates: Vec<CertificateSpec>,
    /// Offer HTTP/2 (ALPN `h2`) besides HTTP/1.1.
    #[serde(default = "default_true")]
    pub http2: bool,
    /// Expect a PROXY protocol header before each TLS handshake.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Ask clients for certificates issued by `ca`.
    #[serde(default)]
    pub client_certificates: Option<ClientCertificatesSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// PEM chain, leaf first; paths are relative to the configuration directory.
    pub cert: Spanned<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Spanned<String>,
    /// A DER OCSP response to staple (refreshed by whatever renews it; re-read on reload).
    #[serde(default)]
    pub ocsp: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificatesSpec {
    /// `required`: refused in the handshake without a valid certificate; `optional`: the
    /// routes' `mtls` policies decide.
    pub mode: ClientAuthMode,
    /// PEM bundle of the CAs that issue client certificates.
    pub ca: Spanned<String>,
}

/// The compiled listeners.
#[derive(Debug, Clone)]
pub struct Listen {
    pub proxy: Option<String>,
    pub admin: String,
    pub metrics: String,
    pub read_buffer_bytes: usize,
    pub client_header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_header_fields: usize,
    pub h2c: bool,
    pub proxy_protocol: bool,
    pub tls: Vec<TlsListener>,
    pub trusted_proxies: Cidrs,
    pub client_address_header: ForwardedHeader,
}

impl Listen {
    /// Every address the proxy listens on, plain first.
    pub fn proxy_addresses(&self) -> Vec<&str> {
        self.proxy.iter().map(String::as_str).chain(self.tls.iter().map(|t| t.address.as_str())).collect()
    }
}

/// A TLS listener with its certificates loaded.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub address: String,
    pub http2: bool,
    pub proxy_protocol: bool,
    pub certificates: Arc<Certificates>,
    pub client_auth: Option<(ClientAuthMode, Arc<rustls::RootCertStore>)>,
    /// The files a change of which should reload the configuration.
    pub files: Vec<PathBuf>,
}

pub(super) fn compile_listen(
    file: &Path,
    dir: &Path,
    spec: &ListenSpec,
    env: &Env,
    diags: &mut Diagnostics,
) -> Option<Listen> {
    let before = diags.0.len();
    let mut addresses: Vec<&Spanned<String>> = vec![&spec.admin, &spec.metrics];
    addresses.extend(spec.proxy.as_ref());
    addresses.extend(spec.tls.iter().map(|t| &t.value.address));
    for (i, addr) in addresses.iter().enumerate() {
        if addr.value.parse::<std::net::SocketAddr>().is_err() {
            diags.at(file, addr, format!("`{}` is not an address such as 127.0.0.1:8080", addr.value));
        } else if addresses[..i].iter().any(|a| a.value == addr.value) {
            diags.at(file, addr, format!("`{}` is used by two listeners", addr.value));
        }
    }
    if spec.proxy.is_none() && spec.tls.is_empty() {
        diags.at(
            file,
            &spec.admin,
            "listen: set `proxy` (plain HTTP) or at least one `tls` listener".to_string(),
        );
    }
    if spec.read_buffer_bytes < 1024 {
        diags.file(file, "listen.read_buffer_bytes must be at least 1024");
    }
    if spec.client_header_timeout_ms == 0 || spec.max_header_bytes < 1024 || spec.max_header_fields == 0 {
        diags.file(
            file,
            "listen: client_header_timeout_ms and max_header_fields must be at least 1, max_header_bytes at least 1024",
        );
    }
    let mut trusted = Vec::new();
    for entry in &spec.trusted_proxies {
        match Cidrs::parse(&[entry.value.as_str()]) {
            Ok(_) => trusted.push(entry.value.as_str()),
            Err(e) => diags.at(file, entry, format!("listen.trusted_proxies: {e}")),
        }
    }
    let trusted_proxies = Cidrs::parse(&trusted).unwrap_or_default();
    let needs_trust = |diags: &mut Diagnostics, at: &Spanned<String>| {
        if spec.trusted_proxies.is_empty() {
            diags.at(
                file,
                at,
                "proxy_protocol: list the load balancers that send it in listen.trusted_proxies (a PROXY header from anyone else is refused)".to_string(),
            );
        }
    };
    if spec.proxy_protocol {
        match &spec.proxy {
            Some(addr) => needs_trust(diags, addr),
            None => diags.at(file, &spec.admin, "listen.proxy_protocol is for the plain `proxy` listener, which is not set; set it on a `tls` listener instead".to_string()),
        }
    }
    if spec.h2c && spec.proxy.is_none() {
        diags.at(
            file,
            &spec.admin,
            "listen.h2c is for the plain `proxy` listener, which is not set".to_string(),
        );
    }
    let mut tls = Vec::new();
    for listener in &spec.tls {
        if listener.value.proxy_protocol {
            needs_trust(diags, &listener.value.address);
        }
        if let Some(compiled) = compile_tls(file, dir, &listener.value, env, diags) {
            tls.push(compiled);
        }
    }
    if diags.0.len() > before {
        return None;
    }
    Some(Listen {
        proxy: spec.proxy.as_ref().map(|p| p.value.clone()),
        admin: spec.admin.value.clone(),
        metrics: spec.metrics.value.clone(),
        read_buffer_bytes: spec.read_buffer_bytes,
        client_header_timeout: Duration::from_millis(spec.client_header_timeout_ms),
        max_header_bytes: spec.max_header_bytes,
        max_header_fields: spec.max_header_fields,
        h2c: spec.h2c,
        proxy_protocol: spec.proxy_protocol,
        tls,
        trusted_proxies,
        client_address_header: spec.client_address_header,
    })
}

/// Whether a file is missing on a machine that is not the production one (`check --offline`):
/// then it is a warning, and the rest is checked without it.
fn missing_offline(file: &Path, at: &Spanned<String>, path: &Path, env: &Env) -> bool {
    if env.offline() && !path.exists() {
        env.warn(
            file,
            at.referenced.line(),
            at.referenced.column(),
            format!("{} does not exist here; it is read at start", path.display()),
        );
        return true;
    }
    false
}

fn compile_tls(
    file: &Path,
    dir: &Path,
    spec: &TlsListenerSpec,
    env: &Env,
    diags: &mut Diagnostics,
) -> Option<TlsListener> {
    let before = diags.0.len();
    if spec.certificates.is_empty() {
        diags.at(file, &spec.address, "tls: list at least one certificate (cert and key)".to_string());
    }
    let mut files = Vec::new();
    let mut served = Vec::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for c in &spec.certificates {
        let (cert, key) = (dir.join(&c.cert.value), dir.join(&c.key.value));
        let ocsp = c.ocsp.as_ref().map(|o| dir.join(&o.value));
        files.extend([cert.clone(), key.clone()]);
        files.extend(ocsp.clone());
        if missing_offline(file, &c.cert, &cert, env) || missing_offline(file, &c.key, &key, env) {
            continue;
        }
        match tls::load_certificate(&cert, &key, ocsp.as_deref()) {
            Ok(s) => {
                if s.not_after < now {
                    env.warn(
                        file,
                        c.cert.referenced.line(),
                        c.cert.referenced.column(),
                        format!("certificate {} has expired: clients will refuse it", cert.display()),
                    );
                } else if s.not_after < now + 14 * 86_400 {
                    env.warn(
                        file,
                        c.cert.referenced.line(),
                        c.cert.referenced.column(),
                        format!("certificate {} expires within 14 days", cert.display()),
                    );
                }
                served.push(s);
            }
            Err(e) => diags.at(file, &c.cert, format!("tls: {e}")),
        }
    }
    let client_auth = spec.client_certificates.as_ref().and_then(|cc| {
        let ca = dir.join(&cc.ca.value);
        files.push(ca.clone());
        if missing_offline(file, &cc.ca, &ca, env) {
            return None;
        }
        match tls::read_roots(&ca, "client CA bundle") {
            Ok(roots) => Some((cc.mode, Arc::new(roots))),
            Err(e) => {
                diags.at(file, &cc.ca, format!("tls.client_certificates: {e}"));
                None
            }
        }
    });
    if diags.0.len() > before {
        return None;
    }
    Some(TlsListener {
        address: spec.address.value.clone(),
        http2: spec.http2,
        proxy_protocol: spec.proxy_protocol,
        certificates: Arc::new(Certificates(served)),
        client_auth,
        files,
    })
}

fn default_true() -> bool {
    true
}
fn default_read_buffer() -> usize {
    4096
}
fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_max_header_fields() -> usize {
    100
}
