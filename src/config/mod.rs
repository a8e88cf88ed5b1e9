//! Configuration: files → typed specs (`spec`) → validated, compiled runtime objects.
//!
//! `load` reads `causeway.yaml`, `policies/*.yaml` and `routes/*.yaml` from one directory,
//! reports *every* problem with file and line, and otherwise returns an immutable [`Config`]
//! that the proxy runs on. `causeway check` and `causeway serve` run the same function.

mod cluster;
mod env;
pub mod events;
pub mod policies;
mod process;
mod router;
mod routes;
pub mod rules;
pub mod spec;
mod traces;
mod upstream;

pub use cluster::{ClusterSettings, StoreSettings};
use process::{compile_process, load_process_rules};
pub use process::{
    AdapterSettings, ChangeSettings, NotificationSettings, ProcessSettings, TrytonSettings,
    BC_ADAPTER_POLICIES, PROCESS_POLICIES,
};
use routes::load_routes;
pub use routes::CompiledRoute;
use upstream::compile_upstreams;
pub use upstream::{Upstream, UpstreamBudget};

use crate::policy::auth_failures::FailureLimiter;
use crate::policy::budget::{BudgetParams, ErpBudget};
use crate::policy::jwks::RemoteJwks;
use crate::policy::ratelimit::{Limiter, TierLimiter};
use crate::policy::shared::{RedisLink, SharedBudget};
use crate::policy::shared_limit::SharedLimiter;
use crate::policy::throttle::Budget;
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
}

impl SharedState {
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
}

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
    let mut diags = Diagnostics::default();
    let main_path = dir.join(MAIN_FILE);
    let main: Option<MainSpec> = parse_file(&main_path, &mut diags);
    let current_link = state.redis.lock().clone();
    let cluster =
        main.as_ref().and_then(|m| cluster::compile_cluster(&main_path, m, env, current_link, &mut diags));
    if let Some(c) = &cluster {
        let mut link = state.redis.lock();
        if link.is_none() {
            *link = c.redis.clone();
        }
    }
    let store = main.as_ref().and_then(|m| cluster::compile_store(&main_path, dir, m, env, &mut diags));

    let upstreams =
        main.as_ref().map(|m| compile_upstreams(&main_path, m, env, state, &mut diags)).unwrap_or_default();

    let policies = load_policies(dir, env, state, &mut diags);
    let process_rules = load_process_rules(&dir.join("policies").join("process"), &mut diags);
    // Routes are checked against every *declared* upstream, so one bad upstream is one error.
    let declared: Option<Vec<String>> = main.as_ref().map(|m| m.upstreams.keys().cloned().collect());
    let routes = load_routes(&dir.join("routes"), &upstreams, &policies, declared.as_deref(), &mut diags);

    let sandbox = main.as_ref().and_then(|m| m.sandbox.as_ref()).and_then(|s| {
        if !cfg!(feature = "sandbox") {
            diags.at(
                &main_path,
                &s.listen,
                "`sandbox:` needs a build with the `sandbox` feature (the default); this one has no ERP sandbox: remove the block and point the upstream at the ERP".to_string(),
            );
            return None;
        }
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
    let (Some(store), Some(cluster)) = (store, cluster) else { return Err(diags) };
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
        events,
        traces,
        cluster,
        auth_failures: state.auth_failures(
            main.auth_failures.max_failures,
            Duration::from_secs(main.auth_failures.window_seconds),
        ),
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

#[cfg(test)]
mod load_tests;
