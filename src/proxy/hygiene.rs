//! Header hygiene: hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded in either direction,
//! and credentials stay on their side: the caller's (`Authorization`, API keys, cookies) never go
//! upstream, the gateway's ERP session (cookies, challenges, CSRF tokens) never reaches callers.

use crate::edge::client_addr::ClientAddress;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

use http::header::{self, HeaderName, HeaderValue};
use std::sync::LazyLock;

/// Always hop-by-hop, whether or not `Connection` lists them. `Transfer-Encoding` is left to
/// pingora, which re-frames bodies itself.
const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"];

/// [`HOP_BY_HOP`] as header names, built once: a removal by `&str` parses the name first.
static HOP_BY_HOP_NAMES: LazyLock<Vec<HeaderName>> =
    LazyLock::new(|| HOP_BY_HOP.iter().map(|n| HeaderName::from_static(n)).collect());

/// Which of `names` (at most 32) `headers` holds, as a bit per name: one pass over the few
/// headers a message has, so a removal (a hash and a probe each) runs only for a name present.
fn present(headers: &http::HeaderMap, names: &[HeaderName]) -> u32 {
    let mut mask = 0;
    for key in headers.keys() {
        if let Some(i) = names.iter().take(32).position(|n| n == key) {
            mask |= 1 << i;
        }
    }
    mask
}

/// The names of `names` whose bit is set in `mask`.
fn selected(names: &[HeaderName], mask: u32) -> impl Iterator<Item = &HeaderName> {
    names.iter().take(32).enumerate().filter(move |(i, _)| mask & (1 << i) != 0).map(|(_, n)| n)
}

pub use crate::policy::headers::UPSTREAM_SESSION_HEADERS;

/// Remove the caller's credentials: `Authorization` always, and the route's list (cookies, the
/// headers API-key policies read).
pub fn strip_caller_credentials(req: &mut RequestHeader, also: &[http::HeaderName]) {
    req.remove_header(&header::AUTHORIZATION);
    req.remove_header(&header::PROXY_AUTHORIZATION);
    let mask = present(&req.headers, also);
    for name in selected(also, mask) {
        req.remove_header(name);
    }
    // A route strips more than 32 headers only when its config lists them: removed one by one.
    for name in also.iter().skip(32) {
        req.remove_header(name);
    }
}

/// Remove the upstream session headers the route does not pass. One pass over the response's
/// few headers; a removal only when one is there (rare).
pub fn strip_upstream_session(resp: &mut ResponseHeader, names: &[http::HeaderName]) {
    let mask = present(&resp.headers, names);
    for name in selected(names, mask) {
        resp.remove_header(name);
    }
    for name in names.iter().skip(32) {
        resp.remove_header(name);
    }
}

/// Header names listed in `Connection` (besides the fixed set), lowercased. Allocates only when
/// `Connection` lists something, which almost no request does.
fn listed_in_connection(connection: Option<&http::HeaderValue>) -> Vec<String> {
    let Some(listed) = connection.and_then(|v| v.to_str().ok()) else { return Vec::new() };
    // `keep-alive` and `close`, what almost every `Connection` says, allocate nothing.
    const NEVER: &[&str] = &["close", "transfer-encoding", "content-length", "host"];
    listed
        .split(',')
        .map(str::trim)
        // Never let a caller strip framing or the gateway's own headers this way.
        .filter(|t| !t.is_empty() && !HOP_BY_HOP.iter().chain(NEVER).any(|h| t.eq_ignore_ascii_case(h)))
        .map(str::to_ascii_lowercase)
        .collect()
}

pub fn strip_hop_by_hop_request(req: &mut RequestHeader) {
    let mask = present(&req.headers, &HOP_BY_HOP_NAMES);
    if mask == 0 {
        return;
    }
    for name in listed_in_connection(req.headers.get(header::CONNECTION)) {
        req.remove_header(&name);
    }
    for name in selected(&HOP_BY_HOP_NAMES, mask) {
        req.remove_header(name);
    }
}

pub fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    let mask = present(&resp.headers, &HOP_BY_HOP_NAMES);
    if mask == 0 {
        return;
    }
    for name in listed_in_connection(resp.headers.get(header::CONNECTION)) {
        resp.remove_header(&name);
    }
    for name in selected(&HOP_BY_HOP_NAMES, mask) {
        resp.remove_header(name);
    }
}

/// Forwarding headers a caller may send: the gateway removes them and writes its own from the
/// hops it believed ([`ClientAddress`]), so a forged entry never reaches the ERP.
const FORWARDING: &[&str] =
    &["x-forwarded-for", "forwarded", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"];

static FORWARDING_NAMES: LazyLock<Vec<HeaderName>> =
    LazyLock::new(|| FORWARDING.iter().map(|n| HeaderName::from_static(n)).collect());

/// `X-Forwarded-For`, `Forwarded` and `X-Forwarded-Proto` as the gateway vouches for them.
pub fn set_forwarding(
    req: &mut RequestHeader,
    client: Option<&ClientAddress>,
    proto: &'static str,
) -> Result<()> {
    let mask = present(&req.headers, &FORWARDING_NAMES);
    for name in selected(&FORWARDING_NAMES, mask) {
        req.remove_header(name);
    }
    if let Some(client) = client {
        req.insert_header(&super::names::X_FORWARDED_FOR, client.x_forwarded_for())?;
        req.insert_header("forwarded", client.forwarded(proto))?;
    }
    req.insert_header(&super::names::X_FORWARDED_PROTO, HeaderValue::from_static(proto))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_listed_headers_but_not_framing() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("connection", "keep-alive, x-secret, transfer-encoding").unwrap();
        req.insert_header("keep-alive", "timeout=5").unwrap();
        req.insert_header("x-secret", "1").unwrap();
        req.insert_header("te", "trailers").unwrap();
        req.insert_header("transfer-encoding", "chunked").unwrap();
        req.insert_header("x-kept", "1").unwrap();
        strip_hop_by_hop_request(&mut req);
        for gone in ["connection", "keep-alive", "x-secret", "te"] {
            assert!(req.headers.get(gone).is_none(), "{gone} should be stripped");
        }
        assert!(req.headers.get("transfer-encoding").is_some());
        assert!(req.headers.get("x-kept").is_some());
    }

    #[test]
    fn a_response_loses_exactly_its_hop_by_hop_headers() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("Connection", "Keep-Alive, X-Hop, Content-Length").unwrap();
        resp.insert_header("Keep-Alive", "timeout=5").unwrap();
        resp.insert_header("X-Hop", "1").unwrap();
        resp.insert_header("Content-Length", "2").unwrap();
        resp.insert_header("X-Kept", "1").unwrap();
        strip_hop_by_hop_response(&mut resp);
        let left: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-length", "x-kept"], "framing stays even when Connection lists it");
        let mut plain = ResponseHeader::build(200, None).unwrap();
        plain.insert_header("X-Kept", "1").unwrap();
        strip_hop_by_hop_response(&mut plain);
        assert_eq!(plain.headers.len(), 1);
    }

    #[test]
    fn credentials_stay_on_their_side() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in [("authorization", "Bearer x"), ("x-api-key", "k"), ("cookie", "a=1"), ("x-kept", "1")]
        {
            req.insert_header(n, v).unwrap();
        }
        let also = [http::HeaderName::from_static("x-api-key"), http::HeaderName::from_static("cookie")];
        strip_caller_credentials(&mut req, &also);
        for gone in ["authorization", "x-api-key", "cookie"] {
            assert!(req.headers.get(gone).is_none(), "{gone} must not go upstream");
        }
        assert!(req.headers.get("x-kept").is_some());

        let mut resp = ResponseHeader::build(200, None).unwrap();
        for n in UPSTREAM_SESSION_HEADERS {
            resp.insert_header(*n, "v").unwrap();
        }
        let names: Vec<http::HeaderName> =
            UPSTREAM_SESSION_HEADERS.iter().map(|n| http::HeaderName::from_static(n)).collect();
        strip_upstream_session(&mut resp, &names);
        assert_eq!(resp.headers.len(), 0);
    }

    #[test]
    fn forwarding_headers_are_the_gateways_own() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-forwarded-for", "6.6.6.6").unwrap();
        req.insert_header("forwarded", "for=6.6.6.6").unwrap();
        req.insert_header("x-real-ip", "6.6.6.6").unwrap();
        let client = ClientAddress::direct("127.0.0.1".parse().unwrap());
        set_forwarding(&mut req, Some(&client), "https").unwrap();
        assert_eq!(req.headers.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert_eq!(req.headers.get("forwarded").unwrap(), "for=127.0.0.1;proto=https");
        assert_eq!(req.headers.get("x-forwarded-proto").unwrap(), "https");
        assert!(req.headers.get("x-real-ip").is_none());
    }
}
