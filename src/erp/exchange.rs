//! What every adapter shares: one budgeted exchange with the ERP (a permit from the upstream's
//! budget, the request, the outcome reported back), the budget classes adapters use, and the
//! master-data caches.

use crate::budget::throttle::{body_signals_overload, judge, Class, Outcome, Refusal};
use crate::config::Upstream;
use crate::process::adapter::AdapterError;
use std::collections::HashMap;
use std::time::Duration;

/// Master data is kept this long: long enough to spare the ERP's budget on bursts of quotes,
/// short enough that a fixed customer record is seen within minutes.
pub const MASTER_DATA_TTL: Duration = Duration::from_secs(120);
const MASTER_DATA_ENTRIES: u64 = 10_000;

/// A bounded master-data cache with the TTL above.
pub fn master_cache<V: Clone + Send + Sync + 'static>() -> moka::future::Cache<String, V> {
    moka::future::Cache::builder().max_capacity(MASTER_DATA_ENTRIES).time_to_live(MASTER_DATA_TTL).build()
}

/// Take a permit from the upstream's budget (none when it has no budget).
pub async fn permit(
    upstream: &Upstream,
    class: &Class,
) -> Result<Option<crate::budget::throttle::Permit>, AdapterError> {
    match upstream.budget.as_ref() {
        Some(b) => b
            .budget
            .acquire(class, crate::budget::throttle::current_consumer().as_ref())
            .await
            .map(Some)
            .map_err(|r| match r {
                // The gateway's own budget holding the call back is waiting, not an ERP failure.
                Refusal::Busy { .. } => AdapterError::Throttled("the ERP budget is exhausted".into()),
                Refusal::CircuitOpen { .. } => AdapterError::Unavailable("the ERP circuit is open".into()),
            }),
        None => Ok(None),
    }
}

/// Largest ERP answer an adapter reads.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// How often one step is sent again after the ERP asked to wait, within one attempt.
pub const OVERLOAD_RETRIES: u32 = 5;

/// Send `request` under a permit from the upstream's budget and report the outcome to it, judged
/// like every answer that reaches the ERP ([`crate::budget::throttle::judge`], vendor overload
/// signals included). A 429, an answer with `Retry-After` or a vendor overload signal is the ERP
/// asking to wait: the budget pauses, and the same step is sent again once it admits (up to
/// [`OVERLOAD_RETRIES`] times, each wait bounded by the class's deadline), so a delivery of several
/// calls is not failed by one refused step; if the ERP still asks, `Throttled`. A failure (a bare
/// 503 included: an outage) or an open circuit is `Unavailable`; a budget that cannot admit in
/// time is `Throttled` like the ERP asking to wait; any other
/// status comes back with its body (at most [`MAX_ANSWER_BYTES`]).
pub async fn exchange(
    upstream: &Upstream,
    class: &Class,
    request: reqwest::RequestBuilder,
) -> Result<(u16, bytes::Bytes), AdapterError> {
    let mut overloads = 0;
    loop {
        let step = request
            .try_clone()
            .ok_or_else(|| AdapterError::Protocol("the request body cannot be sent twice".into()))?;
        match exchange_once(upstream, class, step).await {
            // Without a budget nothing paces the retry: the caller's own backoff has to.
            Err(Step::Overloaded(_)) if overloads < OVERLOAD_RETRIES && upstream.budget.is_some() => {
                overloads += 1
            }
            Err(Step::Overloaded(message)) => return Err(AdapterError::Throttled(message)),
            Err(Step::Failed(e)) => return Err(e),
            Ok(answer) => return Ok(answer),
        }
    }
}

enum Step {
    /// The ERP asked to wait (429, a `Retry-After`, a vendor signal); the budget is paused.
    /// A bare 503 is an outage, not a request to wait: it fails the attempt like a 500.
    Overloaded(String),
    Failed(AdapterError),
}

impl From<AdapterError> for Step {
    fn from(e: AdapterError) -> Self {
        Step::Failed(e)
    }
}

async fn exchange_once(
    upstream: &Upstream,
    class: &Class,
    request: reqwest::RequestBuilder,
) -> Result<(u16, bytes::Bytes), Step> {
    let permit = permit(upstream, class).await?;
    let report = |o: Outcome| {
        if let Some(p) = &permit {
            p.budget().report(o);
        }
    };
    let mut response = match request.timeout(upstream.connect_timeout + upstream.read_timeout).send().await {
        Ok(r) => r,
        Err(e) => {
            report(Outcome::Failure);
            let why = match crate::config::upstream_tls::tls_failure(&e) {
                Some(tls) => format!("TLS with the ERP failed: {tls}; fix upstreams.{}.tls", upstream.name),
                None => e.to_string(),
            };
            return Err(AdapterError::Unavailable(why).into());
        }
    };
    let status = response.status().as_u16();
    let signals = upstream.budget.as_ref().map_or(&[][..], |b| &b.overload_signals[..]);
    let retry_after = response.headers().get(http::header::RETRY_AFTER).map(|v| v.as_bytes().to_vec());
    let (mut outcome, markers) = judge(status, retry_after.as_deref(), signals);
    let mut body = bytes::BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_ANSWER_BYTES => body.extend_from_slice(&chunk),
            Ok(Some(_)) => {
                // The ERP answered, with more than an adapter takes: judged by its status, not
                // counted as the ERP's failure toward the circuit.
                report(outcome.clone());
                return Err(AdapterError::Protocol(format!(
                    "{} answered more than {MAX_ANSWER_BYTES} bytes",
                    upstream.name
                ))
                .into());
            }
            Ok(None) => break,
            Err(e) => {
                report(Outcome::Failure);
                return Err(AdapterError::Unavailable(e.to_string()).into());
            }
        }
    }
    if body_signals_overload(&markers, &body) {
        outcome = Outcome::Overload(None);
    }
    let asked_to_wait = matches!(outcome, Outcome::Overload(_)) && (status != 503 || retry_after.is_some());
    let failed = !asked_to_wait && !matches!(outcome, Outcome::Success);
    report(outcome);
    let message = format!("{} answered {status}", upstream.name);
    if asked_to_wait {
        return Err(Step::Overloaded(message));
    }
    if failed {
        return Err(AdapterError::Unavailable(message).into());
    }
    Ok((status, body.freeze()))
}

/// `keys` (each once) split into what `cache` holds, found (known-absent ones left out), and
/// what it does not hold yet: those are fetched together.
pub async fn split_cached<'k, V: Clone + Send + Sync + 'static>(
    cache: &moka::future::Cache<String, Option<V>>,
    keys: &[&'k str],
) -> (HashMap<String, V>, Vec<&'k str>) {
    let mut found = HashMap::new();
    let mut missing: Vec<&str> = Vec::new();
    for key in keys {
        match cache.get(*key).await {
            Some(Some(v)) => {
                found.insert(key.to_string(), v);
            }
            Some(None) => {}
            None if !missing.contains(key) => missing.push(key),
            None => {}
        }
    }
    (found, missing)
}

/// Budget classes for lookups (interactive) and writes.
pub fn classes(up: &Upstream) -> (Class, Class) {
    let class = |name: &str| up.budget.as_ref().and_then(|b| b.classes.get(name).cloned());
    let default_class = up.budget.as_ref().map(|b| b.default_class.clone());
    (
        class("interactive").or(default_class.clone()).unwrap_or_else(Class::unlimited),
        class("write").or(default_class).unwrap_or_else(Class::unlimited),
    )
}

/// The class change detection's ERP calls take: the configured one, else the budget's
/// lowest-priority class (it yields to every caller waiting), else unlimited.
pub fn change_class(up: &Upstream, changes: Option<&crate::config::ChangeSettings>) -> Class {
    let Some(budget) = up.budget.as_ref() else { return Class::unlimited() };
    changes
        .and_then(|c| c.class.as_ref())
        .and_then(|name| budget.classes.get(name).cloned())
        .or_else(|| budget.classes.values().max_by_key(|c| (c.priority, c.name.clone())).cloned())
        .unwrap_or_else(|| budget.default_class.clone())
}
