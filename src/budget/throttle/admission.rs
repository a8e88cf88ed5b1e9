//! Admission by the window, the concurrency cap and pacing: whether a request may go now, the
//! accounting of one that goes, and when time next frees a slot.

use super::{Budget, BudgetParams, State};
use std::sync::Arc;
use std::time::Duration;
// tokio's clock: tests pause and advance it (`start_paused`) instead of sleeping.
use tokio::time::Instant;

impl Budget {
    pub(super) fn can_admit(s: &mut State, p: &BudgetParams, now: Instant) -> bool {
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
    pub(super) fn limits(s: &State, p: &BudgetParams) -> (u32, u32) {
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
    pub(super) fn paced_from(s: &State, p: &BudgetParams) -> Option<Instant> {
        let pacing = p.pacing?;
        let tat = s.paced_at?;
        let burst_ahead = Self::pace_interval(s, p)?.saturating_mul(pacing.burst.saturating_sub(1));
        Some(tat.checked_sub(burst_ahead).unwrap_or(tat))
    }

    pub(super) fn account(s: &mut State, now: Instant, consumer: Option<&Arc<str>>, p: &BudgetParams) {
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

    pub(super) fn unaccount(s: &mut State, consumer: Option<&Arc<str>>, p: &BudgetParams) {
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
    pub(super) fn next_slot(s: &State, p: &BudgetParams, now: Instant) -> Duration {
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
    pub(super) fn arm_timer(&self, s: &mut State, p: &BudgetParams, now: Instant) {
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
}
