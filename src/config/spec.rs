//! What operators write: the typed form of `causeway.yaml`, `routes/*.yaml` and `policies/*.yaml`.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Values that later checks refer to are `Spanned` so diagnostics can name the line.

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
// The fallback modes belong to the shared budgets and limits; the files name them.
pub use crate::budget::redis::{BudgetFallback, LimitFallback};
use std::collections::BTreeMap;

mod policies;
mod routes;
pub use policies::*;
pub use routes::*;

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
