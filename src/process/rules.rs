//! Quote validation before any ERP write: the rules of `policies/process/` (one file a concern),
//! applied to a quote and a snapshot of the ERP's master data. Every violation is reported at
//! once, each with the JSON pointer into the quote, a stable code and what to do about it.
//!
//! Fetching the master data (through the ERP budget, cached) is the caller's job; this module is
//! pure so each rule can be tested alone.

use super::model::{Customer, Product, Quote};
use crate::clock::parse_rfc3339;
use std::collections::HashMap;

pub use crate::config::rules::*;

/// What the ERP knows that the rules need, fetched for one quote.
#[derive(Debug, Clone, Default)]
pub struct MasterData {
    pub customer: Option<Customer>,
    /// By item number; an item missing here does not exist in the ERP.
    pub products: HashMap<String, Product>,
    /// Unit price in the quote's region price list, by item number.
    pub regional_prices: HashMap<String, f64>,
}

/// A violation as the caller reads it (the problem's `violations`).
pub use crate::error::RuleBreach as RuleViolation;

fn violation(pointer: impl Into<String>, code: &'static str, message: String, remedy: &str) -> RuleViolation {
    RuleViolation { pointer: pointer.into(), code, message, remedy: remedy.to_string() }
}

impl Rules {
    /// Every violation of every rule, in file order: customer, products, tax, contract, pricing.
    pub fn validate(&self, quote: &Quote, master: &MasterData) -> Vec<RuleViolation> {
        let mut out = Vec::new();
        self.check_customer(quote, master, &mut out);
        self.check_products(quote, master, &mut out);
        self.check_tax(quote, master, &mut out);
        self.check_contract(quote, &mut out);
        self.check_pricing(quote, master, &mut out);
        out
    }

    fn check_customer(&self, quote: &Quote, master: &MasterData, out: &mut Vec<RuleViolation>) {
        let Some(customer) = &master.customer else {
            let (pointer, shown) = match (&quote.customer.number, &quote.customer.crm_account_id) {
                (Some(n), _) => ("/customer/number", n.clone()),
                (None, Some(a)) => ("/customer/crmAccountId", a.clone()),
                (None, None) => ("/customer", String::new()),
            };
            out.push(violation(
                pointer,
                "customer.not_found",
                format!("No ERP customer matches `{shown}`."),
                "Create the customer in the ERP or correct the reference, then resubmit.",
            ));
            return;
        };
        let rules = &self.customer;
        if rules.refuse_blocked.contains(&customer.blocked) {
            out.push(violation(
                "/customer/number",
                "customer.blocked",
                format!("Customer {} is blocked in the ERP ({}).", customer.number, customer.blocked),
                "Ask finance to lift the block, then resubmit.",
            ));
        }
        let missing: Vec<&str> = rules
            .billing_address
            .iter()
            .filter(|f| customer.billing_address.field(f).is_none_or(|v| v.trim().is_empty()))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            out.push(violation(
                "/customer/number",
                "customer.incomplete_billing_address",
                format!("Customer {} has no billing {}.", customer.number, missing.join(", ")),
                "Complete the customer's billing address in the ERP, then resubmit.",
            ));
        }
        if rules.tax_id_required_in.contains(&customer.region) && customer.tax_id.trim().is_empty() {
            out.push(violation(
                "/customer/number",
                "customer.tax_id_missing",
                format!("Customer {} is in {} and has no tax id.", customer.number, customer.region),
                "Record the customer's tax (VAT) id in the ERP, then resubmit.",
            ));
        }
        if rules.credit_check {
            let available = customer.credit.limit - customer.credit.balance;
            let total = quote.total();
            if total > available {
                out.push(violation(
                    "/lines",
                    "customer.credit_exceeded",
                    format!(
                        "The order total {total:.2} exceeds the customer's available credit {available:.2} (limit {:.2}, balance {:.2}).",
                        customer.credit.limit, customer.credit.balance
                    ),
                    "Ask finance to raise the credit limit, collect open invoices, or split the order.",
                ));
            }
        }
    }

    fn check_products(&self, quote: &Quote, master: &MasterData, out: &mut Vec<RuleViolation>) {
        for (i, line) in quote.lines.iter().enumerate() {
            let pointer = format!("/lines/{i}/product");
            let Some(product) = master.products.get(&line.product) else {
                out.push(violation(
                    pointer,
                    "product.not_found",
                    format!("No ERP item `{}`.", line.product),
                    "Correct the product number, or create the item in the ERP.",
                ));
                continue;
            };
            if self.products.refuse_blocked && product.blocked {
                out.push(violation(
                    pointer.clone(),
                    "product.not_salable",
                    format!("Item {} ({}) is blocked for sale.", product.number, product.name),
                    "Replace it with a salable item.",
                ));
            }
            // A region without a tax treatment is reported once (tax.unknown_jurisdiction),
            // not again as "no item may be sold there".
            let known_region = self.tax.regions.contains_key(&quote.region);
            if self.products.require_regional_price
                && known_region
                && !master.regional_prices.contains_key(&line.product)
            {
                out.push(violation(
                    pointer,
                    "product.not_allowed_in_region",
                    format!("Item {} may not be sold in {}.", product.number, quote.region),
                    "Remove the line or choose an item sold in this region.",
                ));
            }
        }
    }

    fn check_tax(&self, quote: &Quote, master: &MasterData, out: &mut Vec<RuleViolation>) {
        if !self.tax.regions.contains_key(&quote.region) {
            let known: Vec<&str> = self.tax.regions.keys().map(String::as_str).collect();
            out.push(violation(
                "/region",
                "tax.unknown_jurisdiction",
                format!(
                    "Region `{}` has no known tax treatment (known: {}).",
                    quote.region,
                    known.join(", ")
                ),
                "Use one of the known regions, or ask the gateway's operators to add its tax treatment.",
            ));
        } else if let Some(c) = master.customer.as_ref().filter(|_| self.tax.customer_region_must_match) {
            if !c.region.is_empty() && c.region != quote.region {
                out.push(violation(
                    "/region",
                    "tax.region_mismatch",
                    format!(
                        "The quote is for {} but customer {} is in {}.",
                        quote.region, c.number, c.region
                    ),
                    "Quote in the customer's region, or correct the customer's address in the ERP.",
                ));
            }
        }
    }

    fn check_contract(&self, quote: &Quote, out: &mut Vec<RuleViolation>) {
        let rules = &self.contract;
        if let Some(allowed) = rules.currencies.get(&quote.region) {
            if !allowed.contains(&quote.currency) {
                out.push(violation(
                    "/currency",
                    "contract.currency_not_allowed",
                    format!(
                        "{} is not a currency for {} (allowed: {}).",
                        quote.currency,
                        quote.region,
                        allowed.join(", ")
                    ),
                    "Quote in an allowed currency.",
                ));
            }
        }
        if let Some(allowed) = rules.payment_terms.get(&quote.region) {
            if !allowed.contains(&quote.payment_terms) {
                out.push(violation(
                    "/paymentTerms",
                    "contract.payment_terms_not_allowed",
                    format!(
                        "Payment terms {} are not offered in {} (allowed: {}).",
                        quote.payment_terms,
                        quote.region,
                        allowed.join(", ")
                    ),
                    "Use allowed payment terms, or get the terms approved and changed in the rules.",
                ));
            }
        }
        let start = parse_rfc3339(&quote.contract.start_date);
        let end = parse_rfc3339(&quote.contract.end_date);
        match (start, end) {
            (Err(e), _) => out.push(violation(
                "/contract/startDate",
                "contract.invalid_date",
                e,
                "Send the contract start as YYYY-MM-DD.",
            )),
            (_, Err(e)) => out.push(violation(
                "/contract/endDate",
                "contract.invalid_date",
                e,
                "Send the contract end as YYYY-MM-DD.",
            )),
            (Ok(s), Ok(e)) if e <= s => out.push(violation(
                "/contract/endDate",
                "contract.end_before_start",
                format!(
                    "The contract ends ({}) before it starts ({}).",
                    quote.contract.end_date, quote.contract.start_date
                ),
                "Correct the contract dates.",
            )),
            (Ok(s), Ok(e)) => {
                let months = (e - s) as f64 / (86_400_000.0 * 30.436875);
                if months > f64::from(rules.max_term_months) {
                    out.push(violation(
                        "/contract/endDate",
                        "contract.term_too_long",
                        format!(
                            "The contract runs {months:.0} months; at most {} are allowed.",
                            rules.max_term_months
                        ),
                        "Shorten the contract or split it into renewals.",
                    ));
                }
            }
        }
    }

    fn check_pricing(&self, quote: &Quote, master: &MasterData, out: &mut Vec<RuleViolation>) {
        let rules = &self.pricing;
        for (i, line) in quote.lines.iter().enumerate() {
            if let Some(list) = master.regional_prices.get(&line.product) {
                let off = if *list == 0.0 { 0.0 } else { (line.unit_price - list).abs() / list * 100.0 };
                if off > rules.tolerance_percent {
                    out.push(violation(
                        format!("/lines/{i}/unitPrice"),
                        "pricing.price_mismatch",
                        format!(
                            "Unit price {} is {off:.1}% away from the ERP price {list} (tolerance {}%).",
                            line.unit_price, rules.tolerance_percent
                        ),
                        "Quote the ERP's list price (use a discount for a lower price), or update the price list.",
                    ));
                }
            }
            let threshold = rules.approval_threshold_percent.get(&quote.region).copied().unwrap_or(0.0);
            if line.discount_percent > threshold && quote.approvals.is_empty() {
                out.push(violation(
                    format!("/lines/{i}/discountPercent"),
                    "pricing.discount_needs_approval",
                    format!(
                        "A {}% discount is above the {}% that {} allows without approval.",
                        line.discount_percent, threshold, quote.region
                    ),
                    "Attach the approval reference (approvals[].reference) or lower the discount.",
                ));
            }
        }
    }
}
