//! MySQL shards by a stable map: users → 1,024 buckets → shards. Buckets move between
//! shards under load without losing or doubling a cent, and a service whose configured
//! shards disagree with the map refuses to start.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redpacket_wallet::ops::reshard::reshard;
use serde_json::json;

use crate::helpers::*;

/// Per user: the cents of the awards the client holds, and their tokens.
type Held = HashMap<i64, (i64, Vec<String>)>;

/// Users 1..=USERS live in buckets 1..=USERS.
const USERS: i64 = 48;

async fn drop_database(name: &str) {
    let pool = sqlx::MySqlPool::connect(&mysql_base_url()).await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
        .execute(&pool)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buckets_move_between_shards_under_load_and_nothing_is_lost() {
    let second = create_database().await;
    let t = Arc::new(
        spawn_app_with(Options {
            env: vec![
                ("RPW_MYSQL__SHARD_URLS".into(), mysql_url_for(&second)),
                ("RPW_SETTLE__RETRY_MAX_MS".into(), "200".into()),
            ],
            worker: true,
            ..Default::default()
        })
        .await,
    );
    t.open_activity("cny2027", 100_000_000, 1_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Per user: awards held (cents) and withdrawals accepted (cents).
    let held: Arc<Mutex<Held>> = Arc::default();
    let withdrawn: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    let mut load = Vec::new();
    for worker in 0..2i64 {
        let (t, stop, held) = (t.clone(), stop.clone(), held.clone());
        load.push(tokio::spawn(async move {
            let mut rain = 0;
            while !stop.load(Ordering::Relaxed) {
                rain += 1;
                let awards: Vec<_> = (1..=USERS)
                    .map(|u| award(u, worker * 100_000 + rain, 10 + u % 7))
                    .collect();
                let (status, body) = t
                    .post("/v1/awards:batch", CALLER, &json!({ "awards": awards }))
                    .await;
                assert_eq!(status, 200, "{body}");
                {
                    let mut held = held.lock().unwrap();
                    for (a, r) in awards.iter().zip(body["results"].as_array().unwrap()) {
                        let token = r["token"].as_str().expect("every award is issued");
                        let entry = held.entry(a["user_id"].as_i64().unwrap()).or_default();
                        entry.0 += a["amount_cents"].as_i64().unwrap();
                        entry.1.push(token.to_string());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let (t, stop, withdrawn) = (t.clone(), stop.clone(), withdrawn.clone());
        load.push(tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let user = 1 + k % USERS;
                let (status, body) = t
                    .post(
                        "/v1/withdrawals",
                        &t.jwt(user),
                        &json!({"request_id": format!("w{k}"), "amount_cents": 5}),
                    )
                    .await;
                match status {
                    201 => *withdrawn.lock().unwrap().entry(user).or_default() += 5,
                    // Nothing yet to withdraw, or the bucket is moving: retried later.
                    409 | 503 => {}
                    other => panic!("withdrawal answered {other}: {body}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    // Move buckets 1..=8 to the other shard while the load runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut moved = Vec::new();
    for bucket in 1..=8u16 {
        let from = t.app.db.map()[usize::from(bucket)];
        let to = usize::from(1 - from);
        let m = reshard(&t.app.db, bucket, to).await.unwrap();
        assert_eq!((m.from, m.to), (from, to as u16));
        moved.push(m);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(
        moved.iter().any(|m| m.ledger_rows > 0),
        "the moves carried booked rows: {moved:?}"
    );
    t.drain().await;
    // The worker may still hold a batch of its own; wait for every award to be booked.
    let held = held.lock().unwrap().clone();
    let expected: usize = held.values().map(|(_, tokens)| tokens.len()).sum();
    let mut rows: Vec<(String, i64, i64, usize)> = Vec::new();
    for _ in 0..100 {
        rows.clear();
        for (shard, pool) in t.app.db.shards().iter().enumerate() {
            let part: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT CAST(out_trade_no AS CHAR), user_id, amount_cents FROM ledger_entries WHERE kind = 'award'",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            rows.extend(part.into_iter().map(|(o, u, a)| (o, u, a, shard)));
        }
        if rows.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each row once, on the shard the map gives its user's bucket.
    let map = t.app.db.map();
    let otns: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(otns.len(), rows.len(), "an award is booked on two shards");
    for (otn, user, _, shard) in &rows {
        assert_eq!(
            usize::from(map[(*user % 1024) as usize]),
            *shard,
            "{otn} of user {user} is on shard {shard}, not its bucket's"
        );
    }
    assert_eq!(rows.len(), expected, "every award held is booked");
    let withdrawn = withdrawn.lock().unwrap().clone();
    for (user, (cents, tokens)) in &held {
        for token in tokens {
            assert!(otns.contains(token_otn(token).as_str()));
        }
        let wallet = t.wallet(*user).await;
        let out = withdrawn.get(user).copied().unwrap_or(0);
        assert_eq!(
            wallet["total_income_cents"], *cents,
            "user {user}: {wallet}"
        );
        assert_eq!(wallet["withdrawn_cents"], out, "user {user}: {wallet}");
        assert_eq!(
            wallet["balance_cents"],
            cents - out,
            "user {user}: {wallet}"
        );
        assert_eq!(wallet["pending_count"], 0, "user {user}: {wallet}");
    }
    println!(
        "reshard: {} buckets moved under load ({} ledger rows, {} accounts); {} awards, {} withdrawals",
        moved.len(),
        moved.iter().map(|m| m.ledger_rows).sum::<i64>(),
        moved.iter().map(|m| m.accounts).sum::<i64>(),
        rows.len(),
        withdrawn.values().sum::<i64>() / 5
    );

    // A service configured with only the first shard disagrees with the map now.
    let alone = test_settings(&t.db_name, &t.prefix, &t.keys_dir, &[]);
    let refused = match redpacket_wallet::app::App::build(alone, false).await {
        Ok(_) => panic!("a service missing a shard of the map started"),
        Err(err) => format!("{err:#}"),
    };
    assert!(refused.contains("shard map"), "{refused}");
    // Nor does one whose shards are listed in another order.
    let swapped = test_settings(
        &second,
        &t.prefix,
        &t.keys_dir,
        &[("RPW_MYSQL__SHARD_URLS".into(), mysql_url_for(&t.db_name))],
    );
    let refused = match redpacket_wallet::app::App::build(swapped, false).await {
        Ok(_) => panic!("a service with its shards swapped started"),
        Err(err) => format!("{err:#}"),
    };
    assert!(refused.contains("order"), "{refused}");

    Arc::try_unwrap(t)
        .ok()
        .expect("no task holds the app")
        .stop()
        .await;
    drop_database(&second).await;
}

/// A move cut short can only be finished where it was going, and finishing it clears
/// the bucket from every other shard: a crash never leaves a bucket owned twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_cut_short_is_finished_never_turned_elsewhere() {
    let second = create_database().await;
    let t = spawn_app_with(Options {
        env: vec![("RPW_MYSQL__SHARD_URLS".into(), mysql_url_for(&second))],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    // Users 2 and 4 live in buckets 2 and 4, both on shard 0.
    issue_all(&t, vec![award(2, 1, 30), award(4, 1, 40)]).await;
    assert_eq!(t.drain().await, 2);
    let main = t.app.db.main().clone();
    let state = |bucket: u16| {
        let main = main.clone();
        async move {
            sqlx::query_as::<_, (u16, i8, Option<u16>)>(
                "SELECT shard, moving, moving_to FROM shard_map WHERE bucket = ?",
            )
            .bind(bucket)
            .fetch_one(&main)
            .await
            .unwrap()
        }
    };
    let rows = |shard: usize, user: i64| {
        let pool = t.app.db.shard(shard).clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ledger_entries WHERE user_id = ?")
                .bind(user)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // Bucket 2: cut short after the pause, on its way to shard 1.
    sqlx::query("UPDATE shard_map SET moving = 1, moving_to = 1 WHERE bucket = 2")
        .execute(&main)
        .await
        .unwrap();
    sqlx::query("UPDATE bucket_owner SET owned = 2 WHERE bucket = 2")
        .execute(t.app.db.shard(0))
        .await
        .unwrap();
    let turned = reshard(&t.app.db, 2, 0).await.unwrap_err().to_string();
    assert!(turned.contains("finish that move first"), "{turned}");
    reshard(&t.app.db, 2, 1).await.unwrap();
    assert_eq!(state(2).await, (1, 0, None));
    assert_eq!((rows(0, 2).await, rows(1, 2).await), (0, 1));

    // Bucket 4: cut short after the switch, before the source was cleared.
    reshard(&t.app.db, 4, 1).await.unwrap();
    // Put it back in that state by hand: the rows on shard 0 again, the move not over.
    sqlx::query("INSERT INTO ledger_entries (user_id, out_trade_no, kind, amount_cents, at_ms) VALUES (4, 'stale', 'award', 40, 0)")
        .execute(t.app.db.shard(0))
        .await
        .unwrap();
    sqlx::query("UPDATE shard_map SET moving = 1, moving_to = 1 WHERE bucket = 4")
        .execute(&main)
        .await
        .unwrap();
    reshard(&t.app.db, 4, 1).await.unwrap();
    assert_eq!(state(4).await, (1, 0, None));
    assert_eq!(rows(0, 4).await, 0, "finishing clears the old shard");
    assert_eq!(rows(1, 4).await, 1);
    // Only shard 1 owns the buckets now, and the wallets are whole.
    for (user, cents) in [(2, 30), (4, 40)] {
        assert_eq!(t.wallet(user).await["balance_cents"], cents);
    }
    t.stop().await;
    drop_database(&second).await;
}
