//! Pulumi's passphrase secrets provider, the part the driver needs without
//! running the CLI: minting a stack's `encryptionsalt` and decrypting secret
//! stack outputs read straight from the state file.
//!
//! Format (from Pulumi's `passphrase` secrets manager): key =
//! PBKDF2-HMAC-SHA256(passphrase, salt, 1,000,000 rounds, 32 bytes); a value
//! is `v1:<base64 nonce>:<base64 AES-256-GCM ciphertext+tag>`; the salt state
//! is `v1:<base64 salt>:<the value "pulumi" encrypted>`, which lets a wrong
//! passphrase be detected. Deriving a key costs ~0.3 s, so keys are cached
//! per salt for the life of the process, and a process mints one salt that all
//! the stacks it creates share.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use cm_core::Secret;
use rand::RngCore;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use super::DriverError;

const ROUNDS: std::num::NonZeroU32 = match std::num::NonZeroU32::new(1_000_000) {
    Some(n) => n,
    None => unreachable!(),
};
const CHECK_MESSAGE: &str = "pulumi";

type Key = [u8; 32];

/// Derives and caches passphrase keys; mints this process's salt.
#[derive(Debug)]
pub struct Crypter {
    passphrase: Secret<String>,
    keys: Mutex<HashMap<Vec<u8>, Arc<Key>>>,
    minted: tokio::sync::OnceCell<String>,
}

impl Crypter {
    /// A crypter for `passphrase`.
    pub fn new(passphrase: Secret<String>) -> Self {
        Self {
            passphrase,
            keys: Mutex::new(HashMap::new()),
            minted: tokio::sync::OnceCell::new(),
        }
    }

    /// The passphrase, for the CLI's environment.
    pub(crate) fn passphrase(&self) -> &Secret<String> {
        &self.passphrase
    }

    /// The `encryptionsalt` for stacks created by this process.
    pub async fn salt_state(&self) -> Result<String, DriverError> {
        self.minted
            .get_or_try_init(|| async {
                let mut salt = vec![0u8; 8];
                rand::thread_rng().fill_bytes(&mut salt);
                let key = self.key_for(salt.clone()).await?;
                let check = encrypt(&key, CHECK_MESSAGE)?;
                Ok(format!("v1:{}:{check}", B64.encode(&salt)))
            })
            .await
            .cloned()
    }

    /// Decrypts a `v1:` value with the key of `salt_state`, checking the
    /// passphrase against the state's check message first.
    pub async fn decrypt(&self, salt_state: &str, value: &str) -> Result<String, DriverError> {
        let (salt, check) = split_salt_state(salt_state)?;
        let key = self.key_for(salt).await?;
        if decrypt(&key, check)? != CHECK_MESSAGE {
            return Err(corrupt(
                "the configured passphrase does not open this stack",
            ));
        }
        decrypt(&key, value)
    }

    async fn key_for(&self, salt: Vec<u8>) -> Result<Arc<Key>, DriverError> {
        if let Some(key) = self.cached(&salt) {
            return Ok(key);
        }
        let phrase = self.passphrase.expose().clone();
        let salt_for_task = salt.clone();
        let key = tokio::task::spawn_blocking(move || {
            let mut key = [0u8; 32];
            ring::pbkdf2::derive(
                ring::pbkdf2::PBKDF2_HMAC_SHA256,
                ROUNDS,
                &salt_for_task,
                phrase.as_bytes(),
                &mut key,
            );
            key
        })
        .await
        .map_err(|e| corrupt(format!("key derivation task failed: {e}")))?;
        let key = Arc::new(key);
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(salt, key.clone());
        }
        Ok(key)
    }

    fn cached(&self, salt: &[u8]) -> Option<Arc<Key>> {
        self.keys.lock().ok()?.get(salt).cloned()
    }
}

fn corrupt(reason: impl Into<String>) -> DriverError {
    DriverError::StateCorrupt {
        reason: reason.into(),
    }
}

fn split_salt_state(state: &str) -> Result<(Vec<u8>, &str), DriverError> {
    let mut parts = state.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(salt), Some(check)) => {
            let salt = B64
                .decode(salt)
                .map_err(|_| corrupt("encryption salt is not base64"))?;
            Ok((salt, check))
        }
        _ => Err(corrupt("encryption salt is not a v1 passphrase state")),
    }
}

fn cipher(key: &Key) -> Result<LessSafeKey, DriverError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| corrupt("invalid AES-256 key"))
}

fn encrypt(key: &Key, plaintext: &str) -> Result<String, DriverError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut sealed = plaintext.as_bytes().to_vec();
    cipher(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut sealed,
        )
        .map_err(|_| corrupt("encryption failed"))?;
    Ok(format!("v1:{}:{}", B64.encode(nonce), B64.encode(sealed)))
}

fn decrypt(key: &Key, value: &str) -> Result<String, DriverError> {
    let parts: Vec<&str> = value.split(':').collect();
    let [version, nonce, sealed] = parts.as_slice() else {
        return Err(corrupt("secret value is not v1:<nonce>:<ciphertext>"));
    };
    if *version != "v1" {
        return Err(corrupt("secret value has an unknown version"));
    }
    let nonce = B64
        .decode(nonce)
        .map_err(|_| corrupt("secret nonce is not base64"))?;
    let mut sealed = B64
        .decode(sealed)
        .map_err(|_| corrupt("secret ciphertext is not base64"))?;
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| corrupt("secret nonce has the wrong length"))?;
    let plain = cipher(key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut sealed,
        )
        .map_err(|_| corrupt("secret does not decrypt with the configured passphrase"))?;
    String::from_utf8(plain.to_vec()).map_err(|_| corrupt("secret is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn minted_salt_round_trips_and_detects_a_wrong_passphrase() {
        let crypter = Crypter::new(Secret::new("correct horse".to_owned()));
        let state = crypter.salt_state().await.expect("mint");
        assert_eq!(
            state,
            crypter.salt_state().await.expect("cached"),
            "one salt per process"
        );
        let (salt, _) = split_salt_state(&state).expect("split");
        let key = crypter.key_for(salt).await.expect("key");
        let value = encrypt(&key, "\"CTF{x}\"").expect("encrypt");
        assert_eq!(
            crypter.decrypt(&state, &value).await.expect("decrypt"),
            "\"CTF{x}\""
        );

        let other = Crypter::new(Secret::new("wrong".to_owned()));
        let err = other
            .decrypt(&state, &value)
            .await
            .expect_err("wrong passphrase");
        assert!(matches!(err, DriverError::StateCorrupt { .. }), "{err}");
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        let key = [7u8; 32];
        for bad in ["", "v1", "v2:a:b", "v1:!!:AA==", "v1:AAAA:AAAA", "v1:a:b:c"] {
            assert!(decrypt(&key, bad).is_err(), "{bad:?}");
        }
        assert!(split_salt_state("v1:not base64!:x").is_err());
    }
}
