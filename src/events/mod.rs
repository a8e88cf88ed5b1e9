//! Events back to the CRM: what happened to an order, as CloudEvents 1.0, delivered to the
//! subscribers `causeway.yaml` declares.
//!
//! The store writes each event in the same transaction as the state change that causes it (a
//! trigger on the orders table), together with one delivery per subscriber that wants its type
//! (the transactional outbox: an order cannot change state without its event, nor an event be
//! lost between the change and its delivery). The dispatcher ([`dispatch`]) delivers them,
//! each order's events in order per subscriber, with retries, and dead-letters past a horizon.

pub mod dispatch;
pub mod nats;
pub mod salesforce;
pub mod webhook;

use crate::clock::format_datetime;
use serde_json::{json, Value};

pub use crate::config::events::EVENT_TYPES as TYPES;
pub use crate::process::store::outbox::{DeadDelivery, Delivery, EventOutbox, StoredEvent};

/// The structured-mode CloudEvents 1.0 envelope of `event` (`source` names this gateway's
/// process API; `subject` the order). The order's trace rides along as the distributed-tracing
/// extension's `traceparent`, the same on every attempt (the signed body does not change).
pub fn envelope(source: &str, event: &StoredEvent) -> Value {
    let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
    let mut envelope = json!({
        "specversion": "1.0",
        "id": event.id,
        "source": source,
        "type": event.kind,
        "subject": event.order_id,
        "time": format_datetime(event.time_ms),
        "datacontenttype": "application/json",
        "data": data,
    });
    if !event.traceparent.is_empty() {
        envelope["traceparent"] = Value::String(event.traceparent.clone());
    }
    envelope
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_has_every_required_cloudevents_attribute() {
        let event = StoredEvent {
            seq: 7,
            id: "0b1c".into(),
            order_id: "o-1".into(),
            kind: "order.accepted.v1".into(),
            time_ms: 1_795_771_800_250,
            data: r#"{"orderId":"o-1","erpOrderNumber":"S-1"}"#.into(),
            traceparent: String::new(),
        };
        let e = envelope("/causeway/orders", &event);
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["id"], "0b1c");
        assert_eq!(e["source"], "/causeway/orders");
        assert_eq!(e["type"], "order.accepted.v1");
        assert_eq!(e["subject"], "o-1");
        assert_eq!(e["time"], "2026-11-27T09:30:00.250Z");
        assert_eq!(e["data"]["erpOrderNumber"], "S-1");
        assert!(e.get("traceparent").is_none(), "no trace known: no extension attribute");
        let traced = StoredEvent {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ..event
        };
        assert_eq!(envelope("/x", &traced)["traceparent"], traced.traceparent.as_str());
    }
}
