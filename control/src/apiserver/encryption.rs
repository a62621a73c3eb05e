//! Encryption at rest for Secrets: AES-256-GCM with a random 96-bit nonce
//! per write, in the envelope kube-apiserver's `aesgcm` provider uses
//! (`k8s:enc:aesgcm:v1:<key name>:` + nonce + ciphertext).

use std::path::Path;

use aes_gcm::{
    Aes256Gcm, KeyInit as _, Nonce,
    aead::{Aead as _, AeadCore as _, OsRng},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};

use crate::pki::{PkiError, write_private};

const PREFIX: &[u8] = b"k8s:enc:aesgcm:v1:key1:";
const NONCE_LEN: usize = 12;

/// Why encryption or decryption failed.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("encryption key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error(transparent)]
    Write(#[from] PkiError),
    #[error("stored secret is not in the aesgcm envelope")]
    NotEnveloped,
    #[error("stored secret failed authentication (wrong key or corrupted)")]
    Authentication,
}

/// The data directory's secret-encryption key.
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// Loads `path` (base64 of 32 bytes), creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, EncryptionError> {
        let key_error = |reason: String| EncryptionError::Key {
            path: path.display().to_string(),
            reason,
        };
        let key = if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| key_error(e.to_string()))?;
            STANDARD
                .decode(text.trim())
                .map_err(|e| key_error(e.to_string()))?
        } else {
            let key = Aes256Gcm::generate_key(OsRng).to_vec();
            write_private(path, STANDARD.encode(&key).as_bytes())?;
            key
        };
        let cipher = Aes256Gcm::new_from_slice(&key)
            .map_err(|_| key_error(format!("must be 32 bytes, is {}", key.len())))?;
        Ok(Self { cipher })
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        // Encryption with a fresh nonce and an in-memory buffer cannot fail.
        let ciphertext = self.cipher.encrypt(&nonce, plaintext).unwrap_or_default();
        let mut out = Vec::with_capacity(PREFIX.len() + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(PREFIX);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        let body = sealed
            .strip_prefix(PREFIX)
            .ok_or(EncryptionError::NotEnveloped)?;
        if body.len() < NONCE_LEN {
            return Err(EncryptionError::NotEnveloped);
        }
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| EncryptionError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_round_trips_and_hides_the_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("encryption.key");
        let sealer = SecretBox::load_or_create(&path).unwrap();
        let sealed = sealer.seal(b"password=hunter2");
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        let reloaded = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(reloaded.open(&sealed).unwrap(), b"password=hunter2");
        let mut tampered = sealed;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            reloaded.open(&tampered),
            Err(EncryptionError::Authentication)
        ));
    }
}
