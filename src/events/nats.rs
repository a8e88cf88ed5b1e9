//! The NATS JetStream subscriber: each event is published as its CloudEvent (structured JSON)
//! to `<subject_prefix>.<type>` in a stream per environment, with the event id as
//! `Nats-Msg-Id` (JetStream drops a repeat within its duplicate window) and delivered once
//! JetStream acknowledged it stored. The stream is created on first connection when it does not
//! exist (file storage, the prefix's subjects, a two-minute duplicate window). One order's
//! events are published in order (the outbox leases them one at a time), so the stream holds
//! them in order.

use super::dispatch::{Failure, CLOUDEVENTS_JSON};
use super::{envelope, StoredEvent};
use crate::config::events::NatsSettings;
use async_nats::jetstream;
use std::time::Duration;

/// JetStream drops a message whose `Nats-Msg-Id` it stored this recently.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

pub struct Publisher {
    settings: NatsSettings,
    timeout: Duration,
    context: tokio::sync::OnceCell<jetstream::Context>,
}

impl Publisher {
    pub fn new(settings: NatsSettings, timeout: Duration) -> Publisher {
        Publisher { settings, timeout, context: tokio::sync::OnceCell::new() }
    }

    /// Connected, with the stream in place (tried again at the next event when it fails).
    async fn context(&self) -> Result<&jetstream::Context, Failure> {
        self.context
            .get_or_try_init(|| async {
                let mut options = async_nats::ConnectOptions::new()
                    .connection_timeout(self.timeout)
                    .request_timeout(Some(self.timeout))
                    .name("causeway");
                if let Some(token) = &self.settings.token {
                    options = options.token(token.clone());
                }
                let client = options.connect(self.settings.url.as_str()).await.map_err(|e| {
                    Failure::retry(format!("cannot connect to NATS at {}: {e}", self.settings.url))
                })?;
                let context = jetstream::new(client);
                let config = jetstream::stream::Config {
                    name: self.settings.stream.clone(),
                    subjects: vec![format!("{}.>", self.settings.subject_prefix)],
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                };
                context.get_or_create_stream(config).await.map_err(|e| {
                    Failure::retry(format!(
                        "cannot find or create the JetStream stream `{}`: {e}",
                        self.settings.stream
                    ))
                })?;
                Ok(context)
            })
            .await
    }

    /// Publish the event and wait for JetStream's acknowledgement; `None` once stored.
    pub async fn publish(&self, source: &str, event: &StoredEvent) -> Option<Failure> {
        let context = match self.context().await {
            Ok(c) => c,
            Err(f) => return Some(f),
        };
        let body = match serde_json::to_vec(&envelope(source, event)) {
            Ok(b) => b,
            Err(e) => return Some(Failure::retry(e.to_string())),
        };
        let subject = format!("{}.{}", self.settings.subject_prefix, event.kind);
        let message = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(&event.id)
            .header("content-type", CLOUDEVENTS_JSON);
        let acknowledged = async { context.send_publish(subject.clone(), message).await?.await };
        match tokio::time::timeout(self.timeout, acknowledged).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(Failure::retry(format!("JetStream did not store `{subject}`: {e}"))),
            Err(_) => Some(Failure::retry(format!(
                "no JetStream acknowledgement within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}
