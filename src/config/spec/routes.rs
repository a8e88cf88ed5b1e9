//! What `routes/*.yaml` says: each route's match, upstream, rewrite, limits and policies.

use super::*;

/// One file in `routes/`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    pub routes: Vec<Spanned<RouteSpec>>,
}

#[derive(Debug, Deserialize, Serialize)]
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
    /// Scopes the consumer must hold (403 otherwise); needs an authentication policy.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Priority class in the upstream's budget (default: the budget's `default_class`).
    #[serde(default)]
    pub erp_class: Option<Spanned<String>>,
    /// Served in-process by a process API instead of proxied (the upstream is the ERP it uses).
    #[serde(default)]
    pub process: Option<ProcessEndpoint>,
    /// Anonymous callers may use this route although its upstream holds a credential: without
    /// it, `check` refuses such a route unless it names an authentication policy.
    #[serde(default)]
    pub public: bool,
    /// Credential-bearing headers this route lets through, which are otherwise stripped:
    /// `request` (`cookie`) toward the upstream, `response` (`set-cookie`, `www-authenticate`,
    /// CSRF tokens) toward the caller.
    #[serde(default)]
    pub pass_headers: PassHeadersSpec,
    /// The API version this route serves (`v1`, `2024-10`): a label of the usage metric.
    #[serde(default)]
    pub version: Option<Spanned<String>>,
    /// Deprecation and sunset (RFC 9745, RFC 8594): `Deprecation`, `Sunset` and `Link` on every
    /// answer; after the sunset a 410 problem (`after_sunset: refuse`, the default).
    #[serde(default)]
    pub deprecation: Option<Spanned<crate::config::lifecycle::DeprecationSpec>>,
}

#[derive(Debug, Deserialize, Serialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PassHeadersSpec {
    #[serde(default)]
    pub request: Vec<Spanned<String>>,
    #[serde(default)]
    pub response: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
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

#[derive(Debug, Deserialize, Serialize, Default)]
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
