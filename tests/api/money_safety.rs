//! Money outside the happy path: a Redis loss, a trim, a retry, a repair or a config
//! change never loses, doubles or over-issues a cent (DESIGN.md, "What Redis may lose").

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// Awards of one scene to many users; returns what each client was told (its tokens).
async fn issue_to_clients(
    t: &TestApp,
    activity: &str,
    awards: &[(i64, i64, i64)],
) -> (HashMap<i64, Vec<String>>, Vec<Value>) {
    let body: Vec<Value> = awards
        .iter()
        .map(|&(user, rain, amount)| {
            json!({"user_id": user, "app_id": 1, "activity_id": activity, "scene_id": "rain",
                   "rain_id": rain, "award_type": "cash", "amount_cents": amount})
        })
        .collect();
    let (status, answer) = t
        .post("/v1/awards:batch", CALLER, &json!({ "awards": body }))
        .await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap().clone();
    let mut held: HashMap<i64, Vec<String>> = HashMap::new();
    for (&(user, ..), r) in awards.iter().zip(&results) {
        if let Some(token) = r["token"].as_str() {
            held.entry(user).or_default().push(token.to_string());
        }
    }
    (held, results)
}

async fn activity(t: &TestApp, id: &str) -> Value {
    let (status, view) = t
        .get(&format!("/v1/admin/activities/{id}"), Some(ADMIN))
        .await;
    assert_eq!(status, 200, "{view}");
    view
}

/// Waits (up to 3 s) until the activity's remaining budget reads `expected`. A grant in
/// flight (committed in MySQL, not yet applied to its sub-stock) makes it read less for a
/// moment; it must never read more.
async fn remaining_settles_at(t: &TestApp, id: &str, expected: i64) {
    let mut last = Value::Null;
    for _ in 0..60 {
        last = activity(t, id).await;
        let remaining = last["budget_remaining_cents"].as_i64().unwrap();
        assert!(remaining <= expected, "budget created: {last}");
        if remaining == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the remaining budget never read {expected}: {last}");
}

async fn ledger_awards(t: &TestApp, activity: &str) -> (i64, HashSet<String>) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CAST(out_trade_no AS CHAR), amount_cents FROM ledger_entries WHERE kind = 'award' AND activity_id = ?",
    )
    .bind(activity)
    .fetch_all(t.app.db.main())
    .await
    .unwrap();
    (
        rows.iter().map(|r| r.1).sum(),
        rows.into_iter().map(|r| r.0).collect(),
    )
}

/// Item 1: budget 2,000, twenty awards of 100, FLUSHALL, restart. The spent budget is
/// not funded again: nothing more is issued, what Redis lost is in doubt, and once the
/// clients synced and the ledger booked their awards, nothing of it was unspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_never_refunds_a_spent_budget() {
    a_flush_never_refunds_a_spent_budget(false).await;
}

/// The same with the sub-stocks placed in the partitions
/// (`issue.sub_stocks_in_partitions`): their keys are found lost as spread ones are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_never_refunds_a_spent_budget_placed_in_the_partitions() {
    a_flush_never_refunds_a_spent_budget(true).await;
}

async fn a_flush_never_refunds_a_spent_budget(placed: bool) {
    let redis = PrivateRedis::start();
    let mut t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![
            ("RPW_ISSUE__IN_DOUBT_GRACE_MS".into(), "0".into()),
            (
                "RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS".into(),
                placed.to_string(),
            ),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 2_000, 100).await;
    let placement = t.app.budget.live_gen("cny2027").unwrap().placement;
    assert_eq!(placement.in_partitions(), placed);
    let first: Vec<(i64, i64, i64)> = (0..20).map(|i| (100 + i, 1, 100)).collect();
    let (held, results) = issue_to_clients(&t, "cny2027", &first).await;
    assert!(results.iter().all(|r| r["error"].is_null()), "{results:?}");

    redis.flushall().await;
    t.restart(&[]).await;

    let more: Vec<(i64, i64, i64)> = (0..20).map(|i| (100 + i, 2, 100)).collect();
    let (_, results) = issue_to_clients(&t, "cny2027", &more).await;
    for r in &results {
        assert_eq!(r["error"]["code"], "budget_exhausted", "{r}");
    }
    let view = activity(&t, "cny2027").await;
    assert_eq!(view["budget_in_doubt_cents"], 2_000, "{view}");
    assert_eq!(view["budget_granted_cents"], 2_000, "{view}");
    assert_eq!(view["budget_ungranted_cents"], 0, "{view}");

    assert_eq!(sync_all(&t, &held).await, 20);
    t.drain().await;
    let (booked, _) = ledger_awards(&t, "cny2027").await;
    assert_eq!(booked, 2_000);
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/release-in-doubt",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["released_cents"], 0, "every cent in doubt was spent");
    let view = activity(&t, "cny2027").await;
    assert_eq!(view["budget_in_doubt_cents"], 0, "{view}");
    t.stop().await;
}

/// Invariant 6: Redis flushed mid-activity, the service restarted, issuance goes on from
/// budget not granted before; the clients sync, the backlog drains, and then issued
/// never exceeds the budget and every award a client holds is booked. Releasing what
/// was in doubt gives back exactly the unspent part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariant_6_a_flush_mid_activity_over_issues_nothing_and_loses_no_client_award() {
    let redis = PrivateRedis::start();
    let mut t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![("RPW_ISSUE__IN_DOUBT_GRACE_MS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    let budget = 20_000;
    t.open_activity("cny2027", budget, 50).await;
    let before: Vec<(i64, i64, i64)> = (0..60).map(|i| (1 + i % 40, i, 50)).collect();
    let (mut held, results) = issue_to_clients(&t, "cny2027", &before).await;
    assert!(results.iter().all(|r| r["error"].is_null()));

    redis.flushall().await;
    t.restart(&[]).await;

    let mut issued_after = 0;
    for wave in 0..4 {
        let awards: Vec<(i64, i64, i64)> = (0..100)
            .map(|i| (1 + i % 40, 1_000 + wave * 100 + i, 50))
            .collect();
        let (got, results) = issue_to_clients(&t, "cny2027", &awards).await;
        for r in &results {
            assert!(
                r["error"].is_null() || r["error"]["code"] == "budget_exhausted",
                "{r}"
            );
        }
        issued_after += results.iter().filter(|r| r["error"].is_null()).count();
        for (user, tokens) in got {
            held.entry(user).or_default().extend(tokens);
        }
    }
    assert!(issued_after > 0, "issuance goes on after the loss");

    sync_all(&t, &held).await;
    t.drain().await;
    let (booked, in_ledger) = ledger_awards(&t, "cny2027").await;
    let client_total: usize = held.values().map(Vec::len).sum();
    for tokens in held.values() {
        for token in tokens {
            assert!(
                in_ledger.contains(&token_otn(token)),
                "a client-held award is booked"
            );
        }
    }
    assert_eq!(
        in_ledger.len(),
        client_total,
        "nothing booked twice or extra"
    );
    assert_eq!(booked, 50 * client_total as i64);
    assert!(booked <= budget, "issued {booked} within budget {budget}");

    let view = activity(&t, "cny2027").await;
    let in_doubt = view["budget_in_doubt_cents"].as_i64().unwrap();
    assert!(in_doubt > 0, "{view}");
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/release-in-doubt",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let released = body["released_cents"].as_i64().unwrap();
    assert_eq!(
        released,
        in_doubt - 60 * 50,
        "the unspent part of what was lost"
    );
    let (_, again) = t
        .post(
            "/v1/admin/activities/cny2027/release-in-doubt",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(again["released_cents"], 0, "a second release finds nothing");
    let view = activity(&t, "cny2027").await;
    assert_eq!(view["budget_in_doubt_cents"], 0);
    // What was released is issued again, up to the budget and not a cent more: batches
    // until one issues nothing (the last cents may sit thin over several sub-stocks).
    for wave in 0..10 {
        let last: Vec<(i64, i64, i64)> =
            (0..100).map(|i| (7, 5_000 + wave * 100 + i, 50)).collect();
        let (got, _) = issue_to_clients(&t, "cny2027", &last).await;
        if got.is_empty() {
            break;
        }
    }
    t.drain().await;
    let (booked, _) = ledger_awards(&t, "cny2027").await;
    let view = activity(&t, "cny2027").await;
    assert_eq!(booked, budget, "the whole budget, and no more: {view}");
    t.stop().await;
}

/// Item 1, the smaller form: Redis killed and restarted from its AOF (which may miss
/// the last second of takes) is a new process; the budget it held is in doubt, never
/// spent again, and issuance goes on from new grants, within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_from_its_aof_never_spends_a_sub_stock_twice() {
    let mut redis = PrivateRedis::start_with_aof();
    let t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![("RPW_ISSUE__IN_DOUBT_GRACE_MS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    let budget = 5_000;
    t.open_activity("cny2027", budget, 100).await;
    let first: Vec<(i64, i64, i64)> = (0..20).map(|i| (300 + i, 1, 100)).collect();
    let (mut held, results) = issue_to_clients(&t, "cny2027", &first).await;
    assert!(results.iter().all(|r| r["error"].is_null()));
    // kill -9 right after the awards: the AOF may not hold their takes yet.
    redis.restart();

    let mut after = 0;
    for wave in 0..3 {
        let awards: Vec<(i64, i64, i64)> = (0..30).map(|i| (300 + i, 10 + wave, 100)).collect();
        // Upstream callers retry until answered: the first calls after the restart meet
        // broken connections (503) while the client reconnects.
        let mut attempt = 0;
        let (got, results) = loop {
            let (got, results) = issue_to_clients(&t, "cny2027", &awards).await;
            if results.iter().all(|r| r["error"]["code"] != "unavailable") || attempt == 50 {
                break (got, results);
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for r in &results {
            assert!(
                r["error"].is_null() || r["error"]["code"] == "budget_exhausted",
                "{r}"
            );
        }
        after += results.iter().filter(|r| r["error"].is_null()).count();
        for (user, tokens) in got {
            held.entry(user).or_default().extend(tokens);
        }
    }
    assert!(after > 0, "issuance goes on after the restart");
    let view = activity(&t, "cny2027").await;
    assert!(
        view["budget_in_doubt_cents"].as_i64().unwrap() > 0,
        "what the old process held is in doubt: {view}"
    );
    sync_all(&t, &held).await;
    t.drain().await;
    let (booked, in_ledger) = ledger_awards(&t, "cny2027").await;
    let client_total: usize = held.values().map(Vec::len).sum();
    assert_eq!(
        in_ledger.len(),
        client_total,
        "every client award booked once"
    );
    assert!(booked <= budget, "booked {booked} within {budget}");
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/release-in-doubt",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let view = activity(&t, "cny2027").await;
    assert_eq!(
        view["budget_remaining_cents"].as_i64().unwrap() + booked,
        budget,
        "after the release every cent is booked or may still be issued: {view}"
    );
    t.stop().await;
}

/// A process dying between closing a generation and draining it (or Redis failing the
/// drain) leaves the generation `closing`, with everything it was granted counted as
/// taken. Simulated by committing the close by hand, then losing Redis.
async fn cut_off_close(t: &TestApp, redis: &PrivateRedis) -> HashMap<i64, Vec<String>> {
    t.open_activity("cny2027", 2_000, 100).await;
    let awards: Vec<(i64, i64, i64)> = (0..5).map(|i| (700 + i, 1, 100)).collect();
    let (held, results) = issue_to_clients(t, "cny2027", &awards).await;
    assert!(results.iter().all(|r| r["error"].is_null()), "{results:?}");
    let main = t.app.db.main();
    sqlx::query("UPDATE budget_generations SET state = 'closing', closed_at = CURRENT_TIMESTAMP(3) WHERE activity_id = 'cny2027' AND gen = 1")
        .execute(main)
        .await
        .unwrap();
    sqlx::query("INSERT INTO budget_generations (activity_id, gen, sub_stocks, state) SELECT activity_id, 2, sub_stocks, 'live' FROM budget_generations WHERE activity_id = 'cny2027' AND gen = 1")
        .execute(main)
        .await
        .unwrap();
    redis.flushall().await;
    held
}

/// A close cut off before its drain is finished by the release of in-doubt budget: the
/// generation Redis lost is in doubt, and what the ledger proves unspent comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_finishes_a_close_cut_off_before_its_drain() {
    let redis = PrivateRedis::start();
    let t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![
            ("RPW_ISSUE__IN_DOUBT_GRACE_MS".into(), "0".into()),
            // No periodic refresh: only the release may finish the close here.
            ("RPW_ISSUE__CACHE_REFRESH_MS".into(), "600000".into()),
        ],
        ..Default::default()
    })
    .await;
    let held = cut_off_close(&t, &redis).await;
    assert_eq!(sync_all(&t, &held).await, 5);
    t.drain().await;
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/release-in-doubt",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resolved_generations"], 1, "{body}");
    let (booked, _) = ledger_awards(&t, "cny2027").await;
    assert_eq!(booked, 500);
    let view = activity(&t, "cny2027").await;
    assert_eq!(view["budget_in_doubt_cents"], 0, "{view}");
    assert_eq!(
        view["budget_remaining_cents"].as_i64().unwrap() + booked,
        2_000,
        "every cent booked or still to issue: {view}"
    );
    t.stop().await;
}

/// Nobody has to ask: the periodic refresh finishes a close cut off before its drain,
/// so the generation Redis lost shows in doubt instead of silently taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_cut_off_before_its_drain_is_finished_by_the_refresh() {
    let redis = PrivateRedis::start();
    let t = spawn_on(&redis).await;
    cut_off_close(&t, &redis).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = t
            .sql_i64("SELECT COUNT(*) FROM budget_generations WHERE activity_id = 'cny2027' AND gen = 1 AND state = 'in_doubt'")
            .await;
        if state == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "generation 1 is still not finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = activity(&t, "cny2027").await;
    assert!(
        view["budget_in_doubt_cents"].as_i64().unwrap() >= 500,
        "{view}"
    );
    t.stop().await;
}

/// A drained generation awaiting its leak settlement when Redis is flushed: its issued
/// counters are gone, so repair must not call its issued budget a leak; the generation
/// is in doubt instead, and once clients synced and the ledger booked their awards,
/// the release finds nothing unspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_after_redis_lost_a_drained_generation_returns_nothing() {
    let redis = PrivateRedis::start();
    let t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![
            ("RPW_ISSUE__IN_FLIGHT_GRACE_MS".into(), "2000".into()),
            ("RPW_ISSUE__IN_DOUBT_GRACE_MS".into(), "0".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 10_000, 100).await;
    let awards: Vec<(i64, i64, i64)> = (0..30).map(|i| (500 + i, 1, 100)).collect();
    let (held, _) = issue_to_clients(&t, "cny2027", &awards).await;
    let (status, first) = t
        .post(
            "/v1/admin/activities/cny2027/repair-leak",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["settling_generations"], 1, "{first}");
    redis.flushall().await;
    // Past the in-flight grace: the second repair would settle a leak now.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (status, second) = t
        .post(
            "/v1/admin/activities/cny2027/repair-leak",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["repaired_cents"], 0, "nothing leaked: {second}");
    let view = activity(&t, "cny2027").await;
    assert!(
        view["budget_in_doubt_cents"].as_i64().unwrap() >= 3_000,
        "{view}"
    );
    sync_all(&t, &held).await;
    t.drain().await;
    let (_, body) = t
        .post(
            "/v1/admin/activities/cny2027/release-in-doubt",
            ADMIN,
            &json!({}),
        )
        .await;
    assert!(body["released_cents"].as_i64().is_some(), "{body}");
    let (booked, _) = ledger_awards(&t, "cny2027").await;
    assert_eq!(booked, 3_000);
    let view = activity(&t, "cny2027").await;
    assert_eq!(
        view["budget_remaining_cents"].as_i64().unwrap() + booked,
        10_000,
        "every cent booked or still to issue, none created: {view}"
    );
    t.stop().await;
}

/// Item 2: two activities with a scene called `rain` issue two distinct awards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_activities_with_a_scene_of_the_same_name_award_twice() {
    let t = spawn_app().await;
    t.open_activity("act-a", 10_000, 1_000).await;
    t.open_activity("act-b", 10_000, 1_000).await;
    let (status, a) = t
        .post(
            "/v1/awards",
            CALLER,
            &json!({"user_id": 31337, "activity_id": "act-a", "scene_id": "rain", "rain_id": 1,
                    "award_type": "cash", "amount_cents": 100}),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    assert_eq!(a["out_trade_no"], "31337_act-a_rain_1_cash_live");
    let (status, b) = t
        .post(
            "/v1/awards",
            CALLER,
            &json!({"user_id": 31337, "activity_id": "act-b", "scene_id": "rain", "rain_id": 1,
                    "award_type": "cash", "amount_cents": 500}),
        )
        .await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["out_trade_no"], "31337_act-b_rain_1_cash_live");
    t.drain().await;
    let wallet = t.wallet(31337).await;
    assert_eq!(wallet["booked_cents"], 600, "{wallet}");
    assert_eq!(wallet["pending_cents"], 0);
    t.stop().await;
}

/// Item 3: after housekeeping trimmed the settled token, the same request is a replay of
/// the very same bytes, a changed one a conflict, and no budget is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_token_was_trimmed_is_a_replay_not_a_new_award() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_WALLET__SETTLED_RETENTION_SECS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 10_000, 1_000).await;
    let (status, first) = t.post("/v1/awards", CALLER, &award(42, 7, 88)).await;
    assert_eq!(status, 201, "{first}");
    t.drain().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let trimmed = t.app.jobs.housekeeping().await.unwrap();
    assert_eq!(trimmed, 1);

    let (status, again) = t.post("/v1/awards", CALLER, &award(42, 7, 88)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["token"], first["token"], "byte-identical");
    let (status, changed) = t.post("/v1/awards", CALLER, &award(42, 7, 99)).await;
    assert_eq!(status, 409, "{changed}");
    assert_eq!(changed["error"]["code"], "idempotency_conflict");
    let (_, batch) = t
        .post(
            "/v1/awards:batch",
            CALLER,
            &json!({"awards": [award(42, 7, 88)]}),
        )
        .await;
    assert_eq!(batch["results"][0]["replayed"], true, "{batch}");

    let view = activity(&t, "cny2027").await;
    assert_eq!(view["issued_count"], 1, "{view}");
    assert_eq!(view["budget_remaining_cents"], 10_000 - 88, "{view}");
    t.drain().await;
    assert_eq!(t.wallet(42).await["balance_cents"], 88);
    t.stop().await;
}

/// Item 4: a batch in flight, `issue_off` a moment later and many concurrent repairs:
/// in-flight awards are never counted as a leak, so the budget is never over-funded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_repair_never_returns_budget_that_in_flight_awards_hold() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_ISSUE__IN_FLIGHT_GRACE_MS".into(), "1500".into())],
        ..Default::default()
    })
    .await;
    let budget = 100_000;
    t.open_activity("cny2027", budget, 100).await;
    let awards: Vec<Value> = (0..1_000).map(|i| award(10 + i, 1, 10)).collect();
    let batch_body = json!({ "awards": awards });
    let batch = t.post("/v1/awards:batch", CALLER, &batch_body);
    let repairs = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        t.put("/v1/admin/switches/issue_off", ADMIN, &json!({"on": true}))
            .await;
        t.app.switches.refresh(&t.app.redis).await.unwrap();
        let empty = json!({});
        join_all((0..32).map(|_| t.post("/v1/admin/activities/cny2027/repair-leak", ADMIN, &empty)))
            .await
    };
    let ((status, body), repaired) = futures::join!(batch, repairs);
    assert_eq!(status, 200, "{body}");
    let issued: i64 = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["error"].is_null())
        .count() as i64
        * 10;
    let mut returned = 0;
    for (status, body) in &repaired {
        assert_eq!(*status, 200, "{body}");
        returned += body["repaired_cents"].as_i64().unwrap();
    }
    assert_eq!(returned, 0, "nothing leaked: every take became a token");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/repair-leak",
            ADMIN,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["repaired_cents"], 0, "{body}");
    let view = activity(&t, "cny2027").await;
    assert_eq!(view["issued_cents"], issued, "{view}");
    assert_eq!(
        view["budget_remaining_cents"].as_i64().unwrap() + issued,
        budget,
        "every cent issued or still there, none created: {view}"
    );
    t.stop().await;
}

/// Item 5: a restart with another `issue.sub_stocks` moves the budget into the new
/// layout; it never creates any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_sub_stock_count_moves_budget_and_never_creates_it() {
    let mut t = spawn_app_with(Options {
        env: vec![("RPW_ISSUE__SUB_STOCKS".into(), "16".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_600, 100).await;
    let (_, results) = issue_to_clients(&t, "cny2027", &[(1, 1, 100), (2, 1, 100)]).await;
    assert!(results.iter().all(|r| r["error"].is_null()));
    t.restart(&[("RPW_ISSUE__SUB_STOCKS", "32")]).await;
    remaining_settles_at(&t, "cny2027", 1_400).await;
    let awards: Vec<(i64, i64, i64)> = (0..24).map(|i| (100 + i, 2, 100)).collect();
    let (_, results) = issue_to_clients(&t, "cny2027", &awards).await;
    let ok = results.iter().filter(|r| r["error"].is_null()).count();
    let refusals: Vec<&Value> = results.iter().filter(|r| !r["error"].is_null()).collect();
    assert_eq!(
        ok,
        14,
        "the 1,400 left and not a cent more; refused: {:?}",
        refusals.first()
    );
    t.stop().await;
}

/// A restart that places the sub-stocks in the partitions (or spreads them again) moves
/// the budget into the new layout, as a changed count does; it never creates any, and
/// the generation each layout was live in keeps its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placing_the_sub_stocks_in_the_partitions_moves_budget_and_never_creates_it() {
    use redpacket_wallet::store::StockPlacement;
    let mut t = spawn_app().await;
    t.open_activity("cny2027", 2_400, 100).await;
    let (_, results) = issue_to_clients(&t, "cny2027", &[(1, 1, 100), (2, 1, 100)]).await;
    assert!(results.iter().all(|r| r["error"].is_null()));
    let spread = t.app.budget.live_gen("cny2027").unwrap();
    assert_eq!(spread.placement, StockPlacement::Spread);

    t.restart(&[("RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS", "true")])
        .await;
    let placed = t.app.budget.live_gen("cny2027").unwrap();
    assert!(placed.gen > spread.gen, "a new generation");
    assert_eq!(placed.placement, StockPlacement::InPartitions(4));
    remaining_settles_at(&t, "cny2027", 2_200).await;
    let awards: Vec<(i64, i64, i64)> = (0..8).map(|i| (100 + i, 2, 100)).collect();
    let (_, results) = issue_to_clients(&t, "cny2027", &awards).await;
    assert!(results.iter().all(|r| r["error"].is_null()));

    // Spread again: the placed generation is drained from its own keys.
    t.restart(&[("RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS", "false")])
        .await;
    let again = t.app.budget.live_gen("cny2027").unwrap();
    assert!(again.gen > placed.gen);
    assert_eq!(again.placement, StockPlacement::Spread);
    remaining_settles_at(&t, "cny2027", 1_400).await;
    let awards: Vec<(i64, i64, i64)> = (0..24).map(|i| (200 + i, 3, 100)).collect();
    let (_, results) = issue_to_clients(&t, "cny2027", &awards).await;
    let ok = results.iter().filter(|r| r["error"].is_null()).count();
    assert_eq!(ok, 14, "the 1,400 left and not a cent more");
    let view = activity(&t, "cny2027").await;
    assert_eq!(view["issued_cents"], 2_400, "{view}");
    assert_eq!(view["budget_remaining_cents"], 0, "{view}");
    t.stop().await;
}

/// Item 6: the worker and the cron sweep draw from one token bucket, so with
/// `settle.max_tps = 200` the ledger books about 200 tokens a second, not bursts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cron_sweep_books_within_the_booking_bound() {
    let t = spawn_app_with(Options {
        worker: true,
        cron: true,
        env: vec![
            ("RPW_SETTLE__MAX_TPS".into(), "200".into()),
            ("RPW_SETTLE__BATCH_SIZE".into(), "50".into()),
            ("RPW_CRON__SETTLE".into(), "* * * * * *".into()),
            ("RPW_CRON__RECONCILE_LIVE".into(), "".into()),
            ("RPW_CRON__RECONCILE_HOURLY".into(), "".into()),
            ("RPW_CRON__HOUSEKEEPING".into(), "".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_000_000, 100).await;
    t.pause_booking(true).await;
    issue_all(&t, (0..3_000).map(|i| award(1 + i, 1, 1)).collect()).await;
    t.pause_booking(false).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let booked = t
        .sql_i64("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'award'")
        .await;
    let secs = started.elapsed().as_secs_f64();
    // The bucket holds one batch (50) and refills at 200/s.
    let bound = (200.0 * secs + 50.0) as i64 + 50;
    assert!(booked > 0, "booking runs");
    assert!(
        booked <= bound,
        "{booked} booked in {secs:.1} s, bound {bound}"
    );
    t.stop().await;
}

/// Item 7: with no payout callers configured, nobody may post a payout result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_payout_callers_no_caller_may_post_a_payout_result() {
    const OTHER: &str = "other-caller-key-0001";
    let t = spawn_app_with(Options {
        env: vec![
            (
                "RPW_AUTH__CALLER_KEYS".into(),
                format!("upstream:{CALLER},other:{OTHER}"),
            ),
            ("RPW_AUTH__PAYOUT_CALLERS".into(), "".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(4, 1, 500)]).await;
    let (status, w) = t
        .post(
            "/v1/withdrawals",
            &t.jwt(4),
            &json!({"request_id": "r1", "amount_cents": 300}),
        )
        .await;
    assert_eq!(status, 201, "{w}");
    let id = w["withdrawal_id"].as_str().unwrap();
    for key in [CALLER, OTHER] {
        let (status, body) = t
            .post(
                &format!("/v1/withdrawals/{id}/result"),
                key,
                &json!({"status": "failed"}),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    assert_eq!(t.wallet(4).await["balance_cents"], 200, "nothing reversed");
    t.stop().await;
}

/// Item 8: flows page in the byte order of out_trade_no, so scenes `a` and `ab` awarded
/// in one batch (one issue time) are both listed, one per page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_pages_list_every_item_whatever_the_scene_names() {
    let t = spawn_app().await;
    t.activity_with_window("cny2027", "live", 100_000, 1_000, -60, 3_600)
        .await;
    t.scene("cny2027", "a", "cash").await;
    t.scene("cny2027", "ab", "cash").await;
    let awards: Vec<Value> = ["a", "ab"]
        .iter()
        .map(|s| {
            json!({"user_id": 5, "activity_id": "cny2027", "scene_id": s, "rain_id": 1,
                   "award_type": "cash", "amount_cents": 10})
        })
        .collect();
    issue_all(&t, awards).await;
    for booked in [false, true] {
        if booked {
            t.drain().await;
        }
        let jwt = t.jwt(5);
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..4 {
            let path = match &cursor {
                Some(c) => format!("/v1/wallet/flows?limit=1&cursor={c}"),
                None => "/v1/wallet/flows?limit=1".to_string(),
            };
            let (status, page) = t.get(&path, Some(&jwt)).await;
            assert_eq!(status, 200, "{page}");
            for item in page["items"].as_array().unwrap() {
                seen.push(item["scene_id"].as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["a", "ab"], "booked: {booked}");
    }
    t.stop().await;
}

/// Item 9: money values have an explicit maximum, a bad total is a 400, and one bad
/// activity row does not stop the cache refresh of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_values_are_bounded_and_one_bad_activity_poisons_nothing() {
    let t = spawn_app().await;
    let now = chrono::Utc::now();
    let new_activity = |id: &str, budget: i64| {
        json!({"id": id, "name": "x", "stage": "live",
               "starts_at": (now - chrono::Duration::seconds(60)).to_rfc3339(),
               "ends_at": (now + chrono::Duration::seconds(3600)).to_rfc3339(),
               "budget_cents": budget, "max_award_cents": 100})
    };
    let (status, body) = t
        .post(
            "/v1/admin/activities",
            ADMIN,
            &new_activity("huge", 9_000_000_000_000_000_000),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    t.open_activity("cny2027", 1_000, 100).await;
    let max = redpacket_wallet::domain::MAX_CENTS;
    let (status, body) = t
        .post(
            "/v1/admin/activities/cny2027/budget",
            ADMIN,
            &json!({ "delta_cents": max }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    assert_eq!(activity(&t, "cny2027").await["budget_cents"], 1_000);

    // A row no client could have written (an operator's hand edit): the others still load.
    sqlx::query("INSERT INTO activities (id, name, stage, starts_at, ends_at, budget_cents, max_award_cents) VALUES ('broken', 'x', 'bogus', NOW(), NOW() + INTERVAL 1 DAY, 100, 10)")
        .execute(t.app.db.main())
        .await
        .unwrap();
    let (status, body) = t
        .post("/v1/admin/activities", ADMIN, &new_activity("later", 1_000))
        .await;
    assert_eq!(status, 201, "{body}");
    t.scene("later", "rain", "cash").await;
    let (status, body) = t
        .post(
            "/v1/awards",
            CALLER,
            &json!({"user_id": 1, "activity_id": "later", "scene_id": "rain", "rain_id": 1,
                    "award_type": "cash", "amount_cents": 10}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    t.stop().await;
}

/// Item 10: a bad query string, an oversized body and an unknown route all answer the
/// API's error envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_carries_the_envelope() {
    let t = spawn_app().await;
    let jwt = t.jwt(1);
    let (status, body) = t.get("/v1/wallet/flows?limit=abc", Some(&jwt)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");

    // A body announced at 3 MiB is refused on its Content-Length, before one byte of it
    // is read. The request goes over a bare socket that sends the head alone: an HTTP
    // client writing the whole body races the server closing the connection, and loses
    // to a broken pipe before it reads the answer.
    let host = t.url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST /v1/awards:batch HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {CALLER}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        3 * 1024 * 1024
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("the refusal came without waiting for the body")
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    // The body was left unread, so the server ends this connection, and says so.
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close")),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");

    let (status, body) = t.get("/v1/no-such-route", Some(ADMIN)).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    t.stop().await;
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Item 11: a 2 MB protobuf of a million empty items is refused while it is decoded, so
/// the refusal costs a few MB, not hundreds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_over_the_limit_is_refused_before_it_is_decoded() {
    let t = spawn_app().await;
    // Field 1, length 0, a million times: a million empty tokens / empty awards.
    let body: Vec<u8> = [0x0a_u8, 0x00].repeat(1_000_000);
    let before = peak_rss_kib();
    for (path, bearer) in [
        ("/v1/wallet/tokens:sync", t.jwt(1)),
        ("/v1/awards:batch", CALLER.to_string()),
    ] {
        for _ in 0..3 {
            let resp = t
                .client
                .post(format!("{}{}", t.url, path))
                .bearer_auth(&bearer)
                .header("content-type", "application/x-protobuf")
                .header("accept", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400, "{path}");
            let answer: Value = resp.json().await.unwrap();
            assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        }
    }
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // Decoding these bodies in full grew the peak by 80 to 350 MiB; tests running
    // beside this one add a few MiB at most.
    assert!(grown_mib < 64, "peak memory grew by {grown_mib} MiB");
    t.stop().await;
}

/// Item 12: an entry that fails every time is parked where an operator sees it, and the
/// partitions after it keep booking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_entry_is_parked_and_the_other_partitions_keep_booking() {
    let t = spawn_app_with(Options {
        worker: true,
        env: vec![
            ("RPW_SETTLE__CONCURRENCY".into(), "1".into()),
            ("RPW_SETTLE__RETRY_BASE_MS".into(), "20".into()),
            ("RPW_SETTLE__RETRY_MAX_MS".into(), "100".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    // An entry no booking can take: its activity id does not fit the ledger's column.
    let mut conn = t.app.redis.conn();
    let _: String = redis::cmd("XADD")
        .arg(t.app.redis.stream_key(0))
        .arg("*")
        .arg(&[
            ("u", "4"),
            ("o", "4_poison_1_cash_live"),
            ("a", "10"),
            ("act", &"x".repeat(40)),
            ("sc", "rain"),
            ("t", "1"),
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    issue_all(&t, (1..=3).map(|u| award(u, 1, 100)).collect()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let booked = t
            .sql_i64("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'award'")
            .await;
        if booked == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions 1..3 booked {booked} of 3"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = t.get("/v1/admin/parked", Some(ADMIN)).await;
        assert_eq!(status, 200, "{body}");
        let entries = body["entries"].as_array().unwrap();
        if !entries.is_empty() {
            assert_eq!(entries[0]["partition"], 0, "{body}");
            assert_eq!(entries[0]["fields"]["o"], "4_poison_1_cash_live", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the poisoned entry is parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The sweep goes past a failing partition too.
    redpacket_wallet::settle::settle_all(&t.app.settler, 10)
        .await
        .unwrap();
    t.stop().await;
}

/// Item 13: a batch booked but not yet marked when another batch of the same user
/// writes the account snapshot: the Redis-only view still counts that token once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_only_view_never_counts_a_token_twice() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(8, 1, 100)]).await;
    let mut first = t.worker("first");
    let p = t
        .app
        .redis
        .partition_of(redpacket_wallet::domain::UserId::parse(8).unwrap());
    let options = redpacket_wallet::settle::worker::WorkerOptions {
        consumer: "crashing".into(),
        batch_size: 200,
        claim_idle: Duration::from_secs(60),
        stop_after_commit: true,
    };
    let mut crashing =
        redpacket_wallet::settle::worker::Worker::new(t.app.settler.clone(), options);
    crashing.try_execute_batch(p).await.unwrap();
    issue_all(&t, vec![award(8, 2, 50)]).await;
    first.try_execute_batch(p).await.unwrap();
    let (view, source) = t
        .app
        .wallet
        .view_from(redpacket_wallet::domain::UserId::parse(8).unwrap())
        .await
        .unwrap();
    assert_eq!(source, redpacket_wallet::wallet::ViewSource::Redis);
    assert_eq!(view.balance_cents, 150, "{view:?}");
    assert_eq!(view.total_income_cents, 150, "{view:?}");
    t.stop().await;
}
