//! The durable side of the process APIs: orders with their state machine and timestamped
//! transitions, and idempotency keys with their stored responses, in one SQLite file (WAL).
//!
//! One node owns the file. Every write goes through a single connection, so writers never
//! contend for SQLite's lock (no `SQLITE_BUSY` under load); reads share a small pool. Each call
//! is one statement where it can be (the history is written by triggers): every statement is a
//! round trip to the connection's thread, and those hops are most of an order's cost.

use super::state::State;
use serde::Serialize;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Milliseconds since the Unix epoch: the store's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
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

#[derive(Debug, thiserror::Error)]
#[error("order store: {0}")]
pub struct StoreError(String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// An order record.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    pub id: String,
    pub opportunity_id: String,
    pub state: State,
    /// The canonical quote, as JSON text.
    pub quote: String,
    /// The rules have passed (false when the ERP was unreachable at submission).
    pub validated: bool,
    pub erp_order_id: Option<String>,
    pub erp_order_number: Option<String>,
    pub reason: Option<String>,
    /// Rule violations (JSON array) when the rules refused the order.
    pub violations: Option<String>,
    pub correlation_id: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub received_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub at: i64,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
}

/// What an idempotency key holds.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyState {
    /// First use: the caller owns the key until it finishes or releases it.
    Claimed,
    /// The first request with this key has not finished.
    InFlight,
    /// The key was used with another payload.
    Mismatch,
    /// Finished: replay this response.
    Done { status: u16, location: Option<String>, body: Vec<u8> },
}

/// What changes with a transition, besides the state.
#[derive(Debug, Default)]
pub struct Change<'a> {
    pub reason: &'a str,
    pub erp_order: Option<(&'a str, &'a str)>,
    pub validated: Option<bool>,
    pub violations: Option<&'a str>,
    pub next_attempt_at: Option<i64>,
    pub count_attempt: bool,
    /// Reset the attempt counter (an operator's replay).
    pub reset_attempts: bool,
    /// Keep the delivery lease (the order stays with its current deliverer).
    pub keep_lease: bool,
}

#[derive(Clone)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
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
    })
}

impl Store {
    /// Open (creating it and its directory when missing) and bring the schema up to date.
    pub async fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash (the case that matters here);
            // only an OS crash or power loss can lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
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
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Store { writer, reader })
    }

    /// After a restart nothing is being delivered and no request is in flight: leases and
    /// in-flight keys left by a killed process are released so the work resumes at once.
    pub async fn recover(&self) -> Result<u64, StoreError> {
        let released = sqlx::query(
            "UPDATE orders SET lease_until = 0
                 WHERE state IN ('received', 'validated', 'submitted', 'pending')",
        )
        .execute(&self.writer)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM idempotency_keys WHERE in_flight = 1").execute(&self.writer).await?;
        Ok(released)
    }

    // --- idempotency keys ---

    /// Claim `key` for a request with `fingerprint`, or say why not. One statement claims a new
    /// or expired key; only a key in use costs a second one.
    pub async fn claim_key(
        &self,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<KeyState, StoreError> {
        let now = now_ms();
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (key, fingerprint, in_flight, created_at, expires_at)
             VALUES (?1, ?2, 1, ?3, ?4)
             ON CONFLICT(key) DO UPDATE SET fingerprint = excluded.fingerprint, in_flight = 1,
                status = NULL, location = NULL, body = NULL,
                created_at = excluded.created_at, expires_at = excluded.expires_at
             WHERE idempotency_keys.expires_at <= ?3 AND idempotency_keys.in_flight = 0
             RETURNING key",
        )
        .bind(key)
        .bind(fingerprint)
        .bind(now)
        .bind(now + ttl.as_millis() as i64)
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
    pub async fn complete_key(
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
    pub async fn release_key(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE key = ? AND in_flight = 1")
            .bind(key)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Drop expired keys; returns how many.
    pub async fn purge_expired_keys(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= ? AND in_flight = 0")
            .bind(now_ms())
            .execute(&self.writer)
            .await?
            .rows_affected())
    }

    // --- orders ---

    /// Insert a new order in `state` (its first transition is recorded with it). `Ok(None)`
    /// when the opportunity already has a live order ([`Store::live_order_for`] finds it).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_order(
        &self,
        id: &str,
        opportunity_id: &str,
        state: State,
        quote: &str,
        validated: bool,
        violations: Option<&str>,
        correlation_id: &str,
        reason: &str,
        lease: Option<Duration>,
    ) -> Result<Option<OrderRecord>, StoreError> {
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO orders (id, opportunity_id, state, quote, validated, violations, reason,
                correlation_id, next_attempt_at, lease_until, received_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    pub async fn transition(
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
                lease_until = CASE WHEN ? THEN lease_until ELSE 0 END
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
        .bind(change.count_attempt as i64)
        .bind(change.keep_lease)
        .bind(id)
        .bind(from.as_str())
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Lease up to `limit` orders that are due for delivery.
    pub async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<OrderRecord>, StoreError> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE orders SET lease_until = ?
             WHERE id IN (SELECT id FROM orders
                          WHERE state IN ('received', 'validated', 'submitted', 'pending')
                          AND next_attempt_at <= ? AND lease_until < ? ORDER BY next_attempt_at LIMIT ?)
             RETURNING *",
        )
        .bind(now + lease.as_millis() as i64)
        .bind(now)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(row_to_order).collect()
    }

    pub async fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row =
            sqlx::query("SELECT * FROM orders WHERE id = ?").bind(id).fetch_optional(&self.reader).await?;
        row.as_ref().map(row_to_order).transpose()
    }

    /// The opportunity's live (not rejected) order.
    pub async fn live_order_for(&self, opportunity_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        // The writer: a caller that just lost the insert race must see the winner's row.
        let row = sqlx::query("SELECT * FROM orders WHERE opportunity_id = ? AND state <> 'rejected'")
            .bind(opportunity_id)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(row_to_order).transpose()
    }

    /// Every order of an opportunity, newest first.
    pub async fn orders_for(&self, opportunity_id: &str) -> Result<Vec<OrderRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM orders WHERE opportunity_id = ? ORDER BY received_at DESC, id DESC")
                .bind(opportunity_id)
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(row_to_order).collect()
    }

    pub async fn in_state(&self, state: State, limit: i64) -> Result<Vec<OrderRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM orders WHERE state = ? ORDER BY updated_at LIMIT ?")
            .bind(state.as_str())
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(row_to_order).collect()
    }

    pub async fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, from_state, to_state, reason FROM transitions WHERE order_id = ? ORDER BY seq",
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
                })
            })
            .collect()
    }

    /// Orders per state, for the gauges.
    pub async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM orders GROUP BY state")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("state")?, r.try_get("n")?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (Store::open(&dir.path().join("data/orders.db")).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn an_idempotency_key_is_claimed_once_then_replayed_refused_or_released() {
        let (s, _dir) = store().await;
        let ttl = Duration::from_secs(60);
        assert_eq!(s.claim_key("k", "f1", ttl).await.unwrap(), KeyState::Claimed);
        assert_eq!(s.claim_key("k", "f1", ttl).await.unwrap(), KeyState::InFlight);
        assert_eq!(s.claim_key("k", "f2", ttl).await.unwrap(), KeyState::Mismatch);
        s.complete_key("k", 201, Some("/o/1"), b"{}").await.unwrap();
        assert_eq!(
            s.claim_key("k", "f1", ttl).await.unwrap(),
            KeyState::Done { status: 201, location: Some("/o/1".into()), body: b"{}".to_vec() }
        );
        assert_eq!(s.claim_key("k2", "f", ttl).await.unwrap(), KeyState::Claimed);
        s.release_key("k2").await.unwrap();
        assert_eq!(
            s.claim_key("k2", "other", ttl).await.unwrap(),
            KeyState::Claimed,
            "released keys are free"
        );
        // Expired keys are forgotten.
        assert_eq!(s.claim_key("k3", "f", Duration::ZERO).await.unwrap(), KeyState::Claimed);
        s.complete_key("k3", 201, None, b"").await.unwrap();
        assert_eq!(s.claim_key("k3", "g", ttl).await.unwrap(), KeyState::Claimed);
    }

    #[tokio::test]
    async fn one_live_order_per_opportunity_and_guarded_transitions_with_history() {
        let (s, _dir) = store().await;
        let insert = |id: &'static str, state: State| {
            let s = s.clone();
            async move { s.insert_order(id, "OPP-1", state, "{}", true, None, "c", "why", None).await.unwrap() }
        };
        assert_eq!(insert("a", State::Rejected).await.unwrap().state, State::Rejected);
        assert!(insert("b", State::Validated).await.is_some(), "a rejected order does not block");
        assert!(insert("c", State::Validated).await.is_none(), "a second live order is refused");
        assert_eq!(s.live_order_for("OPP-1").await.unwrap().unwrap().id, "b");

        let change = || Change { reason: "attempt", count_attempt: true, ..Default::default() };
        assert!(s.transition("b", State::Validated, State::Submitted, change()).await.unwrap());
        assert!(
            !s.transition("b", State::Validated, State::Submitted, change()).await.unwrap(),
            "stale from-state"
        );
        let accepted = Change { reason: "done", erp_order: Some(("42", "SO-1")), ..Default::default() };
        assert!(s.transition("b", State::Submitted, State::Accepted, accepted).await.unwrap());
        let order = s.order("b").await.unwrap().unwrap();
        assert_eq!((order.state, order.attempts), (State::Accepted, 1));
        assert_eq!(order.erp_order_number.as_deref(), Some("SO-1"));
        let history = s.history("b").await.unwrap();
        let steps: Vec<(Option<String>, String, String)> =
            history.into_iter().map(|t| (t.from, t.to, t.reason)).collect();
        let step = |from: Option<&str>, to: &str, why: &str| {
            (from.map(String::from), to.to_string(), why.to_string())
        };
        assert_eq!(
            steps,
            [
                step(None, "validated", "why"),
                step(Some("validated"), "submitted", "attempt"),
                step(Some("submitted"), "accepted", "done")
            ],
            "the triggers record each change with its reason, and only real changes"
        );
        assert_eq!(s.orders_for("OPP-1").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn due_orders_are_leased_once_and_released_by_recovery() {
        let (s, _dir) = store().await;
        s.insert_order("a", "OPP-A", State::Pending, "{}", true, None, "c", "why", None).await.unwrap();
        s.insert_order("b", "OPP-B", State::Accepted, "{}", true, None, "c", "why", None).await.unwrap();
        let lease = Duration::from_secs(60);
        let due: Vec<String> = s.claim_due(10, lease).await.unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(due, ["a"], "only deliverable orders");
        assert!(s.claim_due(10, lease).await.unwrap().is_empty(), "a leased order is not handed out twice");
        assert_eq!(s.recover().await.unwrap(), 1);
        assert_eq!(s.claim_due(10, lease).await.unwrap().len(), 1, "after a restart it is due again");
    }
}
