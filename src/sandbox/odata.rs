//! Business Central API v2.0 request handling: paths, OData query options, entity operations.

// Handlers return a finished error response as `Err`; boxing it would only add noise here.
#![allow(clippy::result_large_err)]

use super::{bc_error, data, Sandbox};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

const API_V2: &str = "/api/v2.0/";
const CUSTOM_API: &str = "/api/causeway/sandbox/v1.0/";

/// What a path names.
#[derive(Debug, PartialEq)]
enum Target<'a> {
    Companies,
    Company,
    Collection(&'a str),
    Entity(&'a str, &'a str),
    Lines(&'a str),
}

/// `name(key)` → (name, key without quotes); `name` → (name, None).
fn split_key(segment: &str) -> Option<(&str, Option<&str>)> {
    match segment.find('(') {
        None => Some((segment, None)),
        Some(open) => {
            let inner = segment[open + 1..].strip_suffix(')')?;
            let inner = inner.trim_matches('\'');
            (!inner.is_empty()).then_some((&segment[..open], Some(inner)))
        }
    }
}

fn parse_target(path: &str) -> Option<(Target<'_>, bool)> {
    let (rest, custom) = if let Some(r) = path.strip_prefix(API_V2) {
        (r, false)
    } else {
        (path.strip_prefix(CUSTOM_API)?, true)
    };
    let segs: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (first, company) = split_key(segs[0])?;
    if first != "companies" {
        return None;
    }
    if let Some(c) = company {
        if c != data::COMPANY_ID {
            return None;
        }
    }
    let target = match (company, &segs[1..]) {
        (None, []) => Target::Companies,
        (Some(_), []) => Target::Company,
        (Some(_), [entity]) => match split_key(entity)? {
            (name, None) => Target::Collection(name),
            (name, Some(id)) => Target::Entity(name, id),
        },
        (Some(_), [entity, "salesOrderLines"]) => match split_key(entity)? {
            ("salesOrders", Some(id)) => Target::Lines(id),
            _ => return None,
        },
        _ => return None,
    };
    Some((target, custom))
}

/// One `$filter`: alternatives joined by `or`, each a set of `field eq 'value'` clauses joined
/// by `and` (`and` binds tighter, as in OData). Quoted values may hold the words `and`/`or`.
type Filter = Vec<Vec<(String, String)>>;

/// Split `text` at ` <word> ` outside single-quoted literals.
fn split_outside_quotes<'a>(text: &'a str, word: &str) -> Vec<&'a str> {
    let sep = format!(" {word} ");
    let (mut parts, mut start, mut quoted) = (Vec::new(), 0, false);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\'' {
            quoted = !quoted;
        } else if !quoted && text[i..].starts_with(&sep) {
            parts.push(&text[start..i]);
            i += sep.len();
            start = i;
            continue;
        }
        i += 1;
    }
    parts.push(&text[start..]);
    parts
}

fn parse_filter(filter: &str) -> Result<Filter, String> {
    let mut alternatives = Vec::new();
    for alternative in split_outside_quotes(filter, "or") {
        let mut clauses = Vec::new();
        for clause in split_outside_quotes(alternative, "and") {
            let clause = clause.trim();
            let (field, value) = clause.split_once(" eq ").ok_or_else(|| {
                format!("unsupported $filter clause `{clause}`: only `field eq value` joined by `and` / `or`")
            })?;
            let value = value.trim();
            let value = match value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
                Some(quoted) => quoted.replace("''", "'"),
                None => value.to_string(),
            };
            clauses.push((field.trim().to_string(), value));
        }
        alternatives.push(clauses);
    }
    Ok(alternatives)
}

fn value_matches(v: &Value, wanted: &str) -> bool {
    match v {
        Value::String(s) => s == wanted,
        Value::Number(n) => n.to_string() == wanted,
        Value::Bool(b) => b.to_string() == wanted,
        _ => false,
    }
}

struct Query {
    filter: Filter,
    top: Option<usize>,
    skip: usize,
    expand_lines: bool,
}

fn parse_query(uri: &Uri) -> Result<Query, String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|e| format!("invalid query string: {e}"))?;
    let mut q = Query { filter: Vec::new(), top: None, skip: 0, expand_lines: false };
    for (k, v) in pairs {
        match k.as_str() {
            "$filter" => q.filter = parse_filter(&v)?,
            "$top" => q.top = Some(v.parse().map_err(|_| "$top must be a number".to_string())?),
            "$skip" => q.skip = v.parse().map_err(|_| "$skip must be a number".to_string())?,
            "$expand" if v == "salesOrderLines" => q.expand_lines = true,
            "$expand" => return Err(format!("cannot expand `{v}`")),
            "$select" | "$orderby" | "company" => {}
            other => return Err(format!("unknown query option `{other}`")),
        }
    }
    Ok(q)
}

/// The external document number a `$filter` requires of every order it returns, when it has one
/// alternative naming it (the gateway's lookup before a create): the index answers it.
fn indexed_external(q: &Query) -> Option<&str> {
    let [only] = q.filter.as_slice() else { return None };
    only.iter().find(|(f, _)| f == "externalDocumentNumber").map(|(_, v)| v.as_str())
}

fn list<'a>(items: impl IntoIterator<Item = &'a Value>, q: &Query) -> Response {
    let filtered: Vec<Value> = items
        .into_iter()
        .filter(|item| {
            q.filter.is_empty()
                || q.filter
                    .iter()
                    .any(|all| all.iter().all(|(f, v)| item.get(f).is_some_and(|x| value_matches(x, v))))
        })
        .skip(q.skip)
        .take(q.top.unwrap_or(usize::MAX))
        .map(|item| shape(item, q.expand_lines))
        .collect();
    Json(json!({ "value": filtered })).into_response()
}

/// Orders carry their lines internally; they appear only with `$expand`.
fn shape(item: &Value, expand_lines: bool) -> Value {
    let mut v = item.clone();
    if !expand_lines {
        if let Some(o) = v.as_object_mut() {
            o.remove("salesOrderLines");
        }
    }
    v
}

fn not_found(what: &str) -> Response {
    bc_error(
        StatusCode::NOT_FOUND,
        "BadRequest_NotFound",
        &format!("The {what} does not exist. Identification fields and values: Id='…'"),
    )
}

fn bad_request(message: &str) -> Response {
    bc_error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

pub(super) fn dispatch(
    sb: &Sandbox,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let Some((target, custom)) = parse_target(uri.path()) else {
        return bc_error(StatusCode::NOT_FOUND, "BadRequest_NotFound", "The request URL is not valid.");
    };
    let q = match parse_query(uri) {
        Ok(q) => q,
        Err(e) => return bad_request(&e),
    };
    let mut store = sb.inner.store.lock();
    match (method.as_str(), target, custom) {
        ("GET", Target::Companies, false) => Json(json!({ "value": [data::company()] })).into_response(),
        ("GET", Target::Company, false) => Json(data::company()).into_response(),
        ("GET", Target::Collection("priceListLines"), true) => list(&store.price_list_lines, &q),
        ("GET", Target::Collection(entity), false) => match entity {
            "customers" => list(&store.customers, &q),
            "items" => list(&store.items, &q),
            "salesOrders" => match indexed_external(&q) {
                Some(external) => list(store.orders.with_external(external), &q),
                None => list(store.orders.all(), &q),
            },
            "salesInvoices" => list(&store.invoices, &q),
            _ => not_found("entity set"),
        },
        ("GET", Target::Entity("salesOrders", id), false) => match store.orders.position_by_id(id) {
            Some(p) => Json(shape(store.orders.get(p), q.expand_lines)).into_response(),
            None => not_found("salesOrders"),
        },
        ("GET", Target::Entity(entity, id), false) => {
            let set = match entity {
                "customers" => &store.customers,
                "items" => &store.items,
                "salesInvoices" => &store.invoices,
                _ => return not_found("entity set"),
            };
            match set.iter().find(|v| v["id"] == id) {
                Some(v) => Json(shape(v, q.expand_lines)).into_response(),
                None => not_found(entity),
            }
        }
        ("GET", Target::Lines(id), false) => match store.orders.position_by_id(id) {
            Some(p) => Json(json!({ "value": store.orders.get(p)["salesOrderLines"] })).into_response(),
            None => not_found("salesOrder"),
        },
        ("POST", Target::Collection("salesOrders"), false) => {
            let order: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return bad_request(&format!("Invalid JSON: {e}")),
            };
            match create_order(&mut store, order) {
                Ok((created, duplicate)) => {
                    drop(store);
                    sb.changed("salesOrders", created["id"].as_str().unwrap_or_default(), "created");
                    let mut c = sb.inner.counters.lock();
                    c.orders_created += 1;
                    if duplicate {
                        c.duplicate_external_document_numbers += 1;
                    }
                    let etag = created["@odata.etag"].as_str().unwrap_or_default().to_string();
                    let mut resp = (StatusCode::CREATED, Json(created)).into_response();
                    if let Ok(v) = etag.parse() {
                        resp.headers_mut().insert("etag", v);
                    }
                    resp
                }
                Err(resp) => resp,
            }
        }
        ("PATCH", Target::Entity("salesOrders", id), false) => {
            let patch: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return bad_request(&format!("Invalid JSON: {e}")),
            };
            let Some(pos) = store.orders.position_by_id(id) else {
                return not_found("salesOrder");
            };
            if let Err(resp) = check_if_match(headers, store.orders.get(pos)) {
                return resp;
            }
            let resp = store.orders.modify(pos, |order| patch_order(order, &patch));
            drop(store);
            if resp.status().is_success() {
                sb.changed("salesOrders", id, "updated");
            }
            resp
        }
        ("PATCH", Target::Entity("customers", id), false) => {
            let patch: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return bad_request(&format!("Invalid JSON: {e}")),
            };
            let Some(customer) = store.customers.iter_mut().find(|c| c["id"] == id) else {
                return not_found("customer");
            };
            if let Err(resp) = check_if_match(headers, customer) {
                return resp;
            }
            patch_entity(customer, &patch, CUSTOMER_WRITABLE, "customer")
        }
        ("DELETE", Target::Entity("salesOrders", id), false) => {
            let Some(pos) = store.orders.position_by_id(id) else {
                return not_found("salesOrder");
            };
            if let Err(resp) = check_if_match(headers, store.orders.get(pos)) {
                return resp;
            }
            store.orders.remove(pos);
            drop(store);
            sb.changed("salesOrders", id, "deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        _ => bc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "BadRequest_MethodNotAllowed",
            "The HTTP method is not allowed on this resource.",
        ),
    }
}

pub(super) fn check_if_match(headers: &HeaderMap, order: &Value) -> Result<(), Response> {
    let Some(tag) = headers.get("if-match").and_then(|v| v.to_str().ok()) else {
        return Err(bc_error(
            StatusCode::PRECONDITION_REQUIRED,
            "Request_PreconditionRequired",
            "Could not validate the client concurrency token required by the service. Provide If-Match.",
        ));
    };
    if tag != "*" && order["@odata.etag"] != tag {
        return Err(bc_error(
            StatusCode::PRECONDITION_FAILED,
            "Request_EntityChanged",
            "Another user has already changed the record.",
        ));
    }
    Ok(())
}

const ORDER_FIELDS: &[&str] = &[
    "externalDocumentNumber",
    "orderDate",
    "postingDate",
    "customerId",
    "customerNumber",
    "currencyCode",
    "paymentTermsId",
    "salesOrderLines",
    "requestedDeliveryDate",
    "discountAmount",
];
const LINE_FIELDS: &[&str] = &[
    "lineType",
    "lineObjectNumber",
    "itemId",
    "description",
    "quantity",
    "unitPrice",
    "discountPercent",
    "sequence",
];

fn tax_percent(region: &str) -> f64 {
    match region {
        "EU" => 19.0,
        "UK" => 20.0,
        "APAC" => 10.0,
        _ => 0.0,
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn etag(version: u64) -> String {
    format!("W/\"JzE5OzE3{version}Oyc=\"")
}

/// Create an order as Business Central would, with its business validation. Returns the order
/// and whether its external document number was already used (BC does not refuse that).
fn create_order(store: &mut super::Store, order: Value) -> Result<(Value, bool), Response> {
    let Some(obj) = order.as_object() else {
        return Err(bad_request("The request body must be a JSON object."));
    };
    if let Some(unknown) = obj.keys().find(|k| !ORDER_FIELDS.contains(&k.as_str())) {
        return Err(bad_request(&format!(
            "The property '{unknown}' does not exist on type 'Microsoft.NAV.salesOrder'."
        )));
    }
    let customer = match (
        obj.get("customerNumber").and_then(Value::as_str),
        obj.get("customerId").and_then(Value::as_str),
    ) {
        (Some(n), _) => store.customers.iter().find(|c| c["number"] == n),
        (None, Some(id)) => store.customers.iter().find(|c| c["id"] == id),
        _ => return Err(bad_request("You must specify a customer (customerNumber or customerId).")),
    };
    let Some(customer) = customer.cloned() else {
        return Err(bad_request("The field Sell-to Customer No. of table Sales Header contains a value that cannot be found in the related table (Customer)."));
    };
    if customer["blocked"] == "All" {
        return Err(bad_request(&format!(
            "You cannot create this type of document when Customer {} is blocked with type All",
            customer["number"].as_str().unwrap_or("")
        )));
    }
    let region = customer["taxAreaDisplayName"].as_str().unwrap_or("US").to_string();
    let tax = tax_percent(&region);
    let currency = obj
        .get("currencyCode")
        .and_then(Value::as_str)
        .unwrap_or(customer["currencyCode"].as_str().unwrap_or("USD"));
    let order_id = data::guid(0x50, store.next_order);
    let mut lines = Vec::new();
    let (mut net, mut discount_total) = (0.0, 0.0);
    let empty = Vec::new();
    let input_lines = obj.get("salesOrderLines").and_then(Value::as_array).unwrap_or(&empty);
    for (i, line) in input_lines.iter().enumerate() {
        let Some(l) = line.as_object() else {
            return Err(bad_request("Each sales order line must be an object."));
        };
        if let Some(unknown) = l.keys().find(|k| !LINE_FIELDS.contains(&k.as_str())) {
            return Err(bad_request(&format!(
                "The property '{unknown}' does not exist on type 'Microsoft.NAV.salesOrderLine'."
            )));
        }
        let item = match (
            l.get("lineObjectNumber").and_then(Value::as_str),
            l.get("itemId").and_then(Value::as_str),
        ) {
            (Some(n), _) => store.items.iter().find(|it| it["number"] == n),
            (None, Some(id)) => store.items.iter().find(|it| it["id"] == id),
            _ => return Err(bad_request("A sales order line needs lineObjectNumber or itemId.")),
        };
        let Some(item) = item else {
            return Err(bad_request("The field No. of table Sales Line contains a value that cannot be found in the related table (Item)."));
        };
        if item["blocked"] == true {
            return Err(bad_request(&format!("Item {} is blocked.", item["number"].as_str().unwrap_or(""))));
        }
        let quantity = l.get("quantity").and_then(Value::as_f64).unwrap_or(0.0);
        if quantity <= 0.0 {
            return Err(bad_request("Quantity must be positive."));
        }
        let unit_price =
            l.get("unitPrice").and_then(Value::as_f64).unwrap_or(item["unitPrice"].as_f64().unwrap_or(0.0));
        let discount = l.get("discountPercent").and_then(Value::as_f64).unwrap_or(0.0);
        if !(0.0..=100.0).contains(&discount) {
            return Err(bad_request("The Line Discount % must be between 0 and 100."));
        }
        let gross = quantity * unit_price;
        let line_discount = round2(gross * discount / 100.0);
        let amount = round2(gross - line_discount);
        net += amount;
        discount_total += line_discount;
        lines.push(json!({
            "id": data::guid(0x51, store.next_order * 1000 + i as u32 + 1),
            "documentId": order_id,
            "sequence": (i as u64 + 1) * 10000,
            "itemId": item["id"],
            "lineType": "Item",
            "lineObjectNumber": item["number"],
            "description": item["displayName"],
            "unitOfMeasureCode": item["baseUnitOfMeasureCode"],
            "quantity": quantity,
            "unitPrice": unit_price,
            "discountAmount": line_discount,
            "discountPercent": discount,
            "amountExcludingTax": amount,
            "taxPercent": tax,
            "totalTaxAmount": round2(amount * tax / 100.0),
            "amountIncludingTax": round2(amount * (1.0 + tax / 100.0)),
        }));
    }
    let external = obj.get("externalDocumentNumber").and_then(Value::as_str).unwrap_or("").to_string();
    let duplicate = !external.is_empty() && store.external_refs.contains_key(&external);
    let number = format!("S-ORD{}", 101000 + store.next_order);
    let net = round2(net);
    let tax_amount = round2(net * tax / 100.0);
    let created = json!({
        "@odata.etag": etag(1),
        "id": order_id,
        "number": number,
        "externalDocumentNumber": external,
        "orderDate": obj.get("orderDate").cloned().unwrap_or(json!("2026-01-15")),
        "postingDate": obj.get("postingDate").cloned().unwrap_or(json!("2026-01-15")),
        "customerId": customer["id"],
        "customerNumber": customer["number"],
        "customerName": customer["displayName"],
        "currencyCode": currency,
        "paymentTermsId": customer["paymentTermsId"],
        "status": "Draft",
        "fullyShipped": false,
        "discountAmount": round2(discount_total),
        "totalAmountExcludingTax": net,
        "totalTaxAmount": tax_amount,
        "totalAmountIncludingTax": round2(net + tax_amount),
        "lastModifiedDateTime": "2026-01-15T09:00:00Z",
        "salesOrderLines": lines
    });
    if !external.is_empty() {
        store.external_refs.insert(external, store.next_order);
    }
    store.next_order += 1;
    store.orders.push(created.clone());
    Ok((created, duplicate))
}

const ORDER_WRITABLE: &[&str] =
    &["externalDocumentNumber", "orderDate", "postingDate", "requestedDeliveryDate", "status"];
/// What finance fixes on a customer card (Business Central allows more).
const CUSTOMER_WRITABLE: &[&str] = &[
    "displayName",
    "addressLine1",
    "addressLine2",
    "city",
    "state",
    "postalCode",
    "country",
    "blocked",
    "creditLimit",
    "taxRegistrationNumber",
];

fn patch_order(order: &mut Value, patch: &Value) -> Response {
    patch_entity(order, patch, ORDER_WRITABLE, "sales order")
}

fn patch_entity(order: &mut Value, patch: &Value, writable: &[&str], what: &str) -> Response {
    let Some(fields) = patch.as_object() else {
        return bad_request("The request body must be a JSON object.");
    };
    if let Some(bad) = fields.keys().find(|k| !writable.contains(&k.as_str())) {
        return bad_request(&format!("The property '{bad}' cannot be changed on a {what}."));
    }
    let obj: &mut Map<String, Value> = order.as_object_mut().expect("entities are objects");
    for (k, v) in fields {
        obj.insert(k.clone(), v.clone());
    }
    next_version(order);
    Json(shape(order, false)).into_response()
}

/// Move an entity's `@odata.etag` to its next version (every change does).
pub(super) fn next_version(entity: &mut Value) {
    let version = entity["@odata.etag"]
        .as_str()
        .and_then(|t| t.strip_prefix("W/\"JzE5OzE3"))
        .and_then(|t| t.strip_suffix("Oyc=\""))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    entity["@odata.etag"] = json!(etag(version + 1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let c = data::COMPANY_ID;
        assert_eq!(parse_target("/api/v2.0/companies"), Some((Target::Companies, false)));
        assert_eq!(
            parse_target(&format!("/api/v2.0/companies({c})/items")),
            Some((Target::Collection("items"), false))
        );
        let p = format!("/api/v2.0/companies({c})/salesOrders(abc)/salesOrderLines");
        assert_eq!(parse_target(&p), Some((Target::Lines("abc"), false)));
        assert_eq!(parse_target("/api/v2.0/companies(other)/items"), None);
        assert_eq!(parse_target("/api/v1.0/companies"), None);
    }

    #[test]
    fn filters() {
        assert_eq!(
            parse_filter("number eq 'C10000' and blocked eq ''").unwrap(),
            vec![vec![("number".into(), "C10000".into()), ("blocked".into(), "".into())]]
        );
        assert_eq!(parse_filter("displayName eq 'O''Neil'").unwrap()[0][0].1, "O'Neil");
        assert!(parse_filter("number gt 5").is_err());
        assert_eq!(
            parse_filter("number eq 'a' or number eq 'b and c' or number eq 'x or y'").unwrap(),
            vec![
                vec![("number".into(), "a".into())],
                vec![("number".into(), "b and c".into())],
                vec![("number".into(), "x or y".into())]
            ]
        );
    }
}
