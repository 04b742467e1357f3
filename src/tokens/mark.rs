//! Marking booked tokens settled (mark.lua), after the MySQL commit: the status flips
//! to `s`, the settled counters grow, the stream entry is acknowledged and deleted, and
//! the account snapshots are stored, one script call per partition.

use std::collections::BTreeMap;

use super::{AwardEntry, Tokens};
use crate::domain::UserId;
use crate::store::{evalsha, hour_of, now_ms, query_scripted, SETTLE_GROUP};

/// An account as a booking transaction committed it, for the Redis-only view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub user: UserId,
    pub version: i64,
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
}

impl Tokens {
    /// Marks `entries` settled and stores `snapshots`; returns how many tokens went
    /// from pending to settled now.
    pub async fn mark(
        &self,
        entries: &[AwardEntry],
        snapshots: &[Snapshot],
    ) -> redis::RedisResult<u64> {
        let redis = &self.redis;
        let mut by_partition: BTreeMap<u32, (Vec<&AwardEntry>, Vec<&Snapshot>)> = BTreeMap::new();
        for e in entries {
            by_partition
                .entry(redis.partition_of(e.user))
                .or_default()
                .0
                .push(e);
        }
        for s in snapshots {
            by_partition
                .entry(redis.partition_of(s.user))
                .or_default()
                .1
                .push(s);
        }
        if by_partition.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (p, (es, snaps)) in &by_partition {
            let mut keys: Vec<String> = vec![redis.settled_index_key(*p), redis.stream_key(*p)];
            let mut args: Vec<String> = vec![
                now.to_string(),
                SETTLE_GROUP.to_string(),
                es.len().to_string(),
                snaps.len().to_string(),
            ];
            for e in es {
                keys.push(redis.status_key(e.user));
                keys.push(redis.counters_key(*p, &e.activity_id));
                args.push(e.out_trade_no.clone());
                args.push(hour_of(e.at_ms));
                args.push(e.amount_cents.to_string());
                args.push(e.user.to_string());
                args.push(e.stream_id.clone().unwrap_or_default());
                args.push(e.budget_gen.to_string());
            }
            for s in snaps {
                keys.push(redis.snapshot_key(s.user));
                args.push(s.version.to_string());
                args.push(s.balance_cents.to_string());
                args.push(s.total_income_cents.to_string());
                args.push(s.withdrawn_cents.to_string());
            }
            let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut cmd = evalsha(&self.scripts.mark, &key_refs);
            cmd.arg(&args);
            pipe.add_command(cmd);
        }
        let changed: Vec<u64> = query_scripted(redis, &pipe, &self.scripts()).await?;
        Ok(changed.iter().sum())
    }
}
