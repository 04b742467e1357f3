use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures::future::join_all;
use prost::Message;
use redpacket_wallet::pb;
use serde_json::{json, Value};

use crate::helpers::*;

/// What may still be issued, where it is: each sub-stock of the live generation, then
/// the budget not granted to Redis yet.
async fn budget_sub_stocks(t: &TestApp, activity: &str) -> Vec<i64> {
    let gen = t.app.budget.live_gen(activity).expect("a live generation");
    let mut conn = t.app.redis.conn();
    let mut out = Vec::new();
    for i in 0..gen.sub_stocks {
        let v: Option<i64> = redis::cmd("HGET")
            .arg(gen.stock_key(&t.app.redis, activity, i))
            .arg("avail")
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push(v.unwrap_or(0));
    }
    let figures = t.budget_figures(activity).await;
    out.push(figures.ungranted_cents);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_identical_awards_mint_one_token() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 500).await;
    let responses = join_all((0..200).map(|_| {
        let body = award(42, 7, 88);
        let t = &t;
        async move { t.post("/v1/awards", CALLER, &body).await }
    }))
    .await;
    let mut tokens = HashSet::new();
    let mut created = 0;
    for (status, body) in &responses {
        assert!(*status == 201 || *status == 200, "{status} {body}");
        if *status == 201 {
            created += 1;
            assert_eq!(body["replayed"], false);
        } else {
            assert_eq!(body["replayed"], true);
        }
        assert_eq!(body["out_trade_no"], "42_cny2027_rain_7_cash_live");
        tokens.insert(body["token"].as_str().unwrap().to_string());
    }
    assert_eq!(created, 1, "exactly one request minted");
    assert_eq!(
        tokens.len(),
        1,
        "every response carries the same token bytes"
    );
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(figures.taken_cents, 88, "budget taken once");
    let issued = t.app.tokens.issued_totals("cny2027").await.unwrap();
    assert_eq!((issued.count, issued.cents), (1, 88));
    t.stop().await;
}

/// Concurrent batches whose amounts vary, against a budget that covers only part of
/// them: the batched takes (many awards per sub-stock call) and the one-by-one walk
/// together never hand out more than the budget, and no cent is stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_against_a_tight_budget_never_over_issue() {
    // Sub-stocks seen empty are re-tried at once: the sequential awards at the end must
    // not skip cents a racing walk gave back after this instance saw the sub-stock empty.
    let t = spawn_app_with(Options {
        env: vec![("RPW_ISSUE__EXHAUSTED_RECHECK_MS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    let budget = 5_000;
    t.open_activity("cny2027", budget, 10).await;
    let batches = join_all((0..4).map(|b| {
        let awards: Vec<Value> = (0..500)
            .map(|i| award(10_000 + b * 500 + i, 3, 1 + i % 10))
            .collect();
        let t = &t;
        async move {
            t.post("/v1/awards:batch", CALLER, &json!({ "awards": awards }))
                .await
        }
    }))
    .await;
    let mut issued_cents = 0;
    let mut exhausted = 0;
    for (b, (status, body)) in batches.iter().enumerate() {
        assert_eq!(*status, 200, "{body}");
        for (i, r) in body["results"].as_array().unwrap().iter().enumerate() {
            if r["error"].is_null() {
                issued_cents += 1 + (i as i64) % 10;
            } else {
                assert_eq!(
                    r["error"]["code"], "budget_exhausted",
                    "batch {b} item {i}: {r}"
                );
                exhausted += 1;
            }
        }
    }
    assert!(exhausted > 0, "the budget ran out");
    let stocks = budget_sub_stocks(&t, "cny2027").await;
    assert!(
        stocks.iter().all(|s| *s >= 0),
        "no sub-stock negative: {stocks:?}"
    );
    let remaining: i64 = stocks.iter().sum();
    assert_eq!(
        issued_cents + remaining,
        budget,
        "every cent issued or still there"
    );
    // Nothing is stranded: what is left, spread over the sub-stocks, is still issued,
    // one award after another, down to the last cent.
    let mut left = remaining;
    let mut user = 90_000;
    while left > 0 {
        let amount = left.min(10);
        let (status, body) = t.post("/v1/awards", CALLER, &award(user, 3, amount)).await;
        assert_eq!(status, 201, "{amount} of {left} left: {body}");
        issued_cents += amount;
        left -= amount;
        user += 1;
    }
    let stocks = budget_sub_stocks(&t, "cny2027").await;
    assert!(stocks.iter().all(|s| *s == 0), "{stocks:?}");
    let issued = t.app.tokens.issued_totals("cny2027").await.unwrap();
    assert_eq!(issued.cents, issued_cents);
    assert_eq!(issued_cents, budget);
    t.stop().await;
}

/// Two requests for one award in the same millisecond: each mint has its own salt, so
/// the one that stores second finds bytes that are not its own, answers a replay of the
/// first and gives its budget back, on one node and on a cluster alike (where bytes held
/// equal to ours can only be our own store, sent again after a lost answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_award_twice_in_one_millisecond_is_minted_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 500).await;
    let now = redpacket_wallet::store::now_ms();
    let rounds = 40;
    for rain in 0..rounds {
        let request: redpacket_wallet::issue::AwardRequest =
            serde_json::from_value(award(77, rain, 10)).unwrap();
        let (a, b) = futures::join!(
            t.app
                .issuer
                .issue_at("upstream", vec![request.clone()], now),
            t.app.issuer.issue_at("upstream", vec![request], now),
        );
        let a = a.into_iter().next().unwrap().unwrap();
        let b = b.into_iter().next().unwrap().unwrap();
        assert_eq!(a.token, b.token, "round {rain}: one token");
        let minted = [a.replayed, b.replayed].iter().filter(|r| !**r).count();
        assert_eq!(minted, 1, "round {rain}: exactly one of the two minted");
    }
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(
        figures.taken_cents,
        10 * rounds,
        "each award's budget taken once"
    );
    let issued = t.app.tokens.issued_totals("cny2027").await.unwrap();
    assert_eq!((issued.count, issued.cents), (rounds, 10 * rounds));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_awards_against_a_budget_of_137_never_over_issue() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 137, 10).await;
    let responses = join_all((0..500).map(|u| {
        let body = award(1_000 + u, 1, 1);
        let t = &t;
        async move { t.post("/v1/awards", CALLER, &body).await }
    }))
    .await;
    let ok = responses.iter().filter(|(s, _)| *s == 201).count();
    let exhausted = responses
        .iter()
        .filter(|(s, b)| *s == 409 && b["error"]["code"] == "budget_exhausted")
        .count();
    assert_eq!(ok, 137);
    assert_eq!(exhausted, 500 - 137);
    let stocks = budget_sub_stocks(&t, "cny2027").await;
    assert!(
        stocks.iter().all(|s| *s == 0),
        "no sub-stock negative, none left: {stocks:?}"
    );
    let (status, view) = t.get("/v1/admin/activities/cny2027", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(view["budget_remaining_cents"], 0);
    assert_eq!(view["issued_cents"], 137);
    assert_eq!(view["issued_count"], 137);
    assert_eq!(view["pending_cents"], 137);

    // A replay after the budget ran out still returns its token.
    let first = responses.iter().position(|(s, _)| *s == 201).unwrap();
    let (status, replay) = t
        .post("/v1/awards", CALLER, &award(1_000 + first as i64, 1, 1))
        .await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["replayed"], true);
    assert_eq!(replay["token"], responses[first].1["token"]);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_cents_spread_thin_still_cover_an_award() {
    let t = spawn_app().await;
    // 16 sub-stocks of 1 cent each: no single one covers 10.
    t.open_activity("cny2027", 16, 100).await;
    let (status, body) = t.post("/v1/awards", CALLER, &award(7, 1, 10)).await;
    assert_eq!(status, 201, "{body}");
    // 6 cents remain; 7 cannot be had, and the partial takes go back.
    let (status, body) = t.post("/v1/awards", CALLER, &award(8, 1, 7)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "budget_exhausted");
    let stocks = budget_sub_stocks(&t, "cny2027").await;
    assert_eq!(stocks.iter().sum::<i64>(), 6, "{stocks:?}");
    assert!(stocks.iter().all(|s| *s >= 0));
    let (status, _) = t.post("/v1/awards", CALLER, &award(8, 1, 6)).await;
    assert_eq!(status, 201);
    assert_eq!(
        budget_sub_stocks(&t, "cny2027").await.iter().sum::<i64>(),
        0
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_budget_reopens_an_exhausted_activity() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 16, 16).await;
    assert_eq!(t.post("/v1/awards", CALLER, &award(1, 1, 16)).await.0, 201);
    assert_eq!(t.post("/v1/awards", CALLER, &award(2, 1, 1)).await.0, 409);
    let (status, _) = t
        .post(
            "/v1/admin/activities/cny2027/budget",
            ADMIN,
            &json!({"delta_cents": 32}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(t.post("/v1/awards", CALLER, &award(2, 1, 1)).await.0, 201);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_out_trade_no_with_other_fields_is_a_conflict() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 10_000, 500).await;
    assert_eq!(t.post("/v1/awards", CALLER, &award(42, 7, 88)).await.0, 201);
    let before = t.redis_snapshot().await;
    let (status, body) = t.post("/v1/awards", CALLER, &award(42, 7, 89)).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "idempotency_conflict");
    let mut other_app = award(42, 7, 88);
    other_app["app_id"] = json!(2);
    assert_eq!(t.post("/v1/awards", CALLER, &other_app).await.0, 409);
    assert_eq!(t.redis_snapshot().await, before);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_awards_get_their_code_and_change_nothing() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 10_000, 500).await;
    t.activity_with_window("later", "live", 1_000, 100, 3_600, 7_200)
        .await;
    t.scene("later", "rain", "cash").await;
    t.activity_with_window("over", "live", 1_000, 100, -7_200, -3_600)
        .await;
    t.scene("over", "rain", "cash").await;
    // Let the cache and the stats flush settle, then freeze the picture of Redis.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let before = t.redis_snapshot().await;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = award(42, 7, 88);
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "zero amount",
            with(&|b| b["amount_cents"] = json!(0)),
            400,
            "invalid_request",
        ),
        (
            "negative amount",
            with(&|b| b["amount_cents"] = json!(-1)),
            400,
            "invalid_request",
        ),
        (
            "over cap",
            with(&|b| b["amount_cents"] = json!(501)),
            422,
            "amount_over_cap",
        ),
        (
            "user 0",
            with(&|b| b["user_id"] = json!(0)),
            400,
            "invalid_request",
        ),
        (
            "unknown activity",
            with(&|b| b["activity_id"] = json!("nope")),
            404,
            "not_found",
        ),
        (
            "unknown scene",
            with(&|b| b["scene_id"] = json!("cards")),
            404,
            "not_found",
        ),
        (
            "before start",
            with(&|b| b["activity_id"] = json!("later")),
            422,
            "activity_closed",
        ),
        (
            "after end",
            with(&|b| b["activity_id"] = json!("over")),
            422,
            "activity_closed",
        ),
        (
            "wrong stage",
            with(&|b| b["stage"] = json!("gray")),
            422,
            "activity_closed",
        ),
        (
            "unknown stage",
            with(&|b| b["stage"] = json!("prod")),
            400,
            "invalid_request",
        ),
        (
            "wrong award type",
            with(&|b| b["award_type"] = json!("card")),
            400,
            "invalid_request",
        ),
        (
            "missing field",
            json!({"user_id": 42}),
            400,
            "invalid_request",
        ),
    ];
    for (what, body, status, code) in cases {
        let (s, b) = t.post("/v1/awards", CALLER, &body).await;
        assert_eq!(s, status, "{what}: {b}");
        assert_eq!(b["error"]["code"], code, "{what}");
    }
    for (content_type, raw) in [
        ("application/json", b"{\"user_id\": 4".to_vec()),
        ("application/x-protobuf", vec![0xff, 0xff, 0xff, 0x01]),
    ] {
        for path in ["/v1/awards", "/v1/awards:batch"] {
            let resp = t
                .client
                .post(format!("{}{path}", t.url))
                .bearer_auth(CALLER)
                .header("content-type", content_type)
                .body(raw.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400, "{path} {content_type}");
            let b: Value = resp.json().await.unwrap();
            assert_eq!(b["error"]["code"], "invalid_request");
        }
    }
    let too_many: Vec<Value> = (0..1001).map(|u| award(u + 1, 1, 1)).collect();
    let (s, b) = t
        .post("/v1/awards:batch", CALLER, &json!({"awards": too_many}))
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "invalid_request");
    let (s, _) = t
        .post("/v1/awards:batch", CALLER, &json!({"awards": []}))
        .await;
    assert_eq!(s, 400);
    assert_eq!(
        t.redis_snapshot().await,
        before,
        "refused awards changed Redis"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_verifies_offline_with_the_published_key() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 10_000, 500).await;
    let (status, body) = t.post("/v1/awards", CALLER, &award(42, 7, 88)).await;
    assert_eq!(status, 201);
    let bytes = B64.decode(body["token"].as_str().unwrap()).unwrap();
    let signed = pb::SignedToken::decode(bytes.as_slice()).unwrap();
    let (_, keys) = t.get("/v1/keys", None).await;
    let key = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == signed.key_id.as_str())
        .expect("the signing key is published");
    let public = B64.decode(key["public_key"].as_str().unwrap()).unwrap();
    // An award minted alone is a tree of one (API.md, "Tokens"): its root is its leaf,
    // SHA-256(0x00 ‖ tree_id ‖ salt ‖ payload), and the signature covers the root.
    let batch = signed
        .batch
        .as_ref()
        .expect("a lone award carries a batch proof");
    assert_eq!((batch.size, batch.index, batch.path.len()), (1, 0, 0));
    let sha = |parts: &[&[u8]]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            ctx.update(p);
        }
        ctx.finish().as_ref().to_vec()
    };
    let root = sha(&[&[0u8], &batch.tree_id, &batch.salt, &signed.payload]);
    let mut message = b"rpw-batch-root-v1\0".to_vec();
    message.extend_from_slice(&batch.tree_id);
    message.extend_from_slice(&batch.size.to_be_bytes());
    message.extend_from_slice(&root);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
        .verify(&message, &signed.signature)
        .expect("signature verifies offline");
    let token = pb::RedPacketToken::decode(signed.payload.as_slice()).unwrap();
    assert_eq!(token.user_id, 42);
    assert_eq!(token.amount_cents, 88);
    assert_eq!(token.out_trade_no, "42_cny2027_rain_7_cash_live");
    assert_eq!(token.stage, pb::Stage::Live as i32);
    assert_eq!(token.status, pb::TokenStatus::Pending as i32);
    // A payload changed by one bit leads to another root, which the signature refuses.
    let mut tampered = signed.payload.clone();
    tampered[0] ^= 1;
    let bent_root = sha(&[&[0u8], &batch.tree_id, &batch.salt, &tampered]);
    let mut bent = message[..message.len() - bent_root.len()].to_vec();
    bent.extend_from_slice(&bent_root);
    assert!(
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
            .verify(&bent, &signed.signature)
            .is_err()
    );
    t.stop().await;
}

/// Runs the independent verifier (docs/verify/verify_token.py, Python) on `tokens` with
/// the keys `GET /v1/keys` lists; returns its answer per token.
async fn verify_independently(t: &TestApp, tokens: &[String]) -> Vec<String> {
    let (_, keys) = t.get("/v1/keys", None).await;
    let path = std::env::temp_dir().join(format!("rpw-keys-{}.json", rand::random::<u64>()));
    std::fs::write(&path, keys.to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/verify/verify_token.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&path)
        .args(tokens)
        .output()
        .expect("python3 runs (scripts/services.sh tools installs python3-cryptography)");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !text.is_empty(),
        "the verifier said nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awards_issued_together_share_one_signature_and_verify_independently() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000_000, 500).await;
    // A batch request: its tokens form one tree.
    let results = issue_all(&t, (0..5).map(|i| award(100 + i, 1, 10 + i)).collect()).await;
    let tokens: Vec<String> = results
        .iter()
        .map(|r| r["token"].as_str().unwrap().to_string())
        .collect();
    let signed: Vec<pb::SignedToken> = tokens
        .iter()
        .map(|b| pb::SignedToken::decode(B64.decode(b).unwrap().as_slice()).unwrap())
        .collect();
    for (i, s) in signed.iter().enumerate() {
        let proof = s
            .batch
            .as_ref()
            .expect("a batch-signed token carries its proof");
        assert_eq!((proof.size, proof.index), (5, i as u32));
        assert_eq!(proof.tree_id, signed[0].batch.as_ref().unwrap().tree_id);
        assert_eq!(s.signature, signed[0].signature, "one signature per batch");
        assert_ne!(proof.salt, signed[(i + 1) % 5].batch.as_ref().unwrap().salt);
    }
    let answers = verify_independently(&t, &tokens).await;
    assert_eq!(answers.len(), 5);
    for (i, answer) in answers.iter().enumerate() {
        let expected = format!("valid: user {}, {} cents, ", 100 + i, 10 + i);
        assert!(answer.starts_with(&expected), "{answer}");
    }
    // A token whose amount was raised is refused by the same verifier.
    let mut forged = signed[2].clone();
    let mut payload = pb::RedPacketToken::decode(forged.payload.as_slice()).unwrap();
    payload.amount_cents = 1_000;
    forged.payload = payload.encode_to_vec();
    let answers = verify_independently(&t, &[B64.encode(forged.encode_to_vec())]).await;
    assert_eq!(answers, vec!["refused: bad signature".to_string()]);

    // Single awards that arrive together are signed together: concurrent POST
    // /v1/awards queue while a batch is in flight and share the next one's tree.
    let mut singles: Vec<String> = Vec::new();
    let mut trees: HashSet<Vec<u8>> = HashSet::new();
    for round in 0..3 {
        let sent = join_all((0..64).map(|i| {
            let body = award(1_000 + i, 10 + round, 5);
            let t = &t;
            async move { t.post("/v1/awards", CALLER, &body).await }
        }))
        .await;
        for (status, body) in sent {
            assert_eq!(status, 201, "{body}");
            let text = body["token"].as_str().unwrap().to_string();
            let s = pb::SignedToken::decode(B64.decode(&text).unwrap().as_slice()).unwrap();
            trees.insert(match s.batch {
                Some(proof) => proof.tree_id,
                None => s.signature,
            });
            singles.push(text);
        }
        if trees.len() < singles.len() {
            break;
        }
    }
    assert!(
        trees.len() < singles.len(),
        "{} concurrent single awards, {} signatures",
        singles.len(),
        trees.len()
    );
    let answers = verify_independently(&t, &singles).await;
    assert!(
        answers.iter().all(|a| a.starts_with("valid: ")),
        "{answers:?}"
    );
    // The service's own sync accepts them back as known.
    let (status, body) = t
        .post(
            "/v1/wallet/tokens:sync",
            &t.jwt(100),
            &json!({"tokens": [tokens[0]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["known"], 1, "{body}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_round_trips_for_single_and_batch() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 10_000, 500).await;
    let request = pb::AwardRequest {
        user_id: 42,
        app_id: 1,
        activity_id: "cny2027".into(),
        scene_id: "rain".into(),
        rain_id: 3,
        award_type: "cash".into(),
        amount_cents: 66,
        ..Default::default()
    };
    let send = |path: &'static str, body: Vec<u8>| {
        t.client
            .post(format!("{}{path}", t.url))
            .bearer_auth(CALLER)
            .header("content-type", "application/x-protobuf")
            .header("accept", "application/x-protobuf")
            .body(body)
            .send()
    };
    let resp = send("/v1/awards", request.encode_to_vec()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.headers()["content-type"], "application/x-protobuf");
    let single = pb::AwardResponse::decode(resp.bytes().await.unwrap()).unwrap();
    assert_eq!(single.out_trade_no, "42_cny2027_rain_3_cash_live");
    assert!(!single.replayed);
    redpacket_wallet::token::verify(&t.app.keys.current(), &single.token).unwrap();

    let mut bad = request.clone();
    bad.amount_cents = 0;
    let mut fresh = request.clone();
    fresh.rain_id = 4;
    let batch = pb::AwardBatchRequest {
        awards: vec![request.clone(), bad, fresh],
    };
    let resp = send("/v1/awards:batch", batch.encode_to_vec())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let results = pb::AwardBatchResponse::decode(resp.bytes().await.unwrap())
        .unwrap()
        .results;
    assert_eq!(results.len(), 3);
    match &results[0].result {
        Some(pb::award_result::Result::Ok(r)) => {
            assert!(r.replayed);
            assert_eq!(r.token, single.token, "a replay is byte-identical");
        }
        other => panic!("{other:?}"),
    }
    match &results[1].result {
        Some(pb::award_result::Result::Error(e)) => assert_eq!(e.code, "invalid_request"),
        other => panic!("{other:?}"),
    }
    match &results[2].result {
        Some(pb::award_result::Result::Ok(r)) => {
            assert!(!r.replayed);
            assert_eq!(r.out_trade_no, "42_cny2027_rain_4_cash_live");
        }
        other => panic!("{other:?}"),
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_in_order_and_one_bad_item_fails_alone() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000, 100).await;
    let mut awards: Vec<Value> = (0..300).map(|u| award(u + 1, 9, 2)).collect();
    awards[5]["amount_cents"] = json!(1_000);
    awards[6]["activity_id"] = json!("nope");
    awards.push(award(1, 9, 2)); // the same award as item 0, inside the batch
    let (status, body) = t
        .post("/v1/awards:batch", CALLER, &json!({"awards": awards}))
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 301);
    for (i, r) in results.iter().enumerate().take(300) {
        match i {
            5 => assert_eq!(r["error"]["code"], "amount_over_cap"),
            6 => assert_eq!(r["error"]["code"], "not_found"),
            _ => {
                assert_eq!(
                    r["out_trade_no"],
                    format!("{}_cny2027_rain_9_cash_live", i + 1),
                    "{r}"
                );
                assert_eq!(r["replayed"], false);
            }
        }
    }
    assert_eq!(results[300]["replayed"], true);
    assert_eq!(results[300]["token"], results[0]["token"]);
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(figures.taken_cents, 298 * 2);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_counter_catches_up_within_a_second_or_so() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 10_000, 500).await;
    for u in 1..=5 {
        assert_eq!(t.post("/v1/awards", CALLER, &award(u, 1, 10)).await.0, 201);
    }
    let mut seen = json!(null);
    for _ in 0..30 {
        let (status, body) = t.get("/v1/activities/cny2027/stats", None).await;
        assert_eq!(status, 200);
        seen = body;
        if seen["issued_count"] == 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen["issued_count"], 5, "{seen}");
    assert_eq!(seen["issued_cents"], 50);
    assert_eq!(t.get("/v1/activities/nope/stats", None).await.0, 404);
    t.stop().await;
}

/// A pipeline of script calls where Redis knows one script and not the other: the calls
/// answered NOSCRIPT are sent again after loading, the others are not run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_calls_after_a_script_flush_run_exactly_once() {
    // SCRIPT FLUSH empties the whole server's script cache: a Redis of this test's own.
    let redis = PrivateRedis::start();
    let t = spawn_on(&redis).await;
    let mut conn = t.app.redis.conn();
    let known = redis::Script::new("return redis.call('INCR', KEYS[1])");
    let unknown = redis::Script::new("return redis.call('INCRBY', KEYS[1], 10)");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    redpacket_wallet::store::load_scripts(&mut conn, &[&known])
        .await
        .unwrap();
    let a = format!("test:{{0}}:once:a:{}", std::process::id());
    let b = format!("test:{{0}}:once:b:{}", std::process::id());
    let mut pipe = redis::pipe();
    pipe.add_command(redpacket_wallet::store::evalsha(&known, &[&a]))
        .add_command(redpacket_wallet::store::evalsha(&unknown, &[&b]))
        .add_command(redpacket_wallet::store::evalsha(&known, &[&a]));
    let answers: Vec<i64> =
        redpacket_wallet::store::query_scripted(&t.app.redis, &pipe, &[&known, &unknown])
            .await
            .unwrap();
    assert_eq!(answers, vec![1, 10, 2]);
    let (va, vb): (i64, i64) = redis::pipe()
        .get(&a)
        .get(&b)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((va, vb), (2, 10), "each call ran once");
    let _: () = redis::pipe()
        .del(&a)
        .del(&b)
        .query_async(&mut conn)
        .await
        .unwrap();

    // Issuing after the flush reloads its scripts on the way.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    t.open_activity("cny2027", 1_000, 100).await;
    let (status, body) = t.post("/v1/awards", CALLER, &award(5, 1, 40)).await;
    assert_eq!(status, 201, "{body}");
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(figures.taken_cents, 40);
    t.stop().await;
    drop(redis);
}

/// Each instance writes its own running totals: flushing again writes the same totals
/// (what a retry after a lost answer does), and every instance reads the sum over all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_flushes_repeat_safely_and_sum_over_instances() {
    use redpacket_wallet::issue::stats::StatsCounter;
    let t = spawn_app().await;
    let redis = &t.app.redis;
    let ids = vec!["flash".to_string()];
    let (a, b) = (StatsCounter::default(), StatsCounter::default());
    a.add("flash", 2, 30);
    b.add("flash", 1, 5);
    for _ in 0..3 {
        a.flush(redis, &ids).await.unwrap();
        b.flush(redis, &ids).await.unwrap();
    }
    assert_eq!(a.totals("flash"), (3, 35));
    assert_eq!(b.totals("flash"), (3, 35));
    a.add("flash", 1, 7);
    a.flush(redis, &ids).await.unwrap();
    a.flush(redis, &ids).await.unwrap();
    assert_eq!(a.totals("flash"), (4, 42));
    t.stop().await;
}

/// Calls and microseconds per command since `before` on a Redis of the test's own.
async fn commands_since(
    conn: &mut redis::aio::MultiplexedConnection,
    before: &std::collections::HashMap<String, i64>,
) -> std::collections::HashMap<String, i64> {
    let now = command_calls(conn).await;
    now.iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

async fn command_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> std::collections::HashMap<String, i64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// On one node a batch of plain cash awards takes and stores in one script call per
/// store chunk: one existence check per award (the store's HSETNX), no separate check
/// before the take (a per-award HGET), no take script of its own. Replays of the batch
/// take nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awards_on_one_node_take_and_store_in_one_step() {
    let redis = PrivateRedis::start();
    let mut t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        worker: false,
        env: vec![
            // No background refill or stats flush: the commands counted below are the
            // awards' own (a refill reads each sub-stock's `avail`).
            ("RPW_ISSUE__CACHE_REFRESH_MS".into(), "600000".into()),
            ("RPW_ISSUE__STATS_FLUSH_MS".into(), "600000".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_000_000, 500).await;
    // The first award funds the sub-stocks (grants); what follows is the steady state.
    assert_eq!(t.post("/v1/awards", CALLER, &award(1, 1, 5)).await.0, 201);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let before = command_calls(&mut conn).await;
    let awards: Vec<Value> = (0..100).map(|u| award(100 + u, 1, 7)).collect();
    let issued = issue_all(&t, awards.clone()).await;
    let calls = commands_since(&mut conn, &before).await;
    assert!(issued.iter().all(|r| r["replayed"] == false));
    assert_eq!(calls.get("hsetnx"), Some(&100), "{calls:?}");
    assert_eq!(
        calls.get("hset"),
        Some(&100),
        "one status per award: {calls:?}"
    );
    // One store call holds the 100 (STORE_CHUNK is 128): its sub-stock's `avail`.
    assert!(calls.get("hget").copied().unwrap_or(0) <= 2, "{calls:?}");
    assert!(calls.get("evalsha").copied().unwrap_or(0) <= 2, "{calls:?}");
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(figures.taken_cents, 5 + 700);

    // The same batch again: all replays, byte for byte, and nothing taken. (The money
    // is taken before the tokens are written and given back for those found held: two
    // HINCRBYs on the sub-stock, none on the counters.)
    let before = command_calls(&mut conn).await;
    let again = issue_all(&t, awards).await;
    let calls = commands_since(&mut conn, &before).await;
    for (first, second) in issued.iter().zip(&again) {
        assert_eq!(second["replayed"], true);
        assert_eq!(second["token"], first["token"]);
    }
    assert_eq!(calls.get("hincrby"), Some(&2), "{calls:?}");
    assert_eq!(calls.get("hset"), None, "no status written: {calls:?}");
    assert_eq!(calls.get("xadd"), None, "{calls:?}");
    let figures = t.budget_figures("cny2027").await;
    assert_eq!(figures.taken_cents, 5 + 700);
    let issued_totals = t.app.tokens.issued_totals("cny2027").await.unwrap();
    assert_eq!((issued_totals.count, issued_totals.cents), (101, 705));

    // `issue.one_step = false`: every award goes the steps (a check per award, a take
    // script, then the store).
    t.restart(&[("RPW_ISSUE__ONE_STEP", "false")]).await;
    let before = command_calls(&mut conn).await;
    let stepwise: Vec<Value> = (0..100).map(|u| award(300 + u, 1, 7)).collect();
    issue_all(&t, stepwise).await;
    let calls = commands_since(&mut conn, &before).await;
    // The check reads each user's token hash (one `HMGET` per user).
    let checks = ["hget", "hmget"].map(|c| calls.get(c).copied().unwrap_or(0));
    assert!(checks.iter().sum::<i64>() >= 100, "{calls:?}");
    assert_eq!(calls.get("hsetnx"), Some(&100), "{calls:?}");
    let issued_totals = t.app.tokens.issued_totals("cny2027").await.unwrap();
    assert_eq!((issued_totals.count, issued_totals.cents), (201, 1_405));
    t.stop().await;
}

/// What each sub-stock of the live generation gave out so far: `funded - avail` (a grant
/// raises both; a take lowers `avail`, a give-back raises it).
async fn spent_by_sub_stock(t: &TestApp, activity: &str) -> Vec<i64> {
    let gen = t.app.budget.live_gen(activity).expect("a live generation");
    let mut conn = t.app.redis.conn();
    let mut out = Vec::new();
    for i in 0..gen.sub_stocks {
        let (funded, avail): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(gen.stock_key(&t.app.redis, activity, i))
            .arg("funded")
            .arg("avail")
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push(funded.unwrap_or(0) - avail.unwrap_or(0));
    }
    out
}

/// With `issue.sub_stocks_in_partitions`, sub-stock i of a new generation lives in
/// partition `i mod partitions` (their number rounded up to a multiple of the
/// partitions), and plain cash awards take and store in one call per partition, on a
/// cluster too: every cent of the awards to one partition's users comes out of that
/// partition's sub-stocks (a take of the steps picks any sub-stock: 10 takes of 64
/// awards would all land there once in a million), and the budget adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awards_take_from_the_sub_stocks_of_their_partition() {
    use redpacket_wallet::store::StockPlacement;
    let t = spawn_app_with(Options {
        env: vec![
            ("RPW_ISSUE__SUB_STOCKS".into(), "6".into()),
            ("RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS".into(), "true".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_000_000, 500).await;
    let gen = t.app.budget.live_gen("cny2027").unwrap();
    assert_eq!(gen.placement, StockPlacement::InPartitions(4));
    assert_eq!(
        gen.sub_stocks, 8,
        "6 rounded up to a multiple of the 4 partitions"
    );
    let placed: i64 = t
        .sql_i64("SELECT COUNT(*) FROM budget_generations WHERE activity_id = 'cny2027' AND state = 'live' AND stock_partitions = 4")
        .await;
    assert_eq!(placed, 1, "the placement is recorded with the generation");
    // The first award asks for a grant; the refill that runs with the cache refresh
    // funds the other sub-stocks.
    assert_eq!(t.post("/v1/awards", CALLER, &award(1, 1, 5)).await.0, 201);
    let mut funded = false;
    for _ in 0..100 {
        let mut conn = t.app.redis.conn();
        let mut all = true;
        for i in 0..gen.sub_stocks {
            let f: Option<i64> = redis::cmd("HGET")
                .arg(gen.stock_key(&t.app.redis, "cny2027", i))
                .arg("funded")
                .query_async(&mut conn)
                .await
                .unwrap();
            all &= f.unwrap_or(0) > 0;
        }
        if all {
            funded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(funded, "every sub-stock was granted money");

    let before = spent_by_sub_stock(&t, "cny2027").await;
    let users = users_in(2, 100, 640);
    let issued = issue_all(&t, users.iter().map(|u| award(*u, 1, 7)).collect()).await;
    assert!(issued.iter().all(|r| r["replayed"] == false));
    let after = spent_by_sub_stock(&t, "cny2027").await;
    let spent: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(spent.iter().sum::<i64>(), 640 * 7, "{spent:?}");
    if t.app.redis.is_cluster() {
        for (i, cents) in spent.iter().enumerate() {
            if gen.placement.partition_of(i as u32) != Some(2) {
                assert_eq!(
                    *cents, 0,
                    "sub-stock {i} is in another partition: {spent:?}"
                );
            }
        }
    }
    let totals = t.app.tokens.issued_totals("cny2027").await.unwrap();
    assert_eq!((totals.count, totals.cents), (641, 5 + 640 * 7));
    assert_eq!(t.budget_figures("cny2027").await.taken_cents, 5 + 640 * 7);
    t.stop().await;
}

/// Minted tokens as [`redpacket_wallet::tokens::Tokens::take_and_store`] takes them.
fn to_store(
    minted: &[redpacket_wallet::token::SignedAward],
) -> impl Iterator<Item = (redpacket_wallet::domain::UserId, &pb::RedPacketToken, &[u8])> {
    minted.iter().map(|a| {
        (
            redpacket_wallet::domain::UserId::parse(a.token.user_id).unwrap(),
            &a.token,
            a.bytes.as_slice(),
        )
    })
}

/// A plain cash award of `cents` for `user` out of budget generation `gen`, to mint.
fn cash_draft(
    user: i64,
    activity: &str,
    out_trade_no: String,
    cents: i64,
    gen: i64,
) -> pb::RedPacketToken {
    pb::RedPacketToken {
        user_id: user,
        activity_id: activity.into(),
        scene_id: "rain".into(),
        amount_cents: cents,
        out_trade_no,
        award_type: "cash".into(),
        issued_at_ms: redpacket_wallet::store::now_ms(),
        budget_gen: gen,
        ..Default::default()
    }
}

/// A test app on a single Redis node; `None` (stopped) on a cluster, for the tests whose
/// one sub-stock is taken from by store calls of every partition.
async fn on_one_node() -> Option<TestApp> {
    let t = spawn_app().await;
    if t.app.redis.is_cluster() {
        t.stop().await;
        return None;
    }
    Some(t)
}

/// Makes `stock` a spendable sub-stock of the Redis holding it (that node's identity,
/// read in a script in the stock's slot) holding `avail`.
async fn fund(conn: &mut redpacket_wallet::store::RedisConn, stock: &str, avail: i64) {
    let script = format!(
        "{}\nredis.call('HSET', KEYS[1], 'rid', run_id(), 'avail', ARGV[1])",
        redpacket_wallet::store::IDENTITY_LUA
    );
    let _: () = redis::cmd("EVAL")
        .arg(script)
        .arg(1)
        .arg(stock)
        .arg(avail)
        .query_async(conn)
        .await
        .unwrap();
}

/// The first `n` users of `partition` (of the test apps' 4), from `from` on.
fn users_in(partition: i64, from: i64, n: usize) -> Vec<i64> {
    (from..).filter(|u| u % 4 == partition).take(n).collect()
}

/// What the token hash holds now under a minted token's out_trade_no.
async fn held_now(t: &TestApp, a: &redpacket_wallet::token::SignedAward) -> Option<Vec<u8>> {
    let user = redpacket_wallet::domain::UserId::parse(a.token.user_id).unwrap();
    let held = t
        .app
        .tokens
        .held(&[(user, a.token.out_trade_no.as_str())])
        .await;
    held.unwrap().into_iter().next().flatten()
}

/// What a sub-stock holds now.
async fn avail_of(conn: &mut redpacket_wallet::store::RedisConn, stock: &str) -> i64 {
    redis::cmd("HGET")
        .arg(stock)
        .arg("avail")
        .query_async(conn)
        .await
        .unwrap()
}

/// A store that takes its tokens' money stores a token only when its sub-stock is
/// spendable and covers it, and takes only for what it stored: a token short of money
/// or held already leaves no trace (no status, no stream line, no count, no take). The
/// sub-stock is placed in the users' partition, so this runs on a cluster too; there a
/// sub-stock in another slot is refused before anything is sent (the awards go the
/// steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_takes_stores_only_what_its_sub_stock_covers() {
    use redpacket_wallet::store::StockPlacement;
    use redpacket_wallet::tokens::TakenAndStored;
    let t = spawn_app().await;
    let redis = &t.app.redis;
    // Partition 1 of the test apps' 4, and sub-stock 1 placed there.
    let users = users_in(1, 1, 7);
    let stock = redis.sub_stock_key("direct", 3, 1, StockPlacement::InPartitions(4));
    let placed = |_: &str, _: i64, partition: u32| {
        assert_eq!(partition, 1);
        Some((1, stock.clone()))
    };
    let draft = |user: i64, rain: i64| pb::RedPacketToken {
        app_id: 1,
        rain_id: rain,
        ..cash_draft(
            user,
            "direct",
            format!("{user}_direct_rain_{rain}_cash_live"),
            10,
            3,
        )
    };
    let minted = redpacket_wallet::token::mint_all(
        &t.app.keys.current(),
        users[..4].iter().map(|u| draft(*u, 1)).collect(),
    )
    .unwrap();
    let items = || to_store(&minted);
    let mut conn = redis.conn();
    fund(&mut conn, &stock, 25).await;
    if redis.is_cluster() {
        // A sub-stock in a slot of its own: left out, nothing written or taken.
        let spread = redis.sub_stock_key("direct", 3, 1, StockPlacement::Spread);
        fund(&mut conn, &spread, 25).await;
        let (outcomes, after) = t
            .app
            .tokens
            .take_and_store(items(), |_, _, _| Some((1, spread.clone())))
            .await
            .unwrap();
        assert_eq!(outcomes, vec![TakenAndStored::Short; 4]);
        assert!(after.is_empty());
        assert_eq!(avail_of(&mut conn, &spread).await, 25);
        for a in &minted {
            assert_eq!(held_now(&t, a).await, None);
        }
    }

    let (outcomes, after) = t
        .app
        .tokens
        .take_and_store(items(), |activity, gen, partition| {
            assert_eq!((activity, gen), ("direct", 3));
            placed(activity, gen, partition)
        })
        .await
        .unwrap();
    let stored: Vec<usize> = (0..4)
        .filter(|&i| outcomes[i] == TakenAndStored::Stored)
        .collect();
    assert_eq!(stored.len(), 2, "25 cents cover two of 10: {outcomes:?}");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == TakenAndStored::Short)
            .count(),
        2
    );
    assert_eq!(after.len(), 1);
    assert_eq!((after[0].state, after[0].avail_cents), (0, 5));
    assert_eq!(avail_of(&mut conn, &stock).await, 5);
    for (i, a) in minted.iter().enumerate() {
        let user = redpacket_wallet::domain::UserId::parse(a.token.user_id).unwrap();
        let held = held_now(&t, a).await;
        let status = t.app.tokens.pending_of(user).await.unwrap();
        if stored.contains(&i) {
            assert_eq!(held.as_deref(), Some(a.bytes.as_slice()));
            assert_eq!(status.len(), 1);
        } else {
            assert_eq!(held, None, "a short token leaves no trace");
            assert!(status.is_empty());
        }
    }
    let totals = t.app.tokens.issued_totals("direct").await.unwrap();
    assert_eq!((totals.count, totals.cents), (2, 20));
    let mut lines = 0;
    for p in 0..redis.partitions() {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(redis.stream_key(p))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        for e in entries.ids {
            let body: String = e.get("b").unwrap();
            lines += body.lines().count();
        }
    }
    assert_eq!(lines, 2, "one stream line per stored token");

    // Again: the stored two are held (nothing taken), the others still short.
    let (outcomes, after) = t.app.tokens.take_and_store(items(), placed).await.unwrap();
    for (i, (o, a)) in outcomes.iter().zip(&minted).enumerate() {
        if stored.contains(&i) {
            assert_eq!(*o, TakenAndStored::Held(a.bytes.clone()));
        } else {
            assert_eq!(*o, TakenAndStored::Short);
        }
    }
    assert_eq!((after[0].state, after[0].avail_cents), (0, 5));
    let totals = t.app.tokens.issued_totals("direct").await.unwrap();
    assert_eq!((totals.count, totals.cents), (2, 20));

    // A token worth nothing fails the whole call before anything is written.
    let mut zero = draft(users[4], 3);
    zero.amount_cents = 0;
    let worthless = redpacket_wallet::token::mint_all(&t.app.keys.current(), vec![zero]).unwrap();
    assert!(t
        .app
        .tokens
        .take_and_store(to_store(&worthless), placed)
        .await
        .is_err());
    assert_eq!(avail_of(&mut conn, &stock).await, 5);
    let user = redpacket_wallet::domain::UserId::parse(users[4]).unwrap();
    assert!(t.app.tokens.pending_of(user).await.unwrap().is_empty());

    // A drained sub-stock, then one of another Redis identity: nothing stored or taken.
    let fresh =
        redpacket_wallet::token::mint_all(&t.app.keys.current(), vec![draft(users[5], 2)]).unwrap();
    let one = || to_store(&fresh);
    for (field, value, code) in [("closed", "1", 1), ("rid", "elsewhere:else", 2)] {
        if field == "rid" {
            let _: () = redis::cmd("HDEL")
                .arg(&stock)
                .arg("closed")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let _: () = redis::cmd("HSET")
            .arg(&stock)
            .arg(field)
            .arg(value)
            .arg("avail")
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (outcomes, _) = t.app.tokens.take_and_store(one(), placed).await.unwrap();
        assert_eq!(outcomes, vec![TakenAndStored::Unspendable(code)]);
        assert_eq!(avail_of(&mut conn, &stock).await, 100);
        let user = redpacket_wallet::domain::UserId::parse(users[5]).unwrap();
        assert!(t.app.tokens.pending_of(user).await.unwrap().is_empty());
    }
    t.stop().await;
}

/// A call whose owners do not all have a sub-stock it can reach (here a second activity,
/// `None`; on a cluster, an owner with no sub-stock in the call's partition) stores and
/// takes for the others only: the tokens of the owner left out are answered short and
/// leave no trace, and each token's answer stays its own however the call was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_leaves_out_the_tokens_of_an_owner_without_a_reachable_sub_stock() {
    use redpacket_wallet::store::StockPlacement;
    use redpacket_wallet::tokens::TakenAndStored;
    let t = spawn_app().await;
    let redis = &t.app.redis;
    let stock = redis.sub_stock_key("reach", 1, 3, StockPlacement::InPartitions(4));
    let mut conn = redis.conn();
    fund(&mut conn, &stock, 1_000).await;
    // Interleaved: even places for "reach" (funded), odd for "unreached".
    let users = users_in(3, 1, 6);
    let drafts: Vec<pb::RedPacketToken> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let activity = if i % 2 == 0 { "reach" } else { "unreached" };
            cash_draft(
                *u,
                activity,
                format!("{u}_{activity}_rain_1_cash_live"),
                10 + i as i64,
                1,
            )
        })
        .collect();
    let minted = redpacket_wallet::token::mint_all(&t.app.keys.current(), drafts).unwrap();
    let (outcomes, after) = t
        .app
        .tokens
        .take_and_store(to_store(&minted), |activity, _, partition| {
            assert_eq!(partition, 3);
            (activity == "reach").then(|| (3, stock.clone()))
        })
        .await
        .unwrap();
    for (i, (outcome, a)) in outcomes.iter().zip(&minted).enumerate() {
        let user = redpacket_wallet::domain::UserId::parse(a.token.user_id).unwrap();
        let pending = t.app.tokens.pending_of(user).await.unwrap();
        if i % 2 == 0 {
            assert_eq!(*outcome, TakenAndStored::Stored, "token {i}");
            assert_eq!(held_now(&t, a).await.as_deref(), Some(a.bytes.as_slice()));
            assert_eq!(pending.len(), 1);
        } else {
            assert_eq!(*outcome, TakenAndStored::Short, "token {i}");
            assert_eq!(held_now(&t, a).await, None);
            assert!(pending.is_empty());
        }
    }
    // 10 + 12 + 14 taken, for the three stored.
    assert_eq!(after.len(), 1);
    assert_eq!(
        (after[0].owner.as_str(), after[0].avail_cents),
        ("reach", 964)
    );
    assert_eq!(avail_of(&mut conn, &stock).await, 964);
    let totals = t.app.tokens.issued_totals("reach").await.unwrap();
    assert_eq!((totals.count, totals.cents), (3, 36));
    let totals = t.app.tokens.issued_totals("unreached").await.unwrap();
    assert_eq!((totals.count, totals.cents), (0, 0));

    // Nobody reachable: nothing sent at all.
    let (outcomes, after) = t
        .app
        .tokens
        .take_and_store(to_store(&minted[1..2]), |_, _, _| None)
        .await
        .unwrap();
    assert_eq!((outcomes, after), (vec![TakenAndStored::Short], Vec::new()));
    t.stop().await;
}

/// The one-step store against a model, over random rounds: random holdings, amounts,
/// calls of up to 300 tokens (several store calls), tokens stored before mixed in. The
/// sub-stock never pays for more than it held, loses exactly what the tokens stored now
/// are worth, and a token is stored now, held from before, or left without a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_step_store_never_pays_more_than_its_sub_stock_held() {
    use rand::{Rng, SeedableRng};
    use redpacket_wallet::tokens::TakenAndStored;
    let Some(t) = on_one_node().await else {
        return;
    };
    let redis = &t.app.redis;
    let mut conn = redis.conn();
    let stock = redis.sub_stock_key("model", 1, 0, Default::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut earlier: Vec<redpacket_wallet::token::SignedAward> = Vec::new();
    let (mut stored_count, mut stored_cents) = (0i64, 0i64);
    for round in 0..40 {
        let avail: i64 = rng.random_range(0..2_000);
        fund(&mut conn, &stock, avail).await;
        let fresh_count = rng.random_range(1..300);
        let drafts: Vec<pb::RedPacketToken> = (0..fresh_count)
            .map(|i| {
                let user = rng.random_range(1..50);
                let cents = rng.random_range(1..40);
                cash_draft(user, "model", format!("r{round}_{i}"), cents, 1)
            })
            .collect();
        let mut batch = redpacket_wallet::token::mint_all(&t.app.keys.current(), drafts).unwrap();
        // Some tokens of earlier rounds again (held or still absent).
        for _ in 0..rng.random_range(0..10).min(earlier.len()) {
            batch.push(earlier[rng.random_range(0..earlier.len())].clone());
        }
        let mut seen = HashSet::new();
        batch.retain(|a| seen.insert(a.token.out_trade_no.clone()));
        let mut held_before = Vec::new();
        for a in &batch {
            let held = held_now(&t, a).await;
            held_before.push(held);
        }
        let (outcomes, _) = t
            .app
            .tokens
            .take_and_store(to_store(&batch), |_, _, _| Some((0, stock.clone())))
            .await
            .unwrap();
        let mut paid = 0;
        for ((a, before), outcome) in batch.iter().zip(&held_before).zip(&outcomes) {
            let now = held_now(&t, a).await;
            match outcome {
                TakenAndStored::Stored => {
                    assert_eq!(*before, None);
                    assert_eq!(now.as_deref(), Some(a.bytes.as_slice()));
                    paid += a.token.amount_cents;
                    stored_count += 1;
                    stored_cents += a.token.amount_cents;
                    earlier.push(a.clone());
                }
                TakenAndStored::Held(bytes) => {
                    assert_eq!(before.as_ref(), Some(bytes));
                    assert_eq!(now.as_ref(), Some(bytes));
                }
                TakenAndStored::Short => {
                    assert_eq!((before, &now), (&None, &None), "no trace");
                    earlier.push(a.clone());
                }
                TakenAndStored::Unspendable(code) => panic!("spendable stock refused: {code}"),
            }
        }
        assert!(paid <= avail, "round {round}: paid {paid} of {avail}");
        assert_eq!(
            avail_of(&mut conn, &stock).await,
            avail - paid,
            "round {round}"
        );
        let totals = t.app.tokens.issued_totals("model").await.unwrap();
        assert_eq!((totals.count, totals.cents), (stored_count, stored_cents));
    }
    assert!(
        stored_count > 100 && earlier.len() > stored_count as usize,
        "the rounds reached both sides"
    );
    t.stop().await;
}

/// A one-step store that fails half-way (here a user's status key of the wrong type
/// makes its `HSET` fail after the token was written, and Redis keeps a failed script's
/// writes) has taken the token's money before: it can leak budget, never leave a token
/// without its money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_step_store_failing_half_way_has_taken_its_money() {
    let Some(t) = on_one_node().await else {
        return;
    };
    let redis = &t.app.redis;
    let mut conn = redis.conn();
    let stock = redis.sub_stock_key("halfway", 1, 0, Default::default());
    fund(&mut conn, &stock, 100).await;
    let draft = cash_draft(5, "halfway", "5_halfway_rain_1_cash_live".into(), 30, 1);
    let minted = redpacket_wallet::token::mint_all(&t.app.keys.current(), vec![draft]).unwrap();
    let user = redpacket_wallet::domain::UserId::parse(5).unwrap();
    let _: () = redis::cmd("SET")
        .arg(redis.status_key(user))
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(t
        .app
        .tokens
        .take_and_store(to_store(&minted), |_, _, _| Some((0, stock.clone())))
        .await
        .is_err());
    assert_eq!(
        held_now(&t, &minted[0]).await.as_deref(),
        Some(minted[0].bytes.as_slice()),
        "the token was written before the failure"
    );
    assert_eq!(
        avail_of(&mut conn, &stock).await,
        70,
        "its money was taken before it"
    );
    t.stop().await;
}
