//! Header hygiene: hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded in either direction,
//! and credentials stay on their side: the caller's (`Authorization`, API keys, cookies) never go
//! upstream, the gateway's ERP session (cookies, challenges, CSRF tokens) never reaches callers.

use crate::edge::client_addr::ClientAddress;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

/// Always hop-by-hop, whether or not `Connection` lists them. `Transfer-Encoding` is left to
/// pingora, which re-frames bodies itself.
const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"];

pub use crate::policy::headers::UPSTREAM_SESSION_HEADERS;

/// Remove the caller's credentials: `Authorization` always, and the route's list (cookies, the
/// headers API-key policies read).
pub fn strip_caller_credentials(req: &mut RequestHeader, also: &[http::HeaderName]) {
    req.remove_header(&http::header::AUTHORIZATION);
    req.remove_header("proxy-authorization");
    for name in also {
        req.remove_header(name);
    }
}

/// Remove the upstream session headers the route does not pass. One pass over the response's
/// few headers; a removal only when one is there (rare).
pub fn strip_upstream_session(resp: &mut ResponseHeader, names: &[http::HeaderName]) {
    if !resp.headers.keys().any(|k| names.contains(k)) {
        return;
    }
    for name in names {
        resp.remove_header(name);
    }
}

/// Header names listed in `Connection` (besides the fixed set), lowercased. Allocates only when
/// `Connection` lists something, which almost no request does.
fn listed_in_connection(connection: Option<&http::HeaderValue>) -> Vec<String> {
    let Some(listed) = connection.and_then(|v| v.to_str().ok()) else { return Vec::new() };
    listed
        .split(',')
        .map(|t| t.trim().to_ascii_lowercase())
        // Never let a caller strip framing or the gateway's own headers this way.
        .filter(|t| !t.is_empty() && !HOP_BY_HOP.contains(&t.as_str()))
        .filter(|t| t != "transfer-encoding" && t != "content-length" && t != "host")
        .collect()
}

pub fn strip_hop_by_hop_request(req: &mut RequestHeader) {
    for name in listed_in_connection(req.headers.get(http::header::CONNECTION)) {
        req.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        req.remove_header(*name);
    }
}

pub fn strip_hop_by_hop_response(resp: &mut ResponseHeader) {
    for name in listed_in_connection(resp.headers.get(http::header::CONNECTION)) {
        resp.remove_header(&name);
    }
    for name in HOP_BY_HOP {
        resp.remove_header(*name);
    }
}

/// Forwarding headers a caller may send: the gateway removes them and writes its own from the
/// hops it believed ([`ClientAddress`]), so a forged entry never reaches the ERP.
const FORWARDING: &[&str] =
    &["x-forwarded-for", "forwarded", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"];

/// `X-Forwarded-For`, `Forwarded` and `X-Forwarded-Proto` as the gateway vouches for them.
pub fn set_forwarding(
    req: &mut RequestHeader,
    client: Option<&ClientAddress>,
    proto: &'static str,
) -> Result<()> {
    for name in FORWARDING {
        req.remove_header(*name);
    }
    if let Some(client) = client {
        req.insert_header("x-forwarded-for", client.x_forwarded_for())?;
        req.insert_header("forwarded", client.forwarded(proto))?;
    }
    req.insert_header("x-forwarded-proto", proto)?;
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
