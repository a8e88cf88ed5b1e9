//! What the gateway refuses before routing, because it will not guess: ambiguous framing, and
//! paths that normalize to something other than they say (or could be read two ways).

use super::{framing, normalize, Ctx};
use crate::error::GatewayError;
use pingora::prelude::Session;

/// Refuse what the gateway will not guess about: ambiguous framing and paths that normalize
/// outside what they say. Records the normalized path in the context.
pub(super) fn check_request(session: &Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
    if let Some(h1) = session.as_http1() {
        framing::check(&h1.get_headers_raw_bytes())
            .map_err(|detail| GatewayError::BadRequest { detail: detail.into() })?;
    }
    let method = &session.req_header().method;
    if method == http::Method::CONNECT || method == http::Method::TRACE {
        // The gateway tunnels nothing and reflects nothing.
        return Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            allowed: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"].map(String::from).to_vec(),
        });
    }
    let raw = session.req_header().uri.path();
    match normalize::normalize(raw) {
        Ok(std::borrow::Cow::Borrowed(_)) => Ok(()),
        Ok(std::borrow::Cow::Owned(path)) => {
            ctx.normalized_path = Some(path);
            Ok(())
        }
        Err(refusal) => Err(GatewayError::BadRequest { detail: refusal.describe().into() }),
    }
}
