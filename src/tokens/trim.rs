//! Trimming: settled tokens older than the retention leave Redis (the ledger keeps
//! them, with the signed token, and the views read them from there). A trimmed token
//! leaves [`TRIMMED`](super::TRIMMED) under its out_trade_no, so a late retry of the
//! award is answered from the ledger instead of minting it again; markers go once their
//! activity ended more than the retry grace ago.

use redis::AsyncCommands;

use super::status::parse_member;
use super::{Tokens, TRIMMED};
use crate::domain::OutTradeNo;

#[derive(Debug, Clone, Copy)]
pub struct TrimSettings {
    /// Settled tokens older than this (ms since the epoch) are trimmed.
    pub settled_before_ms: i64,
    /// Markers whose time (ms since the epoch) is before this go.
    pub now_ms: i64,
    /// How long after its activity ends a marker stays.
    pub grace_ms: i64,
    /// Index members handled per round trip...
    pub batch: usize,
    /// ...and at most this many round trips per partition and index.
    pub max_rounds: usize,
}

impl Tokens {
    /// Trims every partition; `ends_ms` gives an activity's end (ms), when known.
    /// Returns how many tokens were trimmed.
    pub async fn trim(
        &self,
        settings: TrimSettings,
        ends_ms: impl Fn(&str) -> Option<i64>,
    ) -> redis::RedisResult<usize> {
        let redis = &self.redis;
        let TrimSettings {
            settled_before_ms: cutoff,
            now_ms: now,
            grace_ms,
            batch,
            max_rounds,
        } = settings;
        let batch = batch.max(1);
        let mut trimmed = 0;
        let mut conn = redis.conn();
        for p in 0..redis.partitions() {
            let index = redis.settled_index_key(p);
            let markers = redis.markers_key(p);
            for _ in 0..max_rounds {
                let members: Vec<String> = conn
                    .zrangebyscore_limit(&index, "-inf", cutoff, 0, batch as isize)
                    .await?;
                if members.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                for m in &members {
                    let Some((user, otn)) = parse_member(m) else {
                        continue;
                    };
                    // The marker lives while the activity accepts awards, plus the grace.
                    let ends = OutTradeNo::activity_of(otn)
                        .and_then(&ends_ms)
                        .unwrap_or(now);
                    pipe.hset(redis.tokens_key(user), otn, TRIMMED).ignore();
                    pipe.hdel(redis.status_key(user), otn).ignore();
                    pipe.zadd(&markers, m, ends.max(now) + grace_ms).ignore();
                }
                pipe.zrem(&index, &members).ignore();
                pipe.query_async::<()>(&mut conn).await?;
                trimmed += members.len();
                if members.len() < batch {
                    break;
                }
            }
            for _ in 0..max_rounds {
                let expired: Vec<String> = conn
                    .zrangebyscore_limit(&markers, "-inf", now, 0, batch as isize)
                    .await?;
                if expired.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                for m in &expired {
                    if let Some((user, otn)) = parse_member(m) {
                        pipe.hdel(redis.tokens_key(user), otn).ignore();
                    }
                }
                pipe.zrem(&markers, &expired).ignore();
                pipe.query_async::<()>(&mut conn).await?;
                if expired.len() < batch {
                    break;
                }
            }
        }
        Ok(trimmed)
    }
}
