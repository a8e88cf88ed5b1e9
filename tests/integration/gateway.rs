//! The real gateway process in front of the real sandbox, on loopback.

use crate::common::config::Patch;

use crate::common::*;
use causeway::sandbox::{data::COMPANY_ID, LimitsSpec};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup() -> (TestSandbox, TestGateway) {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let gateway = TestGateway::start(GatewayOptions::new(sandbox.url())).await;
    (sandbox, gateway)
}

fn last_request(received: &[serde_json::Value]) -> &serde_json::Value {
    received.last().expect("the sandbox received a request")
}

#[tokio::test]
async fn routes_and_rewrites_paths_and_queries() {
    let (sandbox, gw) = setup().await;
    let resp = reqwest::get(gw.url("/erp/v2/customers?$top=2")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["value"].as_array().unwrap().len(), 2);
    let received = sandbox.received().await;
    assert_eq!(last_request(&received)["uri"], format!("/api/v2.0/companies({COMPANY_ID})/customers?$top=2"));

    // A parameter captured from the path lands inside the upstream segment.
    let item_id = "0000017e-0000-4000-8000-000000000001";
    let resp = reqwest::get(gw.url(&format!("/erp/v2/items/{item_id}"))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("x-served-by"), None, "item-by-id route has no policies");
    let item: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(item["id"], item_id);
    let received = sandbox.received().await;
    assert_eq!(last_request(&received)["uri"], format!("/api/v2.0/companies({COMPANY_ID})/items({item_id})"));

    // Host matching: only the partner host reaches the partner route.
    let client = reqwest::Client::new();
    let resp =
        client.get(gw.url("/partner/companies")).header("host", "partner.example").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client.get(gw.url("/partner/companies")).send().await.unwrap();
    assert_problem(resp, 404, "route-not-found").await;

    // Method matching: DELETE is on no route for this path: 405 with the methods that are.
    let resp = client.delete(gw.url("/erp/v2/salesOrders")).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "GET, PATCH, POST");
    assert_problem(resp, 405, "method-not-allowed").await;
}

#[tokio::test]
async fn strips_hop_by_hop_and_consumer_credentials_and_injects_the_upstream_credential() {
    let (sandbox, gw) = setup().await;
    let resp = reqwest::Client::new()
        .get(gw.url("/erp/v2/items?$top=1"))
        .header("authorization", "Bearer consumer-token-must-not-leak")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("cookie", "session=abc")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the sandbox accepted the injected credential");
    assert_eq!(resp.headers().get("x-served-by").unwrap(), "causeway", "response policy applied");
    let received = sandbox.received().await;
    let headers = &last_request(&received)["headers"];
    assert_eq!(headers["authorization"], format!("Bearer {UPSTREAM_TOKEN}"));
    for gone in ["proxy-authorization", "x-hop-secret", "keep-alive", "te", "cookie"] {
        assert!(headers.get(gone).is_none(), "{gone} reached the ERP: {headers}");
    }
    assert_eq!(headers["x-end-to-end"], "kept");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["host"], format!("127.0.0.1:{}", sandbox.port));
    assert_eq!(sandbox.stats().await["unauthorized"], 0);
}

#[tokio::test]
async fn correlation_id_and_traceparent_propagate_both_ways() {
    let (sandbox, gw) = setup().await;
    let client = reqwest::Client::new();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = client
        .get(gw.url("/erp/v2/items?$top=1"))
        .header("x-correlation-id", "crm-deal-0042")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers().get("x-correlation-id").unwrap(), "crm-deal-0042");
    let returned_tp = resp.headers().get("traceparent").unwrap().to_str().unwrap().to_string();
    assert!(returned_tp.starts_with(&format!("00-{trace}-")), "{returned_tp}");
    let received = sandbox.received().await;
    let headers = &last_request(&received)["headers"];
    assert_eq!(headers["x-correlation-id"], "crm-deal-0042");
    let upstream_tp = headers["traceparent"].as_str().unwrap();
    assert!(upstream_tp.starts_with(&format!("00-{trace}-")));
    assert!(!upstream_tp.contains("00f067aa0ba902b7"), "the gateway is a new span");

    // Nothing supplied: both are minted, and caller and ERP see the same values.
    let resp = client.get(gw.url("/erp/v2/items?$top=1")).send().await.unwrap();
    let minted = resp.headers().get("x-correlation-id").unwrap().to_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&minted).unwrap().get_version_num(), 7);
    let tp = resp.headers().get("traceparent").unwrap().to_str().unwrap().to_string();
    let received = sandbox.received().await;
    let headers = &last_request(&received)["headers"];
    assert_eq!(headers["x-correlation-id"], minted.as_str());
    assert_eq!(headers["traceparent"], tp.as_str());

    // Local answers carry them too, and the access log line names the id.
    let resp =
        client.get(gw.url("/nowhere")).header("x-correlation-id", "lost-request-7").send().await.unwrap();
    assert_eq!(resp.headers().get("x-correlation-id").unwrap(), "lost-request-7");
    assert!(resp.headers().get("traceparent").is_some());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gw.log();
    let line =
        log.lines().find(|l| l.contains("lost-request-7")).expect("access log line with the correlation id");
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["status"], 404);
    assert_eq!(entry["route"], "unmatched");
    assert!(entry["duration_ms"].is_number());
}

#[tokio::test]
async fn answers_404_413_502_504_as_problem_json() {
    let (sandbox, gw) = setup().await;
    let client = reqwest::Client::new();

    let resp = client.get(gw.url("/not/a/route")).send().await.unwrap();
    let body = assert_problem(resp, 404, "route-not-found").await;
    assert_eq!(body["instance"], "/not/a/route");

    // Declared length over the route's 1024-byte limit: refused before anything is sent.
    let before = sandbox.stats().await["requests_total"].as_u64().unwrap();
    let resp = client.post(gw.url("/erp/v2/salesOrders")).body(vec![b'x'; 2048]).send().await.unwrap();
    let body = assert_problem(resp, 413, "body-too-large").await;
    assert_eq!(body["max_body_bytes"], 1024);
    assert_eq!(sandbox.stats().await["requests_total"].as_u64().unwrap(), before, "nothing reached the ERP");

    // Chunked body that grows past the limit while streaming. The gateway may answer and close
    // before the client has finished writing, so read concurrently and ignore write errors.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut response)).await;
        response
    });
    let head = "POST /erp/v2/salesOrders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let _ = wr.write_all(head.as_bytes()).await;
    for _ in 0..3 {
        let mut chunk = format!("{:x}\r\n", 600).into_bytes();
        chunk.extend_from_slice(&[b' '; 600]);
        chunk.extend_from_slice(b"\r\n");
        if wr.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = wr.write_all(b"0\r\n\r\n").await;
    let response = reader.await.unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("application/problem+json") && text.contains("body-too-large"), "{text}");

    // Upstream slower than the route's 800 ms deadline.
    sandbox.set_limits(&LimitsSpec { latency_ms: 2000, ..LimitsSpec::default() }).await;
    let started = Instant::now();
    let resp = client.get(gw.url("/erp/v2/items")).send().await.unwrap();
    assert_problem(resp, 504, "upstream-timeout").await;
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "answered at the deadline, not after the upstream"
    );
    sandbox.set_limits(&LimitsSpec::default()).await;

    // Upstream gone: connection refused.
    sandbox.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = client.get(gw.url("/erp/v2/items")).send().await.unwrap();
    let body = assert_problem(resp, 502, "upstream-unreachable").await;
    assert!(body["detail"].as_str().unwrap().contains("`bc`"));
}

/// One exposition sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parse the text exposition into samples.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = value.parse().expect("numeric sample");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let labels = inner
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").expect("label pair");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        samples.push((name, labels, value));
    }
    samples
}

fn sample(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, labels, _)| {
            n == name && want.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.2)
}

#[tokio::test]
async fn exposes_bounded_prometheus_metrics() {
    let (_sandbox, gw) = setup().await;
    for _ in 0..3 {
        assert_eq!(reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap().status(), 200);
    }
    for i in 0..5 {
        // Distinct unmatched paths must not create distinct series.
        reqwest::get(gw.url(&format!("/random/{i}"))).await.unwrap();
    }
    let text = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    let samples = parse_exposition(&text);
    let ok = [("route", "erp-read"), ("method", "GET"), ("status_class", "2xx")];
    assert_eq!(sample(&samples, "causeway_requests_total", &ok), Some(3.0));
    assert_eq!(sample(&samples, "causeway_request_duration_seconds_count", &ok), Some(3.0));
    assert_eq!(sample(&samples, "causeway_upstream_duration_seconds_count", &ok), Some(3.0));
    let inf = [("route", "erp-read"), ("method", "GET"), ("status_class", "2xx"), ("le", "+Inf")];
    assert_eq!(sample(&samples, "causeway_request_duration_seconds_bucket", &inf), Some(3.0));
    let unmatched = [("route", "unmatched"), ("status_class", "4xx")];
    assert_eq!(sample(&samples, "causeway_requests_total", &unmatched), Some(5.0));
    assert_eq!(sample(&samples, "causeway_upstream_up", &[("upstream", "bc")]), Some(1.0));
    for (name, labels, _) in &samples {
        for (k, v) in labels {
            assert!(!v.contains('/'), "raw path in label {k}={v} of {name}");
        }
    }
}

#[tokio::test]
async fn readiness_reports_upstream_reachability_without_leaving_rotation() {
    let (sandbox, gw) = setup().await;
    assert_eq!(reqwest::get(gw.admin("/healthz")).await.unwrap().status(), 200);
    gw.wait_ready(200, Duration::from_secs(5)).await;
    wait_for_upstream(&gw, "reachable").await;
    let port = sandbox.port;
    sandbox.stop();
    wait_for_upstream(&gw, "unreachable").await;
    assert_eq!(reqwest::get(gw.admin("/healthz")).await.unwrap().status(), 200, "liveness is unaffected");
    let _back = TestSandbox::start_on(port, LimitsSpec::default()).await;
    wait_for_upstream(&gw, "reachable").await;
}

/// Wait until readiness reports the `bc` upstream as `want`, asserting on every probe that the
/// replica stays ready: an unreachable ERP is reported, never a reason to leave the load balancer.
async fn wait_for_upstream(gw: &TestGateway, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = reqwest::get(gw.admin("/readyz")).await.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        let state = body["upstreams"]["bc"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 200, "readiness stays 200 whatever the ERP does: {body}");
        if state == want {
            return;
        }
        assert!(Instant::now() < deadline, "bc stayed {state}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Read one HTTP/1.1 response (Content-Length framed) from `stream`; bytes read past it stay in
/// `pending` for the next call, as pipelined responses arrive back to back.
async fn read_response(
    stream: &mut tokio::net::TcpStream,
    pending: &mut Vec<u8>,
    what: &str,
) -> (u16, String, Vec<u8>) {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a content-length framed response");
            if pending.len() >= end + 4 + length {
                let body = pending[end + 4..end + 4 + length].to_vec();
                pending.drain(..end + 4 + length);
                let status = head[9..12].parse().unwrap();
                return (status, head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{what}: no response within 5 s"))
            .unwrap();
        assert!(
            n > 0,
            "{what}: connection closed before a whole response; got {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start_matches(':').trim()).unwrap_or("")
}

/// An idle keep-alive connection holds no HTTP session or buffers (vendor/README.md); what
/// the client sends next, however it arrives, must be served as before.
#[tokio::test]
async fn keep_alive_connection_serves_requests_after_idling_and_closes_on_pipelining() {
    let (sandbox, gw) = setup().await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).await.unwrap();
    let mut pending = Vec::new();
    let get =
        |id: &str| format!("GET /erp/v2/items?$top=1 HTTP/1.1\r\nHost: gw\r\nX-Correlation-ID: {id}\r\n\r\n");

    conn.write_all(get("first").as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut conn, &mut pending, "first").await;
    assert_eq!((status, header(&head, "x-correlation-id")), (200, "first"));

    // Idle past the 100 ms after which the gateway drops the connection's buffers (vendor/README.md),
    // then a header in two pieces.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let split = get("split");
    let (a, b) = split.split_at(20);
    conn.write_all(a.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(b.as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut conn, &mut pending, "split").await;
    assert_eq!((status, header(&head, "x-correlation-id")), (200, "split"));

    // A body after idling arrives whole at the ERP.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = format!("{{\"note\":\"{}\"}}", "x".repeat(900));
    let post = format!(
        "POST /erp/v2/salesOrders HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Correlation-ID: body\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(post.as_bytes()).await.unwrap();
    let (_, head, _) = read_response(&mut conn, &mut pending, "body").await;
    assert_eq!(header(&head, "x-correlation-id"), "body");
    let received = sandbox.received().await;
    assert_eq!(last_request(&received)["body"], body.as_str());

    // Two requests in one write: pipelining is pingora's opt-in and left off, so the first is
    // answered whole and the connection then closes (RFC 9112 §9.3.2: the client retries the
    // second on a new connection); nothing hangs and nothing else is sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(format!("{}{}", get("pipelined-1"), get("pipelined-2")).as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut conn, &mut pending, "pipelined-1").await;
    assert_eq!((status, header(&head, "x-correlation-id")), (200, "pipelined-1"));
    let mut rest = [0u8; 256];
    let after =
        tokio::time::timeout(Duration::from_secs(5), conn.read(&mut rest)).await.expect("closed, not hung");
    assert!(matches!(after, Ok(0) | Err(_)), "only a close follows: {after:?} {:?}", &rest[..]);
    assert!(pending.is_empty(), "nothing after the answer: {:?}", String::from_utf8_lossy(&pending));
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_closes_idle_ones_and_refuses_new_connections() {
    let sandbox = TestSandbox::start(LimitsSpec { latency_ms: 1500, ..LimitsSpec::default() }).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.routes_yaml = opts.routes_yaml.patched("total_ms: 800", "total_ms: 10000");
    opts.grace_seconds = 5;
    let mut gw = TestGateway::start(opts).await;
    // A keep-alive connection that served one request and idles.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).await.unwrap();
    idle.write_all(b"GET /nope HTTP/1.1\r\nHost: gw\r\n\r\n").await.unwrap();
    let (status, _, _) = read_response(&mut idle, &mut Vec::new(), "before idling").await;
    assert_eq!(status, 404);
    let slow_url = gw.url("/erp/v2/items?$top=1");
    let slow = tokio::spawn(async move { reqwest::get(slow_url).await.map(|r| r.status().as_u16()) });
    // Wait until the request is at the sandbox.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sandbox.stats().await["in_flight"] != 1 {
        assert!(Instant::now() < deadline, "slow request never reached the sandbox");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    gw.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", gw.proxy_port)).await;
    assert!(refused.is_err(), "new connections must be refused while draining");
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle keep-alive connection is closed at once while draining: {closed:?}"
    );
    assert_eq!(slow.await.unwrap().expect("in-flight request completes"), 200);
    // Exits once drained, well before the 5 s grace period.
    let exit = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(5), "did not exit within the grace period");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(gw.log().contains("drained; exiting"));
}

/// The shipped configuration, unchanged, with the sandbox switched off and `upstreams.bc.url`
/// pointed at an ERP elsewhere (a sandbox outside the gateway's process, standing in for a
/// tenant) from the environment, serves its routes against that ERP with the credential from
/// the environment, and starts no sandbox.
#[tokio::test]
async fn the_shipped_configuration_without_its_sandbox_runs_against_an_external_erp() {
    let erp = TestSandbox::start(LimitsSpec::default()).await;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    for sub in ["routes", "policies"] {
        copy_dir(&repo.join(sub), &dir.path().join(sub));
    }
    let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
    std::fs::copy(repo.join("causeway.yaml"), dir.path().join("causeway.yaml")).unwrap();
    let data = dir.path().join("data");
    let env = [
        ("CAUSEWAY_SANDBOX", "false".to_string()),
        ("CAUSEWAY_BC_URL", erp.url()),
        ("CAUSEWAY_BC_TOKEN", UPSTREAM_TOKEN.to_string()),
        ("CAUSEWAY_PROXY_LISTEN", format!("127.0.0.1:{proxy}")),
        ("CAUSEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
        ("CAUSEWAY_METRICS_LISTEN", format!("127.0.0.1:{metrics}")),
        ("CAUSEWAY_DATA_DIR", data.display().to_string()),
    ];
    std::fs::create_dir_all(&data).unwrap();

    let check = std::process::Command::new(binary())
        .args(["check", "-c"])
        .arg(dir.path())
        .envs(env.clone())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let mut child = std::process::Command::new(binary())
        .args(["serve", "-c"])
        .arg(dir.path())
        .envs(env)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let resp = loop {
        let r = client
            .get(format!("http://127.0.0.1:{proxy}/erp/v2/customers?$top=1"))
            .header("x-api-key", "demo-erp-read-key")
            .send()
            .await;
        match r {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("the gateway never answered: {e}"),
        }
    };
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{body}\n{log}");
    assert_eq!(body["value"].as_array().map(Vec::len), Some(1), "{body}");
    let seen = last_request(&erp.received().await).clone();
    assert_eq!(seen["headers"]["authorization"], format!("Bearer {UPSTREAM_TOKEN}"), "{seen}");
    assert!(
        log.contains("causeway: proxy on") && !log.contains("ERP sandbox"),
        "no sandbox was started: {log}"
    );
    assert!(data.join("causeway.db").exists(), "the order store is in CAUSEWAY_DATA_DIR");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}
