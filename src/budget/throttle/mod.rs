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

use crate::observe::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;
// tokio's clock: tests pause and advance it (`start_paused`) instead of sleeping.
use tokio::time::Instant;

mod adaptive;
mod admission;
mod pause;
mod queue;
mod share;

use pause::Circuit;
use queue::{WaitKey, Waiter};
use share::ConsumerUse;

/// How many windows' worth of good answers the adaptive limits wait, just below the limits
/// that last met an overload, before probing them again.
pub const PROBE_AFTER_WINDOWS: u32 = 8;

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

    fn publish(&self, s: &State) {
        self.in_flight_gauge.set(i64::from(s.in_flight));
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
        self.end_pause()
    }

    /// The pause left, in seconds, on the gauge (called when metrics are scraped).
    fn publish_pause(&self) {
        self.publish_pause_left();
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
            holders: Self::holders(&mut s, &params, now),
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
        self.judge(outcome)
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
    async fn a_consumer_alone_spends_the_whole_budget_and_holds_its_share_while_another_waits() {
        let mut p = params(100, 4);
        p.max_share = 0.5;
        let b = Budget::new("t7", p);
        let c = class("i", 1, 1000);
        let (hog, other): (Arc<str>, Arc<str>) = ("keys/hog".into(), "keys/other".into());
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(b.acquire(&c, Some(&hog)).await.expect("idle capacity goes to whoever asks"));
        }
        let waiting_other = {
            let (b, c, o) = (b.clone(), c.clone(), other.clone());
            tokio::spawn(async move { b.acquire(&c, Some(&o)).await.map(|p| (p, Instant::now())) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let hog_again = {
            let (b, c, h) = (b.clone(), c.clone(), hog.clone());
            tokio::spawn(async move { b.acquire(&c, Some(&h)).await.map(|p| (p, Instant::now())) })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        held.pop();
        let (other_permit, other_at) =
            waiting_other.await.unwrap().expect("the newcomer gets the slot that freed");
        assert!(!hog_again.is_finished(), "the hog, over its share while another waited, did not overtake");
        let holders = b.snapshot().holders;
        assert_eq!(
            holders,
            [
                Holder { consumer: "keys/hog".into(), in_flight: 3, admitted_in_window: 4, waiting: 1 },
                Holder { consumer: "keys/other".into(), in_flight: 1, admitted_in_window: 1, waiting: 0 },
            ],
            "GET /admin/budgets shows who holds what"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        held.pop();
        let (_hog_permit, hog_at) = hog_again.await.unwrap().expect("nobody else waits: the hog goes again");
        assert!(other_at < hog_at);
        drop(other_permit);
        let _d = b.acquire(&c, None).await.expect("traffic of no consumer is not capped");

        // The window the same way: alone, all 4 of the window; then the newcomer's turn comes
        // first when it slides.
        let mut p = params(4, 10);
        p.max_share = 0.5;
        p.window = Duration::from_secs(60);
        let b = Budget::new("t8", p);
        for _ in 0..4 {
            drop(b.acquire(&c, Some(&hog)).await.expect("the whole window while alone"));
        }
        assert!(matches!(b.acquire(&c, Some(&hog)).await, Err(Refusal::Busy { .. })), "the window is spent");
    }

    /// Two consumers that keep asking: each gets at least its share of the concurrency.
    #[tokio::test(start_paused = true)]
    async fn two_consumers_competing_each_get_at_least_their_share() {
        let mut p = params(100_000, 4);
        p.max_share = 0.5;
        p.window = Duration::from_secs(60);
        let b = Budget::new("t10", p);
        let c = class("i", 1, 60_000);
        let counts: Arc<Mutex<HashMap<&'static str, u32>>> = Arc::default();
        let until = Instant::now() + Duration::from_secs(10);
        let mut tasks = Vec::new();
        for (name, clients) in [("a", 12), ("b", 3)] {
            for _ in 0..clients {
                let (b, c, counts) = (b.clone(), c.clone(), counts.clone());
                let consumer: Arc<str> = name.into();
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let permit = b.acquire(&c, Some(&consumer)).await.unwrap();
                        *counts.lock().entry(name).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        drop(permit);
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let counts = counts.lock().clone();
        let (a, bb) = (counts["a"], counts["b"]);
        // 4 at once for 10 s of 100 ms requests: 400 slots; half of them is each one's share.
        assert!(a + bb >= 396, "the budget was kept busy: {counts:?}");
        assert!(bb >= 196, "b, with 3 clients against a's 12, got at least its half: {counts:?}");
        assert!(a >= 196, "{counts:?}");
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
