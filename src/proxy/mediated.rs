//! Routes with a mediation policy, answered in-process.
//!
//! pingora sends the upstream request header before the first body chunk is filtered, and the
//! response header before the first response chunk; a mediated route must decide on the whole
//! body before either. So the request body is read (bounded by the route's limit), checked and
//! transformed before the ERP is called through the upstream's pooled client, and the ERP's
//! response is read (bounded), monitored and transformed before the caller gets a header. Routes
//! without mediation never come here: they stream through pingora untouched.

use super::{
    admission, hygiene, prepare_upstream_request, report_upstream_status, scan_for_overload,
    write_local_response, Ctx,
};
use crate::budget::throttle;
use crate::error::{GatewayError, Violation};
use crate::mediation::{Direction, Limits, MediationPolicy, TransformFailure};
use crate::observe::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::prelude::Session;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Run the whole exchange; on `Ok` the response has been written.
pub async fn exchange(session: &mut Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
    let route = ctx.route.clone().ok_or(GatewayError::Internal)?;
    let mediation = route.mediation().ok_or(GatewayError::Internal)?;
    let upstream = route.upstream.name.as_str();

    if mediation.reads_request_body() {
        require_json(session)?;
    }
    let body = read_request_body(session, route.max_body_bytes).await?;
    let upstream_body = mediate_request(session, ctx, mediation, body).await?;

    admission::acquire_erp_permit(ctx).await?;
    let response = call_upstream(session, ctx, upstream_body).await?;
    let status = response.status().as_u16();
    if let Some(err) = report_upstream_status(ctx, status, response.headers().get(http::header::RETRY_AFTER))
    {
        return Err(err);
    }
    let headers = response.headers().clone();
    let body = read_response_body(response, mediation.limits, ctx.deadline, upstream).await?;
    if !ctx.overload_markers.is_empty() {
        scan_for_overload(ctx, Some(&body), true);
    }
    let (body, transformed) = mediate_response(ctx, mediation, status, body).await?;
    respond(session, ctx, status, &headers, body, transformed).await;
    Ok(())
}

/// A body the gateway parses must say it is JSON (`application/json` or `application/*+json`):
/// anything else is a 415 before the body is read. A request without a body passes.
pub(super) fn require_json(session: &Session) -> Result<(), GatewayError> {
    let req = session.req_header();
    let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    if !has_body {
        return Ok(());
    }
    let found = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = found.as_deref().map(|f| f.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let json = essence
        .as_deref()
        .is_some_and(|e| e == "application/json" || (e.starts_with("application/") && e.ends_with("+json")));
    if json {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType { found: found.map(|f| f.chars().take(100).collect()) })
    }
}

pub(super) async fn read_request_body(session: &mut Session, limit: u64) -> Result<Bytes, GatewayError> {
    let mut body = BytesMut::new();
    loop {
        let chunk = session
            .read_request_body()
            .await
            .map_err(|_| GatewayError::BadRequest { detail: "The request body could not be read".into() })?;
        let Some(chunk) = chunk else { break };
        if (body.len() + chunk.len()) as u64 > limit {
            // The rest of the body is unread, so the connection cannot carry another request.
            session.set_keepalive(None);
            return Err(GatewayError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Schema checks (every violation at once), then the request transformation. Returns the body
/// to send to the ERP.
async fn mediate_request(
    session: &Session,
    ctx: &Ctx,
    mediation: &MediationPolicy,
    body: Bytes,
) -> Result<Bytes, GatewayError> {
    let route = ctx.route.as_ref().ok_or(GatewayError::Internal)?;
    let req = session.req_header();
    let mut violations = mediation.check_request_head(req.uri.query(), &req.headers);
    let mut upstream_body = body.clone();
    if mediation.reads_request_body() {
        let document = if body.is_empty() {
            if matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
                return Err(GatewayError::InvalidJson {
                    detail: "the body is empty; this route expects a JSON document".into(),
                });
            }
            None
        } else {
            Some(serde_json::from_slice::<Value>(&body).map_err(|e| GatewayError::InvalidJson {
                detail: format!("line {}, column {}: {e}", e.line(), e.column()),
            })?)
        };
        if let Some(document) = document {
            violations.extend(mediation.check_request_body(&document));
            let transform = mediation.request.as_ref().map(|r| &r.transform);
            if let Some(transform) = transform.filter(|t| !t.is_identity() && violations.is_empty()) {
                upstream_body = transform
                    .apply_async(document, mediation.limits)
                    .await
                    .map_err(|f| failure(ctx, mediation, Direction::Request, f))?;
            }
        }
    }
    if !violations.is_empty() {
        count_rejections(&route.name, &violations);
        return Err(GatewayError::ValidationFailed { violations });
    }
    Ok(upstream_body)
}

fn count_rejections(route: &str, violations: &[Violation]) {
    let metrics = Metrics::global();
    for location in ["body", "query", "headers"] {
        if violations.iter().any(|v| v.location == location) {
            metrics.mediation_rejections.with_label_values(&[route, location]).inc();
        }
    }
}

/// Count, log with the correlation id, and turn into what the caller is told.
fn failure(
    ctx: &Ctx,
    mediation: &MediationPolicy,
    direction: Direction,
    f: TransformFailure,
) -> GatewayError {
    let route = ctx.route_name();
    Metrics::global().mediation_failures.with_label_values(&[route, direction.as_str(), f.kind()]).inc();
    let err = f.to_error(direction, mediation.limits, &ctx.upstream_name());
    tracing::warn!(
        route,
        policy = mediation.name.as_str(),
        direction = direction.as_str(),
        correlation_id = ctx.correlation.correlation_id(),
        error = %err,
        "transformation failed"
    );
    err
}

async fn call_upstream(
    session: &Session,
    ctx: &mut Ctx,
    body: Bytes,
) -> Result<reqwest::Response, GatewayError> {
    let route = ctx.route.clone().ok_or(GatewayError::Internal)?;
    let upstream = &route.upstream;
    let client = upstream.client().ok_or(GatewayError::Internal)?;
    let mut head = session.req_header().clone();
    prepare_upstream_request(&mut head, ctx).map_err(|_| GatewayError::Internal)?;
    // The client frames the body itself; the response must be readable to be mediated.
    for name in [http::header::CONTENT_LENGTH, http::header::TRANSFER_ENCODING, http::header::ACCEPT_ENCODING]
    {
        head.remove_header(&name);
    }
    if !body.is_empty() && mediation_changes_request(&route) {
        head.insert_header(http::header::CONTENT_TYPE, "application/json")
            .map_err(|_| GatewayError::Internal)?;
    }
    let remaining = match ctx.deadline {
        Some(d) => d.saturating_duration_since(Instant::now()),
        None => route.connect_timeout + route.read_timeout,
    };
    if remaining.is_zero() {
        return Err(GatewayError::UpstreamTimeout { upstream: upstream.name.clone() });
    }
    let url = format!("{}{}", upstream.base_url, ctx.upstream_path);
    let method =
        reqwest::Method::from_bytes(head.method.as_str().as_bytes()).map_err(|_| GatewayError::Internal)?;
    let request = client.request(method, url).headers(head.headers.clone()).timeout(remaining).body(body);
    ctx.upstream_sent = Some(Instant::now());
    let result = request.send().await;
    ctx.upstream_seconds = ctx.upstream_sent.map(|t| t.elapsed().as_secs_f64());
    result.map_err(|e| {
        let err = if e.is_timeout() {
            GatewayError::UpstreamTimeout { upstream: upstream.name.clone() }
        } else if let Some(detail) = crate::config::upstream_tls::tls_failure(&e) {
            GatewayError::UpstreamTls { upstream: upstream.name.clone(), detail }
        } else if e.is_connect() {
            GatewayError::UpstreamUnreachable { upstream: upstream.name.clone() }
        } else {
            GatewayError::UpstreamProtocol { upstream: upstream.name.clone() }
        };
        if let Some(permit) = ctx.permit.as_ref() {
            permit.budget().report(throttle::Outcome::Failure);
        }
        err
    })
}

fn mediation_changes_request(route: &crate::config::CompiledRoute) -> bool {
    route.mediation().and_then(|m| m.request.as_ref()).is_some_and(|r| !r.transform.is_identity())
}

async fn read_response_body(
    mut response: reqwest::Response,
    limits: Limits,
    deadline: Option<Instant>,
    upstream: &str,
) -> Result<Bytes, GatewayError> {
    let read = async {
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            if e.is_timeout() {
                GatewayError::UpstreamTimeout { upstream: upstream.to_string() }
            } else {
                GatewayError::UpstreamProtocol { upstream: upstream.to_string() }
            }
        })? {
            if body.len() + chunk.len() > limits.max_output_bytes {
                return Err(GatewayError::TransformTooLarge {
                    direction: "response",
                    limit: limits.max_output_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            tokio::time::timeout(left, read)
                .await
                .unwrap_or(Err(GatewayError::UpstreamTimeout { upstream: upstream.to_string() }))
        }
        None => read.await,
    }
}

/// Monitor the response against its schema, then transform it. Returns the body for the caller
/// and whether it was rewritten.
async fn mediate_response(
    ctx: &Ctx,
    mediation: &MediationPolicy,
    status: u16,
    body: Bytes,
) -> Result<(Bytes, bool), GatewayError> {
    let Some(response) = mediation.response.as_ref().filter(|_| mediation.response_applies(status)) else {
        return Ok((body, false));
    };
    // Nothing to map (204, or an empty 200): passed on as it is.
    if body.is_empty() || (response.schema.is_none() && response.transform.is_identity()) {
        return Ok((body, false));
    }
    let document = match serde_json::from_slice::<Value>(&body) {
        Ok(d) => d,
        Err(e) if response.transform.is_identity() => {
            monitor(ctx, &[format!("the body is not JSON: {e}")]);
            return Ok((body, false));
        }
        Err(e) => {
            return Err(failure(
                ctx,
                mediation,
                Direction::Response,
                TransformFailure::Mapping {
                    pointer: String::new(),
                    detail: format!("the body is not JSON: {e}"),
                },
            ))
        }
    };
    if let Some(schema) = &response.schema {
        let violations = schema.violations("body", &document);
        if !violations.is_empty() {
            let described: Vec<String> = violations
                .iter()
                .take(5)
                .map(|v| format!("{} {}: {}", v.pointer, v.keyword, v.message))
                .collect();
            monitor(ctx, &described);
        }
    }
    if response.transform.is_identity() {
        return Ok((body, false));
    }
    let out = response
        .transform
        .apply_async(document, mediation.limits)
        .await
        .map_err(|f| failure(ctx, mediation, Direction::Response, f))?;
    Ok((out, true))
}

fn monitor(ctx: &Ctx, described: &[String]) {
    let route = ctx.route_name();
    Metrics::global().response_schema_violations.with_label_values(&[route]).inc();
    tracing::warn!(
        route,
        correlation_id = ctx.correlation.correlation_id(),
        violations = described.join("; ").as_str(),
        "ERP response violates the route's response schema (monitor mode: passed on)"
    );
}

async fn respond(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    upstream_headers: &http::HeaderMap,
    body: Bytes,
    transformed: bool,
) {
    let Ok(mut head) = ResponseHeader::build(status, Some(upstream_headers.len() + 6)) else { return };
    for (name, value) in upstream_headers {
        // The body is re-framed here; its length is the one written below.
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        let _ = head.append_header(name.clone(), value.clone());
    }
    hygiene::strip_hop_by_hop_response(&mut head);
    if let Some(route) = ctx.route.as_ref() {
        hygiene::strip_upstream_session(&mut head, &route.strip_response);
    }
    if transformed {
        let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json; charset=utf-8");
    }
    let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len());
    write_local_response(session, ctx, head, body).await;
}
