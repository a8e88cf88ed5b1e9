//! `kind: headers`: set or remove headers on the upstream request and on the response.

use crate::config::spec::HeaderOps;
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
    pub fn compile(ops: &HeaderOps) -> Result<Self, String> {
        let mut out = CompiledOps::default();
        for (name, value) in &ops.set {
            let n = parse_name(name)?;
            let v = HeaderValue::from_str(value)
                .map_err(|_| format!("header `{name}` has a value that is not a valid header value"))?;
            out.set.push((n, v));
        }
        for name in &ops.remove {
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
        let ops = HeaderOps {
            set: BTreeMap::from([("x-erp-api".to_string(), "v2".to_string())]),
            remove: vec!["x-internal".into()],
        };
        let c = CompiledOps::compile(&ops).unwrap();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-internal", "1").unwrap();
        c.apply_request(&mut req);
        assert!(req.headers.get("x-internal").is_none());
        assert_eq!(req.headers.get("x-erp-api").unwrap(), "v2");
    }

    #[test]
    fn reserved_and_invalid_headers_are_refused() {
        let bad = HeaderOps { set: BTreeMap::new(), remove: vec!["Authorization".into()] };
        assert!(CompiledOps::compile(&bad).unwrap_err().contains("managed by the gateway"));
        let bad = HeaderOps { set: BTreeMap::from([("bad name".into(), "x".into())]), remove: vec![] };
        assert!(CompiledOps::compile(&bad).is_err());
    }
}
