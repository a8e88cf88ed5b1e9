//! The store test suite, run against every backend: SQLite always, PostgreSQL where one answers
//! (`CAUSEWAY_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`; each test gets a schema
//! of its own). The same assertions hold for both, so the service can run on either.

use super::lifecycle::{Milestone, OrderLifecycle};
use super::outbox::{Attempted, EventOutbox};
use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{Change, KeyState, NewOrder, OrderStore};
use crate::config::spec::Synchronous;
use crate::process::instance;
use crate::process::state::State;
use std::str::FromStr;
use std::time::Duration;

/// A backend under test, acting for whichever process a test needs.
pub trait SuiteStore: OrderStore + EventOutbox + OrderLifecycle + Clone + 'static {
    /// This store as used by the process named `local` (`pid:start`) on this host.
    fn for_process(&self, local: &str) -> Self;
}

impl SuiteStore for SqliteStore {
    fn for_process(&self, local: &str) -> Self {
        self.clone().as_process(local)
    }
}

impl SuiteStore for PostgresStore {
    fn for_process(&self, local: &str) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        self.clone().as_process(&format!("{}/{local}", host.trim()))
    }
}

pub async fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStore::open(&dir.path().join("data/orders.db"), Synchronous::Full, 64).await.unwrap(), dir)
}

pub fn postgres_url() -> String {
    std::env::var("CAUSEWAY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A PostgreSQL store in a fresh schema, or `None` (with a message) when no server listens.
/// A server that answers but refuses (wrong role, no database) fails the test: that is a
/// configuration to fix, not a machine without PostgreSQL.
pub async fn postgres(test: &str) -> Option<(PostgresStore, String)> {
    let url = postgres_url();
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).expect("CAUSEWAY_TEST_POSTGRES is a URL");
    let address = (options.get_host().to_string(), options.get_port());
    if tokio::net::TcpStream::connect(address).await.is_err() {
        let remedy = "start PostgreSQL (trust auth, database `test`) or set CAUSEWAY_TEST_POSTGRES";
        // Under CI a missing service fails the run: a green run must have tested both stores.
        let ci = ["CI", "CAUSEWAY_REQUIRE_SERVICES"]
            .iter()
            .any(|n| std::env::var(n).is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false")));
        assert!(!ci, "PostgreSQL at {url} is missing for {test}: {remedy}");
        eprintln!("SKIPPED {test} on PostgreSQL: nothing listens at {url}; {remedy}");
        return None;
    }
    let admin = PostgresStore::open(&url, 2, Duration::from_secs(5), 64)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let schema = format!("causeway_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(admin.pool()).await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{sep}options[search_path]={schema}");
    Some((PostgresStore::open(&scoped, 8, Duration::from_secs(5), 64).await.unwrap(), schema))
}

pub async fn drop_schema(schema: &str) {
    if let Ok(admin) = PostgresStore::open(&postgres_url(), 2, Duration::from_secs(3), 64).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(admin.pool())
            .await;
    }
}

fn new_order<'a>(
    id: &'a str,
    opportunity_id: &'a str,
    state: State,
    reason: &'a str,
    lease: Option<Duration>,
) -> NewOrder<'a> {
    NewOrder {
        id,
        owner: "keys/crm",
        opportunity_id,
        state,
        quote: "{}",
        validated: true,
        violations: None,
        correlation_id: "c",
        traceparent: "",
        reason,
        lease,
    }
}

pub async fn an_idempotency_key_is_claimed_once_then_replayed_refused_or_released(s: impl SuiteStore) {
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
    assert_eq!(s.claim_key("k2", "other", ttl).await.unwrap(), KeyState::Claimed, "released keys are free");
    // Expired keys are forgotten.
    assert_eq!(s.claim_key("k3", "f", Duration::ZERO).await.unwrap(), KeyState::Claimed);
    s.complete_key("k3", 201, None, b"").await.unwrap();
    assert_eq!(s.claim_key("k3", "g", ttl).await.unwrap(), KeyState::Claimed);
    // Keys and bodies are stored as given, whatever they hold.
    let odd = "k\u{0}\u{202e}\u{1F600}\n\u{FEFF}";
    assert_eq!(s.claim_key(odd, "f", ttl).await.unwrap(), KeyState::Claimed);
    s.complete_key(odd, 409, None, &[0, 255, 1]).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.claim_key(odd, "f", ttl).await.unwrap(),
        KeyState::Done { status: 409, location: None, body: vec![0, 255, 1] }
    );
    assert_eq!(s.purge_expired_keys().await.unwrap(), 0, "nothing has expired");
}

pub async fn one_live_order_per_opportunity_and_guarded_transitions_with_history(s: impl SuiteStore) {
    assert_eq!(
        s.insert_order(new_order("a", "OPP-1", State::Rejected, "why", None)).await.unwrap().unwrap().state,
        State::Rejected
    );
    assert!(
        s.insert_order(new_order("b", "OPP-1", State::Validated, "why", None)).await.unwrap().is_some(),
        "a rejected order does not block"
    );
    assert!(
        s.insert_order(new_order("c", "OPP-1", State::Validated, "why", None)).await.unwrap().is_none(),
        "a second live order is refused"
    );
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
    let steps: Vec<(Option<String>, String, String)> =
        s.history("b").await.unwrap().into_iter().map(|t| (t.from, t.to, t.reason)).collect();
    let step =
        |from: Option<&str>, to: &str, why: &str| (from.map(String::from), to.to_string(), why.to_string());
    assert_eq!(
        steps,
        [
            step(None, "validated", "why"),
            step(Some("validated"), "submitted", "attempt"),
            step(Some("submitted"), "accepted", "done")
        ],
        "the database records each change with its reason, and only real changes"
    );
    assert_eq!(s.orders_for("OPP-1").await.unwrap().len(), 2);
    let counts = s.count_by_state().await.unwrap();
    assert!(
        counts.contains(&("accepted".into(), 1)) && counts.contains(&("rejected".into(), 1)),
        "{counts:?}"
    );
    assert_eq!(s.in_state(State::Accepted, 10).await.unwrap().len(), 1);
}

pub async fn due_orders_are_leased_once_and_only_leases_of_stopped_processes_are_taken_back(
    s: impl SuiteStore,
) {
    let lease = Duration::from_secs(60);
    let settle = Duration::from_secs(30);
    let gone = s.for_process("1:1");
    gone.insert_order(new_order("a", "OPP-A", State::Pending, "why", None)).await.unwrap();
    gone.insert_order(new_order("b", "OPP-B", State::Accepted, "why", None)).await.unwrap();
    let due: Vec<String> = gone.claim_due(10, lease).await.unwrap().into_iter().map(|o| o.id).collect();
    assert_eq!(due, ["a"], "only deliverable orders");
    assert!(s.claim_due(10, lease).await.unwrap().is_empty(), "a leased order is not handed out twice");

    // Another process that still runs (the old one during a graceful upgrade) keeps its lease.
    let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let running = instance::name_of(sleeper.id()).expect("the child runs");
    let live = s.for_process(&running);
    live.insert_order(new_order("c", "OPP-C", State::Pending, "why", None)).await.unwrap();
    assert_eq!(live.claim_due(10, lease).await.unwrap().len(), 1);
    assert_eq!(s.recover(settle).await.unwrap(), 1, "only the stopped process's lease");
    let due: Vec<String> = s.claim_due(10, lease).await.unwrap().into_iter().map(|o| o.id).collect();
    assert_eq!(due, ["a"], "the running process's order stays with it");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_eq!(s.recover(settle).await.unwrap(), 1, "its lease is taken back once it is gone");
}

pub async fn a_stopped_process_mid_submission_is_retried_only_after_its_request_settles(s: impl SuiteStore) {
    let gone = s.for_process("1:1");
    gone.insert_order(new_order("a", "OPP-A", State::Validated, "why", Some(Duration::from_secs(60))))
        .await
        .unwrap();
    let begin =
        Change { reason: "delivery attempt 1", count_attempt: true, keep_lease: true, ..Default::default() };
    assert!(gone.transition("a", State::Validated, State::Submitted, begin).await.unwrap());
    assert_eq!(s.recover(Duration::from_secs(30)).await.unwrap(), 1);
    assert!(
        s.claim_due(10, Duration::from_secs(60)).await.unwrap().is_empty(),
        "its last request may still be under way"
    );
    let order = s.order("a").await.unwrap().unwrap();
    assert!(order.next_attempt_at >= order.updated_at + 30_000);
}

pub async fn in_flight_keys_of_stopped_processes_are_released_and_live_ones_kept(s: impl SuiteStore) {
    let ttl = Duration::from_secs(60);
    let gone = s.for_process("1:1");
    assert_eq!(gone.claim_key("k1", "f", ttl).await.unwrap(), KeyState::Claimed);
    assert_eq!(s.claim_key("k2", "f", ttl).await.unwrap(), KeyState::Claimed);
    s.recover(Duration::ZERO).await.unwrap();
    assert_eq!(
        s.claim_key("k1", "f", ttl).await.unwrap(),
        KeyState::Claimed,
        "the stopped process's key is free"
    );
    assert_eq!(s.claim_key("k2", "f", ttl).await.unwrap(), KeyState::InFlight, "this process's is not");
}

pub async fn a_repeated_state_is_one_history_entry_with_a_count(s: impl SuiteStore) {
    s.insert_order(new_order("a", "OPP-A", State::Received, "received", None)).await.unwrap();
    let reasons: Vec<String> = (1..=5).map(|n| format!("retry {n}")).collect();
    let wait = |n: usize| Change { reason: &reasons[n - 1], count_attempt: true, ..Default::default() };
    assert!(s.transition("a", State::Received, State::Pending, wait(1)).await.unwrap());
    for n in 2..=5 {
        assert!(s.transition("a", State::Pending, State::Pending, wait(n)).await.unwrap());
    }
    let history = s.history("a").await.unwrap();
    assert_eq!(history.len(), 2, "received, then pending once: {history:?}");
    assert_eq!((history[1].repeats, history[1].reason.as_str()), (4, "retry 5"));
    assert!(history[1].last_at.is_some());
    assert_eq!(s.order("a").await.unwrap().unwrap().attempts, 5);
}

/// Many writers at once (replicas, or one replica's many requests): one order per opportunity,
/// one holder per key, and every due order claimed by exactly one deliverer.
pub async fn racing_writers_get_one_order_one_key_holder_and_disjoint_claims(s: impl SuiteStore) {
    let ids: Vec<String> = (0..16).map(|i| format!("race-{i}")).collect();
    let inserts = ids.iter().map(|id| {
        let s = s.clone();
        let id = id.clone();
        async move { s.insert_order(new_order(&id, "OPP-RACE", State::Pending, "why", None)).await.unwrap() }
    });
    let won = futures_util::future::join_all(inserts).await.into_iter().flatten().count();
    assert_eq!(won, 1, "one live order for the opportunity, whoever wins");
    let keys = (0..16).map(|_| {
        let s = s.clone();
        async move { s.claim_key("same-key", "f", Duration::from_secs(60)).await.unwrap() }
    });
    let claimed =
        futures_util::future::join_all(keys).await.into_iter().filter(|k| *k == KeyState::Claimed).count();
    assert_eq!(claimed, 1, "one holder of a key");

    for i in 0..40 {
        let (id, opp) = (format!("due-{i}"), format!("OPP-DUE-{i}"));
        s.insert_order(new_order(&id, &opp, State::Pending, "why", None)).await.unwrap();
    }
    let deliverers = (0..4).map(|n| {
        let s = s.for_process(&format!("{}:{n}", 4_000_000 + n));
        async move {
            let mut mine = Vec::new();
            for _ in 0..10 {
                mine.extend(s.claim_due(3, Duration::from_secs(60)).await.unwrap().into_iter().map(|o| o.id));
            }
            mine
        }
    });
    let mut claimed: Vec<String> = futures_util::future::join_all(deliverers).await.concat();
    let total = claimed.len();
    claimed.sort();
    claimed.dedup();
    assert_eq!((total, claimed.len()), (41, 41), "every due order claimed once");
}

// The event outbox (`super::outbox`).

fn outbox_order<'a>(
    id: &'a str,
    opportunity: &'a str,
    state: State,
    violations: Option<&'a str>,
) -> NewOrder<'a> {
    NewOrder {
        id,
        owner: "keys/crm",
        opportunity_id: opportunity,
        state,
        quote: "{}",
        validated: true,
        violations,
        correlation_id: "corr-1",
        traceparent: ORDER_TRACE,
        reason: "r",
        lease: None,
    }
}

const ORDER_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn moved(s: &impl SuiteStore, id: &str, from: State, to: State, erp: Option<(&str, &str)>) {
    let change = Change { reason: "moved", erp_order: erp, ..Default::default() };
    assert!(s.transition(id, from, to, change).await.unwrap());
}

/// The state change writes its event and one delivery per subscriber that wants the type;
/// an order's second event is not leased before its first is delivered, whatever the retries.
pub async fn an_orders_events_are_written_with_its_changes_and_leased_strictly_in_order(s: impl SuiteStore) {
    let subs =
        [("crm".to_string(), "*".to_string()), ("ops".to_string(), "order.dead_lettered.v1".to_string())];
    assert_eq!(s.set_subscribers(&subs).await.unwrap(), 0);
    s.insert_order(outbox_order("o-1", "opp-1", State::Validated, None)).await.unwrap();
    moved(&s, "o-1", State::Validated, State::DeadLettered, None).await;
    moved(&s, "o-1", State::DeadLettered, State::Validated, None).await;
    moved(&s, "o-1", State::Validated, State::Accepted, Some(("erp-id", "S-1001"))).await;
    let lease = Duration::from_secs(30);
    let first = s.claim_deliveries("crm", 10, lease).await.unwrap();
    assert_eq!(first.len(), 1, "only the order's earliest undelivered event: {first:?}");
    assert_eq!(first[0].event.kind, "order.dead_lettered.v1");
    let data: serde_json::Value = serde_json::from_str(&first[0].event.data).unwrap();
    assert_eq!((data["orderId"].as_str(), data["correlationId"].as_str()), (Some("o-1"), Some("corr-1")));
    assert_eq!(first[0].event.traceparent, ORDER_TRACE, "a delivery continues the order's trace");
    assert_eq!(s.order("o-1").await.unwrap().unwrap().traceparent, ORDER_TRACE);
    // A failed attempt due now: still the first event, never the second.
    s.record_attempt("crm", first[0].event.seq, Attempted::RetryAt(0, "500".into())).await.unwrap();
    let again = s.claim_deliveries("crm", 10, lease).await.unwrap();
    assert_eq!(again.iter().map(|d| d.event.seq).collect::<Vec<_>>(), [first[0].event.seq]);
    assert_eq!(again[0].attempts, 1);
    assert!(s.claim_deliveries("crm", 10, lease).await.unwrap().is_empty(), "leased: not handed out twice");
    s.record_attempt("crm", first[0].event.seq, Attempted::Delivered).await.unwrap();
    let second = s.claim_deliveries("crm", 10, lease).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].event.kind, "order.accepted.v1");
    let data: serde_json::Value = serde_json::from_str(&second[0].event.data).unwrap();
    assert_eq!(data["erpOrderNumber"], "S-1001");
    // `ops` wants dead letters only.
    let ops = s.claim_deliveries("ops", 10, lease).await.unwrap();
    assert_eq!(ops.iter().map(|d| d.event.kind.as_str()).collect::<Vec<_>>(), ["order.dead_lettered.v1"]);
}

/// A dead delivery holds the order's later events back until it is replayed; replay by
/// event id or all; violations arrive as JSON with their remedies; odd text round-trips.
pub async fn dead_deliveries_are_listed_replayed_and_hold_back_the_orders_later_events(s: impl SuiteStore) {
    s.set_subscribers(&[("crm".into(), "*".into())]).await.unwrap();
    let violations = r#"[{"pointer":"/currency","code":"contract.currency_not_allowed","message":"USD \u202e🦀","remedy":"quote in EUR"}]"#;
    s.insert_order(outbox_order("o-2", "opp-\u{0}2", State::Rejected, Some(violations))).await.unwrap();
    let lease = Duration::from_secs(30);
    let rejected = s.claim_deliveries("crm", 10, lease).await.unwrap();
    assert_eq!(rejected[0].event.kind, "order.rejected.v1");
    let data: serde_json::Value = serde_json::from_str(&rejected[0].event.data).unwrap();
    assert_eq!(data["violations"][0]["remedy"], "quote in EUR");
    assert_eq!(data["violations"][0]["message"], "USD \u{202e}🦀");
    let stored = s.order("o-2").await.unwrap().unwrap().opportunity_id;
    assert_eq!(data["opportunityId"], stored.as_str(), "odd text as the store keeps it");
    s.record_attempt("crm", rejected[0].event.seq, Attempted::Dead("gone".into())).await.unwrap();
    let dead = s.dead_deliveries(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].subscriber.as_str(), dead[0].last_error.as_str()), ("crm", "gone"));
    assert_eq!(s.replay_deliveries(Some("no-such-event")).await.unwrap(), 0);
    assert_eq!(s.replay_deliveries(Some(&dead[0].event_id)).await.unwrap(), 1);
    assert!(s.dead_deliveries(10).await.unwrap().is_empty());
    let replayed = s.claim_deliveries("crm", 10, lease).await.unwrap();
    assert_eq!((replayed[0].event.seq, replayed[0].attempts), (rejected[0].event.seq, 0));
    assert_eq!(s.delivery_backlog().await.unwrap(), [("crm".to_string(), 1, 0)]);
    // A removed subscriber's undelivered events go with it.
    assert_eq!(s.set_subscribers(&[]).await.unwrap(), 1);
}

/// Acknowledged deliveries and the events nobody waits for are purged a chunk at a time;
/// pending and dead ones stay.
pub async fn delivered_events_are_purged_and_undelivered_ones_kept(s: impl SuiteStore) {
    s.set_subscribers(&[("crm".into(), "*".into())]).await.unwrap();
    for (id, opp) in [("p-1", "opp-p1"), ("p-2", "opp-p2"), ("p-3", "opp-p3")] {
        s.insert_order(outbox_order(id, opp, State::Rejected, None)).await.unwrap();
    }
    let lease = Duration::from_secs(30);
    let mut leased = s.claim_deliveries("crm", 10, lease).await.unwrap();
    leased.sort_by_key(|d| d.event.order_id.clone());
    s.record_attempt("crm", leased[0].event.seq, Attempted::Delivered).await.unwrap();
    s.record_attempt("crm", leased[1].event.seq, Attempted::Dead("gone".into())).await.unwrap();
    let later = super::now_ms() + 60_000;
    assert_eq!(s.purge_delivered(super::now_ms() - 60_000, 10).await.unwrap(), 0, "nothing that old");
    assert_eq!(s.purge_delivered(later, 10).await.unwrap(), 2, "p-1's delivery and its event");
    assert_eq!(s.purge_delivered(later, 10).await.unwrap(), 0);
    assert_eq!(s.dead_deliveries(10).await.unwrap().len(), 1, "the dead one stays");
    s.record_attempt("crm", leased[2].event.seq, Attempted::RetryAt(0, "500".into())).await.unwrap();
    let left: Vec<String> =
        s.claim_deliveries("crm", 10, lease).await.unwrap().into_iter().map(|d| d.event.order_id).collect();
    assert_eq!(left, ["p-3"], "the pending one stays");
}

/// Milestones after acceptance are recorded once each, in the order given, only for accepted
/// orders, each writing its event (with the order's identifiers) in the same transaction;
/// sweeps page through unfinished orders; a notification is new once.
pub async fn milestones_write_their_events_once_and_only_for_accepted_orders(s: impl SuiteStore) {
    s.set_subscribers(&[("crm".into(), "order.shipped.v1,invoice.issued.v1,payment.received.v1".into())])
        .await
        .unwrap();
    s.insert_order(outbox_order("m-1", "opp-m1", State::Validated, None)).await.unwrap();
    moved(&s, "m-1", State::Validated, State::Accepted, Some(("erp-m1", "S-\u{202e}1"))).await;
    s.insert_order(outbox_order("m-2", "opp-m2", State::Rejected, None)).await.unwrap();
    let tracked = s.tracked(Some("erp-m1"), None).await.unwrap().expect("tracked by ERP id");
    assert_eq!((tracked.id.as_str(), tracked.erp_order_number.as_str()), ("m-1", "S-\u{202e}1"));
    assert_eq!(s.tracked(None, Some("S-\u{202e}1")).await.unwrap().map(|t| t.id), Some("m-1".into()));
    assert_eq!(s.tracked(Some("no-such"), None).await.unwrap(), None);
    let m = |kind: &'static str, data: &str| Milestone { kind, data: data.to_string() };
    let shipped = m("order.shipped.v1", "{}");
    let invoiced = m("invoice.issued.v1", r#"{"invoiceNumber":"PS-\u0000🦀"}"#);
    let paid = m("payment.received.v1", r#"{"amount":10.5}"#);
    assert_eq!(
        s.record_milestones("m-1", std::slice::from_ref(&shipped)).await.unwrap(),
        ["order.shipped.v1"]
    );
    let all = [shipped.clone(), invoiced, paid];
    assert_eq!(s.record_milestones("m-1", &all).await.unwrap(), ["invoice.issued.v1", "payment.received.v1"]);
    assert!(s.record_milestones("m-1", &all).await.unwrap().is_empty(), "each once");
    assert!(s.record_milestones("m-2", &all).await.unwrap().is_empty(), "a rejected order has none");
    assert!(s.record_milestones("nope", &all).await.unwrap().is_empty());
    let tracked = s.tracked(Some("erp-m1"), None).await.unwrap().unwrap();
    assert!(tracked.finished(), "{tracked:?}");
    let lease = Duration::from_secs(30);
    let mut kinds = Vec::new();
    loop {
        let got = s.claim_deliveries("crm", 10, lease).await.unwrap();
        let Some(d) = got.first() else { break };
        let data: serde_json::Value = serde_json::from_str(&d.event.data).unwrap();
        assert_eq!(
            (data["orderId"].as_str(), data["erpOrderNumber"].as_str()),
            (Some("m-1"), Some("S-\u{202e}1"))
        );
        if d.event.kind == "payment.received.v1" {
            assert_eq!(data["amount"], 10.5);
        }
        kinds.push(d.event.kind.clone());
        s.record_attempt("crm", d.event.seq, Attempted::Delivered).await.unwrap();
    }
    assert_eq!(kinds, ["order.shipped.v1", "invoice.issued.v1", "payment.received.v1"]);
    // Sweeps: unfinished accepted orders only, a page at a time.
    for n in 3..8 {
        let (id, opp, erp) = (format!("m-{n}"), format!("opp-m{n}"), format!("erp-m{n}"));
        s.insert_order(outbox_order(&id, &opp, State::Validated, None)).await.unwrap();
        moved(&s, &id, State::Validated, State::Accepted, Some((&erp, "S"))).await;
    }
    let page = s.unfinished("", 3).await.unwrap();
    assert_eq!(page.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["m-3", "m-4", "m-5"]);
    let rest = s.unfinished("m-5", 3).await.unwrap();
    assert_eq!(rest.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["m-6", "m-7"]);
    // Notifications seen.
    let keys = ["a".to_string(), "b\u{0}".to_string()];
    assert_eq!(s.first_sight(&keys).await.unwrap(), [true, true]);
    assert_eq!(s.first_sight(&["a".into(), "c".into()]).await.unwrap(), [false, true]);
    assert_eq!(s.forget_sightings(super::now_ms() + 1000, 10).await.unwrap(), 3);
    assert_eq!(s.first_sight(&["a".into()]).await.unwrap(), [true]);
    // Polling cursors.
    assert_eq!(s.cursor("erp").await.unwrap(), None);
    s.set_cursor("erp", "2026-11-30T10:00:00Z").await.unwrap();
    s.set_cursor("erp", "2026-11-30T11:00:00Z\u{0}").await.unwrap();
    let kept = s.cursor("erp").await.unwrap().unwrap();
    assert!(kept.starts_with("2026-11-30T11:00:00Z"), "{kept}");
}

/// Event deliveries leased by a process that stopped are taken back at start; a running
/// process keeps its own.
pub async fn a_stopped_processs_event_leases_are_taken_back_at_start(s: impl SuiteStore) {
    s.set_subscribers(&[("crm".into(), "*".into())]).await.unwrap();
    for (id, opp) in [("l-1", "opp-l1"), ("l-2", "opp-l2")] {
        s.insert_order(outbox_order(id, opp, State::Rejected, None)).await.unwrap();
    }
    let lease = Duration::from_secs(600);
    let gone = s.for_process("1:1");
    assert_eq!(gone.claim_deliveries("crm", 1, lease).await.unwrap().len(), 1);
    let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let live = s.for_process(&instance::name_of(sleeper.id()).expect("the child runs"));
    assert_eq!(live.claim_deliveries("crm", 1, lease).await.unwrap().len(), 1);
    assert!(s.claim_deliveries("crm", 10, lease).await.unwrap().is_empty(), "both leased");
    s.recover(Duration::from_secs(1)).await.unwrap();
    let back = s.claim_deliveries("crm", 10, lease).await.unwrap();
    assert_eq!(back.len(), 1, "only the stopped process's delivery: {back:?}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// Runs each suite test against SQLite and, where a server answers, PostgreSQL.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $name() {
                let (s, _dir) = super::sqlite().await;
                super::$name(s).await;
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $name() {
                let Some((s, schema)) = super::postgres(stringify!($name)).await else { return };
                super::$name(s).await;
                super::drop_schema(&schema).await;
            })*
        }
    };
}

suite!(
    an_idempotency_key_is_claimed_once_then_replayed_refused_or_released,
    one_live_order_per_opportunity_and_guarded_transitions_with_history,
    due_orders_are_leased_once_and_only_leases_of_stopped_processes_are_taken_back,
    a_stopped_process_mid_submission_is_retried_only_after_its_request_settles,
    in_flight_keys_of_stopped_processes_are_released_and_live_ones_kept,
    a_repeated_state_is_one_history_entry_with_a_count,
    racing_writers_get_one_order_one_key_holder_and_disjoint_claims,
    an_orders_events_are_written_with_its_changes_and_leased_strictly_in_order,
    dead_deliveries_are_listed_replayed_and_hold_back_the_orders_later_events,
    delivered_events_are_purged_and_undelivered_ones_kept,
    milestones_write_their_events_once_and_only_for_accepted_orders,
    a_stopped_processs_event_leases_are_taken_back_at_start,
);

mod postgres_only {
    use super::*;

    #[tokio::test]
    async fn a_lease_of_a_replica_on_another_host_is_taken_over_when_it_expires() {
        let Some((s, schema)) = postgres("lease takeover").await else { return };
        let elsewhere = s.clone().as_process("other-host/1:1");
        elsewhere.insert_order(new_order("a", "OPP-A", State::Pending, "why", None)).await.unwrap();
        assert_eq!(elsewhere.claim_due(10, Duration::from_millis(300)).await.unwrap().len(), 1);
        assert_eq!(s.recover(Duration::ZERO).await.unwrap(), 0, "another host's process cannot be asked");
        assert!(s.claim_due(10, Duration::from_secs(60)).await.unwrap().is_empty(), "its lease holds");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let taken: Vec<String> =
            s.claim_due(10, Duration::from_secs(60)).await.unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(taken, ["a"], "after the lease, this replica takes the order over");
        drop_schema(&schema).await;
    }

    #[tokio::test]
    async fn an_in_flight_key_abandoned_on_another_host_is_claimable_after_its_request_could_have_ended() {
        let Some((s, schema)) = postgres("abandoned key").await else { return };
        let ttl = Duration::from_secs(600);
        let elsewhere = s.clone().as_process("other-host/1:1");
        assert_eq!(elsewhere.claim_key("k", "f", ttl).await.unwrap(), KeyState::Claimed);
        assert_eq!(s.claim_key("k", "f", ttl).await.unwrap(), KeyState::InFlight);
        let long_ago = super::super::now_ms() - super::super::postgres::ABANDONED_KEY.as_millis() as i64 - 1;
        sqlx::query("UPDATE idempotency_keys SET created_at = $1")
            .bind(long_ago)
            .execute(s.pool())
            .await
            .unwrap();
        assert_eq!(s.claim_key("k", "f", ttl).await.unwrap(), KeyState::Claimed);
        drop_schema(&schema).await;
    }

    #[tokio::test]
    async fn replicas_starting_together_migrate_once() {
        let Some((s, schema)) = postgres("concurrent migrations").await else { return };
        let url = format!("{}?options[search_path]={schema}", postgres_url());
        let opens = (0..4).map(|_| PostgresStore::open(&url, 2, Duration::from_secs(5), 64));
        for opened in futures_util::future::join_all(opens).await {
            opened.unwrap();
        }
        let versions: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM causeway_migrations").fetch_one(s.pool()).await.unwrap();
        assert_eq!(versions, super::super::migrations::POSTGRES.len() as i64);
        drop_schema(&schema).await;
    }
}
