//! Observability: correlation ids and trace context, Prometheus metrics, logging set-up.

pub mod allocator;
pub mod correlation;
pub mod logging;
pub mod metrics;
