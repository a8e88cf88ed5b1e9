//! API lifecycle: a deprecated route says so on every answer, a route past its sunset is gone,
//! usage is counted per version, and `check` warns about the retired route.

use crate::common::*;
use causeway::sandbox::{data::COMPANY_ID, LimitsSpec};
use std::process::Command;

fn routes() -> String {
    format!(
        r#"routes:
  - name: items-v1
    match: {{ methods: [GET], path: "/erp/v1/items" }}
    public: true
    upstream: bc
    rewrite: "/api/v2.0/companies({COMPANY_ID})/items"
    version: v1
    deprecation: {{ since: 2026-01-01, sunset: 2099-01-01, link: "https://dev.example.com/erp/v2" }}
  - name: customers-v0
    match: {{ methods: [GET], path: "/erp/v0/customers" }}
    public: true
    upstream: bc
    rewrite: "/api/v2.0/companies({COMPANY_ID})/customers"
    version: v0
    deprecation: {{ since: 2020-01-01, sunset: 2021-03-01T09:30:00Z, link: "https://dev.example.com/erp/v2" }}
  - name: items-v2
    match: {{ methods: [GET], path: "/erp/v2/items" }}
    public: true
    upstream: bc
    rewrite: "/api/v2.0/companies({COMPANY_ID})/items"
    version: v2
"#
    )
}

async fn version_requests(gw: &TestGateway, route: &str, version: &str) -> u64 {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", gw.metrics_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!(
        "causeway_api_version_requests_total{{route=\"{route}\",tier=\"anonymous\",version=\"{version}\"}}"
    );
    text.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_deprecated_route_says_so_a_sunset_route_is_gone_and_usage_is_counted_per_version() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.routes_yaml = routes();
    let gw = TestGateway::start(opts).await;

    for _ in 0..2 {
        let resp = reqwest::get(gw.url("/erp/v1/items?$top=1")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers();
        assert_eq!(h["deprecation"], "@1767225600", "RFC 9745: the deprecation date as @seconds");
        assert_eq!(h["sunset"], "Thu, 01 Jan 2099 00:00:00 GMT", "RFC 8594: an HTTP date");
        assert_eq!(h["link"], "<https://dev.example.com/erp/v2>; rel=\"deprecation\"; type=\"text/html\"");
    }
    let before = sandbox.received().await.len();
    let resp = reqwest::get(gw.url("/erp/v0/customers")).await.unwrap();
    assert_eq!(
        resp.headers()["sunset"],
        "Mon, 01 Mar 2021 09:30:00 GMT",
        "the 410 keeps the lifecycle headers"
    );
    assert!(resp.headers().contains_key("deprecation"));
    let problem = assert_problem(resp, 410, "route-sunset").await;
    assert_eq!(problem["sunset"], "2021-03-01T09:30:00Z");
    assert_eq!(problem["link"], "https://dev.example.com/erp/v2");
    assert!(problem["detail"].as_str().unwrap().contains("https://dev.example.com/erp/v2"), "{problem}");
    assert_eq!(sandbox.received().await.len(), before, "a retired route sends nothing upstream");

    let resp = reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap();
    assert_eq!(resp.status(), 200);
    for absent in ["deprecation", "sunset", "link"] {
        assert!(!resp.headers().contains_key(absent), "{absent} on a current route");
    }

    assert_eq!(version_requests(&gw, "items-v1", "v1").await, 2);
    assert_eq!(version_requests(&gw, "customers-v0", "v0").await, 1, "a refused request is usage too");
    assert_eq!(version_requests(&gw, "items-v2", "v2").await, 1);

    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(gw.dir.path())
        .env("CAUSEWAY_TEST_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a past sunset is a warning, not an error: {stderr}");
    let warning =
        stderr.lines().find(|l| l.contains("past its sunset")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        warning.contains("routes/") && warning.contains("customers-v0") && warning.contains("410"),
        "{warning}"
    );
    assert!(!stderr.contains("items-v1"), "a future sunset is not warned about: {stderr}");
}

#[test]
fn a_broken_deprecation_is_refused_by_check_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = GatewayOptions::new("http://127.0.0.1:9".into());
    opts.routes_yaml = routes()
        .replace("sunset: 2099-01-01", "sunset: 2019-01-01")
        .replace("version: v2", "version: \"v 2\u{202e}\"");
    write_config(dir.path(), &opts, (free_port(), free_port(), free_port()));
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(dir.path())
        .env("CAUSEWAY_TEST_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("sunset (2019-01-01) is before since (2026-01-01)"), "{stderr}");
    assert!(stderr.contains("metrics label"), "{stderr}");
    assert!(stderr.contains("2 problem(s) found"), "{stderr}");
}
