//! `kind: mtls`: callers authenticated by their TLS client certificate. The listener verifies
//! the certificate against its CA bundle; this policy maps what it names (subject CN, a DNS,
//! URI or e-mail subjectAltName, or its SHA-256 fingerprint) to a consumer with tier and scopes,
//! like an API key or a token.

use super::auth::{AuthFailure, Consumer};
use crate::edge::tls::{CertProblem, ClientIdentity};
use std::sync::Arc;

/// What a registered certificate is recognised by.
#[derive(Debug, Clone, PartialEq)]
pub enum CertMatch {
    SubjectCn(String),
    SanDns(String),
    SanUri(String),
    SanEmail(String),
    /// SHA-256 of the DER certificate, lower-case hex.
    Sha256(String),
}

impl CertMatch {
    fn matches(&self, id: &ClientIdentity) -> bool {
        match self {
            CertMatch::SubjectCn(cn) => id.subject_cn.as_deref() == Some(cn.as_str()),
            CertMatch::SanDns(name) => id.dns.iter().any(|d| d.eq_ignore_ascii_case(name)),
            CertMatch::SanUri(uri) => id.uris.iter().any(|u| u == uri),
            CertMatch::SanEmail(mail) => id.emails.iter().any(|m| m.eq_ignore_ascii_case(mail)),
            CertMatch::Sha256(hash) => id.fingerprint == *hash,
        }
    }
}

#[derive(Debug)]
pub struct MtlsPolicy {
    pub name: String,
    /// In file order: the first entry that matches names the consumer.
    pub clients: Vec<(CertMatch, Consumer)>,
}

impl MtlsPolicy {
    pub fn new(name: &str, clients: Vec<(CertMatch, Consumer)>) -> Self {
        MtlsPolicy { name: name.to_string(), clients }
    }

    pub fn consumer(name: &str, consumer: &str, tier: &str, scopes: Vec<String>) -> Consumer {
        Consumer {
            id: Arc::from(format!("{name}/{consumer}")),
            name: Arc::from(consumer),
            tier: Arc::from(tier),
            scopes: scopes.into(),
        }
    }

    /// The consumer a presented certificate stands for.
    pub fn verify(&self, identity: &ClientIdentity) -> Result<Consumer, AuthFailure> {
        match identity.verified {
            Ok(()) => {}
            Err(CertProblem::Expired) => return Err(AuthFailure::CertificateExpired),
            Err(CertProblem::NotValidYet) => return Err(AuthFailure::CertificateNotYetValid),
            Err(CertProblem::UnknownIssuer | CertProblem::Revoked | CertProblem::Unreadable) => {
                return Err(AuthFailure::CertificateUntrusted)
            }
        }
        self.clients
            .iter()
            .find(|(m, _)| m.matches(identity))
            .map(|(_, c)| c.clone())
            .ok_or(AuthFailure::CertificateUnknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(verified: Result<(), CertProblem>) -> ClientIdentity {
        ClientIdentity {
            verified,
            subject_cn: Some("acme-erp-sync".into()),
            dns: vec!["sync.acme.example".into()],
            uris: vec!["spiffe://partners/acme".into()],
            emails: vec![],
            fingerprint: "ab".repeat(32),
        }
    }

    fn policy() -> MtlsPolicy {
        let c = |n: &str| MtlsPolicy::consumer("certs", n, "partner", vec!["erp.read".into()]);
        MtlsPolicy::new(
            "certs",
            vec![
                (CertMatch::SanUri("spiffe://partners/globex".into()), c("globex")),
                (CertMatch::SanDns("SYNC.acme.example".into()), c("acme")),
            ],
        )
    }

    #[test]
    fn a_valid_registered_certificate_is_its_consumer() {
        let consumer = policy().verify(&identity(Ok(()))).unwrap();
        assert_eq!(&*consumer.id, "certs/acme");
        assert_eq!(&*consumer.tier, "partner");
        assert_eq!(&consumer.scopes[..], ["erp.read".to_string()]);
    }

    #[test]
    fn invalid_or_unregistered_certificates_are_refused_with_their_reason() {
        let p = policy();
        assert_eq!(p.verify(&identity(Err(CertProblem::Expired))), Err(AuthFailure::CertificateExpired));
        assert_eq!(
            p.verify(&identity(Err(CertProblem::UnknownIssuer))),
            Err(AuthFailure::CertificateUntrusted)
        );
        let mut stranger = identity(Ok(()));
        stranger.dns = vec!["evil.example".into()];
        stranger.uris.clear();
        assert_eq!(p.verify(&stranger), Err(AuthFailure::CertificateUnknown));
    }
}
