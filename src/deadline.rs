//! How long the apiserver waits for one review.
//!
//! The apiserver tells a webhook in the request URL: `?timeout=` is the time
//! left of its own deadline (the webhook's `timeoutSeconds`, or less when the
//! API request itself has less left) as Go's `time.Duration` text, rounded up
//! to a whole second (`5s`, `1m0s`). An answer that arrives later is thrown
//! away, and under `failurePolicy: Ignore` the pod is admitted unrewritten, so
//! a wait on the request path (a pull secret copy) must end before it does.
//! Pure: the server reads the URL and the clock, this does the arithmetic.

use std::time::{Duration, Instant};

/// Kept back from the apiserver's timeout when deciding how long to wait: up
/// to 1 s of its rounding up, and half a second for the answer's way back.
pub const ANSWER_RESERVE: Duration = Duration::from_millis(1500);

/// The `timeout` parameter of a request's query string, if there is one that
/// parses (anything else is ignored: the server then waits as configured).
pub fn timeout_param(query: &str) -> Option<Duration> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "timeout")
        .and_then(|(_, value)| parse_go_duration(&value))
}

/// The instant by which a review that arrived at `arrived`, with `timeout`
/// left in the apiserver, must stop waiting so that its answer is still read.
pub fn stop_waiting_by(arrived: Instant, timeout: Duration) -> Instant {
    arrived + timeout.saturating_sub(ANSWER_RESERVE)
}

/// Parses Go's `time.Duration` text (`time.ParseDuration`): a sequence of
/// decimal numbers, each with an optional fraction and a unit (`ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h`), such as `1m30s` or `1.5s`; `0` alone is zero.
/// Negative durations, which no timeout can be, are `None`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    const GO_MAX_NANOS: u128 = i64::MAX as u128;
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let is_number = |c: char| c.is_ascii_digit() || c == '.';
        let number_len = rest.find(|c: char| !is_number(c)).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after.find(is_number).unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            // U+00B5 (micro sign) and U+03BC (Greek mu), as Go accepts both.
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        nanos = nanos.checked_add(whole.checked_mul(unit_nanos)?)?;
        // Digits past a nanosecond are dropped, as Go's parser drops them.
        let mut place = unit_nanos;
        for digit in fraction.bytes() {
            place /= 10;
            nanos = nanos.checked_add(u128::from(digit - b'0') * place)?;
        }
        // Go's limit (an int64 of nanoseconds); it also keeps the sum far
        // from overflowing.
        if nanos > GO_MAX_NANOS {
            return None;
        }
        rest = after;
    }
    Some(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::any;

    use super::*;

    #[test]
    fn go_duration_text_parses_as_go_parses_it() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("1m0s", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("1h0m0s", Duration::from_secs(3600)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("2.s", Duration::from_secs(2)),
            ("500ms", Duration::from_millis(500)),
            ("3us", Duration::from_micros(3)),
            ("3\u{b5}s", Duration::from_micros(3)),
            ("3\u{3bc}s", Duration::from_micros(3)),
            ("7ns", Duration::from_nanos(7)),
            ("1.0000000009s", Duration::from_secs(1)),
            ("+4s", Duration::from_secs(4)),
            (
                "9223372036854775807ns",
                Duration::from_nanos(i64::MAX as u64),
            ),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_go_duration(text), Some(expected), "{text}");
        }
        for text in [
            "",
            "+",
            "10",
            "s",
            ".s",
            "1..5s",
            "1.5.5s",
            "-5s",
            "5 s",
            "5sec",
            "5S",
            "1d",
            // More than Go's int64 nanoseconds, in one part or in several.
            "9999999999h",
            "9223372036854775808ns",
            "9223372036854775807ns1ns",
            "340282366920938463463374607431.999999999s",
            "340282366920938463463374607431768211455ns.5s",
        ] {
            assert_eq!(parse_go_duration(text), None, "{text:?}");
        }
    }

    /// Go's `Duration.String()` of a whole number of seconds, which is what
    /// the apiserver sends.
    fn go_seconds_text(seconds: u64) -> String {
        match seconds {
            0..60 => format!("{seconds}s"),
            60..3600 => format!("{}m{}s", seconds / 60, seconds % 60),
            _ => format!("{}h{}m{}s", seconds / 3600, seconds / 60 % 60, seconds % 60),
        }
    }

    proptest::proptest! {
        #[test]
        fn what_the_apiserver_sends_reads_back(seconds in 0u64..10_000_000) {
            let text = go_seconds_text(seconds);
            proptest::prop_assert_eq!(
                timeout_param(&format!("timeout={text}")),
                Some(Duration::from_secs(seconds)),
                "{}", text
            );
        }

        /// The query string is the client's to write: nothing in it panics.
        #[test]
        fn any_query_is_read_without_panic(query in "(timeout=)?[-+.0-9a-zµμ%&=]{0,40}") {
            let _ = timeout_param(&query);
            let _ = parse_go_duration(query.trim_start_matches("timeout="));
        }

        #[test]
        fn any_text_is_read_without_panic(text in any::<String>()) {
            let _ = parse_go_duration(&text);
            let _ = timeout_param(&text);
        }
    }

    #[test]
    fn the_timeout_parameter_is_found_among_others_or_not_at_all() {
        assert_eq!(timeout_param("timeout=10s"), Some(Duration::from_secs(10)));
        assert_eq!(
            timeout_param("dryRun=All&timeout=1m0s"),
            Some(Duration::from_secs(60))
        );
        // Go's url.Values escapes the micro sign.
        assert_eq!(
            timeout_param("timeout=250%C2%B5s"),
            Some(Duration::from_micros(250))
        );
        assert_eq!(timeout_param(""), None);
        assert_eq!(timeout_param("timeouts=10s"), None);
        assert_eq!(timeout_param("timeout=soon"), None);
    }

    #[test]
    fn waits_stop_short_of_the_timeout_by_the_reserve_and_never_before_arrival() {
        let arrived = Instant::now();
        assert_eq!(
            stop_waiting_by(arrived, Duration::from_secs(5)),
            arrived + Duration::from_millis(3500)
        );
        assert_eq!(
            stop_waiting_by(arrived, Duration::from_secs(2)),
            arrived + Duration::from_millis(500)
        );
        assert_eq!(stop_waiting_by(arrived, Duration::from_secs(1)), arrived);
    }
}
