//! The ERP budget against the sandbox, whose counters are the judge.

use crate::common::config::{Budget, Class};
use crate::common::*;
use causeway::sandbox::{data::COMPANY_ID, LimitsSpec};
use std::time::{Duration, Instant};

fn routes() -> String {
    format!(
        r#"routes:
  - name: interactive
    match: {{ methods: [GET], path: "/erp/v2/{{*rest}}" }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY_ID})/{{rest}}"
  - name: writes
    match: {{ methods: [GET], path: "/w/{{*rest}}" }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY_ID})/{{rest}}"
    erp_class: write
  - name: bulk
    match: {{ methods: [GET], path: "/b/{{*rest}}" }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY_ID})/{{rest}}"
    erp_class: bulk
"#
    )
}

/// A queue of 1000 with three classes (write, interactive, bulk) waiting up to 30 s.
fn budget(window_requests: u32, window_seconds: u64, max_concurrent: u32) -> Budget {
    let mut budget = Budget {
        window_margin_ms: Some(500),
        ..Budget::new(window_requests, window_seconds, max_concurrent)
    }
    .queued(30_000, 30_000);
    budget.classes.insert("bulk", Class { priority: 2, max_wait_ms: 30_000 });
    budget
}

async fn gateway(sandbox: &TestSandbox, budget: Budget) -> TestGateway {
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.routes_yaml = routes();
    opts.policies_yaml = "policies: []\n".into();
    opts.upstream_extra = budget.upstream_yaml();
    TestGateway::start(opts).await
}

#[tokio::test]
async fn two_hundred_clients_never_exceed_the_erp_budget() {
    // The sandbox enforces exactly the budget: 5 at once, no queue, 150 per 3 s window.
    let limits = LimitsSpec {
        window_requests: 150,
        window_seconds: 3,
        max_concurrent: 5,
        queue: 0,
        latency_ms: 20,
        ..LimitsSpec::default()
    };
    let sandbox = TestSandbox::start(limits).await;
    let gw = gateway(&sandbox, budget(150, 3, 5)).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let req = client.get(gw.url("/erp/v2/items?$top=1"));
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let s = sandbox.stats().await;
    assert_eq!(s["rejected_429"]["total"], 0, "the ERP never had to refuse: {s}");
    assert!(s["peak_open_requests"].as_u64().unwrap() <= 5, "never more than 5 in flight at the ERP: {s}");
    assert!(s["peak_requests_in_window"].as_u64().unwrap() <= 150, "never more than the window budget: {s}");
    assert_eq!(ok, 200, "every client was served, the last 50 after the window rolled: {statuses:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "the 151st request waited for the window");
}

#[tokio::test]
async fn an_erp_429_with_retry_after_pauses_all_traffic() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let gw = gateway(&sandbox, budget(1000, 60, 5)).await;
    sandbox
        .set_limits(&LimitsSpec {
            force_status: Some(429),
            force_retry_after_seconds: Some(2),
            ..LimitsSpec::default()
        })
        .await;
    let resp = reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap();
    assert_eq!(resp.headers().get("retry-after").unwrap(), "2");
    assert_problem(resp, 503, "erp-overloaded").await;
    let paused_at = Instant::now();
    // The ERP recovers at once, but the gateway must hold everything back for 2 s.
    sandbox.set_limits(&LimitsSpec::default()).await;
    reqwest::Client::new().post(format!("{}/sandbox/reset", sandbox.url())).send().await.unwrap();
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let req = client.get(gw.url("/erp/v2/items?$top=1"));
            tokio::spawn(async move { (req.send().await.unwrap().status().as_u16(), Instant::now()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(sandbox.stats().await["requests_total"], 0, "nothing sent during the pause");
    for t in tasks {
        let (status, done) = t.await.unwrap();
        assert_eq!(status, 200, "queued requests go through after the pause");
        assert!(done.duration_since(paused_at) >= Duration::from_millis(1900));
    }
    let metrics = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"causeway_erp_pauses_total{reason="retry_after",upstream="bc"} 1"#),
        "{metrics}"
    );
}

fn p95(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 95 / 100).min(v.len() - 1)]
}

#[tokio::test]
async fn writes_wait_less_than_bulk_under_saturation() {
    let sandbox = TestSandbox::start(LimitsSpec { latency_ms: 25, ..LimitsSpec::default() }).await;
    let gw = gateway(&sandbox, budget(100_000, 60, 1)).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    // Bulk arrives first and saturates the single slot; writes arrive right behind.
    for path in ["/b/items?$top=1"; 20].into_iter().chain(["/w/items?$top=1"; 20]) {
        let req = client.get(gw.url(path));
        let class = if path.starts_with("/w") { "write" } else { "bulk" };
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let status = req.send().await.unwrap().status().as_u16();
            (class, status, t.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (mut write, mut bulk) = (Vec::new(), Vec::new());
    for t in tasks {
        let (class, status, took) = t.await.unwrap();
        assert_eq!(status, 200);
        if class == "write" {
            write.push(took)
        } else {
            bulk.push(took)
        }
    }
    let (w, b) = (p95(write), p95(bulk));
    assert!(w < b, "write p95 {w:?} must be below bulk p95 {b:?}");
    assert!(sandbox.stats().await["peak_open_requests"].as_u64().unwrap() <= 1);
}

#[tokio::test]
async fn a_vendor_overload_signal_in_the_body_pauses_the_budget_with_backoff() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    // The sandbox's forced answers carry `"code":"Forced"`; treat that 400 as NetSuite's
    // SSS_REQUEST_LIMIT_EXCEEDED would be treated.
    let budget = Budget {
        backoff_initial_ms: Some(1000),
        ..budget(1000, 60, 5).overload_signal(400, Some(r#""code":"Forced""#))
    };
    let gw = gateway(&sandbox, budget).await;
    sandbox.set_limits(&LimitsSpec { force_status: Some(400), ..LimitsSpec::default() }).await;
    let resp = reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap();
    assert_eq!(resp.status(), 400, "the vendor's answer itself passes through");
    let _ = resp.text().await;
    sandbox.set_limits(&LimitsSpec::default()).await;
    // No Retry-After: the pause is the first backoff step (0.5-1 s with jitter).
    let t = Instant::now();
    assert_eq!(reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap().status(), 200);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "the next request waited out the backoff: {:?}",
        t.elapsed()
    );
    let metrics = reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"causeway_erp_pauses_total{reason="backoff",upstream="bc"} 1"#), "{metrics}");
}

#[tokio::test]
async fn permits_are_released_when_clients_give_up_or_requests_fail() {
    let sandbox = TestSandbox::start(LimitsSpec { latency_ms: 400, ..LimitsSpec::default() }).await;
    let gw = gateway(&sandbox, budget(1000, 60, 1)).await;
    // Clients that hang up while their request holds or waits for the single permit.
    for _ in 0..3 {
        let client = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap();
        assert!(client.get(gw.url("/erp/v2/items?$top=1")).send().await.is_err());
    }
    // Requests that fail upstream (ERP answers 500) also give their permit back.
    sandbox.set_limits(&LimitsSpec { force_status: Some(500), ..LimitsSpec::default() }).await;
    for _ in 0..2 {
        assert_eq!(reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap().status(), 500);
    }
    sandbox.set_limits(&LimitsSpec::default()).await;
    // With one permit, any leak would make this wait out its class deadline and fail.
    let t = Instant::now();
    assert_eq!(reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap().status(), 200);
    assert!(t.elapsed() < Duration::from_secs(3), "the permit was free: {:?}", t.elapsed());
    // The last request's own permit goes back when its context is dropped, just after the
    // response reached the client: wait for that, a leaked permit never comes back.
    gw.wait_for_metric("causeway_erp_in_flight{upstream=\"bc\"} 0", Duration::from_secs(2)).await;
}
