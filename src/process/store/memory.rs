//! The order store in memory: the same semantics as the SQLite store (one live order per
//! opportunity, guarded transitions, one history entry per state with a repeat count, leases),
//! for unit tests of the service. Nothing survives the process. Its clock can be moved forward
//! ([`MemoryStore::advance`]), so backoff, leases and key expiry are tested without sleeping.

use super::{now_ms, Change, KeyState, NewOrder, OrderRecord, OrderStore, StoreError, Transition};
use crate::process::state::State;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

struct Key {
    fingerprint: String,
    in_flight: bool,
    response: Option<(u16, Option<String>, Vec<u8>)>,
    expires_at: i64,
}

struct Stored {
    record: OrderRecord,
    lease_until: i64,
    history: Vec<Transition>,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<String, Key>,
    orders: HashMap<String, Stored>,
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Added to the wall clock: tests move time forward.
    offset_ms: AtomicI64,
    /// Make every call fail (a store that is down).
    failing: std::sync::atomic::AtomicBool,
    /// Record the next order but answer with a failure (a commit whose answer was lost).
    lose_insert_answer: std::sync::atomic::AtomicBool,
}

const DELIVERABLE: [State; 4] = [State::Received, State::Validated, State::Submitted, State::Pending];

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Move the store's clock forward.
    pub fn advance(&self, by: Duration) {
        self.offset_ms.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    /// Fail every call from now on (`true`) or not.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// The next `insert_order` records its order, then reports a failure.
    pub fn lose_next_insert_answer(&self) {
        self.lose_insert_answer.store(true, Ordering::Relaxed);
    }

    fn up(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError("the store is down".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl OrderStore for MemoryStore {
    fn now(&self) -> i64 {
        now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    async fn recover(&self, _settle: Duration) -> Result<u64, StoreError> {
        // One process: nothing can be held by a process that is gone.
        self.up().map(|_| 0)
    }

    async fn claim_key(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<KeyState, StoreError> {
        self.up()?;
        let now = self.now();
        let mut inner = self.inner.lock();
        let free = inner.keys.get(key).is_none_or(|k| k.expires_at <= now && !k.in_flight);
        if free {
            let expires_at = now.saturating_add(ttl.as_millis() as i64);
            let claimed =
                Key { fingerprint: fingerprint.into(), in_flight: true, response: None, expires_at };
            inner.keys.insert(key.into(), claimed);
            return Ok(KeyState::Claimed);
        }
        let k = &inner.keys[key];
        Ok(if k.fingerprint != fingerprint {
            KeyState::Mismatch
        } else if k.in_flight {
            KeyState::InFlight
        } else {
            let (status, location, body) = k.response.clone().unwrap_or_default();
            KeyState::Done { status, location, body }
        })
    }

    async fn complete_key(
        &self,
        key: &str,
        status: u16,
        location: Option<&str>,
        body: &[u8],
    ) -> Result<(), StoreError> {
        self.up()?;
        if let Some(k) = self.inner.lock().keys.get_mut(key) {
            k.in_flight = false;
            k.response = Some((status, location.map(String::from), body.to_vec()));
        }
        Ok(())
    }

    async fn release_key(&self, key: &str) -> Result<(), StoreError> {
        self.up()?;
        let mut inner = self.inner.lock();
        if inner.keys.get(key).is_some_and(|k| k.in_flight) {
            inner.keys.remove(key);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.up()
    }

    async fn purge_expired_keys(&self) -> Result<u64, StoreError> {
        self.up()?;
        let now = self.now();
        let mut inner = self.inner.lock();
        let before = inner.keys.len();
        inner.keys.retain(|_, k| k.in_flight || k.expires_at > now);
        Ok((before - inner.keys.len()) as u64)
    }

    async fn insert_order(&self, o: NewOrder<'_>) -> Result<Option<OrderRecord>, StoreError> {
        self.up()?;
        let now = self.now();
        let mut inner = self.inner.lock();
        let taken = inner
            .orders
            .values()
            .any(|s| s.record.opportunity_id == o.opportunity_id && s.record.state != State::Rejected);
        if taken && o.state != State::Rejected {
            return Ok(None);
        }
        let record = OrderRecord {
            id: o.id.into(),
            opportunity_id: o.opportunity_id.into(),
            state: o.state,
            quote: o.quote.into(),
            validated: o.validated,
            erp_order_id: None,
            erp_order_number: None,
            reason: Some(o.reason.into()),
            violations: o.violations.map(String::from),
            correlation_id: o.correlation_id.into(),
            traceparent: o.traceparent.into(),
            attempts: 0,
            next_attempt_at: now,
            received_at: now,
            updated_at: now,
            owner: o.owner.into(),
        };
        let first = Transition {
            at: now,
            from: None,
            to: o.state.as_str().into(),
            reason: o.reason.into(),
            repeats: 0,
            last_at: None,
        };
        let lease_until = o.lease.map_or(0, |l| now + l.as_millis() as i64);
        inner
            .orders
            .insert(o.id.into(), Stored { record: record.clone(), lease_until, history: vec![first] });
        if self.lose_insert_answer.swap(false, Ordering::Relaxed) {
            return Err(StoreError("connection lost while committing".into()));
        }
        Ok(Some(record))
    }

    async fn transition(
        &self,
        id: &str,
        from: State,
        to: State,
        change: Change<'_>,
    ) -> Result<bool, StoreError> {
        self.up()?;
        let now = self.now();
        let mut inner = self.inner.lock();
        let Some(stored) = inner.orders.get_mut(id).filter(|s| s.record.state == from) else {
            return Ok(false);
        };
        let r = &mut stored.record;
        r.state = to;
        r.updated_at = now;
        r.reason = Some(change.reason.into());
        if let Some((erp_id, number)) = change.erp_order {
            r.erp_order_id = Some(erp_id.into());
            r.erp_order_number = Some(number.into());
        }
        if let Some(v) = change.validated {
            r.validated = v;
        }
        if let Some(v) = change.violations {
            r.violations = Some(v.into());
        }
        if let Some(at) = change.next_attempt_at {
            r.next_attempt_at = at;
        }
        r.attempts = if change.reset_attempts {
            0
        } else {
            r.attempts + i64::from(change.count_attempt) - i64::from(change.uncount_attempt)
        };
        if !change.keep_lease {
            stored.lease_until = 0;
        }
        match stored.history.last_mut() {
            Some(last) if from == to => {
                last.repeats += 1;
                last.last_at = Some(now);
                last.reason = change.reason.into();
            }
            _ => stored.history.push(Transition {
                at: now,
                from: Some(from.as_str().into()),
                to: to.as_str().into(),
                reason: change.reason.into(),
                repeats: 0,
                last_at: None,
            }),
        }
        Ok(true)
    }

    async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<OrderRecord>, StoreError> {
        self.up()?;
        let now = self.now();
        let mut inner = self.inner.lock();
        let mut due: Vec<&mut Stored> = inner
            .orders
            .values_mut()
            .filter(|s| {
                DELIVERABLE.contains(&s.record.state)
                    && s.record.next_attempt_at <= now
                    && s.lease_until < now
            })
            .collect();
        due.sort_by_key(|s| s.record.next_attempt_at);
        Ok(due
            .into_iter()
            .take(limit.max(0) as usize)
            .map(|s| {
                s.lease_until = now + lease.as_millis() as i64;
                s.record.clone()
            })
            .collect())
    }

    async fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError> {
        self.up()?;
        Ok(self.inner.lock().orders.get(id).map(|s| s.record.clone()))
    }

    async fn live_order_for(&self, opportunity_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        self.up()?;
        let inner = self.inner.lock();
        Ok(inner
            .orders
            .values()
            .find(|s| s.record.opportunity_id == opportunity_id && s.record.state != State::Rejected)
            .map(|s| s.record.clone()))
    }

    async fn orders_for(&self, opportunity_id: &str) -> Result<Vec<OrderRecord>, StoreError> {
        self.up()?;
        let inner = self.inner.lock();
        let mut orders: Vec<OrderRecord> = inner
            .orders
            .values()
            .filter(|s| s.record.opportunity_id == opportunity_id)
            .map(|s| s.record.clone())
            .collect();
        orders.sort_by(|a, b| (b.received_at, &b.id).cmp(&(a.received_at, &a.id)));
        Ok(orders)
    }

    async fn in_state(&self, state: State, limit: i64) -> Result<Vec<OrderRecord>, StoreError> {
        self.up()?;
        let inner = self.inner.lock();
        let mut orders: Vec<OrderRecord> =
            inner.orders.values().filter(|s| s.record.state == state).map(|s| s.record.clone()).collect();
        orders.sort_by_key(|o| o.updated_at);
        orders.truncate(limit.max(0) as usize);
        Ok(orders)
    }

    async fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        self.up()?;
        Ok(self.inner.lock().orders.get(id).map(|s| s.history.clone()).unwrap_or_default())
    }

    async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.up()?;
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for s in self.inner.lock().orders.values() {
            *counts.entry(s.record.state.as_str()).or_default() += 1;
        }
        Ok(counts.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
}
