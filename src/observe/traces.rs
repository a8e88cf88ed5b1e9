//! OTLP traces (HTTP/protobuf): the gateway's span of each request, the ERP exchanges of an
//! order and each delivery attempt of its events, all in the one trace the gateway already
//! propagates (`traceparent`). Off unless `traces.endpoint` is set.
//!
//! A span is built whole when it ends, with the ids the gateway already sent upstream and
//! stored with the order, and handed to the SDK's batch processor: a bounded queue drained by a
//! thread of its own through a blocking client. The request path pays one `try_send`; a slow or
//! absent collector loses spans (counted by the SDK), never delays a request or grows memory.

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;
use rand::Rng;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// What `traces:` of causeway.yaml compiles to.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The collector's OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Extra request headers (a vendor's API key), values from the environment.
    pub headers: Vec<(String, String)>,
    /// How often queued spans are sent.
    pub flush_interval: Duration,
    /// Spans waiting to be sent; beyond this they are dropped.
    pub max_queue: usize,
    /// The share of the traces this gateway starts that are recorded (a caller's traceparent
    /// decides for its own traces, by its sampled flag).
    pub sample_ratio: f64,
    /// How long one export may take.
    pub export_timeout: Duration,
}

struct Exporter {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    sample_ratio: f64,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Start exporting (once per process; a reload that changes `traces:` takes a restart).
pub fn start(settings: &TraceSettings) -> Result<(), String> {
    if EXPORTER.get().is_some() {
        return Ok(());
    }
    let headers: HashMap<String, String> = settings.headers.iter().cloned().collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.export_timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(settings.max_queue)
        .with_scheduled_delay(settings.flush_interval)
        .build();
    let mut processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
    let resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    processor.set_resource(&resource);
    let scope = InstrumentationScope::builder("causeway").with_version(env!("CARGO_PKG_VERSION")).build();
    let _ = EXPORTER.set(Exporter { processor, scope, sample_ratio: settings.sample_ratio });
    tracing::info!(endpoint = %settings.endpoint, "exporting traces over OTLP/HTTP");
    Ok(())
}

/// Whether spans are exported (`traces:` is set).
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// A value cut to at most 256 bytes (a path or message from a caller may be of any length).
pub fn bounded(value: &str) -> String {
    let mut end = value.len().min(256);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_string()
}

/// Send what is queued and stop (at shutdown).
pub fn shutdown() {
    if let Some(e) = EXPORTER.get() {
        if let Err(err) = e.processor.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %err, "traces not all sent at shutdown");
        }
    }
}

/// Whether a trace this gateway starts is recorded: always when no exporter runs (the flag
/// then only tells the ERP and subscribers the trace is worth keeping, as before).
pub fn sample_new_trace() -> bool {
    match EXPORTER.get() {
        Some(e) if e.sample_ratio < 1.0 => rand::rng().random::<f64>() < e.sample_ratio,
        _ => true,
    }
}

/// The context of a span: its trace, its own id and whether the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpanIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl SpanIds {
    /// From a version-00 `traceparent` the gateway wrote (or validated); None when empty or
    /// malformed.
    pub fn parse(traceparent: &str) -> Option<SpanIds> {
        let mut parts = traceparent.split('-');
        let (_version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
        let span_id = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(SpanIds { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The traceparent naming this span as the parent of the next hop.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

/// One span being timed. Does nothing (and costs no allocation past its name) when traces are
/// off or the trace is not sampled.
pub struct Span {
    inner: Option<Box<Recording>>,
}

struct Recording {
    ids: SpanIds,
    parent: SpanId,
    parent_is_remote: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
}

impl Span {
    /// A child of the span `parent` names (a traceparent), with a fresh span id. A no-op span
    /// when `parent` is empty or malformed, the trace is not sampled, or traces are off.
    pub fn child_of(parent: &str, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> Span {
        let Some(parent) = EXPORTER.get().and(SpanIds::parse(parent)).filter(|p| p.sampled) else {
            return Span { inner: None };
        };
        let ids = SpanIds { span_id: random_span_id(), ..parent };
        Span::recording(ids, parent.span_id, false, kind, name.into(), SystemTime::now())
    }

    /// The span whose ids were chosen already (the gateway's own span of a request, whose id
    /// went upstream in `traceparent`): `parent` is the caller's span, if it sent one.
    pub fn with_ids(
        ids: SpanIds,
        parent: Option<SpanId>,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        start: SystemTime,
    ) -> Span {
        if EXPORTER.get().is_none() || !ids.sampled {
            return Span { inner: None };
        }
        let remote = parent.is_some();
        Span::recording(ids, parent.unwrap_or(SpanId::INVALID), remote, kind, name.into(), start)
    }

    fn recording(
        ids: SpanIds,
        parent: SpanId,
        parent_is_remote: bool,
        kind: SpanKind,
        name: Cow<'static, str>,
        start: SystemTime,
    ) -> Span {
        let inner = Recording {
            ids,
            parent,
            parent_is_remote,
            kind,
            name,
            start,
            attributes: Vec::with_capacity(8),
            status: Status::Unset,
        };
        Span { inner: Some(Box::new(inner)) }
    }

    pub fn is_recording(&self) -> bool {
        self.inner.is_some()
    }

    /// This span's traceparent, for the next hop; None when not recording.
    pub fn traceparent(&self) -> Option<String> {
        self.inner.as_ref().map(|r| r.ids.traceparent())
    }

    pub fn attr(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(r) = self.inner.as_mut() {
            r.attributes.push(KeyValue::new(key, value));
        }
    }

    /// The operation failed: the span's status says why (at most 256 bytes of it: a peer's
    /// error message may be of any length).
    pub fn fail(&mut self, why: impl Into<Cow<'static, str>>) {
        if let Some(r) = self.inner.as_mut() {
            let why = why.into();
            r.status = Status::error(if why.len() > 256 { Cow::Owned(bounded(&why)) } else { why });
        }
    }

    pub fn succeed(&mut self) {
        if let Some(r) = self.inner.as_mut() {
            r.status = Status::Ok;
        }
    }

    /// End now and queue for export.
    pub fn end(self) {
        let (Some(r), Some(exporter)) = (self.inner, EXPORTER.get()) else { return };
        let r = *r;
        let flags = if r.ids.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let context = SpanContext::new(r.ids.trace_id, r.ids.span_id, flags, false, TraceState::default());
        exporter.processor.on_end(SpanData {
            span_context: context,
            parent_span_id: r.parent,
            parent_span_is_remote: r.parent_is_remote,
            span_kind: r.kind,
            name: r.name,
            start_time: r.start,
            end_time: SystemTime::now().max(r.start),
            attributes: r.attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: r.status,
            instrumentation_scope: exporter.scope.clone(),
        });
    }
}

fn random_span_id() -> SpanId {
    let mut rng = rand::rng();
    loop {
        let id = SpanId::from_bytes(rng.random::<[u8; 8]>());
        if id != SpanId::INVALID {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_gives_its_ids_and_sampled_flag_back() {
        let ids = SpanIds::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(ids.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ids.span_id.to_string(), "00f067aa0ba902b7");
        assert!(ids.sampled);
        assert_eq!(ids.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let unsampled = SpanIds::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-x1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f0é7aa0ba902b-01",
        ] {
            assert_eq!(SpanIds::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn without_an_exporter_spans_record_nothing() {
        // No test in this binary starts the exporter: spans are no-ops, new traces sampled.
        let span =
            Span::child_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "x", SpanKind::Client);
        assert!(!span.is_recording());
        assert_eq!(span.traceparent(), None);
        span.end();
        assert!(sample_new_trace());
    }
}
