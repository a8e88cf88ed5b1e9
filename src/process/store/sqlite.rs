//! The order store in one SQLite file (WAL): orders with their timestamped transitions, and
//! idempotency keys with their stored responses.
//!
//! One node owns the file; during a graceful upgrade two processes share it for a moment, so
//! every lease and in-flight key records the process that holds it ([`instance`]), and recovery
//! takes back only what expired or belongs to a process that is gone. Every write goes through a
//! single connection, so writers never contend for SQLite's lock (no `SQLITE_BUSY` under load);
//! reads share a small pool. Each call
//! is one statement where it can be (the history is written by triggers): every statement is a
//! round trip to the connection's thread, and those hops are most of an order's cost.

use super::{now_ms, Change, KeyState, NewOrder, OrderRecord, OrderStore, StoreError, Transition};
use crate::config::spec::Synchronous;
use crate::process::instance;
use crate::process::state::State;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS orders (
        id TEXT PRIMARY KEY,
        opportunity_id TEXT NOT NULL,
        state TEXT NOT NULL,
        quote TEXT NOT NULL,
        validated INTEGER NOT NULL,
        erp_order_id TEXT,
        erp_order_number TEXT,
        reason TEXT,
        violations TEXT,
        correlation_id TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        lease_until INTEGER NOT NULL DEFAULT 0,
        received_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL)",
    // One live order per opportunity: a rejected quote may be fixed and submitted again.
    "CREATE UNIQUE INDEX IF NOT EXISTS orders_live_opportunity ON orders(opportunity_id)
        WHERE state <> 'rejected'",
    "CREATE INDEX IF NOT EXISTS orders_due ON orders(state, next_attempt_at)",
    "CREATE TABLE IF NOT EXISTS transitions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS transitions_order ON transitions(order_id, seq)",
    // The history is written by the database in the same statement as the change, so a state
    // change and its record cannot part, and each takes one round trip to SQLite's thread.
    "CREATE TRIGGER IF NOT EXISTS orders_history_insert AFTER INSERT ON orders BEGIN
        INSERT INTO transitions (order_id, at, from_state, to_state, reason)
        VALUES (NEW.id, NEW.updated_at, NULL, NEW.state, NEW.reason);
     END",
    "CREATE TRIGGER IF NOT EXISTS orders_history_update AFTER UPDATE OF state ON orders BEGIN
        INSERT INTO transitions (order_id, at, from_state, to_state, reason)
        VALUES (NEW.id, NEW.updated_at, OLD.state, NEW.state, NEW.reason);
     END",
    "CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        in_flight INTEGER NOT NULL,
        status INTEGER,
        location TEXT,
        body BLOB,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL)",
];

/// Schema changes after the first version, applied once each (`PRAGMA user_version` counts them).
const MIGRATIONS: &[&[&str]] = &[&[
    // Orders belong to the consumer that submitted them (`policy/consumer`).
    "ALTER TABLE orders ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    // Leases and in-flight keys name the process that holds them.
    "ALTER TABLE orders ADD COLUMN lease_owner TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE idempotency_keys ADD COLUMN holder TEXT NOT NULL DEFAULT ''",
    // A change to the state the order is already in (another retry) counts on the last entry
    // instead of adding one per retry.
    "ALTER TABLE transitions ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE transitions ADD COLUMN last_at INTEGER",
    "DROP TRIGGER IF EXISTS orders_history_update",
    "CREATE TRIGGER orders_history_update AFTER UPDATE OF state ON orders
        WHEN OLD.state <> NEW.state BEGIN
        INSERT INTO transitions (order_id, at, from_state, to_state, reason)
        VALUES (NEW.id, NEW.updated_at, OLD.state, NEW.state, NEW.reason);
     END",
    "CREATE TRIGGER orders_history_repeat AFTER UPDATE OF state ON orders
        WHEN OLD.state = NEW.state BEGIN
        UPDATE transitions SET repeats = repeats + 1, last_at = NEW.updated_at, reason = NEW.reason
        WHERE seq = (SELECT MAX(seq) FROM transitions WHERE order_id = NEW.id);
     END",
    "CREATE INDEX IF NOT EXISTS orders_lease_owner ON orders(lease_owner) WHERE lease_until > 0",
]];

#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// This process, as named on the leases and keys it holds.
    instance: std::sync::Arc<str>,
}

fn row_to_order(row: &sqlx::sqlite::SqliteRow) -> Result<OrderRecord, StoreError> {
    let state: String = row.try_get("state")?;
    Ok(OrderRecord {
        id: row.try_get("id")?,
        opportunity_id: row.try_get("opportunity_id")?,
        state: State::from_str(&state).map_err(StoreError)?,
        quote: row.try_get("quote")?,
        validated: row.try_get::<i64, _>("validated")? != 0,
        erp_order_id: row.try_get("erp_order_id")?,
        erp_order_number: row.try_get("erp_order_number")?,
        reason: row.try_get("reason")?,
        violations: row.try_get("violations")?,
        correlation_id: row.try_get("correlation_id")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        received_at: row.try_get("received_at")?,
        updated_at: row.try_get("updated_at")?,
        owner: row.try_get("owner")?,
    })
}

/// Apply the migrations this file has not seen yet, each in one transaction.
async fn migrate(writer: &SqlitePool) -> Result<(), StoreError> {
    let version: i64 = sqlx::query("PRAGMA user_version").fetch_one(writer).await?.try_get(0)?;
    for (i, steps) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let mut tx = writer.begin().await?;
        for statement in *steps {
            sqlx::query(*statement).execute(&mut *tx).await?;
        }
        // PRAGMA takes no bound parameters; the number is ours.
        let set_version = sqlx::AssertSqlSafe(format!("PRAGMA user_version = {}", i + 1));
        sqlx::query(set_version).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(())
}

impl SqliteStore {
    /// Open (creating it and its directory when missing) and bring the schema up to date.
    pub async fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + FULL: a commit is on disk before the caller hears 201/202, so an
            // acknowledged order survives a power loss. NORMAL survives a process crash only.
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        for statement in SCHEMA {
            sqlx::query(*statement).execute(&writer).await?;
        }
        migrate(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { writer, reader, instance: instance::current().into() })
    }

    /// This store as used by another process named `instance` (`pid:start`): for tests and
    /// tools that act for a process that is gone or another that runs.
    pub fn as_process(mut self, instance: &str) -> SqliteStore {
        self.instance = instance.into();
        self
    }

    /// The `PRAGMA synchronous` level in force (2 = FULL, 1 = NORMAL).
    pub async fn synchronous_level(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("PRAGMA synchronous").fetch_one(&self.writer).await?;
        Ok(row.try_get::<i64, _>(0)?)
    }
}

#[async_trait::async_trait]
impl OrderStore for SqliteStore {
    /// Take back what a process that is gone left behind: its delivery leases (an order it was
    /// submitting is retried only after `settle`, the longest its last ERP request could still
    /// be under way) and its in-flight idempotency keys. What a live process holds (the old one
    /// during a graceful upgrade) is left alone. Returns how many orders were released.
    async fn recover(&self, settle: Duration) -> Result<u64, StoreError> {
        let holders: Vec<String> = sqlx::query(
            "SELECT DISTINCT lease_owner FROM orders WHERE lease_until > 0
                 AND state IN ('received', 'validated', 'submitted', 'pending')",
        )
        .fetch_all(&self.writer)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut released = 0;
        for holder in holders.iter().filter(|h| h.as_str() != &*self.instance && !instance::alive(h)) {
            released += sqlx::query(
                "UPDATE orders SET lease_until = 0, lease_owner = '',
                    next_attempt_at = CASE WHEN state = 'submitted'
                        THEN MAX(next_attempt_at, updated_at + ?) ELSE next_attempt_at END
                 WHERE lease_owner = ? AND lease_until > 0
                   AND state IN ('received', 'validated', 'submitted', 'pending')",
            )
            .bind(settle.as_millis() as i64)
            .bind(holder)
            .execute(&self.writer)
            .await?
            .rows_affected();
        }
        let key_holders: Vec<String> =
            sqlx::query("SELECT DISTINCT holder FROM idempotency_keys WHERE in_flight = 1")
                .fetch_all(&self.writer)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        for holder in key_holders.iter().filter(|h| h.as_str() != &*self.instance && !instance::alive(h)) {
            sqlx::query("DELETE FROM idempotency_keys WHERE in_flight = 1 AND holder = ?")
                .bind(holder)
                .execute(&self.writer)
                .await?;
        }
        Ok(released)
    }

    /// Claim `key` for a request with `fingerprint`, or say why not. One statement claims a new
    /// or expired key; only a key in use costs a second one.
    async fn claim_key(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<KeyState, StoreError> {
        let now = now_ms();
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, fingerprint, in_flight, created_at, expires_at, holder)
             VALUES (?1, ?2, 1, ?3, ?4, ?5)
             ON CONFLICT(key) DO UPDATE SET fingerprint = excluded.fingerprint, in_flight = 1,
                status = NULL, location = NULL, body = NULL, holder = excluded.holder,
                created_at = excluded.created_at, expires_at = excluded.expires_at
             WHERE idempotency_keys.expires_at <= ?3 AND idempotency_keys.in_flight = 0
             RETURNING key",
        )
        .bind(key)
        .bind(fingerprint)
        .bind(now)
        .bind(now.saturating_add(ttl.as_millis() as i64))
        .bind(&*self.instance)
        .fetch_optional(&self.writer)
        .await?;
        if claimed.is_some() {
            return Ok(KeyState::Claimed);
        }
        let existing = sqlx::query(
            "SELECT fingerprint, in_flight, status, location, body FROM idempotency_keys WHERE key = ?",
        )
        .bind(key)
        .fetch_optional(&self.writer)
        .await?;
        // Released between the two statements: the first request just ended; ask for a retry.
        let Some(row) = existing else { return Ok(KeyState::InFlight) };
        let stored: String = row.try_get("fingerprint")?;
        Ok(if stored != fingerprint {
            KeyState::Mismatch
        } else if row.try_get::<i64, _>("in_flight")? != 0 {
            KeyState::InFlight
        } else {
            KeyState::Done {
                status: row.try_get::<i64, _>("status")? as u16,
                location: row.try_get("location")?,
                body: row.try_get("body")?,
            }
        })
    }

    /// Store the response of a claimed key for replay.
    async fn complete_key(
        &self,
        key: &str,
        status: u16,
        location: Option<&str>,
        body: &[u8],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE idempotency_keys SET in_flight = 0, status = ?, location = ?, body = ? WHERE key = ?",
        )
        .bind(status as i64)
        .bind(location)
        .bind(body)
        .bind(key)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Forget a claimed key: the request ended in a way the caller should simply retry or fix.
    async fn release_key(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE key = ? AND in_flight = 1")
            .bind(key)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Drop expired keys; returns how many.
    async fn purge_expired_keys(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= ? AND in_flight = 0")
            .bind(now_ms())
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    async fn insert_order(&self, order: NewOrder<'_>) -> Result<Option<OrderRecord>, StoreError> {
        let NewOrder {
            id,
            owner,
            opportunity_id,
            state,
            quote,
            validated,
            violations,
            correlation_id,
            reason,
            lease,
        } = order;
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO orders (id, opportunity_id, state, quote, validated, violations, reason,
                correlation_id, next_attempt_at, lease_until, received_at, updated_at, owner, lease_owner)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             RETURNING *",
        )
        .bind(id)
        .bind(opportunity_id)
        .bind(state.as_str())
        .bind(quote)
        .bind(validated as i64)
        .bind(violations)
        .bind(reason)
        .bind(correlation_id)
        .bind(now)
        .bind(lease.map_or(0, |l| now + l.as_millis() as i64))
        .bind(now)
        .bind(now)
        .bind(owner)
        .bind(if lease.is_some() { &*self.instance } else { "" })
        .fetch_one(&self.writer)
        .await;
        match inserted {
            Ok(row) => row_to_order(&row).map(Some),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Move an order from `from` to `to`; `false` when it is no longer in `from` (someone else
    /// moved it), in which case nothing changes.
    async fn transition(
        &self,
        id: &str,
        from: State,
        to: State,
        change: Change<'_>,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE orders SET state = ?, updated_at = ?, reason = ?,
                erp_order_id = COALESCE(?, erp_order_id), erp_order_number = COALESCE(?, erp_order_number),
                validated = COALESCE(?, validated), violations = COALESCE(?, violations),
                next_attempt_at = COALESCE(?, next_attempt_at),
                attempts = CASE WHEN ? THEN 0 ELSE attempts + ? END,
                lease_until = CASE WHEN ? THEN lease_until ELSE 0 END,
                lease_owner = CASE WHEN ? THEN lease_owner ELSE '' END
             WHERE id = ? AND state = ?",
        )
        .bind(to.as_str())
        .bind(now_ms())
        .bind(change.reason)
        .bind(change.erp_order.map(|(id, _)| id))
        .bind(change.erp_order.map(|(_, number)| number))
        .bind(change.validated.map(|v| v as i64))
        .bind(change.violations)
        .bind(change.next_attempt_at)
        .bind(change.reset_attempts)
        .bind(change.count_attempt as i64 - change.uncount_attempt as i64)
        .bind(change.keep_lease)
        .bind(change.keep_lease)
        .bind(id)
        .bind(from.as_str())
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Lease up to `limit` orders that are due for delivery.
    async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<OrderRecord>, StoreError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE orders SET lease_until = ?, lease_owner = ?
             WHERE id IN (SELECT id FROM orders
                          WHERE state IN ('received', 'validated', 'submitted', 'pending')
                          AND next_attempt_at <= ? AND lease_until < ? ORDER BY next_attempt_at LIMIT ?)
             RETURNING *",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(&*self.instance)
        .bind(now)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(row_to_order).collect()
    }

    async fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row =
            sqlx::query("SELECT * FROM orders WHERE id = ?").bind(id).fetch_optional(&self.reader).await?;
        row.as_ref().map(row_to_order).transpose()
    }

    /// The opportunity's live (not rejected) order.
    async fn live_order_for(&self, opportunity_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        // The writer: a caller that just lost the insert race must see the winner's row.
        let row = sqlx::query("SELECT * FROM orders WHERE opportunity_id = ? AND state <> 'rejected'")
            .bind(opportunity_id)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(row_to_order).transpose()
    }

    /// Every order of an opportunity, newest first.
    async fn orders_for(&self, opportunity_id: &str) -> Result<Vec<OrderRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM orders WHERE opportunity_id = ? ORDER BY received_at DESC, id DESC")
                .bind(opportunity_id)
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(row_to_order).collect()
    }

    async fn in_state(&self, state: State, limit: i64) -> Result<Vec<OrderRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM orders WHERE state = ? ORDER BY updated_at LIMIT ?")
            .bind(state.as_str())
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(row_to_order).collect()
    }

    async fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, from_state, to_state, reason, repeats, last_at FROM transitions
             WHERE order_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Transition {
                    at: r.try_get("at")?,
                    from: r.try_get("from_state")?,
                    to: r.try_get("to_state")?,
                    reason: r.try_get("reason")?,
                    repeats: r.try_get("repeats")?,
                    last_at: r.try_get("last_at")?,
                })
            })
            .collect()
    }

    /// Orders per state, for the gauges.
    async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM orders GROUP BY state")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("state")?, r.try_get("n")?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (SqliteStore::open(&dir.path().join("data/orders.db"), Synchronous::Full).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn acknowledged_orders_are_on_disk_by_default() {
        let (s, _dir) = store().await;
        assert_eq!(s.synchronous_level().await.unwrap(), 2, "FULL");
        let dir = tempfile::tempdir().unwrap();
        let normal = SqliteStore::open(&dir.path().join("n.db"), Synchronous::Normal).await.unwrap();
        assert_eq!(normal.synchronous_level().await.unwrap(), 1, "NORMAL when configured");
    }

    #[tokio::test]
    async fn a_store_of_the_previous_version_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let options = SqliteConnectOptions::new().filename(&path).create_if_missing(true);
            let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
            for statement in SCHEMA {
                sqlx::query(*statement).execute(&pool).await.unwrap();
            }
            sqlx::query(
                "INSERT INTO orders (id, opportunity_id, state, quote, validated, correlation_id,
                    next_attempt_at, lease_until, received_at, updated_at, reason)
                 VALUES ('old', 'OPP', 'pending', '{}', 1, 'c', 0, 99999999999999, 0, 0, 'why')",
            )
            .execute(&pool)
            .await
            .unwrap();
        }
        let s = SqliteStore::open(&path, Synchronous::Full).await.unwrap();
        let order = s.order("old").await.unwrap().unwrap();
        assert_eq!(order.owner, "", "orders of the previous version have no owner");
        assert_eq!(s.recover(Duration::ZERO).await.unwrap(), 1, "its lease names no process: taken back");
        drop(s);
        let again = SqliteStore::open(&path, Synchronous::Full).await.unwrap();
        assert!(again.order("old").await.unwrap().is_some(), "migrations run once");
    }
}
