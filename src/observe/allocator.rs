//! Handing freed memory back to the OS. mimalloc keeps the pages a thread freed until that
//! thread collects, and purges them from its arenas only when a collection finds the purge delay
//! passed; a worker that goes quiet after a burst (1,000 slow connections closed at the header
//! deadline) would keep their memory. So each worker collects at most once a second as it
//! handles requests ([`collect_if_due`], a clock read per request), and a collector thread
//! purges the arenas every second however busy the workers are ([`spawn_collector`]). Purging at
//! once instead (`purge_delay` 0) cost 13% of throughput (BENCHMARKS.md "Memory").

#[cfg(feature = "mimalloc")]
use std::time::{Duration, Instant};

#[cfg(feature = "mimalloc")]
const EVERY: Duration = Duration::from_secs(1);

/// Collect this thread's freed pages if it has not for a second.
pub fn collect_if_due() {
    #[cfg(feature = "mimalloc")]
    {
        thread_local! {
            static LAST: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
        }
        let now = Instant::now();
        let due = LAST.with(|last| match last.get() {
            Some(t) if now.duration_since(t) < EVERY => false,
            _ => {
                last.set(Some(now));
                true
            }
        });
        if due {
            // SAFETY: collects the calling thread's heap and the process's arenas.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    }
}

/// Start the thread that purges the arenas every second (a no-op without mimalloc).
pub fn spawn_collector() {
    #[cfg(feature = "mimalloc")]
    {
        let _ = std::thread::Builder::new().name("allocator-collect".into()).spawn(|| loop {
            std::thread::sleep(EVERY);
            // SAFETY: as above; this thread's own heap is nearly empty.
            unsafe { libmimalloc_sys::mi_collect(false) };
        });
    }
}
