//! `kind: headers`: set or remove headers on the upstream request and on the response.

use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

#[derive(Debug)]
pub struct HeaderPolicy {
    pub name: String,
    pub request: CompiledOps,
    pub response: CompiledOps,
}

#[derive(Debug, Default)]
pub struct CompiledOps {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// Response headers of the upstream's own session with the gateway: the ERP's cookies and
/// challenges belong to the gateway's credential, not to the caller (a route may pass some of
/// them with `pass_headers.response`).
pub const UPSTREAM_SESSION_HEADERS: &[&str] = &[
    "set-cookie",
    "set-cookie2",
    "www-authenticate",
    "proxy-authenticate",
    "authentication-info",
    "proxy-authentication-info",
    "x-csrf-token",
    "x-xsrf-token",
];

/// Headers a policy may not touch: the gateway owns them (framing, credentials, correlation).
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "authorization",
    "x-correlation-id",
    "traceparent",
];

impl CompiledOps {
    /// From a policy's `set` (name → value) and `remove` lists.
    pub fn compile<'a>(
        set: impl IntoIterator<Item = (&'a String, &'a String)>,
        remove: &[String],
    ) -> Result<Self, String> {
        let mut out = CompiledOps::default();
        for (name, value) in set {
            let n = parse_name(name)?;
            let v = HeaderValue::from_str(value)
                .map_err(|_| format!("header `{name}` has a value that is not a valid header value"))?;
            out.set.push((n, v));
        }
        for name in remove {
            out.remove.push(parse_name(name)?);
        }
        Ok(out)
    }

    pub fn apply_request(&self, req: &mut RequestHeader) {
        for n in &self.remove {
            req.remove_header(n);
        }
        for (n, v) in &self.set {
            // insert_header only fails on invalid names/values, which compile() excluded.
            let _ = req.insert_header(n.clone(), v.clone());
        }
    }

    pub fn apply_response(&self, resp: &mut ResponseHeader) {
        for n in &self.remove {
            resp.remove_header(n);
        }
        for (n, v) in &self.set {
            let _ = resp.insert_header(n.clone(), v.clone());
        }
    }
}

fn parse_name(name: &str) -> Result<HeaderName, String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    if RESERVED.contains(&n.as_str()) {
        return Err(format!("header `{name}` is managed by the gateway and cannot be changed by a policy"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn sets_and_removes() {
        let set = BTreeMap::from([("x-erp-api".to_string(), "v2".to_string())]);
        let c = CompiledOps::compile(&set, &["x-internal".into()]).unwrap();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-internal", "1").unwrap();
        c.apply_request(&mut req);
        assert!(req.headers.get("x-internal").is_none());
        assert_eq!(req.headers.get("x-erp-api").unwrap(), "v2");
    }

    #[test]
    fn reserved_and_invalid_headers_are_refused() {
        let none = BTreeMap::new();
        assert!(CompiledOps::compile(&none, &["Authorization".into()])
            .unwrap_err()
            .contains("managed by the gateway"));
        let bad = BTreeMap::from([("bad name".to_string(), "x".to_string())]);
        assert!(CompiledOps::compile(&bad, &[]).is_err());
    }
}
