//! Hot reload under load: routes and quotas change on disk while traffic flows.

use crate::common::*;
use causeway::sandbox::{data::COMPANY_ID, LimitsSpec};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn policies(requests: u32) -> String {
    format!(
        "policies:\n  - name: quota\n    kind: rate_limit\n    default_tier: open\n    tiers:\n      open: {{ requests: {requests}, window_seconds: 60 }}\n"
    )
}

fn routes(extra: &str) -> String {
    format!(
        r#"routes:
  - name: items
    match: {{ methods: [GET], path: "/erp/v2/{{*rest}}" }}
    upstream: bc
    public: true
    rewrite: "/api/v2.0/companies({COMPANY_ID})/{{rest}}"
    policies: [quota]
{extra}"#
    )
}

#[tokio::test]
async fn routes_and_quotas_change_under_load_without_failed_requests() {
    // The ERP's own window must not be what limits this load.
    let sandbox =
        TestSandbox::start(LimitsSpec { window_requests: 10_000_000, ..LimitsSpec::default() }).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.policies_yaml = policies(1_000_000);
    opts.routes_yaml = routes("");
    opts.env = vec![("CAUSEWAY_ADMIN_TOKEN".into(), "admin-secret".into())];
    let gw = TestGateway::start(opts).await;
    let dir = gw.dir.path().to_path_buf();

    // Load: 4 loops against the existing route until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, limited, failed) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let new_quota_seen: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
    let client = reqwest::Client::new();
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/erp/v2/items?$top=1"));
            let (stop, ok, limited, failed, seen) =
                (stop.clone(), ok.clone(), limited.clone(), failed.clone(), new_quota_seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).send().await {
                        Ok(r) => {
                            let policy =
                                r.headers().get("ratelimit-policy").map(|v| v.to_str().unwrap().to_string());
                            if policy.as_deref() == Some("\"open\";q=3;w=60") {
                                seen.lock().get_or_insert_with(Instant::now);
                            }
                            match r.status().as_u16() {
                                200 => ok.fetch_add(1, Ordering::Relaxed),
                                429 => limited.fetch_add(1, Ordering::Relaxed),
                                _ => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. A new route appears (written by rename, as editors and Kubernetes do).
    let added = "  - name: companies\n    match: { methods: [GET], path: /erp/v9/companies }\n    upstream: bc\n    public: true\n    rewrite: /api/v2.0/companies\n";
    let tmp = dir.join("routes/.routes.yaml.tmp");
    std::fs::write(&tmp, routes(added)).unwrap();
    std::fs::rename(&tmp, dir.join("routes/routes.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let status = reqwest::get(gw.url("/erp/v9/companies")).await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new route not live within 2 s:\n{}",
            gw.log()
                .lines()
                .filter(|l| !l.contains("\"access\"") && !l.contains("pingora"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 2. The quota tightens.
    let changed = Instant::now();
    std::fs::write(dir.join("policies/policies.yaml"), policies(3)).unwrap();
    while new_quota_seen.lock().is_none() {
        assert!(changed.elapsed() < Duration::from_secs(2), "new quota not applied within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(limited.load(Ordering::Relaxed) > 0, "the new quota limits the load");

    // 3. An invalid file is refused and reported; the old configuration keeps serving.
    std::fs::write(dir.join("routes/broken.yaml"), "routes:\n  - name: broken\n    upstream: nowhere\n")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        reqwest::get(gw.url("/erp/v9/companies")).await.unwrap().status(),
        200,
        "old config still serving"
    );
    let log = gw.log();
    assert!(log.contains("configuration rejected"), "the rejection is logged");
    assert!(
        log.contains("broken.yaml:3:5: missing field `match`"),
        "with file and line: {}",
        log.lines().filter(|l| l.contains("rejected")).collect::<Vec<_>>().join("\n")
    );
    let resp = reqwest::Client::new()
        .post(gw.admin("/admin/reload"))
        .header("authorization", "Bearer admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["diagnostics"].to_string().contains("broken.yaml"), "{body}");
    let unauthorized = reqwest::Client::new().post(gw.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);

    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed during the reloads");
    assert!(ok.load(Ordering::Relaxed) > 50, "the load ran");
}

#[tokio::test]
async fn sighup_reloads() {
    let sandbox = TestSandbox::start(LimitsSpec::default()).await;
    let mut opts = GatewayOptions::new(sandbox.url());
    opts.policies_yaml = policies(1000);
    opts.routes_yaml = routes("");
    let gw = TestGateway::start(opts).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !gw.log().contains(r#""message":"configuration reloaded","trigger":"SIGHUP""#) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reqwest::get(gw.url("/erp/v2/items?$top=1")).await.unwrap().status(), 200, "still serving");
}
