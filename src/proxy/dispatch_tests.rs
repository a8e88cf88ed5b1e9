//! The hook dispatch without a network: a compiled configuration, a pingora session over an
//! in-memory stream, and `request_filter`'s decision (proxy it, or answer it here) with the
//! answer the client reads.

use super::*;
use pingora::proxy::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAIN: &str = "listen: { proxy: 127.0.0.1:18080, admin: 127.0.0.1:18081, metrics: 127.0.0.1:18082 }
upstreams:
  bc:
    url: http://127.0.0.1:9
    credentials: { bearer: { token: erp-secret } }
";

const ROUTES: &str = r#"routes:
  - name: keyed
    match: { methods: [GET], path: "/erp/items/{id}" }
    upstream: bc
    rewrite: "/api/items({id})"
    policies: [keys]
    scopes: [erp.read]
  - name: open
    match: { methods: [GET], path: "/open/{*rest}" }
    public: true
    upstream: bc
    rewrite: "/api/{rest}"
"#;

// The key `demo-erp-read-key`, as its SHA-256.
const POLICIES: &str = "policies:
  - name: keys
    kind: api_key
    header: x-api-key
    keys:
      - { consumer: bi, sha256: d7758b5b3f5e70d0be776ffa6ef9a4b780b7dfecdfaf5b53e6cd34f5c284c414, scopes: [erp.read] }
";

fn gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("causeway.yaml"), MAIN).unwrap();
    for (sub, file, text) in [("routes", "routes.yaml", ROUTES), ("policies", "policies.yaml", POLICIES)] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        std::fs::write(dir.path().join(sub).join(file), text).unwrap();
    }
    let config = crate::config::load(dir.path()).unwrap_or_else(|d| panic!("{d}"));
    Gateway::new(
        Arc::new(ArcSwap::from_pointee(config)),
        Metrics::global().clone(),
        Arc::new(InFlight::default()),
        None,
    )
}

/// Whether the request was handed to pingora to proxy, what the client read, and the context.
async fn filter(gw: &Gateway, request: &str) -> (bool, String, Ctx) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    client.write_all(request.as_bytes()).await.unwrap();
    let mut session = Session::new_h1(Box::new(server));
    assert!(session.read_request().await.unwrap(), "a request was read");
    let mut ctx = gw.new_ctx();
    let proxied = !gw.request_filter(&mut session, &mut ctx).await.unwrap();
    drop(session);
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    (proxied, String::from_utf8_lossy(&answer).into_owned(), ctx)
}

fn assert_problem(answer: &str, status: u16, slug: &str) {
    assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("content-type: application/problem+json"), "{answer}");
    assert!(answer.contains(&format!("problems/{slug}\"")), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-correlation-id: "), "{answer}");
}

#[tokio::test]
async fn a_public_route_is_handed_to_pingora_with_its_rewritten_path() {
    let gw = gateway();
    let (proxied, answer, ctx) = filter(&gw, "GET /open/items?$top=2 HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(proxied && answer.is_empty(), "{answer}");
    assert_eq!(ctx.route_name(), "open");
    assert_eq!(ctx.upstream_path, "/api/items?$top=2");
}

#[tokio::test]
async fn an_authenticated_route_needs_its_key_and_records_the_consumer() {
    let gw = gateway();
    let (proxied, answer, _) = filter(&gw, "GET /erp/items/7 HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(!proxied);
    assert_problem(&answer, 401, "unauthenticated");

    let request = "GET /erp/items/7 HTTP/1.1\r\nHost: gw\r\nx-api-key: demo-erp-read-key\r\n\r\n";
    let (proxied, answer, ctx) = filter(&gw, request).await;
    assert!(proxied, "{answer}");
    assert_eq!(ctx.upstream_path, "/api/items(7)");
    assert_eq!(ctx.consumer.as_ref().map(|c| &*c.name), Some("bi"));
}

#[tokio::test]
async fn unknown_paths_other_methods_and_hostile_paths_are_answered_here() {
    let gw = gateway();
    let (proxied, answer, _) = filter(&gw, "GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(!proxied);
    assert_problem(&answer, 404, "route-not-found");

    let (_, answer, _) = filter(&gw, "DELETE /open/x HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_problem(&answer, 405, "method-not-allowed");
    assert!(answer.to_ascii_lowercase().contains("allow: get"), "{answer}");

    let (_, answer, _) = filter(&gw, "GET /open/../../etc/passwd HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_problem(&answer, 400, "bad-request");
    let (_, answer, _) = filter(&gw, "GET /open/a%2F..%2F..%2Fx HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_problem(&answer, 400, "bad-request");
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_the_connection_not_kept() {
    let gw = gateway();
    let request =
        "GET /open/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (proxied, answer, _) = filter(&gw, request).await;
    assert!(!proxied);
    assert_problem(&answer, 400, "bad-request");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
}
