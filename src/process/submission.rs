//! A caller's `POST /process/v1/quote-to-order`: the idempotency key, the quote, one live order
//! per opportunity, the rules on master data within the caller's wait, the durable record, and
//! the first delivery attempt while the caller waits (a 202 when it takes longer).

use super::delivery::decision::{self, Heard, Outcome};
use super::idempotency;
use super::intake;
use super::metrics::ProcessMetrics;
use super::model::Quote;
use super::service::{Caller, QuoteToOrder, Reply};
use super::state::State;
use super::store::{KeyState, NewOrder, OrderRecord, OrderStore};
use crate::budget::throttle;
use crate::error::{GatewayError, RuleBreach};

use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Of a caller's `inline_wait`, what is kept at the end for recording the answer after the
/// ERP wait is cut off: the caller hears back within `inline_wait`, not just after it.
const RECORDING_RESERVE: Duration = Duration::from_millis(50);

impl QuoteToOrder {
    /// Handle `POST /process/v1/quote-to-order`. Keys, the opportunity's order and the quota
    /// belong to `caller`. A panic anywhere in here is a 500 problem with the key released,
    /// never a dropped connection with the key left in flight.
    pub async fn submit(
        self: &Arc<Self>,
        key_header: Option<&[u8]>,
        caller: &Caller,
        body: &[u8],
        correlation_id: &str,
        traceparent: &str,
    ) -> Result<Reply, GatewayError> {
        // The caller's whole wait, lookups and the first delivery attempt included; the last
        // moments of it are kept for recording the answer (the order read back, the key's reply).
        let reserve = RECORDING_RESERVE.min(self.settings.inline_wait / 10);
        let deadline = tokio::time::Instant::now() + self.settings.inline_wait - reserve;
        let key = match key_header {
            None => return Err(GatewayError::IdempotencyKeyMissing),
            Some(h) => {
                idempotency::parse_key(h).map_err(|detail| GatewayError::IdempotencyKeyInvalid { detail })?
            }
        };
        let document: Value = serde_json::from_slice(body).map_err(|e| GatewayError::InvalidJson {
            detail: format!("line {}, column {}: {e}", e.line(), e.column()),
        })?;
        let fingerprint = idempotency::fingerprint(&document);
        let quote = crate::error::contain_panic(correlation_id, self.to_quote(document)).await?;
        let store = self.store().await?;
        let scoped_key = format!("{}\n{key}", caller.owner);
        match store.claim_key(&scoped_key, &fingerprint, self.settings.key_ttl).await? {
            KeyState::Claimed => {}
            KeyState::InFlight => return Err(GatewayError::IdempotencyKeyInFlight),
            KeyState::Mismatch => return Err(GatewayError::IdempotencyKeyReused),
            KeyState::Done { status, location, body } => {
                ProcessMetrics::global().duplicates_prevented.with_label_values(&["idempotency_key"]).inc();
                return Ok(Reply { status, location, body, replayed: true });
            }
        }
        let owner: Arc<str> = Arc::from(caller.owner.as_str());
        let origin = (correlation_id, traceparent);
        let claimed = self.submit_claimed(store, quote, &caller.owner, origin, deadline);
        let outcome =
            crate::error::contain_panic(correlation_id, throttle::on_behalf_of(owner, claimed)).await;
        // Only answers that stand are kept for replay; a refusal or a failure releases the key
        // so the caller can fix the quote or retry with the same key.
        let kept = match &outcome {
            Ok(reply) => {
                let stored = store
                    .complete_key(&scoped_key, reply.status, reply.location.as_deref(), &reply.body)
                    .await;
                stored.map_err(|e| tracing::warn!(error = %e, "cannot store a response for replay")).is_ok()
            }
            Err(_) => false,
        };
        if !kept {
            // The caller hears the outcome either way. A key that cannot be kept is freed: a
            // retry then finds the order by its opportunity. One that cannot be freed either
            // (the store is away) is freed once the store answers again.
            if let Err(e) = store.release_key(&scoped_key).await {
                tracing::warn!(error = %e, "cannot release an idempotency key yet; retrying in the background");
                self.release_when_possible(scoped_key);
            }
        }
        outcome
    }

    /// The body as a canonical quote ([`intake::to_quote`]) on the current configuration.
    async fn to_quote(&self, document: Value) -> Result<Quote, GatewayError> {
        let config = self.config.load();
        intake::to_quote(&config.policies, self.settings.max_lines, document).await
    }

    async fn submit_claimed(
        self: &Arc<Self>,
        store: &dyn OrderStore,
        quote: Quote,
        owner: &str,
        (correlation_id, traceparent): (&str, &str),
        deadline: tokio::time::Instant,
    ) -> Result<Reply, GatewayError> {
        let metrics = ProcessMetrics::global();
        if let Some(existing) = store.live_order_for(&quote.opportunity_id).await? {
            return self.existing_order(store, existing, owner).await;
        }
        let quote_text = serde_json::to_string(&quote).map_err(|_| GatewayError::Internal)?;
        let id = uuid::Uuid::now_v7().to_string();
        let new_order = |state, validated, reason, lease| NewOrder {
            id: &id,
            owner,
            opportunity_id: &quote.opportunity_id,
            state,
            quote: "",
            validated,
            violations: None,
            correlation_id,
            traceparent,
            reason,
            lease,
        };
        // Master data comes out of the caller's `inline_wait` too; a slow ERP means the rules
        // run later, in the worker.
        let (state, validated, reason) = match self.validate(&quote, traceparent, &id, deadline).await {
            Outcome::Validated => (State::Validated, true, "quote validated".to_string()),
            Outcome::RulesRefused(breaches) => {
                let order = NewOrder { quote: &quote_text, ..new_order(State::Rejected, false, "", None) };
                return self.refuse(store, order, &quote.region, breaches).await;
            }
            Outcome::NoRules => return Err(GatewayError::Internal),
            unreachable => {
                let why = match unreachable {
                    Outcome::ErpAskedToWait(why) => format!("ERP asked to wait: {why}"),
                    Outcome::ErpFailed(e) => e,
                    _ => String::new(),
                };
                tracing::info!(error = %why, opportunity = %quote.opportunity_id, "master data unavailable; order accepted as pending");
                let why: String = why.chars().take(300).collect();
                (
                    State::Received,
                    false,
                    format!("received; the ERP's master data is unreachable ({why}), validation deferred"),
                )
            }
        };
        let lease = validated.then_some(self.settings.lease);
        let inserted = store
            .insert_order(NewOrder { quote: &quote_text, ..new_order(state, validated, &reason, lease) })
            .await
            .inspect_err(|_| {
                if lease.is_some() {
                    self.free_lease_when_possible(id.clone());
                }
            })?;
        self.moved.notify_one();
        let Some(record) = inserted else {
            // Another key for the same opportunity won the race.
            let existing =
                store.live_order_for(&quote.opportunity_id).await?.ok_or(GatewayError::Internal)?;
            return self.existing_order(store, existing, owner).await;
        };
        if !validated {
            metrics.orders.with_label_values(&["pending"]).inc();
            self.wake.notify_one();
            return self.reply(store, &record, 202).await;
        }
        // Deliver now, but answer within the bound: the attempt goes on after a 202.
        let waiting = Arc::new(AtomicBool::new(true));
        let this = self.clone();
        let flag = waiting.clone();
        let on_behalf: Arc<str> = Arc::from(owner);
        let attempt = tokio::spawn(throttle::on_behalf_of(on_behalf, async move {
            let id = record.id.clone();
            let outcome = this.deliver(record, Some(&flag)).await;
            if outcome.is_err() {
                this.free_lease_when_possible(id);
            }
            outcome
        }));
        let delivered = tokio::time::timeout_at(deadline, attempt).await;
        waiting.store(false, Ordering::Release);
        let record = store.order(&id).await?.ok_or(GatewayError::Internal)?;
        match delivered {
            Ok(Ok(Ok(Heard::ErpRejected(message)))) => {
                Err(GatewayError::ErpRejected { upstream: self.settings.erp.clone(), message })
            }
            Ok(Ok(Ok(Heard::State(State::Accepted)))) => self.reply(store, &record, 201).await,
            _ => self.reply(store, &record, 202).await,
        }
    }

    /// The rules refused the quote at submission: the order is recorded as rejected (so the
    /// opportunity's history shows it) and counted as the worker counts a refusal, and the caller
    /// hears the breaches.
    async fn refuse(
        &self,
        store: &dyn OrderStore,
        order: NewOrder<'_>,
        region: &str,
        breaches: Vec<RuleBreach>,
    ) -> Result<Reply, GatewayError> {
        let at = decision::Order {
            state: State::Received,
            leased_in: State::Received,
            attempts: 0,
            caller_waits: true,
        };
        let next = decision::decide(
            at,
            Outcome::RulesRefused(breaches.clone()),
            &self.decision_settings(store, false),
        )
        .ok_or(GatewayError::Internal)?;
        let order = NewOrder {
            state: next.to,
            reason: &next.reason,
            violations: next.violations.as_deref(),
            ..order
        };
        store.insert_order(order).await?;
        self.moved.notify_one();
        self.note_events_written();
        self.count(&next.effects, region);
        Err(GatewayError::QuoteRejected { violations: breaches })
    }

    /// The opportunity already has a live order: the same consumer gets it back (one deal, one
    /// order); another consumer is told the opportunity is taken, and nothing of that order.
    async fn existing_order(
        &self,
        store: &dyn OrderStore,
        existing: OrderRecord,
        owner: &str,
    ) -> Result<Reply, GatewayError> {
        if existing.owner != owner {
            return Err(GatewayError::OpportunityTaken { opportunity_id: existing.opportunity_id });
        }
        ProcessMetrics::global().duplicates_prevented.with_label_values(&["opportunity"]).inc();
        self.reply(store, &existing, 200).await
    }
}
