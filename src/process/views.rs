//! Orders as their consumers and operators read them: one order with its history, an
//! opportunity's orders, the dead letters; and an operator's replay of a dead letter.

use super::metrics::ProcessMetrics;
use super::model::Quote;
use super::service::{Caller, QuoteToOrder, Reply, ORDERS_PATH};
use super::state::State;
use super::store::{Change, OrderRecord, OrderStore, StoreError, Transition};
use crate::clock::format_datetime;
use crate::error::GatewayError;

use serde_json::{json, Value};

impl QuoteToOrder {
    /// The order as JSON with `status`; `Location` names it.
    pub(super) async fn reply(
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

    /// An order accepted after it was a dead letter: how long the exception took to resolve
    /// (its last dead-lettering to now).
    pub(super) async fn note_resolution(&self, store: &dyn OrderStore, id: &str) {
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
