//! The well-known types whose canonical JSON `pbjson-types` does not print
//! the way Go's `protojson` (and so chall-manager's grpc-gateway) does:
//!
//! - [`Timestamp`]: printed in UTC with `Z` and 0, 3, 6 or 9 fractional
//!   digits (`2026-12-01T00:47:35.685921401Z`); read with `Z` or any offset
//!   and 0 to 9 fractional digits.
//! - [`FieldMask`]: printed and read as one comma-separated string of
//!   lowerCamel paths (`"timeout,until"`), the paths held in snake_case. The
//!   legacy object form `{"paths": [...]}` is read too.
//!
//! Their binary encoding is the protobuf one (prost), so they replace the
//! `google.protobuf` types field for field (`build.rs` maps them here).

use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Non-negative fraction of a second, in nanoseconds (0..=999_999_999).
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// Seconds of 0001-01-01T00:00:00Z and of 9999-12-31T23:59:59Z, the range
/// protobuf's JSON mapping allows.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

impl Timestamp {
    /// The RFC 3339 form, in UTC with `Z` (what `protojson` prints), or
    /// `None` when out of protobuf's range.
    pub fn to_rfc3339(&self) -> Option<String> {
        if !(MIN_SECONDS..=MAX_SECONDS).contains(&self.seconds)
            || !(0..1_000_000_000).contains(&self.nanos)
        {
            return None;
        }
        let dt = time::OffsetDateTime::from_unix_timestamp(self.seconds).ok()?;
        let mut s = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        );
        push_fraction(&mut s, self.nanos as u32);
        s.push('Z');
        Some(s)
    }

    /// Parses RFC 3339 (`Z` or an offset, 0 to 9 fractional digits).
    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|e| format!("invalid timestamp {s:?} (RFC 3339 expected): {e}"))?;
        let seconds = dt.unix_timestamp();
        if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) {
            return Err(format!("timestamp {s:?} is out of range (years 1 to 9999)"));
        }
        Ok(Self {
            seconds,
            nanos: dt.nanosecond() as i32,
        })
    }
}

/// `.fff`, `.ffffff` or `.fffffffff` as `protojson` chooses (nothing for 0).
fn push_fraction(s: &mut String, nanos: u32) {
    if nanos == 0 {
        return;
    }
    let _ = if nanos.is_multiple_of(1_000_000) {
        write!(s, ".{:03}", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        write!(s, ".{:06}", nanos / 1_000)
    } else {
        write!(s, ".{nanos:09}")
    };
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.to_rfc3339() {
            Some(s) => serializer.serialize_str(&s),
            None => Err(serde::ser::Error::custom("timestamp out of range")),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 timestamp string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(s).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// `google.protobuf.FieldMask`.
#[derive(Clone, PartialEq, Eq, Hash, ::prost::Message)]
pub struct FieldMask {
    /// The paths, in snake_case (proto field names).
    #[prost(string, repeated, tag = "1")]
    pub paths: Vec<String>,
}

/// `updateStrategy` -> `update_strategy` (protobuf's JSON-to-proto name rule).
pub fn snake_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `update_strategy` -> `updateStrategy`.
pub fn lower_camel_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut upper = false;
    for c in path.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

impl FieldMask {
    /// The canonical JSON string: lowerCamel paths joined by `,`.
    pub fn to_json_string(&self) -> String {
        self.paths
            .iter()
            .map(|p| {
                p.split('.')
                    .map(lower_camel_case)
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads the canonical string; paths are lowerCamel (`maxPerSource`),
    /// snake_case ones are accepted too. Empty segments are skipped.
    pub fn parse_json_string(s: &str) -> Self {
        Self {
            paths: s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(snake_case)
                .collect(),
        }
    }
}

impl Serialize for FieldMask {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_json_string())
    }
}

impl<'de> Deserialize<'de> for FieldMask {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = FieldMask;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field mask: a string of comma-separated paths")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldMask, E> {
                Ok(FieldMask::parse_json_string(s))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<FieldMask, A::Error> {
                let mut paths = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "paths" {
                        let value: Option<Vec<String>> = map.next_value()?;
                        paths = value
                            .unwrap_or_default()
                            .iter()
                            .map(|p| snake_case(p))
                            .collect();
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(FieldMask { paths })
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_like_protojson() {
        for (seconds, nanos, text) in [
            (0, 0, "1970-01-01T00:00:00Z"),
            (1_796_086_055, 685_921_401, "2026-12-01T00:47:35.685921401Z"),
            (1_796_086_055, 685_000_000, "2026-12-01T00:47:35.685Z"),
            (1_796_086_055, 685_921_000, "2026-12-01T00:47:35.685921Z"),
            (-62_135_596_800, 0, "0001-01-01T00:00:00Z"),
        ] {
            let t = Timestamp { seconds, nanos };
            assert_eq!(
                serde_json::to_value(t).expect("prints"),
                serde_json::json!(text)
            );
            assert_eq!(
                serde_json::from_value::<Timestamp>(serde_json::json!(text)).expect("reads"),
                t
            );
        }
        assert!(
            serde_json::to_value(Timestamp {
                seconds: 0,
                nanos: -1
            })
            .is_err()
        );
    }

    #[test]
    fn timestamps_read_offsets_and_fractions() {
        let utc = Timestamp::parse_rfc3339("2026-12-01T02:47:35.5+02:00").expect("offset");
        assert_eq!(
            utc,
            Timestamp {
                seconds: 1_796_086_055,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2026-12-01T00:47:35+00:00").expect("+00:00"),
            Timestamp {
                seconds: 1_796_086_055,
                nanos: 0
            }
        );
        for bad in ["2026-12-01", "yesterday", "2026-12-01T00:47:35", ""] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_masks_are_comma_separated_lower_camel() {
        let m: FieldMask = serde_json::from_value(serde_json::json!("timeout,until,maxPerSource"))
            .expect("string form");
        assert_eq!(m.paths, ["timeout", "until", "max_per_source"]);
        assert_eq!(
            serde_json::to_value(&m).expect("prints"),
            serde_json::json!("timeout,until,maxPerSource")
        );
        let m: FieldMask = serde_json::from_value(serde_json::json!({"paths": ["updateStrategy"]}))
            .expect("object form");
        assert_eq!(m.paths, ["update_strategy"]);
        let m: FieldMask = serde_json::from_value(serde_json::json!("")).expect("empty");
        assert!(m.paths.is_empty());
        assert!(serde_json::from_value::<FieldMask>(serde_json::json!(5)).is_err());
    }
}
