//! The same canonical request against SAP S/4HANA by changing one route file: the gateway runs
//! with `dialects/sap/erp-canonical.yaml` as its only route file, in front of an OData v2 server
//! that answers in SAP's recorded shapes (tests/fixtures/sap).

use crate::common::*;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};

const SERVICE: &str = "/sap/opu/odata/sap/API_SALES_ORDER_SRV";

fn fixture(path: &str) -> Value {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
    serde_json::from_slice(&std::fs::read(full).unwrap()).unwrap()
}

#[derive(Clone, Default)]
struct FakeSap {
    posted: Arc<Mutex<Vec<Value>>>,
}

/// SAP's answer to a deep insert: the entity under `d`, navigation properties under `results`.
async fn create(State(sap): State<FakeSap>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    sap.posted.lock().unwrap().push(body.clone());
    let mut order = body;
    order["SalesOrder"] = json!("4970");
    order["OverallSDProcessStatus"] = json!("A");
    if let Some(items) = order["to_Item"].as_array_mut() {
        for item in items.iter_mut() {
            let pricing = item["to_PricingElement"].take();
            item["to_PricingElement"] = json!({"results": pricing});
        }
    }
    let items = order["to_Item"].take();
    order["to_Item"] = json!({"results": items});
    (StatusCode::CREATED, Json(json!({"d": order})))
}

async fn start_fake_sap() -> (FakeSap, String) {
    let sap = FakeSap::default();
    let app = Router::new()
        .route(
            &format!("{SERVICE}/A_SalesOrder"),
            get(|| async { Json(fixture("sap/sales-order-list.json")) }).post(create),
        )
        .route(
            &format!("{SERVICE}/A_SalesOrder('4970')"),
            get(|| async { Json(fixture("sap/sales-order.json")) }),
        )
        .with_state(sap.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (sap, url)
}

#[tokio::test]
async fn the_canonical_api_speaks_sap_after_swapping_one_route_file() {
    let (sap, sap_url) = start_fake_sap().await;
    let sandbox = TestSandbox::start(Default::default()).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    opts.routes_yaml = std::fs::read_to_string(repo.join("dialects/sap/erp-canonical.yaml")).unwrap();
    opts.policies_yaml = std::fs::read_to_string(repo.join("policies/headers.yaml")).unwrap();
    opts.shipped_mediation = true;
    // The dialect's routes authenticate their callers like the shipped ones (erp-keys).
    opts.policy_files.push((
        "consumers.yaml".into(),
        std::fs::read_to_string(repo.join("policies/consumers.yaml")).unwrap(),
    ));
    opts.upstream_extra = format!("  sap:\n    url: {sap_url}\n");
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::HeaderName::from_static("x-api-key"),
                reqwest::header::HeaderValue::from_static("demo-erp-write-key"),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();

    let order = json!({
        "customerNumber": "C10000", "externalReference": "006Dn000004ZqXcIAK", "currency": "EUR",
        "orderDate": "2026-11-27", "requestedDeliveryDate": "2026-12-10",
        "lines": [{"item": "1900-S", "quantity": 2, "unitPrice": 19.99, "discountPercent": 5},
                  {"item": "1924-W", "quantity": 0.5, "unitPrice": 2299.34}]
    });
    let resp = client.post(gw.url("/erp/v1/sales-orders")).json(&order).send().await.unwrap();
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["number"], "4970");
    assert_eq!(created["status"], "Open");
    assert_eq!(created["orderDate"], "2026-11-27");
    assert_eq!(created["lines"][0]["unitPrice"], 19.99);
    assert_eq!(created["lines"][0]["discountPercent"], 5);
    assert_eq!(created["lines"][1]["quantity"], 0.5);

    let posted = sap.posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["SalesOrderDate"], "/Date(1795737600000)/");
    assert_eq!(posted[0]["PurchaseOrderByCustomer"], "006Dn000004ZqXcIAK");
    assert_eq!(posted[0]["to_Item"][1]["SalesOrderItem"], "20");
    assert_eq!(posted[0]["to_Item"][1]["RequestedQuantity"], "0.5");
    assert_eq!(posted[0]["to_Item"][0]["to_PricingElement"][0]["ConditionRateValue"], "19.99");

    let one: Value =
        client.get(gw.url("/erp/v1/sales-orders/4970")).send().await.unwrap().json().await.unwrap();
    assert_eq!(one, fixture("sap/sales-order.canonical.json"));
    let list: Value = client.get(gw.url("/erp/v1/sales-orders")).send().await.unwrap().json().await.unwrap();
    assert_eq!(list, fixture("sap/sales-order-list.canonical.json"));
    assert_eq!(sandbox.stats().await["requests_total"], 0, "Business Central is out of the picture");
}
