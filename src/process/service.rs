//! Quote-to-order: parse (canonical or Salesforce), idempotency, dedupe by opportunity, the
//! rules on the ERP's master data, a durable record, then delivery to the ERP: inline while the
//! caller waits a bounded time, else by the background worker with backoff and jitter.
//!
//! This file holds the service and what its jobs share (the store, transitions, incidents,
//! spans); the jobs are apart: [`super::submission`] (a caller's request), [`super::delivery`]
//! (one attempt, decided by a pure state machine), [`super::worker`] (the background loop) and
//! [`super::views`] (orders as JSON, dead letters and replay).
//!
//! The order record is committed before the ERP sees anything, and the adapter looks the order
//! up by its external reference before every create, so a crash at any point neither loses an
//! acknowledged order nor creates a second one.

use super::adapter::{AdapterError, ErpAdapter};
use super::delivery::decision::Effects;
use super::metrics::ProcessMetrics;
use super::state::State;
use super::store::{Change, OrderStore, StoreError};
use crate::config::{Config, ProcessSettings};
use crate::error::GatewayError;
use crate::observe::traces::Span;

use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;

pub use super::intake::{CANONICAL_POLICY, SALESFORCE_POLICY};

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

/// How often, and how many times, a key the store could not free is tried again.
const KEY_RELEASE_EVERY: Duration = Duration::from_millis(500);
const KEY_RELEASE_RETRIES: u32 = 240;

/// Opens the order store on first use, in the runtime that first needs it (a connection pool
/// belongs to a runtime; the gateway's services run in several).
pub type OpenStore = Box<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Arc<dyn OrderStore>, StoreError>>
        + Send
        + Sync,
>;

pub struct QuoteToOrder {
    pub(super) config: Arc<ArcSwap<Config>>,
    pub(super) settings: ProcessSettings,
    pub(super) adapter: Box<dyn ErpAdapter>,
    open_store: OpenStore,
    pub(super) store: tokio::sync::OnceCell<Arc<dyn OrderStore>>,
    pub(super) wake: tokio::sync::Notify,
    /// An order changed state: the per-state gauges are recounted (at most every
    /// `worker::GAUGE_DEBOUNCE`), besides their `worker::GAUGE_INTERVAL` beat.
    pub(super) moved: tokio::sync::Notify,
    /// Counts orders that reached a final state (each writes an event): the event dispatcher
    /// wakes on it instead of waiting for its poll.
    finished: tokio::sync::watch::Sender<u64>,
    /// How long an ERP request of a process that died may still be under way (the upstream's
    /// connect and read timeouts): an order it was submitting is retried only after that.
    pub(super) settle: Duration,
}

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "order store failure");
        GatewayError::StoreUnavailable { detail: e.to_string() }
    }
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

    /// Whether the order store answers now (readiness).
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.store().await?.ping().await
    }

    /// The store's event outbox (`crate::events`), once the store is open; `None` when the
    /// store keeps none.
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

    /// How long a caller waits at most (`delivery.inline_wait_ms`).
    pub fn inline_wait(&self) -> Duration {
        self.settings.inline_wait
    }

    pub(super) async fn recover(&self, store: &dyn OrderStore) -> Result<(), StoreError> {
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

    /// Keep trying to free an idempotency key while the store is away (a database restart), so
    /// the caller's retry is not told "in flight" until the key is abandoned.
    pub(super) fn release_when_possible(self: &Arc<Self>, key: String) {
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
    pub(super) fn free_lease_when_possible(self: &Arc<Self>, id: String) {
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

    /// [`OrderStore::transition`], with the gauges told that an order moved.
    pub(super) async fn transition(
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

    /// Count an incident (an order refused or given up on) by its reason and the quote's region;
    /// a region the tax rules do not know is `other`, so the labels stay bounded.
    pub(super) fn incident(&self, reason: &str, region: &str) {
        let known =
            self.config.load().process_rules.as_ref().is_some_and(|r| r.tax.regions.contains_key(region));
        let region = if known { region } else { "other" };
        ProcessMetrics::global().incidents.with_label_values(&[reason, region]).inc();
    }

    /// Count what a recorded transition leads to (`Effects`), the quote being of `region`.
    pub(super) fn count(&self, effects: &Effects, region: &str) {
        let metrics = ProcessMetrics::global();
        if let Some(state) = effects.count_state {
            metrics.orders.with_label_values(&[state.as_str()]).inc();
        }
        for code in &effects.rejections {
            metrics.rejections.with_label_values(&[code]).inc();
            self.incident(code, region);
        }
        if let Some(reason) = effects.incident {
            self.incident(reason, region);
        }
    }

    /// A span of an ERP exchange of order `id`, in the trace of the request that submitted it.
    pub(super) fn erp_span(&self, traceparent: &str, operation: &'static str, id: &str) -> Span {
        let mut span = Span::child_of(traceparent, operation, opentelemetry::trace::SpanKind::Client);
        if span.is_recording() {
            span.attr("causeway.erp", self.settings.erp.clone());
            span.attr("causeway.order_id", id.to_string());
        }
        span
    }
}

/// End an ERP exchange's span with its outcome. The ERP asking to wait is not a failure (the
/// order waits for the budget, README "Process APIs"): the span says so without an error.
pub(super) fn end_erp_span<T>(mut span: Span, outcome: &Result<T, AdapterError>) {
    match outcome {
        Ok(_) => span.succeed(),
        Err(AdapterError::Throttled(_)) => span.attr("causeway.erp_outcome", "throttled"),
        Err(e) => span.fail(e.to_string()),
    }
    span.end();
}
