//! The ERP budget port: what every path that reaches an ERP asks of its budget (a permit,
//! released on drop; the outcome of the ERP's answer), and the vocabulary shared by its
//! implementations: the in-memory [`throttle::Budget`] and the shared one in Redis for replicas
//! ([`shared::SharedBudget`], whose Redis link the consumer quotas use too). Also the one place
//! that judges an ERP answer ([`judge`]). Not a route policy: every path that reaches the ERP
//! (proxied, mediated, the process APIs' adapters) takes its permits here.

pub mod redis;
pub mod shared;
pub mod throttle;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The budget of one ERP upstream, shared by every route, consumer and in-process caller.
pub trait ErpBudget: Send + Sync + std::fmt::Debug {
    fn upstream(&self) -> &str;
    fn params(&self) -> BudgetParams;
    /// New limits apply from now on; what is in flight and the window carry over (reload).
    fn set_params(&self, params: BudgetParams);
    /// Take a permit for `class`, waiting up to its deadline. `consumer` is who the request is
    /// for (its share is capped when `max_share` < 1); `None` for traffic of no consumer.
    fn acquire<'a>(&'a self, class: &'a Class, consumer: Option<&'a Arc<str>>) -> PermitFuture<'a>;
    /// How the ERP answered a request made under a permit. Returns the pause an overload caused
    /// (the ERP's `Retry-After` or a backoff, capped at `max_pause`), zero otherwise.
    fn report(&self, outcome: Outcome) -> Duration;
    /// Give back what a permit held (called by [`Permit`]'s drop).
    fn release(&self, lease: Lease);
    /// End an overload pause now (an operator's decision); returns how much of it was left.
    fn resume(&self) -> Duration;
    /// What `GET /admin/budgets` shows.
    fn snapshot(&self) -> Snapshot;
    /// Refresh the pause-left gauge (called when metrics are scraped).
    fn publish_pause(&self);
    fn in_flight(&self) -> u32;
}

pub type PermitFuture<'a> = Pin<Box<dyn Future<Output = Result<Permit, Refusal>> + Send + 'a>>;

/// What a permit holds of its budget, given back on release.
#[derive(Debug, Default)]
pub struct Lease {
    /// The circuit breaker's half-open probe.
    pub probe: bool,
    /// The consumer whose share the permit counts toward.
    pub consumer: Option<Arc<str>>,
    /// The permit's name in a budget shared by replicas (`None`: a local permit).
    pub shared: Option<Arc<str>>,
}

/// A slot in a budget; dropping it releases the slot, however the request ends.
pub struct Permit {
    budget: Arc<dyn ErpBudget>,
    lease: Option<Lease>,
}

impl Permit {
    pub fn new(budget: Arc<dyn ErpBudget>, lease: Lease) -> Permit {
        Permit { budget, lease: Some(lease) }
    }

    pub fn budget(&self) -> &Arc<dyn ErpBudget> {
        &self.budget
    }

    /// What the permit holds, without giving it back: a budget layered on another (the shared
    /// one on its local stage) re-issues it as its own.
    pub fn into_lease(mut self) -> Lease {
        self.lease.take().unwrap_or_default()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.budget.release(lease);
        }
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permit({})", self.budget.upstream())
    }
}

/// A priority class as compiled from the budget spec.
#[derive(Debug, Clone)]
pub struct Class {
    pub name: Arc<str>,
    /// Lower runs first.
    pub priority: u8,
    pub max_wait: Duration,
}

impl Class {
    /// For upstreams without a budget: a class that is never queued.
    pub fn unlimited() -> Class {
        Class { name: Arc::from("unlimited"), priority: 0, max_wait: Duration::from_secs(0) }
    }
}

impl PartialEq for Class {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, self.priority, self.max_wait) == (&other.name, other.priority, other.max_wait)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetParams {
    pub window_requests: u32,
    pub window: Duration,
    /// Added to the window before a slot frees, so network jitter between the gateway's clock and
    /// the ERP's cannot make the ERP count more than its limit.
    pub window_margin: Duration,
    pub max_concurrent: u32,
    pub queue: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub circuit_failures: u32,
    pub circuit_open: Duration,
    /// Cap on one pause, whatever the ERP's `Retry-After` says.
    pub max_pause: Duration,
    /// Largest share of the window and of the concurrency one consumer may hold (1: no cap).
    pub max_share: f64,
    /// Spread the window's requests evenly (`pacing: smooth`); `None`: as fast as the window
    /// and the concurrency allow.
    pub pacing: Option<Pacing>,
    /// Adapt to the ERP: overload signals halve the effective rate and concurrency, answers
    /// without one win them back step by step, never above the configured values.
    pub adaptive: bool,
}

/// Even spacing of admissions, for ERPs behind a spike arrest or a leaky bucket, which refuse
/// a second request that comes too soon after the first even when the window has room.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// One request per `interval` (the window divided by its requests)...
    pub interval: Duration,
    /// ...with up to `burst` admitted back to back after a quiet spell (1: none).
    pub burst: u32,
}

impl BudgetParams {
    /// (in flight, per window) one consumer may hold; `None` when shares are off.
    pub fn consumer_caps(&self) -> Option<(u32, usize)> {
        (self.max_share < 1.0).then(|| {
            let share = |n: u32| ((f64::from(n) * self.max_share).floor() as u32).max(1);
            (share(self.max_concurrent), share(self.window_requests) as usize)
        })
    }
}

// Who a request is made for: set around in-process ERP calls (process APIs, deliveries) so
// the adapter's permits count toward that consumer's share.
tokio::task_local! {
    static CONSUMER: Arc<str>;
}

/// Run `f` with its ERP permits counted toward `consumer`.
pub async fn on_behalf_of<F: std::future::Future>(consumer: Arc<str>, f: F) -> F::Output {
    CONSUMER.scope(consumer, f).await
}

/// The consumer set by [`on_behalf_of`] for the current task.
pub fn current_consumer() -> Option<Arc<str>> {
    CONSUMER.try_with(|c| c.clone()).ok()
}

// Work nobody waits for (the delivery worker's rounds): it queues behind every request a caller
// waits for, whatever its class, so background deliveries never starve a caller's lookups.
tokio::task_local! {
    static BACKGROUND: ();
}

/// Run `f` as background work: its permits queue after all of callers' requests.
pub async fn in_background<F: std::future::Future>(f: F) -> F::Output {
    BACKGROUND.scope((), f).await
}

/// The queue priority of `class` for the current task: background work after every class of
/// foreground work, in the same order among itself.
pub fn queue_priority(class: &Class) -> u8 {
    if BACKGROUND.try_with(|_| ()).is_ok() {
        class.priority.saturating_add(128)
    } else {
        class.priority.min(127)
    }
}

/// What `GET /admin/budgets` shows of a budget.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    pub upstream: String,
    /// Milliseconds left of an overload pause (0: not paused).
    pub paused_for_ms: u64,
    pub in_flight: u32,
    pub max_concurrent: u32,
    pub queued: usize,
    pub queue: usize,
    pub admitted_in_window: usize,
    pub window_requests: u32,
    pub window_seconds: u64,
    pub circuit: &'static str,
    pub max_pause_seconds: u64,
    pub max_share: f64,
    /// `smooth` or `off`.
    pub pacing: &'static str,
    /// Milliseconds between paced admissions (0 when pacing is off).
    pub pacing_interval_ms: u64,
    pub burst: u32,
    pub adaptive: bool,
    /// The limits in force now (below the configured ones after overload, when adaptive).
    pub effective_max_concurrent: u32,
    pub effective_window_requests: u32,
    /// Who holds what, when shares are on (`max_share` below 1): the consumers with requests in
    /// flight, in the window or waiting, most first (at most [`HOLDERS_SHOWN`]). On a shared
    /// budget, this replica's.
    pub holders: Vec<Holder>,
}

/// How many consumers `GET /admin/budgets` lists per budget.
pub const HOLDERS_SHOWN: usize = 20;

/// One consumer's use of a budget.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Holder {
    pub consumer: String,
    pub in_flight: u32,
    pub admitted_in_window: usize,
    pub waiting: usize,
}

/// Why a request did not get a permit.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Waited up to the class deadline (or the queue was full).
    Busy { retry_after: Duration },
    /// The circuit breaker is open.
    CircuitOpen { retry_after: Duration },
}

/// What the ERP's answer means for the budget.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success,
    /// 429/503 or a configured vendor signal; `None` when the ERP gave no Retry-After.
    Overload(Option<Duration>),
    /// Connect error, timeout, other 5xx.
    Failure,
}

/// An ERP's overload signals besides 429 and 503 (`overload_signals`): a status that alone
/// means overload (`None`), or a status whose body holds a marker (NetSuite's 400 with
/// `SSS_REQUEST_LIMIT_EXCEEDED`).
pub type OverloadSignals = [(u16, Option<String>)];

/// How much of a body is looked at for a marker.
pub const MARKER_SCAN_BYTES: usize = 64 * 1024;

/// What an ERP's answer means for its budget, from its status and `Retry-After`: the outcome,
/// and the body markers still to look for when the status alone does not say. The one place
/// that decides it, for proxied and mediated routes and the process APIs' adapters alike.
pub fn judge(status: u16, retry_after: Option<&[u8]>, signals: &OverloadSignals) -> (Outcome, Vec<String>) {
    let status_signal = signals.iter().any(|(s, body)| *s == status && body.is_none());
    if status == 429 || status == 503 || status_signal {
        let wait = retry_after.and_then(|v| std::str::from_utf8(v).ok()).and_then(parse_retry_after);
        return (Outcome::Overload(wait), Vec::new());
    }
    let markers = signals.iter().filter(|(s, _)| *s == status).filter_map(|(_, body)| body.clone()).collect();
    let outcome = if status >= 500 { Outcome::Failure } else { Outcome::Success };
    (outcome, markers)
}

/// Whether the start of `body` holds one of `markers`.
pub fn body_signals_overload(markers: &[String], body: &[u8]) -> bool {
    if markers.is_empty() {
        return false;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MARKER_SCAN_BYTES)]);
    markers.iter().any(|m| text.contains(m.as_str()))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}
