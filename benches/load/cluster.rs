//! `scripts/bench cluster`: what cluster mode costs one replica (issue "cluster mode", acceptance 6).
//!
//! (1) Requests/s of one replica with its consumer rate limit in Redis against the same gateway
//!     with the limit in memory (JWT + rate limit, proxied to the nginx origin); and the same
//!     with an ERP budget on the upstream, in Redis (two round trips a request) or in memory.
//! (2) Quote-to-order orders recorded (202, `inline_wait_ms: 0`, budget not binding) on SQLite
//!     and on PostgreSQL, each gateway with its own sandbox; and on SQLite with group commit off
//!     (`store.group_commit: 1`), the baseline group commit is measured against.
//!
//! `BENCH_CLUSTER_PART=1` or `=2` runs one part only.
//!
//! Needs PostgreSQL (`CAUSEWAY_TEST_POSTGRES`, default postgres://postgres@127.0.0.1:5432/test)
//! and Redis (`CAUSEWAY_TEST_REDIS`, default redis://127.0.0.1:6379).

use super::process::{gateway_with_store, report, sandbox, script, settle, start, stats};
use super::{causeway_binary, env_num, policies, worker_pid, wrk_with, Procs, WrkResult, ORIGIN};
use std::path::Path;

const GW_LIMITS_MEMORY: u16 = 18160;
const GW_LIMITS_REDIS: u16 = 18163;
const GW_BUDGET_MEMORY: u16 = 18176;
const GW_BUDGET_REDIS: u16 = 18179;
const SANDBOX_SQLITE: u16 = 18166;
const SANDBOX_POSTGRES: u16 = 18167;
const GW_SQLITE: u16 = 18170;
const GW_POSTGRES: u16 = 18173;
const SANDBOX_SQLITE_ALONE: u16 = 18168;
const GW_SQLITE_ALONE: u16 = 18182;

fn postgres_url() -> String {
    std::env::var("CAUSEWAY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("CAUSEWAY_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn run(procs: &mut Procs, work: &Path) {
    let rounds = env_num("BENCH_ROUNDS", 3);
    let seconds = env_num("BENCH_SECONDS", 5);
    let conns = env_num("BENCH_CONNECTIONS", 50);
    let prefix = format!("causeway-bench-{}", std::process::id());
    let part = std::env::var("BENCH_CLUSTER_PART").unwrap_or_default();
    if part != "2" {
        limits(procs, work, (rounds, seconds, conns), &prefix);
    }
    if part != "1" {
        orders(procs, work, (rounds, seconds, conns));
    }
}

/// (1) Consumer limits (and the ERP budget) in memory and in Redis.
fn limits(procs: &mut Procs, work: &Path, (rounds, seconds, conns): (u64, u64, u64), prefix: &str) {
    let binary = causeway_binary(false).expect("the causeway binary");
    let token = policies::token();
    let redis_block = format!(
        "cluster:\n  replicas: 1\n  redis: {{ url: \"{}\", key_prefix: \"{prefix}\" }}\n",
        redis_url()
    );
    let gateways: [(&'static str, u16, bool, &str); 4] = [
        ("limits-memory", GW_LIMITS_MEMORY, false, ""),
        ("limits-redis", GW_LIMITS_REDIS, false, &redis_block),
        ("budget-memory", GW_BUDGET_MEMORY, true, ""),
        ("budget-redis", GW_BUDGET_REDIS, true, &redis_block),
    ];
    for (name, port, budget, extra) in gateways {
        let child = policies::gateway_in(&binary, &work.join(name), port, budget, extra);
        procs.add_auth(name, child, port, &token);
    }
    let origin_pid = worker_pid("origin", procs.pid("origin"));
    let targets = [
        ("(a) origin direct", ORIGIN, origin_pid),
        ("(m) quota in memory", GW_LIMITS_MEMORY, procs.pid("limits-memory")),
        ("(r) quota in Redis", GW_LIMITS_REDIS, procs.pid("limits-redis")),
        ("(M) quota+budget in memory", GW_BUDGET_MEMORY, procs.pid("budget-memory")),
        ("(R) quota+budget in Redis", GW_BUDGET_REDIS, procs.pid("budget-redis")),
    ];
    println!("cluster (1): JWT + rate limit (+ ERP budget), one thread, wrk -t1 -c{conns} -d{seconds}s, {rounds} alternating rounds; medians");
    let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (_, port, pid)) in targets.iter().enumerate() {
            let auth = (i > 0).then_some(token.as_str());
            results[i].push(wrk_with(*port, *pid, seconds, conns, auth, "/api/v2.0/salesOrders", None));
        }
    }
    let rps: Vec<f64> = targets.iter().zip(&results).map(|((name, ..), rs)| report(name, rs)).collect();
    println!("ratio r/m (consumer quota in Redis / in memory): {:.3}", rps[2] / rps[1]);
    println!("ratio R/M (quota and ERP budget in Redis / in memory): {:.3}", rps[4] / rps[3]);
}

/// (2) Orders recorded on SQLite and on PostgreSQL.
fn orders(procs: &mut Procs, work: &Path, (rounds, seconds, conns): (u64, u64, u64)) {
    let unbound = (10_000_000, 60);
    start(procs, "sandbox-sqlite", sandbox(SANDBOX_SQLITE, unbound.0, unbound.1), SANDBOX_SQLITE);
    start(procs, "sandbox-postgres", sandbox(SANDBOX_POSTGRES, unbound.0, unbound.1), SANDBOX_POSTGRES);
    let sqlite_store = "store: { path: data/orders.db, synchronous: full }\n";
    let gw =
        gateway_with_store(work, "gw-sqlite", GW_SQLITE, SANDBOX_SQLITE, unbound, 0, sqlite_store, "off");
    start(procs, "causeway-sqlite", gw, GW_SQLITE);
    start(
        procs,
        "sandbox-sqlite-alone",
        sandbox(SANDBOX_SQLITE_ALONE, unbound.0, unbound.1),
        SANDBOX_SQLITE_ALONE,
    );
    let alone = "store: { path: data/orders.db, synchronous: full, group_commit: 1 }\n";
    let gw = gateway_with_store(
        work,
        "gw-sqlite-alone",
        GW_SQLITE_ALONE,
        SANDBOX_SQLITE_ALONE,
        unbound,
        0,
        alone,
        "off",
    );
    start(procs, "causeway-sqlite-alone", gw, GW_SQLITE_ALONE);
    // A fresh schema per run, so the figure does not depend on earlier runs' rows.
    let schema = format!("causeway_bench_{}", std::process::id());
    let created = std::process::Command::new("psql")
        .arg(postgres_url())
        .args(["-q", "-c", &format!("CREATE SCHEMA {schema}")])
        .status();
    assert!(created.is_ok_and(|s| s.success()), "psql could not create a schema at {}", postgres_url());
    let pg_store = format!(
        "store: {{ backend: postgres, url: \"{}?options[search_path]={schema}\" }}\n",
        postgres_url()
    );
    let gw =
        gateway_with_store(work, "gw-postgres", GW_POSTGRES, SANDBOX_POSTGRES, unbound, 0, &pg_store, "off");
    start(procs, "causeway-postgres", gw, GW_POSTGRES);
    let targets = [
        ("(s) recorded on SQLite", GW_SQLITE, procs.pid("causeway-sqlite"), SANDBOX_SQLITE),
        ("(p) recorded on PostgreSQL", GW_POSTGRES, procs.pid("causeway-postgres"), SANDBOX_POSTGRES),
        (
            "(1) SQLite, group_commit 1",
            GW_SQLITE_ALONE,
            procs.pid("causeway-sqlite-alone"),
            SANDBOX_SQLITE_ALONE,
        ),
    ];
    println!("cluster (2): unique quotes, 202 (inline_wait_ms 0), one thread, wrk -t1 -c{conns} -d{seconds}s, {rounds} alternating rounds; medians");
    let mut results: Vec<Vec<WrkResult>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (_, port, pid, sandbox_port)) in targets.iter().enumerate() {
            let script = script(work, &format!("C{round}T{i}"));
            let r = wrk_with(*port, *pid, seconds, conns, None, "/process/v1/quote-to-order", Some(&script));
            settle(*sandbox_port);
            results[i].push(r);
        }
    }
    // The same SQLite gateway at fewer connections: 50 closed-loop connections at 2,000/s wait
    // 25 ms on average by Little's law, so the p99 target is read at this concurrency.
    let few = env_num("BENCH_LATENCY_CONNECTIONS", 16);
    let mut at_few = Vec::new();
    for round in 0..rounds {
        let script = script(work, &format!("L{round}"));
        let (_, port, pid, sandbox_port) = targets[0];
        at_few.push(wrk_with(port, pid, seconds, few, None, "/process/v1/quote-to-order", Some(&script)));
        settle(sandbox_port);
    }
    let rps: Vec<f64> = targets.iter().zip(&results).map(|((name, ..), rs)| report(name, rs)).collect();
    report(&format!("(s) SQLite, -c{few}"), &at_few);
    println!("ratio p/s (PostgreSQL / SQLite): {:.3}", rps[1] / rps[0]);
    println!("ratio s/1 (SQLite, group commit on / off): {:.3}", rps[0] / rps[2]);
    for (name, port) in [("(s)", SANDBOX_SQLITE), ("(p)", SANDBOX_POSTGRES), ("(1)", SANDBOX_SQLITE_ALONE)] {
        let st = stats(port);
        println!(
            "  {name} sandbox: orders created {}, duplicate external references {}, 429s {}",
            st["orders_created"], st["duplicate_external_document_numbers"], st["rejected_429"]["total"]
        );
    }
    let _ = std::process::Command::new("psql")
        .arg(postgres_url())
        .args(["-q", "-c", &format!("DROP SCHEMA {schema} CASCADE")])
        .status();
}
