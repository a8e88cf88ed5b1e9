//! `kind: ip_filter`: a route answers only clients whose address (resolved behind trusted
//! proxies) the policy allows: `deny` first, then, when `allow` is set, only what it lists.

use crate::edge::client_addr::Cidrs;
use std::net::IpAddr;

#[derive(Debug)]
pub struct IpFilterPolicy {
    pub name: String,
    pub allow: Option<Cidrs>,
    pub deny: Cidrs,
}

impl IpFilterPolicy {
    /// Whether `ip` may use the route. A request whose address is unknown (not over IP) is refused.
    pub fn admits(&self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else { return false };
        !self.deny.contains(ip) && self.allow.as_ref().is_none_or(|a| a.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_then_allow_decides() {
        let p = IpFilterPolicy {
            name: "partners".into(),
            allow: Some(Cidrs::parse(&["198.51.100.0/24", "2001:db8::/32"]).unwrap()),
            deny: Cidrs::parse(&["198.51.100.66"]).unwrap(),
        };
        assert!(p.admits(Some("198.51.100.7".parse().unwrap())));
        assert!(p.admits(Some("::ffff:198.51.100.7".parse().unwrap())));
        assert!(!p.admits(Some("198.51.100.66".parse().unwrap())));
        assert!(!p.admits(Some("203.0.113.1".parse().unwrap())));
        assert!(!p.admits(None));
        let open = IpFilterPolicy {
            name: "deny-only".into(),
            allow: None,
            deny: Cidrs::parse(&["10.0.0.0/8"]).unwrap(),
        };
        assert!(open.admits(Some("203.0.113.1".parse().unwrap())));
        assert!(!open.admits(Some("10.1.2.3".parse().unwrap())));
    }
}
