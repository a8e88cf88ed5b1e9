//! Mediation: JSON Schema validation and body transformation per route and direction.
//!
//! The spec is `config::spec::MediationSpec`; [`MediationPolicy`] is compiled from it once at
//! load time (schemas, mapping tables and jq programs included); `proxy::mediated` runs it: the
//! request is read, checked and transformed before anything reaches the ERP, and the response is
//! buffered, monitored and transformed before anything reaches the caller.

pub mod convert;
pub mod jq;
pub mod pointer;
pub mod schema;
pub mod table;

use crate::error::{GatewayError, Violation};
use bytes::Bytes;
use jq::{JqFailure, JqProgram};
use schema::Schema;
use serde_json::Value;
use std::time::Duration;
use table::Table;

#[derive(Debug)]
pub struct MediationPolicy {
    pub name: String,
    pub request: Option<RequestMediation>,
    pub response: Option<ResponseMediation>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time bound of one transformation.
    pub timeout: Duration,
    /// Size bound of a transformation's output, and of an ERP response read for mediation.
    pub max_output_bytes: usize,
}

#[derive(Debug, Default)]
pub struct RequestMediation {
    pub body_schema: Option<Schema>,
    pub query_schema: Option<Schema>,
    pub headers_schema: Option<Schema>,
    pub transform: Transform,
}

#[derive(Debug, Default)]
pub struct ResponseMediation {
    /// Monitor mode: violations are counted and logged, the response is untouched by them.
    pub schema: Option<Schema>,
    pub transform: Transform,
    /// Statuses whose bodies are mediated; `None` means every 2xx.
    pub statuses: Option<Vec<u16>>,
}

/// A mapping table, then a jq program; either may be absent.
#[derive(Debug, Default)]
pub struct Transform {
    pub table: Option<Table>,
    pub jq: Option<JqProgram>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// Why a transformation failed, before it is told to anyone.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformFailure {
    /// A mapping table met data it cannot map (a bad decimal, a scalar where an array belongs).
    Mapping {
        pointer: String,
        detail: String,
    },
    Program(String),
    Timeout,
    TooLarge,
    Busy,
}

impl TransformFailure {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            TransformFailure::Mapping { .. } => "mapping",
            TransformFailure::Program(_) => "program",
            TransformFailure::Timeout => "timeout",
            TransformFailure::TooLarge => "too_large",
            TransformFailure::Busy => "busy",
        }
    }

    /// What the caller is told. A request the table cannot map is the caller's data; a response
    /// it cannot map is the ERP's.
    pub fn to_error(&self, direction: Direction, limits: Limits, upstream: &str) -> GatewayError {
        let d = direction.as_str();
        match (self, direction) {
            (TransformFailure::Mapping { pointer, detail }, Direction::Request) => {
                GatewayError::RequestUnmappable { pointer: pointer.clone(), detail: detail.clone() }
            }
            (TransformFailure::Mapping { pointer, detail }, Direction::Response) => {
                GatewayError::ResponseUnmappable {
                    upstream: upstream.to_string(),
                    pointer: pointer.clone(),
                    detail: detail.clone(),
                }
            }
            (TransformFailure::Program(detail), _) => {
                GatewayError::TransformFailed { direction: d, detail: detail.clone() }
            }
            (TransformFailure::Timeout, _) => {
                GatewayError::TransformTimeout { direction: d, limit_ms: limits.timeout.as_millis() as u64 }
            }
            (TransformFailure::TooLarge, _) => {
                GatewayError::TransformTooLarge { direction: d, limit: limits.max_output_bytes }
            }
            (TransformFailure::Busy, _) => GatewayError::TransformBusy,
        }
    }
}

impl Transform {
    pub fn is_identity(&self) -> bool {
        self.table.is_none() && self.jq.is_none()
    }

    /// Map, then run the program, then serialize within the size bound. Blocks the calling
    /// thread while a jq program runs: for tools, tests and benchmarks.
    pub fn apply(&self, input: Value, limits: Limits) -> Result<Bytes, TransformFailure> {
        let mut value = self.map(input)?;
        if let Some(program) = &self.jq {
            value = program.run_bounded(value, limits.timeout).map_err(jq_failure)?;
        }
        serialize(&value, limits)
    }

    /// [`Transform::apply`] for the request path: a jq program runs off the runtime's threads.
    pub async fn apply_async(&self, input: Value, limits: Limits) -> Result<Bytes, TransformFailure> {
        let mut value = self.map(input)?;
        if let Some(program) = &self.jq {
            value = program.run_bounded_async(value, limits.timeout).await.map_err(jq_failure)?;
        }
        serialize(&value, limits)
    }

    fn map(&self, input: Value) -> Result<Value, TransformFailure> {
        match &self.table {
            Some(table) => table
                .apply(&input)
                .map_err(|e| TransformFailure::Mapping { pointer: e.pointer, detail: e.message }),
            None => Ok(input),
        }
    }
}

fn jq_failure(e: JqFailure) -> TransformFailure {
    match e {
        JqFailure::Program(m) => TransformFailure::Program(m),
        JqFailure::Timeout => TransformFailure::Timeout,
        JqFailure::Busy => TransformFailure::Busy,
    }
}

fn serialize(value: &Value, limits: Limits) -> Result<Bytes, TransformFailure> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(BoundedWriter { out: &mut out, limit: limits.max_output_bytes }, value)
        .map_err(|_| TransformFailure::TooLarge)?;
    Ok(Bytes::from(out))
}

/// Stops serialization as soon as the bound is crossed instead of after a huge allocation.
struct BoundedWriter<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::Error::other("transformation output over its size bound"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MediationPolicy {
    /// Whether the request body must be read before the ERP is called.
    pub fn reads_request_body(&self) -> bool {
        self.request.as_ref().is_some_and(|r| r.body_schema.is_some() || !r.transform.is_identity())
    }

    /// Query and header checks, which need no body.
    pub fn check_request_head(&self, query: Option<&str>, headers: &http::HeaderMap) -> Vec<Violation> {
        let Some(req) = &self.request else { return Vec::new() };
        let mut out = Vec::new();
        if let Some(s) = &req.query_schema {
            out.extend(s.violations("query", &query_document(query)));
        }
        if let Some(s) = &req.headers_schema {
            out.extend(s.violations("headers", &headers_document(headers)));
        }
        out
    }

    pub fn check_request_body(&self, body: &Value) -> Vec<Violation> {
        match self.request.as_ref().and_then(|r| r.body_schema.as_ref()) {
            Some(s) => s.violations("body", body),
            None => Vec::new(),
        }
    }

    pub fn response_applies(&self, status: u16) -> bool {
        match &self.response {
            None => false,
            Some(r) => match &r.statuses {
                Some(list) => list.contains(&status),
                None => (200..300).contains(&status),
            },
        }
    }
}

/// Query parameters as a JSON object of strings; a repeated name becomes an array.
pub fn query_document(query: Option<&str>) -> Value {
    let mut doc = serde_json::Map::new();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();
    for (k, v) in pairs {
        match doc.get_mut(&k) {
            None => {
                doc.insert(k, Value::String(v));
            }
            Some(Value::Array(a)) => a.push(Value::String(v)),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, Value::String(v)]);
            }
        }
    }
    Value::Object(doc)
}

/// Request headers as a JSON object keyed by lower-case name (values that are not text skipped).
pub fn headers_document(headers: &http::HeaderMap) -> Value {
    let mut doc = serde_json::Map::new();
    for (name, value) in headers {
        if let Ok(v) = value.to_str() {
            doc.insert(name.as_str().to_string(), Value::String(v.to_string()));
        }
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(bytes: usize) -> Limits {
        Limits { timeout: Duration::from_millis(200), max_output_bytes: bytes }
    }

    #[test]
    fn the_size_bound_stops_serialization() {
        let t = Transform { table: None, jq: Some(JqProgram::compile("[range(100000)]").unwrap()) };
        assert_eq!(t.apply(json!(null), limits(1024)), Err(TransformFailure::TooLarge));
        assert!(t.apply(json!(null), limits(10 << 20)).is_ok());
    }

    #[test]
    fn table_then_program() {
        let spec: table::TableSpec =
            serde_saphyr::from_str("mode: build\nops:\n  - copy: {from: /a, to: /x}\n").unwrap();
        let t = Transform {
            table: Some(Table::compile(&spec).unwrap()),
            jq: Some(JqProgram::compile(".x += 1").unwrap()),
        };
        assert_eq!(t.apply(json!({"a": 1, "b": 2}), limits(1024)).unwrap(), Bytes::from_static(b"{\"x\":2}"));
    }

    #[test]
    fn failures_map_to_problems_by_direction() {
        let m = TransformFailure::Mapping { pointer: "/a".into(), detail: "bad".into() };
        assert_eq!(m.to_error(Direction::Request, limits(1), "bc").status(), 422);
        assert_eq!(m.to_error(Direction::Response, limits(1), "bc").status(), 502);
        assert_eq!(TransformFailure::Timeout.to_error(Direction::Request, limits(1), "bc").status(), 500);
        assert_eq!(TransformFailure::TooLarge.to_error(Direction::Response, limits(1), "bc").status(), 500);
        assert_eq!(TransformFailure::Busy.to_error(Direction::Request, limits(1), "bc").status(), 503);
    }

    #[test]
    fn query_documents_keep_repeated_names() {
        assert_eq!(query_document(Some("a=1&b=x%20y&a=2")), json!({"a": ["1", "2"], "b": "x y"}));
        assert_eq!(query_document(None), json!({}));
    }
}
