//! `scripts/bench traces`: what OTLP trace export costs the request path (events issue,
//! acceptance 6). The policies gateway (JWT + rate limit, one thread) with `traces:` off and
//! on, alternating rounds, beside the origin direct; with traces on every request is a span,
//! exported to a collector stand-in in this process that decodes each export and counts its
//! spans, so the figure says how many of the requests' spans arrived.

use super::process::report;
use super::{causeway_binary, env_num, policies, worker_pid, wrk_with, Procs, WrkResult, ORIGIN};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const GW_TRACES_OFF: u16 = 18190;
const GW_TRACES_ON: u16 = 18193;
const GW_TRACES_SAMPLED: u16 = 18196;

/// An OTLP/HTTP collector on a thread per connection: counts the spans of each export.
fn collector() -> (u16, Arc<AtomicU64>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let listener = TcpListener::bind("127.0.0.1:0").expect("collector port");
    let port = listener.local_addr().unwrap().port();
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    if let Ok(request) = ExportTraceServiceRequest::decode(body.as_slice()) {
                        let n: usize = request
                            .resource_spans
                            .iter()
                            .flat_map(|r| &r.scope_spans)
                            .map(|s| s.spans.len())
                            .sum();
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if writer.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, spans)
}

pub fn run(procs: &mut Procs, work: &Path) {
    let rounds = env_num("BENCH_ROUNDS", 3);
    let seconds = env_num("BENCH_SECONDS", 5);
    let conns = env_num("BENCH_CONNECTIONS", 50);
    let binary = causeway_binary(false).expect("the causeway binary");
    let token = policies::token();
    let block = |port: u16| {
        format!("traces:\n  endpoint: http://127.0.0.1:{port}/v1/traces\n  flush_interval_ms: 1000\n")
    };
    // One collector per tracing gateway, so each count is that gateway's.
    let (every_port, every_spans) = collector();
    let (tenth_port, tenth_spans) = collector();
    let off = policies::gateway_in(&binary, &work.join("traces-off"), GW_TRACES_OFF, false, "");
    procs.add_auth("traces-off", off, GW_TRACES_OFF, &token);
    let on = policies::gateway_in(&binary, &work.join("traces-on"), GW_TRACES_ON, false, &block(every_port));
    procs.add_auth("traces-on", on, GW_TRACES_ON, &token);
    let sampled = format!("{}  sample_ratio: 0.1\n", block(tenth_port));
    let tenth = policies::gateway_in(&binary, &work.join("traces-tenth"), GW_TRACES_SAMPLED, false, &sampled);
    procs.add_auth("traces-tenth", tenth, GW_TRACES_SAMPLED, &token);
    let origin_pid = worker_pid("origin", procs.pid("origin"));
    let targets = [
        ("(a) origin direct", ORIGIN, origin_pid),
        ("(o) traces off", GW_TRACES_OFF, procs.pid("traces-off")),
        ("(t) traces on, every span", GW_TRACES_ON, procs.pid("traces-on")),
        ("(s) traces on, sample 0.1", GW_TRACES_SAMPLED, procs.pid("traces-tenth")),
    ];
    println!("traces: JWT + rate limit, one thread, wrk -t1 -c{conns} -d{seconds}s, {rounds} alternating rounds; medians");
    let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    let mut requests = [0u64; 4];
    for _ in 0..rounds {
        for (i, (_, port, pid)) in targets.iter().enumerate() {
            let auth = (i > 0).then_some(token.as_str());
            let r = wrk_with(*port, *pid, seconds, conns, auth, "/api/v2.0/salesOrders", None);
            // wrk's count, as its rate times the run (the warm-up request aside).
            requests[i] += (r.rps * seconds as f64).round() as u64;
            results[i].push(r);
        }
    }
    // The last batch leaves at the next flush.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let rps: Vec<f64> = targets.iter().zip(&results).map(|((name, ..), rs)| report(name, rs)).collect();
    println!("ratio t/o (traces on / off): {:.3}", rps[2] / rps[1]);
    println!("ratio s/o (one trace in ten / off): {:.3}", rps[3] / rps[1]);
    for (name, counted, n) in [("(t)", &every_spans, requests[2]), ("(s)", &tenth_spans, requests[3])] {
        let received = counted.load(Ordering::Relaxed);
        println!(
            "  {name} spans received by its collector: {received} for {n} requests ({:.1} %)",
            100.0 * received as f64 / n.max(1) as f64
        );
    }
}
