//! Request framing the gateway refuses instead of guessing (request smuggling, RFC 9112 §6.3 and
//! §11.2). pingora reads these leniently (it drops `Content-Length` when `Transfer-Encoding` is
//! present, collapses `Content-Length: 5, 5`, accepts bare LF line endings); an upstream behind
//! the gateway may read the same bytes differently, and the upstream connection pool carries the
//! ERP credential. So anything ambiguous is a 400, before a byte goes upstream, and the
//! connection is closed.
//!
//! The checks read the request header as it arrived (pingora keeps the raw bytes), because the
//! parsed header has already been reconciled.

/// Why the framing is refused (the problem's detail).
pub type Refusal = &'static str;

/// Check the raw HTTP/1 request header (request line, fields, final blank line).
pub fn check(raw: &[u8]) -> Result<(), Refusal> {
    // Bare LF: a line ending without CR. Cheap: one pass, and most headers are < 1 KiB.
    if raw.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || raw[i - 1] != b'\r')) {
        return Err("The request uses bare LF line endings; HTTP/1.1 lines end with CRLF");
    }
    let mut transfer_encoding = 0;
    let mut content_length = 0;
    // Skip the request line; stop at the blank line.
    for line in raw.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding += 1;
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err("Transfer-Encoding other than a single `chunked` is not accepted");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            content_length += 1;
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err("Content-Length must be one decimal number");
            }
        }
    }
    if transfer_encoding > 1 {
        return Err("Transfer-Encoding is repeated");
    }
    if content_length > 1 {
        return Err("Content-Length is repeated");
    }
    if transfer_encoding == 1 && content_length == 1 {
        return Err("The request has both Content-Length and Transfer-Encoding");
    }
    Ok(())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t')).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::check;

    fn req(fields: &str) -> Vec<u8> {
        format!("POST /erp/v2/x HTTP/1.1\r\nHost: a\r\n{fields}\r\n").into_bytes()
    }

    #[test]
    fn unambiguous_requests_pass() {
        assert!(check(&req("")).is_ok());
        assert!(check(&req("Content-Length: 5\r\n")).is_ok());
        assert!(check(&req("Transfer-Encoding: chunked\r\n")).is_ok());
        assert!(check(&req("transfer-encoding:  Chunked \r\n")).is_ok());
        assert!(check(&req("X-Note: a\nb\r\n")).is_err(), "a bare LF inside a value is still a bare LF");
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for fields in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: \r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        ] {
            assert!(check(&req(fields)).is_err(), "{fields:?}");
        }
        assert!(check(b"GET / HTTP/1.1\nHost: a\n\n").is_err(), "bare LF");
        assert!(check(b"GET / HTTP/1.1\r\nHost: a\n\r\n").is_err(), "one bare LF");
    }
}
