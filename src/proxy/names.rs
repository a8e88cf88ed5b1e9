//! Names of the headers the gateway writes on every request. A `&str` name that `http` does not
//! know as a standard header is parsed and copied twice on every insert (the map key and the
//! case-preserving wire name); these point at static text instead (the vendored pingora-http's
//! `StaticHeaderName`, vendor/README.md).

use crate::observe::correlation::{CORRELATION_HEADER, TRACEPARENT_HEADER};
use pingora::http::StaticHeaderName;

pub static CORRELATION: StaticHeaderName = StaticHeaderName::new(CORRELATION_HEADER);
pub static TRACEPARENT: StaticHeaderName = StaticHeaderName::new(TRACEPARENT_HEADER);
pub static X_FORWARDED_FOR: StaticHeaderName = StaticHeaderName::new("x-forwarded-for");
pub static X_FORWARDED_PROTO: StaticHeaderName = StaticHeaderName::new("x-forwarded-proto");
pub static RATELIMIT_POLICY: StaticHeaderName = StaticHeaderName::new("ratelimit-policy");
pub static RATELIMIT: StaticHeaderName = StaticHeaderName::new("ratelimit");
