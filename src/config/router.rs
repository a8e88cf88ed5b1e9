//! The routing table of one configuration: host, method and normalized path → a compiled route,
//! plus the upstream path its rewrite builds.

use super::CompiledRoute;
use std::sync::Arc;

/// The routes of one configuration, ordered most specific first.
#[derive(Default)]
pub struct Router {
    routes: Vec<Arc<CompiledRoute>>,
}

/// The result of routing a request.
pub struct RouteMatch {
    pub route: Arc<CompiledRoute>,
    /// Path and query to send upstream.
    pub upstream_path: String,
}

impl Router {
    pub fn new(mut routes: Vec<Arc<CompiledRoute>>) -> Self {
        // Stable sort keeps file order among equally specific routes.
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.specificity()));
        Router { routes }
    }

    pub fn routes(&self) -> &[Arc<CompiledRoute>] {
        &self.routes
    }

    pub fn find(
        &self,
        host: Option<&str>,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<RouteMatch> {
        let host = strip_port(host);
        for route in &self.routes {
            if !host_matches(route, host) {
                continue;
            }
            if let Some(methods) = &route.methods {
                if !methods.iter().any(|m| m == method) {
                    continue;
                }
            }
            if let Some(captures) = route.path.matches(path) {
                let upstream_path = match &route.rewrite {
                    Some(rw) => rw.render(&captures, query),
                    None => match query {
                        Some(q) => format!("{path}?{q}"),
                        None => path.to_string(),
                    },
                };
                return Some(RouteMatch { route: route.clone(), upstream_path });
            }
        }
        None
    }

    /// Methods that routes for this host and path accept, when [`Router::find`] found none for
    /// the request's method (a 405 with `Allow`, not a 404). Empty when no route has the path
    /// or a matching route takes any method.
    pub fn allowed_methods(&self, host: Option<&str>, path: &str) -> Vec<String> {
        let host = strip_port(host);
        let mut allowed: Vec<String> = Vec::new();
        for route in self.routes.iter().filter(|r| host_matches(r, host) && r.path.matches(path).is_some()) {
            match &route.methods {
                Some(methods) => allowed.extend(methods.iter().cloned()),
                None => return Vec::new(),
            }
        }
        allowed.sort();
        allowed.dedup();
        allowed
    }
}

/// `Host` without its port.
fn strip_port(host: Option<&str>) -> Option<&str> {
    host.map(|h| match h.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => h,
    })
}

fn host_matches(route: &CompiledRoute, host: Option<&str>) -> bool {
    route.host.as_ref().is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)))
}
