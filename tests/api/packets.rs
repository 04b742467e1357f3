//! Group red packets (issue 17): send, grab, open, detail, refund, against real Redis and
//! MariaDB.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redpacket_wallet::domain::UserId;
use serde_json::{json, Value};

use crate::helpers::*;

fn user(id: i64) -> UserId {
    UserId::parse(id).unwrap()
}

/// `user` gets `cents` as pending awards (one per 1,000 cents or part).
async fn fund(t: &TestApp, id: i64, cents: i64) {
    let awards: Vec<Value> = (0..)
        .map(|i| (i, (cents - i * 1_000).min(1_000)))
        .take_while(|(_, c)| *c > 0)
        .map(|(i, c)| award(id, 9_000 + i, c))
        .collect();
    issue_all(t, awards).await;
}

async fn send(t: &TestApp, sender: i64, request: &str, total: i64, shares: i64) -> (u16, Value) {
    t.post(
        "/v1/packets",
        &t.jwt(sender),
        &json!({"request_id": request, "total_cents": total, "shares": shares, "greeting": "恭喜发财"}),
    )
    .await
}

async fn grab(t: &TestApp, who: i64, id: &str) -> String {
    let (status, body) = t
        .post(&format!("/v1/packets/{id}/grab"), &t.jwt(who), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["status"].as_str().unwrap().to_string()
}

async fn open(t: &TestApp, who: i64, id: &str) -> (u16, Value) {
    t.post(&format!("/v1/packets/{id}/open"), &t.jwt(who), &json!({}))
        .await
}

async fn ledger_sum(t: &TestApp, kind: &str) -> i64 {
    t.sql_i64(&format!(
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries WHERE kind = '{kind}'"
    ))
    .await
}

/// The conservation of packets: sent = opened + refunded + open remainder, and the share
/// rows sum to what was opened.
async fn assert_conserved(t: &TestApp) -> redpacket_wallet::packets::PacketTotals {
    let totals = t.app.packets.totals().await.unwrap();
    assert_eq!(
        totals.sent_cents,
        totals.opened_cents + totals.refunded_cents + totals.open_remainder_cents,
        "{totals:?}"
    );
    assert_eq!(totals.shares_cents, totals.opened_cents, "{totals:?}");
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_is_sent_grabbed_opened_and_its_shares_reach_the_wallets_at_once() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 21, 3_000).await;

    let (status, sent) = send(&t, 21, "p1", 1_000, 5).await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(
        sent["balance_cents"], 2_000,
        "pending tokens booked, then debited"
    );
    let id = sent["packet_id"].as_str().unwrap().to_string();
    let w = t.wallet(21).await;
    assert_eq!(
        (w["balance_cents"].as_i64(), w["pending_cents"].as_i64()),
        (Some(2_000), Some(0))
    );
    // The same request again: the same packet, nothing debited twice.
    let (status, again) = send(&t, 21, "p1", 1_000, 5).await;
    assert_eq!((status, &again["packet_id"]), (200, &sent["packet_id"]));
    assert_eq!(t.wallet(21).await["balance_cents"], 2_000);
    let (status, body) = send(&t, 21, "p1", 999, 5).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );

    assert_eq!(grab(&t, 22, &id).await, "eligible");
    let (status, opened) = open(&t, 22, &id).await;
    assert_eq!(status, 201, "{opened}");
    let share = opened["share"]["amount_cents"].as_i64().unwrap();
    assert!(
        (1..=400).contains(&share),
        "at most twice the mean: {opened}"
    );
    assert_eq!(opened["share"]["seq"], 1);
    // At once in the grabber's wallet, pending.
    let w = t.wallet(22).await;
    assert_eq!(
        (w["pending_cents"].as_i64(), w["balance_cents"].as_i64()),
        (Some(share), Some(share))
    );
    // Opening again answers the same share and token; the cache says so too.
    let (status, again) = open(&t, 22, &id).await;
    assert_eq!(status, 200);
    assert_eq!(again["token"], opened["token"]);
    assert_eq!(grab(&t, 22, &id).await, "already_opened");

    for who in 23..27 {
        let (status, body) = open(&t, who, &id).await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(grab(&t, 27, &id).await, "finished");
    let (status, body) = open(&t, 27, &id).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("packet_finished"))
    );

    let (status, detail) = t.get(&format!("/v1/packets/{id}"), Some(&t.jwt(27))).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["status"], "finished");
    let opened: Vec<Value> = detail["opened"].as_array().unwrap().clone();
    assert_eq!(opened.len(), 5);
    assert_eq!(
        opened
            .iter()
            .map(|s| s["amount_cents"].as_i64().unwrap())
            .sum::<i64>(),
        1_000
    );
    let best: Vec<&Value> = opened.iter().filter(|s| s["best_luck"] == true).collect();
    assert_eq!(best.len(), 1, "{detail}");
    let max = opened
        .iter()
        .map(|s| s["amount_cents"].as_i64().unwrap())
        .max()
        .unwrap();
    assert_eq!(best[0]["amount_cents"].as_i64(), Some(max));

    // Booked by the same pipeline: each grabber's ledger gets the share once.
    t.drain().await;
    assert_eq!(ledger_sum(&t, "award").await, 3_000 + 1_000);
    assert_eq!(ledger_sum(&t, "packet_send").await, -1_000);
    let totals = assert_conserved(&t).await;
    assert_eq!((totals.sent_cents, totals.opened_cents), (1_000, 1_000));
    for who in 22..27 {
        let w = t.wallet(who).await;
        assert_eq!(w["pending_cents"], 0);
        assert!(w["booked_cents"].as_i64().unwrap() >= 1);
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_shares_against_a_hundred_concurrent_grabbers_make_exactly_ten_winners() {
    let t = Arc::new(spawn_app().await);
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 30, 5_000).await;
    let (status, sent) = send(&t, 30, "big", 4_321, 10).await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["packet_id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for who in 100..200 {
        let (t, id) = (t.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let status = grab(&t, who, &id).await;
            if status != "eligible" {
                return (who, status, 0);
            }
            let (code, body) = open(&t, who, &id).await;
            match code {
                201 => (
                    who,
                    "won".into(),
                    body["share"]["amount_cents"].as_i64().unwrap(),
                ),
                409 => (who, body["error"]["code"].as_str().unwrap().to_string(), 0),
                other => panic!("open answered {other}: {body}"),
            }
        }));
    }
    let mut winners = HashSet::new();
    let mut sum = 0;
    for task in tasks {
        let (who, outcome, cents) = task.await.unwrap();
        if outcome == "won" {
            assert!(winners.insert(who));
            sum += cents;
        } else {
            assert!(
                outcome == "finished" || outcome == "packet_finished",
                "{who}: {outcome}"
            );
        }
    }
    assert_eq!(winners.len(), 10);
    assert_eq!(sum, 4_321);
    let (_, detail) = t.get(&format!("/v1/packets/{id}"), Some(&t.jwt(1))).await;
    assert_eq!(detail["opened_count"], 10);
    assert_eq!(detail["status"], "finished");
    // Each winner sees the share in the view at once.
    for who in &winners {
        let w = t.wallet(*who).await;
        assert!(w["pending_cents"].as_i64().unwrap() >= 1, "{w}");
    }
    assert_conserved(&t).await;
    Arc::into_inner(t).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unclaimed_remainder_goes_back_to_the_sender_exactly_once_across_restarts() {
    let mut t = spawn_app_with(Options {
        // Long enough for the sends and opens before it on a loaded machine.
        env: vec![("RPW_PACKETS__REFUND_AFTER_SECS".into(), "5".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 40, 1_000).await;
    let (status, sent) = send(&t, 40, "r", 600, 3).await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["packet_id"].as_str().unwrap().to_string();
    let (status, opened) = open(&t, 41, &id).await;
    assert_eq!(status, 201, "{opened}");
    let share = opened["share"]["amount_cents"].as_i64().unwrap();
    assert_eq!(t.wallet(40).await["balance_cents"], 400);

    until_expired(&t, &id).await;
    assert_eq!(grab(&t, 42, &id).await, "expired");
    let (status, body) = open(&t, 42, &id).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("packet_expired"))
    );

    // Two refund runs at once (two instances' cron), then another after a restart.
    let now = redpacket_wallet::store::now_ms();
    let (a, b) = tokio::join!(t.app.packets.refund_due(now), t.app.packets.refund_due(now));
    assert_eq!(a.unwrap() + b.unwrap(), 1, "refunded once");
    t.restart(&[]).await;
    assert_eq!(
        t.app
            .packets
            .refund_due(redpacket_wallet::store::now_ms())
            .await
            .unwrap(),
        0
    );

    let remainder = 600 - share;
    let w = t.wallet(40).await;
    assert_eq!(w["balance_cents"], 400 + remainder, "{w}");
    assert_eq!(ledger_sum(&t, "packet_refund").await, remainder);
    let (_, detail) = t.get(&format!("/v1/packets/{id}"), Some(&t.jwt(40))).await;
    assert_eq!(detail["status"], "refunded");
    assert_eq!(detail["refunded_cents"], remainder);
    assert_eq!(detail["opened"][0]["best_luck"], true);
    let totals = assert_conserved(&t).await;
    assert_eq!(
        (
            totals.sent_cents,
            totals.opened_cents,
            totals.refunded_cents,
            totals.open_remainder_cents
        ),
        (600, share, remainder, 0)
    );
    // The sender's view from Redis lifted the refund's fence.
    let (view, source) = t.app.wallet.view_from(user(40)).await.unwrap();
    assert_eq!(source, redpacket_wallet::wallet::ViewSource::Redis);
    assert_eq!(view.balance_cents, 400 + remainder);
    t.stop().await;
}

/// Waits until just past the expiry of packet `id` (the later of several sent).
async fn until_expired(t: &TestApp, id: &str) {
    let (status, detail) = t.get(&format!("/v1/packets/{id}"), Some(&t.jwt(1))).await;
    assert_eq!(status, 200, "{detail}");
    let wait = detail["expires_at_ms"].as_i64().unwrap() + 100 - redpacket_wallet::store::now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// The packets' reconciliation report of `hour`, made now.
async fn packets_report(t: &TestApp, hour: &str) -> redpacket_wallet::ops::reconcile::Report {
    t.app
        .reconciler
        .reconcile("packets", hour, "manual")
        .await
        .unwrap()
}

/// The hourly reconciliation covers packets (activity `packets`): the shares opened in
/// the hour against the share tokens issued, booked and marked, the packets sent against
/// their debits, the refunds against what their packets record; a debit or a refund
/// missing from the ledger is reported, with its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_covers_packets_shares_debits_and_refunds() {
    let t = spawn_app_with(Options {
        // Long enough for the sends and opens before it on a loaded machine.
        env: vec![("RPW_PACKETS__REFUND_AFTER_SECS".into(), "5".into())],
        ..Default::default()
    })
    .await;
    let hour = an_hour_to_work_in().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 50, 2_000).await;
    let (status, first) = send(&t, 50, "a", 600, 3).await;
    assert_eq!(status, 201, "{first}");
    let (status, second) = send(&t, 50, "b", 300, 2).await;
    assert_eq!(status, 201, "{second}");
    let first = first["packet_id"].as_str().unwrap().to_string();
    let second = second["packet_id"].as_str().unwrap().to_string();
    let mut shares = 0;
    for (who, id) in [(51, &first), (52, &first), (53, &second)] {
        let (status, opened) = open(&t, who, id).await;
        assert_eq!(status, 201, "{opened}");
        shares += opened["share"]["amount_cents"].as_i64().unwrap();
    }
    until_expired(&t, &second).await;
    let refunded = t
        .app
        .packets
        .refund_due(redpacket_wallet::store::now_ms())
        .await
        .unwrap();
    assert_eq!(refunded, 2);
    t.drain().await;

    let reports = t
        .app
        .reconciler
        .reconcile_hour(&hour, "manual")
        .await
        .unwrap();
    let report = reports
        .iter()
        .find(|r| r.activity_id == "packets")
        .unwrap_or_else(|| panic!("no packets report among {reports:?}"));
    assert!(report.ok, "{report:?}");
    assert_eq!((report.issued.count, report.issued.cents), (3, shares));
    assert_eq!(report.booked, report.issued);
    assert_eq!(report.settled, report.issued);
    assert_eq!(report.pending.cents, 0);
    assert_eq!(report.budget_taken_cents, shares, "the shares opened");
    assert_eq!(report.leak_cents, 0);

    // A refund row gone from the ledger, a send's debit too, a refund row a cent short
    // of its packet's record and of the unopened remainder, and a packet still open a
    // quarter of an hour after it expired: all reported.
    sqlx::query("UPDATE ledger_entries SET amount_cents = amount_cents - 1 WHERE out_trade_no = ?")
        .bind(format!("pr_{first}"))
        .execute(t.app.db.main())
        .await
        .unwrap();
    let (status, third) = send(&t, 50, "c", 100, 1).await;
    assert_eq!(status, 201, "{third}");
    sqlx::query("UPDATE packets SET expires_at_ms = ? WHERE id = ?")
        .bind(redpacket_wallet::store::now_ms() - 16 * 60_000)
        .bind(third["packet_id"].as_str().unwrap())
        .execute(t.app.db.main())
        .await
        .unwrap();
    for row in [format!("pr_{second}"), format!("ps_{first}")] {
        sqlx::query("DELETE FROM ledger_entries WHERE out_trade_no = ?")
            .bind(&row)
            .execute(t.app.db.main())
            .await
            .unwrap();
    }
    let report = packets_report(&t, &hour).await;
    assert!(!report.ok, "{report:?}");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("sent without their debit")),
        "{report:?}"
    );
    for problem in [
        "refunded without their refund row",
        "not the unopened remainder",
        "records another amount",
        "refunds overdue: 1 packets",
    ] {
        assert!(
            report.problems.iter().any(|p| p.contains(problem)),
            "{problem}: {report:?}"
        );
    }
    let mismatches = t
        .sql_i64("SELECT COUNT(*) FROM events WHERE type = 'reconciliation.mismatch'")
        .await;
    assert_eq!(mismatches, 1);

    // A share of an hour over for a while whose token Redis never counted.
    sqlx::query(
        "UPDATE packet_shares SET opened_at_ms = opened_at_ms - 7200000 WHERE packet_id = ?",
    )
    .bind(&second)
    .execute(t.app.db.main())
    .await
    .unwrap();
    let earlier = redpacket_wallet::store::hour_of(redpacket_wallet::store::now_ms() - 7_200_000);
    let report = packets_report(&t, &earlier).await;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.starts_with("shares without their tokens")),
        "{report:?}"
    );
    assert!(report.leak_cents > 0, "{report:?}");
    t.stop().await;
}

/// A refund made hours after its packet expired (the job was down) is reconciled in
/// the hour it was made: a refund row gone from it is reported there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_refund_is_reconciled_in_the_hour_it_was_made() {
    let t = spawn_app().await;
    let hour = an_hour_to_work_in().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 60, 1_000).await;
    let (status, sent) = send(&t, 60, "late", 200, 2).await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["packet_id"].as_str().unwrap().to_string();
    sqlx::query("UPDATE packets SET expires_at_ms = ? WHERE id = ?")
        .bind(redpacket_wallet::store::now_ms() - 3 * 3_600_000)
        .bind(&id)
        .execute(t.app.db.main())
        .await
        .unwrap();
    let now = redpacket_wallet::store::now_ms();
    assert_eq!(t.app.packets.refund_due(now).await.unwrap(), 1);
    let clean = packets_report(&t, &hour).await;
    assert!(clean.ok, "{clean:?}");

    sqlx::query("DELETE FROM ledger_entries WHERE out_trade_no = ?")
        .bind(format!("pr_{id}"))
        .execute(t.app.db.main())
        .await
        .unwrap();
    let report = packets_report(&t, &hour).await;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("refunded without their refund row")),
        "{report:?}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sends_and_opens_are_refused_and_change_nothing() {
    let t = spawn_app_with(Options {
        env: vec![("RPW_PACKETS__MAX_TOTAL_CENTS".into(), "5000".into())],
        ..Default::default()
    })
    .await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 50, 500).await;
    for (total, shares, code, status) in [
        (100, 0, "invalid_request", 400),
        (3, 4, "invalid_request", 400),
        (0, 1, "invalid_request", 400),
        (6_000, 2, "amount_over_cap", 422),
        (600, 2, "insufficient_balance", 409),
    ] {
        let (got, body) = send(&t, 50, &format!("b{total}_{shares}"), total, shares).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{total}/{shares}: {body}"
        );
    }
    let (status, body) = t
        .post(
            "/v1/packets",
            &t.jwt(50),
            &json!({"request_id": "g", "total_cents": 10, "shares": 1, "greeting": "x".repeat(101)}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let w = t.wallet(50).await;
    assert_eq!(
        (w["balance_cents"].as_i64(), w["withdrawn_cents"].as_i64()),
        (Some(500), Some(0))
    );
    assert_eq!(t.sql_i64("SELECT COUNT(*) FROM packets").await, 0);

    for id in ["nope", "pk00000000000000000000", "pk0000000000000000000"] {
        let (status, body) = open(&t, 51, id).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{id}"
        );
    }
    let (status, _) = t
        .post("/v1/packets/pk0000000000000000000/open", "", &json!({}))
        .await;
    assert_eq!(status, 401);
    // No operator activity may take the share tokens' activity id.
    let (status, body) = t
        .post(
            "/v1/admin/activities",
            ADMIN,
            &json!({"id": "packets", "name": "x", "stage": "live",
                    "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z",
                    "budget_cents": 100, "max_award_cents": 10}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    t.stop().await;
}

/// A share token held by the client restores a share Redis lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_token_lost_by_redis_comes_back_by_sync_or_by_opening_again() {
    let t = spawn_app().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 60, 1_000).await;
    let (_, sent) = send(&t, 60, "s", 500, 3).await;
    let id = sent["packet_id"].as_str().unwrap().to_string();
    let (_, a) = open(&t, 61, &id).await;
    let (_, b) = open(&t, 62, &id).await;
    let (_, c) = open(&t, 63, &id).await;
    let c_cents = c["share"]["amount_cents"].as_i64().unwrap();
    let (a_cents, b_cents) = (
        a["share"]["amount_cents"].as_i64().unwrap(),
        b["share"]["amount_cents"].as_i64().unwrap(),
    );
    // Redis loses both users' tokens.
    let mut conn = t.app.redis.conn();
    for who in [61, 62, 63] {
        let _: () = redis::AsyncCommands::del(
            &mut conn,
            &[
                t.app.redis.tokens_key(user(who)),
                t.app.redis.status_key(user(who)),
            ],
        )
        .await
        .unwrap();
        assert_eq!(t.wallet(who).await["balance_cents"], 0);
    }
    let (status, body) = t
        .post(
            "/v1/wallet/tokens:sync",
            &t.jwt(61),
            &json!({"tokens": [a["token"]]}),
        )
        .await;
    assert_eq!(
        (status, body["restored"].as_i64()),
        (200, Some(1)),
        "{body}"
    );
    assert_eq!(t.wallet(61).await["balance_cents"], a_cents);
    let (status, again) = open(&t, 62, &id).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(t.wallet(62).await["balance_cents"], b_cents);
    // The third never comes back by itself: the refund job's sweep stores it again from
    // the share row, and only it (the others are held again).
    let now = redpacket_wallet::store::now_ms();
    assert_eq!(t.app.packets.restore_shares(0, now + 1).await.unwrap(), 1);
    assert_eq!(t.wallet(63).await["balance_cents"], c_cents);
    t.drain().await;
    assert_eq!(ledger_sum(&t, "award").await, 1_000 + 500);
    // Booked, then gone from Redis: the ledger says so, and nothing comes back.
    let _: () = redis::AsyncCommands::del(
        &mut conn,
        &[
            t.app.redis.tokens_key(user(63)),
            t.app.redis.status_key(user(63)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(t.app.packets.restore_shares(0, now + 1).await.unwrap(), 0);
    t.stop().await;
}

/// A packet lives on its sender's shard and moves with the sender's bucket: after the
/// move its detail, its next opening and its totals come from the new shard, and the old
/// shard holds none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_moves_with_its_senders_bucket() {
    let t = spawn_two_shards().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 40, 1_000).await;
    let (status, sent) = send(&t, 40, "r", 600, 3).await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["packet_id"].as_str().unwrap().to_string();
    let (status, first) = open(&t, 41, &id).await;
    assert_eq!(status, 201, "{first}");

    let from = t.app.db.shard_index(user(40));
    let to = 1 - from;
    let moved = redpacket_wallet::ops::reshard::reshard(&t.app.db, 40, to)
        .await
        .unwrap();
    assert_eq!((moved.from as usize, moved.to as usize), (from, to));
    let count = |shard: usize, sql: &'static str| {
        let pool = t.app.db.shard(shard).clone();
        let id = id.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    const PACKETS: &str = "SELECT COUNT(*) FROM packets WHERE id = ?";
    const SHARES: &str = "SELECT COUNT(*) FROM packet_shares WHERE packet_id = ?";
    assert_eq!((count(to, PACKETS).await, count(to, SHARES).await), (1, 1));
    assert_eq!(
        (count(from, PACKETS).await, count(from, SHARES).await),
        (0, 0)
    );

    let (status, second_share) = open(&t, 42, &id).await;
    assert_eq!(status, 201, "{second_share}");
    let (status, again) = open(&t, 41, &id).await;
    assert_eq!(
        status, 200,
        "the first opener's share is still theirs: {again}"
    );
    assert_eq!(again["share"], first["share"]);
    let (status, detail) = t.get(&format!("/v1/packets/{id}"), Some(&t.jwt(40))).await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["opened"].as_array().unwrap().len(), 2, "{detail}");
    let totals = assert_conserved(&t).await;
    assert_eq!(totals.sent_cents, 600, "counted once: {totals:?}");

    // A packet of the bucket stranded on another shard (as a move that did not carry
    // packets left them): the next move refuses and deletes nothing.
    sqlx::query("INSERT INTO packets (id, sender_id, request_id, total_cents, shares, greeting, status, created_at_ms, expires_at_ms) VALUES ('pkstray', 40, 'stray', 100, 1, 'g', 'open', 0, 9999999999999)")
        .execute(t.app.db.shard(from))
        .await
        .unwrap();
    let refused = redpacket_wallet::ops::reshard::reshard(&t.app.db, 40, from)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("red packet"), "{refused}");
    assert_eq!(t.app.db.shard_index(user(40)), to, "nothing moved");
    assert_eq!(
        (count(from, PACKETS).await, count(to, PACKETS).await),
        (0, 1),
        "the packet stays where it is"
    );
    let stray: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM packets WHERE id = 'pkstray'")
        .fetch_one(t.app.db.shard(from))
        .await
        .unwrap();
    assert_eq!(stray, 1, "the stranded packet is not deleted");
    t.stop().await;
}

/// A packet's detail, read while its sender's bucket moves back and forth between two
/// shards, is always found, and always whole (every opened share listed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packets_detail_is_found_whole_while_its_bucket_moves() {
    let t = spawn_two_shards().await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    fund(&t, 60, 1_000).await;
    let (status, sent) = send(&t, 60, "r", 600, 3).await;
    assert_eq!(status, 201, "{sent}");
    let id = sent["packet_id"].as_str().unwrap().to_string();
    for who in [61, 62] {
        let (status, opened) = open(&t, who, &id).await;
        assert_eq!(status, 201, "{opened}");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let app = t.app.clone();
        let id = id.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut reads = 0;
            let mut bad = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match app.packets.detail(&id).await {
                    Ok(d) if d.opened.len() == 2 && d.packet.opened_count == 2 => {}
                    Ok(d) => bad.push(format!("{} shares listed: {d:?}", d.opened.len())),
                    Err(err) => bad.push(err.to_string()),
                }
                reads += 1;
            }
            (reads, bad)
        })
    };
    for i in 0..10 {
        let to = (t.app.db.shard_index(user(60)) + 1) % 2;
        redpacket_wallet::ops::reshard::reshard(&t.app.db, 60, to)
            .await
            .unwrap_or_else(|e| panic!("move {i}: {e:#}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, bad) = reader.await.unwrap();
    assert!(reads > 10, "{reads} reads");
    assert!(
        bad.is_empty(),
        "{} of {reads} reads: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    t.stop().await;
}
