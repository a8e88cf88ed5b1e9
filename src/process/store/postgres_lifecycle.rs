//! Order milestones and seen notifications on PostgreSQL ([`super::lifecycle`]); the
//! milestones' events are written by the `order_milestones_events` trigger
//! (`postgres::LIFECYCLE`). Replicas share both, so a notification one replica saw is a repeat
//! at every other.

use super::lifecycle::{Milestone, OrderLifecycle, TrackedOrder};
use super::postgres::PostgresStore;
use super::{now_ms, StoreError};
use sqlx::Row;

/// Accepted orders with their milestones so far; each query adds its condition.
macro_rules! tracked {
    () => {
        "SELECT o.id, o.erp_order_id, o.erp_order_number,
        COALESCE((SELECT string_agg(kind, ',') FROM order_milestones m WHERE m.order_id = o.id), '')
    FROM orders o WHERE o.state = 'accepted' AND o.erp_order_id IS NOT NULL"
    };
}

fn tracked_row(r: &sqlx::postgres::PgRow) -> Result<TrackedOrder, StoreError> {
    let milestones: String = r.try_get(3)?;
    Ok(TrackedOrder {
        id: r.try_get(0)?,
        erp_order_id: r.try_get(1)?,
        erp_order_number: r.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
        milestones: milestones.split(',').filter(|m| !m.is_empty()).map(str::to_string).collect(),
    })
}

fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

#[async_trait::async_trait]
impl OrderLifecycle for PostgresStore {
    async fn tracked(
        &self,
        erp_id: Option<&str>,
        erp_number: Option<&str>,
    ) -> Result<Option<TrackedOrder>, StoreError> {
        let row = match (erp_id, erp_number) {
            (Some(id), _) => {
                sqlx::query(concat!(tracked!(), " AND o.erp_order_id = $1"))
                    .bind(text(id))
                    .fetch_optional(self.pool())
                    .await?
            }
            (None, Some(number)) => {
                sqlx::query(concat!(tracked!(), " AND o.erp_order_number = $1"))
                    .bind(text(number))
                    .fetch_optional(self.pool())
                    .await?
            }
            (None, None) => None,
        };
        row.as_ref().map(tracked_row).transpose()
    }

    async fn unfinished(&self, after: &str, limit: i64) -> Result<Vec<TrackedOrder>, StoreError> {
        let rows = sqlx::query(concat!(
            tracked!(),
            " AND o.id > $1 AND NOT EXISTS (SELECT 1 FROM order_milestones m WHERE m.order_id = o.id
                AND m.kind IN ('payment.received.v1', 'order.cancelled.v1'))
             ORDER BY o.id LIMIT $2"
        ))
        .bind(text(after))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(tracked_row).collect()
    }

    async fn record_milestones(
        &self,
        order_id: &str,
        milestones: &[Milestone],
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let mut recorded = Vec::new();
        for m in milestones {
            let inserted = sqlx::query(
                "INSERT INTO order_milestones (order_id, kind, at, data)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM orders WHERE id = $1 AND state = 'accepted')
                 ON CONFLICT (order_id, kind) DO NOTHING",
            )
            .bind(text(order_id))
            .bind(m.kind)
            .bind(now_ms())
            // jsonb cannot hold U+0000 even escaped; an ERP's text may.
            .bind(text(&m.data).replace("\\u0000", "\\ufffd"))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                recorded.push(m.kind.to_string());
            }
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn first_sight(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        // One statement: the keys that were new come back.
        let keys: Vec<String> = keys.iter().map(|k| text(k)).collect();
        let new: std::collections::HashSet<String> = sqlx::query_scalar(
            "INSERT INTO erp_notifications (key, seen_at) SELECT k, $2 FROM unnest($1::text[]) AS k
             ON CONFLICT (key) DO NOTHING RETURNING key",
        )
        .bind(&keys)
        .bind(now_ms())
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .collect();
        Ok(keys.iter().map(|k| new.contains(k)).collect())
    }

    async fn forget_sightings(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM erp_notifications WHERE key IN
                (SELECT key FROM erp_notifications WHERE seen_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    async fn cursor(&self, source: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT position FROM change_cursors WHERE source = $1")
            .bind(text(source))
            .fetch_optional(self.pool())
            .await?)
    }

    async fn set_cursor(&self, source: &str, position: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO change_cursors (source, position) VALUES ($1, $2)
             ON CONFLICT (source) DO UPDATE SET position = excluded.position",
        )
        .bind(text(source))
        .bind(text(position))
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
