//! The quote-to-order service on its ports alone: a fake ERP adapter and the in-memory store, no
//! HTTP, on paused time (tokio's clock advances only when every task waits; the store's clock
//! is moved forward by hand). Rules, delivery, backoff,
//! dead-lettering, idempotency and ownership.

use super::adapter::{AdapterError, ErpAdapter, ErpOrder};
use super::model::{Address, Credit, Customer, Product, Quote, SalesOrderCreate};
use super::rules::MasterData;
use super::service::{Caller, OpenStore, QuoteToOrder};
use super::state::State;
use super::store::memory::MemoryStore;
use super::store::OrderStore;
use crate::config::Config;
use crate::error::GatewayError;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// An ERP that knows one customer and two products, and answers creates from a script.
#[derive(Default)]
struct FakeErp {
    /// Results of the next master-data lookups (then: the master data below).
    master_failures: Mutex<VecDeque<AdapterError>>,
    /// Results of the next creates (then: success).
    create_results: Mutex<VecDeque<AdapterError>>,
    created: Mutex<Vec<Value>>,
    lookups: Mutex<u32>,
    panic_on_lookup: std::sync::atomic::AtomicBool,
    /// How long each lookup and each create takes (a slow ERP).
    latency: Mutex<Duration>,
}

fn master() -> MasterData {
    let customer = Customer {
        number: "C10000".into(),
        name: "Adatum".into(),
        billing_address: Address {
            line1: "Main St 1".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "DE".into(),
            ..Address::default()
        },
        currency: "EUR".into(),
        region: "EU".into(),
        tax_id: "DE123".into(),
        blocked: "none".into(),
        credit: Credit { limit: 100_000.0, balance: 0.0 },
    };
    let product = |n: &str, p: f64| {
        (n.to_string(), Product { number: n.into(), name: n.into(), blocked: false, unit_price: p })
    };
    MasterData {
        customer: Some(customer),
        products: HashMap::from([product("1900-S", 18.39), product("1904-W", 91.25)]),
        regional_prices: HashMap::from([("1900-S".into(), 18.39), ("1904-W".into(), 91.25)]),
    }
}

#[async_trait::async_trait]
impl ErpAdapter for FakeErp {
    async fn master_data(&self, _quote: &Quote) -> Result<MasterData, AdapterError> {
        *self.lookups.lock() += 1;
        let latency = *self.latency.lock();
        tokio::time::sleep(latency).await;
        if self.panic_on_lookup.load(std::sync::atomic::Ordering::Relaxed) {
            panic!("the adapter broke");
        }
        match self.master_failures.lock().pop_front() {
            Some(e) => Err(e),
            None => Ok(master()),
        }
    }

    async fn create_order_once(&self, order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError> {
        let canonical = serde_json::to_value(order).unwrap();
        let latency = *self.latency.lock();
        tokio::time::sleep(latency).await;
        if let Some(e) = self.create_results.lock().pop_front() {
            return Err(e);
        }
        let mut created = self.created.lock();
        let reference = canonical["externalReference"].clone();
        // Like a real adapter: the order of an external reference is found, not created twice.
        if let Some(i) = created.iter().position(|o| o["externalReference"] == reference) {
            return Ok(erp_order(i));
        }
        created.push(canonical);
        Ok(erp_order(created.len() - 1))
    }

    async fn forget(&self, _quote: &Quote) {}
}

fn erp_order(i: usize) -> ErpOrder {
    ErpOrder { id: format!("erp-{i}"), number: format!("SO-{i}"), canonical: json!({}) }
}

struct Harness {
    service: Arc<QuoteToOrder>,
    erp: Arc<FakeErp>,
    store: Arc<MemoryStore>,
}

/// The shipped configuration (rules, mappings) with `delivery` overrides, on the fakes.
fn harness(max_attempts: u32) -> Harness {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config: Config = crate::config::load_with_env(dir, &|_| None).expect("shipped configuration");
    let mut settings = config.process.clone().expect("a process block");
    settings.max_attempts = max_attempts;
    settings.backoff_initial = Duration::from_secs(1);
    settings.backoff_max = Duration::from_secs(8);
    let erp = Arc::new(FakeErp::default());
    let store = Arc::new(MemoryStore::new());
    let for_service = store.clone();
    let open: OpenStore = Box::new(move || {
        let store: Arc<dyn OrderStore> = for_service.clone();
        Box::pin(async move { Ok(store) })
    });
    let adapter: Box<dyn ErpAdapter> = Box::new(SharedErp(erp.clone()));
    let service = QuoteToOrder::new(Arc::new(ArcSwap::from_pointee(config)), settings, adapter, open);
    Harness { service, erp, store }
}

/// The fake, shared with the test through an `Arc`.
struct SharedErp(Arc<FakeErp>);

#[async_trait::async_trait]
impl ErpAdapter for SharedErp {
    async fn master_data(&self, quote: &Quote) -> Result<MasterData, AdapterError> {
        self.0.master_data(quote).await
    }
    async fn create_order_once(&self, order: &SalesOrderCreate) -> Result<ErpOrder, AdapterError> {
        self.0.create_order_once(order).await
    }
    async fn forget(&self, quote: &Quote) {
        self.0.forget(quote).await
    }
}

fn quote(opportunity: &str) -> Vec<u8> {
    json!({
        "opportunityId": opportunity, "customer": {"number": "C10000"}, "currency": "EUR", "region": "EU",
        "paymentTerms": "NET30", "contract": {"startDate": "2026-12-01", "endDate": "2028-11-30"},
        "lines": [{"product": "1900-S", "quantity": 2, "unitPrice": 18.39, "discountPercent": 5},
                  {"product": "1904-W", "quantity": 1, "unitPrice": 91.25}]
    })
    .to_string()
    .into_bytes()
}

fn crm() -> Caller {
    Caller { owner: "crm-keys/crm".into(), reads_all: false }
}

async fn submit(h: &Harness, key: &str, body: &[u8]) -> Result<(u16, Value), GatewayError> {
    let reply = h.service.submit(Some(format!("\"{key}\"").as_bytes()), &crm(), body, "corr", "").await?;
    Ok((reply.status, serde_json::from_slice(&reply.body).unwrap()))
}

fn unavailable() -> AdapterError {
    AdapterError::Unavailable("the ERP is down".into())
}

#[tokio::test(start_paused = true)]
async fn a_valid_quote_is_created_once_and_accepted_with_its_history() {
    let h = harness(5);
    let (status, order) = submit(&h, "k1", &quote("OPP-1")).await.unwrap();
    assert_eq!((status, order["state"].as_str()), (201, Some("accepted")));
    assert_eq!(order["erpOrderNumber"], "SO-0");
    let steps: Vec<&str> =
        order["history"].as_array().unwrap().iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert_eq!(steps, ["validated", "submitted", "accepted"]);
    assert_eq!(h.erp.created.lock().len(), 1);

    // The same key and body: the stored answer, not a second order.
    let (status, replayed) = submit(&h, "k1", &quote("OPP-1")).await.unwrap();
    assert_eq!((status, &replayed["id"]), (201, &order["id"]));
    // Another key, same opportunity: the existing order.
    let (status, existing) = submit(&h, "k2", &quote("OPP-1")).await.unwrap();
    assert_eq!((status, &existing["id"]), (200, &order["id"]));
    // The same key with another body is refused.
    assert!(matches!(submit(&h, "k1", &quote("OPP-2")).await, Err(GatewayError::IdempotencyKeyReused)));
    assert_eq!(h.erp.created.lock().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_rules_refuse_a_broken_quote_before_the_erp_sees_it_and_the_key_is_free() {
    let h = harness(5);
    let mut broken: Value = serde_json::from_slice(&quote("OPP-R")).unwrap();
    broken["currency"] = json!("USD");
    broken["lines"][0]["unitPrice"] = json!(1.0);
    let err = submit(&h, "kr", broken.to_string().as_bytes()).await.unwrap_err();
    let GatewayError::QuoteRejected { violations } = err else { panic!("{err:?}") };
    let mut codes: Vec<&str> = violations.iter().map(|v| v.code).collect();
    codes.sort();
    assert_eq!(codes, ["contract.currency_not_allowed", "pricing.price_mismatch"]);
    assert!(h.erp.created.lock().is_empty());
    let (status, _) = submit(&h, "kr", &quote("OPP-R")).await.unwrap();
    assert_eq!(status, 201, "fixed and sent again with the same key");
}

#[tokio::test(start_paused = true)]
async fn an_erp_that_is_down_means_202_then_backoff_that_doubles_then_delivery() {
    let h = harness(10);
    h.erp.create_results.lock().extend([unavailable(), unavailable(), unavailable()]);
    let (status, order) = submit(&h, "kb", &quote("OPP-B")).await.unwrap();
    assert_eq!((status, order["state"].as_str()), (202, Some("pending")));
    let id = order["id"].as_str().unwrap().to_string();

    let mut delays = Vec::new();
    for _ in 0..2 {
        let before = h.store.order(&id).await.unwrap().unwrap();
        let delay = before.next_attempt_at - before.updated_at;
        delays.push(delay);
        assert_eq!(h.service.deliver_due().await, 0, "not due before its backoff");
        h.store.advance(Duration::from_millis(delay as u64 + 1));
        assert_eq!(h.service.deliver_due().await, 1);
    }
    // Backoff with jitter over the upper half: 1 s, then 2 s, then 4 s caps.
    assert!((500..=1000).contains(&delays[0]), "{delays:?}");
    assert!((1000..=2000).contains(&delays[1]), "{delays:?}");
    let after = h.store.order(&id).await.unwrap().unwrap();
    assert_eq!((after.state, after.attempts), (State::Pending, 3));
    h.store.advance(Duration::from_secs(8));
    h.service.deliver_due().await;
    let done = h.store.order(&id).await.unwrap().unwrap();
    assert_eq!((done.state, done.attempts), (State::Accepted, 4));
    assert_eq!(h.erp.created.lock().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn master_data_failures_count_as_attempts_and_max_attempts_dead_letters_the_order() {
    let h = harness(3);
    h.erp.master_failures.lock().extend((0..10).map(|_| unavailable()));
    let (status, order) = submit(&h, "km", &quote("OPP-M")).await.unwrap();
    assert_eq!((status, order["state"].as_str()), (202, Some("received")));
    let id = order["id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        h.store.advance(Duration::from_secs(10));
        h.service.deliver_due().await;
    }
    let dead = h.store.order(&id).await.unwrap().unwrap();
    assert_eq!((dead.state, dead.attempts), (State::DeadLettered, 3));
    let history = h.store.history(&id).await.unwrap();
    let steps: Vec<(&str, i64)> = history.iter().map(|t| (t.to.as_str(), t.repeats)).collect();
    assert_eq!(steps, [("received", 0), ("pending", 1), ("dead_lettered", 0)]);
    assert!(h.erp.created.lock().is_empty());

    // An operator replays it once the ERP is back: delivered.
    h.erp.master_failures.lock().clear();
    assert!(h.service.replay(&id).await.unwrap());
    h.service.deliver_due().await;
    assert_eq!(h.store.order(&id).await.unwrap().unwrap().state, State::Accepted);
}

#[tokio::test(start_paused = true)]
async fn an_erp_refusal_is_the_callers_422_or_a_dead_letter_when_nobody_waits() {
    let h = harness(5);
    let refusal = || AdapterError::Rejected { status: 400, message: "Customer blocked".into() };
    h.erp.create_results.lock().push_back(refusal());
    let err = submit(&h, "ke", &quote("OPP-E")).await.unwrap_err();
    assert!(
        matches!(&err, GatewayError::ErpRejected { message, .. } if message == "Customer blocked"),
        "{err:?}"
    );

    h.erp.create_results.lock().extend([unavailable(), refusal()]);
    let (status, order) = submit(&h, "kf", &quote("OPP-F")).await.unwrap();
    assert_eq!(status, 202);
    h.store.advance(Duration::from_secs(10));
    h.service.deliver_due().await;
    let id = order["id"].as_str().unwrap();
    assert_eq!(h.store.order(id).await.unwrap().unwrap().state, State::DeadLettered);
}

#[tokio::test(start_paused = true)]
async fn orders_belong_to_their_consumer() {
    let h = harness(5);
    let (_, order) = submit(&h, "ko", &quote("OPP-O")).await.unwrap();
    let id = order["id"].as_str().unwrap();
    let other = Caller { owner: "other-keys/crm".into(), reads_all: false };
    assert!(matches!(h.service.order(id, &other).await, Err(GatewayError::OrderNotFound { .. })));
    let ops = Caller { owner: "ops-keys/ops".into(), reads_all: true };
    assert_eq!(h.service.order(id, &ops).await.unwrap().status, 200);
    let taken = h.service.submit(Some(b"\"ko\""), &other, &quote("OPP-O"), "c", "").await;
    assert!(matches!(taken, Err(GatewayError::OpportunityTaken { .. })), "not a replay of the other's key");
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_a_500_and_releases_the_key() {
    let h = harness(5);
    h.erp.panic_on_lookup.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(submit(&h, "kp", &quote("OPP-P")).await, Err(GatewayError::Internal)));
    h.erp.panic_on_lookup.store(false, std::sync::atomic::Ordering::Relaxed);
    let (status, _) = submit(&h, "kp", &quote("OPP-P")).await.unwrap();
    assert_eq!(status, 201, "the key was released, not left in flight");
}

#[tokio::test(start_paused = true)]
async fn a_store_that_is_down_is_a_503_and_nothing_is_sent() {
    let h = harness(5);
    h.store.set_failing(true);
    assert!(matches!(submit(&h, "ks", &quote("OPP-S")).await, Err(GatewayError::StoreUnavailable { .. })));
    assert_eq!(*h.erp.lookups.lock(), 0);
    assert!(h.erp.created.lock().is_empty());
}

/// A commit whose answer is lost (the database went away as it committed): the order is
/// recorded, leased for an inline attempt that never starts. The caller's retry finds it, and
/// it is delivered once the store answers, not when its 120 s lease runs out.
#[tokio::test(start_paused = true)]
async fn an_order_recorded_by_a_commit_whose_answer_was_lost_is_delivered_without_waiting_for_its_lease() {
    let h = harness(5);
    h.store.lose_next_insert_answer();
    let refused = submit(&h, "kl", &quote("OPP-LOST")).await;
    assert!(matches!(refused, Err(GatewayError::StoreUnavailable { .. })), "{refused:?}");
    let (status, order) = submit(&h, "kl", &quote("OPP-LOST")).await.unwrap();
    assert_eq!(status, 200, "the retry gets the order that was recorded: {order}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.erp.created.lock().is_empty() {
        assert!(std::time::Instant::now() < deadline, "still leased to an attempt that never ran");
        h.service.deliver_due().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.erp.created.lock().len(), 1);
}

/// `inline_wait_ms` bounds the caller's whole wait, master-data lookups included: a slow ERP
/// (each call 60 % of the bound) gets the caller a 202 at the bound, not after a lookup's worth
/// of time plus a delivery's, and the order is delivered afterwards. (tokio's paused clock.)
#[tokio::test(start_paused = true)]
async fn inline_wait_bounds_the_callers_whole_wait_lookups_included() {
    let h = harness(5);
    let bound = h.service.inline_wait();
    *h.erp.latency.lock() = bound.mul_f64(0.6);
    let started = tokio::time::Instant::now();
    let (status, order) = submit(&h, "slow-1", &quote("OPP-SLOW-1")).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(status, 202, "{order}");
    assert!(waited <= bound + Duration::from_millis(100), "the caller waited {waited:?}, bound {bound:?}");
    // The attempt goes on without the caller and creates the order once.
    tokio::time::sleep(bound * 2).await;
    assert_eq!(h.erp.created.lock().len(), 1);
}

/// An ERP that keeps asking to wait (its budget refuses, or it answers 429 past the step
/// retries) delays the order but never uses up `max_attempts`: the order is delivered once the
/// ERP admits, however many times it had to wait.
#[tokio::test(start_paused = true)]
async fn the_erp_asking_to_wait_never_counts_toward_max_attempts() {
    let h = harness(3);
    let throttled = || AdapterError::Throttled("429 from the ERP".into());
    h.erp.create_results.lock().extend((0..6).map(|_| throttled()));
    let (status, order) = submit(&h, "wait-1", &quote("OPP-WAIT-1")).await.unwrap();
    assert_eq!(status, 202, "{order}");
    let id = order["id"].as_str().unwrap().to_string();
    for _ in 0..6 {
        let record = h.store.order(&id).await.unwrap().unwrap();
        assert_eq!(record.state, State::Pending, "{record:?}");
        assert_eq!(record.attempts, 0, "waiting is not an attempt: {record:?}");
        h.store.advance(Duration::from_secs(2));
        h.service.deliver_due().await;
    }
    let record = h.store.order(&id).await.unwrap().unwrap();
    assert_eq!(record.state, State::Accepted, "{record:?}");
    assert_eq!(h.erp.created.lock().len(), 1);
}
