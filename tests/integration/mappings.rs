//! The shipped mediation policies (policies/mediation.yaml and its schemas and mappings), loaded
//! as `causeway serve` loads them, against hand-written canonical documents and recorded-shape
//! ERP fixtures: every mapping operation and conversion, both directions, both dialects.

use causeway::config::Config;
use causeway::mediation::{Direction, MediationPolicy, TransformFailure};
use causeway::policy::Policy;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        causeway::config::load_with_env(Path::new(env!("CARGO_MANIFEST_DIR")), &|_| None)
            .expect("the shipped configuration loads")
    })
}

fn policy(name: &str) -> &'static MediationPolicy {
    match config().policies.get(name).map(|p| p.as_ref()) {
        Some(Policy::Mediation(m)) => m,
        _ => panic!("no mediation policy `{name}` in policies/"),
    }
}

fn transform(name: &str, direction: Direction, input: Value) -> Result<Value, TransformFailure> {
    let p = policy(name);
    let t = match direction {
        Direction::Request => &p.request.as_ref().expect("request mediation").transform,
        Direction::Response => &p.response.as_ref().expect("response mediation").transform,
    };
    t.apply(input, p.limits).map(|b| serde_json::from_slice(&b).expect("output is JSON"))
}

fn request(name: &str, input: Value) -> Value {
    transform(name, Direction::Request, input).expect("request maps")
}

fn response(name: &str, input: Value) -> Value {
    transform(name, Direction::Response, input).expect("response maps")
}

fn fixture(path: &str) -> Value {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
    serde_json::from_slice(&std::fs::read(&full).expect("fixture exists")).expect("fixture is JSON")
}

/// JSON equality where numbers compare by value (`2` equals `2.0`): the ERPs disagree on it.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn assert_same(actual: &Value, expected: &Value) {
    assert!(same(actual, expected), "\nactual:   {actual}\nexpected: {expected}");
}

fn canonical_order() -> Value {
    json!({
        "customerNumber": "C10000",
        "externalReference": "006Dn000004ZqXcIAK",
        "currency": "EUR",
        "orderDate": "2026-11-27",
        "requestedDeliveryDate": "2026-12-10",
        "lines": [
            {"item": "1900-S", "description": "ATHENS Desk – höhenverstellbar ✓", "quantity": 2, "unitPrice": 19.99, "discountPercent": 5},
            {"item": "1924-W", "quantity": 0.5, "unitPrice": 2299.34}
        ]
    })
}

// ---- Business Central ----

#[test]
fn bc_create_renames_fields_sets_line_types_and_maps_every_line() {
    let bc = request("canonical-sales-order-create-bc", canonical_order());
    assert_same(
        &bc,
        &json!({
            "customerNumber": "C10000",
            "externalDocumentNumber": "006Dn000004ZqXcIAK",
            "currencyCode": "EUR",
            "orderDate": "2026-11-27",
            "requestedDeliveryDate": "2026-12-10",
            "salesOrderLines": [
                {"lineType": "Item", "lineObjectNumber": "1900-S", "description": "ATHENS Desk – höhenverstellbar ✓",
                 "quantity": 2, "unitPrice": 19.99, "discountPercent": 5},
                {"lineType": "Item", "lineObjectNumber": "1924-W", "quantity": 0.5, "unitPrice": 2299.34}
            ]
        }),
    );
}

#[test]
fn bc_create_leaves_out_missing_optional_fields_and_keeps_nulls() {
    let minimal = json!({"customerNumber": "C10000", "externalReference": "X", "currency": "USD",
                         "orderDate": null, "lines": [{"item": "1900-S", "quantity": 1}]});
    assert_same(
        &request("canonical-sales-order-create-bc", minimal),
        &json!({"customerNumber": "C10000", "externalDocumentNumber": "X", "currencyCode": "USD", "orderDate": null,
                "salesOrderLines": [{"lineType": "Item", "lineObjectNumber": "1900-S", "quantity": 1}]}),
    );
}

#[test]
fn bc_create_refuses_a_line_without_an_item_at_its_pointer() {
    let bad = json!({"customerNumber": "C10000", "lines": [{"item": "A", "quantity": 1}, {"quantity": 1}]});
    match transform("canonical-sales-order-create-bc", Direction::Request, bad) {
        Err(TransformFailure::Mapping { pointer, .. }) => assert_eq!(pointer, "/lines/1/item"),
        other => panic!("expected a mapping failure, got {other:?}"),
    }
}

#[test]
fn bc_order_maps_to_canonical_with_totals_lines_and_etag() {
    let bc = fixture("bc/sales-order.json");
    assert_same(&response("canonical-sales-order-bc", bc), &fixture("bc/sales-order.canonical.json"));
}

#[test]
fn bc_lists_map_every_element_and_an_empty_list() {
    let list = json!({"@odata.context": "x", "value": [fixture("bc/sales-order.json"), fixture("bc/sales-order.json")]});
    let out = response("canonical-sales-order-list-bc", list);
    assert_eq!(out["items"].as_array().map(Vec::len), Some(2));
    assert_same(&out["items"][1], &fixture("bc/sales-order.canonical.json"));
    assert_same(&response("canonical-sales-order-list-bc", json!({"value": []})), &json!({"items": []}));
}

#[test]
fn bc_customers_and_items_map_from_the_sandbox_master_data() {
    let customers = causeway::sandbox::data::customers();
    let blocked =
        customers.iter().find(|c| c["blocked"] == "All").expect("the sandbox has a blocked customer");
    let out = response("canonical-customer-bc", blocked.clone());
    assert_eq!(out["blocked"], "all", "BC's blocked code is translated");
    assert_eq!(out["number"], blocked["number"]);
    assert_eq!(out["billingAddress"]["country"], blocked["country"]);
    assert_eq!(out["credit"]["limit"], blocked["creditLimit"]);
    let open = customers.iter().find(|c| c["blocked"] == "").expect("an open customer");
    assert_eq!(response("canonical-customer-bc", open.clone())["blocked"], "none");

    let items = causeway::sandbox::data::items();
    let list = response("canonical-item-list-bc", json!({"value": items}));
    assert_eq!(list["items"].as_array().map(Vec::len), Some(items.len()));
    assert_eq!(list["items"][0]["name"], items[0]["displayName"]);
    assert_eq!(list["items"][0]["unitOfMeasure"], items[0]["baseUnitOfMeasureCode"]);
}

// ---- SAP S/4HANA API_SALES_ORDER_SRV ----

#[test]
fn sap_create_speaks_odata_v2_decimal_strings_dates_and_numbered_items() {
    let sap = request("canonical-sales-order-create-sap", canonical_order());
    assert_eq!(
        sap,
        json!({
            "SalesOrderType": "OR",
            "SoldToParty": "C10000",
            "PurchaseOrderByCustomer": "006Dn000004ZqXcIAK",
            "TransactionCurrency": "EUR",
            "SalesOrderDate": "/Date(1795737600000)/",
            "RequestedDeliveryDate": "/Date(1796860800000)/",
            "to_Item": [
                {"SalesOrderItem": "10", "Material": "1900-S", "SalesOrderItemText": "ATHENS Desk – höhenverstellbar ✓",
                 "RequestedQuantity": "2",
                 "to_PricingElement": [
                     {"ConditionType": "PR00", "ConditionRateValue": "19.99"},
                     {"ConditionType": "K007", "ConditionRateValue": "5"}
                 ]},
                {"SalesOrderItem": "20", "Material": "1924-W", "RequestedQuantity": "0.5",
                 "to_PricingElement": [{"ConditionType": "PR00", "ConditionRateValue": "2299.34"}]}
            ]
        })
    );
}

#[test]
fn sap_order_fixture_maps_to_canonical() {
    assert_same(
        &response("canonical-sales-order-sap", fixture("sap/sales-order.json")),
        &fixture("sap/sales-order.canonical.json"),
    );
}

#[test]
fn sap_list_fixture_maps_to_canonical_with_deferred_items_and_null_dates() {
    assert_same(
        &response("canonical-sales-order-list-sap", fixture("sap/sales-order-list.json")),
        &fixture("sap/sales-order-list.canonical.json"),
    );
}

#[test]
fn sap_decimal_edge_cases_are_exact() {
    let order = |qty: Value, price: Value| json!({"customerNumber": "C1", "currency": "EUR", "lines": [{"item": "I", "quantity": qty, "unitPrice": price}]});
    let line = |out: &Value| out["to_Item"][0].clone();
    let out = request("canonical-sales-order-create-sap", order(json!(0.1 + 0.2), json!(123456789012345i64)));
    assert_eq!(line(&out)["RequestedQuantity"], "0.30000000000000004");
    assert_eq!(line(&out)["to_PricingElement"][0]["ConditionRateValue"], "123456789012345");
    let out = request("canonical-sales-order-create-sap", order(json!(-0.0), json!(1234567890123.45)));
    assert_eq!(line(&out)["RequestedQuantity"], "0", "negative zero is zero");
    assert_eq!(line(&out)["to_PricingElement"][0]["ConditionRateValue"], "1234567890123.45");

    // And back: SAP's padded decimals become exact numbers; more digits than a JSON number holds
    // exactly is refused (a 502 for the caller), never rounded.
    let mut sap = fixture("sap/sales-order.json");
    sap["d"]["TotalNetAmount"] = json!("999999999999999.99");
    let refused = transform("canonical-sales-order-sap", Direction::Response, sap.clone()).unwrap_err();
    assert!(
        matches!(&refused, TransformFailure::Mapping { pointer, .. } if pointer == "/d/TotalNetAmount"),
        "{refused:?}"
    );
    sap["d"]["TotalNetAmount"] = json!("-0.000");
    assert_eq!(response("canonical-sales-order-sap", sap)["totals"]["net"], json!(0));
}

#[test]
fn sap_create_refuses_an_impossible_date() {
    let mut order = canonical_order();
    order["orderDate"] = json!("2026-02-30");
    match transform("canonical-sales-order-create-sap", Direction::Request, order) {
        Err(TransformFailure::Mapping { pointer, detail }) => {
            assert_eq!(pointer, "/orderDate");
            assert!(detail.contains("no such day"), "{detail}");
        }
        other => panic!("expected a mapping failure, got {other:?}"),
    }
}

// ---- round trips: canonical → dialect → canonical ----

/// What Business Central answers to a create: the posted fields, plus what it adds.
fn bc_echo(created: &Value) -> Value {
    let mut echo = created.clone();
    echo["id"] = json!("00000050-0000-4000-8000-000000000001");
    echo["number"] = json!("S-ORD101001");
    echo
}

/// What SAP answers to a deep insert: navigation properties wrapped in `results`, under `d`.
fn sap_echo(created: &Value) -> Value {
    let mut order = created.clone();
    order["SalesOrder"] = json!("4970");
    if let Some(items) = order.get_mut("to_Item").and_then(Value::as_array_mut) {
        for item in items.iter_mut() {
            let pricing = item["to_PricingElement"].take();
            item["to_PricingElement"] = json!({"results": pricing});
        }
    }
    let items = order["to_Item"].take();
    if !items.is_null() {
        order["to_Item"] = json!({"results": items});
    }
    json!({"d": order})
}

/// The canonical fields a round trip must preserve: those of the create document.
fn restricted_to(back: &Value, original: &Value) -> Value {
    match (back, original) {
        (Value::Object(b), Value::Object(o)) => Value::Object(
            o.keys().map(|k| (k.clone(), restricted_to(b.get(k).unwrap_or(&Value::Null), &o[k]))).collect(),
        ),
        (Value::Array(b), Value::Array(o)) => {
            Value::Array(b.iter().zip(o).map(|(b, o)| restricted_to(b, o)).collect())
        }
        _ => back.clone(),
    }
}

#[test]
fn canonical_round_trips_through_business_central() {
    let original = canonical_order();
    let bc = request("canonical-sales-order-create-bc", original.clone());
    let back = response("canonical-sales-order-create-bc", bc_echo(&bc));
    assert_same(&restricted_to(&back, &original), &original);
}

#[test]
fn canonical_round_trips_through_sap() {
    let original = canonical_order();
    let sap = request("canonical-sales-order-create-sap", original.clone());
    let back = response("canonical-sales-order-create-sap", sap_echo(&sap));
    assert_same(&restricted_to(&back, &original), &original);
}

/// Exposed for the property tests.
pub fn round_trip(dialect: &str, original: &Value) -> Value {
    let (create, echo): (&str, fn(&Value) -> Value) = match dialect {
        "bc" => ("canonical-sales-order-create-bc", bc_echo),
        _ => ("canonical-sales-order-create-sap", sap_echo),
    };
    let sent = request(create, original.clone());
    restricted_to(&response(create, echo(&sent)), original)
}

mod properties {
    //! Property tests of the mapping engine: arbitrary JSON never panics any shipped table or
    //! program, and generated canonical orders survive the round trip through both dialects.
    use super::*;
    use proptest::prelude::*;

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            // Strings that look like what the conversions parse.
            "-?[0-9]{1,20}(\\.[0-9]{0,20})?".prop_map(Value::String),
            "/Date\\(-?[0-9]{1,16}([+-][0-9]{4})?\\)/".prop_map(Value::String),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,4})?(Z|[+-][0-9]{2}:[0-9]{2}))?"
                .prop_map(Value::String),
        ];
        let keys = prop_oneof![
            Just("lines".to_string()),
            Just("quantity".to_string()),
            Just("unitPrice".to_string()),
            Just("orderDate".to_string()),
            Just("d".to_string()),
            Just("results".to_string()),
            Just("to_Item".to_string()),
            Just("value".to_string()),
            Just("to_PricingElement".to_string()),
            Just("RequestedQuantity".to_string()),
            Just("SalesOrderDate".to_string()),
            Just("customerNumber".to_string()),
            Just("item".to_string()),
            "[a-zA-Z_@.]{1,8}",
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(keys.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn decimal() -> impl Strategy<Value = Value> {
        prop_oneof![
            (0i64..1_000_000_000).prop_map(|n| json!(n)),
            (0i64..10_000_000_000_000, 0u32..4).prop_map(|(m, s)| json!(m as f64 / 10f64.powi(s as i32))),
            (0.0f64..1e6).prop_map(|f| json!(f)),
        ]
    }

    fn date() -> impl Strategy<Value = String> {
        (1900i32..2100, 1u32..13, 1u32..29).prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}"))
    }

    fn canonical_line() -> impl Strategy<Value = Value> {
        (
            "[A-Z0-9-]{1,20}",
            proptest::option::of("\\PC{0,30}"),
            decimal(),
            proptest::option::of(decimal()),
            proptest::option::of((0u32..=100).prop_map(|d| json!(d))),
        )
            .prop_map(|(item, description, quantity, price, discount)| {
                let mut line = json!({"item": item, "quantity": quantity});
                if let Some(d) = description {
                    line["description"] = json!(d);
                }
                if let Some(p) = price {
                    line["unitPrice"] = p;
                }
                if let Some(d) = discount {
                    line["discountPercent"] = d;
                }
                line
            })
    }

    fn canonical_order() -> impl Strategy<Value = Value> {
        (
            "[A-Z0-9]{1,20}",
            "[A-Za-z0-9]{1,35}",
            "[A-Z]{3}",
            proptest::option::of(date()),
            proptest::option::of(date()),
            prop::collection::vec(canonical_line(), 1..20),
        )
            .prop_map(|(customer, reference, currency, order_date, delivery, lines)| {
                let mut order = json!({"customerNumber": customer, "externalReference": reference,
                                       "currency": currency, "lines": lines});
                if let Some(d) = order_date {
                    order["orderDate"] = json!(d);
                }
                if let Some(d) = delivery {
                    order["requestedDeliveryDate"] = json!(d);
                }
                order
            })
    }

    const SHIPPED: &[&str] = &[
        "canonical-sales-order-create-bc",
        "canonical-sales-order-bc",
        "canonical-sales-order-list-bc",
        "canonical-customer-bc",
        "canonical-customer-list-bc",
        "canonical-item-bc",
        "canonical-item-list-bc",
        "canonical-sales-order-create-sap",
        "canonical-sales-order-sap",
        "canonical-sales-order-list-sap",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_json_never_panics_any_shipped_mapping(input in arbitrary_json()) {
            for name in SHIPPED {
                let p = policy(name);
                for (direction, t) in [(Direction::Request, p.request.as_ref().map(|r| &r.transform)),
                                       (Direction::Response, p.response.as_ref().map(|r| &r.transform))] {
                    let Some(t) = t else { continue };
                    // Ok or a described failure; a failure names a pointer inside the input.
                    if let Err(TransformFailure::Mapping { pointer, .. }) = t.apply(input.clone(), p.limits) {
                        prop_assert!(pointer.is_empty() || pointer.starts_with('/'), "{direction:?} {name}: {pointer}");
                    }
                }
            }
        }

        #[test]
        fn generated_orders_round_trip_through_business_central(order in canonical_order()) {
            let back = round_trip("bc", &order);
            prop_assert!(same(&back, &order), "\nback:  {back}\norder: {order}");
        }

        #[test]
        fn generated_orders_round_trip_through_sap(order in canonical_order()) {
            let back = round_trip("sap", &order);
            prop_assert!(same(&back, &order), "\nback:  {back}\norder: {order}");
        }
    }
}
