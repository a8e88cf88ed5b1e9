//! What operators write: the typed form of `causeway.yaml`, `routes/*.yaml` and `policies/*.yaml`.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Values that later checks refer to are `Spanned` so diagnostics can name the line.

use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

/// `causeway.yaml`: listeners, upstream ERP instances, the embedded sandbox, the store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MainSpec {
    pub listen: ListenSpec,
    /// Worker threads of the proxy service; defaults to the number of CPUs.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Let idle worker threads steal tasks from busy ones (pingora's default).
    #[serde(default = "default_true")]
    pub work_stealing: bool,
    /// Idle keep-alive connections kept for reuse, per upstream (pingora's default: 128).
    #[serde(default = "default_pool_size")]
    pub upstream_pool_size: usize,
    /// Seconds SIGTERM waits for in-flight requests before exiting.
    #[serde(default = "default_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// Upstream ERP instances by name.
    pub upstreams: BTreeMap<String, Spanned<UpstreamSpec>>,
    /// The built-in Business Central sandbox, started in-process by `causeway serve`.
    #[serde(default)]
    pub sandbox: Option<SandboxSpec>,
    #[serde(default)]
    pub store: StoreSpec,
    /// Seconds between upstream reachability probes (they drive `/readyz`).
    #[serde(default = "default_probe_seconds")]
    pub health_probe_seconds: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    /// Address of the proxy listener, e.g. `127.0.0.1:8080`.
    pub proxy: Spanned<String>,
    /// `/healthz` and `/readyz`.
    pub admin: Spanned<String>,
    /// Prometheus exposition at `/metrics`.
    pub metrics: Spanned<String>,
    /// Bytes of read buffer per downstream connection (pingora's default is 64 KiB; a small
    /// buffer keeps idle keep-alive connections cheap, larger bodies are read in several calls).
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// Base URL, `http://host:port` or `https://host:port`; a path prefix is not allowed here
    /// (routes rewrite paths).
    pub url: Spanned<String>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for any single read from the upstream.
    #[serde(default = "default_read_ms")]
    pub read_timeout_ms: u64,
    #[serde(default = "default_read_ms")]
    pub write_timeout_ms: u64,
    /// Seconds an idle pooled connection is kept.
    #[serde(default = "default_idle_seconds")]
    pub pool_idle_seconds: u64,
    /// Credential injected into every upstream request; consumers never send it.
    #[serde(default)]
    pub credentials: Option<CredentialSpec>,
}

/// Values may reference environment variables as `${NAME}` or `${NAME:-fallback}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum CredentialSpec {
    Bearer { token: Spanned<String> },
    Basic { username: Spanned<String>, password: Spanned<String> },
    Header { name: String, value: Spanned<String> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Address the sandbox listens on.
    pub listen: Spanned<String>,
    /// Bearer token the sandbox requires (may reference the environment like credentials).
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    #[serde(default)]
    pub limits: crate::erp::sandbox::LimitsSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// SQLite file for idempotency keys and orders (used by the process APIs).
    pub path: String,
}

impl Default for StoreSpec {
    fn default() -> Self {
        StoreSpec { path: "data/causeway.db".into() }
    }
}

/// One file in `routes/`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    pub routes: Vec<Spanned<RouteSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Unique name: the metrics label and the log field.
    pub name: Spanned<String>,
    #[serde(rename = "match")]
    pub matcher: MatchSpec,
    /// Name of an upstream in `causeway.yaml`.
    pub upstream: Spanned<String>,
    /// Upstream path template; `{param}` inserts a captured path parameter. Default: the
    /// request path unchanged. The query string is always carried over.
    #[serde(default)]
    pub rewrite: Option<Spanned<String>>,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    /// Largest request body accepted, in bytes (413 above it).
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: u64,
    /// Named policies from `policies/`, applied in order.
    #[serde(default)]
    pub policies: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Exact `Host` (port ignored); any host when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Allowed methods; any method when absent.
    #[serde(default)]
    pub methods: Option<Vec<Spanned<String>>>,
    /// Path template: literal segments, `{param}` (one segment, may sit between literal text as
    /// in `items({id})`) and a final `{*rest}` for the remainder.
    pub path: Spanned<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    /// Deadline for the whole exchange with the upstream, from the moment the request is routed.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// Per-read timeout; overrides the upstream's.
    #[serde(default)]
    pub read_ms: Option<u64>,
    #[serde(default)]
    pub connect_ms: Option<u64>,
}

/// One file in `policies/`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesFile {
    pub policies: Vec<Spanned<PolicySpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicySpec {
    /// Add, set or remove headers on the upstream request and on the response to the caller.
    Headers {
        name: String,
        #[serde(default)]
        request: HeaderOps,
        #[serde(default)]
        response: HeaderOps,
    },
}

impl PolicySpec {
    pub fn name(&self) -> &str {
        match self {
            PolicySpec::Headers { name, .. } => name,
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

fn default_true() -> bool {
    true
}
fn default_pool_size() -> usize {
    128
}
fn default_grace_seconds() -> u64 {
    5
}
fn default_probe_seconds() -> u64 {
    2
}
fn default_read_buffer() -> usize {
    4096
}
fn default_connect_ms() -> u64 {
    2_000
}
fn default_read_ms() -> u64 {
    30_000
}
fn default_idle_seconds() -> u64 {
    60
}
fn default_body_limit() -> u64 {
    1024 * 1024
}
