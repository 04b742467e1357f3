use std::collections::{HashMap, HashSet};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use prost::Message;
use redpacket_wallet::pb;
use serde_json::{json, Value};

use crate::helpers::*;

/// Issues through the batch endpoint; returns each user's tokens (the client's copy).
async fn issue(t: &TestApp, awards: &[Value]) -> HashMap<i64, Vec<String>> {
    let mut tokens: HashMap<i64, Vec<String>> = HashMap::new();
    for (a, r) in awards.iter().zip(issue_all(t, awards.to_vec()).await) {
        tokens
            .entry(a["user_id"].as_i64().unwrap())
            .or_default()
            .push(r["token"].as_str().unwrap().to_string());
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_stay_exact_through_a_live_drain() {
    let t = spawn_app_with(Options {
        worker: true,
        env: vec![
            ("RPW_SETTLE__MAX_TPS".into(), "600".into()),
            ("RPW_SETTLE__BATCH_SIZE".into(), "50".into()),
            ("RPW_SETTLE__CONCURRENCY".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let awards: Vec<Value> = (0..2_000)
        .map(|i| award(1 + i % 20, i, 1 + i % 37))
        .collect();
    let mut expected: HashMap<i64, i64> = HashMap::new();
    for a in &awards {
        *expected.entry(a["user_id"].as_i64().unwrap()).or_default() +=
            a["amount_cents"].as_i64().unwrap();
    }
    // The drain starts once every award is issued.
    t.pause_booking(true).await;
    issue(&t, &awards).await;
    t.pause_booking(false).await;
    let jwts: HashMap<i64, String> = (1..=20).map(|u| (u, t.jwt(u))).collect();
    let mut polls = 0;
    let mut mixed = 0;
    let mut done = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let mut all_booked = true;
        for u in 1..=20 {
            let (status, w) = t.get("/v1/wallet", Some(&jwts[&u])).await;
            assert_eq!(status, 200);
            polls += 1;
            let (balance, booked, pending) = (
                w["balance_cents"].as_i64().unwrap(),
                w["booked_cents"].as_i64().unwrap(),
                w["pending_cents"].as_i64().unwrap(),
            );
            assert_eq!(balance, expected[&u], "user {u} mid-drain: {w}");
            assert_eq!(booked + pending, balance, "{w}");
            assert_eq!(w["total_income_cents"].as_i64().unwrap(), expected[&u]);
            if booked > 0 && pending > 0 {
                mixed += 1;
            }
            if pending > 0 {
                all_booked = false;
            }
        }
        if all_booked {
            done = true;
            break;
        }
    }
    assert!(done, "the drain finished");
    assert!(mixed > 0, "some views were taken mid-drain ({polls} polls)");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_restore_what_redis_lost() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let awards: Vec<Value> = (0..400).map(|i| award(1 + i % 10, i, 10 + i % 7)).collect();
    let mut expected: HashMap<i64, i64> = HashMap::new();
    for a in &awards {
        *expected.entry(a["user_id"].as_i64().unwrap()).or_default() +=
            a["amount_cents"].as_i64().unwrap();
    }
    let kept = issue(&t, &awards).await;
    // Book part of the backlog: two of the four partitions.
    let mut w = t.worker("partial");
    for p in 0..2 {
        while let redpacket_wallet::settle::worker::Outcome::Booked { .. } =
            w.try_execute_batch(p).await.unwrap()
        {}
    }
    let booked_before = t.sql_i64("SELECT COUNT(*) FROM ledger_entries").await;
    assert!(booked_before > 0 && booked_before < 400, "{booked_before}");
    // Redis loses everything of this deployment.
    let mut conn = t.app.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", t.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    for u in 1..=10 {
        let balance = t.wallet(u).await["balance_cents"].as_i64().unwrap();
        if u % 4 < 2 {
            assert_eq!(
                balance, expected[&u],
                "user {u}: every token was booked before the loss"
            );
        } else {
            assert!(
                balance < expected[&u],
                "user {u}: the loss is visible before sync"
            );
        }
    }
    let mut restored = 0;
    let mut known = 0;
    for (user, tokens) in &kept {
        let (status, body) = t
            .post(
                "/v1/wallet/tokens:sync",
                &t.jwt(*user),
                &json!({"tokens": tokens}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["rejected"].as_array().unwrap().is_empty(), "{body}");
        restored += body["restored"].as_i64().unwrap();
        known += body["known"].as_i64().unwrap();
    }
    assert_eq!(
        known, booked_before,
        "tokens the ledger holds count as known"
    );
    assert_eq!(restored, 400 - booked_before);
    for u in 1..=10 {
        assert_eq!(
            t.wallet(u).await["balance_cents"],
            expected[&u],
            "exact again after sync"
        );
    }
    // A second sync is all known.
    let (_, again) = t
        .post(
            "/v1/wallet/tokens:sync",
            &t.jwt(1),
            &json!({"tokens": kept[&1]}),
        )
        .await;
    assert_eq!(again["restored"], 0);
    t.drain().await;
    let (count, dupes): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(COUNT(*) - COUNT(DISTINCT out_trade_no) AS SIGNED) FROM ledger_entries WHERE kind = 'award'",
    )
    .fetch_one(t.app.db.main())
    .await
    .unwrap();
    assert_eq!((count, dupes), (400, 0));
    for u in 1..=10 {
        let w = t.wallet(u).await;
        assert_eq!(w["balance_cents"], expected[&u]);
        assert_eq!(w["booked_cents"], expected[&u]);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_rejects_foreign_forged_retired_and_garbage_tokens() {
    // The app's keys: an active one, and a retired one whose private half we keep here.
    let keys_dir = temp_keys_dir();
    let retired_dir = temp_keys_dir();
    let retired_ring = redpacket_wallet::keys::KeyRing::load(&retired_dir, &[]).unwrap();
    let retired_id = retired_ring.active_key_id().unwrap().to_string();
    std::fs::copy(
        retired_dir.join(format!("{retired_id}.pub")),
        keys_dir.join(format!("{retired_id}.pub")),
    )
    .unwrap();
    std::fs::write(keys_dir.join(format!("{retired_id}.retired")), "retired").unwrap();
    let t = spawn_app_with(Options {
        keys_dir: Some(keys_dir),
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    let mine = issue(&t, &[award(1, 1, 10)]).await.remove(&1).unwrap();
    let theirs = issue(&t, &[award(2, 1, 10)]).await.remove(&2).unwrap();
    let draft = pb::RedPacketToken {
        app_id: 1,
        user_id: 1,
        activity_id: "cny2027".into(),
        scene_id: "rain".into(),
        amount_cents: 5_000,
        out_trade_no: "1_cny2027_rain_99_cash_live".into(),
        rain_id: 99,
        award_type: "cash".into(),
        stage: pb::Stage::Live as i32,
        ..Default::default()
    };
    let from_retired = redpacket_wallet::token::mint(&retired_ring, draft.clone())
        .unwrap()
        .bytes;
    let stranger_dir = temp_keys_dir();
    let stranger = redpacket_wallet::keys::KeyRing::load(&stranger_dir, &[]).unwrap();
    let forged = redpacket_wallet::token::mint(&stranger, draft.clone())
        .unwrap()
        .bytes;
    let mut tampered = pb::SignedToken::decode(B64.decode(&mine[0]).unwrap().as_slice()).unwrap();
    let mut payload = pb::RedPacketToken::decode(tampered.payload.as_slice()).unwrap();
    payload.amount_cents = 9_999;
    tampered.payload = payload.encode_to_vec();
    let before_redis = t.redis_snapshot().await;
    let tokens = json!({"tokens": [
        theirs[0],
        B64.encode(&forged),
        B64.encode(&from_retired),
        "!!not base64!!",
        B64.encode(b"garbage bytes"),
        B64.encode(tampered.encode_to_vec()),
        mine[0],
    ]});
    let (status, body) = t.post("/v1/wallet/tokens:sync", &t.jwt(1), &tokens).await;
    assert_eq!(status, 200, "{body}");
    let rejected: Vec<(i64, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_i64().unwrap(),
                r["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (0, "forbidden".to_string()),
            (1, "invalid_request".to_string()),
            (2, "invalid_request".to_string()),
            (3, "invalid_request".to_string()),
            (4, "invalid_request".to_string()),
            (5, "invalid_request".to_string()),
        ]
    );
    assert_eq!(body["known"], 1);
    assert_eq!(body["restored"], 0);
    assert_eq!(
        t.redis_snapshot().await,
        before_redis,
        "rejected tokens changed nothing"
    );
    assert_eq!(t.wallet(1).await["balance_cents"], 10);
    // Over the limit, and garbage JSON.
    let many: Vec<String> = (0..1001).map(|_| mine[0].clone()).collect();
    assert_eq!(
        t.post(
            "/v1/wallet/tokens:sync",
            &t.jwt(1),
            &json!({"tokens": many})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        t.post("/v1/wallet/tokens:sync", &t.jwt(1), &json!({"tokenz": []}))
            .await
            .0,
        400
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_pages_hold_every_item_once_while_awards_arrive() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let user = 11;
    issue(
        &t,
        &(0..40).map(|i| award(user, i, 1 + i)).collect::<Vec<_>>(),
    )
    .await;
    // Part booked, part pending, and a withdrawal in the ledger.
    let mut w = t.worker("flows");
    w.try_execute_batch(user as u32 % 4).await.unwrap();
    let (status, _) = t
        .post(
            "/v1/withdrawals",
            &t.jwt(user),
            &json!({"request_id": "f1", "amount_cents": 30}),
        )
        .await;
    assert_eq!(status, 201);
    issue(&t, &(40..60).map(|i| award(user, i, 1)).collect::<Vec<_>>()).await;
    let expected: HashSet<String> = (0..60)
        .map(|i| format!("{user}_cny2027_rain_{i}_cash_live"))
        .chain(std::iter::once("withdraw".to_string()))
        .collect();
    let jwt = t.jwt(user);
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut round = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/wallet/flows?limit=7&cursor={c}"),
            None => "/v1/wallet/flows?limit=7".to_string(),
        };
        let (status, page) = t.get(&path, Some(&jwt)).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            let name = if item["kind"] == "withdraw" {
                assert_eq!(item["amount_cents"], -30);
                "withdraw".to_string()
            } else {
                assert!(item["status"] == "pending" || item["status"] == "booked");
                item["out_trade_no"].as_str().unwrap().to_string()
            };
            seen.push(name);
        }
        // New awards land while the client pages, and the worker books some.
        round += 1;
        issue(&t, &[award(user, 1_000 + round, 2)]).await;
        w.try_execute_batch(user as u32 % 4).await.unwrap();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(round < 100);
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no item twice: {seen:?}");
    assert_eq!(unique, expected);
    assert_eq!(t.get("/v1/wallet/flows?limit=0", Some(&jwt)).await.0, 400);
    assert_eq!(
        t.get("/v1/wallet/flows?cursor=%%%", Some(&jwt)).await.0,
        400
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_settled_tokens_leave_the_views_exact() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_WALLET__SETTLED_RETENTION_SECS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue(&t, &(0..30).map(|i| award(4, i, 10)).collect::<Vec<_>>()).await;
    t.drain().await;
    issue(&t, &(30..35).map(|i| award(4, i, 10)).collect::<Vec<_>>()).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let trimmed = t.app.jobs.housekeeping().await.unwrap();
    assert_eq!(trimmed, 30);
    let mut conn = t.app.redis.conn();
    let held: std::collections::HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
        .arg(
            t.app
                .redis
                .tokens_key(redpacket_wallet::domain::UserId::parse(4).unwrap()),
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    let markers = held
        .values()
        .filter(|v| v.as_slice() == redpacket_wallet::tokens::TRIMMED)
        .count();
    assert_eq!(
        (held.len() - markers, markers),
        (5, 30),
        "only the pending tokens stay in Redis; the trimmed ones leave a marker"
    );
    let w = t.wallet(4).await;
    assert_eq!(w["balance_cents"], 350);
    assert_eq!(w["booked_cents"], 300);
    assert_eq!(w["pending_cents"], 50);
    assert_eq!(w["pending_count"], 5);
    // A client syncing a trimmed token: known, not restored.
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wallet_speaks_protobuf_and_each_user_sees_only_their_own() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue(&t, &[award(1, 1, 10), award(2, 1, 20)]).await;
    let resp = t
        .client
        .get(format!("{}/v1/wallet", t.url))
        .bearer_auth(t.jwt(2))
        .header("accept", "application/x-protobuf")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let w = pb::WalletResponse::decode(resp.bytes().await.unwrap()).unwrap();
    assert_eq!((w.user_id, w.balance_cents, w.pending_count), (2, 20, 1));
    assert_eq!(t.wallet(1).await["balance_cents"], 10);
    t.stop().await;
}

/// A key retired by another instance (only MySQL knows) and a new key dropped into the
/// keys directory take effect in a running instance within a key refresh: the new key
/// signs, the retired one no longer verifies, `/v1/keys` lists only the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_retired_elsewhere_takes_effect_without_a_restart() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_KEYS__REFRESH_MS".into(), "200".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    let old_id = t.app.keys.current().active_key_id().unwrap().to_string();
    let before = issue(&t, &[award(1, 1, 10)]).await.remove(&1).unwrap();
    let new_id = redpacket_wallet::keys::generate(&t.keys_dir).unwrap();
    sqlx::query("UPDATE signing_keys SET retired_at = CURRENT_TIMESTAMP(3) WHERE key_id = ?")
        .bind(&old_id)
        .execute(t.app.db.main())
        .await
        .unwrap();
    let mut listed: Vec<(String, bool)> = Vec::new();
    for _ in 0..50 {
        let (status, body) = t.get("/v1/keys", None).await;
        assert_eq!(status, 200);
        listed = body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap().to_string(),
                    k["active"].as_bool().unwrap(),
                )
            })
            .collect();
        if listed == vec![(new_id.clone(), true)] {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(listed, vec![(new_id.clone(), true)]);

    let after = issue(&t, &[award(1, 2, 10)]).await.remove(&1).unwrap();
    let signed = pb::SignedToken::decode(B64.decode(&after[0]).unwrap().as_slice()).unwrap();
    assert_eq!(
        signed.key_id, new_id,
        "new awards are signed with the new key"
    );

    let (status, body) = t
        .post(
            "/v1/wallet/tokens:sync",
            &t.jwt(1),
            &json!({"tokens": [before[0], after[0]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["rejected"],
        json!([{"index": 0, "code": "invalid_request"}]),
        "the retired key's token no longer verifies"
    );
    assert_eq!(body["known"], 1);
    t.stop().await;
}
