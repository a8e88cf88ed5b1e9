//! `scripts/bench events`: events delivered to a webhook subscriber (the events issue,
//! acceptance 7).
//!
//! One gateway on SQLite with its own sandbox and one subscriber, a receiver in this process
//! that answers 200 (or 503 while told to) and notes when each event arrives.
//! (1) Latency: orders at a steady pace (wrk, few connections, `inline_wait_ms: 0`); each
//!     `order.accepted.v1` event's arrival minus its `time` (the ERP accepted the order then):
//!     ERP change → subscriber, p50 and p99.
//! (2) Throughput: the receiver refuses (503) while orders are recorded and delivered to the ERP,
//!     so their events queue in the outbox; then it answers 200 and the backlog is timed until
//!     every event is acknowledged: events delivered per second.
//! (3) Change detection: a second gateway with `process.changes` subscribes to its own sandbox
//!     (Business Central's default limits, notifications sent without batching delay); orders
//!     are shipped in the sandbox at a steady pace, and each `order.shipped.v1` arrival minus
//!     the ship call is the ERP change → subscriber latency; the sandbox's request count over
//!     the phase is what change detection cost the ERP budget.
//! (4) JetStream: a gateway whose only subscriber publishes to NATS JetStream (127.0.0.1:4222)
//!     records orders while its NATS URL points nowhere, so their events queue in the outbox; it
//!     is restarted on the same store with the real URL and the backlog is timed until the
//!     stream holds every event: events delivered per second. Skipped without NATS.

use super::process::{
    bench_quote, gateway_with_process, gateway_with_store, sandbox, script, settle, start, stats,
};
use super::{cpu_ticks, env_num, wrk_with, Procs};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SANDBOX: u16 = 18190;
const GW: u16 = 18191;
const RECEIVER: u16 = 18195;
const SANDBOX_CHANGES: u16 = 18200;
const GW_CHANGES: u16 = 18201;
const GW_NATS: u16 = 18205;

#[derive(Default)]
struct Arrivals {
    /// (arrival − event time) in ms, per 2xx-answered accepted event.
    lag_ms: Vec<f64>,
    acknowledged: usize,
    /// Event ids acknowledged, and how many arrived again after their acknowledgement.
    ids: std::collections::HashSet<String>,
    repeats: usize,
    types: std::collections::BTreeMap<String, usize>,
    /// ERP order number → when its `order.shipped.v1` was acknowledged (ms since the epoch).
    shipped_at: std::collections::HashMap<String, f64>,
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// The receiver, on its own runtime thread: answers `status`, notes each acknowledged event.
fn receiver(status: Arc<AtomicU16>, arrivals: Arc<Mutex<Arrivals>>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/hooks",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let (status, arrivals) = (status.clone(), arrivals.clone());
                    async move {
                        let code = status.load(Ordering::Relaxed);
                        if code == 200 {
                            let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            let time = event["time"].as_str().and_then(|t| {
                                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                                    .ok()
                            });
                            let mut a = arrivals.lock().unwrap();
                            a.acknowledged += 1;
                            if !a.ids.insert(event["id"].as_str().unwrap_or_default().to_string()) {
                                a.repeats += 1;
                            }
                            *a.types
                                .entry(event["type"].as_str().unwrap_or_default().to_string())
                                .or_default() += 1;
                            if event["type"] == "order.shipped.v1" {
                                let number = event["data"]["erpOrderNumber"].as_str().unwrap_or_default();
                                a.shipped_at.insert(number.to_string(), now_ms());
                            }
                            if let (Some(t), Some("order.accepted.v1")) = (time, event["type"].as_str()) {
                                a.lag_ms.push(now_ms() - (t.unix_timestamp_nanos() as f64 / 1e6));
                            }
                        }
                        axum::http::StatusCode::from_u16(code).unwrap()
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", RECEIVER)).await.unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
}

/// The value of the sample `name` (with its labels, as exposed) on the gateway's metrics listener.
fn metric(name: &str) -> f64 {
    metric_at(GW + 2, name)
}

/// Wait until every order is final (so every event is in the outbox) and the outbox gauge has
/// caught up; returns the events waiting for the subscriber.
fn outbox_settled() -> usize {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let open: f64 = ["received", "validated", "submitted", "pending"]
            .iter()
            .map(|s| metric(&format!("causeway_process_orders_in_store{{state=\"{s}\"}}")))
            .sum();
        if open == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The outbox gauge is recounted every second.
    std::thread::sleep(Duration::from_millis(2500));
    metric("causeway_events_undelivered{state=\"pending\",subscriber=\"bench\"}") as usize
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run(procs: &mut Procs, work: &Path) {
    let seconds = env_num("BENCH_SECONDS", 10);
    let status = Arc::new(AtomicU16::new(200));
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    receiver(status.clone(), arrivals.clone());
    // The secret is read from the environment by the gateway this process starts.
    std::env::set_var("BENCH_HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let unbound = (10_000_000, 60);
    start(procs, "sandbox-events", sandbox(SANDBOX, unbound.0, unbound.1), SANDBOX);
    // `BENCH_EVENTS_ONLY=jetstream`: the JetStream figures alone.
    if std::env::var("BENCH_EVENTS_ONLY").is_ok_and(|v| v == "jetstream") {
        return jetstream(procs, work);
    }
    let store = format!(
        "store: {{ path: data/orders.db, synchronous: full }}\n\
         events:\n  subscribers:\n    bench:\n      url: http://127.0.0.1:{RECEIVER}/hooks\n      secret_env: [BENCH_HOOK_SECRET]\n      backoff_initial_ms: 200\n      backoff_max_ms: 1000\n"
    );
    let gw = gateway_with_store(work, "gw-events", GW, SANDBOX, unbound, 0, &store, "off");
    start(procs, "causeway-events", gw, GW);
    let pid = procs.pid("causeway-events");

    // (1) Latency at a steady pace.
    let pace = env_num("BENCH_EVENTS_CONNECTIONS", 2);
    let r = wrk_with(GW, pid, seconds, pace, None, "/process/v1/quote-to-order", Some(&script(work, "EL")));
    settle(SANDBOX);
    std::thread::sleep(Duration::from_secs(2));
    let mut lag = std::mem::take(&mut arrivals.lock().unwrap().lag_ms);
    lag.sort_by(|a, b| a.total_cmp(b));
    println!(
        "events (1): orders at {:.0}/s (wrk -t1 -c{pace} -d{seconds}s, 202), ERP accepted -> subscriber 2xx: \
         events {}, p50 {:.1} ms, p99 {:.1} ms",
        r.rps,
        lag.len(),
        percentile(&lag, 0.5),
        percentile(&lag, 0.99)
    );

    // (2) A backlog, then drained.
    status.store(503, Ordering::Relaxed);
    let recorded =
        wrk_with(GW, pid, seconds, 16, None, "/process/v1/quote-to-order", Some(&script(work, "EB")));
    let recorded = (recorded.rps * seconds as f64) as usize;
    settle(SANDBOX);
    let backlog = outbox_settled();
    let start_count = {
        let mut a = arrivals.lock().unwrap();
        a.lag_ms.clear();
        a.acknowledged
    };
    let cpu_before = cpu_ticks(pid);
    status.store(200, Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    while arrivals.lock().unwrap().acknowledged - start_count < backlog && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    {
        let a = arrivals.lock().unwrap();
        println!(
            "  events acknowledged by type {:?}, repeats after an acknowledgement {}",
            a.types, a.repeats
        );
    }
    let delivered = arrivals.lock().unwrap().acknowledged - start_count;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_us = cpu_ticks(pid).saturating_sub(cpu_before) as f64 / hz * 1e6;
    println!(
        "events (2): {recorded} orders recorded while the webhook answered 503; backlog of {backlog} events drained: {delivered} acknowledged in {took:.2} s = {:.0} events/s, gateway cpu {:.0} us/event (includes the first retry's wait, up to backoff_max_ms 1 s)",
        delivered as f64 / took,
        cpu_us / delivered.max(1) as f64
    );
    change_detection(procs, work, &arrivals);
    jetstream(procs, work);
}

/// Stop the process started as `name` as an operator would (SIGTERM: it finishes what it has
/// under way, so no delivery stays leased to it).
fn stop(procs: &mut Procs, name: &str) {
    if let Some(i) = procs.list.iter().position(|(n, ..)| *n == name) {
        let (_, mut child, _) = procs.list.remove(i);
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let _ = child.wait();
    }
}

fn jetstream(procs: &mut Procs, work: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Ok(client) = rt.block_on(async_nats::connect("nats://127.0.0.1:4222")) else {
        println!("events (4): SKIPPED: no NATS with JetStream on 127.0.0.1:4222");
        return;
    };
    // The JetStream context spawns onto the runtime it is made in.
    let js = rt.block_on(async { async_nats::jetstream::new(client) });
    let stream = format!("CAUSEWAY_BENCH_{:08x}", rand::random::<u32>());
    let config = |nats_url: &str| {
        format!(
            "store: {{ path: data/orders.db, synchronous: full }}\n\
             events:\n  subscribers:\n    bus:\n      nats:\n        url: {nats_url}\n        stream: {stream}\n        subject_prefix: causeway.bench\n      backoff_initial_ms: 200\n      backoff_max_ms: 1000\n"
        )
    };
    // Fewer orders than (2): the sandbox's order list is long by now and each create scans it.
    let seconds = env_num("BENCH_SECONDS", 10) / 2;
    let unbound = (10_000_000, 60);
    // The same gateway (name, ports, store) each time; only its subscriber's URL changes.
    let gateway =
        |store: &str| gateway_with_store(work, "gw-nats", GW_NATS, SANDBOX, unbound, 0, store, "off");
    // NATS unreachable: every event waits in the outbox.
    let gw = gateway(&config("nats://127.0.0.1:1"));
    start(procs, "causeway-nats", gw, GW_NATS);
    let pid = procs.pid("causeway-nats");
    let recorded =
        wrk_with(GW_NATS, pid, seconds, 4, None, "/process/v1/quote-to-order", Some(&script(work, "EN")));
    settle(SANDBOX);
    std::thread::sleep(Duration::from_secs(3));
    let backlog =
        metric_at(GW_NATS + 2, "causeway_events_undelivered{state=\"pending\",subscriber=\"bus\"}") as u64;
    stop(procs, "causeway-nats");
    // Restarted on the same store with NATS reachable (the events wait out their backoff, at
    // most backoff_max_ms).
    let gw = gateway(&config("nats://127.0.0.1:4222"));
    let started = Instant::now();
    start(procs, "causeway-nats", gw, GW_NATS);
    let pid = procs.pid("causeway-nats");
    let cpu_before = cpu_ticks(pid);
    let deadline = started + Duration::from_secs(300);
    let stored = loop {
        let stored = rt.block_on(async {
            match js.get_stream(&stream).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            }
        });
        if stored >= backlog || Instant::now() > deadline {
            break stored;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_us = cpu_ticks(pid).saturating_sub(cpu_before) as f64 / hz * 1e6;
    println!(
        "events (4): {:.0} orders recorded while NATS was unreachable; backlog of {backlog} events published to JetStream after a restart: \
         {stored} stored in {took:.2} s (gateway start included) = {:.0} events/s, gateway cpu {:.0} us/event",
        recorded.rps * seconds as f64,
        stored as f64 / took,
        cpu_us / stored.max(1) as f64
    );
    let _ = rt.block_on(js.delete_stream(&stream));
}

/// The value of the sample `name` on the metrics listener at `port`.
fn metric_at(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the gateway's metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// One HTTP/1.1 exchange on a fresh connection: status and body.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    s.write_all(format!("{head}\r\n{body}").as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn change_detection(procs: &mut Procs, work: &Path, arrivals: &Arc<Mutex<Arrivals>>) {
    start(procs, "sandbox-changes", sandbox(SANDBOX_CHANGES, 6000, 300), SANDBOX_CHANGES);
    let (_, settings) = http(SANDBOX_CHANGES, "GET", "/sandbox/settings", &[], "");
    let mut settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    settings["notification_delay_ms"] = 0.into();
    let json = [("content-type", "application/json")];
    http(SANDBOX_CHANGES, "PUT", "/sandbox/settings", &json, &settings.to_string());
    std::env::set_var("BENCH_CLIENT_STATE", "bench-client-state-0123456789abcdef");
    let process = format!(
        "  changes:\n    notification_url: http://127.0.0.1:{GW_CHANGES}/process/v1/erp-notifications\n    client_state_env: BENCH_CLIENT_STATE\n"
    );
    let store = format!(
        "store: {{ path: data/orders.db, synchronous: full }}\n\
         events:\n  subscribers:\n    bench:\n      url: http://127.0.0.1:{RECEIVER}/hooks\n      secret_env: [BENCH_HOOK_SECRET]\n      types: [order.shipped.v1]\n"
    );
    // The shipped budget: Business Central's 6,000 requests per 5 minutes.
    let gw = gateway_with_process(
        work,
        "gw-changes",
        GW_CHANGES,
        SANDBOX_CHANGES,
        (6000, 300),
        5000,
        &store,
        "off",
        &process,
    );
    start(procs, "causeway-changes", gw, GW_CHANGES);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(SANDBOX_CHANGES)["subscriptions"].as_u64() != Some(2) {
        assert!(Instant::now() < deadline, "the gateway never subscribed to the sandbox's changes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = env_num("BENCH_CHANGES_ORDERS", 200) as usize;
    let mut numbers = Vec::with_capacity(n);
    for i in 0..n {
        let opportunity = format!("CHG-{i:06}");
        let body = bench_quote().to_string().replace("OPP", &opportunity);
        let key = format!("\"{opportunity}\"");
        let headers = [
            ("content-type", "application/json"),
            ("x-api-key", "demo-crm-key"),
            ("idempotency-key", key.as_str()),
        ];
        let (status, answer) = http(GW_CHANGES, "POST", "/process/v1/quote-to-order", &headers, &body);
        assert_eq!(status, 201, "{answer}");
        let order: serde_json::Value = serde_json::from_str(&answer).unwrap();
        numbers.push(order["erpOrderNumber"].as_str().unwrap().to_string());
    }
    std::thread::sleep(Duration::from_secs(2));
    let pace = env_num("BENCH_CHANGES_PER_SECOND", 10);
    let before = stats(SANDBOX_CHANGES)["requests_total"].as_u64().unwrap();
    let started = Instant::now();
    let mut sent = std::collections::HashMap::new();
    for (i, number) in numbers.iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / pace as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        sent.insert(number.clone(), now_ms());
        let (status, answer) =
            http(SANDBOX_CHANGES, "POST", &format!("/sandbox/orders/{number}/ship"), &[], "");
        assert_eq!(status, 200, "{answer}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.lock().unwrap().shipped_at.len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reads = stats(SANDBOX_CHANGES)["requests_total"].as_u64().unwrap() - before;
    let mut latency: Vec<f64> = {
        let a = arrivals.lock().unwrap();
        sent.iter().filter_map(|(number, at)| a.shipped_at.get(number).map(|got| got - at)).collect()
    };
    latency.sort_by(|a, b| a.total_cmp(b));
    let per_change = reads as f64 / n as f64;
    println!(
        "events (3): {n} orders shipped in the ERP at {pace}/s; ERP change -> subscriber 2xx: events {}, p50 {:.1} ms, p99 {:.1} ms \
         (the sandbox notifies at once; Business Central batches for up to ~30 s more); change detection cost {reads} ERP requests \
         = {per_change:.2} per change: {:.2}% of the default budget (6,000 per 5 min) per change per minute, {:.1}% at this pace over {elapsed:.1} s",
        latency.len(),
        percentile(&latency, 0.5),
        percentile(&latency, 0.99),
        per_change / 6000.0 * 5.0 * 100.0,
        reads as f64 / (6000.0 * elapsed / 300.0) * 100.0,
    );
}
