//! JSON Web Key Sets: from a file (read at load) or a URL (fetched lazily, refreshed on a
//! schedule, and re-fetched on an unknown `kid` — single-flight and at most once per
//! `min_refetch` so a flood of bogus `kid`s cannot hammer the IdP).

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest JWKS document accepted from an IdP.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Which algorithms a key may verify: the `alg` is pinned to the key's type (and to the JWK's
/// own `alg` when it states one), so an RSA public key can never be used as an HMAC secret.
#[derive(Clone)]
pub struct VerifyingKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

pub type KeyMap = HashMap<String, VerifyingKey>;

/// Convert a JWKS document; keys without `kid` or of unsupported types are skipped.
pub fn parse_jwks(bytes: &[u8]) -> Result<KeyMap, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let family: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => {
                vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256]
            }
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                vec![Algorithm::ES256]
            }
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
                vec![Algorithm::ES384]
            }
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            // Symmetric keys never come from a JWKS here: HS256 needs an explicit policy secret.
            _ => continue,
        };
        let pinned: Vec<Algorithm> = match jwk.common.key_algorithm {
            Some(stated) => {
                family.into_iter().filter(|a| format!("{a:?}") == format!("{stated:?}")).collect()
            }
            None => family,
        };
        if pinned.is_empty() {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        keys.insert(kid, VerifyingKey { key, algorithms: pinned });
    }
    Ok(keys)
}

/// Where a JWT policy's keys come from.
pub enum KeySource {
    Static(KeyMap),
    Remote(Arc<RemoteJwks>),
}

impl KeySource {
    /// The key for `kid`, re-fetching a remote set once when the `kid` is unknown.
    pub async fn key(&self, kid: &str) -> Option<VerifyingKey> {
        match self {
            KeySource::Static(keys) => keys.get(kid).cloned(),
            KeySource::Remote(remote) => remote.key(kid).await,
        }
    }

    /// Keep a remote set fresh: start a background refresh when the schedule says so. Called on
    /// every verification, cache hit or not, so withdrawn keys disappear on time.
    pub fn refresh_if_due(&self) {
        if let KeySource::Remote(remote) = self {
            remote.refresh_in_background_if_stale();
        }
    }

    /// Whether `kid` is still in the current set (cached tokens of removed keys stop working).
    pub fn has(&self, kid: &str) -> bool {
        match self {
            KeySource::Static(keys) => keys.contains_key(kid),
            KeySource::Remote(remote) => remote.keys.load().contains_key(kid),
        }
    }
}

pub struct RemoteJwks {
    url: String,
    refresh: Duration,
    min_refetch: Duration,
    /// Built on the first fetch, not at load: `causeway check` compiles the policy without
    /// fetching anything, and building a client needs the TLS provider installed.
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
    keys: ArcSwap<KeyMap>,
    /// When the last fetch was attempted; `None` before the first.
    last_fetch: parking_lot::Mutex<Option<Instant>>,
    /// Held while fetching: concurrent callers wait for that fetch instead of starting another.
    in_progress: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
    /// A background refresh is spawned at most once at a time.
    refresh_spawned: std::sync::atomic::AtomicBool,
}

impl RemoteJwks {
    pub fn new(url: String, refresh: Duration, min_refetch: Duration) -> Self {
        RemoteJwks {
            url,
            refresh,
            min_refetch,
            client: std::sync::OnceLock::new(),
            keys: ArcSwap::from_pointee(HashMap::new()),
            last_fetch: parking_lot::Mutex::new(None),
            in_progress: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
            refresh_spawned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many fetches were made (exposed for tests and metrics).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn is_stale(&self) -> bool {
        self.last_fetch.lock().is_none_or(|t| t.elapsed() >= self.refresh)
    }

    fn refresh_in_background_if_stale(self: &Arc<Self>) {
        if self.is_stale()
            && !self.keys.load().is_empty()
            && !self.refresh_spawned.swap(true, Ordering::AcqRel)
        {
            let me = self.clone();
            tokio::spawn(async move {
                me.fetch_if_due(me.refresh).await;
                me.refresh_spawned.store(false, Ordering::Release);
            });
        }
    }

    async fn key(self: &Arc<Self>, kid: &str) -> Option<VerifyingKey> {
        if self.keys.load().is_empty() && self.is_stale() {
            self.fetch_if_due(Duration::ZERO).await;
        } else {
            // Serve from the current set; refresh in the background when due.
            self.refresh_in_background_if_stale();
        }
        if let Some(k) = self.keys.load().get(kid) {
            return Some(k.clone());
        }
        self.fetch_if_due(self.min_refetch).await;
        self.keys.load().get(kid).cloned()
    }

    /// Fetch unless a fetch started less than `min_age` ago (single-flight).
    async fn fetch_if_due(&self, min_age: Duration) {
        let _guard = self.in_progress.lock().await;
        {
            let mut last = self.last_fetch.lock();
            if last.is_some_and(|t| t.elapsed() < min_age) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch().await {
            Ok(keys) => self.keys.store(Arc::new(keys)),
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the previous keys")
            }
        }
    }

    async fn fetch(&self) -> Result<KeyMap, String> {
        let client = self
            .client
            .get_or_init(|| {
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| format!("cannot build the JWKS client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let mut resp = client.get(&self.url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("JWKS document larger than 1 MiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }
}
