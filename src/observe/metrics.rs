//! Prometheus metrics of the request path. Labels are bounded: route names come from config,
//! methods are folded into a fixed set, statuses into classes. Raw paths never become labels.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Route label for requests no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_duration: HistogramVec,
    pub in_flight: IntGauge,
    pub upstream_up: prometheus::IntGaugeVec,
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
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(in_flight.clone()),
            Box::new(upstream_up.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics { registry, requests, duration, upstream_duration, in_flight, upstream_up }
    }

    /// Record one finished request. `upstream_seconds` is `None` when nothing reached upstream.
    pub fn observe(
        &self,
        route: &str,
        method: &str,
        status: u16,
        total_seconds: f64,
        upstream_seconds: Option<f64>,
    ) {
        let labels = [route, method_label(method), status_class(status)];
        self.requests.with_label_values(&labels).inc();
        self.duration.with_label_values(&labels).observe(total_seconds);
        if let Some(s) = upstream_seconds {
            self.upstream_duration.with_label_values(&labels).observe(s);
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> Vec<u8> {
        use prometheus::Encoder;
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
        let m = Metrics::new();
        m.observe("r", "BREW", 200, 0.01, Some(0.005));
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"causeway_requests_total{method="OTHER",route="r",status_class="2xx"} 1"#),
            "{text}"
        );
    }
}
