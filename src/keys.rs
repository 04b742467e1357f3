//! Ed25519 signing keys, one set of files per key id in the keys directory:
//!
//! - `{key_id}.pk8`: the private half (PKCS#8), never committed (gitignored), mode 0600;
//! - `{key_id}.pub`: the public half, base64url;
//! - `{key_id}.retired`: present once the key is retired; it then verifies nothing.
//!
//! Key ids sort by creation time, so the newest key with a private half that is not
//! retired is the active signer. Older keys keep verifying until they are retired.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::Serialize;

pub struct KeyRing {
    signer: Option<(String, Ed25519KeyPair)>,
    public: BTreeMap<String, PublicKey>,
}

/// The key ring a running instance uses, replaced whole when the keys directory or the
/// retirements shared through MySQL change (a retired signer stops signing everywhere
/// within one refresh, without a restart). Readers take a cheap `Arc` of the ring.
pub struct Keys {
    ring: std::sync::RwLock<std::sync::Arc<KeyRing>>,
}

impl Keys {
    pub fn new(ring: KeyRing) -> Self {
        Self {
            ring: std::sync::RwLock::new(std::sync::Arc::new(ring)),
        }
    }

    pub fn current(&self) -> std::sync::Arc<KeyRing> {
        self.ring.read().expect("key ring lock poisoned").clone()
    }

    /// Installs `ring` when it differs from the current one (keys, retirements or the
    /// active signer); returns whether it did.
    pub fn replace(&self, ring: KeyRing) -> bool {
        let mut current = self.ring.write().expect("key ring lock poisoned");
        if current.fingerprint() == ring.fingerprint() {
            return false;
        }
        *current = std::sync::Arc::new(ring);
        true
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PublicKey {
    pub key_id: String,
    pub alg: &'static str,
    /// base64url Ed25519 public key.
    #[serde(serialize_with = "as_b64")]
    #[schema(value_type = String)]
    pub public_key: Vec<u8>,
    pub active: bool,
    #[serde(skip)]
    pub retired: bool,
}

fn as_b64<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&B64.encode(bytes))
}

/// Which check a presented signature failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("unknown key id `{0}`")]
    UnknownKey(String),
    #[error("key `{0}` is retired")]
    RetiredKey(String),
    #[error("bad signature")]
    BadSignature,
}

fn private_path(dir: &Path, key_id: &str) -> PathBuf {
    dir.join(format!("{key_id}.pk8"))
}
fn public_path(dir: &Path, key_id: &str) -> PathBuf {
    dir.join(format!("{key_id}.pub"))
}
fn retired_path(dir: &Path, key_id: &str) -> PathBuf {
    dir.join(format!("{key_id}.retired"))
}

fn valid_key_id(key_id: &str) -> bool {
    (1..=64).contains(&key_id.len())
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Creates a new key pair in `dir` and returns its id. The new key becomes the active
/// signer the next time the ring is loaded.
pub fn generate(dir: &Path) -> anyhow::Result<String> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key failed"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("reading back the generated key failed"))?;
    // Timestamp plus a random suffix: sortable by age, unique across machines.
    let mut suffix = [0u8; 3];
    ring::rand::SecureRandom::fill(&rng, &mut suffix)
        .map_err(|_| anyhow::anyhow!("random source failed"))?;
    let key_id = format!(
        "ed25519-{}-{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S%3f"),
        crate::domain::hex(&suffix)
    );
    let private = private_path(dir, &key_id);
    write_private(&private, pkcs8.as_ref())?;
    fs::write(
        public_path(dir, &key_id),
        B64.encode(pair.public_key().as_ref()),
    )
    .context("writing the public key")?;
    Ok(key_id)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("creating {}", path.display()))
}

/// Marks a key retired: tokens signed by it no longer verify.
pub fn retire(dir: &Path, key_id: &str) -> anyhow::Result<()> {
    if !valid_key_id(key_id) || !public_path(dir, key_id).exists() {
        bail!("no key `{key_id}` in {}", dir.display());
    }
    fs::write(retired_path(dir, key_id), chrono::Utc::now().to_rfc3339())
        .context("writing the retired marker")?;
    Ok(())
}

impl KeyRing {
    /// Loads every key in `dir`. `extra_retired` names keys retired elsewhere (the
    /// signing_keys table), so one instance's retirement reaches all of them.
    pub fn load(dir: &Path, extra_retired: &[String]) -> anyhow::Result<Self> {
        let mut public = BTreeMap::new();
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    signer: None,
                    public,
                })
            }
            Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            let (Some(stem), Some("pub")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if !valid_key_id(stem) {
                continue;
            }
            let text = fs::read_to_string(&path)?;
            let bytes = B64
                .decode(text.trim())
                .with_context(|| format!("{} is not base64url", path.display()))?;
            if bytes.len() != 32 {
                bail!("{} does not hold a 32-byte Ed25519 key", path.display());
            }
            let retired =
                retired_path(dir, stem).exists() || extra_retired.iter().any(|k| k == stem);
            public.insert(
                stem.to_string(),
                PublicKey {
                    key_id: stem.to_string(),
                    alg: "Ed25519",
                    public_key: bytes,
                    active: false,
                    retired,
                },
            );
        }
        let mut signer = None;
        for (key_id, key) in public.iter_mut().rev() {
            if key.retired {
                continue;
            }
            let private = private_path(dir, key_id);
            let Ok(pkcs8) = fs::read(&private) else {
                continue;
            };
            let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
                anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key", private.display())
            })?;
            if pair.public_key().as_ref() != key.public_key.as_slice() {
                bail!("{} does not match its public half", private.display());
            }
            key.active = true;
            signer = Some((key_id.clone(), pair));
            break;
        }
        Ok(Self { signer, public })
    }

    /// A ring of one key derived from a 32-byte seed: reproducible signatures for test
    /// vectors and tests, never for a running service (its keys come from `load`).
    pub fn from_seed(key_id: &str, seed: &[u8; 32]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| anyhow::anyhow!("not an Ed25519 seed"))?;
        let public = BTreeMap::from([(
            key_id.to_string(),
            PublicKey {
                key_id: key_id.to_string(),
                alg: "Ed25519",
                public_key: pair.public_key().as_ref().to_vec(),
                active: true,
                retired: false,
            },
        )]);
        Ok(Self {
            signer: Some((key_id.to_string(), pair)),
            public,
        })
    }

    /// What tells two rings apart: every key id with its retirement, and the signer.
    fn fingerprint(&self) -> (Option<&str>, Vec<(&str, bool)>) {
        (
            self.active_key_id(),
            self.public
                .values()
                .map(|k| (k.key_id.as_str(), k.retired))
                .collect(),
        )
    }

    pub fn active_key_id(&self) -> Option<&str> {
        self.signer.as_ref().map(|(id, _)| id.as_str())
    }

    /// Signs `payload` with the active key: (key id, signature).
    pub fn sign(&self, payload: &[u8]) -> Option<(&str, Vec<u8>)> {
        let (key_id, pair) = self.signer.as_ref()?;
        Some((key_id.as_str(), pair.sign(payload).as_ref().to_vec()))
    }

    pub fn verify(
        &self,
        key_id: &str,
        payload: &[u8],
        signature: &[u8],
    ) -> Result<(), VerifyError> {
        let key = self
            .public
            .get(key_id)
            .ok_or_else(|| VerifyError::UnknownKey(key_id.to_string()))?;
        if key.retired {
            return Err(VerifyError::RetiredKey(key_id.to_string()));
        }
        UnparsedPublicKey::new(&ED25519, &key.public_key)
            .verify(payload, signature)
            .map_err(|_| VerifyError::BadSignature)
    }

    /// The keys that still verify, the active one marked.
    pub fn published(&self) -> Vec<PublicKey> {
        self.public
            .values()
            .filter(|k| !k.retired)
            .cloned()
            .collect()
    }

    /// Every key, retired ones included (for `keys list`).
    pub fn all(&self) -> Vec<PublicKey> {
        self.public.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rpw-keys-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_newest_key_signs_and_older_keys_still_verify() {
        let dir = temp_dir("rotate");
        let old = generate(&dir).unwrap();
        let ring = KeyRing::load(&dir, &[]).unwrap();
        let (kid, sig) = ring.sign(b"payload").unwrap();
        assert_eq!(kid, old);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let new = generate(&dir).unwrap();
        let ring = KeyRing::load(&dir, &[]).unwrap();
        assert_eq!(ring.active_key_id(), Some(new.as_str()));
        ring.verify(&old, b"payload", &sig).unwrap();
        retire(&dir, &old).unwrap();
        let ring = KeyRing::load(&dir, &[]).unwrap();
        assert_eq!(
            ring.verify(&old, b"payload", &sig),
            Err(VerifyError::RetiredKey(old.clone()))
        );
        assert_eq!(ring.published().len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }
}
