//! Operational listeners: `/healthz` and `/readyz` on the admin listener, Prometheus `/metrics`
//! on its own, and the background probe that decides readiness.
//!
//! Ready means "this replica can take traffic": its configuration is loaded, its order store
//! answers, and Redis answers where a fail-closed setting needs it. An unreachable ERP is
//! reported, never a reason to leave rotation: quote-to-order keeps taking orders as `pending`
//! into its durable queue exactly when the ERP is down.

use crate::config::Config;
use crate::error::GatewayError;
use crate::observe::metrics::Metrics;
use crate::policy::auth::constant_time_eq;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use parking_lot::RwLock;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the last probes found; `/readyz` reads it.
#[derive(Default)]
pub struct Health {
    /// Upstream name → reachable at the last probe; absent until first probed.
    upstreams: RwLock<BTreeMap<String, bool>>,
    /// The order store at the last probe (`None`: not probed yet).
    store: RwLock<Option<Result<(), String>>>,
    /// Redis at the last probe, when `cluster.redis` is set.
    redis: RwLock<Option<bool>>,
}

impl Health {
    pub fn set(&self, upstream: &str, up: bool) {
        self.upstreams.write().insert(upstream.to_string(), up);
    }

    pub fn set_store(&self, result: Result<(), String>) {
        *self.store.write() = Some(result);
    }

    pub fn set_redis(&self, up: bool) {
        *self.redis.write() = Some(up);
    }

    /// Ready when the store (if the process APIs use one) and Redis (if a fail-closed setting
    /// needs it) answered their last probe; upstreams are reported only.
    fn readiness(&self, config: &Config, has_store: bool) -> (bool, serde_json::Value) {
        let seen = self.upstreams.read();
        let mut upstreams = serde_json::Map::new();
        for name in config.upstreams.keys() {
            let state = match seen.get(name) {
                Some(true) => "reachable",
                Some(false) => "unreachable",
                None => "not yet probed",
            };
            upstreams.insert(name.clone(), json!(state));
        }
        let (store_ok, store) = match (has_store, &*self.store.read()) {
            (false, _) => (true, json!("not used")),
            (true, None) => (false, json!("not yet probed")),
            (true, Some(Ok(()))) => (true, json!("reachable")),
            (true, Some(Err(e))) => (false, json!(format!("unreachable: {e}"))),
        };
        let (redis_ok, redis) = match (config.cluster.redis.is_some(), *self.redis.read()) {
            (false, _) => (true, json!("not used")),
            (true, Some(true)) => (true, json!("reachable")),
            // Budgets and limits fall back to their local share: still ready, but say so.
            (true, up) if !config.cluster.redis_required => (
                true,
                json!(if up.is_none() { "not yet probed" } else { "unreachable (local fallback in force)" }),
            ),
            (true, None) => (false, json!("not yet probed")),
            (true, Some(false)) => {
                (false, json!("unreachable (a when_redis_unavailable: closed setting needs it)"))
            }
        };
        let checks = json!({ "config": "loaded", "store": store, "redis": redis, "upstreams": upstreams });
        (store_ok && redis_ok, checks)
    }
}

fn json_response(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response parts are valid")
}

pub struct AdminApp {
    pub config: Arc<ArcSwap<Config>>,
    pub health: Arc<Health>,
    pub reloader: Arc<crate::reload::Reloader>,
    /// Bearer token for `POST /admin/reload` (`CAUSEWAY_ADMIN_TOKEN`); unset disables it.
    pub admin_token: Option<String>,
    pub process: Option<Arc<crate::process::service::QuoteToOrder>>,
}

/// A problem answer of an operations listener: rendered by the one builder, with a correlation
/// id minted for it (these listeners take none from the caller).
fn problem(err: &GatewayError, instance: &str) -> Response<Vec<u8>> {
    let correlation_id = uuid::Uuid::now_v7().to_string();
    let p = err.to_problem(instance, &correlation_id);
    let mut resp = Response::builder()
        .status(p.status)
        .header(http::header::CONTENT_LENGTH, p.body.len())
        .header(crate::observe::correlation::CORRELATION_HEADER, correlation_id.as_str());
    for (name, value) in &p.headers {
        resp = resp.header(*name, value.as_str());
    }
    resp.body(p.body.to_vec()).expect("problem parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => json_response(200, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/readyz" => {
                let (ready, mut body) = self.health.readiness(&self.config.load(), self.process.is_some());
                if !ready {
                    return problem(&GatewayError::NotReady { checks: body }, &path);
                }
                body["status"] = json!("ready");
                json_response(200, "application/json", body.to_string().into_bytes())
            }
            "/admin/reload" if session.req_header().method == http::Method::POST => {
                if let Some(refusal) = self.refusal(session, "POST /admin/reload") {
                    return refusal;
                }
                match self.reloader.reload("admin API").await {
                    Ok(summary) => json_response(
                        200,
                        "application/json",
                        json!({"status": "reloaded", "config": summary}).to_string().into_bytes(),
                    ),
                    Err(diagnostics) => problem(
                        &GatewayError::InvalidConfiguration {
                            diagnostics: diagnostics.lines().map(String::from).collect(),
                        },
                        &path,
                    ),
                }
            }
            p if p.starts_with("/admin/events/dead-letters") => {
                if let Some(refusal) = self.refusal(session, "the event dead-letter API") {
                    return refusal;
                }
                self.event_dead_letters(session, p).await
            }
            p if p.starts_with("/admin/dead-letters") => {
                if let Some(refusal) = self.refusal(session, "the dead-letter API") {
                    return refusal;
                }
                self.dead_letters(session, p).await
            }
            p if p == "/admin/budgets" || p.starts_with("/admin/budgets/") => {
                if let Some(refusal) = self.refusal(session, "the budget API") {
                    return refusal;
                }
                self.budgets(session, p)
            }
            _ => problem(&GatewayError::UnknownOperationsPath { listener: "admin" }, &path),
        }
    }
}

impl AdminApp {
    /// `GET /admin/budgets` (every ERP budget: pause left, queue, in flight, window) and
    /// `POST /admin/budgets/{upstream}/resume` (end an overload pause now).
    fn budgets(&self, session: &ServerSession, path: &str) -> Response<Vec<u8>> {
        let config = self.config.load();
        let post = session.req_header().method == http::Method::POST;
        let rest: Vec<&str> = path.trim_start_matches("/admin/budgets").split('/').skip(1).collect();
        let budget_of = |name: &str| config.upstreams.get(name).and_then(|u| u.budget.as_ref());
        match (post, rest.as_slice()) {
            (false, []) => {
                let list: Vec<_> = config
                    .upstreams
                    .values()
                    .filter_map(|u| u.budget.as_ref().map(|b| b.budget.snapshot()))
                    .collect();
                json_response(200, "application/json", json!({ "value": list }).to_string().into_bytes())
            }
            (false, [name]) => match budget_of(name) {
                Some(b) => json_response(
                    200,
                    "application/json",
                    json!(b.budget.snapshot()).to_string().into_bytes(),
                ),
                None => no_budget(name, path),
            },
            (true, [name, "resume"]) => match budget_of(name) {
                Some(b) => {
                    let left = b.budget.resume();
                    let body = json!({
                        "upstream": name,
                        "resumed": true,
                        "pause_left_ms": left.as_millis() as u64,
                    });
                    json_response(200, "application/json", body.to_string().into_bytes())
                }
                None => no_budget(name, path),
            },
            _ => problem(&GatewayError::UnknownOperationsPath { listener: "admin" }, path),
        }
    }

    /// `None` when the admin token was presented as a bearer credential, else the problem
    /// to answer with.
    fn refusal(&self, session: &ServerSession, what: &str) -> Option<Response<Vec<u8>>> {
        let path = session.req_header().uri.path();
        let Some(token) = &self.admin_token else {
            return Some(problem(&GatewayError::AdminDisabled { what: what.into() }, path));
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return None;
        }
        let unauthenticated = GatewayError::Unauthenticated {
            reason: if presented.is_some() { "bad_admin_token" } else { "missing" },
            description: "the admin API takes Authorization: Bearer <CAUSEWAY_ADMIN_TOKEN>",
            challenge: "Bearer realm=\"causeway-admin\"".into(),
        };
        Some(problem(&unauthenticated, path))
    }

    /// `GET /admin/dead-letters`, `POST /admin/dead-letters/replay` (all) and
    /// `POST /admin/dead-letters/{id}/replay`.
    async fn dead_letters(&self, session: &ServerSession, path: &str) -> Response<Vec<u8>> {
        let Some(service) = &self.process else {
            return problem(&GatewayError::ProcessDisabled, path);
        };
        let post = session.req_header().method == http::Method::POST;
        let unavailable = |e: crate::process::store::StoreError| {
            tracing::error!(error = %e, "order store failure on the admin API");
            problem(&GatewayError::StoreUnavailableToOperator { detail: e.to_string() }, path)
        };
        let segments: Vec<&str> = path.trim_start_matches("/admin/dead-letters").split('/').skip(1).collect();
        match (post, segments.as_slice()) {
            (false, []) => match service.dead_letters(1000).await {
                Ok(list) => json_response(200, "application/json", list.to_string().into_bytes()),
                Err(e) => unavailable(e),
            },
            (true, ["replay"]) => match service.replay_all().await {
                Ok(n) => json_response(200, "application/json", json!({ "replayed": n }).to_string().into_bytes()),
                Err(e) => unavailable(e),
            },
            (true, [id, "replay"]) => match service.replay(id).await {
                Ok(true) => json_response(
                    202,
                    "application/json",
                    json!({ "replayed": 1, "order": format!("{}{id}", crate::process::service::ORDERS_PATH) })
                        .to_string()
                        .into_bytes(),
                ),
                Ok(false) => problem(&GatewayError::NotDeadLettered { id: id.to_string() }, path),
                Err(e) => unavailable(e),
            },
            _ => problem(&GatewayError::UnknownOperationsPath { listener: "admin" }, path),
        }
    }
}

impl AdminApp {
    /// `GET /admin/events/dead-letters`, `POST /admin/events/dead-letters/replay` (all) and
    /// `POST /admin/events/dead-letters/{event id}/replay` (docs/events.md).
    async fn event_dead_letters(&self, session: &ServerSession, path: &str) -> Response<Vec<u8>> {
        let Some(service) = &self.process else {
            return problem(&GatewayError::ProcessDisabled, path);
        };
        if self.config.load().events.is_none() {
            return problem(&GatewayError::EventsDisabled, path);
        }
        let unavailable = |e: crate::process::store::StoreError| {
            tracing::error!(error = %e, "order store failure on the admin API");
            problem(&GatewayError::StoreUnavailableToOperator { detail: e.to_string() }, path)
        };
        let outbox = match service.outbox().await {
            Ok(Some(o)) => o,
            Ok(None) => return problem(&GatewayError::EventsDisabled, path),
            Err(e) => return unavailable(e),
        };
        let post = session.req_header().method == http::Method::POST;
        let segments: Vec<&str> =
            path.trim_start_matches("/admin/events/dead-letters").split('/').skip(1).collect();
        let replayed = |n: u64| {
            json_response(200, "application/json", json!({ "replayed": n }).to_string().into_bytes())
        };
        match (post, segments.as_slice()) {
            (false, []) => match outbox.dead_deliveries(1000).await {
                Ok(list) => {
                    let value: Vec<_> = list
                        .iter()
                        .map(|d| {
                            json!({
                                "subscriber": d.subscriber, "eventId": d.event_id, "type": d.kind,
                                "orderId": d.order_id, "attempts": d.attempts, "lastError": d.last_error,
                                "time": crate::clock::format_datetime(d.time_ms),
                            })
                        })
                        .collect();
                    json_response(200, "application/json", json!({ "value": value }).to_string().into_bytes())
                }
                Err(e) => unavailable(e),
            },
            (true, ["replay"]) => match outbox.replay_deliveries(None).await {
                Ok(n) => replayed(n),
                Err(e) => unavailable(e),
            },
            (true, [id, "replay"]) => match outbox.replay_deliveries(Some(id)).await {
                Ok(0) => problem(&GatewayError::EventNotDeadLettered { id: id.to_string() }, path),
                Ok(n) => replayed(n),
                Err(e) => unavailable(e),
            },
            _ => problem(&GatewayError::UnknownOperationsPath { listener: "admin" }, path),
        }
    }
}

fn no_budget(name: &str, path: &str) -> Response<Vec<u8>> {
    problem(&GatewayError::BudgetNotFound { upstream: name.to_string() }, path)
}

pub struct MetricsApp {
    pub metrics: Arc<Metrics>,
    pub config: Arc<ArcSwap<Config>>,
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        if path != "/metrics" {
            return problem(&GatewayError::UnknownOperationsPath { listener: "metrics" }, &path);
        }
        // Gauges of what time changes by itself are brought up to date when they are read.
        for upstream in self.config.load().upstreams.values() {
            if let Some(b) = &upstream.budget {
                b.budget.publish_pause();
            }
        }
        json_response(200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render())
    }
}

/// Probes on an interval: every upstream with a TCP connect (`causeway_upstream_up`, reported
/// by `/readyz`), the order store and Redis (which decide `/readyz`).
pub struct UpstreamProbe {
    pub config: Arc<ArcSwap<Config>>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub process: Option<Arc<crate::process::service::QuoteToOrder>>,
}

/// A store or Redis that does not answer a trivial call within this is unreachable.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[async_trait]
impl BackgroundService for UpstreamProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let config = self.config.load_full();
            let upstreams =
                futures_util::future::join_all(config.upstreams.values().map(|upstream| async move {
                    let connect = tokio::net::TcpStream::connect(upstream.address);
                    (
                        upstream,
                        matches!(tokio::time::timeout(upstream.connect_timeout, connect).await, Ok(Ok(_))),
                    )
                }));
            let store = async {
                let service = self.process.as_ref()?;
                Some(match tokio::time::timeout(PROBE_TIMEOUT, service.ping_store()).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                })
            };
            let redis = async {
                let link = config.cluster.redis.as_ref()?;
                Some(matches!(tokio::time::timeout(PROBE_TIMEOUT, link.ping()).await, Ok(Ok(()))))
            };
            let (upstreams, store, redis) = tokio::join!(upstreams, store, redis);
            for (upstream, up) in upstreams {
                self.health.set(&upstream.name, up);
                self.metrics.upstream_up.with_label_values(&[upstream.name.as_str()]).set(i64::from(up));
            }
            if let Some(result) = store {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "order store unreachable: /readyz answers 503");
                }
                self.health.set_store(result);
            }
            if let Some(up) = redis {
                self.health.set_redis(up);
            }
            tokio::select! {
                _ = tokio::time::sleep(config.health_probe_interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
