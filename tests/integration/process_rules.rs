//! Quote validation rules (policies/process/), one test per rule: a quote (or ERP master data)
//! that breaks only that rule gets exactly that violation; one quote breaking five rules gets all
//! five. Master data is the sandbox's, through the shipped canonical mappings.

use crate::common::process::{good_quote, price};
use causeway::config::Config;
use causeway::policy::Policy;
use causeway::process::model::{Approval, Customer, Product, Quote, QuoteLine};
use causeway::process::rules::{MasterData, Rules};
use causeway::sandbox::data;
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

fn rules() -> &'static Rules {
    config().process_rules.as_deref().expect("policies/process/ is loaded")
}

/// An ERP record in its canonical shape, through a shipped response mapping.
fn canonical<T: serde::de::DeserializeOwned>(policy: &str, erp: Value) -> T {
    let Some(Policy::Mediation(m)) = config().policies.get(policy).map(|p| p.as_ref()) else {
        panic!("{policy}")
    };
    let bytes = m.response.as_ref().unwrap().transform.apply(erp, m.limits).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn customer(number: &str) -> Option<Customer> {
    data::customers()
        .into_iter()
        .find(|c| c["number"] == number)
        .map(|c| canonical("canonical-customer-bc", c))
}

/// The ERP's view of everything the quote names, in the quote's region.
fn master(quote: &Quote) -> MasterData {
    let items = data::items();
    let products = items
        .iter()
        .map(|i| canonical::<Product>("canonical-item-bc", i.clone()))
        .map(|p| (p.number.clone(), p))
        .collect();
    let regional_prices = data::price_list_lines(&items)
        .into_iter()
        .filter(|l| l["region"] == quote.region.as_str())
        .map(|l| (l["itemNumber"].as_str().unwrap().to_string(), l["unitPrice"].as_f64().unwrap()))
        .collect();
    MasterData { customer: quote.customer.number.as_deref().and_then(customer), products, regional_prices }
}

fn codes(quote: &Quote, master: &MasterData) -> Vec<(String, &'static str)> {
    rules().validate(quote, master).into_iter().map(|v| (v.pointer, v.code)).collect()
}

fn only(quote: &Quote, master: &MasterData, pointer: &str, code: &str) {
    let found = rules().validate(quote, master);
    assert_eq!(found.len(), 1, "exactly one violation expected, got {found:#?}");
    assert_eq!((found[0].pointer.as_str(), found[0].code), (pointer, code));
    assert!(!found[0].message.is_empty() && !found[0].remedy.is_empty());
}

#[test]
fn a_good_quote_passes_every_rule() {
    let q = good_quote("006Dn000004ZqXcIAK");
    assert_eq!(codes(&q, &master(&q)), vec![]);
}

#[test]
fn customer_not_found() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.customer.number = Some("C99999".into());
    only(&q, &master(&q), "/customer/number", "customer.not_found");
}

#[test]
fn customer_blocked() {
    let q = good_quote("006Dn000004ZqXcIAK");
    let mut m = master(&q);
    m.customer.as_mut().unwrap().blocked = "all".into();
    only(&q, &m, "/customer/number", "customer.blocked");
}

#[test]
fn customer_blocked_for_shipping_only_may_still_order() {
    let q = good_quote("006Dn000004ZqXcIAK");
    let mut m = master(&q);
    m.customer.as_mut().unwrap().blocked = "shipping".into();
    assert_eq!(codes(&q, &m), vec![]);
}

#[test]
fn customer_incomplete_billing_address() {
    let q = good_quote("006Dn000004ZqXcIAK");
    let mut m = master(&q);
    m.customer.as_mut().unwrap().billing_address.postal_code = " ".into();
    only(&q, &m, "/customer/number", "customer.incomplete_billing_address");
}

#[test]
fn customer_tax_id_missing_where_the_region_needs_one() {
    let q = good_quote("006Dn000004ZqXcIAK");
    let mut m = master(&q);
    m.customer.as_mut().unwrap().tax_id.clear();
    only(&q, &m, "/customer/number", "customer.tax_id_missing");
}

#[test]
fn customer_credit_exceeded() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.lines[1].quantity = 20_000.0;
    only(&q, &master(&q), "/lines", "customer.credit_exceeded");
}

#[test]
fn product_not_found() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.lines[1].product = "NO-SUCH-ITEM".into();
    only(&q, &master(&q), "/lines/1/product", "product.not_found");
}

#[test]
fn product_not_salable() {
    let blocked = data::items().into_iter().find(|i| i["blocked"] == true).unwrap();
    let number = blocked["number"].as_str().unwrap();
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.lines[1] = QuoteLine {
        product: number.into(),
        quantity: 1.0,
        unit_price: price("EU", number),
        discount_percent: 0.0,
    };
    only(&q, &master(&q), "/lines/1/product", "product.not_salable");
}

#[test]
fn product_not_allowed_in_the_region() {
    let us_only = data::items().into_iter().find(|i| i["itemCategoryCode"] == "US-ONLY").unwrap();
    let number = us_only["number"].as_str().unwrap();
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.lines[1] = QuoteLine {
        product: number.into(),
        quantity: 1.0,
        unit_price: price("US", number),
        discount_percent: 0.0,
    };
    only(&q, &master(&q), "/lines/1/product", "product.not_allowed_in_region");
}

#[test]
fn tax_unknown_jurisdiction() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    let m = master(&q);
    q.region = "LATAM".into();
    q.lines[0].discount_percent = 0.0;
    only(&q, &m, "/region", "tax.unknown_jurisdiction");
}

#[test]
fn tax_region_must_be_the_customers() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.region = "US".into();
    q.currency = "USD".into();
    for line in &mut q.lines {
        line.unit_price = price("US", &line.product);
    }
    only(&q, &master(&q), "/region", "tax.region_mismatch");
}

#[test]
fn contract_currency_not_allowed() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.currency = "USD".into();
    only(&q, &master(&q), "/currency", "contract.currency_not_allowed");
}

#[test]
fn contract_payment_terms_not_allowed() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.payment_terms = "NET90".into();
    only(&q, &master(&q), "/paymentTerms", "contract.payment_terms_not_allowed");
}

#[test]
fn contract_dates_must_be_real_ordered_and_not_too_long() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.contract.end_date = "2026-11-30".into();
    only(&q, &master(&q), "/contract/endDate", "contract.end_before_start");
    q.contract.end_date = "2032-12-01".into();
    only(&q, &master(&q), "/contract/endDate", "contract.term_too_long");
    q.contract.start_date = "2026-02-30".into();
    only(&q, &master(&q), "/contract/startDate", "contract.invalid_date");
}

#[test]
fn pricing_unit_price_outside_tolerance() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.lines[1].unit_price *= 1.05;
    only(&q, &master(&q), "/lines/1/unitPrice", "pricing.price_mismatch");
}

#[test]
fn pricing_discount_above_threshold_needs_an_approval() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.lines[0].discount_percent = 12.0;
    only(&q, &master(&q), "/lines/0/discountPercent", "pricing.discount_needs_approval");
    q.approvals.push(Approval { reference: "APPR-2026-0042".into(), approver: None });
    assert_eq!(codes(&q, &master(&q)), vec![]);
}

#[test]
fn five_broken_rules_are_all_reported_at_once() {
    let mut q = good_quote("006Dn000004ZqXcIAK");
    q.currency = "USD".into();
    q.payment_terms = "NET90".into();
    q.contract.end_date = "2026-01-01".into();
    q.lines[1].unit_price = 1.0;
    q.lines[0].discount_percent = 30.0;
    let mut found = codes(&q, &master(&q));
    found.sort();
    assert_eq!(
        found,
        vec![
            ("/contract/endDate".to_string(), "contract.end_before_start"),
            ("/currency".to_string(), "contract.currency_not_allowed"),
            ("/lines/0/discountPercent".to_string(), "pricing.discount_needs_approval"),
            ("/lines/1/unitPrice".to_string(), "pricing.price_mismatch"),
            ("/paymentTerms".to_string(), "contract.payment_terms_not_allowed"),
        ]
    );
}

#[test]
fn quotes_parse_from_the_canonical_json_and_refuse_unknown_fields() {
    let q: Quote = serde_json::from_value(json!({
        "opportunityId": "006Dn000004ZqXcIAK", "customer": {"number": "C10000"}, "currency": "EUR", "region": "EU",
        "paymentTerms": "NET30", "contract": {"startDate": "2026-12-01", "endDate": "2028-11-30"},
        "lines": [{"product": "1900-S", "quantity": 2, "unitPrice": 18.39}], "approvals": [{"reference": "A-1"}]
    }))
    .unwrap();
    assert_eq!(q.lines[0].discount_percent, 0.0);
    assert!(serde_json::from_value::<Quote>(json!({"opportunityId": "x", "surprise": 1})).is_err());
}

#[test]
fn every_canonical_schema_compiles_and_the_quote_schema_matches_the_rust_type() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/schemas/canonical");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        causeway::config::policies::load_schema(&path).unwrap_or_else(|e| panic!("{e}"));
    }
    let schema = causeway::config::policies::load_schema(&dir.join("quote.json")).unwrap();
    let mut quote = good_quote("006Dn000004ZqXcIAK");
    quote.approvals.push(Approval { reference: "APPR-1".into(), approver: Some("cfo@example.com".into()) });
    let as_json = serde_json::to_value(&quote).unwrap();
    assert_eq!(schema.violations("body", &as_json), vec![], "{as_json}");
    let mut broken = as_json.clone();
    broken["lines"][0]["quantity"] = json!(0);
    broken["contract"]["endDate"] = json!("2028-13-01");
    assert_eq!(schema.violations("body", &broken).len(), 2);
}

#[test]
fn the_sales_order_schemas_match_their_rust_types() {
    use causeway::process::model::{SalesOrder, Totals};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/schemas/canonical");
    let create = good_quote("006Dn000004ZqXcIAK").to_sales_order("C10000");
    let create_json = serde_json::to_value(&create).unwrap();
    let schema = causeway::config::policies::load_schema(&dir.join("sales-order-create.json")).unwrap();
    assert_eq!(schema.violations("body", &create_json), vec![], "{create_json}");
    assert_eq!(create_json["externalReference"], "006Dn000004ZqXcIAK");
    let order = SalesOrder {
        id: "00000050-0000-4000-8000-0000000003e9".into(),
        number: "S-ORD102001".into(),
        external_reference: Some(create.external_reference.clone()),
        customer_number: create.customer_number.clone(),
        customer_name: Some("Adatum Handels GmbH".into()),
        currency: "EUR".into(),
        order_date: Some("2026-11-27".into()),
        requested_delivery_date: None,
        status: "Draft".into(),
        totals: Some(Totals { discount: 0.0, net: 39.98, tax: 7.6, gross: 47.58 }),
        lines: create.lines.clone(),
    };
    let order_json = serde_json::to_value(&order).unwrap();
    let schema = causeway::config::policies::load_schema(&dir.join("sales-order.json")).unwrap();
    assert_eq!(schema.violations("body", &order_json), vec![], "{order_json}");
    assert_eq!(serde_json::from_value::<SalesOrder>(order_json).unwrap(), order);
}

#[test]
fn the_invoice_and_payment_status_schemas_match_their_rust_types() {
    use causeway::process::model::{Invoice, InvoiceStatus, PaymentStatus};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/schemas/canonical");
    let payment = PaymentStatus {
        invoice_number: "PS-INV103001".into(),
        status: InvoiceStatus::PartiallyPaid,
        amount_paid: 100.0,
        amount_due: 26.59,
        last_payment_date: Some("2026-12-15".into()),
    };
    let invoice = Invoice {
        number: "PS-INV103001".into(),
        order_number: "S-ORD102001".into(),
        external_reference: Some("006Dn000004ZqXcIAK".into()),
        customer_number: "C10000".into(),
        currency: "EUR".into(),
        invoice_date: "2026-12-01".into(),
        due_date: "2026-12-31".into(),
        total_excluding_tax: 89.57,
        total_tax: 17.02,
        total_including_tax: 106.59,
        status: InvoiceStatus::PartiallyPaid,
        payment: Some(payment.clone()),
    };
    for (file, value) in [
        ("invoice.json", serde_json::to_value(&invoice).unwrap()),
        ("payment-status.json", serde_json::to_value(&payment).unwrap()),
    ] {
        let schema = causeway::config::policies::load_schema(&dir.join(file)).unwrap();
        assert_eq!(schema.violations("body", &value), vec![], "{file}: {value}");
        let mut broken = value.clone();
        broken["status"] = json!("settled");
        assert_eq!(schema.violations("body", &broken).len(), 1, "{file} refuses an unknown status");
    }
    assert_eq!(serde_json::to_value(InvoiceStatus::PartiallyPaid).unwrap(), "partially_paid");
}

#[test]
fn a_closed_won_salesforce_opportunity_becomes_a_valid_canonical_quote() {
    let Some(Policy::Mediation(m)) =
        config().policies.get("salesforce-opportunity-to-quote").map(|p| p.as_ref())
    else {
        panic!("the shipped Salesforce mapping")
    };
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/salesforce/opportunity-closed-won.json");
    let opportunity: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(m.check_request_body(&opportunity), vec![]);
    let request = m.request.as_ref().unwrap();
    let quote: Quote =
        serde_json::from_slice(&request.transform.apply(opportunity.clone(), m.limits).unwrap()).unwrap();
    assert_eq!(quote.opportunity_id, "006Dn000004ZqXcIAK");
    assert_eq!(quote.customer.crm_account_id.as_deref(), Some("001Dn00000AbCdEIAV"));
    assert_eq!(quote.lines[0].product, "1900-S", "the product code is the ERP item number");
    assert_eq!(quote.lines[1].discount_percent, 0.0, "a null discount is none");
    assert!(quote.approvals.is_empty());
    assert_eq!(codes(&quote, &master(&quote)), vec![], "the deal passes every rule");

    // Anything but Closed Won is refused, at /StageName.
    let mut open = opportunity;
    open["StageName"] = json!("Negotiation/Review");
    let refused = m.check_request_body(&open);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!((refused[0].pointer.as_str(), refused[0].keyword.as_str()), ("/StageName", "const"));
}
