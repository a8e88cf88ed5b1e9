//! What `policies/*.yaml` says: each policy by kind (headers, auth, limits, mediation, edge).

use super::*;

/// One file in `policies/`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesFile {
    pub policies: Vec<Spanned<PolicySpec>>,
}

#[derive(Debug, Deserialize, Serialize)]
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
    Jwt(JwtSpec),
    /// API keys sent in a header, stored as SHA-256 hashes.
    ApiKey {
        name: String,
        #[serde(default = "default_api_key_header")]
        header: String,
        keys: Vec<ApiKeySpec>,
    },
    /// Consumer quotas by tier (GCRA with burst).
    RateLimit {
        name: String,
        /// `consumer` (one budget per consumer) or `consumer_route`.
        #[serde(default = "default_per")]
        per: String,
        tiers: BTreeMap<String, TierSpec>,
        /// Tier for consumers whose tier is not listed, and for anonymous callers.
        #[serde(default)]
        default_tier: Option<String>,
        /// With `cluster.redis`: what the limit does while Redis is unreachable.
        #[serde(default)]
        when_redis_unavailable: LimitFallback,
    },
    /// JSON Schema validation and body transformation (see `mediation`).
    Mediation(MediationSpec),
    /// Client certificates as consumers.
    Mtls(crate::config::edge_policies::MtlsSpec),
    /// Browser callers from other origins.
    Cors(crate::config::edge_policies::CorsSpec),
    /// Client addresses allowed or denied.
    IpFilter(crate::config::edge_policies::IpFilterSpec),
}

impl PolicySpec {
    pub fn name(&self) -> &str {
        match self {
            PolicySpec::Headers { name, .. }
            | PolicySpec::Jwt(JwtSpec { name, .. })
            | PolicySpec::ApiKey { name, .. }
            | PolicySpec::RateLimit { name, .. }
            | PolicySpec::Mediation(MediationSpec { name, .. }) => name,
            PolicySpec::Mtls(s) => &s.name,
            PolicySpec::Cors(s) => &s.name,
            PolicySpec::IpFilter(s) => &s.name,
        }
    }
}

/// `kind: mediation`. File paths are relative to `policies/`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediationSpec {
    pub name: String,
    /// Checked and transformed before anything reaches the ERP.
    #[serde(default)]
    pub request: Option<RequestMediationSpec>,
    /// Buffered, monitored and transformed before anything reaches the caller.
    #[serde(default)]
    pub response: Option<ResponseMediationSpec>,
    /// Time bound of one transformation (a jq program can loop).
    #[serde(default = "default_transform_ms")]
    pub timeout_ms: u64,
    /// Size bound of a transformation's output and of an ERP response read for mediation.
    #[serde(default = "default_transform_bytes")]
    pub max_output_bytes: usize,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMediationSpec {
    /// JSON Schema of the body; a violation is a 422 listing every error.
    #[serde(default)]
    pub schema: Option<String>,
    /// JSON Schema of the query parameters, as an object of strings.
    #[serde(default)]
    pub query_schema: Option<String>,
    /// JSON Schema of the headers, as an object keyed by lower-case name.
    #[serde(default)]
    pub headers_schema: Option<String>,
    /// A mapping table file (`mode` + `ops`).
    #[serde(default)]
    pub map: Option<String>,
    /// A jq program, run after the table (inline, or `jq_file`).
    #[serde(default)]
    pub jq: Option<String>,
    #[serde(default)]
    pub jq_file: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseMediationSpec {
    /// JSON Schema checked in monitor mode: violations are counted and logged only.
    #[serde(default)]
    pub schema: Option<String>,
    /// Statuses whose bodies are mediated (default: every 2xx).
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
    /// A mapping table file (`mode` + `ops`).
    #[serde(default)]
    pub map: Option<String>,
    /// A jq program, run after the table (inline, or `jq_file`).
    #[serde(default)]
    pub jq: Option<String>,
    #[serde(default)]
    pub jq_file: Option<String>,
}

/// `kind: jwt`: bearer tokens signed by an identity provider.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    pub name: String,
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values (one must match).
    pub audiences: Vec<String>,
    /// JWKS endpoint of the IdP (fetched, cached, refreshed); or `jwks_file`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<String>,
    #[serde(default = "default_jwks_refresh")]
    pub refresh_seconds: u64,
    /// At most one re-fetch per this interval when tokens name an unknown `kid`.
    #[serde(default = "default_min_refetch")]
    pub min_refetch_seconds: u64,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    /// Asymmetric algorithms accepted; each key is further pinned to its own type.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Enables HS256 with this secret (may reference the environment).
    #[serde(default, serialize_with = "crate::config::print::mask_option")]
    pub hs256_secret: Option<String>,
    #[serde(default = "default_tier_claim")]
    pub tier_claim: String,
    #[serde(default = "default_tier")]
    pub default_tier: String,
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    /// Verified tokens kept (until their expiry) to skip signature checks.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: u64,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    pub consumer: String,
    #[serde(default = "default_tier")]
    pub tier: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the key (`printf %s KEY | sha256sum`); the key itself is never stored.
    pub sha256: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    pub requests: u32,
    pub window_seconds: u64,
    #[serde(default)]
    pub burst: u32,
}

#[derive(Debug, Deserialize, Serialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}
