//! `X-Correlation-ID` and W3C `traceparent`: accepted from the caller when well-formed, minted
//! otherwise, forwarded upstream and returned to the caller.

use rand::Rng;

pub const CORRELATION_HEADER: &str = "x-correlation-id";
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The ids of one request.
#[derive(Debug, Clone, Default)]
pub struct Correlation {
    pub correlation_id: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// This hop's span id (16 hex digits): the parent-id sent upstream.
    pub span_id: String,
    /// The caller's span (the parent of this hop's), when it sent a traceparent.
    pub parent_id: Option<String>,
    pub flags: String,
    /// `00-<trace>-<span>-<flags>`, built once: it goes both upstream and back to the caller.
    traceparent: String,
}

impl Correlation {
    /// Build from the caller's headers (either may be absent or malformed).
    pub fn from_headers(correlation: Option<&[u8]>, traceparent: Option<&[u8]>) -> Self {
        let correlation_id = correlation
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|v| valid_correlation_id(v))
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut rng = rand::rng();
        let (trace_id, parent_id, flags) = match traceparent.and_then(parse_traceparent) {
            Some((trace, parent, flags)) => (trace, Some(parent), flags),
            None => {
                let sampled = super::traces::sample_new_trace();
                (random_hex(&mut rng, 16), None, if sampled { "01" } else { "00" }.to_string())
            }
        };
        let span_id = random_hex(&mut rng, 8);
        let traceparent = format!("00-{trace_id}-{span_id}-{flags}");
        Correlation { correlation_id, trace_id, span_id, parent_id, flags, traceparent }
    }

    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }
}

/// Printable, bounded, no separators that could smuggle a second header or log field.
fn valid_correlation_id(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Returns (trace id, parent id, flags) of a valid version-00 traceparent.
fn parse_traceparent(v: &[u8]) -> Option<(String, String, String)> {
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
    Some((trace.to_string(), parent.to_string(), flags.to_string()))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `bytes` random bytes as lower-case hex, never all zero (an invalid trace or span id).
fn random_hex(rng: &mut impl Rng, bytes: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut raw = [0u8; 16];
    let raw = &mut raw[..bytes.min(16)];
    loop {
        rng.fill_bytes(raw);
        if raw.iter().any(|b| *b != 0) {
            break;
        }
    }
    let mut out = String::with_capacity(raw.len() * 2);
    for b in raw.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_valid_ids() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = Correlation::from_headers(Some(b"order-42"), Some(tp));
        assert_eq!(c.correlation_id, "order-42");
        assert_eq!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(c.span_id, "00f067aa0ba902b7", "this hop gets its own span id");
        assert_eq!(c.parent_id.as_deref(), Some("00f067aa0ba902b7"), "the caller's span is its parent");
        assert!(c.traceparent().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    }

    #[test]
    fn mints_for_missing_or_malformed() {
        let c = Correlation::from_headers(Some(b"bad id\r\nx: y"), Some(b"00-zz-00-01"));
        assert_eq!(uuid::Uuid::parse_str(&c.correlation_id).unwrap().get_version_num(), 7);
        assert_eq!(c.trace_id.len(), 32);
        assert_eq!(c.parent_id, None, "a trace the gateway starts has no parent");
        assert!(parse_traceparent(c.traceparent().as_bytes()).is_some());
        let zero = b"00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert!(parse_traceparent(zero).is_none());
        let upper = b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(upper).is_none());
        assert!(parse_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
    }
}
