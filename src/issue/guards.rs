//! Seckill guards (the seckill seed), in front of the budget: an operator-managed
//! **blacklist** of users and callers, and per scene ([`SceneGuards`]) an **open time**
//! before which awards are refused and the user flagged, **burst** flagging (a user's
//! requests reaching issuing more than once within one second), refusing **flagged**
//! users, and **one win per user** across rains. They compose with admission (random
//! fraction, then rate limits), which runs first; a replay of an award already issued
//! passes them (it changes nothing).
//!
//! Costs: the blacklist is a process-local copy of MySQL's table, refreshed with the
//! activity cache (and at once on this instance when an operator changes it); the open
//! time is a comparison; the Redis guards are one pipelined round trip per batch, and
//! only for scenes that turn them on. Flags are advisory data in Redis: a flush forgets
//! them.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use sqlx::Row;

use crate::activity::SceneGuards;
use crate::domain::UserId;
use crate::error::{Error, Result};
use crate::store::{Db, Redis};

/// Why a user was flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagReason {
    /// An award asked for before the scene's open time.
    Early,
    /// More than one request within one second.
    Burst,
}

impl FlagReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlagReason::Early => "early",
            FlagReason::Burst => "burst",
        }
    }
}

/// The operators' blacklist, as this instance holds it.
#[derive(Debug, Default)]
struct Blacklist {
    users: HashSet<i64>,
    callers: HashSet<String>,
}

/// One blacklist entry.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct BlacklistEntry {
    /// user or caller.
    pub kind: String,
    pub value: String,
    pub reason: String,
}

/// A flagged user.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Flagged {
    pub user_id: i64,
    /// early or burst: the last reason.
    pub reason: String,
    pub flagged_at_ms: i64,
}

/// An award the Redis guards look at.
/// How a scene is named in a user's one-win claims: `{activity}/{scene}` (scene ids are
/// unique within an activity only).
pub fn win_scene(activity: &str, scene: &str) -> String {
    format!("{activity}/{scene}")
}

pub struct Guarded<'a> {
    pub user: UserId,
    pub guards: &'a SceneGuards,
    /// [`win_scene`].
    pub scene: String,
    pub out_trade_no: &'a str,
}

pub struct Guards {
    redis: Arc<Redis>,
    db: Arc<Db>,
    list: RwLock<Arc<Blacklist>>,
}

impl Guards {
    pub fn new(redis: Arc<Redis>, db: Arc<Db>) -> Self {
        Self {
            redis,
            db,
            list: RwLock::default(),
        }
    }

    /// Reads the blacklist from MySQL into this instance.
    pub async fn refresh(&self) -> Result<()> {
        let rows = sqlx::query("SELECT kind, value FROM blacklist")
            .fetch_all(self.db.main())
            .await?;
        let mut list = Blacklist::default();
        for row in &rows {
            let kind = crate::ledger::text(row, 0)?;
            let value = crate::ledger::text(row, 1)?;
            match kind.as_str() {
                "user" => {
                    if let Ok(id) = value.parse() {
                        list.users.insert(id);
                    }
                }
                _ => {
                    list.callers.insert(value);
                }
            }
        }
        *self.list.write().expect("blacklist lock poisoned") = Arc::new(list);
        Ok(())
    }

    /// The guards that need no round trip: the blacklist and the scene's open time
    /// (`Some(flag)`: the user is to be flagged for it).
    pub fn check_local(
        &self,
        caller: &str,
        user: UserId,
        guards: &SceneGuards,
        now_ms: i64,
    ) -> std::result::Result<(), (Error, Option<FlagReason>)> {
        let list = self.list.read().expect("blacklist lock poisoned").clone();
        if list.callers.contains(caller) {
            crate::metrics::guard_refusal("blacklist");
            return Err((
                Error::Forbidden(format!("caller `{caller}` is blacklisted")),
                None,
            ));
        }
        if list.users.contains(&user.get()) {
            crate::metrics::guard_refusal("blacklist");
            return Err((
                Error::Forbidden(format!("user {user} is blacklisted")),
                None,
            ));
        }
        if let Some(opens) = guards.opens_at {
            if now_ms < opens.timestamp_millis() {
                crate::metrics::guard_refusal("early");
                return Err((
                    Error::ActivityClosed(format!("the scene opens at {}", opens.to_rfc3339())),
                    Some(FlagReason::Early),
                ));
            }
        }
        Ok(())
    }

    /// Flags users (best effort: flags are advisory).
    pub async fn flag(&self, users: &[(UserId, FlagReason)], now_ms: i64) {
        if users.is_empty() {
            return;
        }
        let (set, why) = self.redis.flagged_keys();
        let mut pipe = redis::pipe();
        for (user, reason) in users {
            crate::metrics::user_flagged(reason.as_str());
            pipe.zadd(&set, user.get(), now_ms).ignore();
            pipe.hset(&why, user.get(), reason.as_str()).ignore();
        }
        if let Err(err) = self.redis.query::<()>(&pipe).await {
            tracing::warn!(error = %err, "flagging users failed");
        }
    }

    /// The guards kept in Redis, for awards not issued before: bursts (flag), flagged
    /// users (refuse, where the scene says so) and one win per user (claimed here for
    /// this out_trade_no; [`Guards::release_wins`] gives a claim back when the award is
    /// not issued after all). One pipelined round trip.
    pub async fn check_shared(&self, awards: &[Guarded<'_>], now_ms: i64) -> Vec<Result<()>> {
        let (set, _) = self.redis.flagged_keys();
        // Every command answers (the pipeline runs per slot on a cluster): `n` counts
        // them all.
        let mut pipe = redis::pipe();
        let mut slots: Vec<(Option<usize>, Option<usize>, Option<usize>)> = Vec::new();
        let mut n = 0;
        for a in awards {
            let g = a.guards;
            let mut slot = (None, None, None);
            if g.flag_bursts {
                let key = self.redis.burst_key(a.user, now_ms / 1000);
                pipe.incr(&key, 1).pexpire(&key, 2_000);
                slot.0 = Some(n);
                n += 2;
            }
            if g.refuse_flagged {
                pipe.zscore(&set, a.user.get());
                slot.1 = Some(n);
                n += 1;
            }
            if g.one_win_per_user {
                let key = self.redis.wins_key(a.user);
                pipe.hset_nx(&key, &a.scene, a.out_trade_no)
                    .hget(&key, &a.scene);
                slot.2 = Some(n + 1);
                n += 2;
            }
            slots.push(slot);
        }
        if n == 0 {
            return awards.iter().map(|_| Ok(())).collect();
        }
        let values: Vec<redis::Value> = match self.redis.query(&pipe).await {
            Ok(values) => values,
            Err(err) => {
                let err = Error::from(err);
                return awards.iter().map(|_| Err(err.duplicate())).collect();
            }
        };
        let int = |i: usize| -> Option<i64> { redis::from_redis_value(&values[i]).ok() };
        let mut flags = Vec::new();
        let mut unclaim = Vec::new();
        let mut out = Vec::with_capacity(awards.len());
        for (a, (burst, flagged, win)) in awards.iter().zip(slots) {
            let bursting = burst.and_then(int).is_some_and(|count| count > 1);
            if bursting {
                flags.push((a.user, FlagReason::Burst));
            }
            let was_flagged = flagged.is_some_and(|i| values[i] != redis::Value::Nil);
            if a.guards.refuse_flagged && (was_flagged || bursting) {
                crate::metrics::guard_refusal("flagged");
                if a.guards.one_win_per_user {
                    // Claimed in the same round trip: given back.
                    unclaim.push((a.user, a.scene.clone(), a.out_trade_no.to_string()));
                }
                out.push(Err(Error::Forbidden(format!("user {} is flagged", a.user))));
                continue;
            }
            if let Some(i) = win {
                let holder: Option<String> = redis::from_redis_value(&values[i]).ok();
                if holder.as_deref() != Some(a.out_trade_no) {
                    crate::metrics::guard_refusal("one_win");
                    out.push(Err(Error::AlreadyWon(format!(
                        "user {} already won scene {}",
                        a.user, a.scene
                    ))));
                    continue;
                }
            }
            out.push(Ok(()));
        }
        self.flag(&flags, now_ms).await;
        self.release_wins(&unclaim).await;
        out
    }

    /// Gives back one-win claims of awards that were not issued: a claim goes only when
    /// it is this award's and no token of that out_trade_no is held (a twin request of
    /// the same award may have issued it), checked atomically in the user's slot. Best
    /// effort: a claim left behind refuses that user's next win of the scene.
    pub async fn release_wins(&self, claims: &[(UserId, String, String)]) {
        if claims.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (user, scene, otn) in claims {
            pipe.cmd("EVAL")
                .arg(
                    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] \
                     and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then \
                     return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
                )
                .arg(2)
                .arg(self.redis.wins_key(*user))
                .arg(self.redis.tokens_key(*user))
                .arg(scene)
                .arg(otn);
        }
        if let Err(err) = self.redis.query::<()>(&pipe).await {
            tracing::warn!(error = %err, "releasing one-win claims failed");
        }
    }

    /// The flagged users, the latest first.
    pub async fn flagged(&self, limit: usize) -> Result<Vec<Flagged>> {
        let (set, why) = self.redis.flagged_keys();
        let mut conn = self.redis.conn();
        let users: Vec<(i64, f64)> = redis::cmd("ZREVRANGE")
            .arg(&set)
            .arg(0)
            .arg(limit.saturating_sub(1) as i64)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(users.len());
        for (user, at) in users {
            let reason: Option<String> = redis::AsyncCommands::hget(&mut conn, &why, user).await?;
            out.push(Flagged {
                user_id: user,
                reason: reason.unwrap_or_default(),
                flagged_at_ms: at as i64,
            });
        }
        Ok(out)
    }

    /// Adds or removes a blacklist entry, then reloads this instance's copy (others
    /// see it at their next refresh).
    pub async fn set_blacklisted(
        &self,
        kind: &str,
        value: &str,
        reason: &str,
        on: bool,
    ) -> Result<()> {
        if !matches!(kind, "user" | "caller") {
            return Err(Error::InvalidRequest("kind must be user or caller".into()));
        }
        if kind == "user" {
            UserId::parse(
                value
                    .parse::<i64>()
                    .map_err(|_| Error::InvalidRequest("value must be a user id".into()))?,
            )?;
        }
        if value.is_empty() || value.len() > 64 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidRequest(
                "value must be 1-64 visible ASCII characters".into(),
            ));
        }
        if reason.chars().count() > 200 {
            return Err(Error::InvalidRequest(
                "reason must be at most 200 characters".into(),
            ));
        }
        if on {
            sqlx::query("INSERT INTO blacklist (kind, value, reason) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE reason = VALUES(reason)")
                .bind(kind)
                .bind(value)
                .bind(reason)
                .execute(self.db.main())
                .await?;
        } else {
            sqlx::query("DELETE FROM blacklist WHERE kind = ? AND value = ?")
                .bind(kind)
                .bind(value)
                .execute(self.db.main())
                .await?;
        }
        self.refresh().await
    }

    /// The blacklist as MySQL holds it.
    pub async fn blacklist(&self) -> Result<Vec<BlacklistEntry>> {
        let rows = sqlx::query("SELECT kind, value, reason FROM blacklist ORDER BY kind, value")
            .fetch_all(self.db.main())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(BlacklistEntry {
                    kind: crate::ledger::text(r, 0)?,
                    value: crate::ledger::text(r, 1)?,
                    reason: r.try_get(2)?,
                })
            })
            .collect()
    }
}
