//! Change detection, ERP → gateway: what becomes of an order after the ERP accepted it
//! (shipped, invoiced, paid, cancelled), recorded as milestones whose events the store writes
//! to the outbox in the same transaction (`process::store::lifecycle`).
//!
//! Business Central notifies: [`notifications`] takes its webhook calls (authenticated by
//! `clientState`, repeats recognised, nothing but gateway orders followed) and queues a check;
//! the subscriptions are created and renewed here. A check reads the order (or invoice) back
//! through the adapter in the ERP budget's lowest class, so a storm of notifications costs
//! only the budget's spare capacity and at most one queued read per order. A sweep of the
//! unfinished orders runs at start (a check queued before a crash is not lost) and when the
//! ERP sends a `collection` notification. An ERP that does not notify (Tryton) is polled every
//! `poll_seconds` for the orders changed since a cursor the store keeps.

pub mod notifications;

use crate::config::ChangeSettings;
use crate::process::adapter::{AdapterError, Progress};
use crate::process::service::QuoteToOrder;
use crate::process::store::lifecycle::{Milestone, OrderLifecycle};
use crate::process::store::StoreError;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGauge, Opts};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Checks waiting at most; beyond this a notification is refused with 503 (the ERP sends it
/// again later).
pub const MAX_QUEUED: usize = 10_000;
/// Checks under way at once (each waits for the ERP budget in its lowest class).
const WORKERS: usize = 2;
/// Unfinished orders a sweep queues per page.
const SWEEP_PAGE: i64 = 200;
/// A failed check is tried again after this, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Notifications seen are remembered this long (Business Central retries for up to 36 hours).
const SIGHTINGS_KEPT_MS: i64 = 3 * 24 * 3600 * 1000;

/// Something to read back from the ERP.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Check {
    /// A gateway order, by its id, with the ERP's id and number for it.
    Order { id: String, erp_id: String, erp_number: String },
    /// An invoice, by the ERP's id: whose order it is shows once it is read.
    Invoice(String),
    /// Queue every unfinished order, a page at a time from after this id.
    Sweep(String),
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Check>,
    queued: HashSet<Check>,
    /// Under way now: the same check asked for meanwhile runs once more after it (in
    /// `again`), so a storm about one order costs two reads, not one per notification.
    running: HashSet<Check>,
    again: HashSet<Check>,
}

pub struct ChangeMetrics {
    /// ERP notifications by outcome: accepted, repeated, ignored, unknown_resource,
    /// unauthenticated, malformed, backlog_full.
    pub notifications: IntCounterVec,
    /// Checks by outcome: changed, unchanged, retried, failed.
    pub checks: IntCounterVec,
    pub backlog: IntGauge,
    /// Milestones recorded, by event type.
    pub milestones: IntCounterVec,
}

pub const NOTIFICATION_OUTCOMES: &[&str] =
    &["accepted", "repeated", "ignored", "unknown_resource", "unauthenticated", "malformed", "backlog_full"];
const CHECK_OUTCOMES: &[&str] = &["changed", "unchanged", "retried", "failed"];

impl ChangeMetrics {
    pub fn global() -> &'static ChangeMetrics {
        static GLOBAL: std::sync::OnceLock<ChangeMetrics> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| {
            let counter = |name: &str, help: &str, label: &str| {
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
            };
            let m = ChangeMetrics {
                notifications: counter(
                    "causeway_erp_notifications_total",
                    "Change notifications from the ERP, by outcome",
                    "outcome",
                ),
                checks: counter(
                    "causeway_change_checks_total",
                    "Orders and invoices read back from the ERP after a change, by outcome",
                    "outcome",
                ),
                backlog: IntGauge::new("causeway_change_backlog", "Checks waiting to read the ERP")
                    .expect("valid metric"),
                milestones: counter(
                    "causeway_order_milestones_total",
                    "Order milestones found in the ERP (shipped, invoiced, paid, cancelled), by event type",
                    "type",
                ),
            };
            for o in NOTIFICATION_OUTCOMES {
                m.notifications.with_label_values(&[*o]);
            }
            for o in CHECK_OUTCOMES {
                m.checks.with_label_values(&[*o]);
            }
            for t in crate::process::store::lifecycle::MILESTONES {
                m.milestones.with_label_values(&[*t]);
            }
            let registry = &crate::observe::metrics::Metrics::global().registry;
            for c in [
                Box::new(m.notifications.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(m.checks.clone()),
                Box::new(m.backlog.clone()),
                Box::new(m.milestones.clone()),
            ] {
                let _ = registry.register(c);
            }
            m
        })
    }
}

/// Change detection for one process service.
pub struct Changes {
    service: Arc<QuoteToOrder>,
    settings: ChangeSettings,
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
}

impl Changes {
    pub fn new(service: Arc<QuoteToOrder>, settings: ChangeSettings) -> Arc<Changes> {
        ChangeMetrics::global();
        Arc::new(Changes {
            service,
            settings,
            queue: Mutex::new(Queue::default()),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn settings(&self) -> &ChangeSettings {
        &self.settings
    }

    async fn lifecycle(&self) -> Result<Arc<dyn OrderLifecycle>, StoreError> {
        self.service
            .lifecycle()
            .await?
            .ok_or_else(|| StoreError("the order store keeps no order milestones".into()))
    }

    /// Room for `n` more checks?
    fn has_room(&self, n: usize) -> bool {
        self.queue.lock().waiting.len() + n <= MAX_QUEUED
    }

    /// Queue `check` unless the same one waits already (or runs: then it runs once more).
    fn enqueue(&self, check: Check) {
        let mut q = self.queue.lock();
        if q.running.contains(&check) {
            q.again.insert(check);
        } else if q.queued.insert(check.clone()) {
            q.waiting.push_back(check);
            ChangeMetrics::global().backlog.set(q.waiting.len() as i64);
            self.wake.notify_one();
        }
    }

    fn next(&self) -> Option<Check> {
        let mut q = self.queue.lock();
        let check = q.waiting.pop_front()?;
        q.queued.remove(&check);
        q.running.insert(check.clone());
        ChangeMetrics::global().backlog.set(q.waiting.len() as i64);
        Some(check)
    }

    /// `check` is over; queue it again when it was asked for while it ran.
    fn done(&self, check: &Check) {
        let again = {
            let mut q = self.queue.lock();
            q.running.remove(check);
            q.again.remove(check)
        };
        if again {
            self.enqueue(check.clone());
        }
    }

    /// Subscriptions, the start sweep, the workers and the forgetting of old notifications,
    /// until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: pingora::server::ShutdownWatch) {
        if self.settings.notifications.is_some() {
            tokio::spawn(self.clone().keep_subscribed());
        } else {
            tokio::spawn(self.clone().poll());
        }
        tokio::spawn(self.clone().forget_old_sightings());
        self.enqueue(Check::Sweep(String::new()));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..WORKERS {
            workers.spawn(self.clone().work());
        }
        let _ = shutdown.changed().await;
        workers.abort_all();
    }

    async fn work(self: Arc<Self>) {
        // Consecutive postponed checks: the wait doubles with jitter (clock::backoff) so the
        // workers do not return to a throttling ERP together.
        let mut postponed = 0u32;
        loop {
            let Some(check) = self.next() else {
                self.wake.notified().await;
                continue;
            };
            let metrics = ChangeMetrics::global();
            let outcome = self.perform(&check).await;
            self.done(&check);
            match outcome {
                Ok(changed) => {
                    postponed = 0;
                    metrics.checks.with_label_values(&[if changed { "changed" } else { "unchanged" }]).inc();
                }
                Err(CheckError::Later(why)) => {
                    metrics.checks.with_label_values(&["retried"]).inc();
                    let wait = crate::clock::backoff(FIRST_BACKOFF, MAX_BACKOFF, postponed);
                    postponed = postponed.saturating_add(1);
                    tracing::warn!(check = ?check, error = %why, retry_in = ?wait, "change check postponed");
                    tokio::time::sleep(wait).await;
                    self.enqueue(check);
                }
                Err(CheckError::Failed(why)) => {
                    metrics.checks.with_label_values(&["failed"]).inc();
                    tracing::error!(check = ?check, error = %why, "change check failed; the next sweep reads it again");
                }
            }
        }
    }

    /// Read `check` back from the ERP and record what it shows; `true` when a milestone was new.
    async fn perform(&self, check: &Check) -> Result<bool, CheckError> {
        let lifecycle = self.lifecycle().await?;
        let adapter = self.service.adapter();
        match check {
            Check::Order { id, erp_id, erp_number } => {
                let progress = adapter.progress(erp_id, erp_number).await?;
                self.record(lifecycle.as_ref(), id, &progress).await
            }
            Check::Invoice(invoice) => {
                let Some((number, progress)) = adapter.invoice_progress(invoice).await? else {
                    return Ok(false);
                };
                match lifecycle.tracked(None, Some(&number)).await? {
                    Some(order) => self.record(lifecycle.as_ref(), &order.id, &progress).await,
                    // Not an order this gateway created.
                    None => Ok(false),
                }
            }
            Check::Sweep(after) => {
                let page = lifecycle.unfinished(after, SWEEP_PAGE).await?;
                if let Some(last) = page.last().filter(|_| page.len() as i64 == SWEEP_PAGE) {
                    if !self.has_room(page.len() + 1) {
                        return Err(CheckError::Later("the change backlog is full".into()));
                    }
                    self.enqueue(Check::Sweep(last.id.clone()));
                }
                for o in page {
                    self.enqueue(Check::Order {
                        id: o.id,
                        erp_id: o.erp_order_id,
                        erp_number: o.erp_order_number,
                    });
                }
                Ok(false)
            }
        }
    }

    async fn record(
        &self,
        lifecycle: &dyn OrderLifecycle,
        order: &str,
        progress: &Progress,
    ) -> Result<bool, CheckError> {
        let milestones = milestones(progress);
        if milestones.is_empty() {
            return Ok(false);
        }
        let recorded = lifecycle.record_milestones(order, &milestones).await?;
        for kind in &recorded {
            ChangeMetrics::global().milestones.with_label_values(&[kind.as_str()]).inc();
            tracing::info!(order = %order, event = %kind, "order milestone recorded");
        }
        if !recorded.is_empty() {
            self.service.note_events_written();
        }
        Ok(!recorded.is_empty())
    }

    /// Keep the ERP's subscriptions in place (created, renewed before they expire).
    async fn keep_subscribed(self: Arc<Self>) {
        let Some(n) = self.settings.notifications.clone() else { return };
        let mut failures = 0u32;
        loop {
            match self.service.adapter().subscribe(&n.url, &n.client_state).await {
                Ok(next) => {
                    failures = 0;
                    tokio::time::sleep(next).await;
                }
                Err(e) => {
                    let wait = crate::clock::backoff(FIRST_BACKOFF, MAX_BACKOFF, failures);
                    failures = failures.saturating_add(1);
                    tracing::error!(error = %e, url = %n.url, retry_in = ?wait, "ERP change subscription failed; notifications will not arrive until it succeeds");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Poll the ERP for orders changed since the stored cursor; queue a check of each of ours.
    async fn poll(self: Arc<Self>) {
        const SOURCE: &str = "erp";
        loop {
            tokio::time::sleep(self.settings.poll).await;
            let polled = async {
                let lifecycle = self.lifecycle().await?;
                let cursor = lifecycle.cursor(SOURCE).await?;
                let (changed, next) = self.service.adapter().changed_since(cursor.as_deref()).await?;
                for erp_id in changed {
                    if let Some(o) = lifecycle.tracked(Some(&erp_id), None).await? {
                        if !o.finished() {
                            self.enqueue(Check::Order {
                                id: o.id,
                                erp_id: o.erp_order_id,
                                erp_number: o.erp_order_number,
                            });
                        }
                    }
                }
                if let Some(next) = next.filter(|n| Some(n) != cursor.as_ref()) {
                    lifecycle.set_cursor(SOURCE, &next).await?;
                }
                Ok::<_, CheckError>(())
            };
            if let Err(e) = polled.await {
                tracing::warn!(error = ?e, "polling the ERP for changes failed; trying again at the next poll");
            }
        }
    }

    async fn forget_old_sightings(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(600)).await;
            let Ok(lifecycle) = self.lifecycle().await else { continue };
            let before = crate::clock::now_ms() - SIGHTINGS_KEPT_MS;
            while let Ok(n) = lifecycle.forget_sightings(before, 1000).await {
                if n < 1000 {
                    break;
                }
            }
        }
    }
}

/// The milestones `progress` shows, in the order an order reaches them.
fn milestones(progress: &Progress) -> Vec<Milestone> {
    let data = |v: &serde_json::Value| serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    if let Some(c) = &progress.cancelled {
        return vec![Milestone { kind: "order.cancelled.v1", data: data(c) }];
    }
    [
        ("order.shipped.v1", &progress.shipped),
        ("invoice.issued.v1", &progress.invoiced),
        ("payment.received.v1", &progress.paid),
    ]
    .into_iter()
    .filter_map(|(kind, v)| v.as_ref().map(|v| Milestone { kind, data: data(v) }))
    .collect()
}

#[derive(Debug)]
enum CheckError {
    /// The ERP or the store cannot answer now: the check waits and runs again.
    Later(String),
    /// The ERP's answer cannot be read: left to the next sweep.
    Failed(String),
}

impl From<StoreError> for CheckError {
    fn from(e: StoreError) -> Self {
        CheckError::Later(e.to_string())
    }
}

impl From<AdapterError> for CheckError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::Unavailable(_) | AdapterError::Throttled(_) => CheckError::Later(e.to_string()),
            AdapterError::Rejected { .. } | AdapterError::Protocol(_) => CheckError::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn milestones_come_in_lifecycle_order_and_a_cancellation_alone() {
        let p = Progress {
            shipped: Some(json!({})),
            invoiced: Some(json!({"invoiceNumber": "PS-1"})),
            paid: Some(json!({"amount": 1})),
            cancelled: None,
        };
        let kinds: Vec<_> = milestones(&p).iter().map(|m| m.kind).collect();
        assert_eq!(kinds, ["order.shipped.v1", "invoice.issued.v1", "payment.received.v1"]);
        let c = Progress { cancelled: Some(json!({"reason": "gone"})), ..p };
        let kinds: Vec<_> = milestones(&c).iter().map(|m| m.kind).collect();
        assert_eq!(kinds, ["order.cancelled.v1"]);
        assert!(milestones(&Progress::default()).is_empty());
    }
}
