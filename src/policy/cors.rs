//! `kind: cors`: browser callers (a CPQ inside the CRM's web UI) on other origins. The gateway
//! answers preflights itself, before authentication and without touching the ERP, and marks
//! answers to allowed origins; a request from an origin the policy does not list is refused
//! with a problem rather than sent to the ERP for the browser to discard.

use http::{HeaderName, Method};

/// Headers a browser may always send (the Fetch standard's CORS-safelisted request headers).
const SAFELISTED: &[&str] = &["accept", "accept-language", "content-language", "content-type"];

#[derive(Debug)]
pub struct CorsPolicy {
    pub name: String,
    /// Exact origins (`https://crm.example.com`), lower-case; `None`: any origin (`*`).
    origins: Option<Vec<String>>,
    methods: Vec<Method>,
    /// Lower-case header names the browser may send.
    headers: Vec<String>,
    expose: String,
    credentials: bool,
    max_age: u64,
}

/// Why a preflight or a request is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum CorsRefusal {
    Origin(String),
    Method(String),
    Header(String),
}

impl CorsRefusal {
    pub fn describe(&self) -> String {
        match self {
            CorsRefusal::Origin(o) => {
                format!("Requests from the origin `{}` are not allowed on this route", bounded(o))
            }
            CorsRefusal::Method(m) => {
                format!("The method `{}` is not allowed from browsers on this route", bounded(m))
            }
            CorsRefusal::Header(h) => {
                format!("The header `{}` is not allowed from browsers on this route", bounded(h))
            }
        }
    }
}

/// A caller's text as the problem quotes it: at most 128 characters, without control or
/// bidirectional-override characters (which would make the detail read differently).
fn bounded(s: &str) -> String {
    let bidi =
        |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    s.chars().filter(|c| !c.is_control() && !bidi(*c)).take(128).collect()
}

pub struct CorsSpecParts<'a> {
    pub allow_origins: &'a [String],
    pub allow_methods: &'a [String],
    pub allow_headers: &'a [String],
    pub expose_headers: &'a [String],
    pub allow_credentials: bool,
    pub max_age_seconds: u64,
}

impl CorsPolicy {
    pub fn compile(name: &str, spec: CorsSpecParts<'_>) -> Result<Self, String> {
        if spec.allow_origins.is_empty() {
            return Err("allow_origins: list the origins, such as https://crm.example.com, or `*`".into());
        }
        let any = spec.allow_origins.iter().any(|o| o == "*");
        if any && spec.allow_origins.len() > 1 {
            return Err("allow_origins: `*` stands alone".into());
        }
        if any && spec.allow_credentials {
            return Err(
                "allow_origins `*` cannot go with allow_credentials (browsers refuse it): list the origins"
                    .into(),
            );
        }
        let mut origins = Vec::new();
        for o in spec.allow_origins.iter().filter(|o| *o != "*") {
            let uri: http::Uri = o.parse().map_err(|_| format!("allow_origins: `{o}` is not an origin"))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            if !scheme_ok || uri.host().is_none() || !matches!(uri.path(), "" | "/") || o.ends_with('/') {
                return Err(format!(
                    "allow_origins: `{o}` must be scheme://host[:port], such as https://crm.example.com"
                ));
            }
            origins.push(o.to_ascii_lowercase());
        }
        let mut methods = Vec::new();
        for m in spec.allow_methods {
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("allow_methods: `{m}` is not a method"))?;
            methods.push(method);
        }
        if methods.is_empty() {
            return Err("allow_methods: list the methods browsers may use".into());
        }
        let names = |list: &[String], what: &str| -> Result<Vec<String>, String> {
            list.iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map(|n| n.as_str().to_string())
                        .map_err(|_| format!("{what}: `{h}` is not a header name"))
                })
                .collect()
        };
        Ok(CorsPolicy {
            name: name.to_string(),
            origins: (!any).then_some(origins),
            methods,
            headers: names(spec.allow_headers, "allow_headers")?,
            expose: names(spec.expose_headers, "expose_headers")?.join(", "),
            credentials: spec.allow_credentials,
            max_age: spec.max_age_seconds,
        })
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        match &self.origins {
            None => true,
            Some(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`), or why not.
    pub fn preflight(
        &self,
        origin: &str,
        method: &str,
        request_headers: Option<&str>,
    ) -> Result<Vec<(&'static str, String)>, CorsRefusal> {
        if !self.origin_allowed(origin) {
            return Err(CorsRefusal::Origin(origin.to_string()));
        }
        if !self.methods.iter().any(|m| m.as_str().eq_ignore_ascii_case(method)) {
            return Err(CorsRefusal::Method(method.to_string()));
        }
        for h in request_headers.unwrap_or("").split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let h = h.to_ascii_lowercase();
            if !SAFELISTED.contains(&h.as_str()) && !self.headers.contains(&h) {
                return Err(CorsRefusal::Header(h));
            }
        }
        let mut out = self.response_headers(origin);
        out.push((
            "access-control-allow-methods",
            self.methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", "),
        ));
        if !self.headers.is_empty() {
            out.push(("access-control-allow-headers", self.headers.join(", ")));
        }
        out.push(("access-control-max-age", self.max_age.to_string()));
        out.push(("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers".into()));
        Ok(out)
    }

    /// Headers on any answer to an allowed origin (proxied, local and problems alike).
    pub fn response_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(4);
        match &self.origins {
            None => out.push(("access-control-allow-origin", "*".to_string())),
            Some(_) => {
                out.push(("access-control-allow-origin", origin.to_string()));
                out.push(("vary", "Origin".into()));
            }
        }
        if self.credentials {
            out.push(("access-control-allow-credentials", "true".into()));
        }
        if !self.expose.is_empty() {
            out.push(("access-control-expose-headers", self.expose.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn policy(origins: &[&str], credentials: bool) -> Result<CorsPolicy, String> {
        CorsPolicy::compile(
            "cpq",
            CorsSpecParts {
                allow_origins: &strings(origins),
                allow_methods: &strings(&["GET", "post"]),
                allow_headers: &strings(&["Authorization", "idempotency-key"]),
                expose_headers: &strings(&["x-correlation-id"]),
                allow_credentials: credentials,
                max_age_seconds: 600,
            },
        )
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_gets_the_configured_headers() {
        let p = policy(&["https://crm.example.com"], true).unwrap();
        let h = p.preflight("https://CRM.example.com", "POST", Some("content-type, Authorization")).unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("access-control-allow-origin"), Some("https://CRM.example.com"));
        assert_eq!(get("access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(get("access-control-allow-headers"), Some("authorization, idempotency-key"));
        assert_eq!(get("access-control-allow-credentials"), Some("true"));
        assert_eq!(get("access-control-max-age"), Some("600"));
    }

    #[test]
    fn other_origins_methods_and_headers_are_refused() {
        let p = policy(&["https://crm.example.com"], false).unwrap();
        assert!(matches!(p.preflight("https://evil.example", "GET", None), Err(CorsRefusal::Origin(_))));
        assert!(matches!(p.preflight("null", "GET", None), Err(CorsRefusal::Origin(_))));
        assert!(matches!(
            p.preflight("https://crm.example.com", "DELETE", None),
            Err(CorsRefusal::Method(_))
        ));
        assert!(matches!(
            p.preflight("https://crm.example.com", "GET", Some("x-admin")),
            Err(CorsRefusal::Header(_))
        ));
        let hostile = CorsRefusal::Origin("\u{202e}x\n".repeat(1000)).describe();
        assert!(hostile.len() < 220 && !hostile.contains('\u{202e}') && !hostile.contains('\n'), "{hostile}");
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(policy(&["*"], true).is_err());
        assert!(policy(&["*", "https://a.example"], false).is_err());
        assert!(policy(&["https://crm.example.com/path"], false).is_err());
        assert!(policy(&["crm.example.com"], false).is_err());
        assert!(policy(&[], false).is_err());
        let any = policy(&["*"], false).unwrap();
        assert!(any.origin_allowed("https://anything.example"));
        assert_eq!(any.response_headers("https://a.example")[0].1, "*");
    }
}
