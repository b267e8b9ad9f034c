//! User-supplied ids (challenge and source ids): validation, and the encoding
//! that makes them safe as NATS subject tokens and etcd key segments.
//!
//! An id is 1 to 256 bytes of UTF-8 without control characters, `/` or `\`,
//! and is not `.` or `..` (ids end up in paths and keys). Encoding keeps
//! `[A-Za-z0-9_-]` and writes every other byte as `~XX` (hex), so the result
//! holds none of `.`, `*`, `>`, `/` or whitespace and decodes back exactly.

use crate::DomainError;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// Checks a user-supplied id; `what` names it in the error ("challenge id").
pub fn validate(what: &str, id: &str) -> Result<(), DomainError> {
    if id.is_empty() {
        return Err(DomainError::invalid(format!("{what} must not be empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(DomainError::invalid(format!(
            "{what} is {} bytes long, the maximum is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(DomainError::invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    if id.contains(['/', '\\']) {
        return Err(DomainError::invalid(format!(
            "{what} must not contain '/' or '\\'"
        )));
    }
    if id == "." || id == ".." {
        return Err(DomainError::invalid(format!(
            "{what} must not be '.' or '..'"
        )));
    }
    Ok(())
}

/// Encodes an id as a NATS subject token / etcd key segment.
pub fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

/// Decodes what [`encode`] produced; `None` for anything else.
pub fn decode(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'~' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_is_subject_safe() {
        for id in ["simple", "a.b*c>d e", "ünïcödé", "~tilde~", "1", "a-b_c"] {
            let token = encode(id);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-~".contains(&b)),
                "{token}"
            );
            assert_eq!(decode(&token).as_deref(), Some(id));
        }
        assert_eq!(encode("a.b"), "a~2Eb");
        assert_eq!(decode("~zz"), None);
        assert_eq!(decode("~4"), None);
    }

    #[test]
    fn validation_refuses_what_cannot_be_an_id() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        for (bad, why) in [
            ("", "empty"),
            (long.as_str(), "maximum"),
            ("a/b", "'/'"),
            ("a\\b", "'/'"),
            ("..", "'..'"),
            ("a\u{0}b", "control"),
            ("a\nb", "control"),
        ] {
            let err = validate("challenge id", bad).expect_err(bad);
            assert!(err.message().contains(why), "{bad:?}: {}", err.message());
            assert!(err.message().starts_with("challenge id"));
        }
        validate("challenge id", "a..b").expect("dots inside are fine");
        validate("challenge id", &"x".repeat(MAX_ID_LEN)).expect("max length");
    }
}
