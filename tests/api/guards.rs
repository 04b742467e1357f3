//! Seckill guards (issue 17): blacklist, open time, bursts, flagged users, one win per
//! user, composed with admission, against real Redis and MariaDB.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::helpers::*;

async fn guarded_scene(t: &TestApp, scene: &str, guards: Value) {
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/scenes",
            ADMIN,
            &json!({"id": scene, "name": "Guarded", "award_type": "cash", "guards": guards}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // The issuing path reads scenes from the activity cache.
    t.app.activities.refresh().await.unwrap();
}

fn award_in(user: i64, scene: &str, rain: i64, amount: i64) -> Value {
    json!({"user_id": user, "app_id": 1, "activity_id": "cny2027", "scene_id": scene,
           "rain_id": rain, "award_type": "cash", "amount_cents": amount})
}

async fn issue_one(t: &TestApp, award: &Value) -> (u16, Value) {
    t.post("/v1/awards", CALLER, award).await
}

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

async fn flagged(t: &TestApp) -> Vec<(i64, String)> {
    let (status, body) = t.get("/v1/admin/flagged", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["user_id"].as_i64().unwrap(),
                u["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blacklisted_users_and_callers_are_refused_until_taken_off() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    let set = |kind: &str, value: &str, on: bool| json!({"kind": kind, "value": value, "on": on, "reason": "scripted clicks"});
    let (status, body) = t
        .put("/v1/admin/blacklist", ADMIN, &set("user", "70", true))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entries"][0]["value"], "70");
    let (status, body) = issue_one(&t, &award(70, 1, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    assert_eq!(issue_one(&t, &award(71, 1, 10)).await.0, 201);
    t.put("/v1/admin/blacklist", ADMIN, &set("user", "70", false))
        .await;
    assert_eq!(issue_one(&t, &award(70, 1, 10)).await.0, 201);

    t.put(
        "/v1/admin/blacklist",
        ADMIN,
        &set("caller", "upstream", true),
    )
    .await;
    let (status, body) = issue_one(&t, &award(72, 1, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    t.put(
        "/v1/admin/blacklist",
        ADMIN,
        &set("caller", "upstream", false),
    )
    .await;
    assert_eq!(issue_one(&t, &award(72, 1, 10)).await.0, 201);

    for bad in [
        json!({"kind": "robot", "value": "1", "on": true}),
        json!({"kind": "user", "value": "x", "on": true}),
        json!({"kind": "user", "value": "0", "on": true}),
    ] {
        let (status, body) = t.put("/v1/admin/blacklist", ADMIN, &bad).await;
        assert_eq!(
            (status, code(&body)),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    let (_, body) = t.get("/v1/admin/blacklist", Some(ADMIN)).await;
    assert_eq!(body["entries"], json!([]));
    // Refused awards took no budget.
    let (_, activity) = t.get("/v1/admin/activities/cny2027", Some(ADMIN)).await;
    assert_eq!(activity["issued_cents"], 30, "{activity}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_and_bursting_users_are_flagged_and_refused_where_the_scene_says() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    guarded_scene(&t, "later", json!({"opens_at": later.to_rfc3339()})).await;
    guarded_scene(
        &t,
        "strict",
        json!({"flag_bursts": true, "refuse_flagged": true}),
    )
    .await;

    let (status, body) = issue_one(&t, &award_in(80, "later", 1, 10)).await;
    assert_eq!(
        (status, code(&body)),
        (422, Some("activity_closed")),
        "{body}"
    );
    assert!(flagged(&t).await.contains(&(80, "early".to_string())));
    // A flagged user is refused where the scene refuses flagged users; not elsewhere.
    let (status, body) = issue_one(&t, &award_in(80, "strict", 1, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    assert_eq!(issue_one(&t, &award(80, 1, 10)).await.0, 201);

    // Two requests of one user within a second (one batch: one moment): the second
    // is a burst.
    let (status, body) = t
        .post(
            "/v1/awards:batch",
            CALLER,
            &json!({"awards": [award_in(81, "strict", 1, 10), award_in(81, "strict", 2, 10)]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["results"][0]["error"].is_null(), "{body}");
    assert_eq!(body["results"][1]["error"]["code"], "forbidden", "{body}");
    assert!(flagged(&t).await.contains(&(81, "burst".to_string())));
    // A user with one request a second is never flagged.
    for rain in 0..3 {
        let (status, body) = issue_one(&t, &award_in(82, "strict", rain, 10)).await;
        assert_eq!(status, 201, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(1_050)).await;
    }
    assert!(!flagged(&t).await.iter().any(|(u, _)| *u == 82));
    let metrics = t.metrics_text().await;
    assert!(
        metrics.contains("rpw_guard_refusals_total{guard=\"early\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("rpw_flagged_users_total{reason=\"early\"}"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_win_per_user_holds_across_rains_and_concurrent_requests() {
    let t = Arc::new(spawn_app().await);
    t.open_activity("cny2027", 100_000, 1_000).await;
    guarded_scene(&t, "once", json!({"one_win_per_user": true})).await;

    let (status, first) = issue_one(&t, &award_in(90, "once", 1, 10)).await;
    assert_eq!(status, 201, "{first}");
    let (status, body) = issue_one(&t, &award_in(90, "once", 2, 10)).await;
    assert_eq!((status, code(&body)), (409, Some("already_won")), "{body}");
    // The winning award's retry is answered, byte for byte.
    let (status, again) = issue_one(&t, &award_in(90, "once", 1, 10)).await;
    assert!(status == 200 || status == 201, "{again}");
    assert_eq!(again["token"], first["token"]);

    // Twenty rains of one user at once: one wins.
    let mut tasks = Vec::new();
    for rain in 0..20 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            issue_one(&t, &award_in(91, "once", rain, 10)).await
        }));
    }
    let mut won = 0;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status {
            201 => won += 1,
            409 => assert_eq!(code(&body), Some("already_won"), "{body}"),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(won, 1);
    // The same in one batch.
    let (status, body) = t
        .post(
            "/v1/awards:batch",
            CALLER,
            &json!({"awards": (0..5).map(|r| award_in(92, "once", r, 10)).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(status, 200);
    let issued = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["error"].is_null())
        .count();
    assert_eq!(issued, 1, "{body}");
    let w = t.wallet(91).await;
    assert_eq!(w["pending_cents"], 10);
    Arc::into_inner(t).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_win_refused_by_the_budget_is_not_a_win() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 50, 1_000).await;
    guarded_scene(&t, "once", json!({"one_win_per_user": true})).await;
    let (status, body) = issue_one(&t, &award_in(95, "once", 1, 100)).await;
    assert_eq!(
        (status, code(&body)),
        (409, Some("budget_exhausted")),
        "{body}"
    );
    let (status, body) = issue_one(&t, &award_in(95, "once", 2, 50)).await;
    assert_eq!(status, 201, "the claim went back: {body}");
    let (status, body) = issue_one(&t, &award_in(95, "once", 3, 1)).await;
    assert_eq!(status, 409, "{body}");
    // A scene's guards must be known ones.
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/scenes",
            ADMIN,
            &json!({"id": "odd", "name": "Odd", "award_type": "cash", "guards": {"one_win": true}}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (400, Some("invalid_request")),
        "{body}"
    );
    t.stop().await;
}

/// Redis loses the one-win claims (a flush); the winner's client syncs its token back,
/// which claims the win again: the user does not win the scene a second time. (Before
/// the client syncs, the claim is not known: see the README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_win_claim_lost_with_redis_comes_back_with_the_clients_sync() {
    let redis = PrivateRedis::start();
    let mut t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    guarded_scene(&t, "once", json!({"one_win_per_user": true})).await;
    let (status, first) = issue_one(&t, &award_in(93, "once", 1, 10)).await;
    assert_eq!(status, 201, "{first}");
    t.drain().await;

    redis.flushall().await;
    t.restart(&[]).await;
    let held =
        std::collections::HashMap::from([(93, vec![first["token"].as_str().unwrap().to_string()])]);
    sync_all(&t, &held).await;
    let (status, body) = issue_one(&t, &award_in(93, "once", 2, 10)).await;
    assert_eq!((status, code(&body)), (409, Some("already_won")), "{body}");
    // The winning award's retry is still answered (its claim is its own). Redis lost
    // the token's marker with the flush, so the answer may be a second token of the same
    // out_trade_no (DESIGN.md, "What Redis may lose"): the ledger books one, the view
    // counts one.
    let (status, again) = issue_one(&t, &award_in(93, "once", 1, 10)).await;
    assert!(status == 200 || status == 201, "{again}");
    assert_eq!(again["out_trade_no"], first["out_trade_no"]);
    t.drain().await;
    let w = t.wallet(93).await;
    assert_eq!(
        (w["balance_cents"].as_i64(), w["pending_cents"].as_i64()),
        (Some(10), Some(0)),
        "{w}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booked_win_is_not_won_again_after_redis_loses_its_claim() {
    let mut redis = PrivateRedis::start_with_aof();
    let mut t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    guarded_scene(&t, "once", json!({"one_win_per_user": true})).await;
    for user in [94, 95] {
        let (status, body) = issue_one(&t, &award_in(user, "once", 1, 10)).await;
        assert_eq!(status, 201, "{body}");
    }
    t.drain().await;

    // A flush while the instance runs: no client syncs, the ledger holds the wins.
    redis.flushall().await;
    let (status, body) = issue_one(&t, &award_in(94, "once", 2, 10)).await;
    assert_eq!((status, code(&body)), (409, Some("already_won")), "{body}");
    // Refused again without the ledger: the claim now names the booked win.
    let (status, body) = issue_one(&t, &award_in(94, "once", 3, 10)).await;
    assert_eq!((status, code(&body)), (409, Some("already_won")), "{body}");
    // Users who have not won still win, and scenes without the guard are untouched.
    assert_eq!(issue_one(&t, &award_in(96, "once", 2, 10)).await.0, 201);
    assert_eq!(issue_one(&t, &award(94, 2, 10)).await.0, 201);
    let metrics = t.metrics_text().await;
    assert!(
        metrics.contains("rpw_guard_ledger_checks_total"),
        "{metrics}"
    );

    // A restart of Redis from its AOF (a new life of its data): user 96's claim is
    // kept or found in the ledger, user 95's claim (lost with the flush) is found there,
    // with the instance restarted too.
    t.drain().await;
    redis.restart();
    t.restart(&[]).await;
    for (user, rain) in [(95, 4), (96, 4)] {
        let (status, body) = issue_one(&t, &award_in(user, "once", rain, 10)).await;
        assert_eq!((status, code(&body)), (409, Some("already_won")), "{body}");
    }
    t.drain().await;
    for (user, cents) in [(94, 20), (95, 10), (96, 10)] {
        let w = t.wallet(user).await;
        assert_eq!(w["balance_cents"].as_i64(), Some(cents), "{w}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_users_stay_flagged_after_redis_loses_them() {
    let redis = PrivateRedis::start();
    let mut t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    guarded_scene(&t, "later", json!({"opens_at": later.to_rfc3339()})).await;
    guarded_scene(&t, "strict", json!({"refuse_flagged": true})).await;
    let (status, body) = issue_one(&t, &award_in(84, "later", 1, 10)).await;
    assert_eq!(status, 422, "{body}");
    // Flags reach MySQL shortly after Redis.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t
        .sql_i64("SELECT COUNT(*) FROM flagged_users WHERE user_id = 84")
        .await
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the flag never reached MySQL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Lost while the instance runs: the next check finds the set gone and restores it.
    redis.flushall().await;
    let (status, body) = issue_one(&t, &award_in(84, "strict", 1, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    assert!(flagged(&t).await.contains(&(84, "early".to_string())));
    assert_eq!(issue_one(&t, &award_in(85, "strict", 1, 10)).await.0, 201);

    // Lost across a restart of the instance.
    redis.flushall().await;
    t.restart(&[]).await;
    assert!(flagged(&t).await.contains(&(84, "early".to_string())));
    let (status, body) = issue_one(&t, &award_in(84, "strict", 2, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");

    // Flags an earlier release kept in Redis alone (no row, no marker) reach MySQL with
    // the first restore, and so outlive the next loss.
    sqlx::query("DELETE FROM flagged_users")
        .execute(t.app.db.main())
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{}{{guards}}:flagged:whole", t.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, body) = issue_one(&t, &award_in(84, "strict", 3, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM flagged_users WHERE user_id = 84 AND reason = 'early'")
            .await,
        1
    );
    redis.flushall().await;
    let (status, body) = issue_one(&t, &award_in(84, "strict", 4, 10)).await;
    assert_eq!((status, code(&body)), (403, Some("forbidden")), "{body}");
    t.stop().await;
}

/// A rush at the opening: a win booked in the first seconds of the activity, then Redis
/// flushed; the partition's new life begins within seconds of the opening, and the
/// claim is still checked against the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_win_booked_at_the_opening_is_not_won_again_after_a_flush() {
    let redis = PrivateRedis::start();
    let t = spawn_on(&redis).await;
    t.activity_with_window("cny2027", "live", 100_000, 1_000, 0, 3600)
        .await;
    guarded_scene(&t, "once", json!({"one_win_per_user": true})).await;
    let (status, body) = issue_one(&t, &award_in(97, "once", 1, 10)).await;
    assert_eq!(status, 201, "{body}");
    t.drain().await;
    redis.flushall().await;
    let (status, body) = issue_one(&t, &award_in(97, "once", 2, 10)).await;
    assert_eq!((status, code(&body)), (409, Some("already_won")), "{body}");
    t.stop().await;
}

/// A claim made by a check that then failed (the ledger could not be read: a bucket
/// stuck moving between shards) is given back: the user's next award of the scene is
/// not refused for a win that never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_a_failed_check_is_given_back() {
    let redis = PrivateRedis::start();
    let second = create_database().await;
    let t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![("RPW_MYSQL__SHARD_URLS".into(), mysql_url_for(&second))],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    guarded_scene(&t, "once", json!({"one_win_per_user": true})).await;
    // Redis lost the data since the activity opened: new claims are checked.
    redis.flushall().await;
    sqlx::query("UPDATE shard_map SET moving = 1 WHERE bucket = 1000")
        .execute(t.app.db.main())
        .await
        .unwrap();
    let (status, body) = issue_one(&t, &award_in(98, "once", 1, 10)).await;
    assert_eq!((status, code(&body)), (503, Some("unavailable")), "{body}");
    sqlx::query("UPDATE shard_map SET moving = 0 WHERE bucket = 1000")
        .execute(t.app.db.main())
        .await
        .unwrap();
    let (status, body) = issue_one(&t, &award_in(98, "once", 2, 10)).await;
    assert_eq!(status, 201, "{body}");
    t.stop().await;
}
