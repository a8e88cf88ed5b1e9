//! `policies/process/`: the quote-to-order rules as the files state them, one file a concern.
//! Loaded and checked with the rest of the configuration; `process::rules` applies them.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The files of `policies/process/`, by name.
pub const FILES: &[&str] = &["customer.yaml", "products.yaml", "tax.yaml", "contract.yaml", "pricing.yaml"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerRules {
    /// Canonical `blocked` values that refuse an order (`all`, `invoicing`, `shipping`).
    pub refuse_blocked: Vec<String>,
    /// Billing address fields that must not be empty.
    pub billing_address: Vec<String>,
    /// Regions where the customer needs a tax id.
    pub tax_id_required_in: Vec<String>,
    /// Refuse an order that takes the customer's balance past its credit limit.
    pub credit_check: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductRules {
    /// Refuse blocked (not salable) items.
    pub refuse_blocked: bool,
    /// An item without a line in the region's price list may not be sold there.
    pub require_regional_price: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaxRules {
    /// Region → its tax treatment; a region not listed has no known treatment.
    pub regions: BTreeMap<String, TaxTreatment>,
    /// The quote's region must be the customer's (tax follows where the customer is).
    pub customer_region_must_match: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaxTreatment {
    pub treatment: String,
    pub rate_percent: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractRules {
    /// Region → currencies allowed.
    pub currencies: BTreeMap<String, Vec<String>>,
    /// Region → payment terms allowed.
    pub payment_terms: BTreeMap<String, Vec<String>>,
    /// Longest contract, in months.
    pub max_term_months: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingRules {
    /// How far a quoted unit price may be from the ERP's price list, in percent.
    pub tolerance_percent: f64,
    /// Region → discount (percent) above which an approval reference is required.
    pub approval_threshold_percent: BTreeMap<String, f64>,
}

/// All five concerns, as loaded.
#[derive(Debug, Clone)]
pub struct Rules {
    pub customer: CustomerRules,
    pub products: ProductRules,
    pub tax: TaxRules,
    pub contract: ContractRules,
    pub pricing: PricingRules,
}
