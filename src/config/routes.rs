//! `routes/*.yaml` compiled: templates parsed, policies and the upstream resolved, the route
//! checked (secure by default: a credentialed upstream needs an authenticating route), and the
//! header lists it strips.

use super::{parse_file, yaml_files, Diagnostics, Upstream};
use crate::budget::throttle::Class;
use crate::config::spec::{self, RoutesFile};
use crate::policy::Policy;
use crate::route::{PathTemplate, RewriteTemplate};
use http::HeaderName;
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const WRITE_METHODS: &[&str] = &["POST", "PUT", "PATCH", "DELETE"];
/// Request headers a route may let through to its upstream (`pass_headers.request`); a
/// caller's `Authorization` and API-key headers never pass.
const PASSABLE_REQUEST: &[&str] = &["cookie"];

/// A route, compiled: matcher, rewrite, upstream, limits and its policies in order.
#[derive(Debug)]
pub struct CompiledRoute {
    pub name: String,
    pub host: Option<String>,
    pub methods: Option<Vec<String>>,
    pub path: PathTemplate,
    pub rewrite: Option<RewriteTemplate>,
    pub upstream: Arc<Upstream>,
    pub total_timeout: Option<Duration>,
    pub read_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_body_bytes: u64,
    pub policies: Vec<Arc<Policy>>,
    pub scopes: Vec<String>,
    /// Priority class in the upstream's budget, when it has one.
    pub erp_class: Option<Class>,
    /// Served in-process by this process API endpoint.
    pub process: Option<spec::ProcessEndpoint>,
    /// Declared `public: true`: anonymous callers reach a credentialed upstream.
    pub public: bool,
    /// Credential-bearing request headers never sent upstream (caller credentials, cookies).
    pub strip_request: Vec<HeaderName>,
    /// The upstream's session headers never sent to the caller (cookies, challenges, CSRF).
    pub strip_response: Vec<HeaderName>,
    pub metrics: crate::observe::metrics::RouteMetrics,
    /// The API version the route serves, when it declares one.
    pub version: Option<Arc<str>>,
    pub deprecation: Option<crate::config::lifecycle::Deprecation>,
    /// Tiers the route's policies name: the usage metric's tier label is one of these,
    /// `anonymous` or `other` (a JWT claim never becomes a label of its own).
    pub known_tiers: Vec<Arc<str>>,
}

impl CompiledRoute {
    /// The route's mediation policy: its requests are handled in-process (`proxy::mediated`).
    pub fn mediation(&self) -> Option<&crate::mediation::MediationPolicy> {
        self.policies.iter().find_map(|p| match p.as_ref() {
            Policy::Mediation(m) => Some(m),
            _ => None,
        })
    }
}

/// The tiers a route's policies name (quota tiers, API-key consumers', JWT defaults).
fn known_tiers(policies: &[Arc<Policy>]) -> Vec<Arc<str>> {
    let mut tiers: Vec<Arc<str>> = Vec::new();
    for policy in policies {
        match policy.as_ref() {
            Policy::RateLimit(r) => tiers.extend(r.tiers.keys().map(|t| Arc::from(t.as_str()))),
            Policy::ApiKey(k) => tiers.extend(k.by_hash.values().map(|c| c.tier.clone())),
            Policy::Jwt(j) => tiers.push(j.default_tier.clone()),
            _ => {}
        }
    }
    tiers.sort();
    tiers.dedup();
    tiers
}

pub(super) fn load_routes(
    dir: &Path,
    env: &super::Env,
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    policies: &HashMap<String, Arc<Policy>>,
    declared_upstreams: Option<&[String]>,
    diags: &mut Diagnostics,
) -> Vec<Arc<CompiledRoute>> {
    let mut out = Vec::new();
    let mut names: HashMap<String, ()> = HashMap::new();
    // Every header an api_key policy reads is a credential for the gateway, never for upstreams.
    let mut api_key_headers: Vec<String> = policies
        .values()
        .filter_map(|p| match p.as_ref() {
            Policy::ApiKey(k) => Some(k.header.as_str().to_string()),
            _ => None,
        })
        .collect();
    api_key_headers.sort();
    api_key_headers.dedup();
    for file in yaml_files(dir, diags) {
        let Some(parsed) = parse_file::<RoutesFile>(&file, env, diags) else { continue };
        for spanned in parsed.routes {
            let spec = &spanned.value;
            let before = diags.0.len();
            let name = spec.name.value.clone();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                diags.at(&file, &spec.name, "route name must be letters, digits, `-`, `_` or `.`");
            }
            if names.insert(name.clone(), ()).is_some() {
                diags.at(&file, &spec.name, format!("route `{name}` is defined twice"));
            }
            let path = match PathTemplate::parse(&spec.matcher.path.value) {
                Ok(p) => Some(p),
                Err(e) => {
                    diags.at(&file, &spec.matcher.path, e);
                    None
                }
            };
            let rewrite = match (&spec.rewrite, &path) {
                (Some(rw), Some(p)) => match RewriteTemplate::parse(&rw.value, p.param_names()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        diags.at(&file, rw, e);
                        None
                    }
                },
                _ => None,
            };
            let methods = spec.matcher.methods.as_ref().map(|ms| {
                ms.iter()
                    .filter_map(|m| {
                        let upper = m.value.to_ascii_uppercase();
                        if METHODS.contains(&upper.as_str()) {
                            Some(upper)
                        } else {
                            diags.at(&file, m, format!("unknown method `{}`", m.value));
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            });
            let upstream = upstreams.get(&spec.upstream.value).cloned();
            let declared = declared_upstreams.map(|d| d.contains(&spec.upstream.value));
            if declared == Some(false) {
                let known = declared_upstreams.unwrap_or_default().join(", ");
                diags.at(
                    &file,
                    &spec.upstream,
                    format!("route `{name}` names upstream `{}`, which causeway.yaml does not define (defined: {})",
                        spec.upstream.value, known),
                );
            }
            let mut route_policies = Vec::new();
            for p in &spec.policies {
                match policies.get(&p.value) {
                    Some(policy) => route_policies.push(policy.clone()),
                    None => diags.at(
                        &file,
                        p,
                        format!(
                            "route `{name}` names policy `{}`, which no file in policies/ defines",
                            p.value
                        ),
                    ),
                }
            }
            let mediations =
                route_policies.iter().filter(|p| matches!(p.as_ref(), Policy::Mediation(_))).count();
            if mediations > 1 {
                diags.at(
                    &file,
                    &spec.name,
                    format!("route `{name}` names {mediations} mediation policies; a route has at most one"),
                );
            }
            let cors = route_policies.iter().filter(|p| matches!(p.as_ref(), Policy::Cors(_))).count();
            if cors > 1 {
                diags.at(
                    &file,
                    &spec.name,
                    format!("route `{name}` names {cors} cors policies; a route has at most one"),
                );
            }
            if spec.process.is_some() && mediations > 0 {
                diags.at(
                    &file,
                    &spec.name,
                    format!("route `{name}` is a process endpoint; it cannot also name a mediation policy"),
                );
            }
            if spec.process == Some(spec::ProcessEndpoint::Order)
                && path.as_ref().is_some_and(|p| !p.param_names().iter().any(|n| n == "id"))
            {
                diags.at(
                    &file,
                    &spec.matcher.path,
                    "an `order` process endpoint needs an `{id}` path parameter",
                );
            }
            let authenticates = route_policies.iter().any(|p| p.authenticates());
            // The ERP's notifications carry the subscription's clientState, checked by the
            // endpoint itself; the ERP cannot present a consumer's key or token.
            let self_authenticating = spec.process == Some(spec::ProcessEndpoint::ErpNotifications);
            if self_authenticating && (authenticates || !spec.scopes.is_empty()) {
                diags.at(
                    &file,
                    &spec.name,
                    format!("route `{name}` takes the ERP's change notifications, which authenticate with the subscription's clientState: it cannot name jwt, api_key or mtls policies or scopes (the ERP cannot present them)"),
                );
            }
            if !spec.scopes.is_empty() && !authenticates {
                diags.at(
                    &file,
                    &spec.name,
                    format!("route `{name}` requires scopes but names no jwt, api_key or mtls policy"),
                );
            }
            // Secure by default: the upstream's credential is never lent to an anonymous caller
            // or to a caller without a scope for writing, unless the route says so.
            let credentialed =
                upstream.as_ref().is_some_and(|u| u.credential.is_some()) && !self_authenticating;
            if credentialed && !spec.public && !authenticates {
                diags.at(
                    &file,
                    &spec.name,
                    format!(
                        "route `{name}` sends requests to upstream `{}` with its credential but authenticates no caller; name a jwt, api_key or mtls policy, or declare `public: true` if anonymous callers may use that credential",
                        spec.upstream.value
                    ),
                );
            }
            let writes =
                methods.as_ref().is_none_or(|ms| ms.iter().any(|m| WRITE_METHODS.contains(&m.as_str())));
            if credentialed && !spec.public && authenticates && writes && spec.scopes.is_empty() {
                diags.at(
                    &file,
                    &spec.name,
                    format!(
                        "route `{name}` accepts writes to upstream `{}` but requires no scope; add `scopes:` naming a write scope (or declare `public: true`)",
                        spec.upstream.value
                    ),
                );
            }
            let pass =
                |names: &[Spanned<String>], allowed: &[&str], direction: &str, diags: &mut Diagnostics| {
                    let mut out = Vec::new();
                    for n in names {
                        let lower = n.value.to_ascii_lowercase();
                        if allowed.contains(&lower.as_str()) {
                            out.push(lower);
                        } else {
                            diags.at(
                                &file,
                                n,
                                format!(
                                    "pass_headers.{direction}: `{}` cannot be passed (only {})",
                                    n.value,
                                    allowed.join(", ")
                                ),
                            );
                        }
                    }
                    out
                };
            let pass_request = pass(&spec.pass_headers.request, PASSABLE_REQUEST, "request", diags);
            let pass_response = pass(
                &spec.pass_headers.response,
                crate::policy::headers::UPSTREAM_SESSION_HEADERS,
                "response",
                diags,
            );
            let erp_class = match (&spec.erp_class, upstream.as_ref().and_then(|u| u.budget.as_ref())) {
                (Some(c), Some(b)) => match b.classes.get(&c.value) {
                    Some(class) => Some(class.clone()),
                    None => {
                        let known: Vec<&str> = b.classes.keys().map(String::as_str).collect();
                        diags.at(
                            &file,
                            c,
                            format!(
                                "erp_class `{}` is not a class of the upstream's budget ({})",
                                c.value,
                                known.join(", ")
                            ),
                        );
                        None
                    }
                },
                (Some(c), None) if upstream.is_some() => {
                    diags.at(
                        &file,
                        c,
                        format!(
                            "erp_class `{}` set, but upstream `{}` has no budget",
                            c.value, spec.upstream.value
                        ),
                    );
                    None
                }
                (None, Some(b)) => Some(b.default_class.clone()),
                _ => None,
            };
            if spec.max_body_bytes == 0 {
                diags.at(&file, &spec.name, "max_body_bytes must be greater than 0");
            }
            let version = spec.version.as_ref().and_then(|v| {
                crate::config::lifecycle::check_version(&v.value).map_err(|e| diags.at(&file, v, e)).ok()
            });
            let deprecation = spec.deprecation.as_ref().and_then(|d| {
                let compiled =
                    crate::config::lifecycle::compile(&d.value).map_err(|e| diags.at(&file, d, e)).ok()?;
                let now = crate::clock::now_ms() / 1000;
                if compiled.past_sunset(now) {
                    let what = if compiled.refuses_at(now) {
                        "it answers 410 Gone"
                    } else {
                        "it is still served (after_sunset: serve)"
                    };
                    env.warn(
                        &file,
                        d.referenced.line(),
                        d.referenced.column(),
                        format!(
                            "route `{name}` is past its sunset ({}): {what}; remove it or move the sunset",
                            compiled.sunset_text().unwrap_or_default()
                        ),
                    );
                }
                Some(compiled)
            });
            if diags.0.len() != before {
                continue;
            }
            let (Some(path), Some(upstream)) = (path, upstream) else { continue };
            let ms = Duration::from_millis;
            let strip_request: Vec<HeaderName> = ["cookie"]
                .into_iter()
                .map(String::from)
                .chain(api_key_headers.iter().cloned())
                .filter(|h| !pass_request.contains(h))
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect();
            let strip_response: Vec<HeaderName> = crate::policy::headers::UPSTREAM_SESSION_HEADERS
                .iter()
                .filter(|h| !pass_response.iter().any(|p| p == *h))
                .map(|h| HeaderName::from_static(h))
                .collect();
            out.push(Arc::new(CompiledRoute {
                host: spec.matcher.host.clone(),
                methods,
                path,
                rewrite,
                total_timeout: spec.timeouts.total_ms.map(ms),
                read_timeout: spec.timeouts.read_ms.map(ms).unwrap_or(upstream.read_timeout),
                connect_timeout: spec.timeouts.connect_ms.map(ms).unwrap_or(upstream.connect_timeout),
                upstream,
                max_body_bytes: spec.max_body_bytes,
                scopes: spec.scopes.clone(),
                erp_class,
                process: spec.process,
                public: spec.public,
                strip_request,
                strip_response,
                metrics: crate::observe::metrics::RouteMetrics::new(&name),
                known_tiers: known_tiers(&route_policies),
                policies: route_policies,
                version,
                deprecation,
                name,
            }));
        }
    }
    out
}
