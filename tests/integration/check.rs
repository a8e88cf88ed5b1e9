//! `causeway check`: exit 0 on the shipped configuration, `file:line` diagnostics otherwise.

use crate::common;
use crate::common::config::Patch;

use std::path::Path;
use std::process::Command;

fn check(dir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(common::binary());
    cmd.args(["check", "-c"]).arg(dir).env_remove("CAUSEWAY_TEST_UPSTREAM_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A valid configuration directory, to break one file of.
fn valid_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = common::GatewayOptions::new("http://127.0.0.1:9".into());
    common::write_config(dir.path(), &opts, (18000, 18001, 18002));
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(ok, "the base configuration must be valid: {err}");
    dir
}

#[test]
fn shipped_configuration_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(common::binary()).args(["check", "-c"]).arg(root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    let dir = valid_dir();
    let file = dir.path().join("routes/routes.yaml");
    std::fs::write(&file, "routes:\n  - name: broken\n    match: { path: /x\n    upstream: bc\n").unwrap();
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(!ok);
    let expected = format!("{}:", file.display());
    let line = err.lines().find(|l| l.starts_with(&expected)).unwrap_or_else(|| panic!("{err}"));
    let line_no: u64 = line[expected.len()..].split(':').next().unwrap().parse().expect("a line number");
    assert!((3..=5).contains(&line_no), "{line}");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let dir = valid_dir();
    let file = dir.path().join("causeway.yaml");
    let text = std::fs::read_to_string(&file).unwrap().patched("threads: 1\n", "threads: 1\nthreadz: 2\n");
    std::fs::write(&file, &text).unwrap();
    let line_no = text.lines().position(|l| l.starts_with("threadz")).unwrap() + 1;
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(!ok);
    assert!(err.contains(&format!("{}:{line_no}:", file.display())), "{err}");
    assert!(err.contains("threadz"), "{err}");
}

#[test]
fn route_naming_a_missing_policy_is_reported_at_its_line() {
    let dir = valid_dir();
    let file = dir.path().join("routes/routes.yaml");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .patched("policies: [strip-cookie]", "policies: [strip-cookie, no-such-policy]");
    std::fs::write(&file, &text).unwrap();
    let line_no = text.lines().position(|l| l.contains("no-such-policy")).unwrap() + 1;
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(!ok);
    assert!(err.contains(&format!("{}:{line_no}:", file.display())), "{err}");
    assert!(err.contains("no-such-policy"), "{err}");
}

#[test]
fn upstream_naming_an_unset_environment_variable_is_reported() {
    let dir = valid_dir();
    let file = dir.path().join("causeway.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let line_no = text.lines().position(|l| l.contains("CAUSEWAY_TEST_UPSTREAM_TOKEN")).unwrap() + 1;
    let (ok, err) = check(dir.path(), &[]);
    assert!(!ok);
    assert!(err.contains(&format!("{}:{line_no}:", file.display())), "{err}");
    assert!(err.contains("CAUSEWAY_TEST_UPSTREAM_TOKEN is not set"), "{err}");
}

#[test]
fn reports_every_problem_not_only_the_first() {
    let dir = valid_dir();
    let routes = dir.path().join("routes/routes.yaml");
    let text = std::fs::read_to_string(&routes)
        .unwrap()
        .patched("policies: [strip-cookie]", "policies: [missing-one]")
        .patched(
            "upstream: bc\n    rewrite: /api/v2.0/companies",
            "upstream: nope\n    rewrite: /api/v2.0/companies",
        );
    std::fs::write(&routes, text).unwrap();
    let (ok, err) = check(dir.path(), &[]);
    assert!(!ok);
    assert!(err.contains("missing-one") && err.contains("`nope`") && err.contains("is not set"), "{err}");
    assert!(err.contains("3 problem(s) found"), "{err}");
}

#[test]
fn process_rules_and_mediation_files_are_checked_with_file_and_line() {
    let dir = valid_dir();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/process");
    let process = dir.path().join("policies/process");
    std::fs::create_dir_all(&process).unwrap();
    for f in std::fs::read_dir(&shipped).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, process.join(f.file_name().unwrap())).unwrap();
    }
    let env = [("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")];
    assert!(check(dir.path(), &env).0, "the shipped process rules are valid");

    let pricing = process.join("pricing.yaml");
    let text = std::fs::read_to_string(&pricing).unwrap() + "tolerance_pct: 2\n";
    std::fs::write(&pricing, &text).unwrap();
    let line_no = text.lines().count();
    // And a mediation policy whose mapping names an unknown conversion.
    std::fs::create_dir_all(dir.path().join("policies/maps")).unwrap();
    std::fs::write(dir.path().join("policies/maps/m.yaml"), "ops:\n  - convert: {at: /a, with: to_roman}\n")
        .unwrap();
    std::fs::write(
        dir.path().join("policies/mediation.yaml"),
        "policies:\n  - name: m\n    kind: mediation\n    request: { map: maps/m.yaml }\n",
    )
    .unwrap();
    let (ok, err) = check(dir.path(), &env);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}:{line_no}:", pricing.display())) && err.contains("tolerance_pct"),
        "{err}"
    );
    let mediation = dir.path().join("policies/mediation.yaml");
    assert!(err.contains(&format!("{}:2:", mediation.display())) && err.contains("to_roman"), "{err}");
}

/// Process endpoints need a `process:` block, which must name a defined upstream and an adapter
/// with its settings; each problem is reported with file and line.
#[test]
fn process_configuration_errors_name_file_and_line() {
    let dir = valid_dir();
    let routes = dir.path().join("routes/process.yaml");
    std::fs::write(
        &routes,
        "routes:\n  - name: q2o\n    match: { methods: [POST], path: /process/v1/quote-to-order }\n    upstream: bc\n    process: quote-to-order\n    public: true\n",
    )
    .unwrap();
    let main = dir.path().join("causeway.yaml");
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(!ok);
    assert!(
        err.contains("route `q2o` is a process endpoint, but causeway.yaml has no `process:` block"),
        "{err}"
    );

    let base = std::fs::read_to_string(&main).unwrap();
    let text = format!("{base}process:\n  erp: nope\n  adapter: tryton\n");
    std::fs::write(&main, &text).unwrap();
    let erp_line = text.lines().position(|l| l.contains("erp: nope")).unwrap() + 1;
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(!ok);
    let at = format!("{}:{erp_line}:", main.display());
    assert!(err.lines().any(|l| l.starts_with(&at) && l.contains("no upstream `nope`")), "{err}");
    assert!(err.lines().any(|l| l.starts_with(&at) && l.contains("needs a `tryton:` block")), "{err}");
    assert!(err.contains("policies/process/ (the quote rules) is missing"), "{err}");

    // An unknown endpoint kind is a typed error at its line.
    std::fs::write(&main, &base).unwrap();
    std::fs::write(
        &routes,
        std::fs::read_to_string(&routes).unwrap().patched("quote-to-order\n", "quote-to-invoice\n"),
    )
    .unwrap();
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(!ok);
    assert!(err.contains(&format!("{}:5:", routes.display())) && err.contains("quote-to-invoice"), "{err}");
}

/// Secure by default: a route that sends the upstream's credential must authenticate its callers,
/// and one that writes must require a scope, unless it says `public: true`.
#[test]
fn a_route_that_lends_the_erp_credential_to_anonymous_callers_is_refused_unless_public() {
    let dir = valid_dir();
    let routes = dir.path().join("routes/routes.yaml");
    let env = [("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")];
    let anonymous =
        "routes:\n  - name: open-write\n    match: { methods: [POST], path: /w }\n    upstream: bc\n";
    std::fs::write(&routes, anonymous).unwrap();
    let (ok, err) = check(dir.path(), &env);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}:2:", routes.display())) && err.contains("authenticates no caller"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("policies/keys.yaml"),
        "policies:\n  - name: keys\n    kind: api_key\n    keys: [{ consumer: c, sha256: 0a09661d177ef24293fd75fdf3a6516157782e4625aa440e2e5be7c879560177 }]\n",
    )
    .unwrap();
    std::fs::write(&routes, format!("{anonymous}    policies: [keys]\n")).unwrap();
    let (ok, err) = check(dir.path(), &env);
    assert!(!ok);
    assert!(err.contains("accepts writes") && err.contains("requires no scope"), "{err}");

    std::fs::write(&routes, format!("{anonymous}    policies: [keys]\n    scopes: [erp.write]\n")).unwrap();
    assert!(check(dir.path(), &env).0, "authenticated and scoped");
    std::fs::write(&routes, format!("{anonymous}    public: true\n")).unwrap();
    assert!(check(dir.path(), &env).0, "declared public");

    std::fs::write(
        &routes,
        format!("{anonymous}    public: true\n    pass_headers: {{ request: [authorization], response: [set-cookie] }}\n"),
    )
    .unwrap();
    let (ok, err) = check(dir.path(), &env);
    assert!(!ok);
    assert!(err.contains("pass_headers.request: `authorization` cannot be passed"), "{err}");
}

/// A JWT policy pointing at its IdP's JWKS URL is checked without fetching it, and `check`
/// never panics for want of a TLS provider.
#[test]
fn a_jwt_policy_with_a_jwks_url_is_checked_without_a_panic() {
    let dir = valid_dir();
    std::fs::write(
        dir.path().join("policies/idp.yaml"),
        "policies:\n  - name: idp\n    kind: jwt\n    issuer: https://login.example.com/\n    audiences: [gw]\n    jwks_url: https://login.example.com/.well-known/jwks.json\n",
    )
    .unwrap();
    let (ok, err) = check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")]);
    assert!(ok, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `cluster:` and `store:` combinations that cannot keep the promises are refused at their line;
/// the valid one passes without reaching PostgreSQL or Redis (check stays offline).
#[test]
fn cluster_mode_combinations_are_checked_with_file_and_line() {
    let dir = valid_dir();
    let file = dir.path().join("causeway.yaml");
    let base = std::fs::read_to_string(&file).unwrap();
    let budget = "    budget: { window_requests: 10, window_seconds: 1, max_concurrent: 2 }\n";
    let with = |extra: &str| {
        let text = base.patched(
            "        token: ${CAUSEWAY_TEST_UPSTREAM_TOKEN}\n",
            &format!("        token: ${{CAUSEWAY_TEST_UPSTREAM_TOKEN}}\n{budget}"),
        );
        std::fs::write(&file, format!("{text}{extra}")).unwrap();
        let line = |needle: &str| {
            std::fs::read_to_string(&file)
                .unwrap()
                .lines()
                .collect::<Vec<_>>()
                .iter()
                .rposition(|l| l.contains(needle))
                .map_or(0, |n| n + 1)
        };
        let (ok, err) =
            check(dir.path(), &[("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t"), ("PGURL", "postgres://db:1/x")]);
        (ok, err, line("replicas:"), line("url:"))
    };
    let (ok, err, replicas, _) = with("cluster:\n  replicas: 3\n");
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{replicas}:")) && err.contains("cluster.redis"),
        "{err}"
    );

    let (ok, err, _, _) = with("store:\n  backend: postgres\n");
    assert!(!ok && err.contains("needs `url:`"), "{err}");

    let (ok, err, _, url) = with("store:\n  backend: sqlite\n  url: postgres://x/y\n");
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{url}:")) && err.contains("backend: postgres"),
        "{err}"
    );

    let (ok, err, _, url) = with("store:\n  backend: postgres\n  url: mysql://x/y\n");
    assert!(!ok && err.contains(&format!("causeway.yaml:{url}:")), "{err}");

    let (ok, err, _, url) =
        with("cluster:\n  replicas: 2\n  redis: { url: \"http://127.0.0.1:6379\", lease_ms: 5000 }\n");
    assert!(!ok && err.contains(&format!("causeway.yaml:{url}:")) && err.contains("redis://"), "{err}");

    let (ok, err, replicas, _) = with("cluster:\n  replicas: 0\n");
    assert!(!ok && err.contains(&format!("causeway.yaml:{replicas}:")), "{err}");

    for (n, what) in [("0", "at least one write"), ("1001", "too many"), ("-5", "negative")] {
        let (ok, err, _, _) = with(&format!("store:\n  group_commit: {n}\n"));
        let line =
            std::fs::read_to_string(&file).unwrap().lines().position(|l| l.contains("group_commit")).unwrap()
                + 1;
        // Out of range names the setting; a negative number fails parsing, at the same line.
        let named = err.contains("group_commit") || (n == "-5" && err.contains("invalid"));
        assert!(!ok && err.contains(&format!("causeway.yaml:{line}")) && named, "{what}: {err}");
    }
    let (ok, err, _, _) = with("store:\n  group_commit: 1\n");
    assert!(ok, "1 (every write alone) is valid: {err}");

    // Valid: Redis and PostgreSQL named but never contacted by `check` (nothing listens on them).
    let (ok, err, _, _) = with(
        "store:\n  backend: postgres\n  url: ${PGURL}\n  group_commit: 200\ncluster:\n  replicas: 3\n  redis: { url: \"redis://127.0.0.1:1\", key_prefix: t }\n",
    );
    assert!(ok, "{err}");
}

/// `events:`: every mistake an operator can make in a subscriber is refused with the file, the
/// line and what to do; secrets come from the environment and must be Standard Webhooks secrets.
#[test]
fn event_subscribers_are_checked_with_file_line_and_remedy() {
    // The shipped process configuration (routes, rules, mappings), its `process:` block split off.
    let dir = tempfile::tempdir().unwrap();
    let opts = common::process::sandbox_options("http://127.0.0.1:9".into(), common::process::FAST);
    common::write_config(dir.path(), &opts, (18000, 18001, 18002));
    let file = dir.path().join("causeway.yaml");
    let whole = std::fs::read_to_string(&file).unwrap();
    let (base, rest) = whole.split_at(whole.find("process:\n").unwrap());
    let (base, process) = (base.to_string(), rest.trim_end().to_string() + "\n");
    let process = process.as_str();
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let run = |process: &str, subscriber: &str, secret: Option<&str>| {
        std::fs::write(&file, format!("{base}{process}events:\n  subscribers:\n{subscriber}")).unwrap();
        let mut env = vec![("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")];
        if let Some(s) = secret {
            env.push(("HOOK_SECRET", s));
        }
        let line = |needle: &str| {
            let text = std::fs::read_to_string(&file).unwrap();
            text.lines().collect::<Vec<_>>().iter().rposition(|l| l.contains(needle)).map_or(0, |n| n + 1)
        };
        let (ok, err) = check(dir.path(), &env);
        (ok, err, line("url:"), line("secret_env:"), line("types:"))
    };
    let sub = |url: &str, extra: &str| {
        format!("    crm:\n      url: {url}\n      secret_env: [HOOK_SECRET]\n{extra}")
    };

    let (ok, err, ..) = run(process, &sub("https://crm.example.com/hooks", ""), Some(good));
    assert!(ok, "a valid subscriber: {err}");

    let (ok, err, url, ..) = run(process, &sub("ftp://crm.example.com/hooks", ""), Some(good));
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{url}:")) && err.contains("http:// or https://"),
        "{err}"
    );

    let (ok, err, _, secret, _) = run(process, &sub("https://crm.example.com/h", ""), None);
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{secret}:")) && err.contains("`HOOK_SECRET` is not set"),
        "{err}"
    );
    for (bad, says) in [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
        ("whsec_!!not-base64\u{202e}", "base64"),
        ("whsec_c2hvcnQ=", "24 to 64 bytes"),
    ] {
        let (ok, err, _, secret, _) = run(process, &sub("https://crm.example.com/h", ""), Some(bad));
        assert!(
            !ok && err.contains(&format!("causeway.yaml:{secret}:")) && err.contains(says),
            "{bad}: {err}"
        );
    }

    let (ok, err, .., types) =
        run(process, &sub("https://crm.example.com/h", "      types: [order.shipped.v9]\n"), Some(good));
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{types}:"))
            && err.contains("unknown type `order.shipped.v9`"),
        "{err}"
    );

    let (ok, err, ..) = run(process, &sub("https://crm.example.com/h", "      timeout_ms: 0\n"), Some(good));
    assert!(!ok && err.contains("timeout_ms must be 100 to 120000"), "{err}");

    let odd = "    \"CRM 🦀\":\n      url: https://crm.example.com/h\n      secret_env: [HOOK_SECRET]\n";
    let (ok, err, ..) = run(process, odd, Some(good));
    assert!(!ok && err.contains("a name is 1 to 64 of a-z"), "{err}");

    let (ok, err, ..) = run("", &sub("https://crm.example.com/h", ""), Some(good));
    assert!(!ok && err.contains("add a `process:` block"), "{err}");
}

/// `process.changes` is checked with file, line and what to do: the notification URL, the
/// clientState secret (set, long enough, not absurd), the budget class; an erp-notifications
/// route that names consumer keys is refused (the ERP cannot present them).
#[test]
fn change_detection_settings_are_checked_with_file_line_and_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = common::process::sandbox_options("http://127.0.0.1:9".into(), common::process::FAST);
    common::write_config(dir.path(), &opts, (18010, 18011, 18012));
    let file = dir.path().join("causeway.yaml");
    let whole = std::fs::read_to_string(&file).unwrap();
    let run = |changes: &str, secret: Option<&str>| {
        std::fs::write(&file, format!("{}  changes:\n{changes}", whole.trim_end().to_string() + "\n"))
            .unwrap();
        let mut env = vec![("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")];
        if let Some(s) = secret {
            env.push(("ERP_STATE", s));
        }
        let line = |needle: &str| {
            let text = std::fs::read_to_string(&file).unwrap();
            text.lines().collect::<Vec<_>>().iter().rposition(|l| l.contains(needle)).map_or(0, |n| n + 1)
        };
        let (ok, err) = check(dir.path(), &env);
        (ok, err, line("notification_url:"), line("client_state_env:"), line("class:"))
    };
    let good_state = "0123456789abcdef0123456789abcdef";
    let block = |url: &str, extra: &str| {
        format!("    notification_url: {url}\n    client_state_env: ERP_STATE\n{extra}")
    };
    let (ok, err, ..) =
        run(&block("https://gw.example.com/process/v1/erp-notifications", ""), Some(good_state));
    assert!(ok, "valid change detection: {err}");

    let (ok, err, url, ..) = run(&block("gopher://gw.example.com/\u{202e}x", ""), Some(good_state));
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{url}:")) && err.contains("not an http(s) URL"),
        "{err}"
    );

    let (ok, err, _, var, _) = run(&block("https://gw.example.com/n", ""), None);
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{var}:")) && err.contains("openssl rand -hex 32"),
        "{err}"
    );
    for bad in ["short", &"x".repeat(2049)] {
        let (ok, err, _, var, _) = run(&block("https://gw.example.com/n", ""), Some(bad));
        assert!(!ok && err.contains(&format!("causeway.yaml:{var}:")) && err.contains("24 to 2048"), "{err}");
    }
    let (ok, err, .., class) =
        run(&block("https://gw.example.com/n", "    class: nightly\n"), Some(good_state));
    assert!(!ok && err.contains(&format!("causeway.yaml:{class}:")) && err.contains("`nightly`"), "{err}");

    let (ok, err, ..) = run("    client_state_env: ERP_STATE\n", Some(good_state));
    assert!(!ok && err.contains("give `notification_url`"), "{err}");

    // The notification route cannot ask for a consumer key.
    let routes = dir.path().join("routes/routes.yaml");
    let shipped = std::fs::read_to_string(&routes).unwrap();
    let keyed = shipped.patched(
        "    process: erp-notifications\n",
        "    process: erp-notifications\n    policies: [crm-keys]\n",
    );
    assert_ne!(keyed, shipped, "the shipped erp-notifications route");
    std::fs::write(&routes, keyed).unwrap();
    let (ok, err, ..) = run(&block("https://gw.example.com/n", ""), Some(good_state));
    assert!(!ok && err.contains("clientState") && err.contains("routes.yaml:"), "{err}");
}

/// A Salesforce write-back subscriber is checked with file, line and remedy: the org URL, the
/// connected app's credentials from the environment, the API version, the field names, and
/// a subscriber that is both a webhook and Salesforce.
#[test]
fn salesforce_subscribers_are_checked_with_file_line_and_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = common::process::sandbox_options("http://127.0.0.1:9".into(), common::process::FAST);
    common::write_config(dir.path(), &opts, (18020, 18021, 18022));
    let file = dir.path().join("causeway.yaml");
    let whole = std::fs::read_to_string(&file).unwrap();
    let run = |block: &str, credentials: bool| {
        std::fs::write(
            &file,
            format!("{}events:\n  subscribers:\n    sf:\n{block}", whole.trim_end().to_string() + "\n"),
        )
        .unwrap();
        let mut env = vec![
            ("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t"),
            ("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ];
        if credentials {
            env.extend([("SF_ID", "3MVG9"), ("SF_SECRET", "s3cr3t")]);
        }
        let line = |needle: &str| {
            let text = std::fs::read_to_string(&file).unwrap();
            text.lines().collect::<Vec<_>>().iter().rposition(|l| l.contains(needle)).map_or(0, |n| n + 1)
        };
        let (ok, err) = check(dir.path(), &env);
        (ok, err, line("instance_url:"), line("client_id_env:"), line("api_version:"))
    };
    let sf = |url: &str, extra: &str| {
        format!("      salesforce:\n        instance_url: {url}\n        client_id_env: SF_ID\n        client_secret_env: SF_SECRET\n{extra}")
    };
    let (ok, err, ..) = run(&sf("https://acme.my.salesforce.com", ""), true);
    assert!(ok, "a valid Salesforce subscriber: {err}");
    let (ok, err, url, ..) = run(&sf("acme.my.salesforce.com\u{202e}", ""), true);
    assert!(!ok && err.contains(&format!("causeway.yaml:{url}:")) && err.contains("My Domain URL"), "{err}");
    let (ok, err, _, id, _) = run(&sf("https://acme.my.salesforce.com", ""), false);
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{id}:")) && err.contains("`SF_ID` is not set"),
        "{err}"
    );
    let (ok, err, .., version) =
        run(&sf("https://acme.my.salesforce.com", "        api_version: 62\n"), true);
    assert!(!ok && err.contains(&format!("causeway.yaml:{version}:")) && err.contains("like v62.0"), "{err}");
    let (ok, err, ..) =
        run(&sf("https://acme.my.salesforce.com", "        fields: { status: \"Status; DROP\" }\n"), true);
    assert!(!ok && err.contains("not a Salesforce field API name"), "{err}");
    let both = format!(
        "      url: https://crm.example.com/h\n      secret_env: [HOOK_SECRET]\n{}",
        sf("https://acme.my.salesforce.com", "")
    );
    let (ok, err, ..) = run(&both, true);
    assert!(
        !ok && err
            .contains("either `url` and `secret_env` (a webhook), a `salesforce:` block or a `nats:` block"),
        "{err}"
    );

    // NATS JetStream.
    let nats = |url: &str, stream: &str, prefix: &str| {
        format!(
            "      nats:\n        url: {url}\n        stream: {stream}\n        subject_prefix: {prefix}\n"
        )
    };
    let (ok, err, ..) = run(&nats("nats://127.0.0.1:4222", "CAUSEWAY_PROD", "causeway.prod"), true);
    assert!(ok, "a valid NATS subscriber: {err}");
    for (block, says) in [
        (nats("http://127.0.0.1:4222", "S", "p"), "not a nats://host:port"),
        (nats("nats://127.0.0.1:4222", "BAD.NAME", "p"), "is not a stream name"),
        (nats("nats://127.0.0.1:4222", "S", "causeway.>"), "no wildcards"),
        (nats("nats://127.0.0.1:4222", "S", "causeway..prod"), "no wildcards"),
        (nats("nats://127.0.0.1:4222", "S\u{202e}", "p"), "is not a stream name"),
        (
            format!("{}        token_env: NO_SUCH_TOKEN\n", nats("nats://127.0.0.1:4222", "S", "p")),
            "`NO_SUCH_TOKEN` is not set",
        ),
    ] {
        let (ok, err, ..) = run(&block, true);
        assert!(!ok && err.contains("causeway.yaml:") && err.contains(says), "{block}: {err}");
    }
}

/// `traces:` is checked like the rest: the endpoint, the sampling ratio, the collector's headers
/// from the environment, unknown keys, each with file and line.
#[test]
fn trace_export_settings_are_checked_with_file_line_and_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let opts = common::process::sandbox_options("http://127.0.0.1:9".into(), common::process::FAST);
    common::write_config(dir.path(), &opts, (18030, 18031, 18032));
    let file = dir.path().join("causeway.yaml");
    let whole = std::fs::read_to_string(&file).unwrap();
    let run = |block: &str, with_key: bool| {
        std::fs::write(&file, format!("{}traces:\n{block}", whole.trim_end().to_string() + "\n")).unwrap();
        let mut env = vec![("CAUSEWAY_TEST_UPSTREAM_TOKEN", "t")];
        if with_key {
            env.push(("COLLECTOR_KEY", "k-123"));
        }
        let line = |needle: &str| {
            let text = std::fs::read_to_string(&file).unwrap();
            text.lines().collect::<Vec<_>>().iter().rposition(|l| l.contains(needle)).map_or(0, |n| n + 1)
        };
        let (ok, err) = check(dir.path(), &env);
        (ok, err, line("endpoint:"), line("sample_ratio:"), line("headers_env:"))
    };
    let good = "  endpoint: http://127.0.0.1:4318/v1/traces\n  headers_env: { x-api-key: COLLECTOR_KEY }\n";
    let (ok, err, ..) = run(good, true);
    assert!(ok, "valid trace settings: {err}");
    let (ok, err, _, _, headers) = run(good, false);
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{headers}:"))
            && err.contains("`COLLECTOR_KEY` is not set"),
        "{err}"
    );
    for endpoint in [
        "collector:4318",
        "ftp://collector/v1/traces",
        "http://\u{202e}/v1/traces",
        "\"\"",
        "http://user:secret@collector:4318/v1/traces",
        "http://collector:4318/v1/traces#frag",
        "http://collector:4318/v1/traces?key=1",
    ] {
        let (ok, err, line, ..) = run(&format!("  endpoint: {endpoint}\n"), true);
        assert!(
            !ok && err.contains(&format!("causeway.yaml:{line}:"))
                && err.contains("http://127.0.0.1:4318/v1/traces"),
            "{endpoint}: {err}"
        );
    }
    for ratio in ["1.5", "-0.1", ".nan"] {
        let (ok, err, _, line, _) =
            run(&format!("  endpoint: http://127.0.0.1:4318/v1/traces\n  sample_ratio: {ratio}\n"), true);
        assert!(
            !ok && err.contains(&format!("causeway.yaml:{line}:")) && err.contains("between 0 and 1"),
            "{ratio}: {err}"
        );
    }
    let (ok, err, ..) = run(
        "  endpoint: http://127.0.0.1:4318/v1/traces\n  headers_env: { \"bad header\": COLLECTOR_KEY }\n",
        true,
    );
    assert!(!ok && err.contains("not a header name"), "{err}");
    let (ok, err, endpoint, ..) = run(
        "  endpoint: http://127.0.0.1:4318/v1/traces\n  flush_interval_ms: 0\n  max_queue: 10000000\n",
        true,
    );
    assert!(
        !ok && err.contains(&format!("causeway.yaml:{}:", endpoint + 1))
            && err.contains("flush_interval_ms: 0 is not between 100 and 60000")
            && err.contains(&format!("causeway.yaml:{}:", endpoint + 2))
            && err.contains("max_queue: 10000000 is not between 64 and 100000"),
        "each out-of-range number at its own line: {err}"
    );
    let (ok, err, ..) = run("  endpoint: http://127.0.0.1:4318/v1/traces\n  exporter: grpc\n", true);
    assert!(!ok && err.contains("exporter"), "an unknown key is named: {err}");
}
