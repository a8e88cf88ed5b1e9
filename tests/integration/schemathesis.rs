//! Schemathesis (from PyPI) against the OpenAPI document the gateway serves: generated and
//! mutated requests to every process operation; no 5xx, and every response (status, headers,
//! content type, body) must match the document.
//!
//! `positive_data_acceptance` is left out on purpose: a schema-valid quote is still refused
//! (422) when it breaks the order rules or names a customer the ERP does not have, and the
//! document says so.

use crate::common;

use crate::common::*;
use std::path::PathBuf;
use std::process::Command;

const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// A venv with schemathesis under the target directory, made on first use.
fn schemathesis() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("venv-schemathesis");
    let st = venv.join("bin/st");
    if st.exists() {
        return Some(st);
    }
    if Command::new("python3").arg("--version").output().is_err() {
        common::missing_service("python3", "schemathesis runs in a venv: install python3 with venv and pip");
        return None;
    }
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().unwrap();
    assert!(made.success(), "python3 -m venv failed (Debian: apt install python3-venv)");
    let installed =
        Command::new(venv.join("bin/pip")).args(["install", "--quiet", SCHEMATHESIS]).status().unwrap();
    assert!(installed.success(), "pip install {SCHEMATHESIS} failed: PyPI must be reachable");
    Some(st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_outside_the_document() {
    let Some(st) = tokio::task::spawn_blocking(schemathesis).await.unwrap() else { return };
    let sandbox = TestSandbox::start(Default::default()).await;
    let company = causeway::sandbox::data::COMPANY_ID;
    let mut opts =
        common::process::process_options(sandbox.url(), &format!("  erp: bc\n  company: {company}\n"));
    // The shipped quota: its 429s are part of the document too.
    opts.policies_yaml = common::process::shipped("policies/crm.yaml");
    let gw = TestGateway::start(opts).await;
    let url = gw.url("/process/v1/openapi.json");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(st)
            // Schemathesis keeps a cache in its working directory: not in the repository.
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .args(["run", &url, "--checks", "all", "--exclude-checks", "positive_data_acceptance"])
            .args(["-H", "x-api-key: demo-crm-key", "--max-time", "45", "--request-timeout", "10"])
            .args(["--workers", "2", "--no-color"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "{}",
        report.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}
