//! jq programs (jaq) for what a mapping table cannot say, compiled once at load time.
//!
//! A jq program can loop forever and jaq has no interruption point, so programs run on a small
//! pool of dedicated threads and the caller waits at most the transformation's time bound. A
//! program that overruns keeps its worker until it finishes; the pool is bounded, so a stuck
//! program costs at most its worker, and once every worker is busy callers are refused at once
//! instead of queueing behind it.

use jaq_core::data::JustLut;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars};
use jaq_json::Val;
use serde::Deserialize;
use serde_json::Value;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Shadows what a gateway transformation must not reach: the process environment (where ERP
/// credentials live), stopping the process, reading stdin and writing to stderr. jaq's standard
/// definitions build on these natives, so they are overridden rather than removed.
const PRELUDE: &str = concat!(
    "def env: error(\"env is not available to gateway transformations\"); ",
    "def halt: error(\"halt is not available to gateway transformations\"); ",
    "def halt_error: error(\"halt_error is not available to gateway transformations\"); ",
    "def halt_error($code): error(\"halt_error is not available to gateway transformations\"); ",
    "def input: error(\"input is not available to gateway transformations\"); ",
    "def inputs: error(\"inputs is not available to gateway transformations\"); ",
    "def debug: .; def debug(msg): .; def stderr: .; ",
);

type Filter = jaq_core::Filter<JustLut<Val>>;

#[derive(Clone)]
pub struct JqProgram {
    filter: Arc<Filter>,
}

impl std::fmt::Debug for JqProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JqProgram")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum JqFailure {
    /// The program raised an error, produced no output, or produced something not JSON.
    Program(String),
    /// It did not finish within the time bound.
    Timeout,
    /// Every worker is busy (with programs that overran, or with load).
    Busy,
}

impl JqProgram {
    pub fn compile(code: &str) -> Result<JqProgram, String> {
        let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
        let funs = jaq_core::funs().chain(jaq_std::funs()).chain(jaq_json::funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let code = format!("{PRELUDE}{code}");
        let modules = loader
            .load(&arena, File { code: code.as_str(), path: () })
            .map_err(|errs| format!("jq program does not parse: {}", describe(&errs)))?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errs| format!("jq program does not compile: {}", describe(&errs)))?;
        Ok(JqProgram { filter: Arc::new(filter) })
    }

    /// Run in the calling thread; the first output is the result. For the worker pool and tests.
    pub fn run_inline(&self, input: &Value) -> Result<Value, String> {
        let val = Val::deserialize(input).map_err(|e| format!("input is not JSON: {e}"))?;
        let ctx = Ctx::<JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        let mut outputs = self.filter.id.run((ctx, val)).map(jaq_core::unwrap_valr);
        match outputs.next() {
            None => Err("the jq program produced no output".into()),
            Some(Err(e)) => Err(format!("the jq program failed: {e}")),
            Some(Ok(v)) => serde_json::from_str(&v.to_string())
                .map_err(|e| format!("the jq program produced something that is not JSON: {e}")),
        }
    }

    /// Run on the worker pool; the calling task waits at most `limit` without blocking its thread.
    pub async fn run_bounded_async(&self, input: Value, limit: Duration) -> Result<Value, JqFailure> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let program = self.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send(program.run_inline(&input));
        });
        pool().try_send(job).map_err(|_| JqFailure::Busy)?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result.map_err(JqFailure::Program),
            Ok(Err(_)) => Err(JqFailure::Program("the jq worker stopped".into())),
            Err(_) => Err(JqFailure::Timeout),
        }
    }

    /// Run on the worker pool, blocking the calling thread at most `limit` (benchmarks, tools).
    pub fn run_bounded(&self, input: Value, limit: Duration) -> Result<Value, JqFailure> {
        let (tx, rx) = mpsc::sync_channel(1);
        let program = self.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send(program.run_inline(&input));
        });
        pool().try_send(job).map_err(|_| JqFailure::Busy)?;
        match rx.recv_timeout(limit) {
            Ok(result) => result.map_err(JqFailure::Program),
            Err(_) => Err(JqFailure::Timeout),
        }
    }
}

/// jaq reports errors per file; only the error part means anything to an operator.
fn describe<F, E: std::fmt::Debug>(errs: &[(F, E)]) -> String {
    let text: Vec<String> = errs.iter().map(|(_, e)| format!("{e:?}")).collect();
    text.join("; ").chars().take(400).collect()
}

type Job = Box<dyn FnOnce() + Send>;

const WORKERS: usize = 2;
/// Jobs waiting for a worker; beyond it callers are refused (`Busy`) rather than queued.
const QUEUE: usize = 64;

fn pool() -> &'static mpsc::SyncSender<Job> {
    static POOL: OnceLock<mpsc::SyncSender<Job>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let rx = Arc::new(parking_lot::Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("causeway-jq-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job();
                })
                .expect("spawning a jq worker thread");
        }
        tx
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runs_and_takes_the_first_output() {
        let p = JqProgram::compile(".lines | map(.qty * 2) | add").unwrap();
        assert_eq!(p.run_inline(&json!({"lines": [{"qty": 1}, {"qty": 2.5}]})).unwrap(), json!(7.0));
        let many = JqProgram::compile(".[]").unwrap();
        assert_eq!(many.run_inline(&json!([1, 2])).unwrap(), json!(1));
        assert!(JqProgram::compile("empty").unwrap().run_inline(&json!(1)).is_err());
        assert!(JqProgram::compile("error(\"no\")").unwrap().run_inline(&json!(1)).is_err());
    }

    #[test]
    fn unicode_survives() {
        let p = JqProgram::compile("{name: (.n + \" ✓\")}").unwrap();
        assert_eq!(p.run_inline(&json!({"n": "Müller 𝄞"})).unwrap(), json!({"name": "Müller 𝄞 ✓"}));
    }

    #[test]
    fn syntax_errors_fail_to_compile_and_the_environment_is_out_of_reach() {
        assert!(JqProgram::compile(".a | ").is_err());
        assert!(JqProgram::compile("$ENV").is_err(), "no $ENV variable is bound");
        std::env::set_var("CAUSEWAY_JQ_TEST_SECRET", "s3cret");
        for code in ["env", "env.CAUSEWAY_JQ_TEST_SECRET", "halt", "halt_error", "input"] {
            let err = JqProgram::compile(code).unwrap().run_inline(&json!({})).unwrap_err();
            assert!(err.contains("not available"), "{code}: {err}");
            assert!(!err.contains("s3cret"));
        }
        assert_eq!(JqProgram::compile("debug | .a").unwrap().run_inline(&json!({"a": 1})).unwrap(), json!(1));
    }

    #[test]
    fn an_endless_program_is_cut_off_by_the_time_bound() {
        let p = JqProgram::compile("def f: f; f").unwrap();
        let started = std::time::Instant::now();
        assert_eq!(p.run_bounded(json!(1), Duration::from_millis(50)), Err(JqFailure::Timeout));
        assert!(started.elapsed() < Duration::from_secs(5), "the caller is not held");
    }
}
