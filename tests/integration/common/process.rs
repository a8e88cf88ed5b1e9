//! Calls to the quote-to-order API shared by the sandbox and the Tryton suites.

use super::config::Patch;
use super::{GatewayOptions, TestGateway};
use causeway::process::model::{Contract, CustomerRef, Quote, QuoteLine};
use causeway::sandbox::data;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The shipped demo key of the CRM consumer (policies/crm.yaml).
pub const KEY: &str = "demo-crm-key";

/// A file of the repository, as shipped.
pub fn shipped(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The shipped process routes, CRM key, rules and mappings in front of `upstream_url`;
/// `process` is the body of causeway.yaml's `process:` block. The CRM quota is widened so the
/// tests' own load is not what they measure; the ERP gets a generous budget; the admin API
/// takes `admin-secret`.
pub fn process_options(upstream_url: String, process: &str) -> GatewayOptions {
    let mut o = GatewayOptions::new(upstream_url);
    o.shipped_mediation = true;
    o.routes_yaml = shipped("routes/process.yaml");
    o.policies_yaml = shipped("policies/crm.yaml").patched(
        "requests: 6000, window_seconds: 60, burst: 500",
        "requests: 100000, window_seconds: 1, burst: 100000",
    );
    for file in causeway::process::rules::FILES {
        o.policy_files.push((format!("process/{file}"), shipped(&format!("policies/process/{file}"))));
    }
    o.upstream_extra = process_budget().upstream_yaml();
    o.main_extra = format!("process:\n{process}");
    o.env.push(("CAUSEWAY_ADMIN_TOKEN".into(), "admin-secret".into()));
    o
}

/// The ERP budget of the process tests: roomy, 5 in flight, queued writes and reads waiting 2 s.
pub fn process_budget() -> super::config::Budget {
    super::config::Budget::new(100_000, 60, 5).queued(2000, 2000)
}

/// [`process_options`] for the Business Central sandbox's company with `delivery` settings
/// (a YAML flow mapping such as [`FAST`]).
pub fn sandbox_options(upstream_url: String, delivery: &str) -> GatewayOptions {
    process_options(
        upstream_url,
        &format!("  erp: bc\n  company: {}\n  delivery: {delivery}\n", data::COMPANY_ID),
    )
}

/// Delivery settings that retry quickly.
pub const FAST: &str =
    "{ max_attempts: 50, backoff_initial_ms: 100, backoff_max_ms: 1000, inline_wait_ms: 3000 }";

/// The unit price of `item` in the sandbox's `region` price list.
pub fn price(region: &str, item: &str) -> f64 {
    data::price_list_lines(&data::items())
        .into_iter()
        .find(|l| l["region"] == region && l["itemNumber"] == item)
        .and_then(|l| l["unitPrice"].as_f64())
        .expect("a regional price")
}

/// A quote every shipped rule accepts, in the sandbox and in the seeded Tryton alike: Adatum
/// (C10000, Germany, EU), EUR, NET30, two years, the EU list prices (18.39 and 91.25).
pub fn good_quote(opportunity: &str) -> Quote {
    Quote {
        opportunity_id: opportunity.into(),
        customer: CustomerRef { number: Some("C10000".into()), crm_account_id: None },
        currency: "EUR".into(),
        region: "EU".into(),
        payment_terms: "NET30".into(),
        contract: Contract { start_date: "2026-12-01".into(), end_date: "2028-11-30".into(), terms: None },
        lines: vec![
            QuoteLine {
                product: "1900-S".into(),
                quantity: 2.0,
                unit_price: price("EU", "1900-S"),
                discount_percent: 5.0,
            },
            QuoteLine {
                product: "1904-W".into(),
                quantity: 1.0,
                unit_price: price("EU", "1904-W"),
                discount_percent: 0.0,
            },
        ],
        approvals: vec![],
    }
}

/// [`good_quote`] as the JSON a CRM sends.
pub fn quote(opportunity: &str) -> Value {
    serde_json::to_value(good_quote(opportunity)).unwrap()
}

/// `quote` with five rules broken at once (currency, payment terms, contract dates, a price
/// below the list price, a discount that needs an approval); [`FIVE_BROKEN_CODES`] are their codes.
pub fn five_broken_rules(mut quote: Value) -> Value {
    quote["currency"] = Value::from("USD");
    quote["paymentTerms"] = Value::from("NET90");
    quote["contract"]["endDate"] = Value::from("2026-01-01");
    quote["lines"][1]["unitPrice"] = Value::from(1.0);
    quote["lines"][0]["discountPercent"] = Value::from(30);
    quote
}

pub const FIVE_BROKEN_CODES: [&str; 5] = [
    "contract.currency_not_allowed",
    "contract.end_before_start",
    "contract.payment_terms_not_allowed",
    "pricing.discount_needs_approval",
    "pricing.price_mismatch",
];

/// The rule codes a `quote-rejected` problem lists, sorted.
pub fn violation_codes(problem: &Value) -> Vec<&str> {
    let mut codes: Vec<&str> =
        problem["violations"].as_array().unwrap().iter().map(|v| v["code"].as_str().unwrap()).collect();
    codes.sort();
    codes
}

pub async fn submit(
    client: &reqwest::Client,
    gw: &TestGateway,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(gw.url("/process/v1/quote-to-order"))
        .header("x-api-key", KEY)
        .header("idempotency-key", format!("\"{key}\""))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Poll the order until it reaches `state` (or fail with its last view and the gateway's log).
pub async fn wait_state(
    client: &reqwest::Client,
    gw: &TestGateway,
    location: &str,
    state: &str,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let resp = client.get(gw.url(location)).header("x-api-key", KEY).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let order: Value = resp.json().await.unwrap();
        if order["state"] == state {
            return order;
        }
        assert!(Instant::now() < deadline, "order never reached {state}: {order:#}\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submit until the gateway acknowledges the order (200, 201 or 202), as a client that loses its
/// connection or meets a request still in flight retries with the same key (the Idempotency-Key
/// draft's intent); 200 is the order an earlier attempt recorded. Returns the order's location.
pub async fn submit_until_acknowledged(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
) -> String {
    submit_until_acknowledged_timed(client, url, key, body).await.0
}

/// [`submit_until_acknowledged`], also returning the longest the caller waited for an answer
/// (requests cut off by a lost connection are not answers).
pub async fn submit_until_acknowledged_timed(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
) -> (String, Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut longest = Duration::ZERO;
    loop {
        let sent = Instant::now();
        let resp = client
            .post(url)
            .header("x-api-key", KEY)
            .header("idempotency-key", format!("\"{key}\""))
            .json(body)
            .send()
            .await;
        if resp.is_ok() {
            longest = longest.max(sent.elapsed());
        }
        match resp.map(|r| (r.status().as_u16(), r)) {
            Ok((200..=202, resp)) => {
                let headers = resp.headers();
                let location = headers.get("location").or_else(|| headers.get("content-location"));
                let location =
                    location.expect("an acknowledged order has a location").to_str().unwrap().to_string();
                return (location, longest);
            }
            Ok((409, _)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok((status, resp)) => panic!("{key}: {status}: {}", resp.text().await.unwrap()),
            Err(e) => panic!("{key} never acknowledged: {e}"),
        }
    }
}

/// What [`submit_killing_midway_timed`] saw.
pub struct Submitted {
    /// (opportunity, location) of every order, all acknowledged.
    pub acknowledged: Vec<(String, String)>,
    /// How many were acknowledged before the kill.
    pub killed_at: usize,
    /// The longest any caller waited for an answer.
    pub longest_wait: Duration,
    /// When the gateway was SIGKILLed.
    pub kill_sent_at: Instant,
    /// When the restarted gateway listened again.
    pub restarted_at: Instant,
}

/// `orders` quotes (opportunity ids `{prefix}{i:05}`) from `concurrency` clients that retry until
/// acknowledged; once `kill_after` are acknowledged the gateway is SIGKILLed and restarted, the
/// rest carry on. Every order ends acknowledged (asserted); returns (opportunity, location) and
/// how many were acknowledged before the kill.
pub async fn submit_killing_midway(
    gw: &mut TestGateway,
    prefix: &str,
    orders: usize,
    concurrency: usize,
    kill_after: usize,
) -> (Vec<(String, String)>, usize) {
    let s = submit_killing_midway_timed(gw, prefix, orders, concurrency, kill_after).await;
    (s.acknowledged, s.killed_at)
}

/// [`submit_killing_midway`], also telling how long callers waited.
pub async fn submit_killing_midway_timed(
    gw: &mut TestGateway,
    prefix: &str,
    orders: usize,
    concurrency: usize,
    kill_after: usize,
) -> Submitted {
    use std::sync::Arc;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let acknowledged = Arc::new(parking_lot::Mutex::new(Vec::<(String, String)>::new()));
    let longest = Arc::new(parking_lot::Mutex::new(Duration::ZERO));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let url = gw.url("/process/v1/quote-to-order");
    let mut tasks = Vec::new();
    for i in 0..orders {
        let (client, url, ack, sem) = (client.clone(), url.clone(), acknowledged.clone(), semaphore.clone());
        let longest = longest.clone();
        let opportunity = format!("{prefix}{i:05}");
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let key = format!("{opportunity}-key");
            let (location, waited) =
                submit_until_acknowledged_timed(&client, &url, &key, &quote(&opportunity)).await;
            let mut l = longest.lock();
            *l = (*l).max(waited);
            drop(l);
            ack.lock().push((opportunity, location));
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().len() < kill_after {
        assert!(Instant::now() < deadline, "orders are not being acknowledged:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kill_sent_at = Instant::now();
    gw.kill_and_restart().await;
    let restarted_at = Instant::now();
    let killed_at = acknowledged.lock().len();
    for t in tasks {
        t.await.unwrap();
    }
    let acknowledged = acknowledged.lock().clone();
    assert_eq!(acknowledged.len(), orders, "every order acknowledged, some after the restart");
    let longest_wait = *longest.lock();
    Submitted { acknowledged, killed_at, longest_wait, kill_sent_at, restarted_at }
}
