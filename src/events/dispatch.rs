//! The dispatcher: fans events out to the subscriptions that want them, then delivers
//! due deliveries, on every database that holds events. Any number of instances may
//! run it: a delivery is leased by the instance sending it (`webhooks.lease_ms`), so it
//! is sent by one at a time, and again only if that one did not record the outcome (a
//! crash): at least once. A delivery waits while an earlier one of the same key (a
//! withdrawal) to the same subscription is pending: in order per withdrawal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use futures::StreamExt;
use sqlx::{MySqlPool, Row};
use tokio::sync::watch;

use super::{signature, Envelope};
use crate::config::WebhookSettings;
use crate::store::Db;

/// Fan-out and delivery rows taken per database per round.
const FAN_OUT_BATCH: u32 = 200;

/// The dispatcher of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    db: Arc<Db>,
    settings: WebhookSettings,
    client: reqwest::Client,
}

struct Target {
    url: String,
    secret: Vec<u8>,
    events: Vec<String>,
}

/// One leased delivery and what sending it needs.
struct Due {
    id: i64,
    attempts: i32,
    event_id: String,
    kind: String,
    data: String,
    created_at: NaiveDateTime,
    subscription: i64,
}

enum Sent {
    Delivered(u16),
    Failed(Option<u16>, String),
}

impl Dispatcher {
    pub fn new(db: Arc<Db>, settings: WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.timeout_ms.min(5_000)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("redpacket-wallet/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            db,
            settings,
            client,
        })
    }

    /// Runs until `stop` turns true.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let idle = Duration::from_millis(self.settings.poll_ms.max(10));
            loop {
                if *stop.borrow() {
                    break;
                }
                let busy = match self.round().await {
                    Ok(busy) => busy,
                    Err(err) => {
                        tracing::warn!(
                            error = format!("{err:#}"),
                            "webhook dispatch round failed; will retry"
                        );
                        false
                    }
                };
                if !busy {
                    tokio::select! {
                        _ = tokio::time::sleep(idle) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        })
    }

    /// One pass over every database: fan out, then deliver what is due. True when it
    /// found work (so the next pass follows at once).
    pub async fn round(&self) -> anyhow::Result<bool> {
        let targets = self.targets().await?;
        let mut busy = false;
        for pool in self.db.shards() {
            busy |= self.fan_out(pool, &targets).await?;
            busy |= self.deliver_due(pool, &targets).await?;
        }
        Ok(busy)
    }

    async fn targets(&self) -> anyhow::Result<HashMap<i64, Target>> {
        let rows = sqlx::query(
            "SELECT id, url, secret, events FROM webhook_subscriptions WHERE deleted_at IS NULL",
        )
        .fetch_all(self.db.main())
        .await?;
        let mut out = HashMap::new();
        for r in rows {
            out.insert(
                r.try_get::<i64, _>(0)?,
                Target {
                    url: r.try_get(1)?,
                    secret: r.try_get(2)?,
                    events: r
                        .try_get::<String, _>(3)?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                },
            );
        }
        Ok(out)
    }

    /// Turns events not fanned out yet into one delivery per subscription that wants
    /// them (a repeat by another instance inserts nothing twice).
    async fn fan_out(
        &self,
        pool: &MySqlPool,
        targets: &HashMap<i64, Target>,
    ) -> anyhow::Result<bool> {
        let events: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, type, order_key FROM events WHERE fanned_out = 0 ORDER BY seq LIMIT ?",
        )
        .bind(FAN_OUT_BATCH)
        .fetch_all(pool)
        .await?;
        if events.is_empty() {
            return Ok(false);
        }
        let mut tx = pool.begin().await?;
        for (seq, kind, order_key) in &events {
            for (sub, target) in targets {
                if target.events.iter().any(|e| e == kind) {
                    sqlx::query("INSERT IGNORE INTO webhook_deliveries (subscription_id, event_seq, order_key) VALUES (?, ?, ?)")
                        .bind(sub)
                        .bind(seq)
                        .bind(order_key)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        let last = events.last().map(|e| e.0).unwrap_or(0);
        sqlx::query("UPDATE events SET fanned_out = 1 WHERE fanned_out = 0 AND seq <= ?")
            .bind(last)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Leases the due deliveries that no earlier pending one of their key holds back,
    /// sends them (at most `webhooks.concurrency` at once) and records each outcome.
    async fn deliver_due(
        &self,
        pool: &MySqlPool,
        targets: &HashMap<i64, Target>,
    ) -> anyhow::Result<bool> {
        let candidates: Vec<(i64,)> = sqlx::query_as(
            "SELECT d.id FROM webhook_deliveries d WHERE d.state = 'pending' AND d.next_attempt_at <= CURRENT_TIMESTAMP(3) \
             AND (d.leased_until IS NULL OR d.leased_until < CURRENT_TIMESTAMP(3)) \
             AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.subscription_id = d.subscription_id \
                 AND e.order_key = d.order_key AND e.state = 'pending' AND e.event_seq < d.event_seq) \
             ORDER BY d.event_seq LIMIT ?",
        )
        .bind(self.settings.concurrency as u32)
        .fetch_all(pool)
        .await?;
        if candidates.is_empty() {
            return Ok(false);
        }
        let mut leased = Vec::new();
        for (id,) in candidates {
            let taken = sqlx::query(
                "UPDATE webhook_deliveries SET leased_until = CURRENT_TIMESTAMP(3) + INTERVAL ? MICROSECOND \
                 WHERE id = ? AND state = 'pending' AND (leased_until IS NULL OR leased_until < CURRENT_TIMESTAMP(3))",
            )
            .bind(self.settings.lease_ms * 1000)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected();
            if taken == 1 {
                leased.push(id);
            }
        }
        let mut due = Vec::with_capacity(leased.len());
        for id in leased {
            let row = sqlx::query(
                "SELECT d.id, d.attempts, e.id, e.type, e.data, e.created_at, d.subscription_id FROM webhook_deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.id = ?",
            )
            .bind(id)
            .fetch_one(pool)
            .await?;
            due.push(Due {
                id: row.try_get(0)?,
                attempts: row.try_get(1)?,
                event_id: row.try_get(2)?,
                kind: row.try_get(3)?,
                data: row.try_get(4)?,
                created_at: row.try_get(5)?,
                subscription: row.try_get(6)?,
            });
        }
        let outcomes: Vec<(Due, Option<Sent>)> = futures::stream::iter(due)
            .map(|d| async move {
                let sent = match targets.get(&d.subscription) {
                    Some(target) => Some(self.send(target, &d).await),
                    None => None,
                };
                (d, sent)
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        for (d, sent) in outcomes {
            self.record(pool, &d, sent).await?;
        }
        Ok(true)
    }

    async fn send(&self, target: &Target, d: &Due) -> Sent {
        let data = match serde_json::value::RawValue::from_string(d.data.clone()) {
            Ok(raw) => raw,
            Err(err) => return Sent::Failed(None, format!("stored event data unreadable: {err}")),
        };
        let body = match serde_json::to_vec(&Envelope {
            id: &d.event_id,
            kind: &d.kind,
            created_at: d
                .created_at
                .and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data: &data,
        }) {
            Ok(b) => b,
            Err(err) => return Sent::Failed(None, err.to_string()),
        };
        let sig = signature(&target.secret, Utc::now(), &body);
        let result = self
            .client
            .post(&target.url)
            .header("content-type", "application/json")
            .header("x-rpw-signature", sig)
            .header("x-rpw-event-id", &d.event_id)
            .header("x-rpw-event-type", &d.kind)
            .body(body)
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().is_success() => Sent::Delivered(resp.status().as_u16()),
            Ok(resp) => Sent::Failed(
                Some(resp.status().as_u16()),
                format!("answered {}", resp.status()),
            ),
            Err(err) => Sent::Failed(None, error_text(&err)),
        }
    }

    /// Records an attempt: delivered; or failed, to be retried after a doubling wait
    /// (capped), or given up once the event is older than `give_up_after_secs`; or
    /// dropped when its subscription is gone.
    async fn record(&self, pool: &MySqlPool, d: &Due, sent: Option<Sent>) -> anyhow::Result<()> {
        match sent {
            None => {
                sqlx::query("UPDATE webhook_deliveries SET state = 'dropped', leased_until = NULL WHERE id = ?")
                    .bind(d.id)
                    .execute(pool)
                    .await?;
            }
            Some(Sent::Delivered(status)) => {
                crate::metrics::webhook_delivery("delivered");
                sqlx::query(
                    "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1, last_status = ?, last_error = NULL, \
                     last_attempt_at = CURRENT_TIMESTAMP(3), delivered_at = CURRENT_TIMESTAMP(3), leased_until = NULL WHERE id = ?",
                )
                .bind(status as i32)
                .bind(d.id)
                .execute(pool)
                .await?;
            }
            Some(Sent::Failed(status, error)) => {
                let age = Utc::now().naive_utc() - d.created_at;
                let give_up = age.num_seconds() >= self.settings.give_up_after_secs as i64;
                crate::metrics::webhook_delivery(if give_up { "gave_up" } else { "failed" });
                let wait = backoff_ms(&self.settings, d.attempts + 1);
                tracing::warn!(
                    delivery = d.id,
                    event = %d.event_id,
                    attempts = d.attempts + 1,
                    error = %error,
                    retry_in_ms = if give_up { 0 } else { wait },
                    "webhook delivery failed"
                );
                let error: String = error.chars().take(500).collect();
                sqlx::query(
                    "UPDATE webhook_deliveries SET state = IF(?, 'gave_up', 'pending'), attempts = attempts + 1, last_status = ?, last_error = ?, \
                     last_attempt_at = CURRENT_TIMESTAMP(3), next_attempt_at = CURRENT_TIMESTAMP(3) + INTERVAL ? MICROSECOND, leased_until = NULL WHERE id = ?",
                )
                .bind(give_up)
                .bind(status.map(i32::from))
                .bind(error)
                .bind(wait * 1000)
                .bind(d.id)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }
}

/// The wait before attempt `attempts + 1`: `retry_base_ms` doubled per failed attempt,
/// capped at `retry_max_ms`, plus up to a tenth of it at random (so receivers coming
/// back are not hit by every retry at once).
pub fn backoff_ms(settings: &WebhookSettings, attempts: i32) -> u64 {
    let doublings = (attempts.max(1) - 1).min(40) as u32;
    let wait = settings
        .retry_base_ms
        .saturating_mul(1u64 << doublings)
        .min(settings.retry_max_ms);
    wait + rand::random::<u64>() % (wait / 10 + 1)
}

fn error_text(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timed out".into()
    } else if err.is_connect() {
        "could not connect".into()
    } else {
        err.to_string()
    }
}
