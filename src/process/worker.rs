//! The delivery worker: leases the orders that are due and delivers them, keeps the per-state
//! gauges on the store's counts, purges expired idempotency keys and takes back the leases of
//! processes that are gone.

use super::metrics::ProcessMetrics;
use super::service::QuoteToOrder;
use super::state::State;
use super::store::OrderStore;
use crate::budget::throttle;

use std::sync::Arc;
use std::time::Duration;

/// Orders delivered at once by the worker; the ERP budget bounds what reaches the ERP.
const WORKER_BATCH: i64 = 16;
const WORKER_POLL: Duration = Duration::from_millis(200);
/// How often the per-state gauges are recounted when nothing moves, and at most how often when
/// orders change state (they are recounted from the store, so they never drift from it).
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
const GAUGE_DEBOUNCE: Duration = Duration::from_millis(50);
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// How often leases of processes that are gone are taken back (after a crash during a graceful
/// upgrade, the new process finds them this soon).
const RECOVER_INTERVAL: Duration = Duration::from_secs(2);

impl QuoteToOrder {
    /// The delivery worker: leases due orders and delivers them, until shutdown.
    pub async fn run_worker(self: Arc<Self>, mut shutdown: pingora::server::ShutdownWatch) {
        let store = loop {
            match self.store().await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::error!(error = %e, "order store unavailable; the delivery worker retries in 5 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        // The order-state gauges follow the store on their own beat: a delivery round can take
        // minutes under a throttled ERP, and they must not wait for it (they read 0 until then).
        let _gauges = AbortOnDrop(tokio::spawn({
            let (this, mut shutdown) = (self.clone(), shutdown.clone());
            async move {
                loop {
                    if let Ok(store) = this.store().await {
                        this.refresh_gauges(store).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
                        _ = this.moved.notified() => tokio::time::sleep(GAUGE_DEBOUNCE).await,
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }));
        let mut purge = tokio::time::Instant::now();
        let mut recovered = tokio::time::Instant::now();
        // Deliveries under way. A finished one makes room for the next due order at once: a
        // round does not wait for its slowest order (one waiting for the ERP's budget, or many
        // ERP steps long) while the budget has room the others could use.
        let mut running = tokio::task::JoinSet::new();
        loop {
            if *shutdown.borrow() {
                // A graceful upgrade or shutdown: claim nothing more and let the deliveries under
                // way finish (within the grace period); the next process resumes the rest.
                while running.join_next().await.is_some() {}
                return;
            }
            if recovered.elapsed() >= RECOVER_INTERVAL {
                recovered = tokio::time::Instant::now();
                if let Err(e) = self.recover(store).await {
                    tracing::warn!(error = %e, "cannot take back leases of stopped processes");
                }
            }
            if purge.elapsed() >= PURGE_INTERVAL {
                purge = tokio::time::Instant::now();
                if let Err(e) = store.purge_expired_keys().await {
                    tracing::warn!(error = %e, "cannot purge expired idempotency keys");
                }
            }
            let room = WORKER_BATCH - running.len() as i64;
            let claimed = if room > 0 { self.claim_and_deliver(&mut running, room).await } else { 0 };
            if claimed == 0 || running.len() as i64 >= WORKER_BATCH {
                tokio::select! {
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                    _ = tokio::time::sleep(WORKER_POLL) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }

    /// One round of the worker: lease the orders that are due and deliver them (each for the
    /// consumer that submitted it). Returns how many were due.
    pub async fn deliver_due(self: &Arc<Self>) -> usize {
        let mut batch = tokio::task::JoinSet::new();
        let count = self.claim_and_deliver(&mut batch, WORKER_BATCH).await;
        while batch.join_next().await.is_some() {}
        count
    }

    /// Lease up to `limit` due orders and start delivering each in `into`, on behalf of the
    /// consumer that submitted it, behind every request a caller waits for. Returns how many.
    async fn claim_and_deliver(self: &Arc<Self>, into: &mut tokio::task::JoinSet<()>, limit: i64) -> usize {
        let Ok(store) = self.store().await else { return 0 };
        let due = match store.claim_due(limit, self.settings.lease).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read due orders");
                return 0;
            }
        };
        let count = due.len();
        for order in due {
            let this = self.clone();
            let owner: Arc<str> = Arc::from(order.owner.as_str());
            into.spawn(throttle::on_behalf_of(owner, throttle::in_background(async move {
                let id = order.id.clone();
                if let Err(e) = this.deliver(order, None).await {
                    tracing::error!(error = %e, "order delivery could not be recorded; it will be retried");
                    this.free_lease_when_possible(id);
                }
            })));
        }
        count
    }

    async fn refresh_gauges(&self, store: &dyn OrderStore) {
        if let Ok(counts) = store.count_by_state().await {
            let gauge = &ProcessMetrics::global().orders_in_state;
            for s in State::ALL {
                let n = counts.iter().find(|(name, _)| name == s.as_str()).map_or(0, |(_, n)| *n);
                gauge.with_label_values(&[s.as_str()]).set(n);
            }
        }
    }
}

/// Ends a background task when its owner ends, however it returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
