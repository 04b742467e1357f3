//! Degradation switches: operators flip them at run time; every instance sees the change
//! within a second (they live in one Redis hash, polled by each instance). A change and a
//! poll of this instance are serialized, so a poll that read the hash before a change
//! never puts the old state back after it.
//!
//! | switch | effect when on |
//! |---|---|
//! | `issue_off` | `POST /v1/awards*` answer 503 `unavailable`; nothing is issued |
//! | `booking_paused` | the accounting worker and the cron sweep book nothing (the backlog grows); withdrawals still force-settle |
//! | `sync_off` | `POST /v1/wallet/tokens:sync` answers 503 `unavailable` |
//! | `views_fallback` | when MySQL fails and the account snapshot cannot prove the view exact, `GET /v1/wallet` answers from Redis anyway, marked `"degraded": true` |

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::AsyncCommands;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::Redis;

pub const SWITCHES: [(&str, &str); 4] = [
    (
        "issue_off",
        "award endpoints answer 503 unavailable; nothing is issued",
    ),
    (
        "booking_paused",
        "the accounting worker and the cron sweep book nothing; withdrawals still force-settle",
    ),
    ("sync_off", "client token sync answers 503 unavailable"),
    (
        "views_fallback",
        "when MySQL fails and the account snapshot cannot prove the view exact, the wallet view is served from Redis anyway and marked degraded",
    ),
];

#[derive(Default)]
pub struct Switches {
    issue_off: AtomicBool,
    booking_paused: AtomicBool,
    sync_off: AtomicBool,
    views_fallback: AtomicBool,
    /// Held by a poll from its read to its store, and by a change likewise.
    writing: tokio::sync::Mutex<()>,
}

impl Switches {
    fn flag(&self, name: &str) -> Option<&AtomicBool> {
        match name {
            "issue_off" => Some(&self.issue_off),
            "booking_paused" => Some(&self.booking_paused),
            "sync_off" => Some(&self.sync_off),
            "views_fallback" => Some(&self.views_fallback),
            _ => None,
        }
    }
    pub fn issue_off(&self) -> bool {
        self.issue_off.load(Ordering::Relaxed)
    }
    pub fn booking_paused(&self) -> bool {
        self.booking_paused.load(Ordering::Relaxed)
    }
    pub fn sync_off(&self) -> bool {
        self.sync_off.load(Ordering::Relaxed)
    }
    pub fn views_fallback(&self) -> bool {
        self.views_fallback.load(Ordering::Relaxed)
    }

    /// Reads the shared state from Redis.
    pub async fn refresh(&self, redis: &Redis) -> redis::RedisResult<()> {
        let _writing = self.writing.lock().await;
        let mut conn = redis.conn();
        let stored: HashMap<String, String> = conn.hgetall(redis.switches_key()).await?;
        for (name, _) in SWITCHES {
            let on = stored.get(name).is_some_and(|v| v == "1");
            if let Some(flag) = self.flag(name) {
                flag.store(on, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    pub async fn set(&self, redis: &Redis, name: &str, on: bool) -> Result<()> {
        let flag = self
            .flag(name)
            .ok_or_else(|| Error::NotFound(format!("no switch `{name}`")))?;
        let _writing = self.writing.lock().await;
        let mut conn = redis.conn();
        let _: () = conn
            .hset(redis.switches_key(), name, if on { "1" } else { "0" })
            .await?;
        flag.store(on, Ordering::Relaxed);
        tracing::warn!(switch = name, on, "degradation switch changed");
        Ok(())
    }

    pub fn list(&self) -> Vec<SwitchView> {
        SWITCHES
            .iter()
            .map(|(name, effect)| SwitchView {
                name,
                on: self.flag(name).is_some_and(|f| f.load(Ordering::Relaxed)),
                effect,
            })
            .collect()
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SwitchView {
    pub name: &'static str,
    pub on: bool,
    pub effect: &'static str,
}
