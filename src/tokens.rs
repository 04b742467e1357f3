//! The Redis token record of a user: the signed token bytes (`P{p}:tok:{user}`) and the
//! accounting status beside them (`P{p}:st:{user}`), as store.lua writes them.
//!
//! Status values are `p|amount|at_ms|activity|scene|gen` while pending and the same with
//! `s` once booked and marked (mark.lua). After housekeeping trims a settled token, its
//! bytes are replaced by [`TRIMMED`], a marker that keeps the award's idempotency (the
//! ledger row holds the signed token) until the activity's retry grace has passed.

use crate::domain::UserId;
use crate::settle::AwardEntry;
use crate::store::Redis;

/// What the token hash holds for a settled token trimmed from Redis. Never a prefix
/// of an encoded SignedToken (those start with field 1's tag, 0x0a).
pub const TRIMMED: &[u8] = b"~";

/// One entry of a user's status hash.
pub struct StatusEntry {
    pub pending: bool,
    pub entry: AwardEntry,
}

/// Reads a status value (see the module comment). Entries written before budget
/// generations have no `gen` part: generation 0.
pub fn parse_status(user: UserId, otn: &str, value: &str) -> Option<StatusEntry> {
    let mut parts = value.split('|');
    let pending = match parts.next()? {
        "p" => true,
        "s" => false,
        _ => return None,
    };
    let amount_cents: i64 = parts.next()?.parse().ok()?;
    let at_ms: i64 = parts.next()?.parse().ok()?;
    let activity_id = parts.next()?.to_string();
    let scene_id = parts.next()?.to_string();
    let budget_gen: i64 = match parts.next() {
        Some(g) => g.parse().ok()?,
        None => 0,
    };
    Some(StatusEntry {
        pending,
        entry: AwardEntry {
            user,
            out_trade_no: otn.to_string(),
            amount_cents,
            activity_id,
            scene_id,
            at_ms,
            stream_id: None,
            budget_gen,
        },
    })
}

/// Every status entry of `user`.
pub async fn statuses_of(redis: &Redis, user: UserId) -> redis::RedisResult<Vec<StatusEntry>> {
    let mut conn = redis.conn();
    let statuses: Vec<(String, String)> =
        redis::AsyncCommands::hgetall(&mut conn, redis.status_key(user)).await?;
    Ok(statuses
        .iter()
        .filter_map(|(otn, v)| parse_status(user, otn, v))
        .collect())
}

/// The pending tokens of `user`.
pub async fn pending_of(redis: &Redis, user: UserId) -> redis::RedisResult<Vec<AwardEntry>> {
    Ok(statuses_of(redis, user)
        .await?
        .into_iter()
        .filter(|s| s.pending)
        .map(|s| s.entry)
        .collect())
}

/// The pending tokens of several users, in one round trip.
pub async fn pending_of_users(redis: &Redis, users: &[i64]) -> redis::RedisResult<Vec<AwardEntry>> {
    let users: Vec<UserId> = users
        .iter()
        .filter_map(|u| UserId::parse(*u).ok())
        .collect();
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for user in &users {
        pipe.hgetall(redis.status_key(*user));
    }
    let mut conn = redis.conn();
    let maps: Vec<Vec<(String, String)>> = pipe.query_async(&mut conn).await?;
    let mut out = Vec::new();
    for (user, statuses) in users.iter().zip(maps) {
        out.extend(
            statuses
                .iter()
                .filter_map(|(otn, v)| parse_status(*user, otn, v))
                .filter(|s| s.pending)
                .map(|s| s.entry),
        );
    }
    Ok(out)
}

/// The token bytes Redis holds for `entries`, in order (`None`: not held).
pub async fn token_bytes(
    redis: &Redis,
    entries: &[AwardEntry],
) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for e in entries {
        pipe.hget(redis.tokens_key(e.user), &e.out_trade_no);
    }
    let mut conn = redis.conn();
    pipe.query_async(&mut conn).await
}
