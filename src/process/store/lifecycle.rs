//! What happens to an accepted order in the ERP afterwards (shipped, invoiced, paid,
//! cancelled), as change detection (`crate::changes`) finds it. Each milestone is recorded once
//! per order; recording it writes its event to the outbox in the same transaction (a trigger on
//! the milestones table), so a milestone and its event cannot part. Notifications the ERP sends
//! are remembered for a while, so a repeated one is recognised by every replica.

use super::StoreError;

/// The event types of milestones, in the order an order reaches them.
pub const MILESTONES: &[&str] =
    &["order.shipped.v1", "invoice.issued.v1", "payment.received.v1", "order.cancelled.v1"];

/// One milestone the ERP shows: its event type and what the event's `data` adds to the order's
/// identifiers (invoice number, amounts, dates as the ERP states them).
#[derive(Debug, Clone, PartialEq)]
pub struct Milestone {
    pub kind: &'static str,
    /// A JSON object.
    pub data: String,
}

/// An accepted order the gateway created in the ERP, with the milestones recorded so far.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackedOrder {
    pub id: String,
    pub erp_order_id: String,
    pub erp_order_number: String,
    pub milestones: Vec<String>,
}

impl TrackedOrder {
    /// Paid or cancelled: nothing more will happen to it.
    pub fn finished(&self) -> bool {
        self.milestones.iter().any(|m| m == "payment.received.v1" || m == "order.cancelled.v1")
    }
}

#[async_trait::async_trait]
pub trait OrderLifecycle: Send + Sync {
    /// The accepted order with this ERP id (or, when `erp_id` is `None`, this ERP number).
    async fn tracked(
        &self,
        erp_id: Option<&str>,
        erp_number: Option<&str>,
    ) -> Result<Option<TrackedOrder>, StoreError>;
    /// Accepted orders not finished, by id after `after`, at most `limit` (a sweep pages through).
    async fn unfinished(&self, after: &str, limit: i64) -> Result<Vec<TrackedOrder>, StoreError>;
    /// Record those of `milestones` (in the order given) the order does not have yet, each with
    /// its event, in one transaction; returns the kinds recorded now.
    async fn record_milestones(
        &self,
        order_id: &str,
        milestones: &[Milestone],
    ) -> Result<Vec<String>, StoreError>;
    /// Remember the notifications `keys` (in one transaction); for each, `false` when it was
    /// seen before.
    async fn first_sight(&self, keys: &[String]) -> Result<Vec<bool>, StoreError>;
    /// Forget notifications seen before `before` (ms since the epoch), up to `limit`.
    async fn forget_sightings(&self, before: i64, limit: i64) -> Result<u64, StoreError>;
    /// Where polling the ERP `source` for changes got to (the adapter's own format).
    async fn cursor(&self, source: &str) -> Result<Option<String>, StoreError>;
    async fn set_cursor(&self, source: &str, position: &str) -> Result<(), StoreError>;
}
