//! Observability: correlation ids and trace context, Prometheus metrics, logging set-up, OTLP
//! traces.

pub mod allocator;
pub mod correlation;
pub mod logging;
pub mod metrics;
pub mod traces;
