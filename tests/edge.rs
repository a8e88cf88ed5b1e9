//! Where a gateway lives: TLS listeners (HTTP/1.1 and HTTP/2, SNI, certificates rotated under
//! load, no old protocols), client certificates and the `mtls` policy, the client's address
//! behind trusted proxies and the PROXY protocol, CORS and IP filters. Certificates are made per
//! run (rcgen); the gateway is the real binary on loopback in front of the real sandbox.

mod common;

use causeway::sandbox::LimitsSpec;
use common::tls::{client, fingerprint, served_fingerprint, Ca, Issued, Leaf};
use common::{assert_problem, GatewayOptions, TestGateway, TestSandbox};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn company() -> &'static str {
    causeway::sandbox::data::COMPANY_ID
}

/// The certificates of a test: a server CA with the gateway's two certificates (SNI), a
/// client CA, and a CA nobody trusts.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: Ca,
    client_ca: Ca,
    stranger_ca: Ca,
    server: Issued,
    partner_site: Issued,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::new("Causeway test server CA");
        let client_ca = Ca::new("Causeway test partner CA");
        let stranger_ca = Ca::new("Someone else's CA");
        let server = server_ca.issue(&Leaf::server(&["localhost", "gateway.test"]));
        let partner_site = server_ca.issue(&Leaf::server(&["partner.example"]));
        server.write(dir.path(), "server");
        partner_site.write(dir.path(), "partner-site");
        client_ca.write(dir.path(), "clients");
        Pki { dir, server_ca, client_ca, stranger_ca, server, partner_site }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A `tls:` listener entry on `port`.
    fn listener(&self, port: u16, client_mode: Option<&str>) -> String {
        let client = client_mode.map_or(String::new(), |mode| {
            format!("      client_certificates: {{ mode: {mode}, ca: {} }}\n", self.path("clients.pem"))
        });
        format!(
            "    - address: 127.0.0.1:{port}\n      certificates:\n        - {{ cert: {}, key: {} }}\n        - {{ cert: {}, key: {} }}\n{client}",
            self.path("server.pem"),
            self.path("server.key"),
            self.path("partner-site.pem"),
            self.path("partner-site.key"),
        )
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `https://localhost:{port}{path}`.
fn https(port: u16, path: &str) -> String {
    format!("https://localhost:{port}{path}")
}

fn partner_routes() -> String {
    format!(
        "{}  - name: partner\n    match: {{ methods: [GET], path: \"/partner/v1/{{*rest}}\" }}\n    upstream: bc\n    rewrite: \"/api/v2.0/companies({})/{{rest}}\"\n    policies: [partner-certs, partner-quota]\n    scopes: [erp.read]\n",
        common::default_routes(),
        company()
    )
}

fn partner_policies() -> String {
    format!(
        "{}  - name: partner-certs\n    kind: mtls\n    clients:\n      - {{ consumer: acme, tier: partner, scopes: [erp.read], san_dns: sync.acme.example }}\n      - {{ consumer: reader, tier: partner, subject_cn: no-scopes }}\n  - name: partner-quota\n    kind: rate_limit\n    tiers: {{ partner: {{ requests: 3, window_seconds: 60 }} }}\n",
        common::default_policies()
    )
}

/// A gateway with two TLS listeners (client certificates optional on the first, required on
/// the second) besides its plain one.
async fn tls_gateway(pki: &Pki, sandbox: &TestSandbox) -> (TestGateway, u16, u16) {
    let (optional, required) = (common::free_port(), common::free_port());
    let mut o = GatewayOptions::new(sandbox.url());
    o.routes_yaml = partner_routes();
    o.policies_yaml = partner_policies();
    o.listen_extra = format!(
        "  tls:\n{}{}",
        pki.listener(optional, Some("optional")),
        pki.listener(required, Some("required"))
    );
    let gw = TestGateway::start(o).await;
    wait_port(optional).await;
    wait_port(required).await;
    (gw, optional, required)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_over_tls_with_sni_and_no_old_protocol() {
    let pki = Pki::new();
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let (gw, port, _) = tls_gateway(&pki, &sandbox).await;
    let url = https(port, "/erp/v2/items?$top=1");

    let h1 = reqwest::Client::builder()
        .http1_only()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.server_ca.pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let resp = h1.get(&url).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_11));
    assert!(resp.headers().get("x-correlation-id").is_some());

    let h2 = client(&pki.server_ca, None);
    for _ in 0..3 {
        let resp = h2.get(&url).send().await.unwrap();
        assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_2));
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["value"].as_array().unwrap().len(), 1);
    }
    // HTTP/2 problems are problems too.
    assert_problem(h2.get(https(port, "/nope")).send().await.unwrap(), 404, "route-not-found").await;

    if common::require_tool("curl") {
        std::fs::write(pki.path("server-ca.pem"), &pki.server_ca.pem).unwrap();
        let (ca, target) = (pki.path("server-ca.pem"), url.clone());
        // Off the runtime: the sandbox answers on this test's runtime meanwhile.
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-s", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--cacert"])
                .arg(ca)
                .arg(target)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{}", gw.log());
    }

    // SNI picks the certificate; an unknown or absent name gets the first one.
    assert_eq!(served_fingerprint(port, "partner.example"), fingerprint(&pki.partner_site.cert));
    assert_eq!(served_fingerprint(port, "gateway.test"), fingerprint(&pki.server.cert));
    assert_eq!(served_fingerprint(port, "unknown.example"), fingerprint(&pki.server.cert));

    // TLS 1.0 and 1.1 are refused: a ClientHello that offers nothing newer gets an alert.
    for version in [[3u8, 1u8], [3, 2]] {
        let answer = common::tls::raw_handshake(port, &common::tls::legacy_client_hello(version, 2)).await;
        assert!(
            !common::tls::is_server_hello(&answer),
            "TLS {version:?} must be refused, got {:?}",
            &answer[..answer.len().min(16)]
        );
    }
    // The listener still serves.
    assert_eq!(h2.get(&url).send().await.unwrap().status(), 200);
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_certificate_serves_new_connections_while_no_request_fails() {
    let pki = Pki::new();
    let sandbox = TestSandbox::start(LimitsSpec {
        window_requests: 1_000_000,
        max_concurrent: 64,
        queue: 1000,
        ..LimitsSpec::default()
    })
    .await;
    let port = common::free_port();
    let mut o = GatewayOptions::new(sandbox.url());
    o.listen_extra = format!("  tls:\n{}", pki.listener(port, None));
    let gw = TestGateway::start(o).await;
    wait_port(port).await;
    assert_eq!(served_fingerprint(port, "localhost"), fingerprint(&pki.server.cert));

    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        // Half the clients open a new connection (a new handshake) for every request.
        let c = if i % 2 == 0 {
            reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(pki.server_ca.pem.as_bytes()).unwrap()])
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
        } else {
            client(&pki.server_ca, None)
        };
        let url = https(port, "/erp/v2/items?$top=1");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("status {}", r.status());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("error {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Renewed by SIGHUP.
    let renewed = pki.server_ca.issue(&Leaf::server(&["localhost", "gateway.test"]));
    renewed.write(pki.dir.path(), "server");
    gw.signal(libc::SIGHUP);
    wait_for_fingerprint(port, &fingerprint(&renewed.cert)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Renewed again by writing the files only (the directory is watched), as cert-manager does.
    let again = pki.server_ca.issue(&Leaf::server(&["localhost", "gateway.test"]));
    let staged = pki.dir.path().join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    again.write(&staged, "server");
    std::fs::rename(staged.join("server.key"), pki.dir.path().join("server.key")).unwrap();
    std::fs::rename(staged.join("server.pem"), pki.dir.path().join("server.pem")).unwrap();
    wait_for_fingerprint(port, &fingerprint(&again.cert)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} requests failed across the rotations ({ok} succeeded)");
    assert!(ok > 100, "too little load to show anything: {ok}");
    // A broken renewal (a key that is not the certificate's) is refused; the last good one stays.
    std::fs::write(pki.dir.path().join("server.key"), pki.partner_site.key.as_bytes()).unwrap();
    gw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served_fingerprint(port, "localhost"), fingerprint(&again.cert));
    assert!(gw.log().contains("does not belong to the certificate"), "{}", gw.log());
}

async fn wait_for_fingerprint(port: u16, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served =
            tokio::task::spawn_blocking(move || served_fingerprint(port, "localhost")).await.unwrap();
        if served == want {
            return;
        }
        assert!(Instant::now() < deadline, "still serving {served}, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_authenticate_with_client_certificates() {
    let pki = Pki::new();
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let (gw, optional, required) = tls_gateway(&pki, &sandbox).await;
    let acme = pki.client_ca.issue(&Leaf { dns: &["sync.acme.example"], ..Leaf::client("acme-erp-sync") });
    let reader = pki.client_ca.issue(&Leaf::client("no-scopes"));
    let unknown = pki.client_ca.issue(&Leaf { dns: &["evil.example"], ..Leaf::client("evil") });
    let foreign =
        pki.stranger_ca.issue(&Leaf { dns: &["sync.acme.example"], ..Leaf::client("acme-erp-sync") });
    let expired = pki.client_ca.issue(&Leaf {
        dns: &["sync.acme.example"],
        from_days: -30,
        to_days: -1,
        ..Leaf::client("acme-erp-sync")
    });
    let big_subject = "x".repeat(10_000);
    let huge = pki.client_ca.issue(&Leaf { dns: &["sync.acme.example"], ..Leaf::client(&big_subject) });
    let path = "/partner/v1/items?$top=1";

    // Optional: the handshake takes any certificate; the route's mtls policy decides.
    let refused = |c: Option<&Issued>, reason: &'static str| {
        let client = client(&pki.server_ca, c);
        let url = https(optional, path);
        async move {
            let body = assert_problem(client.get(&url).send().await.unwrap(), 401, "unauthenticated").await;
            assert_eq!(body["reason"], reason, "{body}");
        }
    };
    refused(None, "missing").await;
    refused(Some(&foreign), "certificate_untrusted").await;
    refused(Some(&expired), "certificate_expired").await;
    refused(Some(&unknown), "certificate_unknown").await;
    let resp = client(&pki.server_ca, Some(&reader)).get(https(optional, path)).send().await.unwrap();
    assert_problem(resp, 403, "insufficient-scope").await;

    // A registered certificate is its consumer, with that consumer's scopes and quota.
    let acme_client = client(&pki.server_ca, Some(&acme));
    let before = sandbox.stats().await["requests_total"].as_u64().unwrap();
    for _ in 0..3 {
        let resp = acme_client.get(https(optional, path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"partner\";q=3;w=60");
    }
    let resp = acme_client.get(https(optional, path)).send().await.unwrap();
    assert_problem(resp, 429, "quota-exceeded").await;
    assert_eq!(
        sandbox.stats().await["requests_total"].as_u64().unwrap() - before,
        3,
        "refusals never reach the ERP"
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // the log writer's batch
    assert!(gw.log().contains("\"consumer\":\"acme\""), "the access log names the consumer");

    // Required: no certificate, another CA's or an expired one never completes the handshake.
    for c in [None, Some(&foreign), Some(&expired)] {
        let err = client(&pki.server_ca, c).get(https(required, "/erp/v2/items?$top=1")).send().await;
        assert!(err.is_err(), "the handshake must fail");
    }
    let ok = client(&pki.server_ca, Some(&reader))
        .get(https(required, "/erp/v2/items?$top=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // A certificate with a 10 KB subject is read bounded: whether a listener refuses it in the
    // handshake or the policy maps it by its SAN, the gateway answers and keeps serving.
    for port in [optional, required] {
        match client(&pki.server_ca, Some(&huge)).get(https(port, path)).send().await {
            Ok(r) => assert!(matches!(r.status().as_u16(), 200 | 401 | 429), "{}", r.status()),
            Err(e) => assert!(e.is_connect() || e.is_request(), "{e:?}"),
        }
        let ok = client(&pki.server_ca, Some(&reader))
            .get(https(port, "/erp/v2/items?$top=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tls_keep_alive_connection_waits_past_the_header_deadline_like_a_plain_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let port = common::free_port();
    let mut o = GatewayOptions::new(sandbox.url());
    o.listen_extra = format!("  client_header_timeout_ms: 1000\n  tls:\n{}", pki.listener(port, None));
    let gw = TestGateway::start(o).await;
    wait_port(port).await;

    let mut tls = common::tls::connect(port, &pki.server_ca, "localhost").await;
    let request = b"GET /erp/v2/items?$top=1 HTTP/1.1\r\nHost: localhost\r\n\r\n";
    for round in 0..2 {
        tls.write_all(request).await.unwrap();
        let mut answer = vec![0u8; 64 * 1024];
        let n = tls.read(&mut answer).await.unwrap();
        let head = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        // Idle three times the header deadline: the deadline counts from the next request's first byte.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // A client that starts a request and stalls is still closed at the deadline.
    tls.write_all(b"GET /erp/v2/items HTTP/1.1\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a stalled header must be closed at the deadline");
    drop(gw);
}

/// Quote-to-order, a proxied and a mediated route, all to `erp_url` with `tls` as the
/// upstream's TLS settings.
fn tls_erp_options(erp_url: String, tls: &str) -> GatewayOptions {
    let mut o = common::process::sandbox_options(erp_url, common::process::FAST);
    o.upstream_extra = format!("{}    tls:\n{tls}", o.upstream_extra);
    o.routes_yaml.push_str(&format!(
        "  - name: items-proxied\n    match: {{ methods: [GET], path: /tls/items }}\n    upstream: bc\n    rewrite: \"/api/v2.0/companies({c})/items\"\n    policies: [crm-keys]\n    scopes: [orders.read]\n  - name: items-mediated\n    match: {{ methods: [GET], path: /tls/canonical-items }}\n    upstream: bc\n    rewrite: \"/api/v2.0/companies({c})/items\"\n    policies: [crm-keys, canonical-item-list-bc]\n    scopes: [orders.read]\n",
        c = company()
    ));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erp_behind_a_private_ca_requiring_a_client_certificate_is_reached_by_every_kind_of_route() {
    use common::process::{good_quote, submit, KEY};
    let dir = tempfile::tempdir().unwrap();
    let erp_ca = Ca::new("ERP private CA");
    let gateway_ca = Ca::new("CA the ERP trusts for its clients");
    let erp_cert = erp_ca.issue(&Leaf::server(&["erp.internal"]));
    let gateway_cert = gateway_ca.issue(&Leaf::client("causeway-gateway"));
    let (cert, key) = gateway_cert.write(dir.path(), "gateway");
    let ca_file = erp_ca.write(dir.path(), "erp-ca");
    let wrong_ca = Ca::new("Not the ERP's CA").write(dir.path(), "wrong-ca");
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let erp = common::tls::TlsErp::start(&erp_cert, &gateway_ca, format!("127.0.0.1:{}", sandbox.port).parse().unwrap()).await;
    let url = format!("https://127.0.0.1:{}", erp.port);
    let tls = |ca: &std::path::Path| {
        format!(
            "      ca_file: {}\n      client_cert: {}\n      client_key: {}\n      sni: erp.internal\n",
            ca.display(),
            cert.display(),
            key.display()
        )
    };
    let http = reqwest::Client::new();

    let gw = TestGateway::start(tls_erp_options(url.clone(), &tls(&ca_file))).await;
    let proxied = http.get(gw.url("/tls/items?$top=2")).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(proxied.status(), 200, "{}", gw.log());
    assert_eq!(proxied.json::<serde_json::Value>().await.unwrap()["value"].as_array().unwrap().len(), 2);
    let mediated = http.get(gw.url("/tls/canonical-items?$top=2")).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(mediated.status(), 200);
    let body: serde_json::Value = mediated.json().await.unwrap();
    assert_eq!(body["items"].as_array().map(Vec::len), Some(2), "the canonical shape: {body}");
    let resp = submit(&http, &gw, "tls-1", &serde_json::to_value(good_quote("OPP-TLS-1")).unwrap()).await;
    assert_eq!(resp.status(), 201, "quote-to-order reaches the ERP over TLS: {}", resp.text().await.unwrap());
    assert_eq!(sandbox.stats().await["orders_created"], 1);
    assert!(erp.handshakes_ok.load(Ordering::Relaxed) >= 1);
    drop(gw);

    // The wrong CA: nothing is sent, in clear or otherwise; callers are told why and what to fix.
    let requests_before = sandbox.stats().await["requests_total"].as_u64().unwrap();
    let gw = TestGateway::start(tls_erp_options(url.clone(), &tls(&wrong_ca))).await;
    for path in ["/tls/items?$top=2", "/tls/canonical-items?$top=2"] {
        let resp = http.get(gw.url(path)).header("x-api-key", KEY).send().await.unwrap();
        let body = assert_problem(resp, 502, "upstream-tls-failed").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("not issued by a CA the gateway trusts") && detail.contains("upstreams.bc.tls"), "{detail}");
    }
    // A quote is not lost: it is taken as pending, its history names the TLS failure.
    let resp = submit(&http, &gw, "tls-2", &serde_json::to_value(good_quote("OPP-TLS-2")).unwrap()).await;
    assert_eq!(resp.status(), 202);
    let order: serde_json::Value = resp.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_string();
    let view: serde_json::Value = http
        .get(gw.url(&format!("/process/v1/orders/{id}")))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(view.to_string().contains("not issued by a CA the gateway trusts"), "{view}");
    assert_eq!(erp.plaintext.load(Ordering::Relaxed), 0, "nothing was sent in clear");
    assert_eq!(sandbox.stats().await["requests_total"].as_u64().unwrap(), requests_before, "nothing reached the ERP");
    assert_eq!(sandbox.stats().await["orders_created"], 1);
}
