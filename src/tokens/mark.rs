//! Marking booked tokens settled (mark.lua), after the MySQL commit: the status flips
//! to `s`, the settled counters grow (summed per counter group), the stream entries whose
//! tokens are all booked are acknowledged and deleted, and the account snapshots are
//! stored in the users' status hashes, one script call per partition.

use std::collections::BTreeMap;

use super::counters::{CountedIn, CounterGroups};
use super::status::index_member;
use super::{AwardEntry, Tokens};
use crate::domain::UserId;
use crate::store::{evalsha, now_ms, query_scripted, SETTLE_GROUP};

/// An account as a booking transaction committed it, for the Redis-only view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub user: UserId,
    pub version: i64,
    pub balance_cents: i64,
    pub total_income_cents: i64,
    pub withdrawn_cents: i64,
    /// The fence this change lifts once stored ([`crate::tokens::Fence`]).
    pub lifts: Option<String>,
}

/// One partition's share of a mark call.
#[derive(Default)]
struct PartitionMark<'a> {
    entries: Vec<&'a AwardEntry>,
    snapshots: Vec<&'a Snapshot>,
    acks: Vec<&'a str>,
}

impl Tokens {
    /// Marks `entries` settled, stores `snapshots` and acknowledges (and deletes) the
    /// settlement stream entries `acks` (partition, entry id); returns how many tokens
    /// went from pending to settled now. An entry carries several tokens: the caller
    /// acknowledges it only once every one of them is booked.
    pub async fn mark(
        &self,
        entries: &[AwardEntry],
        snapshots: &[Snapshot],
        acks: &[(u32, String)],
    ) -> redis::RedisResult<u64> {
        let redis = &self.redis;
        let mut by_partition: BTreeMap<u32, PartitionMark<'_>> = BTreeMap::new();
        for e in entries {
            let p = redis.partition_of(e.user);
            by_partition.entry(p).or_default().entries.push(e);
        }
        for s in snapshots {
            let p = redis.partition_of(s.user);
            by_partition.entry(p).or_default().snapshots.push(s);
        }
        for (p, id) in acks {
            by_partition.entry(*p).or_default().acks.push(id);
        }
        if by_partition.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (p, part) in &by_partition {
            let mut keys: Vec<String> = vec![redis.settled_index_key(*p), redis.stream_key(*p)];
            keys.extend(part.entries.iter().map(|e| redis.status_key(e.user)));
            // Counter groups (mark.lua sums only the tokens it changed).
            let mut groups = CounterGroups::default();
            let in_group: Vec<usize> = part
                .entries
                .iter()
                .map(|e| {
                    let place = CountedIn {
                        partition: *p,
                        owner: &e.activity_id,
                        at_ms: e.at_ms,
                        gen: e.budget_gen,
                    };
                    groups.add(
                        &mut keys,
                        place,
                        |p, a| redis.counters_key(p, a),
                        e.amount_cents,
                    )
                })
                .collect();
            for s in &part.snapshots {
                keys.push(redis.status_key(s.user));
                keys.push(redis.legacy_snapshot_key(s.user));
            }
            let mut args: Vec<String> = vec![
                now.to_string(),
                SETTLE_GROUP.to_string(),
                part.entries.len().to_string(),
                part.snapshots.len().to_string(),
                part.acks.len().to_string(),
                groups.hashes().to_string(),
                groups.len().to_string(),
                if self.snapshot_compat { "1" } else { "0" }.to_string(),
            ];
            for group in groups.iter() {
                args.push(group.key.to_string());
                args.push(group.hour.clone());
                args.push(group.gen_field());
            }
            for (e, group) in part.entries.iter().zip(in_group) {
                args.push(e.out_trade_no.clone());
                args.push(index_member(e.user, &e.out_trade_no));
                args.push(e.amount_cents.to_string());
                args.push(group.to_string());
            }
            for s in &part.snapshots {
                args.push(s.version.to_string());
                args.push(s.balance_cents.to_string());
                args.push(s.total_income_cents.to_string());
                args.push(s.withdrawn_cents.to_string());
                args.push(s.lifts.clone().unwrap_or_default());
            }
            args.extend(part.acks.iter().map(|id| id.to_string()));
            keys.push(redis.life_key(*p));
            let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut cmd = evalsha(&self.scripts.mark, &key_refs);
            cmd.arg(&args);
            pipe.add_command(cmd);
        }
        let changed: Vec<u64> = query_scripted(redis, &pipe, &self.scripts()).await?;
        Ok(changed.iter().sum())
    }
}
