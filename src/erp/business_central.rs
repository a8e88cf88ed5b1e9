//! The Business Central API v2.0 adapter of the process APIs (the sandbox's dialect): master-data
//! lookups, find-by-external-reference and create, in canonical shapes. Field shapes come from the
//! shipped mediation mappings, not from code. Every call goes through the upstream's budget
//! ([`super::exchange`]); master data is cached (bounded, with a TTL), concurrent lookups of one
//! key make one ERP call.

mod changes;

use super::exchange::{change_class, classes, exchange, master_cache, split_cached, MASTER_DATA_TTL};
use crate::budget::throttle::Class;
use crate::config::{Config, Upstream};
use crate::mediation::{MediationPolicy, Transform};
use crate::policy::Policy;
use crate::process::adapter::{AdapterError, ChangedResource, ErpAdapter, ErpOrder, Progress};
use crate::process::model::{Customer, Product, Quote, SalesOrderCreate};
use crate::process::rules::MasterData;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Business Central API v2.0 for one company.
pub struct BusinessCentral {
    upstream: Arc<Upstream>,
    company_id: String,
    /// `/api/v2.0/companies(<id>)`
    company_path: String,
    /// The sandbox's custom price-list page (a BC extension publishes the same).
    price_list_path: String,
    lookup_class: Class,
    write_class: Class,
    /// Change detection's reads and subscriptions: the lowest-priority class by default.
    change_class: Class,
    customer_map: Arc<Policy>,
    item_map: Arc<Policy>,
    order_create_map: Arc<Policy>,
    order_map: Arc<Policy>,
    customers: moka::future::Cache<String, Option<Customer>>,
    products: moka::future::Cache<String, Option<Product>>,
    prices: moka::future::Cache<String, Arc<HashMap<String, f64>>>,
}

/// Item numbers per filtered lookup (`number eq 'a' or number eq 'b' …`), short of URL limits.
const BATCH: usize = 50;

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
        let change_class = change_class(&up, config.process.as_ref().and_then(|p| p.changes.as_ref()));
        Ok(BusinessCentral {
            company_id: company_id.to_string(),
            change_class,
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
        self.send(method, path_and_query, body, class, None).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        class: &Class,
        if_match: Option<&str>,
    ) -> Result<(u16, Vec<u8>), AdapterError> {
        let client =
            self.upstream.client().ok_or_else(|| AdapterError::Unavailable("no HTTP client".into()))?;
        let mut request = client
            .request(method, format!("{}{path_and_query}", self.upstream.base_url))
            .header(http::header::ACCEPT, "application/json");
        if let Some((name, value)) = &self.upstream.credential {
            request = request.header(name.clone(), value.clone());
        }
        if let Some(tag) = if_match {
            request = request.header(http::header::IF_MATCH, tag);
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
    pub async fn create_order_once(&self, order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError> {
        ErpAdapter::create_order_once(self, order).await
    }

    async fn create_once(&self, sales_order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError> {
        let reference = sales_order.external_reference.as_str();
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
        let canonical =
            serde_json::to_value(sales_order).map_err(|e| AdapterError::Protocol(e.to_string()))?;
        let body = apply(request, canonical, m)?;
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

    async fn create_order_once(&self, order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError> {
        self.create_once(order).await
    }

    async fn forget(&self, quote: &Quote) {
        self.forget_cached(quote).await
    }

    async fn progress(&self, id: &str, number: &str) -> Result<Progress, AdapterError> {
        self.order_progress(id, number).await
    }

    async fn invoice_progress(&self, invoice_id: &str) -> Result<Option<(String, Progress)>, AdapterError> {
        self.progress_of_invoice(invoice_id).await
    }

    fn changed_resource(&self, resource: &str) -> Option<ChangedResource> {
        changes::changed_resource(&self.company_id, resource)
    }

    async fn subscribe(&self, url: &str, client_state: &str) -> Result<std::time::Duration, AdapterError> {
        self.ensure_subscriptions(url, client_state).await
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
