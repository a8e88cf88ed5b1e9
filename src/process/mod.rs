//! Process APIs: in-process orchestration on canonical business objects. Quote-to-order first:
//! the canonical model ([`model`]), the validation that runs before any ERP write ([`rules`],
//! configured in `policies/process/`), the order state machine ([`state`]) in the durable
//! store ([`store`]), idempotency ([`idempotency`]) and the service ([`service`]), split by
//! job: a caller's submission, one delivery attempt ([`delivery`], its state machine a pure
//! function in [`delivery::decision`]), the background worker, and the views and replay.

pub mod adapter;
pub mod delivery;
pub mod idempotency;
pub mod instance;
pub mod intake;
pub mod metrics;
pub mod model;
pub mod rules;
pub mod service;
pub mod state;
pub mod store;
mod submission;
mod views;
mod worker;

#[cfg(test)]
mod service_tests;
