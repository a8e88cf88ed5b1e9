//! Authentication, authorization and consumer rate limits, against the real gateway process, a
//! local IdP serving a JWKS, and the sandbox (whose counters prove nothing reached the ERP).

use crate::common::*;
use axum::routing::get;
use causeway::sandbox::{data::COMPANY_ID, LimitsSpec};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://idp.example.test/";
const AUDIENCE: &str = "erp-gateway";
const API_KEY: &str = "bi-dashboard-secret-key-0001";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn jwk(name: &str) -> Value {
    serde_json::from_slice(&fixture(&format!("{name}.jwk.json"))).unwrap()
}

/// A local identity provider: serves a JWKS that tests can rotate, and counts fetches.
struct Idp {
    port: u16,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicU64>,
}

impl Idp {
    async fn start(keys: &[&str]) -> Self {
        let keys = Arc::new(Mutex::new(keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()));
        let fetches = Arc::new(AtomicU64::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwks.json",
            get(move || {
                let (k, f) = (k.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({ "keys": *k.lock().unwrap() }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Idp { port, keys, fetches }
    }

    fn publish(&self, keys: &[&str]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| jwk(k)).collect();
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(sub: &str, scope: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "exp": now() + 600, "iat": now(), "scope": scope, "tier": "gold"})
}

fn sign(key: &str, alg: Algorithm, claims: &Value) -> String {
    let pem = fixture(&format!("{key}.pem"));
    let enc = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(key.to_string());
    encode(&header, claims, &enc).unwrap()
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn options(sandbox: &TestSandbox, idp: &Idp, refresh: u64, min_refetch: u64) -> GatewayOptions {
    let mut opts = GatewayOptions::new(sandbox.url());
    let key_hash = hex::encode(Sha256::digest(API_KEY.as_bytes()));
    opts.policies_yaml = format!(
        r#"policies:
  - name: idp
    kind: jwt
    issuer: "{ISSUER}"
    audiences: [{AUDIENCE}]
    jwks_url: http://127.0.0.1:{}/jwks.json
    refresh_seconds: {refresh}
    min_refetch_seconds: {min_refetch}
    leeway_seconds: 5
  - name: partner-keys
    kind: api_key
    keys:
      - {{ consumer: bi-dashboard, tier: bulk, scopes: [erp.read], sha256: {key_hash} }}
  - name: quota
    kind: rate_limit
    tiers:
      gold: {{ requests: 20, window_seconds: 60, burst: 5 }}
      bulk: {{ requests: 1000, window_seconds: 60 }}
"#,
        idp.port
    );
    opts.routes_yaml = format!(
        r#"routes:
  - name: secured-read
    match: {{ methods: [GET], path: "/erp/v2/{{*rest}}" }}
    upstream: bc
    rewrite: "/api/v2.0/companies({COMPANY_ID})/{{rest}}"
    policies: [idp, partner-keys, quota]
    scopes: [erp.read]
  - name: secured-write
    match: {{ methods: [POST], path: "/erp/v2/{{*rest}}" }}
    upstream: bc
    rewrite: "/api/v2.0/companies({COMPANY_ID})/{{rest}}"
    policies: [idp]
    scopes: [erp.write]
"#
    );
    opts
}

async fn get_with(gw: &TestGateway, auth: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(gw.url("/erp/v2/items?$top=1"));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

async fn erp_requests(sandbox: &TestSandbox) -> u64 {
    sandbox.stats().await["requests_total"].as_u64().unwrap()
}

#[tokio::test]
async fn attacks_are_refused_and_never_reach_the_erp() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let idp = Idp::start(&["rsa-old"]).await;
    let mut opts = options(&sandbox, &idp, 300, 10);
    // The 100 KB token must reach the JWT policy's own size check.
    opts.listen_extra = "  max_header_bytes: 262144\n".into();
    let gw = TestGateway::start(opts).await;

    // Sanity: a valid token passes and reaches the ERP.
    let good = sign("rsa-old", Algorithm::RS256, &claims("crm", "erp.read"));
    assert_eq!(get_with(&gw, Some(&format!("Bearer {good}"))).await.status(), 200);
    let before = erp_requests(&sandbox).await;

    let header_none = b64(br#"{"alg":"none","typ":"JWT","kid":"rsa-old"}"#);
    let body = b64(claims("crm", "erp.read").to_string().as_bytes());
    let alg_none = format!("{header_none}.{body}.");

    // HS256 "signed" with the RSA public key as the HMAC secret (key confusion).
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("rsa-old".into());
    let confused =
        encode(&hs, &claims("crm", "erp.read"), &EncodingKey::from_secret(&fixture("rsa-old.pub.pem")))
            .unwrap();

    let mut expired = claims("crm", "erp.read");
    expired["exp"] = json!(now() - 3600);
    let mut early = claims("crm", "erp.read");
    early["nbf"] = json!(now() + 3600);
    let mut wrong_iss = claims("crm", "erp.read");
    wrong_iss["iss"] = json!("https://evil.example/");
    let mut wrong_aud = claims("crm", "erp.read");
    wrong_aud["aud"] = json!("someone-else");
    let mut unknown_kid_header = Header::new(Algorithm::RS256);
    unknown_kid_header.kid = Some("not-published".into());
    let unknown_kid = encode(
        &unknown_kid_header,
        &claims("crm", "erp.read"),
        &EncodingKey::from_rsa_pem(&fixture("rsa-new.pem")).unwrap(),
    )
    .unwrap();
    let huge = format!("{}.{}.{}", header_none, "A".repeat(100 * 1024), "sig");

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "malformed"),
        ("HS256 with the RSA public key", confused, "algorithm_not_allowed"),
        ("expired", sign("rsa-old", Algorithm::RS256, &expired), "expired"),
        ("nbf in the future", sign("rsa-old", Algorithm::RS256, &early), "not_yet_valid"),
        ("wrong iss", sign("rsa-old", Algorithm::RS256, &wrong_iss), "wrong_issuer"),
        ("wrong aud", sign("rsa-old", Algorithm::RS256, &wrong_aud), "wrong_audience"),
        ("unknown kid", unknown_kid, "unknown_key"),
        ("malformed", "not.a.jwt".to_string(), "malformed"),
        ("100 KB token", huge, "too_large"),
    ];
    for (what, token, reason) in cases {
        let resp = get_with(&gw, Some(&format!("Bearer {token}"))).await;
        let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
        let body = assert_problem(resp, 401, "unauthenticated").await;
        assert_eq!(body["reason"], reason, "{what}");
        assert!(challenge.is_some_and(|c| c.contains("Bearer")), "{what}: WWW-Authenticate");
    }
    // No credentials at all.
    let resp = get_with(&gw, None).await;
    assert_eq!(
        resp.headers().get("www-authenticate").unwrap().to_str().unwrap(),
        "Bearer realm=\"causeway\", ApiKey realm=\"causeway\", header=\"x-api-key\""
    );
    assert_problem(resp, 401, "unauthenticated").await;

    // Valid token, missing scope: 403.
    let read_only = sign("rsa-old", Algorithm::RS256, &claims("crm", "erp.read"));
    let resp = reqwest::Client::new()
        .post(gw.url("/erp/v2/salesOrders"))
        .header("authorization", format!("Bearer {read_only}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let body = assert_problem(resp, 403, "insufficient-scope").await;
    assert_eq!(body["missing_scopes"], json!(["erp.write"]));

    assert_eq!(erp_requests(&sandbox).await, before, "no refused request reached the ERP");
    let metrics = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"causeway_auth_failures_total{policy="idp",reason="expired"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_flood_of_unknown_kids_causes_a_bounded_number_of_jwks_fetches() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let idp = Idp::start(&["rsa-old"]).await;
    // The JWKS fetches are under test, not the failed-authentication limit (tests/hardening.rs).
    let mut opts = options(&sandbox, &idp, 300, 10);
    opts.main_extra = "auth_failures: { max_failures: 0 }\n".into();
    let gw = TestGateway::start(opts).await;
    let good = sign("rsa-old", Algorithm::RS256, &claims("crm", "erp.read"));
    assert_eq!(get_with(&gw, Some(&format!("Bearer {good}"))).await.status(), 200);
    let before = idp.fetches();
    let key = EncodingKey::from_rsa_pem(&fixture("rsa-old.pem")).unwrap();
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some(format!("bogus-{i}"));
            encode(&h, &claims("crm", "erp.read"), &key).unwrap()
        })
        .collect();
    let client = reqwest::Client::new();
    let url = gw.url("/erp/v2/items?$top=1");
    let mut statuses = Vec::new();
    for batch in tokens.chunks(50) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|t| {
                let req = client.get(&url).header("authorization", format!("Bearer {t}"));
                tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
            })
            .collect();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
    }
    assert!(statuses.iter().all(|s| *s == 401));
    let extra = idp.fetches() - before;
    assert!(
        extra <= 1,
        "1,000 unknown kids caused {extra} JWKS fetches (at most one per min_refetch_seconds)"
    );
}

#[tokio::test]
async fn key_rotation_without_restart() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let idp = Idp::start(&["rsa-old"]).await;
    let gw = TestGateway::start(options(&sandbox, &idp, 1, 1)).await;
    let old = sign("rsa-old", Algorithm::RS256, &claims("crm", "erp.read"));
    let new = sign("rsa-new", Algorithm::RS256, &claims("crm", "erp.read"));
    assert_eq!(get_with(&gw, Some(&format!("Bearer {old}"))).await.status(), 200);
    assert_eq!(
        get_with(&gw, Some(&format!("Bearer {new}"))).await.status(),
        401,
        "new key not published yet"
    );

    // The IdP publishes the new key next to the old one.
    idp.publish(&["rsa-old", "rsa-new"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get_with(&gw, Some(&format!("Bearer {new}"))).await.status(),
        200,
        "new key picked up without restart"
    );
    assert_eq!(get_with(&gw, Some(&format!("Bearer {old}"))).await.status(), 200);

    // The old key is withdrawn: once the scheduled refresh has run, old-key tokens stop working,
    // even though they were verified (and cached) before.
    idp.publish(&["rsa-new"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    loop {
        let status = get_with(&gw, Some(&format!("Bearer {old}"))).await.status();
        if status == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old-key token still accepted after the key was removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get_with(&gw, Some(&format!("Bearer {new}"))).await.status(), 200);
}

#[tokio::test]
async fn es256_eddsa_and_api_keys_identify_consumers() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let idp = Idp::start(&["ec", "ed"]).await;
    let gw = TestGateway::start(options(&sandbox, &idp, 300, 10)).await;
    let es = sign("ec", Algorithm::ES256, &claims("crm-es", "erp.read"));
    let ed = sign("ed", Algorithm::EdDSA, &claims("crm-ed", "erp.read"));
    assert_eq!(get_with(&gw, Some(&format!("Bearer {es}"))).await.status(), 200);
    assert_eq!(get_with(&gw, Some(&format!("Bearer {ed}"))).await.status(), 200);
    // An EC key cannot verify an RS256-labelled token (alg pinned to the key type).
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("ec".into());
    let mislabelled =
        encode(&h, &claims("x", "erp.read"), &EncodingKey::from_rsa_pem(&fixture("rsa-old.pem")).unwrap())
            .unwrap();
    let body =
        assert_problem(get_with(&gw, Some(&format!("Bearer {mislabelled}"))).await, 401, "unauthenticated")
            .await;
    assert_eq!(body["reason"], "algorithm_not_allowed");

    let client = reqwest::Client::new();
    let ok = client.get(gw.url("/erp/v2/items?$top=1")).header("x-api-key", API_KEY).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let bad = client.get(gw.url("/erp/v2/items?$top=1")).header("x-api-key", "guess").send().await.unwrap();
    let body = assert_problem(bad, 401, "unauthenticated").await;
    assert_eq!(body["reason"], "unknown_api_key");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gw.log();
    assert!(
        log.contains(r#""consumer":"bi-dashboard""#) && log.contains(r#""consumer":"crm-ed""#),
        "consumers in the access log"
    );
}

#[tokio::test]
async fn rate_limit_admits_quota_plus_burst_and_isolates_consumers() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let idp = Idp::start(&["rsa-old"]).await;
    let gw = TestGateway::start(options(&sandbox, &idp, 300, 10)).await;
    let a = sign("rsa-old", Algorithm::RS256, &claims("consumer-a", "erp.read"));
    let b = sign("rsa-old", Algorithm::RS256, &claims("consumer-b", "erp.read"));
    let (n, burst) = (20, 5);
    let mut admitted = 0;
    let mut limited = 0;
    for _ in 0..3 * n {
        let resp = get_with(&gw, Some(&format!("Bearer {a}"))).await;
        assert_eq!(resp.headers().get("ratelimit-policy").unwrap(), "\"gold\";q=20;w=60");
        let limit = resp.headers().get("ratelimit").unwrap().to_str().unwrap().to_string();
        assert!(limit.starts_with("\"gold\";r="), "{limit}");
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => {
                limited += 1;
                let retry: u64 =
                    resp.headers().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
                assert!((1..=3).contains(&retry), "one request frees every 3 s: {retry}");
                assert!(limit.starts_with("\"gold\";r=0;"), "{limit}");
                assert_problem(resp, 429, "quota-exceeded").await;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!((n..=n + burst).contains(&admitted), "admitted {admitted} of {}", 3 * n);
    assert_eq!(admitted + limited, 3 * n);
    assert_eq!(
        get_with(&gw, Some(&format!("Bearer {b}"))).await.status(),
        200,
        "another consumer is unaffected"
    );
    let metrics = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(&format!(
            r#"causeway_ratelimit_rejections_total{{route="secured-read",tier="gold"}} {limited}"#
        )),
        "{metrics}"
    );
}
