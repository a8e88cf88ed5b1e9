//! Overload pauses and the circuit breaker: the ERP's overload signals pause the whole budget
//! (its `Retry-After` or a backoff, at most `max_pause`, which an operator can end); consecutive
//! failures open the circuit, which probes half-open.

use super::{Budget, ErpBudget, Outcome, State};
use crate::clock::backoff;
use crate::observe::metrics::Metrics;
use std::time::Duration;
// tokio's clock: tests pause and advance it (`start_paused`) instead of sleeping.
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

impl Budget {
    pub(super) fn publish_circuit(&self, s: &State) {
        let current = match s.circuit {
            Circuit::Closed { .. } => 0,
            Circuit::HalfOpen { .. } => 1,
            Circuit::Open { .. } => 2,
        };
        for (i, gauge) in self.circuit_gauges.iter().enumerate() {
            gauge.set(i64::from(i == current));
        }
    }

    /// End an overload pause now; how much of it was left.
    pub(super) fn end_pause(&self) -> Duration {
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
    pub(super) fn publish_pause_left(&self) {
        let left = self
            .state
            .lock()
            .paused_until
            .map_or(0.0, |p| p.saturating_duration_since(Instant::now()).as_secs_f64());
        self.pause_gauge.set(left);
    }

    /// Report how the ERP answered a request made under a permit. Returns the pause an overload
    /// caused (the ERP's `Retry-After` or a backoff, capped at `max_pause`), zero otherwise.
    pub(super) fn judge(&self, outcome: Outcome) -> Duration {
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
