//! Configuration: files → typed specs (`spec`) → validated, compiled runtime objects.
//!
//! `load` reads `causeway.yaml`, `policies/*.yaml` and `routes/*.yaml` from one directory,
//! reports *every* problem with file and line, and otherwise returns an immutable [`Config`]
//! that the proxy runs on. `causeway check` and `causeway serve` run the same function.

mod cluster;
pub mod diff;
pub mod edge_policies;
mod env;
pub mod events;
mod interpolate;
pub mod lifecycle;
pub mod listen;
pub mod policies;
pub mod print;
mod process;
mod router;
mod routes;
pub mod rules;
pub mod spec;
mod traces;
mod upstream;
pub mod upstream_tls;

pub use cluster::{ClusterSettings, StoreSettings};
pub use env::Env;
pub use listen::{Listen, TlsListener};
use process::{compile_process, load_process_rules};
pub use process::{
    AdapterSettings, ChangeSettings, NotificationSettings, ProcessSettings, TrytonSettings,
    BC_ADAPTER_POLICIES, PROCESS_POLICIES,
};
use routes::load_routes;
pub use routes::CompiledRoute;
use upstream::compile_upstreams;
pub use upstream::{Upstream, UpstreamBudget};

use crate::budget::redis::RedisLink;
use crate::budget::shared::SharedBudget;
use crate::budget::throttle::Budget;
use crate::budget::{BudgetParams, ErpBudget};
use crate::policy::auth_failures::FailureLimiter;
use crate::policy::jwks::RemoteJwks;
use crate::policy::ratelimit::{Limiter, TierLimiter};
use crate::policy::shared_limit::SharedLimiter;
use crate::policy::Policy;
pub use router::{RouteMatch, Router};
use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;
use spec::*;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const MAIN_FILE: &str = "causeway.yaml";
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
    budgets: parking_lot::Mutex<HashMap<String, Arc<dyn ErpBudget>>>,
    limiters: parking_lot::Mutex<HashMap<(String, String), Arc<TierLimiter>>>,
    shared_limiters: parking_lot::Mutex<HashMap<(String, String), Arc<SharedLimiter>>>,
    jwks: parking_lot::Mutex<HashMap<String, Arc<RemoteJwks>>>,
    auth_failures: parking_lot::Mutex<Option<Arc<FailureLimiter>>>,
    /// The Redis link of `cluster.redis`, when replicas share budgets and limits.
    redis: parking_lot::Mutex<Option<Arc<RedisLink>>>,
    /// TLS listeners by address: their certificates change in place on reload.
    tls: parking_lot::Mutex<HashMap<String, crate::edge::tls::ListenerTls>>,
}

impl SharedState {
    /// The TLS state of a listener, built the first time it is asked for (at start).
    pub fn listener_tls(&self, listener: &TlsListener) -> Result<crate::edge::tls::ListenerTls, String> {
        let mut all = self.tls.lock();
        if let Some(existing) = all.get(&listener.address) {
            return Ok(existing.clone());
        }
        let created =
            crate::edge::tls::ListenerTls::new(listener.certificates.clone(), listener.client_auth.clone())?;
        all.insert(listener.address.clone(), created.clone());
        Ok(created)
    }

    /// A reloaded configuration's certificates, for the next handshakes of running listeners.
    pub fn apply_tls(&self, listen: &Listen) {
        let all = self.tls.lock();
        for listener in &listen.tls {
            match all.get(&listener.address) {
                Some(running) => running.update(listener.certificates.clone(), listener.client_auth.as_ref()),
                None => {
                    tracing::warn!(address = %listener.address, "a new TLS listener takes a restart or graceful upgrade")
                }
            }
        }
    }

    /// The budget of `upstream`, with `params` applied (a reload changes limits in place): in
    /// memory for one node, in Redis when `cluster.redis` is set (chosen when first built; a
    /// change of `cluster:` takes a restart).
    pub fn budget(
        &self,
        upstream: &str,
        params: BudgetParams,
        fallback: BudgetFallback,
    ) -> Arc<dyn ErpBudget> {
        let mut budgets = self.budgets.lock();
        if let Some(b) = budgets.get(upstream) {
            if b.params() != params {
                b.set_params(params);
            }
            return b.clone();
        }
        let b: Arc<dyn ErpBudget> = match self.redis.lock().clone() {
            Some(link) => SharedBudget::new(upstream, params, link, fallback),
            None => Budget::new(upstream, params),
        };
        budgets.insert(upstream.to_string(), b.clone());
        b
    }

    /// The limiter of a rate-limit tier: in memory, or in Redis with `cluster.redis`. Its
    /// state carries over a reload that keeps its quota.
    pub fn limiter(
        &self,
        policy: &str,
        tier: &str,
        (requests, window, burst): (u32, Duration, u32),
        fallback: LimitFallback,
    ) -> Result<Limiter, String> {
        let key = (policy.to_string(), tier.to_string());
        if let Some(link) = self.redis.lock().clone() {
            let mut shared = self.shared_limiters.lock();
            if let Some(l) = shared.get(&key).filter(|l| l.same_quota(requests, window, burst, fallback)) {
                return Ok(Limiter::Shared(l.clone()));
            }
            let l = Arc::new(SharedLimiter::new(policy, tier, (requests, window, burst), link, fallback)?);
            shared.insert(key, l.clone());
            return Ok(Limiter::Shared(l));
        }
        let mut limiters = self.limiters.lock();
        if let Some(l) = limiters.get(&key).filter(|l| l.same_quota(requests, window, burst)) {
            return Ok(Limiter::Local(l.clone()));
        }
        let l = Arc::new(TierLimiter::new(tier, requests, window, burst)?);
        limiters.insert(key, l.clone());
        Ok(Limiter::Local(l))
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
    pub process_rules: Option<Arc<rules::Rules>>,
    pub sandbox: Option<SandboxSettings>,
    /// The process APIs' settings, when `causeway.yaml` has a `process:` block.
    pub process: Option<ProcessSettings>,
    /// Event subscribers (`events:`), when declared.
    pub events: Option<events::EventsSettings>,
    /// OTLP trace export (`traces:`); read at start, a change takes a restart.
    pub traces: Option<crate::observe::traces::TraceSettings>,
    /// Replicas and how they share state (`cluster:`; one node without it).
    pub cluster: ClusterSettings,
    /// Refuses client addresses that keep failing authentication (`None`: off).
    pub auth_failures: Option<Arc<FailureLimiter>>,
    /// What the load found worth saying without refusing the configuration.
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub listen: String,
    pub token: Option<String>,
    pub limits: SandboxLimits,
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
    let env = Env::new(env, false);
    let (loaded, warnings) = settle_unset(&env, load_in(dir, &env, state));
    loaded.map(|config| Config { warnings, ..config })
}

/// Report each unset variable where the files reference it (an error, or offline a warning),
/// instead of what failed only because its value was missing.
fn settle_unset(
    env: &Env,
    loaded: Result<Config, Diagnostics>,
) -> (Result<Config, Diagnostics>, Vec<Diagnostic>) {
    let mut warnings = env.warnings();
    let unset = env.unset();
    if unset.is_empty() {
        return (loaded, warnings);
    }
    let mut unset_lines = std::collections::HashSet::new();
    let mut reported = Vec::new();
    for name in &unset {
        for (file, line, column) in env.references(name) {
            unset_lines.insert((file.clone(), line));
            let message = if env.offline() {
                format!("warning: environment variable {name} is not set; what depends on it is checked when it is")
            } else {
                env::unset_message(name)
            };
            reported.push(Diagnostic { file, line, column, message });
        }
    }
    let others = match loaded {
        Ok(config) if env.offline() => {
            warnings.extend(reported);
            return (Ok(config), warnings);
        }
        Ok(_) => Vec::new(),
        Err(diags) => diags.0,
    };
    let (dependent, independent): (Vec<_>, Vec<_>) =
        others.into_iter().partition(|d| unset_lines.contains(&(d.file.clone(), d.line)));
    if env.offline() {
        warnings.extend(reported);
        warnings.extend(dependent.into_iter().map(|d| Diagnostic {
            message: format!("warning: not checked without its environment variable: {}", d.message),
            ..d
        }));
        return (Err(Diagnostics(independent)), warnings);
    }
    let mut errors = reported;
    errors.extend(independent);
    errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    (Err(Diagnostics(errors)), warnings)
}

/// What `causeway check --offline` found: the configuration is valid (`errors` is empty) as far
/// as it can be told without the production environment: no DNS, and unset variables (with the
/// lines that depend on them) reported as `warnings`.
pub struct OfflineCheck {
    pub errors: Diagnostics,
    pub warnings: Vec<Diagnostic>,
    /// Routes and upstreams, when the configuration compiled.
    pub summary: Option<(usize, usize)>,
}

pub fn check_offline(dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> OfflineCheck {
    let env = Env::new(env, true);
    let (loaded, mut warnings) = settle_unset(&env, load_in(dir, &env, &SharedState::default()));
    let (errors, summary) = match loaded {
        Ok(config) => (Diagnostics::default(), Some((config.router.routes().len(), config.upstreams.len()))),
        Err(diags) => (diags, None),
    };
    warnings.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    warnings.dedup_by(|a, b| a.file == b.file && a.line == b.line && a.message == b.message);
    OfflineCheck { errors, warnings, summary }
}

fn load_in(dir: &Path, env_vars: &Env, state: &SharedState) -> Result<Config, Diagnostics> {
    let env = &|name: &str| env_vars.get(name);
    let mut diags = Diagnostics::default();
    let main_path = dir.join(MAIN_FILE);
    let main: Option<MainSpec> = parse_file(&main_path, env_vars, &mut diags);
    let current_link = state.redis.lock().clone();
    let cluster =
        main.as_ref().and_then(|m| cluster::compile_cluster(&main_path, m, current_link, &mut diags));
    if let Some(c) = &cluster {
        let mut link = state.redis.lock();
        if link.is_none() {
            *link = c.redis.clone();
        }
    }
    let store = main.as_ref().and_then(|m| cluster::compile_store(&main_path, dir, m, &mut diags));

    let upstreams = main
        .as_ref()
        .map(|m| compile_upstreams(&main_path, dir, m, env_vars, state, &mut diags))
        .unwrap_or_default();

    let policies = load_policies(dir, env_vars, state, &mut diags);
    let process_rules = load_process_rules(&dir.join("policies").join("process"), env_vars, &mut diags);
    // Routes are checked against every *declared* upstream, so one bad upstream is one error.
    let declared: Option<Vec<String>> = main.as_ref().map(|m| m.upstreams.keys().cloned().collect());
    let routes =
        load_routes(&dir.join("routes"), env_vars, &upstreams, &policies, declared.as_deref(), &mut diags);

    let sandbox = main.as_ref().and_then(|m| m.sandbox.as_ref()).filter(|s| s.enabled).and_then(|s| {
        if !cfg!(feature = "sandbox") {
            diags.at(
                &main_path,
                &s.listen,
                "`sandbox:` needs a build with the `sandbox` feature (the default); this one has no ERP sandbox: remove the block (or set `enabled: false`) and point the upstream at the ERP".to_string(),
            );
            return None;
        }
        check_addr(&main_path, &s.listen, &mut diags);
        let token = s.token.as_ref().map(|t| t.value.clone());
        Some(SandboxSettings { listen: s.listen.value.clone(), token, limits: s.limits.clone() })
    });

    let Some(main) = main else { return Err(diags) };
    let listen = listen::compile_listen(&main_path, dir, &main.listen, env_vars, &mut diags);
    if main.threads == Some(0) {
        diags.file(&main_path, "threads must be at least 1");
    }
    if !diags.0.is_empty() {
        return Err(diags);
    }
    let (Some(store), Some(mut cluster), Some(listen)) = (store, cluster, listen) else { return Err(diags) };
    cluster.redis_required = cluster.redis.is_some() && fails_closed_without_redis(&main, &policies);
    check_mtls_has_a_listener(&main_path, &main, &routes, &mut diags);
    let process = compile_process(
        &main_path,
        env,
        &main,
        &store,
        &upstreams,
        &policies,
        &process_rules,
        &routes,
        &mut diags,
    );
    let events = main
        .events
        .as_ref()
        .and_then(|spec| events::compile_events(&main_path, spec, main.process.is_some(), env, &mut diags));
    let traces =
        main.traces.as_ref().and_then(|spec| traces::compile_traces(&main_path, spec, env, &mut diags));
    if !diags.0.is_empty() {
        return Err(diags);
    }
    let threads = main.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(Config {
        dir: dir.to_path_buf(),
        listen,
        warnings: Vec::new(),
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
        events,
        traces,
        cluster,
        auth_failures: state.auth_failures(
            main.auth_failures.max_failures,
            Duration::from_secs(main.auth_failures.window_seconds),
        ),
    })
}

fn parse_file<T: DeserializeOwned>(path: &Path, env: &Env, diags: &mut Diagnostics) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            diags.file(path, format!("cannot read: {e}"));
            return None;
        }
    };
    env.read(path, &text);
    // An unset variable stands in as a placeholder, so the rest of the file is still checked;
    // `settle_unset` reports it where it is referenced. The handler outlives this call inside
    // `Vars`: it records into a list of its own, which the Env takes over below.
    let unset_names = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let recorded = unset_names.clone();
    let vars = std::rc::Rc::new(interpolate::Vars {
        values: env::referenced_names(&text).into_iter().map(|n| (n.clone(), env.lookup(&n))).collect(),
        unset: Box::new(move |name: &str| {
            recorded.borrow_mut().push(name.to_string());
            Some(env::placeholder(name))
        }),
        failed: std::cell::RefCell::new(None),
    });
    // `.nan` and `.inf` reach numeric settings as text, which their checks refuse by name.
    let options = serde_saphyr::options! {
        with_snippet: false,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
    };
    let parsed = interpolate::from_str::<T>(&text, vars.clone(), options);
    for name in unset_names.borrow().iter() {
        env.record_unset(name);
    }
    match parsed {
        Ok(v) => Some(v),
        Err(e) => {
            // An unset variable is found where the file references it.
            let referenced =
                vars.failed.borrow().as_deref().and_then(|n| env::find_references(&text, n).first().copied());
            let (line, column) =
                e.location().map_or(referenced.unwrap_or((0, 0)), |l| (l.line(), l.column()));
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

/// Whether a budget or a rate limit refuses requests while Redis is away.
fn fails_closed_without_redis(main: &MainSpec, policies: &HashMap<String, Arc<Policy>>) -> bool {
    use crate::policy::ratelimit::Limiter;
    let budget = main
        .upstreams
        .values()
        .any(|u| u.value.budget.as_ref().is_some_and(|b| b.when_redis_unavailable == BudgetFallback::Closed));
    let limit = policies.values().any(|p| match p.as_ref() {
        Policy::RateLimit(r) => r.tiers.values().any(|l| matches!(l, Limiter::Shared(s) if s.fails_closed())),
        _ => false,
    });
    budget || limit
}

/// A route that authenticates by client certificate needs a TLS listener that asks for one.
fn check_mtls_has_a_listener(
    file: &Path,
    main: &MainSpec,
    routes: &[Arc<CompiledRoute>],
    diags: &mut Diagnostics,
) {
    if main.listen.tls.iter().any(|t| t.value.client_certificates.is_some()) {
        return;
    }
    let certified = routes.iter().find(|r| r.policies.iter().any(|p| matches!(p.as_ref(), Policy::Mtls(_))));
    if let Some(route) = certified {
        diags.at(
            file,
            &main.listen.admin,
            format!(
                "route `{}` authenticates by client certificate (mtls), but no listen.tls listener asks for one; add `client_certificates: {{mode: optional, ca: …}}` to a TLS listener",
                route.name
            ),
        );
    }
}

fn check_addr(file: &Path, addr: &Spanned<String>, diags: &mut Diagnostics) {
    if addr.value.parse::<std::net::SocketAddr>().is_err() {
        diags.at(file, addr, format!("`{}` is not an address such as 127.0.0.1:8080", addr.value));
    }
}

fn load_policies(
    dir: &Path,
    env_vars: &Env,
    state: &SharedState,
    diags: &mut Diagnostics,
) -> HashMap<String, Arc<Policy>> {
    let mut out: HashMap<String, Arc<Policy>> = HashMap::new();
    for file in yaml_files(&dir.join("policies"), diags) {
        let Some(parsed) = parse_file::<PoliciesFile>(&file, env_vars, diags) else { continue };
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
            match policies::compile(spec, dir, state) {
                Ok(p) => {
                    out.insert(name, Arc::new(p));
                }
                Err(e) => diags.at(&file, &spanned, format!("policy `{name}`: {e}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod load_tests;
