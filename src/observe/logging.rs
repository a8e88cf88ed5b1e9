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
    // The trace exporter's own lines (a collector refusing, spans dropped) are warnings and
    // errors; its informational chatter is left out unless RUST_LOG asks for it.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn"));
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

/// One access-log line, formatted by hand straight into the batch: the access log is written for
/// every request, and tracing's generic JSON formatter (field visitors, timestamp formatting)
/// costs noticeably more per line. Same shape as the other JSON lines.
pub struct AccessLine {
    buf: String,
}

impl AccessLine {
    pub fn new() -> Self {
        let mut buf = String::with_capacity(448);
        buf.push_str("{\"timestamp\":\"");
        push_rfc3339(&mut buf, std::time::SystemTime::now());
        buf.push_str("\",\"level\":\"INFO\",\"target\":\"access\"");
        AccessLine { buf }
    }

    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        push_json_string(&mut self.buf, value);
        self
    }

    pub fn opt_str(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.str(key, v),
            None => self,
        }
    }

    pub fn uint(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        self.buf.push_str(itoa::Buffer::new().format(value));
        self
    }

    /// A string value `write` appends itself, without a copy or the formatting machinery (an
    /// address, say). It must append text that needs no JSON escaping: no `"`, `\\` or control
    /// characters.
    pub fn text_with(mut self, key: &str, write: impl FnOnce(&mut String)) -> Self {
        self.key(key);
        self.buf.push('"');
        write(&mut self.buf);
        self.buf.push('"');
        self
    }

    /// Milliseconds with microsecond precision (`12.345`).
    pub fn millis(mut self, key: &str, seconds: Option<f64>) -> Self {
        if let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0) {
            self.key(key);
            let micros = (s * 1e6).round() as u64;
            self.buf.push_str(itoa::Buffer::new().format(micros / 1000));
            self.buf.push('.');
            push_padded(&mut self.buf, micros % 1000, 3);
        }
        self
    }

    fn key(&mut self, key: &str) {
        self.buf.push_str(",\"");
        self.buf.push_str(key);
        self.buf.push_str("\":");
    }

    pub fn write(mut self) {
        self.buf.push_str("}\n");
        let _ = BatchWriter.write(self.buf.as_bytes());
    }
}

impl Default for AccessLine {
    fn default() -> Self {
        Self::new()
    }
}

fn push_json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    // Almost every value (route, path, ids) needs no escaping: copied whole.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `value` in decimal, left-padded with zeros to `width` digits.
fn push_padded(out: &mut String, value: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(value);
    for _ in text.len()..width {
        out.push('0');
    }
    out.push_str(text);
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC), without a date library. The part up to the seconds is
/// kept per thread for the second it names: a busy worker writes it once a second.
fn push_rfc3339(out: &mut String, t: std::time::SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            text.clear();
            push_date_time(text, secs);
            *second = secs;
        }
        out.push_str(text);
    });
    out.push('.');
    push_padded(out, u64::from(d.subsec_micros()), 6);
    out.push('Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch (UTC).
fn push_date_time(out: &mut String, secs: u64) {
    use std::fmt::Write as _;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ =
        write!(out, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_and_escaping() {
        let mut s = String::new();
        push_rfc3339(&mut s, UNIX_EPOCH + Duration::from_micros(1_795_737_600_123_456));
        assert_eq!(s, "2026-11-27T00:00:00.123456Z");
        let mut s = String::new();
        push_rfc3339(&mut s, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, r#""a\"b\\c\n\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\n\u{1}é");
        let mut s = String::new();
        push_json_string(&mut s, "/erp/v2/salesOrders");
        assert_eq!(s, "\"/erp/v2/salesOrders\"");
        // Two stamps within one second share the cached part; the next second renews it.
        let mut s = String::new();
        push_rfc3339(&mut s, UNIX_EPOCH + Duration::from_micros(1_795_737_600_000_001));
        push_rfc3339(&mut s, UNIX_EPOCH + Duration::from_micros(1_795_737_601_999_999));
        assert_eq!(s, "2026-11-27T00:00:00.000001Z2026-11-27T00:00:01.999999Z");
    }

    #[test]
    fn numbers_are_written_as_json_numbers() {
        let line = AccessLine { buf: String::new() }
            .uint("status", 201)
            .millis("a", Some(0.0123456))
            .millis("b", Some(2.0))
            .millis("c", Some(0.0000004))
            .millis("d", None)
            .millis("e", Some(f64::NAN))
            .text_with("client", |out| out.push_str("192.0.2.7"));
        assert_eq!(line.buf, r#","status":201,"a":12.346,"b":2000.000,"c":0.000,"client":"192.0.2.7""#);
    }
}
