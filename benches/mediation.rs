//! Transformation throughput of the shipped mediation policies (criterion): a 2 KB and a 200 KB
//! sales order through the Business Central and SAP mappings, each direction, measured as the
//! gateway does it: parse the body, map (table, then jq where the policy has one), serialize.
//! Throughput is in bytes of input per second. Also schema validation of the canonical order.
//!
//!   cargo bench --bench mediation

use causeway::config::Config;
use causeway::mediation::MediationPolicy;
use causeway::policy::Policy;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        causeway::config::load_with_env(Path::new(env!("CARGO_MANIFEST_DIR")), &|_| None)
            .expect("shipped config")
    })
}

fn policy(name: &str) -> &'static MediationPolicy {
    match config().policies.get(name).map(|p| p.as_ref()) {
        Some(Policy::Mediation(m)) => m,
        _ => panic!("no mediation policy {name}"),
    }
}

/// A canonical order of about `bytes` bytes of JSON.
fn canonical_order(bytes: usize) -> Value {
    let line = |i: usize| {
        json!({"item": format!("19{:02}-S", i % 100), "description": format!("Line {i} – Schreibtisch höhenverstellbar"),
               "quantity": (i % 7 + 1) as f64 * 0.5, "unitPrice": 19.99 + i as f64, "discountPercent": (i % 4) * 5})
    };
    let mut order = json!({"customerNumber": "C10000", "externalReference": "006Dn000004ZqXcIAK", "currency": "EUR",
                           "orderDate": "2026-11-27", "requestedDeliveryDate": "2026-12-10", "lines": []});
    let mut i = 0;
    while serde_json::to_vec(&order).unwrap().len() < bytes {
        order["lines"].as_array_mut().unwrap().push(line(i));
        i += 1;
    }
    order
}

fn apply(policy: &MediationPolicy, request: bool, input: &[u8]) -> bytes::Bytes {
    let transform = if request {
        &policy.request.as_ref().unwrap().transform
    } else {
        &policy.response.as_ref().unwrap().transform
    };
    let doc: Value = serde_json::from_slice(input).unwrap();
    transform.apply(doc, policy.limits).unwrap()
}

/// What each ERP answers to a create of `order`: its own shape (the round-trip tests' echoes).
fn bc_answer(sent: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(sent).unwrap();
    v["id"] = json!("00000050-0000-4000-8000-000000000001");
    v["number"] = json!("S-ORD101001");
    serde_json::to_vec(&v).unwrap()
}

fn sap_answer(sent: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(sent).unwrap();
    v["SalesOrder"] = json!("4970");
    for item in v["to_Item"].as_array_mut().unwrap() {
        let p = item["to_PricingElement"].take();
        item["to_PricingElement"] = json!({"results": p});
    }
    let items = v["to_Item"].take();
    v["to_Item"] = json!({"results": items});
    serde_json::to_vec(&json!({"d": v})).unwrap()
}

fn transformations(c: &mut Criterion) {
    let mut group = c.benchmark_group("mediation");
    for (label, size) in [("2KB", 2 * 1024), ("200KB", 200 * 1024)] {
        let canonical = serde_json::to_vec(&canonical_order(size)).unwrap();
        for (dialect, name, answer) in [
            ("bc", "canonical-sales-order-create-bc", bc_answer as fn(&[u8]) -> Vec<u8>),
            ("sap", "canonical-sales-order-create-sap", sap_answer),
        ] {
            let p = policy(name);
            group.throughput(Throughput::Bytes(canonical.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{dialect}/request"), label),
                &canonical,
                |b, input| b.iter(|| apply(p, true, input)),
            );
            let erp = answer(&apply(p, true, &canonical));
            group.throughput(Throughput::Bytes(erp.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{dialect}/response"), label),
                &erp,
                |b, input| b.iter(|| apply(p, false, input)),
            );
        }
        let p = policy("canonical-sales-order-create-bc");
        group.throughput(Throughput::Bytes(canonical.len() as u64));
        group.bench_with_input(BenchmarkId::new("validate", label), &canonical, |b, input| {
            b.iter(|| {
                let doc: Value = serde_json::from_slice(input).unwrap();
                assert!(p.check_request_body(&doc).is_empty());
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = transformations
}
criterion_main!(benches);
