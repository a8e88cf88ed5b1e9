//! A consumer rate limit shared by replicas (`cluster.redis`): the same GCRA as the in-memory
//! [`TierLimiter`] (`requests` per `window` plus `burst`), its state one key per consumer in
//! Redis, moved by one atomic script. A replica takes a few tokens at a time when the quota is
//! large (so a busy consumer costs one Redis call per handful of requests, not per request) and
//! keeps them for at most [`TOKEN_HOLD`]; tokens are counted when taken, so the replicas together
//! never exceed the quota. While Redis is unreachable the limit follows its
//! `when_redis_unavailable`: `local_share` (this replica's share of the quota), `open` or `closed`.

use super::ratelimit::{Decision, TierLimiter};
use crate::budget::redis::{LimitFallback, ModeWatch, RedisLink};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long tokens taken ahead are kept before they are dropped (a burst taken now must not
/// be spent a window later on top of a refilled bucket).
const TOKEN_HOLD: Duration = Duration::from_millis(250);
/// Most tokens taken in one call.
const MAX_BATCH: u32 = 64;
/// Consumers (keys) whose tokens are kept at once.
const MAX_KEYS: u64 = 100_000;

/// GCRA over `ARGV[3]` tokens at most: KEYS[1] holds the theoretical arrival time (µs, Redis's
/// clock); ARGV[1] is the emission interval (µs), ARGV[2] the capacity. Returns {granted,
/// remaining, µs until one more fits}.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T, C, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((C * T - (tat - now)) / T)
local k = math.min(n, room)
if k <= 0 then
  return {0, 0, math.max(1, tat + T - C * T - now)}
end
tat = tat + k * T
redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
return {k, math.max(0, math.floor((C * T - (tat - now)) / T)), 0}
";

static TAKE_SCRIPT: OnceLock<redis::Script> = OnceLock::new();

#[derive(Debug, Default)]
struct Tokens {
    left: u32,
    until: Option<Instant>,
    /// The bucket's remaining capacity when they were taken (for `RateLimit`).
    remaining: u64,
}

pub struct SharedLimiter {
    pub tier: Arc<str>,
    requests: u32,
    window: Duration,
    burst: u32,
    key_base: String,
    link: Arc<RedisLink>,
    batch: u32,
    tokens: moka::sync::Cache<String, Arc<tokio::sync::Mutex<Tokens>>>,
    fallback: LimitFallback,
    /// This replica's share of the quota, for `local_share`.
    local: TierLimiter,
    mode: ModeWatch,
    policy_header: String,
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedLimiter({} {}/{:?}+{})", self.tier, self.requests, self.window, self.burst)
    }
}

impl SharedLimiter {
    /// Refuses requests while Redis is away.
    pub fn fails_closed(&self) -> bool {
        self.fallback == LimitFallback::Closed
    }

    pub fn new(
        policy: &str,
        tier: &str,
        (requests, window, burst): (u32, Duration, u32),
        link: Arc<RedisLink>,
        fallback: LimitFallback,
    ) -> Result<SharedLimiter, String> {
        let replicas = link.settings().replicas.max(1);
        let local = TierLimiter::new(tier, (requests / replicas).max(1), window, burst / replicas)?;
        let capacity = requests.saturating_add(burst);
        let fallback_name = match fallback {
            LimitFallback::LocalShare => "local_share",
            LimitFallback::Open => "open",
            LimitFallback::Closed => "closed",
        };
        Ok(SharedLimiter {
            tier: Arc::from(tier),
            requests,
            window,
            burst,
            key_base: format!("{}:limit:{policy}:{tier}:", link.settings().key_prefix),
            // Small quotas are taken one by one (exact); large ones a few at a time.
            batch: (capacity / (replicas * 16)).clamp(1, MAX_BATCH),
            tokens: moka::sync::Cache::builder().max_capacity(MAX_KEYS).time_to_idle(window).build(),
            fallback,
            local,
            mode: ModeWatch::new(format!("limit:{policy}:{tier}"), fallback_name),
            policy_header: format!("\"{tier}\";q={requests};w={}", window.as_secs().max(1)),
            link,
        })
    }

    pub fn same_quota(&self, requests: u32, window: Duration, burst: u32, fallback: LimitFallback) -> bool {
        (self.requests, self.window, self.burst, self.fallback) == (requests, window, burst, fallback)
    }

    fn allowed(&self, remaining: u64) -> Decision {
        let per = self.window.as_secs_f64() / f64::from(self.requests);
        let used = u64::from(self.requests + self.burst).saturating_sub(remaining);
        Decision::Allowed {
            policy: self.policy_header.clone(),
            limit: format!("\"{}\";r={remaining};t={}", self.tier, (used as f64 * per).ceil() as u64),
        }
    }

    fn limited(&self, retry_after: u64) -> Decision {
        Decision::Limited {
            policy: self.policy_header.clone(),
            limit: format!("\"{}\";r=0;t={retry_after}", self.tier),
            retry_after,
        }
    }

    fn fallback_decision(&self, key: String) -> Decision {
        self.mode.set(true);
        match self.fallback {
            LimitFallback::LocalShare => self.local.check(Arc::from(key)),
            LimitFallback::Open => self.allowed(u64::from(self.requests)),
            LimitFallback::Closed => self.limited(1),
        }
    }

    pub async fn check(&self, key: String) -> Decision {
        if !self.link.reachable() {
            return self.fallback_decision(key);
        }
        let slot = self.tokens.get_with(key.clone(), || Arc::new(tokio::sync::Mutex::new(Tokens::default())));
        // One fetch per key at a time: the others wait for its tokens instead of asking too.
        let mut tokens = slot.lock().await;
        if tokens.left > 0 && tokens.until.is_some_and(|u| Instant::now() < u) {
            tokens.left -= 1;
            return self.allowed(tokens.remaining);
        }
        let interval_us = (self.window.as_micros() / u128::from(self.requests.max(1))).max(1) as u64;
        let capacity = self.requests.saturating_add(self.burst);
        let mut invocation = TAKE_SCRIPT.get_or_init(|| redis::Script::new(TAKE)).prepare_invoke();
        invocation.key(format!("{}{key}", self.key_base)).arg(interval_us).arg(capacity).arg(self.batch);
        let taken = self
            .link
            .run(move |mut conn| async move { invocation.invoke_async::<(u32, u64, u64)>(&mut conn).await })
            .await;
        match taken {
            Err(_) => {
                drop(tokens);
                self.fallback_decision(key)
            }
            Ok((0, _, wait_us)) => {
                self.mode.set(false);
                *tokens = Tokens::default();
                self.limited(wait_us.div_ceil(1_000_000).max(1))
            }
            Ok((granted, remaining, _)) => {
                self.mode.set(false);
                *tokens = Tokens { left: granted - 1, until: Some(Instant::now() + TOKEN_HOLD), remaining };
                self.allowed(remaining)
            }
        }
    }
}
