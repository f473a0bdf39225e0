//! Hook secrets at rest: a hook's URL, token and signing secret are sealed with an AEAD
//! (XChaCha20-Poly1305) under a key read from a file, so a copy of the database (a backup, a
//! replica, a `SELECT` by someone who may read the tables) does not hand out the receivers'
//! credentials.
//!
//! # Stored form
//!
//! `hlsec:v1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`. The nonce is 24 random bytes (large
//! enough that random nonces never repeat in practice); the associated data binds a value to its
//! row and column (`web_hooks.token:<hook uuid>`), so a sealed value copied into another hook or
//! another column does not open. A value without the prefix is legacy plaintext: it is read as it
//! is and sealed on its next write (or by `hookline-consumer secrets reencrypt`).
//!
//! # The key file
//!
//! One key per line, `<id> <base64 of 32 bytes>`; blank lines and `#` comments are skipped. The
//! first key seals every new value; every key listed opens the values sealed with it. Rotation:
//! put a new key on the first line, restart (or reload), run `secrets reencrypt`, then drop the
//! old line. The file must not be readable by group or others (as ssh refuses a private key).

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::{RngCore as _, TryRngCore as _};

/// What every sealed value starts with.
pub const SEALED_PREFIX: &str = "hlsec:v1:";
/// A key's length in bytes.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// Why a key file or a sealed value was refused. Never carries key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secrets key file: {0}")]
    KeyFile(String),
    #[error("a stored secret is sealed with key {0:?}, which the secrets key file does not hold")]
    UnknownKey(String),
    #[error("a stored secret is sealed but no secrets key file is configured (--secrets-key-file)")]
    NoKeys,
    #[error("a stored secret does not open with key {0:?}: it was altered or belongs elsewhere")]
    Corrupt(String),
}

/// The keys of a key file; `Debug` shows their ids only.
#[derive(Clone)]
pub struct SecretKeys {
    /// In file order: the first seals.
    keys: Vec<(String, XChaCha20Poly1305)>,
}

impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeys")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl SecretKeys {
    /// Keys from the text of a key file.
    pub fn parse(text: &str) -> Result<SecretKeys, SecretError> {
        let bad = |m: String| SecretError::KeyFile(m);
        let mut keys: Vec<(String, XChaCha20Poly1305)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, encoded) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad(format!("line {}: expected `<id> <base64 key>`", n + 1)))?;
            if !valid_id(id) {
                return Err(bad(format!(
                    "line {}: a key id is 1 to 32 letters, digits, '-', '_' or '.'",
                    n + 1
                )));
            }
            // The error names the line, never the key.
            let key = STANDARD.decode(encoded.trim()).map_err(|_| {
                bad(format!(
                    "line {}: the key is not base64 (make one with `hookline-consumer secrets new-key`)",
                    n + 1
                ))
            })?;
            if key.len() != KEY_LEN {
                return Err(bad(format!(
                    "line {}: a key is {KEY_LEN} bytes, this one is {}",
                    n + 1,
                    key.len()
                )));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(bad(format!("line {}: key id {id:?} appears twice", n + 1)));
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&key)
                .map_err(|_| bad(format!("line {}: unusable key", n + 1)))?;
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err(bad("it holds no key".into()));
        }
        Ok(SecretKeys { keys })
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn read(path: &Path) -> Result<SecretKeys, SecretError> {
        let bad = |m: String| SecretError::KeyFile(format!("{}: {m}", path.display()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| bad(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(bad(format!(
                    "readable or writable by group or others (mode {:o}); chmod 600 it",
                    mode & 0o777
                )));
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        SecretKeys::parse(&text).map_err(|e| match e {
            SecretError::KeyFile(m) => bad(m),
            other => other,
        })
    }

    /// A new key line, `<id> <base64>`, from the system's random source.
    pub fn new_key_line(id: &str) -> Result<String, SecretError> {
        if !valid_id(id) {
            return Err(SecretError::KeyFile(
                "a key id is 1 to 32 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let mut key = [0u8; KEY_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .map_err(|e| SecretError::KeyFile(format!("no random bytes: {e}")))?;
        Ok(format!("{id} {}", STANDARD.encode(key)))
    }

    /// The key that seals.
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Every key's id, the sealing one first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    pub fn holds(&self, id: &str) -> bool {
        self.keys.iter().any(|(k, _)| k == id)
    }

    /// Seals `plaintext` with the current key, bound to `aad`.
    pub fn seal(&self, plaintext: &str, aad: &str) -> String {
        let (id, cipher) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        // Encryption with a valid key and nonce cannot fail (only over-long inputs could).
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{id}:{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Opens a value sealed by [`SecretKeys::seal`] with the same `aad`.
    pub fn open(&self, stored: &str, aad: &str) -> Result<String, SecretError> {
        let (id, encoded) = split_sealed(stored).ok_or_else(|| SecretError::Corrupt("?".into()))?;
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, c)| c)
            .ok_or_else(|| SecretError::UnknownKey(id.to_owned()))?;
        let corrupt = || SecretError::Corrupt(id.to_owned());
        let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| corrupt())?;
        if bytes.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        String::from_utf8(plain).map_err(|_| corrupt())
    }
}

/// The key id and payload of a sealed value; `None` for plaintext.
fn split_sealed(stored: &str) -> Option<(&str, &str)> {
    stored.strip_prefix(SEALED_PREFIX)?.split_once(':')
}

/// Whether a stored value is sealed (as opposed to legacy plaintext).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// The id of the key a stored value is sealed with; `None` for plaintext.
pub fn sealed_with(stored: &str) -> Option<&str> {
    split_sealed(stored).map(|(id, _)| id)
}

/// Opens a stored value: plaintext as it is, sealed with `keys`.
pub fn open_stored(
    keys: Option<&SecretKeys>,
    stored: String,
    aad: &str,
) -> Result<String, SecretError> {
    if !is_sealed(&stored) {
        return Ok(stored);
    }
    keys.ok_or(SecretError::NoKeys)?.open(&stored, aad)
}

/// The stored form of a value: sealed with `keys`, or plaintext without them.
pub fn to_stored(keys: Option<&SecretKeys>, plain: &str, aad: &str) -> String {
    match keys {
        Some(keys) => keys.seal(plain, aad),
        None => plain.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> SecretKeys {
        SecretKeys::parse(text).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_with_its_key_and_aad_only() {
        let line = SecretKeys::new_key_line("k1").unwrap();
        let ring = keys(&line);
        let sealed = ring.seal("tok3n", "web_hooks.token:a");
        assert!(sealed.starts_with("hlsec:v1:k1:"), "{sealed}");
        assert!(!sealed.contains("tok3n"));
        assert_eq!(ring.open(&sealed, "web_hooks.token:a").unwrap(), "tok3n");
        // Another row or column: refused.
        assert_eq!(
            ring.open(&sealed, "web_hooks.token:b"),
            Err(SecretError::Corrupt("k1".into()))
        );
        // Two seals of one value differ (fresh nonces).
        assert_ne!(sealed, ring.seal("tok3n", "web_hooks.token:a"));
        // A flipped character: refused.
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(
            ring.open(std::str::from_utf8(&tampered).unwrap(), "web_hooks.token:a")
                .is_err()
        );
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let old = SecretKeys::new_key_line("old").unwrap();
        let new = SecretKeys::new_key_line("new").unwrap();
        let before = keys(&old);
        let sealed_old = before.seal("s", "x");
        let after = keys(&format!("# rotated\n{new}\n\n{old}\n"));
        assert_eq!(after.current_id(), "new");
        assert_eq!(after.ids().collect::<Vec<_>>(), ["new", "old"]);
        assert_eq!(after.open(&sealed_old, "x").unwrap(), "s");
        assert_eq!(sealed_with(&after.seal("s", "x")), Some("new"));
        // The old key alone cannot open what the new one sealed.
        assert_eq!(
            before.open(&after.seal("s", "x"), "x"),
            Err(SecretError::UnknownKey("new".into()))
        );
        // Plaintext passes; sealed without keys is refused.
        assert_eq!(open_stored(None, "plain".into(), "x").unwrap(), "plain");
        assert_eq!(open_stored(None, sealed_old, "x"), Err(SecretError::NoKeys));
    }

    #[test]
    fn bad_key_files_are_refused_without_echoing_keys() {
        for (text, says) in [
            ("", "holds no key"),
            ("# only a comment\n", "holds no key"),
            ("k1\n", "expected"),
            ("k1 not-base64!!\n", "not base64"),
            ("k1 c2hvcnQ=\n", "32 bytes"),
            (
                "bad/id AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
                "key id",
            ),
        ] {
            let error = SecretKeys::parse(text).unwrap_err().to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        let line = SecretKeys::new_key_line("k").unwrap();
        let error = SecretKeys::parse(&format!("{line}\n{line}\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("twice"), "{error}");
        let key = line.split_once(' ').unwrap().1;
        assert!(!error.contains(key));
        assert!(!format!("{:?}", keys(&line)).contains(key));
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("hookline-keys-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, SecretKeys::new_key_line("k").unwrap()).unwrap();
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = SecretKeys::read(&path).unwrap_err().to_string();
            assert!(error.contains("chmod 600"), "{mode:o}: {error}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(SecretKeys::read(&path).unwrap().current_id(), "k");
        std::fs::remove_file(&path).unwrap();
    }
}
