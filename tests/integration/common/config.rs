//! Typed pieces of the test gateway's configuration: a misspelt setting fails to compile instead
//! of silently doing nothing, and [`Patch::patched`] fails the test when the text it edits is not there.

use serde::Serialize;
use std::collections::BTreeMap;

/// An edit of configuration text that must apply: `text.patched(from, to)` is `replace`, except
/// that the test fails when `from` does not occur, so an edit of a shipped file that stopped
/// matching is noticed instead of silently testing the unedited file.
pub trait Patch {
    fn patched(&self, from: &str, to: &str) -> String;
}

impl Patch for str {
    fn patched(&self, from: &str, to: &str) -> String {
        assert!(self.contains(from), "the configuration to patch has no {from:?}:\n{self}");
        self.replace(from, to)
    }
}

/// An ERP upstream's `budget:` (the gateway's defaults apply to what is left `None`).
#[derive(Serialize, Clone, Debug, Default)]
pub struct Budget {
    pub window_requests: u32,
    pub window_seconds: u64,
    pub max_concurrent: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_margin_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub classes: BTreeMap<&'static str, Class>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overload_signals: Vec<OverloadSignal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_initial_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pause_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pacing: Option<Pacing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<bool>,
}

#[derive(Serialize, Clone, Copy, Debug)]
pub struct Class {
    pub priority: u8,
    pub max_wait_ms: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct OverloadSignal {
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
}

#[derive(Serialize, Clone, Copy, Debug)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    Off,
    Smooth,
}

impl Budget {
    /// `window_requests` per `window_seconds`, `max_concurrent` in flight.
    pub fn new(window_requests: u32, window_seconds: u64, max_concurrent: u32) -> Budget {
        Budget { window_requests, window_seconds, max_concurrent, ..Budget::default() }
    }

    /// A queue of 1000 with the write class (priority 0) and the interactive class (priority 1,
    /// the default) waiting at most the given times.
    pub fn queued(mut self, write_wait_ms: u64, interactive_wait_ms: u64) -> Budget {
        self.queue = Some(1000);
        self.classes.insert("write", Class { priority: 0, max_wait_ms: write_wait_ms });
        self.classes.insert("interactive", Class { priority: 1, max_wait_ms: interactive_wait_ms });
        self.default_class = Some("interactive");
        self
    }

    /// The ERP answering `status` (with `body_contains` in its body) means "overloaded".
    pub fn overload_signal(mut self, status: u16, body_contains: Option<&str>) -> Budget {
        self.overload_signals
            .push(OverloadSignal { status, body_contains: body_contains.map(str::to_string) });
        self
    }

    /// The lines under `upstreams.<name>:` (JSON is YAML's flow syntax).
    pub fn upstream_yaml(&self) -> String {
        format!("    budget: {}\n", serde_json::to_string(self).expect("a budget serialises"))
    }
}
