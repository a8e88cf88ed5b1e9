//! JSON logs through `tracing`. Request threads append formatted lines to a bounded in-memory
//! batch; one thread writes the batch to stdout every few milliseconds. A write per batch instead
//! of a write (and a thread wake-up) per line keeps logging off the request path's budget; when
//! stdout cannot keep up, lines beyond the bound are dropped and counted, never blocking requests.

use parking_lot::{Condvar, Mutex};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Most bytes waiting for the writer thread before lines are dropped.
const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(20);

struct Batch {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    dropped: AtomicU64,
}

static BATCH: OnceLock<Batch> = OnceLock::new();

fn batch() -> &'static Batch {
    BATCH.get_or_init(|| Batch {
        pending: Mutex::new(Vec::with_capacity(64 * 1024)),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
    })
}

/// The `MakeWriter` handed to tracing: each event's line is appended to the batch.
#[derive(Clone, Copy)]
struct BatchWriter;

impl Write for BatchWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let b = batch();
        let mut pending = b.pending.lock();
        if pending.len() + buf.len() > MAX_PENDING_BYTES {
            b.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            pending.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;
    fn make_writer(&'a self) -> Self::Writer {
        BatchWriter
    }
}

/// Install the global subscriber: JSON lines on stdout, level from `RUST_LOG` (default info).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(BatchWriter)
        .try_init()
        .is_ok();
    if installed {
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(|| loop {
                {
                    let b = batch();
                    let mut pending = b.pending.lock();
                    b.wake.wait_for(&mut pending, FLUSH_EVERY);
                }
                flush();
            })
            .expect("log writer thread");
    }
}

/// Write out buffered log lines now (the writer thread does this periodically; call before exit).
pub fn flush() {
    let b = batch();
    let lines = std::mem::replace(&mut *b.pending.lock(), Vec::with_capacity(64 * 1024));
    let dropped = b.dropped.swap(0, Ordering::Relaxed);
    let mut out = std::io::stdout().lock();
    if !lines.is_empty() {
        let _ = out.write_all(&lines);
    }
    if dropped > 0 {
        let _ = writeln!(
            out,
            r#"{{"level":"WARN","message":"log lines dropped: stdout too slow","dropped":{dropped}}}"#
        );
    }
    let _ = out.flush();
}
