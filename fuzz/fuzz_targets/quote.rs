//! Quote-to-order's intake on hostile text: the input is split into strings (at NUL) that replace
//! every string field of both quote shapes, a canonical quote and a Salesforce Opportunity; each
//! goes through intake (the line bound, the mapping, both schemas) and, when accepted, through the
//! rules against master data that matches it, and every string also through the date conversions.
//! Any outcome but a panic is fine: a refusal is a 4xx for the caller.
#![no_main]

use causeway::config::Config;
use causeway::mediation::convert::{parse_rfc3339, Conversion};
use causeway::process::intake;
use causeway::process::model::{Address, Credit, Customer, Product, Quote};
use causeway::process::rules::MasterData;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        causeway::config::load_with_env(&dir, &|_| None).expect("shipped config")
    })
}

fn shipped(path: &str) -> Value {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

fn canonical() -> Value {
    json!({
        "opportunityId": "006Dn000004ZqXcIAK", "customer": {"number": "C10000"}, "currency": "EUR",
        "region": "EU", "paymentTerms": "NET30",
        "contract": {"startDate": "2026-12-01", "endDate": "2028-11-30", "terms": "standard"},
        "lines": [{"product": "1900-S", "quantity": 2, "unitPrice": 18.39, "discountPercent": 5}],
        "approvals": [{"reference": "APP-1", "approver": "someone"}]
    })
}

/// Replace the string values of `doc`, in document order, with `values` (cycling).
fn with_strings(doc: &mut Value, values: &[&str], next: &mut usize) {
    match doc {
        Value::String(s) => {
            *s = values[*next % values.len()].to_string();
            *next += 1;
        }
        Value::Array(a) => a.iter_mut().for_each(|v| with_strings(v, values, next)),
        Value::Object(o) => o.values_mut().for_each(|v| with_strings(v, values, next)),
        _ => {}
    }
}

/// Master data that knows the quote's own customer and products, so the rules run in full.
fn master_for(quote: &Quote) -> MasterData {
    let customer = Customer {
        number: quote.customer.number.clone().unwrap_or_default(),
        name: "x".into(),
        billing_address: Address { line1: "a".into(), city: "b".into(), postal_code: "c".into(), country: "DE".into(), ..Address::default() },
        currency: quote.currency.clone(),
        region: quote.region.clone(),
        tax_id: "DE1".into(),
        blocked: "none".into(),
        credit: Credit { limit: 1e9, balance: 0.0 },
    };
    let products = quote
        .lines
        .iter()
        .map(|l| (l.product.clone(), Product { number: l.product.clone(), name: "p".into(), blocked: false, unit_price: l.unit_price }))
        .collect();
    let regional_prices = quote.lines.iter().map(|l| (l.product.clone(), l.unit_price)).collect();
    MasterData { customer: Some(customer), products, regional_prices }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let values: Vec<&str> = text.split('\0').collect();
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap());
    let config = config();
    for mut doc in [canonical(), shipped("tests/fixtures/salesforce/opportunity-closed-won.json")] {
        with_strings(&mut doc, &values, &mut 0);
        if let Ok(quote) = runtime.block_on(intake::to_quote(&config.policies, 200, doc)) {
            if let Some(rules) = &config.process_rules {
                let _ = rules.validate(&quote, &master_for(&quote));
            }
            let _ = serde_json::to_string(&quote.to_sales_order("C10000"));
        }
    }
    for v in &values {
        let _ = parse_rfc3339(v);
        for c in [Conversion::DateToOdata, Conversion::OdataToDate, Conversion::OdataToDatetime, Conversion::StringToNumber] {
            let _ = c.apply(&json!(v));
        }
    }
});
