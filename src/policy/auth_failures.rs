//! Failed authentications per client address (`auth_failures:` in causeway.yaml): an address
//! that fails `max_failures` times within a window is refused with 429 until the window ends,
//! before any credential is checked, so keys and tokens cannot be tried at line rate and a flood
//! of bad tokens costs no signature checks. Bounded: addresses are forgotten with their window,
//! and at most `MAX_ADDRESSES` are tracked.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_ADDRESSES: u64 = 100_000;

struct Window {
    started: Instant,
    failures: AtomicU32,
}

pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    addresses: moka::sync::Cache<IpAddr, Arc<Window>>,
    /// When the last failure was recorded (ms after `epoch`; 0: never): with none in the last
    /// window, no address can be refused and the lookup is skipped (the common case).
    last_failure_ms: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for FailureLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailureLimiter({} per {:?})", self.max_failures, self.window)
    }
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        FailureLimiter {
            max_failures,
            window,
            addresses: moka::sync::Cache::builder().max_capacity(MAX_ADDRESSES).time_to_live(window).build(),
            last_failure_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn same_limits(&self, max_failures: u32, window: Duration) -> bool {
        (self.max_failures, self.window) == (max_failures, window)
    }

    /// Seconds until `ip` may try again, when it used up its failures.
    pub fn refused(&self, ip: IpAddr) -> Option<u64> {
        let last = self.last_failure_ms.load(Ordering::Relaxed);
        if last == 0 || self.epoch.elapsed().as_millis() as u64 > last + self.window.as_millis() as u64 {
            return None;
        }
        let w = self.addresses.get(&ip)?;
        if w.failures.load(Ordering::Relaxed) < self.max_failures {
            return None;
        }
        let left = self.window.saturating_sub(w.started.elapsed());
        (!left.is_zero()).then(|| left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }

    /// Count one failed authentication of `ip`.
    pub fn record(&self, ip: IpAddr) {
        let now_ms = (self.epoch.elapsed().as_millis() as u64).max(1);
        self.last_failure_ms.store(now_ms, Ordering::Relaxed);
        let w = self
            .addresses
            .get_with(ip, || Arc::new(Window { started: Instant::now(), failures: AtomicU32::new(0) }));
        w.failures.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_and_others_are_not() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..2 {
            l.record(a);
        }
        assert_eq!(l.refused(a), None, "two failures of three");
        l.record(a);
        let retry = l.refused(a).expect("refused after the third");
        assert!((59..=60).contains(&retry), "{retry}");
        assert_eq!(l.refused(b), None);
    }

    #[test]
    fn the_window_ends() {
        let l = FailureLimiter::new(1, Duration::from_millis(30));
        let a: IpAddr = "::1".parse().unwrap();
        l.record(a);
        assert!(l.refused(a).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(l.refused(a), None);
    }
}
