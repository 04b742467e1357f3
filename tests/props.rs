//! Bad input at scale: every decoder and parser at the edge gets generated input and
//! must never panic, and must refuse with the API's code (`invalid_request`) what it
//! cannot take. `PROPTEST_CASES` sets the count (scripts/fuzz.sh runs a million per
//! target in release mode).

use std::sync::OnceLock;

use axum::http::{header, HeaderMap, HeaderValue};
use proptest::prelude::*;
use redpacket_wallet::activity::NewActivity;
use redpacket_wallet::config::Settings;
use redpacket_wallet::domain::{ActivityId, AwardType, OutTradeNo, SceneId, Stage, UserId};
use redpacket_wallet::http::auth::AuthKeys;
use redpacket_wallet::http::withdrawals::WithdrawRequest;
use redpacket_wallet::http::{check_list_len, decode_body, parse_json};
use redpacket_wallet::issue::AwardRequest;
use redpacket_wallet::keys::KeyRing;
use redpacket_wallet::pb;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rpw-props-{}", std::process::id()));
        redpacket_wallet::keys::generate(&dir).unwrap();
        KeyRing::load(&dir, &[]).unwrap()
    })
}

fn valid_token() -> &'static Vec<u8> {
    static TOKEN: OnceLock<Vec<u8>> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let draft = pb::RedPacketToken {
            user_id: 42,
            activity_id: "cny2027".into(),
            scene_id: "rain".into(),
            amount_cents: 88,
            out_trade_no: "42_cny2027_rain_7_cash_live".into(),
            award_type: "cash".into(),
            stage: pb::Stage::Live as i32,
            ..Default::default()
        };
        redpacket_wallet::token::mint(ring(), draft).unwrap().bytes
    })
}

fn auth() -> &'static AuthKeys {
    static AUTH: OnceLock<AuthKeys> = OnceLock::new();
    AUTH.get_or_init(|| {
        let settings = Settings::load_with(
            None,
            [
                (
                    "RPW_AUTH__JWT_SECRET".to_string(),
                    "props-secret".to_string(),
                ),
                ("RPW_AUTH__ADMIN_KEY".to_string(), "props-admin".to_string()),
            ],
        )
        .unwrap();
        AuthKeys::new(&settings.auth, Vec::new(), 0)
    })
}

fn headers(content_type: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h
}

/// Decodes like the HTTP edge does; an error must carry the API's code.
fn decodes_or_refuses<J, P>(content_type: &'static str, body: &[u8])
where
    J: serde::de::DeserializeOwned,
    P: prost::Message + Default + Into<J>,
{
    let h = headers(content_type);
    let checked = check_list_len(&h, body, 1, 1000);
    if let Err(e) = &checked {
        assert_eq!(e.code(), "invalid_request");
        return;
    }
    if let Err(e) = decode_body::<J, P>(&h, body) {
        assert_eq!(e.code(), "invalid_request", "{e}");
    }
}

/// A JSON value of the shapes bodies take, with wrong types and odd numbers mixed in.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("user_id".to_string()),
                    Just("activity_id".to_string()),
                    Just("scene_id".to_string()),
                    Just("amount_cents".to_string()),
                    Just("award_type".to_string()),
                    Just("rain_id".to_string()),
                    Just("awards".to_string()),
                    Just("tokens".to_string()),
                    Just("request_id".to_string()),
                    Just("budget_cents".to_string()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Token bytes: garbage never verifies and never panics.
    #[test]
    fn token_bytes_never_panic_nor_verify(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(redpacket_wallet::token::verify(ring(), &bytes).is_err() || bytes == *valid_token());
        let _ = redpacket_wallet::token::decode_trusted(&bytes);
    }

    /// A real token with any one byte changed never verifies.
    #[test]
    fn a_token_with_one_byte_changed_never_verifies(at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut bytes = valid_token().clone();
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        prop_assert!(redpacket_wallet::token::verify(ring(), &bytes).is_err());
    }

    /// Base64 token text of any shape decodes or is refused.
    #[test]
    fn token_text_never_panics(text in ".{0,300}") {
        let _ = redpacket_wallet::token::from_base64(&text);
    }

    /// Protobuf bodies of every pb endpoint: decoded or refused with invalid_request.
    #[test]
    fn protobuf_bodies_decode_or_refuse(body in prop::collection::vec(any::<u8>(), 0..400)) {
        decodes_or_refuses::<AwardRequest, pb::AwardRequest>("application/x-protobuf", &body);
        let h = headers("application/x-protobuf");
        if let Err(e) = check_list_len(&h, &body, 1, 1000) {
            prop_assert_eq!(e.code(), "invalid_request");
        }
        let _ = <pb::AwardBatchRequest as prost::Message>::decode(body.as_slice());
        let _ = <pb::SyncRequest as prost::Message>::decode(body.as_slice());
    }

    /// JSON bodies: any JSON value (and any text) is taken or refused with invalid_request.
    #[test]
    fn json_bodies_decode_or_refuse(value in json_value(), text in ".{0,200}") {
        let bytes = serde_json::to_vec(&value).unwrap();
        for body in [bytes.as_slice(), text.as_bytes()] {
            decodes_or_refuses::<AwardRequest, pb::AwardRequest>("application/json", body);
            for e in [
                parse_json::<NewActivity>(body).err(),
                parse_json::<WithdrawRequest>(body).err(),
            ].into_iter().flatten() {
                prop_assert_eq!(e.code(), "invalid_request");
            }
        }
    }

    /// Flow cursors: any text decodes or is refused; what we encode comes back.
    #[test]
    fn cursors_never_panic_and_round_trip(text in ".{0,120}", at in any::<i64>(), otn in "[a-z0-9_-]{0,150}") {
        let _ = redpacket_wallet::wallet::decode_cursor(&text);
        let cursor = redpacket_wallet::wallet::encode_cursor(at, &otn);
        prop_assert_eq!(redpacket_wallet::wallet::decode_cursor(&cursor), Some((at, otn)));
    }

    /// Ids and out_trade_no: a slug is taken exactly when it is 1-32 of [a-z0-9-], and a
    /// composed out_trade_no gives back its activity.
    #[test]
    fn ids_and_out_trade_nos(text in ".{0,40}", user in 1i64..i64::MAX, rain in 0i64..i64::MAX,
                             activity in "[a-z0-9-]{1,32}", scene in "[a-z0-9-]{1,32}") {
        let ok = (1..=32).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        prop_assert_eq!(ActivityId::parse(&text).is_ok(), ok);
        prop_assert_eq!(SceneId::parse(&text).is_ok(), ok);
        prop_assert_eq!(AwardType::parse(&text).is_ok(), ok);
        let otn = OutTradeNo::compose(
            UserId::parse(user).unwrap(),
            &ActivityId::parse(&activity).unwrap(),
            &SceneId::parse(&scene).unwrap(),
            rain,
            &AwardType::parse("cash").unwrap(),
            Stage::Live,
        );
        prop_assert_eq!(OutTradeNo::activity_of(otn.as_str()), Some(activity.as_str()));
        let _ = OutTradeNo::activity_of(&text);
    }

    /// JWTs: garbage is no user; a real one with any one character changed is no user
    /// (or the same one, when the change is in base64 padding bits).
    #[test]
    fn jwts_never_panic(text in ".{0,300}", at in any::<prop::sample::Index>(), c in "[A-Za-z0-9_.-]") {
        prop_assert!(auth().user(&text).is_none() || text.contains('.'));
        let user = UserId::parse(42).unwrap();
        let jwt = auth().issue_user_jwt(user, 3600).unwrap();
        let i = at.index(jwt.len());
        let mut changed = jwt.clone();
        changed.replace_range(i..=i, &c);
        let seen = auth().user(&changed);
        prop_assert!(seen.is_none() || seen == Some(user));
    }

    /// Configuration: any value for any key loads or fails with an error, never a panic.
    #[test]
    fn configuration_never_panics(key in prop_oneof![
        Just("RPW_HTTP__ADDR"), Just("RPW_REDIS__PARTITIONS"), Just("RPW_ISSUE__SUB_STOCKS"),
        Just("RPW_SETTLE__MAX_TPS"), Just("RPW_ISSUE__BATCH_MAX"), Just("RPW_WALLET__SYNC_MAX"),
        Just("RPW_AUTH__CALLER_KEYS"), Just("RPW_AUTH__PAYOUT_CALLERS"), Just("RPW_CRON__SETTLE"),
        Just("RPW_MYSQL__SHARD_URLS"), Just("RPW_HTTP__BODY_LIMIT_BYTES"), Just("RPW_ISSUE__GRANT_SLICES"),
    ], value in ".{0,40}") {
        let _ = Settings::load_with(None, [(key.to_string(), value)]);
    }
}
