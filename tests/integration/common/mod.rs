//! Test harness: the real `causeway` binary on loopback, in front of the real sandbox.
#![allow(dead_code)]

pub mod config;
pub mod origin;
pub mod postgres;
pub mod process;
pub mod tls;

use causeway::sandbox::{LimitsSpec, Sandbox, SandboxConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const UPSTREAM_TOKEN: &str = "upstream-secret-token";

/// reqwest is built without a default TLS provider (the gateway installs ring at start-up);
/// test clients need the same before their first request.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether a missing service or tool must fail the run: under CI (`CI` set, as CI runs with
/// `CI=true`) or with `CAUSEWAY_REQUIRE_SERVICES` set, a run that skipped would go green having
/// tested less.
pub fn services_required() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    set("CI") || set("CAUSEWAY_REQUIRE_SERVICES")
}

/// A service or tool a test needs is missing. Under CI ([`services_required`]) this fails the
/// test naming the service and what to do; elsewhere it prints the same and the caller skips.
pub fn missing_service(service: &str, remedy: &str) {
    assert!(!services_required(), "{service} is missing: {remedy}");
    eprintln!("SKIPPED (needs {service}): {remedy}");
}

/// Whether a command-line tool a test drives is installed; see [`missing_service`].
pub fn require_tool(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        missing_service(
            tool,
            &format!("install it (Debian: apt-get install {tool}; scripts/test installs it)"),
        );
    }
    found
}

/// Resident memory of a process, in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A port that was free a moment ago and that no other test in this process was given: the
/// gateway binds with SO_REUSEPORT (pingora), so two gateways handed the same port by racing
/// tests would both start and share it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The sandbox, served in this test's runtime; `stop` drops its listener.
pub struct TestSandbox {
    pub sandbox: Sandbox,
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TestSandbox {
    /// On a port the kernel picks and this sandbox holds from the start: a port chosen first and
    /// bound later can be taken in between by any outgoing connection on the machine.
    pub async fn start(limits: LimitsSpec) -> Self {
        Self::start_on(0, limits).await
    }

    /// On `port` (0: any free one), e.g. to come back on the port of a stopped sandbox.
    pub async fn start_on(port: u16, limits: LimitsSpec) -> Self {
        install_tls_provider();
        let sandbox = Sandbox::new(SandboxConfig { token: Some(UPSTREAM_TOKEN.into()), limits });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = sandbox.clone();
        let task = tokio::spawn(async move {
            let _ = served.serve(listener).await;
        });
        TestSandbox { sandbox, port, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(self) {
        self.task.abort();
    }

    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/sandbox/stats", self.url())).await.unwrap().json().await.unwrap()
    }

    pub async fn received(&self) -> Vec<serde_json::Value> {
        reqwest::get(format!("{}/sandbox/requests", self.url())).await.unwrap().json().await.unwrap()
    }

    pub async fn set_limits(&self, limits: &LimitsSpec) {
        let resp = reqwest::Client::new()
            .put(format!("{}/sandbox/settings", self.url()))
            .json(limits)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
}

/// The gateway as a child process with a generated configuration directory.
pub struct TestGateway {
    pub child: Child,
    pub proxy_port: u16,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

pub struct GatewayOptions {
    pub upstream_url: String,
    pub routes_yaml: String,
    pub policies_yaml: String,
    pub grace_seconds: u64,
    /// Extra YAML under `upstreams.bc` (indented four spaces), e.g. a `budget:` block.
    pub upstream_extra: String,
    pub env: Vec<(String, String)>,
    /// Copy the shipped `policies/mediation.yaml`, `policies/schemas` and `policies/mappings`.
    pub shipped_mediation: bool,
    /// Extra files, relative to `policies/` (schemas, mappings, jq programs).
    pub policy_files: Vec<(String, String)>,
    /// Appended to `causeway.yaml` (top-level blocks such as `process:`).
    pub main_extra: String,
    /// Extra lines under `listen:` (indented two spaces), e.g. `  client_header_timeout_ms: 1000`.
    pub listen_extra: String,
}

/// Routes used by most tests: a rewrite onto the sandbox company, a small body limit, a short deadline.
pub fn default_routes() -> String {
    let company = causeway::sandbox::data::COMPANY_ID;
    format!(
        r#"routes:
  - name: erp-read
    match: {{ methods: [GET], path: "/erp/v2/{{*rest}}" }}
    public: true
    upstream: bc
    rewrite: "/api/v2.0/companies({company})/{{rest}}"
    timeouts: {{ total_ms: 800 }}
    policies: [strip-cookie]
  - name: erp-write
    match: {{ methods: [POST, PATCH], path: "/erp/v2/{{*rest}}" }}
    public: true
    upstream: bc
    rewrite: "/api/v2.0/companies({company})/{{rest}}"
    max_body_bytes: 1024
  - name: item-by-id
    match: {{ methods: [GET], path: "/erp/v2/items/{{id}}" }}
    public: true
    upstream: bc
    rewrite: "/api/v2.0/companies({company})/items({{id}})"
  - name: partner-host
    match: {{ host: partner.example, path: "/partner/companies" }}
    public: true
    upstream: bc
    rewrite: /api/v2.0/companies
"#
    )
}

pub fn default_policies() -> String {
    "policies:\n  - name: strip-cookie\n    kind: headers\n    request: { remove: [cookie] }\n    response: { set: { x-served-by: causeway } }\n".into()
}

impl GatewayOptions {
    pub fn new(upstream_url: String) -> Self {
        GatewayOptions {
            upstream_url,
            routes_yaml: default_routes(),
            policies_yaml: default_policies(),
            grace_seconds: 5,
            upstream_extra: String::new(),
            env: Vec::new(),
            shipped_mediation: false,
            policy_files: Vec::new(),
            main_extra: String::new(),
            listen_extra: String::new(),
        }
    }
}

pub fn write_config(dir: &Path, opts: &GatewayOptions, ports: (u16, u16, u16)) {
    let main = format!(
        r#"listen:
  proxy: 127.0.0.1:{}
  admin: 127.0.0.1:{}
  metrics: 127.0.0.1:{}
{}threads: 1
shutdown_grace_seconds: {}
health_probe_seconds: 1
upstreams:
  bc:
    url: {}
    connect_timeout_ms: 500
    read_timeout_ms: 5000
    credentials:
      bearer:
        token: ${{CAUSEWAY_TEST_UPSTREAM_TOKEN}}
{}
{}
"#,
        ports.0,
        ports.1,
        ports.2,
        opts.listen_extra,
        opts.grace_seconds,
        opts.upstream_url,
        opts.upstream_extra,
        // A setting that names the gateway's own address (a notification URL).
        opts.main_extra.replace("{PROXY_PORT}", &ports.0.to_string())
    );
    std::fs::write(dir.join("causeway.yaml"), main).unwrap();
    std::fs::create_dir_all(dir.join("routes")).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("routes/routes.yaml"), &opts.routes_yaml).unwrap();
    std::fs::write(dir.join("policies/policies.yaml"), &opts.policies_yaml).unwrap();
    if opts.shipped_mediation {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        std::fs::copy(shipped.join("mediation.yaml"), dir.join("policies/mediation.yaml")).unwrap();
        for sub in ["schemas", "mappings"] {
            copy_tree(&shipped.join(sub), &dir.join("policies").join(sub));
        }
    }
    for (path, text) in &opts.policy_files {
        let target = dir.join("policies").join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, text).unwrap();
    }
}

fn copy_tree(from: &Path, to: &Path) {
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

fn spawn_gateway(dir: &Path, env: &[(String, String)]) -> Child {
    spawn_serve(dir, env, &[])
}

/// `causeway serve -c dir` with `extra` arguments (`-u` for a graceful upgrade).
fn spawn_serve(dir: &Path, env: &[(String, String)], extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gateway.log")).unwrap();
    Command::new(binary())
        .args(["serve", "-c"])
        .arg(dir)
        .args(extra)
        .env("CAUSEWAY_TEST_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn causeway")
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_causeway"))
}

impl TestGateway {
    pub async fn start(opts: GatewayOptions) -> Self {
        // Tests talk to it with reqwest, which needs the process's TLS provider.
        install_tls_provider();
        let dir = tempfile::tempdir().unwrap();
        let ports = (free_port(), free_port(), free_port());
        write_config(dir.path(), &opts, ports);
        let child = spawn_gateway(dir.path(), &opts.env);
        let gw = TestGateway {
            child,
            proxy_port: ports.0,
            admin_port: ports.1,
            metrics_port: ports.2,
            dir,
            env: opts.env,
        };
        gw.wait_listening().await;
        gw
    }

    /// SIGKILL the gateway (no drain, no cleanup), then start it again on the same
    /// configuration, store and ports.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_gateway(self.dir.path(), &self.env);
        self.wait_listening().await;
    }

    /// A graceful upgrade: start a new process with `-u` on the same configuration, store and
    /// ports, then SIGQUIT the old one, which hands its listeners over and drains. Returns the
    /// old process (still draining).
    pub async fn upgrade(&mut self) -> Child {
        let next = spawn_serve(self.dir.path(), &self.env, &["-u"]);
        // The new process asks the old one for its sockets once it is up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let old = std::mem::replace(&mut self.child, next);
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(old.id() as i32, libc::SIGQUIT);
        }
        self.wait_listening().await;
        old
    }

    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        for port in [self.proxy_port, self.admin_port, self.metrics_port] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(Instant::now() < deadline, "gateway did not listen on {port}:\n{}", self.log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.proxy_port, path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Poll `/metrics` until it contains `sample` (a whole exposition line, e.g.
    /// `name{labels} 0`); fail after `within` with the last exposition.
    pub async fn wait_for_metric(&self, sample: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let metrics = reqwest::get(self.metrics_url()).await.unwrap().text().await.unwrap();
            if metrics.contains(sample) {
                return;
            }
            assert!(Instant::now() < deadline, "{sample} not seen within {within:?}:\n{metrics}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll `/readyz` until it answers `want` (or fail after `within`).
    pub async fn wait_ready(&self, want: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let status = reqwest::get(self.admin("/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0);
            if status == want {
                return;
            }
            assert!(Instant::now() < deadline, "readyz stayed {status}, wanted {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assert an RFC 9457 body with the given status and type slug; returns the body.
pub async fn assert_problem(resp: reqwest::Response, status: u16, slug: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status);
    let headers = resp.headers().clone();
    assert_eq!(headers.get("content-type").unwrap(), "application/problem+json");
    let correlation = headers
        .get("x-correlation-id")
        .expect("problem carries x-correlation-id")
        .to_str()
        .unwrap()
        .to_string();
    assert!(headers.get("traceparent").is_some(), "problem carries traceparent");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["type"], format!("https://causeway.dev/problems/{slug}"));
    assert_eq!(body["status"], status);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(body["correlation_id"], correlation.as_str());
    body
}
