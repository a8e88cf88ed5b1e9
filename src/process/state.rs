//! The order state machine of DESIGN.md. Every change is stored as a transition with its time
//! and reason (`store::Transition`).

use serde::Serialize;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Recorded; the rules have not run yet (the ERP's master data was unreachable).
    Received,
    /// The rules passed; not yet sent to the ERP.
    Validated,
    /// A delivery attempt is under way.
    Submitted,
    /// The ERP holds the order.
    Accepted,
    /// Refused, by the rules or the ERP, while the caller was waiting for the answer.
    Rejected,
    /// Waiting for the ERP (down, throttled, timing out) or its budget; the worker retries.
    Pending,
    /// Could not be delivered and no caller is waiting: an operator must fix and replay it.
    DeadLettered,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Received,
        State::Validated,
        State::Submitted,
        State::Accepted,
        State::Rejected,
        State::Pending,
        State::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Received => "received",
            State::Validated => "validated",
            State::Submitted => "submitted",
            State::Accepted => "accepted",
            State::Rejected => "rejected",
            State::Pending => "pending",
            State::DeadLettered => "dead_lettered",
        }
    }

    /// No more work will happen on its own.
    pub fn is_final(self) -> bool {
        matches!(self, State::Accepted | State::Rejected | State::DeadLettered)
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<State, String> {
        State::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown order state `{s}`"))
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("shipped".parse::<State>().is_err());
    }
}
