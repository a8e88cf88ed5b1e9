//! Order milestones and seen notifications on SQLite ([`super::lifecycle`]); the milestones'
//! events are written by the `order_milestone_event` trigger (`sqlite::LIFECYCLE`).

use super::lifecycle::{Milestone, OrderLifecycle, TrackedOrder};
use super::sqlite::SqliteStore;
use super::{now_ms, StoreError};
use rusqlite::{params, OptionalExtension};

/// Accepted orders with their milestones so far; each query adds its condition.
macro_rules! tracked {
    () => {
        "SELECT o.id, o.erp_order_id, o.erp_order_number,
        COALESCE((SELECT group_concat(kind) FROM order_milestones m WHERE m.order_id = o.id), '')
    FROM orders o WHERE o.state = 'accepted' AND o.erp_order_id IS NOT NULL"
    };
}

fn tracked_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TrackedOrder> {
    let milestones: String = r.get(3)?;
    Ok(TrackedOrder {
        id: r.get(0)?,
        erp_order_id: r.get(1)?,
        erp_order_number: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
        milestones: milestones.split(',').filter(|m| !m.is_empty()).map(str::to_string).collect(),
    })
}

#[async_trait::async_trait]
impl OrderLifecycle for SqliteStore {
    async fn tracked(
        &self,
        erp_id: Option<&str>,
        erp_number: Option<&str>,
    ) -> Result<Option<TrackedOrder>, StoreError> {
        let (erp_id, erp_number) = (erp_id.map(str::to_owned), erp_number.map(str::to_owned));
        self.read(move |conn| {
            let found = match (&erp_id, &erp_number) {
                (Some(id), _) => conn
                    .prepare_cached(concat!(tracked!(), " AND o.erp_order_id = ?1"))?
                    .query_row([id], tracked_row)
                    .optional()?,
                (None, Some(number)) => conn
                    .prepare_cached(concat!(tracked!(), " AND o.erp_order_number = ?1"))?
                    .query_row([number], tracked_row)
                    .optional()?,
                (None, None) => None,
            };
            Ok(found)
        })
        .await
    }

    async fn unfinished(&self, after: &str, limit: i64) -> Result<Vec<TrackedOrder>, StoreError> {
        let after = after.to_owned();
        self.read(move |conn| {
            let mut select = conn.prepare_cached(concat!(
                tracked!(),
                " AND o.id > ?1 AND NOT EXISTS (SELECT 1 FROM order_milestones m WHERE m.order_id = o.id
                    AND m.kind IN ('payment.received.v1', 'order.cancelled.v1'))
                 ORDER BY o.id LIMIT ?2"
            ))?;
            let rows = select.query_map(params![after, limit], tracked_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn record_milestones(
        &self,
        order_id: &str,
        milestones: &[Milestone],
    ) -> Result<Vec<String>, StoreError> {
        let (order_id, milestones) = (order_id.to_owned(), milestones.to_vec());
        self.write(move |conn| {
            let mut insert = conn.prepare_cached(
                "INSERT INTO order_milestones (order_id, kind, at, data)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM orders WHERE id = ?1 AND state = 'accepted')
                 ON CONFLICT (order_id, kind) DO NOTHING",
            )?;
            let mut recorded = Vec::new();
            for m in &milestones {
                if insert.execute(params![order_id, m.kind, now_ms(), m.data])? == 1 {
                    recorded.push(m.kind.to_string());
                }
            }
            Ok(recorded)
        })
        .await
    }

    async fn first_sight(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let keys = keys.to_vec();
        self.write(move |conn| {
            let mut insert = conn.prepare_cached(
                "INSERT INTO erp_notifications (key, seen_at) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            )?;
            let now = now_ms();
            keys.iter().map(|key| Ok(insert.execute(params![key, now])? == 1)).collect()
        })
        .await
    }

    async fn forget_sightings(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        self.write(move |conn| {
            Ok(conn
                .prepare_cached(
                    "DELETE FROM erp_notifications WHERE key IN
                        (SELECT key FROM erp_notifications WHERE seen_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit])? as u64)
        })
        .await
    }

    async fn cursor(&self, source: &str) -> Result<Option<String>, StoreError> {
        let source = source.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT position FROM change_cursors WHERE source = ?1")?
                .query_row([&source], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn set_cursor(&self, source: &str, position: &str) -> Result<(), StoreError> {
        let (source, position) = (source.to_owned(), position.to_owned());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO change_cursors (source, position) VALUES (?1, ?2)
                 ON CONFLICT (source) DO UPDATE SET position = excluded.position",
            )?
            .execute(params![source, position])?;
            Ok(())
        })
        .await
    }
}
