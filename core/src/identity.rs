//! Identity: 16 random hex characters naming one deployed infrastructure.
//!
//! The scenario sees the identity, never the source (player or team) id, so a
//! scenario cannot bias its output towards a player. It doubles as the Pulumi
//! stack name, which is why it is restricted to lowercase hex.

use std::{fmt, str::FromStr};

use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Length of an identity in characters.
pub const IDENTITY_LEN: usize = 16;

/// The name of one deployed infrastructure: 16 lowercase hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identity(String);

/// A string that is not 16 lowercase hex characters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an identity is {IDENTITY_LEN} lowercase hex characters")]
pub struct InvalidIdentity;

impl Identity {
    /// A fresh random identity (64 bits from the OS-seeded thread RNG).
    pub fn random() -> Self {
        let mut bytes = [0u8; IDENTITY_LEN / 2];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Identity {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = s.len() == IDENTITY_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidIdentity)
        }
    }
}

impl TryFrom<String> for Identity {
    type Error = InvalidIdentity;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Identity> for String {
    fn from(value: Identity) -> Self {
        value.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_identities_are_valid_and_distinct() {
        let a = Identity::random();
        let b = Identity::random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().parse::<Identity>(), Ok(a.clone()));
        assert_eq!(a.as_str().len(), IDENTITY_LEN);
    }

    #[test]
    fn rejects_anything_but_16_lowercase_hex() {
        for bad in [
            "",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "../../etc/passwd",
        ] {
            assert_eq!(bad.parse::<Identity>(), Err(InvalidIdentity), "{bad:?}");
        }
        assert!("0123456789abcdef".parse::<Identity>().is_ok());
    }
}
