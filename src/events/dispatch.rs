//! Delivery of the outbox to each subscriber: POST the CloudEvent, signed per Standard Webhooks;
//! a 2xx settles it; anything else (an error status, a timeout, a refused connection) is retried
//! with backoff and jitter until the subscriber's horizon, then dead-lettered for an operator.
//! Only the earliest undelivered event of each order is leased, so one order's events reach a
//! subscriber in order however the retries fall; different orders go out concurrently.

use super::webhook;
use super::{envelope, Delivery, EventOutbox};
use crate::clock::backoff;
use crate::clock::now_ms;
use crate::config::events::{EventsSettings, Sink, SubscriberSettings};
use crate::observe::metrics::Metrics;
use crate::observe::traces::Span;
use crate::process::store::outbox::Attempted;
use opentelemetry::trace::SpanKind;
use std::sync::Arc;
use std::time::Duration;

/// Deliveries leased at once per subscriber (each for a different order), sent concurrently.
const BATCH: i64 = 32;
/// How often a subscriber's outbox is looked at when the last look found nothing and no order
/// of this process finished meanwhile (events written by other replicas, retries coming due).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Acknowledged events are kept this long (for an operator's questions), then forgotten.
const KEEP_DELIVERED: Duration = Duration::from_secs(7 * 24 * 3600);
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per statement, so a purge never holds the store's writer for long.
const PURGE_CHUNK: i64 = 1000;

/// Forget what was acknowledged more than [`KEEP_DELIVERED`] ago, a chunk at a time.
async fn purge(outbox: &dyn EventOutbox) {
    let before = now_ms() - KEEP_DELIVERED.as_millis() as i64;
    let mut total = 0;
    loop {
        match outbox.purge_delivered(before, PURGE_CHUNK).await {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot purge delivered events; retrying later");
                break;
            }
        }
        // Leave room for the request path's writes between chunks.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if total > 0 {
        tracing::info!(rows = total, "purged events acknowledged over 7 days ago");
    }
}

/// How often the undelivered gauges are recounted from the store.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest part of a refusal's body kept as the delivery's last error.
const ERROR_EXCERPT: usize = 200;

/// The media type of a structured-mode CloudEvent.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Deliver `subscriber`'s events until `shutdown`; `outbox` is the store's.
pub async fn run_subscriber(
    outbox: Arc<dyn EventOutbox>,
    source: String,
    subscriber: SubscriberSettings,
    mut wake: tokio::sync::watch::Receiver<u64>,
    mut shutdown: pingora::server::ShutdownWatch,
) {
    let client = match reqwest::Client::builder()
        .timeout(subscriber.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(subscriber = %subscriber.name, error = %e, "cannot build the subscriber's HTTP client; its events wait");
            return;
        }
    };
    let sender = match &subscriber.sink {
        Sink::Webhook { url, secrets } => {
            Sender::Webhook { client, url: url.clone(), secrets: secrets.clone() }
        }
        Sink::Salesforce(settings) => {
            Sender::Salesforce(super::salesforce::Writer::new(client, settings.clone()))
        }
        Sink::Nats(settings) => {
            Sender::Nats(super::nats::Publisher::new(settings.clone(), subscriber.timeout))
        }
    };
    // A lease outlasts the attempt, so no other replica sends the same event meanwhile.
    let lease = subscriber.timeout * 2 + Duration::from_secs(5);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let leased = match outbox.claim_deliveries(&subscriber.name, BATCH, lease).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(subscriber = %subscriber.name, error = %e, "cannot read the event outbox; retrying");
                Vec::new()
            }
        };
        let busy = !leased.is_empty();
        let attempts = leased.into_iter().map(|d| deliver(&sender, outbox.as_ref(), &source, &subscriber, d));
        futures_util::future::join_all(attempts).await;
        if !busy {
            // Woken by this process's orders at once; the poll finds other replicas' events
            // and retries coming due.
            tokio::select! {
                _ = tokio::time::sleep(IDLE_POLL) => {}
                Ok(()) = wake.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Start one delivery loop per configured subscriber, after making the store's subscriber list
/// the configured one.
pub async fn start(
    outbox: Arc<dyn EventOutbox>,
    settings: &EventsSettings,
    wake: tokio::sync::watch::Receiver<u64>,
    shutdown: pingora::server::ShutdownWatch,
) {
    let declared: Vec<(String, String)> =
        settings.subscribers.iter().map(|s| (s.name.clone(), s.type_filter())).collect();
    loop {
        match outbox.set_subscribers(&declared).await {
            Ok(0) => break,
            Ok(dropped) => {
                tracing::warn!(
                    dropped,
                    "subscribers removed from causeway.yaml: their undelivered events were dropped"
                );
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record the event subscribers; retrying in 5 s");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
    let metrics = Metrics::global();
    for subscriber in &settings.subscribers {
        // Every subscriber's series exist from the start (rates and alerts over them).
        let name = [subscriber.name.as_str()];
        metrics.events_delivered.with_label_values(&name);
        metrics.event_delivery_failures.with_label_values(&name);
        metrics.events_dead_lettered.with_label_values(&name);
        metrics.invoice_sync_latency.with_label_values(&name);
        for state in ["pending", "dead"] {
            metrics.events_undelivered.with_label_values(&[name[0], state]);
        }
        tokio::spawn(run_subscriber(
            outbox.clone(),
            settings.source.clone(),
            subscriber.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
    }
    let mut shutdown = shutdown;
    let mut purged_at = tokio::time::Instant::now();
    loop {
        if purged_at.elapsed() >= PURGE_EVERY {
            purged_at = tokio::time::Instant::now();
            purge(outbox.as_ref()).await;
        }
        if let Ok(backlog) = outbox.delivery_backlog().await {
            let gauge = &Metrics::global().events_undelivered;
            for (name, pending, dead) in backlog {
                gauge.with_label_values(&[&name, "pending"]).set(pending);
                gauge.with_label_values(&[&name, "dead"]).set(dead);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(GAUGE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How a subscriber's events leave.
enum Sender {
    Webhook { client: reqwest::Client, url: String, secrets: Vec<crate::config::events::Secret> },
    Salesforce(super::salesforce::Writer),
    Nats(super::nats::Publisher),
}

/// Why an attempt failed, and whether trying again can help.
pub struct Failure {
    pub message: String,
    /// Trying again cannot succeed (the event is dead-lettered at once).
    pub permanent: bool,
}

impl Failure {
    pub fn retry(message: String) -> Failure {
        Failure { message, permanent: false }
    }
}

/// The first [`ERROR_EXCERPT`] characters of a refusal's body: a peer may send any amount.
pub async fn excerpt(mut r: reqwest::Response) -> String {
    let mut head = Vec::new();
    while head.len() < ERROR_EXCERPT * 4 {
        match r.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).chars().take(ERROR_EXCERPT).collect()
}

/// POST the CloudEvent, signed.
async fn post_webhook(
    client: &reqwest::Client,
    url: &str,
    secrets: &[crate::config::events::Secret],
    source: &str,
    timeout: Duration,
    event: &super::StoredEvent,
    traceparent: Option<&str>,
) -> Option<Failure> {
    let body = match serde_json::to_vec(&envelope(source, event)) {
        Ok(b) => b,
        Err(e) => return Some(Failure::retry(e.to_string())),
    };
    let timestamp = now_ms() / 1000;
    let signature = webhook::signature(secrets, &event.id, timestamp, &body);
    let mut request = client.post(url);
    // The subscriber's own span of the request continues this attempt's.
    if let Some(tp) = traceparent {
        request = request.header(crate::observe::correlation::TRACEPARENT_HEADER, tp);
    }
    let sent = request
        .header("content-type", CLOUDEVENTS_JSON)
        .header("webhook-id", &event.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => None,
        Ok(r) => {
            let status = r.status().as_u16();
            Some(Failure::retry(format!("the subscriber answered {status}: {}", excerpt(r).await)))
        }
        Err(e) if e.is_timeout() => {
            Some(Failure::retry(format!("no answer within {} ms", timeout.as_millis())))
        }
        Err(e) => Some(Failure::retry(format!("cannot reach the subscriber: {e}"))),
    }
}

/// One attempt: the outcome is recorded, never lost; a store error leaves the lease to expire,
/// and the event is sent again then (receivers dedupe on `webhook-id`).
async fn deliver(
    sender: &Sender,
    outbox: &dyn EventOutbox,
    source: &str,
    subscriber: &SubscriberSettings,
    delivery: Delivery,
) {
    let metrics = Metrics::global();
    let name = subscriber.name.as_str();
    let event = &delivery.event;
    let mut span = attempt_span(name, &delivery);
    let error = match sender {
        Sender::Webhook { client, url, secrets } => {
            // The attempt's span when it is recorded; else the order's context as it stands
            // (an unsampled trace is still propagated, flagged 00, as W3C asks).
            let traceparent =
                span.traceparent().or_else(|| Some(event.traceparent.clone()).filter(|t| !t.is_empty()));
            post_webhook(client, url, secrets, source, subscriber.timeout, event, traceparent.as_deref())
                .await
        }
        Sender::Salesforce(writer) => writer.write(event).await,
        Sender::Nats(publisher) => publisher.publish(source, event).await,
    };
    match &error {
        None => span.succeed(),
        Some(failure) => span.fail(failure.message.clone()),
    }
    span.end();
    let outcome = match error {
        None => {
            metrics.events_delivered.with_label_values(&[name]).inc();
            let lag = (now_ms() - event.time_ms).max(0) as f64 / 1000.0;
            metrics.event_delivery_lag.with_label_values(&[name]).observe(lag);
            if let Some(posted) = invoice_posted_ms(event) {
                let latency = (now_ms() - posted).max(0) as f64 / 1000.0;
                metrics.invoice_sync_latency.with_label_values(&[name]).observe(latency);
            }
            Attempted::Delivered
        }
        Some(Failure { message: error, permanent }) => {
            metrics.event_delivery_failures.with_label_values(&[name]).inc();
            let age = Duration::from_millis((now_ms() - event.time_ms).max(0) as u64);
            if permanent || age >= subscriber.dead_letter_after {
                metrics.events_dead_lettered.with_label_values(&[name]).inc();
                tracing::warn!(subscriber = name, event = %event.id, order = %event.order_id, %error, "event dead-lettered: replay it from /admin/events/dead-letters");
                Attempted::Dead(error)
            } else {
                let doublings = delivery.attempts.clamp(0, 30) as u32;
                let delay = backoff(subscriber.backoff_initial, subscriber.backoff_max, doublings);
                tracing::info!(subscriber = name, event = %event.id, %error, retry_in_ms = delay.as_millis() as u64, "event delivery failed; will retry");
                Attempted::RetryAt(now_ms() + delay.as_millis() as i64, error)
            }
        }
    };
    if let Err(e) = outbox.record_attempt(name, event.seq, outcome).await {
        tracing::warn!(subscriber = name, event = %event.id, error = %e, "cannot record a delivery; it is sent again when its lease ends");
    }
}

/// The span of one delivery attempt, a child of the order's gateway span (so an order's trace
/// holds its request, its ERP exchanges and every attempt to tell each subscriber).
fn attempt_span(subscriber: &str, delivery: &Delivery) -> Span {
    let event = &delivery.event;
    let mut span = Span::child_of(&event.traceparent, format!("deliver {}", event.kind), SpanKind::Producer);
    if span.is_recording() {
        span.attr("causeway.subscriber", subscriber.to_string());
        span.attr("cloudevents.event_id", event.id.clone());
        span.attr("cloudevents.event_type", event.kind.clone());
        span.attr("causeway.order_id", event.order_id.clone());
        span.attr("causeway.attempt", delivery.attempts + 1);
    }
    span
}

/// When the ERP posted the invoice of an `invoice.issued.v1` event (its `erpModifiedAt`).
fn invoice_posted_ms(event: &super::StoredEvent) -> Option<i64> {
    if event.kind != "invoice.issued.v1" {
        return None;
    }
    let data: serde_json::Value = serde_json::from_str(&event.data).ok()?;
    crate::clock::parse_rfc3339(data["erpModifiedAt"].as_str()?).ok()
}
