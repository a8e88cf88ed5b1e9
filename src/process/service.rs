//! Quote-to-order: parse (canonical or Salesforce), idempotency, dedupe by opportunity, the
//! rules on the ERP's master data, a durable record, then delivery to the ERP: inline while the
//! caller waits a bounded time, else by the background worker with backoff and jitter.
//!
//! The order record is committed before the ERP sees anything, and the adapter looks the order
//! up by its external reference before every create, so a crash at any point neither loses an
//! acknowledged order nor creates a second one.

use super::adapter::{AdapterError, ErpAdapter};
use super::idempotency;
use super::intake;
use super::metrics::ProcessMetrics;
use super::model::Quote;
use super::state::State;
use super::store::{Change, KeyState, NewOrder, OrderRecord, OrderStore, StoreError, Transition};
use crate::budget::throttle;
use crate::clock::format_datetime;
use crate::config::{Config, ProcessSettings};
use crate::error::GatewayError;
use crate::observe::traces::Span;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use super::intake::{CANONICAL_POLICY, SALESFORCE_POLICY};

/// Of a caller's `inline_wait`, what is kept at the end for recording the answer after the
/// ERP wait is cut off: the caller hears back within `inline_wait`, not just after it.
const RECORDING_RESERVE: Duration = Duration::from_millis(50);

/// Where an order is found; the shipped routes serve it.
pub const ORDERS_PATH: &str = "/process/v1/orders/";

/// Who is asking: orders belong to the consumer that submitted them.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `policy/consumer` (the authenticated identity), or `anonymous` on a public route.
    pub owner: String,
    /// Holds `orders.read.all` (operators): may read every consumer's orders.
    pub reads_all: bool,
}

/// The scope that lets an operator read every consumer's orders.
pub const READ_ALL_SCOPE: &str = "orders.read.all";

/// An answer for the caller: status, `Location`, JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
    /// Replayed from an earlier request with the same Idempotency-Key.
    pub replayed: bool,
}

/// Orders delivered at once by the worker; the ERP budget bounds what reaches the ERP.
const WORKER_BATCH: i64 = 16;
const WORKER_POLL: Duration = Duration::from_millis(200);
/// How often the per-state gauges are recounted when nothing moves, and at most how often when
/// orders change state (they are recounted from the store, so they never drift from it).
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
const GAUGE_DEBOUNCE: Duration = Duration::from_millis(50);
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// How often, and how many times, a key the store could not free is tried again.
const KEY_RELEASE_EVERY: Duration = Duration::from_millis(500);
const KEY_RELEASE_RETRIES: u32 = 240;
/// How often leases of processes that are gone are taken back (after a crash during a graceful
/// upgrade, the new process finds them this soon).
const RECOVER_INTERVAL: Duration = Duration::from_secs(2);

/// Opens the order store on first use, in the runtime that first needs it (a connection pool
/// belongs to a runtime; the gateway's services run in several).
pub type OpenStore = Box<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Arc<dyn OrderStore>, StoreError>>
        + Send
        + Sync,
>;

pub struct QuoteToOrder {
    config: Arc<ArcSwap<Config>>,
    settings: ProcessSettings,
    adapter: Box<dyn ErpAdapter>,
    open_store: OpenStore,
    store: tokio::sync::OnceCell<Arc<dyn OrderStore>>,
    wake: tokio::sync::Notify,
    /// An order changed state: the per-state gauges are recounted (at most every
    /// [`GAUGE_DEBOUNCE`]), besides their [`GAUGE_INTERVAL`] beat.
    moved: tokio::sync::Notify,
    /// Counts orders that reached a final state (each writes an event): the event dispatcher
    /// wakes on it instead of waiting for its poll.
    finished: tokio::sync::watch::Sender<u64>,
    /// How long an ERP request of a process that died may still be under way (the upstream's
    /// connect and read timeouts): an order it was submitting is retried only after that.
    settle: Duration,
}

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "order store failure");
        GatewayError::StoreUnavailable { detail: e.to_string() }
    }
}

/// The outcome of one delivery attempt, as the caller would be told.
enum Delivered {
    State(State),
    ErpRejected(String),
}

impl QuoteToOrder {
    /// The service on `adapter` (the ERP port, built for the configured dialect) and the store
    /// `open_store` opens.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        settings: ProcessSettings,
        adapter: Box<dyn ErpAdapter>,
        open_store: OpenStore,
    ) -> Arc<QuoteToOrder> {
        let loaded = config.load();
        // The incident series of every known region exist from the start (dashboards, alerts).
        if let Some(rules) = loaded.process_rules.as_ref() {
            let regions = rules.tax.regions.keys().map(String::as_str).chain(["other"]);
            for region in regions {
                for reason in ["erp", "undeliverable"] {
                    ProcessMetrics::global().incidents.with_label_values(&[reason, region]);
                }
            }
        }
        let settle = loaded
            .upstreams
            .get(&settings.erp)
            .map_or(Duration::from_secs(32), |u| u.connect_timeout + u.read_timeout);
        Arc::new(QuoteToOrder {
            config,
            settings,
            adapter,
            open_store,
            store: tokio::sync::OnceCell::new(),
            wake: tokio::sync::Notify::new(),
            moved: tokio::sync::Notify::new(),
            finished: tokio::sync::watch::Sender::new(0),
            settle,
        })
    }

    /// The store, opened on first use; opening also takes back what a process that is gone
    /// left leased (a killed one; not the old process of a graceful upgrade, still running).
    pub async fn store(&self) -> Result<&dyn OrderStore, StoreError> {
        let store = self
            .store
            .get_or_try_init(|| async {
                let store = (self.open_store)().await?;
                self.recover(store.as_ref()).await?;
                Ok::<_, StoreError>(store)
            })
            .await?;
        Ok(store.as_ref())
    }

    /// The store's event outbox (`crate::events`), once the store is open; `None` when the
    /// store keeps none.
    /// Whether the order store answers now (readiness).
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.store().await?.ping().await
    }

    pub async fn outbox(&self) -> Result<Option<Arc<dyn super::store::outbox::EventOutbox>>, StoreError> {
        self.store().await?;
        Ok(self.store.get().cloned().and_then(|s| s.outbox()))
    }

    /// The store's order milestones and seen notifications (`crate::changes`), once the store
    /// is open; `None` when the store keeps none.
    pub async fn lifecycle(
        &self,
    ) -> Result<Option<Arc<dyn super::store::lifecycle::OrderLifecycle>>, StoreError> {
        self.store().await?;
        Ok(self.store.get().cloned().and_then(|s| s.lifecycle()))
    }

    /// The ERP port the service writes orders through (change detection reads through it too).
    pub fn adapter(&self) -> &dyn ErpAdapter {
        self.adapter.as_ref()
    }

    async fn recover(&self, store: &dyn OrderStore) -> Result<(), StoreError> {
        let released = store.recover(self.settle).await?;
        if released > 0 {
            tracing::info!(
                orders = released,
                "resuming delivery of unfinished orders (left by a process that stopped)"
            );
            self.wake.notify_one();
            self.moved.notify_one();
        }
        Ok(())
    }

    /// Handle `POST /process/v1/quote-to-order`. Keys, the opportunity's order and the quota
    /// belong to `caller`. A panic anywhere in here is a 500 problem with the key released,
    /// never a dropped connection with the key left in flight.
    /// How long a caller waits at most (`delivery.inline_wait_ms`).
    pub fn inline_wait(&self) -> Duration {
        self.settings.inline_wait
    }

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

    /// Keep trying to free an idempotency key while the store is away (a database restart), so
    /// the caller's retry is not told "in flight" until the key is abandoned.
    fn release_when_possible(self: &Arc<Self>, key: String) {
        self.when_store_answers(
            "an idempotency key stays in flight until this process restarts or the key is abandoned",
            move |store| {
                let key = key.clone();
                async move { store.release_key(&key).await }
            },
        );
    }

    /// An order leased to this process whose attempt ended on a store error (its recording, or
    /// a step of its delivery, while the database was away; a commit whose answer was lost may
    /// still have happened) would wait for its lease to expire (`lease_ms`). Once the store
    /// answers, the lease is dropped and the worker woken, so it is delivered now; one that was
    /// submitting is due only after its ERP request could have ended (`settle`). A row that was
    /// never written, or an order already final, is left as it is.
    fn free_lease_when_possible(self: &Arc<Self>, id: String) {
        let this = self.clone();
        self.when_store_answers(
            "an order whose delivery met a store failure waits for its lease to expire",
            move |store| {
                let (id, this) = (id.clone(), this.clone());
                async move {
                    let Some(order) = store.order(&id).await? else { return Ok(()) };
                    if order.state.is_final() {
                        return Ok(());
                    }
                    let settle = (order.state == State::Submitted)
                        .then(|| store.now() + this.settle.as_millis() as i64);
                    let change = Change {
                        reason: "the store failed during its delivery; the delivery worker takes it",
                        next_attempt_at: settle,
                        ..Default::default()
                    };
                    if store.transition(&id, order.state, order.state, change).await? {
                        this.wake.notify_one();
                    }
                    Ok(())
                }
            },
        );
    }

    /// Run `attempt` every [`KEY_RELEASE_EVERY`] until the store answers it (at most
    /// [`KEY_RELEASE_RETRIES`] times; then `gave_up` is logged).
    fn when_store_answers<F, A>(&self, gave_up: &'static str, attempt: F)
    where
        F: Fn(Arc<dyn OrderStore>) -> A + Send + 'static,
        A: std::future::Future<Output = Result<(), StoreError>> + Send,
    {
        let Some(store) = self.store.get().cloned() else { return };
        tokio::spawn(async move {
            for _ in 0..KEY_RELEASE_RETRIES {
                tokio::time::sleep(KEY_RELEASE_EVERY).await;
                if attempt(store.clone()).await.is_ok() {
                    return;
                }
            }
            tracing::error!("{gave_up}");
        });
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
        // Master data comes out of the caller's `inline_wait` too; a slow ERP means the rules
        // run later, in the worker.
        let span = self.erp_span(traceparent, "erp master data", &id);
        let master = tokio::time::timeout_at(deadline, self.adapter.master_data(&quote))
            .await
            .unwrap_or_else(|_| Err(AdapterError::Unavailable("master data lookup timed out".into())));
        end_erp_span(span, &master);
        let mut unreachable = None;
        let (state, validated, violations) = match master {
            Ok(master) => {
                let rules = self.config.load().process_rules.clone().ok_or(GatewayError::Internal)?;
                let violations = rules.validate(&quote, &master);
                if violations.is_empty() {
                    (State::Validated, true, Vec::new())
                } else {
                    (State::Rejected, false, violations)
                }
            }
            Err(e) => {
                tracing::info!(error = %e, opportunity = %quote.opportunity_id, "master data unavailable; order accepted as pending");
                unreachable = Some(e.to_string().chars().take(300).collect::<String>());
                (State::Received, false, Vec::new())
            }
        };
        if state == State::Rejected {
            let text = serde_json::to_string(&violations).map_err(|_| GatewayError::Internal)?;
            let codes: Vec<&str> = violations.iter().map(|v| v.code).collect();
            let reason = format!("refused by the rules: {}", codes.join(", "));
            store
                .insert_order(NewOrder {
                    id: &id,
                    owner,
                    opportunity_id: &quote.opportunity_id,
                    state: State::Rejected,
                    quote: &quote_text,
                    validated: false,
                    violations: Some(&text),
                    correlation_id,
                    traceparent,
                    reason: &reason,
                    lease: None,
                })
                .await?;
            self.moved.notify_one();
            self.finished.send_modify(|n| *n += 1);
            metrics.orders.with_label_values(&["rejected"]).inc();
            for code in codes {
                metrics.rejections.with_label_values(&[code]).inc();
                self.incident(code, &quote.region);
            }
            return Err(GatewayError::QuoteRejected { violations });
        }
        let (reason, lease) = match (validated, unreachable) {
            (true, _) => ("quote validated".to_string(), Some(self.settings.lease)),
            (false, Some(why)) => {
                (format!("received; the ERP's master data is unreachable ({why}), validation deferred"), None)
            }
            (false, None) => {
                ("received; the ERP's master data is unreachable, validation deferred".to_string(), None)
            }
        };
        let inserted = store
            .insert_order(NewOrder {
                id: &id,
                owner,
                opportunity_id: &quote.opportunity_id,
                state,
                quote: &quote_text,
                validated,
                violations: None,
                correlation_id,
                traceparent,
                reason: &reason,
                lease,
            })
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
            Ok(Ok(Ok(Delivered::ErpRejected(message)))) => {
                Err(GatewayError::ErpRejected { upstream: self.settings.erp.clone(), message })
            }
            Ok(Ok(Ok(Delivered::State(State::Accepted)))) => self.reply(store, &record, 201).await,
            _ => self.reply(store, &record, 202).await,
        }
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

    /// The order as JSON with `status`; `Location` names it.
    async fn reply(
        &self,
        store: &dyn OrderStore,
        order: &OrderRecord,
        status: u16,
    ) -> Result<Reply, GatewayError> {
        let history = store.history(&order.id).await?;
        let body = serde_json::to_vec(&order_view(order, &history)).map_err(|_| GatewayError::Internal)?;
        Ok(Reply { status, location: Some(format!("{ORDERS_PATH}{}", order.id)), body, replayed: false })
    }

    /// `GET /process/v1/orders/{id}`: another consumer's order is not found, as if absent.
    pub async fn order(&self, id: &str, caller: &Caller) -> Result<Reply, GatewayError> {
        let store = self.store().await?;
        let order = store
            .order(id)
            .await?
            .filter(|o| caller.reads_all || o.owner == caller.owner)
            .ok_or_else(|| GatewayError::OrderNotFound { id: id.to_string() })?;
        self.reply(store, &order, 200).await
    }

    /// `GET /process/v1/orders?opportunityId=…`: the caller's orders of the opportunity, newest
    /// first (every consumer's with `orders.read.all`).
    pub async fn orders_for(&self, opportunity_id: &str, caller: &Caller) -> Result<Reply, GatewayError> {
        let store = self.store().await?;
        let mut orders = Vec::new();
        let visible = store
            .orders_for(opportunity_id)
            .await?
            .into_iter()
            .filter(|o| caller.reads_all || o.owner == caller.owner);
        for order in visible {
            let history = store.history(&order.id).await?;
            orders.push(order_view(&order, &history));
        }
        let body = serde_json::to_vec(&json!({ "value": orders })).map_err(|_| GatewayError::Internal)?;
        Ok(Reply { status: 200, location: None, body, replayed: false })
    }

    /// Dead-lettered orders, oldest first (admin).
    pub async fn dead_letters(&self, limit: i64) -> Result<Value, StoreError> {
        let store = self.store().await?;
        let mut out = Vec::new();
        for order in store.in_state(State::DeadLettered, limit).await? {
            let history = store.history(&order.id).await?;
            out.push(order_view(&order, &history));
        }
        Ok(json!({ "value": out }))
    }

    /// Send a dead-lettered order back to delivery: the rules run again on fresh master data
    /// and the attempts start over. `Ok(false)` when the order is not dead-lettered.
    pub async fn replay(&self, id: &str) -> Result<bool, StoreError> {
        let store = self.store().await?;
        let Some(order) = store.order(id).await? else { return Ok(false) };
        if order.state != State::DeadLettered {
            return Ok(false);
        }
        if let Ok(quote) = serde_json::from_str::<Quote>(&order.quote) {
            self.adapter.forget(&quote).await;
        }
        let change = Change {
            reason: "replayed by an operator",
            validated: Some(false),
            next_attempt_at: Some(store.now()),
            reset_attempts: true,
            ..Default::default()
        };
        let moved = self.transition(store, id, State::DeadLettered, State::Pending, change).await?;
        self.wake.notify_one();
        Ok(moved)
    }

    /// Count an incident (an order refused or given up on) by its reason and the quote's region;
    /// a region the tax rules do not know is `other`, so the labels stay bounded.
    fn incident(&self, reason: &str, region: &str) {
        let known =
            self.config.load().process_rules.as_ref().is_some_and(|r| r.tax.regions.contains_key(region));
        let region = if known { region } else { "other" };
        ProcessMetrics::global().incidents.with_label_values(&[reason, region]).inc();
    }

    /// An order accepted after it was a dead letter: how long the exception took to resolve
    /// (its last dead-lettering to now).
    async fn note_resolution(&self, store: &dyn OrderStore, id: &str) {
        let Ok(history) = store.history(id).await else { return };
        let dead = history.iter().rev().find(|t| t.to == State::DeadLettered.as_str());
        if let Some(t) = dead {
            let since = t.last_at.unwrap_or(t.at);
            let seconds = (store.now() - since).max(0) as f64 / 1000.0;
            ProcessMetrics::global().exception_resolution.observe(seconds);
        }
    }

    /// Replay every dead letter; returns how many went back to delivery.
    pub async fn replay_all(&self) -> Result<usize, StoreError> {
        let store = self.store().await?;
        let mut n = 0;
        loop {
            let batch = store.in_state(State::DeadLettered, 500).await?;
            let before = n;
            for order in &batch {
                n += usize::from(self.replay(&order.id).await?);
            }
            if batch.is_empty() || n == before {
                return Ok(n);
            }
        }
    }

    /// One delivery attempt of a leased order. `caller` is set while a caller waits for the
    /// outcome: a refusal is then theirs to fix (`rejected`); with nobody waiting it becomes a
    /// dead letter for an operator.
    async fn deliver(
        &self,
        order: OrderRecord,
        caller: Option<&AtomicBool>,
    ) -> Result<Delivered, StoreError> {
        let store = self.store().await?;
        let metrics = ProcessMetrics::global();
        let someone_waits = || caller.is_some_and(|c| c.load(Ordering::Acquire));
        let refused = || if someone_waits() { State::Rejected } else { State::DeadLettered };
        let Ok(quote) = serde_json::from_str::<Quote>(&order.quote) else {
            let change = Change { reason: "stored quote unreadable", ..Default::default() };
            self.transition(store, &order.id, order.state, State::DeadLettered, change).await?;
            return Ok(Delivered::State(State::DeadLettered));
        };
        let mut state = order.state;
        // An attempt ends well within the order's lease, so no other deliverer can take the
        // order over while this one may still be talking to the ERP.
        let budget = self.settings.lease / 2;
        if !order.validated {
            let span = self.erp_span(&order.traceparent, "erp master data", &order.id);
            let master = tokio::time::timeout(budget, self.adapter.master_data(&quote))
                .await
                .unwrap_or_else(|_| Err(AdapterError::Unavailable("master data lookup timed out".into())));
            end_erp_span(span, &master);
            match master {
                Err(AdapterError::Throttled(why)) => {
                    return self.wait_for_erp(store, &order, state, &why, false).await;
                }
                // A failed lookup is an attempt like any: it counts toward max_attempts and
                // backs off.
                Err(e) => {
                    return self
                        .retry_later(store, &order, state, &e.to_string(), false, Duration::ZERO)
                        .await
                }
                Ok(master) => {
                    let Some(rules) = self.config.load().process_rules.clone() else {
                        return self
                            .retry_later(
                                store,
                                &order,
                                state,
                                "no process rules loaded",
                                false,
                                Duration::ZERO,
                            )
                            .await;
                    };
                    let violations = rules.validate(&quote, &master);
                    if !violations.is_empty() {
                        let codes: Vec<&str> = violations.iter().map(|v| v.code).collect();
                        let reason = format!("refused by the rules: {}", codes.join(", "));
                        let text = serde_json::to_string(&violations).unwrap_or_default();
                        let to = refused();
                        let change =
                            Change { reason: &reason, violations: Some(&text), ..Default::default() };
                        self.transition(store, &order.id, state, to, change).await?;
                        metrics.orders.with_label_values(&[to.as_str()]).inc();
                        for code in codes {
                            metrics.rejections.with_label_values(&[code]).inc();
                            self.incident(code, &quote.region);
                        }
                        return Ok(Delivered::State(to));
                    }
                    let change = Change {
                        reason: "quote validated",
                        validated: Some(true),
                        keep_lease: true,
                        ..Default::default()
                    };
                    if !self.transition(store, &order.id, state, State::Validated, change).await? {
                        return Ok(Delivered::State(state));
                    }
                    state = State::Validated;
                }
            }
        }
        let attempt = order.attempts + 1;
        let reason = format!("delivery attempt {attempt}");
        let change = Change { reason: &reason, count_attempt: true, keep_lease: true, ..Default::default() };
        if !self.transition(store, &order.id, state, State::Submitted, change).await? {
            return Ok(Delivered::State(state));
        }
        let customer = quote.customer.number.clone().unwrap_or_default();
        let order_json = serde_json::to_value(quote.to_sales_order(&customer)).unwrap_or_default();
        let mut span = self.erp_span(&order.traceparent, "erp create order", &order.id);
        span.attr("causeway.attempt", attempt);
        let created = tokio::time::timeout(budget, self.adapter.create_order_once(&order_json)).await;
        match &created {
            Ok(Ok(erp)) => {
                span.attr("causeway.erp_order_number", erp.number.clone());
                span.succeed();
            }
            Ok(Err(AdapterError::Throttled(_))) => span.attr("causeway.erp_outcome", "throttled"),
            Ok(Err(e)) => span.fail(e.to_string()),
            Err(_) => span.fail("the attempt took longer than half the delivery lease"),
        }
        span.end();
        let Ok(created) = created else {
            // Cut off mid-exchange: the ERP may still be creating it. The next attempt finds it,
            // once that request can no longer be under way.
            let error = "the attempt took longer than half the delivery lease";
            return self.retry_later(store, &order, State::Submitted, error, true, self.settle).await;
        };
        match created {
            Ok(erp) => {
                let reason = format!("the ERP holds order {}", erp.number);
                let change =
                    Change { reason: &reason, erp_order: Some((&erp.id, &erp.number)), ..Default::default() };
                self.transition(store, &order.id, State::Submitted, State::Accepted, change).await?;
                metrics.orders.with_label_values(&["accepted"]).inc();
                let seconds = (store.now() - order.received_at).max(0) as f64 / 1000.0;
                metrics.accept_latency.with_label_values(&[self.settings.erp.as_str()]).observe(seconds);
                // Only orders validated late (a replay, or master data unreachable at
                // submission) can have been dead letters: the others cost no history read.
                if !order.validated {
                    self.note_resolution(store, &order.id).await;
                }
                Ok(Delivered::State(State::Accepted))
            }
            Err(AdapterError::Rejected { status, message }) => {
                let reason = format!("the ERP refused the order ({status}): {message}");
                let to = refused();
                let change = Change { reason: &reason, ..Default::default() };
                self.transition(store, &order.id, State::Submitted, to, change).await?;
                metrics.orders.with_label_values(&[to.as_str()]).inc();
                metrics.rejections.with_label_values(&["erp"]).inc();
                self.incident("erp", &quote.region);
                Ok(if to == State::Rejected { Delivered::ErpRejected(message) } else { Delivered::State(to) })
            }
            Err(AdapterError::Throttled(why)) => {
                self.wait_for_erp(store, &order, State::Submitted, &why, true).await
            }
            Err(e) => {
                self.retry_later(store, &order, State::Submitted, &e.to_string(), true, Duration::ZERO).await
            }
        }
    }

    /// A span of an ERP exchange of order `id`, in the trace of the request that submitted it.
    fn erp_span(&self, traceparent: &str, operation: &'static str, id: &str) -> Span {
        let mut span = Span::child_of(traceparent, operation, opentelemetry::trace::SpanKind::Client);
        if span.is_recording() {
            span.attr("causeway.erp", self.settings.erp.clone());
            span.attr("causeway.order_id", id.to_string());
        }
        span
    }

    /// The ERP asked to wait, or its budget could not admit the call in time: try again after
    /// the first backoff step, or when the budget's pause ends if that is later (the budget
    /// paces the ERP itself). Not a failure of the order: the attempt is not counted (`counted`:
    /// it was when it began, so it is taken back), and `max_attempts` never dead-letters an
    /// order for it.
    async fn wait_for_erp(
        &self,
        store: &dyn OrderStore,
        order: &OrderRecord,
        from: State,
        why: &str,
        counted: bool,
    ) -> Result<Delivered, StoreError> {
        let paused = self
            .config
            .load()
            .upstreams
            .get(&self.settings.erp)
            .and_then(|u| u.budget.as_ref())
            .map_or(Duration::ZERO, |b| Duration::from_millis(b.budget.snapshot().paused_for_ms));
        let delay =
            crate::clock::backoff(self.settings.backoff_initial, self.settings.backoff_max, 0).max(paused);
        let reason = format!("the ERP asked to wait, retry in {} ms: {why}", delay.as_millis());
        let change = Change {
            reason: &reason,
            next_attempt_at: Some(store.now() + delay.as_millis() as i64),
            uncount_attempt: counted,
            ..Default::default()
        };
        if self.transition(store, &order.id, from, State::Pending, change).await?
            && order.state != State::Pending
        {
            ProcessMetrics::global().orders.with_label_values(&["pending"]).inc();
        }
        Ok(Delivered::State(State::Pending))
    }

    /// Schedule the next attempt with exponential backoff and jitter (at least `min_delay`),
    /// or give up after `max_attempts`. `counted`: this attempt was counted when it began (it
    /// reached `submitted`); otherwise it is counted here.
    async fn retry_later(
        &self,
        store: &dyn OrderStore,
        order: &OrderRecord,
        from: State,
        error: &str,
        counted: bool,
        min_delay: Duration,
    ) -> Result<Delivered, StoreError> {
        let attempts = order.attempts + 1;
        let metrics = ProcessMetrics::global();
        if attempts >= i64::from(self.settings.max_attempts) {
            let reason = format!("gave up after {attempts} attempts; last error: {error}");
            let change = Change { reason: &reason, count_attempt: !counted, ..Default::default() };
            self.transition(store, &order.id, from, State::DeadLettered, change).await?;
            metrics.orders.with_label_values(&["dead_lettered"]).inc();
            let region = serde_json::from_str::<Quote>(&order.quote).map(|q| q.region).unwrap_or_default();
            self.incident("undeliverable", &region);
            return Ok(Delivered::State(State::DeadLettered));
        }
        let doublings = (attempts.max(1) - 1) as u32;
        let delay =
            crate::clock::backoff(self.settings.backoff_initial, self.settings.backoff_max, doublings)
                .max(min_delay);
        let reason = format!("waiting for the ERP, retry in {} ms: {error}", delay.as_millis());
        let change = Change {
            reason: &reason,
            next_attempt_at: Some(store.now() + delay.as_millis() as i64),
            count_attempt: !counted,
            ..Default::default()
        };
        if self.transition(store, &order.id, from, State::Pending, change).await?
            && order.state != State::Pending
        {
            metrics.orders.with_label_values(&["pending"]).inc();
        }
        Ok(Delivered::State(State::Pending))
    }

    /// The delivery worker: leases due orders and delivers them, until shutdown.
    pub async fn run_worker(self: Arc<Self>, mut shutdown: pingora::server::ShutdownWatch) {
        let store = loop {
            match self.store().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::error!(error = %e, "order store unavailable; the delivery worker retries in 5 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        // The order-state gauges follow the store on their own beat: a delivery round can take
        // minutes under a throttled ERP, and they must not wait for it (they read 0 until then).
        let _gauges = AbortOnDrop(tokio::spawn({
            let (this, mut shutdown) = (self.clone(), shutdown.clone());
            async move {
                loop {
                    if let Ok(store) = this.store().await {
                        this.refresh_gauges(store).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
                        _ = this.moved.notified() => tokio::time::sleep(GAUGE_DEBOUNCE).await,
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }));
        let mut purge = tokio::time::Instant::now();
        let mut recovered = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                // A graceful upgrade or shutdown: claim nothing more; the next process resumes.
                return;
            }
            if recovered.elapsed() >= RECOVER_INTERVAL {
                recovered = tokio::time::Instant::now();
                if let Err(e) = self.recover(store).await {
                    tracing::warn!(error = %e, "cannot take back leases of stopped processes");
                }
            }
            if purge.elapsed() >= PURGE_INTERVAL {
                purge = tokio::time::Instant::now();
                if let Err(e) = store.purge_expired_keys().await {
                    tracing::warn!(error = %e, "cannot purge expired idempotency keys");
                }
            }
            if self.deliver_due().await == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(WORKER_POLL) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// One round of the worker: lease the orders that are due and deliver them (each for the
    /// consumer that submitted it). Returns how many were due.
    pub async fn deliver_due(self: &Arc<Self>) -> usize {
        let Ok(store) = self.store().await else { return 0 };
        let due = match store.claim_due(WORKER_BATCH, self.settings.lease).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read due orders");
                return 0;
            }
        };
        let count = due.len();
        let mut batch = tokio::task::JoinSet::new();
        for order in due {
            let this = self.clone();
            let owner: Arc<str> = Arc::from(order.owner.as_str());
            batch.spawn(throttle::on_behalf_of(owner, throttle::in_background(async move {
                let id = order.id.clone();
                if let Err(e) = this.deliver(order, None).await {
                    tracing::error!(error = %e, "order delivery could not be recorded; it will be retried");
                    this.free_lease_when_possible(id);
                }
            })));
        }
        while batch.join_next().await.is_some() {}
        count
    }

    /// [`OrderStore::transition`], with the gauges told that an order moved.
    async fn transition(
        &self,
        store: &dyn OrderStore,
        id: &str,
        from: State,
        to: State,
        change: Change<'_>,
    ) -> Result<bool, StoreError> {
        let moved = store.transition(id, from, to, change).await?;
        if moved {
            self.moved.notify_one();
            if to.is_final() {
                self.finished.send_modify(|n| *n += 1);
            }
        }
        Ok(moved)
    }

    /// Events were written outside a state change (an order's milestones): wake the
    /// dispatcher as a final state would.
    pub fn note_events_written(&self) {
        self.finished.send_modify(|n| *n += 1);
    }

    /// Changes when an order reaches a final state in this process (its event is in the outbox).
    pub fn finished_orders(&self) -> tokio::sync::watch::Receiver<u64> {
        self.finished.subscribe()
    }

    async fn refresh_gauges(&self, store: &dyn OrderStore) {
        if let Ok(counts) = store.count_by_state().await {
            let gauge = &ProcessMetrics::global().orders_in_state;
            for s in State::ALL {
                let n = counts.iter().find(|(name, _)| name == s.as_str()).map_or(0, |(_, n)| *n);
                gauge.with_label_values(&[s.as_str()]).set(n);
            }
        }
    }
}

/// Ends a background task when its owner ends, however it returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn order_view(order: &OrderRecord, history: &[Transition]) -> Value {
    let violations = order.violations.as_deref().and_then(|v| serde_json::from_str::<Value>(v).ok());
    let history: Vec<Value> = history
        .iter()
        .map(|t| {
            let mut entry =
                json!({ "at": format_datetime(t.at), "from": t.from, "to": t.to, "reason": t.reason });
            if t.repeats > 0 {
                entry["repeats"] = json!(t.repeats);
                entry["lastAt"] = json!(t.last_at.map(format_datetime));
            }
            entry
        })
        .collect();
    let mut view = json!({
        "id": order.id,
        "opportunityId": order.opportunity_id,
        "state": order.state,
        "correlationId": order.correlation_id,
        "attempts": order.attempts,
        "receivedAt": format_datetime(order.received_at),
        "updatedAt": format_datetime(order.updated_at),
        "history": history,
        "links": { "self": format!("{ORDERS_PATH}{}", order.id) },
    });
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            view[k] = v;
        }
    };
    set("erpOrderId", order.erp_order_id.clone().map(Value::from));
    set("erpOrderNumber", order.erp_order_number.clone().map(Value::from));
    set("reason", order.reason.clone().map(Value::from));
    set("violations", violations);
    view
}

/// End an ERP exchange's span with its outcome. The ERP asking to wait is not a failure (the
/// order waits for the budget, README "Process APIs"): the span says so without an error.
fn end_erp_span<T>(mut span: Span, outcome: &Result<T, AdapterError>) {
    match outcome {
        Ok(_) => span.succeed(),
        Err(AdapterError::Throttled(_)) => span.attr("causeway.erp_outcome", "throttled"),
        Err(e) => span.fail(e.to_string()),
    }
    span.end();
}
