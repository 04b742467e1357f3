use std::collections::HashMap;

use futures::future::join_all;
use redpacket_wallet::domain::UserId;
use redpacket_wallet::settle::worker::{Outcome, Worker, WorkerOptions};
use serde_json::{json, Value};

use crate::helpers::*;

/// `POST /v1/withdrawals` as the JWT's user.
async fn withdraw(t: &TestApp, jwt: &str, request_id: &str, amount_cents: i64) -> (u16, Value) {
    let body = json!({"request_id": request_id, "amount_cents": amount_cents});
    t.post("/v1/withdrawals", jwt, &body).await
}

/// The payout channel's verdict on a withdrawal, posted with `caller_key`.
async fn payout(t: &TestApp, caller_key: &str, id: &str, status: &str) -> (u16, Value) {
    let path = format!("/v1/withdrawals/{id}/result");
    t.post(&path, caller_key, &json!({ "status": status }))
        .await
}

async fn balances(t: &TestApp) -> HashMap<i64, i64> {
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT user_id, balance_cents FROM accounts")
        .fetch_all(t.app.db.main())
        .await
        .unwrap();
    rows.into_iter().collect()
}

async fn ledger_awards(t: &TestApp) -> (i64, i64) {
    sqlx::query_as("SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE kind = 'award'")
        .fetch_one(t.app.db.main())
        .await
        .unwrap()
}

/// Tokens waiting in the settlement streams (an entry carries every token one store
/// call stored).
async fn backlog(t: &TestApp) -> u64 {
    let mut conn = t.app.redis.conn();
    let mut total = 0;
    for p in 0..t.app.redis.partitions() {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(t.app.redis.stream_key(p))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        for id in &reply.ids {
            total += redpacket_wallet::tokens::status::parse_entry(id)
                .expect("a settlement entry")
                .len() as u64;
        }
    }
    total
}

/// Marking reads and flips a user's tokens together: 300 tokens of one user (more than
/// one read of mark.lua takes) and five of another, in one call, with one token named
/// twice in the same read and one named again in a later read, each go to settled once,
/// keep their amounts, and the settled counters count each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_of_many_tokens_of_one_user_counts_each_once() {
    let t = spawn_app().await;
    let (u, other) = (UserId::parse(21).unwrap(), UserId::parse(22).unwrap());
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    issue_all(&t, (0..300).map(|r| award(21, r, 1 + r % 7)).collect()).await;
    issue_all(&t, (0..5).map(|r| award(22, r, 10 + r)).collect()).await;
    let pending = t.app.tokens.pending_of_users(&[u]).await.unwrap();
    assert_eq!(pending.len(), 300);
    let booked = t.app.ledger.book(&pending).await.unwrap();
    let others = t.app.tokens.pending_of_users(&[other]).await.unwrap();
    let booked_others = t.app.ledger.book(&others).await.unwrap();
    let mut to_mark = booked.to_mark.clone();
    // Named again in a later read (the first read takes 256), and in the same read.
    to_mark.push(to_mark[7].clone());
    to_mark.push(to_mark[299].clone());
    to_mark.extend(booked_others.to_mark.iter().cloned());
    let mut snapshots = booked.snapshots();
    snapshots.extend(booked_others.snapshots());
    let cents: i64 = pending.iter().chain(&others).map(|e| e.amount_cents).sum();
    let changed = t.app.tokens.mark(&to_mark, &snapshots, &[]).await.unwrap();
    assert_eq!(changed, 305);
    let left = t.app.tokens.pending_of_users(&[u, other]).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    // Settled, each with its amount (the rest of the status value is kept).
    let mut settled = t.app.tokens.statuses_of(u).await.unwrap();
    settled.extend(t.app.tokens.statuses_of(other).await.unwrap());
    assert_eq!(settled.len(), 305);
    assert!(settled.iter().all(|s| !s.pending));
    let settled_cents: i64 = settled.iter().map(|s| s.entry.amount_cents).sum();
    assert_eq!(settled_cents, cents);
    let counters = t.app.tokens.counters("cny2027").await.unwrap();
    let counted = counters.hours.values().fold((0, 0), |(n, c), h| {
        (n + h.settled.count, c + h.settled.cents)
    });
    assert_eq!(counted, (305, cents));
    // Marked again, nothing changes.
    let again = t.app.tokens.mark(&to_mark, &[], &[]).await.unwrap();
    assert_eq!(again, 0);
    let counters = t.app.tokens.counters("cny2027").await.unwrap();
    let counted: i64 = counters.hours.values().map(|h| h.settled.count).sum();
    assert_eq!(counted, 305);
    assert_eq!(t.wallet(21).await["pending_count"], 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_ack_credits_each_token_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    let awards: Vec<Value> = (0..40).map(|i| award(1 + i % 4, i, 10 + i)).collect();
    let total: i64 = (0..40).map(|i| 10 + i).sum();
    issue_all(&t, awards).await;

    let worker = |consumer: &str, claim_idle_ms: u64, stop_after_commit: bool| {
        Worker::new(
            t.app.settler.clone(),
            WorkerOptions {
                consumer: consumer.into(),
                batch_size: 500,
                claim_idle: std::time::Duration::from_millis(claim_idle_ms),
                stop_after_commit,
            },
        )
    };
    let mut crashing = worker("doomed", 3_600_000, true);
    for p in 0..t.app.redis.partitions() {
        let outcome = crashing.try_execute_batch(p).await.unwrap();
        assert!(
            matches!(outcome, Outcome::StoppedAfterCommit { .. } | Outcome::Empty),
            "{outcome:?}"
        );
    }
    drop(crashing);
    // Committed, not acknowledged: the ledger has every token, Redis still calls them pending.
    assert_eq!(ledger_awards(&t).await, (40, total));
    assert_eq!(backlog(&t).await, 40);

    // Another consumer takes the dead one's entries over and books them again: no-ops.
    let mut rescuer = worker("rescuer", 0, false);
    let mut redelivered = 0;
    for p in 0..t.app.redis.partitions() {
        if let Outcome::Booked {
            entries,
            newly_booked,
        } = rescuer.try_execute_batch(p).await.unwrap()
        {
            assert_eq!(newly_booked, 0, "redelivery books nothing new");
            redelivered += entries;
        }
    }
    assert_eq!(redelivered, 40);
    assert_eq!(ledger_awards(&t).await, (40, total));
    assert_eq!(balances(&t).await.values().sum::<i64>(), total);
    assert_eq!(backlog(&t).await, 0);
    for u in 1..=4 {
        let w = t.wallet(u).await;
        assert_eq!(w["pending_count"], 0, "{w}");
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_book_five_thousand_tokens_exactly_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let awards: Vec<Value> = (0..5_000)
        .map(|i| award(1 + i % 97, i, 1 + i % 50))
        .collect();
    let total: i64 = (0..5_000).map(|i| 1 + i % 50).sum();
    let mut expected: HashMap<i64, i64> = HashMap::new();
    for i in 0..5_000 {
        *expected.entry(1 + i % 97).or_default() += 1 + i % 50;
    }
    issue_all(&t, awards).await;
    let run = |name: &'static str| {
        let mut w = t.worker(name);
        let partitions = t.app.redis.partitions();
        async move {
            let mut booked = 0;
            let mut idle_rounds = 0;
            while idle_rounds < 3 {
                let mut any = false;
                for p in 0..partitions {
                    if let Outcome::Booked { newly_booked, .. } =
                        w.try_execute_batch(p).await.unwrap()
                    {
                        booked += newly_booked;
                        any = true;
                    }
                }
                idle_rounds = if any { 0 } else { idle_rounds + 1 };
            }
            booked
        }
    };
    let booked: Vec<usize> = join_all([run("w1"), run("w2")]).await;
    assert_eq!(booked.iter().sum::<usize>(), 5_000, "{booked:?}");
    assert!(
        booked.iter().all(|b| *b > 0),
        "both workers took part: {booked:?}"
    );
    assert_eq!(ledger_awards(&t).await, (5_000, total));
    assert_eq!(balances(&t).await, expected);
    assert_eq!(backlog(&t).await, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_racing_the_worker_credits_each_token_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let user = 77;
    let awards: Vec<Value> = (0..300).map(|i| award(user, i, 5)).collect();
    issue_all(&t, awards).await;
    let jwt = t.jwt(user);
    let worker = async {
        let mut w = t.worker("racer");
        for _ in 0..5 {
            for p in 0..t.app.redis.partitions() {
                w.try_execute_batch(p).await.unwrap();
            }
        }
    };
    let withdrawal = withdraw(&t, &jwt, "race-1", 700);
    let (_, (status, body)) = tokio::join!(worker, withdrawal);
    assert_eq!(status, 201, "{body}");
    t.drain().await;
    let (count, sum) = ledger_awards(&t).await;
    assert_eq!((count, sum), (300, 1_500));
    assert_eq!(balances(&t).await[&user], 1_500 - 700);
    let w = t.wallet(user).await;
    assert_eq!(w["balance_cents"], 800);
    assert_eq!(w["withdrawn_cents"], 700);
    assert_eq!(w["total_income_cents"], 1_500);
    t.stop().await;
}

/// A withdrawal over tokens the ledger holds but Redis still calls pending (a worker
/// committed them and died before marking): it credits only the tokens the ledger does
/// not hold, checks the balance against what is really there, and a refusal changes
/// nothing. The same for a red packet sent over such tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_over_tokens_booked_but_unmarked_counts_them_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    let (user, sender) = (81, 82);
    // Awards `rounds` of 10 cents to each of the two.
    let to_both = |rounds: std::ops::Range<i64>| -> Vec<Value> {
        rounds
            .flat_map(|i| [award(user, i, 10), award(sender, i, 10)])
            .collect()
    };
    issue_all(&t, to_both(0..10)).await;
    let mut doomed = Worker::new(
        t.app.settler.clone(),
        WorkerOptions {
            consumer: "doomed".into(),
            batch_size: 500,
            claim_idle: std::time::Duration::from_secs(3600),
            stop_after_commit: true,
        },
    );
    for p in 0..t.app.redis.partitions() {
        doomed.try_execute_batch(p).await.unwrap();
    }
    drop(doomed);
    issue_all(&t, to_both(10..13)).await;
    // Booked 100 cents each, 30 more pending: 130 to spend, not 230.
    assert_eq!(ledger_awards(&t).await, (20, 200));
    let jwt = t.jwt(user);
    let (status, err) = withdraw(&t, &jwt, "too-much", 200).await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_balance");
    // A refusal writes nothing: no ledger row, no withdrawal, the account as the worker
    // left it.
    let moves = "SELECT COUNT(*) FROM ledger_entries WHERE kind <> 'award'";
    assert_eq!(ledger_awards(&t).await, (20, 200));
    assert_eq!(t.sql_i64(moves).await, 0);
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM withdrawals").await, 0);
    assert_eq!(balances(&t).await[&user], 100);
    let (status, body) = withdraw(&t, &jwt, "fits", 120).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["forced_settled_count"], 3);
    assert_eq!(body["balance_cents"], 10);
    assert_eq!(balances(&t).await[&user], 10);
    let w = t.wallet(user).await;
    assert_eq!(
        (
            &w["balance_cents"],
            &w["pending_count"],
            &w["withdrawn_cents"],
            &w["total_income_cents"]
        ),
        (&json!(10), &json!(0), &json!(120), &json!(130)),
        "{w}"
    );

    let sender_jwt = t.jwt(sender);
    let packet = |request: &str, total: i64| json!({"request_id": request, "total_cents": total, "shares": 2, "greeting": "hi"});
    let (status, err) = t
        .post("/v1/packets", &sender_jwt, &packet("big", 131))
        .await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["code"], "insufficient_balance");
    assert_eq!(ledger_awards(&t).await, (23, 230));
    assert_eq!(t.sql_i64(moves).await, 1, "the withdrawal's row only");
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM packets").await, 0);
    assert_eq!(balances(&t).await[&sender], 100);
    // The refused request id is free: with an amount that fits, it sends.
    let (status, sent) = t
        .post("/v1/packets", &sender_jwt, &packet("big", 130))
        .await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(balances(&t).await[&sender], 0);
    // Its repeat is the same packet, though the balance no longer covers it; another
    // packet is refused.
    let (status, again) = t
        .post("/v1/packets", &sender_jwt, &packet("big", 130))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["packet_id"], sent["packet_id"]);
    let (status, err) = t.post("/v1/packets", &sender_jwt, &packet("more", 2)).await;
    assert_eq!(status, 409, "{err}");
    // Every token once in the ledger; the dead worker's entries book nothing more.
    t.drain().await;
    assert_eq!(ledger_awards(&t).await, (26, 260));
    assert_eq!(balances(&t).await[&user], 10);
    assert_eq!(balances(&t).await[&sender], 0);
    t.stop().await;
}

/// The statement form for MySQL 8 (no `INSERT … RETURNING`: the accounts are read
/// with a `SELECT … FOR UPDATE` after the insert), run on MariaDB: new batches, a
/// forced settlement, and a batch holding tokens booked meanwhile book every token once
/// and leave balances and views exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mysql_8_statement_form_books_each_token_once() {
    let t = spawn_app().await;
    t.app.db.set_returning(false);
    let mut conn = t.app.db.main().acquire().await.unwrap();
    assert!(!t.app.db.returning(0, &mut conn).await.unwrap());
    drop(conn);
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    // Enough users that a partition's batch holds several of them.
    let users: Vec<i64> = (100..164).collect();
    let awards: Vec<Value> = users
        .iter()
        .flat_map(|u| (0..6).map(move |i| award(*u, i, 7)))
        .collect();
    issue_all(&t, awards).await;
    // A withdrawal races the worker: its forced settlement and the worker's batches
    // meet the same tokens, in either order.
    let jwt = t.jwt(100);
    let worker = async {
        let mut w = t.worker("mysql8");
        for p in 0..t.app.redis.partitions() {
            w.try_execute_batch(p).await.unwrap();
        }
    };
    let (_, (status, body)) = tokio::join!(worker, withdraw(&t, &jwt, "m8-1", 40));
    assert_eq!(status, 201, "{body}");
    t.drain().await;
    assert_eq!(ledger_awards(&t).await, (64 * 6, 64 * 42));
    let b = balances(&t).await;
    for u in &users {
        let expected = if *u == 100 { 42 - 40 } else { 42 };
        assert_eq!(b[u], expected, "user {u}");
        let w = t.wallet(*u).await;
        assert_eq!(w["total_income_cents"], 42, "user {u}: {w}");
        assert_eq!(w["balance_cents"], expected, "user {u}: {w}");
        assert_eq!(w["pending_cents"], 0, "user {u}: {w}");
    }
    t.stop().await;
}

/// Shards may run different servers (buckets moving from a MySQL 8 shard to a MariaDB
/// one): each shard's statement form is asked of its own server. Here shard 1 books in
/// the MySQL 8 form while shard 0 keeps `INSERT … RETURNING`; batches, forced
/// settlements racing the worker and withdrawals on both book every token once and
/// leave balances and views exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_books_in_its_own_servers_statement_form() {
    let t = spawn_two_shards().await;
    t.app.db.set_returning_on(1, false);
    let mut conn = t.app.db.shard(0).acquire().await.unwrap();
    assert!(
        t.app.db.returning(0, &mut conn).await.unwrap(),
        "MariaDB has RETURNING"
    );
    drop(conn);
    let mut conn = t.app.db.shard(1).acquire().await.unwrap();
    assert!(!t.app.db.returning(1, &mut conn).await.unwrap());
    drop(conn);
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let users: Vec<i64> = (200..264).collect();
    let on = |u: i64| {
        t.app
            .db
            .shard_index(redpacket_wallet::domain::UserId::parse(u).unwrap())
    };
    assert!(users.iter().any(|u| on(*u) == 0) && users.iter().any(|u| on(*u) == 1));
    let awards: Vec<Value> = users
        .iter()
        .flat_map(|u| (0..5).map(move |i| award(*u, i, 9)))
        .collect();
    issue_all(&t, awards).await;
    let (jwt0, jwt1) = (t.jwt(200), t.jwt(201));
    assert_ne!(on(200), on(201));
    let worker = async {
        let mut w = t.worker("mixed");
        for p in 0..t.app.redis.partitions() {
            w.try_execute_batch(p).await.unwrap();
        }
    };
    let (_, (s0, b0), (s1, b1)) = tokio::join!(
        worker,
        withdraw(&t, &jwt0, "mixed-0", 30),
        withdraw(&t, &jwt1, "mixed-1", 20)
    );
    assert_eq!((s0, s1), (201, 201), "{b0} {b1}");
    t.drain().await;
    let mut rows: Vec<(i64, i64)> = Vec::new();
    let (mut count, mut sum) = (0i64, 0i64);
    for shard in 0..2 {
        let pool = t.app.db.shard(shard);
        rows.extend(
            sqlx::query_as::<_, (i64, i64)>("SELECT user_id, balance_cents FROM accounts")
                .fetch_all(pool)
                .await
                .unwrap(),
        );
        let (c, s): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) \
             FROM ledger_entries WHERE kind = 'award'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        count += c;
        sum += s;
    }
    assert_eq!((count, sum), (64 * 5, 64 * 45));
    let balances: HashMap<i64, i64> = rows.into_iter().collect();
    assert_eq!(
        balances.len(),
        users.len(),
        "one account per user, on its shard"
    );
    for u in &users {
        let expected = match u {
            200 => 45 - 30,
            201 => 45 - 20,
            _ => 45,
        };
        assert_eq!(balances[u], expected, "user {u}");
        let w = t.wallet(*u).await;
        assert_eq!(w["balance_cents"], expected, "user {u}: {w}");
        assert_eq!(w["total_income_cents"], 45, "user {u}: {w}");
        assert_eq!(w["pending_cents"], 0, "user {u}: {w}");
    }
    t.stop().await;
}

/// A transaction opened on the shard that holds the data (a payout's reversal, a packet's
/// refund) while this instance's map still names the bucket's former shard: the
/// statement form is asked of, and kept for, the shard the transaction is on, never the
/// one the stale map names (which may run another server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_form_is_kept_for_the_shard_a_transaction_is_on() {
    let t = spawn_two_shards().await;
    let user = (300..400)
        .find(|u| {
            t.app
                .db
                .shard_index(redpacket_wallet::domain::UserId::parse(*u).unwrap())
                == 0
        })
        .unwrap();
    let id = redpacket_wallet::domain::UserId::parse(user).unwrap();
    let bucket = redpacket_wallet::store::bucket_of(id);
    // The bucket now lives on shard 1, behind the map's back (the main database's map,
    // and so this instance's, still say shard 0).
    sqlx::query("UPDATE bucket_owner SET owned = 0 WHERE bucket = ?")
        .bind(bucket)
        .execute(t.app.db.shard(0))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO bucket_owner (bucket, owned) VALUES (?, 1) \
         ON DUPLICATE KEY UPDATE owned = 1",
    )
    .bind(bucket)
    .execute(t.app.db.shard(1))
    .await
    .unwrap();
    assert_eq!(t.app.db.shard_index(id), 0, "the map is stale");
    assert_eq!(
        (t.app.db.known_returning(0), t.app.db.known_returning(1)),
        (None, None)
    );
    let mut tx = t.app.db.shard(1).begin().await.unwrap();
    let accounts = t.app.ledger.lock_accounts(&mut tx, &[id]).await.unwrap();
    assert_eq!(accounts[&id].balance_cents, 0);
    tx.rollback().await.unwrap();
    assert_eq!(
        (t.app.db.known_returning(0), t.app.db.known_returning(1)),
        (None, Some(true)),
        "the form was asked of shard 1, the transaction's"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_forces_settlement_of_pending_tokens() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, (0..3).map(|i| award(5, i, 100)).collect()).await;
    let jwt = t.jwt(5);
    let (status, body) = withdraw(&t, &jwt, "r1", 250).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["forced_settled_count"], 3);
    assert_eq!(body["balance_cents"], 50);
    assert_eq!(body["status"], "submitted");
    // The worker later meets their stream entries and books nothing.
    assert_eq!(t.drain().await, 0);
    assert_eq!(ledger_awards(&t).await, (3, 300));
    // The same request again: the same withdrawal, 200. Another amount: a conflict.
    let (status, again) = withdraw(&t, &jwt, "r1", 250).await;
    assert_eq!(status, 200);
    assert_eq!(again["withdrawal_id"], body["withdrawal_id"]);
    let (status, conflict) = withdraw(&t, &jwt, "r1", 10).await;
    assert_eq!(status, 409);
    assert_eq!(conflict["error"]["code"], "idempotency_conflict");
    // More than the balance: 409 and nothing changes.
    let (status, err) = withdraw(&t, &jwt, "r2", 51).await;
    assert_eq!(status, 409);
    assert_eq!(err["error"]["code"], "insufficient_balance");
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM withdrawals").await, 1);
    // Bad input.
    for body in [
        json!({"request_id": "", "amount_cents": 5}),
        json!({"request_id": "x".repeat(65), "amount_cents": 5}),
        json!({"request_id": "ok", "amount_cents": 0}),
        json!({"request_id": "ok", "amount_cents": -5}),
        json!({"amount_cents": 5}),
    ] {
        let (status, b) = t.post("/v1/withdrawals", &jwt, &body).await;
        assert_eq!(status, 400, "{body}: {b}");
    }
    // Own withdrawals only.
    let id = body["withdrawal_id"].as_str().unwrap();
    assert_eq!(
        t.get(&format!("/v1/withdrawals/{id}"), Some(&jwt)).await.0,
        200
    );
    assert_eq!(
        t.get(&format!("/v1/withdrawals/{id}"), Some(&t.jwt(6)))
            .await
            .0,
        403
    );
    assert_eq!(t.get("/v1/withdrawals/wdnope", Some(&jwt)).await.0, 404);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_withdrawals_never_overdraw_and_dedupe_by_request_id() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, (0..10).map(|i| award(9, i, 100)).collect()).await; // 1000 cents
    let jwt = t.jwt(9);
    let same = join_all((0..50).map(|_| withdraw(&t, &jwt, "same", 30))).await;
    let ids: std::collections::HashSet<String> = same
        .iter()
        .map(|(s, b)| {
            assert!(*s == 200 || *s == 201, "{s} {b}");
            b["withdrawal_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(same.iter().filter(|(s, _)| *s == 201).count(), 1);
    assert_eq!(balances(&t).await[&9], 970);

    let request_ids: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    let many = join_all(request_ids.iter().map(|id| withdraw(&t, &jwt, id, 70))).await;
    let ok: i64 = many.iter().filter(|(s, _)| *s == 201).count() as i64;
    for (s, b) in &many {
        assert!(
            *s == 201 || (*s == 409 && b["error"]["code"] == "insufficient_balance"),
            "{s} {b}"
        );
    }
    assert_eq!(ok, 970 / 70, "as many as the balance covers");
    let balance = balances(&t).await[&9];
    assert_eq!(balance, 970 - ok * 70);
    assert!(balance >= 0);
    let debited = t
        .sql_i64(
            "SELECT CAST(-SUM(amount_cents) AS SIGNED) FROM ledger_entries WHERE kind = 'withdraw'",
        )
        .await;
    assert_eq!(debited, 30 + ok * 70);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_payout_is_reversed_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(3, 1, 500)]).await;
    let jwt = t.jwt(3);
    let (_, w) = withdraw(&t, &jwt, "p1", 200).await;
    let (_, w2) = withdraw(&t, &jwt, "p2", 100).await;
    let id = w["withdrawal_id"].as_str().unwrap();
    let id2 = w2["withdrawal_id"].as_str().unwrap();
    assert_eq!(balances(&t).await[&3], 200);
    for _ in 0..2 {
        let (status, body) = payout(&t, CALLER, id, "failed").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "failed");
    }
    assert_eq!(balances(&t).await[&3], 400, "one reversal");
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'reversal'")
            .await,
        1
    );
    let (status, body) = payout(&t, CALLER, id, "paid").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_conflict");
    let (status, _) = payout(&t, CALLER, id2, "paid").await;
    assert_eq!(status, 200);
    let (status, _) = payout(&t, CALLER, id2, "paid").await;
    assert_eq!(status, 200);
    assert_eq!(payout(&t, CALLER, id2, "maybe").await.0, 400);
    assert_eq!(payout(&t, CALLER, "wdnope", "paid").await.0, 404);
    assert_eq!(payout(&t, &jwt, id2, "paid").await.0, 401);
    assert_eq!(balances(&t).await[&3], 400);
    let wallet = t.wallet(3).await;
    assert_eq!(wallet["withdrawn_cents"], 100);
    assert_eq!(wallet["balance_cents"], 400);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_stopped_mid_drain_loses_and_doubles_nothing() {
    let mariadb = PrivateMariadb::start();
    let t = spawn_app_with(Options {
        mysql_url: Some(mariadb.url()),
        worker: true,
        env: vec![
            ("RPW_SETTLE__MAX_TPS".into(), "400".into()),
            ("RPW_SETTLE__BATCH_SIZE".into(), "50".into()),
            ("RPW_SETTLE__RETRY_MAX_MS".into(), "400".into()),
            ("RPW_MYSQL__ACQUIRE_TIMEOUT_MS".into(), "1000".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let first: Vec<Value> = (0..2_000).map(|i| award(1 + i % 50, i, 3)).collect();
    // The drain (about five seconds at 400/s) starts once every award is issued, and
    // MySQL stops in its first second.
    t.pause_booking(true).await;
    issue_all(&t, first).await;
    t.pause_booking(false).await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    mariadb.stop();
    let (booked_before, _) = {
        // MySQL is down: count what Redis says was settled.
        let hours = t.app.tokens.counters("cny2027").await.unwrap().hours;
        let settled: i64 = hours.values().map(|h| h.settled.count).sum();
        (settled, ())
    };
    assert!(
        booked_before < 2_000,
        "the stop landed mid-drain ({booked_before} booked)"
    );
    // Issuing goes on without MySQL.
    let second: Vec<Value> = (2_000..3_000).map(|i| award(1 + i % 50, i, 3)).collect();
    issue_all(&t, second).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    mariadb.restart();
    let mut booked = (0, 0);
    for _ in 0..120 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if let Ok(row) = sqlx::query_as::<_, (i64, i64)>(
            "SELECT COUNT(*), CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE kind = 'award'",
        )
        .fetch_one(t.app.db.main())
        .await
        {
            booked = row;
            if booked.0 == 3_000 && backlog(&t).await == 0 {
                break;
            }
        }
    }
    assert_eq!(
        booked,
        (3_000, 9_000),
        "every token booked once after MySQL came back"
    );
    let sum: i64 = balances(&t).await.values().sum();
    assert_eq!(sum, 9_000);
    assert_eq!(backlog(&t).await, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_shards_by_user_over_two_databases() {
    let second = create_database().await;
    let t = spawn_app_with(Options {
        env: vec![("RPW_MYSQL__SHARD_URLS".into(), mysql_url_for(&second))],
        ..Default::default()
    })
    .await;
    assert_eq!(t.app.db.shards().len(), 2);
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    issue_all(&t, (0..40).map(|i| award(1 + i % 10, i, 25)).collect()).await;
    assert_eq!(t.drain().await, 40);
    for (shard, parity) in [(0usize, 0i64), (1, 1)] {
        let (rows, odd_users): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(user_id % 2 <> ?), 0) AS SIGNED) FROM ledger_entries",
        )
        .bind(parity)
        .fetch_one(t.app.db.shard(shard))
        .await
        .unwrap();
        assert_eq!(rows, 20, "shard {shard} holds its users' awards");
        assert_eq!(odd_users, 0, "shard {shard} holds only its own users");
    }
    let (status, w) = withdraw(&t, &t.jwt(3), "s", 60).await;
    assert_eq!(status, 201, "{w}");
    let id = w["withdrawal_id"].as_str().unwrap();
    assert_eq!(
        t.get(&format!("/v1/withdrawals/{id}"), Some(&t.jwt(3)))
            .await
            .0,
        200
    );
    let (status, _) = payout(&t, CALLER, id, "failed").await;
    assert_eq!(status, 200);
    for u in 1..=10 {
        assert_eq!(t.wallet(u).await["balance_cents"], 100);
    }
    let (_, view) = t.get("/v1/admin/activities/cny2027", Some(ADMIN)).await;
    assert_eq!(
        view["booked_cents"], 1_000,
        "figures add up over both shards"
    );
    // Stopping drops both databases.
    t.stop().await;
}

/// With `auth.payout_callers` set, only the named callers may post payout results; any
/// other caller key gets 403 and the withdrawal stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_payout_callers_may_post_payout_results() {
    const PAYMENTS: &str = "payments-key-0001";
    let t = spawn_app_with(Options {
        env: vec![
            (
                "RPW_AUTH__CALLER_KEYS".into(),
                format!("upstream:{CALLER},payments:{PAYMENTS}"),
            ),
            ("RPW_AUTH__PAYOUT_CALLERS".into(), "payments".into()),
        ],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 100_000, 1_000).await;
    issue_all(&t, vec![award(4, 1, 500)]).await;
    let (status, w) = withdraw(&t, &t.jwt(4), "r1", 300).await;
    assert_eq!(status, 201, "{w}");
    let id = w["withdrawal_id"].as_str().unwrap();
    let (status, body) = payout(&t, CALLER, id, "failed").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(balances(&t).await[&4], 200, "nothing reversed");
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM withdrawals WHERE status = 'submitted'")
            .await,
        1
    );
    let (status, body) = payout(&t, PAYMENTS, id, "failed").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(balances(&t).await[&4], 500, "reversed by the payout caller");
    t.stop().await;
}

/// The sweep books a partition's whole backlog, batch after batch, up to its bound:
/// a batch booked is not mistaken for the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_books_a_backlog_larger_than_one_batch() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 10_000_000, 1_000).await;
    // 600 awards in partition 0 (user ids divisible by the 4 test partitions): three
    // batches of settle.batch_size (200).
    let awards: Vec<_> = (1..=600).map(|i| award(4 * i, 1, 10)).collect();
    issue_all(&t, awards).await;
    let booked = redpacket_wallet::settle::settle_all(&t.app.settler, 10)
        .await
        .unwrap();
    assert_eq!(booked, 600);
    assert_eq!(
        t.sql_i64("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'award'")
            .await,
        600
    );
    t.stop().await;
}
