//! The exchange with the upstream: the request as the ERP sees it, what its answer means for the
//! ERP budget (one judge for proxied and mediated routes, [`throttle::judge`]), and what a
//! pingora error means for the caller.

use super::names::{CORRELATION, TRACEPARENT};
use super::{admission, hygiene, Ctx};
use crate::budget::throttle;
use crate::error::GatewayError;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorSource, ErrorType, Result};

/// The request as the ERP sees it: rewritten path, no hop-by-hop headers, no caller credential,
/// the upstream's own credential, correlation and forwarding headers, then the route's header
/// policies. Shared by the proxied and the in-process (mediated) paths.
pub(super) fn prepare_upstream_request(req: &mut RequestHeader, ctx: &Ctx) -> Result<()> {
    let Some(route) = ctx.route.as_ref() else { return Ok(()) };
    let uri: http::Uri = ctx
        .upstream_path
        .parse()
        .map_err(|_| Error::explain(ErrorType::InternalError, "rewritten path is not a valid URI"))?;
    req.set_uri(uri);
    hygiene::strip_hop_by_hop_request(req);
    // The caller's credentials are for the gateway, never for the ERP.
    hygiene::strip_caller_credentials(req, &route.strip_request);
    req.insert_header(http::header::HOST, route.upstream.host_header.clone())?;
    if let Some((name, value)) = &route.upstream.credential {
        req.insert_header(name.clone(), value.clone())?;
    }
    req.insert_header(&CORRELATION, ctx.correlation.correlation_header().clone())?;
    req.insert_header(&TRACEPARENT, ctx.correlation.traceparent_header().clone())?;
    hygiene::set_forwarding(req, ctx.client.as_ref(), if ctx.tls { "https" } else { "http" })?;
    for policy in &route.policies {
        policy.on_upstream_request(req);
    }
    Ok(())
}

/// Map a pingora error to what the caller is told; `None` when the caller is gone.
pub(super) fn classify(e: &Error, upstream: String) -> Option<GatewayError> {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(413), _) => None,
        (TLSHandshakeFailure | InvalidCert | HandshakeError, ErrorSource::Upstream) => {
            let detail = crate::config::upstream_tls::tls_failure(e)
                .unwrap_or_else(|| "TLS handshake failed".to_string());
            Some(GatewayError::UpstreamTls { upstream, detail })
        }
        (ConnectTimedout | ReadTimedout | WriteTimedout | TLSHandshakeTimedout, ErrorSource::Upstream) => {
            Some(GatewayError::UpstreamTimeout { upstream })
        }
        (ConnectTimedout, _) => Some(GatewayError::UpstreamTimeout { upstream }),
        (
            ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure | InvalidCert
            | HandshakeError | SocketError | BindError | ConnectProxyFailure,
            _,
        ) => Some(GatewayError::UpstreamUnreachable { upstream }),
        (_, ErrorSource::Upstream) => Some(GatewayError::UpstreamProtocol { upstream }),
        (
            ReadError | WriteError | ConnectionClosed | ReadTimedout | WriteTimedout,
            ErrorSource::Downstream,
        ) => None,
        (_, ErrorSource::Downstream) => {
            Some(GatewayError::BadRequest { detail: "The request could not be read".into() })
        }
        _ => Some(GatewayError::Internal),
    }
}

/// Report the ERP's answer to its budget ([`throttle::judge`]). An overload answer becomes the
/// caller's 503; body markers of the status are armed for the body scan.
pub(super) fn report_upstream_status(
    ctx: &mut Ctx,
    status: u16,
    retry_after: Option<&http::HeaderValue>,
) -> Option<GatewayError> {
    let (Some(permit), Some(route)) = (ctx.permit.as_ref(), ctx.route.as_ref()) else { return None };
    let budget = route.upstream.budget.as_ref()?;
    let (outcome, markers) =
        throttle::judge(status, retry_after.map(|v| v.as_bytes()), &budget.overload_signals);
    let overload = matches!(outcome, throttle::Outcome::Overload(_));
    let pause = permit.budget().report(outcome);
    if overload {
        return Some(GatewayError::ErpOverloaded {
            upstream: route.upstream.name.clone(),
            retry_after: admission::ceil_secs(pause),
        });
    }
    ctx.overload_markers = markers;
    None
}

/// Look for a vendor's overload marker in the start of a response body.
pub(super) fn scan_for_overload(ctx: &mut Ctx, chunk: Option<&[u8]>, end_of_stream: bool) {
    if let Some(chunk) = chunk {
        let room = throttle::MARKER_SCAN_BYTES.saturating_sub(ctx.scanned.len());
        ctx.scanned.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    let hit = throttle::body_signals_overload(&ctx.overload_markers, &ctx.scanned);
    if hit || end_of_stream || ctx.scanned.len() >= throttle::MARKER_SCAN_BYTES {
        if hit {
            if let Some(permit) = ctx.permit.as_ref() {
                permit.budget().report(throttle::Outcome::Overload(None));
            }
        }
        ctx.overload_markers.clear();
        ctx.scanned = Vec::new();
    }
}
