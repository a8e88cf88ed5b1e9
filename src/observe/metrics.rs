//! Prometheus metrics of the request path. Labels are bounded: route names come from config,
//! methods are folded into a fixed set, statuses into classes. Raw paths never become labels.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use std::sync::Arc;

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Route label for requests no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

pub struct Metrics {
    pub registry: Registry,
    pub auth_failures: IntCounterVec,
    pub ratelimit_rejections: IntCounterVec,
    /// Requests to routes that declare a `version` or a `deprecation`, by route, version and
    /// consumer tier (a tier the route's policies name, `anonymous` or `other`).
    pub api_version_requests: IntCounterVec,
    pub erp_admitted: IntCounterVec,
    pub erp_rejected: IntCounterVec,
    pub erp_in_flight: prometheus::IntGaugeVec,
    pub erp_queue_depth: prometheus::IntGaugeVec,
    pub erp_wait: HistogramVec,
    pub erp_pauses: IntCounterVec,
    pub erp_circuit_state: prometheus::IntGaugeVec,
    pub erp_pause_seconds: prometheus::GaugeVec,
    pub erp_effective_limit: prometheus::IntGaugeVec,
    pub shared_state_mode: prometheus::IntGaugeVec,
    pub shared_state_switches: IntCounterVec,
    pub erp_shared_in_flight: prometheus::IntGaugeVec,
    pub header_deadline_closed: prometheus::IntCounter,
    pub events_delivered: IntCounterVec,
    pub event_delivery_failures: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub event_delivery_lag: HistogramVec,
    /// Invoice posted in the ERP → acknowledged by the subscriber (its `invoice.issued.v1`).
    pub invoice_sync_latency: HistogramVec,
    pub events_undelivered: prometheus::IntGaugeVec,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub upstream_up: prometheus::IntGaugeVec,
    pub mediation_rejections: IntCounterVec,
    pub mediation_failures: IntCounterVec,
    pub response_schema_violations: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = &["route", "method", "status_class"];
        let requests = IntCounterVec::new(
            Opts::new("causeway_requests_total", "Requests handled, by route, method and status class"),
            labels,
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("causeway_request_duration_seconds", "Time from request to end of response")
                .buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "causeway_upstream_duration_seconds",
                "Time from sending the request upstream to the upstream's response header",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .expect("valid metric");
        let in_flight =
            IntGauge::new("causeway_requests_in_flight", "Requests being handled").expect("valid metric");
        let upstream_up = prometheus::IntGaugeVec::new(
            Opts::new("causeway_upstream_up", "1 when the last reachability probe of the upstream succeeded"),
            &["upstream"],
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let gauge = |name: &str, help: &str| {
            prometheus::IntGaugeVec::new(Opts::new(name, help), &["upstream"]).expect("valid metric")
        };
        let auth_failures = counter(
            "causeway_auth_failures_total",
            "Requests refused by authentication or authorization, by policy and reason",
            &["policy", "reason"],
        );
        let ratelimit_rejections = counter(
            "causeway_ratelimit_rejections_total",
            "Requests refused by a consumer rate limit, by tier and route",
            &["tier", "route"],
        );
        let api_version_requests = counter(
            "causeway_api_version_requests_total",
            "Requests to versioned or deprecated routes, by route, version and consumer tier",
            &["route", "version", "tier"],
        );
        let erp_admitted = counter(
            "causeway_erp_admitted_total",
            "Requests admitted by an ERP budget, by upstream and priority class",
            &["upstream", "class"],
        );
        let erp_rejected = counter(
            "causeway_erp_rejected_total",
            "Requests an ERP budget refused (deadline, queue_full, circuit_open)",
            &["upstream", "class", "reason"],
        );
        let erp_in_flight = gauge("causeway_erp_in_flight", "Requests holding an ERP budget permit");
        let erp_queue_depth = gauge("causeway_erp_queue_depth", "Requests waiting for an ERP budget permit");
        let erp_wait = HistogramVec::new(
            HistogramOpts::new("causeway_erp_wait_seconds", "Time waited for an ERP budget permit")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream", "class"],
        )
        .expect("valid metric");
        let erp_pauses = counter(
            "causeway_erp_pauses_total",
            "Budget pauses after ERP overload signals (retry_after or backoff)",
            &["upstream", "reason"],
        );
        let erp_circuit_state = prometheus::IntGaugeVec::new(
            Opts::new(
                "causeway_erp_circuit_state",
                "Circuit breaker per upstream: 1 for the state it is in (closed, half_open, open), 0 for the others",
            ),
            &["upstream", "state"],
        )
        .expect("valid metric");
        let erp_pause_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "causeway_erp_pause_seconds",
                "Seconds left of an overload pause of the ERP budget (0: not paused)",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let erp_effective_limit = prometheus::IntGaugeVec::new(
            Opts::new(
                "causeway_erp_effective_limit",
                "ERP budget limits in force (limit: max_concurrent, window_requests); below the configured ones while the adaptive limit holds them down",
            ),
            &["upstream", "limit"],
        )
        .expect("valid metric");
        let shared_state_mode = prometheus::IntGaugeVec::new(
            Opts::new(
                "causeway_shared_state_mode",
                "Per shared budget or limit (component): 0 shared through Redis, 1 fallback while Redis is unreachable (local_share, closed or open)",
            ),
            &["component", "fallback"],
        )
        .expect("valid metric");
        let shared_state_switches = counter(
            "causeway_shared_state_switches_total",
            "Switches between shared state in Redis and the fallback, by component and the mode switched to",
            &["component", "to"],
        );
        let erp_shared_in_flight = gauge(
            "causeway_erp_shared_in_flight",
            "ERP requests in flight across all replicas (as last seen in Redis), per upstream",
        );
        let header_deadline_closed = prometheus::IntCounter::new(
            "causeway_header_deadline_closed_total",
            "Client connections closed because their request header did not arrive within client_header_timeout_ms",
        )
        .expect("valid metric");
        let events_delivered = counter(
            "causeway_events_delivered_total",
            "Events a subscriber acknowledged (2xx), by subscriber",
            &["subscriber"],
        );
        let event_delivery_failures = counter(
            "causeway_event_delivery_failures_total",
            "Event delivery attempts that failed (non-2xx, timeout, unreachable), by subscriber",
            &["subscriber"],
        );
        let events_dead_lettered = counter(
            "causeway_events_dead_lettered_total",
            "Events given up on past the subscriber's horizon, by subscriber",
            &["subscriber"],
        );
        let event_delivery_lag = HistogramVec::new(
            HistogramOpts::new(
                "causeway_event_delivery_lag_seconds",
                "From the order's state change to the subscriber's acknowledgement",
            )
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0]),
            &["subscriber"],
        )
        .expect("valid metric");
        let invoice_sync_latency = HistogramVec::new(
            HistogramOpts::new(
                "causeway_invoice_sync_latency_seconds",
                "From the invoice's posting in the ERP to the subscriber's acknowledgement of invoice.issued.v1",
            )
            .buckets(vec![0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0]),
            &["subscriber"],
        )
        .expect("valid metric");
        let events_undelivered = prometheus::IntGaugeVec::new(
            Opts::new(
                "causeway_events_undelivered",
                "Events not yet acknowledged by a subscriber (state: pending, dead)",
            ),
            &["subscriber", "state"],
        )
        .expect("valid metric");
        let mediation_rejections = counter(
            "causeway_mediation_rejections_total",
            "Requests refused by schema validation before reaching the ERP, by route and location",
            &["route", "location"],
        );
        let mediation_failures = counter(
            "causeway_mediation_failures_total",
            "Transformations that failed, by route, direction and kind (mapping, program, timeout, too_large, busy)",
            &["route", "direction", "kind"],
        );
        let response_schema_violations = counter(
            "causeway_response_schema_violations_total",
            "ERP responses that violated the route's response schema (monitor mode: passed on unchanged)",
            &["route"],
        );
        // Which build answers: `version` and the cargo features it was built with.
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "causeway_build_info",
                "The running build: always 1, its version and features as labels",
            ),
            &["version", "sandbox", "allocator"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                if cfg!(feature = "sandbox") { "yes" } else { "no" },
                if cfg!(feature = "mimalloc") { "mimalloc" } else { "system" },
            ])
            .set(1);
        for c in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(mediation_rejections.clone()),
            Box::new(mediation_failures.clone()),
            Box::new(response_schema_violations.clone()),
            Box::new(auth_failures.clone()),
            Box::new(ratelimit_rejections.clone()),
            Box::new(api_version_requests.clone()),
            Box::new(erp_admitted.clone()),
            Box::new(erp_rejected.clone()),
            Box::new(erp_in_flight.clone()),
            Box::new(erp_queue_depth.clone()),
            Box::new(erp_wait.clone()),
            Box::new(erp_pauses.clone()),
            Box::new(erp_circuit_state.clone()),
            Box::new(erp_pause_seconds.clone()),
            Box::new(erp_effective_limit.clone()),
            Box::new(shared_state_mode.clone()),
            Box::new(shared_state_switches.clone()),
            Box::new(erp_shared_in_flight.clone()),
            Box::new(header_deadline_closed.clone()),
            Box::new(events_delivered.clone()),
            Box::new(event_delivery_failures.clone()),
            Box::new(events_dead_lettered.clone()),
            Box::new(event_delivery_lag.clone()),
            Box::new(invoice_sync_latency.clone()),
            Box::new(events_undelivered.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(in_flight.clone()),
            Box::new(upstream_up.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            auth_failures,
            ratelimit_rejections,
            api_version_requests,
            erp_admitted,
            erp_rejected,
            erp_in_flight,
            erp_queue_depth,
            erp_wait,
            erp_pauses,
            erp_circuit_state,
            erp_pause_seconds,
            erp_effective_limit,
            shared_state_mode,
            shared_state_switches,
            erp_shared_in_flight,
            header_deadline_closed,
            events_delivered,
            event_delivery_failures,
            events_dead_lettered,
            event_delivery_lag,
            invoice_sync_latency,
            events_undelivered,
            requests,
            duration,
            upstream_duration,
            in_flight,
            upstream_up,
            mediation_rejections,
            mediation_failures,
            response_schema_violations,
        }
    }

    /// The process's metrics. One registry per process: policies built at config load record
    /// into it without being handed a reference.
    pub fn global() -> &'static Arc<Metrics> {
        static GLOBAL: std::sync::OnceLock<Arc<Metrics>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Arc::new(Metrics::new()))
    }

    /// Text exposition format. Counters kept outside the registry (pingora's header deadline)
    /// are brought up to date first.
    pub fn render(&self) -> Vec<u8> {
        use prometheus::Encoder;
        let closed = pingora::protocols::http::v1::server::header_deadline_closed_total();
        let seen = self.header_deadline_closed.get();
        if closed > seen {
            self.header_deadline_closed.inc_by(closed - seen);
        }
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"];
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// One route's request metrics, with the labelled children resolved on first use and kept:
/// a request then costs no label hashing. The children are the registry's own, so a reload
/// that recompiles the route keeps counting into the same series.
pub struct RouteMetrics {
    route: String,
    cells: Vec<std::sync::OnceLock<(prometheus::IntCounter, prometheus::Histogram, prometheus::Histogram)>>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteMetrics({})", self.route)
    }
}

impl RouteMetrics {
    pub fn new(route: &str) -> Self {
        RouteMetrics {
            route: route.to_string(),
            cells: (0..METHODS.len() * CLASSES.len()).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// Record one finished request. `upstream_seconds` is `None` when nothing reached upstream.
    pub fn observe(&self, method: &str, status: u16, total_seconds: f64, upstream_seconds: Option<f64>) {
        let m = METHODS.iter().position(|x| *x == method_label(method)).unwrap_or(METHODS.len() - 1);
        let c = CLASSES.iter().position(|x| *x == status_class(status)).unwrap_or(CLASSES.len() - 1);
        let (requests, duration, upstream) = self.cells[m * CLASSES.len() + c].get_or_init(|| {
            let g = Metrics::global();
            let labels = [self.route.as_str(), METHODS[m], CLASSES[c]];
            (
                g.requests.with_label_values(&labels),
                g.duration.with_label_values(&labels),
                g.upstream_duration.with_label_values(&labels),
            )
        });
        requests.inc();
        duration.observe(total_seconds);
        if let Some(s) = upstream_seconds {
            upstream.observe(s);
        }
    }
}

fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label("BREW"), "OTHER");
        assert_eq!(status_class(0), "none");
        assert_eq!(status_class(503), "5xx");
        let r = RouteMetrics::new("labels-test");
        r.observe("BREW", 200, 0.01, Some(0.005));
        r.observe("BREW", 204, 0.01, None);
        let text = String::from_utf8(Metrics::global().render()).unwrap();
        let requests = r#"causeway_requests_total{method="OTHER",route="labels-test",status_class="2xx"} 2"#;
        assert!(text.contains(requests), "{text}");
        let upstream = r#"causeway_upstream_duration_seconds_count{method="OTHER",route="labels-test",status_class="2xx"} 1"#;
        assert!(text.contains(upstream), "{text}");
    }
}
