//! The durable side of the process APIs, behind a port: orders with their state machine and
//! timestamped transitions, and idempotency keys with their stored responses. [`OrderStore`] is
//! what the service needs; [`sqlite::SqliteStore`] keeps it in one SQLite file (the default, one
//! node), [`postgres::PostgresStore`] in a PostgreSQL database that replicas share (cluster
//! mode), [`memory::MemoryStore`] in memory (unit tests; nothing survives the process). The
//! suite in `suite.rs` holds both durable stores to the same assertions.

mod group;
pub mod lifecycle;
pub mod memory;
pub mod migrations;
pub mod outbox;
pub mod postgres;
mod postgres_lifecycle;
mod postgres_outbox;
pub mod sqlite;
mod sqlite_lifecycle;
mod sqlite_outbox;
#[cfg(test)]
mod suite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use super::state::State;
pub use crate::clock::now_ms;
use crate::config::StoreSettings;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

pub use group::writes_per_commit;

/// Open the configured store, bringing its schema up to date (what `causeway migrate` runs).
pub async fn open(settings: &StoreSettings) -> Result<Arc<dyn OrderStore>, StoreError> {
    Ok(match settings {
        StoreSettings::Sqlite { path, synchronous, group_commit } => {
            Arc::new(SqliteStore::open(path, *synchronous, *group_commit).await?)
        }
        StoreSettings::Postgres { url, pool, acquire_timeout, group_commit } => {
            Arc::new(PostgresStore::open(url, *pool, *acquire_timeout, *group_commit).await?)
        }
    })
}

#[derive(Debug, thiserror::Error)]
#[error("order store: {0}")]
pub struct StoreError(pub String);

/// An order record.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    pub id: String,
    pub opportunity_id: String,
    pub state: State,
    /// The canonical quote, as JSON text.
    pub quote: String,
    /// The rules have passed (false when the ERP was unreachable at submission).
    pub validated: bool,
    pub erp_order_id: Option<String>,
    pub erp_order_number: Option<String>,
    pub reason: Option<String>,
    /// Rule violations (JSON array) when the rules refused the order.
    pub violations: Option<String>,
    pub correlation_id: String,
    /// The W3C traceparent of the request that submitted it (its gateway span); empty for
    /// orders of older versions. The ERP exchanges and event deliveries of the order are spans
    /// of this trace.
    pub traceparent: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub received_at: i64,
    pub updated_at: i64,
    /// The consumer that submitted it (`policy/consumer`); empty for orders of older versions.
    pub owner: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub at: i64,
    pub from: Option<String>,
    pub to: String,
    /// The latest reason, when the change repeated.
    pub reason: String,
    /// How many more times the order was put in this state again (retries).
    pub repeats: i64,
    pub last_at: Option<i64>,
}

/// What an idempotency key holds.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    /// First use: the caller owns the key until it finishes or releases it.
    Claimed,
    /// The first request with this key has not finished.
    InFlight,
    /// The key was used with another payload.
    Mismatch,
    /// Finished: replay this response.
    Done { status: u16, location: Option<String>, body: Vec<u8> },
}

/// What changes with a transition, besides the state.
#[derive(Debug, Default)]
pub struct Change<'a> {
    pub reason: &'a str,
    pub erp_order: Option<(&'a str, &'a str)>,
    pub validated: Option<bool>,
    pub violations: Option<&'a str>,
    pub next_attempt_at: Option<i64>,
    pub count_attempt: bool,
    /// Take back the attempt counted when it began: it ended because the ERP asked to wait.
    pub uncount_attempt: bool,
    /// Reset the attempt counter (an operator's replay).
    pub reset_attempts: bool,
    /// Keep the delivery lease (the order stays with its current deliverer).
    pub keep_lease: bool,
}

/// What a new order is recorded with.
#[derive(Debug, Clone)]
pub struct NewOrder<'a> {
    pub id: &'a str,
    /// The consumer that submits it (`policy/consumer`).
    pub owner: &'a str,
    pub opportunity_id: &'a str,
    pub state: State,
    /// The canonical quote, as JSON text.
    pub quote: &'a str,
    pub validated: bool,
    pub violations: Option<&'a str>,
    pub correlation_id: &'a str,
    pub traceparent: &'a str,
    pub reason: &'a str,
    /// Leased to this process for its first delivery attempt.
    pub lease: Option<Duration>,
}

/// A [`NewOrder`] the store's writer keeps after the caller's borrow ends (and runs again
/// when its group's transaction fails).
#[derive(Debug, Clone)]
pub(crate) struct OwnedOrder {
    pub id: Arc<str>,
    pub owner: Arc<str>,
    pub opportunity_id: Arc<str>,
    pub state: State,
    pub quote: Arc<str>,
    pub validated: bool,
    pub violations: Option<Arc<str>>,
    pub correlation_id: Arc<str>,
    pub traceparent: Arc<str>,
    pub reason: Arc<str>,
    pub lease: Option<Duration>,
}

impl From<NewOrder<'_>> for OwnedOrder {
    fn from(o: NewOrder<'_>) -> Self {
        OwnedOrder {
            id: o.id.into(),
            owner: o.owner.into(),
            opportunity_id: o.opportunity_id.into(),
            state: o.state,
            quote: o.quote.into(),
            validated: o.validated,
            violations: o.violations.map(Into::into),
            correlation_id: o.correlation_id.into(),
            traceparent: o.traceparent.into(),
            reason: o.reason.into(),
            lease: o.lease,
        }
    }
}

/// A [`Change`] the store's writer keeps, as [`OwnedOrder`] is to [`NewOrder`].
#[derive(Debug, Clone)]
pub(crate) struct OwnedChange {
    pub reason: Arc<str>,
    pub erp_order: Option<(Arc<str>, Arc<str>)>,
    pub validated: Option<bool>,
    pub violations: Option<Arc<str>>,
    pub next_attempt_at: Option<i64>,
    pub count_attempt: bool,
    pub uncount_attempt: bool,
    pub reset_attempts: bool,
    pub keep_lease: bool,
}

impl From<Change<'_>> for OwnedChange {
    fn from(c: Change<'_>) -> Self {
        OwnedChange {
            reason: c.reason.into(),
            erp_order: c.erp_order.map(|(id, number)| (id.into(), number.into())),
            validated: c.validated,
            violations: c.violations.map(Into::into),
            next_attempt_at: c.next_attempt_at,
            count_attempt: c.count_attempt,
            uncount_attempt: c.uncount_attempt,
            reset_attempts: c.reset_attempts,
            keep_lease: c.keep_lease,
        }
    }
}

/// The store port. Every change of state is one guarded step: `transition` moves an order only
/// from the state the caller saw, so two deliverers can never both move it.
#[async_trait::async_trait]
pub trait OrderStore: Send + Sync {
    /// The store's clock, in milliseconds since the epoch: what schedules are written in (a
    /// test store moves it forward instead of sleeping).
    fn now(&self) -> i64 {
        now_ms()
    }
    /// Whether the store answers a trivial statement now (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Take back what a process that is gone left behind (its leases and in-flight keys); an
    /// order it was submitting is due only after `settle`. Returns the orders released.
    async fn recover(&self, settle: Duration) -> Result<u64, StoreError>;
    /// Claim `key` for a request with `fingerprint`, or say why not.
    async fn claim_key(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<KeyState, StoreError>;
    /// Store the response of a claimed key for replay.
    async fn complete_key(
        &self,
        key: &str,
        status: u16,
        location: Option<&str>,
        body: &[u8],
    ) -> Result<(), StoreError>;
    /// Forget a claimed key: the request ended in a way the caller should retry or fix.
    async fn release_key(&self, key: &str) -> Result<(), StoreError>;
    /// Drop expired keys; returns how many.
    async fn purge_expired_keys(&self) -> Result<u64, StoreError>;
    /// Record a new order (its first transition with it); `None` when the opportunity already
    /// has a live order.
    async fn insert_order(&self, order: NewOrder<'_>) -> Result<Option<OrderRecord>, StoreError>;
    /// Move an order from `from` to `to`; `false` when it is no longer in `from`.
    async fn transition(
        &self,
        id: &str,
        from: State,
        to: State,
        change: Change<'_>,
    ) -> Result<bool, StoreError>;
    /// Lease up to `limit` orders that are due for delivery.
    async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<OrderRecord>, StoreError>;
    async fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError>;
    /// The opportunity's live (not rejected) order.
    async fn live_order_for(&self, opportunity_id: &str) -> Result<Option<OrderRecord>, StoreError>;
    /// Every order of an opportunity, newest first.
    async fn orders_for(&self, opportunity_id: &str) -> Result<Vec<OrderRecord>, StoreError>;
    /// Orders in `state`, least recently changed first.
    async fn in_state(&self, state: State, limit: i64) -> Result<Vec<OrderRecord>, StoreError>;
    async fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError>;
    /// Orders per state, for the gauges.
    async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError>;
    /// The event outbox, when this store keeps one (`crate::events`).
    fn outbox(self: Arc<Self>) -> Option<Arc<dyn outbox::EventOutbox>> {
        None
    }
    /// Milestones after acceptance and the ERP notifications seen (`crate::changes`), when
    /// this store keeps them.
    fn lifecycle(self: Arc<Self>) -> Option<Arc<dyn lifecycle::OrderLifecycle>> {
        None
    }
}
