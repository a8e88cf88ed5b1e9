//! Process API metrics, registered in the gateway's registry. Labels are bounded: outcomes and
//! states are fixed sets, rejection reasons are the rules' static codes.

use super::state::State;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

pub struct ProcessMetrics {
    /// Orders by outcome: accepted, pending, rejected, dead_lettered.
    pub orders: IntCounterVec,
    /// Refusals by reason: a rule's code, or `erp` for the ERP's own refusal.
    pub rejections: IntCounterVec,
    /// Closed-won (received) → accepted by the ERP.
    pub accept_latency: HistogramVec,
    /// Submissions that did not become a second order: `idempotency_key` or `opportunity`.
    pub duplicates_prevented: IntCounterVec,
    /// Orders per state now (pending and dead_lettered are the ones to alert on).
    pub orders_in_state: IntGaugeVec,
    /// Orders refused or given up on, by reason (a rule's code, `erp`, `undeliverable`) and
    /// the quote's region (`other` when the rules do not know it).
    pub incidents: IntCounterVec,
    /// A dead letter's resolution: its dead-lettering to its acceptance after a replay.
    pub exception_resolution: prometheus::Histogram,
}

impl ProcessMetrics {
    pub fn global() -> &'static ProcessMetrics {
        static GLOBAL: std::sync::OnceLock<ProcessMetrics> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| {
            let counter = |name: &str, help: &str, label: &str| {
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
            };
            let m = ProcessMetrics {
                orders: counter("causeway_process_orders_total", "Quote-to-order outcomes", "outcome"),
                rejections: counter(
                    "causeway_process_rejections_total",
                    "Orders refused, by rule code or `erp`",
                    "reason",
                ),
                accept_latency: HistogramVec::new(
                    HistogramOpts::new(
                        "causeway_process_accept_latency_seconds",
                        "From the quote's arrival (closed won) to the ERP's acceptance",
                    )
                    .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
                    &["erp"],
                )
                .expect("valid metric"),
                duplicates_prevented: counter(
                    "causeway_process_duplicates_prevented_total",
                    "Submissions answered with an existing order instead of creating one",
                    "kind",
                ),
                orders_in_state: IntGaugeVec::new(
                    // Not `causeway_process_orders`: that is the family of the outcome counter.
                    Opts::new("causeway_process_orders_in_store", "Orders in the store, by state"),
                    &["state"],
                )
                .expect("valid metric"),
                incidents: IntCounterVec::new(
                    Opts::new(
                        "causeway_process_incidents_total",
                        "Orders refused or given up on, by reason and region",
                    ),
                    &["reason", "region"],
                )
                .expect("valid metric"),
                exception_resolution: prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "causeway_process_exception_resolution_seconds",
                        "From an order's dead-lettering to its acceptance after a replay",
                    )
                    .buckets(vec![60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0, 259200.0, 604800.0]),
                )
                .expect("valid metric"),
            };
            let registry = &crate::observe::metrics::Metrics::global().registry;
            for c in [
                Box::new(m.orders.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(m.rejections.clone()),
                Box::new(m.accept_latency.clone()),
                Box::new(m.duplicates_prevented.clone()),
                Box::new(m.orders_in_state.clone()),
                Box::new(m.incidents.clone()),
                Box::new(m.exception_resolution.clone()),
            ] {
                // Registered once per process (OnceLock); a failure would be a duplicate name.
                let _ = registry.register(c);
            }
            for s in State::ALL {
                m.orders_in_state.with_label_values(&[s.as_str()]).set(0);
            }
            // Counted from zero, so rates over them (dashboard, alerts) exist from the start.
            for outcome in ["accepted", "rejected", "dead_lettered", "pending"] {
                m.orders.with_label_values(&[outcome]);
            }
            for kind in ["idempotency_key", "opportunity"] {
                m.duplicates_prevented.with_label_values(&[kind]);
            }
            m
        })
    }
}
