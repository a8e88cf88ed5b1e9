//! Configuration: files → typed specs (`spec`) → validated, compiled runtime objects.
//!
//! `load` reads `causeway.yaml`, `policies/*.yaml` and `routes/*.yaml` from one directory,
//! reports *every* problem with file and line, and otherwise returns an immutable [`Config`]
//! that the proxy runs on. `causeway check` and `causeway serve` run the same function.

mod env;
pub mod policies;
pub mod spec;

use crate::erp::sandbox::LimitsSpec;
use crate::policy::auth_failures::FailureLimiter;
use crate::policy::jwks::RemoteJwks;
use crate::policy::ratelimit::TierLimiter;
use crate::policy::throttle::{Budget, BudgetParams, Class};
use crate::policy::Policy;
use crate::proxy::router::{PathTemplate, RewriteTemplate, Router};
use http::{HeaderName, HeaderValue, Uri};
use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;
use spec::*;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const MAIN_FILE: &str = "causeway.yaml";
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const WRITE_METHODS: &[&str] = &["POST", "PUT", "PATCH", "DELETE"];
/// Request headers a route may let through to its upstream (`pass_headers.request`); a
/// caller's `Authorization` and API-key headers never pass.
const PASSABLE_REQUEST: &[&str] = &["cookie"];

/// One problem in one file, printed as `file:line:column: message`.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
        } else {
            write!(f, "{}: {}", self.file.display(), self.message)
        }
    }
}

/// Every problem found in a configuration directory.
#[derive(Debug, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostics {
    fn at<T>(&mut self, file: &Path, span: &Spanned<T>, message: impl Into<String>) {
        self.0.push(Diagnostic {
            file: file.to_path_buf(),
            line: span.referenced.line(),
            column: span.referenced.column(),
            message: message.into(),
        });
    }

    fn file(&mut self, file: &Path, message: impl Into<String>) {
        self.0.push(Diagnostic { file: file.to_path_buf(), line: 0, column: 0, message: message.into() });
    }
}

/// Runtime state that outlives one configuration: ERP budgets (the ERP must never see more than
/// its budget, reload or not), rate-limit counters and fetched JWKS. Compiling a configuration
/// reuses an entry when its spec is unchanged.
#[derive(Default)]
pub struct SharedState {
    budgets: parking_lot::Mutex<HashMap<String, Arc<Budget>>>,
    limiters: parking_lot::Mutex<HashMap<(String, String), Arc<TierLimiter>>>,
    jwks: parking_lot::Mutex<HashMap<String, Arc<RemoteJwks>>>,
    auth_failures: parking_lot::Mutex<Option<Arc<FailureLimiter>>>,
}

impl SharedState {
    /// The budget of `upstream`, with `params` applied (a reload changes limits in place).
    pub fn budget(&self, upstream: &str, params: BudgetParams) -> Arc<Budget> {
        let mut budgets = self.budgets.lock();
        if let Some(b) = budgets.get(upstream) {
            if b.params() != params {
                b.set_params(params);
            }
            return b.clone();
        }
        let b = Budget::new(upstream, params);
        budgets.insert(upstream.to_string(), b.clone());
        b
    }

    pub fn limiter(
        &self,
        policy: &str,
        tier: &str,
        requests: u32,
        window: Duration,
        burst: u32,
    ) -> Result<Arc<TierLimiter>, String> {
        let key = (policy.to_string(), tier.to_string());
        let mut limiters = self.limiters.lock();
        if let Some(l) = limiters.get(&key).filter(|l| l.same_quota(requests, window, burst)) {
            return Ok(l.clone());
        }
        let l = Arc::new(TierLimiter::new(tier, requests, window, burst)?);
        limiters.insert(key, l.clone());
        Ok(l)
    }

    /// The failed-authentication limiter; its counts carry over a reload that keeps its limits.
    pub fn auth_failures(&self, max_failures: u32, window: Duration) -> Option<Arc<FailureLimiter>> {
        if max_failures == 0 || window.is_zero() {
            return None;
        }
        let mut current = self.auth_failures.lock();
        if let Some(l) = current.as_ref().filter(|l| l.same_limits(max_failures, window)) {
            return Some(l.clone());
        }
        let l = Arc::new(FailureLimiter::new(max_failures, window));
        *current = Some(l.clone());
        Some(l)
    }

    pub fn remote_jwks(&self, url: &str, refresh: Duration, min_refetch: Duration) -> Arc<RemoteJwks> {
        let mut all = self.jwks.lock();
        all.entry(format!("{url}|{refresh:?}|{min_refetch:?}"))
            .or_insert_with(|| Arc::new(RemoteJwks::new(url.to_string(), refresh, min_refetch)))
            .clone()
    }
}

/// A compiled, validated configuration. Immutable; replaced whole on reload.
pub struct Config {
    pub dir: PathBuf,
    pub listen: Listen,
    pub threads: usize,
    pub work_stealing: bool,
    pub upstream_pool_size: usize,
    pub shutdown_grace: Duration,
    pub health_probe_interval: Duration,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub router: Router,
    /// Every compiled policy by name, whether or not a route names it (dialect policies that
    /// wait for their route file, for instance).
    pub policies: HashMap<String, Arc<Policy>>,
    /// Quote validation rules (`policies/process/`), when that directory exists.
    pub process_rules: Option<Arc<crate::process::rules::Rules>>,
    pub sandbox: Option<SandboxSettings>,
    /// The process APIs' settings, when `causeway.yaml` has a `process:` block.
    pub process: Option<ProcessSettings>,
    /// Refuses client addresses that keep failing authentication (`None`: off).
    pub auth_failures: Option<Arc<FailureLimiter>>,
}

/// `process:` of `causeway.yaml`, compiled.
#[derive(Debug, Clone)]
pub struct ProcessSettings {
    pub erp: String,
    pub adapter: AdapterSettings,
    pub store_path: PathBuf,
    pub synchronous: Synchronous,
    pub key_ttl: Duration,
    pub max_lines: usize,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub inline_wait: Duration,
    pub lease: Duration,
}

#[derive(Debug, Clone)]
pub enum AdapterSettings {
    BusinessCentral { company: String },
    Tryton(TrytonSettings),
}

#[derive(Debug, Clone)]
pub struct TrytonSettings {
    pub database: String,
    pub login: String,
    pub password: String,
    pub company: i64,
}

/// Mediation policies the quote-to-order process needs (`policies/mediation.yaml`).
pub const PROCESS_POLICIES: &[&str] = &["canonical-quote", "salesforce-opportunity-to-quote"];
/// ... and those the Business Central adapter maps with.
pub const BC_ADAPTER_POLICIES: &[&str] = &[
    "canonical-customer-bc",
    "canonical-item-bc",
    "canonical-sales-order-create-bc",
    "canonical-sales-order-bc",
];

#[derive(Debug, Clone)]
pub struct Listen {
    pub proxy: String,
    pub admin: String,
    pub metrics: String,
    pub read_buffer_bytes: usize,
    pub client_header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_header_fields: usize,
}

#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub listen: String,
    pub token: Option<String>,
    pub limits: LimitsSpec,
}

/// An upstream ERP instance, ready to build pingora peers from.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// Resolved once at load time: no DNS on the request path (a reload re-resolves).
    pub address: std::net::SocketAddr,
    pub tls: bool,
    pub sni: String,
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
            reqwest::Client::builder()
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
    pub budget: Arc<Budget>,
    pub classes: HashMap<String, Class>,
    pub default_class: Class,
    /// (status, body substring): `None` means the status alone signals overload.
    pub overload_signals: Vec<(u16, Option<String>)>,
}

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
}

impl CompiledRoute {
    /// The route's mediation policy: its requests are handled in-process (`proxy::mediated`).
    pub fn mediation(&self) -> Option<&crate::policy::mediation::MediationPolicy> {
        self.policies.iter().find_map(|p| match p.as_ref() {
            Policy::Mediation(m) => Some(m),
            _ => None,
        })
    }
}

/// Read and compile the configuration in `dir`, with the process environment.
pub fn load(dir: &Path) -> Result<Config, Diagnostics> {
    load_with_env(dir, &|name| std::env::var(name).ok())
}

pub fn load_with_env(dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Diagnostics> {
    load_with_state(dir, env, &SharedState::default())
}

/// Compile against existing runtime state (a reload keeps budgets and counters).
pub fn load_with_state(
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    state: &SharedState,
) -> Result<Config, Diagnostics> {
    let mut diags = Diagnostics::default();
    let main_path = dir.join(MAIN_FILE);
    let main: Option<MainSpec> = parse_file(&main_path, &mut diags);

    let upstreams =
        main.as_ref().map(|m| compile_upstreams(&main_path, m, env, state, &mut diags)).unwrap_or_default();

    let policies = load_policies(dir, env, state, &mut diags);
    let process_rules = load_process_rules(&dir.join("policies").join("process"), &mut diags);
    // Routes are checked against every *declared* upstream, so one bad upstream is one error.
    let declared: Option<Vec<String>> = main.as_ref().map(|m| m.upstreams.keys().cloned().collect());
    let routes = load_routes(&dir.join("routes"), &upstreams, &policies, declared.as_deref(), &mut diags);

    let sandbox = main.as_ref().and_then(|m| m.sandbox.as_ref()).and_then(|s| {
        check_addr(&main_path, &s.listen, &mut diags);
        let token = match &s.token {
            Some(t) => match env::expand(&t.value, env) {
                Ok(v) => Some(v),
                Err(e) => {
                    diags.at(&main_path, t, format!("sandbox.token: {e}"));
                    return None;
                }
            },
            None => None,
        };
        Some(SandboxSettings { listen: s.listen.value.clone(), token, limits: s.limits.clone() })
    });

    let Some(main) = main else { return Err(diags) };
    for addr in [&main.listen.proxy, &main.listen.admin, &main.listen.metrics] {
        check_addr(&main_path, addr, &mut diags);
    }
    if main.listen.read_buffer_bytes < 1024 {
        diags.file(&main_path, "listen.read_buffer_bytes must be at least 1024");
    }
    if main.threads == Some(0) {
        diags.file(&main_path, "threads must be at least 1");
    }
    if main.listen.client_header_timeout_ms == 0
        || main.listen.max_header_bytes < 1024
        || main.listen.max_header_fields == 0
    {
        diags.file(
            &main_path,
            "listen: client_header_timeout_ms and max_header_fields must be at least 1, max_header_bytes at least 1024",
        );
    }
    if !diags.0.is_empty() {
        return Err(diags);
    }
    let store_path = dir.join(&main.store.path);
    let process = compile_process(
        &main_path,
        env,
        &main,
        (&store_path, main.store.synchronous),
        &upstreams,
        &policies,
        &process_rules,
        &routes,
        &mut diags,
    );
    if !diags.0.is_empty() {
        return Err(diags);
    }
    let threads = main.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(Config {
        dir: dir.to_path_buf(),
        listen: Listen {
            proxy: main.listen.proxy.value,
            admin: main.listen.admin.value,
            metrics: main.listen.metrics.value,
            read_buffer_bytes: main.listen.read_buffer_bytes,
            client_header_timeout: Duration::from_millis(main.listen.client_header_timeout_ms),
            max_header_bytes: main.listen.max_header_bytes,
            max_header_fields: main.listen.max_header_fields,
        },
        threads,
        work_stealing: main.work_stealing,
        upstream_pool_size: main.upstream_pool_size,
        shutdown_grace: Duration::from_secs(main.shutdown_grace_seconds),
        health_probe_interval: Duration::from_secs(main.health_probe_seconds.max(1)),
        upstreams,
        router: Router::new(routes),
        policies,
        process_rules: process_rules.map(Arc::new),
        sandbox,
        process,
        auth_failures: state.auth_failures(
            main.auth_failures.max_failures,
            Duration::from_secs(main.auth_failures.window_seconds),
        ),
    })
}

#[allow(clippy::too_many_arguments)]
fn compile_process(
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    main: &MainSpec,
    (store_path, synchronous): (&Path, Synchronous),
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    policies: &HashMap<String, Arc<Policy>>,
    rules: &Option<crate::process::rules::Rules>,
    routes: &[Arc<CompiledRoute>],
    diags: &mut Diagnostics,
) -> Option<ProcessSettings> {
    let Some(spec) = &main.process else {
        if let Some(route) = routes.iter().find(|r| r.process.is_some()) {
            diags.file(
                file,
                format!(
                    "route `{}` is a process endpoint, but causeway.yaml has no `process:` block",
                    route.name
                ),
            );
        }
        return None;
    };
    if !upstreams.contains_key(&spec.erp.value) {
        diags.at(file, &spec.erp, format!("process.erp: no upstream `{}`", spec.erp.value));
    }
    let adapter = match (spec.adapter, &spec.company, &spec.tryton) {
        (spec::AdapterKind::BusinessCentral, Some(company), _) => {
            Some(AdapterSettings::BusinessCentral { company: company.clone() })
        }
        (spec::AdapterKind::Tryton, _, Some(t)) => match env::expand(&t.password.value, env) {
            Ok(password) => Some(AdapterSettings::Tryton(TrytonSettings {
                database: t.database.clone(),
                login: t.login.clone(),
                password,
                company: t.company,
            })),
            Err(e) => {
                diags.at(file, &t.password, format!("process.tryton.password: {e}"));
                None
            }
        },
        (spec::AdapterKind::BusinessCentral, None, _) => {
            diags.at(
                file,
                &spec.erp,
                "process: the business-central adapter needs `company` (the company id)",
            );
            None
        }
        (spec::AdapterKind::Tryton, _, None) => {
            diags.at(
                file,
                &spec.erp,
                "process: the tryton adapter needs a `tryton:` block (database, login, password)",
            );
            None
        }
    };
    let needed: Vec<&str> = match spec.adapter {
        spec::AdapterKind::BusinessCentral => {
            PROCESS_POLICIES.iter().chain(BC_ADAPTER_POLICIES).copied().collect()
        }
        spec::AdapterKind::Tryton => PROCESS_POLICIES.to_vec(),
    };
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|name| !policies.get(*name).is_some_and(|p| matches!(p.as_ref(), Policy::Mediation(_))))
        .collect();
    if !missing.is_empty() {
        diags.at(
            file,
            &spec.erp,
            format!("process: the mediation policies {} are missing from policies/", missing.join(", ")),
        );
    }
    if rules.is_none() {
        diags.at(file, &spec.erp, "process: policies/process/ (the quote rules) is missing");
    }
    let d = &spec.delivery;
    if d.max_attempts == 0 || d.backoff_initial_ms == 0 || d.backoff_max_ms < d.backoff_initial_ms {
        diags.at(
            file,
            &spec.erp,
            "process.delivery: max_attempts and backoff_initial_ms must be at least 1, backoff_max_ms at least backoff_initial_ms",
        );
    }
    if spec.idempotency_key_ttl_hours == 0 {
        diags.at(file, &spec.erp, "process.idempotency_key_ttl_hours must be at least 1");
    }
    if spec.max_lines == 0 || spec.max_lines > 2000 {
        diags.at(file, &spec.erp, "process.max_lines must be between 1 and 2000");
    }
    let ms = Duration::from_millis;
    Some(ProcessSettings {
        erp: spec.erp.value.clone(),
        adapter: adapter?,
        store_path: store_path.to_path_buf(),
        synchronous,
        key_ttl: Duration::from_secs(spec.idempotency_key_ttl_hours.saturating_mul(3600)),
        max_lines: spec.max_lines,
        max_attempts: d.max_attempts,
        backoff_initial: ms(d.backoff_initial_ms),
        backoff_max: ms(d.backoff_max_ms),
        inline_wait: ms(d.inline_wait_ms),
        lease: ms(d.lease_ms.max(1000)),
    })
}

fn parse_file<T: DeserializeOwned>(path: &Path, diags: &mut Diagnostics) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            diags.file(path, format!("cannot read: {e}"));
            return None;
        }
    };
    let options = serde_saphyr::options! { with_snippet: false };
    match serde_saphyr::from_str_with_options::<T>(&text, options) {
        Ok(v) => Some(v),
        Err(e) => {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            // The message may repeat the position; keep only its first line.
            let message = e.to_string();
            let mut message = message.lines().next().unwrap_or("invalid YAML").to_string();
            if let Some(at) = message.rfind(" at line ") {
                message.truncate(at);
            }
            diags.0.push(Diagnostic { file: path.to_path_buf(), line, column, message });
            None
        }
    }
}

/// `*.yaml` / `*.yml` files of a directory in name order; a missing directory is empty.
fn yaml_files(dir: &Path, diags: &mut Diagnostics) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            diags.file(dir, format!("cannot read directory: {e}"));
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Editors' temporary and hidden files are not configuration.
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
        })
        .collect();
    files.sort();
    files
}

fn check_addr(file: &Path, addr: &Spanned<String>, diags: &mut Diagnostics) {
    if addr.value.parse::<std::net::SocketAddr>().is_err() {
        diags.at(file, addr, format!("`{}` is not an address such as 127.0.0.1:8080", addr.value));
    }
}

fn compile_upstreams(
    file: &Path,
    main: &MainSpec,
    env: &dyn Fn(&str) -> Option<String>,
    state: &SharedState,
    diags: &mut Diagnostics,
) -> BTreeMap<String, Arc<Upstream>> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &main.upstreams {
        let spec = &spanned.value;
        match compile_upstream(name, spec, env, state) {
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
    };
    Ok(UpstreamBudget {
        budget: state.budget(upstream, params),
        classes,
        default_class,
        overload_signals: spec.overload_signals.iter().map(|s| (s.status, s.body_contains.clone())).collect(),
    })
}

fn compile_upstream<'a>(
    name: &str,
    spec: &'a UpstreamSpec,
    env: &dyn Fn(&str) -> Option<String>,
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
    let address = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| (None, format!("cannot resolve host `{host}`")))?;
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| host.clone());
    let credential = match &spec.credentials {
        None => None,
        Some(c) => Some(compile_credential(c, env)?),
    };
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
        sni: host,
        host_header: HeaderValue::from_str(&authority).map_err(|_| (None, "invalid host".to_string()))?,
        connect_timeout: ms(spec.connect_timeout_ms),
        read_timeout: ms(spec.read_timeout_ms),
        write_timeout: ms(spec.write_timeout_ms),
        idle_timeout: Duration::from_secs(spec.pool_idle_seconds),
        credential,
        base_url: format!("{}://{authority}", if tls { "https" } else { "http" }),
        client: std::sync::OnceLock::new(),
    })
}

fn compile_credential<'a>(
    spec: &'a CredentialSpec,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(HeaderName, HeaderValue), SpannedErr<'a>> {
    let expand = |s: &'a Spanned<String>| {
        env::expand(&s.value, env).map_err(|e| (Some(s), format!("credentials: {e}")))
    };
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

/// `policies/process/`: one file a concern, all of them required once the directory exists.
fn load_process_rules(dir: &Path, diags: &mut Diagnostics) -> Option<crate::process::rules::Rules> {
    use crate::process::rules::{Rules, FILES};
    if !dir.is_dir() {
        return None;
    }
    for file in yaml_files(dir, diags) {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !FILES.contains(&name) {
            diags.file(&file, format!("not a process rules file; expected one of {}", FILES.join(", ")));
        }
    }
    let customer = parse_file(&dir.join("customer.yaml"), diags);
    let products = parse_file(&dir.join("products.yaml"), diags);
    let tax = parse_file::<crate::process::rules::TaxRules>(&dir.join("tax.yaml"), diags);
    let contract = parse_file::<crate::process::rules::ContractRules>(&dir.join("contract.yaml"), diags);
    let pricing = parse_file(&dir.join("pricing.yaml"), diags);
    let (Some(customer), Some(products), Some(tax), Some(contract), Some(pricing)) =
        (customer, products, tax, contract, pricing)
    else {
        return None;
    };
    for region in contract.currencies.keys().chain(contract.payment_terms.keys()) {
        if !tax.regions.contains_key(region) {
            diags.file(
                &dir.join("contract.yaml"),
                format!("region `{region}` has no tax treatment in tax.yaml"),
            );
        }
    }
    Some(Rules { customer, products, tax, contract, pricing })
}

fn load_policies(
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    state: &SharedState,
    diags: &mut Diagnostics,
) -> HashMap<String, Arc<Policy>> {
    let mut out: HashMap<String, Arc<Policy>> = HashMap::new();
    for file in yaml_files(&dir.join("policies"), diags) {
        let Some(parsed) = parse_file::<PoliciesFile>(&file, diags) else { continue };
        for spanned in parsed.policies {
            let spec = &spanned.value;
            let name = spec.name().to_string();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                diags.at(&file, &spanned, "policy name must be letters, digits, `-`, `_` or `.`");
                continue;
            }
            if out.contains_key(&name) {
                diags.at(&file, &spanned, format!("policy `{name}` is defined twice"));
                continue;
            }
            match policies::compile(spec, dir, env, state) {
                Ok(p) => {
                    out.insert(name, Arc::new(p));
                }
                Err(e) => diags.at(&file, &spanned, format!("policy `{name}`: {e}")),
            }
        }
    }
    out
}

fn load_routes(
    dir: &Path,
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
        let Some(parsed) = parse_file::<RoutesFile>(&file, diags) else { continue };
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
            if !spec.scopes.is_empty() && !authenticates {
                diags.at(
                    &file,
                    &spec.name,
                    format!("route `{name}` requires scopes but names no jwt or api_key policy"),
                );
            }
            // Secure by default: the upstream's credential is never lent to an anonymous caller
            // or to a caller without a scope for writing, unless the route says so.
            let credentialed = upstream.as_ref().is_some_and(|u| u.credential.is_some());
            if credentialed && !spec.public && !authenticates {
                diags.at(
                    &file,
                    &spec.name,
                    format!(
                        "route `{name}` sends requests to upstream `{}` with its credential but authenticates no caller; name a jwt or api_key policy, or declare `public: true` if anonymous callers may use that credential",
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
                crate::proxy::hygiene::UPSTREAM_SESSION_HEADERS,
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
            let strip_response: Vec<HeaderName> = crate::proxy::hygiene::UPSTREAM_SESSION_HEADERS
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
                policies: route_policies,
                scopes: spec.scopes.clone(),
                erp_class,
                process: spec.process,
                public: spec.public,
                strip_request,
                strip_response,
                metrics: crate::observe::metrics::RouteMetrics::new(&name),
                name,
            }));
        }
    }
    out
}
