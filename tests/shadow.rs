//! Shadow traffic (API.md): `X-RPW-Shadow: 1` runs the real code against data kept
//! apart, never in a real balance, budget, report or metric series.
//!
//! A test binary of its own: the metric series it checks are the process's, and the
//! API suite's other tests would move them while this one runs.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

fn shadow_options() -> Options {
    Options {
        worker: true,
        env: vec![("RPW_SHADOW__ENABLED".into(), "true".into())],
        ..Default::default()
    }
}

/// A request with the shadow header (or another value of it).
async fn send(
    t: &TestApp,
    method: reqwest::Method,
    path: &str,
    bearer: &str,
    body: Option<&Value>,
    shadow: &str,
) -> (u16, Value) {
    let mut req = t
        .client
        .request(method, format!("{}{path}", t.url))
        .bearer_auth(bearer)
        .header("X-RPW-Shadow", shadow);
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn shadow_post(t: &TestApp, path: &str, bearer: &str, body: &Value) -> (u16, Value) {
    send(t, reqwest::Method::POST, path, bearer, Some(body), "1").await
}

async fn shadow_get(t: &TestApp, path: &str, bearer: &str) -> (u16, Value) {
    send(t, reqwest::Method::GET, path, bearer, None, "1").await
}

/// Lets the shadow data's alive marker lapse, as if shadow traffic had stopped long ago.
async fn lapse(t: &TestApp) {
    let _: () = redis::cmd("DEL")
        .arg(format!("{}shadow:alive", t.prefix))
        .query_async(&mut t.app.redis.conn())
        .await
        .unwrap();
}

/// The shadow keys left after a purge, checked to hold no money: the shadow worker may
/// recreate its stream groups, and the running shadow app's stats flush its in-memory
/// counts again.
async fn shadow_keys_after_purge(t: &TestApp) -> Vec<String> {
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}shadow:*", t.prefix))
        .query_async(&mut t.app.redis.conn())
        .await
        .unwrap();
    assert!(
        left.iter()
            .all(|k| k.ends_with(":settle") || k.contains(":stats:")),
        "shadow keys left after the purge: {left:?}"
    );
    left
}

/// What the real side holds: every real Redis key with its value, the real tables, and
/// the award and booking metric series.
async fn real_state(t: &TestApp) -> (Vec<(String, Vec<u8>)>, Vec<i64>, Vec<String>) {
    let shadow_prefix = format!("{}shadow:", t.prefix);
    let mut conn = t.app.redis.conn();
    let mut redis: Vec<(String, Vec<u8>)> = Vec::new();
    for (key, dump) in t.redis_snapshot().await {
        if key.starts_with(&shadow_prefix) {
            continue;
        }
        // A settlement stream's dump holds its consumers' last-seen times, which the
        // real worker's polling moves: its length and entries are what must not change.
        if key.ends_with(":settle") {
            let entries: redis::Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            redis.push((key, format!("{entries:?}").into_bytes()));
        } else {
            redis.push((key, dump));
        }
    }
    let mut sql = Vec::new();
    for q in [
        "SELECT COUNT(*) FROM ledger_entries",
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS SIGNED) FROM ledger_entries",
        "SELECT COUNT(*) FROM accounts",
        "SELECT CAST(COALESCE(SUM(balance_cents), 0) AS SIGNED) FROM accounts",
        "SELECT COUNT(*) FROM withdrawals",
        "SELECT COUNT(*) FROM activities",
        "SELECT CAST(COALESCE(SUM(budget_cents), 0) AS SIGNED) FROM activities",
        "SELECT COUNT(*) FROM budget_grants",
        "SELECT COUNT(*) FROM reconciliation_reports",
    ] {
        sql.push(t.sql_i64(q).await);
    }
    let metrics = t.metrics_text().await;
    // Sorted: the exporter's order of series is not stable.
    let mut series: Vec<String> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("rpw_awards_total")
                || l.starts_with("rpw_booked_tokens_total")
                || l.starts_with("rpw_award_request_duration_seconds_count")
                || l.starts_with("rpw_withdraw")
        })
        .map(str::to_string)
        .collect();
    series.sort();
    (redis, sql, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_traffic_runs_the_real_code_and_touches_no_real_data() {
    let t = spawn_app_with(shadow_options()).await;
    // Real money first: an activity, an award, a booked balance.
    t.open_activity("cny2027", 10_000, 500).await;
    issue_all(&t, vec![award(7, 1, 100)]).await;
    let stats_key = t.app.redis.stats_key("cny2027");
    for _ in 0..100 {
        if t.sql_i64("SELECT COUNT(*) FROM ledger_entries").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The real award booked and its stats flushed: the real side is at rest.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = real_state(&t).await;
    assert_eq!(before.1[0], 1, "the real award is booked");

    // The same activity id and user in the shadow: an activity with its own budget,
    // awards, a wallet, a withdrawal forcing settlement, a payout result, stats.
    let now = chrono::Utc::now();
    let (s, b) = shadow_post(
        &t,
        "/v1/admin/activities",
        ADMIN,
        &json!({"id": "cny2027", "name": "Load test", "stage": "live",
                "starts_at": (now - chrono::Duration::seconds(60)).to_rfc3339(),
                "ends_at": (now + chrono::Duration::seconds(3600)).to_rfc3339(),
                "budget_cents": 1_000_000, "max_award_cents": 1_000}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = shadow_post(
        &t,
        "/v1/admin/activities/cny2027/scenes",
        ADMIN,
        &json!({"id": "rain", "name": "Cash rain", "award_type": "cash"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let awards: Vec<Value> = (0..50).map(|i| award(7, 100 + i, 20)).collect();
    let (s, b) = shadow_post(&t, "/v1/awards:batch", CALLER, &json!({ "awards": awards })).await;
    assert_eq!(s, 200, "{b}");
    assert!(
        b["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["error"].is_null()),
        "{b}"
    );
    let (s, b) = shadow_post(&t, "/v1/awards", CALLER, &award(7, 999, 30)).await;
    assert_eq!(s, 201, "{b}");
    let jwt = t.jwt(7);
    let (s, wallet) = shadow_get(&t, "/v1/wallet", &jwt).await;
    assert_eq!(s, 200, "{wallet}");
    assert_eq!(
        wallet["balance_cents"],
        50 * 20 + 30,
        "the shadow wallet holds shadow awards only"
    );
    let (s, w) = shadow_post(
        &t,
        "/v1/withdrawals",
        &jwt,
        &json!({"request_id": "load-1", "amount_cents": 600}),
    )
    .await;
    assert_eq!(s, 201, "{w}");
    let id = w["withdrawal_id"].as_str().unwrap().to_string();
    let (s, r) = shadow_post(
        &t,
        &format!("/v1/withdrawals/{id}/result"),
        CALLER,
        &json!({"status": "paid"}),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (s, wallet) = shadow_get(&t, "/v1/wallet", &jwt).await;
    assert_eq!(s, 200);
    assert_eq!(wallet["balance_cents"], 50 * 20 + 30 - 600);
    // The shadow app's worker books its backlog into the shadow ledger.
    let shadow = &t.app.shadow.as_ref().expect("shadow app built").app;
    let mut booked = 0;
    for _ in 0..100 {
        booked = sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'award'",
        )
        .fetch_one(shadow.db.main())
        .await
        .unwrap();
        if booked == 51 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(booked, 51, "shadow awards booked in the shadow ledger");
    // Let the stats flush run twice.
    tokio::time::sleep(Duration::from_millis(600)).await;

    // Nothing real moved: Redis, MySQL, metrics, the real wallet and stats.
    let after = real_state(&t).await;
    assert_eq!(after.1, before.1, "real tables changed");
    assert_eq!(after.2, before.2, "real metric series changed");
    let changed: Vec<&String> = after
        .0
        .iter()
        .filter(|kv| !before.0.contains(kv))
        .map(|(k, _)| k)
        .chain(
            before
                .0
                .iter()
                .filter(|kv| !after.0.contains(kv))
                .map(|(k, _)| k),
        )
        .filter(|k| !k.contains(":lock:"))
        .collect();
    assert!(
        changed.is_empty(),
        "real Redis keys changed: {changed:?} (stats key {stats_key})"
    );
    assert_eq!(t.wallet(7).await["balance_cents"], 100);
    let (_, stats) = t.get("/v1/activities/cny2027/stats", None).await;
    assert_eq!(
        (
            stats["issued_count"].as_i64(),
            stats["issued_cents"].as_i64()
        ),
        (Some(1), Some(100))
    );
    let (_, stats) = shadow_get(&t, "/v1/activities/cny2027/stats", CALLER).await;
    assert_eq!(stats["issued_count"], 51, "{stats}");

    // A header value other than 1 or 0 is refused and changes nothing; 0 is real.
    let (s, b) = send(
        &t,
        reqwest::Method::POST,
        "/v1/awards",
        CALLER,
        Some(&award(7, 5, 10)),
        "true",
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (s, _) = send(&t, reqwest::Method::GET, "/v1/wallet", &jwt, None, "0").await;
    assert_eq!(s, 200);
    assert_eq!(real_state(&t).await.1, before.1);

    // Expiry: once the marker lapses, the purge drops every shadow key and row.
    let shadow_state = t.app.shadow.as_ref().unwrap();
    assert!(
        !shadow_state.expiry.purge_if_expired(shadow).await.unwrap(),
        "alive: kept"
    );
    lapse(&t).await;
    assert!(shadow_state.expiry.purge_if_expired(shadow).await.unwrap());
    shadow_keys_after_purge(&t).await;
    let rows = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ledger_entries")
        .fetch_one(shadow.db.main())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(real_state(&t).await.1, before.1);
    assert_eq!(t.wallet(7).await["balance_cents"], 100);

    // `shadow-purge`, for a deployment that stopped while its shadow data was alive
    // (run here beside the instance, whose own check comes once a minute): it drops the
    // data once the marker lapses, and keeps it while shadow traffic comes.
    let (status, body) = shadow_get(&t, "/v1/wallet", &jwt).await;
    assert_eq!(status, 200, "{body}");
    let app = t.app.clone();
    let prefix = t.prefix.clone();
    let mut conn = app.redis.conn();
    let left_behind = format!("{prefix}shadow:{{3}}:tok:9");
    let _: () = redis::cmd("HSET")
        .arg(&left_behind)
        .arg("9_cny2027_rain_1_cash_live")
        .arg("token bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    let purge = || redpacket_wallet::shadow::purge_lapsed(&app.settings);
    assert!(!purge().await.unwrap());
    let kept: i64 = redis::cmd("EXISTS")
        .arg(&left_behind)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, 1, "alive: kept");
    // A shadow row the command's purge must empty too.
    sqlx::query(
        "INSERT INTO flagged_users (user_id, reason, flagged_at_ms) VALUES (9, 'burst', 1)",
    )
    .execute(shadow.db.main())
    .await
    .unwrap();
    lapse(&t).await;
    assert!(purge().await.unwrap());
    let left = shadow_keys_after_purge(&t).await;
    assert!(!left.contains(&left_behind));
    let rows = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM flagged_users")
        .fetch_one(shadow.db.main())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(real_state(&t).await.1, before.1);
    assert_eq!(t.wallet(7).await["balance_cents"], 100);
    t.stop().await;
}
