//! Cluster mode: three replicas on loopback share PostgreSQL (orders, keys, delivery claims) and
//! Redis (the ERP budget) in front of the sandbox set to tight limits. Needs PostgreSQL
//! (`CAUSEWAY_TEST_POSTGRES`, default postgres://postgres@127.0.0.1:5432/test, trust auth) and Redis
//! (`CAUSEWAY_TEST_REDIS`, default redis://127.0.0.1:6379); without them each test is skipped
//! with a message, and under CI (`CI=true` or `CAUSEWAY_REQUIRE_SERVICES`) each fails naming the
//! missing service. Tests that stop Redis or PostgreSQL start servers of their own
//! (`redis-server`, PostgreSQL's `initdb`/`pg_ctl`), never the shared ones.

use crate::common;
use crate::common::config::Patch;

use crate::common::postgres::OwnPostgres;
use crate::common::process::{quote, sandbox_options, KEY};
use crate::common::{GatewayOptions, TestGateway, TestSandbox};
use causeway::sandbox::{data, LimitsSpec};
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn postgres_url() -> String {
    std::env::var("CAUSEWAY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("CAUSEWAY_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

async fn answers(url: &str) -> bool {
    let addr = host_port(url);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&addr)).await,
        Ok(Ok(_))
    )
}

/// Whether PostgreSQL and Redis answer; otherwise says what to start.
async fn services(test: &str) -> bool {
    let (pg, redis) = (postgres_url(), redis_url());
    let missing: Vec<String> = [(&pg, "PostgreSQL (trust auth, database `test`)"), (&redis, "Redis")]
        .into_iter()
        .zip([answers(&pg).await, answers(&redis).await])
        .filter(|(_, up)| !up)
        .map(|((url, what), _)| format!("{what} at {}", host_port(url)))
        .collect();
    if missing.is_empty() {
        return true;
    }
    common::missing_service(
        &missing.join(" and "),
        &format!("{test} needs them: start them or set CAUSEWAY_TEST_POSTGRES / CAUSEWAY_TEST_REDIS"),
    );
    false
}

/// A schema of its own in the database at `url`, dropped when the test ends (passed or not).
struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        // psql, the PostgreSQL client: no runtime is needed while a test unwinds.
        let _ = Command::new("psql")
            .arg(postgres_url())
            .args(["-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn fresh_schema(url: &str) -> Schema {
    let name = format!("causeway_cluster_{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}"))).execute(&pool).await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    Schema { url: format!("{url}{sep}options[search_path]={name}"), name }
}

/// The routes of the quote-to-order process plus an ERP read route for the CRM consumer.
fn routes() -> String {
    format!(
        "{}
  - name: erp-read
    match: {{ methods: [GET], path: \"/erp/v2/{{*rest}}\" }}
    upstream: bc
    rewrite: \"/api/v2.0/companies({})/{{rest}}\"
    policies: [crm-keys, crm-quota]
",
        common::process::shipped("routes/process.yaml").trim_end(),
        data::COMPANY_ID
    )
}

/// The ERP upstream's `budget:` for these tests: `window` requests a minute, 3 in flight, both
/// classes waiting up to `wait_ms`; `extra` adds settings.
fn budget(window: u32, wait_ms: u64, extra: &str) -> String {
    let extra = if extra.is_empty() { String::new() } else { format!("{extra}, ") };
    format!(
        "{{ window_requests: {window}, window_seconds: 60, max_concurrent: 3, queue: 1000, {extra}classes: {{ write: {{ priority: 0, max_wait_ms: {wait_ms} }}, interactive: {{ priority: 1, max_wait_ms: {wait_ms} }} }}, default_class: interactive }}"
    )
}

struct Setup<'a> {
    sandbox: &'a str,
    store_url: &'a str,
    redis: &'a str,
    prefix: &'a str,
    /// The `budget:` flow mapping of the ERP upstream.
    budget: &'a str,
    delivery: &'a str,
}

fn replica_options(s: &Setup) -> GatewayOptions {
    let mut o = sandbox_options(s.sandbox.to_string(), s.delivery);
    o.routes_yaml = routes();
    o.upstream_extra = format!("    budget: {}\n", s.budget);
    o.main_extra.push_str(&format!(
        "store:\n  backend: postgres\n  url: {}\n  acquire_timeout_ms: 1000\ncluster:\n  replicas: 3\n  redis: {{ url: \"{}\", key_prefix: \"{}\", lease_ms: 2000, timeout_ms: 200 }}\n",
        s.store_url, s.redis, s.prefix
    ));
    o
}

async fn start_replicas(s: &Setup<'_>) -> Vec<TestGateway> {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(TestGateway::start(replica_options(s)).await);
    }
    replicas
}

fn prefix() -> String {
    format!("causeway-test-{}", uuid::Uuid::now_v7().simple())
}

/// The sandbox's limits for these tests: 3 in flight (no queue), `window` per minute.
fn tight(window: u32, latency_ms: u64) -> LimitsSpec {
    LimitsSpec {
        window_requests: window,
        window_seconds: 60,
        max_concurrent: 3,
        queue: 0,
        latency_ms,
        ..LimitsSpec::default()
    }
}

/// Clients that read through the replicas in turn until `stop`; a 503 (budget) is retried
/// after its Retry-After. Counts answers by status.
struct Readers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    busy: Arc<AtomicU64>,
    other: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start_readers(urls: Vec<String>, clients: usize, pause: Duration) -> Readers {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, busy, other) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let tasks = (0..clients)
        .map(|i| {
            let (stop, ok, busy, other) = (stop.clone(), ok.clone(), busy.clone(), other.clone());
            let (client, urls) = (client.clone(), urls.clone());
            tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let url = &urls[n % urls.len()];
                    let resp = client.get(url).header("x-api-key", KEY).send().await;
                    let wait = match resp {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            pause
                        }
                        Ok(r) if r.status() == 503 => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            let after = r
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                                .unwrap_or(1);
                            Duration::from_millis(200).max(Duration::from_secs(after.min(2)))
                        }
                        _ => {
                            other.fetch_add(1, Ordering::Relaxed);
                            Duration::from_millis(200)
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            })
        })
        .collect();
    Readers { stop, ok, busy, other, tasks }
}

impl Readers {
    async fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.busy.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        )
    }
}

fn read_urls(replicas: &[TestGateway]) -> Vec<String> {
    replicas.iter().map(|r| r.url("/erp/v2/customers?$top=1")).collect()
}

async fn metrics(gw: &TestGateway) -> String {
    reqwest::get(gw.metrics_url()).await.unwrap().text().await.unwrap()
}

fn assert_within_limits(stats: &Value, window: u64, context: &str) {
    assert!(
        stats["peak_in_flight"].as_u64().unwrap() <= 3,
        "more than 3 in flight at the ERP ({context}): {stats:#}"
    );
    assert!(
        stats["peak_requests_in_window"].as_u64().unwrap() <= window,
        "more than {window} requests in a window ({context}): {stats:#}"
    );
    assert_eq!(stats["rejected_429"]["total"], 0, "the ERP refused requests ({context}): {stats:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_budget_and_keep_the_erp_busy_within_its_limits() {
    if !services("three replicas share one budget").await {
        return;
    }
    let sandbox = TestSandbox::start(tight(300, 20)).await;
    let schema = fresh_schema(&postgres_url()).await;
    let store_url = schema.url.clone();
    let prefix = prefix();
    let setup = Setup {
        sandbox: &sandbox.url(),
        store_url: &store_url,
        redis: &redis_url(),
        prefix: &prefix,
        budget: &budget(300, 10_000, "window_margin_ms: 500"),
        delivery: common::process::FAST,
    };
    let replicas = start_replicas(&setup).await;
    // 300 clients over the three replicas, each asking again as soon as it is answered.
    let readers = start_readers(read_urls(&replicas), 300, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let before = sandbox.stats().await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = sandbox.stats().await;
    let elapsed = started.elapsed().as_secs_f64();
    let (ok, busy, other) = readers.finish().await;
    let served = after["requests_total"].as_f64().unwrap() - before["requests_total"].as_f64().unwrap();
    let busy_share = served / (300.0 * elapsed / 60.0);
    eprintln!(
        "cluster budget: {served} ERP requests in {elapsed:.1} s after the first window = {:.1} % of the budget; answers 200: {ok}, 503: {busy}, other: {other}; sandbox {after}",
        busy_share * 100.0
    );
    assert_within_limits(&after, 300, "three replicas, 300 clients");
    assert!(busy_share >= 0.9, "the ERP was kept only {:.1} % busy", busy_share * 100.0);
    assert_eq!(other, 0, "every answer is a 200 or a 503 with Retry-After");
    let served_by_each: Vec<String> = {
        let mut v = Vec::new();
        for r in &replicas {
            let m = metrics(r).await;
            v.push(
                m.lines()
                    .find(|l| l.starts_with("causeway_erp_admitted_total{") && l.contains("upstream=\"bc\""))
                    .unwrap_or("none")
                    .to_string(),
            );
        }
        v
    };
    assert!(
        served_by_each.iter().all(|l| l != "none"),
        "every replica sent ERP requests: {served_by_each:?}"
    );
}

/// Submit `body` under `key` to `url`; (status, body).
async fn post(client: &reqwest::Client, url: &str, key: &str, body: &Value) -> (u16, Value) {
    let resp = client
        .post(url)
        .header("x-api-key", KEY)
        .header("idempotency-key", format!("\"{key}\""))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_or_one_opportunity_sent_to_three_replicas_at_once_makes_one_erp_order() {
    if !services("one order across replicas").await {
        return;
    }
    let sandbox = TestSandbox::start(tight(3000, 50)).await;
    let schema = fresh_schema(&postgres_url()).await;
    let store_url = schema.url.clone();
    let prefix = prefix();
    let setup = Setup {
        sandbox: &sandbox.url(),
        store_url: &store_url,
        redis: &redis_url(),
        prefix: &prefix,
        budget: &budget(3000, 5_000, ""),
        delivery: "{ max_attempts: 50, backoff_initial_ms: 100, backoff_max_ms: 1000, inline_wait_ms: 5000 }",
    };
    let replicas = start_replicas(&setup).await;
    let client = reqwest::Client::new();
    let urls: Vec<String> = replicas.iter().map(|r| r.url("/process/v1/quote-to-order")).collect();
    for round in 0..5 {
        // The same key at every replica at once.
        let opportunity = format!("OPP-SAMEKEY-{round}");
        let body = quote(&opportunity);
        let key = format!("{opportunity}-key");
        let sends = urls.iter().map(|u| post(&client, u, &key, &body));
        let answers = futures_util::future::join_all(sends).await;
        let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        assert!(statuses.iter().all(|s| matches!(s, 200..=202 | 409)), "{statuses:?}: {answers:?}");
        // The same opportunity under a key per replica.
        let opportunity = format!("OPP-SAMEOPP-{round}");
        let body = quote(&opportunity);
        let keys: Vec<String> = (0..urls.len()).map(|i| format!("{opportunity}-key-{i}")).collect();
        let sends = urls.iter().zip(&keys).map(|(u, key)| post(&client, u, key, &body));
        let answers = futures_util::future::join_all(sends).await;
        let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
        assert!(statuses.iter().all(|s| matches!(s, 200..=202 | 409)), "{statuses:?}: {answers:?}");
    }
    // Every order reaches the ERP (or already has), then the ERP holds one per opportunity.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = sandbox.stats().await;
        if stats["orders_created"] == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "orders missing: {stats:#}\n{}", replicas[0].log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = sandbox.stats().await;
    assert_eq!(stats["orders_created"], 10, "one ERP order per opportunity: {stats:#}");
    assert_eq!(stats["duplicate_external_document_numbers"], 0);
    // Every replica sees the same single order of each opportunity.
    for r in &replicas {
        let resp = client
            .get(r.url("/process/v1/orders?opportunityId=OPP-SAMEOPP-0"))
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let listed: Value = resp.json().await.unwrap();
        let orders = listed["value"].as_array().cloned().unwrap_or_default();
        assert_eq!(orders.len(), 1, "{listed:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_holding_erp_permits_and_claims_is_taken_over_and_every_order_reaches_the_erp_once()
{
    if !services("replica killed").await {
        return;
    }
    // A slow ERP: a killed replica dies with requests at the ERP and permits in Redis.
    let sandbox = TestSandbox::start(tight(3000, 600)).await;
    let schema = fresh_schema(&postgres_url()).await;
    let store_url = schema.url.clone();
    let prefix = prefix();
    let setup = Setup {
        sandbox: &sandbox.url(),
        store_url: &store_url,
        redis: &redis_url(),
        prefix: &prefix,
        budget: &budget(3000, 30_000, ""),
        delivery: "{ max_attempts: 50, backoff_initial_ms: 200, backoff_max_ms: 1000, inline_wait_ms: 300, lease_ms: 30000 }",
    };
    let mut replicas = start_replicas(&setup).await;
    let client = reqwest::Client::new();
    let first = replicas[0].url("/process/v1/quote-to-order");
    let mut acknowledged = Vec::new();
    for i in 0..12 {
        let opportunity = format!("OPP-KILL-{i:03}");
        let (status, order) =
            post(&client, &first, &format!("{opportunity}-key"), &quote(&opportunity)).await;
        assert!(matches!(status, 201 | 202), "{status}: {order}");
        acknowledged.push(opportunity);
    }
    // Wait until the first replica's deliveries are at the ERP (it holds their permits in
    // Redis and their claims in PostgreSQL), then kill it without warning.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = sandbox.stats().await;
        if stats["in_flight"].as_u64() >= Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first replica never reached the ERP: {stats}\n{}",
            replicas[0].log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = replicas[0].child.kill();
    let _ = replicas[0].child.wait();
    let killed = replicas.remove(0);
    // The others deliver every acknowledged order, each once.
    let deadline = Instant::now() + Duration::from_secs(120);
    for opportunity in &acknowledged {
        loop {
            let resp = client
                .get(replicas[0].url(&format!("/process/v1/orders?opportunityId={opportunity}")))
                .header("x-api-key", KEY)
                .send()
                .await
                .unwrap();
            let text = resp.text().await.unwrap();
            if text.contains("\"accepted\"") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{opportunity} never accepted: {text}\n--- survivor:\n{}\n--- killed:\n{}",
                replicas[0].log(),
                killed.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let stats = sandbox.stats().await;
    assert_eq!(stats["orders_created"], acknowledged.len(), "each acknowledged order once: {stats:#}");
    assert_eq!(stats["duplicate_external_document_numbers"], 0, "{stats:#}");
    assert_within_limits(&stats, 3000, "a replica killed holding permits");
}

/// A Redis server of the test's own (so stopping it disturbs nobody), on a free port.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start() -> Option<OwnRedis> {
        let port = common::free_port();
        let mut r = OwnRedis { port, child: None };
        r.restart().then_some(r)
    }

    fn restart(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mode_line(component: &str, fallback: &str, value: u8) -> String {
    format!("causeway_shared_state_mode{{component=\"{component}\",fallback=\"{fallback}\"}} {value}")
}

/// Redis stops under load and comes back: the fallback is observed on every replica, the ERP
/// stays inside its limits, and sharing resumes without a restart.
async fn redis_outage(fallback: &str) -> (Value, u64, u64) {
    let Some(mut redis) = OwnRedis::start() else {
        common::missing_service(
            "redis-server",
            &format!("the Redis outage test ({fallback}) starts its own: install Debian's redis-server"),
        );
        return (Value::Null, 0, 0);
    };
    let sandbox = TestSandbox::start(tight(3000, 20)).await;
    let schema = fresh_schema(&postgres_url()).await;
    let store_url = schema.url.clone();
    let prefix = prefix();
    let budget = budget(3000, 3_000, &format!("when_redis_unavailable: {fallback}"));
    let redis_url = redis.url();
    let setup = Setup {
        sandbox: &sandbox.url(),
        store_url: &store_url,
        redis: &redis_url,
        prefix: &prefix,
        budget: &budget,
        delivery: common::process::FAST,
    };
    let replicas = start_replicas(&setup).await;
    let readers = start_readers(read_urls(&replicas), 30, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.stop();
    let stopped = sandbox.stats().await["requests_total"].as_u64().unwrap();
    for r in &replicas {
        r.wait_for_metric(&mode_line("budget:bc", fallback, 1), Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = sandbox.stats().await["requests_total"].as_u64().unwrap() - stopped;
    assert!(redis.restart(), "redis-server restarts on its port");
    for r in &replicas {
        r.wait_for_metric(&mode_line("budget:bc", fallback, 0), Duration::from_secs(15)).await;
        let m = metrics(r).await;
        assert!(
            m.contains(&format!(
                "causeway_shared_state_switches_total{{component=\"budget:bc\",to=\"{fallback}\"}}"
            )),
            "the switch is counted"
        );
        for line in ["shared state unavailable: fallback in force", "shared state back: fallback ended"] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !r.log().contains(line) {
                assert!(Instant::now() < deadline, "the switch is logged: {line}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Shared again: reads succeed through Redis.
    let back = sandbox.stats().await["requests_total"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, _, other) = readers.finish().await;
    let after = sandbox.stats().await;
    assert!(after["requests_total"].as_u64().unwrap() > back, "requests flow again once Redis is back");
    assert_eq!(other, 0, "every answer is a 200 or a 503 problem");
    assert_within_limits(&after, 3000, fallback);
    (after, during, stopped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_under_load_local_share_keeps_the_erp_within_its_limits_and_sharing_resumes() {
    if !services("redis outage, local_share").await {
        return;
    }
    let (stats, during, _) = redis_outage("local_share").await;
    if stats.is_null() {
        return;
    }
    assert!(during > 0, "each replica carried on with its share while Redis was away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_under_load_closed_sends_nothing_to_the_erp_until_redis_returns() {
    if !services("redis outage, closed").await {
        return;
    }
    let (stats, during, _) = redis_outage("closed").await;
    if stats.is_null() {
        return;
    }
    // Requests admitted before the stop may still end at the ERP; nothing new starts.
    assert!(during <= 3, "closed: the ERP saw {during} requests while Redis was away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_load_callers_get_store_unavailable_and_nothing_is_lost_or_doubled() {
    if !services("postgres restart").await {
        return;
    }
    let Some(pg) = OwnPostgres::start() else {
        common::missing_service(
            "PostgreSQL's initdb and pg_ctl",
            "the restart test runs its own server: install PostgreSQL 15+ (Debian package postgresql)",
        );
        return;
    };
    let sandbox = TestSandbox::start(tight(100_000, 20)).await;
    let prefix = prefix();
    let store_url = pg.url();
    let setup = Setup {
        sandbox: &sandbox.url(),
        store_url: &store_url,
        redis: &redis_url(),
        prefix: &prefix,
        budget: &budget(100_000, 5_000, ""),
        delivery: "{ max_attempts: 50, backoff_initial_ms: 100, backoff_max_ms: 1000, inline_wait_ms: 2000 }",
    };
    let replicas = start_replicas(&setup).await;
    let urls: Vec<String> = replicas.iter().map(|r| r.url("/process/v1/quote-to-order")).collect();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let unavailable = Arc::new(AtomicU64::new(0));
    let orders = 60;
    let mut tasks = Vec::new();
    for i in 0..orders {
        let (client, urls, unavailable) = (client.clone(), urls.clone(), unavailable.clone());
        tasks.push(tokio::spawn(async move {
            // Spread over a few seconds so some arrive while the database is away.
            tokio::time::sleep(Duration::from_millis(100 * i as u64)).await;
            let opportunity = format!("OPP-PG-{i:03}");
            let body = quote(&opportunity);
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut n = i;
            loop {
                n += 1;
                let (status, problem) =
                    post(&client, &urls[n % 3], &format!("{opportunity}-key"), &body).await;
                match status {
                    200..=202 => return opportunity,
                    503 => {
                        assert!(
                            problem["type"].as_str().unwrap_or("").ends_with("store-unavailable")
                                || problem["type"]
                                    .as_str()
                                    .unwrap_or("")
                                    .ends_with("temporarily-reduced-capacity"),
                            "{problem:#}"
                        );
                        if problem["type"].as_str().unwrap_or("").ends_with("store-unavailable") {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    409 => {}
                    other => panic!("{opportunity}: {other} {problem:#}"),
                }
                assert!(Instant::now() < deadline, "{opportunity} never acknowledged");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pg.ctl("stop"), "PostgreSQL stops");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(pg.ctl("start"), "PostgreSQL starts again");
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.push(t.await.unwrap());
    }
    assert!(
        unavailable.load(Ordering::Relaxed) > 0,
        "callers were told the store is unavailable while it was"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let stats = sandbox.stats().await;
        if stats["orders_created"].as_u64() == Some(orders as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "orders missing at the ERP: {stats:#}\n{}", replicas[0].log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = sandbox.stats().await;
    assert_eq!(stats["orders_created"], orders, "every acknowledged order once: {stats:#}");
    assert_eq!(stats["duplicate_external_document_numbers"], 0);
    assert_eq!(acknowledged.len(), orders);
}

/// `requests` reads of one consumer spread over the replicas; (200s, 429s).
async fn count_quota(replicas: &[TestGateway], requests: usize) -> (usize, usize) {
    let client = reqwest::Client::new();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..requests {
        let resp = client
            .get(replicas[i % replicas.len()].url("/process/v1/orders?opportunityId=OPP-QUOTA"))
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert!(resp.headers().contains_key("retry-after"), "a 429 says when to come back");
                limited += 1
            }
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
    }
    (ok, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_quota_holds_across_replicas_and_each_keeps_its_share_while_redis_is_away() {
    if !services("shared consumer quota").await {
        return;
    }
    let Some(mut redis) = OwnRedis::start() else {
        common::missing_service(
            "redis-server",
            "the shared consumer quota test starts its own: install Debian's redis-server",
        );
        return;
    };
    let sandbox = TestSandbox::start(tight(3000, 0)).await;
    let schema = fresh_schema(&postgres_url()).await;
    let store_url = schema.url.clone();
    let prefix = prefix();
    let redis_url = redis.url();
    let setup = Setup {
        sandbox: &sandbox.url(),
        store_url: &store_url,
        redis: &redis_url,
        prefix: &prefix,
        budget: "{ window_requests: 3000, window_seconds: 60, max_concurrent: 3 }",
        delivery: common::process::FAST,
    };
    let mut options = replica_options(&setup);
    // 30 requests a minute for the CRM, no burst: the whole cluster's, not each replica's.
    options.policies_yaml = common::process::shipped("policies/crm.yaml").patched(
        "requests: 6000, window_seconds: 60, burst: 500",
        "requests: 30, window_seconds: 60, burst: 0",
    );
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let mut o = replica_options(&setup);
        o.policies_yaml = options.policies_yaml.clone();
        replicas.push(TestGateway::start(o).await);
    }
    let (ok, limited) = count_quota(&replicas, 60).await;
    assert_eq!(ok, 30, "the quota is the cluster's: 30 of 60 over three replicas ({limited} refused)");
    // Redis away: each replica allows its share (30 ÷ 3 = 10 a minute) on its own.
    redis.stop();
    let (ok, _) = count_quota(&replicas, 60).await;
    assert!((1..=30).contains(&ok), "local_share: each replica its share, {ok} allowed in all");
    for r in &replicas {
        r.wait_for_metric(&mode_line("limit:crm-quota:crm", "local_share", 1), Duration::from_secs(5)).await;
    }
    assert!(redis.restart());
    // Shared again within a probe's interval; the bucket in the new Redis starts full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, _) = count_quota(&replicas, 60).await;
    assert_eq!(ok, 30, "shared again once Redis is back");
    for r in &mut replicas {
        r.wait_for_metric(&mode_line("limit:crm-quota:crm", "local_share", 0), Duration::from_secs(5)).await;
    }
}

/// The skip rule itself, on this binary: with PostgreSQL pointed at a closed port, a cluster
/// test under CI fails naming PostgreSQL; without CI it passes as skipped, saying what to start.
#[test]
fn a_missing_service_fails_the_run_under_ci_and_is_skipped_with_its_remedy_elsewhere() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let run = |ci: Option<&str>| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "cluster::one_key_or_one_opportunity_sent_to_three_replicas_at_once_makes_one_erp_order",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env("CAUSEWAY_TEST_POSTGRES", format!("postgres://postgres@127.0.0.1:{port}/test"))
        .env_remove("CI")
        .env_remove("CAUSEWAY_REQUIRE_SERVICES");
        if let Some(value) = ci {
            c.env("CI", value);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (passed, output) = run(Some("true"));
    assert!(!passed, "under CI a missing PostgreSQL must fail the test:\n{output}");
    assert!(
        output.contains(&format!("PostgreSQL (trust auth, database `test`) at 127.0.0.1:{port}")),
        "{output}"
    );
    assert!(output.contains("is missing"), "{output}");
    let (passed, output) = run(None);
    assert!(passed, "outside CI the test is skipped:\n{output}");
    assert!(output.contains("SKIPPED (needs PostgreSQL"), "{output}");
    assert!(output.contains("set CAUSEWAY_TEST_POSTGRES"), "{output}");
    assert!(output.contains("1 passed"), "{output}");
}
