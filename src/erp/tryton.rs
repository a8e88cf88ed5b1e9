//! Tryton (7.0) over JSON-RPC: the open-source ERP the real-ERP tests run against.
//!
//! Tryton's shapes differ from Business Central's (numeric ids, `Decimal` objects, nested
//! `field.` keys, a session login), so the mapping to canonical lives here rather than in
//! mediation tables. How the master data is represented in Tryton (`scripts/tryton/README.md`):
//! a blocked customer carries the party category `blocked`; the region comes from the address
//! country (member of the `EU` organisation → EU, `US` → US, `GB` → UK); the tax id is the
//! party's first identifier; regional prices come from the price list `SALES-<region>` (no price
//! there: not sold in that region). An order is a `sale.sale` whose `reference` is the external
//! reference, created, quoted and confirmed.
//!
//! Every JSON-RPC call takes a permit from the upstream's budget and reports its outcome, like
//! the Business Central adapter.

mod changes;

use super::exchange::{classes, exchange, split_cached, MASTER_DATA_TTL};
use crate::budget::throttle::Class;
use crate::config::{TrytonSettings, Upstream};
use crate::process::adapter::{AdapterError, ErpAdapter, ErpOrder, Progress};
use crate::process::model::{Address, Credit, Customer, Product, Quote, SalesOrderCreate};
use crate::process::rules::MasterData;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A customer with the ids a sale needs.
#[derive(Debug, Clone)]
struct Party {
    customer: Customer,
    id: i64,
    address: Option<i64>,
}

#[derive(Debug, Clone)]
struct Item {
    product: Product,
    id: i64,
    unit: i64,
    taxes: Vec<i64>,
}

pub struct Tryton {
    upstream: Arc<Upstream>,
    settings: TrytonSettings,
    lookup_class: Class,
    write_class: Class,
    /// Change detection's polls and reads: the lowest-priority class by default.
    change_class: Class,
    session: tokio::sync::Mutex<Option<String>>,
    next_id: AtomicU64,
    parties: moka::future::Cache<String, Option<Party>>,
    items: moka::future::Cache<String, Option<Item>>,
    /// `region|item` → unit price in the region's price list (`None`: not listed).
    prices: moka::future::Cache<String, Option<f64>>,
    /// Price list and currency ids by name/code.
    ids: moka::future::Cache<String, Option<i64>>,
}

fn cache<V: Clone + Send + Sync + 'static>() -> moka::future::Cache<String, V> {
    moka::future::Cache::builder().max_capacity(10_000).time_to_live(MASTER_DATA_TTL).build()
}

/// Tryton's `Decimal` (`{"__class__": "Decimal", "decimal": "19.99"}`) or a plain number.
fn decimal(v: &Value) -> Option<f64> {
    match v {
        Value::Object(o) => o.get("decimal")?.as_str()?.parse().ok(),
        other => other.as_f64(),
    }
}

fn to_decimal(x: f64) -> Value {
    json!({"__class__": "Decimal", "decimal": format!("{x:.4}")})
}

/// Booleans read as 1/0 on SQLite and true/false on PostgreSQL.
fn boolean(v: &Value) -> bool {
    v.as_bool().unwrap_or_else(|| v.as_i64().is_some_and(|n| n != 0))
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn region(country: &str, organizations: &[Value]) -> String {
    if organizations.iter().any(|o| o["code"] == "EU") {
        return "EU".into();
    }
    match country {
        "GB" => "UK".into(),
        other => other.to_string(),
    }
}

impl Tryton {
    pub fn new(upstream: Arc<Upstream>, settings: TrytonSettings) -> Tryton {
        let (lookup_class, write_class) = classes(&upstream);
        Tryton {
            change_class: lookup_class.clone(),
            upstream,
            settings,
            lookup_class,
            write_class,
            session: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            parties: cache(),
            items: cache(),
            prices: cache(),
            ids: cache(),
        }
    }

    /// The budget class change detection's calls take.
    pub fn with_change_class(mut self, class: Class) -> Tryton {
        self.change_class = class;
        self
    }

    fn context(&self) -> Value {
        json!({"company": self.settings.company})
    }

    /// One JSON-RPC exchange under a budget permit: `(status, body)`.
    async fn post(
        &self,
        body: &Value,
        auth: Option<&str>,
        class: &Class,
    ) -> Result<(u16, Value), AdapterError> {
        let client =
            self.upstream.client().ok_or_else(|| AdapterError::Unavailable("no HTTP client".into()))?;
        let mut request = client
            .post(format!("{}/{}/", self.upstream.base_url, self.settings.database))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(a) = auth {
            request = request.header(http::header::AUTHORIZATION, a);
        }
        let (status, bytes) = exchange(&self.upstream, class, request).await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    async fn login(&self) -> Result<String, AdapterError> {
        let body = json!({
            "id": self.next_id.fetch_add(1, Ordering::Relaxed),
            "method": "common.db.login",
            "params": [self.settings.login, {"password": self.settings.password}, "en"],
        });
        let (status, answer) = self.post(&body, None, &self.lookup_class).await?;
        let result = &answer["result"];
        let (Some(user), Some(key)) = (result[0].as_i64(), result[1].as_str()) else {
            return Err(AdapterError::Unavailable(format!(
                "Tryton login as `{}` failed ({status}): {}",
                self.settings.login,
                answer.get("error").unwrap_or(&answer)
            )));
        };
        use base64::Engine;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{user}:{key}", self.settings.login));
        Ok(format!("Session {token}"))
    }

    /// `model.<method>` with the company context appended to `params`.
    async fn call(&self, method: &str, params: Vec<Value>, class: &Class) -> Result<Value, AdapterError> {
        self.call_in(method, params, self.context(), class).await
    }

    /// `model.<method>` with `context` appended to `params` (Tryton's last parameter).
    async fn call_in(
        &self,
        method: &str,
        mut params: Vec<Value>,
        context: Value,
        class: &Class,
    ) -> Result<Value, AdapterError> {
        params.push(context);
        let body =
            json!({"id": self.next_id.fetch_add(1, Ordering::Relaxed), "method": method, "params": params});
        for attempt in 0..2 {
            let auth = {
                let mut session = self.session.lock().await;
                if session.is_none() {
                    *session = Some(self.login().await?);
                }
                session.clone().unwrap_or_default()
            };
            let (status, mut answer) = self.post(&body, Some(&auth), class).await?;
            if status == 401 && attempt == 0 {
                // The session expired: log in again once.
                *self.session.lock().await = None;
                continue;
            }
            if status != 200 {
                return Err(AdapterError::Protocol(format!("{method}: Tryton answered {status}")));
            }
            if let Some(error) = answer.get("error") {
                return Err(match error[0].as_str() {
                    Some("UserError") => AdapterError::Rejected { status: 422, message: text(&error[1][0]) },
                    Some("UserWarning") => {
                        AdapterError::Rejected { status: 422, message: text(&error[1][1]) }
                    }
                    _ => AdapterError::Protocol(format!("{method}: {error}")),
                });
            }
            return Ok(answer.get_mut("result").map(Value::take).unwrap_or_default());
        }
        Err(AdapterError::Unavailable("Tryton refused the session twice".into()))
    }

    async fn search_read(
        &self,
        model: &str,
        domain: Value,
        fields: &[&str],
    ) -> Result<Vec<Value>, AdapterError> {
        let result = self
            .call(
                &format!("model.{model}.search_read"),
                vec![domain, json!(0), json!(null), json!(null), json!(fields)],
                &self.lookup_class,
            )
            .await?;
        Ok(result.as_array().cloned().unwrap_or_default())
    }

    async fn party(&self, code: &str) -> Result<Option<Party>, AdapterError> {
        let fetch = async {
            let fields = [
                "code",
                "name",
                "categories.name",
                "addresses.street",
                "addresses.postal_code",
                "addresses.city",
                "addresses.country.code",
                "addresses.country.organizations.code",
                "identifiers.code",
                "credit_limit_amount",
                "credit_amount",
            ];
            let found = self.search_read("party.party", json!([["code", "=", code]]), &fields).await?;
            let Some(p) = found.first() else { return Ok(None) };
            let address = p["addresses."].get(0).cloned().unwrap_or(Value::Null);
            let country = text(&address["country."]["code"]);
            let organizations = address["country."]["organizations."].as_array().cloned().unwrap_or_default();
            let blocked = p["categories."].as_array().into_iter().flatten().any(|c| c["name"] == "blocked");
            let customer = Customer {
                number: text(&p["code"]),
                name: text(&p["name"]),
                billing_address: Address {
                    line1: text(&address["street"]),
                    city: text(&address["city"]),
                    postal_code: text(&address["postal_code"]),
                    country: country.clone(),
                    ..Address::default()
                },
                currency: String::new(),
                region: region(&country, &organizations),
                tax_id: text(&p["identifiers."][0]["code"]),
                blocked: if blocked { "all".into() } else { "none".into() },
                credit: Credit {
                    limit: decimal(&p["credit_limit_amount"]).unwrap_or(0.0),
                    balance: decimal(&p["credit_amount"]).unwrap_or(0.0),
                },
            };
            Ok::<_, AdapterError>(Some(Party {
                customer,
                id: p["id"].as_i64().unwrap_or_default(),
                address: address["id"].as_i64(),
            }))
        };
        self.parties.try_get_with(code.to_string(), fetch).await.map_err(|e| (*e).clone())
    }

    async fn item(&self, code: &str) -> Result<Option<Item>, AdapterError> {
        Ok(self.items_of(&[code]).await?.remove(code))
    }

    /// The products of `codes`, from the cache or in one `search_read` for all that are not:
    /// a quote of many lines costs one ERP call, not one a line.
    async fn items_of(&self, codes: &[&str]) -> Result<HashMap<String, Item>, AdapterError> {
        let (mut found, missing) = split_cached(&self.items, codes).await;
        if missing.is_empty() {
            return Ok(found);
        }
        let fields =
            ["code", "name", "salable", "list_price", "sale_uom", "account_category.customer_taxes_used"];
        let rows = self.search_read("product.product", json!([["code", "in", missing]]), &fields).await?;
        let mut fetched: HashMap<String, Item> = HashMap::new();
        for p in &rows {
            let taxes = p["account_category."]["customer_taxes_used"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_i64)
                .collect();
            let item = Item {
                product: Product {
                    number: text(&p["code"]),
                    name: text(&p["name"]),
                    blocked: !boolean(&p["salable"]),
                    unit_price: decimal(&p["list_price"]).unwrap_or(0.0),
                },
                id: p["id"].as_i64().unwrap_or_default(),
                unit: p["sale_uom"].as_i64().unwrap_or_default(),
                taxes,
            };
            fetched.insert(item.product.number.clone(), item);
        }
        for code in missing {
            let item = fetched.remove(code);
            self.items.insert(code.to_string(), item.clone()).await;
            if let Some(item) = item {
                found.insert(code.to_string(), item);
            }
        }
        Ok(found)
    }

    /// Id of a record found by one field (price lists by name, currencies by code).
    async fn id_of(&self, model: &str, field: &str, value: &str) -> Result<Option<i64>, AdapterError> {
        let fetch = async {
            let found = self.search_read(model, json!([[field, "=", value]]), &["id"]).await?;
            Ok::<_, AdapterError>(found.first().and_then(|r| r["id"].as_i64()))
        };
        self.ids.try_get_with(format!("{model}|{value}"), fetch).await.map_err(|e| (*e).clone())
    }

    /// Unit prices of `items` in the region's price list (`SALES-<region>`), from the cache or
    /// in one `read` of every item not cached; an item without a price is not sold there.
    async fn regional_prices(
        &self,
        region: &str,
        items: &[&Item],
    ) -> Result<HashMap<String, f64>, AdapterError> {
        let key = |item: &Item| format!("{region}|{}", item.product.number);
        let mut found = HashMap::new();
        let mut missing: Vec<&Item> = Vec::new();
        for item in items {
            match self.prices.get(&key(item)).await {
                Some(Some(price)) => {
                    found.insert(item.product.number.clone(), price);
                }
                Some(None) => {}
                None => missing.push(item),
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let Some(list) = self.id_of("product.price_list", "name", &format!("SALES-{region}")).await? else {
            return Ok(found);
        };
        let mut context = self.context();
        context["price_list"] = json!(list);
        context["quantity"] = json!(1);
        let ids: Vec<i64> = missing.iter().map(|i| i.id).collect();
        let params = vec![json!(ids), json!(["sale_price_uom"])];
        let rows = self.call_in("model.product.product.read", params, context, &self.lookup_class).await?;
        let by_id: HashMap<i64, f64> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["id"].as_i64()?, decimal(&r["sale_price_uom"])?)))
            .collect();
        for item in missing {
            let price = by_id.get(&item.id).copied();
            self.prices.insert(key(item), price).await;
            if let Some(price) = price {
                found.insert(item.product.number.clone(), price);
            }
        }
        Ok(found)
    }

    async fn find_sale(&self, reference: &str) -> Result<Option<Value>, AdapterError> {
        let found = self
            .search_read(
                "sale.sale",
                json!([["reference", "=", reference]]),
                &["number", "state", "reference"],
            )
            .await?;
        Ok(found.into_iter().next())
    }

    /// Quote and confirm a sale from where it stands; returns its final record.
    async fn complete(&self, id: i64, state: &str) -> Result<ErpOrder, AdapterError> {
        if state == "draft" {
            self.call("model.sale.sale.quote", vec![json!([id])], &self.write_class).await?;
        }
        if state == "draft" || state == "quotation" {
            self.call("model.sale.sale.confirm", vec![json!([id])], &self.write_class).await?;
        }
        let read = self
            .call(
                "model.sale.sale.read",
                vec![json!([id]), json!(["number", "state", "reference"])],
                &self.lookup_class,
            )
            .await?;
        let sale = &read[0];
        Ok(ErpOrder {
            id: id.to_string(),
            number: text(&sale["number"]),
            canonical: json!({
                "id": id.to_string(),
                "number": sale["number"],
                "externalReference": sale["reference"],
                "status": sale["state"],
            }),
        })
    }
}

#[async_trait::async_trait]
impl ErpAdapter for Tryton {
    async fn master_data(&self, quote: &Quote) -> Result<MasterData, AdapterError> {
        let customer = match &quote.customer.number {
            Some(n) => self.party(n).await?.map(|p| p.customer),
            None => None,
        };
        let codes: Vec<&str> = quote.lines.iter().map(|l| l.product.as_str()).collect();
        let items = self.items_of(&codes).await?;
        let listed: Vec<&Item> = items.values().collect();
        let regional_prices = self.regional_prices(&quote.region, &listed).await?;
        let products = items.into_iter().map(|(code, item)| (code, item.product)).collect();
        Ok(MasterData { customer, products, regional_prices })
    }

    async fn create_order_once(&self, order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError> {
        let reference = order.external_reference.as_str();
        if reference.is_empty() {
            return Err(AdapterError::Rejected {
                status: 400,
                message: "an order needs an externalReference".into(),
            });
        }
        if let Some(existing) = self.find_sale(reference).await? {
            let id = existing["id"].as_i64().unwrap_or_default();
            return self.complete(id, existing["state"].as_str().unwrap_or_default()).await;
        }
        let number = order.customer_number.as_str();
        let party = self.party(number).await?.ok_or_else(|| AdapterError::Rejected {
            status: 422,
            message: format!("no Tryton party with code {number}"),
        })?;
        let mut lines = Vec::new();
        for line in &order.lines {
            let code = line.item.as_str();
            let item = self.item(code).await?.ok_or_else(|| AdapterError::Rejected {
                status: 422,
                message: format!("no Tryton product with code {code}"),
            })?;
            let discount = line.discount_percent.unwrap_or(0.0);
            let price = line.unit_price.unwrap_or(item.product.unit_price) * (1.0 - discount / 100.0);
            lines.push(json!({
                "type": "line",
                "product": item.id,
                "quantity": line.quantity,
                "unit": item.unit,
                "unit_price": to_decimal(price),
                "taxes": [["add", item.taxes]],
            }));
        }
        let mut sale = json!({
            "party": party.id,
            "reference": reference,
            "description": format!("Causeway order {reference}"),
            "lines": [["create", lines]],
        });
        if let Some(address) = party.address {
            sale["invoice_address"] = json!(address);
            sale["shipment_address"] = json!(address);
        }
        if let Some(currency) = self.id_of("currency.currency", "code", &order.currency).await? {
            sale["currency"] = json!(currency);
        }
        let created = self.call("model.sale.sale.create", vec![json!([sale])], &self.write_class).await?;
        let id = created[0]
            .as_i64()
            .ok_or_else(|| AdapterError::Protocol(format!("create returned {created}")))?;
        self.complete(id, "draft").await
    }

    async fn forget(&self, quote: &Quote) {
        if let Some(n) = &quote.customer.number {
            self.parties.invalidate(n).await;
        }
        for line in &quote.lines {
            self.items.invalidate(&line.product).await;
            self.prices.invalidate(&format!("{}|{}", quote.region, line.product)).await;
        }
    }

    async fn progress(&self, id: &str, _number: &str) -> Result<Progress, AdapterError> {
        self.sale_progress(id).await
    }

    async fn changed_since(
        &self,
        cursor: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), AdapterError> {
        self.sales_changed_since(cursor).await
    }
}
