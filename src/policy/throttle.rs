//! The ERP throttle: one budget per ERP upstream, shared by every route, consumer and in-process
//! caller that reaches it. A sliding-window request rate and a concurrency cap; when either is
//! exhausted, requests wait in one bounded queue ordered by priority class (then arrival), each
//! up to its class's deadline. Overload signals from the ERP pause the whole budget; a circuit
//! breaker opens on consecutive failures and probes half-open. Permits release on drop, so
//! every path (success, error, client gone, timeout) gives the slot back.

use crate::observe::metrics::Metrics;
use parking_lot::Mutex;
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

struct State {
    admitted: VecDeque<Instant>,
    in_flight: u32,
    paused_until: Option<Instant>,
    consecutive_overloads: u32,
    waiters: BTreeMap<(u8, u64), oneshot::Sender<()>>,
    seq: u64,
    circuit: Circuit,
    timer_at: Option<Instant>,
}

pub struct Budget {
    pub upstream: String,
    params: Mutex<BudgetParams>,
    state: Mutex<State>,
    /// Metric handles resolved once: label lookups are not free on the request path.
    in_flight_gauge: prometheus::IntGauge,
    queue_gauge: prometheus::IntGauge,
    circuit_gauge: prometheus::IntGauge,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget({})", self.upstream)
    }
}

/// A slot in the budget; dropping it releases the concurrency slot.
pub struct Permit {
    budget: Arc<Budget>,
    probe: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release(self.probe);
    }
}

impl Permit {
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

/// Removes a waiter that gave up (deadline or dropped request) from the queue.
struct WaitGuard<'a> {
    budget: &'a Arc<Budget>,
    key: (u8, u64),
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.budget.state.lock();
        s.waiters.remove(&self.key);
        Metrics::global()
            .erp_queue_depth
            .with_label_values(&[self.budget.upstream.as_str()])
            .set(s.waiters.len() as i64);
    }
}

impl Budget {
    pub fn new(upstream: &str, params: BudgetParams) -> Arc<Self> {
        let m = Metrics::global();
        Arc::new(Budget {
            in_flight_gauge: m.erp_in_flight.with_label_values(&[upstream]),
            queue_gauge: m.erp_queue_depth.with_label_values(&[upstream]),
            circuit_gauge: m.erp_circuit_state.with_label_values(&[upstream]),
            upstream: upstream.to_string(),
            params: Mutex::new(params),
            state: Mutex::new(State {
                admitted: VecDeque::new(),
                in_flight: 0,
                paused_until: None,
                consecutive_overloads: 0,
                waiters: BTreeMap::new(),
                seq: 0,
                circuit: Circuit::Closed { failures: 0 },
                timer_at: None,
            }),
        })
    }

    pub fn params(&self) -> BudgetParams {
        self.params.lock().clone()
    }

    /// New limits apply from now on; in-flight accounting and the window carry over (reload).
    pub fn set_params(self: &Arc<Self>, params: BudgetParams) {
        *self.params.lock() = params;
        self.dispatch();
    }

    pub fn in_flight(&self) -> u32 {
        self.state.lock().in_flight
    }

    /// Take a permit for `class`, waiting up to its deadline.
    pub async fn acquire(self: &Arc<Self>, class: &Class) -> Result<Permit, Refusal> {
        let started = Instant::now();
        let metrics = Metrics::global();
        let labels = [self.upstream.as_str(), &*class.name];
        let (rx, key) = {
            let params = self.params();
            let mut s = self.state.lock();
            let now = Instant::now();
            let mut probe = false;
            match s.circuit {
                Circuit::Open { until } if now < until => {
                    metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "circuit_open"]).inc();
                    return Err(Refusal::CircuitOpen { retry_after: until - now });
                }
                Circuit::Open { .. } => {
                    s.circuit = Circuit::HalfOpen { probing: true };
                    self.publish_circuit(&s);
                    probe = true;
                }
                Circuit::HalfOpen { probing: true } => {
                    metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "circuit_open"]).inc();
                    return Err(Refusal::CircuitOpen { retry_after: Duration::from_secs(1) });
                }
                Circuit::HalfOpen { probing: false } => {
                    s.circuit = Circuit::HalfOpen { probing: true };
                    probe = true;
                }
                Circuit::Closed { .. } => {}
            }
            // Nobody of the same or a higher class may be overtaken.
            let ahead = s.waiters.keys().next().is_some_and(|(p, _)| *p <= class.priority);
            if probe && !Self::can_admit(&mut s, &params, now) {
                // The probe waits for budget like anyone; let a later request probe instead.
                s.circuit = Circuit::HalfOpen { probing: false };
                metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "circuit_open"]).inc();
                return Err(Refusal::CircuitOpen { retry_after: Self::next_slot(&s, &params, now) });
            }
            if probe || (!ahead && Self::can_admit(&mut s, &params, now)) {
                Self::account(&mut s, now);
                self.publish(&s);
                drop(s);
                metrics.erp_admitted.with_label_values(&labels).inc();
                metrics.erp_wait.with_label_values(&labels).observe(0.0);
                return Ok(Permit { budget: self.clone(), probe });
            }
            if s.waiters.len() >= params.queue {
                metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "queue_full"]).inc();
                return Err(Refusal::Busy { retry_after: Self::next_slot(&s, &params, now) });
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let key = (class.priority, s.seq);
            s.waiters.insert(key, tx);
            self.queue_gauge.set(s.waiters.len() as i64);
            self.arm_timer(&mut s, &params, now);
            (rx, key)
        };
        let guard = WaitGuard { budget: self, key };
        let waited = tokio::time::timeout_at((started + class.max_wait).into(), rx).await;
        drop(guard);
        match waited {
            Ok(Ok(())) => {
                metrics.erp_admitted.with_label_values(&labels).inc();
                metrics.erp_wait.with_label_values(&labels).observe(started.elapsed().as_secs_f64());
                Ok(Permit { budget: self.clone(), probe: false })
            }
            _ => {
                metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "deadline"]).inc();
                let params = self.params();
                let s = self.state.lock();
                Err(Refusal::Busy { retry_after: Self::next_slot(&s, &params, Instant::now()) })
            }
        }
    }

    /// Report how the ERP answered a request made under a permit.
    pub fn report(self: &Arc<Self>, outcome: Outcome) {
        let params = self.params();
        let metrics = Metrics::global();
        let mut s = self.state.lock();
        let now = Instant::now();
        match outcome {
            Outcome::Success => {
                s.consecutive_overloads = 0;
                s.circuit = Circuit::Closed { failures: 0 };
            }
            Outcome::Overload(retry_after) => {
                let pause = retry_after.unwrap_or_else(|| {
                    backoff(params.backoff_initial, params.backoff_max, s.consecutive_overloads)
                });
                s.consecutive_overloads = s.consecutive_overloads.saturating_add(1);
                let until = now + pause;
                if s.paused_until.is_none_or(|p| p < until) {
                    s.paused_until = Some(until);
                }
                let reason = if retry_after.is_some() { "retry_after" } else { "backoff" };
                metrics.erp_pauses.with_label_values(&[self.upstream.as_str(), reason]).inc();
                tracing::warn!(upstream = %self.upstream, pause_ms = pause.as_millis() as u64, "ERP overload signal: budget paused");
            }
            Outcome::Failure => {
                s.circuit = match s.circuit {
                    Circuit::Closed { failures } if failures + 1 >= params.circuit_failures => {
                        tracing::warn!(upstream = %self.upstream, "circuit opened after consecutive failures");
                        Circuit::Open { until: now + params.circuit_open }
                    }
                    Circuit::Closed { failures } => Circuit::Closed { failures: failures + 1 },
                    Circuit::HalfOpen { .. } | Circuit::Open { .. } => {
                        Circuit::Open { until: now + params.circuit_open }
                    }
                };
            }
        }
        self.publish_circuit(&s);
        self.arm_timer(&mut s, &params, now);
    }

    fn release(self: &Arc<Self>, probe: bool) {
        {
            let mut s = self.state.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            // A probe that ended without a report (client gone) lets the next request probe.
            if probe && s.circuit == (Circuit::HalfOpen { probing: true }) {
                s.circuit = Circuit::HalfOpen { probing: false };
            }
            self.publish(&s);
        }
        self.dispatch();
    }

    /// Hand slots to waiters, best class first, while the budget allows.
    fn dispatch(self: &Arc<Self>) {
        let params = self.params();
        let mut s = self.state.lock();
        let now = Instant::now();
        while !s.waiters.is_empty() && Self::can_admit(&mut s, &params, now) {
            let Some((_, tx)) = s.waiters.pop_first() else { break };
            Self::account(&mut s, now);
            if tx.send(()).is_err() {
                // The waiter is gone: undo.
                s.in_flight -= 1;
                s.admitted.pop_back();
            }
        }
        Metrics::global()
            .erp_queue_depth
            .with_label_values(&[self.upstream.as_str()])
            .set(s.waiters.len() as i64);
        self.publish(&s);
        self.arm_timer(&mut s, &params, now);
    }

    fn can_admit(s: &mut State, p: &BudgetParams, now: Instant) -> bool {
        if s.paused_until.is_some_and(|t| now < t) {
            return false;
        }
        let horizon = p.window + p.window_margin;
        while s.admitted.front().is_some_and(|t| now.duration_since(*t) >= horizon) {
            s.admitted.pop_front();
        }
        s.in_flight < p.max_concurrent && (s.admitted.len() as u32) < p.window_requests
    }

    fn account(s: &mut State, now: Instant) {
        s.in_flight += 1;
        s.admitted.push_back(now);
    }

    /// When a slot can next free up by the passage of time (window or pause), else in a second.
    fn next_slot(s: &State, p: &BudgetParams, now: Instant) -> Duration {
        let mut at = now + Duration::from_secs(1);
        if let Some(paused) = s.paused_until.filter(|t| *t > now) {
            at = at.max(paused);
        }
        if s.admitted.len() as u32 >= p.window_requests {
            if let Some(oldest) = s.admitted.front() {
                at = at.max(*oldest + p.window + p.window_margin);
            }
        }
        at - now
    }

    /// Waiters blocked by the window or a pause need a wake-up when time frees a slot.
    fn arm_timer(self: &Arc<Self>, s: &mut State, p: &BudgetParams, now: Instant) {
        if s.waiters.is_empty() {
            return;
        }
        let mut wake = None;
        if let Some(paused) = s.paused_until.filter(|t| *t > now) {
            wake = Some(paused);
        } else if s.admitted.len() as u32 >= p.window_requests {
            wake = s.admitted.front().map(|t| *t + p.window + p.window_margin);
        }
        let Some(wake) = wake else { return };
        if s.timer_at.is_some_and(|t| t <= wake && t > now) {
            return;
        }
        s.timer_at = Some(wake);
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(wake.into()).await;
            me.state.lock().timer_at = None;
            me.dispatch();
        });
    }

    fn publish(&self, s: &State) {
        self.in_flight_gauge.set(i64::from(s.in_flight));
    }

    fn publish_circuit(&self, s: &State) {
        let v = match s.circuit {
            Circuit::Closed { .. } => 0,
            Circuit::HalfOpen { .. } => 1,
            Circuit::Open { .. } => 2,
        };
        self.circuit_gauge.set(v);
    }
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

/// `initial` doubled `doublings` times, capped at `max`, with jitter over the upper half so
/// clients backing off from one event do not return together. Shared by the ERP budget's pauses
/// and the order delivery worker's retries.
pub fn backoff(initial: Duration, max: Duration, doublings: u32) -> Duration {
    let cap = initial.saturating_mul(1u32 << doublings.min(20)).min(max);
    let half = cap / 2;
    half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for doublings in 0..30 {
            let d = backoff(i, m, doublings);
            let exp = (i * 2u32.pow(doublings.min(20))).min(m);
            assert!(d >= exp / 2 && d <= exp, "doublings {doublings}: {d:?} vs {exp:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(i, m, 4)).collect();
        assert!(samples.len() > 1, "jitter spreads retries");
    }

    fn params(window_requests: u32, max_concurrent: u32) -> BudgetParams {
        BudgetParams {
            window_requests,
            window: Duration::from_millis(300),
            window_margin: Duration::ZERO,
            max_concurrent,
            queue: 100,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            circuit_failures: 2,
            circuit_open: Duration::from_millis(200),
        }
    }

    fn class(name: &str, priority: u8, wait_ms: u64) -> Class {
        Class { name: name.into(), priority, max_wait: Duration::from_millis(wait_ms) }
    }

    #[tokio::test]
    async fn concurrency_cap_and_release_on_drop() {
        let b = Budget::new("t1", params(100, 2));
        let c = class("interactive", 1, 50);
        let p1 = b.acquire(&c).await.unwrap();
        let _p2 = b.acquire(&c).await.unwrap();
        assert!(matches!(b.acquire(&c).await, Err(Refusal::Busy { .. })), "third waits past its deadline");
        drop(p1);
        assert!(b.acquire(&c).await.is_ok(), "a dropped permit frees its slot");
    }

    #[tokio::test]
    async fn higher_class_goes_first() {
        let b = Budget::new("t2", params(100, 1));
        let held = b.acquire(&class("w", 0, 1000)).await.unwrap();
        let bulk = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(&class("bulk", 2, 1000)).await.map(|_| Instant::now()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let write = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(&class("write", 0, 1000)).await.map(|_| Instant::now()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        let (w, k) = (write.await.unwrap().unwrap(), bulk.await.unwrap().unwrap());
        assert!(w <= k, "the write queued later but was admitted first");
    }

    #[tokio::test]
    async fn window_limits_and_overload_pauses() {
        let b = Budget::new("t3", params(3, 10));
        let c = class("i", 1, 1000);
        for _ in 0..3 {
            drop(b.acquire(&c).await.unwrap());
        }
        let t = Instant::now();
        drop(b.acquire(&c).await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(250), "the fourth waited for the window");
        b.report(Outcome::Overload(Some(Duration::from_millis(300))));
        let t = Instant::now();
        drop(b.acquire(&c).await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(280), "nothing admitted during the pause");
    }

    #[tokio::test]
    async fn circuit_opens_then_probes() {
        let b = Budget::new("t4", params(100, 10));
        let c = class("i", 1, 10);
        b.report(Outcome::Failure);
        b.report(Outcome::Failure);
        assert!(matches!(b.acquire(&c).await, Err(Refusal::CircuitOpen { .. })));
        tokio::time::sleep(Duration::from_millis(220)).await;
        let probe = b.acquire(&c).await.expect("half-open lets one probe through");
        assert!(matches!(b.acquire(&c).await, Err(Refusal::CircuitOpen { .. })), "only one probe");
        b.report(Outcome::Success);
        drop(probe);
        assert!(b.acquire(&c).await.is_ok(), "closed again after a successful probe");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
