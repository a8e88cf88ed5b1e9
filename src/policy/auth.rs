//! Authentication (JWT, API key) → a consumer identity; authorization by required scopes.

use super::jwks::KeySource;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Who is calling: used by authorization, rate limits, metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    /// `policy/name`: the identity that owns quotas, idempotency keys and orders. Two policies
    /// may know a consumer of the same name (a JWT `sub: crm` and an API key `crm`); they are
    /// different callers.
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub tier: Arc<str>,
    pub scopes: Arc<[String]>,
}

/// Why authentication failed: a bounded set, used as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    TooLarge,
    AlgorithmNotAllowed,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    UnknownApiKey,
    /// The token's header lists `crit` extensions; this gateway understands none (RFC 7515 §4.1.11).
    UnsupportedCritical,
    /// A client certificate the CA bundle does not vouch for: not issued by it, or revoked.
    CertificateUntrusted,
    CertificateExpired,
    CertificateNotYetValid,
    /// A valid client certificate that no `mtls` policy entry names.
    CertificateUnknown,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::TooLarge => "too_large",
            AuthFailure::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongIssuer => "wrong_issuer",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::UnknownApiKey => "unknown_api_key",
            AuthFailure::UnsupportedCritical => "unsupported_crit",
            AuthFailure::CertificateUntrusted => "certificate_untrusted",
            AuthFailure::CertificateExpired => "certificate_expired",
            AuthFailure::CertificateNotYetValid => "certificate_not_yet_valid",
            AuthFailure::CertificateUnknown => "certificate_unknown",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            AuthFailure::Missing => "no credentials were sent",
            AuthFailure::Malformed => "the token is not a well-formed JWT",
            AuthFailure::TooLarge => "the token is larger than this gateway accepts",
            AuthFailure::AlgorithmNotAllowed => "the token's signing algorithm is not accepted",
            AuthFailure::UnknownKey => {
                "the token was signed with a key the identity provider does not publish"
            }
            AuthFailure::BadSignature => "the token's signature does not verify",
            AuthFailure::Expired => "the token has expired",
            AuthFailure::NotYetValid => "the token is not valid yet (nbf)",
            AuthFailure::WrongIssuer => "the token was issued by an issuer this route does not trust",
            AuthFailure::WrongAudience => "the token is not meant for this gateway (aud)",
            AuthFailure::UnknownApiKey => "the API key is not known",
            AuthFailure::UnsupportedCritical => {
                "the token's header lists critical extensions (crit) this gateway does not understand"
            }
            AuthFailure::CertificateUntrusted => {
                "the client certificate is not issued by a CA this listener trusts; use the certificate your partner onboarding issued"
            }
            AuthFailure::CertificateExpired => "the client certificate has expired; renew it",
            AuthFailure::CertificateNotYetValid => "the client certificate is not valid yet; check its notBefore and your clock",
            AuthFailure::CertificateUnknown => {
                "the client certificate is valid but names no consumer of this route; ask for it to be registered"
            }
        }
    }
}

/// RFC 7519's NumericDate: seconds, which may carry a fraction (kept to the whole second).
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value: Option<f64> = Deserialize::deserialize(d)?;
    Ok(value.map(|v| if v.is_finite() && v > 0.0 { v.min(u64::MAX as f64) as u64 } else { 0 }))
}

/// Scopes as IdPs send them: `scope: "a b"` or `scp: ["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Text(String),
    List(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<u64>,
    #[serde(default)]
    scope: Option<ScopeClaim>,
    #[serde(default)]
    scp: Option<ScopeClaim>,
    #[serde(flatten)]
    extra: HashMap<String, serde_json::Value>,
}

pub struct JwtPolicy {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    pub algorithms: Vec<Algorithm>,
    pub hs256: Option<DecodingKey>,
    pub keys: KeySource,
    pub tier_claim: String,
    pub default_tier: Arc<str>,
    pub max_token_bytes: usize,
    /// Verified tokens → consumer, kid, expiry; bounded, so steady traffic skips signature checks.
    /// Hashed with ahash (keyed per process, so a caller cannot aim collisions): the key is the
    /// whole token, hundreds of bytes, hashed on every request.
    pub cache: moka::sync::Cache<Arc<str>, Arc<CachedToken>, ahash::RandomState>,
    /// Seconds since the epoch that `exp` and `nbf` are checked against ([`system_clock`]; a
    /// test sets the time instead of waiting for it).
    pub clock: fn() -> u64,
}

pub struct CachedToken {
    consumer: Consumer,
    kid: Option<String>,
    exp: u64,
}

/// The wall clock, in seconds since the epoch.
pub fn system_clock() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl std::fmt::Debug for JwtPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtPolicy").field("name", &self.name).field("issuer", &self.issuer).finish()
    }
}

impl JwtPolicy {
    /// The bearer token of a request, if it has one.
    pub fn token(authorization: Option<&str>) -> Option<&str> {
        let value = authorization?;
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    pub async fn verify(&self, token: &str) -> Result<Consumer, AuthFailure> {
        if token.len() > self.max_token_bytes {
            return Err(AuthFailure::TooLarge);
        }
        self.keys.refresh_if_due();
        if let Some(hit) = self.cache.get(token) {
            let alive = hit.exp.saturating_add(self.leeway.as_secs()) > (self.clock)();
            let key_still_published = hit.kid.as_deref().is_none_or(|k| self.keys.has(k));
            if alive && key_still_published {
                return Ok(hit.consumer.clone());
            }
            self.cache.invalidate(token);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        // RFC 7515 §4.1.11: a recipient that does not understand a listed extension must refuse
        // the token. No extension is understood here, so any `crit` is refused.
        if header.crit.is_some() {
            return Err(AuthFailure::UnsupportedCritical);
        }
        let alg = header.alg;
        let (key, kid) = if alg == Algorithm::HS256 {
            (self.hs256.clone().ok_or(AuthFailure::AlgorithmNotAllowed)?, None)
        } else {
            if !self.algorithms.contains(&alg) {
                return Err(AuthFailure::AlgorithmNotAllowed);
            }
            let kid = header.kid.ok_or(AuthFailure::UnknownKey)?;
            let found = self.keys.key(&kid).await.ok_or(AuthFailure::UnknownKey)?;
            if !found.algorithms.contains(&alg) {
                return Err(AuthFailure::AlgorithmNotAllowed);
            }
            (found.key, Some(kid))
        };
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.leeway = self.leeway.as_secs();
        // Time is checked below, on this policy's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                ExpiredSignature => AuthFailure::Expired,
                ImmatureSignature => AuthFailure::NotYetValid,
                InvalidIssuer => AuthFailure::WrongIssuer,
                InvalidAudience => AuthFailure::WrongAudience,
                InvalidSignature => AuthFailure::BadSignature,
                InvalidAlgorithm => AuthFailure::AlgorithmNotAllowed,
                _ => AuthFailure::Malformed,
            }
        })?;
        let claims = data.claims;
        let (now, leeway) = ((self.clock)(), self.leeway.as_secs());
        if claims.exp.is_none_or(|exp| exp.saturating_add(leeway) < now) {
            return Err(AuthFailure::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(AuthFailure::NotYetValid);
        }
        let mut scopes: Vec<String> = Vec::new();
        for claim in [claims.scope, claims.scp].into_iter().flatten() {
            match claim {
                ScopeClaim::Text(s) => scopes.extend(s.split_whitespace().map(str::to_string)),
                ScopeClaim::List(l) => scopes.extend(l),
            }
        }
        let tier = claims
            .extra
            .get(&self.tier_claim)
            .and_then(|v| v.as_str())
            .map(Arc::from)
            .unwrap_or_else(|| self.default_tier.clone());
        let name = claims.sub.unwrap_or_else(|| "unknown-subject".into());
        let consumer = Consumer {
            id: Arc::from(format!("{}/{name}", self.name)),
            name: Arc::from(name),
            tier,
            scopes: scopes.into(),
        };
        let exp = claims.exp.unwrap_or(0);
        self.cache.insert(Arc::from(token), Arc::new(CachedToken { consumer: consumer.clone(), kid, exp }));
        Ok(consumer)
    }
}

/// API keys, stored as SHA-256 hashes; the plaintext key never sits in a file.
#[derive(Debug)]
pub struct ApiKeyPolicy {
    pub name: String,
    pub header: http::HeaderName,
    pub by_hash: HashMap<[u8; 32], Consumer>,
}

impl ApiKeyPolicy {
    pub fn verify(&self, presented: &[u8]) -> Result<Consumer, AuthFailure> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.by_hash.get(&digest).cloned().ok_or(AuthFailure::UnknownApiKey)
    }
}

/// Scopes the route requires that the consumer lacks.
pub fn missing_scopes(required: &[String], consumer: &Consumer) -> Vec<String> {
    // A route names a few scopes and a token holds a few: a scan beats building a set.
    required.iter().filter(|s| !consumer.scopes.iter().any(|h| h == *s)).cloned().collect()
}

/// Install jsonwebtoken's RustCrypto backend once, so a build without it fails at start-up
/// instead of panicking on the first token.
pub fn init_crypto() {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

/// Compare secrets without a timing difference that depends on where they first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_extraction() {
        assert_eq!(JwtPolicy::token(Some("Bearer abc")), Some("abc"));
        assert_eq!(JwtPolicy::token(Some("bearer  abc ")), Some("abc"));
        assert_eq!(JwtPolicy::token(Some("Basic abc")), None);
        assert_eq!(JwtPolicy::token(None), None);
    }

    #[test]
    fn api_key_by_hash_and_scopes() {
        let consumer = Consumer {
            id: "k/bi".into(),
            name: "bi".into(),
            tier: "bulk".into(),
            scopes: vec!["erp.read".to_string()].into(),
        };
        let hash: [u8; 32] = Sha256::digest(b"secret-key").into();
        let p = ApiKeyPolicy {
            name: "k".into(),
            header: http::HeaderName::from_static("x-api-key"),
            by_hash: HashMap::from([(hash, consumer.clone())]),
        };
        assert_eq!(p.verify(b"secret-key").unwrap(), consumer);
        assert_eq!(p.verify(b"other").unwrap_err(), AuthFailure::UnknownApiKey);
        assert_eq!(
            missing_scopes(&["erp.read".into(), "erp.write".into()], &consumer),
            vec!["erp.write".to_string()]
        );
    }

    // The test's clock: seconds since the epoch, set by the test.
    static NOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    fn test_clock() -> u64 {
        NOW.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn hs256_policy() -> JwtPolicy {
        JwtPolicy {
            name: "jwt".into(),
            issuer: "https://idp.test".into(),
            audiences: vec!["causeway".into()],
            leeway: Duration::from_secs(30),
            algorithms: vec![Algorithm::HS256],
            hs256: Some(DecodingKey::from_secret(b"test-secret")),
            keys: crate::policy::jwks::KeySource::Static(HashMap::new()),
            tier_claim: "tier".into(),
            default_tier: "standard".into(),
            max_token_bytes: 8192,
            cache: moka::sync::Cache::builder()
                .max_capacity(100)
                .build_with_hasher(ahash::RandomState::new()),
            clock: test_clock,
        }
    }

    fn token(claims: serde_json::Value) -> String {
        init_crypto();
        let key = jsonwebtoken::EncodingKey::from_secret(b"test-secret");
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    /// Expiry and not-before are checked on the policy's clock, leeway included, for fresh and
    /// cached tokens alike: the test moves time instead of sleeping through it.
    #[tokio::test]
    async fn exp_and_nbf_follow_the_policys_clock() {
        let set = |t: u64| NOW.store(t, std::sync::atomic::Ordering::SeqCst);
        let policy = hs256_policy();
        let t = token(serde_json::json!({
            "iss": "https://idp.test", "aud": "causeway", "sub": "crm",
            "nbf": 1_000_000, "exp": 1_000_600,
        }));
        set(1_000_000 - 31);
        assert_eq!(policy.verify(&t).await.unwrap_err(), AuthFailure::NotYetValid);
        set(1_000_000 - 30);
        assert_eq!(&*policy.verify(&t).await.unwrap().name, "crm");
        // Cached now; still alive through the leeway, refused after it.
        set(1_000_600 + 29);
        assert!(policy.verify(&t).await.is_ok());
        set(1_000_600 + 31);
        assert_eq!(policy.verify(&t).await.unwrap_err(), AuthFailure::Expired);
        // NumericDates may carry a fraction (RFC 7519 §2).
        let fractional = token(serde_json::json!({
            "iss": "https://idp.test", "aud": "causeway", "sub": "crm", "nbf": 999_999.5, "exp": 1_000_600.25,
        }));
        set(1_000_000);
        assert!(policy.verify(&fractional).await.is_ok());
        // A token without `exp` is never accepted.
        let no_exp = token(serde_json::json!({"iss": "https://idp.test", "aud": "causeway", "sub": "crm"}));
        set(1_000_000);
        assert!(policy.verify(&no_exp).await.is_err());
    }
}
