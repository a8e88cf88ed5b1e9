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
    let mut transfer_encoding = 0;
    let mut content_length = 0;
    let mut field = |line: &[u8]| -> Result<(), Refusal> {
        let Some(colon) = memchr::memchr(b':', line) else { return Ok(()) };
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
        Ok(())
    };
    // One pass over the line ends (memchr: a bearer token makes most headers long): each must
    // follow a CR (no bare LF), and each line between the request line and the blank line is a
    // field.
    let mut line_start: Option<usize> = None;
    let mut ended = false;
    for end in memchr::memchr_iter(b'\n', raw) {
        if end == 0 || raw[end - 1] != b'\r' {
            return Err("The request uses bare LF line endings; HTTP/1.1 lines end with CRLF");
        }
        let Some(start) = line_start.replace(end + 1) else { continue };
        let line = &raw[start..end - 1];
        ended |= line.is_empty();
        if !ended {
            field(line)?;
        }
    }
    // A last line without its line end (the raw header normally ends with the blank line).
    if let Some(start) = line_start.filter(|s| *s < raw.len() && !ended) {
        let rest = &raw[start..];
        field(rest.strip_suffix(b"\r").unwrap_or(rest))?;
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
        assert!(check(b"\nGET / HTTP/1.1\r\n\r\n").is_err(), "a bare LF first");
        assert!(
            check(b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6").is_err(),
            "an unended last line"
        );
        assert!(
            check(b"GET / HTTP/1.1\r\n\r\nContent-Length: 5\r\nContent-Length: 6\r\n").is_ok(),
            "after the blank line: no fields"
        );
        assert!(check(b"GET / HTTP/1.1\r\n\r\nx\n").is_err(), "a bare LF anywhere");
    }
}
