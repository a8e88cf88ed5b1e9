//! What operations run the gateway with: the alert rules pass promtool (`promtool check rules`,
//! and `promtool test rules` fires each alert), and every query of the Grafana dashboard and of
//! the rules names a metric a live gateway exports.

use crate::common;

use crate::common::process::*;
use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn observability(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability").join(file)
}

fn promtool() -> Option<PathBuf> {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        common::missing_service(
            "promtool",
            "install it (Debian: apt install prometheus) or run scripts/ensure-build-deps.sh --test",
        );
    }
    found.then(|| PathBuf::from("promtool"))
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_fires_in_its_unit_test() {
    let Some(promtool) = promtool() else { return };
    for args in
        [vec!["check", "rules", "causeway.rules.yml"], vec!["test", "rules", "causeway.rules.test.yml"]]
    {
        let out = Command::new(&promtool).args(&args).current_dir(observability("")).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert of the rules has a unit test and a runbook section.
    let rules = std::fs::read_to_string(observability("causeway.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(observability("causeway.rules.test.yml")).unwrap();
    let runbooks =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbooks.md")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n        exp_alerts:")),
            "no firing test for {alert}"
        );
        assert!(runbooks.contains(&format!("## {alert}\n")), "no runbook section for {alert}");
    }
}

/// The `causeway_*` names in `text` (PromQL), as they appear.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("causeway_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        names.insert(name);
    }
    names
}

fn redis_url() -> String {
    std::env::var("CAUSEWAY_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_names_a_metric_a_live_gateway_exports() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(observability("grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            wanted.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    let dashboard_names = wanted.len();
    wanted.extend(metric_names(&std::fs::read_to_string(observability("causeway.rules.yml")).unwrap()));
    assert!(dashboard_names >= 15, "{wanted:?}");

    // The gateway with an event subscriber, in cluster mode when Redis answers (the shared-state
    // metrics exist only there), after one accepted and one refused order.
    let sandbox = TestSandbox::start(Default::default()).await;
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_port = hook.local_addr().unwrap().port();
    let app = axum::Router::new().route("/hooks", axum::routing::post(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(hook, app).await.unwrap() });
    let mut o = sandbox_options(sandbox.url(), FAST);
    let redis = redis::Client::open(redis_url())
        .ok()
        .map(|c| c.get_connection_with_timeout(Duration::from_secs(1)).is_ok())
        .unwrap_or(false);
    if redis {
        o.main_extra.push_str(&format!("cluster:\n  replicas: 1\n  redis: {{ url: \"{}\" }}\n", redis_url()));
    } else {
        common::missing_service(
            &format!("Redis at {}", redis_url()),
            "the shared-state metrics need it: start one or set CAUSEWAY_TEST_REDIS",
        );
    }
    o.main_extra.push_str(&format!(
        "events:\n  subscribers:\n    crm:\n      url: http://127.0.0.1:{hook_port}/hooks\n      secret_env: [CRM_HOOK_SECRET]\n"
    ));
    o.env.push(("CRM_HOOK_SECRET".into(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()));
    let gw = TestGateway::start(o).await;
    let client = reqwest::Client::new();
    assert_eq!(submit(&client, &gw, "obs-1", &quote("006OBS000001")).await.status(), 201, "{}", gw.log());
    assert_eq!(submit(&client, &gw, "obs-2", &five_broken_rules(quote("006OBS000002"))).await.status(), 422);
    gw.wait_for_metric("causeway_events_delivered_total{subscriber=\"crm\"} 2", Duration::from_secs(10))
        .await;

    let exposition = client.get(gw.metrics_url()).send().await.unwrap().text().await.unwrap();
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let cluster_only = [
        "causeway_shared_state_mode",
        "causeway_shared_state_switches_total",
        "causeway_erp_shared_in_flight",
    ];
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .filter(|n| redis || !cluster_only.contains(&n.as_str()))
        .collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\nexported: {exported:?}");

    // Hygiene: one type per OpenMetrics family (a counter `x_total` is the family `x`, so no
    // gauge may be called `x`), states as labels, and the build named.
    let types: Vec<(&str, &str)> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    for (name, kind) in &types {
        if *kind == "counter" {
            let family = name
                .strip_suffix("_total")
                .unwrap_or_else(|| panic!("counter {name} does not end in _total"));
            assert!(
                !types.iter().any(|(n, _)| *n == family),
                "{family} is both a counter's family and a metric"
            );
        } else {
            assert!(!name.ends_with("_total"), "{kind} {name} ends in _total");
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        exposition.contains(&format!(
            "causeway_build_info{{allocator=\"mimalloc\",sandbox=\"yes\",version=\"{version}\"}} 1"
        )),
        "{exposition}"
    );
    for (state, value) in [("closed", 1), ("half_open", 0), ("open", 0)] {
        let sample = format!("causeway_erp_circuit_state{{state=\"{state}\",upstream=\"bc\"}} {value}");
        assert!(exposition.contains(&sample), "{sample}");
    }
}
