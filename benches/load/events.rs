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

use super::process::{gateway_with_store, sandbox, script, settle, start};
use super::{cpu_ticks, env_num, wrk_with, Procs};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SANDBOX: u16 = 18190;
const GW: u16 = 18191;
const RECEIVER: u16 = 18195;

#[derive(Default)]
struct Arrivals {
    /// (arrival − event time) in ms, per 2xx-answered accepted event.
    lag_ms: Vec<f64>,
    acknowledged: usize,
    /// Event ids acknowledged, and how many arrived again after their acknowledgement.
    ids: std::collections::HashSet<String>,
    repeats: usize,
    types: std::collections::BTreeMap<String, usize>,
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
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", GW + 2)).expect("the gateway's metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// Wait until every order is final (so every event is in the outbox) and the outbox gauge has
/// caught up; returns the events waiting for the subscriber.
fn outbox_settled() -> usize {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let open: f64 = ["received", "validated", "submitted", "pending"]
            .iter()
            .map(|s| metric(&format!("causeway_process_orders{{state=\"{s}\"}}")))
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
}
