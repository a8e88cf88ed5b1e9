//! `upstreams:` of causeway.yaml compiled: addresses resolved once, credentials, TLS (one trust
//! configuration for pooled and in-process calls), the ERP budget with its classes and overload
//! signals.

use super::upstream_tls::{self, UpstreamTls};
use super::{Diagnostics, Env, SharedState};
use crate::budget::{BudgetParams, Class, ErpBudget, Pacing};
use crate::config::spec::{BudgetSpec, CredentialSpec, MainSpec, PacingSpec, UpstreamSpec};
use http::{HeaderName, HeaderValue, Uri};
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// An upstream ERP instance, ready to build pingora peers from.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// Resolved once at load time: no DNS on the request path (a reload re-resolves).
    pub address: std::net::SocketAddr,
    pub tls: bool,
    pub sni: String,
    /// Trust and client certificate toward the ERP (`https://` upstreams).
    pub tls_settings: Option<Arc<UpstreamTls>>,
    /// `Host` header sent upstream.
    pub host_header: HeaderValue,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub credential: Option<(HeaderName, HeaderValue)>,
    pub budget: Option<UpstreamBudget>,
    /// `scheme://authority` for in-process calls (mediated routes).
    pub base_url: String,
    /// Pooled client for in-process calls, built on first use (pinned to `address`).
    pub client: std::sync::OnceLock<Option<reqwest::Client>>,
}

impl Upstream {
    /// The in-process HTTP client: pooled connections, the upstream's connect and read timeouts,
    /// DNS resolved at load time like the proxy's peers.
    /// `None` only when no TLS provider is installed (a startup bug, reported as a 500).
    pub fn client(&self) -> Option<&reqwest::Client> {
        let client = self.client.get_or_init(|| {
            let host = self.sni.clone();
            let mut builder = reqwest::Client::builder();
            if let Some(tls) = &self.tls_settings {
                builder = builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&tls.client_config));
            }
            builder
                .resolve(&host, self.address)
                .connect_timeout(self.connect_timeout)
                .read_timeout(self.read_timeout)
                .pool_idle_timeout(self.idle_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .ok()
        });
        client.as_ref()
    }
}

/// An upstream's throttle: the shared budget, its classes and the overload signals to watch for.
#[derive(Debug)]
pub struct UpstreamBudget {
    pub budget: Arc<dyn ErpBudget>,
    pub classes: HashMap<String, Class>,
    pub default_class: Class,
    /// (status, body substring): `None` means the status alone signals overload.
    pub overload_signals: Vec<(u16, Option<String>)>,
}

pub(super) fn compile_upstreams(
    file: &Path,
    dir: &Path,
    main: &MainSpec,
    env: &Env,
    state: &SharedState,
    diags: &mut Diagnostics,
) -> BTreeMap<String, Arc<Upstream>> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &main.upstreams {
        let spec = &spanned.value;
        if let Some(tls) = spec.tls.as_ref().filter(|t| !t.verify && t.insecure_skip_verify_acknowledged) {
            let at = tls.sni.as_ref().unwrap_or(&spec.url);
            env.warn(
                file,
                at.referenced.line(),
                at.referenced.column(),
                format!("upstream `{name}`: tls.verify is false: the ERP's certificate is not checked"),
            );
        }
        match compile_upstream(name, spec, dir, env, state) {
            Ok(u) => {
                out.insert(name.clone(), Arc::new(u));
            }
            Err((span_line, msg)) => {
                let span = span_line.unwrap_or(&spec.url);
                diags.at(file, span, format!("upstream `{name}`: {msg}"));
            }
        }
    }
    out
}

type SpannedErr<'a> = (Option<&'a Spanned<String>>, String);

fn compile_budget(upstream: &str, spec: &BudgetSpec, state: &SharedState) -> Result<UpstreamBudget, String> {
    if spec.window_requests == 0 || spec.window_seconds == 0 || spec.max_concurrent == 0 {
        return Err("budget: window_requests, window_seconds and max_concurrent must be at least 1".into());
    }
    if spec.max_pause_seconds == 0 {
        return Err("budget: max_pause_seconds must be at least 1".into());
    }
    if spec.burst == 0 || spec.burst > spec.window_requests {
        return Err(format!(
            "budget: burst must be between 1 and window_requests ({}), not {}",
            spec.window_requests, spec.burst
        ));
    }
    if !(spec.max_share > 0.0 && spec.max_share <= 1.0) {
        return Err(format!("budget: max_share must be above 0 and at most 1, not {}", spec.max_share));
    }
    let classes: HashMap<String, Class> = spec
        .classes
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                Class {
                    name: Arc::from(n.as_str()),
                    priority: c.priority,
                    max_wait: Duration::from_millis(c.max_wait_ms),
                },
            )
        })
        .collect();
    let default_class = classes
        .get(&spec.default_class)
        .cloned()
        .ok_or_else(|| format!("budget: default_class `{}` is not one of the classes", spec.default_class))?;
    let params = BudgetParams {
        window_requests: spec.window_requests,
        window: Duration::from_secs(spec.window_seconds),
        window_margin: Duration::from_millis(spec.window_margin_ms),
        max_concurrent: spec.max_concurrent,
        queue: spec.queue,
        backoff_initial: Duration::from_millis(spec.backoff_initial_ms.max(1)),
        backoff_max: Duration::from_millis(spec.backoff_max_ms.max(spec.backoff_initial_ms.max(1))),
        circuit_failures: spec.circuit_failures.max(1),
        circuit_open: Duration::from_secs(spec.circuit_open_seconds),
        max_pause: Duration::from_secs(spec.max_pause_seconds),
        max_share: spec.max_share,
        pacing: (spec.pacing == PacingSpec::Smooth).then(|| Pacing {
            // The margin is spread over the window too: jitter must not push two requests closer
            // together than the ERP's own spacing.
            interval: (Duration::from_secs(spec.window_seconds)
                + Duration::from_millis(spec.window_margin_ms))
                / spec.window_requests,
            burst: spec.burst,
        }),
        adaptive: spec.adaptive,
    };
    // Refusals count from zero for every class, so their rates (dashboard, alerts) have series.
    let rejected = &crate::observe::metrics::Metrics::global().erp_rejected;
    for class in classes.keys() {
        for reason in ["deadline", "queue_full", "circuit_open", "paused"] {
            rejected.with_label_values(&[upstream, class.as_str(), reason]);
        }
    }
    Ok(UpstreamBudget {
        budget: state.budget(upstream, params, spec.when_redis_unavailable),
        classes,
        default_class,
        overload_signals: spec.overload_signals.iter().map(|s| (s.status, s.body_contains.clone())).collect(),
    })
}

fn compile_upstream<'a>(
    name: &str,
    spec: &'a UpstreamSpec,
    dir: &Path,
    env: &Env,
    state: &SharedState,
) -> Result<Upstream, SpannedErr<'a>> {
    let uri: Uri =
        spec.url.value.parse().map_err(|_| (None, format!("`{}` is not a URL", spec.url.value)))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err((None, "url must start with http:// or https://".into())),
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err((None, "url must not have a path or query; routes rewrite paths".into()));
    }
    let host = uri.host().ok_or((None, "url has no host".to_string()))?.to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    // Offline (`check --offline`), names are not resolved: the pipeline's DNS is not production's.
    let address = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port),
        Err(_) if env.offline() => std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port),
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| (None, format!("cannot resolve host `{host}`")))?,
    };
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| host.clone());
    let credential = match &spec.credentials {
        None => None,
        Some(c) => Some(compile_credential(c)?),
    };
    if spec.tls.is_some() && !tls {
        return Err((None, "tls: settings are for an https:// url".into()));
    }
    let tls_settings = if !tls || offline_files_missing(spec, dir, env) {
        None
    } else {
        Some(Arc::new(upstream_tls::compile(spec.tls.as_ref(), host.trim_matches(['[', ']']), dir)?))
    };
    let sni = tls_settings.as_ref().map_or_else(|| host.clone(), |t| t.sni.clone());
    let budget = match &spec.budget {
        Some(b) => Some(compile_budget(name, b, state).map_err(|e| (None, e))?),
        None => None,
    };
    let ms = Duration::from_millis;
    Ok(Upstream {
        budget,
        name: name.to_string(),
        address,
        tls,
        sni: sni.clone(),
        tls_settings,
        host_header: HeaderValue::from_str(&authority).map_err(|_| (None, "invalid host".to_string()))?,
        connect_timeout: ms(spec.connect_timeout_ms),
        read_timeout: ms(spec.read_timeout_ms),
        write_timeout: ms(spec.write_timeout_ms),
        idle_timeout: Duration::from_secs(spec.pool_idle_seconds),
        credential,
        // In-process calls name the SNI host (resolved to `address`), so both paths check the
        // same name.
        base_url: match uri.port_u16() {
            Some(p) if tls => format!("https://{}:{p}", bracket(&sni)),
            None if tls => format!("https://{}", bracket(&sni)),
            _ => format!("http://{authority}"),
        },
        client: std::sync::OnceLock::new(),
    })
}

/// `check --offline` on a machine without the ERP's CA or client certificate: a warning, and
/// the rest of the upstream is checked without them.
fn offline_files_missing(spec: &UpstreamSpec, dir: &Path, env: &Env) -> bool {
    let Some(tls) = spec.tls.as_ref().filter(|_| env.offline()) else { return false };
    let mut missing = false;
    for path in [&tls.ca_file, &tls.client_cert, &tls.client_key].into_iter().flatten() {
        let full = dir.join(&path.value);
        if !full.exists() {
            env.warn(
                &dir.join(super::MAIN_FILE),
                path.referenced.line(),
                path.referenced.column(),
                format!("{} does not exist here; it is read at start", full.display()),
            );
            missing = true;
        }
    }
    missing
}

/// A host for a URL: IPv6 addresses in brackets.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn compile_credential<'a>(spec: &'a CredentialSpec) -> Result<(HeaderName, HeaderValue), SpannedErr<'a>> {
    // `${NAME}` references were expanded when the file was read.
    let expand = |s: &'a Spanned<String>| Ok::<_, SpannedErr<'a>>(s.value.clone());
    let (name, value, span) = match spec {
        CredentialSpec::Bearer { token } => {
            (http::header::AUTHORIZATION, format!("Bearer {}", expand(token)?), token)
        }
        CredentialSpec::Basic { username, password } => {
            use base64::Engine;
            let pair = format!("{}:{}", expand(username)?, expand(password)?);
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            (http::header::AUTHORIZATION, format!("Basic {encoded}"), password)
        }
        CredentialSpec::Header { name, value } => {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (Some(value), format!("credentials: `{name}` is not a header name")))?;
            (n, expand(value)?, value)
        }
    };
    let mut value = HeaderValue::from_str(&value)
        .map_err(|_| (Some(span), "credentials: value is not a valid header value".to_string()))?;
    value.set_sensitive(true);
    Ok((name, value))
}
