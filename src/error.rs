//! The one error type of everything a caller can be told, and its RFC 9457 rendering.
//!
//! Layers return a [`GatewayError`] — the proxy's routes, the process APIs and the admin listener
//! alike; [`GatewayError::to_problem`] renders it with the one builder ([`ProblemBuilder`]), which
//! pingora's own error answers use too. Rendering never logs: the access log records the outcome.
//! This module imports no domain type: domains convert into it.

use bytes::Bytes;
use serde_json::json;

/// Base of every problem `type` URI; the slug after it is stable and documented in the README.
pub const PROBLEM_BASE: &str = "https://causeway.dev/problems/";

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches {method} {path}")]
    RouteNotFound { method: String, path: String },
    /// The route's `deprecation.sunset` has passed (`after_sunset: refuse`).
    #[error("route {route} was retired on {sunset}")]
    RouteSunset { route: String, sunset: String, link: Option<String> },
    #[error("method {method} not allowed")]
    MethodNotAllowed { method: String, allowed: Vec<String> },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("upstream {upstream} unreachable")]
    UpstreamUnreachable { upstream: String },
    #[error("upstream {upstream} timed out")]
    UpstreamTimeout { upstream: String },
    #[error("upstream {upstream} sent an invalid response")]
    UpstreamProtocol { upstream: String },
    /// TLS with the ERP failed: its certificate is not trusted, does not name it, or it
    /// refused the gateway's client certificate.
    #[error("TLS with upstream {upstream} failed: {detail}")]
    UpstreamTls { upstream: String, detail: String },
    #[error("CORS: {detail}")]
    CorsRefused { detail: String },
    #[error("client address {ip} not allowed")]
    IpNotAllowed { ip: String },
    #[error("bad request: {detail}")]
    BadRequest { detail: String },
    /// `reason` is a stable code (a metrics label too), `description` says it in words.
    #[error("unauthenticated: {reason}")]
    Unauthenticated { reason: &'static str, description: &'static str, challenge: String },
    #[error("missing scopes {missing:?}")]
    Forbidden { missing: Vec<String> },
    #[error("rate limited")]
    RateLimited { retry_after: u64 },
    #[error("ERP budget of {upstream} exhausted")]
    ErpBusy { upstream: String, retry_after: u64 },
    #[error("circuit open for {upstream}")]
    ErpCircuitOpen { upstream: String, retry_after: u64 },
    #[error("ERP {upstream} signalled overload")]
    ErpOverloaded { upstream: String, retry_after: u64 },
    #[error("invalid JSON body: {detail}")]
    InvalidJson { detail: String },
    #[error("{} schema violation(s)", violations.len())]
    ValidationFailed { violations: Vec<Violation> },
    #[error("request cannot be mapped at {pointer}: {detail}")]
    RequestUnmappable { pointer: String, detail: String },
    #[error("ERP response cannot be mapped at {pointer}: {detail}")]
    ResponseUnmappable { upstream: String, pointer: String, detail: String },
    #[error("{direction} transformation failed: {detail}")]
    TransformFailed { direction: &'static str, detail: String },
    #[error("{direction} transformation exceeded {limit_ms} ms")]
    TransformTimeout { direction: &'static str, limit_ms: u64 },
    #[error("{direction} transformation output exceeded {limit} bytes")]
    TransformTooLarge { direction: &'static str, limit: usize },
    #[error("transformation workers busy")]
    TransformBusy,
    #[error("Idempotency-Key missing")]
    IdempotencyKeyMissing,
    #[error("Idempotency-Key invalid: {detail}")]
    IdempotencyKeyInvalid { detail: String },
    #[error("Idempotency-Key in use by a request still in flight")]
    IdempotencyKeyInFlight,
    #[error("Idempotency-Key reused with a different payload")]
    IdempotencyKeyReused,
    #[error("opportunity {opportunity_id} is `{stage}`, not Closed Won")]
    OpportunityNotWon { opportunity_id: String, stage: String },
    #[error("{} quote rule violation(s)", violations.len())]
    QuoteRejected { violations: Vec<RuleBreach> },
    #[error("the ERP rejected the order: {message}")]
    ErpRejected { upstream: String, message: String },
    #[error("order {id} not found")]
    OrderNotFound { id: String },
    #[error("order store unavailable: {detail}")]
    StoreUnavailable { detail: String },
    /// The store failed an operator's read or replay (admin listener): nothing changed.
    #[error("order store unavailable to the admin API: {detail}")]
    StoreUnavailableToOperator { detail: String },
    #[error("unsupported media type {found:?}")]
    UnsupportedMediaType { found: Option<String> },
    #[error("too many failed authentications from this address")]
    AuthThrottled { retry_after: u64 },
    #[error("opportunity {opportunity_id} already has an order of another consumer")]
    OpportunityTaken { opportunity_id: String },
    #[error("the admin API is disabled")]
    AdminDisabled { what: String },
    #[error("configuration rejected")]
    InvalidConfiguration { diagnostics: Vec<String> },
    #[error("process APIs not configured")]
    ProcessDisabled,
    #[error("order {id} is not dead-lettered")]
    NotDeadLettered { id: String },
    #[error("no event subscribers")]
    EventsDisabled,
    #[error("event {id} has no dead-lettered delivery")]
    EventNotDeadLettered { id: String },
    #[error("change notifications not configured")]
    ChangesDisabled,
    #[error("notification not authenticated")]
    NotificationUnauthenticated,
    #[error("notification already received")]
    NotificationReplayed,
    #[error("notification names nothing this gateway follows")]
    NotificationUnknownResource { refused: Vec<String> },
    #[error("change detection backlog full")]
    ChangeBacklogFull,
    #[error("no budget for upstream {upstream}")]
    BudgetNotFound { upstream: String },
    #[error("no such path on this listener")]
    UnknownOperationsPath { listener: &'static str },
    #[error("not ready")]
    NotReady { checks: serde_json::Value },
    #[error("internal error")]
    Internal,
}

/// One schema violation: where in the document, which keyword failed, and the validator's words.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Violation {
    /// `body`, `query` or `headers`.
    pub location: &'static str,
    /// JSON pointer into that document.
    pub pointer: String,
    pub keyword: String,
    pub message: String,
}

/// A business rule a request broke (the process APIs' rules), as the caller reads it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RuleBreach {
    /// JSON pointer into the request.
    pub pointer: String,
    /// Stable code, e.g. `customer.blocked`.
    pub code: &'static str,
    pub message: String,
    /// What the caller can do about it.
    pub remedy: String,
}

/// The media type of every problem.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// A rendered problem: status, body, the headers it needs (content type, `cache-control`, and
/// `WWW-Authenticate`, `Retry-After` or `Allow` where the status calls for one) and the `type`
/// slug (for logs and metrics). Every listener writes these as they are.
pub struct Problem {
    pub status: u16,
    pub slug: &'static str,
    pub body: Bytes,
    pub headers: Vec<(&'static str, String)>,
}

/// Builds every problem body: `type`, `title`, `status`, `detail`, `instance` (when known),
/// `correlation_id`, and members of its own.
pub struct ProblemBuilder {
    status: u16,
    slug: &'static str,
    body: serde_json::Map<String, serde_json::Value>,
    headers: Vec<(&'static str, String)>,
}

impl ProblemBuilder {
    pub fn new(status: u16, slug: &'static str, title: &str, detail: &str, correlation_id: &str) -> Self {
        let mut body = serde_json::Map::new();
        body.insert("type".into(), json!(format!("{PROBLEM_BASE}{slug}")));
        body.insert("title".into(), json!(title));
        body.insert("status".into(), json!(status));
        body.insert("detail".into(), json!(detail));
        body.insert("correlation_id".into(), json!(correlation_id));
        let headers =
            vec![("content-type", PROBLEM_CONTENT_TYPE.to_string()), ("cache-control", "no-store".into())];
        ProblemBuilder { status, slug, body, headers }
    }

    /// The request path the problem is about (left out when unknown or empty).
    pub fn instance(mut self, instance: &str) -> Self {
        if !instance.is_empty() {
            self.body.insert("instance".into(), json!(instance));
        }
        self
    }

    pub fn member(mut self, name: &str, value: serde_json::Value) -> Self {
        self.body.insert(name.into(), value);
        self
    }

    pub fn header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn build(self) -> Problem {
        let body = Bytes::from(serde_json::Value::Object(self.body).to_string());
        Problem { status: self.status, slug: self.slug, body, headers: self.headers }
    }
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::RouteNotFound { .. } => 404,
            GatewayError::RouteSunset { .. } => 410,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::UpstreamUnreachable { .. } | GatewayError::UpstreamProtocol { .. } => 502,
            GatewayError::UpstreamTimeout { .. } => 504,
            GatewayError::UpstreamTls { .. } => 502,
            GatewayError::CorsRefused { .. } | GatewayError::IpNotAllowed { .. } => 403,
            GatewayError::BadRequest { .. } | GatewayError::InvalidJson { .. } => 400,
            GatewayError::ValidationFailed { .. } | GatewayError::RequestUnmappable { .. } => 422,
            GatewayError::ResponseUnmappable { .. } => 502,
            GatewayError::TransformFailed { .. }
            | GatewayError::TransformTimeout { .. }
            | GatewayError::TransformTooLarge { .. } => 500,
            GatewayError::TransformBusy => 503,
            GatewayError::Internal => 500,
            GatewayError::AdminDisabled { .. } => 403,
            GatewayError::InvalidConfiguration { .. } => 422,
            GatewayError::ProcessDisabled
            | GatewayError::EventsDisabled
            | GatewayError::ChangesDisabled
            | GatewayError::BudgetNotFound { .. }
            | GatewayError::UnknownOperationsPath { .. } => 404,
            GatewayError::NotificationUnauthenticated => 401,
            GatewayError::NotificationReplayed => 409,
            GatewayError::NotificationUnknownResource { .. } => 422,
            GatewayError::ChangeBacklogFull => 503,
            GatewayError::NotDeadLettered { .. } | GatewayError::EventNotDeadLettered { .. } => 409,
            GatewayError::NotReady { .. } => 503,
            GatewayError::UnsupportedMediaType { .. } => 415,
            GatewayError::AuthThrottled { .. } => 429,
            GatewayError::OpportunityTaken { .. } => 409,
            GatewayError::IdempotencyKeyMissing | GatewayError::IdempotencyKeyInvalid { .. } => 400,
            GatewayError::IdempotencyKeyInFlight => 409,
            GatewayError::IdempotencyKeyReused
            | GatewayError::OpportunityNotWon { .. }
            | GatewayError::QuoteRejected { .. }
            | GatewayError::ErpRejected { .. } => 422,
            GatewayError::OrderNotFound { .. } => 404,
            GatewayError::StoreUnavailable { .. } | GatewayError::StoreUnavailableToOperator { .. } => 503,
            GatewayError::Unauthenticated { .. } => 401,
            GatewayError::Forbidden { .. } => 403,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::ErpBusy { .. }
            | GatewayError::ErpCircuitOpen { .. }
            | GatewayError::ErpOverloaded { .. } => 503,
        }
    }

    /// Headers the status requires besides the body: `WWW-Authenticate`, `Retry-After`.
    fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            GatewayError::Unauthenticated { challenge, .. } => vec![("www-authenticate", challenge.clone())],
            GatewayError::RateLimited { retry_after }
            | GatewayError::AuthThrottled { retry_after }
            | GatewayError::ErpBusy { retry_after, .. }
            | GatewayError::ErpCircuitOpen { retry_after, .. }
            | GatewayError::ErpOverloaded { retry_after, .. } => {
                vec![("retry-after", retry_after.to_string())]
            }
            GatewayError::MethodNotAllowed { allowed, .. } => vec![("allow", allowed.join(", "))],
            GatewayError::UnsupportedMediaType { .. } => vec![("accept-post", "application/json".into())],
            GatewayError::TransformBusy | GatewayError::IdempotencyKeyInFlight => {
                vec![("retry-after", "1".into())]
            }
            GatewayError::StoreUnavailable { .. } => vec![("retry-after", "5".into())],
            GatewayError::ChangeBacklogFull => vec![("retry-after", "30".into())],
            _ => Vec::new(),
        }
    }

    fn slug_title(&self) -> (&'static str, &'static str) {
        match self {
            GatewayError::RouteNotFound { .. } => ("route-not-found", "No route matches this request"),
            GatewayError::RouteSunset { .. } => ("route-sunset", "This API version has been retired"),
            GatewayError::BodyTooLarge { .. } => ("body-too-large", "Request body too large"),
            GatewayError::MethodNotAllowed { .. } => {
                ("method-not-allowed", "Method not allowed on this path")
            }
            GatewayError::UpstreamUnreachable { .. } => {
                ("upstream-unreachable", "The ERP could not be reached")
            }
            GatewayError::UpstreamTimeout { .. } => ("upstream-timeout", "The ERP did not answer in time"),
            GatewayError::UpstreamTls { .. } => {
                ("upstream-tls-failed", "The ERP's TLS certificate could not be verified")
            }
            GatewayError::CorsRefused { .. } => ("cors-refused", "Not allowed from this browser origin"),
            GatewayError::IpNotAllowed { .. } => ("ip-not-allowed", "Not allowed from this address"),
            GatewayError::UpstreamProtocol { .. } => {
                ("upstream-invalid-response", "The ERP sent an invalid response")
            }
            GatewayError::BadRequest { .. } => ("bad-request", "The request is malformed"),
            GatewayError::Internal => ("internal", "Internal gateway error"),
            GatewayError::AdminDisabled { .. } => ("admin-disabled", "Admin API disabled"),
            GatewayError::InvalidConfiguration { .. } => ("invalid-configuration", "Configuration rejected"),
            GatewayError::ProcessDisabled => ("process-disabled", "Process APIs not configured"),
            GatewayError::NotDeadLettered { .. } => ("not-dead-lettered", "Order is not dead-lettered"),
            GatewayError::EventsDisabled => ("events-disabled", "No event subscribers configured"),
            GatewayError::EventNotDeadLettered { .. } => {
                ("event-not-dead-lettered", "Event has no dead-lettered delivery")
            }
            GatewayError::ChangesDisabled => ("changes-disabled", "Change notifications are not configured"),
            GatewayError::NotificationUnauthenticated => {
                ("notification-unauthenticated", "Notification not authenticated")
            }
            GatewayError::NotificationReplayed => ("notification-replayed", "Notification already received"),
            GatewayError::NotificationUnknownResource { .. } => {
                ("notification-unknown-resource", "Notification names nothing this gateway follows")
            }
            GatewayError::ChangeBacklogFull => ("change-backlog-full", "Too many changes waiting to be read"),
            GatewayError::BudgetNotFound { .. } => ("budget-not-found", "No such ERP budget"),
            GatewayError::UnknownOperationsPath { .. } => ("route-not-found", "Not found"),
            GatewayError::NotReady { .. } => ("not-ready", "Not ready"),
            GatewayError::UnsupportedMediaType { .. } => {
                ("unsupported-media-type", "The request body must be JSON")
            }
            GatewayError::AuthThrottled { .. } => {
                ("too-many-authentication-failures", "Too many failed authentications")
            }
            GatewayError::OpportunityTaken { .. } => {
                ("opportunity-taken", "The opportunity already has an order of another consumer")
            }
            GatewayError::InvalidJson { .. } => ("invalid-json", "The request body is not valid JSON"),
            GatewayError::ValidationFailed { .. } => {
                ("validation-failed", "The request does not match the route's schema")
            }
            GatewayError::RequestUnmappable { .. } => {
                ("request-unmappable", "The request cannot be translated for the ERP")
            }
            GatewayError::ResponseUnmappable { .. } => {
                ("response-unmappable", "The ERP's response cannot be translated")
            }
            GatewayError::TransformFailed { .. } => ("transformation-failed", "A transformation failed"),
            GatewayError::TransformTimeout { .. } => {
                ("transformation-timeout", "A transformation exceeded its time bound")
            }
            GatewayError::TransformTooLarge { .. } => {
                ("transformation-too-large", "A transformation exceeded its size bound")
            }
            GatewayError::TransformBusy => ("transformation-busy", "Transformation capacity exhausted"),
            GatewayError::IdempotencyKeyMissing => {
                ("idempotency-key-missing", "This operation requires an Idempotency-Key")
            }
            GatewayError::IdempotencyKeyInvalid { .. } => {
                ("idempotency-key-invalid", "The Idempotency-Key is not a valid key")
            }
            GatewayError::IdempotencyKeyInFlight => {
                ("idempotency-key-in-flight", "A request with this Idempotency-Key is still being processed")
            }
            GatewayError::IdempotencyKeyReused => {
                ("idempotency-key-reused", "The Idempotency-Key was used for a different payload")
            }
            GatewayError::OpportunityNotWon { .. } => {
                ("opportunity-not-closed-won", "Only Closed Won opportunities become orders")
            }
            GatewayError::QuoteRejected { .. } => ("quote-rejected", "The quote breaks the order rules"),
            GatewayError::ErpRejected { .. } => ("erp-rejected", "The ERP refused the order"),
            GatewayError::OrderNotFound { .. } => ("order-not-found", "No such order"),
            GatewayError::StoreUnavailable { .. } | GatewayError::StoreUnavailableToOperator { .. } => {
                ("store-unavailable", "The order store is temporarily unavailable")
            }
            GatewayError::Unauthenticated { .. } => ("unauthenticated", "Authentication required"),
            GatewayError::Forbidden { .. } => ("insufficient-scope", "Missing scope"),
            GatewayError::RateLimited { .. } => ("quota-exceeded", "Request quota exceeded"),
            GatewayError::ErpBusy { .. } => {
                ("temporarily-reduced-capacity", "ERP capacity temporarily exhausted")
            }
            GatewayError::ErpCircuitOpen { .. } => ("erp-unavailable", "ERP temporarily unavailable"),
            GatewayError::ErpOverloaded { .. } => ("erp-overloaded", "The ERP asked to slow down"),
        }
    }

    /// What happened and what the caller can do about it.
    fn detail(&self) -> String {
        match self {
            GatewayError::RouteSunset { route, sunset, link } => format!(
                "Route `{route}` was retired on {sunset}. {}",
                link.as_ref().map_or("Ask the API's owner which version replaces it.".to_string(), |l| {
                    format!("Move to the version described at {l}.")
                })
            ),
            GatewayError::RouteNotFound { method, path } => format!(
                "No route accepts {method} {path}. Check the path and method against the gateway's published routes."
            ),
            GatewayError::MethodNotAllowed { method, allowed } => format!(
                "{method} is not accepted here; this path takes {}. The Allow header lists them.",
                allowed.join(", ")
            ),
            GatewayError::BodyTooLarge { limit } => format!(
                "This route accepts request bodies of at most {limit} bytes. Send a smaller body or split the request."
            ),
            GatewayError::UpstreamUnreachable { upstream } => format!(
                "The gateway could not connect to the ERP `{upstream}`. Nothing was sent to it; retry later."
            ),
            GatewayError::UpstreamTimeout { upstream } => format!(
                "The ERP `{upstream}` did not answer within the route's timeout. A write may or may not have been applied: check before retrying, or use an idempotent process API."
            ),
            GatewayError::UpstreamTls { upstream, detail } => format!(
                "The gateway could not establish TLS with the ERP `{upstream}` ({detail}), so nothing was sent to it. An operator must fix `upstreams.{upstream}.tls` (ca_file for a private CA, sni, client_cert/client_key) or the ERP's certificate; retrying will not help until then."
            ),
            GatewayError::CorsRefused { detail } => format!(
                "{detail}. Browser callers are accepted from the origins, methods and headers the route's cors policy lists; ask the API's owner to add yours."
            ),
            GatewayError::IpNotAllowed { ip } => format!(
                "This route does not accept requests from {ip}. Call from an allowed network, or ask the API's owner to allow yours."
            ),
            GatewayError::UpstreamProtocol { upstream } => format!(
                "The ERP `{upstream}` closed the connection or answered with an invalid response. Retry later."
            ),
            GatewayError::BadRequest { detail } => format!("{detail}. Correct the request and send it again."),
            GatewayError::Internal => "The gateway failed unexpectedly. Retry; if it persists, report the correlation id.".into(),
            GatewayError::AdminDisabled { what } => format!("Set CAUSEWAY_ADMIN_TOKEN to enable {what}."),
            GatewayError::InvalidConfiguration { .. } => "The new configuration is invalid; the previous one keeps serving. Fix the files listed in `diagnostics`.".into(),
            GatewayError::ProcessDisabled => "causeway.yaml has no `process:` block, so there are no orders.".into(),
            GatewayError::NotDeadLettered { id } => format!(
                "Order `{id}` is not dead-lettered; only dead-lettered orders can be replayed. GET /admin/dead-letters lists them."
            ),
            GatewayError::EventsDisabled => "causeway.yaml declares no event subscribers (`events:`, see docs/events.md), so there are no event deliveries.".into(),
            GatewayError::EventNotDeadLettered { id } => format!(
                "Event `{id}` has no dead-lettered delivery; only those can be replayed. GET /admin/events/dead-letters lists them."
            ),
            GatewayError::ChangesDisabled => "This gateway does not take change notifications: causeway.yaml has no `process.changes` with a `notification_url` (see docs/events.md).".into(),
            GatewayError::NotificationUnauthenticated => "Every notification must carry the `clientState` the subscription was created with; this one did not, so nothing was read or changed.".into(),
            GatewayError::NotificationReplayed => "Every notification in this request was received before (same subscription, resource, change type and time); nothing was read or changed again.".into(),
            GatewayError::NotificationUnknownResource { refused } => format!(
                "No notification in this request names an order or invoice this gateway follows ({}); nothing was read or changed. Subscriptions must name the configured company's salesOrders or salesInvoices.",
                refused.join("; ")
            ),
            GatewayError::ChangeBacklogFull => "Too many changes are waiting to be read from the ERP; send the notification again after Retry-After.".into(),
            GatewayError::BudgetNotFound { upstream } => {
                format!("No upstream `{upstream}` with a budget; GET /admin/budgets lists them.")
            }
            GatewayError::UnknownOperationsPath { listener } => match *listener {
                "metrics" => "This listener serves /metrics only.".into(),
                _ => "This listener serves /healthz, /readyz, /admin/reload, /admin/budgets[/{upstream}[/resume]] and /admin/dead-letters[/{id}]/replay.".into(),
            },
            GatewayError::NotReady { .. } => "This replica cannot take traffic: what `checks` names as unreachable (the order store, or Redis where a fail-closed setting needs it) did not answer the last probe. A load balancer should send requests to other replicas until it does.".into(),
            GatewayError::UnsupportedMediaType { found } => format!(
                "This route reads a JSON body, but the request's Content-Type is {}. Send the body with Content-Type: application/json.",
                found.as_deref().map_or("missing".to_string(), |f| format!("`{f}`"))
            ),
            GatewayError::AuthThrottled { retry_after } => format!(
                "Too many requests from your address failed authentication, so none is checked for now. Fix the credential, then retry after {retry_after} s."
            ),
            GatewayError::OpportunityTaken { opportunity_id } => format!(
                "Opportunity `{opportunity_id}` already has an order submitted by another consumer, and one deal becomes one ERP order. Check the opportunity id; the consumer that owns the order can look it up."
            ),
            GatewayError::InvalidJson { detail } => format!(
                "The body could not be parsed as JSON ({detail}). Send a JSON document with Content-Type application/json."
            ),
            GatewayError::ValidationFailed { violations } => format!(
                "{} violation(s) of the route's schema; `errors` lists each with its JSON pointer and the keyword that failed. Nothing was sent to the ERP: fix them all and send again.",
                violations.len()
            ),
            GatewayError::RequestUnmappable { pointer, detail } => format!(
                "The value at `{pointer}` cannot be translated for the ERP: {detail}. Nothing was sent to the ERP: correct the value and send again."
            ),
            GatewayError::ResponseUnmappable { upstream, pointer, detail } => format!(
                "The ERP `{upstream}` answered, but its response cannot be translated at `{pointer}`: {detail}. The request may have been applied: check before retrying, and report the correlation id."
            ),
            GatewayError::TransformFailed { direction, detail } => format!(
                "The {direction} transformation of this route failed: {detail}. Report the correlation id to the gateway's operators."
            ),
            GatewayError::TransformTimeout { direction, limit_ms } => format!(
                "The {direction} transformation of this route did not finish within {limit_ms} ms and was abandoned. Report the correlation id to the gateway's operators."
            ),
            GatewayError::TransformTooLarge { direction, limit } => format!(
                "The {direction} transformation of this route produced more than {limit} bytes and was abandoned. Send a smaller document or report the correlation id."
            ),
            GatewayError::TransformBusy => "Every transformation worker is busy. Nothing was sent to the ERP; retry in a second.".into(),
            GatewayError::IdempotencyKeyMissing => "Send an `Idempotency-Key` header (a quoted string, e.g. a UUID) with every POST; retries of the same order must reuse it.".into(),
            GatewayError::IdempotencyKeyInvalid { detail } => format!(
                "The Idempotency-Key header {detail}. Send a structured-field string of 1 to 255 printable characters, e.g. \"8e03978e-40d5-43e8-bc93-6894a57f9324\"."
            ),
            GatewayError::IdempotencyKeyInFlight => "The first request with this Idempotency-Key has not finished. Retry in a second: you will get its stored response.".into(),
            GatewayError::IdempotencyKeyReused => "This Idempotency-Key was first used with a different body. Use a new key for a new order, or resend the original body.".into(),
            GatewayError::OpportunityNotWon { opportunity_id, stage } => format!(
                "Opportunity {opportunity_id} has StageName `{stage}`. Only `Closed Won` opportunities are turned into orders: send it again once the deal is won."
            ),
            GatewayError::QuoteRejected { violations } => format!(
                "{} rule violation(s); `violations` lists each with its JSON pointer, code and remedy. Nothing was written to the ERP: fix them all and submit again (a new Idempotency-Key is not needed).",
                violations.len()
            ),
            GatewayError::ErpRejected { upstream, message } => format!(
                "The ERP `{upstream}` refused the order: {message}. Nothing was created; correct the data in the CRM or the ERP and submit again."
            ),
            GatewayError::OrderNotFound { id } => format!(
                "No order `{id}` is known to this gateway. Use the id from the Location header of the submission, or look the order up by opportunity id."
            ),
            GatewayError::StoreUnavailable { detail } => format!(
                "The gateway could not record the order ({detail}). Nothing was sent to the ERP; retry with the same Idempotency-Key."
            ),
            GatewayError::StoreUnavailableToOperator { detail } => format!(
                "The order store could not be read or changed ({detail}); nothing changed. Retry; if it persists, check the store's disk and the gateway's log."
            ),
            GatewayError::Unauthenticated { description, .. } => format!(
                "Authentication failed: {description}. Send a valid bearer token or API key as this route requires."
            ),
            GatewayError::Forbidden { missing } => format!(
                "The credential is valid but lacks the scope(s) {}. Ask for a token or key that grants them.",
                missing.join(", ")
            ),
            GatewayError::RateLimited { retry_after } => format!(
                "Your quota for this route is used up. Retry after {retry_after} s; the RateLimit headers show the quota."
            ),
            GatewayError::ErpBusy { upstream, retry_after } => format!(
                "The ERP `{upstream}` is at its request budget and your request could not be admitted in time. Nothing was sent; retry after {retry_after} s."
            ),
            GatewayError::ErpCircuitOpen { upstream, retry_after } => format!(
                "Recent requests to the ERP `{upstream}` failed, so the gateway is not sending more for now. Nothing was sent; retry after {retry_after} s."
            ),
            GatewayError::ErpOverloaded { upstream, retry_after } => format!(
                "The ERP `{upstream}` answered that it is overloaded; the gateway paused all traffic to it. Retry after {retry_after} s."
            ),
        }
    }

    /// The RFC 9457 problem, with the correlation id so the caller can quote it.
    pub fn to_problem(&self, instance: &str, correlation_id: &str) -> Problem {
        let (slug, title) = self.slug_title();
        let mut p = ProblemBuilder::new(self.status(), slug, title, &self.detail(), correlation_id)
            .instance(instance);
        p = match self {
            GatewayError::BodyTooLarge { limit } => p.member("max_body_bytes", json!(limit)),
            GatewayError::RouteSunset { sunset, link, .. } => {
                p.member("sunset", json!(sunset)).member("link", json!(link))
            }
            GatewayError::Forbidden { missing } => p.member("missing_scopes", json!(missing)),
            GatewayError::Unauthenticated { reason, .. } => p.member("reason", json!(reason)),
            GatewayError::ValidationFailed { violations } => p.member("errors", json!(violations)),
            GatewayError::RequestUnmappable { pointer, .. } => p.member("pointer", json!(pointer)),
            GatewayError::QuoteRejected { violations } => p.member("violations", json!(violations)),
            GatewayError::ErpRejected { message, .. } => p.member("erp_message", json!(message)),
            GatewayError::InvalidConfiguration { diagnostics } => p.member("diagnostics", json!(diagnostics)),
            GatewayError::NotReady { checks } => p.member("checks", checks.clone()),
            _ => p,
        };
        for (name, value) in self.headers() {
            p = p.header(name, value);
        }
        p.build()
    }
}

/// Run an in-process handler (process APIs, mediation): a panic in it becomes a 500 problem
/// and a log line with the correlation id, never a dropped connection.
pub async fn contain_panic<T>(
    correlation_id: &str,
    handler: impl std::future::Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(handler).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(correlation_id, panic = %what, "request handler panicked; answered 500");
            Err(GatewayError::Internal)
        }
    }
}

/// The body of the error answers pingora writes before the gateway's hooks run (a request it
/// cannot parse, for instance): still RFC 9457, with a correlation id minted for the log.
pub fn pingora_error_body(status: u16) -> Option<(&'static str, Bytes)> {
    let (slug, title, detail) = match status {
        400 => (
            "bad-request",
            "The request is malformed",
            "The request is not valid HTTP/1.1: check the request line, the header fields (their syntax, size and number) and the framing (one Content-Length or Transfer-Encoding: chunked, CRLF line endings). Correct the request and send it again.",
        ),
        405 => (
            "method-not-allowed",
            "Method not allowed",
            "This method is not accepted by the gateway.",
        ),
        408 => (
            "request-timeout",
            "The request did not arrive in time",
            "The request header or body was not received in time. Send it again without pausing.",
        ),
        413 | 431 => (
            "request-too-large",
            "The request is too large",
            "The request header or body is larger than the gateway accepts. Send a smaller request.",
        ),
        502..=504 => (
            "upstream-unreachable",
            "The ERP could not be reached",
            "The gateway could not complete the exchange with the ERP. Retry later.",
        ),
        _ => ("internal", "Internal gateway error", "The gateway failed unexpectedly. Retry; if it persists, report the correlation id."),
    };
    let correlation_id = uuid::Uuid::now_v7().to_string();
    let problem = ProblemBuilder::new(status, slug, title, detail, &correlation_id).build();
    Some((PROBLEM_CONTENT_TYPE, problem.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_has_rfc9457_members_and_correlation_id() {
        let p = GatewayError::BodyTooLarge { limit: 10 }.to_problem("/x", "abc");
        assert_eq!(p.status, 413);
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["type"], "https://causeway.dev/problems/body-too-large");
        assert_eq!(v["status"], 413);
        assert_eq!(v["instance"], "/x");
        assert_eq!(v["correlation_id"], "abc");
        assert_eq!(v["max_body_bytes"], 10);
        assert!(v["detail"].as_str().unwrap().contains("at most 10 bytes"));
    }

    /// One of every variant; the match below has no wildcard, so a new variant must be added here.
    fn every_variant() -> Vec<GatewayError> {
        let s = || "x".to_string();
        let all = vec![
            GatewayError::RouteNotFound { method: "GET".into(), path: "/x".into() },
            GatewayError::RouteSunset { route: s(), sunset: s(), link: Some(s()) },
            GatewayError::MethodNotAllowed { method: "PUT".into(), allowed: vec!["GET".into()] },
            GatewayError::BodyTooLarge { limit: 10 },
            GatewayError::UpstreamUnreachable { upstream: s() },
            GatewayError::UpstreamTimeout { upstream: s() },
            GatewayError::UpstreamProtocol { upstream: s() },
            GatewayError::UpstreamTls { upstream: s(), detail: s() },
            GatewayError::CorsRefused { detail: s() },
            GatewayError::IpNotAllowed { ip: s() },
            GatewayError::BadRequest { detail: s() },
            GatewayError::Unauthenticated {
                reason: "missing",
                description: "none",
                challenge: "Bearer".into(),
            },
            GatewayError::Forbidden { missing: vec![s()] },
            GatewayError::RateLimited { retry_after: 1 },
            GatewayError::ErpBusy { upstream: s(), retry_after: 1 },
            GatewayError::ErpCircuitOpen { upstream: s(), retry_after: 1 },
            GatewayError::ErpOverloaded { upstream: s(), retry_after: 1 },
            GatewayError::InvalidJson { detail: s() },
            GatewayError::ValidationFailed { violations: vec![] },
            GatewayError::RequestUnmappable { pointer: s(), detail: s() },
            GatewayError::ResponseUnmappable { upstream: s(), pointer: s(), detail: s() },
            GatewayError::TransformFailed { direction: "request", detail: s() },
            GatewayError::TransformTimeout { direction: "request", limit_ms: 1 },
            GatewayError::TransformTooLarge { direction: "request", limit: 1 },
            GatewayError::TransformBusy,
            GatewayError::IdempotencyKeyMissing,
            GatewayError::IdempotencyKeyInvalid { detail: s() },
            GatewayError::IdempotencyKeyInFlight,
            GatewayError::IdempotencyKeyReused,
            GatewayError::OpportunityNotWon { opportunity_id: s(), stage: s() },
            GatewayError::QuoteRejected { violations: vec![] },
            GatewayError::ErpRejected { upstream: s(), message: s() },
            GatewayError::OrderNotFound { id: s() },
            GatewayError::StoreUnavailable { detail: s() },
            GatewayError::StoreUnavailableToOperator { detail: s() },
            GatewayError::UnsupportedMediaType { found: None },
            GatewayError::AuthThrottled { retry_after: 1 },
            GatewayError::OpportunityTaken { opportunity_id: s() },
            GatewayError::AdminDisabled { what: s() },
            GatewayError::InvalidConfiguration { diagnostics: vec![] },
            GatewayError::ProcessDisabled,
            GatewayError::NotDeadLettered { id: s() },
            GatewayError::EventsDisabled,
            GatewayError::EventNotDeadLettered { id: s() },
            GatewayError::ChangesDisabled,
            GatewayError::NotificationUnauthenticated,
            GatewayError::NotificationReplayed,
            GatewayError::NotificationUnknownResource { refused: vec![s()] },
            GatewayError::ChangeBacklogFull,
            GatewayError::BudgetNotFound { upstream: s() },
            GatewayError::UnknownOperationsPath { listener: "admin" },
            GatewayError::NotReady { checks: json!({}) },
            GatewayError::Internal,
        ];
        for e in &all {
            match e {
                GatewayError::RouteNotFound { .. }
                | GatewayError::RouteSunset { .. }
                | GatewayError::MethodNotAllowed { .. }
                | GatewayError::BodyTooLarge { .. }
                | GatewayError::UpstreamUnreachable { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::UpstreamProtocol { .. }
                | GatewayError::UpstreamTls { .. }
                | GatewayError::CorsRefused { .. }
                | GatewayError::IpNotAllowed { .. }
                | GatewayError::BadRequest { .. }
                | GatewayError::Unauthenticated { .. }
                | GatewayError::Forbidden { .. }
                | GatewayError::RateLimited { .. }
                | GatewayError::ErpBusy { .. }
                | GatewayError::ErpCircuitOpen { .. }
                | GatewayError::ErpOverloaded { .. }
                | GatewayError::InvalidJson { .. }
                | GatewayError::ValidationFailed { .. }
                | GatewayError::RequestUnmappable { .. }
                | GatewayError::ResponseUnmappable { .. }
                | GatewayError::TransformFailed { .. }
                | GatewayError::TransformTimeout { .. }
                | GatewayError::TransformTooLarge { .. }
                | GatewayError::TransformBusy
                | GatewayError::IdempotencyKeyMissing
                | GatewayError::IdempotencyKeyInvalid { .. }
                | GatewayError::IdempotencyKeyInFlight
                | GatewayError::IdempotencyKeyReused
                | GatewayError::OpportunityNotWon { .. }
                | GatewayError::QuoteRejected { .. }
                | GatewayError::ErpRejected { .. }
                | GatewayError::OrderNotFound { .. }
                | GatewayError::StoreUnavailable { .. }
                | GatewayError::StoreUnavailableToOperator { .. }
                | GatewayError::UnsupportedMediaType { .. }
                | GatewayError::AuthThrottled { .. }
                | GatewayError::OpportunityTaken { .. }
                | GatewayError::AdminDisabled { .. }
                | GatewayError::InvalidConfiguration { .. }
                | GatewayError::ProcessDisabled
                | GatewayError::NotDeadLettered { .. }
                | GatewayError::EventsDisabled
                | GatewayError::EventNotDeadLettered { .. }
                | GatewayError::ChangesDisabled
                | GatewayError::NotificationUnauthenticated
                | GatewayError::NotificationReplayed
                | GatewayError::NotificationUnknownResource { .. }
                | GatewayError::ChangeBacklogFull
                | GatewayError::BudgetNotFound { .. }
                | GatewayError::UnknownOperationsPath { .. }
                | GatewayError::NotReady { .. }
                | GatewayError::Internal => {}
            }
        }
        all
    }

    /// The problem types the README's "Problems" section names.
    fn documented_slugs(members: &std::collections::BTreeSet<String>) -> std::collections::BTreeSet<String> {
        let readme = include_str!("../README.md");
        let start = readme.find("### Problems").expect("README has a Problems section");
        let section = &readme[start..];
        let section = &section[..section[4..].find("\n## ").map_or(section.len(), |e| e + 4)];
        section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            .filter(|t| !members.contains(*t))
            .map(String::from)
            .collect()
    }

    #[test]
    fn every_problem_is_built_by_the_one_builder_and_documented() {
        let mut produced = std::collections::BTreeSet::new();
        // Body member names also appear in backticks in the README; they are not types.
        let mut members = std::collections::BTreeSet::new();
        for e in every_variant() {
            let p = e.to_problem("/x", "corr-1");
            assert_eq!(p.status, e.status());
            let body: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            members.extend(body.as_object().unwrap().keys().cloned());
            assert_eq!(body["type"], format!("{PROBLEM_BASE}{}", p.slug), "{e:?}");
            assert_eq!(body["status"], p.status);
            assert_eq!(body["correlation_id"], "corr-1");
            assert_eq!(body["instance"], "/x");
            for member in ["title", "detail"] {
                assert!(body[member].as_str().is_some_and(|t| !t.is_empty()), "{e:?}: {member}");
            }
            assert!(p.headers.contains(&("content-type", PROBLEM_CONTENT_TYPE.to_string())), "{e:?}");
            assert!(p.headers.contains(&("cache-control", "no-store".to_string())), "{e:?}");
            produced.insert(p.slug.to_string());
        }
        for status in [400, 405, 408, 413, 431, 500, 502] {
            let (content_type, body) = pingora_error_body(status).unwrap();
            assert_eq!(content_type, PROBLEM_CONTENT_TYPE);
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["status"], status);
            assert!(body["correlation_id"].as_str().is_some_and(|c| c.len() == 36));
            let slug = body["type"].as_str().unwrap().trim_start_matches(PROBLEM_BASE).to_string();
            produced.insert(slug);
        }
        let documented = documented_slugs(&members);
        let undocumented: Vec<_> = produced.difference(&documented).collect();
        let unproduced: Vec<_> = documented.difference(&produced).collect();
        assert!(undocumented.is_empty(), "problem types missing from the README: {undocumented:?}");
        assert!(unproduced.is_empty(), "README names types nothing produces: {unproduced:?}");
    }

    #[test]
    fn statuses() {
        let up = || "bc".to_string();
        assert_eq!(GatewayError::UpstreamUnreachable { upstream: up() }.status(), 502);
        assert_eq!(GatewayError::UpstreamTimeout { upstream: up() }.status(), 504);
        assert_eq!(GatewayError::RouteNotFound { method: "GET".into(), path: "/".into() }.status(), 404);
    }
}
