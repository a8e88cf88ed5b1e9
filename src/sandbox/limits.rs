//! The sandbox's protections, modelled on Business Central's: a sliding-window request limit
//! and a concurrency limit (N processed at once plus a short queue). Both answer 429.

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::spec::SandboxLimits as LimitsSpec;

/// Why a request was refused with 429, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rejection {
    Rate { retry_after: Duration },
    Concurrency,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct LimitStats {
    /// Requests admitted in the current sliding window.
    pub requests_in_window: usize,
    /// Most requests *arriving* (admitted or not) within any one window; capped at twice the
    /// limit, which is enough to show it was exceeded.
    pub peak_requests_in_window: usize,
    pub in_flight: usize,
    pub peak_in_flight: usize,
    /// Requests open at the sandbox at once, processing or queued.
    pub open_requests: usize,
    pub peak_open_requests: usize,
    pub rejected_rate: u64,
    pub rejected_concurrency: u64,
}

struct Window {
    admitted: VecDeque<Instant>,
    arrivals: VecDeque<Instant>,
}

pub struct Limits {
    spec: Mutex<LimitsSpec>,
    window: Mutex<Window>,
    slots: Mutex<Arc<Semaphore>>,
    stats: Mutex<LimitStats>,
}

/// Held while a request is processed; frees the slot and the open-request count on drop.
pub struct Admitted {
    limits: Arc<Limits>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut s = self.limits.stats.lock();
        s.in_flight -= 1;
        s.open_requests -= 1;
    }
}

impl Limits {
    pub fn new(spec: LimitsSpec) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(spec.max_concurrent.max(1) as usize));
        Arc::new(Limits {
            spec: Mutex::new(spec),
            window: Mutex::new(Window { admitted: VecDeque::new(), arrivals: VecDeque::new() }),
            slots: Mutex::new(slots),
            stats: Mutex::new(LimitStats::default()),
        })
    }

    pub fn spec(&self) -> LimitsSpec {
        self.spec.lock().clone()
    }

    /// Replace the limits. A new concurrency limit applies to requests arriving from now on.
    pub fn set_spec(&self, spec: LimitsSpec) {
        let mut current = self.spec.lock();
        if spec.max_concurrent != current.max_concurrent {
            *self.slots.lock() = Arc::new(Semaphore::new(spec.max_concurrent.max(1) as usize));
        }
        *current = spec;
    }

    pub fn stats(&self) -> LimitStats {
        let mut s = self.stats.lock().clone();
        let window = Duration::from_secs(self.spec.lock().window_seconds);
        let now = Instant::now();
        let w = self.window.lock();
        s.requests_in_window = w.admitted.iter().filter(|t| now.duration_since(**t) < window).count();
        s
    }

    pub fn reset_stats(&self) {
        let mut w = self.window.lock();
        w.admitted.clear();
        w.arrivals.clear();
        let mut s = self.stats.lock();
        let (in_flight, open) = (s.in_flight, s.open_requests);
        *s = LimitStats { in_flight, open_requests: open, ..Default::default() };
    }

    /// Check the window, then wait for a processing slot (or refuse when the queue is full).
    pub async fn admit(self: &Arc<Self>) -> Result<Admitted, Rejection> {
        let spec = self.spec();
        self.check_window(&spec, Instant::now())?;
        let slots = self.slots.lock().clone();
        {
            let mut s = self.stats.lock();
            if s.open_requests >= (spec.max_concurrent + spec.queue) as usize {
                s.rejected_concurrency += 1;
                return Err(Rejection::Concurrency);
            }
            s.open_requests += 1;
            s.peak_open_requests = s.peak_open_requests.max(s.open_requests);
        }
        // If this future is dropped while queued (client gone), undo the open count.
        let undo = OpenGuard(self.clone());
        let permit = slots.acquire_owned().await.map_err(|_| Rejection::Concurrency)?;
        std::mem::forget(undo);
        let mut s = self.stats.lock();
        s.in_flight += 1;
        s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
        drop(s);
        Ok(Admitted { limits: self.clone(), _permit: permit })
    }

    fn check_window(&self, spec: &LimitsSpec, now: Instant) -> Result<(), Rejection> {
        let window = Duration::from_secs(spec.window_seconds.max(1));
        let limit = spec.window_requests as usize;
        let mut w = self.window.lock();
        while w.admitted.front().is_some_and(|t| now.duration_since(*t) >= window) {
            w.admitted.pop_front();
        }
        while w.arrivals.front().is_some_and(|t| now.duration_since(*t) >= window) {
            w.arrivals.pop_front();
        }
        if w.arrivals.len() < limit.saturating_mul(2).max(1) {
            w.arrivals.push_back(now);
        }
        let arrivals = w.arrivals.len();
        let outcome = if w.admitted.len() >= limit {
            let oldest = *w.admitted.front().expect("limit > 0 when full");
            let wait = window.saturating_sub(now.duration_since(oldest));
            Err(Rejection::Rate { retry_after: wait })
        } else {
            w.admitted.push_back(now);
            Ok(())
        };
        drop(w);
        let mut s = self.stats.lock();
        s.peak_requests_in_window = s.peak_requests_in_window.max(arrivals);
        if outcome.is_err() {
            s.rejected_rate += 1;
        }
        outcome
    }
}

struct OpenGuard(Arc<Limits>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.stats.lock().open_requests -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(window_requests: u32, max_concurrent: u32, queue: u32) -> LimitsSpec {
        LimitsSpec { window_requests, window_seconds: 60, max_concurrent, queue, ..Default::default() }
    }

    #[tokio::test]
    async fn window_admits_exactly_the_limit() {
        let l = Limits::new(spec(3, 10, 0));
        for _ in 0..3 {
            drop(l.admit().await.unwrap());
        }
        match l.admit().await {
            Err(Rejection::Rate { retry_after }) => assert!(retry_after <= Duration::from_secs(60)),
            _ => panic!("fourth request must be refused"),
        }
        let s = l.stats();
        assert_eq!((s.rejected_rate, s.requests_in_window, s.peak_requests_in_window), (1, 3, 4));
    }

    #[tokio::test]
    async fn concurrency_plus_queue_then_refuse() {
        let l = Limits::new(spec(100, 2, 1));
        let a = l.admit().await.unwrap();
        let b = l.admit().await.unwrap();
        let l2 = l.clone();
        let queued = tokio::spawn(async move { l2.admit().await.map(|_| ()) });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.admit().await.err(), Some(Rejection::Concurrency));
        drop(a);
        queued.await.unwrap().unwrap();
        drop(b);
        let s = l.stats();
        assert_eq!((s.peak_in_flight, s.peak_open_requests, s.rejected_concurrency), (2, 3, 1));
        assert_eq!((s.in_flight, s.open_requests), (0, 0));
    }
}
