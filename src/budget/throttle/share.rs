//! Per-consumer shares: with `max_share` below 1, while other consumers wait for the budget, one
//! consumer holds at most that share of the window and of the concurrency, so it cannot starve
//! them. The share is work-conserving: capacity nobody else is waiting for goes to whoever asks,
//! so a consumer alone spends the whole budget, and a newcomer gets the next slot that frees
//! (within one pacing interval when pacing is on) because the consumer over its share waits.

use super::{Budget, BudgetParams, Holder, State, HOLDERS_SHOWN};
use std::collections::{HashMap, VecDeque};
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
    /// Whether `consumer` may take a slot now as far as shares go: when it is under its share
    /// (always, when shares are off or it is nobody's), or over it while no other consumer
    /// (nor traffic of no consumer) waits for this budget.
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
        if used.in_flight < max_in_flight && used.admitted.len() < max_window {
            return true;
        }
        !s.waiters.values().any(|w| w.consumer.as_ref() != Some(c))
    }

    /// Who holds what (tracked when shares are on): each consumer with requests in flight, in
    /// the window or waiting, most first, at most [`HOLDERS_SHOWN`].
    pub(super) fn holders(s: &mut State, p: &BudgetParams, now: Instant) -> Vec<Holder> {
        let mut waiting: HashMap<Arc<str>, usize> = HashMap::new();
        for consumer in s.waiters.values().filter_map(|w| w.consumer.as_ref()) {
            *waiting.entry(consumer.clone()).or_default() += 1;
        }
        let horizon = p.window + p.window_margin;
        let mut holders: Vec<Holder> = Vec::new();
        for (consumer, used) in s.consumers.iter_mut() {
            while used.admitted.front().is_some_and(|t| now.duration_since(*t) >= horizon) {
                used.admitted.pop_front();
            }
            holders.push(Holder {
                consumer: consumer.to_string(),
                in_flight: used.in_flight,
                admitted_in_window: used.admitted.len(),
                waiting: waiting.remove(consumer).unwrap_or(0),
            });
        }
        holders.extend(waiting.into_iter().map(|(consumer, waiting)| Holder {
            consumer: consumer.to_string(),
            in_flight: 0,
            admitted_in_window: 0,
            waiting,
        }));
        holders.retain(|h| h.in_flight > 0 || h.admitted_in_window > 0 || h.waiting > 0);
        holders.sort_by(|a, b| {
            (b.in_flight, b.admitted_in_window, b.waiting)
                .cmp(&(a.in_flight, a.admitted_in_window, a.waiting))
                .then_with(|| a.consumer.cmp(&b.consumer))
        });
        holders.truncate(HOLDERS_SHOWN);
        holders
    }
}
