//! The event outbox (`crate::events`): the store writes an order's events in the transaction of
//! the state change that causes them, with one delivery per subscriber that wants the type, and
//! leases those deliveries to the dispatcher, one order's events strictly in order.

use super::StoreError;
use std::time::Duration;

/// An event as the outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Order of writing in this store; one order's events are in its order.
    pub seq: i64,
    /// The CloudEvents `id` (and the Standard Webhooks message id).
    pub id: String,
    pub order_id: String,
    pub kind: String,
    /// When the change happened (ms since the epoch).
    pub time_ms: i64,
    /// The `data` member, JSON.
    pub data: String,
    /// The order's traceparent (its gateway span), empty when unknown: deliveries are spans of
    /// the order's trace and carry it as the CloudEvents `traceparent` extension.
    pub traceparent: String,
}

/// One subscriber's copy of an event, leased for delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subscriber: String,
    pub attempts: i64,
    pub event: StoredEvent,
}

/// A delivery that gave up, for the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadDelivery {
    pub subscriber: String,
    pub event_id: String,
    pub kind: String,
    pub order_id: String,
    pub attempts: i64,
    pub last_error: String,
    /// When the event happened (ms since the epoch).
    pub time_ms: i64,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempted {
    Delivered,
    /// Try again at this time (ms since the epoch).
    RetryAt(i64, String),
    /// Past the subscriber's horizon: dead-lettered.
    Dead(String),
}

/// The outbox of a store that keeps events (SQLite and PostgreSQL; not the test store).
#[async_trait::async_trait]
pub trait EventOutbox: Send + Sync {
    /// Make the store's subscribers the configured ones: `(name, types)` with types `*` or a
    /// comma-separated list. A subscriber no longer configured is removed with its undelivered
    /// events; returns how many such deliveries were dropped.
    async fn set_subscribers(&self, subscribers: &[(String, String)]) -> Result<u64, StoreError>;
    /// Lease up to `limit` due deliveries of `subscriber` for `lease`: only the earliest
    /// undelivered event of each order, so one order's events go out in order.
    async fn claim_deliveries(
        &self,
        subscriber: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Record the outcome of an attempt at `subscriber`'s copy of event `seq`.
    async fn record_attempt(&self, subscriber: &str, seq: i64, outcome: Attempted) -> Result<(), StoreError>;
    /// Dead-lettered deliveries, oldest first.
    async fn dead_deliveries(&self, limit: i64) -> Result<Vec<DeadDelivery>, StoreError>;
    /// Send dead-lettered deliveries back (of the event `event_id`, or all), attempts from zero;
    /// returns how many.
    async fn replay_deliveries(&self, event_id: Option<&str>) -> Result<u64, StoreError>;
    /// Undelivered deliveries per subscriber (pending, dead), for the gauges.
    async fn delivery_backlog(&self) -> Result<Vec<(String, i64, i64)>, StoreError>;
    /// Forget up to `limit` deliveries acknowledged before `before` (ms since the epoch), and
    /// events that no delivery refers to any more and happened before it; returns how many
    /// rows went. Undelivered and dead-lettered ones are kept.
    async fn purge_delivered(&self, before: i64, limit: i64) -> Result<u64, StoreError>;
}
