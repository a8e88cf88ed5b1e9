//! Time as the whole crate needs it: the wall clock in Unix milliseconds, RFC 3339 text both
//! ways, and retry backoff with jitter. A leaf module (named `clock` because `time` is the date
//! crate's name): the store, the events, the sandbox, the admin API, the change detection and the
//! mediation tables all use it, and it uses none of them.

use rand::Rng;
use std::time::Duration;

/// The wall clock as Unix milliseconds (0 before 1970, which a clock set that far back means).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 `full-date` or `date-time` → milliseconds since the epoch (UTC). Parsed by the
/// `time` crate; OData dates hold milliseconds, so a finer fraction is refused, not cut.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    let bad = || format!("`{s}` is not an RFC 3339 date (YYYY-MM-DD) or date-time (YYYY-MM-DDThh:mm:ssZ)");
    // Well-formed text naming a day or a time that does not exist says so.
    let explain = |e: time::error::Parse| {
        use time::error::{Parse, ParseFromDescription};
        match e {
            Parse::TryFromParsed(_) => format!("`{s}`: no such day"),
            Parse::ParseFromDescription(ParseFromDescription::InvalidComponent(c)) => match c {
                "day" | "month" | "year" => format!("`{s}`: no such day"),
                "hour" | "minute" | "second" => format!("`{s}`: no such time of day"),
                _ => bad(),
            },
            _ => bad(),
        }
    };
    let nanos = if s.len() == 10 {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        time::Date::parse(s, format).map_err(explain)?.midnight().assume_utc().unix_timestamp_nanos()
    } else {
        time::OffsetDateTime::parse(s, &Rfc3339).map_err(explain)?.unix_timestamp_nanos()
    };
    if nanos % 1_000_000 != 0 {
        return Err(format!("`{s}`: OData dates hold milliseconds; finer fractions would be lost"));
    }
    i64::try_from(nanos / 1_000_000).map_err(|_| bad())
}

fn datetime(ms: i64) -> time::OffsetDateTime {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Unix milliseconds as an RFC 3339 `full-date` (UTC).
pub fn format_date(ms: i64) -> String {
    let d = datetime(ms).date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Unix milliseconds as an RFC 3339 UTC timestamp (milliseconds shown only when not zero).
pub fn format_datetime(ms: i64) -> String {
    let t = datetime(ms);
    let milli = t.millisecond();
    let frac = if milli == 0 { String::new() } else { format!(".{milli:03}") };
    format!("{}T{:02}:{:02}:{:02}{frac}Z", format_date(ms), t.hour(), t.minute(), t.second())
}

/// `initial` doubled `doublings` times, capped at `max`, with jitter over the upper half so
/// clients backing off from one event do not return together. Shared by the ERP budget's pauses
/// and the order delivery worker's retries.
pub fn backoff(initial: Duration, max: Duration, doublings: u32) -> Duration {
    backoff_at(initial, max, doublings, rand::rng().random_range(0.0..=1.0))
}

/// [`backoff`] with its jitter given: `jitter` in `[0, 1]` places the delay in the upper half
/// of the step (for decisions that must be pure).
pub fn backoff_at(initial: Duration, max: Duration, doublings: u32, jitter: f64) -> Duration {
    let cap = initial.saturating_mul(1u32 << doublings.min(20)).min(max);
    let half = cap / 2;
    half + Duration::from_millis((half.as_millis() as f64 * jitter.clamp(0.0, 1.0)).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_refuses_what_it_cannot_hold() {
        assert_eq!(format_datetime(1_795_771_800_250), "2026-11-27T09:30:00.250Z");
        assert_eq!(format_datetime(1_795_771_800_000), "2026-11-27T09:30:00Z");
        assert_eq!(parse_rfc3339("2026-11-27T09:30:00.250Z").unwrap(), 1_795_771_800_250);
        assert_eq!(parse_rfc3339(&format_date(1_795_737_600_000)).unwrap(), 1_795_737_600_000);
        assert!(parse_rfc3339("2026-02-30").unwrap_err().contains("no such day"));
        assert!(parse_rfc3339("2026-11-27T09:30:00.000001Z").unwrap_err().contains("milliseconds"));
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        for doublings in 0..30 {
            let d = backoff(i, m, doublings);
            let cap = i.saturating_mul(1u32 << doublings.min(20)).min(m);
            assert!(d >= cap / 2 && d <= cap, "{doublings}: {d:?} outside [{:?}, {cap:?}]", cap / 2);
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(i, m, 4)).collect();
        assert!(samples.len() > 1, "jittered");
    }
}
