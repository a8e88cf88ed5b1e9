//! The ERP sandbox on its own: Business Central shapes, limits and counters.

use crate::common::{TestSandbox, UPSTREAM_TOKEN};
use causeway::sandbox::{data::COMPANY_ID, LimitsSpec};
use serde_json::json;
use std::time::Duration;

fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {UPSTREAM_TOKEN}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

fn api(sb: &TestSandbox, path: &str) -> String {
    format!("{}/api/v2.0/companies({COMPANY_ID})/{path}", sb.url())
}

#[tokio::test]
async fn sliding_window_answers_429_exactly_past_the_limit() {
    let sb =
        TestSandbox::start(LimitsSpec { window_requests: 10, window_seconds: 60, ..LimitsSpec::default() })
            .await;
    let c = client();
    for i in 0..10 {
        let r = c.get(api(&sb, "items?$top=1")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i} is within the budget");
    }
    for _ in 0..5 {
        let r = c.get(api(&sb, "items?$top=1")).send().await.unwrap();
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "Application_TooManyRequests");
    }
    let s = sb.stats().await;
    assert_eq!(s["rejected_429"]["rate"], 5);
    assert_eq!(s["rejected_429"]["concurrency"], 0);
    assert_eq!(s["requests_in_window"], 10);
    assert_eq!(s["peak_requests_in_window"], 15);
}

#[tokio::test]
async fn concurrency_limit_queues_then_answers_429() {
    let limits = LimitsSpec { max_concurrent: 5, queue: 3, latency_ms: 600, ..LimitsSpec::default() };
    let sb = TestSandbox::start(limits).await;
    let c = client();
    let url = api(&sb, "customers?$top=1");
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, limited), (8, 4), "5 processed + 3 queued succeed, the rest are refused: {statuses:?}");
    let s = sb.stats().await;
    assert_eq!(s["peak_in_flight"], 5);
    assert_eq!(s["peak_open_requests"], 8);
    assert_eq!(s["rejected_429"]["concurrency"], 4);
    assert_eq!(s["rejected_429"]["total"], 4);
}

#[tokio::test]
async fn requires_the_bearer_token() {
    let sb = TestSandbox::start(LimitsSpec::default()).await;
    let r = reqwest::get(api(&sb, "items")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(sb.stats().await["unauthorized"], 1);
}

#[tokio::test]
async fn sales_orders_in_business_central_shape() {
    let sb = TestSandbox::start(LimitsSpec::default()).await;
    let c = client();
    let order = json!({
        "customerNumber": "C10000",
        "externalDocumentNumber": "006Dn00000ABCDE",
        "currencyCode": "EUR",
        "salesOrderLines": [
            {"lineType": "Item", "lineObjectNumber": "1900-S", "quantity": 2, "unitPrice": 19.99, "discountPercent": 10}
        ]
    });
    let r = c.post(api(&sb, "salesOrders")).json(&order).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let created: serde_json::Value = r.json().await.unwrap();
    assert!(created["number"].as_str().unwrap().starts_with("S-ORD"));
    assert_eq!(created["totalAmountExcludingTax"], 35.98);
    let etag = created["@odata.etag"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();

    let r = c
        .get(api(&sb, "salesOrders?$filter=externalDocumentNumber eq '006Dn00000ABCDE'"))
        .send()
        .await
        .unwrap();
    let found: serde_json::Value = r.json().await.unwrap();
    assert_eq!(found["value"].as_array().unwrap().len(), 1);
    assert!(found["value"][0].get("salesOrderLines").is_none(), "lines only with $expand");

    // PATCH needs If-Match, and a stale one is refused.
    let patch = json!({"externalDocumentNumber": "006Dn00000ABCDE-2"});
    let r = c.patch(api(&sb, &format!("salesOrders({id})"))).json(&patch).send().await.unwrap();
    assert_eq!(r.status(), 428);
    let r = c
        .patch(api(&sb, &format!("salesOrders({id})")))
        .header("if-match", &etag)
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .patch(api(&sb, &format!("salesOrders({id})")))
        .header("if-match", &etag)
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);

    // A second order with an external reference already used is created (as BC does) and counted.
    let again = json!({"customerNumber": "C10000", "externalDocumentNumber": "006Dn00000ABCDE", "salesOrderLines": []});
    assert_eq!(c.post(api(&sb, "salesOrders")).json(&again).send().await.unwrap().status(), 201);
    let s = sb.stats().await;
    assert_eq!(s["orders_created"], 2);
    assert_eq!(s["duplicate_external_document_numbers"], 1);

    // Business rejections are 400 with BC's error shape.
    let blocked = json!({"customerNumber": "C10050", "salesOrderLines": []});
    let r = c.post(api(&sb, "salesOrders")).json(&blocked).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("blocked"));
}

#[tokio::test]
async fn forced_status_and_latency_injection() {
    let sb = TestSandbox::start(LimitsSpec::default()).await;
    sb.set_limits(&LimitsSpec {
        force_status: Some(429),
        force_retry_after_seconds: Some(2),
        ..LimitsSpec::default()
    })
    .await;
    let r = client().get(api(&sb, "items")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").unwrap(), "2");
    sb.set_limits(&LimitsSpec { latency_ms: 300, ..LimitsSpec::default() }).await;
    let started = std::time::Instant::now();
    assert_eq!(client().get(api(&sb, "items")).send().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}
