//! Intake of quote-to-order: the request body as a canonical quote, before any ERP call. A
//! Salesforce Opportunity is mapped first and the result meets the canonical schema like a quote
//! sent canonical, so nothing the CRM sent reaches the rules unchecked; the number of lines is
//! bounded first, since every distinct product costs ERP lookups. Pure apart from the mapping's
//! jq threads: the fuzz target drives it directly.

use super::model::Quote;
use crate::error::GatewayError;
use crate::policy::Policy;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Mediation policy that checks a canonical quote (`policies/mediation.yaml`).
pub const CANONICAL_POLICY: &str = "canonical-quote";
/// Mediation policy that maps a Salesforce Opportunity to a canonical quote.
pub const SALESFORCE_POLICY: &str = "salesforce-opportunity-to-quote";

/// The body as a canonical quote: a Salesforce Opportunity goes through its mapping first,
/// and what the mapping made is checked against the canonical schema like a canonical quote.
pub async fn to_quote(
    policies: &HashMap<String, Arc<Policy>>,
    max_lines: usize,
    document: Value,
) -> Result<Quote, GatewayError> {
    let salesforce = document.get("StageName").is_some() || document.get("OpportunityLineItems").is_some();
    let (lines, pointer) = if salesforce {
        (&document["OpportunityLineItems"]["records"], "/OpportunityLineItems/records")
    } else {
        (&document["lines"], "/lines")
    };
    // Every distinct product costs the ERP lookups: the line count is bounded before any.
    if lines.as_array().is_some_and(|l| l.len() > max_lines) {
        let max = max_lines;
        return Err(GatewayError::ValidationFailed {
            violations: vec![crate::error::Violation {
                location: "body",
                pointer: pointer.into(),
                keyword: "maxItems".into(),
                message: format!(
                    "a quote has at most {max} lines (process.max_lines); split larger deals into several quotes"
                ),
            }],
        });
    }
    if salesforce {
        let stage = document["StageName"].as_str().unwrap_or_default();
        if stage != "Closed Won" {
            return Err(GatewayError::OpportunityNotWon {
                opportunity_id: document["Id"].as_str().unwrap_or("(no Id)").to_string(),
                stage: stage.to_string(),
            });
        }
    }
    let name = if salesforce { SALESFORCE_POLICY } else { CANONICAL_POLICY };
    let Some(Policy::Mediation(mediation)) = policies.get(name).map(|p| p.as_ref()) else {
        tracing::error!(policy = name, "process API policy missing");
        return Err(GatewayError::Internal);
    };
    let violations = mediation.check_request_body(&document);
    if !violations.is_empty() {
        return Err(GatewayError::ValidationFailed { violations });
    }
    let canonical = match mediation.request.as_ref().map(|r| &r.transform).filter(|t| !t.is_identity()) {
        Some(t) => {
            let bytes = t
                .apply_async(document, mediation.limits)
                .await
                .map_err(|f| f.to_error(crate::mediation::Direction::Request, mediation.limits, "ERP"))?;
            serde_json::from_slice(&bytes).map_err(|_| GatewayError::Internal)?
        }
        None => document,
    };
    if salesforce {
        // The mapped quote meets the same schema as one sent canonical (dates, lengths,
        // codes), so nothing the Opportunity carried reaches the rules unchecked.
        let Some(Policy::Mediation(canonical_policy)) = policies.get(CANONICAL_POLICY).map(|p| p.as_ref())
        else {
            tracing::error!(policy = CANONICAL_POLICY, "process API policy missing");
            return Err(GatewayError::Internal);
        };
        let violations: Vec<_> = canonical_policy
            .check_request_body(&canonical)
            .into_iter()
            .map(|mut v| {
                v.message = format!("in the quote mapped from the Opportunity: {}", v.message);
                v
            })
            .collect();
        if !violations.is_empty() {
            return Err(GatewayError::ValidationFailed { violations });
        }
    }
    serde_json::from_value(canonical).map_err(|e| GatewayError::RequestUnmappable {
        pointer: String::new(),
        detail: format!("not a canonical quote: {e}"),
    })
}
