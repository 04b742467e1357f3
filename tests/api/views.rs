//! Wallet views from Redis alone (issue 14, item 4): served from the account snapshot when
//! it proves exact, from MySQL otherwise, and exact either way (invariant 4) through
//! drains, withdrawals, reversals, a commit whose snapshot never came, trims and a Redis
//! restart.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redpacket_wallet::domain::{Cents, UserId, WithdrawalStatus};
use redpacket_wallet::ledger::{MoveOut, MovedOut};
use redpacket_wallet::tokens::Fence;
use redpacket_wallet::wallet::{ViewSource, WalletView};
use serde_json::{json, Value};

use crate::helpers::*;

fn user(id: i64) -> UserId {
    UserId::parse(id).unwrap()
}

async fn view(t: &TestApp, id: i64) -> (WalletView, ViewSource) {
    t.app.wallet.view_from(user(id)).await.unwrap()
}

/// The ledger's own figures for the user: balance, income, withdrawn.
async fn ledger_account(t: &TestApp, id: i64) -> (i64, i64, i64) {
    let sql =
        |col: &str| format!("SELECT COALESCE(MAX({col}), 0) FROM accounts WHERE user_id = {id}");
    (
        t.sql_i64(&sql("balance_cents")).await,
        t.sql_i64(&sql("total_income_cents")).await,
        t.sql_i64(&sql("withdrawn_cents")).await,
    )
}

async fn withdraw(t: &TestApp, id: i64, request: &str, cents: i64) -> Value {
    let (status, w) = t
        .post(
            "/v1/withdrawals",
            &t.jwt(id),
            &json!({"request_id": request, "amount_cents": cents}),
        )
        .await;
    assert_eq!(status, 201, "{w}");
    w
}

/// A withdrawal's debit of `cents` behind its fence, committed, and no mark after it:
/// what a crash between the commit and the mark leaves. Returns the fence, still up.
async fn debit_unmarked(t: &TestApp, id: i64, cents: i64, withdrawal: &str) -> Fence {
    let fence = t.app.tokens.fence(user(id)).await.unwrap();
    debit(t, id, cents, withdrawal).await;
    fence
}

/// A withdrawal's transaction, committed, with nothing written to Redis after it: its
/// forced settlement and its debit of `cents`.
async fn debit(t: &TestApp, id: i64, cents: i64, withdrawal: &str) {
    let mut tx = t.app.db.for_user(user(id)).begin().await.unwrap();
    let out = MoveOut {
        amount: Cents::positive(cents, "amount").unwrap(),
        kind: "withdraw",
        out_trade_no: &format!("wd_{withdrawal}"),
        at_ms: 1,
    };
    let moved = t
        .app
        .ledger
        .settle_and_move_out(&mut tx, user(id), &out)
        .await
        .unwrap();
    assert!(matches!(moved, MovedOut::Done(_)), "the balance covers it");
    tx.commit().await.unwrap();
}

/// The view reads the identity of the Redis data from INFO in its transaction; the
/// scripts that write snapshots take it from `run_id()` in Lua. The two must agree to
/// the byte, or no snapshot would ever prove a view (or, worse, one of another life
/// would): on the node that holds the user's slot, the Rust reading equals the script's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_identity_of_the_redis_data_is_the_one_scripts_write() {
    let t = spawn_app().await;
    let script = redis::Script::new(&format!(
        "{}\nreturn run_id()",
        redpacket_wallet::store::IDENTITY_LUA
    ));
    let mut conn = t.app.redis.conn();
    // Users of every partition (on a cluster, of every master).
    for id in 1..=2 * i64::from(t.app.redis.partitions()) {
        // A key in the user's slot routes the script to the node that holds it.
        let key = t.app.redis.status_key(user(id));
        let from_lua: String = script.key(&key).invoke_async(&mut conn).await.unwrap();
        let record = t.app.tokens.redis_record(user(id)).await.unwrap();
        assert_eq!(record.identity, from_lua, "user {id}");
        let (run_id, replid) = from_lua.split_once(':').unwrap();
        assert_eq!((run_id.len(), replid.len()), (40, 40), "{from_lua}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_come_from_redis_once_a_snapshot_proves_them_through_withdrawal_and_reversal() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, (0..5).map(|i| award(11, i, 100)).collect()).await;

    // No snapshot yet: only MySQL can say what is booked.
    let (v, source) = view(&t, 11).await;
    assert_eq!(source, ViewSource::Mysql);
    assert_eq!((v.balance_cents, v.pending_cents), (500, 500));

    t.drain().await;
    let (v, source) = view(&t, 11).await;
    assert_eq!(source, ViewSource::Redis, "the booking wrote the snapshot");
    assert_eq!(
        (v.balance_cents, v.booked_cents, v.pending_count),
        (500, 500, 0)
    );

    issue_all(&t, (5..8).map(|i| award(11, i, 10)).collect()).await;
    let (v, source) = view(&t, 11).await;
    assert_eq!(source, ViewSource::Redis);
    assert_eq!(
        (v.balance_cents, v.booked_cents, v.pending_cents),
        (530, 500, 30)
    );

    // A withdrawal books the pending tokens, debits, and its snapshot lifts its fence.
    let w = withdraw(&t, 11, "r1", 200).await;
    let (v, source) = view(&t, 11).await;
    assert_eq!(source, ViewSource::Redis, "{v:?}");
    assert_eq!(
        (
            v.balance_cents,
            v.booked_cents,
            v.pending_cents,
            v.withdrawn_cents
        ),
        (330, 330, 0, 200)
    );
    assert_eq!(ledger_account(&t, 11).await, (330, 530, 200));

    // A failed payout reverses it: fenced, then lifted by the reversal's snapshot.
    let id = w["withdrawal_id"].as_str().unwrap();
    t.app
        .withdrawals
        .settle_payout(id, WithdrawalStatus::Failed)
        .await
        .unwrap();
    let (v, source) = view(&t, 11).await;
    assert_eq!(source, ViewSource::Redis, "{v:?}");
    assert_eq!((v.balance_cents, v.withdrawn_cents), (530, 0));
    assert_eq!(ledger_account(&t, 11).await, (530, 530, 0));
    // The HTTP view answers the same.
    let w = t.wallet(11).await;
    assert_eq!(
        (w["balance_cents"].as_i64(), w["degraded"].as_bool()),
        (Some(530), None)
    );

    // A refused withdrawal (rolled back) leaves no fence behind.
    let (status, _) = t
        .post(
            "/v1/withdrawals",
            &t.jwt(11),
            &json!({"request_id": "r2", "amount_cents": 10_000}),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(view(&t, 11).await.1, ViewSource::Redis);
    t.stop().await;
}

/// A debit committed whose snapshot never reached Redis (the process died between the
/// commit and the mark): the fence put up before the transaction keeps the view on MySQL,
/// exact, until a snapshot read under the account lock lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_without_its_snapshot_keeps_the_views_on_mysql() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, (0..4).map(|i| award(12, i, 250)).collect()).await;
    t.drain().await;
    assert_eq!(view(&t, 12).await.1, ViewSource::Redis);

    let fence = debit_unmarked(&t, 12, 300, "crashed").await;
    // ... and no mark: the snapshot in Redis still says 1,000.

    let (v, source) = view(&t, 12).await;
    assert_eq!(source, ViewSource::Mysql);
    assert_eq!((v.balance_cents, v.withdrawn_cents), (700, 300));
    assert_eq!(t.wallet(12).await["balance_cents"], 700);

    t.app
        .ledger
        .refresh_snapshot(user(12), fence)
        .await
        .unwrap();
    let (v, source) = view(&t, 12).await;
    assert_eq!(source, ViewSource::Redis);
    assert_eq!((v.balance_cents, v.withdrawn_cents), (700, 300));
    t.stop().await;
}

/// A snapshot written before a Redis restart (restored from the AOF) may sit beside
/// rewound tokens: it is not trusted until a booking writes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_sends_views_to_mysql_until_a_booking_writes_the_snapshot_again() {
    let mut redis = PrivateRedis::start_with_aof();
    let t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, (0..3).map(|i| award(13, i, 100)).collect()).await;
    t.drain().await;
    assert_eq!(view(&t, 13).await.1, ViewSource::Redis);
    // Let everysec write the snapshot to the AOF, then kill -9 and start again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    redis.restart();

    let (v, source) = view_after_restart(&t, 13).await;
    let snapshot: std::collections::HashMap<String, String> = {
        let mut conn = t.app.redis.conn();
        redis::AsyncCommands::hgetall(&mut conn, t.app.redis.status_key(user(13)))
            .await
            .unwrap()
    };
    assert!(
        snapshot.contains_key("=s"),
        "the AOF kept the snapshot: {snapshot:?}"
    );
    assert_eq!(source, ViewSource::Mysql, "written by another Redis life");
    assert_eq!(v.balance_cents, 300);

    issue_all(&t, vec![award(13, 10, 5)]).await;
    t.drain().await;
    let (v, source) = view(&t, 13).await;
    assert_eq!(source, ViewSource::Redis);
    assert_eq!((v.balance_cents, v.pending_count), (305, 0));
    t.stop().await;
}

/// Waits for Redis to answer a view again after a restart.
async fn view_after_restart(t: &TestApp, id: i64) -> (WalletView, ViewSource) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match t.app.wallet.view_from(user(id)).await {
            Ok(answer) => return answer,
            Err(err) => {
                assert!(Instant::now() < deadline, "redis is back: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A booking's mark that arrives late, after a Redis restart, with an older snapshot
/// than the one the AOF kept, never replaces it: the view stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_older_snapshot_after_a_redis_restart_never_replaces_a_newer_one() {
    let mut redis = PrivateRedis::start_with_aof();
    let t = spawn_on(&redis).await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(14, 0, 100)]).await;
    t.drain().await;
    // A booking commits (version 2) and its mark is held back...
    issue_all(&t, vec![award(14, 1, 50)]).await;
    let pending = t.app.tokens.pending_of_users(&[user(14)]).await.unwrap();
    let late = t.app.ledger.book(&pending).await.unwrap();
    // ... while a later one commits and marks (version 3: 180 cents).
    issue_all(&t, vec![award(14, 2, 30)]).await;
    t.drain().await;
    assert_eq!(view(&t, 14).await.0.balance_cents, 180);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    redis.restart();
    view_after_restart(&t, 14).await;
    // The held mark lands in the new Redis life.
    t.app
        .tokens
        .mark(&late.to_mark, &late.snapshots(), &[])
        .await
        .unwrap();
    let (v, source) = view(&t, 14).await;
    assert_eq!(
        (v.balance_cents, v.pending_cents),
        (180, 0),
        "from {source:?}"
    );
    assert_eq!(ledger_account(&t, 14).await.0, 180);
    t.stop().await;
}

/// Redis loses everything (a flush) while a debit is in flight: its fence goes, the
/// debit commits and its mark has not come yet. A booking's mark that lands meanwhile,
/// older than the debit, must not be trusted, then or ever: the view stays exact (from
/// MySQL) until a snapshot written past the quiet period of the new Redis life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_written_after_redis_lost_a_fence_is_not_trusted_at_once() {
    let redis = PrivateRedis::start();
    let t = spawn_app_with(Options {
        redis_url: Some(redis.url()),
        env: vec![("RPW_WALLET__IDENTITY_QUIET_MS".into(), "1500".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(15, 0, 100)]).await;
    t.drain().await;
    issue_all(&t, vec![award(15, 1, 50)]).await;
    let pending = t.app.tokens.pending_of_users(&[user(15)]).await.unwrap();
    let late = t.app.ledger.book(&pending).await.unwrap();
    // A debit of 40 behind its fence, committed; then Redis loses everything.
    debit_unmarked(&t, 15, 40, "lost").await;
    redis.flushall().await;
    // The booking's late mark (150 cents, before the debit) lands in the empty Redis.
    t.app
        .tokens
        .mark(&late.to_mark, &late.snapshots(), &[])
        .await
        .unwrap();
    let (v, source) = view(&t, 15).await;
    assert_eq!(v.balance_cents, 110, "from {source:?}");
    assert_eq!(source, ViewSource::Mysql);
    // The debit's own mark never comes: once the quiet period is over, the snapshot
    // written early in it is still not trusted.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let (v, source) = view(&t, 15).await;
    assert_eq!(
        (v.balance_cents, source),
        (110, ViewSource::Mysql),
        "written early in the life"
    );
    // A snapshot written past the quiet period is trusted (the next booking's, read
    // under the account lock, with the debit in it).
    issue_all(&t, vec![award(15, 2, 5)]).await;
    t.drain().await;
    let (v, source) = view(&t, 15).await;
    assert_eq!((v.balance_cents, source), (115, ViewSource::Redis));
    t.stop().await;
}

/// Settled tokens trimmed from Redis are in the snapshot; the pending ones are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_tokens_leave_the_redis_view_exact() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_WALLET__SETTLED_RETENTION_SECS".into(), "0".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, (0..20).map(|i| award(14, i, 10)).collect()).await;
    t.drain().await;
    issue_all(&t, (20..23).map(|i| award(14, i, 10)).collect()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(t.app.jobs.housekeeping().await.unwrap(), 20);
    let (v, source) = view(&t, 14).await;
    assert_eq!(source, ViewSource::Redis);
    assert_eq!(
        (
            v.balance_cents,
            v.booked_cents,
            v.pending_cents,
            v.pending_count
        ),
        (230, 200, 30, 3)
    );
    t.stop().await;
}

/// Withdrawals, a live drain and views of one user at once: every view is the ledger
/// plus pending at some moment — income is all that was issued, balance is income less
/// what was withdrawn, and what was withdrawn lies between the withdrawals answered
/// before the view began and those sent before it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_stay_exact_while_withdrawals_and_the_drain_run() {
    let t = Arc::new(
        spawn_app_with(Options {
            worker: true,
            env: vec![
                // A drain of about four seconds, for views to catch it in the middle.
                ("RPW_SETTLE__MAX_TPS".into(), "100".into()),
                ("RPW_SETTLE__BATCH_SIZE".into(), "20".into()),
            ],
            ..Default::default()
        })
        .await,
    );
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    let issued: i64 = (0..400).map(|i| 1 + i % 50).sum();
    // The drain starts once every award is issued.
    t.pause_booking(true).await;
    issue_all(&t, (0..400).map(|i| award(15, i, 1 + i % 50)).collect()).await;
    t.pause_booking(false).await;

    let started = Arc::new(AtomicI64::new(0));
    let answered = Arc::new(AtomicI64::new(0));
    let mut from_redis = 0;
    let mut views = 0;
    let mut check = |v: WalletView, source: ViewSource, before: i64, after: i64| {
        views += 1;
        if source == ViewSource::Redis {
            from_redis += 1;
        }
        assert_eq!(v.total_income_cents, issued, "{v:?}");
        assert_eq!(v.balance_cents, issued - v.withdrawn_cents, "{v:?}");
        assert_eq!(v.booked_cents + v.pending_cents, v.balance_cents, "{v:?}");
        assert!(
            (before..=after).contains(&v.withdrawn_cents),
            "withdrawn {} outside [{before}, {after}] ({source:?})",
            v.withdrawn_cents
        );
    };
    // The drain alone first: views come from Redis once a booking wrote the snapshot.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (v, source) = view(&t, 15).await;
        check(v, source, 0, 0);
        if source == ViewSource::Redis && v.booked_cents > 0 && v.pending_cents > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a mid-drain view from redis: {v:?}"
        );
    }
    let mut tasks = Vec::new();
    for task in 0..4 {
        let (t, started, answered) = (t.clone(), started.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..6 {
                started.fetch_add(100, Ordering::SeqCst);
                withdraw(&t, 15, &format!("w{task}_{i}"), 100).await;
                answered.fetch_add(100, Ordering::SeqCst);
            }
        }));
    }
    while tasks.iter().any(|h| !h.is_finished()) {
        let before = answered.load(Ordering::SeqCst);
        let (v, source) = view(&t, 15).await;
        check(v, source, before, started.load(Ordering::SeqCst));
    }
    for h in tasks {
        h.await.unwrap();
    }
    // Every fence is down once the withdrawals answered: Redis again.
    let (v, source) = view(&t, 15).await;
    check(v, source, 2_400, 2_400);
    assert_eq!(source, ViewSource::Redis);
    eprintln!("{from_redis} of {views} views from redis");
    Arc::into_inner(t).unwrap().stop().await;
}

/// Moves the user's snapshot out of the status hash into the layout of earlier releases
/// (`acct:`, names without `=`, the identity in full), as an instance of one wrote it.
async fn as_legacy(t: &TestApp, id: i64) {
    let record = t.app.tokens.redis_record(user(id)).await.unwrap();
    assert!(record.snapshot.contains_key("v"), "{:?}", record.snapshot);
    let mut legacy = record.snapshot.clone();
    let age = legacy.remove("age").unwrap();
    legacy.insert("rid".into(), record.identity.clone());
    legacy.insert("wr".into(), record.identity.clone());
    legacy.insert("rs".into(), "1000".into());
    legacy.insert(
        "wt".into(),
        (1000 + age.parse::<i64>().unwrap()).to_string(),
    );
    let in_status = vec!["=s", "=r"];
    let legacy: Vec<(String, String)> = legacy.into_iter().collect();
    let mut conn = t.app.redis.conn();
    let _: () = redis::AsyncCommands::hdel(&mut conn, t.app.redis.status_key(user(id)), in_status)
        .await
        .unwrap();
    let _: () = redis::AsyncCommands::hset_multiple(
        &mut conn,
        t.app.redis.legacy_snapshot_key(user(id)),
        &legacy,
    )
    .await
    .unwrap();
}

async fn legacy_fields(t: &TestApp, id: i64) -> std::collections::HashMap<String, String> {
    let mut conn = t.app.redis.conn();
    redis::AsyncCommands::hgetall(&mut conn, t.app.redis.legacy_snapshot_key(user(id)))
        .await
        .unwrap()
}

/// The snapshot lives in the status hash, which stays in Redis's compact encoding. A
/// user whose snapshot is still in the layout of earlier releases (`acct:`) is viewed
/// from MySQL, exact, until the next mark moves it: then from Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_the_earlier_layout_keeps_views_on_mysql_until_a_mark_moves_it() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(16, 0, 100)]).await;
    t.drain().await;
    assert_eq!(view(&t, 16).await.1, ViewSource::Redis);
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(t.app.redis.status_key(user(16)))
        .query_async(&mut t.app.redis.conn())
        .await
        .unwrap();
    assert!(
        encoding == "listpack" || encoding == "ziplist",
        "{encoding}"
    );

    as_legacy(&t, 16).await;
    let (v, source) = view(&t, 16).await;
    assert_eq!((v.balance_cents, source), (100, ViewSource::Mysql));
    issue_all(&t, vec![award(16, 1, 50)]).await;
    let (v, source) = view(&t, 16).await;
    assert_eq!(
        (v.balance_cents, v.pending_cents, source),
        (150, 50, ViewSource::Mysql)
    );

    t.drain().await;
    assert!(legacy_fields(&t, 16).await.is_empty(), "moved and deleted");
    let (v, source) = view(&t, 16).await;
    assert_eq!(
        (v.balance_cents, v.pending_cents, source),
        (150, 0, ViewSource::Redis)
    );
    t.stop().await;
}

/// An earlier release's mark stored a newer snapshot (in `acct:`) than a late mark of
/// this release brings: the late one moves the newer one into the status hash instead of
/// writing its own, and the view stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_mark_keeps_a_newer_snapshot_of_the_earlier_layout() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(17, 0, 100)]).await;
    t.drain().await;
    // A booking commits (version 2) and its mark is held back...
    issue_all(&t, vec![award(17, 1, 50)]).await;
    let pending = t.app.tokens.pending_of_users(&[user(17)]).await.unwrap();
    let late = t.app.ledger.book(&pending).await.unwrap();
    // ... while a later one commits and an earlier release marks it (version 3).
    issue_all(&t, vec![award(17, 2, 30)]).await;
    t.drain().await;
    as_legacy(&t, 17).await;
    assert_eq!(view(&t, 17).await.0.balance_cents, 180);

    t.app
        .tokens
        .mark(&late.to_mark, &late.snapshots(), &[])
        .await
        .unwrap();
    assert!(legacy_fields(&t, 17).await.is_empty());
    let (v, source) = view(&t, 17).await;
    assert_eq!(
        (v.balance_cents, v.pending_cents, source),
        (180, 0, ViewSource::Redis)
    );
    assert_eq!(ledger_account(&t, 17).await.0, 180);
    t.stop().await;
}

/// A fence an earlier release put up in `acct:` (its withdrawal is in flight) stays
/// where that release will lift it: marks of this release leave that hash alone, and
/// views stay on MySQL, exact, until it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_of_the_earlier_layout_keeps_views_on_mysql() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(18, 0, 100)]).await;
    t.drain().await;
    as_legacy(&t, 18).await;
    // The earlier release's withdrawal: its fence, then its debit commits, unmarked.
    let mut conn = t.app.redis.conn();
    let acct = t.app.redis.legacy_snapshot_key(user(18));
    let _: () = redis::AsyncCommands::hset(&mut conn, &acct, "f:old", 1)
        .await
        .unwrap();
    debit(&t, 18, 40, "old").await;

    issue_all(&t, vec![award(18, 1, 5)]).await;
    t.drain().await;
    assert!(
        legacy_fields(&t, 18).await.contains_key("f:old"),
        "left alone"
    );
    let (v, source) = view(&t, 18).await;
    assert_eq!((v.balance_cents, source), (65, ViewSource::Mysql));

    // That release lifts its fence (its snapshot stays behind it, older than ours).
    let _: () = redis::AsyncCommands::hdel(&mut conn, &acct, "f:old")
        .await
        .unwrap();
    assert_eq!(
        view(&t, 18).await.1,
        ViewSource::Mysql,
        "acct: is still there"
    );
    issue_all(&t, vec![award(18, 2, 1)]).await;
    t.drain().await;
    assert!(legacy_fields(&t, 18).await.is_empty());
    let (v, source) = view(&t, 18).await;
    assert_eq!((v.balance_cents, source), (66, ViewSource::Redis));
    t.stop().await;
}

/// In compat mode a fence is put up in the status hash and mirrored in `acct:`, where
/// views of earlier releases look; taking it down, or the mark that lifts it, clears
/// both. Outside compat mode it goes in the status hash only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_in_compat_mode_is_mirrored_where_earlier_releases_look() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_WALLET__SNAPSHOT_COMPAT".into(), "true".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(19, 0, 100)]).await;
    t.drain().await;
    let fenced = |fence: &Fence| format!("f:{}", fence.0);
    let fence = t.app.tokens.fence(user(19)).await.unwrap();
    let record = t.app.tokens.redis_record(user(19)).await.unwrap();
    assert!(record.snapshot.contains_key(&fenced(&fence)));
    assert!(legacy_fields(&t, 19).await.contains_key(&fenced(&fence)));
    assert_eq!(view(&t, 19).await.1, ViewSource::Mysql);
    t.app.tokens.unfence(user(19), &fence).await.unwrap();
    assert!(!legacy_fields(&t, 19).await.contains_key(&fenced(&fence)));
    assert_eq!(view(&t, 19).await.1, ViewSource::Redis);

    let fence = t.app.tokens.fence(user(19)).await.unwrap();
    t.app
        .ledger
        .refresh_snapshot(user(19), fence.clone())
        .await
        .unwrap();
    let legacy = legacy_fields(&t, 19).await;
    assert!(!legacy.contains_key(&fenced(&fence)), "{legacy:?}");
    assert_eq!(legacy.get("b").map(String::as_str), Some("100"));
    let (v, source) = view(&t, 19).await;
    assert_eq!((v.balance_cents, source), (100, ViewSource::Redis));
    t.stop().await;

    // Outside compat mode: the status hash only.
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(19, 0, 100)]).await;
    t.drain().await;
    let fence = t.app.tokens.fence(user(19)).await.unwrap();
    assert!(legacy_fields(&t, 19).await.is_empty());
    assert_eq!(view(&t, 19).await.1, ViewSource::Mysql);
    t.app.tokens.unfence(user(19), &fence).await.unwrap();
    assert_eq!(view(&t, 19).await.1, ViewSource::Redis);
    t.stop().await;
}

/// An instance of the earlier release: its mark.lua (kept as a fixture, byte for byte)
/// and its view's rule, which reads only `acct:`.
struct EarlierRelease {
    mark: redis::Script,
}

impl EarlierRelease {
    fn new() -> Self {
        Self {
            mark: redis::Script::new(&format!(
                "{}\n{}",
                redpacket_wallet::store::IDENTITY_LUA,
                include_str!("fixtures/mark_before_status_snapshots.lua")
            )),
        }
    }

    /// Marks `entries` settled and stores `snapshots` as that release's worker does.
    async fn mark(
        &self,
        t: &TestApp,
        entries: &[redpacket_wallet::tokens::AwardEntry],
        snapshots: &[redpacket_wallet::tokens::Snapshot],
    ) {
        let redis = &t.app.redis;
        let user = entries
            .first()
            .map(|e| e.user)
            .unwrap_or_else(|| snapshots[0].user);
        let p = redis.partition_of(user);
        // A counters hash of this deployment in the user's slot (the test reads none of it).
        let counters = format!("{}:earlier-counters", redis.status_key(user));
        let mut keys = vec![redis.settled_index_key(p), redis.stream_key(p)];
        keys.extend(entries.iter().map(|e| redis.status_key(e.user)));
        keys.push(counters);
        keys.extend(snapshots.iter().map(|s| redis.legacy_snapshot_key(s.user)));
        keys.push(redis.life_key(p));
        let mut args: Vec<String> = vec![
            "0".into(),
            "settle".into(),
            entries.len().to_string(),
            snapshots.len().to_string(),
            "0".into(),
            "1".into(),
            "1".into(),
            (3 + entries.len()).to_string(),
            "2026010100".into(),
            "g1".into(),
        ];
        for e in entries {
            args.push(e.out_trade_no.clone());
            args.push(format!("{}|{}", e.user, e.out_trade_no));
            args.push(e.amount_cents.to_string());
            args.push("1".into());
        }
        for s in snapshots {
            args.push(s.version.to_string());
            args.push(s.balance_cents.to_string());
            args.push(s.total_income_cents.to_string());
            args.push(s.withdrawn_cents.to_string());
            args.push(s.lifts.clone().unwrap_or_default());
        }
        let mut invocation = self.mark.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        for a in &args {
            invocation.arg(a);
        }
        let _: i64 = invocation
            .invoke_async(&mut t.app.redis.conn())
            .await
            .unwrap();
    }

    /// The balance that release's view shows from Redis alone, when its rule trusts the
    /// snapshot (`acct:` written in this Redis life by its mark, no fence): the snapshot's
    /// balance plus the pending tokens. `None`: it would ask MySQL.
    async fn redis_view(&self, t: &TestApp, id: i64) -> Option<i64> {
        let record = t.app.tokens.redis_record(user(id)).await.unwrap();
        let acct = legacy_fields(t, id).await;
        let trusted = acct.get("rid") == Some(&record.identity)
            && acct.get("wr") == Some(&record.identity)
            && acct.contains_key("v")
            && !acct.keys().any(|k| k.starts_with("f:"));
        let pending: i64 = record.pending.iter().map(|e| e.amount_cents).sum();
        trusted.then(|| acct["b"].parse::<i64>().unwrap() + pending)
    }
}

/// A rolling upgrade: instances of the earlier release (which keep the snapshot in
/// `acct:` and read only that) run beside this one in compat mode. Marks of either,
/// in either order, a late one among them, and a fence given up: the views of both
/// releases stay exact (equal to the ledger's balance plus pending) whenever they come
/// from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_compat_mode_views_of_both_releases_stay_exact() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_WALLET__SNAPSHOT_COMPAT".into(), "true".into())],
        ..Default::default()
    })
    .await;
    let earlier = EarlierRelease::new();
    t.open_activity("cny2027", 100_000, 1_000).await;
    // `expected`: what was issued less what was withdrawn, which the ledger's balance
    // plus the tokens it has not booked yet add up to.
    let both_exact = |label: &'static str, expected: i64| {
        let t = &t;
        let earlier = &earlier;
        async move {
            let (v, source) = view(t, 20).await;
            assert_eq!(
                v.balance_cents, expected,
                "{label}: this release ({source:?})"
            );
            if let Some(balance) = earlier.redis_view(t, 20).await {
                assert_eq!(balance, expected, "{label}: the earlier release");
            }
            source
        }
    };

    // This release books and marks: both layouts hold the snapshot.
    issue_all(&t, vec![award(20, 0, 100)]).await;
    t.drain().await;
    assert_eq!(both_exact("first booking", 100).await, ViewSource::Redis);
    assert_eq!(earlier.redis_view(&t, 20).await, Some(100));

    // A booking whose mark is held back (version 2), then one this release marks (3).
    issue_all(&t, vec![award(20, 1, 50)]).await;
    let pending = t.app.tokens.pending_of_users(&[user(20)]).await.unwrap();
    let late = t.app.ledger.book(&pending).await.unwrap();
    both_exact("booked, not marked", 150).await;
    issue_all(&t, vec![award(20, 2, 30)]).await;
    t.drain().await;
    assert_eq!(earlier.redis_view(&t, 20).await, Some(180));
    // The held mark lands late, from an earlier-release instance: it changes nothing.
    earlier.mark(&t, &late.to_mark, &late.snapshots()).await;
    assert_eq!(
        both_exact("late earlier mark", 180).await,
        ViewSource::Redis
    );
    assert_eq!(earlier.redis_view(&t, 20).await, Some(180));

    // An earlier-release instance books and marks (version 4): only `acct:` gets it.
    issue_all(&t, vec![award(20, 3, 7)]).await;
    let pending = t.app.tokens.pending_of_users(&[user(20)]).await.unwrap();
    let booked = t.app.ledger.book(&pending).await.unwrap();
    earlier.mark(&t, &booked.to_mark, &booked.snapshots()).await;
    let (v, source) = view(&t, 20).await;
    assert_eq!(
        (v.balance_cents, source),
        (187, ViewSource::Redis),
        "the newer one"
    );
    both_exact("earlier release's mark", 187).await;

    // A withdrawal of this release is fenced in both layouts, then given up.
    let fence = t.app.tokens.fence(user(20)).await.unwrap();
    assert!(legacy_fields(&t, 20)
        .await
        .contains_key(&format!("f:{}", fence.0)));
    assert_eq!(earlier.redis_view(&t, 20).await, None, "fenced");
    assert_eq!(both_exact("fenced", 187).await, ViewSource::Mysql);
    t.app.tokens.unfence(user(20), &fence).await.unwrap();
    assert_eq!(both_exact("fence given up", 187).await, ViewSource::Redis);
    assert_eq!(earlier.redis_view(&t, 20).await, Some(187));

    // And a withdrawal that happens: its snapshot lifts the fence in both.
    withdraw(&t, 20, "w1", 87).await;
    assert_eq!(both_exact("withdrawn", 100).await, ViewSource::Redis);
    assert_eq!(earlier.redis_view(&t, 20).await, Some(100));
    t.stop().await;
}

/// After MySQL is restored from a backup, `forget-snapshots` takes every snapshot out of
/// Redis (they may be ahead of the ledger): views read MySQL until the next booking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_snapshots_send_views_to_mysql_until_the_next_booking() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(21, 0, 100), award(22, 0, 40)]).await;
    t.drain().await;
    assert_eq!(view(&t, 21).await.1, ViewSource::Redis);
    let fence = t.app.tokens.fence(user(22)).await.unwrap();
    let (statuses, _) = t.app.redis.forget_snapshots().await.unwrap();
    assert!(statuses >= 2, "{statuses}");
    let (v, source) = view(&t, 21).await;
    assert_eq!((v.balance_cents, source), (100, ViewSource::Mysql));
    let record = t.app.tokens.redis_record(user(22)).await.unwrap();
    assert!(!record.snapshot.contains_key("v"));
    assert!(
        record.snapshot.contains_key(&format!("f:{}", fence.0)),
        "fences stay"
    );
    issue_all(&t, vec![award(21, 1, 5)]).await;
    t.drain().await;
    let (v, source) = view(&t, 21).await;
    assert_eq!((v.balance_cents, source), (105, ViewSource::Redis));
    t.stop().await;
}

/// `move-snapshots`, once only this release runs: every snapshot still in `acct:` is
/// written again from the account into the status hash and the old hash goes, so those
/// users' views come back to Redis at once; one holding a fence is left to its release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_earlier_layout_brings_views_back_to_redis() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(23, 0, 100), award(24, 0, 60)]).await;
    t.drain().await;
    as_legacy(&t, 23).await;
    as_legacy(&t, 24).await;
    let mut conn = t.app.redis.conn();
    let acct = t.app.redis.legacy_snapshot_key(user(24));
    let _: () = redis::AsyncCommands::hset(&mut conn, &acct, "f:old", 1)
        .await
        .unwrap();
    issue_all(&t, vec![award(23, 1, 5)]).await;
    assert_eq!(view(&t, 23).await.1, ViewSource::Mysql);

    let (moved, left) = t.app.ledger.move_legacy_snapshots().await.unwrap();
    assert_eq!((moved, left), (1, 1));
    assert!(legacy_fields(&t, 23).await.is_empty());
    let (v, source) = view(&t, 23).await;
    assert_eq!(
        (v.balance_cents, v.pending_cents, source),
        (105, 5, ViewSource::Redis)
    );
    assert!(legacy_fields(&t, 24).await.contains_key("f:old"));
    let (v, source) = view(&t, 24).await;
    assert_eq!((v.balance_cents, source), (60, ViewSource::Mysql));
    t.stop().await;
}
