//! The route's edge policies, before authentication: `ip_filter` on the resolved client
//! address, `cors` (preflights answered here, without touching the ERP; other origins refused),
//! and the client certificate the TLS handshake recorded, for the `mtls` policy.

use super::respond::write_local_response;
use super::Ctx;
use crate::edge::tls::ClientIdentity;
use crate::error::GatewayError;
use crate::policy::Policy;
use pingora::http::ResponseHeader;
use pingora::prelude::Session;

/// The client certificate of this request's connection, when one was presented.
pub(super) fn client_identity(session: &Session) -> Option<&ClientIdentity> {
    session.digest()?.ssl_digest.as_ref()?.extension.get::<ClientIdentity>()
}

fn header<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session.req_header().headers.get(name).and_then(|v| v.to_str().ok())
}

/// A CORS preflight for a route with a `cors` policy is answered here (204, or a 403 problem):
/// `Ok(true)` when it was. Anything else goes on to routing.
pub(super) async fn answer_preflight(session: &mut Session, ctx: &mut Ctx) -> Result<bool, GatewayError> {
    if session.req_header().method != http::Method::OPTIONS {
        return Ok(false);
    }
    let (Some(origin), Some(method)) =
        (header(session, "origin"), header(session, "access-control-request-method"))
    else {
        return Ok(false);
    };
    let req = session.req_header();
    let host = req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri.host());
    let Some(found) = ctx.config.router.find(host, method, ctx.path(session), None) else { return Ok(false) };
    let Some(cors) = found.route.policies.iter().find_map(|p| match p.as_ref() {
        Policy::Cors(c) => Some(c),
        _ => None,
    }) else {
        return Ok(false);
    };
    check_ip(&found.route.policies, ctx)?;
    let headers = cors
        .preflight(origin, method, header(session, "access-control-request-headers"))
        .map_err(|refusal| GatewayError::CorsRefused { detail: refusal.describe() })?;
    let mut head = ResponseHeader::build(204, Some(headers.len() + 3)).map_err(|_| GatewayError::Internal)?;
    for (name, value) in headers {
        head.append_header(name, value).map_err(|_| GatewayError::Internal)?;
    }
    head.insert_header(http::header::CONTENT_LENGTH, 0).map_err(|_| GatewayError::Internal)?;
    write_local_response(session, ctx, head, bytes::Bytes::new()).await;
    Ok(true)
}

fn check_ip(policies: &[std::sync::Arc<Policy>], ctx: &Ctx) -> Result<(), GatewayError> {
    for policy in policies {
        if let Policy::IpFilter(filter) = policy.as_ref() {
            if !filter.admits(ctx.client_ip()) {
                let ip = ctx.client_ip().map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
                return Err(GatewayError::IpNotAllowed { ip });
            }
        }
    }
    Ok(())
}

/// The routed request's `ip_filter` and `cors` policies; an allowed origin's answer headers
/// are kept for whatever answer the request gets.
pub(super) fn check(session: &Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
    let Some(route) = ctx.route.clone() else { return Ok(()) };
    check_ip(&route.policies, ctx)?;
    let Some(origin) = header(session, "origin") else { return Ok(()) };
    for policy in &route.policies {
        if let Policy::Cors(cors) = policy.as_ref() {
            if !cors.origin_allowed(origin) {
                return Err(GatewayError::CorsRefused {
                    detail: crate::policy::cors::CorsRefusal::Origin(origin.to_string()).describe(),
                });
            }
            ctx.cors = cors.response_headers(origin);
        }
    }
    Ok(())
}
