//! `scripts/bench tls`: what TLS costs at the edge. One Causeway (one worker thread) with a
//! plain listener and a TLS listener side by side, and nginx (one worker) with a plain and a TLS
//! listener on the same certificate (ECDSA P-256, TLS 1.3), both in front of the same origin,
//! alternating rounds. Three loads on each TLS listener: HTTP/1.1 keep-alive (wrk over https),
//! HTTP/2 (h2load, ten streams per connection) and a new connection per request (wrk with
//! `Connection: close`: one full handshake each, no resumption), plus the plain listeners, so
//! the plain path is measured in the same run. nginx's `keepalive_requests` is raised from its
//! 1,000 (which also ends an HTTP/2 connection after 1,000 streams: h2load does not reconnect)
//! so neither side closes connections during a run.

use super::{env_num, median, nginx_bin, spawn, wait_port, worker_pid, wrk_tls, Procs, ORIGIN};
use std::path::Path;
use std::process::Command;

const GW_PLAIN: u16 = 18240;
const GW_TLS: u16 = 18243;
const NGINX_PLAIN: u16 = 18250;
const NGINX_TLS: u16 = 18251;

fn certificate(work: &Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let (cert_path, key_path) = (work.join("edge.pem"), work.join("edge.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path.display().to_string(), key_path.display().to_string())
}

fn gateway(work: &Path, cert: &str, key: &str) -> std::process::Child {
    let dir = work.join("gateway-tls");
    std::fs::create_dir_all(dir.join("routes")).unwrap();
    std::fs::write(
        dir.join("causeway.yaml"),
        format!(
            "listen:\n  proxy: 127.0.0.1:{GW_PLAIN}\n  admin: 127.0.0.1:{}\n  metrics: 127.0.0.1:{}\n  \
             tls:\n    - address: 127.0.0.1:{GW_TLS}\n      certificates: [{{ cert: \"{cert}\", key: \"{key}\" }}]\n\
             threads: 1\nupstreams:\n  origin:\n    url: http://127.0.0.1:{ORIGIN}\n",
            GW_TLS + 1,
            GW_TLS + 2,
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("routes/all.yaml"),
        "routes:\n  - name: all\n    match: { path: \"/{*rest}\" }\n    upstream: origin\n",
    )
    .unwrap();
    spawn(Command::new(env!("CARGO_BIN_EXE_causeway")).args(["serve", "-c"]).arg(&dir))
}

fn nginx(work: &Path, cert: &str, key: &str) -> std::process::Child {
    let conf = work.join("tls.nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {work}/tls-nginx.pid;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  upstream erp {{ server 127.0.0.1:{ORIGIN}; keepalive 64; }}\n  server {{\n    \
             listen 127.0.0.1:{NGINX_PLAIN} reuseport backlog=4096;\n    \
             listen 127.0.0.1:{NGINX_TLS} ssl http2 reuseport backlog=4096;\n    \
             ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    \
             ssl_session_cache off;\n    ssl_session_tickets off;\n    \
             keepalive_requests 1000000;\n    \
             location / {{ proxy_pass http://erp; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            work = work.display()
        ),
    )
    .unwrap();
    spawn(
        Command::new(nginx_bin())
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(work)
            .arg("-e")
            .arg(work.join("tls-error.log")),
    )
}

/// h2load over TLS (ALPN h2): requests per second and failed requests.
fn h2load(port: u16, seconds: u64, connections: u64) -> (f64, u64) {
    let out = Command::new("h2load")
        .args(["-c", &connections.to_string(), "-m", "10", "-D", &seconds.to_string(), "-t", "1"])
        .arg(format!("https://localhost:{port}/api/v2.0/salesOrders"))
        .output()
        .expect("h2load (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Application protocol: h2"), "h2load did not negotiate h2:\n{text}");
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("unexpected h2load output:\n{text}"));
    let failed = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests:"))
        .and_then(|l| l.split(',').find_map(|p| p.trim().strip_suffix(" failed")?.parse().ok()))
        .unwrap_or(0);
    (rps, failed)
}

pub fn run(procs: &mut Procs, work: &Path) {
    let (cert, key) = certificate(work);
    procs.list.push(("causeway", gateway(work, &cert, &key), GW_PLAIN));
    wait_port(GW_PLAIN, "causeway");
    wait_port(GW_TLS, "causeway tls");
    procs.list.push(("nginx", nginx(work, &cert, &key), NGINX_PLAIN));
    wait_port(NGINX_PLAIN, "nginx");
    wait_port(NGINX_TLS, "nginx tls");
    let rounds = env_num("BENCH_ROUNDS", 3);
    let seconds = env_num("BENCH_SECONDS", 5);
    let conns = env_num("BENCH_CONNECTIONS", 50);
    println!(
        "tls: {rounds} alternating rounds of {seconds}s, {conns} connections, one worker per target; medians"
    );
    // (label, target, port, kind)
    let loads: [(&str, &str, u16, &str); 8] = [
        ("causeway plain h1", "causeway", GW_PLAIN, "plain"),
        ("nginx plain h1", "nginx", NGINX_PLAIN, "plain"),
        ("causeway tls h1", "causeway", GW_TLS, "keepalive"),
        ("nginx tls h1", "nginx", NGINX_TLS, "keepalive"),
        ("causeway tls h2", "causeway", GW_TLS, "h2"),
        ("nginx tls h2", "nginx", NGINX_TLS, "h2"),
        ("causeway handshakes", "causeway", GW_TLS, "handshake"),
        ("nginx handshakes", "nginx", NGINX_TLS, "handshake"),
    ];
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); loads.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); loads.len()];
    let mut errors = vec![0u64; loads.len()];
    for round in 0..rounds {
        for (i, (label, target, port, kind)) in loads.iter().enumerate() {
            let pid = worker_pid(target, procs.pid(target));
            let (r, c, e) = match *kind {
                "h2" => {
                    let before = super::cpu_ticks(pid);
                    let (r, failed) = h2load(*port, seconds, conns);
                    (r, super::cpu_us(pid, before, r * seconds as f64), failed)
                }
                _ => {
                    let scheme = if *kind == "plain" { "http" } else { "https" };
                    let close = *kind == "handshake";
                    // A new connection per request: fewer connections keep the client's side
                    // of the handshakes from being what is measured.
                    let c = if close { conns.min(16) } else { conns };
                    let w = wrk_tls(*port, pid, seconds, c, scheme, close);
                    (w.rps, w.cpu_us, w.errors)
                }
            };
            eprintln!("  round {} {label:<20} {r:>9.0} req/s  cpu {c:>6.1} us/req  errors {e}", round + 1);
            rps[i].push(r);
            cpu[i].push(c);
            errors[i] += e;
        }
    }
    let med: Vec<f64> = rps.into_iter().map(median).collect();
    let cpus: Vec<f64> = cpu.into_iter().map(median).collect();
    for (i, (label, ..)) in loads.iter().enumerate() {
        let unit = if loads[i].3 == "handshake" { "handshakes/s" } else { "req/s" };
        println!("{label:<20} {:>9.0} {unit:<12}  cpu {:>6.1} us/req  errors {}", med[i], cpus[i], errors[i]);
    }
    for (pair, what) in [(0, "plain h1"), (2, "tls h1 keep-alive"), (4, "tls h2"), (6, "new TLS connections")]
    {
        println!(
            "ratio causeway/nginx, {what:<20} {:.2}  cpu per request {:.2}",
            med[pair] / med[pair + 1],
            cpus[pair] / cpus[pair + 1]
        );
    }
    println!("ratio causeway tls h1 / causeway plain h1: {:.2}", med[2] / med[0]);
    println!("ratio nginx tls h1 / nginx plain h1:       {:.2}", med[3] / med[1]);
}
