//! Answers the gateway writes itself: problems, and the responses of mediated and process routes,
//! each with the correlation and rate-limit headers (local answers skip `response_filter`).

use super::names::{CORRELATION, RATELIMIT, RATELIMIT_POLICY, TRACEPARENT};
use super::Ctx;
use crate::error::GatewayError;
use crate::observe::correlation::Correlation;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

pub(super) fn add_ratelimit_headers(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    if let Some((policy, limit)) = &ctx.ratelimit_headers {
        resp.insert_header(&RATELIMIT_POLICY, policy.as_str())?;
        resp.insert_header(&RATELIMIT, limit.as_str())?;
    }
    Ok(())
}

/// A `cors` route's headers for an allowed origin, on every kind of answer (problems included,
/// so a browser script can read them).
pub(super) fn add_cors_headers(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    for (name, value) in &ctx.cors {
        if *name == "vary" {
            resp.append_header(*name, value.as_str())?;
        } else {
            resp.insert_header(*name, value.as_str())?;
        }
    }
    Ok(())
}

/// A deprecated route's `Deprecation`, `Sunset` and `Link`, on every kind of answer (the 410
/// after the sunset included): built once at load.
pub(super) fn add_lifecycle_headers(resp: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
    if let Some(deprecation) = ctx.route.as_ref().and_then(|r| r.deprecation.as_ref()) {
        for (name, value) in &deprecation.headers {
            resp.insert_header(*name, value.clone())?;
        }
    }
    Ok(())
}

/// Finish a response the gateway answers itself (mediated and process routes): correlation and
/// rate-limit headers, the route's response header rules, then header and body.
pub(super) async fn write_local_response(
    session: &mut Session,
    ctx: &Ctx,
    mut head: ResponseHeader,
    body: Bytes,
) {
    let _ = add_correlation_headers(&mut head, &ctx.correlation);
    let _ = add_ratelimit_headers(&mut head, ctx);
    let _ = add_cors_headers(&mut head, ctx);
    let _ = add_lifecycle_headers(&mut head, ctx);
    if let Some(route) = ctx.route.as_ref() {
        for policy in &route.policies {
            policy.on_response(&mut head);
        }
    }
    // A write error means the caller went away: nobody is left to tell.
    if session.write_response_header(Box::new(head), false).await.is_ok() {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

pub(super) fn add_correlation_headers(resp: &mut ResponseHeader, c: &Correlation) -> Result<()> {
    resp.insert_header(&CORRELATION, c.correlation_header().clone())?;
    resp.insert_header(&TRACEPARENT, c.traceparent_header().clone())?;
    Ok(())
}

/// Answer locally with an RFC 9457 body. Local answers skip `response_filter`, so the
/// correlation headers are added here too. Returns the status sent.
pub(super) async fn respond_problem(session: &mut Session, ctx: &mut Ctx, err: &GatewayError) -> Result<u16> {
    let problem = err.to_problem(session.req_header().uri.path(), ctx.correlation.correlation_id());
    let mut resp = ResponseHeader::build(problem.status, Some(problem.headers.len() + 5))?;
    for (name, value) in &problem.headers {
        resp.insert_header(*name, value.as_str())?;
    }
    resp.insert_header(http::header::CONTENT_LENGTH, problem.body.len())?;
    add_correlation_headers(&mut resp, &ctx.correlation)?;
    add_ratelimit_headers(&mut resp, ctx)?;
    add_cors_headers(&mut resp, ctx)?;
    add_lifecycle_headers(&mut resp, ctx)?;
    ctx.problem = Some(problem.slug);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(problem.body), true).await?;
    Ok(problem.status)
}
