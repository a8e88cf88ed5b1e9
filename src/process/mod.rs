//! Process APIs: in-process orchestration on canonical business objects. Quote-to-order first:
//! the canonical model ([`model`]) and the validation that runs before any ERP write
//! ([`rules`], configured in `policies/process/`).

pub mod model;
pub mod rules;
