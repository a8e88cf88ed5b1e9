//! One delivery attempt of a leased order: the rules on fresh master data when they have not
//! run, then the create through the ERP port. What each step leads to is decided by the pure
//! state machine in [`decision`]; this module runs the steps and records the decisions.

pub mod decision;

use super::adapter::AdapterError;
use super::metrics::ProcessMetrics;
use super::model::Quote;
use super::service::{end_erp_span, QuoteToOrder};
use super::state::State;
use super::store::{Change, OrderRecord, OrderStore, StoreError};
use decision::{Heard, Outcome};

use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

impl QuoteToOrder {
    /// One delivery attempt of a leased order. `caller` is set while a caller waits for the
    /// outcome: a refusal is then theirs to fix (`rejected`); with nobody waiting it becomes a
    /// dead letter for an operator.
    pub(super) async fn deliver(
        &self,
        order: OrderRecord,
        caller: Option<&AtomicBool>,
    ) -> Result<Heard, StoreError> {
        let store = self.store().await?;
        let at = |state: State| decision::Order {
            state,
            leased_in: order.state,
            attempts: order.attempts,
            caller_waits: caller.is_some_and(|c| c.load(Ordering::Acquire)),
        };
        let Ok(quote) = serde_json::from_str::<Quote>(&order.quote) else {
            let (_, heard) =
                self.record(store, &order, at(order.state), Outcome::QuoteUnreadable, "").await?;
            return Ok(heard);
        };
        // Each step ends well within the order's lease, so no other deliverer can take the
        // order over while this one may still be talking to the ERP.
        let step_limit = self.settings.lease / 2;
        let mut state = order.state;
        if !order.validated {
            let deadline = tokio::time::Instant::now() + step_limit;
            let outcome = self.validate(&quote, &order.traceparent, &order.id, deadline).await;
            let validated = outcome == Outcome::Validated;
            let (moved, heard) = self.record(store, &order, at(state), outcome, &quote.region).await?;
            if !validated || !moved {
                return Ok(if validated { Heard::State(state) } else { heard });
            }
            state = State::Validated;
        }
        let attempt = order.attempts + 1;
        let reason = format!("delivery attempt {attempt}");
        let change = Change { reason: &reason, count_attempt: true, keep_lease: true, ..Default::default() };
        if !self.transition(store, &order.id, state, State::Submitted, change).await? {
            return Ok(Heard::State(state));
        }
        let customer = quote.customer.number.clone().unwrap_or_default();
        let sales_order = quote.to_sales_order(&customer);
        let mut span = self.erp_span(&order.traceparent, "erp create order", &order.id);
        span.attr("causeway.attempt", attempt);
        let created = tokio::time::timeout(step_limit, self.adapter.create_order_once(&sales_order)).await;
        let outcome = match created {
            Ok(Ok(erp)) => {
                span.attr("causeway.erp_order_number", erp.number.clone());
                span.succeed();
                Outcome::Created { id: erp.id, number: erp.number }
            }
            Ok(Err(AdapterError::Throttled(why))) => {
                span.attr("causeway.erp_outcome", "throttled");
                Outcome::ErpAskedToWait(why)
            }
            Ok(Err(AdapterError::Rejected { status, message })) => {
                span.fail(format!("ERP rejected the request ({status}): {message}"));
                Outcome::ErpRefused { status, message }
            }
            Ok(Err(e)) => {
                span.fail(e.to_string());
                Outcome::ErpFailed(e.to_string())
            }
            // Cut off mid-exchange: the ERP may still be creating it. The next attempt finds
            // it, once that request can no longer be under way.
            Err(_) => {
                span.fail("the attempt took longer than half the delivery lease");
                Outcome::CutOff
            }
        };
        span.end();
        let (_, heard) = self.record(store, &order, at(State::Submitted), outcome, &quote.region).await?;
        Ok(heard)
    }

    /// Master data for `quote` (within `deadline`, in a span of the order's trace), then the
    /// rules on it: the first step of a delivery, and of a submission while the caller waits.
    pub(super) async fn validate(
        &self,
        quote: &Quote,
        traceparent: &str,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        let span = self.erp_span(traceparent, "erp master data", id);
        let master = tokio::time::timeout_at(deadline, self.adapter.master_data(quote))
            .await
            .unwrap_or_else(|_| Err(AdapterError::Unavailable("master data lookup timed out".into())));
        end_erp_span(span, &master);
        match master {
            Err(AdapterError::Throttled(why)) => Outcome::ErpAskedToWait(why),
            // A failed lookup is an attempt like any: it counts toward max_attempts and backs off.
            Err(e) => Outcome::ErpFailed(e.to_string()),
            Ok(master) => match self.config.load().process_rules.as_ref() {
                None => Outcome::NoRules,
                Some(rules) => {
                    let breaches = rules.validate(quote, &master);
                    if breaches.is_empty() {
                        Outcome::Validated
                    } else {
                        Outcome::RulesRefused(breaches)
                    }
                }
            },
        }
    }

    /// Record what `outcome` leads to for `order` (standing `at`), and count it once recorded.
    /// Returns whether the order moved, and what a waiting caller hears.
    async fn record(
        &self,
        store: &dyn OrderStore,
        order: &OrderRecord,
        at: decision::Order,
        outcome: Outcome,
        region: &str,
    ) -> Result<(bool, Heard), StoreError> {
        let asked_to_wait = matches!(outcome, Outcome::ErpAskedToWait(_));
        let Some(next) = decision::decide(at, outcome, &self.decision_settings(store, asked_to_wait)) else {
            return Ok((false, Heard::State(at.state)));
        };
        let change = Change {
            reason: &next.reason,
            erp_order: next.erp_order.as_ref().map(|(id, number)| (id.as_str(), number.as_str())),
            validated: next.validated,
            violations: next.violations.as_deref(),
            next_attempt_at: next.next_attempt_at,
            count_attempt: next.count_attempt,
            uncount_attempt: next.uncount_attempt,
            reset_attempts: false,
            keep_lease: next.keep_lease,
        };
        let moved = self.transition(store, &order.id, at.state, next.to, change).await?;
        if moved {
            self.count(&next.effects, region);
            if next.effects.accepted {
                let seconds = (store.now() - order.received_at).max(0) as f64 / 1000.0;
                ProcessMetrics::global()
                    .accept_latency
                    .with_label_values(&[self.settings.erp.as_str()])
                    .observe(seconds);
                // Only orders validated late (a replay, or master data unreachable at
                // submission) can have been dead letters: the others cost no history read.
                if !order.validated {
                    self.note_resolution(store, &order.id).await;
                }
            }
        }
        Ok((moved, next.effects.heard.unwrap_or(Heard::State(next.to))))
    }

    /// The settings a decision is taken with, now. The ERP budget's pause is read only when the
    /// ERP asked to wait (the next attempt waits it out).
    pub(super) fn decision_settings(
        &self,
        store: &dyn OrderStore,
        asked_to_wait: bool,
    ) -> decision::Settings {
        let paused = if asked_to_wait {
            self.config
                .load()
                .upstreams
                .get(&self.settings.erp)
                .and_then(|u| u.budget.as_ref())
                .map_or(Duration::ZERO, |b| Duration::from_millis(b.budget.snapshot().paused_for_ms))
        } else {
            Duration::ZERO
        };
        decision::Settings {
            max_attempts: self.settings.max_attempts,
            backoff_initial: self.settings.backoff_initial,
            backoff_max: self.settings.backoff_max,
            settle: self.settle,
            paused,
            now: store.now(),
            jitter: rand::rng().random_range(0.0..=1.0),
        }
    }
}
