//! Award tokens: mint → encode → sign the exact bytes; decode → verify.
//!
//! A token travels as the bytes of an encoded [`pb::SignedToken`] (base64url in JSON).
//! Anyone holding the public key from `GET /v1/keys` can check a token offline without
//! re-encoding anything:
//! - a token minted alone carries an Ed25519 signature over `payload` exactly as carried;
//! - tokens minted together share one signature over the Merkle root of their payloads
//!   ([`merkle`]), and each carries its inclusion proof and salt (`batch`). Signing costs
//!   one signature per batch and a few hashes per token.
//!
//! `docs/token-vectors.json` holds test vectors of both kinds, and
//! `docs/verify/verify_token.py` is a verifier written from API.md alone.

pub mod merkle;
#[cfg(test)]
mod vectors;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use prost::Message;

use crate::keys::{KeyRing, VerifyError};
use crate::pb;
use merkle::{Hash, ID_LEN};

/// Which check a presented token failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("bad token encoding: {0}")]
    BadEncoding(&'static str),
    #[error("{0}")]
    Verify(#[from] VerifyError),
    #[error("no signing key is active")]
    NoSigner,
}

/// A token as the service holds it: the signed bytes and the decoded payload.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedAward {
    /// Encoded `SignedToken`: what the client keeps and Redis stores.
    pub bytes: Vec<u8>,
    pub token: pb::RedPacketToken,
}

/// Encodes `token` (its key id set to the active key's), signs the encoding and wraps both
/// (a token signed singly: the same award minted again has the same bytes).
pub fn mint(keys: &KeyRing, token: pb::RedPacketToken) -> Result<SignedAward, TokenError> {
    let mut minted = mint_with(keys, vec![token], None)?;
    Ok(minted.pop().expect("one token in, one out"))
}

/// Mints tokens together: they share one signature over the Merkle root of their leaves,
/// with a fresh random tree id and salts. A lone token is a tree of one, so no two
/// mints share bytes: the issuer tells its own store from a twin request's by them.
pub fn mint_all(
    keys: &KeyRing,
    tokens: Vec<pb::RedPacketToken>,
) -> Result<Vec<SignedAward>, TokenError> {
    use rand::RngCore;
    let mut rng = rand::rng();
    let mut tree_id = [0u8; ID_LEN];
    rng.fill_bytes(&mut tree_id);
    let mut salts = vec![[0u8; ID_LEN]; tokens.len()];
    for salt in &mut salts {
        rng.fill_bytes(salt);
    }
    mint_with(keys, tokens, Some((tree_id, &salts)))
}

/// Mints `tokens`: one alone signed singly when `tree` is `None`, else a tree with the
/// given id and salts (test vectors are reproducible).
fn mint_with(
    keys: &KeyRing,
    mut tokens: Vec<pb::RedPacketToken>,
    tree: Option<([u8; ID_LEN], &[[u8; ID_LEN]])>,
) -> Result<Vec<SignedAward>, TokenError> {
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let key_id = keys
        .active_key_id()
        .ok_or(TokenError::NoSigner)?
        .to_string();
    let payloads: Vec<Vec<u8>> = tokens
        .iter_mut()
        .map(|token| {
            token.key_id = key_id.clone();
            token.status = pb::TokenStatus::Pending as i32;
            token.encode_to_vec()
        })
        .collect();
    let wrap = |token, payload, signature, batch| SignedAward {
        bytes: pb::SignedToken {
            payload,
            signature,
            key_id: key_id.clone(),
            batch,
        }
        .encode_to_vec(),
        token,
    };
    let Some((tree_id, salts)) = tree else {
        if tokens.len() != 1 {
            return Err(TokenError::BadEncoding("only one token is signed singly"));
        }
        let (_, signature) = keys.sign(&payloads[0]).ok_or(TokenError::NoSigner)?;
        let (token, payload) = (tokens.pop(), payloads.into_iter().next());
        return Ok(vec![wrap(
            token.unwrap(),
            payload.unwrap(),
            signature,
            None,
        )]);
    };
    let size =
        u32::try_from(tokens.len()).map_err(|_| TokenError::BadEncoding("batch too large"))?;
    let leaves: Vec<Hash> = payloads
        .iter()
        .zip(salts)
        .map(|(payload, salt)| merkle::leaf_hash(&tree_id, salt, payload))
        .collect();
    let (root, paths) = merkle::build(&leaves);
    let (_, signature) = keys
        .sign(&merkle::root_message(&tree_id, size, &root))
        .ok_or(TokenError::NoSigner)?;
    Ok(tokens
        .into_iter()
        .zip(payloads)
        .zip(paths)
        .enumerate()
        .map(|(index, ((token, payload), path))| {
            let proof = pb::BatchProof {
                tree_id: tree_id.to_vec(),
                size,
                index: index as u32,
                salt: salts[index].to_vec(),
                path: path.concat(),
            };
            wrap(token, payload, signature.clone(), Some(proof))
        })
        .collect())
}

/// Decodes and verifies a token presented from outside (a client's copy).
pub fn verify(keys: &KeyRing, bytes: &[u8]) -> Result<pb::RedPacketToken, TokenError> {
    let signed =
        pb::SignedToken::decode(bytes).map_err(|_| TokenError::BadEncoding("not a SignedToken"))?;
    if signed.payload.is_empty() || signed.signature.is_empty() || signed.key_id.is_empty() {
        return Err(TokenError::BadEncoding(
            "payload, signature or key id missing",
        ));
    }
    match &signed.batch {
        None => keys.verify(&signed.key_id, &signed.payload, &signed.signature)?,
        Some(proof) => {
            let message = batch_root_message(proof, &signed.payload)?;
            keys.verify(&signed.key_id, &message, &signed.signature)?
        }
    }
    let token = pb::RedPacketToken::decode(signed.payload.as_slice())
        .map_err(|_| TokenError::BadEncoding("payload is not a RedPacketToken"))?;
    if token.key_id != signed.key_id {
        // The payload names the key that signed it; a mismatch means the envelope was
        // rewritten around a payload signed by another key.
        return Err(TokenError::Verify(VerifyError::BadSignature));
    }
    Ok(token)
}

/// What a batch token's signature must cover, recomputed from its proof; a proof that
/// cannot belong to its tree fails as a bad signature.
fn batch_root_message(proof: &pb::BatchProof, payload: &[u8]) -> Result<Vec<u8>, TokenError> {
    if proof.tree_id.len() != ID_LEN || proof.salt.len() != ID_LEN || proof.path.len() % 32 != 0 {
        return Err(TokenError::BadEncoding("malformed batch proof"));
    }
    let path: Vec<Hash> = proof
        .path
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte chunk"))
        .collect();
    let leaf = merkle::leaf_hash(&proof.tree_id, &proof.salt, payload);
    let root = merkle::root_from_proof(leaf, proof.index, proof.size, &path)
        .ok_or(TokenError::Verify(VerifyError::BadSignature))?;
    Ok(merkle::root_message(&proof.tree_id, proof.size, &root))
}

/// Decodes a token the service itself stored, without checking the signature again.
pub fn decode_trusted(bytes: &[u8]) -> Result<pb::RedPacketToken, TokenError> {
    let signed =
        pb::SignedToken::decode(bytes).map_err(|_| TokenError::BadEncoding("not a SignedToken"))?;
    pb::RedPacketToken::decode(signed.payload.as_slice())
        .map_err(|_| TokenError::BadEncoding("payload is not a RedPacketToken"))
}

pub fn to_base64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn from_base64(text: &str) -> Result<Vec<u8>, TokenError> {
    B64.decode(text.trim_end_matches('='))
        .map_err(|_| TokenError::BadEncoding("not base64url"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    fn ring() -> (std::path::PathBuf, KeyRing) {
        let dir = std::env::temp_dir().join(format!(
            "rpw-token-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        keys::generate(&dir).unwrap();
        let ring = KeyRing::load(&dir, &[]).unwrap();
        (dir, ring)
    }

    fn sample() -> pb::RedPacketToken {
        pb::RedPacketToken {
            app_id: 1,
            user_id: 42,
            activity_id: "cny2027".into(),
            scene_id: "rain".into(),
            amount_cents: 88,
            out_trade_no: "42_rain_7_cash_live".into(),
            open_time_ms: 1,
            rain_id: 7,
            award_type: "cash".into(),
            stage: pb::Stage::Live as i32,
            issued_at_ms: 2,
            ..Default::default()
        }
    }

    /// The issuer tells its own store (a cluster call sent again) from a twin request's
    /// by the bytes: two mints of the same award, even alone and in the same
    /// millisecond, never share them.
    #[test]
    fn two_mints_of_the_same_award_never_share_bytes() {
        let (_dir, ring) = ring();
        let a = mint_all(&ring, vec![sample()]).unwrap().remove(0);
        let b = mint_all(&ring, vec![sample()]).unwrap().remove(0);
        assert_eq!(a.token, b.token);
        assert_ne!(a.bytes, b.bytes);
        for award in [a, b] {
            assert_eq!(verify(&ring, &award.bytes).unwrap(), award.token);
        }
    }

    #[test]
    fn a_minted_token_round_trips() {
        let (_dir, ring) = ring();
        let award = mint(&ring, sample()).unwrap();
        let back = verify(&ring, &award.bytes).unwrap();
        assert_eq!(back, award.token);
        assert_eq!(back.amount_cents, 88);
        let text = to_base64(&award.bytes);
        assert_eq!(from_base64(&text).unwrap(), award.bytes);
    }

    #[test]
    fn tampering_is_caught_with_its_own_reason() {
        let (dir, ring) = ring();
        let award = mint(&ring, sample()).unwrap();
        let signed = pb::SignedToken::decode(award.bytes.as_slice()).unwrap();

        let mut payload_tampered = signed.clone();
        let mut token = sample();
        token.amount_cents = 8_800;
        token.key_id = signed.key_id.clone();
        token.status = pb::TokenStatus::Pending as i32;
        payload_tampered.payload = token.encode_to_vec();
        assert_eq!(
            verify(&ring, &payload_tampered.encode_to_vec()),
            Err(TokenError::Verify(VerifyError::BadSignature))
        );

        let mut sig_tampered = signed.clone();
        sig_tampered.signature[0] ^= 1;
        assert_eq!(
            verify(&ring, &sig_tampered.encode_to_vec()),
            Err(TokenError::Verify(VerifyError::BadSignature))
        );

        let mut unknown = signed.clone();
        unknown.key_id = "ed25519-nobody".into();
        assert_eq!(
            verify(&ring, &unknown.encode_to_vec()),
            Err(TokenError::Verify(VerifyError::UnknownKey(
                "ed25519-nobody".into()
            )))
        );

        assert!(matches!(
            verify(&ring, b"\xff\xff\xff"),
            Err(TokenError::BadEncoding(_))
        ));

        keys::retire(&dir, &signed.key_id).unwrap();
        let ring = KeyRing::load(&dir, &[]).unwrap();
        assert_eq!(
            verify(&ring, &award.bytes),
            Err(TokenError::Verify(VerifyError::RetiredKey(signed.key_id)))
        );
    }

    #[test]
    fn a_token_signed_before_rotation_verifies_after_it() {
        let (dir, ring) = ring();
        let award = mint(&ring, sample()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        keys::generate(&dir).unwrap();
        let rotated = KeyRing::load(&dir, &[]).unwrap();
        assert_ne!(rotated.active_key_id(), Some(award.token.key_id.as_str()));
        assert_eq!(verify(&rotated, &award.bytes).unwrap(), award.token);
    }
}
