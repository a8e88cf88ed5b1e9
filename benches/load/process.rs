//! `scripts/bench process`: the quote-to-order process API.
//!
//! (1) Validated orders per second accepted into the durable store, ERP budget not binding: wrk
//!     POSTs unique quotes (own Idempotency-Key and opportunity each). Three gateways: one answers
//!     202 as soon as the order is recorded (`inline_wait_ms: 0`, delivery in the background),
//!     the same with `store.synchronous: normal` instead of the default `full`, and one that waits
//!     for the ERP and answers 201. Baseline in the same run: the origin direct.
//! (2) ERP budget utilisation when the budget binds: the gateway's budget and the sandbox's
//!     own limit are the same sliding window; orders arrive faster than the budget allows. Over
//!     two windows of steady state: sandbox request rate / budget, and the 429s the sandbox sent.
//!     Twice: pacing off (the default, right for Business Central's window) and `pacing: smooth`.

use super::*;
use serde_json::Value;

const SANDBOX_FAST: u16 = 18120;
const SANDBOX_BOUND: u16 = 18121;
const SANDBOX_INLINE: u16 = 18131;
const SANDBOX_NORMAL: u16 = 18132;
const GW_202_NORMAL: u16 = 18135;
const GW_202: u16 = 18122;
const GW_201: u16 = 18125;
const GW_BOUND: u16 = 18128;
const SANDBOX_PACED: u16 = 18140;
const GW_PACED: u16 = 18143;
const TOKEN: &str = "bench-sandbox-token";
const COMPANY: &str = "3f1d8a52-4c1e-4d2a-9b8e-5a3c2b1d0e01";

/// The sandbox's log, kept after the run (the work directory is not).
fn sandbox_log(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("causeway-bench-sandbox-{port}.log"))
}

pub(super) fn sandbox(port: u16, window_requests: u32, window_seconds: u64) -> Child {
    let log = std::fs::File::create(sandbox_log(port)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_causeway"))
        .args(["sandbox", "--listen", &format!("127.0.0.1:{port}"), "--token", TOKEN])
        .args(["--window-requests", &window_requests.to_string()])
        .args(["--window-seconds", &window_seconds.to_string()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the sandbox")
}

/// A gateway with the shipped process routes, rules and mappings in front of `sandbox`.
#[allow(clippy::too_many_arguments)]
fn gateway(
    work: &Path,
    name: &str,
    port: u16,
    sandbox: u16,
    budget: (u32, u64),
    inline_wait_ms: u64,
    synchronous: &str,
    pacing: &str,
) -> Child {
    let store = format!("store: {{ path: data/orders.db, synchronous: {synchronous} }}\n");
    gateway_with_store(work, name, port, sandbox, budget, inline_wait_ms, &store, pacing)
}

/// [`gateway`] with `store` as causeway.yaml's `store:` block (and anything after it).
#[allow(clippy::too_many_arguments)]
pub(super) fn gateway_with_store(
    work: &Path,
    name: &str,
    port: u16,
    sandbox: u16,
    budget: (u32, u64),
    inline_wait_ms: u64,
    store: &str,
    pacing: &str,
) -> Child {
    gateway_with_process(work, name, port, sandbox, budget, inline_wait_ms, store, pacing, "")
}

/// [`gateway_with_store`] with more settings under `process:` (indented two spaces).
#[allow(clippy::too_many_arguments)]
pub(super) fn gateway_with_process(
    work: &Path,
    name: &str,
    port: u16,
    sandbox: u16,
    budget: (u32, u64),
    inline_wait_ms: u64,
    store: &str,
    pacing: &str,
    process_extra: &str,
) -> Child {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = work.join(name);
    std::fs::create_dir_all(dir.join("routes")).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::copy(repo.join("routes/process.yaml"), dir.join("routes/process.yaml")).unwrap();
    std::fs::copy(repo.join("policies/mediation.yaml"), dir.join("policies/mediation.yaml")).unwrap();
    // The consumer quota is not what is measured here.
    let crm = std::fs::read_to_string(repo.join("policies/crm.yaml")).unwrap().replace(
        "requests: 6000, window_seconds: 60, burst: 500",
        "requests: 1000000, window_seconds: 1, burst: 1000000",
    );
    std::fs::write(dir.join("policies/crm.yaml"), crm).unwrap();
    for sub in ["schemas", "mappings", "process"] {
        mediation::copy_tree(&repo.join("policies").join(sub), &dir.join("policies").join(sub));
    }
    let (window_requests, window_seconds) = budget;
    // The figures are for one proxy thread unless BENCH_GATEWAY_THREADS says otherwise.
    let threads = super::env_num("BENCH_GATEWAY_THREADS", 1);
    std::fs::write(
        dir.join("causeway.yaml"),
        format!(
            "listen: {{ proxy: 127.0.0.1:{port}, admin: 127.0.0.1:{}, metrics: 127.0.0.1:{} }}\n\
             threads: {threads}\n\
             upstreams:\n  bc:\n    url: http://127.0.0.1:{sandbox}\n    credentials: {{ bearer: {{ token: {TOKEN} }} }}\n\
             \x20   budget:\n      window_requests: {window_requests}\n      window_seconds: {window_seconds}\n      window_margin_ms: 100\n      pacing: {pacing}\n      max_concurrent: 5\n      queue: 100000\n\
             \x20     classes: {{ write: {{ priority: 0, max_wait_ms: 600000 }}, interactive: {{ priority: 1, max_wait_ms: 600000 }} }}\n      default_class: interactive\n\
             {store}\
             process:\n  erp: bc\n  company: {COMPANY}\n  delivery: {{ inline_wait_ms: {inline_wait_ms}, max_attempts: 1000, backoff_initial_ms: 200, backoff_max_ms: 2000 }}\n{process_extra}",
            port + 1,
            port + 2
        ),
    )
    .unwrap();
    spawn(Command::new(env!("CARGO_BIN_EXE_causeway")).args(["serve", "-c"]).arg(&dir))
}

/// A wrk script POSTing a fresh quote per request: `prefix` keeps runs apart.
pub(super) fn script(work: &Path, prefix: &str) -> PathBuf {
    let quote = bench_quote();
    let template = serde_json::to_string(&quote).unwrap().replace('\\', "\\\\").replace('"', "\\\"");
    let path = work.join(format!("quote-{prefix}.lua"));
    std::fs::write(
        &path,
        format!(
            "local n = 0\n\
             wrk.method = \"POST\"\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"x-api-key\"] = \"demo-crm-key\"\n\
             request = function()\n\
             \x20 n = n + 1\n\
             \x20 local id = string.format(\"{prefix}-%09d\", n)\n\
             \x20 wrk.headers[\"Idempotency-Key\"] = '\"' .. id .. '\"'\n\
             \x20 local body = string.gsub(\"{template}\", \"OPP\", id)\n\
             \x20 return wrk.format(nil, nil, nil, body)\n\
             end\n"
        ),
    )
    .unwrap();
    path
}

/// The quote the benches send (every rule accepts it); `OPP` is replaced per request.
pub(super) fn bench_quote() -> Value {
    serde_json::json!({
        "opportunityId": "OPP", "customer": {"number": "C10000"}, "currency": "EUR", "region": "EU",
        "paymentTerms": "NET30", "contract": {"startDate": "2026-12-01", "endDate": "2028-11-30"},
        "lines": [{"product": "1900-S", "quantity": 2, "unitPrice": 18.39, "discountPercent": 5},
                  {"product": "1904-W", "quantity": 1, "unitPrice": 91.25}]
    })
}

/// Wait until the sandbox stops receiving orders (the gateway's backlog is delivered).
pub(super) fn settle(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = stats(port)["orders_created"].as_u64();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1000));
        let now = stats(port)["orders_created"].as_u64();
        if now == last {
            return;
        }
        last = now;
    }
}

pub(super) fn stats(port: u16) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("sandbox on {port}: {e}; its log: {}", sandbox_log(port).display()));
    s.write_all(b"GET /sandbox/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("stats: {e}: {text}"))
}

/// Print the medians of `rs` as one line under `name`; returns the median requests/s.
pub(super) fn report(name: &str, rs: &[WrkResult]) -> f64 {
    let rps = median(rs.iter().map(|r| r.rps).collect());
    println!(
        "{name:<28} {rps:>8.0} req/s  cpu {:>6.1} us/req  p50 {:>7.3} ms  p99 {:>7.3} ms  non-2xx {}",
        median(rs.iter().map(|r| r.cpu_us).collect()),
        median(rs.iter().map(|r| r.p50_ms).collect()),
        median(rs.iter().map(|r| r.p99_ms).collect()),
        rs.iter().map(|r| r.errors).sum::<u64>()
    );
    rps
}

/// Register and wait for a listener (these targets do not answer the generic warm-up GET).
pub(super) fn start(procs: &mut Procs, name: &'static str, child: Child, port: u16) {
    procs.list.push((name, child, port));
    wait_port(port, name);
}

pub fn run(procs: &mut Procs, work: &Path) {
    // One sandbox per gateway, and each run's background deliveries finish before the next
    // run starts: no target pays for another's backlog.
    let unbound = (10_000_000, 60);
    start(procs, "sandbox-fast", sandbox(SANDBOX_FAST, unbound.0, unbound.1), SANDBOX_FAST);
    start(procs, "sandbox-inline", sandbox(SANDBOX_INLINE, unbound.0, unbound.1), SANDBOX_INLINE);
    start(procs, "sandbox-normal", sandbox(SANDBOX_NORMAL, unbound.0, unbound.1), SANDBOX_NORMAL);
    start(
        procs,
        "causeway-202",
        gateway(work, "gw-202", GW_202, SANDBOX_FAST, unbound, 0, "full", "off"),
        GW_202,
    );
    let normal = gateway(work, "gw-202-normal", GW_202_NORMAL, SANDBOX_NORMAL, unbound, 0, "normal", "off");
    start(procs, "causeway-202-normal", normal, GW_202_NORMAL);
    start(
        procs,
        "causeway-201",
        gateway(work, "gw-201", GW_201, SANDBOX_INLINE, unbound, 5000, "full", "off"),
        GW_201,
    );

    let rounds = env_num("BENCH_ROUNDS", 3);
    let seconds = env_num("BENCH_SECONDS", 5);
    let conns = env_num("BENCH_CONNECTIONS", 50);
    let origin_pid = worker_pid("origin", procs.pid("origin"));
    let targets: [(&str, u16, u32, &str); 4] = [
        ("(a) origin direct", ORIGIN, origin_pid, "/api/v2.0/salesOrders"),
        ("(s) recorded, 202", GW_202, procs.pid("causeway-202"), "/process/v1/quote-to-order"),
        (
            "(n) recorded, 202, sync normal",
            GW_202_NORMAL,
            procs.pid("causeway-202-normal"),
            "/process/v1/quote-to-order",
        ),
        ("(e) ERP accepted, 201", GW_201, procs.pid("causeway-201"), "/process/v1/quote-to-order"),
    ];
    println!(
        "process (1): unique quotes, wrk -t1 -c{conns} -d{seconds}s, {rounds} alternating rounds; medians"
    );
    println!("  cpu is the gateway process's (incl. its delivery worker and SQLite), per request");
    let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, port, pid, path)) in targets.iter().enumerate() {
            let script = (i > 0).then(|| script(work, &format!("R{round}T{i}")));
            let r = wrk_with(*port, *pid, seconds, conns, None, path, script.as_deref());
            match i {
                1 => settle(SANDBOX_FAST),
                2 => settle(SANDBOX_NORMAL),
                3 => settle(SANDBOX_INLINE),
                _ => {}
            }
            eprintln!(
                "  round {} {name:<22} {:>8.0} req/s  cpu {:>6.1} us/req  p50 {:.3} ms  p99 {:.3} ms  non-2xx {}",
                round + 1, r.rps, r.cpu_us, r.p50_ms, r.p99_ms, r.errors
            );
            results[i].push(r);
        }
    }
    let rps: Vec<f64> = targets.iter().zip(&results).map(|((name, ..), rs)| report(name, rs)).collect();
    println!("ratio s/a (orders recorded / origin req/s): {:.3}", rps[1] / rps[0]);
    println!("ratio s/n (synchronous full / normal): {:.3}", rps[1] / rps[2]);
    println!("ratio e/a (orders accepted by the ERP / origin req/s): {:.3}", rps[3] / rps[0]);
    for (name, port) in [("(s)", SANDBOX_FAST), ("(n)", SANDBOX_NORMAL), ("(e)", SANDBOX_INLINE)] {
        let st = stats(port);
        println!(
            "  {name} sandbox: orders created {}, duplicate external references {}, 429s {}",
            st["orders_created"], st["duplicate_external_document_numbers"], st["rejected_429"]["total"]
        );
    }

    // (2) The budget binds: 300 requests per 10 s at the gateway and at the sandbox.
    let (window_requests, window_seconds) =
        (env_num("BENCH_BUDGET_REQUESTS", 300) as u32, env_num("BENCH_BUDGET_SECONDS", 10));
    let windows = env_num("BENCH_BUDGET_WINDOWS", 2);
    for (pacing, sandbox_port, gw_port) in
        [("off", SANDBOX_BOUND, GW_BOUND), ("smooth", SANDBOX_PACED, GW_PACED)]
    {
        let (sandbox_name, gw_name) = if pacing == "off" {
            ("sandbox-bound", "causeway-bound")
        } else {
            ("sandbox-paced", "causeway-paced")
        };
        start(procs, sandbox_name, sandbox(sandbox_port, window_requests, window_seconds), sandbox_port);
        let budget = (window_requests, window_seconds);
        let gw = gateway(work, gw_name, gw_port, sandbox_port, budget, 0, "full", pacing);
        start(procs, gw_name, gw, gw_port);
        budget_utilisation(procs, work, gw_name, gw_port, sandbox_port, budget, windows, pacing);
    }
}

/// Orders faster than the budget allows; over `windows` windows after the first, the ERP
/// requests the sandbox saw against the budget, and its 429s.
#[allow(clippy::too_many_arguments)]
fn budget_utilisation(
    procs: &Procs,
    work: &Path,
    gw_name: &str,
    gw_port: u16,
    sandbox_port: u16,
    (window_requests, window_seconds): (u32, u64),
    windows: u64,
    pacing: &str,
) {
    let total = window_seconds * (windows + 1);
    println!(
        "process (2), pacing {pacing}: budget {window_requests} requests / {window_seconds} s (margin 100 ms) at the \
         gateway and the sandbox; orders from wrk -c8 for {total} s; measured over {windows} windows after the first"
    );
    let script = script(work, &format!("BOUND-{pacing}"));
    let pid = procs.pid(gw_name);
    let load = std::thread::spawn(move || {
        wrk_with(gw_port, pid, total, 8, None, "/process/v1/quote-to-order", Some(&script))
    });
    std::thread::sleep(Duration::from_secs(window_seconds));
    let before = stats(sandbox_port);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(window_seconds * windows));
    let after = stats(sandbox_port);
    let elapsed = started.elapsed().as_secs_f64();
    let submitted = load.join().unwrap();
    let sent = after["requests_total"].as_f64().unwrap() - before["requests_total"].as_f64().unwrap();
    let allowed = window_requests as f64 * elapsed / window_seconds as f64;
    println!(
        "ERP requests {sent:.0} in {elapsed:.1} s = {:.2} req/s; budget {:.2} req/s; utilisation {:.1} %",
        sent / elapsed,
        window_requests as f64 / window_seconds as f64,
        100.0 * sent / allowed
    );
    println!(
        "429s from the sandbox: {} (whole run); orders created {}; duplicates {}; orders submitted {:.0} ({:.0}/s, non-2xx {})",
        after["rejected_429"]["total"],
        after["orders_created"],
        after["duplicate_external_document_numbers"],
        submitted.rps * total as f64,
        submitted.rps,
        submitted.errors
    );
}
