//! The event outbox on SQLite ([`super::outbox`]): the events and their deliveries are written
//! by the orders table's triggers (`sqlite::OUTBOX`); this leases and settles the deliveries.

use super::outbox::{Attempted, DeadDelivery, Delivery, EventOutbox, StoredEvent};
use super::sqlite::SqliteStore;
use super::{now_ms, StoreError};
use rusqlite::params;
use std::time::Duration;

#[async_trait::async_trait]
impl EventOutbox for SqliteStore {
    async fn set_subscribers(&self, subscribers: &[(String, String)]) -> Result<u64, StoreError> {
        let subscribers = subscribers.to_vec();
        self.write(move |conn| {
            let mut upsert = conn.prepare_cached(
                "INSERT INTO event_subscribers (name, types) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET types = excluded.types",
            )?;
            for (name, types) in &subscribers {
                upsert.execute(params![name, types])?;
            }
            let names = serde_json::to_string(&subscribers.iter().map(|(n, _)| n).collect::<Vec<_>>())
                .map_err(|e| StoreError(e.to_string()))?;
            let dropped = conn
                .prepare_cached(
                    "DELETE FROM event_deliveries WHERE state <> 'delivered'
                     AND subscriber NOT IN (SELECT value FROM json_each(?1))",
                )?
                .execute([&names])? as u64;
            conn.prepare_cached(
                "DELETE FROM event_subscribers WHERE name NOT IN (SELECT value FROM json_each(?1))",
            )?
            .execute([&names])?;
            Ok(dropped)
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        subscriber: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StoreError> {
        let subscriber = subscriber.to_owned();
        let lease = lease.as_millis() as i64;
        let instance = self.instance_name().to_string();
        self.write(move |conn| {
            let now = now_ms();
            let mut claim = conn.prepare_cached(
                "UPDATE event_deliveries SET lease_until = ?1 + ?2, lease_owner = ?5
                 WHERE subscriber = ?3 AND seq IN (
                    SELECT d.seq FROM event_deliveries d
                    WHERE d.subscriber = ?3 AND d.state = 'pending' AND d.next_attempt_at <= ?1
                      AND d.lease_until <= ?1
                      AND NOT EXISTS (SELECT 1 FROM event_deliveries e
                          WHERE e.subscriber = d.subscriber AND e.order_id = d.order_id
                            AND e.seq < d.seq AND e.state <> 'delivered')
                    ORDER BY d.next_attempt_at LIMIT ?4)
                 RETURNING seq, attempts",
            )?;
            let claimed: Vec<(i64, i64)> = claim
                .query_map(params![now, lease, subscriber, limit, instance], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut event = conn.prepare_cached(
                "SELECT e.id, e.order_id, e.type, e.at, e.data, COALESCE(o.traceparent, '')
                 FROM events e LEFT JOIN orders o ON o.id = e.order_id WHERE e.seq = ?",
            )?;
            let mut out = Vec::with_capacity(claimed.len());
            for (seq, attempts) in claimed {
                let event = event.query_row([seq], |r| {
                    Ok(StoredEvent {
                        seq,
                        id: r.get(0)?,
                        order_id: r.get(1)?,
                        kind: r.get(2)?,
                        time_ms: r.get(3)?,
                        data: r.get(4)?,
                        traceparent: r.get(5)?,
                    })
                })?;
                out.push(Delivery { subscriber: subscriber.clone(), attempts, event });
            }
            out.sort_by_key(|d| d.event.seq);
            Ok(out)
        })
        .await
    }

    async fn record_attempt(&self, subscriber: &str, seq: i64, outcome: Attempted) -> Result<(), StoreError> {
        let subscriber = subscriber.to_owned();
        self.write(move |conn| {
            let now = now_ms();
            let (state, next, error) = match &outcome {
                Attempted::Delivered => ("delivered", None, None),
                Attempted::RetryAt(at, error) => ("pending", Some(*at), Some(error.as_str())),
                Attempted::Dead(error) => ("dead", None, Some(error.as_str())),
            };
            conn.prepare_cached(
                "UPDATE event_deliveries SET state = ?1, attempts = attempts + 1, lease_until = 0,
                    next_attempt_at = COALESCE(?2, next_attempt_at), last_error = COALESCE(?3, last_error),
                    delivered_at = CASE WHEN ?1 = 'delivered' THEN ?4 ELSE delivered_at END
                 WHERE subscriber = ?5 AND seq = ?6 AND state = 'pending'",
            )?
            .execute(params![state, next, error, now, subscriber, seq])?;
            Ok(())
        })
        .await
    }

    async fn dead_deliveries(&self, limit: i64) -> Result<Vec<DeadDelivery>, StoreError> {
        self.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT d.subscriber, e.id, e.type, e.order_id, d.attempts, COALESCE(d.last_error, ''), e.at
                 FROM event_deliveries d JOIN events e ON e.seq = d.seq
                 WHERE d.state = 'dead' ORDER BY d.seq LIMIT ?",
            )?;
            let rows = select.query_map([limit], |r| {
                Ok(DeadDelivery {
                    subscriber: r.get(0)?,
                    event_id: r.get(1)?,
                    kind: r.get(2)?,
                    order_id: r.get(3)?,
                    attempts: r.get(4)?,
                    last_error: r.get(5)?,
                    time_ms: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn replay_deliveries(&self, event_id: Option<&str>) -> Result<u64, StoreError> {
        let event_id = event_id.map(str::to_owned);
        self.write(move |conn| {
            let replayed = conn
                .prepare_cached(
                    "UPDATE event_deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?1,
                        lease_until = 0
                     WHERE state = 'dead' AND (?2 IS NULL OR seq IN (SELECT seq FROM events WHERE id = ?2))",
                )?
                .execute(params![now_ms(), event_id])?;
            Ok(replayed as u64)
        })
        .await
    }

    async fn purge_delivered(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let deliveries = conn
                .prepare_cached(
                    "DELETE FROM event_deliveries WHERE rowid IN (SELECT rowid FROM event_deliveries
                        WHERE state = 'delivered' AND delivered_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit])?;
            let events = conn
                .prepare_cached(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events e WHERE e.at < ?1
                        AND NOT EXISTS (SELECT 1 FROM event_deliveries d WHERE d.seq = e.seq) LIMIT ?2)",
                )?
                .execute(params![before, limit])?;
            Ok((deliveries + events) as u64)
        })
        .await
    }

    async fn delivery_backlog(&self) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.read(|conn| {
            let mut select = conn.prepare_cached(
                "SELECT s.name,
                    (SELECT COUNT(*) FROM event_deliveries d WHERE d.subscriber = s.name AND d.state = 'pending'),
                    (SELECT COUNT(*) FROM event_deliveries d WHERE d.subscriber = s.name AND d.state = 'dead')
                 FROM event_subscribers s ORDER BY s.name",
            )?;
            let rows = select.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}
