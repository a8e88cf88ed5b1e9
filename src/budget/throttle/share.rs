//! Per-consumer shares: with `max_share` below 1, one consumer holds at most that share of the
//! window and of the concurrency, so it cannot starve the others.

use super::{Budget, BudgetParams, State};
use std::collections::VecDeque;
use std::sync::Arc;
// tokio's clock: tests pause and advance it (`start_paused`) instead of sleeping.
use tokio::time::Instant;

/// One consumer's use of the budget (tracked only when shares are on).
#[derive(Default)]
pub(super) struct ConsumerUse {
    pub(super) in_flight: u32,
    pub(super) admitted: VecDeque<Instant>,
}

impl Budget {
    /// Whether `consumer` is under its share (always, when shares are off or it is nobody's).
    pub(super) fn consumer_may(
        s: &mut State,
        p: &BudgetParams,
        now: Instant,
        consumer: Option<&Arc<str>>,
    ) -> bool {
        let (Some((max_in_flight, max_window)), Some(c)) = (p.consumer_caps(), consumer) else { return true };
        let Some(used) = s.consumers.get_mut(c) else { return true };
        let horizon = p.window + p.window_margin;
        while used.admitted.front().is_some_and(|t| now.duration_since(*t) >= horizon) {
            used.admitted.pop_front();
        }
        used.in_flight < max_in_flight && used.admitted.len() < max_window
    }
}
