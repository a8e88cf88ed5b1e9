//! What operators write: the typed form of `causeway.yaml`, `routes/*.yaml` and `policies/*.yaml`.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Values that later checks refer to are `Spanned` so diagnostics can name the line.

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
// The fallback modes belong to the shared budgets and limits; the files name them.
pub use crate::budget::redis::{BudgetFallback, LimitFallback};
use std::collections::BTreeMap;

/// `causeway.yaml`: listeners, upstream ERP instances, the embedded sandbox, the store.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MainSpec {
    pub listen: super::listen::ListenSpec,
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
    /// Several replicas sharing the store and the ERP budgets.
    #[serde(default)]
    pub cluster: Option<ClusterSpec>,
    /// The process APIs (quote-to-order): which ERP they write to and how delivery retries.
    #[serde(default)]
    pub process: Option<ProcessSpec>,
    /// Who hears what happens to orders (`docs/events.md`).
    #[serde(default)]
    pub events: Option<super::events::EventsSpec>,
    /// Where OTLP traces go; none are exported without it.
    #[serde(default)]
    pub traces: Option<super::traces::TracesSpec>,
    /// Seconds between upstream reachability probes (they drive `/readyz`).
    #[serde(default = "default_probe_seconds")]
    pub health_probe_seconds: u64,
    /// Failed authentications tolerated per client address before it is refused with 429.
    #[serde(default)]
    pub auth_failures: AuthFailuresSpec,
}

/// `auth_failures:`: a client address that fails authentication `max_failures` times within
/// `window_seconds` is refused (429) until the window ends, before any credential is checked.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailuresSpec {
    /// 0 turns the limit off.
    pub max_failures: u32,
    pub window_seconds: u64,
}

impl Default for AuthFailuresSpec {
    fn default() -> Self {
        AuthFailuresSpec { max_failures: 50, window_seconds: 60 }
    }
}

#[derive(Debug, Deserialize, Serialize)]
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
    /// TLS toward an `https://` ERP: its CA, a client certificate, SNI, verification.
    #[serde(default)]
    pub tls: Option<super::upstream_tls::UpstreamTlsSpec>,
    /// The ERP's shared budget: every route and in-process caller reaching this upstream takes a
    /// permit from it. Absent: no throttle.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// Requests per sliding window (Business Central: 6,000 per 300 s).
    pub window_requests: u32,
    pub window_seconds: u64,
    /// A slot frees this much after the window, absorbing clock and network jitter.
    #[serde(default = "default_margin_ms")]
    pub window_margin_ms: u64,
    /// Requests in flight at once (Business Central: 5).
    pub max_concurrent: u32,
    /// Requests that may wait for a permit.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Priority classes: lower `priority` runs first; each waits at most `max_wait_ms`.
    #[serde(default = "default_classes")]
    pub classes: BTreeMap<String, ClassSpec>,
    /// Class of routes that name none.
    #[serde(default = "default_class")]
    pub default_class: String,
    /// Vendor-specific overload answers besides 429/503, e.g. NetSuite's
    /// `{status: 400, body_contains: SSS_REQUEST_LIMIT_EXCEEDED}`.
    #[serde(default)]
    pub overload_signals: Vec<OverloadSignalSpec>,
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Consecutive failures (connect errors, timeouts, 5xx) that open the circuit.
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    #[serde(default = "default_circuit_open")]
    pub circuit_open_seconds: u64,
    /// The longest pause an ERP's overload answer can impose (its `Retry-After` is capped here).
    #[serde(default = "default_max_pause_seconds")]
    pub max_pause_seconds: u64,
    /// The largest share of the budget (of `window_requests` and of `max_concurrent`) one
    /// consumer may hold, so one consumer cannot starve the others; 1 means no cap.
    #[serde(default = "default_max_share")]
    pub max_share: f64,
    /// `smooth`: spread the window's requests evenly (one per window ÷ window_requests), for
    /// ERPs behind a spike arrest or a leaky bucket; `off` (default): as fast as the window and
    /// the concurrency allow, right for sliding windows such as Business Central's.
    #[serde(default)]
    pub pacing: PacingSpec,
    /// With `pacing: smooth`, how many requests may go back to back after a quiet spell.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Adapt to the ERP: an overload signal halves the effective rate and concurrency; answers
    /// without one win them back step by step, never above the values above.
    #[serde(default)]
    pub adaptive: bool,
    /// With `cluster.redis`: what this budget does while Redis is unreachable.
    #[serde(default)]
    pub when_redis_unavailable: BudgetFallback,
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum PacingSpec {
    #[default]
    Off,
    Smooth,
}

fn default_burst() -> u32 {
    1
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    pub priority: u8,
    pub max_wait_ms: u64,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OverloadSignalSpec {
    pub status: u16,
    #[serde(default)]
    pub body_contains: Option<String>,
}

/// Values may reference environment variables as `${NAME}` or `${NAME:-fallback}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum CredentialSpec {
    Bearer {
        #[serde(serialize_with = "super::print::mask")]
        token: Spanned<String>,
    },
    Basic {
        username: Spanned<String>,
        #[serde(serialize_with = "super::print::mask")]
        password: Spanned<String>,
    },
    Header {
        name: String,
        #[serde(serialize_with = "super::print::mask")]
        value: Spanned<String>,
    },
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// `false` leaves the block in place but starts no sandbox (a container pointed at a real
    /// ERP: `enabled: ${CAUSEWAY_SANDBOX:-true}`).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address the sandbox listens on.
    pub listen: Spanned<String>,
    /// Bearer token the sandbox requires (may reference the environment like credentials).
    #[serde(default, serialize_with = "super::print::mask_option")]
    pub token: Option<Spanned<String>>,
    #[serde(default)]
    pub limits: SandboxLimits,
}

/// Limits and fault injection; settable in `causeway.yaml` and at run time (`PUT /sandbox/settings`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxLimits {
    /// Requests admitted per sliding window (Business Central: 6,000 per 5 minutes).
    pub window_requests: u32,
    pub window_seconds: u64,
    /// Requests processed at once (Business Central: 5).
    pub max_concurrent: u32,
    /// Requests that may wait for a processing slot (Business Central: 95).
    pub queue: u32,
    /// Added to every API request.
    pub latency_ms: u64,
    /// Up to this much more, uniformly.
    pub latency_jitter_ms: u64,
    /// Fraction (0..1) of API requests answered 503 after admission.
    pub failure_rate: f64,
    /// When set, every API request is answered with this status (e.g. 503 for an outage).
    pub force_status: Option<u16>,
    /// `Retry-After` seconds sent with a forced 429/503; none when absent.
    pub force_retry_after_seconds: Option<u64>,
    /// How long a webhook subscription lives unless renewed (Business Central: three days).
    pub subscription_lifetime_seconds: u64,
    /// Changes are gathered this long before their notifications are sent (Business Central
    /// batches them for up to about 30 seconds).
    pub notification_delay_ms: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            window_requests: 6000,
            window_seconds: 300,
            max_concurrent: 5,
            queue: 95,
            latency_ms: 0,
            latency_jitter_ms: 0,
            failure_rate: 0.0,
            force_status: None,
            force_retry_after_seconds: None,
            subscription_lifetime_seconds: 3 * 24 * 3600,
            notification_delay_ms: 200,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct StoreSpec {
    /// `sqlite` (default: one node, one file) or `postgres` (replicas share one database).
    pub backend: StoreBackend,
    /// SQLite file for idempotency keys and orders (used by the process APIs).
    pub path: String,
    /// When a commit is on disk: `full` (default) before the caller is answered, so an
    /// acknowledged order survives a power loss; `normal` is faster and survives a process
    /// crash, but a power loss can lose the last commits.
    pub synchronous: Synchronous,
    /// PostgreSQL connection URL (`postgres://user@host:5432/db`), usually `${CAUSEWAY_DATABASE_URL}`.
    #[serde(serialize_with = "super::print::mask_url_password_option")]
    pub url: Option<Spanned<String>>,
    /// PostgreSQL connections per replica.
    pub pool: u32,
    /// How long a request waits for a database connection before it is answered 503
    /// `store-unavailable` (while the database restarts, say).
    pub acquire_timeout_ms: u64,
    /// Writes of concurrent requests committed in one transaction at most (group commit;
    /// default 64); 1 commits each write alone.
    pub group_commit: Option<Spanned<usize>>,
}

impl Default for StoreSpec {
    fn default() -> Self {
        StoreSpec {
            backend: StoreBackend::Sqlite,
            path: "data/causeway.db".into(),
            synchronous: Synchronous::Full,
            url: None,
            pool: 16,
            acquire_timeout_ms: 3000,
            group_commit: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    #[default]
    Sqlite,
    Postgres,
}

/// `cluster:`: several replicas behind a load balancer share the store (PostgreSQL) and the ERP
/// budgets (Redis).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// How many replicas run: with Redis away, `local_share` gives each this share of a budget.
    pub replicas: Spanned<u32>,
    pub redis: Option<RedisSpec>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RedisSpec {
    /// `redis://host:6379/0`, usually `${CAUSEWAY_REDIS_URL}`.
    #[serde(serialize_with = "super::print::mask_url_password")]
    pub url: Spanned<String>,
    /// Prefix of every key, so several gateways (environments) can share one Redis.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// A permit held by a replica that stopped comes back after this long (live replicas renew
    /// theirs every third of it).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// A Redis call that takes longer counts as Redis being unreachable.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_redis_prefix() -> String {
    "causeway".into()
}
fn default_lease_ms() -> u64 {
    5000
}
fn default_redis_timeout_ms() -> u64 {
    250
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// The upstream orders are written to (its budget's `write` class carries the writes).
    pub erp: Spanned<String>,
    /// The ERP's dialect.
    #[serde(default)]
    pub adapter: AdapterKind,
    /// Business Central: the company id the orders belong to.
    #[serde(default)]
    pub company: Option<String>,
    /// Tryton: database and API user.
    #[serde(default)]
    pub tryton: Option<TrytonSpec>,
    /// How long a completed request's response is replayed for its Idempotency-Key.
    #[serde(default = "default_key_ttl_hours")]
    pub idempotency_key_ttl_hours: u64,
    /// Most lines a quote may have (both shapes): each distinct product costs ERP lookups.
    #[serde(default = "default_max_lines")]
    pub max_lines: usize,
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// Change detection, ERP → gateway: how the gateway learns what becomes of its orders.
    #[serde(default)]
    pub changes: Option<Spanned<ChangesSpec>>,
}

/// `process.changes`: Business Central notifies (webhook subscriptions), Tryton is polled.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesSpec {
    /// Business Central: this gateway's `erp-notifications` route as the ERP reaches it.
    #[serde(default)]
    pub notification_url: Option<Spanned<String>>,
    /// Business Central: the environment variable holding the `clientState` secret the ERP
    /// sends back with every notification.
    #[serde(default)]
    pub client_state_env: Option<Spanned<String>>,
    /// Tryton: seconds between polls for changed orders.
    #[serde(default = "default_poll_seconds")]
    pub poll_seconds: u64,
    /// The ERP budget class its reads take; the lowest-priority class when absent.
    #[serde(default)]
    pub class: Option<Spanned<String>>,
}

fn default_poll_seconds() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterKind {
    /// Business Central API v2.0 (the built-in sandbox speaks it).
    #[default]
    BusinessCentral,
    /// Tryton over JSON-RPC.
    Tryton,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrytonSpec {
    pub database: String,
    /// The API user (needs the Sales and Product Administration groups).
    pub login: String,
    /// May reference the environment: `${TRYTON_PASSWORD}`.
    #[serde(serialize_with = "super::print::mask")]
    pub password: Spanned<String>,
    /// Company id the sales belong to.
    #[serde(default = "default_tryton_company")]
    pub company: i64,
}

fn default_tryton_company() -> i64 {
    1
}

fn default_key_ttl_hours() -> u64 {
    24
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySpec {
    /// Attempts before an order is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt (with jitter) up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// How long a submission waits for the ERP before answering 202 (the attempt goes on).
    pub inline_wait_ms: u64,
    /// How long a delivery may hold an order before another attempt may take it over.
    pub lease_ms: u64,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        // 20 attempts at up to 5 minutes apart: about an hour and a half of ERP outage.
        DeliverySpec {
            max_attempts: 20,
            backoff_initial_ms: 1000,
            backoff_max_ms: 300_000,
            inline_wait_ms: 5000,
            lease_ms: 120_000,
        }
    }
}

/// An in-process endpoint of the process APIs, served instead of proxying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessEndpoint {
    /// `POST`: a quote (canonical or a Salesforce Opportunity) becomes an ERP order.
    QuoteToOrder,
    /// `GET …/{id}`: one order with its history.
    Order,
    /// `GET ?opportunityId=…`: the orders of an opportunity.
    Orders,
    /// `GET`: the OpenAPI document of the process APIs.
    Openapi,
    /// `POST`: change notifications from the ERP (Business Central webhooks), and their
    /// validation-token handshake.
    ErpNotifications,
}

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
    Mtls(super::edge_policies::MtlsSpec),
    /// Browser callers from other origins.
    Cors(super::edge_policies::CorsSpec),
    /// Client addresses allowed or denied.
    IpFilter(super::edge_policies::IpFilterSpec),
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
    #[serde(default, serialize_with = "super::print::mask_option")]
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

fn default_max_pause_seconds() -> u64 {
    300
}
fn default_max_share() -> f64 {
    1.0
}
fn default_max_lines() -> usize {
    200
}
fn default_transform_ms() -> u64 {
    100
}
fn default_transform_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_margin_ms() -> u64 {
    1000
}
fn default_queue() -> usize {
    1000
}
fn default_classes() -> BTreeMap<String, ClassSpec> {
    BTreeMap::from([
        ("write".to_string(), ClassSpec { priority: 0, max_wait_ms: 30_000 }),
        ("interactive".to_string(), ClassSpec { priority: 1, max_wait_ms: 5_000 }),
        ("bulk".to_string(), ClassSpec { priority: 2, max_wait_ms: 2_000 }),
    ])
}
fn default_class() -> String {
    "interactive".into()
}
fn default_backoff_initial() -> u64 {
    1000
}
fn default_backoff_max() -> u64 {
    60_000
}
fn default_circuit_failures() -> u32 {
    5
}
fn default_circuit_open() -> u64 {
    10
}
fn default_jwks_refresh() -> u64 {
    300
}
fn default_min_refetch() -> u64 {
    10
}
fn default_leeway() -> u64 {
    30
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into(), "EdDSA".into()]
}
fn default_tier_claim() -> String {
    "tier".into()
}
fn default_tier() -> String {
    "standard".into()
}
fn default_max_token() -> usize {
    8192
}
fn default_cache_entries() -> u64 {
    10_000
}
fn default_api_key_header() -> String {
    "x-api-key".into()
}
fn default_per() -> String {
    "consumer".into()
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
