//! Where a gateway lives: TLS listeners (HTTP/1.1 and HTTP/2, SNI, certificates rotated under
//! load, no old protocols), client certificates and the `mtls` policy, the client's address
//! behind trusted proxies and the PROXY protocol, CORS and IP filters. Certificates are made per
//! run (rcgen); the gateway is the real binary on loopback in front of the real sandbox.

use crate::common;

use crate::common::tls::{client, fingerprint, served_fingerprint, Ca, Issued, Leaf};
use crate::common::{assert_problem, GatewayOptions, TestGateway, TestSandbox};
use causeway::sandbox::LimitsSpec;
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
        // What an OCSP responder would have said about the partner site's certificate: the
        // gateway staples the file's bytes as they are (checking them is the client's job).
        std::fs::write(dir.path().join("partner-site.ocsp"), OCSP_RESPONSE).unwrap();
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
            "    - address: 127.0.0.1:{port}\n      certificates:\n        - {{ cert: {}, key: {} }}\n        - {{ cert: {}, key: {}, ocsp: {} }}\n{client}",
            self.path("server.pem"),
            self.path("server.key"),
            self.path("partner-site.pem"),
            self.path("partner-site.key"),
            self.path("partner-site.ocsp"),
        )
    }
}

/// Stands in for a DER OCSP response (an `OCSPResponse` SEQUENCE, status successful).
const OCSP_RESPONSE: &[u8] = b"\x30\x03\x0a\x01\x00";

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

    // OCSP stapling: the partner site's certificate comes with its response, over TLS 1.3 (in
    // the certificate entry) and TLS 1.2 (the CertificateStatus message); the other without.
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let stapled = common::tls::stapled_ocsp(port, &pki.server_ca, "partner.example", version).await;
        assert_eq!(stapled, OCSP_RESPONSE, "{version:?}");
        assert!(common::tls::stapled_ocsp(port, &pki.server_ca, "gateway.test", version).await.is_empty());
    }

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_speaks_h2c_with_prior_knowledge_only_when_asked() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let h1 = reqwest::Client::builder().http1_only().build().unwrap();

    let mut o = GatewayOptions::new(sandbox.url());
    o.listen_extra = "  h2c: true\n".into();
    let gw = TestGateway::start(o).await;
    let url = gw.url("/erp/v2/items?$top=1");
    let resp = h2.get(&url).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_2));
    assert_problem(h2.get(gw.url("/nope")).send().await.unwrap(), 404, "route-not-found").await;
    // HTTP/1.1 callers keep working on the same listener.
    let resp = h1.get(&url).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_11));
    drop(gw);

    // Off by default: an HTTP/2 preface on the plain listener is not HTTP/2.
    let gw = TestGateway::start(GatewayOptions::new(sandbox.url())).await;
    assert!(h2.get(gw.url("/erp/v2/items?$top=1")).send().await.is_err());
    assert_eq!(h1.get(gw.url("/erp/v2/items?$top=1")).send().await.unwrap().status(), 200);
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
    let erp = common::tls::TlsErp::start(
        &erp_cert,
        &gateway_ca,
        format!("127.0.0.1:{}", sandbox.port).parse().unwrap(),
    )
    .await;
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
    let mediated =
        http.get(gw.url("/tls/canonical-items?$top=2")).header("x-api-key", KEY).send().await.unwrap();
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
        assert!(
            detail.contains("not issued by a CA the gateway trusts") && detail.contains("upstreams.bc.tls"),
            "{detail}"
        );
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
    assert_eq!(
        sandbox.stats().await["requests_total"].as_u64().unwrap(),
        requests_before,
        "nothing reached the ERP"
    );
    assert_eq!(sandbox.stats().await["orders_created"], 1);
}

const GOOD_KEY: &str = "good-key";

/// Routes behind an API key, CORS and an IP filter; the gateway trusts 127.0.0.1 as its load
/// balancer and refuses an address after three failed authentications.
fn client_address_options(sandbox: &TestSandbox) -> GatewayOptions {
    let mut o = GatewayOptions::new(sandbox.url());
    o.listen_extra = "  trusted_proxies: [127.0.0.1/32]\n".into();
    o.main_extra = "auth_failures: { max_failures: 3, window_seconds: 60 }\n".into();
    let rewrite = format!("\"/api/v2.0/companies({})/items\"", company());
    o.routes_yaml = format!(
        "routes:\n  - name: keyed\n    match: {{ methods: [GET], path: /keyed/items }}\n    upstream: bc\n    rewrite: {rewrite}\n    policies: [keys]\n  - name: browser\n    match: {{ methods: [GET, POST], path: /cors/items }}\n    upstream: bc\n    rewrite: {rewrite}\n    policies: [cpq, keys]\n    scopes: [erp.write]\n  - name: partners\n    match: {{ methods: [GET], path: /filtered/items }}\n    upstream: bc\n    rewrite: {rewrite}\n    public: true\n    policies: [partner-networks]\n"
    );
    o.policies_yaml = "policies:\n  - name: keys\n    kind: api_key\n    keys:\n      - { consumer: bi, scopes: [erp.write], sha256: b8ce88d57f4916859bcecb01b98b041299a759313987af89f9fc6608d7440537 }\n  - name: cpq\n    kind: cors\n    allow_origins: [https://crm.example.com]\n    allow_methods: [GET, POST]\n    allow_headers: [x-api-key, idempotency-key]\n    allow_credentials: true\n    max_age_seconds: 600\n  - name: partner-networks\n    kind: ip_filter\n    allow: [198.51.100.0/24]\n    deny: [198.51.100.66]\n".into();
    o
}

fn from(source: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(source.parse::<std::net::IpAddr>().unwrap()).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_forwarded_client_is_limited_on_its_own_and_forgeries_change_nothing() {
    let sandbox =
        TestSandbox::start(LimitsSpec { window_requests: 1_000_000, ..LimitsSpec::default() }).await;
    let gw = TestGateway::start(client_address_options(&sandbox)).await;
    let (proxy, untrusted) = (Arc::new(from("127.0.0.1")), from("127.0.0.2"));
    let url = gw.url("/keyed/items?$top=1");
    let send = |c: &reqwest::Client, xff: &str, key: &str| {
        c.get(&url).header("x-forwarded-for", xff.to_string()).header("x-api-key", key.to_string()).send()
    };

    // 200 clients behind the load balancer, each failing three times: each is locked out alone.
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let (proxy, url) = (proxy.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client_ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256 + 1);
            let mut statuses = Vec::new();
            for _ in 0..4 {
                let r = proxy
                    .get(&url)
                    .header("x-forwarded-for", &client_ip)
                    .header("x-api-key", "wrong")
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), vec![401, 401, 401, 429]);
    }
    // The balancer itself, and a client it forwards for the first time, are not locked.
    assert_eq!(send(&proxy, "192.0.2.10", GOOD_KEY).await.unwrap().status(), 200);
    assert_eq!(
        send(&proxy, "10.0.0.1", GOOD_KEY).await.unwrap().status(),
        429,
        "a locked client stays locked"
    );

    // An untrusted caller forging X-Forwarded-For: its own address is what fails, and is locked.
    for _ in 0..3 {
        assert_eq!(send(&untrusted, "198.51.100.77", "wrong").await.unwrap().status(), 401);
    }
    let locked = send(&untrusted, "198.51.100.78", GOOD_KEY).await.unwrap();
    assert_problem(locked, 429, "too-many-authentication-failures").await;
    assert_eq!(
        send(&proxy, "198.51.100.77", GOOD_KEY).await.unwrap().status(),
        200,
        "the forged address was never blamed"
    );

    // What the ERP is told: the hops the gateway believed, the forged entry dropped.
    let r = proxy
        .get(&url)
        .header("x-forwarded-for", "6.6.6.6, 198.51.100.20")
        .header("forwarded", "for=6.6.6.7")
        .header("x-real-ip", "6.6.6.8")
        .header("x-api-key", GOOD_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let received = sandbox.received().await;
    let headers = &received.last().unwrap()["headers"];
    assert_eq!(headers["x-forwarded-for"], "198.51.100.20, 127.0.0.1");
    assert_eq!(headers["forwarded"], "for=198.51.100.20, for=127.0.0.1;proto=http");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(headers.get("x-real-ip").is_none(), "{headers}");
    let r = untrusted
        .get(&url)
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-api-key", GOOD_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.log().contains("\"client\":\"198.51.100.20\""), "the access log names the client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_without_the_erp_and_ip_filters_refuse_with_a_problem() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let gw = TestGateway::start(client_address_options(&sandbox)).await;
    let http = reqwest::Client::new();
    let requests = || async { sandbox.stats().await["requests_total"].as_u64().unwrap() };
    let before = requests().await;
    let preflight = |origin: &str| {
        http.request(reqwest::Method::OPTIONS, gw.url("/cors/items"))
            .header("origin", origin.to_string())
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type, x-api-key")
            .send()
    };
    let ok = preflight("https://crm.example.com").await.unwrap();
    assert_eq!(ok.status(), 204);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "https://crm.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(h["access-control-allow-headers"], "x-api-key, idempotency-key");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert!(h.get("x-correlation-id").is_some());
    let refused = preflight("https://evil.example").await.unwrap();
    let body = assert_problem(refused, 403, "cors-refused").await;
    assert!(body["detail"].as_str().unwrap().contains("https://evil.example"));
    assert_eq!(body["title"], "Not allowed from this browser origin");
    assert_eq!(requests().await, before, "preflights never reach the ERP");

    // Actual requests: an allowed origin's answers carry the headers (problems too); another
    // origin is refused before the ERP.
    let ok = http
        .get(gw.url("/cors/items?$top=1"))
        .header("origin", "https://crm.example.com")
        .header("x-api-key", GOOD_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://crm.example.com");
    assert!(ok.headers()["vary"].to_str().unwrap().contains("Origin"));
    let unauthenticated =
        http.get(gw.url("/cors/items")).header("origin", "https://crm.example.com").send().await.unwrap();
    assert_eq!(unauthenticated.headers()["access-control-allow-origin"], "https://crm.example.com");
    assert_problem(unauthenticated, 401, "unauthenticated").await;
    let foreign = http
        .get(gw.url("/cors/items"))
        .header("origin", "https://evil.example")
        .header("x-api-key", GOOD_KEY)
        .send()
        .await
        .unwrap();
    assert!(foreign.headers().get("access-control-allow-origin").is_none());
    assert_problem(foreign, 403, "cors-refused").await;
    assert_eq!(requests().await, before + 1);

    // IP filter on the address resolved behind the trusted proxy.
    let filtered = |xff: Option<&str>| {
        let mut r = http.get(gw.url("/filtered/items?$top=1"));
        if let Some(x) = xff {
            r = r.header("x-forwarded-for", x.to_string());
        }
        r.send()
    };
    assert_eq!(filtered(Some("198.51.100.7")).await.unwrap().status(), 200);
    let body = assert_problem(filtered(Some("198.51.100.66")).await.unwrap(), 403, "ip-not-allowed").await;
    assert!(body["detail"].as_str().unwrap().contains("198.51.100.66"));
    assert_problem(filtered(Some("203.0.113.1")).await.unwrap(), 403, "ip-not-allowed").await;
    assert_problem(filtered(None).await.unwrap(), 403, "ip-not-allowed").await;
    assert_eq!(requests().await, before + 2, "refused addresses never reach the ERP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_gives_the_client_address_only_from_a_trusted_balancer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let tls_port = common::free_port();
    let mut o = GatewayOptions::new(sandbox.url());
    o.listen_extra = format!(
        "  proxy_protocol: true\n  trusted_proxies: [127.0.0.1]\n  client_header_timeout_ms: 1000\n  tls:\n{}      proxy_protocol: true\n",
        pki.listener(tls_port, None)
    );
    let gw = TestGateway::start(o).await;
    wait_port(tls_port).await;
    let request = b"GET /erp/v2/items?$top=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let exchange = |source: &'static str, preface: Vec<u8>| {
        let port = gw.proxy_port;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            let mut s = socket.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
            let _ = s.write_all(&preface).await;
            let _ = s.write_all(request).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).to_string()
        }
    };
    let last_forwarded = || async {
        let received = sandbox.received().await;
        received.last().unwrap()["headers"]["x-forwarded-for"].as_str().unwrap().to_string()
    };
    let v1 = exchange("127.0.0.1", b"PROXY TCP4 198.51.100.9 10.0.0.1 51000 8080\r\n".to_vec()).await;
    assert!(v1.starts_with("HTTP/1.1 200"), "{v1}");
    assert_eq!(last_forwarded().await, "198.51.100.9");
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend("2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend("2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend([0xc7, 0x38, 0x1f, 0x90]);
    let answer = exchange("127.0.0.1", v2).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(last_forwarded().await, "2001:db8::9");
    // Without the header, with garbage, or from a peer that is not the balancer: closed unanswered.
    let count = sandbox.stats().await["requests_total"].as_u64().unwrap();
    assert_eq!(exchange("127.0.0.1", Vec::new()).await, "");
    assert_eq!(exchange("127.0.0.1", b"PROXY TCP4 not-an-address\r\n".to_vec()).await, "");
    assert_eq!(exchange("127.0.0.2", b"PROXY TCP4 198.51.100.9 10.0.0.1 51000 8080\r\n".to_vec()).await, "");
    assert_eq!(sandbox.stats().await["requests_total"].as_u64().unwrap(), count);

    // Before a TLS handshake too.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.44 10.0.0.1 51000 443\r\n").await.unwrap();
    let mut tls = common::tls::handshake(tcp, &pki.server_ca, "localhost").await;
    tls.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert_eq!(last_forwarded().await, "198.51.100.44");
    assert_eq!(served_fingerprint_after_proxy_header(tls_port), "", "a bare TLS hello is refused");
}

/// A TLS client that sends no PROXY header to a listener that expects one gets nothing.
fn served_fingerprint_after_proxy_header(port: u16) -> String {
    served_fingerprint(port, "localhost")
}

async fn readyz(gw: &TestGateway) -> (u16, serde_json::Value) {
    let r = reqwest::get(gw.admin("/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_order_store_is_unreachable_is_unready_within_five_seconds() {
    use common::process::{sandbox_options, FAST};
    let Some(pg) = common::postgres::OwnPostgres::start() else {
        common::missing_service(
            "PostgreSQL's initdb and pg_ctl",
            "this test runs its own server: install PostgreSQL 15+ (Debian package postgresql)",
        );
        return;
    };
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut o = sandbox_options(sandbox.url(), FAST);
    o.main_extra = format!(
        "store: {{ backend: postgres, url: \"{}\", acquire_timeout_ms: 500 }}\n{}",
        pg.url(),
        o.main_extra
    );
    let gw = TestGateway::start(o).await;
    gw.wait_ready(200, Duration::from_secs(15)).await;
    let (_, body) = readyz(&gw).await;
    assert_eq!(body["store"], "reachable", "{body}");
    assert!(pg.ctl("stop"));
    let stopped = Instant::now();
    gw.wait_ready(503, Duration::from_secs(5)).await;
    let r = reqwest::get(gw.admin("/readyz")).await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["type"], "https://causeway.dev/problems/not-ready");
    assert!(body["checks"]["store"].as_str().unwrap().starts_with("unreachable"), "{body}");
    eprintln!("unready {:?} after the store stopped", stopped.elapsed());
    assert!(pg.ctl("start"));
    gw.wait_ready(200, Duration::from_secs(10)).await;
}

/// Read what a hostile handshake gets back until the gateway closes the connection; `None` if
/// it is still open after five seconds (a hang).
async fn answer_then_close(port: u16, bytes: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return Some(answer),
            Ok(Ok(n)) => answer.extend(&chunk[..n]),
            Err(_) => return None,
        }
    }
}

/// One HTTP/2 frame: 24-bit length, type, flags, stream id.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// What the gateway said on an HTTP/2 connection flooded with streams reset as soon as they
/// are opened (CVE-2023-44487): the GOAWAY's error code, if one came, and whether it closed.
struct FloodOutcome {
    streams_sent: u32,
    goaway: Option<u32>,
    closed: bool,
}

async fn rapid_reset_flood(port: u16, ca: &Ca, streams: u32) -> FloodOutcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = common::tls::connect_alpn(port, ca, "localhost", b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    writer.write_all(&hello).await.unwrap();
    // The gateway's frames: SETTINGS are acknowledged, a GOAWAY is noted; until it closes.
    let (settings_tx, settings_rx) = tokio::sync::oneshot::channel();
    let read = tokio::spawn(async move {
        let mut settings_tx = Some(settings_tx);
        let mut goaway = None;
        let mut head = [0u8; 9];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = tokio::time::timeout_at(deadline.into(), reader.read_exact(&mut head)).await;
            let Ok(Ok(_)) = got else { return (goaway, matches!(got, Ok(Err(_)))) };
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).await.is_err() {
                return (goaway, true);
            }
            match head[3] {
                4 if head[4] & 1 == 0 => {
                    if let Some(tx) = settings_tx.take() {
                        let _ = tx.send(());
                    }
                }
                7 => goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
                _ => {}
            }
        }
    });
    settings_rx.await.expect("the gateway's SETTINGS");
    writer.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap();
    // GET /erp/v2/items?$top=1: indexed :method GET and :scheme https, literal :authority and
    // :path without indexing (nothing grows the gateway's HPACK table).
    let path = b"/erp/v2/items?$top=1";
    let mut block = vec![0x82, 0x87, 0x01, 9];
    block.extend(b"localhost");
    block.extend([0x04, path.len() as u8]);
    block.extend(path);
    let mut streams_sent = 0;
    'flood: for batch in 0..streams / 100 {
        let mut bytes = Vec::with_capacity(100 * 60);
        for i in 0..100 {
            let id = 2 * (batch * 100 + i) + 1;
            bytes.extend(h2_frame(1, 0x4 | 0x1, id, &block));
            bytes.extend(h2_frame(3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
        }
        if writer.write_all(&bytes).await.is_err() {
            break 'flood;
        }
        streams_sent += 100;
    }
    let _ = writer.shutdown().await;
    let (goaway, closed) = read.await.unwrap();
    FloodOutcome { streams_sent, goaway, closed }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_reset_floods_and_huge_headers_are_bounded_and_the_gateway_keeps_serving() {
    let pki = Pki::new();
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let (gw, port, _) = tls_gateway(&pki, &sandbox).await;
    let pid = gw.child.id();
    let url = https(port, "/erp/v2/items?$top=1");
    let h2 = client(&pki.server_ca, None);
    for _ in 0..50 {
        assert_eq!(h2.get(&url).send().await.unwrap().status(), 200);
    }
    let idle_rss = common::rss_kb(pid);
    let mut peak_rss = idle_rss;

    // A ClientHello offering 10,000 cipher suites (two records): answered with an alert or a
    // ServerHello and the connection ended, never a hang; fifty of them at once.
    let suites: Vec<u16> = (0..10_000u16).map(|i| 0x1300 + (i % 5) + (i / 5) * 0x100).collect();
    let hello = common::tls::client_hello([3, 3], &suites);
    assert!(hello.len() > 20_000);
    let answers = futures_util::future::join_all((0..50).map(|_| answer_then_close(port, &hello))).await;
    for answer in &answers {
        let answer = answer.as_ref().expect("a 10,000-cipher hello is answered and its connection closed");
        assert!(
            answer.is_empty() || answer[0] == 0x15 || answer[0] == 0x16,
            "{:?}",
            &answer[..8.min(answer.len())]
        );
    }
    peak_rss = peak_rss.max(common::rss_kb(pid));

    // Garbage: random bytes, a record claiming 64 KiB, a handshake message claiming 16 MiB.
    let random: Vec<u8> = (0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let oversized_record = [0x16, 3, 3, 0xff, 0xff, 1, 0, 0, 0];
    let oversized_message = [0x16, 3, 3, 0, 4, 1, 0xff, 0xff, 0xff];
    for garbage in [&random[..], &oversized_record[..], &oversized_message[..]] {
        let answer = answer_then_close(port, garbage).await;
        let answer = answer.expect("a garbage handshake is closed within five seconds");
        assert!(!common::tls::is_server_hello(&answer), "garbage is never answered with a ServerHello");
    }

    // HTTP/2 rapid reset: 10,000 streams each cancelled as soon as it is opened. h2's defences
    // end the connection with GOAWAY ENHANCE_YOUR_CALM (11) long before the flood is served,
    // and only a bounded number of the streams become ERP requests.
    let erp_before = sandbox.stats().await["requests_total"].as_u64().unwrap();
    let flood = rapid_reset_flood(port, &pki.server_ca, 10_000).await;
    let erp_requests = sandbox.stats().await["requests_total"].as_u64().unwrap() - erp_before;
    eprintln!(
        "rapid reset: {} streams written, GOAWAY {:?}, closed {}, {erp_requests} ERP requests",
        flood.streams_sent, flood.goaway, flood.closed
    );
    assert!(flood.closed, "the gateway ends a rapid-reset connection");
    assert_eq!(flood.goaway, Some(11), "GOAWAY ENHANCE_YOUR_CALM");
    assert!(erp_requests < 500, "{erp_requests} of the flood's streams reached the ERP");
    peak_rss = peak_rss.max(common::rss_kb(pid));

    // A 1 MB Forwarded header: refused over HTTP/1.1 (a 400 problem, or the connection closed
    // while it is still arriving) and over HTTP/2 (431 or the stream refused), never parsed.
    let forwarded = "for=192.0.2.1;proto=https, ".repeat(40_000);
    assert!(forwarded.len() > 1_000_000);
    let request = format!("GET /erp/v2/items?$top=1 HTTP/1.1\r\nHost: gw\r\nForwarded: {forwarded}\r\n\r\n");
    let answer =
        answer_then_close(gw.proxy_port, request.as_bytes()).await.expect("closed, not left hanging");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.is_empty() || answer.contains("problems/bad-request"), "{answer}");
    match h2.get(&url).header("forwarded", &forwarded).send().await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => eprintln!("HTTP/2 stream with a 1 MB header refused: {e}"),
    }
    let h1 = reqwest::Client::new();
    peak_rss = peak_rss.max(common::rss_kb(pid));

    // Still serving, on every listener; memory back near idle.
    for _ in 0..25 {
        assert_eq!(h2.get(&url).send().await.unwrap().status(), 200);
        assert_eq!(h1.get(gw.url("/erp/v2/items?$top=1")).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_rss = common::rss_kb(pid);
    eprintln!("RSS idle {idle_rss} KB, peak {peak_rss} KB, after {after_rss} KB");
    assert!(
        after_rss <= idle_rss + 16 * 1024,
        "RSS returns near idle: idle {idle_rss} KB, after {after_rss} KB (peak {peak_rss} KB)"
    );
}
