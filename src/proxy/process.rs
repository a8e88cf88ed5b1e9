//! Routes served by a process API (`process:` in the route file). Admission (authentication,
//! scopes, rate limits) has run like on any route; the ERP is reached only through the
//! process's adapter, under the same budget.

use super::{
    mediated::{read_request_body, require_json},
    write_local_response, Ctx,
};
use crate::config::spec::ProcessEndpoint;
use crate::error::GatewayError;
use crate::process::service::{Caller, QuoteToOrder, Reply, READ_ALL_SCOPE};
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::Session;
use std::sync::Arc;

/// The OpenAPI 3.1 document of the process APIs (kept in the repository, served as is).
pub const OPENAPI: &str = include_str!("../../openapi/process-v1.json");

/// Answer the request; on `Ok` the response has been written.
pub async fn serve(
    session: &mut Session,
    ctx: &mut Ctx,
    endpoint: ProcessEndpoint,
    service: &Arc<QuoteToOrder>,
    changes: Option<&Arc<crate::changes::Changes>>,
) -> Result<(), GatewayError> {
    let route = ctx.route.clone().ok_or(GatewayError::Internal)?;
    // Orders, keys and quotas belong to (authentication policy, consumer).
    let caller = match &ctx.consumer {
        Some(c) => {
            Caller { owner: c.id.to_string(), reads_all: c.scopes.iter().any(|s| s == READ_ALL_SCOPE) }
        }
        None => Caller { owner: "anonymous".into(), reads_all: false },
    };
    let reply = match endpoint {
        ProcessEndpoint::QuoteToOrder => {
            require_json(session)?;
            let body = read_request_body(session, route.max_body_bytes).await?;
            let key = session.req_header().headers.get("idempotency-key").map(|v| v.as_bytes().to_vec());
            // Keys are per consumer: two consumers may pick the same key without colliding.
            let (correlation, traceparent) =
                (ctx.correlation.correlation_id(), ctx.correlation.traceparent());
            service.submit(key.as_deref(), &caller, &body, correlation, traceparent).await?
        }
        ProcessEndpoint::Order => {
            let path = ctx.path(session).to_string();
            let captures = route.path.matches(&path).unwrap_or_default();
            let id = route.path.param_names().iter().position(|n| n == "id").and_then(|i| captures.get(i));
            service.order(id.copied().unwrap_or_default(), &caller).await?
        }
        ProcessEndpoint::Orders => {
            let query = session.req_header().uri.query().unwrap_or_default();
            let opportunity = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
                .ok()
                .and_then(|q| q.into_iter().find(|(k, _)| k == "opportunityId").map(|(_, v)| v))
                .filter(|v| !v.is_empty())
                .ok_or_else(|| GatewayError::BadRequest {
                    detail: "Give the opportunity to look up as `?opportunityId=…`".into(),
                })?;
            service.orders_for(&opportunity, &caller).await?
        }
        ProcessEndpoint::Openapi => {
            Reply { status: 200, location: None, body: OPENAPI.as_bytes().to_vec(), replayed: false }
        }
        ProcessEndpoint::ErpNotifications => {
            let changes = changes.ok_or(GatewayError::ChangesDisabled)?;
            let query = session.req_header().uri.query().map(str::to_string);
            // The handshake has no body to judge; notifications are JSON.
            let body = if query.as_deref().is_some_and(|q| q.contains("validationToken")) {
                Bytes::new()
            } else {
                require_json(session)?;
                read_request_body(session, route.max_body_bytes).await?
            };
            let answer = changes.receive(query.as_deref(), &body).await?;
            let Ok(mut head) = ResponseHeader::build(answer.status, Some(4)) else {
                return Err(GatewayError::Internal);
            };
            let _ = head.insert_header(http::header::CONTENT_TYPE, answer.content_type);
            let _ = head.insert_header(http::header::CONTENT_LENGTH, answer.body.len());
            let _ = head.insert_header(http::header::CACHE_CONTROL, "no-store");
            let _ = head.insert_header("x-content-type-options", "nosniff");
            write_local_response(session, ctx, head, Bytes::from(answer.body)).await;
            return Ok(());
        }
    };
    respond(session, ctx, reply).await;
    Ok(())
}

async fn respond(session: &mut Session, ctx: &mut Ctx, reply: Reply) {
    let Ok(mut head) = ResponseHeader::build(reply.status, Some(8)) else { return };
    let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
    let _ = head.insert_header(http::header::CONTENT_LENGTH, reply.body.len());
    let _ = head.insert_header(http::header::CACHE_CONTROL, "no-store");
    if let Some(location) = &reply.location {
        let name = if reply.status == 200 { http::header::CONTENT_LOCATION } else { http::header::LOCATION };
        let _ = head.insert_header(name, location.as_str());
    }
    if reply.replayed {
        let _ = head.insert_header("idempotent-replayed", "true");
    }
    write_local_response(session, ctx, head, Bytes::from(reply.body)).await;
}
