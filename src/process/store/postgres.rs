//! The order store on PostgreSQL, for several replicas that share one database (cluster mode).
//!
//! The same records and guarantees as [`super::sqlite`]: one live order per opportunity and one
//! holder per idempotency key, enforced by the database's unique indexes; the history written by
//! a trigger in the same statement as the change. Replicas may run on different hosts, so a
//! delivery lease or an in-flight key is taken back when it expires (an attempt ends well within
//! its lease) or, sooner, when its holder ran on this host and is gone. Due orders are claimed
//! with `FOR UPDATE SKIP LOCKED`, so replicas never wait on each other's claims.

use super::group::{Backend, GroupWriter};
use super::migrations::{self, Migration, Schema};
use super::{
    now_ms, Change, KeyState, NewOrder, OrderRecord, OrderStore, OwnedChange, OwnedOrder, StoreError,
    Transition,
};
use crate::process::instance;
use crate::process::state::State;
use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// An in-flight idempotency key older than this was left by a replica that stopped (a request
/// holds its key for at most its inline wait): the next request with the key may claim it.
pub const ABANDONED_KEY: Duration = Duration::from_secs(120);

/// PostgreSQL's text cannot hold NUL, which a consumer id, a key or an ERP's answer may: it is
/// stored as U+FFFD instead of failing the statement (and the caller with a 503).
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn opt_text(s: Option<&str>) -> Option<String> {
    s.map(text)
}

/// An arbitrary constant: the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x6361_7573_6577_6179;

/// Group-committed transactions at once (each on its own connection, beside `store.pool`).
const WRITE_LANES: usize = 4;

type PgConn = PoolConnection<Postgres>;

/// The writer's connections: a pool of its own, connected from the writer's thread.
struct PgWrites(PgPool);

impl Backend for PgWrites {
    type Conn = PgConn;
    fn label(&self) -> Option<&'static str> {
        Some("postgres")
    }

    fn connect(&self) -> BoxFuture<'_, Result<PgConn, StoreError>> {
        Box::pin(async move { Ok(self.0.acquire().await?) })
    }

    fn execute<'c>(
        &self,
        conn: &'c mut PgConn,
        statement: &'static str,
    ) -> BoxFuture<'c, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(statement).execute(&mut **conn).await?;
            Ok(())
        })
    }

    fn put_back(&self, mut conn: PgConn, healthy: bool) {
        if !healthy {
            conn.close_on_drop();
        }
    }
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Every write of the request path, committed in groups.
    writes: Arc<GroupWriter<PgWrites>>,
    /// This process as named on its leases and keys: `host/pid:start`.
    instance: std::sync::Arc<str>,
    host: std::sync::Arc<str>,
}

fn row_to_order(row: &PgRow) -> Result<OrderRecord, StoreError> {
    let state: String = row.try_get("state")?;
    Ok(OrderRecord {
        id: row.try_get("id")?,
        opportunity_id: row.try_get("opportunity_id")?,
        state: State::from_str(&state).map_err(StoreError)?,
        quote: row.try_get("quote")?,
        validated: row.try_get("validated")?,
        erp_order_id: row.try_get("erp_order_id")?,
        erp_order_number: row.try_get("erp_order_number")?,
        reason: row.try_get("reason")?,
        violations: row.try_get("violations")?,
        correlation_id: row.try_get("correlation_id")?,
        traceparent: row.try_get("traceparent")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        received_at: row.try_get("received_at")?,
        updated_at: row.try_get("updated_at")?,
        owner: row.try_get("owner")?,
    })
}

/// This machine's name, which prefixes the holders of leases and keys (replicas may share the
/// database from several hosts; only holders on this one can be asked whether they still run).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// The database's schema version (`causeway_migrations`), for the migration runner; every
/// change runs in the one transaction that holds the migration lock.
struct DatabaseSchema<'t>(&'t mut sqlx::Transaction<'static, Postgres>);

#[async_trait::async_trait]
impl Schema for DatabaseSchema<'_> {
    async fn version(&mut self) -> Result<i64, StoreError> {
        // Asked first, rather than `CREATE … IF NOT EXISTS`, which logs a notice at every start.
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('causeway_migrations')::text")
            .fetch_one(&mut **self.0)
            .await?;
        if exists.is_none() {
            sqlx::query(
                "CREATE TABLE causeway_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .execute(&mut **self.0)
            .await?;
        }
        Ok(sqlx::query("SELECT COALESCE(MAX(version), 0) FROM causeway_migrations")
            .fetch_one(&mut **self.0)
            .await?
            .try_get(0)?)
    }

    async fn apply(&mut self, migration: &Migration) -> Result<(), StoreError> {
        sqlx::raw_sql(migration.sql).execute(&mut **self.0).await?;
        sqlx::query("INSERT INTO causeway_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(migration.version)
            .bind(now_ms())
            .execute(&mut **self.0)
            .await?;
        Ok(())
    }
}

/// Apply the migrations the database has not seen yet (replicas that start together serialise
/// on an advisory lock); returns the schema version.
pub async fn migrate(pool: &PgPool) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    let version = migrations::run(&mut DatabaseSchema(&mut tx), migrations::POSTGRES).await?;
    tx.commit().await?;
    Ok(version)
}

impl PostgresStore {
    /// Connect to `url` (`postgres://…`; a `?options=-c search_path=…` selects a schema) and
    /// bring the schema up to date. `pool` connections at most for reads, and [`WRITE_LANES`]
    /// for writes, up to `group_commit` of them per transaction; a request waits `acquire` for
    /// a connection, then gets `store-unavailable` instead of hanging while the database is away.
    pub async fn open(
        url: &str,
        pool: u32,
        acquire: Duration,
        group_commit: usize,
    ) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError(format!("store.url is not a PostgreSQL URL: {e}")))?
            .application_name("causeway");
        let pool = PgPoolOptions::new()
            .max_connections(pool.max(2))
            .min_connections(1)
            .acquire_timeout(acquire)
            // A connection the server dropped (a restart) is found and replaced before use.
            .test_before_acquire(true)
            .connect_with(options.clone())
            .await?;
        migrate(&pool).await?;
        // Connected by the writer's own thread when it first writes.
        let writer = PgPoolOptions::new()
            .max_connections(WRITE_LANES as u32)
            .acquire_timeout(acquire)
            .test_before_acquire(true)
            .connect_lazy_with(options);
        let writes = Arc::new(GroupWriter::start(
            PgWrites(writer),
            WRITE_LANES,
            group_commit,
            "causeway-store-writer",
        )?);
        let host: std::sync::Arc<str> = host_name().into();
        Ok(PostgresStore { instance: format!("{host}/{}", instance::current()).into(), host, pool, writes })
    }

    /// This process, as named on the leases it holds (`host/pid:start`).
    pub(super) fn instance_name(&self) -> &str {
        &self.instance
    }

    /// This store as used by another process named `instance` (`host/pid:start`): for tests.
    pub fn as_process(mut self, instance: &str) -> PostgresStore {
        self.instance = instance.into();
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The holders among `holders` that ran on this host and are gone (others expire).
    fn gone<'a>(&self, holders: &'a [String]) -> Vec<&'a String> {
        holders
            .iter()
            .filter(|h| h.as_str() != &*self.instance)
            .filter(|h| match h.split_once('/') {
                Some((host, local)) => host == &*self.host && !instance::alive(local),
                // Not a name this store writes: nobody can renew it.
                None => true,
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl OrderStore for PostgresStore {
    /// Take back the leases and in-flight keys of processes on this host that are gone; a lease
    /// of another host's replica is taken over when it expires (`claim_due`).
    async fn recover(&self, settle: Duration) -> Result<u64, StoreError> {
        let holders: Vec<String> = sqlx::query(
            "SELECT DISTINCT lease_owner FROM orders WHERE lease_until > 0
                 AND state IN ('received', 'validated', 'submitted', 'pending')",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut released = 0;
        for holder in self.gone(&holders) {
            released += sqlx::query(
                "UPDATE orders SET lease_until = 0, lease_owner = '',
                    next_attempt_at = CASE WHEN state = 'submitted'
                        THEN GREATEST(next_attempt_at, updated_at + $1) ELSE next_attempt_at END
                 WHERE lease_owner = $2 AND lease_until > 0
                   AND state IN ('received', 'validated', 'submitted', 'pending')",
            )
            .bind(settle.as_millis() as i64)
            .bind(holder)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        let delivery_holders: Vec<String> = sqlx::query(
            "SELECT DISTINCT lease_owner FROM event_deliveries WHERE lease_until > 0 AND state = 'pending'",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        for holder in self.gone(&delivery_holders) {
            sqlx::query(
                "UPDATE event_deliveries SET lease_until = 0, lease_owner = ''
                 WHERE lease_owner = $1 AND lease_until > 0 AND state = 'pending'",
            )
            .bind(holder)
            .execute(&self.pool)
            .await?;
        }
        let key_holders: Vec<String> =
            sqlx::query("SELECT DISTINCT holder FROM idempotency_keys WHERE in_flight")
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        for holder in self.gone(&key_holders) {
            sqlx::query("DELETE FROM idempotency_keys WHERE in_flight AND holder = $1")
                .bind(holder)
                .execute(&self.pool)
                .await?;
        }
        Ok(released)
    }

    async fn claim_key(&self, key: &str, fingerprint: &str, ttl: Duration) -> Result<KeyState, StoreError> {
        let (key, fingerprint, holder) = (text(key), fingerprint.to_owned(), self.instance.clone());
        let ttl = ttl.as_millis() as i64;
        self.writes
            .write(move |conn: &mut PgConn| {
                let (key, fingerprint, holder) = (key.clone(), fingerprint.clone(), holder.clone());
                Box::pin(async move {
                    let now = now_ms();
                    let claimed = sqlx::query(
                        "INSERT INTO idempotency_keys (key, fingerprint, in_flight, created_at, expires_at, holder)
                         VALUES ($1, $2, TRUE, $3, $4, $5)
                         ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, in_flight = TRUE,
                            status = NULL, location = NULL, body = NULL, holder = excluded.holder,
                            created_at = excluded.created_at, expires_at = excluded.expires_at
                         WHERE (idempotency_keys.expires_at <= $3 AND NOT idempotency_keys.in_flight)
                            OR (idempotency_keys.in_flight AND idempotency_keys.created_at <= $6)
                         RETURNING key",
                    )
                    .bind(&key)
                    .bind(&fingerprint)
                    .bind(now)
                    .bind(now.saturating_add(ttl))
                    .bind(&*holder)
                    .bind(now - ABANDONED_KEY.as_millis() as i64)
                    .fetch_optional(&mut **conn)
                    .await?;
                    if claimed.is_some() {
                        return Ok(KeyState::Claimed);
                    }
                    let existing = sqlx::query(
                        "SELECT fingerprint, in_flight, status, location, body FROM idempotency_keys WHERE key = $1",
                    )
                    .bind(&key)
                    .fetch_optional(&mut **conn)
                    .await?;
                    let Some(row) = existing else { return Ok(KeyState::InFlight) };
                    let stored: String = row.try_get("fingerprint")?;
                    Ok(if stored != fingerprint {
                        KeyState::Mismatch
                    } else if row.try_get::<bool, _>("in_flight")? {
                        KeyState::InFlight
                    } else {
                        KeyState::Done {
                            status: row.try_get::<i32, _>("status")? as u16,
                            location: row.try_get("location")?,
                            body: row.try_get("body")?,
                        }
                    })
                })
            })
            .await
    }

    async fn complete_key(
        &self,
        key: &str,
        status: u16,
        location: Option<&str>,
        body: &[u8],
    ) -> Result<(), StoreError> {
        let (key, location, body) = (text(key), opt_text(location), Arc::<[u8]>::from(body));
        self.writes
            .write(move |conn: &mut PgConn| {
                let (key, location, body) = (key.clone(), location.clone(), body.clone());
                Box::pin(async move {
                    sqlx::query(
                        "UPDATE idempotency_keys SET in_flight = FALSE, status = $1, location = $2, body = $3
                         WHERE key = $4",
                    )
                    .bind(i32::from(status))
                    .bind(location)
                    .bind(&*body)
                    .bind(key)
                    .execute(&mut **conn)
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn release_key(&self, key: &str) -> Result<(), StoreError> {
        let key = text(key);
        self.writes
            .write(move |conn: &mut PgConn| {
                let key = key.clone();
                Box::pin(async move {
                    sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND in_flight")
                        .bind(key)
                        .execute(&mut **conn)
                        .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn purge_expired_keys(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1 AND NOT in_flight")
            .bind(now_ms())
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn insert_order(&self, order: NewOrder<'_>) -> Result<Option<OrderRecord>, StoreError> {
        let order = OwnedOrder::from(order);
        let instance = self.instance.clone();
        self.writes
            .write(move |conn: &mut PgConn| {
                let (o, instance) = (order.clone(), instance.clone());
                Box::pin(async move {
                    let now = now_ms();
                    // DO NOTHING covers the partial unique index too: a second live order is no
                    // row, and no error that would roll back the writes committed with it.
                    let inserted = sqlx::query(
                        "INSERT INTO orders (id, opportunity_id, state, quote, validated, violations, reason,
                            correlation_id, next_attempt_at, lease_until, received_at, updated_at, owner, lease_owner,
                            traceparent)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $9, $9, $11, $12, $13)
                         ON CONFLICT DO NOTHING
                         RETURNING *",
                    )
                    .bind(text(&o.id))
                    .bind(text(&o.opportunity_id))
                    .bind(o.state.as_str())
                    .bind(text(&o.quote))
                    .bind(o.validated)
                    .bind(opt_text(o.violations.as_deref()))
                    .bind(text(&o.reason))
                    .bind(text(&o.correlation_id))
                    .bind(now)
                    .bind(o.lease.map_or(0, |l| now + l.as_millis() as i64))
                    .bind(text(&o.owner))
                    .bind(if o.lease.is_some() { &*instance } else { "" })
                    .bind(text(&o.traceparent))
                    .fetch_optional(&mut **conn)
                    .await?;
                    inserted.as_ref().map(row_to_order).transpose()
                })
            })
            .await
    }

    async fn transition(
        &self,
        id: &str,
        from: State,
        to: State,
        change: Change<'_>,
    ) -> Result<bool, StoreError> {
        let id = text(id);
        let change = OwnedChange::from(change);
        self.writes
            .write(move |conn: &mut PgConn| {
                let (id, c) = (id.clone(), change.clone());
                Box::pin(async move {
                    let updated = sqlx::query(
                        "UPDATE orders SET state = $1, updated_at = $2, reason = $3,
                            erp_order_id = COALESCE($4, erp_order_id), erp_order_number = COALESCE($5, erp_order_number),
                            validated = COALESCE($6, validated), violations = COALESCE($7, violations),
                            next_attempt_at = COALESCE($8, next_attempt_at),
                            attempts = CASE WHEN $9 THEN 0 ELSE attempts + $10 END,
                            lease_until = CASE WHEN $11 THEN lease_until ELSE 0 END,
                            lease_owner = CASE WHEN $11 THEN lease_owner ELSE '' END
                         WHERE id = $12 AND state = $13",
                    )
                    .bind(to.as_str())
                    .bind(now_ms())
                    .bind(text(&c.reason))
                    .bind(opt_text(c.erp_order.as_ref().map(|(id, _)| &**id)))
                    .bind(opt_text(c.erp_order.as_ref().map(|(_, number)| &**number)))
                    .bind(c.validated)
                    .bind(opt_text(c.violations.as_deref()))
                    .bind(c.next_attempt_at)
                    .bind(c.reset_attempts)
                    .bind(c.count_attempt as i64 - c.uncount_attempt as i64)
                    .bind(c.keep_lease)
                    .bind(id)
                    .bind(from.as_str())
                    .execute(&mut **conn)
                    .await?
                    .rows_affected();
                    Ok(updated == 1)
                })
            })
            .await
    }

    /// Lease up to `limit` due orders; rows another replica is claiming are skipped, not waited on.
    async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<OrderRecord>, StoreError> {
        let instance = self.instance.clone();
        let lease = lease.as_millis() as i64;
        self.writes
            .write(move |conn: &mut PgConn| {
                let instance = instance.clone();
                Box::pin(async move {
                    let now = now_ms();
                    let rows = sqlx::query(
                        "UPDATE orders SET lease_until = $1, lease_owner = $2
                         WHERE id IN (SELECT id FROM orders
                                      WHERE state IN ('received', 'validated', 'submitted', 'pending')
                                      AND next_attempt_at <= $3 AND lease_until < $3
                                      ORDER BY next_attempt_at LIMIT $4 FOR UPDATE SKIP LOCKED)
                         RETURNING *",
                    )
                    .bind(now + lease)
                    .bind(&*instance)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&mut **conn)
                    .await?;
                    rows.iter().map(row_to_order).collect()
                })
            })
            .await
    }

    async fn order(&self, id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM orders WHERE id = $1")
            .bind(text(id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_order).transpose()
    }

    async fn live_order_for(&self, opportunity_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM orders WHERE opportunity_id = $1 AND state <> 'rejected'")
            .bind(text(opportunity_id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_to_order).transpose()
    }

    async fn orders_for(&self, opportunity_id: &str) -> Result<Vec<OrderRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM orders WHERE opportunity_id = $1 ORDER BY received_at DESC, id DESC")
                .bind(text(opportunity_id))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(row_to_order).collect()
    }

    async fn in_state(&self, state: State, limit: i64) -> Result<Vec<OrderRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM orders WHERE state = $1 ORDER BY updated_at LIMIT $2")
            .bind(state.as_str())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_order).collect()
    }

    async fn history(&self, id: &str) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, from_state, to_state, reason, repeats, last_at FROM transitions
             WHERE order_id = $1 ORDER BY seq",
        )
        .bind(text(id))
        .fetch_all(&self.pool)
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

    async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM orders GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("state")?, r.try_get("n")?))).collect()
    }

    fn outbox(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn super::outbox::EventOutbox>> {
        Some(self)
    }

    fn lifecycle(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn super::lifecycle::OrderLifecycle>> {
        Some(self)
    }
}
