//! The request path the router sees and the upstream receives: percent-encoded unreserved
//! characters decoded and dot segments removed (RFC 3986 §6.2.2, §5.2.4), so `/erp/v2/../x`
//! cannot reach a path the routes never named. What could still be read two ways is refused: an
//! encoded `/` or `\`, a NUL, a raw `\`, malformed escapes, and a `..` that climbs above the root.

use std::borrow::Cow;

/// Why a path is refused (a 400 problem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    EncodedSeparator,
    Backslash,
    Nul,
    BadEscape,
    AboveRoot,
    NotAbsolute,
}

impl PathRefusal {
    pub fn describe(self) -> &'static str {
        match self {
            PathRefusal::EncodedSeparator => {
                "The path contains an encoded `/` or `\\` (%2F, %5C), which servers read differently; send the segments unencoded"
            }
            PathRefusal::Backslash => "The path contains `\\`; use `/` between segments",
            PathRefusal::Nul => "The path contains a NUL character (%00)",
            PathRefusal::BadEscape => "The path contains a `%` that is not followed by two hex digits",
            PathRefusal::AboveRoot => "The path's `..` segments climb above the root",
            PathRefusal::NotAbsolute => "The path must start with `/`",
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The normalized path. Borrowed (no allocation) when there is nothing to change, which is
/// every request of a well-behaved client.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathRefusal> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathRefusal::NotAbsolute);
    }
    let needs_work = bytes.iter().any(|&b| b == b'%' || b == b'\\' || b == 0) || path.contains("/.");
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(bytes)?;
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// Decode `%XX` of unreserved characters; keep other escapes (upper-cased); refuse separators,
/// NUL and malformed escapes.
fn decode_unreserved(bytes: &[u8]) -> Result<String, PathRefusal> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathRefusal::Backslash),
            0 => return Err(PathRefusal::Nul),
            b'%' => {
                let (Some(h), Some(l)) =
                    (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
                else {
                    return Err(PathRefusal::BadEscape);
                };
                let value = h * 16 + l;
                match value {
                    b'/' | b'\\' => return Err(PathRefusal::EncodedSeparator),
                    0 => return Err(PathRefusal::Nul),
                    v if unreserved(v) => out.push(char::from(v)),
                    v => {
                        out.push('%');
                        out.push_str(&format!("{v:02X}"));
                    }
                }
                i += 3;
            }
            _ => {
                // Copy a run of ordinary bytes at once (they may be UTF-8 of the raw path).
                let start = i;
                while i < bytes.len() && !matches!(bytes[i], b'%' | b'\\' | 0) {
                    i += 1;
                }
                out.push_str(&String::from_utf8_lossy(&bytes[start..i]));
            }
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, except that a `..` with nothing left to remove is an
/// error instead of being dropped: the caller meant a path outside what the gateway serves.
fn remove_dot_segments(path: &str) -> Result<String, PathRefusal> {
    let mut segments: Vec<&str> = Vec::new();
    let body = &path[1..];
    let parts: Vec<&str> = body.split('/').collect();
    let last = parts.len() - 1;
    let mut trailing_slash = false;
    for (i, seg) in parts.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathRefusal::AboveRoot);
                }
                trailing_slash = i == last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathRefusal> {
        normalize(p).map(|c| c.into_owned())
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for p in ["/", "/erp/v2/items", "/erp/v2/items('1900-S')", "/a.b/c..d", "/x/", "/ü"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p), "{p}");
        }
        assert_eq!(n("/a/.b/..c/...").unwrap(), "/a/.b/..c/...", "dots inside names are names");
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(n("/erp/v2/items/../customers").unwrap(), "/erp/v2/customers");
        assert_eq!(n("/erp/./v2/./items").unwrap(), "/erp/v2/items");
        assert_eq!(n("/erp/v2/items/..").unwrap(), "/erp/v2/");
        assert_eq!(n("/erp/v2/items/.").unwrap(), "/erp/v2/items/");
        assert_eq!(n("/a/b/../../c").unwrap(), "/c");
        assert_eq!(n("/a/..").unwrap(), "/");
        assert_eq!(n("/a//../b").unwrap(), "/a/b", "an empty segment is a segment");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept() {
        assert_eq!(n("/erp/v2/%69tems").unwrap(), "/erp/v2/items");
        assert_eq!(n("/erp/v2/%2e%2e/x").unwrap(), "/erp/x");
        assert_eq!(n("/erp/v2/%2E%2E/%2e%2E/%2e%2e/x"), Err(PathRefusal::AboveRoot));
        assert_eq!(n("/a%20b/%c3%bc").unwrap(), "/a%20b/%C3%BC");
        assert_eq!(n("/a%7e").unwrap(), "/a~");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(n("/erp/v2/../../../x"), Err(PathRefusal::AboveRoot));
        assert_eq!(n("/.."), Err(PathRefusal::AboveRoot));
        assert_eq!(n("/erp/v2/items%2F..%2F..%2Fx"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(n("/erp/v2/items%2fx"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(n("/erp/v2/items%5c..%5cx"), Err(PathRefusal::EncodedSeparator));
        assert_eq!(n("/erp\\..\\x"), Err(PathRefusal::Backslash));
        assert_eq!(n("/erp/v2/items%00"), Err(PathRefusal::Nul));
        assert_eq!(n("/erp/%zz"), Err(PathRefusal::BadEscape));
        assert_eq!(n("/erp/%4"), Err(PathRefusal::BadEscape));
        assert_eq!(n("/erp/%é"), Err(PathRefusal::BadEscape));
        assert_eq!(n("erp"), Err(PathRefusal::NotAbsolute));
        assert_eq!(n("*"), Err(PathRefusal::NotAbsolute));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_never_leaves_dot_segments(path in "/[a-z%./\\\\0-9A-Fé]{0,40}") {
            if let Ok(out) = normalize(&path) {
                proptest::prop_assert!(out.starts_with('/'));
                proptest::prop_assert!(!out.split('/').any(|s| s == ".." || s == "."), "{out}");
                proptest::prop_assert!(normalize(&out).is_ok_and(|again| again == out), "idempotent: {out}");
            }
        }
    }
}
