//! The priority queue: requests that the budget cannot admit now wait, best class first (then
//! arrival), each up to its class's deadline; slots freed by releases, the window or a pause's
//! end are handed to them in that order.

use super::{queue_priority, Budget, Circuit, Class, ErpBudget, Lease, Permit, Refusal};
use crate::observe::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
// tokio's clock: tests pause and advance it (`start_paused`) instead of sleeping.
use tokio::time::Instant;

/// A waiter's place in the queue: class priority, then arrival.
pub(super) type WaitKey = (u8, u64);

pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<()>,
    pub(super) consumer: Option<Arc<str>>,
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
    pub(super) async fn acquire_permit(
        &self,
        class: &Class,
        consumer: Option<&Arc<str>>,
    ) -> Result<Permit, Refusal> {
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

    pub(super) fn release_lease(&self, Lease { probe, consumer, .. }: Lease) {
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
    pub(super) fn dispatch(&self) {
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
        // The queue-depth gauge was resolved when the budget was built: no label lookup here.
        self.queue_gauge.set(s.waiters.len() as i64);
        self.publish(&s);
        self.arm_timer(&mut s, &params, now);
    }

    /// Give back a permit that was never used (a later stage refused it), with its place in
    /// the window, so a refusal elsewhere does not spend this budget.
    pub fn release_unused(&self, lease: Lease) {
        self.state.lock().admitted.pop_back();
        self.release_lease(lease);
    }
}
