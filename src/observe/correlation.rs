//! `X-Correlation-ID` and W3C `traceparent`: accepted from the caller when well-formed, minted
//! otherwise, forwarded upstream and returned to the caller.

use http::HeaderValue;
use rand::Rng;

pub const CORRELATION_HEADER: &str = "x-correlation-id";
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The ids of one request, kept as the header values they are sent as (upstream and back to
/// the caller): a caller's valid correlation id is the request's own bytes (no copy), and the
/// trace, span and flags are slices of the traceparent.
#[derive(Debug, Clone)]
pub struct Correlation {
    correlation: HeaderValue,
    /// `00-<trace>-<span>-<flags>`: this hop's span id is the parent-id sent upstream.
    traceparent: HeaderValue,
    /// The caller's span (the parent of this hop's), when it sent a traceparent.
    parent_id: Option<[u8; 16]>,
}

impl Default for Correlation {
    fn default() -> Self {
        Correlation {
            correlation: HeaderValue::from_static(""),
            traceparent: HeaderValue::from_static(""),
            parent_id: None,
        }
    }
}

/// Offsets of the fields in a version-00 traceparent.
const TRACE: std::ops::Range<usize> = 3..35;
const SPAN: std::ops::Range<usize> = 36..52;
const FLAGS: std::ops::Range<usize> = 53..55;
const TRACEPARENT_LEN: usize = 55;

/// A header value owning `text`, shared by its clones without copying (a value built from a
/// `&str` is copied, and copied again by the first clone).
fn shared_value(text: String) -> HeaderValue {
    // Every caller passes printable ASCII (a checked id, hex and dashes).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl Correlation {
    /// Build from the caller's headers (either may be absent or malformed).
    pub fn from_headers(correlation: Option<&HeaderValue>, traceparent: Option<&[u8]>) -> Self {
        let mut rng = rand::rng();
        let correlation = match correlation {
            Some(v) if valid_correlation_id(v.as_bytes()) => v.clone(),
            _ => shared_value(mint_correlation_id(&mut rng)),
        };
        let mut out = String::with_capacity(TRACEPARENT_LEN);
        out.push_str("00-");
        let (parent_id, flags) = match traceparent.and_then(parse_traceparent) {
            Some((trace, parent, flags)) => {
                out.push_str(trace);
                (Some(parent), flags)
            }
            None => {
                push_random_hex(&mut rng, &mut out, 16);
                (None, if super::traces::sample_new_trace() { "01" } else { "00" })
            }
        };
        out.push('-');
        push_random_hex(&mut rng, &mut out, 8);
        out.push('-');
        out.push_str(flags);
        Correlation { correlation, traceparent: shared_value(out), parent_id }
    }

    pub fn correlation_id(&self) -> &str {
        self.correlation.to_str().unwrap_or_default()
    }

    /// `X-Correlation-ID` as sent upstream and back (a clone shares the bytes).
    pub fn correlation_header(&self) -> &HeaderValue {
        &self.correlation
    }

    /// `traceparent` as sent upstream and back (a clone shares the bytes).
    pub fn traceparent_header(&self) -> &HeaderValue {
        &self.traceparent
    }

    pub fn traceparent(&self) -> &str {
        self.traceparent.to_str().unwrap_or_default()
    }

    /// 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        self.traceparent().get(TRACE).unwrap_or_default()
    }

    /// This hop's span id (16 hex digits): the parent-id sent upstream.
    pub fn span_id(&self) -> &str {
        self.traceparent().get(SPAN).unwrap_or_default()
    }

    pub fn flags(&self) -> &str {
        self.traceparent().get(FLAGS).unwrap_or_default()
    }

    /// The caller's span id, when it sent a valid traceparent.
    pub fn parent_id(&self) -> Option<&str> {
        // Only lowercase hex is stored (parse_traceparent checked it).
        self.parent_id.as_ref().and_then(|p| std::str::from_utf8(p).ok())
    }
}

/// A UUIDv7 (time-ordered) from the thread's generator: `Uuid::now_v7` asks the kernel for its
/// random bits on every call (a `getrandom` system call per request).
fn mint_correlation_id(rng: &mut impl Rng) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = rng.random();
    let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid.hyphenated().encode_lower(&mut buf).to_string()
}

/// Printable, bounded, no separators that could smuggle a second header or log field.
fn valid_correlation_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// Returns (trace id, parent id, flags) of a valid version-00 traceparent.
fn parse_traceparent(v: &[u8]) -> Option<(&str, [u8; 16], &str)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Future versions may append fields; version 00 must have exactly four.
    if version == "ff"
        || version.len() != 2
        || !is_lower_hex(version)
        || (version == "00" && parts.next().is_some())
    {
        return None;
    }
    if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    let mut parent_id = [0u8; 16];
    parent_id.copy_from_slice(parent.as_bytes());
    Some((trace, parent_id, flags))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `bytes` random bytes as lower-case hex, never all zero (an invalid trace or span id).
fn push_random_hex(rng: &mut impl Rng, out: &mut String, bytes: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut raw = [0u8; 16];
    let raw = &mut raw[..bytes.min(16)];
    loop {
        rng.fill_bytes(raw);
        if raw.iter().any(|b| *b != 0) {
            break;
        }
    }
    for b in raw.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_valid_ids() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = Correlation::from_headers(Some(&HeaderValue::from_static("order-42")), Some(tp));
        assert_eq!(c.correlation_id(), "order-42");
        assert_eq!(c.correlation_header(), "order-42");
        assert_eq!(c.traceparent_header(), c.traceparent());
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(c.span_id(), "00f067aa0ba902b7", "this hop gets its own span id");
        assert_eq!(c.span_id().len(), 16);
        assert_eq!(c.flags(), "01");
        assert_eq!(c.parent_id(), Some("00f067aa0ba902b7"), "the caller's span is its parent");
        assert_eq!(c.traceparent(), format!("00-{}-{}-01", c.trace_id(), c.span_id()));
    }

    #[test]
    fn mints_for_missing_or_malformed() {
        let c =
            Correlation::from_headers(Some(&HeaderValue::from_static("bad id x: y")), Some(b"00-zz-00-01"));
        assert_eq!(uuid::Uuid::parse_str(c.correlation_id()).unwrap().get_version_num(), 7);
        assert_eq!(c.trace_id().len(), 32);
        assert_eq!(c.parent_id(), None, "a trace the gateway starts has no parent");
        let minted = uuid::Uuid::parse_str(c.correlation_id()).unwrap();
        let ms = minted.get_timestamp().unwrap().to_unix();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        assert!(now.as_secs().abs_diff(ms.0) <= 2, "a v7 id carries the time it was minted");
        let other = Correlation::from_headers(None, None);
        assert_ne!(other.correlation_id(), c.correlation_id());
        assert_ne!(other.trace_id(), c.trace_id());
        // Hostile ids: too long, not ASCII, empty: replaced by a minted one.
        for hostile in ["a".repeat(129).into_bytes(), "ordér-1".as_bytes().to_vec(), Vec::new()] {
            let value = HeaderValue::from_bytes(&hostile).unwrap();
            let c = Correlation::from_headers(Some(&value), None);
            assert_eq!(uuid::Uuid::parse_str(c.correlation_id()).unwrap().get_version_num(), 7);
        }
        assert!(parse_traceparent(c.traceparent().as_bytes()).is_some());
        let zero = b"00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert!(parse_traceparent(zero).is_none());
        let upper = b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(upper).is_none());
        assert!(parse_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
    }
}
