//! The mapping engine on arbitrary input: the shipped mediation policies on arbitrary JSON, and
//! arbitrary mapping tables (YAML) on a canonical order. Nothing may panic or hang.
#![no_main]

use causeway::config::Config;
use causeway::mediation::table::{Table, TableSpec};
use causeway::mediation::MediationPolicy;
use causeway::policy::Policy;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

fn shipped() -> &'static Vec<&'static MediationPolicy> {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    static POLICIES: OnceLock<Vec<&'static MediationPolicy>> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let config = CONFIG.get_or_init(|| causeway::config::load_with_env(&dir, &|_| None).expect("shipped config"));
        let mut names: Vec<&String> = config.policies.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| match config.policies[n].as_ref() {
                Policy::Mediation(m) => Some(m),
                _ => None,
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    if selector & 1 == 0 {
        let Ok(input) = serde_json::from_slice::<Value>(rest) else { return };
        let policies = shipped();
        let policy = policies[usize::from(selector >> 1) % policies.len()];
        for transform in [policy.request.as_ref().map(|r| &r.transform), policy.response.as_ref().map(|r| &r.transform)]
            .into_iter()
            .flatten()
        {
            let _ = transform.apply(input.clone(), policy.limits);
        }
    } else {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        let Ok(spec) = serde_saphyr::from_str::<TableSpec>(text) else { return };
        let Ok(table) = Table::compile(&spec) else { return };
        let order = json!({
            "customerNumber": "C10000", "currency": "EUR", "orderDate": "2026-11-27",
            "d": {"results": [{"SalesOrderDate": "/Date(1795737600000)/", "TotalNetAmount": "1.50"}]},
            "lines": [{"item": "1900-S", "quantity": 2, "unitPrice": 19.99}, {"item": "ü", "quantity": "0.5"}]
        });
        let _ = table.apply(&order);
        let _ = table.apply(&Value::Null);
    }
});
