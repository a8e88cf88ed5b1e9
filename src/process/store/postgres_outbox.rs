//! The event outbox on PostgreSQL ([`super::outbox`]): the events and their deliveries are
//! written by the orders table's trigger (`postgres::OUTBOX`); replicas lease deliveries with
//! `FOR UPDATE SKIP LOCKED`, so each is sent by one replica at a time, one order's in order.

use super::outbox::{Attempted, DeadDelivery, Delivery, EventOutbox, StoredEvent};
use super::postgres::PostgresStore;
use super::{now_ms, StoreError};
use sqlx::Row;
use std::time::Duration;

/// PostgreSQL's text cannot hold NUL (a subscriber's error message may).
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

#[async_trait::async_trait]
impl EventOutbox for PostgresStore {
    async fn set_subscribers(&self, subscribers: &[(String, String)]) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        for (name, types) in subscribers {
            sqlx::query(
                "INSERT INTO event_subscribers (name, types) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET types = excluded.types",
            )
            .bind(name)
            .bind(types)
            .execute(&mut *tx)
            .await?;
        }
        let names: Vec<String> = subscribers.iter().map(|(n, _)| n.clone()).collect();
        let dropped = sqlx::query(
            "DELETE FROM event_deliveries WHERE state <> 'delivered' AND NOT (subscriber = ANY($1))",
        )
        .bind(&names)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM event_subscribers WHERE NOT (name = ANY($1))")
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    async fn claim_deliveries(
        &self,
        subscriber: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let now = now_ms();
        let claimed: Vec<(i64, i64)> = sqlx::query(
            "WITH due AS (
                SELECT d.subscriber, d.seq FROM event_deliveries d
                WHERE d.subscriber = $1 AND d.state = 'pending' AND d.next_attempt_at <= $2
                  AND d.lease_until <= $2
                  AND NOT EXISTS (SELECT 1 FROM event_deliveries e
                      WHERE e.subscriber = d.subscriber AND e.order_id = d.order_id
                        AND e.seq < d.seq AND e.state <> 'delivered')
                ORDER BY d.next_attempt_at LIMIT $3 FOR UPDATE OF d SKIP LOCKED)
             UPDATE event_deliveries d SET lease_until = $2 + $4, lease_owner = $5 FROM due
             WHERE d.subscriber = due.subscriber AND d.seq = due.seq
             RETURNING d.seq, d.attempts",
        )
        .bind(subscriber)
        .bind(now)
        .bind(limit)
        .bind(lease.as_millis() as i64)
        .bind(self.instance_name())
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()?;
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<i64> = claimed.iter().map(|(s, _)| *s).collect();
        let rows = sqlx::query(
            "SELECT e.seq, e.id, e.order_id, e.type, e.at, e.data, COALESCE(o.traceparent, '') AS traceparent
             FROM events e LEFT JOIN orders o ON o.id = e.order_id WHERE e.seq = ANY($1) ORDER BY e.seq",
        )
        .bind(&seqs)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let attempts = claimed.iter().find(|(s, _)| *s == seq).map_or(0, |(_, a)| *a);
            out.push(Delivery {
                subscriber: subscriber.to_string(),
                attempts,
                event: StoredEvent {
                    seq,
                    id: row.try_get("id")?,
                    order_id: row.try_get("order_id")?,
                    kind: row.try_get("type")?,
                    time_ms: row.try_get("at")?,
                    data: row.try_get("data")?,
                    traceparent: row.try_get("traceparent")?,
                },
            });
        }
        Ok(out)
    }

    async fn record_attempt(&self, subscriber: &str, seq: i64, outcome: Attempted) -> Result<(), StoreError> {
        let (state, next, error) = match &outcome {
            Attempted::Delivered => ("delivered", None, None),
            Attempted::RetryAt(at, error) => ("pending", Some(*at), Some(text(error))),
            Attempted::Dead(error) => ("dead", None, Some(text(error))),
        };
        sqlx::query(
            "UPDATE event_deliveries SET state = $1, attempts = attempts + 1, lease_until = 0,
                next_attempt_at = COALESCE($2, next_attempt_at), last_error = COALESCE($3, last_error),
                delivered_at = CASE WHEN $1 = 'delivered' THEN $4 ELSE delivered_at END
             WHERE subscriber = $5 AND seq = $6 AND state = 'pending'",
        )
        .bind(state)
        .bind(next)
        .bind(error)
        .bind(now_ms())
        .bind(subscriber)
        .bind(seq)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn dead_deliveries(&self, limit: i64) -> Result<Vec<DeadDelivery>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.subscriber, e.id, e.type, e.order_id, d.attempts, COALESCE(d.last_error, '') AS last_error, e.at
             FROM event_deliveries d JOIN events e ON e.seq = d.seq
             WHERE d.state = 'dead' ORDER BY d.seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadDelivery {
                    subscriber: r.try_get(0)?,
                    event_id: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    order_id: r.try_get(3)?,
                    attempts: r.try_get(4)?,
                    last_error: r.try_get(5)?,
                    time_ms: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn replay_deliveries(&self, event_id: Option<&str>) -> Result<u64, StoreError> {
        let replayed = sqlx::query(
            "UPDATE event_deliveries SET state = 'pending', attempts = 0, next_attempt_at = $1, lease_until = 0
             WHERE state = 'dead' AND ($2::text IS NULL OR seq IN (SELECT seq FROM events WHERE id = $2))",
        )
        .bind(now_ms())
        .bind(event_id.map(text))
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(replayed)
    }

    async fn purge_delivered(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        let deliveries = sqlx::query(
            "DELETE FROM event_deliveries WHERE ctid IN (SELECT ctid FROM event_deliveries
                WHERE state = 'delivered' AND delivered_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected();
        let events = sqlx::query(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE e.at < $1
                AND NOT EXISTS (SELECT 1 FROM event_deliveries d WHERE d.seq = e.seq) LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(deliveries + events)
    }

    async fn delivery_backlog(&self) -> Result<Vec<(String, i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name,
                (SELECT COUNT(*) FROM event_deliveries d WHERE d.subscriber = s.name AND d.state = 'pending'),
                (SELECT COUNT(*) FROM event_deliveries d WHERE d.subscriber = s.name AND d.state = 'dead')
             FROM event_subscribers s ORDER BY s.name",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
