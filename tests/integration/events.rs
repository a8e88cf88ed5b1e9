//! Events back to the CRM, end to end: the real gateway and sandbox, a webhook subscriber on
//! loopback that records what it receives and answers as told. Signatures are checked here
//! with an HMAC of our own, and by the `standardwebhooks` package from PyPI when python3 is
//! there (skipped with a message otherwise).

use crate::common;
use crate::common::config::Patch;

use crate::common::process::*;
use crate::common::*;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEXT_SECRET: &str = "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// One request the subscriber received: its headers, body, and the status it answered.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
    answered: u16,
}

struct Subscriber {
    port: u16,
    /// The status to answer with.
    status: Arc<AtomicU16>,
    /// The body of a refusal (a subscriber may send anything).
    refusal: Arc<Mutex<String>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Subscriber {
    async fn start() -> Subscriber {
        Subscriber::start_on(0, Duration::ZERO).await
    }

    /// On `port` (0: any), answering each request after `delay`.
    async fn start_on(port: u16, delay: Duration) -> Subscriber {
        let status = Arc::new(AtomicU16::new(200));
        let received = Arc::new(Mutex::new(Vec::new()));
        let refusal = Arc::new(Mutex::new(String::new()));
        let (s, r, f) = (status.clone(), received.clone(), refusal.clone());
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (s, r, f) = (s.clone(), r.clone(), f.clone());
                async move {
                    tokio::time::sleep(delay).await;
                    let answered = s.load(Ordering::SeqCst);
                    r.lock().unwrap().push(Received { headers, body: body.to_vec(), answered });
                    let text = if answered < 300 { String::new() } else { f.lock().unwrap().clone() };
                    (StatusCode::from_u16(answered).unwrap(), text)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Subscriber { port, status, refusal, received }
    }

    /// The events it acknowledged (answered 2xx), in arrival order.
    fn acknowledged(&self) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|r| r.answered < 300).cloned().collect()
    }

    async fn wait_acknowledged(&self, n: usize, within: Duration, gw: &TestGateway) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.acknowledged();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{} of {n} events acknowledged\n{}", got.len(), gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn options(sandbox: &TestSandbox, subscriber: &Subscriber, extra: &str) -> GatewayOptions {
    let mut o = sandbox_options(sandbox.url(), FAST);
    o.main_extra.push_str(&format!(
        "events:\n  subscribers:\n    crm:\n      url: http://127.0.0.1:{}/hooks\n      secret_env: [CRM_HOOK_SECRET, CRM_HOOK_SECRET_NEXT]\n{extra}",
        subscriber.port
    ));
    o.env.push(("CRM_HOOK_SECRET".into(), SECRET.into()));
    o.env.push(("CRM_HOOK_SECRET_NEXT".into(), NEXT_SECRET.into()));
    o
}

/// Standard Webhooks verification of our own: every `v1,` signature is one secret's.
fn verify(secret: &str, r: &Received) -> bool {
    use base64::Engine;
    let key =
        base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let h = |name: &str| r.headers[name].to_str().unwrap().to_string();
    let mut content = format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).into_bytes();
    content.extend_from_slice(&r.body);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(&content);
    let expected =
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    h("webhook-signature").split(' ').any(|s| s == expected)
}

/// Verify with the `standardwebhooks` package (PyPI) in a venv under target/; `false` (with a
/// message) when python3 or PyPI is not there.
fn verify_with_reference_library(received: &[Received]) -> bool {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv-webhooks");
    if !target.join("bin/python").exists() {
        let made = std::process::Command::new("python3").args(["-m", "venv"]).arg(&target).status();
        if !made.is_ok_and(|s| s.success()) {
            common::missing_service(
                "python3 with venv",
                "the standardwebhooks check needs it: install Debian's python3-venv",
            );
            return false;
        }
    }
    let installed = std::process::Command::new(target.join("bin/pip"))
        .args(["install", "-q", "standardwebhooks==1.0.1"])
        .status();
    if !installed.is_ok_and(|s| s.success()) {
        let _ = std::fs::remove_dir_all(&target);
        common::missing_service(
            "PyPI (standardwebhooks==1.0.1)",
            "the standardwebhooks check installs it with pip: give the machine access to PyPI",
        );
        return false;
    }
    let messages: Vec<Value> = received
        .iter()
        .map(|r| {
            let headers: serde_json::Map<String, Value> =
                ["webhook-id", "webhook-timestamp", "webhook-signature"]
                    .iter()
                    .map(|h| (h.to_string(), Value::from(r.headers[*h].to_str().unwrap())))
                    .collect();
            serde_json::json!({ "headers": headers, "body": String::from_utf8(r.body.clone()).unwrap() })
        })
        .collect();
    let script = "import json, sys\nfrom standardwebhooks.webhooks import Webhook\n\
        messages = json.load(sys.stdin)\n\
        for secret in sys.argv[1:]:\n    wh = Webhook(secret)\n    for m in messages:\n        wh.verify(m['body'], m['headers'])\n\
        print('verified', len(messages))\n";
    let mut child = std::process::Command::new(target.join("bin/python"))
        .args(["-c", script, SECRET, NEXT_SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(serde_json::to_string(&messages).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains(&format!("verified {}", received.len())),
        "standardwebhooks refused a message: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn body(r: &Received) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// An accepted and a rejected order reach the subscriber as signed CloudEvents: both secrets
/// sign (rotation), the envelope is complete, the rejection carries its violations and remedies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_and_rejected_orders_reach_a_signed_webhook_as_cloudevents() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let subscriber = Subscriber::start().await;
    let gw = TestGateway::start(options(&sandbox, &subscriber, "")).await;
    let client = reqwest::Client::new();
    let accepted = submit(&client, &gw, "ev-1", &quote("006EV0000001")).await;
    assert_eq!(accepted.status(), 201, "{}", gw.log());
    let order: Value = accepted.json().await.unwrap();
    let rejected = submit(&client, &gw, "ev-2", &five_broken_rules(quote("006EV0000002"))).await;
    assert_eq!(rejected.status(), 422);

    let got = subscriber.wait_acknowledged(2, Duration::from_secs(10), &gw).await;
    let mut by_type: std::collections::HashMap<String, Value> =
        got.iter().map(|r| (body(r)["type"].as_str().unwrap().to_string(), body(r))).collect();
    for r in &got {
        assert_eq!(r.headers["content-type"], "application/cloudevents+json");
        assert_eq!(r.headers["webhook-id"].to_str().unwrap(), body(r)["id"].as_str().unwrap());
        assert!(verify(SECRET, r) && verify(NEXT_SECRET, r), "signed with both secrets: {:?}", r.headers);
        assert!(!verify("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", r), "a wrong secret does not verify");
        let e = body(r);
        for attribute in ["id", "source", "specversion", "type", "subject", "time"] {
            assert!(e[attribute].is_string(), "CloudEvents `{attribute}` missing: {e:#}");
        }
        assert_eq!(e["specversion"], "1.0");
    }
    let accepted_event = by_type.remove("order.accepted.v1").expect("an accepted event");
    assert_eq!(accepted_event["subject"], order["id"]);
    assert_eq!(accepted_event["data"]["erpOrderNumber"], order["erpOrderNumber"]);
    assert_eq!(accepted_event["data"]["opportunityId"], "006EV0000001");
    let rejected_event = by_type.remove("order.rejected.v1").expect("a rejected event");
    let mut codes: Vec<&str> = rejected_event["data"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|v| assert!(!v["remedy"].as_str().unwrap().is_empty(), "a remedy for each violation"))
        .map(|v| v["code"].as_str().unwrap())
        .collect();
    codes.sort();
    assert_eq!(codes, FIVE_BROKEN_CODES);
    verify_with_reference_library(&got);
}

/// A subscriber that fails gets every event once it answers, each acknowledged once; past the
/// horizon an event is dead-lettered, listed, and delivered by a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_subscriber_gets_every_event_and_dead_letters_are_replayed() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let subscriber = Subscriber::start().await;
    let extra =
        "      backoff_initial_ms: 100\n      backoff_max_ms: 300\n      dead_letter_after_seconds: 3\n";
    let gw = TestGateway::start(options(&sandbox, &subscriber, extra)).await;
    let client = reqwest::Client::new();

    // 500s for a while, then 200: both events arrive, each acknowledged once.
    subscriber.status.store(500, Ordering::SeqCst);
    for (key, opportunity) in [("f-1", "006EVF000001"), ("f-2", "006EVF000002")] {
        assert_eq!(submit(&client, &gw, key, &quote(opportunity)).await.status(), 201);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let refused = subscriber.received.lock().unwrap().len();
    assert!(refused >= 4, "retried while refused: {refused} attempts");
    subscriber.status.store(200, Ordering::SeqCst);
    let got = subscriber.wait_acknowledged(2, Duration::from_secs(10), &gw).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> =
        subscriber.acknowledged().iter().map(|r| body(r)["id"].as_str().unwrap().into()).collect();
    assert_eq!(ids.len(), 2, "each event acknowledged once: {ids:?}");
    assert_ne!(ids[0], ids[1]);
    assert!(got.iter().all(|r| body(r)["type"] == "order.accepted.v1"));

    // Down past the horizon, answering a huge body with odd text: dead-lettered with a short
    // last error, listed, replayed.
    *subscriber.refusal.lock().unwrap() = format!("down \u{202e}🦀\u{0} {}", "x".repeat(20 << 20));
    subscriber.status.store(503, Ordering::SeqCst);
    assert_eq!(submit(&client, &gw, "f-3", &quote("006EVF000003")).await.status(), 201);
    let admin = gw.admin("/admin/events/dead-letters");
    assert_eq!(client.get(&admin).send().await.unwrap().status(), 401);
    let deadline = Instant::now() + Duration::from_secs(15);
    let dead = loop {
        let list: Value =
            client.get(&admin).bearer_auth("admin-secret").send().await.unwrap().json().await.unwrap();
        if list["value"].as_array().is_some_and(|v| !v.is_empty()) {
            break list["value"][0].clone();
        }
        assert!(Instant::now() < deadline, "never dead-lettered\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead["subscriber"], "crm");
    let last_error = dead["lastError"].as_str().unwrap();
    assert!(last_error.contains("503") && last_error.contains("down \u{202e}🦀"), "{dead:#}");
    assert!(
        last_error.chars().count() < 300,
        "only the start of the body is kept: {} chars",
        last_error.len()
    );
    gw.wait_for_metric(
        "causeway_events_undelivered{state=\"dead\",subscriber=\"crm\"} 1",
        Duration::from_secs(5),
    )
    .await;
    let unknown = client
        .post(gw.admin("/admin/events/dead-letters/nope/replay"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 409);
    assert_eq!(unknown.headers()["content-type"], "application/problem+json");
    let problem: Value = unknown.json().await.unwrap();
    assert_eq!(problem["type"], "https://causeway.dev/problems/event-not-dead-lettered");
    assert!(problem["detail"].as_str().unwrap().contains("GET /admin/events/dead-letters"), "{problem:#}");
    subscriber.status.store(200, Ordering::SeqCst);
    let event_id = dead["eventId"].as_str().unwrap();
    let replay = client
        .post(gw.admin(&format!("/admin/events/dead-letters/{event_id}/replay")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    let got = subscriber.wait_acknowledged(3, Duration::from_secs(10), &gw).await;
    assert_eq!(body(&got[2])["id"], event_id);
}

/// The subscriber is down (nothing listens), then slow; the gateway is SIGKILLed while events
/// are on their way: once it is back, every order's event reaches the subscriber, any repeat
/// carries the same `webhook-id`, and nothing else arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_down_then_slow_and_a_gateway_killed_mid_delivery_lose_no_event() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let port = free_port();
    let mut o = sandbox_options(sandbox.url(), FAST);
    o.main_extra.push_str(&format!(
        "events:\n  subscribers:\n    crm:\n      url: http://127.0.0.1:{port}/hooks\n      secret_env: [CRM_HOOK_SECRET]\n      backoff_initial_ms: 100\n      backoff_max_ms: 500\n      timeout_ms: 2000\n"
    ));
    o.env.push(("CRM_HOOK_SECRET".into(), SECRET.into()));
    let mut gw = TestGateway::start(o).await;
    let client = reqwest::Client::new();
    let mut orders = Vec::new();
    for n in 0..12 {
        let resp = submit(&client, &gw, &format!("k-{n}"), &quote(&format!("006EVK{n:06}"))).await;
        assert_eq!(resp.status(), 201, "{}", gw.log());
        orders.push(resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    // Down: connections refused for a while, each attempt failing and retried.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let subscriber = Subscriber::start_on(port, Duration::from_millis(400)).await;
    // Killed while the slow subscriber holds deliveries open.
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscriber.received.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no delivery attempt reached the subscriber\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.kill_and_restart().await;
    // Within the killed process's leases (2 × 2 s + 5 s): the restart takes them back at once.
    subscriber.wait_acknowledged(orders.len(), Duration::from_secs(8), &gw).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = subscriber.acknowledged();
    let mut by_order: std::collections::HashMap<String, Vec<String>> = Default::default();
    for r in &got {
        let e = body(r);
        assert_eq!(e["type"], "order.accepted.v1");
        assert!(verify(SECRET, r));
        by_order
            .entry(e["subject"].as_str().unwrap().into())
            .or_default()
            .push(e["id"].as_str().unwrap().into());
    }
    for order in &orders {
        let ids =
            by_order.get(order).unwrap_or_else(|| panic!("order {order}'s event was lost\n{}", gw.log()));
        assert!(ids.iter().all(|id| id == &ids[0]), "a repeat is the same event (same webhook-id): {ids:?}");
    }
    assert_eq!(by_order.len(), orders.len(), "no event of another order");
}

const CLIENT_STATE: &str = "erp-client-state-3c9d1f0a7b5e4d2c8a6f";

/// A stand-in for Salesforce that checks the REST shapes Salesforce documents: the OAuth 2.0
/// client-credentials token endpoint (form-encoded, the connected app's id and secret), and
/// `PATCH /services/data/v62.0/sobjects/Opportunity/{id}` with a bearer token it issued, an
/// Opportunity id, known fields, text of at most 255 characters; it answers Salesforce's error
/// bodies otherwise. `revoke` ends the current session, as an admin or an expiry would.
struct SalesforceStandIn {
    port: u16,
    opportunities: Arc<Mutex<std::collections::HashMap<String, serde_json::Map<String, Value>>>>,
    token: Arc<Mutex<String>>,
    tokens_issued: Arc<std::sync::atomic::AtomicUsize>,
}

const SF_FIELDS: &[&str] =
    &["Name", "StageName", "ERP_Order_Number__c", "ERP_Status__c", "ERP_Last_Error__c"];

impl SalesforceStandIn {
    async fn start() -> SalesforceStandIn {
        use axum::extract::Path;
        use axum::response::IntoResponse;
        let opportunities: Arc<Mutex<std::collections::HashMap<String, serde_json::Map<String, Value>>>> =
            Default::default();
        let token = Arc::new(Mutex::new(String::new()));
        let tokens_issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (t, n) = (token.clone(), tokens_issued.clone());
        let issue = move |headers: HeaderMap, body: String| {
            let (t, n) = (t.clone(), n.clone());
            async move {
                let form: std::collections::HashMap<String, String> =
                    serde_urlencoded::from_str(&body).unwrap_or_default();
                let ok = headers["content-type"] == "application/x-www-form-urlencoded"
                    && form.get("grant_type").map(String::as_str) == Some("client_credentials")
                    && form.get("client_id").map(String::as_str) == Some("sf-client-id")
                    && form.get("client_secret").map(String::as_str) == Some("sf-client-secret");
                if !ok {
                    let error = serde_json::json!({"error": "invalid_client", "error_description": "invalid client credentials"});
                    return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
                }
                let issued = n.fetch_add(1, Ordering::SeqCst) + 1;
                let access = format!("00DHs000000TOKEN!{issued}");
                *t.lock().unwrap() = access.clone();
                axum::Json(serde_json::json!({
                    "access_token": access, "instance_url": "http://127.0.0.1", "id": "https://login.salesforce.com/id/00D/005",
                    "token_type": "Bearer", "issued_at": "1796000000000", "signature": "c2lnbmF0dXJl"
                }))
                .into_response()
            }
        };
        let (t, o) = (token.clone(), opportunities.clone());
        let patch = move |Path(id): Path<String>, headers: HeaderMap, body: String| {
            let (t, o) = (t.clone(), o.clone());
            async move {
                let error = |status: StatusCode, code: &str, message: String| {
                    (
                        status,
                        axum::Json(
                            serde_json::json!([{"message": message, "errorCode": code, "fields": []}]),
                        ),
                    )
                        .into_response()
                };
                let bearer = format!("Bearer {}", t.lock().unwrap());
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
                    return error(
                        StatusCode::UNAUTHORIZED,
                        "INVALID_SESSION_ID",
                        "Session expired or invalid".into(),
                    );
                }
                if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
                    return error(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UNSUPPORTED_MEDIA_TYPE",
                        "Content-Type must be application/json".into(),
                    );
                }
                let valid_id = (id.len() == 15 || id.len() == 18)
                    && id.starts_with("006")
                    && id.bytes().all(|b| b.is_ascii_alphanumeric());
                if !valid_id {
                    return error(
                        StatusCode::NOT_FOUND,
                        "NOT_FOUND",
                        "The requested resource does not exist".into(),
                    );
                }
                let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&body) else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "JSON_PARSER_ERROR",
                        "The body must be a JSON object".into(),
                    );
                };
                for (k, v) in &fields {
                    if !SF_FIELDS.contains(&k.as_str()) {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "INVALID_FIELD",
                            format!("No such column '{k}' on sobject of type Opportunity"),
                        );
                    }
                    if !(v.is_null() || v.as_str().is_some_and(|s| s.chars().count() <= 255)) {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "STRING_TOO_LONG",
                            format!("{k}: data value too large"),
                        );
                    }
                }
                o.lock().unwrap().entry(id).or_default().extend(fields);
                StatusCode::NO_CONTENT.into_response()
            }
        };
        let app = axum::Router::new()
            .route("/services/oauth2/token", axum::routing::post(issue))
            .route("/services/data/v62.0/sobjects/Opportunity/{id}", axum::routing::patch(patch));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        SalesforceStandIn { port, opportunities, token, tokens_issued }
    }

    fn revoke(&self) {
        *self.token.lock().unwrap() = "revoked".into();
    }

    fn opportunity(&self, id: &str) -> serde_json::Map<String, Value> {
        self.opportunities.lock().unwrap().get(id).cloned().unwrap_or_default()
    }
}

/// [`options`] with change detection: the sandbox notifies the gateway's erp-notifications route.
fn lifecycle_options(sandbox: &TestSandbox, subscriber: &Subscriber) -> GatewayOptions {
    let mut o = options(sandbox, subscriber, "");
    o.main_extra = o.main_extra.patched(
        "events:\n",
        "  changes:\n    notification_url: http://127.0.0.1:{PROXY_PORT}/process/v1/erp-notifications\n    client_state_env: ERP_CLIENT_STATE\nevents:\n",
    );
    o.env.push(("ERP_CLIENT_STATE".into(), CLIENT_STATE.into()));
    o
}

async fn sandbox_control(sandbox: &TestSandbox, order: &str, step: &str) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{}/sandbox/orders/{order}/{step}", sandbox.url()))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{step}: {}", resp.status());
    resp.json().await.unwrap_or(Value::Null)
}

/// The sandbox's subscriptions, as the ERP API lists them.
async fn subscriptions(sandbox: &TestSandbox) -> Vec<Value> {
    let list: Value = reqwest::Client::new()
        .get(format!("{}/api/v2.0/subscriptions", sandbox.url()))
        .bearer_auth(UPSTREAM_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["value"].as_array().unwrap().clone()
}

async fn wait_subscribed(sandbox: &TestSandbox, gw: &TestGateway) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let subs = subscriptions(sandbox).await;
        if subs.len() == 2 {
            return subs;
        }
        assert!(Instant::now() < deadline, "the gateway never subscribed: {subs:?}\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An order driven accepted → shipped → invoiced → paid in the ERP reaches the subscriber as
/// exactly those four events, in order, signed and in CloudEvents envelopes; the gateway's
/// subscriptions (orders and invoices) pass the handshake and are renewed before they expire,
/// without piling up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_shipped_invoiced_and_paid_in_the_erp_reaches_the_subscriber_in_order() {
    let limits = causeway::sandbox::LimitsSpec { subscription_lifetime_seconds: 4, ..Default::default() };
    let sandbox = TestSandbox::start(limits).await;
    let subscriber = Subscriber::start().await;
    let salesforce = SalesforceStandIn::start().await;
    let mut o = lifecycle_options(&sandbox, &subscriber);
    o.main_extra.push_str(&format!(
        "    salesforce:\n      salesforce:\n        instance_url: http://127.0.0.1:{}\n        client_id_env: SF_CLIENT_ID\n        client_secret_env: SF_CLIENT_SECRET\n      backoff_initial_ms: 100\n      backoff_max_ms: 500\n",
        salesforce.port
    ));
    o.env.push(("SF_CLIENT_ID".into(), "sf-client-id".into()));
    o.env.push(("SF_CLIENT_SECRET".into(), "sf-client-secret".into()));
    let gw = TestGateway::start(o).await;
    let subs = wait_subscribed(&sandbox, &gw).await;
    assert!(subs.iter().all(|s| s["clientState"] == CLIENT_STATE), "{subs:?}");
    let client = reqwest::Client::new();
    const OPPORTUNITY: &str = "006Hs00000LIFE01AA";
    let resp = submit(&client, &gw, "life-1", &quote(OPPORTUNITY)).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let order: Value = resp.json().await.unwrap();
    let number = order["erpOrderNumber"].as_str().unwrap().to_string();

    sandbox_control(&sandbox, &number, "ship").await;
    subscriber.wait_acknowledged(2, Duration::from_secs(10), &gw).await;
    // Salesforce ends the session midway: the write-back gets a new token and goes on.
    salesforce.revoke();
    let invoice = sandbox_control(&sandbox, &number, "invoice").await;
    sandbox_control(&sandbox, &number, "pay").await;
    let got = subscriber.wait_acknowledged(4, Duration::from_secs(15), &gw).await;
    // Renewals happen every two seconds; nothing more may arrive meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let got_now = subscriber.acknowledged();
    assert_eq!(
        got_now.len(),
        got.len(),
        "exactly four events: {:?}",
        got_now.iter().map(body).collect::<Vec<_>>()
    );
    let kinds: Vec<String> = got.iter().map(|r| body(r)["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["order.accepted.v1", "order.shipped.v1", "invoice.issued.v1", "payment.received.v1"]);
    for r in &got {
        let e = body(r);
        assert!(verify(SECRET, r), "signed: {e:#}");
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["subject"], order["id"]);
        assert_eq!(e["data"]["erpOrderNumber"], number.as_str());
        assert_eq!(e["data"]["opportunityId"], OPPORTUNITY);
        for attribute in ["id", "source", "type", "time"] {
            assert!(e[attribute].is_string(), "CloudEvents `{attribute}` missing: {e:#}");
        }
    }
    assert_eq!(body(&got[2])["data"]["invoiceNumber"], invoice["number"]);
    assert_eq!(body(&got[3])["data"]["amount"], invoice["totalAmountIncludingTax"]);
    verify_with_reference_library(&got);

    // The Opportunity ends with the ERP order number and Paid.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let opportunity = salesforce.opportunity(OPPORTUNITY);
        if opportunity.get("ERP_Status__c") == Some(&Value::from("Paid")) {
            assert_eq!(opportunity["ERP_Order_Number__c"], number.as_str());
            assert_eq!(opportunity["ERP_Last_Error__c"], Value::Null);
            break;
        }
        assert!(Instant::now() < deadline, "Salesforce has {opportunity:?}\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(salesforce.tokens_issued.load(Ordering::SeqCst) >= 2, "a new token after the revocation");

    // An order whose opportunity is no Salesforce id: the webhook hears of it, the write-back
    // dead-letters it at once with the reason (nothing to retry).
    let resp = submit(&client, &gw, "life-2", &quote("not/a-salesforce-id")).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let list: Value = client
            .get(gw.admin("/admin/events/dead-letters"))
            .bearer_auth("admin-secret")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(d) = list["value"].as_array().and_then(|v| v.first()) {
            break d.clone();
        }
        assert!(Instant::now() < deadline, "never dead-lettered\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead["subscriber"], "salesforce");
    assert!(dead["lastError"].as_str().unwrap().contains("not a Salesforce record id"), "{dead:#}");
    subscriber.wait_acknowledged(5, Duration::from_secs(10), &gw).await;

    let subs = subscriptions(&sandbox).await;
    assert_eq!(subs.len(), 2, "renewed, not created again: {subs:?}");
    let stats = sandbox.stats().await;
    assert!(stats["handshakes"].as_u64().unwrap() >= 4, "renewed with a handshake each time: {stats:#}");
    gw.wait_for_metric(
        "causeway_order_milestones_total{type=\"payment.received.v1\"} 1",
        Duration::from_secs(2),
    )
    .await;
    // Invoice posted in the ERP → acknowledged by the CRM, measured once.
    gw.wait_for_metric(
        "causeway_invoice_sync_latency_seconds_count{subscriber=\"crm\"} 1",
        Duration::from_secs(2),
    )
    .await;
}

/// A notification the gateway did not ask for is refused with a problem and changes nothing:
/// a forged clientState, a repeat, an oversized body, resources outside the subscriptions or
/// not the gateway's, odd Unicode, a bad handshake. A storm of genuine notifications about one
/// order costs the ERP a handful of reads, not one per notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_oversized_and_unknown_notifications_are_refused_and_change_nothing() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let subscriber = Subscriber::start().await;
    let gw = TestGateway::start(lifecycle_options(&sandbox, &subscriber)).await;
    let subs = wait_subscribed(&sandbox, &gw).await;
    let orders_subscription =
        subs.iter().find(|s| s["resource"].as_str().unwrap().ends_with("salesOrders")).unwrap();
    let subscription = orders_subscription["subscriptionId"].as_str().unwrap().to_string();
    let client = reqwest::Client::new();
    let resp = submit(&client, &gw, "hostile-1", &quote("006HOSTILE01")).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let order: Value = resp.json().await.unwrap();
    subscriber.wait_acknowledged(1, Duration::from_secs(10), &gw).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    let company = causeway::sandbox::data::COMPANY_ID;
    let resource =
        format!("api/v2.0/companies({company})/salesOrders({})", order["erpOrderId"].as_str().unwrap());
    let notification = |state: &str, resource: &str, change: &str, at: &str| {
        serde_json::json!({
            "subscriptionId": subscription, "clientState": state, "expirationDateTime": "2026-12-31T00:00:00Z",
            "resource": resource, "changeType": change, "lastModifiedDateTime": at,
        })
    };
    let url = gw.url("/process/v1/erp-notifications");
    let send = |body: Value| client.post(&url).json(&body).send();
    let erp_requests = sandbox.stats().await["requests_total"].as_u64().unwrap();

    // Forged: a wrong, empty or missing clientState; one forged among genuine ones refuses all.
    for state in
        ["wrong-state", "", &CLIENT_STATE[..CLIENT_STATE.len() - 1], "erp-client-state-3c9d1f0a7b5e4d2c8a6fé"]
    {
        let forged =
            serde_json::json!({"value": [notification(state, &resource, "updated", "2026-11-30T10:00:00Z")]});
        assert_problem(send(forged).await.unwrap(), 401, "notification-unauthenticated").await;
    }
    let mixed = serde_json::json!({"value": [
        notification(CLIENT_STATE, &resource, "updated", "2026-11-30T10:00:01Z"),
        notification("forged", &resource, "updated", "2026-11-30T10:00:02Z"),
    ]});
    assert_problem(send(mixed).await.unwrap(), 401, "notification-unauthenticated").await;
    let missing = serde_json::json!({"value": [{"subscriptionId": subscription, "resource": resource, "changeType": "updated"}]});
    assert_problem(send(missing).await.unwrap(), 400, "bad-request").await;
    assert_problem(send(serde_json::json!({"value": []})).await.unwrap(), 400, "bad-request").await;
    let not_json = client.post(&url).header("content-type", "text/plain").body("value").send().await.unwrap();
    assert_problem(not_json, 415, "unsupported-media-type").await;

    // Oversized: refused on its declared length, before the body is read.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).await.unwrap();
        let head = format!(
            "POST /process/v1/erp-notifications HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"value\": [",
            2 << 20
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("body-too-large"), "{answer}");
    }

    // Unknown resources: another company, another entity, a path trick, odd Unicode, an order
    // the gateway did not create, an unknown change type.
    for (resource, change) in [
        ("api/v2.0/companies(00000000-0000-0000-0000-000000000000)/salesOrders(1)".to_string(), "updated"),
        (format!("api/v2.0/companies({company})/vendors(00000000-0000-0000-0000-000000000001)"), "updated"),
        (format!("api/v2.0/companies({company})/salesOrders(../../admin)"), "updated"),
        (format!("api/v2.0/companies({company})/salesOrders(\u{202e}🦀\u{0})"), "updated"),
        (
            format!("api/v2.0/companies({company})/salesOrders(00000050-0000-4000-8000-00000000ffff)"),
            "deleted",
        ),
        (resource.clone(), "exploded"),
    ] {
        let unknown = serde_json::json!({"value": [notification(CLIENT_STATE, &resource, change, "2026-11-30T10:00:03Z")]});
        let problem =
            assert_problem(send(unknown).await.unwrap(), 422, "notification-unknown-resource").await;
        assert!(problem["detail"].as_str().unwrap().len() < 1200, "{problem:#}");
    }
    // A handshake token with a control character is not echoed.
    let bad_token = client.post(format!("{url}?validationToken=a%0D%0Ab")).send().await.unwrap();
    assert_problem(bad_token, 400, "bad-request").await;
    let token = client.post(format!("{url}?validationToken=t%C3%BCk%3Cscript%3E")).send().await.unwrap();
    assert_eq!(token.status(), 200);
    assert_eq!(token.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(token.headers()["x-content-type-options"], "nosniff");
    assert_eq!(token.text().await.unwrap(), "tük<script>");

    let after = sandbox.stats().await["requests_total"].as_u64().unwrap();
    assert_eq!(after, erp_requests, "no refused notification reached the ERP");

    // Replayed: accepted once, then refused.
    let genuine = serde_json::json!({"value": [notification(CLIENT_STATE, &resource, "updated", "2026-11-30T11:00:00Z")]});
    assert_eq!(send(genuine.clone()).await.unwrap().status(), 202);
    assert_problem(send(genuine).await.unwrap(), 409, "notification-replayed").await;

    // A storm: 2,000 genuine notifications about the one order, in batches of 500.
    let before = sandbox.stats().await["requests_total"].as_u64().unwrap();
    for batch in 0..4 {
        let value: Vec<Value> = (0..500)
            .map(|i| {
                notification(CLIENT_STATE, &resource, "updated", &format!("2026-11-30T12:{batch:02}:{i:03}Z"))
            })
            .collect();
        let resp = send(serde_json::json!({ "value": value })).await.unwrap();
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads = sandbox.stats().await["requests_total"].as_u64().unwrap() - before;
    assert!(reads <= 10, "2,000 notifications of one order cost {reads} ERP reads");

    // Nothing happened to the order: the subscriber heard only of its acceptance.
    let got = subscriber.acknowledged();
    assert_eq!(got.len(), 1, "{:?}", got.iter().map(body).collect::<Vec<_>>());
    assert_eq!(body(&got[0])["type"], "order.accepted.v1");
}

/// The lifecycle reaches NATS JetStream too: the gateway creates the stream (one per
/// environment), publishes each event to `<prefix>.<type>`, and the stream holds the same
/// events as the webhook, in order, each once. Needs NATS with JetStream on 127.0.0.1:4222
/// (`CAUSEWAY_TEST_NATS` to point elsewhere); skipped with a message without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_are_published_to_jetstream_in_order() {
    let nats_url = std::env::var("CAUSEWAY_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let Ok(client) = async_nats::connect(nats_url.as_str()).await else {
        common::missing_service(
            &format!("NATS at {nats_url}"),
            "start NATS with JetStream (nats-server -js) on 127.0.0.1:4222, or set CAUSEWAY_TEST_NATS",
        );
        return;
    };
    let js = async_nats::jetstream::new(client);
    let suffix = format!("{:08x}", rand::random::<u32>());
    let (stream, prefix) = (format!("CAUSEWAY_TEST_{suffix}"), format!("causeway.test{suffix}"));
    let sandbox = TestSandbox::start(Default::default()).await;
    let subscriber = Subscriber::start().await;
    let mut o = lifecycle_options(&sandbox, &subscriber);
    o.main_extra.push_str(&format!(
        "    jetstream:\n      nats:\n        url: {nats_url}\n        stream: {stream}\n        subject_prefix: {prefix}\n"
    ));
    let gw = TestGateway::start(o).await;
    wait_subscribed(&sandbox, &gw).await;
    let client = reqwest::Client::new();
    let resp = submit(&client, &gw, "js-1", &quote("006Hs00000JETS01AA")).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let order: Value = resp.json().await.unwrap();
    let number = order["erpOrderNumber"].as_str().unwrap().to_string();
    sandbox_control(&sandbox, &number, "ship").await;
    subscriber.wait_acknowledged(2, Duration::from_secs(10), &gw).await;
    sandbox_control(&sandbox, &number, "invoice").await;
    sandbox_control(&sandbox, &number, "pay").await;
    let webhook = subscriber.wait_acknowledged(4, Duration::from_secs(15), &gw).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        if let Ok(mut s) = js.get_stream(&stream).await {
            if s.info().await.unwrap().state.messages >= 4 {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "the stream never held 4 events\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.info().await.unwrap().state.messages, 4, "each event once");
    let mut stored = Vec::new();
    for seq in 1..=4 {
        let m = s.get_raw_message(seq).await.unwrap();
        let e: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(m.subject.as_str(), format!("{prefix}.{}", e["type"].as_str().unwrap()));
        assert_eq!(m.headers.get("Nats-Msg-Id").map(|v| v.as_str()), e["id"].as_str());
        stored.push(e);
    }
    let ids =
        |events: Vec<Value>| events.iter().map(|e| e["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(
        ids(stored.clone()),
        ids(webhook.iter().map(body).collect()),
        "the same events, in the same order"
    );
    let kinds: Vec<&str> = stored.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["order.accepted.v1", "order.shipped.v1", "invoice.issued.v1", "payment.received.v1"]);
    js.delete_stream(&stream).await.unwrap();
}

/// One span an OTLP receiver got, flattened for the assertions.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// OTLP's SpanKind: 2 server, 3 client, 4 producer.
    kind: i32,
    start: u64,
    end: u64,
    /// OTLP's StatusCode: 0 unset, 1 ok, 2 error.
    status: i32,
    attributes: std::collections::HashMap<String, String>,
}

/// An OTLP/HTTP collector: decodes each export with the protocol's own messages, and answers
/// with the status set (a collector may refuse).
struct OtlpReceiver {
    port: u16,
    status: Arc<AtomicU16>,
    exports: Arc<AtomicU16>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    async fn start() -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message;
        let status = Arc::new(AtomicU16::new(200));
        let exports = Arc::new(AtomicU16::new(0));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (st, ex, sp) = (status.clone(), exports.clone(), spans.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (st, ex, sp) = (st.clone(), ex.clone(), sp.clone());
                async move {
                    ex.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(headers["content-type"], "application/x-protobuf", "OTLP/HTTP protobuf");
                    let answer = st.load(Ordering::SeqCst);
                    if answer != 200 {
                        return StatusCode::from_u16(answer).unwrap();
                    }
                    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
                        .as_ref()
                        .and_then(|v| v.value.clone())
                    {
                        Some(Any::StringValue(s)) => s,
                        Some(Any::IntValue(i)) => i.to_string(),
                        Some(Any::BoolValue(b)) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    for rs in request.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|kv| kv.key == "service.name")
                            .map(|kv| text(&kv.value))
                            .unwrap_or_default();
                        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                            sp.lock().unwrap().push(ReceivedSpan {
                                service: service.clone(),
                                trace_id: hex::encode(&span.trace_id),
                                span_id: hex::encode(&span.span_id),
                                parent_span_id: hex::encode(&span.parent_span_id),
                                name: span.name.clone(),
                                kind: span.kind,
                                start: span.start_time_unix_nano,
                                end: span.end_time_unix_nano,
                                status: span.status.as_ref().map_or(0, |s| s.code),
                                attributes: span
                                    .attributes
                                    .iter()
                                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                                    .collect(),
                            });
                        }
                    }
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        OtlpReceiver { port, status, exports, spans }
    }

    fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// The spans of `trace_id` once `done` holds for them.
    async fn wait_trace(
        &self,
        trace_id: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
        gw: &TestGateway,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.trace(trace_id);
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "trace {trace_id} incomplete: {spans:#?}\n{}", gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// (trace id, span id) of a traceparent header.
fn trace_ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

async fn submit_traced(
    client: &reqwest::Client,
    gw: &TestGateway,
    key: &str,
    body: &Value,
    traceparent: Option<&[u8]>,
) -> reqwest::Response {
    let mut request = client
        .post(gw.url("/process/v1/quote-to-order"))
        .header("x-api-key", KEY)
        .header("idempotency-key", format!("\"{key}\""));
    if let Some(tp) = traceparent {
        request = request.header("traceparent", reqwest::header::HeaderValue::from_bytes(tp).unwrap());
    }
    request.json(body).send().await.unwrap()
}

/// Each order is one trace at an OTLP collector: the gateway's server span (the ids it sent back
/// in `traceparent`, under the caller's span when it sent one), the ERP exchanges and each event
/// delivery as its children; the subscriber's request carries the delivery span onward. A
/// caller's unsampled trace exports nothing; a refusing collector costs the orders nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_order_is_one_trace_with_its_gateway_erp_and_delivery_spans() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let subscriber = Subscriber::start().await;
    let collector = OtlpReceiver::start().await;
    collector.status.store(503, Ordering::SeqCst);
    let mut o = options(&sandbox, &subscriber, "");
    o.main_extra.push_str(&format!(
        "traces:\n  endpoint: http://127.0.0.1:{}/v1/traces\n  service_name: causeway-test\n  flush_interval_ms: 200\n",
        collector.port
    ));
    let gw = TestGateway::start(o).await;
    let client = reqwest::Client::new();

    // The collector refuses: orders are taken as ever, the spans are dropped, not queued forever.
    let refused_phase = submit(&client, &gw, "tr-0", &quote("006TR0000000")).await;
    assert_eq!(refused_phase.status(), 201, "{}", gw.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while collector.exports.load(Ordering::SeqCst) == 0 || !gw.log().contains("ExportError") {
        assert!(Instant::now() < deadline, "no refused export attempted and logged\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    collector.status.store(200, Ordering::SeqCst);

    let unsampled = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let r = submit_traced(&client, &gw, "tr-u", &quote("006TR000000U"), Some(unsampled)).await;
    assert_eq!(r.status(), 201);
    let plain = submit_traced(&client, &gw, "tr-1", &quote("006TR0000001"), None).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let continued = submit_traced(&client, &gw, "tr-2", &quote("006TR0000002"), Some(caller_parent)).await;
    let garbage = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{202e}é".as_bytes();
    let minted = submit_traced(&client, &gw, "tr-3", &quote("006TR0000003"), Some(garbage)).await;
    let rejected = submit_traced(&client, &gw, "tr-4", &five_broken_rules(quote("006TR0000004")), None).await;
    assert_eq!(rejected.status(), 422);
    let header = |r: &reqwest::Response| r.headers()["traceparent"].to_str().unwrap().to_string();
    let rejected_tp = header(&rejected);
    let mut orders = Vec::new();
    for r in [plain, continued, minted] {
        assert_eq!(r.status(), 201, "{}", gw.log());
        let tp = header(&r);
        let order: Value = r.json().await.unwrap();
        orders.push((tp, order));
    }
    assert_eq!(trace_ids(&orders[1].0).0, caller_trace, "the caller's trace is continued");
    assert_ne!(trace_ids(&orders[2].0).0, caller_trace, "a malformed traceparent starts a new trace");
    let events = subscriber.wait_acknowledged(6, Duration::from_secs(15), &gw).await;

    for (i, (tp, order)) in orders.iter().enumerate() {
        let (trace, gateway_span) = trace_ids(tp);
        let spans = collector
            .wait_trace(
                &trace,
                |s| {
                    ["POST quote-to-order", "erp create order", "deliver order.accepted.v1"]
                        .iter()
                        .all(|n| s.iter().any(|x| x.name == *n))
                },
                &gw,
            )
            .await;
        let server: Vec<_> = spans.iter().filter(|s| s.kind == 2).collect();
        assert_eq!(server.len(), 1, "one gateway span per order: {spans:#?}");
        let server = server[0];
        assert_eq!(server.span_id, gateway_span, "the span the caller was told about");
        let expected_parent = if i == 1 { "00f067aa0ba902b7" } else { "" };
        assert_eq!(server.parent_span_id.trim_start_matches('0'), expected_parent.trim_start_matches('0'));
        assert_eq!(server.attributes["http.response.status_code"], "201");
        assert_eq!(server.attributes["http.route"], "quote-to-order");
        for s in &spans {
            assert_eq!(s.service, "causeway-test");
            assert!(s.end >= s.start, "{s:?}");
            if s.kind != 2 {
                assert_eq!(s.parent_span_id, gateway_span, "a child of the gateway span: {s:?}");
                assert_eq!(s.attributes["causeway.order_id"], order["id"].as_str().unwrap());
                assert_eq!(s.status, 1, "succeeded: {s:?}");
            }
        }
        let create = spans.iter().find(|s| s.name == "erp create order").unwrap();
        assert_eq!(create.kind, 3);
        assert_eq!(create.attributes["causeway.erp_order_number"], order["erpOrderNumber"].as_str().unwrap());
        assert!(
            create.start + 1_000_000 >= server.start && create.end <= server.end + 1_000_000,
            "the inline ERP exchange lies within the request: {create:?} {server:?}"
        );
        let delivery = spans.iter().find(|s| s.name == "deliver order.accepted.v1").unwrap();
        assert_eq!(delivery.kind, 4);
        assert_eq!(delivery.attributes["causeway.subscriber"], "crm");
        let event = events
            .iter()
            .find(|r| body(r)["subject"] == order["id"])
            .unwrap_or_else(|| panic!("the subscriber got order {i}'s event"));
        assert_eq!(delivery.attributes["cloudevents.event_id"], body(event)["id"].as_str().unwrap());
        assert_eq!(body(event)["traceparent"], tp.as_str(), "the CloudEvent carries the order's trace");
        let (sent_trace, sent_parent) = trace_ids(event.headers["traceparent"].to_str().unwrap());
        assert_eq!((sent_trace, sent_parent), (trace.clone(), delivery.span_id.clone()));
    }
    let distinct: std::collections::HashSet<String> = orders.iter().map(|(tp, _)| trace_ids(tp).0).collect();
    assert_eq!(distinct.len(), 3, "one trace per order");

    // A refusal is traced too: the gateway span answers 422 without failing, the rules' ERP
    // lookup and the rejection's delivery are its children.
    let (trace, gateway_span) = trace_ids(&rejected_tp);
    let spans = collector
        .wait_trace(
            &trace,
            |s| {
                ["POST quote-to-order", "erp master data", "deliver order.rejected.v1"]
                    .iter()
                    .all(|n| s.iter().any(|x| x.name == *n))
            },
            &gw,
        )
        .await;
    let server = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!((server.attributes["http.response.status_code"].as_str(), server.status), ("422", 0));
    assert!(spans.iter().filter(|s| s.kind != 2).all(|s| s.parent_span_id == gateway_span));
    assert!(!spans.iter().any(|s| s.name == "erp create order"), "a refused quote never reaches the ERP");

    // The caller did not sample its trace: nothing of it is exported (the last flush is past).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        collector.trace("0af7651916cd43dd8448eb211c80319c").is_empty(),
        "an unsampled trace is not exported"
    );
    // ... but it is still propagated to the subscriber, flagged unsampled.
    let unsampled_event = events
        .iter()
        .find(|r| body(r)["data"]["opportunityId"] == "006TR000000U")
        .expect("the unsampled order's event");
    let header = unsampled_event.headers["traceparent"].to_str().unwrap();
    assert!(
        header.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && header.ends_with("-00"),
        "{header}"
    );
}

/// Acceptance 2 as written: the subscriber is down (connections refused) for two minutes while
/// orders are taken and move through their lifecycle in the ERP, then answers 500s, then
/// recovers. Every event arrives, each order's in lifecycle order, none sent again once
/// acknowledged, none dead-lettered (the horizon is longer than the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_down_two_minutes_then_failing_gets_every_event_once_in_order() {
    let sandbox = TestSandbox::start(Default::default()).await;
    let port = free_port();
    let mut o = sandbox_options(sandbox.url(), FAST);
    o.main_extra.push_str(&format!(
        "  changes:\n    notification_url: http://127.0.0.1:{{PROXY_PORT}}/process/v1/erp-notifications\n    client_state_env: ERP_CLIENT_STATE\n\
         events:\n  subscribers:\n    crm:\n      url: http://127.0.0.1:{port}/hooks\n      secret_env: [CRM_HOOK_SECRET]\n      \
         backoff_initial_ms: 200\n      backoff_max_ms: 5000\n      dead_letter_after_seconds: 900\n"
    ));
    o.env.push(("CRM_HOOK_SECRET".into(), SECRET.into()));
    o.env.push(("ERP_CLIENT_STATE".into(), CLIENT_STATE.into()));
    let gw = TestGateway::start(o).await;
    wait_subscribed(&sandbox, &gw).await;
    let client = reqwest::Client::new();
    let outage = Instant::now();
    let mut numbers = Vec::new();
    let take = |range: std::ops::Range<usize>| {
        let (client, gw) = (&client, &gw);
        async move {
            let mut taken = Vec::new();
            for n in range {
                let resp = submit(client, gw, &format!("out-{n}"), &quote(&format!("006OUT{n:06}"))).await;
                assert_eq!(resp.status(), 201, "{}", gw.log());
                taken.push(
                    resp.json::<Value>().await.unwrap()["erpOrderNumber"].as_str().unwrap().to_string(),
                );
            }
            taken
        }
    };
    numbers.extend(take(0..6).await);
    for n in &numbers[0..4] {
        sandbox_control(&sandbox, n, "ship").await;
    }
    tokio::time::sleep_until((outage + Duration::from_secs(40)).into()).await;
    for n in &numbers[0..3] {
        sandbox_control(&sandbox, n, "invoice").await;
    }
    numbers.extend(take(6..9).await);
    tokio::time::sleep_until((outage + Duration::from_secs(80)).into()).await;
    for n in &numbers[0..2] {
        sandbox_control(&sandbox, n, "pay").await;
    }
    for n in &numbers[6..8] {
        sandbox_control(&sandbox, n, "ship").await;
    }
    tokio::time::sleep_until((outage + Duration::from_secs(120)).into()).await;

    // Back, but failing: every attempt answered 500 for a while.
    let subscriber = Subscriber::start_on(port, Duration::ZERO).await;
    subscriber.status.store(500, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !subscriber.received.lock().unwrap().is_empty(),
        "retries reach the failing subscriber\n{}",
        gw.log()
    );
    subscriber.status.store(200, Ordering::SeqCst);

    // 9 accepted, 6 shipped, 3 invoices, 2 payments.
    let expected = 20;
    subscriber.wait_acknowledged(expected, Duration::from_secs(30), &gw).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = subscriber.acknowledged();
    let mut once: std::collections::HashMap<String, usize> = Default::default();
    let mut by_order: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in &got {
        let e = body(r);
        assert!(verify(SECRET, r), "signed: {e:#}");
        *once.entry(e["id"].as_str().unwrap().to_string()).or_default() += 1;
        by_order
            .entry(e["data"]["erpOrderNumber"].as_str().unwrap().to_string())
            .or_default()
            .push(e["type"].as_str().unwrap().to_string());
    }
    assert!(once.values().all(|&n| n == 1), "an acknowledged event was sent again: {once:?}");
    assert_eq!(got.len(), expected, "{by_order:#?}");
    let lifecycle = ["order.accepted.v1", "order.shipped.v1", "invoice.issued.v1", "payment.received.v1"];
    for (i, number) in numbers.iter().enumerate() {
        let reached = match i {
            0 | 1 => 4,
            2 => 3,
            3 | 6 | 7 => 2,
            _ => 1,
        };
        let want: Vec<String> = lifecycle[..reached].iter().map(|s| s.to_string()).collect();
        assert_eq!(by_order.get(number), Some(&want), "order {number} in lifecycle order\n{by_order:#?}");
    }
}
