//! Calls to the quote-to-order API shared by the sandbox and the Tryton suites.

use super::TestGateway;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The shipped demo key of the CRM consumer (policies/crm.yaml).
pub const KEY: &str = "demo-crm-key";

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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = client
            .post(url)
            .header("x-api-key", KEY)
            .header("idempotency-key", format!("\"{key}\""))
            .json(body)
            .send()
            .await;
        match resp.map(|r| (r.status().as_u16(), r)) {
            Ok((200..=202, resp)) => {
                let headers = resp.headers();
                let location = headers.get("location").or_else(|| headers.get("content-location"));
                return location.expect("an acknowledged order has a location").to_str().unwrap().to_string();
            }
            Ok((409, _)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok((status, resp)) => panic!("{key}: {status}: {}", resp.text().await.unwrap()),
            Err(e) => panic!("{key} never acknowledged: {e}"),
        }
    }
}
