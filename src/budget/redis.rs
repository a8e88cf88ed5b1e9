//! The Redis link shared by everything replicas keep in Redis (`cluster.redis`): the ERP budgets
//! ([`super::shared::SharedBudget`]) and the consumer rate limits (the `policy` module's shared
//! limiter). One connection for the process, on a runtime of its own; when Redis does not answer
//! within `timeout_ms`, each user switches to its configured fallback ([`LimitFallback`],
//! [`BudgetFallback`]) and [`ModeWatch`] logs and counts each switch.

use crate::observe::metrics::Metrics;
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How a replica reaches Redis (`cluster.redis` compiled).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    pub lease: Duration,
    pub timeout: Duration,
    pub replicas: u32,
}

/// One connection to Redis for the whole process, driven by a runtime of its own (the
/// gateway's services each run their own runtimes; this one outlives none of them), and whether
/// Redis answered last time.
pub struct RedisLink {
    pub(super) settings: RedisSettings,
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    reachable: AtomicBool,
    probing: AtomicBool,
    /// When Redis last came back (or the link was made).
    back_since: Mutex<Instant>,
    /// This replica's name on its permits.
    pub(super) replica: String,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisLink({})", self.settings.url)
    }
}

pub(super) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("causeway-redis")
            .enable_all()
            .build()
            .expect("a runtime for the Redis connection")
    })
}

#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct SharedError(String);

impl RedisLink {
    /// Parses the URL only: nothing connects until the first check (`causeway check` stays offline).
    pub fn new(settings: RedisSettings) -> Result<Arc<RedisLink>, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("cluster.redis.url `{}`: {e}", settings.url))?;
        let replica = format!("{}/{}", std::process::id(), uuid::Uuid::now_v7().simple());
        // A link that never lost Redis shares from the start.
        let long_ago = Instant::now().checked_sub(settings.lease).unwrap_or_else(Instant::now);
        Ok(Arc::new(RedisLink {
            settings,
            client,
            conn: OnceLock::new(),
            reachable: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            back_since: Mutex::new(long_ago),
            replica,
        }))
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// How long Redis has answered since it last came back.
    pub fn back_for(&self) -> Duration {
        self.back_since.lock().elapsed()
    }

    pub(super) fn key(&self, parts: &[&str]) -> String {
        let mut key = self.settings.key_prefix.clone();
        for p in parts {
            key.push(':');
            key.push_str(p);
        }
        key
    }

    fn connection(&self) -> Result<ConnectionManager, SharedError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let _in_runtime = runtime().enter();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| SharedError(e.to_string()))?;
        Ok(self.conn.get_or_init(|| manager).clone())
    }

    /// Run `call` on the Redis runtime within the timeout; a failure marks Redis unreachable
    /// and starts probing for its return.
    pub async fn run<T, F, Fut>(self: &Arc<Self>, call: F) -> Result<T, SharedError>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let result = match self.connection() {
            Ok(conn) => {
                let task = runtime().spawn(call(conn));
                match tokio::time::timeout(self.settings.timeout, task).await {
                    Ok(Ok(Ok(v))) => Ok(v),
                    Ok(Ok(Err(e))) => Err(SharedError(e.to_string())),
                    Ok(Err(e)) => Err(SharedError(e.to_string())),
                    Err(_) => Err(SharedError(format!("no answer within {:?}", self.settings.timeout))),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.lost(e);
        }
        result
    }

    /// Whether Redis answers now (readiness); a failure marks it unreachable like any call.
    pub async fn ping(self: &Arc<Self>) -> Result<(), SharedError> {
        self.run(|mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(|_| ())
    }

    /// Fire and forget (a release, a renewal): errors only mark Redis unreachable.
    pub fn spawn<F, Fut>(self: &Arc<Self>, call: F)
    where
        F: FnOnce(ConnectionManager) -> Fut + Send + 'static,
        Fut: Future<Output = redis::RedisResult<()>> + Send + 'static,
    {
        let link = self.clone();
        runtime().spawn(async move {
            let _ = link.run(call).await;
        });
    }

    fn lost(self: &Arc<Self>, error: &SharedError) {
        if self.reachable.swap(false, Ordering::AcqRel) {
            tracing::warn!(%error, url = %self.settings.url, "Redis is unreachable: shared budgets and limits fall back to their configured modes");
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.clone();
        runtime().spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(mut conn) = link.connection() else { continue };
                let ping = tokio::time::timeout(
                    link.settings.timeout,
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await;
                if matches!(ping, Ok(Ok(_))) {
                    *link.back_since.lock() = Instant::now();
                    link.probing.store(false, Ordering::Release);
                    link.reachable.store(true, Ordering::Release);
                    tracing::info!(url = %link.settings.url, "Redis answers again: shared budgets and limits are shared again");
                    return;
                }
            }
        });
    }
}

/// What a shared consumer rate limit does while Redis is unreachable.
#[derive(Debug, serde::Deserialize, serde::Serialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitFallback {
    /// Each replica allows its share of the quota (quota ÷ replicas).
    #[default]
    LocalShare,
    /// No limit until Redis returns.
    Open,
    /// Refuse (429) until Redis returns.
    Closed,
}

/// What a shared ERP budget does while Redis is unreachable.
#[derive(Debug, serde::Deserialize, serde::Serialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BudgetFallback {
    /// Each replica keeps to its share of the budget (budget ÷ replicas) until Redis returns.
    #[default]
    LocalShare,
    /// Refuse ERP requests (503) until Redis returns.
    Closed,
}

/// Whether a shared component works through Redis or its fallback; logs and counts each switch.
pub struct ModeWatch {
    component: String,
    fallback: &'static str,
    in_fallback: AtomicBool,
}

impl ModeWatch {
    pub fn new(component: String, fallback: &'static str) -> ModeWatch {
        Metrics::global().shared_state_mode.with_label_values(&[&component, fallback]).set(0);
        ModeWatch { component, fallback, in_fallback: AtomicBool::new(false) }
    }

    /// Record the mode now in force; `true` when it just changed.
    pub fn set(&self, fallback: bool) -> bool {
        if self.in_fallback.swap(fallback, Ordering::AcqRel) == fallback {
            return false;
        }
        let m = Metrics::global();
        let to = if fallback { self.fallback } else { "shared" };
        m.shared_state_mode.with_label_values(&[&self.component, self.fallback]).set(fallback as i64);
        m.shared_state_switches.with_label_values(&[&self.component, to]).inc();
        if fallback {
            tracing::warn!(component = %self.component, mode = to, "shared state unavailable: fallback in force");
        } else {
            tracing::info!(component = %self.component, "shared state back: fallback ended");
        }
        true
    }

    pub fn in_fallback(&self) -> bool {
        self.in_fallback.load(Ordering::Acquire)
    }
}
