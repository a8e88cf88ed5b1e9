//! The order store in one SQLite file (WAL): orders with their timestamped transitions, and
//! idempotency keys with their stored responses.
//!
//! One node owns the file; during a graceful upgrade two processes share it for a moment, so
//! every lease and in-flight key records the process that holds it ([`instance`]), and recovery
//! takes back only what expired or belongs to a process that is gone. Every write goes through a
//! single connection, so writers never contend for SQLite's lock (no `SQLITE_BUSY` under load);
//! reads share a small pool. Writes run on the store's writer thread, in place on its own
//! connection (rusqlite), and the writes of concurrent requests share a commit
//! ([`super::group`]); reads run on the file's read connection on a thread of their own.
//! The schema is `migrations/sqlite/`, applied by [`super::migrations::run`].
//! The history is written by triggers, in the statement that changes the state.

use super::group::{Backend, GroupWriter};
use super::migrations::{self, Migration, Schema};
use super::{
    now_ms, Change, KeyState, NewOrder, OrderRecord, OrderStore, OwnedChange, OwnedOrder, StoreError,
    Transition,
};
use crate::config::spec::Synchronous;
use crate::process::instance;
use crate::process::state::State;
use futures_util::future::BoxFuture;
use rusqlite::{params, OptionalExtension};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// One of the file's two connections, lent to its thread's one lane for each group: the write
/// connection (groups commit together) or the read connection (reads that queued together run
/// one after another on one wake-up of its thread, without a transaction).
pub(super) struct SqliteLink {
    conn: parking_lot::Mutex<Option<rusqlite::Connection>>,
    writes: bool,
}

impl SqliteLink {
    pub(super) fn writes(conn: rusqlite::Connection) -> Self {
        SqliteLink { conn: parking_lot::Mutex::new(Some(conn)), writes: true }
    }

    fn reads(conn: rusqlite::Connection) -> Self {
        SqliteLink { conn: parking_lot::Mutex::new(Some(conn)), writes: false }
    }
}

impl Backend for SqliteLink {
    type Conn = rusqlite::Connection;

    fn label(&self) -> Option<&'static str> {
        self.writes.then_some("sqlite")
    }

    fn connect(&self) -> BoxFuture<'_, Result<rusqlite::Connection, StoreError>> {
        let conn = self.conn.lock().take().ok_or_else(|| StoreError("the connection is in use".into()));
        Box::pin(std::future::ready(conn))
    }

    fn execute<'c>(
        &self,
        conn: &'c mut rusqlite::Connection,
        statement: &'static str,
    ) -> BoxFuture<'c, Result<(), StoreError>> {
        if !self.writes {
            return Box::pin(std::future::ready(Ok(())));
        }
        // IMMEDIATE: take the write lock at BEGIN, so no statement of the group meets SQLITE_BUSY.
        let statement = if statement == "BEGIN" { "BEGIN IMMEDIATE" } else { statement };
        Box::pin(std::future::ready(conn.execute_batch(statement).map_err(StoreError::from)))
    }

    fn put_back(&self, conn: rusqlite::Connection, healthy: bool) {
        if !healthy && !conn.is_autocommit() {
            // A failed COMMIT can leave the transaction open; nothing of it was acknowledged.
            let _ = conn.execute_batch("ROLLBACK");
        }
        *self.conn.lock() = Some(conn);
    }
}

/// A read or write of the store, run on its thread's connection.
type Work<T> = dyn Fn(&rusqlite::Connection) -> Result<T, StoreError> + Send + Sync;

/// Reads that queued while the read connection was busy, run on one wake-up of its thread.
const READS_PER_WAKE: usize = 64;

async fn run<T: Send + 'static>(link: &GroupWriter<SqliteLink>, work: Box<Work<T>>) -> Result<T, StoreError> {
    link.write(move |conn: &mut rusqlite::Connection| Box::pin(std::future::ready(work(conn)))).await
}

/// The first column of every row of `sql`.
fn strings(conn: &rusqlite::Connection, sql: &str) -> Result<Vec<String>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let rows = statement.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

#[derive(Clone)]
pub struct SqliteStore {
    /// Every write, committed in groups on the file's one write connection.
    writes: Arc<GroupWriter<SqliteLink>>,
    /// Every read, on the file's read connection.
    reads: Arc<GroupWriter<SqliteLink>>,
    /// This process, as named on the leases and keys it holds.
    instance: Arc<str>,
}

fn row_to_order(row: &rusqlite::Row<'_>) -> Result<OrderRecord, StoreError> {
    let state: String = row.get("state")?;
    Ok(OrderRecord {
        id: row.get("id")?,
        opportunity_id: row.get("opportunity_id")?,
        state: State::from_str(&state).map_err(StoreError)?,
        quote: row.get("quote")?,
        validated: row.get::<_, i64>("validated")? != 0,
        erp_order_id: row.get("erp_order_id")?,
        erp_order_number: row.get("erp_order_number")?,
        reason: row.get("reason")?,
        violations: row.get("violations")?,
        correlation_id: row.get("correlation_id")?,
        traceparent: row.get("traceparent")?,
        attempts: row.get("attempts")?,
        next_attempt_at: row.get("next_attempt_at")?,
        received_at: row.get("received_at")?,
        updated_at: row.get("updated_at")?,
        owner: row.get("owner")?,
    })
}

/// The orders `sql` selects (or an UPDATE returns) with `params`.
fn orders(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<OrderRecord>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let mut orders = Vec::new();
    while let Some(row) = rows.next()? {
        orders.push(row_to_order(row)?);
    }
    Ok(orders)
}

/// The file's schema version (`PRAGMA user_version`), for the migration runner.
struct FileSchema<'c>(&'c mut rusqlite::Connection);

#[async_trait::async_trait]
impl Schema for FileSchema<'_> {
    async fn version(&mut self) -> Result<i64, StoreError> {
        Ok(self.0.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    async fn apply(&mut self, migration: &Migration) -> Result<(), StoreError> {
        let tx = self.0.transaction()?;
        tx.execute_batch(migration.sql)?;
        tx.pragma_update(None, "user_version", migration.version)?;
        tx.commit()?;
        Ok(())
    }
}

impl SqliteStore {
    /// Open (creating it and its directory when missing) and bring the schema up to date.
    /// Up to `group_commit` writes of concurrent requests share one transaction.
    pub async fn open(
        path: &Path,
        synchronous: Synchronous,
        group_commit: usize,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL + FULL: a commit is on disk before the caller hears 201/202, so an acknowledged
        // order survives a power loss. NORMAL survives a process crash only.
        let level = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {level}; PRAGMA foreign_keys = ON;"
        ))?;
        conn.execute_batch(migrations::SQLITE_BASE)?;
        migrations::run(&mut FileSchema(&mut conn), migrations::SQLITE).await?;
        conn.set_prepared_statement_cache_capacity(32);
        // One lane: the file has one writer, so writers never contend for its lock.
        let writes =
            Arc::new(GroupWriter::start(SqliteLink::writes(conn), 1, group_commit, "causeway-store-writer")?);
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let reader = rusqlite::Connection::open_with_flags(path, flags)?;
        reader.busy_timeout(Duration::from_secs(5))?;
        reader.set_prepared_statement_cache_capacity(32);
        let reads = Arc::new(GroupWriter::start(
            SqliteLink::reads(reader),
            1,
            READS_PER_WAKE,
            "causeway-store-reader",
        )?);
        Ok(SqliteStore { writes, reads, instance: instance::current().into() })
    }

    /// This store as used by another process named `instance` (`pid:start`): for tests and
    /// tools that act for a process that is gone or another that runs.
    pub fn as_process(mut self, instance: &str) -> SqliteStore {
        self.instance = instance.into();
        self
    }

    /// This process, as named on the leases it holds.
    pub(super) fn instance_name(&self) -> &str {
        &self.instance
    }

    /// The `PRAGMA synchronous` level in force on the write connection (2 = FULL, 1 = NORMAL).
    pub async fn synchronous_level(&self) -> Result<i64, StoreError> {
        self.write(|conn| Ok(conn.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))?)).await
    }

    /// Run `work` on the writer's connection in the next group; its outcome once committed.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        work: impl Fn(&rusqlite::Connection) -> Result<T, StoreError> + Send + Sync + 'static,
    ) -> Result<T, StoreError> {
        run(&self.writes, Box::new(work)).await
    }

    /// Run `work` on the read connection (committed data only).
    pub(super) async fn read<T: Send + 'static>(
        &self,
        work: impl Fn(&rusqlite::Connection) -> Result<T, StoreError> + Send + Sync + 'static,
    ) -> Result<T, StoreError> {
        run(&self.reads, Box::new(work)).await
    }
}

#[async_trait::async_trait]
impl OrderStore for SqliteStore {
    /// Through the writer, so a file that cannot be written any more is not ready.
    async fn ping(&self) -> Result<(), StoreError> {
        self.write(|conn| Ok(conn.execute_batch("SELECT 1")?)).await
    }

    /// Take back what a process that is gone left behind: its delivery leases (an order it was
    /// submitting is retried only after `settle`, the longest its last ERP request could still
    /// be under way) and its in-flight idempotency keys. What a live process holds (the old one
    /// during a graceful upgrade) is left alone. Returns how many orders were released.
    async fn recover(&self, settle: Duration) -> Result<u64, StoreError> {
        let me = self.instance.clone();
        let settle = settle.as_millis() as i64;
        self.write(move |conn| {
            let gone = |holder: &&String| holder.as_str() != &*me && !instance::alive(holder);
            let holders = strings(
                conn,
                "SELECT DISTINCT lease_owner FROM orders WHERE lease_until > 0
                     AND state IN ('received', 'validated', 'submitted', 'pending')",
            )?;
            let mut released = 0;
            for holder in holders.iter().filter(gone) {
                released += conn
                    .prepare_cached(
                        "UPDATE orders SET lease_until = 0, lease_owner = '',
                            next_attempt_at = CASE WHEN state = 'submitted'
                                THEN MAX(next_attempt_at, updated_at + ?) ELSE next_attempt_at END
                         WHERE lease_owner = ? AND lease_until > 0
                           AND state IN ('received', 'validated', 'submitted', 'pending')",
                    )?
                    .execute(params![settle, holder])? as u64;
            }
            let delivery_holders = strings(
                conn,
                "SELECT DISTINCT lease_owner FROM event_deliveries WHERE lease_until > 0 AND state = 'pending'",
            )?;
            for holder in delivery_holders.iter().filter(gone) {
                conn.prepare_cached(
                    "UPDATE event_deliveries SET lease_until = 0, lease_owner = ''
                     WHERE lease_owner = ? AND lease_until > 0 AND state = 'pending'",
                )?
                .execute([holder])?;
            }
            let key_holders =
                strings(conn, "SELECT DISTINCT holder FROM idempotency_keys WHERE in_flight = 1")?;
            for holder in key_holders.iter().filter(gone) {
                conn.prepare_cached("DELETE FROM idempotency_keys WHERE in_flight = 1 AND holder = ?")?
                    .execute([holder])?;
            }
            Ok(released)
        })
        .await
    }

    /// Claim `key` for a request with `fingerprint`, or say why not. One statement claims a new
    /// or expired key; only a key in use costs a second one.
    async fn claim_key(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<KeyState, StoreError> {
        let (key, fingerprint, holder) = (key.to_owned(), fingerprint.to_owned(), self.instance.clone());
        let ttl = ttl.as_millis() as i64;
        self.write(move |conn| {
            let now = now_ms();
            let claimed = conn
                .prepare_cached(
                    "INSERT INTO idempotency_keys (key, fingerprint, in_flight, created_at, expires_at, holder)
                     VALUES (?1, ?2, 1, ?3, ?4, ?5)
                     ON CONFLICT(key) DO UPDATE SET fingerprint = excluded.fingerprint, in_flight = 1,
                        status = NULL, location = NULL, body = NULL, holder = excluded.holder,
                        created_at = excluded.created_at, expires_at = excluded.expires_at
                     WHERE idempotency_keys.expires_at <= ?3 AND idempotency_keys.in_flight = 0",
                )?
                .execute(params![key, fingerprint, now, now.saturating_add(ttl), &*holder])?;
            if claimed == 1 {
                return Ok(KeyState::Claimed);
            }
            let existing = conn
                .prepare_cached(
                    "SELECT fingerprint, in_flight, status, location, body FROM idempotency_keys WHERE key = ?",
                )?
                .query_row([&key], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<Vec<u8>>>(4)?,
                    ))
                })
                .optional()?;
            // Released between the two statements: the first request just ended; ask for a retry.
            let Some((stored, in_flight, status, location, body)) = existing else {
                return Ok(KeyState::InFlight);
            };
            Ok(if stored != fingerprint {
                KeyState::Mismatch
            } else if in_flight != 0 {
                KeyState::InFlight
            } else {
                KeyState::Done { status: status.unwrap_or(0) as u16, location, body: body.unwrap_or_default() }
            })
        })
        .await
    }

    /// Store the response of a claimed key for replay.
    async fn complete_key(
        &self,
        key: &str,
        status: u16,
        location: Option<&str>,
        body: &[u8],
    ) -> Result<(), StoreError> {
        let (key, location, body) = (key.to_owned(), location.map(str::to_owned), body.to_vec());
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE idempotency_keys SET in_flight = 0, status = ?, location = ?, body = ? WHERE key = ?",
            )?
            .execute(params![status as i64, location, body, key])?;
            Ok(())
        })
        .await
    }

    /// Forget a claimed key: the request ended in a way the caller should simply retry or fix.
    async fn release_key(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM idempotency_keys WHERE key = ? AND in_flight = 1")?
                .execute([&key])?;
            Ok(())
        })
        .await
    }

    /// Drop expired keys; returns how many.
    async fn purge_expired_keys(&self) -> Result<u64, StoreError> {
        self.write(|conn| {
            let purged = conn
                .prepare_cached("DELETE FROM idempotency_keys WHERE expires_at <= ? AND in_flight = 0")?
                .execute([now_ms()])?;
            Ok(purged as u64)
        })
        .await
    }

    async fn insert_order(&self, order: NewOrder<'_>) -> Result<Option<OrderRecord>, StoreError> {
        let o = OwnedOrder::from(order);
        let instance = self.instance.clone();
        self.write(move |conn| {
            let now = now_ms();
            let lease_until = o.lease.map_or(0, |l| now + l.as_millis() as i64);
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO orders (id, opportunity_id, state, quote, validated, violations, reason,
                        correlation_id, next_attempt_at, lease_until, received_at, updated_at, owner, lease_owner,
                        traceparent)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?9, ?9, ?11, ?12, ?13)",
                )?
                .execute(params![
                    &*o.id,
                    &*o.opportunity_id,
                    o.state.as_str(),
                    &*o.quote,
                    o.validated as i64,
                    o.violations.as_deref(),
                    &*o.reason,
                    &*o.correlation_id,
                    now,
                    lease_until,
                    &*o.owner,
                    if o.lease.is_some() { &*instance } else { "" },
                    &*o.traceparent,
                ]);
            match inserted {
                // The row as written: nothing to read back.
                Ok(_) => Ok(Some(OrderRecord {
                    id: o.id.to_string(),
                    opportunity_id: o.opportunity_id.to_string(),
                    state: o.state,
                    quote: o.quote.to_string(),
                    validated: o.validated,
                    erp_order_id: None,
                    erp_order_number: None,
                    reason: Some(o.reason.to_string()),
                    violations: o.violations.as_deref().map(str::to_owned),
                    correlation_id: o.correlation_id.to_string(),
                    traceparent: o.traceparent.to_string(),
                    attempts: 0,
                    next_attempt_at: now,
                    received_at: now,
                    updated_at: now,
                    owner: o.owner.to_string(),
                })),
                // Statement-level: the rest of the group stands.
                Err(e) if is_unique_violation(&e) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
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
        let id = id.to_owned();
        let c = OwnedChange::from(change);
        self.write(move |conn| {
            let updated = conn
                .prepare_cached(
                    "UPDATE orders SET state = ?1, updated_at = ?2, reason = ?3,
                        erp_order_id = COALESCE(?4, erp_order_id), erp_order_number = COALESCE(?5, erp_order_number),
                        validated = COALESCE(?6, validated), violations = COALESCE(?7, violations),
                        next_attempt_at = COALESCE(?8, next_attempt_at),
                        attempts = CASE WHEN ?9 THEN 0 ELSE attempts + ?10 END,
                        lease_until = CASE WHEN ?11 THEN lease_until ELSE 0 END,
                        lease_owner = CASE WHEN ?11 THEN lease_owner ELSE '' END
                     WHERE id = ?12 AND state = ?13",
                )?
                .execute(params![
                    to.as_str(),
                    now_ms(),
                    &*c.reason,
                    c.erp_order.as_ref().map(|(id, _)| &**id),
                    c.erp_order.as_ref().map(|(_, number)| &**number),
                    c.validated.map(|v| v as i64),
                    c.violations.as_deref(),
                    c.next_attempt_at,
                    c.reset_attempts,
                    c.count_attempt as i64 - c.uncount_attempt as i64,
                    c.keep_lease,
                    id,
                    from.as_str(),
                ])?;
            Ok(updated == 1)
        })
        .await
    }

    /// Lease up to `limit` orders that are due for delivery.
    async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<OrderRecord>, StoreError> {
        let instance = self.instance.clone();
        let lease = lease.as_millis() as i64;
        self.write(move |conn| {
            let now = now_ms();
            orders(
                conn,
                "UPDATE orders SET lease_until = ?1, lease_owner = ?2
                 WHERE id IN (SELECT id FROM orders
                              WHERE state IN ('received', 'validated', 'submitted', 'pending')
                              AND next_attempt_at <= ?3 AND lease_until < ?3 ORDER BY next_attempt_at LIMIT ?4)
                 RETURNING *",
                params![now + lease, &*instance, now, limit],
            )
        })
        .await
    }

    async fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| Ok(orders(conn, "SELECT * FROM orders WHERE id = ?", [&id])?.pop())).await
    }

    /// The opportunity's live (not rejected) order.
    async fn live_order_for(&self, opportunity_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        // A write is answered after its commit, so a caller that just lost the insert race
        // reads the winner's row here.
        let opportunity = opportunity_id.to_owned();
        self.read(move |conn| {
            let sql = "SELECT * FROM orders WHERE opportunity_id = ? AND state <> 'rejected'";
            Ok(orders(conn, sql, [&opportunity])?.pop())
        })
        .await
    }

    /// Every order of an opportunity, newest first.
    async fn orders_for(&self, opportunity_id: &str) -> Result<Vec<OrderRecord>, StoreError> {
        let opportunity = opportunity_id.to_owned();
        self.read(move |conn| {
            let sql = "SELECT * FROM orders WHERE opportunity_id = ? ORDER BY received_at DESC, id DESC";
            orders(conn, sql, [&opportunity])
        })
        .await
    }

    async fn in_state(&self, state: State, limit: i64) -> Result<Vec<OrderRecord>, StoreError> {
        self.read(move |conn| {
            let sql = "SELECT * FROM orders WHERE state = ? ORDER BY updated_at LIMIT ?";
            orders(conn, sql, params![state.as_str(), limit])
        })
        .await
    }

    async fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT at, from_state, to_state, reason, repeats, last_at FROM transitions
                 WHERE order_id = ? ORDER BY seq",
            )?;
            let rows = select.query_map([&id], |r| {
                Ok(Transition {
                    at: r.get(0)?,
                    from: r.get(1)?,
                    to: r.get(2)?,
                    reason: r.get(3)?,
                    repeats: r.get(4)?,
                    last_at: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Orders per state, for the gauges.
    async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(|conn| {
            let mut select = conn.prepare_cached("SELECT state, COUNT(*) AS n FROM orders GROUP BY state")?;
            let rows = select.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    fn outbox(self: Arc<Self>) -> Option<Arc<dyn super::outbox::EventOutbox>> {
        Some(self)
    }

    fn lifecycle(self: Arc<Self>) -> Option<Arc<dyn super::lifecycle::OrderLifecycle>> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (SqliteStore::open(&dir.path().join("data/orders.db"), Synchronous::Full, 64).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn acknowledged_orders_are_on_disk_by_default() {
        let (s, _dir) = store().await;
        assert_eq!(s.synchronous_level().await.unwrap(), 2, "FULL");
        let dir = tempfile::tempdir().unwrap();
        let normal = SqliteStore::open(&dir.path().join("n.db"), Synchronous::Normal, 64).await.unwrap();
        assert_eq!(normal.synchronous_level().await.unwrap(), 1, "NORMAL when configured");
    }

    #[tokio::test]
    async fn a_store_of_the_previous_version_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // A file of the first release: the base schema, no version.
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(migrations::SQLITE_BASE).unwrap();
            conn.execute(
                "INSERT INTO orders (id, opportunity_id, state, quote, validated, correlation_id,
                    next_attempt_at, lease_until, received_at, updated_at, reason)
                 VALUES ('old', 'OPP', 'pending', '{}', 1, 'c', 0, 99999999999999, 0, 0, 'why')",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path, Synchronous::Full, 64).await.unwrap();
        let order = s.order("old").await.unwrap().unwrap();
        assert_eq!(order.owner, "", "orders of the previous version have no owner");
        assert_eq!(s.recover(Duration::ZERO).await.unwrap(), 1, "its lease names no process: taken back");
        drop(s);
        let again = SqliteStore::open(&path, Synchronous::Full, 64).await.unwrap();
        assert!(again.order("old").await.unwrap().is_some(), "migrations run once");
        drop(again);
        let version: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, migrations::SQLITE.len() as i64);
        // A file a newer release wrote is refused, not written to.
        rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let newer = SqliteStore::open(&path, Synchronous::Full, 64).await.err().expect("refused");
        assert!(newer.0.contains("newer than this build knows"), "{newer}");
    }
}
