//! What happens to an order in the ERP after it is created, driven through control endpoints so
//! tests can play the warehouse and finance (not limited, not part of the BC API):
//! `POST /sandbox/orders/{order}/ship|invoice|pay|cancel`, `{order}` the order's number or id.
//!
//! As in Business Central: shipping marks the order `fullyShipped`; invoicing posts a sales
//! invoice (`orderId`, `orderNumber`, status `Open`) and deletes the fully invoiced order (an
//! order not shipped yet is shipped and invoiced at once); paying sets the invoice `Paid` with
//! nothing remaining; cancelling deletes an order not invoiced. Each change is notified to the
//! webhook subscriptions of its entity set.

use super::{bc_error, data, Sandbox, Store};
use crate::clock::format_datetime;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

fn now() -> String {
    format_datetime(crate::clock::now_ms())
}

fn conflict(message: &str) -> Response {
    bc_error(StatusCode::CONFLICT, "Sandbox_InvalidTransition", message)
}

fn missing(order: &str) -> Response {
    bc_error(
        StatusCode::NOT_FOUND,
        "BadRequest_NotFound",
        &format!("No sales order or invoice for `{order}`."),
    )
}

fn find_invoice<'s>(store: &'s mut Store, key: &str) -> Option<&'s mut Value> {
    store.invoices.iter_mut().find(|i| !key.is_empty() && (i["orderNumber"] == key || i["orderId"] == key))
}

fn bump(entity: &mut Value) {
    super::odata::next_version(entity);
    entity["lastModifiedDateTime"] = json!(now());
}

pub(super) async fn ship(State(sb): State<Sandbox>, Path(key): Path<String>) -> Response {
    let mut store = sb.inner.store.lock();
    if find_invoice(&mut store, &key).is_some() {
        return conflict("The order is invoiced: it was shipped with its invoice.");
    }
    let Some(pos) = store.orders.position(&key) else { return missing(&key) };
    let shipped = store.orders.modify(pos, |order| {
        if order["fullyShipped"] == true {
            return None;
        }
        order["fullyShipped"] = json!(true);
        order["status"] = json!("Open");
        order["shipmentDate"] = json!(now()[..10]);
        bump(order);
        Some((order["id"].as_str().unwrap_or_default().to_string(), shown(order)))
    });
    let Some((id, shown)) = shipped else { return conflict("The order is already fully shipped.") };
    drop(store);
    sb.changed("salesOrders", &id, "updated");
    Json(shown).into_response()
}

pub(super) async fn invoice(State(sb): State<Sandbox>, Path(key): Path<String>) -> Response {
    let mut store = sb.inner.store.lock();
    if find_invoice(&mut store, &key).is_some() {
        return conflict("The order is already invoiced.");
    }
    let Some(pos) = store.orders.position(&key) else {
        return missing(&key);
    };
    let order = store.orders.remove(pos);
    let n = store.invoices.len() as u32 + 1;
    let total = order["totalAmountIncludingTax"].clone();
    let today = now()[..10].to_string();
    let invoice = json!({
        "@odata.etag": "W/\"JzE5OzE3MU9yYz0i\"",
        "id": data::guid(0x1B, n),
        "number": format!("PS-INV{}", 104000 + n),
        "externalDocumentNumber": order["externalDocumentNumber"],
        "invoiceDate": today,
        "postingDate": today,
        "dueDate": today,
        "customerId": order["customerId"],
        "customerNumber": order["customerNumber"],
        "customerName": order["customerName"],
        "orderId": order["id"],
        "orderNumber": order["number"],
        "currencyCode": order["currencyCode"],
        "status": "Open",
        "totalAmountExcludingTax": order["totalAmountExcludingTax"],
        "totalTaxAmount": order["totalTaxAmount"],
        "totalAmountIncludingTax": total,
        "remainingAmount": total,
        "lastModifiedDateTime": now()
    });
    store.invoices.push(invoice.clone());
    drop(store);
    let order_id = order["id"].as_str().unwrap_or_default();
    sb.changed("salesInvoices", invoice["id"].as_str().unwrap_or_default(), "created");
    sb.changed("salesOrders", order_id, "deleted");
    (StatusCode::CREATED, Json(invoice)).into_response()
}

pub(super) async fn pay(State(sb): State<Sandbox>, Path(key): Path<String>) -> Response {
    let mut store = sb.inner.store.lock();
    let Some(invoice) = find_invoice(&mut store, &key) else {
        return if store.orders.position(&key).is_some() {
            conflict("The order is not invoiced yet: there is nothing to pay.")
        } else {
            missing(&key)
        };
    };
    if invoice["status"] == "Paid" {
        return conflict("The invoice is already paid.");
    }
    invoice["status"] = json!("Paid");
    invoice["remainingAmount"] = json!(0.0);
    bump(invoice);
    let (id, shown) = (invoice["id"].as_str().unwrap_or_default().to_string(), invoice.clone());
    drop(store);
    sb.changed("salesInvoices", &id, "updated");
    Json(shown).into_response()
}

pub(super) async fn cancel(State(sb): State<Sandbox>, Path(key): Path<String>) -> Response {
    let mut store = sb.inner.store.lock();
    if find_invoice(&mut store, &key).is_some() {
        return conflict("The order is invoiced: cancel the invoice with a credit memo instead.");
    }
    let Some(pos) = store.orders.position(&key) else {
        return missing(&key);
    };
    let order = store.orders.remove(pos);
    drop(store);
    sb.changed("salesOrders", order["id"].as_str().unwrap_or_default(), "deleted");
    StatusCode::NO_CONTENT.into_response()
}

fn shown(order: &Value) -> Value {
    let mut v = order.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("salesOrderLines");
    }
    v
}
