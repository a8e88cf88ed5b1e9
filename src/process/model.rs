//! Canonical business objects of the process APIs, version 1. The JSON Schemas in
//! `policies/schemas/canonical/` describe the same shapes for callers; field names are camelCase
//! on the wire.

use serde::{Deserialize, Serialize};

/// A quote (or a closed-won opportunity) the CRM asks to turn into an ERP order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quote {
    /// The CRM opportunity id: the ERP order's external reference, and the dedupe key.
    pub opportunity_id: String,
    pub customer: CustomerRef,
    /// ISO 4217.
    pub currency: String,
    /// Sales region (`EU`, `US`, `UK`, `APAC`): drives tax, currencies, terms and thresholds.
    pub region: String,
    /// e.g. `NET30`.
    pub payment_terms: String,
    pub contract: Contract,
    pub lines: Vec<QuoteLine>,
    #[serde(default)]
    pub approvals: Vec<Approval>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomerRef {
    /// The ERP customer number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<String>,
    /// The CRM account id, for customers matched by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_account_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Contract {
    /// RFC 3339 full dates.
    pub start_date: String,
    pub end_date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuoteLine {
    /// The ERP item number.
    pub product: String,
    pub quantity: f64,
    pub unit_price: f64,
    #[serde(default)]
    pub discount_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Approval {
    /// The approval record in the CRM (or the approval tool).
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
}

/// A customer as the canonical API shows it (`policies/mappings/bc/customer.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    pub number: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub billing_address: Address,
    #[serde(default)]
    pub currency: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub tax_id: String,
    /// `none`, `shipping`, `invoicing` or `all`.
    #[serde(default)]
    pub blocked: String,
    #[serde(default)]
    pub credit: Credit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    #[serde(default)]
    pub line1: String,
    #[serde(default)]
    pub line2: String,
    #[serde(default)]
    pub city: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub postal_code: String,
    #[serde(default)]
    pub country: String,
}

impl Address {
    /// A field by its canonical name, for rules that name required fields.
    pub fn field(&self, name: &str) -> Option<&str> {
        Some(match name {
            "line1" => &self.line1,
            "line2" => &self.line2,
            "city" => &self.city,
            "state" => &self.state,
            "postalCode" => &self.postal_code,
            "country" => &self.country,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Credit {
    #[serde(default)]
    pub limit: f64,
    #[serde(default)]
    pub balance: f64,
}

/// A product as the canonical API shows it (`policies/mappings/bc/item.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub number: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default)]
    pub unit_price: f64,
}

impl Quote {
    /// Net order total: quantity × unit price, less each line's discount.
    pub fn total(&self) -> f64 {
        self.lines.iter().map(|l| l.quantity * l.unit_price * (1.0 - l.discount_percent / 100.0)).sum()
    }
}

impl Quote {
    /// The canonical sales order that carries this quote into the ERP: the opportunity id is
    /// the external reference the adapter finds the order by before every create.
    pub fn to_sales_order(&self, customer_number: &str) -> SalesOrderCreate {
        SalesOrderCreate {
            customer_number: customer_number.to_string(),
            external_reference: self.opportunity_id.clone(),
            currency: self.currency.clone(),
            order_date: None,
            requested_delivery_date: None,
            lines: self
                .lines
                .iter()
                .map(|l| SalesOrderLine {
                    item: l.product.clone(),
                    description: None,
                    quantity: l.quantity,
                    unit_price: Some(l.unit_price),
                    discount_percent: Some(l.discount_percent),
                })
                .collect(),
        }
    }
}

/// A sales order to create (`policies/schemas/canonical/sales-order-create.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SalesOrderCreate {
    pub customer_number: String,
    pub external_reference: String,
    pub currency: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_delivery_date: Option<String>,
    pub lines: Vec<SalesOrderLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SalesOrderLine {
    pub item: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub quantity: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount_percent: Option<f64>,
}

/// A sales order as the ERP holds it (`policies/schemas/canonical/sales-order.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SalesOrder {
    pub id: String,
    pub number: String,
    #[serde(default)]
    pub external_reference: Option<String>,
    pub customer_number: String,
    #[serde(default)]
    pub customer_name: Option<String>,
    pub currency: String,
    #[serde(default)]
    pub order_date: Option<String>,
    #[serde(default)]
    pub requested_delivery_date: Option<String>,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
    #[serde(default)]
    pub lines: Vec<SalesOrderLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    #[serde(default)]
    pub discount: f64,
    #[serde(default)]
    pub net: f64,
    #[serde(default)]
    pub tax: f64,
    #[serde(default)]
    pub gross: f64,
}

/// An ERP sales invoice, canonical (`policies/schemas/canonical/invoice.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Invoice {
    pub number: String,
    pub order_number: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_reference: Option<String>,
    pub customer_number: String,
    pub currency: String,
    /// RFC 3339 full dates.
    pub invoice_date: String,
    pub due_date: String,
    pub total_excluding_tax: f64,
    pub total_tax: f64,
    pub total_including_tax: f64,
    pub status: InvoiceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceStatus {
    Draft,
    Open,
    PartiallyPaid,
    Paid,
    Overdue,
    Cancelled,
}

/// How much of an invoice is paid (`policies/schemas/canonical/payment-status.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentStatus {
    pub invoice_number: String,
    pub status: InvoiceStatus,
    pub amount_paid: f64,
    pub amount_due: f64,
    #[serde(default)]
    pub last_payment_date: Option<String>,
}
