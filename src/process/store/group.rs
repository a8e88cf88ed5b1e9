//! Group commit: the writes of concurrent requests share one transaction, so many orders cost
//! one commit (one fsync on SQLite's `synchronous: full`, one WAL flush on PostgreSQL) instead
//! of one each. A caller is answered only after the transaction that holds its write commits.
//!
//! Writes queue (bounded) for a writer thread; each lane takes what has queued, up to
//! `max_batch`, and runs it in one transaction. Nothing waits to fill a batch: a write that
//! finds the lane idle runs alone at once, and under load the writes that queued during one
//! commit form the next batch. When any write of a batch fails (a database error, a deadlock
//! with another replica), the batch is rolled back and every write in it runs again alone, so
//! one bad write never fails the others and each caller gets its own write's outcome.

use super::StoreError;
use futures_util::future::{BoxFuture, FutureExt};
use prometheus::{Histogram, HistogramOpts, HistogramVec};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Writes waiting for a lane at most; a caller beyond it waits to queue (back-pressure).
const QUEUE: usize = 4096;

/// How the writer reaches its database: a connection per group, and the transaction around it.
pub trait Backend: Send + Sync + 'static {
    type Conn: Send + 'static;
    /// The `backend` label of `causeway_store_writes_per_commit`; `None` for a group that
    /// commits nothing (SQLite's reads, which share this queue to share wake-ups).
    fn label(&self) -> Option<&'static str>;
    /// A connection for the next group.
    fn connect(&self) -> BoxFuture<'_, Result<Self::Conn, StoreError>>;
    /// `BEGIN`, `COMMIT` or `ROLLBACK`.
    fn execute<'c>(
        &self,
        conn: &'c mut Self::Conn,
        statement: &'static str,
    ) -> BoxFuture<'c, Result<(), StoreError>>;
    /// The group is done with `conn`; `healthy` is false after a failed BEGIN, COMMIT or
    /// ROLLBACK (the connection may be in any state: close it rather than reuse it).
    fn put_back(&self, conn: Self::Conn, healthy: bool);
}

/// A queued write with its caller.
trait Job<C>: Send {
    /// Run on `conn`, keeping the outcome; `false` when the write failed.
    fn run<'c>(&'c mut self, conn: &'c mut C) -> BoxFuture<'c, bool>;
    /// Answer the caller with the kept outcome, or with `failed` (its transaction did not commit).
    fn answer(self: Box<Self>, failed: Option<&StoreError>);
}

/// A write (run again alone when its batch fails, so it is `Fn`) and who waits for it.
struct Pending<T, F> {
    write: F,
    outcome: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<C, T, F> Job<C> for Pending<T, F>
where
    C: Send + 'static,
    T: Send + 'static,
    F: for<'c> Fn(&'c mut C) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
{
    fn run<'c>(&'c mut self, conn: &'c mut C) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            // A write that panics fails alone; the writer thread, and every later write, lives on.
            let panicked = || {
                tracing::error!("an order store write panicked; it failed, the store carries on");
                Err(StoreError("the write failed unexpectedly (a bug; see the log)".into()))
            };
            let write = &self.write;
            let outcome = match std::panic::catch_unwind(AssertUnwindSafe(once(move || write(conn)))) {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await.unwrap_or_else(|_| panicked()),
                Err(_) => panicked(),
            };
            let ok = outcome.is_ok();
            self.outcome = Some(outcome);
            ok
        })
    }

    fn answer(self: Box<Self>, failed: Option<&StoreError>) {
        let outcome = match (failed, self.outcome) {
            (Some(e), _) => Err(StoreError(e.0.clone())),
            (None, Some(outcome)) => outcome,
            (None, None) => Err(StoreError("the write was not run".into())),
        };
        // A caller that stopped waiting (its request was dropped) needs no answer.
        let _ = self.reply.send(outcome);
    }
}

/// `f` as a closure called once: lets it hand out what it captured (the connection's borrow).
fn once<R>(f: impl FnOnce() -> R) -> impl FnOnce() -> R {
    f
}

type Queue<C> = mpsc::Receiver<Box<dyn Job<C>>>;

/// The group-committing writer of one store.
pub struct GroupWriter<B: Backend> {
    queue: mpsc::Sender<Box<dyn Job<B::Conn>>>,
    /// Transactions committed (a write alone counts as one).
    #[cfg(test)]
    commits: Arc<AtomicU64>,
}

impl<B: Backend> GroupWriter<B> {
    /// Start the writer thread: `lanes` transactions at once at most (1 for SQLite, whose file
    /// has one writer), each of up to `max_batch` writes (1 turns group commit off).
    pub fn start(backend: B, lanes: usize, max_batch: usize, thread: &str) -> Result<Self, StoreError> {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let receiver: Arc<Mutex<Queue<B::Conn>>> = Arc::new(Mutex::new(receiver));
        let commits = Arc::new(AtomicU64::new(0));
        let counted = commits.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError(format!("cannot start the store's writer: {e}")))?;
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                let lanes = (0..lanes.max(1))
                    .map(|_| lane(&backend, receiver.clone(), counted.clone(), max_batch.max(1)));
                // The lanes share this thread; SQLite's one lane may block it, nothing else runs here.
                runtime.block_on(futures_util::future::join_all(lanes));
            })
            .map_err(|e| StoreError(format!("cannot start the store's writer: {e}")))?;
        Ok(GroupWriter {
            queue,
            #[cfg(test)]
            commits,
        })
    }

    /// Run `write` in the next transaction; its outcome once that transaction has committed.
    pub async fn write<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut B::Conn) -> BoxFuture<'c, Result<T, StoreError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Pending { write, outcome: None, reply };
        let stopped = || StoreError("the order store's writer has stopped".into());
        self.queue.send(Box::new(job)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Transactions committed so far.
    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Writes waiting for a lane now.
    #[cfg(test)]
    fn queued(&self) -> usize {
        QUEUE - self.queue.capacity()
    }
}

/// One lane: take what has queued, commit it, answer; until every sender is gone.
async fn lane<B: Backend>(
    backend: &B,
    queue: Arc<Mutex<Queue<B::Conn>>>,
    commits: Arc<AtomicU64>,
    max_batch: usize,
) {
    let sizes = backend.label().map(|label| writes_per_commit().with_label_values(&[label]));
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        if queue.lock().await.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        commit(backend, &mut batch, &sizes, &commits).await;
    }
}

/// Run `batch` in one transaction and answer every caller; drains `batch`. Each transaction
/// committed is counted (and its size observed) before its callers are answered.
async fn commit<B: Backend>(
    backend: &B,
    batch: &mut Vec<Box<dyn Job<B::Conn>>>,
    sizes: &Option<Histogram>,
    commits: &AtomicU64,
) {
    let observe = |n: usize| {
        commits.fetch_add(1, Ordering::Relaxed);
        sizes.iter().for_each(|h| h.observe(n as f64));
    };
    let mut conn = match backend.connect().await {
        Ok(conn) => conn,
        Err(e) => {
            batch.drain(..).for_each(|job| job.answer(Some(&e)));
            return;
        }
    };
    let size = batch.len();
    if size == 1 {
        // Alone: its own statement is its transaction, without BEGIN and COMMIT round trips.
        let mut job = batch.pop().expect("one job");
        if job.run(&mut conn).await {
            observe(1);
        }
        job.answer(None);
        return backend.put_back(conn, true);
    }
    let together = async {
        backend.execute(&mut conn, "BEGIN").await?;
        for job in batch.iter_mut() {
            if !job.run(&mut conn).await {
                backend.execute(&mut conn, "ROLLBACK").await?;
                return Ok(false);
            }
        }
        backend.execute(&mut conn, "COMMIT").await?;
        Ok::<_, StoreError>(true)
    };
    match together.await {
        Ok(true) => {
            observe(size);
            batch.drain(..).for_each(|job| job.answer(None));
            backend.put_back(conn, true);
        }
        // A failed write rolled the batch back; each write runs again alone for its own answer.
        Ok(false) => {
            for mut job in batch.drain(..) {
                if job.run(&mut conn).await {
                    observe(1);
                }
                job.answer(None);
            }
            backend.put_back(conn, true);
        }
        // The connection failed (or the commit did, whose outcome is then unknown): every
        // caller hears it, as it would have for its own statement.
        Err(e) => {
            batch.drain(..).for_each(|job| job.answer(Some(&e)));
            backend.put_back(conn, false);
        }
    }
}

/// Writes per committed transaction, by backend: how much group commit is grouping.
pub fn writes_per_commit() -> &'static HistogramVec {
    static METRIC: std::sync::OnceLock<HistogramVec> = std::sync::OnceLock::new();
    METRIC.get_or_init(|| {
        let metric = HistogramVec::new(
            HistogramOpts::new(
                "causeway_store_writes_per_commit",
                "Store writes committed together in one transaction (group commit)",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            &["backend"],
        )
        .expect("valid metric");
        // Registered once per process; a failure would be a duplicate name.
        let _ = crate::observe::metrics::Metrics::global().registry.register(Box::new(metric.clone()));
        metric
    })
}

#[cfg(test)]
mod tests {
    use super::super::sqlite::SqliteLink;
    use super::*;
    use rusqlite::Connection;
    use tokio::sync::Semaphore;

    type Writer = GroupWriter<SqliteLink>;

    /// A writer on a fresh SQLite file with a table `t(v TEXT UNIQUE)`, and a reader of the file.
    fn writer(max_batch: usize) -> (Writer, Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v TEXT UNIQUE NOT NULL)").unwrap();
        let reader = Connection::open(&path).unwrap();
        (GroupWriter::start(SqliteLink::writes(conn), 1, max_batch, "test-writer").unwrap(), reader, dir)
    }

    async fn insert(w: &Writer, table: &'static str, v: String) -> Result<i64, StoreError> {
        w.write(move |conn: &mut Connection| {
            let sql = format!("INSERT INTO {table} (v) VALUES (?) RETURNING rowid");
            let inserted = conn.query_row(&sql, [&v], |r| r.get::<_, i64>(0)).map_err(StoreError::from);
            Box::pin(std::future::ready(inserted))
        })
        .await
    }

    /// Queue an insert of each `(table, value)` while the lane is held, so they meet in the
    /// writer's queue, then let them run; their outcomes in order.
    async fn queued_together(
        w: &Arc<Writer>,
        reader: &Connection,
        rows: &[(&'static str, &str)],
    ) -> Vec<Result<i64, StoreError>> {
        let gate = Arc::new(Semaphore::new(0));
        let held = hold(w, &gate).await;
        let writes: Vec<_> = rows
            .iter()
            .map(|&(table, v)| {
                let (w, v) = (w.clone(), v.to_string());
                tokio::spawn(async move { insert(&w, table, v).await })
            })
            .collect();
        while w.queued() < rows.len() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(values(reader).is_empty(), "nothing is written while the lane is held");
        gate.add_permits(1);
        held.await.unwrap();
        let mut outcomes = Vec::new();
        for write in writes {
            outcomes.push(write.await.unwrap());
        }
        outcomes
    }

    /// Hold the writer's lane until `gate` gets a permit, so what is written next queues.
    async fn hold(w: &Arc<Writer>, gate: &Arc<Semaphore>) -> tokio::task::JoinHandle<()> {
        let (w, gate) = (w.clone(), gate.clone());
        let started = Arc::new(tokio::sync::Notify::new());
        let running = started.clone();
        let held = tokio::spawn(async move {
            w.write(move |conn: &mut Connection| {
                let (gate, running) = (gate.clone(), running.clone());
                Box::pin(async move {
                    running.notify_one();
                    let _ = gate.acquire().await;
                    conn.execute_batch("SELECT 1")?;
                    Ok(())
                })
            })
            .await
            .unwrap()
        });
        started.notified().await;
        held
    }

    fn values(reader: &Connection) -> Vec<String> {
        let mut select = reader.prepare("SELECT v FROM t ORDER BY rowid").unwrap();
        let rows = select.query_map([], |r| r.get::<_, String>(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[tokio::test]
    async fn writes_that_queue_together_commit_in_one_transaction_each_with_its_own_answer() {
        let (w, reader, _dir) = writer(64);
        let w = Arc::new(w);
        let names: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
        let rows: Vec<_> = names.iter().map(|v| ("t", v.as_str())).collect();
        let outcomes = queued_together(&w, &reader, &rows).await;
        let mut rowids = std::collections::HashSet::new();
        for (name, outcome) in names.iter().zip(outcomes) {
            let rowid = outcome.unwrap_or_else(|e| panic!("write {name}: {e}"));
            // Answered after the commit: another connection reads the caller's own row.
            let v: String =
                reader.query_row("SELECT v FROM t WHERE rowid = ?", [rowid], |r| r.get(0)).unwrap();
            assert_eq!(&v, name, "each caller hears its own write's outcome");
            rowids.insert(rowid);
        }
        assert_eq!(rowids.len(), 100);
        assert_eq!(values(&reader).len(), 100);
        assert_eq!(w.commits(), 3, "the held write alone, then 64 and 36 writes per transaction");
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone_and_the_others_of_its_batch_are_committed() {
        let (w, reader, _dir) = writer(64);
        let w = Arc::new(w);
        // "v3" twice: the second is refused by the unique index; a write to a missing table fails.
        let rows = [("t", "v1"), ("t", "v2"), ("t", "v3"), ("t", "v3"), ("t", "v4"), ("nowhere", "v5")];
        let outcomes: Vec<bool> =
            queued_together(&w, &reader, &rows).await.iter().map(Result::is_ok).collect();
        assert_eq!(outcomes, [true, true, true, false, true, false]);
        assert_eq!(
            values(&reader),
            ["v1", "v2", "v3", "v4"],
            "the failed writes left nothing, the others stand"
        );
    }

    #[tokio::test]
    async fn a_write_that_panics_fails_alone_and_the_writer_carries_on() {
        let (w, reader, _dir) = writer(64);
        let panicked = w
            .write(|_: &mut Connection| -> BoxFuture<'_, Result<(), StoreError>> {
                panic!("a bug in a write")
            })
            .await;
        assert!(panicked.is_err(), "the caller hears a failure, not silence");
        insert(&w, "t", "after".into()).await.expect("the writer still writes");
        assert_eq!(values(&reader), ["after"]);
    }

    #[tokio::test]
    async fn group_commit_1_commits_every_write_alone() {
        let (w, reader, _dir) = writer(1);
        let w = Arc::new(w);
        let names: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
        let rows: Vec<_> = names.iter().map(|v| ("t", v.as_str())).collect();
        for outcome in queued_together(&w, &reader, &rows).await {
            outcome.unwrap();
        }
        assert_eq!(values(&reader).len(), 10);
        assert_eq!(w.commits(), 11);
    }
}
