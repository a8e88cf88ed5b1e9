//! Policies: each is a spec (in `config::spec`), a compiled runtime object built once at load
//! time, and the pipeline hook it runs in. The proxy runs a route's policies in file order.

pub mod headers;

use pingora::http::{RequestHeader, ResponseHeader};

/// A compiled policy, as attached to a route. A closed set, matched in one place per hook.
#[derive(Debug)]
pub enum Policy {
    Headers(headers::HeaderPolicy),
}

impl Policy {
    pub fn name(&self) -> &str {
        match self {
            Policy::Headers(p) => &p.name,
        }
    }

    /// Hook: the request about to be sent upstream.
    pub fn on_upstream_request(&self, req: &mut RequestHeader) {
        match self {
            Policy::Headers(p) => p.request.apply_request(req),
        }
    }

    /// Hook: the upstream response about to be sent to the caller.
    pub fn on_response(&self, resp: &mut ResponseHeader) {
        match self {
            Policy::Headers(p) => p.response.apply_response(resp),
        }
    }
}
