//! Quote-to-order at its edges: odd Unicode in any field, orders that belong to their consumer,
//! bounded ERP cost per quote, master-data failures that back off and end, refusals that are all
//! problems, and a graceful upgrade in the middle of deliveries. The real gateway, the shipped
//! process configuration and the sandbox, whose records are the judge.

use crate::common::config::Patch;

use crate::common::process::*;
use crate::common::*;
use causeway::sandbox::data;
use causeway::sandbox::LimitsSpec;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

fn options(sandbox: &TestSandbox, delivery: &str) -> GatewayOptions {
    sandbox_options(sandbox.url(), delivery)
}

fn opportunity() -> Value {
    serde_json::from_str(&shipped("tests/fixtures/salesforce/opportunity-closed-won.json")).unwrap()
}

#[tokio::test]
async fn odd_unicode_in_a_salesforce_date_is_a_422_and_the_key_is_free_for_the_fixed_quote() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let gw = TestGateway::start(options(&sandbox, FAST)).await;
    let client = reqwest::Client::new();
    let mut bad = opportunity();
    bad["Contract_Start_Date__c"] = json!("2026-12-01T00:00:00éabcd");
    let resp = submit(&client, &gw, "sf-unicode", &bad).await;
    let problem = assert_problem(resp, 422, "validation-failed").await;
    let pointers: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
    assert!(pointers.contains(&"/contract/startDate"), "{problem:#}");
    // Every other odd date is refused the same way, never a dropped connection.
    let odd_dates =
        ["éééééééééé", "2026-1é-01", "２０２６-12-01", "2026-12-01T25:61:00Z", "", "9999999999-01-01"];
    for (i, odd) in odd_dates.into_iter().enumerate() {
        let mut q = opportunity();
        q["Contract_End_Date__c"] = json!(odd);
        let resp = submit(&client, &gw, &format!("sf-odd-{i}"), &q).await;
        assert_eq!(resp.status(), 422, "{odd}");
    }
    // The key was not left in flight: the fixed opportunity goes through with it.
    let resp = submit(&client, &gw, "sf-unicode", &opportunity()).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    assert_eq!(sandbox.stats().await["orders_created"], 1);
}

#[tokio::test]
async fn a_quote_that_is_not_sent_as_json_is_a_415() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let gw = TestGateway::start(options(&sandbox, FAST)).await;
    let resp = reqwest::Client::new()
        .post(gw.url("/process/v1/quote-to-order"))
        .header("x-api-key", KEY)
        .header("idempotency-key", "\"plain-1\"")
        .header("content-type", "text/plain")
        .body(quote("006Dn000004PLAIN11").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["accept-post"], "application/json");
    assert_problem(resp, 415, "unsupported-media-type").await;
    let resp = submit(&reqwest::Client::new(), &gw, "plain-1", &quote("006Dn000004PLAIN11")).await;
    assert_eq!(resp.status(), 201, "the key is free: {}", gw.log());
}

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[tokio::test]
async fn orders_keys_and_quotas_belong_to_the_consumer_of_one_authentication_policy() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let mut opts = options(&sandbox, FAST);
    // Two policies know a consumer called `crm`; operators hold orders.read.all.
    opts.policies_yaml = format!(
        r#"policies:
  - name: crm-keys
    kind: api_key
    keys: [{{ consumer: crm, tier: crm, scopes: [orders.write, orders.read], sha256: {} }}]
  - name: other-keys
    kind: api_key
    header: x-other-key
    keys: [{{ consumer: crm, tier: crm, scopes: [orders.write, orders.read], sha256: {} }}]
  - name: ops-keys
    kind: api_key
    header: x-ops-key
    keys: [{{ consumer: ops, tier: crm, scopes: [orders.read, orders.read.all], sha256: {} }}]
  - name: crm-quota
    kind: rate_limit
    tiers:
      crm: {{ requests: 6, window_seconds: 60 }}
"#,
        key_hash(KEY),
        key_hash("other-key"),
        key_hash("ops-key")
    );
    opts.routes_yaml = shipped("routes/process.yaml")
        .patched("[crm-keys, crm-quota]", "[crm-keys, other-keys, ops-keys, crm-quota]");
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::new();
    let resp = submit(&client, &gw, "shared-key", &quote("006Dn000004OWNERAA")).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let location = resp.headers()["location"].to_str().unwrap().to_string();

    let as_other = |req: reqwest::RequestBuilder| req.header("x-other-key", "other-key");
    let resp = as_other(client.get(gw.url(&location))).send().await.unwrap();
    assert_problem(resp, 404, "order-not-found").await;
    let list: Value = as_other(client.get(gw.url("/process/v1/orders?opportunityId=006Dn000004OWNERAA")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["value"], json!([]), "another consumer sees none of it");
    // The same Idempotency-Key and the same opportunity from the other `crm`: not a replay of
    // the first consumer's answer, and not a second order.
    let resp = as_other(client.post(gw.url("/process/v1/quote-to-order")))
        .header("idempotency-key", "\"shared-key\"")
        .json(&quote("006Dn000004OWNERAA"))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(resp, 409, "opportunity-taken").await;
    assert!(problem.get("erpOrderNumber").is_none() && !problem.to_string().contains("S-ORD"), "{problem}");
    assert_eq!(sandbox.stats().await["orders_created"], 1);

    let resp = client.get(gw.url(&location)).header("x-ops-key", "ops-key").send().await.unwrap();
    assert_eq!(resp.status(), 200, "an operator reads every order");

    // Quotas: the first `crm` has used 1 of 6; its 6th request is its last, the other's count
    // started separately.
    for _ in 0..5 {
        let resp = client.get(gw.url(&location)).header("x-api-key", KEY).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = client.get(gw.url(&location)).header("x-api-key", KEY).send().await.unwrap();
    assert_problem(resp, 429, "quota-exceeded").await;
    let resp = as_other(client.get(gw.url("/process/v1/orders?opportunityId=x"))).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the other `crm` has its own quota");
}

#[tokio::test]
async fn master_data_failures_count_as_attempts_back_off_and_end_in_the_dead_letter_queue() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let gw = TestGateway::start(options(
        &sandbox,
        "{ max_attempts: 4, backoff_initial_ms: 100, backoff_max_ms: 400, inline_wait_ms: 1000 }",
    ))
    .await;
    let client = reqwest::Client::new();
    sandbox.set_limits(&LimitsSpec { force_status: Some(503), ..Default::default() }).await;
    let resp = submit(&client, &gw, "md-1", &quote("006Dn000004MASTERA")).await;
    assert_eq!(resp.status(), 202, "{}", gw.log());
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let dead = wait_state(&client, &gw, &location, "dead_lettered", Duration::from_secs(15)).await;
    assert_eq!(dead["attempts"], 4, "{dead:#}");
    let history = dead["history"].as_array().unwrap();
    let steps: Vec<&str> = history.iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        ["received", "pending", "dead_lettered"],
        "one entry per state, not per retry: {dead:#}"
    );
    // Two counted failures in `pending`, and any number of waits for the budget, which the
    // outage's 503s paused: those are not attempts.
    assert!(history[1]["repeats"].as_u64().unwrap() >= 2, "{dead:#}");
    assert!(dead["reason"].as_str().unwrap().contains("gave up after 4 attempts"), "{dead:#}");
}

#[tokio::test]
async fn a_quote_has_at_most_max_lines_and_its_products_cost_one_erp_lookup() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let gw = TestGateway::start(options(&sandbox, FAST)).await;
    let client = reqwest::Client::new();
    let mut big = quote("006Dn000004BIGBIGA");
    let line = big["lines"][0].clone();
    big["lines"] = Value::Array(vec![line; 201]);
    let problem = assert_problem(submit(&client, &gw, "big-1", &big).await, 422, "validation-failed").await;
    assert_eq!(problem["errors"][0]["pointer"], "/lines");
    assert_eq!(problem["errors"][0]["keyword"], "maxItems");
    let mut sf = opportunity();
    let record = sf["OpportunityLineItems"]["records"][0].clone();
    sf["OpportunityLineItems"]["records"] = Value::Array(vec![record; 201]);
    let problem = assert_problem(submit(&client, &gw, "big-2", &sf).await, 422, "validation-failed").await;
    assert_eq!(problem["errors"][0]["pointer"], "/OpportunityLineItems/records");
    assert_eq!(sandbox.stats().await["requests_total"], 0, "refused before any ERP lookup");

    // 45 distinct products: one filtered query for all of them.
    let items: Vec<String> =
        data::items().iter().take(45).map(|i| i["number"].as_str().unwrap().to_string()).collect();
    let mut many = quote("006Dn000004MANYMAN");
    many["lines"] = items
        .iter()
        .map(|n| json!({"product": n, "quantity": 1, "unitPrice": 10.0}))
        .collect::<Vec<_>>()
        .into();
    let resp = submit(&client, &gw, "many-1", &many).await;
    assert_eq!(resp.status(), 422, "the rules refuse prices and regions, after looking them up");
    let item_lookups = sandbox
        .received()
        .await
        .iter()
        .filter(|r| r["method"] == "GET" && r["uri"].as_str().unwrap().contains("/items?"))
        .count();
    assert_eq!(item_lookups, 1, "one lookup for 45 products");
}

#[tokio::test]
async fn a_graceful_upgrade_during_200_deliveries_to_a_slow_erp_creates_each_order_once() {
    let sandbox = TestSandbox::start(LimitsSpec { latency_ms: 200, ..Default::default() }).await;
    let mut opts = options(
        &sandbox,
        "{ max_attempts: 50, backoff_initial_ms: 100, backoff_max_ms: 1000, inline_wait_ms: 50, lease_ms: 20000 }",
    );
    opts.grace_seconds = 3;
    let mut gw = TestGateway::start(opts).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let url = gw.url("/process/v1/quote-to-order");
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(20));
    let submissions: Vec<_> = (0..200)
        .map(|i| {
            let (client, url, gate) = (client.clone(), url.clone(), gate.clone());
            tokio::spawn(async move {
                let _turn = gate.acquire().await.unwrap();
                let opportunity = format!("006Dn00000UPG{i:05}");
                submit_until_acknowledged(&client, &url, &format!("up-{i}"), &quote(&opportunity)).await
            })
        })
        .collect();
    let mut locations = Vec::new();
    for s in submissions {
        locations.push(s.await.unwrap());
    }
    let before = sandbox.stats().await["orders_created"].as_u64().unwrap();
    assert!(before < 200, "deliveries are still under way when the upgrade starts ({before} done)");
    let mut old = gw.upgrade().await;
    // The old process drains and exits; the new one finishes what is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while old.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the old process did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for location in &locations {
        wait_state(&client, &gw, location, "accepted", Duration::from_secs(90)).await;
    }
    let stats = sandbox.stats().await;
    assert_eq!(stats["orders_created"], 200, "{stats}");
    assert_eq!(stats["duplicate_external_document_numbers"], 0, "{stats}");
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Every string of a quote, in both shapes, replaced with arbitrary Unicode (control
    /// characters, astral planes, lone combining marks, long runs).
    fn hostile_string() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "\\PC{0,12}",
            proptest::collection::vec(any::<char>(), 0..30).prop_map(|c| c.into_iter().collect()),
            Just("2026-12-01T00:00:00éabcd".to_string()),
            Just("a".repeat(5000)),
        ]
    }

    fn strings_of(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::String(_) => out.push(at),
            Value::Array(a) => {
                a.iter().enumerate().for_each(|(i, x)| strings_of(x, format!("{at}/{i}"), out))
            }
            Value::Object(o) => o.iter().for_each(|(k, x)| strings_of(x, format!("{at}/{k}"), out)),
            _ => {}
        }
    }

    fn with_strings(mut doc: Value, values: &[String]) -> Value {
        let mut pointers = Vec::new();
        strings_of(&doc, String::new(), &mut pointers);
        for (p, v) in pointers.iter().zip(values.iter().cycle()) {
            if let Some(slot) = doc.pointer_mut(p) {
                *slot = json!(v);
            }
        }
        doc
    }

    #[test]
    fn arbitrary_unicode_in_every_string_field_is_a_2xx_or_a_4xx_problem_and_never_holds_the_key() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (sandbox, gw) = rt.block_on(async {
            let sandbox = TestSandbox::start(Default::default()).await;
            let gw = TestGateway::start(options(&sandbox, FAST)).await;
            (sandbox, gw)
        });
        let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        let config = ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() };
        let cases = std::sync::atomic::AtomicUsize::new(0);
        proptest!(config, |(values in proptest::collection::vec(hostile_string(), 1..8), salesforce in any::<bool>())| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let base = if salesforce { opportunity() } else { quote(&format!("006Dn00000PROP{case:04}")) };
            let doc = with_strings(base, &values);
            let key = format!("prop-{case}");
            let (first, second) = rt.block_on(async {
                let first = submit_raw(&client, &gw, &key, &doc).await;
                let second = submit_raw(&client, &gw, &key, &doc).await;
                (first, second)
            });
            for (status, content_type, body) in [&first, &second] {
                prop_assert!((200..300).contains(status) || (400..500).contains(status), "{status}: {body}");
                if (400..500).contains(status) {
                    prop_assert_eq!(content_type.as_str(), "application/problem+json", "{}", body);
                }
            }
            prop_assert_ne!(second.0, 409, "the key was left in flight: {}", second.2);
        });
        drop(sandbox);
    }

    /// Status, content type and body; a dropped connection fails the property (a panic).
    async fn submit_raw(
        client: &reqwest::Client,
        gw: &TestGateway,
        key: &str,
        body: &Value,
    ) -> (u16, String, String) {
        let resp = submit(client, gw, key, body).await;
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        (status, content_type, resp.text().await.unwrap())
    }
}
