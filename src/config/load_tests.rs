//! Loading a configuration directory into a compiled `Config`: what the files say ends up in
//! the compiled values the runtime reads, and every mistake is reported at its file and line.

use super::*;
use std::path::Path;

const MAIN: &str = r#"listen:
  proxy: 127.0.0.1:18080
  admin: 127.0.0.1:18081
  metrics: 127.0.0.1:18082
upstreams:
  bc:
    url: http://127.0.0.1:9
    credentials:
      bearer:
        token: ${ERP_TOKEN}
    budget:
      window_requests: 600
      window_seconds: 60
      max_concurrent: 3
      classes:
        write: { priority: 0, max_wait_ms: 1500 }
        bulk: { priority: 2, max_wait_ms: 100 }
      default_class: bulk
      max_share: 0.5
      overload_signals: [{ status: 400, body_contains: SSS_REQUEST_LIMIT_EXCEEDED }]
"#;

const ROUTES: &str = r#"routes:
  - name: orders
    match: { methods: [GET], path: "/erp/orders/{id}" }
    upstream: bc
    rewrite: "/api/orders({id})"
    erp_class: write
    policies: [keys]
    scopes: [erp.read]
  - name: open
    match: { path: "/open/{*rest}" }
    public: true
    upstream: bc
"#;

const POLICIES: &str = r#"policies:
  - name: keys
    kind: api_key
    header: x-api-key
    keys:
      - { consumer: bi, sha256: d7758b5b3f5e70d0be776ffa6ef9a4b780b7dfecdfaf5b53e6cd34f5c284c414, scopes: [erp.read] }
"#;

fn dir_with(main: &str, routes: &str, policies: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("causeway.yaml"), main).unwrap();
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("routes/routes.yaml"), routes).unwrap();
    std::fs::write(dir.path().join("policies/policies.yaml"), policies).unwrap();
    dir
}

fn env(name: &str) -> Option<String> {
    (name == "ERP_TOKEN").then(|| "erp-secret".to_string())
}

fn load_dir(dir: &Path) -> Result<Config, Diagnostics> {
    load_with_env(dir, &env)
}

#[test]
fn the_files_compile_into_routes_upstreams_budgets_and_policies() {
    let dir = dir_with(MAIN, ROUTES, POLICIES);
    let config = load_dir(dir.path()).unwrap_or_else(|d| panic!("{d}"));

    let found = config.router.find(None, "GET", "/erp/orders/42", Some("$top=1")).expect("the route matches");
    assert_eq!(found.route.name, "orders");
    assert_eq!(found.upstream_path, "/api/orders(42)?$top=1");
    assert_eq!(found.route.scopes, vec!["erp.read".to_string()]);
    assert_eq!(found.route.policies.len(), 1);
    assert_eq!(found.route.erp_class.as_ref().map(|c| &*c.name), Some("write"));
    assert_eq!(config.router.allowed_methods(None, "/erp/orders/42"), vec!["GET".to_string()]);
    assert!(config.router.find(None, "POST", "/erp/orders/42", None).is_none());

    let bc = &config.upstreams["bc"];
    let credential = bc.credential.as_ref().expect("a credential");
    assert_eq!(credential.0, "authorization");
    assert_eq!(credential.1, "Bearer erp-secret");
    let budget = bc.budget.as_ref().expect("a budget");
    let params = budget.budget.params();
    assert_eq!(
        (params.window_requests, params.window, params.max_concurrent),
        (600, Duration::from_secs(60), 3)
    );
    assert_eq!(params.max_share, 0.5);
    assert_eq!(&*budget.default_class.name, "bulk");
    assert_eq!(budget.overload_signals, vec![(400, Some("SSS_REQUEST_LIMIT_EXCEEDED".to_string()))]);
    // The open route falls back to the upstream's default class.
    let open = config.router.find(None, "DELETE", "/open/a/b", None).unwrap();
    assert!(open.route.public);
    assert_eq!(open.route.erp_class.as_ref().map(|c| &*c.name), Some("bulk"));
}

#[test]
fn a_reload_keeps_the_budget_and_applies_new_limits_to_it() {
    let dir = dir_with(MAIN, ROUTES, POLICIES);
    let state = Arc::new(SharedState::default());
    let first = load_with_state(dir.path(), &env, &state).unwrap_or_else(|d| panic!("{d}"));
    std::fs::write(dir.path().join("causeway.yaml"), MAIN.replace("max_concurrent: 3", "max_concurrent: 4"))
        .unwrap();
    let second = load_with_state(dir.path(), &env, &state).unwrap_or_else(|d| panic!("{d}"));
    let (a, b) = (
        &first.upstreams["bc"].budget.as_ref().unwrap().budget,
        &second.upstreams["bc"].budget.as_ref().unwrap().budget,
    );
    assert!(Arc::ptr_eq(a, b), "one budget per ERP, reload or not");
    assert_eq!(a.params().max_concurrent, 4);
}

#[test]
fn mistakes_are_reported_at_their_file_and_line_all_at_once() {
    let routes = ROUTES.replace("policies: [keys]", "policies: [nope]");
    let main = MAIN.replace("${ERP_TOKEN}", "${MISSING_TOKEN}");
    let dir = dir_with(&main, &routes, POLICIES);
    let text = load_dir(dir.path()).err().expect("the directory is invalid").to_string();
    let routes_file = dir.path().join("routes/routes.yaml").display().to_string();
    let main_file = dir.path().join("causeway.yaml").display().to_string();
    assert!(text.contains(&format!("{routes_file}:7:")) && text.contains("`nope`"), "{text}");
    assert!(text.contains(&format!("{main_file}:10:")) && text.contains("MISSING_TOKEN"), "{text}");

    let dir = dir_with(MAIN, &ROUTES.replace("erp_class: write", "erp_class: urgent"), POLICIES);
    let text = load_dir(dir.path()).err().expect("an unknown class").to_string();
    assert!(
        text.contains(&format!(
            "{routes_file_2}:6:",
            routes_file_2 = dir.path().join("routes/routes.yaml").display()
        )),
        "{text}"
    );
    assert!(text.contains("urgent"), "{text}");
}

#[test]
fn a_credentialed_route_without_authentication_is_refused_unless_public() {
    let routes = ROUTES.replace("    public: true\n", "");
    let dir = dir_with(MAIN, &routes, POLICIES);
    let text = load_dir(dir.path()).err().expect("an anonymous route to a credentialed ERP").to_string();
    assert!(text.contains("open") && text.contains("public"), "{text}");
}
