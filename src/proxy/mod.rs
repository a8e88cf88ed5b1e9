//! The pingora `ProxyHttp` pipeline. Each hook is short and delegates: routing to [`router`],
//! header rules to [`hygiene`], policies to [`crate::policy`], errors to [`crate::error`].

mod admission;
mod checks;
mod edge;
pub mod framing;
pub mod hygiene;
mod mediated;
mod names;
pub mod normalize;
mod process;
mod respond;
mod upstream;

use checks::check_request;
use respond::{
    add_correlation_headers, add_cors_headers, add_lifecycle_headers, add_ratelimit_headers, respond_problem,
    write_local_response,
};
use upstream::{classify, prepare_upstream_request, report_upstream_status, scan_for_overload};

pub use process::OPENAPI;

use crate::budget::throttle;
use crate::config::{CompiledRoute, Config};
use crate::error::GatewayError;
use crate::observe::correlation::Correlation;
use crate::observe::metrics::{Metrics, UNMATCHED_ROUTE};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests currently being handled; SIGTERM waits for it to reach zero.
#[derive(Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Held by a request's context; releases its slot however the request ends.
pub struct InFlightGuard(Arc<InFlight>, Arc<Metrics>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
        self.1.in_flight.dec();
    }
}

pub struct Gateway {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    /// Request metrics of requests no route matched.
    unmatched: crate::observe::metrics::RouteMetrics,
    in_flight: Arc<InFlight>,
    /// The quote-to-order service, when `causeway.yaml` configures the process APIs.
    process: Option<Arc<crate::process::service::QuoteToOrder>>,
    /// Change detection, when `process.changes` configures it (the ERP's notifications).
    changes: Option<Arc<crate::changes::Changes>>,
}

/// How [`Gateway::dispatch`] left a request.
enum Answer {
    /// pingora proxies it to its upstream.
    Proxy,
    /// It was answered here.
    Local,
}

impl Gateway {
    /// Check, route and admit the request, then answer it in-process (process and mediated
    /// routes) or hand it to pingora to proxy.
    async fn dispatch(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Answer, GatewayError> {
        // Nothing after an ambiguous request can be trusted to be where it seems.
        check_request(session, ctx).inspect_err(|_| session.set_keepalive(None))?;
        if edge::answer_preflight(session, ctx).await? {
            return Ok(Answer::Local);
        }
        self.route(session, ctx).inspect_err(|err| {
            if matches!(err, GatewayError::BodyTooLarge { .. }) {
                // The body is left unread, so this connection cannot carry another request.
                session.set_keepalive(None);
            }
        })?;
        edge::check(session, ctx)?;
        admission::admit(session, ctx).await?;
        match ctx.route.as_ref().map(|r| (r.process, r.mediation().is_some())) {
            Some((Some(endpoint), _)) => {
                // Config checks refuse process routes without a `process:` block; a reload that
                // adds one needs a restart to start the service.
                let service = self.process.as_ref().ok_or(GatewayError::Internal)?;
                let changes = self.changes.as_ref();
                // Only the in-process answers need it apart from the context (a proxied request
                // does not pay for the copy).
                let correlation = ctx.correlation.correlation_id().to_string();
                crate::error::contain_panic(
                    &correlation,
                    process::serve(session, ctx, endpoint, service, changes),
                )
                .await?;
            }
            // Mediated routes are answered in-process: the body is checked and transformed before
            // any byte reaches the ERP, the response before any byte reaches the caller.
            Some((None, true)) => {
                let correlation = ctx.correlation.correlation_id().to_string();
                crate::error::contain_panic(&correlation, mediated::exchange(session, ctx)).await?
            }
            _ => {
                admission::acquire_erp_permit(ctx).await?;
                return Ok(Answer::Proxy);
            }
        }
        Ok(Answer::Local)
    }

    /// Route the request (404, 405 or 413 problems otherwise); records route, upstream path and
    /// deadline in the context.
    fn route(&self, session: &Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let req = session.req_header();
        let host =
            req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri.host());
        let path = ctx.path(session);
        let Some(found) = ctx.config.router.find(host, req.method.as_str(), path, req.uri.query()) else {
            let allowed = ctx.config.router.allowed_methods(host, path);
            return Err(if allowed.is_empty() {
                GatewayError::RouteNotFound { method: req.method.to_string(), path: path.to_string() }
            } else {
                GatewayError::MethodNotAllowed { method: req.method.to_string(), allowed }
            });
        };
        let route = found.route;
        ctx.upstream_path = found.upstream_path;
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = route.max_body_bytes;
        ctx.deadline = route.total_timeout.map(|t| ctx.start + t);
        let sunset = route.deprecation.as_ref().filter(|d| d.refuses_now());
        let retired = sunset.map(|d| GatewayError::RouteSunset {
            route: route.name.clone(),
            sunset: d.sunset_text().unwrap_or_default(),
            link: d.link.clone(),
        });
        ctx.route = Some(route);
        if let Some(retired) = retired {
            return Err(retired);
        }
        if declared.is_some_and(|len| len > limit) {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        Ok(())
    }

    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        in_flight: Arc<InFlight>,
        process: Option<Arc<crate::process::service::QuoteToOrder>>,
    ) -> Self {
        Gateway {
            config,
            metrics,
            unmatched: crate::observe::metrics::RouteMetrics::new(UNMATCHED_ROUTE),
            in_flight,
            process,
            changes: None,
        }
    }

    /// The gateway taking the ERP's change notifications on the `erp-notifications` route.
    pub fn with_changes(mut self, changes: Option<Arc<crate::changes::Changes>>) -> Self {
        self.changes = changes;
        self
    }
}

/// Per-request state. The config snapshot pins the request to the config it started with.
pub struct Ctx {
    config: Arc<Config>,
    start: Instant,
    correlation: Correlation,
    /// The client's address, behind trusted proxies resolved from their headers.
    client: Option<crate::edge::client_addr::ClientAddress>,
    /// The connection to the gateway is TLS.
    tls: bool,
    /// CORS headers for every answer to this request (an allowed origin of a `cors` route).
    cors: Vec<(&'static str, String)>,
    route: Option<Arc<CompiledRoute>>,
    /// The request path after normalization, when it differs from the raw one.
    normalized_path: Option<String>,
    upstream_path: String,
    deadline: Option<Instant>,
    body_bytes: u64,
    /// Set when the gateway itself decides the outcome (413 while streaming, for instance).
    failure: Option<GatewayError>,
    /// `type` slug of a problem we answered with, for the access log.
    problem: Option<&'static str>,
    upstream_sent: Option<Instant>,
    upstream_seconds: Option<f64>,
    consumer: Option<crate::policy::auth::Consumer>,
    /// `RateLimit-Policy` and `RateLimit` values for the response.
    ratelimit_headers: Option<(String, String)>,
    /// The ERP budget permit; dropped with the context, whatever path the request took.
    permit: Option<crate::budget::throttle::Permit>,
    /// Body substrings that mean "overload" for this response's status (vendor signals).
    overload_markers: Vec<String>,
    scanned: Vec<u8>,
    _in_flight: InFlightGuard,
}

impl Ctx {
    fn route_name(&self) -> &str {
        self.route.as_ref().map_or(UNMATCHED_ROUTE, |r| r.name.as_str())
    }

    /// The address limits, filters and logs act on.
    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.client.as_ref().map(|c| c.ip)
    }

    fn upstream_name(&self) -> String {
        self.route.as_ref().map(|r| r.upstream.name.clone()).unwrap_or_default()
    }

    /// The path routing used: normalized when normalization changed it.
    fn path<'a>(&'a self, session: &'a Session) -> &'a str {
        self.normalized_path.as_deref().unwrap_or_else(|| session.req_header().uri.path())
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // pingora adds a (disabled) response-compression module by default; its per-request
        // context costs a large allocation and memory on every idle keep-alive connection.
        // The ERP answers JSON over a local network: compression is not the gateway's job here.
    }

    fn new_ctx(&self) -> Ctx {
        self.in_flight.0.fetch_add(1, Ordering::AcqRel);
        self.metrics.in_flight.inc();
        Ctx {
            config: self.config.load_full(),
            start: Instant::now(),
            correlation: Correlation::default(),
            client: None,
            tls: false,
            cors: Vec::new(),
            route: None,
            normalized_path: None,
            upstream_path: String::new(),
            deadline: None,
            body_bytes: 0,
            failure: None,
            problem: None,
            upstream_sent: None,
            upstream_seconds: None,
            consumer: None,
            ratelimit_headers: None,
            permit: None,
            overload_markers: Vec::new(),
            scanned: Vec::new(),
            _in_flight: InFlightGuard(self.in_flight.clone(), self.metrics.clone()),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        ctx.correlation = Correlation::from_headers(
            req.headers.get(names::CORRELATION.name()),
            req.headers.get(names::TRACEPARENT.name()).map(|v| v.as_bytes()),
        );
        ctx.client = client_address(session, &ctx.config.listen);
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        match self.dispatch(session, ctx).await {
            Ok(Answer::Proxy) => Ok(false),
            Ok(Answer::Local) => Ok(true),
            Err(err) => {
                if session.response_written().is_none() {
                    respond_problem(session, ctx, &err).await?;
                }
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(route) = ctx.route.as_ref() else {
            return Err(Error::explain(ErrorType::InternalError, "upstream_peer without a route"));
        };
        let upstream = &route.upstream;
        let mut peer = HttpPeer::new(upstream.address, upstream.tls, upstream.sni.clone());
        if let Some(tls) = &upstream.tls_settings {
            // The same trust as the in-process client's (config::upstream_tls).
            peer.options.ca = tls.ca.clone();
            peer.client_cert_key = tls.client_cert.clone();
            peer.options.verify_cert = tls.verify;
            peer.options.verify_hostname = tls.verify;
        }
        let remaining = ctx.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            ctx.failure = Some(GatewayError::UpstreamTimeout { upstream: upstream.name.clone() });
            return Err(Error::explain(
                ErrorType::ConnectTimedout,
                "route deadline passed before connecting",
            ));
        }
        let cap = |d: Duration| remaining.map_or(d, |r| d.min(r));
        peer.options.connection_timeout = Some(cap(route.connect_timeout));
        peer.options.read_timeout = Some(cap(route.read_timeout));
        peer.options.write_timeout = Some(cap(upstream.write_timeout));
        peer.options.idle_timeout = Some(upstream.idle_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        prepare_upstream_request(upstream_request, ctx)?;
        ctx.upstream_sent = Some(Instant::now());
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let (Some(chunk), Some(route)) = (body.as_ref(), ctx.route.as_ref()) else { return Ok(()) };
        ctx.body_bytes += chunk.len() as u64;
        if ctx.body_bytes > route.max_body_bytes {
            ctx.failure = Some(GatewayError::BodyTooLarge { limit: route.max_body_bytes });
            return Err(Error::explain(ErrorType::HTTPStatus(413), "request body over the route's limit"));
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_seconds = ctx.upstream_sent.map(|t| t.elapsed().as_secs_f64());
        let retry_after = upstream_response.headers.get(http::header::RETRY_AFTER);
        if let Some(err) = report_upstream_status(ctx, upstream_response.status.as_u16(), retry_after) {
            ctx.failure = Some(err);
            return Err(Error::explain(ErrorType::HTTPStatus(503), "ERP overload signal"));
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        hygiene::strip_hop_by_hop_response(upstream_response);
        if let Some(route) = ctx.route.as_ref() {
            hygiene::strip_upstream_session(upstream_response, &route.strip_response);
        }
        add_correlation_headers(upstream_response, &ctx.correlation)?;
        add_ratelimit_headers(upstream_response, ctx)?;
        add_cors_headers(upstream_response, ctx)?;
        add_lifecycle_headers(upstream_response, ctx)?;
        if let Some(route) = ctx.route.as_ref() {
            for policy in &route.policies {
                policy.on_response(upstream_response);
            }
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if !ctx.overload_markers.is_empty() {
            scan_for_overload(ctx, body.as_deref(), end_of_stream);
        }
        // Per-read timeouts cannot bound a slow trickle; the route's total deadline does.
        if ctx.deadline.is_some_and(|d| Instant::now() > d) {
            ctx.failure = Some(GatewayError::UpstreamTimeout { upstream: ctx.upstream_name() });
            return Err(Error::explain(ErrorType::ReadTimedout, "route total deadline exceeded"));
        }
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        // The access log line carries the error together with the correlation id.
        true
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let err = ctx.failure.take().or_else(|| classify(e, ctx.upstream_name()));
        if let (
            Some(permit),
            Some(GatewayError::UpstreamTimeout { .. } | GatewayError::UpstreamUnreachable { .. }),
        ) = (ctx.permit.as_ref(), err.as_ref())
        {
            permit.budget().report(throttle::Outcome::Failure);
        }
        let Some(err) = err else {
            // The caller went away or broke the protocol: nobody to answer.
            return FailToProxy { error_code: 0, can_reuse_downstream: false };
        };
        if session.response_written().is_some() {
            // Headers are out; the only signal left is closing the connection.
            return FailToProxy { error_code: err.status(), can_reuse_downstream: false };
        }
        // The connection is not reused after a failed exchange: say so in the answer
        // (`Connection: close`), or a client may send its next request into the closing socket.
        session.set_keepalive(None);
        let code = respond_problem(session, ctx, &err).await.unwrap_or(0);
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let total = ctx.start.elapsed().as_secs_f64();
        let method = session.req_header().method.as_str();
        match ctx.route.as_ref() {
            Some(route) => {
                route.metrics.observe(method, status, total, ctx.upstream_seconds);
                if route.version.is_some() || route.deprecation.is_some() {
                    count_version_use(route, ctx.consumer.as_ref());
                }
            }
            None => self.unmatched.observe(method, status, total, None),
        }
        let error = e.map(|e| e.to_string());
        let mut line = crate::observe::logging::AccessLine::new()
            .str("route", ctx.route_name())
            .str("consumer", ctx.consumer.as_ref().map_or("anonymous", |c| &*c.name));
        if let Some(ip) = ctx.client_ip() {
            line = line.text_with("client", |out| crate::edge::client_addr::push_ip(out, ip));
        }
        line.str("method", method)
            .str("path", session.req_header().uri.path())
            .uint("status", u64::from(status))
            .millis("duration_ms", Some(total))
            .millis("upstream_ms", ctx.upstream_seconds)
            .opt_str("upstream", ctx.route.as_ref().map(|r| r.upstream.name.as_str()))
            .opt_str("problem", ctx.problem)
            .opt_str("error", error.as_deref())
            .str("correlation_id", ctx.correlation.correlation_id())
            .str("trace_id", ctx.correlation.trace_id())
            .write();
        if crate::observe::traces::enabled() {
            self.trace_request(session, ctx, status, total);
        }
        crate::observe::allocator::collect_if_due();
    }
}

/// A request to a versioned or deprecated route, by version and the consumer's tier (bounded:
/// a tier the route's policies name, else `other`).
fn count_version_use(route: &CompiledRoute, consumer: Option<&crate::policy::auth::Consumer>) {
    let version = route.version.as_deref().unwrap_or("unversioned");
    let tier = match consumer {
        None => "anonymous",
        Some(c) if route.known_tiers.contains(&c.tier) => &c.tier,
        Some(_) => "other",
    };
    Metrics::global().api_version_requests.with_label_values(&[route.name.as_str(), version, tier]).inc();
}

/// The connection's address, or the client behind it when it is a trusted proxy.
fn client_address(
    session: &Session,
    listen: &crate::config::Listen,
) -> Option<crate::edge::client_addr::ClientAddress> {
    use crate::edge::client_addr::ClientAddress;
    let peer = session.client_addr()?.as_inet()?.ip();
    if listen.trusted_proxies.is_empty() {
        return Some(ClientAddress::direct(peer));
    }
    let values = session.req_header().headers.get_all(listen.client_address_header.name());
    Some(ClientAddress::resolve(
        peer,
        values.iter().map(|v| v.as_bytes()),
        listen.client_address_header,
        &listen.trusted_proxies,
    ))
}

impl Gateway {
    /// The gateway's span of this request, with the ids it sent upstream and back to the caller
    /// (an order's ERP exchanges and deliveries are its children).
    fn trace_request(&self, session: &Session, ctx: &Ctx, status: u16, seconds: f64) {
        use crate::observe::traces::{Span, SpanIds};
        use opentelemetry::trace::{SpanId, SpanKind};
        let Some(ids) = SpanIds::parse(ctx.correlation.traceparent()) else { return };
        let parent = ctx.correlation.parent_id().and_then(|p| SpanId::from_hex(p).ok());
        let start = std::time::SystemTime::now() - Duration::from_secs_f64(seconds);
        let method = session.req_header().method.as_str();
        let route = ctx.route_name();
        let name = crate::observe::traces::bounded(&format!("{method} {route}"));
        let mut span = Span::with_ids(ids, parent, name, SpanKind::Server, start);
        span.attr("http.request.method", crate::observe::traces::bounded(method));
        span.attr("url.path", crate::observe::traces::bounded(session.req_header().uri.path()));
        span.attr("http.response.status_code", i64::from(status));
        span.attr("http.route", route.to_string());
        span.attr("causeway.consumer", ctx.consumer.as_ref().map_or("anonymous", |c| &*c.name).to_string());
        span.attr("causeway.correlation_id", ctx.correlation.correlation_id().to_string());
        if let Some(upstream) = ctx.route.as_ref().map(|r| r.upstream.name.clone()) {
            span.attr("causeway.upstream", upstream);
        }
        if let Some(problem) = ctx.problem {
            span.attr("causeway.problem", problem.to_string());
        }
        // A server span fails on a 5xx (or no answer) only: a 4xx is the caller's.
        if status >= 500 || status == 0 {
            span.fail(ctx.problem.unwrap_or("no answer"));
        }
        span.end();
    }
}

#[cfg(test)]
mod dispatch_tests;
