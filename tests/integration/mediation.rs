//! Mediated routes end to end: the real gateway binary in front of the real sandbox, with the
//! shipped canonical policies and a few built to break (endless programs, huge outputs).

use crate::common::*;
use causeway::sandbox::LimitsSpec;
use serde_json::{json, Value};
use std::time::Duration;

const COMPANY: &str = causeway::sandbox::data::COMPANY_ID;

fn routes() -> String {
    format!(
        r#"routes:
  - name: orders-create
    match: {{ methods: [POST], path: /erp/v1/sales-orders }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/salesOrders"
    max_body_bytes: 65536
    policies: [canonical-sales-order-create-bc]
  - name: orders-list
    match: {{ methods: [GET], path: /erp/v1/sales-orders }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/salesOrders"
    policies: [canonical-sales-order-list-bc]
  - name: customers-raw
    match: {{ methods: [GET], path: /raw/customers }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/customers"
  - name: endless-request
    match: {{ methods: [POST], path: /endless }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/salesOrders"
    policies: [endless]
  - name: huge-response
    match: {{ methods: [GET], path: /huge }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/items"
    policies: [huge]
  - name: monitored
    match: {{ methods: [GET], path: /monitored }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/customers"
    policies: [monitored]
  - name: unmappable
    match: {{ methods: [GET], path: /unmappable }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY})/customers"
    policies: [unmappable]
"#
    )
}

const TEST_POLICIES: &str = r#"policies:
  - name: endless
    kind: mediation
    request: { jq: "def f: f; f" }
    timeout_ms: 100
  - name: huge
    kind: mediation
    response: { jq: "[range(100000)]" }
    max_output_bytes: 10000
  - name: monitored
    kind: mediation
    response: { schema: test/requires-nonsense.json }
  - name: unmappable
    kind: mediation
    response: { map: test/name-as-number.yaml }
"#;

async fn start() -> (TestSandbox, TestGateway) {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.routes_yaml = routes();
    opts.policies_yaml = TEST_POLICIES.into();
    opts.shipped_mediation = true;
    opts.policy_files = vec![
        (
            "test/requires-nonsense.json".into(),
            r#"{"type": "object", "required": ["nonsense"]}"#.into(),
        ),
        (
            "test/name-as-number.yaml".into(),
            "mode: build\nops:\n  - each:\n      from: /value\n      to: /items\n      mode: build\n      ops:\n        - copy: {from: /displayName, to: /name, convert: string_to_number}\n".into(),
        ),
    ];
    let gateway = TestGateway::start(opts).await;
    (sandbox, gateway)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

fn canonical_order(reference: &str) -> Value {
    json!({
        "customerNumber": "C10000",
        "externalReference": reference,
        "currency": "EUR",
        "orderDate": "2026-11-27",
        "lines": [
            {"item": "1900-S", "quantity": 2, "unitPrice": 19.99, "discountPercent": 5},
            {"item": "1904-W", "quantity": 0.5}
        ]
    })
}

#[tokio::test]
async fn schema_violations_never_reach_the_erp_and_every_one_is_listed() {
    let (sandbox, gw) = start().await;
    let before = sandbox.stats().await["requests_total"].clone();
    let broken = json!({
        "customerNumber": "",
        "currency": "eur",
        "orderDate": "2026-02-30",
        "lines": [{"item": "1900-S", "quantity": 0}, {"quantity": 1}],
        "surprise": true
    });
    let resp = client().post(gw.url("/erp/v1/sales-orders")).json(&broken).send().await.unwrap();
    let problem = assert_problem(resp, 422, "validation-failed").await;
    let errors = problem["errors"].as_array().expect("errors lists the violations");
    let found: Vec<(String, String)> = errors
        .iter()
        .map(|e| (e["pointer"].as_str().unwrap().to_string(), e["keyword"].as_str().unwrap().to_string()))
        .collect();
    for (pointer, keyword) in [
        ("", "required"), // externalReference
        ("/customerNumber", "minLength"),
        ("/currency", "pattern"),
        ("/orderDate", "format"),
        ("/lines/0/quantity", "exclusiveMinimum"),
        ("/lines/1", "required"),     // item
        ("", "additionalProperties"), // surprise
    ] {
        assert!(
            found.contains(&(pointer.to_string(), keyword.to_string())),
            "{pointer} {keyword} not in {found:?}"
        );
    }
    assert!(errors
        .iter()
        .all(|e| e["location"] == "body" && e["message"].as_str().is_some_and(|m| !m.is_empty())));

    // A query the list route's schema refuses, and a body that is not JSON.
    let resp = client().get(gw.url("/erp/v1/sales-orders?$top=0&color=red")).send().await.unwrap();
    let problem = assert_problem(resp, 422, "validation-failed").await;
    assert_eq!(problem["errors"].as_array().map(Vec::len), Some(2), "{problem}");
    assert!(problem["errors"].as_array().unwrap().iter().all(|e| e["location"] == "query"));
    let resp = client()
        .post(gw.url("/erp/v1/sales-orders"))
        .header("content-type", "application/json")
        .body("{\"customerNumber\": ")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 400, "invalid-json").await;

    let stats = sandbox.stats().await;
    assert_eq!(stats["requests_total"], before, "the sandbox saw none of it: {stats}");
    assert_eq!(stats["orders_created"], 0);
    let metrics = client().get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l
            .starts_with("causeway_mediation_rejections_total{location=\"body\",route=\"orders-create\"} 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_canonical_order_reaches_the_erp_in_its_dialect_and_comes_back_canonical() {
    let (sandbox, gw) = start().await;
    let resp = client()
        .post(gw.url("/erp/v1/sales-orders"))
        .header("authorization", "Bearer consumer-token")
        .json(&canonical_order("OPP-42"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let length: usize = resp.headers()["content-length"].to_str().unwrap().parse().unwrap();
    assert!(resp.headers().get("x-correlation-id").is_some());
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), length, "Content-Length matches the rewritten body");
    let order: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(order["externalReference"], "OPP-42");
    assert_eq!(order["customerName"], "Adatum Handels GmbH");
    assert!(order["number"].as_str().is_some_and(|n| n.starts_with("S-ORD")));
    assert_eq!(order["lines"][0]["item"], "1900-S");
    assert_eq!(order["lines"][1]["quantity"], 0.5);
    assert!(
        order.get("salesOrderLines").is_none() && order.get("@odata.etag").is_none(),
        "no BC fields: {order}"
    );

    let received = sandbox.received().await;
    let post =
        received.iter().find(|r| r.get("method").and_then(Value::as_str) == Some("POST")).expect("one POST");
    assert_eq!(
        post["headers"]["authorization"],
        format!("Bearer {UPSTREAM_TOKEN}"),
        "the ERP credential, not the caller's"
    );
    assert_eq!(post["headers"]["content-type"], "application/json");
    let sent: Value = serde_json::from_str(post["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent,
        json!({
            "customerNumber": "C10000", "externalDocumentNumber": "OPP-42", "currencyCode": "EUR", "orderDate": "2026-11-27",
            "salesOrderLines": [
                {"lineType": "Item", "lineObjectNumber": "1900-S", "quantity": 2, "unitPrice": 19.99, "discountPercent": 5},
                {"lineType": "Item", "lineObjectNumber": "1904-W", "quantity": 0.5}
            ]
        })
    );
    assert_eq!(sandbox.stats().await["orders_created"], 1);

    // The list comes back in the canonical shape too.
    let list: Value =
        client().get(gw.url("/erp/v1/sales-orders")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["items"][0]["externalReference"], "OPP-42");
}

#[tokio::test]
async fn routes_without_mediation_pass_the_erp_body_through_byte_for_byte() {
    let (sandbox, gw) = start().await;
    let via_gateway = client().get(gw.url("/raw/customers")).send().await.unwrap().bytes().await.unwrap();
    let direct = client()
        .get(format!("{}/api/v2.0/companies({COMPANY})/customers", sandbox.url()))
        .bearer_auth(UPSTREAM_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(via_gateway, direct);
}

#[tokio::test]
async fn an_endless_jq_program_is_cut_off_by_its_time_bound_and_nothing_reaches_the_erp() {
    let (sandbox, gw) = start().await;
    let before = sandbox.stats().await["requests_total"].clone();
    let resp = client()
        .post(gw.url("/endless"))
        .header("x-correlation-id", "corr-endless-1")
        .json(&json!({"a": 1}))
        .send()
        .await
        .expect("an answer, not a hang");
    let problem = assert_problem(resp, 500, "transformation-timeout").await;
    assert_eq!(problem["correlation_id"], "corr-endless-1");
    assert!(problem["detail"].as_str().unwrap().contains("100 ms"));
    assert_eq!(sandbox.stats().await["requests_total"], before);
    // The gateway logged it with the correlation id.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gw.log().lines().any(|l| l.contains("transformation") && l.contains("corr-endless-1")),
        "{}",
        gw.log()
    );
    // And it still serves.
    assert_eq!(client().get(gw.url("/raw/customers")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_oversized_transformation_is_a_500_problem() {
    let (_sandbox, gw) = start().await;
    let resp = client().get(gw.url("/huge")).send().await.unwrap();
    let problem = assert_problem(resp, 500, "transformation-too-large").await;
    assert!(problem["detail"].as_str().unwrap().contains("10000 bytes"));
}

#[tokio::test]
async fn response_schema_violations_are_counted_and_the_response_passes_unchanged() {
    let (_sandbox, gw) = start().await;
    let monitored = client().get(gw.url("/monitored")).send().await.unwrap();
    assert_eq!(monitored.status(), 200);
    let monitored = monitored.bytes().await.unwrap();
    let raw = client().get(gw.url("/raw/customers")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(monitored, raw, "monitor mode never changes the response");
    let metrics = client().get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "causeway_response_schema_violations_total{route=\"monitored\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_erp_response_the_mapping_cannot_map_is_a_502_naming_the_pointer() {
    let (_sandbox, gw) = start().await;
    let resp = client().get(gw.url("/unmappable")).send().await.unwrap();
    let problem = assert_problem(resp, 502, "response-unmappable").await;
    assert!(problem["detail"].as_str().unwrap().contains("/value/0/displayName"), "{problem}");
}

#[tokio::test]
async fn a_mediated_body_over_the_route_limit_is_a_413() {
    let (sandbox, gw) = start().await;
    let mut order = canonical_order("OPP-BIG");
    order["lines"][0]["description"] = json!("x".repeat(70_000));
    let resp = client().post(gw.url("/erp/v1/sales-orders")).json(&order).send().await.unwrap();
    assert_problem(resp, 413, "body-too-large").await;
    assert_eq!(sandbox.stats().await["orders_created"], 0);
}
