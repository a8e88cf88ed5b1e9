//! The gateway's edges as an attacker and a misbehaving ERP find them: authentication by default,
//! credentials that stay on their side, paths and framing that cannot be read two ways, slow
//! headers, failed-authentication limits, JWT `crit`, refusals that are all problems, ERP pauses
//! that stay bounded, and reload however `-c` is written. Each test starts the real gateway.

use crate::common::config::{Budget, Patch};

use crate::common::origin::{ok_response, raw_request, RawOrigin};
use crate::common::*;
use causeway::sandbox::data::COMPANY_ID;
use causeway::sandbox::LimitsSpec;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const READ_KEY: &str = "demo-erp-read-key";
const WRITE_KEY: &str = "demo-erp-write-key";

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The shipped system and canonical routes with the shipped policies, in front of `upstream`.
fn shipped_erp_routes(upstream: String) -> GatewayOptions {
    let mut o = GatewayOptions::new(upstream);
    o.routes_yaml = repo("routes/erp-system.yaml");
    o.policies_yaml = repo("policies/headers.yaml");
    o.policy_files.push(("consumers.yaml".into(), repo("policies/consumers.yaml")));
    o.policy_files.push(("partners.yaml".into(), repo("policies/partners.yaml")));
    o.upstream_extra =
        "    budget: { window_requests: 6000, window_seconds: 300, max_concurrent: 5 }\n".into();
    o
}

#[tokio::test]
async fn the_shipped_routes_never_lend_the_erp_credential_to_an_anonymous_or_unscoped_caller() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = shipped_erp_routes(sandbox.url());
    opts.shipped_mediation = true;
    opts.routes_yaml.push_str(&repo("routes/erp-canonical.yaml").patched("routes:\n", ""));
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::new();
    let order = serde_json::json!({"customerNumber": "C10000", "externalDocumentNumber": "ANON-1"});

    let resp = client.post(gw.url("/erp/v2/salesOrders")).json(&order).send().await.unwrap();
    assert_problem(resp, 401, "unauthenticated").await;
    let resp = client.get(gw.url("/erp/v2/salesOrders")).send().await.unwrap();
    assert_problem(resp, 401, "unauthenticated").await;
    // The partner key belongs to /partner/v1: it opens nothing under /erp.
    let resp = client
        .get(gw.url("/erp/v2/salesOrders"))
        .header("x-api-key", "demo-partner-key")
        .send()
        .await
        .unwrap();
    assert_problem(resp, 401, "unauthenticated").await;
    // A reader cannot write.
    let resp = client
        .post(gw.url("/erp/v2/salesOrders"))
        .header("x-api-key", READ_KEY)
        .json(&order)
        .send()
        .await
        .unwrap();
    let body = assert_problem(resp, 403, "insufficient-scope").await;
    assert_eq!(body["missing_scopes"], serde_json::json!(["erp.write"]));
    let resp = client.post(gw.url("/erp/v1/sales-orders")).json(&order).send().await.unwrap();
    assert_problem(resp, 401, "unauthenticated").await;
    assert_eq!(sandbox.stats().await["requests_total"], 0, "nothing reached the ERP");

    let resp = client.get(gw.url("/erp/v2/salesOrders")).header("x-api-key", READ_KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("ratelimit-policy").is_some(), "the consumer's quota applies");
    let resp = client
        .post(gw.url("/erp/v2/salesOrders"))
        .header("x-api-key", WRITE_KEY)
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", gw.log());
}

#[tokio::test]
async fn caller_credentials_never_go_upstream_and_the_erp_session_never_comes_back() {
    let origin = RawOrigin::start(ok_response(
        "set-cookie: ERPSESSION=secret; HttpOnly\r\nwww-authenticate: Basic realm=\"erp\"\r\nx-csrf-token: abc123\r\nproxy-authenticate: Basic\r\nx-kept: yes\r\n",
    ))
    .await;
    let mut opts = shipped_erp_routes(origin.url());
    opts.routes_yaml = r#"routes:
  - name: keyed
    match: { methods: [GET], path: /keyed }
    upstream: bc
    policies: [erp-keys]
    scopes: [erp.read]
  - name: cookie-session
    match: { methods: [GET], path: /session }
    upstream: bc
    policies: [erp-keys]
    scopes: [erp.read]
    pass_headers: { request: [cookie], response: [set-cookie] }
"#
    .into();
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::new();
    let resp = client
        .get(gw.url("/keyed"))
        .header("x-api-key", READ_KEY)
        .header("authorization", "Bearer caller-token")
        .header("cookie", "caller=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for gone in ["set-cookie", "www-authenticate", "x-csrf-token", "proxy-authenticate"] {
        assert!(resp.headers().get(gone).is_none(), "{gone} reached the caller");
    }
    assert_eq!(resp.headers()["x-kept"], "yes");
    let sent = String::from_utf8_lossy(&origin.received()[0]).to_ascii_lowercase();
    assert!(!sent.contains("x-api-key"), "the API key went upstream:\n{sent}");
    assert!(!sent.contains(READ_KEY), "{sent}");
    assert!(!sent.contains("cookie:"), "{sent}");
    assert!(!sent.contains("caller-token"), "{sent}");
    assert!(sent.contains(&format!("authorization: bearer {UPSTREAM_TOKEN}")), "{sent}");

    // The rare route that needs a session cookie passes exactly what it names.
    let resp = client
        .get(gw.url("/session"))
        .header("x-api-key", READ_KEY)
        .header("cookie", "erp=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["set-cookie"], "ERPSESSION=secret; HttpOnly");
    assert!(resp.headers().get("www-authenticate").is_none());
    let sent = String::from_utf8_lossy(&origin.received()[1]).to_ascii_lowercase();
    assert!(sent.contains("cookie: erp=1") && !sent.contains("x-api-key"), "{sent}");
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_never_reach_the_erp() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let gw = TestGateway::start(GatewayOptions::new(sandbox.url())).await;
    let refused = [
        "/erp/v2/../../../x",
        "/erp/v2/%2e%2e/%2E%2e/%2e%2e/x",
        "/erp/v2/items%2F..%2F..%2F..%2Fx",
        "/erp/v2/items%2fx",
        "/erp/v2/items%5C..%5Cx",
        "/erp/v2/items%00",
        "/erp/v2/items/%zz",
    ];
    for path in refused {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
        let (status, head, body, _) = raw_request(gw.proxy_port, request.as_bytes()).await;
        assert_eq!(status, 400, "{path}: {head}\n{body}");
        assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{head}");
        assert!(body.contains("bad-request"), "{body}");
    }
    assert_eq!(sandbox.stats().await["requests_total"], 0, "no refused path reached the ERP");

    let (status, _, _, _) =
        raw_request(gw.proxy_port, b"GET /erp/v2/items/../customers?$top=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await;
    assert_eq!(status, 200);
    let (status, _, _, _) =
        raw_request(gw.proxy_port, b"GET /erp/v2/%69tems?$top=1 HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(status, 200);
    let uris: Vec<String> =
        sandbox.received().await.iter().map(|r| r["uri"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        uris,
        [
            format!("/api/v2.0/companies({COMPANY_ID})/customers?$top=1"),
            format!("/api/v2.0/companies({COMPANY_ID})/items?$top=1")
        ],
        "the ERP sees the normalized path"
    );
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_never_reaches_a_lenient_origin() {
    let origin = RawOrigin::start(ok_response("")).await;
    let gw = TestGateway::start(GatewayOptions::new(origin.url())).await;
    let shapes: [(&str, &str); 12] = [
        ("CL.TE", "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"),
        (
            "TE.CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n",
        ),
        ("two CL", "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("same CL twice", "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ("CL list", "Content-Length: 5, 5\r\n\r\nhello"),
        ("TE twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("TE list", "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("TE not chunked", "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("TE gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("TE space before colon", "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
        ("CL with a sign", "Content-Length: +5\r\n\r\nhello"),
        ("TE obs-fold", "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
    ];
    for (what, rest) in shapes {
        let request = format!("POST /erp/v2/salesOrders HTTP/1.1\r\nHost: gw\r\n{rest}");
        let (status, head, body, closed) = raw_request(gw.proxy_port, request.as_bytes()).await;
        assert_eq!(status, 400, "{what}: {head}\n{body}");
        assert!(body.contains("\"status\":400"), "{what}: a problem body: {body}");
        assert!(closed, "{what}: the connection is closed");
    }
    let bare_lf = b"POST /erp/v2/salesOrders HTTP/1.1\nHost: gw\nContent-Length: 2\n\n{}";
    let (status, _, body, closed) = raw_request(gw.proxy_port, bare_lf).await;
    assert_eq!((status, closed), (400, true), "bare LF: {body}");
    assert_eq!(
        origin.requests(),
        0,
        "no ambiguous request reached the origin: {:?}",
        origin.received().iter().map(|r| String::from_utf8_lossy(r).to_string()).collect::<Vec<_>>()
    );

    // The control: an unambiguous chunked body goes through.
    let good = b"POST /erp/v2/salesOrders HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let (status, _, _, _) = raw_request(gw.proxy_port, good).await;
    assert_eq!(status, 200);
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_header_connections_are_closed_at_the_deadline_while_requests_go_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.listen_extra = "  client_header_timeout_ms: 1500\n".into();
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(gw.url("/erp/v2/items?$top=1")).send().await.unwrap().status(), 200);
    let idle_rss = rss_kb(gw.child.id());

    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).await.unwrap();
        s.write_all(b"GET /erp/v2/companies HTTP/1.1\r\nHost: gw\r\n").await.unwrap();
        slow.push(s);
    }
    // Each adds a header line every 300 ms, as a slowloris client does.
    let trickle = tokio::spawn(async move {
        let mut closed_at = vec![None; slow.len()];
        let mut buf = [0u8; 64];
        while closed_at.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(8) {
            for (i, s) in slow.iter_mut().enumerate() {
                if closed_at[i].is_some() {
                    continue;
                }
                let _ = s.write_all(b"X-Slow: 1\r\n").await;
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_micros(50), s.read(&mut buf)).await
                {
                    closed_at[i] = Some(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        closed_at
    });
    // Meanwhile, ordinary requests are served.
    let mut peak_rss = 0;
    for _ in 0..20 {
        let resp = client.get(gw.url("/erp/v2/items?$top=1")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        peak_rss = peak_rss.max(rss_kb(gw.child.id()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_at = trickle.await.unwrap();
    let still_open = closed_at.iter().filter(|c| c.is_none()).count();
    assert_eq!(still_open, 0, "{still_open} of 1000 slow connections still open after 8 s");
    let latest = closed_at.iter().flatten().max().unwrap();
    assert!(
        *latest < Duration::from_millis(1500 + 1500),
        "the last was closed at {latest:?}, deadline 1.5 s"
    );
    gw.wait_for_metric("causeway_header_deadline_closed_total 1000", Duration::from_secs(5)).await;
    // Traffic goes on; the allocator gives the slow connections' memory back as it runs.
    for _ in 0..25 {
        assert_eq!(client.get(gw.url("/erp/v2/items?$top=1")).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_rss = rss_kb(gw.child.id());
    eprintln!("RSS idle {idle_rss} KB, with 1000 slow connections {peak_rss} KB, after {after_rss} KB");
    assert!(
        after_rss <= idle_rss + 8 * 1024,
        "RSS returns near idle: idle {idle_rss} KB, after {after_rss} KB (peak {peak_rss} KB)"
    );
}

#[tokio::test]
async fn connect_malformed_and_oversized_requests_are_answered_with_problems() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let gw = TestGateway::start(GatewayOptions::new(sandbox.url())).await;
    let (status, head, body, _) =
        raw_request(gw.proxy_port, b"CONNECT erp.example:443 HTTP/1.1\r\nHost: erp.example:443\r\n\r\n")
            .await;
    assert_eq!(status, 405, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{head}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["type"], "https://causeway.dev/problems/method-not-allowed");
    assert!(problem["correlation_id"].as_str().is_some());

    for (what, request) in [
        ("no colon", "GET /erp/v2/companies HTTP/1.1\r\nHost: gw\r\nBroken header\r\n\r\n".to_string()),
        (
            "too many fields",
            format!("GET /erp/v2/companies HTTP/1.1\r\nHost: gw\r\n{}\r\n", "X-A: 1\r\n".repeat(150)),
        ),
        (
            "too large",
            format!("GET /erp/v2/companies HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000)),
        ),
    ] {
        let (status, head, body, closed) = raw_request(gw.proxy_port, request.as_bytes()).await;
        assert_eq!(status, 400, "{what}: {head}");
        let problem: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert_eq!(problem["type"], "https://causeway.dev/problems/bad-request", "{what}");
        assert!(closed, "{what}");
    }
    assert_eq!(sandbox.stats().await["requests_total"], 0);
}

#[tokio::test]
async fn an_erp_retry_after_of_ten_years_pauses_the_budget_at_most_max_pause_and_an_operator_resumes_it() {
    let origin = RawOrigin::start(
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 315360000\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            .to_vec(),
    )
    .await;
    let mut opts = GatewayOptions::new(origin.url());
    opts.upstream_extra = Budget { max_pause_seconds: Some(20), ..Budget::new(1000, 60, 5) }.upstream_yaml();
    opts.env.push(("CAUSEWAY_ADMIN_TOKEN".into(), "admin-secret".into()));
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::new();
    let resp = client.get(gw.url("/erp/v2/companies")).send().await.unwrap();
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_problem(resp, 503, "erp-overloaded").await;
    assert!(retry_after <= 20, "the caller is told the capped pause, not ten years: {retry_after}");

    let admin = |path: &str| client.get(gw.admin(path)).bearer_auth("admin-secret");
    let budgets: Value = admin("/admin/budgets").send().await.unwrap().json().await.unwrap();
    let bc = &budgets["value"][0];
    assert_eq!(bc["upstream"], "bc");
    let paused = bc["paused_for_ms"].as_u64().unwrap();
    assert!(paused > 15_000 && paused <= 20_000, "{budgets}");
    let metrics = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("causeway_erp_pause_seconds{upstream=\"bc\"} "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(gauge > 15.0 && gauge <= 20.0, "{gauge}");

    // While paused, nothing is sent; an unauthenticated resume is refused.
    let before = origin.requests();
    let resp = client.get(gw.url("/erp/v2/companies")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(origin.requests(), before);
    let resp = client.post(gw.admin("/admin/budgets/bc/resume")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp =
        client.post(gw.admin("/admin/budgets/nope/resume")).bearer_auth("admin-secret").send().await.unwrap();
    assert_eq!(resp.status(), 404);

    origin.set_response(ok_response(""));
    let resp =
        client.post(gw.admin("/admin/budgets/bc/resume")).bearer_auth("admin-secret").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let budgets: Value = admin("/admin/budgets/bc").send().await.unwrap().json().await.unwrap();
    assert_eq!(budgets["paused_for_ms"], 0);
    assert_eq!(client.get(gw.url("/erp/v2/companies")).send().await.unwrap().status(), 200);

    // Values that overflow or lie: no crash, the pause stays capped.
    for value in ["18446744073709551615", "99999999999999999999999", "Fri, 31 Dec 9999 23:59:59 GMT", "-5"] {
        origin.set_response(
            format!("HTTP/1.1 429 Too Many Requests\r\nretry-after: {value}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .into_bytes(),
        );
        client.post(gw.admin("/admin/budgets/bc/resume")).bearer_auth("admin-secret").send().await.unwrap();
        let resp = client.get(gw.url("/erp/v2/companies")).send().await.unwrap();
        assert_eq!(resp.status(), 503, "{value}");
        let budget: Value = admin("/admin/budgets/bc").send().await.unwrap().json().await.unwrap();
        assert!(budget["paused_for_ms"].as_u64().unwrap() <= 20_000, "{value}: {budget}");
    }
}

#[tokio::test]
async fn failed_authentications_are_limited_per_client_address() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = shipped_erp_routes(sandbox.url());
    opts.main_extra = "auth_failures: { max_failures: 5, window_seconds: 2 }\n".into();
    let gw = TestGateway::start(opts).await;
    let client = reqwest::Client::new();
    let get = |key: &str| client.get(gw.url("/erp/v2/companies")).header("x-api-key", key.to_string()).send();
    for i in 0..5 {
        let resp = get(&format!("guess-{i}")).await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    let resp = get("guess-6").await.unwrap();
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_problem(resp, 429, "too-many-authentication-failures").await;
    // Nothing is checked from that address until the window ends, a valid key included.
    assert_eq!(get(READ_KEY).await.unwrap().status(), 429);
    assert_eq!(sandbox.stats().await["requests_total"], 0);
    let metrics = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"causeway_auth_failures_total{policy="erp-keys",reason="throttled"} 2"#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get(READ_KEY).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_jwt_listing_a_critical_extension_is_refused() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    let secret = "a-test-secret-of-at-least-32-bytes!!";
    opts.policies_yaml = format!(
        "policies:\n  - name: idp\n    kind: jwt\n    issuer: https://idp.example/\n    audiences: [gw]\n    jwks_file: jwks.json\n    hs256_secret: \"{secret}\"\n"
    );
    opts.policy_files.push(("../jwks.json".into(), r#"{"keys":[]}"#.into()));
    opts.routes_yaml = "routes:\n  - name: r\n    match: { methods: [GET], path: /erp/v2/companies }\n    upstream: bc\n    rewrite: /api/v2.0/companies\n    policies: [idp]\n    scopes: [erp.read]\n".into();
    let gw = TestGateway::start(opts).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"sub": "crm", "iss": "https://idp.example/", "aud": "gw", "exp": now + 600, "scope": "erp.read"});
    let key = EncodingKey::from_secret(secret.as_bytes());
    let plain = encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
    let mut critical = Header::new(Algorithm::HS256);
    critical.crit = Some(vec!["http://example.invalid/must-understand".into()]);
    let critical = encode(&critical, &claims, &key).unwrap();
    let client = reqwest::Client::new();
    let get = |token: String| client.get(gw.url("/erp/v2/companies")).bearer_auth(token).send();
    let resp = get(critical).await.unwrap();
    let body = assert_problem(resp, 401, "unauthenticated").await;
    assert_eq!(body["reason"], "unsupported_crit");
    assert_eq!(sandbox.stats().await["requests_total"], 0);
    assert_eq!(get(plain).await.unwrap().status(), 200);
}

#[tokio::test]
async fn serve_with_a_relative_configuration_directory_reloads_on_file_changes() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = (free_port(), free_port(), free_port());
    write_config(dir.path(), &GatewayOptions::new(sandbox.url()), ports);
    let mut child = std::process::Command::new(binary())
        .args(["serve", "-c", "."])
        .current_dir(dir.path())
        .env("CAUSEWAY_TEST_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", ports.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while reqwest::get(url("/erp/v2/companies")).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reqwest::get(url("/renamed/companies")).await.unwrap().status(), 404);
    // As `sed -i` edits: a temporary file renamed over the route file.
    let routes = dir.path().join("routes/routes.yaml");
    let edited = std::fs::read_to_string(&routes)
        .unwrap()
        .patched("/partner/companies", "/renamed/companies")
        .patched("host: partner.example, ", "");
    let tmp = dir.path().join("routes/sedXYZ123");
    std::fs::write(&tmp, edited).unwrap();
    std::fs::rename(&tmp, &routes).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = reqwest::get(url("/renamed/companies")).await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the edited route was not reloaded (still {status})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}
