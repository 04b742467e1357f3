//! Webhook subscriptions (main database) and the operator's view of their deliveries
//! (on every database that holds events).

use std::sync::Arc;

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::EventType;
use crate::error::{Error, Result};
use crate::store::Db;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NewSubscription {
    /// http:// or https://.
    pub url: String,
    /// Event types: withdrawal.submitted, withdrawal.paid, withdrawal.failed,
    /// activity.drained, reconciliation.mismatch, budget.low.
    pub events: Vec<String>,
    /// 16-256 characters; signs every delivery (X-RPW-Signature).
    pub secret: String,
}

/// A subscription as operators see it (the secret is never shown again).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Subscription {
    pub id: i64,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// One delivery of one event to one subscription, with its attempts so far.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub order_key: String,
    /// pending, delivered, gave_up or dropped.
    pub state: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The subscriptions capability. Cheap to clone.
#[derive(Clone)]
pub struct Subscriptions {
    db: Arc<Db>,
}

/// Checks a new subscription before anything is written.
fn parse_new(body: NewSubscription) -> Result<(String, Vec<EventType>, String)> {
    let url = body.url.trim().to_string();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok || url.len() > 2048 || url.contains(char::is_whitespace) {
        return Err(Error::InvalidRequest(
            "url must be an http:// or https:// URL of at most 2048 characters".into(),
        ));
    }
    if body.events.is_empty() || body.events.len() > EventType::ALL.len() {
        return Err(Error::InvalidRequest(
            "events must name 1 to 6 event types".into(),
        ));
    }
    let mut events = Vec::new();
    for name in &body.events {
        let kind = EventType::parse(name).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "events: unknown event type `{name}` (known: {})",
                EventType::ALL.map(|t| t.as_str()).join(", ")
            ))
        })?;
        if !events.contains(&kind) {
            events.push(kind);
        }
    }
    if body.secret.len() < 16 || body.secret.len() > 256 {
        return Err(Error::InvalidRequest(
            "secret must be 16-256 characters".into(),
        ));
    }
    Ok((url, events, body.secret))
}

fn utc(t: Option<NaiveDateTime>) -> Option<chrono::DateTime<chrono::Utc>> {
    t.map(|t| t.and_utc())
}

impl Subscriptions {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    pub async fn create(&self, body: NewSubscription) -> Result<Subscription> {
        let (url, events, secret) = parse_new(body)?;
        let names: Vec<&str> = events.iter().map(|e| e.as_str()).collect();
        let id =
            sqlx::query("INSERT INTO webhook_subscriptions (url, events, secret) VALUES (?, ?, ?)")
                .bind(&url)
                .bind(names.join(","))
                .bind(secret.as_bytes())
                .execute(self.db.main())
                .await?
                .last_insert_id() as i64;
        self.get(id)
            .await?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("subscription {id} vanished")))
    }

    pub async fn get(&self, id: i64) -> Result<Option<Subscription>> {
        Ok(self.list_where(Some(id)).await?.into_iter().next())
    }

    pub async fn list(&self) -> Result<Vec<Subscription>> {
        self.list_where(None).await
    }

    async fn list_where(&self, id: Option<i64>) -> Result<Vec<Subscription>> {
        let rows = sqlx::query(
            "SELECT id, url, events, created_at FROM webhook_subscriptions WHERE deleted_at IS NULL AND (? IS NULL OR id = ?) ORDER BY id",
        )
        .bind(id)
        .bind(id)
        .fetch_all(self.db.main())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Subscription {
                    id: r.try_get(0)?,
                    url: r.try_get(1)?,
                    events: r
                        .try_get::<String, _>(2)?
                        .split(',')
                        .map(str::to_string)
                        .collect(),
                    created_at: r.try_get::<NaiveDateTime, _>(3)?.and_utc(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Deletes the subscription; its deliveries not made yet are dropped.
    pub async fn delete(&self, id: i64) -> Result<()> {
        let deleted = sqlx::query(
            "UPDATE webhook_subscriptions SET deleted_at = CURRENT_TIMESTAMP(3) WHERE id = ? AND deleted_at IS NULL",
        )
        .bind(id)
        .execute(self.db.main())
        .await?
        .rows_affected();
        if deleted == 0 {
            return Err(Error::NotFound(format!("no webhook `{id}`")));
        }
        for pool in self.db.shards() {
            sqlx::query("UPDATE webhook_deliveries SET state = 'dropped' WHERE subscription_id = ? AND state = 'pending'")
                .bind(id)
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// The subscription's deliveries, newest first, over every database.
    pub async fn deliveries(&self, id: i64, limit: u32) -> Result<Vec<Delivery>> {
        if self.get(id).await?.is_none() {
            return Err(Error::NotFound(format!("no webhook `{id}`")));
        }
        let mut out = Vec::new();
        for pool in self.db.shards() {
            let rows = sqlx::query(
                "SELECT e.id, e.type, d.order_key, d.state, d.attempts, d.last_status, d.last_error, d.last_attempt_at, d.next_attempt_at, d.delivered_at, d.created_at FROM webhook_deliveries d JOIN events e ON e.seq = d.event_seq WHERE d.subscription_id = ? ORDER BY d.id DESC LIMIT ?",
            )
            .bind(id)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            for r in rows {
                let state: String = r.try_get(3)?;
                out.push(Delivery {
                    event_id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    order_key: r.try_get(2)?,
                    attempts: r.try_get(4)?,
                    last_status: r.try_get(5)?,
                    last_error: r.try_get(6)?,
                    last_attempt_at: utc(r.try_get(7)?),
                    next_attempt_at: if state == "pending" {
                        utc(r.try_get(8)?)
                    } else {
                        None
                    },
                    delivered_at: utc(r.try_get(9)?),
                    created_at: r.try_get::<NaiveDateTime, _>(10)?.and_utc(),
                    state,
                });
            }
        }
        out.sort_by_key(|d| std::cmp::Reverse(d.created_at));
        out.truncate(limit as usize);
        Ok(out)
    }
}
