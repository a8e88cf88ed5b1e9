//! The ERP port of the process APIs: what quote-to-order needs from an ERP, whatever its dialect.
//! Implemented in `erp/` (Business Central, Tryton), built in `server.rs` and handed to the
//! service, so the service can be tested against a fake.

use super::model::{Quote, SalesOrderCreate};
use super::rules::MasterData;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdapterError {
    /// Transient: unreachable, timed out, throttled, 5xx, or the budget refused. Retry later.
    #[error("ERP unavailable: {0}")]
    Unavailable(String),
    /// The ERP asked to wait (429, 503, a vendor overload signal) or its budget could not admit
    /// the call in time: retry when the budget admits again. Never a failure of the order.
    #[error("ERP asked to wait: {0}")]
    Throttled(String),
    /// The ERP refused the request for a business reason (4xx): retrying will not help.
    #[error("ERP rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// The ERP answered something the mapping cannot read.
    #[error("ERP answer unreadable: {0}")]
    Protocol(String),
}

/// What the process APIs need from an ERP, whatever its dialect. Every call goes through the
/// ERP's budget; `create_order_once` looks the order up by its external reference first.
#[async_trait::async_trait]
pub trait ErpAdapter: Send + Sync {
    /// Everything the quote rules need about `quote`, from the cache or the ERP.
    async fn master_data(&self, quote: &Quote) -> Result<MasterData, AdapterError>;
    /// Create the order unless the ERP already holds one with its external reference: then
    /// that one is returned.
    async fn create_order_once(&self, order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError>;
    /// Drop cached master data of `quote` (an operator's replay after fixing it in the ERP).
    async fn forget(&self, quote: &Quote);

    /// Change detection: what the ERP shows of the order it created as (`id`, `number`).
    async fn progress(&self, _id: &str, _number: &str) -> Result<Progress, AdapterError> {
        Err(AdapterError::Protocol("this ERP adapter does not read order progress".into()))
    }
    /// Change detection: the order number an invoice belongs to, and what it shows of that
    /// order; `None` when the invoice does not exist or belongs to no order.
    async fn invoice_progress(&self, _invoice_id: &str) -> Result<Option<(String, Progress)>, AdapterError> {
        Ok(None)
    }
    /// What a change notification's `resource` names, or `None` when it is nothing this
    /// adapter subscribes to (another company, another entity set, not a resource path).
    fn changed_resource(&self, _resource: &str) -> Option<ChangedResource> {
        None
    }
    /// Make sure the ERP notifies `url` of changes to orders and invoices, with `client_state`:
    /// create the subscriptions that are missing, renew those past half their life. Returns
    /// how long until the next look is due.
    async fn subscribe(&self, _url: &str, _client_state: &str) -> Result<std::time::Duration, AdapterError> {
        Err(AdapterError::Protocol("this ERP adapter has no change subscriptions".into()))
    }
    /// Change detection by polling (ERPs that do not notify): the ids of the orders changed
    /// since `cursor` (at most a page of them), and where the next poll starts. Without a
    /// cursor, none: the position of the latest change, to start from.
    async fn changed_since(
        &self,
        _cursor: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), AdapterError> {
        Err(AdapterError::Protocol("this ERP adapter cannot be polled for changes".into()))
    }
}

/// What the ERP shows of an order after creation; each present member is a milestone reached,
/// with what its event's `data` adds (a JSON object).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub shipped: Option<Value>,
    pub invoiced: Option<Value>,
    pub paid: Option<Value>,
    pub cancelled: Option<Value>,
}

/// What a change notification names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChangedResource {
    /// An order, by the ERP's id.
    Order(String),
    /// An invoice, by the ERP's id.
    Invoice(String),
    /// Too many changes to name: the whole set is to be read again.
    Collection,
}

/// An order as the ERP holds it, in the canonical shape (`canonical-sales-order-bc`).
#[derive(Debug, Clone, PartialEq)]
pub struct ErpOrder {
    pub id: String,
    pub number: String,
    pub canonical: Value,
}
