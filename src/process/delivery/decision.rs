//! The delivery state machine as a pure function: from the order, the outcome of one step of its
//! delivery attempt, the delivery settings and the time, to the next state, what the store
//! records and what is counted. No store, no ERP, no clock and no randomness in here (the
//! jitter is an input), so every (state, outcome) pair is tested as a table.

use crate::error::RuleBreach;
use crate::process::state::State;
use std::time::Duration;

/// How one step of a delivery attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The stored quote cannot be read back (a store written by a version that no longer
    /// reads it): nothing will ever deliver it.
    QuoteUnreadable,
    /// No process rules are loaded, so the quote cannot be validated now.
    NoRules,
    /// Master data arrived and the rules refused the quote.
    RulesRefused(Vec<RuleBreach>),
    /// Master data arrived and the rules passed.
    Validated,
    /// The ERP asked to wait (429, 503, an overload signal) or its budget could not admit the
    /// call in time. Never a failure of the order.
    ErpAskedToWait(String),
    /// The ERP failed (unreachable, 5xx, an unreadable answer, a lookup that timed out).
    ErpFailed(String),
    /// The create was cut off mid-exchange: the ERP may still be creating the order.
    CutOff,
    /// The ERP holds the order, as (`id`, `number`).
    Created { id: String, number: String },
    /// The ERP refused the order for a business reason.
    ErpRefused { status: u16, message: String },
}

impl Outcome {
    /// One of each kind (for tables that must cover them all).
    pub fn kinds() -> [Outcome; 9] {
        [
            Outcome::QuoteUnreadable,
            Outcome::NoRules,
            Outcome::RulesRefused(vec![RuleBreach {
                pointer: "/customer".into(),
                code: "customer.blocked",
                message: "blocked".into(),
                remedy: "unblock".into(),
            }]),
            Outcome::Validated,
            Outcome::ErpAskedToWait("429".into()),
            Outcome::ErpFailed("503".into()),
            Outcome::CutOff,
            Outcome::Created { id: "erp-1".into(), number: "SO-1".into() },
            Outcome::ErpRefused { status: 400, message: "customer blocked".into() },
        ]
    }
}

/// The order as the step found it.
#[derive(Debug, Clone, Copy)]
pub struct Order {
    /// Where the order stands now (the state the transition starts from).
    pub state: State,
    /// Its state when it was leased for this attempt.
    pub leased_in: State,
    /// Attempts counted before this one.
    pub attempts: i64,
    /// A caller waits for the outcome: a refusal is theirs to fix (`rejected`); with nobody
    /// waiting it becomes a dead letter for an operator.
    pub caller_waits: bool,
}

/// What the decision needs of the settings and the moment.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a cut-off ERP request may still be under way.
    pub settle: Duration,
    /// What is left of the ERP budget's pause.
    pub paused: Duration,
    /// The store's clock (ms since the epoch).
    pub now: i64,
    /// Where in the upper half of a backoff step the delay falls, in `[0, 1]`.
    pub jitter: f64,
}

/// What the caller hears of the attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    State(State),
    /// The ERP refused the order while the caller waited: the caller's 422.
    ErpRejected(String),
}

/// The next state, what the store records with it, and what is counted once it is recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    pub to: State,
    pub reason: String,
    pub next_attempt_at: Option<i64>,
    /// Count this attempt (it was not counted when it began).
    pub count_attempt: bool,
    /// Take back the attempt counted when it began (the ERP asked to wait).
    pub uncount_attempt: bool,
    pub validated: Option<bool>,
    /// The order stays with this deliverer (the attempt goes on).
    pub keep_lease: bool,
    /// The rules' refusal, as stored JSON.
    pub violations: Option<String>,
    pub erp_order: Option<(String, String)>,
    pub effects: Effects,
}

/// What is counted once the transition is recorded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Effects {
    /// `causeway_process_orders_total{state}`.
    pub count_state: Option<State>,
    /// Rejection codes (`causeway_process_rejections_total{code}`), each also an incident.
    pub rejections: Vec<&'static str>,
    /// An incident besides the rejections (`undeliverable`).
    pub incident: Option<&'static str>,
    /// The order was accepted: its latency is observed and, if it was validated late, the
    /// resolution of a dead letter it may have been.
    pub accepted: bool,
    pub heard: Option<Heard>,
}

/// What a step leads to. `None` when the order is already final: a finished order never moves.
pub fn decide(order: Order, outcome: Outcome, settings: &Settings) -> Option<Next> {
    if order.state.is_final() {
        return None;
    }
    // The attempt was counted when it began if it reached `submitted`.
    let counted = order.state == State::Submitted;
    let refused = if order.caller_waits { State::Rejected } else { State::DeadLettered };
    let next = |to: State, reason: String| Next {
        to,
        reason,
        next_attempt_at: None,
        count_attempt: false,
        uncount_attempt: false,
        validated: None,
        keep_lease: false,
        violations: None,
        erp_order: None,
        effects: Effects { heard: Some(Heard::State(to)), ..Effects::default() },
    };
    Some(match outcome {
        Outcome::QuoteUnreadable => next(State::DeadLettered, "stored quote unreadable".into()),
        Outcome::NoRules => retry_later(order, counted, "no process rules loaded", Duration::ZERO, settings),
        Outcome::RulesRefused(breaches) => {
            let refusal = Refusal::of(&breaches);
            let mut n = next(refused, refusal.reason);
            n.violations = Some(refusal.violations);
            n.effects.count_state = Some(refused);
            n.effects.rejections = refusal.codes;
            n
        }
        Outcome::Validated => Next {
            validated: Some(true),
            keep_lease: true,
            ..next(State::Validated, "quote validated".into())
        },
        Outcome::ErpAskedToWait(why) => {
            let delay = backoff(settings, 0).max(settings.paused);
            let mut n = next(
                State::Pending,
                format!("the ERP asked to wait, retry in {} ms: {why}", delay.as_millis()),
            );
            n.next_attempt_at = Some(settings.now + delay.as_millis() as i64);
            n.uncount_attempt = counted;
            n.effects.count_state = (order.leased_in != State::Pending).then_some(State::Pending);
            n
        }
        Outcome::ErpFailed(error) => retry_later(order, counted, &error, Duration::ZERO, settings),
        Outcome::CutOff => retry_later(
            order,
            counted,
            "the attempt took longer than half the delivery lease",
            settings.settle,
            settings,
        ),
        Outcome::Created { id, number } => {
            let mut n = next(State::Accepted, format!("the ERP holds order {number}"));
            n.erp_order = Some((id, number));
            n.effects.count_state = Some(State::Accepted);
            n.effects.accepted = true;
            n
        }
        Outcome::ErpRefused { status, message } => {
            let mut n = next(refused, format!("the ERP refused the order ({status}): {message}"));
            n.effects.count_state = Some(refused);
            n.effects.rejections = vec!["erp"];
            if refused == State::Rejected {
                n.effects.heard = Some(Heard::ErpRejected(message));
            }
            n
        }
    })
}

/// The next attempt after exponential backoff with jitter (at least `min_delay`), or a dead
/// letter after `max_attempts`.
fn retry_later(order: Order, counted: bool, error: &str, min_delay: Duration, settings: &Settings) -> Next {
    let attempts = order.attempts + 1;
    let mut n = Next {
        to: State::Pending,
        reason: String::new(),
        next_attempt_at: None,
        count_attempt: !counted,
        uncount_attempt: false,
        validated: None,
        keep_lease: false,
        violations: None,
        erp_order: None,
        effects: Effects::default(),
    };
    if attempts >= i64::from(settings.max_attempts) {
        n.to = State::DeadLettered;
        n.reason = format!("gave up after {attempts} attempts; last error: {error}");
        n.effects.count_state = Some(State::DeadLettered);
        n.effects.incident = Some("undeliverable");
    } else {
        let doublings = (attempts.max(1) - 1) as u32;
        let delay = backoff(settings, doublings).max(min_delay);
        n.reason = format!("waiting for the ERP, retry in {} ms: {error}", delay.as_millis());
        n.next_attempt_at = Some(settings.now + delay.as_millis() as i64);
        n.effects.count_state = (order.leased_in != State::Pending).then_some(State::Pending);
    }
    n.effects.heard = Some(Heard::State(n.to));
    n
}

fn backoff(settings: &Settings, doublings: u32) -> Duration {
    crate::clock::backoff_at(settings.backoff_initial, settings.backoff_max, doublings, settings.jitter)
}

/// A refusal by the rules, as recorded and counted: the same whether the rules ran at
/// submission or later in the worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: String,
    /// The breaches as stored JSON.
    pub violations: String,
    pub codes: Vec<&'static str>,
}

impl Refusal {
    pub fn of(breaches: &[RuleBreach]) -> Refusal {
        let codes: Vec<&'static str> = breaches.iter().map(|v| v.code).collect();
        Refusal {
            reason: format!("refused by the rules: {}", codes.join(", ")),
            violations: serde_json::to_string(breaches).unwrap_or_default(),
            codes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            max_attempts: 5,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            settle: Duration::from_secs(32),
            paused: Duration::ZERO,
            now: 1_000_000,
            jitter: 1.0,
        }
    }

    fn order(state: State, attempts: i64, caller_waits: bool) -> Order {
        Order { state, leased_in: state, attempts, caller_waits }
    }

    fn kind(o: &Outcome) -> &'static str {
        match o {
            Outcome::QuoteUnreadable => "unreadable",
            Outcome::NoRules => "no-rules",
            Outcome::RulesRefused(_) => "rules-refused",
            Outcome::Validated => "validated",
            Outcome::ErpAskedToWait(_) => "asked-to-wait",
            Outcome::ErpFailed(_) => "failed",
            Outcome::CutOff => "cut-off",
            Outcome::Created { .. } => "created",
            Outcome::ErpRefused { .. } => "erp-refused",
        }
    }

    /// Every (state, outcome) pair, with nobody waiting and with a caller waiting, on the
    /// first attempt: the next state, whether the attempt is counted (+1), taken back (-1) or
    /// left (0), and when the next attempt is due (ms from now). Final states never move.
    #[test]
    fn every_state_and_outcome_has_its_next_state() {
        use State::*;
        // (outcome, nobody waits, a caller waits, attempt count change from an uncounted state,
        // from `submitted`, next attempt in ms)
        type Row = (&'static str, State, State, i8, i8, Option<i64>);
        let table: [Row; 9] = [
            ("unreadable", DeadLettered, DeadLettered, 0, 0, None),
            ("no-rules", Pending, Pending, 1, 0, Some(1000)),
            ("rules-refused", DeadLettered, Rejected, 0, 0, None),
            ("validated", Validated, Validated, 0, 0, None),
            ("asked-to-wait", Pending, Pending, 0, -1, Some(1000)),
            ("failed", Pending, Pending, 1, 0, Some(1000)),
            ("cut-off", Pending, Pending, 1, 0, Some(32_000)),
            ("created", Accepted, Accepted, 0, 0, None),
            ("erp-refused", DeadLettered, Rejected, 0, 0, None),
        ];
        let mut pairs = 0;
        for state in State::ALL {
            for outcome in Outcome::kinds() {
                let row = table.iter().find(|r| r.0 == kind(&outcome)).expect("a row per outcome");
                for waits in [false, true] {
                    let got = decide(order(state, 0, waits), outcome.clone(), &settings());
                    pairs += 1;
                    if state.is_final() {
                        assert_eq!(got, None, "{state} is final; {} moves nothing", row.0);
                        continue;
                    }
                    let n = got.unwrap_or_else(|| panic!("{state} + {} must move", row.0));
                    let expected = if waits { row.2 } else { row.1 };
                    assert_eq!(n.to, expected, "{state} + {} (caller waits: {waits})", row.0);
                    let counting = i8::from(n.count_attempt) - i8::from(n.uncount_attempt);
                    let want = if state == Submitted { row.4 } else { row.3 };
                    assert_eq!(counting, want, "{state} + {}: attempt counting", row.0);
                    assert_eq!(n.next_attempt_at.map(|t| t - 1_000_000), row.5, "{state} + {}", row.0);
                    assert!(n.effects.heard.is_some(), "{state} + {}", row.0);
                }
            }
        }
        assert_eq!(pairs, 7 * 9 * 2);
    }

    #[test]
    fn the_last_attempt_dead_letters_a_failure_and_counts_an_incident_but_not_a_wait() {
        let s = settings();
        for outcome in [Outcome::ErpFailed("503".into()), Outcome::CutOff, Outcome::NoRules] {
            let n = decide(order(State::Pending, 4, true), outcome.clone(), &s).unwrap();
            assert_eq!(n.to, State::DeadLettered, "{outcome:?}");
            assert!(n.reason.starts_with("gave up after 5 attempts"), "{}", n.reason);
            assert_eq!(n.effects.incident, Some("undeliverable"));
            assert_eq!(n.next_attempt_at, None);
        }
        let wait =
            decide(order(State::Submitted, 40, false), Outcome::ErpAskedToWait("429".into()), &s).unwrap();
        assert_eq!(wait.to, State::Pending, "max_attempts never dead-letters a wait");
    }

    #[test]
    fn backoff_doubles_per_attempt_up_to_its_cap_and_a_pause_can_lengthen_a_wait() {
        let mut s = settings();
        let due = |attempts: i64, s: &Settings| {
            decide(order(State::Pending, attempts, false), Outcome::ErpFailed("x".into()), s)
                .unwrap()
                .next_attempt_at
                .unwrap()
                - s.now
        };
        assert_eq!([0, 1, 2, 3].map(|a| due(a, &s)), [1000, 2000, 4000, 8000]);
        s.max_attempts = 100;
        assert_eq!(due(30, &s), 8000, "capped at backoff_max");
        s.jitter = 0.0;
        assert_eq!(due(0, &s), 500, "jitter spans the upper half of the step");
        s.paused = Duration::from_secs(20);
        let wait =
            decide(order(State::Pending, 0, false), Outcome::ErpAskedToWait("429".into()), &s).unwrap();
        assert_eq!(wait.next_attempt_at.unwrap() - s.now, 20_000, "the budget's pause is waited out");
    }

    #[test]
    fn what_is_counted_follows_the_outcome() {
        let s = settings();
        let refused = decide(order(State::Received, 0, false), Outcome::kinds()[2].clone(), &s).unwrap();
        assert_eq!(refused.effects.rejections, ["customer.blocked"]);
        assert_eq!(refused.reason, "refused by the rules: customer.blocked");
        assert!(refused.violations.unwrap().contains("\"code\":\"customer.blocked\""));
        let erp = decide(
            order(State::Submitted, 0, true),
            Outcome::ErpRefused { status: 422, message: "no".into() },
            &s,
        )
        .unwrap();
        assert_eq!(erp.effects.heard, Some(Heard::ErpRejected("no".into())));
        assert_eq!(erp.effects.rejections, ["erp"]);
        let created = decide(
            order(State::Submitted, 0, true),
            Outcome::Created { id: "i".into(), number: "n".into() },
            &s,
        )
        .unwrap();
        assert_eq!(created.erp_order, Some(("i".into(), "n".into())));
        assert!(created.effects.accepted);
        // A pending order that stays pending is not counted as pending again.
        let again = decide(order(State::Pending, 1, false), Outcome::ErpFailed("x".into()), &s).unwrap();
        assert_eq!(again.effects.count_state, None);
        let first = decide(order(State::Received, 0, false), Outcome::ErpFailed("x".into()), &s).unwrap();
        assert_eq!(first.effects.count_state, Some(State::Pending));
    }
}
