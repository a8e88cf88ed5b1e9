//! The adaptive limit: an overload signal halves the budget's limits in force; answers while
//! the limits hold requests back raise them step by step, back to just below the limits that last
//! met an overload, and probe those again only after a steady spell.

use super::{Budget, State, PROBE_AFTER_WINDOWS};
use crate::budget::{BudgetParams, Outcome};
use tokio::time::Instant;

impl Budget {
    /// The adaptive limits after an answer (multiplicative decrease, additive increase): halved
    /// on overload, once per pause; one step back up per round of good answers (the concurrency
    /// in force, or a tenth of the window, whichever is more). The climb stops just below the
    /// limits that met the last overload and probes them again only after
    /// [`PROBE_AFTER_WINDOWS`] windows' worth of good answers, so an ERP with a hard limit
    /// between two steps refuses one request per probe, not one per round. Only answers given
    /// while the limits hold requests back (waiters queued, or the concurrency all in use) count:
    /// light traffic proves nothing about a higher limit. Returns whether the limits rose.
    pub(super) fn adapt(&self, s: &mut State, p: &BudgetParams, outcome: &Outcome, now: Instant) -> bool {
        if !p.adaptive {
            return false;
        }
        let (c, w) = Self::limits(s, p);
        match outcome {
            // Requests in flight when the ERP first pushed back answer the same: one decrease
            // per pause, not one per answer.
            Outcome::Overload(_) if s.paused_until.is_some_and(|t| t > now) => {}
            Outcome::Overload(_) => {
                s.good_answers = 0;
                s.steady = 0;
                s.ceiling = Some((c, w));
                s.effective = Some(((c / 2).max(1), (w / 2).max(1)));
                tracing::warn!(upstream = %self.upstream, max_concurrent = (c / 2).max(1), window_requests = (w / 2).max(1), "adaptive ERP limit lowered after an overload signal");
            }
            Outcome::Success if s.effective.is_some() && (!s.waiters.is_empty() || s.in_flight >= c) => {
                s.good_answers += 1;
                s.steady = s.steady.saturating_add(1);
                if s.good_answers < c.max(w / 10).max(1) {
                    return false;
                }
                s.good_answers = 0;
                let step = (p.window_requests / 10).max(1);
                let mut up = ((c + 1).min(p.max_concurrent), w.saturating_add(step).min(p.window_requests));
                if let Some((ceiling_c, ceiling_w)) = s.ceiling {
                    if s.steady >= w.saturating_mul(PROBE_AFTER_WINDOWS) {
                        // Steady long enough: try the limits that failed last time (and beyond).
                        s.ceiling = None;
                    } else {
                        up = (
                            up.0.min(ceiling_c.saturating_sub(1)).max(c),
                            up.1.min(ceiling_w.saturating_sub(1)).max(w),
                        );
                    }
                }
                if up == (p.max_concurrent, p.window_requests) {
                    s.effective = None;
                    s.ceiling = None;
                } else {
                    s.effective = Some(up);
                }
            }
            _ => {}
        }
        self.publish_limits(s, p);
        let (now_c, now_w) = Self::limits(s, p);
        now_c > c || now_w > w
    }

    pub(super) fn publish_limits(&self, s: &State, p: &BudgetParams) {
        let (c, w) = Self::limits(s, p);
        self.concurrency_limit_gauge.set(i64::from(c));
        self.window_limit_gauge.set(i64::from(w));
    }
}
