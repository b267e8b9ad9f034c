//! Value parsers for flags: `k=v` pairs, durations (`10m`, `600s`) and
//! dates (RFC 3339, or `+2h` from now), turned into the protobuf types the
//! API's JSON expects. A bad value is a usage error (exit code 1) naming the
//! flag, reported by clap before anything is sent.

use std::{collections::HashMap, time::SystemTime};

use cm_schemas::wkt::Timestamp;
use pbjson_types::Duration;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// `key=value` (the value may be empty or contain `=`).
pub fn pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// Repeated `--additional` pairs as a map; a key given twice is refused.
pub fn pairs_to_map(pairs: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::with_capacity(pairs.len());
    for (k, v) in pairs {
        if map.insert(k.clone(), v.clone()).is_some() {
            return Err(format!("--additional key {k:?} given twice"));
        }
    }
    Ok(map)
}

/// A positive duration (`90s`, `10m`, `1h 30m`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 600s, 10m)"))?;
    if d.is_zero() {
        return Err("must be longer than 0s".into());
    }
    Ok(Duration {
        seconds: i64::try_from(d.as_secs()).map_err(|_| "too long".to_owned())?,
        nanos: d.subsec_nanos() as i32,
    })
}

/// An RFC 3339 date (`2030-01-01T00:00:00Z`), or `+<duration>` from now.
pub fn until(s: &str) -> Result<Timestamp, String> {
    if let Some(rest) = s.strip_prefix('+') {
        let d = humantime::parse_duration(rest).map_err(|e| format!("{s:?}: {e}"))?;
        let at = SystemTime::now() + d;
        return Ok(cm_core::model::to_timestamp(at));
    }
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?}: {e} (RFC 3339, e.g. 2030-01-01T00:00:00Z, or +2h)"))?;
    Ok(Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

/// A `time` date from a stream message as RFC 3339 (UTC), for tables and JSON.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_on_the_first_equals_sign() {
        assert_eq!(pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(pair("a="), Ok(("a".into(), String::new())));
        assert!(pair("=b").is_err());
        assert!(pair("ab").is_err());
        let twice = [("k".into(), "1".into()), ("k".into(), "2".into())];
        assert!(pairs_to_map(&twice).is_err());
    }

    #[test]
    fn durations_and_dates_become_protobuf_values() {
        assert_eq!(
            duration("10m"),
            Ok(Duration {
                seconds: 600,
                nanos: 0
            })
        );
        assert!(duration("0s").is_err());
        assert!(duration("soon").is_err());
        assert_eq!(
            until("2030-01-01T00:00:00Z").map(|t| t.seconds),
            Ok(1_893_456_000)
        );
        let now = cm_core::model::now().seconds;
        let later = until("+1h").expect("relative").seconds;
        assert!((later - now - 3600).abs() <= 1, "{later} vs {now}");
        assert!(until("tomorrow").is_err());
    }
}
