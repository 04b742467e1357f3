//! Award tokens: mint → encode → sign the exact bytes; decode → verify.
//!
//! A token travels as the bytes of an encoded [`pb::SignedToken`] (base64url in JSON).
//! The signature covers `SignedToken.payload` exactly as carried, so anyone holding the
//! public key from `GET /v1/keys` can check a token offline without re-encoding anything.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use prost::Message;

use crate::keys::{KeyRing, VerifyError};
use crate::pb;

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

/// Encodes `token` (its key id set to the active key's), signs the encoding and wraps both.
pub fn mint(keys: &KeyRing, mut token: pb::RedPacketToken) -> Result<SignedAward, TokenError> {
    let key_id = keys
        .active_key_id()
        .ok_or(TokenError::NoSigner)?
        .to_string();
    token.key_id = key_id;
    token.status = pb::TokenStatus::Pending as i32;
    let payload = token.encode_to_vec();
    let (key_id, signature) = keys.sign(&payload).ok_or(TokenError::NoSigner)?;
    let signed = pb::SignedToken {
        payload,
        signature,
        key_id: key_id.to_string(),
    };
    Ok(SignedAward {
        bytes: signed.encode_to_vec(),
        token,
    })
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
    keys.verify(&signed.key_id, &signed.payload, &signed.signature)?;
    let token = pb::RedPacketToken::decode(signed.payload.as_slice())
        .map_err(|_| TokenError::BadEncoding("payload is not a RedPacketToken"))?;
    if token.key_id != signed.key_id {
        // The payload names the key that signed it; a mismatch means the envelope was
        // rewritten around a payload signed by another key.
        return Err(TokenError::Verify(VerifyError::BadSignature));
    }
    Ok(token)
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
