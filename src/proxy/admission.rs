//! Request admission, in pipeline order: authentication → scopes → consumer rate limits
//! ([`admit`]), then — after mediation, when the route has it — the ERP budget
//! ([`acquire_erp_permit`]). Each step either lets the request through (recording what it learned
//! in the context) or returns the `GatewayError` the caller will see; nothing has reached the
//! upstream yet.

use super::Ctx;
use crate::budget::throttle::Refusal;
use crate::error::GatewayError;
use crate::observe::metrics::Metrics;
use crate::policy::auth::{missing_scopes, AuthFailure, Consumer, JwtPolicy};
use crate::policy::ratelimit::Decision;
use crate::policy::Policy;
use pingora::prelude::Session;
use std::sync::Arc;

pub async fn admit(session: &Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
    let Some(route) = ctx.route.clone() else { return Ok(()) };
    let metrics = Metrics::global();

    // Authentication: the first policy whose credential is present decides.
    // No allocation per request: the route's policies are walked in place.
    if let Some(first) = route.policies.iter().find(|p| p.authenticates()) {
        let client_ip = ctx.client_ip();
        let limiter = ctx.config.auth_failures.clone().zip(client_ip);
        if let Some(retry_after) = limiter.as_ref().and_then(|(l, ip)| l.refused(*ip)) {
            metrics.auth_failures.with_label_values(&[first.name(), "throttled"]).inc();
            return Err(GatewayError::AuthThrottled { retry_after });
        }
        let headers = &session.req_header().headers;
        let mut outcome: Option<(&str, Result<Consumer, AuthFailure>)> = None;
        for policy in route.policies.iter() {
            match policy.as_ref() {
                Policy::Jwt(jwt) => {
                    let header = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                    if let Some(token) = JwtPolicy::token(header) {
                        outcome = Some((&jwt.name, jwt.verify(token).await));
                        break;
                    }
                }
                Policy::ApiKey(keys) => {
                    if let Some(v) = headers.get(&keys.header) {
                        outcome = Some((&keys.name, keys.verify(v.as_bytes())));
                        break;
                    }
                }
                Policy::Mtls(certs) => {
                    if let Some(identity) = super::edge::client_identity(session) {
                        outcome = Some((&certs.name, certs.verify(identity)));
                        break;
                    }
                }
                _ => {}
            }
        }
        let (policy_name, result) = outcome.unwrap_or((first.name(), Err(AuthFailure::Missing)));
        match result {
            Ok(consumer) => {
                let missing = missing_scopes(&route.scopes, &consumer);
                ctx.consumer = Some(consumer);
                if !missing.is_empty() {
                    metrics.auth_failures.with_label_values(&[policy_name, "missing_scope"]).inc();
                    return Err(GatewayError::Forbidden { missing });
                }
            }
            Err(reason) => {
                metrics.auth_failures.with_label_values(&[policy_name, reason.as_str()]).inc();
                if let Some((l, ip)) = &limiter {
                    l.record(*ip);
                }
                return Err(GatewayError::Unauthenticated {
                    reason: reason.as_str(),
                    description: reason.describe(),
                    challenge: challenge(&route.policies, reason),
                });
            }
        }
    }

    // Consumer rate limits.
    for policy in &route.policies {
        let Policy::RateLimit(limit) = policy.as_ref() else { continue };
        let (name, tier) = match &ctx.consumer {
            // Quotas belong to (authentication policy, consumer), like orders and keys.
            Some(c) => (c.id.clone(), c.tier.clone()),
            None => {
                let ip = ctx.client_ip().map(|ip| ip.to_string());
                (Arc::from(format!("anonymous:{}", ip.unwrap_or_default())), Arc::from("anonymous"))
            }
        };
        let Some((tier_used, decision)) = limit.check(&name, &tier, &route.name).await else { continue };
        match decision {
            Decision::Allowed { policy, limit } => ctx.ratelimit_headers = Some((policy, limit)),
            Decision::Limited { policy, limit, retry_after } => {
                metrics.ratelimit_rejections.with_label_values(&[&*tier_used, route.name.as_str()]).inc();
                ctx.ratelimit_headers = Some((policy, limit));
                return Err(GatewayError::RateLimited { retry_after });
            }
        }
    }

    Ok(())
}

/// The ERP's shared budget: a permit held until the context is dropped.
pub async fn acquire_erp_permit(ctx: &mut Ctx) -> Result<(), GatewayError> {
    let Some(route) = ctx.route.clone() else { return Ok(()) };
    if let (Some(budget), Some(class)) = (route.upstream.budget.as_ref(), route.erp_class.as_ref()) {
        match budget.budget.acquire(class, ctx.consumer.as_ref().map(|c| &c.id)).await {
            Ok(permit) => ctx.permit = Some(permit),
            Err(refusal) => {
                let upstream = route.upstream.name.clone();
                return Err(match refusal {
                    Refusal::Busy { retry_after } => {
                        GatewayError::ErpBusy { upstream, retry_after: ceil_secs(retry_after) }
                    }
                    Refusal::CircuitOpen { retry_after } => {
                        GatewayError::ErpCircuitOpen { upstream, retry_after: ceil_secs(retry_after) }
                    }
                });
            }
        }
    }
    Ok(())
}

pub fn ceil_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// `WWW-Authenticate` for the route's authentication policies (RFC 6750 for bearer tokens).
fn challenge(policies: &[Arc<Policy>], reason: AuthFailure) -> String {
    let mut parts = Vec::new();
    for p in policies {
        match p.as_ref() {
            Policy::Jwt(_) if reason == AuthFailure::Missing => {
                parts.push("Bearer realm=\"causeway\"".to_string())
            }
            Policy::Jwt(_) => parts.push(format!(
                "Bearer realm=\"causeway\", error=\"invalid_token\", error_description=\"{}\"",
                reason.describe()
            )),
            Policy::ApiKey(k) => parts.push(format!("ApiKey realm=\"causeway\", header=\"{}\"", k.header)),
            // No HTTP scheme names TLS client certificates; this tells a client what to send.
            Policy::Mtls(_) => parts.push("ClientCertificate realm=\"causeway\"".to_string()),
            _ => {}
        }
    }
    parts.join(", ")
}
