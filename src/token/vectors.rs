//! The token test vectors in `docs/token-vectors.json`: built here from a fixed key, tree
//! id and salts, checked against the file (`RPW_WRITE_VECTORS=1` rewrites it), and every
//! vector's expected outcome checked with this crate's verifier. CI checks the same file
//! with the independent verifier (`docs/verify/verify_token.py`).

use std::path::PathBuf;

use base64::Engine;
use prost::Message;
use serde_json::{json, Value};

use super::{mint_with, to_base64, verify, B64, ID_LEN};
use crate::keys::KeyRing;
use crate::pb;

const KEY_ID: &str = "ed25519-vectors-1";
const SEED: [u8; 32] = [0x11; 32];
const STRANGER_ID: &str = "ed25519-vectors-unlisted";
const STRANGER_SEED: [u8; 32] = [0x22; 32];

fn draft(i: i64) -> pb::RedPacketToken {
    pb::RedPacketToken {
        app_id: 1,
        user_id: 1000 + i,
        activity_id: "cny2027".into(),
        scene_id: "rain".into(),
        amount_cents: 88 + i,
        out_trade_no: format!("{}_cny2027_rain_7_cash_live", 1000 + i),
        open_time_ms: 1_798_761_600_000,
        rain_id: 7,
        award_type: "cash".into(),
        stage: pb::Stage::Live as i32,
        issued_at_ms: 1_798_761_600_123,
        budget_gen: 1,
        ..Default::default()
    }
}

fn salts(n: usize) -> Vec<[u8; ID_LEN]> {
    (0..n).map(|i| [0x30 + i as u8; ID_LEN]).collect()
}

fn entry(name: &str, bytes: &[u8], valid: bool, why: &str) -> Value {
    let signed = pb::SignedToken::decode(bytes).expect("a SignedToken");
    let token = pb::RedPacketToken::decode(signed.payload.as_slice()).ok();
    json!({
        "name": name,
        "token": to_base64(bytes),
        "valid": valid,
        "why": why,
        "user_id": token.as_ref().map(|t| t.user_id),
        "amount_cents": token.as_ref().map(|t| t.amount_cents),
        "out_trade_no": token.as_ref().map(|t| t.out_trade_no.clone()),
    })
}

/// Applies `change` to a decoded SignedToken and encodes it again.
fn altered(bytes: &[u8], change: impl FnOnce(&mut pb::SignedToken)) -> Vec<u8> {
    let mut signed = pb::SignedToken::decode(bytes).unwrap();
    change(&mut signed);
    signed.encode_to_vec()
}

fn build() -> Value {
    let ring = KeyRing::from_seed(KEY_ID, &SEED).unwrap();
    let stranger = KeyRing::from_seed(STRANGER_ID, &STRANGER_SEED).unwrap();
    let single = mint_with(&ring, vec![draft(0)], None)
        .unwrap()
        .remove(0)
        .bytes;
    let alone = mint_with(&ring, vec![draft(11)], Some(([0x3c; ID_LEN], &salts(1))))
        .unwrap()
        .remove(0)
        .bytes;
    let batch: Vec<Vec<u8>> = mint_with(
        &ring,
        (1..=5).map(draft).collect(),
        Some(([0xa5; ID_LEN], &salts(5))),
    )
    .unwrap()
    .into_iter()
    .map(|a| a.bytes)
    .collect();
    let unlisted = mint_with(
        &stranger,
        vec![draft(9), draft(10)],
        Some(([0x5a; ID_LEN], &salts(2))),
    )
    .unwrap()
    .remove(0)
    .bytes;
    let mut vectors = vec![
        entry("single", &single, true, ""),
        entry("batch of 1 (a token minted alone)", &alone, true, ""),
    ];
    for (i, bytes) in batch.iter().enumerate() {
        vectors.push(entry(&format!("batch of 5, leaf {i}"), bytes, true, ""));
    }
    let third = &batch[2];
    let other_payload = pb::SignedToken::decode(batch[3].as_slice())
        .unwrap()
        .payload;
    let bent: [(&str, Vec<u8>, &str); 10] = [
        (
            "single, amount changed",
            altered(&single, |s| {
                let mut t = pb::RedPacketToken::decode(s.payload.as_slice()).unwrap();
                t.amount_cents = 8_800;
                s.payload = t.encode_to_vec();
            }),
            "the signature does not cover this payload",
        ),
        (
            "batch leaf 2, amount changed",
            altered(third, |s| {
                let mut t = pb::RedPacketToken::decode(s.payload.as_slice()).unwrap();
                t.amount_cents = 8_800;
                s.payload = t.encode_to_vec();
            }),
            "the leaf no longer leads to the signed root",
        ),
        (
            "batch leaf 2 with leaf 3's payload",
            altered(third, |s| s.payload = other_payload.clone()),
            "the proof belongs to another leaf",
        ),
        (
            "batch leaf 2, index changed",
            altered(third, |s| s.batch.as_mut().unwrap().index = 1),
            "the path leads elsewhere from another index",
        ),
        (
            "batch leaf 2, size changed",
            altered(third, |s| s.batch.as_mut().unwrap().size = 6),
            "the size is signed with the root",
        ),
        (
            "batch leaf 2, salt changed",
            altered(third, |s| s.batch.as_mut().unwrap().salt[0] ^= 1),
            "the salt is part of the leaf",
        ),
        (
            "batch leaf 2, tree id changed",
            altered(third, |s| s.batch.as_mut().unwrap().tree_id[0] ^= 1),
            "the tree id is part of every leaf and of the signed message",
        ),
        (
            "batch leaf 2, a path hash changed",
            altered(third, |s| s.batch.as_mut().unwrap().path[40] ^= 1),
            "the path no longer leads to the signed root",
        ),
        (
            "batch leaf 2, proof removed",
            altered(third, |s| s.batch = None),
            "the signature is over the root, not over the payload",
        ),
        (
            "batch leaf 0 signed by an unlisted key",
            unlisted,
            "its key is not listed",
        ),
    ];
    for (name, bytes, why) in bent {
        vectors.push(entry(name, &bytes, false, why));
    }
    let public = B64.encode(ring.published()[0].public_key.as_slice());
    json!({
        "about": "Test vectors for redpacket-wallet tokens (API.md, \"Tokens\"). Each `token` is an encoded SignedToken in base64url without padding; a verifier given `keys` (as GET /v1/keys lists them) must accept exactly the vectors marked valid.",
        "keys": [{"key_id": KEY_ID, "alg": "Ed25519", "public_key": public, "active": true}],
        "vectors": vectors,
    })
}

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/token-vectors.json")
}

#[test]
fn the_published_vectors_are_what_this_crate_mints_and_verifies() {
    let built = build();
    let ring = KeyRing::from_seed(KEY_ID, &SEED).unwrap();
    for v in built["vectors"].as_array().unwrap() {
        let bytes = super::from_base64(v["token"].as_str().unwrap()).unwrap();
        assert_eq!(
            verify(&ring, &bytes).is_ok(),
            v["valid"].as_bool().unwrap(),
            "{}",
            v["name"]
        );
    }
    let text = serde_json::to_string_pretty(&built).unwrap() + "\n";
    if std::env::var_os("RPW_WRITE_VECTORS").is_some() {
        std::fs::write(vectors_path(), &text).unwrap();
    }
    let published = std::fs::read_to_string(vectors_path())
        .expect("docs/token-vectors.json (RPW_WRITE_VECTORS=1 cargo test --lib vectors writes it)");
    assert_eq!(
        published, text,
        "docs/token-vectors.json differs from what this crate mints"
    );
}
