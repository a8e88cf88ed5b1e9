//! The ERP port of the process APIs: what quote-to-order needs from an ERP, whatever its dialect.
//! Implemented in `erp/` (Business Central, Tryton), built in `server.rs` and handed to the
//! service, so the service can be tested against a fake.

use super::model::Quote;
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
    /// Create the order (a canonical sales order) unless the ERP already holds one with its
    /// external reference: then that one is returned.
    async fn create_order_once(&self, canonical: &Value) -> Result<ErpOrder, AdapterError>;
    /// Drop cached master data of `quote` (an operator's replay after fixing it in the ERP).
    async fn forget(&self, quote: &Quote);
}

/// An order as the ERP holds it, in the canonical shape (`canonical-sales-order-bc`).
#[derive(Debug, Clone, PartialEq)]
pub struct ErpOrder {
    pub id: String,
    pub number: String,
    pub canonical: Value,
}
