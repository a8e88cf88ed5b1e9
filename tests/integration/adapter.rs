//! The Business Central adapter against the real sandbox: master data in canonical shapes through
//! the shipped mappings, one ERP call per key under concurrency (cache, single flight), the quote
//! rules on live master data, and find-before-create so a retried create makes one order.

use crate::common::process::good_quote;
use crate::common::*;
use causeway::erp::business_central::BusinessCentral;
use causeway::erp::AdapterError;
use causeway::process::model::SalesOrderCreate;
use causeway::sandbox::data::COMPANY_ID;
use serde_json::json;
use std::sync::Arc;

async fn adapter(sandbox: &TestSandbox) -> (Arc<BusinessCentral>, causeway::config::Config) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.shipped_mediation = true;
    opts.upstream_extra =
        "    budget: { window_requests: 1000, window_seconds: 60, max_concurrent: 5 }\n".into();
    write_config(dir.path(), &opts, (free_port(), free_port(), free_port()));
    let config = causeway::config::load_with_env(dir.path(), &|name| {
        (name == "CAUSEWAY_TEST_UPSTREAM_TOKEN").then(|| UPSTREAM_TOKEN.to_string())
    })
    .expect("config loads");
    (Arc::new(BusinessCentral::new(&config, "bc", COMPANY_ID).unwrap()), config)
}

#[tokio::test]
async fn master_data_comes_canonical_and_passes_the_shipped_rules() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let (bc, _config) = adapter(&sandbox).await;
    let q = good_quote("006Dn000004ZqXcIAK");
    let master = bc.master_data(&q).await.unwrap();
    let customer = master.customer.clone().expect("C10000 exists");
    assert_eq!(customer.name, "Adatum Handels GmbH");
    assert_eq!(customer.region, "EU");
    assert_eq!(customer.blocked, "none");
    assert_eq!(master.products["1900-S"].name, "ATHENS Desk");
    assert_eq!(master.regional_prices["1900-S"], 18.39);

    let rules_config =
        causeway::config::load_with_env(std::path::Path::new(env!("CARGO_MANIFEST_DIR")), &|_| None).unwrap();
    let rules = rules_config.process_rules.as_deref().unwrap();
    assert_eq!(rules.validate(&q, &master), vec![]);
    assert!(bc.customer("C99999").await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_lookups_of_one_customer_make_one_erp_call() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let (bc, _config) = adapter(&sandbox).await;
    let before = sandbox.stats().await["requests_total"].as_u64().unwrap();
    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let bc = bc.clone();
            tokio::spawn(async move { bc.customer("C10010").await })
        })
        .collect();
    for l in lookups {
        assert_eq!(l.await.unwrap().unwrap().unwrap().number, "C10010");
    }
    // And again later, from the cache.
    bc.customer("C10010").await.unwrap();
    let after = sandbox.stats().await["requests_total"].as_u64().unwrap();
    assert_eq!(after - before, 1, "one ERP request for 21 lookups");
}

#[tokio::test]
async fn create_order_once_finds_the_existing_order_instead_of_creating_a_second() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let (bc, _config) = adapter(&sandbox).await;
    let order = json!({
        "customerNumber": "C10000", "externalReference": "OPP-ONCE-1", "currency": "EUR",
        "lines": [{"item": "1900-S", "quantity": 2, "unitPrice": 18.39}]
    });
    assert!(bc.find_order("OPP-ONCE-1").await.unwrap().is_none());
    let order: SalesOrderCreate = serde_json::from_value(order).unwrap();
    let first = bc.create_order_once(&order).await.unwrap();
    assert!(first.number.starts_with("S-ORD"));
    assert_eq!(first.canonical["externalReference"], "OPP-ONCE-1");
    let again = bc.create_order_once(&order).await.unwrap();
    assert_eq!(again.id, first.id, "the retry found the order");
    let stats = sandbox.stats().await;
    assert_eq!(stats["orders_created"], 1);
    assert_eq!(stats["duplicate_external_document_numbers"], 0);

    // A business refusal is permanent, with the ERP's reason.
    let blocked = json!({"customerNumber": "C99999", "externalReference": "OPP-ONCE-2", "currency": "EUR", "lines": [{"item": "1900-S", "quantity": 1}]});
    let blocked: SalesOrderCreate = serde_json::from_value(blocked).unwrap();
    match bc.create_order_once(&blocked).await {
        Err(AdapterError::Rejected { status: 400, message }) => {
            assert!(message.contains("Customer"), "{message}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_erp_is_a_transient_failure() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let (bc, _config) = adapter(&sandbox).await;
    sandbox.stop();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    match bc.customer("C10020").await {
        Err(AdapterError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A step the ERP refuses with 429 is sent again once the budget's pause (the ERP's
/// `Retry-After`) is over, inside the same call: the lookup succeeds instead of failing the
/// whole attempt, and the ERP saw the refused request once.
#[tokio::test]
async fn a_step_refused_with_429_is_retried_after_the_pause_within_the_same_call() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let (bc, _config) = adapter(&sandbox).await;
    sandbox
        .set_limits(&causeway::sandbox::LimitsSpec {
            force_status: Some(429),
            force_retry_after_seconds: Some(1),
            ..Default::default()
        })
        .await;
    let clear = {
        let url = sandbox.url();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            reqwest::Client::new()
                .put(format!("{url}/sandbox/settings"))
                .json(&causeway::sandbox::LimitsSpec::default())
                .send()
                .await
                .unwrap();
        })
    };
    let started = std::time::Instant::now();
    let customer = bc.customer("C10000").await.expect("the lookup waits out the pause and succeeds");
    clear.await.unwrap();
    assert_eq!(customer.expect("C10000 exists").name, "Adatum Handels GmbH");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "{:?}", started.elapsed());
    assert_eq!(sandbox.stats().await["forced_responses"], 1, "one refused request, then the retry");
}
