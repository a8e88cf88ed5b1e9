//! The policies of the edge, as the files say them and compiled: `mtls` (client certificates
//! as consumers), `cors` (browser callers) and `ip_filter` (client addresses).

use crate::edge::client_addr::Cidrs;
use crate::policy::cors::{CorsPolicy, CorsSpecParts};
use crate::policy::ip_filter::IpFilterPolicy;
use crate::policy::mtls::{CertMatch, MtlsPolicy};
use serde::{Deserialize, Serialize};

/// `kind: mtls`: which client certificates are which consumers.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    pub name: String,
    pub clients: Vec<MtlsClientSpec>,
}

/// One registered certificate: exactly one of `subject_cn`, `san_dns`, `san_uri`, `san_email`
/// or `sha256` recognises it.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsClientSpec {
    pub consumer: String,
    #[serde(default = "default_tier")]
    pub tier: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub subject_cn: Option<String>,
    #[serde(default)]
    pub san_dns: Option<String>,
    #[serde(default)]
    pub san_uri: Option<String>,
    #[serde(default)]
    pub san_email: Option<String>,
    /// SHA-256 of the DER certificate, hex (`openssl x509 -noout -fingerprint -sha256`, colons allowed).
    #[serde(default)]
    pub sha256: Option<String>,
}

fn default_tier() -> String {
    "standard".into()
}

pub fn compile_mtls(spec: &MtlsSpec) -> Result<MtlsPolicy, String> {
    if spec.clients.is_empty() {
        return Err("clients: register at least one certificate".into());
    }
    let mut clients = Vec::new();
    for c in &spec.clients {
        let matchers: Vec<CertMatch> = [
            c.subject_cn.clone().map(CertMatch::SubjectCn),
            c.san_dns.clone().map(CertMatch::SanDns),
            c.san_uri.clone().map(CertMatch::SanUri),
            c.san_email.clone().map(CertMatch::SanEmail),
            c.sha256.as_ref().map(|h| CertMatch::Sha256(h.replace(':', "").to_ascii_lowercase())),
        ]
        .into_iter()
        .flatten()
        .collect();
        let [matcher] = matchers.as_slice() else {
            return Err(format!(
                "client `{}`: give exactly one of subject_cn, san_dns, san_uri, san_email, sha256",
                c.consumer
            ));
        };
        if let CertMatch::Sha256(h) = matcher {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("client `{}`: sha256 must be 64 hex digits", c.consumer));
            }
        }
        if c.consumer.is_empty() {
            return Err("clients: every entry needs a consumer".into());
        }
        clients.push((
            matcher.clone(),
            MtlsPolicy::consumer(&spec.name, &c.consumer, &c.tier, c.scopes.clone()),
        ));
    }
    Ok(MtlsPolicy::new(&spec.name, clients))
}

/// `kind: cors`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    pub name: String,
    /// Exact origins (`https://crm.example.com`), or `["*"]` for any (not with credentials).
    pub allow_origins: Vec<String>,
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<String>,
    /// Request headers browsers may send besides the safelisted ones.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers scripts may read.
    #[serde(default = "default_expose")]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight answer.
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}
fn default_expose() -> Vec<String> {
    ["x-correlation-id", "traceparent", "location", "retry-after", "ratelimit", "ratelimit-policy"]
        .map(String::from)
        .to_vec()
}
fn default_max_age() -> u64 {
    600
}

pub fn compile_cors(spec: &CorsSpec) -> Result<CorsPolicy, String> {
    CorsPolicy::compile(
        &spec.name,
        CorsSpecParts {
            allow_origins: &spec.allow_origins,
            allow_methods: &spec.allow_methods,
            allow_headers: &spec.allow_headers,
            expose_headers: &spec.expose_headers,
            allow_credentials: spec.allow_credentials,
            max_age_seconds: spec.max_age_seconds,
        },
    )
}

/// `kind: ip_filter`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IpFilterSpec {
    pub name: String,
    /// Only these addresses and networks (all when absent).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Never these (checked first).
    #[serde(default)]
    pub deny: Vec<String>,
}

pub fn compile_ip_filter(spec: &IpFilterSpec) -> Result<IpFilterPolicy, String> {
    let set = |list: &[String], what: &str| {
        Cidrs::parse(&list.iter().map(String::as_str).collect::<Vec<_>>()).map_err(|e| format!("{what}: {e}"))
    };
    if spec.allow.is_none() && spec.deny.is_empty() {
        return Err("set allow, deny or both".into());
    }
    Ok(IpFilterPolicy {
        name: spec.name.clone(),
        allow: spec.allow.as_deref().map(|a| set(a, "allow")).transpose()?,
        deny: set(&spec.deny, "deny")?,
    })
}
