//! Policies: each is a spec (in `config::spec`), a compiled runtime object built once at load
//! time (`config::policies`), and the pipeline hook it runs in. The proxy runs a route's policies
//! in file order: the edge's checks (`ip_filter`, `cors`), authentication (`jwt`, `api_key`,
//! `mtls`), then rate limits; header rules around the upstream exchange.

pub mod auth;
pub mod auth_failures;
pub mod cors;
pub mod headers;
pub mod ip_filter;
pub mod jwks;
pub mod mtls;
pub mod ratelimit;
pub mod shared_limit;

use pingora::http::{RequestHeader, ResponseHeader};

/// A compiled policy, as attached to a route. A closed set, matched in one place per hook.
#[derive(Debug)]
pub enum Policy {
    Headers(headers::HeaderPolicy),
    Jwt(auth::JwtPolicy),
    ApiKey(auth::ApiKeyPolicy),
    RateLimit(ratelimit::RateLimitPolicy),
    Mediation(crate::mediation::MediationPolicy),
    Mtls(mtls::MtlsPolicy),
    Cors(cors::CorsPolicy),
    IpFilter(ip_filter::IpFilterPolicy),
}

impl Policy {
    pub fn name(&self) -> &str {
        match self {
            Policy::Headers(p) => &p.name,
            Policy::Jwt(p) => &p.name,
            Policy::ApiKey(p) => &p.name,
            Policy::RateLimit(p) => &p.name,
            Policy::Mediation(p) => &p.name,
            Policy::Mtls(p) => &p.name,
            Policy::Cors(p) => &p.name,
            Policy::IpFilter(p) => &p.name,
        }
    }

    pub fn authenticates(&self) -> bool {
        matches!(self, Policy::Jwt(_) | Policy::ApiKey(_) | Policy::Mtls(_))
    }

    /// Hook: the request about to be sent upstream.
    pub fn on_upstream_request(&self, req: &mut RequestHeader) {
        if let Policy::Headers(p) = self {
            p.request.apply_request(req);
        }
    }

    /// Hook: the upstream response about to be sent to the caller.
    pub fn on_response(&self, resp: &mut ResponseHeader) {
        if let Policy::Headers(p) = self {
            p.response.apply_response(resp);
        }
    }
}
