//! Events to webhooks (API.md, "Events"), with a receiver started by the test: signed
//! deliveries, in order per withdrawal, retried after failures with the same event id,
//! kept in the outbox across a restart, visible to operators.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

const SECRET: &str = "receiver-secret-0123456789";

/// A receiver: records every request; answers 500 to the first `fail_first`.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    fail_first: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(fail_first: usize) -> (Receiver, String) {
        let r = Receiver::default();
        r.fail_first.store(fail_first, Ordering::SeqCst);
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    state.got.lock().unwrap().push((headers, body));
                    let failing = state
                        .fail_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, url)
    }

    /// Every request so far: (event body, signature header).
    fn requests(&self) -> Vec<(Value, String)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(h, b)| {
                (
                    serde_json::from_slice(b).unwrap(),
                    h["x-rpw-signature"].to_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn wait_for(&self, what: &str, n: usize) -> Vec<(Value, String)> {
        for _ in 0..200 {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "waited for {n} requests ({what}); got {:?}",
            self.requests()
        );
    }
}

/// Checks `X-RPW-Signature` over the raw body as a receiver would (HMAC-SHA256 of
/// "<t>.<body>"), and that `t` is recent.
fn verify(headers: &HeaderMap, body: &[u8]) {
    let sig = headers["x-rpw-signature"].to_str().unwrap();
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .expect("t=...,v1=...");
    let t: i64 = t.parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - t).abs() < 60, "{sig}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(body);
    let expected = redpacket_wallet::domain::hex(ring::hmac::sign(&key, &message).as_ref());
    assert_eq!(v1, expected, "signature over the raw body");
    let wrong = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another-secret-000000");
    assert!(ring::hmac::verify(&wrong, &message, &hex(v1)).is_err());
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fast_retries() -> Vec<(String, String)> {
    [
        ("RPW_WEBHOOKS__POLL_MS", "50"),
        ("RPW_WEBHOOKS__RETRY_BASE_MS", "100"),
        ("RPW_WEBHOOKS__RETRY_MAX_MS", "400"),
        // Long enough that a loaded machine's slow answer is not taken for a failure.
        ("RPW_WEBHOOKS__TIMEOUT_MS", "10000"),
        ("RPW_WEBHOOKS__LEASE_MS", "20000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn spawn_fast() -> TestApp {
    spawn_app_with(Options {
        env: fast_retries(),
        ..Default::default()
    })
    .await
}

/// A subscription's deliveries as the operator sees them (status 200 checked).
async fn deliveries(t: &TestApp, hook: i64) -> Vec<Value> {
    let (status, body) = t
        .get(
            &format!("/v1/admin/webhooks/{hook}/deliveries"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["deliveries"].as_array().unwrap().clone()
}

async fn subscribe(t: &TestApp, url: &str, events: &[&str]) -> i64 {
    let (status, body) = t
        .post(
            "/v1/admin/webhooks",
            ADMIN,
            &json!({"url": url, "events": events, "secret": SECRET}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["url"], url);
    assert!(body.get("secret").is_none(), "the secret is never shown");
    body["id"].as_i64().unwrap()
}

async fn withdraw(t: &TestApp, user: i64, request: &str, cents: i64) -> String {
    let (status, body) = t
        .post(
            "/v1/withdrawals",
            &t.jwt(user),
            &json!({"request_id": request, "amount_cents": cents}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["withdrawal_id"].as_str().unwrap().to_string()
}

async fn payout(t: &TestApp, id: &str, status: &str) {
    let (code, body) = t
        .post(
            &format!("/v1/withdrawals/{id}/result"),
            CALLER,
            &json!({ "status": status }),
        )
        .await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payout_channel_hears_of_each_withdrawal_signed_and_in_order() {
    let t = spawn_fast().await;
    let (rx, url) = Receiver::start(0).await;

    // Refused subscriptions change nothing.
    for (body, why) in [
        (
            json!({"url": "ftp://x", "events": ["withdrawal.paid"], "secret": SECRET}),
            "url",
        ),
        (
            json!({"url": url, "events": ["withdrawal.lost"], "secret": SECRET}),
            "unknown event type",
        ),
        (
            json!({"url": url, "events": [], "secret": SECRET}),
            "events",
        ),
        (
            json!({"url": url, "events": ["withdrawal.paid"], "secret": "short"}),
            "secret",
        ),
    ] {
        let (status, resp) = t.post("/v1/admin/webhooks", ADMIN, &body).await;
        assert_eq!(status, 400, "{body}: {resp}");
        assert!(
            resp["error"]["message"].as_str().unwrap().contains(why),
            "{resp}"
        );
    }
    let (status, _) = t
        .post(
            "/v1/admin/webhooks",
            CALLER,
            &json!({"url": url, "events": ["withdrawal.paid"], "secret": SECRET}),
        )
        .await;
    assert_eq!(status, 401);
    let (_, list) = t.get("/v1/admin/webhooks", Some(ADMIN)).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 0);

    let hook = subscribe(
        &t,
        &url,
        &[
            "withdrawal.submitted",
            "withdrawal.paid",
            "withdrawal.failed",
        ],
    )
    .await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    issue_all(&t, (0..12).map(|i| award(1 + i % 3, i, 100)).collect()).await;

    // Six withdrawals, each settled at once: paid or failed.
    let mut expected: HashMap<String, &str> = HashMap::new();
    for (i, user) in [1, 2, 3, 1, 2, 3].into_iter().enumerate() {
        let id = withdraw(&t, user, &format!("r{i}"), 50).await;
        let verdict = if i % 2 == 0 { "paid" } else { "failed" };
        payout(&t, &id, verdict).await;
        expected.insert(id, verdict);
    }
    let got = rx.wait_for("12 events", 12).await;
    assert_eq!(got.len(), 12, "each event once: {got:?}");
    for (headers, body) in rx.got.lock().unwrap().iter() {
        verify(headers, body);
        assert_eq!(headers["content-type"], "application/json");
    }
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for (event, _) in &got {
        assert!(
            ids.insert(event["id"].as_str().unwrap().to_string()),
            "event ids are unique"
        );
        assert!(event["created_at"].as_str().unwrap().ends_with('Z'));
        let w = event["data"]["withdrawal_id"].as_str().unwrap().to_string();
        assert_eq!(event["data"]["amount_cents"], 50);
        seen.entry(w)
            .or_default()
            .push(event["type"].as_str().unwrap().to_string());
    }
    for (id, verdict) in &expected {
        assert_eq!(
            seen[id],
            [
                "withdrawal.submitted".to_string(),
                format!("withdrawal.{verdict}")
            ],
            "in order for {id}"
        );
    }
    // The operator sees each delivery, made at the first attempt. The receiver counts a
    // request before it answers, and the dispatcher records the answer after it.
    let mut seen_delivered = Vec::new();
    for _ in 0..200 {
        seen_delivered = deliveries(&t, hook).await;
        if seen_delivered.len() == 12 && seen_delivered.iter().all(|d| d["state"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deliveries = seen_delivered;
    assert_eq!(deliveries.len(), 12);
    for d in &deliveries {
        assert_eq!(d["state"], "delivered", "{d}");
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["last_status"], 204);
    }
    // Deleted: later events are not sent to it.
    let (status, _) = t
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/admin/webhooks/{hook}"),
            ADMIN,
            &Value::Null,
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = t
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/admin/webhooks/{hook}"),
            ADMIN,
            &Value::Null,
        )
        .await;
    assert_eq!(status, 404);
    withdraw(&t, 1, "after-delete", 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.requests().len(), 12, "nothing after the delete");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_same_event_again_until_it_answers() {
    let t = spawn_fast().await;
    let (rx, url) = Receiver::start(2).await;
    let hook = subscribe(&t, &url, &["withdrawal.submitted"]).await;
    // And a subscriber that is not there at all.
    let dead = subscribe(&t, "http://127.0.0.1:9/nobody", &["withdrawal.submitted"]).await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    issue_all(&t, vec![award(5, 1, 300)]).await;
    let withdrawn_at = Instant::now();
    let id = withdraw(&t, 5, "once", 120).await;

    let got = rx.wait_for("two failures and a success", 3).await;
    assert_eq!(got.len(), 3);
    let first = &got[0].0;
    assert_eq!(first["type"], "withdrawal.submitted");
    assert_eq!(first["data"]["withdrawal_id"], id.as_str());
    for (event, _) in &got {
        assert_eq!(
            event, first,
            "a retry is the same event, same id: receivers dedupe by it"
        );
    }
    let bodies: Vec<Bytes> = rx
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b.clone())
        .collect();
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "byte-identical bodies"
    );

    let mut delivered = Value::Null;
    for _ in 0..100 {
        delivered = deliveries(&t, hook).await[0].clone();
        if delivered["state"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered["state"], "delivered", "{delivered}");
    assert_eq!(delivered["attempts"], 3);
    assert_eq!(delivered["last_status"], 204);
    assert_eq!(delivered["event_id"], first["id"]);

    // The absent subscriber: attempts go on, spaced by the backoff, the error recorded.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let d = &deliveries(&t, dead).await[0];
    let elapsed_ms = withdrawn_at.elapsed().as_millis() as u64;
    assert_eq!(d["state"], "pending", "{d}");
    let attempts = d["attempts"].as_i64().unwrap();
    // Waits of at least 100, 200, 400, 400 ms... between attempts: no more attempts than
    // fit in the time since the event was made, and at least 2 in over a second.
    let (mut most, mut at, mut wait) = (1, 0, 100);
    loop {
        at += wait;
        if at > elapsed_ms {
            break;
        }
        most += 1;
        wait = (wait * 2).min(400);
    }
    assert!(
        (2..=most).contains(&attempts),
        "{attempts} attempts in {elapsed_ms} ms: {d}"
    );
    assert_eq!(d["last_error"], "could not connect", "{d}");
    assert!(d["next_attempt_at"].is_string());
    let metrics = t.metrics_text().await;
    let failed = metrics
        .lines()
        .find(|l| l.starts_with("rpw_webhook_deliveries_total{outcome=\"failed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failed >= 2.0 + attempts as f64 - 1.0, "{failed}");
    t.stop().await;
}

/// An event is written with its withdrawal: one made while no instance dispatches
/// (say, every instance was killed right after the commit) is delivered once one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waits_in_the_outbox_across_a_restart() {
    let mut env = fast_retries();
    env.push(("RPW_WEBHOOKS__DISPATCH".into(), "false".into()));
    let mut t = spawn_app_with(Options {
        env,
        ..Default::default()
    })
    .await;
    let (rx, url) = Receiver::start(0).await;
    subscribe(&t, &url, &["withdrawal.submitted", "withdrawal.paid"]).await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    issue_all(&t, vec![award(9, 1, 500)]).await;
    let id = withdraw(&t, 9, "before-restart", 200).await;
    payout(&t, &id, "paid").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.requests().is_empty(), "nothing dispatches yet");
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE order_key = ?")
        .bind(format!("withdrawal:{id}"))
        .fetch_one(
            t.app
                .db
                .for_user(redpacket_wallet::domain::UserId::parse(9).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(n, 2, "both events are in the outbox with their changes");

    t.restart(&[("RPW_WEBHOOKS__DISPATCH", "true")]).await;
    let got = rx.wait_for("the two events after the restart", 2).await;
    let types: Vec<&str> = got
        .iter()
        .map(|(e, _)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["withdrawal.submitted", "withdrawal.paid"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.requests().len(), 2, "each once");
    t.stop().await;
}

/// A reconciliation mismatch is an event too, written with its report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_mismatch_is_announced() {
    let hour = an_hour_to_work_in().await;
    let t = spawn_fast().await;
    let (rx, url) = Receiver::start(0).await;
    subscribe(&t, &url, &["reconciliation.mismatch"]).await;
    t.open_activity("cny2027", 1_000_000, 1_000).await;
    issue_all(&t, (0..5).map(|i| award(1, i, 10)).collect()).await;
    t.drain().await;
    let ok = t
        .app
        .reconciler
        .reconcile("cny2027", &hour, "manual")
        .await
        .unwrap();
    assert!(ok.ok);
    sqlx::query("DELETE FROM ledger_entries WHERE kind = 'award' LIMIT 1")
        .execute(t.app.db.main())
        .await
        .unwrap();
    let bad = t
        .app
        .reconciler
        .reconcile("cny2027", &hour, "manual")
        .await
        .unwrap();
    assert!(!bad.ok);
    let got = rx.wait_for("the mismatch", 1).await;
    assert_eq!(got.len(), 1, "only the mismatch, not the clean report");
    let event = &got[0].0;
    assert_eq!(event["type"], "reconciliation.mismatch");
    assert_eq!(event["data"]["activity_id"], "cny2027");
    assert!(
        event["data"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("disagree"),
        "{event}"
    );
    t.stop().await;
}
