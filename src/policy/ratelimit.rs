//! Consumer rate limits: GCRA (governor) per consumer, or per consumer and route, with quotas by
//! tier. Answers carry `RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-headers).

use super::shared_limit::SharedLimiter;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Keys kept before idle ones are dropped (checked every `CLEANUP_EVERY` decisions as well).
const MAX_KEYS: usize = 100_000;
const CLEANUP_EVERY: u64 = 4096;

/// One tier's quota: `requests` per `window`, plus `burst` above it. The clock is governor's
/// real one; tests give it a fake one they advance (`governor::clock::FakeRelativeClock`).
pub struct TierLimiter<C: Clock = DefaultClock> {
    pub tier: Arc<str>,
    pub requests: u32,
    pub window: Duration,
    pub burst: u32,
    /// `RateLimit-Policy` value, built once.
    policy_header: String,
    /// Keyed by consumer id: an `Arc` shared with the consumer, no copy per request.
    limiter: RateLimiter<Arc<str>, DefaultKeyedStateStore<Arc<str>>, C, StateInformationMiddleware>,
    clock: C,
    decisions: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for TierLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TierLimiter({} {}/{:?}+{})", self.tier, self.requests, self.window, self.burst)
    }
}

impl TierLimiter {
    pub fn new(tier: &str, requests: u32, window: Duration, burst: u32) -> Result<Self, String> {
        Self::with_clock(tier, requests, window, burst, DefaultClock::default())
    }
}

impl<C: Clock + Clone> TierLimiter<C> {
    pub fn with_clock(
        tier: &str,
        requests: u32,
        window: Duration,
        burst: u32,
        clock: C,
    ) -> Result<Self, String> {
        let requests_nz = NonZeroU32::new(requests).ok_or("requests must be at least 1")?;
        let period = window / requests_nz.get();
        let capacity = NonZeroU32::new(requests.saturating_add(burst)).ok_or("capacity overflow")?;
        let quota = Quota::with_period(period)
            .ok_or("window / requests must be longer than zero")?
            .allow_burst(capacity);
        Ok(TierLimiter {
            policy_header: format!("\"{tier}\";q={requests};w={}", window.as_secs().max(1)),
            tier: Arc::from(tier),
            requests,
            window,
            burst,
            limiter:
                RateLimiter::<Arc<str>, DefaultKeyedStateStore<Arc<str>>, C, StateInformationMiddleware>::new(
                    quota,
                    DefaultKeyedStateStore::default(),
                    clock.clone(),
                ),
            clock,
            decisions: AtomicU64::new(0),
        })
    }

    /// True when two specs would make the same limiter (then state survives a reload).
    pub fn same_quota(&self, requests: u32, window: Duration, burst: u32) -> bool {
        (self.requests, self.window, self.burst) == (requests, window, burst)
    }

    pub fn check(&self, key: Arc<str>) -> Decision {
        let n = self.decisions.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(CLEANUP_EVERY) || (n.is_multiple_of(256) && self.limiter.len() > MAX_KEYS) {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        let policy = self.policy_header.clone();
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let per = self.window.as_secs_f64() / f64::from(self.requests);
                let reset = ((f64::from(self.requests + self.burst - remaining)) * per).ceil() as u64;
                Decision::Allowed { policy, limit: self.limit_header(u64::from(remaining), reset) }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Decision::Limited {
                    policy,
                    limit: self.limit_header(0, retry_after.max(1)),
                    retry_after: retry_after.max(1),
                }
            }
        }
    }
}

impl<C: Clock> TierLimiter<C> {
    /// `RateLimit` value: `"<tier>";r=<remaining>;t=<seconds to reset>`, written on every request.
    fn limit_header(&self, remaining: u64, reset: u64) -> String {
        let mut out = String::with_capacity(self.tier.len() + 24);
        out.push('"');
        out.push_str(&self.tier);
        out.push_str("\";r=");
        out.push_str(itoa::Buffer::new().format(remaining));
        out.push_str(";t=");
        out.push_str(itoa::Buffer::new().format(reset));
        out
    }
}

/// The outcome of a rate-limit check; both carry the header values.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allowed { policy: String, limit: String },
    Limited { policy: String, limit: String, retry_after: u64 },
}

/// A tier's limiter: this process's, or one shared by replicas through Redis.
#[derive(Debug, Clone)]
pub enum Limiter {
    Local(Arc<TierLimiter>),
    Shared(Arc<SharedLimiter>),
}

impl Limiter {
    pub fn tier(&self) -> &Arc<str> {
        match self {
            Limiter::Local(l) => &l.tier,
            Limiter::Shared(l) => &l.tier,
        }
    }

    pub async fn check(&self, key: Arc<str>) -> Decision {
        match self {
            Limiter::Local(l) => l.check(key),
            Limiter::Shared(l) => l.check(key.to_string()).await,
        }
    }
}

#[derive(Debug)]
pub struct RateLimitPolicy {
    pub name: String,
    pub per_route: bool,
    pub tiers: HashMap<String, Limiter>,
    /// Tier applied to consumers whose tier has no quota here (and to unauthenticated callers).
    pub default_tier: Option<String>,
}

impl RateLimitPolicy {
    /// `None` when the consumer's tier has no quota and there is no default: not limited here.
    pub async fn check(&self, consumer: &Arc<str>, tier: &str, route: &str) -> Option<(Arc<str>, Decision)> {
        let limiter =
            self.tiers.get(tier).or_else(|| self.default_tier.as_ref().and_then(|d| self.tiers.get(d)))?;
        let key =
            if self.per_route { Arc::from(format!("{consumer}\u{1f}{route}")) } else { consumer.clone() };
        Some((limiter.tier().clone(), limiter.check(key).await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_quota_plus_burst_then_limits_per_key() {
        let t = TierLimiter::new("gold", 10, Duration::from_secs(60), 5).unwrap();
        let first = t.check("c".into());
        let want =
            Decision::Allowed { policy: "\"gold\";q=10;w=60".into(), limit: "\"gold\";r=14;t=6".into() };
        assert_eq!(first, want, "one of 15 used; it takes one period (6 s) to come back");
        let allowed = (0..30).filter(|_| matches!(t.check("a".into()), Decision::Allowed { .. })).count();
        assert_eq!(allowed, 15);
        match t.check("a".into()) {
            Decision::Limited { retry_after, policy, limit } => {
                assert!((1..=6).contains(&retry_after), "{retry_after}");
                assert_eq!(policy, "\"gold\";q=10;w=60");
                assert!(limit.starts_with("\"gold\";r=0;t="));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(t.check("b".into()), Decision::Allowed { .. }), "another key is unaffected");
    }

    #[test]
    fn a_used_up_quota_refills_as_time_passes_on_a_controllable_clock() {
        let clock = governor::clock::FakeRelativeClock::default();
        let t = TierLimiter::with_clock("bulk", 60, Duration::from_secs(60), 0, clock.clone()).unwrap();
        let allowed = (0..100).filter(|_| matches!(t.check("k".into()), Decision::Allowed { .. })).count();
        assert_eq!(allowed, 60, "the window's quota at once");
        match t.check("k".into()) {
            Decision::Limited { retry_after, .. } => {
                assert_eq!(retry_after, 1, "one request per second refills")
            }
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::from_secs(1));
        assert!(matches!(t.check("k".into()), Decision::Allowed { .. }), "a second later, one more");
        assert!(matches!(t.check("k".into()), Decision::Limited { .. }));
        clock.advance(Duration::from_secs(60));
        let allowed = (0..100).filter(|_| matches!(t.check("k".into()), Decision::Allowed { .. })).count();
        assert_eq!(allowed, 60, "a whole window later, the whole quota");
    }
}
