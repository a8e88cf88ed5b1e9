//! The one error type of the request path and its RFC 9457 rendering.
//!
//! Layers return a [`GatewayError`]; only [`GatewayError::to_problem`] decides what the caller
//! sees. Rendering never logs: the access log records the outcome.

use bytes::Bytes;
use serde_json::json;

/// Base of every problem `type` URI; the slug after it is stable and documented in the README.
pub const PROBLEM_BASE: &str = "https://causeway.dev/problems/";

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches {method} {path}")]
    RouteNotFound { method: String, path: String },
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
    #[error("bad request: {detail}")]
    BadRequest { detail: String },
    #[error("unauthenticated: {}", reason.as_str())]
    Unauthenticated { reason: crate::policy::auth::AuthFailure, challenge: String },
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
    QuoteRejected { violations: Vec<crate::process::rules::RuleViolation> },
    #[error("the ERP rejected the order: {message}")]
    ErpRejected { upstream: String, message: String },
    #[error("order {id} not found")]
    OrderNotFound { id: String },
    #[error("order store unavailable: {detail}")]
    StoreUnavailable { detail: String },
    #[error("unsupported media type {found:?}")]
    UnsupportedMediaType { found: Option<String> },
    #[error("too many failed authentications from this address")]
    AuthThrottled { retry_after: u64 },
    #[error("opportunity {opportunity_id} already has an order of another consumer")]
    OpportunityTaken { opportunity_id: String },
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

/// A rendered problem: status, body and the `type` slug (for logs and metrics).
pub struct Problem {
    pub status: u16,
    pub slug: &'static str,
    pub body: Bytes,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::RouteNotFound { .. } => 404,
            GatewayError::BodyTooLarge { .. } => 413,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::UpstreamUnreachable { .. } | GatewayError::UpstreamProtocol { .. } => 502,
            GatewayError::UpstreamTimeout { .. } => 504,
            GatewayError::BadRequest { .. } | GatewayError::InvalidJson { .. } => 400,
            GatewayError::ValidationFailed { .. } | GatewayError::RequestUnmappable { .. } => 422,
            GatewayError::ResponseUnmappable { .. } => 502,
            GatewayError::TransformFailed { .. }
            | GatewayError::TransformTimeout { .. }
            | GatewayError::TransformTooLarge { .. } => 500,
            GatewayError::TransformBusy => 503,
            GatewayError::Internal => 500,
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
            GatewayError::StoreUnavailable { .. } => 503,
            GatewayError::Unauthenticated { .. } => 401,
            GatewayError::Forbidden { .. } => 403,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::ErpBusy { .. }
            | GatewayError::ErpCircuitOpen { .. }
            | GatewayError::ErpOverloaded { .. } => 503,
        }
    }

    /// Headers the status requires besides the body: `WWW-Authenticate`, `Retry-After`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
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
            _ => Vec::new(),
        }
    }

    fn slug_title(&self) -> (&'static str, &'static str) {
        match self {
            GatewayError::RouteNotFound { .. } => ("route-not-found", "No route matches this request"),
            GatewayError::BodyTooLarge { .. } => ("body-too-large", "Request body too large"),
            GatewayError::MethodNotAllowed { .. } => {
                ("method-not-allowed", "Method not allowed on this path")
            }
            GatewayError::UpstreamUnreachable { .. } => {
                ("upstream-unreachable", "The ERP could not be reached")
            }
            GatewayError::UpstreamTimeout { .. } => ("upstream-timeout", "The ERP did not answer in time"),
            GatewayError::UpstreamProtocol { .. } => {
                ("upstream-invalid-response", "The ERP sent an invalid response")
            }
            GatewayError::BadRequest { .. } => ("bad-request", "The request is malformed"),
            GatewayError::Internal => ("internal", "Internal gateway error"),
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
            GatewayError::StoreUnavailable { .. } => {
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
            GatewayError::UpstreamProtocol { upstream } => format!(
                "The ERP `{upstream}` closed the connection or answered with an invalid response. Retry later."
            ),
            GatewayError::BadRequest { detail } => format!("{detail}. Correct the request and send it again."),
            GatewayError::Internal => "The gateway failed unexpectedly. Retry; if it persists, report the correlation id.".into(),
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
            GatewayError::Unauthenticated { reason, .. } => format!(
                "Authentication failed: {}. Send a valid bearer token or API key as this route requires.",
                reason.describe()
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

    /// The RFC 9457 body, with the correlation id so the caller can quote it.
    pub fn to_problem(&self, instance: &str, correlation_id: &str) -> Problem {
        let (slug, title) = self.slug_title();
        let status = self.status();
        let mut body = json!({
            "type": format!("{PROBLEM_BASE}{slug}"),
            "title": title,
            "status": status,
            "detail": self.detail(),
            "instance": instance,
            "correlation_id": correlation_id,
        });
        match self {
            GatewayError::BodyTooLarge { limit } => body["max_body_bytes"] = json!(limit),
            GatewayError::Forbidden { missing } => body["missing_scopes"] = json!(missing),
            GatewayError::Unauthenticated { reason, .. } => body["reason"] = json!(reason.as_str()),
            GatewayError::ValidationFailed { violations } => body["errors"] = json!(violations),
            GatewayError::RequestUnmappable { pointer, .. } => body["pointer"] = json!(pointer),
            GatewayError::QuoteRejected { violations } => body["violations"] = json!(violations),
            GatewayError::ErpRejected { message, .. } => body["erp_message"] = json!(message),
            _ => {}
        }
        Problem { status, slug, body: Bytes::from(body.to_string()) }
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
    let body = json!({
        "type": format!("{PROBLEM_BASE}{slug}"),
        "title": title,
        "status": status,
        "detail": detail,
        "correlation_id": uuid::Uuid::now_v7().to_string(),
    });
    Some(("application/problem+json", Bytes::from(body.to_string())))
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

    #[test]
    fn statuses() {
        let up = || "bc".to_string();
        assert_eq!(GatewayError::UpstreamUnreachable { upstream: up() }.status(), 502);
        assert_eq!(GatewayError::UpstreamTimeout { upstream: up() }.status(), 504);
        assert_eq!(GatewayError::RouteNotFound { method: "GET".into(), path: "/".into() }.status(), 404);
    }
}
