//! The built-in ERP sandbox: a Business Central API v2.0 subset with Business Central's
//! protections (sliding-window limit, 5 in flight + short queue, 429 + `Retry-After`), latency and
//! failure injection, and counters that let tests judge what the gateway did to the ERP.
//!
//! API (all under `/api/v2.0/companies({id})/`): `customers`, `items`, `salesOrders` (POST with
//! deep-inserted `salesOrderLines`, PATCH with `If-Match`), `salesOrders({id})/salesOrderLines`,
//! `salesInvoices`; lists are `{"value":[...]}`; `$filter` (`field eq 'v'` joined by `and`),
//! `$top`, `$skip`, `$expand=salesOrderLines`. Price lists are a custom API page:
//! `/api/causeway/sandbox/v1.0/companies({id})/priceListLines`.
//! Webhook subscriptions: `/api/v2.0/subscriptions` ([`webhooks`]).
//! Control (not limited): `GET /sandbox/stats`, `GET /sandbox/requests`, `POST /sandbox/reset`,
//! `GET|PUT /sandbox/settings`, and the order lifecycle `POST /sandbox/orders/{order}/ship`,
//! `/invoice`, `/pay`, `/cancel` ([`lifecycle`]).

pub mod data;
mod lifecycle;
mod limits;
mod odata;
mod orders;
mod webhooks;

pub use limits::{LimitStats, LimitsSpec, Rejection};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use limits::Limits;
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

const RECENT_REQUESTS: usize = 256;

/// Sandbox settings: the token it requires and its limits.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// `Authorization: Bearer <token>` required on the API when set.
    pub token: Option<String>,
    pub limits: LimitsSpec,
}

/// One request as the sandbox received it (for tests of header hygiene and propagation).
#[derive(Debug, Clone, Serialize)]
pub struct ReceivedRequest {
    pub method: String,
    pub uri: String,
    pub headers: BTreeMap<String, String>,
    /// The body as text, cut at 64 KiB (what mediation sent, for tests to inspect).
    pub body: String,
}

#[derive(Default)]
struct Store {
    customers: Vec<Value>,
    items: Vec<Value>,
    price_list_lines: Vec<Value>,
    invoices: Vec<Value>,
    orders: orders::Orders,
    next_order: u32,
    external_refs: HashMap<String, u32>,
}

#[derive(Default, Clone, Serialize)]
struct Counters {
    requests_total: u64,
    unauthorized: u64,
    failures_injected: u64,
    forced_responses: u64,
    orders_created: u64,
    duplicate_external_document_numbers: u64,
    /// Validation-token handshakes attempted (subscription creates and renewals).
    handshakes: u64,
    notifications_sent: u64,
    notifications_failed: u64,
}

/// Shared sandbox state; cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    token: Option<String>,
    limits: Arc<Limits>,
    store: Mutex<Store>,
    counters: Mutex<Counters>,
    recent: Mutex<VecDeque<ReceivedRequest>>,
    subscriptions: Mutex<BTreeMap<String, webhooks::Subscription>>,
    pending_notifications: Mutex<Vec<webhooks::Pending>>,
    notify: tokio::sync::Notify,
    notifier_started: std::sync::atomic::AtomicBool,
}

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Self {
        let items = data::items();
        let customers = data::customers();
        let store = Store {
            price_list_lines: data::price_list_lines(&items),
            invoices: data::sales_invoices(&customers),
            customers,
            items,
            orders: orders::Orders::default(),
            next_order: 1001,
            external_refs: HashMap::new(),
        };
        Sandbox {
            inner: Arc::new(Inner {
                token: config.token,
                limits: Limits::new(config.limits),
                store: Mutex::new(store),
                counters: Mutex::new(Counters::default()),
                recent: Mutex::new(VecDeque::with_capacity(RECENT_REQUESTS)),
                subscriptions: Mutex::new(BTreeMap::new()),
                pending_notifications: Mutex::new(Vec::new()),
                notify: tokio::sync::Notify::new(),
                notifier_started: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/sandbox/stats", get(stats))
            .route("/sandbox/requests", get(recent))
            .route("/sandbox/reset", post(reset))
            .route("/sandbox/settings", get(get_settings).put(put_settings))
            .route("/sandbox/orders/{order}/ship", post(lifecycle::ship))
            .route("/sandbox/orders/{order}/invoice", post(lifecycle::invoice))
            .route("/sandbox/orders/{order}/pay", post(lifecycle::pay))
            .route("/sandbox/orders/{order}/cancel", post(lifecycle::cancel))
            .route("/api/{*rest}", any(api))
            .fallback(|| async {
                bc_error(StatusCode::NOT_FOUND, "BadRequest_NotFound", "The request URL is not valid.")
            })
            .with_state(self.clone())
    }

    /// Serve on an already bound listener until the future is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    pub fn stats_json(&self) -> Value {
        let c = self.inner.counters.lock().clone();
        let l = self.inner.limits.stats();
        let spec = self.inner.limits.spec();
        json!({
            "requests_total": c.requests_total,
            "window_requests_limit": spec.window_requests,
            "window_seconds": spec.window_seconds,
            "requests_in_window": l.requests_in_window,
            "peak_requests_in_window": l.peak_requests_in_window,
            "max_concurrent": spec.max_concurrent,
            "in_flight": l.in_flight,
            "peak_in_flight": l.peak_in_flight,
            "open_requests": l.open_requests,
            "peak_open_requests": l.peak_open_requests,
            "rejected_429": {
                "rate": l.rejected_rate,
                "concurrency": l.rejected_concurrency,
                "total": l.rejected_rate + l.rejected_concurrency
            },
            "unauthorized": c.unauthorized,
            "failures_injected": c.failures_injected,
            "forced_responses": c.forced_responses,
            "orders_created": c.orders_created,
            "duplicate_external_document_numbers": c.duplicate_external_document_numbers,
            "subscriptions": self.inner.subscriptions.lock().len(),
            "handshakes": c.handshakes,
            "notifications_sent": c.notifications_sent,
            "notifications_failed": c.notifications_failed
        })
    }
}

/// Bind `addr` and serve the sandbox on a thread of its own (used by `causeway serve`).
pub fn spawn(addr: &str, config: SandboxConfig) -> std::io::Result<Sandbox> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let sandbox = Sandbox::new(config);
    let served = sandbox.clone();
    std::thread::Builder::new().name("erp-sandbox".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("sandbox runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            if let Err(e) = served.serve(listener).await {
                tracing::error!(error = %e, "ERP sandbox stopped");
            }
        });
    })?;
    Ok(sandbox)
}

fn bc_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

async fn stats(State(sb): State<Sandbox>) -> Json<Value> {
    Json(sb.stats_json())
}

async fn recent(State(sb): State<Sandbox>) -> Json<Vec<ReceivedRequest>> {
    Json(sb.inner.recent.lock().iter().cloned().collect())
}

async fn reset(State(sb): State<Sandbox>) -> StatusCode {
    *sb.inner.counters.lock() = Counters::default();
    sb.inner.recent.lock().clear();
    sb.inner.limits.reset_stats();
    StatusCode::NO_CONTENT
}

async fn get_settings(State(sb): State<Sandbox>) -> Json<LimitsSpec> {
    Json(sb.inner.limits.spec())
}

async fn put_settings(State(sb): State<Sandbox>, Json(spec): Json<LimitsSpec>) -> Json<LimitsSpec> {
    sb.inner.limits.set_spec(spec.clone());
    Json(spec)
}

fn record(sb: &Sandbox, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) {
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut recent = sb.inner.recent.lock();
    if recent.len() == RECENT_REQUESTS {
        recent.pop_front();
    }
    let body = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]).into_owned();
    recent.push_back(ReceivedRequest { method: method.to_string(), uri: uri.to_string(), headers, body });
}

async fn api(
    State(sb): State<Sandbox>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&sb, &method, &uri, &headers, &body);
    sb.inner.counters.lock().requests_total += 1;
    if let Some(token) = &sb.inner.token {
        let expected = format!("Bearer {token}");
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            sb.inner.counters.lock().unauthorized += 1;
            let mut resp = bc_error(
                StatusCode::UNAUTHORIZED,
                "Authentication_InvalidCredentials",
                "The server has rejected the client credentials.",
            );
            resp.headers_mut().insert("www-authenticate", "Bearer".parse().expect("static"));
            return resp;
        }
    }
    let _admitted = match sb.inner.limits.admit().await {
        Ok(a) => a,
        Err(rejection) => return too_many_requests(rejection),
    };
    let spec = sb.inner.limits.spec();
    if spec.latency_ms > 0 || spec.latency_jitter_ms > 0 {
        let jitter =
            if spec.latency_jitter_ms > 0 { rand::rng().random_range(0..=spec.latency_jitter_ms) } else { 0 };
        tokio::time::sleep(Duration::from_millis(spec.latency_ms + jitter)).await;
    }
    if let Some(status) = spec.force_status {
        sb.inner.counters.lock().forced_responses += 1;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = bc_error(status, "Forced", "Forced response set through /sandbox/settings.");
        if let Some(secs) = spec.force_retry_after_seconds {
            resp.headers_mut().insert("retry-after", secs.into());
        }
        return resp;
    }
    if spec.failure_rate > 0.0 && rand::rng().random_bool(spec.failure_rate.clamp(0.0, 1.0)) {
        sb.inner.counters.lock().failures_injected += 1;
        return bc_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "Injected failure.");
    }
    if uri.path().starts_with("/api/v2.0/subscriptions") {
        return webhooks::handle(&sb, &method, &uri, &headers, &body).await;
    }
    odata::dispatch(&sb, &method, &uri, &headers, &body)
}

fn too_many_requests(rejection: Rejection) -> Response {
    let (secs, message) = match rejection {
        Rejection::Rate { retry_after } => (
            retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
            "The request limit for the time window has been exceeded.",
        ),
        Rejection::Concurrency => (1, "Too many concurrent requests; the request queue is full."),
    };
    let mut resp = bc_error(StatusCode::TOO_MANY_REQUESTS, "Application_TooManyRequests", message);
    resp.headers_mut().insert("retry-after", secs.max(1).into());
    resp
}
