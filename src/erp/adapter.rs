//! The ERP adapter of the process APIs: master-data lookups, find-by-external-reference and
//! create, in canonical shapes. Business Central (the sandbox's dialect) is the first; field
//! shapes come from the shipped mediation mappings, not from code.
//!
//! Every call takes a permit from the upstream's shared budget, like proxied traffic, and reports
//! the outcome to it, so the process APIs can never push the ERP past its limits. Master data is
//! cached (bounded, with a TTL); concurrent lookups of one key make one ERP call.

use crate::config::{Config, Upstream};
use crate::policy::mediation::{MediationPolicy, Transform};
use crate::policy::throttle::{Class, Outcome, Refusal};
use crate::policy::Policy;
use crate::process::model::{Customer, Product, Quote};
use crate::process::rules::MasterData;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdapterError {
    /// Transient: unreachable, timed out, throttled, 5xx, or the budget refused. Retry later.
    #[error("ERP unavailable: {0}")]
    Unavailable(String),
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

/// Take a permit from the upstream's budget (none when it has no budget).
pub async fn permit(
    upstream: &Upstream,
    class: &Class,
) -> Result<Option<crate::policy::throttle::Permit>, AdapterError> {
    match upstream.budget.as_ref() {
        Some(b) => b
            .budget
            .acquire(class, crate::policy::throttle::current_consumer().as_ref())
            .await
            .map(Some)
            .map_err(|r| {
                AdapterError::Unavailable(match r {
                    Refusal::Busy { .. } => "the ERP budget is exhausted".into(),
                    Refusal::CircuitOpen { .. } => "the ERP circuit is open".into(),
                })
            }),
        None => Ok(None),
    }
}

/// Send `request` under a permit from the upstream's budget and report the outcome to it: 429
/// and 503 are overload (with `Retry-After`), other 5xx and transport errors are failures; both
/// are `Unavailable` to the caller. Any other status comes back with its body.
pub async fn exchange(
    upstream: &Upstream,
    class: &Class,
    request: reqwest::RequestBuilder,
) -> Result<(u16, bytes::Bytes), AdapterError> {
    let permit = permit(upstream, class).await?;
    let report = |o: Outcome| {
        if let Some(p) = &permit {
            p.budget().report(o);
        }
    };
    let response = match request.timeout(upstream.connect_timeout + upstream.read_timeout).send().await {
        Ok(r) => r,
        Err(e) => {
            report(Outcome::Failure);
            return Err(AdapterError::Unavailable(e.to_string()));
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::policy::throttle::parse_retry_after);
    let body = response.bytes().await.map_err(|e| {
        report(Outcome::Failure);
        AdapterError::Unavailable(e.to_string())
    })?;
    match status {
        429 | 503 => {
            report(Outcome::Overload(retry_after));
            Err(AdapterError::Unavailable(format!("{} answered {status}", upstream.name)))
        }
        500.. => {
            report(Outcome::Failure);
            Err(AdapterError::Unavailable(format!("{} answered {status}", upstream.name)))
        }
        _ => {
            report(Outcome::Success);
            Ok((status, body))
        }
    }
}

/// `keys` (each once) split into what `cache` holds, found (known-absent ones left out), and
/// what it does not hold yet: those are fetched together.
pub async fn split_cached<'k, V: Clone + Send + Sync + 'static>(
    cache: &moka::future::Cache<String, Option<V>>,
    keys: &[&'k str],
) -> (HashMap<String, V>, Vec<&'k str>) {
    let mut found = HashMap::new();
    let mut missing: Vec<&str> = Vec::new();
    for key in keys {
        match cache.get(*key).await {
            Some(Some(v)) => {
                found.insert(key.to_string(), v);
            }
            Some(None) => {}
            None if !missing.contains(key) => missing.push(key),
            None => {}
        }
    }
    (found, missing)
}

/// Budget classes for lookups (interactive) and writes.
pub fn classes(up: &Upstream) -> (Class, Class) {
    let class = |name: &str| up.budget.as_ref().and_then(|b| b.classes.get(name).cloned());
    let default_class = up.budget.as_ref().map(|b| b.default_class.clone());
    (
        class("interactive").or(default_class.clone()).unwrap_or_else(Class::unlimited),
        class("write").or(default_class).unwrap_or_else(Class::unlimited),
    )
}

/// An order as the ERP holds it, in the canonical shape (`canonical-sales-order-bc`).
#[derive(Debug, Clone, PartialEq)]
pub struct ErpOrder {
    pub id: String,
    pub number: String,
    pub canonical: Value,
}

/// Business Central API v2.0 for one company.
pub struct BusinessCentral {
    upstream: Arc<Upstream>,
    /// `/api/v2.0/companies(<id>)`
    company_path: String,
    /// The sandbox's custom price-list page (a BC extension publishes the same).
    price_list_path: String,
    lookup_class: Class,
    write_class: Class,
    customer_map: Arc<Policy>,
    item_map: Arc<Policy>,
    order_create_map: Arc<Policy>,
    order_map: Arc<Policy>,
    customers: moka::future::Cache<String, Option<Customer>>,
    products: moka::future::Cache<String, Option<Product>>,
    prices: moka::future::Cache<String, Arc<HashMap<String, f64>>>,
}

/// Master data is kept this long: long enough to spare the ERP's budget on bursts of quotes,
/// short enough that a fixed customer record is seen within minutes.
pub const MASTER_DATA_TTL: Duration = Duration::from_secs(120);
const MASTER_DATA_ENTRIES: u64 = 10_000;
/// Item numbers per filtered lookup (`number eq 'a' or number eq 'b' …`), short of URL limits.
const BATCH: usize = 50;

fn master_cache<V: Clone + Send + Sync + 'static>() -> moka::future::Cache<String, V> {
    moka::future::Cache::builder().max_capacity(MASTER_DATA_ENTRIES).time_to_live(MASTER_DATA_TTL).build()
}

fn mediation(p: &Policy) -> &MediationPolicy {
    match p {
        Policy::Mediation(m) => m,
        // Checked in `new`.
        _ => unreachable!("mapping policies are mediation policies"),
    }
}

impl BusinessCentral {
    /// Built from a loaded configuration: the upstream by name and the shipped BC mappings.
    pub fn new(config: &Config, upstream: &str, company_id: &str) -> Result<BusinessCentral, String> {
        let up =
            config.upstreams.get(upstream).cloned().ok_or_else(|| format!("no upstream `{upstream}`"))?;
        let policy = |name: &str| -> Result<Arc<Policy>, String> {
            match config.policies.get(name) {
                Some(p) if matches!(p.as_ref(), Policy::Mediation(_)) => Ok(p.clone()),
                _ => {
                    Err(format!("the adapter needs the mediation policy `{name}` (policies/mediation.yaml)"))
                }
            }
        };
        let (lookup_class, write_class) = classes(&up);
        Ok(BusinessCentral {
            company_path: format!("/api/v2.0/companies({company_id})"),
            price_list_path: format!("/api/causeway/sandbox/v1.0/companies({company_id})/priceListLines"),
            lookup_class,
            write_class,
            customer_map: policy("canonical-customer-bc")?,
            item_map: policy("canonical-item-bc")?,
            order_create_map: policy("canonical-sales-order-create-bc")?,
            order_map: policy("canonical-sales-order-bc")?,
            customers: master_cache(),
            products: master_cache(),
            prices: moka::future::Cache::builder().max_capacity(64).time_to_live(MASTER_DATA_TTL).build(),
            upstream: up,
        })
    }

    /// One exchange with the ERP under a budget permit; the outcome goes back to the budget.
    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        class: &Class,
    ) -> Result<(u16, Vec<u8>), AdapterError> {
        let client =
            self.upstream.client().ok_or_else(|| AdapterError::Unavailable("no HTTP client".into()))?;
        let mut request = client
            .request(method, format!("{}{path_and_query}", self.upstream.base_url))
            .header(http::header::ACCEPT, "application/json");
        if let Some((name, value)) = &self.upstream.credential {
            request = request.header(name.clone(), value.clone());
        }
        if let Some(body) = body {
            request = request.header(http::header::CONTENT_TYPE, "application/json").body(body);
        }
        let (status, body) = exchange(&self.upstream, class, request).await?;
        Ok((status, body.to_vec()))
    }

    async fn get_json(&self, path_and_query: &str) -> Result<Value, AdapterError> {
        let (status, body) =
            self.call(reqwest::Method::GET, path_and_query, None, &self.lookup_class).await?;
        if status >= 400 {
            return Err(rejected(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| AdapterError::Protocol(e.to_string()))
    }

    /// The first element of an OData `value` list, mapped to canonical with `policy`.
    async fn lookup<T: serde::de::DeserializeOwned>(
        &self,
        set: &str,
        field: &str,
        key: &str,
        policy: &Policy,
    ) -> Result<Option<T>, AdapterError> {
        let filter = format!("{field} eq '{}'", key.replace('\'', "''"));
        let query = serde_urlencoded::to_string([("$filter", filter.as_str())]).unwrap_or_default();
        let list = self.get_json(&format!("{}/{set}?{query}", self.company_path)).await?;
        let Some(first) = list["value"].as_array().and_then(|v| v.first()).cloned() else { return Ok(None) };
        let mapped = map_response(mediation(policy), first)?;
        serde_json::from_value(mapped).map(Some).map_err(|e| AdapterError::Protocol(e.to_string()))
    }

    pub async fn customer(&self, number: &str) -> Result<Option<Customer>, AdapterError> {
        self.customers
            .try_get_with(number.to_string(), self.lookup("customers", "number", number, &self.customer_map))
            .await
            .map_err(|e| (*e).clone())
    }

    pub async fn product(&self, number: &str) -> Result<Option<Product>, AdapterError> {
        self.products
            .try_get_with(number.to_string(), self.lookup("items", "number", number, &self.item_map))
            .await
            .map_err(|e| (*e).clone())
    }

    /// The region's price list: item number → unit price.
    pub async fn price_list(&self, region: &str) -> Result<Arc<HashMap<String, f64>>, AdapterError> {
        let fetch = async {
            let filter = format!("region eq '{}'", region.replace('\'', "''"));
            let query = serde_urlencoded::to_string([("$filter", filter.as_str())]).unwrap_or_default();
            let list = self.get_json(&format!("{}?{query}", self.price_list_path)).await?;
            let prices = list["value"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| Some((l["itemNumber"].as_str()?.to_string(), l["unitPrice"].as_f64()?)))
                .collect();
            Ok::<_, AdapterError>(Arc::new(prices))
        };
        self.prices.try_get_with(region.to_string(), fetch).await.map_err(|e| (*e).clone())
    }

    /// Everything the quote rules need about `quote`, from the cache or the ERP.
    pub async fn master_data(&self, quote: &Quote) -> Result<MasterData, AdapterError> {
        ErpAdapter::master_data(self, quote).await
    }

    /// The items of `numbers` (each once), from the cache or in filtered queries of at most
    /// [`BATCH`] numbers each: a quote of many lines costs the ERP a few requests, not one a line.
    async fn products(&self, numbers: &[&str]) -> Result<HashMap<String, Product>, AdapterError> {
        let (mut found, missing) = split_cached(&self.products, numbers).await;
        for chunk in missing.chunks(BATCH) {
            let filter = chunk
                .iter()
                .map(|n| format!("number eq '{}'", n.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(" or ");
            let query = serde_urlencoded::to_string([("$filter", filter.as_str())]).unwrap_or_default();
            let list = self.get_json(&format!("{}/items?{query}", self.company_path)).await?;
            let mut fetched: HashMap<String, Product> = HashMap::new();
            for item in list["value"].as_array().into_iter().flatten() {
                let mapped = map_response(mediation(&self.item_map), item.clone())?;
                let product: Product =
                    serde_json::from_value(mapped).map_err(|e| AdapterError::Protocol(e.to_string()))?;
                fetched.insert(product.number.clone(), product);
            }
            for n in chunk {
                let product = fetched.get(*n).cloned();
                self.products.insert(n.to_string(), product.clone()).await;
                if let Some(p) = product {
                    found.insert(n.to_string(), p);
                }
            }
        }
        Ok(found)
    }

    async fn fetch_master_data(&self, quote: &Quote) -> Result<MasterData, AdapterError> {
        let customer = match &quote.customer.number {
            Some(n) => self.customer(n).await?,
            None => None,
        };
        let numbers: Vec<&str> = quote.lines.iter().map(|l| l.product.as_str()).collect();
        let products = self.products(&numbers).await?;
        let list = self.price_list(&quote.region).await?;
        let regional_prices = quote
            .lines
            .iter()
            .filter_map(|l| list.get(&l.product).map(|p| (l.product.clone(), *p)))
            .collect();
        Ok(MasterData { customer, products, regional_prices })
    }

    async fn forget_cached(&self, quote: &Quote) {
        if let Some(n) = &quote.customer.number {
            self.customers.invalidate(n).await;
        }
        for line in &quote.lines {
            self.products.invalidate(&line.product).await;
        }
        self.prices.invalidate(&quote.region).await;
    }

    /// The order the ERP holds for this external reference, if any. Looked up before every
    /// create and every retry: no create call of an ERP is idempotent.
    pub async fn find_order(&self, external_reference: &str) -> Result<Option<ErpOrder>, AdapterError> {
        let filter = format!("externalDocumentNumber eq '{}'", external_reference.replace('\'', "''"));
        let query =
            serde_urlencoded::to_string([("$filter", filter.as_str()), ("$expand", "salesOrderLines")])
                .unwrap_or_default();
        let list = self.get_json(&format!("{}/salesOrders?{query}", self.company_path)).await?;
        let Some(first) = list["value"].as_array().and_then(|v| v.first()).cloned() else { return Ok(None) };
        order(map_response(mediation(&self.order_map), first)?).map(Some)
    }

    /// Create the order (canonical sales order in, canonical order out) unless the ERP already
    /// has one with its external reference: then that one is returned.
    pub async fn create_order_once(&self, canonical: &Value) -> Result<ErpOrder, AdapterError> {
        ErpAdapter::create_order_once(self, canonical).await
    }

    async fn create_once(&self, canonical: &Value) -> Result<ErpOrder, AdapterError> {
        let reference = canonical["externalReference"].as_str().unwrap_or_default();
        if reference.is_empty() {
            return Err(AdapterError::Rejected {
                status: 400,
                message: "an order needs an externalReference".into(),
            });
        }
        if let Some(existing) = self.find_order(reference).await? {
            return Ok(existing);
        }
        let m = mediation(&self.order_create_map);
        let request = m
            .request
            .as_ref()
            .map(|r| &r.transform)
            .ok_or_else(|| AdapterError::Protocol("no request mapping".into()))?;
        let body = apply(request, canonical.clone(), m)?;
        let (status, answer) = self
            .call(
                reqwest::Method::POST,
                &format!("{}/salesOrders", self.company_path),
                Some(body),
                &self.write_class,
            )
            .await?;
        if status >= 400 {
            return Err(rejected(status, &answer));
        }
        let created: Value =
            serde_json::from_slice(&answer).map_err(|e| AdapterError::Protocol(e.to_string()))?;
        order(map_response(mediation(&self.order_map), created)?)
    }
}

#[async_trait::async_trait]
impl ErpAdapter for BusinessCentral {
    async fn master_data(&self, quote: &Quote) -> Result<MasterData, AdapterError> {
        self.fetch_master_data(quote).await
    }

    async fn create_order_once(&self, canonical: &Value) -> Result<ErpOrder, AdapterError> {
        self.create_once(canonical).await
    }

    async fn forget(&self, quote: &Quote) {
        self.forget_cached(quote).await
    }
}

fn apply(t: &Transform, input: Value, m: &MediationPolicy) -> Result<Vec<u8>, AdapterError> {
    t.apply(input, m.limits).map(|b| b.to_vec()).map_err(|f| AdapterError::Protocol(format!("{f:?}")))
}

fn map_response(m: &MediationPolicy, erp: Value) -> Result<Value, AdapterError> {
    let t = m
        .response
        .as_ref()
        .map(|r| &r.transform)
        .ok_or_else(|| AdapterError::Protocol("no response mapping".into()))?;
    let bytes = apply(t, erp, m)?;
    serde_json::from_slice(&bytes).map_err(|e| AdapterError::Protocol(e.to_string()))
}

fn order(canonical: Value) -> Result<ErpOrder, AdapterError> {
    let field = |k: &str| {
        canonical[k]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AdapterError::Protocol(format!("order without {k}")))
    };
    Ok(ErpOrder { id: field("id")?, number: field("number")?, canonical })
}

/// A 4xx with Business Central's `{"error": {"code", "message"}}` body.
fn rejected(status: u16, body: &[u8]) -> AdapterError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned());
    AdapterError::Rejected { status, message }
}
