//! The client's address as the gateway acts on it: the connection's address, or, when that is
//! a trusted proxy (`listen.trusted_proxies`), the address its forwarding header names, hop by
//! hop from the right while each hop is trusted (nginx's `real_ip_recursive`). Headers from an
//! untrusted peer are never believed, and what the gateway forwards upstream is rebuilt from
//! the hops it believed, so a spoofed entry is dropped, never passed on.

use ipnet::IpNet;
use std::net::IpAddr;

/// At most this many hops are read from the right of a forwarding header.
const MAX_HOPS: usize = 32;

/// A set of addresses and networks: the trusted proxies, an IP filter's allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cidrs(Vec<IpNet>);

impl Cidrs {
    /// CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or single addresses.
    pub fn parse(entries: &[&str]) -> Result<Self, String> {
        let mut nets = Vec::with_capacity(entries.len());
        for e in entries {
            let net = e
                .parse::<IpNet>()
                .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("`{e}` is not an address or CIDR such as 10.0.0.0/8"))?;
            nets.push(net.trunc());
        }
        Ok(Cidrs(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, how a dual-stack socket reports IPv4
/// peers) are the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Which header the trusted proxies in front write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (most load balancers).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ForwardedHeader {
    pub fn name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }
}

/// The client's address and the hops the gateway believed on the way to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAddress {
    /// The address limits, logs and filters act on.
    pub ip: IpAddr,
    /// Believed hops, nearest first: the connection's address, then each trusted hop's claim;
    /// the last one is `ip`. Empty for a direct client (the only hop is `ip`): no allocation for
    /// the common case.
    hops: Vec<IpAddr>,
}

impl ClientAddress {
    /// Resolve the client behind `peer` (the connection's address) from the values of the
    /// forwarding header, in the order they arrived.
    pub fn resolve<'a>(
        peer: IpAddr,
        header_values: impl DoubleEndedIterator<Item = &'a [u8]>,
        header: ForwardedHeader,
        trusted: &Cidrs,
    ) -> Self {
        let peer = canonical(peer);
        let mut hops = vec![peer];
        let mut current = peer;
        if trusted.contains(peer) {
            'values: for value in header_values.rev() {
                // A header that is not text names nobody: stop where the last trusted hop is.
                let Ok(text) = std::str::from_utf8(value) else { break };
                for entry in text.rsplit(',') {
                    if hops.len() > MAX_HOPS {
                        break 'values;
                    }
                    let parsed = match header {
                        ForwardedHeader::XForwardedFor => parse_node(entry.trim()),
                        ForwardedHeader::Forwarded => forwarded_for(entry),
                    };
                    // `unknown`, an obfuscated `_hidden` name or garbage: the hop that wrote it
                    // is the nearest address known.
                    let Some(ip) = parsed else { break 'values };
                    hops.push(ip);
                    current = ip;
                    if !trusted.contains(ip) {
                        break 'values;
                    }
                }
            }
        }
        ClientAddress { ip: current, hops }
    }

    /// The connection's own address, nothing believed beyond it.
    pub fn direct(peer: IpAddr) -> Self {
        let peer = canonical(peer);
        ClientAddress { ip: peer, hops: Vec::new() }
    }

    /// The believed hops, nearest first.
    fn hops(&self) -> &[IpAddr] {
        if self.hops.is_empty() {
            std::slice::from_ref(&self.ip)
        } else {
            &self.hops
        }
    }

    /// `X-Forwarded-For` for the upstream: the believed hops, client first.
    pub fn x_forwarded_for(&self) -> String {
        let hops = self.hops();
        let mut out = String::with_capacity(hops.len() * 17);
        for (i, hop) in hops.iter().rev().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            push_ip(&mut out, *hop);
        }
        out
    }

    /// `Forwarded` (RFC 7239) for the upstream: one element per believed hop, client first, the
    /// gateway's own element (the last) with the protocol the client used.
    pub fn forwarded(&self, proto: &str) -> String {
        let hops = self.hops();
        let mut out = String::with_capacity(hops.len() * 24 + 12);
        for (i, hop) in hops.iter().rev().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            match hop {
                IpAddr::V4(_) => {
                    out.push_str("for=");
                    push_ip(&mut out, *hop);
                }
                IpAddr::V6(_) => {
                    out.push_str("for=\"[");
                    push_ip(&mut out, *hop);
                    out.push_str("]\"");
                }
            }
        }
        out.push_str(";proto=");
        out.push_str(proto);
        out
    }
}

/// Append an address as text. IPv4 by hand: it is written for every request (twice upstream,
/// once in the access log) and `Display` goes through the formatting machinery.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// `for=` of one `Forwarded` element (`for=192.0.2.60;proto=http`, `For="[2001:db8::1]:4711"`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let value = value.trim();
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        parse_node(value)
    })
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return addr.parse::<std::net::Ipv6Addr>().ok().map(|a| canonical(IpAddr::V6(a)));
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    let (addr, port) = node.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> Cidrs {
        Cidrs::parse(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]).unwrap()
    }

    fn xff(peer: &str, values: &[&str]) -> ClientAddress {
        let values: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
        ClientAddress::resolve(ip(peer), values.into_iter(), ForwardedHeader::XForwardedFor, &trusted())
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let c = xff("203.0.113.9", &["1.2.3.4"]);
        assert_eq!(c.ip, ip("203.0.113.9"));
        assert_eq!(c.x_forwarded_for(), "203.0.113.9");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut addresses: Vec<IpAddr> = Vec::new();
        for a in [0u8, 1, 9, 10, 42, 99, 100, 127, 199, 200, 255] {
            addresses.push(IpAddr::from([a, 255 - a, a / 2, 7]));
        }
        addresses.extend(
            ["::1", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1:2:3:4"].map(|a| a.parse::<IpAddr>().unwrap()),
        );
        for ip in addresses {
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
        let direct = ClientAddress::direct("192.0.2.60".parse().unwrap());
        assert_eq!(direct.x_forwarded_for(), "192.0.2.60");
        assert_eq!(direct.forwarded("http"), "for=192.0.2.60;proto=http");
        let v6 = ClientAddress::direct("2001:db8::1".parse().unwrap());
        assert_eq!(v6.forwarded("https"), "for=\"[2001:db8::1]\";proto=https");
    }

    #[test]
    fn trusted_hops_are_walked_from_the_right_and_spoofed_entries_dropped() {
        // The client forged `6.6.6.6`; the load balancer 10.0.0.2 appended the real client, an
        // inner proxy 10.1.1.1 appended the balancer.
        let c = xff("10.1.1.1", &["6.6.6.6, 198.51.100.20", "10.0.0.2"]);
        assert_eq!(c.ip, ip("198.51.100.20"));
        assert_eq!(c.x_forwarded_for(), "198.51.100.20, 10.0.0.2, 10.1.1.1");
        assert_eq!(c.forwarded("https"), "for=198.51.100.20, for=10.0.0.2, for=10.1.1.1;proto=https");
    }

    #[test]
    fn garbage_unknown_and_obfuscated_hops_stop_the_walk_at_the_last_trusted_one() {
        assert_eq!(xff("10.0.0.1", &["198.51.100.1, garbage"]).ip, ip("10.0.0.1"));
        assert_eq!(xff("10.0.0.1", &["unknown"]).ip, ip("10.0.0.1"));
        assert_eq!(xff("10.0.0.1", &["\u{202e}198.51.100.1"]).ip, ip("10.0.0.1"));
        assert_eq!(xff("10.0.0.1", &[]).ip, ip("10.0.0.1"));
        assert_eq!(xff("10.0.0.1", &["198.51.100.1:443"]).ip, ip("198.51.100.1"));
        assert_eq!(xff("::ffff:10.0.0.1", &["[2001:db9::5]:80"]).ip, ip("2001:db9::5"));
    }

    #[test]
    fn forwarded_elements_are_read_per_rfc_7239() {
        let values: Vec<&[u8]> =
            vec![b"for=\"_hidden\", For=\"[2001:db9::1]:4711\";proto=https", b"for=10.0.0.3;by=10.0.0.1"];
        let c = ClientAddress::resolve(
            ip("10.0.0.1"),
            values.into_iter(),
            ForwardedHeader::Forwarded,
            &trusted(),
        );
        assert_eq!(c.ip, ip("2001:db9::1"));
        assert_eq!(c.forwarded("http"), "for=\"[2001:db9::1]\", for=10.0.0.3, for=10.0.0.1;proto=http");
    }

    #[test]
    fn a_huge_header_of_trusted_hops_is_read_at_most_max_hops_deep() {
        let long = vec!["10.0.0.9"; 100_000].join(",");
        let c = xff("10.0.0.1", &[&long]);
        assert_eq!(c.hops.len(), MAX_HOPS + 1);
        assert_eq!(c.ip, ip("10.0.0.9"));
    }

    #[test]
    fn cidrs_are_checked() {
        assert!(Cidrs::parse(&["10.0.0.0/33"]).is_err());
        assert!(Cidrs::parse(&["ten"]).is_err());
        let t = Cidrs::parse(&["10.0.0.1/8"]).unwrap();
        assert!(t.contains(ip("10.200.0.1")));
        assert!(!t.contains(ip("11.0.0.1")));
    }
}
