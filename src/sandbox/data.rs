//! Seeded, deterministic master data in Business Central API v2.0 shapes.
//!
//! 24 customers in four regions (EU, US, UK, APAC), some blocked or incomplete; 50 items, some
//! blocked (not salable) or restricted to some regions; a price list per region.

use serde_json::{json, Value};

pub const COMPANY_ID: &str = "3f1d8a52-4c1e-4d2a-9b8e-5a3c2b1d0e01";
pub const COMPANY_NAME: &str = "CRONUS Causeway Sandbox";
/// Fixed "now" for seeded timestamps so the data is byte-for-byte reproducible.
const SEEDED_AT: &str = "2026-01-15T09:00:00Z";

pub fn guid(kind: u32, n: u32) -> String {
    format!("{kind:08x}-0000-4000-8000-{n:012x}")
}

/// Region of a country, as the process API's tax and terms rules see it.
pub fn region_of(country: &str) -> &'static str {
    match country {
        "US" => "US",
        "GB" => "UK",
        "AU" | "JP" | "SG" => "APAC",
        _ => "EU",
    }
}

pub fn company() -> Value {
    json!({
        "id": COMPANY_ID,
        "systemVersion": "24.0.16410.18056",
        "timestamp": 1000,
        "name": COMPANY_NAME,
        "displayName": COMPANY_NAME,
        "businessProfileId": "",
        "systemCreatedAt": SEEDED_AT,
        "systemCreatedBy": "00000000-0000-0000-0000-000000000001",
        "systemModifiedAt": SEEDED_AT,
        "systemModifiedBy": "00000000-0000-0000-0000-000000000001"
    })
}

struct CustomerSeed {
    name: &'static str,
    country: &'static str,
    city: &'static str,
    currency: &'static str,
    tax_id: &'static str,
    blocked: &'static str,
    address: &'static str,
    credit_limit: f64,
    balance: f64,
}

const CUSTOMERS: &[CustomerSeed] = &[
    // EU
    CustomerSeed {
        name: "Adatum Handels GmbH",
        country: "DE",
        city: "Berlin",
        currency: "EUR",
        tax_id: "DE811907980",
        blocked: "",
        address: "Unter den Linden 12",
        credit_limit: 250000.0,
        balance: 12000.0,
    },
    CustomerSeed {
        name: "Bordeaux Fournitures SARL",
        country: "FR",
        city: "Bordeaux",
        currency: "EUR",
        tax_id: "FR40303265045",
        blocked: "",
        address: "12 Quai des Chartrons",
        credit_limit: 80000.0,
        balance: 5000.0,
    },
    CustomerSeed {
        name: "Delft Precisie B.V.",
        country: "NL",
        city: "Delft",
        currency: "EUR",
        tax_id: "NL859048615B01",
        blocked: "",
        address: "Oude Delft 88",
        credit_limit: 120000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Iberia Logística S.L.",
        country: "ES",
        city: "Valencia",
        currency: "EUR",
        tax_id: "ESB12345678",
        blocked: "",
        address: "Calle de Colón 4",
        credit_limit: 60000.0,
        balance: 58000.0,
    },
    CustomerSeed {
        name: "München Maschinenbau AG",
        country: "DE",
        city: "München",
        currency: "EUR",
        tax_id: "",
        blocked: "",
        address: "Leopoldstraße 200",
        credit_limit: 150000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Lyon Textiles SA",
        country: "FR",
        city: "Lyon",
        currency: "EUR",
        tax_id: "FR83404833048",
        blocked: "All",
        address: "3 Rue de la République",
        credit_limit: 40000.0,
        balance: 39000.0,
    },
    // US
    CustomerSeed {
        name: "Contoso Retail Inc.",
        country: "US",
        city: "Seattle",
        currency: "USD",
        tax_id: "91-1144442",
        blocked: "",
        address: "400 Pine Street",
        credit_limit: 500000.0,
        balance: 25000.0,
    },
    CustomerSeed {
        name: "Fabrikam Industries LLC",
        country: "US",
        city: "Atlanta",
        currency: "USD",
        tax_id: "58-1234567",
        blocked: "",
        address: "100 Peachtree St NW",
        credit_limit: 200000.0,
        balance: 10000.0,
    },
    CustomerSeed {
        name: "Northwind Traders Corp.",
        country: "US",
        city: "Chicago",
        currency: "USD",
        tax_id: "36-7654321",
        blocked: "",
        address: "233 S Wacker Dr",
        credit_limit: 100000.0,
        balance: 99500.0,
    },
    CustomerSeed {
        name: "Tailspin Toys Co.",
        country: "US",
        city: "Austin",
        currency: "USD",
        tax_id: "74-2223334",
        blocked: "Invoice",
        address: "500 Congress Ave",
        credit_limit: 50000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Wide World Importers",
        country: "US",
        city: "San Francisco",
        currency: "USD",
        tax_id: "94-5556667",
        blocked: "",
        address: "",
        credit_limit: 75000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Proseware Labs",
        country: "US",
        city: "Boston",
        currency: "USD",
        tax_id: "04-8889990",
        blocked: "",
        address: "1 Federal St",
        credit_limit: 300000.0,
        balance: 0.0,
    },
    // UK
    CustomerSeed {
        name: "Litware Ltd",
        country: "GB",
        city: "London",
        currency: "GBP",
        tax_id: "GB123456789",
        blocked: "",
        address: "10 Finsbury Square",
        credit_limit: 90000.0,
        balance: 1000.0,
    },
    CustomerSeed {
        name: "Margie's Travel plc",
        country: "GB",
        city: "Manchester",
        currency: "GBP",
        tax_id: "GB987654321",
        blocked: "",
        address: "1 Spinningfields",
        credit_limit: 45000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Humongous Insurance UK",
        country: "GB",
        city: "Leeds",
        currency: "GBP",
        tax_id: "",
        blocked: "",
        address: "2 Wellington Place",
        credit_limit: 60000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Blue Yonder Airlines Ltd",
        country: "GB",
        city: "Bristol",
        currency: "GBP",
        tax_id: "GB555666777",
        blocked: "Ship",
        address: "Temple Quay 3",
        credit_limit: 70000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Coho Winery Ltd",
        country: "GB",
        city: "Edinburgh",
        currency: "GBP",
        tax_id: "GB111222333",
        blocked: "",
        address: "7 Leith Walk",
        credit_limit: 30000.0,
        balance: 2000.0,
    },
    CustomerSeed {
        name: "Graphic Design Institute",
        country: "GB",
        city: "Cambridge",
        currency: "GBP",
        tax_id: "GB444555666",
        blocked: "",
        address: "Hills Road 40",
        credit_limit: 25000.0,
        balance: 0.0,
    },
    // APAC
    CustomerSeed {
        name: "Sydney Harbour Supplies Pty",
        country: "AU",
        city: "Sydney",
        currency: "AUD",
        tax_id: "51824753556",
        blocked: "",
        address: "1 Macquarie Place",
        credit_limit: 110000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Tokyo Denki K.K.",
        country: "JP",
        city: "Tokyo",
        currency: "JPY",
        tax_id: "T1234567890123",
        blocked: "",
        address: "1-1 Marunouchi",
        credit_limit: 20000000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Lion City Trading Pte",
        country: "SG",
        city: "Singapore",
        currency: "SGD",
        tax_id: "201912345K",
        blocked: "",
        address: "8 Marina Blvd",
        credit_limit: 95000.0,
        balance: 3000.0,
    },
    CustomerSeed {
        name: "Melbourne Outfitters Pty",
        country: "AU",
        city: "Melbourne",
        currency: "AUD",
        tax_id: "",
        blocked: "",
        address: "",
        credit_limit: 40000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Osaka Components K.K.",
        country: "JP",
        city: "Osaka",
        currency: "JPY",
        tax_id: "T9876543210987",
        blocked: "All",
        address: "3-3 Umeda",
        credit_limit: 5000000.0,
        balance: 0.0,
    },
    CustomerSeed {
        name: "Perth Mining Services Pty",
        country: "AU",
        city: "Perth",
        currency: "AUD",
        tax_id: "33102417032",
        blocked: "",
        address: "240 St Georges Tce",
        credit_limit: 250000.0,
        balance: 120000.0,
    },
];

pub fn customers() -> Vec<Value> {
    CUSTOMERS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let n = i as u32 + 1;
            json!({
                "id": guid(0xC, n),
                "number": format!("C{:05}", 10000 + i * 10),
                "displayName": c.name,
                "type": "Company",
                "addressLine1": c.address,
                "addressLine2": "",
                "city": c.city,
                "state": "",
                "country": c.country,
                "postalCode": if c.address.is_empty() { "" } else { "10001" },
                "phoneNumber": "",
                "email": format!("ap{n}@customer{n}.example"),
                "website": "",
                "salespersonCode": "",
                "balanceDue": c.balance,
                "creditLimit": c.credit_limit,
                "taxLiable": !c.tax_id.is_empty(),
                "taxAreaId": guid(0x7A, n % 4),
                "taxAreaDisplayName": region_of(c.country),
                "taxRegistrationNumber": c.tax_id,
                "currencyId": "00000000-0000-0000-0000-000000000000",
                "currencyCode": c.currency,
                "paymentTermsId": guid(0x9E, if c.country == "US" { 30 } else { 14 }),
                "shipmentMethodId": "00000000-0000-0000-0000-000000000000",
                "paymentMethodId": "00000000-0000-0000-0000-000000000000",
                "blocked": c.blocked,
                "lastModifiedDateTime": SEEDED_AT
            })
        })
        .collect()
}

/// Category code → regions an item may be sold in (empty: everywhere).
pub fn restricted_regions(category: &str) -> &'static [&'static str] {
    match category {
        "EXPORT-CTRL" => &["US", "EU", "UK"],
        "EU-ONLY" => &["EU"],
        "US-ONLY" => &["US"],
        _ => &[],
    }
}

const ITEM_NAMES: &[&str] = &[
    "ATHENS Desk",
    "PARIS Guest Chair",
    "ATHENS Mobile Pedestal",
    "LONDON Swivel Chair",
    "ANTWERP Conference Table",
    "BERLIN Guest Chair",
    "ROME Guest Chair",
    "TOKYO Guest Chair",
    "MEXICO Swivel Chair",
    "MUNICH Swivel Chair",
    "AMSTERDAM Lamp",
    "SEOUL Guest Chair",
    "Conference Bundle 1-6",
    "Conference Bundle 1-8",
    "Conference Package 1",
    "Office Desk Lamp",
    "Whiteboard Marker Set",
    "Ergonomic Keyboard",
    "Wireless Mouse",
    "27in Monitor",
    "Docking Station",
    "Laptop Stand",
    "Noise-cancelling Headset",
    "Webcam HD",
    "Cable Kit",
    "Standing Desk Frame",
    "Desk Top Oak 160",
    "Desk Top Walnut 180",
    "Filing Cabinet 3D",
    "Bookcase 5 Shelf",
    "Meeting Pod",
    "Acoustic Panel",
    "Coat Stand",
    "Umbrella Stand",
    "Footrest",
    "Server Rack 42U",
    "Encrypted USB Drive",
    "Satellite Modem",
    "Industrial Router",
    "Thermal Camera",
    "Installation Service (hour)",
    "Training Day",
    "Extended Warranty 3y",
    "Design Consultation",
    "Site Survey",
    "Legacy Chair (discontinued)",
    "Sample Kit",
    "Display Model Desk",
    "Spare Parts Box",
    "Gift Card",
];

pub fn items() -> Vec<Value> {
    ITEM_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let n = i as u32 + 1;
            let category = match i {
                35..=39 => "EXPORT-CTRL",
                30 | 31 => "EU-ONLY",
                32 | 33 => "US-ONLY",
                40..=44 => "SERVICES",
                _ => "FURNITURE",
            };
            // Blocked items are not salable: discontinued, samples, display models, gift cards.
            let blocked = matches!(i, 45..=49);
            let item_type = if category == "SERVICES" { "Service" } else { "Inventory" };
            // Prices in cents, deterministic, with awkward decimals on purpose.
            let cents = 1999 + (i as u64 * 7919) % 150_000;
            let unit_price = cents as f64 / 100.0;
            json!({
                "id": guid(0x17E, n),
                "number": format!("{}-{}", 1900 + i * 4, if i % 2 == 0 { "S" } else { "W" }),
                "displayName": name,
                "displayName2": "",
                "type": item_type,
                "itemCategoryId": guid(0xCA7, category.len() as u32),
                "itemCategoryCode": category,
                "blocked": blocked,
                "gtin": format!("{:013}", 5_000_000_000_000u64 + n as u64),
                "inventory": if item_type == "Service" { 0 } else { (i * 13 % 200) as i64 },
                "unitPrice": unit_price,
                "priceIncludesTax": false,
                "unitCost": (unit_price * 0.6 * 100.0).round() / 100.0,
                "taxGroupId": "00000000-0000-0000-0000-000000000000",
                "taxGroupCode": if item_type == "Service" { "SERVICES" } else { "GOODS" },
                "baseUnitOfMeasureId": "00000000-0000-0000-0000-000000000000",
                "baseUnitOfMeasureCode": if item_type == "Service" { "HOUR" } else { "PCS" },
                "generalProductPostingGroupCode": "RETAIL",
                "inventoryPostingGroupCode": "RESALE",
                "lastModifiedDateTime": SEEDED_AT
            })
        })
        .collect()
}

/// Per-region price lists (a custom API page, as BC extensions publish them). Restricted items
/// have no line for regions they may not be sold in.
pub fn price_list_lines(items: &[Value]) -> Vec<Value> {
    const LISTS: &[(&str, &str, f64)] =
        &[("EU", "EUR", 0.92), ("US", "USD", 1.0), ("UK", "GBP", 0.79), ("APAC", "AUD", 1.52)];
    let mut out = Vec::new();
    for (region, currency, rate) in LISTS {
        for item in items {
            let category = item["itemCategoryCode"].as_str().unwrap_or("");
            let allowed = restricted_regions(category);
            if !allowed.is_empty() && !allowed.contains(region) {
                continue;
            }
            let base = item["unitPrice"].as_f64().unwrap_or(0.0);
            out.push(json!({
                "priceListCode": format!("SALES-{region}"),
                "region": region,
                "itemNumber": item["number"],
                "currencyCode": currency,
                "unitPrice": (base * rate * 100.0).round() / 100.0,
                "minimumQuantity": 0
            }));
        }
    }
    out
}

pub fn sales_invoices(customers: &[Value]) -> Vec<Value> {
    (0..3u32)
        .map(|i| {
            let c = &customers[i as usize];
            json!({
                "id": guid(0x1A, i + 1),
                "number": format!("PS-INV{}", 103001 + i),
                "externalDocumentNumber": "",
                "invoiceDate": "2026-01-10",
                "dueDate": "2026-02-09",
                "customerId": c["id"],
                "customerNumber": c["number"],
                "customerName": c["displayName"],
                "currencyCode": c["currencyCode"],
                "status": "Open",
                "totalAmountExcludingTax": 1000.0 * f64::from(i + 1),
                "totalTaxAmount": 190.0 * f64::from(i + 1),
                "totalAmountIncludingTax": 1190.0 * f64::from(i + 1),
                "remainingAmount": 1190.0 * f64::from(i + 1),
                "lastModifiedDateTime": SEEDED_AT
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_data_has_the_promised_shape() {
        let c = customers();
        assert!(c.len() >= 20);
        let regions: std::collections::BTreeSet<_> =
            c.iter().map(|c| c["taxAreaDisplayName"].as_str().unwrap()).collect();
        assert_eq!(regions.into_iter().collect::<Vec<_>>(), vec!["APAC", "EU", "UK", "US"]);
        assert!(c.iter().any(|c| c["blocked"] != ""));
        assert!(c.iter().any(|c| c["addressLine1"] == ""), "some customers lack a billing address");
        assert!(c.iter().any(|c| c["taxRegistrationNumber"] == ""), "some customers lack a tax id");
        let i = items();
        assert_eq!(i.len(), 50);
        assert!(i.iter().any(|i| i["blocked"] == true));
        let prices = price_list_lines(&i);
        let export = i.iter().find(|i| i["itemCategoryCode"] == "EXPORT-CTRL").unwrap();
        assert!(!prices.iter().any(|p| p["region"] == "APAC" && p["itemNumber"] == export["number"]));
        assert_eq!(customers(), c, "deterministic");
    }
}
