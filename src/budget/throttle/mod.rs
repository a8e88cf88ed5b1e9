//! The ERP throttle: one budget per ERP upstream, shared by every route, consumer and in-process
//! caller that reaches it. A sliding-window request rate and a concurrency cap; when either is
//! exhausted, requests wait in one bounded queue ordered by priority class (then arrival), each
//! up to its class's deadline. Overload signals from the ERP pause the whole budget, for at most
//! `max_pause` (an operator can resume it earlier); a circuit breaker opens on consecutive
//! failures and probes half-open. With `max_share` below 1, one consumer holds at most that share
//! of the window and of the concurrency, so it cannot starve the others. Permits release on drop,
//! so every path (success, error, client gone, timeout) gives the slot back.

// The port's vocabulary, so `throttle::Class` and the like keep naming it.
pub use super::*;

use crate::clock::backoff;
use crate::observe::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;
// tokio's clock: tests pause and advance it (`start_paused`) instead of sleeping.
use tokio::sync::oneshot;
use tokio::time::Instant;

mod adaptive;

/// How many windows' worth of good answers the adaptive limits wait, just below the limits
/// that last met an overload, before probing them again.
pub const PROBE_AFTER_WINDOWS: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// One consumer's use of the budget (tracked only when shares are on).
#[derive(Default)]
struct ConsumerUse {
    in_flight: u32,
    admitted: VecDeque<Instant>,
}

/// A waiter's place in the queue: class priority, then arrival.
type WaitKey = (u8, u64);

struct Waiter {
    tx: oneshot::Sender<()>,
    consumer: Option<Arc<str>>,
}

struct State {
    admitted: VecDeque<Instant>,
    in_flight: u32,
    paused_until: Option<Instant>,
    consecutive_overloads: u32,
    waiters: BTreeMap<WaitKey, Waiter>,
    seq: u64,
    circuit: Circuit,
    timer_at: Option<Instant>,
    consumers: HashMap<Arc<str>, ConsumerUse>,
    /// With pacing: when the next request conforms with no burst left (GCRA's theoretical
    /// arrival time); earlier by `burst - 1` intervals it may still go.
    paced_at: Option<Instant>,
    /// Waiters a slot was sent to that have not taken it yet.
    handed: HashSet<WaitKey>,
    /// Adaptive limits in force (concurrency, window requests); `None`: the configured ones.
    effective: Option<(u32, u32)>,
    /// Answers without an overload since the last step up of the adaptive limits.
    good_answers: u32,
    /// The limits in force when the ERP last pushed back: the adaptive limits climb back to
    /// just below them, and probe them again only after a steady spell.
    ceiling: Option<(u32, u32)>,
    /// Answers without an overload since the last decrease.
    steady: u32,
}

/// The in-memory budget: one process's view of an ERP's limits.
pub struct Budget {
    pub upstream: String,
    /// Itself, for the permits and wake-up timers it hands out.
    me: Weak<Budget>,
    params: Mutex<BudgetParams>,
    state: Mutex<State>,
    /// Metric handles resolved once: label lookups are not free on the request path.
    in_flight_gauge: prometheus::IntGauge,
    queue_gauge: prometheus::IntGauge,
    /// Closed, half-open, open: one of them 1.
    circuit_gauges: [prometheus::IntGauge; 3],
    pause_gauge: prometheus::Gauge,
    concurrency_limit_gauge: prometheus::IntGauge,
    window_limit_gauge: prometheus::IntGauge,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget({})", self.upstream)
    }
}

/// Removes a waiter that gave up (deadline or dropped request) from the queue, and gives back
/// a slot that was sent to it but never taken (the client went away, or the deadline struck as
/// the slot came).
struct WaitGuard<'a> {
    budget: &'a Budget,
    key: WaitKey,
    consumer: Option<Arc<str>>,
    /// The slot became a permit.
    granted: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.budget.state.lock();
        s.waiters.remove(&self.key);
        let untaken = s.handed.remove(&self.key) && !self.granted;
        if untaken {
            s.in_flight = s.in_flight.saturating_sub(1);
            if let Some(used) = self.consumer.as_ref().and_then(|c| s.consumers.get_mut(c)) {
                used.in_flight = used.in_flight.saturating_sub(1);
            }
            self.budget.publish(&s);
        }
        self.budget.queue_gauge.set(s.waiters.len() as i64);
        drop(s);
        if untaken {
            self.budget.dispatch();
        }
    }
}

impl Budget {
    pub fn new(upstream: &str, params: BudgetParams) -> Arc<Self> {
        let m = Metrics::global();
        let budget = Arc::new_cyclic(|me| Budget {
            me: me.clone(),
            in_flight_gauge: m.erp_in_flight.with_label_values(&[upstream]),
            queue_gauge: m.erp_queue_depth.with_label_values(&[upstream]),
            circuit_gauges: ["closed", "half_open", "open"]
                .map(|state| m.erp_circuit_state.with_label_values(&[upstream, state])),
            pause_gauge: m.erp_pause_seconds.with_label_values(&[upstream]),
            concurrency_limit_gauge: m.erp_effective_limit.with_label_values(&[upstream, "max_concurrent"]),
            window_limit_gauge: m.erp_effective_limit.with_label_values(&[upstream, "window_requests"]),
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
                consumers: HashMap::new(),
                paced_at: None,
                handed: HashSet::new(),
                effective: None,
                good_answers: 0,
                ceiling: None,
                steady: 0,
            }),
        });
        let params = budget.params();
        budget.publish_limits(&budget.state.lock(), &params);
        // Pauses count from zero, so a rate over them (the overload alert) has a series at once.
        for reason in ["retry_after", "backoff"] {
            m.erp_pauses.with_label_values(&[upstream, reason]);
        }
        budget
    }

    /// The permit of [`ErpBudget::acquire`].
    async fn acquire_permit(&self, class: &Class, consumer: Option<&Arc<str>>) -> Result<Permit, Refusal> {
        let started = Instant::now();
        let metrics = Metrics::global();
        let labels = [self.upstream.as_str(), &*class.name];
        let consumer = consumer.cloned();
        let (rx, key, shares) = {
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
            // A pause that outlasts this class's wait: refused now, not after the wait.
            if let Some(left) = s.paused_until.map(|p| p.saturating_duration_since(now)) {
                if left > class.max_wait {
                    metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "paused"]).inc();
                    return Err(Refusal::Busy { retry_after: left });
                }
            }
            // Nobody of the same or a higher class may be overtaken.
            let priority = queue_priority(class);
            let ahead = s.waiters.keys().next().is_some_and(|(p, _)| *p <= priority);
            let admissible = Self::can_admit(&mut s, &params, now)
                && Self::consumer_may(&mut s, &params, now, consumer.as_ref());
            if probe && !admissible {
                // The probe waits for budget like anyone; let a later request probe instead.
                s.circuit = Circuit::HalfOpen { probing: false };
                metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "circuit_open"]).inc();
                return Err(Refusal::CircuitOpen { retry_after: Self::next_slot(&s, &params, now) });
            }
            if probe || (!ahead && admissible) {
                Self::account(&mut s, now, consumer.as_ref(), &params);
                self.publish(&s);
                drop(s);
                metrics.erp_admitted.with_label_values(&labels).inc();
                metrics.erp_wait.with_label_values(&labels).observe(0.0);
                return Ok(self.permit(Lease { probe, consumer, shared: None }));
            }
            if s.waiters.len() >= params.queue {
                metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "queue_full"]).inc();
                return Err(Refusal::Busy { retry_after: Self::next_slot(&s, &params, now) });
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let key = (priority, s.seq);
            s.waiters.insert(key, Waiter { tx, consumer: consumer.clone() });
            self.queue_gauge.set(s.waiters.len() as i64);
            self.arm_timer(&mut s, &params, now);
            (rx, key, params.consumer_caps().is_some())
        };
        // Waiters ahead of this one may be held back by their own share: let the dispatcher,
        // which skips them, decide.
        if shares {
            self.dispatch();
        }
        let mut guard = WaitGuard { budget: self, key, consumer: consumer.clone(), granted: false };
        let waited = tokio::time::timeout_at(started + class.max_wait, rx).await;
        guard.granted = matches!(waited, Ok(Ok(())));
        drop(guard);
        match waited {
            Ok(Ok(())) => {
                metrics.erp_admitted.with_label_values(&labels).inc();
                metrics.erp_wait.with_label_values(&labels).observe(started.elapsed().as_secs_f64());
                Ok(self.permit(Lease { probe: false, consumer, shared: None }))
            }
            _ => {
                metrics.erp_rejected.with_label_values(&[labels[0], labels[1], "deadline"]).inc();
                let params = self.params();
                let s = self.state.lock();
                Err(Refusal::Busy { retry_after: Self::next_slot(&s, &params, Instant::now()) })
            }
        }
    }

    fn permit(&self, lease: Lease) -> Permit {
        let me: Arc<dyn ErpBudget> =
            self.me.upgrade().expect("a budget hands out permits only while it lives");
        Permit::new(me, lease)
    }

    fn release_lease(&self, Lease { probe, consumer, .. }: Lease) {
        {
            let mut s = self.state.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            if let Some(c) = consumer {
                if let Some(used) = s.consumers.get_mut(&c) {
                    used.in_flight = used.in_flight.saturating_sub(1);
                }
            }
            // A probe that ended without a report (client gone) lets the next request probe.
            if probe && s.circuit == (Circuit::HalfOpen { probing: true }) {
                s.circuit = Circuit::HalfOpen { probing: false };
            }
            self.publish(&s);
        }
        self.dispatch();
    }

    /// Hand slots to waiters, best class first, while the budget allows. A waiter whose
    /// consumer holds its whole share is passed over until its share frees.
    fn dispatch(&self) {
        let params = self.params();
        let mut s = self.state.lock();
        let now = Instant::now();
        while !s.waiters.is_empty() && Self::can_admit(&mut s, &params, now) {
            let next = if params.consumer_caps().is_none() {
                s.waiters.keys().next().copied()
            } else {
                let waiting: Vec<WaitKey> = s.waiters.keys().copied().collect();
                waiting.into_iter().find(|k| {
                    let consumer = s.waiters.get(k).and_then(|w| w.consumer.clone());
                    Self::consumer_may(&mut s, &params, now, consumer.as_ref())
                })
            };
            let Some((key, waiter)) = next.and_then(|k| s.waiters.remove(&k).map(|w| (k, w))) else { break };
            Self::account(&mut s, now, waiter.consumer.as_ref(), &params);
            if waiter.tx.send(()).is_err() {
                // The waiter is gone: undo.
                Self::unaccount(&mut s, waiter.consumer.as_ref(), &params);
            } else {
                s.handed.insert(key);
            }
        }
        Metrics::global()
            .erp_queue_depth
            .with_label_values(&[self.upstream.as_str()])
            .set(s.waiters.len() as i64);
        self.publish(&s);
        self.arm_timer(&mut s, &params, now);
    }

    /// Give back a permit that was never used (a later stage refused it), with its place in
    /// the window, so a refusal elsewhere does not spend this budget.
    pub fn release_unused(&self, lease: Lease) {
        self.state.lock().admitted.pop_back();
        self.release_lease(lease);
    }

    /// Count requests of other replicas against this budget, as last seen in the shared one,
    /// when it falls back to its local share: `in_flight` held for `held_for` (their holders
    /// cannot say when they end), `admitted` as if made now (they leave the window no later).
    pub fn assume_elsewhere(&self, in_flight: u32, admitted: usize, held_for: Duration) {
        {
            let mut s = self.state.lock();
            s.in_flight += in_flight;
            let now = Instant::now();
            s.admitted.extend(std::iter::repeat_n(now, admitted));
            self.publish(&s);
        }
        if in_flight == 0 {
            return;
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(held_for).await;
            if let Some(budget) = me.upgrade() {
                {
                    let mut s = budget.state.lock();
                    s.in_flight = s.in_flight.saturating_sub(in_flight);
                    budget.publish(&s);
                }
                budget.dispatch();
            }
        });
    }

    fn can_admit(s: &mut State, p: &BudgetParams, now: Instant) -> bool {
        if s.paused_until.is_some_and(|t| now < t) {
            return false;
        }
        let horizon = p.window + p.window_margin;
        while s.admitted.front().is_some_and(|t| now.duration_since(*t) >= horizon) {
            s.admitted.pop_front();
        }
        let (max_concurrent, window_requests) = Self::limits(s, p);
        s.in_flight < max_concurrent
            && (s.admitted.len() as u32) < window_requests
            && Self::paced_from(s, p).is_none_or(|at| at <= now)
    }

    /// (max_concurrent, window_requests) in force: the configured ones, or the adaptive limits.
    fn limits(s: &State, p: &BudgetParams) -> (u32, u32) {
        match s.effective {
            Some((c, w)) if p.adaptive => (c.min(p.max_concurrent), w.min(p.window_requests)),
            _ => (p.max_concurrent, p.window_requests),
        }
    }

    /// With pacing, the time between admissions: the window (and its margin) over the requests
    /// in force.
    fn pace_interval(s: &State, p: &BudgetParams) -> Option<Duration> {
        let pacing = p.pacing?;
        let (_, window_requests) = Self::limits(s, p);
        Some(if window_requests < p.window_requests {
            (p.window + p.window_margin) / window_requests.max(1)
        } else {
            pacing.interval
        })
    }

    /// With pacing, the earliest time the next request may go.
    fn paced_from(s: &State, p: &BudgetParams) -> Option<Instant> {
        let pacing = p.pacing?;
        let tat = s.paced_at?;
        let burst_ahead = Self::pace_interval(s, p)?.saturating_mul(pacing.burst.saturating_sub(1));
        Some(tat.checked_sub(burst_ahead).unwrap_or(tat))
    }

    /// Whether `consumer` is under its share (always, when shares are off or it is nobody's).
    fn consumer_may(s: &mut State, p: &BudgetParams, now: Instant, consumer: Option<&Arc<str>>) -> bool {
        let (Some((max_in_flight, max_window)), Some(c)) = (p.consumer_caps(), consumer) else { return true };
        let Some(used) = s.consumers.get_mut(c) else { return true };
        let horizon = p.window + p.window_margin;
        while used.admitted.front().is_some_and(|t| now.duration_since(*t) >= horizon) {
            used.admitted.pop_front();
        }
        used.in_flight < max_in_flight && used.admitted.len() < max_window
    }

    fn account(s: &mut State, now: Instant, consumer: Option<&Arc<str>>, p: &BudgetParams) {
        s.in_flight += 1;
        s.admitted.push_back(now);
        if let Some(interval) = Self::pace_interval(s, p) {
            s.paced_at = Some(s.paced_at.map_or(now, |t| t.max(now)) + interval);
        }
        if let (Some(c), Some(_)) = (consumer, p.consumer_caps()) {
            let used = s.consumers.entry(c.clone()).or_default();
            used.in_flight += 1;
            used.admitted.push_back(now);
        }
        // Consumers with nothing in flight and nothing in the window are forgotten.
        if s.consumers.len() > 64 {
            let horizon = p.window + p.window_margin;
            s.consumers.retain(|_, u| {
                u.in_flight > 0 || u.admitted.back().is_some_and(|t| now.duration_since(*t) < horizon)
            });
        }
    }

    fn unaccount(s: &mut State, consumer: Option<&Arc<str>>, p: &BudgetParams) {
        s.in_flight -= 1;
        s.admitted.pop_back();
        if let (Some(interval), Some(t)) = (Self::pace_interval(s, p), s.paced_at) {
            s.paced_at = t.checked_sub(interval);
        }
        if let Some(used) = consumer.and_then(|c| s.consumers.get_mut(c)) {
            used.in_flight = used.in_flight.saturating_sub(1);
            used.admitted.pop_back();
        }
    }

    /// When a slot can next free up by the passage of time (window or pause), else in a second.
    fn next_slot(s: &State, p: &BudgetParams, now: Instant) -> Duration {
        let mut at = now + Duration::from_secs(1);
        if let Some(paused) = s.paused_until.filter(|t| *t > now) {
            at = at.max(paused);
        }
        if s.admitted.len() as u32 >= Self::limits(s, p).1 {
            if let Some(oldest) = s.admitted.front() {
                at = at.max(*oldest + p.window + p.window_margin);
            }
        }
        if let Some(paced) = Self::paced_from(s, p) {
            at = at.max(paced);
        }
        at - now
    }

    /// Waiters blocked by the window or a pause need a wake-up when time frees a slot.
    fn arm_timer(&self, s: &mut State, p: &BudgetParams, now: Instant) {
        if s.waiters.is_empty() {
            return;
        }
        let mut wake = None;
        if let Some(paused) = s.paused_until.filter(|t| *t > now) {
            wake = Some(paused);
        } else if s.admitted.len() as u32 >= Self::limits(s, p).1 {
            wake = s.admitted.front().map(|t| *t + p.window + p.window_margin);
        } else if let Some(paced) = Self::paced_from(s, p).filter(|t| *t > now) {
            wake = Some(paced);
        } else if p.consumer_caps().is_some() {
            // Waiters held back by their consumer's window share wake when it slides.
            let horizon = p.window + p.window_margin;
            wake = s
                .waiters
                .values()
                .filter_map(|w| w.consumer.as_ref())
                .filter_map(|c| s.consumers.get(c).and_then(|u| u.admitted.front()))
                .map(|t| *t + horizon)
                .filter(|t| *t > now)
                .min();
        }
        let Some(wake) = wake else { return };
        if s.timer_at.is_some_and(|t| t <= wake && t > now) {
            return;
        }
        s.timer_at = Some(wake);
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(wake).await;
            if let Some(me) = me.upgrade() {
                me.state.lock().timer_at = None;
                me.dispatch();
            }
        });
    }

    fn publish(&self, s: &State) {
        self.in_flight_gauge.set(i64::from(s.in_flight));
    }

    fn publish_circuit(&self, s: &State) {
        let current = match s.circuit {
            Circuit::Closed { .. } => 0,
            Circuit::HalfOpen { .. } => 1,
            Circuit::Open { .. } => 2,
        };
        for (i, gauge) in self.circuit_gauges.iter().enumerate() {
            gauge.set(i64::from(i == current));
        }
    }
}

impl ErpBudget for Budget {
    fn params(&self) -> BudgetParams {
        self.params.lock().clone()
    }

    /// New limits apply from now on; in-flight accounting and the window carry over (reload).
    /// A pause longer than the new `max_pause` is shortened to it.
    fn set_params(&self, params: BudgetParams) {
        {
            let mut s = self.state.lock();
            let latest = Instant::now().checked_add(params.max_pause);
            if let (Some(paused), Some(latest)) = (s.paused_until, latest) {
                if paused > latest {
                    s.paused_until = Some(latest);
                }
            }
        }
        *self.params.lock() = params.clone();
        self.publish_limits(&self.state.lock(), &params);
        self.dispatch();
    }

    /// End an overload pause now (an operator's decision: `POST /admin/budgets/{upstream}/resume`).
    /// Returns how much of the pause was left.
    fn resume(&self) -> Duration {
        let left = {
            let mut s = self.state.lock();
            let left = s.paused_until.map_or(Duration::ZERO, |p| p.saturating_duration_since(Instant::now()));
            s.paused_until = None;
            s.consecutive_overloads = 0;
            left
        };
        tracing::warn!(upstream = %self.upstream, left_ms = left.as_millis() as u64, "ERP budget pause ended by an operator");
        self.publish_pause();
        self.dispatch();
        left
    }

    /// The pause left, in seconds, on the gauge (called when metrics are scraped).
    fn publish_pause(&self) {
        let left = self
            .state
            .lock()
            .paused_until
            .map_or(0.0, |p| p.saturating_duration_since(Instant::now()).as_secs_f64());
        self.pause_gauge.set(left);
    }

    fn snapshot(&self) -> Snapshot {
        let params = self.params();
        let mut s = self.state.lock();
        let now = Instant::now();
        let horizon = params.window + params.window_margin;
        while s.admitted.front().is_some_and(|t| now.duration_since(*t) >= horizon) {
            s.admitted.pop_front();
        }
        Snapshot {
            upstream: self.upstream.clone(),
            paused_for_ms: s.paused_until.map_or(0, |p| p.saturating_duration_since(now).as_millis() as u64),
            in_flight: s.in_flight,
            max_concurrent: params.max_concurrent,
            effective_max_concurrent: Self::limits(&s, &params).0,
            effective_window_requests: Self::limits(&s, &params).1,
            adaptive: params.adaptive,
            queued: s.waiters.len(),
            queue: params.queue,
            admitted_in_window: s.admitted.len(),
            window_requests: params.window_requests,
            window_seconds: params.window.as_secs(),
            circuit: match s.circuit {
                Circuit::Closed { .. } => "closed",
                Circuit::HalfOpen { .. } => "half_open",
                Circuit::Open { .. } => "open",
            },
            max_pause_seconds: params.max_pause.as_secs(),
            max_share: params.max_share,
            pacing: if params.pacing.is_some() { "smooth" } else { "off" },
            pacing_interval_ms: params.pacing.map_or(0, |p| p.interval.as_millis() as u64),
            burst: params.pacing.map_or(0, |p| p.burst),
        }
    }

    fn in_flight(&self) -> u32 {
        self.state.lock().in_flight
    }

    fn acquire<'a>(&'a self, class: &'a Class, consumer: Option<&'a Arc<str>>) -> PermitFuture<'a> {
        Box::pin(self.acquire_permit(class, consumer))
    }

    fn upstream(&self) -> &str {
        &self.upstream
    }

    fn release(&self, lease: Lease) {
        self.release_lease(lease);
    }

    /// Report how the ERP answered a request made under a permit. Returns the pause an overload
    /// caused (the ERP's `Retry-After` or a backoff, capped at `max_pause`), zero otherwise.
    fn report(&self, outcome: Outcome) -> Duration {
        let params = self.params();
        let metrics = Metrics::global();
        let mut s = self.state.lock();
        let now = Instant::now();
        let mut applied = Duration::ZERO;
        let raised = self.adapt(&mut s, &params, &outcome, now);
        match outcome {
            Outcome::Success => {
                s.consecutive_overloads = 0;
                s.circuit = Circuit::Closed { failures: 0 };
            }
            Outcome::Overload(retry_after) => {
                let asked = retry_after.unwrap_or_else(|| {
                    backoff(params.backoff_initial, params.backoff_max, s.consecutive_overloads)
                });
                // An ERP's answer never stops traffic for longer than the operator allows.
                let pause = asked.min(params.max_pause);
                if pause < asked {
                    tracing::warn!(upstream = %self.upstream, asked_s = asked.as_secs(), max_pause_s = params.max_pause.as_secs(), "ERP asked for a pause longer than max_pause_seconds; capped");
                }
                s.consecutive_overloads = s.consecutive_overloads.saturating_add(1);
                let until = now.checked_add(pause).unwrap_or(now);
                if s.paused_until.is_none_or(|p| p < until) {
                    s.paused_until = Some(until);
                }
                applied = pause;
                let reason = if retry_after.is_some() { "retry_after" } else { "backoff" };
                metrics.erp_pauses.with_label_values(&[self.upstream.as_str(), reason]).inc();
                self.pause_gauge.set(pause.as_secs_f64());
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
        drop(s);
        if raised {
            // Waiters may fit under the raised limits now.
            self.dispatch();
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            max_pause: Duration::from_secs(300),
            max_share: 1.0,
            pacing: None,
            adaptive: false,
        }
    }

    fn class(name: &str, priority: u8, wait_ms: u64) -> Class {
        Class { name: name.into(), priority, max_wait: Duration::from_millis(wait_ms) }
    }

    /// `pacing: smooth` spaces admissions by window ÷ requests, waiters included, and lets
    /// `burst` go back to back after a quiet spell; the window's count is never exceeded.
    #[tokio::test(start_paused = true)]
    async fn smooth_pacing_spaces_admissions_evenly_with_a_burst_after_quiet() {
        let mut p = params(4, 10);
        p.window = Duration::from_secs(1);
        p.pacing = Some(Pacing { interval: Duration::from_millis(250), burst: 1 });
        let b = Budget::new("paced", p.clone());
        let c = class("i", 1, 5_000);
        let start = Instant::now();
        let mut waiting = Vec::new();
        for _ in 0..8 {
            let (b, c) = (b.clone(), c.clone());
            waiting.push(tokio::spawn(async move {
                let permit = b.acquire(&c, None).await.unwrap();
                drop(permit);
                Instant::now()
            }));
        }
        let mut at = Vec::new();
        for w in waiting {
            at.push(w.await.unwrap().duration_since(start).as_millis() as u64);
        }
        at.sort();
        // 4 per second, one every 250 ms: never two within an interval, never more than 4 in
        // any second.
        for pair in at.windows(2) {
            assert!(pair[1] - pair[0] >= 250, "admitted at {at:?}");
        }
        assert!(at[7] >= 1_750 && at[7] < 2_100, "eight requests take under 2.1 s: {at:?}");

        // A burst of 2 after a quiet spell: two at once, then paced again.
        p.pacing = Some(Pacing { interval: Duration::from_millis(250), burst: 2 });
        let b = Budget::new("burst", p);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = Instant::now();
        drop(b.acquire(&c, None).await.unwrap());
        drop(b.acquire(&c, None).await.unwrap());
        assert_eq!(t.elapsed(), Duration::ZERO, "the burst goes at once");
        drop(b.acquire(&c, None).await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(250), "then the pace: {:?}", t.elapsed());
        assert_eq!(b.snapshot().pacing, "smooth");
        assert_eq!(b.snapshot().pacing_interval_ms, 250);
    }

    /// A slot sent to a waiter that goes away before taking it (its client hung up) comes back.
    #[tokio::test(start_paused = true)]
    async fn a_slot_handed_to_a_waiter_that_left_is_given_back() {
        let b = Budget::new("handed", params(100, 1));
        let c = class("i", 1, 1_000);
        let held = b.acquire(&c, None).await.unwrap();
        let waiter = {
            let (b, c) = (b.clone(), c.clone());
            tokio::spawn(async move { b.acquire(&c, None).await.is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(b.snapshot().queued, 1);
        drop(held); // the slot is sent to the waiter...
        waiter.abort(); // ...which is gone before it runs
        let _ = waiter.await;
        assert_eq!(b.in_flight(), 0, "the untaken slot came back");
        let t = Instant::now();
        assert!(b.acquire(&c, None).await.is_ok());
        assert_eq!(t.elapsed(), Duration::ZERO, "and the next request takes it at once");
    }

    /// Background work (the delivery worker) queues behind a caller's request of any class:
    /// a background write waiting first still lets a caller's lookup through first.
    #[tokio::test(start_paused = true)]
    async fn a_callers_request_goes_before_background_work_of_any_class() {
        let b = Budget::new("callers-first", params(100, 1));
        let (write, lookup) = (class("write", 0, 5_000), class("interactive", 1, 5_000));
        let held = b.acquire(&lookup, None).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let background = {
            let (b, c, order) = (b.clone(), write.clone(), order.clone());
            tokio::spawn(in_background(async move {
                let _p = b.acquire(&c, None).await.unwrap();
                order.lock().push("background write");
            }))
        };
        tokio::task::yield_now().await;
        let caller = {
            let (b, c, order) = (b.clone(), lookup.clone(), order.clone());
            tokio::spawn(async move {
                let _p = b.acquire(&c, None).await.unwrap();
                order.lock().push("caller lookup");
            })
        };
        tokio::task::yield_now().await;
        drop(held);
        caller.await.unwrap();
        background.await.unwrap();
        assert_eq!(*order.lock(), vec!["caller lookup", "background write"]);
    }

    /// Answers without an overload while the budget's concurrency is all in use (the answers
    /// that may raise adaptive limits): permits are taken up to the limit in force, held.
    async fn busy_successes(b: &Arc<Budget>, held: &mut Vec<Permit>, n: usize) {
        let busy = class("busy", 0, 600_000);
        for _ in 0..n {
            while b.in_flight() < b.snapshot().effective_max_concurrent {
                held.push(b.acquire(&busy, None).await.unwrap());
            }
            b.report(Outcome::Success);
        }
    }

    /// Adaptive limits: an overload halves rate and concurrency once per pause; answers without
    /// one, while the limits hold requests back, win them back additively up to just below the
    /// limits that met the overload; those are probed again only after a steady spell, and the
    /// climb ends at the configured values. Answers under light load raise nothing.
    #[tokio::test(start_paused = true)]
    async fn adaptive_limits_halve_on_overload_and_recover_additively() {
        let mut p = params(80, 8);
        p.adaptive = true;
        let b = Budget::new("adaptive", p);
        let limits = |b: &Budget| {
            let s = b.snapshot();
            (s.effective_max_concurrent, s.effective_window_requests)
        };
        assert_eq!(limits(&b), (8, 80));
        b.report(Outcome::Overload(Some(Duration::from_millis(100))));
        assert_eq!(limits(&b), (4, 40));
        b.report(Outcome::Overload(Some(Duration::from_millis(100))));
        assert_eq!(limits(&b), (4, 40), "answers of the same push-back count once");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let c = class("i", 1, 1_000);
        let held: Vec<_> = take_permits(&b, &c, 4).await;
        assert!(
            matches!(b.acquire(&class("now", 1, 0), None).await, Err(Refusal::Busy { .. })),
            "only the effective concurrency is admitted"
        );
        drop(held);
        for _ in 0..100 {
            b.report(Outcome::Success);
        }
        assert_eq!(limits(&b), (4, 40), "answers under light load prove nothing");
        let mut held = Vec::new();
        busy_successes(&b, &mut held, 4).await;
        assert_eq!(limits(&b), (5, 48), "one step up after a round of good answers");
        busy_successes(&b, &mut held, 100).await;
        assert_eq!(limits(&b), (7, 79), "the climb stops just below the limits that met the overload");
        busy_successes(&b, &mut held, 79 * PROBE_AFTER_WINDOWS as usize).await;
        assert_eq!(limits(&b), (8, 80), "after a steady spell they are probed, never exceeded");
        busy_successes(&b, &mut held, 1000).await;
        assert_eq!(limits(&b), (8, 80));
        assert!(b.snapshot().adaptive);
    }

    /// When the ERP's real limit lies between two steps, an overload comes once per probe: the
    /// limits settle just under it instead of sawing up into it every round.
    #[tokio::test(start_paused = true)]
    async fn adaptive_limits_settle_below_a_hidden_limit_with_one_overload_per_probe() {
        let mut p = params(12, 6);
        p.window = Duration::from_secs(1);
        p.adaptive = true;
        let b = Budget::new("hidden-limit", p);
        let hidden = 5;
        let (mut good, mut overloads) = (0u32, 0u32);
        let mut seen = Vec::new();
        let mut held = Vec::new();
        for _ in 0..2_000 {
            let w = b.snapshot().effective_window_requests;
            seen.push(w);
            if w > hidden {
                overloads += 1;
                b.report(Outcome::Overload(Some(Duration::from_millis(10))));
                tokio::time::sleep(Duration::from_millis(20)).await;
            } else {
                good += 1;
                busy_successes(&b, &mut held, 1).await;
            }
        }
        let tail = &seen[200..];
        assert!(tail.iter().all(|w| (2..=hidden + 1).contains(w)), "settled: {:?}", &tail[..50]);
        assert!(tail.iter().filter(|w| **w == hidden).count() > tail.len() / 2, "mostly at the limit");
        let share = f64::from(overloads) / f64::from(good + overloads);
        assert!(share < 0.05, "{overloads} overloads in {} answers", good + overloads);
    }

    async fn take_permits(b: &Arc<Budget>, c: &Class, n: usize) -> Vec<Permit> {
        let mut permits = Vec::new();
        for _ in 0..n {
            permits.push(b.acquire(c, None).await.unwrap());
        }
        permits
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_cap_and_release_on_drop() {
        let b = Budget::new("t1", params(100, 2));
        let c = class("interactive", 1, 50);
        let p1 = b.acquire(&c, None).await.unwrap();
        let _p2 = b.acquire(&c, None).await.unwrap();
        assert!(
            matches!(b.acquire(&c, None).await, Err(Refusal::Busy { .. })),
            "third waits past its deadline"
        );
        drop(p1);
        assert!(b.acquire(&c, None).await.is_ok(), "a dropped permit frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn higher_class_goes_first() {
        let b = Budget::new("t2", params(100, 1));
        let held = b.acquire(&class("w", 0, 1000), None).await.unwrap();
        let bulk = {
            let b = b.clone();
            tokio::spawn(
                async move { b.acquire(&class("bulk", 2, 1000), None).await.map(|_| Instant::now()) },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let write = {
            let b = b.clone();
            tokio::spawn(
                async move { b.acquire(&class("write", 0, 1000), None).await.map(|_| Instant::now()) },
            )
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        let (w, k) = (write.await.unwrap().unwrap(), bulk.await.unwrap().unwrap());
        assert!(w <= k, "the write queued later but was admitted first");
    }

    #[tokio::test(start_paused = true)]
    async fn window_limits_and_overload_pauses() {
        let b = Budget::new("t3", params(3, 10));
        let c = class("i", 1, 1000);
        for _ in 0..3 {
            drop(b.acquire(&c, None).await.unwrap());
        }
        let t = Instant::now();
        drop(b.acquire(&c, None).await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(250), "the fourth waited for the window");
        b.report(Outcome::Overload(Some(Duration::from_millis(300))));
        let t = Instant::now();
        drop(b.acquire(&c, None).await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(280), "nothing admitted during the pause");
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_opens_then_probes() {
        let b = Budget::new("t4", params(100, 10));
        let c = class("i", 1, 10);
        b.report(Outcome::Failure);
        b.report(Outcome::Failure);
        assert!(matches!(b.acquire(&c, None).await, Err(Refusal::CircuitOpen { .. })));
        tokio::time::sleep(Duration::from_millis(220)).await;
        let probe = b.acquire(&c, None).await.expect("half-open lets one probe through");
        assert!(matches!(b.acquire(&c, None).await, Err(Refusal::CircuitOpen { .. })), "only one probe");
        b.report(Outcome::Success);
        drop(probe);
        assert!(b.acquire(&c, None).await.is_ok(), "closed again after a successful probe");
    }

    #[tokio::test(start_paused = true)]
    async fn an_erp_pause_is_capped_at_max_pause_and_an_operator_can_end_it() {
        let mut p = params(100, 10);
        p.max_pause = Duration::from_millis(200);
        let b = Budget::new("t5", p);
        let c = class("i", 1, 2000);
        for asked in [Duration::from_secs(315_360_000), Duration::from_secs(u64::MAX), Duration::MAX] {
            let applied = b.report(Outcome::Overload(Some(asked)));
            assert_eq!(applied, Duration::from_millis(200), "ten years or u64::MAX: capped, no overflow");
        }
        assert!(b.snapshot().paused_for_ms <= 200);
        let t = Instant::now();
        drop(b.acquire(&c, None).await.unwrap());
        assert!(t.elapsed() < Duration::from_millis(400), "admitted after the capped pause");

        b.report(Outcome::Overload(Some(Duration::from_secs(3600))));
        assert!(b.snapshot().paused_for_ms > 0);
        assert!(b.resume() > Duration::ZERO);
        assert_eq!(b.snapshot().paused_for_ms, 0);
        let t = Instant::now();
        drop(b.acquire(&c, None).await.unwrap());
        assert!(t.elapsed() < Duration::from_millis(50), "resumed at once");
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_max_pause_shortens_a_running_pause() {
        let b = Budget::new("t6", params(100, 10));
        b.report(Outcome::Overload(Some(Duration::from_secs(250))));
        let mut p = params(100, 10);
        p.max_pause = Duration::from_millis(30);
        b.set_params(p);
        assert!(b.snapshot().paused_for_ms <= 30);
    }

    #[tokio::test(start_paused = true)]
    async fn one_consumer_holds_at_most_its_share() {
        let mut p = params(100, 4);
        p.max_share = 0.5;
        let b = Budget::new("t7", p);
        let c = class("i", 1, 30);
        let (hog, other): (Arc<str>, Arc<str>) = ("keys/hog".into(), "keys/other".into());
        let _a = b.acquire(&c, Some(&hog)).await.unwrap();
        let _b = b.acquire(&c, Some(&hog)).await.unwrap();
        assert!(
            matches!(b.acquire(&c, Some(&hog)).await, Err(Refusal::Busy { .. })),
            "a third permit would be more than half of 4"
        );
        let _c = b.acquire(&c, Some(&other)).await.expect("another consumer still gets in");
        let _d = b.acquire(&c, None).await.expect("traffic of no consumer is not capped");

        // Window share: 2 of 4 per window.
        let mut p = params(4, 10);
        p.max_share = 0.5;
        p.window = Duration::from_secs(60);
        let b = Budget::new("t8", p);
        drop(b.acquire(&c, Some(&hog)).await.unwrap());
        drop(b.acquire(&c, Some(&hog)).await.unwrap());
        assert!(matches!(b.acquire(&c, Some(&hog)).await, Err(Refusal::Busy { .. })));
        drop(b.acquire(&c, Some(&other)).await.expect("the other half of the window"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_over_its_share_does_not_block_the_queue() {
        let mut p = params(100, 2);
        p.max_share = 0.5;
        let b = Budget::new("t9", p);
        let long = class("i", 1, 1000);
        let (hog, other): (Arc<str>, Arc<str>) = ("k/hog".into(), "k/other".into());
        let first = b.acquire(&long, Some(&hog)).await.unwrap();
        let occupant = b.acquire(&long, Some(&other)).await.unwrap();
        // The hog queues behind the full budget; then a slot of `other` frees... for `other`.
        let queued_hog = {
            let (b, l, h) = (b.clone(), long.clone(), hog.clone());
            tokio::spawn(async move { b.acquire(&l, Some(&h)).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let queued_other = {
            let (b, l, o) = (b.clone(), long.clone(), other.clone());
            tokio::spawn(async move { b.acquire(&l, Some(&o)).await.map(|_| Instant::now()) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(occupant);
        let admitted = tokio::time::timeout(Duration::from_millis(200), queued_other).await;
        assert!(admitted.is_ok(), "the hog, over its share, did not hold up the other consumer");
        drop(first);
        assert!(queued_hog.await.unwrap(), "and the hog gets its turn once under its share");
    }

    #[test]
    fn one_judge_for_every_answer_with_vendor_signals() {
        let signals = vec![(400, Some("SSS_REQUEST_LIMIT_EXCEEDED".to_string())), (509, None)];
        assert_eq!(judge(429, Some(b"7"), &signals).0, Outcome::Overload(Some(Duration::from_secs(7))));
        assert_eq!(judge(503, None, &signals).0, Outcome::Overload(None));
        assert_eq!(judge(509, None, &signals).0, Outcome::Overload(None), "a vendor status");
        assert_eq!(judge(500, None, &signals), (Outcome::Failure, vec![]));
        assert_eq!(judge(200, None, &signals), (Outcome::Success, vec![]));
        let (outcome, markers) = judge(400, None, &signals);
        assert_eq!(outcome, Outcome::Success);
        assert!(body_signals_overload(&markers, br#"{"error":{"code":"SSS_REQUEST_LIMIT_EXCEEDED"}}"#));
        assert!(!body_signals_overload(&markers, br#"{"error":{"code":"INVALID_FLD_VALUE"}}"#));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("1.5"), None);
        assert_eq!(parse_retry_after("18446744073709551616"), None, "beyond u64: no pause value");
        assert_eq!(parse_retry_after("18446744073709551615"), Some(Duration::from_secs(u64::MAX)));
    }
}
