//! The quote-to-order suite against a real ERP: Tryton 7.0 from PyPI (scripts/tryton), one
//! server per test on its own copy of the seeded database. Tryton's own records are the judge:
//! sales are counted by their `reference` (the opportunity id).
//!
//! Needs python3 with venv and pip, and PyPI; without python3 the tests are skipped with a
//! message. The venv and the seeded database are kept under the target directory.

mod common;

use common::process::*;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BLOCKED_CATEGORY: i64 = 1;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv and a seeded database to copy, built once per test binary; `None` without python3.
fn prepared() -> Option<&'static (PathBuf, PathBuf)> {
    static PREPARED: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    PREPARED
        .get_or_init(|| {
            if Command::new("python3").arg("--version").output().is_err() {
                eprintln!("SKIPPED: the Tryton tests need python3 (with venv and pip) and PyPI");
                return None;
            }
            let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let venv = target.join("venv-tryton");
            let requirements = repo().join("scripts/tryton/requirements.txt");
            let stamp = venv.join("requirements.txt");
            let wanted = std::fs::read(&requirements).unwrap();
            if std::fs::read(&stamp).ok() != Some(wanted.clone()) {
                let _ = std::fs::remove_dir_all(&venv);
                let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap();
                assert!(made.success(), "python3 -m venv failed (Debian: apt install python3-venv)");
                let pip = Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", "-r"])
                    .arg(&requirements)
                    .status()
                    .unwrap();
                assert!(
                    pip.success(),
                    "pip install -r scripts/tryton/requirements.txt failed: PyPI must be reachable"
                );
                std::fs::write(&stamp, wanted).unwrap();
            }
            let base = target.join("tryton-seed");
            let setup = Command::new(venv.join("bin/python"))
                .arg(repo().join("scripts/tryton/setup.py"))
                .arg("--data-dir")
                .arg(&base)
                .arg("--reuse")
                .output()
                .unwrap();
            assert!(setup.status.success(), "setup.py failed:\n{}", String::from_utf8_lossy(&setup.stderr));
            Some((venv, base))
        })
        .as_ref()
}

/// trytond on a fresh copy of the seeded database.
struct TrytonServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    venv: PathBuf,
}

impl TrytonServer {
    fn start() -> Option<TrytonServer> {
        let (venv, base) = prepared()?;
        let dir = tempfile::tempdir().unwrap();
        for file in ["causeway.sqlite.seed", "causeway.sqlite.seed.key"] {
            std::fs::copy(base.join(file), dir.path().join(file)).unwrap();
        }
        let port = free_port();
        let setup = Command::new(venv.join("bin/python"))
            .arg(repo().join("scripts/tryton/setup.py"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--reuse"])
            .output()
            .unwrap();
        assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));
        let mut server = TrytonServer { child: None, port, dir, venv: venv.clone() };
        server.run();
        Some(server)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Start trytond and wait until it answers JSON-RPC.
    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("trytond.log"))
            .unwrap();
        let child = Command::new(repo().join("scripts/tryton/serve.sh"))
            .arg(self.dir.path())
            .arg(format!("127.0.0.1:{}", self.port))
            .env("CAUSEWAY_TRYTON_VENV", &self.venv)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.answers() {
                return;
            }
            assert!(Instant::now() < deadline, "trytond did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `common.server.version` answers (plain std HTTP: this runs outside any runtime).
    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let body = r#"{"id": 0, "method": "common.server.version", "params": []}"#;
        let request = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut answer = String::new();
        s.write_all(request.as_bytes()).is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.contains("\"result\"")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("trytond.log")).unwrap_or_default()
    }
}

impl Drop for TrytonServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Tryton as its administrator sees it: to count sales and to fix master data.
struct Admin {
    url: String,
    auth: String,
}

impl Admin {
    async fn login(tryton: &TrytonServer) -> Admin {
        let url = format!("{}/causeway/", tryton.url());
        let answer: Value = reqwest::Client::new()
            .post(&url)
            .json(&json!({"id": 1, "method": "common.db.login", "params": ["admin", {"password": "causeway-admin"}, "en"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        use base64::Engine;
        let (user, session) = (answer["result"][0].as_i64().unwrap(), answer["result"][1].as_str().unwrap());
        let token = base64::engine::general_purpose::STANDARD.encode(format!("admin:{user}:{session}"));
        Admin { url, auth: format!("Session {token}") }
    }

    async fn call(&self, method: &str, mut params: Vec<Value>) -> Value {
        params.push(json!({"company": 1}));
        let answer: Value = reqwest::Client::new()
            .post(&self.url)
            .header("authorization", &self.auth)
            .json(&json!({"id": 2, "method": method, "params": params}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// Sales by reference, with their state.
    async fn sales(&self) -> HashMap<String, Vec<String>> {
        let sales = self
            .call(
                "model.sale.sale.search_read",
                vec![json!([]), json!(0), json!(null), json!(null), json!(["reference", "state"])],
            )
            .await;
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for s in sales.as_array().unwrap() {
            out.entry(s["reference"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(s["state"].as_str().unwrap().to_string());
        }
        out
    }

    async fn party_id(&self, code: &str) -> i64 {
        let found = self
            .call(
                "model.party.party.search",
                vec![json!([["code", "=", code]]), json!(0), json!(1), json!(null)],
            )
            .await;
        found[0].as_i64().unwrap()
    }

    async fn write_party(&self, code: &str, values: Value) {
        let id = self.party_id(code).await;
        self.call("model.party.party.write", vec![json!([id]), values]).await;
    }
}

fn options(tryton: &TrytonServer, delivery: &str) -> GatewayOptions {
    let mut o = process_options(
        tryton.url(),
        &format!(
            "  erp: bc\n  adapter: tryton\n  tryton: {{ database: causeway, login: causeway, password: causeway-api }}\n  delivery: {delivery}\n"
        ),
    );
    // Tryton on SQLite serialises writes: fewer at once, longer waits.
    o.upstream_extra = o
        .upstream_extra
        .replace("max_concurrent: 5", "max_concurrent: 4")
        .replace("max_wait_ms: 2000", "max_wait_ms: 10000");
    o
}

const FAST: &str =
    "{ max_attempts: 100, backoff_initial_ms: 100, backoff_max_ms: 1000, inline_wait_ms: 5000 }";

macro_rules! tryton_or_skip {
    () => {
        match {
            install_tls_provider();
            tokio::task::spawn_blocking(TrytonServer::start).await.unwrap()
        } {
            Some(t) => t,
            None => return,
        }
    };
}

#[tokio::test]
async fn tryton_a_quote_becomes_one_confirmed_sale_and_each_rule_refuses_alone() {
    let tryton = tryton_or_skip!();
    let admin = Admin::login(&tryton).await;
    // The seed's blocked customer also has no credit; give it credit so only the block counts.
    admin
        .write_party("C10050", json!({"credit_limit_amount": {"__class__": "Decimal", "decimal": "500000"}}))
        .await;
    let gw = TestGateway::start(options(&tryton, FAST)).await;
    let client = reqwest::Client::new();

    let cases: Vec<(&str, &str, Value)> = vec![
        ("/customer/number", "customer.not_found", json!({"customer": {"number": "C99999"}})),
        ("/customer/number", "customer.blocked", json!({"customer": {"number": "C10050"}})),
        (
            "/customer/number",
            "customer.incomplete_billing_address",
            json!({"customer": {"number": "C10100"}, "region": "US", "currency": "USD",
                   "lines": [{"product": "1900-S", "quantity": 2, "unitPrice": 19.99}]}),
        ),
        (
            "/lines/0/product",
            "product.not_salable",
            json!({"lines": [{"product": "2080-W", "quantity": 1, "unitPrice": 536.86}]}),
        ),
        (
            "/lines/0/product",
            "product.not_allowed_in_region",
            json!({"lines": [{"product": "2028-S", "quantity": 1, "unitPrice": 1054.07}]}),
        ),
        (
            "/lines/0/product",
            "product.not_found",
            json!({"lines": [{"product": "NO-SUCH", "quantity": 1, "unitPrice": 1}]}),
        ),
        (
            "/lines/0/unitPrice",
            "pricing.price_mismatch",
            json!({"lines": [{"product": "1900-S", "quantity": 1, "unitPrice": 25.0}]}),
        ),
        (
            "/lines",
            "customer.credit_exceeded",
            json!({"lines": [{"product": "1904-W", "quantity": 6000, "unitPrice": 91.25}]}),
        ),
    ];
    for (i, (pointer, code, change)) in cases.iter().enumerate() {
        let mut q = quote(&format!("TRY-RULE-{i}"));
        for (k, v) in change.as_object().unwrap() {
            q[k] = v.clone();
        }
        let resp = submit(&client, &gw, &format!("rule-{i}"), &q).await;
        let problem = assert_problem(resp, 422, "quote-rejected").await;
        let found: Vec<(&str, &str)> = problem["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["pointer"].as_str().unwrap(), v["code"].as_str().unwrap()))
            .collect();
        assert_eq!(found, vec![(*pointer, *code)], "case {code}");
    }
    // Five rules broken at once: all five listed.
    let q = five_broken_rules(quote("TRY-FIVE"));
    let problem = assert_problem(submit(&client, &gw, "five", &q).await, 422, "quote-rejected").await;
    assert_eq!(violation_codes(&problem), FIVE_BROKEN_CODES);
    assert!(admin.sales().await.is_empty(), "no sale reached Tryton");

    let resp = submit(&client, &gw, "good", &quote("TRY-GOOD-1")).await;
    assert_eq!(resp.status(), 201, "{}", gw.log());
    let order: Value = resp.json().await.unwrap();
    assert!(order["erpOrderNumber"].as_str().unwrap().starts_with("SO-"), "{order:#}");
    let sales = admin.sales().await;
    assert_eq!(sales["TRY-GOOD-1"], ["processing"], "one confirmed sale");
}

#[tokio::test]
async fn tryton_idempotency_one_key_and_one_opportunity_make_one_sale() {
    let tryton = tryton_or_skip!();
    let admin = Admin::login(&tryton).await;
    let gw = TestGateway::start(options(&tryton, FAST)).await;
    let client = reqwest::Client::new();
    let q = quote("TRY-IDEM-1");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url, q) = (client.clone(), gw.url("/process/v1/quote-to-order"), q.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .header("x-api-key", KEY)
                .header("idempotency-key", "\"one-key\"")
                .json(&q)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 | 202 => {
                ids.insert(body["id"].as_str().unwrap().to_string());
            }
            409 => {}
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(ids.len(), 1);
    let mut other = q.clone();
    other["lines"][0]["quantity"] = json!(3);
    assert_problem(submit(&client, &gw, "one-key", &other).await, 422, "idempotency-key-reused").await;
    let second = submit(&client, &gw, "another-key", &q).await;
    assert_eq!(second.status(), 200);
    let location = format!("/process/v1/orders/{}", ids.iter().next().unwrap());
    wait_state(&client, &gw, &location, "accepted", Duration::from_secs(30)).await;
    assert_eq!(admin.sales().await["TRY-IDEM-1"].len(), 1, "one sale in Tryton");
}

/// Orders against Tryton, the gateway SIGKILLed mid-flight: every acknowledged order is one
/// confirmed sale after the restart, no sale twice.
#[tokio::test]
async fn tryton_sigkill_mid_flight_loses_and_duplicates_nothing() {
    let tryton = tryton_or_skip!();
    let admin = Admin::login(&tryton).await;
    let mut gw = TestGateway::start(options(
        &tryton,
        "{ max_attempts: 100, backoff_initial_ms: 100, backoff_max_ms: 1000, inline_wait_ms: 100 }",
    ))
    .await;
    let (acknowledged, _) = submit_killing_midway(&mut gw, "TRY-CRASH-", 60, 8, 20).await;
    let client = reqwest::Client::new();
    for (_, location) in &acknowledged {
        wait_state(&client, &gw, location, "accepted", Duration::from_secs(90)).await;
    }
    let sales = admin.sales().await;
    for (opportunity, _) in &acknowledged {
        assert_eq!(sales.get(opportunity).map(Vec::len), Some(1), "{opportunity} is one sale in Tryton");
    }
    assert!(sales.values().all(|s| s.len() == 1), "no sale twice: {sales:?}");
}

/// Tryton is down while orders keep coming: callers get 202, everything is delivered after it
/// returns. An order for a customer blocked meanwhile is dead-lettered, then accepted after the
/// block is lifted and the order replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tryton_outage_and_dead_letter_replay() {
    let mut tryton = tryton_or_skip!();
    let admin = Admin::login(&tryton).await;
    let gw = TestGateway::start(options(
        &tryton,
        "{ max_attempts: 100, backoff_initial_ms: 200, backoff_max_ms: 1000, inline_wait_ms: 2000 }",
    ))
    .await;
    let client = reqwest::Client::new();
    let mut locations = Vec::new();
    let first = submit(&client, &gw, "outage-0", &quote("TRY-OUT-000")).await;
    assert_eq!(first.status(), 201, "{}", gw.log());
    locations.push(first.headers()["location"].to_str().unwrap().to_string());

    // C10001 gets blocked while Tryton is up; its quote arrives during the outage.
    admin.write_party("C10001", json!({"categories": [["add", [BLOCKED_CATEGORY]]]})).await;
    tokio::task::block_in_place(|| tryton.stop());
    let mut blocked_quote = quote("TRY-OUT-BLOCKED");
    blocked_quote["customer"]["number"] = json!("C10001");
    let resp = submit(&client, &gw, "outage-blocked", &blocked_quote).await;
    assert_eq!(resp.status(), 202);
    let blocked_location = resp.headers()["location"].to_str().unwrap().to_string();
    let outage = Instant::now();
    let mut i = 0;
    while outage.elapsed() < Duration::from_secs(15) {
        i += 1;
        let resp = submit(&client, &gw, &format!("outage-{i}"), &quote(&format!("TRY-OUT-{i:03}"))).await;
        assert_eq!(resp.status(), 202, "during the outage");
        locations.push(resp.headers()["location"].to_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::task::block_in_place(|| tryton.run());
    for location in &locations {
        wait_state(&client, &gw, location, "accepted", Duration::from_secs(60)).await;
    }
    let dead = wait_state(&client, &gw, &blocked_location, "dead_lettered", Duration::from_secs(30)).await;
    assert!(dead["reason"].as_str().unwrap().contains("customer.blocked"), "{dead:#}");

    admin.write_party("C10001", json!({"categories": [["remove", [BLOCKED_CATEGORY]]]})).await;
    let id = blocked_location.rsplit('/').next().unwrap();
    let replay = client
        .post(gw.admin(&format!("/admin/dead-letters/{id}/replay")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 202);
    wait_state(&client, &gw, &blocked_location, "accepted", Duration::from_secs(30)).await;
    let sales = admin.sales().await;
    assert_eq!(sales.len(), locations.len() + 1);
    assert!(sales.values().all(|s| s.len() == 1 && s[0] == "processing"), "{sales:?}");
}
