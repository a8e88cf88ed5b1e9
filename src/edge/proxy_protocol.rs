//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on listeners behind a TCP load
//! balancer: the balancer sends the client's address before the TLS handshake or the first
//! request, and the connection takes it as its peer address. Only a trusted proxy may send one;
//! a listener that expects it refuses connections without it.

use super::client_addr::Cidrs;
use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use pingora::{Error, ErrorType, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;
use tokio::io::AsyncReadExt;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the protocol's own bound).
const V1_MAX: usize = 107;
/// The most v2 address and TLV bytes read (the protocol allows 65,535).
const V2_MAX: usize = 4096;

/// What a PROXY header said.
#[derive(Debug, Clone, PartialEq)]
pub enum Header {
    /// The client's address, as the proxy received the connection.
    Proxied { source: SocketAddr },
    /// The proxy's own connection (a health check): keep the socket's address.
    Local,
}

/// Parse a complete header at the start of `buf`: what it says and its length in bytes.
pub fn parse(buf: &[u8]) -> std::result::Result<(Header, usize), Refusal> {
    if buf.len() >= 12 && buf[..12] == V2_SIGNATURE[..] {
        return if buf.len() < 16 { Err(Refusal::Incomplete(16)) } else { parse_v2(buf) };
    }
    if buf.starts_with(b"PROXY ") {
        return parse_v1(buf);
    }
    Err(Refusal::NotProxy)
}

#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// More bytes are needed: at least this many in all.
    Incomplete(usize),
    NotProxy,
    Malformed(&'static str),
}

fn parse_v1(buf: &[u8]) -> std::result::Result<(Header, usize), Refusal> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(Refusal::Malformed("v1 line too long"))
        } else {
            Err(Refusal::Incomplete(buf.len() + 1))
        };
    };
    if end + 2 > V1_MAX {
        return Err(Refusal::Malformed("v1 line too long"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| Refusal::Malformed("v1 line is not text"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header::Local,
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| Refusal::Malformed("v1 source address"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(Refusal::Malformed("v1 address family"));
            }
            let port: u16 = sport.parse().map_err(|_| Refusal::Malformed("v1 source port"))?;
            Header::Proxied { source: SocketAddr::new(ip, port) }
        }
        _ => return Err(Refusal::Malformed("v1 line")),
    };
    Ok((header, end + 2))
}

fn parse_v2(buf: &[u8]) -> std::result::Result<(Header, usize), Refusal> {
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(Refusal::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX {
        return Err(Refusal::Malformed("v2 header too long"));
    }
    let total = 16 + len;
    if buf.len() < total {
        return Err(Refusal::Incomplete(total));
    }
    let body = &buf[16..total];
    let header = match (version_command & 0x0f, buf[13]) {
        (0x0, _) => Header::Local,
        (0x1, 0x11) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Header::Proxied {
                source: SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])),
            }
        }
        (0x1, 0x21) if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().map_err(|_| Refusal::Malformed("v2 address"))?;
            let port = u16::from_be_bytes([body[32], body[33]]);
            Header::Proxied { source: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port) }
        }
        // UNSPEC, UDP or a Unix socket: nothing to take; the connection is the proxy's.
        (0x1, 0x00 | 0x12 | 0x22 | 0x31 | 0x32) => Header::Local,
        (0x1, _) => return Err(Refusal::Malformed("v2 address block")),
        _ => return Err(Refusal::Malformed("v2 command")),
    };
    Ok((header, total))
}

/// Reads the PROXY header of each connection of a listener (pingora's pre-handshake hook).
pub struct ProxyProtocol {
    pub trusted: Cidrs,
    /// The whole header must arrive within this.
    pub timeout: Duration,
}

impl ProxyProtocol {
    async fn read_header(stream: &mut L4Stream) -> std::result::Result<(Header, Vec<u8>), Refusal> {
        let mut buf = Vec::with_capacity(64);
        // The shortest header (`PROXY UNKNOWN\r\n`); a v2 header asks for more.
        let mut want = 15;
        loop {
            let start = buf.len();
            buf.resize(want, 0);
            stream
                .read_exact(&mut buf[start..])
                .await
                .map_err(|_| Refusal::Malformed("connection closed"))?;
            match parse(&buf) {
                Ok((header, used)) => return Ok((header, buf.split_off(used))),
                Err(Refusal::Incomplete(n)) => want = n,
                Err(e) => return Err(e),
            }
        }
    }
}

#[async_trait]
impl PreTlsProcess for ProxyProtocol {
    async fn process(&self, stream: &mut L4Stream) -> Result<()> {
        let peer = stream.get_socket_digest().and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let Some(peer) = peer.filter(|p| self.trusted.contains(p.ip())) else {
            tracing::debug!(peer = ?peer, "PROXY protocol listener: connection from an untrusted address refused");
            return Error::e_explain(ErrorType::AcceptError, "PROXY header from an untrusted peer");
        };
        let (header, rest) = match tokio::time::timeout(self.timeout, Self::read_header(stream)).await {
            Ok(Ok(read)) => read,
            Ok(Err(refusal)) => {
                tracing::debug!(%peer, ?refusal, "PROXY protocol header refused");
                return Error::e_explain(ErrorType::AcceptError, "invalid PROXY protocol header");
            }
            Err(_) => return Error::e_explain(ErrorType::AcceptError, "PROXY protocol header timed out"),
        };
        // Bytes read past the header belong to TLS or HTTP.
        stream.rewind(&rest);
        if let Header::Proxied { source } = header {
            let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
            let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(source)));
            stream.set_socket_digest(digest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.extend([0x20 | cmd, family]);
        b.extend((body.len() as u16).to_be_bytes());
        b.extend(body);
        b
    }

    #[test]
    fn v1_headers() {
        let (h, used) = parse(b"PROXY TCP4 198.51.100.7 10.0.0.1 51000 443\r\nGET").unwrap();
        assert_eq!(h, Header::Proxied { source: "198.51.100.7:51000".parse().unwrap() });
        assert_eq!(used, 44);
        let (h, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 443\r\n").unwrap();
        assert_eq!(h, Header::Proxied { source: "[2001:db8::7]:1".parse().unwrap() });
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), (Header::Local, 15));
        assert_eq!(parse(b"PROXY TCP4 198.51.100.7"), Err(Refusal::Incomplete(24)));
        assert_eq!(
            parse(b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n"),
            Err(Refusal::Malformed("v1 address family"))
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"),
            Err(Refusal::Malformed("v1 source port"))
        );
        assert_eq!(parse(&[b'P'; 200][..]), Err(Refusal::NotProxy));
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert_eq!(parse(long.as_bytes()), Err(Refusal::Malformed("v1 line too long")));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Err(Refusal::NotProxy));
    }

    #[test]
    fn v2_headers() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1];
        body.extend(51000u16.to_be_bytes());
        body.extend(443u16.to_be_bytes());
        body.extend([0x20, 0, 1, 0]); // a TLV, skipped
        let frame = v2(1, 0x11, &body);
        let (h, used) = parse(&frame).unwrap();
        assert_eq!(h, Header::Proxied { source: "198.51.100.7:51000".parse().unwrap() });
        assert_eq!(used, frame.len());
        assert_eq!(parse(&v2(0, 0, &[])).unwrap().0, Header::Local);
        assert_eq!(parse(&frame[..20]), Err(Refusal::Incomplete(frame.len())));
        assert_eq!(parse(&v2(1, 0x11, &[1, 2])), Err(Refusal::Malformed("v2 address block")));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&huge), Err(Refusal::Malformed("v2 header too long")));
    }
}
