//! Coupon awards (issue 17): templates with stock, coupons as tokens, the user's list,
//! redemption, expiry and fallbacks, against real Redis and MariaDB.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const MERCHANT: &str = CALLER;

async fn template(t: &TestApp, id: &str, stock: i64, validity: Value) {
    let mut body = json!({"id": id, "name": format!("{id} coupon"), "face_value_cents": 500,
                          "min_spend_cents": 2_000, "stock": stock});
    for (k, v) in validity.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, answer) = t.post("/v1/admin/coupon-templates", ADMIN, &body).await;
    assert_eq!(status, 201, "{answer}");
}

async fn coupon_scene(t: &TestApp, activity: &str, scene: &str, coupon: Value) {
    let (status, body) = t
        .post(
            &format!("/v1/admin/activities/{activity}/scenes"),
            ADMIN,
            &json!({"id": scene, "name": "Coupons", "award_type": "coupon", "coupon": coupon}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

fn coupon_award(user: i64, scene: &str, rain: i64) -> Value {
    json!({"user_id": user, "app_id": 1, "activity_id": "cny2027", "scene_id": scene,
           "rain_id": rain, "award_type": "coupon"})
}

async fn coupons(t: &TestApp, user: i64) -> Value {
    let (status, body) = t.get("/v1/wallet/coupons", Some(&t.jwt(user))).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn figures(t: &TestApp, id: &str) -> Value {
    let (status, body) = t.get("/v1/admin/coupon-templates", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    body["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no template {id} in {body}"))
}

async fn redeem(t: &TestApp, user: i64, otn: &str, request: &str, order: i64) -> (u16, Value) {
    t.post(
        "/v1/coupons:redeem",
        MERCHANT,
        &json!({"user_id": user, "out_trade_no": otn, "request_id": request, "order_cents": order}),
    )
    .await
}

fn decode(token: &str) -> redpacket_wallet::pb::RedPacketToken {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .unwrap();
    redpacket_wallet::token::decode_trusted(&bytes).unwrap()
}

/// A coupon is a signed token with no cash: listed at once, booked by the worker into
/// its own row (never the balance), used once by one merchant request, never by
/// another user, and counted in its template's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_is_listed_at_once_booked_without_cash_and_used_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-5off", 5, json!({"valid_days": 7})).await;
    coupon_scene(&t, "cny2027", "coupons", json!({"template_id": "tpl-5off"})).await;

    let (status, first) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "coupons", 1))
        .await;
    assert_eq!(status, 201, "{first}");
    let token = decode(first["token"].as_str().unwrap());
    assert_eq!(token.amount_cents, 0);
    let terms = token.coupon.clone().expect("coupon terms in the token");
    assert_eq!(terms.template_id, "tpl-5off");
    assert_eq!(terms.face_value_cents, 500);
    assert_eq!(terms.valid_until_ms - terms.valid_from_ms, 7 * 86_400_000);
    let (status, again) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "coupons", 1))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["token"], first["token"]);
    let otn = first["out_trade_no"].as_str().unwrap().to_string();

    let list = coupons(&t, 1).await;
    assert_eq!(list["active"], 1, "{list}");
    assert_eq!(list["coupons"][0]["out_trade_no"], otn.as_str());
    assert_eq!(list["coupons"][0]["booked"], false);
    let wallet = t.wallet(1).await;
    assert_eq!(wallet["balance_cents"], 0, "a coupon is no cash: {wallet}");
    assert_eq!(wallet["pending_count"], 0, "{wallet}");

    t.drain().await;
    let list = coupons(&t, 1).await;
    assert_eq!(list["coupons"][0]["booked"], true, "{list}");
    assert_eq!(list["coupons"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(t.wallet(1).await["balance_cents"], 0);
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'coupon'")
            .await,
        1
    );
    let (status, flows) = t.get("/v1/wallet/flows", Some(&t.jwt(1))).await;
    assert_eq!(status, 200);
    assert_eq!(
        flows["items"],
        json!([]),
        "a coupon is no money flow: {flows}"
    );

    let (status, body) = redeem(&t, 1, &otn, "order-1", 1_999).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("below_min_spend"))
    );
    let (status, body) = redeem(&t, 2, &otn, "order-1", 5_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, used) = redeem(&t, 1, &otn, "order-1", 5_000).await;
    assert_eq!(status, 200, "{used}");
    assert_eq!(
        (
            used["face_value_cents"].as_i64(),
            used["replayed"].as_bool()
        ),
        (Some(500), Some(false))
    );
    let (status, replay) = redeem(&t, 1, &otn, "order-1", 5_000).await;
    assert_eq!(
        (status, replay["replayed"].as_bool()),
        (200, Some(true)),
        "{replay}"
    );
    let (status, body) = redeem(&t, 1, &otn, "order-2", 5_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("coupon_used")),
        "{body}"
    );
    let (status, body) = redeem(&t, 1, &otn, "order-1", 6_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{body}"
    );

    let list = coupons(&t, 1).await;
    assert_eq!(
        (list["used"].as_i64(), list["active"].as_i64()),
        (Some(1), Some(0)),
        "{list}"
    );
    let f = figures(&t, "tpl-5off").await;
    assert_eq!(
        (
            f["issued"].as_i64(),
            f["remaining"].as_i64(),
            f["booked"].as_i64(),
            f["used"].as_i64()
        ),
        (Some(1), Some(4), Some(1), Some(1)),
        "{f}"
    );
    assert_eq!(f["conserved"], true, "{f}");
    t.stop().await;
}

/// Stock 20 against 100 concurrent awards: exactly 20 coupons, issued + remaining =
/// stock; a redemption of a coupon not booked yet books it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_never_over_issued_under_concurrency() {
    let t = Arc::new(spawn_app().await);
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-20", 20, json!({"valid_days": 1})).await;
    coupon_scene(&t, "cny2027", "coupons", json!({"template_id": "tpl-20"})).await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                t.post("/v1/awards", CALLER, &coupon_award(100 + i, "coupons", 1))
                    .await
            })
        })
        .collect();
    let mut won = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        match status {
            201 => won.push((
                100 + i as i64,
                body["out_trade_no"].as_str().unwrap().to_string(),
            )),
            409 => assert_eq!(body["error"]["code"], "budget_exhausted", "{body}"),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(won.len(), 20);
    let f = figures(&t, "tpl-20").await;
    assert_eq!(
        (f["issued"].as_i64(), f["remaining"].as_i64()),
        (Some(20), Some(0)),
        "{f}"
    );
    assert_eq!(f["conserved"], true, "{f}");

    // Not booked yet: the redemption books it first.
    let (user, otn) = &won[0];
    let (status, body) = redeem(&t, *user, otn, "r-1", 2_000).await;
    assert_eq!(status, 200, "{body}");
    t.drain().await;
    let f = figures(&t, "tpl-20").await;
    assert_eq!(
        (
            f["booked"].as_i64(),
            f["used"].as_i64(),
            f["active"].as_i64()
        ),
        (Some(20), Some(1), Some(19)),
        "{f}"
    );
    assert_eq!(f["conserved"], true, "{f}");
    Arc::try_unwrap(t).ok().unwrap().stop().await;
}

/// The operator figures stay conserved while the worker books: every booked coupon is
/// counted in exactly one state, read from the same snapshot as the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_figures_are_conserved_while_coupons_are_booked() {
    use redpacket_wallet::settle::worker::{Outcome, Worker, WorkerOptions};
    let t = Arc::new(spawn_app().await);
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-busy", 200, json!({"valid_days": 1})).await;
    coupon_scene(&t, "cny2027", "coupons", json!({"template_id": "tpl-busy"})).await;
    let awards: Vec<Value> = (0..120)
        .map(|i| coupon_award(300 + i, "coupons", 1))
        .collect();
    for chunk in awards.chunks(40) {
        let (status, body) = t
            .post("/v1/awards:batch", CALLER, &json!({"awards": chunk}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["error"].is_null()),
            "{body}"
        );
    }
    // One coupon per batch, so bookings land between any two reads of the figures.
    let booker = {
        let t = t.clone();
        tokio::spawn(async move {
            let mut worker = Worker::new(
                t.app.settler.clone(),
                WorkerOptions {
                    consumer: "one-by-one".into(),
                    batch_size: 1,
                    claim_idle: Duration::from_secs(60),
                    stop_after_commit: false,
                },
            );
            for p in 0..t.app.redis.partitions() {
                while let Outcome::Booked { .. } = worker.try_execute_batch(p).await.expect("batch")
                {
                }
            }
        })
    };
    let mut reads = 0;
    while !booker.is_finished() {
        let f = figures(&t, "tpl-busy").await;
        assert_eq!(f["conserved"], true, "read {reads} while booking: {f}");
        reads += 1;
    }
    booker.await.unwrap();
    let f = figures(&t, "tpl-busy").await;
    assert_eq!(
        (f["booked"].as_i64(), f["active"].as_i64()),
        (Some(120), Some(120)),
        "{f}"
    );
    assert_eq!(f["conserved"], true, "{f}");
    assert!(reads > 0, "the figures were never read while booking");
    Arc::try_unwrap(t).ok().unwrap().stop().await;
}

/// A merchant's request id names one redemption whatever shard the coupon's user lives
/// on: reused for another user's coupon (on the other shard) it is a conflict, and that
/// coupon stays active; a refused request frees its id for the corrected one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_names_one_redemption_across_shards() {
    let t = spawn_two_shards().await;
    assert_eq!(t.app.db.shards().len(), 2);
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-shards", 10, json!({"valid_days": 1})).await;
    coupon_scene(
        &t,
        "cny2027",
        "coupons",
        json!({"template_id": "tpl-shards"}),
    )
    .await;
    let mut otns = Vec::new();
    for user in [1, 2] {
        let (status, body) = t
            .post("/v1/awards", CALLER, &coupon_award(user, "coupons", 1))
            .await;
        assert_eq!(status, 201, "{body}");
        otns.push(body["out_trade_no"].as_str().unwrap().to_string());
    }
    t.drain().await;
    let shard = |u: i64| {
        t.app
            .db
            .shard_index(redpacket_wallet::domain::UserId::parse(u).unwrap())
    };
    assert_ne!(shard(1), shard(2), "users 1 and 2 live on different shards");

    // Refused (under the minimum spend): the id is free for the corrected request.
    let (status, body) = redeem(&t, 1, &otns[0], "pos-7", 100).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = redeem(&t, 1, &otns[0], "pos-7", 5_000).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = redeem(&t, 2, &otns[1], "pos-7", 5_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{body}"
    );
    let list = coupons(&t, 2).await;
    assert_eq!(list["coupons"][0]["state"], "active", "{list}");
    // The first request still replays.
    let (status, body) = redeem(&t, 1, &otns[0], "pos-7", 5_000).await;
    assert_eq!(
        (status, body["replayed"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    t.stop().await;
}

/// A coupon Redis lost, retried into a greeting (its stock is frozen in doubt), then
/// synced back by the client: the real token wins over the recorded greeting, is
/// restored and booked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_coupon_wins_over_a_greeting_recorded_after_redis_lost_it() {
    let redis = PrivateRedis::start();
    let mut t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-2", 2, json!({"valid_days": 1})).await;
    coupon_scene(
        &t,
        "cny2027",
        "greet",
        json!({"template_id": "tpl-2",
        "fallback": {"under_share": 0.01, "greeting": "新年快乐"}}),
    )
    .await;
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(5, "greet", 1))
        .await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    redis.flushall().await;
    t.restart(&[]).await;
    let (status, again) = t
        .post("/v1/awards", CALLER, &coupon_award(5, "greet", 1))
        .await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(
        again["status"], "greeting",
        "the stock is in doubt: {again}"
    );

    let held = std::collections::HashMap::from([(5, vec![token])]);
    assert_eq!(
        sync_all(&t, &held).await,
        1,
        "the client's coupon is restored"
    );
    t.drain().await;
    assert_eq!(coupons(&t, 5).await["active"], 1);
    let f = figures(&t, "tpl-2").await;
    assert_eq!(f["booked"], 1, "{f}");
    t.stop().await;
}

/// Under the configured share the scene hands out its fallback template, and says so;
/// a greeting fallback hands out no token and takes no stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_template_falls_back_to_another_template_or_a_greeting() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-main", 4, json!({"valid_days": 3})).await;
    template(&t, "tpl-spare", 100, json!({"valid_days": 3})).await;
    template(&t, "tpl-one", 1, json!({"valid_days": 3})).await;
    coupon_scene(
        &t,
        "cny2027",
        "main",
        json!({"template_id": "tpl-main",
        "fallback": {"under_share": 0.5, "template_id": "tpl-spare"}}),
    )
    .await;
    coupon_scene(
        &t,
        "cny2027",
        "greet",
        json!({"template_id": "tpl-one",
        "fallback": {"under_share": 0.1, "greeting": "新年快乐"}}),
    )
    .await;

    for user in 1..=3 {
        let (status, body) = t
            .post("/v1/awards", CALLER, &coupon_award(user, "main", 1))
            .await;
        assert_eq!(status, 201, "{body}");
        assert!(body["fallback"].is_null(), "{body}");
    }
    // One of four left (25 % < 50 %): once the gauge reads it (at most a second).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(4, "main", 1))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["fallback"], "template", "{body}");
    let token = decode(body["token"].as_str().unwrap());
    let terms = token.coupon.unwrap();
    assert_eq!(
        (terms.template_id.as_str(), terms.fallback),
        ("tpl-spare", true)
    );
    assert_eq!(figures(&t, "tpl-main").await["remaining"], 1);
    assert_eq!(figures(&t, "tpl-spare").await["issued"], 1);

    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "greet", 1))
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body["fallback"].is_null(), "{body}");
    // The only coupon is gone: the greeting, no token, no stock.
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(2, "greet", 1))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["fallback"].as_str(), body["status"].as_str()),
        (Some("greeting"), Some("greeting")),
        "{body}"
    );
    assert_eq!(body["greeting"], "新年快乐");
    assert_eq!(body["token"], "");
    // A retry is answered with the greeting it had, recorded under its out_trade_no.
    let (status, again) = t
        .post("/v1/awards", CALLER, &coupon_award(2, "greet", 1))
        .await;
    assert_eq!(
        (
            status,
            again["status"].as_str(),
            again["replayed"].as_bool()
        ),
        (200, Some("greeting"), Some(true)),
        "{again}"
    );
    assert_eq!(
        (&again["greeting"], &again["out_trade_no"]),
        (&body["greeting"], &body["out_trade_no"])
    );
    assert_eq!(
        coupons(&t, 2).await["coupons"].as_array().unwrap().len(),
        1,
        "only the main scene's coupon"
    );
    let f = figures(&t, "tpl-one").await;
    assert_eq!(
        (f["issued"].as_i64(), f["remaining"].as_i64()),
        (Some(1), Some(0)),
        "{f}"
    );
    t.stop().await;
}

/// A coupon past its validity is expired at once in the list and refused at
/// redemption, and the expiry job records it, whether it was booked before or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_happens_on_time_and_a_used_or_expired_coupon_is_never_used() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Long enough for the steps before the end on a loaded machine; the test waits
    // for the end whatever it took.
    let until = now + 10_000;
    template(
        &t,
        "tpl-brief",
        10,
        json!({"valid_from_ms": now - 1_000, "valid_until_ms": until}),
    )
    .await;
    coupon_scene(
        &t,
        "cny2027",
        "coupons",
        json!({"template_id": "tpl-brief"}),
    )
    .await;
    let (status, a) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "coupons", 1))
        .await;
    assert_eq!(status, 201, "{a}");
    let (status, b) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "coupons", 2))
        .await;
    assert_eq!(status, 201, "{b}");
    t.drain().await;
    let (status, body) = redeem(&t, 1, b["out_trade_no"].as_str().unwrap(), "used-b", 2_000).await;
    assert_eq!(status, 200, "{body}");
    let (status, c) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "coupons", 3))
        .await;
    assert_eq!(status, 201, "{c}");

    let left = until - chrono::Utc::now().timestamp_millis();
    assert!(left > 0, "the steps before the end took over 4 s");
    tokio::time::sleep(Duration::from_millis(left as u64 + 200)).await;
    let list = coupons(&t, 1).await;
    assert_eq!(
        (
            list["expired"].as_i64(),
            list["used"].as_i64(),
            list["active"].as_i64()
        ),
        (Some(2), Some(1), Some(0)),
        "{list}"
    );
    let (status, body) = redeem(&t, 1, a["out_trade_no"].as_str().unwrap(), "late-a", 2_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("coupon_expired")),
        "{body}"
    );
    // Not booked when it expired: booked for the redemption, then refused.
    let (status, body) = redeem(&t, 1, c["out_trade_no"].as_str().unwrap(), "late-c", 2_000).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("coupon_expired")),
        "{body}"
    );

    let expired = t
        .app
        .coupons
        .expire_due(chrono::Utc::now().timestamp_millis())
        .await
        .unwrap();
    // c was booked after its end, as expired already: the job finds a.
    assert_eq!(expired, 1);
    assert_eq!(
        t.app
            .coupons
            .expire_due(chrono::Utc::now().timestamp_millis())
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM coupons WHERE state = 'expired'")
            .await,
        2
    );
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM coupons WHERE state = 'used'")
            .await,
        1
    );
    let f = figures(&t, "tpl-brief").await;
    assert_eq!(
        (
            f["expired"].as_i64(),
            f["used"].as_i64(),
            f["conserved"].as_bool()
        ),
        (Some(2), Some(1), Some(true)),
        "{f}"
    );
    // Nothing more is issued from a template whose window is over.
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(1, "coupons", 4))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("activity_closed")),
        "{body}"
    );
    t.stop().await;
}

/// A Redis flush does not give a template its spent stock again: what Redis held is in
/// doubt, and the coupons the clients hold come back by sync and are booked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_never_refunds_spent_coupon_stock() {
    let redis = PrivateRedis::start();
    let mut t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-8", 8, json!({"valid_days": 1})).await;
    coupon_scene(&t, "cny2027", "coupons", json!({"template_id": "tpl-8"})).await;
    let mut held = std::collections::HashMap::new();
    for user in 1..=8 {
        let (status, body) = t
            .post("/v1/awards", CALLER, &coupon_award(user, "coupons", 1))
            .await;
        assert_eq!(status, 201, "{body}");
        held.insert(user, vec![body["token"].as_str().unwrap().to_string()]);
    }
    redis.flushall().await;
    t.restart(&[]).await;
    for user in 9..=12 {
        let (status, body) = t
            .post("/v1/awards", CALLER, &coupon_award(user, "coupons", 1))
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (409, Some("budget_exhausted")),
            "{body}"
        );
    }
    assert_eq!(sync_all(&t, &held).await, 8);
    t.drain().await;
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM coupons").await, 8);
    assert_eq!(coupons(&t, 3).await["active"], 1);
    let f = figures(&t, "tpl-8").await;
    assert_eq!(
        (f["remaining"].as_i64(), f["booked"].as_i64()),
        (Some(0), Some(8)),
        "{f}"
    );
    t.stop().await;
}

/// Bad templates, scenes, awards and redemptions are refused with the API's codes and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_coupon_input_is_refused_and_changes_nothing() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    for bad in [
        json!({"id": "tpl-x", "name": "x", "face_value_cents": 0, "stock": 5, "valid_days": 1}),
        json!({"id": "tpl-x", "name": "x", "face_value_cents": 100, "stock": 0, "valid_days": 1}),
        json!({"id": "tpl-x", "name": "x", "face_value_cents": 100, "stock": 5}),
        json!({"id": "tpl-x", "name": "x", "face_value_cents": 100, "stock": 5, "valid_days": 1, "valid_from_ms": 1, "valid_until_ms": 2}),
        json!({"id": "tpl-x", "name": "x", "face_value_cents": 100, "stock": 5, "valid_from_ms": 5, "valid_until_ms": 5}),
        json!({"id": "TPL X", "name": "x", "face_value_cents": 100, "stock": 5, "valid_days": 1}),
        json!({"id": "tpl-x", "name": "x", "face_value_cents": 100, "stock": 5, "valid_days": 1, "colour": "red"}),
    ] {
        let (status, body) = t.post("/v1/admin/coupon-templates", ADMIN, &bad).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {body}"
        );
    }
    let (status, body) = t
        .post("/v1/admin/coupon-templates", ADMIN,
              &json!({"id": "cny2027", "name": "x", "face_value_cents": 100, "stock": 5, "valid_days": 1}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{body}"
    );
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM coupon_templates").await, 0);

    template(&t, "tpl-ok", 5, json!({"valid_days": 1})).await;
    for (scene, bad, code) in [
        (
            json!({"id": "c1", "name": "c", "award_type": "coupon"}),
            400,
            "invalid_request",
        ),
        (
            json!({"id": "c2", "name": "c", "award_type": "cash", "coupon": {"template_id": "tpl-ok"}}),
            400,
            "invalid_request",
        ),
        (
            json!({"id": "c3", "name": "c", "award_type": "coupon", "coupon": {"template_id": "tpl-none"}}),
            404,
            "not_found",
        ),
        (
            json!({"id": "c4", "name": "c", "award_type": "coupon", "coupon": {"template_id": "tpl-ok", "fallback": {"under_share": 0.1}}}),
            400,
            "invalid_request",
        ),
        (
            json!({"id": "c5", "name": "c", "award_type": "coupon", "coupon": {"template_id": "tpl-ok", "fallback": {"under_share": 1.5, "greeting": "hi"}}}),
            400,
            "invalid_request",
        ),
    ] {
        let (status, body) = t
            .post("/v1/admin/activities/cny2027/scenes", ADMIN, &scene)
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (bad, Some(code)),
            "{scene}: {body}"
        );
    }
    // A template is not an activity: no activity of its id, no scene under it, no award
    // from it.
    let (status, body) = t
        .post(
            "/v1/admin/activities",
            ADMIN,
            &json!({"id": "tpl-ok", "name": "x", "stage": "live",
            "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z",
            "budget_cents": 100, "max_award_cents": 10}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{body}"
    );
    let (status, _) = t
        .post(
            "/v1/admin/activities/tpl-ok/scenes",
            ADMIN,
            &json!({"id": "s", "name": "s", "award_type": "cash"}),
        )
        .await;
    assert_eq!(status, 404);
    coupon_scene(&t, "cny2027", "coupons", json!({"template_id": "tpl-ok"})).await;
    let mut with_cash = coupon_award(1, "coupons", 1);
    with_cash["amount_cents"] = json!(100);
    let (status, body) = t.post("/v1/awards", CALLER, &with_cash).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert_eq!(figures(&t, "tpl-ok").await["remaining"], 5);

    for (body, code) in [
        (
            json!({"user_id": 1, "out_trade_no": "x", "request_id": "", "order_cents": 1}),
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "out_trade_no": "a|b", "request_id": "r", "order_cents": 1}),
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "out_trade_no": "x", "request_id": "r", "order_cents": -1}),
            "invalid_request",
        ),
        (
            json!({"user_id": 1, "out_trade_no": "nope", "request_id": "r", "order_cents": 1}),
            "not_found",
        ),
    ] {
        let (status, answer) = t.post("/v1/coupons:redeem", MERCHANT, &body).await;
        assert_eq!(answer["error"]["code"], code, "{status} {body}: {answer}");
    }
    let (status, _) = t
        .get("/v1/wallet/coupons?state=lost", Some(&t.jwt(1)))
        .await;
    assert_eq!(status, 400);
    t.stop().await;
}

/// A one-win coupon scene: a coupon booked before Redis lost the claim still counts as
/// the user's win (the claim is checked against the booked coupons).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booked_coupon_win_is_not_won_again_after_a_redis_flush() {
    let redis = PrivateRedis::start();
    let t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    template(&t, "tpl-once", 100, json!({"valid_days": 1})).await;
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/scenes",
            ADMIN,
            &json!({"id": "coupon-once", "name": "Once", "award_type": "coupon",
                    "coupon": {"template_id": "tpl-once"},
                    "guards": {"one_win_per_user": true}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    t.app.activities.refresh().await.unwrap();
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(31, "coupon-once", 1))
        .await;
    assert_eq!(status, 201, "{body}");
    t.drain().await;
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM coupons WHERE user_id = 31")
            .await,
        1
    );

    redis.flushall().await;
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(31, "coupon-once", 2))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("already_won")),
        "{body}"
    );
    let (status, body) = t
        .post("/v1/awards", CALLER, &coupon_award(32, "coupon-once", 2))
        .await;
    assert_eq!(status, 201, "{body}");
    t.drain().await;
    assert_eq!(coupons(&t, 31).await["active"], 1);
    t.stop().await;
}
